"""The batching policy, driven by a fake engine loop: schedule(), then update() with a fake
token for every request that samples, then finish() for those that reached max_tokens.
Every step checks the batch against the config and the pool against its invariants."""

from __future__ import annotations

import random

import pytest

from scheduler import AdmissionError, Request, RequestStatus, ScheduledBatch, Scheduler, SchedulerConfig


def fake_token(request: Request) -> int:
    return 1000 + request.num_output_tokens  # deterministic, never a prompt token


def live(sched: Scheduler) -> list[Request]:
    return sched.running + list(sched.waiting)


def step(sched: Scheduler) -> ScheduledBatch:
    """One engine iteration with the checks every step must pass."""
    cfg = sched.config
    running_before = list(sched.running)
    decodes_before = [r for r in running_before if r.num_uncomputed_tokens == 1]
    batch = sched.schedule()

    assert batch.total_tokens <= cfg.max_num_batched_tokens
    assert len(batch) <= cfg.max_num_seqs and len(sched.running) <= cfg.max_num_seqs
    assert len(set(map(id, batch.requests))) == len(batch)
    assert all(n == 1 for n in batch.num_tokens[:batch.num_decodes])
    assert all(n > 1 for n in batch.num_tokens[batch.num_decodes:]), "decodes come first"
    if cfg.policy == "fcfs":  # preemption takes the most recently admitted running request first
        assert batch.preempted == running_before[::-1][:len(batch.preempted)]
    else:  # the running requests that sort last (lowest priority, then latest arrival) first
        kept = [r for r in running_before if r.status is RequestStatus.RUNNING and not r.done_by_length]
        assert all(order(v) >= order(r) for v in batch.preempted for r in kept), (batch.preempted, kept)
    for victim in batch.preempted:
        assert victim.status is RequestStatus.WAITING and victim.block_ids == [] and victim.num_computed_tokens == 0
    if not batch.preempted and len(decodes_before) <= cfg.max_num_batched_tokens:
        scheduled = set(map(id, batch.requests))
        assert all(id(r) in scheduled for r in decodes_before), "a decode was left out"
    for request, n in zip(batch.requests, batch.num_tokens):
        assert request.status is RequestStatus.RUNNING
        assert 1 <= n <= request.num_uncomputed_tokens
        assert len(request.block_ids) * cfg.block_size >= request.num_computed_tokens + n, "no slots for the tokens"

    sampled = [fake_token(r) if batch.samples(i) else None for i, r in enumerate(batch.requests)]
    sched.update(batch, sampled)
    for request in batch.requests:
        if request.num_output_tokens >= request.max_tokens:
            sched.finish(request)
    sched.block_manager.check_invariants(live(sched))
    return batch


def order(request: Request) -> tuple[int, float]:
    return request.priority, request.arrival_time


def run_to_completion(sched: Scheduler, max_steps: int = 10_000) -> int:
    steps = 0
    while sched.has_unfinished:
        step(sched)
        steps += 1
        assert steps < max_steps, "no progress"
    return steps


def make(prompt_len: int, max_tokens: int, rid: str, base: int = 0, **kw) -> Request:
    return Request(rid, [base + (i % 97) for i in range(prompt_len)], max_tokens, **kw)


def assert_all_free(sched: Scheduler) -> None:
    bm = sched.block_manager
    bm.check_invariants()
    assert bm.num_free_blocks == bm.num_blocks
    assert all(b.ref_count == 0 for b in bm.blocks)


# ------------------------------------------------------------------ budget / policy
# (num_blocks, block_size, max_num_seqs, max_num_batched_tokens): tight pools preempt, small
# budgets chunk, one seq serialises, a big pool never evicts.
CONFIGS = [(12, 4, 8, 32), (16, 2, 8, 16), (24, 4, 3, 100), (10, 16, 6, 64), (40, 4, 1, 8), (200, 16, 8, 32)]


@pytest.mark.parametrize("policy", ["fcfs", "priority"])
@pytest.mark.parametrize("seed", range(len(CONFIGS)))
def test_random_workload_respects_limits_and_completes(seed: int, policy: str) -> None:
    rng = random.Random(seed)
    num_blocks, block_size, max_num_seqs, budget = CONFIGS[seed]
    cfg = SchedulerConfig(max_model_len=256, num_blocks=num_blocks, block_size=block_size,
                          max_num_seqs=max_num_seqs, max_num_batched_tokens=budget, policy=policy)
    sched = Scheduler(cfg)
    pool = cfg.num_blocks * cfg.block_size
    prefixes = [[rng.randrange(50) for _ in range(rng.randrange(0, 40))] for _ in range(3)]
    requests: list[Request] = []
    steps = 0
    while len(requests) < 25 or sched.has_unfinished:
        if len(requests) < 25 and rng.random() < 0.4:
            prompt = (rng.choice(prefixes) + [rng.randrange(50) for _ in range(rng.randrange(1, 60))])
            max_tokens = rng.randrange(1, 20)
            prompt = prompt[:max(1, min(cfg.max_model_len, pool) - max_tokens)]
            priority = rng.randrange(3) if policy == "priority" else 0
            request = Request(f"r{len(requests)}", prompt, max_tokens, priority=priority)
            sched.add_request(request)
            requests.append(request)
        step(sched)
        if requests and rng.random() < 0.05:  # an abort at any moment
            sched.finish(rng.choice(requests))
        steps += 1
        assert steps < 5000
    for request in requests:
        assert request.finished
        assert request.num_output_tokens <= request.max_tokens
        if request.num_output_tokens:
            assert request.output_token_ids == [1000 + i for i in range(request.num_output_tokens)]
    assert_all_free(sched)


def test_chunked_prefill_covers_prompts_longer_than_the_budget() -> None:
    sched = Scheduler(SchedulerConfig(max_model_len=512, num_blocks=64, block_size=4, max_num_batched_tokens=16))
    request = make(100, 3, "long")
    sched.add_request(request)
    chunks: list[int] = []
    while not request.prompt_computed:
        batch = step(sched)
        assert batch.requests == [request]
        assert request.num_output_tokens == (1 if request.prompt_computed else 0), "samples only at the prompt's end"
        chunks.append(batch.num_tokens[0])
    assert sum(chunks) == 100 and max(chunks) <= 16 and len(chunks) >= 7
    run_to_completion(sched)
    assert request.num_output_tokens == 3
    assert_all_free(sched)


def test_short_request_not_stuck_behind_a_long_prefill() -> None:
    cfg = SchedulerConfig(max_model_len=4096, num_blocks=512, block_size=16, max_num_batched_tokens=64)
    sched = Scheduler(cfg)
    long = make(2000, 2, "long")
    sched.add_request(long)
    step(sched)
    step(sched)
    assert 0 < long.num_computed_tokens < 2000
    short = make(10, 2, "short", base=500)
    sched.add_request(short)
    for _ in range(2):
        batch = step(sched)
        if short in batch.requests:
            # While someone waits, the long prefill takes at most the threshold per step.
            assert batch.num_tokens[batch.requests.index(short)] == 10
            assert batch.num_tokens[batch.requests.index(long)] <= cfg.long_prefill_token_threshold
            break
    else:
        pytest.fail("short request not scheduled within two steps")
    assert short.num_output_tokens == 1
    run_to_completion(sched)
    assert long.num_output_tokens == 2 and short.num_output_tokens == 2
    assert_all_free(sched)


def test_the_room_kept_for_waiters_that_cannot_start_goes_to_the_long_prefill() -> None:
    """Two long prompts: the second may not start while the first is mid-prefill (one long
    partial prefill at a time), so the budget the cap keeps for it goes to the first: whole
    budgets each step, not half (the prompts take 8 steps, not 12)."""
    cfg = SchedulerConfig(max_model_len=8192, num_blocks=1100, block_size=16, max_num_batched_tokens=2048)
    sched = Scheduler(cfg)
    first, second = make(8000, 1, "first"), make(8000, 1, "second", base=300)
    sched.add_request(first)
    sched.add_request(second)
    chunks = []
    while not (first.prompt_computed and second.prompt_computed):
        batch = step(sched)
        chunks.append(sum(n for r, n in zip(batch.requests, batch.num_tokens) if n > 1))
    assert len(chunks) == 8 and chunks[:3] == [2048] * 3, chunks
    run_to_completion(sched)
    assert_all_free(sched)


# ------------------------------------------------------------------ preemption
def test_preemption_under_a_tiny_pool_completes_every_request() -> None:
    cfg = SchedulerConfig(max_model_len=64, num_blocks=10, block_size=4, max_num_batched_tokens=32, max_num_seqs=8)
    sched = Scheduler(cfg)
    bm = sched.block_manager
    requests = [make(6 + i, 14, f"r{i}", base=100 * i) for i in range(5)]
    for request in requests:
        sched.add_request(request)
    readmissions_with_hits = 0
    while sched.has_unfinished:
        before_stats = (bm.stats.queries_tokens, bm.stats.hits_tokens)
        first_time = [r for r in sched.waiting if r.first_scheduled_time is None]
        readmitting = [r for r in sched.waiting if r.num_preemptions > 0]
        batch = sched.schedule()
        admitted_first = [r for r in first_time if r.status is RequestStatus.RUNNING]
        # Only first admissions count as prefix-cache queries; a re-admission adds nothing.
        assert bm.stats.queries_tokens - before_stats[0] == sum(r.num_prompt_tokens for r in admitted_first)
        assert bm.stats.hits_tokens - before_stats[1] == sum(r.num_cached_tokens for r in admitted_first)
        readmissions_with_hits += sum(1 for r in readmitting if r.status is RequestStatus.RUNNING and r.num_computed_tokens)
        sched.update(batch, [fake_token(r) if batch.samples(i) else None for i, r in enumerate(batch.requests)])
        for request in batch.requests:
            if request.num_output_tokens >= request.max_tokens:
                sched.finish(request)
        bm.check_invariants(live(sched))
    assert sched.stats.num_preemptions > 0
    assert sched.stats.num_preemptions == sum(r.num_preemptions for r in requests)
    assert readmissions_with_hits > 0, "a preempted request should find its own cached blocks"
    for request in requests:
        assert request.output_token_ids == [1000 + i for i in range(14)]
    assert_all_free(sched)


def test_preemption_victim_is_the_most_recently_admitted() -> None:
    # Three decoding requests fill the pool exactly; the next block any of them needs
    # must come from the newest one.
    cfg = SchedulerConfig(max_model_len=64, num_blocks=6, block_size=4, max_num_batched_tokens=64)
    sched = Scheduler(cfg)
    a, b, c = make(8, 10, "a", 0), make(8, 10, "b", 100), make(8, 10, "c", 200)
    for request in (a, b, c):
        sched.add_request(request)
    step(sched)  # all admitted, 2 blocks each, the pool is full
    assert sched.running == [a, b, c] and sched.block_manager.num_free_blocks == 0
    batch = step(sched)  # a's 9th token needs a third block
    assert batch.preempted == [c] and c.status is RequestStatus.WAITING and c.num_preemptions == 1
    assert sched.stats.num_preemptions == 1
    run_to_completion(sched)
    assert [r.num_output_tokens for r in (a, b, c)] == [10, 10, 10]
    assert_all_free(sched)


# ------------------------------------------------------------------ prefix caching
def test_prefix_cache_counters_for_a_shared_prefix() -> None:
    bs = 4
    sched = Scheduler(SchedulerConfig(max_model_len=128, num_blocks=32, block_size=bs))
    bm = sched.block_manager
    prefix = list(range(1, 4 * bs + 1))
    first = Request("first", prefix + [90, 91, 92], 5)
    second = Request("second", prefix + [80, 81, 82], 2)
    sched.add_request(first)
    step(sched)
    assert first.prompt_computed
    sched.add_request(second)
    step(sched)
    assert second.num_cached_tokens == 4 * bs
    assert second.block_ids[:4] == first.block_ids[:4]
    assert bm.stats.hits_tokens == 4 * bs
    assert bm.stats.queries_tokens == first.num_prompt_tokens + second.num_prompt_tokens
    run_to_completion(sched)
    assert_all_free(sched)


def test_sibling_waits_for_the_prompt_then_shares_its_blocks() -> None:
    bs = 4
    sched = Scheduler(SchedulerConfig(max_model_len=128, num_blocks=32, block_size=bs, max_num_batched_tokens=8))
    prompt = list(range(1, 4 * bs + 3))  # 4 full blocks + 2 tokens
    a = Request("a", prompt, 3)
    b = Request("b", list(prompt), 3, prefill_after=a)
    sched.add_request(a)
    sched.add_request(b)
    while b.status is RequestStatus.WAITING:
        computed_before = a.prompt_computed
        batch = step(sched)
        if b in batch.requests:
            assert computed_before, "admitted before the sibling's prompt was computed"
        else:
            assert b.block_ids == []
    assert b.num_cached_tokens == 4 * bs
    assert b.block_ids[:4] == a.block_ids[:4]
    assert all(sched.block_manager.blocks[i].ref_count == 2 for i in a.block_ids[:4])
    run_to_completion(sched)
    assert a.num_output_tokens == b.num_output_tokens == 3
    assert_all_free(sched)


# ------------------------------------------------------------------ abort
@pytest.mark.parametrize("stage", ["waiting", "mid_prefill", "decoding", "between_schedule_and_update"])
def test_abort_at_any_moment_returns_every_block(stage: str) -> None:
    sched = Scheduler(SchedulerConfig(max_model_len=256, num_blocks=32, block_size=4, max_num_batched_tokens=16))
    other = make(20, 4, "other", base=300)
    victim = make(40, 8, "victim")
    sched.add_request(other)
    sched.add_request(victim)
    if stage == "mid_prefill":
        while victim.num_computed_tokens == 0:
            step(sched)
        assert not victim.prompt_computed and victim.block_ids
    elif stage == "decoding":
        while victim.num_output_tokens < 2:
            step(sched)
    if stage == "between_schedule_and_update":
        while victim not in (batch := sched.schedule()).requests:
            sched.update(batch, [fake_token(r) if batch.samples(i) else None for i, r in enumerate(batch.requests)])
        sampled = [fake_token(r) if batch.samples(i) else None for i, r in enumerate(batch.requests)]
        sched.finish(victim)
        outputs = victim.num_output_tokens
        sched.update(batch, sampled)
        assert victim.num_output_tokens == outputs, "an aborted request is not advanced"
    else:
        sched.finish(victim)
    assert victim.finished and victim.block_ids == []
    assert victim not in sched.running and victim not in sched.waiting
    sched.block_manager.check_invariants(live(sched))
    finish_time = victim.finish_time
    sched.finish(victim)  # a second finish is a no-op
    assert victim.finish_time == finish_time and victim.finished
    run_to_completion(sched)
    assert other.num_output_tokens == 4
    assert_all_free(sched)


# ------------------------------------------------------------------ admission
def test_check_admissible_names_the_numbers() -> None:
    sched = Scheduler(SchedulerConfig(max_model_len=100, num_blocks=4, block_size=16))
    with pytest.raises(AdmissionError) as err:
        sched.check_admissible(90, 20)
    assert err.value.code == "context_length_exceeded"
    assert all(s in str(err.value) for s in ("100", "110", "90", "20"))

    with pytest.raises(AdmissionError) as err:
        sched.add_request(make(50, 20, "big"))  # 70 tokens, the pool holds 64
    assert err.value.code == "kv_cache_too_small"
    assert all(s in str(err.value) for s in ("70", "64", "50", "20", "4 blocks", "16"))
    assert not sched.has_unfinished, "a rejected request is not queued"

    with pytest.raises(AdmissionError) as err:
        sched.check_admissible(0, 5)
    assert err.value.code == "invalid_prompt"
    sched.check_admissible(40, 24)  # exactly the pool: admissible


# ------------------------------------------------------------------ async scheduling
@pytest.mark.parametrize("num_blocks", [64, 12], ids=["roomy", "preempting"])
def test_one_step_in_flight_gives_the_same_sequences(num_blocks: int) -> None:
    """The async engine's loop: step N+1 is scheduled and advanced before step N's tokens are
    appended. Every request still gets exactly its max_tokens tokens, none is scheduled for a
    token past them, blocks are registered only over known tokens, and nothing leaks."""
    cfg = SchedulerConfig(max_model_len=96, num_blocks=num_blocks, block_size=4, max_num_batched_tokens=24,
                          max_num_seqs=6)
    sched = Scheduler(cfg)
    bm = sched.block_manager
    rng = random.Random(1)  # a mix that, roomy, admits into a finishing request's seat and, tight, preempts
    shared = [7] * 9
    requests = [Request(f"r{i}", (shared if i % 2 else []) + [100 * i + j for j in range(rng.randint(1, 20))],
                        rng.randint(1, 12)) for i in range(8)]
    for request in requests:
        sched.add_request(request)
    in_flight: list[tuple[Request, int]] = []
    sampled_rows = steps = seats_reused = 0
    while sched.has_unfinished or in_flight:
        batch = sched.schedule()
        finishing = sum(r.done_by_length for r in sched.running)
        assert len(batch) <= cfg.max_num_seqs and len(sched.running) - finishing <= cfg.max_num_seqs
        seats_reused += len(sched.running) > cfg.max_num_seqs  # admitted into a finishing request's seat
        for request, n in zip(batch.requests, batch.num_tokens):
            assert not request.done_by_length
            assert request.num_output_tokens + request.num_pending_tokens < request.max_tokens
            assert n == 1 or request.num_pending_tokens == 0, "only a decode reads a token still in flight"
        # The k-th output token is 1000 + k, whenever the host learns it.
        launched = [(r, 1000 + r.num_output_tokens + r.num_pending_tokens)
                    for i, r in enumerate(batch.requests) if batch.samples(i)]
        sampled_rows += len(launched)
        sched.advance(batch)
        for request, token in in_flight:
            if request.finished:
                continue
            sched.append_token(request, token)
            if request.num_output_tokens >= request.max_tokens:
                sched.finish(request)
        in_flight = launched
        bm.check_invariants(live(sched))
        for request in live(sched):
            assert request.num_prefix_cached_blocks * cfg.block_size <= len(request.token_ids)
        steps += 1
        assert steps < 1000, "no progress"
    for request in requests:
        assert request.output_token_ids == [1000 + k for k in range(request.max_tokens)]
        assert request.num_pending_tokens == 0
    # No surplus token: a request whose pending tokens reach max_tokens is not scheduled again.
    assert sampled_rows == sum(r.max_tokens for r in requests)
    assert (sched.stats.num_preemptions > 0) == (num_blocks == 12)
    assert seats_reused > 0 or num_blocks == 12
    assert bm.stats.hits_tokens > 0
    assert_all_free(sched)


# ------------------------------------------------------------------ priority policy
def priority_scheduler(num_blocks: int = 64, block_size: int = 4, max_num_seqs: int = 8) -> Scheduler:
    return Scheduler(SchedulerConfig(max_model_len=64, num_blocks=num_blocks, block_size=block_size,
                                     max_num_seqs=max_num_seqs, max_num_batched_tokens=64, policy="priority"))


def test_priority_policy_admits_by_priority_then_arrival() -> None:
    sched = priority_scheduler(max_num_seqs=1)
    low, high, mid, mid2 = (make(5, 2, rid, priority=p) for rid, p in
                            (("low", 5), ("high", -1), ("mid", 2), ("mid2", 2)))
    for request in (low, high, mid, mid2):
        sched.add_request(request)
    assert list(sched.waiting) == [high, mid, mid2, low]
    admitted: list[Request] = []
    while sched.has_unfinished:
        admitted += [r for r in step(sched).requests if r not in admitted]
    assert admitted == [high, mid, mid2, low] and sched.stats.num_preemptions == 0
    assert_all_free(sched)


def test_fcfs_ignores_priority() -> None:
    sched = Scheduler(SchedulerConfig(max_model_len=64, num_blocks=64, block_size=4, max_num_seqs=1))
    first, second = make(5, 2, "first", priority=9), make(5, 2, "second", priority=0)
    sched.add_request(first)
    sched.add_request(second)
    assert step(sched).requests == [first]
    with pytest.raises(ValueError, match="policy"):
        SchedulerConfig(max_model_len=64, num_blocks=8, policy="lottery")


def two_seats_taken() -> tuple[Scheduler, Request, Request]:
    """Two requests of priority 1 running in the only two seats."""
    sched = priority_scheduler(max_num_seqs=2)
    a, b = make(5, 6, "a", priority=1), make(5, 6, "b", 100, priority=1)
    for request in (a, b):
        sched.add_request(request)
    step(sched)
    return sched, a, b


def test_a_higher_priority_arrival_takes_the_seat_of_the_lowest() -> None:
    sched, a, b = two_seats_taken()
    step(sched)
    urgent = make(5, 3, "urgent", 200, priority=0)
    sched.add_request(urgent)
    batch = step(sched)
    # b: the same priority as a, admitted later (arrived later)
    assert batch.preempted == [b] and b.status is RequestStatus.WAITING and b.num_preemptions == 1
    assert urgent in batch.requests and sched.running == [a, urgent]
    run_to_completion(sched)
    for request in (a, b, urgent):
        assert request.output_token_ids == [1000 + i for i in range(request.max_tokens)]
    assert_all_free(sched)


def test_equal_priority_waits_for_a_seat() -> None:
    sched, a, b = two_seats_taken()
    late = make(5, 3, "late", 200, priority=1)
    sched.add_request(late)
    while a.status is RequestStatus.RUNNING and b.status is RequestStatus.RUNNING:
        assert late.status is RequestStatus.WAITING and not step(sched).preempted
    run_to_completion(sched)
    assert sched.stats.num_preemptions == 0
    assert_all_free(sched)


def test_a_higher_priority_arrival_preempts_the_lowest_for_blocks_until_it_fits() -> None:
    # Four low-priority requests hold 3 blocks each of 14; the newcomer's 9-token prompt
    # needs 3 blocks, 2 are free: one victim (the latest of the lowest) is enough.
    sched = priority_scheduler(num_blocks=14, max_num_seqs=8)
    lows = [make(9, 3, f"low{i}", 100 * i, priority=3 if i < 2 else 4) for i in range(4)]
    assert_an_urgent_arrival_preempts(sched, lows, lows[3])


def assert_an_urgent_arrival_preempts(sched: Scheduler, lows: list[Request], victim: Request) -> None:
    """The low-priority requests leave 2 free blocks; an urgent 9-token prompt arrives and, the
    victim preempted, runs in the same step."""
    for request in lows:
        sched.add_request(request)
    step(sched)
    assert sched.block_manager.num_free_blocks == 2
    urgent = make(9, 2, "urgent", 900, priority=0)
    sched.add_request(urgent)
    batch = step(sched)
    assert batch.preempted == [victim] and urgent in batch.requests
    run_to_completion(sched)
    assert_all_free(sched)


def test_no_preemption_when_the_lower_priorities_cannot_make_room() -> None:
    sched = priority_scheduler(num_blocks=8, max_num_seqs=8)
    big, small = make(20, 4, "big", priority=0), make(4, 4, "small", 100, priority=5)
    for request in (big, small):
        sched.add_request(request)
    step(sched)  # big: 5 blocks, small: 1; 2 free
    mid = make(20, 2, "mid", 200, priority=2)  # needs 5 blocks: small's 1 + 2 free are not enough
    sched.add_request(mid)
    batch = step(sched)
    assert not batch.preempted and small.status is RequestStatus.RUNNING and mid.status is RequestStatus.WAITING
    run_to_completion(sched)
    assert sched.stats.num_preemptions == 0
    assert_all_free(sched)


def test_running_out_of_blocks_preempts_the_lowest_priority() -> None:
    # As test_preemption_victim_is_the_most_recently_admitted, with b the lowest priority.
    sched = priority_scheduler(num_blocks=6)
    a, b, c = make(8, 10, "a", 0, priority=0), make(8, 10, "b", 100, priority=5), make(8, 10, "c", 200, priority=1)
    for request in (a, b, c):
        sched.add_request(request)
    step(sched)
    assert sched.block_manager.num_free_blocks == 0
    batch = step(sched)
    assert batch.preempted == [b]
    run_to_completion(sched)
    assert [r.num_output_tokens for r in (a, b, c)] == [10, 10, 10]
    assert_all_free(sched)


def test_a_long_urgent_prompt_is_admitted_in_the_step_it_preempts_for() -> None:
    # Its first chunk (16 of 20 tokens) leaves it a long partial prefill: once it has made room
    # it must take it, not skip itself and leave it to a lower priority.
    sched = Scheduler(SchedulerConfig(max_model_len=64, num_blocks=3, block_size=16, max_num_seqs=8,
                                      max_num_batched_tokens=32, enable_prefix_caching=False, policy="priority"))
    a = Request("a", list(range(1, 18)), 15, priority=0, arrival_time=0.0)  # 2 blocks
    sched.add_request(a)
    step(sched)
    v = Request("v", [7, 7, 7], 12, priority=5, arrival_time=1.0)
    sched.add_request(v)
    step(sched)
    assert sched.block_manager.num_free_blocks == 0
    q = Request("q", [8, 8, 8], 12, priority=5, arrival_time=2.0)
    urgent = Request("urgent", [9] * 20, 2, priority=-1, arrival_time=3.0)
    sched.add_request(q)
    sched.add_request(urgent)
    batch = step(sched)
    assert batch.preempted == [v] and urgent.status is RequestStatus.RUNNING and q.status is RequestStatus.WAITING
    run_to_completion(sched)
    assert (v.num_preemptions, q.num_preemptions) == (1, 0)  # not preempting each other on its behalf
    assert_all_free(sched)


def test_no_preemption_for_a_seat_the_request_would_not_take() -> None:
    # Two seats: v and a long prompt mid-prefill. The urgent request is long too, so it waits
    # for that prefill (max_long_partial_prefills) whatever a seat would give it.
    sched = Scheduler(SchedulerConfig(max_model_len=1024, num_blocks=200, block_size=16, max_num_seqs=2,
                                      max_num_batched_tokens=32, enable_prefix_caching=False, policy="priority"))
    v = Request("v", [7, 7, 7], 50, priority=5, arrival_time=0.0)
    sched.add_request(v)
    step(sched)
    long = Request("long", list(range(1, 301)), 2, priority=-1, arrival_time=1.0)
    sched.add_request(long)
    step(sched)
    urgent = Request("urgent", [9] * 40, 2, priority=-1, arrival_time=3.0)
    sched.add_request(Request("q", [8, 8, 8], 50, priority=5, arrival_time=2.0))
    sched.add_request(urgent)
    while urgent.status is RequestStatus.WAITING:
        assert not step(sched).preempted or long.prompt_computed
    assert sched.stats.num_preemptions <= 1
    run_to_completion(sched)
    assert_all_free(sched)


def test_victims_sharing_blocks_free_them_together() -> None:
    # n = 2 samples share their 3 prompt blocks: preempting both frees 5 blocks, either alone 1.
    sched = priority_scheduler(num_blocks=6)
    prompt = list(range(50, 63))
    v0 = Request("v-0", prompt, 10, priority=5, arrival_time=1.0)
    v1 = Request("v-1", prompt, 10, priority=5, arrival_time=1.0, prefill_after=v0)
    sched.add_request(v0)
    sched.add_request(v1)
    step(sched)
    step(sched)
    assert sched.block_manager.num_free_blocks == 1
    urgent = Request("urgent", [9] * 16, 2, priority=0, arrival_time=2.0)  # 4 blocks: 3 short
    sched.add_request(urgent)
    batch = step(sched)
    assert set(batch.preempted) == {v0, v1} and urgent.status is RequestStatus.RUNNING
    run_to_completion(sched)
    assert_all_free(sched)


def test_the_requests_own_prefix_hits_are_no_room() -> None:
    # v holds the urgent request's prefix: preempting it frees those blocks only for the urgent
    # request to take back, and one block more, not the two it lacks.
    sched = priority_scheduler(num_blocks=6)
    a = Request("a", list(range(1, 10)), 7, priority=0, arrival_time=0.0)  # 3 blocks
    sched.add_request(a)
    step(sched)
    shared = [50, 51, 52, 53, 54, 55, 56, 57]
    v = Request("v", shared, 12, priority=5, arrival_time=1.0)
    sched.add_request(v)
    step(sched)
    step(sched)
    assert sched.block_manager.num_free_blocks == 0 and len(v.block_ids) == 3
    urgent = Request("urgent", shared + [60] * 8, 4, priority=0, arrival_time=2.0)
    sched.add_request(urgent)
    assert not sched.schedule().preempted and urgent.status is RequestStatus.WAITING


@pytest.mark.parametrize("policy", ["fcfs", "priority"])
def test_requests_that_arrive_together_compute_a_shared_prefix_once(policy: str) -> None:
    """Requests that share a prompt prefix and arrive together: the first computes it, the others
    wait for it in the prefix cache (as SGLang's in-batch prefix check) while requests without it
    go on; every token of the prefix is computed once, chunked or not. Without prefix caching,
    nobody waits."""
    prefix = list(range(100, 164))  # 4 blocks of 16
    for caching, budget in ((True, 256), (True, 24), (False, 256)):
        sched = Scheduler(SchedulerConfig(max_model_len=256, num_blocks=64, block_size=16, max_num_seqs=8,
                                          max_num_batched_tokens=budget, enable_prefix_caching=caching, policy=policy))
        shared = [Request(f"s{i}", prefix + [200 + i] * 5, max_tokens=2) for i in range(3)]
        other = Request("other", list(range(300, 340)), max_tokens=2)
        for request in (shared[0], shared[1], other, shared[2]):
            sched.add_request(request)
        computed = 0
        first = step(sched)
        assert other in first.requests or budget < 64  # not held back by the requests waiting
        computed += first.total_tokens
        while sched.has_unfinished:
            computed += step(sched).total_tokens
        prompts = sum(r.num_prompt_tokens for r in (*shared, other))
        outputs = sum(r.num_output_tokens for r in (*shared, other)) - 4  # the last tokens are never computed
        if caching:
            assert [r.num_cached_tokens for r in shared] == [0, 64, 64]
            assert computed == prompts - 2 * 64 + outputs
        else:
            assert [r.num_cached_tokens for r in shared] == [0, 0, 0]
            assert computed == prompts + outputs
        assert sched.block_manager.num_free_blocks == 64


def test_a_request_waiting_for_its_prefix_keeps_its_seat_and_blocks() -> None:
    """A request that waits for the prefix a running prefill computes keeps its place: the
    requests behind it take neither the last seat nor the blocks it will need (else it would
    wait for their whole generation, not one step)."""
    prefix = list(range(100, 148))  # 3 blocks of 16
    for seats, blocks in ((2, 64), (8, 7)):
        sched = Scheduler(SchedulerConfig(max_model_len=256, num_blocks=blocks, block_size=16, max_num_seqs=seats,
                                          max_num_batched_tokens=40))
        producer = Request("p", prefix + [5], max_tokens=2)
        sched.add_request(producer)
        step(sched)  # its first chunk
        waiter, other = Request("w", prefix + [6, 7], max_tokens=2), Request("x", list(range(300, 340)), max_tokens=30)
        sched.add_request(waiter)
        sched.add_request(other)
        first_scheduled = {}
        for i in range(40):
            if not sched.has_unfinished:
                break
            batch = step(sched)
            for r in batch.requests:
                first_scheduled.setdefault(r.request_id, i)
        assert first_scheduled["w"] <= first_scheduled["x"], (seats, blocks, first_scheduled)
        assert waiter.num_cached_tokens == 48
        assert sched.block_manager.num_free_blocks == blocks


def test_a_prefill_preempts_a_later_searchs_held_request_before_itself() -> None:
    """A running prefill short of blocks preempts a held request of a beam search that came
    after it (idle: its search waits for requests behind the prefill), not itself: preempting
    itself, it met the same wall the next step, for ever."""
    sched = Scheduler(SchedulerConfig(max_model_len=256, num_blocks=6, block_size=8, max_num_seqs=2,
                                      max_num_batched_tokens=24))
    beam = Request("beam", list(range(10, 30)), max_tokens=10, arrival_time=2.0)
    sched.add_request(beam)
    sched.update(sched.schedule(), [7])
    beam.held = beam.preempts_later = True  # its search waits for its other beams
    early = Request("early", list(range(50, 90)), max_tokens=2, arrival_time=1.0)
    sched.add_request(early)
    first = sched.schedule()
    assert first.requests == [early] and not first.preempted
    sched.update(first, [None])
    second = sched.schedule()
    assert second.preempted == [beam] and second.requests == [early]
    assert beam.status is RequestStatus.WAITING and early.status is RequestStatus.RUNNING


# ------------------------------------------------------------------ a hybrid model's pool
def hybrid_scheduler(num_blocks: int, **kw) -> Scheduler:
    """Two KV groups (a full one and one of window 8) over one pool of 4-token blocks."""
    from scheduler import KVCacheGroups

    return Scheduler(SchedulerConfig(max_model_len=64, num_blocks=num_blocks, block_size=4, max_num_batched_tokens=64,
                                     kv_groups=KVCacheGroups((0, 8), ((1,), (0,))), **kw))


def test_a_higher_priority_arrival_counts_every_group_its_victims_free() -> None:
    """Two low-priority requests hold 3 blocks in each group (12 of 14); the urgent one's 9
    tokens need 3 in each: preempting one low frees 6 across its groups, enough."""
    sched = hybrid_scheduler(14, policy="priority")
    lows = [make(9, 3, f"low{i}", 100 * i, priority=3) for i in range(2)]
    assert_an_urgent_arrival_preempts(sched, lows, lows[1])  # 2 free: each low held 3 blocks in each group


def test_a_fork_waits_unless_every_group_has_a_block_for_its_copy() -> None:
    """A beam's fork copies its parent's partial last block in each group: with one free block
    for two groups it waits (to find the full blocks in the prefix cache), with two it runs."""
    for free, runs in ((1, False), (2, True)):
        sched = hybrid_scheduler(6 + free)
        parent = make(10, 2, "parent")  # 3 blocks a group, the last one partial
        sched.add_request(parent)
        sched.advance(sched.schedule())  # its prompt computed: its search chooses what follows
        assert sched.block_manager.num_free_blocks == free
        child = Request("child", parent.prompt_token_ids, 2, preempts_later=True)
        child.token_ids = parent.token_ids + [7]
        copies = sched.add_fork(parent, child)
        assert (child.status is RequestStatus.RUNNING) == runs
        assert [len(copies), sched.block_manager.num_free_blocks] == ([2, 0] if runs else [0, 1])
        sched.block_manager.check_invariants(sched.running)
        for request in (child, parent):
            sched.finish(request)
        assert_all_free(sched)
