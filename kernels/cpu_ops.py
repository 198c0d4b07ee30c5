"""The CPU serving kernels: the contract of kernels.reference, with decode attention in C.

Decode attention is bandwidth-bound: the reference gathers every sequence's K/V into a dense
copy and SDPA reads that copy again, three passes over the largest data of a step. The C
kernel (kernels/csrc/paged_attention.c) reads each K/V row once, in place in the paged cache.
It serves fp32 on the CPU with head dims that are multiples of 8 up to 256; anything else
(fp16/bf16, another device, an odd head dim) goes to the reference.
Importing this module builds the library, or raises NativeBuildError where it can't be built.
"""

from __future__ import annotations

import ctypes

import torch
import torch.nn.functional as F

from kernels import native, reference

__all__ = ["paged_decode_attention", "paged_prefill_attention", "store_kv"]

store_kv = reference.store_kv

_lib = native.load("paged_attention")
_decode = _lib.stoke_paged_decode_attention_f32
_decode.restype = ctypes.c_int
_decode.argtypes = [ctypes.c_void_p] * 6 + [ctypes.c_int64] * 8 + [ctypes.c_float, ctypes.c_int64]


def _native_ok(q: torch.Tensor, k_cache: torch.Tensor, v_cache: torch.Tensor) -> bool:
    head_dim = q.shape[-1]
    return (
        head_dim % 8 == 0 and head_dim <= 256
        and all(t.device.type == "cpu" and t.dtype == torch.float32 for t in (q, k_cache, v_cache))
    )


def paged_decode_attention(
    q: torch.Tensor,
    k_cache: torch.Tensor,
    v_cache: torch.Tensor,
    block_tables: torch.Tensor,
    context_lens: torch.Tensor,
    scale: float,
) -> torch.Tensor:
    """One query per sequence, q `[B, Hq, D]`, over its `context_lens[b]` cached keys."""
    if not _native_ok(q, k_cache, v_cache):
        return reference.paged_decode_attention(q, k_cache, v_cache, block_tables, context_lens, scale)
    batch, num_heads, head_dim = q.shape
    num_kv_heads = k_cache.shape[2]
    if q.stride(2) != 1:
        q = q.contiguous()
    k_cache, v_cache = k_cache.contiguous(), v_cache.contiguous()  # no-ops for the engine's pools
    tables = block_tables.to(torch.int32).contiguous()
    lens = context_lens.to(torch.int32).contiguous()
    out = torch.empty(batch, num_heads, head_dim, dtype=q.dtype)
    if batch == 0:
        return out
    failed = _decode(
        q.data_ptr(), k_cache.data_ptr(), v_cache.data_ptr(), tables.data_ptr(), lens.data_ptr(),
        out.data_ptr(), batch, num_heads, num_kv_heads, head_dim, k_cache.shape[1], tables.stride(0),
        q.stride(0), q.stride(1), scale, torch.get_num_threads(),
    )
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
) -> torch.Tensor:
    """Causal attention for the new tokens q `[Tq, Hq, D]` of B sequences, one SDPA call per
    sequence: a step holds a few prefill chunks, and unpadded calls beat the reference's one
    padded call — no work on padding rows, and a chunk without a cached prefix (the common
    case) runs `is_causal`, which skips the masked half of the tiles."""
    block_size = k_cache.shape[1]
    out = torch.empty_like(q)
    bounds = cu_seqlens_q.tolist()
    for b, total in enumerate(context_lens.tolist()):
        start, end = bounds[b], bounds[b + 1]
        new = end - start
        blocks = block_tables[b, : -(-total // block_size)].long()
        k = k_cache.index_select(0, blocks).flatten(0, 1)[:total].transpose(0, 1)  # [Hkv, L, D]
        v = v_cache.index_select(0, blocks).flatten(0, 1)[:total].transpose(0, 1)
        qb = q[start:end].transpose(0, 1)  # [Hq, new, D]
        if new == total:
            o = F.scaled_dot_product_attention(qb, k, v, is_causal=True, scale=scale, enable_gqa=True)
        else:  # new tokens after a cached prefix: query j sits at position total - new + j
            positions = torch.arange(total - new, total)[:, None]
            bias = torch.zeros(new, total, dtype=q.dtype).masked_fill_(torch.arange(total) > positions, float("-inf"))
            o = F.scaled_dot_product_attention(qb, k, v, attn_mask=bias, scale=scale, enable_gqa=True)
        out[start:end] = o.transpose(0, 1)
    return out
