"""What the hybrid KV cache manager buys a model with sliding-window layers (Gemma 2/3): the same
requests in the same KV memory, its sliding layers' blocks before their window given back to
the pool ("hybrid") or kept for the sequence's life ("kept", --disable-hybrid-kv-cache-manager),
in the same run, alternated each round (medians of `--rounds`).

Measured per configuration: the requests running at once (the most, and the mean over steps),
preemptions, the KV pool's peak use, output tokens/s and the wall time. Greedy and with the
same weights, both must give the same tokens (checked).

Also computed (the block manager's arithmetic, no model run): how many sequences of a given
length fit at once in a given KV memory for real Gemma 3 configs, each way.

    python -m benchmarks.hybrid_kv --out results/hybrid_kv.json
    python -m benchmarks.hybrid_kv --model configs/gemma-3-4b --dtype bfloat16 --num-requests 256 \\
        --prompt-len 4096 --output-len 256 --kv-cache-gib 8   # on a GPU
"""

from __future__ import annotations

import argparse
import os
import random
import statistics
import sys
import time
from typing import Any

if __package__ in (None, ""):  # run as a file: make the repo root importable
    sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

from benchmarks.report import alternated, write_json
from engine.config import ModelConfig
from engine.llm import LLM
from engine.model_runner import kv_block_bytes, kv_cache_groups
from engine.sampling_params import SamplingParams
from scheduler import KVCachePlan

CONFIGS = ("hybrid", "kept")


def run_once(llm: LLM, prompts: list[list[int]], output_len: int) -> dict[str, Any]:
    engine = llm.engine
    scheduler, bm = engine.scheduler, engine.scheduler.block_manager
    params = SamplingParams(max_tokens=output_len, temperature=0.0, ignore_eos=True)
    preemptions = scheduler.stats.num_preemptions
    for i, prompt in enumerate(prompts):
        engine.add_request(str(i), prompt, params)
    running: list[int] = []
    peak_used = 0
    tokens: dict[str, list[int]] = {}
    t0 = time.perf_counter()
    while engine.has_unfinished_requests():
        for out in engine.step(outputs="final"):
            tokens[out.request_id] = out.outputs[0].token_ids
        running.append(len(scheduler.running))
        peak_used = max(peak_used, bm.num_used_blocks)
    seconds = time.perf_counter() - t0
    llm.reset_prefix_cache()
    output_tokens = sum(map(len, tokens.values()))
    return {"seconds": seconds, "output_tok_s": output_tokens / seconds, "max_running": max(running),
            "mean_running": statistics.fmean(running), "preemptions": scheduler.stats.num_preemptions - preemptions,
            "peak_kv_use": peak_used / bm.num_blocks, "steps": len(running),
            "token_ids": [tokens[str(i)] for i in range(len(prompts))]}


def blocks_in(kv_bytes: int, model: ModelConfig, hybrid: bool, dtype_bytes: int, block_size: int = 16) -> int:
    """The pool's blocks in kv_bytes, as the engine groups the model's layers at its full length."""
    groups = kv_cache_groups(model, model.longest_sequence, hybrid)
    return kv_bytes // kv_block_bytes(model, groups, block_size, dtype_bytes)


def capacity(config_dir: str, kv_gib: float, sequence_len: int, dtype_bytes: int, block_size: int = 16,
             chunk: int = 2048) -> dict[str, Any]:
    """Sequences of `sequence_len` tokens that fit at once in `kv_gib` of KV, each way: the
    pool's blocks over what one decoding sequence holds (a sliding group: its window's)."""
    model = ModelConfig.from_dir(config_dir)
    windows = [model.window(layer) for layer in range(model.num_layers)]
    result: dict[str, Any] = {"model": os.path.basename(config_dir.rstrip("/")), "layers": model.num_layers,
                              "sliding_layers": sum(1 for w in windows if w), "window": max(windows),
                              "kv_gib": kv_gib, "sequence_len": sequence_len}
    for name, hybrid in (("hybrid", True), ("kept", False)):
        groups = kv_cache_groups(model, model.longest_sequence, hybrid)
        num_blocks = blocks_in(int(kv_gib * 2**30), model, hybrid, dtype_bytes, block_size)
        plan = KVCachePlan(groups, block_size, chunk)
        decoding = KVCachePlan(groups, block_size, 1).sequence_blocks(sequence_len)  # what a decoding sequence holds
        result[name] = {"groups": groups.num_groups, "num_blocks": num_blocks,
                        "blocks_per_sequence": decoding, "sequences": num_blocks // decoding,
                        "longest_sequence": plan.pool_tokens(num_blocks)}
    result["ratio"] = result["hybrid"]["sequences"] / max(1, result["kept"]["sequences"])
    return result


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--model", default="configs/gemma-3-small", help="a config dir (dummy weights) or checkpoint")
    p.add_argument("--load-format", default="dummy", choices=["auto", "dummy"])
    p.add_argument("--dtype", default="float32")
    p.add_argument("--device", default="auto")
    p.add_argument("--num-requests", type=int, default=24)
    p.add_argument("--prompt-len", type=int, default=768)
    p.add_argument("--output-len", type=int, default=96)
    p.add_argument("--kv-cache-gib", type=float, default=0.0234375, help="the KV memory, each way (default 24 MiB)")
    p.add_argument("--max-num-batched-tokens", type=int, default=1024)
    p.add_argument("--rounds", type=int, default=3)
    p.add_argument("--capacity-gib", type=float, default=20.0, help="the computed table's KV memory")
    p.add_argument("--capacity-len", type=int, default=32768, help="the computed table's sequence length")
    p.add_argument("--out", default="results/hybrid_kv.json")
    args = p.parse_args()

    rng = random.Random(0)
    model = ModelConfig.from_dir(args.model)
    prompts = [[rng.randrange(3, model.vocab_size) for _ in range(args.prompt_len)] for _ in range(args.num_requests)]
    budget = int(args.kv_cache_gib * 2**30)
    dtype_bytes = 4 if args.dtype == "float32" else 2
    llms = {}
    for name in CONFIGS:
        num_blocks = blocks_in(budget, model, name == "hybrid", dtype_bytes)
        llm = LLM(args.model, load_format=args.load_format, dtype=args.dtype, device=args.device,
                  max_num_batched_tokens=args.max_num_batched_tokens, disable_hybrid_kv_cache_manager=name == "kept",
                  num_kv_blocks=num_blocks, seed=0)
        run_once(llm, prompts[:2], 4)  # warm-up
        llms[name] = llm
    runs = alternated(CONFIGS, args.rounds, lambda name: run_once(llms[name], prompts, args.output_len))
    same = all(r["token_ids"] == runs["kept"][0]["token_ids"] for rs in runs.values() for r in rs)
    summary: dict[str, Any] = {}
    for name in CONFIGS:
        rs = runs[name]
        bm = llms[name].engine.scheduler.block_manager
        summary[name] = {key: statistics.median(r[key] for r in rs)
                         for key in ("seconds", "output_tok_s", "max_running", "mean_running", "preemptions",
                                     "peak_kv_use", "steps")}
        summary[name].update(num_blocks=bm.num_blocks, groups=bm.num_groups,
                             pool_tokens=llms[name].engine.scheduler.max_sequence_tokens)
    ratio = summary["hybrid"]["output_tok_s"] / summary["kept"]["output_tok_s"]
    capacities = [capacity(d, args.capacity_gib, args.capacity_len, 2)
                  for d in ("configs/gemma-3-4b",) if os.path.isdir(d)]

    print(f"{args.model}: {args.num_requests} requests of {args.prompt_len} + {args.output_len} tokens, "
          f"{budget / 2**20:.1f} MiB of KV, medians of {args.rounds} rounds, same tokens: {same}")
    print(f"{'':8} {'groups':>6} {'blocks':>7} {'tok/s':>8} {'seconds':>8} {'max run':>8} {'mean run':>9} "
          f"{'preempt':>8} {'peak KV':>8}")
    for name in CONFIGS:
        s = summary[name]
        print(f"{name:8} {s['groups']:>6} {s['num_blocks']:>7} {s['output_tok_s']:>8.1f} {s['seconds']:>8.2f} "
              f"{s['max_running']:>8} {s['mean_running']:>9.1f} {s['preemptions']:>8} {s['peak_kv_use']:>8.0%}")
    print(f"hybrid / kept output tok/s: {ratio:.2f}x")
    for c in capacities:
        print(f"{c['model']} ({c['sliding_layers']} of {c['layers']} layers sliding, window {c['window']}), "
              f"{c['kv_gib']} GiB of bf16 KV, sequences of {c['sequence_len']} tokens at once: "
              f"hybrid {c['hybrid']['sequences']}, kept {c['kept']['sequences']} ({c['ratio']:.1f}x)")
    report = {"args": vars(args), "same_tokens": same, "summary": summary, "ratio_tok_s": ratio,
              "capacity": capacities,
              "runs": {name: [{k: v for k, v in r.items() if k != "token_ids"} for r in rs] for name, rs in runs.items()}}
    write_json(report, args.out)
    print(f"wrote {args.out}")


if __name__ == "__main__":
    main()
