"""`make gpu-check`: every GPU figure of stoke in one command of at most ten minutes.

On a CUDA machine, from the repo root with nothing installed (PYTHONPATH=.):
1. kernel_tests: the Triton kernels compiled for real (fp16/bf16/fp32): `pytest -m gpu` over
   tests/test_kernels_triton.py, tests/test_runner_gpu_path.py, tests/test_kernels_moe.py,
   tests/test_kernels_fp8.py and tests/test_kernels_kv_fp8.py, or, without pytest, benchmarks/mini_pytest.py running the same
   test functions;
2. kernels: benchmarks/kernels.py at GPU sizes (time, HBM GB/s vs peak, ratio to torch);
   moe_kernels: benchmarks/moe_kernels.py, the Triton MoE MLP against the torch reference at
   Qwen3-30B-A3B's and Mixtral-8x7B's expert layouts (time, ratio, GB/s of expert weights, TFLOP/s);
3. offline_*: benchmarks/offline.py with dummy weights for configs/qwen3-0.6b and
   configs/llama-3-8b on the mixed workload scaled up, stoke (CUDA graphs) against
   transformers' continuous batching on the same GPU, then stoke again without async
   scheduling (--no-async-scheduling), with CUDA graphs for pure-decode steps only
   (--cuda-graph-mode decode) and with --enforce-eager; and configs/qwen3-30b-a3b, a mixture of
   experts, and configs/gemma-3-4b, sliding windows past their 1,024 keys, stoke alone;
4. serve_default_model: `stoke serve` on the default model's architecture (config and tokenizer
   carried from `make gpu-carry`, dummy weights; the HTTP stack too, which the GPU box lacks)
   under benchmarks/serve.py's load from four processes: TTFT / ITL percentiles, the GPU
   utilisation its /metrics reports (NVML), CPU per token of each process; skipped without the
   carry;
5. speculative_cost: benchmarks/speculative_cost.py on Qwen3-0.6B's config (dummy weights, an
   oracle proposer right 80% of the time): what a verified draft costs at batch 1, 8 and 32;
   lora_cost: benchmarks/lora.py on the same config, what serving LoRA adapters costs (none, on
   but unused, one adapter, four in four slots, four in two) with CUDA graphs; hybrid_kv:
   benchmarks/hybrid_kv.py on configs/gemma-3-4b, long prompts in the same KV memory with the
   sliding layers' blocks before their window given back and kept; kv_offload:
   benchmarks/kv_offload.py on Qwen3-0.6B's config, chats whose histories outgrow the KV pool with
   the prefix cache's host tier (pinned memory) and without;
6. kernel_configs: benchmarks/kernel_configs.py, the prefill tile and decode split sweeps (run
   after the offline runs against transformers, before the others: see the priority in plan()),
   which write the tuning they recommend after every shape (kernels/tuning.py); kernels_tuned: the attention
   micro-benchmarks again with that tuning (STOKE_KERNEL_TUNING);
7. one JSON (results/gpu_check.json; each stage's own JSON and log under results/gpu_check/)
   and a table.
Each stage is a subprocess with its own time limit, cut to what is left of the budget, so a
stage that hangs or fails costs only itself. `--cpu-smoke` runs the same orchestration at tiny
sizes on the CPU (tests under the interpreter, a tiny dummy model).

    PYTHONPATH=. python3 -m benchmarks.gpu_check                # on the GPU box
    PYTHONPATH=. python3 -m benchmarks.gpu_check --cpu-smoke    # anywhere, ~half a minute
"""

from __future__ import annotations

import argparse
import importlib.util
import json
import os
import platform
import signal
import subprocess
import sys
import time
from dataclasses import asdict, dataclass, field
from typing import Any

from benchmarks.report import describe_prefill_candidate, write_json
from kernels.tuning import parse_tuning

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
MIN_STAGE_S = 5.0  # a stage with less time than this left is skipped, not started
# stoke's offline runs beside the default one (every CUDA graph, async scheduling; with the
# peer): their flags, in the order they are worth the time left.
ENGINE_VARIANTS = {"sync_scheduling": ["--no-async-scheduling"], "decode_graphs": ["--cuda-graph-mode", "decode"],
                   "eager": ["--enforce-eager"]}
# Each offline run's key in the summary.
OFFLINE_KEYS = {"full": "stoke_cuda_graphs", "sync_scheduling": "stoke_sync_scheduling",
                "decode_graphs": "stoke_decode_graphs", "eager": "stoke_eager"}

# What `make gpu-carry` puts beside the repo for the device tool to carry (`carry:
# ["results/gpu_carry"]`): the embedded default model's config and tokenizer, no weights (the
# GPU box has neither the model's wheel nor a network), so the serve stage can start `stoke
# serve` on the default model's architecture with dummy weights and real text.
CARRY_DIR = os.path.join(ROOT, "results", "gpu_carry", "default-model")
CARRY_FILES = ("config.json", "generation_config.json", "tokenizer.json", "tokenizer_config.json")
# Also carried: the HTTP stack the serve stage needs and the GPU box lacks (it has torch, triton
# and transformers, nothing of stoke's own dependencies): the versions this venv tests, as
# wheels for the box's Python unpacked into one directory, put on the serve stage's PYTHONPATH.
CARRY_SITE = os.path.join(ROOT, "results", "gpu_carry", "site")
GPU_BOX_PYTHON = "3.12"  # the device tool's machines
SERVE_STACK = ("fastapi", "uvicorn", "prometheus-client", "nvidia-ml-py", "httpx2")  # and their dependencies

TINY_CONFIG = {
    "architectures": ["Qwen3ForCausalLM"], "model_type": "qwen3", "vocab_size": 512, "hidden_size": 64,
    "intermediate_size": 128, "num_hidden_layers": 2, "num_attention_heads": 4, "num_key_value_heads": 2,
    "head_dim": 32, "max_position_embeddings": 1024, "rms_norm_eps": 1e-6, "rope_theta": 10000.0,
    "tie_word_embeddings": False, "bos_token_id": 1, "eos_token_id": 2,
}


@dataclass(slots=True)
class Stage:
    name: str
    command: list[str]
    limit_s: float  # the most this stage may take (cut to the budget left)
    result_path: str | None = None  # its JSON
    kind: str = ""  # tests | kernels | offline | sweep
    meta: dict[str, Any] = field(default_factory=dict)
    env: dict[str, str] = field(default_factory=dict)  # added to the run's environment
    pythonpath: list[str] = field(default_factory=list)  # appended to the run's PYTHONPATH
    requires: str | None = None  # a file an earlier stage writes: skipped without it
    writes: list[str] = field(default_factory=list)  # files it writes besides its JSON


@dataclass(slots=True)
class StageResult:
    name: str
    status: str  # ok | failed | timeout | skipped
    seconds: float = 0.0
    returncode: int | None = None
    log: str | None = None
    command: list[str] = field(default_factory=list)
    reason: str | None = None
    result: dict[str, Any] | None = None
    meta: dict[str, Any] = field(default_factory=dict)


def run_stage(stage: Stage, remaining_s: float, log_dir: str, env: dict[str, str]) -> StageResult:
    """Run one stage as a subprocess, its output to a log file, killed at its limit."""
    limit = min(stage.limit_s, remaining_s)
    if limit < MIN_STAGE_S:
        return StageResult(stage.name, "skipped", command=stage.command, reason="no time left in the budget",
                           meta=stage.meta)
    if stage.requires and not os.path.exists(stage.requires):
        return StageResult(stage.name, "skipped", command=stage.command,
                           reason=f"{os.path.relpath(stage.requires, ROOT)} does not exist", meta=stage.meta)
    # A warm machine keeps the last run's files: a stage that fails now must not report them.
    for path in [stage.result_path, *stage.writes]:
        if path and os.path.exists(path):
            os.remove(path)
    log = os.path.join(log_dir, f"{stage.name}.log")
    t0 = time.perf_counter()
    print(f"== {stage.name} (limit {limit:.0f}s): {' '.join(stage.command)}", flush=True)
    run_env = env | stage.env
    if stage.pythonpath:
        run_env["PYTHONPATH"] = os.pathsep.join([p for p in [run_env.get("PYTHONPATH")] if p] + stage.pythonpath)
    with open(log, "w") as f:
        # Its own session: at the limit the whole group goes (a serve stage's server and
        # worker too, which would otherwise hold the GPU's memory through the later stages).
        proc = subprocess.Popen(stage.command, cwd=ROOT, env=run_env, stdout=f, stderr=subprocess.STDOUT,
                                start_new_session=True)
        try:
            code: int | None = proc.wait(timeout=limit)
            status = "ok" if code == 0 else "failed"
        except subprocess.TimeoutExpired:
            status, code = "timeout", None
        finally:
            _kill_group(proc)
    seconds = time.perf_counter() - t0
    result = None
    if stage.result_path and os.path.exists(stage.result_path):
        try:
            with open(stage.result_path) as f:
                result = json.load(f)
        except (OSError, ValueError) as e:
            result = {"unreadable": str(e)}
    reason = None if status == "ok" else _tail(log)
    print(f"   {status} in {seconds:.0f}s" + (f": {reason.splitlines()[-1] if reason else ''}"
                                             if status != "ok" else ""), flush=True)
    return StageResult(stage.name, status, seconds, code, os.path.relpath(log, ROOT), stage.command, reason,
                       result, stage.meta)


def _kill_group(proc: subprocess.Popen) -> None:
    """Kill what is left of a stage's process group (nothing, when it cleaned up after itself)."""
    try:
        os.killpg(proc.pid, signal.SIGKILL)
    except (ProcessLookupError, PermissionError):
        pass
    proc.wait()


def _tail(path: str, lines: int = 15) -> str:
    try:
        with open(path, errors="replace") as f:
            return "".join(f.readlines()[-lines:]).strip()
    except OSError:
        return ""


def has_pytest() -> bool:
    return importlib.util.find_spec("pytest") is not None


# ----------------------------------------------------------------------------- the plan
def plan(args: argparse.Namespace, work: str) -> list[Stage]:
    py = sys.executable
    out = lambda name: os.path.join(work, f"{name}.json")  # noqa: E731
    stages: list[Stage] = []
    test_files = ["tests/test_kernels_triton.py", "tests/test_runner_gpu_path.py", "tests/test_kernels_moe.py",
                  "tests/test_kernels_fp8.py", "tests/test_kernels_kv_fp8.py"]
    if args.cpu_smoke:  # the interpreter on a handful of tests: the orchestration is what is tested
        select = ["-k", "store_kv_matches"]
        test_files = test_files[:1]
    else:
        select = ["-m", "gpu"]
    use_pytest = has_pytest() and not args.no_pytest
    if use_pytest:
        cmd = [py, "-m", "pytest", "-q", "-p", "no:cacheprovider", *select, *test_files,
               f"--junitxml={os.path.join(work, 'kernel_tests.xml')}"]
    else:
        cmd = [py, "-m", "benchmarks.mini_pytest", *test_files, *select, "--json", out("kernel_tests")]
    # 210 s: the H200 ran 90 of them in 82 s; there are 123 now, and a test run cut off writes
    # no report at all; 30 s more for the MoE tests' ~24 compiles (not yet timed on a GPU), and
    # 30 s for the fp8 projection's ~45 (kernels compile in about 0.5 s each on a CPU), and 20 s
    # for the fp8 KV cache's ~16 tests.
    stages.append(Stage("kernel_tests", cmd, 30 if args.cpu_smoke else 260, None if use_pytest else out("kernel_tests"),
                        "tests", {"runner": "pytest" if use_pytest else "mini_pytest"},
                        writes=[os.path.join(work, "kernel_tests.xml")]))

    kcmd = [py, "-m", "benchmarks.kernels", "--out", out("kernels")]
    if args.cpu_smoke:
        kcmd += ["--tiny", "--iters", "2", "--only", "decode", "rms_norm", "share"]
    stages.append(Stage("kernels", kcmd, 30 if args.cpu_smoke else 120, out("kernels"), "kernels"))
    moe = [py, "-m", "benchmarks.moe_kernels", "--out", out("moe_kernels")]
    if args.cpu_smoke:
        moe += ["--tiny", "--iters", "2"]
    stages.append(Stage("moe_kernels", moe, 30 if args.cpu_smoke else 60, out("moe_kernels"), "moe"))

    if args.cpu_smoke:
        tiny = os.path.join(work, "tiny-qwen3")
        os.makedirs(tiny, exist_ok=True)
        with open(os.path.join(tiny, "config.json"), "w") as f:
            json.dump(TINY_CONFIG, f)
        models = [("tiny", tiny, ["--num-requests", "3", "--min-prompt", "4", "--max-prompt", "12",
                                  "--min-output", "2", "--max-output", "4", "--dtype", "float32",
                                  "--sched-seqs", "4", "--sched-steps", "3"], 30, 30)]
    else:
        common = ["--dtype", "bfloat16", "--min-prompt", "32", "--max-prompt", "512", "--min-output", "16",
                  "--max-output", "256", "--max-model-len", "1024", "--sched-steps", "50"]
        models = [
            ("qwen3-0.6b", "configs/qwen3-0.6b", ["--num-requests", str(args.requests_small), *common], 150, 75),
            ("llama-3-8b", "configs/llama-3-8b", ["--num-requests", str(args.requests_large), *common], 180, 90),
        ]
    for name, path, extra, limit_peer, limit_alone in models:
        base = [py, "-m", "benchmarks.offline", "--model", path, "--load-format", "dummy", "--skip-static", *extra]
        stages.append(Stage(f"offline_{name}", [*base, "--out", out(f"offline_{name}")], limit_peer,
                            out(f"offline_{name}"), "offline", {"model": name, "graphs": "full"}))
        for graphs, flags in ENGINE_VARIANTS.items():
            stage = f"offline_{name}_{graphs}"
            stages.append(Stage(stage, [*base, *flags, "--skip-transformers", "--out", out(stage)],
                                limit_alone, out(stage), "offline", {"model": name, "graphs": graphs}))
    if not args.cpu_smoke:
        # A mixture of experts, Qwen3-30B-A3B (61 GB in bf16): stoke alone, its experts in
        # kernels.triton_moe inside CUDA graphs (transformers would need a second copy).
        moe = "qwen3-30b-a3b"
        stages.append(Stage(f"offline_{moe}", [py, "-m", "benchmarks.offline", "--model", f"configs/{moe}",
                                               "--load-format", "dummy", "--skip-static", "--skip-transformers",
                                               "--num-requests", "128", *common, "--out", out(f"offline_{moe}")],
                            150, out(f"offline_{moe}"), "offline", {"model": moe, "graphs": "full", "moe": True}))
        # Gemma 3 4B (its released config): five in six layers slide over 1,024 keys, so prompts
        # of up to 3,072 tokens run the windowed kernels past their window. stoke alone.
        gemma = "gemma-3-4b"
        stages.append(Stage(f"offline_{gemma}", [py, "-m", "benchmarks.offline", "--model", f"configs/{gemma}",
                                                 "--load-format", "dummy", "--skip-static", "--skip-transformers",
                                                 "--num-requests", "64", "--dtype", "bfloat16", "--min-prompt", "512",
                                                 "--max-prompt", "3072", "--min-output", "16", "--max-output", "256",
                                                 "--max-model-len", "4096", "--sched-steps", "50",
                                                 "--out", out(f"offline_{gemma}")],
                            120, out(f"offline_{gemma}"), "offline", {"model": gemma, "graphs": "full", "windows": True}))
    # stoke serve on the GPU under the serve benchmark's load: latency percentiles and the GPU
    # utilisation its /metrics reports (NVML), on the carried default model with dummy weights.
    serve = [py, "-m", "benchmarks.serve", "--launch", "stoke", "--model-dir", CARRY_DIR, "--tokenizer", CARRY_DIR,
             "--stoke-arg=--load-format", "--stoke-arg=dummy", "--out-dir", work, "--name", "serve_default_model"]
    if args.cpu_smoke:
        serve += ["--stoke-arg=--kv-cache-memory-bytes", "--stoke-arg=64MiB", "--num-requests", "3",
                  "--prompt-len", "8:16", "--output-len", "2:4"]
    else:  # a GPU streams more chunks a second than one Python client parses (~10k a core)
        serve += ["--num-requests", "512", "--client-processes", "4"]
    carried = carried_stack_fits(args)
    stages.append(Stage("serve_default_model", serve, 60 if args.cpu_smoke else 150, out("serve_default_model"),
                        "serve", {"carried_stack": carried}, requires=os.path.join(CARRY_DIR, "config.json"),
                        pythonpath=[CARRY_SITE] if carried else []))
    # What a verified draft costs where a step reads the weights (speculative decoding, never yet
    # measured on a GPU): the oracle's drafts stand in for a real model's.
    spec = [py, "-m", "benchmarks.speculative_cost", "--out", out("speculative_cost")]
    if args.cpu_smoke:
        spec += ["--model", tiny, "--batches", "1,2", "--prompt-len", "8", "--max-tokens", "6", "--rounds", "1"]
    else:
        spec += ["--model", "configs/qwen3-0.6b", "--batches", "1,8,32", "--max-tokens", "128"]
    stages.append(Stage("speculative_cost", spec, 30 if args.cpu_smoke else 90, out("speculative_cost"),
                        "speculative"))
    # What LoRA adapters cost a step (their dense products inside the CUDA graphs), never yet
    # measured on a GPU.
    lora = [py, "-m", "benchmarks.lora", "--out", out("lora_cost")]
    if args.cpu_smoke:
        lora += ["--model", tiny, "--num-requests", "4", "--adapters", "2", "--rank", "4", "--prompt-len", "8",
                 "--max-tokens", "4", "--rounds", "1"]
    else:
        lora += ["--model", "configs/qwen3-0.6b", "--num-requests", "64", "--prompt-len", "256", "--max-tokens", "64"]
    stages.append(Stage("lora_cost", lora, 60 if args.cpu_smoke else 90, out("lora_cost"), "lora"))
    # What giving a sliding layer's blocks back buys (the hybrid KV cache manager), never yet
    # measured on a GPU: Gemma 3 4B's long prompts in the same 2 GiB of KV, given back and kept.
    hybrid = [py, "-m", "benchmarks.hybrid_kv", "--rounds", "1", "--out", out("hybrid_kv")]
    if args.cpu_smoke:
        hybrid += ["--num-requests", "4", "--prompt-len", "64", "--output-len", "4"]
    else:
        hybrid += ["--model", "configs/gemma-3-4b", "--dtype", "bfloat16", "--num-requests", "48", "--prompt-len",
                   "4096", "--output-len", "128", "--kv-cache-gib", "2", "--max-num-batched-tokens", "8192"]
    stages.append(Stage("hybrid_kv", hybrid, 60 if args.cpu_smoke else 120, out("hybrid_kv"), "hybrid"))
    # What the prefix cache's host tier buys, never yet measured on a GPU: 32 chats of 1k-token
    # system prompts and 512-token turns through a pool that holds 16 of them, their histories
    # loaded back from pinned host memory (9.4 GiB of it) or computed again.
    offload = [py, "-m", "benchmarks.kv_offload", "--rounds", "1", "--out", out("kv_offload")]
    if args.cpu_smoke:
        offload += ["--chats", "3", "--turns", "2", "--system-len", "16", "--user-len", "16", "--output-len", "4",
                    "--max-num-seqs", "1"]
    else:
        offload += ["--model", "configs/qwen3-0.6b", "--load-format", "dummy", "--dtype", "bfloat16", "--chats", "32",
                    "--turns", "3", "--system-len", "1024", "--user-len", "512", "--output-len", "64",
                    "--max-num-seqs", "16", "--max-num-batched-tokens", "8192"]
    stages.append(Stage("kv_offload", offload, 60 if args.cpu_smoke else 90, out("kv_offload"), "offload"))
    # What fp8 buys, never yet measured on a GPU: Llama-3-8B at bf16, with its projections in fp8
    # (the Triton w8a16 product) and with an fp8 KV cache, decode at batch 1 and 32, weights and
    # KV blocks at one budget each (three engines share the card: 16 GiB of bf16 weights in each
    # 0.28 of an H100).
    fp8 = [py, "-m", "benchmarks.fp8", "--rounds", "1", "--cases", "fp8,kv_fp8", "--out", out("fp8")]
    if args.cpu_smoke:
        fp8 += ["--model", tiny, "--load-format", "dummy", "--num-requests", "2", "--prompt-len", "8", "--max-tokens", "4"]
    else:
        fp8 += ["--model", "configs/llama-3-8b", "--load-format", "dummy", "--dtype", "bfloat16", "--num-requests",
                "32", "--prompt-len", "1024", "--max-tokens", "128", "--gpu-memory-utilization", "0.28"]
    stages.append(Stage("fp8", fp8, 60 if args.cpu_smoke else 150, out("fp8"), "fp8"))
    # The sweeps write their JSON after every shape: cut short by the budget, they keep what ran.
    # Prefill tiles get 90 s of the stage's 150, so the decode sweep after them still runs.
    tuning = os.path.join(work, "kernel_tuning.json")
    sweep = [py, "-m", "benchmarks.kernel_configs", "--budget", "90", "--out", out("kernel_configs"),
             "--write-tuning", tuning]
    if args.cpu_smoke:
        sweep += ["--tiny", "--iters", "1"]
    stages.append(Stage("kernel_configs", sweep, 90 if args.cpu_smoke else 150, out("kernel_configs"), "sweep",
                        writes=[tuning]))
    # The attention micro-benchmarks again with the tuning the sweep recommends: the shipped
    # kernels' figures and the tuned ones' from one run, for the next commit to choose.
    tuned = [py, "-m", "benchmarks.kernels", "--only", "decode", "prefill", "--out", out("kernels_tuned")]
    if args.cpu_smoke:
        tuned += ["--tiny", "--iters", "1", "--impl", "triton", "--layouts", "qwen3-0.6b"]
    stages.append(Stage("kernels_tuned", tuned, 90 if args.cpu_smoke else 60, out("kernels_tuned"), "kernels",
                        {"tuning": tuning}, env={"STOKE_KERNEL_TUNING": tuning}, requires=tuning))
    # Priority when time runs short (the budget rarely fits every stage), by what each stage
    # still has to tell: the kernel tests and benchmarks (attention, then MoE); stoke (the defaults) against
    # transformers for both models; the small model without async scheduling (cheap, and it
    # decides that default); the kernel sweeps and the tuned re-run (the open kernel goals);
    # the server (never yet measured on a GPU); what a verified draft costs (nor that); the
    # mixture of experts; Gemma's windows; the large model without async scheduling; then the
    # CUDA-graph variants.
    order: dict[str, float] = {"kernel_tests": 0, "kernels": 1, "moe_kernels": 1.5, "kernel_configs": 5, "kernels_tuned": 6,
                               "serve_default_model": 7, "speculative_cost": 7.5, "lora_cost": 7.7, "hybrid_kv": 7.95,
                               "kv_offload": 7.97, "fp8": 7.98}
    variant_order = {("full", 0): 2, ("full", 1): 3, ("sync_scheduling", 0): 4, ("sync_scheduling", 1): 8,
                     ("decode_graphs", 0): 9, ("decode_graphs", 1): 10, ("eager", 0): 11, ("eager", 1): 12}
    for s in stages:
        if s.kind == "offline" and s.meta.get("moe"):
            order[s.name] = 7.8
        elif s.kind == "offline" and s.meta.get("windows"):
            order[s.name] = 7.9
        elif s.kind == "offline":
            small = s.meta["model"] in ("qwen3-0.6b", "tiny")
            order[s.name] = variant_order[s.meta["graphs"], 0 if small else 1]
    stages.sort(key=lambda s: order[s.name])
    if args.stages:
        stages = [s for s in stages if s.name in args.stages]
    return stages


# ----------------------------------------------------------------------------- results
def _junit(path: str) -> dict[str, Any] | None:
    import xml.etree.ElementTree as ET

    if not os.path.exists(path):
        return None
    root = ET.parse(path).getroot()
    suites = [root] if root.tag == "testsuite" else root.findall("testsuite")
    total = {k: sum(int(s.get(k, 0)) for s in suites) for k in ("tests", "failures", "errors", "skipped")}
    failed = [f"{c.get('classname')}::{c.get('name')}" for s in suites for c in s.iter("testcase")
              if c.find("failure") is not None or c.find("error") is not None]
    return {"passed": total["tests"] - total["failures"] - total["errors"] - total["skipped"],
            "failed": total["failures"] + total["errors"], "skipped": total["skipped"], "failures": failed[:20]}


def summarise(results: list[StageResult], work: str) -> dict[str, Any]:
    summary: dict[str, Any] = {"tests": None, "kernels": None, "offline": {}}
    for r in results:
        try:
            _summarise_stage(r, work, summary)
        except Exception as exc:  # a file cut off mid-write: the other stages' figures still count
            summary.setdefault("errors", []).append(f"{r.name}: {type(exc).__name__}: {exc}")
    for model, e in summary["offline"].items():
        cb, graphs, eager = e.get("transformers_cb"), e.get("stoke_cuda_graphs"), e.get("stoke_eager")
        decode_only = e.get("stoke_decode_graphs")
        e["stoke_vs_transformers_cb"] = graphs / cb if graphs and cb else None
        e["cuda_graphs_speedup"] = graphs / eager if graphs and eager else None
        e["mixed_graphs_speedup"] = graphs / decode_only if graphs and decode_only else None
        sync = e.get("stoke_sync_scheduling")
        e["async_scheduling_speedup"] = graphs / sync if graphs and sync else None
        e["goal_vs_transformers_cb"] = 3.0
    return summary


def _summarise_stage(r: StageResult, work: str, summary: dict[str, Any]) -> None:
    """One stage's figures into the summary."""
    if r.name == "kernel_tests":
        tests = _junit(os.path.join(work, "kernel_tests.xml")) if r.meta.get("runner") == "pytest" else r.result
        if tests is not None:
            tests = {k: tests[k] for k in ("passed", "failed", "skipped") if k in tests} | {
                "failures": [f["test"] if isinstance(f, dict) else f for f in tests.get("failures", [])][:20]}
        summary["tests"] = {"runner": r.meta.get("runner"), "status": r.status, **(tests or {})}
    elif r.name == "kernels" and r.result:
        summary["kernels"] = _kernel_summary(r.result)
    elif r.name == "moe_kernels" and r.result and "rows" in r.result:
        env = r.result["env"]
        summary["moe_kernels"] = {"device": env.get("device_name"), "impl": env.get("impl"),
                                  "peak_gbps": env.get("peak_gbps"), **r.result["summary"]}
    elif r.name == "kernels_tuned" and r.result and "env" in r.result:
        with open(r.meta["tuning"]) as f:
            tuning = parse_tuning(json.load(f), r.meta["tuning"])
        summary["kernels_tuned"] = _kernel_summary(r.result) | {"tuning": tuning.as_json()}
    elif r.name == "serve_default_model" and r.result and "runs" in r.result:
        stoke = r.result["runs"].get("stoke", {}).get("summary", {})
        summary["serve"] = {k: stoke.get(k) for k in (
            "completed", "failed", "output_token_throughput", "p50_ttft_ms", "p99_ttft_ms", "p50_itl_ms",
            "p99_itl_ms", "p99_e2e_ms", "gpu_utilization_mean", "gpu_utilization_samples",
            "server_cpu_us_per_token", "tokens_per_chunk", "client_cpu_busy", "client_bound")}
    elif r.name == "speculative_cost" and r.result and "results" in r.result:
        summary["speculative"] = {"model": r.result["args"]["model"], "acceptance": r.result["args"]["acceptance"],
                                  "async_scheduling": r.result.get("async_scheduling"),
                                  "rows": [{k: row[k] for k in ("batch", "drafts", "tok_s", "speedup", "ms_per_step",
                                                                "acceptance", "same_tokens")}
                                           for row in r.result["results"]]}
    elif r.name == "fp8" and r.result and "results" in r.result:
        summary["fp8"] = {"model": r.result["model"], "memory": r.result["memory"],
                                  "quality": r.result["quality"],
                                  "rows": [{k: row[k] for k in ("case", "batch", "tok_s", "vs_wide", "ms_per_step")}
                                           for row in r.result["results"]]}
    elif r.name == "lora_cost" and r.result and "results" in r.result:
        summary["lora"] = {"model": r.result["args"]["model"], "cuda_graphs": r.result.get("cuda_graphs"),
                           "checks": r.result.get("checks"),
                           "rows": [{k: row[k] for k in ("case", "tok_s", "vs_no_lora", "ms_per_step")}
                                    for row in r.result["results"]]}
    elif r.name == "hybrid_kv" and r.result and "summary" in r.result:
        summary["hybrid_kv"] = {"args": {k: r.result["args"][k] for k in ("model", "num_requests", "prompt_len",
                                                                          "output_len", "kv_cache_gib")},
                                "same_tokens": r.result["same_tokens"], "ratio_tok_s": r.result["ratio_tok_s"],
                                **r.result["summary"]}
    elif r.name == "kv_offload" and r.result and "summary" in r.result:
        summary["kv_offload"] = {"args": {k: r.result["args"][k] for k in ("chats", "turns", "system_len", "user_len",
                                                                           "output_len", "max_num_seqs")},
                                 "model": r.result["model"], "num_kv_blocks": r.result["num_kv_blocks"],
                                 "host_pinned": r.result.get("host_pinned"), "host_bytes": r.result.get("host_bytes"),
                                 "same_tokens": r.result["same_tokens"], "ratios": r.result["ratios"],
                                 **r.result["summary"]}
    elif r.name == "kernel_configs" and r.result and "rows" in r.result:
        summary["sweeps"] = _sweep_summary(r.result)
    elif r.name.startswith("offline_") and r.result and "systems" in r.result:
        entry = summary["offline"].setdefault(r.meta["model"], {})
        systems = r.result["systems"]
        key = OFFLINE_KEYS[r.meta["graphs"]]
        stoke = systems.get("stoke", {})
        entry[key] = stoke.get("useful_tokens_per_second")
        entry[f"{key}_extra"] = {k: stoke.get("extra", {}).get(k) for k in (
            "num_steps", "forward_seconds", "sample_seconds", "schedule_seconds", "cuda_graph_buckets",
            "cuda_graph_token_buckets", "cuda_graph_capture_seconds", "device_busy_fraction",
            "fused_norm_rope", "async_scheduling", "num_kv_blocks", "memory_profile", "dtype", "device")}
        if "continuous" in systems:
            entry["transformers_cb"] = systems["continuous"].get("useful_tokens_per_second")
        if r.result.get("peer_errors"):
            entry["peer_errors"] = r.result["peer_errors"]
        entry["workload"] = r.result.get("workload")


def _sweep_summary(k: dict[str, Any]) -> dict[str, Any]:
    """Per swept shape: the shipped choice's time, the best candidate's, and SDPA's."""
    prefill = [{"shape": f"{r['layout']} {r['seqs']}x{r['length']} b{r.get('block_size', 16)}", "sdpa_ms": r["sdpa_ms"],
                "shipped_ms": r["shipped_ms"], "best_ms": r["best"] and r["best"]["ms"],
                "best": r["best"] and describe_prefill_candidate(r["best"])}
               for r in k.get("rows", [])]
    decode = [{"shape": f"{r['layout']} n{r['batch']} ctx{r['context']} b{r.get('block_size', 16)}", "sdpa_ms": r["sdpa_ms"],
               "shipped_ms": r["heuristic_ms"], "best_ms": r["best"]["ms"],
               "best": f"{r['best']['splits']} splits (heuristic {r['heuristic_splits']})"}
              for r in k.get("decode", [])]
    return {"prefill": prefill, "decode": decode}


def _kernel_summary(k: dict[str, Any]) -> dict[str, Any]:
    def ratios(rows: list[dict[str, Any]], key: str) -> dict[str, float] | None:
        values = sorted(r[key] for r in rows if r.get(key) is not None)
        if not values:
            return None
        return {"min": values[0], "median": values[len(values) // 2], "max": values[-1]}

    decode = k.get("decode", [])
    long_ctx = max((r["context"] for r in decode if "context" in r), default=None)
    best = {}
    for r in decode:
        if r.get("context") == long_ctx and r.get("stoke_peak_fraction") is not None:
            best[r["layout"]] = max(best.get(r["layout"], 0.0), r["stoke_peak_fraction"])
    return {
        "device": k["env"].get("device_name"), "peak_gbps": k["env"].get("peak_gbps"), "impl": k["env"].get("impl"),
        "decode_long_context": long_ctx, "decode_best_peak_fraction": best,
        "decode_vs_sdpa": ratios(decode, "sdpa_contiguous_ratio"),
        "decode_vs_torch_paged": ratios(decode, "torch_paged_ratio"),
        "prefill_vs_sdpa": ratios(k.get("prefill", []), "sdpa_contiguous_ratio"),
        "prefill_vs_torch_paged": ratios(k.get("prefill", []), "torch_paged_ratio"),
        "store_kv_vs_torch": ratios(k.get("store_kv", []), "torch_ratio"),
        "rms_norm_vs_torch": ratios(k.get("rms_norm", []), "torch_ratio"),
        "rotary_vs_torch": ratios(k.get("rotary", []), "torch_ratio"),
        # Not goals, choices: packed GQA prefill against one head per program; a mixed step's
        # single prefill launch (what mixed CUDA graphs ran before the graphed decodes) against
        # the eager split, and against the graphed decodes beside it (what they run now).
        "prefill_packed_vs_unpacked": ratios(k.get("prefill", []), "unpacked_ratio"),
        "prefill_cache_vs_new_kv_rows": ratios(k.get("prefill", []), "new_kv_rows_ratio"),
        "prefill_cache_vs_new_kv_tma": ratios(k.get("prefill", []), "new_kv_tma_ratio"),
        "mixed_one_launch_vs_split": ratios(k.get("mixed", []), "split_ratio"),
        "mixed_one_launch_vs_graphed": ratios(k.get("mixed", []), "graphed_ratio"),
        "decode_fused_vs_merge_kernel": ratios(decode, "merge_kernel_ratio"),
        # Which SDPA backend the goal's peer is, and stoke against each fused one forced.
        "sdpa_backends": sorted({r["sdpa_backend"] for r in decode + k.get("prefill", []) if r.get("sdpa_backend")}),
        "decode_vs_sdpa_flash": ratios(decode, "sdpa_flash_ratio"),
        "decode_vs_sdpa_cudnn": ratios(decode, "sdpa_cudnn_ratio"),
        "prefill_vs_sdpa_flash": ratios(k.get("prefill", []), "sdpa_flash_ratio"),
        "prefill_vs_sdpa_cudnn": ratios(k.get("prefill", []), "sdpa_cudnn_ratio"),
        "attention_share": [
            {"model": s.get("model"), **{p: s[p]["attention_share"] for p in ("decode", "prefill") if p in s}}
            for s in k.get("attention_share", [])],
        "slower_than_torch": k.get("summary", {}).get("slower_than_torch", [])[:20],
    }


def _f(x: Any, spec: str = ".2f") -> str:
    return "-" if x is None else format(x, spec)


def _spread(r: dict[str, float]) -> str:
    return f"min {_f(r['min'])}x, median {_f(r['median'])}x, max {_f(r['max'])}x"


def render(report: dict[str, Any]) -> str:
    env, s = report["env"], report["summary"]
    lines = [f"gpu-check on {env['device_name']} — python {env['python']}, torch {env['torch']}, triton "
             f"{env['triton']}, transformers {env['transformers']}; {env['seconds']:.0f}s of a {env['budget_s']:.0f}s budget",
             "", f"{'stage':<36}{'status':<10}{'seconds':>8}"]
    missing = [m for m, present in (env.get("server_packages") or {}).items() if not present]
    carried = any(r["meta"].get("carried_stack") and r["status"] != "skipped" for r in report["stages"])
    if missing:
        lines.insert(1, f"not installed here (stoke serve needs them): {', '.join(missing)}"
                        + ("; the serve stage ran with the carried ones (make gpu-carry)" if carried else ""))
    for r in report["stages"]:
        lines.append(f"{r['name']:<36}{r['status']:<10}{r['seconds']:>8.0f}"
                     + (f"  {(r['reason'] or '').splitlines()[-1][:90]}" if r["status"] != "ok" and r["reason"] else ""))
    t = s.get("tests")
    if t:
        lines += ["", f"kernel tests ({t['runner']}): {t.get('passed', '-')} passed, {t.get('failed', '-')} failed, "
                      f"{t.get('skipped', '-')} skipped"]
        lines += [f"  FAILED {name}" for name in t.get("failures", [])]
    k = s.get("kernels")
    if k:
        lines += ["", f"kernels ({k['impl']} on {k['device']}, peak {_f(k['peak_gbps'], '.0f')} GB/s):"]
        for layout, frac in k["decode_best_peak_fraction"].items():
            lines.append(f"  decode {layout} at context {k['decode_long_context']}: best {100 * frac:.0f}% of peak "
                         f"HBM bandwidth (goal 80%)")
        if k.get("sdpa_backends"):
            lines.append(f"  torch SDPA chose: {', '.join(k['sdpa_backends'])}")
        for key in ("decode_vs_sdpa", "decode_vs_sdpa_flash", "decode_vs_sdpa_cudnn", "decode_vs_torch_paged",
                    "prefill_vs_sdpa", "prefill_vs_sdpa_flash", "prefill_vs_sdpa_cudnn", "prefill_vs_torch_paged",
                    "store_kv_vs_torch", "rms_norm_vs_torch", "rotary_vs_torch"):
            r = k.get(key)
            if r:
                lines.append(f"  {key:<24} torch/stoke time: {_spread(r)} (goal >= 1)")
        for key, what in (("prefill_packed_vs_unpacked", "unpacked/packed"),
                          ("prefill_cache_vs_new_kv_rows", "new keys from rows/through the cache"),
                          ("prefill_cache_vs_new_kv_tma", "new keys by TMA/through the cache"),
                          ("mixed_one_launch_vs_split", "split/one"),
                          ("decode_fused_vs_merge_kernel", "two launches/one")):
            r = k.get(key)
            if r:
                lines.append(f"  {key:<28} {what} time: {_spread(r)} (> 1: the engine's choice is faster)")
        r = k.get("mixed_one_launch_vs_graphed")
        if r:
            lines.append(f"  {'mixed_one_launch_vs_graphed':<28} graphed/one time: {_spread(r)} (< 1: the graphed "
                         "decodes, what mixed graphs run now, are faster)")
        tuned = s.get("kernels_tuned")
        if tuned:
            lines.append(f"  with the sweep's tuning {tuned['tuning']} (STOKE_KERNEL_TUNING):")
            for key in ("decode_vs_sdpa", "prefill_vs_sdpa"):
                r = tuned.get(key)
                if r:
                    lines.append(f"    {key:<22} torch/stoke time: {_spread(r)} (goal >= 1)")
        for share in k["attention_share"]:
            lines.append(f"  attention share of a step, {share['model']}: decode {_f(100 * share['decode'], '.0f')}%, "
                         f"prefill {_f(100 * share['prefill'], '.0f')}%" if "decode" in share and "prefill" in share
                         else f"  attention share, {share['model']}: -")
    m = s.get("moe_kernels")
    if m:
        lines += ["", f"MoE kernels ({m['impl']} on {m['device']}, peak {_f(m['peak_gbps'], '.0f')} GB/s; "
                      "reference/Triton time, > 1: Triton faster):"]
        for layout, v in m["layouts"].items():
            frac, diff = v["decode_best_peak_fraction"], v["max_rel_diff"]
            lines.append(f"  {layout:<16} " + (_spread(v["ratio"]) if v["ratio"] else "-")
                         + f"; decode best {_f(None if frac is None else 100 * frac, '.0f')}% of peak on the weights"
                         f"; T={v['largest_tokens']} {_f(v['largest_tflops'], '.0f')} TFLOP/s"
                         f"; max rel diff {_f(diff, '.1e')}")
        lines += [f"  note: {note}" for note in m["notes"]]
    for kind, rows in (s.get("sweeps") or {}).items():
        if rows:
            lines += ["", f"{kind} sweep (ms){'':<12}{'sdpa':>11}{'shipped':>11}{'best':>11}  best candidate"]
            lines += [f"{r['shape']:<30}{_f(r['sdpa_ms'], '.4f'):>11}{_f(r['shipped_ms'], '.4f'):>11}"
                      f"{_f(r['best_ms'], '.4f'):>11}  {r['best']}" for r in rows]
    if s.get("serve"):
        v = s["serve"]
        util = v.get("gpu_utilization_mean")
        lines += ["", f"stoke serve (default model, dummy weights; {v['completed']} ok, {v['failed']} failed): "
                      f"{_f(v['output_token_throughput'], '.0f')} output tok/s, TTFT p50/p99 "
                      f"{_f(v['p50_ttft_ms'], '.0f')}/{_f(v['p99_ttft_ms'], '.0f')} ms, ITL p50/p99 "
                      f"{_f(v['p50_itl_ms'], '.1f')}/{_f(v['p99_itl_ms'], '.1f')} ms, GPU utilisation (NVML) "
                      + ("-" if util is None else f"{100 * util:.0f}% over {v['gpu_utilization_samples']} samples")]
        cpu = v.get("server_cpu_us_per_token")
        if cpu:
            lines.append(f"  CPU per output token: HTTP process {cpu['main']:.0f} us, engine worker "
                         f"{cpu['children']:.0f} us (one core each: the larger caps tok/s at 1e6 / it); "
                         f"{_f(v.get('tokens_per_chunk'))} tokens per SSE chunk")
        busy = v.get("client_cpu_busy")
        if busy is not None:
            lines.append(f"  load generators: the busiest kept {100 * busy:.0f}% of a core busy"
                         + (" (near 100%: latencies include its lag)" if v.get("client_bound") else ""))
    if s.get("speculative"):
        v = s["speculative"]
        lines += ["", f"speculative decoding's cost ({v['model']}, dummy weights, drafts right "
                      f"{100 * v['acceptance']:.0f}% of the time; off runs async: {v['async_scheduling']}):"]
        for row in v["rows"]:
            if row["drafts"]:
                lines.append(f"  batch {row['batch']:>3}: {_f(row['tok_s'], '.0f')} tok/s with drafts, "
                             f"{_f(row['speedup'])}x the tok/s without them; {_f(row['ms_per_step'])} ms a step; "
                             f"{row['same_tokens']}/{row['batch']} answers unchanged")
    if s.get("lora"):
        v = s["lora"]
        lines += ["", f"LoRA's cost ({v['model']}, dummy weights, CUDA graphs: {v['cuda_graphs']}; checks "
                      f"{v['checks']}):"]
        for row in v["rows"]:
            lines.append(f"  {row['case']:<24} {_f(row['tok_s'], '.0f'):>8} tok/s, {_f(row['vs_no_lora'])}x the "
                         f"tok/s without LoRA; {_f(row['ms_per_step'])} ms a step")
    if s.get("hybrid_kv"):
        v = s["hybrid_kv"]
        a = v["args"]
        lines += ["", f"hybrid KV cache manager ({a['model']}, {a['num_requests']} requests of {a['prompt_len']} + "
                      f"{a['output_len']} tokens in {a['kv_cache_gib']} GiB of KV; same tokens: {v['same_tokens']}):"]
        for case in ("hybrid", "kept"):
            row = v[case]
            lines.append(f"  {case:<7} {_f(row['output_tok_s'], '.0f'):>8} tok/s, {row['max_running']} running at most "
                         f"({_f(row['mean_running'], '.1f')} mean), {row['preemptions']} preemptions")
        lines.append(f"  hybrid / kept: {_f(v['ratio_tok_s'])}x the output tok/s")
    if s.get("kv_offload"):
        v = s["kv_offload"]
        a = v["args"]
        lines += ["", f"KV offloading ({v['model']}, {a['chats']} chats x {a['turns']} turns of {a['user_len']} + "
                      f"{a['output_len']} tokens after a {a['system_len']}-token system prompt, {a['max_num_seqs']} at "
                      f"once in {v['num_kv_blocks']} blocks; same tokens: {v['same_tokens']}; host tier "
                      f"{_f(v['host_bytes'] and v['host_bytes'] / 2**30)} GiB, pinned: {v['host_pinned']}):"]
        for case in ("offload", "none"):
            row = v[case]
            lines.append(f"  {case:<7} {_f(row['output_tok_s'], '.0f'):>8} tok/s, TTFT p50 {_f(row['ttft_p50'], '.3f')} s, "
                         f"p99 {_f(row['ttft_p99'], '.3f')} s; {_f(row['computed_prompt_tokens'], '.0f')} prompt "
                         f"tokens computed, {_f(row['loaded_blocks'], '.0f')} blocks loaded")
        r = v["ratios"]
        lines.append(f"  offload / none: {_f(r['output_tok_s'])}x the output tok/s, TTFT {_f(r['ttft_p50'])}x lower "
                     f"at p50, {_f(r['ttft_p99'])}x at p99")
    if s.get("offline"):
        lines += ["", f"{'offline (useful tok/s)':<24}{'stoke':>8}{'sync sched':>12}{'decode graphs':>15}"
                      f"{'eager':>8}{'HF CB':>8}{'stoke/HF':>10}{'async/sync':>12}{'graphs/eager':>14}"
                      f"{'full/decode':>13}"]
        for model, e in s["offline"].items():
            lines.append(f"{model:<24}{_f(e.get('stoke_cuda_graphs'), '.0f'):>8}"
                         f"{_f(e.get('stoke_sync_scheduling'), '.0f'):>12}{_f(e.get('stoke_decode_graphs'), '.0f'):>15}"
                         f"{_f(e.get('stoke_eager'), '.0f'):>8}{_f(e.get('transformers_cb'), '.0f'):>8}"
                         f"{_f(e.get('stoke_vs_transformers_cb')):>10}{_f(e.get('async_scheduling_speedup')):>12}"
                         f"{_f(e.get('cuda_graphs_speedup')):>14}{_f(e.get('mixed_graphs_speedup')):>13}")
        lines.append("  stoke: every CUDA graph and async scheduling (the defaults); "
                     "each other column changes one of them")
        lines.append("  goal: stoke >= 3x transformers continuous batching on the same GPU")
        for model, e in s["offline"].items():
            busy = [(label, (e.get(f"{key}_extra") or {}).get("device_busy_fraction"))
                    for label, key in (("stoke", "stoke_cuda_graphs"), ("sync scheduling", "stoke_sync_scheduling"),
                                       ("decode graphs", "stoke_decode_graphs"), ("eager", "stoke_eager"))]
            if any(b for _, b in busy):
                lines.append(f"  {model}: share of the wall a step is on the GPU (the rest it waits on the host): "
                             + ", ".join(f"{label} {_f(None if b is None else 100 * b, '.0f')}%" for label, b in busy))
        for model, e in s["offline"].items():
            for peer, error in (e.get("peer_errors") or {}).items():
                lines.append(f"  {model}: transformers {peer} FAILED: {error.splitlines()[0][:120]}")
        for model, e in s["offline"].items():
            extra = e.get("stoke_cuda_graphs_extra") or {}
            if "stoke_cuda_graphs" in e and not extra.get("cuda_graph_buckets"):
                lines.append(f"  note: {model}: no CUDA graphs were captured (CPU, or not the Triton backend)")
    for error in s.get("errors", []):
        lines.append(f"summary of stage {error[:160]} (its figures are left out; its JSON is in the work folder)")
    return "\n".join(lines)


SERVER_PACKAGES = ("fastapi", "uvicorn", "prometheus_client", "pynvml", "openai", "gguf", "safetensors")
_ENV_PROBE = f"SERVER_PACKAGES = {SERVER_PACKAGES!r}\n" + """
import importlib.util, json, platform, sys
info = {"python": platform.python_version(), "platform": platform.platform()}
import torch
info["torch"] = torch.__version__
info["cuda"] = torch.cuda.is_available()
info["device_name"] = torch.cuda.get_device_name() if info["cuda"] else (platform.processor() or "cpu")
for mod in ("triton", "transformers"):
    try:
        info[mod] = __import__(mod).__version__
    except ImportError:
        info[mod] = None
info["pytest"] = importlib.util.find_spec("pytest") is not None
# What `stoke serve` needs beyond the engine: whether a server benchmark could run here.
info["server_packages"] = {m: importlib.util.find_spec(m) is not None for m in SERVER_PACKAGES}
print(json.dumps(info))
"""


def environment(budget: float, env: dict[str, str]) -> dict[str, Any]:
    """Versions and the device, probed in a subprocess: this process never initialises CUDA, so
    it holds no GPU memory while the stages run."""
    info: dict[str, Any] = {"budget_s": budget, "python": platform.python_version(), "torch": None, "cuda": False,
                            "device_name": "unknown", "triton": None, "transformers": None, "pytest": has_pytest()}
    try:
        proc = subprocess.run([sys.executable, "-c", _ENV_PROBE], cwd=ROOT, env=env, capture_output=True,
                              text=True, timeout=120)
        info.update(json.loads(proc.stdout.strip().splitlines()[-1]))
    except (subprocess.TimeoutExpired, ValueError, IndexError) as e:
        info["probe_error"] = str(e)[:200]
    return info


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0],
                                formatter_class=argparse.ArgumentDefaultsHelpFormatter)
    p.add_argument("--cpu-smoke", action="store_true", help="tiny sizes on the CPU: checks the orchestration")
    p.add_argument("--prepare-carry", action="store_true",
                   help="on the machine with the embedded model: write results/gpu_carry (its config and "
                        "tokenizer) for the device tool to carry, and exit")
    p.add_argument("--budget", type=float, default=None,
                   help="seconds for all stages (default 560 on a GPU, 120 with --cpu-smoke)")
    p.add_argument("--out", default="results/gpu_check.json")
    p.add_argument("--stages", nargs="*", default=None, help="only these stages (names as in the table)")
    p.add_argument("--no-pytest", action="store_true", help="use benchmarks/mini_pytest.py even if pytest exists")
    # Half of 2026-11-30's run (512 / 256: 133 s and 101 s, 83 s and 70 s of them transformers'
    # for 5.2x and 10.9x): the budget's seconds go to the open kernel goals' sweep instead.
    p.add_argument("--requests-small", type=int, default=256, help="offline requests for Qwen3-0.6B")
    p.add_argument("--requests-large", type=int, default=128, help="offline requests for Llama-3-8B")
    return p.parse_args(argv)


def prepare_carry() -> str:
    """Copy the embedded default model's config and tokenizer (not its weights) to CARRY_DIR, and
    the serve stack for the GPU box's Python to CARRY_SITE (needs the package index; without it,
    a warning, and the serve stage runs only where the box has the stack)."""
    import shutil

    from engine.default_model import default_model_path

    source = default_model_path()
    os.makedirs(CARRY_DIR, exist_ok=True)
    for name in CARRY_FILES:
        if os.path.exists(os.path.join(source, name)):
            shutil.copy(os.path.join(source, name), CARRY_DIR)
    carry_serve_stack(CARRY_SITE)
    return CARRY_DIR


def carry_serve_stack(site: str) -> None:
    """SERVE_STACK at this venv's versions, with dependencies, as wheels for the GPU box's
    Python, unpacked into `site` (replacing what was there)."""
    import shutil
    import tempfile

    with tempfile.TemporaryDirectory() as wheels:
        proc = subprocess.run([sys.executable, "-m", "pip", "download", "--quiet", "--dest", wheels,
                               *download_options(GPU_BOX_PYTHON), *pinned(SERVE_STACK)],
                              capture_output=True, text=True)
        if proc.returncode != 0:
            print(f"warning: no serve stack carried (pip download failed):\n{proc.stderr.strip()[-2000:]}",
                  file=sys.stderr)
            return
        shutil.rmtree(site, ignore_errors=True)
        unpack_wheels(sorted(os.path.join(wheels, w) for w in os.listdir(wheels)), site)


def carried_stack_fits(args: argparse.Namespace) -> bool:
    """The carried serve stack is for the GPU box: its wheels (pydantic-core is compiled) import
    only in that Python, which elsewhere would find them first and fail."""
    version = f"{sys.version_info.major}.{sys.version_info.minor}"
    return os.path.isdir(CARRY_SITE) and not args.cpu_smoke and version == GPU_BOX_PYTHON


def download_options(python: str) -> list[str]:
    """pip download's options for binary wheels a CPython `python` on x86-64 Linux can import."""
    platforms = ("manylinux2014_x86_64", "manylinux_2_17_x86_64", "manylinux_2_28_x86_64")
    return ["--only-binary=:all:", "--implementation", "cp", "--python-version", python,
            *(arg for p in platforms for arg in ("--platform", p))]


def pinned(distributions: tuple[str, ...]) -> list[str]:
    """Each distribution at the version installed here (what the tests ran), else unpinned."""
    from importlib import metadata

    specs = []
    for name in distributions:
        try:
            specs.append(f"{name}=={metadata.version(name)}")
        except metadata.PackageNotFoundError:
            specs.append(name)
    return specs


def unpack_wheels(wheels: list[str], site: str) -> None:
    """Wheels unpacked side by side into `site`, as pip would install their libraries (their
    `.data` scripts and headers left out): importable with `site` on PYTHONPATH."""
    import zipfile

    os.makedirs(site, exist_ok=True)
    for wheel in wheels:
        with zipfile.ZipFile(wheel) as z:
            z.extractall(site, [m for m in z.namelist() if not m.split("/", 1)[0].endswith(".data")])


def main(argv: list[str] | None = None) -> dict[str, Any]:
    args = parse_args(argv)
    if args.prepare_carry:
        path = prepare_carry()
        print(f"wrote {os.path.relpath(path, ROOT)}: pass carry=[\"results/gpu_carry\"] to the device tool's run")
        return {"carry": path}
    t0 = time.perf_counter()
    budget = args.budget or (120.0 if args.cpu_smoke else 560.0)
    out = os.path.abspath(args.out)
    work = os.path.splitext(out)[0]  # results/gpu_check/ beside results/gpu_check.json
    os.makedirs(work, exist_ok=True)
    env = dict(os.environ)
    env["PYTHONPATH"] = ROOT + (os.pathsep + env["PYTHONPATH"] if env.get("PYTHONPATH") else "")
    env.setdefault("TOKENIZERS_PARALLELISM", "false")
    if args.cpu_smoke:
        env["CUDA_VISIBLE_DEVICES"] = ""  # the smoke run is the CPU path even on a GPU box
    info = environment(budget, env)
    if not info["cuda"] and not args.cpu_smoke:
        print("no CUDA device: running the CPU smoke version (--cpu-smoke)", flush=True)
        args.cpu_smoke = True
        budget = args.budget or 120.0
        info["budget_s"] = budget
    results: list[StageResult] = []
    for stage in plan(args, work):
        remaining = budget - (time.perf_counter() - t0)
        results.append(run_stage(stage, remaining, work, env))
    report = {
        "env": {**info, "cpu_smoke": args.cpu_smoke, "seconds": time.perf_counter() - t0},
        "stages": [asdict(r) for r in results],
        "summary": summarise(results, work),
    }
    print(render(report), flush=True)
    write_json(report, out)
    print(f"wrote {os.path.relpath(out, ROOT)} (stage logs and JSON in {os.path.relpath(work, ROOT)}/)")
    return report


if __name__ == "__main__":
    main()
