"""Metrics under load, and cancellation: a real `stoke serve` with max_num_seqs=8, with async
scheduling (the default on CUDA), so its worker runs a step ahead of the outputs it sends.

Cancellation in the style of vLLM's test: many streams dropped after their first chunk must
leave nothing behind in the engine (no running or waiting request, no KV block in use), and
the server must go on serving promptly.
"""

from __future__ import annotations

import asyncio
import json
import socket
import threading
import time

import openai
import pytest

from tests.server_harness import ServerProcess, idle, wait_for

MAX_NUM_SEQS = 8


@pytest.fixture(scope="module")
def server():
    with ServerProcess("--kv-cache-memory-bytes", "256MiB", "--cpu-threads", "1",
                       "--max-num-seqs", str(MAX_NUM_SEQS), "--async-scheduling") as s:
        yield s


@pytest.fixture(scope="module")
def client(server):
    return server.client()


def delta(after: dict, before: dict, name: str) -> float:
    return after[name] - before[name]


def test_shared_prefix_raises_hit_counter(server, client):
    prefix = [(i * 7919) % 40000 + 1000 for i in range(300)]
    before = server.metrics()
    first = client.completions.create(model=None, prompt=prefix + [11, 12], max_tokens=2, temperature=0)
    second = client.completions.create(model=None, prompt=prefix + [13, 14], max_tokens=2, temperature=0)
    after = server.metrics()
    hits = after["stoke_prefix_cache_hits_tokens_total"] - before["stoke_prefix_cache_hits_tokens_total"]
    queries = after["stoke_prefix_cache_queries_tokens_total"] - before["stoke_prefix_cache_queries_tokens_total"]
    assert first.usage.prompt_tokens_details.cached_tokens == 0
    assert second.usage.prompt_tokens_details.cached_tokens == 288  # 18 full blocks of 16
    assert hits == 288 and queries == 2 * 302
    assert after["stoke_prompt_tokens_total"] - before["stoke_prompt_tokens_total"] == 2 * 302
    assert after["stoke_generation_tokens_total"] - before["stoke_generation_tokens_total"] == 4
    assert delta(after, before, 'stoke_requests_total{finish_reason="length"}') == 2
    assert after["stoke_time_to_first_token_seconds_count"] - before["stoke_time_to_first_token_seconds_count"] == 2
    assert after["stoke_step_batch_tokens_count"] > before["stoke_step_batch_tokens_count"]


def test_queue_depth_rises_beyond_max_num_seqs(server, client):
    peak = {"waiting": 0.0, "running": 0.0}
    done = threading.Event()

    def scrape() -> None:
        while not done.is_set():
            m = server.metrics()
            peak["waiting"] = max(peak["waiting"], m["stoke_requests_waiting"])
            peak["running"] = max(peak["running"], m["stoke_requests_running"])
            time.sleep(0.02)

    scraper = threading.Thread(target=scrape)
    scraper.start()

    async def burst() -> None:
        aclient = openai.AsyncOpenAI(base_url=server.base_url, api_key="unused", max_retries=0, timeout=120)
        try:
            await asyncio.gather(*(aclient.completions.create(model=None, prompt=f"Count to {i}:", max_tokens=6,
                                                              temperature=0, extra_body={"ignore_eos": True})
                                   for i in range(2 * MAX_NUM_SEQS)))
        finally:
            await aclient.close()

    try:
        asyncio.run(burst())
    finally:
        done.set()
        scraper.join()
    assert peak["waiting"] >= 1
    assert peak["running"] <= MAX_NUM_SEQS
    m = server.metrics()
    assert m["stoke_request_queue_time_seconds_count"] >= 2 * MAX_NUM_SEQS
    assert wait_for(lambda: idle(server), 10)


def test_dropped_streams_are_aborted_and_free_their_blocks(server, client):
    num_streams = 32
    before = server.metrics()

    async def drop_after_first_chunk(aclient: openai.AsyncOpenAI, i: int) -> str:
        stream = await aclient.chat.completions.create(
            model=None, messages=[{"role": "user", "content": f"Write a long story about robot number {i}."}],
            max_tokens=200, temperature=0.8, seed=i, stream=True, extra_body={"ignore_eos": True})
        async for chunk in stream:
            await stream.close()
            return chunk.id
        return ""

    async def main() -> list[str]:
        # One connection per stream, so closing one really drops it.
        aclient = openai.AsyncOpenAI(base_url=server.base_url, api_key="unused", max_retries=0, timeout=120)
        try:
            return await asyncio.gather(*(drop_after_first_chunk(aclient, i) for i in range(num_streams)))
        finally:
            await aclient.close()

    ids = asyncio.run(main())
    assert all(ids) and len(set(ids)) == num_streams
    assert wait_for(lambda: idle(server), 30), server.metrics()
    after = server.metrics()
    assert delta(after, before, 'stoke_request_errors_total{type="aborted"}') == num_streams
    assert delta(after, before, 'stoke_requests_total{finish_reason="abort"}') == num_streams
    # Far fewer tokens than 32 x 200 were generated: the engine stopped them.
    generated = after["stoke_generation_tokens_total"] - before["stoke_generation_tokens_total"]
    assert generated < num_streams * 20
    lines = [line for line in server.log_lines() if line["request_id"] in set(ids)]
    assert len(lines) == num_streams and all(line["status"] == 499 for line in lines)
    assert all(line["error_type"] == "aborted" and line["finish_reason"] == "abort" for line in lines)
    assert all(line["ttft_s"] > 0 for line in lines)  # each got its first token (the role chunk came with it)
    # The lines waited for the worker's abort: the engine's times, up to the abort.
    assert all(0 <= line["queue_time_s"] <= line["ttft_s"] <= line["e2e_s"] for line in lines), lines
    assert all(line["completion_tokens"] >= 1 for line in lines)

    start = time.monotonic()
    fresh = client.completions.create(model=None, prompt="Hello", max_tokens=4, temperature=0)
    assert fresh.usage.completion_tokens == 4 and time.monotonic() - start < 30


def test_a_request_dropped_while_queued_logs_its_wait(server, client):
    """Clients that leave while their request waits for a running slot: each line says how
    long it was queued (all its life), and nothing of them stays in the engine."""
    blockers = [client.completions.create(model=None, prompt=f"Count to a thousand, {i}.", max_tokens=400,
                                          extra_body={"ignore_eos": True}, stream=True)
                for i in range(MAX_NUM_SEQS)]
    assert wait_for(lambda: server.metrics()["stoke_requests_running"] == MAX_NUM_SEQS, 30)
    sockets, body = [], json.dumps({"prompt": "Hello there", "max_tokens": 8}).encode()
    for _ in range(2):
        sock = socket.create_connection(("127.0.0.1", server.port))
        sock.sendall(b"POST /v1/completions HTTP/1.1\r\nHost: x\r\nContent-Type: application/json\r\n"
                     b"Content-Length: %d\r\n\r\n%s" % (len(body), body))
        sockets.append(sock)
    assert wait_for(lambda: server.metrics()["stoke_requests_waiting"] == 2, 30)
    time.sleep(0.3)
    for sock in sockets:
        sock.close()
    assert wait_for(lambda: server.metrics()["stoke_requests_waiting"] == 0, 30)
    for stream in blockers:
        stream.close()
    assert wait_for(lambda: idle(server), 30)
    lines = [line for line in server.log_lines()[-(MAX_NUM_SEQS + 2):] if line["ttft_s"] is None]
    assert len(lines) == 2 and all(line["status"] == 499 and line["completion_tokens"] == 0 for line in lines)
    assert all(line["queue_time_s"] == line["e2e_s"] >= 0.3 for line in lines), lines


def test_non_streaming_disconnect_aborts(server):
    before = server.metrics()
    body = json.dumps({"prompt": "Tell me everything about the sea.", "max_tokens": 500, "ignore_eos": True}).encode()
    sock = socket.create_connection(("127.0.0.1", server.port))
    sock.sendall(b"POST /v1/completions HTTP/1.1\r\nHost: x\r\nContent-Type: application/json\r\n"
                 b"Content-Length: %d\r\n\r\n%s" % (len(body), body))
    assert wait_for(lambda: server.metrics()["stoke_requests_running"] == 1, 30)
    sock.close()
    assert wait_for(lambda: idle(server), 30)
    after = server.metrics()
    assert delta(after, before, 'stoke_request_errors_total{type="aborted"}') == 1
    assert after["stoke_generation_tokens_total"] - before["stoke_generation_tokens_total"] < 400


def test_serve_benchmark_against_the_server(server, tmp_path):
    """benchmarks/serve.py's load generator end to end, the load shared by two processes:
    streaming requests of exact lengths (with top logprobs), the latency summary, the load
    generators' own CPU, and the server's /metrics sampled through the run (no NVML here)."""
    from benchmarks.serve import main as serve_main

    assert serve_main(["--base-url", server.base_url, "--num-requests", "6", "--prompt-len", "8:24",
                       "--output-len", "3:6", "--client-processes", "2", "--logprobs", "2", "--urgent-fraction", "0.5",
                       "--out-dir", str(tmp_path), "--name", "load"]) == 0
    run = json.loads((tmp_path / "load.json").read_text())["runs"]["stoke"]
    s = run["summary"]
    assert (s["completed"], s["failed"]) == (6, 0) and len(run["records"]) == 6
    assert 0 < s["client_cpu_busy"] <= 1.5 and s["client_cpu_us_per_token"] > 0
    assert s["output_tokens"] == sum(r["output_len_requested"] for r in run["records"])
    assert s["tokens_per_chunk"] >= 1.0 and all(r["chunks"] >= 1 for r in run["records"])
    assert s["p99_ttft_ms"] > 0 and s["p50_itl_ms"] > 0
    assert s["gpu_utilization_mean"] is None and s["gpu_utilization_samples"] == 0
    urgent = sum(r["urgent"] for r in run["records"])  # latencies per class (no priority sent: fcfs)
    assert 0 < urgent < 6 and (s["urgent_completed"], s["others_completed"]) == (urgent, 6 - urgent)
    assert s["urgent_p99_ttft_ms"] > 0 and s["others_p99_e2e_ms"] > 0


def test_serve_benchmark_sends_embeddings(server, tmp_path):
    """benchmarks/serve.py --endpoint embeddings: each prompt one /v1/embeddings request (base64,
    as the SDK asks), prompt tokens/s and end-to-end latencies, nothing generated."""
    from benchmarks.serve import main as serve_main

    before = server.metrics()
    assert serve_main(["--base-url", server.base_url, "--endpoint", "embeddings", "--num-requests", "5",
                       "--prompt-len", "8:40", "--concurrency", "2", "--out-dir", str(tmp_path), "--name", "embed"]) == 0
    run = json.loads((tmp_path / "embed.json").read_text())["runs"]["stoke"]
    s = run["summary"]
    assert (s["completed"], s["failed"], s["output_tokens"]) == (5, 0, 0)
    assert s["prompt_token_throughput"] > 0 and s["p99_e2e_ms"] > 0 and s["p50_ttft_ms"] == s["p50_e2e_ms"]
    after = server.metrics()
    assert after["stoke_generation_tokens_total"] == before["stoke_generation_tokens_total"]
