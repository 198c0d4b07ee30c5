"""Event-loop stalls of the HTTP process while long text prompts arrive: /health latency.

Usage: start `stoke serve` (e.g. the tiny dummy model of benchmarks.host_overhead.checkpoint_dir
with the default tokenizer) on PORT, then `python loop_lag.py PORT`.
"""

import http.client
import json
import statistics
import sys
import threading
import time

PORT = int(sys.argv[1])
TEXT = "The quick brown fox jumps over the lazy dog. " * 340  # ~15k characters, ~3.4k tokens


def probe(latencies: list[float], stop: threading.Event) -> None:
    conn = http.client.HTTPConnection("127.0.0.1", PORT)
    while not stop.is_set():
        t = time.perf_counter()
        conn.request("GET", "/health")
        conn.getresponse().read()
        latencies.append(time.perf_counter() - t)
        time.sleep(0.002)


def post() -> None:
    conn = http.client.HTTPConnection("127.0.0.1", PORT, timeout=600)
    conn.request("POST", "/v1/completions", json.dumps({"prompt": TEXT, "max_tokens": 1}),
                 {"Content-Type": "application/json"})
    response = conn.getresponse()
    response.read()
    assert response.status == 200, response.status


def p99(values: list[float]) -> float:
    return sorted(values)[int(len(values) * 0.99)]


latencies: list[float] = []
stop = threading.Event()
prober = threading.Thread(target=probe, args=(latencies, stop))
prober.start()
time.sleep(1.0)
idle = list(latencies)
latencies.clear()
for _ in range(3):  # bursts of 8 long prompts
    posts = [threading.Thread(target=post) for _ in range(8)]
    for t in posts:
        t.start()
    for t in posts:
        t.join()
stop.set()
prober.join()
print(f"idle p99 {p99(idle) * 1e3:.2f} ms | under long prompts: n {len(latencies)} "
      f"median {statistics.median(latencies) * 1e3:.2f} p99 {p99(latencies) * 1e3:.2f} "
      f"max {max(latencies) * 1e3:.2f} ms")
