"""Fused RMSNorm (with the residual add) and rotary embedding in Triton; the torch references
are `kernels.reference.rms_norm` and `kernels.reference.apply_rotary`, same signatures.
`silu_and_mul` is the reference's torch code: the model takes all three from one module.

Both are memory-bound elementwise kernels: one program per row (norm) or per token (rotary),
fp32 arithmetic, the same rounding points as engine/models/llama.py (the residual sum and the
normalised value are rounded to the activation dtype before the weight multiply). Inputs may
be strided views (q/k/v split from a fused projection): only the last dim must be contiguous.
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl

from kernels.reference import silu_and_mul
from kernels.triton_ops import LAUNCH_OPTIONS

__all__ = ["apply_rotary", "rms_norm", "silu_and_mul"]

# ----------------------------------------------------------------------------- RMSNorm


@triton.jit
def _rms_norm_kernel(
    x_ptr, res_ptr, w_ptr, out_ptr, res_out_ptr,
    eps, N, rows_inner,
    stride_x0, stride_x1, stride_r0, stride_r1,
    HAS_RESIDUAL: tl.constexpr, BLOCK: tl.constexpr, ROUND_ONCE: tl.constexpr,
):
    # Row r of the flattened leading dims is (r // rows_inner, r % rows_inner) of a 3-D view.
    row = tl.program_id(0).to(tl.int64)
    i0 = row // rows_inner
    i1 = row % rows_inner
    offs = tl.arange(0, BLOCK)
    mask = offs < N
    x = tl.load(x_ptr + i0 * stride_x0 + i1 * stride_x1 + offs, mask=mask, other=0.0)
    if HAS_RESIDUAL:
        r = tl.load(res_ptr + i0 * stride_r0 + i1 * stride_r1 + offs, mask=mask, other=0.0)
        x = (x.to(tl.float32) + r.to(tl.float32)).to(x_ptr.dtype.element_ty)
        tl.store(res_out_ptr + row * N + offs, x, mask=mask)
    xf = x.to(tl.float32)
    rstd = tl.rsqrt(tl.sum(xf * xf, 0) / N + eps)
    w = tl.load(w_ptr + offs, mask=mask, other=0.0)
    if ROUND_ONCE:  # Gemma's fp32 weight: the product in fp32, rounded once
        out = w.to(tl.float32) * (xf * rstd)
    else:
        y = (xf * rstd).to(x_ptr.dtype.element_ty)
        out = w.to(tl.float32) * y.to(tl.float32)
    tl.store(out_ptr + row * N + offs, out.to(out_ptr.dtype.element_ty), mask=mask)


def _as_3d(x: torch.Tensor) -> torch.Tensor:
    """x as [A, R, N] (a view when the strides allow), last dim contiguous."""
    if x.stride(-1) != 1:
        x = x.contiguous()
    if x.dim() == 1:
        return x.view(1, 1, -1)
    if x.dim() == 2:
        return x.unsqueeze(1)
    return x.reshape(-1, x.shape[-2], x.shape[-1])


def rms_norm(
    x: torch.Tensor, weight: torch.Tensor, eps: float, residual: torch.Tensor | None = None
) -> torch.Tensor | tuple[torch.Tensor, torch.Tensor]:
    """RMSNorm over the last dim (see `kernels.reference.rms_norm`): `out`, or with `residual`
    `(rmsnorm(x + residual) * weight, x + residual)`. Outputs are fresh contiguous tensors."""
    N = x.shape[-1]
    if weight.shape != (N,):
        raise ValueError(f"weight {tuple(weight.shape)} does not match the last dim {N}")
    if residual is not None and residual.shape != x.shape:
        raise ValueError(f"residual {tuple(residual.shape)} does not match x {tuple(x.shape)}")
    round_once = weight.dtype == torch.float32 != x.dtype
    out = torch.empty(x.shape, dtype=x.dtype if round_once else torch.promote_types(weight.dtype, x.dtype),
                      device=x.device)
    res_out = torch.empty(x.shape, dtype=x.dtype, device=x.device) if residual is not None else None
    if x.numel() == 0:
        return out if residual is None else (out, res_out)
    x3 = _as_3d(x)
    r3 = _as_3d(residual) if residual is not None else x3
    block = triton.next_power_of_2(N)
    _rms_norm_kernel[(x3.shape[0] * x3.shape[1],)](
        x3, r3, weight.contiguous(), out, res_out if res_out is not None else out,
        eps, N, x3.shape[1],
        x3.stride(0), x3.stride(1), r3.stride(0), r3.stride(1),
        HAS_RESIDUAL=residual is not None, BLOCK=block, ROUND_ONCE=round_once,
        num_warps=min(16, max(1, block // 512)), **LAUNCH_OPTIONS,
    )
    return out if residual is None else (out, res_out)


# ----------------------------------------------------------------------------- rotary


@triton.jit
def _rotate(x_ptr, stride_h, num_heads, c, s, offs_h, offs_d, HALF: tl.constexpr):
    """Rotate-half of the heads `[BLOCK_H, HALF]` of one token at x_ptr, in place."""
    mask = (offs_h < num_heads)[:, None] & (offs_d < HALF)[None, :]
    p1 = x_ptr + offs_h[:, None] * stride_h + offs_d[None, :]
    x1 = tl.load(p1, mask=mask, other=0.0).to(tl.float32)
    x2 = tl.load(p1 + HALF, mask=mask, other=0.0).to(tl.float32)
    tl.store(p1, (x1 * c - x2 * s).to(x_ptr.dtype.element_ty), mask=mask)
    tl.store(p1 + HALF, (x2 * c + x1 * s).to(x_ptr.dtype.element_ty), mask=mask)


@triton.jit
def _rotary_kernel(
    q_ptr, k_ptr, cos_ptr, sin_ptr, positions_ptr,
    num_q_heads, num_k_heads,
    stride_qt, stride_qh, stride_kt, stride_kh, stride_cos, stride_sin,
    HALF: tl.constexpr, BLOCK_HALF: tl.constexpr, BLOCK_HQ: tl.constexpr, BLOCK_HK: tl.constexpr,
):
    t = tl.program_id(0).to(tl.int64)
    pos = tl.load(positions_ptr + t).to(tl.int64)
    offs_d = tl.arange(0, BLOCK_HALF)
    d_mask = offs_d < HALF
    c = tl.load(cos_ptr + pos * stride_cos + offs_d, mask=d_mask, other=0.0).to(tl.float32)[None, :]
    s = tl.load(sin_ptr + pos * stride_sin + offs_d, mask=d_mask, other=0.0).to(tl.float32)[None, :]
    _rotate(q_ptr + t * stride_qt, stride_qh, num_q_heads, c, s, tl.arange(0, BLOCK_HQ), offs_d, HALF)
    _rotate(k_ptr + t * stride_kt, stride_kh, num_k_heads, c, s, tl.arange(0, BLOCK_HK), offs_d, HALF)


def apply_rotary(
    q: torch.Tensor, k: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor, positions: torch.Tensor
) -> tuple[torch.Tensor, torch.Tensor]:
    """Rotary embedding (HF rotate-half), in place on q `[T, Hq, D]` and k `[T, Hkv, D]`, which
    may be strided views but need a contiguous last dim; cos/sin `[max_positions, R/2]` rotate
    each head's leading R <= D dims (partial rotary: the rest pass through)."""
    T, num_q_heads, D = q.shape
    if k.shape[0] != T or k.shape[2] != D:
        raise ValueError(f"q {tuple(q.shape)} and k {tuple(k.shape)} need the same tokens and head_dim")
    if q.stride(-1) != 1 or k.stride(-1) != 1:
        raise ValueError("apply_rotary works in place: q and k need a contiguous last dim")
    half = cos.shape[-1]
    if sin.shape[-1] != half or 2 * half > D:
        raise ValueError(f"cos/sin tables {tuple(cos.shape)}, {tuple(sin.shape)} do not rotate at most "
                         f"head_dim/2 = {D // 2} pairs")
    if T == 0:
        return q, k
    cos = cos if cos.stride(-1) == 1 else cos.contiguous()
    sin = sin if sin.stride(-1) == 1 else sin.contiguous()
    num_k_heads = k.shape[1]
    block_hq, block_hk = triton.next_power_of_2(num_q_heads), triton.next_power_of_2(num_k_heads)
    block_half = triton.next_power_of_2(half)
    _rotary_kernel[(T,)](
        q, k, cos, sin, positions.contiguous(),
        num_q_heads, num_k_heads,
        q.stride(0), q.stride(1), k.stride(0), k.stride(1), cos.stride(0), sin.stride(0),
        HALF=half, BLOCK_HALF=block_half, BLOCK_HQ=block_hq, BLOCK_HK=block_hk,
        num_warps=4 if block_hq * block_half >= 2048 else 1, **LAUNCH_OPTIONS,
    )
    return q, k
