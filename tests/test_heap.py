"""The worker's collector pacing (server/heap.py): survivors of a young collection are frozen
every few steps, cycles that died first are reclaimed, frozen ones when the worker goes idle;
and the engine's request path makes no reference cycles, which is what makes freezing its
objects safe."""

from __future__ import annotations

import gc
import weakref
from collections.abc import Iterator

import pytest

from engine import LLM, SamplingParams
from server.heap import HeapPacer


class Node:
    """An object in a reference cycle with itself: only the cyclic collector frees it."""

    def __init__(self) -> None:
        self.me = self


@pytest.fixture
def collector() -> Iterator[None]:
    """Leave the process's collector as it was found: enabled, nothing frozen."""
    enabled = gc.isenabled()
    yield
    gc.unfreeze()
    gc.enable() if enabled else gc.disable()


class Leaf:
    """An object outside any cycle: reference counting frees it."""


def test_young_cycles_are_reclaimed_before_survivors_are_frozen(collector: None) -> None:
    # The checks follow particular objects, not the process's freeze count: another thread
    # (tqdm's monitor, in this process) may free frozen objects of its own at any moment.
    gc.disable()  # only the pacer's collections run
    heap = HeapPacer(freeze_every=3, reclaim_growth=10**9)
    assert 0 < gc.get_freeze_count() <= heap.frozen_baseline
    early = Node()
    early_ref = weakref.ref(early)
    heap.after_step()
    heap.after_step()
    del early
    gc.collect()
    assert early_ref() is None, "not frozen before the third step"
    dead, alive, plain = Node(), Node(), Leaf()
    dead_ref, alive_ref, plain_ref = weakref.ref(dead), weakref.ref(alive), weakref.ref(plain)
    del dead
    heap.after_step()
    assert dead_ref() is None, "garbage that died before the freeze was collected, not frozen"
    del alive
    gc.collect()
    assert alive_ref() is not None, "the young collection's survivors were frozen: a full collection skips them"
    del plain
    assert plain_ref() is None, "frozen objects still die by reference counting"


def test_frozen_cycles_are_reclaimed_when_idle_past_the_growth(collector: None) -> None:
    heap = HeapPacer(freeze_every=1, reclaim_growth=500)
    heap.on_idle()
    assert heap.reclaims == 0  # no step ran
    few = [Node() for _ in range(10)]
    refs = [weakref.ref(n) for n in few]
    heap.after_step()  # frozen while alive
    del few
    heap.on_idle()
    assert heap.reclaims == 0 and all(r() is not None for r in refs), "below the growth: left frozen"
    many = [Node() for _ in range(1000)]
    heap.after_step()
    del many
    frozen = gc.get_freeze_count()
    heap.on_idle()
    assert heap.reclaims == 1 and all(r() is None for r in refs)
    assert gc.get_freeze_count() <= heap.frozen_baseline < frozen - 900, "the baseline restarts from the heap left"
    heap.on_idle()
    assert heap.reclaims == 1  # nothing ran since


def test_the_request_path_makes_no_reference_cycles(default_model_dir: str, collector: None) -> None:
    """Every step's objects die by reference counting: requests with logprobs, stop strings,
    penalties, seeds, n > 1, one aborted, under synchronous and asynchronous scheduling."""
    llm = LLM(default_model_dir, kv_cache_memory_bytes=64 << 20)
    engine = llm.engine
    params = [
        SamplingParams(max_tokens=12, temperature=0.0, logprobs=2, prompt_logprobs=1),
        SamplingParams(max_tokens=12, temperature=0.8, seed=3, n=2, stop=[" the", "."]),
        SamplingParams(max_tokens=12, temperature=1.0, top_p=0.9, repetition_penalty=1.2, presence_penalty=0.5),
        SamplingParams(max_tokens=40, temperature=0.0),
    ]
    for async_scheduling in (False, True):
        engine.async_scheduling = async_scheduling
        llm.generate(["warm-up"], SamplingParams(max_tokens=2))
        gc.collect()
        gc.disable()
        for i, p in enumerate(params):
            engine.add_request(f"{async_scheduling}-{i}", "Once upon a time, in a land far away, there", p)
        steps = 0
        while engine.has_unfinished_requests():
            engine.step(outputs="delta")
            steps += 1
            if steps == 4:
                engine.abort_request(f"{async_scheduling}-3")
        assert steps > 4
        assert gc.collect() == 0
        gc.enable()
