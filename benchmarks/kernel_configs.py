"""Configuration sweeps for the Triton attention kernels on one GPU, against what they pick now
and torch SDPA on contiguous K/V:

- prefill: which (BLOCK_M, BLOCK_N, num_warps, num_stages) is fastest on the shapes of
  benchmarks/kernels.py, with a kv head's query heads packed into the tile's rows (the default
  for power-of-two groups) and, for a few tiles, one query head per program. It swaps
  `_prefill_config` for each candidate (the launch reads it on every call), so each row is the
  shipped kernel with one other tile; a tile that does not compile (shared memory) is reported.
- decode: which split-K factor is fastest at small batch (where `_num_splits` splits), each
  forced through `num_splits=`, against the heuristic's own choice; with splits, also the
  partials merged by a second kernel (`merge_kernel_ms`) instead of by the last split.

Prefill runs as the engine calls it: q/k/v views of one projection, the new tokens' K/V passed
along. A few tiles also read the new keys from those rows instead of through the block table
(`new_kv="rows"`, and `"tma"`: through tensor descriptors, Hopper's TMA engine instead of
per-thread async copies). Both sweeps also run over caches of larger blocks (64 tokens: a key
tile then lies in one block, one block-id load per tile and contiguous rows, instead of a
lookup per token) with fewer prefill tiles, to show what the engine's block size costs the
kernels; there the prefill tiles also run with the cache's tiles loaded through tensor
descriptors (`cache_tma`).

From the two sweeps it recommends a tuning for this GPU (kernels/tuning.py: the prefill tile,
tiling and source of the new K/V, the decode split minimum; see `recommend`), which
`--write-tuning` saves.

    PYTHONPATH=. python3 -m benchmarks.kernel_configs --out results/kernel_configs.json
    PYTHONPATH=. python3 -m benchmarks.kernel_configs --write-tuning kernels/tuning/<GPU>.json
    python -m benchmarks.kernel_configs --tiny   # the Triton interpreter on the CPU, tiny shapes:
                                                 # only to exercise the script (times mean nothing)
"""

from __future__ import annotations

import argparse
import itertools
import math
import os
import time
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

import torch
import torch.nn.functional as F

from benchmarks.kernels import LAYOUTS, Timer, gathered, paged_cache, projection_views
from benchmarks.report import describe_prefill_candidate, write_json
from kernels.tuning import KernelTuning, write_tuning

MIN_KEYS_CANDIDATES = (32, 64, 128, 256)  # decode: the minimum keys per split, as what-ifs


@dataclass(frozen=True, slots=True)
class Sweep:
    device: str
    dtype: torch.dtype
    prefill_shapes: list[tuple[str, int, int]]  # (layout, sequences, length)
    tiles: list[tuple[int, int, int, int]]  # (BLOCK_M, BLOCK_N, num_warps, num_stages), heads packed
    unpacked_tiles: list[tuple[int, int, int, int]]  # the same, one query head per program
    new_kv_tiles: list[tuple[int, int, int, int]]  # packed, also with the new keys from their rows
    decode_shapes: list[tuple[str, int, int]]  # (layout, batch, context)
    splits: list[int]
    block_sizes: list[int]  # the first gets every tile; the others `large_block_tiles`
    large_block_tiles: list[tuple[int, int, int, int]]


GPU = Sweep(
    device="cuda", dtype=torch.bfloat16,
    prefill_shapes=[("llama-3-8b", 4, 4096), ("qwen3-0.6b", 4, 1024), ("llama-3-8b", 1, 512)],
    tiles=[(64, 32, 4, 2), (64, 64, 4, 2), (64, 64, 4, 3), (64, 64, 8, 2), (64, 128, 8, 2), (128, 32, 4, 2),
           (128, 32, 8, 3), (128, 64, 4, 2), (128, 64, 8, 2), (128, 64, 8, 3), (128, 128, 8, 2)],
    unpacked_tiles=[(64, 64, 4, 2), (128, 64, 8, 2), (128, 128, 8, 2)],
    # The last: the tile of Triton's FlashAttention tutorial on Hopper (3 stages: 224 KiB).
    new_kv_tiles=[(64, 64, 4, 2), (128, 64, 8, 2), (128, 128, 8, 2), (128, 128, 8, 3)],
    decode_shapes=[(layout, batch, ctx) for layout in ("llama-3-8b", "qwen3-0.6b") for batch in (1, 4, 16)
                   for ctx in (512, 2048, 8192)],
    splits=[1, 2, 4, 8, 16, 32, 64],
    block_sizes=[16, 64],
    large_block_tiles=[(64, 64, 4, 2), (128, 64, 8, 2), (128, 128, 8, 2)],
)
TINY = Sweep(
    device="cpu", dtype=torch.float32, prefill_shapes=[("qwen3-0.6b", 2, 20)], tiles=[(16, 16, 4, 1), (32, 16, 4, 1)],
    unpacked_tiles=[(16, 16, 4, 1)], new_kv_tiles=[(16, 16, 4, 1)], decode_shapes=[("llama-3-8b", 2, 40)],
    splits=[1, 2], block_sizes=[16, 32],
    large_block_tiles=[(16, 16, 4, 1)],
)


def _device_name(device: torch.device) -> str:
    return torch.cuda.get_device_name(device) if device.type == "cuda" else "cpu (Triton interpreter)"


def _release(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.empty_cache()


def sweep_decode(plan: Sweep, args: argparse.Namespace, rows: list[dict[str, Any]], save: Callable[[], None]) -> None:
    from kernels import triton_ops

    device, dtype = torch.device(plan.device), plan.dtype
    timer = Timer(device, args.iters, warmup=args.warmup)
    for (layout, batch, ctx), block_size in itertools.product(plan.decode_shapes, plan.block_sizes):
        hq, hkv, d, _, _ = LAYOUTS[layout]
        gen = torch.Generator(device=device).manual_seed(batch * ctx)
        k_cache, v_cache, tables = paged_cache([ctx] * batch, hkv, d, dtype, device, gen, block_size)
        lens = torch.full((batch,), ctx, dtype=torch.int32, device=device)
        q = torch.randn(batch, hq, d, generator=gen, device=device).to(dtype)
        scale = d**-0.5

        def run(splits: int | None, fused_merge: bool = True) -> torch.Tensor:
            return triton_ops.paged_decode_attention(q, k_cache, v_cache, tables, lens, scale, num_splits=splits,
                                                     fused_merge=fused_merge)

        want = run(None)
        width = tables.shape[1] * k_cache.shape[1]
        heuristic = triton_ops._num_splits(batch, hkv, width, device)
        # What the heuristic would pick with each candidate minimum of keys per split.
        by_min_keys = {str(keys): triton_ops._num_splits(batch, hkv, width, device, min_keys=keys)
                       for keys in MIN_KEYS_CANDIDATES}  # str keys: as they read back from the JSON
        k, v = gathered(k_cache, tables, ctx), gathered(v_cache, tables, ctx)
        sdpa_ms = timer(lambda: F.scaled_dot_product_attention(q[:, :, None], k, v, scale=scale, enable_gqa=True))
        candidates = []
        for splits in plan.splits:
            if splits > 1 and splits > ctx // 16:
                continue
            err = (run(splits).float() - want.float()).abs().max().item()
            candidate = {"splits": splits, "ms": timer(lambda: run(splits)), "max_abs_diff": err}
            if splits > 1:  # the partials merged by a second launch instead of the last split
                candidate["merge_kernel_ms"] = timer(lambda: run(splits, fused_merge=False))
            candidates.append(candidate)
        best = min(candidates, key=lambda r: r["ms"])
        shipped = next((r["ms"] for r in candidates if r["splits"] == heuristic), None)
        rows.append({"layout": layout, "batch": batch, "context": ctx, "block_size": block_size, "sdpa_ms": sdpa_ms,
                     "heuristic_splits": heuristic, "heuristic_ms": shipped, "best": best, "candidates": candidates,
                     "splits_by_min_keys": by_min_keys})
        print(f"decode {layout} b{batch} ctx{ctx} block {block_size}: sdpa {sdpa_ms:.4f} ms; heuristic {heuristic} splits "
              f"{'-' if shipped is None else format(shipped, '.4f')} ms; best {best['splits']} splits "
              f"{best['ms']:.4f} ms", flush=True)
        save()
        k_cache = v_cache = k = v = None  # freed (not del: the timed lambdas close over them)
        _release(device)


def sweep_prefill(plan: Sweep, args: argparse.Namespace, rows: list[dict[str, Any]], save: Callable[[], None]) -> None:
    from kernels import triton_ops

    device, dtype = torch.device(plan.device), plan.dtype
    timer = Timer(device, args.iters, warmup=args.warmup)
    shipped = triton_ops._prefill_config
    t_start = time.perf_counter()
    for (layout, seqs, length), block_size in itertools.product(plan.prefill_shapes, plan.block_sizes):
        # (tile, packed, cache_tma, new_kv)
        if block_size == plan.block_sizes[0]:
            # One head per program last: the first to go when the budget runs out.
            candidates = ([(tile, True, False, "cache") for tile in plan.tiles]
                          + [(tile, True, False, new_kv) for tile in plan.new_kv_tiles for new_kv in ("rows", "tma")]
                          + [(tile, False, False, "cache") for tile in plan.unpacked_tiles])
        else:
            candidates = [(tile, True, tma, "cache") for tile in plan.large_block_tiles for tma in (False, True)]
        hq, hkv, d, _, _ = LAYOUTS[layout]
        gen = torch.Generator(device=device).manual_seed(seqs * length)
        k_cache, v_cache, tables = paged_cache([length] * seqs, hkv, d, dtype, device, gen, block_size)
        lens = torch.full((seqs,), length, dtype=torch.int32, device=device)
        cu = torch.arange(seqs + 1, dtype=torch.int32, device=device) * length
        k, v = gathered(k_cache, tables, length), gathered(v_cache, tables, length)
        q = torch.randn(seqs * length, hq, d, generator=gen, device=device).to(dtype)
        q, key, value = projection_views(q, k, v)
        scale = d**-0.5
        flops = 4.0 * hq * d * seqs * length * (length + 1) / 2

        def run(packed: bool | None = None, cache_tma: bool = False, new_kv: str = "cache") -> torch.Tensor:
            return triton_ops.paged_prefill_attention(q, k_cache, v_cache, tables, cu, lens, scale, key=key,
                                                      value=value, new_kv=new_kv, pack_gqa=packed, cache_tma=cache_tma)

        want = run()
        q4 = q.view(seqs, length, hq, d).transpose(1, 2)
        sdpa_ms = timer(lambda: F.scaled_dot_product_attention(q4, k, v, scale=scale, is_causal=True,
                                                               enable_gqa=True))
        shipped_tile = shipped(d, dtype, device)
        results = []
        for tile, packed, cache_tma, new_kv in candidates:
            if time.perf_counter() - t_start > args.budget:
                break
            triton_ops._prefill_config = lambda *a, tile=tile: tile
            described = {"tile": list(tile), "packed": packed, "cache_tma": cache_tma, "new_kv": new_kv}
            try:
                err = (run(packed, cache_tma, new_kv).float() - want.float()).abs().max().item()
                ms = timer(lambda: run(packed, cache_tma, new_kv))
                results.append(described | {"ms": ms, "tflops": flops / ms / 1e9, "max_abs_diff": err})
            except Exception as e:  # noqa: BLE001 - a tile that does not fit is a result
                results.append(described | {"error": f"{type(e).__name__}: {str(e).splitlines()[0][:100]}"})
            finally:
                triton_ops._prefill_config = shipped
        ok = [r for r in results if "ms" in r]
        best = min(ok, key=lambda r: r["ms"]) if ok else None
        current = next((r for r in ok if tuple(r["tile"]) == tuple(shipped_tile) and r["packed"]
                        and not r["cache_tma"] and r["new_kv"] == "cache"), None)
        rows.append({"layout": layout, "seqs": seqs, "length": length, "block_size": block_size, "sdpa_ms": sdpa_ms,
                     "shipped_tile": list(shipped_tile), "shipped_ms": current and current["ms"],
                     "best": best, "candidates": results})
        line = f"prefill {layout} {seqs}x{length} block {block_size}: sdpa {sdpa_ms:.4f} ms"
        if current:
            line += f"; shipped {tuple(shipped_tile)} {current['ms']:.4f} ms"
        if best:
            line += (f"; best {describe_prefill_candidate(best)} {best['ms']:.4f} ms "
                     f"({best['tflops']:.0f} TFLOP/s)")
        print(line, flush=True)
        save()
        k_cache = v_cache = k = v = q = want = None  # freed (not del: the timed lambdas close over them)
        _release(device)


def _geomean(xs: list[float]) -> float:
    return math.exp(sum(math.log(x) for x in xs) / len(xs))


def recommend(report: dict[str, Any]) -> tuple[KernelTuning, dict[str, Any]]:
    """The tuning the sweep supports, and the scores behind it (geometric mean over the swept
    shapes of time / that shape's best time; 1.0 = best everywhere). Only what the engine can
    run counts: the smallest block size, the cache's tiles through pointer loads.
    - prefill: the (tile, tiling, source of the new K/V) with the lowest score among those
      measured on every shape;
    - decode: the minimum keys per split whose heuristic choice scores lowest, each shape timed
      at the largest swept split count not above that choice. Ties keep the built-in value."""
    from kernels import triton_ops

    def engine_block_size(rows: list[dict[str, Any]]) -> list[dict[str, Any]]:
        small = min((r["block_size"] for r in rows), default=None)
        return [r for r in rows if r["block_size"] == small]

    tile, pack, new_kv, keys, measured = None, None, None, None, {}
    rows = [r for r in engine_block_size(report.get("rows", [])) if r.get("best")]
    if rows:
        times = [{(tuple(c["tile"]), c["packed"], c.get("new_kv", "cache")): c["ms"] for c in r["candidates"]
                  if "ms" in c and not c.get("cache_tma")} for r in rows]
        common = set.intersection(*(set(t) for t in times))
        scores = {k: _geomean([t[k] / min(t.values()) for t in times]) for k in common}
        if scores:
            (tile, pack, new_kv), score = min(scores.items(), key=lambda kv: kv[1])
            measured["prefill"] = {"tile": list(tile), "packed": pack, "new_kv": new_kv, "score": round(score, 4),
                                   "shapes": [f"{r['layout']} {r['seqs']}x{r['length']}" for r in rows]}
    decode = engine_block_size(report.get("decode", []))
    if decode:
        def time_at(row: dict[str, Any], splits: int) -> float:
            fits = [c for c in row["candidates"] if c["splits"] <= splits]
            return max(fits, key=lambda c: c["splits"])["ms"]

        scores = {}
        for k in sorted(MIN_KEYS_CANDIDATES, key=lambda k: k != triton_ops.MIN_SPLIT_KEYS):  # built-in first
            chosen = [r["splits_by_min_keys"][str(k)] for r in decode]
            scores[k] = _geomean([time_at(r, s) / r["best"]["ms"] for r, s in zip(decode, chosen)])
        keys = min(scores, key=lambda k: scores[k])  # the first of equals: the built-in
        measured["decode"] = {"min_split_keys_scores": {str(k): round(v, 4) for k, v in scores.items()},
                              "shapes": [f"{r['layout']} n{r['batch']} ctx{r['context']}" for r in decode]}
    return KernelTuning(prefill_tile=tile, pack_gqa=pack, prefill_new_kv=new_kv, min_split_keys=keys), measured


def main(argv: list[str] | None = None) -> dict[str, Any]:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--iters", type=int, default=10)
    p.add_argument("--warmup", type=int, default=2, help="untimed runs before the timed ones")
    p.add_argument("--budget", type=float, default=150.0, help="seconds; later prefill tiles are skipped past it")
    p.add_argument("--out", default="results/kernel_configs.json")
    p.add_argument("--only", nargs="*", default=["prefill", "decode"], choices=["prefill", "decode"])
    p.add_argument("--tiny", action="store_true", help="the interpreter on the CPU at tiny sizes (exercises the script)")
    p.add_argument("--write-tuning", default=None, metavar="PATH",
                   help="write the tuning the sweep supports (kernels/tuning.py; STOKE_KERNEL_TUNING=PATH uses it, "
                        "kernels/tuning/<GPU>.json ships it)")
    args = p.parse_args(argv)
    if args.tiny:
        os.environ["TRITON_INTERPRET"] = "1"  # before the kernel modules are imported
        plan = TINY
    elif torch.cuda.is_available():
        plan = GPU
    else:
        raise SystemExit("kernel_configs sweeps the Triton kernels on a CUDA GPU (--tiny: the interpreter)")
    report: dict[str, Any] = {"device": _device_name(torch.device(plan.device)),
                              "dtype": str(plan.dtype).removeprefix("torch."), "rows": [], "decode": []}

    def save() -> None:  # after every shape: a run cut short keeps what it measured, and its tuning
        tuning, measured = recommend(report)
        report["recommended"] = tuning.as_json() | measured
        write_json(report, args.out)
        if args.write_tuning:
            write_tuning(tuning, report["device"], args.write_tuning, measured)

    if "prefill" in args.only:
        sweep_prefill(plan, args, report["rows"], save)
    if "decode" in args.only:
        sweep_decode(plan, args, report["decode"], save)
    save()
    print(f"recommended: {report['recommended']}")
    print(f"wrote {args.out}" + (f" and the tuning to {args.write_tuning}" if args.write_tuning else ""))
    return report


if __name__ == "__main__":
    main()
