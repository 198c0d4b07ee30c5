"""What beam search costs, and what running it inside the engine buys, on the same prompts in
the same run:

- `stoke`: `LLM.beam_search` over every prompt at once: each beam a request of the continuous
  batch, a beam that continues another's forking a request with its parent's KV (full blocks
  shared, the partial last one copied);
- `stoke, one search at a time`: the same with `concurrency_limit=1`;
- `per-step requests`: vLLM's way (its `LLM.beam_search`), over the same engine: every step,
  every beam is a new one-token request with 2 x width logprobs, its prompt found in the prefix
  cache up to its last full block;
- `transformers`: `generate(num_beams=width)`, one prompt at a time (its beams in one batch).

End tokens are ignored, so every sequence runs `--max-tokens` and the cases compute the same
searches: their sequences are checked to be the same. Reported per case (median of
`--rounds`): wall seconds, sequence tokens/s (prompts x width x max_tokens over the wall time),
the engine's tokens computed per sequence token (1.0: no recomputation), and the speed against
transformers.

    python -m benchmarks.beam_search --out results/beam_search.json
"""

from __future__ import annotations

import argparse
import os
import random
import sys
import time
from typing import Any

if __package__ in (None, ""):  # run as a file: make the repo root importable
    sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

import torch

from benchmarks.report import alternated, median_results, write_json
from engine.beam_search import BeamSearchParams
from engine.llm import LLM
from engine.sampling_params import SamplingParams

CASES = ("stoke", "stoke, one search at a time", "per-step requests", "transformers")


def _prompts(count: int, lo: int, hi: int, vocab: int, seed: int = 0) -> list[list[int]]:
    rng = random.Random(seed)
    return [[rng.randrange(10, min(vocab, 30000)) for _ in range(rng.randint(lo, hi))] for _ in range(count)]


def per_step_requests(llm: LLM, prompts: list[list[int]], width: int, max_tokens: int) -> list[list[list[int]]]:
    """vLLM's beam search (end tokens ignored): every step a one-token request per beam."""
    params = SamplingParams(max_tokens=1, temperature=0.0, logprobs=2 * width, ignore_eos=True, detokenize=False)
    beams = [[(list(p), 0.0)] for p in prompts]
    for _ in range(max_tokens):
        flat = [tokens for group in beams for tokens, _ in group]
        outputs = iter(llm.generate(flat, params, use_tqdm=False))
        for g, group in enumerate(beams):
            candidates = []
            for tokens, score in group:
                top = next(outputs).outputs[0].logprobs[0]
                candidates += [(tokens + [t], score + float(lp)) for t, lp in top.items()]
            beams[g] = sorted(candidates, key=lambda c: -c[1])[:width]
    return [[tokens[len(p):] for tokens, _ in group] for p, group in zip(prompts, beams)]


def transformers_beams(model: Any, prompts: list[list[int]], width: int, max_tokens: int) -> list[list[list[int]]]:
    results = []
    for prompt in prompts:
        ids = torch.tensor([prompt])
        with torch.inference_mode():
            out = model.generate(ids, attention_mask=torch.ones_like(ids), max_new_tokens=max_tokens, num_beams=width,
                                 num_return_sequences=width, do_sample=False, eos_token_id=None, pad_token_id=0)
        results.append([row[len(prompt):] for row in out.tolist()])
    return results


def run_case(case: str, llm: LLM, model: Any, prompts: list[list[int]], width: int,
             max_tokens: int) -> dict[str, Any]:
    stats = llm.engine.stats
    computed = stats.num_batched_tokens
    llm.reset_prefix_cache()  # each case finds the prompts uncached
    t0 = time.perf_counter()
    if case.startswith("stoke"):
        params = BeamSearchParams(beam_width=width, max_tokens=max_tokens, ignore_eos=True)
        outputs = llm.beam_search(prompts, params, concurrency_limit=1 if "one" in case else None)
        sequences = [[s.tokens[len(p):] for s in o.sequences] for p, o in zip(prompts, outputs)]
    elif case == "per-step requests":
        sequences = per_step_requests(llm, prompts, width, max_tokens)
    else:
        sequences = transformers_beams(model, prompts, width, max_tokens)
    wall = time.perf_counter() - t0
    tokens = len(prompts) * width * max_tokens
    computed = stats.num_batched_tokens - computed
    return {"case": case, "seconds": wall, "tok_s": tokens / wall, "sequences": sequences,
            "computed_per_token": None if case == "transformers"
            else round((computed - sum(len(p) for p in prompts)) / tokens, 3)}


def main(argv: list[str] | None = None) -> dict[str, Any]:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--model", default=None, help="a checkpoint directory (default: the embedded model)")
    parser.add_argument("--num-prompts", type=int, default=8)
    parser.add_argument("--prompt-len", type=int, nargs=2, default=(64, 192), metavar=("MIN", "MAX"))
    parser.add_argument("--width", type=int, default=4)
    parser.add_argument("--max-tokens", type=int, default=32)
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument("--threads", type=int, default=None, help="torch CPU threads")
    parser.add_argument("--out", default="results/beam_search.json")
    args = parser.parse_args(argv)
    if args.threads:
        torch.set_num_threads(args.threads)
    import transformers

    llm = LLM(args.model)
    model = transformers.AutoModelForCausalLM.from_pretrained(llm.engine.model_path, dtype=torch.float32).eval()
    prompts = _prompts(args.num_prompts, *args.prompt_len, llm.engine.model_config.vocab_size)
    runs = alternated(CASES, args.rounds, lambda case: run_case(case, llm, model, prompts, args.width, args.max_tokens))
    reference = runs["transformers"][0]["sequences"]
    results = median_results(runs, "transformers", "vs_transformers", 2, without="sequences")
    for r in results:
        first = runs[r["case"]][0]
        r["computed_per_token"] = first["computed_per_token"]
        r["same_as_transformers"] = sum(a == b for a, b in zip(first["sequences"], reference))
    report = {"args": vars(args), "device": "cpu", "threads": torch.get_num_threads(), "results": results}
    print(f"beam search: {args.num_prompts} prompts of {args.prompt_len[0]}-{args.prompt_len[1]} tokens, width "
          f"{args.width}, {args.max_tokens} tokens, {torch.get_num_threads()} threads (medians of {args.rounds})")
    print(f"{'case':<30} {'seconds':>8} {'tok/s':>8} {'vs HF':>7} {'computed/tok':>13} {'same':>6}")
    for r in results:
        computed = "-" if r["computed_per_token"] is None else f"{r['computed_per_token']:.2f}"
        print(f"{r['case']:<30} {r['seconds']:>8.3f} {r['tok_s']:>8.1f} {r['vs_transformers']:>6.2f}x "
              f"{computed:>13} {r['same_as_transformers']:>3}/{args.num_prompts}")
    write_json(report, args.out)
    return report


if __name__ == "__main__":
    main()
