"""A mixture-of-experts MLP in Triton, safe to capture in CUDA graphs: the same contract as
`kernels.reference.fused_moe`, for CUDA (and Triton's interpreter, for tests).

vLLM's design (fused_moe's `moe_align_block_size` + one grouped GEMM), written for stoke:

1. Align, in torch device ops: the T*K (token, k) pairs (pair id `t * K + k`) sorted by expert
   (a stable sort), each expert's run padded to a multiple of BLOCK_M with the sentinel
   `T * K`, so a block of BLOCK_M rows belongs to one expert. Out come `sorted_ids`, the expert
   of each block and the number of padded rows (a 1-element device tensor). The lengths follow
   from T, K, E and BLOCK_M alone (a static bound on the padded rows), never from the routing:
   nothing is read on the host, so the call can be captured and replayed with new routing.
2. One grouped-GEMM kernel, launched twice. gate_up: rows `x[pair // K]` times `w13[expert]`,
   gate and up columns in two accumulators, `silu(gate) * up` in the epilogue, into an
   intermediate `[T*K, I]` in x's dtype (where the reference rounds it too). down: rows
   `intermediate[pair]` times `w2[expert]`, the pair's routing weight multiplied in fp32 in the
   epilogue, into fp32 `[T*K, H]`. Blocks past the padded rows exit on the device count; pad
   rows (the sentinel) are masked on every load and store; every dim is masked, so H and I
   need not be multiples of the tiles. Programs walk the output in groups of GROUP_M row
   blocks (consecutive blocks mostly share an expert: its weight tiles come from L2 after the
   first read).
3. Each token's K rows summed in fp32 and rounded once to x's dtype.

fp8 experts (w13 and w2 float8_e4m3fn, fp32 scales per row and group of input columns): the
same kernel under a constexpr switch, each weight tile dequantized before its dot as
kernels/triton_fp8.py does it (its `_dequantized`: the hardware's fp8 conversion from sm_89
on, the bits decoded on an A100; one scale per column where the K-step lies in one group, a
scale per element otherwise; rounded to x's dtype, as reference.dequantize_fp8 rounds). The
16/32-bit kernel compiles to the same code as without the switch.

fp32 accumulation throughout (IEEE dots for fp32 inputs). Only pointer arithmetic (no block
pointers): Triton 3.4 and later. Expert ids must lie in [0, E): checking their values would
need a host sync, which this path exists to avoid.
"""

from __future__ import annotations

from dataclasses import dataclass, replace
from typing import NamedTuple

import torch
import triton
import triton.language as tl

from kernels.triton_fp8 import WEIGHT_DTYPE, _dequantized, _tile_in_group, has_native_fp8
from kernels import triton_ops
from kernels.triton_ops import LAUNCH_OPTIONS, MIN_DOT

__all__ = ["Alignment", "MoETile", "align", "fused_moe", "max_padded_rows", "moe_tile"]

DTYPES = (torch.float16, torch.bfloat16, torch.float32)
ID_DTYPES = (torch.int32, torch.int64)


@dataclass(frozen=True, slots=True)
class MoETile:
    """The grouped GEMM's tiles and launch options, one for both passes."""

    block_m: int  # rows (pairs) per block; each expert's rows are padded to a multiple of it
    block_n: int  # output columns per program (of gate and of up each, in the gate_up pass)
    block_k: int  # reduction step
    group_m: int  # row blocks that walk the output columns together, for L2 reuse
    num_warps: int
    num_stages: int


class Alignment(NamedTuple):
    """The routing sorted by expert and padded to whole blocks (see `align`)."""

    sorted_ids: torch.Tensor  # [max_padded_rows] int32: pair ids, expert by expert; pad = T*K
    block_experts: torch.Tensor  # [max_padded_rows // block_m] int32: each block's expert
    num_padded: torch.Tensor  # [1] int32: the padded rows in use; blocks at or past it are idle


# ----------------------------------------------------------------------------- align (torch)


def max_padded_rows(num_pairs: int, num_experts: int, block_m: int) -> int:
    """The most rows the padded routing can take: each of at most min(E, T*K) experts with
    rows adds under one block of padding, so Σ_e ceil(c_e / M) <= (T*K + min(E, T*K) * (M-1)) / M."""
    return (num_pairs + min(num_experts, num_pairs) * (block_m - 1)) // block_m * block_m


def align(topk_ids: torch.Tensor, num_experts: int, block_m: int) -> Alignment:
    """The (token, k) pairs of `topk_ids [T, K]` grouped by expert (tokens in order within an
    expert), each expert's run padded to a multiple of `block_m`. Device ops only, no value-
    dependent shape: the same in a CUDA graph as eagerly."""
    device = topk_ids.device
    num_pairs = topk_ids.numel()
    length = max_padded_rows(num_pairs, num_experts, block_m)
    experts, order = topk_ids.reshape(-1).to(torch.int64).sort(stable=True)
    # bounds[e]: where expert e's pairs start in sorted order (bounds[E] = T*K).
    bounds = torch.searchsorted(experts, torch.arange(num_experts + 1, device=device))
    padded = (bounds.diff() + block_m - 1) // block_m * block_m
    padded_ends = padded.cumsum(0)
    # Sorted pair i of expert e goes to row padded_start[e] + (i - bounds[e]).
    shift = padded_ends - padded - bounds[:-1]
    rows = torch.arange(num_pairs, device=device) + shift[experts]
    sorted_ids = torch.full((length,), num_pairs, dtype=torch.int32, device=device)
    sorted_ids.scatter_(0, rows, order.to(torch.int32))
    # A block's expert: the first whose padded run ends after the block's first row. Blocks past
    # the padded rows get the last expert, a valid index they never read.
    starts = torch.arange(0, length, block_m, device=device)
    block_experts = torch.searchsorted(padded_ends, starts, right=True).clamp_(max=num_experts - 1)
    return Alignment(sorted_ids, block_experts.to(torch.int32), padded_ends[-1:].to(torch.int32))


# ----------------------------------------------------------------------------- grouped GEMM


@triton.jit
def _moe_gemm_kernel(
    a_ptr, b_ptr, out_ptr, weights_ptr, sorted_ids_ptr, block_experts_ptr, num_padded_ptr, scale_ptr,
    num_pairs, num_cols, depth, up_offset, group_size,
    stride_am, stride_ak, stride_be, stride_bn, stride_bk, stride_om, stride_on, stride_se, stride_sn, stride_sg,
    PAIRS_PER_A_ROW: tl.constexpr, GATED: tl.constexpr, WEIGHTED: tl.constexpr, EVEN_K: tl.constexpr,
    FP8: tl.constexpr, TILE_IN_GROUP: tl.constexpr, NATIVE_FP8: tl.constexpr,
    BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr, GROUP_M: tl.constexpr,
    DOT_PREC: tl.constexpr,
):
    # out[pair, n] = Σ_k a[pair // PAIRS_PER_A_ROW, k] * b[expert, n, k] for the BLOCK_M pairs of
    # one block (one expert) and BLOCK_N columns; GATED: silu(that) * (the same at row n + up_offset).
    # FP8: b holds fp8 codes, each tile dequantized with its scales (triton_fp8's `_dequantized`:
    # scale[expert, n, k // group_size], rounded to a's dtype) before the dot; off, the
    # scale arguments are unused and the kernel is the 16/32-bit one.
    pid = tl.program_id(0)
    num_pid_n = tl.cdiv(num_cols, BLOCK_N)
    num_pid_m = tl.num_programs(0) // num_pid_n
    per_group = GROUP_M * num_pid_n
    first_m = pid // per_group * GROUP_M
    group_rows = tl.minimum(num_pid_m - first_m, GROUP_M)
    pid_m = first_m + pid % per_group % group_rows
    pid_n = pid % per_group // group_rows
    if pid_m * BLOCK_M >= tl.load(num_padded_ptr):
        return  # past the padded rows: this launch's routing needs fewer blocks than the bound

    offs_m = pid_m * BLOCK_M + tl.arange(0, BLOCK_M)
    pairs = tl.load(sorted_ids_ptr + offs_m)
    row_mask = pairs < num_pairs  # pad rows hold the sentinel num_pairs
    pairs = pairs.to(tl.int64)
    expert = tl.load(block_experts_ptr + pid_m).to(tl.int64)
    offs_n = pid_n * BLOCK_N + tl.arange(0, BLOCK_N)
    col_mask = offs_n < num_cols
    offs_k = tl.arange(0, BLOCK_K)
    a_ptrs = a_ptr + (pairs // PAIRS_PER_A_ROW)[:, None] * stride_am + offs_k[None, :] * stride_ak
    b_ptrs = b_ptr + expert * stride_be + offs_n.to(tl.int64)[None, :] * stride_bn + offs_k[:, None] * stride_bk
    if FP8:
        s_ptrs = scale_ptr + expert * stride_se + offs_n.to(tl.int64) * stride_sn  # each column's first group
    acc = tl.zeros([BLOCK_M, BLOCK_N], dtype=tl.float32)
    acc_up = tl.zeros([BLOCK_M, BLOCK_N], dtype=tl.float32)
    for k in range(0, tl.cdiv(depth, BLOCK_K)):
        if EVEN_K:
            a_mask = row_mask[:, None]
            b_mask = col_mask[None, :]
        else:
            k_mask = offs_k < depth - k * BLOCK_K
            a_mask = row_mask[:, None] & k_mask[None, :]
            b_mask = col_mask[None, :] & k_mask[:, None]
        a = tl.load(a_ptrs, mask=a_mask, other=0.0)
        if FP8:
            b = _dequantized(b_ptrs, s_ptrs, k * BLOCK_K, group_size, stride_sg, b_mask, col_mask, offs_k,
                             TILE_IN_GROUP, NATIVE_FP8, a_ptr.dtype.element_ty)
        else:
            b = tl.load(b_ptrs, mask=b_mask, other=0.0)
        acc = tl.dot(a, b, acc, input_precision=DOT_PREC)
        if GATED:
            if FP8:
                b_up = _dequantized(b_ptrs + up_offset * stride_bn, s_ptrs + up_offset * stride_sn, k * BLOCK_K,
                                    group_size, stride_sg, b_mask, col_mask, offs_k, TILE_IN_GROUP, NATIVE_FP8,
                                    a_ptr.dtype.element_ty)
            else:
                b_up = tl.load(b_ptrs + up_offset * stride_bn, mask=b_mask, other=0.0)
            acc_up = tl.dot(a, b_up, acc_up, input_precision=DOT_PREC)
        a_ptrs += BLOCK_K * stride_ak
        b_ptrs += BLOCK_K * stride_bk

    if GATED:
        acc = acc * tl.sigmoid(acc) * acc_up
    if WEIGHTED:
        acc = acc * tl.load(weights_ptr + pairs, mask=row_mask, other=0.0)[:, None]
    tl.store(out_ptr + pairs[:, None] * stride_om + offs_n[None, :] * stride_on, acc.to(out_ptr.dtype.element_ty),
             mask=row_mask[:, None] & col_mask[None, :])


class _Fp8Weight(NamedTuple):
    """An fp8 weight stack's scales `[E, rows, groups]` and group size, and how its codes are read."""

    scale: torch.Tensor
    group_size: int
    native: bool  # the hardware's fp8 conversion; otherwise the bytes, decoded (sm_80)


def _grouped_gemm(a: torch.Tensor, b: torch.Tensor, out: torch.Tensor, weights: torch.Tensor | None,
                  routing: Alignment, num_cols: int, pairs_per_a_row: int, gated: bool, tile: MoETile,
                  fp8: _Fp8Weight | None = None) -> None:
    """out[pair] (rows of the pairs in `routing`) = a[pair // pairs_per_a_row] @ b[expert].T, its
    first `num_cols` columns: gated, silu of those times those of b's rows from `num_cols` on;
    with `weights` (fp32, per pair), times the pair's weight. `fp8`: b is fp8, dequantized tile
    by tile with these scales."""
    depth = a.shape[1]
    grid = (routing.block_experts.numel() * triton.cdiv(num_cols, tile.block_n),)
    if fp8 is not None:
        scale, group_size = fp8.scale, fp8.group_size
        b = b if fp8.native else b.view(torch.uint8)  # Triton refuses e4m3fn without the hardware's conversion
        tile_in_group = _tile_in_group(group_size, depth, tile.block_k)
    else:  # unused by the kernel: any tensor and ints
        scale, group_size, tile_in_group = out, 0, False
    _moe_gemm_kernel[grid](
        a, b, out, weights if weights is not None else out, routing.sorted_ids, routing.block_experts,
        routing.num_padded, scale, out.shape[0], num_cols, depth, num_cols if gated else 0, group_size,
        a.stride(0), a.stride(1), b.stride(0), b.stride(1), b.stride(2), out.stride(0), out.stride(1),
        *(scale.stride() if fp8 is not None else (0, 0, 0)),
        PAIRS_PER_A_ROW=pairs_per_a_row, GATED=gated, WEIGHTED=weights is not None,
        EVEN_K=depth % tile.block_k == 0, FP8=fp8 is not None, TILE_IN_GROUP=tile_in_group,
        NATIVE_FP8=fp8 is not None and fp8.native,
        BLOCK_M=tile.block_m, BLOCK_N=tile.block_n, BLOCK_K=tile.block_k,
        GROUP_M=tile.group_m, DOT_PREC="ieee" if a.dtype == torch.float32 else "tf32",
        num_warps=tile.num_warps, num_stages=tile.num_stages, **LAUNCH_OPTIONS,
    )


# ----------------------------------------------------------------------------- the MoE MLP


def fused_moe(
    x: torch.Tensor, w13: torch.Tensor, w2: torch.Tensor, topk_weights: torch.Tensor, topk_ids: torch.Tensor,
    fp8_scales: tuple[torch.Tensor, torch.Tensor] | None = None, fp8_groups: tuple[int, int] | None = None,
    *, tile: MoETile | None = None, native_fp8: bool | None = None,
) -> torch.Tensor:
    """A mixture-of-experts MLP, as `kernels.reference.fused_moe`: x `[T, H]`, w13 `[E, 2I, H]`
    (each expert's gate rows then up rows), w2 `[E, H, I]`, topk_weights `[T, K]` (a float
    type, used in fp32) and topk_ids `[T, K]` (int32 or int64, each in [0, E)) → `[T, H]` in
    x's dtype: out[t] = Σ_k topk_weights[t, k] · w2[e] @ (silu(w13[e, :I] @ x[t]) * (w13[e, I:] @ x[t])).

    fp8 experts: w13 and w2 float8_e4m3fn with `fp8_scales` (fp32 `[E, 2I, ceil(H / g13)]`,
    `[E, H, ceil(I / g2)]`: per row and group of input columns, the last group may be narrower)
    and `fp8_groups` (g13, g2); each weight tile is dequantized as `reference.dequantize_fp8`
    does (fp32 times its scale, rounded to x's dtype) before its dot, so memory holds only fp8.

    No host sync and no shape that depends on the routing's values: capture it in a CUDA graph
    and replay it with new inputs copied into the same tensors. Tensors may be strided views
    (no copy of the weights is made). `tile`: the grouped GEMM's tiles (default: `moe_tile`);
    `native_fp8`: convert fp8 with the hardware's instructions, or decode its bits (default:
    `triton_fp8.has_native_fp8`, from the device)."""
    num_tokens, hidden, num_experts, inter, top_k = _check(x, w13, w2, topk_weights, topk_ids, fp8_scales, fp8_groups)
    if num_tokens == 0:
        return x.new_zeros((0, hidden))
    num_pairs = num_tokens * top_k
    fp8_13 = fp8_2 = passes = None
    if fp8_scales is not None:
        native = native_fp8 if native_fp8 is not None else has_native_fp8(x.device)
        fp8_13, fp8_2 = (_Fp8Weight(s, g, native) for s, g in zip(fp8_scales, fp8_groups))
        passes = ((fp8_groups[0], hidden), (fp8_groups[1], inter))
    tile = tile or moe_tile(num_pairs, num_experts, x.dtype, x.device, passes)
    _check_tile(tile)
    routing = align(topk_ids, num_experts, tile.block_m)
    act = torch.empty(num_pairs, inter, dtype=x.dtype, device=x.device)
    _grouped_gemm(x, w13, act, None, routing, inter, top_k, True, tile, fp8_13)
    weighted = torch.empty(num_pairs, hidden, dtype=torch.float32, device=x.device)
    weights = topk_weights.to(torch.float32).reshape(-1).contiguous()
    _grouped_gemm(act, w2, weighted, weights, routing, hidden, 1, False, tile, fp8_2)
    return weighted.view(num_tokens, top_k, hidden).sum(1).to(x.dtype)


# ----------------------------------------------------------------------------- configuration


def moe_tile(num_pairs: int, num_experts: int, dtype: torch.dtype, device: torch.device,
             fp8: tuple[tuple[int, int], ...] | None = None) -> MoETile:
    """Tiles from the shapes alone (no GPU sweep has measured them yet). Rows per block follow
    the rows an expert gets on average (T*K / E): padding wastes up to a block per expert, so
    decode-sized batches take 16 (a block of 16 rows reads each weight tile once for up to 16
    pairs) and prefills 64. 16-bit shared memory per stage at most 24 KiB (gate_up's A tile
    and two B tiles): four stages on Hopper, three elsewhere (Ada has 99 KiB a block). fp32
    runs IEEE dots on FMA units: small tiles, two stages. The interpreter: the smallest tiles
    (16), so tests cross many tiles, and groups of 2 row blocks to exercise the walk.

    `fp8`: fp8 experts' (group size, depth) for each pass (gate_up's (g13, H), down's (g2, I)).
    The same tiles (fp8 B tiles take half the shared memory) where every K-step of both passes
    lies in one group, as block-quantized checkpoints' groups of 128 and per-channel scales
    do; otherwise as triton_fp8's `fp8_tile`: a step that divides the groups where they are
    multiples of 16, else a scale per element on small tiles (a [BLOCK_K, BLOCK_N] fp32 scale
    tile per B tile, two in gate_up: no known checkpoint takes it)."""
    tile = _moe_tile(num_pairs, num_experts, dtype, device)
    if fp8 is None or all(_tile_in_group(group, depth, tile.block_k) for group, depth in fp8):
        return tile
    narrow = [group for group, depth in fp8 if not _tile_in_group(group, depth, tile.block_k)]
    if all(group % MIN_DOT == 0 for group in narrow):
        return replace(tile, block_k=min(group & -group for group in narrow))  # the largest power of two dividing each
    return MoETile(min(tile.block_m, 32), min(tile.block_n, 32), min(tile.block_k, 32), tile.group_m, 4,
                   min(tile.num_stages, 2))


def _moe_tile(num_pairs: int, num_experts: int, dtype: torch.dtype, device: torch.device) -> MoETile:
    if device.type != "cuda":
        return MoETile(MIN_DOT, MIN_DOT, MIN_DOT, 2, 4, 1)
    per_expert = num_pairs / num_experts
    if dtype == torch.float32:
        return MoETile(16 if per_expert <= 16 else 32, 32, 32, 1 if per_expert <= 16 else 8, 4, 2)
    stages = 4 if triton_ops._device_capability(device)[0] >= 9 else 3
    if per_expert <= 16:
        return MoETile(16, 32, 128, 1, 4, stages)  # many narrow column tiles: the weights' bandwidth
    if per_expert <= 48:
        return MoETile(32, 64, 64, 4, 4, stages)
    return MoETile(64, 64, 64, 8, 4, stages)



# ----------------------------------------------------------------------------- checks


def _check(x: torch.Tensor, w13: torch.Tensor, w2: torch.Tensor, topk_weights: torch.Tensor, topk_ids: torch.Tensor,
           fp8_scales: tuple[torch.Tensor, torch.Tensor] | None = None,
           fp8_groups: tuple[int, int] | None = None) -> tuple[int, int, int, int, int]:
    """(T, H, E, I, K), or a ValueError naming what is wrong. Shapes and dtypes only: no value is read."""
    if x.dim() != 2:
        raise ValueError(f"fused_moe: x must be [T, H], got {tuple(x.shape)}")
    if w13.dim() != 3 or w2.dim() != 3:
        raise ValueError(f"fused_moe: w13 must be [E, 2I, H] and w2 [E, H, I], got {tuple(w13.shape)} and "
                         f"{tuple(w2.shape)}")
    num_tokens, hidden = x.shape
    num_experts, two_inter, _ = w13.shape
    inter = two_inter // 2
    if two_inter % 2 or w13.shape[2] != hidden or tuple(w2.shape) != (num_experts, hidden, inter) or not inter:
        raise ValueError(f"fused_moe: w13 {tuple(w13.shape)} and w2 {tuple(w2.shape)} do not fit x "
                         f"{tuple(x.shape)}: w13 must be [E, 2I, H] and w2 [E, H, I] with H = {hidden}, I >= 1")
    if topk_ids.dim() != 2 or topk_ids.shape[0] != num_tokens or topk_weights.shape != topk_ids.shape:
        raise ValueError(f"fused_moe: topk_weights {tuple(topk_weights.shape)} and topk_ids "
                         f"{tuple(topk_ids.shape)} must both be [T, K] with T = {num_tokens}")
    top_k = topk_ids.shape[1]
    if not 1 <= top_k <= num_experts:
        raise ValueError(f"fused_moe: K = {top_k} experts per token, but there are {num_experts} (1 <= K <= E)")
    if (fp8_scales is None) != (fp8_groups is None):
        raise ValueError("fused_moe: fp8 experts need both fp8_scales and fp8_groups")
    weight_dtype = x.dtype if fp8_scales is None else WEIGHT_DTYPE
    if x.dtype not in DTYPES or w13.dtype != weight_dtype or w2.dtype != weight_dtype:
        want = "with fp8_scales, w13 and w2 must be float8_e4m3fn and x" if fp8_scales is not None else \
            "x, w13 and w2 must share"
        raise ValueError(f"fused_moe: {want} one of {[str(d) for d in DTYPES]}, got {x.dtype}, {w13.dtype} and "
                         f"{w2.dtype}")
    if fp8_scales is not None:
        _check_fp8(num_experts, hidden, inter, fp8_scales, fp8_groups)
    if topk_ids.dtype not in ID_DTYPES:
        raise ValueError(f"fused_moe: topk_ids must be int32 or int64, got {topk_ids.dtype}")
    if not topk_weights.is_floating_point():
        raise ValueError(f"fused_moe: topk_weights must be a float type (used in fp32), got {topk_weights.dtype}")
    devices = {t.device for t in (x, w13, w2, topk_weights, topk_ids, *(fp8_scales or ()))}
    if len(devices) > 1:
        raise ValueError(f"fused_moe: every tensor must be on one device, got {sorted(map(str, devices))}")
    return num_tokens, hidden, num_experts, inter, top_k


def _check_fp8(num_experts: int, hidden: int, inter: int, fp8_scales: tuple[torch.Tensor, torch.Tensor],
               fp8_groups: tuple[int, int]) -> None:
    if len(fp8_scales) != 2 or len(fp8_groups) != 2:
        raise ValueError("fused_moe: fp8_scales and fp8_groups must be pairs: (w13's, w2's)")
    for name, scale, group, rows, cols in (("w13", fp8_scales[0], fp8_groups[0], 2 * inter, hidden),
                                           ("w2", fp8_scales[1], fp8_groups[1], hidden, inter)):
        if isinstance(group, bool) or not isinstance(group, int) or group < 1:
            raise ValueError(f"fused_moe: {name}'s fp8 group size must be an int >= 1, got {group!r}")
        want = (num_experts, rows, -(-cols // group))
        if tuple(scale.shape) != want or scale.dtype != torch.float32:
            raise ValueError(f"fused_moe: {name}'s fp8 scales must be fp32 [E, rows, ceil(cols / group)] = "
                             f"{list(want)}, got {tuple(scale.shape)} {scale.dtype}")


def _check_tile(tile: MoETile) -> None:
    blocks = (tile.block_m, tile.block_n, tile.block_k)
    if any(b < MIN_DOT or b & (b - 1) for b in blocks) or tile.group_m < 1:
        raise ValueError(f"fused_moe: tile blocks must be powers of two >= {MIN_DOT} and group_m >= 1, got {tile}")
