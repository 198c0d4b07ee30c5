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


# What reading a model's JSON or Python may raise besides a syntax error: a number of more
# than 4,300 digits (ValueError), nesting deeper than the interpreter's stack.
_PARSE_ERRORS = (ValueError, SyntaxError, RecursionError, MemoryError, TypeError)


def _refuse_constant(name: str) -> Any:
    raise ValueError(f"{name} is not JSON")


# JSON as RFC 8259 has it: NaN and Infinity, which Python's json reads and writes, are refused.
_JSON = json.JSONDecoder(parse_constant=_refuse_constant)


def _loads(text: str) -> Any:
    """Strict JSON text's value; ValueError for anything else (however deep or long)."""
    try:
        return _JSON.decode(text)
    except _PARSE_ERRORS as exc:
        raise ValueError(str(exc)) from None


def _well_formed(text: str) -> str:
    """The text as UTF-8 can carry it: a surrogate pair escaped one half at a time
    ("\\ud83d\\ude00", as JSON writes an emoji) joined, a lone half replaced (U+FFFD)."""
    try:
        text.encode("utf-8")
        return text
    except UnicodeEncodeError:
        return text.encode("utf-16", "surrogatepass").decode("utf-16", "replace")


def _dumps(value: Any) -> str:
    """JSON text of a call's arguments: strict (ValueError for NaN), and well-formed."""
    return _well_formed(json.dumps(value, ensure_ascii=False, allow_nan=False))


def _function(name: str, arguments: str) -> dict[str, Any]:
    return {"type": "function", "function": {"name": _well_formed(name), "arguments": arguments}}


def _tool_call(data: Any, argument_keys: tuple[str, ...]) -> dict[str, Any] | None:
    """OpenAI's tool call (without its id) from a parsed call object; None if it is not one."""
    if not isinstance(data, dict) or not isinstance(data.get("name"), str):
        return None
    key = next((k for k in argument_keys if k in data), None)
    if key is None:
        return None
    arguments = data[key]
    try:
        if isinstance(arguments, str):  # JSON text already, or a bare string that must become JSON
            try:
                _loads(arguments)
                arguments = _well_formed(arguments)
            except ValueError:
                arguments = _dumps(arguments)
        else:
            arguments = _dumps(arguments)
    except _PARSE_ERRORS:  # NaN, or nested past the stack
        return None
    return _function(data["name"], arguments)


def _json_calls(text: str) -> list[dict[str, Any]]:
    """OpenAI's tool call from hermes's JSON, `{"name": ..., "arguments": ...}`; none if it is not one."""
    try:
        call = _tool_call(_loads(text), ("arguments",))
    except ValueError:
        return []
    return [call] if call is not None else []


def _python_call(text: str) -> dict[str, Any] | None:
    """OpenAI's tool call from a Python call, `name(key=literal, ...)`; None if it is not one
    (positional arguments, a value that is not a literal or has no JSON)."""
    try:
        node = ast.parse(text.strip(), mode="eval").body
    except _PARSE_ERRORS:
        return None
    if not isinstance(node, ast.Call) or not isinstance(node.func, ast.Name) or node.args:
        return None
    arguments: dict[str, Any] = {}
    for keyword in node.keywords:
        if keyword.arg is None:  # **kwargs
            return None
        try:
            arguments[keyword.arg] = ast.literal_eval(keyword.value)
        except _PARSE_ERRORS:
            return None
    try:
        encoded = _dumps(arguments)
    except _PARSE_ERRORS:  # a set, bytes, a complex number, NaN
        return None
    return _function(node.func.id, encoded)


class _PythonCallEnd:
    """Where a Python call ends (after its closing parenthesis), its brackets and strings
    followed, read on as its text grows: each character is read once, however many pieces the
    text comes in."""

    _PAIRS = {")": "(", "]": "[", "}": "{"}

    def __init__(self) -> None:
        self.read = 0  # the characters read
        self.stack: list[str] = []  # open brackets
        self.quote = ""  # the open string's quote (' " \'\'\' or \"\"\"), if any

    def find(self, text: str) -> int | None:
        """The end in `text` (the call's text so far, the same text with more at its end each
        time); None while it is open; -1 where a bracket closes another kind."""
        i, n, stack = self.read, len(text), self.stack
        try:
            while i < n:
                c = text[i]
                if self.quote:
                    if c == "\\":
                        if i + 1 == n:
                            return None  # what it escapes comes next
                        i += 2
                        continue
                    if text.startswith(self.quote, i):
                        i += len(self.quote)
                        self.quote = ""
                        continue
                    if n - i < len(self.quote) and self.quote.startswith(text[i:]):
                        return None  # a closing triple quote's beginning
                elif c in "'\"":
                    if i + 3 > n and (c * 3).startswith(text[i:]):
                        return None  # one quote or the first of three
                    self.quote = c * 3 if text.startswith(c * 3, i) else c
                    i += len(self.quote)
                    continue
                elif c in "([{":
                    stack.append(c)
                elif c in self._PAIRS:
                    if not stack or stack.pop() != self._PAIRS[c]:
                        return -1
                    if not stack:
                        return i + 1
                i += 1
            return None
        finally:
            self.read = i


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
                    return _loads(value)
                except ValueError:
                    pass
            literal = ast.literal_eval(value)
            _dumps(literal)  # a set, NaN: no JSON
            return literal
        except (*_PARSE_ERRORS, OverflowError):
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


def _xml_calls(body: str, tools: list[dict[str, Any]], closed: bool) -> list[dict[str, Any]]:
    """OpenAI's tool calls from qwen3_coder's `<function=NAME><parameter=KEY>VALUE</parameter>
    ...</function>`, one or more; none if the body is not that. As vLLM's parser allows, a
    parameter's closing tag may be missing before the next parameter or its function's end, and
    the last function's closing tag where the call around it closed (`closed`; not where the
    answer was cut inside it)."""
    calls: list[dict[str, Any]] = []
    rest = body.strip()
    while rest:
        if not rest.startswith(_FUNCTION):
            return []
        end = rest.find(_FUNCTION_END)
        if end < 0 and not closed:
            return []
        function, rest = (rest[:end], rest[end + len(_FUNCTION_END):].strip()) if end >= 0 else (rest, "")
        call = _xml_call(function, tools)
        if call is None:
            return []
        calls.append(call)
    return calls


def _xml_call(function: str, tools: list[dict[str, Any]]) -> dict[str, Any] | None:
    """One `<function=NAME>...` (its closing tag cut off) as OpenAI's call; None if it is not one."""
    head = function.find(">")
    name = function[len(_FUNCTION):head].strip() if head >= 0 else ""
    if not name or "<" in name or "\n" in name:
        return None
    properties = _tool_properties(tools, name)
    arguments: dict[str, Any] = {}
    for part in function[head + 1:].split(_PARAMETER)[1:]:
        key, sep, value = part.partition(">")
        if not sep or not key.strip():
            return None
        value = value.split(_PARAMETER_END, 1)[0]
        value = value[1:] if value.startswith("\n") else value
        value = value[:-1] if value.endswith("\n") else value
        arguments[key.strip()] = _typed(value, properties.get(key.strip()))
    try:
        return _function(name, _dumps(arguments))
    except _PARSE_ERRORS:
        return None


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
        # llama3_json, mistral: the buffer's length when a call last failed to parse whole
        self._tried = 0
        self._listed = False  # pythonic: the list's calls ended ("]")
        self._call_end: _PythonCallEnd | None = None  # pythonic: the call being read

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
        # Qwen3-Coder also writes a call without its <tool_call>: a bare <function=...></function>,
        # its </tool_call> after it or not (dropped), as vLLM's parser reads it.
        markers = (self.START, _FUNCTION, self.END) if self.kind == "qwen3_coder" else (self.START,)
        out: Segments = []
        while self._buffer:
            start, marker = min(((i, m) for m in markers if (i := self._buffer.find(m)) >= 0), default=(-1, ""))
            text = self._buffer if start < 0 else self._buffer[:start]
            if start < 0 and not final:
                text = text[:len(text) - max(_held_back(text, m) for m in markers)]
            self._buffer = self._buffer[len(text):]
            out.append(self._text(text))
            if start < 0:
                break
            if marker == self.END:  # right after a call, a bare function's closing tag: dropped
                if self.calls and not self._spoken:
                    self._blank = ""
                else:
                    out.append(self._text(marker))
                self._buffer = self._buffer[len(marker):]
                continue
            opened, closing = (len(self.START), self.END) if marker == self.START else (0, _FUNCTION_END)
            end = self._buffer.find(closing, opened)
            if end < 0 and not final:
                break  # the call is not whole yet
            taken = end + len(closing) if end >= 0 else len(self._buffer)  # a last call left open
            # a wrapped call's body is what its tags hold; a bare function's, the function itself
            body = self._buffer[opened:end if end >= 0 and marker == self.START else taken]
            calls = _xml_calls(body, self.tools, closed=end >= 0) if self.kind == "qwen3_coder" else _json_calls(body)
            if not calls:
                out.append(self._text(self._buffer[:taken]))
            else:
                self._blank, self._spoken = "", False  # whitespace between calls is no content
                out += [self._made(call) for call in calls]
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
        # Past a failed try, only a new "}" can end an object: no parse per token of a long call.
        while self._buffer and (final or "}" in self._buffer[self._tried:]):
            text = self._buffer.lstrip().removeprefix(";").lstrip()
            try:
                data, end = _JSON.raw_decode(text)
            except _PARSE_ERRORS:
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
            data, end = _JSON.raw_decode(text, at)
        except _PARSE_ERRORS:
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
            if self.calls:  # after a call: a comma, the list's end, or a comma and its end
                if text[:1] == ",":
                    text = text[1:].lstrip()
                elif text and text[0] != "]":
                    return out + self._not_pythonic()
                if text[:1] == "]":
                    self._listed, self._buffer = True, text[1:]
                    break
            match = _PYTHON_NAME.match(text)
            opened = text[match.end():].lstrip()[:1] if match else ""
            if match is None and text or opened not in ("", "("):
                return out + self._not_pythonic()
            self._call_end = self._call_end or _PythonCallEnd()
            end = self._call_end.find(text) if opened else None
            if end is None:
                if final:
                    return out + self._not_pythonic()
                break  # the call is not whole yet
            call = _python_call(text[:end]) if end > 0 else None
            if call is None:
                return out + self._not_pythonic()
            out.append(self._made(call))
            self._buffer, self._call_end = text[end:], None
        if final and self._listed:
            rest, self._buffer = self._buffer.strip().removeprefix(self.PYTHON_END).strip(), ""
            out += [rest] if rest else []  # what follows the list
        return out

    def _not_pythonic(self) -> Segments:
        """The text from where calls stopped parsing, as content: the whole answer if no call
        parsed, else what followed the last call; what comes next is content too."""
        text = self._buffer.lstrip().removeprefix(",").lstrip() if self.calls else self._answer
        self._json, self._buffer, self._call_end = False, "", None
        return [text] if text else []

    # ------------------------------------------------------ forced (structured)
    def _forced(self, final: bool) -> Segments:
        if not final:
            return []
        text, self._buffer = self._buffer, ""
        if self.kind == "named":
            try:
                _loads(text)
            except ValueError:
                return [text] if text else []  # cut short: not arguments
            return [self._made(_tool_call({"name": self.function, "arguments": text.strip()}, ("arguments",)))]
        try:
            data = _loads(text)
        except ValueError:
            return [text] if text else []
        calls = [_tool_call(item, ("parameters",)) for item in data] if isinstance(data, list) else [None]
        if not calls or None in calls:
            return [text] if text else []
        return [self._made(call) for call in calls]
