"""Prometheus metrics (`GET /metrics`). The names are a spec: dashboards rely on them.

Everything lives in one CollectorRegistry per app (not the process-global one), fed from two
places: the worker's frames (gauges, cumulative engine counters, per-step batch sizes, token
counts, and the engine's per-request monotonic timestamps when a request finishes) and the
HTTP layer (errors). GPU gauges are read from NVML at scrape time; without NVML they are absent
and stoke_gpu_info{available="false"} says so. docs/metrics.md explains each with PromQL.
"""

from __future__ import annotations

import logging
from collections.abc import Iterable
from typing import Any

from prometheus_client import CollectorRegistry, Counter, Gauge, Histogram, disable_created_metrics
from prometheus_client.core import GaugeMetricFamily, Metric
from prometheus_client.exposition import CONTENT_TYPE_LATEST, generate_latest

from server.errors import ERROR_METRIC_TYPES

disable_created_metrics()  # no *_created series: they double the output and no dashboard reads them

logger = logging.getLogger("stoke.server")

# Seconds: 1 ms .. 10 min, roughly 1-2.5-5 per decade.
LATENCY_BUCKETS = (0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.075, 0.1, 0.15, 0.2, 0.3, 0.4, 0.5, 0.75,
                   1.0, 2.5, 5.0, 7.5, 10.0, 20.0, 30.0, 60.0, 120.0, 300.0, 600.0)
# Tokens: powers of two up to 128k.
TOKEN_BUCKETS = tuple(float(2 ** i) for i in range(18))
FINISH_REASONS = ("stop", "length", "abort")


def scored_prompt_finish(reason: str | None) -> str | None:
    """A scored prompt's (echo, max_tokens 0) finish reason as its client sees it: max_tokens 0
    reached ("length"), however the engine's one dropped token ended; an abort stays one."""
    return "length" if reason not in (None, "abort") else reason


class GPUCollector:
    """stoke_gpu_utilization_ratio{gpu} and stoke_gpu_memory_used_bytes{gpu} from NVML."""

    def __init__(self) -> None:
        self._nvml: Any = None
        try:
            import pynvml

            pynvml.nvmlInit()
            self._nvml = pynvml
        except Exception as exc:  # no library, no driver, no GPU: all the same here
            logger.info("NVML unavailable (%s): GPU metrics are absent", type(exc).__name__)

    def collect(self) -> Iterable[Metric]:
        info = GaugeMetricFamily("stoke_gpu_info", "Whether GPU metrics (NVML) are available", labels=["available"])
        if self._nvml is None:
            info.add_metric(["false"], 1.0)
            yield info
            return
        nv = self._nvml
        util = GaugeMetricFamily("stoke_gpu_utilization_ratio", "GPU busy fraction over NVML's last sample period",
                                 labels=["gpu"])
        mem = GaugeMetricFamily("stoke_gpu_memory_used_bytes", "GPU memory in use (all processes)", labels=["gpu"])
        try:
            for i in range(nv.nvmlDeviceGetCount()):
                handle = nv.nvmlDeviceGetHandleByIndex(i)
                util.add_metric([str(i)], nv.nvmlDeviceGetUtilizationRates(handle).gpu / 100.0)
                mem.add_metric([str(i)], float(nv.nvmlDeviceGetMemoryInfo(handle).used))
        except Exception as exc:
            logger.warning("NVML query failed: %s", exc)
            info.add_metric(["false"], 1.0)
            yield info
            return
        info.add_metric(["true"], 1.0)
        yield info
        yield util
        yield mem


class Metrics:
    def __init__(self, gpu: bool = True, lora_adapters: Iterable[str] = ()) -> None:
        """lora_adapters: the names of the LoRA adapters served (a series each)."""
        r = self.registry = CollectorRegistry()
        self.requests_waiting = Gauge("stoke_requests_waiting", "Requests queued in the scheduler", registry=r)
        self.requests_running = Gauge("stoke_requests_running", "Requests admitted to the running batch", registry=r)
        self.kv_cache_usage = Gauge("stoke_kv_cache_usage_ratio", "Fraction of KV cache blocks in use", registry=r)
        self.cache_config = Gauge("stoke_cache_config_info", "The KV pool the engine runs (1): its blocks' tokens, "
                                  "dtype and count, and the prefix cache's host-memory blocks (vLLM's cache_config_info)",
                                  ["block_size", "cache_dtype", "num_blocks", "num_host_blocks"], registry=r)
        self.prefix_queries = Counter("stoke_prefix_cache_queries_tokens",
                                      "Prompt tokens looked up in the prefix cache", registry=r)
        self.prefix_hits = Counter("stoke_prefix_cache_hits_tokens", "Prompt tokens found in the prefix cache",
                                   registry=r)
        self.kv_offload_usage = Gauge("stoke_kv_offload_usage_ratio",
                                      "Fraction of the prefix cache's host-memory blocks in use (--kv-offloading-size)",
                                      registry=r)
        self.kv_offload_saved = Counter("stoke_kv_offload_saved_blocks",
                                        "KV blocks the pool evicted that were saved to host memory", registry=r)
        self.kv_offload_loaded = Counter("stoke_kv_offload_loaded_blocks",
                                         "KV blocks loaded back from host memory (prefix-cache hits, a preempted request's own), not computed again",
                                         registry=r)
        self.prompt_tokens = Counter("stoke_prompt_tokens", "Prompt tokens of requests whose prefill completed",
                                     registry=r)
        self.generation_tokens = Counter("stoke_generation_tokens", "Generated tokens", registry=r)
        self.reasoning_tokens = Counter("stoke_reasoning_tokens",
                                        "Generated tokens a reasoning model spent thinking (chats, --reasoning-parser)",
                                        registry=r)
        self.preemptions = Counter("stoke_preemptions",
                                   "Requests preempted (recomputed) for lack of KV blocks or for a higher priority",
                                   registry=r)
        self.spec_drafts = Counter("stoke_spec_decode_drafts",
                                   "Speculative decoding: decode steps of a request that verified drafts", registry=r)
        self.spec_draft_tokens = Counter("stoke_spec_decode_draft_tokens",
                                         "Speculative decoding: draft tokens verified", registry=r)
        self.spec_accepted_tokens = Counter("stoke_spec_decode_accepted_tokens",
                                            "Speculative decoding: draft tokens accepted", registry=r)
        self.requests = Counter("stoke_requests", "Finished completions (one per choice) and pooling requests "
                                "(embeddings, classifications, scores: one per engine request), by finish reason",
                                ["finish_reason"], registry=r)
        self.errors = Counter("stoke_request_errors", "API requests that ended in an error, by type", ["type"],
                              registry=r)
        self.cost = Counter("stoke_cost", "Cost of the API requests served, at the server's --price-* options",
                            registry=r)
        self.ttft = Histogram("stoke_time_to_first_token_seconds", "Arrival to first generated token",
                              buckets=LATENCY_BUCKETS, registry=r)
        self.itl = Histogram("stoke_inter_token_latency_seconds", "Time between consecutive generated tokens",
                             buckets=LATENCY_BUCKETS, registry=r)
        self.e2e = Histogram("stoke_e2e_request_latency_seconds", "Arrival to last token", buckets=LATENCY_BUCKETS,
                             registry=r)
        self.queue_time = Histogram("stoke_request_queue_time_seconds", "Arrival to first scheduled",
                                    buckets=LATENCY_BUCKETS, registry=r)
        self.request_prompt_tokens = Histogram("stoke_request_prompt_tokens", "Prompt tokens per request",
                                               buckets=TOKEN_BUCKETS, registry=r)
        self.request_generation_tokens = Histogram("stoke_request_generation_tokens",
                                                   "Generated tokens per request (all n choices)",
                                                   buckets=TOKEN_BUCKETS, registry=r)
        self.step_batch_tokens = Histogram("stoke_step_batch_tokens", "Tokens in one engine step's forward pass",
                                           buckets=TOKEN_BUCKETS, registry=r)
        self.lora_adapters: list[str] = []
        self.lora_running: Gauge | None = None
        self.lora_waiting: Gauge | None = None
        for name in lora_adapters:
            self.add_lora_adapter(name)
        for reason in FINISH_REASONS:
            self.requests.labels(reason)
        for kind in ERROR_METRIC_TYPES:
            self.errors.labels(kind)
        if gpu:
            r.register(GPUCollector())
        # The worker's cumulative counters (its stats' keys) and the counters they feed.
        self._worker_counters = {
            "prefix_queries_tokens": self.prefix_queries, "prefix_hits_tokens": self.prefix_hits,
            "kv_offload_saved_blocks": self.kv_offload_saved, "kv_offload_loaded_blocks": self.kv_offload_loaded,
            "preemptions": self.preemptions, "spec_drafts": self.spec_drafts,
            "spec_draft_tokens": self.spec_draft_tokens, "spec_accepted_tokens": self.spec_accepted_tokens}
        self._last: dict[str, int] = {}
        self._prefilled: set[str] = set()
        # engine request id → choice index → (finish reason, tokens), until the request ends:
        # with n > 1 a choice's finish arrives in the output of the step it finished in
        # (delta outputs list only the choices with news), or again in an abort's output.
        self._finished: dict[str, dict[int, tuple[str, int]]] = {}
        self._prompt_only: set[str] = set()  # engine request ids: see prompt_only()

    def add_lora_adapter(self, name: str) -> None:
        """A series of each LoRA gauge for a served adapter (the gauges appear with the first). An
        adapter unloaded at runtime keeps its series: its requests in flight still count."""
        if self.lora_running is None:
            self.lora_running = Gauge("stoke_lora_requests_running", "Running requests of each LoRA adapter",
                                      ["adapter"], registry=self.registry)
            self.lora_waiting = Gauge("stoke_lora_requests_waiting", "Waiting requests of each LoRA adapter",
                                      ["adapter"], registry=self.registry)
        if name not in self.lora_adapters:
            self.lora_adapters.append(name)
            self.lora_running.labels(name)
            self.lora_waiting.labels(name)

    def set_baseline(self, stats: dict[str, Any]) -> None:
        """The worker's counters at ready (the warm-up step is not user traffic)."""
        self._last = {k: int(stats[k]) for k in self._worker_counters}

    # ------------------------------------------------------------ from the worker
    def on_frame(self, frame: dict[str, Any]) -> None:
        if frame.get("type") == "ready":
            self.set_baseline(frame["stats"])
            self.cache_config.clear()  # one series: the running engine's
            self.cache_config.labels(str(frame["block_size"]), frame.get("kv_cache_dtype", ""), str(frame["num_blocks"]),
                                     str(frame.get("num_host_blocks", 0))).set(1)
        stats = frame.get("stats")
        if stats is not None:
            self.requests_waiting.set(stats["waiting"])
            self.requests_running.set(stats["running"])
            self.kv_cache_usage.set(stats["kv_cache_usage"])
            self.kv_offload_usage.set(stats["kv_offload_usage"])
            if self.lora_adapters and "lora_running" in stats:
                for name in self.lora_adapters:
                    self.lora_running.labels(name).set(stats["lora_running"].get(name, 0))
                    self.lora_waiting.labels(name).set(stats["lora_waiting"].get(name, 0))
            for key, counter in self._worker_counters.items():
                value = int(stats[key])
                delta = value - self._last.get(key, 0)
                if delta > 0:
                    counter.inc(delta)
                self._last[key] = value
        if frame.get("batch_tokens"):
            self.step_batch_tokens.observe(frame["batch_tokens"])
        for output in frame.get("outputs", ()):
            self._on_output(output)
        for refused in frame.get("errors", ()):  # never queued: no output will end them
            self._prompt_only.difference_update(refused["ids"])

    def prompt_only(self, engine_ids: list[str]) -> None:
        """Engine requests whose one sampled token is not the client's (echo with max_tokens 0:
        the prompt scored): their prompts count, no generated token or token latency does."""
        self._prompt_only.update(engine_ids)

    def _on_output(self, output: dict[str, Any]) -> None:
        if "embedding" in output:  # any pooling request's
            return self._on_embedding(output)
        engine_id = output["id"]
        prompt_only = engine_id in self._prompt_only
        new_tokens = sum(len(c["token_ids"]) for c in output["outputs"])
        if new_tokens:
            if not prompt_only:
                self.generation_tokens.inc(new_tokens)
            if engine_id not in self._prefilled:
                self._prefilled.add(engine_id)
                self.prompt_tokens.inc(output["num_prompt_tokens"])
        for c in output["outputs"]:
            reason = scored_prompt_finish(c["finish_reason"]) if prompt_only else c["finish_reason"]
            if reason is not None:
                self._finished.setdefault(engine_id, {})[c["index"]] = (reason, c["num_tokens"])
        if not output["finished"]:
            return
        self._prefilled.discard(engine_id)
        self._prompt_only.discard(engine_id)
        choices = self._finished.pop(engine_id, {}).values()
        reasons = [reason for reason, _ in choices]
        for reason in reasons:
            if reason in FINISH_REASONS:
                self.requests.labels(reason).inc()
        # Tokens of every request, aborted ones too: the generated ones sum to their counter; the
        # prompt's count whole, where the counter takes only prefills that completed.
        self.request_prompt_tokens.observe(output["num_prompt_tokens"])
        self.request_generation_tokens.observe(0 if prompt_only else sum(tokens for _, tokens in choices))
        m = output.get("metrics")
        if m is None or "abort" in reasons:
            return  # latency of an aborted request says nothing about the server
        arrival = m["arrival_time"]
        if m["first_token_time"] is not None and not prompt_only:
            self.ttft.observe(max(0.0, m["first_token_time"] - arrival))
        if m["first_scheduled_time"] is not None:
            self.queue_time.observe(max(0.0, m["first_scheduled_time"] - arrival))
        if m["finish_time"] is not None:
            self.e2e.observe(max(0.0, m["finish_time"] - arrival))
        for latency in () if prompt_only else m["inter_token_latencies"]:
            self.itl.observe(latency)

    def _on_embedding(self, output: dict[str, Any]) -> None:
        """A pooling request's one output (an embedding, a classification, a score), as vLLM
        counts one: finished "stop" once its values are computed (its prompt counted then), else
        "abort". It generates no token, so it has no TTFT, inter-token latency or generated
        tokens to count."""
        embedded = output["embedding"] is not None
        self.requests.labels("stop" if embedded else "abort").inc()
        self.request_prompt_tokens.observe(output["num_prompt_tokens"])
        if not embedded:
            return  # latency of an aborted request says nothing about the server
        self.prompt_tokens.inc(output["num_prompt_tokens"])
        m = output.get("metrics")
        if m is None:
            return
        if m["first_scheduled_time"] is not None:
            self.queue_time.observe(max(0.0, m["first_scheduled_time"] - m["arrival_time"]))
        if m["finish_time"] is not None:
            self.e2e.observe(max(0.0, m["finish_time"] - m["arrival_time"]))

    def on_engine_gone(self) -> None:
        """The worker died: nothing runs, waits or holds KV any more (its requests have failed),
        so a dashboard must not show the dead engine as a busy one."""
        for gauge in (self.requests_waiting, self.requests_running, self.kv_cache_usage, self.kv_offload_usage):
            gauge.set(0)
        for name in self.lora_adapters:
            self.lora_running.labels(name).set(0)
            self.lora_waiting.labels(name).set(0)

    # ------------------------------------------------------------- from the HTTP layer
    def on_error(self, metric_type: str) -> None:
        self.errors.labels(metric_type if metric_type in ERROR_METRIC_TYPES else "internal").inc()

    def on_cost(self, amount: float) -> None:
        if amount > 0:
            self.cost.inc(amount)

    def render(self) -> tuple[bytes, str]:
        return generate_latest(self.registry), CONTENT_TYPE_LATEST
