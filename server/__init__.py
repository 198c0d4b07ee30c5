"""The HTTP layer: OpenAI-compatible API, SSE, Prometheus metrics, request logs, limits.

The HTTP process (FastAPI + uvicorn) validates, renders chat templates, tokenizes and streams;
the engine runs in its own worker process (server/worker.py), reached over OS pipes carrying
length-prefixed JSON frames (server/ipc.py). Imports point down: server → engine → scheduler.
"""
