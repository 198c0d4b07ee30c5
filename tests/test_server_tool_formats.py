"""Tool call formats other than hermes over the real server, driven by the `openai` SDK: a
scripted checkpoint (tests/scripted_model.py) answers every chat with Mistral's `[TOOL_CALLS]`
or Qwen3-Coder's XML-like call (its values typed by the request's tools), their markers special
tokens, which the parser must see although text skips special tokens by default. Whole and
streamed answers, and the Responses API's, give the same calls; a Mistral server's call ids are
the 9 letters and digits Mistral's chat templates take back."""

from __future__ import annotations

import functools
import json
import re
from typing import Any

import pytest

from tests.scripted_model import scripted_checkpoint
from tests.server_harness import ServerProcess, idle, wait_for

TOOLS = [{"type": "function", "function": {
    "name": "weather", "description": "The weather in a city for some days",
    "parameters": {"type": "object", "properties": {"city": {"type": "string"}, "days": {"type": "integer"}},
                   "required": ["city"]}}}]
QUESTION = [{"role": "user", "content": "What is the weather in Paris?"}]
# (the scripted answer, its added tokens, whether they are special, the content, the call's
# arguments, its id's pattern): each of the answer's tokens must differ (scripted_model.py),
# hence an answer without newlines and whole tags as added tokens
FORMATS = {
    "mistral": ('Sure. [TOOL_CALLS]weather[ARGS]{"city":"Paris","days":3}', ("[TOOL_CALLS]", "[ARGS]"), True,
                "Sure. ", {"city": "Paris", "days": 3}, "[A-Za-z0-9]{9}"),
    # "3" comes back as the integer the request's tool says it is
    "qwen3_coder": ("Let me check. <tool_call><function=weather><parameter=days>3</parameter></function></tool_call>",
                    ("<tool_call>", "<function=weather>", "<parameter=days>", "</parameter>", "</function>",
                     "</tool_call>"), True, "Let me check. ", {"days": 3}, "call_[0-9a-f]{24}"),
}


@pytest.fixture(scope="module", params=sorted(FORMATS))
def server(request: pytest.FixtureRequest, tmp_path_factory: pytest.TempPathFactory):
    answer, added, special, *_ = FORMATS[request.param]
    model = scripted_checkpoint(str(tmp_path_factory.mktemp(request.param)), answer, added, special=special)
    with ServerProcess(model, "--num-kv-blocks", "64", "--cpu-threads", "1", "--generation-config", "none",
                       "--enable-auto-tool-choice", "--tool-call-parser", request.param) as s:
        s.parser = request.param
        yield s


def the_call(server: ServerProcess, content: str | None, call: dict[str, Any]) -> None:
    *_, want_content, arguments, id_pattern = FORMATS[server.parser]
    assert content == want_content
    assert re.fullmatch(id_pattern, call["id"]), call["id"]
    assert call["name"] == "weather" and json.loads(call["arguments"]) == arguments


def test_a_whole_answers_call(server):
    client = server.client()
    out = client.chat.completions.create(model=None, messages=QUESTION, tools=TOOLS, max_tokens=96, temperature=0)
    choice = out.choices[0]
    (call,) = choice.message.tool_calls
    assert choice.finish_reason == "tool_calls" and call.type == "function"
    the_call(server, choice.message.content, {"id": call.id, "name": call.function.name,
                                              "arguments": call.function.arguments})
    # tool_choice "none", or a request that skips special tokens itself: the answer is text,
    # without the markers
    answer, added, *_ = FORMATS[server.parser]
    for extra in ({"tool_choice": "none"}, {"extra_body": {"skip_special_tokens": True}}):
        out = client.chat.completions.create(model=None, messages=QUESTION, tools=TOOLS, max_tokens=96,
                                             temperature=0, **extra).choices[0]
        assert out.message.content == functools.reduce(lambda text, tag: text.replace(tag, ""), added, answer)
        assert not out.message.tool_calls and out.finish_reason == "stop"


def test_the_responses_apis_call_is_the_chats(server):
    tools = [{"type": "function", "name": t["function"]["name"], "parameters": t["function"]["parameters"]}
             for t in TOOLS]
    response = server.client().responses.create(model=None, input=QUESTION[0]["content"], tools=tools,
                                                max_output_tokens=96, temperature=0)
    message, call = response.output
    assert message.type == "message" and call.type == "function_call"
    the_call(server, message.content[0].text, {"id": call.call_id, "name": call.name, "arguments": call.arguments})


def test_a_streamed_answers_call_is_the_whole_ones(server):
    stream = server.client().chat.completions.create(model=None, messages=QUESTION, tools=TOOLS, max_tokens=96,
                                                     temperature=0, stream=True)
    content, calls, reason = "", {}, None
    for chunk in stream:
        for choice in chunk.choices:
            content += choice.delta.content or ""
            for part in choice.delta.tool_calls or []:
                call = calls.setdefault(part.index, {"id": part.id, "name": "", "arguments": ""})
                call["name"] += part.function.name or ""
                call["arguments"] += part.function.arguments or ""
            reason = choice.finish_reason or reason
    (call,) = calls.values()
    assert reason == "tool_calls"
    the_call(server, content, call)
    assert wait_for(lambda: idle(server), 30)
