"""The engine's host time per step with the forward taken out: what the GPU waits on between
steps once CUDA graphs have made the forward cheap to launch (scheduling, input preparation,
the sampler's host side, token bookkeeping, detokenization, outputs).

A 1-layer dummy Qwen3 with the default model's tokenizer decodes `--batch` requests for
`--steps` steps per output kind (vLLM's: "cumulative", "delta" — what the server streams —
and "final" — what LLM.generate runs). The model runner still builds each step's inputs on
the host; only the forward is replaced, by fixed logits over a small vocabulary whose
argmax is mapped to ordinary word tokens (so detokenization does real work). Reported: ms per
step in windows of `--window` steps, so a cost that grows with the output's length shows.
Medians are what to compare; the machine's noise is large at this scale.

`--device-ms X --scheduling sync async` adds a stand-in device: each step's forward becomes an
X ms job on a thread of its own, as a CUDA stream runs beside the host, and a step's tokens
wait for it. Synchronous steps then take host + X; with async scheduling, the host works on
one step's outputs while the next is on the device, and a step takes max(host, X).

    python -m benchmarks.host_overhead --out results/host_overhead.json
"""

from __future__ import annotations

import argparse
import gc
import json
import os
import random
import shutil
import statistics
import sys
import tempfile
import time
from concurrent.futures import Future, ThreadPoolExecutor
from typing import Any

if __package__ in (None, ""):  # run as a file: make the repo root importable
    sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

import torch

from benchmarks.gpu_check import TINY_CONFIG
from benchmarks.report import write_json
from engine.config import EngineConfig
from engine.default_model import default_model_path
from engine.engine import OUTPUT_KINDS, LLMEngine
from engine.llm import LLM
from engine.model_runner import StepLogits
from engine.sampler import SampledTokens, Sampler, SamplerOutput, SamplingRow
from engine.sampling_params import SamplingParams
from server.heap import HeapPacer

STAND_IN_VOCAB = 64  # logits the sampler really sees; its argmax t becomes word token FIRST_WORD + 37 t
FIRST_WORD = 1000
PROMPT_TOKENS = (32, 128)  # each prompt's length, drawn from this range unless --prompt-tokens


def max_tokens(args: argparse.Namespace) -> int:
    """Enough that no request finishes before the measured steps end: the first prompts decode
    while the last ones are still prefilling."""
    budget = EngineConfig().max_num_batched_tokens
    per_step = max(budget - args.batch, budget // 4)  # the decodes take their share of the budget first
    prefill_steps = -(-args.batch * prompt_range(args)[1] // per_step)
    return prefill_steps + args.steps + 8


def prompt_range(args: argparse.Namespace) -> tuple[int, int]:
    return (args.prompt_tokens, args.prompt_tokens) if args.prompt_tokens else PROMPT_TOKENS


class StandInDevice:
    """A GPU stream stand-in: each step's forward is a job of `ms` milliseconds on one thread
    (jobs run in launch order, the host goes on meanwhile); a step's tokens wait for its job."""

    def __init__(self, ms: float) -> None:
        self.ms = ms
        self._stream = ThreadPoolExecutor(max_workers=1, thread_name_prefix="stand-in-device")
        self.last: Future | None = None

    def launch(self) -> None:
        self.last = self._stream.submit(time.sleep, self.ms / 1e3) if self.ms > 0 else None


def engine_without_forward(path: str, batch: int, max_len: int,
                           device: StandInDevice | None = None) -> LLMEngine:
    """An engine for `batch` requests of up to max_len tokens, with a KV pool just that large
    (a zeroed pool of gigabytes can take seconds to allocate)."""
    blocks = batch * -(-max_len // 16)
    engine = LLM(path, load_format="dummy", max_num_seqs=batch, device="cpu", block_size=16,
                 num_kv_blocks=blocks).engine
    runner, sampler = engine.runner, engine.sampler
    logits = torch.randn(batch, STAND_IN_VOCAB, generator=torch.Generator().manual_seed(0))
    device = device or StandInDevice(0.0)

    def execute(step_batch, all_logits_rows=(), previous=None, pooling=False) -> StepLogits:
        inputs = runner.host_inputs(step_batch, previous)  # the host work a CUDA graph replay also does
        device.launch()
        return StepLogits(logits[:len(inputs.sampling_rows)], inputs.sampling_rows, {})

    runner.execute, engine.sampler = execute, _WordSampler(sampler, device)
    return engine


class _WordTokens:
    """The stand-in's sampled ids, mapped to word tokens on the device and on the host; on the
    host once the step's device job is done."""

    def __init__(self, sampled: SampledTokens, job: Future | None) -> None:
        self._sampled, self._job = sampled, job
        self.token_ids = FIRST_WORD + 37 * sampled.token_ids

    def output(self) -> SamplerOutput:
        if self._job is not None:
            self._job.result()
        out = self._sampled.output()
        out.token_ids = [FIRST_WORD + 37 * t for t in out.token_ids]
        return out


class _WordSampler:
    def __init__(self, sampler: Sampler, device: StandInDevice) -> None:
        self.sampler, self.device = sampler, device

    def sample(self, logits: torch.Tensor, rows: list[SamplingRow],
               pending_ids: torch.Tensor | None = None) -> _WordTokens:
        return _WordTokens(self.sampler.sample(logits, rows, pending_ids), self.device.last)


class GcTimer:
    """Time spent in Python's cyclic garbage collector while active (gc.callbacks)."""

    def __init__(self) -> None:
        self.seconds, self.longest, self.full_collections = 0.0, 0.0, 0
        self._start = 0.0

    def __enter__(self) -> GcTimer:
        gc.callbacks.append(self._callback)
        return self

    def __exit__(self, *exc: object) -> None:
        gc.callbacks.remove(self._callback)

    def _callback(self, phase: str, info: dict[str, int]) -> None:
        if phase == "start":
            self._start = time.perf_counter()
            return
        took = time.perf_counter() - self._start
        self.seconds += took
        self.longest = max(self.longest, took)
        self.full_collections += info["generation"] == 2


def measure(engine: LLMEngine, kind: str, args: argparse.Namespace,
            heap: HeapPacer | None = None) -> tuple[list[float], float, GcTimer]:
    """ms per step over each window of measured steps, the p99 of one step's ms, and the
    collector's time among them."""
    rng = random.Random(0)
    ids = [f"{kind}-{i}" for i in range(args.batch)]
    for request_id in ids:
        prompt = [rng.randrange(FIRST_WORD, 20000) for _ in range(rng.randint(*prompt_range(args)))]
        penalties = dict(repetition_penalty=1.1, frequency_penalty=0.3, presence_penalty=0.5) if args.penalties else {}
        engine.add_request(request_id, prompt, SamplingParams(max_tokens=max_tokens(args), ignore_eos=True,
                                                              temperature=0.0, **penalties))
    while engine.scheduler.waiting or any(r.num_uncomputed_tokens > 1 for r in engine.scheduler.running):
        step(engine, kind, heap)  # the prompts: not what is measured
    windows, steps = [], []
    with GcTimer() as collector:
        for _ in range(args.steps // args.window):
            t0 = time.perf_counter()
            for _ in range(args.window):
                t = time.perf_counter()
                step(engine, kind, heap)
                steps.append(time.perf_counter() - t)
            windows.append((time.perf_counter() - t0) * 1e3 / args.window)
    for request_id in ids:
        engine.abort_request(request_id)
    steps.sort()
    return windows, 1e3 * steps[int(0.99 * (len(steps) - 1))], collector


def step(engine: LLMEngine, kind: str, heap: HeapPacer | None) -> None:
    engine.step(outputs=kind)
    if heap is not None:  # as the server's worker runs
        heap.after_step()


def checkpoint_dir(tmp: str, layers: int, max_positions: int = 4096) -> str:
    """A dummy-weight Qwen3 config with the default model's tokenizer (and its vocabulary)."""
    tokenizer_dir = default_model_path()
    with open(os.path.join(tokenizer_dir, "config.json")) as f:
        vocab = json.load(f)["vocab_size"]
    with open(os.path.join(tmp, "config.json"), "w") as f:
        json.dump(TINY_CONFIG | {"num_hidden_layers": layers, "vocab_size": vocab,
                                 "max_position_embeddings": max_positions}, f)
    for name in ("tokenizer.json", "tokenizer_config.json"):
        shutil.copy(os.path.join(tokenizer_dir, name), tmp)
    return tmp


def main(argv: list[str] | None = None) -> dict[str, Any]:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--batch", type=int, default=256)
    p.add_argument("--steps", type=int, default=700, help="decode steps measured per kind")
    p.add_argument("--window", type=int, default=100, help="steps per reported mean")
    p.add_argument("--prompt-tokens", type=int, default=0,
                   help="every prompt this long (0: %d-%d tokens each); the block tables grow with the "
                        "context" % PROMPT_TOKENS)
    p.add_argument("--kinds", nargs="*", default=list(OUTPUT_KINDS), choices=OUTPUT_KINDS)
    p.add_argument("--threads", type=int, default=1)
    p.add_argument("--device-ms", type=float, default=0.0,
                   help="a stand-in device that takes this long per step, beside the host (0: none)")
    p.add_argument("--scheduling", nargs="*", default=["sync"], choices=["sync", "async"],
                   help="async: the host works on step N's outputs while step N+1 is on the (stand-in) device")
    p.add_argument("--penalties", action="store_true",
                   help="every request with repetition, frequency and presence penalties (their host work "
                        "reads each request's whole history every step)")
    p.add_argument("--gc-freeze", action="store_true",
                   help="pace the cyclic collector as the server's worker does (server/heap.py): the start-up heap "
                        "frozen, then what survives a young collection every few steps")
    p.add_argument("--out", default="results/host_overhead.json")
    args = p.parse_args(argv)
    torch.set_num_threads(args.threads)
    with tempfile.TemporaryDirectory() as tmp:
        max_len = prompt_range(args)[1] + max_tokens(args)
        engine = engine_without_forward(checkpoint_dir(tmp, layers=1, max_positions=max(4096, max_len)),
                                        args.batch, max_len, StandInDevice(args.device_ms))
        heap = HeapPacer() if args.gc_freeze else None
        rows = []
        for kind in args.kinds:
            for scheduling in args.scheduling:
                engine.async_scheduling = scheduling == "async"
                windows, p99, collector = measure(engine, kind, args, heap)
                rows.append({"kind": kind, "scheduling": scheduling, "ms_per_step": windows, "p99_step_ms": p99,
                             "gc_ms_per_step": 1e3 * collector.seconds / (len(windows) * args.window),
                             "gc_longest_ms": 1e3 * collector.longest,
                             "gc_full_collections": collector.full_collections})
    for row in rows:
        row["median_ms"] = statistics.median(row["ms_per_step"])
    report = {"batch": args.batch, "prompt_tokens": list(prompt_range(args)), "steps": args.steps,
              "window": args.window, "device_ms": args.device_ms, "gc_freeze": args.gc_freeze,
              "penalties": args.penalties, "rows": rows}
    device = f"a stand-in device step of {args.device_ms:g} ms" if args.device_ms else "forward removed"
    lo, hi = prompt_range(args)
    print(f"ms per step, batch {args.batch}, prompts of {lo}-{hi} tokens, {device}; windows of {args.window} "
          f"steps (output tokens 0-{args.steps}):")
    for row in rows:
        print(f"  {row['kind']:<11}{row['scheduling']:<6}" + " ".join(f"{x:6.2f}" for x in row["ms_per_step"])
              + f"   p99 {row['p99_step_ms']:.1f}; gc {row['gc_ms_per_step']:.2f} ms/step, "
                f"longest {row['gc_longest_ms']:.0f} ms, "
                f"{row['gc_full_collections']} full")
    write_json(report, args.out)
    return report


if __name__ == "__main__":
    main()
