"""A projection over an fp8 (float8_e4m3fn) weight in Triton, safe to capture in CUDA graphs:
the same contract as `kernels.reference.fp8_linear`, for CUDA (and Triton's interpreter, for
tests).

Weight-only quantization (w8a16): activations stay in their dtype (fp32/fp16/bf16), the
weight is stored in fp8 with fp32 scales, one per row and group of `group_size` input columns
(group_size = K: one scale per row, per-channel; 128: the block-quantized checkpoints of
Qwen3-FP8 and DeepSeek). Dequantizing the whole weight first (what the reference does) writes
and reads it again at twice the bytes; here each program loads its fp8 weight tile, converts it
to fp32, multiplies in the gathered scales, rounds to x's dtype (exactly where the reference
rounds) and feeds `tl.dot` with the x tile: fp32 accumulation, bias added in fp32, the output
rounded once. The weight crosses memory once, in fp8: half of bf16's bytes, which is what a
decode step (memory bound: M rows against N x K weights) pays for.

One GEMM kernel, programs over (row block, column block) walked in groups of GROUP_M row
blocks (they share weight tiles in L2 at prefill sizes). Every dim is masked, so M, N and K
need not be multiples of the tiles, and K need not be one of group_size (the last group may
be narrower): whole K-steps run without a K mask, the ragged last one after them with it.
When every K-step lies in one group (per-channel, or group_size a multiple of BLOCK_K: the
tiles see to it for every group size that is a multiple of 16) the scales are one vector per
step; otherwise each weight element gathers its own (small tiles: see `fp8_tile`). fp32
inputs take IEEE dots, as the reference's fp32 matmul. The fp8 conversion is the hardware's
from sm_89 on (Ada, Hopper); an A100 (sm_80) has none, and Triton refuses e4m3fn there, so
the kernel reads the bytes and moves the bits into an fp16 instead (`_fp8_to_fp32`, exact).
Only pointer arithmetic (no block pointers): Triton 3.4 and later.

Graph safety: the tile comes from M (the captured batch's rows), the group size, K, the dtype
and the device's architecture, never from a tensor's values; nothing is read on the host.

The tiles (`fp8_tile`) are a first guess, not measured: no GPU was at hand when this was
written. A GPU run should time them against a bf16 GEMM (torch.nn.functional.linear) at
decode and prefill sizes and tune them; see `fp8_tile` for the reasoning behind each.
"""

from __future__ import annotations

from dataclasses import dataclass, replace

import torch
import triton
import triton.language as tl

from kernels import triton_ops
from kernels.triton_ops import LAUNCH_OPTIONS, MIN_DOT, _fp8_to_fp32  # the bits decoded on sm_80 too

__all__ = ["Fp8Tile", "fp8_linear", "fp8_tile", "has_native_fp8"]

DTYPES = (torch.float16, torch.bfloat16, torch.float32)
WEIGHT_DTYPE = torch.float8_e4m3fn


@dataclass(frozen=True, slots=True)
class Fp8Tile:
    """The GEMM's tiles and launch options."""

    block_m: int  # rows of x per program
    block_n: int  # output columns (weight rows) per program
    block_k: int  # reduction step
    group_m: int  # row blocks that walk the output columns together, for L2 reuse
    num_warps: int
    num_stages: int


# ----------------------------------------------------------------------------- the kernel


@triton.jit
def _fp8_linear_kernel(
    x_ptr, w_ptr, scale_ptr, bias_ptr, out_ptr,
    num_rows, num_cols, depth, group_size,
    stride_xm, stride_xk, stride_wn, stride_wk, stride_sn, stride_sg, stride_b, stride_om, stride_on,
    HAS_BIAS: tl.constexpr, EVEN_K: tl.constexpr, TILE_IN_GROUP: tl.constexpr, NATIVE_FP8: tl.constexpr,
    BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr, GROUP_M: tl.constexpr,
    DOT_PREC: tl.constexpr,
):
    # out[m, n] = Σ_k x[m, k] * round(float(w[n, k]) * scale[n, k // group_size]) (+ bias[n]).
    pid = tl.program_id(0)
    num_pid_m = tl.cdiv(num_rows, BLOCK_M)
    num_pid_n = tl.cdiv(num_cols, BLOCK_N)
    per_group = GROUP_M * num_pid_n
    first_m = pid // per_group * GROUP_M
    group_rows = tl.minimum(num_pid_m - first_m, GROUP_M)
    pid_m = first_m + pid % per_group % group_rows
    pid_n = pid % per_group // group_rows

    offs_m = pid_m * BLOCK_M + tl.arange(0, BLOCK_M)
    offs_n = pid_n * BLOCK_N + tl.arange(0, BLOCK_N)
    row_mask = offs_m < num_rows
    col_mask = offs_n < num_cols
    offs_k = tl.arange(0, BLOCK_K)
    rows = offs_m.to(tl.int64)
    cols = offs_n.to(tl.int64)
    x_ptrs = x_ptr + rows[:, None] * stride_xm + offs_k[None, :] * stride_xk
    w_ptrs = w_ptr + cols[None, :] * stride_wn + offs_k[:, None] * stride_wk  # [BLOCK_K, BLOCK_N]: wᵀ
    s_ptrs = scale_ptr + cols * stride_sn  # each column's first group
    acc = tl.zeros([BLOCK_M, BLOCK_N], dtype=tl.float32)
    # Whole K-steps without a K mask, then the ragged last one (masks in the loop cost
    # registers: the largest tile spilled with them).
    for step in range(0, depth // BLOCK_K):
        acc = _step(acc, x_ptrs, w_ptrs, s_ptrs, step * BLOCK_K, depth, group_size, stride_sg, row_mask, col_mask,
                    offs_k, False, TILE_IN_GROUP, NATIVE_FP8, DOT_PREC)
        x_ptrs += BLOCK_K * stride_xk
        w_ptrs += BLOCK_K * stride_wk
    if not EVEN_K:
        acc = _step(acc, x_ptrs, w_ptrs, s_ptrs, depth // BLOCK_K * BLOCK_K, depth, group_size, stride_sg, row_mask,
                    col_mask, offs_k, True, TILE_IN_GROUP, NATIVE_FP8, DOT_PREC)

    if HAS_BIAS:
        bias = tl.load(bias_ptr + cols * stride_b, mask=col_mask, other=0.0)
        acc += bias.to(out_ptr.dtype.element_ty).to(tl.float32)[None, :]  # at x's dtype, as F.linear adds it
    tl.store(out_ptr + rows[:, None] * stride_om + cols[None, :] * stride_on, acc.to(out_ptr.dtype.element_ty),
             mask=row_mask[:, None] & col_mask[None, :])


@triton.jit
def _step(acc, x_ptrs, w_ptrs, s_ptrs, k0, depth, group_size, stride_sg, row_mask, col_mask, offs_k,
          MASK_K: tl.constexpr, TILE_IN_GROUP: tl.constexpr, NATIVE_FP8: tl.constexpr, DOT_PREC: tl.constexpr):
    """acc + the x tile at columns k0.. times the weight tile there dequantized (wᵀ, [BLOCK_K,
    BLOCK_N]): fp8 to fp32, times its scales, rounded to x's dtype, as the reference does."""
    if MASK_K:
        k_mask = offs_k < depth - k0
        x_mask = row_mask[:, None] & k_mask[None, :]
        w_mask = col_mask[None, :] & k_mask[:, None]
    else:
        x_mask = row_mask[:, None]
        w_mask = col_mask[None, :]
    a = tl.load(x_ptrs, mask=x_mask, other=0.0)
    w = _dequantized(w_ptrs, s_ptrs, k0, group_size, stride_sg, w_mask, col_mask, offs_k, TILE_IN_GROUP, NATIVE_FP8,
                     x_ptrs.dtype.element_ty)
    return tl.dot(a, w, acc, input_precision=DOT_PREC)


@triton.jit
def _dequantized(w_ptrs, s_ptrs, k0, group_size, stride_sg, w_mask, col_mask, offs_k, TILE_IN_GROUP: tl.constexpr,
                 NATIVE_FP8: tl.constexpr, DTYPE: tl.constexpr):
    """The fp8 weight tile at `w_ptrs` (wᵀ, [BLOCK_K, BLOCK_N], input columns k0..) dequantized
    as the reference does: fp8 to fp32, times each element's scale (`s_ptrs`: each output
    column's first group, groups `stride_sg` apart), rounded once to DTYPE (x's) for the dot.
    Shared with kernels/triton_moe.py's fp8 experts."""
    w = _fp8_to_fp32(tl.load(w_ptrs, mask=w_mask, other=0.0), NATIVE_FP8)
    if TILE_IN_GROUP:  # the whole step in one group: one scale per column
        w = w * tl.load(s_ptrs + (k0 // group_size) * stride_sg, mask=col_mask, other=0.0)[None, :]
    else:  # groups narrower than the step, or straddling it: a scale per element
        groups = (k0 + offs_k) // group_size
        w = w * tl.load(s_ptrs[None, :] + groups[:, None] * stride_sg, mask=w_mask, other=0.0)
    return w.to(DTYPE)


# ----------------------------------------------------------------------------- the projection


def fp8_linear(
    x: torch.Tensor, weight: torch.Tensor, scale: torch.Tensor, group_size: int, bias: torch.Tensor | None = None,
    *, tile: Fp8Tile | None = None, native_fp8: bool | None = None,
) -> torch.Tensor:
    """A projection over an fp8 weight, as `kernels.reference.fp8_linear`: x `[..., K]` (fp32,
    fp16 or bf16, any strides) @ Wᵀ (+ bias `[N]`) → `[..., N]` in x's dtype, where W[n, k] =
    float(weight[n, k]) * scale[n, k // group_size] rounded to x's dtype; weight `[N, K]`
    float8_e4m3fn, scale `[N, ceil(K / group_size)]` fp32, group_size >= 1 (K: one scale per
    row). fp32 accumulation, the output rounded once. A bias in another float dtype is rounded
    to x's first (as `bias.to(x.dtype)` would be).

    No host sync and no decision taken from a tensor's values: capture it in a CUDA graph and
    replay it with new inputs copied into the same tensors. `tile`: the GEMM's tiles (default:
    `fp8_tile`); `native_fp8`: convert fp8 with the hardware's instructions, or decode its bits
    (default: `has_native_fp8`, from the device)."""
    num_cols, depth = _check(x, weight, scale, group_size, bias)
    lead = x.shape[:-1]
    rows = x.reshape(-1, depth)  # a view where the strides allow (any 2-D strides are read as they are)
    num_rows = rows.shape[0]
    out = torch.empty(num_rows, num_cols, dtype=x.dtype, device=x.device)
    if num_rows == 0 or num_cols == 0:
        return out.view(*lead, num_cols)
    tile = tile or fp8_tile(num_rows, group_size, depth, x.dtype, x.device)
    _check_tile(tile)
    native = native_fp8 if native_fp8 is not None else has_native_fp8(x.device)
    grid = (triton.cdiv(num_rows, tile.block_m) * triton.cdiv(num_cols, tile.block_n),)
    _fp8_linear_kernel[grid](
        rows, weight if native else weight.view(torch.uint8), scale, bias if bias is not None else out, out,
        num_rows, num_cols, depth, group_size,
        rows.stride(0), rows.stride(1), weight.stride(0), weight.stride(1), scale.stride(0), scale.stride(1),
        bias.stride(0) if bias is not None else 0, out.stride(0), out.stride(1),
        HAS_BIAS=bias is not None, EVEN_K=depth % tile.block_k == 0,
        TILE_IN_GROUP=_tile_in_group(group_size, depth, tile.block_k), NATIVE_FP8=native,
        BLOCK_M=tile.block_m, BLOCK_N=tile.block_n, BLOCK_K=tile.block_k, GROUP_M=tile.group_m,
        DOT_PREC="ieee" if x.dtype == torch.float32 else "tf32",
        num_warps=tile.num_warps, num_stages=tile.num_stages, **LAUNCH_OPTIONS,
    )
    return out.view(*lead, num_cols)


# ----------------------------------------------------------------------------- configuration


def fp8_tile(num_rows: int, group_size: int, depth: int, dtype: torch.dtype, device: torch.device) -> Fp8Tile:
    """Tiles from M, the groups, the dtype and the architecture alone: a first guess, not yet
    timed on a GPU (a run should sweep them against a bf16 GEMM and tune).

    - M <= 16 (decode): (16, 32, 128). A step reads each weight byte once and the rows are
      few, so the kernel is bound by the weight's bandwidth: narrow column tiles give enough
      programs to cover every SM (N = 4096 makes 128 of them, for 132 SMs on an H100; no
      split-K), and the stages keep several 4 KiB weight tiles in flight per program.
    - M <= 64: (32, 32, 128), still bandwidth bound (32 x 64 with 128-column steps spilled
      with Triton 3.6); M <= 256: (64, 128, 64); larger M (prefill, compute bound): (128, 128,
      64) over 8 warps. Groups of 8 row blocks share weight tiles in L2.
    Stages: four on Hopper (228 KiB of shared memory a block), three elsewhere (Ada has
    99 KiB) and for the largest tile; a 16-bit stage holds at most 16 KiB of x and 8 KiB of
    fp8 weight, plus the converted weight tile for the dot. fp32 runs IEEE dots on FMA units:
    small tiles, two stages.

    Groups: per-channel (one group) and block-quantized (group 128) checkpoints keep these
    tiles, each K-step inside one group (one scale per column). Groups of a multiple of 16 that
    BLOCK_K does not divide take a BLOCK_K that divides them. Other group sizes need a scale
    per element, a [BLOCK_K, BLOCK_N] fp32 tile the large tiles have no registers for (they
    spilled KiBs): small tiles, a fallback no known checkpoint takes.

    The interpreter: the smallest tiles (16), so tests cross many tiles, and groups of 2 row
    blocks to exercise the walk."""
    if device.type != "cuda":
        return Fp8Tile(MIN_DOT, MIN_DOT, MIN_DOT, 2, 4, 1)
    decode = num_rows <= 16
    if dtype == torch.float32:
        tile = Fp8Tile(16 if decode else 32, 32, 32, 1 if decode else 8, 4, 2)
    else:
        stages = 4 if triton_ops._device_capability(device)[0] >= 9 else 3
        if decode:
            tile = Fp8Tile(16, 32, 128, 1, 4, stages)
        elif num_rows <= 64:
            tile = Fp8Tile(32, 32, 128, 8, 4, stages)
        elif num_rows <= 256:
            tile = Fp8Tile(64, 128, 64, 8, 4, stages)
        else:
            tile = Fp8Tile(128, 128, 64, 8, 8, 3)
    if _tile_in_group(group_size, depth, tile.block_k):
        return tile
    if group_size % MIN_DOT == 0:
        return replace(tile, block_k=group_size & -group_size)  # the largest power of two dividing it
    return Fp8Tile(16 if decode or dtype == torch.float32 else 32, 32, 32, 1 if decode else 8, 4, 2)


def _tile_in_group(group_size: int, depth: int, block_k: int) -> bool:
    """Whether every K-step of `block_k` columns lies in one group (one scale per column)."""
    return group_size % block_k == 0 or group_size >= depth


def has_native_fp8(device: torch.device) -> bool:
    """Whether Triton converts e4m3fn on this device: from sm_89 (Ada, Hopper) on, and in the
    interpreter; A100s (sm_80) decode the bits instead (`_fp8_to_fp32`)."""
    return device.type != "cuda" or triton_ops._device_capability(device) >= (8, 9)



# ----------------------------------------------------------------------------- checks


def _check(x: torch.Tensor, weight: torch.Tensor, scale: torch.Tensor, group_size: int,
           bias: torch.Tensor | None) -> tuple[int, int]:
    """(N, K), or a ValueError naming what is wrong."""
    if x.dim() < 1:
        raise ValueError("fp8_linear: x must be [..., K], got a scalar")
    if weight.dim() != 2:
        raise ValueError(f"fp8_linear: weight must be [N, K], got {tuple(weight.shape)}")
    num_cols, depth = weight.shape
    if x.shape[-1] != depth or depth < 1:
        raise ValueError(f"fp8_linear: x {tuple(x.shape)} does not fit weight {tuple(weight.shape)}: "
                         f"x must be [..., K] with K = weight.shape[1] >= 1")
    if isinstance(group_size, bool) or not isinstance(group_size, int) or group_size < 1:
        raise ValueError(f"fp8_linear: group_size must be an int >= 1, got {group_size!r}")
    groups = -(-depth // group_size)
    if tuple(scale.shape) != (num_cols, groups):
        raise ValueError(f"fp8_linear: scale must be [N, ceil(K / group_size)] = [{num_cols}, {groups}], "
                         f"got {tuple(scale.shape)}")
    if x.dtype not in DTYPES:
        raise ValueError(f"fp8_linear: x must be one of {[str(d) for d in DTYPES]}, got {x.dtype}")
    if weight.dtype != WEIGHT_DTYPE:
        raise ValueError(f"fp8_linear: weight must be {WEIGHT_DTYPE}, got {weight.dtype}")
    if scale.dtype != torch.float32:
        raise ValueError(f"fp8_linear: scale must be torch.float32, got {scale.dtype}")
    if bias is not None and (tuple(bias.shape) != (num_cols,) or bias.dtype not in DTYPES):
        raise ValueError(f"fp8_linear: bias must be [N] = [{num_cols}] in one of {[str(d) for d in DTYPES]}, got "
                         f"{tuple(bias.shape)} {bias.dtype}")
    devices = {t.device for t in (x, weight, scale, bias) if t is not None}
    if len(devices) > 1:
        raise ValueError(f"fp8_linear: every tensor must be on one device, got {sorted(map(str, devices))}")
    return num_cols, depth


def _check_tile(tile: Fp8Tile) -> None:
    blocks = (tile.block_m, tile.block_n, tile.block_k)
    if any(b < MIN_DOT or b & (b - 1) for b in blocks) or tile.group_m < 1:
        raise ValueError(f"fp8_linear: tile blocks must be powers of two >= {MIN_DOT} and group_m >= 1, got {tile}")
