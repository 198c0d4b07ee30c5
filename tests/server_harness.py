"""A real `stoke serve` process on 127.0.0.1 (free port) for the server tests."""

from __future__ import annotations

import json
import os
import re
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import time
import urllib.error
import urllib.request
from typing import Any

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
_SAMPLE = re.compile(r"^([a-zA-Z_:][a-zA-Z0-9_:]*)(\{[^}]*\})?\s+(\S+)$")


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def wait_for(predicate, timeout: float = 60.0, interval: float = 0.1):
    """predicate's first true value within timeout seconds (polled), else its last value."""
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        value = predicate()
        if value:
            return value
        time.sleep(interval)
    return predicate()


def sdk_post(client: Any, path: str, body: dict[str, Any]) -> Any:
    """The `openai` SDK's generic POST (it has no score, rerank or classify methods) at the
    server's root (`path` without /v1: vLLM's paths), the JSON back; an error status raises the
    SDK's error, as its own methods do."""
    root = str(client.base_url).removesuffix("/").removesuffix("/v1")
    return client.post(root + path, body=body, cast_to=object)


def idle(server: ServerProcess) -> bool:
    """Nothing running or waiting in the server's engine, and no KV block in use."""
    m = server.metrics()
    return m["stoke_requests_running"] == 0 and m["stoke_requests_waiting"] == 0 and \
        m["stoke_kv_cache_usage_ratio"] == 0


class ServerProcess:
    def __init__(self, *args: str, ready_timeout: float = 240.0) -> None:
        self.args = list(args)
        self.ready_timeout = ready_timeout
        self.port = free_port()
        self.dir = tempfile.mkdtemp(prefix="stoke-server-test-")
        self.stdout_path = os.path.join(self.dir, "stdout.log")
        self.stderr_path = os.path.join(self.dir, "stderr.log")
        self.proc: subprocess.Popen | None = None

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self.port}"

    @property
    def base_url(self) -> str:
        return self.url + "/v1"

    def start(self, wait: str = "/ready") -> ServerProcess:
        """Launch, and return once `wait` answers 200 ("/health": HTTP up, the model may still load)."""
        with open(self.stdout_path, "wb") as out, open(self.stderr_path, "wb") as err:
            self.proc = subprocess.Popen(
                [sys.executable, "-m", "server", "--host", "127.0.0.1", "--port", str(self.port), *self.args],
                cwd=REPO, stdout=out, stderr=err, stdin=subprocess.DEVNULL,
            )
        deadline = time.monotonic() + self.ready_timeout
        while time.monotonic() < deadline:
            if self.proc.poll() is not None:
                raise RuntimeError(f"server exited with {self.proc.returncode}:\n{self.stderr()[-4000:]}")
            status, _ = self.get(wait)
            if status == 200:
                return self
            time.sleep(0.2)
        self.stop(signal.SIGKILL)
        raise RuntimeError(f"server not ready after {self.ready_timeout}s:\n{self.stderr()[-4000:]}")

    def get(self, path: str, timeout: float = 10.0) -> tuple[int | None, bytes]:
        try:
            with urllib.request.urlopen(self.url + path, timeout=timeout) as r:
                return r.status, r.read()
        except urllib.error.HTTPError as e:
            return e.code, e.read()
        except OSError:
            return None, b""

    def metrics(self) -> dict[str, float]:
        """Every sample of /metrics: {'name{labels}': value}."""
        status, body = self.get("/metrics")
        assert status == 200, status
        samples = {}
        for line in body.decode().splitlines():
            m = _SAMPLE.match(line)
            if m and not line.startswith("#"):
                samples[m.group(1) + (m.group(2) or "")] = float(m.group(3))
        return samples

    def stdout(self) -> str:
        with open(self.stdout_path, errors="replace") as f:
            return f.read()

    def stderr(self) -> str:
        with open(self.stderr_path, errors="replace") as f:
            return f.read()

    def log_lines(self) -> list[dict[str, Any]]:
        return [json.loads(line) for line in self.stdout().splitlines() if line.startswith("{")]

    def worker_pid(self) -> int:
        """The worker: the server's child process."""
        for pid in os.listdir("/proc"):
            if not pid.isdigit():
                continue
            try:
                with open(f"/proc/{pid}/stat") as f:
                    stat = f.read()
            except OSError:
                continue
            if int(stat.rsplit(")", 1)[1].split()[1]) == self.proc.pid:
                return int(pid)
        raise RuntimeError("no worker process found")

    def stop(self, sig: int = signal.SIGTERM, timeout: float = 60.0) -> int | None:
        if self.proc is None:
            return None
        if self.proc.poll() is None:
            self.proc.send_signal(sig)
            try:
                self.proc.wait(timeout)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait()
        return self.proc.returncode

    def close(self) -> None:
        """Stop (if needed) and delete the log files."""
        self.stop(signal.SIGKILL)
        shutil.rmtree(self.dir, ignore_errors=True)

    def __enter__(self) -> ServerProcess:
        """A test module's server: started, then stopped gracefully and closed at the end."""
        return self.start()

    def __exit__(self, *exc: object) -> None:
        self.stop()
        self.close()

    def client(self, api_key: str = "unused") -> Any:
        """The `openai` SDK's client of this server: no retries, a CPU-sized timeout."""
        import openai

        return openai.OpenAI(base_url=self.base_url, api_key=api_key, max_retries=0, timeout=120)
