"""How layers are grouped over the KV pool (scheduler/kv_cache_groups.py), and what a sequence
takes of it: the admission arithmetic is never less than what the block manager really holds."""

from __future__ import annotations

import random

import pytest

from scheduler import BlockManager, KVCacheGroups, KVCachePlan, Request
from scheduler.request import NULL_BLOCK


def gemma3_windows(num_layers: int, window: int = 1024, pattern: int = 6) -> list[int]:
    """Gemma 3's layers: every `pattern`-th full, the others sliding (transformers' layer_types)."""
    return [0 if (layer + 1) % pattern == 0 else window for layer in range(num_layers)]


def test_gemma3_27b_is_a_full_group_and_six_sliding_ones() -> None:
    groups = KVCacheGroups.of(gemma3_windows(62))
    assert groups.windows == (0, 1024, 1024, 1024, 1024, 1024, 1024)
    assert groups.group_size == 10  # its 10 full layers: 10 KV tensors instead of 62
    assert groups.layers[0] == tuple(range(5, 62, 6))
    assert [len(layers) for layers in groups.layers] == [10, 10, 10, 10, 10, 10, 2]
    places = groups.layer_places()
    assert len(places) == 62 and len(set(places)) == 62, "each layer its own (group, tensor)"
    for layer, (group, slot) in enumerate(places):
        assert groups.layers[group][slot] == layer


@pytest.mark.parametrize("windows, expected", [
    ([0] * 4, ((0,), ((0, 1, 2, 3),))),
    ([6] * 3, ((6,), ((0, 1, 2),))),  # all sliding (Mistral 7B v0.1): one group that gives blocks back
    ([8, 0, 8, 0], ((0, 8), ((1, 3), (0, 2)))),  # Gemma 2: full layers anchor
    ([0, 0, 0, 5], ((0, 0, 0, 5), ((0,), (1,), (2,), (3,)))),  # Qwen2's max_window_layers: groups of one
    ([4, 8, 0, 8, 4, 0], ((0, 4, 8), ((2, 5), (0, 4), (1, 3)))),  # two windows
])
def test_groups_of_equal_size_one_window_each(windows: list[int], expected: tuple) -> None:
    groups = KVCacheGroups.of(windows)
    assert (groups.windows, groups.layers) == expected
    assert KVCacheGroups.of(windows, hybrid=False) == KVCacheGroups((0,), (tuple(range(len(windows))),))


def test_one_full_group_plan_is_the_plain_pool() -> None:
    """A full-attention model's admission arithmetic: every token a block slot, and beam room as
    the prompt's shared full blocks plus each beam's own."""
    plan = KVCachePlan(KVCacheGroups.of([0, 0]), block_size=16, chunk=2048)
    for num_blocks in (1, 7, 64, 1000):
        assert plan.pool_tokens(num_blocks) == num_blocks * 16
    for prompt, width, blocks, caching in [(30, 4, 64, True), (30, 4, 64, False), (100, 1, 10, True),
                                           (5, 8, 3, True), (64, 2, 100, True)]:
        shared = prompt // 16 if caching else 0
        assert plan.beam_room(prompt, width, blocks, caching) == (shared + (blocks - shared) // width) * 16 - prompt


@pytest.mark.parametrize("windows", [(0, 8), (0, 8, 8), (6,), (0, 0, 5), (0, 4, 12)])
@pytest.mark.parametrize("block_size, chunk", [(4, 16), (2, 5), (16, 64)])
def test_pool_tokens_and_beam_room_are_the_largest_that_fit(windows: tuple[int, ...], block_size: int,
                                                            chunk: int) -> None:
    plan = KVCachePlan(KVCacheGroups(windows, tuple((i,) for i in range(len(windows)))), block_size, chunk)
    for num_blocks in (plan.sequence_blocks(1), 10, 40, 200):
        tokens = plan.pool_tokens(num_blocks)
        assert plan.sequence_blocks(tokens) <= num_blocks
        if 0 in windows:  # a full group bounds the sequence
            assert plan.sequence_blocks(tokens + 1) > num_blocks
        decoding = KVCachePlan(plan.groups, block_size, 1)  # a beam decodes a token a step
        for prompt, width in ((3, 2), (block_size * 3, 4), (tokens // 2, 2)):
            room = plan.beam_room(prompt, width, num_blocks, True)
            shared = windows.count(0) * (prompt // block_size)

            def fits(total: int) -> bool:  # the beams parted, and one alone computed a chunk at a time
                return shared + width * (decoding.sequence_blocks(total) - shared) <= num_blocks \
                    and plan.sequence_blocks(total) <= num_blocks

            if room > 0:
                assert fits(prompt + room)
                if 0 in windows:
                    assert not fits(prompt + room + 1)
            else:
                assert not fits(prompt + 1)


def test_beams_are_charged_their_windows_not_a_chunk_each() -> None:
    """Gemma 2's two groups (window 8) in 40 blocks of 4, 32-token chunks: three beams after a
    40-token prompt share its 10 full blocks and hold 3 sliding blocks each as they decode, so
    28 more tokens each fit (kept in every layer, the same bytes hold 12: 20 blocks of twice the
    layers)."""
    plan = KVCachePlan(KVCacheGroups((0, 8), ((1,), (0,))), block_size=4, chunk=32)
    assert plan.beam_room(40, 3, 40, True) == 28
    assert KVCachePlan(KVCacheGroups.of([0, 0]), 4, 32).beam_room(40, 3, 20, True) == 12


@pytest.mark.parametrize("windows", [(0, 8), (0, 8, 8), (6,), (0, 0, 5), (0, 4, 13)])
@pytest.mark.parametrize("block_size", [1, 3, 4])
def test_a_sequence_never_holds_more_than_its_plan(windows: tuple[int, ...], block_size: int) -> None:
    """Prompts computed in chunks of up to `chunk` tokens (prefix hits included), then decodes
    and drafts: the blocks one request holds never exceed what admission counted for it, and a
    sliding group holds its window and its step's tokens, no more."""
    rng = random.Random(hash((windows, block_size)) & 0xFFFF)
    chunk = 9
    plan = KVCachePlan(KVCacheGroups(windows, tuple((i,) for i in range(len(windows)))), block_size, chunk)
    for trial in range(40):
        bm = BlockManager(400, block_size, windows=windows)
        prompt = [rng.randrange(3) for _ in range(rng.randint(1, 60))]
        if trial % 2:  # a cached prefix first
            first = Request("first", prompt[:rng.randint(1, len(prompt))], max_tokens=1)
            assert bm.allocate_slots(first, first.num_tokens)
            first.num_computed_tokens = first.num_tokens
            bm.cache_full_blocks(first)
            bm.free(first)
        request = Request("r", prompt, max_tokens=40)
        total = len(prompt) + 40
        hits = bm.match_prefix(request)
        n = min(request.num_tokens - len(hits) * block_size, chunk)
        assert bm.allocate_slots(request, n, hits)
        request.num_computed_tokens = len(hits) * block_size
        while True:
            held = len(request.held_block_ids())  # at its peak: just allocated
            assert held <= plan.sequence_blocks(total), (held, request.kv_blocks)
            for window, blocks in zip(windows, request.kv_blocks):
                if window:
                    assert sum(b != NULL_BLOCK for b in blocks) <= (window + chunk - 2) // block_size + 2
            request.num_computed_tokens += n
            bm.cache_full_blocks(request)
            if request.num_computed_tokens == total:
                break
            if request.num_computed_tokens == len(request.token_ids):  # a decode's token
                request.token_ids.append(rng.randrange(3))
            n = min(len(request.token_ids) - request.num_computed_tokens, rng.randint(1, chunk))
            drafts = rng.randint(0, min(chunk - n, total - request.num_computed_tokens - n)) if n == 1 else 0
            assert bm.allocate_slots(request, n + drafts)
        bm.free(request)
        assert bm.num_free_blocks == bm.num_blocks
        bm.check_invariants()
