"""OpenAI's Responses API (`POST /v1/responses`) over the real server (`--reasoning-parser qwen3
--enable-auto-tool-choice --tool-call-parser hermes`), driven by the `openai` SDK: a scripted
checkpoint (tests/scripted_model.py) thinks, says a few words and calls a tool, so one answer
comes back as a `reasoning` item, a `message` and a `function_call`, whole and streamed alike
(the stream's typed events, in a valid order, add up to the whole response; the SDK's
accumulator gets the whole response back), and as the same chat gives it on
/v1/chat/completions: content, calls, reasoning and usage. An agent loop's call and its output
sent back render as the chat's history, token for token; `instructions` are a system message;
what is not served is a 400 naming the Responses field, and leaves the server idle.

Each token of the scripted answer leads to the next whatever came before, so a prompt that ends
inside the answer goes on from there: the server's template (ChatML that shows the tools, an
assistant's tool calls and the tool results) has a `prefill` variable, text after the
assistant's header that `chat_template_kwargs` set. After `</think>` the answer is its words and
its call, no thinking; after `</tool_call>` it is nothing at all."""

from __future__ import annotations

import json
import re
import urllib.request

import openai
import pydantic
import pytest

from tests.scripted_model import scripted_checkpoint, scripted_tokens
from tests.server_harness import ServerProcess, idle, wait_for

THOUGHT = "Call count?"
LEAD = "Let me count."
CALL = '{"name":"count","arguments": {"n": 7}}'
ANSWER = f"<think>{THOUGHT}</think>{LEAD}<tool_call>{CALL}</tool_call>"
TAGS = ("<think>", "</think>", "<tool_call>", "</tool_call>")
TEMPLATE = (  # ChatML, Qwen's way with tools: the system message's text, then the tools, in the first turn
    "{% for message in messages %}"
    "{% if loop.first and tools %}<|im_start|>system\n{% if message['role'] == 'system' %}{{ message['content'] }}\n"
    "{% endif %}{% for tool in tools %}{{ tool | tojson }}\n{% endfor %}<|im_end|>\n{% endif %}"
    "{% if not (loop.first and tools and message['role'] == 'system') %}"
    "<|im_start|>{{ message['role'] }}\n{{ message['content'] }}{% for call in message['tool_calls'] or [] %}"
    "<tool_call>{{ {'name': call['function']['name'], 'arguments': call['function']['arguments']} | tojson }}"
    "</tool_call>{% endfor %}<|im_end|>\n{% endif %}{% endfor %}"
    "{% if add_generation_prompt %}<|im_start|>assistant\n{{ prefill | default('') }}{% endif %}")
QUESTION = "Count."
MODEL = "scripted"  # the checkpoint's directory: the served model's name
COUNT = {"type": "object", "properties": {"n": {"enum": [7]}}, "required": ["n"]}
TOOLS = [{"type": "function", "name": "count", "description": "Count", "parameters": COUNT}]  # the Responses API's
CHAT_TOOLS = [{"type": "function", "function": {"name": "count", "description": "Count", "parameters": COUNT}}]
OK = {"type": "object", "properties": {"ok": {"type": "boolean"}}, "required": ["ok"]}  # not the scripted content's
AFTER_THINKING = {"chat_template_kwargs": {"prefill": "</think>"}}  # the answer goes on with its words
AFTER_CALL = {"chat_template_kwargs": {"prefill": "</tool_call>"}}  # the answer is EOS at once


@pytest.fixture(scope="module")
def scripted(tmp_path_factory: pytest.TempPathFactory) -> str:
    return scripted_checkpoint(str(tmp_path_factory.mktemp("responses") / MODEL), ANSWER, TAGS)


@pytest.fixture(scope="module")
def tokenizer(scripted: str):
    from transformers import AutoTokenizer

    return AutoTokenizer.from_pretrained(scripted)


@pytest.fixture(scope="module")
def answer_ids(scripted: str, tokenizer) -> list[int]:
    """The scripted answer's token ids, from the generation prompt's last token to EOS."""
    prompt = tokenizer.apply_chat_template([{"role": "user", "content": QUESTION}], chat_template=TEMPLATE,
                                           tokenize=False, add_generation_prompt=True)
    ids = scripted_tokens(scripted, tokenizer.encode(prompt, add_special_tokens=False)[-1], tokenizer.eos_token_id)
    assert tokenizer.decode(ids) == ANSWER and len(ids) < 64
    return ids


@pytest.fixture(scope="module")
def thinking_tokens(answer_ids: list[int], tokenizer) -> int:
    """The answer's tokens from its start through `</think>`, tags included."""
    return answer_ids.index(tokenizer.convert_tokens_to_ids("</think>")) + 1


@pytest.fixture(scope="module")
def server(scripted: str):
    with ServerProcess(scripted, "--num-kv-blocks", "64", "--cpu-threads", "1", "--generation-config", "none",
                       "--chat-template", TEMPLATE, "--reasoning-parser", "qwen3",
                       "--enable-auto-tool-choice", "--tool-call-parser", "hermes") as s:
        yield s


@pytest.fixture(scope="module")
def client(server):
    return server.client()


# ------------------------------------------------------------------ helpers
def _create(client, **kwargs):
    return client.responses.create(**({"model": MODEL, "input": QUESTION, "temperature": 0} | kwargs))


def _chat(client, messages=None, **kwargs):
    messages = [{"role": "user", "content": QUESTION}] if messages is None else messages
    return client.chat.completions.create(model=None, messages=messages, temperature=0, **kwargs)


def _post(server, path: str, body: dict) -> tuple[str, bytes]:
    """A POST's content type and body (200 only)."""
    request = urllib.request.Request(server.url + path, data=json.dumps(body).encode(),
                                     headers={"Content-Type": "application/json"})
    with urllib.request.urlopen(request, timeout=60) as r:
        return r.headers["Content-Type"], r.read()


def _tokenize(server, messages: list[dict], tools: list[dict] | None = None) -> list[int]:
    _, body = _post(server, "/tokenize", {"messages": messages} | ({"tools": tools} if tools else {}))
    return json.loads(body)["tokens"]


def _rendered(server, messages: list[dict], tools: list[dict] | None = None) -> str:
    _, body = _post(server, "/detokenize", {"tokens": _tokenize(server, messages, tools)})
    return json.loads(body)["prompt"]


def _sse(server, body: dict) -> list[dict]:
    """A streamed response's events as sent: each an `event:` line naming its type and a `data:` line."""
    kind, raw = _post(server, "/v1/responses", {"input": QUESTION, "temperature": 0, "stream": True} | body)
    assert kind.startswith("text/event-stream")
    events = []
    for block in raw.decode().split("\n\n")[:-1]:
        event, data = block.split("\n")
        assert event.startswith("event: ") and data.startswith("data: "), block
        events.append(json.loads(data.removeprefix("data: ")))
        assert events[-1]["type"] == event.removeprefix("event: ")
    assert raw.endswith(b"\n\n")
    return events


_ITEM_EVENTS = {  # between an item's output_item.added and its output_item.done
    "reasoning": r"content_part\.added (reasoning_text\.delta )*reasoning_text\.done content_part\.done ",
    "message": r"content_part\.added (output_text\.delta )*output_text\.done content_part\.done ",
    "function_call": r"(function_call_arguments\.delta )*function_call_arguments\.done ",
}


def _checked(events: list[dict], end: str = "response.completed") -> dict:
    """The final response of a stream whose events come in a valid order: created, in_progress,
    then each item (in its output_index order, one at a time) added, its parts and deltas,
    done, then `end`; sequence numbers 0, 1, 2 ...; each item's deltas add up to its text or
    arguments, and its done events show it as the final response has it."""
    assert [e["sequence_number"] for e in events] == list(range(len(events)))
    kinds = [e["type"] for e in events]
    assert kinds[:2] == ["response.created", "response.in_progress"] and kinds[-1] == end, kinds
    final = events[-1]["response"]
    for event in events[:2]:
        response = event["response"]
        assert response["id"] == final["id"] and response["status"] == "in_progress"
        assert response["output"] == [] and response["usage"] is None
    body, at = events[2:-1], 0
    for index, item in enumerate(final["output"]):
        added = body[at]
        assert added["type"] == "response.output_item.added" and added["output_index"] == index
        assert added["item"]["id"] == item["id"] and added["item"]["type"] == item["type"]
        cut = end == "response.incomplete" and index == len(final["output"]) - 1  # the item max_output_tokens cut
        assert added["item"]["status"] == "in_progress" and item["status"] == ("incomplete" if cut else "completed")
        done = next(j for j in range(at, len(body)) if body[j]["type"] == "response.output_item.done")
        inner = body[at + 1:done]
        assert re.fullmatch(_ITEM_EVENTS[item["type"]], "".join(e["type"].removeprefix("response.") + " "
                                                                for e in inner)), [e["type"] for e in inner]
        assert all(e["output_index"] == index and e["item_id"] == item["id"] for e in inner)
        assert body[done]["output_index"] == index and body[done]["item"] == item
        text = item["arguments"] if item["type"] == "function_call" else item["content"][0]["text"]
        assert "".join(e["delta"] for e in inner if e["type"].endswith(".delta")) == text
        ended = inner[-1] if item["type"] == "function_call" else inner[-2]  # the .done with the whole text
        assert ended.get("arguments", ended.get("text")) == text
        if item["type"] != "function_call":
            assert inner[0]["part"]["text"] == "" and inner[-1]["part"] == item["content"][0]
        at = done + 1
    assert at == len(body)
    return final


def _line(server, response_id: str) -> dict | None:
    """The log line of a response (its request id: "resp-" and the response id's own part)."""
    request_id = "resp-" + response_id.removeprefix("resp_")
    return next((line for line in server.log_lines() if line["request_id"] == request_id), None)


def _collapsed(kinds: list[str]) -> list[str]:
    """Event types, a run of deltas as one."""
    return [kind for i, kind in enumerate(kinds) if not (kind.endswith(".delta") and kinds[i - 1] == kind)]


def _normalized(response) -> dict:
    """A response (a dict or the SDK's) as any other answer to the same request has it: its
    ids, its calls' ids and its time left out."""
    body = response if isinstance(response, dict) else response.model_dump(exclude_none=True)
    key = body["id"].removeprefix("resp_")
    body = json.loads(json.dumps(body).replace(key, "KEY"))
    body.pop("created_at")
    for item in body["output"]:
        if "call_id" in item:
            assert item["call_id"].startswith("call_")
            item["call_id"] = "call_"
    return body


def _answer(response) -> tuple:
    """A response as a chat has it: reasoning, content, calls [(name, arguments)], how it ended,
    usage (input, cached, output, reasoning, total)."""
    kinds = [item.type for item in response.output]
    reasoning = [item.content[0].text for item in response.output if item.type == "reasoning"]
    messages = [item.content[0].text for item in response.output if item.type == "message"]
    assert kinds == sorted(kinds, key=["reasoning", "message", "function_call"].index) and len(reasoning) <= 1 \
        and len(messages) <= 1, kinds
    usage = response.usage
    return (reasoning[0] if reasoning else None, messages[0] if messages else None,
            [(item.name, item.arguments) for item in response.output if item.type == "function_call"],
            response.status, (usage.input_tokens, usage.input_tokens_details.cached_tokens, usage.output_tokens,
                              usage.output_tokens_details.reasoning_tokens, usage.total_tokens))


def _chat_answer(completion) -> tuple:
    (choice,) = completion.choices
    message, usage = choice.message, completion.usage
    return ((message.model_extra or {}).get("reasoning"), message.content,
            [(call.function.name, call.function.arguments) for call in message.tool_calls or []],
            "incomplete" if choice.finish_reason == "length" else "completed",
            (usage.prompt_tokens, usage.prompt_tokens_details.cached_tokens, usage.completion_tokens,
             usage.completion_tokens_details.reasoning_tokens, usage.total_tokens))


# ------------------------------------------------------------------ the answer as items
def test_an_answer_is_reasoning_a_message_and_a_function_call(server, client, answer_ids, thinking_tokens):
    instructions = "Count with the tools."  # no other test's prompt starts so: nothing of it is cached yet
    out = _create(client, instructions=instructions, tools=TOOLS, user="tester", metadata={"run": "1"})
    key = out.id.removeprefix("resp_")
    assert out.object == "response" and out.status == "completed" and out.incomplete_details is None
    assert out.error is None and out.model == MODEL
    assert [item.type for item in out.output] == ["reasoning", "message", "function_call"]
    reasoning, message, call = out.output
    assert reasoning.id == f"rs_{key}_0" and reasoning.status == "completed" and reasoning.summary == []
    assert [(part.type, part.text) for part in reasoning.content] == [("reasoning_text", THOUGHT)]
    assert (message.id, message.role, message.status) == (f"msg_{key}_1", "assistant", "completed")
    assert [part.model_dump(exclude_none=True) for part in message.content] == [
        {"type": "output_text", "text": LEAD, "annotations": [], "logprobs": []}]
    assert (call.id, call.name, call.arguments, call.status) == (f"fc_{key}_2", "count", '{"n": 7}', "completed")
    assert call.call_id.startswith("call_") and len(call.call_id) > len("call_")
    assert out.output_text == LEAD
    # the request, echoed
    assert (out.instructions, out.user, out.metadata, out.tool_choice) == (instructions, "tester", {"run": "1"}, "auto")
    assert [tool.name for tool in out.tools] == ["count"] and out.text.format.type == "text"
    assert (out.temperature, out.parallel_tool_calls, out.truncation, out.store) == (0.0, True, "disabled", False)
    assert out.previous_response_id is None and out.max_output_tokens is None
    # usage: the prompt is the chat's, the answer all its tokens and EOS
    messages = [{"role": "system", "content": instructions}, {"role": "user", "content": QUESTION}]
    prompt = _tokenize(server, messages, CHAT_TOOLS)
    usage = out.usage
    assert usage.input_tokens == len(prompt) and usage.input_tokens_details.cached_tokens == 0
    assert usage.output_tokens == len(answer_ids) + 1
    assert usage.output_tokens_details.reasoning_tokens == thinking_tokens == 5  # <think>, 3 tokens, </think>
    assert usage.total_tokens == usage.input_tokens + usage.output_tokens
    line = server.log_lines()[-1]
    assert (line["endpoint"], line["request_id"], line["user"], line["stream"], line["status"]) == (
        "responses", f"resp-{key}", "tester", False, 200)
    assert (line["prompt_tokens"], line["cached_tokens"], line["completion_tokens"], line["reasoning_tokens"],
            line["finish_reason"], line["structured"]) == (len(prompt), 0, len(answer_ids) + 1, thinking_tokens,
                                                           "stop", None)  # the engine's reason
    # the same again: its prompt's full blocks are cached, as the same chat's are
    again = _create(client, instructions=instructions, tools=TOOLS)
    cached = again.usage.input_tokens_details.cached_tokens
    assert cached == len(prompt) // 16 * 16 > 0  # its full blocks of 16
    chat = _chat(client, messages, tools=CHAT_TOOLS)
    assert chat.usage.prompt_tokens_details.cached_tokens == cached == _line(server, again.id)["cached_tokens"]
    assert again.id != out.id and again.output[2].call_id != call.call_id


# ------------------------------------------------------------------ streamed
@pytest.mark.parametrize("extra, kinds", [
    ({"tools": TOOLS}, ["reasoning", "message", "function_call"]),
    ({}, ["reasoning", "message"]),  # no tools: the call is text
    ({"tools": TOOLS, "extra_body": AFTER_THINKING}, ["message", "function_call"]),
    ({"tools": TOOLS, "extra_body": AFTER_CALL}, ["message"]),  # nothing said: an empty message
    ({"tools": TOOLS, "tool_choice": "required", "parallel_tool_calls": False}, ["reasoning", "function_call"]),
    ({"tools": TOOLS, "tool_choice": {"type": "function", "name": "count"}}, ["reasoning", "function_call"]),
    ({"text": {"format": {"type": "json_schema", "name": "verdict", "schema": OK}}}, ["reasoning", "message"]),
], ids=["thinking-words-call", "thinking-text", "words-call", "nothing", "required", "named", "json-schema"])
def test_a_streamed_response_adds_up_to_the_whole_one(server, client, extra, kinds):
    _create(client, **extra)  # its prompt cached: the same cached tokens for each request below
    whole = _create(client, **extra)
    assert [item.type for item in whole.output] == kinds
    # the SDK's accumulator: its final response is the whole one
    with client.responses.stream(**({"model": MODEL, "input": QUESTION, "temperature": 0} | extra)) as stream:
        seen = [event.type for event in stream]
        final = stream.get_final_response()
    assert seen[0] == "response.created" and seen[-1] == "response.completed"
    assert _normalized(final) == _normalized(whole)
    # the events as sent
    body = {k: v for k, v in extra.items() if k != "extra_body"} | extra.get("extra_body", {})
    events = _sse(server, body)
    assert _collapsed([e["type"] for e in events]) == _collapsed(seen)  # the deltas as the engine's steps cut them
    streamed = _checked(events)
    _, raw = _post(server, "/v1/responses", {"input": QUESTION, "temperature": 0} | body)
    assert _normalized(streamed) == _normalized(json.loads(raw))
    assert _normalized(json.loads(raw))["output"] == _normalized(whole)["output"]
    line = wait_for(lambda: _line(server, streamed["id"]), 10)
    assert (line["endpoint"], line["stream"], line["completion_tokens"]) == (
        "responses", True, whole.usage.output_tokens)


# ------------------------------------------------------------------ an agent loop
def test_an_agent_loop_sends_the_call_and_its_output_back(server, client, answer_ids):
    """The call item (as the SDK dumps it) and its output go back as input: the template sees an
    assistant's tool call and the tool's result, the prompt the same chat's, token for token."""
    first = _create(client, tools=TOOLS)
    call = first.output[-1]
    assert call.type == "function_call"
    items = [{"role": "user", "content": QUESTION}, call.model_dump(),
             {"type": "function_call_output", "call_id": call.call_id, "output": "7"}]
    out = _create(client, input=items, tools=TOOLS)
    history = [{"role": "user", "content": QUESTION},
               {"role": "assistant", "content": None, "tool_calls": [
                   {"id": call.call_id, "type": "function", "function": {"name": "count", "arguments": '{"n": 7}'}}]},
               {"role": "tool", "tool_call_id": call.call_id, "content": "7"}]
    rendered = _rendered(server, history, CHAT_TOOLS)
    assert rendered.endswith('<|im_start|>assistant\n<tool_call>{"name": "count", "arguments": {"n": 7}}</tool_call>'
                             '<|im_end|>\n<|im_start|>tool\n7<|im_end|>\n<|im_start|>assistant\n'), rendered
    assert out.usage.input_tokens == len(_tokenize(server, history, CHAT_TOOLS))
    chat = _chat(client, history, tools=CHAT_TOOLS)
    assert _answer(out)[:4] == _chat_answer(chat)[:4] == (THOUGHT, LEAD, [("count", '{"n": 7}')], "completed")
    assert out.usage.input_tokens == chat.usage.prompt_tokens and out.usage.output_tokens == len(answer_ids) + 1
    # the call's reasoning item sent back too: left out, as templates leave a past answer's thinking
    again = _create(client, input=[items[0], first.output[0].model_dump(), *items[1:]], tools=TOOLS)
    assert again.usage.input_tokens == out.usage.input_tokens
    # two calls in a row are one assistant turn
    second = {"type": "function_call", "call_id": "call_b", "name": "count", "arguments": '{"n": 8}'}
    twice = _create(client, input=[*items[:2], second, *items[2:],
                                   {"type": "function_call_output", "call_id": "call_b", "output": "8"}], tools=TOOLS)
    history[1]["tool_calls"].append({"id": "call_b", "type": "function",
                                     "function": {"name": "count", "arguments": '{"n": 8}'}})
    history.append({"role": "tool", "tool_call_id": "call_b", "content": "8"})
    assert twice.usage.input_tokens == len(_tokenize(server, history, CHAT_TOOLS))


def test_an_answers_whole_output_sent_back_is_one_assistant_turn(server, client):
    """`input += response.output`, as agent loops send it: the reasoning, the message and the call
    of one answer are one assistant turn, as the same chat's history has it."""
    first = _create(client, tools=TOOLS)
    call = first.output[-1]
    out = _create(client, tools=TOOLS, input=[
        {"role": "user", "content": QUESTION}, *[item.model_dump() for item in first.output],
        {"type": "function_call_output", "call_id": call.call_id, "output": "7"}])
    history = [{"role": "user", "content": QUESTION},
               {"role": "assistant", "content": LEAD, "tool_calls": [
                   {"id": call.call_id, "type": "function", "function": {"name": "count", "arguments": '{"n": 7}'}}]},
               {"role": "tool", "tool_call_id": call.call_id, "content": "7"}]
    assert out.usage.input_tokens == _chat(client, history, tools=CHAT_TOOLS).usage.prompt_tokens


# ------------------------------------------------------------------ the chat's answer
@pytest.mark.parametrize("extra", [
    {},  # thinking, then text (tags and all: no tools)
    {"tools": TOOLS},  # thinking, words, a call
    {"tools": TOOLS, "extra_body": AFTER_THINKING},  # words and a call
    {"tools": TOOLS, "extra_body": AFTER_CALL},  # nothing
    {"tools": TOOLS, "tool_choice": "none"},  # the tools shown, the call text
    {"tools": TOOLS, "max_output_tokens": 8},  # cut in the words
], ids=["text", "call", "words-call", "nothing", "tool-choice-none", "cut"])
def test_a_response_is_the_same_chats_answer(server, client, extra):
    out = _create(client, **extra)
    chat_extra = {"tools": CHAT_TOOLS} if "tools" in extra else {}
    chat_extra |= {"extra_body": extra["extra_body"]} if "extra_body" in extra else {}
    chat_extra |= {"tool_choice": extra["tool_choice"]} if "tool_choice" in extra else {}
    chat_extra |= {"max_tokens": extra["max_output_tokens"]} if "max_output_tokens" in extra else {}
    chat = _chat(client, **chat_extra)
    # usage the same but the cache: the chat's prompt was the response's just before
    (*answer, usage), (*chat_answer, chat_usage) = _answer(out), _chat_answer(chat)
    assert answer == chat_answer
    assert usage[0] == chat_usage[0] and usage[2:] == chat_usage[2:]
    if extra.get("extra_body") is AFTER_CALL:  # nothing said: an empty message, as the chat's empty content
        assert chat_answer[1] == "" and out.output_text == "" and usage[2] == 1
    elif "tool_choice" in extra or not extra:
        assert chat_answer[1].endswith(f"{LEAD}<tool_call>{CALL}</tool_call>") and not chat_answer[2]


# ------------------------------------------------------------------ structure
class Verdict(pydantic.BaseModel):
    ok: bool


def test_text_format_holds_the_message_once_the_thinking_ended(server, client, thinking_tokens):
    fmt = {"type": "json_schema", "name": "verdict", "schema": OK}
    out = _create(client, text={"format": fmt})
    assert [item.type for item in out.output] == ["reasoning", "message"] and out.status == "completed"
    assert out.output[0].content[0].text == THOUGHT  # the thinking free, the words held to the schema
    answer = json.loads(out.output_text)
    assert answer.keys() == {"ok"} and isinstance(answer["ok"], bool)
    assert out.text.format.model_dump(exclude_none=True, by_alias=True) == fmt
    assert out.usage.output_tokens_details.reasoning_tokens == thinking_tokens
    assert _line(server, out.id)["structured"] == "json"
    # the SDK's own: a pydantic model as a strict schema, the answer parsed back
    parsed = client.responses.parse(model=MODEL, input=QUESTION, temperature=0, text_format=Verdict)
    assert parsed.output[0].content[0].text == THOUGHT and isinstance(parsed.output_parsed, Verdict)
    assert parsed.output_parsed == Verdict.model_validate_json(parsed.output_text)
    chat = _chat(client, response_format={"type": "json_schema", "json_schema": {"name": "verdict", "schema": OK}})
    assert _answer(out)[:4] == _chat_answer(chat)[:4]


@pytest.mark.parametrize("tool_choice", ["required", {"type": "function", "name": "count"}], ids=["required", "named"])
def test_a_forced_tool_choice_is_a_function_call_after_the_thinking(server, client, tool_choice):
    out = _create(client, tools=TOOLS, tool_choice=tool_choice, parallel_tool_calls=False)
    assert [item.type for item in out.output] == ["reasoning", "function_call"] and out.status == "completed"
    reasoning, call = out.output
    assert reasoning.content[0].text == THOUGHT
    assert (call.name, json.loads(call.arguments)) == ("count", {"n": 7}) and call.call_id.startswith("call_")
    assert out.output_text == "" and out.parallel_tool_calls is False
    echoed = out.tool_choice if isinstance(out.tool_choice, str) else out.tool_choice.model_dump(exclude_none=True)
    assert echoed == tool_choice
    assert _line(server, out.id)["structured"] == "json"
    chat_choice = tool_choice if tool_choice == "required" else {"type": "function", "function": {"name": "count"}}
    chat = _chat(client, tools=CHAT_TOOLS, tool_choice=chat_choice, parallel_tool_calls=False)
    assert _answer(out)[:4] == _chat_answer(chat)[:4]


# ------------------------------------------------------------------ cut short
@pytest.mark.parametrize("limit", [3, 5, 8, 20], ids=["in-thinking", "at-thinking-end", "in-words", "in-call"])
def test_max_output_tokens_cuts_the_response_short(server, client, tokenizer, answer_ids, thinking_tokens, limit):
    """Cut in its thinking, a response is a reasoning item alone; later, a message too, whose
    text is a cut call's too (no call: its JSON is not whole); streamed, it ends with
    response.incomplete."""
    out = _create(client, tools=TOOLS, max_output_tokens=limit)
    assert (out.status, out.incomplete_details.reason, out.max_output_tokens) == ("incomplete", "max_output_tokens",
                                                                                 limit)
    thinking = min(limit, thinking_tokens)
    reasoning = tokenizer.decode(answer_ids[1:min(limit, thinking_tokens - 1)])  # the tags are no text
    expected = [("reasoning", reasoning)] + (
        [("message", tokenizer.decode(answer_ids[thinking_tokens:limit]))] if limit > thinking_tokens else [])
    assert [(item.type, item.content[0].text) for item in out.output] == expected
    assert (out.usage.output_tokens, out.usage.output_tokens_details.reasoning_tokens) == (limit, thinking)
    assert _line(server, out.id)["finish_reason"] == "length"
    events = _sse(server, {"tools": TOOLS, "max_output_tokens": limit})
    streamed = _checked(events, end="response.incomplete")
    assert "response.completed" not in [e["type"] for e in events]
    assert streamed["incomplete_details"] == {"reason": "max_output_tokens"}
    assert _normalized(streamed)["output"] == _normalized(out)["output"]
    assert streamed["usage"]["output_tokens"] == limit


# ------------------------------------------------------------------ instructions, input forms
def test_instructions_are_the_templates_system_message(server, client, tokenizer):
    instructions = "Answer in numbers."
    system = f"<|im_start|>system\n{instructions}<|im_end|>\n"
    bare = _create(client, max_output_tokens=1)
    told = _create(client, instructions=instructions, max_output_tokens=1)
    assert told.usage.input_tokens - bare.usage.input_tokens == len(tokenizer.encode(system, add_special_tokens=False))
    assert told.usage.input_tokens == len(_tokenize(server, [{"role": "system", "content": instructions},
                                                             {"role": "user", "content": QUESTION}]))
    assert told.instructions == instructions and bare.instructions is None
    # the same prompt, as input items: a developer (or system) message, the question as text parts
    for first in ({"role": "developer", "content": instructions},
                  {"type": "message", "role": "system", "content": [{"type": "input_text", "text": instructions}]}):
        items = [first, {"type": "message", "role": "user", "content": [{"type": "input_text", "text": QUESTION}]}]
        assert _create(client, input=items, max_output_tokens=1).usage.input_tokens == told.usage.input_tokens
    # text parts are joined by newlines, as a chat's
    parts = [{"type": "input_text", "text": "Count."}, {"type": "input_text", "text": "Now."}]
    joined = _create(client, input=[{"role": "user", "content": parts}], max_output_tokens=1)
    assert joined.usage.input_tokens == len(_tokenize(server, [{"role": "user", "content": "Count.\nNow."}]))
    # an earlier answer's text (output_text parts) is the assistant's turn
    turns = [{"role": "user", "content": QUESTION},
             {"type": "message", "role": "assistant", "content": [{"type": "output_text", "text": "7"}]},
             {"role": "user", "content": "Again."}]
    again = _create(client, input=turns, max_output_tokens=1)
    assert again.usage.input_tokens == len(_tokenize(server, [{"role": "user", "content": QUESTION},
                                                              {"role": "assistant", "content": "7"},
                                                              {"role": "user", "content": "Again."}]))


# ------------------------------------------------------------------ refusals
IMAGE = [{"role": "user", "content": [{"type": "input_image", "image_url": "https://example.com/a.png"}]}]
REFUSED = [  # (fields, param, code)
    ({"previous_response_id": "resp_0"}, "previous_response_id", "invalid_value"),  # nothing is stored
    ({"previous_response_id": "resp_0", "stream": True}, "previous_response_id", "invalid_value"),
    ({"truncation": "auto"}, "truncation", "invalid_value"),
    ({"tools": [{"type": "web_search"}]}, "tools.0", "unsupported_parameter"),
    ({"input": IMAGE}, "input.0.content.0", "unsupported_parameter"),
    ({"input": [{"role": "tool", "content": "7"}]}, "input.0.role", "invalid_value"),
    ({"input": [{"type": "function_call", "name": "count", "arguments": "{}"}]}, "input.0", "invalid_value"),
    ({"input": [{"type": "function_call_output", "call_id": "call_1"}]}, "input.0", "invalid_value"),
    ({"input": [{"type": "item_reference", "id": "msg_1"}]}, "input.0.type", "unsupported_parameter"),
    ({"input": []}, "input", "invalid_value"),
    ({"max_output_tokens": 0}, "max_output_tokens", "invalid_value"),
    ({"max_output_tokens": -1}, "max_output_tokens", "invalid_value"),
    ({"text": {"format": {"type": "xml"}}}, "text.format", "invalid_value"),
    ({"text": {"format": {"type": "json_schema", "name": "x", "schema": {"type": "bogus"}}}}, "text.format",
     "invalid_value"),
    ({"tool_choice": "required"}, "tool_choice", "invalid_value"),  # no tools
    ({"tools": TOOLS, "tool_choice": {"type": "function", "name": "nope"}}, "tool_choice", "invalid_value"),
]


def test_what_is_not_served_is_a_400_naming_the_responses_field(server, client):
    assert wait_for(lambda: idle(server), 30)
    before = server.metrics()['stoke_request_errors_total{type="invalid_request"}']
    for fields, param, code in REFUSED:
        with pytest.raises(openai.BadRequestError) as info:
            _create(client, **fields)
        body = info.value.body
        assert (body["param"], body["code"], body["type"]) == (param, code, "invalid_request_error"), (fields, body)
        line = server.log_lines()[-1]
        assert (line["endpoint"], line["status"], line["error_type"]) == ("responses", 400, "invalid_request")
        assert line["request_id"].startswith("resp-")
    assert server.metrics()['stoke_request_errors_total{type="invalid_request"}'] - before == len(REFUSED)
    # nothing left behind: the server is idle and serves the next request
    assert wait_for(lambda: idle(server), 30) and server.metrics()["stoke_requests_running"] == 0
    assert _create(client, tools=TOOLS).status == "completed"


def test_a_prompt_past_the_context_is_a_400_naming_input(client):
    with pytest.raises(openai.BadRequestError) as info:
        _create(client, max_output_tokens=5000)  # the context is 1024
    assert info.value.body["code"] == "context_length_exceeded"
    assert info.value.body["param"] == "input"
    assert "5000 max_output_tokens" in info.value.body["message"]  # in the API's own words
