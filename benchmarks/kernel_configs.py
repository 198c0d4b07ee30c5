"""Tile sweep for the Triton prefill attention kernel on one GPU: which (BLOCK_M, BLOCK_N,
num_warps, num_stages) is fastest on the shapes of benchmarks/kernels.py, with a kv head's
query heads packed into the tile's rows (the default for power-of-two groups) and, for a few
tiles, one query head per program; against the one `kernels.triton_ops._prefill_config` picks
now and torch SDPA on contiguous K/V.

    PYTHONPATH=. python3 -m benchmarks.kernel_configs --out results/kernel_configs.json

It swaps `_prefill_config` for each candidate (the kernel's launch reads it on every call), so
each row is the shipped kernel with one other tile; a candidate that does not compile (shared
memory) is reported as such. CUDA only.
"""

from __future__ import annotations

import argparse
import time
from typing import Any

import torch
import torch.nn.functional as F

from benchmarks.kernels import LAYOUTS, Timer, gathered, paged_cache
from benchmarks.report import write_json

SHAPES = [("llama-3-8b", 4, 4096), ("qwen3-0.6b", 4, 1024), ("llama-3-8b", 1, 512)]
TILES = [(64, 32, 4, 2), (64, 64, 4, 2), (64, 64, 4, 3), (64, 64, 8, 2), (64, 128, 8, 2), (128, 32, 4, 2),
         (128, 32, 8, 3), (128, 64, 4, 2), (128, 64, 8, 2), (128, 64, 8, 3), (128, 128, 8, 2)]
UNPACKED_TILES = [(64, 64, 4, 2), (128, 64, 8, 2), (128, 128, 8, 2)]
CANDIDATES = [(tile, True) for tile in TILES] + [(tile, False) for tile in UNPACKED_TILES]


def sweep(args: argparse.Namespace) -> dict[str, Any]:
    from kernels import triton_ops

    device, dtype = torch.device("cuda"), torch.bfloat16
    timer = Timer(device, args.iters, warmup=2)
    shipped = triton_ops._prefill_config
    rows = []
    t_start = time.perf_counter()
    for layout, seqs, length in SHAPES:
        hq, hkv, d, _, _ = LAYOUTS[layout]
        gen = torch.Generator(device=device).manual_seed(seqs * length)
        k_cache, v_cache, tables = paged_cache([length] * seqs, hkv, d, dtype, device, gen)
        lens = torch.full((seqs,), length, dtype=torch.int32, device=device)
        cu = torch.arange(seqs + 1, dtype=torch.int32, device=device) * length
        q = torch.randn(seqs * length, hq, d, generator=gen, device=device).to(dtype)
        scale = d**-0.5
        flops = 4.0 * hq * d * seqs * length * (length + 1) / 2

        def run() -> torch.Tensor:
            return triton_ops.paged_prefill_attention(q, k_cache, v_cache, tables, cu, lens, scale)

        want = run()
        k, v = gathered(k_cache, tables, length), gathered(v_cache, tables, length)
        q4 = q.view(seqs, length, hq, d).transpose(1, 2)
        sdpa_ms = timer(lambda: F.scaled_dot_product_attention(q4, k, v, scale=scale, is_causal=True,
                                                               enable_gqa=True))
        shipped_tile = shipped(d, dtype, device)
        results = []
        for tile, packed in CANDIDATES:
            if time.perf_counter() - t_start > args.budget:
                break
            triton_ops._prefill_config = lambda *a, tile=tile: tile

            def candidate(packed: bool = packed) -> torch.Tensor:
                return triton_ops.paged_prefill_attention(q, k_cache, v_cache, tables, cu, lens, scale,
                                                          pack_gqa=packed)

            try:
                got = candidate()
                err = (got.float() - want.float()).abs().max().item()
                ms = timer(candidate)
                results.append({"tile": list(tile), "packed": packed, "ms": ms, "tflops": flops / ms / 1e9,
                                "max_abs_diff": err})
            except Exception as e:  # noqa: BLE001 - a tile that does not fit is a result
                results.append({"tile": list(tile), "packed": packed,
                                "error": f"{type(e).__name__}: {str(e).splitlines()[0][:100]}"})
            finally:
                triton_ops._prefill_config = shipped
        ok = [r for r in results if "ms" in r]
        best = min(ok, key=lambda r: r["ms"]) if ok else None
        current = next((r for r in ok if tuple(r["tile"]) == tuple(shipped_tile) and r["packed"]), None)
        rows.append({"layout": layout, "seqs": seqs, "length": length, "sdpa_ms": sdpa_ms,
                     "shipped_tile": list(shipped_tile), "shipped_ms": current and current["ms"],
                     "best": best, "candidates": results})
        line = f"{layout} {seqs}x{length}: sdpa {sdpa_ms:.4f} ms"
        if current:
            line += f"; shipped {tuple(shipped_tile)} {current['ms']:.4f} ms"
        if best:
            line += (f"; best {tuple(best['tile'])}{'' if best['packed'] else ' unpacked'} {best['ms']:.4f} ms "
                     f"({best['tflops']:.0f} TFLOP/s)")
        print(line, flush=True)
        del k_cache, v_cache, k, v, q, want
        torch.cuda.empty_cache()
    return {"device": torch.cuda.get_device_name(), "dtype": "bfloat16", "rows": rows}


def main(argv: list[str] | None = None) -> dict[str, Any]:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--iters", type=int, default=10)
    p.add_argument("--budget", type=float, default=150.0, help="seconds; later candidates are skipped past it")
    p.add_argument("--out", default="results/kernel_configs.json")
    args = p.parse_args(argv)
    if not torch.cuda.is_available():
        raise SystemExit("kernel_configs sweeps Triton tiles on a CUDA GPU")
    report = sweep(args)
    write_json(report, args.out)
    print(f"wrote {args.out}")
    return report


if __name__ == "__main__":
    main()
