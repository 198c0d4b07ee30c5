"""Tool calls in a model's text, as vLLM's `--tool-call-parser` finds them, for OpenAI's
`tool_calls`: the same parser reads a whole answer and a stream, so both give the same calls
and the same content.

- `hermes` (Qwen2.5, Qwen3, Hermes, and most chat templates with tools): each call is
  `<tool_call>{"name": ..., "arguments": {...}}</tool_call>`. The content is the text before
  the first call (as vLLM's), and any text after a call that is more than whitespace. A last
  call left open (the answer cut by max_tokens) counts if its JSON is whole, as vLLM's.
- `llama3_json` (Llama 3.1+): an answer that starts with a JSON object (after
  `<|python_tag|>`, when special tokens are kept) is one or more calls,
  `{"name": ..., "parameters": {...}}`, separated by `;`; any other answer is content.

`tool_choice` "required" or a named function holds the answer to a JSON schema instead
(structured outputs, `forced_tool_schema`): "required" writes a JSON array of calls
`{"name": ..., "parameters": {...}}` (vLLM's form), a named function its arguments alone. Their
parsers read the whole answer when it ends: a cut answer (max_tokens) stays content.

A call needs a string `name` and its arguments (`arguments`, or `parameters` for llama3_json),
as vLLM's parsers read them; text that does not parse as a call is never lost: it stays in the
content. With calls and no content, the content is None.
"""

from __future__ import annotations

import json
import uuid
from typing import Any

TOOL_CALL_PARSERS = ("hermes", "llama3_json")
FORCED = ("required", "named")  # tool_choice's: the answer is held to forced_tool_schema
Calls = list[dict[str, Any]]
Segments = list["str | dict[str, Any]"]  # content and calls, in the order the answer has them


def joined(segments: Segments) -> tuple[str, Calls]:
    """Segments as (their content, their calls)."""
    return "".join(s for s in segments if isinstance(s, str)), [s for s in segments if isinstance(s, dict)]


def forced_tool_schema(tools: list[dict[str, Any]], function: str | None, parallel: bool = True) -> dict[str, Any]:
    """The JSON schema a forced tool_choice holds the answer to: for "required" (`function`
    None) an array of calls to any of the tools (one at most unless `parallel`), as vLLM's; for a
    named function, its parameters. Each tool's parameters move under `$defs`, their local
    `$ref`s with them, so each resolves in its own tool."""
    def parameters(tool_function: dict[str, Any]) -> Any:
        schema = tool_function.get("parameters")
        return {"type": "object"} if schema is None else schema

    functions = [tool["function"] for tool in tools]
    if function is not None:
        return parameters(next(f for f in functions if f["name"] == function))
    defs = {f"tool{i}": _moved_refs(parameters(f), f"#/$defs/tool{i}") for i, f in enumerate(functions)}
    calls = [{"type": "object", "required": ["name", "parameters"],
              "properties": {"name": {"const": f["name"]}, "parameters": {"$ref": f"#/$defs/tool{i}"}}}
             for i, f in enumerate(functions)]
    return {"$defs": defs, "type": "array", "minItems": 1, **({} if parallel else {"maxItems": 1}),
            "items": {"anyOf": calls}}


_DATA_KEYWORDS = frozenset({"const", "enum", "default", "examples"})  # values, not schemas: left as they are


def _moved_refs(schema: Any, root: str) -> Any:
    """The schema with its local `$ref`s ("#...") pointing under `root`, where it now lives."""
    if isinstance(schema, list):
        return [_moved_refs(item, root) for item in schema]
    if not isinstance(schema, dict):
        return schema
    return {key: value if key in _DATA_KEYWORDS
            else root + value[1:] if key == "$ref" and isinstance(value, str) and value.startswith("#")
            else _moved_refs(value, root) for key, value in schema.items()}


def _tool_call(data: Any, argument_keys: tuple[str, ...]) -> dict[str, Any] | None:
    """OpenAI's tool call from a parsed call object; None if it is not one."""
    if not isinstance(data, dict) or not isinstance(data.get("name"), str):
        return None
    key = next((k for k in argument_keys if k in data), None)
    if key is None:
        return None
    arguments = data[key]
    if isinstance(arguments, str):  # JSON text already, or a bare string that must become JSON
        try:
            json.loads(arguments)
        except json.JSONDecodeError:
            arguments = json.dumps(arguments, ensure_ascii=False)
    else:
        arguments = json.dumps(arguments, ensure_ascii=False)
    return {"id": f"call_{uuid.uuid4().hex[:24]}", "type": "function",
            "function": {"name": data["name"], "arguments": arguments}}


def message_content(content: str, made_calls: bool) -> str | None:
    """An answer's content as the message gives it: None where only calls were made (vLLM's)."""
    return (content or None) if made_calls else content


def _held_back(text: str, marker: str) -> int:
    """How many of the text's last characters could begin `marker`: held until the next text says.
    (engine/detokenizer.py's `held_back`, kept here: server/launch.py imports this module for
    its parsers' names, and an engine import would bring torch to `stoke serve --help`.)"""
    for keep in range(min(len(marker) - 1, len(text)), 0, -1):
        if marker.startswith(text[-keep:]):
            return keep
    return 0


class ToolCallParser:
    """One choice's text, fed as it comes (`feed`), then `finish`ed: each returns the content
    and the tool calls it released (a call's `index` counts the answer's calls). `parse` reads
    a whole answer."""

    def __init__(self, kind: str, function: str | None = None) -> None:
        """`function`: the named function's name (kind "named")."""
        if kind not in TOOL_CALL_PARSERS + FORCED:
            raise ValueError(f"tool call parser must be one of {TOOL_CALL_PARSERS + FORCED}, got {kind!r}")
        self.kind, self.function = kind, function
        # (final) -> the content and calls released, in order
        self._read = {"hermes": self._hermes, "llama3_json": self._llama3_json}.get(kind, self._forced)
        self.calls = 0
        self._buffer = ""  # text not released yet
        self._blank = ""  # hermes: the whitespace after a call, content only if more text follows it
        self._spoken = False  # hermes: text since the last call (past it, whitespace is content)
        self._json: bool | None = None  # llama3_json: the answer is calls (None: not known yet)
        self._answer = ""  # llama3_json: the text as it came, the content if no call parses
        self._tried = 0  # llama3_json: the buffer's length when a call last failed to parse whole

    def feed(self, text: str) -> tuple[str, Calls]:
        return joined(self.feed_in_order(text))

    def finish(self, cut: bool = False) -> tuple[str, Calls]:
        return joined(self.finish_in_order(cut))

    def feed_in_order(self, text: str) -> Segments:
        """`feed`, its content and calls in the order the answer has them."""
        self._buffer += text
        if self.kind == "llama3_json" and self._json is not False:
            self._answer += text
        return self._read(final=False)

    def finish_in_order(self, cut: bool = False) -> Segments:
        """The rest; `cut`: the answer was cut short (max_tokens), so a forced choice's JSON,
        even where it parses (`1` of `12...`), is no call (hermes and llama3_json keep a whole
        last call, as vLLM's)."""
        if cut and self.kind in FORCED:
            text, self._buffer = self._buffer, ""
            return [text]
        return self._read(final=True)

    def parse(self, text: str) -> tuple[str | None, Calls]:
        """A whole answer: its content (None where only calls were made) and its calls."""
        content, calls = self.feed(text)
        more, last = self.finish()
        content += more
        calls += last
        return message_content(content, bool(calls)), calls

    def _made(self, call: dict[str, Any]) -> dict[str, Any]:
        call["index"] = self.calls
        self.calls += 1
        return call

    # ------------------------------------------------------------------ hermes
    START, END = "<tool_call>", "</tool_call>"

    def _hermes(self, final: bool) -> Segments:
        out: Segments = []
        while self._buffer:
            start = self._buffer.find(self.START)
            text = self._buffer if start < 0 else self._buffer[:start]
            if start < 0 and not final:
                text = text[:len(text) - _held_back(text, self.START)]
            self._buffer = self._buffer[len(text):]
            out.append(self._text(text))
            if start < 0:
                break
            end = self._buffer.find(self.END)
            if end < 0 and not final:
                break  # the call is not whole yet
            body, taken = (self._buffer[len(self.START):end], end + len(self.END)) if end >= 0 else \
                (self._buffer[len(self.START):], len(self._buffer))  # a last call left open
            try:
                call = _tool_call(json.loads(body), ("arguments",))
            except json.JSONDecodeError:
                call = None
            if call is None:
                out.append(self._text(self._buffer[:taken]))
            else:
                self._blank, self._spoken = "", False  # whitespace between calls is no content
                out.append(self._made(call))
            self._buffer = self._buffer[taken:]
        if final:
            self._blank = ""  # nor is whitespace after the last call
        return [s for s in out if s != ""]

    def _text(self, text: str) -> str:
        """Text outside calls as content: after a call, whitespace waits to see whether more
        text follows it."""
        if not self.calls or self._spoken or not text:
            return text
        if not text.strip():
            self._blank += text
            return ""
        text, self._blank, self._spoken = self._blank + text, "", True
        return text

    # ------------------------------------------------------------- llama3_json
    PYTHON_TAG = "<|python_tag|>"

    def _llama3_json(self, final: bool) -> Segments:
        if self._json is None:
            start = self._buffer.lstrip()
            if start.startswith(("{", self.PYTHON_TAG)):
                self._json = True
                self._buffer = start.removeprefix(self.PYTHON_TAG)
            elif final or start and not self.PYTHON_TAG.startswith(start):
                self._json = False
            else:
                return []  # only whitespace, or the tag's beginning, so far
        if not self._json:
            content, self._buffer = self._buffer, ""
            return [content] if content else []
        calls: Segments = []
        decoder = json.JSONDecoder()
        # Past a failed try, only a new "}" can end an object: no parse per token of a long call.
        while self._buffer and (final or "}" in self._buffer[self._tried:]):
            text = self._buffer.lstrip().removeprefix(";").lstrip()
            try:
                data, end = decoder.raw_decode(text)
            except json.JSONDecodeError:
                self._tried = len(self._buffer)
                break  # not whole yet, or not JSON
            call = _tool_call(data, ("parameters", "arguments"))
            if call is None:
                self._tried = len(self._buffer)
                break
            calls.append(self._made(call))
            self._buffer, self._tried = text[end:], 0
        if not final:
            return calls
        rest, self._buffer = self._buffer, ""
        if not self.calls:  # no call at all: the answer is text, as it came
            return [self._answer] if self._answer else []
        rest = rest.lstrip().removeprefix(";").strip()  # what follows the calls
        return [*calls, rest] if rest else calls

    # ------------------------------------------------------ forced (structured)
    def _forced(self, final: bool) -> Segments:
        if not final:
            return []
        text, self._buffer = self._buffer, ""
        if self.kind == "named":
            try:
                json.loads(text)
            except json.JSONDecodeError:
                return [text] if text else []  # cut short: not arguments
            return [self._made(_tool_call({"name": self.function, "arguments": text.strip()}, ("arguments",)))]
        try:
            data = json.loads(text)
        except json.JSONDecodeError:
            return [text] if text else []
        calls = [_tool_call(item, ("parameters",)) for item in data] if isinstance(data, list) else [None]
        if not calls or None in calls:
            return [text] if text else []
        return [self._made(call) for call in calls]
