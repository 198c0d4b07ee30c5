"""What the engine hands back: vLLM's RequestOutput / CompletionOutput shapes."""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any


class Logprob(float):
    """vLLM's Logprob (`logprob`, `rank`: 1 is the likeliest token, `decoded_token`: the token's
    text decoded alone) that is also the float it holds, so code written for vLLM's objects and
    code that reads logprobs as numbers both work."""

    __slots__ = ("rank", "decoded_token")

    def __new__(cls, logprob: float, rank: int | None = None, decoded_token: str | None = None) -> Logprob:
        self = super().__new__(cls, logprob)
        self.rank = rank
        self.decoded_token = decoded_token
        return self

    @property
    def logprob(self) -> float:
        return float(self)

    def __repr__(self) -> str:
        return f"Logprob(logprob={float(self)!r}, rank={self.rank!r}, decoded_token={self.decoded_token!r})"


@dataclass(slots=True)
class CompletionOutput:
    index: int
    text: str
    token_ids: list[int]
    cumulative_logprob: float | None = None
    # Per generated token: {token_id: Logprob} for the sampled token and the top-k (plain
    # floats where LLMEngine.logprob_objects is off: the server's worker).
    logprobs: list[dict[int, float]] | None = None
    finish_reason: str | None = None  # "stop" | "length" | "abort"
    stop_reason: int | str | None = None  # the stop token id or stop string that matched
    delta_text: str = ""  # text new since this request's previous output
    delta_token_ids: list[int] = field(default_factory=list)
    num_tokens: int = 0  # tokens generated so far (with outputs="delta", token_ids holds the new ones only)

    @property
    def finished(self) -> bool:
        return self.finish_reason is not None


@dataclass(slots=True)
class RequestMetrics:
    """Monotonic-clock timestamps (time.monotonic) of the request's life."""

    arrival_time: float
    first_scheduled_time: float | None = None
    first_token_time: float | None = None
    finish_time: float | None = None
    inter_token_latencies: list[float] = field(default_factory=list)
    num_preemptions: int = 0


@dataclass(slots=True)
class RequestOutput:
    request_id: str
    prompt: str | None
    prompt_token_ids: list[int]
    outputs: list[CompletionOutput]
    finished: bool
    num_cached_tokens: int = 0
    metrics: RequestMetrics | None = None
    # SamplingParams.prompt_logprobs: per prompt token, {token_id: Logprob} of the token and
    # the top-k given the tokens before it (as `logprobs`); None for the first token.
    prompt_logprobs: list[dict[int, float] | None] | None = None
    lora_request: Any = None  # the LoRARequest it ran with (engine.lora), None: the base model
