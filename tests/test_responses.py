"""OpenAI's Responses API over the chat path (server/responses.py), without a server: a request
becomes the chat it means, or a 400 naming the Responses field; an answer released piece by
piece gives the typed events whose deltas add up to the response's items, exactly the items a
whole answer gives. (tests/test_server_responses.py drives a real server with the SDK.)"""

from __future__ import annotations

import json
import random
import types

import pytest

from server.errors import APIError
from server.protocol import ResponsesRequest
from server.responses import ResponsesRenderer, chat_request
from server.tool_parsers import ToolCallParser

CALL = {"type": "function_call", "call_id": "call_1", "name": "weather", "arguments": '{"city": "Paris"}'}
TOOL = {"type": "function", "name": "weather", "description": "The weather",
        "parameters": {"type": "object", "properties": {"city": {"type": "string"}}}}


def test_a_request_becomes_the_chat_it_means() -> None:
    req = ResponsesRequest(
        model="m", instructions="Be brief.", max_output_tokens=32, temperature=0.5, tools=[TOOL],
        tool_choice={"type": "function", "name": "weather"}, parallel_tool_calls=False,
        text={"format": {"type": "json_schema", "name": "w", "schema": {"type": "object"}, "strict": True}},
        input=[{"role": "developer", "content": "Use tools."},
               {"type": "message", "role": "user", "content": [{"type": "input_text", "text": "Weather?"}]},
               {"type": "reasoning", "id": "rs_1", "summary": []},
               CALL, CALL | {"call_id": "call_2", "arguments": '{"city": "Rome"}'},
               {"type": "function_call_output", "call_id": "call_1", "output": "sunny"},
               {"role": "assistant", "content": [{"type": "output_text", "text": "Sunny."}]}])
    chat = chat_request(req)
    assert [m.role for m in chat.messages] == ["system", "system", "user", "assistant", "tool", "assistant"]
    assert chat.messages[0].content == "Be brief." and chat.messages[2].content[0].text == "Weather?"
    calls = chat.messages[3].model_extra["tool_calls"]  # two calls in a row: one assistant turn
    assert [c["id"] for c in calls] == ["call_1", "call_2"] and calls[1]["function"]["arguments"] == '{"city": "Rome"}'
    assert chat.messages[4].model_extra["tool_call_id"] == "call_1" and chat.messages[4].content == "sunny"
    assert chat.tools == [{"type": "function", "function": {k: TOOL[k] for k in ("name", "description", "parameters")}}]
    assert chat.tool_choice == {"type": "function", "function": {"name": "weather"}}
    assert chat.response_format == {"type": "json_schema", "json_schema": {"name": "w", "schema": {"type": "object"}}}
    assert (chat.max_tokens, chat.temperature, chat.parallel_tool_calls) == (32, 0.5, False)
    # Only what the request set counts as set (the chat path's defaults stay its own).
    assert "skip_special_tokens" not in chat.model_fields_set and "top_p" not in chat.model_fields_set
    assert [m.role for m in chat_request(ResponsesRequest(input="Hi")).messages] == ["user"]


@pytest.mark.parametrize("fields, param", [
    ({"previous_response_id": "resp_1"}, "previous_response_id"),
    ({"truncation": "auto"}, "truncation"),
    ({"conversation": "conv_1"}, "conversation"),
    ({"prompt": {"id": "pmpt_1"}}, "prompt"),
    ({"background": True}, "background"),
    ({"tools": [{"type": "web_search"}]}, "tools.0"),
    ({"input": [{"role": "user", "content": [{"type": "input_image", "image_url": "x"}]}]}, "input.0.content.0"),
    ({"input": [{"role": "tool", "content": "x"}]}, "input.0.role"),
    ({"input": [CALL | {"call_id": None}]}, "input.0"),
    ({"input": [{"type": "function_call_output", "call_id": "c"}]}, "input.0"),
    ({"input": [{"type": "file_search_call"}]}, "input.0.type"),
    ({"input": [{"role": "user", "content": 7}]}, "input.0.content"),
    ({"text": {"format": "json"}}, "text.format"),
    ({"top_logprobs": 2}, "top_logprobs"),  # asked for, never silently left out
    ({"include": ["message.output_text.logprobs"]}, "include"),
    ({"include": ["reasoning.encrypted_content", "output.everything"]}, "include.1"),
])
def test_what_is_not_served_is_a_400_naming_the_field(fields: dict, param: str) -> None:
    with pytest.raises(APIError) as info:
        chat_request(ResponsesRequest(**({"input": "Hi"} | fields)))
    assert info.value.status == 400 and info.value.param == param


def test_includes_of_what_no_answer_has_are_nothing_to_add() -> None:
    """The Agents SDK asks stateless runs for reasoning.encrypted_content: stoke's reasoning
    items carry none, so there is nothing to include (as OpenAI leaves out what an answer has
    not got), and top_logprobs 0 asks for nothing."""
    req = ResponsesRequest(input="Hi", include=["reasoning.encrypted_content", "web_search_call.results"],
                           top_logprobs=0)
    assert [m.role for m in chat_request(req).messages] == ["user"]


def _job(tool_parser: str | None = None) -> types.SimpleNamespace:
    return types.SimpleNamespace(request_id="resp-7c00000001", created=1, model="m", params={"temperature": 0.0},
                                 parallel_tool_calls=True, tool_parser=tool_parser,
                                 new_tool_parser=lambda: ToolCallParser(tool_parser),
                                 choices=[types.SimpleNamespace(finish_reason="stop")])


def _events(lines: list[str]) -> list[dict]:
    events = []
    for line in lines:
        head, data = line.split("\n")[:2]
        event = json.loads(data.removeprefix("data: "))
        assert head == f"event: {event['type']}"
        events.append(event)
    return events


@pytest.mark.parametrize("reasoning, content, calls", [
    ("Let me see.", "Sunny in Paris.", []),
    ("", "Plain answer.", []),
    ("Thinking", "", [{"id": "call_a", "function": {"name": "weather", "arguments": '{"city": "Paris"}'}},
                      {"id": "call_b", "function": {"name": "weather", "arguments": '{"city": "Rome"}'}}]),
    ("Cut short", "", []),
    ("", "", []),
])
def test_streamed_events_add_up_to_the_whole_response(reasoning: str, content: str, calls: list) -> None:
    """The same answer released whole and in random pieces: the events' deltas add up to the
    items, each item's done event is the item as the response has it, sequence numbers count
    up, and the response's output is the whole answer's."""
    whole = ResponsesRenderer(ResponsesRequest(input="Hi"))
    whole.add(_job(), reasoning, content, calls)
    whole.end(_job())
    expected = whole.response(_job(), "completed")["output"]
    assert [i["type"] for i in expected] == (["reasoning"] if reasoning else []) + (
        ["message"] if content or not (reasoning or calls) else []) + ["function_call"] * len(calls)
    rng = random.Random(len(reasoning + content))
    for _ in range(20):
        renderer, lines = ResponsesRenderer(ResponsesRequest(input="Hi")), []
        pieces = [(reasoning[i:j], "") for i, j in _cuts(len(reasoning), rng)] + \
                 [("", content[i:j]) for i, j in _cuts(len(content), rng)]
        for r, c in pieces:
            renderer.add(_job(), r, c, [])
            lines += renderer.take_events()
        renderer.add(_job(), "", "", calls)
        renderer.end(_job())
        lines += renderer.take_events()
        events = _events(lines)
        assert [e["sequence_number"] for e in events] == list(range(len(events)))
        output = renderer.response(_job(), "completed")["output"]
        assert output == expected
        for index, item in enumerate(output):
            deltas = "".join(e["delta"] for e in events if e.get("output_index") == index and "delta" in e)
            text = item["content"][0]["text"] if item["type"] != "function_call" else item["arguments"]
            assert deltas == text
            added = [e for e in events if e["type"] == "response.output_item.added" and e["output_index"] == index]
            done = [e for e in events if e["type"] == "response.output_item.done" and e["output_index"] == index]
            assert len(added) == len(done) == 1 and done[0]["item"] == item
            assert added[0]["item"]["status"] == "in_progress" and item["status"] == "completed"


def _cuts(length: int, rng: random.Random) -> list[tuple[int, int]]:
    points = sorted(set(rng.sample(range(1, length), min(length - 1, rng.randrange(4))))) if length > 1 else []
    return [(i, j) for i, j in zip([0, *points], [*points, length]) if j > i]


def test_the_store_keeps_each_clients_last_responses() -> None:
    from server.responses import ResponseStore, StoredResponse, conversation

    store = ResponseStore(2)
    for i, owner in enumerate(("a", "a", "b")):
        store.put(f"resp_{i}", StoredResponse(owner, {"id": f"resp_{i}"}, [{"role": "user", "content": str(i)}]))
    assert store.get("resp_0", "a") is None  # the least recently used went first
    assert store.get("resp_1", "b") is None and store.get("resp_1", "a").body == {"id": "resp_1"}  # its owner's alone
    assert not store.delete("resp_2", "a") and store.delete("resp_2", "b") and store.get("resp_2", "b") is None
    # A conversation goes on from a stored one without changing it: a function call after the
    # stored assistant turn with calls joins that turn in the new conversation only.
    turn = {"role": "assistant", "content": None, "tool_calls": [{"id": "call_1", "type": "function",
                                                                  "function": {"name": "f", "arguments": "{}"}}]}
    history = [{"role": "user", "content": "Hi"}, turn]
    messages = conversation(ResponsesRequest(input=[CALL]), history)
    assert [c["id"] for c in messages[1]["tool_calls"]] == ["call_1", "call_1"] and len(turn["tool_calls"]) == 1
    assert conversation(ResponsesRequest(input="More"), history)[2] == {"role": "user", "content": "More"}


@pytest.mark.parametrize("parallel", [True, False])
def test_items_come_in_the_answers_order_whatever_its_pieces(parallel: bool) -> None:
    """An answer read by the reasoning and tool call parsers (`release`): text after a call is a
    message of its own, after the call, however the text was cut (one piece for a whole answer,
    any pieces for a stream)."""
    from engine.reasoning import FIRST

    call = '<tool_call>{"name": "f", "arguments": {"x": %d}}</tool_call>'
    answer = "<think>Hm.</think>Let me see." + call % 1 + " Then " + call % 2 + "\n\nDone."
    expected = [("reasoning", "Hm."), ("message", "Let me see."), ("function_call", '{"x": 1}'),
                ("message", " Then ")] + ([("function_call", '{"x": 2}')] if parallel else []) + [("message", "\n\nDone.")]
    if not parallel:  # the second call's message run goes on in one message
        expected[-2:] = [("message", " Then \n\nDone.")]
    rng = random.Random(7)
    for trial in range(30):
        job = _job("hermes")
        job.reasoning_opening, job.tool_function, job.parallel_tool_calls = FIRST, None, parallel
        renderer = ResponsesRenderer(ResponsesRequest(input="Hi"))
        cuts = [(0, len(answer))] if trial == 0 else _cuts(len(answer), rng)
        for k, (i, j) in enumerate(cuts):
            renderer.release(job, answer[i:j], final=k == len(cuts) - 1)
        renderer.end(job)
        items = renderer.response(job, "completed")["output"]
        assert [(item["type"], item["content"][0]["text"] if item["type"] != "function_call" else item["arguments"])
                for item in items] == expected
        assert [item["id"].rsplit("_", 1)[1] for item in items] == [str(i) for i in range(len(items))]


def test_a_chat_paths_400_names_the_input_item_it_is_about() -> None:
    """Chat message N is not input item N (instructions come first, calls join a turn,
    reasoning items go, a stored conversation comes before): each 400 names its own item."""
    from server.responses import _renamed, conversation

    def param(req: ResponsesRequest, history: list | None = None) -> str:
        origins: list[str] = []
        try:
            messages = None if history is None else conversation(req, history, origins)
            chat_request(req, messages, origins)
        except APIError as exc:
            return _renamed(exc, origins).param
        raise AssertionError("no 400")

    bad = {"role": "user", "content": [{"type": "input_text", "text": 5}]}
    assert param(ResponsesRequest(instructions="S", input=[bad])) == "input.0.content.0.text"
    items = [{"role": "user", "content": "Hi"}, {"role": "assistant", "content": "On it."}, CALL,
             {"type": "function_call_output", "call_id": "call_1", "output": "sunny"}, {"type": "reasoning"},
             {"role": "user", "content": [{"type": "input_text"}]}]
    assert param(ResponsesRequest(instructions="S", input=items)) == "input.5.content.0.text"
    history = [{"role": "user", "content": "Before"}, {"role": "assistant", "content": "Yes"}]
    assert param(ResponsesRequest(input=items), history) == "input.5.content.0.text"
    # The chat messages' origins, for the chat path's own 400s ("messages.4.content")
    good = [*items[:-1], {"role": "user", "content": "More"}]
    origins: list[str] = []
    chat_request(ResponsesRequest(instructions="S", input=good), None, origins)
    assert origins == ["instructions", "input.0", "input.1", "input.3", "input.5"]
    assert _renamed(APIError(400, "bad", param="messages.4.content"), origins).param == "input.5.content"
    origins = []
    chat_request(ResponsesRequest(input=good), conversation(ResponsesRequest(input=good), history, origins), origins)
    assert origins == ["previous_response_id"] * 2 + ["input.0", "input.1", "input.3", "input.5"]
    # Errors the chat path words in its own names are worded in the Responses API's
    for fields, name, words in (({"tool_choice": {"type": "function", "function": {"name": "f"}}}, "tool_choice",
                                 '{"type": "function", "name": ...}'),
                                ({"tools": [{"type": "function", "function": {"name": "f"}}]}, "tools.0",
                                 '{"type": "function", "name": ..., "parameters": {...}}'),
                                ({"text": {"format": {"type": "xml"}}}, "text.format", '{"type": "json_object"}')):
        with pytest.raises(APIError) as info:
            chat_request(ResponsesRequest(input="Hi", **fields))
        assert info.value.param == name and words in info.value.message
    error = _renamed(APIError(400, "max_tokens must be at least 1", param="max_tokens"), [])
    assert (error.param, error.message) == ("max_output_tokens", "max_output_tokens must be at least 1")


def test_responses_and_events_are_the_sdks_types() -> None:
    """The response and every event validate as the `openai` SDK's own models (strictly where
    the SDK's types say what they hold), with usage, reasoning, a call, and a cut answer."""
    from openai.types.responses import Response, ResponseStreamEvent
    from pydantic import TypeAdapter

    from engine.reasoning import FIRST

    usage = {"prompt_tokens": 9, "completion_tokens": 7, "total_tokens": 16, "prompt_tokens_details": {"cached_tokens": 0},
             "completion_tokens_details": {"reasoning_tokens": 3}}
    events = TypeAdapter(ResponseStreamEvent)
    for reason in ("stop", "length"):
        job = _job("hermes")
        job.reasoning_opening, job.tool_function = FIRST, None
        job.choices[0].finish_reason = reason
        renderer = ResponsesRenderer(ResponsesRequest(input="Hi", tools=[TOOL], metadata={"k": "v"}))
        renderer._emit("response.created", response=renderer.response(job, "in_progress"))
        renderer.release(job, '<think>Hm</think>\n\n<tool_call>{"name": "weather", "arguments": {}}</tool_call>Ok',
                         final=True)
        renderer.end(job)
        body = renderer.response(job, renderer.status(job.choices[0]), job.choices[0], usage)
        renderer._emit(f"response.{body['status']}", response=body)
        for line in renderer.take_events():
            events.validate_python(json.loads(line.split("\n")[1].removeprefix("data: ")))
        response = Response.model_validate(body)
        assert [item.type for item in response.output] == ["reasoning", "function_call", "message"]  # no "\n\n" message
        assert response.output[-1].status == ("incomplete" if reason == "length" else "completed")
        assert response.usage.output_tokens_details.reasoning_tokens == 3 and response.output_text == "Ok"


def test_delta_lines_are_the_generic_events_bytes() -> None:
    """The per-token fast path (`take_events`: a delta's line rendered once around
    placeholders) writes exactly what `_event` does, whatever the text and the sequence."""
    from server.responses import _event

    renderer = ResponsesRenderer(ResponsesRequest(input="Hi"))
    texts = [" hello", '"quoted" \\ back', "\n\t\x00\x1f", "東京 🍣", '{"delta":"x"}', "\u2028", "x" * 300]
    for text in texts:
        renderer.add(_job(), text, "", [])
    for text in texts:
        renderer.add(_job(), "", text, [])
    events, expected = renderer._events[:], []
    for sequence, (kind, fields) in enumerate(events):
        expected.append(_event(kind, sequence, **fields))
    assert renderer.take_events() == expected
    assert sum(kind.endswith("text.delta") for kind, _ in events) == 2 * len(texts)


def test_a_stored_response_continues_as_its_output_sent_back_would() -> None:
    """The stored conversation reads the response's output items as input items are read, so
    previous_response_id renders what sending `response.output` back renders, text after a
    call and all."""
    from engine.reasoning import FIRST
    from server.responses import ResponseStore, conversation

    job = _job("hermes")
    job.reasoning_opening, job.tool_function = FIRST, None
    store = ResponseStore(4)
    renderer = ResponsesRenderer(ResponsesRequest(input="Count."), store, conversation(ResponsesRequest(input="Count.")))
    renderer.release(job, '<think>Hm.</think>\n\n<tool_call>{"name": "count", "arguments": {}}</tool_call>Done',
                     final=True)
    renderer.end(job)
    body = renderer.response(job, "completed")
    renderer.keep(body)
    explicit = conversation(ResponsesRequest(input=[{"role": "user", "content": "Count."}, *body["output"]]))

    def text(content):  # a message's text, however it came (a string or text parts)
        return content if not isinstance(content, list) else "\n".join(p["text"] for p in content)

    stored = store.get(body["id"], None).messages
    assert [(m["role"], text(m.get("content")), m.get("tool_calls")) for m in stored] == \
        [(m["role"], text(m.get("content")), m.get("tool_calls")) for m in explicit]
    assert [m["role"] for m in stored] == ["user", "assistant", "assistant"]  # the call's turn, then "Done"
