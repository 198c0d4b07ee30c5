"""The CPU projections: torch's F.linear (the BLAS) against kernels.cpu_ops.linear (C over a
weight packed once) on a model's shapes, for the row counts of decode and prefill steps.

    python -m benchmarks.linear                       # the embedded default's shapes, 2 threads
    python -m benchmarks.linear --model DIR --rows 1 8 32 --threads 1

Both run in the same process on the same inputs, timed by benchmarks.kernels.Timer (the median
of `--iters` calls after a warm-up); the table shows GFLOP/s and C / torch. This is what decided
where the engine's CPU backend runs a projection in C (where the weight is packed once) rather
than in torch's BLAS: at every row count on an AVX2 CPU, below `cpu_ops.BLAS_MIN_ROWS` where the
CPU has AVX-512 (the report says which the CPU has).
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


def main(argv: list[str] | None = None) -> dict[str, Any]:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--model", default=None, help="checkpoint dir for the shapes (default: embedded default)")
    p.add_argument("--rows", type=int, nargs="+", default=[1, 2, 4, 8, 16, 32, 48, 64, 96, 128, 256, 512, 2048])
    p.add_argument("--threads", type=int, default=2)
    p.add_argument("--iters", type=int, default=50, help="timed calls per shape and row count (median)")
    p.add_argument("--out", default="results/linear.json")
    args = p.parse_args(argv)
    report = run(args)
    write_json(report, args.out)
    return report


if __name__ == "__main__":
    main()
