"""What fp8 buys and costs: one model served wide, with fp8 weights (quantization="fp8"), with
an fp8 KV cache (kv_cache_dtype="fp8") and with both, in the same run, alternated each round
(medians): the weights' memory, the KV blocks the budget holds (on CUDA, at one
gpu_memory_utilization each), tokens/s at batch 1 and at a batch of N requests, and, over a
checkpoint's real weights, how far each moves the model from the wide one: perplexity over a
text (this repo's README) and greedy answers that stay the same.

    python -m benchmarks.fp8 --out results/fp8.json      # the embedded default, on the CPU
    python -m benchmarks.fp8 --model configs/llama-3-8b --load-format dummy --dtype bfloat16
"""

from __future__ import annotations

import argparse
import math
import os
import random
import statistics
import sys
import time
from typing import Any

if __package__ in (None, ""):  # run as a file: make the repo root importable
    sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

import torch

from benchmarks.report import write_json
from engine.llm import LLM
from engine.sampling_params import SamplingParams

# Each case's engine options over the wide one's.
CASES: dict[str, dict[str, str]] = {"wide": {}, "fp8": {"quantization": "fp8"}, "kv_fp8": {"kv_cache_dtype": "fp8"},
                                    "fp8+kv_fp8": {"quantization": "fp8", "kv_cache_dtype": "fp8"}}
README = os.path.join(os.path.dirname(os.path.dirname(os.path.abspath(__file__))), "README.md")


def perplexity(llm: LLM, chunks: list[list[int]]) -> float:
    """exp of the mean negative logprob of every token of `chunks` after their first."""
    params = SamplingParams(max_tokens=1, prompt_logprobs=0, temperature=0.0)
    outs = llm.generate([{"prompt_token_ids": c} for c in chunks], params, use_tqdm=False)
    nll = [-float(d[t]) for c, o in zip(chunks, outs) for d, t in zip(o.prompt_logprobs[1:], c[1:])]
    return math.exp(sum(nll) / len(nll))


def main(argv: list[str] | None = None) -> dict[str, Any]:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--model", default=None, help="a checkpoint, or a config dir with --load-format dummy "
                                                 "(default: the embedded default model)")
    p.add_argument("--load-format", default="auto")
    p.add_argument("--dtype", default="auto")
    p.add_argument("--device", default="auto")
    p.add_argument("--cases", default=",".join(CASES),
                   help=f"what to run beside the wide engine, comma-separated: {', '.join(CASES)} (default: all)")
    p.add_argument("--num-requests", type=int, default=16, help="N: the batch's requests")
    p.add_argument("--prompt-len", type=int, default=64)
    p.add_argument("--max-tokens", type=int, default=32)
    p.add_argument("--rounds", type=int, default=3)
    p.add_argument("--text-tokens", type=int, default=1024, help="README tokens the perplexity is measured over")
    p.add_argument("--gpu-memory-utilization", type=float, default=0.4, help="each engine's, on CUDA")
    p.add_argument("--threads", type=int, default=1, help="torch threads on the CPU")
    p.add_argument("--out", default="results/fp8.json")
    args = p.parse_args(argv)
    if min(args.num_requests, args.prompt_len, args.max_tokens, args.rounds, args.text_tokens) < 1:
        p.error("sizes must be >= 1")
    cases = ["wide", *dict.fromkeys(c for c in args.cases.split(",") if c != "wide")]
    if unknown := [c for c in cases if c not in CASES]:
        p.error(f"unknown cases {unknown}: choose from {', '.join(CASES)}")
    torch.set_num_threads(args.threads)
    common = dict(load_format=args.load_format, dtype=args.dtype, device=args.device,
                  max_num_seqs=args.num_requests, gpu_memory_utilization=args.gpu_memory_utilization,
                  kv_cache_memory_bytes=256 << 20)
    engines = {case: LLM(args.model, **common, **CASES[case]) for case in cases}
    wide = engines["wide"].engine
    rng = random.Random(0)
    vocab = wide.model_config.vocab_size
    batches = {"batch 1": 1, f"batch {args.num_requests}": args.num_requests}
    prompts = [{"prompt_token_ids": [rng.randrange(vocab) for _ in range(args.prompt_len)]}
               for _ in range(args.num_requests)]
    params = SamplingParams(max_tokens=args.max_tokens, temperature=0.0, ignore_eos=True)
    runs: dict[tuple[str, str], list[dict[str, float]]] = {(e, b): [] for e in engines for b in batches}
    answers: dict[str, list[list[int]]] = {}
    for _ in range(args.rounds + 1):  # the first round warms every engine up, untimed
        for batch, size in batches.items():
            for name, llm in engines.items():
                llm.reset_prefix_cache()
                before = llm.engine.stats.num_steps
                t0 = time.perf_counter()
                outs = llm.generate(prompts[:size], params, use_tqdm=False)
                seconds = time.perf_counter() - t0
                tokens = [list(o.outputs[0].token_ids) for o in outs]
                if size == args.num_requests:
                    answers[name] = tokens
                runs[name, batch].append({"tok_s": sum(map(len, tokens)) / seconds,
                                          "ms_per_step": seconds / (llm.engine.stats.num_steps - before) * 1e3})
    results = []
    for batch in batches:
        base = statistics.median(r["tok_s"] for r in runs["wide", batch][1:])
        for name in engines:
            timed = runs[name, batch][1:]
            tok_s = statistics.median(r["tok_s"] for r in timed)
            results.append({"case": name, "batch": batch, "tok_s": tok_s, "vs_wide": tok_s / base,
                            "ms_per_step": statistics.median(r["ms_per_step"] for r in timed), "runs": timed})
    memory = {name: {"weight_gib": llm.engine.runner.weight_bytes / 2**30, "kv_blocks": llm.engine.runner.num_blocks,
                     "kv_cache_dtype": str(llm.engine.runner.kv_cache_dtype)} for name, llm in engines.items()}
    quality: dict[str, Any] = {"real_weights": args.load_format != "dummy"}
    if quality["real_weights"]:
        with open(README) as f:
            text = wide.tokenizer.encode(f.read())[:args.text_tokens]
        chunks = [text[i:i + 256] for i in range(0, len(text), 256) if len(text[i:i + 256]) > 1]
        quality["text_tokens"] = sum(map(len, chunks))
        wide_ppl = perplexity(engines["wide"], chunks)
        for name, llm in engines.items():
            ppl = wide_ppl if name == "wide" else perplexity(llm, chunks)
            same = [a == b for a, b in zip(answers["wide"], answers[name])]
            prefix = [next((i for i, (x, y) in enumerate(zip(a, b)) if x != y), len(a))
                      for a, b in zip(answers["wide"], answers[name])]
            quality[name] = {"perplexity": ppl, "perplexity_ratio": ppl / wide_ppl,
                             "same_answers": sum(same) / len(same), "mean_common_prefix": statistics.mean(prefix)}
    device = wide.runner.device
    report = {"args": vars(args), "device": str(device), "dtype": str(wide.runner.dtype),
              "model": wide.model_path, "memory": memory, "quality": quality, "results": results}
    print(f"{os.path.basename(wide.model_path.rstrip('/'))} on {device} ({wide.runner.dtype}), "
          f"{args.prompt_len}-token prompts, {args.max_tokens} tokens each:")
    for name, m in memory.items():
        print(f"  {name:<10} weights {m['weight_gib']:.3f} GiB, {m['kv_blocks']} KV blocks")
    print(f"{'case':<10} {'batch':<10} {'tok/s':>9} {'vs wide':>8} {'ms/step':>8}")
    for r in results:
        print(f"{r['case']:<10} {r['batch']:<10} {r['tok_s']:>9.1f} {r['vs_wide']:>7.2f}x {r['ms_per_step']:>8.2f}")
    if quality["real_weights"]:
        print(f"over {quality['text_tokens']} README tokens, and the greedy answers of the batch against wide's:")
        for name in engines:
            q = quality[name]
            print(f"  {name:<10} perplexity {q['perplexity']:.3f} ({q['perplexity_ratio']:.4f}x), "
                  f"{q['same_answers']:.0%} of answers the same, {q['mean_common_prefix']:.1f} tokens in common")
    write_json(report, args.out)
    return report


if __name__ == "__main__":
    main()
