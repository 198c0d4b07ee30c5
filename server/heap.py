"""The worker's cyclic garbage collector: what its full collections may walk, and when (the
HTTP process takes only the start-up freeze: its per-connection objects are cyclic).

A full collection walks every tracked object outside the frozen generation, and every element
of every list among them, while the engine loop waits. In the worker that would be:
- the model, the tokenizer and the libraries (~300 k objects with the default model): 120-145
  ms on this project's CPU, every ~200 steps at batch 256;
- under load, the running requests' state: their token lists, timestamps and logprobs. At 256
  sequences of 8k tokens that is 3 M list elements, 22-33 ms, every ~100 steps
  (`python -m benchmarks.host_overhead --prompt-tokens 8192 --gc-freeze`).
Each is a stall of one inter-token gap for every running request, which is what p99 reports.

So the worker keeps the oldest generation nearly empty:
- after start-up, everything alive is frozen, for good (`freeze_startup_heap`);
- every `freeze_every` steps, a young collection (generations 0 and 1: what was allocated
  since; ~10 µs while decoding, longer after a burst of long new prompts) reclaims the cycles
  that died meanwhile, and what survived it is frozen.
Freezing changes nothing for reference counting: a frozen request's objects are freed when it
finishes, as before. Only a reference cycle that dies after it was frozen stays. The engine's
request path makes none (tests/test_heap.py); should a library make some, the worker reclaims
them when it goes idle with `reclaim_growth` more frozen objects than after its last
collection over everything: one full collection then, while no step is waiting.
"""

from __future__ import annotations

import gc
import logging

logger = logging.getLogger("stoke.worker")

FREEZE_EVERY_STEPS = 32
RECLAIM_GROWTH = 10_000


def freeze_startup_heap() -> int:
    """Collect, then move every object alive (the model, the tokenizer, the libraries) out of
    the collector's reach; returns how many were frozen. Called once start-up is done, by the
    worker and by the HTTP process: each lives as long as what it started with, so nothing
    frozen then was meant to be freed."""
    gc.collect()
    gc.freeze()
    return gc.get_freeze_count()


class HeapPacer:
    """The worker's calls: `after_step` after every engine step, `on_idle` before it blocks
    waiting for a command."""

    def __init__(self, freeze_every: int = FREEZE_EVERY_STEPS, reclaim_growth: int = RECLAIM_GROWTH) -> None:
        self.freeze_every = freeze_every
        self.reclaim_growth = reclaim_growth
        self.frozen_baseline = freeze_startup_heap()
        self.reclaims = 0
        self._steps = 0
        self._steps_at_idle = 0

    def after_step(self) -> None:
        self._steps += 1
        if self._steps % self.freeze_every == 0:
            gc.collect(1)
            gc.freeze()

    def on_idle(self) -> None:
        if self._steps == self._steps_at_idle:
            return  # nothing ran since the last check
        self._steps_at_idle = self._steps
        frozen = gc.get_freeze_count()
        if frozen - self.frozen_baseline < self.reclaim_growth:
            return
        gc.unfreeze()
        unreachable = gc.collect()
        self.frozen_baseline = freeze_startup_heap()
        self.reclaims += 1
        logger.info("idle: a full collection over %d frozen objects reclaimed %d unreachable ones",
                    frozen, unreachable)
