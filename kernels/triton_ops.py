"""Paged attention in Triton: the CUDA serving path, the same contract as `kernels.reference`.

Three kernels over the paged KV cache `[num_blocks, block_size, Hkv, D]`:

- `store_kv`: one program per token copies its K/V rows into their slot (slot -1 = skip).
- `paged_decode_attention`: one program per (sequence, kv head, split). The query heads that
  share a kv head form the rows of one `tl.dot` (padded to 16, the smallest dot tile), so each
  K/V tile is read once per kv head, not once per query head. At small batch a long context is
  cut into splits (flash-decoding); each split writes an unnormalised partial (acc, max, sum)
  and the last split of a (sequence, kv head) to arrive, by an atomic counter, merges them:
  split-K costs no second launch (a merge kernel remains as the benchmarks' peer). The split
  count comes from the batch size and the block table's width only — never from the context
  lengths' values — so the call does no host sync and is safe to capture in a CUDA graph.
  `paged_decode_attention_graphed` is the same work for a mixed CUDA graph, whose decode
  count changes at every replay: the count and the split factor are read on the device, and
  a fixed number of programs walks the (sequence, kv head, split) items.
- `paged_prefill_attention`: FlashAttention-2 style over ragged sequences: one program per
  (query tile, kv head) with the group's query heads packed into the tile's rows (GQA: each
  K/V tile is read once per kv head, as in decode), or per (query tile, query head) when the
  group is not a power of two; the tile finds its sequence by binary search over
  `cu_seqlens_q` (again no host sync), and a sequence's tiles run last (most keys) first.
  Key tiles fully below the tile's first query position run without a mask; the tiles on the
  diagonal apply the causal mask. A decode is a sequence with one new token, so one launch can
  attend a whole mixed step; in a mixed CUDA graph it skips the leading sequences instead
  (`skip_sequences`), left to the graphed decode kernel. Given the step's own K/V (`key`/`value`,
  the projection's views), the new keys may be read from those rows instead of through the
  block table (`new_kv`: `rows`, or `tma` through tensor descriptors, which needs no whole key
  tile per cache block): the cached prefix first, then the new keys in tiles that line up with
  the query tiles. Which source is faster is a GPU's tuning, measured by the sweep.

Sliding windows (Mistral, Gemma 2/3: a query at p sees keys p - window < k <= p) and Gemma 2's
softcapped scores (softcap · tanh(s / softcap), in fp32 through exp2: no tanh in every Triton
from 3.4) are a layer's constants, so they are constexprs: a model compiles a variant or two,
and with neither the kernels are what they were. With a window, decode's splits share the
window's key tiles, not the context's; a prefill query tile starts at the tile holding the
first key one of its queries sees, masks up to the last query's first key, and a row that has
seen no key yet keeps an empty softmax (no NaN). No key that no query sees is loaded, so an
engine may free the blocks wholly before the window of a sequence's first query in the step
(their table entries are then never dereferenced).

Head dims: multiples of 16 up to 256 (`kernels.triton_takes_head_dim`) and larger powers of
two. One that is not a power of two (Phi-3-mini's 96; 80, 112, 160, 192) is tiled BLOCK_D wide,
the next power of two, with every load and store along d masked past HEAD_DIM: loads read 0
there, so the dots and the softmax see the head alone, and stores never touch the next head.
The masks are constexpr-guarded, so a power-of-two head dim compiles to the PTX it did before
them. Tiles are chosen by BLOCK_D (registers and shared memory are the tile's), and tensor
descriptors, whose boxes are powers of two, are left to power-of-two head dims: a padded one
reads the new tokens' K/V through pointers (`rows`).

An fp8 KV cache (float8_e4m3fn, `kernels.reference.FP8_KV`): `store_kv` writes x / scale
saturated at ±448 and rounded to nearest even, the reference's bytes. The attention kernels
convert each byte as they load it, in registers, to the queries' dtype, exactly (every e4m3
value is an fp16 and a bf16), and apply the layer's scales in fp32 where they cost one multiply:
k_scale in the scores' scale, v_scale on each output row. That is the reference's reading
(byte · scale, rounded once to the queries' dtype) less its one rounding: multiplying every
value before the dots cost registers (pre-Hopper 16-bit prefill at head dim 256 spilled 2 KiB,
kernels/compile_check.py), and the plain conversion is what Triton keeps cheap. FP8_KV is a
constexpr, so the 16/32-bit caches compile to the kernels they were. From sm_89 Triton converts
e4m3 itself (NATIVE_FP8); an A100 has no e4m3 in Triton, so there the kernels take the cache's
bytes (uint8) and move the bits (as kernels/triton_fp8.py's projection does), and `store_kv`
encodes them from the fp32 bits; the interpreter does the same (its own cast to e4m3 rounds ties
up). An fp8 cache's keys are what it stores, so prefill reads the new tokens' keys from it,
never from `key`/`value`, and only through pointers (`new_kv` other than the cache and
`cache_tma` are refused).

Keys are gathered token by token through the block table (a tile may span several cache
blocks), or with one block-id load per tile when the tile sits inside one block. Loads past a
sequence's context are masked, so stale cache slots are never read (even NaN is harmless).
Softmax runs in the exp2 domain with fp32 statistics and an fp32 accumulator; fp32 inputs use
IEEE dots (no TF32). Only pointer arithmetic (no block pointers): Triton 3.4 and later.
"""

from __future__ import annotations

import functools
import math
import operator

import torch
import triton
import triton.language as tl

from kernels import TRITON_MAX_PADDED_HEAD_DIM, TRITON_MIN_HEAD_DIM, triton_takes_head_dim
from kernels.reference import FP8_KV
from kernels.tuning import NEW_KV_SOURCES, KernelTuning, load_tuning

LOG2E = 1.4426950408889634
MIN_DOT = TRITON_MIN_HEAD_DIM  # tl.dot needs every tile dimension >= 16
# Every launch: multiply-adds fused (the softmax's scale sits in the exponent's FMA). Triton
# 3.9 fuses by default but warns that 3.10 will not.
LAUNCH_OPTIONS = {"enable_fp_fusion": True}


# ----------------------------------------------------------------------------- helpers (jit)


@triton.jit
def _kv_offsets(table_row, tile_start, offs_n, ctx, stride_block, stride_slot,
                BLOCK_SIZE: tl.constexpr, TILE_IN_BLOCK: tl.constexpr):
    """Cache offsets `[BLOCK_N]` of the tokens `tile_start + offs_n` of one sequence."""
    if TILE_IN_BLOCK:
        # The tile lies inside one cache block: one block id, contiguous slots.
        block = tl.load(table_row + tile_start // BLOCK_SIZE).to(tl.int64)
        slot = (tile_start % BLOCK_SIZE) + offs_n
    else:
        tok = tile_start + offs_n
        block = tl.load(table_row + tok // BLOCK_SIZE, mask=tok < ctx, other=0).to(tl.int64)
        slot = tok % BLOCK_SIZE
    return block * stride_block + slot.to(tl.int64) * stride_slot


# Head dims that are not powers of two (Phi-3-mini's 96) are tiled BLOCK_D wide, the next power
# of two, and each kernel masks the columns past HEAD_DIM: loads read 0 there (so they add
# nothing to q·k, and P·V's padded columns are never stored), stores skip them (they are the
# next head's memory). Those masks are constexpr-guarded (PADDED = BLOCK_D != HEAD_DIM), so a
# power-of-two head dim compiles to exactly the kernels it did before (the PTX is identical).
# Masks are computed before the pointers they guard, as a load's keyword argument is
# evaluated first: the same op order, the same PTX.


@triton.jit
def _rows_mask(row_mask, d_mask, PADDED: tl.constexpr):
    """The mask of a `[rows, BLOCK_D]` tile: the rows where `row_mask`, and with PADDED only
    each row's HEAD_DIM columns (`d_mask`)."""
    if PADDED:
        mask = row_mask[:, None] & d_mask[None, :]
    else:
        mask = row_mask[:, None]
    return mask


@triton.jit
def _load_rows(ptrs, row_mask, d_mask, MASK_ROWS: tl.constexpr, PADDED: tl.constexpr):
    """A K or V tile `[rows, BLOCK_D]`: the masked rows (MASK_ROWS) and padded columns read 0."""
    if MASK_ROWS:
        x = tl.load(ptrs, mask=_rows_mask(row_mask, d_mask, PADDED), other=0.0)
    elif PADDED:
        x = tl.load(ptrs, mask=d_mask[None, :], other=0.0)
    else:
        x = tl.load(ptrs)
    return x


@triton.jit
def _fp8_to_fp32(w, NATIVE_FP8: tl.constexpr):
    """e4m3fn values to fp32, exactly. NATIVE_FP8: the hardware's conversion (sm_89 and later);
    otherwise `w` holds the raw bytes (uint8) and the bits are moved into an fp16 (sign to the
    top, exponent and mantissa under fp16's 5-bit exponent): e4m3 and fp16 differ only in the
    exponent bias (7 and 15), so that fp16 is the value / 2^8, subnormals included (they land
    on fp16's subnormals), and the rest is exact arithmetic. e4m3fn's NaN (S.1111.111) reads as
    ±480 here, not NaN: checkpoints hold none. Shared with kernels/triton_fp8.py."""
    if NATIVE_FP8:
        out = w.to(tl.float32)
    else:
        bits = w.to(tl.int32)
        half = (((bits & 0x7F) << 7) | ((bits & 0x80) << 8)).to(tl.uint16).to(tl.float16, bitcast=True)
        out = half.to(tl.float32) * 256.0
    return out


@triton.jit
def _fp32_to_fp8_bits(x):
    """The e4m3fn codes (uint8) of fp32 values within ±448, rounded to nearest even, from their
    bits: where Triton has no e4m3 (sm_80) and in the interpreter (whose conversion rounds ties
    up). A normal (from 2^-6) keeps 3 of its 23 mantissa bits, rounded on the 20 below (a carry
    runs into the exponent, as it should), its exponent rebiased from 127 to 7; below 2^-6 the
    code is |x| in the subnormals' units of 2^-9, rounded to even the same way (2^-6 itself,
    8 units, is the smallest normal's code); NaN to NaN's code."""
    bits = x.to(tl.int32, bitcast=True)
    mag = bits & 0x7FFFFFFF
    exponent = mag >> 23
    normal = ((mag + 0x7FFFF + ((mag >> 20) & 1)) >> 20) - (120 << 3)
    shift = tl.minimum(141 - exponent, 31)  # significand bits below the 2^-9 unit
    significand = (mag & 0x7FFFFF) | 0x800000
    units = significand >> shift
    rest = significand - (units << shift)
    half = 1 << (shift - 1)
    units += ((rest > half) | ((rest == half) & ((units & 1) == 1))).to(tl.int32)
    code = tl.where(exponent >= 121, normal, units)
    code = tl.where(mag > 0x7F800000, 0x7F, code)  # NaN stays NaN (S.1111.111), as torch's cast
    return (code | ((bits >> 24) & 0x80)).to(tl.uint8)


@triton.jit
def _kv_values(x, DTYPE: tl.constexpr, FP8_KV: tl.constexpr, NATIVE_FP8: tl.constexpr):
    """A loaded K or V tile as the dot takes it, at DTYPE (the queries'): an fp8 cache's codes
    (FP8_KV) as their values, exactly (every e4m3 value is an fp16 and a bf16); the scales
    apply to the scores and the output."""
    if FP8_KV and not NATIVE_FP8:
        y = _fp8_to_fp32(x, NATIVE_FP8).to(DTYPE)
    else:
        y = x.to(DTYPE)
    return y


@triton.jit
def _cache_values(x, kv_scale, DTYPE: tl.constexpr, FP8_KV: tl.constexpr, NATIVE_FP8: tl.constexpr):
    """K or V rows as the cache stores them, at DTYPE (its element type): with FP8_KV the e4m3
    codes of x / kv_scale (IEEE division, as torch's), saturated at ±448 (kernels.reference's
    FP8_KV_MAX) and rounded to nearest even; without NATIVE_FP8 as bytes."""
    if FP8_KV:
        y = tl.math.div_rn(x.to(tl.float32), tl.full(x.shape, kv_scale, tl.float32))
        # Saturated, NaN kept (Triton's min/max may drop it): the reference's and the C store's bytes.
        y = tl.where(y != y, y, tl.minimum(tl.maximum(y, -448.0), 448.0))
        if NATIVE_FP8:
            y = y.to(tl.float8e4nv)
        else:
            y = _fp32_to_fp8_bits(y)
    else:
        y = x.to(DTYPE)
    return y


@triton.jit
def _attend_tile(q, k_ptrs, v_ptrs, kv_mask, d_mask, score_mask, m_i, l_i, acc, scale_log2e,
                 MASKED: tl.constexpr, PADDED: tl.constexpr, DOT_PREC: tl.constexpr, SOFTCAP: tl.constexpr,
                 EMPTY_ROWS: tl.constexpr, FP8_KV: tl.constexpr, NATIVE_FP8: tl.constexpr):
    """One online-softmax step of rows `q` `[M, BLOCK_D]` over a K/V tile `[N, BLOCK_D]` (an
    fp8 cache's codes with FP8_KV: k_scale is in `scale_log2e`, v_scale for the caller)."""
    k = _kv_values(_load_rows(k_ptrs, kv_mask, d_mask, MASKED, PADDED), q.dtype, FP8_KV, NATIVE_FP8)
    s = tl.dot(q, tl.trans(k), input_precision=DOT_PREC)
    if SOFTCAP > 0:  # before the mask: a masked score may be anything
        s = _softcapped(s, scale_log2e, SOFTCAP)
    if MASKED:
        s = tl.where(score_mask, s, float("-inf"))
    m_new, alpha, p, l_i = _online_softmax(s, m_i, l_i, scale_log2e, SOFTCAP, EMPTY_ROWS)
    v = _kv_values(_load_rows(v_ptrs, kv_mask, d_mask, MASKED, PADDED), q.dtype, FP8_KV, NATIVE_FP8)
    acc = tl.dot(p.to(v.dtype), v, acc * alpha[:, None], input_precision=DOT_PREC)
    return m_new, l_i, acc


@triton.jit
def _attend_loaded(q, k, v, kv_mask, score_mask, m_i, l_i, acc, scale_log2e,
                   MASKED: tl.constexpr, DOT_PREC: tl.constexpr, SOFTCAP: tl.constexpr, EMPTY_ROWS: tl.constexpr):
    """`_attend_tile` over K/V tiles already loaded whole (by TMA): rows past the context may
    hold anything, so their scores are masked and their values zeroed (0 * NaN is NaN)."""
    s = tl.dot(q, tl.trans(k.to(q.dtype)), input_precision=DOT_PREC)
    if SOFTCAP > 0:  # before the mask: NaN capped is NaN, masked it is -inf
        s = _softcapped(s, scale_log2e, SOFTCAP)
    if MASKED:
        s = tl.where(score_mask, s, float("-inf"))
        v = tl.where(kv_mask[:, None], v, 0.0)
    m_new, alpha, p, l_i = _online_softmax(s, m_i, l_i, scale_log2e, SOFTCAP, EMPTY_ROWS)
    v = v.to(q.dtype)
    acc = tl.dot(p.to(v.dtype), v, acc * alpha[:, None], input_precision=DOT_PREC)
    return m_new, l_i, acc


@triton.jit
def _softcapped(s, scale_log2e, SOFTCAP: tl.constexpr):
    """Gemma 2's cap of the scaled scores, SOFTCAP · tanh(s · scale / SOFTCAP), times LOG2E:
    the exp2 domain's score, in fp32. tanh(x) = 1 - 2 / (e^2x + 1) (no tanh in every Triton
    from 3.4), e^2x = exp2(s · scale_log2e · 2 / SOFTCAP): ±inf in the exponential give ±cap,
    never NaN."""
    cap = SOFTCAP * 1.4426950408889634
    e = tl.exp2(s * (scale_log2e * (2.0 / SOFTCAP)))
    return cap - (2.0 * cap) / (e + 1.0)


@triton.jit
def _online_softmax(s, m_i, l_i, scale_log2e, SOFTCAP: tl.constexpr, EMPTY_ROWS: tl.constexpr):
    """One step of the running max / sum over raw scores `s`: (new max, rescale of the old
    accumulator, probabilities, new sum). The scale is applied to the row max and then inside
    the exponent's argument, where it fuses with the subtraction (one FMA per score); capped
    scores (SOFTCAP > 0) are already scaled. EMPTY_ROWS: a row may have seen no key yet (a
    sliding window can start past a row's first tiles), so a max still -inf is taken as 0:
    exp2(-inf - -inf) would be NaN."""
    if SOFTCAP > 0:
        m_new = tl.maximum(m_i, tl.max(s, 1))
    else:
        m_new = tl.maximum(m_i, tl.max(s, 1) * scale_log2e)
    if EMPTY_ROWS:
        m_ref = tl.where(m_new > float("-inf"), m_new, 0.0)
    else:
        m_ref = m_new
    alpha = tl.exp2(m_i - m_ref)
    if SOFTCAP > 0:
        p = tl.exp2(s - m_ref[:, None])
    else:
        p = tl.exp2(s * scale_log2e - m_ref[:, None])
    return m_new, alpha, p, l_i * alpha + tl.sum(p, 1)


@triton.jit
def _key_tile(q, start, offs_n, ctx, table_row, kvh, k_head, v_head, k_desc, v_desc,
              stride_kc_block, stride_kc_slot, stride_vc_block, stride_vc_slot,
              kv_mask, d_mask, score_mask, m_i, l_i, acc, scale_log2e,
              MASKED: tl.constexpr, HEAD_DIM: tl.constexpr, PADDED: tl.constexpr, BLOCK_SIZE: tl.constexpr,
              TILE_IN_BLOCK: tl.constexpr, SAME_LAYOUT: tl.constexpr, USE_TMA: tl.constexpr,
              DOT_PREC: tl.constexpr, SOFTCAP: tl.constexpr, EMPTY_ROWS: tl.constexpr,
              FP8_KV: tl.constexpr, NATIVE_FP8: tl.constexpr):
    """One online-softmax step over the key tile `start + offs_n` of a sequence: loaded through
    the tensor descriptors (USE_TMA: the tile lies inside one cache block) or gathered through
    the block table (an fp8 cache's dequantized as loaded, FP8_KV)."""
    tl.static_assert(not (USE_TMA and PADDED), "tensor descriptors take power-of-two head dims only")
    tl.static_assert(not (USE_TMA and FP8_KV), "fp8 caches are read through pointers")
    if USE_TMA:
        row = (tl.load(table_row + start // BLOCK_SIZE) * BLOCK_SIZE + start % BLOCK_SIZE).to(tl.int32)
        m_i, l_i, acc = _attend_loaded(q, k_desc.load([row, kvh * HEAD_DIM]), v_desc.load([row, kvh * HEAD_DIM]),
                                       kv_mask, score_mask, m_i, l_i, acc, scale_log2e, MASKED, DOT_PREC,
                                       SOFTCAP, EMPTY_ROWS)
    else:
        k_off = _kv_offsets(table_row, start, offs_n, ctx, stride_kc_block, stride_kc_slot,
                            BLOCK_SIZE, TILE_IN_BLOCK)
        if SAME_LAYOUT:
            v_off = k_off
        else:
            v_off = _kv_offsets(table_row, start, offs_n, ctx, stride_vc_block, stride_vc_slot,
                                BLOCK_SIZE, TILE_IN_BLOCK)
        m_i, l_i, acc = _attend_tile(q, k_head + k_off[:, None], v_head + v_off[:, None],
                                     kv_mask, d_mask, score_mask, m_i, l_i, acc, scale_log2e, MASKED, PADDED,
                                     DOT_PREC, SOFTCAP, EMPTY_ROWS, FP8_KV, NATIVE_FP8)
    return m_i, l_i, acc


@triton.jit
def _fresh_tile(q, start, offs_n, kvh, key_head, value_head, key_desc, value_desc, stride_kt, stride_vt,
                kv_mask, d_mask, score_mask, m_i, l_i, acc, scale_log2e,
                MASKED: tl.constexpr, HEAD_DIM: tl.constexpr, PADDED: tl.constexpr, USE_TMA: tl.constexpr,
                DOT_PREC: tl.constexpr, SOFTCAP: tl.constexpr, EMPTY_ROWS: tl.constexpr):
    """One online-softmax step over the step's own K/V rows `start + offs_n` (contiguous
    token rows, whatever the cache's block size): through the tensor descriptors (USE_TMA) or
    plain loads."""
    tl.static_assert(not (USE_TMA and PADDED), "tensor descriptors take power-of-two head dims only")
    if USE_TMA:
        column = kvh * HEAD_DIM
        m_i, l_i, acc = _attend_loaded(q, key_desc.load([start, column]), value_desc.load([start, column]),
                                       kv_mask, score_mask, m_i, l_i, acc, scale_log2e, MASKED, DOT_PREC,
                                       SOFTCAP, EMPTY_ROWS)
    else:
        rows = (start + offs_n).to(tl.int64)[:, None]
        m_i, l_i, acc = _attend_tile(q, key_head + rows * stride_kt, value_head + rows * stride_vt,
                                     kv_mask, d_mask, score_mask, m_i, l_i, acc, scale_log2e, MASKED, PADDED,
                                     DOT_PREC, SOFTCAP, EMPTY_ROWS, False, False)
    return m_i, l_i, acc


# ----------------------------------------------------------------------------- store_kv


@triton.jit
def _store_kv_kernel(
    key_ptr, value_ptr, k_cache_ptr, v_cache_ptr, slot_ptr,
    stride_kt, stride_kh, stride_vt, stride_vh,
    stride_kc_slot, stride_kc_h, stride_vc_slot, stride_vc_h, k_scale, v_scale,
    NUM_KV_HEADS: tl.constexpr, HEAD_DIM: tl.constexpr, BLOCK_D: tl.constexpr, BLOCK_H: tl.constexpr,
    FP8_KV: tl.constexpr, NATIVE_FP8: tl.constexpr,
):
    t = tl.program_id(0)
    slot = tl.load(slot_ptr + t).to(tl.int64)
    if slot >= 0:
        offs_h = tl.arange(0, BLOCK_H)
        offs_d = tl.arange(0, BLOCK_D)
        mask = (offs_h < NUM_KV_HEADS)[:, None]
        if BLOCK_D != HEAD_DIM:  # a padded head dim: never past a head (the next one's memory)
            mask = mask & (offs_d < HEAD_DIM)[None, :]
        t64 = t.to(tl.int64)
        k = tl.load(key_ptr + t64 * stride_kt + offs_h[:, None] * stride_kh + offs_d[None, :], mask=mask)
        v = tl.load(value_ptr + t64 * stride_vt + offs_h[:, None] * stride_vh + offs_d[None, :], mask=mask)
        tl.store(k_cache_ptr + slot * stride_kc_slot + offs_h[:, None] * stride_kc_h + offs_d[None, :],
                 _cache_values(k, k_scale, k_cache_ptr.dtype.element_ty, FP8_KV, NATIVE_FP8), mask=mask)
        tl.store(v_cache_ptr + slot * stride_vc_slot + offs_h[:, None] * stride_vc_h + offs_d[None, :],
                 _cache_values(v, v_scale, v_cache_ptr.dtype.element_ty, FP8_KV, NATIVE_FP8), mask=mask)


def store_kv(
    key: torch.Tensor,
    value: torch.Tensor,
    k_cache: torch.Tensor,
    v_cache: torch.Tensor,
    slot_mapping: torch.Tensor,
    *,
    k_scale: float = 1.0,
    v_scale: float = 1.0,
) -> None:
    """Write key/value `[T, Hkv, D]` into the caches at `slot_mapping` `[T]`; slot -1 = skip.
    An fp8 cache stores key / k_scale and value / v_scale, as `kernels.reference.store_kv`
    (other caches take no scales)."""
    T, num_kv_heads, head_dim = key.shape
    _check_cache(k_cache, v_cache, num_kv_heads, head_dim)
    if value.shape != key.shape or slot_mapping.shape != (T,):
        raise ValueError(f"store_kv: key {tuple(key.shape)}, value {tuple(value.shape)} and "
                         f"slot_mapping {tuple(slot_mapping.shape)} disagree")
    for cache in (k_cache, v_cache):  # a slot's offset is slot * stride(1): blocks back to back
        if cache.shape[0] > 1 and cache.stride(0) != cache.shape[1] * cache.stride(1):
            raise ValueError("store_kv needs each cache's blocks back to back (stride(0) == block_size * "
                             f"stride(1)), got strides {cache.stride()}")
    if T == 0:
        return
    key, value = _last_dim_contiguous(key), _last_dim_contiguous(value)
    slot_mapping = slot_mapping.contiguous()
    k_cache, v_cache, scales, fp8 = _kv_operands(k_cache, v_cache, k_scale, v_scale, key.device)
    _store_kv_kernel[(T,)](
        key, value, k_cache, v_cache, slot_mapping,
        key.stride(0), key.stride(1), value.stride(0), value.stride(1),
        k_cache.stride(1), k_cache.stride(2), v_cache.stride(1), v_cache.stride(2), *scales,
        NUM_KV_HEADS=num_kv_heads, HEAD_DIM=head_dim, BLOCK_D=_block_d(head_dim),
        BLOCK_H=triton.next_power_of_2(num_kv_heads), **fp8,
        num_warps=4 if num_kv_heads * head_dim >= 1024 else 1, **LAUNCH_OPTIONS,
    )


# ----------------------------------------------------------------------------- decode


@triton.jit
def _decode_kernel(
    q_ptr, k_cache_ptr, v_cache_ptr, block_tables_ptr, context_lens_ptr,
    out_ptr, part_acc_ptr, part_m_ptr, part_l_ptr, counters_ptr,
    scale_log2e, num_splits,
    stride_qb, stride_qh,
    stride_kc_block, stride_kc_slot, stride_kc_h,
    stride_vc_block, stride_vc_slot, stride_vc_h,
    stride_bt, stride_ob, stride_oh, v_scale,
    GROUP: tl.constexpr, BLOCK_G: tl.constexpr, HEAD_DIM: tl.constexpr, BLOCK_D: tl.constexpr,
    BLOCK_SIZE: tl.constexpr, BLOCK_N: tl.constexpr, TILE_IN_BLOCK: tl.constexpr,
    SPLIT: tl.constexpr, FUSED_MERGE: tl.constexpr, BLOCK_S: tl.constexpr,
    MERGE_HEADS: tl.constexpr, BLOCK_GM: tl.constexpr,
    SAME_LAYOUT: tl.constexpr, DOT_PREC: tl.constexpr, WINDOW: tl.constexpr, SOFTCAP: tl.constexpr,
    FP8_KV: tl.constexpr, NATIVE_FP8: tl.constexpr,
):
    # One program per (sequence, kv head, split).
    b = tl.program_id(0)
    kvh = tl.program_id(1)
    split = tl.program_id(2)
    m_i, l_i, acc = _decode_split(b, kvh, split, num_splits, q_ptr, k_cache_ptr, v_cache_ptr, block_tables_ptr,
                                  context_lens_ptr, scale_log2e, v_scale, stride_qb, stride_qh,
                                  stride_kc_block, stride_kc_slot, stride_kc_h,
                                  stride_vc_block, stride_vc_slot, stride_vc_h, stride_bt,
                                  GROUP, BLOCK_G, HEAD_DIM, BLOCK_D, BLOCK_SIZE, BLOCK_N, TILE_IN_BLOCK, SAME_LAYOUT,
                                  DOT_PREC, WINDOW, SOFTCAP, FP8_KV, NATIVE_FP8)
    if SPLIT:
        _decode_partial(m_i, l_i, acc, b, kvh, split, tl.num_programs(1), num_splits,
                        out_ptr, part_acc_ptr, part_m_ptr, part_l_ptr, counters_ptr, stride_ob, stride_oh,
                        GROUP, BLOCK_G, HEAD_DIM, BLOCK_D, FUSED_MERGE, BLOCK_S, MERGE_HEADS, BLOCK_GM)
    else:
        _decode_output(l_i, acc, b, kvh, out_ptr, stride_ob, stride_oh, GROUP, BLOCK_G, HEAD_DIM, BLOCK_D)


@triton.jit
def _decode_graphed_kernel(
    q_ptr, k_cache_ptr, v_cache_ptr, block_tables_ptr, context_lens_ptr,
    out_ptr, part_acc_ptr, part_m_ptr, part_l_ptr, counters_ptr, counts_ptr,
    scale_log2e, num_kv_heads,
    stride_qb, stride_qh,
    stride_kc_block, stride_kc_slot, stride_kc_h,
    stride_vc_block, stride_vc_slot, stride_vc_h,
    stride_bt, stride_ob, stride_oh, v_scale,
    GROUP: tl.constexpr, BLOCK_G: tl.constexpr, HEAD_DIM: tl.constexpr, BLOCK_D: tl.constexpr,
    BLOCK_SIZE: tl.constexpr, BLOCK_N: tl.constexpr, TILE_IN_BLOCK: tl.constexpr, BLOCK_S: tl.constexpr,
    MERGE_HEADS: tl.constexpr, BLOCK_GM: tl.constexpr,
    SAME_LAYOUT: tl.constexpr, DOT_PREC: tl.constexpr, WINDOW: tl.constexpr, SOFTCAP: tl.constexpr,
    FP8_KV: tl.constexpr, NATIVE_FP8: tl.constexpr,
):
    # A fixed number of programs walks the (sequence, kv head, split) items of the first
    # counts[0] sequences, split counts[1] ways: both read here, not fixed by the grid.
    num_seqs = tl.load(counts_ptr)
    num_splits = tl.load(counts_ptr + 1)
    per_seq = num_kv_heads * num_splits
    for item in range(tl.program_id(0), num_seqs * per_seq, tl.num_programs(0)):
        b = item // per_seq
        kvh = item % per_seq // num_splits
        split = item % num_splits
        m_i, l_i, acc = _decode_split(b, kvh, split, num_splits, q_ptr, k_cache_ptr, v_cache_ptr, block_tables_ptr,
                                      context_lens_ptr, scale_log2e, v_scale, stride_qb, stride_qh,
                                      stride_kc_block, stride_kc_slot, stride_kc_h,
                                      stride_vc_block, stride_vc_slot, stride_vc_h, stride_bt,
                                      GROUP, BLOCK_G, HEAD_DIM, BLOCK_D, BLOCK_SIZE, BLOCK_N, TILE_IN_BLOCK,
                                      SAME_LAYOUT, DOT_PREC, WINDOW, SOFTCAP, FP8_KV, NATIVE_FP8)
        if num_splits > 1:
            _decode_partial(m_i, l_i, acc, b, kvh, split, num_kv_heads, num_splits,
                            out_ptr, part_acc_ptr, part_m_ptr, part_l_ptr, counters_ptr, stride_ob, stride_oh,
                            GROUP, BLOCK_G, HEAD_DIM, BLOCK_D, True, BLOCK_S, MERGE_HEADS, BLOCK_GM)
        else:
            _decode_output(l_i, acc, b, kvh, out_ptr, stride_ob, stride_oh, GROUP, BLOCK_G, HEAD_DIM, BLOCK_D)


@triton.jit
def _decode_split(
    b, kvh, split, num_splits,
    q_ptr, k_cache_ptr, v_cache_ptr, block_tables_ptr, context_lens_ptr, scale_log2e, v_scale,
    stride_qb, stride_qh,
    stride_kc_block, stride_kc_slot, stride_kc_h,
    stride_vc_block, stride_vc_slot, stride_vc_h,
    stride_bt,
    GROUP: tl.constexpr, BLOCK_G: tl.constexpr, HEAD_DIM: tl.constexpr, BLOCK_D: tl.constexpr,
    BLOCK_SIZE: tl.constexpr, BLOCK_N: tl.constexpr, TILE_IN_BLOCK: tl.constexpr,
    SAME_LAYOUT: tl.constexpr, DOT_PREC: tl.constexpr, WINDOW: tl.constexpr, SOFTCAP: tl.constexpr,
    FP8_KV: tl.constexpr, NATIVE_FP8: tl.constexpr,
):
    """Split `split` of `num_splits` of sequence b's context for kv head kvh's query heads (the
    rows): the unnormalised (max, sum, accumulator) of the online softmax. With a sliding
    WINDOW only the last WINDOW keys are seen: the splits share the tiles from the one that
    holds the first of them, not the whole context."""
    ctx = tl.load(context_lens_ptr + b)
    # Splits cut the keys into equal BLOCK_N-aligned chunks; trailing splits may be empty.
    if WINDOW > 0:
        first = tl.maximum(ctx - WINDOW, 0)  # the first key seen
        base = first // BLOCK_N * BLOCK_N
        chunk = tl.cdiv(tl.cdiv(ctx - base, num_splits), BLOCK_N) * BLOCK_N
        lo = base + split * chunk
    else:
        chunk = tl.cdiv(tl.cdiv(ctx, num_splits), BLOCK_N) * BLOCK_N
        lo = split * chunk
    hi = tl.minimum(lo + chunk, ctx)

    PADDED: tl.constexpr = BLOCK_D != HEAD_DIM
    offs_g = tl.arange(0, BLOCK_G)
    offs_d = tl.arange(0, BLOCK_D)
    d_mask = offs_d < HEAD_DIM
    offs_n = tl.arange(0, BLOCK_N)
    heads = kvh * GROUP + offs_g
    b64 = b.to(tl.int64)
    q = tl.load(q_ptr + b64 * stride_qb + heads[:, None] * stride_qh + offs_d[None, :],
                mask=_rows_mask(offs_g < GROUP, d_mask, PADDED), other=0.0)

    m_i = tl.full([BLOCK_G], float("-inf"), tl.float32)
    l_i = tl.zeros([BLOCK_G], tl.float32)
    acc = tl.zeros([BLOCK_G, BLOCK_D], tl.float32)
    table_row = block_tables_ptr + b64 * stride_bt
    k_head = k_cache_ptr + kvh * stride_kc_h + offs_d[None, :]
    v_head = v_cache_ptr + kvh * stride_vc_h + offs_d[None, :]
    # Every tile starts below ctx, so each holds a valid key (the first tile of the window holds
    # its first key, later ones start past it): m_i is finite after the first.
    for start in range(lo, hi, BLOCK_N):
        if WINDOW > 0:
            # Keys first..ctx-1, the bounds moved onto the tile's offsets: as
            # `start + offs_n >= first`, Triton 3.4's fp32 graphed kernel spilled 4 bytes.
            kv_mask = (offs_n >= first - start) & (offs_n < ctx - start)
        else:
            kv_mask = start + offs_n < ctx
        m_i, l_i, acc = _key_tile(q, start, offs_n, ctx, table_row, kvh, k_head, v_head, None, None,
                                  stride_kc_block, stride_kc_slot, stride_vc_block, stride_vc_slot,
                                  kv_mask, d_mask, kv_mask[None, :], m_i, l_i, acc, scale_log2e, True, HEAD_DIM,
                                  PADDED, BLOCK_SIZE, TILE_IN_BLOCK, SAME_LAYOUT, False, DOT_PREC, SOFTCAP, False,
                                  FP8_KV, NATIVE_FP8)
    if FP8_KV:  # the values' scale, once per output row instead of per value read
        acc = acc * v_scale
    return m_i, l_i, acc


@triton.jit
def _decode_output(l_i, acc, b, kvh, out_ptr, stride_ob, stride_oh,
                   GROUP: tl.constexpr, BLOCK_G: tl.constexpr, HEAD_DIM: tl.constexpr, BLOCK_D: tl.constexpr):
    """An unsplit context's output rows."""
    PADDED: tl.constexpr = BLOCK_D != HEAD_DIM
    offs_g = tl.arange(0, BLOCK_G)
    offs_d = tl.arange(0, BLOCK_D)
    out = acc / tl.where(l_i > 0, l_i, 1.0)[:, None]  # context 0 (padding rows): zeros
    tl.store(out_ptr + b.to(tl.int64) * stride_ob + (kvh * GROUP + offs_g)[:, None] * stride_oh + offs_d[None, :],
             out.to(out_ptr.dtype.element_ty), mask=_rows_mask(offs_g < GROUP, offs_d < HEAD_DIM, PADDED))


@triton.jit
def _decode_partial(m_i, l_i, acc, b, kvh, split, num_kv_heads, num_splits,
                    out_ptr, part_acc_ptr, part_m_ptr, part_l_ptr, counters_ptr, stride_ob, stride_oh,
                    GROUP: tl.constexpr, BLOCK_G: tl.constexpr, HEAD_DIM: tl.constexpr, BLOCK_D: tl.constexpr,
                    FUSED_MERGE: tl.constexpr, BLOCK_S: tl.constexpr, MERGE_HEADS: tl.constexpr,
                    BLOCK_GM: tl.constexpr):
    """A split's partial; with FUSED_MERGE, the last split of the (sequence, kv head) to arrive
    merges them all into the output rows."""
    PADDED: tl.constexpr = BLOCK_D != HEAD_DIM
    offs_g = tl.arange(0, BLOCK_G)
    offs_d = tl.arange(0, BLOCK_D)
    g_mask = offs_g < GROUP
    b64 = b.to(tl.int64)
    # Partials [B, Hq, S, D] and [B, Hq, S], contiguous (rows of HEAD_DIM, not BLOCK_D).
    row = (b64 * num_kv_heads * GROUP + kvh * GROUP + offs_g) * num_splits + split
    tl.store(part_acc_ptr + row[:, None] * HEAD_DIM + offs_d[None, :], acc,
             mask=_rows_mask(g_mask, offs_d < HEAD_DIM, PADDED))
    tl.store(part_m_ptr + row, m_i, mask=g_mask)
    tl.store(part_l_ptr + row, l_i, mask=g_mask)
    if FUSED_MERGE:
        # The last split of this (sequence, kv head) to finish merges all of them, which
        # saves the reduction kernel's launch. Every thread's stores precede the counter's
        # release (barrier, then acq_rel atomic); the last program's acquire sees them all.
        tl.debug_barrier()
        counter = counters_ptr + b64 * num_kv_heads + kvh
        if tl.atomic_add(counter, 1) == num_splits - 1:
            tl.store(counter, 0)  # zero again for the next launch on this stream
            for g in range(0, GROUP, MERGE_HEADS):  # MERGE_HEADS divides GROUP
                head = kvh * GROUP + g
                _merge_splits(part_acc_ptr, part_m_ptr, part_l_ptr,
                              (b64 * num_kv_heads * GROUP + head) * num_splits, num_splits,
                              out_ptr + b64 * stride_ob + head * stride_oh, stride_oh,
                              MERGE_HEADS, BLOCK_GM, HEAD_DIM, BLOCK_D, BLOCK_S)


@triton.jit(noinline=True)  # inlined into the decode kernel, fp32 tiles spilled 1 KiB on sm_90
def _merge_splits(part_acc_ptr, part_m_ptr, part_l_ptr, first_row, num_splits, out_ptr, stride_oh,
                  HEADS: tl.constexpr, BLOCK_GM: tl.constexpr, HEAD_DIM: tl.constexpr, BLOCK_D: tl.constexpr,
                  BLOCK_S: tl.constexpr):
    """Write the outputs of HEADS (<= BLOCK_GM) consecutive query heads of one sequence (from
    `out_ptr`) from their `num_splits` partials each, at rows `first_row + g * num_splits + s`:
    one load of all of them, not one per head, since in the fused merge this is the tail of the
    last split to finish. Loads bypass L1 (`.cg`): other programs of the same launch wrote them."""
    PADDED: tl.constexpr = BLOCK_D != HEAD_DIM
    offs_s = tl.arange(0, BLOCK_S)
    offs_d = tl.arange(0, BLOCK_D)
    d_mask = offs_d < HEAD_DIM
    if HEADS == 1:
        # One head as [S] and [S, D]: as [1, S, D], fp32's caller spilled (sm_90, Triton 3.6).
        s_mask = offs_s < num_splits
        row = first_row + offs_s
        m = tl.load(part_m_ptr + row, mask=s_mask, other=float("-inf"), cache_modifier=".cg")
        l = tl.load(part_l_ptr + row, mask=s_mask, other=0.0, cache_modifier=".cg")
        acc = tl.load(part_acc_ptr + row[:, None] * HEAD_DIM + offs_d[None, :], mask=_rows_mask(s_mask, d_mask, PADDED),
                      other=0.0, cache_modifier=".cg")
        if PADDED:
            tl.store(out_ptr + offs_d, _merged(m, l, acc, 0).to(out_ptr.dtype.element_ty), mask=d_mask)
        else:
            tl.store(out_ptr + offs_d, _merged(m, l, acc, 0).to(out_ptr.dtype.element_ty))
    else:
        offs_g = tl.arange(0, BLOCK_GM)
        g_mask = offs_g < HEADS
        mask = g_mask[:, None] & (offs_s < num_splits)[None, :]
        row = first_row + offs_g[:, None] * num_splits + offs_s[None, :]  # [G, S]
        m = tl.load(part_m_ptr + row, mask=mask, other=float("-inf"), cache_modifier=".cg")
        l = tl.load(part_l_ptr + row, mask=mask, other=0.0, cache_modifier=".cg")
        if PADDED:
            acc_mask = mask[:, :, None] & d_mask[None, None, :]
        else:
            acc_mask = mask[:, :, None]
        acc = tl.load(part_acc_ptr + row[:, :, None] * HEAD_DIM + offs_d[None, None, :], mask=acc_mask,
                      other=0.0, cache_modifier=".cg")  # [G, S, D]
        tl.store(out_ptr + offs_g[:, None] * stride_oh + offs_d[None, :],
                 _merged(m, l, acc, 1).to(out_ptr.dtype.element_ty), mask=_rows_mask(g_mask, d_mask, PADDED))


@triton.jit
def _merged(m, l, acc, AXIS: tl.constexpr):
    """Partial outputs `acc` merged along AXIS (the splits) by their running max `m` and sum
    `l`. Empty splits (m = -inf) weigh 0; all empty (a padding row's context of 0): zeros."""
    m_max = tl.max(m, AXIS)
    w = tl.exp2(m - tl.expand_dims(tl.where(m_max > float("-inf"), m_max, 0.0), AXIS))
    l_sum = tl.sum(l * w, AXIS)
    return tl.sum(acc * tl.expand_dims(w, AXIS + 1), AXIS) / tl.expand_dims(tl.where(l_sum > 0, l_sum, 1.0), AXIS)


@triton.jit
def _decode_reduce_kernel(
    part_acc_ptr, part_m_ptr, part_l_ptr, out_ptr, num_splits,
    stride_ob, stride_oh,
    GROUP: tl.constexpr, BLOCK_GM: tl.constexpr, HEAD_DIM: tl.constexpr, BLOCK_D: tl.constexpr, BLOCK_S: tl.constexpr,
):
    # One program per (sequence, kv head), as the fused merge.
    b = tl.program_id(0).to(tl.int64)
    kvh = tl.program_id(1)
    _merge_splits(part_acc_ptr, part_m_ptr, part_l_ptr, (b * tl.num_programs(1) + kvh) * GROUP * num_splits,
                  num_splits, out_ptr + b * stride_ob + kvh * GROUP * stride_oh, stride_oh, GROUP,
                  BLOCK_GM, HEAD_DIM, BLOCK_D, BLOCK_S)


def paged_decode_attention(
    q: torch.Tensor,
    k_cache: torch.Tensor,
    v_cache: torch.Tensor,
    block_tables: torch.Tensor,
    context_lens: torch.Tensor,
    scale: float,
    *,
    sliding_window: int = 0,
    softcap: float = 0.0,
    k_scale: float = 1.0,
    v_scale: float = 1.0,
    num_splits: int | None = None,
    fused_merge: bool = True,
) -> torch.Tensor:
    """One query per sequence, q `[B, Hq, D]`, over its `context_lens[b]` cached keys (the last
    `sliding_window` of them where that is not 0; scores capped by `softcap` where that is not
    0, as `kernels.reference`); a sequence with context 0 (a padding row of a captured batch)
    gets zeros. An fp8 cache's keys and values are read times `k_scale` / `v_scale`.

    `num_splits` forces the split-K factor (None: chosen from the batch and the keys a
    sequence may see: the table width, or the window). With splits, `fused_merge` has the last
    split of each (sequence, kv head) merge the partials (one launch); otherwise a second
    kernel merges them (the benchmarks' peer)."""
    B, num_heads, head_dim = q.shape
    num_kv_heads = _check_heads(num_heads, k_cache, v_cache, head_dim, scale)
    window, softcap = _check_window(sliding_window, softcap)
    block_size = k_cache.shape[1]
    out = torch.empty(q.shape, dtype=q.dtype, device=q.device)
    if B == 0:
        return out
    q = _last_dim_contiguous(q)
    block_tables, context_lens = _last_dim_contiguous(block_tables), context_lens.contiguous()
    group = num_heads // num_kv_heads
    if num_splits is None:
        max_keys = block_tables.shape[1] * block_size
        num_splits = _num_splits(B, num_kv_heads, min(max_keys, window) if window else max_keys, q.device)
    if num_splits < 1:
        raise ValueError(f"num_splits must be >= 1, got {num_splits}")
    split = num_splits > 1
    if split:
        part_acc = torch.empty((B, num_heads, num_splits, head_dim), dtype=torch.float32, device=q.device)
        part_m = torch.empty((B, num_heads, num_splits), dtype=torch.float32, device=q.device)
        part_l = torch.empty_like(part_m)
    else:
        part_acc = part_m = part_l = out  # unused
    fused = split and fused_merge
    counters = _split_counters(B * num_kv_heads, q.device) if fused else out  # unused without
    k_cache, v_cache, scales, fp8 = _kv_operands(k_cache, v_cache, k_scale, v_scale, q.device)
    strides, options = _decode_launch(q, k_cache, v_cache, block_tables, out, group, window, softcap, fp8)
    _decode_kernel[(B, num_kv_heads, num_splits)](
        q, k_cache, v_cache, block_tables, context_lens,
        out, part_acc, part_m, part_l, counters,
        scale * LOG2E * scales[0], num_splits, *strides, scales[1],
        SPLIT=split, FUSED_MERGE=fused, BLOCK_S=triton.next_power_of_2(num_splits), **options,
    )
    if split and not fused:
        _decode_reduce_kernel[(B, num_kv_heads)](
            part_acc, part_m, part_l, out, num_splits, out.stride(0), out.stride(1),
            GROUP=group, BLOCK_GM=triton.next_power_of_2(group), HEAD_DIM=head_dim,
            BLOCK_D=_block_d(head_dim),
            BLOCK_S=triton.next_power_of_2(num_splits),
            num_warps=4 if group * head_dim * num_splits >= 2048 else 2, **LAUNCH_OPTIONS,
        )
    return out


# Arrival counters of the fused split merge, per device: every launch leaves them zero (each
# merging program resets its own), so launches in stream order share them with no memset. A
# buffer outgrown stays referenced: a captured CUDA graph may still point at it.
_COUNTERS: dict[torch.device, list[torch.Tensor]] = {}
MIN_COUNTERS = 8192  # (sequence, kv head) pairs; the split heuristic needs fewer than the SMs


def _decode_launch(q: torch.Tensor, k_cache: torch.Tensor, v_cache: torch.Tensor, block_tables: torch.Tensor,
                   out: torch.Tensor, group: int, window: int, softcap: float,
                   fp8: dict[str, bool]) -> tuple[tuple[int, ...], dict]:
    """What both decode kernels take after their scalars: the strides, then the constexprs
    and launch options that the shapes, the dtype, the layer's window and cap and the cache's
    fp8 constexprs (`_kv_operands`) decide."""
    head_dim, block_size = q.shape[2], k_cache.shape[1]
    block_n, num_warps, num_stages = _decode_config(head_dim, q.dtype, q.device, fp8["FP8_KV"])
    # The fused merge takes a kv head's query heads in one load, but fp32's caller then took
    # 255 registers and spilled 556 bytes on sm_90 (kernels/compile_check.py): one at a time.
    merge_heads = group if q.element_size() <= 2 else 1
    strides = (q.stride(0), q.stride(1),
               k_cache.stride(0), k_cache.stride(1), k_cache.stride(2),
               v_cache.stride(0), v_cache.stride(1), v_cache.stride(2),
               block_tables.stride(0), out.stride(0), out.stride(1))
    options = dict(
        GROUP=group, BLOCK_G=max(MIN_DOT, triton.next_power_of_2(group)), HEAD_DIM=head_dim,
        BLOCK_D=_block_d(head_dim),
        BLOCK_SIZE=block_size, BLOCK_N=block_n, TILE_IN_BLOCK=block_size % block_n == 0,
        MERGE_HEADS=merge_heads, BLOCK_GM=triton.next_power_of_2(merge_heads),
        SAME_LAYOUT=k_cache.stride() == v_cache.stride(), DOT_PREC=_dot_precision(q.dtype),
        WINDOW=window, SOFTCAP=softcap, num_warps=num_warps, num_stages=num_stages, **fp8, **LAUNCH_OPTIONS,
    )
    return strides, options


def _split_counters(n: int, device: torch.device) -> torch.Tensor:
    buffers = _COUNTERS.setdefault(device, [])
    if not buffers or buffers[-1].numel() < n:
        if device.type == "cuda" and torch.cuda.is_current_stream_capturing():
            raise RuntimeError(f"split decode of {n} (sequence, kv head) pairs under CUDA graph capture needs "
                               "counters allocated before it: run the same batch once eagerly first")
        buffers.append(torch.zeros(max(n, MIN_COUNTERS), dtype=torch.int32, device=device))
    return buffers[-1]


# A mixed CUDA graph's decodes: at most this many splits, and this many (sequence, kv head,
# split) items with partials (their buffer's rows, in kv heads: 2 MiB at a group of 4, D 128).
GRAPHED_MAX_SPLITS = 16
GRAPHED_SPLIT_ITEMS = 1024


def graphed_decode_splits(num_decodes: int, num_kv_heads: int, max_context: int, device: torch.device) -> int:
    """The split count for `paged_decode_attention_graphed` this step: the eager choice
    (`_num_splits` over the decodes' longest context), within the graphed buffers."""
    if num_decodes == 0:
        return 1
    splits = _num_splits(num_decodes, num_kv_heads, max_context, device)
    return max(1, min(splits, GRAPHED_MAX_SPLITS, GRAPHED_SPLIT_ITEMS // (num_decodes * num_kv_heads)))


def paged_decode_attention_graphed(
    q: torch.Tensor,
    k_cache: torch.Tensor,
    v_cache: torch.Tensor,
    block_tables: torch.Tensor,
    context_lens: torch.Tensor,
    scale: float,
    counts: torch.Tensor,
    out: torch.Tensor,
    *,
    sliding_window: int = 0,
    softcap: float = 0.0,
    k_scale: float = 1.0,
    v_scale: float = 1.0,
) -> torch.Tensor:
    """`paged_decode_attention` for the leading `counts[0]` sequences (rows of `q`,
    `block_tables`, `context_lens`), each split `counts[1]` ways, into their rows of `out`
    (the others are left as they are). `counts` is int32 on the device: in a mixed CUDA graph
    the step's decode count and split count change at every replay, so a fixed number of
    programs walks the work items instead of a grid shaped by them. The
    caller keeps counts[0] <= len(block_tables), counts[1] <= GRAPHED_MAX_SPLITS and, when
    counts[1] > 1, counts[0] * Hkv * counts[1] <= GRAPHED_SPLIT_ITEMS
    (`graphed_decode_splits` does). `sliding_window` and `softcap`, a layer's constants, are
    compiled into the kernel (as in every attention kernel here): fixed at capture; an fp8
    cache's `k_scale` / `v_scale` are the launch's arguments, also fixed at capture."""
    B = block_tables.shape[0]
    _, num_heads, head_dim = q.shape
    num_kv_heads = _check_heads(num_heads, k_cache, v_cache, head_dim, scale)
    window, softcap = _check_window(sliding_window, softcap)
    out = _output_like(q, out)
    if B == 0:
        return out
    q = _last_dim_contiguous(q)
    block_tables, context_lens = _last_dim_contiguous(block_tables), context_lens.contiguous()
    group = num_heads // num_kv_heads
    part_acc = torch.empty((GRAPHED_SPLIT_ITEMS * group, head_dim), dtype=torch.float32, device=q.device)
    part_m = torch.empty(GRAPHED_SPLIT_ITEMS * group, dtype=torch.float32, device=q.device)
    part_l = torch.empty_like(part_m)
    k_cache, v_cache, scales, fp8 = _kv_operands(k_cache, v_cache, k_scale, v_scale, q.device)
    strides, options = _decode_launch(q, k_cache, v_cache, block_tables, out, group, window, softcap, fp8)
    if fp8["FP8_KV"] and softcap > 0 and q.element_size() <= 2:
        # Over 4 warps Triton 3.6 (the GPU machines') spilled 64 bytes here on sm_90 (bf16,
        # Gemma 2's window and cap; kernels/compile_check.py), and fewer stages only moved the
        # spills between releases; over 8 none of 3.4, 3.6 and 3.9 spills on sm_80 to sm_90.
        options["num_warps"] = 8
    # A program per (sequence, kv head) of the widest step, as paged_decode_attention's grid
    # without splits (so no program walks two contexts when nothing is split), and at least
    # two per SM, which the split items (at most GRAPHED_SPLIT_ITEMS) share.
    programs = max(2 * _sm_count(_device_index(q.device)) if q.device.type == "cuda" else 3, B * num_kv_heads)
    _decode_graphed_kernel[(programs,)](
        q, k_cache, v_cache, block_tables, context_lens,
        out, part_acc, part_m, part_l, _split_counters(B * num_kv_heads, q.device), counts,
        scale * LOG2E * scales[0], num_kv_heads, *strides, scales[1],
        BLOCK_S=GRAPHED_MAX_SPLITS, **options,
    )
    return out


def paged_mixed_attention_graphed(
    q: torch.Tensor,
    k_cache: torch.Tensor,
    v_cache: torch.Tensor,
    block_tables: torch.Tensor,
    cu_seqlens_q: torch.Tensor,
    context_lens: torch.Tensor,
    scale: float,
    counts: torch.Tensor,
    *,
    key: torch.Tensor | None = None,
    value: torch.Tensor | None = None,
    sliding_window: int = 0,
    softcap: float = 0.0,
    k_scale: float = 1.0,
    v_scale: float = 1.0,
) -> torch.Tensor:
    """A mixed CUDA graph's attention, into one output: the leading `counts[0]` sequences
    (the decodes, one query each, first in `q`) by `paged_decode_attention_graphed`, split
    `counts[1]` ways, and the others by `paged_prefill_attention`, which skips them.
    `cu_seqlens_q` spans every sequence, decodes included. An fp8 cache's scales as there."""
    attn = dict(sliding_window=sliding_window, softcap=softcap, k_scale=k_scale, v_scale=v_scale)
    out = paged_decode_attention_graphed(q, k_cache, v_cache, block_tables, context_lens, scale, counts,
                                         torch.empty_like(q), **attn)
    return paged_prefill_attention(q, k_cache, v_cache, block_tables, cu_seqlens_q, context_lens, scale,
                                   key=key, value=value, skip_sequences=counts, out=out, **attn)


def _output_like(q: torch.Tensor, out: torch.Tensor | None) -> torch.Tensor:
    if out is None:
        return torch.empty(q.shape, dtype=q.dtype, device=q.device)
    if out.shape != q.shape or out.dtype != q.dtype or out.stride(-1) != 1:
        raise ValueError(f"out must be {tuple(q.shape)} {q.dtype} with head_dim contiguous, got "
                         f"{tuple(out.shape)} {out.dtype} strides {out.stride()}")
    return out


# ----------------------------------------------------------------------------- prefill


@triton.jit
def _find_sequence(cu_seqlens_ptr, tile, num_seqs, BLOCK_Q: tl.constexpr):
    """The sequence owning query tile `tile`: sequence b owns tiles from cu[b] // BLOCK_Q + b
    (an upper bound of the tiles before it, so a grid of Tq // BLOCK_Q + B tiles covers all)."""
    lo: tl.int32 = 0
    hi: tl.int32 = num_seqs
    while lo < hi:
        mid = (lo + hi) // 2
        first = tl.load(cu_seqlens_ptr + mid) // BLOCK_Q + mid
        if first <= tile:
            lo = mid + 1
        else:
            hi = mid
    return lo - 1


@triton.jit
def _window_tiles(first, last, unmasked_end, WINDOW: tl.constexpr, BLOCK_N: tl.constexpr):
    """The BLOCK_N-aligned key tiles that rows at positions first..last see through a sliding
    WINDOW, where tiles below `unmasked_end` hold no key past any row: (the first key any row
    sees, the tile holding it, the first tile every row sees whole, at most unmasked_end)."""
    seen = tl.maximum(first - (WINDOW - 1), 0)
    start = seen // BLOCK_N * BLOCK_N
    every = tl.maximum(last - (WINDOW - 1), 0)
    return seen, start, tl.minimum(tl.maximum(tl.cdiv(every, BLOCK_N) * BLOCK_N, start), unmasked_end)


@triton.jit
def _tile_start(i, first_tiles, first_start, then_start, BLOCK_N: tl.constexpr):
    """The start of masked key tile i of two runs in one loop: `first_tiles` from first_start,
    then from then_start."""
    return tl.where(i < first_tiles, first_start + i * BLOCK_N, then_start + (i - first_tiles) * BLOCK_N)


@triton.jit
def _prefill_kernel(
    q_ptr, k_cache_ptr, v_cache_ptr, key_ptr, value_ptr, block_tables_ptr, cu_seqlens_ptr, context_lens_ptr,
    out_ptr,
    k_desc, v_desc,  # with CACHE_TMA: the caches as 2-D [slots, Hkv * D] tensor descriptors
    key_desc, value_desc,  # with FRESH_TMA: the step's K/V as 2-D [tokens, Hkv * D] descriptors
    skip_ptr,  # with SKIP_LEADING: how many leading sequences are left to another kernel
    scale_log2e, num_seqs,
    stride_qt, stride_qh, stride_kt, stride_kh, stride_vt, stride_vh,
    stride_kc_block, stride_kc_slot, stride_kc_h,
    stride_vc_block, stride_vc_slot, stride_vc_h,
    stride_bt, stride_ot, stride_oh, v_scale,
    GROUP: tl.constexpr, HEADS: tl.constexpr, HEAD_DIM: tl.constexpr, BLOCK_D: tl.constexpr,
    BLOCK_SIZE: tl.constexpr, BLOCK_Q: tl.constexpr, BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr,
    TILE_IN_BLOCK: tl.constexpr, SAME_LAYOUT: tl.constexpr, DOT_PREC: tl.constexpr, CACHE_TMA: tl.constexpr,
    FRESH: tl.constexpr, FRESH_TMA: tl.constexpr, SKIP_LEADING: tl.constexpr,
    WINDOW: tl.constexpr, SOFTCAP: tl.constexpr, FP8_KV: tl.constexpr, NATIVE_FP8: tl.constexpr,
):
    # Row r of the tile is query token tile * BLOCK_Q + r // HEADS of head first_head + r % HEADS:
    # HEADS = 1 is one query head per program; HEADS > 1 packs a kv head's GROUP query heads.
    tl.static_assert(not (FP8_KV and FRESH), "an fp8 cache's new keys are read from it, as it stores them")
    pid = tl.program_id(0)
    if HEADS > 1:
        first_head = tl.program_id(1) * GROUP
    else:
        first_head = tl.program_id(1)
    kvh = first_head // GROUP
    seq = _find_sequence(cu_seqlens_ptr, pid, num_seqs, BLOCK_Q)
    if SKIP_LEADING:
        if seq < tl.load(skip_ptr):
            return
    q_start = tl.load(cu_seqlens_ptr + seq)
    q_len = tl.load(cu_seqlens_ptr + seq + 1) - q_start
    # A sequence's query tiles run last first: later tiles see more keys, and starting the long
    # programs first leaves short ones for the launch's final wave. Sequences keep their order
    # (a mixed step's decodes, each one long program, come before its prompt chunks).
    tile = (q_start + q_len) // BLOCK_Q + seq - pid
    if tile < 0 or tile * BLOCK_Q >= q_len:  # < 0: padding slots past the last sequence's
        return
    ctx = tl.load(context_lens_ptr + seq)

    rows = tl.arange(0, BLOCK_M)
    offs_q = tile * BLOCK_Q + rows // HEADS
    heads = first_head + rows % HEADS
    row_mask = (offs_q < q_len) & (rows % HEADS < GROUP)
    offs_n = tl.arange(0, BLOCK_N)
    PADDED: tl.constexpr = BLOCK_D != HEAD_DIM
    offs_d = tl.arange(0, BLOCK_D)
    d_mask = offs_d < HEAD_DIM
    tok = (q_start + offs_q).to(tl.int64)
    q = tl.load(q_ptr + tok[:, None] * stride_qt + heads[:, None] * stride_qh + offs_d[None, :],
                mask=_rows_mask(row_mask, d_mask, PADDED), other=0.0)

    m_i = tl.full([BLOCK_M], float("-inf"), tl.float32)
    l_i = tl.zeros([BLOCK_M], tl.float32)
    acc = tl.zeros([BLOCK_M, BLOCK_D], tl.float32)
    table_row = block_tables_ptr + seq.to(tl.int64) * stride_bt
    k_head = k_cache_ptr + kvh * stride_kc_h + offs_d[None, :]
    v_head = v_cache_ptr + kvh * stride_vc_h + offs_d[None, :]
    if FRESH:
        # The cached prefix from the cache, every key visible to every row; the new tokens'
        # keys from the step's own K/V, whose tiles line up with the query tiles.
        prefix = ctx - q_len
        full_end = prefix // BLOCK_N * BLOCK_N
    else:
        positions = ctx - q_len + offs_q  # padding rows (past q_len) see keys < ctx only
        first_pos = ctx - q_len + tile * BLOCK_Q
        end = tl.minimum(first_pos + BLOCK_Q, ctx)  # keys past the tile's last position are unseen
        full_end = (first_pos + 1) // BLOCK_N * BLOCK_N
    # With a sliding WINDOW, row r sees keys above its position - WINDOW, and a row may see no
    # key of a tile, even of the first (EMPTY_ROWS). Key tiles before the one holding the first
    # row's first key are skipped; those up to the last row's first key are masked, in the same
    # loop as the diagonal (a third loop took ~50 more registers: 252 of 255 on sm_90, bf16).
    # No key that no row sees is loaded.
    EMPTY_ROWS: tl.constexpr = WINDOW > 0
    if WINDOW > 0:
        first_pos = ctx - q_len + tile * BLOCK_Q
        window_lo = ctx - q_len + offs_q - WINDOW  # row r sees keys > window_lo[r]
        seen, win_start, open_start = _window_tiles(first_pos, tl.minimum(first_pos + BLOCK_Q, ctx) - 1, full_end,
                                                    WINDOW, BLOCK_N)
        win_tiles = tl.maximum(open_start - win_start, 0) // BLOCK_N
    else:
        open_start = 0
    # Cache key tiles visible to every row (wholly at or below the first row's position): no mask.
    for start in range(open_start, full_end, BLOCK_N):
        m_i, l_i, acc = _key_tile(q, start, offs_n, ctx, table_row, kvh, k_head, v_head, k_desc, v_desc,
                                  stride_kc_block, stride_kc_slot, stride_vc_block, stride_vc_slot,
                                  offs_n, d_mask, offs_n, m_i, l_i, acc, scale_log2e, False, HEAD_DIM, PADDED,
                                  BLOCK_SIZE, TILE_IN_BLOCK, SAME_LAYOUT, CACHE_TMA, DOT_PREC, SOFTCAP, EMPTY_ROWS,
                                  FP8_KV, NATIVE_FP8)
    if FRESH:
        if WINDOW > 0:
            # The window's first tiles, then the prefix's tail where the window reaches it.
            tail = tl.maximum(full_end, win_start)
            masked_tiles = win_tiles + tl.where(seen < prefix, tl.cdiv(prefix - tail, BLOCK_N), 0)
            for i in range(0, masked_tiles):
                start = _tile_start(i, win_tiles, win_start, tail, BLOCK_N)
                keys = start + offs_n
                kv_mask = (keys < prefix) & (keys >= seen)
                m_i, l_i, acc = _key_tile(q, start, offs_n, ctx, table_row, kvh, k_head, v_head, k_desc, v_desc,
                                          stride_kc_block, stride_kc_slot, stride_vc_block, stride_vc_slot,
                                          kv_mask, d_mask, kv_mask[None, :] & (keys[None, :] > window_lo[:, None]),
                                          m_i, l_i, acc, scale_log2e, True, HEAD_DIM, PADDED, BLOCK_SIZE, TILE_IN_BLOCK,
                                          SAME_LAYOUT, CACHE_TMA, DOT_PREC, SOFTCAP, EMPTY_ROWS, FP8_KV, NATIVE_FP8)
        else:
            # At most one tile, but as a loop: straight-line, it took 255 registers and spilled
            # (fp32 on sm_90, kernels/compile_check.py), where the loop takes 76.
            for start in range(full_end, prefix, BLOCK_N):
                kv_mask = start + offs_n < prefix
                m_i, l_i, acc = _key_tile(q, start, offs_n, ctx, table_row, kvh, k_head, v_head, k_desc, v_desc,
                                          stride_kc_block, stride_kc_slot, stride_vc_block, stride_vc_slot,
                                          kv_mask, d_mask, kv_mask[None, :], m_i, l_i, acc, scale_log2e, True,
                                          HEAD_DIM, PADDED, BLOCK_SIZE, TILE_IN_BLOCK, SAME_LAYOUT, CACHE_TMA,
                                          DOT_PREC, SOFTCAP, EMPTY_ROWS, FP8_KV, NATIVE_FP8)
        key_head = key_ptr + kvh * stride_kh + offs_d[None, :]
        value_head = value_ptr + kvh * stride_vh + offs_d[None, :]
        first_q = tile * BLOCK_Q
        # New keys wholly at or below the tile's first query: no mask. Key 0 is visible to
        # every row, so if the prefix and this loop are empty m_i still turns finite below
        # (without a window). The new keys' tiles count from the first new token, so their
        # window is in query indices.
        fresh_full = (first_q + 1) // BLOCK_N * BLOCK_N
        if WINDOW > 0:
            diagonal_end = tl.minimum(first_q + BLOCK_Q, q_len)
            seen_q, fresh_start, fresh_open = _window_tiles(first_q, diagonal_end - 1, fresh_full, WINDOW, BLOCK_N)
        else:
            fresh_open = 0
        for start in range(fresh_open, fresh_full, BLOCK_N):
            m_i, l_i, acc = _fresh_tile(q, q_start + start, offs_n, kvh, key_head, value_head, key_desc, value_desc,
                                        stride_kt, stride_vt, offs_n, d_mask, offs_n, m_i, l_i, acc, scale_log2e,
                                        False, HEAD_DIM, PADDED, FRESH_TMA, DOT_PREC, SOFTCAP, EMPTY_ROWS)
        if WINDOW > 0:
            # The window's first tiles, then the diagonal.
            fresh_win_tiles = tl.maximum(fresh_open - fresh_start, 0) // BLOCK_N
            for i in range(0, fresh_win_tiles + tl.cdiv(diagonal_end - fresh_full, BLOCK_N)):
                start = _tile_start(i, fresh_win_tiles, fresh_start, fresh_full, BLOCK_N)
                keys = start + offs_n
                kv_mask = (keys < q_len) & (keys >= seen_q)
                score_mask = ((keys[None, :] <= offs_q[:, None]) & kv_mask[None, :]
                              & (keys[None, :] > (offs_q - WINDOW)[:, None]))
                m_i, l_i, acc = _fresh_tile(q, q_start + start, offs_n, kvh, key_head, value_head, key_desc,
                                            value_desc, stride_kt, stride_vt, kv_mask, d_mask, score_mask, m_i, l_i,
                                            acc, scale_log2e, True, HEAD_DIM, PADDED, FRESH_TMA, DOT_PREC, SOFTCAP,
                                            EMPTY_ROWS)
        else:
            for start in range(fresh_full, tl.minimum(first_q + BLOCK_Q, q_len), BLOCK_N):
                keys = start + offs_n
                kv_mask = keys < q_len
                score_mask = (keys[None, :] <= offs_q[:, None]) & kv_mask[None, :]
                m_i, l_i, acc = _fresh_tile(q, q_start + start, offs_n, kvh, key_head, value_head, key_desc,
                                            value_desc, stride_kt, stride_vt, kv_mask, d_mask, score_mask, m_i, l_i,
                                            acc, scale_log2e, True, HEAD_DIM, PADDED, FRESH_TMA, DOT_PREC, SOFTCAP,
                                            EMPTY_ROWS)
    else:
        if WINDOW > 0:
            # The window's first tiles, then the diagonal.
            for i in range(0, win_tiles + tl.cdiv(end - full_end, BLOCK_N)):
                start = _tile_start(i, win_tiles, win_start, full_end, BLOCK_N)
                keys = start + offs_n
                kv_mask = (keys < ctx) & (keys >= seen)
                score_mask = ((keys[None, :] <= positions[:, None]) & kv_mask[None, :]
                              & (keys[None, :] > window_lo[:, None]))
                m_i, l_i, acc = _key_tile(q, start, offs_n, ctx, table_row, kvh, k_head, v_head, k_desc, v_desc,
                                          stride_kc_block, stride_kc_slot, stride_vc_block, stride_vc_slot,
                                          kv_mask, d_mask, score_mask, m_i, l_i, acc, scale_log2e, True, HEAD_DIM,
                                          PADDED, BLOCK_SIZE, TILE_IN_BLOCK, SAME_LAYOUT, CACHE_TMA, DOT_PREC, SOFTCAP,
                                          EMPTY_ROWS, FP8_KV, NATIVE_FP8)
        else:
            # The diagonal. Key 0 is always visible, so if the first loop was empty every row
            # sees a valid key in the first tile here and m_i never stays -inf.
            for start in range(full_end, end, BLOCK_N):
                keys = start + offs_n
                kv_mask = keys < ctx
                score_mask = (keys[None, :] <= positions[:, None]) & kv_mask[None, :]
                m_i, l_i, acc = _key_tile(q, start, offs_n, ctx, table_row, kvh, k_head, v_head, k_desc, v_desc,
                                          stride_kc_block, stride_kc_slot, stride_vc_block, stride_vc_slot,
                                          kv_mask, d_mask, score_mask, m_i, l_i, acc, scale_log2e, True, HEAD_DIM,
                                          PADDED, BLOCK_SIZE, TILE_IN_BLOCK, SAME_LAYOUT, CACHE_TMA, DOT_PREC, SOFTCAP,
                                          EMPTY_ROWS, FP8_KV, NATIVE_FP8)

    if WINDOW > 0:  # rows past the sequence may have seen no key: zeros (never stored) over NaN
        l_i = tl.where(l_i > 0, l_i, 1.0)
    if FP8_KV:  # the values' scale, once per output row instead of per value read
        acc = acc * v_scale
    out = acc / l_i[:, None]
    tl.store(out_ptr + tok[:, None] * stride_ot + heads[:, None] * stride_oh + offs_d[None, :],
             out.to(out_ptr.dtype.element_ty), mask=_rows_mask(row_mask, d_mask, PADDED))


def paged_prefill_attention(
    q: torch.Tensor,
    k_cache: torch.Tensor,
    v_cache: torch.Tensor,
    block_tables: torch.Tensor,
    cu_seqlens_q: torch.Tensor,
    context_lens: torch.Tensor,
    scale: float,
    *,
    key: torch.Tensor | None = None,
    value: torch.Tensor | None = None,
    sliding_window: int = 0,
    softcap: float = 0.0,
    k_scale: float = 1.0,
    v_scale: float = 1.0,
    new_kv: str | None = None,
    pack_gqa: bool | None = None,
    cache_tma: bool = False,
    skip_sequences: torch.Tensor | None = None,
    out: torch.Tensor | None = None,
) -> torch.Tensor:
    """Causal attention for the new tokens q `[Tq, Hq, D]` of B sequences (ragged, concatenated).
    Sequences may have no new tokens, and tokens past `cu_seqlens_q[-1]` belong to none (their
    rows are left unwritten): a padded step for a CUDA graph. `sliding_window` and `softcap`
    as in `kernels.reference` (0: none); key tiles before a query tile's window are skipped.

    `key`/`value` `[Tq, Hkv, D]`: the new tokens' K/V as just stored in the cache (views of the
    projection welcome). `new_kv` says where the new keys are read: `cache` through the block
    table like the prefix; `rows` from `key`/`value`, whose rows line up with the query tiles
    whatever the block size; `tma` the same through tensor descriptors (Hopper's TMA engine).
    None: this GPU's tuning (`prefill_new_kv`), else `cache` (the only source measured so
    far). `pack_gqa` forces whether a program takes all query heads of a kv head (None: when
    the group is a power of two, so no row of the tile is wasted). `cache_tma` loads cache
    tiles through tensor descriptors: an experiment for benchmarks/kernel_configs.py, only
    where a key tile lies inside one cache block. Tensor descriptors (`tma`, `cache_tma`) take
    power-of-two head dims only (a box is a power of two wide); a tuning's `tma` is `rows` for
    the others. An fp8 cache's keys and values are read times `k_scale` / `v_scale`, and all
    of them from the cache: its new keys are what it stored, not `key`/`value` (ignored unless
    `new_kv` names them, which is refused, as is `cache_tma`).

    `skip_sequences`: an int32 tensor on the device whose first element is how many leading
    sequences to leave alone (a mixed CUDA graph's decodes, which
    `paged_decode_attention_graphed` attends); their rows of the output are not written.
    `out`: the output to write into (`q`'s shape and dtype) instead of a new tensor."""
    Tq, num_heads, head_dim = q.shape
    num_kv_heads = _check_heads(num_heads, k_cache, v_cache, head_dim, scale)
    window, softcap = _check_window(sliding_window, softcap)
    block_size = k_cache.shape[1]
    num_seqs = cu_seqlens_q.shape[0] - 1
    out = _output_like(q, out)
    if (key is None) != (value is None):
        raise ValueError("paged_prefill_attention: key and value come together")
    if key is not None and not (key.shape == value.shape == (Tq, num_kv_heads, head_dim)):
        raise ValueError(f"paged_prefill_attention: key {tuple(key.shape)} and value {tuple(value.shape)} must be "
                         f"{(Tq, num_kv_heads, head_dim)}, one row per query token")
    fp8 = k_cache.dtype == FP8_KV
    if new_kv is None:
        new_kv = "cache" if key is None or fp8 else _new_kv_default(q.device, head_dim)
    if new_kv not in NEW_KV_SOURCES:
        raise ValueError(f"new_kv must be one of {NEW_KV_SOURCES}, got {new_kv!r}")
    if new_kv != "cache" and key is None:
        raise ValueError(f"new_kv={new_kv!r} reads the new tokens' key and value: pass them")
    if fp8 and (new_kv != "cache" or cache_tma):
        raise ValueError("an fp8 cache's keys are read from it, through pointers, as it stores them: new_kv must "
                         f"be 'cache' and cache_tma False, got new_kv={new_kv!r}, cache_tma={cache_tma}")
    if Tq == 0 or num_seqs == 0:
        return out
    q = _last_dim_contiguous(q)
    block_tables, context_lens = _last_dim_contiguous(block_tables), context_lens.contiguous()
    cu_seqlens_q = cu_seqlens_q.contiguous()
    group = num_heads // num_kv_heads
    block_m, block_n, num_warps, num_stages = _prefill_config(head_dim, q.dtype, q.device, fp8)
    if pack_gqa is None:
        pack_gqa = _pack_gqa_default(group, q.device)
    heads = triton.next_power_of_2(group) if pack_gqa else 1
    block_m = max(block_m, heads)
    block_q = block_m // heads
    grid = (Tq // block_q + num_seqs, num_kv_heads if heads > 1 else num_heads)
    fresh = new_kv != "cache"
    if fresh:
        key, value = _rows_with_contiguous_heads(key), _rows_with_contiguous_heads(value)
    if (cache_tma or new_kv == "tma") and _padded(head_dim):
        raise ValueError(f"cache_tma and new_kv='tma' load whole [tokens, head_dim] boxes through tensor descriptors, "
                         f"whose sides are powers of two; head_dim {head_dim} takes the pointer loads (new_kv='rows')")
    if cache_tma and (block_size % block_n or not (k_cache.is_contiguous() and v_cache.is_contiguous())):
        raise ValueError(f"cache_tma needs contiguous caches whose blocks ({block_size}) hold whole key tiles "
                         f"({block_n})")
    if new_kv == "tma" and not _tma_ready(key, value):
        raise ValueError("new_kv='tma' needs key and value rows 16-byte aligned (base and row stride)")
    k_desc = v_desc = key_desc = value_desc = None
    if cache_tma or new_kv == "tma":
        from triton.tools.tensor_descriptor import TensorDescriptor

        def descriptor(x: torch.Tensor) -> TensorDescriptor:  # [tokens or slots, Hkv * D]
            return TensorDescriptor.from_tensor(x.flatten(0, -3).flatten(-2), [block_n, head_dim])

        if cache_tma:
            k_desc, v_desc = descriptor(k_cache), descriptor(v_cache)
        if new_kv == "tma":
            key_desc, value_desc = descriptor(key), descriptor(value)
    rows = (key, value) if fresh else (q, q)  # unused with the cache
    row_strides = (key.stride(0), key.stride(1), value.stride(0), value.stride(1)) if fresh else (0, 0, 0, 0)
    k_cache, v_cache, scales, fp8_options = _kv_operands(k_cache, v_cache, k_scale, v_scale, q.device)
    _prefill_kernel[grid](
        q, k_cache, v_cache, *rows, block_tables, cu_seqlens_q, context_lens, out,
        k_desc, v_desc, key_desc, value_desc, skip_sequences if skip_sequences is not None else cu_seqlens_q,
        scale * LOG2E * scales[0], num_seqs,
        q.stride(0), q.stride(1), *row_strides,
        k_cache.stride(0), k_cache.stride(1), k_cache.stride(2),
        v_cache.stride(0), v_cache.stride(1), v_cache.stride(2),
        block_tables.stride(0), out.stride(0), out.stride(1), scales[1],
        GROUP=group, HEADS=heads, HEAD_DIM=head_dim, BLOCK_D=_block_d(head_dim), BLOCK_SIZE=block_size,
        BLOCK_Q=block_q, BLOCK_M=block_m, BLOCK_N=block_n, TILE_IN_BLOCK=block_size % block_n == 0,
        SAME_LAYOUT=k_cache.stride() == v_cache.stride(), DOT_PREC=_dot_precision(q.dtype), CACHE_TMA=cache_tma,
        FRESH=fresh, FRESH_TMA=new_kv == "tma", SKIP_LEADING=skip_sequences is not None,
        WINDOW=window, SOFTCAP=softcap, num_warps=num_warps, num_stages=num_stages, **fp8_options, **LAUNCH_OPTIONS,
    )
    return out


def _rows_with_contiguous_heads(x: torch.Tensor) -> torch.Tensor:
    """`[T, H, D]` whose heads sit side by side in each token's row (any row stride): what
    one tensor descriptor of `[T, H * D]` covers, and the projection's K/V views are."""
    return x if x.stride(2) == 1 and x.stride(1) == x.shape[2] else x.contiguous()


def _tma_ready(*xs: torch.Tensor) -> bool:
    """Tensor descriptors need 16-byte aligned bases and row strides."""
    return all(x.data_ptr() % 16 == 0 and x.stride(0) * x.element_size() % 16 == 0 for x in xs)


# ----------------------------------------------------------------------------- configuration


def _block_d(head_dim: int) -> int:
    """The kernels' tile width along the head dim, BLOCK_D: `head_dim` rounded up to a power of two."""
    return triton.next_power_of_2(head_dim)


def _padded(head_dim: int) -> bool:
    """Whether the kernels tile `head_dim` wider (BLOCK_D) and mask the rest."""
    return head_dim != _block_d(head_dim)


def _decode_config(head_dim: int, dtype: torch.dtype, device: torch.device,
                   fp8_kv: bool = False) -> tuple[int, int, int]:
    """(BLOCK_N, num_warps, num_stages). K+V tiles of one stage stay <= 32 KiB (bf16, D=128:
    64 keys), so three stages fit any recent GPU's shared memory; fp32 halves the tile. Sized
    by the tile's width, BLOCK_D (head_dim rounded up to a power of two), which is what the
    shared memory holds: D = 96 takes D = 128's tile. `fp8_kv`: see `_fp8_kv_stages`."""
    if device.type != "cuda":
        return MIN_DOT, 4, 1  # the interpreter: smallest tile, so tests exercise many tiles
    elt = dtype.itemsize
    block_n = max(MIN_DOT, min(64, 16384 // (_block_d(head_dim) * elt)))
    # fp32 at a padded head dim: the d masks on top of the FMA dots spilled 4-32 bytes with 4
    # warps (sm_89 with Triton 3.9, sm_90 with 3.4: kernels/compile_check.py); over 8 warps the
    # same tile spills nothing.
    num_warps = 8 if elt > 2 and _padded(head_dim) else 4
    return block_n, num_warps, _fp8_kv_stages(3 if elt <= 2 else 2, dtype, fp8_kv)


def _prefill_config(head_dim: int, dtype: torch.dtype, device: torch.device,
                    fp8_kv: bool = False) -> tuple[int, int, int, int]:
    """(BLOCK_M, BLOCK_N, num_warps, num_stages). 16-bit types, D <= 128: on Hopper 64 queries
    x 64 keys, 4 warps (two stages of K+V plus the Q tile: 80 KiB of shared memory at D=128);
    on an H200 (benchmarks/kernel_configs.py, bf16, D=128) it was the fastest of 11 tiles on
    4x1024 and 1x512 tokens and within 7% of the best (128 x 128, 8 warps, which needs
    160 KiB) on 4x4096; 8 warps on the same tile took 1.1-2x as long. Before Hopper (mma.sync,
    no wgmma) that tile needs 255 registers a thread and spills (kernels/compile_check.py
    --resources, sm_80 and sm_89), where 128 x 32 with 8 warps takes 194 and spills nothing
    (48 KiB; the tile FlashAttention-2 uses on sm8x). 64 x 32, 8 warps at D = 256 (96 KiB;
    not swept). fp32 runs its IEEE dots on FMA units, where 64-row tiles spill: 32 x 32,
    32 x 16 at D = 128, 16 x 16 at D = 256; 8 warps. D is the tile's width, BLOCK_D (head_dim
    rounded up to a power of two: registers and shared memory are the tile's), so a padded
    head dim takes the next power of two's tile, and a tuning's tile (measured at D = 128)
    serves every head dim up to 128. `fp8_kv`: see `_fp8_kv_stages`."""
    if device.type != "cuda":
        return MIN_DOT, MIN_DOT, 4, 1
    block_d = _block_d(head_dim)
    if dtype == torch.float32:
        return 32 if block_d <= 128 else 16, 32 if block_d <= 64 else 16, 8, _fp8_kv_stages(2, dtype, fp8_kv)
    if block_d <= 128:
        tuned = _device_tuning(device).prefill_tile  # what the sweep measured fastest on this GPU
        if tuned is not None:
            return tuned
        return (64, 64, 4, 2) if _device_capability(device)[0] >= 9 else (128, 32, 8, 2)
    return 64, 32, 8, 2


def _fp8_kv_stages(stages: int, dtype: torch.dtype, fp8_kv: bool) -> int:
    """The pipeline's stages over an fp8 cache: fp32 queries take one. Staged through shared
    memory and converted in registers for the FMA dots, fp32's K/V tiles took 255 registers
    and spilled 300-900 bytes (sm_80 to sm_90, kernels/compile_check.py); loaded straight into
    registers they spill nothing."""
    return 1 if fp8_kv and dtype == torch.float32 else stages


def _new_kv_default(device: torch.device, head_dim: int) -> str:
    """Where prefill reads the new tokens' K/V unless told: this GPU's tuning, else the cache.
    A tuning's `tma` is `rows` (the same source, through pointers) for a padded head dim: a
    tensor descriptor's box is a power of two on each side, and [BLOCK_N, BLOCK_D] boxes would
    read the next head's dims (a masked pointer load reads only the head's)."""
    tuned = _device_tuning(device).prefill_new_kv if device.type == "cuda" else None
    if tuned == "tma" and _padded(head_dim):
        return "rows"
    return tuned or "cache"


def _pack_gqa_default(group: int, device: torch.device) -> bool:
    """Packed when the group is a power of two (no row of the tile wasted), unless this GPU's
    tuning measured one head per program faster."""
    if group & (group - 1):
        return False
    tuned = _device_tuning(device).pack_gqa if device.type == "cuda" else None
    return True if tuned is None else tuned


def _device_index(device: torch.device) -> int:
    return device.index if device.index is not None else torch.cuda.current_device()


def _device_capability(device: torch.device) -> tuple[int, int]:
    return _capability(_device_index(device))


def _device_tuning(device: torch.device) -> KernelTuning:
    return _tuning(_device_index(device))


@functools.lru_cache(maxsize=None)
def _tuning(index: int) -> KernelTuning:
    """kernels/tuning.py's file for this GPU, read once per process."""
    return load_tuning(torch.cuda.get_device_name(index))


@functools.lru_cache(maxsize=None)
def _capability(index: int) -> tuple[int, int]:
    return torch.cuda.get_device_capability(index)


@functools.lru_cache(maxsize=None)
def _sm_count(index: int) -> int:
    return torch.cuda.get_device_properties(index).multi_processor_count


MIN_SPLIT_KEYS = 64


def _num_splits(batch: int, num_kv_heads: int, max_context: int, device: torch.device,
                min_keys: int | None = None) -> int:
    """Split-K factor from shapes alone (no host sync): enough (sequence, kv head, split)
    programs for ~2 waves of the GPU's SMs, but no split shorter than MIN_SPLIT_KEYS keys (one
    bf16 tile at D = 128), at most 64. On the H200 the decode shapes whose splits were capped
    by a 256-key minimum (batch 1-4 at context 512, batch 1 at 2048: 16-64 programs on 132 SMs,
    each streaming 64-128 KiB) ran at 0.71-0.85x SDPA, the uncapped ones at 0.92-1.03x; since
    the last split merges (no second launch), more and shorter splits cost little. A GPU's
    tuning, or `min_keys` (the sweep's what-if), replaces the minimum."""
    if device.type != "cuda":
        return 1
    programs = batch * num_kv_heads
    sms = _sm_count(_device_index(device))
    if programs >= sms:
        return 1
    min_keys = min_keys or _device_tuning(device).min_split_keys or MIN_SPLIT_KEYS
    return max(1, min(math.ceil(2 * sms / programs), max_context // min_keys, 64))


def _dot_precision(dtype: torch.dtype) -> str:
    return "ieee" if dtype == torch.float32 else "tf32"  # tf32 only matters for fp32 inputs


# ----------------------------------------------------------------------------- checks


def _check_cache(k_cache: torch.Tensor, v_cache: torch.Tensor, num_kv_heads: int, head_dim: int) -> None:
    if (k_cache.dtype == FP8_KV) != (v_cache.dtype == FP8_KV):
        raise ValueError(f"k_cache ({k_cache.dtype}) and v_cache ({v_cache.dtype}) must both be fp8 ({FP8_KV}) "
                         "or neither")
    for cache in (k_cache, v_cache):
        if cache.dtype.is_floating_point and cache.dtype.itemsize == 1 and cache.dtype != FP8_KV:
            raise ValueError(f"an fp8 KV cache holds {FP8_KV} (e4m3), got {cache.dtype}")
    if k_cache.dim() != 4 or k_cache.shape != v_cache.shape:
        raise ValueError(f"k_cache {tuple(k_cache.shape)} and v_cache {tuple(v_cache.shape)} must both be "
                         "[num_blocks, block_size, num_kv_heads, head_dim]")
    if tuple(k_cache.shape[2:]) != (num_kv_heads, head_dim):
        raise ValueError(f"cache heads/dim {tuple(k_cache.shape[2:])} != tokens' {(num_kv_heads, head_dim)}")
    if k_cache.stride(-1) != 1 or v_cache.stride(-1) != 1:
        raise ValueError("the caches' head_dim must be contiguous")
    if not triton_takes_head_dim(head_dim):
        raise ValueError(f"head_dim must be a multiple of {MIN_DOT} from {MIN_DOT} to {TRITON_MAX_PADDED_HEAD_DIM} "
                         f"or a larger power of two, got {head_dim}")


def _kv_operands(k_cache: torch.Tensor, v_cache: torch.Tensor, k_scale: float, v_scale: float,
                 device: torch.device) -> tuple[torch.Tensor, torch.Tensor, tuple[float, float], dict[str, bool]]:
    """What a kernel takes for the caches: (k_cache, v_cache, (k_scale, v_scale), the
    constexprs FP8_KV and NATIVE_FP8). An fp8 cache goes as its bytes (uint8) where Triton
    does not convert e4m3 (`_native_fp8_kv`); other caches take no scales (1.0 goes, unused)."""
    if k_cache.dtype != FP8_KV:
        return k_cache, v_cache, (1.0, 1.0), dict(FP8_KV=False, NATIVE_FP8=False)
    scales = []
    for name, value in (("k_scale", k_scale), ("v_scale", v_scale)):
        value = float(value)
        if not (value > 0 and math.isfinite(value)):  # 0 or inf would store NaN, a negative flip signs
            raise ValueError(f"{name} must be a finite value > 0, got {value}")
        scales.append(value)
    native = _native_fp8_kv(device)
    if not native:
        k_cache, v_cache = k_cache.view(torch.uint8), v_cache.view(torch.uint8)
    return k_cache, v_cache, (scales[0], scales[1]), dict(FP8_KV=True, NATIVE_FP8=native)


def _native_fp8_kv(device: torch.device) -> bool:
    """Whether an fp8 cache's kernels convert e4m3 with Triton's own casts: on CUDA from sm_89
    (Ada, Hopper). An A100 has none (Triton refuses the type), and the interpreter's cast to
    e4m3 rounds ties up and can drop a mantissa carry, so both move the bits themselves."""
    return device.type == "cuda" and _device_capability(device) >= (8, 9)


def _check_heads(num_heads: int, k_cache: torch.Tensor, v_cache: torch.Tensor, head_dim: int,
                 scale: float) -> int:
    if not scale > 0:  # masked scores are -inf: times 0 they are NaN, times a negative +inf
        raise ValueError(f"scale must be > 0, got {scale}")
    num_kv_heads = k_cache.shape[2]
    _check_cache(k_cache, v_cache, num_kv_heads, head_dim)
    if num_heads % num_kv_heads:
        raise ValueError(f"{num_heads} query heads are not a multiple of {num_kv_heads} kv heads")
    return num_kv_heads


def _check_window(sliding_window: int, softcap: float) -> tuple[int, float]:
    """The window and cap as the kernels' constexprs: a plain int and float (0 or None: off), so
    a model's layers share a few compiled variants and the kernels without them are unchanged."""
    window = operator.index(sliding_window or 0)
    if window < 0:
        raise ValueError(f"sliding_window must be >= 0 (0: none), got {sliding_window}")
    cap = float(softcap or 0.0)
    if not (cap >= 0 and math.isfinite(cap)):
        raise ValueError(f"softcap must be a finite value >= 0 (0: none), got {softcap}")
    return window, cap


def _last_dim_contiguous(x: torch.Tensor) -> torch.Tensor:
    return x if x.stride(-1) == 1 else x.contiguous()

