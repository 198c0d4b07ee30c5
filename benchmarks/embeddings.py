"""Embedding throughput, stoke against transformers, on the same prompts in the same run:

- `stoke`: `LLM.embed` over every prompt at once (continuous batching, chunked prefill), the
  prefix cache on: prompts that share an instruction (`--shared-prefix` tokens, as E5 or
  Qwen3-Embedding queries do) compute it once;
- `stoke, no prefix cache`: the same engine settings with `enable_prefix_caching=False`;
- `transformers, batches`: `AutoModel` over length-sorted padded batches of `--batch-size`
  (what sentence-transformers' `encode` does), the last real token's hidden states;
- `transformers, one at a time`: `AutoModel` per prompt, no padding (the reference vectors).

The model pools as its pooler config says (the last token, normalised, for a decoder without
sentence-transformers files); the transformers cases pool the same way. Reported per case
(median of `--rounds`): wall seconds, prompt tokens/s, the speed against transformers'
batches, the prompt tokens stoke computed (the rest were prefix-cache hits), and the largest
difference of any vector component from the reference.

    python -m benchmarks.embeddings --out results/embeddings.json
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

from benchmarks.report import alternated, pooling_results, write_json
from engine.llm import LLM

CASES = ("stoke", "stoke, no prefix cache", "transformers, batches", "transformers, one at a time")


def _prompts(count: int, lo: int, hi: int, shared: int, vocab: int, seed: int = 0) -> list[list[int]]:
    rng = random.Random(seed)
    prefix = [rng.randrange(10, min(vocab, 30000)) for _ in range(shared)]
    return [prefix + [rng.randrange(10, min(vocab, 30000)) for _ in range(rng.randint(lo, hi))] for _ in range(count)]


def _pool(hidden: torch.Tensor, pooling_type: str, normalize: bool) -> torch.Tensor:
    """One prompt's hidden states [len, hidden] pooled as stoke's pooler config says."""
    vector = {"LAST": hidden[-1], "MEAN": hidden.mean(dim=0), "CLS": hidden[0]}[pooling_type]
    return torch.nn.functional.normalize(vector, dim=-1) if normalize else vector


def transformers_batches(model: Any, prompts: list[list[int]], batch_size: int, pooling_type: str,
                         normalize: bool) -> list[torch.Tensor]:
    order = sorted(range(len(prompts)), key=lambda i: len(prompts[i]))
    vectors: dict[int, torch.Tensor] = {}
    for start in range(0, len(order), batch_size):
        rows = order[start:start + batch_size]
        width = max(len(prompts[i]) for i in rows)
        ids = torch.zeros((len(rows), width), dtype=torch.long)
        mask = torch.zeros((len(rows), width), dtype=torch.long)
        for r, i in enumerate(rows):  # right padding: a causal model's real tokens never see it
            ids[r, :len(prompts[i])] = torch.tensor(prompts[i])
            mask[r, :len(prompts[i])] = 1
        with torch.inference_mode():
            hidden = model(input_ids=ids, attention_mask=mask).last_hidden_state
        for r, i in enumerate(rows):
            vectors[i] = _pool(hidden[r, :len(prompts[i])], pooling_type, normalize)
    return [vectors[i] for i in range(len(prompts))]


def transformers_one_at_a_time(model: Any, prompts: list[list[int]], pooling_type: str,
                               normalize: bool) -> list[torch.Tensor]:
    vectors = []
    for prompt in prompts:
        with torch.inference_mode():
            vectors.append(_pool(model(torch.tensor([prompt])).last_hidden_state[0], pooling_type, normalize))
    return vectors


def run_case(case: str, engines: dict[str, LLM], model: Any, prompts: list[list[int]],
             batch_size: int) -> dict[str, Any]:
    pooler = engines["stoke"].engine.pooler
    t0 = time.perf_counter()
    computed = None
    if case.startswith("stoke"):
        llm = engines[case]
        llm.reset_prefix_cache()  # each round finds the prompts uncached
        before = llm.engine.stats.num_batched_tokens
        t0 = time.perf_counter()
        vectors = [torch.tensor(o.outputs.embedding) for o in llm.embed(prompts, use_tqdm=False)]
        computed = llm.engine.stats.num_batched_tokens - before
    elif case == "transformers, batches":
        vectors = transformers_batches(model, prompts, batch_size, pooler.pooling_type, pooler.normalize)
    else:
        vectors = transformers_one_at_a_time(model, prompts, pooler.pooling_type, pooler.normalize)
    wall = time.perf_counter() - t0
    return {"case": case, "seconds": wall, "tok_s": sum(map(len, prompts)) / wall, "computed_tokens": computed,
            "vectors": vectors}


def main(argv: list[str] | None = None) -> dict[str, Any]:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--model", default=None, help="a checkpoint directory (default: the embedded model)")
    parser.add_argument("--num-prompts", type=int, default=64)
    parser.add_argument("--prompt-len", type=int, nargs=2, default=(32, 256), metavar=("MIN", "MAX"),
                        help="tokens of each prompt after the shared prefix")
    parser.add_argument("--shared-prefix", type=int, default=48, help="tokens every prompt begins with")
    parser.add_argument("--batch-size", type=int, default=16, help="transformers' batches")
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument("--threads", type=int, default=None, help="torch CPU threads")
    parser.add_argument("--out", default="results/embeddings.json")
    args = parser.parse_args(argv)
    if args.threads:
        torch.set_num_threads(args.threads)
    import transformers

    engines = {"stoke": LLM(args.model)}
    engines["stoke, no prefix cache"] = LLM(args.model, enable_prefix_caching=False)
    model = transformers.AutoModel.from_pretrained(engines["stoke"].engine.model_path, dtype=torch.float32).eval()
    prompts = _prompts(args.num_prompts, *args.prompt_len, args.shared_prefix,
                       engines["stoke"].engine.model_config.vocab_size)
    runs = alternated(CASES, args.rounds, lambda case: run_case(case, engines, model, prompts, args.batch_size))
    results = pooling_results(runs, "vectors", lambda have, want: max((a - b).abs().max() for a, b in zip(have, want)))
    pooler = engines["stoke"].engine.pooler
    report = {"args": vars(args), "device": "cpu", "threads": torch.get_num_threads(),
              "pooler": {"pooling_type": pooler.pooling_type, "normalize": pooler.normalize},
              "prompt_tokens": sum(map(len, prompts)), "results": results}
    print(f"embeddings: {args.num_prompts} prompts of {args.shared_prefix} shared + {args.prompt_len[0]}-"
          f"{args.prompt_len[1]} tokens, {pooler.pooling_type} pooling, {torch.get_num_threads()} threads "
          f"(medians of {args.rounds})")
    print(f"{'case':<30} {'seconds':>8} {'tok/s':>9} {'vs HF':>7} {'computed':>9} {'max |diff|':>11}")
    for r in results:
        computed = "-" if r["computed_tokens"] is None else r["computed_tokens"]
        print(f"{r['case']:<30} {r['seconds']:>8.3f} {r['tok_s']:>9.1f} {r['vs_transformers']:>6.2f}x {computed:>9} "
              f"{r['max_abs_diff']:>11.2e}")
    write_json(report, args.out)
    return report


if __name__ == "__main__":
    main()
