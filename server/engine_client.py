"""The HTTP process's handle on its worker: spawn it, send commands, route outputs back.

The worker is a child process (``python -m server.worker``) with two OS pipes: commands go
down one, output frames come back up the other (server/ipc.py). A reader thread parses frames
and hands each to the event loop; outputs are routed to the Generation (one API request, one
or more engine requests) that owns them. End of the output pipe without a shutdown means the
worker died: every in-flight Generation fails with EngineDeadError and `on_death` runs.
"""

from __future__ import annotations

import asyncio
import itertools
import logging
import os
import subprocess
import sys
import threading
from collections.abc import AsyncIterator, Callable, Iterable, Iterator
from dataclasses import dataclass, field
from typing import Any

from scheduler import KVCacheGroups, KVCachePlan
from server.ipc import FrameReader, FrameWriter, unpack_output

logger = logging.getLogger("stoke.server")

_REPO_ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


class EngineDeadError(RuntimeError):
    """The worker process is gone (or never started)."""


class EngineRejected(Exception):
    """The worker refused a request at admission: kind "admission" | "invalid" | "internal"."""

    def __init__(self, kind: str, code: str, message: str) -> None:
        super().__init__(message)
        self.kind, self.code, self.message = kind, code, message


@dataclass(slots=True)
class WorkerInfo:
    model_path: str
    max_model_len: int
    vocab_size: int
    num_blocks: int
    block_size: int
    default_sampling: dict[str, Any]  # the generation config's: what a request leaves unset takes
    max_sequence_tokens: int  # prompt + output of the longest request admitted (context or pool)
    hidden_size: int = 0
    # how embeddings are pooled (engine/pooling.py's PoolerConfig fields): pooling_type,
    # normalize, matryoshka_dimensions (the `dimensions` a request may ask for)
    pooler: dict[str, Any] = field(default_factory=dict)
    generates: bool = True  # False: a model without an LM head (embeddings only), or a classifier
    # a sequence classifier's labels, in id order (config.json's id2label): it serves /classify, and
    # with one label (a cross-encoder) /score and /rerank; None: not a classifier
    labels: list[str] | None = None
    joins_pairs: bool = False  # a cross-encoder's pair is its texts joined, not the tokenizer's pair encoding
    # What a sequence takes of the KV pool (a hybrid model's layer groups); None: one full group
    kv_plan: KVCachePlan | None = None
    num_host_blocks: int = 0  # the prefix cache's host tier (--kv-offloading-size)
    weight_bytes: int = 0  # what the model's weights take in memory
    quantization: str | None = None  # how they are held in fp8 (engine/fp8.py's scheme methods); None: not
    kv_cache_dtype: str = ""  # the KV pool's torch dtype, e.g. float8_e4m3fn

    @property
    def plan(self) -> KVCachePlan:
        return self.kv_plan or KVCachePlan(KVCacheGroups.of([0]), self.block_size, 1)


@dataclass(slots=True)
class EngineStats:
    """The worker's latest gauges and cumulative counters."""

    waiting: int = 0
    running: int = 0
    kv_cache_usage: float = 0.0
    prefix_queries_tokens: int = 0
    prefix_hits_tokens: int = 0
    kv_offload_usage: float = 0.0  # of the prefix cache's host tier
    kv_offload_saved_blocks: int = 0
    kv_offload_loaded_blocks: int = 0
    preemptions: int = 0
    num_steps: int = 0
    spec_drafts: int = 0
    spec_draft_tokens: int = 0
    spec_accepted_tokens: int = 0
    # With LoRA adapters: each adapter's running and waiting requests, by name.
    lora_running: dict[str, int] = field(default_factory=dict)
    lora_waiting: dict[str, int] = field(default_factory=dict)


@dataclass(eq=False)
class Generation:
    """One API request's engine requests (one per prompt); outputs arrive on one queue."""

    client: EngineClient
    ids: list[str]
    queue: asyncio.Queue = field(default_factory=asyncio.Queue)
    # Done once the worker queued every prompt; its exception: EngineRejected / EngineDeadError.
    started: asyncio.Future | None = None
    unfinished: set[str] = field(default_factory=set)
    pending_ack: set[str] = field(default_factory=set)
    failed: BaseException | None = None
    # Called after each output queued, and on failure, once nobody iterates any more (an
    # aborted generation whose last outputs are still on their way).
    on_delivery: Callable[[], None] | None = None

    def __post_init__(self) -> None:
        self.unfinished = set(self.ids)
        self.pending_ack = set(self.ids)
        self.started = asyncio.get_running_loop().create_future()

    @property
    def finished(self) -> bool:
        return not self.unfinished

    def __aiter__(self) -> AsyncIterator[tuple[int, dict[str, Any]]]:
        return self._iterate()

    async def _iterate(self) -> AsyncIterator[tuple[int, dict[str, Any]]]:
        """(prompt index, output frame) until every engine request finished."""
        async for batch in self.batches():
            for item in batch:
                yield item

    async def batches(self) -> AsyncIterator[list[tuple[int, dict[str, Any]]]]:
        """The same outputs, every one already queued at once: a stream that fell behind the
        engine (its event loop busier than the engine is fast) catches up in one chunk per
        choice, not one per token, so the HTTP process's cost per token falls as load rises.
        An error is raised after the outputs queued before it."""
        while self.unfinished or not self.queue.empty():
            first = await self.queue.get()
            batch, error = self._fold(itertools.chain((first,), self._queued()))
            if batch:
                yield batch
            if error is not None:
                raise error

    def take_queued(self) -> list[tuple[int, dict[str, Any]]]:
        """Without waiting, for a generation nobody iterates any more (`on_delivery`): the
        outputs queued now. After an error (the worker is gone) nothing will come: finished."""
        batch, error = self._fold(self._queued())
        if error is not None:
            self.unfinished.clear()
        return batch

    def _queued(self) -> Iterator[Any]:
        while not self.queue.empty():
            yield self.queue.get_nowait()

    def _fold(self, items: Iterable[Any]) -> tuple[list[tuple[int, dict[str, Any]]], BaseException | None]:
        """Outputs up to the first error (returned apart); a finished one's request leaves `unfinished`."""
        batch: list[tuple[int, dict[str, Any]]] = []
        for item in items:
            if isinstance(item, BaseException):
                return batch, item
            index, output = item
            if output["finished"]:
                self.unfinished.discard(output["id"])
            batch.append((index, output))
        return batch, None

    def abort(self) -> None:
        """Stop every unfinished engine request of this generation (idempotent, never raises)."""
        if self.unfinished and self.failed is None:
            self.client.abort([i for i in self.ids if i in self.unfinished])

    # Called on the event loop by the client.
    def _on_added(self, request_id: str) -> None:
        self.pending_ack.discard(request_id)
        if not self.pending_ack and not self.started.done():
            self.started.set_result(None)

    def _fail(self, exc: BaseException) -> None:
        self.failed = exc
        if not self.started.done():
            self.started.set_exception(exc)
            self.started.exception()  # mark retrieved: the caller may be gone already
        self.queue.put_nowait(exc)
        if self.on_delivery is not None:
            self.on_delivery()

    def _deliver(self, index: int, output: dict[str, Any]) -> None:
        self.queue.put_nowait((index, output))
        if self.on_delivery is not None:
            self.on_delivery()


class EngineClient:
    def __init__(self, engine_args: dict[str, Any], *, on_death: Callable[[], None] | None = None,
                 on_frame: Callable[[dict[str, Any]], None] | None = None, log_level: str = "INFO",
                 cpu_threads: int | None = None, lora_modules: list[tuple[str, str]] | None = None) -> None:
        self.engine_args = engine_args
        self.lora_modules = list(lora_modules or [])  # read into the worker's memory at start
        self.cpu_threads = cpu_threads
        self.on_death = on_death
        self.on_frame = on_frame  # metrics hook: every frame (stats, outputs, batch tokens)
        self.log_level = log_level
        self.info: WorkerInfo | None = None
        self.initial_stats = EngineStats()
        self.stats = EngineStats()
        self.process: subprocess.Popen | None = None
        self.dead = False
        self.stopping = False
        self._writer: FrameWriter | None = None
        self._ready: asyncio.Event | None = None
        self._loop: asyncio.AbstractEventLoop | None = None
        self._owners: dict[str, tuple[Generation, int]] = {}
        self._counter = 0
        self._calls: dict[int, asyncio.Future] = {}  # commands waiting for the worker's answer

    # ------------------------------------------------------------- lifecycle
    async def start(self) -> None:
        self._loop = asyncio.get_running_loop()
        self._ready = asyncio.Event()
        cmd_r, cmd_w = os.pipe()
        out_r, out_w = os.pipe()
        env = dict(os.environ)
        env["PYTHONPATH"] = os.pathsep.join(p for p in (_REPO_ROOT, env.get("PYTHONPATH")) if p)
        try:
            self.process = subprocess.Popen(
                [sys.executable, "-m", "server.worker", "--in-fd", str(cmd_r), "--out-fd", str(out_w),
                 "--log-level", self.log_level],
                # stdout carries the request log lines: the worker writes to stderr only.
                pass_fds=(cmd_r, out_w), stdin=subprocess.DEVNULL, stdout=2, env=env,
            )
        finally:
            os.close(cmd_r)  # the child holds its own copies; ours would hide its death
            os.close(out_w)
        self._writer = FrameWriter(cmd_w)
        threading.Thread(target=self._read_loop, args=(FrameReader(out_r),), name="stoke-engine-reader",
                         daemon=True).start()
        self._send({"type": "init", "engine": self.engine_args, "cpu_threads": self.cpu_threads,
                    "lora_modules": self.lora_modules})
        logger.info("worker process %d started", self.process.pid)

    @property
    def ready(self) -> bool:
        return self.info is not None and not self.dead

    async def wait_ready(self) -> None:
        if self.dead:
            raise EngineDeadError("the engine worker is not running")
        if self.info is None:
            await self._ready.wait()
            if self.dead:
                raise EngineDeadError("the engine worker is not running")

    async def shutdown(self, timeout: float = 10.0) -> None:
        """Stop the worker: a shutdown frame, then SIGKILL if it does not exit in time."""
        self.stopping = True
        if self.process is None:
            return
        try:
            self._send({"type": "shutdown"})
        except OSError:
            pass
        try:
            await asyncio.to_thread(self.process.wait, timeout)
        except subprocess.TimeoutExpired:
            logger.warning("worker did not exit within %.0fs; killing it", timeout)
            self.process.kill()
            await asyncio.to_thread(self.process.wait)
        if self._writer is not None:
            self._writer.close()

    # -------------------------------------------------------------- requests
    def new_request_id(self, prefix: str) -> str:
        self._counter += 1
        return f"{prefix}-{os.getpid():x}{self._counter:08x}"

    def generate(self, request_id: str, prompts: list[list[int]], params: dict[str, Any],
                 arrival_time: float, priority: int = 0, lora: list[Any] | None = None) -> Generation:
        """Queue prompts (one engine request each, ids `{request_id}-{i}`) with one params;
        `lora`: the LoRA adapter they run with ([name, id, path]), None: the base model."""
        if self.dead:
            raise EngineDeadError("the engine worker is not running")
        ids = [f"{request_id}-{i}" for i in range(len(prompts))]
        generation = Generation(self, ids)
        for index, engine_id in enumerate(ids):
            self._owners[engine_id] = (generation, index)
        try:
            self._send({"type": "add", "ids": ids, "prompts": prompts, "params": params,
                        "arrival_time": arrival_time, "priority": priority, "lora": lora})
        except OSError:
            for engine_id in ids:
                self._owners.pop(engine_id, None)
            raise EngineDeadError("the engine worker is not running") from None
        return generation

    def abort(self, ids: list[str]) -> None:
        if self.dead or not ids:
            return
        try:
            self._send({"type": "abort", "ids": ids})
        except OSError:
            pass

    async def call(self, message: dict[str, Any]) -> str | None:
        """Send a command that the worker answers (load_lora, unload_lora); its error, or None."""
        if self.dead:
            raise EngineDeadError("the engine worker is not running")
        self._counter += 1
        future = self._loop.create_future()
        self._calls[self._counter] = future
        try:
            self._send({**message, "call": self._counter})
        except OSError:
            self._calls.pop(self._counter, None)
            raise EngineDeadError("the engine worker is not running") from None
        return await future

    def _send(self, message: dict[str, Any]) -> None:
        if self._writer is None:
            raise BrokenPipeError("worker not started")
        self._writer.write(message)

    # ------------------------------------------------------ worker → loop
    def _read_loop(self, reader: FrameReader) -> None:
        try:
            while True:
                frame = reader.read()
                if frame is None:
                    break
                if "outputs" in frame:  # by name from here on, off the event loop
                    frame["outputs"] = [unpack_output(row) for row in frame["outputs"]]
                self._loop.call_soon_threadsafe(self._dispatch, frame)
        except Exception:
            logger.exception("broken frame from the worker")
        finally:
            reader.close()
            code = None
            if self.process is not None and not self.stopping:
                try:  # the pipe closes as the process exits: its status follows within moments
                    code = self.process.wait(timeout=0.5)  # on this thread, not the event loop
                except subprocess.TimeoutExpired:
                    pass
            self._loop.call_soon_threadsafe(self._on_eof, code)

    def _dispatch(self, frame: dict[str, Any]) -> None:
        kind = frame.get("type")
        if kind == "ready":
            self.info = WorkerInfo(frame["model_path"], frame["max_model_len"], frame["vocab_size"],
                                   frame["num_blocks"], frame["block_size"], frame["default_sampling"],
                                   frame["max_sequence_tokens"], frame["hidden_size"], frame["pooler"],
                                   frame["generates"], frame.get("labels"), frame.get("joins_pairs", False),
                                   KVCachePlan.from_dict(frame["kv_plan"]), frame.get("num_host_blocks", 0),
                                   frame.get("weight_bytes", 0), frame.get("quantization"),
                                   frame.get("kv_cache_dtype", ""))
            self.initial_stats = EngineStats(**frame["stats"])
            self.stats = EngineStats(**frame["stats"])
            groups = self.info.plan.groups
            weights = f"weights {self.info.weight_bytes / 2**30:.2f} GiB" + \
                (f" in fp8 ({self.info.quantization})" if self.info.quantization else "")
            logger.info("engine ready: %s (%s, max_model_len %d, %d KV blocks of %d tokens in %s%s; a sequence of up "
                        "to %d tokens%s)", self.info.model_path, weights, self.info.max_model_len, self.info.num_blocks,
                        self.info.block_size, self.info.kv_cache_dtype, f" in {groups.num_groups} layer groups of windows {list(groups.windows)}"
                        if groups.num_groups > 1 else "", self.info.max_sequence_tokens,
                        f"; the prefix cache keeps {self.info.num_host_blocks} more blocks in host memory"
                        if self.info.num_host_blocks else "")
            if self.on_frame is not None:
                self.on_frame(frame)
            self._ready.set()
            return
        if kind == "fatal":
            logger.error("worker: %s", frame.get("message"))
            return
        if self.on_frame is not None:
            try:
                self.on_frame(frame)
            except Exception:
                logger.exception("metrics hook failed")
        if "stats" in frame:
            self.stats = EngineStats(**frame["stats"])
        for answer in frame.get("calls", ()):
            future = self._calls.pop(answer["call"], None)
            if future is not None and not future.done():
                future.set_result(answer["error"])
        for engine_id in frame.get("added", ()):
            owner = self._owners.get(engine_id)
            if owner is not None:
                owner[0]._on_added(engine_id)
        for error in frame.get("errors", ()):
            exc = EngineRejected(error["kind"], error["code"], error["message"])
            generations = {self._owners.pop(i)[0] for i in error["ids"] if i in self._owners}
            for generation in generations:
                generation._fail(exc)
        for output in frame.get("outputs", ()):
            owner = self._owners.get(output["id"])
            if owner is None:
                continue
            if output["finished"]:
                del self._owners[output["id"]]
            owner[0]._deliver(owner[1], output)

    def _on_eof(self, code: int | None) -> None:
        """The worker's pipe closed; `code`: its exit status, when it had exited."""
        if self.dead:
            return
        self.dead = True
        if self.stopping:
            logger.info("worker process stopped")
        else:
            logger.error("the engine worker died (exit code %s); failing %d in-flight request(s)",
                         code, len({g for g, _ in self._owners.values()}))
        exc = EngineDeadError("the engine worker is not running")
        for future in self._calls.values():
            if not future.done():
                future.set_exception(exc)
        self._calls.clear()
        for generation in {g for g, _ in self._owners.values()}:
            generation._fail(exc)
        self._owners.clear()
        if self._ready is not None:
            self._ready.set()
        if not self.stopping and self.on_death is not None:
            self.on_death()

