"""The Responses API's store over a real server (`--max-stored-responses 2`, two API keys),
driven by the `openai` SDK: a stored response is its client's alone (retrieve, continue,
delete), `previous_response_id` continues its conversation exactly as the history sent in full
would (the same prompt tokens), `store: false` keeps nothing, and the least recently used goes
first. A scripted checkpoint (tests/scripted_model.py) answers every chat the same."""

from __future__ import annotations

import openai
import pytest

from tests.scripted_model import scripted_checkpoint
from tests.server_harness import ServerProcess, idle, wait_for

ANSWER = "Seven."
KEYS = ("key-one", "key-two")


@pytest.fixture(scope="module")
def server(tmp_path_factory: pytest.TempPathFactory):
    model = scripted_checkpoint(str(tmp_path_factory.mktemp("store")), ANSWER)
    with ServerProcess(model, "--num-kv-blocks", "64", "--cpu-threads", "1", "--generation-config", "none",
                       "--max-stored-responses", "2", "--api-key", KEYS[0], "--api-key", KEYS[1]) as s:
        yield s


@pytest.fixture(scope="module")
def clients(server) -> tuple[openai.OpenAI, openai.OpenAI]:
    return server.client(KEYS[0]), server.client(KEYS[1])


def _create(client: openai.OpenAI, **kwargs):
    return client.responses.create(model=None, temperature=0, max_output_tokens=16, **kwargs)


def test_a_stored_response_is_its_clients_alone(server, clients) -> None:
    one, two = clients
    first = _create(one, input="Count.", instructions="Be brief.")
    assert first.store and first.output_text == ANSWER
    assert one.responses.retrieve(first.id).model_dump() == first.model_dump()
    for other in (lambda: two.responses.retrieve(first.id), lambda: two.responses.delete(first.id),
                  lambda: _create(two, input="And?", previous_response_id=first.id)):
        with pytest.raises(openai.NotFoundError) as info:
            other()
        assert info.value.status_code == 404 and first.id in info.value.message
    # Continued: the stored conversation, the answer as the assistant's turn, then the new
    # input; the instructions are each request's own (not carried on).
    second = _create(one, input="And?", previous_response_id=first.id)
    assert second.previous_response_id == first.id and second.output_text == ANSWER
    explicit = _create(one, store=False, input=[{"role": "user", "content": "Count."},
                                                {"role": "assistant", "content": ANSWER},
                                                {"role": "user", "content": "And?"}])
    assert second.usage.input_tokens == explicit.usage.input_tokens
    assert not explicit.store
    with pytest.raises(openai.NotFoundError):
        one.responses.retrieve(explicit.id)  # store false: nothing kept
    third = _create(one, input="Again?", previous_response_id=second.id)
    assert third.usage.input_tokens > second.usage.input_tokens
    # Two are kept: the least recently used (first) went when the third came.
    with pytest.raises(openai.NotFoundError):
        one.responses.retrieve(first.id)
    one.responses.delete(second.id)
    with pytest.raises(openai.NotFoundError):
        one.responses.retrieve(second.id)
    with pytest.raises(openai.NotFoundError):
        _create(one, input="x", previous_response_id=second.id)
    assert one.responses.retrieve(third.id).output_text == ANSWER
    assert wait_for(lambda: idle(server))


def test_a_streamed_response_is_stored_as_it_ended(clients) -> None:
    one, _ = clients
    with one.responses.stream(model=None, input="Count.", temperature=0, max_output_tokens=16) as stream:
        final = stream.get_final_response()
    stored = one.responses.retrieve(final.id)
    # (the SDK's accumulator adds its own `parsed` fields to what it got)
    assert (stored.id, [item.id for item in stored.output], stored.output_text, stored.usage) == \
        (final.id, [item.id for item in final.output], ANSWER, final.usage)
    continued = _create(one, input="And?", previous_response_id=final.id)
    assert continued.output_text == ANSWER and continued.previous_response_id == final.id
