"""Chat messages as chat templates take them: the offline LLM.chat and the HTTP server's chat
endpoints render through the same steps."""

from __future__ import annotations

import json
from typing import Any


def with_tool_arguments_parsed(message: dict[str, Any]) -> dict[str, Any]:
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
            except ValueError:
                pass
        parsed.append(call)
    return message | {"tool_calls": parsed}
