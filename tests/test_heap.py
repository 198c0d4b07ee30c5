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


def test_young_cycles_are_reclaimed_before_survivors_are_frozen(collector: None) -> None:
    heap = HeapPacer(freeze_every=3, reclaim_growth=10**9)
    assert heap.frozen_baseline == gc.get_freeze_count() > 0
    dead, alive = Node(), Node()
    dead_ref, alive_ref = weakref.ref(dead), weakref.ref(alive)
    del dead
    frozen = gc.get_freeze_count()
    heap.after_step()
    heap.after_step()
    assert gc.get_freeze_count() == frozen  # not yet: every third step
    heap.after_step()
    assert dead_ref() is None, "garbage that died before the freeze was collected, not frozen"
    assert alive_ref() is alive and gc.get_freeze_count() > frozen
    # Frozen objects still die by reference counting.
    plain = [object()]
    heap.after_step(), heap.after_step(), heap.after_step()
    plain_count = gc.get_freeze_count()
    del plain
    assert gc.get_freeze_count() == plain_count - 1


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
    heap.on_idle()
    assert heap.reclaims == 1 and all(r() is None for r in refs)
    assert heap.frozen_baseline == gc.get_freeze_count()
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
