"""Serving benchmark: a load generator against any OpenAI-compatible server.

Sends a workload to `/v1/completions` (streaming, greedy, fixed output lengths) with Poisson
arrivals (--request-rate) or a fixed number of clients (--concurrency), and reports request
and output-token throughput plus TTFT / TPOT / ITL / end-to-end latency at p50/p90/p99.
Writes JSON (per-request records + summary) and, with matplotlib installed (the `bench`
extra), a PNG.

`--endpoint embeddings` sends each prompt to `/v1/embeddings` instead (one input a request, the
SDK's base64 vectors): prompt tokens/s and end-to-end latency (TTFT is the whole answer's).

Workloads:
  mixed          prompts of --prompt-len tokens, outputs of --output-len tokens (uniform ranges)
  shared-prefix  --num-prefixes system-prompt-like prefixes of --prefix-len tokens shared by the
                 requests, each with its own --suffix-len-token question

Against a running server:
  python -m benchmarks.serve --base-url http://127.0.0.1:8000/v1 --backend stoke

Or let it start the servers itself, one after the other, same workload, one table:
  python -m benchmarks.serve --launch stoke,transformers --threads 1

The load generator reports its own CPU: one Python process parses ~10k SSE chunks a second on
a core, fewer than a GPU server streams, and near a full core its own lag is in every latency.
`--client-processes N` shares the workload among N processes (each takes every N-th request
and its share of the concurrency or arrival rate).

Priorities: `--urgent-fraction F` marks that share of the requests urgent, reported as a class
of their own (TTFT and end-to-end percentiles of each class); servers that schedule by priority
get them with `priority: -1` (launched `stoke-priority`: stoke with `--scheduling-policy
priority`; with --base-url, `--send-priority`). `--launch stoke,stoke-priority` shows what it
buys the urgent requests on one workload, and what it costs the rest:
  python -m benchmarks.serve --launch stoke,stoke-priority --urgent-fraction 0.1 \
      --stoke-arg=--max-num-seqs --stoke-arg=8 --request-rate 2

`--backend` picks how "generate exactly N tokens" is asked for: stoke/vllm take `ignore_eos`;
`transformers serve` takes a `generation_config` without an EOS token; plain OpenAI gets
max_tokens only (outputs may end early; the report counts real tokens either way).
"""

from __future__ import annotations

import argparse
import asyncio
import json
import math
import os
import random
import re
import signal
import socket
import subprocess
import sys
import time
from dataclasses import asdict, dataclass, field
from typing import Any

try:  # the openai SDK's HTTP client (httpx2 in openai >= 3, httpx before)
    import httpx2 as httpx
except ImportError:  # pragma: no cover
    import httpx  # type: ignore[no-redef]

PERCENTILES = (50, 90, 99)
CLIENT_BOUND = 0.9  # the load generator's CPU busy fraction from which its own lag shows


# ------------------------------------------------------------------------------ workload
URGENT_PRIORITY = -1  # what an urgent request asks for, where the server schedules by priority
CLASSES = ("urgent", "others")  # with --urgent-fraction: latencies reported per class


@dataclass(slots=True)
class Item:
    prompt: str
    prompt_len: int
    output_len: int
    urgent: bool = False


def _tokenizer(path: str | None) -> Any:
    from transformers import AutoTokenizer

    if path is None:
        from engine.default_model import default_model_path

        path = default_model_path()
    return AutoTokenizer.from_pretrained(path)


def _random_text(tokenizer: Any, rng: random.Random, n: int) -> str:
    """Text of about n tokens from random ordinary tokens (re-tokenized and trimmed to n)."""
    special = set(tokenizer.all_special_ids)
    ids = [t for t in (rng.randrange(1000, tokenizer.vocab_size) for _ in range(n + 8)) if t not in special]
    text = tokenizer.decode(ids[:n])
    ids = tokenizer.encode(text)[:n]
    return tokenizer.decode(ids)


def build_workload(args: argparse.Namespace) -> list[Item]:
    rng = random.Random(args.seed)
    tok = _tokenizer(args.tokenizer)
    items = []
    if args.workload == "mixed":
        lo, hi = args.prompt_len
        olo, ohi = args.output_len
        for _ in range(args.num_requests):
            n = rng.randint(lo, hi)
            items.append(Item(_random_text(tok, rng, n), n, rng.randint(olo, ohi)))
    else:
        prefixes = [_random_text(tok, rng, args.prefix_len) for _ in range(args.num_prefixes)]
        olo, ohi = args.output_len
        for i in range(args.num_requests):
            prefix = prefixes[i % len(prefixes)]
            prompt = prefix + " Question: " + _random_text(tok, rng, args.suffix_len)
            items.append(Item(prompt, len(tok.encode(prompt)), rng.randint(olo, ohi)))
    marks = random.Random(args.seed + 2)  # its own stream: the prompts are the same with or without
    for item in items:
        item.urgent = marks.random() < args.urgent_fraction
    return items


# ------------------------------------------------------------------------------ client
@dataclass(slots=True)
class Record:
    ok: bool
    prompt_len: int
    output_len_requested: int
    output_tokens: int = 0
    chunks: int = 0  # SSE chunks with text: more tokens than chunks when the server merged some
    start: float = 0.0
    ttft: float | None = None
    e2e: float | None = None
    itl: list[float] = field(default_factory=list)
    error: str | None = None
    urgent: bool = False

    @property
    def tpot(self) -> float | None:
        if self.ttft is None or self.e2e is None or self.output_tokens < 2:
            return None
        return (self.e2e - self.ttft) / (self.output_tokens - 1)


def request_body(args: argparse.Namespace, model: str, item: Item) -> dict[str, Any]:
    if args.endpoint == "embeddings":
        body: dict[str, Any] = {"model": model, "input": item.prompt, "encoding_format": "base64"}
        if item.urgent and args.send_priority:
            body["priority"] = URGENT_PRIORITY
        return body
    body = {"model": model, "prompt": item.prompt, "max_tokens": item.output_len,
            "temperature": 0.0, "stream": True, "stream_options": {"include_usage": True}}
    if args.logprobs is not None:
        body["logprobs"] = args.logprobs
    if item.urgent and args.send_priority:
        body["priority"] = URGENT_PRIORITY
    if args.backend in ("stoke", "vllm"):
        body["ignore_eos"] = True
    elif args.backend == "transformers":
        body["generation_config"] = json.dumps({"max_new_tokens": item.output_len, "do_sample": False})
    return body


async def send_embedding(client: httpx.AsyncClient, url: str, body: dict[str, Any], item: Item) -> Record:
    """One embeddings request: its answer arrives whole (its TTFT is its end-to-end time)."""
    record = Record(ok=False, prompt_len=item.prompt_len, output_len_requested=0, urgent=item.urgent)
    start = record.start = time.perf_counter()
    try:
        response = await client.post(url, json=body)
        if response.status_code != 200:
            record.error = f"HTTP {response.status_code}: {response.content[:200]!r}"
            return record
        data = response.json().get("data") or []
        record.ttft = record.e2e = time.perf_counter() - start
        record.ok = len(data) == 1 and bool(data[0].get("embedding"))
        if not record.ok:
            record.error = "no embedding"
    except Exception as exc:  # noqa: BLE001 - a benchmark reports, it does not crash
        record.error = f"{type(exc).__name__}: {exc}"[:200]
    return record


async def send(client: httpx.AsyncClient, url: str, body: dict[str, Any], item: Item) -> Record:
    if "input" in body:
        return await send_embedding(client, url, body, item)
    record = Record(ok=False, prompt_len=item.prompt_len, output_len_requested=item.output_len, urgent=item.urgent)
    start = record.start = time.perf_counter()
    last = None
    chunks = 0
    usage_tokens = None
    try:
        async with client.stream("POST", url, json=body) as response:
            if response.status_code != 200:
                record.error = f"HTTP {response.status_code}: {(await response.aread())[:200]!r}"
                return record
            # Events are timed per network read: tokens that arrive together count once in ITL,
            # whether the server merged them into one event (stoke, behind its engine) or sent
            # one event each in the same write (transformers serve).
            pending, done = b"", False
            async for data in response.aiter_raw():
                now = time.perf_counter()
                *lines, pending = (pending + data).split(b"\n")
                text_events = 0
                for line in lines:
                    line = line.strip()
                    if not line.startswith(b"data:"):
                        continue
                    event = line[5:].strip()
                    if event == b"[DONE]":
                        done = True
                        break
                    payload = json.loads(event)
                    if "error" in payload:
                        record.error = str(payload["error"])[:200]
                        return record
                    if payload.get("usage"):
                        usage_tokens = payload["usage"].get("completion_tokens")
                    text_events += sum(1 for choice in payload.get("choices") or [] if choice.get("text"))
                if text_events:
                    if last is None:
                        record.ttft = now - start
                    else:
                        record.itl.append(now - last)
                    last = now
                    chunks += text_events
                if done:
                    break
        record.e2e = time.perf_counter() - start
        record.chunks = chunks
        record.output_tokens = usage_tokens if usage_tokens is not None else chunks
        record.ok = record.ttft is not None
        if not record.ok:
            record.error = "no tokens"
    except Exception as exc:  # noqa: BLE001 - a benchmark reports, it does not crash
        record.error = f"{type(exc).__name__}: {exc}"[:200]
    return record


_GPU_UTILIZATION = re.compile(r"^stoke_gpu_utilization_ratio\{[^}]*\} (\S+)$", re.MULTILINE)


def gpu_utilization(metrics_text: str) -> float | None:
    """The mean over GPUs of stoke_gpu_utilization_ratio in one /metrics scrape; None when the
    server has no NVML (the CPU, or no driver)."""
    values = [float(v) for v in _GPU_UTILIZATION.findall(metrics_text)]
    return sum(values) / len(values) if values else None


async def sample_gpu_utilization(client: httpx.AsyncClient, metrics_url: str, samples: list[float],
                                 period_s: float = 0.5) -> None:
    """Scrape a stoke server's /metrics every period_s until cancelled (NVML's own sample
    period is 1/6 to 1 s): what Grafana would show during the run."""
    while True:
        try:
            value = gpu_utilization((await client.get(metrics_url, timeout=5)).text)
            if value is not None:
                samples.append(value)
        except httpx.HTTPError:
            pass
        await asyncio.sleep(period_s)


@dataclass(slots=True)
class Load:
    records: list[Record]
    start: float  # perf_counter (CLOCK_MONOTONIC: one clock for every process) when the load began
    duration: float  # seconds, first request sent to last one done
    gpu_samples: list[float]  # stoke's GPU utilisation through the run
    client_cpu_s: float  # the load generators' CPU seconds meanwhile
    client_busy: float  # the busiest load generator's CPU seconds per second: near 1, it bounded the run


def generate_load(args: argparse.Namespace, base_url: str, model: str, items: list[Item]) -> Load:
    """The workload from `args.client_processes` load generators: every process takes every
    n-th request, its share of the concurrency or the arrival rate (Poisson arrivals split
    so stay Poisson), and its own warm-up; the first also samples the GPU."""
    n = min(args.client_processes, len(items), args.concurrency or len(items))
    if n <= 1:
        return asyncio.run(run_load(args, base_url, model, items))
    shares = []
    for i in range(n):
        share = argparse.Namespace(**vars(args))
        if args.concurrency:
            share.concurrency = args.concurrency // n + (i < args.concurrency % n)
        share.request_rate, share.seed = args.request_rate / n, args.seed + i
        shares.append((share, base_url, model, items[i::n], i == 0))
    import multiprocessing

    context = multiprocessing.get_context("spawn")
    # Each process starts its timed load once all have warmed up (imports take a second).
    with context.Pool(n, initializer=_start_together, initargs=(context.Barrier(n),)) as pool:
        loads = pool.starmap(_load_in_process, shares)
    start = min(load.start for load in loads)
    return Load(records=[r for load in loads for r in load.records], start=start,
                duration=max(load.start + load.duration for load in loads) - start,
                gpu_samples=[x for load in loads for x in load.gpu_samples],
                client_cpu_s=sum(load.client_cpu_s for load in loads),
                client_busy=max(load.client_busy for load in loads))


_BARRIER: Any = None  # in a load-generator process: where the processes wait for each other


def _start_together(barrier: Any) -> None:
    global _BARRIER
    _BARRIER = barrier


def _load_in_process(args: argparse.Namespace, base_url: str, model: str, items: list[Item],
                     sample_gpu: bool) -> Load:
    return asyncio.run(run_load(args, base_url, model, items, sample_gpu))


async def run_load(args: argparse.Namespace, base_url: str, model: str, items: list[Item],
                   sample_gpu: bool = True) -> Load:
    url = base_url.rstrip("/") + ("/embeddings" if args.endpoint == "embeddings" else "/completions")
    limits = httpx.Limits(max_connections=None, max_keepalive_connections=None)
    async with httpx.AsyncClient(timeout=httpx.Timeout(args.timeout), limits=limits) as client:
        # Warm-up, not measured: the first requests of a fresh server pay one-off costs. Its
        # prompt is none of the workload's (the first one's words reversed), so no timed request
        # finds it in the prefix cache.
        warm = Item(" ".join(reversed(items[0].prompt.split())), items[0].prompt_len, 4)
        await asyncio.gather(*(send(client, url, request_body(args, model, warm), warm) for _ in range(2)))
        if _BARRIER is not None:
            _BARRIER.wait(timeout=300)  # blocks the loop: nothing else runs in it yet
        rng = random.Random(args.seed + 1)
        samples: list[float] = []
        sampler = None
        if args.backend == "stoke" and sample_gpu:
            metrics_url = base_url.rstrip("/").removesuffix("/v1") + "/metrics"
            sampler = asyncio.create_task(sample_gpu_utilization(client, metrics_url, samples))
        start, cpu_start = time.perf_counter(), time.process_time()
        if args.concurrency:
            queue: asyncio.Queue[Item] = asyncio.Queue()
            for item in items:
                queue.put_nowait(item)
            records: list[Record] = []

            async def worker() -> None:
                while not queue.empty():
                    item = queue.get_nowait()
                    records.append(await send(client, url, request_body(args, model, item), item))

            await asyncio.gather(*(worker() for _ in range(args.concurrency)))
        else:
            tasks = []
            for i, item in enumerate(items):
                if i and args.request_rate != math.inf:  # no gap after the last: it would count in duration
                    await asyncio.sleep(rng.expovariate(args.request_rate))
                tasks.append(asyncio.create_task(send(client, url, request_body(args, model, item), item)))
            records = list(await asyncio.gather(*tasks))
        duration, client_cpu_s = time.perf_counter() - start, time.process_time() - cpu_start
        if sampler is not None:
            sampler.cancel()
    return Load(records, start, duration, samples, client_cpu_s, client_cpu_s / duration)


# ------------------------------------------------------------------------------ report
def _pct(values: list[float], p: float) -> float | None:
    if not values:
        return None
    values = sorted(values)
    k = (len(values) - 1) * p / 100
    lo, hi = math.floor(k), math.ceil(k)
    return values[lo] + (values[hi] - values[lo]) * (k - lo)


def summarize(records: list[Record], duration: float, gpu_samples: list[float] | None = None,
              client: tuple[float, float] | None = None) -> dict[str, Any]:
    """`client`: the load generators' CPU seconds and the busiest one's busy fraction."""
    ok = [r for r in records if r.ok]
    out_tokens = sum(r.output_tokens for r in ok)
    summary: dict[str, Any] = {
        "requests": len(records), "completed": len(ok), "failed": len(records) - len(ok),
        "duration_s": duration, "request_throughput": len(ok) / duration,
        "output_token_throughput": out_tokens / duration,
        "prompt_token_throughput": sum(r.prompt_len for r in ok) / duration,
        "total_token_throughput": (out_tokens + sum(r.prompt_len for r in ok)) / duration,
        "output_tokens": out_tokens,
        # A server streaming behind its engine merges tokens into fewer chunks (ITL is per
        # arrival: a network read that brought tokens).
        "tokens_per_chunk": out_tokens / max(1, sum(r.chunks for r in ok)),
    }
    series = {"ttft": [r.ttft for r in ok if r.ttft is not None], "tpot": [r.tpot for r in ok if r.tpot is not None],
              "itl": [x for r in ok for x in r.itl], "e2e": [r.e2e for r in ok if r.e2e is not None]}
    for name, values in series.items():
        summary[f"mean_{name}_ms"] = 1000 * sum(values) / len(values) if values else None
        for p in PERCENTILES:
            v = _pct(values, p)
            summary[f"p{p}_{name}_ms"] = None if v is None else 1000 * v
    if any(r.urgent for r in records):  # --urgent-fraction: each class's waits of its own
        for cls in CLASSES:
            members = [r for r in ok if r.urgent == (cls == "urgent")]
            summary[f"{cls}_completed"] = len(members)
            for name in ("ttft", "e2e"):
                for p in PERCENTILES:
                    v = _pct([getattr(r, name) for r in members if getattr(r, name) is not None], p)
                    summary[f"{cls}_p{p}_{name}_ms"] = None if v is None else 1000 * v
    # The server's GPU busy fraction (NVML) sampled through the run: None without samples.
    summary["gpu_utilization_mean"] = sum(gpu_samples) / len(gpu_samples) if gpu_samples else None
    summary["gpu_utilization_samples"] = len(gpu_samples or [])
    # A load generator is one Python process: near one core busy, its own lag is in every
    # latency above and it, not the server, may have set the throughput.
    client_cpu_s, summary["client_cpu_busy"] = client or (None, None)
    summary["client_bound"] = summary["client_cpu_busy"] is not None and summary["client_cpu_busy"] >= CLIENT_BOUND
    summary["client_cpu_us_per_token"] = 1e6 * client_cpu_s / out_tokens if client_cpu_s and out_tokens else None
    errors = sorted({r.error for r in records if r.error})
    if errors:
        summary["errors"] = errors[:5]
    return summary


def add_server_cpu(summary: dict[str, Any], cpu: dict[str, float]) -> None:
    """The launched server's CPU seconds during the load, and per output token: for stoke the
    HTTP process (`main`: parsing, SSE, sockets) and the engine worker (`children`), which
    says whether streaming, not the engine, bounds the throughput."""
    tokens = summary["output_tokens"]
    summary["server_cpu_s"] = cpu
    summary["server_cpu_us_per_token"] = {k: 1e6 * v / tokens for k, v in cpu.items()} if tokens else None


def print_table(results: dict[str, dict[str, Any]]) -> None:
    names = list(results)
    rows = [("completed / failed", lambda s: f"{s['completed']} / {s['failed']}"),
            ("duration (s)", lambda s: f"{s['duration_s']:.1f}"),
            ("requests/s", lambda s: f"{s['request_throughput']:.2f}"),
            ("prompt tokens/s", lambda s: f"{s['prompt_token_throughput']:.1f}"),
            ("output tokens/s", lambda s: f"{s['output_token_throughput']:.1f}"),
            ("output tokens per chunk", lambda s: f"{s['tokens_per_chunk']:.2f}"),
            ("GPU utilisation (NVML)", lambda s: "-" if s.get("gpu_utilization_mean") is None
             else f"{100 * s['gpu_utilization_mean']:.0f}%"),
            ("server CPU us/token (main)", lambda s: _per_token(s, "main")),
            ("server CPU us/token (children)", lambda s: _per_token(s, "children")),
            ("load generator CPU busy", lambda s: "-" if s.get("client_cpu_busy") is None
             else f"{100 * s['client_cpu_busy']:.0f}%")]
    for metric in ("ttft", "tpot", "itl", "e2e"):
        for p in PERCENTILES:
            key = f"p{p}_{metric}_ms"
            rows.append((f"{metric.upper()} p{p} (ms)", lambda s, key=key: "-" if s[key] is None else f"{s[key]:.0f}"))
    if any("urgent_completed" in s for s in results.values()):
        for cls in CLASSES:
            rows.append((f"{cls} completed", lambda s, cls=cls: str(s.get(f"{cls}_completed", "-"))))
            for metric in ("ttft", "e2e"):
                for p in PERCENTILES:
                    key = f"{cls}_p{p}_{metric}_ms"
                    rows.append((f"{cls} {metric.upper()} p{p} (ms)",
                                 lambda s, key=key: "-" if s.get(key) is None else f"{s[key]:.0f}"))
    width = max(len(r[0]) for r in rows)
    cols = [max(14, len(n)) for n in names]
    print("| " + "metric".ljust(width) + " | " + " | ".join(n.rjust(c) for n, c in zip(names, cols)) + " |")
    print("|" + "-" * (width + 2) + "|" + "|".join("-" * (c + 2) for c in cols) + "|")
    for label, fmt in rows:
        print("| " + label.ljust(width) + " | " + " | ".join(fmt(results[n]).rjust(c) for n, c in zip(names, cols))
              + " |")
    if len(names) == 2:
        a, b = (results[n] for n in names)
        if b["output_token_throughput"] and a["p99_ttft_ms"] is not None and b["p99_ttft_ms"] is not None:
            speedup = a["output_token_throughput"] / b["output_token_throughput"]
            print(f"\n{names[0]} / {names[1]}: output tokens/s x{speedup:.2f}, "
                  f"p99 TTFT x{a['p99_ttft_ms'] / b['p99_ttft_ms']:.2f}")


def _per_token(summary: dict[str, Any], part: str) -> str:
    per_token = summary.get("server_cpu_us_per_token")
    return "-" if not per_token else f"{per_token[part]:.0f}"


def plot(path: str, runs: dict[str, dict[str, Any]]) -> bool:
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        print("matplotlib is not installed (pip install -e '.[bench]'): no plot", file=sys.stderr)
        return False
    fig, axes = plt.subplots(1, 4, figsize=(18, 4))
    for name, run in runs.items():
        ok = [r for r in run["records"] if r["ok"]]
        for ax, key, title in ((axes[0], "ttft", "TTFT"), (axes[1], "e2e", "end-to-end latency")):
            values = sorted(1000 * r[key] for r in ok if r[key] is not None)
            ax.plot(values, [(i + 1) / len(values) for i in range(len(values))], label=name)
            ax.set_title(f"{title} CDF")
            ax.set_xlabel("ms")
        itl = sorted(1000 * x for r in ok for x in r["itl"])
        if itl:
            axes[2].plot(itl, [(i + 1) / len(itl) for i in range(len(itl))], label=name)
        axes[2].set_title("inter-token latency CDF")
        axes[2].set_xlabel("ms (log)")
        axes[2].set_xscale("log")
    names = list(runs)
    axes[3].bar(names, [runs[n]["summary"]["output_token_throughput"] for n in names])
    axes[3].set_title("output tokens/s")
    for ax in axes[:3]:
        ax.grid(alpha=0.3)
        ax.legend()
    fig.tight_layout()
    os.makedirs(os.path.dirname(os.path.abspath(path)), exist_ok=True)
    fig.savefig(path, dpi=100)
    return True


# ------------------------------------------------------------------------------ servers
def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _stat(pid: int) -> list[str]:
    """/proc/PID/stat's fields after the command name (state, ppid, ...)."""
    with open(f"/proc/{pid}/stat") as f:
        return f.read().rpartition(")")[2].split()


def _cpu_seconds(pid: int) -> float:
    fields = _stat(pid)
    return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")  # utime + stime


def _children(pid: int) -> list[int]:
    found = []
    for entry in os.listdir("/proc"):
        if entry.isdigit():
            try:
                if int(_stat(int(entry))[1]) == pid:
                    found.append(int(entry))
            except OSError:
                continue  # gone meanwhile
    return found


class Launched:
    """A server this script started (stoke or transformers serve) and stops again."""

    def __init__(self, kind: str, args: argparse.Namespace) -> None:
        self.kind = kind
        self.port = _free_port()
        env = dict(os.environ)
        if args.threads:
            env["OMP_NUM_THREADS"] = str(args.threads)
        model_dir = args.model_dir
        if model_dir is None:
            from engine.default_model import default_model_path

            model_dir = default_model_path()
        if kind in ("stoke", "stoke-priority"):
            policy = ["--scheduling-policy", "priority"] if kind == "stoke-priority" else []
            cmd = [sys.executable, "-m", "server", model_dir, "--host", "127.0.0.1", "--port", str(self.port),
                   *(["--cpu-threads", str(args.threads)] if args.threads else []), *policy, *args.stoke_arg]
            self.model = os.path.basename(os.path.normpath(model_dir))
            self.ready_path = "/ready"
        elif kind == "transformers":
            exe = os.path.join(os.path.dirname(sys.executable), "transformers")
            cmd = [exe, "serve", model_dir, "--continuous-batching", "--device", "cpu", "--host", "127.0.0.1",
                   "--port", str(self.port), "--log-level", "warning", *args.transformers_arg]
            env["HF_HUB_OFFLINE"] = "1"
            if args.transformers_pythonpath:  # e.g. a --target dir holding accelerate + psutil
                env["PYTHONPATH"] = os.pathsep.join(p for p in (args.transformers_pythonpath,
                                                                env.get("PYTHONPATH")) if p)
            self.model = model_dir
            self.ready_path = "/health"
        else:
            raise ValueError(f"unknown server kind {kind!r}")
        self.log = open(os.path.join(args.out_dir, f"server-{kind}.log"), "wb")
        repo = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
        self.proc = subprocess.Popen(cmd, stdout=self.log, stderr=subprocess.STDOUT, env=env, cwd=repo)
        self.base_url = f"http://127.0.0.1:{self.port}/v1"

    def wait_ready(self, timeout: float) -> None:
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            if self.proc.poll() is not None:
                raise RuntimeError(f"{self.kind} server exited with {self.proc.returncode}; see {self.log.name}")
            try:
                if httpx.get(f"http://127.0.0.1:{self.port}{self.ready_path}", timeout=2).status_code == 200:
                    return
            except httpx.HTTPError:
                pass
            time.sleep(0.5)
        raise RuntimeError(f"{self.kind} server not ready after {timeout}s; see {self.log.name}")

    def cpu_seconds(self) -> dict[str, float] | None:
        """CPU time so far of the server's main process (stoke: the HTTP process) and of its
        children (stoke: the engine worker); None where /proc is not there."""
        try:
            main = _cpu_seconds(self.proc.pid)
            children = sum(_cpu_seconds(pid) for pid in _children(self.proc.pid))
        except OSError:
            return None
        return {"main": main, "children": children}

    def stop(self) -> None:
        if self.proc.poll() is None:
            self.proc.send_signal(signal.SIGTERM)
            try:
                self.proc.wait(60)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait()
        self.log.close()


# ------------------------------------------------------------------------------ main
def _range(text: str) -> tuple[int, int]:
    lo, _, hi = text.partition(":")
    return int(lo), int(hi or lo)


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    p = argparse.ArgumentParser(prog="python -m benchmarks.serve", description=__doc__.split("\n\n")[0])
    target = p.add_argument_group("target")
    target.add_argument("--base-url", default=None, help="e.g. http://127.0.0.1:8000/v1 (or use --launch)")
    target.add_argument("--model", default=None, help="model id to send (default: the server's first model)")
    target.add_argument("--backend", default="stoke", choices=["stoke", "vllm", "transformers", "openai"])
    target.add_argument("--label", default=None, help="name of this run in the table")
    target.add_argument("--launch", default=None,
                        help="start these servers in turn: stoke, stoke-priority (--scheduling-policy priority), "
                             "transformers")
    target.add_argument("--model-dir", default=None, help="checkpoint for --launch (default: embedded default)")
    target.add_argument("--threads", type=int, default=None, help="--launch: torch/OMP threads for every server")
    target.add_argument("--stoke-arg", action="append", default=[], help="extra `stoke serve` option (repeat)")
    target.add_argument("--transformers-arg", action="append", default=[])
    target.add_argument("--transformers-pythonpath", default=None,
                        help="extra PYTHONPATH for transformers serve (it needs accelerate)")
    w = p.add_argument_group("workload")
    w.add_argument("--workload", default="mixed", choices=["mixed", "shared-prefix"])
    w.add_argument("--endpoint", default="completions", choices=["completions", "embeddings"],
                   help="embeddings: each prompt to /v1/embeddings (stoke, vllm, openai)")
    w.add_argument("--num-requests", type=int, default=64)
    w.add_argument("--prompt-len", type=_range, default=(32, 512), help="mixed: LO:HI prompt tokens")
    w.add_argument("--output-len", type=_range, default=(16, 256), help="LO:HI output tokens")
    w.add_argument("--prefix-len", type=int, default=512)
    w.add_argument("--num-prefixes", type=int, default=4)
    w.add_argument("--suffix-len", type=int, default=32)
    w.add_argument("--request-rate", type=float, default=math.inf,
                   help="Poisson arrivals per second (inf: all at once)")
    w.add_argument("--concurrency", type=int, default=None, help="fixed number of clients instead of arrivals")
    w.add_argument("--seed", type=int, default=0)
    w.add_argument("--logprobs", type=int, default=None, help="top logprobs per output token (default: none)")
    w.add_argument("--urgent-fraction", type=float, default=0.0,
                   help="this share of the requests is urgent: latencies per class, and priority -1 where the "
                        "server schedules by priority (default: %(default)s)")
    w.add_argument("--send-priority", action="store_true",
                   help="--base-url: send urgent requests priority -1 (a server started with --scheduling-policy "
                        "priority; launched stoke-priority gets it anyway)")
    w.add_argument("--client-processes", type=int, default=1,
                   help="load generators (processes) sharing the workload: one Python client parses "
                        "SSE chunks at ~10k/s a core, less than a GPU server streams")
    w.add_argument("--tokenizer", default=None, help="tokenizer dir for building prompts (default: embedded model)")
    w.add_argument("--timeout", type=float, default=1800.0)
    o = p.add_argument_group("output")
    o.add_argument("--out-dir", default="results")
    o.add_argument("--name", default="serve", help="writes OUT_DIR/NAME.json and NAME.png")
    args = p.parse_args(argv)
    if not 0.0 <= args.urgent_fraction <= 1.0:
        p.error(f"--urgent-fraction must be in [0, 1], got {args.urgent_fraction}")
    if args.endpoint == "embeddings" and "transformers" in (args.launch or args.backend).split(","):
        p.error("transformers serve has no /v1/embeddings")
    return args


def _discover_model(base_url: str) -> str:
    response = httpx.get(base_url.rstrip("/") + "/models", timeout=30)
    response.raise_for_status()
    return response.json()["data"][0]["id"]


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    if not args.base_url and not args.launch:
        print("give --base-url or --launch", file=sys.stderr)
        return 2
    os.makedirs(args.out_dir, exist_ok=True)
    items = build_workload(args)
    mode = f"concurrency {args.concurrency}" if args.concurrency else f"request rate {args.request_rate}/s"
    print(f"workload {args.workload}: {len(items)} requests, prompt tokens {sum(i.prompt_len for i in items)}, "
          f"output tokens {sum(i.output_len for i in items)}, {mode}", flush=True)
    runs: dict[str, dict[str, Any]] = {}
    targets = args.launch.split(",") if args.launch else [args.label or args.backend]
    for target in targets:
        server = None
        run_args = argparse.Namespace(**vars(args))
        if args.launch:
            server = Launched(target, args)
            run_args.backend = "stoke" if target == "stoke-priority" else target
            run_args.send_priority = args.send_priority or target == "stoke-priority"
            print(f"starting {target} ...", flush=True)
            try:
                server.wait_ready(600)
            except RuntimeError:
                server.stop()
                raise
            base_url, model = server.base_url, server.model
        else:
            base_url, model = args.base_url, args.model or _discover_model(args.base_url)
        cpu_before = server.cpu_seconds() if server is not None else None
        try:
            load = generate_load(run_args, base_url, model, items)
            cpu_after = server.cpu_seconds() if server is not None else None
        finally:
            if server is not None:
                server.stop()
        records, duration = load.records, load.duration
        summary = summarize(records, duration, load.gpu_samples, (load.client_cpu_s, load.client_busy))
        if cpu_before and cpu_after:
            add_server_cpu(summary, {k: cpu_after[k] - cpu_before[k] for k in cpu_after})
        runs[target] = {"backend": run_args.backend, "base_url": base_url, "model": model, "summary": summary,
                        "records": [{**asdict(r), "tpot": r.tpot} for r in records]}
        print(f"{target}: {summary['completed']}/{summary['requests']} ok in {duration:.1f}s, "
              f"{summary['output_token_throughput']:.1f} output tok/s, {summary['prompt_token_throughput']:.1f} "
              "prompt tok/s", flush=True)
    print()
    print_table({name: run["summary"] for name, run in runs.items()})
    for name, run in runs.items():
        busy = run["summary"]["client_cpu_busy"]
        if run["summary"]["client_bound"]:
            print(f"\n{name}: a load generator kept {100 * busy:.0f}% of a core busy: its own lag is in these "
                  f"latencies, and it may have bounded the throughput (--client-processes shares the load)")
    config = {k: v for k, v in vars(args).items() if k not in ("stoke_arg", "transformers_arg")}
    config["request_rate"] = str(config["request_rate"])
    json_path = os.path.join(args.out_dir, f"{args.name}.json")
    with open(json_path, "w") as f:
        json.dump({"config": config, "runs": runs}, f, indent=1)
    png_path = os.path.join(args.out_dir, f"{args.name}.png")
    print(f"\nwrote {json_path}" + (f" and {png_path}" if plot(png_path, runs) else ""))
    return 0


if __name__ == "__main__":
    sys.exit(main())
