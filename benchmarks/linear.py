"""The CPU projections: torch's F.linear (the BLAS) against kernels.cpu_ops.linear (C over a
weight packed once) on a model's shapes, for the row counts of decode and prefill steps; with
`--fp8`, the fp8 product (cpu_ops.fp8_linear, C over a packed fp8 weight) against the fp32 C
product, and against the weight dequantized for the call and torch's BLAS.

    python -m benchmarks.linear                       # the embedded default's shapes, 2 threads
    python -m benchmarks.linear --model DIR --rows 1 8 32 --threads 1
    python -m benchmarks.linear --fp8                 # SmolLM2-135M's MLP shapes and a larger one
    python -m benchmarks.linear --fp8 --group-size 128 --fp8-shapes 4096x12288

Both run in the same process on the same inputs, timed by benchmarks.kernels.Timer (the median
of `--iters` calls after a warm-up); the table shows GFLOP/s and C / torch. This is what decided
where the engine's CPU backend runs a projection in C (where the weight is packed once) rather
than in torch's BLAS: at every row count on an AVX2 CPU, below `cpu_ops.BLAS_MIN_ROWS` where the
CPU has AVX-512 (the report says which the CPU has). The fp8 table's "BLAS" column is what
fp8_linear does from `cpu_ops.FP8_BLAS_MIN_ROWS` rows (the weight dequantized in C, then
F.linear), "reference" kernels.reference.fp8_linear over the fp8 weight. Each projection is
called over and over, so a weight that fits the caches stays there (576x1536 in fp32: 3.5 MB),
where a decode step over a whole model reads each from memory: 2048x8192 shows that case.
"""

from __future__ import annotations

import argparse
from typing import Any

import torch
import torch.nn.functional as F

from benchmarks.kernels import Timer
from benchmarks.report import write_json
from engine.config import ModelConfig


def model_shapes(config: ModelConfig) -> dict[str, tuple[int, int]]:
    """name: (K, N) of each projection of one layer, and the LM head."""
    q, kv = config.num_heads * config.head_dim, config.num_kv_heads * config.head_dim
    h, i = config.hidden_size, config.intermediate_size
    return {"qkv": (h, q + 2 * kv), "o": (q, h), "gate_up": (h, 2 * i), "down": (i, h), "lm_head": (h, config.vocab_size)}


def run(args: argparse.Namespace) -> dict[str, Any]:
    from kernels import cpu_ops

    if args.fp8:
        return run_fp8(args)
    if args.model is None:
        from engine.default_model import default_model_path

        args.model = default_model_path()
    torch.set_num_threads(args.threads)
    config = ModelConfig.from_dir(args.model)
    gen = torch.Generator().manual_seed(0)
    timer = Timer(torch.device("cpu"), args.iters, warmup=2)
    blas_min_rows, cpu_ops.BLAS_MIN_ROWS = cpu_ops.BLAS_MIN_ROWS, None  # the C product itself at every row count
    try:
        rows = _measure(cpu_ops, model_shapes(config), args.rows, timer, gen)
    finally:
        cpu_ops.BLAS_MIN_ROWS = blas_min_rows
    return {"model": args.model, "threads": args.threads, "cpu_capability": torch.backends.cpu.get_cpu_capability(),
            "blas_min_rows": blas_min_rows, "rows": rows}


def _measure(cpu_ops: Any, shapes: dict[str, tuple[int, int]], row_counts: list[int], timer: Timer,
             gen: torch.Generator) -> list[dict[str, Any]]:
    rows = []
    for name, (k, n) in shapes.items():
        weight = torch.randn(n, k, generator=gen) / k**0.5
        packed = cpu_ops.pack_linear_weight(weight)
        for m in row_counts:
            x = torch.randn(m, k, generator=gen)
            flops = 2.0 * m * k * n
            torch_s = timer(lambda: F.linear(x, weight)) / 1e3
            c_s = timer(lambda: cpu_ops.linear(x, packed, None, n)) / 1e3
            diff = (cpu_ops.linear(x, packed, None, n) - F.linear(x, weight)).abs().max().item()
            rows.append({"shape": name, "m": m, "k": k, "n": n, "torch_gflops": flops / torch_s / 1e9,
                         "c_gflops": flops / c_s / 1e9, "c_over_torch": torch_s / c_s, "max_abs_diff": diff})
            print(f"{name:>8} m={m:<5} torch {flops / torch_s / 1e9:6.1f}  C {flops / c_s / 1e9:6.1f} GFLOP/s  "
                  f"C/torch {torch_s / c_s:5.2f}x", flush=True)
    return rows


def _fp8_weight(n: int, k: int, group_size: int, gen: torch.Generator) -> tuple[torch.Tensor, torch.Tensor]:
    """A random `[n, k]` weight quantized as fp8 checkpoints are: each row's group of columns
    scaled to e4m3's range (448). → (fp8 weight, scale `[n, ceil(k / group_size)]`)."""
    weight = torch.randn(n, k, generator=gen) / k**0.5
    groups = -(-k // group_size)
    scale = F.pad(weight, (0, groups * group_size - k)).unflatten(1, (groups, group_size)).abs().amax(-1) / 448
    return (weight / scale.repeat_interleave(group_size, 1)[:, :k]).to(torch.float8_e4m3fn), scale


def run_fp8(args: argparse.Namespace) -> dict[str, Any]:
    """The fp8 table: per shape and row count, milliseconds of the fp8 C product, the fp32 C
    product over the same (dequantized) weight, fp8_linear's BLAS path and the reference."""
    from kernels import cpu_ops, reference

    torch.set_num_threads(args.threads)
    gen = torch.Generator().manual_seed(0)
    timer = Timer(torch.device("cpu"), args.iters, warmup=2)
    saved = cpu_ops.BLAS_MIN_ROWS, cpu_ops.FP8_BLAS_MIN_ROWS
    rows = []
    try:
        for shape in args.fp8_shapes:
            k, n = map(int, shape.split("x"))
            group_size = args.group_size or k
            fp8, scale = _fp8_weight(n, k, group_size, gen)
            packed8 = cpu_ops.pack_fp8_linear_weight(fp8)
            packed32 = cpu_ops.pack_linear_weight(reference.dequantize_fp8(fp8, scale, group_size, torch.float32))
            for m in args.rows:
                x = torch.randn(m, k, generator=gen)
                cpu_ops.BLAS_MIN_ROWS, cpu_ops.FP8_BLAS_MIN_ROWS = None, None  # the C products
                fp8_ms = timer(lambda: cpu_ops.fp8_linear(x, packed8, scale, group_size, None, n))
                fp32_ms = timer(lambda: cpu_ops.linear(x, packed32, None, n))
                got = cpu_ops.fp8_linear(x, packed8, scale, group_size, None, n)
                cpu_ops.FP8_BLAS_MIN_ROWS = 0  # fp8_linear's BLAS path
                blas_ms = timer(lambda: cpu_ops.fp8_linear(x, packed8, scale, group_size, None, n))
                ref_ms = timer(lambda: reference.fp8_linear(x, fp8, scale, group_size))
                diff = (got - reference.fp8_linear(x, fp8, scale, group_size)).abs().max().item() if m else 0.0
                rows.append({"shape": shape, "m": m, "k": k, "n": n, "group_size": group_size, "fp8_c_ms": fp8_ms,
                             "fp32_c_ms": fp32_ms, "fp8_blas_ms": blas_ms, "reference_ms": ref_ms,
                             "max_abs_diff": diff})
                print(f"{shape:>10} m={m:<5} fp8 C {fp8_ms:8.3f}  fp32 C {fp32_ms:8.3f}  fp8 BLAS {blas_ms:8.3f}  "
                      f"reference {ref_ms:8.3f} ms   fp32 C / fp8 C {fp32_ms / fp8_ms:5.2f}x  "
                      f"BLAS / fp8 C {blas_ms / fp8_ms:5.2f}x", flush=True)
    finally:
        cpu_ops.BLAS_MIN_ROWS, cpu_ops.FP8_BLAS_MIN_ROWS = saved
    return {"fp8": True, "threads": args.threads, "cpu_capability": torch.backends.cpu.get_cpu_capability(),
            "fp8_blas_min_rows": saved[1], "rows": rows}


def main(argv: list[str] | None = None) -> dict[str, Any]:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--model", default=None, help="checkpoint dir for the shapes (default: embedded default)")
    p.add_argument("--rows", type=int, nargs="+", default=None,
                   help="row counts (default: 1 to 2048; with --fp8, 1 4 16 64 256)")
    p.add_argument("--fp8", action="store_true", help="the fp8 product's table instead")
    p.add_argument("--fp8-shapes", nargs="+", default=["576x1536", "1536x576", "2048x8192"], metavar="KxN",
                   help="--fp8's projections, input x output features")
    p.add_argument("--group-size", type=int, default=0, help="--fp8's scale groups (default 0: one per row)")
    p.add_argument("--threads", type=int, default=2)
    p.add_argument("--iters", type=int, default=50, help="timed calls per shape and row count (median)")
    p.add_argument("--out", default=None, help="the JSON report (default: results/linear.json, --fp8: linear_fp8.json)")
    args = p.parse_args(argv)
    if args.rows is None:
        args.rows = [1, 4, 16, 64, 256] if args.fp8 else [1, 2, 4, 8, 16, 32, 48, 64, 96, 128, 256, 512, 2048]
    report = run(args)
    write_json(report, args.out or f"results/linear{'_fp8' if args.fp8 else ''}.json")
    return report


if __name__ == "__main__":
    main()
