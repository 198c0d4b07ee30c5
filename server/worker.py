"""The worker process: one LLMEngine, driven by commands from the HTTP process over pipes.

Run as ``python -m server.worker --in-fd R --out-fd W`` by server/engine_client.py. The first
frame in is ``{"type": "init", "engine": {EngineConfig fields}}``; the worker loads the model,
runs one warm-up step (an embedding for a model without an LM head, a classification for a
sequence classifier: each computes nothing else) and answers ``{"type": "ready", ...}``. Then it
loops:

    take every pending command (block only when idle)
      add    {"ids": [...], "prompts": [[token ids], ...], "params": {...}, "arrival_time": t, "priority": p,
              "lora": [name, id, path] or null}
             params: SamplingParams fields; with "beam_search": BeamSearchParams fields (a search per
             prompt); or {"pooling": PoolingParams fields} (an embedding, classification or score per
             prompt, as its task says)
             all prompts are validated before any is queued; ack in "added" or one "errors" entry
      abort  {"ids": [...]}  → the engine frees the blocks; the final outputs go back
      load_lora   {"call": n, "lora": [name, id, path]} → the adapter read (on the command thread:
             the steps go on meanwhile) and pinned in memory;
      unload_lora {"call": n, "id": id} → dropped (once no request uses it): "calls" gets
             {"call": n, "error": null or a message}
      shutdown (or end of the command pipe: the HTTP process is gone) → exit 0
    one engine step → one frame {"outputs": [...], "stats": {...}, "batch_tokens": n}
             (server.ipc.OUTPUT_FIELDS: a generation's news; a pooling request's one output, its values
             packed: an embedding's vector, a classification's probabilities, a score)

Commands are read by a thread into a queue, so an abort takes effect before the next step.
The worker ignores SIGINT/SIGTERM: the HTTP process owns shutdown (it drains first). An
exception inside a step is fatal (exit 1): the HTTP process then fails in-flight requests with
503 and exits non-zero, so a supervisor restarts both.
"""

from __future__ import annotations

import argparse
import logging
import queue
import signal
import sys
import threading
import time
from collections import Counter
import traceback
from typing import Any

from engine.pooling import EmbeddingOutput, PoolingRequestOutput
from engine.scoring import ClassificationOutput, ScoringOutput
from server.heap import HeapPacer
from server.ipc import FrameReader, FrameWriter, pack_embedding, pack_logprobs

logger = logging.getLogger("stoke.worker")

WARMUP_ID = "__stoke_warmup__"


def encode_output(out: Any) -> list[Any]:
    """A RequestOutput (any output kind) as plain data (server.ipc.OUTPUT_FIELDS, in order):
    only what is new since the previous one. A PoolingRequestOutput: `encode_pooling`."""
    if isinstance(out, PoolingRequestOutput):
        return encode_pooling(out)
    completions = []
    for c in out.outputs:
        n_new = len(c.delta_token_ids)
        logprobs = None
        if c.logprobs is not None:  # the last n_new entries: the new ones, cumulative or delta
            new = c.logprobs[len(c.logprobs) - n_new:] if n_new else []
            logprobs = pack_logprobs(new)
        completions.append([c.index, c.delta_text, list(c.delta_token_ids), logprobs, c.num_tokens, c.finish_reason,
                            c.stop_reason])
    prompt_logprobs = metrics = None
    first = out.outputs[0]
    if (out.prompt_logprobs is not None and first.index == 0 and first.delta_token_ids
            and first.num_tokens == len(first.delta_token_ids)):
        # Complete once the first token exists: sent once, with sample 0's first output (a
        # delta output lists only the samples with news, in order).
        prompt_logprobs = pack_logprobs(out.prompt_logprobs)
    if out.finished and out.metrics is not None:
        metrics = encode_metrics(out.metrics)
    return [out.request_id, out.finished, len(out.prompt_token_ids), out.num_cached_tokens, completions,
            prompt_logprobs, metrics, None]


def encode_metrics(m: Any) -> dict[str, Any]:
    """A finished request's RequestMetrics as plain data."""
    return {
        "arrival_time": m.arrival_time,
        "first_scheduled_time": m.first_scheduled_time,
        "first_token_time": m.first_token_time,
        "finish_time": m.finish_time,
        "inter_token_latencies": m.inter_token_latencies,
        "num_preemptions": m.num_preemptions,
    }


def encode_pooling(out: PoolingRequestOutput) -> list[Any]:
    """A pooling request's one output (server.ipc.OUTPUT_FIELDS): no samples, its values packed
    as an embedding's vector is (`pooled_values`; "" if it was aborted), and its times without a
    first token (it samples none: no TTFT to count)."""
    metrics = None if out.metrics is None else encode_metrics(out.metrics) | {"first_token_time": None,
                                                                             "inter_token_latencies": []}
    values = pack_embedding(pooled_values(out.outputs)) if out.outputs is not None else ""
    return [out.request_id, True, len(out.prompt_token_ids), out.num_cached_tokens, [], None, metrics, values]


def pooled_values(outputs: EmbeddingOutput | ClassificationOutput | ScoringOutput) -> list[float]:
    """What a pooling request computed, as floats: an embedding's vector, a classification's
    probabilities (one per label), a score (one)."""
    if isinstance(outputs, EmbeddingOutput):
        return outputs.embedding
    if isinstance(outputs, ClassificationOutput):
        return outputs.probs
    return [outputs.score]


class Worker:
    def __init__(self, reader: FrameReader, writer: FrameWriter) -> None:
        self.reader = reader
        self.writer = writer
        self.inbox: queue.Queue[dict[str, Any] | None] = queue.Queue()
        self.engine: Any = None
        self.heap: HeapPacer | None = None

    # ----------------------------------------------------------------- set-up
    def start(self, init: dict[str, Any]) -> None:
        import torch

        from engine import EngineConfig, LLMEngine, LoRARequest, PoolingParams, SamplingParams

        if init.get("cpu_threads"):
            torch.set_num_threads(int(init["cpu_threads"]))
        self.engine = LLMEngine(EngineConfig(**init.get("engine", {})))
        self.engine.logprob_objects = False  # the frames carry numbers only
        for lora_id, (name, path) in enumerate(init.get("lora_modules") or [], 1):  # the ids serving gives them
            self.engine.add_lora(LoRARequest(name, lora_id, path), pin=True)  # served: never read again
        # One warm-up step: /ready means "a step has run", and the first user pays no warm-up.
        if self.engine.classifier is not None:  # it classifies and scores, and computes nothing else
            self.engine.add_pooling_request(WARMUP_ID, list(range(8)), PoolingParams(task="classify"))
        elif self.engine.runner.model.has_lm_head:
            self.engine.add_request(WARMUP_ID, list(range(8)), SamplingParams(max_tokens=1, temperature=0.0))
        else:  # a checkpoint without lm_head.weight computes embeddings only
            self.engine.add_pooling_request(WARMUP_ID, list(range(8)))
        while self.engine.has_unfinished_requests():
            self.engine.step()
        self.heap = HeapPacer()
        e = self.engine
        self.writer.write({
            "type": "ready",
            "model_path": e.model_path,
            "max_model_len": e.max_model_len,
            "vocab_size": e.model_config.vocab_size,
            "num_blocks": e.scheduler.block_manager.num_blocks,
            "num_host_blocks": e.scheduler.config.num_host_blocks,
            "weight_bytes": e.runner.weight_bytes,
            "quantization": None if e.model_config.quantization is None else e.model_config.quantization.method,
            "kv_cache_dtype": str(e.runner.kv_cache_dtype).removeprefix("torch."),
            "block_size": e.scheduler.block_manager.block_size,
            "max_sequence_tokens": e.scheduler.max_sequence_tokens,
            "kv_plan": e.scheduler.kv_plan.to_dict(),
            "default_sampling": e.default_sampling,
            # what a request's `dimensions` are checked against before it takes from its client's limits
            "hidden_size": e.model_config.hidden_size,
            "generates": e.runner.model.has_lm_head,  # False: embeddings only, or a classifier
            "labels": list(e.classifier.labels) if e.classifier is not None else None,
            "joins_pairs": e.classifier is not None and e.classifier.joins_pairs,
            "pooler": {"pooling_type": e.pooler.pooling_type, "normalize": e.pooler.normalize,
                       "matryoshka_dimensions": e.pooler.matryoshka_dimensions},
            "frozen_objects": self.heap.frozen_baseline,
            "stats": self.stats(),
        })

    def stats(self) -> dict[str, Any]:
        s = self.engine.scheduler
        bm = s.block_manager
        return {
            "waiting": len(s.waiting),
            "running": len(s.running),
            "kv_cache_usage": bm.usage,
            "prefix_queries_tokens": bm.stats.queries_tokens,
            "prefix_hits_tokens": bm.stats.hits_tokens,
            "kv_offload_usage": bm.host.usage if bm.host is not None else 0.0,
            "kv_offload_saved_blocks": bm.stats.saved_blocks,
            "kv_offload_loaded_blocks": bm.stats.loaded_blocks,
            "preemptions": s.stats.num_preemptions,
            "num_steps": self.engine.stats.num_steps,
            "spec_drafts": self.engine.stats.num_drafts,
            "spec_draft_tokens": self.engine.stats.num_draft_tokens,
            "spec_accepted_tokens": self.engine.stats.num_accepted_tokens,
            **self._lora_stats(),
        }

    def _lora_stats(self) -> dict[str, Any]:
        """With LoRA: each adapter's running and waiting requests, by name."""
        loras = self.engine.loras
        if loras is None:
            return {}
        s = self.engine.scheduler
        names = {lora_id: adapter.request.lora_name for lora_id, adapter in loras.adapters.items()}
        return {f"lora_{state}": dict(Counter(names[r.lora_id] for r in requests if r.lora_id))
                for state, requests in (("running", s.running), ("waiting", s.waiting))}

    # ------------------------------------------------------------------ loop
    def _read_commands(self) -> None:
        try:
            while True:
                message = self.reader.read()
                if message is not None and message.get("type") == "load_lora":
                    self._read_adapter(message)
                self.inbox.put(message)
                if message is None:
                    return
        except Exception:  # a broken frame: treat like a closed pipe
            logger.exception("bad frame from the HTTP process")
            self.inbox.put(None)

    def run(self) -> int:
        threading.Thread(target=self._read_commands, name="stoke-worker-commands", daemon=True).start()
        engine = self.engine
        while True:
            messages: list[dict[str, Any] | None] = []
            if not engine.has_unfinished_requests():
                self.heap.on_idle()
                messages.append(self.inbox.get())
            while True:
                try:
                    messages.append(self.inbox.get_nowait())
                except queue.Empty:
                    break
            frame: dict[str, Any] = {"added": [], "errors": [], "outputs": []}
            stop = False
            for message in messages:
                kind = None if message is None else message.get("type")
                if kind == "add":
                    self._add(message, frame)
                elif kind == "abort":
                    for request_id in message.get("ids", []):
                        out = engine.abort_request(request_id)
                        if out is not None:
                            frame["outputs"].append(encode_output(out))
                elif kind in ("load_lora", "unload_lora"):
                    frame.setdefault("calls", []).append({"call": message["call"], "error": self._lora_call(message)})
                else:  # shutdown, end of pipe, or anything unknown
                    stop = True
                    break
            if stop:
                return 0
            if engine.has_unfinished_requests():
                steps = engine.stats.num_steps
                outputs = engine.step(outputs="delta")  # frames carry deltas only
                self.heap.after_step()
                frame["outputs"].extend(encode_output(o) for o in outputs)
                if engine.stats.num_steps > steps:
                    frame["batch_tokens"] = engine.stats.last_batch_tokens
            if messages or "batch_tokens" in frame or frame["outputs"]:
                frame["stats"] = self.stats()
                self.writer.write(frame)

    def _read_adapter(self, message: dict[str, Any]) -> None:
        """A load_lora command's adapter, read here, off the step loop (disk, digest, checks take
        long for a large one): message["adapter"], or message["error"]."""
        from engine.lora import LoRARequest, load_adapter

        loras = self.engine.loras
        if loras is None:
            return  # the engine refuses it (no enable_lora)
        try:
            message["adapter"] = load_adapter(LoRARequest(*message["lora"]), loras.model_config,
                                              loras.max_lora_rank, loras.dtype)
        except Exception as exc:  # noqa: BLE001 - the load's answer, sent back by the loop
            message["error"] = str(exc) or type(exc).__name__

    def _lora_call(self, message: dict[str, Any]) -> str | None:
        """A load_lora or unload_lora command; what went wrong, or None."""
        from engine import LoRARequest

        if "error" in message:
            return message["error"]
        try:
            if message["type"] == "load_lora":
                self.engine.add_lora(LoRARequest(*message["lora"]), pin=True, read=message.get("adapter"))
            else:  # in use: dropped when its last request finishes
                self.engine.remove_lora(message["id"])
            return None
        except Exception as exc:  # noqa: BLE001 - an adapter the engine can't read must not stop it
            if not isinstance(exc, (ValueError, TypeError)):
                logger.exception("LoRA command %s failed", message["type"])
            return str(exc) or type(exc).__name__

    def _add(self, message: dict[str, Any], frame: dict[str, Any]) -> None:
        from engine import BeamSearchParams, LoRARequest, PoolingParams, SamplingParams
        from scheduler import AdmissionError

        ids: list[str] = message["ids"]
        try:
            lora = LoRARequest(*message["lora"]) if message.get("lora") else None
            options = dict(arrival_time=message.get("arrival_time"), priority=message.get("priority", 0),
                           lora_request=lora)
            beam_search = message["params"].get("beam_search")
            pooling = message["params"].get("pooling")
            if pooling is not None:
                pooling_params = PoolingParams(**pooling)
                embeddings = [self.engine.prepare_pooling(tokens, pooling_params) for tokens in message["prompts"]]
                for request_id, embedding in zip(ids, embeddings):
                    self.engine.add_prepared_pooling(request_id, None, embedding, **options)
            elif beam_search is not None:
                beams = BeamSearchParams(**beam_search)
                searches = [self.engine.prepare_beam_search(tokens, beams) for tokens in message["prompts"]]
                for request_id, search in zip(ids, searches):
                    self.engine.add_prepared_beam_search(request_id, None, search, **options)
            else:
                # One params copy for the message's prompts (a copy per prompt, made twice, with a
                # logit_bias over the vocabulary took 3.5 GB and 40 s of the step loop for 1,024).
                params = self.engine.own_params(SamplingParams(**message["params"]))
                prepared = [self.engine.prepare(tokens, params, owned=True) for tokens in message["prompts"]]
                for request_id, request in zip(ids, prepared):
                    self.engine.add_prepared(request_id, None, request, **options)
        except Exception as exc:  # nothing of this message stays queued
            for request_id in ids:
                self.engine.abort_request(request_id)
            if isinstance(exc, AdmissionError):
                error = {"kind": "admission", "code": exc.code, "message": str(exc)}
            elif isinstance(exc, (ValueError, TypeError)):
                error = {"kind": "invalid", "code": "invalid_value", "message": str(exc)}
            else:
                logger.exception("adding request %s failed", ids)
                error = {"kind": "internal", "code": "internal_error", "message": "internal error"}
            frame["errors"].append({"ids": ids, **error})
            return
        frame["added"].extend(ids)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m server.worker")
    parser.add_argument("--in-fd", type=int, required=True)
    parser.add_argument("--out-fd", type=int, required=True)
    parser.add_argument("--log-level", default="INFO")
    args = parser.parse_args(argv)
    # The HTTP process owns shutdown: a Ctrl-C on the terminal must not kill in-flight work.
    signal.signal(signal.SIGINT, signal.SIG_IGN)
    signal.signal(signal.SIGTERM, signal.SIG_IGN)
    logging.basicConfig(level=args.log_level.upper(), stream=sys.stderr,
                        format="%(asctime)s %(levelname)s [worker] %(name)s: %(message)s")
    reader, writer = FrameReader(args.in_fd), FrameWriter(args.out_fd)
    init = reader.read()
    if init is None or init.get("type") != "init":
        logger.error("no init frame from the HTTP process")
        return 2
    worker = Worker(reader, writer)
    try:
        worker.start(init)
    except Exception as exc:
        logger.error("engine start-up failed:\n%s", traceback.format_exc())
        try:
            writer.write({"type": "fatal", "message": f"engine start-up failed: {type(exc).__name__}: {exc}"})
        except OSError:
            pass
        return 1
    try:
        return worker.run()
    except BrokenPipeError:
        return 0  # the HTTP process is gone
    except Exception:
        logger.critical("engine step failed; the worker exits:\n%s", traceback.format_exc())
        return 1


if __name__ == "__main__":
    started = time.monotonic()
    code = main()
    logging.getLogger("stoke.worker").info("worker exits (%d) after %.1fs", code, time.monotonic() - started)
    sys.exit(code)
