"""A request as the scheduler sees it: token ids, progress, blocks and timestamps. No torch."""

from __future__ import annotations

import time
from dataclasses import dataclass, field
from enum import Enum


# A sliding group's block before the window: given back, its place kept (block tables read 0).
NULL_BLOCK = -1


class RequestStatus(Enum):
    WAITING = "waiting"
    RUNNING = "running"
    FINISHED = "finished"


class AdmissionError(ValueError):
    """A request that can never be served; `code` names the reason for the HTTP layer."""

    def __init__(self, message: str, code: str) -> None:
        super().__init__(message)
        self.code = code


@dataclass(slots=True, eq=False)
class Request:
    request_id: str
    prompt_token_ids: list[int]
    max_tokens: int
    # n>1: the sibling whose prompt must be computed first, so this one reuses its KV blocks.
    prefill_after: Request | None = None
    # False when every prompt position must be computed (e.g. for prompt logprobs).
    use_prefix_cache: bool = True
    arrival_time: float = field(default_factory=time.monotonic)
    priority: int = 0  # lower runs earlier, under the scheduler's "priority" policy
    # The LoRA adapter the request runs with (its lora_int_id); 0: the base model.
    lora_id: int = 0
    # What the prefix cache chains the request's first block from: None for the base model. An
    # adapter's KV differs from the base model's for the same tokens, so its prefixes are kept
    # apart: a negative number of its own (never the serial of a computed prefix, which are >= 0).
    prefix_root: int | None = None
    # A beam search's request once the search has begun (engine/beam_search.py): its search
    # waits for it, so it goes before the requests that arrived after the search (its arrival
    # time), and may preempt them for a seat or blocks.
    preempts_later: bool = False
    # An embedding (engine/pooling.py): it computes its prompt and samples no token.
    pooling: bool = False

    token_ids: list[int] = field(default_factory=list)  # prompt + output, as far as the host knows
    # Sampled on the device, not yet in token_ids (async scheduling: a step is scheduled while
    # the previous step's tokens are still on their way back).
    num_pending_tokens: int = 0
    num_computed_tokens: int = 0
    # Speculative decoding: tokens proposed to follow token_ids, computed with the request's
    # next decode step if the scheduler finds room (ScheduledBatch.spec_token_ids).
    spec_token_ids: list[int] = field(default_factory=list)
    # The KV block ids of each of the pool's layer groups (scheduler/kv_cache_groups.py), one per
    # block of the sequence; a sliding group's blocks before its window are NULL_BLOCK.
    kv_blocks: list[list[int]] = field(default_factory=lambda: [[]])
    # Chained hashes of the full blocks of token_ids, computed lazily by the block manager.
    block_hashes: list[int] = field(default_factory=list)
    # Leading full blocks registered in the prefix cache (hits, then our own), and the serial
    # of the last of them: where the block manager's registration resumes.
    num_prefix_cached_blocks: int = 0
    prefix_tail_serial: int | None = None
    num_cached_tokens: int = 0  # prefix-cache hit tokens at first admission
    num_preemptions: int = 0
    status: RequestStatus = RequestStatus.WAITING
    # A beam's request between the step that computed its next token's logprobs and its
    # search's choice of that token: it keeps its seat and blocks, and is not scheduled.
    held: bool = False

    first_scheduled_time: float | None = None
    first_token_time: float | None = None
    token_times: list[float] = field(default_factory=list)
    finish_time: float | None = None

    def __post_init__(self) -> None:
        self.token_ids = list(self.prompt_token_ids)

    @property
    def block_ids(self) -> list[int]:
        """The block ids of the first layer group: the only one, unless the model is hybrid."""
        return self.kv_blocks[0]

    @block_ids.setter
    def block_ids(self, block_ids: list[int]) -> None:
        self.kv_blocks[0] = block_ids

    def held_block_ids(self) -> list[int]:
        """Every block the request holds, in any group."""
        return [b for blocks in self.kv_blocks for b in blocks if b != NULL_BLOCK]

    @property
    def num_prompt_tokens(self) -> int:
        return len(self.prompt_token_ids)

    @property
    def num_tokens(self) -> int:
        """Tokens the sequence has, pending ones included: what the scheduler plans with."""
        return len(self.token_ids) + self.num_pending_tokens

    @property
    def num_output_tokens(self) -> int:
        """Output tokens the host knows (pending ones excluded)."""
        return len(self.token_ids) - len(self.prompt_token_ids)

    @property
    def output_token_ids(self) -> list[int]:
        return self.token_ids[len(self.prompt_token_ids):]

    @property
    def num_uncomputed_tokens(self) -> int:
        return self.num_tokens - self.num_computed_tokens

    @property
    def done_by_length(self) -> bool:
        """Its pending tokens already reach max_tokens: it finishes when they arrive, so
        computing another token for it would be wasted."""
        return self.num_pending_tokens > 0 and self.num_output_tokens + self.num_pending_tokens >= self.max_tokens

    @property
    def prompt_computed(self) -> bool:
        return self.num_computed_tokens >= len(self.prompt_token_ids)

    @property
    def finished(self) -> bool:
        return self.status is RequestStatus.FINISHED

    def append_token(self, token_id: int, now: float, pending: bool = False) -> None:
        """Add a sampled token; pending: it was counted in num_pending_tokens until now."""
        if pending:
            self.num_pending_tokens -= 1
        self.token_ids.append(token_id)
        if self.first_token_time is None:
            self.first_token_time = now
        self.token_times.append(now)
