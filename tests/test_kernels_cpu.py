"""kernels.cpu_ops (attention and layer ops in C) against the naive fp64 oracle, the torch
reference, and the engine's tokens on the reference backend; its build cache and the fallback
to the reference where no C compiler is found."""

from __future__ import annotations

import logging
import random

import pytest
import torch

import kernels
from kernels import cpu_ops, native, reference
from tests.test_kernels_reference import POISON, naive_attention, paged_batch, ragged_lens

CONFIGS = [  # (query heads per kv head, head_dim, block_size): 64/128 are specialised in C
    (1, 64, 16),
    (3, 64, 16),
    (4, 128, 32),
    (8, 32, 4),
    (3, 256, 8),
    (2, 48, 1),
]


@pytest.mark.parametrize("group,head_dim,block_size", CONFIGS)
@pytest.mark.parametrize("seed", range(3))
def test_decode_matches_naive(group: int, head_dim: int, block_size: int, seed: int) -> None:
    gen = torch.Generator().manual_seed(seed)
    num_kv_heads = 2
    lens = ragged_lens(gen, 5, block_size, 90, shortest=(1, 1, block_size + 3)[seed])
    k_cache, v_cache, tables, keys, values = paged_batch(
        lens, block_size, num_kv_heads, head_dim, torch.float32, gen, pad_id=(-1, 0, 5)[seed]
    )
    q = torch.randn(len(lens), num_kv_heads * group, head_dim, generator=gen)
    scale = head_dim**-0.5
    out = cpu_ops.paged_decode_attention(q, k_cache, v_cache, tables, torch.tensor(lens, dtype=torch.int32), scale)
    assert out.shape == q.shape and out.dtype == torch.float32
    expected = torch.cat([naive_attention(q[b : b + 1], keys[b], values[b], scale) for b in range(len(lens))])
    torch.testing.assert_close(out.double(), expected, atol=1e-5, rtol=1e-5)


@pytest.mark.parametrize("group,head_dim,block_size", CONFIGS[:4])
@pytest.mark.parametrize("seed", range(2))
@pytest.mark.parametrize("fresh", [False, True])
def test_prefill_matches_naive(group: int, head_dim: int, block_size: int, seed: int, fresh: bool) -> None:
    """One SDPA call per sequence: whole prompts (is_causal), one new token, and a suffix
    after a cached prefix (the bottom-right causal mask). `fresh`: the new tokens' K/V passed
    as the engine passes them; whole prompts then read only those (their cache blocks are
    poisoned here)."""
    gen = torch.Generator().manual_seed(100 + seed)
    num_kv_heads = 2
    lens = ragged_lens(gen, 4, block_size, 60, shortest=(1, block_size + 3)[seed])
    q_lens = [(n, 1, int(torch.randint(1, n + 1, (), generator=gen)))[i % 3] for i, n in enumerate(lens)]
    k_cache, v_cache, tables, keys, values = paged_batch(
        lens, block_size, num_kv_heads, head_dim, torch.float32, gen, pad_id=(-1, 5)[seed]
    )
    q = torch.randn(sum(q_lens), num_kv_heads * group, head_dim, generator=gen)
    cu_seqlens = torch.tensor([0, *q_lens], dtype=torch.int32).cumsum(0, dtype=torch.int32)
    kv = {}
    if fresh:
        kv = {"key": torch.cat([k[n - new :] for k, n, new in zip(keys, lens, q_lens)]),
              "value": torch.cat([v[n - new :] for v, n, new in zip(values, lens, q_lens)])}
        for b, (n, new) in enumerate(zip(lens, q_lens)):
            if new == n:
                k_cache[tables[b, : -(-n // block_size)].long()] = float("nan")
    context_lens = torch.tensor(lens, dtype=torch.int32)
    out = cpu_ops.paged_prefill_attention(q, k_cache, v_cache, tables, cu_seqlens, context_lens, 0.3, **kv)
    assert out.shape == q.shape
    expected = torch.cat([
        naive_attention(q[cu_seqlens[b] : cu_seqlens[b + 1]], keys[b], values[b], 0.3) for b in range(len(lens))
    ])
    torch.testing.assert_close(out.double(), expected, atol=1e-5, rtol=1e-5)


@pytest.mark.parametrize("threads", [1, 2])
@pytest.mark.parametrize("lens,head_dim", [
    ([700, 1, 513, 64, 900, 333], 64),  # many sequences: one work item per sequence
    ([900], 64), ([1, 777, 300], 32),  # fewer than twice the threads: one item per (sequence, kv head)
])
def test_decode_long_contexts_across_threads(threads: int, lens: list[int], head_dim: int,
                                             monkeypatch: pytest.MonkeyPatch) -> None:
    """Past ~1 MB of K/V the kernel starts threads; sequences, or a few sequences' kv heads,
    are shared out among them."""
    monkeypatch.setattr(torch, "get_num_threads", lambda: threads)
    gen = torch.Generator().manual_seed(5)
    k_cache, v_cache, tables, keys, values = paged_batch(lens, 16, 4, head_dim, torch.float32, gen, pad_id=-1)
    q = torch.randn(len(lens), 12, head_dim, generator=gen)
    out = cpu_ops.paged_decode_attention(q, k_cache, v_cache, tables, torch.tensor(lens, dtype=torch.int32), 0.125)
    expected = torch.cat([naive_attention(q[b : b + 1], keys[b], values[b], 0.125) for b in range(len(lens))])
    torch.testing.assert_close(out.double(), expected, atol=1e-5, rtol=1e-5)


def test_decode_reads_strided_queries_and_int64_inputs() -> None:
    """q as the model hands it over (a view into the fused qkv rows), tables/lens as int64."""
    gen = torch.Generator().manual_seed(8)
    lens = [5, 40, 17]
    k_cache, v_cache, tables, keys, values = paged_batch(lens, 8, 2, 64, torch.float32, gen, pad_id=-1)
    qkv = torch.randn(len(lens), 6 * 64 + 2 * 2 * 64, generator=gen)
    q = qkv[:, : 6 * 64].view(len(lens), 6, 64)
    assert not q.is_contiguous()
    out = cpu_ops.paged_decode_attention(q, k_cache, v_cache, tables.long(), torch.tensor(lens), 0.2)
    expected = reference.paged_decode_attention(q, k_cache, v_cache, tables, torch.tensor(lens, dtype=torch.int32), 0.2)
    torch.testing.assert_close(out, expected, atol=1e-6, rtol=1e-5)


def test_decode_zero_context_rows_are_zero() -> None:
    """Rows with no keys (padding) give zeros and never read the poisoned cache."""
    gen = torch.Generator().manual_seed(9)
    k_cache, v_cache, tables, _, _ = paged_batch([3, 20], 4, 2, 64, torch.float32, gen, pad_id=-1)
    q = torch.randn(3, 4, 64, generator=gen)
    tables = torch.cat([tables, torch.full((1, tables.shape[1]), -1, dtype=torch.int32)])
    out = cpu_ops.paged_decode_attention(q, k_cache, v_cache, tables, torch.tensor([3, 20, 0], dtype=torch.int32), 0.1)
    assert torch.equal(out[2], torch.zeros(4, 64))
    assert out[:2].abs().max() < POISON / 10
    assert cpu_ops.paged_decode_attention(q[:0], k_cache, v_cache, tables[:0], torch.zeros(0, dtype=torch.int32), 0.1).shape == (0, 4, 64)


@pytest.mark.parametrize("dtype,head_dim", [(torch.float16, 64), (torch.float32, 20)])
@pytest.mark.parametrize("extra", [{}, {"sliding_window": 5, "softcap": 2.0}])
def test_decode_outside_the_c_kernel_is_the_reference(dtype: torch.dtype, head_dim: int, extra: dict) -> None:
    gen = torch.Generator().manual_seed(10)
    lens = [9, 30]
    k_cache, v_cache, tables, _, _ = paged_batch(lens, 4, 2, head_dim, dtype, gen, pad_id=-1)
    q = torch.randn(2, 4, head_dim, generator=gen).to(dtype)
    context_lens = torch.tensor(lens, dtype=torch.int32)
    out = cpu_ops.paged_decode_attention(q, k_cache, v_cache, tables, context_lens, 0.3, **extra)
    assert torch.equal(out, reference.paged_decode_attention(q, k_cache, v_cache, tables, context_lens, 0.3, **extra))


# Sliding windows against kernels.reference, block size 8 and contexts of 1 to 40 keys: one key,
# less than a block, exactly a block, a window that starts mid-block, one longer than every
# context; 0 is no window (softcap alone).
WINDOWS = [0, 1, 5, 8, 12, 1000]
WINDOW_LENS = [1, 7, 8, 9, 29, 40, 17, 2]


def _poison_before(k_cache: torch.Tensor, v_cache: torch.Tensor, table: torch.Tensor, first_key: int) -> None:
    """NaN in the blocks of one sequence wholly before `first_key`: blocks a window skips must
    not be read at all (a masked read would still turn the output NaN)."""
    blocks = table[: first_key // k_cache.shape[1]].long()
    k_cache[blocks] = float("nan")
    v_cache[blocks] = float("nan")


@pytest.mark.parametrize("window", WINDOWS)
@pytest.mark.parametrize("softcap", [0.0, 2.0])
@pytest.mark.parametrize("group,head_dim", [(1, 64), (3, 32), (4, 128)])
def test_decode_window_and_softcap_match_reference(window: int, softcap: float, group: int, head_dim: int) -> None:
    """A batch of mixed context lengths (GQA for group > 1): the window's keys only, the blocks
    before them never read; scores capped by softcap · tanh(s / softcap)."""
    gen = torch.Generator().manual_seed(window * 7 + group)
    k_cache, v_cache, tables, _, _ = paged_batch(WINDOW_LENS, 8, 2, head_dim, torch.float32, gen, pad_id=-1)
    q = torch.randn(len(WINDOW_LENS), 2 * group, head_dim, generator=gen)
    context_lens = torch.tensor(WINDOW_LENS, dtype=torch.int32)
    args = (q, k_cache, v_cache, tables, context_lens, 0.3)
    expected = reference.paged_decode_attention(*args, sliding_window=window, softcap=softcap)
    for b, n in enumerate(WINDOW_LENS):
        _poison_before(k_cache, v_cache, tables[b], max(0, n - window) if window else 0)
    out = cpu_ops.paged_decode_attention(*args, sliding_window=window, softcap=softcap)
    torch.testing.assert_close(out, expected, atol=1e-5, rtol=1e-5)
    if softcap and window != 1:  # the cap changes the result (the scores here reach well past it)
        assert not torch.allclose(out, cpu_ops.paged_decode_attention(*args, sliding_window=window), atol=1e-3)


@pytest.mark.parametrize("threads", [1, 2])
@pytest.mark.parametrize("lens", [[700, 1, 513, 64, 900, 333], [1, 777, 300]])
def test_decode_window_across_threads(threads: int, lens: list[int], monkeypatch: pytest.MonkeyPatch) -> None:
    """Long contexts shared out among threads (per sequence, or per kv head for few sequences),
    each work item's scratch sized for its window, not its context."""
    monkeypatch.setattr(torch, "get_num_threads", lambda: threads)
    gen = torch.Generator().manual_seed(6)
    k_cache, v_cache, tables, _, _ = paged_batch(lens, 16, 4, 64, torch.float32, gen, pad_id=-1)
    q = torch.randn(len(lens), 12, 64, generator=gen)
    args = (q, k_cache, v_cache, tables, torch.tensor(lens, dtype=torch.int32), 0.125)
    out = cpu_ops.paged_decode_attention(*args, sliding_window=100, softcap=3.0)
    torch.testing.assert_close(out, reference.paged_decode_attention(*args, sliding_window=100, softcap=3.0),
                               atol=1e-5, rtol=1e-5)


@pytest.mark.parametrize("window", WINDOWS)
@pytest.mark.parametrize("softcap", [0.0, 2.0])
@pytest.mark.parametrize("fresh", [False, True])
@pytest.mark.parametrize("group,head_dim,tile", [(1, 64, 256), (3, 32, 4), (4, 128, 4)])
def test_prefill_window_and_softcap_match_reference(window: int, softcap: float, fresh: bool, group: int,
                                                    head_dim: int, tile: int, monkeypatch: pytest.MonkeyPatch) -> None:
    """Ragged prefill chunks: whole prompts, single tokens and suffixes after a cached prefix
    (new < total), GQA for group > 1. Only the keys from the chunk's first query's window on
    are read (the blocks before are NaN here); `fresh` passes the new tokens' K/V as the engine
    does, and a sequence whose keys are all among them reads no cache at all. A tile of 4
    queries splits the chunks into several attention calls, each over its own key band."""
    monkeypatch.setattr(cpu_ops, "_BAND_TILE", tile)
    gen = torch.Generator().manual_seed(window * 5 + group)
    q_lens = [1, 7, 3, 9, 1, 23, 17, 1]  # whole prompts: 7, 9, 17 keys; suffixes: 3 of 8, 23 of 40, 1 of 2
    k_cache, v_cache, tables, keys, values = paged_batch(WINDOW_LENS, 8, 2, head_dim, torch.float32, gen, pad_id=-1)
    q = torch.randn(sum(q_lens), 2 * group, head_dim, generator=gen)
    cu_seqlens = torch.tensor([0, *q_lens], dtype=torch.int32).cumsum(0, dtype=torch.int32)
    context_lens = torch.tensor(WINDOW_LENS, dtype=torch.int32)
    args = (q, k_cache, v_cache, tables, cu_seqlens, context_lens, 0.3)
    expected = reference.paged_prefill_attention(*args, sliding_window=window, softcap=softcap)
    kv = {}
    if fresh:
        kv = {"key": torch.cat([k[n - new :] for k, n, new in zip(keys, WINDOW_LENS, q_lens)]),
              "value": torch.cat([v[n - new :] for v, n, new in zip(values, WINDOW_LENS, q_lens)])}
    for b, (n, new) in enumerate(zip(WINDOW_LENS, q_lens)):
        first_key = max(0, n - new - window + 1) if window else 0
        if fresh and first_key >= n - new:  # every key it sees is a new token's
            first_key = n
        _poison_before(k_cache, v_cache, tables[b], first_key)
    out = cpu_ops.paged_prefill_attention(*args, sliding_window=window, softcap=softcap, **kv)
    torch.testing.assert_close(out, expected, atol=1e-5, rtol=1e-5)


# fp8 KV caches (e4m3, k_scale / v_scale), kernels.reference the oracle: scales of 1 and others.
FP8_KV_SCALES = [(1.0, 1.0), (0.37, 2.5)]


@pytest.fixture
def fp8_decode_calls(monkeypatch: pytest.MonkeyPatch) -> list[int]:
    """The batch sizes the C fp8 decode kernel was called with."""
    calls: list[int] = []
    c_decode = cpu_ops._lib.stoke_paged_decode_attention_fp8
    monkeypatch.setattr(cpu_ops._lib, "stoke_paged_decode_attention_fp8",
                        lambda *args: calls.append(args[6]) or c_decode(*args))
    return calls


def _fp8_kv(k_cache: torch.Tensor, v_cache: torch.Tensor, k_scale: float,
            v_scale: float) -> tuple[torch.Tensor, torch.Tensor]:
    return reference.quantize_kv(k_cache, k_scale), reference.quantize_kv(v_cache, v_scale)


@pytest.mark.parametrize("group,head_dim,block_size,k_scale,v_scale",
                         [(*config, *FP8_KV_SCALES[i % 2]) for i, config in enumerate(CONFIGS)])
def test_fp8_decode_matches_reference(group: int, head_dim: int, block_size: int, k_scale: float, v_scale: float,
                                      fp8_decode_calls: list[int]) -> None:
    """GQA, ragged contexts (one key, a multiple of the block), scattered blocks, padded tables:
    the C kernel reads the fp8 bytes in place and agrees with the reference; it computes, bit
    for bit, what the fp32 kernel does over the dequantized cache."""
    gen = torch.Generator().manual_seed(group * head_dim + block_size)
    lens = ragged_lens(gen, 5, block_size, 90)
    k_cache, v_cache, tables, _, _ = paged_batch(lens, block_size, 2, head_dim, torch.float32, gen, pad_id=-1)
    k8, v8 = _fp8_kv(k_cache, v_cache, k_scale, v_scale)
    q = torch.randn(len(lens), 2 * group, head_dim, generator=gen)
    context_lens = torch.tensor(lens, dtype=torch.int32)
    args = (tables, context_lens, head_dim**-0.5)
    out = cpu_ops.paged_decode_attention(q, k8, v8, *args, k_scale=k_scale, v_scale=v_scale)
    assert fp8_decode_calls == [len(lens)] and out.shape == q.shape and out.dtype == torch.float32
    expected = reference.paged_decode_attention(q, k8, v8, *args, k_scale=k_scale, v_scale=v_scale)
    torch.testing.assert_close(out, expected, atol=1e-5, rtol=1e-5)
    wide = reference.dequantize_kv(k8, k_scale, torch.float32), reference.dequantize_kv(v8, v_scale, torch.float32)
    assert torch.equal(out, cpu_ops.paged_decode_attention(q, *wide, *args))


@pytest.mark.parametrize("window,softcap", [(0, 2.0), (1, 0.0), (5, 2.0), (8, 0.0), (12, 2.0), (1000, 0.0)])
def test_fp8_decode_window_and_softcap_match_reference(window: int, softcap: float,
                                                       fp8_decode_calls: list[int]) -> None:
    gen = torch.Generator().manual_seed(window)
    k_cache, v_cache, tables, _, _ = paged_batch(WINDOW_LENS, 8, 2, 32, torch.float32, gen, pad_id=-1)
    k8, v8 = _fp8_kv(k_cache, v_cache, 0.37, 2.5)
    q = torch.randn(len(WINDOW_LENS), 6, 32, generator=gen)
    args = (q, k8, v8, tables, torch.tensor(WINDOW_LENS, dtype=torch.int32), 0.3)
    extra = dict(sliding_window=window, softcap=softcap, k_scale=0.37, v_scale=2.5)
    torch.testing.assert_close(cpu_ops.paged_decode_attention(*args, **extra),
                               reference.paged_decode_attention(*args, **extra), atol=1e-5, rtol=1e-5)
    assert fp8_decode_calls == [len(WINDOW_LENS)]


@pytest.mark.parametrize("lens", [[700, 1, 513, 64, 900, 333], [1, 777, 300]])
def test_fp8_decode_across_threads(lens: list[int], monkeypatch: pytest.MonkeyPatch,
                                   fp8_decode_calls: list[int]) -> None:
    """Long contexts shared out among two threads (per sequence, or per kv head for few
    sequences), each work item with its own scratch block; with a window and a softcap too."""
    monkeypatch.setattr(torch, "get_num_threads", lambda: 2)
    gen = torch.Generator().manual_seed(len(lens))
    k_cache, v_cache, tables, _, _ = paged_batch(lens, 16, 4, 64, torch.float32, gen, pad_id=-1)
    k8, v8 = _fp8_kv(k_cache, v_cache, 0.37, 2.5)
    q = torch.randn(len(lens), 12, 64, generator=gen)
    args = (q, k8, v8, tables, torch.tensor(lens, dtype=torch.int32), 0.125)
    for extra in ({}, {"sliding_window": 100, "softcap": 3.0}):
        extra |= {"k_scale": 0.37, "v_scale": 2.5}
        torch.testing.assert_close(cpu_ops.paged_decode_attention(*args, **extra),
                                   reference.paged_decode_attention(*args, **extra), atol=1e-5, rtol=1e-5)
    assert len(fp8_decode_calls) == 2


def test_fp8_decode_reads_strided_queries_and_int64_inputs(fp8_decode_calls: list[int]) -> None:
    gen = torch.Generator().manual_seed(8)
    lens = [5, 40, 17]
    k_cache, v_cache, tables, _, _ = paged_batch(lens, 8, 2, 64, torch.float32, gen, pad_id=-1)
    k8, v8 = _fp8_kv(k_cache, v_cache, 0.37, 2.5)
    qkv = torch.randn(len(lens), 6 * 64 + 2 * 2 * 64, generator=gen)
    q = qkv[:, : 6 * 64].view(len(lens), 6, 64)
    scales = dict(k_scale=0.37, v_scale=2.5)
    out = cpu_ops.paged_decode_attention(q, k8, v8, tables.long(), torch.tensor(lens), 0.2, **scales)
    expected = reference.paged_decode_attention(q, k8, v8, tables, torch.tensor(lens, dtype=torch.int32), 0.2, **scales)
    torch.testing.assert_close(out, expected, atol=1e-5, rtol=1e-5)
    assert fp8_decode_calls == [3]


@pytest.mark.parametrize("window,softcap", [(0, 0.0), (0, 2.0), (5, 0.0), (12, 2.0), (1000, 0.0)])
@pytest.mark.parametrize("group,head_dim,tile", [(1, 64, 256), (3, 32, 4)])
def test_fp8_prefill_matches_reference(window: int, softcap: float, group: int, head_dim: int, tile: int,
                                       monkeypatch: pytest.MonkeyPatch) -> None:
    """Whole prompts, single tokens and suffixes after a cached prefix, GQA, queries read
    through a stride, one SDPA call per sequence or bands of 4-query tiles: the fp8 blocks
    gathered and dequantized. The step's own key/value, passed as the engine passes them, are
    not the cache's quantized keys: here they are far off, and never read."""
    monkeypatch.setattr(cpu_ops, "_BAND_TILE", tile)
    gen = torch.Generator().manual_seed(window * 5 + group)
    q_lens = [1, 7, 3, 9, 1, 23, 17, 1]
    k_cache, v_cache, tables, keys, values = paged_batch(WINDOW_LENS, 8, 2, head_dim, torch.float32, gen, pad_id=-1)
    k8, v8 = _fp8_kv(k_cache, v_cache, 0.37, 2.5)
    tokens, hq = sum(q_lens), 2 * group
    q = torch.randn(tokens, hq * head_dim + 16, generator=gen)[:, 8 : 8 + hq * head_dim].view(tokens, hq, head_dim)
    cu_seqlens = torch.tensor([0, *q_lens], dtype=torch.int32).cumsum(0, dtype=torch.int32)
    args = (q, k8, v8, tables, cu_seqlens, torch.tensor(WINDOW_LENS, dtype=torch.int32), 0.3)
    extra = dict(sliding_window=window, softcap=softcap, k_scale=0.37, v_scale=2.5)
    far_off = {"key": 50 * torch.cat([k[n - new :] for k, n, new in zip(keys, WINDOW_LENS, q_lens)]),
               "value": 50 * torch.cat([v[n - new :] for v, n, new in zip(values, WINDOW_LENS, q_lens)])}
    torch.testing.assert_close(cpu_ops.paged_prefill_attention(*args, **extra, **far_off),
                               reference.paged_prefill_attention(*args, **extra), atol=1e-5, rtol=1e-5)


def _e4m3_edges() -> torch.Tensor:
    """Every e4m3 value, the midpoints between neighbours (ties round to even) and the floats
    either side of them, past 448 (saturated), infinities, NaN, fp32 subnormals; both signs."""
    values = torch.arange(256, dtype=torch.uint8).view(torch.float8_e4m3fn).float()
    values = values[~values.isnan()].unique()
    mids = (values[1:] + values[:-1]) / 2
    inf = torch.tensor(float("inf"))
    edges = torch.cat([values, mids, mids.nextafter(inf), mids.nextafter(-inf),
                       torch.tensor([449.0, 464.0, 479.9, 480.0, 1e30, float("inf"), float("nan"), 1e-40, 2**-10])])
    return torch.cat([edges, -edges])


@pytest.mark.parametrize("head_dim,threads", [(64, 1), (12, 2)])
def test_fp8_store_kv_matches_reference_byte_for_byte(head_dim: int, threads: int,
                                                      monkeypatch: pytest.MonkeyPatch) -> None:
    """key/value as views into the fused qkv rows, slots scattered and -1, rows of 2 x 12 (a
    tail past the 8-float vectors) and two threads: the C store writes the very bytes the
    reference does, at scales of 1 and others; the slots it skips keep their bytes."""
    monkeypatch.setattr(torch, "get_num_threads", lambda: threads)
    c_calls = []
    c_store = cpu_ops._lib.stoke_store_kv_fp8
    monkeypatch.setattr(cpu_ops._lib, "stoke_store_kv_fp8", lambda *args: c_calls.append(args[5]) or c_store(*args))
    gen = torch.Generator().manual_seed(head_dim)
    hkv, width = 2, 2 * head_dim
    values = torch.cat([_e4m3_edges(), torch.randn(40000, generator=gen) * torch.rand(40000, generator=gen) ** 6 * 900])
    tokens = values.numel() // width
    qkv = torch.empty(tokens, 4 * width)
    qkv[:, width : 2 * width] = values[: tokens * width].view(tokens, width)
    shuffled = values[torch.randperm(values.numel(), generator=gen)]
    qkv[:, 2 * width : 3 * width] = shuffled[: tokens * width].view(tokens, width)
    key = qkv[:, width : 2 * width].view(tokens, hkv, head_dim)
    value = qkv[:, 2 * width : 3 * width].view(tokens, hkv, head_dim)
    num_blocks = tokens // 8 + 2
    slots = torch.randperm(num_blocks * 8, generator=gen)[:tokens]
    slots[::5] = -1
    initial = torch.randint(0, 256, (2, num_blocks, 8, hkv, head_dim), dtype=torch.uint8, generator=gen)
    for k_scale, v_scale in FP8_KV_SCALES:
        ours = initial.clone().view(torch.float8_e4m3fn)
        theirs = initial.clone().view(torch.float8_e4m3fn)
        cpu_ops.store_kv(key, value, ours[0], ours[1], slots, k_scale=k_scale, v_scale=v_scale)
        reference.store_kv(key, value, theirs[0], theirs[1], slots, k_scale=k_scale, v_scale=v_scale)
        assert torch.equal(ours.view(torch.uint8), theirs.view(torch.uint8))
    assert c_calls == [tokens, tokens]


def test_fp8_store_kv_refuses_slots_past_the_cache_and_stores_nothing() -> None:
    gen = torch.Generator().manual_seed(3)
    key, value = torch.randn(2, 3, 2, 16, generator=gen)
    k8, v8 = torch.zeros(2, 2, 4, 2, 16, dtype=torch.float8_e4m3fn)
    for bad in (8, 100):
        with pytest.raises(IndexError, match="past the cache"):
            cpu_ops.store_kv(key, value, k8, v8, torch.tensor([0, 5, bad]))
        assert not k8.view(torch.uint8).any() and not v8.view(torch.uint8).any()
    cpu_ops.store_kv(key, value, k8, v8, torch.tensor([0, -2, 7], dtype=torch.int32))  # negative: skipped
    assert torch.equal(k8.view(-1, 2, 16)[[0, 7]].float(), reference.quantize_kv(key[[0, 2]], 1.0).float())
    cpu_ops.store_kv(key[:0], value[:0], k8, v8, torch.zeros(0, dtype=torch.long))


@pytest.mark.parametrize("case", ["fp32 cache", "fp16 keys", "fp16 cache", "mixed caches"])
def test_kv_outside_the_c_kernels_is_the_reference(case: str, monkeypatch: pytest.MonkeyPatch) -> None:
    """Caches and K/V that the C fp8 code does not take (16-bit K/V or caches; an fp8 K cache
    beside an fp32 V cache) are the reference's, scales and all; an fp32 cache keeps the
    reference's store, and its decode ignores the scales."""
    for name in ("stoke_store_kv_fp8", "stoke_paged_decode_attention_fp8"):
        monkeypatch.setattr(cpu_ops._lib, name, lambda *_, name=name: pytest.fail(f"{name} was called"))
    gen = torch.Generator().manual_seed(4)
    lens = [9, 30]
    k_cache, v_cache, tables, _, _ = paged_batch(lens, 4, 2, 64, torch.float32, gen, pad_id=-1)
    key, value = torch.randn(2, 3, 2, 64, generator=gen)
    q = torch.randn(2, 4, 64, generator=gen)
    fp8 = reference.FP8_KV
    k_cache, v_cache, key, value, q = {
        "fp32 cache": (k_cache, v_cache, key, value, q),
        "fp16 keys": (k_cache.to(fp8), v_cache.to(fp8), key.half(), value.half(), q.half()),
        "fp16 cache": (k_cache.half(), v_cache.half(), key, value, q.half()),
        "mixed caches": (k_cache.to(fp8), v_cache, key, value, q),
    }[case]
    scales = dict(k_scale=0.5, v_scale=2.0)
    slots = torch.tensor([3, -1, 17])
    ours, theirs = (k_cache.clone(), v_cache.clone()), (k_cache.clone(), v_cache.clone())
    cpu_ops.store_kv(key, value, *ours, slots, **scales)
    reference.store_kv(key, value, *theirs, slots, **scales)
    assert all(torch.equal(a.view(torch.uint8), b.view(torch.uint8)) for a, b in zip(ours, theirs))
    args = (q, *ours, tables, torch.tensor(lens, dtype=torch.int32), 0.3)
    expected = (cpu_ops.paged_decode_attention(*args) if case == "fp32 cache"  # the fp32 C kernel
                else reference.paged_decode_attention(*args, **scales))
    assert torch.equal(cpu_ops.paged_decode_attention(*args, **scales), expected)


@pytest.mark.parametrize("rows,hidden", [(1, 576), (37, 64), (300, 20)])
@pytest.mark.parametrize("with_residual", [False, True])
def test_rms_norm_matches_reference(rows: int, hidden: int, with_residual: bool) -> None:
    gen = torch.Generator().manual_seed(rows)
    wide = torch.randn(rows, hidden + 7, generator=gen)
    x = wide[:, :hidden]  # strided rows, as a slice of a wider activation
    residual = torch.randn(rows, hidden, generator=gen) if with_residual else None
    weight = torch.randn(hidden, generator=gen)
    got = cpu_ops.rms_norm(x, weight, 1e-5, residual)
    expected = reference.rms_norm(x, weight, 1e-5, residual)
    if with_residual:
        torch.testing.assert_close(got[0], expected[0], atol=1e-5, rtol=1e-5)
        assert torch.equal(got[1], expected[1])
    else:
        torch.testing.assert_close(got, expected, atol=1e-5, rtol=1e-5)
    # 3-D inputs (Qwen3's per-head q/k norm) take the torch path
    x3 = torch.randn(4, 3, hidden, generator=gen)
    assert torch.equal(cpu_ops.rms_norm(x3, weight, 1e-6), reference.rms_norm(x3, weight, 1e-6))


# (head_dim, rotary_dim): every head dim rotated, Phi-4-mini's leading 3/4, half, one pair; the
# C loop's 8-wide vectors with and without a scalar tail (half = 48, 24, 12, 1).
ROTARY_DIMS = [(d, r) for d in (128, 64, 32) for r in (d, 3 * d // 4, d // 2, 2)] + [(12, 12), (12, 4)]


@pytest.mark.parametrize("head_dim,rotary_dim", ROTARY_DIMS)
def test_rotary_in_place_on_strided_views_matches_reference(head_dim: int, rotary_dim: int,
                                                            monkeypatch: pytest.MonkeyPatch) -> None:
    """q and k as views into one qkv tensor, as the model passes them: the C kernel (called once
    each for q and k, with the table's rotary_dim) rotates each head's leading rotary_dim dims as
    the reference does; dims rotary_dim.. of every head, and v, are bit-identical to the input."""
    gen = torch.Generator().manual_seed(head_dim + rotary_dim)
    tokens, hq, hkv = 23, 6, 2
    qkv = torch.randn(tokens, (hq + 2 * hkv) * head_dim, generator=gen)
    before = qkv.clone()
    q = qkv[:, : hq * head_dim].view(tokens, hq, head_dim)
    k = qkv[:, hq * head_dim : (hq + hkv) * head_dim].view(tokens, hkv, head_dim)
    angles = torch.rand(100, rotary_dim // 2, generator=gen) * 6
    cos, sin = angles.cos(), angles.sin()
    positions = torch.randint(0, 100, (tokens,), generator=gen)
    q_ref, k_ref = reference.apply_rotary(q.clone(), k.clone(), cos, sin, positions)
    c_calls = []
    c_rotary = cpu_ops._lib.stoke_rotary_f32
    monkeypatch.setattr(cpu_ops._lib, "stoke_rotary_f32", lambda *args: c_calls.append(args[6]) or c_rotary(*args))
    q_out, k_out = cpu_ops.apply_rotary(q, k, cos, sin, positions)
    assert c_calls == [rotary_dim, rotary_dim]  # the C kernel, not the torch fallback
    assert q_out is q and k_out is k  # in place
    torch.testing.assert_close(q, q_ref, atol=1e-6, rtol=1e-6)
    torch.testing.assert_close(k, k_ref, atol=1e-6, rtol=1e-6)
    heads = lambda t: t.view(tokens, hq + 2 * hkv, head_dim)  # noqa: E731
    assert torch.equal(heads(qkv)[..., rotary_dim:], heads(before)[..., rotary_dim:])  # pass-through dims
    assert torch.equal(qkv[:, (hq + hkv) * head_dim :], before[:, (hq + hkv) * head_dim :])  # v untouched
    if rotary_dim < head_dim:  # and the rotated dims did change
        assert not torch.equal(heads(qkv)[:, : hq + hkv, :rotary_dim], heads(before)[:, : hq + hkv, :rotary_dim])


@pytest.mark.parametrize("rows,inner", [(1, 1536), (70, 64), (5, 13)])
def test_silu_and_mul_matches_reference(rows: int, inner: int) -> None:
    gen = torch.Generator().manual_seed(inner)
    x = torch.randn(rows, 2 * inner, generator=gen) * 8  # both tails of the sigmoid
    x[0, :4] = torch.tensor([-120.0, 120.0, 0.0, -88.5])
    torch.testing.assert_close(cpu_ops.silu_and_mul(x), reference.silu_and_mul(x), atol=1e-6, rtol=1e-6)


@pytest.mark.parametrize("m,k,n", [(1, 576, 960), (5, 33, 37), (6, 64, 16), (13, 48, 1000), (200, 96, 50)])
@pytest.mark.parametrize("with_bias", [False, True])
@pytest.mark.parametrize("threads", [1, 2])
def test_linear_matches_torch(m: int, k: int, n: int, with_bias: bool, threads: int,
                              monkeypatch: pytest.MonkeyPatch) -> None:
    """Every register-tile height (1-6 rows and their mix), a last panel of 1-15 columns, odd K,
    one or two threads, and rows read through a stride (a slice of wider rows)."""
    monkeypatch.setattr(torch, "get_num_threads", lambda: threads)
    monkeypatch.setattr(cpu_ops, "BLAS_MIN_ROWS", None)  # the C product at every row count
    gen = torch.Generator().manual_seed(m * n + k)
    weight = torch.randn(n, k, generator=gen)
    bias = torch.randn(n, generator=gen) if with_bias else None
    wide = torch.randn(m, k + 7, generator=gen)
    x = wide[:, 3 : 3 + k]
    packed = cpu_ops.pack_linear_weight(weight)
    assert packed is not None and packed.numel() == -(-n // 16) * 16 * k
    assert torch.equal(cpu_ops.unpack_linear_weight(packed, n, k), weight)
    out = cpu_ops.linear(x, packed, bias, n)
    torch.testing.assert_close(out, torch.nn.functional.linear(x, weight, bias), atol=2e-5 * k**0.5, rtol=1e-5)


def test_linear_hands_many_rows_to_the_blas(monkeypatch: pytest.MonkeyPatch) -> None:
    """From BLAS_MIN_ROWS rows (set where the CPU has AVX-512: torch's BLAS runs wider vectors
    than the C tile) the product is torch's over the unpacked weight; below, the C product's."""
    monkeypatch.setattr(cpu_ops, "BLAS_MIN_ROWS", 8)
    c_calls = []
    c_product = cpu_ops._lib.stoke_linear_f32
    monkeypatch.setattr(cpu_ops._lib, "stoke_linear_f32", lambda *args: c_calls.append(args[4]) or c_product(*args))
    gen = torch.Generator().manual_seed(2)
    weight, bias = torch.randn(40, 24, generator=gen), torch.randn(40, generator=gen)
    packed = cpu_ops.pack_linear_weight(weight)
    x = torch.randn(9, 24, generator=gen)
    assert torch.equal(cpu_ops.linear(x[:8], packed, bias, 40), torch.nn.functional.linear(x[:8], weight, bias))
    assert c_calls == []
    torch.testing.assert_close(cpu_ops.linear(x[:7], packed, bias, 40), torch.nn.functional.linear(x[:7], weight, bias))
    assert c_calls == [7]


def test_linear_outside_the_c_product_is_torch() -> None:
    """Inputs the C product does not take (off fp32, 3-D) get torch's result over the unpacked
    weight; weights it can't pack are left to torch; zero rows give an empty result."""
    gen = torch.Generator().manual_seed(1)
    weight = torch.randn(40, 24, generator=gen)
    packed = cpu_ops.pack_linear_weight(weight)
    x = torch.randn(3, 24, generator=gen)
    assert torch.equal(cpu_ops.linear(x.double(), packed, None, 40), torch.nn.functional.linear(x.double(), weight.double()))
    x3 = x.view(3, 1, 24)
    assert torch.equal(cpu_ops.linear(x3, packed, None, 40), torch.nn.functional.linear(x3, weight))
    assert cpu_ops.pack_linear_weight(weight.half()) is None
    assert cpu_ops.pack_linear_weight(torch.randn(2, 3, 4)) is None
    assert cpu_ops.linear(x[:0], packed, None, 40).shape == (0, 40)


def _fp8_weight(n: int, k: int, group_size: int, gen: torch.Generator) -> tuple[torch.Tensor, torch.Tensor]:
    """An fp8 weight `[n, k]` over e4m3's whole range (subnormals to 448, both signs) and its
    scales `[n, ceil(k / group_size)]`, dequantizing to about unit size."""
    weight = (torch.randn(n, k, generator=gen) * torch.rand(n, k, generator=gen) * 300).to(torch.float8_e4m3fn)
    return weight, torch.rand(n, -(-k // group_size), generator=gen) / 100 + 1e-3


def _check_every_fp8_byte(monkeypatch: pytest.MonkeyPatch) -> None:
    """All 256 bytes but the two NaNs, as one-column rows (K = 1, x = 1: y is the dequantized
    weight itself), equal torch's decoding, alone and times a scale (rounded once), also where
    the CPU flushes fp32 subnormals (one thread: the mode is the calling thread's)."""
    monkeypatch.setattr(torch, "get_num_threads", lambda: 1)
    weight = torch.arange(256, dtype=torch.uint8).view(torch.float8_e4m3fn)[:, None]
    values = weight.float()[:, 0]
    finite = ~values.isnan()
    scale = torch.rand(256, 1, generator=torch.Generator().manual_seed(0)) * 3
    packed = cpu_ops.pack_fp8_linear_weight(weight)
    one = torch.ones(1, 1)
    for flush in (False, True):
        if flush and not torch.set_flush_denormal(True):
            continue  # a CPU without the mode
        try:
            assert torch.equal(cpu_ops.fp8_linear(one, packed, torch.ones(256, 1), 1, None, 256)[0, finite], values[finite])
            got = cpu_ops.fp8_linear(one, packed, scale, 1, None, 256)[0, finite]
            assert torch.equal(got, reference.dequantize_fp8(weight, scale, 1, torch.float32)[finite, 0])
        finally:
            torch.set_flush_denormal(False)


def test_fp8_decodes_every_byte_exactly(monkeypatch: pytest.MonkeyPatch) -> None:
    _check_every_fp8_byte(monkeypatch)


def test_fp8_portable_decoding_is_exact_too(monkeypatch: pytest.MonkeyPatch, tmp_path) -> None:
    """csrc/fp8.h's decode built without the x86 fp16 conversion (as on ARM) decodes the same:
    linear_fp8.c's product and its dequantized weight for the BLAS agree, and paged_attention.c
    over an fp8 cache of every finite byte gives the F16C build's result bit for bit."""
    import ctypes
    import subprocess

    target = tmp_path / "fp8_portable.so"
    subprocess.run([native._compiler(), *native.FLAGS, "-DSTOKE_FP8_PORTABLE", f"-I{native.SOURCE_DIR}",
                    *(str(native.SOURCE_DIR / f) for f in ("linear_fp8.c", "paged_attention.c")), "-o", str(target),
                    "-lm"], check=True)
    lib = ctypes.CDLL(str(target))
    for name in ("stoke_pack_linear_weight_u8", "stoke_linear_fp8", "stoke_dequantize_fp8",
                 "stoke_paged_decode_attention_fp8"):
        original = getattr(cpu_ops._lib, name)
        getattr(lib, name).restype, getattr(lib, name).argtypes = original.restype, original.argtypes
    gen = torch.Generator().manual_seed(2)
    finite = torch.tensor([b for b in range(256) if b & 0x7F != 0x7F], dtype=torch.uint8)
    k8, v8 = finite[torch.randint(0, finite.numel(), (2, 12, 8, 2, 64), generator=gen)].view(torch.float8_e4m3fn)
    tables = torch.randperm(12, generator=gen).int().view(3, 4)
    q = torch.randn(3, 6, 64, generator=gen) / 30
    args = (q, k8, v8, tables, torch.tensor([1, 17, 32], dtype=torch.int32), 0.125)
    native_out = cpu_ops.paged_decode_attention(*args, k_scale=0.37, v_scale=2.5)
    monkeypatch.setattr(cpu_ops, "_lib", lib)
    assert torch.equal(cpu_ops.paged_decode_attention(*args, k_scale=0.37, v_scale=2.5), native_out)
    _check_every_fp8_byte(monkeypatch)
    gen = torch.Generator().manual_seed(1)
    weight, scale = _fp8_weight(37, 1100, 48, gen)
    x = torch.randn(7, 1100, generator=gen)
    packed = cpu_ops.pack_fp8_linear_weight(weight)
    torch.testing.assert_close(cpu_ops.fp8_linear(x, packed, scale, 48, None, 37), reference.fp8_linear(x, weight, scale, 48),
                               atol=2e-5, rtol=1e-5)
    monkeypatch.setattr(cpu_ops, "FP8_BLAS_MIN_ROWS", 0)
    assert torch.equal(cpu_ops.fp8_linear(x, packed, scale, 48, None, 37), reference.fp8_linear(x, weight, scale, 48))


# (n, k, group_size): per-channel scales (group_size = K), block checkpoints' 128 with a ragged
# last group, ragged 48-column groups (one across the C product's 1024-k blocks) and 32, 16,
# K = 1; N padded in the last panel or not; and a real layer's K of 2048 in groups of 128, a
# group starting at each 1024-k block.
FP8_SHAPES = [(40, 64, 64), (16, 576, 128), (37, 1100, 48), (1000, 96, 16), (50, 200, 32), (17, 1, 1),
              (24, 2048, 128)]


# Rows: every register-tile height of both paths (1-6 in registers; 6 + 1-6 through a block).
@pytest.mark.parametrize("m", [0, 1, 2, 3, 4, 5, 6, 7, 8, 9, 10, 11, 12])
@pytest.mark.parametrize("n,k,group_size", FP8_SHAPES)
@pytest.mark.parametrize("with_bias", [False, True])
@pytest.mark.parametrize("threads", [1, 2])
def test_fp8_linear_matches_reference(m: int, n: int, k: int, group_size: int, with_bias: bool, threads: int,
                                      monkeypatch: pytest.MonkeyPatch) -> None:
    """The C product over the packed fp8 weight against kernels.reference.fp8_linear, which
    dequantizes the whole weight: every register-tile height and their mix, rows read through a
    stride, a last panel of 1-15 columns; they differ by summation order only. Up to 6 rows
    dequantize in registers, more through a dequantized block: the same sums, bit for bit."""
    monkeypatch.setattr(torch, "get_num_threads", lambda: threads)
    monkeypatch.setattr(cpu_ops, "FP8_BLAS_MIN_ROWS", None)  # the C product at every row count
    gen = torch.Generator().manual_seed(m * n + k)
    weight, scale = _fp8_weight(n, k, group_size, gen)
    bias = torch.randn(n, generator=gen) if with_bias else None
    x = torch.randn(m, k + 7, generator=gen)[:, 3 : 3 + k]
    packed = cpu_ops.pack_fp8_linear_weight(weight)
    assert packed is not None and packed.dtype == torch.float8_e4m3fn and packed.numel() == -(-n // 16) * 16 * k
    assert torch.equal(cpu_ops.unpack_linear_weight(packed, n, k).view(torch.uint8), weight.view(torch.uint8))
    out = cpu_ops.fp8_linear(x, packed, scale, group_size, bias, n)
    assert out.shape == (m, n) and out.dtype == torch.float32
    # Summation order alone: within a few ulps of the sum of the terms' magnitudes
    magnitude = x.abs() @ reference.dequantize_fp8(weight, scale, group_size, torch.float32).abs().T
    error = (out - reference.fp8_linear(x, weight, scale, group_size, bias)).abs()
    assert bool((error <= 4e-6 * magnitude + 1e-6).all()), float((error / (magnitude + 1e-9)).max())
    if m > 6:
        rows = [cpu_ops.fp8_linear(x[i : i + 1], packed, scale, group_size, bias, n) for i in range(m)]
        assert torch.equal(out, torch.cat(rows))
    monkeypatch.setattr(cpu_ops, "FP8_BLAS_MIN_ROWS", 0)  # the BLAS over the weight C dequantizes
    strided_scale = scale.t().contiguous().t()  # the same scales, not contiguous: copied and held for C
    for scales in (scale, strided_scale):
        assert torch.equal(cpu_ops.fp8_linear(x, packed, scales, group_size, bias, n),
                           reference.fp8_linear(x, weight, scale, group_size, bias))


def test_fp8_linear_hands_many_rows_to_the_blas(monkeypatch: pytest.MonkeyPatch) -> None:
    """From FP8_BLAS_MIN_ROWS rows the product is the reference's, bit for bit (the weight
    dequantized for the call into a workspace that the next call, of any size, reuses or
    grows, then torch's BLAS); below, the C product's."""
    monkeypatch.setattr(cpu_ops, "FP8_BLAS_MIN_ROWS", 8)
    monkeypatch.setattr(cpu_ops, "_fp8_workspace", torch.empty(0))
    c_calls = []
    c_product = cpu_ops._lib.stoke_linear_fp8
    monkeypatch.setattr(cpu_ops._lib, "stoke_linear_fp8", lambda *args: c_calls.append(args[5]) or c_product(*args))
    gen = torch.Generator().manual_seed(2)
    for n, k, group_size in [(40, 24, 16), (50, 40, 40), (40, 24, 16)]:
        weight, scale = _fp8_weight(n, k, group_size, gen)
        bias = torch.randn(n, generator=gen)
        packed = cpu_ops.pack_fp8_linear_weight(weight)
        x = torch.randn(9, k, generator=gen)
        assert torch.equal(cpu_ops.fp8_linear(x[:8], packed, scale, group_size, bias, n),
                           reference.fp8_linear(x[:8], weight, scale, group_size, bias))
        assert torch.equal(cpu_ops.fp8_linear(x, packed, scale, group_size, None, n),
                           reference.fp8_linear(x, weight, scale, group_size))
    assert c_calls == [] and cpu_ops._fp8_workspace.numel() == 50 * 40
    torch.testing.assert_close(cpu_ops.fp8_linear(x[:7], packed, scale, group_size, bias, n),
                               reference.fp8_linear(x[:7], weight, scale, group_size, bias), atol=1e-5, rtol=1e-5)
    assert c_calls == [7]


def test_fp8_linear_outside_the_c_product_is_the_reference() -> None:
    """Inputs the C product does not take (off fp32, 3-D) get the reference's result over the
    unpacked weight; weights it can't pack are left to the reference; zero rows give an empty
    result."""
    gen = torch.Generator().manual_seed(1)
    weight, scale = _fp8_weight(40, 24, 16, gen)
    packed = cpu_ops.pack_fp8_linear_weight(weight)
    x = torch.randn(3, 24, generator=gen)
    for other in (x.double(), x.bfloat16(), x.view(3, 1, 24)):
        assert torch.equal(cpu_ops.fp8_linear(other, packed, scale, 16, None, 40),
                           reference.fp8_linear(other, weight, scale, 16))
    assert cpu_ops.pack_fp8_linear_weight(weight.float()) is None
    assert cpu_ops.pack_fp8_linear_weight(weight.view(torch.float8_e5m2)) is None
    assert cpu_ops.pack_fp8_linear_weight(weight.view(2, 20, 24)) is None
    assert cpu_ops.fp8_linear(x[:0], packed, scale, 16, None, 40).shape == (0, 40)


@pytest.mark.parametrize("kind", ["qwen2", "llama"])  # tied head with qkv bias; untied head
def test_model_projections_through_packed_weights(tiny_checkpoints: dict[str, str], kind: str) -> None:
    """use_linear_kernels packs every projection and the head in place of their weights (held
    once; a tied head's packed weight also serves the embedding lookups), logits agree with
    torch's, and None unpacks the very same weights again."""
    from engine.config import ModelConfig
    from engine.models.llama import Linear, LlamaForCausalLM
    from engine.weights import iterate_safetensors

    path = tiny_checkpoints[kind]
    config = ModelConfig.from_dir(path)
    model = LlamaForCausalLM(config)
    model.load_weights(iterate_safetensors(path))
    before = {name: p.detach().clone() for name, p in model.named_parameters()}
    hidden = torch.randn(5, config.hidden_size, generator=torch.Generator().manual_seed(2))
    with torch.inference_mode():
        want = model.compute_logits(hidden)
    model.use_linear_kernels(cpu_ops)
    linears = [m for m in model.modules() if isinstance(m, Linear)]
    assert linears and all(m.packed is not None and m.weight.numel() == 0 for m in linears)
    tied = model.lm_head is None
    assert (model.head_packed is not None) == tied
    # A tied head's packed weight serves the embedding too: held once, the same rows.
    assert (model.model.embed_tokens.weight.numel() == 0) == tied
    if tied:
        ids = torch.tensor([0, 5, 17, config.vocab_size - 1, 5])
        assert torch.equal(cpu_ops.embedding_from_packed(model.head_packed, ids, config.hidden_size),
                           before["model.embed_tokens.weight"][ids])
    with torch.inference_mode():
        torch.testing.assert_close(model.compute_logits(hidden), want, atol=1e-4, rtol=1e-5)
    model.use_linear_kernels(None)
    assert all(m.packed is None for m in linears) and model.head_packed is None
    assert all(torch.equal(p, before[name]) for name, p in model.named_parameters())
    with torch.inference_mode():
        assert torch.equal(model.compute_logits(hidden), want)


def test_backend_is_c_on_cpu_and_falls_back_without_a_compiler(
    monkeypatch: pytest.MonkeyPatch, tmp_path, caplog: pytest.LogCaptureFixture
) -> None:
    monkeypatch.delenv(kernels.BACKEND_ENV, raising=False)
    assert kernels.attention_backend(torch.device("cpu")) is cpu_ops
    monkeypatch.setenv(kernels.BACKEND_ENV, "reference")
    assert kernels.attention_backend(torch.device("cpu")) is reference
    monkeypatch.setenv(kernels.BACKEND_ENV, "triton")  # on a CPU, only in the interpreter
    monkeypatch.delenv("TRITON_INTERPRET", raising=False)
    with pytest.raises(ValueError, match="TRITON_INTERPRET=1"):
        kernels.attention_backend(torch.device("cpu"))
    monkeypatch.setenv(kernels.BACKEND_ENV, "reference")

    # A machine without a compiler: a fresh import of cpu_ops fails to build and the default
    # falls back to the reference, saying why; asking for "cpu" by name is an error.
    monkeypatch.setenv("STOKE_CACHE_DIR", str(tmp_path))
    monkeypatch.setenv("CC", "no-such-compiler")
    monkeypatch.setenv("PATH", str(tmp_path))
    monkeypatch.delitem(__import__("sys").modules, "kernels.cpu_ops")
    native.load.cache_clear()
    try:
        monkeypatch.delenv(kernels.BACKEND_ENV)
        with caplog.at_level(logging.WARNING, logger="kernels"):
            assert kernels.attention_backend(torch.device("cpu")) is reference
        assert "no C compiler" in caplog.text
        monkeypatch.setenv(kernels.BACKEND_ENV, "cpu")
        with pytest.raises(RuntimeError, match="no C compiler"):
            kernels.attention_backend(torch.device("cpu"))
    finally:
        native.load.cache_clear()


def test_build_is_cached_per_source_and_cpu(monkeypatch: pytest.MonkeyPatch, tmp_path) -> None:
    monkeypatch.setenv("STOKE_CACHE_DIR", str(tmp_path))
    native.load.cache_clear()
    try:
        native.load()
        built = list((tmp_path / "kernels").glob(f"*/{native.LIBRARY}"))
        assert len(built) == 1
        mtime = built[0].stat().st_mtime_ns
        native.load.cache_clear()
        native.load()  # a new process would find the same file
        assert built[0].stat().st_mtime_ns == mtime
        assert [p.name for p in built[0].parent.iterdir()] == [native.LIBRARY]  # no temporaries left
    finally:
        native.load.cache_clear()


@pytest.mark.parametrize("kv_cache_dtype", ["auto", "fp8"])
def test_engine_tokens_equal_the_reference_backend(kv_cache_dtype: str, tiny_checkpoints: dict[str, str],
                                                   monkeypatch: pytest.MonkeyPatch) -> None:
    """Mixed decode/prefill steps (a 16-token budget chunks the long prompts) with prefix hits,
    over an fp32 KV cache or an fp8 one."""
    from engine import LLM, SamplingParams

    rng = random.Random(4)
    shared = [rng.randrange(3, 500) for _ in range(40)]
    prompts = [shared + [rng.randrange(3, 500) for _ in range(n)] for n in (1, 7, 30)]
    prompts += [[rng.randrange(3, 500) for _ in range(n)] for n in (2, 60)]
    params = SamplingParams(max_tokens=12, temperature=0.0, ignore_eos=True)
    tokens = {}
    for backend in ("reference", "cpu"):
        monkeypatch.setenv(kernels.BACKEND_ENV, backend)
        llm = LLM(tiny_checkpoints["qwen2"], num_kv_blocks=64, block_size=8, max_num_batched_tokens=16,
                  kv_cache_dtype=kv_cache_dtype)
        assert llm.engine.runner.backend is (cpu_ops if backend == "cpu" else reference)
        assert llm.engine.runner.kv_cache_dtype == (torch.float32 if kv_cache_dtype == "auto" else reference.FP8_KV)
        tokens[backend] = [o.outputs[0].token_ids for o in llm.generate(prompts, params)]
        assert llm.engine.scheduler.block_manager.num_used_blocks == 0
    assert tokens["cpu"] == tokens["reference"]


def _inconsistent_inputs() -> dict[str, tuple]:
    """Calls whose shapes disagree, each as (cpu_ops function, the torch reference, args): the C
    kernels would read out of bounds (or divide by zero) on them."""
    import torch.nn.functional as F

    r = torch.randn
    packed24 = cpu_ops.pack_linear_weight(r(40, 24))
    fp8_24, scale24 = _fp8_weight(40, 24, 16, torch.Generator().manual_seed(0))
    packed8 = cpu_ops.pack_fp8_linear_weight(fp8_24)
    fp8_ref = lambda x, p, s, g, b, n: reference.fp8_linear(  # noqa: E731
        x, cpu_ops.unpack_linear_weight(p, n, 24), s, g, b)
    q, cache = r(2, 3, 64), r(4, 16, 2, 64)
    fp8 = lambda x: reference.quantize_kv(x, 1.0)  # noqa: E731
    tables, lens = torch.zeros(2, 2, dtype=torch.int32), torch.tensor([5, 9], dtype=torch.int32)
    table = r(100, 32)
    return {
        "linear, K = 0": (cpu_ops.linear, lambda x, p, b, n: F.linear(x, torch.zeros(n, 0)),
                          (r(3, 0), cpu_ops.pack_linear_weight(r(32, 0)), None, 32)),
        "linear, K of x not the weight's": (
            cpu_ops.linear, lambda x, p, b, n: F.linear(x, cpu_ops.unpack_linear_weight(p, n, 24)),
            (r(3, 64), packed24, None, 40)),
        "linear, a one-element bias": (
            cpu_ops.linear, lambda x, p, b, n: F.linear(x, cpu_ops.unpack_linear_weight(p, n, 24), b),
            (r(3, 24), packed24, r(1), 40)),
        "fp8_linear, K = 0": (cpu_ops.fp8_linear, lambda x, p, s, g, b, n: reference.fp8_linear(
            x, torch.zeros(n, 0, dtype=torch.float8_e4m3fn), s, g, b),
            (r(3, 0), cpu_ops.pack_fp8_linear_weight(fp8_24[:, :0]), r(40, 0), 16, None, 40)),
        "fp8_linear, K of x not the weight's": (cpu_ops.fp8_linear, fp8_ref, (r(3, 64), packed8, r(40, 4), 16, None, 40)),
        "fp8_linear, scales of another group size": (cpu_ops.fp8_linear, fp8_ref, (r(3, 24), packed8, r(40, 3), 16, None, 40)),
        "fp8_linear, scales for fewer rows": (cpu_ops.fp8_linear, fp8_ref, (r(3, 24), packed8, r(39, 2), 16, None, 40)),
        "fp8_linear, a group size of 0": (cpu_ops.fp8_linear, fp8_ref, (r(3, 24), packed8, scale24, 0, None, 40)),
        "fp8_linear, a one-element bias": (cpu_ops.fp8_linear, fp8_ref, (r(3, 24), packed8, scale24, 16, r(1), 40)),
        "rms_norm, a one-element weight": (cpu_ops.rms_norm, reference.rms_norm, (r(4, 64), r(1), 1e-6)),
        "rms_norm, a broadcast residual": (cpu_ops.rms_norm, reference.rms_norm, (r(4, 64), r(64), 1e-6, r(1, 64))),
        "rotary, fewer positions than tokens": (cpu_ops.apply_rotary, reference.apply_rotary,
                                                (r(4, 2, 64), r(4, 1, 64), table, table, torch.arange(2))),
        "rotary, full-width tables": (cpu_ops.apply_rotary, reference.apply_rotary,
                                      (r(4, 2, 64), r(4, 1, 64), r(100, 64), r(100, 64), torch.arange(4))),
        "rotary, tables one pair wider than half the head": (
            cpu_ops.apply_rotary, reference.apply_rotary,
            (r(4, 2, 64), r(4, 1, 64), r(100, 33), r(100, 33), torch.arange(4))),
        "rotary, a sin table narrower than cos": (cpu_ops.apply_rotary, reference.apply_rotary,
                                                  (r(4, 2, 64), r(4, 1, 64), table, r(100, 24), torch.arange(4))),
        "rotary, k of another head_dim": (cpu_ops.apply_rotary, reference.apply_rotary,
                                          (r(4, 2, 64), r(4, 1, 48), r(100, 24), r(100, 24), torch.arange(4))),
        "silu_and_mul, an odd width": (cpu_ops.silu_and_mul, reference.silu_and_mul, (r(4, 129),)),
        "decode, a cache of another head_dim": (cpu_ops.paged_decode_attention, reference.paged_decode_attention,
                                                (q, r(4, 16, 1, 32), r(4, 16, 1, 32), tables, lens, 0.1)),
        "decode, query heads not a multiple of kv heads": (
            cpu_ops.paged_decode_attention, reference.paged_decode_attention, (q, cache, cache, tables, lens, 0.1)),
        "decode, fewer tables than queries": (cpu_ops.paged_decode_attention, reference.paged_decode_attention,
                                              (r(2, 4, 64), cache, cache, tables[:1], lens[:1], 0.1)),
        "decode, an fp8 cache of another head_dim": (
            cpu_ops.paged_decode_attention, reference.paged_decode_attention,
            (q, fp8(r(4, 16, 1, 32)), fp8(r(4, 16, 1, 32)), tables, lens, 0.1)),
        "decode, fp8 K and V caches of different shapes": (
            cpu_ops.paged_decode_attention, reference.paged_decode_attention,
            (r(2, 4, 64), fp8(cache), fp8(r(4, 8, 2, 64)), tables, lens, 0.1)),
        "store_kv, values of another head_dim": (cpu_ops.store_kv, reference.store_kv,
                                                 (r(3, 2, 64), r(3, 2, 32), fp8(cache), fp8(cache), torch.arange(3))),
        "store_kv, keys of another head_dim than the cache's": (
            cpu_ops.store_kv, reference.store_kv, (r(3, 2, 32), r(3, 2, 32), fp8(cache), fp8(cache), torch.arange(3))),
        "store_kv, fewer slots than tokens": (cpu_ops.store_kv, reference.store_kv,
                                              (r(3, 2, 64), r(3, 2, 64), fp8(cache), fp8(cache), torch.arange(2))),
    }


@pytest.mark.parametrize("case", list(_inconsistent_inputs()))
def test_inconsistent_shapes_never_reach_c(case: str, monkeypatch: pytest.MonkeyPatch) -> None:
    """Shapes that disagree go to torch, which raises or broadcasts as the reference does: C,
    which trusts them, would read out of bounds, or crash the worker (here a call into C fails
    the test instead)."""
    torch.manual_seed(0)
    fn, ref, args = _inconsistent_inputs()[case]
    for name in ("stoke_linear_f32", "stoke_linear_fp8", "stoke_dequantize_fp8", "stoke_rms_norm_f32", "stoke_rotary_f32", "stoke_silu_and_mul_f32",
                 "stoke_paged_decode_attention_f32", "stoke_paged_decode_attention_fp8", "stoke_store_kv_fp8"):
        monkeypatch.setattr(cpu_ops._lib, name, lambda *_, name=name: pytest.fail(f"{name} was called"))
    clone = lambda: [a.clone() if isinstance(a, torch.Tensor) else a for a in args]  # noqa: E731 (rotary is in place)
    try:
        want = ref(*clone())
    except (RuntimeError, ValueError, IndexError) as exc:
        with pytest.raises(type(exc)):
            fn(*clone())
        return
    got = fn(*clone())
    for g, w in zip(got if isinstance(got, tuple) else (got,), want if isinstance(want, tuple) else (want,)):
        torch.testing.assert_close(g, w)
