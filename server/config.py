"""How the server runs: address, limits, logging — and the engine arguments for its worker."""

from __future__ import annotations

import os
from dataclasses import dataclass, field
from typing import Any


@dataclass(slots=True)
class ServerConfig:
    engine_args: dict[str, Any] = field(default_factory=dict)  # EngineConfig fields (plain data)
    host: str = "127.0.0.1"
    port: int = 8000
    served_model_name: str | None = None  # default: the model directory's name
    # When set, requests need "Authorization: Bearer <one of them>"; each key is a client with
    # budgets of its own (server/limits.py).
    api_keys: list[str] = field(default_factory=list)
    log_request_text: bool = False  # put prompt and output text in the request log line
    # Caps: a request beyond one gets a 400 that names the cap.
    max_n: int = 16
    # prompts in one completions request (each n choices: engine requests), inputs in one embeddings request
    max_prompts: int = 1024
    max_tokens_limit: int | None = None  # None: only the context length bounds max_tokens
    max_stop: int = 16
    max_logprobs: int = 20
    max_body_bytes: int = 4 << 20
    max_pending_requests: int = 4096  # API requests in flight; beyond: 503 overloaded
    request_timeout: float | None = None  # seconds; past it: abort and 504
    # Per client (API key) and minute; beyond: 429 (server/limits.py). None: no limit.
    rate_limit_requests: int | None = None
    rate_limit_tokens: int | None = None  # prompts + n x max_tokens each reserved, settled to the usage
    # Prices per million tokens (the log line's cost, stoke_cost_total); the cached prompt
    # tokens' None: the prompt's price.
    price_prompt: float = 0.0
    price_cached_prompt: float | None = None
    price_completion: float = 0.0
    cost_cap: float | None = None  # per client and period, at those prices; beyond: 429
    cost_cap_period: str = "day"  # hour, day or month (UTC)
    drain_timeout: float = 30.0  # SIGTERM: seconds in-flight requests get to finish
    worker_death_grace: float = 1.0  # seconds /health answers 503 before the process exits
    log_level: str = "info"
    cpu_threads: int | None = None  # torch intra-op threads in the worker (None: torch's default)
    chat_template: str | None = None  # --chat-template: a Jinja file or the template itself
    # vLLM's --trust-request-chat-template: a request may bring a chat template of its own (a
    # template runs sandboxed, but nothing bounds the time it takes: trusted clients only)
    trust_request_chat_template: bool = False
    # The Responses API's store (server/responses.py): how many responses are kept in memory for
    # previous_response_id and GET /v1/responses/{id}; 0: none (previous_response_id is a 400).
    max_stored_responses: int = 0
    # How a chat answer's tool calls are read (server/tool_parsers.py); None: tool_choice "auto"
    # is refused (vLLM's --enable-auto-tool-choice --tool-call-parser).
    tool_call_parser: str | None = None
    # Call ids of 9 letters and digits, the only ones Mistral's chat templates take back
    # (--tool-call-parser mistral, with or without --enable-auto-tool-choice: forced calls too)
    short_tool_call_ids: bool = False
    # Browser origins whose pages may call the API (CORS), e.g. a web UI's; ["*"]: any. None:
    # no CORS headers (browsers then allow same-origin pages only).
    allowed_origins: list[str] | None = None
    # LoRA adapters clients may name as their model (vLLM's --lora-modules): (name, PEFT dir),
    # each given the id of its place in the list (1, 2, ...); they need engine_args enable_lora.
    lora_modules: list[tuple[str, str]] = field(default_factory=list)
    # vLLM's runtime LoRA updating: POST /v1/load_lora_adapter and /v1/unload_lora_adapter.
    # Any client with a key may then have the server read any adapter directory it can reach.
    allow_runtime_lora_updating: bool = False

    @staticmethod
    def model_name(model_path: str) -> str:
        return os.path.basename(os.path.normpath(model_path))
