"""What verifying drafts costs on this device, without a real model: dummy weights, and an
oracle proposer that knows each prompt's greedy answer and makes every draft right with
probability `--acceptance` (the first wrong one ends the drafts). Output tokens/s with drafts
against the same engine without them (its proposer removed: async scheduling, where the device
has it, resumes), at each batch size, in the same run, alternated each round (medians).

Prompt lookup's real acceptance depends on the model and the task (benchmarks/speculative.py
measures it on the embedded model); this measures the other half, what a verified position
costs: nearly nothing where a step is bound by reading the weights (a GPU at small batches),
real compute where it is not.

    python -m benchmarks.speculative_cost --model configs/qwen3-0.6b --out results/speculative_cost.json
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

from benchmarks.report import write_json
from engine.llm import LLM
from engine.sampling_params import SamplingParams
from engine.speculative import NgramProposer


def oracle(proposer: NgramProposer, answers: dict[tuple[int, ...], list[int]], acceptance: float, vocab: int,
           rng: random.Random) -> NgramProposer:
    """`proposer` with its lookup replaced by the answers, each draft right with probability
    `acceptance`."""

    def propose(request: Any, token_ids: list[int], max_drafts: int) -> list[int]:
        done = len(token_ids) - request.num_prompt_tokens
        drafts = answers[tuple(request.prompt_token_ids)][done:done + min(proposer.config.num_speculative_tokens,
                                                                          max_drafts)]
        for i, token in enumerate(drafts):
            if rng.random() >= acceptance:
                return drafts[:i] + [(token + 1) % vocab]
        return drafts

    proposer.propose = propose
    return proposer


def timed(llm: LLM, prompts: list[list[int]], params: SamplingParams) -> tuple[float, list[list[int]]]:
    t0 = time.perf_counter()
    outs = llm.generate([{"prompt_token_ids": p} for p in prompts], params, use_tqdm=False)
    return time.perf_counter() - t0, [o.outputs[0].token_ids for o in outs]


def main(argv: list[str] | None = None) -> dict[str, Any]:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--model", default="configs/qwen3-0.6b", help="a config dir (dummy weights)")
    p.add_argument("--batches", default="1,8,32", help="batch sizes, comma-separated (default: %(default)s)")
    p.add_argument("--num-speculative-tokens", type=int, default=4)
    p.add_argument("--acceptance", type=float, default=0.8, help="each draft right with this probability")
    p.add_argument("--prompt-len", type=int, default=256)
    p.add_argument("--max-tokens", type=int, default=128)
    p.add_argument("--rounds", type=int, default=3)
    p.add_argument("--device", default="auto")
    p.add_argument("--threads", type=int, default=1, help="torch threads on the CPU")
    p.add_argument("--out", default="results/speculative_cost.json")
    args = p.parse_args(argv)
    batches = [int(b) for b in args.batches.split(",")]
    if min(batches + [args.num_speculative_tokens, args.prompt_len, args.max_tokens, args.rounds]) < 1 \
            or not 0.0 <= args.acceptance <= 1.0:
        p.error("sizes must be >= 1 and --acceptance in [0, 1]")
    import torch

    torch.set_num_threads(args.threads)
    llm = LLM(args.model, load_format="dummy", device=args.device, max_num_seqs=max(batches),
              speculative_config={"method": "ngram", "num_speculative_tokens": args.num_speculative_tokens},
              gpu_memory_utilization=0.5, kv_cache_memory_bytes=512 << 20)
    engine = llm.engine
    vocab = engine.model_config.vocab_size
    rng = random.Random(0)
    prompts = [[rng.randrange(vocab) for _ in range(args.prompt_len)] for _ in range(max(batches))]
    params = SamplingParams(max_tokens=args.max_tokens, temperature=0.0, ignore_eos=True)
    proposer, engine.proposer = engine.proposer, None
    answers: dict[tuple[int, ...], list[int]] = {}
    for prompt, answer in zip(prompts, timed(llm, prompts, params)[1]):  # also the warm-up
        answers[tuple(prompt)] = answer
    oracle(proposer, answers, args.acceptance, vocab, rng)
    runs: dict[tuple[int, bool], list[dict[str, Any]]] = {(b, s): [] for b in batches for s in (False, True)}
    for _ in range(args.rounds):
        for b in batches:
            for speculate in (False, True):
                engine.proposer = proposer if speculate else None
                stats = engine.stats
                before = stats.num_draft_tokens, stats.num_accepted_tokens, stats.num_steps
                seconds, tokens = timed(llm, prompts[:b], params)
                runs[b, speculate].append({
                    "seconds": seconds, "tok_s": sum(map(len, tokens)) / seconds,
                    "steps": stats.num_steps - before[2], "draft_tokens": stats.num_draft_tokens - before[0],
                    "accepted": stats.num_accepted_tokens - before[1],
                    "same_tokens": sum(t == answers[tuple(q)] for t, q in zip(tokens, prompts)),
                })
    results = []
    for b in batches:
        off = statistics.median(r["tok_s"] for r in runs[b, False])
        for speculate in (False, True):
            rs = runs[b, speculate]
            tok_s = statistics.median(r["tok_s"] for r in rs)
            drafted = sum(r["draft_tokens"] for r in rs)
            results.append({"batch": b, "drafts": speculate, "tok_s": tok_s, "speedup": tok_s / off,
                            "ms_per_step": statistics.median(r["seconds"] / r["steps"] * 1e3 for r in rs),
                            "acceptance": sum(r["accepted"] for r in rs) / drafted if drafted else None,
                            "same_tokens": min(r["same_tokens"] for r in rs), "runs": rs})
    report = {"args": vars(args), "device": str(engine.runner.device), "async_scheduling": engine.async_scheduling,
              "results": results}
    print(f"{args.model} on {engine.runner.device}, k={args.num_speculative_tokens}, oracle acceptance "
          f"{args.acceptance}:")
    print(f"{'batch':>5} {'drafts':>6} {'tok/s':>9} {'vs off':>7} {'ms/step':>8} {'accepted':>9} {'same':>6}")
    for r in results:
        acc = f"{r['acceptance']:.0%}" if r["acceptance"] is not None else "-"
        print(f"{r['batch']:>5} {'on' if r['drafts'] else 'off':>6} {r['tok_s']:>9.1f} {r['speedup']:>6.2f}x "
              f"{r['ms_per_step']:>8.2f} {acc:>9} {r['same_tokens']:>3}/{r['batch']}")
    write_json(report, args.out)
    return report


if __name__ == "__main__":
    main()
