"""The Triton kernels against their torch references (kernels.reference), and the engine end to
end on the Triton backend.

Without CUDA the kernels run in Triton's interpreter: TRITON_INTERPRET must be set before any
kernel module is imported, so it is set here, at the top, and the kernel modules are imported
lazily by fixtures (importing them at collection would also break the check in
test_kernels_reference that the Triton backend is never imported unless chosen). The
interpreter is slow and wrong for bf16, so the CPU tests use tiny shapes in fp32/fp16 and the
smallest tiles (16), which makes even short contexts span several tiles and splits. The `gpu`
class compiles for real and adds bf16, head dims 64-256 and long contexts.

Head dims that are not powers of two (48, 80, 96 here; Phi-3-mini's 96) run tiled as the next
power of two with the rest of each row masked. Their tests pass q, the caches, the new K/V and
the output as views into rows padded to that width (`guarded`): NaN past each head where the
kernels read (a load past the head poisons the dot: 0 · NaN), a sentinel where they write (a
store past the head shows in it).

Tolerances against the reference run in fp32 on the same (rounded) inputs:
fp32 1e-5 (abs and rel); fp16 3e-3; bf16 (GPU) 2e-2 — about two units in the last place of
the output, which the kernels round once from an fp32 accumulator (plus the probabilities
rounded to the input dtype for the P@V dot, as FlashAttention does).
"""

from __future__ import annotations

import importlib
import os
import random
from types import ModuleType

import torch

CUDA = torch.cuda.is_available()
if not CUDA:
    os.environ["TRITON_INTERPRET"] = "1"

import pytest  # noqa: E402

import kernels  # noqa: E402
from kernels import reference  # noqa: E402
from tests.test_kernels_reference import paged_batch, ragged_lens  # noqa: E402

DEVICE = torch.device("cuda" if CUDA else "cpu")
TOL = {
    torch.float32: dict(atol=1e-5, rtol=1e-5),
    torch.float16: dict(atol=3e-3, rtol=3e-3),
    torch.bfloat16: dict(atol=2e-2, rtol=2e-2),
}


@pytest.fixture(scope="module")
def ops() -> ModuleType:
    return importlib.import_module("kernels.triton_ops")


@pytest.fixture(scope="module")
def norm_rope() -> ModuleType:
    return importlib.import_module("kernels.triton_norm_rope")


# ----------------------------------------------------------------------------- helpers


def to_device(*tensors: torch.Tensor) -> list[torch.Tensor]:
    return [t.to(DEVICE) for t in tensors]


def expected_decode(q, k_cache, v_cache, tables, lens, **attn) -> torch.Tensor:
    """The reference, in fp32 on the same rounded inputs (`attn`: sliding_window, softcap)."""
    return reference.paged_decode_attention(
        q.float(), k_cache.float(), v_cache.float(), tables, lens, SCALE, **attn
    )


def expected_prefill(q, k_cache, v_cache, tables, cu_seqlens, lens, **attn) -> torch.Tensor:
    return reference.paged_prefill_attention(
        q.float(), k_cache.float(), v_cache.float(), tables, cu_seqlens, lens, SCALE, **attn
    )


def stale_to_nan(k_cache: torch.Tensor, v_cache: torch.Tensor, tables: torch.Tensor, lens: list[int]) -> None:
    """Every slot that holds no sequence's token becomes NaN (in place)."""
    block_size = k_cache.shape[1]
    used = torch.zeros(k_cache.shape[:2], dtype=torch.bool)
    for b, n in enumerate(lens):
        for i in range(n):
            used[int(tables[b, i // block_size]), i % block_size] = True
    k_cache[~used] = float("nan")
    v_cache[~used] = float("nan")


def nan_before_window(k_cache: torch.Tensor, v_cache: torch.Tensor, tables: torch.Tensor,
                      first_queries: list[int], window: int) -> torch.Tensor:
    """What an engine may do to the keys no query of a sequence sees through `window` (those
    before its first query's first key, at position `first_queries[b]`): they become NaN (in
    place) and the table entries of blocks holding only such keys point at block 0, all NaN
    (the tables returned), as if the blocks were freed. A kernel that reads one shows it."""
    block_size = k_cache.shape[1]
    tables = tables.clone()
    k_cache[0] = v_cache[0] = float("nan")
    for b, first in enumerate(first_queries):
        unseen = max(0, first - window + 1) if window else 0
        for pos in range(unseen):
            k_cache[int(tables[b, pos // block_size]), pos % block_size] = float("nan")
            v_cache[int(tables[b, pos // block_size]), pos % block_size] = float("nan")
        tables[b, : unseen // block_size] = 0
    return tables


def new_tokens_kv(k_cache: torch.Tensor, v_cache: torch.Tensor, tables: torch.Tensor, lens: list[int],
                  q_lens: list[int], pad_tokens: int = 0, keep: int = 0) -> tuple[torch.Tensor, torch.Tensor]:
    """The new tokens' K/V as the model hands them over: strided `[T, Hkv, D]` views of one
    fused projection row (NaN around them, and in `pad_tokens` rows of no sequence). Their
    cache slots turn NaN (in place), so a kernel that reads them from the cache fails; except
    those of the first `keep` sequences (decodes whose kernel reads the cache)."""
    block_size, num_kv_heads, head_dim = k_cache.shape[1:]
    total, width = sum(q_lens) + pad_tokens, num_kv_heads * head_dim
    row = torch.full((total, 5 * width), float("nan"), dtype=k_cache.dtype)
    key = row[:, width : 2 * width].view(total, num_kv_heads, head_dim)
    value = row[:, 3 * width : 4 * width].view(total, num_kv_heads, head_dim)
    t = 0
    for b, (n, new) in enumerate(zip(lens, q_lens)):
        for pos in range(n - new, n):
            block, slot = int(tables[b, pos // block_size]), pos % block_size
            key[t], value[t] = k_cache[block, slot], v_cache[block, slot]
            if b >= keep:
                k_cache[block, slot] = v_cache[block, slot] = float("nan")
            t += 1
    return key, value


SCALE = 0.3


def guarded(x: torch.Tensor, fill: float = float("nan")) -> torch.Tensor:
    """`x` (last dim D, on its device) as a view into rows padded to the next power of two
    (the kernels' tile width), the padding `fill`: what a kernel reads or writes past a head
    lands there. A power-of-two D: `x` itself."""
    d = x.shape[-1]
    width = 1 << (d - 1).bit_length()
    if width == d:
        return x
    rows = torch.full((*x.shape[:-1], width), fill, dtype=x.dtype, device=x.device)
    rows[..., :d] = x
    return rows[..., :d]


def assert_guard_intact(view: torch.Tensor, fill: float) -> None:
    """The padding of a `guarded` view still holds `fill`: nothing was written past a head."""
    if view._base is None or view._base.shape[-1] == view.shape[-1]:
        return
    tail = view._base[..., view.shape[-1]:].cpu()
    assert torch.equal(tail, torch.full_like(tail, fill)), "written past the head dim"


# ----------------------------------------------------------------------------- store_kv


@pytest.mark.parametrize("slot_dtype", [torch.int32, torch.int64])
@pytest.mark.parametrize("dtype", [torch.float32, torch.float16])
def test_store_kv_matches_reference(ops: ModuleType, slot_dtype: torch.dtype, dtype: torch.dtype) -> None:
    """Padded head dims (48, 80) write each head's D dims, never the cache rows' padding. (Head
    dims in a loop, not parameters: benchmarks/gpu_check.py's smoke counts these tests.)"""
    for head_dim in (16, 48, 80):
        check_store_kv(ops, slot_dtype, dtype, head_dim)


def check_store_kv(ops: ModuleType, slot_dtype: torch.dtype, dtype: torch.dtype, head_dim: int) -> None:
    gen = torch.Generator().manual_seed(1)
    num_blocks, block_size, num_kv_heads, T = 5, 4, 3, 9
    shape = (num_blocks, block_size, num_kv_heads, head_dim)
    k_cache, v_cache = torch.randn(shape, generator=gen).to(dtype), torch.randn(shape, generator=gen).to(dtype)
    slots = torch.randperm(num_blocks * block_size, generator=gen)[:T]
    slots[[0, 4, 8]] = -1
    # key and value as strided views of one fused projection, as the model produces them.
    qkv = torch.randn(T, 5 * num_kv_heads * head_dim, generator=gen).to(dtype)
    HD = num_kv_heads * head_dim
    views = lambda t: (t[:, HD : 2 * HD].view(T, num_kv_heads, head_dim),  # noqa: E731
                       t[:, 3 * HD : 4 * HD].view(T, num_kv_heads, head_dim))
    k_ref, v_ref = k_cache.clone(), v_cache.clone()
    reference.store_kv(*views(qkv), k_ref, v_ref, slots.to(slot_dtype))
    k_cache, v_cache, qkv, slots = to_device(k_cache, v_cache, qkv, slots.to(slot_dtype))
    k_cache, v_cache = guarded(k_cache, 7.0), guarded(v_cache, 7.0)
    ops.store_kv(*views(qkv), k_cache, v_cache, slots)
    assert torch.equal(k_cache.cpu(), k_ref) and torch.equal(v_cache.cpu(), v_ref)
    assert_guard_intact(k_cache, 7.0)
    assert_guard_intact(v_cache, 7.0)


# ----------------------------------------------------------------------------- decode

DECODE_CONFIGS = [  # (query heads per kv head, kv heads, head_dim, block_size, dtype, num_splits)
    (1, 2, 16, 16, torch.float32, 1),  # tiles inside one block
    (3, 2, 32, 4, torch.float32, 3),  # tiles spanning blocks, split-K with an empty split
    (4, 1, 16, 32, torch.float16, 2),
    (8, 1, 32, 8, torch.float16, 1),
    (4, 2, 16, 16, torch.float32, None),  # the automatic choice
    (8, 1, 16, 16, torch.float16, 4),
    # Head dims tiled as the next power of two, the rest masked (Phi-3-mini's 96):
    (3, 2, 48, 4, torch.float32, 3),
    (4, 1, 80, 8, torch.float16, 2),
    (2, 2, 96, 16, torch.float16, 1),
    (1, 2, 80, 16, torch.float32, 1),
]


@pytest.mark.parametrize("group,num_kv_heads,head_dim,block_size,dtype,num_splits", DECODE_CONFIGS)
@pytest.mark.parametrize("seed", range(2))
def test_decode_matches_reference(
    ops: ModuleType, group: int, num_kv_heads: int, head_dim: int, block_size: int,
    dtype: torch.dtype, num_splits: int | None, seed: int,
) -> None:
    gen = torch.Generator().manual_seed(10 * seed + group)
    # Lengths 1, 2 * block_size (exact multiple) and a random one; tables padded with -1 or a
    # foreign block, scattered over a shuffled pool with finite poison in every other slot.
    lens = ragged_lens(gen, 1, block_size, 40)
    k_cache, v_cache, tables, _, _ = paged_batch(
        lens, block_size, num_kv_heads, head_dim, dtype, gen, pad_id=(-1, 5)[seed]
    )
    q = torch.randn(len(lens), num_kv_heads * group, head_dim, generator=gen).to(dtype)
    context_lens = torch.tensor(lens, dtype=torch.int32)
    expected = expected_decode(q, k_cache, v_cache, tables, context_lens)
    q, k_cache, v_cache, tables, context_lens = to_device(q, k_cache, v_cache, tables, context_lens)
    out = ops.paged_decode_attention(guarded(q), guarded(k_cache), guarded(v_cache), tables, context_lens, SCALE,
                                     num_splits=num_splits)
    assert out.shape == q.shape and out.dtype == dtype
    torch.testing.assert_close(out.cpu().float(), expected, **TOL[dtype])


def test_decode_ignores_stale_slots_even_nan(ops: ModuleType) -> None:
    gen = torch.Generator().manual_seed(5)
    lens = [1, 16, 27]
    k_cache, v_cache, tables, _, _ = paged_batch(lens, 8, 2, 16, torch.float32, gen, pad_id=-1)
    q = torch.randn(3, 6, 16, generator=gen)
    context_lens = torch.tensor(lens, dtype=torch.int32)
    expected = expected_decode(q, k_cache, v_cache, tables, context_lens)
    stale_to_nan(k_cache, v_cache, tables, lens)
    for splits in (1, 3):
        out = ops.paged_decode_attention(*to_device(q, k_cache, v_cache, tables, context_lens), SCALE,
                                         num_splits=splits)
        torch.testing.assert_close(out.cpu(), expected, **TOL[torch.float32])


def test_decode_padding_rows_with_no_context_give_zeros(ops: ModuleType) -> None:
    """A CUDA-graph batch pads with rows of context 0: they must not produce NaN."""
    gen = torch.Generator().manual_seed(9)
    k_cache, v_cache, tables, _, _ = paged_batch([20, 1], 16, 1, 16, torch.float32, gen, pad_id=0)
    tables[1] = 0
    q = torch.randn(2, 2, 16, generator=gen)
    lens = torch.tensor([20, 0], dtype=torch.int32)
    expected = expected_decode(q[:1], k_cache, v_cache, tables[:1], lens[:1])
    for splits in (1, 2):
        out = ops.paged_decode_attention(*to_device(q, k_cache, v_cache, tables, lens), SCALE,
                                         num_splits=splits).cpu()
        assert torch.equal(out[1], torch.zeros(2, 16))
        torch.testing.assert_close(out[:1], expected, **TOL[torch.float32])


@pytest.mark.parametrize("head_dim", [16, 48])
@pytest.mark.parametrize("fused_merge", [True, False])
def test_decode_split_merge_in_one_launch_or_two(ops: ModuleType, fused_merge: bool, head_dim: int) -> None:
    """The last split merging the partials (one launch) and the reduction kernel (two) both give
    the reference; the fused merge leaves its arrival counters zero, so the next launch starts
    clean with any split count (and a CUDA graph replays without a memset). A padded head dim's
    partials are rows of D, not of the tile's width."""
    gen = torch.Generator().manual_seed(13)
    lens = [1, 40, 33, 70]
    k_cache, v_cache, tables, _, _ = paged_batch(lens, 8, 2, head_dim, torch.float32, gen, pad_id=-1)
    q = torch.randn(len(lens), 8, head_dim, generator=gen)
    context_lens = torch.tensor(lens, dtype=torch.int32)
    expected = expected_decode(q, k_cache, v_cache, tables, context_lens)
    q, k_cache, v_cache, tables, context_lens = to_device(q, k_cache, v_cache, tables, context_lens)
    for splits in (2, 5, 3):
        out = ops.paged_decode_attention(guarded(q), guarded(k_cache), guarded(v_cache), tables, context_lens, SCALE,
                                         num_splits=splits, fused_merge=fused_merge)
        torch.testing.assert_close(out.cpu(), expected, **TOL[torch.float32])
    counters = ops._COUNTERS.get(out.device, [])
    assert counters or not fused_merge
    assert all(not c.any() for c in counters)


# Sliding windows and Gemma 2's softcap, (sliding_window, softcap): one key; fewer keys than a
# tile (16 here); exactly a tile; a window ending inside a tile; more keys than any context; the
# cap alone. Queries are scaled up (scores up to ~10) so that a cap of 5 changes the weights.
WINDOWS = [(1, 0.0), (5, 5.0), (16, 0.0), (21, 5.0), (1000, 5.0), (0, 5.0)]
BIG_Q = 3.0


@pytest.mark.parametrize("group,num_kv_heads,block_size,dtype,num_splits,fused_merge,head_dim", [
    (1, 1, 16, torch.float32, 1, True, 16),  # unsplit, tiles inside one block
    (3, 2, 4, torch.float32, 3, True, 16),  # tiles spanning blocks, split-K merged by the last split
    (4, 1, 8, torch.float16, 4, False, 16),  # the reduction kernel; a short window leaves splits empty
    (2, 2, 8, torch.float16, 3, True, 80),  # a padded head dim
])
def test_decode_sliding_window_and_softcap_match_reference(
    ops: ModuleType, group: int, num_kv_heads: int, block_size: int, dtype: torch.dtype, num_splits: int,
    fused_merge: bool, head_dim: int,
) -> None:
    """The splits share the window's keys, not the context's: keys before the window are
    never read (they hold NaN here), and splits left with no key merge to nothing."""
    gen = torch.Generator().manual_seed(group)
    lens = [1, 16, 45]
    k_cache, v_cache, tables, _, _ = paged_batch(lens, block_size, num_kv_heads, head_dim, dtype, gen, pad_id=-1)
    q = (BIG_Q * torch.randn(len(lens), num_kv_heads * group, head_dim, generator=gen)).to(dtype)
    context_lens = torch.tensor(lens, dtype=torch.int32)
    for window, softcap in WINDOWS:
        expected = expected_decode(q, k_cache, v_cache, tables, context_lens, sliding_window=window, softcap=softcap)
        caches = k_cache.clone(), v_cache.clone()
        stale_to_nan(*caches, tables, lens)
        freed = nan_before_window(*caches, tables, [n - 1 for n in lens], window)
        args = to_device(q, *caches, freed, context_lens)
        out = ops.paged_decode_attention(*map(guarded, args[:3]), *args[3:], SCALE, sliding_window=window,
                                         softcap=softcap, num_splits=num_splits, fused_merge=fused_merge)
        torch.testing.assert_close(out.cpu().float(), expected, **TOL[dtype], msg=f"window {window} cap {softcap}")


def test_num_splits_heuristic(ops: ModuleType, monkeypatch: pytest.MonkeyPatch) -> None:
    """Split-K only when (sequence, kv head) programs cannot fill the GPU, never below 64
    keys a split; decided from shapes alone."""
    from kernels.tuning import KernelTuning

    monkeypatch.setattr(ops, "_sm_count", lambda index: 132)
    monkeypatch.setattr(ops, "_device_tuning", lambda device: KernelTuning())  # the built-in minimum
    cuda = torch.device("cuda", 0)
    assert ops._num_splits(1, 8, 8192, cuda) == 33  # two waves: 264 programs
    assert ops._num_splits(1, 8, 512, cuda) == 8  # capped by 64-key splits
    assert ops._num_splits(4, 8, 512, cuda) == 8
    assert ops._num_splits(16, 8, 512, cuda) == 3
    assert ops._num_splits(4, 8, 100, cuda) == 1
    assert ops._num_splits(64, 8, 8192, cuda) == 1
    assert ops._num_splits(1, 1, 1 << 20, cuda) == 64
    assert ops._num_splits(1, 8, 8192, torch.device("cpu")) == 1


def test_a_gpus_tuning_replaces_the_built_in_choices(ops: ModuleType, monkeypatch: pytest.MonkeyPatch) -> None:
    """kernels/tuning.py's values, where a GPU has them: the 16-bit prefill tile at head dim
    <= 128, the tiling of power-of-two groups, where the new tokens' K/V are read, the decode
    split minimum; nothing else moves."""
    from kernels.tuning import KernelTuning

    cuda = torch.device("cuda", 0)
    monkeypatch.setattr(ops, "_sm_count", lambda index: 132)
    monkeypatch.setattr(ops, "_device_capability", lambda device: (9, 0))
    monkeypatch.setattr(ops, "_device_tuning", lambda device: KernelTuning())
    assert ops._prefill_config(128, torch.bfloat16, cuda) == (64, 64, 4, 2)
    assert ops._pack_gqa_default(4, cuda) and not ops._pack_gqa_default(3, cuda)
    assert ops._num_splits(1, 8, 512, cuda) == 8
    assert ops._new_kv_default(cuda, 128) == "cache"
    tuned = KernelTuning(prefill_tile=(128, 128, 8, 2), pack_gqa=False, prefill_new_kv="tma", min_split_keys=256)
    monkeypatch.setattr(ops, "_device_tuning", lambda device: tuned)
    assert ops._prefill_config(128, torch.bfloat16, cuda) == ops._prefill_config(64, torch.float16, cuda) == (
        128, 128, 8, 2)
    assert ops._prefill_config(256, torch.bfloat16, cuda) == (64, 32, 8, 2)  # not what was swept
    assert ops._prefill_config(128, torch.float32, cuda) == (32, 16, 8, 2)
    assert not ops._pack_gqa_default(4, cuda) and ops._new_kv_default(cuda, 128) == "tma"
    assert ops._num_splits(1, 8, 512, cuda) == 2
    assert ops._num_splits(1, 8, 512, cuda, min_keys=32) == 16  # the sweep's what-if
    # On the CPU (the interpreter) no tuning is read: the smallest tiles, one split.
    assert ops._prefill_config(128, torch.float16, torch.device("cpu")) == (16, 16, 4, 1)
    assert ops._pack_gqa_default(4, torch.device("cpu")) and ops._num_splits(1, 8, 512, torch.device("cpu")) == 1
    assert ops._new_kv_default(torch.device("cpu"), 128) == "cache"


def test_padded_head_dims_take_the_tiles_of_their_tile_width(ops: ModuleType, monkeypatch: pytest.MonkeyPatch) -> None:
    """A head dim that is not a power of two is sized as its tile (BLOCK_D, the next power of
    two): 96 takes 128's decode and prefill tiles, a tuning's tile (measured at 128) included,
    160 and 192 take 256's (fp32 decode over 8 warps: with 4 its masks spilled); and the
    tensor-descriptor source a tuning may choose becomes the same rows through pointers (a
    descriptor's box is a power of two wide)."""
    from kernels.tuning import KernelTuning

    cuda = torch.device("cuda", 0)
    monkeypatch.setattr(ops, "_device_capability", lambda device: (9, 0))
    for tuning in (KernelTuning(), KernelTuning(prefill_tile=(128, 64, 8, 2), prefill_new_kv="tma")):
        monkeypatch.setattr(ops, "_device_tuning", lambda device, tuning=tuning: tuning)
        for dtype in (torch.bfloat16, torch.float32):
            for padded, tile in ((48, 64), (80, 128), (96, 128), (112, 128), (160, 256), (192, 256)):
                block_n, warps, stages = ops._decode_config(padded, dtype, cuda)
                assert (block_n, stages) == ops._decode_config(tile, dtype, cuda)[::2]
                assert warps == (8 if dtype == torch.float32 else 4) and ops._decode_config(tile, dtype, cuda)[1] == 4
                assert ops._prefill_config(padded, dtype, cuda) == ops._prefill_config(tile, dtype, cuda)
        assert ops._new_kv_default(cuda, 96) == ("rows" if tuning.prefill_new_kv else "cache")
        assert ops._new_kv_default(cuda, 128) == (tuning.prefill_new_kv or "cache")
    assert ops._prefill_config(96, torch.bfloat16, cuda) == (128, 64, 8, 2)  # the tuned tile
    assert {ops._decode_config(d, torch.float16, cuda)[0] for d in range(16, 257, 16)} <= {16, 32, 64}


# ----------------------------------------------------------------------------- prefill

PREFILL_CONFIGS = [  # (query heads per kv head, kv heads, head_dim, block_size, dtype)
    (1, 2, 16, 16, torch.float32),
    (3, 1, 32, 4, torch.float32),
    (4, 1, 16, 32, torch.float16),
    (8, 1, 16, 8, torch.float16),
    # Head dims tiled as the next power of two, the rest masked:
    (2, 2, 48, 8, torch.float32),
    (3, 1, 80, 16, torch.float16),
    (4, 1, 96, 4, torch.float16),
]


@pytest.mark.parametrize("group,num_kv_heads,head_dim,block_size,dtype", PREFILL_CONFIGS)
@pytest.mark.parametrize("prefix", ["none", "cached"])
@pytest.mark.parametrize("pack_gqa", [True, False])
def test_prefill_matches_reference(
    ops: ModuleType, group: int, num_kv_heads: int, head_dim: int, block_size: int,
    dtype: torch.dtype, prefix: str, pack_gqa: bool,
) -> None:
    """Both tilings: query heads packed per kv head (a group of 3 pads its tile rows) or not.
    Padded head dims write each row's D dims into `out`, nothing past them."""
    gen = torch.Generator().manual_seed(group + head_dim + (prefix == "cached"))
    lens = ragged_lens(gen, 1, block_size, 40)
    if prefix == "none":  # whole prompts: several query and key tiles, the diagonal in each
        q_lens = list(lens)
    else:  # one new token after an exact multiple of the block size; 20 new after 17 cached
        # (two query tiles, each with unmasked key tiles before its diagonal); a random suffix
        lens = [2 * block_size, 37, lens[2]]
        q_lens = [1, 20, int(torch.randint(1, lens[2] + 1, (), generator=gen))]
    k_cache, v_cache, tables, _, _ = paged_batch(
        lens, block_size, num_kv_heads, head_dim, dtype, gen, pad_id=-1
    )
    q = torch.randn(sum(q_lens), num_kv_heads * group, head_dim, generator=gen).to(dtype)
    cu_seqlens = torch.tensor([0, *q_lens], dtype=torch.int32).cumsum(0, dtype=torch.int32)
    context_lens = torch.tensor(lens, dtype=torch.int32)
    expected = expected_prefill(q, k_cache, v_cache, tables, cu_seqlens, context_lens)
    q, k_cache, v_cache, tables, cu_seqlens, context_lens = to_device(q, k_cache, v_cache, tables, cu_seqlens,
                                                                      context_lens)
    into = guarded(torch.zeros_like(q), 7.0) if head_dim & (head_dim - 1) else None
    out = ops.paged_prefill_attention(guarded(q), guarded(k_cache), guarded(v_cache), tables, cu_seqlens,
                                      context_lens, SCALE, pack_gqa=pack_gqa, out=into)
    assert out.shape == q.shape and out.dtype == dtype
    torch.testing.assert_close(out.cpu().float(), expected, **TOL[dtype])
    if into is not None:
        assert out is into
        assert_guard_intact(out, 7.0)


@pytest.mark.parametrize("pack_gqa", [True, False])
@pytest.mark.parametrize("dtype", [torch.float32, torch.float16])
def test_prefill_through_tensor_descriptors(ops: ModuleType, pack_gqa: bool, dtype: torch.dtype) -> None:
    """`cache_tma=True` (K/V tiles loaded whole through tensor descriptors, where blocks hold whole
    tiles) equals the reference: prompts, a chunk after a cached prefix, a decode; NaN in stale
    slots past each context is masked out of the scores and zeroed out of the values."""
    gen = torch.Generator().manual_seed(21)
    lens, q_lens = [45, 70, 33, 1], [45, 20, 1, 1]
    k_cache, v_cache, tables, _, _ = paged_batch(lens, 32, 2, 16, dtype, gen, pad_id=0)
    q = torch.randn(sum(q_lens), 8, 16, generator=gen).to(dtype)
    cu = torch.tensor([0, *q_lens], dtype=torch.int32).cumsum(0, dtype=torch.int32)
    context_lens = torch.tensor(lens, dtype=torch.int32)
    expected = expected_prefill(q, k_cache, v_cache, tables, cu, context_lens)
    stale_to_nan(k_cache, v_cache, tables, lens)
    out = ops.paged_prefill_attention(*to_device(q, k_cache, v_cache, tables, cu, context_lens), SCALE,
                                      pack_gqa=pack_gqa, cache_tma=True)
    torch.testing.assert_close(out.cpu().float(), expected, **TOL[dtype])
    with pytest.raises(ValueError, match="cache_tma"):
        small = paged_batch([5], 8, 2, 16, dtype, gen, pad_id=0)
        ops.paged_prefill_attention(q[:5], small[0], small[1], small[2], torch.tensor([0, 5], dtype=torch.int32),
                                    torch.tensor([5], dtype=torch.int32), SCALE, cache_tma=True)


@pytest.mark.parametrize("new_kv", ["rows", "tma"])
@pytest.mark.parametrize("dtype,block_size,pack_gqa", [
    (torch.float32, 16, True), (torch.float16, 8, True), (torch.float16, 32, False), (torch.float32, 8, False),
])
def test_prefill_reads_new_tokens_from_key_value(
    ops: ModuleType, dtype: torch.dtype, block_size: int, pack_gqa: bool, new_kv: str
) -> None:
    """`new_kv` rows: the new keys come from the step's own K/V (`key`/`value`) and the cached
    prefix through the block table: a whole prompt, prefixes ending on a block boundary and
    inside a tile, a decode, a one-token prompt. The new tokens' cache slots and stale slots
    hold NaN, so reading either shows. `tma`: the same rows through tensor descriptors over
    strided views (with `cache_tma` too where blocks hold whole tiles)."""
    gen = torch.Generator().manual_seed(block_size + len(new_kv))
    lens, q_lens = [45, 2 * block_size + 20, 37, 33, 1], [45, 20, 20, 1, 1]
    k_cache, v_cache, tables, _, _ = paged_batch(lens, block_size, 2, 16, dtype, gen, pad_id=0)
    q = torch.randn(sum(q_lens), 8, 16, generator=gen).to(dtype)
    cu = torch.tensor([0, *q_lens], dtype=torch.int32).cumsum(0, dtype=torch.int32)
    context_lens = torch.tensor(lens, dtype=torch.int32)
    expected = expected_prefill(q, k_cache, v_cache, tables, cu, context_lens)
    stale_to_nan(k_cache, v_cache, tables, lens)
    key, value = new_tokens_kv(k_cache, v_cache, tables, lens, q_lens)
    out = ops.paged_prefill_attention(*to_device(q, k_cache, v_cache, tables, cu, context_lens), SCALE,
                                      key=key.to(DEVICE), value=value.to(DEVICE), new_kv=new_kv, pack_gqa=pack_gqa,
                                      cache_tma=new_kv == "tma" and block_size >= 16)
    torch.testing.assert_close(out.cpu().float(), expected, **TOL[dtype])


@pytest.mark.parametrize("head_dim,dtype,block_size,pack_gqa", [
    (48, torch.float32, 16, True), (80, torch.float16, 8, False), (96, torch.float16, 32, True),
])
def test_prefill_with_a_padded_head_dim_reads_new_tokens_through_pointers(
    ops: ModuleType, head_dim: int, dtype: torch.dtype, block_size: int, pack_gqa: bool
) -> None:
    """A head dim that is not a power of two: the new tokens' K/V from their rows (strided views
    of one projection, NaN between them) by masked pointer loads; the tensor-descriptor sources
    (whose boxes are powers of two) are refused before any launch."""
    gen = torch.Generator().manual_seed(head_dim)
    lens, q_lens = [45, 2 * block_size + 20, 33, 1], [45, 20, 1, 1]
    k_cache, v_cache, tables, _, _ = paged_batch(lens, block_size, 2, head_dim, dtype, gen, pad_id=0)
    q = torch.randn(sum(q_lens), 8, head_dim, generator=gen).to(dtype)
    cu = torch.tensor([0, *q_lens], dtype=torch.int32).cumsum(0, dtype=torch.int32)
    context_lens = torch.tensor(lens, dtype=torch.int32)
    expected = expected_prefill(q, k_cache, v_cache, tables, cu, context_lens)
    stale_to_nan(k_cache, v_cache, tables, lens)
    key, value = to_device(*new_tokens_kv(k_cache, v_cache, tables, lens, q_lens))
    q, k_cache, v_cache, tables, cu, context_lens = to_device(q, k_cache, v_cache, tables, cu, context_lens)
    args = (guarded(q), guarded(k_cache), guarded(v_cache), tables, cu, context_lens, SCALE)
    into = guarded(torch.zeros_like(q), 7.0)
    out = ops.paged_prefill_attention(*args, key=key, value=value, new_kv="rows", pack_gqa=pack_gqa, out=into)
    torch.testing.assert_close(out.cpu().float(), expected, **TOL[dtype])
    assert_guard_intact(into, 7.0)
    for tma in (dict(new_kv="tma"), dict(new_kv="rows", cache_tma=True)):
        with pytest.raises(ValueError, match="powers of two; head_dim"):
            ops.paged_prefill_attention(*args, key=key, value=value, **tma)


@pytest.mark.parametrize("group,num_kv_heads,block_size,dtype,pack_gqa,new_kv,head_dim", [
    (1, 2, 16, torch.float32, True, "cache", 16),
    (3, 1, 4, torch.float32, False, "cache", 16),  # one query head per program; tiles spanning blocks
    (4, 1, 8, torch.float16, True, "rows", 16),  # packed query heads; the new keys from the step's K/V
    (2, 1, 32, torch.float32, True, "tma", 16),  # tensor descriptors, for the cache too
    (2, 2, 8, torch.float16, True, "rows", 48),  # padded head dims
    (3, 1, 16, torch.float32, False, "cache", 80),
])
def test_prefill_sliding_window_and_softcap_match_reference(
    ops: ModuleType, group: int, num_kv_heads: int, block_size: int, dtype: torch.dtype, pack_gqa: bool,
    new_kv: str, head_dim: int,
) -> None:
    """A whole prompt (three query tiles), a chunk after a cached prefix that ends inside a
    tile, a decode, a one-token prompt: each query tile starts at the first key one of its
    queries sees (the keys before hold NaN) and masks the rest of its window."""
    gen = torch.Generator().manual_seed(block_size + group)
    lens, q_lens = [34, 37, 33, 1], [34, 20, 1, 1]
    k_cache, v_cache, tables, _, _ = paged_batch(lens, block_size, num_kv_heads, head_dim, dtype, gen, pad_id=0)
    q = (BIG_Q * torch.randn(sum(q_lens), num_kv_heads * group, head_dim, generator=gen)).to(dtype)
    cu = torch.tensor([0, *q_lens], dtype=torch.int32).cumsum(0, dtype=torch.int32)
    context_lens = torch.tensor(lens, dtype=torch.int32)
    for window, softcap in WINDOWS:
        attn = dict(sliding_window=window, softcap=softcap)
        expected = expected_prefill(q, k_cache, v_cache, tables, cu, context_lens, **attn)
        caches = k_cache.clone(), v_cache.clone()
        stale_to_nan(*caches, tables, lens)
        kv = {}
        if new_kv != "cache":
            kv = dict(zip(("key", "value"), to_device(*new_tokens_kv(*caches, tables, lens, q_lens))), new_kv=new_kv)
        freed = nan_before_window(*caches, tables, [n - new for n, new in zip(lens, q_lens)], window)
        args = to_device(q, *caches, freed, cu, context_lens)
        into = guarded(torch.zeros_like(args[0]), 7.0)
        out = ops.paged_prefill_attention(*map(guarded, args[:3]), *args[3:], SCALE, **attn, **kv, pack_gqa=pack_gqa,
                                          cache_tma=new_kv == "tma", out=into)
        torch.testing.assert_close(out.cpu().float(), expected, **TOL[dtype], msg=f"window {window} cap {softcap}")
        assert_guard_intact(into, 7.0)


def test_inputs_the_kernels_would_get_wrong_are_refused(ops: ModuleType) -> None:
    """Layouts and values no kernel computes right are errors before any launch: caches whose
    blocks are not back to back for store_kv (it wrote the other cache's memory), an `out`
    whose head_dim is strided (written as contiguous), a scale <= 0 (NaN from -inf * 0), a
    negative window, a negative or non-finite softcap, a head dim the kernels don't take (not a
    multiple of 16, or past 256 and not a power of two)."""
    gen = torch.Generator().manual_seed(3)
    pool = torch.zeros(3, 2, 4, 1, 16, device=DEVICE)  # [blocks, k/v, block_size, heads, dim]
    key = torch.randn(2, 1, 16, generator=gen).to(DEVICE)
    with pytest.raises(ValueError, match="back to back"):
        ops.store_kv(key, key, pool[:, 0], pool[:, 1], torch.tensor([5, 9], dtype=torch.int32, device=DEVICE))
    assert not pool.any()
    k_cache, v_cache, tables, _, _ = paged_batch([5, 20], 16, 1, 16, torch.float32, gen, pad_id=0)
    q = torch.randn(2, 2, 16, generator=gen)
    context_lens = torch.tensor([5, 20], dtype=torch.int32)
    args = to_device(q, k_cache, v_cache, tables, context_lens)
    cu = torch.tensor([0, 1, 2], dtype=torch.int32, device=DEVICE)
    for scale in (0.0, -0.25, float("nan")):
        with pytest.raises(ValueError, match="scale must be > 0"):
            ops.paged_decode_attention(*args, scale)
        with pytest.raises(ValueError, match="scale must be > 0"):
            ops.paged_prefill_attention(*args[:3], args[3], cu, args[4], scale)
    for bad in (dict(sliding_window=-1), dict(softcap=-1.0), dict(softcap=float("inf")), dict(softcap=float("nan"))):
        with pytest.raises(ValueError, match="sliding_window must be|softcap must be"):
            ops.paged_decode_attention(*args, SCALE, **bad)
        with pytest.raises(ValueError, match="sliding_window must be|softcap must be"):
            ops.paged_prefill_attention(*args[:3], args[3], cu, args[4], SCALE, **bad)
    strided = torch.zeros(16, 2, 2, device=DEVICE).permute(2, 1, 0)
    with pytest.raises(ValueError, match="head_dim contiguous"):
        ops.paged_prefill_attention(*args[:3], args[3], cu, args[4], SCALE, out=strided)
    counts = torch.tensor([2, 1], dtype=torch.int32, device=DEVICE)
    with pytest.raises(ValueError, match="head_dim contiguous"):
        ops.paged_decode_attention_graphed(*args, SCALE, counts, strided)
    for head_dim in (8, 72, 272):
        cache = torch.zeros(2, 4, 1, head_dim, device=DEVICE)
        with pytest.raises(ValueError, match=f"multiple of 16 from 16 to 256 or a larger power of two, got {head_dim}"):
            ops.paged_decode_attention(torch.zeros(1, 1, head_dim, device=DEVICE), cache, cache, args[3][:1],
                                       args[4][:1], SCALE)
        with pytest.raises(ValueError, match="multiple of 16"):
            ops.store_kv(cache[0], cache[0], cache, cache, torch.zeros(2, dtype=torch.int32, device=DEVICE))


def test_prefill_key_value_errors(ops: ModuleType) -> None:
    gen = torch.Generator().manual_seed(2)
    k_cache, v_cache, tables, _, _ = paged_batch([5], 8, 2, 16, torch.float32, gen, pad_id=0)
    q = torch.randn(5, 4, 16, generator=gen)
    args = to_device(q, k_cache, v_cache, tables, torch.tensor([0, 5], dtype=torch.int32),
                     torch.tensor([5], dtype=torch.int32))
    key = torch.randn(5, 2, 16, generator=gen).to(DEVICE)
    with pytest.raises(ValueError, match="come together"):
        ops.paged_prefill_attention(*args, SCALE, key=key)
    with pytest.raises(ValueError, match="one row per query token"):
        ops.paged_prefill_attention(*args, SCALE, key=key[:4], value=key[:4])
    with pytest.raises(ValueError, match="pass them"):
        ops.paged_prefill_attention(*args, SCALE, new_kv="rows")
    with pytest.raises(ValueError, match="new_kv must be one of"):
        ops.paged_prefill_attention(*args, SCALE, key=key, value=key, new_kv="fresh")
    # Rows at an odd float offset are not 16-byte aligned: no tensor descriptor.
    odd = torch.randn(5 * 33 + 1, device=DEVICE)[1:].view(5, 33)[:, :32].view(5, 2, 16)
    with pytest.raises(ValueError, match="16-byte aligned"):
        ops.paged_prefill_attention(*args, SCALE, key=odd, value=odd, new_kv="tma")
    # Unless told, key and value are read where this GPU's tuning says: the cache on the CPU.
    poisoned = torch.full_like(key, float("nan"))
    want = ops.paged_prefill_attention(*args, SCALE)
    assert torch.equal(ops.paged_prefill_attention(*args, SCALE, key=poisoned, value=poisoned), want)


def check_padded_mixed_step(ops: ModuleType, group: int, head_dim: int, block_size: int, dtype: torch.dtype,
                            lens: list[int], q_lens: list[int], num_decodes: int, fresh: bool = False,
                            graphed_splits: int | None = None, mixed: bool = False, **attn) -> None:
    """What a mixed CUDA graph launches: decodes (one new token) and chunks in one call, then
    sequences with no new token and tokens of no sequence up to the captured sizes. The real
    rows equal decode + prefill on their parts. `fresh`: the new tokens' K/V passed as the
    engine passes them (and only there: their cache slots hold NaN). `graphed_splits`: the
    decodes go to `paged_decode_attention_graphed` (split that many ways, counts on the
    device) and the prefill kernel skips them, both writing one output; the padding tokens'
    rows stay as they were; `mixed`: the same by `paged_mixed_attention_graphed`. `attn`: a
    sliding window (the keys before it NaN, their blocks as if freed) and a softcap (queries
    scaled up so that it bites)."""
    gen = torch.Generator().manual_seed(12 + group + head_dim)
    k_cache, v_cache, tables, _, _ = paged_batch(lens, block_size, 2, head_dim, dtype, gen, pad_id=-1)
    n = sum(q_lens)
    q = torch.randn(n, 2 * group, head_dim, generator=gen)
    q = (BIG_Q * q if attn.get("softcap") else q).to(dtype)
    context_lens = torch.tensor(lens, dtype=torch.int32)
    nd = num_decodes
    cu_chunks = torch.tensor([0, *q_lens[nd:]], dtype=torch.int32).cumsum(0, dtype=torch.int32)
    want = torch.cat([
        expected_decode(q[:nd], k_cache, v_cache, tables[:nd], context_lens[:nd], **attn),
        expected_prefill(q[nd:], k_cache, v_cache, tables[nd:], cu_chunks, context_lens[nd:], **attn),
    ])
    stale_to_nan(k_cache, v_cache, tables, lens)
    pad_seqs, pad_tokens = 3, 19
    kv = {}
    if fresh:
        keep = nd if graphed_splits is not None else 0
        kv = dict(zip(("key", "value"), to_device(*new_tokens_kv(k_cache, v_cache, tables, lens, q_lens, pad_tokens,
                                                                 keep))), new_kv="rows")
    if attn.get("sliding_window"):
        tables = nan_before_window(k_cache, v_cache, tables, [n - new for n, new in zip(lens, q_lens)],
                                   attn["sliding_window"])
    cu = torch.tensor([0, *q_lens] + [0] * pad_seqs, dtype=torch.int32).cumsum(0, dtype=torch.int32)
    padded_q = torch.cat([q, torch.full((pad_tokens, *q.shape[1:]), float("nan"), dtype=dtype)])
    padded_tables = torch.cat([tables, torch.zeros((pad_seqs, tables.shape[1]), dtype=tables.dtype)])
    padded_lens = torch.cat([context_lens, torch.zeros(pad_seqs, dtype=torch.int32)])
    args = to_device(padded_q, k_cache, v_cache, padded_tables, cu, padded_lens)
    args = [*map(guarded, args[:3]), *args[3:]]  # a padded head dim: NaN past each head
    if graphed_splits is None:
        out = ops.paged_prefill_attention(*args, SCALE, **kv, **attn).cpu()
    elif mixed:
        assert not fresh, "the mixed call reads the new tokens where this GPU's tuning says: the cache here"
        counts = torch.tensor([nd, graphed_splits], dtype=torch.int32, device=DEVICE)
        out = ops.paged_mixed_attention_graphed(*args, SCALE, counts, **attn).cpu()
    else:
        counts = torch.tensor([nd, graphed_splits], dtype=torch.int32, device=DEVICE)
        out = guarded(torch.full(args[0].shape, 7.0, dtype=dtype, device=DEVICE), 7.0)
        ops.paged_prefill_attention(*args, SCALE, **kv, **attn, skip_sequences=counts, out=out)
        assert torch.equal(out[:nd].cpu(), torch.full_like(out[:nd].cpu(), 7.0)), "the decodes' rows are skipped"
        ops.paged_decode_attention_graphed(args[0], *args[1:4], args[5], SCALE, counts, out, **attn)
        assert_guard_intact(out, 7.0)
        out = out.cpu()
        assert torch.equal(out[n:], torch.full_like(out[n:], 7.0))
    torch.testing.assert_close(out[:n].float(), want, **TOL[dtype])


@pytest.mark.parametrize("group,fresh,head_dim", [(1, False, 16), (4, False, 16), (4, True, 16), (2, True, 48)])
def test_prefill_of_a_padded_mixed_step(ops: ModuleType, group: int, fresh: bool, head_dim: int) -> None:
    # three decodes, a cached prefix, a whole prompt
    check_padded_mixed_step(ops, group, head_dim, 8, torch.float32, [9, 33, 1, 40, 21], [1, 1, 1, 23, 21], 3, fresh)


@pytest.mark.parametrize("group,splits,fresh,head_dim", [
    (1, 1, False, 16), (4, 3, False, 16), (4, 16, True, 16), (2, 5, False, 16),
    (2, 5, True, 48), (4, 3, False, 80), (1, 1, False, 96),  # padded head dims
])
def test_graphed_decodes_beside_a_prefill_that_skips_them(ops: ModuleType, group: int, splits: int,
                                                          fresh: bool, head_dim: int) -> None:
    # three decodes (one of context 1, so most of its splits are empty), a cached prefix, a prompt
    check_padded_mixed_step(ops, group, head_dim, 8, torch.float32, [9, 33, 1, 40, 21], [1, 1, 1, 23, 21], 3, fresh,
                            graphed_splits=splits)


@pytest.mark.parametrize("splits,fresh,mixed,window,softcap,head_dim", [
    (1, False, False, 0, 5.0, 16),  # the padded step through prefill alone
    (3, True, False, 5, 5.0, 16),  # graphed decodes beside a prefill reading the new K/V from their rows
    (16, False, True, 21, 0.0, 16),  # paged_mixed_attention_graphed: most splits empty
    (3, True, False, 5, 5.0, 48), (16, False, True, 21, 0.0, 80),  # padded head dims
])
def test_mixed_step_with_sliding_window_and_softcap(ops: ModuleType, splits: int, fresh: bool, mixed: bool,
                                                    window: int, softcap: float, head_dim: int) -> None:
    lens, q_lens = [9, 33, 1, 40, 21], [1, 1, 1, 23, 21]
    check_padded_mixed_step(ops, 2, head_dim, 8, torch.float32, lens, q_lens, 3, fresh,
                            graphed_splits=None if splits == 1 and not mixed else splits, mixed=mixed,
                            sliding_window=window, softcap=softcap)


@pytest.mark.parametrize("head_dim,dtype", [(16, torch.float16), (48, torch.float16), (80, torch.float32)])
def test_graphed_decode_counts_come_from_the_device(ops: ModuleType, head_dim: int, dtype: torch.dtype) -> None:
    """One launch shape, any step: the decode count and the split count are read from the
    tensor at run time (0 decodes: nothing written), and repeated launches find the merge's
    arrival counters zero. Padded head dims: nothing written past a head (fp16 merges a kv
    head's query heads at once, fp32 one at a time)."""
    gen = torch.Generator().manual_seed(21)
    lens = [17, 40, 3, 29]
    k_cache, v_cache, tables, _, _ = paged_batch(lens, 8, 2, head_dim, dtype, gen, pad_id=-1)
    q = torch.randn(len(lens), 8, head_dim, generator=gen).to(dtype)
    context_lens = torch.tensor(lens, dtype=torch.int32)
    want = expected_decode(q, k_cache, v_cache, tables, context_lens)
    args = to_device(q, k_cache, v_cache, tables, context_lens)
    args = [*map(guarded, args[:3]), *args[3:]]
    counts = torch.zeros(2, dtype=torch.int32, device=DEVICE)
    for nd, splits in ((0, 4), (2, 4), (4, 1), (3, 7), (4, 16)):
        counts.copy_(torch.tensor([nd, splits]))
        into = guarded(torch.zeros(q.shape, dtype=dtype, device=DEVICE), 7.0)
        out = ops.paged_decode_attention_graphed(*args, SCALE, counts, into)
        assert_guard_intact(into, 7.0)
        out = out.cpu()
        torch.testing.assert_close(out[:nd].float(), want[:nd], **TOL[dtype])
        assert not out[nd:].any()
    assert all(not c.any() for c in ops._COUNTERS.get(args[0].device, []))
    assert ops.graphed_decode_splits(0, 8, 4096, DEVICE) == 1
    assert ops.graphed_decode_splits(3, 8, 4096, torch.device("cpu")) == 1  # no split on the CPU
    with pytest.raises(ValueError, match="out must be"):
        ops.paged_decode_attention_graphed(*args, SCALE, counts, torch.zeros(4, 8, head_dim, dtype=torch.float64))


def test_prefill_ignores_stale_slots_and_equals_decode(ops: ModuleType) -> None:
    """One query per sequence: prefill and decode agree, NaN in stale slots changes nothing."""
    gen = torch.Generator().manual_seed(6)
    lens = [1, 24, 33]
    k_cache, v_cache, tables, _, _ = paged_batch(lens, 8, 1, 16, torch.float32, gen, pad_id=-1)
    q = torch.randn(3, 4, 16, generator=gen)
    context_lens = torch.tensor(lens, dtype=torch.int32)
    expected = expected_decode(q, k_cache, v_cache, tables, context_lens)
    stale_to_nan(k_cache, v_cache, tables, lens)
    cu_seqlens = torch.arange(4, dtype=torch.int32)
    out = ops.paged_prefill_attention(
        *to_device(q, k_cache, v_cache, tables, cu_seqlens, context_lens), SCALE
    )
    torch.testing.assert_close(out.cpu(), expected, **TOL[torch.float32])


def test_empty_inputs(ops: ModuleType) -> None:
    k_cache = torch.zeros(2, 16, 1, 16, device=DEVICE)
    tables = torch.zeros(0, 1, dtype=torch.int32, device=DEVICE)
    lens = torch.zeros(0, dtype=torch.int32, device=DEVICE)
    q = torch.zeros(0, 2, 16, device=DEVICE)
    assert ops.paged_decode_attention(q, k_cache, k_cache, tables, lens, 1.0).shape == (0, 2, 16)
    cu = torch.zeros(1, dtype=torch.int32, device=DEVICE)
    assert ops.paged_prefill_attention(q, k_cache, k_cache, tables, cu, lens, 1.0).shape == (0, 2, 16)
    ops.store_kv(q[:, :1], q[:, :1], k_cache, k_cache, torch.zeros(0, dtype=torch.long, device=DEVICE))


# ----------------------------------------------------------------------------- norm and rope


@pytest.mark.parametrize("dtype", [torch.float32, torch.float16])
@pytest.mark.parametrize("with_residual", [False, True])
def test_rms_norm_matches_reference(norm_rope: ModuleType, dtype: torch.dtype, with_residual: bool) -> None:
    gen = torch.Generator().manual_seed(2)
    x = torch.randn(5, 96, generator=gen).to(dtype)  # a hidden size that is not a power of two
    residual = torch.randn(5, 96, generator=gen).to(dtype) if with_residual else None
    weight = (1 + 0.2 * torch.randn(96, generator=gen)).to(dtype)
    expected = reference.rms_norm(x, weight, 1e-6, residual)
    got = norm_rope.rms_norm(*to_device(x, weight), 1e-6, residual.to(DEVICE) if with_residual else None)
    if with_residual:
        (out, new_residual), (expected, expected_residual) = got, expected
        assert torch.equal(new_residual.cpu(), expected_residual)
    else:
        out = got
    assert out.dtype == expected.dtype and out.shape == x.shape
    torch.testing.assert_close(out.cpu(), expected, **TOL[dtype])


@pytest.mark.parametrize("with_residual", [False, True])
def test_rms_norm_with_an_fp32_weight_rounds_once(norm_rope: ModuleType, with_residual: bool) -> None:
    """Gemma's norm (its 1 + w kept in fp32) on fp16 rows: the product in fp32, one rounding,
    the output in the rows' dtype, as kernels.reference computes it."""
    gen = torch.Generator().manual_seed(4)
    x = torch.randn(5, 96, generator=gen).to(torch.float16)
    residual = torch.randn(5, 96, generator=gen).to(torch.float16) if with_residual else None
    weight = 1 + 3 * torch.randn(96, generator=gen)
    expected = reference.rms_norm(x, weight, 1e-6, residual)
    got = norm_rope.rms_norm(*to_device(x, weight), 1e-6, residual.to(DEVICE) if with_residual else None)
    out = got[0] if with_residual else got
    expected = expected[0] if with_residual else expected
    h = (x + residual if with_residual else x).float()
    assert torch.equal(expected, (h * torch.rsqrt(h.pow(2).mean(-1, keepdim=True) + 1e-6) * weight).half())
    assert out.dtype == torch.float16
    torch.testing.assert_close(out.cpu(), expected, atol=2e-3, rtol=1e-3)


@pytest.mark.parametrize("dtype", [torch.float32, torch.float16])
def test_rms_norm_on_heads_of_a_fused_projection(norm_rope: ModuleType, dtype: torch.dtype) -> None:
    """Qwen3's q/k norm: per head over head_dim, on a strided view of the qkv output."""
    gen = torch.Generator().manual_seed(3)
    T, H, D = 4, 3, 32
    qkv = torch.randn(T, 2 * H * D + 8, generator=gen).to(dtype)
    weight = torch.randn(D, generator=gen).to(dtype)
    expected = reference.rms_norm(qkv[:, : H * D].view(T, H, D), weight, 1e-5)
    out = norm_rope.rms_norm(qkv.to(DEVICE)[:, : H * D].view(T, H, D), weight.to(DEVICE), 1e-5)
    torch.testing.assert_close(out.cpu(), expected, **TOL[dtype])


def rope_tables(head_dim: int, max_pos: int) -> tuple[torch.Tensor, torch.Tensor]:
    inv_freq = 1.0 / (10000 ** (torch.arange(0, head_dim, 2).float() / head_dim))
    freqs = torch.outer(torch.arange(max_pos, dtype=torch.float32), inv_freq)
    return freqs.cos(), freqs.sin()


# (head_dim, rotary_dim): every dim rotated (16, 24: not a power of two), Phi-4-mini's leading
# 3/4 (R/2 = 24, 48: masked tiles), half, one pair.
ROTARY_DIMS = [(16, 16), (24, 24), (64, 48), (128, 96), (64, 32), (32, 2)]


@pytest.mark.parametrize("dtype", [torch.float32, torch.float16])
@pytest.mark.parametrize("head_dim,rotary_dim", ROTARY_DIMS)
def test_rotary_matches_reference_in_place(norm_rope: ModuleType, dtype: torch.dtype, head_dim: int,
                                           rotary_dim: int) -> None:
    """On q/k views of one qkv tensor: each head's leading rotary_dim dims (the table's width)
    as the reference rotates them; the rest of each head, and v, bit-identical to the input."""
    gen = torch.Generator().manual_seed(4)
    T, Hq, Hkv, max_pos = 6, 6, 2, 64
    qkv = torch.randn(T, (Hq + 2 * Hkv) * head_dim, generator=gen).to(dtype)
    positions = torch.tensor([0, 63, 5, 6, 7, 31])
    cos, sin = rope_tables(rotary_dim, max_pos)
    ref = qkv.clone()
    views = lambda t: (t[:, : Hq * head_dim].view(T, Hq, head_dim),  # noqa: E731
                       t[:, Hq * head_dim : (Hq + Hkv) * head_dim].view(T, Hkv, head_dim))
    reference.apply_rotary(*views(ref), cos, sin, positions)
    dev_qkv = qkv.to(DEVICE)
    q, k = views(dev_qkv)
    out_q, out_k = norm_rope.apply_rotary(q, k, *to_device(cos, sin, positions))
    assert out_q.data_ptr() == q.data_ptr() and out_k.data_ptr() == k.data_ptr()
    got = dev_qkv.cpu()
    torch.testing.assert_close(got, ref, **TOL[dtype])
    heads = lambda t: t.view(T, Hq + 2 * Hkv, head_dim)  # noqa: E731
    assert torch.equal(heads(got)[..., rotary_dim:], heads(qkv)[..., rotary_dim:])  # pass-through dims
    v_cols = slice((Hq + Hkv) * head_dim, None)
    assert torch.equal(got[:, v_cols], qkv[:, v_cols])  # v untouched


def test_rotary_refuses_tables_wider_than_half_the_head(norm_rope: ModuleType) -> None:
    """Tables of more than head_dim/2 columns (one pair too many, or full-width), or cos and sin
    of different widths, are errors before any launch (the kernel would rotate past the head)
    and leave q and k as they were; so are q and k of different head dims."""
    gen = torch.Generator().manual_seed(5)
    q, k = to_device(torch.randn(3, 4, 32, generator=gen), torch.randn(3, 2, 32, generator=gen))
    q0, k0 = q.clone(), k.clone()
    positions = torch.arange(3, device=DEVICE)
    for cos_cols, sin_cols in ((17, 17), (32, 32), (16, 12)):
        cos, sin = to_device(torch.rand(8, cos_cols, generator=gen), torch.rand(8, sin_cols, generator=gen))
        with pytest.raises(ValueError, match="at most head_dim/2 = 16 pairs"):
            norm_rope.apply_rotary(q, k, cos, sin, positions)
        if cos_cols > 16:  # as the reference refuses them
            with pytest.raises(ValueError, match="rotate more than head_dim"):
                reference.apply_rotary(q.clone(), k.clone(), cos, sin, positions)
    assert torch.equal(q, q0) and torch.equal(k, k0)
    cos, sin = to_device(*rope_tables(16, 8))
    with pytest.raises(ValueError, match="same tokens and head_dim"):
        norm_rope.apply_rotary(q, k[..., :16].contiguous(), cos[:, :8], sin[:, :8], positions)


@pytest.mark.parametrize("dtype", [torch.float32, torch.float16])
@pytest.mark.parametrize("rotary_dim", [16, 12, 2])
def test_rotary_reference_matches_model(norm_rope: ModuleType, dtype: torch.dtype, rotary_dim: int) -> None:
    """kernels.reference.apply_rotary is the model's own Rotary, in place: over every head dim,
    and over the leading rotary_dim of 16 (partial rotary, the rest passed through)."""
    from engine.models.llama import Rotary

    gen = torch.Generator().manual_seed(8)
    q, k = torch.randn(5, 4, 16, generator=gen).to(dtype), torch.randn(5, 2, 16, generator=gen).to(dtype)
    cos, sin = rope_tables(rotary_dim, 32)
    positions = torch.tensor([3, 0, 31, 7, 7])
    expected = Rotary.apply((cos[positions].unsqueeze(1), sin[positions].unsqueeze(1)), q, k)
    assert all(e.shape == x.shape and e.dtype == dtype for e, x in zip(expected, (q, k)))
    reference.apply_rotary(q, k, cos, sin, positions)
    assert torch.equal(q, expected[0]) and torch.equal(k, expected[1])


# ----------------------------------------------------------------------------- the engine


@pytest.fixture(scope="module")
def tiny_llama_head_dim_48(tmp_path_factory: pytest.TempPathFactory) -> str:
    """The tiny Llama with 48-dim heads (4 x 48 = 192 wide attention over a 64 hidden): a
    head dim the kernels tile as 64, the rest masked."""
    import transformers

    from tests.conftest import TINY_COMMON

    torch.manual_seed(0)
    path = str(tmp_path_factory.mktemp("llama_d48") / "model")
    config = transformers.LlamaConfig(**TINY_COMMON, head_dim=48, tie_word_embeddings=False)
    transformers.LlamaForCausalLM(config).save_pretrained(path)
    return path


@pytest.mark.parametrize("model", ["llama", "llama-head-dim-48"])
def test_engine_greedy_tokens_equal_reference_backend(
    ops: ModuleType, tiny_checkpoints: dict[str, str], monkeypatch: pytest.MonkeyPatch, model: str,
    request: pytest.FixtureRequest,
) -> None:
    from engine import LLM, SamplingParams

    calls: list[str] = []  # which Triton kernels ran, in order: d(ecode), p(refill), c(ached prefix)

    def spy(name: str, kind: str):
        kernel = getattr(ops, name)

        def wrapped(*args, **kwargs):
            if kind == "p":
                cu, lens = args[4], args[5]
                calls.append("c" if bool(((cu[1:] - cu[:-1]) < lens).any()) else "p")
            else:
                calls.append(kind)
            return kernel(*args, **kwargs)
        monkeypatch.setattr(ops, name, wrapped)

    spy("paged_decode_attention", "d")
    spy("paged_prefill_attention", "p")
    rng = random.Random(3)
    prompts = [[rng.randrange(3, 500) for _ in range(n)] for n in (5, 21)]
    params = SamplingParams(max_tokens=6, temperature=0.0, ignore_eos=True)
    tokens = {}
    for backend in ("reference", "triton"):
        monkeypatch.setenv(kernels.BACKEND_ENV, backend)
        # A 16-token step budget chunks the long prompt, so steps mix decodes with a prefill
        # chunk over a cached prefix; 8-token blocks make every 16-key tile span two blocks.
        # fp32 on any device: bf16 rounding could legitimately flip a greedy token.
        path = tiny_checkpoints["llama"] if model == "llama" else request.getfixturevalue("tiny_llama_head_dim_48")
        llm = LLM(path, num_kv_blocks=16, block_size=8, max_num_batched_tokens=16, dtype="float32")
        assert llm.engine.runner.backend.__name__ == kernels.BACKENDS[backend]
        assert llm.engine.runner.model_config.head_dim == (16 if model == "llama" else 48)
        tokens[backend] = [o.outputs[0].token_ids for o in llm.generate(prompts, params)]
    assert tokens["triton"] == tokens["reference"]
    trace = "".join(calls)
    assert "dc" in trace, trace  # a step mixed decodes with a prefill chunk after a cached prefix
    assert all(len(t) == 6 for t in tokens["triton"])


def test_engine_moe_greedy_tokens_equal_reference_backend(
    tmp_path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """A mixture of experts (Qwen2-MoE: routed experts, a shared expert and a dense layer) on
    the Triton backend runs its experts through kernels.triton_moe, with the reference's tokens
    and transformers'."""
    from engine import LLM, SamplingParams
    from tests.conftest import hf_greedy, save_tiny_moe

    moe = importlib.import_module("kernels.triton_moe")
    calls = []
    kernel = moe.fused_moe
    monkeypatch.setattr(moe, "fused_moe", lambda *a: calls.append(a[0].shape[0]) or kernel(*a))
    path = save_tiny_moe(str(tmp_path / "qwen2_moe"), "qwen2_moe")
    rng = random.Random(4)
    prompts = [[rng.randrange(3, 500) for _ in range(n)] for n in (3, 19)]
    params = SamplingParams(max_tokens=5, temperature=0.0, ignore_eos=True)
    tokens = {}
    for backend in ("reference", "triton"):
        monkeypatch.setenv(kernels.BACKEND_ENV, backend)
        llm = LLM(path, num_kv_blocks=16, block_size=8, max_num_batched_tokens=16, dtype="float32")
        tokens[backend] = [o.outputs[0].token_ids for o in llm.generate(prompts, params)]
        assert bool(calls) == (backend == "triton")
    assert tokens["triton"] == tokens["reference"] == hf_greedy(path, prompts, 5)
    assert min(calls) == 1 and max(calls) > 8  # decode steps and prefill chunks went through the kernel


# ----------------------------------------------------------------------------- GPU only


def paged_cache(
    lens: list[int], block_size: int, num_kv_heads: int, head_dim: int, dtype: torch.dtype,
    gen: torch.Generator,
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """paged_batch, vectorised for long contexts: shuffled blocks, poison elsewhere."""
    needed = [-(-n // block_size) for n in lens]
    num_blocks = sum(needed) + 3
    shape = (num_blocks, block_size, num_kv_heads, head_dim)
    k_cache = torch.full(shape, 300.0, dtype=dtype)
    v_cache = torch.full(shape, 300.0, dtype=dtype)
    ids = torch.randperm(num_blocks, generator=gen)
    tables = torch.full((len(lens), max(needed) + 2), -1, dtype=torch.int32)
    used = 0
    for b, n in enumerate(lens):
        row = ids[used : used + needed[b]]
        used += needed[b]
        tables[b, : len(row)] = row.int()
        slots = (row[:, None] * block_size + torch.arange(block_size)).flatten()[:n]
        k_cache.view(-1, num_kv_heads, head_dim)[slots] = torch.randn(n, num_kv_heads, head_dim, generator=gen).to(dtype)
        v_cache.view(-1, num_kv_heads, head_dim)[slots] = torch.randn(n, num_kv_heads, head_dim, generator=gen).to(dtype)
    return k_cache, v_cache, tables


@pytest.mark.gpu
@pytest.mark.skipif(not CUDA, reason="needs CUDA")
class TestCompiledOnGPU:
    """Compiled for real: bf16, head dims 64-256 (80 and 96 padded to 128), large blocks, long
    contexts, many splits."""

    DTYPES = [torch.float16, torch.bfloat16, torch.float32]

    @pytest.mark.parametrize("dtype", DTYPES)
    @pytest.mark.parametrize("group,num_kv_heads,head_dim,block_size", [
        (4, 8, 128, 16), (2, 8, 128, 32), (1, 4, 64, 64), (8, 2, 256, 16), (3, 2, 64, 128),
    ])
    @pytest.mark.parametrize("batch,max_len,num_splits,window,softcap", [
        (1, 4100, None, 0, 0.0), (5, 2000, 1, 0, 0.0), (7, 700, 8, 0, 0.0), (40, 300, None, 0, 0.0),
        (1, 4100, None, 1000, 0.0), (7, 700, 8, 77, 2.0),  # a window split-K; one ending mid-tile, capped
    ])
    def test_decode(self, ops, dtype, group, num_kv_heads, head_dim, block_size, batch, max_len, num_splits,
                    window, softcap):
        gen = torch.Generator().manual_seed(batch + head_dim)
        lens = [1, 2 * block_size, *torch.randint(1, max_len, (batch,), generator=gen).tolist()]
        k_cache, v_cache, tables = paged_cache(lens, block_size, num_kv_heads, head_dim, dtype, gen)
        q = torch.randn(len(lens), group * num_kv_heads, head_dim, generator=gen).to(dtype)
        args = to_device(q, k_cache, v_cache, tables, torch.tensor(lens, dtype=torch.int32))
        attn = dict(sliding_window=window, softcap=softcap)
        out = ops.paged_decode_attention(*args, head_dim**-0.5, num_splits=num_splits, **attn)
        expected = reference.paged_decode_attention(
            args[0].float(), args[1].float(), args[2].float(), args[3], args[4], head_dim**-0.5, **attn
        )
        torch.testing.assert_close(out.float(), expected, **TOL[dtype])

    @pytest.mark.parametrize("dtype", DTYPES)
    @pytest.mark.parametrize("group,num_kv_heads,head_dim,block_size,batch,max_len,num_splits,window,softcap", [
        (1, 32, 96, 16, 1, 4100, None, 0, 0.0),  # Phi-3-mini's layout, split-K
        (4, 8, 96, 16, 7, 700, 8, 77, 2.0), (2, 4, 80, 64, 40, 300, None, 0, 0.0),
        (2, 2, 160, 16, 5, 2000, 1, 1000, 0.0),
    ])
    def test_decode_padded_head_dims(self, ops, dtype, group, num_kv_heads, head_dim, block_size, batch, max_len,
                                     num_splits, window, softcap):
        """Head dims tiled as the next power of two, the rest masked."""
        self.test_decode(ops, dtype, group, num_kv_heads, head_dim, block_size, batch, max_len, num_splits, window,
                         softcap)

    def test_fused_split_merge_repeated_and_in_a_graph(self, ops):
        """The fused merge's arrival counters and memory ordering, compiled: back-to-back launches
        (eager and replayed from one CUDA graph) give the two-launch merge's result, and the same
        bits every time (a merge that read a partial before it was written would not)."""
        gen = torch.Generator().manual_seed(3)
        lens = torch.randint(1, 3000, (6,), generator=gen).tolist()
        k_cache, v_cache, tables = paged_cache(lens, 16, 8, 128, torch.bfloat16, gen)
        q = torch.randn(len(lens), 32, 128, generator=gen).to(torch.bfloat16)
        args = to_device(q, k_cache, v_cache, tables, torch.tensor(lens, dtype=torch.int32))
        first = ops.paged_decode_attention(*args, 0.1, num_splits=16)
        torch.testing.assert_close(first, ops.paged_decode_attention(*args, 0.1, num_splits=16, fused_merge=False),
                                   **TOL[torch.bfloat16])
        for _ in range(50):
            assert torch.equal(ops.paged_decode_attention(*args, 0.1, num_splits=16), first)
        graph = torch.cuda.CUDAGraph()
        with torch.cuda.graph(graph):
            out = ops.paged_decode_attention(*args, 0.1, num_splits=16)
        for _ in range(50):
            out.zero_()
            graph.replay()
            assert torch.equal(out, first)
        assert not ops._COUNTERS[out.device][-1].any()

    def test_graphed_decodes_replayed_with_new_counts(self, ops):
        """What a mixed CUDA graph relies on: one captured graphed-decode launch, replayed with
        the decode count and split count changed in place, gives the eager decode of that many
        rows each time (the others untouched), with the fused merge's counters left zero."""
        gen = torch.Generator().manual_seed(4)
        lens = torch.randint(1, 9000, (8,), generator=gen).tolist()
        k_cache, v_cache, tables = paged_cache(lens, 16, 8, 128, torch.bfloat16, gen)
        q = torch.randn(len(lens), 32, 128, generator=gen).to(torch.bfloat16)
        q, k_cache, v_cache, tables, context_lens = to_device(q, k_cache, v_cache, tables,
                                                              torch.tensor(lens, dtype=torch.int32))
        counts = torch.tensor([len(lens), 16], dtype=torch.int32, device=DEVICE)
        out = torch.zeros_like(q)
        ops.paged_decode_attention_graphed(q, k_cache, v_cache, tables, context_lens, 0.1, counts, out)  # warm-up
        graph = torch.cuda.CUDAGraph()
        with torch.cuda.graph(graph):
            ops.paged_decode_attention_graphed(q, k_cache, v_cache, tables, context_lens, 0.1, counts, out)
        for nd, splits in ((8, 16), (1, 16), (3, 5), (8, 1), (0, 4), (5, 2)):
            counts.copy_(torch.tensor([nd, splits]))
            out.fill_(7.0)
            graph.replay()
            if nd:
                want = ops.paged_decode_attention(q[:nd], k_cache, v_cache, tables[:nd], context_lens[:nd], 0.1,
                                                  num_splits=splits)
                torch.testing.assert_close(out[:nd], want, **TOL[torch.bfloat16])
            assert (out[nd:] == 7.0).all()
        assert not ops._COUNTERS[out.device][-1].any()

    @pytest.mark.parametrize("dtype", DTYPES)
    @pytest.mark.parametrize("group,num_kv_heads,head_dim,block_size,pack_gqa,window,softcap", [
        (4, 8, 128, 16, None, 0, 0.0), (1, 4, 64, 64, None, 0, 0.0), (8, 2, 256, 32, None, 0, 0.0),
        (2, 2, 128, 128, None, 0, 0.0), (3, 2, 128, 16, None, 0, 0.0),  # the defaults: packed for powers of two
        (4, 8, 128, 16, False, 0, 0.0), (3, 2, 128, 16, True, 0, 0.0),  # and each tiling where it is not the default
        (4, 8, 128, 16, None, 300, 2.0), (3, 2, 128, 16, None, 77, 0.0),  # sliding windows, capped scores
        (1, 4, 64, 64, None, 0, 2.0),
        (1, 32, 96, 16, None, 300, 0.0), (4, 8, 96, 16, None, 0, 0.0), (3, 2, 160, 16, None, 77, 2.0),  # padded
    ])
    def test_prefill(self, ops, dtype, group, num_kv_heads, head_dim, block_size, pack_gqa, window, softcap):
        gen = torch.Generator().manual_seed(head_dim + block_size)
        lens = [1000, 1, 2 * block_size, 777]
        q_lens = [1000, 1, 5, 300]  # whole prompt, a decode-like token, cached prefixes
        k_cache, v_cache, tables = paged_cache(lens, block_size, num_kv_heads, head_dim, dtype, gen)
        q = torch.randn(sum(q_lens), group * num_kv_heads, head_dim, generator=gen).to(dtype)
        cu = torch.tensor([0, *q_lens], dtype=torch.int32).cumsum(0, dtype=torch.int32)
        args = to_device(q, k_cache, v_cache, tables, cu, torch.tensor(lens, dtype=torch.int32))
        attn = dict(sliding_window=window, softcap=softcap)
        out = ops.paged_prefill_attention(*args, head_dim**-0.5, pack_gqa=pack_gqa, **attn)
        expected = reference.paged_prefill_attention(
            args[0].float(), args[1].float(), args[2].float(), *args[3:], head_dim**-0.5, **attn
        )
        torch.testing.assert_close(out.float(), expected, **TOL[dtype])

    @pytest.mark.parametrize("dtype,new_kv,group,num_kv_heads,head_dim,block_size,window,softcap", [
        (torch.bfloat16, "rows", 4, 8, 128, 16, 0, 0.0), (torch.bfloat16, "tma", 4, 8, 128, 16, 0, 0.0),
        (torch.float16, "tma", 3, 2, 128, 16, 0, 0.0), (torch.bfloat16, "rows", 8, 2, 256, 32, 0, 0.0),
        (torch.float32, "rows", 1, 4, 64, 64, 0, 0.0), (torch.bfloat16, "tma", 1, 4, 64, 64, 0, 0.0),
        (torch.bfloat16, "rows", 4, 8, 128, 16, 300, 2.0), (torch.float16, "tma", 3, 2, 128, 16, 77, 2.0),
        (torch.bfloat16, "rows", 4, 8, 96, 16, 0, 0.0), (torch.float16, "rows", 2, 4, 80, 64, 77, 2.0),  # padded
    ])
    def test_prefill_from_key_value(self, ops, dtype, new_kv, group, num_kv_heads, head_dim, block_size, window,
                                    softcap):
        """The new tokens' K/V from the projection's strided views (through tensor descriptors
        with `tma`), the cached prefix from the cache, whose new tokens' slots hold NaN."""
        gen = torch.Generator().manual_seed(head_dim + len(new_kv))
        lens, q_lens = [1000, 1, 2 * block_size + 5, 777], [1000, 1, 5, 300]
        k_cache, v_cache, tables, _, _ = paged_batch(lens, block_size, num_kv_heads, head_dim, dtype, gen, pad_id=0)
        q = torch.randn(sum(q_lens), group * num_kv_heads, head_dim, generator=gen).to(dtype)
        cu = torch.tensor([0, *q_lens], dtype=torch.int32).cumsum(0, dtype=torch.int32)
        ctx = torch.tensor(lens, dtype=torch.int32)
        attn = dict(sliding_window=window, softcap=softcap)
        expected = reference.paged_prefill_attention(q.float(), k_cache.float(), v_cache.float(), tables, cu, ctx,
                                                     head_dim**-0.5, **attn)
        stale_to_nan(k_cache, v_cache, tables, lens)
        key, value = to_device(*new_tokens_kv(k_cache, v_cache, tables, lens, q_lens))
        if window:
            tables = nan_before_window(k_cache, v_cache, tables, [n - new for n, new in zip(lens, q_lens)], window)
        out = ops.paged_prefill_attention(*to_device(q, k_cache, v_cache, tables, cu, ctx), head_dim**-0.5,
                                          key=key, value=value, new_kv=new_kv, **attn)
        torch.testing.assert_close(out.cpu().float(), expected, **TOL[dtype])

    @pytest.mark.parametrize("dtype,window,softcap", [(torch.bfloat16, 0, 0.0), (torch.float16, 0, 0.0),
                                                      (torch.bfloat16, 100, 2.0)])
    def test_prefill_through_tensor_descriptors(self, ops, dtype, window, softcap):
        """The TMA experiment compiled: 64-token blocks, stale NaN past each context (and
        before each window)."""
        gen = torch.Generator().manual_seed(64)
        lens, q_lens = [1000, 777, 65], [1000, 300, 1]
        k_cache, v_cache, tables, _, _ = paged_batch(lens, 64, 8, 128, dtype, gen, pad_id=0)
        q = torch.randn(sum(q_lens), 32, 128, generator=gen).to(dtype)
        cu = torch.tensor([0, *q_lens], dtype=torch.int32).cumsum(0, dtype=torch.int32)
        ctx = torch.tensor(lens, dtype=torch.int32)
        attn = dict(sliding_window=window, softcap=softcap)
        expected = reference.paged_prefill_attention(q.float(), k_cache.float(), v_cache.float(), tables, cu, ctx,
                                                     128**-0.5, **attn)
        stale_to_nan(k_cache, v_cache, tables, lens)
        if window:
            tables = nan_before_window(k_cache, v_cache, tables, [n - new for n, new in zip(lens, q_lens)], window)
        out = ops.paged_prefill_attention(*to_device(q, k_cache, v_cache, tables, cu, ctx), 128**-0.5, cache_tma=True,
                                          **attn)
        torch.testing.assert_close(out.cpu().float(), expected, **TOL[dtype])

    @pytest.mark.parametrize("dtype,group,head_dim,block_size,fresh", [
        (dtype, *config, False) for dtype in (torch.bfloat16, torch.float16)
        for config in ((4, 128, 16), (2, 64, 32), (3, 128, 16))
    ] + [(torch.bfloat16, 4, 128, 16, True), (torch.float16, 3, 128, 16, True),
         (torch.bfloat16, 4, 96, 16, False), (torch.bfloat16, 4, 96, 16, True)])  # padded
    def test_padded_mixed_step(self, ops, dtype, group, head_dim, block_size, fresh):
        """A mixed CUDA graph's one launch: 24 decodes up to 1200 keys beside two chunks."""
        gen = torch.Generator().manual_seed(group)
        lens = [*torch.randint(1, 1200, (24,), generator=gen).tolist(), 700, 300]
        check_padded_mixed_step(ops, group, head_dim, block_size, dtype, lens, [1] * 24 + [200, 300], 24, fresh)

    @pytest.mark.parametrize("dtype,group,splits,mixed,window,softcap,head_dim", [
        (torch.bfloat16, 4, 1, False, 0, 0.0, 128), (torch.bfloat16, 4, 5, False, 0, 0.0, 128),
        (torch.float16, 3, 16, False, 0, 0.0, 128), (torch.float32, 4, 7, False, 0, 0.0, 128),
        (torch.bfloat16, 4, 5, True, 1000, 5.0, 128), (torch.float16, 3, 16, True, 77, 0.0, 128),
        (torch.bfloat16, 4, 5, False, 0, 0.0, 96), (torch.float16, 2, 16, True, 77, 2.0, 80),  # padded
    ])
    def test_graphed_mixed_step(self, ops, dtype, group, splits, mixed, window, softcap, head_dim):
        """What the mixed graphs launch now: 3 decodes up to 9000 keys split-K by the graphed
        decode kernel, the prefill kernel skipping them."""
        lens = [9000, 4100, 1, 700, 300]
        check_padded_mixed_step(ops, group, head_dim, 16, dtype, lens, [1, 1, 1, 200, 300], 3, graphed_splits=splits,
                                mixed=mixed, sliding_window=window, softcap=softcap)

    @pytest.mark.parametrize("dtype", DTYPES)
    @pytest.mark.parametrize("head_dim", [128, 96])
    def test_store_kv(self, ops, dtype, head_dim):
        gen = torch.Generator().manual_seed(0)
        k_cache = torch.randn(64, 16, 8, head_dim, generator=gen).to(dtype).to(DEVICE)
        v_cache = torch.randn(64, 16, 8, head_dim, generator=gen).to(dtype).to(DEVICE)
        slots = torch.randperm(64 * 16, generator=gen)[:300].to(DEVICE)
        slots[::7] = -1
        key, value = torch.randn(2, 300, 8, head_dim, generator=gen).to(dtype).to(DEVICE)
        k_ref, v_ref = k_cache.clone(), v_cache.clone()
        reference.store_kv(key, value, k_ref, v_ref, slots)
        k_cache, v_cache = guarded(k_cache, 7.0), guarded(v_cache, 7.0)
        ops.store_kv(key, value, k_cache, v_cache, slots.int())
        assert torch.equal(k_cache, k_ref) and torch.equal(v_cache, v_ref)
        assert_guard_intact(k_cache, 7.0)
        assert_guard_intact(v_cache, 7.0)

    @pytest.mark.parametrize("dtype", DTYPES)
    @pytest.mark.parametrize("hidden", [576, 4096])
    def test_rms_norm(self, norm_rope, dtype, hidden):
        gen = torch.Generator().manual_seed(hidden)
        x, residual = torch.randn(2, 257, hidden, generator=gen).to(dtype).to(DEVICE)
        weight = (1 + 0.1 * torch.randn(hidden, generator=gen)).to(dtype).to(DEVICE)
        out, new_residual = norm_rope.rms_norm(x, weight, 1e-6, residual)
        expected, expected_residual = reference.rms_norm(x, weight, 1e-6, residual)
        assert torch.equal(new_residual, expected_residual)
        torch.testing.assert_close(out, expected, **TOL[dtype])
        torch.testing.assert_close(norm_rope.rms_norm(x, weight, 1e-6), reference.rms_norm(x, weight, 1e-6), **TOL[dtype])

    @pytest.mark.parametrize("dtype", DTYPES)
    @pytest.mark.parametrize("head_dim,rotary_dim", [(64, 64), (128, 128), (96, 72), (128, 96), (128, 64)])
    def test_rotary(self, norm_rope, dtype, head_dim, rotary_dim):
        """Whole heads and partial rotary (Phi-4-mini's 3/4 of 96, R/2 = 36 and 48): the rest of
        each head passes through bit-identical."""
        gen = torch.Generator().manual_seed(head_dim + rotary_dim)
        T, Hq, Hkv = 333, 32, 8
        qkv = torch.randn(T, (Hq + 2 * Hkv) * head_dim, generator=gen).to(dtype).to(DEVICE)
        positions = torch.randint(0, 4096, (T,), generator=gen).to(DEVICE)
        cos, sin = to_device(*rope_tables(rotary_dim, 4096))
        ref, before = qkv.clone(), qkv.clone()
        views = lambda t: (t[:, : Hq * head_dim].view(T, Hq, head_dim),  # noqa: E731
                           t[:, Hq * head_dim : (Hq + Hkv) * head_dim].view(T, Hkv, head_dim))
        reference.apply_rotary(*views(ref), cos, sin, positions)
        norm_rope.apply_rotary(*views(qkv), cos, sin, positions)
        torch.testing.assert_close(qkv, ref, **TOL[dtype])
        heads = lambda t: t.view(T, Hq + 2 * Hkv, head_dim)  # noqa: E731
        assert torch.equal(heads(qkv)[..., rotary_dim:], heads(before)[..., rotary_dim:])
