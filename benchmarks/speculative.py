"""What speculative decoding by prompt lookup buys: the same greedy prompts with it off and on,
in the same run, the configurations alternated each round (medians of `--rounds`).

Two workloads: "edit" asks to rewrite a piece of code (the answer repeats its prompt: prompt
lookup's case) and "chat" asks open questions (little to look up). Each runs one request at a
time ("batch 1": a user's latency) and all at once ("batch N"). Reported per configuration:
output tokens/s, the acceptance rate (accepted / draft tokens), tokens a verified step emitted
(1 + accepted / drafts), and whether the tokens equal the run without speculation (greedy:
they should, but for near-ties that the verifying forward, which batches positions differently,
breaks the other way).

    python -m benchmarks.speculative --out results/speculative.json
"""

from __future__ import annotations

import argparse
import os
import statistics
import sys
import time
from typing import Any

if __package__ in (None, ""):  # run as a file: make the repo root importable
    sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

from benchmarks.report import write_json
from engine.llm import LLM
from engine.sampling_params import SamplingParams

CODE = [
    "def area(w, h):\n    return w * h\n\n\ndef perimeter(w, h):\n    return 2 * (w + h)\n\n\n"
    "def diagonal(w, h):\n    return (w ** 2 + h ** 2) ** 0.5\n",
    "class Stack:\n    def __init__(self):\n        self.items = []\n\n    def push(self, item):\n"
    "        self.items.append(item)\n\n    def pop(self):\n        return self.items.pop()\n\n"
    "    def peek(self):\n        return self.items[-1]\n",
    "def mean(xs):\n    return sum(xs) / len(xs)\n\n\ndef variance(xs):\n    m = mean(xs)\n"
    "    return sum((x - m) ** 2 for x in xs) / len(xs)\n",
    "def fizzbuzz(n):\n    for i in range(1, n + 1):\n        if i % 15 == 0:\n            print('FizzBuzz')\n"
    "        elif i % 3 == 0:\n            print('Fizz')\n        elif i % 5 == 0:\n            print('Buzz')\n"
    "        else:\n            print(i)\n",
]
QUESTIONS = ["Why is the sky blue?", "Give three tips for sleeping well.", "What is a hash table?",
             "Write a short poem about the sea.", "How do vaccines work?", "What causes inflation?"]
WORKLOADS = ("edit", "chat")
DEFAULT_CONFIGS = ("off", "ngram:4:2:4", "ngram:8:2:4")


def conversations(workload: str, prompts: int) -> list[list[dict[str, str]]]:
    if workload == "edit":
        return [[{"role": "user", "content": "Add type hints to this code and return the whole code.\n\n"
                                             + CODE[i % len(CODE)]}] for i in range(prompts)]
    return [[{"role": "user", "content": QUESTIONS[i % len(QUESTIONS)]}] for i in range(prompts)]


def speculative_config(name: str) -> dict[str, Any] | None:
    """"off", or "ngram:K:MIN:MAX" (num_speculative_tokens, prompt_lookup_min, prompt_lookup_max)."""
    if name == "off":
        return None
    method, k, low, high = name.split(":")
    return {"method": method, "num_speculative_tokens": int(k), "prompt_lookup_min": int(low),
            "prompt_lookup_max": int(high)}


def run(llm: LLM, convs: list[list[dict[str, str]]], params: SamplingParams, one_at_a_time: bool) -> dict[str, Any]:
    stats = llm.engine.stats
    before = stats.num_drafts, stats.num_draft_tokens, stats.num_accepted_tokens
    t0 = time.perf_counter()
    if one_at_a_time:
        outs = [llm.chat(conv, params, use_tqdm=False)[0] for conv in convs]
    else:
        outs = llm.chat(convs, params, use_tqdm=False)
    seconds = time.perf_counter() - t0
    drafts, draft_tokens, accepted = (stats.num_drafts - before[0], stats.num_draft_tokens - before[1],
                                      stats.num_accepted_tokens - before[2])
    tokens = [o.outputs[0].token_ids for o in outs]
    return {"seconds": seconds, "tokens": sum(map(len, tokens)), "tok_s": sum(map(len, tokens)) / seconds,
            "acceptance": accepted / draft_tokens if draft_tokens else None,
            "tokens_per_verified_step": 1 + accepted / drafts if drafts else None, "token_ids": tokens}


def main(argv: list[str] | None = None) -> dict[str, Any]:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--model", default=None, help="a checkpoint (default: the embedded default model)")
    p.add_argument("--configs", default=",".join(DEFAULT_CONFIGS),
                   help="off and/or ngram:K:MIN:MAX, comma-separated (default: %(default)s)")
    p.add_argument("--prompts", type=int, default=4, help="prompts per workload (default: %(default)s)")
    p.add_argument("--max-tokens", type=int, default=128)
    p.add_argument("--rounds", type=int, default=3)
    p.add_argument("--threads", type=int, default=1)
    p.add_argument("--out", default="results/speculative.json")
    args = p.parse_args(argv)
    if min(args.prompts, args.max_tokens, args.rounds, args.threads) < 1:
        p.error("--prompts, --max-tokens, --rounds and --threads must be >= 1")
    names = args.configs.split(",")
    if "off" not in names:
        p.error("--configs must include off: the peer the others are compared with")
    import torch

    torch.set_num_threads(args.threads)
    llms = {name: LLM(args.model, speculative_config=speculative_config(name), kv_cache_memory_bytes=256 << 20)
            for name in names}
    params = SamplingParams(max_tokens=args.max_tokens, temperature=0.0)
    cases = [(w, one) for w in WORKLOADS for one in (True, False)]
    runs: dict[tuple[str, bool, str], list[dict[str, Any]]] = {(w, one, n): [] for w, one in cases for n in names}
    for _ in range(args.rounds):
        for workload, one in cases:
            convs = conversations(workload, args.prompts)
            for name in names:
                runs[workload, one, name].append(run(llms[name], convs, params, one))
    results = []
    for workload, one in cases:
        off = statistics.median(r["tok_s"] for r in runs[workload, one, "off"])
        reference = runs[workload, one, "off"][0]["token_ids"]
        for name in names:
            rs = runs[workload, one, name]
            tok_s = statistics.median(r["tok_s"] for r in rs)
            acceptance = [r["acceptance"] for r in rs if r["acceptance"] is not None]
            per_step = [r["tokens_per_verified_step"] for r in rs if r["tokens_per_verified_step"] is not None]
            results.append({
                "workload": workload, "batch": 1 if one else args.prompts, "config": name, "tok_s": tok_s,
                "speedup": tok_s / off, "acceptance": statistics.median(acceptance) if acceptance else None,
                "tokens_per_verified_step": statistics.median(per_step) if per_step else None,
                "tokens": rs[0]["tokens"],
                "same_tokens": sum(a == b for a, b in zip(rs[0]["token_ids"], reference)),
                "runs": [{k: v for k, v in r.items() if k != "token_ids"} for r in rs],
            })
    report = {"args": vars(args), "results": results}
    print(f"{'workload':<8} {'batch':>5} {'config':<12} {'tok/s':>8} {'vs off':>7} {'accepted':>9} "
          f"{'tok/step':>9} {'same':>6}")
    for r in results:
        acc = f"{r['acceptance']:.0%}" if r["acceptance"] is not None else "-"
        per = f"{r['tokens_per_verified_step']:.2f}" if r["tokens_per_verified_step"] is not None else "-"
        print(f"{r['workload']:<8} {r['batch']:>5} {r['config']:<12} {r['tok_s']:>8.1f} {r['speedup']:>6.2f}x "
              f"{acc:>9} {per:>9} {r['same_tokens']:>3}/{args.prompts}")
    write_json(report, args.out)
    return report


if __name__ == "__main__":
    main()
