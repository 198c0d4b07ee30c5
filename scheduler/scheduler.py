"""Iteration-level continuous batching over the block manager.

Every step: running decodes first, then running partial prefills, then waiting requests are
admitted while the token budget and max_num_seqs allow. Prefill of any request is chunked to
fit the budget; long prompts are capped per step so a short request is not stuck behind them.
When blocks run out, the most recently admitted running request is preempted by recompute.
Requests with LoRA adapters run beside each other and the base model's, with at most
`max_loras` adapters among the running requests. A waiting request whose adapter would be one
more waits for a slot, and so that one frees, the running adapter that has held its slot the
longest takes no new request until its running ones finish (otherwise a busy adapter's arrivals
could keep it for ever); the other running adapters' requests and the base model's go on, and
new adapters' wait behind it. A request passed over for another reason (a prefill limit, a
token in flight) keeps a free slot for its adapter meanwhile.

The "priority" policy (vLLM's) orders the waiting queue by (priority, arrival), lower first;
the preempted request is then the running one that sorts last, and a waiting request that
finds no seat or no blocks preempts running ones of a strictly lower priority (a larger
number) to make room, as vLLM's older scheduler did; stoke only when they can make all of it,
and the request then takes the room in the same step.

A launched step is `advance`d at once; its sampled tokens arrive later (`append_token`), and
until then count as each request's pending tokens (async scheduling plans the next step with
them).

Beam search (engine/beam_search.py): a beam's request is `held` from the step that computes its
next token's logprobs until its search has chosen that token (it keeps its seat and blocks, and
is not scheduled). A beam its search forks runs at once with its parent's KV (`add_fork`: the
full blocks shared, the partial last one copied) where a seat and a block are free. A search's
waiting request (a fork without that room, a beam preempted) goes before the requests that
arrived after the search, and preempts them for a seat or blocks where it must; any waiting
request may preempt the held requests of a later search: the search waits for it, held
requests and all, so the earliest search always gets on.

Speculative decoding: a decode may compute its `spec_token_ids` (drafts) after its last token
in the same step, with what the running and newly admitted requests leave of the budget and
the KV pool (drafts never preempt, nor delay a waiting request).
Only the last token counts as computed when the step is launched; each accepted draft is
counted when its successor arrives (`append_token(..., accepted_draft=True)`), so a refused
draft's KV, in slots past the computed tokens, is simply written over later.
"""

from __future__ import annotations

import time
from bisect import insort_left, insort_right
from collections import Counter, deque
from itertools import chain
from dataclasses import dataclass, field

from scheduler.block_manager import BlockManager, PrefixHits
from scheduler.kv_cache_groups import KVCacheGroups, KVCachePlan
from scheduler.request import AdmissionError, Request, RequestStatus


SCHEDULING_POLICIES = ("fcfs", "priority")


@dataclass(slots=True)
class SchedulerConfig:
    max_model_len: int
    num_blocks: int
    block_size: int = 16
    max_num_seqs: int = 256
    max_num_batched_tokens: int = 2048
    enable_prefix_caching: bool = True
    # At most this many requests mid-prefill at once, and of those at most
    # max_long_partial_prefills with more than long_prefill_token_threshold tokens to go;
    # a long prefill gets at most that many tokens a step while others wait (and the rest of
    # the budget, when none of them can start).
    max_num_partial_prefills: int = 2
    max_long_partial_prefills: int = 1
    long_prefill_token_threshold: int = 0  # 0: max_num_batched_tokens // 2
    policy: str = "fcfs"  # or "priority" (see the module's docstring)
    # At most this many LoRA adapters among the running requests (the device's adapter
    # slots); 0: no adapters. A waiting request whose adapter finds no slot waits while one of
    # them drains (see the module docstring).
    max_loras: int = 0
    # How the model's layers share the pool (scheduler/kv_cache_groups.py); None: one group of
    # full attention.
    kv_groups: KVCacheGroups | None = None
    # Blocks of the prefix cache's host tier (scheduler/host_kv_cache.py); 0: none.
    num_host_blocks: int = 0

    def __post_init__(self) -> None:
        if self.policy not in SCHEDULING_POLICIES:
            raise ValueError(f"policy must be one of {SCHEDULING_POLICIES}, got {self.policy!r}")
        if self.long_prefill_token_threshold <= 0:
            self.long_prefill_token_threshold = max(1, self.max_num_batched_tokens // 2)
        if self.max_loras < 0:
            raise ValueError(f"max_loras must be >= 0, got {self.max_loras}")
        for name in ("max_model_len", "num_blocks", "block_size", "max_num_seqs",
                     "max_num_batched_tokens", "max_num_partial_prefills", "max_long_partial_prefills"):
            if getattr(self, name) < 1:
                raise ValueError(f"{name} must be >= 1, got {getattr(self, name)}")


@dataclass(slots=True)
class ScheduledBatch:
    """One forward pass: requests[i] computes num_tokens[i] tokens from its num_computed_tokens.
    The first num_decodes entries compute exactly one token each; a decode with drafts computes
    its last token and then its drafts (spec_token_ids), and is placed after them."""

    requests: list[Request] = field(default_factory=list)
    num_tokens: list[int] = field(default_factory=list)
    num_decodes: int = 0
    preempted: list[Request] = field(default_factory=list)
    spec_token_ids: dict[Request, list[int]] = field(default_factory=dict)

    @property
    def total_tokens(self) -> int:
        return sum(self.num_tokens)

    def __len__(self) -> int:
        return len(self.requests)

    def samples(self, i: int) -> bool:
        """Whether request i reaches its last known token this step (and so samples one; with
        drafts, one per position). An embedding samples none."""
        request = self.requests[i]
        if self.spec_token_ids and request in self.spec_token_ids:
            return True
        return request.num_computed_tokens + self.num_tokens[i] == request.num_tokens and not request.pooling


@dataclass(slots=True)
class SchedulerStats:
    num_preemptions: int = 0


def check_admissible(num_prompt_tokens: int, max_tokens: int, max_model_len: int, num_blocks: int,
                     plan: KVCachePlan) -> None:
    """Raise AdmissionError for a request that no engine of this context and KV pool (`plan`:
    what a sequence takes of it) could ever serve (the HTTP process asks too, before a request
    takes from its client's limits)."""
    total = num_prompt_tokens + max_tokens
    if num_prompt_tokens < 1:
        raise AdmissionError("the prompt must contain at least one token", "invalid_prompt")
    # max_tokens 0: an embedding, its input alone
    parts = f"{num_prompt_tokens} in the prompt + {max_tokens} max_tokens" if max_tokens else "all in the input"
    if total > max_model_len:
        raise AdmissionError(
            f"this model's maximum context length is {max_model_len} tokens, but {total} were requested ({parts})",
            "context_length_exceeded",
        )
    pool_tokens = plan.pool_tokens(num_blocks)
    if total > pool_tokens:
        groups = plan.groups.num_groups
        raise AdmissionError(
            f"the request needs {total} tokens of KV cache ({parts}) but the whole pool holds {pool_tokens} "
            f"({num_blocks} blocks of {plan.block_size}" + (f" over {groups} layer groups)" if groups > 1 else ")"),
            "kv_cache_too_small",
        )


class Scheduler:
    def __init__(self, config: SchedulerConfig) -> None:
        self.config = config
        groups = config.kv_groups or KVCacheGroups.of([0])
        self.block_manager = BlockManager(config.num_blocks, config.block_size, config.enable_prefix_caching,
                                          windows=groups.windows, num_host_blocks=config.num_host_blocks)
        # What a sequence takes of the pool, for admission (a step computes at most the token budget of one)
        self.kv_plan = KVCachePlan(groups, config.block_size, config.max_num_batched_tokens)
        self.waiting: deque[Request] = deque()
        self.running: list[Request] = []
        # The running LoRA adapter giving its slot up to a request waiting for one (0: none).
        self.draining_lora = 0
        self.stats = SchedulerStats()
        self._num_held = 0  # running requests held by their beam search, as of this step's schedule

    # ------------------------------------------------------------- requests
    @property
    def max_sequence_tokens(self) -> int:
        """The longest sequence (prompt + output) that can be admitted: the context length, or
        the whole KV pool where that holds less."""
        return min(self.config.max_model_len, self.kv_plan.pool_tokens(self.config.num_blocks))

    def check_admissible(self, num_prompt_tokens: int, max_tokens: int) -> None:
        """Raise AdmissionError for a request that could never be served."""
        check_admissible(num_prompt_tokens, max_tokens, self.config.max_model_len, self.config.num_blocks,
                         self.kv_plan)

    def check_beams_admissible(self, num_prompt_tokens: int, max_tokens: int, beam_width: int) -> None:
        """Beyond `check_admissible` (one sequence), raise AdmissionError for a beam search that
        could never be served: every beam must hold a seat, and the pool must hold the prompt's
        full blocks (shared) and each beam's own blocks for the rest of its sequence, where the
        beams may all part."""
        cfg = self.config
        if beam_width > cfg.max_num_seqs:
            raise AdmissionError(f"beam_width {beam_width} is more than this server's max_num_seqs "
                                 f"({cfg.max_num_seqs}): every beam runs as a sequence", "beam_width_too_large")
        room = self.kv_plan.beam_room(num_prompt_tokens, beam_width, cfg.num_blocks, cfg.enable_prefix_caching)
        if max_tokens > room:
            raise AdmissionError(
                f"a beam search of width {beam_width} over {num_prompt_tokens} prompt tokens can be given at most "
                f"{max(0, room)} max_tokens by this KV pool ({cfg.num_blocks} blocks of {cfg.block_size}: "
                f"each beam may need blocks of its own), but {max_tokens} were requested", "kv_cache_too_small")

    def add_request(self, request: Request) -> None:
        self.check_admissible(request.num_prompt_tokens, request.max_tokens)
        if request.lora_id and not self.config.max_loras:
            raise ValueError(f"{request.request_id} has a LoRA adapter, and this scheduler runs none (max_loras 0)")
        if self.by_priority:
            # after its equals, which came first; a fork before them, as its search did
            (insort_left if request.preempts_later else insort_right)(self.waiting, request, key=_order)
        elif request.preempts_later:
            self._insert_in_order(request)
        else:
            self.waiting.append(request)

    def add_fork(self, parent: Request, child: Request) -> list[tuple[int, int]]:
        """Queue a beam search's fork (its tokens the parent's, all computed, and one more):
        running at once where a seat and the block its parent's partial last block needs are
        free, sharing the parent's full blocks and holding a copy of that one (the (source,
        copy) block ids returned, whose KV the caller copies before the next step; None:
        nothing to copy: none, a pair per layer group), else waiting (`add_request`), to find the
        parent's full blocks in the prefix cache and compute the rest again."""
        bm, size = self.block_manager, self.config.block_size
        computed = parent.num_computed_tokens
        child.block_hashes = list(parent.block_hashes)  # of the same full blocks: no rehashing
        if (parent.status is RequestStatus.RUNNING and computed == len(parent.token_ids) == len(child.token_ids) - 1
                and len(self.running) < self.config.max_num_seqs
                and (computed % size == 0 or bm.num_free_blocks >= bm.num_groups)):
            copy = bm.fork(parent, child)
            child.status = RequestStatus.RUNNING
            child.first_scheduled_time = time.monotonic()
            self.running.append(child)
            return copy
        self.add_request(child)
        return []

    @property
    def by_priority(self) -> bool:
        return self.config.policy == "priority"

    def finish(self, request: Request) -> None:
        """Remove a request (finished or aborted) wherever it is; every block is returned."""
        if request.status is RequestStatus.RUNNING:
            self.running.remove(request)
        elif request.status is RequestStatus.WAITING:
            self.waiting.remove(request)
        else:
            return
        self.block_manager.free(request)
        request.status = RequestStatus.FINISHED
        request.finish_time = time.monotonic()

    @property
    def has_unfinished(self) -> bool:
        return bool(self.waiting or self.running)

    # ------------------------------------------------------------- schedule
    def schedule(self) -> ScheduledBatch:
        cfg, bm = self.config, self.block_manager
        batch = ScheduledBatch()
        budget = cfg.max_num_batched_tokens
        scheduled: dict[Request, int] = {}
        now = time.monotonic()

        decodes: list[Request] = []
        prefills: list[Request] = []
        finishing = 0  # done by length once their pending tokens arrive: no seat in this batch
        self._num_held = 0
        for r in self.running:
            if r.held:
                self._num_held += 1
                continue
            if r.num_uncomputed_tokens > 1:
                prefills.append(r)
            elif r.done_by_length:
                finishing += 1
            else:
                decodes.append(r)
        for request in decodes + prefills:
            if budget == 0:
                break
            if request.status is not RequestStatus.RUNNING:
                continue  # preempted earlier in this loop
            n = min(request.num_uncomputed_tokens, budget)
            if n > 1 and (self.waiting or len(prefills) > 1):
                n = min(n, cfg.long_prefill_token_threshold)
            while not bm.allocate_slots(request, n):
                victim = self._last_in_order(after=request)
                budget += self._preempt_planned(victim, scheduled, batch.preempted)
                if victim is request:
                    break
            else:
                scheduled[request] = n
                budget -= n

        if not batch.preempted:
            budget, admitted = self._admit(scheduled, budget, now, finishing, batch.preempted, prefills)
            # The long-prefill cap keeps room for the requests waiting. What they could not take
            # this step (their prefill limits, the seats, the KV pool) goes to the chunks it cut
            # short, in order, rather than to nobody; unless a request admitted now finishes its
            # prompt in this step, whose first token a longer step would delay. Only prefills
            # can have been cut: the decodes, most of a batch, are not walked.
            if budget and all(scheduled[r] < r.num_uncomputed_tokens for r in admitted):
                for request in chain(prefills, admitted):
                    n = scheduled.get(request, 0)  # 0: not in this step
                    more = min(request.num_uncomputed_tokens - n, budget) if n else 0
                    if more > 0 and bm.allocate_slots(request, n + more):
                        scheduled[request] = n + more
                        budget -= more
                    if budget == 0:
                        break
            # Drafts are guesses: they get what the certain work left.
            self._schedule_drafts(decodes, scheduled, budget, batch.spec_token_ids)

        # Decodes first, shortest context first (attention can then pad each group of decodes
        # only to its own longest context); prefill chunks after them in admission order.
        ordered = sorted(scheduled.items(),
                         key=lambda item: (item[1] != 1, item[0].num_computed_tokens if item[1] == 1 else 0))
        batch.requests = [r for r, _ in ordered]
        batch.num_tokens = [n for _, n in ordered]
        batch.num_decodes = sum(1 for n in batch.num_tokens if n == 1)
        return batch

    def _schedule_drafts(self, decodes: list[Request], scheduled: dict[Request, int], budget: int,
                         spec_token_ids: dict[Request, list[int]]) -> None:
        """The scheduled decodes' drafts, in order, with what the step's certain work left of the
        budget and the pool (drafts never preempt: where a new block is missing, only the
        drafts that fit the blocks the request holds)."""
        bm = self.block_manager
        for request in decodes:
            if budget == 0:
                break
            drafts = request.spec_token_ids
            if not drafts or scheduled.get(request) != 1:
                continue
            k = min(len(drafts), budget)
            if not bm.allocate_slots(request, 1 + k):
                k = bm.held_room(request) - 1  # what fits beside its token in the blocks it holds
                if k < 1:
                    continue
            scheduled[request] = 1 + k
            spec_token_ids[request] = drafts[:k]
            budget -= k

    def _admit(self, scheduled: dict[Request, int], budget: int, now: float, finishing: int,
               preempted: list[Request], prefills: list[Request]) -> tuple[int, list[Request]]:
        """Admit waiting requests in order while the budget, the seats and the pool allow; the
        budget left and the requests admitted. `prefills`: the running requests with prompt
        left to compute, as this step found them."""
        cfg, bm = self.config, self.block_manager
        partial, long_partial = self._partial_prefills(scheduled)
        skipped: list[Request] = []
        admitted: list[Request] = []
        loras = {r.lora_id for r in self.running if r.lora_id}
        if self.draining_lora not in loras:  # drained: its slot is free
            self.draining_lora = 0
        kept: set[int] = set()  # adapters of requests passed over for another reason: their slots wait for them
        computing: set[int] | None = None  # hashes of the full blocks running prefills are computing (lazily)
        # The seats and blocks of the requests waiting for a prefix being computed: theirs, not
        # the next requests'.
        claimed_seats = claimed_blocks = 0
        lora_blocked = False  # an adapter's request found no slot: new adapters' requests behind it wait too
        while self.waiting and budget > 0:
            request = self.waiting[0]
            sibling = request.prefill_after
            new_adapter = request.lora_id and request.lora_id not in loras and request.lora_id not in kept
            if new_adapter and len(loras | kept) >= cfg.max_loras:
                lora_blocked = True
                if not self.draining_lora:  # the adapter that has held its slot the longest
                    self.draining_lora = next((r.lora_id for r in self.running if r.lora_id), 0)
            # A request preempted with a token in flight waits for it: its prefill needs it.
            if (request.num_pending_tokens or sibling is not None and not (sibling.prompt_computed or sibling.finished)
                    or request in preempted  # not back in the step that preempted it
                    # a search's fork is not held back by its draining adapter: its search holds
                    # the adapter, held, until the fork has run
                    or lora_blocked and (new_adapter or request.lora_id == self.draining_lora
                                         and not request.preempts_later)):
                if new_adapter and not lora_blocked:
                    kept.add(request.lora_id)
                skipped.append(self.waiting.popleft())
                continue
            no_seat = len(self.running) - finishing >= cfg.max_num_seqs
            if no_seat and not (self.by_priority or request.preempts_later or self._num_held):
                break
            hits = bm.match_prefix(request)
            if cfg.enable_prefix_caching and request.use_prefix_cache:
                # Its next block is being computed by a running prefill (requests that arrived
                # together with one system prompt or instruction): it waits to find it cached
                # rather than compute it again, as SGLang's in-batch prefix check.
                if computing is None:  # the running prefills' blocks
                    computing = {h for r in prefills if r.status is RequestStatus.RUNNING
                                 for h in self._uncomputed_block_hashes(r)}
                following = len(hits)
                if following < (request.num_tokens - 1) // cfg.block_size and \
                        request.block_hashes[following] in computing:
                    if new_adapter:
                        kept.add(request.lora_id)
                    claimed_seats += 1
                    claimed_blocks += (self.kv_plan.sequence_blocks(request.num_tokens)
                                       - self.kv_plan.sequence_blocks(following * cfg.block_size))
                    skipped.append(self.waiting.popleft())
                    continue
            need = request.num_tokens - len(hits) * cfg.block_size
            is_long = need > cfg.long_prefill_token_threshold
            n = min(need, budget, cfg.long_prefill_token_threshold) if is_long else min(need, budget)
            if n < need and (partial >= cfg.max_num_partial_prefills
                             or is_long and long_partial >= cfg.max_long_partial_prefills):
                if new_adapter:
                    kept.add(request.lora_id)
                skipped.append(self.waiting.popleft())
                continue
            if claimed_seats and (len(self.running) - finishing + claimed_seats >= cfg.max_num_seqs
                                  or bm.num_free_blocks - claimed_blocks < self.kv_plan.sequence_blocks(n)):
                break  # it would take what a request ahead of it waits to have
            if no_seat or not bm.allocate_slots(request, n, hits):
                victims = self._victims_for(request, no_seat, n, hits)
                if victims is None:
                    break
                for victim in victims:
                    budget += self._preempt_planned(victim, scheduled, preempted)
                    if victim in admitted:  # a fork may preempt one admitted before it in this step
                        admitted.remove(victim)
                partial, long_partial = self._partial_prefills(scheduled)  # a victim may have been one
                allocated = bm.allocate_slots(request, n, hits)  # n, hits as checked: the room was counted
                assert allocated, "the victims were to make room"
            if n < need:
                partial += 1
                long_partial += is_long
            if self.waiting[0] is request:
                self.waiting.popleft()
            else:  # FCFS victims of a fork went to the front
                self.waiting.remove(request)
            num_hit_tokens = len(hits) * cfg.block_size
            if request.num_preemptions == 0:
                bm.stats.queries_tokens += request.num_tokens
                bm.stats.hits_tokens += num_hit_tokens
                request.num_cached_tokens = num_hit_tokens
            request.num_computed_tokens = num_hit_tokens
            request.status = RequestStatus.RUNNING
            if request.first_scheduled_time is None:
                request.first_scheduled_time = now
            self.running.append(request)
            admitted.append(request)
            if request.lora_id:
                loras.add(request.lora_id)
            scheduled[request] = n
            budget -= n
            if computing is not None:
                computing.update(self._uncomputed_block_hashes(request))
        self.waiting.extendleft(reversed(skipped))
        return budget, admitted

    def _uncomputed_block_hashes(self, request: Request) -> list[int]:
        """The hashes of the request's full blocks of known tokens its KV does not hold yet."""
        size = self.config.block_size
        return request.block_hashes[request.num_computed_tokens // size:len(request.token_ids) // size]

    def _insert_in_order(self, request: Request) -> None:
        """FCFS: into the queue before the first request that came after it (the front, for a
        preempted request but one that had jumped a request passed over), so that the queue's
        head is its earliest request: what a beam search's held requests wait for is ahead of
        whatever came after them."""
        key = _order(request)
        if not self.waiting or key <= _order(self.waiting[0]):
            self.waiting.appendleft(request)
        else:
            self.waiting.insert(next((i for i, r in enumerate(self.waiting) if _order(r) > key), len(self.waiting)),
                                request)

    def _preempt(self, request: Request) -> None:
        self.running.remove(request)
        self.block_manager.free(request)
        request.num_computed_tokens = 0
        request.num_preemptions += 1
        request.status = RequestStatus.WAITING
        if self.by_priority:
            insort_left(self.waiting, request, key=_order)  # before its equals, as FCFS's front
        else:
            self._insert_in_order(request)
        self.stats.num_preemptions += 1

    def _preempt_planned(self, request: Request, scheduled: dict[Request, int], preempted: list[Request]) -> int:
        """Preempt a running request while the step is planned: the budget its tokens in the
        step took, given back."""
        self._preempt(request)
        preempted.append(request)
        return scheduled.pop(request, 0)

    def _partial_prefills(self, scheduled: dict[Request, int]) -> tuple[int, int]:
        """How many of the step's requests leave their prefill unfinished, and how many of
        those are long."""
        threshold = self.config.long_prefill_token_threshold
        partial = [r for r, n in scheduled.items() if n < r.num_uncomputed_tokens]
        return len(partial), sum(1 for r in partial if r.num_uncomputed_tokens > threshold)

    def _victims_for(self, request: Request, need_seat: bool, num_tokens: int,
                     hits: PrefixHits) -> list[Request] | None:
        """Under the priority policy, the running requests of a lower priority than the waiting
        `request`, and under either policy the held requests of beam searches that sort after it
        (for a request of a search, `Request.preempts_later`, any that sorts after it), whose
        preemption gives it a seat (if `need_seat`) and the blocks for `num_tokens` after its
        `hits`: taken last in order first until they do (not the fewest that would). None when
        they could not (then none is preempted). Requests about to finish by length are left,
        but for held ones: they give their room back soon anyway."""
        if not (self.by_priority or request.preempts_later or self._num_held):
            return None  # FCFS with no search's request on either side: nothing to preempt
        bm, key = self.block_manager, _order(request)
        # a lower priority; or after it, if held by a search (idle: it waits for the queue too),
        # or whatever it is where the request is a search's
        # (one done by length gives its room back soon, unless held: its search may wait for this request)
        lower = (r for r in reversed(self.running) if (r.held or not r.done_by_length) and (
            self.by_priority and r.priority > request.priority
            or (r.held or request.preempts_later) and _order(r) > key))
        short = bm.blocks_short(request, num_tokens, hits)
        hit_blocks = set(hits.held_block_ids())
        chosen: list[Request] = []
        holds: Counter[int] = Counter()  # block id → how many chosen victims hold it
        freed = 0
        for victim in sorted(lower, key=_order, reverse=True):  # of equals, the latest admitted first
            if len(chosen) >= need_seat and freed >= short:
                break
            chosen.append(victim)
            holds.update(victim.held_block_ids())
            # Only the hits' blocks would be freed to no avail: they were counted as the request's.
            freed = bm.num_freed_by(holds, exclude=hit_blocks)
        return chosen if chosen and len(chosen) >= need_seat and freed >= short else None

    def _last_in_order(self, after: Request | None = None) -> Request:
        """The running request to preempt first: the latest admitted, or by priority the one
        that sorts last (of equals, the latest admitted). For a beam search's request (`after`),
        the one of those that sorts after it, if any: its search, held requests and all, waits
        for it; for any other, a held request of a search that sorts after it, if any (idle,
        and its search may wait on requests behind `after`: `after` preempting itself instead
        would come back to the same wall every step)."""
        if after is not None:
            key = _order(after)
            later = [r for r in self.running if _order(r) > key and (after.preempts_later or r.held)]
            if later:
                return later[-1] if not self.by_priority else max(reversed(later), key=_order)
        if not self.by_priority:
            return self.running[-1]
        return max(reversed(self.running), key=_order)

    # --------------------------------------------------------------- update
    def advance(self, batch: ScheduledBatch) -> None:
        """The batch has been launched: its tokens count as computed, and each request that
        samples (any that reached its last token but an embedding) has one token pending until
        append_token brings it."""
        bm = self.block_manager
        for request, n in zip(batch.requests, batch.num_tokens):
            if request.status is not RequestStatus.RUNNING:
                continue
            if batch.spec_token_ids and request in batch.spec_token_ids:
                n -= len(batch.spec_token_ids[request])  # drafts count once accepted (append_token)
            if request.num_computed_tokens + n == request.num_tokens and not request.pooling:
                request.num_pending_tokens += 1
            request.num_computed_tokens += n
            bm.cache_full_blocks(request)

    def append_token(self, request: Request, token: int, now: float | None = None, accepted_draft: bool = False) -> None:
        """A pending token has arrived (a preempted request gets it too: its recompute needs it).
        accepted_draft: a token after the pending one in a speculative step, whose predecessor
        (an accepted draft) had its KV computed in that step."""
        if request.status is RequestStatus.FINISHED:
            return
        if accepted_draft:
            request.num_computed_tokens += 1
        request.append_token(token, time.monotonic() if now is None else now, pending=not accepted_draft)
        if request.status is RequestStatus.RUNNING:
            self.block_manager.cache_full_blocks(request)

    def update(self, batch: ScheduledBatch, sampled: list[int | None]) -> None:
        """advance, then the sampled tokens at once; sampled[i] is request i's new token, if it sampled."""
        now = time.monotonic()
        self.advance(batch)
        for request, token in zip(batch.requests, sampled):
            if token is not None:
                self.append_token(request, token, now)


def _order(request: Request) -> tuple[int, float]:
    """The priority policy's order: lower priority numbers first, then earlier arrivals."""
    return request.priority, request.arrival_time
