"""One structured JSON line per finished API request, on the `stoke.requests` logger.

Fields are always present (null when unknown), so a log pipeline can rely on the shape:
request_id, endpoint (completions, chat.completions, responses, embeddings, score, rerank or
classify: a line of the last four has no completion tokens, ttft_s or mean_itl_s, and finishes
"stop"), model, key_id (a hash prefix of the API key, never the key), user,
stream, n, beam_search (true: `use_beam_search`, n beams), priority, structured (what the answer
was held to: json, json_object, choice or regex; a forced tool_choice is json; null: free text), prompt_tokens, cached_tokens, completion_tokens,
reasoning_tokens (those of the completion tokens spent thinking: chats on a server with
--reasoning-parser, null otherwise), cost
(at the server's prices; null without prices), queue_time_s, ttft_s, mean_itl_s, e2e_s, finish_reason, error_type, status —
plus prompt and output text only with --log-request-text. Latencies are the engine's monotonic
timestamps (seconds). A request cut short (the client left, a timeout) is logged once the
worker confirmed its abort, within a step, so its line has the engine's times too: e2e_s runs
to the abort, and a request that was never scheduled spent all of it queued.
"""

from __future__ import annotations

import hashlib
import json
import logging
from dataclasses import dataclass, fields
from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:
    from server.limits import Reservation

logger = logging.getLogger("stoke.requests")


def key_id(api_key: str | None) -> str | None:
    """A stable, non-reversible id for a client key: enough to group by, useless to call with."""
    if not api_key:
        return None
    return "sha256:" + hashlib.sha256(api_key.encode()).hexdigest()[:12]


@dataclass(slots=True)
class RequestRecord:
    request_id: str
    endpoint: str
    model: str | None = None
    key_id: str | None = None
    user: str | None = None
    stream: bool = False
    n: int = 1
    beam_search: bool = False
    priority: int = 0
    structured: str | None = None
    prompt_tokens: int = 0
    cached_tokens: int = 0
    completion_tokens: int = 0
    reasoning_tokens: int | None = None  # of the completion tokens (a chat on a server with a reasoning parser)
    cost: float | None = None
    queue_time_s: float | None = None
    ttft_s: float | None = None
    mean_itl_s: float | None = None
    e2e_s: float | None = None
    finish_reason: str | None = None
    error_type: str | None = None
    status: int = 200
    prompt: Any = None
    output: Any = None
    _itl_sum: float = 0.0
    _itl_count: int = 0
    _finished: bool = False  # status and error type are final
    _awaiting_engine: bool = False  # aborted: the worker's last outputs are on their way
    _done: bool = False  # the line was written
    _reservation: Reservation | None = None  # what the client's limits set aside for it
    _scheduled: bool = False  # the engine started computing it: its usage is charged

    def add_engine_metrics(self, metrics: dict[str, Any] | None) -> None:
        """Fold one engine request's timestamps in (a request with several prompts has several)."""
        if not metrics:
            return
        arrival = metrics["arrival_time"]
        self._scheduled = self._scheduled or metrics["first_scheduled_time"] is not None

        def since(t: float | None) -> float | None:
            return None if t is None else max(0.0, t - arrival)

        queue, ttft, e2e = since(metrics["first_scheduled_time"]), since(metrics["first_token_time"]), \
            since(metrics["finish_time"])
        if queue is None:  # aborted before it was ever scheduled: queued all its life
            queue = e2e
        self.queue_time_s = queue if self.queue_time_s is None or queue is None else max(self.queue_time_s, queue)
        self.ttft_s = ttft if self.ttft_s is None or ttft is None else min(self.ttft_s, ttft)
        self.e2e_s = e2e if self.e2e_s is None or e2e is None else max(self.e2e_s, e2e)
        itls = metrics["inter_token_latencies"]
        self._itl_sum += sum(itls)
        self._itl_count += len(itls)
        if self._itl_count:
            self.mean_itl_s = self._itl_sum / self._itl_count


LINE_FIELDS = tuple(f.name for f in fields(RequestRecord) if not f.name.startswith("_"))
LATENCY_FIELDS = ("queue_time_s", "ttft_s", "mean_itl_s", "e2e_s")
# What a client sends as `user` or `model` is logged up to this many characters (a 4 MB `user`
# made a 4 MB line).
CLIENT_FIELD_CHARS = 256
# JSON leaves these unescaped, but Python's str.splitlines (and some log shippers) break lines
# at them: a client's `user` could then forge a line of its own.
_LINE_BREAKS = str.maketrans({"\x85": "\\u0085", "\u2028": "\\u2028", "\u2029": "\\u2029"})


class RequestLogger:
    def __init__(self, log_text: bool = False) -> None:
        self.log_text = log_text
        # The line's fields, read off the record (dataclasses.asdict deep-copied every value:
        # ~7% of the HTTP process's CPU per request).
        self.fields = LINE_FIELDS if log_text else tuple(f for f in LINE_FIELDS if f not in ("prompt", "output"))

    def emit(self, record: RequestRecord) -> None:
        """Write the record's line once (later calls for the same record do nothing)."""
        if record._done:
            return
        record._done = True
        line: dict[str, Any] = {"event": "request"}
        for name in self.fields:
            line[name] = getattr(record, name)
        for key in LATENCY_FIELDS:
            if line[key] is not None:
                line[key] = round(line[key], 6)
        for key in ("user", "model"):
            if isinstance(line[key], str) and len(line[key]) > CLIENT_FIELD_CHARS:
                line[key] = line[key][:CLIENT_FIELD_CHARS] + "..."
        logger.info(json.dumps(line, ensure_ascii=False, separators=(",", ":")).translate(_LINE_BREAKS))
