"""Event-loop stalls of the HTTP process while long text prompts arrive: /health latency.

Usage: start `stoke serve` (e.g. the tiny dummy model of benchmarks.host_overhead.checkpoint_dir
with the default tokenizer) on PORT, then `python loop_lag.py PORT`.
"""
import http.client, json, statistics, sys, threading, time
port = int(sys.argv[1])
text = "The quick brown fox jumps over the lazy dog. " * 340  # ~15k chars, ~3.4k tokens
lat, stop = [], threading.Event()
def probe():
    conn = http.client.HTTPConnection("127.0.0.1", port)
    while not stop.is_set():
        t = time.perf_counter(); conn.request("GET", "/health"); conn.getresponse().read(); lat.append(time.perf_counter() - t)
        time.sleep(0.002)
def post():
    conn = http.client.HTTPConnection("127.0.0.1", port, timeout=600)
    conn.request("POST", "/v1/completions", json.dumps({"prompt": text, "max_tokens": 1}), {"Content-Type": "application/json"})
    r = conn.getresponse(); r.read(); assert r.status == 200, r.status
p = threading.Thread(target=probe); p.start(); time.sleep(1.0)
base = list(lat); lat.clear()
for _ in range(3):
    ts = [threading.Thread(target=post) for _ in range(8)]
    for t in ts: t.start()
    for t in ts: t.join()
stop.set(); p.join()
q = sorted(lat)
print(f"idle p99 {sorted(base)[int(len(base)*0.99)]*1e3:.2f} ms | under long prompts: n {len(q)} median {statistics.median(q)*1e3:.2f} p99 {q[int(len(q)*0.99)]*1e3:.2f} max {q[-1]*1e3:.2f} ms")
