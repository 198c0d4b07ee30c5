"""The runner's persistent block tables equal the tables built from the requests' block ids,
step after step, through growth, preemption (blocks dropped and reallocated) and release."""

from __future__ import annotations

import random

import numpy as np
import pytest

from engine.block_tables import BlockTables
from scheduler import Request
from scheduler.request import NULL_BLOCK


def built_from_lists(requests: list[Request], width: int) -> np.ndarray:
    """What the runner built every step before: each request's first `width` ids, zero-padded."""
    rows = [r.block_ids[:width] + [0] * (width - len(r.block_ids[:width])) for r in requests]
    return np.array(rows, dtype=np.int32).reshape(len(requests), width)


def test_rows_follow_growth_preemption_and_release() -> None:
    tables = BlockTables(max_blocks_per_seq=4, rows=2)
    a, b, c = (Request(name, [1, 2, 3], max_tokens=8) for name in "abc")
    a.block_ids, b.block_ids = [7], [3, 4]
    assert tables.gather([a, b], 2).tolist() == [[7, 0], [3, 4]]
    a.block_ids.append(9)
    assert tables.gather([b, a], 3).tolist() == [[3, 4, 0], [7, 9, 0]]
    # Preempted: its blocks dropped, then others reallocated, as many as before.
    a.block_ids.clear()
    a.num_preemptions += 1
    a.block_ids += [5, 6]
    assert tables.gather([a], 2).tolist() == [[5, 6]]
    # More requests than rows, and wider than the tables were sized for: both grow.
    c.block_ids = [1, 2, 3, 4, 5, 6]
    assert tables.gather([a, b, c], 6).tolist() == [[5, 6, 0, 0, 0, 0], [3, 4, 0, 0, 0, 0], [1, 2, 3, 4, 5, 6]]
    assert len(tables) == 3
    # A released row is zeroed before its next owner, whose blocks are fewer.
    tables.release(c)
    tables.release(c)  # twice is harmless
    d = Request("d", [1], max_tokens=8, kv_blocks=[[8]])
    assert tables.gather([d, b], 6).tolist() == [[8, 0, 0, 0, 0, 0], [3, 4, 0, 0, 0, 0]]
    assert len(tables) == 3  # a, b, d


def test_the_gathered_table_is_a_copy() -> None:
    tables = BlockTables(max_blocks_per_seq=2)
    a = Request("a", [1], max_tokens=4, kv_blocks=[[3]])
    first = tables.gather([a], 2)
    tables.release(a)
    b = Request("b", [1], max_tokens=4, kv_blocks=[[6, 7]])
    tables.gather([b], 2)
    assert first.tolist() == [[3, 0]]


def test_shrinking_without_a_preemption_is_an_error() -> None:
    tables = BlockTables(max_blocks_per_seq=4)
    a = Request("a", [1], max_tokens=4, kv_blocks=[[1, 2]])
    tables.gather([a], 2)
    a.block_ids.pop()
    with pytest.raises(RuntimeError, match="shrank"):
        tables.gather([a], 2)


def test_random_steps_equal_tables_built_from_lists() -> None:
    rng = random.Random(0)
    tables = BlockTables(max_blocks_per_seq=8, rows=4)
    live: list[Request] = []
    serial = 0
    for _ in range(400):
        action = rng.random()
        if action < 0.15 or not live:
            serial += 1
            blocks = [rng.randrange(100) for _ in range(rng.randint(0, 3))]
            live.append(Request(f"r{serial}", [1], max_tokens=64, kv_blocks=[blocks]))
        elif action < 0.25:
            tables.release(live.pop(rng.randrange(len(live))))
        elif action < 0.35:
            r = rng.choice(live)
            r.block_ids.clear()
            r.num_preemptions += 1
            r.block_ids += [rng.randrange(100) for _ in range(rng.randint(0, 4))]
        for r in live:
            if rng.random() < 0.3 and len(r.block_ids) < 12:
                r.block_ids.append(rng.randrange(100))
        batch = rng.sample(live, rng.randint(1, len(live)))  # any subset, in any order
        width = rng.randint(0, max(len(r.block_ids) for r in batch) + 1)
        assert np.array_equal(tables.gather(batch, width), built_from_lists(batch, width))
    for r in live:
        tables.release(r)
    assert len(tables) == 0


def test_a_hybrid_models_rows_hold_a_table_per_group() -> None:
    """A table per KV group, `[groups, sequences, width]`: a hit's sliding blocks before its
    window (NULL_BLOCK) read 0, and a row released or rewritten after a preemption is zeroed in
    every group before its next blocks."""
    tables = BlockTables(max_blocks_per_seq=3, rows=1, num_groups=2)
    a = Request("a", [1], max_tokens=4, kv_blocks=[[5, 6, 9], [NULL_BLOCK, 7, 8]])
    assert tables.gather([a], 3).tolist() == [[[5, 6, 9]], [[0, 7, 8]]]
    a.kv_blocks = [[3], [4]]
    a.num_preemptions += 1
    assert tables.gather([a], 3).tolist() == [[[3, 0, 0]], [[4, 0, 0]]]
    tables.release(a)
    b = Request("b", [1], max_tokens=4, kv_blocks=[[1], [2]])
    assert tables.gather([b], 2).tolist() == [[[1, 0]], [[2, 0]]]
