"""Process lifecycle of `stoke serve`: SIGTERM drains and exits 0; a dead worker means 503s and exit != 0."""

from __future__ import annotations

import json
import os
import signal
import threading
import time

import openai
import pytest

from tests.server_harness import ServerProcess


def _server(*extra: str) -> ServerProcess:
    return ServerProcess("--kv-cache-memory-bytes", "64MiB", "--cpu-threads", "1", *extra).start()


def test_sigterm_drains_in_flight_requests_then_exits_zero():
    """SIGTERM: no new requests; a short in-flight stream finishes in full; a long request still
    running at the drain timeout gets a clean 503; then the process exits 0."""
    server = _server("--drain-timeout", "10")
    try:
        client = openai.OpenAI(base_url=server.base_url, api_key="unused", max_retries=0, timeout=120)
        first_chunk = threading.Event()
        result: dict = {}

        def stream() -> None:
            try:
                chunks = []
                for chunk in client.completions.create(model=None, prompt="Once upon a time", max_tokens=16,
                                                       temperature=0, stream=True, extra_body={"ignore_eos": True},
                                                       stream_options={"include_usage": True}):
                    chunks.append(chunk)
                    first_chunk.set()
                result["chunks"] = chunks
            except Exception as exc:  # noqa: BLE001 - reported below
                result["error"] = exc
            finally:
                first_chunk.set()

        def long() -> None:
            try:
                client.completions.create(model=None, prompt="Hi", max_tokens=1400, extra_body={"ignore_eos": True})
            except Exception as exc:  # noqa: BLE001
                result["long"] = exc

        threads = [threading.Thread(target=long), threading.Thread(target=stream)]
        for t in threads:
            t.start()
        assert first_chunk.wait(60)
        server.proc.send_signal(signal.SIGTERM)
        time.sleep(0.5)
        status, _ = server.get("/ready", timeout=2)
        assert status in (None, 503)  # no longer accepting (refused) or not ready
        for t in threads:
            t.join(120)
        assert "error" not in result, result.get("error")
        assert result["chunks"][-1].usage.completion_tokens == 16  # the short request finished in full
        long_error = result["long"]
        assert isinstance(long_error, openai.APIStatusError) and long_error.status_code == 503
        assert long_error.body["code"] == "shutting_down"
        assert server.proc.wait(60) == 0
        lines = {line["completion_tokens"] == 16: line for line in server.log_lines()}
        assert lines[True]["status"] == 200
        assert lines[False]["status"] == 503 and lines[False]["error_type"] == "overloaded"
        assert "worker exits (0)" in server.stderr()
    finally:
        server.close()


def test_request_while_the_model_loads_waits_for_it():
    """HTTP answers before the engine is ready. A chat request without max_tokens (its default
    is the room left in the context, which needs the worker's limits) arriving then waits for
    the engine and is served. The worker is held stopped until the request is in, so it
    arrives while loading."""
    server = ServerProcess("--kv-cache-memory-bytes", "64MiB", "--cpu-threads", "1",
                           "--max-tokens-limit", "4").start(wait="/health")
    try:
        worker = server.worker_pid()
        os.kill(worker, signal.SIGSTOP)
        try:
            assert server.get("/ready")[0] == 503
            result: dict = {}

            def chat() -> None:
                client = openai.OpenAI(base_url=server.base_url, api_key="unused", max_retries=0, timeout=240)
                result["response"] = client.chat.completions.create(
                    model=None, messages=[{"role": "user", "content": "Hi"}], temperature=0)

            thread = threading.Thread(target=chat)
            thread.start()
            time.sleep(1.0)
            assert thread.is_alive() and server.get("/ready")[0] == 503
        finally:
            os.kill(worker, signal.SIGCONT)
        thread.join(240)
        assert result["response"].usage.completion_tokens == 4  # the server's cap: room left, capped
        assert server.get("/ready")[0] == 200
        assert server.metrics()['stoke_request_errors_total{type="internal"}'] == 0
    finally:
        server.close()


def test_worker_death_fails_in_flight_with_503_and_exits_nonzero():
    server = _server("--worker-death-grace", "3")
    try:
        client = openai.OpenAI(base_url=server.base_url, api_key="unused", max_retries=0, timeout=120)
        results: dict = {}
        streaming = threading.Event()

        def blocking() -> None:
            try:
                client.completions.create(model=None, prompt="Tell me about the sea.", max_tokens=1000,
                                          extra_body={"ignore_eos": True})
            except Exception as exc:  # noqa: BLE001
                results["blocking"] = exc

        def stream() -> None:
            chunks = 0
            try:
                for _ in client.completions.create(model=None, prompt="Tell me about the sky.", max_tokens=1000,
                                                   stream=True, extra_body={"ignore_eos": True}):
                    chunks += 1
                    if chunks == 5:  # both requests are decoding: the other one is in the same batch
                        streaming.set()
            except Exception as exc:  # noqa: BLE001
                results["stream"] = exc
            finally:
                streaming.set()

        threads = [threading.Thread(target=blocking), threading.Thread(target=stream)]
        for t in threads:
            t.start()
        assert streaming.wait(60) and server.metrics()["stoke_requests_running"] == 2
        os.kill(server.worker_pid(), signal.SIGKILL)
        for t in threads:
            t.join(30)
        assert not any(t.is_alive() for t in threads), "a request hung after the worker died"

        blocking_error = results["blocking"]
        assert isinstance(blocking_error, openai.APIStatusError) and blocking_error.status_code == 503
        assert blocking_error.body["code"] == "engine_unavailable"
        assert isinstance(results["stream"], openai.APIError)  # the error event inside the stream
        status, body = server.get("/health", timeout=2)
        assert status == 503 and json.loads(body)["status"] == "engine_dead"
        gauges = server.metrics()  # a dead engine is not a busy one
        assert [gauges[g] for g in ("stoke_requests_running", "stoke_requests_waiting",
                                    "stoke_kv_cache_usage_ratio")] == [0, 0, 0]
        code = server.proc.wait(60)
        assert code != 0
        assert f"the engine worker died (exit code {-signal.SIGKILL})" in server.stderr()
        lines = server.log_lines()
        assert [line["status"] for line in lines[-2:]] == [503, 503]
        assert all(line["error_type"] == "internal" for line in lines[-2:])
        # Each line has the tokens made before the death (the body never went out).
        assert all(line["completion_tokens"] >= 3 for line in lines[-2:]), lines[-2:]
    finally:
        server.close()


if __name__ == "__main__":
    pytest.main([__file__, "-q"])
