"""The Triton kernels over an fp8 KV cache (kernels.reference.FP8_KV, e4m3) against the
reference: `store_kv` writes the reference's bytes (x / scale saturated at ±448, rounded to
nearest even) and the attention kernels read them times k_scale / v_scale.

Without CUDA the kernels run in Triton's interpreter (set before they are imported, as in
tests/test_kernels_triton.py), which takes the bit paths an A100 takes (no e4m3 in Triton
there): the store encodes the codes from the fp32 bits, the loads decode them. One test runs
the loads through Triton's own conversion instead. Tiny shapes and few cases: the interpreter
is slow. The `gpu` class compiles for real, in bf16, with the conversions the GPU has.

Caches are written by the kernel under test and checked byte for byte against the reference's
store first, so every attention test also covers the store. Keys exceed 448 · k_scale in about
one element of ten (saturated), scales are not powers of two (the store divides, as torch
does), stale slots and padding blocks hold e4m3's NaN, and the step's own key/value, passed as
an engine passes them, are NaN: an fp8 cache's kernels must read its keys from the cache.
"""

from __future__ import annotations

import importlib
from types import ModuleType

import pytest
import torch

# Sets TRITON_INTERPRET without CUDA before the kernels are imported; the reference in fp32
# over the same bytes, within that module's tolerances.
from tests.test_kernels_triton import CUDA, DEVICE, TOL  # isort: skip

from kernels import reference
from kernels.reference import FP8_KV, FP8_KV_MAX

SCALE = 0.3
K_SCALE, V_SCALE = 0.0071, 0.013  # keys ~ N(0, 2): |key| / K_SCALE > 448 past 1.6 sigma
NAN_BYTE = 0x7F  # e4m3fn's NaN: stale slots, padding blocks


@pytest.fixture(scope="module")
def ops() -> ModuleType:
    return importlib.import_module("kernels.triton_ops")


def fp8_cache(ops: ModuleType, lens: list[int], block_size: int, num_kv_heads: int, head_dim: int,
              dtype: torch.dtype, gen: torch.Generator) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """(k_cache, v_cache, block_tables) on DEVICE: each sequence's keys and values written by
    `ops.store_kv` (a token with slot -1 between every two, never stored) into scattered blocks,
    NaN bytes elsewhere; asserts the bytes equal the reference store's."""
    needed = [-(-n // block_size) for n in lens]
    num_blocks = sum(needed) + 2
    ids = (torch.randperm(num_blocks - 1, generator=gen) + 1).tolist()  # block 0 stays unused
    tables = torch.full((len(lens), max(needed) + 1), -1, dtype=torch.int32)
    slots = []
    for b, n in enumerate(lens):
        row = [ids.pop() for _ in range(needed[b])]
        tables[b, : len(row)] = torch.tensor(row)
        slots += [row[i // block_size] * block_size + i % block_size for i in range(n)]
    slots = torch.tensor(slots).repeat_interleave(2)
    slots[1::2] = -1
    keys = (2 * torch.randn(len(slots), num_kv_heads, head_dim, generator=gen)).to(dtype)
    values = torch.randn(len(slots), num_kv_heads, head_dim, generator=gen).to(dtype)
    keys[1::2] = values[1::2] = 1e4  # skipped rows: stored, they would saturate the bytes they hit
    shape = (num_blocks, block_size, num_kv_heads, head_dim)
    k_ref = torch.full(shape, NAN_BYTE, dtype=torch.uint8).view(FP8_KV)
    v_ref = k_ref.clone()
    scales = dict(k_scale=K_SCALE, v_scale=V_SCALE)
    reference.store_kv(keys, values, k_ref, v_ref, slots, **scales)
    k_cache, v_cache = k_ref.clone().to(DEVICE), v_ref.clone().to(DEVICE)
    k_cache.view(torch.uint8).fill_(NAN_BYTE)
    v_cache.view(torch.uint8).fill_(NAN_BYTE)
    ops.store_kv(keys.to(DEVICE), values.to(DEVICE), k_cache, v_cache, slots.int().to(DEVICE), **scales)
    assert torch.equal(k_cache.cpu().view(torch.uint8), k_ref.view(torch.uint8))
    assert torch.equal(v_cache.cpu().view(torch.uint8), v_ref.view(torch.uint8))
    assert k_ref.view(torch.uint8).eq(0x7E).any(), "no key saturated"
    return k_cache, v_cache, tables.to(DEVICE)


def finite(cache: torch.Tensor) -> torch.Tensor:
    """A copy of an fp8 cache with its NaN bytes at ±448: the reference weighs masked keys by 0,
    so it needs every slot finite (as an engine's zeroed caches are)."""
    cache = cache.clone()
    codes = cache.view(torch.uint8)
    codes[(codes & 0x7F) == NAN_BYTE] -= 1
    return cache


def expected_decode(q, k_cache, v_cache, tables, lens, **attn) -> torch.Tensor:
    return reference.paged_decode_attention(q.float(), finite(k_cache), finite(v_cache), tables, lens, SCALE,
                                            k_scale=K_SCALE, v_scale=V_SCALE, **attn)


def expected_prefill(q, k_cache, v_cache, tables, cu_seqlens, lens, **attn) -> torch.Tensor:
    return reference.paged_prefill_attention(q.float(), finite(k_cache), finite(v_cache), tables, cu_seqlens, lens,
                                             SCALE, k_scale=K_SCALE, v_scale=V_SCALE, **attn)


def nan_rows(num_tokens: int, num_kv_heads: int, head_dim: int, dtype: torch.dtype) -> torch.Tensor:
    """The step's own key or value as an engine passes them, NaN: not to be read."""
    return torch.full((num_tokens, num_kv_heads, head_dim), float("nan"), dtype=dtype, device=DEVICE)


# ----------------------------------------------------------------------------- store_kv


def special_values(scale: float) -> torch.Tensor:
    """Every finite e4m3 value times `scale`, the midpoints between neighbours (ties: to even)
    and the fp32 values either side of them, values past 448 · scale (saturated), below the
    smallest subnormal, signed zeros and NaN (stored as NaN, as torch's cast)."""
    codes = torch.arange(256, dtype=torch.uint8).view(FP8_KV).float()
    values = codes[~codes.isnan()].unique()
    mids = (values[1:] + values[:-1]) / 2
    up, down = torch.tensor(float("inf")), torch.tensor(float("-inf"))
    extra = torch.tensor([FP8_KV_MAX + 1, FP8_KV_MAX + 16, 500.0, 1e30, 2.0**-10, 3 * 2.0**-11, 2.0**-12, 1e-30, 0.0, -0.0,
                          float("nan")])
    x = torch.cat([values, mids, mids.nextafter(up), mids.nextafter(down), extra, -extra])
    return x * scale


@pytest.mark.parametrize("dtype", [torch.float32, torch.float16])
def test_store_kv_writes_the_references_bytes(ops: ModuleType, dtype: torch.dtype) -> None:
    """Byte for byte the reference's codes: ties to even, saturation, subnormals, signs; a power
    of two scale keeps the ties ties, another tests the division. Slots -1 and the cache
    rows' padding past a head dim of 48 are left alone."""
    gen = torch.Generator().manual_seed(0)
    num_kv_heads, head_dim, T = 2, 48, 16
    k_scale, v_scale = 0.5, 0.37
    k_special, v_special = special_values(k_scale), special_values(v_scale)
    per_token = num_kv_heads * head_dim
    assert k_special.numel() <= per_token * (T - 4)
    keys = torch.randn(T * per_token, generator=gen) * 100 * k_scale
    values = torch.randn(T * per_token, generator=gen) * 100 * v_scale
    keys[: k_special.numel()], values[: v_special.numel()] = k_special, v_special
    keys = keys.view(T, num_kv_heads, head_dim).to(dtype)
    values = values.view(T, num_kv_heads, head_dim).to(dtype)
    slots = torch.randperm(8 * 4, generator=gen)[:T]
    slots[[0, 7, 15]] = -1
    k_ref = torch.full((8, 4, num_kv_heads, head_dim), NAN_BYTE, dtype=torch.uint8).view(FP8_KV)
    v_ref = k_ref.clone()
    reference.store_kv(keys, values, k_ref, v_ref, slots, k_scale=k_scale, v_scale=v_scale)
    rows = torch.full((2, 8, 4, num_kv_heads, 64), 0x5A, dtype=torch.uint8, device=DEVICE)
    k_cache, v_cache = (rows[i, ..., :head_dim].view(FP8_KV) for i in range(2))  # padded rows
    k_cache.view(torch.uint8).fill_(NAN_BYTE)
    v_cache.view(torch.uint8).fill_(NAN_BYTE)
    ops.store_kv(keys.to(DEVICE), values.to(DEVICE), k_cache, v_cache, slots.to(DEVICE), k_scale=k_scale,
                 v_scale=v_scale)
    assert torch.equal(k_cache.cpu().view(torch.uint8), k_ref.view(torch.uint8))
    assert torch.equal(v_cache.cpu().view(torch.uint8), v_ref.view(torch.uint8))
    assert (rows[..., head_dim:] == 0x5A).all(), "written past the head dim"


# ----------------------------------------------------------------------------- attention


@pytest.mark.parametrize("group,dtype,num_splits,window,softcap", [
    (1, torch.float32, 1, 0, 0.0),
    (4, torch.float16, 3, 0, 0.0),  # split-K, the last split merging
    (4, torch.float32, 2, 5, 5.0),  # a sliding window and Gemma 2's cap
])
def test_decode_matches_reference(ops: ModuleType, group: int, dtype: torch.dtype, num_splits: int, window: int,
                                  softcap: float) -> None:
    gen = torch.Generator().manual_seed(group)
    lens = [1, 16, 37]  # one key, exactly two blocks, tiles spanning blocks
    k_cache, v_cache, tables = fp8_cache(ops, lens, 8, 2, 32, dtype, gen)
    q = ((3.0 if softcap else 1.0) * torch.randn(len(lens), 2 * group, 32, generator=gen)).to(dtype).to(DEVICE)
    context_lens = torch.tensor(lens, dtype=torch.int32, device=DEVICE)
    attn = dict(sliding_window=window, softcap=softcap)
    out = ops.paged_decode_attention(q, k_cache, v_cache, tables, context_lens, SCALE, k_scale=K_SCALE,
                                     v_scale=V_SCALE, num_splits=num_splits, **attn)
    assert out.dtype == dtype
    torch.testing.assert_close(out.cpu().float(), expected_decode(q, k_cache, v_cache, tables, context_lens, **attn)
                               .cpu(), **TOL[dtype])


@pytest.mark.parametrize("group,dtype,pack_gqa", [(4, torch.float32, True), (1, torch.float16, None)])
def test_prefill_matches_reference_and_reads_new_keys_from_the_cache(ops: ModuleType, group: int,
                                                                     dtype: torch.dtype, pack_gqa: bool | None) -> None:
    """A decode-like token, a whole prompt of two blocks, a chunk after a cached prefix; the
    new tokens' key/value (NaN) are passed and not read."""
    gen = torch.Generator().manual_seed(10 + group)
    lens, q_lens = [1, 16, 37], [1, 16, 20]
    k_cache, v_cache, tables = fp8_cache(ops, lens, 8, 2, 32, dtype, gen)
    q = torch.randn(sum(q_lens), 2 * group, 32, generator=gen).to(dtype).to(DEVICE)
    cu = torch.tensor([0, *q_lens], dtype=torch.int32).cumsum(0, dtype=torch.int32).to(DEVICE)
    context_lens = torch.tensor(lens, dtype=torch.int32, device=DEVICE)
    nan = nan_rows(sum(q_lens), 2, 32, dtype)
    out = ops.paged_prefill_attention(q, k_cache, v_cache, tables, cu, context_lens, SCALE, key=nan, value=nan,
                                      k_scale=K_SCALE, v_scale=V_SCALE, pack_gqa=pack_gqa)
    torch.testing.assert_close(out.cpu().float(), expected_prefill(q, k_cache, v_cache, tables, cu, context_lens)
                               .cpu(), **TOL[dtype])


@pytest.mark.parametrize("window,softcap", [(0, 0.0), (5, 5.0)])
def test_mixed_graphed_step_matches_decode_and_prefill(ops: ModuleType, window: int, softcap: float) -> None:
    """What a mixed CUDA graph launches: two decodes by the graphed decode kernel (split 3 ways,
    counts on the device), the prefill kernel skipping them, sequences and tokens of padding
    past the step's; the step's key/value passed (NaN, not read)."""
    gen = torch.Generator().manual_seed(20 + window)
    dtype, group = torch.float16, 4
    lens, q_lens, nd = [40, 1, 16, 37], [1, 1, 16, 20], 2
    k_cache, v_cache, tables = fp8_cache(ops, lens, 8, 2, 32, dtype, gen)
    n, pad_seqs, pad_tokens = sum(q_lens), 2, 5
    q = ((3.0 if softcap else 1.0) * torch.randn(n, 2 * group, 32, generator=gen)).to(dtype).to(DEVICE)
    context_lens = torch.tensor(lens, dtype=torch.int32, device=DEVICE)
    attn = dict(sliding_window=window, softcap=softcap)
    cu_chunks = torch.tensor([0, *q_lens[nd:]], dtype=torch.int32).cumsum(0, dtype=torch.int32).to(DEVICE)
    want = torch.cat([expected_decode(q[:nd], k_cache, v_cache, tables[:nd], context_lens[:nd], **attn),
                      expected_prefill(q[nd:], k_cache, v_cache, tables[nd:], cu_chunks, context_lens[nd:], **attn)])
    cu = torch.tensor([0, *q_lens] + [0] * pad_seqs, dtype=torch.int32).cumsum(0, dtype=torch.int32).to(DEVICE)
    padded_q = torch.cat([q, torch.full((pad_tokens, *q.shape[1:]), float("nan"), dtype=dtype, device=DEVICE)])
    padded_tables = torch.cat([tables, torch.zeros((pad_seqs, tables.shape[1]), dtype=tables.dtype, device=DEVICE)])
    padded_lens = torch.cat([context_lens, torch.zeros(pad_seqs, dtype=torch.int32, device=DEVICE)])
    nan = nan_rows(n + pad_tokens, 2, 32, dtype)
    counts = torch.tensor([nd, 3], dtype=torch.int32, device=DEVICE)
    out = ops.paged_mixed_attention_graphed(padded_q, k_cache, v_cache, padded_tables, cu, padded_lens, SCALE, counts,
                                            key=nan, value=nan, k_scale=K_SCALE, v_scale=V_SCALE, **attn)
    torch.testing.assert_close(out[:n].cpu().float(), want.cpu(), **TOL[dtype])


def test_loads_through_tritons_own_conversion(ops: ModuleType, monkeypatch: pytest.MonkeyPatch) -> None:
    """The loads as sm_89 and later run them (Triton's e4m3 conversion, not the bits), over a
    cache the reference wrote (the interpreter's own conversion to e4m3 rounds ties up, so its
    stores are not checked here)."""
    gen = torch.Generator().manual_seed(30)
    lens = [3, 37]
    k_cache, v_cache, tables = fp8_cache(ops, lens, 8, 2, 32, torch.float32, gen)
    q = torch.randn(len(lens), 8, 32, generator=gen).to(DEVICE)
    context_lens = torch.tensor(lens, dtype=torch.int32, device=DEVICE)
    monkeypatch.setattr(ops, "_native_fp8_kv", lambda device: True)
    out = ops.paged_decode_attention(q, k_cache, v_cache, tables, context_lens, SCALE, k_scale=K_SCALE,
                                     v_scale=V_SCALE, num_splits=2)
    torch.testing.assert_close(out.cpu(), expected_decode(q, k_cache, v_cache, tables, context_lens).cpu(),
                               **TOL[torch.float32])


# ----------------------------------------------------------------------------- refusals


def test_what_the_kernels_would_get_wrong_is_refused(ops: ModuleType) -> None:
    """Before any launch, leaving the caches as they were: the step's own key/value or tensor
    descriptors as an fp8 cache's keys, one cache fp8 and the other not, another fp8 format,
    a scale an fp8 cache cannot take."""
    gen = torch.Generator().manual_seed(40)
    k_cache = torch.randn(4, 8, 2, 16, generator=gen).to(FP8_KV).to(DEVICE)
    v_cache = k_cache.clone()
    before = k_cache.view(torch.uint8).clone()
    q = torch.randn(5, 4, 16, generator=gen).to(DEVICE)
    tables = torch.tensor([[0, 1]], dtype=torch.int32, device=DEVICE)
    cu = torch.tensor([0, 5], dtype=torch.int32, device=DEVICE)
    lens = torch.tensor([5], dtype=torch.int32, device=DEVICE)
    key = torch.randn(5, 2, 16, generator=gen).to(DEVICE)
    for new_kv in ("rows", "tma"):
        with pytest.raises(ValueError, match="fp8 cache's keys are read from it"):
            ops.paged_prefill_attention(q, k_cache, v_cache, tables, cu, lens, SCALE, key=key, value=key, new_kv=new_kv)
    with pytest.raises(ValueError, match="cache_tma False"):
        ops.paged_prefill_attention(q, k_cache, v_cache, tables, cu, lens, SCALE, cache_tma=True)
    with pytest.raises(ValueError, match="both be fp8"):
        ops.paged_decode_attention(q[:1], k_cache, v_cache.float(), tables, lens, SCALE)
    e5m2 = k_cache.float().to(torch.float8_e5m2)
    with pytest.raises(ValueError, match="e4m3"):
        ops.paged_decode_attention(q[:1], e5m2, e5m2, tables, lens, SCALE)
    slots = torch.arange(5, device=DEVICE)
    for bad in (0.0, -1.0, float("inf"), float("nan")):
        with pytest.raises(ValueError, match="k_scale must be a finite value > 0"):
            ops.store_kv(key, key, k_cache, v_cache, slots, k_scale=bad)
        with pytest.raises(ValueError, match="v_scale must be a finite value > 0"):
            ops.paged_decode_attention(q[:1], k_cache, v_cache, tables, lens, SCALE, v_scale=bad)
    assert torch.equal(k_cache.view(torch.uint8), before)


def test_other_caches_ignore_the_scales(ops: ModuleType) -> None:
    """A 16/32-bit cache stores and reads its values as they are, whatever the scales."""
    gen = torch.Generator().manual_seed(50)
    keys = torch.randn(6, 2, 16, generator=gen).to(DEVICE)
    k_cache, v_cache = torch.zeros(2, 8, 2, 16, device=DEVICE), torch.zeros(2, 8, 2, 16, device=DEVICE)
    ops.store_kv(keys, 2 * keys, k_cache, v_cache, torch.arange(6, device=DEVICE), k_scale=0.25, v_scale=3.0)
    assert torch.equal(k_cache.view(-1, 2, 16)[:6], keys) and torch.equal(v_cache.view(-1, 2, 16)[:6], 2 * keys)
    q = torch.randn(1, 4, 16, generator=gen).to(DEVICE)
    args = (q, k_cache, v_cache, torch.tensor([[0]], dtype=torch.int32, device=DEVICE),
            torch.tensor([6], dtype=torch.int32, device=DEVICE), SCALE)
    assert torch.equal(ops.paged_decode_attention(*args, k_scale=0.25, v_scale=3.0), ops.paged_decode_attention(*args))


# ----------------------------------------------------------------------------- GPU only


@pytest.mark.gpu
@pytest.mark.skipif(not CUDA, reason="needs CUDA")
class TestCompiledOnGPU:
    """The same in bf16 (and fp16), compiled for this GPU with its own e4m3 conversion (from
    sm_89) or the bits (an A100), at model sizes: head dims 128 and 96 (padded), contexts past
    a thousand keys, the GPU's tiles and split counts."""

    @pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
    @pytest.mark.parametrize("head_dim", [128, 96])
    def test_store_kv(self, ops, dtype, head_dim):
        gen = torch.Generator().manual_seed(head_dim)
        special = special_values(0.37)
        keys = torch.randn(300, 8, head_dim, generator=gen) * 100 * 0.37
        keys.view(-1)[: special.numel()] = special
        keys = keys.to(dtype)
        slots = torch.randperm(64 * 16, generator=gen)[:300]
        slots[::7] = -1
        k_ref = torch.zeros(64, 16, 8, head_dim, dtype=FP8_KV)
        v_ref = k_ref.clone()
        reference.store_kv(keys, -keys, k_ref, v_ref, slots, k_scale=0.37, v_scale=2.0)
        k_cache, v_cache = torch.zeros_like(k_ref, device=DEVICE), torch.zeros_like(v_ref, device=DEVICE)
        ops.store_kv(keys.to(DEVICE), -keys.to(DEVICE), k_cache, v_cache, slots.int().to(DEVICE), k_scale=0.37,
                     v_scale=2.0)
        assert torch.equal(k_cache.cpu().view(torch.uint8), k_ref.view(torch.uint8))
        assert torch.equal(v_cache.cpu().view(torch.uint8), v_ref.view(torch.uint8))

    @pytest.mark.parametrize("group,num_kv_heads,head_dim,num_splits,window,softcap", [
        (4, 8, 128, None, 0, 0.0), (1, 4, 128, 8, 0, 0.0), (4, 8, 96, 16, 300, 2.0),
    ])
    def test_decode(self, ops, group, num_kv_heads, head_dim, num_splits, window, softcap):
        gen = torch.Generator().manual_seed(group + head_dim)
        lens = [1, 32, *torch.randint(1, 3000, (5,), generator=gen).tolist()]
        k_cache, v_cache, tables = fp8_cache(ops, lens, 16, num_kv_heads, head_dim, torch.bfloat16, gen)
        q = torch.randn(len(lens), group * num_kv_heads, head_dim, generator=gen).to(torch.bfloat16).to(DEVICE)
        context_lens = torch.tensor(lens, dtype=torch.int32, device=DEVICE)
        attn = dict(sliding_window=window, softcap=softcap)
        out = ops.paged_decode_attention(q, k_cache, v_cache, tables, context_lens, SCALE, k_scale=K_SCALE,
                                         v_scale=V_SCALE, num_splits=num_splits, **attn)
        torch.testing.assert_close(out.float(), expected_decode(q, k_cache, v_cache, tables, context_lens, **attn),
                                   **TOL[torch.bfloat16])

    @pytest.mark.parametrize("group,num_kv_heads,head_dim,window,softcap", [
        (4, 8, 128, 0, 0.0), (3, 2, 128, 0, 0.0), (4, 8, 96, 300, 2.0),
    ])
    def test_prefill(self, ops, group, num_kv_heads, head_dim, window, softcap):
        gen = torch.Generator().manual_seed(group + head_dim + 1)
        lens, q_lens = [1000, 1, 32, 777], [1000, 1, 5, 300]
        k_cache, v_cache, tables = fp8_cache(ops, lens, 16, num_kv_heads, head_dim, torch.bfloat16, gen)
        q = torch.randn(sum(q_lens), group * num_kv_heads, head_dim, generator=gen).to(torch.bfloat16).to(DEVICE)
        cu = torch.tensor([0, *q_lens], dtype=torch.int32).cumsum(0, dtype=torch.int32).to(DEVICE)
        context_lens = torch.tensor(lens, dtype=torch.int32, device=DEVICE)
        nan = nan_rows(sum(q_lens), num_kv_heads, head_dim, torch.bfloat16)
        attn = dict(sliding_window=window, softcap=softcap)
        out = ops.paged_prefill_attention(q, k_cache, v_cache, tables, cu, context_lens, SCALE, key=nan, value=nan,
                                          k_scale=K_SCALE, v_scale=V_SCALE, **attn)
        torch.testing.assert_close(out.float(), expected_prefill(q, k_cache, v_cache, tables, cu, context_lens, **attn),
                                   **TOL[torch.bfloat16])

    @pytest.mark.parametrize("splits,window,softcap", [(5, 0, 0.0), (16, 1000, 5.0)])
    def test_graphed_mixed_step(self, ops, splits, window, softcap):
        """Captured once, replayed: three decodes up to 9000 keys split-K by the graphed decode
        kernel beside two chunks."""
        gen = torch.Generator().manual_seed(splits)
        lens, q_lens, nd = [9000, 4100, 1, 700, 300], [1, 1, 1, 200, 300], 3
        k_cache, v_cache, tables = fp8_cache(ops, lens, 16, 8, 128, torch.bfloat16, gen)
        q = torch.randn(sum(q_lens), 32, 128, generator=gen).to(torch.bfloat16).to(DEVICE)
        context_lens = torch.tensor(lens, dtype=torch.int32, device=DEVICE)
        cu = torch.tensor([0, *q_lens], dtype=torch.int32).cumsum(0, dtype=torch.int32).to(DEVICE)
        cu_chunks = cu[nd:] - cu[nd]
        attn = dict(sliding_window=window, softcap=softcap)
        want = torch.cat([expected_decode(q[:nd], k_cache, v_cache, tables[:nd], context_lens[:nd], **attn),
                          expected_prefill(q[nd:], k_cache, v_cache, tables[nd:], cu_chunks, context_lens[nd:], **attn)])
        nan = nan_rows(sum(q_lens), 8, 128, torch.bfloat16)
        counts = torch.tensor([nd, splits], dtype=torch.int32, device=DEVICE)
        args = (q, k_cache, v_cache, tables, cu, context_lens, SCALE, counts)
        kwargs = dict(key=nan, value=nan, k_scale=K_SCALE, v_scale=V_SCALE, **attn)
        ops.paged_mixed_attention_graphed(*args, **kwargs)  # warm-up: compiles, allocates the split counters
        graph = torch.cuda.CUDAGraph()
        with torch.cuda.graph(graph):
            out = ops.paged_mixed_attention_graphed(*args, **kwargs)
        graph.replay()
        torch.testing.assert_close(out.float(), want, **TOL[torch.bfloat16])
