"""The CPU serving kernels: the attention contract of kernels.reference, plus the fused layer
ops the model takes through `LlamaForCausalLM.use_norm_rope_kernels` (rms_norm, apply_rotary,
silu_and_mul, as kernels.triton_norm_rope has them on CUDA), with the hot parts in C.

- Decode attention is bandwidth-bound: the reference gathers every sequence's K/V into a dense
  copy and SDPA reads that copy again. The C kernel (csrc/paged_attention.c) reads each K/V
  row once, in place in the paged cache.
- An fp8 KV cache (e4m3, vLLM's kv_cache_dtype="fp8"; kernels.reference's contract) holds a
  quarter of the fp32 cache's bytes. The same C decode kernel reads its bytes in place, each
  kv head's rows of a block decoded exactly and times k_scale / v_scale once into an L1
  scratch block that its query heads share: bit for bit the fp32 kernel over the dequantized
  cache. Past the caches it ran 1.5-2x the fp32 kernel's speed on one thread of a 2-core
  machine (benchmarks/kernels.py --impl cpu --kv-fp8; the decode, not the memory, is then its
  limit), about even where the fp32 cache fits in L2; 1.2-2.3x at every size on two threads
  of a 2-core AVX2 EPYC (docs/measurements/cpu-2026-12-08). Prefill gathers the blocks it needs and
  dequantizes them (compute-bound: the copy hardly shows); the step's own key/value are never
  read in place of the cache, whose keys are what it stores, quantized. `store_kv` quantizes
  and scatters in C in one pass (csrc/store_kv.c): 2.5-4.5x the reference's divide, clamp,
  convert and copy (each a call and a temporary), about the fp32 store's time; other caches
  take the reference's store.
- Prefill attention is compute-bound and torch's SDPA is good at it: one unpadded call per
  sequence (a step holds a few prefill chunks), `is_causal` when there is no cached prefix.
  Where a sliding window cuts keys, tiles of queries each attend to their own band of keys
  (only those are gathered); Gemma 2's softcapped scores, which SDPA can't take, go through
  kernels.reference's fp32 products, tile by tile.
- RMSNorm + residual, rotary and SiLU * up are several torch ops each, every one a pass over
  memory; in C (csrc/layer_ops.c) each is one pass.
- The projections: the BLAS repacks the weight on every call, as much memory traffic as the
  product itself when a decode step has few rows. `pack_linear_weight` packs each weight once
  at load (the packed copy replaces it), and `linear` runs the product over the packed panels
  in C (csrc/linear.c): on this project's AVX2 machine it beat torch's BLAS from 1 row (2-4x)
  to 2048 (1.1-1.2x); see benchmarks/linear.py. Its tile is 8 floats wide: where the CPU has
  AVX-512, torch's BLAS runs 16 and wins at prefill's row counts (1.7-2x from 256 rows on a
  2-core Xeon), so there a product of `BLAS_MIN_ROWS` rows or more runs the BLAS over the
  weight unpacked for the call (3% of the product's time at 2048 rows).
- fp8 projections (e4m3 weights, an fp32 scale per output row and group of input columns):
  kernels.reference dequantizes the whole weight every call (35-100x this product at a row).
  `pack_fp8_linear_weight` packs the bytes as `pack_linear_weight` packs floats, and
  `fp8_linear` (csrc/linear_fp8.c) dequantizes as it reads, to the reference's fp32 weight
  exactly, reading one byte per weight. Against the fp32 product (benchmarks/linear.py --fp8,
  2 threads): 2.5x faster where the weight comes from memory (2048 -> 8192 at 1-4 rows); where
  it sits in cache 0.9x at one row, 0.65x at 4 (the decode costs more than 4 rows' FMAs); from
  7 rows a block of the panel is dequantized once for every tile of rows: 0.8x at 16 rows,
  0.9-1.05x at 64-256. From `FP8_BLAS_MIN_ROWS` rows, torch's BLAS over the weight
  dequantized for the call (in C, into a workspace kept between calls).

The C code serves fp32 tensors on the CPU (attention: head dims that are multiples of 8 up to
256, over fp32 or fp8 caches; fp8 weights with fp32 activations); anything else goes to the
torch reference. Importing this module builds the library, or raises NativeBuildError where it
can't be built.
"""

from __future__ import annotations

import ctypes
from collections.abc import Callable

import torch
import torch.nn.functional as F

from kernels import native, reference

__all__ = [
    "apply_rotary", "embedding_from_packed", "fp8_linear", "linear", "pack_fp8_linear_weight", "pack_linear_weight",
    "paged_decode_attention", "paged_prefill_attention", "rms_norm", "silu_and_mul", "store_kv",
    "unpack_linear_weight",
]

_lib = native.load()
_ptr, _i64, _f32 = ctypes.c_void_p, ctypes.c_int64, ctypes.c_float
_lib.stoke_paged_decode_attention_f32.restype = ctypes.c_int
_lib.stoke_paged_decode_attention_f32.argtypes = [_ptr] * 6 + [_i64] * 8 + [_f32, _i64, _f32, _i64]
_lib.stoke_paged_decode_attention_fp8.restype = ctypes.c_int
_lib.stoke_paged_decode_attention_fp8.argtypes = [_ptr] * 6 + [_i64] * 8 + [_f32, _i64, _f32, _f32, _f32, _i64]
_lib.stoke_store_kv_fp8.restype = ctypes.c_int
_lib.stoke_store_kv_fp8.argtypes = [_ptr] * 5 + [_i64] * 5 + [_f32, _f32, _i64]
_lib.stoke_rms_norm_f32.restype = None
_lib.stoke_rms_norm_f32.argtypes = [_ptr] * 5 + [_i64] * 4 + [_f32, _i64]
_lib.stoke_rotary_f32.restype = None
_lib.stoke_rotary_f32.argtypes = [_ptr] * 4 + [_i64] * 6
_lib.stoke_silu_and_mul_f32.restype = None
_lib.stoke_silu_and_mul_f32.argtypes = [_ptr] * 2 + [_i64] * 3
_lib.stoke_pack_linear_weight_f32.restype = None
_lib.stoke_pack_linear_weight_f32.argtypes = [_ptr] * 2 + [_i64] * 3
_lib.stoke_linear_f32.restype = None
_lib.stoke_linear_f32.argtypes = [_ptr] * 4 + [_i64] * 6
_lib.stoke_pack_linear_weight_u8.restype = None
_lib.stoke_pack_linear_weight_u8.argtypes = [_ptr] * 2 + [_i64] * 3
_lib.stoke_linear_fp8.restype = None
_lib.stoke_linear_fp8.argtypes = [_ptr] * 5 + [_i64] * 7
_lib.stoke_dequantize_fp8.restype = None
_lib.stoke_dequantize_fp8.argtypes = [_ptr] * 3 + [_i64] * 4


def _fp32_cpu(*tensors: torch.Tensor) -> bool:
    return all(t.device.type == "cpu" and t.dtype == torch.float32 for t in tensors)


def _fp8_cpu(*tensors: torch.Tensor) -> bool:
    return all(t.device.type == "cpu" and t.dtype == reference.FP8_KV for t in tensors)


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
    """kernels.reference.store_kv: key/value `[T, Hkv, D]` into the caches at `slot_mapping`
    `[T]` (-1: skip). fp32 K/V into fp8 caches in C, quantized (key / k_scale, value / v_scale,
    byte for byte the reference's) and scattered in one pass; other caches as the reference
    stores them. A slot past the cache raises IndexError, with nothing stored."""
    tokens = key.shape[0]
    if not (_fp8_cpu(k_cache, v_cache) and _fp32_cpu(key, value) and key.dim() == 3 and key.shape == value.shape
            and k_cache.dim() == 4 and k_cache.shape == v_cache.shape and key.shape[1:] == k_cache.shape[2:]
            and key[:1].is_contiguous() and value[:1].is_contiguous() and k_cache.is_contiguous()
            and v_cache.is_contiguous() and slot_mapping.device.type == "cpu" and slot_mapping.shape == (tokens,)):
        reference.store_kv(key, value, k_cache, v_cache, slot_mapping, k_scale=k_scale, v_scale=v_scale)
        return
    if tokens == 0:
        return
    slots = slot_mapping.to(torch.int64).contiguous()
    width = key.shape[1] * key.shape[2]
    if _lib.stoke_store_kv_fp8(key.data_ptr(), value.data_ptr(), k_cache.data_ptr(), v_cache.data_ptr(),
                               slots.data_ptr(), tokens, width, key.stride(0), value.stride(0),
                               k_cache.shape[0] * k_cache.shape[1], k_scale, v_scale, torch.get_num_threads()):
        raise IndexError(f"store_kv: a slot past the cache's {k_cache.shape[0] * k_cache.shape[1]} in "
                         f"{slot_mapping.tolist()}; nothing stored")


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
) -> torch.Tensor:
    """One query per sequence, q `[B, Hq, D]`, over its `context_lens[b]` cached keys: the last
    `sliding_window` of them where that is not 0 (the blocks before are not read). `softcap`
    (not 0) caps the scaled scores s by softcap · tanh(s / softcap). An fp8 cache's bytes are
    read in place, each key times `k_scale` and value times `v_scale` (rounded once to fp32)."""
    batch, num_heads, head_dim = q.shape
    fp8 = _fp8_cpu(k_cache, v_cache)
    # What C trusts, checked in O(1) (shapes: the torch reference raises or broadcasts instead
    # of reading out of bounds); the block ids and lengths are the engine's to keep in range.
    if not (_fp32_cpu(q) and (fp8 or _fp32_cpu(k_cache, v_cache)) and head_dim % 8 == 0 and head_dim <= 256
            and k_cache.dim() == 4 and k_cache.shape == v_cache.shape and k_cache.shape[3] == head_dim
            and num_heads % k_cache.shape[2] == 0 and block_tables.dim() == 2
            and block_tables.shape[0] == context_lens.shape[0] == batch):
        return reference.paged_decode_attention(q, k_cache, v_cache, block_tables, context_lens, scale,
                                                sliding_window=sliding_window, softcap=softcap,
                                                k_scale=k_scale, v_scale=v_scale)
    if q.stride(2) != 1:
        q = q.contiguous()
    k_cache, v_cache = k_cache.contiguous(), v_cache.contiguous()  # no-ops for the engine's pools
    tables = block_tables.to(torch.int32).contiguous()
    lens = context_lens.to(torch.int32).contiguous()
    out = torch.empty(batch, num_heads, head_dim, dtype=q.dtype)
    if batch == 0:
        return out
    args = (q.data_ptr(), k_cache.data_ptr(), v_cache.data_ptr(), tables.data_ptr(), lens.data_ptr(),
            out.data_ptr(), batch, num_heads, k_cache.shape[2], head_dim, k_cache.shape[1], tables.stride(0),
            q.stride(0), q.stride(1), scale, sliding_window, softcap)
    if fp8:
        failed = _lib.stoke_paged_decode_attention_fp8(*args, k_scale, v_scale, torch.get_num_threads())
    else:
        failed = _lib.stoke_paged_decode_attention_f32(*args, torch.get_num_threads())
    if failed:
        raise MemoryError("paged decode attention could not allocate its scratch memory")
    return out


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
) -> torch.Tensor:
    """Causal attention for the new tokens q `[Tq, Hq, D]` of B sequences, one SDPA call each:
    no work on padding rows, and a chunk without a cached prefix (the common case) runs
    `is_causal`, which skips the masked tiles, on the step's own `key`/`value` when given
    (no gather from the cache). A query at position p sees keys p - sliding_window < k <= p
    where `sliding_window` is not 0; `softcap` (not 0) caps the scaled scores s by
    softcap · tanh(s / softcap). A sequence whose window cuts keys, or any with a softcap,
    takes `_prefill_sequence_banded`. An fp8 cache's blocks are gathered and dequantized
    (times `k_scale` / `v_scale`); `key`/`value` are not read then: the keys are what the cache
    stores, quantized."""
    block_size = k_cache.shape[1]
    out = torch.empty_like(q)
    kv_scales = None
    if k_cache.dtype == reference.FP8_KV:
        key = value = None
        kv_scales = (k_scale, v_scale)
    bounds = cu_seqlens_q.tolist()
    for b, total in enumerate(context_lens.tolist()):
        start, end = bounds[b], bounds[b + 1]
        new = end - start
        if softcap or (sliding_window and total > sliding_window):
            if new:
                out[start:end] = _prefill_sequence_banded(
                    q[start:end], k_cache, v_cache, block_tables[b], total,
                    None if key is None else key[start:end], None if value is None else value[start:end],
                    scale, sliding_window, softcap, kv_scales)
            continue
        # 4-D [1, H, L, D]: torch's CPU flash kernel takes only batched inputs; 3-D ones fall to
        # the math path, 3-5x slower.
        qb = q[start:end].transpose(0, 1)[None]  # [1, Hq, new, D]
        if new == total and key is not None:
            k, v = key[start:end].transpose(0, 1)[None], value[start:end].transpose(0, 1)[None]
        else:
            blocks = block_tables[b, : -(-total // block_size)].long()
            k = k_cache.index_select(0, blocks).flatten(0, 1)[:total]
            v = v_cache.index_select(0, blocks).flatten(0, 1)[:total]
            if kv_scales is not None:
                k, v = (reference.dequantize_kv(x, s, q.dtype) for x, s in zip((k, v), kv_scales))
            k, v = k.transpose(0, 1)[None], v.transpose(0, 1)[None]  # [1, Hkv, L, D]
        if new == total:
            o = F.scaled_dot_product_attention(qb, k, v, is_causal=True, scale=scale, enable_gqa=True)
        else:  # new tokens after a cached prefix: query j sits at position total - new + j
            positions = torch.arange(total - new, total)[:, None]
            bias = torch.zeros(new, total, dtype=q.dtype).masked_fill_(torch.arange(total) > positions, float("-inf"))
            o = F.scaled_dot_product_attention(qb, k, v, attn_mask=bias, scale=scale, enable_gqa=True)
        out[start:end] = o[0].transpose(0, 1)
    return out


# Queries per attention call on the banded path: with a window W, a tile of them sees at most
# tile + W - 1 keys (not all the chunk's), and softcapped scores, which are materialised in
# fp32, stay tile x keys per head.
_BAND_TILE = 256


def _prefill_sequence_banded(
    q: torch.Tensor, k_cache: torch.Tensor, v_cache: torch.Tensor, table: torch.Tensor, total: int,
    key: torch.Tensor | None, value: torch.Tensor | None, scale: float, window: int, softcap: float,
    kv_scales: tuple[float, float] | None = None,
) -> torch.Tensor:
    """One sequence's new queries q `[new, Hq, D]` (positions total - new ..) over the keys
    each sees, p - window < k <= p (window 0: all of 0..p), in tiles of queries: only the keys
    from the first query's window on are gathered, each tile attends to its own key band, with
    `is_causal` where that band is exactly causal, else an additive mask; softcapped scores
    through kernels.reference's fp32 products. `key`/`value` are the new tokens' K/V, read in
    place of the cache where they hold every key the sequence needs. `kv_scales`: the caches
    are fp8, the keys gathered dequantized by (k_scale, v_scale). → `[new, Hq, D]`."""
    new = q.shape[0]
    first = total - new  # the first query's position
    lo = max(0, first - window + 1) if window else 0  # the first key any query sees
    if key is not None and lo >= first:
        k, v = key[lo - first :], value[lo - first :]
    else:
        block_size = k_cache.shape[1]
        skip = lo // block_size * block_size
        blocks = table[lo // block_size : -(-total // block_size)].long()
        k = k_cache.index_select(0, blocks).flatten(0, 1)[lo - skip : total - skip]
        v = v_cache.index_select(0, blocks).flatten(0, 1)[lo - skip : total - skip]
        if kv_scales is not None:
            k, v = (reference.dequantize_kv(x, s, q.dtype) for x, s in zip((k, v), kv_scales))
    k, v = k.transpose(0, 1)[None], v.transpose(0, 1)[None]  # [1, Hkv, total - lo, D]
    out = torch.empty_like(q)
    tile = _BAND_TILE if softcap else max(window, _BAND_TILE)
    biases: dict[tuple[int, int, int], torch.Tensor] = {}  # the interior tiles share one band
    for a in range(0, new, tile):
        b = min(a + tile, new)
        p0, p1 = first + a, first + b - 1  # the tile's first and last query positions
        klo = max(lo, p0 - window + 1) if window else 0  # the tile's keys: klo..p1
        qt = q[a:b].transpose(0, 1)[None]
        kt, vt = k[:, :, klo - lo : p1 + 1 - lo], v[:, :, klo - lo : p1 + 1 - lo]
        key_pos = torch.arange(klo, p1 + 1)
        positions = torch.arange(p0, p1 + 1)[:, None]
        if softcap:
            mask = key_pos <= positions
            if window:
                mask &= key_pos > positions - window
            o = reference._attend_softcapped(qt, kt, vt, mask[None, None], scale, softcap)
        # Without a softcap only a window that cuts sends a sequence here: window > 0 below.
        elif b - a == 1:  # one query sees all of its band
            o = F.scaled_dot_product_attention(qt, kt, vt, scale=scale, enable_gqa=True)
        elif klo == p0 and p1 - window < klo:  # a square band that the window does not cut
            o = F.scaled_dot_product_attention(qt, kt, vt, is_causal=True, scale=scale, enable_gqa=True)
        else:
            bias = biases.get((b - a, p1 + 1 - klo, p0 - klo))
            if bias is None:
                hidden = (key_pos > positions) | (key_pos <= positions - window)
                bias = biases[b - a, p1 + 1 - klo, p0 - klo] = torch.zeros(
                    b - a, p1 + 1 - klo, dtype=q.dtype).masked_fill_(hidden, float("-inf"))
            o = F.scaled_dot_product_attention(qt, kt, vt, attn_mask=bias, scale=scale, enable_gqa=True)
        out[a:b] = o[0].transpose(0, 1)
    return out


def _rows(x: torch.Tensor) -> bool:
    """A 2-D fp32 CPU tensor whose rows are contiguous (any row stride)."""
    return x.dim() == 2 and x.stride(1) == 1 and _fp32_cpu(x)


def rms_norm(
    x: torch.Tensor, weight: torch.Tensor, eps: float, residual: torch.Tensor | None = None
) -> torch.Tensor | tuple[torch.Tensor, torch.Tensor]:
    """kernels.reference.rms_norm in one pass per row: `rmsnorm(x) * weight`, or with
    `residual`, `(rmsnorm(x + residual) * weight, x + residual)`."""
    if not (_rows(x) and weight.is_contiguous() and _fp32_cpu(weight) and weight.numel() == x.shape[1]
            and (residual is None or (_rows(residual) and residual.shape == x.shape))):
        return reference.rms_norm(x, weight, eps, residual)
    rows, hidden = x.shape
    out = torch.empty(rows, hidden, dtype=x.dtype)
    res_out = None if residual is None else torch.empty(rows, hidden, dtype=x.dtype)
    _lib.stoke_rms_norm_f32(
        x.data_ptr(), None if residual is None else residual.data_ptr(), weight.data_ptr(), out.data_ptr(),
        None if res_out is None else res_out.data_ptr(), rows, hidden, x.stride(0),
        0 if residual is None else residual.stride(0), eps, torch.get_num_threads(),
    )
    return out if res_out is None else (out, res_out)


def apply_rotary(
    q: torch.Tensor, k: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor, positions: torch.Tensor
) -> tuple[torch.Tensor, torch.Tensor]:
    """kernels.reference.apply_rotary in place on q `[T, Hq, D]` and k `[T, Hkv, D]` (strided
    views welcome: only the last dim must be contiguous); cos/sin `[max_positions, R/2]`
    rotate each head's leading R <= D dims."""
    half = cos.shape[-1]
    if not (_fp32_cpu(q, k, cos, sin) and q.stride(2) == 1 and k.stride(2) == 1
            and cos.is_contiguous() and sin.is_contiguous() and q.shape[-1] == k.shape[-1] >= 2 * half
            and sin.shape[-1] == half and positions.numel() == q.shape[0] == k.shape[0]):
        return reference.apply_rotary(q, k, cos, sin, positions)
    pos = positions.to(torch.int64).contiguous()
    for x in (q, k):
        tokens, heads, _ = x.shape
        _lib.stoke_rotary_f32(x.data_ptr(), cos.data_ptr(), sin.data_ptr(), pos.data_ptr(), tokens, heads,
                              2 * half, x.stride(0), x.stride(1), torch.get_num_threads())
    return q, k


def silu_and_mul(x: torch.Tensor) -> torch.Tensor:
    """kernels.reference.silu_and_mul in one pass: x `[T, 2I]` (gate, up) → silu(gate) * up."""
    if not (x.is_contiguous() and x.dim() == 2 and x.shape[1] % 2 == 0 and _fp32_cpu(x)):
        return reference.silu_and_mul(x)
    rows, width = x.shape
    out = torch.empty(rows, width // 2, dtype=x.dtype)
    _lib.stoke_silu_and_mul_f32(x.data_ptr(), out.data_ptr(), rows, width // 2, torch.get_num_threads())
    return out


def pack_linear_weight(weight: torch.Tensor) -> torch.Tensor | None:
    """A Linear weight `[N, K]` in the C product's layout (panels of 16 output columns, each
    `[K][16]` contiguous, N padded to 16), or None where `linear` can't serve it (not a 2-D
    fp32 CPU tensor)."""
    if not (weight.dim() == 2 and _fp32_cpu(weight)):
        return None
    return _pack(weight, _lib.stoke_pack_linear_weight_f32)


def _pack(weight: torch.Tensor, pack: Callable[..., None]) -> torch.Tensor:
    """`weight [N, K]` in panels of 16 output columns, by the C packer for its element size."""
    weight = weight.detach().contiguous()
    n, k = weight.shape
    packed = torch.empty(-(-n // 16) * k * 16, dtype=weight.dtype)
    pack(weight.data_ptr(), packed.data_ptr(), n, k, torch.get_num_threads())
    return packed


def unpack_linear_weight(packed: torch.Tensor, n: int, k: int) -> torch.Tensor:
    """The `[n, k]` weight that pack_linear_weight or pack_fp8_linear_weight packed (an fp8
    one moved as its bytes)."""
    raw = packed.view(torch.uint8) if packed.element_size() == 1 else packed
    return raw.view(-1, k, 16).transpose(1, 2).reshape(-1, k)[:n].contiguous().view(packed.dtype)


def embedding_from_packed(packed: torch.Tensor, ids: torch.Tensor, k: int) -> torch.Tensor:
    """Rows `ids` `[T]` of the `[n, k]` weight that pack_linear_weight packed, `[T, k]`: a tied
    LM head's packed weight serves the embedding lookups too (row r is column r % 16 of panel
    r // 16)."""
    return packed.view(-1, k, 16)[ids // 16, :, ids % 16]


# Rows from which torch's BLAS takes a product (see the module docstring); None: never.
BLAS_MIN_ROWS: int | None = 256 if torch.backends.cpu.get_cpu_capability().startswith("AVX512") else None


def linear(x: torch.Tensor, packed: torch.Tensor, bias: torch.Tensor | None, n: int) -> torch.Tensor:
    """F.linear(x, weight, bias) for x `[M, K]`, with the `[n, K]` weight given packed
    (pack_linear_weight): in C for fp32 rows (fewer than BLAS_MIN_ROWS), else torch over the
    unpacked weight."""
    k = x.shape[-1]
    in_c = (_rows(x) and k > 0 and _fp32_cpu(packed) and packed.is_contiguous()
            and packed.numel() == -(-n // 16) * 16 * k and (bias is None or (_fp32_cpu(bias) and bias.numel() == n))
            and (BLAS_MIN_ROWS is None or x.shape[0] < BLAS_MIN_ROWS))
    if not in_c:
        weight = unpack_linear_weight(packed, n, k).to(x.dtype) if k else x.new_zeros(n, 0)
        return F.linear(x, weight, None if bias is None else bias.to(x.dtype))
    m = x.shape[0]
    out = torch.empty(m, n, dtype=x.dtype)
    if m == 0:
        return out
    bias = None if bias is None else bias.contiguous()
    _lib.stoke_linear_f32(x.data_ptr(), packed.data_ptr(), None if bias is None else bias.data_ptr(),
                          out.data_ptr(), m, n, k, x.stride(0), n, torch.get_num_threads())
    return out


def pack_fp8_linear_weight(weight: torch.Tensor) -> torch.Tensor | None:
    """An fp8 (e4m3) Linear weight `[N, K]` in the C product's layout, one byte a weight
    (panels of 16 output columns, each `[K][16]` contiguous, N padded to 16 with zeros), or
    None where `fp8_linear` can't serve it (not a 2-D float8_e4m3fn CPU tensor)."""
    if not (weight.dim() == 2 and weight.dtype == torch.float8_e4m3fn and weight.device.type == "cpu"):
        return None
    return _pack(weight, _lib.stoke_pack_linear_weight_u8)


# The fp32 weight that fp8_linear dequantizes for the BLAS, reused across calls (one projection
# at a time): a fresh one costs more in page faults than the dequantizing (64 MiB: 45 ms
# against 16 ms on one core here), as kernels.reference's gather buffers do.
_fp8_workspace = torch.empty(0)


def _dequantized(packed: torch.Tensor, scale: torch.Tensor, group_size: int, n: int, k: int) -> torch.Tensor:
    """The `[n, k]` fp32 weight of a packed fp8 one, as kernels.reference.dequantize_fp8 has it,
    in the workspace (valid until the next call)."""
    global _fp8_workspace
    if _fp8_workspace.numel() < n * k:
        _fp8_workspace = torch.empty(0)  # the old one freed before the new one is taken
        _fp8_workspace = torch.empty(n * k)
    weight = _fp8_workspace[: n * k].view(n, k)
    scale = scale.contiguous()  # held while the C code reads it
    _lib.stoke_dequantize_fp8(packed.data_ptr(), scale.data_ptr(), weight.data_ptr(), n, k, group_size,
                              torch.get_num_threads())
    return weight


# Rows from which an fp8 product is torch's BLAS over the weight dequantized for the call: the
# fp32 product's (see the module docstring). There the fp8 product runs at about the fp32 one's
# speed, and the BLAS path at the fp32 BLAS's plus the dequantizing (about 1 ns per weight and
# core: an eighth to a fifth of the product at 256 rows, less beyond), so the two products cross
# over about together; on a Zen 4 (AVX-512 at half width) neither did below 1024 rows.
# None: never.
FP8_BLAS_MIN_ROWS: int | None = BLAS_MIN_ROWS


def fp8_linear(x: torch.Tensor, packed: torch.Tensor, scale: torch.Tensor, group_size: int,
               bias: torch.Tensor | None, n: int) -> torch.Tensor:
    """kernels.reference.fp8_linear(x, weight, scale, group_size, bias) for x `[M, K]`, with the
    fp8 `[n, K]` weight given packed (pack_fp8_linear_weight): for fp32 rows, in C dequantizing
    as it reads (fewer than FP8_BLAS_MIN_ROWS), else torch's BLAS over the weight dequantized
    for the call; anything else (other dtypes, shapes that disagree) the reference's."""
    k = x.shape[-1]
    groups = -(-k // group_size) if group_size > 0 else -1
    if not (_rows(x) and k > 0 and packed.dtype == torch.float8_e4m3fn and packed.device.type == "cpu"
            and packed.is_contiguous() and packed.numel() == -(-n // 16) * 16 * k
            and _fp32_cpu(scale) and scale.shape == (n, groups)
            and (bias is None or (_fp32_cpu(bias) and bias.numel() == n))):
        weight = unpack_linear_weight(packed, n, k) if k else packed.new_zeros(n, 0)
        return reference.fp8_linear(x, weight, scale, group_size, None if bias is None else bias.to(x.dtype))
    m = x.shape[0]
    if FP8_BLAS_MIN_ROWS is not None and m >= FP8_BLAS_MIN_ROWS:
        return F.linear(x, _dequantized(packed, scale, group_size, n, k), bias)
    out = torch.empty(m, n, dtype=x.dtype)
    if m == 0:
        return out
    scale, bias = scale.contiguous(), None if bias is None else bias.contiguous()
    _lib.stoke_linear_fp8(x.data_ptr(), packed.data_ptr(), scale.data_ptr(), None if bias is None else bias.data_ptr(),
                          out.data_ptr(), m, n, k, group_size, x.stride(0), n, torch.get_num_threads())
    return out
