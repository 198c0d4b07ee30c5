"""Tool calls in a model's text, as vLLM's `--tool-call-parser` finds them, for OpenAI's
`tool_calls`: the same parser reads a whole answer and a stream, so both give the same calls.

- `hermes` (Qwen2.5, Qwen3, Hermes, and most chat templates with tools): each call is
  `<tool_call>{"name": ..., "arguments": {...}}</tool_call>`; the text before the first one is
  the message's content. A last call left open (the answer cut by max_tokens) counts if its JSON
  is whole, as vLLM's.
- `llama3_json` (Llama 3.1+): an answer that starts with a JSON object (after
  `<|python_tag|>`, when special tokens are kept) is one or more calls,
  `{"name": ..., "parameters": {...}}`, separated by `;`; any other answer is content.

Text that does not parse as a call is never lost: it stays in the content.
"""

from __future__ import annotations

import json
import uuid
from typing import Any

TOOL_CALL_PARSERS = ("hermes", "llama3_json")


def _tool_call(data: Any, arguments_key: str) -> dict[str, Any] | None:
    """OpenAI's tool call from a parsed call object; None if it is not one."""
    if not isinstance(data, dict) or not isinstance(data.get("name"), str):
        return None
    arguments = data.get(arguments_key, data.get("arguments", data.get("parameters", {})))
    if not isinstance(arguments, str):
        arguments = json.dumps(arguments, ensure_ascii=False)
    return {"id": f"call_{uuid.uuid4().hex[:24]}", "type": "function",
            "function": {"name": data["name"], "arguments": arguments}}


def _held_back(text: str, marker: str) -> int:
    """How many of the text's last characters could begin `marker`: held until the next text says."""
    for keep in range(min(len(marker) - 1, len(text)), 0, -1):
        if marker.startswith(text[-keep:]):
            return keep
    return 0


class ToolCallParser:
    """One choice's text, fed as it comes (`feed`), then `finish`ed: each returns the content
    and the tool calls it completed. `calls` counts them all."""

    def __init__(self, kind: str) -> None:
        if kind not in TOOL_CALL_PARSERS:
            raise ValueError(f"tool call parser must be one of {TOOL_CALL_PARSERS}, got {kind!r}")
        self.kind = kind
        self.calls = 0
        self._buffer = ""
        self._json: bool | None = None  # llama3_json: the answer is calls (None: not known yet)

    def feed(self, text: str) -> tuple[str, list[dict[str, Any]]]:
        self._buffer += text
        return self._hermes(final=False) if self.kind == "hermes" else self._llama3_json(final=False)

    def finish(self) -> tuple[str, list[dict[str, Any]]]:
        return self._hermes(final=True) if self.kind == "hermes" else self._llama3_json(final=True)

    def parse(self, text: str) -> tuple[str | None, list[dict[str, Any]]]:
        """A whole answer: its content (None where only calls were made) and its calls."""
        content, calls = self.feed(text)
        more, last = self.finish()
        content += more
        calls += last
        return (None if calls and not content.strip() else content), calls

    def _made(self, call: dict[str, Any]) -> dict[str, Any]:
        call["index"] = self.calls
        self.calls += 1
        return call

    # ------------------------------------------------------------------ hermes
    START, END = "<tool_call>", "</tool_call>"

    def _hermes(self, final: bool) -> tuple[str, list[dict[str, Any]]]:
        content, calls, buffer = [], [], self._buffer
        while buffer:
            start = buffer.find(self.START)
            text = buffer if start < 0 else buffer[:start]
            if start < 0 and not final:  # what could begin a call, or only whitespace after one, waits
                keep = len(text) if self.calls and not text.strip() else _held_back(text, self.START)
                text = text[:len(text) - keep]
            if text.strip() or not self.calls:  # between and after calls, only what is more than whitespace
                content.append(text)
            buffer = buffer[len(text):] if start < 0 else buffer[start:]
            if start < 0:
                if final:
                    buffer = ""
                break
            end = buffer.find(self.END)
            if end < 0 and not final:
                break  # the call is not whole yet
            body, taken = (buffer[len(self.START):end], end + len(self.END)) if end >= 0 else \
                (buffer[len(self.START):], len(buffer))  # a last call left open
            try:
                call = _tool_call(json.loads(body), "arguments")
            except json.JSONDecodeError:
                call = None
            if call is None:
                content.append(buffer[:taken])
            else:
                calls.append(self._made(call))
            buffer = buffer[taken:]
        self._buffer = buffer
        return "".join(content), calls

    # ------------------------------------------------------------- llama3_json
    PYTHON_TAG = "<|python_tag|>"

    def _llama3_json(self, final: bool) -> tuple[str, list[dict[str, Any]]]:
        if self._json is None:
            start = self._buffer.lstrip()
            if start.startswith(("{", self.PYTHON_TAG)):
                self._json = True
            elif start and not self.PYTHON_TAG.startswith(start) or final:
                self._json = False
            else:
                return "", []  # only whitespace, or the tag's beginning, so far
        if not self._json:
            content, self._buffer = self._buffer, ""
            return content, []
        text = self._buffer.lstrip()
        text = text[len(self.PYTHON_TAG):] if text.startswith(self.PYTHON_TAG) else text
        calls, decoder = [], json.JSONDecoder()
        while True:
            text = text.lstrip().removeprefix(";").lstrip()
            if not text:
                break
            try:
                data, end = decoder.raw_decode(text)
            except json.JSONDecodeError:
                break  # not whole yet, or not JSON
            call = _tool_call(data, "parameters")
            if call is None:
                break
            calls.append(self._made(call))
            text = text[end:]
        self._buffer = text
        if final and text:  # what did not parse: content, all of the answer if no call came
            self._buffer = ""
            return text, calls
        return "", calls
