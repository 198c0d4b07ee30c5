"""kernels/triton_moe.py (the graph-safe Triton mixture-of-experts MLP) against its torch
reference, kernels.reference.fused_moe, run in fp32 on the same rounded inputs.

Without CUDA the kernel runs in Triton's interpreter (TRITON_INTERPRET, set before any
kernel module is imported; the module itself is imported lazily by a fixture), at tiny shapes
in fp32/fp16 with the smallest tiles (16), so a few tokens already span several row blocks,
column tiles and reduction steps; H and I that are not multiples of 16 exercise every mask.
fp8 experts (float8_e4m3fn codes with fp32 scales per row and group, quantized as FP8
checkpoints are) run against the reference over the same dequantized weights, with groups of
a whole row, groups of 16 that a K-step fits (the last one narrower), groups that split the
steps (a scale per element), both fp8 conversions (the hardware's, and the bit decoding an
A100 takes), and a case that shows each pass rounds its dequantized weight to x's dtype.
The `gpu` class compiles for real: bf16/fp16 at Qwen3-30B-A3B's and Mixtral-8x7B's expert
layouts (and Qwen3-30B-A3B-FP8's fp8 experts, groups of 128), and CUDA-graph captures
replayed with new routing (capture fails on a host sync).

Tolerances: fp32 1e-5; fp16 3e-3 and bf16 2e-2 (abs and rel): the kernel rounds the
activation (silu(gate) * up) to the input dtype, as the reference does, and the output once.
"""

from __future__ import annotations

import importlib
from types import ModuleType

import pytest
import torch

# Sets TRITON_INTERPRET (without CUDA) before any kernel module is imported; one device and
# one set of tolerances for every Triton kernel.
from tests.test_kernels_triton import CUDA, DEVICE, TOL  # noqa: I001

from kernels import reference
from tests.test_kernels_fp8 import FP8, quantize


@pytest.fixture(scope="module")
def moe() -> ModuleType:
    return importlib.import_module("kernels.triton_moe")


# ----------------------------------------------------------------------------- helpers


def routing(num_experts: int, top_k: int, tokens: int, id_dtype: torch.dtype = torch.int32, seed: int = 0,
            experts: list[int] | None = None, device: torch.device = DEVICE) -> tuple[torch.Tensor, torch.Tensor]:
    """topk_weights (softmax, fp32) and topk_ids: each token's `top_k` distinct experts drawn
    from `experts` (default: all)."""
    gen = torch.Generator(device=device).manual_seed(seed)
    pool = torch.tensor(experts if experts is not None else range(num_experts), device=device)
    picks = torch.rand(tokens, len(pool), generator=gen, device=device).topk(top_k, dim=1).indices
    return torch.rand(tokens, top_k, generator=gen, device=device).softmax(-1), pool[picks].to(id_dtype)


def moe_inputs(num_experts: int, top_k: int, tokens: int, hidden: int, inter: int, dtype: torch.dtype,
               id_dtype: torch.dtype = torch.int32, seed: int = 0, experts: list[int] | None = None,
               device: torch.device = DEVICE) -> tuple[torch.Tensor, ...]:
    """x, w13, w2 (scaled so every value stays O(1)) and a `routing`."""
    gen = torch.Generator(device=device).manual_seed(seed)

    def randn(*shape: int, scale: float = 1.0) -> torch.Tensor:
        return (torch.randn(shape, generator=gen, device=device) * scale).to(dtype)

    x = randn(tokens, hidden)
    w13 = randn(num_experts, 2 * inter, hidden, scale=hidden**-0.5)
    w2 = randn(num_experts, hidden, inter, scale=inter**-0.5)
    return x, w13, w2, *routing(num_experts, top_k, tokens, id_dtype, seed + 1, experts, device)


def expected(x: torch.Tensor, w13: torch.Tensor, w2: torch.Tensor, topk_weights: torch.Tensor,
             topk_ids: torch.Tensor) -> torch.Tensor:
    """The reference, in fp32 on the same rounded inputs."""
    return reference.fused_moe(x.float(), w13.float(), w2.float(), topk_weights, topk_ids)


def check_against_reference(moe: ModuleType, *inputs: torch.Tensor, **kwargs: object) -> None:
    out = moe.fused_moe(*inputs, **kwargs)
    x = inputs[0]
    assert out.shape == x.shape and out.dtype == x.dtype and out.device == x.device
    torch.testing.assert_close(out.float(), expected(*inputs), **TOL[x.dtype])


# ----------------------------------------------------------------------------- against the reference


@pytest.mark.parametrize("num_experts,top_k,tokens,hidden,inter,dtype,id_dtype", [
    (1, 1, 7, 40, 24, torch.float32, torch.int64),     # one expert: every token's
    (3, 3, 2, 32, 16, torch.float32, torch.int32),     # K = E; H and I whole tiles (no k mask)
    (3, 2, 33, 40, 24, torch.float16, torch.int32),
    (8, 1, 33, 48, 40, torch.float32, torch.int32),
    (8, 2, 7, 40, 24, torch.float16, torch.int64),
    (8, 4, 1, 40, 24, torch.float32, torch.int64),     # one token: mostly padding
    (8, 8, 2, 24, 40, torch.float32, torch.int32),     # K = E = 8, H < I
    (16, 4, 33, 40, 24, torch.float16, torch.int32),   # many blocks, some experts without rows
    (16, 2, 2, 64, 32, torch.float32, torch.int64),
])
def test_matches_reference(moe: ModuleType, num_experts: int, top_k: int, tokens: int, hidden: int, inter: int,
                           dtype: torch.dtype, id_dtype: torch.dtype) -> None:
    inputs = moe_inputs(num_experts, top_k, tokens, hidden, inter, dtype, id_dtype, seed=tokens + num_experts)
    check_against_reference(moe, *inputs)


@pytest.mark.parametrize("dtype", [torch.float32, torch.float16])
def test_every_token_to_the_same_experts(moe: ModuleType, dtype: torch.dtype) -> None:
    """All rows in one expert (three row blocks, the last padded), the other experts empty."""
    x, w13, w2, weights, _ = moe_inputs(8, 1, 33, 40, 24, dtype)
    check_against_reference(moe, x, w13, w2, weights, torch.full((33, 1), 5, dtype=torch.int32, device=DEVICE))
    x, w13, w2, weights, ids = moe_inputs(8, 2, 33, 40, 24, dtype, experts=[6, 2], seed=1)
    assert set(ids.flatten().tolist()) == {2, 6}
    check_against_reference(moe, x, w13, w2, weights, ids)


def test_experts_without_tokens(moe: ModuleType) -> None:
    """Three of sixteen experts routed to; the others' weights NaN, so reading them would show."""
    x, w13, w2, weights, ids = moe_inputs(16, 2, 9, 40, 24, torch.float32, experts=[1, 4, 9])
    idle = [e for e in range(16) if e not in (1, 4, 9)]
    w13[idle] = float("nan")
    w2[idle] = float("nan")
    check_against_reference(moe, x, w13, w2, weights, ids)


def test_strided_views(moe: ModuleType) -> None:
    """x a slice of a wider activation, w13 stored transposed ([E, H, 2I] memory), w2 every
    other expert of a larger stack, the routing columns of wider tensors: strides, no copies."""
    num_experts, top_k, tokens, hidden, inter = 4, 2, 9, 40, 24
    x, w13, w2, weights, ids = moe_inputs(num_experts, top_k, tokens, hidden, inter, torch.float32)
    wide = torch.zeros(tokens, hidden + 8, device=DEVICE)
    wide[:, 3:3 + hidden] = x
    w13_t = w13.transpose(1, 2).contiguous().transpose(1, 2)
    stack = torch.zeros(2 * num_experts, hidden, inter, device=DEVICE)
    stack[::2] = w2
    routing = torch.zeros(tokens, 2 * top_k, dtype=torch.int64, device=DEVICE)
    routing[:, ::2] = ids
    spread = torch.zeros(tokens, 2 * top_k, device=DEVICE)
    spread[:, 1::2] = weights
    views = (wide[:, 3:3 + hidden], w13_t, stack[::2], spread[:, 1::2], routing[:, ::2])
    assert not any(v.is_contiguous() for v in views)
    out = moe.fused_moe(*views)
    torch.testing.assert_close(out, expected(x, w13, w2, weights, ids), **TOL[torch.float32])


@pytest.mark.parametrize("tile", [(32, 16, 32, 3, 4, 1), (16, 32, 16, 1, 4, 1)])
def test_other_tiles(moe: ModuleType, tile: tuple[int, ...]) -> None:
    """Wider row blocks (more padding) walked in groups of 3 across the columns; a column tile
    wider than I; a reduction step wider than H."""
    inputs = moe_inputs(8, 2, 33, 40, 24, torch.float32, seed=3)
    check_against_reference(moe, *inputs, tile=moe.MoETile(*tile))


def test_no_tokens(moe: ModuleType) -> None:
    x, w13, w2, weights, ids = moe_inputs(4, 2, 0, 40, 24, torch.float16)
    out = moe.fused_moe(x, w13, w2, weights, ids)
    assert out.shape == (0, 40) and out.dtype == torch.float16


def test_weights_in_another_float_type_are_used_in_fp32(moe: ModuleType) -> None:
    x, w13, w2, weights, ids = moe_inputs(4, 2, 5, 40, 24, torch.float16)
    out = moe.fused_moe(x, w13, w2, weights.half(), ids)
    torch.testing.assert_close(out.float(), expected(x, w13, w2, weights.half().float(), ids), **TOL[torch.float16])


# ----------------------------------------------------------------------------- the align step


def test_align_groups_pairs_by_expert_in_whole_blocks(moe: ModuleType) -> None:
    """Every pair once, in its expert's run, tokens in order; runs padded to whole blocks with
    the sentinel; each block one expert's and holding at least one pair; the device count of
    padded rows and the static bound on it."""
    gen = torch.Generator().manual_seed(0)
    for trial in range(60):
        tokens, num_experts = int(torch.randint(1, 40, (1,), generator=gen)), int(torch.randint(1, 20, (1,), generator=gen))
        top_k = int(torch.randint(1, num_experts + 1, (1,), generator=gen))
        block_m = [16, 32, 64][trial % 3]
        skew = torch.rand(num_experts, generator=gen) ** 4  # some experts popular, some idle
        ids = torch.multinomial(skew.expand(tokens, -1) + 1e-6, top_k, generator=gen)
        ids = ids.to(torch.int32 if trial % 2 else torch.int64)
        sorted_ids, block_experts, num_padded = moe.align(ids, num_experts, block_m)
        num_pairs = tokens * top_k
        length = moe.max_padded_rows(num_pairs, num_experts, block_m)
        assert sorted_ids.shape == (length,) and block_experts.shape == (length // block_m,)
        assert sorted_ids.dtype == block_experts.dtype == num_padded.dtype == torch.int32
        counts = torch.bincount(ids.flatten().long(), minlength=num_experts)
        used = int(((counts + block_m - 1) // block_m * block_m).sum())
        assert num_padded.tolist() == [used] and used <= length
        assert (sorted_ids[used:] == num_pairs).all()
        valid = sorted_ids[:used][sorted_ids[:used] < num_pairs]
        assert sorted(valid.tolist()) == list(range(num_pairs))
        assert ((0 <= block_experts) & (block_experts < num_experts)).all()
        flat = ids.flatten()
        for b in range(used // block_m):
            rows = sorted_ids[b * block_m:(b + 1) * block_m]
            rows = rows[rows < num_pairs]
            assert len(rows) and (flat[rows.long()] == block_experts[b]).all()
            assert rows.tolist() == sorted(rows.tolist())


def test_align_reads_nothing_on_the_host(moe: ModuleType) -> None:
    """On meta tensors (shapes, no values) the align step runs: no host read, no shape taken
    from the routing. So it is the same in a CUDA graph as eagerly."""
    ids = torch.empty(37, 4, dtype=torch.int32, device="meta")
    sorted_ids, block_experts, num_padded = moe.align(ids, 6, 16)
    length = moe.max_padded_rows(37 * 4, 6, 16)
    assert sorted_ids.shape == (length,) and block_experts.shape == (length // 16,) and num_padded.shape == (1,)
    assert moe.max_padded_rows(8, 128, 16) == 128 and moe.max_padded_rows(8 * 4096, 128, 64) == 8 * 4096 + 128 * 63


# ----------------------------------------------------------------------------- tiles


def test_tiles_by_size(moe: ModuleType, monkeypatch: pytest.MonkeyPatch) -> None:
    cuda = torch.device("cuda", 0)
    capability = [(9, 0)]
    monkeypatch.setattr(importlib.import_module("kernels.triton_ops"), "_device_capability", lambda device: capability[0])
    decode = moe.moe_tile(8, 128, torch.bfloat16, cuda)  # one Qwen3-30B-A3B token
    prefill = moe.moe_tile(4096 * 8, 128, torch.bfloat16, cuda)
    assert (decode.block_m, prefill.block_m) == (16, 64)
    assert moe.moe_tile(256 * 8, 128, torch.bfloat16, cuda).block_m == 16  # 16 rows an expert
    assert moe.moe_tile(512 * 8, 128, torch.bfloat16, cuda).block_m == 32
    assert moe.moe_tile(64 * 2, 8, torch.float16, cuda).block_m == 16 and moe.moe_tile(256 * 2, 8, torch.float16, cuda).block_m == 64
    assert decode.num_stages == prefill.num_stages == 4
    capability[0] = (8, 9)  # Ada: 99 KiB of shared memory a block
    assert moe.moe_tile(8, 128, torch.bfloat16, cuda).num_stages == 3
    assert moe.moe_tile(8, 128, torch.float32, cuda).block_n == 32
    assert moe.moe_tile(8, 128, torch.float32, torch.device("cpu")) == moe.MoETile(16, 16, 16, 2, 4, 1)


# ----------------------------------------------------------------------------- refusals


def test_bad_inputs_are_refused(moe: ModuleType) -> None:
    x, w13, w2, weights, ids = moe_inputs(4, 2, 3, 40, 24, torch.float32)
    cases = [
        ((x[0], w13, w2, weights, ids), "x must be"),
        ((x, w13[0], w2, weights, ids), "w13 must be"),
        ((x, w13[:, :-1], w2, weights, ids), "do not fit"),
        ((x, w13, w2[:, :, :-1], weights, ids), "do not fit"),
        ((x[:, :-1], w13, w2, weights, ids), "do not fit"),
        ((x, w13, w2, weights[:2], ids), r"\[T, K\]"),
        ((x, w13, w2, weights, ids[:, :1]), r"\[T, K\]"),
        ((x, w13, w2, weights[:, :0], ids[:, :0]), "1 <= K <= E"),
        ((x, w13[:1], w2[:1], weights, ids), "1 <= K <= E"),
        ((x.half(), w13, w2, weights, ids), "share one of"),
        ((x.double(), w13.double(), w2.double(), weights, ids), "share one of"),
        ((x, w13, w2, weights, ids.to(torch.int16)), "int32 or int64"),
        ((x, w13, w2, weights, ids.float()), "int32 or int64"),
        ((x, w13, w2, ids, ids), "float type"),
    ]
    for args, match in cases:
        with pytest.raises(ValueError, match=match):
            moe.fused_moe(*args)
    with pytest.raises(ValueError, match="powers of two"):
        moe.fused_moe(x, w13, w2, weights, ids, tile=moe.MoETile(24, 16, 16, 1, 4, 1))
    if CUDA:
        with pytest.raises(ValueError, match="one device"):
            moe.fused_moe(x.cpu(), w13, w2, weights, ids)


# ----------------------------------------------------------------------------- fp8 experts


def quantize_experts(weights: torch.Tensor, group_size: int) -> tuple[torch.Tensor, torch.Tensor]:
    """A stack `[E, rows, cols]` (fp32) as an FP8 checkpoint holds it: e4m3 codes and fp32
    scales `[E, rows, ceil(cols / group_size)]`, each row's group scaled to e4m3's range."""
    experts, rows, cols = weights.shape
    codes, scale = quantize(weights.reshape(experts * rows, cols), group_size)
    return codes.view(experts, rows, cols), scale.view(experts, rows, -1)


def moe_fp8_inputs(num_experts: int, top_k: int, tokens: int, hidden: int, inter: int, dtype: torch.dtype,
                   groups: tuple[int, int], seed: int = 0, experts: list[int] | None = None,
                   device: torch.device = DEVICE) -> tuple[tuple[torch.Tensor, ...], dict[str, object]]:
    """`moe_inputs` with fp8 experts: (x, w13, w2, topk_weights, topk_ids) and fused_moe's fp8
    keywords (fp8_scales, fp8_groups)."""
    x, w13, w2, weights, ids = moe_inputs(num_experts, top_k, tokens, hidden, inter, torch.float32, seed=seed,
                                          experts=experts, device=device)
    w13, scale13 = quantize_experts(w13, groups[0])
    w2, scale2 = quantize_experts(w2, groups[1])
    return (x.to(dtype), w13, w2, weights, ids), {"fp8_scales": (scale13, scale2), "fp8_groups": groups}


def expected_fp8(x: torch.Tensor, w13: torch.Tensor, w2: torch.Tensor, topk_weights: torch.Tensor,
                 topk_ids: torch.Tensor, fp8_scales: tuple[torch.Tensor, torch.Tensor],
                 fp8_groups: tuple[int, int]) -> torch.Tensor:
    """The reference in fp32 over the weights it dequantizes (rounded to x's dtype, as the
    kernel's tiles are): for fp32 x, reference.fused_moe's own fp8 path."""
    w13 = reference.dequantize_fp8(w13, fp8_scales[0], fp8_groups[0], x.dtype)
    w2 = reference.dequantize_fp8(w2, fp8_scales[1], fp8_groups[1], x.dtype)
    return reference.fused_moe(x.float(), w13.float(), w2.float(), topk_weights, topk_ids)


def check_fp8(moe: ModuleType, inputs: tuple[torch.Tensor, ...], fp8: dict[str, object], **kwargs: object) -> None:
    out = moe.fused_moe(*inputs, **fp8, **kwargs)
    x = inputs[0]
    assert out.shape == x.shape and out.dtype == x.dtype and out.device == x.device
    torch.testing.assert_close(out.float(), expected_fp8(*inputs, **fp8), **TOL[x.dtype])


@pytest.mark.parametrize("num_experts,top_k,tokens,hidden,inter,dtype,groups,native", [
    (8, 2, 33, 40, 24, torch.float32, (40, 24), True),   # a group per row (per-channel)
    (4, 2, 33, 40, 24, torch.float16, (40, 24), True),   # two row blocks an expert, per-channel
    (4, 2, 33, 40, 24, torch.float32, (16, 16), True),   # groups of 16, the last 8 wide
    (8, 2, 33, 40, 24, torch.float16, (16, 16), True),
    (3, 2, 20, 64, 32, torch.float16, (32, 16), True),   # whole groups and steps (no K mask)
    (8, 2, 17, 40, 24, torch.float32, (7, 5), True),     # groups that split the steps: a scale per element
    (4, 2, 33, 40, 24, torch.float16, (24, 32), True),   # gate_up's groups straddle steps; down's wider than I
    (4, 2, 33, 40, 24, torch.float16, (16, 16), False),  # the bit decoding (sm_80)
    (8, 2, 17, 40, 24, torch.float32, (7, 40), False),   # the bit decoding, a scale per element
])
def test_fp8_experts_match_reference(moe: ModuleType, num_experts: int, top_k: int, tokens: int, hidden: int,
                                     inter: int, dtype: torch.dtype, groups: tuple[int, int], native: bool) -> None:
    inputs, fp8 = moe_fp8_inputs(num_experts, top_k, tokens, hidden, inter, dtype, groups, seed=tokens + num_experts)
    check_fp8(moe, inputs, fp8, native_fp8=native)


@pytest.mark.parametrize("dtype", [torch.float32, torch.float16])
def test_fp8_experts_match_the_reference_call(moe: ModuleType, dtype: torch.dtype) -> None:
    """Against reference.fused_moe called as the engine calls it (at x's dtype, fp8 keywords)."""
    inputs, fp8 = moe_fp8_inputs(4, 2, 33, 40, 24, dtype, (16, 16), seed=4)
    want = reference.fused_moe(*inputs, **fp8)
    torch.testing.assert_close(moe.fused_moe(*inputs, **fp8), want, **TOL[dtype])


def rounding_cases(dtype: torch.dtype) -> list[tuple[tuple[torch.Tensor, ...], dict[str, object], float]]:
    """One expert, one token x = [1, -1], weights of fp8 1s whose scale is 1 + 3/4 ulp of x's
    dtype beside one of 1 (groups of 1): rounded to x's dtype first (the contract), their
    difference is 1 ulp; kept in fp32 it is 3/4 of one, and the output a quarter off.
    gate_up: gate = 1 ulp, up = 1, down's weights 1024: out ≈ 1024 · silu(ulp) ≈ 1/2 (3/8).
    down: gate = 16, up = 1 (act = 16 exactly), down's row [1 + 3/4 ulp, -1]: out = 16 ulp.
    Each case: inputs, fp8 keywords, the output were the weight not rounded."""
    ulp = torch.finfo(dtype).eps
    x = torch.tensor([[1.0, -1.0]], device=DEVICE).to(dtype)
    route = (torch.ones(1, 1, device=DEVICE), torch.zeros(1, 1, dtype=torch.int32, device=DEVICE))

    def stack(rows: list[list[float]]) -> torch.Tensor:
        return torch.tensor([rows], dtype=torch.float32, device=DEVICE)

    gate_up = ((x, stack([[1, 1], [2, 1]]).to(FP8), stack([[1], [1]]).to(FP8), *route),
               {"fp8_scales": (stack([[1 + 0.75 * ulp, 1], [1, 1]]), stack([[1024], [1024]])), "fp8_groups": (1, 1)},
               1024 * 0.75 * ulp / 2)
    down = ((x, stack([[16, 0], [16, 0], [1, 0], [1, 0]]).to(FP8), stack([[1, -1], [1, -1]]).to(FP8), *route),
            {"fp8_scales": (torch.ones(1, 4, 1, device=DEVICE), stack([[1 + 0.75 * ulp, 1], [1 + 0.75 * ulp, 1]])),
             "fp8_groups": (2, 1)},
            16 * 0.75 * ulp)
    return [gate_up, down]


@pytest.mark.parametrize("case", ["gate_up", "down"])
def test_fp8_weights_rounded_to_x_dtype_before_the_dot(moe: ModuleType, case: str) -> None:
    inputs, fp8, unrounded = rounding_cases(torch.float16)[["gate_up", "down"].index(case)]
    want = reference.fused_moe(*inputs, **fp8)
    assert abs(float(want[0, 0]) - unrounded) > 0.2 * unrounded  # the case tells the two apart
    torch.testing.assert_close(moe.fused_moe(*inputs, **fp8), want, rtol=1e-3, atol=0)


def test_fp8_experts_without_tokens(moe: ModuleType) -> None:
    """Three of sixteen experts routed to; the others' codes and scales NaN, so reading them
    (a scale of the wrong expert, say) would show."""
    inputs, fp8 = moe_fp8_inputs(16, 2, 9, 40, 24, torch.float32, (16, 16), experts=[1, 4, 9])
    idle = [e for e in range(16) if e not in (1, 4, 9)]
    for codes, scale in zip(inputs[1:3], fp8["fp8_scales"]):
        codes[idle] = float("nan")
        scale[idle] = float("nan")
    check_fp8(moe, inputs, fp8)


def test_fp8_strided_views(moe: ModuleType) -> None:
    """w13's codes stored transposed ([E, H, 2I] memory), w2's every other expert of a larger
    stack; the scales views into larger tensors whose other entries are NaN, so a scale read
    past its row, group or expert would show: strides, no copies."""
    (x, w13, w2, weights, ids), fp8 = moe_fp8_inputs(4, 2, 9, 40, 24, torch.float32, (16, 16))
    scale13, scale2 = fp8["fp8_scales"]
    w13_t = w13.transpose(1, 2).contiguous().transpose(1, 2)
    stack = torch.zeros(8, 40, 24, device=DEVICE).to(FP8)
    stack[::2] = w2
    big13 = torch.full((5, 48 + 3, 3 + 2), float("nan"), device=DEVICE)
    big13[1:, 2:50, 1:4] = scale13
    big2 = torch.full((8, 40, 2 + 1), float("nan"), device=DEVICE)
    big2[::2, :, :2] = scale2
    views = (w13_t, stack[::2], big13[1:, 2:50, 1:4], big2[::2, :, :2])
    assert not any(v.is_contiguous() for v in views)
    out = moe.fused_moe(x, *views[:2], weights, ids, fp8_scales=views[2:], fp8_groups=(16, 16))
    torch.testing.assert_close(out, expected_fp8(x, w13, w2, weights, ids, **fp8), **TOL[torch.float32])


@pytest.mark.parametrize("tile,groups", [
    ((32, 16, 32, 3, 4, 1), (16, 16)),   # two groups in every step: a scale per element; walked in groups of 3
    ((16, 32, 64, 1, 4, 1), (40, 24)),   # a step wider than H and I, per-channel
    ((16, 16, 16, 2, 4, 1), (48, 32)),   # groups wider than H and I
])
def test_fp8_other_tiles(moe: ModuleType, tile: tuple[int, ...], groups: tuple[int, int]) -> None:
    inputs, fp8 = moe_fp8_inputs(4, 2, 33, 40, 24, torch.float32, groups, seed=3)
    check_fp8(moe, inputs, fp8, tile=moe.MoETile(*tile))


def test_fp8_tiles(moe: ModuleType, monkeypatch: pytest.MonkeyPatch) -> None:
    """Block-quantized (groups of 128) and per-channel experts keep the 16-bit tiles; groups
    of a multiple of 16 take a step that divides both passes'; the others small tiles."""
    cuda = torch.device("cuda", 0)
    monkeypatch.setattr(importlib.import_module("kernels.triton_ops"), "_device_capability", lambda device: (9, 0))
    hidden, inter = 2048, 768

    def tile(pairs: int, groups: tuple[int, int], dtype: torch.dtype = torch.bfloat16) -> object:
        return moe.moe_tile(pairs, 128, dtype, cuda, ((groups[0], hidden), (groups[1], inter)))

    for pairs in (8, 512 * 8, 4096 * 8):
        plain = moe.moe_tile(pairs, 128, torch.bfloat16, cuda)
        assert tile(pairs, (128, 128)) == tile(pairs, (hidden, inter)) == plain
        assert tile(pairs, (128, 128), torch.float32) == moe.moe_tile(pairs, 128, torch.float32, cuda)
    assert tile(8, (128, 96)).block_k == 32 and tile(8, (48, 128)).block_k == 16  # the smaller of the two
    assert tile(8, (4096, 64)).block_k == 64  # a group wider than H takes any step
    assert tile(8, (100, 128)) == moe.MoETile(16, 32, 32, 1, 4, 2)
    assert tile(4096 * 8, (128, 100)) == moe.MoETile(32, 32, 32, 8, 4, 2)
    assert moe.moe_tile(8, 128, torch.float32, torch.device("cpu"), ((7, 40), (5, 24))) == moe.MoETile(16, 16, 16, 2, 4, 1)


def test_fp8_bad_inputs_are_refused(moe: ModuleType) -> None:
    (x, w13, w2, weights, ids), fp8 = moe_fp8_inputs(4, 2, 3, 40, 24, torch.float32, (16, 16))
    scale13, scale2 = fp8["fp8_scales"]
    cases = [
        ({"fp8_scales": (scale13, scale2)}, "both"),
        ({"fp8_groups": (16, 16)}, "both"),
        ({"fp8_scales": (scale13, scale2), "fp8_groups": (16, 0)}, "group size"),
        ({"fp8_scales": (scale13, scale2), "fp8_groups": (16.0, 16)}, "group size"),
        ({"fp8_scales": (scale13, scale2), "fp8_groups": (32, 16)}, r"w13's fp8 scales must be"),
        ({"fp8_scales": (scale13, scale2[:, :-1]), "fp8_groups": (16, 16)}, r"w2's fp8 scales must be"),
        ({"fp8_scales": (scale13, scale2.half()), "fp8_groups": (16, 16)}, r"w2's fp8 scales must be"),
        ({"fp8_scales": (scale13,), "fp8_groups": (16,)}, "pairs"),
    ]
    for kwargs, match in cases:
        with pytest.raises(ValueError, match=match):
            moe.fused_moe(x, w13, w2, weights, ids, **kwargs)
    with pytest.raises(ValueError, match="float8_e4m3fn"):
        moe.fused_moe(x, w13.float(), w2, weights, ids, **fp8)
    with pytest.raises(ValueError, match="share one of"):  # fp8 experts without their scales
        moe.fused_moe(x, w13, w2, weights, ids)
    with pytest.raises(ValueError, match="float8_e4m3fn"):
        moe.fused_moe(x.double(), w13, w2, weights, ids, **fp8)


# ----------------------------------------------------------------------------- GPU only

# Expert layouts: (experts, experts per token, hidden, intermediate)
LAYOUTS = {"qwen3-30b-a3b": (128, 8, 2048, 768), "mixtral-8x7b": (8, 2, 4096, 14336)}


@pytest.mark.gpu
@pytest.mark.skipif(not CUDA, reason="needs CUDA")
class TestCompiledOnGPU:
    """Compiled for real: real expert layouts in bf16/fp16 at decode to prefill sizes (every
    row-block size the tiles pick), the odd shapes with GPU tiles, and a CUDA graph."""

    @pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
    @pytest.mark.parametrize("layout", list(LAYOUTS))
    def test_real_layouts(self, moe, layout, dtype):
        num_experts, top_k, hidden, inter = LAYOUTS[layout]
        x, w13, w2, _, _ = moe_inputs(num_experts, top_k, 1024, hidden, inter, dtype)
        w13_f, w2_f = w13.float(), w2.float()
        blocks = set()
        for tokens in (1, 3, 16, 128, 512, 1024):
            weights, ids = routing(num_experts, top_k, tokens, seed=tokens)
            out = moe.fused_moe(x[:tokens], w13, w2, weights, ids)
            want = reference.fused_moe(x[:tokens].float(), w13_f, w2_f, weights, ids)
            torch.testing.assert_close(out.float(), want, **TOL[dtype], msg=lambda m, t=tokens: f"T={t}: {m}")
            blocks.add(moe.moe_tile(tokens * top_k, num_experts, dtype, x.device).block_m)
        assert blocks == {16, 32, 64} or layout == "mixtral-8x7b"

    @pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16, torch.float32])
    @pytest.mark.parametrize("num_experts,top_k,tokens,hidden,inter", [
        (8, 2, 33, 40, 24), (16, 4, 70, 200, 136), (3, 3, 5, 32, 16), (8, 1, 300, 72, 40)])
    def test_odd_shapes(self, moe, dtype, num_experts, top_k, tokens, hidden, inter):
        inputs = moe_inputs(num_experts, top_k, tokens, hidden, inter, dtype, seed=tokens)
        check_against_reference(moe, *inputs)

    @pytest.mark.parametrize("fp8_experts", [False, True], ids=["bf16", "fp8"])
    @pytest.mark.parametrize("tokens", [4, 200])
    def test_cuda_graph_replays_new_routing_without_host_sync(self, moe, tokens, fp8_experts):
        """Captured once, replayed with new inputs and routing (random, all on one expert, half
        the experts) copied into the static tensors: equal to the eager call each time, and with
        fp8 experts (Qwen3-30B-A3B-FP8's) to the reference. The eager call runs with CUDA's sync
        debug mode erroring on any host synchronisation."""
        num_experts, top_k, hidden, inter = LAYOUTS["qwen3-30b-a3b"]
        if fp8_experts:
            inputs, fp8 = moe_fp8_inputs(num_experts, top_k, tokens, hidden, inter, torch.bfloat16, (128, 128))
        else:
            inputs, fp8 = moe_inputs(num_experts, top_k, tokens, hidden, inter, torch.bfloat16), {}
        x, w13, w2, weights, ids = static = list(inputs)
        moe.fused_moe(*static, **fp8)  # compiles outside the capture
        torch.cuda.set_sync_debug_mode("error")
        try:
            moe.fused_moe(*static, **fp8)
        finally:
            torch.cuda.set_sync_debug_mode("default")
        graph = torch.cuda.CUDAGraph()
        with torch.cuda.graph(graph):
            out = moe.fused_moe(*static, **fp8)
        routings = [routing(num_experts, top_k, tokens, seed=1),
                    (weights, torch.arange(top_k, device=DEVICE).expand(tokens, -1).int()),
                    routing(num_experts, top_k, tokens, seed=2, experts=list(range(0, num_experts, 2)))]
        for i, (new_weights, new_ids) in enumerate(routings):
            x.copy_(torch.randn_like(x))
            weights.copy_(new_weights)
            ids.copy_(new_ids)
            graph.replay()
            eager = moe.fused_moe(*static, **fp8)
            assert torch.equal(out, eager), i
            if fp8_experts:
                torch.testing.assert_close(out.float(), expected_fp8(*static, **fp8), **TOL[torch.bfloat16])
            torch.testing.assert_close(out.float(), expected(*static), **TOL[torch.bfloat16])

    @pytest.mark.parametrize("native", [True, False])
    def test_fp8_real_layout(self, moe, native):
        """Qwen3-30B-A3B-FP8's experts (groups of 128) in bf16 at decode to prefill sizes, the
        hardware's fp8 conversion at every size, the bit decoding (sm_80's) at two."""
        num_experts, top_k, hidden, inter = LAYOUTS["qwen3-30b-a3b"]
        (x, w13, w2, _, _), fp8 = moe_fp8_inputs(num_experts, top_k, 1024, hidden, inter, torch.bfloat16, (128, 128))
        w13_f, w2_f = (reference.dequantize_fp8(w, s, 128, torch.bfloat16).float()
                       for w, s in zip((w13, w2), fp8["fp8_scales"]))
        blocks = set()
        for tokens in (1, 3, 16, 128, 512, 1024) if native else (3, 512):
            weights, ids = routing(num_experts, top_k, tokens, seed=tokens)
            out = moe.fused_moe(x[:tokens], w13, w2, weights, ids, **fp8, native_fp8=native)
            want = reference.fused_moe(x[:tokens].float(), w13_f, w2_f, weights, ids)
            torch.testing.assert_close(out.float(), want, **TOL[torch.bfloat16], msg=lambda m, t=tokens: f"T={t}: {m}")
            blocks.add(moe.moe_tile(tokens * top_k, num_experts, x.dtype, x.device, ((128, hidden), (128, inter))).block_m)
        assert blocks == {16, 32, 64} or not native

    @pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16, torch.float32])
    @pytest.mark.parametrize("num_experts,top_k,tokens,hidden,inter,groups,native", [
        (8, 2, 33, 40, 24, (16, 16), True), (16, 4, 70, 200, 136, (48, 100), True), (3, 3, 5, 32, 16, (32, 16), True),
        (8, 1, 300, 72, 40, (7, 40), True), (16, 4, 70, 200, 136, (64, 136), False)])
    def test_fp8_odd_shapes(self, moe, dtype, num_experts, top_k, tokens, hidden, inter, groups, native):
        inputs, fp8 = moe_fp8_inputs(num_experts, top_k, tokens, hidden, inter, dtype, groups, seed=tokens)
        check_fp8(moe, inputs, fp8, native_fp8=native)

    @pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
    def test_fp8_weights_rounded_to_x_dtype_before_the_dot(self, moe, dtype):
        for inputs, fp8, unrounded in rounding_cases(dtype):
            want = reference.fused_moe(*inputs, **fp8)
            assert abs(float(want[0, 0]) - unrounded) > 0.2 * unrounded
            torch.testing.assert_close(moe.fused_moe(*inputs, **fp8), want, rtol=1e-2, atol=0)

