"""Reranking throughput, stoke against transformers, on the same pairs in the same run.

A reranker scores `--queries` queries against `--docs` documents each. Each pair is rendered
by the score template shipped for Qwen3-Reranker (configs/score_templates/qwen3_reranker.jinja:
its model card's format, its instruction first), so a query's pairs share a long prefix. The model is the checkpoint's own sequence classifier,
or a causal LM served as an LLM reranker (vLLM's `hf_overrides` for Qwen3-Reranker: the score
is P("yes") against "no" after the pair). By default that is the embedded SmolLM2 model: its
scores mean nothing, but it computes what a reranker of its size computes.

- `stoke`: `LLM.score(query, docs)` for every query at once (continuous batching, chunked
  prefill), the prefix cache on: each query's prefix is computed once for its documents;
- `stoke, no prefix cache`: the same with `enable_prefix_caching=False`;
- `transformers, batches`: the pairs in length-sorted, right-padded batches of
  `--batch-size` (the last real token's hidden states, then the two tokens' LM-head rows);
- `transformers, one at a time`: each pair alone, unpadded (the reference scores).

Reported per case (median of `--rounds`): wall seconds, pairs/s, prompt tokens/s, the speed
against transformers' batches, the prompt tokens stoke computed (the rest were prefix-cache
hits), and the largest difference of any score from the reference.

    python -m benchmarks.rerank --out results/rerank.json
"""

from __future__ import annotations

import argparse
import json
import os
import random
import statistics
import sys
import time
from typing import Any

if __package__ in (None, ""):  # run as a file: make the repo root importable
    sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

import torch

from benchmarks.report import alternated, pooling_results, write_json
from engine.config import read_hf_config
from engine.llm import LLM
from engine.scoring import activate, cross_encoder_prompt

CASES = ("stoke", "stoke, no prefix cache", "transformers, batches", "transformers, one at a time")

TEMPLATE = os.path.join(os.path.dirname(os.path.dirname(os.path.abspath(__file__))), "configs", "score_templates",
                        "qwen3_reranker.jinja")
TOKENS = ("no", "yes")  # the LLM reranker's false and true tokens


def _words(tokenizer: Any, rng: random.Random, count: int) -> str:
    return tokenizer.decode([rng.randrange(300, 20000) for _ in range(count)])


def workload(tokenizer: Any, queries: int, docs: int, doc_len: tuple[int, int], seed: int = 0) -> list[tuple[str, list[str]]]:
    """Each query (~16 tokens) with its documents."""
    rng = random.Random(seed)
    return [(_words(tokenizer, rng, 16), [_words(tokenizer, rng, rng.randint(*doc_len)) for _ in range(docs)])
            for _ in range(queries)]


class TransformersReranker:
    """The transformers peer: the same classifier over transformers' last hidden states."""

    def __init__(self, path: str, llm: LLM) -> None:
        import transformers

        self.tokenizer = llm.get_tokenizer()
        config = llm.engine.model_config
        if config.classifier_from_token is not None:  # an LLM reranker: the two tokens' LM-head rows
            causal = transformers.AutoModelForCausalLM.from_pretrained(path, dtype=torch.float32).eval()
            self.backbone = causal.model
            rows = causal.lm_head.weight[list(config.classifier_token_ids)]
            self.head = (rows[1:2] - rows[0:1]).detach()
        else:
            model = transformers.AutoModelForSequenceClassification.from_pretrained(path, dtype=torch.float32).eval()
            self.backbone, self.head = model.model, model.score.weight.detach()
        self.activation = llm.engine.classifier.score_activation

    def _scores(self, last_hidden: torch.Tensor) -> torch.Tensor:
        return activate((last_hidden @ self.head.T)[:, 0].float(), self.activation)

    def batches(self, prompts: list[list[int]], batch_size: int) -> list[float]:
        order = sorted(range(len(prompts)), key=lambda i: len(prompts[i]))
        scores: dict[int, float] = {}
        for start in range(0, len(order), batch_size):
            rows = order[start:start + batch_size]
            width = max(len(prompts[i]) for i in rows)
            ids = torch.zeros((len(rows), width), dtype=torch.long)
            mask = torch.zeros((len(rows), width), dtype=torch.long)
            for r, i in enumerate(rows):  # right padding: a causal model's real tokens never see it
                ids[r, :len(prompts[i])] = torch.tensor(prompts[i])
                mask[r, :len(prompts[i])] = 1
            with torch.inference_mode():
                hidden = self.backbone(input_ids=ids, attention_mask=mask).last_hidden_state
                last = torch.stack([hidden[r, len(prompts[i]) - 1] for r, i in enumerate(rows)])
                for i, score in zip(rows, self._scores(last).tolist()):
                    scores[i] = score
        return [scores[i] for i in range(len(prompts))]

    def one_at_a_time(self, prompts: list[list[int]]) -> list[float]:
        scores = []
        with torch.inference_mode():
            for prompt in prompts:
                hidden = self.backbone(torch.tensor([prompt])).last_hidden_state[0]
                scores.append(self._scores(hidden[-1:])[0].item())
        return scores


def run_case(case: str, engines: dict[str, LLM], peer: TransformersReranker, pairs: list[tuple[str, list[str]]],
             prompts: list[list[int]], batch_size: int, template: str) -> dict[str, Any]:
    computed = None
    if case.startswith("stoke"):
        llm = engines[case]
        llm.reset_prefix_cache()  # each round finds the pairs uncached
        before = llm.engine.stats.num_batched_tokens
        t0 = time.perf_counter()
        scores = _score_all(llm, pairs, template)
        computed = llm.engine.stats.num_batched_tokens - before
    else:
        t0 = time.perf_counter()
        scores = peer.batches(prompts, batch_size) if case == "transformers, batches" else peer.one_at_a_time(prompts)
    wall = time.perf_counter() - t0
    return {"case": case, "seconds": wall, "tok_s": sum(map(len, prompts)) / wall, "pairs_s": len(prompts) / wall,
            "computed_tokens": computed, "scores": scores}


def _score_all(llm: LLM, pairs: list[tuple[str, list[str]]], template: str) -> list[float]:
    """Every query's documents in one call (N:N pairs), so all queries batch together."""
    firsts = [query for query, docs in pairs for _ in docs]
    seconds = [doc for _, docs in pairs for doc in docs]
    return [o.outputs.score for o in llm.score(firsts, seconds, use_tqdm=False, chat_template=template)]


def main(argv: list[str] | None = None) -> dict[str, Any]:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--model", default=None, help="a checkpoint directory (default: the embedded model)")
    parser.add_argument("--queries", type=int, default=4)
    parser.add_argument("--docs", type=int, default=16, help="documents per query")
    parser.add_argument("--doc-len", type=int, nargs=2, default=(32, 256), metavar=("MIN", "MAX"),
                        help="tokens of each document")
    parser.add_argument("--batch-size", type=int, default=16, help="transformers' batches")
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument("--threads", type=int, default=None, help="torch CPU threads")
    parser.add_argument("--out", default="results/rerank.json")
    args = parser.parse_args(argv)
    if args.threads:
        torch.set_num_threads(args.threads)
    if args.model is None:
        from engine.default_model import default_model_path

        args.model = default_model_path()
    arch = read_hf_config(args.model)["architectures"][0]
    overrides = None if arch.endswith("ForSequenceClassification") else {
        "architectures": [arch.replace("ForCausalLM", "ForSequenceClassification")],
        "classifier_from_token": list(TOKENS), "method": "from_2_way_softmax"}
    engines = {"stoke": LLM(args.model, hf_overrides=overrides)}
    engines["stoke, no prefix cache"] = LLM(args.model, hf_overrides=overrides, enable_prefix_caching=False)
    peer = TransformersReranker(args.model, engines["stoke"])
    pairs = workload(peer.tokenizer, args.queries, args.docs, tuple(args.doc_len))
    engine = engines["stoke"].engine
    with open(TEMPLATE) as f:
        template = f.read()
    prompts = [cross_encoder_prompt(engine.tokenizer, query, doc, engine.classifier.joins_pairs, template)[1]
               for query, docs in pairs for doc in docs]  # what LLM.score reads each pair as
    runs = alternated(CASES, args.rounds,
                      lambda case: run_case(case, engines, peer, pairs, prompts, args.batch_size, template))
    results = pooling_results(runs, "scores", lambda have, want: (torch.tensor(have) - torch.tensor(want)).abs().max())
    for r in results:
        r["pairs_s"] = round(statistics.median(run["pairs_s"] for run in r["runs"]), 2)
    report = {"args": vars(args), "device": "cpu", "threads": torch.get_num_threads(),
              "hf_overrides": json.dumps(overrides) if overrides else None,
              "pairs": len(prompts), "prompt_tokens": sum(map(len, prompts)), "results": results}
    print(f"rerank: {args.queries} queries x {args.docs} documents of {args.doc_len[0]}-{args.doc_len[1]} tokens "
          f"({report['prompt_tokens']} prompt tokens), {torch.get_num_threads()} threads (medians of {args.rounds})")
    print(f"{'case':<30} {'seconds':>8} {'pairs/s':>8} {'tok/s':>9} {'vs HF':>7} {'computed':>9} {'max |diff|':>11}")
    for r in results:
        computed = "-" if r["computed_tokens"] is None else r["computed_tokens"]
        print(f"{r['case']:<30} {r['seconds']:>8.3f} {r['pairs_s']:>8.2f} {r['tok_s']:>9.1f} "
              f"{r['vs_transformers']:>6.2f}x {computed:>9} {r['max_abs_diff']:>11.2e}")
    write_json(report, args.out)
    return report


if __name__ == "__main__":
    main()
