"""What serving LoRA adapters costs: the same requests on the same weights without LoRA, with
LoRA on and no request using it, all on one adapter, spread over K adapters with K slots
(`max_loras=K`), and over K adapters with K/2 slots (they take turns), in the same run,
alternated each round (medians). Random adapters of one rank over every projection; dummy
weights from a config dir, or a checkpoint.

    python -m benchmarks.lora --model configs/qwen3-0.6b --out results/lora.json
"""

from __future__ import annotations

import argparse
import os
import random
import statistics
import sys
import tempfile
import time
from typing import Any

if __package__ in (None, ""):  # run as a file: make the repo root importable
    sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

import torch

from benchmarks.report import write_json
from engine.config import ModelConfig
from engine.llm import LLM
from engine.lora import LoRARequest, lora_modules, module_shapes
from engine.sampling_params import SamplingParams


def save_random_adapter(out_dir: str, config: ModelConfig, rank: int, seed: int, std: float = 0.01) -> str:
    """A PEFT LoRA checkpoint for every projection of every layer, random A and B."""
    from safetensors.torch import save_file

    generator = torch.Generator().manual_seed(seed)
    tensors = {}
    for layer in range(config.num_layers):
        for module, (fan_in, fan_out) in module_shapes(config).items():
            name = f"base_model.model.model.layers.{layer}.{lora_modules(config)[module]}.{module}"
            tensors[f"{name}.lora_A.weight"] = torch.randn(rank, fan_in, generator=generator) * std
            tensors[f"{name}.lora_B.weight"] = torch.randn(fan_out, rank, generator=generator) * std
    os.makedirs(out_dir, exist_ok=True)
    save_file(tensors, os.path.join(out_dir, "adapter_model.safetensors"))
    with open(os.path.join(out_dir, "adapter_config.json"), "w") as f:
        f.write(f'{{"peft_type": "LORA", "r": {rank}, "lora_alpha": {2 * rank}, "target_modules": "all-linear"}}')
    return out_dir


def main(argv: list[str] | None = None) -> dict[str, Any]:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--model", default="configs/qwen3-0.6b", help="a config dir (dummy weights) or a checkpoint")
    p.add_argument("--load-format", default="dummy", help="dummy (default) or auto for a checkpoint")
    p.add_argument("--num-requests", type=int, default=32)
    p.add_argument("--adapters", type=int, default=4, help="K: adapters the requests are spread over")
    p.add_argument("--rank", type=int, default=16)
    p.add_argument("--prompt-len", type=int, default=128)
    p.add_argument("--max-tokens", type=int, default=64)
    p.add_argument("--rounds", type=int, default=3)
    p.add_argument("--device", default="auto")
    p.add_argument("--threads", type=int, default=1, help="torch threads on the CPU")
    p.add_argument("--out", default="results/lora.json")
    args = p.parse_args(argv)
    if min(args.num_requests, args.adapters, args.rank, args.prompt_len, args.max_tokens, args.rounds) < 1:
        p.error("sizes must be >= 1")
    torch.set_num_threads(args.threads)
    k = args.adapters
    common = dict(load_format=args.load_format, device=args.device, max_num_seqs=args.num_requests,
                  gpu_memory_utilization=0.25, kv_cache_memory_bytes=256 << 20)
    lora = dict(enable_lora=True, max_lora_rank=args.rank, max_cpu_loras=k)
    engines = {"off": LLM(args.model, **common),
               "lora": LLM(args.model, **common, **lora, max_loras=k),
               "lora_half_slots": LLM(args.model, **common, **lora, max_loras=max(1, k // 2))}
    config = engines["off"].engine.model_config
    rng = random.Random(0)
    prompts = [{"prompt_token_ids": [rng.randrange(config.vocab_size) for _ in range(args.prompt_len)]}
               for _ in range(args.num_requests)]
    params = SamplingParams(max_tokens=args.max_tokens, temperature=0.0, ignore_eos=True)
    with tempfile.TemporaryDirectory() as tmp:
        adapters = [LoRARequest(f"adapter-{i}", i + 1, save_random_adapter(os.path.join(tmp, str(i)), config,
                                                                            args.rank, seed=i))
                    for i in range(k)]
        spread = [adapters[i % k] for i in range(args.num_requests)]
        # (name, engine, each request's adapter)
        cases = [("no LoRA", "off", None), ("LoRA on, unused", "lora", None),
                 ("1 adapter", "lora", adapters[0]), (f"{k} adapters, {k} slots", "lora", spread),
                 (f"{k} adapters, {max(1, k // 2)} slots", "lora_half_slots", spread)]
        runs: dict[str, list[dict[str, Any]]] = {name: [] for name, _, _ in cases}
        tokens: dict[str, list[list[int]]] = {}
        for _ in range(args.rounds + 1):  # the first round warms every engine up, untimed
            for name, engine_name, loras in cases:
                llm = engines[engine_name]
                llm.reset_prefix_cache()  # every case computes its prompts
                before = llm.engine.stats.num_steps
                t0 = time.perf_counter()
                outs = llm.generate(prompts, params, use_tqdm=False, lora_request=loras)
                seconds = time.perf_counter() - t0
                tokens[name] = [o.outputs[0].token_ids for o in outs]
                runs[name].append({"seconds": seconds, "tok_s": sum(map(len, tokens[name])) / seconds,
                                   "steps": llm.engine.stats.num_steps - before})
    off = statistics.median(r["tok_s"] for r in runs["no LoRA"][1:])
    results = []
    for name, engine_name, _ in cases:
        timed = runs[name][1:]
        tok_s = statistics.median(r["tok_s"] for r in timed)
        results.append({"case": name, "engine": engine_name, "tok_s": tok_s, "vs_no_lora": tok_s / off,
                        "ms_per_step": statistics.median(r["seconds"] / r["steps"] * 1e3 for r in timed),
                        "runs": timed})
    # The same adapters with fewer slots must give the same tokens; LoRA unused, the base model's.
    checks = {"unused_equals_no_lora": tokens["LoRA on, unused"] == tokens["no LoRA"],
              "half_slots_equal_full": tokens[cases[3][0]] == tokens[cases[4][0]]}
    device = engines["off"].engine.runner.device
    report = {"args": vars(args), "device": str(device),
              "cuda_graphs": engines["lora"].engine.runner.cuda_graphs is not None, "results": results,
              "checks": checks}
    print(f"{args.model} on {device}, {args.num_requests} requests x {args.max_tokens} tokens, rank {args.rank}:")
    print(f"{'case':<24} {'tok/s':>9} {'vs none':>8} {'ms/step':>8}")
    for r in results:
        print(f"{r['case']:<24} {r['tok_s']:>9.1f} {r['vs_no_lora']:>7.2f}x {r['ms_per_step']:>8.2f}")
    print("checks:", ", ".join(f"{k} {'ok' if v else 'FAILED'}" for k, v in checks.items()))
    write_json(report, args.out)
    return report


if __name__ == "__main__":
    main()
