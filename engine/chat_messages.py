"""Chat messages as chat templates take them: the offline LLM.chat and the HTTP server's chat
endpoints render through the same steps."""

from __future__ import annotations

import json
from typing import Any

# apply_chat_template's own arguments: never a template variable a request's
# chat_template_kwargs may set.
TEMPLATE_ARGUMENTS = frozenset({
    "conversation", "tools", "documents", "chat_template", "add_generation_prompt", "continue_final_message",
    "tokenize", "padding", "truncation", "max_length", "return_tensors", "return_dict",
    "return_assistant_tokens_mask", "tokenizer_kwargs"})


def template_variables(chat_template_kwargs: dict[str, Any] | None) -> dict[str, Any]:
    """A request's chat_template_kwargs that are the template's variables."""
    return {k: v for k, v in (chat_template_kwargs or {}).items() if k not in TEMPLATE_ARGUMENTS}


def _with_tool_arguments_parsed(message: dict[str, Any]) -> dict[str, Any]:
    """A history's tool calls as templates take them (vLLM does the same): each call's
    `function.arguments`, a JSON string in OpenAI's messages, as the object it encodes (a
    string that is not JSON stays one). The message is copied where it changes, not modified."""
    calls = message.get("tool_calls")
    if not calls or not isinstance(calls, list):
        return message
    parsed = []
    for call in calls:
        function = call.get("function") if isinstance(call, dict) else None
        if isinstance(function, dict) and isinstance(function.get("arguments"), str):
            try:
                call = call | {"function": function | {"arguments": json.loads(function["arguments"])}}
            except (ValueError, RecursionError):  # RecursionError: nested past the parser's depth
                pass
        parsed.append(call)
    return message | {"tool_calls": parsed}


class UnsupportedContent(ValueError):
    """A content part stoke cannot show the model (an image, audio, ...)."""


def template_message(message: dict[str, Any]) -> dict[str, Any]:
    """One OpenAI chat message as templates take it, as vLLM renders a string-content template:
    text content parts joined by newlines (content None: ""), tool calls' arguments parsed.
    ValueError for a malformed text part, UnsupportedContent for a part of another type."""
    content = message.get("content")
    if isinstance(content, list):
        texts = []
        for part in content:
            kind = part.get("type") if isinstance(part, dict) else None
            if kind != "text":
                raise UnsupportedContent(f"message content of type '{kind}' is not supported")
            if not isinstance(part.get("text"), str):
                raise ValueError("a text content part needs 'text'")
            texts.append(part["text"])
        content = "\n".join(texts)
    return _with_tool_arguments_parsed(message | {"content": content or ""})
