"""Structured outputs over the real server, driven by the `openai` SDK with the embedded default
model: OpenAI's response_format (json_schema, json_object; the SDK's `parse` with a pydantic
model), vLLM's guided_choice / guided_regex / structured_outputs, tool_choice "required" and a named
function; what can't be served is a 400 that names the field and leaves the server as it was."""

from __future__ import annotations

import json
import re
from typing import Literal

import openai
import pytest
from pydantic import BaseModel

from tests.server_harness import ServerProcess, idle, wait_for

PERSON = {"type": "object", "additionalProperties": False, "required": ["name", "age"],
          "properties": {"name": {"type": "string"}, "age": {"type": "integer"}}}
ASK = [{"role": "user", "content": "Ann is 31 years old. Give her name and age as JSON."}]
TOOLS = [{"type": "function", "function": {
    "name": "get_weather", "description": "The weather in a city",
    "parameters": {"type": "object", "properties": {"city": {"type": "string"}}, "required": ["city"]}}},
    {"type": "function", "function": {"name": "get_time", "description": "The time in a city",
                                      "parameters": {"type": "object", "properties": {"city": {"type": "string"}},
                                                     "required": ["city"]}}}]
WEATHER = [{"role": "user", "content": "What is the weather in Paris?"}]


class Weather(BaseModel):
    city: str
    sky: Literal["sunny", "cloudy", "rainy"]
    celsius: int


@pytest.fixture(scope="module")
def server():
    with ServerProcess("--kv-cache-memory-bytes", "128MiB", "--cpu-threads", "1", "--max-num-seqs", "8") as s:
        yield s


@pytest.fixture(scope="module")
def client(server):
    return server.client()


def _streamed(stream) -> tuple[dict[int, str], dict[int, str], dict[int, list]]:
    """Content, finish reason and tool call parts per choice index of a chat stream."""
    content: dict[int, str] = {}
    reasons: dict[int, str] = {}
    calls: dict[int, list] = {}
    for chunk in stream:
        for choice in chunk.choices:
            content[choice.index] = content.get(choice.index, "") + (choice.delta.content or "")
            calls.setdefault(choice.index, []).extend(choice.delta.tool_calls or [])
            if choice.finish_reason:
                reasons[choice.index] = choice.finish_reason
    return content, reasons, calls


def test_a_json_schema_answer_is_valid_json_of_that_schema(server, client):
    fmt = {"type": "json_schema", "json_schema": {"name": "person", "schema": PERSON, "strict": True}}
    out = client.chat.completions.create(model=None, messages=ASK, max_tokens=48, temperature=0, response_format=fmt)
    choice = out.choices[0]
    assert choice.finish_reason == "stop"
    person = json.loads(choice.message.content)
    assert set(person) == {"name", "age"} and isinstance(person["name"], str) and type(person["age"]) is int
    streamed, reasons, _ = _streamed(client.chat.completions.create(
        model=None, messages=ASK, max_tokens=48, temperature=0, response_format=fmt, stream=True))
    assert streamed == {0: choice.message.content} and reasons == {0: "stop"}
    # Sampled at random too (n = 3): every answer is valid.
    out = client.chat.completions.create(model=None, messages=ASK, max_tokens=48, temperature=1.0, seed=7, n=3,
                                         response_format=fmt)
    for choice in out.choices:
        if choice.finish_reason == "stop":
            assert set(json.loads(choice.message.content)) == {"name", "age"}
        else:  # cut by max_tokens: still the beginning of a valid answer
            assert choice.finish_reason == "length" and choice.message.content.lstrip().startswith('{"name"')
    assert server.log_lines()[-1]["n"] == 3 and server.log_lines()[-1]["structured"] == "json"


def test_the_sdk_parses_a_pydantic_model(client):
    out = client.chat.completions.parse(model=None, messages=WEATHER, max_tokens=64, temperature=0,
                                        response_format=Weather)
    weather = out.choices[0].message.parsed
    assert isinstance(weather, Weather) and weather.sky in ("sunny", "cloudy", "rainy")


def test_json_object_choices_and_regexes(server, client):
    out = client.chat.completions.create(model=None, messages=ASK, max_tokens=96, temperature=0,
                                         response_format={"type": "json_object"})
    text = out.choices[0].message.content
    if out.choices[0].finish_reason == "stop":
        assert isinstance(json.loads(text), dict)
    assert text.lstrip().startswith("{")
    choices = ["positive", "negative", "neutral"]
    for extra in ({"guided_choice": choices}, {"structured_outputs": {"choice": choices}}):
        out = client.completions.create(model=None, prompt="Review: I love this phone! Sentiment:", max_tokens=8,
                                        temperature=0, extra_body=extra)
        assert out.choices[0].text in choices and out.choices[0].finish_reason == "stop"
        assert server.log_lines()[-1]["structured"] == "choice"
    out = client.completions.create(model=None, prompt="Ann is 31. As JSON:", max_tokens=48, temperature=0,
                                    extra_body={"structured_outputs": {"json": json.dumps(PERSON)}})
    assert set(json.loads(out.choices[0].text)) == {"name", "age"}
    date = r"\d{4}-\d{2}-\d{2}"
    for extra in ({"guided_regex": date}, {"structured_outputs": {"regex": date}}):
        out = client.chat.completions.create(model=None, messages=[{"role": "user", "content": "When did WW2 end?"}],
                                             max_tokens=16, temperature=0, extra_body=extra)
        assert re.fullmatch(date, out.choices[0].message.content) and out.choices[0].finish_reason == "stop"
    # An EBNF grammar (GBNF), as vLLM's xgrammar takes it.
    sql = 'root ::= "SELECT " col (", " col)* " FROM " table\ncol ::= [a-z_]+\ntable ::= "users" | "orders"'
    pattern = r"SELECT [a-z_]+(, [a-z_]+)* FROM (users|orders)"
    for extra in ({"guided_grammar": sql}, {"structured_outputs": {"grammar": sql}}):
        out = client.completions.create(model=None, prompt="The SQL to list every user's name:", max_tokens=24,
                                        temperature=0, extra_body=extra)
        assert re.fullmatch(pattern, out.choices[0].text) and out.choices[0].finish_reason == "stop", out
        assert server.log_lines()[-1]["structured"] == "grammar"


def test_tool_choice_required_and_named_make_calls(server, client):
    out = client.chat.completions.create(model=None, messages=WEATHER, tools=TOOLS, tool_choice="required",
                                         max_tokens=64, temperature=0)
    choice = out.choices[0]
    assert choice.finish_reason == "tool_calls" and choice.message.content is None
    assert choice.message.tool_calls and all(c.function.name in ("get_weather", "get_time")
                                             for c in choice.message.tool_calls)
    assert all(set(json.loads(c.function.arguments)) == {"city"} for c in choice.message.tool_calls)
    assert server.log_lines()[-1]["finish_reason"] == "tool_calls" and server.log_lines()[-1]["structured"] == "json"
    content, reasons, parts = _streamed(client.chat.completions.create(
        model=None, messages=WEATHER, tools=TOOLS, tool_choice="required", max_tokens=64, temperature=0, stream=True))
    assert reasons == {0: "tool_calls"} and not content[0]
    assert [(p.function.name, json.loads(p.function.arguments)) for p in parts[0]] == \
        [(c.function.name, json.loads(c.function.arguments)) for c in choice.message.tool_calls]

    named = {"type": "function", "function": {"name": "get_time"}}
    out = client.chat.completions.create(model=None, messages=WEATHER, tools=TOOLS, tool_choice=named,
                                         max_tokens=64, temperature=0)
    choice = out.choices[0]
    (call,) = choice.message.tool_calls
    assert choice.finish_reason == "stop" and call.function.name == "get_time" and call.id.startswith("call_")
    assert set(json.loads(call.function.arguments)) == {"city"} and choice.message.content is None
    # parallel_tool_calls false: one call at most
    out = client.chat.completions.create(model=None, messages=WEATHER, tools=TOOLS, tool_choice="required",
                                         parallel_tool_calls=False, max_tokens=64, temperature=0)
    assert len(out.choices[0].message.tool_calls) == 1


def test_what_structured_outputs_cannot_do_is_a_clear_400(server, client):
    before = server.metrics()
    schema = {"type": "object", "properties": {"score": {"type": "number", "multipleOf": 0.5}}}
    cases = [
        ({"response_format": {"type": "json_schema", "json_schema": {"name": "x", "schema": schema}}},
         "response_format", "'multipleOf'"),
        ({"response_format": {"type": "xml"}}, "response_format", "json_schema"),
        ({"response_format": {"type": "json_schema"}}, "response_format", "json_schema"),
        ({"structured_outputs": {"grammar": 'root ::= "a" b'}}, "structured_outputs", "does not define: b"),
        ({"guided_regex": r"(a)\1"}, "guided_regex", "backreferences"),
        ({"guided_grammar": 'root: "a"'}, "guided_grammar", "as Lark writes rules"),
        ({"guided_json": {"enum": [1, 2], "type": "string"}}, "guided_json", "of its type"),
        ({"structured_outputs": {"json_object": True, "whitespace_pattern": " "}}, "structured_outputs",
         "whitespace_pattern"),
        ({"structured_outputs": {"json": {"$ref": "#"}}}, "structured_outputs", "itself"),
        ({"guided_choice": ["a"], "response_format": {"type": "json_object"}}, "guided_choice", "send one"),
        ({"guided_json": PERSON, "ignore_eos": True}, "ignore_eos", "ignore_eos"),
        ({"tools": TOOLS, "tool_choice": {"type": "function", "function": {"name": "nope"}}}, "tool_choice", "nope"),
        ({"tools": TOOLS, "tool_choice": "required", "response_format": {"type": "json_object"}}, "tool_choice",
         "cannot be combined"),
    ]
    for extra, param, words in cases:
        with pytest.raises(openai.BadRequestError) as info:
            client.chat.completions.create(model=None, messages=ASK, max_tokens=8, extra_body=extra)
        body = info.value.body
        assert body["param"] == param and words in body["message"] and body["type"] == "invalid_request_error", body
    assert wait_for(lambda: idle(server), 30)
    assert server.metrics()['stoke_request_errors_total{type="invalid_request"}'] \
        - before['stoke_request_errors_total{type="invalid_request"}'] == len(cases)
    out = client.chat.completions.create(model=None, messages=ASK, max_tokens=4, temperature=0)
    assert out.choices[0].finish_reason == "length" and server.log_lines()[-1]["structured"] is None
