"""The server's parts without a server: framing, error mapping, metrics, the log line, options."""

from __future__ import annotations

import asyncio
import json
import logging
import os
import sys
import time

import pytest

from server import errors
from server.config import ServerConfig
from server.ipc import FrameError, FrameReader, FrameWriter, encode_frame
from server.tool_parsers import ToolCallParser
from server.launch import build_parser, config_from_args, parse_size
from server.metrics import Metrics
from server.request_log import RequestLogger, RequestRecord, key_id

SPEC_METRICS = [
    "stoke_requests_waiting", "stoke_requests_running", "stoke_kv_cache_usage_ratio",
    "stoke_prefix_cache_queries_tokens_total", "stoke_prefix_cache_hits_tokens_total", "stoke_prompt_tokens_total",
    "stoke_generation_tokens_total", "stoke_preemptions_total", "stoke_requests_total", "stoke_request_errors_total",
    "stoke_time_to_first_token_seconds", "stoke_inter_token_latency_seconds", "stoke_e2e_request_latency_seconds",
    "stoke_request_queue_time_seconds", "stoke_request_prompt_tokens", "stoke_request_generation_tokens",
    "stoke_step_batch_tokens", "stoke_gpu_info", "stoke_spec_decode_drafts_total",
    "stoke_spec_decode_draft_tokens_total", "stoke_spec_decode_accepted_tokens_total",
    "stoke_kv_offload_usage_ratio", "stoke_kv_offload_saved_blocks_total", "stoke_kv_offload_loaded_blocks_total",
    "stoke_cache_config_info",
]


def test_frames_round_trip_over_a_pipe():
    r, w = os.pipe()
    writer, reader = FrameWriter(w), FrameReader(r)
    messages = [{"type": "add", "ids": ["a-0"], "prompts": [[1, 2, 3]], "text": "héllo ✓"}, [], None, 3.5]
    for m in messages:
        writer.write(m)
    writer.close()
    assert [reader.read() for _ in messages] == messages
    assert reader.read() is None  # end of stream
    reader.close()


@pytest.mark.parametrize("data", [encode_frame({"a": 1})[:-2], b"\x00\x00\x00\x03abc", b"\x00\x00"])
def test_broken_frames_are_rejected(data):
    r, w = os.pipe()
    os.write(w, data)
    os.close(w)
    with pytest.raises(FrameError):
        FrameReader(r).read()
    os.close(r)


def test_validation_errors_are_400s_with_their_codes():
    assert errors.from_validation_errors([{"type": "json_invalid", "loc": ("body", 5), "msg": "x"}]).status == 400
    e = errors.from_validation_errors([{"type": "int_parsing", "loc": ("body", "max_tokens"),
                                        "msg": "Input should be a valid integer"}])
    assert (e.status, e.code, e.param) == (400, "invalid_type", "max_tokens")
    e = errors.from_validation_errors([{"type": "missing", "loc": ("body", "prompt"), "msg": "Field required"}])
    assert (e.status, e.code, e.param) == (400, "missing_required_parameter", "prompt")
    union = [{"type": "string_type", "loc": ("body", "prompt", "str"), "msg": "Input should be a valid string"},
             {"type": "list_type", "loc": ("body", "prompt", "list[str]"), "msg": "Input should be a valid list"}]
    e = errors.from_validation_errors(union)
    assert (e.status, e.param) == (400, "prompt") and "more" not in e.message
    body = errors.internal().body()["error"]
    assert body["message"] == "internal server error" and set(body) == {"message", "type", "param", "code"}


def test_metrics_names_and_engine_frames():
    m = Metrics()
    text = m.render()[0].decode()
    for name in SPEC_METRICS:
        assert f"\n{name}" in "\n" + text or f"# TYPE {name}" in text, name
    assert "_created" not in text
    if 'stoke_gpu_info{available="false"}' not in text:  # a machine with NVML
        assert "stoke_gpu_memory_used_bytes" in text
    m.on_frame({"type": "ready", "stats": {"waiting": 0, "running": 0, "kv_cache_usage": 0.0,
                                           "prefix_queries_tokens": 8, "prefix_hits_tokens": 0,
                                           "kv_offload_usage": 0.0, "kv_offload_saved_blocks": 2,
                                           "kv_offload_loaded_blocks": 0,
                                           "preemptions": 0, "num_steps": 1, "spec_drafts": 1,
                                           "spec_draft_tokens": 4, "spec_accepted_tokens": 2},
                "block_size": 16, "num_blocks": 4096, "num_host_blocks": 0, "kv_cache_dtype": "float8_e4m3fn"})
    output = {"id": "r-0", "finished": True, "num_prompt_tokens": 5, "num_cached_tokens": 0,
              "outputs": [{"index": 0, "text": "hi", "token_ids": [7, 8], "logprobs": None, "num_tokens": 2,
                           "finish_reason": "length", "stop_reason": None}],
              "metrics": {"arrival_time": 10.0, "first_scheduled_time": 10.001, "first_token_time": 10.2,
                          "finish_time": 10.3, "inter_token_latencies": [0.1], "num_preemptions": 0}}
    m.on_frame({"stats": {"waiting": 3, "running": 2, "kv_cache_usage": 0.5, "prefix_queries_tokens": 40,
                          "prefix_hits_tokens": 16, "kv_offload_usage": 0.25, "kv_offload_saved_blocks": 5,
                          "kv_offload_loaded_blocks": 4, "preemptions": 1, "num_steps": 5, "spec_drafts": 3,
                          "spec_draft_tokens": 12, "spec_accepted_tokens": 7},
                "batch_tokens": 7, "outputs": [output]})
    m.on_error("aborted")
    text = m.render()[0].decode()
    for line in ("stoke_requests_waiting 3.0", "stoke_kv_cache_usage_ratio 0.5",
                 "stoke_prefix_cache_queries_tokens_total 32.0", "stoke_prefix_cache_hits_tokens_total 16.0",
                 "stoke_preemptions_total 1.0", "stoke_prompt_tokens_total 5.0", "stoke_generation_tokens_total 2.0",
                 'stoke_requests_total{finish_reason="length"} 1.0', 'stoke_request_errors_total{type="aborted"} 1.0',
                 "stoke_time_to_first_token_seconds_count 1.0",
                 'stoke_time_to_first_token_seconds_bucket{le="0.3"} 1.0',
                 'stoke_time_to_first_token_seconds_bucket{le="0.15"} 0.0', "stoke_step_batch_tokens_sum 7.0",
                 'stoke_inter_token_latency_seconds_bucket{le="0.001"} 0.0', "stoke_spec_decode_drafts_total 2.0",
                 "stoke_spec_decode_draft_tokens_total 8.0", "stoke_spec_decode_accepted_tokens_total 5.0",
                 "stoke_kv_offload_usage_ratio 0.25", "stoke_kv_offload_saved_blocks_total 3.0",
                 "stoke_kv_offload_loaded_blocks_total 4.0",
                 'stoke_cache_config_info{block_size="16",cache_dtype="float8_e4m3fn",num_blocks="4096",'
                 'num_host_blocks="0"} 1.0'):
        assert line in text, line


def _assert_exported(m: Metrics, *lines: str) -> None:
    text = m.render()[0].decode()
    for line in lines:
        assert line in text, line


def _engine_output(request_id: str, finished: bool, *choices: tuple[int, int, str | None],
                   num_prompt_tokens: int = 3) -> dict:
    """A worker output: one new token for each (choice index, tokens so far, finish reason)."""
    return {"id": request_id, "finished": finished, "num_prompt_tokens": num_prompt_tokens, "num_cached_tokens": 0,
            "outputs": [{"index": i, "text": "x", "token_ids": [5], "logprobs": None, "num_tokens": n,
                         "finish_reason": reason, "stop_reason": None} for i, n, reason in choices],
            "metrics": {"arrival_time": 1.0, "first_scheduled_time": 1.0, "first_token_time": 1.1,
                        "finish_time": 1.5, "inter_token_latencies": [], "num_preemptions": 0}}


def test_metrics_count_every_choice_of_a_request_once():
    """n = 2: choice 0 finishes a step before choice 1, and its finish is in that step's output
    only (delta outputs list the choices with news); an aborted request's output lists every
    choice again. Each choice counts once in stoke_requests_total, and a request's generated
    tokens are both choices', an aborted request's too (the histogram's sum is the counter's)."""
    m, output = Metrics(), _engine_output
    m.on_frame({"outputs": [output("a", False, (0, 4, "length"), (1, 3, None))]})
    m.on_frame({"outputs": [output("a", True, (1, 4, "stop"))]})
    m.on_frame({"outputs": [output("b", False, (0, 2, "stop"), (1, 1, None))]})
    m.on_frame({"outputs": [output("b", True, (0, 2, "stop"), (1, 1, "abort"))]})  # an abort: cumulative
    _assert_exported(m, 'stoke_requests_total{finish_reason="length"} 1.0',
                     'stoke_requests_total{finish_reason="stop"} 2.0', 'stoke_requests_total{finish_reason="abort"} 1.0',
                     "stoke_request_generation_tokens_count 2.0", "stoke_request_generation_tokens_sum 11.0",
                     "stoke_time_to_first_token_seconds_count 1.0")
    assert not m._finished


def test_a_scored_prompt_counts_no_generated_token():
    """echo with max_tokens 0 (scoring a prompt): the engine samples one token the client never
    sees; it counts in no token counter or token latency, the prompt does."""
    m = Metrics(gpu=False)
    m.prompt_only(["e-0"])
    m.on_frame({"outputs": [_engine_output("e-0", True, (0, 1, "length"), num_prompt_tokens=9)]})
    m.prompt_only(["e-2"])  # the dropped token was a stop token: the client's answer is still "length"
    m.on_frame({"outputs": [_engine_output("e-2", True, (0, 1, "stop"), num_prompt_tokens=0)]})
    m.prompt_only(["e-1"])
    m.on_frame({"errors": [{"ids": ["e-1"], "kind": "admission"}]})  # refused: never outputs
    _assert_exported(m, 'stoke_requests_total{finish_reason="length"} 2.0',
                     'stoke_requests_total{finish_reason="stop"} 0.0', "stoke_generation_tokens_total 0.0", "stoke_prompt_tokens_total 9.0",
                     "stoke_request_generation_tokens_sum 0.0", "stoke_request_prompt_tokens_sum 9.0",
                     "stoke_time_to_first_token_seconds_count 0.0", "stoke_e2e_request_latency_seconds_count 2.0")
    assert not m._prompt_only


def test_lora_gauges_per_adapter():
    """With LoRA adapters served, stoke_lora_requests_running/waiting{adapter}: a series per
    adapter from the start, each frame's counts (an adapter the worker's counts leave out is at
    0 again), zeroed when the engine is gone; without adapters, no such series."""
    from prometheus_client.parser import text_string_to_metric_families

    def gauges(m: Metrics) -> dict[tuple[str, str], float]:
        return {(f.name.removeprefix("stoke_lora_requests_"), s.labels["adapter"]): s.value
                for f in text_string_to_metric_families(m.render()[0].decode())
                if f.name.startswith("stoke_lora_") for s in f.samples}

    def stats(**lora: dict[str, int]) -> dict:
        return {"stats": {"waiting": 1, "running": 2, "kv_cache_usage": 0.25, "prefix_queries_tokens": 0,
                          "prefix_hits_tokens": 0, "kv_offload_usage": 0.0, "kv_offload_saved_blocks": 0,
                          "kv_offload_loaded_blocks": 0, "preemptions": 0, "num_steps": 1, "spec_drafts": 0,
                          "spec_draft_tokens": 0, "spec_accepted_tokens": 0, **lora}}

    assert "stoke_lora" not in Metrics(gpu=False).render()[0].decode()
    plain = Metrics(gpu=False)
    plain.on_frame(stats(lora_running={}, lora_waiting={}))  # --enable-lora without --lora-modules
    plain.on_engine_gone()
    assert "stoke_lora" not in plain.render()[0].decode()

    m = Metrics(gpu=False, lora_adapters=["a", "b"])
    zeros = {(state, name): 0.0 for state in ("running", "waiting") for name in ("a", "b")}
    assert gauges(m) == zeros
    m.on_frame(stats(lora_running={"a": 2}, lora_waiting={"b": 1}))
    assert gauges(m) == zeros | {("running", "a"): 2.0, ("waiting", "b"): 1.0}
    _assert_exported(m, 'stoke_lora_requests_running{adapter="a"} 2.0', 'stoke_lora_requests_running{adapter="b"} 0.0',
                     'stoke_lora_requests_waiting{adapter="a"} 0.0', 'stoke_lora_requests_waiting{adapter="b"} 1.0')
    m.on_frame({"batch_tokens": 3})  # a frame without stats changes no gauge
    assert gauges(m) == zeros | {("running", "a"): 2.0, ("waiting", "b"): 1.0}
    m.on_frame(stats(lora_running={"b": 1}, lora_waiting={}))  # a's requests finished, b's runs
    assert gauges(m) == zeros | {("running", "b"): 1.0}
    m.on_frame(stats(lora_running={"b": 1, "c": 4}, lora_waiting={"a": 3}))  # a name not served: no series
    assert gauges(m) == zeros | {("running", "b"): 1.0, ("waiting", "a"): 3.0}
    m.on_engine_gone()
    assert gauges(m) == zeros
    _assert_exported(m, "stoke_requests_running 0.0", "stoke_requests_waiting 0.0")


def test_request_log_line(caplog):
    record = RequestRecord("cmpl-1", "completions", model="m", key_id=key_id("sk-secret"), prompt="p", output="o")
    record.add_engine_metrics({"arrival_time": 1.0, "first_scheduled_time": 1.5, "first_token_time": 2.0,
                               "finish_time": 3.0, "inter_token_latencies": [0.5, 0.5]})
    with caplog.at_level(logging.INFO, logger="stoke.requests"):
        RequestLogger(log_text=False).emit(record)
        RequestLogger(log_text=False).emit(record)  # once only
    assert len(caplog.records) == 1
    line = json.loads(caplog.records[0].getMessage())
    assert line["key_id"].startswith("sha256:") and "sk-secret" not in caplog.text
    assert (line["queue_time_s"], line["ttft_s"], line["e2e_s"], line["mean_itl_s"]) == (0.5, 1.0, 2.0, 0.5)
    assert "prompt" not in line and "output" not in line
    caplog.clear()
    record = RequestRecord("cmpl-2", "completions", prompt="p", output="o")
    with caplog.at_level(logging.INFO, logger="stoke.requests"):
        RequestLogger(log_text=True).emit(record)
    line = json.loads(caplog.records[0].getMessage())
    assert line["prompt"] == "p" and line["output"] == "o"
    caplog.clear()
    forged = '\u2028{"event":"request","status":200}\x85'  # line breaks JSON leaves as they are
    record = RequestRecord("cmpl-3", "completions", user="u" * 5000 + forged, model=forged)
    with caplog.at_level(logging.INFO, logger="stoke.requests"):
        RequestLogger(log_text=False).emit(record)
    text = caplog.records[0].getMessage()
    assert len(text.splitlines()) == 1 and len(text) < 1000
    line = json.loads(text)
    assert line["user"] == "u" * 256 + "..." and line["model"] == forged


def test_options():
    assert parse_size("256MiB") == 256 << 20 and parse_size("2GiB") == 2 << 30 and parse_size("1000") == 1000
    config = config_from_args(build_parser().parse_args(
        ["/m", "--port", "9000", "--max-num-seqs", "4", "--kv-cache-memory-bytes", "1GiB", "--log-request-text"]))
    assert config.port == 9000 and config.log_request_text
    assert config.engine_args["model"] == "/m" and config.engine_args["max_num_seqs"] == 4
    assert config.engine_args["kv_cache_memory_bytes"] == 1 << 30
    assert config.engine_args["cuda_graph_mode"] == "full" and not config.engine_args["enforce_eager"]
    assert config.engine_args["long_prefill_token_threshold"] == 0 and config.engine_args["max_num_partial_prefills"] == 2
    config = config_from_args(build_parser().parse_args(["--cuda-graph-mode", "decode", "--enforce-eager",
                                                         "--long-prefill-token-threshold", "256",
                                                         "--max-num-partial-prefills", "1"]))
    assert config.engine_args["cuda_graph_mode"] == "decode" and config.engine_args["enforce_eager"]
    assert config.engine_args["long_prefill_token_threshold"] == 256 and config.engine_args["max_num_partial_prefills"] == 1
    assert config.engine_args["generation_config"] == "auto"
    config = config_from_args(build_parser().parse_args(["--generation-config", "none", "--allowed-origins", "https://a",
                                                         "--allowed-origins", "https://b", "/m"]))
    assert config.engine_args["generation_config"] == "none" and config.engine_args["model"] == "/m"
    assert config.allowed_origins == ["https://a", "https://b"] and config_from_args(
        build_parser().parse_args([])).allowed_origins is None


def test_limit_options(monkeypatch):
    from server.limits import limits_from_config

    config = config_from_args(build_parser().parse_args(
        ["--api-key", "k1", "--api-key", "k2", "--rate-limit-requests", "60", "--rate-limit-tokens", "9000",
         "--price-prompt", "0.5", "--price-completion", "1.5", "--cost-cap", "10", "--cost-cap-period", "hour"]))
    assert config.api_keys == ["k1", "k2"]
    limits = limits_from_config(config)
    assert (limits.requests_per_minute, limits.tokens_per_minute, limits.cost_cap, limits.cost_cap_period) == \
        (60, 9000, 10.0, "hour")
    assert limits.pricing.cost(1_000_000, 0, 1_000_000) == 2.0
    assert config_from_args(build_parser().parse_args(["--api-key", " k5 "])).api_keys == ["k5"]
    with pytest.raises(SystemExit):  # `--api-key "$KEY"` with KEY unset: refused, not a server without a key
        build_parser().parse_args(["--api-key", "k1", "--api-key", " "])
    monkeypatch.setenv("STOKE_API_KEY", "k3, k4,")
    assert config_from_args(build_parser().parse_args([])).api_keys == ["k3", "k4"]
    monkeypatch.delenv("STOKE_API_KEY")
    assert config_from_args(build_parser().parse_args([])).api_keys == []
    with pytest.raises(ValueError, match="a cost cap needs prices"):  # `stoke serve` exits 2, before starting
        limits_from_config(config_from_args(build_parser().parse_args(["--cost-cap", "5"])))


def test_worker_encodes_only_new_logprobs():
    from engine.outputs import CompletionOutput, RequestMetrics, RequestOutput
    from server.ipc import unpack_output
    from server.worker import encode_output

    metrics = RequestMetrics(arrival_time=1.0, finish_time=2.0)
    cumulative = RequestOutput("r", None, [1, 2], [CompletionOutput(
        0, "ab", [5, 6], logprobs=[{5: -0.125, 9: -2.0}, {6: -0.25, 7: -3.5}], finish_reason="stop", delta_text="b",
        delta_token_ids=[6], num_tokens=2)], finished=True, metrics=metrics)
    delta = RequestOutput("r", None, [1, 2], [CompletionOutput(  # step(outputs="delta"): what the worker runs
        0, "b", [6], logprobs=[{6: -0.25, 7: -3.5}], finish_reason="stop", delta_text="b", delta_token_ids=[6],
        num_tokens=2)], finished=True, metrics=metrics)
    frame = unpack_output(encode_output(cumulative))
    assert frame == unpack_output(encode_output(delta))
    assert frame["outputs"][0]["logprobs"] == [[[6, -0.25], [7, -3.5]]] and frame["outputs"][0]["text"] == "b"
    assert frame["outputs"][0]["num_tokens"] == 2 and frame["metrics"]["finish_time"] == 2.0
    assert "prompt_logprobs" not in frame and (frame["id"], frame["num_prompt_tokens"]) == ("r", 2)
    packed = encode_output(delta)  # what crosses the pipe: fields by position
    assert packed[:4] == ["r", True, 2, 0] and packed[4][0][:3] == [0, "b", [6]]
    assert isinstance(packed[4][0][3], str) and packed[4][0][4:] == [2, "stop", None]  # logprobs packed
    json.dumps(packed)  # plain data
    with pytest.raises(FrameError, match="8 fields"):
        unpack_output(packed[:6])


def test_logprobs_pack_round_trip_and_reject_malformed():
    """Packed logprobs come back as the worker had them: per token the (id, logprob) pairs in
    order, None where a token has none (a prompt's first); float32 values exactly, -inf too."""
    import base64
    import random
    from array import array

    import numpy as np

    from server.ipc import pack_logprobs, unpack_logprobs

    rng = random.Random(0)
    for _ in range(50):
        entries = [None if rng.random() < 0.1 else
                   {rng.randrange(200_000): float(np.float32(-rng.expovariate(0.3))) for _ in range(rng.randint(1, 21))}
                   for _ in range(rng.randint(0, 30))]
        assert unpack_logprobs(pack_logprobs(entries)) == [
            None if e is None else [[t, lp] for t, lp in e.items()] for e in entries]
    assert unpack_logprobs(pack_logprobs([{3: float("-inf")}])) == [[[3, float("-inf")]]]
    good = pack_logprobs([{1: -0.5}, None])
    for bad in ("not base64!", base64.b64encode(b"\x01").decode(), good[:-4],
                base64.b64encode(array("i", [1, -1]).tobytes()).decode(),
                base64.b64encode(array("i", [10 ** 6]).tobytes()).decode(), 42):
        with pytest.raises(FrameError):
            unpack_logprobs(bad)


def test_serve_benchmark_summary():
    from benchmarks.serve import Record, add_server_cpu, summarize

    records = [Record(ok=True, prompt_len=10, output_len_requested=5, output_tokens=5, chunks=5 - (i == 1),
                      ttft=0.1 * i, e2e=0.1 * i + 0.4, itl=[0.1] * 4) for i in range(1, 11)]
    records.append(Record(ok=False, prompt_len=10, output_len_requested=5, error="HTTP 503"))
    s = summarize(records, duration=2.0)
    assert (s["completed"], s["failed"], s["output_tokens"]) == (10, 1, 50) and s["tokens_per_chunk"] == 50 / 49
    assert s["output_token_throughput"] == 25.0 and s["request_throughput"] == 5.0
    assert s["p50_ttft_ms"] == pytest.approx(550.0) and s["p99_ttft_ms"] == pytest.approx(991.0)
    assert s["p50_tpot_ms"] == pytest.approx(100.0) and s["p90_itl_ms"] == pytest.approx(100.0)
    assert s["errors"] == ["HTTP 503"]
    assert s["gpu_utilization_mean"] is None and s["gpu_utilization_samples"] == 0
    s = summarize(records, duration=2.0, gpu_samples=[0.5, 0.7, 0.9])
    assert s["gpu_utilization_mean"] == pytest.approx(0.7) and s["gpu_utilization_samples"] == 3
    assert s["client_cpu_busy"] is None and s["client_cpu_us_per_token"] is None and s["client_bound"] is False
    s = summarize(records, duration=2.0, client=(0.5, 0.95))  # the load generators' CPU, the busiest's share
    assert s["client_cpu_busy"] == 0.95 and s["client_cpu_us_per_token"] == pytest.approx(1e4) and s["client_bound"]
    assert summarize(records, duration=2.0, client=(0.5, 0.5))["client_bound"] is False
    add_server_cpu(s, {"main": 0.002, "children": 0.001})
    assert s["server_cpu_us_per_token"] == pytest.approx({"main": 40.0, "children": 20.0})
    assert "urgent_completed" not in s  # no urgent requests: no classes
    for r in records[:3]:  # --urgent-fraction: the first three (TTFT 100-300 ms) urgent
        r.urgent = True
    s = summarize(records, duration=2.0)
    assert (s["urgent_completed"], s["others_completed"]) == (3, 7)
    assert s["urgent_p50_ttft_ms"] == pytest.approx(200.0) and s["others_p50_ttft_ms"] == pytest.approx(700.0)
    assert s["urgent_p99_e2e_ms"] == pytest.approx(698.0) and s["p50_ttft_ms"] == pytest.approx(550.0)


def test_serve_benchmark_sends_priority_only_where_asked():
    import argparse

    from benchmarks.serve import URGENT_PRIORITY, Item, request_body

    for endpoint in ("completions", "embeddings"):
        args = argparse.Namespace(logprobs=None, backend="stoke", send_priority=False, endpoint=endpoint)
        urgent, other = Item("hi", 1, 4, urgent=True), Item("hi", 1, 4)
        assert "priority" not in request_body(args, "m", urgent)  # a first come, first served server refuses it
        args.send_priority = True
        assert request_body(args, "m", urgent)["priority"] == URGENT_PRIORITY == -1
        assert "priority" not in request_body(args, "m", other)


def test_serve_benchmark_times_tokens_per_arrival():
    """A stream's events that one network read brings count as one arrival in ITL, however the
    server chunked them: three one-token events in one write (transformers serve) and one
    merged event (stoke behind its engine) each give one gap; the usage sets the tokens."""
    from benchmarks.serve import Item, httpx, send

    def event(text: str) -> bytes:
        return b"data: " + json.dumps({"choices": [{"index": 0, "text": text}]}).encode() + b"\n\n"

    usage = b'data: {"choices": [], "usage": {"completion_tokens": 7}}\n\ndata: [DONE]\n\n'
    reads = [event("a"), event("b") + event("c") + event("d")[:9], event("d")[9:], event("efg") + usage]

    class Stream(httpx.AsyncByteStream):
        async def __aiter__(self):
            for data in reads:
                await asyncio.sleep(0.05)
                yield data

    async def run():
        transport = httpx.MockTransport(lambda request: httpx.Response(200, stream=Stream()))
        async with httpx.AsyncClient(transport=transport) as client:
            return await send(client, "http://x/v1/completions", {}, Item("p", 1, 7))

    record = asyncio.run(run())
    assert record.ok and record.output_tokens == 7 and record.chunks == 5
    assert len(record.itl) == 3 and all(0.03 < gap < 0.5 for gap in record.itl), record.itl


def test_serve_benchmark_reads_a_process_and_its_childrens_cpu_time():
    """What `--launch` reads of the server it started (/proc): the main process's CPU time and
    its children's, one that burns CPU included."""
    import subprocess

    from benchmarks.serve import _children, _cpu_seconds

    child = subprocess.Popen([sys.executable, "-c", "import time\nt = time.process_time()\n"
                              "while time.process_time() - t < 0.3: pass\ntime.sleep(30)"])
    try:
        deadline = time.monotonic() + 20
        while _cpu_seconds(child.pid) < 0.3 and time.monotonic() < deadline:
            time.sleep(0.05)
        assert child.pid in _children(os.getpid())
        assert 0.3 <= _cpu_seconds(child.pid) < 5 and _cpu_seconds(os.getpid()) > 0
    finally:
        child.kill()
        child.wait()


def test_gpu_gauges_from_nvml(monkeypatch):
    """With NVML present (a fake one here), per-GPU gauges appear and gpu_info says available."""
    import types

    fake = types.SimpleNamespace(
        nvmlInit=lambda: None, nvmlDeviceGetCount=lambda: 2, nvmlDeviceGetHandleByIndex=lambda i: i,
        nvmlDeviceGetUtilizationRates=lambda h: types.SimpleNamespace(gpu=40 + h),
        nvmlDeviceGetMemoryInfo=lambda h: types.SimpleNamespace(used=(h + 1) * 1024))
    monkeypatch.setitem(sys.modules, "pynvml", fake)
    text = Metrics().render()[0].decode()
    assert 'stoke_gpu_info{available="true"} 1.0' in text
    assert 'stoke_gpu_utilization_ratio{gpu="1"} 0.41' in text
    assert 'stoke_gpu_memory_used_bytes{gpu="0"} 1024.0' in text
    from benchmarks.serve import gpu_utilization  # what the serve benchmark samples during a run

    assert gpu_utilization(text) == pytest.approx(0.405)  # the mean of the two GPUs

    def broken():
        raise RuntimeError("driver gone")

    fake.nvmlDeviceGetCount = broken  # NVML failing at scrape time: no crash, just "not available"
    text = Metrics().render()[0].decode()
    assert 'stoke_gpu_info{available="false"} 1.0' in text and "stoke_gpu_memory_used_bytes{" not in text
    assert gpu_utilization(text) is None


def test_grafana_dashboard_queries_only_exported_metrics(monkeypatch):
    """docs/grafana/stoke.json: every PromQL expression names series that /metrics exports (with
    NVML present), it covers what the dashboard is for, and it imports cleanly (one datasource
    input, unique panel ids, panels inside the 24-column grid)."""
    import re
    import types

    fake = types.SimpleNamespace(
        nvmlInit=lambda: None, nvmlDeviceGetCount=lambda: 1, nvmlDeviceGetHandleByIndex=lambda i: i,
        nvmlDeviceGetUtilizationRates=lambda h: types.SimpleNamespace(gpu=50),
        nvmlDeviceGetMemoryInfo=lambda h: types.SimpleNamespace(used=1024))
    monkeypatch.setitem(sys.modules, "pynvml", fake)
    # every series on: the LoRA gauges are exported where adapters are served (its panel is empty without)
    text = Metrics(lora_adapters=["an-adapter"]).render()[0].decode()
    exported = {line.split("{")[0].split(" ")[0] for line in text.splitlines() if line and not line.startswith("#")}
    root = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
    with open(os.path.join(root, "docs", "grafana", "stoke.json")) as f:
        dashboard = json.load(f)
    panels = [p for p in dashboard["panels"] if p["type"] != "row"]
    exprs = [t["expr"] for p in panels for t in p["targets"]]
    used = {name for e in exprs for name in re.findall(r"\bstoke_[a-z0-9_]+", e)}
    assert used and used <= exported, used - exported
    for needed in ("stoke_requests_waiting", "stoke_prefix_cache_hits_tokens_total", "stoke_gpu_utilization_ratio",
                   "stoke_time_to_first_token_seconds_bucket", "stoke_inter_token_latency_seconds_bucket",
                   "stoke_generation_tokens_total", "stoke_request_errors_total"):
        assert needed in used, needed
    assert [i["name"] for i in dashboard["__inputs"]] == ["DS_PROMETHEUS"]
    ids = [p["id"] for p in dashboard["panels"]]
    assert len(ids) == len(set(ids))
    assert all(p["gridPos"]["x"] + p["gridPos"]["w"] <= 24 for p in dashboard["panels"])
    assert all(p["datasource"]["uid"] == "${DS_PROMETHEUS}" for p in panels)


def test_worker_process_freezes_its_startup_heap(tiny_checkpoints):
    """The worker, over its pipes: after start-up (engine and warm-up) the objects it holds are
    out of the cyclic collector's reach, so no full collection rescans them mid-serving."""
    import subprocess

    to_worker, from_worker = os.pipe(), os.pipe()
    proc = subprocess.Popen([sys.executable, "-m", "server.worker", "--in-fd", str(to_worker[0]),
                             "--out-fd", str(from_worker[1]), "--log-level", "WARNING"],
                            pass_fds=(to_worker[0], from_worker[1]))
    os.close(to_worker[0])
    os.close(from_worker[1])
    writer, reader = FrameWriter(to_worker[1]), FrameReader(from_worker[0])
    try:
        writer.write({"type": "init", "engine": {"model": tiny_checkpoints["llama"], "num_kv_blocks": 16}})
        ready = reader.read()
        assert ready["type"] == "ready" and ready["num_blocks"] == 16
        assert ready["frozen_objects"] > 10_000  # torch, transformers, the model: all frozen
        writer.write({"type": "shutdown"})
        assert proc.wait(60) == 0
    finally:
        writer.close()
        reader.close()
        if proc.poll() is None:
            proc.kill()


def _frame(request_id: str, index: int, text: str, token_ids: list[int], num_tokens: int,
           finish_reason: str | None = None, logprobs: list | None = None) -> dict:
    return {"id": request_id, "finished": finish_reason is not None, "num_prompt_tokens": 3, "num_cached_tokens": 0,
            "outputs": [{"index": index, "text": text, "token_ids": token_ids, "logprobs": logprobs,
                         "num_tokens": num_tokens, "finish_reason": finish_reason, "stop_reason": None}]}


@pytest.mark.parametrize("chat", [False, True])
def test_a_stream_behind_the_engine_catches_up_in_one_chunk_per_choice(chat):
    """Outputs queued while the stream was busy go out merged, one chunk per choice: text,
    tokens and logprobs joined in order, the last finish reason; what was not yet queued
    still goes out on its own. The whole stream's text and usage are what the engine made."""
    from server.engine_client import Generation
    from server.serving import Job, OpenAIServing

    async def run() -> list[dict]:
        serving = OpenAIServing(ServerConfig(), None, client=None, metrics=Metrics(),
                                request_logger=RequestLogger(log_text=False), model_name="m")
        job = Job(kind="chat" if chat else "completion", request_id="cmpl-1", model="m", created=0, arrival=0.0,
                  prompts=[[1, 2, 3]], prompt_texts=["p"], params={}, n=2, stream=True, include_usage=True,
                  echo=False, logprobs=1 if not chat else None, record=RequestRecord("cmpl-1", "completions"))
        generation = Generation(client=None, ids=["e-0"])
        lp = [[[5, -0.5]], [[6, -0.25]]]
        for frame in (_frame("e-0", 0, "He", [5], 1, logprobs=lp[:1]),
                      _frame("e-0", 1, "Yo", [9], 1, logprobs=[[[9, -1.0]]]),
                      _frame("e-0", 0, "llo", [6], 2, logprobs=lp[1:])):
            generation.queue.put_nowait((0, frame))
        chunks, stream = [], serving._stream(job, generation)
        async for line in stream:
            chunks.append(line)
            if len(chunks) == 2 + chat * 2:  # the first batch out (chat: a role chunk per choice first)
                generation.queue.put_nowait((0, _frame("e-0", 1, "!", [10], 2, "length", [[[10, -2.0]]])))
                generation.queue.put_nowait((0, _frame("e-0", 0, "", [7], 3, "stop", [[[7, -0.1]]])))
        return [json.loads(c[len("data: "):]) for c in chunks if c != "data: [DONE]\n\n"]

    chunks = asyncio.run(run())
    key = "delta" if chat else "text"
    bodies = [(c["choices"][0]["index"], c["choices"][0][key], c["choices"][0]["finish_reason"])
              for c in chunks if c["choices"] and (not chat or "role" not in c["choices"][0]["delta"])]
    if chat:
        bodies = [(i, d.get("content", ""), r) for i, d, r in bodies]
    # batch 1 merged choice 0's two frames; batch 2 carried both choices' last frames
    assert bodies == [(0, "Hello", None), (1, "Yo", None), (1, "!", "length"), (0, "", "stop")]
    if not chat:
        assert chunks[0]["choices"][0]["logprobs"]["token_logprobs"] == [-0.5, -0.25]
        assert chunks[0]["choices"][0]["logprobs"]["tokens"] == ["<5>", "<6>"]
        assert chunks[0]["choices"][0]["logprobs"]["text_offset"] == [0, 3]
    assert chunks[-1]["usage"]["completion_tokens"] == 5


@pytest.mark.parametrize("kind", ["completion", "chat"])
def test_text_chunks_are_the_generic_chunks_bytes(kind):
    """The per-token fast path (`_text_chunk`: the chunk rendered once around a placeholder)
    writes exactly what the generic chunk does, whatever the text: quotes, escapes, control
    characters, non-ASCII, surrogate-free emoji, JSON-looking text."""
    from server.serving import Job, OpenAIServing, sse

    serving = OpenAIServing(ServerConfig(), None, client=None, metrics=Metrics(),
                            request_logger=RequestLogger(log_text=False), model_name="m")
    job = Job(kind=kind, request_id="chatcmpl-7", model='my "model" é', created=1796105673, arrival=0.0,
              prompts=[[1]], prompt_texts=["p"], params={}, n=3, stream=True, include_usage=False, echo=False,
              logprobs=None, record=RequestRecord("chatcmpl-7", "chat"))
    texts = [" hello", '"quoted" \\ back', "\n\t\x00\x1f", "東京 🍣", '{"choices":[]}', "\u2028", "x" * 300]
    for index in (0, 2):
        for text in texts:
            generic = serving._chat_chunk(job, index, {"content": text}, None, None) if kind == "chat" \
                else serving._completion_chunk(job, index, text, None, None)
            assert serving._text_chunk(job, index, text) == sse(generic)
            if kind == "chat":
                generic = serving._chat_chunk(job, index, {"reasoning": text, "reasoning_content": text}, None, None)
                assert serving._text_chunk(job, index, text, "reasoning") == sse(generic)
    assert sorted(job.text_chunks) == [(0, "content"), (0, "reasoning"), (2, "content"), (2, "reasoning")][
        ::1 if kind == "chat" else 2]


def test_streamed_chat_logprobs_are_the_bodies_bytes():
    """A stream's chat logprobs, built as JSON text from pieces cached per token, are exactly
    what encoding the body's objects writes: tricky token strings (quotes, control characters,
    non-ASCII, two ids with one string), -inf clamped, top-k cut below the entries; spliced
    into the chunk after a text that itself holds the placeholder."""
    import random

    from server.serving import _PLACEHOLDER, Job, OpenAIServing, _dumps, _with_logprobs, sse

    strings = [" the", '"q"', "\\", "\n\x00", "東京", "🍣", " the", "\u2028"]

    class Tokenizer:
        def decode(self, ids: list[int]) -> str:
            return strings[ids[0] % len(strings)]

    serving = OpenAIServing(ServerConfig(), Tokenizer(), client=None, metrics=Metrics(),
                            request_logger=RequestLogger(log_text=False), model_name="m")
    rng = random.Random(3)
    for k in (0, 1, 3, 8):
        job = Job(kind="chat", request_id="c", model="m", created=0, arrival=0.0, prompts=[[1]], prompt_texts=["p"],
                  params={}, n=1, stream=True, include_usage=False, echo=False, logprobs=k,
                  record=RequestRecord("c", "chat"))
        token_ids = [rng.randrange(100) for _ in range(3)]
        entries = [[[t, rng.choice([-rng.random() * 5, float("-inf"), 0.0])] for t in rng.sample(range(100), 8)]
                   + [[tid, -rng.random()]] for tid in token_ids]
        json_text = serving._chat_logprobs_json(job, token_ids, entries)
        assert json_text == _dumps(serving._chat_logprobs(job, token_ids, entries))
        text = "a" + _PLACEHOLDER + "b"
        line = _with_logprobs(sse(serving._chat_chunk(job, 0, {"content": text}, _PLACEHOLDER, None)), json_text)
        assert line == sse(serving._chat_chunk(job, 0, {"content": text}, serving._chat_logprobs(job, token_ids, entries),
                                               None))


def test_long_prompts_are_tokenized_off_the_event_loop():
    """A text past TOKENIZE_INLINE_CHARS is encoded on the tokenizer thread (the event loop
    keeps serving streams meanwhile), a short one inline; both give the tokenizer's ids with
    the caller's add_special_tokens."""
    import threading

    from server.serving import TOKENIZE_INLINE_CHARS, OpenAIServing

    class Tokenizer:
        def __init__(self) -> None:
            self.calls: list[tuple[str, bool]] = []

        def encode(self, text: str, add_special_tokens: bool = True) -> list[int]:
            self.calls.append((threading.current_thread().name, add_special_tokens))
            return [len(text), int(add_special_tokens)]

    tokenizer = Tokenizer()
    serving = OpenAIServing(ServerConfig(), tokenizer, client=None, metrics=Metrics(),
                            request_logger=RequestLogger(log_text=False), model_name="m")

    async def run() -> list[list[int]]:
        loop_thread = threading.current_thread().name
        out = [await serving._encode("x" * TOKENIZE_INLINE_CHARS),
               await serving._encode("y" * (TOKENIZE_INLINE_CHARS + 1), add_special_tokens=False)]
        assert tokenizer.calls[0][0] == loop_thread
        # Many short prompts together are long: a thousand inline stalled the loop 1.5 s.
        out += await serving._encode_all(["z" * 10] * (TOKENIZE_INLINE_CHARS // 10 + 1))
        return out

    assert asyncio.run(run())[:3] == [[TOKENIZE_INLINE_CHARS, 1], [TOKENIZE_INLINE_CHARS + 1, 0], [10, 1]]
    assert tokenizer.calls[1] == ("stoke-tokenizer_0", False)
    assert {name for name, _ in tokenizer.calls[2:]} == {"stoke-tokenizer_0"}


def test_requests_take_the_generation_configs_sampling_where_they_set_none():
    """What the worker reports of the model's generation config fills what a request leaves
    unset (max_new_tokens caps the default max_tokens); what it sets stays."""
    import types

    from engine.default_model import default_model_path
    from server.engine_client import WorkerInfo
    from server.protocol import ChatCompletionRequest, CompletionRequest
    from server.serving import OpenAIServing
    from transformers import AutoTokenizer

    default = {"temperature": 0.6, "top_p": 0.9, "top_k": 20, "repetition_penalty": 1.1, "max_tokens": 8}
    client = types.SimpleNamespace(info=WorkerInfo("m", 1000, 49152, 16, 16, default, 256))
    serving = OpenAIServing(ServerConfig(), AutoTokenizer.from_pretrained(default_model_path()), client=client,
                            metrics=Metrics(), request_logger=RequestLogger(log_text=False), model_name="m")

    def params(job_for, req) -> dict:
        return asyncio.run(job_for(req, RequestRecord("r", "x"), 0.0)).params

    unset = params(serving.completion_job, CompletionRequest(prompt=[1, 2, 3]))
    assert {k: unset[k] for k in default} == default and unset["min_p"] == 0.0
    chat = params(serving.chat_job, ChatCompletionRequest(messages=[{"role": "user", "content": "hi"}]))
    assert {k: chat[k] for k in default} == default
    explicit = params(serving.completion_job, CompletionRequest(prompt=[1, 2, 3], temperature=0.0, top_p=1.0, top_k=0,
                                                                repetition_penalty=1.0, max_tokens=50))
    assert {k: explicit[k] for k in default} == {"temperature": 0.0, "top_p": 1.0, "top_k": 0,
                                                 "repetition_penalty": 1.0, "max_tokens": 50}
    client.info.default_sampling = {}  # --generation-config none, or a model without advice
    plain = params(serving.completion_job, CompletionRequest(prompt=[1, 2, 3]))
    assert (plain["temperature"], plain["top_p"], plain["top_k"], plain["max_tokens"]) == (1.0, 1.0, 0, 16)
    # A chat without max_tokens may run to the end of the context, or of the KV pool where
    # that holds less (here 256 tokens of a 1,000-token context): never a request refused.
    messages = [{"role": "user", "content": "hi"}]
    tokenizer = serving.tokenizer
    prompt = tokenizer.encode(tokenizer.apply_chat_template(messages, tokenize=False, add_generation_prompt=True),
                              add_special_tokens=False)
    assert params(serving.chat_job, ChatCompletionRequest(messages=messages))["max_tokens"] == 256 - len(prompt)
    # The caps come before any prompt is tokenized (a thousand prompts were, before n=17's 400).
    serving.tokenizer = None  # encoding now fails with another message
    with pytest.raises(errors.APIError, match="n must be <= 16"):
        asyncio.run(serving.completion_job(CompletionRequest(prompt=["hi"] * 1000, n=17), RequestRecord("r", "x"), 0.0))


def test_a_chat_history_with_tool_calls_reaches_the_template():
    """A history's tool calls and tool results reach the chat template with their fields (as
    vLLM passes them), each call's JSON arguments parsed; the rest renders as before."""
    from engine.default_model import default_model_path
    from server.protocol import ChatCompletionRequest, TokenizeRequest
    from server.serving import OpenAIServing
    from transformers import AutoTokenizer

    tokenizer = AutoTokenizer.from_pretrained(default_model_path())
    tokenizer.chat_template = (
        "{% for m in messages %}{{ m.role }}: {{ m.content }}"
        "{% for c in m.tool_calls or [] %} call {{ c.id }} {{ c.function.name }}({{ c.function.arguments.city }})"
        "{% endfor %}{% if m.tool_call_id %} for {{ m.tool_call_id }}{% endif %}{{ '\\n' }}{% endfor %}")
    serving = OpenAIServing(ServerConfig(), tokenizer, client=None, metrics=Metrics(gpu=False),
                            request_logger=RequestLogger(log_text=False), model_name="m")
    call = {"id": "c1", "type": "function", "function": {"name": "weather", "arguments": '{"city": "Paris"}'}}
    req = ChatCompletionRequest(messages=[
        {"role": "user", "content": "Weather in Paris?"},
        {"role": "assistant", "content": None, "tool_calls": [call]},
        {"role": "tool", "tool_call_id": "c1", "content": "sunny"}], add_generation_prompt=False)
    assert serving._render_chat(req) == ("user: Weather in Paris?\nassistant:  call c1 weather(Paris)\n"
                                         "tool: sunny for c1\n")
    # A request's tools reach it too (a chat's and /tokenize's alike), as vLLM passes them.
    tokenizer.chat_template = "{% for t in tools or [] %}{{ t.function.name }};{% endfor %}{{ messages[0].content }}"
    tools = [{"type": "function", "function": {"name": "weather"}}, {"type": "function", "function": {"name": "time"}}]
    for make in (ChatCompletionRequest, TokenizeRequest):
        assert serving._render_chat(make(messages=[{"role": "user", "content": "hi"}], tools=tools)) == \
            "weather;time;hi"


def test_a_requests_own_chat_template_needs_a_server_that_trusts_it():
    """vLLM's request `chat_template` (a chat's and /tokenize's): a 400 naming the flag unless
    the server runs with --trust-request-chat-template; then the request's template renders it,
    its Jinja errors a 400 too."""
    from engine.default_model import default_model_path
    from server.errors import APIError
    from server.protocol import ChatCompletionRequest, TokenizeRequest
    from server.serving import OpenAIServing
    from transformers import AutoTokenizer

    tokenizer = AutoTokenizer.from_pretrained(default_model_path())
    own = "{% for m in messages %}[{{ m.role }}] {{ m.content }}{% endfor %}{% if add_generation_prompt %}>{% endif %}"
    messages = [{"role": "user", "content": "hi"}]
    for trusted in (False, True):
        serving = OpenAIServing(ServerConfig(trust_request_chat_template=trusted), tokenizer, client=None,
                                metrics=Metrics(gpu=False), request_logger=RequestLogger(log_text=False),
                                model_name="m")
        for make in (ChatCompletionRequest, TokenizeRequest):
            assert serving._render_chat(make(messages=messages)).startswith("<|im_start|>")  # the tokenizer's
            if not trusted:
                with pytest.raises(APIError) as info:
                    serving._render_chat(make(messages=messages, chat_template=own))
                assert info.value.status == 400 and info.value.param == "chat_template"
                assert "--trust-request-chat-template" in info.value.message
                continue
            assert serving._render_chat(make(messages=messages, chat_template=own)) == "[user] hi>"
            with pytest.raises(APIError) as info:
                serving._render_chat(make(messages=messages, chat_template="{% for %}"))
            assert info.value.status == 400 and "chat template error" in info.value.message


@pytest.mark.parametrize("answer", ["abort output", "worker death", "no answer"])
def test_a_cut_short_requests_line_waits_for_the_workers_abort(answer, caplog, monkeypatch):
    """The line of a request cut short (here: the client left) is written once the worker's
    abort output is in, with the engine's times and the tokens made before the cut; or when
    the worker dies; or, should the worker never answer, after ABORT_LOG_GRACE_S. Its error
    is counted at once either way."""
    from server import serving as serving_module
    from server.engine_client import EngineDeadError, Generation
    from server.serving import Job, OpenAIServing

    monkeypatch.setattr(serving_module, "ABORT_LOG_GRACE_S", 0.05)

    class Client:
        def __init__(self) -> None:
            self.aborted: list[str] = []

        def abort(self, ids: list[str]) -> None:
            self.aborted.extend(ids)

    async def run() -> tuple[list[str], Metrics]:
        metrics = Metrics(gpu=False)
        serving = OpenAIServing(ServerConfig(), None, client=None, metrics=metrics,
                                request_logger=RequestLogger(log_text=False), model_name="m")
        record = RequestRecord("cmpl-1", "completions")
        job = Job(kind="completion", request_id="cmpl-1", model="m", created=0, arrival=0.0, prompts=[[1, 2, 3]],
                  prompt_texts=["p"], params={}, n=1, stream=True, include_usage=False, echo=False, logprobs=None,
                  record=record)
        client = Client()
        generation = Generation(client=client, ids=["e-0"])
        serving._choices(job)
        serving._absorb(job, job.choices, 0, _frame("e-0", 0, "He", [5], 1), job.cached)
        serving._abort(job, generation)
        serving.cancelled(record)
        assert client.aborted == ["e-0"] and not caplog.records  # counted, not yet written
        if answer == "abort output":
            out = _frame("e-0", 0, "llo", [6], 2, "abort")
            out["metrics"] = {"arrival_time": 10.0, "first_scheduled_time": 10.5, "first_token_time": 11.0,
                              "finish_time": 12.0, "inter_token_latencies": [1.0]}
            generation._deliver(0, out)
        elif answer == "worker death":
            generation._fail(EngineDeadError("gone"))
        else:
            await asyncio.sleep(0.2)
        return [r.getMessage() for r in caplog.records], metrics

    with caplog.at_level(logging.INFO, logger="stoke.requests"):
        messages, metrics = asyncio.run(run())
    assert len(messages) == 1
    line = json.loads(messages[0])
    assert (line["status"], line["error_type"]) == (499, "aborted")
    assert metrics.errors.labels("aborted")._value.get() == 1
    if answer == "abort output":
        assert line["completion_tokens"] == 2 and line["finish_reason"] == "abort"
        assert (line["queue_time_s"], line["ttft_s"], line["e2e_s"]) == (0.5, 1.0, 2.0)
    else:
        assert line["completion_tokens"] == 1 and line["queue_time_s"] is None and line["e2e_s"] is None


def test_token_bytes_join_to_the_texts_utf8(default_model_dir: str) -> None:
    """A token's own bytes (chat logprobs' `bytes`), also for tokens that are parts of a
    character: byte-level BPE (the default model) and SentencePiece byte fallback."""
    from tokenizers import Tokenizer, decoders, models
    from transformers import AutoTokenizer, PreTrainedTokenizerFast

    from engine.token_bytes import token_bytes_reader

    byte_level = AutoTokenizer.from_pretrained(default_model_dir)
    read = token_bytes_reader(byte_level)
    for text in ("🌍 日本語 ok", "naïve café", "plain ascii", "<|im_end|> after"):
        ids = byte_level.encode(text, add_special_tokens=False)
        assert b"".join(read(i, byte_level.decode([i])) for i in ids) == text.encode(), text
    pieces = ["<unk>", "</s>", "▁Hello", "<0xF0>", "<0x9F>", "<0x98>", "<0x80>", "!"]
    backend = Tokenizer(models.WordLevel({p: i for i, p in enumerate(pieces)}, unk_token="<unk>"))
    backend.decoder = decoders.Sequence([decoders.Replace("▁", " "), decoders.ByteFallback(), decoders.Fuse(),
                                         decoders.Strip(" ", 1, 0)])
    fallback = PreTrainedTokenizerFast(tokenizer_object=backend, eos_token="</s>")
    read = token_bytes_reader(fallback)
    ids = [3, 4, 5, 6, 7]  # 😀 in four byte tokens, then "!"
    assert [read(i, fallback.decode([i])) for i in ids] == [b"\xf0", b"\x9f", b"\x98", b"\x80", b"!"]


def test_a_stream_left_after_its_last_output_is_logged_and_settled():
    """The client leaves after the engine's last output came in but before the stream's last
    chunks went out: the request was never logged, and its hold on the key's cost cap never
    given back."""
    from server.engine_client import Generation
    from server.serving import Job, OpenAIServing

    config = ServerConfig(price_prompt=1000.0, price_completion=1000.0, cost_cap=1.0)
    serving = OpenAIServing(config, None, client=None, metrics=Metrics(gpu=False),
                            request_logger=RequestLogger(log_text=False), model_name="m")
    record = RequestRecord("cmpl-1", "completions", prompt_tokens=3)
    record._reservation = serving.limits.admit("", 3, 10)
    job = Job("completion", "cmpl-1", "m", 0, 0.0, [[1, 2, 3]], ["p"], {"max_tokens": 10}, 1, True, True, False,
              None, record)
    async def leave_after_the_finish_chunk() -> None:
        generation = Generation(client=None, ids=["e-0"])
        generation.queue.put_nowait((0, _engine_output("e-0", True, (0, 1, "length"))))
        stream = serving._stream(job, generation)
        async for line in stream:
            if '"finish_reason":"length"' in line:
                break
        await stream.aclose()
        assert generation.finished
        serving._close(job, generation, lambda: None)

    asyncio.run(leave_after_the_finish_chunk())
    assert (record._done, record.status, record.completion_tokens) == (True, 499, 1)
    budget = record._reservation.budget
    assert record._reservation.settled and budget.in_flight == 0 and budget.reserved == 0.0
    assert budget.spent == pytest.approx(0.004)


def test_a_chat_of_many_content_parts_is_rendered_off_the_event_loop():
    import threading

    from server.protocol import ChatCompletionRequest
    from server.serving import RENDER_INLINE_MESSAGES, OpenAIServing

    class Tokenizer:
        chat_template = "t"
        threads: list[str] = []

        def apply_chat_template(self, messages, tokenize, **kwargs) -> str:
            self.threads.append(threading.current_thread().name)
            return "|".join(m["content"] for m in messages)

    serving = OpenAIServing(ServerConfig(), Tokenizer(), client=None, metrics=Metrics(gpu=False),
                            request_logger=RequestLogger(log_text=False), model_name="m")
    few = ChatCompletionRequest(messages=[{"role": "user", "content": [{"type": "text", "text": "a"}]}])
    many = ChatCompletionRequest(messages=[{"role": "user", "content": [{"type": "text", "text": "a"}] *
                                            (RENDER_INLINE_MESSAGES + 1)}])

    async def render() -> list[str]:
        return [await serving._chat_text(few), await serving._chat_text(many)]

    assert asyncio.run(render()) == ["a", "\n".join(["a"] * (RENDER_INLINE_MESSAGES + 1))]
    assert Tokenizer.threads[0] == "MainThread" and Tokenizer.threads[1].startswith("stoke-tokenizer")



@pytest.mark.parametrize("scheduled", [False, True])
def test_a_request_is_charged_once_the_engine_started_it(scheduled: bool):
    """Aborted in the queue (the client left, a timeout): no tokens were computed, no cost; once
    scheduled, its prompt is charged."""
    from server.serving import OpenAIServing

    serving = OpenAIServing(ServerConfig(price_prompt=1e6, cost_cap=100.0), None, client=None,
                            metrics=Metrics(gpu=False), request_logger=RequestLogger(log_text=False), model_name="m")
    record = RequestRecord("cmpl-1", "completions", prompt_tokens=3)
    record._reservation = serving.limits.admit("", 3, 10)
    record.add_engine_metrics({"arrival_time": 1.0, "first_scheduled_time": 1.5 if scheduled else None,
                               "first_token_time": None, "finish_time": 2.0, "inter_token_latencies": []})
    serving.finish(record, status=499, error_type="aborted")
    assert record.cost == (3.0 if scheduled else 0.0) and record._reservation.budget.spent == record.cost
    died = RequestRecord("cmpl-2", "completions", prompt_tokens=3, completion_tokens=2)  # no engine times
    died._reservation = serving.limits.admit("", 3, 10)
    serving.finish(died, status=503, error_type="internal")
    assert died.cost == 3.0  # tokens came: the engine had started it (price_completion is 0 here)


def test_keys_cors_and_early_disconnects_in_process(caplog):
    """Without the worker (no lifespan): a CORS preflight needs no key, a 401 carries the CORS
    headers, and a client gone before its whole body came is logged as aborted (499)."""
    from fastapi.testclient import TestClient

    from server.api import create_app

    origin = "https://chat.example.com"
    app = create_app(ServerConfig(api_keys=["k1"], allowed_origins=[origin]), model_path="/m")
    client = TestClient(app)
    preflight = client.options("/v1/completions", headers={
        "Origin": origin, "Access-Control-Request-Method": "POST", "Access-Control-Request-Headers": "authorization"})
    assert preflight.status_code == 200 and preflight.headers["access-control-allow-origin"] == origin
    refused = client.post("/v1/completions", json={"prompt": "hi"}, headers={"Origin": origin})
    assert refused.status_code == 401 and refused.headers["access-control-allow-origin"] == origin

    messages = iter([{"type": "http.request", "body": b'{"prompt": ', "more_body": True},
                     {"type": "http.disconnect"}])

    async def receive():
        return next(messages)

    async def send(message):
        raise AssertionError("nothing is sent to a client that left")

    scope = {"type": "http", "method": "POST", "path": "/v1/completions", "query_string": b"", "root_path": "",
             "headers": [(b"authorization", b"Bearer k1")], "scheme": "http", "server": ("127.0.0.1", 8000)}
    with caplog.at_level(logging.INFO, logger="stoke.requests"):
        asyncio.run(app(scope, receive, send))
    line = json.loads(caplog.records[-1].getMessage())
    assert (line["status"], line["error_type"]) == (499, "aborted")


def test_tool_call_content_is_alike_whole_and_streamed():
    """The server's tool call reading (`_read_tool_calls`) gives a whole body the content a
    stream sends, whitespace included; None where only calls were made (vLLM's)."""
    import types

    from server.serving import Choice, OpenAIServing

    serving = OpenAIServing(ServerConfig(), None, client=None, metrics=Metrics(gpu=False),
                            request_logger=RequestLogger(log_text=False), model_name="m")
    job = types.SimpleNamespace(tool_parser="hermes", parallel_tool_calls=True,
                                new_tool_parser=lambda: ToolCallParser("hermes"))
    call = '<tool_call>{"name": "f", "arguments": {}}</tool_call>'
    for text, content in (("\n\n" + call, "\n\n"), (call, None), ("Hi " + call + "\n", "Hi ")):
        whole = Choice(0)
        serving._read_tool_calls(job, whole, text, final=True)
        streamed, sent, pieces = Choice(1), "", [text[i:i + 3] for i in range(0, len(text), 3)]
        for i, piece in enumerate(pieces):
            sent += serving._read_tool_calls(job, streamed, piece, final=i == len(pieces) - 1)[0]
        assert whole.content == streamed.content == content and sent == (content or "")
        assert [c["function"]["name"] for c in whole.tool_calls] == ["f"] and whole.finish_reason == "tool_calls"


def test_a_request_for_an_adapter_unloaded_before_it_runs_is_a_404():
    """The adapter a request names is taken when its model is checked; if it was unloaded (or
    unloaded and loaded again, other weights under the name) before the request reaches the
    engine, the request is a 404, never run on the base model, or on other weights, in its name."""
    import types

    from server.engine_client import WorkerInfo
    from server.protocol import CompletionRequest
    from server.serving import OpenAIServing

    calls = []

    async def call(message):
        calls.append(message)
        return None

    client = types.SimpleNamespace(info=WorkerInfo("m", 1000, 49152, 16, 16, {}, 256), call=call,
                                   generate=lambda *a: pytest.fail("the request reached the engine"))
    config = ServerConfig(lora_modules=[("a", "/adapters/a")], allow_runtime_lora_updating=True)
    serving = OpenAIServing(config, None, client=client, metrics=Metrics(gpu=False),
                            request_logger=RequestLogger(log_text=False), model_name="m")
    job = asyncio.run(serving.completion_job(CompletionRequest(model="a", prompt=[1, 2, 3], max_tokens=2),
                                             RequestRecord("r", "x"), 0.0))
    assert job.lora == ["a", 1, "/adapters/a"] and job.model == "a"
    asyncio.run(serving.unload_lora_adapter("a"))
    with pytest.raises(errors.APIError) as info:
        asyncio.run(serving.run(job, None))
    assert info.value.status == 404 and info.value.code == "model_not_found"
    asyncio.run(serving.load_lora_adapter("a", "/adapters/other"))  # the name again, other weights
    assert serving.loras["a"] == ["a", 2, "/adapters/other"]
    with pytest.raises(errors.APIError) as info:
        asyncio.run(serving.run(job, None))
    assert info.value.status == 404 and serving.in_flight == 0
    assert [c["type"] for c in calls] == ["unload_lora", "load_lora"]


def test_the_worker_reads_an_adapter_off_its_step_loop(tiny_checkpoints, tmp_path, monkeypatch):
    """A runtime load_lora: the adapter is read (disk, digest, checks: long for a large one) on
    the worker's command thread, so the step loop goes on meanwhile; the loop only pins what was
    read, and answers. A bad adapter is an answer too, and the worker keeps running."""
    import gc
    import threading

    import engine.lora
    from server.worker import Worker
    from tests.lora_adapters import save_adapter

    threads = []
    read = engine.lora.load_adapter

    def load_adapter(*args, **kwargs):
        threads.append(threading.current_thread().name)
        return read(*args, **kwargs)

    monkeypatch.setattr(engine.lora, "load_adapter", load_adapter)
    to_worker, from_worker = os.pipe(), os.pipe()
    worker = Worker(FrameReader(to_worker[0]), FrameWriter(from_worker[1]))
    worker.start({"engine": {"model": tiny_checkpoints["llama"], "num_kv_blocks": 16, "enable_lora": True,
                             "max_lora_rank": 4}})
    loop = threading.Thread(target=worker.run)
    loop.start()
    writer, reader = FrameWriter(to_worker[1]), FrameReader(from_worker[0])
    good = save_adapter(str(tmp_path / "good"), tiny_checkpoints["llama"], rank=4, modules=["q_proj"])
    try:
        writer.write({"type": "load_lora", "call": 7, "lora": ["good", 1, good]})
        writer.write({"type": "load_lora", "call": 8, "lora": ["bad", 2, str(tmp_path)]})
        answers = {}
        while len(answers) < 2:
            for answer in reader.read().get("calls", ()):
                answers[answer["call"]] = answer["error"]
        assert answers[7] is None and "has no adapter_config.json" in answers[8]
        assert threads == ["stoke-worker-commands", "stoke-worker-commands"], threads
        assert worker.engine.list_loras() == {1} and worker.engine.loras.pinned == {1}
        writer.write({"type": "shutdown"})
        loop.join(30)
        assert not loop.is_alive()
    finally:
        writer.close()
        reader.close()
        gc.unfreeze()  # the worker froze this process's heap, as it does its own


@pytest.mark.parametrize("include_reasoning", [True, False])
def test_a_streamed_reasoning_keeps_every_tokens_logprobs(include_reasoning: bool):
    """A chat stream on a reasoning server: reasoning deltas, then content; each token's
    logprobs go out once, on the chunk of its frame (on the reasoning delta where the frame's
    text was all reasoning), also when the reasoning itself is left out; the usage counts the
    tokens spent thinking, tags included."""
    import types

    from engine.reasoning import FIRST
    from server.serving import Job, OpenAIServing

    class Tokenizer:
        def decode(self, ids: list[int]) -> str:
            return f"<{ids[0]}>"

    frames = [("<think>Let", [51, 52]), (" me", [53]), ("</think>Hi", [54, 55]), ("!", [56])]

    class Frames:  # one output frame a batch, as a stream that keeps up with the engine gets them
        async def batches(self):
            done = 0
            for i, (text, ids) in enumerate(frames):
                done += len(ids)
                yield [(0, _frame("e-0", 0, text, ids, done, "stop" if i == len(frames) - 1 else None,
                                  [[[t, -0.5]] for t in ids]))]

    async def run() -> list[dict]:
        serving = OpenAIServing(ServerConfig(), Tokenizer(), client=None, metrics=Metrics(gpu=False),
                                request_logger=RequestLogger(log_text=False), model_name="m")
        serving.reasoning = types.SimpleNamespace(start_id=51, end_id=54)  # the tags' ids here
        job = Job(kind="chat", request_id="c", model="m", created=0, arrival=0.0, prompts=[[1, 2, 3]],
                  prompt_texts=["p"], params={}, n=1, stream=True, include_usage=True, echo=False, logprobs=0,
                  record=RequestRecord("c", "chat"))
        job.reasoning_opening, job.include_reasoning = FIRST, include_reasoning
        lines = [line async for line in serving._stream(job, Frames())]
        return [json.loads(line[len("data: "):]) for line in lines if line != "data: [DONE]\n\n"]

    chunks = asyncio.run(run())
    deltas = [c["choices"][0] for c in chunks if c["choices"]]
    assert deltas[0]["delta"] == {"role": "assistant", "content": ""}
    reasoning = "".join(d["delta"].get("reasoning", "") for d in deltas)
    assert reasoning == ("Let me" if include_reasoning else "")
    assert all(d["delta"].get("reasoning_content") == d["delta"].get("reasoning") for d in deltas)
    assert "".join(d["delta"].get("content") or "" for d in deltas) == "Hi!"
    tokens = [e["token"] for d in deltas if d["logprobs"] for e in d["logprobs"]["content"]]
    assert tokens == [f"<{t}>" for _, ids in frames for t in ids]
    assert len(deltas) == 5 and deltas[-1]["finish_reason"] == "stop"
    assert chunks[-1]["usage"]["completion_tokens_details"] == {"reasoning_tokens": 4}
