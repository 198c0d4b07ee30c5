"""What KV offloading buys (the prefix cache's host tier, `--kv-offloading-size`): chats whose
histories outgrow the KV pool, served with the evicted blocks saved to host memory and loaded
back ("offload") and without ("none"), in the same run, alternated each round (medians of
`--rounds`).

The workload is a server's with more chat users than its pool holds: `--chats` conversations
share a system prompt; each turn, every chat sends its whole history (the system prompt, its
earlier turns and answers) and `--user-len` new tokens, and gets `--output-len` tokens back;
`--max-num-seqs` run at once. The pool holds those running (`--num-kv-blocks`, default: their
longest conversations), not every chat's history, so by a chat's next turn its blocks were
evicted: without a host tier its history is computed again, with one it is loaded back.

Measured per configuration: the wall time, output tokens/s, time to first token (p50, p99) from
each turn's arrival, prompt tokens computed (those the prefix cache did not hold at admission; a
preempted request's recomputation is not counted) and the hit rate, blocks saved and loaded,
preemptions. Greedy, both must give the same tokens (checked).

    python -m benchmarks.kv_offload --out results/kv_offload.json   # the embedded default model, CPU
    python -m benchmarks.kv_offload --model configs/qwen3-0.6b --load-format dummy --dtype bfloat16 \\
        --chats 32 --turns 3 --system-len 1024 --user-len 512 --output-len 64 --max-num-seqs 16   # a GPU
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
from engine.llm import LLM
from engine.sampling_params import SamplingParams

CONFIGS = ("offload", "none")


def run_once(llm: LLM, args: argparse.Namespace) -> dict[str, Any]:
    """Every turn of every chat, a turn's requests arriving together; the caches emptied after."""
    engine = llm.engine
    bm = engine.scheduler.block_manager
    vocab = engine.model_config.vocab_size
    rng = random.Random(0)
    system = [rng.randrange(3, vocab) for _ in range(args.system_len)]
    histories = [list(system) for _ in range(args.chats)]
    params = SamplingParams(max_tokens=args.output_len, temperature=0.0, ignore_eos=True)
    before = (bm.stats.queries_tokens, bm.stats.hits_tokens, bm.stats.saved_blocks, bm.stats.loaded_blocks,
              engine.scheduler.stats.num_preemptions)
    ttfts: list[float] = []
    answers: list[list[int]] = []
    output_tokens = 0
    t0 = time.perf_counter()
    for turn in range(args.turns):
        for i, history in enumerate(histories):
            history += [rng.randrange(3, vocab) for _ in range(args.user_len)]
            engine.add_request(f"{turn}-{i}", list(history), params)
        while engine.has_unfinished_requests():
            for out in engine.step(outputs="final"):
                i = int(out.request_id.split("-")[1])
                tokens = list(out.outputs[0].token_ids)
                histories[i] += tokens
                answers.append(tokens)
                output_tokens += len(tokens)
                ttfts.append(out.metrics.first_token_time - out.metrics.arrival_time)
    seconds = time.perf_counter() - t0
    queries, hits, saved, loaded, preemptions = (now - then for now, then in zip(
        (bm.stats.queries_tokens, bm.stats.hits_tokens, bm.stats.saved_blocks, bm.stats.loaded_blocks,
         engine.scheduler.stats.num_preemptions), before))
    llm.reset_prefix_cache()
    ttfts.sort()
    return {"seconds": seconds, "output_tok_s": output_tokens / seconds,
            "ttft_p50": statistics.median(ttfts), "ttft_p99": ttfts[min(len(ttfts) - 1, int(0.99 * len(ttfts)))],
            "prompt_tokens": queries, "computed_prompt_tokens": queries - hits, "hit_rate": hits / queries,
            "saved_blocks": saved, "loaded_blocks": loaded, "preemptions": preemptions,
            "answers": answers}


def main(argv: list[str] | None = None) -> dict[str, Any]:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--model", default=None, help="a checkpoint or config dir (default: the embedded default model)")
    p.add_argument("--load-format", default="auto", choices=["auto", "dummy"])
    p.add_argument("--dtype", default="auto")
    p.add_argument("--device", default="auto")
    p.add_argument("--chats", type=int, default=8)
    p.add_argument("--turns", type=int, default=3)
    p.add_argument("--system-len", type=int, default=128)
    p.add_argument("--user-len", type=int, default=96)
    p.add_argument("--output-len", type=int, default=24)
    p.add_argument("--max-num-seqs", type=int, default=4)
    p.add_argument("--block-size", type=int, default=16)
    p.add_argument("--num-kv-blocks", type=int, default=None,
                   help="the pool (default: --max-num-seqs of the longest conversations)")
    p.add_argument("--kv-offloading-size", type=float, default=None,
                   help="GiB of host memory (default: every chat's whole history)")
    p.add_argument("--max-num-batched-tokens", type=int, default=2048)
    p.add_argument("--rounds", type=int, default=3)
    p.add_argument("--out", default="results/kv_offload.json")
    args = p.parse_args(argv)

    longest = args.system_len + args.turns * (args.user_len + args.output_len)
    blocks_per_chat = -(-longest // args.block_size)
    num_blocks = args.num_kv_blocks or args.max_num_seqs * blocks_per_chat
    common = dict(load_format=args.load_format, dtype=args.dtype, device=args.device, block_size=args.block_size,
                  max_num_seqs=args.max_num_seqs, max_num_batched_tokens=args.max_num_batched_tokens,
                  num_kv_blocks=num_blocks, seed=0)
    llms: dict[str, LLM] = {"none": LLM(args.model, **common)}
    host_gib = args.kv_offloading_size
    if host_gib is None:
        host_gib = args.chats * blocks_per_chat * llms["none"].engine.runner.block_bytes / 2**30
    llms["offload"] = LLM(args.model, kv_offloading_size=host_gib, **common)
    for llm in llms.values():  # warm-up
        llm.generate([[5] * 8], SamplingParams(max_tokens=2), use_tqdm=False)
    runs = alternated(CONFIGS, args.rounds, lambda name: run_once(llms[name], args))
    same = all(r["answers"] == runs["none"][0]["answers"] for rs in runs.values() for r in rs)
    keys = ("seconds", "output_tok_s", "ttft_p50", "ttft_p99", "prompt_tokens", "computed_prompt_tokens",
            "hit_rate", "saved_blocks", "loaded_blocks", "preemptions")
    summary = {name: {key: statistics.median(r[key] for r in runs[name]) for key in keys} for name in CONFIGS}
    for name in CONFIGS:
        summary[name]["num_host_blocks"] = llms[name].engine.runner.num_host_blocks
    ratios = {"output_tok_s": summary["offload"]["output_tok_s"] / summary["none"]["output_tok_s"],
              "ttft_p50": summary["none"]["ttft_p50"] / summary["offload"]["ttft_p50"],
              "ttft_p99": summary["none"]["ttft_p99"] / summary["offload"]["ttft_p99"]}
    model = os.path.basename((args.model or llms["none"].engine.model_path).rstrip("/"))
    print(f"{model}: {args.chats} chats x {args.turns} turns ({args.system_len} system + {args.user_len} user + "
          f"{args.output_len} answer tokens a turn), {args.max_num_seqs} at once, {num_blocks} KV blocks of "
          f"{args.block_size}; medians of {args.rounds} rounds; same tokens: {same}")
    print(f"{'':8} {'host blocks':>11} {'seconds':>8} {'tok/s':>7} {'TTFT p50':>9} {'TTFT p99':>9} "
          f"{'computed':>9} {'hit rate':>9} {'saved':>6} {'loaded':>7}")
    for name in CONFIGS:
        s = summary[name]
        print(f"{name:8} {s['num_host_blocks']:>11} {s['seconds']:>8.2f} {s['output_tok_s']:>7.1f} "
              f"{s['ttft_p50']:>9.3f} {s['ttft_p99']:>9.3f} {s['computed_prompt_tokens']:>9.0f} "
              f"{s['hit_rate']:>9.1%} {s['saved_blocks']:>6.0f} {s['loaded_blocks']:>7.0f}")
    print(f"offload / none: {ratios['output_tok_s']:.2f}x the output tok/s; TTFT {ratios['ttft_p50']:.2f}x lower at "
          f"p50, {ratios['ttft_p99']:.2f}x at p99")
    tier = llms["offload"].engine.runner.host_kv
    report = {"args": vars(args), "model": model, "num_kv_blocks": num_blocks, "kv_offloading_gib": host_gib,
              "host_pinned": tier.pinned, "host_bytes": tier.host.nbytes,
              "same_tokens": same, "summary": summary, "ratios": ratios,
              "runs": {name: [{k: v for k, v in r.items() if k != "answers"} for r in rs] for name, rs in runs.items()}}
    write_json(report, args.out)
    print(f"wrote {args.out}")
    return report


if __name__ == "__main__":
    main()
