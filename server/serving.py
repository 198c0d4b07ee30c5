"""OpenAI completions and chat completions over the engine client (and the jobs other APIs
build on them: server/responses.py, server/embeddings.py, server/scoring.py).

A request is validated and turned into a Job (token-id prompts + SamplingParams fields), handed
to the worker, and its outputs are turned into OpenAI responses — one JSON body, or SSE chunks
exactly as OpenAI streams them (`data: {...}` lines, then `data: [DONE]`). A client that goes
away (streaming or not) aborts its engine requests at once, so their KV blocks are freed.
"""

from __future__ import annotations

import asyncio
import inspect
import json
import logging
import math
import os
import time
from collections.abc import AsyncIterator, Callable
from dataclasses import dataclass, field
from concurrent.futures import ThreadPoolExecutor
from functools import lru_cache, partial
from typing import Any, TypeVar

from starlette.requests import Request
from starlette.responses import JSONResponse, Response, StreamingResponse
from starlette.types import Receive, Scope, Send

from engine.chat_messages import UnsupportedContent, template_message, template_variables
from engine.reasoning import Reasoning, ReasoningPhase, ReasoningSplitter
from engine.sampling_params import SamplingParams, truncate_prompt
from engine.structured_outputs import StructuredOutputsParams
from engine.token_bytes import token_bytes_reader
from scheduler import AdmissionError, check_admissible
from server import errors
from server.config import ServerConfig
from server.engine_client import EngineClient, EngineDeadError, EngineRejected, Generation
from server.errors import APIError
from server.limits import limits_from_config
from server.metrics import Metrics, scored_prompt_finish
from server.protocol import (ChatCompletionRequest, CompletionRequest, DetokenizeRequest, InputOrChat,
                             PoolingRequest, TokenizeRequest)
from server.request_log import RequestLogger, RequestRecord
from server.tool_parsers import (FORCED, KEEPS_SPECIAL_TOKENS, ToolCallParser, forced_tool_schema,
                                 message_content)

logger = logging.getLogger("stoke.server")
T = TypeVar("T")


def check_not_empty(prompts: list[str | list[int]], param: str) -> None:
    """A 400 naming `param` for an empty prompt (text or token ids): the engine computes nothing
    from one."""
    for i, p in enumerate(prompts):
        if not p:
            raise errors.invalid(f"{param} must not be empty" if len(prompts) == 1 else f"{param}.{i} must not be empty",
                                 param=param)


_MAX_STOP_CHARS = 1024
_MIN_LOGPROB = -9999.0  # JSON has no -inf
# Prompts longer than this are tokenized off the event loop (~1.5 ms a 4k-character text here).
TOKENIZE_INLINE_CHARS = 4096
# Chats of more messages or content parts than this (or longer) are rendered off the event loop too.
RENDER_INLINE_MESSAGES = 64
# An aborted request's log line waits this long at most for the worker's confirmation.
ABORT_LOG_GRACE_S = 30.0


class ShuttingDown(Exception):
    """The drain timeout passed with this request still running."""


@dataclass(slots=True)
class Choice:
    index: int
    text: list[str] = field(default_factory=list)
    num_tokens: int = 0
    token_ids: list[int] = field(default_factory=list)
    logprobs: list[list[list[float]]] = field(default_factory=list)  # [[tid, lp], ...] per token
    finish_reason: str | None = None
    stop_reason: int | str | None = None
    started: bool = False  # chat streaming: the role delta went out
    text_offset: int = 0  # completions streaming: the next token's text_offset (after any echo)
    # chat with a tool call parser: reads the text as it streams; the whole answer's content
    # (None where only calls were made) and calls once it ended
    tool_parser: ToolCallParser | None = None
    content: str | None = None
    tool_calls: list[dict[str, Any]] = field(default_factory=list)
    # chat with a reasoning parser: splits the text into reasoning and content as it comes
    reasoning: ReasoningSplitter | None = None


@dataclass(slots=True)
class Job:
    kind: str  # "completion" | "chat" | "embedding" | "score" | "rerank" | "classify"
    request_id: str
    model: str
    created: int
    arrival: float
    prompts: list[list[int]]
    prompt_texts: list[str | None]
    params: dict[str, Any]
    n: int
    stream: bool
    include_usage: bool
    echo: bool
    logprobs: int | None  # top-k per token (completions: logprobs; chat: top_logprobs if logprobs)
    record: RequestRecord
    choices: list[Choice] = field(default_factory=list)  # filled while the outputs come in
    cached: dict[int, int] = field(default_factory=dict)  # prompt index → prefix-cache hit tokens
    # echo with logprobs: prompt index → per prompt token [[tid, lp], ...] (None for the first)
    prompt_logprobs: dict[int, list[list[list[float]] | None]] = field(default_factory=dict)
    # the LoRA adapter the request named ([name, id, path]), as served when it was checked
    lora: list[Any] | None = None
    # (choice index, "content" or "reasoning") → its text chunk's SSE line around the text (`_text_chunk`)
    text_chunks: dict[tuple[int, str], list[str]] = field(default_factory=dict)
    # vLLM's stream_options.continuous_usage_stats: every chunk has its choice's usage so far
    continuous_usage: bool = False
    # completions with echo and max_tokens=0 (legacy OpenAI, vLLM): the prompt and its
    # logprobs only; the engine samples one token from the prompt's last logits, not returned
    echo_only: bool = False
    # echo: prompt index → its text and (with logprobs) logprobs object, built once for its n
    # choices (`_echoed`)
    echoed: dict[int, tuple[str, dict[str, Any] | None]] = field(default_factory=dict)
    # cut short: when the log line stops waiting for the worker's confirmation (`_abort`)
    settle_timer: asyncio.TimerHandle | None = None
    # chat: how its answers' tool calls are read (tool_choice "auto": the server's parser;
    # "required" or a named function, `tool_function`: the JSON the answer is held to)
    tool_parser: str | None = None
    tool_function: str | None = None
    parallel_tool_calls: bool = True  # False: an answer's first call only
    tools: list[dict[str, Any]] = field(default_factory=list)  # the request's (qwen3_coder types values by them)
    short_tool_ids: bool = False  # call ids as Mistral's chat templates take them (`ToolCallParser`)
    # chat on a server with a reasoning parser: where the answer starts (engine/reasoning.py's
    # opening of its prompt); None: no reasoning is read. include_reasoning (vLLM's): False
    # leaves the reasoning out of the response.
    reasoning_opening: str | None = None
    include_reasoning: bool = True
    # renders the answer for another API than the kind's (server/responses.py: OpenAI's
    # Responses API over a chat; server/embeddings.py, server/scoring.py): its `body(...)` (a
    # dict, or a Response, or an awaitable of either) and `stream(...)` replace the chat's, and
    # its `renamed(error, prompt_index)` names the field a refused prompt came from
    renderer: Any = None
    # a pooling request (an embedding, a classification, a score): prompt index → its values,
    # packed (server/ipc.py), None if it was aborted
    embeddings: dict[int, str | None] = field(default_factory=dict)

    @property
    def pooling(self) -> bool:
        """Its prompts are pooled (embedded, classified, scored): they generate nothing."""
        return "pooling" in self.params

    def new_tool_parser(self) -> ToolCallParser:
        """A parser for one of its answers' tool calls (a chat with tool_parser set)."""
        assert self.tool_parser is not None
        return ToolCallParser(self.tool_parser, self.tool_function, self.tools, self.short_tool_ids)


class SSEResponse(StreamingResponse):
    """A StreamingResponse that always runs `on_close`, however the stream ends."""

    def __init__(self, content: AsyncIterator[str], on_close: Callable[[], None]) -> None:
        super().__init__(content, media_type="text/event-stream",
                         headers={"Cache-Control": "no-cache", "X-Accel-Buffering": "no"})
        self.on_close = on_close

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        try:
            await super().__call__(scope, receive, send)
        finally:
            self.on_close()


def _shutdown_error() -> APIError:
    return errors.unavailable("the server shut down before this request finished", code="shutting_down")


def _dumps(data: Any) -> str:
    return json.dumps(data, ensure_ascii=False, separators=(",", ":"))


_PLACEHOLDER = "\x00text\x00"  # encodes to an escape no real chunk's other fields contain


def sse(data: dict[str, Any] | str) -> str:
    return f"data: {data if isinstance(data, str) else _dumps(data)}\n\n"


def _with_logprobs(line: str, logprobs: str | None) -> str:
    """An SSE line rendered with `_PLACEHOLDER` for its logprobs, with the JSON text put in its
    place (the last one: logprobs come after the text, which might contain anything)."""
    if logprobs is None:
        return line
    head, _, tail = line.rpartition(_dumps(_PLACEHOLDER))
    return head + logprobs + tail


def _text_end(logprobs: dict[str, Any] | None) -> int:
    """Where the text after a completions logprobs object's tokens starts (its offsets count
    each token's own text: a token that is part of a character counts its "\ufffd")."""
    if not logprobs or not logprobs["tokens"]:
        return 0
    return logprobs["text_offset"][-1] + len(logprobs["tokens"][-1])


def _ranked(entry: list[list[float]]) -> tuple[dict[int, float], list[tuple[int, float]]]:
    """One token's [id, logprob] entries by id (clamped: JSON has no -inf), and best first."""
    pairs = {int(t): max(lp, _MIN_LOGPROB) for t, lp in entry}
    return pairs, sorted(pairs.items(), key=lambda kv: -kv[1])


def _number(value: float | None) -> str:
    """A logprob as the JSON encoder writes it."""
    return repr(value) if value is not None and math.isfinite(value) else _dumps(value)


def merge_deltas(deltas: list[tuple[Choice, dict[str, Any]]]) -> list[tuple[Choice, dict[str, Any]]]:
    """One delta per choice (in order of first appearance) from several steps' deltas: text,
    token ids and logprobs joined, the last finish and stop reasons."""
    merged: dict[int, tuple[Choice, dict[str, Any]]] = {}
    for choice, delta in deltas:
        if choice.index not in merged:
            merged[choice.index] = (choice, delta)
            continue
        first = merged[choice.index][1]
        logprobs = first["logprobs"] if delta["logprobs"] is None else (first["logprobs"] or []) + delta["logprobs"]
        merged[choice.index] = (choice, first | {
            "text": first["text"] + delta["text"], "token_ids": first["token_ids"] + delta["token_ids"],
            "logprobs": logprobs, "num_tokens": delta["num_tokens"], "finish_reason": delta["finish_reason"],
            "stop_reason": delta["stop_reason"]})
    return list(merged.values())


async def wait_for_disconnect(request: Request) -> None:
    """Return once the client has closed the connection (the request body was already read)."""
    while True:
        message = await request.receive()
        if message["type"] == "http.disconnect":
            return


def _structure_source(req: CompletionRequest | ChatCompletionRequest) -> str:
    """The field a request's structured output came from (for an error that names it)."""
    fmt = req.response_format
    if fmt is not None and fmt.get("type", "text") != "text":
        return "response_format"
    for name in ("structured_outputs", "guided_json", "guided_choice", "guided_regex"):
        if getattr(req, name) is not None:
            return name
    return "tool_choice"  # required, or a named function: held to the tools' JSON


class OpenAIServing:
    def __init__(self, config: ServerConfig, tokenizer: Any, client: EngineClient, metrics: Metrics,
                 request_logger: RequestLogger, model_name: str) -> None:
        self.config = config
        self.limits = limits_from_config(config)
        self.tokenizer = tokenizer
        self.client = client
        self.metrics = metrics
        self.request_logger = request_logger
        self.model_name = model_name
        parser = config.engine_args.get("reasoning_parser")
        self.reasoning = Reasoning.for_tokenizer(parser, tokenizer) if parser is not None else None
        # The LoRA adapters clients may name as their model: name → [name, id, path] (a LoRARequest's fields).
        self.loras = {name: [name, lora_id, path] for lora_id, (name, path) in enumerate(config.lora_modules, 1)}
        self._next_lora_id = len(self.loras) + 1  # never reused: an id names one adapter's weights
        self._loading_loras: set[str] = set()  # names whose load the worker is doing
        self._tokenizer_thread = ThreadPoolExecutor(max_workers=1, thread_name_prefix="stoke-tokenizer")
        self.in_flight = 0
        self.draining = False  # set on SIGTERM: requests cut short now are the server's doing
        self.live: set[Generation] = set()
        self._token_str = lru_cache(maxsize=1 << 16)(self._decode_token)
        self._read_bytes = token_bytes_reader(tokenizer) if tokenizer is not None else None
        self._token_bytes = lru_cache(maxsize=1 << 16)(self._byte_list)
        self._token_json = lru_cache(maxsize=1 << 16)(self._token_pieces)

    # =========================================================== requests → jobs
    async def wait_ready(self) -> None:
        """A job is built with the worker's limits (context length, vocabulary): a request that
        arrives while the model loads waits for them."""
        try:
            await self.client.wait_ready()
        except EngineDeadError:
            raise errors.engine_dead() from None

    def check_model(self, model: str | None) -> str:
        """The served model a request names: the base model (its name or path, or none sent), or
        a LoRA adapter's name."""
        if model in self.loras:
            return model
        known = (self.model_name, self.client.info.model_path if self.client.info else None)
        if model is not None and model not in known:
            raise errors.model_not_found(model)
        return self.model_name

    def check_generates(self) -> None:
        """A 400 for a generation on a model without an LM head or on a classifier (before any
        other check of the request, whose errors would point elsewhere)."""
        info = self.client.info
        if info is not None and info.labels is not None:
            raise errors.invalid(f"this model is a sequence classifier: it serves {self._classifier_endpoints()} "
                                 "only", param="model")
        if info is not None and not info.generates:
            raise errors.invalid("this model has no LM head (an embedding model): it serves /v1/embeddings only",
                                 param="model")

    def check_pooling_task(self, task: str) -> None:
        """A 400 naming `model` for a pooling task (embed, classify, score) the model can't run,
        before any other check of the request (the engine's rules, LLMEngine.check_pooling_task,
        said by endpoint): a classifier embeds nothing; only a classifier classifies; a pair is
        scored by a cross-encoder (a classifier with one label) or by any other model's
        embeddings."""
        labels = self.client.info.labels
        if task == "embed" and labels is not None:
            raise errors.invalid(f"this model is a sequence classifier: it computes no embeddings (it serves "
                                 f"{self._classifier_endpoints()})", param="model")
        if task == "classify" and labels is None:
            raise errors.invalid("/classify needs a sequence classifier (a *ForSequenceClassification checkpoint); "
                                 "this model computes embeddings: /v1/embeddings, and /score and /rerank by their "
                                 "cosine similarity", param="model")
        if task == "score" and labels is not None and len(labels) != 1:
            raise errors.invalid(f"/score and /rerank need a cross-encoder (a classifier with one label) or an "
                                 f"embedding model; this classifier has {len(labels)} labels: use /classify",
                                 param="model")

    def _classifier_endpoints(self) -> str:
        return "/classify, /score and /rerank" if len(self.client.info.labels) == 1 else "/classify"

    def _max_model_len(self) -> int:
        return self.client.info.max_model_len

    def _default_max_tokens(self, otherwise: int) -> int:
        """max_tokens for a request that sets none: `otherwise`, capped by the generation
        config's max_new_tokens."""
        return min(otherwise, self.client.info.default_sampling.get("max_tokens", otherwise))

    def _sampling_fields(self, req: CompletionRequest | ChatCompletionRequest, max_tokens: int | None,
                         logprobs: int | None, structured: StructuredOutputsParams | None = None) -> dict[str, Any]:
        cfg = self.config
        for name in ("temperature", "top_p", "min_p", "presence_penalty", "frequency_penalty", "repetition_penalty"):
            value = getattr(req, name)
            if value is not None and not math.isfinite(value):
                raise errors.invalid(f"{name} must be a finite number", param=name)
        n = 1 if req.n is None else req.n
        if n > cfg.max_n:
            raise errors.invalid(f"n must be <= {cfg.max_n} on this server, got {n}", param="n")
        # Errors name the field the client sent: a chat's max_tokens may come as max_completion_tokens.
        sent_as = {"max_tokens": "max_completion_tokens"} \
            if isinstance(req, ChatCompletionRequest) and req.max_completion_tokens is not None else {}
        if max_tokens is not None and cfg.max_tokens_limit is not None and max_tokens > cfg.max_tokens_limit:
            name = sent_as.get("max_tokens", "max_tokens")
            raise errors.invalid(f"{name} must be <= {cfg.max_tokens_limit} on this server, got {max_tokens}",
                                 param=name)
        stop = [req.stop] if isinstance(req.stop, str) else list(req.stop or [])
        if len(stop) > cfg.max_stop:
            raise errors.invalid(f"at most {cfg.max_stop} stop sequences are allowed, got {len(stop)}", param="stop")
        if any(len(s) > _MAX_STOP_CHARS for s in stop):
            raise errors.invalid(f"stop sequences may have at most {_MAX_STOP_CHARS} characters", param="stop")
        stop_token_ids = list(req.stop_token_ids or [])
        if len(stop_token_ids) > cfg.max_stop:
            raise errors.invalid(f"at most {cfg.max_stop} stop_token_ids are allowed, got {len(stop_token_ids)}",
                                 param="stop_token_ids")
        if logprobs is not None and logprobs > cfg.max_logprobs:
            raise errors.invalid(f"at most {cfg.max_logprobs} logprobs per token are allowed, got {logprobs}",
                                 param="logprobs" if isinstance(req, CompletionRequest) else "top_logprobs")
        default = self.client.info.default_sampling  # the model's generation config's
        fields = dict(
            n=n,
            max_tokens=max_tokens,
            min_tokens=req.min_tokens or 0,
            temperature=default.get("temperature", 1.0) if req.temperature is None else req.temperature,
            top_p=default.get("top_p", 1.0) if req.top_p is None else req.top_p,
            top_k=default.get("top_k", 0) if req.top_k is None else req.top_k,
            min_p=default.get("min_p", 0.0) if req.min_p is None else req.min_p,
            presence_penalty=req.presence_penalty or 0.0,
            frequency_penalty=req.frequency_penalty or 0.0,
            repetition_penalty=default.get("repetition_penalty", 1.0) if req.repetition_penalty is None
            else req.repetition_penalty,
            seed=req.seed,
            stop=stop,
            stop_token_ids=stop_token_ids,
            ignore_eos=bool(req.ignore_eos),
            logprobs=logprobs,
            skip_special_tokens=True if req.skip_special_tokens is None else req.skip_special_tokens,
            include_stop_str_in_output=bool(req.include_stop_str_in_output),
            logit_bias=req.logit_bias or None,
        )
        try:  # the structure checked (and compiled) already: the object, not compiled again on the loop
            SamplingParams(**fields, structured_outputs=structured).check_vocab(self.client.info.vocab_size)
        except ValueError as exc:
            message = str(exc)
            name = message.split(" ", 1)[0]
            param = sent_as.get(name, name) if name in fields else None
            if param is not None and param != name:
                message = param + message[len(name):]
            raise errors.invalid(message, param=param) from None
        if structured is not None:
            fields["structured_outputs"] = structured.to_dict()
        if req.use_beam_search:
            fields["beam_search"] = self._beam_search_fields(req, fields)
        return fields

    @staticmethod
    def _beam_search_fields(req: CompletionRequest | ChatCompletionRequest, fields: dict[str, Any]) -> dict[str, Any]:
        """vLLM's use_beam_search: n beams, the n best sequences as the choices. What a beam
        search does not follow is a 400 that names it, rather than a request silently changed
        (sampling knobs such as temperature and top_p are read past: a search samples nothing)."""
        unfollowed = [name for name, given in (
            ("stop", bool(fields["stop"])), ("stop_token_ids", bool(fields["stop_token_ids"])),
            ("min_tokens", fields["min_tokens"] > 0), ("logit_bias", fields["logit_bias"] is not None),
            ("presence_penalty", fields["presence_penalty"] != 0.0),
            ("frequency_penalty", fields["frequency_penalty"] != 0.0),
            ("repetition_penalty", req.repetition_penalty not in (None, 1.0)),
            (_structure_source(req), "structured_outputs" in fields),
            ("echo", isinstance(req, CompletionRequest) and bool(req.echo))) if given]
        if unfollowed:
            raise errors.invalid(f"use_beam_search does not support {unfollowed[0]}", param=unfollowed[0])
        length_penalty = 1.0 if req.length_penalty is None else req.length_penalty
        if not math.isfinite(length_penalty):
            raise errors.invalid("length_penalty must be a finite number", param="length_penalty")
        if fields["logprobs"] is not None and fields["logprobs"] > 2 * fields["n"]:
            param = "logprobs" if isinstance(req, CompletionRequest) else "top_logprobs"
            raise errors.invalid(f"with use_beam_search, at most 2 x n ({2 * fields['n']}) logprobs per token are "
                                 f"available, got {fields['logprobs']}", param=param)
        early_stopping = "never" if req.early_stopping == "never" else bool(req.early_stopping)
        return dict(beam_width=fields["n"], max_tokens=fields["max_tokens"], ignore_eos=fields["ignore_eos"],
                    length_penalty=length_penalty, early_stopping=early_stopping, logprobs=fields["logprobs"],
                    include_stop_str_in_output=fields["include_stop_str_in_output"],
                    skip_special_tokens=fields["skip_special_tokens"])

    def _job(self, kind: str, req: CompletionRequest | ChatCompletionRequest, record: RequestRecord,
             arrival: float, prompts: list[list[int]], prompt_texts: list[str | None], params: dict[str, Any],
             echo: bool, logprobs: int | None) -> Job:
        stream = bool(req.stream)
        if req.stream_options is not None and not stream:  # as OpenAI and vLLM
            raise errors.invalid("stream_options is only allowed with stream: true", param="stream_options")
        include_usage = bool(stream and req.stream_options is not None and req.stream_options.include_usage)
        job = self.new_job(kind, record, arrival, prompts, prompt_texts, params, stream=stream,
                           include_usage=include_usage, echo=echo, logprobs=logprobs)
        job.continuous_usage = include_usage and bool(req.stream_options.continuous_usage_stats)
        return job

    def new_job(self, kind: str, record: RequestRecord, arrival: float, prompts: list[list[int]],
                prompt_texts: list[str | None], params: dict[str, Any], *, stream: bool = False,
                include_usage: bool = False, echo: bool = False, logprobs: int | None = None) -> Job:
        """A checked request's Job (its priority allowed by the server), its record filled in."""
        priority = record.priority  # the job builders set it first: logged, refused or not
        if priority and self.config.engine_args.get("scheduling_policy", "fcfs") != "priority":  # as vLLM
            raise errors.invalid(f"priority {priority} needs a server started with --scheduling-policy priority; "
                                 "this one serves requests first come, first served", param="priority")
        n = params.get("n", 1)
        record.n = n
        record.beam_search = "beam_search" in params
        record.stream = stream
        record.prompt_tokens = sum(len(p) for p in prompts)
        job = Job(kind, record.request_id, record.model or self.model_name, int(time.time()), arrival, prompts,
                  prompt_texts, params, n, stream, include_usage, echo, logprobs, record,
                  lora=self.loras.get(record.model))
        if self.request_logger.log_text:  # what the model sees: a truncated or token-id prompt decoded
            texts = [self._prompt_text(job, i) for i in range(len(prompts))]
            record.prompt = texts[0] if len(texts) == 1 else texts
        return job

    async def _encode(self, text: str, add_special_tokens: bool = True) -> list[int]:
        return (await self._encode_all([text], add_special_tokens))[0]

    async def _encode_all(self, texts: list[str], add_special_tokens: bool = True,
                          param: str = "prompt") -> list[list[int]]:
        """Token ids of prompts. Long texts (together) are tokenized on the tokenizer thread:
        ~12 ms for 8k tokens, which on the event loop would stall every stream for as long
        (the tokenizer releases the GIL); a thousand short prompts inline stalled it 1.5 s.
        Concurrent encodes are safe: they share the tokenizer's settings (no truncation, no
        padding), so none mutates it."""
        if not texts:
            return []
        if self.tokenizer is None:
            raise errors.invalid(f"this model has no tokenizer: send {param} as token ids", param=param)

        return await self.on_tokenizer(
            lambda: [self.tokenizer.encode(text, add_special_tokens=add_special_tokens) for text in texts],
            sum(len(text) for text in texts) <= TOKENIZE_INLINE_CHARS)

    async def on_tokenizer(self, work: Callable[[], T], inline: bool) -> T:
        """`work` (tokenizing, rendering templates) now, where `inline` says it is short, else on
        the tokenizer thread (`_encode_all`)."""
        if inline:
            return work()
        return await asyncio.get_running_loop().run_in_executor(self._tokenizer_thread, work)

    def prompt_list(self, prompt: str | list[int] | list[list[int]] | list[str],
                    param: str = "prompt") -> list[str | list[int]]:
        """A request's prompts (a text, token ids, or a list of either), at most --max-prompts
        of them; a 400 naming `param` for none or too many."""
        if isinstance(prompt, str):
            raw: list[str | list[int]] = [prompt]
        elif prompt and isinstance(prompt[0], int):
            raw = [list(prompt)]  # type: ignore[list-item]
        else:
            raw = list(prompt)  # type: ignore[arg-type]
        if not raw:
            raise errors.invalid(f"{param} must not be empty", param=param)
        self.check_prompt_count(len(raw), param)
        return raw

    def check_prompt_count(self, count: int, param: str, prompts: str | None = None) -> None:
        """--max-prompts: the engine requests one API request may queue, checked before any
        prompt is tokenized (a 4 MiB body lists a million); a 400 naming `param`. `prompts`:
        what the message calls them (default: `param`s)."""
        if count > self.config.max_prompts:
            raise errors.invalid(f"at most {self.config.max_prompts} {prompts or param + 's'} per request are allowed "
                                 f"on this server, got {count}", param=param)

    async def prompt_ids(self, req: CompletionRequest | PoolingRequest, raw: list[str | list[int]],
                         add_special_tokens: bool = True,
                         param: str = "prompt") -> tuple[list[list[int]], list[str | None]]:
        """`prompt_list`'s prompts as token ids, each cut to the request's truncate_prompt_tokens,
        and their texts (None where the model sees something else: decoded when needed)."""
        encoded = iter(await self._encode_all([p for p in raw if isinstance(p, str)], add_special_tokens, param))
        prompts, texts = [], []
        for p in raw:
            tokens = next(encoded) if isinstance(p, str) else list(p)
            kept = self._truncated(req, tokens)
            prompts.append(kept)
            texts.append(p if isinstance(p, str) and kept is tokens else None)
        return prompts, texts

    def _truncated(self, req: CompletionRequest | ChatCompletionRequest | PoolingRequest,
                   tokens: list[int]) -> list[int]:
        """vLLM's truncate_prompt_tokens: the prompt's last k tokens (-1: max_model_len), the
        same list when it is no longer."""
        if req.truncate_prompt_tokens is None:
            return tokens
        try:
            return truncate_prompt(tokens, req.truncate_prompt_tokens, self._max_model_len())
        except ValueError as exc:
            raise errors.invalid(str(exc), param="truncate_prompt_tokens") from None

    async def completion_job(self, req: CompletionRequest, record: RequestRecord, arrival: float) -> Job:
        record.priority = req.priority or 0  # logged, refused or not
        record.model = self.check_model(req.model)
        self.check_generates()
        if req.suffix:
            raise errors.unsupported("suffix is not supported", param="suffix")
        if req.best_of is not None and req.best_of != (req.n or 1):
            raise errors.unsupported("best_of is not supported (use n)", param="best_of")
        raw = self.prompt_list(req.prompt)
        max_tokens = self._default_max_tokens(16) if req.max_tokens is None else req.max_tokens
        echo_only = bool(req.echo) and max_tokens == 0
        if max_tokens == 0 and not echo_only:
            raise errors.invalid("max_tokens must be >= 1 (0 only with echo: the prompt, and its logprobs "
                                 "with logprobs, without a completion)", param="max_tokens")
        structured = await self._structured_outputs(req)
        record.structured = structured.kind if structured is not None else None
        params = self._sampling_fields(req, 1 if echo_only else max_tokens, req.logprobs,  # caps before tokenizing
                                       structured)
        prompts, texts = await self.prompt_ids(req, raw)  # a text None: decoded when echoed
        if req.echo and req.logprobs is not None:
            params["prompt_logprobs"] = req.logprobs
        job = self._job("completion", req, record, arrival, prompts, texts, params, bool(req.echo), req.logprobs)
        job.echo_only = echo_only
        return job

    async def chat_job(self, req: ChatCompletionRequest, record: RequestRecord, arrival: float) -> Job:
        record.priority = req.priority or 0  # logged, refused or not
        record.model = self.check_model(req.model)
        self.check_generates()
        if self.tokenizer is None or not getattr(self.tokenizer, "chat_template", None):
            raise errors.invalid("this model has no chat template: use /v1/completions", param="messages")
        if not req.messages:
            raise errors.invalid("messages must not be empty", param="messages")
        tool_parser, tool_function = self._tool_parser(req)
        if req.top_logprobs is not None and not req.logprobs:
            raise errors.invalid("top_logprobs needs logprobs=true", param="top_logprobs")
        if req.top_logprobs is not None and req.top_logprobs < 0:
            raise errors.invalid("top_logprobs must be >= 0", param="top_logprobs")
        text = await self._chat_text(req)
        tokens = await self._encode(text, add_special_tokens=False)
        kept = self._truncated(req, tokens)
        text, tokens = (text if kept is tokens else None), kept
        max_tokens = req.max_completion_tokens if req.max_completion_tokens is not None else req.max_tokens
        if max_tokens is None:
            info = self.client.info
            room = max(1, info.max_sequence_tokens - len(tokens))
            if req.use_beam_search:  # what the pool holds for every beam apart
                room = max(1, min(room, info.plan.beam_room(len(tokens), req.n or 1, info.num_blocks,
                                                            self.config.engine_args.get("enable_prefix_caching", True))))
            max_tokens = self._default_max_tokens(min(room, self.config.max_tokens_limit or room))
        logprobs = (req.top_logprobs or 0) if req.logprobs else None
        parallel = req.parallel_tool_calls is not False
        structured = await self._structured_outputs(req)
        if tool_parser in FORCED:
            if structured is not None:
                raise errors.invalid('tool_choice "required" or a named function holds the answer to the tools\' '
                                     'JSON: it cannot be combined with response_format or structured_outputs',
                                     param="tool_choice")
            schema = forced_tool_schema(req.tools, tool_function, parallel)
            structured = await self._checked_structure({"json": schema}, "tools")
        record.structured = structured.kind if structured is not None else None
        params = self._sampling_fields(req, max_tokens, logprobs, structured)
        if tool_parser in KEEPS_SPECIAL_TOKENS and "skip_special_tokens" not in req.model_fields_set:
            params["skip_special_tokens"] = False  # as vLLM's: <tool_call>, [TOOL_CALLS] may be special tokens
        job = self._job("chat", req, record, arrival, [tokens], [text], params, False, logprobs)
        job.tool_parser, job.tool_function, job.parallel_tool_calls = tool_parser, tool_function, parallel
        job.tools, job.short_tool_ids = req.tools or [], self.config.short_tool_call_ids
        if self.reasoning is not None:
            job.reasoning_opening = self.reasoning.opening(tokens)
            job.include_reasoning = req.include_reasoning is not False
        return job

    async def _structured_outputs(self, req: CompletionRequest | ChatCompletionRequest
                                  ) -> StructuredOutputsParams | None:
        """The request's structured outputs (None: free text), from OpenAI's response_format or
        vLLM's structured_outputs / guided_json / guided_choice / guided_regex."""
        asked: list[tuple[str, dict[str, Any]]] = []
        fmt = req.response_format
        if fmt is not None:
            kind = fmt.get("type", "text")
            if kind == "json_object":
                asked.append(("response_format", {"json_object": True}))
            elif kind == "json_schema":
                spec = fmt.get("json_schema")
                if not isinstance(spec, dict):
                    raise errors.invalid('response_format "json_schema" needs json_schema: {"name": ..., '
                                         '"schema": {...}}', param="response_format")
                asked.append(("response_format", {"json": spec.get("schema", True)}))
            elif kind != "text":
                raise errors.invalid(f'response_format type must be "text", "json_object" or "json_schema", got '
                                     f'{kind!r:.40}', param="response_format")
        if req.structured_outputs is not None:
            asked.append(("structured_outputs", dict(req.structured_outputs)))
        if req.guided_json is not None:
            asked.append(("guided_json", {"json": req.guided_json}))
        if req.guided_choice is not None:
            asked.append(("guided_choice", {"choice": req.guided_choice}))
        if req.guided_regex is not None:
            asked.append(("guided_regex", {"regex": req.guided_regex}))
        if req.guided_grammar is not None:
            asked.append(("guided_grammar", {"grammar": req.guided_grammar}))
        if len(asked) > 1:
            raise errors.invalid(f"{asked[0][0]} and {asked[1][0]} both ask for a structure: send one",
                                 param=asked[1][0])
        return await self._checked_structure(asked[0][1], asked[0][0]) if asked else None

    async def _checked_structure(self, fields: dict[str, Any], param: str) -> StructuredOutputsParams:
        """StructuredOutputsParams from their fields, checked (the schema compiled) before the
        request reaches the worker; a 400 naming `param` if they can't be served. A long schema
        is compiled on the tokenizer thread (an enum of 100k values takes 0.5 s)."""
        try:
            if len(repr(fields)) <= TOKENIZE_INLINE_CHARS:
                return StructuredOutputsParams(**fields)
            return await asyncio.get_running_loop().run_in_executor(
                self._tokenizer_thread, partial(StructuredOutputsParams, **fields))
        except TypeError as exc:  # a field it does not have
            raise errors.invalid(f"{param}: {exc}".replace("StructuredOutputsParams.__init__() ", ""),
                                 param=param) from None
        except ValueError as exc:
            raise errors.invalid(f"{param}: {exc}", param=param) from None

    def _tool_parser(self, req: ChatCompletionRequest) -> tuple[str | None, str | None]:
        """The parser that reads the answers' tool calls (None: answers are text) and the named
        function's name, as vLLM decides: tools and no tool_choice mean "auto", which needs a
        server with a parser; "required" and a named function hold the answer to the tools' JSON."""
        tools = req.tools or []
        for i, tool in enumerate(tools):
            function = tool.get("function")
            if tool.get("type") != "function" or not isinstance(function, dict) \
                    or not isinstance(function.get("name"), str):
                raise errors.invalid('a tool must be {"type": "function", "function": {"name": ..., ...}}',
                                     param=f"tools.{i}")
        choice = req.tool_choice if req.tool_choice is not None else "auto" if tools else "none"
        if choice == "none":
            return None, None
        if not tools:  # as OpenAI and vLLM
            raise errors.invalid("tool_choice needs tools", param="tool_choice")
        if choice == "auto":
            if self.config.tool_call_parser is None:
                raise errors.invalid('tool_choice "auto" (the default with tools) needs a server started with '
                                     '--enable-auto-tool-choice and --tool-call-parser; "none" shows the model the '
                                     'tools and returns its answer as text', param="tool_choice")
            return self.config.tool_call_parser, None
        if choice == "required":
            return "required", None
        if isinstance(choice, dict):
            function = choice.get("function")
            name = function.get("name") if isinstance(function, dict) else None
            if choice.get("type") != "function" or not isinstance(name, str):
                raise errors.invalid('a named tool_choice is {"type": "function", "function": {"name": ...}}',
                                     param="tool_choice")
            if all(tool["function"]["name"] != name for tool in tools):
                raise errors.invalid(f"tool_choice names {name!r:.80}, which is not one of the tools",
                                     param="tool_choice")
            return "named", name
        raise errors.invalid(f'tool_choice must be "none", "auto", "required" or a named function, got {choice!r}',
                             param="tool_choice")

    # ============================================================== LoRA at runtime
    async def load_lora_adapter(self, name: str, path: str) -> str:
        """vLLM's /v1/load_lora_adapter: the worker reads the adapter (400 naming what is wrong
        with it), then requests may name it."""
        self._check_runtime_lora()
        if not name:
            raise errors.invalid("lora_name must not be empty", param="lora_name")
        if name in (self.model_name, self.client.info.model_path):
            raise errors.invalid(f"'{name}' is the base model's name", param="lora_name")
        if name in self.loras or name in self._loading_loras:
            raise errors.invalid(f"The lora adapter '{name}' has already been loaded.", param="lora_name")
        lora = [name, self._next_lora_id, os.path.expanduser(path)]
        self._next_lora_id += 1
        self._loading_loras.add(name)
        try:
            error = await self.client.call({"type": "load_lora", "lora": lora})
        except EngineDeadError:
            raise errors.engine_dead() from None
        finally:
            self._loading_loras.discard(name)
        if error is not None:
            raise errors.invalid(error, param="lora_path")
        self.loras[name] = lora
        self.metrics.add_lora_adapter(name)
        logger.info("LoRA adapter %r loaded from %s (id %d)", name, lora[2], lora[1])
        return f"Success: LoRA adapter '{name}' added successfully."

    async def unload_lora_adapter(self, name: str) -> str:
        """vLLM's /v1/unload_lora_adapter: new requests may no longer name it (404); those in
        flight finish with it (and its gauges count them)."""
        self._check_runtime_lora()
        lora = self.loras.pop(name, None)
        if lora is None:
            raise APIError(404, f"The lora adapter '{name}' cannot be found.", param="lora_name",
                           code="model_not_found")
        try:
            await self.client.call({"type": "unload_lora", "id": lora[1]})
        except EngineDeadError:
            raise errors.engine_dead() from None
        logger.info("LoRA adapter %r unloaded", name)
        return f"Success: LoRA adapter '{name}' removed successfully."

    def _check_runtime_lora(self) -> None:
        if not self.config.allow_runtime_lora_updating:
            raise APIError(404, "loading LoRA adapters at runtime needs a server started with "
                                "--enable-lora --allow-runtime-lora-updating", code="not_found")

    # ============================================================== tokenizer
    async def tokenize(self, req: TokenizeRequest) -> dict[str, Any]:
        """vLLM's /tokenize: the ids the completions (a prompt) or chat (messages) endpoint
        would give the engine."""
        self.check_model(req.model)
        if (req.prompt is None) == (req.messages is None):
            raise errors.invalid("send either a prompt or messages", param="prompt")
        if req.messages is not None:
            if not getattr(self.tokenizer, "chat_template", None):
                raise errors.invalid("this model has no chat template", param="messages")
            text = await self._chat_text(req)
        else:
            text = req.prompt
        add_special_tokens = req.messages is None if req.add_special_tokens is None else req.add_special_tokens
        tokens = await self._encode(text, add_special_tokens=add_special_tokens)
        return {"count": len(tokens), "max_model_len": self._max_model_len(), "tokens": tokens}

    def detokenize(self, req: DetokenizeRequest) -> dict[str, Any]:
        self.check_model(req.model)
        if self.tokenizer is None:
            raise errors.invalid("this model has no tokenizer", param="tokens")
        if len(req.tokens) > self._max_model_len():  # decoding holds the GIL: 1M tokens, the loop 1.3 s
            raise errors.invalid(f"at most {self._max_model_len()} tokens (the model's context) are decoded at "
                                 f"once, got {len(req.tokens)}", param="tokens")
        bad = self._out_of_vocabulary(req.tokens)
        if bad:
            raise errors.invalid(f"token ids must be in [0, {self.client.info.vocab_size}), got {bad[:5]}",
                                 param="tokens")
        return {"prompt": self.tokenizer.decode(req.tokens)}

    def _out_of_vocabulary(self, tokens: list[int]) -> list[int]:
        vocab = self.client.info.vocab_size
        return [t for t in tokens if not 0 <= t < vocab]

    async def pooling_prompts(self, req: InputOrChat) -> tuple[list[str | list[int]], bool, str]:
        """A pooling body's prompts, whether special tokens are added to them, and the field they
        came from: each of its `input`s (special tokens added unless it says not to), or its
        `messages` rendered by the chat template as one prompt (none added unless it says so:
        the template writes them), as vLLM's chat-form embeddings and classifications."""
        if (req.input is None) == (req.messages is None):
            raise errors.invalid("send either input or messages", param="input")
        if req.messages is None:
            raw = self.prompt_list(req.input, "input")
            check_not_empty(raw, "input")
            return raw, req.add_special_tokens is not False, "input"
        if not req.messages:
            raise errors.invalid("messages must not be empty", param="messages")
        if not getattr(self.tokenizer, "chat_template", None):
            raise errors.invalid("this model has no chat template: send input", param="messages")
        return [await self._chat_text(req)], bool(req.add_special_tokens), "messages"

    async def _chat_text(self, req: ChatCompletionRequest | TokenizeRequest | InputOrChat) -> str:
        """The chat rendered by its template; a long one on the tokenizer thread: Jinja holds
        the GIL but hands it back every few ms (135k messages held the event loop 0.8 s
        inline, the thread 11 ms at a time)."""
        parts = [[m.content] if isinstance(m.content, str) else m.content or [] for m in req.messages]
        chars = sum(len(p if isinstance(p, str) else p.text or "") for message in parts for p in message)
        chars += len(json.dumps(req.tools)) if getattr(req, "tools", None) else 0  # the template shows them
        calls = sum(len(calls) for m in req.messages if isinstance(calls := (m.model_extra or {}).get("tool_calls"), list))
        if sum(map(len, parts)) + calls <= RENDER_INLINE_MESSAGES and chars <= TOKENIZE_INLINE_CHARS:
            return self._render_chat(req)
        return await asyncio.get_running_loop().run_in_executor(self._tokenizer_thread, self._render_chat, req)

    def _render_chat(self, req: ChatCompletionRequest | TokenizeRequest | InputOrChat) -> str:
        messages = []
        for i, m in enumerate(req.messages):
            content = [p.model_dump() for p in m.content] if isinstance(m.content, list) else m.content
            message: dict[str, Any] = {"role": m.role, "content": content}
            if m.name:
                message["name"] = m.name
            message |= {k: v for k, v in (m.model_extra or {}).items() if k not in message}  # tool_calls ...
            try:
                messages.append(template_message(message))
            except UnsupportedContent as exc:
                raise errors.unsupported(str(exc), param=f"messages.{i}.content") from None
            except ValueError as exc:
                raise errors.invalid(str(exc), param=f"messages.{i}.content") from None
        extra = template_variables(req.chat_template_kwargs)
        if req.chat_template is not None:
            if not self.config.trust_request_chat_template:  # as vLLM
                raise errors.invalid("this server takes no chat_template from requests: it must be started with "
                                     "--trust-request-chat-template", param="chat_template")
            extra["chat_template"] = req.chat_template
        continue_final = bool(req.continue_final_message)
        if continue_final and req.add_generation_prompt and "add_generation_prompt" in req.model_fields_set:
            raise errors.invalid("continue_final_message and add_generation_prompt cannot both be true (as vLLM)",
                                 param="continue_final_message")
        try:
            return self.tokenizer.apply_chat_template(
                messages, tokenize=False, add_generation_prompt=bool(req.add_generation_prompt) and not continue_final,
                continue_final_message=continue_final, tools=req.tools or None, **extra)
        except Exception as exc:
            from jinja2 import TemplateError

            if isinstance(exc, TemplateError):  # the template's own message, e.g. "roles must alternate"
                raise errors.invalid(f"chat template error: {exc}", param="messages") from None
            if isinstance(exc, ValueError) and continue_final:
                raise errors.invalid("continue_final_message needs a final assistant message",
                                     param="messages") from None
            raise errors.invalid("the chat template could not render these messages", param="messages") from None

    # ================================================================== run
    async def run(self, job: Job, request: Request) -> Response:
        if self.in_flight >= self.config.max_pending_requests:
            raise errors.unavailable("the server has too many requests in flight; retry later", code="overloaded")
        record = job.record
        if job.lora is not None and self.loras.get(job.model) is not job.lora:  # unloaded since it was checked
            raise errors.model_not_found(job.model)
        info = self.client.info
        max_tokens = job.params.get("max_tokens", 0)  # an embedding's: none, its input alone
        for index, prompt in enumerate(job.prompts):  # one that can never run is a 400, not a 429 of its limits
            try:
                check_admissible(len(prompt), max_tokens, info.max_model_len, info.num_blocks, info.plan)
            except AdmissionError as exc:
                raise self._rejected(job, EngineRejected("admission", exc.code, str(exc)), index) from None
        # Without API keys every client is one: a bearer token nobody checks is no identity.
        client = record.key_id or "" if self.config.api_keys else ""
        record._reservation = self.limits.admit(client, record.prompt_tokens, len(job.prompts) * job.n * max_tokens)
        self.in_flight += 1
        released = False

        generation: Generation | None = None

        def release() -> None:
            nonlocal released
            if not released:
                released = True
                self.in_flight -= 1
                self.live.discard(generation)

        try:
            generation = self.client.generate(job.request_id, job.prompts, job.params, job.arrival,
                                              job.record.priority, job.lora)
            if job.echo_only:
                self.metrics.prompt_only(generation.ids)
            self.live.add(generation)
            try:
                started = await self._wait_started(job, generation, request)
            except asyncio.CancelledError:
                self._abort(job, generation)
                raise
        except EngineDeadError:
            release()
            raise errors.engine_dead() from None
        except EngineRejected as exc:
            release()
            raise self._rejected(job, exc) from None
        except ShuttingDown:  # cut off by the drain timeout before its first step ended
            release()
            raise _shutdown_error() from None
        except BaseException:
            release()
            raise
        if not started:  # the client left while the worker had its requests queued or in a step
            release()
            self.finish(record, status=499, error_type="aborted")
            return Response(status_code=499)
        if job.stream:
            events = self._stream(job, generation) if job.renderer is None else job.renderer.stream(self, job, generation)
            response: Response = SSEResponse(events, on_close=lambda: self._close(job, generation, release))
        else:
            try:
                response = await self._respond(job, generation, request)
            finally:
                release()
        if self.limits.rate_limited:  # OpenAI's x-ratelimit-* headers: what the client has left
            response.headers.update(self.limits.headers(record._reservation.budget))
        return response

    async def _wait_started(self, job: Job, generation: Generation, request: Request) -> bool:
        """Wait for the worker to queue the job's requests (it says so after its next step, and
        that step may be long: a long prompt on the CPU), within the job's deadline (past it, a
        504 and the requests aborted); False if the client left meanwhile (aborted too). The
        worker's refusals are raised."""
        started = generation.started
        watcher = asyncio.ensure_future(wait_for_disconnect(request))
        try:
            done, _ = await asyncio.wait({started, watcher}, timeout=self._remaining(job),
                                         return_when=asyncio.FIRST_COMPLETED)
        finally:
            watcher.cancel()
        if started in done:
            started.result()
            return True
        self._abort(job, generation)
        if watcher in done:
            return False
        raise errors.timeout(self.config.request_timeout or 0.0)

    def cut_off(self) -> None:
        """Drain timeout: abort every request still running; each gets a 503 (or an error event)."""
        for generation in list(self.live):
            generation.abort()
            generation._fail(ShuttingDown())

    def _rejected(self, job: Job, exc: EngineRejected, prompt_index: int | None = None) -> APIError:
        """The error for a refused job; `prompt_index`: the prompt refused, where it is known."""
        error = self._refusal(exc, "messages" if job.kind == "chat" else "prompt")
        return job.renderer.renamed(error, prompt_index) if job.renderer is not None else error

    @staticmethod
    def _refusal(exc: EngineRejected, param: str) -> APIError:
        if exc.kind == "admission":
            if exc.code in ("context_length_exceeded", "kv_cache_too_small"):
                return errors.context_length(exc.message, param=param, code=exc.code)
            if exc.code == "beam_width_too_large":
                param = "n"
            return errors.invalid(exc.message, param=param, code=exc.code)
        if exc.kind == "invalid":
            return errors.invalid(exc.message, param=param)
        return errors.internal()

    def _close(self, job: Job, generation: Generation, release: Callable[[], None]) -> None:
        """A stream ended: if it ended early (client gone, or shutdown past the drain timeout),
        abort its engine requests and log it."""
        release()
        # Not only while the engine runs: a client may leave after the last output came in,
        # before the last chunks went out (the request must still be logged and settled).
        if generation.failed is None and not job.record._finished:
            self._abort(job, generation)
            self.cancelled(job.record)

    def _abort(self, job: Job, generation: Generation) -> None:
        """Stop the job's unfinished engine requests. Their last outputs (the abort's, with the
        engine's timestamps) arrive within a step; the log line waits for them."""
        if not job.choices:  # cancelled before its outputs were awaited
            self._choices(job)
        self._usage(job, job.choices, job.cached)  # what was generated before the cut
        if generation.finished or generation.failed is not None or job.record._awaiting_engine:
            return
        generation.abort()
        job.record._awaiting_engine = True
        generation.on_delivery = partial(self._settle, job, generation)
        # A worker that neither answers nor dies would otherwise keep the line forever.
        job.settle_timer = asyncio.get_running_loop().call_later(ABORT_LOG_GRACE_S, self._settled, job)
        self._settle(job, generation)  # its last outputs may be queued already, unread

    def _settle(self, job: Job, generation: Generation) -> None:
        """An aborted generation's outputs, as they arrive: folded in, and the line written once
        the last one is in (or the worker is gone)."""
        for index, output in generation.take_queued():
            self._absorb(job, job.choices, index, output, job.cached)
        if generation.finished:
            generation.on_delivery = None
            self._usage(job, job.choices, job.cached)
            self._summarize(job, job.choices)  # "abort" (beside what choices finished before)
            self._settled(job)

    def _settled(self, job: Job) -> None:
        if job.settle_timer is not None:
            job.settle_timer.cancel()
            job.settle_timer = None
        record = job.record
        if record._awaiting_engine:
            record._awaiting_engine = False
            if record._finished:
                self._log(record)

    def finish(self, record: RequestRecord, status: int = 200, error_type: str | None = None) -> None:
        """The request's outcome (its first one stands): counted now, logged now or, when it was
        cut short, once the worker confirmed the abort (`_settle`)."""
        if record._finished:
            return
        record._finished = True
        record.status = status
        record.error_type = error_type
        if error_type is not None:
            self.metrics.on_error(error_type)
        if not record._awaiting_engine:
            self._log(record)

    def _log(self, record: RequestRecord) -> None:
        """The request is over: its usage charged to its client's limits, its cost counted, its
        line written (once)."""
        if record._done:
            return
        # Started: the engine's times say so, or tokens came (a worker that died sent no times).
        started = record._scheduled or record.completion_tokens > 0
        cost = self.limits.settle(record._reservation, record.prompt_tokens, record.cached_tokens,
                                  record.completion_tokens, started)
        if self.limits.pricing.priced:
            record.cost = cost
            self.metrics.on_cost(cost)
        if record.reasoning_tokens:
            self.metrics.reasoning_tokens.inc(record.reasoning_tokens)
        self.request_logger.emit(record)

    def fail(self, record: RequestRecord, exc: APIError) -> None:
        self.finish(record, status=exc.status, error_type=exc.metric)

    def cancelled(self, record: RequestRecord) -> None:
        """The handler was cancelled: by shutdown past the drain timeout, or the client left."""
        if self.draining:
            self.finish(record, status=503, error_type="overloaded")
        else:
            self.finish(record, status=499, error_type="aborted")

    # ---------------------------------------------------------------- consuming
    def _choices(self, job: Job) -> list[Choice]:
        job.choices = [Choice(i) for i in range(len(job.prompts) * job.n)]
        return job.choices

    def _absorb(self, job: Job, choices: list[Choice], index: int, output: dict[str, Any],
                cached: dict[int, int]) -> list[tuple[Choice, dict[str, Any]]]:
        """Fold one output frame into the choices; returns (choice, its delta) pairs."""
        cached[index] = output["num_cached_tokens"]
        if "embedding" in output:  # an embedding's one output: its vector, or its abort
            job.embeddings[index] = output["embedding"]
            choices[index].finish_reason = "abort" if output["embedding"] is None else "stop"
        if job.record.ttft_s is None and not job.echo_only and any(c["token_ids"] for c in output["outputs"]):
            # When this process got the first token: the engine's own timestamp replaces it when
            # the request finishes; an aborted request (the client left) keeps it.
            job.record.ttft_s = time.monotonic() - job.arrival
        if "prompt_logprobs" in output:
            job.prompt_logprobs[index] = output["prompt_logprobs"]
        if output["finished"]:
            metrics = output.get("metrics")
            if job.echo_only and metrics:  # no token reached the client
                metrics = metrics | {"first_token_time": None, "inter_token_latencies": []}
            job.record.add_engine_metrics(metrics)
        deltas = []
        for c in output["outputs"]:
            if job.echo_only:  # the token sampled is not the client's: max_tokens=0 was reached
                c = c | {"text": "", "token_ids": [], "logprobs": None, "num_tokens": 0, "stop_reason": None,
                         "finish_reason": scored_prompt_finish(c["finish_reason"])}
            choice = choices[index * job.n + c["index"]]
            choice.text.append(c["text"])
            choice.token_ids.extend(c["token_ids"])
            choice.num_tokens = c["num_tokens"]
            if c["logprobs"] is not None:
                choice.logprobs.extend(c["logprobs"])
            choice.finish_reason = c["finish_reason"]
            choice.stop_reason = c["stop_reason"]
            deltas.append((choice, c))
        return deltas

    def _usage(self, job: Job, choices: list[Choice], cached: dict[int, int]) -> dict[str, Any]:
        prompt_tokens = sum(len(p) for p in job.prompts)
        completion_tokens = sum(c.num_tokens for c in choices)
        cached_tokens = sum(cached.values())
        r = job.record
        r.completion_tokens, r.cached_tokens = completion_tokens, cached_tokens
        usage = {"prompt_tokens": prompt_tokens, "completion_tokens": completion_tokens,
                 "total_tokens": prompt_tokens + completion_tokens,
                 "prompt_tokens_details": {"cached_tokens": cached_tokens}}
        if job.reasoning_opening is not None:  # OpenAI's: the completion tokens spent reasoning
            r.reasoning_tokens = sum(ReasoningPhase(self.reasoning, job.reasoning_opening).extend(c.token_ids)
                                     .reasoning_tokens for c in choices)
            usage["completion_tokens_details"] = {"reasoning_tokens": r.reasoning_tokens}
        return usage

    def _summarize(self, job: Job, choices: list[Choice]) -> None:
        reasons = sorted({c.finish_reason for c in choices if c.finish_reason})
        job.record.finish_reason = ",".join(reasons) or None
        if self.request_logger.log_text and not job.pooling:  # a pooling request's output is no text
            outputs = ["".join(c.text) for c in choices]
            job.record.output = outputs[0] if len(outputs) == 1 else outputs

    def _remaining(self, job: Job) -> float | None:
        """Seconds left of the request timeout, which runs from the request's arrival."""
        if self.config.request_timeout is None:
            return None
        return max(0.0, job.arrival + self.config.request_timeout - time.monotonic())

    async def _respond(self, job: Job, generation: Generation, request: Request) -> Response:
        choices, cached = self._choices(job), job.cached

        async def consume() -> None:
            async for index, output in generation:
                self._absorb(job, choices, index, output, cached)

        consumer = asyncio.ensure_future(consume())
        watcher = asyncio.ensure_future(wait_for_disconnect(request))
        timeout = self._remaining(job)
        try:
            done, _ = await asyncio.wait({consumer, watcher}, timeout=timeout, return_when=asyncio.FIRST_COMPLETED)
        finally:
            watcher.cancel()
            if not consumer.done():
                consumer.cancel()
                self._abort(job, generation)
        if consumer in done:
            exc = consumer.exception()
            if isinstance(exc, (EngineDeadError, ShuttingDown)):
                self._usage(job, choices, cached)  # the log line's tokens: what came before the end
                error = errors.engine_dead("the engine stopped while serving this request") \
                    if isinstance(exc, EngineDeadError) else _shutdown_error()
                raise error from None
            if exc is not None:
                raise exc
            usage = self._usage(job, choices, cached)
            if job.kind == "chat" and job.renderer is None:  # a renderer reads the answer its own way
                for choice in choices:
                    content = self._reasoning_split(job, choice, "".join(choice.text), final=True)[1]
                    if job.tool_parser is not None:
                        self._read_tool_calls(job, choice, content, final=True)
            self._summarize(job, choices)
            body = self._completion_body(job, choices, usage) if job.kind == "completion" \
                else self._chat_body(job, choices, usage) if job.renderer is None \
                else job.renderer.body(self, job, choices, usage)
            if inspect.isawaitable(body):  # rendered off the event loop (a long one)
                body = await body
            self.finish(job.record)
            return body if isinstance(body, Response) else JSONResponse(body)
        if watcher in done:  # the client is gone: nobody reads this response
            self.finish(job.record, status=499, error_type="aborted")
            return Response(status_code=499)
        raise errors.timeout(self.config.request_timeout or 0.0)

    async def _stream(self, job: Job, generation: Generation) -> AsyncIterator[str]:
        choices, cached = self._choices(job), job.cached
        chat = job.kind == "chat"
        try:
            echo_pending = {choice.index for choice in choices} if job.echo else set()
            if job.echo and job.logprobs is None:
                for choice in choices:
                    prompt_text = self._echoed(job, choice.index // job.n)[0]
                    choice.text_offset = len(prompt_text)
                    yield sse(self._completion_chunk(job, choice.index, prompt_text, None, None))
                echo_pending.clear()
            iterator = generation.batches()
            while True:
                try:
                    remaining = self._remaining(job)
                    if remaining is None:
                        batch = await iterator.__anext__()
                    else:
                        batch = await asyncio.wait_for(iterator.__anext__(), remaining)
                except StopAsyncIteration:
                    break
                deltas = [d for index, output in batch for d in self._absorb(job, choices, index, output, cached)]
                for choice, delta in merge_deltas(deltas):
                    if choice.index in echo_pending:  # echo with logprobs: the prompt's come first
                        echo_pending.discard(choice.index)
                        prompt_text, prompt_logprobs = self._echoed(job, choice.index // job.n)
                        choice.text_offset = _text_end(prompt_logprobs)
                        yield sse(self._completion_chunk(job, choice.index, prompt_text, prompt_logprobs, None))
                    text, token_ids, reason = delta["text"], delta["token_ids"], delta["finish_reason"]
                    if not text and reason is None and not (job.logprobs is not None and token_ids):
                        continue
                    logprobs: dict[str, Any] | None = None
                    chat_logprobs: str | None = None  # as JSON text
                    if job.logprobs is not None and delta["logprobs"]:
                        if chat:
                            chat_logprobs = self._chat_logprobs_json(job, token_ids, delta["logprobs"])
                        else:  # offsets run on from the previous chunk's, as in the whole body
                            logprobs = self._completion_logprobs(token_ids, delta["logprobs"], choice.text_offset)
                            choice.text_offset = _text_end(logprobs)
                    if chat and not choice.started:
                        choice.started = True
                        yield sse(self._chat_chunk(job, choice.index, {"role": "assistant", "content": ""}, None, None))
                    if job.reasoning_opening is not None:
                        reasoning, text = self._reasoning_split(job, choice, text, final=reason is not None)
                        if reasoning and job.include_reasoning:
                            yield self._reasoning_chunk(job, choice.index, reasoning, chat_logprobs)
                            chat_logprobs = None  # they rode on the reasoning
                        if not text and reason is None and chat_logprobs is None:
                            continue
                    if job.tool_parser is not None:
                        for line in self._tool_call_chunks(job, choice, text, reason, chat_logprobs):
                            yield line
                        continue
                    if text and logprobs is None and chat_logprobs is None and reason is None \
                            and not job.continuous_usage:  # most chunks
                        yield self._text_chunk(job, choice.index, text)
                    elif chat:
                        slot = None if chat_logprobs is None else _PLACEHOLDER
                        yield _with_logprobs(sse(self._chat_chunk(job, choice.index, {"content": text} if text else {},
                                                                  slot, reason)), chat_logprobs)
                    else:
                        yield sse(self._completion_chunk(job, choice.index, text, logprobs, reason))
            usage = self._usage(job, choices, cached)
            if job.include_usage:
                yield sse({"id": job.request_id, "object": "chat.completion.chunk" if chat else "text_completion",
                           "created": job.created, "model": job.model, "choices": [], "usage": usage})
            self._summarize(job, choices)
            self.finish(job.record)
            yield sse("[DONE]")
        except Exception as exc:  # the status line went out already: the error goes in the stream
            error = self.stream_failed(job, generation, exc)
            yield sse(error.body())
            yield sse("[DONE]")

    def stream_failed(self, job: Job, generation: Generation, exc: Exception) -> APIError:
        """A stream that failed after its status line went out: its requests aborted, its
        failure counted and logged; the error it ends with."""
        self._abort(job, generation)
        if isinstance(exc, asyncio.TimeoutError):
            error = errors.timeout(self.config.request_timeout or 0.0)
        elif isinstance(exc, EngineDeadError):
            error = errors.engine_dead("the engine stopped while serving this request")
        elif isinstance(exc, ShuttingDown):
            error = _shutdown_error()
        else:
            logger.exception("streaming %s failed", job.request_id)
            error = errors.internal()
        self.fail(job.record, error)
        return error

    # ---------------------------------------------------------------- reasoning
    def _reasoning_split(self, job: Job, choice: Choice, text: str, final: bool) -> tuple[str, str]:
        """A chat choice's new text as (reasoning, content), by the server's reasoning parser
        (all content without one); at the end (`final`), what the parser held back too."""
        if job.reasoning_opening is None:
            return "", text
        if choice.reasoning is None:
            choice.reasoning = ReasoningSplitter(job.reasoning_opening)
        return choice.reasoning.read(text, final)

    def _reasoning_chunk(self, job: Job, index: int, reasoning: str, logprobs: str | None) -> str:
        """A delta of reasoning, under both names clients read: `reasoning` (vLLM's) and
        `reasoning_content` (DeepSeek's API, and vLLM's before)."""
        if logprobs is None and not job.continuous_usage:
            return self._text_chunk(job, index, reasoning, "reasoning")
        chunk = self._chat_chunk(job, index, {"reasoning": reasoning, "reasoning_content": reasoning},
                                 None if logprobs is None else _PLACEHOLDER, None)
        return _with_logprobs(sse(chunk), logprobs)

    # ---------------------------------------------------------------- tool calls
    def _read_tool_calls(self, job: Job, choice: Choice, text: str, final: bool
                         ) -> tuple[str, list[dict[str, Any]]]:
        """Feed a chat choice's new text to its tool call parser (and at the end, finish it):
        the content and the calls it released. The choice keeps the answer's content and calls,
        and finishes by "tool_calls" once it made one (as vLLM's; a named function's call keeps
        the engine's finish)."""
        if choice.tool_parser is None:
            choice.tool_parser = job.new_tool_parser()
        parser = choice.tool_parser
        content, calls = parser.feed(text)
        if final:
            more, last = parser.finish(cut=choice.finish_reason == "length")
            content, calls = content + more, calls + last
            if parser.calls and parser.kind != "named":  # vLLM's: a named function's finish stays
                choice.finish_reason = "tool_calls"
        if not job.parallel_tool_calls:
            calls = [call for call in calls if call["index"] == 0]
        choice.content = (choice.content or "") + content
        choice.tool_calls += [{k: v for k, v in call.items() if k != "index"} for call in calls]
        if final:
            choice.content = message_content(choice.content, bool(choice.tool_calls))
        return content, calls

    def _tool_call_chunks(self, job: Job, choice: Choice, text: str, reason: str | None,
                          logprobs: str | None) -> list[str]:
        """A chat choice's delta as its tool call parser releases it: the content it lets
        through, then each call whole, in chunks of their own (the `openai` SDK joins a call's
        argument pieces, here one); the logprobs ride on the first chunk."""
        content, calls = self._read_tool_calls(job, choice, text, final=reason is not None)
        if content and not calls and logprobs is None and reason is None and not job.continuous_usage:
            return [self._text_chunk(job, choice.index, content)]  # most chunks: text only, the fast path
        reason = choice.finish_reason if reason is not None else None
        deltas: list[dict[str, Any]] = ([{"content": content}] if content else []) + [{"tool_calls": [call]}
                                                                                        for call in calls]
        if not deltas and (logprobs is not None or reason is not None):
            deltas = [{}]
        lines = []
        for i, delta in enumerate(deltas):
            slot = _PLACEHOLDER if i == 0 and logprobs is not None else None
            chunk = self._chat_chunk(job, choice.index, delta, slot, reason if i == len(deltas) - 1 else None)
            lines.append(_with_logprobs(sse(chunk), logprobs if slot else None))
        return lines

    # ---------------------------------------------------------------- response bodies
    def _decode_token(self, token_id: int) -> str:
        if self.tokenizer is None:
            return f"<{token_id}>"
        return self.tokenizer.decode([token_id])

    def _prompt_text(self, job: Job, prompt_index: int) -> str:
        """A prompt's text, its token ids decoded where it came as ids ("" where some are outside
        the vocabulary: the engine refuses it)."""
        text = job.prompt_texts[prompt_index]
        if text is None:
            tokens = job.prompts[prompt_index]
            decodes = self.tokenizer is not None and not self._out_of_vocabulary(tokens)
            text = self.tokenizer.decode(tokens) if decodes else ""
        return text

    def _completion_logprobs(self, token_ids: list[int], entries: list[list[list[float]]],
                             offset: int) -> dict[str, Any]:
        tokens, token_logprobs, top, offsets = [], [], [], []
        for tid, entry in zip(token_ids, entries):
            s = self._token_str(tid)
            pairs, ranked = _ranked(entry)
            tokens.append(s)
            token_logprobs.append(pairs.get(tid))
            top.append({self._token_str(t): lp for t, lp in ranked})
            offsets.append(offset)
            offset += len(s)
        return {"tokens": tokens, "token_logprobs": token_logprobs, "top_logprobs": top, "text_offset": offsets}

    def _echoed(self, job: Job, prompt_index: int) -> tuple[str, dict[str, Any] | None]:
        """An echoed prompt's text and, with logprobs, its logprobs object: built once for its n
        choices, streamed or not (2,000 tokens x 20 logprobs x 16 prompts, rebuilt for each of
        n = 16, held the event loop 13 s). Asked for once its prompt's logprobs are all in."""
        echoed = job.echoed.get(prompt_index)
        if echoed is None:
            logprobs = self._prompt_logprobs(job, prompt_index) if job.logprobs is not None else None
            echoed = job.echoed[prompt_index] = (self._prompt_text(job, prompt_index), logprobs)
        return echoed

    def _prompt_logprobs(self, job: Job, prompt_index: int) -> dict[str, Any]:
        """The completions logprobs object for the echoed prompt (the first token has none)."""
        entries = job.prompt_logprobs.get(prompt_index) or []
        prompt = job.prompts[prompt_index][: len(entries)]
        logprobs = self._completion_logprobs(prompt, [e or [] for e in entries], 0)
        for i, entry in enumerate(entries):
            if entry is None:
                logprobs["token_logprobs"][i] = logprobs["top_logprobs"][i] = None
        return logprobs

    def _chat_logprobs(self, job: Job, token_ids: list[int], entries: list[list[list[float]]]) -> dict[str, Any]:
        content = []
        k = job.logprobs or 0
        for tid, entry in zip(token_ids, entries):
            pairs, ranked = _ranked(entry)
            s = self._token_str(tid)
            content.append({
                "token": s, "logprob": pairs.get(tid), "bytes": self._token_bytes(tid),
                "top_logprobs": [{"token": self._token_str(t), "logprob": lp,
                                  "bytes": self._token_bytes(t)} for t, lp in ranked[:k]],
            })
        return {"content": content}

    def _byte_list(self, token_id: int) -> list[int]:
        """Chat logprobs' `bytes` of a token: its own (server/token_bytes.py), not its text's
        U+FFFD when it is part of a character. Cached: the lists are shared, never changed."""
        s = self._token_str(token_id)
        return list(self._read_bytes(token_id, s) if self._read_bytes is not None else s.encode())

    def _token_pieces(self, token_id: int) -> tuple[str, str]:
        """A token's string as JSON, and chat's `,"bytes":[...]` after it (`_token_json`)."""
        return _dumps(self._token_str(token_id)), ',"bytes":' + _dumps(self._token_bytes(token_id))

    def _chat_logprobs_json(self, job: Job, token_ids: list[int], entries: list[list[list[float]]]) -> str:
        """`_chat_logprobs` as JSON text, for a stream's chunks: the same bytes as `_dumps` of it
        (tests hold them equal), from pieces cached per token id. Building the objects and
        encoding them took twice as long with 20 top logprobs (~75 µs a token), most of it
        the encoder's on the byte lists (docs/measurements/cpu-2026-12-01c). Completions'
        logprobs have no byte lists: building their text saved nothing there."""
        content = []
        k = job.logprobs or 0
        for tid, entry in zip(token_ids, entries):
            pairs, ranked = _ranked(entry)
            top = []
            for t, lp in ranked[:k]:
                s, b = self._token_json(t)
                top.append(f'{{"token":{s},"logprob":{_number(lp)}{b}}}')
            s, b = self._token_json(tid)
            content.append(f'{{"token":{s},"logprob":{_number(pairs.get(tid))}{b},"top_logprobs":[{",".join(top)}]}}')
        return '{"content":[' + ",".join(content) + "]}"

    def _text_chunk(self, job: Job, index: int, text: str, kind: str = "content") -> str:
        """The SSE line of a chunk with text only (no logprobs, no finish reason): the generic
        chunk rendered once per choice around a placeholder, then only the text is encoded for
        each token. The same bytes as `sse(self._chat_chunk(...))` / `_completion_chunk`, in a
        quarter of the time, and it runs for every token of every stream. `kind` "reasoning":
        a chat's reasoning delta (`_reasoning_chunk`)."""
        around = job.text_chunks.get((index, kind))
        if around is None:
            delta = {"reasoning": _PLACEHOLDER, "reasoning_content": _PLACEHOLDER} if kind == "reasoning" \
                else {"content": _PLACEHOLDER}
            chunk = self._chat_chunk(job, index, delta, None, None) if job.kind == "chat" \
                else self._completion_chunk(job, index, _PLACEHOLDER, None, None)
            around = job.text_chunks[(index, kind)] = sse(chunk).split(_dumps(_PLACEHOLDER))
        return _dumps(text).join(around)

    def _completion_chunk(self, job: Job, index: int, text: str, logprobs: dict[str, Any] | None,
                          finish_reason: str | None) -> dict[str, Any]:
        return self._chunk(job, index, "text_completion",
                           {"index": index, "text": text, "logprobs": logprobs, "finish_reason": finish_reason})

    def _chat_chunk(self, job: Job, index: int, delta: dict[str, Any], logprobs: dict[str, Any] | str | None,
                    finish_reason: str | None) -> dict[str, Any]:
        """logprobs: the objects, or `_PLACEHOLDER` for `_with_logprobs` to replace."""
        return self._chunk(job, index, "chat.completion.chunk",
                           {"index": index, "delta": delta, "logprobs": logprobs, "finish_reason": finish_reason})

    @staticmethod
    def _chunk(job: Job, index: int, kind: str, choice: dict[str, Any]) -> dict[str, Any]:
        if choice["finish_reason"] is not None:  # the choice's last chunk, as vLLM's: what stopped it
            choice["stop_reason"] = job.choices[index].stop_reason
        chunk = {"id": job.request_id, "object": kind, "created": job.created, "model": job.model, "choices": [choice]}
        if job.continuous_usage:  # as vLLM's: the choice's own tokens so far (none before its content)
            prompt_tokens = len(job.prompts[index // job.n])
            completion_tokens = 0 if "role" in choice.get("delta", ()) else job.choices[index].num_tokens
            chunk["usage"] = {"prompt_tokens": prompt_tokens, "completion_tokens": completion_tokens,
                              "total_tokens": prompt_tokens + completion_tokens}
        elif job.include_usage:  # OpenAI's: every chunk before the usage chunk has a null usage
            chunk["usage"] = None
        return chunk

    def _completion_body(self, job: Job, choices: list[Choice], usage: dict[str, Any]) -> dict[str, Any]:
        out = []
        for choice in choices:
            text = "".join(choice.text)
            prefix = self._echoed(job, choice.index // job.n)[0] if job.echo else ""
            logprobs = None
            if job.logprobs is not None:
                # Offsets run on from the prompt's, as one pass over prompt and output would.
                prompt = self._echoed(job, choice.index // job.n)[1] if job.echo else None
                logprobs = self._completion_logprobs(choice.token_ids, choice.logprobs, _text_end(prompt))
                if prompt is not None:
                    logprobs = {key: prompt[key] + logprobs[key] for key in logprobs}
            out.append({"index": choice.index, "text": prefix + text, "logprobs": logprobs,
                        "finish_reason": choice.finish_reason, "stop_reason": choice.stop_reason})
        return {"id": job.request_id, "object": "text_completion", "created": job.created, "model": job.model,
                "choices": out, "usage": usage, "system_fingerprint": None}

    def _chat_body(self, job: Job, choices: list[Choice], usage: dict[str, Any]) -> dict[str, Any]:
        out = []
        for choice in choices:
            logprobs = None
            if job.logprobs is not None:
                logprobs = self._chat_logprobs(job, choice.token_ids, choice.logprobs)
            content = "".join(choice.text) if choice.reasoning is None else choice.reasoning.content
            message = {"role": "assistant", "content": content, "refusal": None}  # OpenAI's keys
            if job.reasoning_opening is not None:  # both names, as `_reasoning_chunk`
                reasoning = choice.reasoning.reasoning if job.include_reasoning else None
                message |= {"reasoning": reasoning, "reasoning_content": reasoning}
            if job.tool_parser is not None:  # no content at all (thinking cut short): None
                message |= {"content": None if content is None else choice.content, "tool_calls": choice.tool_calls}
            out.append({"index": choice.index, "message": message, "logprobs": logprobs,
                        "finish_reason": choice.finish_reason, "stop_reason": choice.stop_reason})
        return {"id": job.request_id, "object": "chat.completion", "created": job.created, "model": job.model,
                "choices": out, "usage": usage, "system_fingerprint": None}
