"""vLLM's `use_beam_search` over the real server, driven by the `openai` SDK: `n` beams, and the
n best sequences of the offline `LLM.beam_search` (itself transformers' beam search, see
tests/test_beam_search.py) as the choices, whole and streamed, with logprobs; what a search does
not follow is a 400 that names it, and the server goes on with no block left in use."""

from __future__ import annotations

import openai
import pytest

from engine import LLM, BeamSearchParams
from tests.server_harness import ServerProcess, idle, wait_for

PROMPT = "The best way to learn a language is"
QUESTION = [{"role": "user", "content": "Name a color."}]
BEAMS = {"use_beam_search": True}


@pytest.fixture(scope="module")
def server():
    with ServerProcess("--cpu-threads", "1", "--max-n", "16", "--num-kv-blocks", "96", "--generation-config", "none",
                       "--max-num-seqs", "8") as s:
        yield s


@pytest.fixture(scope="module")
def client(server) -> openai.OpenAI:
    return server.client()


@pytest.fixture(scope="module")
def offline(default_model_dir: str) -> LLM:
    return LLM(default_model_dir, num_kv_blocks=96)


@pytest.fixture(scope="module")
def model(client: openai.OpenAI) -> str:
    return client.models.list().data[0].id


def _expected(offline: LLM, prompt_ids: list[int], **params) -> list:
    return offline.beam_search([{"prompt_token_ids": prompt_ids}], BeamSearchParams(**params))[0].sequences


def test_completion_choices_are_the_best_sequences(client, model, offline, server) -> None:
    ids = offline.get_tokenizer().encode(PROMPT)
    expected = _expected(offline, ids, beam_width=3, max_tokens=8)
    got = client.completions.create(model=model, prompt=PROMPT, n=3, max_tokens=8, extra_body=BEAMS)
    assert [c.index for c in got.choices] == [0, 1, 2]
    assert [c.text for c in got.choices] == [s.text for s in expected]
    assert [c.finish_reason for c in got.choices] == [s.finish_reason for s in expected]
    assert len({c.text for c in got.choices}) == 3  # three different sequences, not one three times
    assert got.usage.prompt_tokens == len(ids)
    assert got.usage.completion_tokens == sum(len(s.tokens) - len(ids) for s in expected)
    line = next(line for line in reversed(server.log_lines()) if line["request_id"] == got.id)
    assert (line["beam_search"], line["n"], line["completion_tokens"]) == (True, 3, got.usage.completion_tokens)
    plain = client.completions.create(model=model, prompt=PROMPT, max_tokens=2, temperature=0)
    assert next(line for line in reversed(server.log_lines()) if line["request_id"] == plain.id)["beam_search"] is False


def test_chat_choices_whole_and_streamed(client, model, offline) -> None:
    tokenizer = offline.get_tokenizer()
    text = tokenizer.apply_chat_template(QUESTION, tokenize=False, add_generation_prompt=True)
    ids = tokenizer.encode(text, add_special_tokens=False)
    extra = {**BEAMS, "length_penalty": 0.5, "early_stopping": "never"}
    expected = _expected(offline, ids, beam_width=2, max_tokens=12, length_penalty=0.5, early_stopping="never")
    whole = client.chat.completions.create(model=model, messages=QUESTION, n=2, max_tokens=12, extra_body=extra)
    assert [c.message.content for c in whole.choices] == [s.text for s in expected]
    streamed: dict[int, str] = {}
    finish: dict[int, str] = {}
    for chunk in client.chat.completions.create(model=model, messages=QUESTION, n=2, max_tokens=12, stream=True,
                                                extra_body=extra):
        for choice in chunk.choices:
            streamed[choice.index] = streamed.get(choice.index, "") + (choice.delta.content or "")
            if choice.finish_reason is not None:
                finish[choice.index] = choice.finish_reason
    assert [streamed[i] for i in range(2)] == [c.message.content for c in whole.choices]
    assert [finish[i] for i in range(2)] == [c.finish_reason for c in whole.choices]


def test_logprobs_are_each_steps(client, model, offline) -> None:
    ids = offline.get_tokenizer().encode(PROMPT)
    expected = _expected(offline, ids, beam_width=2, max_tokens=6, logprobs=2)
    got = client.completions.create(model=model, prompt=PROMPT, n=2, max_tokens=6, logprobs=2, extra_body=BEAMS)
    for choice, sequence in zip(got.choices, expected):
        lp = choice.logprobs
        assert sum(lp.token_logprobs) == pytest.approx(sequence.cum_logprob, abs=1e-3)
        assert all(len(top) >= 2 for top in lp.top_logprobs)  # the top 2, and the token if it is not one
    chat = client.chat.completions.create(model=model, messages=QUESTION, n=2, max_tokens=4, logprobs=True,
                                          top_logprobs=1, extra_body=BEAMS)
    assert all(len(c.logprobs.content) == 4 or c.finish_reason == "stop" for c in chat.choices)


@pytest.mark.parametrize("extra, param", [
    ({"stop": ["."]}, "stop"),
    ({"stop_token_ids": [5]}, "stop_token_ids"),
    ({"min_tokens": 2}, "min_tokens"),
    ({"logit_bias": {"5": 1.0}}, "logit_bias"),
    ({"frequency_penalty": 0.5}, "frequency_penalty"),
    ({"repetition_penalty": 1.2}, "repetition_penalty"),
    ({"response_format": {"type": "json_object"}}, "response_format"),
    ({"echo": True}, "echo"),
    ({"logprobs": 5}, "logprobs"),
    ({"early_stopping": "sometimes"}, "early_stopping"),
])
def test_what_a_search_does_not_follow_is_refused(client, model, server, extra: dict, param: str) -> None:
    with pytest.raises(openai.BadRequestError) as e:
        client.completions.create(model=model, prompt=PROMPT, n=2, max_tokens=4, extra_body={**BEAMS, **extra})
    assert e.value.body["param"] == param, e.value.body
    assert wait_for(lambda: idle(server))


def test_a_chat_without_max_tokens_searches_as_far_as_the_pool_holds_every_beam(client, model) -> None:
    got = client.chat.completions.create(model=model, messages=QUESTION, n=3, extra_body=BEAMS)
    assert len(got.choices) == 3 and all(c.finish_reason in ("stop", "length") for c in got.choices)


@pytest.mark.parametrize("extra, param", [
    ({"n": 9, "max_tokens": 2}, "n"),  # more beams than --max-num-seqs
    ({"tool_choice": "required", "tools": [{"type": "function", "function": {
        "name": "color", "parameters": {"type": "object", "properties": {}}}}]}, "tool_choice"),
    ({"guided_choice": ["red", "blue"]}, "guided_choice"),
])
def test_chat_refusals_name_what_the_client_sent(client, model, server, extra: dict, param: str) -> None:
    body = {"n": 2, "max_tokens": 4, **extra}
    n, max_tokens = body.pop("n"), body.pop("max_tokens")
    with pytest.raises(openai.BadRequestError) as e:
        client.chat.completions.create(model=model, messages=QUESTION, n=n, max_tokens=max_tokens,
                                       extra_body={**BEAMS, **body})
    assert e.value.body["param"] == param, e.value.body
    if param == "n":
        assert e.value.body["code"] == "beam_width_too_large"
    assert wait_for(lambda: idle(server))


def test_a_search_the_pool_cannot_hold_is_a_400_and_the_server_goes_on(client, model, server) -> None:
    # 4 beams x 400 tokens of their own: more than 96 blocks of 16
    with pytest.raises(openai.BadRequestError) as e:
        client.completions.create(model=model, prompt=PROMPT, n=4, max_tokens=400, extra_body=BEAMS)
    assert e.value.body["code"] == "kv_cache_too_small", e.value.body
    again = client.completions.create(model=model, prompt=PROMPT, n=2, max_tokens=4, extra_body=BEAMS)
    assert len(again.choices) == 2
    plain = client.completions.create(model=model, prompt=PROMPT, max_tokens=4, temperature=0)
    assert plain.choices[0].finish_reason == "length"
    assert wait_for(lambda: idle(server))
