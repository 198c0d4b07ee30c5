"""MoE kernel micro-benchmark: kernels/triton_moe.py against the torch reference
(kernels.reference.fused_moe) on one layer's experts.

On CUDA: Qwen3-30B-A3B's (128 experts, 8 a token, hidden 2048, intermediate 768) and
Mixtral-8x7B's (8, 2, 4096, 14336) expert layouts in bf16, T in {1, 4, ..., 4096} tokens routed
uniformly at random (softmax weights). Each impl's median GPU time (benchmarks.kernels.Timer:
CUDA events, L2 flushed, launch cost hidden; the reference reads its routing on the host, so
its time includes that round trip, which is why it cannot be captured in a CUDA graph), the
ratio reference / Triton (> 1: Triton faster), achieved GB/s of expert weights actually read
(distinct experts hit x 3 H I x bytes; activations not counted) against the card's peak, and
TFLOP/s (2 x T K x 3 H I). Each row also records how far Triton's output is from the
reference's (max |diff| / max |reference|, both in bf16).

On the CPU, tiny layouts: the reference's times only (the CPU serving path; the interpreter's
speed means nothing), and, when the caller set TRITON_INTERPRET=1, Triton's output on one tiny
shape against the reference's; otherwise Triton is skipped with a note. `--impl triton` with
TRITON_INTERPRET=1 times the interpreter as the CUDA run times Triton: it tests this script.

    python -m benchmarks.moe_kernels                         # GPU sizes on CUDA, tiny on CPU
    python -m benchmarks.moe_kernels --tiny --iters 3 --out results/moe_kernels_tiny.json
"""

from __future__ import annotations

import argparse
import importlib
import os
import statistics
import sys
import time
from types import ModuleType
from typing import Any

if __package__ in (None, ""):  # run as a file: make the repo root importable
    sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

import torch

from benchmarks.kernels import Timer, _try, bench_env, peak_bandwidth
from benchmarks.report import write_json
from kernels import reference

# name: (experts, experts per token, hidden, intermediate)
LAYOUTS = {"qwen3-30b-a3b": (128, 8, 2048, 768), "mixtral-8x7b": (8, 2, 4096, 14336)}
TINY_LAYOUTS = {"tiny-qwen3-moe": (8, 4, 64, 48), "tiny-mixtral": (4, 2, 96, 80)}
GPU_SIZES = dict(tokens=[1, 4, 16, 64, 256, 1024, 4096], iters=20, warmup=3)
TINY_SIZES = dict(tokens=[1, 4, 16], iters=3, warmup=1)
DECODE_TOKENS = 16  # rows up to this many tokens count as decode in the summary
CHECK_SHAPE = (4, 2, 7, 40, 24)  # the interpreter's check on the CPU: (E, K, T, H, I)


def interpreting() -> bool:
    return os.environ.get("TRITON_INTERPRET", "0") not in ("", "0")


def routing(num_experts: int, top_k: int, tokens: int, device: torch.device,
            gen: torch.Generator) -> tuple[torch.Tensor, torch.Tensor]:
    """Uniform random routing: each token's `top_k` distinct experts, softmax weights."""
    ids = torch.rand(tokens, num_experts, generator=gen, device=device).topk(top_k, dim=1).indices
    weights = torch.rand(tokens, top_k, generator=gen, device=device).softmax(-1)
    return weights, ids.to(torch.int32)


def expert_weights(num_experts: int, hidden: int, inter: int, dtype: torch.dtype, device: torch.device,
                   gen: torch.Generator) -> tuple[torch.Tensor, torch.Tensor]:
    """w13 `[E, 2I, H]` and w2 `[E, H, I]`, scaled so activations stay O(1)."""
    w13 = torch.randn(num_experts, 2 * inter, hidden, generator=gen, device=device, dtype=dtype) * hidden**-0.5
    w2 = torch.randn(num_experts, hidden, inter, generator=gen, device=device, dtype=dtype) * inter**-0.5
    return w13, w2


def relative_diff(out: torch.Tensor, want: torch.Tensor) -> float:
    """max |out - want| / max |want|."""
    return float((out.float() - want.float()).abs().max() / want.float().abs().max().clamp_min(1e-30))


class Bench:
    def __init__(self, args: argparse.Namespace, device: torch.device, dtype: torch.dtype) -> None:
        self.device, self.dtype = device, dtype
        tiny = args.tiny or device.type != "cuda"
        self.sizes = TINY_SIZES if tiny else GPU_SIZES
        self.layouts = TINY_LAYOUTS if tiny else {name: LAYOUTS[name] for name in args.layouts}
        self.tokens = args.tokens or self.sizes["tokens"]
        warmup = self.sizes["warmup"] if args.warmup is None else args.warmup
        self.timer = Timer(device, args.iters or self.sizes["iters"], warmup)
        self.peak, self.peak_source = peak_bandwidth(device)
        # Triton timed on CUDA; on the CPU, in the interpreter (the caller's choice), checked on
        # one shape, and timed only when asked (--impl triton: to test this script's CUDA path).
        self.impl = args.impl if args.impl != "auto" else ("triton" if device.type == "cuda" else "reference")
        if self.impl == "triton" and device.type != "cuda" and not interpreting():
            raise SystemExit("--impl triton off CUDA runs Triton's interpreter: set TRITON_INTERPRET=1 first")
        self.moe: ModuleType | None = None
        if device.type == "cuda" or interpreting():
            self.moe = importlib.import_module("kernels.triton_moe")

    def rows(self) -> list[dict[str, Any]]:
        rows = []
        for layout, (num_experts, top_k, hidden, inter) in self.layouts.items():
            gen = torch.Generator(device=self.device).manual_seed(0)
            w13, w2 = expert_weights(num_experts, hidden, inter, self.dtype, self.device, gen)
            for tokens in self.tokens:
                x = torch.randn(tokens, hidden, generator=gen, device=self.device, dtype=self.dtype)
                weights, ids = routing(num_experts, top_k, tokens, self.device, gen)
                hit = int(torch.unique(ids).numel())  # setup, not timed
                nbytes = hit * 3 * hidden * inter * self.dtype.itemsize
                flops = 2.0 * tokens * top_k * 3 * hidden * inter
                row: dict[str, Any] = {"layout": layout, "tokens": tokens, "experts": num_experts, "top_k": top_k,
                                       "hidden": hidden, "inter": inter, "experts_hit": hit, "weight_bytes": nbytes,
                                       "flops": flops}
                impls = {"reference": lambda: reference.fused_moe(x, w13, w2, weights, ids)}
                if self.impl == "triton":
                    impls = {"triton": lambda: self.moe.fused_moe(x, w13, w2, weights, ids)} | impls
                for name, fn in impls.items():
                    ms, why = _try(self.timer, fn)
                    row[f"{name}_ms"] = ms
                    if why:
                        row[f"{name}_skipped"] = why
                    if ms:
                        row[f"{name}_gbps"] = nbytes / ms / 1e6
                        row[f"{name}_peak_fraction"] = nbytes / ms / 1e-3 / self.peak if self.peak else None
                        row[f"{name}_tflops"] = flops / ms / 1e9
                if self.impl == "triton":
                    row["ratio"] = row["reference_ms"] / row["triton_ms"] if row.get("reference_ms") and row.get(
                        "triton_ms") else None
                    row["max_rel_diff"] = relative_diff(impls["triton"](), impls["reference"]())
                rows.append(row)
                x = weights = ids = None  # freed (not del: the timed lambdas close over them)
            w13 = w2 = None
            if self.device.type == "cuda":
                torch.cuda.empty_cache()
        return rows

    def interpreter_check(self) -> dict[str, Any] | None:
        """On the CPU under the interpreter: Triton's output on one tiny shape (fp32) against
        the reference's."""
        if self.device.type == "cuda" or self.moe is None:
            return None
        num_experts, top_k, tokens, hidden, inter = CHECK_SHAPE
        gen = torch.Generator().manual_seed(1)
        w13, w2 = expert_weights(num_experts, hidden, inter, torch.float32, self.device, gen)
        x = torch.randn(tokens, hidden, generator=gen)
        weights, ids = routing(num_experts, top_k, tokens, self.device, gen)
        diff = relative_diff(self.moe.fused_moe(x, w13, w2, weights, ids), reference.fused_moe(x, w13, w2, weights, ids))
        return {"shape": dict(zip(("experts", "top_k", "tokens", "hidden", "inter"), CHECK_SHAPE)),
                "dtype": "float32", "max_rel_diff": diff, "ok": diff < 1e-5}


# ----------------------------------------------------------------------------- report
def summarise(report: dict[str, Any]) -> dict[str, Any]:
    """Per layout: reference/Triton time ratios, the best share of peak bandwidth on the
    experts' weights at decode sizes, the TFLOP/s at the most tokens, the largest difference."""
    notes = []
    layouts: dict[str, Any] = {}
    for layout in dict.fromkeys(r["layout"] for r in report["rows"]):
        rows = [r for r in report["rows"] if r["layout"] == layout]
        ratios = sorted(r["ratio"] for r in rows if r.get("ratio") is not None)
        decode = [r["triton_peak_fraction"] for r in rows
                  if r["tokens"] <= DECODE_TOKENS and r.get("triton_peak_fraction") is not None]
        largest = max(rows, key=lambda r: r["tokens"])
        diffs = [r["max_rel_diff"] for r in rows if r.get("max_rel_diff") is not None]
        layouts[layout] = {
            "ratio": {"min": ratios[0], "median": statistics.median(ratios), "max": ratios[-1]} if ratios else None,
            "decode_best_peak_fraction": max(decode, default=None),
            "largest_tokens": largest["tokens"], "largest_tflops": largest.get("triton_tflops"),
            "max_rel_diff": max(diffs, default=None),
            "slower_than_reference": [r["tokens"] for r in rows if r.get("ratio") is not None and r["ratio"] < 1],
        }
        if diffs and max(diffs) > 5e-2:
            notes.append(f"{layout}: Triton differs from the reference by up to {max(diffs):.3g} of its largest value")
    if report["env"]["impl"] == "reference":
        notes.append("CPU: only the torch reference was timed (the Triton interpreter's speed means nothing)")
        check = report.get("interpreter_check")
        if check is None:
            notes.append("Triton skipped: no CUDA, and TRITON_INTERPRET was not set to check it in the interpreter")
        elif not check["ok"]:
            notes.append(f"Triton in the interpreter differs from the reference by {check['max_rel_diff']:.3g}")
    return {"layouts": layouts, "notes": notes}


def _fmt(x: float | None, spec: str) -> str:
    return "-" if x is None else format(x, spec)


def render(report: dict[str, Any]) -> str:
    env = report["env"]
    lines = [f"MoE kernel micro-benchmark on {env['device_name']} ({env['dtype']}, {env['impl']}); peak HBM "
             f"{_fmt(env['peak_gbps'], '.0f')} GB/s ({env['peak_source']}); median ms; GB/s of expert weights read",
             "", f"{'layout':>16}{'T':>6}{'hit':>5}{'triton ms':>11}{'GB/s':>7}{'%peak':>6}{'TFLOP/s':>8}"
                 f"{'reference ms':>14}{'ratio':>7}{'rel diff':>10}"]
    for r in report["rows"]:
        frac = r.get("triton_peak_fraction")
        lines.append(f"{r['layout']:>16}{r['tokens']:>6}{r['experts_hit']:>5}{_fmt(r.get('triton_ms'), '.4f'):>11}"
                     f"{_fmt(r.get('triton_gbps'), '.0f'):>7}{_fmt(None if frac is None else 100 * frac, '.0f'):>6}"
                     f"{_fmt(r.get('triton_tflops'), '.1f'):>8}{_fmt(r.get('reference_ms'), '.4f'):>14}"
                     f"{_fmt(r.get('ratio'), '.2f'):>7}{_fmt(r.get('max_rel_diff'), '.1e'):>10}")
    lines.append("ratio = reference time / Triton time (> 1: Triton faster)")
    check = report.get("interpreter_check")
    if check:
        lines.append(f"Triton in the interpreter, {check['shape']}: max rel diff {check['max_rel_diff']:.1e} "
                     f"({'ok' if check['ok'] else 'WRONG'})")
    for note in report["summary"]["notes"]:
        lines.append(f"note: {note}")
    return "\n".join(lines)


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0],
                                formatter_class=argparse.ArgumentDefaultsHelpFormatter)
    p.add_argument("--tiny", action="store_true", help="tiny layouts and sizes (always on the CPU)")
    p.add_argument("--device", default="auto")
    p.add_argument("--dtype", default=None, help="default: bfloat16 on CUDA, float32 on the CPU")
    p.add_argument("--iters", type=int, default=None, help="timed runs per measurement (default: by size)")
    p.add_argument("--warmup", type=int, default=None, help="untimed runs before them (default: by size)")
    p.add_argument("--tokens", type=int, nargs="*", default=None, help="token counts (default: by size)")
    p.add_argument("--layouts", nargs="*", default=list(LAYOUTS), choices=list(LAYOUTS), help="expert layouts (CUDA)")
    p.add_argument("--impl", default="auto", choices=["auto", "reference", "triton"],
                   help="what is timed: auto = Triton and the reference on CUDA, the reference alone on the CPU; "
                        "triton on the CPU times the interpreter (needs TRITON_INTERPRET=1; only to test this script)")
    p.add_argument("--out", default="results/moe_kernels.json")
    return p.parse_args(argv)


def main(argv: list[str] | None = None) -> dict[str, Any]:
    args = parse_args(argv)
    device = torch.device(("cuda" if torch.cuda.is_available() else "cpu") if args.device == "auto" else args.device)
    from engine.config import DTYPES

    dtype = DTYPES[args.dtype] if args.dtype else (torch.bfloat16 if device.type == "cuda" else torch.float32)
    bench = Bench(args, device, dtype)
    t0 = time.perf_counter()
    report: dict[str, Any] = {"env": bench_env(bench, device, dtype, "benchmarks/moe_kernels.py", argv,
                                               tiny=bench.sizes is TINY_SIZES,
                                               interpreter=device.type != "cuda" and interpreting())}
    report["rows"] = bench.rows()
    report["interpreter_check"] = bench.interpreter_check()
    report["summary"] = summarise(report)
    report["env"]["seconds"] = time.perf_counter() - t0
    print(render(report), flush=True)
    if args.out:
        write_json(report, args.out)
        print(f"wrote {args.out}")
    return report


if __name__ == "__main__":
    main()
