"""Reasoning models over the real server (`--reasoning-parser qwen3`, with `--enable-auto-tool-choice
--tool-call-parser hermes`), driven by the `openai` SDK: a scripted checkpoint
(tests/scripted_model.py) thinks, then answers `[8]`, so a chat comes back as `reasoning` (and
`reasoning_content`) and `content`, whole and streamed alike, with its reasoning tokens in the
usage, the log line and /metrics; structured outputs and forced tool calls hold the content only,
once the thinking ended; the tool call parser reads the content only (the scripted thinking
writes a `<tool_call>` that is no call).

Each token of the scripted answer leads to the next whatever came before, so a prompt that ends
inside the answer goes on from there. The server's chat template is SmolLM2's own with two
variables, as `chat_template_kwargs` set them: Qwen3's `enable_thinking=False` (the prompt ends
with `<think>\\n\\n</think>`; Qwen3's blank line after it would leave the script) and `prefill`,
text after the assistant's header (`<think>` opens the thinking there)."""

from __future__ import annotations

import json

import openai
import pytest

from tests.scripted_model import scripted_checkpoint, scripted_tokens
from tests.server_harness import ServerProcess, idle, wait_for

THOUGHT = 'Maybe<tool_call>{"name":"count","arguments": {"n": 7}}</tool_call>?'
CONTENT = "[8]"
ANSWER = f"<think>{THOUGHT}</think>{CONTENT}"
TAGS = ("<think>", "</think>", "<tool_call>", "</tool_call>")
TEMPLATE = (
    "{% for message in messages %}{% if loop.first and messages[0]['role'] != 'system' %}"
    "{{ '<|im_start|>system\\nYou are a helpful AI assistant named SmolLM, trained by Hugging Face<|im_end|>\\n' }}"
    "{% endif %}{{'<|im_start|>' + message['role'] + '\\n' + message['content'] + '<|im_end|>' + '\\n'}}{% endfor %}"
    "{% if add_generation_prompt %}{{ '<|im_start|>assistant\\n' }}"
    "{% if enable_thinking is defined and enable_thinking is false %}{{ '<think>\\n\\n</think>' }}{% endif %}"
    "{{ prefill | default('') }}{% endif %}")
QUESTION = [{"role": "user", "content": "Count."}]
RAW_PROMPT = "<|im_start|>user\nCount.<|im_end|>\n<|im_start|>assistant\n"  # the template's, for /v1/completions
NO_THINKING = {"chat_template_kwargs": {"enable_thinking": False}}
COUNT = {"type": "object", "properties": {"n": {"enum": [7]}}, "required": ["n"]}
TOOLS = [{"type": "function", "function": {"name": "count", "description": "Count", "parameters": COUNT}}]
INTEGERS = {"type": "array", "items": {"type": "integer"}}  # the scripted content's
OK = {"type": "object", "properties": {"ok": {"type": "boolean"}}, "required": ["ok"]}  # not the scripted content's


def _format(schema: dict) -> dict:
    return {"type": "json_schema", "json_schema": {"name": "answer", "schema": schema}}


@pytest.fixture(scope="module")
def scripted(tmp_path_factory: pytest.TempPathFactory) -> str:
    return scripted_checkpoint(str(tmp_path_factory.mktemp("thinking")), ANSWER, TAGS)


@pytest.fixture(scope="module")
def tokenizer(scripted: str):
    from transformers import AutoTokenizer

    return AutoTokenizer.from_pretrained(scripted)


@pytest.fixture(scope="module")
def answer_ids(scripted: str, tokenizer) -> list[int]:
    """The scripted answer's token ids, from the generation prompt's last token to EOS."""
    ids = scripted_tokens(scripted, tokenizer.encode(RAW_PROMPT, add_special_tokens=False)[-1], tokenizer.eos_token_id)
    assert tokenizer.decode(ids) == ANSWER and len(ids) < 64
    return ids


@pytest.fixture(scope="module")
def thinking_tokens(answer_ids: list[int], tokenizer) -> int:
    """The answer's tokens from its start through `</think>`, tags included."""
    return answer_ids.index(tokenizer.convert_tokens_to_ids("</think>")) + 1


@pytest.fixture(scope="module")
def server(scripted: str):
    with ServerProcess(scripted, "--num-kv-blocks", "64", "--cpu-threads", "1", "--generation-config", "none",
                       "--chat-template", TEMPLATE, "--trust-request-chat-template", "--reasoning-parser", "qwen3",
                       "--enable-auto-tool-choice", "--tool-call-parser", "hermes") as s:
        yield s


@pytest.fixture(scope="module")
def client(server):
    return server.client()


def _chat(client, **kwargs):
    return client.chat.completions.create(model=None, messages=QUESTION, temperature=0, **({"max_tokens": 64} | kwargs))


def _reasoning(message) -> tuple[str | None, str | None]:
    """A message's (or delta's) `reasoning` and `reasoning_content`, which the SDK keeps as extras."""
    extra = message.model_extra or {}
    return extra.get("reasoning"), extra.get("reasoning_content")


def _streamed(stream, tags_are_text: bool = False) -> tuple[dict[int, dict], object]:
    """Each choice's stream read back: its chunks' deltas in order, its joined reasoning and
    content, its tool calls and finish reasons; and the usage chunk's usage. No delta carries a
    tag's text, unless the answer's tags are text (`tags_are_text`)."""
    choices: dict[int, dict] = {}
    usage = None
    for chunk in stream:
        if chunk.usage is not None:
            assert not chunk.choices
            usage = chunk.usage
        for choice in chunk.choices:
            seen = choices.setdefault(choice.index, {"deltas": [], "reasoning": "", "content": "", "calls": [],
                                                     "finish": []})
            delta = choice.delta
            reasoning, reasoning_content = _reasoning(delta)
            assert reasoning == reasoning_content  # under both names
            for text in (reasoning or "", delta.content or ""):
                assert tags_are_text or ("<think" not in text and "</think" not in text), text
            seen["deltas"].append(delta)
            seen["reasoning"] += reasoning or ""
            seen["content"] += delta.content or ""
            seen["calls"] += delta.tool_calls or []
            seen["finish"].append(choice.finish_reason)
    return choices, usage


# ------------------------------------------------------------------ the answer, split
def test_a_chat_answer_comes_back_as_reasoning_and_content(server, client, answer_ids, thinking_tokens):
    out = _chat(client)
    choice = out.choices[0]
    assert choice.finish_reason == "stop"
    assert _reasoning(choice.message) == (THOUGHT, THOUGHT)
    assert choice.message.content == CONTENT and not choice.message.tool_calls
    assert thinking_tokens == 20  # <think>, 18 tokens of thought, </think>
    assert out.usage.completion_tokens == len(answer_ids) + 1  # and EOS
    assert out.usage.completion_tokens_details.reasoning_tokens == thinking_tokens
    line = server.log_lines()[-1]
    assert (line["endpoint"], line["completion_tokens"], line["reasoning_tokens"]) == (
        "chat.completions", len(answer_ids) + 1, thinking_tokens)


def test_a_streamed_answer_equals_the_whole_one(server, client, thinking_tokens):
    whole = _chat(client, n=2)
    assert [_reasoning(c.message)[0] for c in whole.choices] == [THOUGHT, THOUGHT]
    assert [c.message.content for c in whole.choices] == [CONTENT, CONTENT]
    choices, usage = _streamed(_chat(client, n=2, stream=True, stream_options={"include_usage": True}))
    assert sorted(choices) == [0, 1]
    for seen in choices.values():
        first, *rest = seen["deltas"]
        assert first.role == "assistant" and first.content == ""
        assert (seen["reasoning"], seen["content"]) == (THOUGHT, CONTENT) and not seen["calls"]
        kinds = ["reasoning" if _reasoning(d)[0] else "content" for d in rest if _reasoning(d)[0] or d.content]
        assert kinds == sorted(kinds, key=["reasoning", "content"].index)  # the thinking first, then the answer
        assert "reasoning" in kinds and "content" in kinds
        assert seen["finish"][-1] == "stop" and not any(seen["finish"][:-1])
    assert usage.completion_tokens == whole.usage.completion_tokens
    assert usage.completion_tokens_details.reasoning_tokens == 2 * thinking_tokens
    line = server.log_lines()[-1]
    assert (line["stream"], line["n"], line["reasoning_tokens"]) == (True, 2, 2 * thinking_tokens)


def test_include_reasoning_false_leaves_the_thinking_out(server, client, thinking_tokens):
    out = _chat(client, extra_body={"include_reasoning": False})
    assert _reasoning(out.choices[0].message) == (None, None)
    assert out.choices[0].message.content == CONTENT
    assert out.usage.completion_tokens_details.reasoning_tokens == thinking_tokens  # spent all the same
    choices, usage = _streamed(_chat(client, stream=True, stream_options={"include_usage": True},
                                     extra_body={"include_reasoning": False}))
    (seen,) = choices.values()
    assert seen["content"] == CONTENT and seen["reasoning"] == ""
    assert not any("reasoning" in (d.model_extra or {}) or "reasoning_content" in (d.model_extra or {})
                   for d in seen["deltas"])
    assert seen["finish"][-1] == "stop"
    assert usage.completion_tokens_details.reasoning_tokens == thinking_tokens
    assert server.log_lines()[-1]["reasoning_tokens"] == thinking_tokens


# ------------------------------------------------------------------ where the thinking starts
def test_a_prompt_that_ends_the_thinking_is_answered_in_content(server, client):
    """Qwen3's enable_thinking=False: the prompt closes the thinking, the answer is content."""
    out = _chat(client, extra_body=NO_THINKING)
    assert _reasoning(out.choices[0].message) == (None, None)
    assert out.choices[0].message.content == CONTENT
    assert out.usage.completion_tokens == len(CONTENT) + 1
    assert out.usage.completion_tokens_details.reasoning_tokens == 0
    assert server.log_lines()[-1]["reasoning_tokens"] == 0
    choices, usage = _streamed(_chat(client, stream=True, stream_options={"include_usage": True},
                                     extra_body=NO_THINKING))
    assert (choices[0]["reasoning"], choices[0]["content"]) == ("", CONTENT)
    assert usage.completion_tokens_details.reasoning_tokens == 0


@pytest.mark.parametrize("prefill", ["<think>", "<think>\n"])
def test_a_prompt_that_opens_the_thinking_is_answered_in_reasoning(server, client, thinking_tokens, prefill):
    """The prompt ends with `<think>` (Qwen3-Thinking-2507's and R1-0528's templates): the
    answer thinks from its first token. After `<think>` the script goes on with its thought, no
    tag of its own; after `<think>\\n` (the newline is the header's) it writes its `<think>`
    again, which is dropped as the tag it is."""
    out = _chat(client, extra_body={"chat_template_kwargs": {"prefill": prefill}})
    assert _reasoning(out.choices[0].message) == (THOUGHT, THOUGHT)
    assert out.choices[0].message.content == CONTENT
    own_tag = prefill.endswith("\n")  # the answer's <think> counts; the prompt's does not
    assert out.usage.completion_tokens_details.reasoning_tokens == (thinking_tokens if own_tag else thinking_tokens - 1)
    choices, _ = _streamed(_chat(client, stream=True, extra_body={"chat_template_kwargs": {"prefill": prefill}}))
    assert (choices[0]["reasoning"], choices[0]["content"]) == (THOUGHT, CONTENT)


def test_a_requests_own_template_that_opens_the_thinking(server, client, thinking_tokens):
    """vLLM's request `chat_template` (this server trusts it): where the answer starts is read
    off the prompt that template made, here one that ends with `<think>`."""
    own = "{% for m in messages %}<|im_start|>{{ m.role }}\n{{ m.content }}<|im_end|>\n{% endfor %}" \
          "<|im_start|>assistant\n<think>"
    out = _chat(client, extra_body={"chat_template": own})
    assert _reasoning(out.choices[0].message) == (THOUGHT, THOUGHT) and out.choices[0].message.content == CONTENT
    assert out.usage.completion_tokens_details.reasoning_tokens == thinking_tokens - 1


def test_thinking_cut_short_is_all_reasoning(server, client, tokenizer, answer_ids):
    out = _chat(client, max_tokens=5)
    assert out.choices[0].finish_reason == "length"
    assert _reasoning(out.choices[0].message)[0] == tokenizer.decode(answer_ids[1:5])
    assert out.choices[0].message.content is None
    assert out.usage.completion_tokens_details.reasoning_tokens == 5
    choices, _ = _streamed(_chat(client, max_tokens=5, stream=True))
    assert (choices[0]["reasoning"], choices[0]["content"]) == (tokenizer.decode(answer_ids[1:5]), "")
    assert choices[0]["finish"][-1] == "length"


def test_thinking_cut_short_has_no_content_with_tools_too(server, client):
    """vLLM's too: the reasoning parser's None content stays None when no tool was called."""
    out = _chat(client, max_tokens=5, tools=TOOLS)
    assert out.choices[0].finish_reason == "length" and not out.choices[0].message.tool_calls
    assert out.choices[0].message.content is None


# ------------------------------------------------------------------ structured outputs
def test_structured_outputs_hold_the_content_once_the_thinking_ended(server, client, thinking_tokens):
    # A schema the scripted content satisfies: the answer is the model's own, thinking and all
    # (the grammar, held from the first token, would have refused `<think>`)
    out = _chat(client, response_format=_format(INTEGERS))
    assert _reasoning(out.choices[0].message)[0] == THOUGHT and out.choices[0].message.content == CONTENT
    assert out.choices[0].finish_reason == "stop"
    assert server.log_lines()[-1]["structured"] == "json"
    # One it does not: the thinking is still free, then the content is held to the schema
    for n in (1, 2):
        out = _chat(client, n=n, response_format=_format(OK))
        for choice in out.choices:
            assert _reasoning(choice.message)[0] == THOUGHT and choice.finish_reason == "stop"
            answer = json.loads(choice.message.content)
            assert answer.keys() == {"ok"} and isinstance(answer["ok"], bool)
        assert out.usage.completion_tokens_details.reasoning_tokens == n * thinking_tokens
    choices, _ = _streamed(_chat(client, stream=True, response_format=_format(OK)))
    assert choices[0]["reasoning"] == THOUGHT and json.loads(choices[0]["content"]).keys() == {"ok"}
    # Thinking off: the grammar holds the answer from its first token
    out = _chat(client, response_format=_format(OK), extra_body=NO_THINKING)
    assert _reasoning(out.choices[0].message)[0] is None and json.loads(out.choices[0].message.content).keys() == {"ok"}


def test_completions_are_not_split_but_their_structure_waits_for_the_thinking_too(server, client):
    out = client.completions.create(model=None, prompt=RAW_PROMPT, max_tokens=64, temperature=0)
    assert out.choices[0].text == ANSWER  # raw text, tags and all
    assert out.usage.completion_tokens_details is None and server.log_lines()[-1]["reasoning_tokens"] is None
    out = client.completions.create(model=None, prompt=RAW_PROMPT, max_tokens=64, temperature=0,
                                    extra_body={"response_format": _format(OK)})
    text = out.choices[0].text
    assert text.startswith(f"<think>{THOUGHT}</think>")
    assert json.loads(text.removeprefix(f"<think>{THOUGHT}</think>")).keys() == {"ok"}


# ------------------------------------------------------------------ tool calls
def test_a_tool_call_in_the_thinking_is_no_call(server, client):
    out = _chat(client, tools=TOOLS)
    choice = out.choices[0]
    assert choice.finish_reason == "stop" and not choice.message.tool_calls
    assert _reasoning(choice.message)[0] == THOUGHT and choice.message.content == CONTENT
    choices, _ = _streamed(_chat(client, tools=TOOLS, stream=True))
    assert (choices[0]["reasoning"], choices[0]["content"], choices[0]["calls"]) == (THOUGHT, CONTENT, [])
    assert choices[0]["finish"][-1] == "stop"


def test_the_same_tool_call_in_the_content_is_one(server, client):
    """The prompt ends with `</think>` and a newline (whitespace after a tag is read past): the
    answer is all content, its tags are text, and its `<tool_call>` a call."""
    kwargs = {"tools": TOOLS, "extra_body": {"chat_template_kwargs": {"enable_thinking": False, "prefill": "\n"}}}
    out = _chat(client, **kwargs)
    choice = out.choices[0]
    assert choice.finish_reason == "tool_calls" and _reasoning(choice.message) == (None, None)
    assert choice.message.content == f"<think>Maybe?</think>{CONTENT}"
    (call,) = choice.message.tool_calls
    assert call.function.name == "count" and json.loads(call.function.arguments) == {"n": 7}
    assert out.usage.completion_tokens_details.reasoning_tokens == 0
    choices, _ = _streamed(_chat(client, stream=True, n=2, **kwargs), tags_are_text=True)
    for seen in choices.values():
        assert (seen["reasoning"], seen["content"]) == ("", choice.message.content)
        (part,) = seen["calls"]
        assert part.function.name == "count" and json.loads(part.function.arguments) == {"n": 7}
        assert seen["finish"][-1] == "tool_calls"


def test_forced_tool_calls_are_held_once_the_thinking_ended(server, client):
    """tool_choice named or "required": the model thinks freely, then the call's JSON holds it."""
    named = {"type": "function", "function": {"name": "count"}}
    for kwargs, finish in (({"tool_choice": named}, "stop"),  # vLLM's: a named call keeps the engine's finish
                           ({"tool_choice": "required", "parallel_tool_calls": False, "max_tokens": 96},
                            "tool_calls")):
        out = _chat(client, tools=TOOLS, **kwargs)
        choice = out.choices[0]
        assert choice.finish_reason == finish, choice
        assert _reasoning(choice.message)[0] == THOUGHT and not choice.message.content
        (call,) = choice.message.tool_calls
        assert call.function.name == "count" and json.loads(call.function.arguments) == {"n": 7}
    choices, _ = _streamed(_chat(client, tools=TOOLS, tool_choice=named, stream=True))
    (part,) = choices[0]["calls"]
    assert choices[0]["reasoning"] == THOUGHT and json.loads(part.function.arguments) == {"n": 7}


# ------------------------------------------------------------------ metrics, refusals
def test_metrics_count_the_reasoning_tokens(server, client, thinking_tokens):
    assert wait_for(lambda: idle(server), 30)
    before = server.metrics()["stoke_reasoning_tokens_total"]
    _chat(client)
    assert server.metrics()["stoke_reasoning_tokens_total"] - before == thinking_tokens
    _streamed(_chat(client, stream=True, n=2))  # no usage asked: counted all the same
    _chat(client, extra_body=NO_THINKING)
    client.completions.create(model=None, prompt=RAW_PROMPT, max_tokens=64, temperature=0)  # not a chat
    with pytest.raises(openai.BadRequestError):
        _chat(client, tool_choice="required")  # refused: no tools
    assert server.metrics()["stoke_reasoning_tokens_total"] - before == 3 * thinking_tokens
    assert server.log_lines()[-1]["reasoning_tokens"] is None  # the refused request's


@pytest.fixture
def never_served(monkeypatch: pytest.MonkeyPatch):
    """serve's main in this process must stop before its app is built; its logging set-up is
    put back afterwards."""
    import logging

    import server.api

    def create_app(*args, **kwargs):
        raise AssertionError("stoke serve went on to start the server")

    monkeypatch.setattr(server.api, "create_app", create_app)
    root, requests = logging.getLogger(), logging.getLogger("stoke.requests")
    saved = (root.handlers[:], root.level, requests.handlers[:], requests.level, requests.propagate)
    yield
    root.handlers[:], root.level, requests.handlers[:], requests.level, requests.propagate = saved


def test_serve_refuses_a_reasoning_parser_it_cannot_run(capsys: pytest.CaptureFixture[str], never_served,
                                                        default_model_dir: str, tmp_path) -> None:
    from server.launch import main as serve_main

    half = scripted_checkpoint(str(tmp_path / "half"), "Hi<think>", ("<think>",))
    cases = [
        ([default_model_dir, "--reasoning-parser", "qwen3"],
         "bad --reasoning-parser: the qwen3 reasoning parser needs <think> and </think> as tokens of the model's "
         "vocabulary, and this tokenizer has no such token"),
        ([half, "--reasoning-parser", "deepseek_r1"],
         "bad --reasoning-parser: the deepseek_r1 reasoning parser needs </think> as tokens of the model's "
         "vocabulary"),
        ([half, "--reasoning-parser", "nope"],
         "bad engine option: reasoning_parser must be one of ('deepseek_r1', 'qwen3'), got 'nope'"),
    ]
    for argv, message in cases:
        assert serve_main(argv) == 2  # returned, not served
        err = capsys.readouterr().err
        assert "ERROR stoke.server: " + message in err, err
        assert "worker process" not in err  # nothing started
