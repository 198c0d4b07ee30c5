"""kernels/triton_fp8.py (the Triton projection over an fp8 weight) against its torch reference,
kernels.reference.fp8_linear, on the same inputs.

Without CUDA the kernel runs in Triton's interpreter (TRITON_INTERPRET, set before any kernel
module is imported; the module itself is imported lazily by a fixture), at tiny shapes in
fp32/fp16 with the smallest tiles (16), so a few rows already span several row blocks, column
tiles and K-steps; N and K that are not multiples of 16, and K not a multiple of the group
size (a narrower last group), exercise every mask. Group sizes that are multiples of 16 take
the one-scale-per-column path, the others (7, 24, 100, ...) the per-element scales. Both fp8
conversions run here: the hardware's (sm_89 on) and the bit decoding an A100 takes.
The `gpu` class compiles for real: bf16 at Qwen3-8B's and Llama-3-8B's projections from
decode to prefill sizes, the odd shapes with GPU tiles, and one CUDA-graph capture replayed
with new inputs (capture fails on a host sync).

Weights are quantized as FP8 checkpoints are (each row's group scaled so its largest magnitude
is e4m3's 448), so the codes span fp8's range, subnormals included. Tolerances: TOL of
test_kernels_triton (fp32 1e-5, fp16 3e-3, bf16 2e-2, abs and rel): the kernel rounds the
dequantized weight to x's dtype where the reference does, and the output once.
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

FP8 = torch.float8_e4m3fn
FP8_MAX = 448.0


@pytest.fixture(scope="module")
def fp8() -> ModuleType:
    return importlib.import_module("kernels.triton_fp8")


# ----------------------------------------------------------------------------- helpers


def quantize(weight: torch.Tensor, group_size: int) -> tuple[torch.Tensor, torch.Tensor]:
    """`weight [N, K]` (fp32) as an FP8 checkpoint holds it: e4m3 codes and one fp32 scale per
    row and group of `group_size` columns (the last group may be narrower), the group's largest
    magnitude / 448."""
    rows, depth = weight.shape
    groups = -(-depth // group_size)
    padded = torch.zeros(rows, groups * group_size, device=weight.device)
    padded[:, :depth] = weight
    grouped = padded.view(rows, groups, group_size)
    scale = grouped.abs().amax(-1).clamp(min=1e-12) / FP8_MAX
    codes = (grouped / scale.unsqueeze(-1)).view(rows, -1)[:, :depth].to(FP8)
    return codes, scale


def fp8_inputs(rows: int, cols: int, depth: int, group_size: int, dtype: torch.dtype, bias: bool = False,
               seed: int = 0, device: torch.device = DEVICE) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor,
                                                                      torch.Tensor | None]:
    """x `[rows, depth]`, an fp8 weight `[cols, depth]` with its scales (outputs stay O(1)) and a
    bias (or None)."""
    gen = torch.Generator(device=device).manual_seed(seed)
    x = torch.randn(rows, depth, generator=gen, device=device).to(dtype)
    weight, scale = quantize(torch.randn(cols, depth, generator=gen, device=device) * depth**-0.5, group_size)
    return x, weight, scale, torch.randn(cols, generator=gen, device=device).to(dtype) if bias else None


def check_against_reference(fp8: ModuleType, x: torch.Tensor, weight: torch.Tensor, scale: torch.Tensor,
                            group_size: int, bias: torch.Tensor | None = None, **kwargs: object) -> torch.Tensor:
    out = fp8.fp8_linear(x, weight, scale, group_size, bias, **kwargs)
    assert out.shape == (*x.shape[:-1], weight.shape[0]) and out.dtype == x.dtype and out.device == x.device
    want = reference.fp8_linear(x, weight, scale, group_size, bias)
    torch.testing.assert_close(out.float(), want.float(), **TOL[x.dtype])
    return out


def every_code(device: torch.device = DEVICE) -> torch.Tensor:
    """All 256 e4m3fn bit patterns as a `[16, 16]` weight, the two NaNs (S.1111.111) replaced by
    ±0 (checkpoints hold no NaN; the bit decoding reads them as ±480)."""
    bits = torch.arange(256, dtype=torch.int32, device=device)
    bits = torch.where((bits & 0x7F) == 0x7F, bits & 0x80, bits)
    return bits.to(torch.uint8).view(FP8).view(16, 16)


# ----------------------------------------------------------------------------- against the reference


@pytest.mark.parametrize("rows,cols,depth,group_size,dtype,bias,native", [
    (1, 40, 72, 72, torch.float32, True, True),     # decode, per-channel (group_size = K)
    (5, 40, 72, 32, torch.float32, False, True),    # group 32: two whole groups and a narrower one (8)
    (33, 24, 40, 16, torch.float16, True, True),    # three row blocks; group 16 with a last group of 8
    (7, 48, 64, 16, torch.float32, True, True),     # N, K and the groups whole tiles (no K mask)
    (3, 40, 72, 24, torch.float16, False, True),    # group 24: steps straddle groups (per-element scales)
    (2, 20, 50, 7, torch.float32, True, True),      # group 7, ragged
    (4, 17, 40, 1, torch.float32, False, True),     # a scale for every element
    (2, 24, 40, 64, torch.float32, False, True),    # a group wider than K: one per row
    (33, 40, 72, 72, torch.float16, True, True),    # per-channel over several row blocks
    (5, 40, 72, 32, torch.float16, True, False),    # the bit decoding (sm_80), ragged groups
    (3, 40, 72, 24, torch.float32, False, False),   # the bit decoding with per-element scales
])
def test_matches_reference(fp8: ModuleType, rows: int, cols: int, depth: int, group_size: int, dtype: torch.dtype,
                           bias: bool, native: bool) -> None:
    inputs = fp8_inputs(rows, cols, depth, group_size, dtype, bias, seed=rows + depth)
    check_against_reference(fp8, *inputs[:3], group_size, inputs[3], native_fp8=native)


@pytest.mark.parametrize("native", [True, False])
def test_every_fp8_code_decodes_exactly(fp8: ModuleType, native: bool) -> None:
    """Each of e4m3fn's finite values (normals, subnormals, ±0, ±448) times a scale of 1, read
    out one element at a time through an identity x: bit-equal to torch's conversion."""
    codes = every_code()
    out = fp8.fp8_linear(torch.eye(16, device=DEVICE), codes, torch.ones(16, 1, device=DEVICE), 16,
                         native_fp8=native)
    assert torch.equal(out, codes.float().t())
    assert out.abs().max() == FP8_MAX and (out[out != 0].abs().min() == 2.0**-9)


def weight_rounding_case(dtype: torch.dtype) -> tuple[torch.Tensor, ...]:
    """x = [1, -1] over two weights of 1.0 whose scales are 1 + 3/4 ulp and 1 (group_size 1):
    rounded to x's dtype first (the contract), the first becomes 1 + 1 ulp and the output is
    exactly one ulp; a kernel that kept the fp32 product would give 3/4 of one."""
    ulp = torch.finfo(dtype).eps
    x = torch.tensor([[1.0, -1.0]], device=DEVICE).to(dtype)
    weight = torch.ones(1, 2, device=DEVICE).to(FP8)
    scale = torch.tensor([[1 + 0.75 * ulp, 1.0]], device=DEVICE)
    return x, weight, scale, torch.tensor([[ulp]], device=DEVICE).to(dtype)


def test_weight_rounded_to_x_dtype_before_the_dot(fp8: ModuleType) -> None:
    x, weight, scale, want = weight_rounding_case(torch.float16)
    assert torch.equal(reference.fp8_linear(x, weight, scale, 1), want)
    assert torch.equal(fp8.fp8_linear(x, weight, scale, 1), want)


def test_bias_in_another_dtype_is_rounded_to_x_dtype(fp8: ModuleType) -> None:
    x, weight, scale, bias = fp8_inputs(5, 40, 72, 32, torch.float16, bias=True, seed=2)
    wide_bias = bias.float() + 1e-4  # not an fp16 value: rounding it shows
    out = fp8.fp8_linear(x, weight, scale, 32, wide_bias)
    assert torch.equal(out, fp8.fp8_linear(x, weight, scale, 32, wide_bias.half()))
    torch.testing.assert_close(out, reference.fp8_linear(x, weight, scale, 32, wide_bias.half()), **TOL[torch.float16])


def test_no_rows(fp8: ModuleType) -> None:
    x, weight, scale, bias = fp8_inputs(0, 40, 72, 32, torch.float16, bias=True)
    out = fp8.fp8_linear(x, weight, scale, 32, bias)
    assert out.shape == (0, 40) and out.dtype == torch.float16
    out = fp8.fp8_linear(x.view(2, 0, 72), weight, scale, 32)
    assert out.shape == (2, 0, 40) and out.dtype == torch.float16


def test_leading_dims(fp8: ModuleType) -> None:
    """x `[B, S, K]` (rows of several tiles) and a single vector `[K]`, as F.linear takes them."""
    x, weight, scale, bias = fp8_inputs(2 * 9, 40, 72, 32, torch.float32, bias=True, seed=5)
    out = check_against_reference(fp8, x.view(2, 9, 72), weight, scale, 32, bias)
    assert out.shape == (2, 9, 40)
    assert check_against_reference(fp8, x[3], weight, scale, 32, bias).shape == (40,)


def test_strided_views(fp8: ModuleType) -> None:
    """x a column slice of a wider activation (read in place), stored K-major, and a 3-D view
    whose rows cannot be flattened without a copy; weight, scale and bias views into larger tensors
    whose other entries are NaN, so a load past N, K or the groups would show."""
    rows, cols, depth, group_size = 9, 40, 72, 32
    x, weight, scale, bias = fp8_inputs(rows, cols, depth, group_size, torch.float32, bias=True, seed=7)
    wide = torch.full((rows, depth + 8), float("nan"), device=DEVICE)
    wide[:, 3:3 + depth] = x
    big_weight = torch.full((cols + 5, depth + 9), float("nan"), device=DEVICE).to(FP8)
    big_weight[2:2 + cols, 4:4 + depth] = weight
    big_scale = torch.full((cols + 5, scale.shape[1] + 3), float("nan"), device=DEVICE)
    big_scale[2:2 + cols, 1:1 + scale.shape[1]] = scale
    spread = torch.full((2 * cols,), float("nan"), device=DEVICE)
    spread[::2] = bias
    views = (wide[:, 3:3 + depth], big_weight[2:2 + cols, 4:4 + depth], big_scale[2:2 + cols, 1:1 + scale.shape[1]],
             spread[::2])
    assert not any(v.is_contiguous() for v in views)
    want = reference.fp8_linear(x, weight, scale, group_size, bias)
    torch.testing.assert_close(fp8.fp8_linear(*views[:3], group_size, views[3]), want, **TOL[torch.float32])
    batched = torch.zeros(3, 5, depth, device=DEVICE)  # [B, S, K] as S = 3 of 5 positions: copied
    batched[:, :3] = x.view(3, 3, depth)
    out = fp8.fp8_linear(batched[:, :3], weight, scale, group_size, bias)
    torch.testing.assert_close(out, want.view(3, 3, cols), **TOL[torch.float32])
    transposed = x.t().contiguous().t()  # K-major storage: stride (1, rows)
    torch.testing.assert_close(fp8.fp8_linear(transposed, weight, scale, group_size, bias), want,
                               **TOL[torch.float32])


@pytest.mark.parametrize("tile,group_size", [
    ((16, 16, 32, 1, 4, 1), 16),    # two groups in every step: per-element scales
    ((32, 16, 64, 3, 4, 1), 24),    # wide row blocks walked in groups of 3; a step wider than K's tail
    ((16, 32, 128, 1, 4, 1), 72),   # a step wider than K, per-channel; a column tile wider than N's tail
    ((16, 16, 16, 2, 4, 1), 100),   # a group wider than K
])
def test_other_tiles(fp8: ModuleType, tile: tuple[int, ...], group_size: int) -> None:
    x, weight, scale, bias = fp8_inputs(33, 40, 72, group_size, torch.float32, bias=True, seed=3)
    check_against_reference(fp8, x, weight, scale, group_size, bias, tile=fp8.Fp8Tile(*tile))


# ----------------------------------------------------------------------------- tiles


def test_tiles_by_size(fp8: ModuleType, monkeypatch: pytest.MonkeyPatch) -> None:
    cuda = torch.device("cuda", 0)
    capability = [(9, 0)]
    monkeypatch.setattr(importlib.import_module("kernels.triton_ops"), "_device_capability", lambda device: capability[0])

    def tile(rows: int, group_size: int = 128, depth: int = 4096, dtype: torch.dtype = torch.bfloat16):
        return fp8.fp8_tile(rows, group_size, depth, dtype, cuda)

    assert [tile(m).block_m for m in (1, 16, 17, 64, 65, 256, 257, 4096)] == [16, 16, 32, 32, 64, 64, 128, 128]
    assert tile(1) == fp8.Fp8Tile(16, 32, 128, 1, 4, 4) and tile(4096).num_warps == 8
    assert tile(1, group_size=4096) == tile(1)  # per-channel: the same tiles
    capability[0] = (8, 9)  # Ada: 99 KiB of shared memory a block
    assert tile(1).num_stages == 3 and tile(200).num_stages == 3
    assert tile(1, dtype=torch.float32).block_k == 32 and tile(1000, dtype=torch.float32).block_m == 32
    assert fp8.fp8_tile(1, 128, 4096, torch.float32, torch.device("cpu")) == fp8.Fp8Tile(16, 16, 16, 2, 4, 1)
    # Every group size that is a multiple of 16, or a group per row, keeps a K-step in one group.
    for rows in (1, 32, 200, 4096):
        for group_size in range(16, 1025, 16):
            for dtype in (torch.bfloat16, torch.float32):
                block_k = tile(rows, group_size, 4096, dtype).block_k
                assert group_size % block_k == 0 and block_k >= 16, (rows, group_size, block_k)
        assert fp8._tile_in_group(1000, 1000, tile(rows, 1000, 1000).block_k)
    assert tile(4096, 48).block_k == 16 and tile(4096, 96).block_k == 32 and tile(1, 64).block_k == 64
    # The rest take the per-element scales, on small tiles.
    assert tile(1, 100) == fp8.Fp8Tile(16, 32, 32, 1, 4, 2) and tile(4096, 100).block_m == 32
    assert tile(4096, 100, dtype=torch.float32).block_m == 16


def test_native_fp8_by_architecture(fp8: ModuleType, monkeypatch: pytest.MonkeyPatch) -> None:
    cuda = torch.device("cuda", 0)
    for capability, native in (((8, 0), False), ((8, 6), False), ((8, 9), True), ((9, 0), True), ((10, 0), True)):
        monkeypatch.setattr(importlib.import_module("kernels.triton_ops"), "_device_capability", lambda device, c=capability: c)
        assert fp8.has_native_fp8(cuda) is native, capability
    assert fp8.has_native_fp8(torch.device("cpu"))  # the interpreter


# ----------------------------------------------------------------------------- refusals


def test_bad_inputs_are_refused(fp8: ModuleType) -> None:
    x, weight, scale, bias = fp8_inputs(3, 40, 72, 32, torch.float32, bias=True)
    cases = [
        ((x, weight[0], scale, 32), "weight must be"),
        ((x[:, :-1], weight, scale, 32), "does not fit"),
        ((x[:, :0], weight[:, :0], scale[:, :0], 32), "does not fit"),
        ((x, weight, scale, 0), "group_size"),
        ((x, weight, scale, 32.0), "group_size"),
        ((x, weight, scale, True), "group_size"),
        ((x, weight, scale[:, :2], 32), r"ceil\(K / group_size\)"),
        ((x, weight, scale, 16), r"ceil\(K / group_size\)"),
        ((x, weight, scale[:-1], 32), r"ceil\(K / group_size\)"),
        ((x.double(), weight, scale, 32), "x must be one of"),
        ((x, weight.float(), scale, 32), "float8_e4m3fn"),
        ((x, weight.view(torch.float8_e5m2), scale, 32), "float8_e4m3fn"),
        ((x, weight, scale.half(), 32), "scale must be torch.float32"),
        ((x, weight, scale, 32, bias[:-1]), "bias must be"),
        ((x, weight, scale, 32, bias.double()), "bias must be"),
    ]
    for args, match in cases:
        with pytest.raises(ValueError, match=match):
            fp8.fp8_linear(*args)
    with pytest.raises(ValueError, match="powers of two"):
        fp8.fp8_linear(x, weight, scale, 32, tile=fp8.Fp8Tile(24, 16, 16, 1, 4, 1))
    if CUDA:
        with pytest.raises(ValueError, match="one device"):
            fp8.fp8_linear(x.cpu(), weight, scale, 32)


# ----------------------------------------------------------------------------- GPU only

# Projections: (input K, output N, group size)
LAYOUTS = {
    "qwen3-8b-up": (4096, 12288, 128),    # block-quantized, as Qwen3-8B-FP8 ships
    "qwen3-8b-down": (12288, 4096, 128),
    "llama-3-8b-up": (4096, 14336, 4096),  # per-channel (one scale per row)
}


@pytest.mark.gpu
@pytest.mark.skipif(not CUDA, reason="needs CUDA")
class TestCompiledOnGPU:
    """Compiled for real: real projections in bf16 at decode to prefill sizes (every tile
    bucket), the odd shapes with GPU tiles and both fp8 conversions, and a CUDA graph."""

    @pytest.mark.parametrize("layout", list(LAYOUTS))
    def test_real_layouts(self, fp8, layout):
        depth, cols, group_size = LAYOUTS[layout]
        x, weight, scale, _ = fp8_inputs(2048, cols, depth, group_size, torch.bfloat16)
        tiles = set()
        for rows in (1, 16, 256, 2048):
            out = fp8.fp8_linear(x[:rows], weight, scale, group_size)
            want = reference.fp8_linear(x[:rows], weight, scale, group_size)
            torch.testing.assert_close(out.float(), want.float(), **TOL[torch.bfloat16],
                                       msg=lambda m, r=rows: f"M={r}: {m}")
            tiles.add(fp8.fp8_tile(rows, group_size, depth, x.dtype, x.device).block_m)
        assert tiles == {16, 64, 128}

    @pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16, torch.float32])
    @pytest.mark.parametrize("rows,cols,depth,group_size,native", [
        (33, 40, 72, 32, True), (1, 50, 300, 300, True), (70, 136, 200, 48, True), (300, 200, 1000, 100, True),
        (5, 40, 72, 24, True), (300, 136, 1000, 128, False), (1, 200, 4096, 128, False)])
    def test_odd_shapes(self, fp8, dtype, rows, cols, depth, group_size, native):
        inputs = fp8_inputs(rows, cols, depth, group_size, dtype, bias=True, seed=rows)
        check_against_reference(fp8, *inputs[:3], group_size, inputs[3], native_fp8=native)

    @pytest.mark.parametrize("native", [True, False])
    @pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
    def test_every_fp8_code_decodes_exactly(self, fp8, native, dtype):
        codes = every_code()
        out = fp8.fp8_linear(torch.eye(16, device=DEVICE, dtype=dtype), codes, torch.ones(16, 1, device=DEVICE), 16,
                             native_fp8=native)
        assert torch.equal(out.float(), codes.float().t())  # every e4m3 value is a bf16 value too

    @pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
    def test_weight_rounded_to_x_dtype_before_the_dot(self, fp8, dtype):
        x, weight, scale, want = weight_rounding_case(dtype)
        assert torch.equal(reference.fp8_linear(x, weight, scale, 1), want)
        assert torch.equal(fp8.fp8_linear(x, weight, scale, 1), want)

    @pytest.mark.parametrize("rows", [1, 256])
    def test_cuda_graph_replays_new_inputs_without_host_sync(self, fp8, rows):
        """Captured once, replayed with new activations and a new weight, scales and bias copied
        into the static tensors: equal to the eager call each time, and to the reference. The
        eager call runs with CUDA's sync debug mode erroring on any host synchronisation."""
        depth, cols, group_size = LAYOUTS["qwen3-8b-up"]
        static = list(fp8_inputs(rows, cols, depth, group_size, torch.bfloat16, bias=True))
        fp8.fp8_linear(*static[:3], group_size, static[3])  # compiles outside the capture
        torch.cuda.set_sync_debug_mode("error")
        try:
            fp8.fp8_linear(*static[:3], group_size, static[3])
        finally:
            torch.cuda.set_sync_debug_mode("default")
        graph = torch.cuda.CUDAGraph()
        with torch.cuda.graph(graph):
            out = fp8.fp8_linear(*static[:3], group_size, static[3])
        x, weight, scale, bias = static
        for seed, everything in ((1, False), (2, True)):
            new = fp8_inputs(rows, cols, depth, group_size, torch.bfloat16, bias=True, seed=seed)
            x.copy_(new[0])
            if everything:  # another checkpoint's projection in the same tensors
                weight.copy_(new[1])
                scale.copy_(new[2])
                bias.copy_(new[3])
            graph.replay()
            eager = fp8.fp8_linear(x, weight, scale, group_size, bias)
            assert torch.equal(out, eager), seed
            want = reference.fp8_linear(x, weight, scale, group_size, bias)
            torch.testing.assert_close(out.float(), want.float(), **TOL[torch.bfloat16])
