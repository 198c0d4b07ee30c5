"""Offline throughput: stoke vs transformers (static batching and continuous batching), one run.

The mixed workload: N requests with random token-id prompts (uniform lengths), uniform
output lengths, greedy, EOS ignored. Every system gets the same prompts in the same process,
fp32, and is timed from the first request in to the last token out (model load, cache
allocation and a tiny warm-up generate excluded). Useful output tokens are the tokens each
request asked for: a system that generates more (padding, one max_new_tokens for all) gets
no credit for the extra.

Also measured: the scheduler alone (no model) with many decoding sequences, the CPU's fp32
matmul rate at the model's MLP shape, and the fraction of it the engine achieves.

    python -m benchmarks.offline                      # the embedded default model, 64 requests
    python benchmarks/offline.py --num-requests 8 --skip-continuous --out results/small.json

On a GPU (what `make gpu-check` runs): random weights from a shipped config, bf16, both
engines on the card, transformers' continuous batching as the peer (--enforce-eager turns
stoke's CUDA graphs off, --cuda-graph-mode decode keeps them for pure-decode steps only):

    python -m benchmarks.offline --model configs/qwen3-0.6b --load-format dummy --dtype bfloat16 \
        --num-requests 512 --skip-static
"""

from __future__ import annotations

import argparse
import gc
import json
import os
import platform
import random
import statistics
import sys
import time
from dataclasses import asdict, dataclass, field
from typing import Any

if __package__ in (None, ""):  # run as a file: make the repo root importable
    sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

import torch

from benchmarks.report import write_json
from engine.config import ModelConfig
from scheduler import Request, Scheduler, SchedulerConfig


# ------------------------------------------------------------------ workload
@dataclass(slots=True)
class Workload:
    prompts: list[list[int]]
    output_lens: list[int]

    @property
    def num_prompt_tokens(self) -> int:
        return sum(len(p) for p in self.prompts)

    @property
    def num_output_tokens(self) -> int:
        return sum(self.output_lens)


def special_token_ids(path: str, config: ModelConfig) -> set[int]:
    """Ids a random prompt must not contain: bos/eos/pad and the tokenizer's special tokens."""
    special = {i for i in (config.bos_token_id, *config.eos_token_ids) if i is not None}
    with open(os.path.join(path, "config.json")) as f:
        raw = json.load(f)
    for key in ("pad_token_id", "bos_token_id", "eos_token_id"):
        value = raw.get(key)
        special.update(value if isinstance(value, list) else [] if value is None else [value])
    if any(os.path.exists(os.path.join(path, f)) for f in ("tokenizer.json", "tokenizer_config.json")):
        try:
            from transformers import AutoTokenizer

            tok = AutoTokenizer.from_pretrained(path)
            special.update(tok.all_special_ids)
            special.update(i for i, t in tok.added_tokens_decoder.items() if t.special)
        except (OSError, ValueError):
            pass
    return special


def make_workload(num_requests: int, prompt_range: tuple[int, int], output_range: tuple[int, int],
                  vocab_size: int, exclude: set[int], seed: int = 0) -> Workload:
    rng = random.Random(seed)
    allowed = [i for i in range(vocab_size) if i not in exclude]
    prompts, outputs = [], []
    for _ in range(num_requests):
        n = rng.randint(*prompt_range)
        prompts.append([rng.choice(allowed) for _ in range(n)])
        outputs.append(rng.randint(*output_range))
    return Workload(prompts, outputs)


def useful_flops(config: ModelConfig, num_layer_params: int, workload: Workload) -> dict[str, float]:
    """The work the workload needs, whoever does it: every prompt token and every generated
    token but the last goes through the layers once; each generated token needs one LM-head
    row; attention is causal over the sequence's own keys (no padding counted)."""
    tokens = sum(len(p) + o - 1 for p, o in zip(workload.prompts, workload.output_lens))
    linear = 2.0 * num_layer_params * tokens
    head = 2.0 * config.hidden_size * config.vocab_size * workload.num_output_tokens
    # QK^T and PV: 2 matmuls x 2 flops per MAC x Hq x D per (query, key) pair, per layer.
    pairs = sum((n := len(p) + o - 1) * (n + 1) // 2 for p, o in zip(workload.prompts, workload.output_lens))
    attention = 4.0 * config.num_layers * config.num_heads * config.head_dim * pairs
    return {"tokens_processed": tokens, "linear": linear, "lm_head": head, "attention": attention,
            "total": linear + head + attention}


# ------------------------------------------------------------------- results
@dataclass(slots=True)
class SystemResult:
    name: str
    wall_seconds: float
    useful_output_tokens: int
    generated_tokens: int  # what the system actually produced (padding waste included)
    load_seconds: float = 0.0
    exact_match_vs_stoke: float | None = None  # fraction of requests with stoke's tokens
    notes: list[str] = field(default_factory=list)
    extra: dict[str, Any] = field(default_factory=dict)

    @property
    def useful_tokens_per_second(self) -> float:
        return self.useful_output_tokens / self.wall_seconds

    def to_json(self) -> dict[str, Any]:
        out = asdict(self)
        out["useful_tokens_per_second"] = self.useful_tokens_per_second
        return out


def _free() -> None:
    gc.collect()
    if torch.cuda.is_available():
        torch.cuda.empty_cache()


def _device(args: argparse.Namespace) -> torch.device:
    if args.device == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    return torch.device(args.device)


def _dtype(args: argparse.Namespace) -> torch.dtype:
    from engine.config import DTYPES

    return DTYPES[args.dtype]


def _sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


# ------------------------------------------------------------------- systems
def run_stoke(path: str | None, workload: Workload, args: argparse.Namespace) -> tuple[SystemResult, list[list[int]]]:
    from engine import LLM, SamplingParams
    from engine.engine import StepStats

    t0 = time.perf_counter()
    engine_args: dict[str, Any] = dict(
        dtype=args.dtype, device=args.device, load_format=args.load_format, enforce_eager=args.enforce_eager,
        cuda_graph_mode=args.cuda_graph_mode, async_scheduling=args.async_scheduling,
        max_model_len=args.max_model_len, max_num_seqs=args.max_num_seqs,
        max_num_batched_tokens=args.max_num_batched_tokens)
    if args.gpu_memory_utilization is not None:
        engine_args["gpu_memory_utilization"] = args.gpu_memory_utilization
    llm = LLM(path, **engine_args)
    load = time.perf_counter() - t0
    llm.generate([workload.prompts[0][:8]], SamplingParams(max_tokens=2, temperature=0.0, ignore_eos=True),
                 use_tqdm=False)
    if llm.engine.runner.device.type == "cuda":
        # Triton compiles a variant of a kernel per argument specialisation (ints equal to 1 or
        # divisible by 16): a few batch shapes before the timing keep compiles out of it.
        # Reversed prompts: no prefix of the workload lands in the prefix cache.
        warm = [p[::-1][: 1 + (37 * i) % len(p)] for i, p in enumerate(workload.prompts[:48])]
        llm.generate(warm, SamplingParams(max_tokens=4, temperature=0.0, ignore_eos=True), use_tqdm=False)
    llm.engine.stats = StepStats()
    params = [SamplingParams(max_tokens=n, temperature=0.0, ignore_eos=True) for n in workload.output_lens]
    preemptions0 = llm.engine.scheduler.stats.num_preemptions
    t0 = time.perf_counter()
    outs = llm.generate(workload.prompts, params, use_tqdm=False)
    wall = time.perf_counter() - t0
    tokens = [list(o.outputs[0].token_ids) for o in outs]
    bad = [i for i, (t, n) in enumerate(zip(tokens, workload.output_lens)) if len(t) != n]
    if bad:
        raise RuntimeError(f"stoke returned the wrong number of tokens for requests {bad[:5]}")
    s = llm.engine.stats
    result = SystemResult(
        name="stoke", wall_seconds=wall, useful_output_tokens=workload.num_output_tokens,
        generated_tokens=sum(len(t) for t in tokens), load_seconds=load,
        extra={
            "num_steps": s.num_steps,
            "num_batched_tokens": s.num_batched_tokens,
            "schedule_seconds": s.schedule_seconds,
            "forward_seconds": s.forward_seconds,
            "sample_seconds": s.sample_seconds,
            "other_seconds": wall - s.schedule_seconds - s.forward_seconds - s.sample_seconds,
            # CUDA: the fraction of the wall in which a step was on the GPU (0 on the CPU)
            "device_busy_fraction": s.device_seconds / wall if wall else 0.0,
            "num_preemptions": llm.engine.scheduler.stats.num_preemptions - preemptions0,
            "num_kv_blocks": llm.engine.runner.num_blocks,
            "block_size": llm.engine.config.block_size,
            "max_num_seqs": args.max_num_seqs,
            "max_num_batched_tokens": args.max_num_batched_tokens,
            "attention_backend": llm.engine.runner.backend.__name__,
            "device": str(llm.engine.runner.device),
            "dtype": str(llm.engine.runner.dtype).removeprefix("torch."),
            "cuda_graph_buckets": llm.engine.runner.cuda_graphs.buckets if llm.engine.runner.cuda_graphs else [],
            "cuda_graph_token_buckets": (llm.engine.runner.cuda_graphs.token_buckets
                                         if llm.engine.runner.cuda_graphs else []),
            "cuda_graph_capture_seconds": (llm.engine.runner.cuda_graphs.capture_seconds
                                           if llm.engine.runner.cuda_graphs else 0.0),
            "fused_norm_rope": llm.engine.runner.model.norm_rope_kernels is not None,
            "async_scheduling": llm.engine.async_scheduling,
            "memory_profile": dict(llm.engine.runner.memory_profile),
        },
    )
    if llm.engine.runner.device.type == "cuda":
        result.notes.append("forward/sample seconds split on CUDA is approximate: the forward is launched "
                            "asynchronously and the sampler's one device-to-host copy waits for it")
    del llm
    _free()
    return result, tokens


def _load_hf(path: str, args: argparse.Namespace, **kwargs: Any):
    """transformers' model on the benchmark's device and dtype; load_format dummy: random
    weights from the config alone (initialised on the device)."""
    from transformers import AutoConfig, AutoModelForCausalLM

    t0 = time.perf_counter()
    device, dtype = _device(args), _dtype(args)
    if args.load_format == "dummy":
        config = AutoConfig.from_pretrained(path)
        with torch.device(device):
            model = AutoModelForCausalLM.from_config(config, dtype=dtype, **kwargs)
    else:
        model = AutoModelForCausalLM.from_pretrained(path, dtype=dtype, **kwargs)
    model.to(device)
    model.eval()
    _sync(device)
    return model, time.perf_counter() - t0


def _pad_id(model) -> int:
    pad = model.generation_config.pad_token_id
    if pad is None:
        pad = model.config.pad_token_id
    if pad is None:
        eos = model.generation_config.eos_token_id
        pad = eos[0] if isinstance(eos, list) else eos
    return 0 if pad is None else int(pad)


def _match(tokens: list[list[int]], reference: list[list[int]] | None) -> float | None:
    if reference is None:
        return None
    return sum(a == b for a, b in zip(tokens, reference)) / len(reference)


def run_static(path: str, workload: Workload, reference: list[list[int]] | None,
               args: argparse.Namespace) -> SystemResult:
    """One padded model.generate batch: left padding, every row runs max(output_lens) steps."""
    model, load = _load_hf(path, args)
    device = _device(args)
    pad = _pad_id(model)
    width = max(len(p) for p in workload.prompts)
    ids = torch.full((len(workload.prompts), width), pad, dtype=torch.long)
    mask = torch.zeros_like(ids)
    for i, p in enumerate(workload.prompts):
        ids[i, width - len(p):] = torch.tensor(p)
        mask[i, width - len(p):] = 1
    new = max(workload.output_lens)
    gen_kwargs = dict(do_sample=False, temperature=None, top_p=None, top_k=None, pad_token_id=pad)
    ids, mask = ids.to(device), mask.to(device)
    with torch.inference_mode():
        warm = torch.tensor([workload.prompts[0][:8]], device=device)
        model.generate(warm, attention_mask=torch.ones_like(warm), max_new_tokens=2, min_new_tokens=2, **gen_kwargs)
        _sync(device)
        t0 = time.perf_counter()
        out = model.generate(ids, attention_mask=mask, max_new_tokens=new, min_new_tokens=new, **gen_kwargs)
        _sync(device)
        wall = time.perf_counter() - t0
    generated = out[:, width:]
    if generated.shape[1] != new:
        raise RuntimeError(f"static generate produced {generated.shape[1]} tokens per row, expected {new}")
    tokens = [generated[i, :n].tolist() for i, n in enumerate(workload.output_lens)]
    result = SystemResult(
        name="transformers static", wall_seconds=wall, useful_output_tokens=workload.num_output_tokens,
        generated_tokens=int(generated.numel()), load_seconds=load, exact_match_vs_stoke=_match(tokens, reference),
        notes=[f"one batch of {len(workload.prompts)}, left-padded to {width}, max_new_tokens=min_new_tokens={new}; "
               "min_new_tokens masks EOS, which can change a greedy token"],
        extra={"attn_implementation": model.config._attn_implementation, "padded_prompt_len": width,
               "max_new_tokens": new},
    )
    del model, out
    _free()
    return result


def run_continuous(path: str, workload: Workload, reference: list[list[int]] | None,
                   args: argparse.Namespace, kv_tokens: int) -> SystemResult:
    """transformers' continuous batching (the manager behind generate_batch).

    api="manager": generate_batch's own loop, but through its context manager so that setup
    (cache allocation) is outside the timing and each request gets its own max_new_tokens
    (generate_batch takes one for all). api="generate_batch": the call itself, timed whole
    (setup included), with max(output_lens) for every request.
    """
    from transformers import GenerationConfig
    from transformers.generation.configuration_utils import ContinuousBatchingConfig
    from transformers.generation.continuous_batching.utils import WorkloadHints

    model, load = _load_hf(path, args, attn_implementation=args.cb_attn)
    pad = _pad_id(model)
    new = max(workload.output_lens)
    gen_config = GenerationConfig(max_new_tokens=new, do_sample=False, eos_token_id=-1, pad_token_id=pad)
    page = 256
    # Its default sizes the KV pool from ~90% of free memory (all of RAM on CPU, tens of GB to
    # allocate, and its attention masks grow with the pool): give it stoke's KV budget, or just
    # what the whole workload needs at once if that is less. Everything else is its default.
    need = sum(-(-(len(p) + n) // page) for p, n in zip(workload.prompts, workload.output_lens))
    # The page-size field was `block_size` up to transformers 5.17 and `page_size` after.
    fields = ContinuousBatchingConfig.__dataclass_fields__
    page_field = "page_size" if "page_size" in fields else "block_size"
    cb_kwargs: dict[str, Any] = {page_field: page, "num_blocks": max(1, min(kv_tokens // page, need))}
    if args.cb_max_batch_tokens:
        cb_kwargs["max_batch_tokens"] = args.cb_max_batch_tokens
    cb_config = ContinuousBatchingConfig(**cb_kwargs)
    hints = WorkloadHints(max_prompt_length=max(len(p) for p in workload.prompts),
                          max_generated_length=new, num_requests=len(workload.prompts))
    notes = [f"attn_implementation={args.cb_attn}; KV pool {cb_kwargs['num_blocks']} pages of {page} tokens "
             f"(min of stoke's KV budget and the whole workload at once); other ContinuousBatchingConfig fields at their defaults"]
    extra: dict[str, Any] = {"api": args.cb_api, "attn_implementation": args.cb_attn, **cb_kwargs}

    # no_grad, not inference_mode: the manager's thread updates in place tensors that its
    # warm-up created in this one, and inference tensors refuse that outside inference mode.
    if args.cb_api == "generate_batch":
        with torch.no_grad():
            model.generate_batch(inputs=[workload.prompts[0][:8]], generation_config=GenerationConfig(
                max_new_tokens=2, do_sample=False, eos_token_id=-1, pad_token_id=pad),
                continuous_batching_config=cb_config)
            t0 = time.perf_counter()
            results = model.generate_batch(inputs=workload.prompts, generation_config=gen_config,
                                           continuous_batching_config=cb_config)
            wall = time.perf_counter() - t0
        ordered = list(results.values())
        generated = sum(len(r.generated_tokens) for r in ordered)
        tokens = [list(r.generated_tokens)[:n] for r, n in zip(ordered, workload.output_lens)]
        notes.append(f"generate_batch takes one max_new_tokens: every request ran {new} tokens, only its own "
                     "output length counts as useful; timing includes its setup")
    else:
        with torch.no_grad(), model.continuous_batching_context_manager(
            generation_config=gen_config, continuous_batching_config=cb_config, block=True, timeout=60,
            workload_hints=hints,
        ) as manager:
            manager.add_request(workload.prompts[0][:8], request_id="warmup", max_new_tokens=2)
            _collect(manager, {"warmup"})
            t0 = time.perf_counter()
            ids = [f"r{i}" for i in range(len(workload.prompts))]
            for rid, prompt, n in zip(ids, workload.prompts, workload.output_lens):
                manager.add_request(prompt, request_id=rid, max_new_tokens=n)
            results = _collect(manager, set(ids))
            wall = time.perf_counter() - t0
            cache = manager.batch_processor.cache if manager.batch_processor is not None else None
            if cache is not None:
                extra["resolved_max_batch_tokens"] = cache.max_batch_tokens
            extra["max_requests_per_batch"] = manager.continuous_batching_config.max_requests_per_batch
        tokens = [list(results[rid].generated_tokens) for rid in ids]
        generated = sum(len(t) for t in tokens)
        notes.append("per-request max_new_tokens through the manager API (what generate_batch uses inside)")
    bad = [i for i, (t, n) in enumerate(zip(tokens, workload.output_lens)) if len(t) != n]
    if bad:
        raise RuntimeError(f"continuous batching returned too few tokens for requests {bad[:5]}")
    result = SystemResult(
        name=f"transformers continuous ({args.cb_attn})", wall_seconds=wall,
        useful_output_tokens=workload.num_output_tokens, generated_tokens=generated, load_seconds=load,
        exact_match_vs_stoke=_match(tokens, reference), notes=notes, extra=extra,
    )
    del model
    _free()
    return result


def _collect(manager, ids: set[str], timeout: float = 3600.0) -> dict[str, Any]:
    results: dict[str, Any] = {}
    deadline = time.monotonic() + timeout
    while len(results) < len(ids):
        if time.monotonic() > deadline:
            raise TimeoutError(f"continuous batching: {len(ids) - len(results)} requests unfinished")
        out = manager.get_result(timeout=1)
        if out is None:
            if not manager.is_running():
                raise RuntimeError("transformers' continuous batching thread died")
            continue
        if out.request_id in ids and out.is_finished():
            if getattr(out, "error", None):
                raise RuntimeError(f"continuous batching request {out.request_id} failed: {out.error}")
            results[out.request_id] = out
    return results


# --------------------------------------------------------- micro-measurements
def scheduler_microbench(num_seqs: int = 256, context: int = 300, steps: int = 200,
                         block_size: int = 16, max_num_batched_tokens: int = 2048) -> dict[str, Any]:
    """schedule()+update() of the pure-Python scheduler with num_seqs decoding sequences of
    ~context tokens (no model: every sampled token is a constant)."""
    rng = random.Random(0)
    max_tokens = steps + 16
    per_seq = -(-(context + 16 + max_tokens) // block_size)
    sched = Scheduler(SchedulerConfig(
        max_model_len=context + 16 + max_tokens + block_size, num_blocks=num_seqs * per_seq + 16,
        block_size=block_size, max_num_seqs=num_seqs, max_num_batched_tokens=max_num_batched_tokens,
    ))
    for i in range(num_seqs):
        n = rng.randint(context - 16, context + 16)
        sched.add_request(Request(f"s{i}", [rng.randrange(3, 30000) for _ in range(n)], max_tokens))
    # Prefill every sequence (no timing), until all of them decode.
    for _ in range(10 * num_seqs):
        batch = sched.schedule()
        sched.update(batch, [7 if batch.samples(i) else None for i in range(len(batch))])
        if batch.num_decodes == num_seqs:
            break
    else:
        raise RuntimeError("scheduler microbench: sequences never all reached decode")
    times = []
    for _ in range(steps):
        t0 = time.perf_counter()
        batch = sched.schedule()
        sampled = [7] * len(batch)
        sched.update(batch, sampled)
        times.append(time.perf_counter() - t0)
        if batch.num_decodes != num_seqs:
            raise RuntimeError(f"scheduler microbench: a step had {batch.num_decodes} decodes, not {num_seqs}")
    times.sort()
    return {
        "num_seqs": num_seqs, "context_tokens": context, "steps": steps,
        "median_ms": statistics.median(times) * 1e3,
        "p90_ms": times[int(0.9 * (len(times) - 1))] * 1e3,
        "mean_ms": statistics.fmean(times) * 1e3,
        "goal_ms": 1.0,
    }


def matmul_rate(m: int, k: int, n: int, repeats: int = 20, device: torch.device | str = "cpu",
                dtype: torch.dtype = torch.float32, min_seconds: float = 0.5) -> dict[str, Any]:
    """torch.matmul's rate at one shape: at least `repeats` runs and `min_seconds` of them. The
    best run is the machine's rate (a shared CPU's median moves with its neighbours' load). On
    CUDA, GPU time by events with the launch hidden (`benchmarks.kernels.Timer`): a wall clock
    around launch and sync would count microseconds of overhead against a matmul of a few."""
    device = torch.device(device)
    a, b = torch.randn(m, k, device=device, dtype=dtype), torch.randn(k, n, device=device, dtype=dtype)
    if device.type == "cuda":
        from benchmarks.kernels import Timer

        timer = Timer(device, iters=repeats, warmup=3)
        timer(lambda: torch.matmul(a, b))
        times = [t / 1e3 for t in timer.times]
    else:
        for _ in range(3):
            torch.matmul(a, b)
        times = []
        while len(times) < repeats or sum(times) < min_seconds:
            t0 = time.perf_counter()
            torch.matmul(a, b)
            times.append(time.perf_counter() - t0)
    t = statistics.median(times)
    return {"shape": f"[{m}, {k}] x [{k}, {n}]", "median_ms": t * 1e3, "gflops": 2.0 * m * k * n / t / 1e9,
            "best_gflops": 2.0 * m * k * n / min(times) / 1e9, "device": str(device),
            "dtype": str(dtype).removeprefix("torch.")}


def layer_params(config: ModelConfig) -> int:
    """Parameters in the decoder layers (every token multiplies by all of them once)."""
    c = config
    q, kv = c.num_heads * c.head_dim, c.num_kv_heads * c.head_dim
    attn = c.hidden_size * (q + 2 * kv) + q * c.hidden_size + (q + 2 * kv if c.qkv_bias else 0)
    mlp = 3 * c.hidden_size * c.intermediate_size
    norms = 2 * c.hidden_size + (2 * c.head_dim if c.qk_norm else 0)
    return c.num_layers * (attn + mlp + norms)


# ----------------------------------------------------------------------- main
def parse_args(argv: list[str] | None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0],
                                formatter_class=argparse.ArgumentDefaultsHelpFormatter)
    p.add_argument("--model", default=None, help="HF checkpoint dir (default: the embedded SmolLM2-135M-Instruct)")
    p.add_argument("--num-requests", type=int, default=64)
    p.add_argument("--min-prompt", type=int, default=32)
    p.add_argument("--max-prompt", type=int, default=512)
    p.add_argument("--min-output", type=int, default=16)
    p.add_argument("--max-output", type=int, default=256)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--threads", type=int, default=None,
                   help="torch intra-op threads for every system (default: torch's own); on a CPU shared with "
                        "other busy processes, fewer threads than cores avoids OpenMP barriers waiting a time slice")
    p.add_argument("--max-num-seqs", type=int, default=256, help="stoke")
    p.add_argument("--max-num-batched-tokens", type=int, default=2048, help="stoke")
    p.add_argument("--max-model-len", type=int, default=None, help="stoke (default: the model's positions); "
                   "CUDA graphs' block tables are this wide")
    p.add_argument("--gpu-memory-utilization", type=float, default=None, help="stoke on CUDA (default: its own)")
    p.add_argument("--enforce-eager", action="store_true", help="stoke: no CUDA graphs")
    p.add_argument("--cuda-graph-mode", default="full", choices=["full", "decode"],
                   help="stoke: graphs for decode and mixed steps (full) or pure-decode steps only")
    p.add_argument("--async-scheduling", action=argparse.BooleanOptionalAction, default=None,
                   help="stoke: launch each step before the previous one's tokens reach the host "
                        "(default: on for CUDA, off for the CPU)")
    p.add_argument("--dtype", default="float32", choices=["float32", "bfloat16", "float16"],
                   help="every system")
    p.add_argument("--device", default="auto", help="every system: auto (CUDA if present), cpu, cuda")
    p.add_argument("--load-format", default="auto", choices=["auto", "dummy"],
                   help="dummy: random weights from the config alone, for stoke and transformers alike "
                        "(their weights differ, so token agreement is not reported)")
    p.add_argument("--skip-transformers", action="store_true", help="skip both transformers runs")
    p.add_argument("--skip-static", action="store_true")
    p.add_argument("--skip-continuous", action="store_true")
    p.add_argument("--cb-attn", default="sdpa", help="transformers continuous batching attn_implementation "
                   "(sdpa or paged|eager on CPU)")
    p.add_argument("--cb-api", choices=("manager", "generate_batch"), default="manager",
                   help="manager: per-request max_new_tokens, setup untimed; generate_batch: the one call")
    p.add_argument("--cb-max-batch-tokens", type=int, default=None, help="default: transformers' own")
    p.add_argument("--sched-seqs", type=int, default=256, help="scheduler micro-benchmark: decoding sequences")
    p.add_argument("--sched-context", type=int, default=300)
    p.add_argument("--sched-steps", type=int, default=200)
    p.add_argument("--out", default="results/offline.json")
    args = p.parse_args(argv)
    if args.min_prompt < 1 or args.min_prompt > args.max_prompt:
        p.error("need 1 <= --min-prompt <= --max-prompt")
    if args.min_output < 1 or args.min_output > args.max_output:
        p.error("need 1 <= --min-output <= --max-output")
    if args.num_requests < 1:
        p.error("--num-requests must be >= 1")
    if args.threads is not None and args.threads < 1:
        p.error("--threads must be >= 1")
    return args


def _fmt_ratio(x: float | None) -> str:
    return "-" if x is None else f"{x:.2f}x"


def render(report: dict[str, Any]) -> str:
    w = report["workload"]
    lines = [
        f"offline benchmark: {w['num_requests']} requests, prompts {w['prompt_range']}, outputs "
        f"{w['output_range']} ({w['prompt_tokens']} prompt / {w['output_tokens']} output tokens), greedy, "
        f"{report['env']['dtype']} on {report['env']['device']}, torch threads {report['env']['torch_threads']}",
        f"model: {report['env']['model']}",
        "",
        f"{'system':<34}{'wall s':>10}{'useful tok/s':>15}{'stoke/peer':>12}{'GFLOP/s':>10}",
    ]
    for key, sys_ in report["systems"].items():
        lines.append(f"{sys_['name']:<34}{sys_['wall_seconds']:>10.2f}{sys_['useful_tokens_per_second']:>15.1f}"
                     f"{_fmt_ratio(report['ratios'].get(key)):>12}{sys_['useful_gflops']:>10.1f}")
    st = report["systems"].get("stoke")
    if st:
        e = st["extra"]
        lines += ["", f"stoke steps: {e['num_steps']}, batched tokens {e['num_batched_tokens']}, "
                      f"preemptions {e['num_preemptions']}; time: schedule {e['schedule_seconds']:.2f}s, "
                      f"forward {e['forward_seconds']:.2f}s, sample {e['sample_seconds']:.2f}s, "
                      f"other {e['other_seconds']:.2f}s"]
    mm = report["matmul"]
    lines.append(f"{mm['dtype']} matmul {mm['shape']}: best {mm['best_gflops']:.1f} GFLOP/s (median "
                 f"{mm['gflops']:.1f}); stoke achieves {report['engine_gflops']:.1f} GFLOP/s useful = "
                 f"{100 * report['engine_matmul_fraction']:.1f}% of the best")
    sb = report["scheduler_microbench"]
    lines.append(f"scheduler+block manager, {sb['num_seqs']} decoding seqs of ~{sb['context_tokens']} tokens: "
                 f"median {sb['median_ms']:.3f} ms/step (p90 {sb['p90_ms']:.3f}; goal <= {sb['goal_ms']:.0f} ms)")
    for sys_ in report["systems"].values():
        for note in sys_["notes"]:
            lines.append(f"note [{sys_['name']}]: {note}")
        if sys_.get("exact_match_vs_stoke") is not None:
            lines.append(f"note [{sys_['name']}]: {100 * sys_['exact_match_vs_stoke']:.0f}% of requests "
                         "produced exactly stoke's tokens")
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> dict[str, Any]:
    args = parse_args(argv)
    if args.threads is not None:
        torch.set_num_threads(args.threads)
    if args.model is None:
        from engine.default_model import default_model_path

        path = default_model_path()
    else:
        path = args.model
    config = ModelConfig.from_dir(path)
    special = special_token_ids(path, config)
    workload = make_workload(args.num_requests, (args.min_prompt, args.max_prompt),
                             (args.min_output, args.max_output), config.vocab_size, special, args.seed)
    load_before = os.getloadavg()

    systems: dict[str, SystemResult] = {}
    stoke, reference = run_stoke(path, workload, args)
    if args.load_format == "dummy":
        reference = None  # different random weights: token agreement means nothing
    systems["stoke"] = stoke
    print(f"stoke: {stoke.wall_seconds:.2f}s, {stoke.useful_tokens_per_second:.1f} tok/s", flush=True)
    kv_tokens = stoke.extra["num_kv_blocks"] * stoke.extra["block_size"]
    # A peer that breaks (another transformers version, out of memory) is reported, and stoke's
    # figures are still written.
    peer_errors: dict[str, str] = {}
    peers = [("static", args.skip_static, lambda: run_static(path, workload, reference, args)),
             ("continuous", args.skip_continuous, lambda: run_continuous(path, workload, reference, args, kv_tokens))]
    for key, skip, run in peers:
        if args.skip_transformers or skip:
            continue
        try:
            systems[key] = run()
        except Exception as e:  # noqa: BLE001 - any failure of a peer is a result to report
            peer_errors[key] = f"{type(e).__name__}: {e}"[:2000]
            print(f"{key}: FAILED {peer_errors[key]}", flush=True)
            _free()
            continue
        print(f"{key}: {systems[key].wall_seconds:.2f}s", flush=True)

    flops = useful_flops(config, layer_params(config), workload)
    mm = matmul_rate(256, config.hidden_size, config.intermediate_size, device=_device(args), dtype=_dtype(args))
    sched = scheduler_microbench(args.sched_seqs, args.sched_context, args.sched_steps)
    ratios = {key: stoke.useful_tokens_per_second / s.useful_tokens_per_second
              for key, s in systems.items() if key != "stoke"}
    system_json = {}
    for key, s in systems.items():
        d = s.to_json()
        d["useful_gflops"] = flops["total"] / s.wall_seconds / 1e9
        system_json[key] = d
    engine_gflops = system_json["stoke"]["useful_gflops"]
    import transformers

    report = {
        "workload": {
            "num_requests": args.num_requests, "prompt_range": [args.min_prompt, args.max_prompt],
            "output_range": [args.min_output, args.max_output], "seed": args.seed,
            "prompt_tokens": workload.num_prompt_tokens, "output_tokens": workload.num_output_tokens,
        },
        "env": {
            "model": path, "torch": torch.__version__, "transformers": transformers.__version__,
            "device": str(_device(args)), "dtype": args.dtype, "load_format": args.load_format,
            "gpu": torch.cuda.get_device_name() if _device(args).type == "cuda" else None,
            "torch_threads": torch.get_num_threads(), "cpu_count": os.cpu_count(),
            "platform": platform.platform(), "processor": platform.processor(),
            "loadavg_before": load_before, "loadavg_after": os.getloadavg(),
            "argv": sys.argv if argv is None else ["benchmarks/offline.py", *argv],
        },
        "systems": system_json,
        "peer_errors": peer_errors,
        "ratios": ratios,
        "goals": {"static": 3.0, "continuous": 5.0},
        "useful_flops": flops,
        "num_layer_params": layer_params(config),
        "matmul": mm,
        "engine_gflops": engine_gflops,
        "engine_matmul_fraction": engine_gflops / mm["best_gflops"],
        "engine_matmul_fraction_of_median": engine_gflops / mm["gflops"],
        "scheduler_microbench": sched,
    }
    print(render(report), flush=True)
    if args.out:
        write_json(report, args.out)
        print(f"wrote {args.out}")
    return report


if __name__ == "__main__":
    main()
