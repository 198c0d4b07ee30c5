"""Tool calls over the real server (`--enable-auto-tool-choice --tool-call-parser hermes`),
driven by the `openai` SDK: a scripted checkpoint (tests/scripted_model.py) answers every chat
with a tool call, so the answer's calls come back as OpenAI's `tool_calls`, whole and streamed
alike, and `tool_choice` behaves as vLLM's. Its tokenizer marks `<tool_call>` special, as some
models' do: the parser must see it although text skips special tokens by default."""

from __future__ import annotations

import json

import openai
import pytest

from tests.scripted_model import scripted_checkpoint
from tests.server_harness import ServerProcess, idle, wait_for

ANSWER = 'Let me check. <tool_call>{"name":"weather","arguments": {"city": "Paris"}}</tool_call>'
TOOLS = [{"type": "function", "function": {
    "name": "weather", "description": "The weather in a city",
    "parameters": {"type": "object", "properties": {"city": {"type": "string"}}, "required": ["city"]}}}]
QUESTION = [{"role": "user", "content": "What is the weather in Paris?"}]


@pytest.fixture(scope="module")
def server(tmp_path_factory: pytest.TempPathFactory):
    model = scripted_checkpoint(str(tmp_path_factory.mktemp("scripted")), ANSWER, ("<tool_call>", "</tool_call>"),
                                special=True)
    with ServerProcess(model, "--num-kv-blocks", "64", "--cpu-threads", "1", "--generation-config", "none",
                       "--enable-auto-tool-choice", "--tool-call-parser", "hermes") as s:
        yield s


@pytest.fixture(scope="module")
def client(server):
    return server.client()


def test_a_tool_call_comes_back_as_tool_calls(server, client):
    out = client.chat.completions.create(model=None, messages=QUESTION, tools=TOOLS, max_tokens=64, temperature=0)
    choice = out.choices[0]
    assert choice.finish_reason == "tool_calls" and choice.message.content == "Let me check. "
    (call,) = choice.message.tool_calls
    assert call.type == "function" and call.id.startswith("call_") and call.function.name == "weather"
    assert json.loads(call.function.arguments) == {"city": "Paris"}
    assert server.log_lines()[-1]["finish_reason"] == "tool_calls"
    # The call and its result go back in the history, as an agent loop sends them.
    history = QUESTION + [choice.message.model_dump(exclude_none=True),
                          {"role": "tool", "tool_call_id": call.id, "content": '{"celsius": 21}'}]
    again = client.chat.completions.create(model=None, messages=history, tools=TOOLS, max_tokens=64, temperature=0)
    assert again.choices[0].message.tool_calls[0].function.name == "weather"


def test_a_streamed_tool_call_equals_the_whole_one(client):
    stream = client.chat.completions.create(model=None, messages=QUESTION, tools=TOOLS, max_tokens=64, temperature=0,
                                            stream=True, n=2)
    content, calls, reasons = {0: "", 1: ""}, {0: {}, 1: {}}, {}
    for chunk in stream:
        for choice in chunk.choices:
            delta = choice.delta
            assert "<tool" not in (delta.content or "")  # a marker's first characters wait
            content[choice.index] += delta.content or ""
            for part in delta.tool_calls or []:
                call = calls[choice.index].setdefault(part.index, {"id": part.id, "name": "", "arguments": ""})
                call["name"] += part.function.name or ""
                call["arguments"] += part.function.arguments or ""
            if choice.finish_reason:
                reasons[choice.index] = choice.finish_reason
    assert reasons == {0: "tool_calls", 1: "tool_calls"} and content == {0: "Let me check. ", 1: "Let me check. "}
    for index in (0, 1):
        (call,) = calls[index].values()
        assert call["id"].startswith("call_") and call["name"] == "weather"
        assert json.loads(call["arguments"]) == {"city": "Paris"}


def test_tool_choice_none_and_no_tools_answer_in_text(client):
    text = ANSWER.replace("<tool_call>", "").replace("</tool_call>", "")  # special: skipped in text
    for kwargs in ({"tools": TOOLS, "tool_choice": "none"}, {}, {"extra_body": {"skip_special_tokens": False}}):
        out = client.chat.completions.create(model=None, messages=QUESTION, max_tokens=64, temperature=0, **kwargs)
        assert out.choices[0].message.content == (ANSWER if "extra_body" in kwargs else text)
        assert not out.choices[0].message.tool_calls and out.choices[0].finish_reason == "stop"


def test_what_tool_calls_cannot_do_is_a_clear_400(server, client):
    before = server.metrics()
    cases = [({"tool_choice": {"type": "function", "function": {"name": "rain"}}}, "tool_choice", "invalid_value"),
             ({"tool_choice": {"type": "function", "name": "weather"}}, "tool_choice", "invalid_value"),
             ({"tool_choice": "sometimes"}, "tool_choice", "invalid_value"),
             ({"tools": [{"type": "function", "function": {"description": "no name"}}]}, "tools.0", "invalid_value")]
    for extra, param, code in cases:
        with pytest.raises(openai.BadRequestError) as info:
            client.chat.completions.create(model=None, messages=QUESTION, max_tokens=8, **({"tools": TOOLS} | extra))
        assert info.value.body["param"] == param and info.value.body["code"] == code, info.value.body
    with pytest.raises(openai.BadRequestError):  # refused for its tools first: its line still has its priority
        client.chat.completions.create(model=None, messages=QUESTION, tools=[{"type": "x"}], extra_body={"priority": 3})
    assert server.log_lines()[-1]["priority"] == 3
    with pytest.raises(openai.NotFoundError):  # an unknown model too
        client.chat.completions.create(model="nope", messages=QUESTION, extra_body={"priority": 2})
    assert server.log_lines()[-1]["priority"] == 2
    assert wait_for(lambda: idle(server), 30)
    assert server.metrics()['stoke_request_errors_total{type="invalid_request"}'] \
        - before['stoke_request_errors_total{type="invalid_request"}'] == len(cases) + 2
