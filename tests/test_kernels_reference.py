"""kernels.reference against a deliberately naive oracle: one sequence at a time, fp64,
explicit causal softmax over keys that the test itself placed in the paged cache."""

import math
import sys

import pytest
import torch

import kernels
from kernels import reference

TOL = {torch.float32: dict(atol=1e-5, rtol=1e-5), torch.float16: dict(atol=4e-3, rtol=4e-3)}


def naive_attention(
    q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, scale: float, window: int = 0, softcap: float = 0.0
) -> torch.Tensor:
    """q `[n, Hq, D]` are the last n positions of a sequence whose keys are k/v `[L, Hkv, D]`;
    with `window`, position p sees keys p - window < k <= p; `softcap` caps the scores."""
    n, L = q.shape[0], k.shape[0]
    group = q.shape[1] // k.shape[1]
    k = k.double().repeat_interleave(group, 1)
    v = v.double().repeat_interleave(group, 1)
    scores = torch.einsum("qhd,khd->hqk", q.double(), k) * scale
    if softcap:
        scores = softcap * torch.tanh(scores / softcap)
    positions = torch.arange(L - n, L)
    causal = torch.arange(L)[None, :] <= positions[:, None]
    if window:
        causal &= torch.arange(L)[None, :] > positions[:, None] - window
    scores = scores.masked_fill(~causal, -math.inf)
    probs = torch.exp(scores - scores.amax(-1, keepdim=True))
    probs = probs / probs.sum(-1, keepdim=True)
    return torch.einsum("hqk,khd->qhd", probs, v)


# Any masked key that leaked into attention would dominate the output.
POISON = 300.0


def paged_batch(
    context_lens: list[int], block_size: int, num_kv_heads: int, head_dim: int,
    dtype: torch.dtype, gen: torch.Generator, pad_id: int,
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, list[torch.Tensor], list[torch.Tensor]]:
    """Caches holding each sequence's keys in scattered blocks (a large finite poison value
    everywhere else — the contract asks for finite stale slots — block 0
    included), the block tables (rows padded with `pad_id` past the blocks used: -1, the
    unused block 0, or another sequence's block) and the keys/values."""
    needed = [-(-n // block_size) for n in context_lens]
    num_blocks = sum(needed) + 3
    shape = (num_blocks, block_size, num_kv_heads, head_dim)
    k_cache = torch.full(shape, POISON, dtype=dtype)
    v_cache = torch.full(shape, POISON, dtype=dtype)
    ids = (torch.randperm(num_blocks - 1, generator=gen) + 1).tolist()  # block 0 stays unused
    tables = torch.full((len(context_lens), max(needed) + 2), pad_id, dtype=torch.int32)
    keys, values = [], []
    for b, n in enumerate(context_lens):
        k = torch.randn(n, num_kv_heads, head_dim, generator=gen).to(dtype)
        v = torch.randn(n, num_kv_heads, head_dim, generator=gen).to(dtype)
        row = [ids.pop() for _ in range(needed[b])]
        tables[b, : len(row)] = torch.tensor(row)
        for i in range(n):
            k_cache[row[i // block_size], i % block_size] = k[i]
            v_cache[row[i // block_size], i % block_size] = v[i]
        keys.append(k)
        values.append(v)
    return k_cache, v_cache, tables, keys, values


def ragged_lens(
    gen: torch.Generator, batch: int, block_size: int, high: int, shortest: int = 1
) -> list[int]:
    """Random lengths that include `shortest` and an exact multiple of the block size."""
    lens = torch.randint(shortest, high, (batch,), generator=gen).tolist()
    return [shortest, 2 * block_size, *lens]


CONFIGS = [  # (query heads per kv head, head_dim, block_size, dtype)
    (1, 64, 16, torch.float32),
    (3, 64, 4, torch.float32),
    (4, 32, 16, torch.float32),
    (8, 32, 4, torch.float32),
    (3, 64, 16, torch.float16),
    (8, 32, 4, torch.float16),
]


@pytest.mark.parametrize("group,head_dim,block_size,dtype", CONFIGS)
@pytest.mark.parametrize("seed", range(3))
def test_decode_matches_naive(
    group: int, head_dim: int, block_size: int, dtype: torch.dtype, seed: int
) -> None:
    gen = torch.Generator().manual_seed(seed)
    num_kv_heads = 2
    lens = ragged_lens(gen, 4, block_size, 70, shortest=(1, 1, block_size + 3)[seed])
    k_cache, v_cache, tables, keys, values = paged_batch(
        lens, block_size, num_kv_heads, head_dim, dtype, gen, pad_id=(-1, 0, 5)[seed]
    )
    q = torch.randn(len(lens), num_kv_heads * group, head_dim, generator=gen).to(dtype)
    scale = head_dim**-0.5
    out = reference.paged_decode_attention(
        q, k_cache, v_cache, tables, torch.tensor(lens, dtype=torch.int32), scale
    )
    assert out.shape == q.shape and out.dtype == dtype
    expected = torch.cat(
        [naive_attention(q[b : b + 1], keys[b], values[b], scale) for b in range(len(lens))]
    )
    torch.testing.assert_close(out.double(), expected, **TOL[dtype])


@pytest.mark.parametrize("group,head_dim,block_size,dtype", CONFIGS)
@pytest.mark.parametrize("seed", range(3))
def test_prefill_matches_naive(
    group: int, head_dim: int, block_size: int, dtype: torch.dtype, seed: int
) -> None:
    gen = torch.Generator().manual_seed(100 + seed)
    num_kv_heads = 2
    lens = ragged_lens(gen, 4, block_size, 50, shortest=(1, 1, block_size + 3)[seed])
    # New tokens per sequence: all of it (no cached prefix), 1, or a random suffix.
    q_lens = [
        (n, 1, int(torch.randint(1, n + 1, (), generator=gen)))[i % 3] for i, n in enumerate(lens)
    ]
    k_cache, v_cache, tables, keys, values = paged_batch(
        lens, block_size, num_kv_heads, head_dim, dtype, gen, pad_id=(-1, 0, 5)[seed]
    )
    q = torch.randn(sum(q_lens), num_kv_heads * group, head_dim, generator=gen).to(dtype)
    cu_seqlens = torch.tensor([0, *q_lens], dtype=torch.int32).cumsum(0, dtype=torch.int32)
    scale = 0.3
    out = reference.paged_prefill_attention(
        q, k_cache, v_cache, tables, cu_seqlens, torch.tensor(lens, dtype=torch.int32), scale
    )
    assert out.shape == q.shape and out.dtype == dtype
    expected = torch.cat([
        naive_attention(q[cu_seqlens[b] : cu_seqlens[b + 1]], keys[b], values[b], scale)
        for b in range(len(lens))
    ])
    torch.testing.assert_close(out.double(), expected, **TOL[dtype])


@pytest.mark.parametrize("window,softcap", [(1, 0.0), (3, 0.0), (4, 0.0), (9, 2.0), (0, 2.0), (200, 0.0)])
@pytest.mark.parametrize("dtype", [torch.float32, torch.float16])
def test_windows_and_softcaps_match_naive(window: int, softcap: float, dtype: torch.dtype) -> None:
    """Sliding windows (one key, under a block, a block, past every context) and softcapped
    scores, decode and prefill (whole prompts, one token, suffixes after a cached prefix)."""
    gen = torch.Generator().manual_seed(window)
    num_kv_heads, group, head_dim, block_size = 2, 3, 32, 4
    lens = ragged_lens(gen, 4, block_size, 40)
    q_lens = [(n, 1, int(torch.randint(1, n + 1, (), generator=gen)))[i % 3] for i, n in enumerate(lens)]
    k_cache, v_cache, tables, keys, values = paged_batch(lens, block_size, num_kv_heads, head_dim, dtype, gen, -1)
    context = torch.tensor(lens, dtype=torch.int32)
    shape = dict(sliding_window=window, softcap=softcap)
    q = torch.randn(sum(q_lens), num_kv_heads * group, head_dim, generator=gen).to(dtype) * 2
    cu_seqlens = torch.tensor([0, *q_lens], dtype=torch.int32).cumsum(0, dtype=torch.int32)
    out = reference.paged_prefill_attention(q, k_cache, v_cache, tables, cu_seqlens, context, 0.5, **shape)
    expected = [naive_attention(q[cu_seqlens[b]:cu_seqlens[b + 1]], keys[b], values[b], 0.5, window, softcap)
                for b in range(len(lens))]
    torch.testing.assert_close(out.double(), torch.cat(expected), **TOL[dtype])
    last = q[cu_seqlens[1:].long() - 1]
    out = reference.paged_decode_attention(last, k_cache, v_cache, tables, context, 0.5, **shape)
    torch.testing.assert_close(out.double(), torch.cat([e[-1:] for e in expected]), **TOL[dtype])


@pytest.mark.parametrize("dtype", [torch.float32, torch.float16])
def test_decode_equals_prefill_with_one_query_each(dtype: torch.dtype) -> None:
    gen = torch.Generator().manual_seed(7)
    lens = ragged_lens(gen, 6, 16, 90)
    k_cache, v_cache, tables, _, _ = paged_batch(lens, 16, 3, 64, dtype, gen, pad_id=-1)
    q = torch.randn(len(lens), 9, 64, generator=gen).to(dtype)
    context_lens = torch.tensor(lens, dtype=torch.int32)
    cu_seqlens = torch.arange(len(lens) + 1, dtype=torch.int32)
    decode = reference.paged_decode_attention(q, k_cache, v_cache, tables, context_lens, 0.125)
    prefill = reference.paged_prefill_attention(
        q, k_cache, v_cache, tables, cu_seqlens, context_lens, 0.125
    )
    torch.testing.assert_close(decode, prefill, atol=1e-6, rtol=1e-6)


@pytest.mark.parametrize("slot_dtype", [torch.int32, torch.int64])
@pytest.mark.parametrize("dtype", [torch.float32, torch.float16])
def test_store_kv_writes_slots_and_skips_minus_one(
    slot_dtype: torch.dtype, dtype: torch.dtype
) -> None:
    gen = torch.Generator().manual_seed(3)
    num_blocks, block_size, num_kv_heads, head_dim = 6, 4, 2, 32
    shape = (num_blocks, block_size, num_kv_heads, head_dim)
    k_cache = torch.randn(shape, generator=gen).to(dtype)
    v_cache = torch.randn(shape, generator=gen).to(dtype)
    k_before, v_before = k_cache.clone(), v_cache.clone()
    slots = torch.randperm(num_blocks * block_size, generator=gen)[:10]
    slots[[2, 5, 9]] = -1
    key = torch.randn(10, num_kv_heads, head_dim, generator=gen).to(dtype)
    value = torch.randn(10, num_kv_heads, head_dim, generator=gen).to(dtype)

    reference.store_kv(key, value, k_cache, v_cache, slots.to(slot_dtype))

    k_expected, v_expected = k_before.clone(), v_before.clone()
    for t, slot in enumerate(slots.tolist()):
        if slot >= 0:
            k_expected[slot // block_size, slot % block_size] = key[t]
            v_expected[slot // block_size, slot % block_size] = value[t]
    assert torch.equal(k_cache, k_expected) and torch.equal(v_cache, v_expected)
    written = torch.zeros(num_blocks * block_size, dtype=torch.bool)
    written[slots[slots >= 0]] = True
    untouched = ~written.view(num_blocks, block_size)
    assert torch.equal(k_cache[untouched], k_before[untouched])
    assert torch.equal(v_cache[untouched], v_before[untouched])


def test_store_kv_into_an_fp8_cache_saturates_and_scales() -> None:
    """An fp8 cache holds x / scale rounded to e4m3, saturated at ±448 (torch's own cast would
    give NaN), K and V with scales of their own; attention reads the bytes times the scales."""
    gen = torch.Generator().manual_seed(4)
    shape = (3, 4, 2, 16)
    k_cache, v_cache = torch.zeros(shape, dtype=torch.float8_e4m3fn), torch.zeros(shape, dtype=torch.float8_e4m3fn)
    key = torch.randn(5, 2, 16, generator=gen) * 4
    key[0, 0, :3] = torch.tensor([1e6, -1e6, 448.0 * 0.25 * 1.04])  # past e4m3's range at k_scale 0.25
    value = torch.randn(5, 2, 16, generator=gen)
    slots = torch.tensor([4, 0, -1, 11, 7])
    reference.store_kv(key, value, k_cache, v_cache, slots, k_scale=0.25, v_scale=2.0)
    k_rows, v_rows = k_cache.view(-1, 2, 16).float(), v_cache.view(-1, 2, 16).float()
    kept = slots >= 0
    want_k = (key[kept] / 0.25).clamp(-448, 448).to(torch.float8_e4m3fn).float()
    assert torch.equal(k_rows[slots[kept]], want_k)
    assert k_rows[4, 0, :3].tolist() == [448.0, -448.0, 448.0]
    assert torch.equal(v_rows[slots[kept]], (value[kept] / 2.0).to(torch.float8_e4m3fn).float())
    assert not bool(k_rows.isnan().any()) and int((k_rows != 0).any(-1).any(-1).sum()) == 4
    q = torch.randn(1, 4, 16, generator=gen)
    table, lens = torch.tensor([[1, 0, 2]], dtype=torch.int32), torch.tensor([12], dtype=torch.int32)
    got = reference.paged_decode_attention(q, k_cache, v_cache, table, lens, 0.3, k_scale=0.25, v_scale=2.0)
    wide = reference.paged_decode_attention(q, k_cache.float() * 0.25, v_cache.float() * 2.0, table, lens, 0.3)
    torch.testing.assert_close(got, wide, atol=1e-6, rtol=1e-6)


def test_store_kv_past_the_cache_writes_nothing() -> None:
    for dtype in (torch.float32, torch.float8_e4m3fn):
        k_cache, v_cache = torch.zeros(2, 4, 1, 8, dtype=dtype), torch.zeros(2, 4, 1, 8, dtype=dtype)
        with pytest.raises(IndexError, match="slot 8 is past the caches' 8 slots"):
            reference.store_kv(torch.ones(2, 1, 8), torch.ones(2, 1, 8), k_cache, v_cache, torch.tensor([3, 8]))
        assert not bool(k_cache.float().any()) and not bool(v_cache.float().any())


def test_store_then_attend_round_trip() -> None:
    """Tokens written with store_kv are exactly the keys prefill attends to."""
    gen = torch.Generator().manual_seed(11)
    block_size, num_kv_heads, head_dim, n = 4, 2, 32, 10
    k_cache = torch.zeros(8, block_size, num_kv_heads, head_dim)
    v_cache = torch.zeros_like(k_cache)
    row = torch.tensor([6, 1, 3], dtype=torch.int32)
    slots = (row.long()[:, None] * block_size + torch.arange(block_size)).flatten()[:n]
    key = torch.randn(n, num_kv_heads, head_dim, generator=gen)
    value = torch.randn(n, num_kv_heads, head_dim, generator=gen)
    reference.store_kv(key, value, k_cache, v_cache, slots)
    q = torch.randn(n, 4, head_dim, generator=gen)
    out = reference.paged_prefill_attention(
        q, k_cache, v_cache, row[None], torch.tensor([0, n], dtype=torch.int32),
        torch.tensor([n], dtype=torch.int32), 0.2,
    )
    expected = naive_attention(q, key, value, 0.2)
    torch.testing.assert_close(out.double(), expected, **TOL[torch.float32])


def test_backend_selection(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.delenv(kernels.BACKEND_ENV, raising=False)
    # as in a process that never chose Triton (other tests' may have: tests share processes)
    monkeypatch.delitem(sys.modules, "kernels.triton_ops", raising=False)
    assert kernels.attention_backend(torch.device("cpu")).__name__ == "kernels.cpu_ops"
    assert "kernels.triton_ops" not in sys.modules  # never imported unless chosen
    monkeypatch.setenv(kernels.BACKEND_ENV, "reference")
    assert kernels.attention_backend(torch.device("cuda")) is reference
    monkeypatch.setenv(kernels.BACKEND_ENV, "cuda-graphs")
    with pytest.raises(ValueError, match="cuda-graphs.*reference.*triton"):
        kernels.attention_backend(torch.device("cpu"))
    # A head dim Triton doesn't take (72: not a multiple of 16): the reference on CUDA, or a
    # clear error where Triton is asked for by name.
    monkeypatch.delenv(kernels.BACKEND_ENV)
    assert kernels.attention_backend(torch.device("cuda"), head_dim=72) is reference
    assert "kernels.triton_ops" not in sys.modules
    monkeypatch.setenv(kernels.BACKEND_ENV, "triton")
    with pytest.raises(ValueError, match="multiples of 16 from 16 to 256 and larger powers of two.*72"):
        kernels.attention_backend(torch.device("cuda"), head_dim=72)
    # Multiples of 16 to 256 (Phi-3-mini's 96, tiled as 128 and masked), and powers of two past it.
    assert [d for d in range(1, 1100) if kernels.triton_takes_head_dim(d)] == [*range(16, 257, 16), 512, 1024]
