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
- `mistral` (Mistral, Mixtral, Ministral): the text after the `[TOOL_CALLS]` token is calls,
  a JSON array `[{"name": ..., "arguments": {...}}, ...]` (v0.3 tokenizers) or, from the v11
  tokenizers on, `name[ARGS]{...}`, each call after a `[TOOL_CALLS]` of its own; the content
  is the text before it. Call ids are 9 letters and digits, the only ids Mistral's chat
  templates take back (`short_ids`).
- `pythonic` (Llama 3.2 and 4, Gemma 3 with a pythonic template, ToolACE): an answer that is a
  Python list of calls, `[get_weather(city="Paris"), ...]`, each argument a keyword and a
  literal (`<|python_start|>` ... `<|python_end|>` around it, Llama 4's, when special tokens are
  kept); any other answer is content.
- `qwen3_coder` (Qwen3-Coder): hermes's `<tool_call>`s, each an XML-like
  `<function=NAME><parameter=KEY>VALUE</parameter>...</function>`; a value is text, turned
  into the JSON its tool's schema types it as (integer, number, boolean, object, array; null),
  as vLLM's parser does.

`tool_choice` "required" or a named function holds the answer to a JSON schema instead
(structured outputs, `forced_tool_schema`): "required" writes a JSON array of calls
`{"name": ..., "parameters": {...}}` (vLLM's form), a named function its arguments alone. Their
parsers read the whole answer when it ends: a cut answer (max_tokens) stays content.

A call needs a string `name` and its arguments (`arguments`, or `parameters` for llama3_json),
as vLLM's parsers read them; text that does not parse as a call is never lost: it stays in the
content. With calls and no content, the content is None. Calls are released whole, each as soon
as it is (a stream's call is one delta, its arguments complete). Where vLLM's parsers read a
whole answer as all calls or all text (mistral, pythonic), these keep the calls that parsed
before a malformed one, the rest as content: a stream cannot take back what it released.
"""

from __future__ import annotations

import ast
import json
import math
import re
import secrets
import string
import uuid
from typing import Any

TOOL_CALL_PARSERS = ("hermes", "llama3_json", "mistral", "pythonic", "qwen3_coder")
# The parsers whose markers some tokenizers make special tokens: their requests keep special
# tokens in the text unless they say otherwise, as vLLM's do.
KEEPS_SPECIAL_TOKENS = ("hermes", "mistral", "qwen3_coder")
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
    """OpenAI's tool call (without its id) from a parsed call object; None if it is not one."""
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
    return {"type": "function", "function": {"name": data["name"], "arguments": arguments}}


def _json_call(text: str) -> dict[str, Any] | None:
    """OpenAI's tool call from hermes's JSON, `{"name": ..., "arguments": ...}`; None if it is not one."""
    try:
        return _tool_call(json.loads(text), ("arguments",))
    except json.JSONDecodeError:
        return None


def _python_call(text: str) -> dict[str, Any] | None:
    """OpenAI's tool call from a Python call, `name(key=literal, ...)`; None if it is not one
    (positional arguments, a value that is not a literal or has no JSON)."""
    try:
        node = ast.parse(text.strip(), mode="eval").body
    except (SyntaxError, ValueError):
        return None
    if not isinstance(node, ast.Call) or not isinstance(node.func, ast.Name) or node.args:
        return None
    arguments: dict[str, Any] = {}
    for keyword in node.keywords:
        if keyword.arg is None:  # **kwargs
            return None
        try:
            arguments[keyword.arg] = ast.literal_eval(keyword.value)
        except (ValueError, TypeError, SyntaxError, MemoryError, RecursionError):
            return None
    try:
        encoded = json.dumps(arguments, ensure_ascii=False, allow_nan=False)
    except (TypeError, ValueError):  # a set, bytes, a complex number, NaN
        return None
    return {"type": "function", "function": {"name": node.func.id, "arguments": encoded}}


def _python_call_end(text: str) -> int | None:
    """Where the call `text` begins with ends (after its closing parenthesis), its brackets
    and strings followed; None while it is still open. A bracket closed by the wrong one is -1."""
    stack: list[str] = []
    quote, i, n = "", 0, len(text)
    pairs = {")": "(", "]": "[", "}": "{"}
    while i < n:
        c = text[i]
        if quote:
            if c == "\\":
                i += 1
            elif text.startswith(quote, i):
                i += len(quote) - 1
                quote = ""
        elif c in "'\"":
            quote = c * 3 if text.startswith(c * 3, i) else c
            i += len(quote) - 1
        elif c in "([{":
            stack.append(c)
        elif c in pairs:
            if not stack or stack.pop() != pairs[c]:
                return -1
            if not stack:
                return i + 1
        i += 1
    return None


_JSON_FALLBACK_TYPES = ("object", "array", "arr", "dict", "list")


def _typed(value: str, schema: Any) -> Any:
    """A qwen3_coder parameter's text as the JSON value its schema's type makes it, as vLLM's
    parser converts it: "null" is null; text that does not convert stays a string."""
    if value.lower() == "null":
        return None
    declared = schema.get("type") if isinstance(schema, dict) else None
    for kind in (declared if isinstance(declared, list) else [declared or "string"]):
        kind = str(kind).strip().lower()
        try:
            if kind in ("string", "str", "text", "varchar", "char", "enum"):
                return value
            if kind.startswith(("int", "uint", "long", "short", "unsigned")):
                return int(value)
            if kind.startswith(("num", "float")):
                number = float(value)
                if math.isfinite(number):
                    return int(number) if number.is_integer() else number
                continue
            if kind in ("boolean", "bool", "binary"):
                if value.lower() in ("true", "false"):
                    return value.lower() == "true"
                continue
            if kind.startswith(_JSON_FALLBACK_TYPES):
                try:
                    return json.loads(value)
                except json.JSONDecodeError:
                    pass
            literal = ast.literal_eval(value)
            json.dumps(literal, allow_nan=False)
            return literal
        except (ValueError, TypeError, SyntaxError, MemoryError, RecursionError, OverflowError):
            continue
    return value


def _tool_properties(tools: list[dict[str, Any]], name: str) -> dict[str, Any]:
    """The properties of the named tool's parameters (vLLM's reading: its parameters object
    itself where it has no `properties`); empty for a tool not given."""
    for tool in tools:
        function = tool.get("function")
        if isinstance(function, dict) and function.get("name") == name:
            parameters = function.get("parameters")
            if isinstance(parameters, dict):
                properties = parameters.get("properties", parameters)
                return properties if isinstance(properties, dict) else {}
    return {}


def _xml_call(body: str, tools: list[dict[str, Any]]) -> dict[str, Any] | None:
    """OpenAI's tool call from qwen3_coder's `<function=NAME><parameter=KEY>VALUE</parameter>
    ...</function>`; None if it is not one. A parameter's closing tag may be missing before the
    next parameter or the function's end, as vLLM's parser allows."""
    body = body.strip()
    if not body.startswith(_FUNCTION) or not body.endswith(_FUNCTION_END):
        return None
    head = body.find(">")
    name = body[len(_FUNCTION):head].strip()
    if not name or "<" in name or "\n" in name:
        return None
    inner = body[head + 1:len(body) - len(_FUNCTION_END)]
    properties = _tool_properties(tools, name)
    arguments: dict[str, Any] = {}
    for part in inner.split(_PARAMETER)[1:]:
        key, sep, value = part.partition(">")
        if not sep or not key.strip():
            return None
        value = value.split(_PARAMETER_END, 1)[0]
        value = value[1:] if value.startswith("\n") else value
        value = value[:-1] if value.endswith("\n") else value
        arguments[key.strip()] = _typed(value, properties.get(key.strip()))
    return {"type": "function", "function": {"name": name, "arguments": json.dumps(arguments, ensure_ascii=False)}}


_MISTRAL_NAME = re.compile(r"[A-Za-z0-9_.-]+")  # v11's name before [ARGS], as vLLM's parser reads it
_MISTRAL_ID = re.compile(r"[A-Za-z0-9]*")
_CALL_ID, _ARGS = "[CALL_ID]", "[ARGS]"
_PYTHON_NAME = re.compile(r"[A-Za-z_]\w*")
_FUNCTION, _FUNCTION_END = "<function=", "</function>"
_PARAMETER, _PARAMETER_END = "<parameter=", "</parameter>"
_ALPHANUMERIC = string.ascii_letters + string.digits


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

    def __init__(self, kind: str, function: str | None = None, tools: list[dict[str, Any]] | None = None,
                 short_ids: bool = False) -> None:
        """`function`: the named function's name (kind "named"); `tools`: the request's (their
        schemas type qwen3_coder's values); `short_ids`: call ids of 9 letters and digits (a
        Mistral server's), not OpenAI's `call_...`."""
        if kind not in TOOL_CALL_PARSERS + FORCED:
            raise ValueError(f"tool call parser must be one of {TOOL_CALL_PARSERS + FORCED}, got {kind!r}")
        self.kind, self.function, self.tools, self.short_ids = kind, function, tools or [], short_ids
        # (final) -> the content and calls released, in order
        self._read = {"hermes": self._hermes, "qwen3_coder": self._hermes, "llama3_json": self._llama3_json,
                      "mistral": self._mistral, "pythonic": self._pythonic}.get(kind, self._forced)
        self.calls = 0
        self._buffer = ""  # text not released yet
        # hermes, qwen3_coder, mistral: the whitespace after a call, content only if more text follows it
        self._blank = ""
        self._spoken = False  # hermes, qwen3_coder, mistral: text since the last call (past it, whitespace is content)
        # llama3_json, pythonic: the answer is calls (None: not known yet; False: content)
        self._json: bool | None = None
        self._answer = ""  # llama3_json, pythonic: the text as it came, the content if no call parses
        # llama3_json, mistral, pythonic: the buffer's length when a call last failed to parse whole
        self._tried = 0
        self._listed = False  # pythonic: the list's calls ended ("]")

    def feed(self, text: str) -> tuple[str, Calls]:
        return joined(self.feed_in_order(text))

    def finish(self, cut: bool = False) -> tuple[str, Calls]:
        return joined(self.finish_in_order(cut))

    def feed_in_order(self, text: str) -> Segments:
        """`feed`, its content and calls in the order the answer has them."""
        self._buffer += text
        if self.kind in ("llama3_json", "pythonic") and self._json is not False:
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
        """The call, with its id and its index among the answer's calls."""
        call_id = "".join(secrets.choice(_ALPHANUMERIC) for _ in range(9)) if self.short_ids \
            else f"call_{uuid.uuid4().hex[:24]}"
        call = {"id": call_id, **call, "index": self.calls}
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
            call = _xml_call(body, self.tools) if self.kind == "qwen3_coder" else _json_call(body)
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

    # ----------------------------------------------------------------- mistral
    TOOL_CALLS = "[TOOL_CALLS]"

    def _mistral(self, final: bool) -> Segments:
        out: Segments = []
        while self._buffer:
            start = self._buffer.find(self.TOOL_CALLS)
            text = self._buffer if start < 0 else self._buffer[:start]
            if start < 0 and not final:
                text = text[:len(text) - _held_back(text, self.TOOL_CALLS)]
            self._buffer = self._buffer[len(text):]
            out.append(self._text(text))
            if start < 0:
                break
            # Past a JSON that did not parse whole, only a new "}" or "]" can end it.
            if not final and self._tried and not any(c in self._buffer[self._tried:] for c in "}]"):
                break
            read = self._mistral_calls(self._buffer[len(self.TOOL_CALLS):], final)
            if read is None:
                break  # the calls are not whole yet
            calls, taken = read
            if not calls:  # no calls: the marker is text, and what follows it is read on
                out.append(self._text(self.TOOL_CALLS))
                self._buffer = self._buffer[len(self.TOOL_CALLS):]
                continue
            self._blank, self._spoken = "", False  # whitespace between calls is no content
            out += [self._made(call) for call in calls]
            self._buffer = self._buffer[len(self.TOOL_CALLS) + taken:]
        if final:
            self._blank = ""  # nor is whitespace after the last call
        return [s for s in out if s != ""]

    def _mistral_calls(self, body: str, final: bool) -> tuple[Calls, int] | None:
        """The calls one [TOOL_CALLS] begins (`body`: the text after it) and the length of
        their text: a JSON array of calls (or one call object), or v11's `name[ARGS]{...}`
        (`[CALL_ID]id` before `[ARGS]` allowed); None while they may still come whole, no calls
        if they are not calls."""
        text = body.lstrip()
        name: str | None = None
        at = 0
        if not text[:1] or text[0] not in "[{":
            match = _MISTRAL_NAME.match(text)
            if match is None:
                return None if not text and not final else ([], 0)
            name, at = match.group(), match.end()
            if text.startswith(_CALL_ID, at):
                at = _MISTRAL_ID.match(text, at + len(_CALL_ID)).end()
            if text.startswith(_ARGS, at):
                at += len(_ARGS)
            rest = text[at:]
            if not final and (not rest or any(tag.startswith(rest) for tag in (_CALL_ID, _ARGS))):
                return None
            if not rest.startswith("{"):
                return [], 0
        try:
            data, end = json.JSONDecoder().raw_decode(text, at)
        except json.JSONDecodeError:
            if final:
                return [], 0
            self._tried = len(self._buffer)
            return None
        self._tried = 0
        if name is not None:
            found = [_tool_call({"name": name, "arguments": data}, ("arguments",))] if isinstance(data, dict) else []
        else:
            found = [_tool_call(item, ("arguments",)) for item in (data if isinstance(data, list) else [data])]
        if not found or None in found:
            return [], 0
        return found, len(body) - len(text) + end

    # ---------------------------------------------------------------- pythonic
    PYTHON_TAGS = ("<|python_start|>", "<|python_tag|>")  # Llama 4's, Llama 3's
    PYTHON_END = "<|python_end|>"

    def _pythonic(self, final: bool) -> Segments:
        if self._json is None:
            start = self._buffer.lstrip()
            tag = next((t for t in self.PYTHON_TAGS if start.startswith(t)), "")
            after = start[len(tag):].lstrip()
            if after.startswith("["):
                self._json, self._buffer = True, after[1:]
            elif not final and (not after or not tag and any(t.startswith(start) for t in self.PYTHON_TAGS)):
                return []  # only whitespace, or a tag's beginning, so far
            else:
                self._json = False
        if not self._json:
            content, self._buffer = self._buffer, ""
            return [content] if content else []
        out: Segments = []
        while not self._listed:
            text = self._buffer.lstrip()
            if self.calls and text[:1] == "]":
                self._listed, self._buffer = True, text[1:]
                break
            if self.calls and text[:1] == ",":
                text = text[1:].lstrip()
            elif self.calls and text:
                return out + self._not_pythonic()
            match = _PYTHON_NAME.match(text)
            opened = text[match.end():].lstrip()[:1] if match else ""
            if match is None and text or opened not in ("", "("):
                return out + self._not_pythonic()
            if not opened or not final and self._tried and ")" not in self._buffer[self._tried:]:
                if final:
                    return out + self._not_pythonic()
                break  # the call is not whole yet
            end = _python_call_end(text)
            if end is None and not final:
                self._tried = len(self._buffer)
                break
            call = _python_call(text[:end]) if end is not None and end > 0 else None
            if call is None:
                return out + self._not_pythonic()
            out.append(self._made(call))
            self._buffer, self._tried = text[end:], 0
        if final and self._listed:
            rest, self._buffer = self._buffer.strip().removeprefix(self.PYTHON_END).strip(), ""
            out += [rest] if rest else []  # what follows the list
        return out

    def _not_pythonic(self) -> Segments:
        """The text from where calls stopped parsing, as content: the whole answer if no call
        parsed, else what followed the last call; what comes next is content too."""
        text = self._buffer.lstrip().removeprefix(",").lstrip() if self.calls else self._answer
        self._json, self._buffer = False, ""
        return [text] if text else []

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
