"""OpenAI's Responses API (`POST /v1/responses`), as vLLM serves it, over the chat path: a
request's `instructions`, `input` items (messages, function calls and their outputs), function
`tools`, `tool_choice` and `text.format` become a chat (server/serving.py checks and runs it,
with the server's template, tool call parser and reasoning parser), and its answer comes back
as the Responses API's output items: a `reasoning` item (the reasoning parser's thinking), a
`message` with its `output_text`, and a `function_call` item per tool call; streamed as the
API's typed events (`response.created` ... `response.output_text.delta` ...
`response.completed`), whose items and text add up to the final response exactly.

With `--max-stored-responses N`, the last N responses asked to be stored (`store`, true unless
set false, as OpenAI's) are kept in memory with their conversation, for their client (API key)
alone: `previous_response_id` continues one, `GET /v1/responses/{id}` returns it and `DELETE`
drops it. A restart forgets them all.

Not served (a 400 that names them): `previous_response_id` on a server that stores nothing,
`conversation`, `prompt`, `background`, tools other than functions, `truncation: "auto"`,
output text logprobs (`top_logprobs`, `include: ["message.output_text.logprobs"]`), and input
content other than text.
"""

from __future__ import annotations

import asyncio
import json
import re
from collections import OrderedDict
from collections.abc import AsyncIterator
from dataclasses import dataclass
from typing import Any

from pydantic import ValidationError

from engine.reasoning import ReasoningSplitter
from server import errors
from server.engine_client import Generation
from server.config import ServerConfig
from server.errors import APIError
from server.protocol import ChatCompletionRequest, ResponsesRequest
from server.request_log import RequestRecord
from server.serving import Choice, Job, OpenAIServing, _dumps, merge_deltas
from server.tool_parsers import ToolCallParser


# What OpenAI's `include` may ask for. Its output items' extra data, which stoke's items never
# have (no search, code, computer or image items; reasoning is not encrypted), is nothing to add:
# asked for, it is left out as OpenAI leaves out what an answer has not got. Logprobs are a 400.
INCLUDABLE = frozenset({"code_interpreter_call.outputs", "computer_call_output.output.image_url",
                        "file_search_call.results", "message.input_image.image_url", "message.output_text.logprobs",
                        "reasoning.encrypted_content", "web_search_call.action.sources", "web_search_call.results"})
# Chat fields a Responses request maps onto, and the Responses field a chat error names instead.
_PARAMS = {"messages": "input", "max_tokens": "max_output_tokens", "response_format": "text.format"}
_PASSED = ("model", "temperature", "top_p", "parallel_tool_calls", "stream", "user", "seed", "top_k", "min_p",
           "repetition_penalty", "stop", "priority", "chat_template_kwargs")


@dataclass(slots=True)
class StoredResponse:
    owner: str | None  # the client's key id: no other client sees it
    body: dict[str, Any]
    messages: list[dict[str, Any]]  # its conversation, its own output last (instructions left out)


class ResponseStore:
    """The last `size` stored responses, in memory, least recently used out first."""

    def __init__(self, size: int) -> None:
        self.size = size
        self._stored: OrderedDict[str, StoredResponse] = OrderedDict()

    def put(self, response_id: str, stored: StoredResponse) -> None:
        self._stored[response_id] = stored
        self._stored.move_to_end(response_id)
        while len(self._stored) > self.size:
            self._stored.popitem(last=False)

    def get(self, response_id: str, owner: str | None) -> StoredResponse | None:
        stored = self._stored.get(response_id)
        if stored is None or stored.owner != owner:
            return None
        self._stored.move_to_end(response_id)
        return stored

    def delete(self, response_id: str, owner: str | None) -> bool:
        if self.get(response_id, owner) is None:
            return False
        del self._stored[response_id]
        return True


def conversation(req: ResponsesRequest, history: list[dict[str, Any]] = (),
                 origins: list[str] | None = None) -> list[dict[str, Any]]:
    """The chat messages of a request's input after a stored conversation (`history`), its
    instructions left out (they are the request's own, never carried on). `origins` gets, for
    each message, what the request calls it (`input.3`), for the 400s the chat path names."""
    messages = [dict(m) for m in history]
    if messages and messages[-1].get("tool_calls") is not None:  # a call may join that turn: not the stored one
        messages[-1]["tool_calls"] = list(messages[-1]["tool_calls"])
    names = ["previous_response_id"] * len(messages)
    items = [{"role": "user", "content": req.input}] if isinstance(req.input, str) else req.input
    for i, item in enumerate(items):
        new = _messages(item, i, messages)
        messages += new
        names += [f"input.{i}" if isinstance(req.input, list) else "input"] * len(new)
    if origins is not None:
        origins += names
    return messages


def chat_request(req: ResponsesRequest, messages: list[dict[str, Any]] | None = None,
                 origins: list[str] | None = None) -> ChatCompletionRequest:
    """The chat that answers a Responses request (`messages`: its `conversation`, whose
    `origins` it puts its instructions before); APIError (400) for what it can't be."""
    if req.previous_response_id is not None and messages is None:
        raise errors.invalid("this server stores no responses (start it with --max-stored-responses): send the "
                             "whole conversation as input", param="previous_response_id")
    for name in ("conversation", "prompt"):
        if getattr(req, name) is not None:
            raise errors.unsupported(f"{name} is not supported: stoke keeps no conversations or prompt objects; send "
                                     "the messages as input (or previous_response_id)", param=name)
    if req.background:
        raise errors.unsupported("background responses are not supported: stream, or wait for the response",
                                 param="background")
    for i, item in enumerate(req.include or []):
        if item not in INCLUDABLE:
            raise errors.invalid(f"include.{i} must be one of {', '.join(sorted(INCLUDABLE))}", param=f"include.{i}")
    if req.top_logprobs or "message.output_text.logprobs" in (req.include or []):
        raise errors.unsupported("output text logprobs are not served by the Responses API here: ask "
                                 "/v1/chat/completions with logprobs and top_logprobs",
                                 param="top_logprobs" if req.top_logprobs else "include")
    if req.truncation not in (None, "disabled"):
        raise errors.invalid('truncation must be "disabled": stoke does not drop input items to fit the context',
                             param="truncation")
    fields: dict[str, Any] = {name: getattr(req, name) for name in _PASSED if name in req.model_fields_set}
    instructions = [{"role": "system", "content": req.instructions}] if req.instructions is not None else []
    names: list[str] = []
    fields["messages"] = instructions + (conversation(req, origins=names) if messages is None else messages)
    if origins is not None:
        origins[:0] = ["instructions"] * len(instructions) + names
    if req.max_output_tokens is not None:
        fields["max_tokens"] = req.max_output_tokens
    if req.tools is not None:
        fields["tools"] = [_chat_tool(tool, i) for i, tool in enumerate(req.tools)]
    if req.tool_choice is not None:
        choice = req.tool_choice
        if isinstance(choice, dict):
            if choice.get("type") != "function" or not isinstance(choice.get("name"), str):
                raise errors.invalid('a named tool_choice is {"type": "function", "name": ...}', param="tool_choice")
            choice = {"type": "function", "function": {"name": choice["name"]}}
        fields["tool_choice"] = choice
    if req.text is not None and req.text.get("format") is not None:
        fields["response_format"] = _response_format(req.text["format"])
    try:
        return ChatCompletionRequest(**fields)
    except ValidationError as exc:  # as a chat body's 400 ("messages.3.content..."), which responses_job renames
        raise errors.from_validation_errors(list(exc.errors())) from None


def _messages(item: Any, index: int, before: list[dict[str, Any]]) -> list[dict[str, Any]]:
    """The chat messages of one input item (a function call joins the assistant message before it)."""
    param = f"input.{index}"
    if not isinstance(item, dict):
        raise errors.invalid("an input item must be an object", param=param)
    kind = item.get("type", "message")
    if kind == "message":
        role = item.get("role")
        if role not in ("user", "assistant", "system", "developer"):
            raise errors.invalid(f"an input message's role must be user, assistant, system or developer, got "
                                 f"{role!r:.40}", param=f"{param}.role")
        return [{"role": "system" if role == "developer" else role, "content": _text(item.get("content"), param)}]
    if kind == "function_call":
        call = {"id": item.get("call_id"), "type": "function",
                "function": {"name": item.get("name"), "arguments": item.get("arguments")}}
        if not all(isinstance(v, str) for v in (call["id"], *call["function"].values())):
            raise errors.invalid("a function_call item needs call_id, name and arguments (strings)", param=param)
        last = before[-1] if before else None
        if last is not None and last["role"] == "assistant":  # a response's output sent back: one turn
            if last.get("tool_calls") is None:
                last["tool_calls"] = []
            last["tool_calls"].append(call)  # the conversation's own list (`conversation`)
            return []
        return [{"role": "assistant", "content": None, "tool_calls": [call]}]
    if kind == "function_call_output":
        output = item.get("output")
        if not isinstance(item.get("call_id"), str) or not isinstance(output, (str, list)):
            raise errors.invalid("a function_call_output item needs call_id and output (a string or text parts)",
                                 param=param)
        content = output if isinstance(output, str) else _text(output, param, "output")
        return [{"role": "tool", "tool_call_id": item["call_id"], "content": content}]
    if kind == "reasoning":  # a past answer's thinking: templates leave it out of the history
        return []
    raise errors.unsupported(f"input items of type {kind!r:.40} are not supported", param=f"{param}.type")


def _text(content: Any, param: str, field: str = "content") -> str | list[dict[str, Any]]:
    """A message's content (or a function call output) as a chat's: a string, or its text parts."""
    if isinstance(content, str):
        return content
    if not isinstance(content, list):
        raise errors.invalid(f"a message's {field} must be a string or a list of content parts",
                             param=f"{param}.{field}")
    parts = []
    for j, part in enumerate(content):
        kind = part.get("type") if isinstance(part, dict) else None
        if kind not in ("input_text", "output_text"):
            raise errors.unsupported(f"content parts of type {kind!r:.40} are not supported (text only)",
                                     param=f"{param}.{field}.{j}")
        if not isinstance(part.get("text"), str):
            raise errors.invalid("a text part needs text (a string)", param=f"{param}.{field}.{j}.text")
        parts.append({"type": "text", "text": part["text"]})
    return parts


def _chat_tool(tool: Any, index: int) -> dict[str, Any]:
    if not isinstance(tool, dict) or tool.get("type") != "function":
        kind = tool.get("type") if isinstance(tool, dict) else None
        raise errors.unsupported(f"tools of type {kind!r:.40} are not supported: function tools only",
                                 param=f"tools.{index}")
    if not isinstance(tool.get("name"), str):  # the chat's shape ({"function": {...}}) included
        raise errors.invalid('a function tool is {"type": "function", "name": ..., "parameters": {...}}',
                             param=f"tools.{index}")
    function = {k: tool[k] for k in ("name", "description", "parameters") if tool.get(k) is not None}
    return {"type": "function", "function": function}


def _response_format(fmt: Any) -> dict[str, Any]:
    kind = fmt.get("type") if isinstance(fmt, dict) else None
    if kind == "json_schema":
        return {"type": "json_schema", "json_schema": {"name": fmt.get("name"), "schema": fmt.get("schema", True)}}
    if kind not in ("text", "json_object"):
        raise errors.invalid('text.format is {"type": "text"}, {"type": "json_object"} or {"type": "json_schema", '
                             '"name": ..., "schema": {...}}', param="text.format")
    return {"type": kind}


def response_owner(config: ServerConfig, key_id: str | None) -> str | None:
    """Whose stored responses a client sees: its API key's (its key id). Without API keys every
    client is one: a bearer token nobody checks is no owner."""
    return key_id if config.api_keys else None


async def responses_job(serving: OpenAIServing, store: ResponseStore | None, req: ResponsesRequest,
                        record: RequestRecord, arrival: float) -> Job:
    """A Job for a Responses request: the chat's, rendered by a ResponsesRenderer (`store`: the
    server's stored responses, --max-stored-responses; None: none)."""
    owner = response_owner(serving.config, record.key_id)
    messages, origins = None, []
    try:
        if store is not None:
            history: list[dict[str, Any]] = []
            if req.previous_response_id is not None:
                stored = store.get(req.previous_response_id, owner)
                if stored is None:
                    raise errors.response_not_found(req.previous_response_id, param="previous_response_id")
                history = stored.messages
            messages = conversation(req, history, origins)
        job = await serving.chat_job(chat_request(req, messages, origins), record, arrival)
    except APIError as exc:
        raise _renamed(exc, origins) from None
    keep = store is not None and req.store is not False
    job.renderer = ResponsesRenderer(req, store if keep else None, messages or [], owner)
    return job


def _renamed(exc: APIError, origins: list[str]) -> APIError:
    """A chat path's 400 named as the Responses request names what it is about: chat message 3
    is the input item it came from (`origins`), max_tokens is max_output_tokens ..."""
    root, *rest = (exc.param or "").split(".")
    if root == "messages" and rest and rest[0].isdigit() and int(rest[0]) < len(origins):
        exc.param = ".".join([origins[int(rest[0])], *rest[1:]])
    elif root in _PARAMS:
        exc.param = ".".join([_PARAMS[root], *rest])
    exc.message = _CHAT_NAMES.sub(lambda m: _PARAMS[m.group(0)], exc.message)
    return exc


_CHAT_NAMES = re.compile(r"\b(" + "|".join(_PARAMS) + r")\b")


def _event(kind: str, sequence: int | str, **fields: Any) -> str:
    return f"event: {kind}\ndata: {_dumps({'type': kind, 'sequence_number': sequence, **fields})}\n\n"


_SEQUENCE, _DELTA = "\x00sequence\x00", "\x00delta\x00"  # placeholders no real field encodes to


class ResponsesRenderer:
    """One Responses request's output: its items as the answer releases them (`release`, or
    `add` what a reader released), the stream's events they make (`take_events`), and the
    response object around them (`response`), stored once it ended if it asked to be (`keep`)."""

    def __init__(self, req: ResponsesRequest, store: ResponseStore | None = None,
                 messages: list[dict[str, Any]] = (), owner: str | None = None) -> None:
        """`store`: where the response is kept once it ended, with `messages` (its conversation)
        and its `owner`'s key id."""
        self.req, self.store, self.messages, self.owner = req, store, messages, owner
        self._splitter: ReasoningSplitter | None = None  # the job's reasoning parser's, made at the first text
        self._parser: ToolCallParser | None = None  # the job's tool call parser's
        self.items: list[dict[str, Any]] = []  # in the order they opened: their output_index
        self._open: dict[str, Any] | None = None  # the reasoning or message item text goes on
        self._blank = ""  # whitespace that would open a message: it waits for text (none: no message)
        self._sequence = 0
        self._events: list[tuple[str, dict[str, Any]]] = []
        # (event type, item id) → a delta event's line around its sequence number and delta
        self._delta_lines: dict[tuple[str, str], tuple[str, str, str]] = {}

    # ---------------------------------------------------------------- items
    def _emit(self, kind: str, **fields: Any) -> None:
        self._events.append((kind, fields))

    def _opened(self, job: Job, kind: str) -> dict[str, Any]:
        """The open item of this kind (reasoning, message), opened now if it is not."""
        if self._open is not None and self._open["type"] == kind:
            return self._open
        self._close()
        item_id = f"{'rs' if kind == 'reasoning' else 'msg'}_{_key(job)}_{len(self.items)}"
        if kind == "reasoning":
            item = {"type": "reasoning", "id": item_id, "summary": [], "content": [], "status": "in_progress"}
            part = {"type": "reasoning_text", "text": ""}
        else:
            item = {"type": "message", "id": item_id, "status": "in_progress", "role": "assistant", "content": []}
            part = {"type": "output_text", "text": "", "annotations": [], "logprobs": []}
        self.items.append(item)
        self._emit("response.output_item.added", output_index=len(self.items) - 1, item=_copy(item))
        item["content"].append(part)
        self._emit("response.content_part.added", item_id=item_id, output_index=len(self.items) - 1,
                   content_index=0, part=_copy(part))
        self._open = item
        return item

    def _close(self, status: str = "completed") -> None:
        item, self._open = self._open, None
        if item is None:
            return
        index, part = self.items.index(item), item["content"][0]
        if item["type"] == "reasoning":
            self._emit("response.reasoning_text.done", item_id=item["id"], output_index=index, content_index=0,
                       text=part["text"])
        else:
            self._emit("response.output_text.done", item_id=item["id"], output_index=index, content_index=0,
                       text=part["text"], logprobs=[])
        self._emit("response.content_part.done", item_id=item["id"], output_index=index, content_index=0,
                   part=_copy(part))
        item["status"] = status
        self._emit("response.output_item.done", output_index=index, item=_copy(item))

    def add(self, job: Job, reasoning: str, content: str, calls: list[dict[str, Any]]) -> None:
        """What the answer released: reasoning, then content text, then tool calls."""
        if reasoning:
            item = self._opened(job, "reasoning")
            item["content"][0]["text"] += reasoning
            self._emit("response.reasoning_text.delta", item_id=item["id"], output_index=self.items.index(item),
                       content_index=0, delta=reasoning)
        if content and (self._open is None or self._open["type"] != "message") and not content.strip():
            self._blank += content  # a message of whitespace alone (before a call: "\n\n") is no message
            content = ""
        if content:
            content, self._blank = self._blank + content, ""
            item = self._opened(job, "message")
            item["content"][0]["text"] += content
            self._emit("response.output_text.delta", item_id=item["id"], output_index=self.items.index(item),
                       content_index=0, delta=content, logprobs=[])
        for call in calls:
            self._close()  # items follow one another: text after a call is a message of its own
            self._blank = ""  # whitespace before a call is no message's
            item = {"type": "function_call", "id": f"fc_{_key(job)}_{len(self.items)}", "call_id": call["id"],
                    "name": call["function"]["name"], "arguments": "", "status": "in_progress"}
            self.items.append(item)
            index = len(self.items) - 1
            self._emit("response.output_item.added", output_index=index, item=_copy(item))
            item["arguments"] = call["function"]["arguments"]
            self._emit("response.function_call_arguments.delta", item_id=item["id"], output_index=index,
                       delta=item["arguments"])
            self._emit("response.function_call_arguments.done", item_id=item["id"], output_index=index,
                       arguments=item["arguments"], name=item["name"])
            item["status"] = "completed"
            self._emit("response.output_item.done", output_index=index, item=_copy(item))

    @staticmethod
    def renamed(exc: APIError, prompt_index: int | None = None) -> APIError:
        """A chat's 400 (the engine refused its prompt) as this API names it."""
        return _renamed(exc, [])

    def release(self, job: Job, text: str, final: bool) -> None:
        """The answer's next text (`final`: its last), read as the chat path reads it (its
        reasoning parser, then its tool call parser on the content), into items in the order
        they come: the same items whatever pieces the text comes in, whole or streamed."""
        if self._splitter is None and job.reasoning_opening is not None:
            self._splitter = ReasoningSplitter(job.reasoning_opening)
        if self._parser is None and job.tool_parser is not None:
            self._parser = job.new_tool_parser()
        reasoning, content = self._splitter.read(text, final) if self._splitter is not None else ("", text)
        self.add(job, reasoning, "", [])
        segments = self._parser.feed_in_order(content) if self._parser is not None else [content]
        if final and self._parser is not None:
            segments += self._parser.finish_in_order(cut=job.choices[0].finish_reason == "length")
        for segment in segments:  # content and calls in the answer's order, whatever the pieces
            if isinstance(segment, str):
                self.add(job, "", segment, [])
            elif job.parallel_tool_calls or segment["index"] == 0:  # false: the answer's first call only
                self.add(job, "", "", [segment])

    def end(self, job: Job) -> None:
        """The answer ended: the open item closes (incomplete where max_output_tokens cut it); an
        answer with no item at all is a message (of the whitespace it had, if any)."""
        if not self.items:
            self._opened(job, "message")["content"][0]["text"] = self._blank
            if self._blank:
                self._emit("response.output_text.delta", item_id=self._open["id"], output_index=0, content_index=0,
                           delta=self._blank, logprobs=[])
        self._blank = ""
        self._close("incomplete" if job.choices[0].finish_reason == "length" else "completed")

    def take_events(self) -> list[str]:
        """The SSE lines of the events since the last call. A text delta (most of them: one a
        token) is its item's line rendered once around placeholders, then only its text is
        encoded: the same bytes as `_event`, in a fraction of the time."""
        lines = []
        for kind, fields in self._events:
            if kind.endswith("text.delta"):
                around = self._delta_lines.get((kind, fields["item_id"]))
                if around is None:
                    head, rest = _event(kind, _SEQUENCE, **(fields | {"delta": _DELTA})).split(_dumps(_SEQUENCE))
                    around = self._delta_lines[kind, fields["item_id"]] = (head, *rest.split(_dumps(_DELTA)))
                lines.append(f"{around[0]}{self._sequence}{around[1]}{_dumps(fields['delta'])}{around[2]}")
            else:
                lines.append(_event(kind, self._sequence, **fields))
            self._sequence += 1
        self._events.clear()
        return lines

    # ---------------------------------------------------------------- the response
    def response(self, job: Job, status: str, choice: Choice | None = None,
                 usage: dict[str, Any] | None = None) -> dict[str, Any]:
        req = self.req
        incomplete = status == "incomplete"
        body = {
            "id": f"resp_{_key(job)}", "object": "response", "created_at": job.created,
            "status": status, "error": None,
            "incomplete_details": {"reason": "max_output_tokens"} if incomplete else None,
            "instructions": req.instructions, "max_output_tokens": req.max_output_tokens, "model": job.model,
            "output": _copy(self.items) if status != "in_progress" else [],
            "parallel_tool_calls": job.parallel_tool_calls,
            "previous_response_id": req.previous_response_id, "reasoning": req.reasoning,
            "store": self.store is not None,
            "temperature": job.params.get("temperature"), "top_p": job.params.get("top_p"),
            "text": {"format": req.text.get("format") if req.text and req.text.get("format") else {"type": "text"}},
            "tool_choice": req.tool_choice if req.tool_choice is not None else "auto",
            "tools": req.tools or [], "truncation": "disabled", "user": req.user, "metadata": req.metadata or {},
            "usage": None,
        }
        if usage is not None:
            body["usage"] = {
                "input_tokens": usage["prompt_tokens"],
                "input_tokens_details": {"cached_tokens": usage["prompt_tokens_details"]["cached_tokens"],
                                         "cache_write_tokens": 0},
                "output_tokens": usage["completion_tokens"],
                "output_tokens_details": {
                    "reasoning_tokens": usage.get("completion_tokens_details", {}).get("reasoning_tokens", 0)},
                "total_tokens": usage["total_tokens"]}
        return body

    def status(self, choice: Choice) -> str:
        return "incomplete" if choice.finish_reason == "length" else "completed"

    def keep(self, body: dict[str, Any]) -> None:
        """Store the ended response if it asked to be: its conversation goes on with its output
        items read as input items are (`response.output` sent back renders the same)."""
        if self.store is None:
            return
        messages = [dict(m) for m in self.messages]
        for i, item in enumerate(self.items):
            if item["type"] == "message":
                item = {"role": "assistant", "content": item["content"][0]["text"]}
            messages += _messages(item, i, messages)
        self.store.put(body["id"], StoredResponse(self.owner, _copy(body), messages))

    def body(self, serving: OpenAIServing, job: Job, choices: list[Choice], usage: dict[str, Any]) -> dict[str, Any]:
        """The whole answer's response."""
        (choice,) = choices
        self.release(job, "".join(choice.text), final=True)
        self.end(job)
        self._events.clear()
        body = self.response(job, self.status(choice), choice, usage)
        self.keep(body)
        return body

    # ---------------------------------------------------------------- streaming
    async def stream(self, serving: OpenAIServing, job: Job, generation: Generation) -> AsyncIterator[str]:
        choices, cached = serving._choices(job), job.cached
        (choice,) = choices
        try:
            for kind in ("response.created", "response.in_progress"):
                self._emit(kind, response=self.response(job, "in_progress"))
            for line in self.take_events():
                yield line
            iterator = generation.batches()
            while True:
                try:
                    remaining = serving._remaining(job)
                    batch = await (iterator.__anext__() if remaining is None
                                   else asyncio.wait_for(iterator.__anext__(), remaining))
                except StopAsyncIteration:
                    break
                deltas = [d for index, output in batch for d in serving._absorb(job, choices, index, output, cached)]
                for _, delta in merge_deltas(deltas):
                    self.release(job, delta["text"], final=delta["finish_reason"] is not None)
                    for line in self.take_events():
                        yield line
            usage = serving._usage(job, choices, cached)
            self.end(job)
            body = self.response(job, self.status(choice), choice, usage)
            self._emit(f"response.{body['status']}", response=body)
            for line in self.take_events():
                yield line
            self.keep(body)  # delivered: a client gone before its last event left nothing stored
            serving._summarize(job, choices)
            serving.finish(job.record)
        except Exception as exc:  # the status line went out already: the error goes in the stream
            error = serving.stream_failed(job, generation, exc)
            # The response's error code is one of the API's; the event's is stoke's own.
            failed = self.response(job, "failed") | {"error": {"code": "server_error", "message": error.message}}
            self._events.clear()
            self._emit("error", code=error.code, message=error.message, param=error.param)
            self._emit("response.failed", response=failed)
            for line in self.take_events():
                yield line


def _key(job: Job) -> str:
    """The request id's own part ("resp-7cbc00000001" → "7cbc00000001"): the ids of its items."""
    return job.request_id.split("-", 1)[-1]


def _copy(value: Any) -> Any:
    """A snapshot of an item as an event shows it (the item itself goes on changing)."""
    return json.loads(json.dumps(value))
