"""Compile every Triton kernel for real GPU targets on a machine without a GPU.

The interpreter (TRITON_INTERPRET=1) checks what the kernels compute, but it is permissive:
it never lowers a kernel to PTX, so a layout the compiler rejects, or a tile whose shared
memory exceeds what a card gives one block, shows up only on a GPU. Here each kernel goes
through Triton's whole NVIDIA pipeline (TTIR → TTGIR → LLVM → PTX → cubin with the bundled
ptxas) for each target, launched through the real wrappers of kernels/triton_ops.py,
kernels/triton_norm_rope.py, kernels/triton_moe.py and kernels/triton_fp8.py, so the
specialisations and tiles are exactly those a CUDA run picks. How: a stand-in driver names the
target, and Triton's jit cache hook compiles each launch itself and tells Triton to skip it
(nothing runs; outputs stay unwritten).

    python -m kernels.compile_check                       # every target and case; table + exit status
    python -m kernels.compile_check --targets sm90 --resources   # + registers and spills (ptxas -v)
    python -m kernels.compile_check --quick --fp8-kv-only --targets sm80   # the fp8 KV cache's kernels alone
    python -m kernels.compile_check --quick --targets sm90 --cases "llama-3-8b bf16"   # one case

Exit status 1 when a kernel fails to compile or needs more shared memory than its target has.
Needs a Triton with the NVIDIA backend (the PyPI wheel); must run without TRITON_INTERPRET.
"""

from __future__ import annotations

import argparse
import json
import os
import re
import subprocess
import sys
import tempfile
import time
from dataclasses import asdict, dataclass, field
from typing import Any

import torch

from kernels.tuning import KernelTuning, parse_tuning

# name: (compute capability, shared memory one block may have (opt-in maximum), cards)
TARGETS = {
    "sm80": (80, 166912, "A100"),
    "sm89": (89, 101376, "L40S, RTX 4090"),
    "sm90": (90, 232448, "H100, H200"),
}
# name: (query heads, kv heads, head dim)
LAYOUTS = {
    "llama-3-8b": (32, 8, 128),
    "smollm2": (9, 3, 64),  # a group of 3: one query head per program unless packing is forced
    "d256": (8, 2, 256),
    # Head dims that are not powers of two, tiled as the next one (128) with the rest masked:
    # Phi-3-mini's layout (no GQA), and its head dim with a group of 4 (packed tiles).
    "phi-3-mini": (32, 32, 96),
    "d96": (32, 8, 96),
}
DTYPES = {"bf16": torch.bfloat16, "fp16": torch.float16, "fp32": torch.float32}
VARIANT_KEYS = ("BLOCK_M", "BLOCK_N", "BLOCK_K", "HEADS", "SPLIT", "FUSED_MERGE", "TILE_IN_BLOCK", "CACHE_TMA",
                "FRESH", "FRESH_TMA", "SKIP_LEADING", "HAS_RESIDUAL", "BLOCK", "GATED", "TILE_IN_GROUP", "HAS_BIAS",
                "FP8", "WINDOW", "SOFTCAP", "FP8_KV")
NAMED_WHEN_SET = ("FP8", "WINDOW", "SOFTCAP", "FP8_KV")  # off in most launches: in the variant only when on
# Sliding windows and softcapped scores (Mistral, Gemma 2/3) in decode, the graphed decode and
# prefill: Gemma 2's values, for these layouts (fp32's tiles are where spills show first).
WINDOWED_LAYOUTS = ("llama-3-8b", "phi-3-mini", "d96")
WINDOW_SOFTCAP = dict(sliding_window=4096, softcap=50.0)
# An fp8 KV cache (case kind "fp8-kv"): the attention kernels over e4m3 bytes, with scales, in
# the conversion each target has (sm_80 moves the bits itself). Quick: 16-bit, fp32 at a padded
# head dim (where spills show first) and unpacked GQA.
FP8_KV_SCALES = dict(k_scale=0.5, v_scale=2.0)
FP8_KV_QUICK = (("llama-3-8b", "bf16"), ("d96", "fp32"), ("smollm2", "fp16"))
# Mixture-of-experts layouts (kernels/triton_moe.py): (experts, experts per token, hidden, intermediate)
MOE_LAYOUT = (128, 8, 2048, 768)  # Qwen3-30B-A3B
MOE_ROWS_PER_EXPERT = (1, 32, 128)  # steps whose rows pick each of the MoE tiles (decode, middle, prefill)
# fp8 experts' group sizes (w13's, w2's): Qwen3-30B-A3B-FP8's blocks of 128 at every size; at the
# smallest and largest, groups that a step divides (BLOCK_K 16) and groups that split any step
# (per-element scales)
MOE_FP8_GROUPS = (128, 128)
MOE_FP8_OTHERS = ((48, 48), (100, 100))
# fp8 projections (kernels/triton_fp8.py): rows that pick each of its tiles (decode to prefill),
# and the projections launched: (input K, output N, group size, bias)
FP8_ROWS = (1, 64, 256, 2048)
FP8_BLOCKS = (4096, 12288, 128, False)  # Qwen3-8B's up projection, block-quantized (groups of 128)
FP8_OTHERS = ((2048, 2560, 2048, True),  # per-channel with a bias (Qwen2.5-3B's qkv projection)
              (1000, 512, 48, False),  # a step that divides the groups (BLOCK_K 16), a ragged K
              (1000, 512, 100, False))  # groups that split any step (per-element scales)


@dataclass(slots=True)
class Compiled:
    target: str
    case: str
    kernel: str
    num_warps: int
    num_stages: int
    variant: str = ""  # the constexprs that tell a kernel's launches apart
    shared: int | None = None
    shared_limit: int = 0
    seconds: float = 0.0
    error: str | None = None
    resources: dict[str, int] = field(default_factory=dict)

    @property
    def ok(self) -> bool:
        return self.error is None and self.shared is not None and self.shared <= self.shared_limit


class _TargetDriver:
    """What Triton's launch path asks of a driver before it compiles; nothing runs."""

    def __init__(self, target: Any, device: int) -> None:
        self.target, self.device = target, device

    def get_current_target(self) -> Any:
        return self.target

    def get_current_device(self) -> int:
        return self.device  # one per target: Triton caches its binder (and target) per device

    def get_current_stream(self, device: int | None = None) -> int:
        return 0


def _ptxas_resources(ptx: str, capability: int) -> dict[str, int]:
    from triton.backends.nvidia.compiler import get_ptxas, sm_arch_from_capability

    with tempfile.TemporaryDirectory() as tmp:
        src = os.path.join(tmp, "k.ptx")
        with open(src, "w") as f:
            f.write(ptx)
        try:
            ptxas = get_ptxas(capability)  # Triton 3.5+: per target (sm_100+ have their own)
        except TypeError:
            ptxas = get_ptxas()  # Triton 3.4
        log = subprocess.run([ptxas.path, "-v", f"--gpu-name={sm_arch_from_capability(capability)}",
                              src, "-o", os.path.join(tmp, "k.o")], capture_output=True, text=True).stderr
    found = {"registers": r"Used (\d+) registers", "spill_stores": r"(\d+) bytes spill stores",
             "spill_loads": r"(\d+) bytes spill loads"}
    return {k: int(m.group(1)) for k, pattern in found.items() if (m := re.search(pattern, log))}


def _reason(error: BaseException) -> str:
    """The innermost cause's last line: Triton wraps the failing statement's source around it."""
    while error.__cause__ is not None:
        error = error.__cause__
    lines = [line.strip() for line in str(error).splitlines() if line.strip() not in ("", "^")]
    return f"{type(error).__name__}: {lines[-1][:300] if lines else ''}"


def _cases(quick: bool, fp8_kv_only: bool = False) -> list[tuple[str, str, str]]:
    """(layout, dtype, which kernels): all = attention and the norm/rope kernels; fp8-kv = the
    attention kernels over an fp8 cache."""
    if quick:
        fp8_kv = [(layout, dtype, "fp8-kv") for layout, dtype in FP8_KV_QUICK]
        cases = [("llama-3-8b", "bf16", "all"), ("llama-3-8b", "fp32", "attention"), ("smollm2", "fp16", "attention"),
                 ("d256", "bf16", "attention"), ("d96", "bf16", "attention"), ("d96", "fp32", "attention")]
    else:
        fp8_kv = [(layout, dtype, "fp8-kv") for layout in LAYOUTS for dtype in DTYPES]
        cases = [(layout, dtype, "all") for layout in LAYOUTS for dtype in DTYPES]
    return fp8_kv if fp8_kv_only else cases + fp8_kv


def _case_name(case: tuple[str, str, str]) -> str:
    """How rows and --cases name a case: "layout dtype", and " fp8-kv" over an fp8 KV cache."""
    return f"{case[0]} {case[1]}" + (" fp8-kv" if case[2] == "fp8-kv" else "")


def _launch(case: tuple[str, str, str]) -> None:
    """Every launch a CUDA step makes for this case, through the public wrappers."""
    from kernels import reference, triton_norm_rope, triton_ops

    layout, dtype_name, which = case
    hq, hkv, d = LAYOUTS[layout]
    dtype, tokens, seqs, block_size = DTYPES[dtype_name], 64, 4, 16
    qkv = torch.zeros(tokens, (hq + 2 * hkv) * d, dtype=dtype)  # the engine's q/k/v are views of this
    q = qkv[:, : hq * d].view(tokens, hq, d)
    k = qkv[:, hq * d:(hq + hkv) * d].view(tokens, hkv, d)
    fp8_kv = which == "fp8-kv"
    cache = torch.zeros(32, block_size, hkv, d, dtype=reference.FP8_KV if fp8_kv else dtype)
    scales = FP8_KV_SCALES if fp8_kv else {}
    tables = torch.zeros(seqs, 8, dtype=torch.int32)
    lens = torch.ones(seqs, dtype=torch.int32)
    cu = torch.arange(seqs + 1, dtype=torch.int32) * (tokens // seqs)
    triton_ops.store_kv(k, k, cache, cache, torch.zeros(tokens, dtype=torch.long), **scales)
    for splits, fused in ((1, True), (8, True), (8, False)):  # one split, the merge fused or launched
        triton_ops.paged_decode_attention(q[:seqs], cache, cache, tables, lens, 0.1, num_splits=splits,
                                          fused_merge=fused, **scales)
    for pack in (True, False):
        triton_ops.paged_prefill_attention(q, cache, cache, tables, cu, lens, 0.1, pack_gqa=pack, **scales)
    # A mixed CUDA graph's attention: the leading decodes by the graphed decode kernel, the
    # prefill kernel skipping them, one output.
    triton_ops.paged_mixed_attention_graphed(q, cache, cache, tables, cu, lens, 0.1, torch.zeros(2, dtype=torch.int32),
                                             key=k, value=k, **scales)
    if layout in WINDOWED_LAYOUTS:
        triton_ops.paged_decode_attention(q[:seqs], cache, cache, tables, lens, 0.1, num_splits=8, **WINDOW_SOFTCAP,
                                          **scales)
        triton_ops.paged_mixed_attention_graphed(q, cache, cache, tables, cu, lens, 0.1,
                                                 torch.zeros(2, dtype=torch.int32), key=k, value=k, **WINDOW_SOFTCAP,
                                                 **scales)
    if fp8_kv:
        return  # an fp8 cache's new keys are read from it: no key/value rows, no tensor descriptors
    # The new tokens' K/V read from the projection's views (what a GPU's tuning may choose).
    triton_ops.paged_prefill_attention(q, cache, cache, tables, cu, lens, 0.1, key=k, value=k, new_kv="rows")
    # The tensor-descriptor experiments (TMA on Hopper), 16-bit only; their boxes are powers of
    # two, so a padded head dim reads its new K/V through pointers (above) and never takes them.
    if dtype != torch.float32 and not triton_ops._padded(d):
        triton_ops.paged_prefill_attention(q, cache, cache, tables, cu, lens, 0.1, key=k, value=k, new_kv="tma")
        tile_keys = triton_ops._prefill_config(d, dtype, torch.device("cuda"))[1]  # a tuning may set 128
        big_blocks = torch.zeros(8, max(64, tile_keys), hkv, d, dtype=dtype)  # blocks that hold whole key tiles
        triton_ops.paged_prefill_attention(q, big_blocks, big_blocks, tables, cu, lens, 0.1, cache_tma=True)
    if which == "all":
        hidden = torch.zeros(tokens, hq * d, dtype=dtype)
        triton_norm_rope.rms_norm(hidden, torch.ones(hq * d, dtype=dtype), 1e-6)
        triton_norm_rope.rms_norm(hidden, torch.ones(hq * d, dtype=dtype), 1e-6, residual=hidden)
        triton_norm_rope.rms_norm(q, torch.ones(d, dtype=dtype), 1e-6)  # qk-norm on heads
        table = torch.zeros(128, d // 2)
        triton_norm_rope.apply_rotary(q, k, table, table, torch.zeros(tokens, dtype=torch.long))
        partial = torch.zeros(128, 3 * d // 8)  # partial rotary (Phi-4-mini's leading 3/4 of each head)
        triton_norm_rope.apply_rotary(q, k, partial, partial, torch.zeros(tokens, dtype=torch.long))
    if which == "all":
        _launch_moe(dtype)
        _launch_fp8(dtype)


def _launch_moe(dtype: torch.dtype) -> None:
    """kernels/triton_moe.py's grouped GEMM, both passes, with the tiles a CUDA step of each
    size picks, over 16/32-bit experts and over fp8 ones (with the fp8 conversion the target
    has: sm_80 decodes the bits). Only K experts' weights (never touched, so never paged in):
    the expert count changes the tile, passed here, but no stride's specialisation."""
    from kernels import triton_fp8, triton_moe

    num_experts, top_k, hidden, inter = MOE_LAYOUT
    cuda = torch.device("cuda")
    w13 = torch.empty(top_k, 2 * inter, hidden, dtype=dtype)
    w2 = torch.empty(top_k, hidden, inter, dtype=dtype)
    w13_fp8 = torch.empty(top_k, 2 * inter, hidden, dtype=triton_fp8.WEIGHT_DTYPE)
    w2_fp8 = torch.empty(top_k, hidden, inter, dtype=triton_fp8.WEIGHT_DTYPE)

    def launch(rows: int, groups: tuple[int, int] | None) -> None:
        tokens = rows * num_experts // top_k
        x, weights = torch.empty(tokens, hidden, dtype=dtype), torch.ones(tokens, top_k)
        ids = torch.zeros(tokens, top_k, dtype=torch.int32)
        if groups is None:
            tile = triton_moe.moe_tile(tokens * top_k, num_experts, dtype, cuda)
            triton_moe.fused_moe(x, w13, w2, weights, ids, tile=tile)
            return
        scales = (torch.empty(top_k, 2 * inter, -(-hidden // groups[0])), torch.empty(top_k, hidden, -(-inter // groups[1])))
        tile = triton_moe.moe_tile(tokens * top_k, num_experts, dtype, cuda, ((groups[0], hidden), (groups[1], inter)))
        triton_moe.fused_moe(x, w13_fp8, w2_fp8, weights, ids, scales, groups, tile=tile,
                             native_fp8=triton_fp8.has_native_fp8(cuda))

    for rows in MOE_ROWS_PER_EXPERT:
        launch(rows, None)
        launch(rows, MOE_FP8_GROUPS)
    for rows in (MOE_ROWS_PER_EXPERT[0], MOE_ROWS_PER_EXPERT[-1]):
        for groups in MOE_FP8_OTHERS:
            launch(rows, groups)


def _launch_fp8(dtype: torch.dtype) -> None:
    """kernels/triton_fp8.py's projection with the tiles a CUDA step of each size picks: the
    block-quantized layout at every size, the other variants (bias, per-channel, per-element
    scales, a ragged K) at the smallest and largest. The fp8 conversion the target has (sm_80
    decodes the bits). Empty tensors: never touched."""
    from kernels import triton_fp8

    cuda = torch.device("cuda")

    def launch(rows: int, depth: int, cols: int, group_size: int, bias: bool) -> None:
        triton_fp8.fp8_linear(torch.empty(rows, depth, dtype=dtype),
                              torch.empty(cols, depth, dtype=triton_fp8.WEIGHT_DTYPE),
                              torch.empty(cols, -(-depth // group_size)), group_size,
                              torch.empty(cols, dtype=dtype) if bias else None,
                              tile=triton_fp8.fp8_tile(rows, group_size, depth, dtype, cuda),
                              native_fp8=triton_fp8.has_native_fp8(cuda))

    for rows in FP8_ROWS:
        launch(rows, *FP8_BLOCKS)
    for rows in (FP8_ROWS[0], FP8_ROWS[-1]):
        for layout in FP8_OTHERS:
            launch(rows, *layout)


def check(targets: list[str], quick: bool, resources: bool, tuning: KernelTuning | None = None,
          fp8_kv_only: bool = False, names: list[str] | None = None) -> list[Compiled]:
    """`tuning`: a GPU's kernel tuning to compile with (None: the built-in choices);
    `fp8_kv_only`: only the cases of an fp8 KV cache; `names`: only these cases (`_case_name`)."""
    cases = [c for c in _cases(quick, fp8_kv_only) if names is None or _case_name(c) in names]
    if names is not None and len(cases) != len(set(names)):
        raise SystemExit(f"--cases: no such case among {[_case_name(c) for c in _cases(quick, fp8_kv_only)]}")
    if os.environ.get("TRITON_INTERPRET", "0") not in ("", "0"):
        raise SystemExit("kernels.compile_check compiles for GPUs: run it without TRITON_INTERPRET")
    import triton
    from triton import knobs
    from triton.backends.compiler import GPUTarget
    from triton.compiler import ASTSource
    from triton.runtime import driver

    from kernels import triton_ops

    results: list[Compiled] = []
    current: dict[str, Any] = {}

    def compile_launch(*, key, repr, fn, compile, is_manual_warmup, already_compiled) -> bool:  # noqa: A002
        name, (capability, limit, _) = current["target"], TARGETS[current["target"]]
        names = fn.jit_function.arg_names
        constants = {names[path[0]]: value for path, value in compile["constants"].items() if len(path) == 1}
        variant = " ".join(f"{k}={int(v) if isinstance(v, bool) else v}" for k in VARIANT_KEYS
                           if (v := constants.get(k)) is not None and (v or k not in NAMED_WHEN_SET))
        row = Compiled(name, current["case"], fn.name, compile["num_warps"], compile["num_stages"], variant,
                       shared_limit=limit)
        t0 = time.perf_counter()
        try:
            src = ASTSource(fn.jit_function, compile["signature"], compile["constants"], compile["configs"][0])
            kernel = triton.compile(src, target=GPUTarget("cuda", capability, 32), options={
                "num_warps": compile["num_warps"], "num_stages": compile["num_stages"],
                "num_ctas": compile["num_ctas"], "enable_fp_fusion": compile["enable_fp_fusion"]})
            row.shared = kernel.metadata.shared
            if resources:
                row.resources = _ptxas_resources(kernel.asm["ptx"], capability)
        except Exception as e:  # noqa: BLE001 - a kernel that does not compile is the finding
            row.error = _reason(e)
        row.seconds = time.perf_counter() - t0
        results.append(row)
        return True  # compiled here: Triton skips its own compile and the launch

    # The wrappers pick their GPU tiles when the device is CUDA; these tensors live on the CPU.
    cuda = torch.device("cuda")
    tile_fns = {name: getattr(triton_ops, name) for name in ("_prefill_config", "_decode_config")}
    for name, fn in tile_fns.items():
        setattr(triton_ops, name, lambda head_dim, dtype, device, *args, fn=fn: fn(head_dim, dtype, cuda, *args))
    native_fp8_kv_fn = triton_ops._native_fp8_kv  # the target's e4m3 conversion (sm_80 moves the bits)
    triton_ops._native_fp8_kv = lambda device: native_fp8_kv_fn(cuda)
    capability_fn = triton_ops._device_capability  # every Triton module's tiles may depend on the architecture
    tuning_fn, triton_ops._device_tuning = triton_ops._device_tuning, lambda device: tuning or KernelTuning()
    hook, knobs.runtime.jit_cache_hook = knobs.runtime.jit_cache_hook, compile_launch
    previous_driver = getattr(driver, "_active", None)  # None until first use; restored below
    try:
        for index, name in enumerate(targets):
            driver.set_active(_TargetDriver(GPUTarget("cuda", TARGETS[name][0], 32), index))
            triton_ops._device_capability = lambda device, cc=TARGETS[name][0]: divmod(cc, 10)
            current["target"] = name
            for case in cases:
                current["case"] = _case_name(case)
                _launch(case)
    finally:
        knobs.runtime.jit_cache_hook = hook
        for name, fn in tile_fns.items():
            setattr(triton_ops, name, fn)
        triton_ops._native_fp8_kv = native_fp8_kv_fn
        triton_ops._device_capability = capability_fn
        triton_ops._device_tuning = tuning_fn
        driver.set_active(previous_driver)
    return results


def render(rows: list[Compiled]) -> str:
    lines = [f"{'target':<7}{'case':<24}{'kernel':<24}{'variant':<48}{'warps':>6}{'stages':>7}{'shared KiB':>11}"
             f"{'limit':>7}{'regs':>6}{'spills':>8}  status"]
    for r in rows:
        spills = r.resources.get("spill_stores", 0) + r.resources.get("spill_loads", 0) if r.resources else None
        status = "ok" if r.ok else (r.error or "shared memory over the limit")
        lines.append(f"{r.target:<7}{r.case:<24}{r.kernel:<24}{r.variant:<48}{r.num_warps:>6}{r.num_stages:>7}"
                     f"{'-' if r.shared is None else r.shared // 1024:>11}{r.shared_limit // 1024:>7}"
                     f"{r.resources.get('registers', '-'):>6}{'-' if spills is None else spills:>8}  {status}")
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--targets", nargs="*", default=list(TARGETS), choices=list(TARGETS))
    p.add_argument("--quick", action="store_true", help="the cases `make test` runs (one layout per risk)")
    p.add_argument("--resources", action="store_true", help="registers and spills per kernel (ptxas -v)")
    p.add_argument("--out", default=None, help="also write the rows as JSON")
    p.add_argument("--tuning", default=None, help="a kernel tuning JSON (kernels/tuning.py) to compile with")
    p.add_argument("--fp8-kv-only", action="store_true", help="only the attention kernels over an fp8 KV cache")
    p.add_argument("--cases", nargs="+", default=None, help='only these cases, named as in the table ("layout dtype")')
    args = p.parse_args(argv)
    t0 = time.perf_counter()
    tuning = None
    if args.tuning:
        with open(args.tuning) as f:
            tuning = parse_tuning(json.load(f), args.tuning)
    rows = check(args.targets, args.quick, args.resources, tuning, args.fp8_kv_only, args.cases)
    print(render(rows))
    bad = [r for r in rows if not r.ok]
    import triton

    print(f"{len(rows)} kernels compiled with Triton {triton.__version__} for {', '.join(args.targets)} in "
          f"{time.perf_counter() - t0:.0f}s; "
          f"{len(bad)} failed or over the shared-memory limit")
    if args.out:
        with open(args.out, "w") as f:
            json.dump([asdict(r) | {"ok": r.ok} for r in rows], f, indent=1)
    return 1 if bad or not rows else 0


if __name__ == "__main__":
    sys.exit(main())
