"""Speculative decoding by prompt lookup (vLLM's speculative_config method "ngram").

The config's parsing; the n-gram proposer against a brute-force lookup; the scheduler's draft
bookkeeping (budget, KV pool, computed tokens, prefix cache) with a fake model that tracks what
each KV slot holds; the sampler's rows that verify drafts; and end to end: greedy
outputs equal to the engine without drafts (and to transformers), random samples that keep
their distribution, and no KV block left behind.
"""

from __future__ import annotations

import collections
import contextlib
import json
import math
import random
from collections.abc import Iterator
from dataclasses import dataclass, field

import pytest
import torch

from engine import LLM, EngineConfig, SamplingParams, StructuredOutputsParams
from engine.sampler import Sampler, SamplingRow
from engine.speculative import NgramProposer, SpeculativeConfig
from engine.token_masks import Guide
from scheduler import Request, RequestStatus, ScheduledBatch, Scheduler, SchedulerConfig
from tests.conftest import assert_engine_idle, hf_greedy

NGRAM = {"method": "ngram", "num_speculative_tokens": 4, "prompt_lookup_max": 3, "prompt_lookup_min": 1}


# =============================================================================================
# 1. Config


def test_config_defaults_and_vllm_rules() -> None:
    assert SpeculativeConfig.from_value(None) is None
    cfg = SpeculativeConfig.from_value({"method": "ngram", "num_speculative_tokens": 3})
    assert (cfg.method, cfg.num_speculative_tokens, cfg.prompt_lookup_max, cfg.prompt_lookup_min,
            cfg.disable_by_batch_size) == ("ngram", 3, 5, 5, None)
    assert SpeculativeConfig.from_value(cfg) is cfg
    # vLLM: one of min/max given → both take it.
    only_max = SpeculativeConfig.from_value({"method": "ngram", "num_speculative_tokens": 2, "prompt_lookup_max": 4})
    assert (only_max.prompt_lookup_min, only_max.prompt_lookup_max) == (4, 4)
    only_min = SpeculativeConfig.from_value({"method": "ngram", "num_speculative_tokens": 2, "prompt_lookup_min": 2})
    assert (only_min.prompt_lookup_min, only_min.prompt_lookup_max) == (2, 2)
    explicit_none = SpeculativeConfig.from_value({"method": "ngram", "num_speculative_tokens": 2,
                                                  "prompt_lookup_min": None, "prompt_lookup_max": 3})
    assert (explicit_none.prompt_lookup_min, explicit_none.prompt_lookup_max) == (3, 3)
    both = SpeculativeConfig.from_value({**NGRAM, "disable_by_batch_size": 8})
    assert (both.num_speculative_tokens, both.prompt_lookup_min, both.prompt_lookup_max,
            both.disable_by_batch_size) == (4, 1, 3, 8)
    # vLLM's older "[ngram]" spelling, and the JSON text --speculative-config takes.
    assert SpeculativeConfig.from_value({**NGRAM, "method": "[ngram]"}) == SpeculativeConfig.from_value(NGRAM)
    assert SpeculativeConfig.from_value(json.dumps(NGRAM)) == SpeculativeConfig.from_value(NGRAM)
    assert SpeculativeConfig.from_value(both.to_dict()) == both
    assert SpeculativeConfig.from_value(json.dumps(both.to_dict())) == both


BAD_CONFIGS = {  # id: (value, what the error must name)
    "method-eagle": ({"method": "eagle", "num_speculative_tokens": 3}, "method"),
    "method-missing": ({"num_speculative_tokens": 3}, "method"),
    "k-missing": ({"method": "ngram"}, "num_speculative_tokens"),
    "k-0": ({"method": "ngram", "num_speculative_tokens": 0}, "num_speculative_tokens"),
    "k-negative": ({"method": "ngram", "num_speculative_tokens": -2}, "num_speculative_tokens"),
    "k-float": ({"method": "ngram", "num_speculative_tokens": 2.0}, "num_speculative_tokens"),
    "k-bool": ({"method": "ngram", "num_speculative_tokens": True}, "num_speculative_tokens"),
    "k-str": ({"method": "ngram", "num_speculative_tokens": "3"}, "num_speculative_tokens"),
    "min-0": ({"method": "ngram", "num_speculative_tokens": 3, "prompt_lookup_min": 0}, "prompt_lookup_min"),
    "min-float": ({"method": "ngram", "num_speculative_tokens": 3, "prompt_lookup_min": 1.5, "prompt_lookup_max": 3}, "prompt_lookup_min"),
    "max-0": ({"method": "ngram", "num_speculative_tokens": 3, "prompt_lookup_min": 1, "prompt_lookup_max": 0}, "prompt_lookup_max"),
    "max-str": ({"method": "ngram", "num_speculative_tokens": 3, "prompt_lookup_min": 1, "prompt_lookup_max": "4"}, "prompt_lookup_max"),
    # only the max given, and bad: the error names the key the user gave
    "max-0-alone": ({"method": "ngram", "num_speculative_tokens": 3, "prompt_lookup_max": 0}, "prompt_lookup_max"),
    "min-above-max": ({"method": "ngram", "num_speculative_tokens": 3, "prompt_lookup_min": 4, "prompt_lookup_max": 2}, "prompt_lookup_min"),
    "disable-0": ({"method": "ngram", "num_speculative_tokens": 3, "disable_by_batch_size": 0}, "disable_by_batch_size"),
    "disable-bool": ({"method": "ngram", "num_speculative_tokens": 3, "disable_by_batch_size": True}, "disable_by_batch_size"),
    "disable-str": ({"method": "ngram", "num_speculative_tokens": 3, "disable_by_batch_size": "8"}, "disable_by_batch_size"),
    "unknown-model": ({"method": "ngram", "num_speculative_tokens": 3, "model": "ngram"}, "'model'"),
    "unknown-draft-tp": ({"method": "ngram", "num_speculative_tokens": 3, "draft_tensor_parallel_size": 1}, "'draft_tensor_parallel_size'"),
    "bad-json": ('{"method": "ngram", "num_speculative_tokens": ', "JSON"),
    "json-list": ("[1, 2]", "dict"),
    "list": ([("method", "ngram")], "dict"),
    "int": (4, "dict"),
}


@pytest.mark.parametrize("value, names", list(BAD_CONFIGS.values()), ids=list(BAD_CONFIGS))
def test_config_rejects_each_bad_value_naming_it(value, names: str) -> None:
    with pytest.raises(ValueError, match="speculative_config") as info:
        SpeculativeConfig.from_value(value)
    assert names in str(info.value), str(info.value)


def test_the_engine_takes_the_config_before_any_weight(tiny_checkpoints: dict[str, str]) -> None:
    # A bad config is refused before any weight is looked for.
    with pytest.raises(ValueError, match="num_speculative_tokens"):
        LLM("/nonexistent/model/dir", speculative_config={"method": "ngram", "num_speculative_tokens": 0})
    # The engine takes the dict or its JSON, and has no proposer without one.
    llm = LLM(tiny_checkpoints["llama"], num_kv_blocks=16, speculative_config=json.dumps(NGRAM))
    assert llm.engine.proposer.config == SpeculativeConfig.from_value(NGRAM)
    assert llm.engine.async_scheduling is False  # the CPU's default, speculation or not
    cuda = torch.device("cuda")  # only the device's type is read: no GPU needed
    assert EngineConfig(speculative_config=NGRAM).resolve_async_scheduling(cuda) is True
    assert LLM(tiny_checkpoints["llama"], num_kv_blocks=16).engine.proposer is None


# =============================================================================================
# 2. The n-gram proposer


def brute_force_propose(tokens: list[int], k: int, lo: int, hi: int, max_drafts: int) -> list[int]:
    """The longest suffix n-gram (hi down to lo tokens), at its latest earlier occurrence (one
    with a token after it, other than the suffix itself): up to min(k, max_drafts) tokens after it."""
    k = min(k, max_drafts)
    if k < 1:
        return []
    length = len(tokens)
    for n in range(min(hi, length - 1), lo - 1, -1):
        suffix = tokens[length - n:]
        for start in range(length - n - 1, -1, -1):
            if tokens[start:start + n] == suffix:
                return tokens[start + n:start + n + k]
    return []


def proposer(k: int, lo: int, hi: int) -> NgramProposer:
    return NgramProposer(SpeculativeConfig.from_value(
        {"method": "ngram", "num_speculative_tokens": k, "prompt_lookup_min": lo, "prompt_lookup_max": hi}))


def test_ngram_proposer_matches_brute_force_on_random_sequences() -> None:
    rng = random.Random(0)
    outcomes = collections.Counter()
    for trial in range(4000):
        k, lo = rng.randint(1, 5), rng.randint(1, 4)
        hi = rng.randint(lo, 6)
        p = proposer(k, lo, hi)
        tokens = [rng.randrange(rng.randint(1, 4)) for _ in range(rng.randint(1, 24))]
        max_drafts = rng.randint(-1, 7)
        want = brute_force_propose(tokens, k, lo, hi, max_drafts)
        got = p.propose(trial, tokens, max_drafts)
        assert got == want, (tokens, k, lo, hi, max_drafts)
        assert all(type(t) is int for t in got)
        assert len(got) <= min(k, max(max_drafts, 0))
        outcomes["none" if not got else "full" if len(got) == min(k, max_drafts) else "short"] += 1
    # The cases all occur: no match, drafts cut by what follows the match, and full drafts.
    assert min(outcomes.values()) > 100, outcomes


def test_ngram_proposer_keeps_arrays_per_key_incrementally() -> None:
    rng = random.Random(1)
    k, lo, hi = 3, 1, 4
    p = proposer(k, lo, hi)
    seqs = {key: [rng.randrange(3) for _ in range(80)] for key in ("a", "b")}
    growing = {key: [] for key in seqs}
    # Two keys, interleaved; each one's list grows in place (as a request's token_ids), and
    # sometimes by several tokens at once (accepted drafts).
    i = 0
    while i < 80:
        step = rng.randint(1, 4)
        for key, seq in seqs.items():
            growing[key].extend(seq[i:i + step])
            want = brute_force_propose(growing[key], k, lo, hi, 10)
            assert p.propose(key, growing[key], 10) == want
            # a new list with the same tokens: the kept array serves it the same
            assert p.propose(key, list(growing[key]), 2) == want[:2]
        i += step
    # The same key with a shorter (different) list: built anew, not read from the kept one.
    short = [2, 1, 0, 2, 1]
    assert p.propose("a", short, 10) == brute_force_propose(short, k, lo, hi, 10) == [0, 2, 1]
    # ... and it grows from there, far past the kept buffer's room.
    longer = short + [rng.randrange(3) for _ in range(300)]
    assert p.propose("a", longer, 10) == brute_force_propose(longer, k, lo, hi, 10)
    # forget: the key's array goes; a different sequence under that key is then read afresh.
    p.forget("b")
    p.forget("never-seen")  # no error
    fresh = [rng.randrange(3) for _ in range(120)]
    assert p.propose("b", fresh, 10) == brute_force_propose(fresh, k, lo, hi, 10)


def test_ngram_proposer_limits_and_no_match() -> None:
    p = proposer(4, 1, 3)
    tokens = [5, 6, 7, 8, 9, 5, 6, 7, 8, 9, 5, 6]
    assert p.propose("x", tokens, 10) == [7, 8, 9, 5]  # [9, 5, 6] at 4..6 → 7, 8, 9, 5
    assert p.propose("x", tokens, 2) == [7, 8]
    assert p.propose("x", tokens, 1) == [7]
    assert p.propose("x", tokens, 0) == [] and p.propose("x", tokens, -3) == []
    assert proposer(2, 1, 3).propose("y", tokens, 10) == [7, 8]  # num_speculative_tokens caps
    assert p.propose("z", list(range(30)), 10) == []  # nothing repeats
    assert p.propose("w", [3], 10) == []  # nothing before the suffix
    assert p.propose("v", [1, 2, 3, 1, 2, 3, 9], 10) == []  # the last token never seen before
    # min 2: a single repeated token is not enough.
    assert proposer(4, 2, 3).propose("u", [1, 7, 2, 3, 7], 10) == []
    assert proposer(4, 1, 3).propose("u", [1, 7, 2, 3, 7], 10) == [2, 3, 7]
    # the longest n-gram wins over a later shorter one; the latest of equals wins
    assert proposer(2, 1, 3).propose("t", [1, 2, 3, 50, 9, 3, 60, 1, 2, 3], 10) == [50, 9]
    assert proposer(2, 1, 1).propose("t", [1, 2, 3, 50, 9, 3, 60, 1, 2, 3], 10) == [60, 1]


# =============================================================================================
# 3. Scheduler (pure Python): drafts with a fake model that records what each KV slot holds


def req(rid: str, prompt: list[int], max_tokens: int) -> Request:
    return Request(rid, list(prompt), max_tokens)


def truth(request: Request, position: int) -> int:
    """The fake model's token at a position (what it "samples" there, whatever the context)."""
    return 1000 + (position * 7 + int(request.request_id[1:])) % 5


@dataclass
class FakeKV:
    """The token whose KV each slot holds: written when a step computes a position."""
    slots: dict[int, int] = field(default_factory=dict)

    def write(self, sched: Scheduler, batch: ScheduledBatch) -> None:
        bs = sched.config.block_size
        for request, n in zip(batch.requests, batch.num_tokens):
            start = request.num_computed_tokens
            drafts = batch.spec_token_ids.get(request, [])
            inputs = request.token_ids[start:] + drafts if drafts else request.token_ids[start:start + n]
            assert len(inputs) == n
            for p, token in zip(range(start, start + n), inputs):
                self.slots[request.block_ids[p // bs] * bs + p % bs] = token

    def check(self, sched: Scheduler) -> None:
        """Every computed position of every running request holds its own token's KV."""
        bs = sched.config.block_size
        for request in sched.running:
            for p in range(request.num_computed_tokens):
                slot = request.block_ids[p // bs] * bs + p % bs
                assert self.slots.get(slot) == request.token_ids[p], (request.request_id, p)


def spec_step(sched: Scheduler, kv: FakeKV, drafts: dict[Request, list[int]] | None = None) -> ScheduledBatch:
    """One engine step (sync): drafts set on the running decodes, schedule, KV written, advance,
    the fake model's tokens taken back up to the first refused draft (as LLMEngine._take_back)."""
    for request in sched.running:
        request.spec_token_ids = list((drafts or {}).get(request, []))
    batch = sched.schedule()
    samples = [request in batch.spec_token_ids or batch.samples(i) for i, request in enumerate(batch.requests)]
    kv.write(sched, batch)
    sched.advance(batch)
    for request, sampled in zip(batch.requests, samples):
        if not sampled:
            continue
        spec = batch.spec_token_ids.get(request, [])
        position = len(request.token_ids)  # of the token the first row samples
        tokens = [truth(request, position)]
        for j, draft in enumerate(spec):
            if draft != tokens[-1]:
                break
            tokens.append(truth(request, position + j + 1))
        for j, token in enumerate(tokens):
            sched.append_token(request, token, accepted_draft=j > 0)
        assert request.num_computed_tokens == request.num_tokens - 1, "a decode's only uncomputed token: its last"
    kv.check(sched)
    return batch


def assert_all_free(sched: Scheduler) -> None:
    bm = sched.block_manager
    bm.check_invariants()
    assert bm.num_free_blocks == bm.num_blocks and all(b.ref_count == 0 for b in bm.blocks)


def decoding(sched: Scheduler, *requests: Request, kv: FakeKV | None = None) -> FakeKV:
    """Admit the requests and run their prefills: they are decodes afterwards."""
    kv = kv or FakeKV()
    for request in requests:
        sched.add_request(request)
    while any(not r.prompt_computed or r.num_output_tokens == 0 for r in requests):
        spec_step(sched, kv)
    assert all(r.num_uncomputed_tokens == 1 for r in requests)
    return kv


def test_drafts_are_scheduled_after_the_plain_decodes_and_counted_once_accepted() -> None:
    sched = Scheduler(SchedulerConfig(max_model_len=256, num_blocks=64, block_size=4, max_num_batched_tokens=64))
    a, b, c = req("r1", range(10, 15), 20), req("r2", range(20, 26), 20), req("r3", range(30, 37), 20)
    kv = decoding(sched, a, b, c)
    waiting = req("r4", range(40, 50), 5)
    waiting.spec_token_ids = [1, 2, 3]  # ignored: it is no decode
    sched.add_request(waiting)
    position = len(b.token_ids)
    drafts = [truth(b, position), truth(b, position + 1), 999]  # two right, the third refused
    before = (b.num_tokens, b.num_computed_tokens)
    batch = spec_step(sched, kv, {b: drafts})
    assert batch.requests == [a, c, b, waiting]
    assert batch.num_tokens == [1, 1, 4, 10] and batch.num_decodes == 2
    assert batch.spec_token_ids == {b: drafts}
    assert batch.total_tokens == 16
    # The last token and the two accepted drafts are computed; the third draft's slot is not.
    assert b.num_tokens == before[0] + 3 and b.num_computed_tokens == before[1] + 3
    assert b.output_token_ids[-3:] == [truth(b, position), truth(b, position + 1), truth(b, position + 2)]
    assert b.num_pending_tokens == 0
    while sched.has_unfinished:
        batch = spec_step(sched, kv)
        for request in list(sched.running):
            if request.num_output_tokens >= request.max_tokens:
                sched.finish(request)
    assert_all_free(sched)


def test_a_draft_decode_counts_as_sampling() -> None:
    """ScheduledBatch.samples(i): "whether request i reaches its last known token this step
    (and so samples one)": a decode with drafts computes its last known token and samples."""
    sched = Scheduler(SchedulerConfig(max_model_len=256, num_blocks=64, block_size=4, max_num_batched_tokens=64))
    a = req("r1", range(10, 15), 20)
    decoding(sched, a)
    a.spec_token_ids = [7, 8]
    batch = sched.schedule()
    assert batch.spec_token_ids == {a: [7, 8]}
    assert batch.samples(0)


def test_drafts_are_trimmed_to_the_token_budget() -> None:
    sched = Scheduler(SchedulerConfig(max_model_len=256, num_blocks=64, block_size=4, max_num_batched_tokens=4))
    a, b = req("r1", range(10, 13), 20), req("r2", range(20, 23), 20)
    kv = decoding(sched, a, b)
    drafts = [truth(b, len(b.token_ids) + j) for j in range(5)]
    batch = spec_step(sched, kv, {b: drafts})
    assert batch.requests == [a, b] and batch.num_tokens == [1, 3]
    assert batch.spec_token_ids == {b: drafts[:2]}
    assert b.num_output_tokens == 1 + 3  # the two drafts kept, both accepted, and the token after them
    # alone with the whole budget: 1 + 3 drafts
    sched.finish(a)
    drafts = [truth(b, len(b.token_ids) + j) for j in range(5)]
    batch = spec_step(sched, kv, {b: drafts})
    assert batch.num_tokens == [4] and batch.spec_token_ids == {b: drafts[:3]}
    # a decode with drafts before a plain one: the plain decode still gets its token, the drafts what is left
    c = req("r3", range(30, 33), 20)
    decoding(sched, c, kv=kv)
    assert sched.running == [b, c]
    drafts = [truth(b, len(b.token_ids) + j) for j in range(5)]
    batch = spec_step(sched, kv, {b: drafts})
    assert batch.requests == [c, b] and batch.num_tokens == [1, 3] and batch.spec_token_ids == {b: drafts[:2]}
    sched.finish(c)
    # a budget of one token: no drafts at all
    sched.config.max_num_batched_tokens = 1
    batch = spec_step(sched, kv, {b: [1, 2, 3]})
    assert batch.num_tokens == [1] and batch.spec_token_ids == {}
    sched.finish(b)
    assert_all_free(sched)


def test_drafts_take_only_what_admission_leaves() -> None:
    """A waiting request's prefill is certain work, a draft a guess: drafts get the budget and
    the blocks left after the step's admissions."""
    sched = Scheduler(SchedulerConfig(max_model_len=256, num_blocks=64, block_size=4, max_num_batched_tokens=8))
    a = req("r1", range(10, 13), 20)
    kv = decoding(sched, a)
    waiting = req("r2", range(20, 26), 5)  # 6 tokens: with a's token, 7 of the budget's 8
    sched.add_request(waiting)
    batch = spec_step(sched, kv, {a: [truth(a, len(a.token_ids) + j) for j in range(4)]})
    assert batch.requests == [a, waiting] and batch.num_tokens == [2, 6]
    assert batch.spec_token_ids == {a: [truth(a, len(a.token_ids) - 2)]}  # the one draft left room for, kept
    sched.finish(a)
    sched.finish(waiting)
    assert_all_free(sched)


def test_drafts_are_dropped_when_the_pool_lacks_their_blocks() -> None:
    # 3 blocks of 4: a (3 prompt tokens) holds 1, b (7) holds 2; both decodes fit what they hold.
    sched = Scheduler(SchedulerConfig(max_model_len=64, num_blocks=3, block_size=4, max_num_batched_tokens=64))
    a, b = req("r1", [5, 6, 7], 8), req("r2", [1, 2, 3, 4, 5, 6, 7], 4)
    kv = decoding(sched, a, b)
    assert sched.block_manager.num_free_blocks == 0
    batch = spec_step(sched, kv, {a: [truth(a, 4), truth(a, 5)]})  # they would need a fourth block
    assert batch.preempted == [] and sched.stats.num_preemptions == 0
    assert batch.spec_token_ids == {} and batch.num_tokens == [1, 1]
    assert a.status is RequestStatus.RUNNING and b.status is RequestStatus.RUNNING
    for request in (a, b):
        sched.finish(request)
    assert_all_free(sched)


def test_drafts_take_the_slots_left_in_the_blocks_held_when_the_pool_is_full() -> None:
    # 3 blocks of 8: a (3 prompt tokens) holds 1 (positions 0..7), b (13) holds 2: the pool is full.
    sched = Scheduler(SchedulerConfig(max_model_len=64, num_blocks=3, block_size=8, max_num_batched_tokens=64))
    a, b = req("r1", [5, 6, 7], 12), req("r2", list(range(20, 33)), 3)
    kv = decoding(sched, a, b)
    assert sched.block_manager.num_free_blocks == 0 and len(a.block_ids) == 1
    drafts = [truth(a, 4 + j) for j in range(4)] + [999, 999]  # six: positions 4..9 need a second block
    batch = spec_step(sched, kv, {a: drafts})
    assert batch.preempted == [] and batch.spec_token_ids == {a: drafts[:4]}  # positions 4..7 fit
    assert batch.num_tokens == [1, 5] and len(a.block_ids) == 1
    assert a.num_output_tokens == 1 + 5 and a.num_computed_tokens == a.num_tokens - 1 == 8
    for request in (a, b):
        sched.finish(request)
    assert_all_free(sched)


def test_drafts_never_take_the_block_a_plain_decode_needs() -> None:
    """Drafts never preempt: not directly, and not by taking the last free block that a decode
    after them needs (without the drafts, this step preempts nobody)."""
    # 3 blocks of 4. a: 3 prompt tokens, 1 block, its decode fits it (its drafts need another).
    # b: 4 prompt tokens, 1 block, its decode needs the one free block.
    sched = Scheduler(SchedulerConfig(max_model_len=64, num_blocks=3, block_size=4, max_num_batched_tokens=64))
    a, b = req("r1", [5, 6, 7], 8), req("r2", [1, 2, 3, 4], 8)
    kv = decoding(sched, a, b)
    assert sched.block_manager.num_free_blocks == 1 and sched.running == [a, b]
    batch = spec_step(sched, kv, {a: [truth(a, 4), truth(a, 5), truth(a, 6)]})
    assert batch.preempted == [] and sched.stats.num_preemptions == 0, \
        f"{[r.request_id for r in batch.preempted]} preempted for a's drafts"
    assert b in batch.requests and b.status is RequestStatus.RUNNING


@pytest.mark.parametrize("seed", range(6))
def test_random_workload_with_drafts_keeps_kv_and_blocks_consistent(seed: int) -> None:
    """Random drafts (some right, some refused) over tight pools, small budgets, shared prefixes
    and aborts: every computed position holds its token's KV (a refused draft's never counts),
    the outputs are the fake model's tokens, and every block comes back."""
    rng = random.Random(seed)
    num_blocks, block_size, budget, max_num_seqs = [(14, 4, 16, 8), (30, 4, 12, 4), (12, 8, 64, 6),
                                                    (60, 2, 20, 8), (20, 4, 32, 3), (200, 4, 64, 8)][seed]
    sched = Scheduler(SchedulerConfig(max_model_len=128, num_blocks=num_blocks, block_size=block_size,
                                      max_num_batched_tokens=budget, max_num_seqs=max_num_seqs))
    kv = FakeKV()
    prefixes = [[rng.randrange(50) for _ in range(rng.randrange(0, 12))] for _ in range(3)]
    requests: list[Request] = []
    drafted_steps = preempting_steps = accepted = 0
    steps = 0
    while len(requests) < 20 or sched.has_unfinished:
        if len(requests) < 20 and rng.random() < 0.4:
            prompt = rng.choice(prefixes) + [rng.randrange(50) for _ in range(rng.randrange(1, 20))]
            max_tokens = rng.randrange(1, 24)
            prompt = prompt[:max(1, min(128, num_blocks * block_size) - max_tokens)]
            request = req(f"r{len(requests)}", prompt, max_tokens)
            sched.add_request(request)
            requests.append(request)
        drafts = {}
        for request in sched.running:
            room = request.max_tokens - request.num_output_tokens - 1
            if request.num_uncomputed_tokens == 1 and room > 0 and rng.random() < 0.8:
                position = len(request.token_ids)
                drafts[request] = [truth(request, position + j) if rng.random() < 0.7 else 2000
                                   for j in range(rng.randint(1, min(4, room)))]
        decodes = [r for r in sched.running if r.num_uncomputed_tokens == 1]
        counts = {r: r.num_tokens for r in sched.running}
        batch = spec_step(sched, kv, drafts)
        assert batch.total_tokens <= budget
        assert all(n == 1 for n in batch.num_tokens[:batch.num_decodes])
        with_drafts = [r for r in batch.requests if r in batch.spec_token_ids]
        assert batch.requests[batch.num_decodes:batch.num_decodes + len(with_drafts)] == with_drafts, \
            "decodes with drafts come right after the plain decodes, before the prefills"
        for request, spec in batch.spec_token_ids.items():
            assert request in decodes and spec and spec == drafts[request][:len(spec)]
            assert batch.num_tokens[batch.requests.index(request)] == 1 + len(spec)
            accepted += request.num_tokens - counts[request] - 1
        drafted_steps += bool(batch.spec_token_ids)
        preempting_steps += bool(batch.preempted)
        for request in list(sched.running):
            assert request.num_output_tokens <= request.max_tokens
            if request.num_output_tokens == request.max_tokens:
                sched.finish(request)
        if requests and rng.random() < 0.05:
            sched.finish(rng.choice(requests))  # an abort at any moment
        sched.block_manager.check_invariants(sched.running + list(sched.waiting))
        steps += 1
        assert steps < 3000, "no progress"
    for request in requests:
        assert request.finished
        assert request.output_token_ids == [truth(request, request.num_prompt_tokens + i)
                                            for i in range(request.num_output_tokens)]
    assert_all_free(sched)
    assert drafted_steps > 5 and accepted > 5
    # what the seeds' workloads went through (deterministic): preemptions, prefix-cache hits
    assert (preempting_steps > 0) == (seed in (0, 2, 4))
    assert (sched.block_manager.stats.hits_tokens > 0) == (seed in (0, 3, 4, 5))


def test_prefix_cache_registers_only_accepted_tokens() -> None:
    """bs 4, a 7-token prompt: the decode at position 7 verifies drafts for positions 8..11. The
    draft for 11 is refused, so the block 8..11 holds the refused draft's KV in its last slot:
    it is not registered until its real token is computed, and a prompt with the refused draft
    never hits it."""
    prompt = [10, 11, 12, 13, 14, 15, 16]
    for refused in (True, False):
        sched = Scheduler(SchedulerConfig(max_model_len=128, num_blocks=32, block_size=4, max_num_batched_tokens=64))
        bm = sched.block_manager
        r = req("r1", prompt, 16)
        kv = decoding(sched, r)
        assert len(r.token_ids) == 8 and r.num_prefix_cached_blocks == 1  # positions 0..3; 4..7 not computed
        drafts = [truth(r, 8), truth(r, 9), truth(r, 10), truth(r, 11)]
        if refused:
            drafts[3] = 999
        spec_step(sched, kv, {r: drafts})
        known = list(r.token_ids)
        if refused:
            assert known[8:] == drafts[:3] + [truth(r, 11)] and r.num_computed_tokens == 11
            assert r.num_prefix_cached_blocks == 2, "the block with the refused draft's KV was registered"
        else:
            assert known[8:12] == drafts and r.num_computed_tokens == 12 and len(known) == 13
            assert r.num_prefix_cached_blocks == 3
        with_tokens = req("x", known[:12] + [7], 4)  # the accepted tokens (and the real token at 11)
        with_draft = req("y", known[:11] + [drafts[3], 7], 4)  # the draft proposed at 11
        assert len(bm.match_prefix(with_tokens)) == (2 if refused else 3)
        assert len(bm.match_prefix(with_draft)) == (2 if refused else 3)
        spec_step(sched, kv)  # computes position 11 (refused: its real token now)
        assert r.num_prefix_cached_blocks == 3
        assert len(bm.match_prefix(req("x2", known[:12] + [7], 4))) == 3
        if refused:
            assert len(bm.match_prefix(req("y2", known[:11] + [drafts[3], 7], 4))) == 2
        sched.finish(r)
        assert_all_free(sched)
        assert len(bm.match_prefix(req("x3", known[:12] + [7], 4))) == 3  # cached after it finished too
        kv.check(sched)


# =============================================================================================
# 4. Sampler: rows that verify drafts. A draft is accepted when its row samples it, so against a
#    draft that is one token d for certain: kept with probability p(d), and where refused the
#    token is drawn from p without d (rejection sampling, exactly) — provided a verifying row
#    samples p itself. A seeded verifying row gives its generator's state after its draw, which
#    the engine winds back to at a refused draft.


V = 6
LOGITS = torch.tensor([1.2, 0.4, 0.0, -0.3, 0.9, -1.0])
RANDOM_PARAMS = [SamplingParams(temperature=1.0), SamplingParams(temperature=1.0, top_k=3),
                 SamplingParams(temperature=1.0, top_p=0.7), SamplingParams(temperature=0.6, top_k=4, top_p=0.9)]


def target_distribution(logits: torch.Tensor, params: SamplingParams) -> list[float]:
    """softmax(logits / T) kept to the top_k, then to the nucleus (the tokens before which less
    than top_p of the mass lies), renormalised: what the row must sample."""
    x = logits.double() / params.temperature
    order = sorted(range(len(x)), key=lambda i: -float(x[i]))
    keep = set(order[:params.top_k] if params.top_k else order)
    probs = torch.full_like(x, float("-inf"))
    for i in keep:
        probs[i] = x[i]
    probs = probs.softmax(-1)
    mass, nucleus = 0.0, set()
    for i in order:
        if i in keep and mass < params.top_p:
            nucleus.add(i)
            mass += float(probs[i])
    out = [float(probs[i]) if i in nucleus else 0.0 for i in range(len(x))]
    z = sum(out)
    return [p / z for p in out]


def srow(params: SamplingParams, verifies: bool = True, generator: torch.Generator | None = None,
         output: tuple[int, ...] = ()) -> SamplingRow:
    return SamplingRow(params=params, token_ids=[0, 1] + list(output), num_prompt_tokens=2, generator=generator,
                       eos_token_ids=[], verifies_draft=verifies)


def within(count: int, n: int, p: float) -> bool:
    """A binomial count within 5 standard deviations of n * p (exactly 0 where p is 0)."""
    return count == 0 if p == 0.0 else abs(count - n * p) <= 5 * math.sqrt(n * p * (1 - p)) + 1


def assert_matches(counts: list[int], expected: list[float], what: str) -> None:
    n = sum(counts)
    for token, (count, p) in enumerate(zip(counts, expected)):
        assert within(count, n, p), f"{what}: token {token}: {count} of {n}, expected {n * p:.1f}"


def test_verifying_rows_sample_their_distribution_so_drafts_are_kept_by_rejection_sampling() -> None:
    """One call, 60k rows interleaved: greedy rows and random rows of 4 kinds of params (top-k,
    top-p), verifying a draft or not, a third of them seeded. Each (params, verifies) group
    samples the row's own distribution; for each draft d, the rows verifying it keep it with
    probability p(d) (d excluded by top-k/top-p: never), and the refused ones are distributed
    as p without d; greedy rows give their argmax."""
    torch.manual_seed(0)
    rows, groups = [], []
    for i in range(60_000):
        if i % 13 == 0:
            rows.append(srow(SamplingParams(temperature=0.0), verifies=i % 2 == 0))
            groups.append(None)
            continue
        params_index, verifies = i % 4, (i // 4) % 5 != 0  # 4 in 5 verify a draft
        generator = torch.Generator().manual_seed(i) if i % 3 == 0 else None
        rows.append(srow(RANDOM_PARAMS[params_index], verifies, generator))
        groups.append((params_index, verifies, (i // 20) % V))  # the draft the row verifies
    tokens = Sampler()(LOGITS.expand(len(rows), -1).contiguous(), rows).token_ids
    argmax = int(LOGITS.argmax())
    assert all(t == argmax for t, g in zip(tokens, groups) if g is None)
    by_group: dict[tuple[int, bool], list[int]] = collections.defaultdict(lambda: [0] * V)
    by_draft: dict[tuple[int, int], list[int]] = collections.defaultdict(lambda: [0] * V)
    for t, g in zip(tokens, groups):
        if g is not None:
            by_group[g[:2]][t] += 1
            if g[1]:
                by_draft[(g[0], g[2])][t] += 1
    assert len(by_group) == 2 * len(RANDOM_PARAMS) and len(by_draft) == len(RANDOM_PARAMS) * V
    for (params_index, verifies), counts in sorted(by_group.items()):
        assert_matches(counts, target_distribution(LOGITS, RANDOM_PARAMS[params_index]),
                       f"params {params_index}, verifies {verifies}")
    for (params_index, draft), counts in sorted(by_draft.items()):
        p = target_distribution(LOGITS, RANDOM_PARAMS[params_index])
        n = sum(counts)
        assert within(counts[draft], n, p[draft]), f"params {params_index}: draft {draft} kept {counts[draft]} of {n}"
        refused = [c if t != draft else 0 for t, c in enumerate(counts)]
        if p[draft] < 1.0:
            residual = [q / (1 - p[draft]) if t != draft else 0.0 for t, q in enumerate(p)]
            assert_matches(refused, residual, f"params {params_index}, draft {draft} refused")


def test_a_certain_draft_is_always_kept_an_excluded_one_never() -> None:
    n = 4000
    certain = torch.tensor([30.0, 0.0, 0.0, 0.0, 0.0, 0.0])  # p(0) rounds to 1
    out = Sampler()(certain.expand(n, -1).contiguous(), [srow(SamplingParams()) for _ in range(n)])
    assert out.token_ids == [0] * n
    # Token 2: a large raw probability, but outside the top 2: a draft of it is never kept.
    close = torch.tensor([2.0, 1.95, 1.9, -3.0, -3.0, -3.0])
    params = SamplingParams(temperature=1.0, top_k=2)
    tokens = Sampler()(close.expand(n, -1).contiguous(), [srow(params) for _ in range(n)]).token_ids
    assert 2 not in tokens
    assert_matches([tokens.count(t) for t in range(V)], target_distribution(close, params), "top_k=2")
    # min_p likewise
    tokens = Sampler()(close.expand(n, -1).contiguous(), [srow(SamplingParams(min_p=0.99)) for _ in range(n)]).token_ids
    assert set(tokens) == {0}
    # logprobs of a verifying row: the raw logits' at the token it sampled
    rows = [srow(SamplingParams(temperature=1.0, logprobs=2), verifies=i % 2 == 0) for i in range(100)]
    out = Sampler()(LOGITS.expand(len(rows), -1).contiguous(), rows)
    raw = LOGITS.log_softmax(-1)
    for t, lp in zip(out.token_ids, out.logprobs):
        assert lp == pytest.approx(float(raw[t]), abs=1e-5)


def test_greedy_verifying_rows_take_the_argmax() -> None:
    g = torch.Generator().manual_seed(3)
    logits = torch.randn(12, 40, generator=g)
    params = [SamplingParams(temperature=0.0), SamplingParams(temperature=0.0, presence_penalty=1.5)]
    rows = [srow(params[i % 2], verifies=i % 3 != 0, output=(int(logits[i].argmax()),)) for i in range(12)]
    tokens = Sampler()(logits, rows).token_ids
    for i, t in enumerate(tokens):
        x = logits[i].clone()
        if i % 2:
            x[int(logits[i].argmax())] -= 1.5
        assert t == int(x.argmax())


def test_seeded_verifying_rows_give_their_generator_state_after_their_draw() -> None:
    """The states come back for the seeded rows that verify drafts, by batch row: each is the
    state after that row's own draw (rows of one sequence draw in order from its generator)."""
    params = SamplingParams(temperature=1.0)
    seq = torch.Generator().manual_seed(11)  # one sequence: a decode and two draft rows
    other = torch.Generator().manual_seed(12)
    rows = [srow(SamplingParams(temperature=0.0)),  # greedy: no draw
            srow(params, True, seq), srow(params, True, seq), srow(params, False, seq),
            srow(params, True),  # unseeded: nothing to wind back
            srow(params, False, other)]
    out = Sampler().sample(LOGITS.expand(len(rows), -1).contiguous(), rows)
    tokens = out.output().token_ids
    assert set(out.generator_states) == {1, 2}
    replay = torch.Generator().manual_seed(11)
    for row in (1, 2):
        torch.empty(V).exponential_(generator=replay)
        assert torch.equal(out.generator_states[row], replay.get_state())
    torch.empty(V).exponential_(generator=replay)
    assert torch.equal(seq.get_state(), replay.get_state())  # three draws in all
    # Wound back to row 1's state, the sequence's next draw is row 2's: the same token again.
    seq.set_state(out.generator_states[1])
    again = Sampler()(LOGITS.expand(1, -1).contiguous(), [srow(params, False, seq)]).token_ids
    assert again == [tokens[2]]


def test_seeded_verifying_rows_are_reproducible_and_independent_of_their_batch() -> None:
    logits = torch.randn(1, V, generator=torch.Generator().manual_seed(5))[0] * 1.5
    params = SamplingParams(temperature=1.0, top_k=5)

    def seeded(seed: int, verifies: bool, mates: int, position: int) -> int:
        rows = [srow(SamplingParams(temperature=0.9), verifies=j % 2 == 1) for j in range(mates)]
        rows += [srow(SamplingParams(temperature=1.0), True, torch.Generator().manual_seed(99 + j))
                 for j in range(mates // 2)]
        rows.insert(position, srow(params, verifies, torch.Generator().manual_seed(seed)))
        return Sampler()(logits.expand(len(rows), -1).contiguous(), rows).token_ids[position]

    alone = [[seeded(seed, verifies, 0, 0) for verifies in (False, True)] for seed in range(20)]
    assert all(a == b for a, b in alone), "verifying a draft changed a seeded row's token"
    assert len({a for a, _ in alone}) > 2  # it really samples
    for mates, position in [(3, 1), (8, 0), (8, 8), (11, 5)]:
        torch.manual_seed(mates)  # nor does the default RNG's state matter
        assert [[seeded(seed, verifies, mates, position) for verifies in (False, True)]
                for seed in range(20)] == alone


# =============================================================================================
# 5. The engine, greedy, on the embedded default model


@dataclass
class Record:
    drafts: collections.Counter = field(default_factory=collections.Counter)  # request id → drafts scheduled
    accepted: collections.Counter = field(default_factory=collections.Counter)  # → accepted drafts appended
    steps: list = field(default_factory=list)  # (running before the step, {request id: drafts})
    first_token_drafts: int = 0  # decodes with drafts that had no output token yet (a prompt's last token)


@contextlib.contextmanager
def recording(llm: LLM) -> Iterator[Record]:
    """Record each step's drafts (as scheduled) and each accepted draft the engine appends."""
    sched = llm.engine.scheduler
    schedule, append_token = sched.schedule, sched.append_token
    record = Record()

    def recorded_schedule() -> ScheduledBatch:
        running = len(sched.running)
        batch = schedule()
        record.steps.append((running, {r.request_id: list(d) for r, d in batch.spec_token_ids.items()}))
        for request, drafts in batch.spec_token_ids.items():
            record.drafts[request.request_id] += len(drafts)
            record.first_token_drafts += request.num_output_tokens == 0
        return batch

    def recorded_append(request, token, now=None, accepted_draft=False):
        if accepted_draft:
            record.accepted[request.request_id] += 1
        return append_token(request, token, now, accepted_draft=accepted_draft)

    with pytest.MonkeyPatch.context() as mp:
        mp.setattr(sched, "schedule", recorded_schedule)
        mp.setattr(sched, "append_token", recorded_append)
        yield record


def _lp(value) -> float:
    return getattr(value, "logprob", value)


def assert_same_outputs(got, want, lp_tol: float = 2e-3) -> None:
    assert len(got) == len(want)
    for g, w in zip(got, want):
        assert len(g.outputs) == len(w.outputs)
        assert (g.prompt_logprobs is None) == (w.prompt_logprobs is None)
        if w.prompt_logprobs is not None:
            assert len(g.prompt_logprobs) == len(w.prompt_logprobs) == len(w.prompt_token_ids)
            for ea, eb in zip(g.prompt_logprobs, w.prompt_logprobs):
                assert (ea is None) == (eb is None) and set(ea or ()) == set(eb or ())
                for token in eb or ():
                    assert _lp(ea[token]) == pytest.approx(_lp(eb[token]), abs=lp_tol)
        for a, b in zip(g.outputs, w.outputs):
            assert a.token_ids == b.token_ids, (a.text, b.text)
            assert a.text == b.text
            assert (a.finish_reason, a.stop_reason) == (b.finish_reason, b.stop_reason)
            assert (a.logprobs is None) == (b.logprobs is None)
            if b.logprobs is not None:
                assert len(a.logprobs) == len(b.logprobs) == len(b.token_ids)
                for ea, eb in zip(a.logprobs, b.logprobs):
                    assert set(ea) == set(eb)
                    for token in eb:
                        assert _lp(ea[token]) == pytest.approx(_lp(eb[token]), abs=lp_tol)
                assert a.cumulative_logprob == pytest.approx(b.cumulative_logprob, abs=lp_tol * len(b.token_ids))


PERSON = {"type": "object", "properties": {"name": {"type": "string"}, "age": {"type": "integer"}},
          "required": ["name", "age"]}


def user(text: str) -> list[dict[str, str]]:
    return [{"role": "user", "content": text}]


REPEAT = user("Repeat the following sentence exactly: The quick brown fox jumps over the lazy dog.")
HELLO = user("Write the word 'hello' ten times.")
CODE = user("Fix the typo in this Python code and give the whole corrected code:\n"
            "```python\ndef greet(name):\n    print('Helo, ' + name)\n    return name\n```")
COUNT = user("Count from 1 to 20, separated by commas.")
JSON_PROMPT = user('Example: {"name": "Ann", "age": 40}. Give me a JSON object for Marie, 31 years old.')


@pytest.fixture(scope="module")
def ref_llm(default_model_dir: str) -> LLM:
    return LLM(default_model_dir, kv_cache_memory_bytes=128 << 20)


@pytest.fixture(scope="module")
def spec_llm(default_model_dir: str) -> LLM:
    return LLM(default_model_dir, kv_cache_memory_bytes=128 << 20, speculative_config=NGRAM)


def greedy_cases(tokenizer) -> dict[str, tuple[list[dict[str, str]], SamplingParams]]:
    lazy, dog = (tokenizer.encode(w, add_special_tokens=False) for w in (" lazy", " dog"))
    assert len(lazy) == len(dog) == 1
    g = dict(temperature=0.0)
    return {
        "plain+logprobs": (REPEAT, SamplingParams(max_tokens=24, logprobs=3, **g)),
        "n=2": (HELLO, SamplingParams(n=2, max_tokens=24, logprobs=2, **g)),
        "penalties": (CODE, SamplingParams(max_tokens=32, presence_penalty=0.3, frequency_penalty=0.2,
                                           repetition_penalty=1.1, **g)),
        "logit_bias": (REPEAT, SamplingParams(max_tokens=24, logit_bias={lazy[0]: -100.0, dog[0]: 5.0}, **g)),
        "min_tokens": (REPEAT, SamplingParams(max_tokens=32, min_tokens=20, **g)),
        "stop_string": (COUNT, SamplingParams(max_tokens=40, stop=["6."], **g)),
        "stop_token_ids": (REPEAT, SamplingParams(max_tokens=24, stop_token_ids=dog, **g)),
        "max_tokens=7": (HELLO, SamplingParams(max_tokens=7, **g)),
        "max_tokens=10": (HELLO, SamplingParams(max_tokens=10, **g)),
        "structured": (JSON_PROMPT, SamplingParams(max_tokens=30, structured_outputs=StructuredOutputsParams(
            json=PERSON), **g)),
    }


@dataclass
class GreedyRun:
    names: list[str]
    want: list  # the reference engine's outputs
    got: list  # the speculative engine's
    record: Record
    stats: tuple[int, int, int]  # the run's (num_drafts, num_draft_tokens, num_accepted_tokens)


@pytest.fixture(scope="module")
def greedy_run(ref_llm: LLM, spec_llm: LLM) -> GreedyRun:
    """Every greedy case in one batch, on both engines."""
    cases = greedy_cases(spec_llm.get_tokenizer())
    names = list(cases)
    conversations, params = [cases[n][0] for n in names], [cases[n][1] for n in names]
    want = ref_llm.chat(conversations, params, use_tqdm=False)
    s = spec_llm.engine.stats
    before = (s.num_drafts, s.num_draft_tokens, s.num_accepted_tokens)
    with recording(spec_llm) as record:
        got = spec_llm.chat(conversations, params, use_tqdm=False)
    stats = tuple(x - y for x, y in zip((s.num_drafts, s.num_draft_tokens, s.num_accepted_tokens), before))
    return GreedyRun(names, want, got, record, stats)


GREEDY_NAMES = ["plain+logprobs", "n=2", "penalties", "logit_bias", "min_tokens", "stop_string",
                "stop_token_ids", "max_tokens=7", "max_tokens=10"]


@pytest.mark.parametrize("name", GREEDY_NAMES)
def test_greedy_outputs_equal_the_engine_without_drafts(greedy_run: GreedyRun, name: str) -> None:
    i = greedy_run.names.index(name)
    got, want = greedy_run.got[i], greedy_run.want[i]
    assert_same_outputs([got], [want])
    for completion in got.outputs:
        sample_id = f"{got.request_id}-{completion.index}"
        assert greedy_run.record.accepted[sample_id] > 0, f"{name}: no draft accepted: the case proves nothing"
        assert greedy_run.record.drafts[sample_id] > greedy_run.record.accepted[sample_id] > 0
    if name.startswith("max_tokens="):
        limit = int(name.split("=")[1])
        assert all(len(c.token_ids) == limit and c.finish_reason == "length" for c in got.outputs)
    if name == "stop_string":
        assert got.outputs[0].finish_reason == "stop" and got.outputs[0].stop_reason == "6."
        assert "6." not in got.outputs[0].text
    if name == "stop_token_ids":
        assert got.outputs[0].stop_reason == got.outputs[0].token_ids[-1]
    if name == "min_tokens":
        assert len(got.outputs[0].token_ids) >= 20


def test_greedy_run_stops_mid_draft_and_counts_its_drafts(greedy_run: GreedyRun, spec_llm: LLM) -> None:
    """The engine's counters are the drafts the steps verified; a run that ends at EOS, a stop
    string or max_tokens keeps nothing past that token, though later drafts were accepted."""
    num_drafts, num_draft_tokens, num_accepted = greedy_run.stats
    scheduled = [d for _, step in greedy_run.record.steps for d in step.values()]
    assert num_drafts == len(scheduled) and num_draft_tokens == sum(map(len, scheduled))
    assert 0 < sum(greedy_run.record.accepted.values()) <= num_accepted < num_draft_tokens
    assert spec_llm.engine.async_scheduling is False
    assert_engine_idle(spec_llm)
    eos = spec_llm.engine.eos_token_ids
    plain = greedy_run.got[greedy_run.names.index("plain+logprobs")].outputs[0]
    assert plain.finish_reason == "stop" and plain.token_ids[-1] in eos
    assert plain.text == "The quick brown fox jumps over the lazy dog."
    # Inter-token latencies are between the steps that gave tokens (vLLM's): a step's accepted
    # drafts add none (no zeros).
    sample_id = f"{greedy_run.got[greedy_run.names.index('plain+logprobs')].request_id}-0"
    latencies = greedy_run.got[greedy_run.names.index("plain+logprobs")].metrics.inter_token_latencies
    assert greedy_run.record.accepted[sample_id] > 0
    assert all(t > 0 for t in latencies)
    assert len(latencies) == len(plain.token_ids) - 1 - greedy_run.record.accepted[sample_id]


def test_structured_outputs_verify_only_drafts_their_grammar_allows(greedy_run: GreedyRun, spec_llm: LLM,
                                                                    monkeypatch: pytest.MonkeyPatch) -> None:
    """A structured output's drafts are cut where its grammar would refuse one (or end), and each
    row samples under the mask of the position the drafts before it lead to: the answer equals
    the engine's without speculation, drafts accepted."""
    i = greedy_run.names.index("structured")
    got, want = greedy_run.got[i], greedy_run.want[i]
    assert_same_outputs([got], [want])
    completion = got.outputs[0]
    assert completion.finish_reason == "stop"
    value = json.loads(completion.text)
    assert set(value) == {"name", "age"} and isinstance(value["name"], str) and type(value["age"]) is int
    assert greedy_run.record.accepted[f"{got.request_id}-0"] > 0
    # Alone, with every draft proposal seen: whatever the lookup proposed, what was scheduled is
    # the longest prefix the grammar takes on from the output so far.
    proposals: list[tuple[int, list[int], list[int]]] = []  # (output tokens, proposed, scheduled)
    propose, schedule = spec_llm.engine.proposer.propose, spec_llm.engine.scheduler.schedule

    def recorded_propose(request, token_ids, max_drafts):
        drafts = propose(request, token_ids, max_drafts)
        proposals.append((len(token_ids) - request.num_prompt_tokens, drafts, []))
        return drafts

    def recorded_schedule():
        batch = schedule()
        for drafts in batch.spec_token_ids.values():
            proposals[-1][2].extend(drafts)
        return batch

    monkeypatch.setattr(spec_llm.engine.proposer, "propose", recorded_propose)
    monkeypatch.setattr(spec_llm.engine.scheduler, "schedule", recorded_schedule)
    params = SamplingParams(max_tokens=30, temperature=0.0, structured_outputs=StructuredOutputsParams(json=PERSON))
    alone = spec_llm.chat(JSON_PROMPT, params, use_tqdm=False)[0].outputs[0]
    assert alone.token_ids == completion.token_ids
    grammar, engine = StructuredOutputsParams(json=PERSON).compile(), spec_llm.engine
    cut = 0
    for done, proposed, scheduled in proposals:
        guide = Guide(grammar, engine._token_masks, engine.eos_token_ids)
        assert all(guide.advance(t) for t in alone.token_ids[:done])
        valid = []
        for token in proposed:
            if not guide.advance(token) or guide.ended:
                break
            valid.append(token)
        assert scheduled == valid, (done, proposed, scheduled)
        cut += len(valid) < len(proposed)
    assert cut > 0 and any(proposals[i][2] for i in range(len(proposals))), proposals  # both cases seen
    assert_engine_idle(spec_llm)


def test_a_tiny_kv_pool_preempts_and_still_equals_the_reference(default_model_dir: str, greedy_run: GreedyRun,
                                                                 ref_llm: LLM) -> None:
    llm = LLM(default_model_dir, num_kv_blocks=12, block_size=16, speculative_config=NGRAM)
    names = GREEDY_NAMES
    cases = greedy_cases(llm.get_tokenizer())
    with recording(llm) as record:
        got = llm.chat([cases[n][0] for n in names], [cases[n][1] for n in names], use_tqdm=False)
    assert llm.engine.scheduler.stats.num_preemptions > 0
    assert sum(record.accepted.values()) > 0
    assert_same_outputs(got, [greedy_run.want[greedy_run.names.index(n)] for n in names])
    assert_engine_idle(llm)
    # Seeded samples too: the same tokens as without speculation, preempted or not.
    preemptions = llm.engine.scheduler.stats.num_preemptions
    params = SamplingParams(n=2, max_tokens=24, temperature=0.8, seed=42)
    with recording(llm) as record:
        got = llm.chat([HELLO, REPEAT, CODE], params, use_tqdm=False)
    assert llm.engine.scheduler.stats.num_preemptions > preemptions and sum(record.accepted.values()) > 0
    assert_same_outputs(got, ref_llm.chat([HELLO, REPEAT, CODE], params, use_tqdm=False))
    assert_engine_idle(llm)


def test_a_short_max_model_len_stops_drafts_at_the_context_end(default_model_dir: str, ref_llm: LLM) -> None:
    tokenizer = ref_llm.get_tokenizer()
    prompt_len = len(tokenizer.encode(tokenizer.apply_chat_template(HELLO, tokenize=False, add_generation_prompt=True),
                                      add_special_tokens=False))
    room = 13
    llm = LLM(default_model_dir, max_model_len=prompt_len + room, kv_cache_memory_bytes=32 << 20,
              speculative_config=NGRAM)
    with recording(llm) as record:
        got = llm.chat([HELLO], SamplingParams(n=2, max_tokens=100, temperature=0.0), use_tqdm=False)
    want = ref_llm.chat([HELLO], SamplingParams(n=2, max_tokens=room, temperature=0.0), use_tqdm=False)
    assert [len(c.token_ids) for c in got[0].outputs] == [room, room]
    assert_same_outputs(got, want)
    assert all(c.finish_reason == "length" for c in got[0].outputs)
    assert sum(record.accepted.values()) > 0
    assert_engine_idle(llm)


def test_a_prompts_last_chunk_verifies_drafts_for_the_first_token(default_model_dir: str, ref_llm: LLM) -> None:
    """A prompt chunked so that its last token is computed alone: that step is a decode, and
    its drafts (looked up in the prompt) are verified with it; prompt logprobs and the siblings
    of n=2 (which share the prompt through the prefix cache) stay as without drafts."""
    tokenizer = ref_llm.get_tokenizer()
    prompt = tokenizer.encode(tokenizer.apply_chat_template(REPEAT, tokenize=False, add_generation_prompt=True),
                              add_special_tokens=False)
    llm = LLM(default_model_dir, kv_cache_memory_bytes=32 << 20, max_num_batched_tokens=len(prompt) - 1,
              speculative_config=NGRAM)
    params = SamplingParams(n=2, max_tokens=16, temperature=0.0, prompt_logprobs=1, logprobs=1)
    with recording(llm) as record:
        got = llm.generate([prompt], params, use_tqdm=False)
    assert record.first_token_drafts > 0 and sum(record.accepted.values()) > 0
    assert_same_outputs(got, ref_llm.generate([prompt], params, use_tqdm=False))
    assert_engine_idle(llm)


def test_streamed_deltas_carry_each_steps_tokens(spec_llm: LLM, greedy_run: GreedyRun) -> None:
    """outputs="delta" (what the server streams): a step that kept drafts sends all its tokens
    at once, and the deltas add up to the answer."""
    i = greedy_run.names.index("n=2")
    want = greedy_run.want[i]
    engine = spec_llm.engine
    tokenizer = spec_llm.get_tokenizer()
    prompt = tokenizer.encode(tokenizer.apply_chat_template(HELLO, tokenize=False, add_generation_prompt=True),
                              add_special_tokens=False)
    engine.add_request("stream", prompt, SamplingParams(n=2, max_tokens=24, temperature=0.0))
    texts, ids, finish, sizes = ["", ""], [[], []], [None, None], []
    while engine.has_unfinished_requests():
        for out in engine.step(outputs="delta"):
            for c in out.outputs:
                texts[c.index] += c.text
                ids[c.index] += c.token_ids
                finish[c.index] = c.finish_reason or finish[c.index]
                sizes.append(len(c.token_ids))
    assert ids == [c.token_ids for c in want.outputs] and texts == [c.text for c in want.outputs]
    assert finish == [c.finish_reason for c in want.outputs]
    assert max(sizes) > 1, "no step kept a draft"
    assert_engine_idle(spec_llm)


def test_abort_mid_generation_returns_every_block(spec_llm: LLM, ref_llm: LLM) -> None:
    tokenizer = spec_llm.get_tokenizer()
    prompt = tokenizer.encode(tokenizer.apply_chat_template(HELLO, tokenize=False, add_generation_prompt=True),
                              add_special_tokens=False)
    params = SamplingParams(n=2, max_tokens=48, temperature=0.0)
    want = ref_llm.generate([prompt], params, use_tqdm=False)[0]
    engine = spec_llm.engine
    free_before = engine.scheduler.block_manager.num_free_blocks
    with recording(spec_llm) as record:
        engine.add_request("to-abort", prompt, params)
        for _ in range(6):
            engine.step()
    assert sum(record.accepted.values()) > 0
    assert engine.scheduler.block_manager.num_free_blocks < free_before
    out = engine.abort_request("to-abort")
    assert out.finished and [c.finish_reason for c in out.outputs] == ["abort", "abort"]
    for got, full in zip(out.outputs, want.outputs):
        assert 6 < len(got.token_ids) < 48 and got.token_ids == full.token_ids[:len(got.token_ids)]
    assert engine.scheduler.block_manager.num_free_blocks == free_before
    assert engine.step() == []
    assert_engine_idle(spec_llm)


# =============================================================================================
# 6. Random sampling through the engine


def test_seeded_samples_reproduce_and_equal_those_without_speculation(spec_llm: LLM, ref_llm: LLM) -> None:
    """Seeded requests sample the same tokens with speculation or without (the generator wound
    back past a refused draft's row), run after run and whatever their batch mates."""
    params = SamplingParams(n=2, max_tokens=16, temperature=0.8, seed=1234, logprobs=1)
    with recording(spec_llm) as record:
        first = spec_llm.chat([HELLO, REPEAT, CODE], params, use_tqdm=False)
        again = spec_llm.chat([HELLO, REPEAT, CODE], params, use_tqdm=False)
        alone = spec_llm.chat([REPEAT], params, use_tqdm=False)  # other batch mates
    accepted, drafted = sum(record.accepted.values()), sum(record.drafts.values())
    assert 0 < accepted < drafted, "drafts both kept and refused"
    assert_same_outputs(again, first)
    assert_same_outputs(alone, first[1:2])
    assert_same_outputs(first, ref_llm.chat([HELLO, REPEAT, CODE], params, use_tqdm=False))
    other = spec_llm.chat([HELLO], SamplingParams(n=2, max_tokens=8, temperature=1.5, seed=99), use_tqdm=False)
    assert [c.token_ids for c in other[0].outputs] != [c.token_ids[:8] for c in first[0].outputs]
    assert_engine_idle(spec_llm)


# Tiny random model: the sampled tokens are held to S by a logit bias and top_k=3, so the
# joint law of the first tokens is a 27-cell table computed exactly from the raw logits.
S = (40, 41, 42)
PROMPT = [17, 301, 45, 222, 9, 480, 133, 76, 40, 41, 42, 40, 42, 41, 41, 40, 42]  # every S token, S after it


@pytest.fixture(scope="module")
def tiny_path(tiny_checkpoints: dict[str, str]) -> str:
    return tiny_checkpoints["llama"]


@pytest.fixture(scope="module")
def tiny_ref(tiny_path: str) -> LLM:
    return LLM(tiny_path, num_kv_blocks=256, block_size=4)


@pytest.fixture(scope="module")
def tiny_spec(tiny_path: str) -> LLM:
    return LLM(tiny_path, num_kv_blocks=2048, block_size=4, max_num_seqs=1024, max_num_batched_tokens=4096,
               speculative_config={"method": "ngram", "num_speculative_tokens": 2, "prompt_lookup_min": 1,
                                   "prompt_lookup_max": 2})


def chi2_quantile(df: int, z: float) -> float:
    """Wilson-Hilferty: the chi-square quantile at the normal quantile z (4.26: p = 1e-5)."""
    return df * (1 - 2 / (9 * df) + z * math.sqrt(2 / (9 * df))) ** 3


def test_random_sampling_keeps_the_joint_distribution(tiny_ref: LLM, tiny_spec: LLM) -> None:
    temperature = 1.0
    contexts = [[]] + [[a] for a in S] + [[a, b] for a in S for b in S]
    outs = tiny_ref.generate([PROMPT + c for c in contexts], SamplingParams(max_tokens=1, temperature=0.0, logprobs=512),
                             use_tqdm=False)
    law = {}
    for context, out in zip(contexts, outs):
        raw = out.outputs[0].logprobs[0]
        weights = [math.exp(_lp(raw[s]) / temperature) for s in S]
        law[tuple(context)] = {s: w / sum(weights) for s, w in zip(S, weights)}
    exact = {(a, b, c): law[()][a] * law[(a,)][b] * law[(a, b)][c] for a in S for b in S for c in S}
    assert sum(exact.values()) == pytest.approx(1.0)
    common = dict(max_tokens=4, temperature=temperature, top_k=3, ignore_eos=True, logit_bias={s: 50.0 for s in S})
    n = 1500
    s = tiny_spec.engine.stats
    before = (s.num_draft_tokens, s.num_accepted_tokens)
    outs = tiny_spec.generate([PROMPT, PROMPT], [SamplingParams(n=n, **common), SamplingParams(n=n, seed=7, **common)],
                              use_tqdm=False)
    drafted, accepted = s.num_draft_tokens - before[0], s.num_accepted_tokens - before[1]
    assert drafted > n and 0.1 * drafted < accepted < 0.9 * drafted, (drafted, accepted)  # both ways, often
    for out, kind in zip(outs, ("unseeded", "seeded")):
        counts = collections.Counter(tuple(c.token_ids[:3]) for c in out.outputs)
        assert len(out.outputs) == n and set(counts) <= set(exact), f"{kind}: tokens outside S"
        # Pearson's test over the cells expected 5 times or more, the rest pooled into one.
        big = [k for k, p in exact.items() if n * p >= 5]
        observed = [counts[k] for k in big] + [n - sum(counts[k] for k in big)]
        expected = [n * exact[k] for k in big] + [n - sum(n * exact[k] for k in big)]
        chi2 = sum((o - e) ** 2 / e for o, e in zip(observed, expected) if e > 0)
        df = len(big) - (1 if expected[-1] < 1e-9 else 0)
        assert df >= 8, "too few cells to test"
        assert chi2 < chi2_quantile(df, z=4.26), f"{kind}: chi2 {chi2:.1f} over {df} degrees of freedom"
        for k, p in exact.items():
            assert abs(counts[k] - n * p) <= 5 * math.sqrt(n * p * (1 - p)) + 1, (kind, k, counts[k], n * p)
    assert_engine_idle(tiny_spec)


# Tiny model, greedy: the drafts before a row count as its tokens; disable_by_batch_size.


def test_penalties_and_min_tokens_count_the_drafts_before_a_row(tiny_path: str, tiny_ref: LLM) -> None:
    """Tokens held to S (and EOS) by a logit bias, greedy: which S token wins turns on the
    penalties' counts and EOS on min_tokens, so a drafted row that did not count the drafts
    before it (as tokens of its sequence) would pick differently."""
    llm = LLM(tiny_path, num_kv_blocks=256, block_size=4,
              speculative_config={"method": "ngram", "num_speculative_tokens": 3, "prompt_lookup_min": 1,
                                  "prompt_lookup_max": 3})
    bias = {s: 50.0 for s in S}
    variants = [dict(frequency_penalty=0.5), dict(frequency_penalty=0.3, presence_penalty=0.3),
                dict(repetition_penalty=1.5), dict(presence_penalty=1.0)]
    variants += [dict(min_tokens=m, logit_bias={**bias, 2: 50.0}) for m in (4, 7, 9, 11)]
    prompts = [PROMPT[i:] for i in range(4)]
    all_prompts, all_params = [], []
    for variant in variants:
        params = SamplingParams(max_tokens=24, temperature=0.0, **{"logit_bias": bias, **variant})
        all_prompts += prompts
        all_params += [params] * len(prompts)
    with recording(llm) as record:
        got = llm.generate(all_prompts, all_params, use_tqdm=False)
    assert_same_outputs(got, tiny_ref.generate(all_prompts, all_params, use_tqdm=False))
    assert sum(record.accepted.values()) > 20
    assert any(o.outputs[0].finish_reason == "stop" for o in got), "no EOS: min_tokens proved nothing"
    assert_engine_idle(llm)


def test_disable_by_batch_size_turns_drafts_off_for_big_batches(tiny_path: str, tiny_ref: LLM) -> None:
    llm = LLM(tiny_path, num_kv_blocks=256, block_size=4,
              speculative_config={"method": "ngram", "num_speculative_tokens": 3, "prompt_lookup_min": 1,
                                  "disable_by_batch_size": 3})
    params = SamplingParams(max_tokens=12, temperature=0.0, ignore_eos=True, logit_bias={s: 50.0 for s in S})
    prompts = [PROMPT[i:] for i in range(3)]
    with recording(llm) as record:
        small = llm.generate(prompts[:2], params, use_tqdm=False)
    assert llm.engine.stats.num_drafts > 0 and sum(record.accepted.values()) > 0
    stats = llm.engine.stats
    before = (stats.num_drafts, stats.num_draft_tokens, stats.num_accepted_tokens)
    with recording(llm) as record:
        big = llm.generate(prompts[:3], params, use_tqdm=False)  # three running (the limit), all to the end
    assert [running for running, _ in record.steps[1:]] == [3] * (len(record.steps) - 1)
    assert sum(record.drafts.values()) == 0
    assert (stats.num_drafts, stats.num_draft_tokens, stats.num_accepted_tokens) == before
    assert_same_outputs(small + big, tiny_ref.generate(prompts[:2] + prompts[:3], params, use_tqdm=False))
    assert_engine_idle(llm)


def test_async_scheduling_resumes_where_drafts_are_off(tiny_path: str, tiny_ref: LLM) -> None:
    """With async scheduling, a step that verifies drafts runs alone (its successor's drafts need
    its tokens), and where disable_by_batch_size turns drafts off the steps overlap again: no
    step both has drafts and takes tokens from the step before it; the answers are the engine's
    without speculation."""
    llm = LLM(tiny_path, num_kv_blocks=256, block_size=4, async_scheduling=True,
              speculative_config={"method": "ngram", "num_speculative_tokens": 3, "prompt_lookup_min": 1,
                                  "disable_by_batch_size": 3})
    assert llm.engine.async_scheduling is True
    steps: list[tuple[bool, bool]] = []  # (drafts in the step, launched over the previous step's tokens)
    execute = llm.engine.runner.execute

    def recorded_execute(batch, all_logits_rows=(), previous=None, pooling=False):
        steps.append((bool(batch.spec_token_ids), previous is not None))
        return execute(batch, all_logits_rows, previous, pooling)

    llm.engine.runner.execute = recorded_execute
    params = [SamplingParams(max_tokens=n, temperature=0.0, ignore_eos=True, logit_bias={s: 50.0 for s in S})
              for n in (4, 6, 20, 24)]
    prompts = [PROMPT[i:] for i in range(4)]
    got = llm.generate(prompts, params, use_tqdm=False)
    assert_same_outputs(got, tiny_ref.generate(prompts, params, use_tqdm=False))
    assert (True, True) not in steps, steps
    assert (False, True) in steps and (True, False) in steps, steps  # overlapped while 3+ ran, drafts after
    assert_engine_idle(llm)


@pytest.mark.parametrize("structured", [False, True])
def test_a_step_with_drafts_is_taken_back_before_the_next_one(default_model_dir: str, ref_llm: LLM,
                                                              structured: bool) -> None:
    """A step that verifies drafts and admits the request that turns drafts off (running reaches
    disable_by_batch_size) is taken back before the next step is planned: the next step's
    inputs follow its accepted drafts. (It was left in flight, and the next step read its last
    draft row's token as the pending one; with a structured request beside it too.)"""
    llm = LLM(default_model_dir, kv_cache_memory_bytes=128 << 20, async_scheduling=True,
              speculative_config={"method": "ngram", "num_speculative_tokens": 3, "prompt_lookup_min": 1,
                                  "disable_by_batch_size": 2})
    engine, tokenizer = llm.engine, llm.get_tokenizer()

    def prompt(text: str) -> list[int]:
        return tokenizer.apply_chat_template(user(text), add_generation_prompt=True, return_dict=True)["input_ids"]

    repeat = SamplingParams(temperature=0.0, max_tokens=20)
    hello = SamplingParams(temperature=0.0, max_tokens=6,
                           structured_outputs=StructuredOutputsParams(choice=["yes", "no"]) if structured else None)
    engine.add_request("a", prompt("Repeat: one two three one two three one two three"), repeat)
    outputs: dict[str, list[int]] = {}
    for step in range(200):
        if step == 5:  # joins while "a" verifies drafts
            assert engine.stats.num_drafts > 0
            engine.add_request("b", prompt("Say hello."), hello)
        for output in engine.step("final"):
            outputs[output.request_id] = output.outputs[0].token_ids
        if step >= 5 and not engine.has_unfinished_requests():
            break
    want = ref_llm.generate([{"prompt_token_ids": prompt("Repeat: one two three one two three one two three")},
                             {"prompt_token_ids": prompt("Say hello.")}], [repeat, hello], use_tqdm=False)
    assert [outputs["a"], outputs["b"]] == [o.outputs[0].token_ids for o in want]
    assert_engine_idle(llm)


# =============================================================================================
# 7. Token equality with transformers (greedy, fp32)


@pytest.mark.parametrize("kind", ["llama", "qwen2"])
def test_greedy_matches_transformers_tiny(tiny_checkpoints: dict[str, str], kind: str) -> None:
    path = tiny_checkpoints[kind]
    rng = random.Random(5)
    prompts = [[rng.randrange(3, 500) for _ in range(rng.randint(4, 30))] for _ in range(2)]
    prompts += [[7, 8, 9, 10] * 6, [100, 200] * 10]  # repeats: drafts, some accepted
    expected = hf_greedy(path, prompts, 32)
    llm = LLM(path, num_kv_blocks=64, speculative_config=NGRAM)
    with recording(llm) as record:
        got = llm.generate(prompts, SamplingParams(max_tokens=32, temperature=0.0, ignore_eos=True), use_tqdm=False)
    assert [o.outputs[0].token_ids for o in got] == expected
    assert sum(record.accepted.values()) > 0
    assert_engine_idle(llm)
