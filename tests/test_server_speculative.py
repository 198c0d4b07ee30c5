"""`--speculative-config` on a real server (embedded default model) driven by the `openai` SDK:
greedy answers equal the offline engine's without speculation, whole and streamed; sampled
ones with n > 1 and logprobs keep their accounting; the draft counters reach /metrics; no KV
block stays held."""

from __future__ import annotations

import openai
import pytest

from tests.server_harness import ServerProcess, idle, wait_for

CODE = "def area(w, h):\n    return w * h\n\n\ndef perimeter(w, h):\n    return 2 * (w + h)\n"
MESSAGES = [{"role": "user", "content": "Add type hints to this code and return the whole code.\n\n" + CODE}]
SPEC = '{"method": "ngram", "num_speculative_tokens": 4, "prompt_lookup_min": 2, "prompt_lookup_max": 4}'


@pytest.fixture(scope="module")
def server():
    with ServerProcess("--kv-cache-memory-bytes", "160MiB", "--cpu-threads", "1", "--max-num-seqs", "4",
                       "--speculative-config", SPEC) as s:
        yield s


def test_greedy_answers_equal_the_engine_without_speculation(server, default_model_dir):
    from engine import LLM, SamplingParams

    before = server.metrics()
    client = server.client()
    whole = client.chat.completions.create(model=None, messages=MESSAGES, max_tokens=60, temperature=0)
    stream = client.chat.completions.create(model=None, messages=MESSAGES, max_tokens=60, temperature=0,
                                            stream=True, stream_options={"include_usage": True})
    chunks = list(stream)
    streamed = "".join(c.choices[0].delta.content or "" for c in chunks if c.choices)
    alone = LLM(default_model_dir, kv_cache_memory_bytes=64 << 20).chat(
        MESSAGES, SamplingParams(max_tokens=60, temperature=0.0), use_tqdm=False)[0].outputs[0]
    assert whole.choices[0].message.content == streamed == alone.text
    assert whole.usage.completion_tokens == chunks[-1].usage.completion_tokens == len(alone.token_ids)
    after = server.metrics()
    drafts = after["stoke_spec_decode_drafts_total"] - before["stoke_spec_decode_drafts_total"]
    proposed = after["stoke_spec_decode_draft_tokens_total"] - before["stoke_spec_decode_draft_tokens_total"]
    accepted = after["stoke_spec_decode_accepted_tokens_total"] - before["stoke_spec_decode_accepted_tokens_total"]
    assert 0 < accepted <= proposed <= 4 * drafts
    # every accepted draft is a token that took no step of its own
    generated = after["stoke_generation_tokens_total"] - before["stoke_generation_tokens_total"]
    assert generated == 2 * len(alone.token_ids)
    assert wait_for(lambda: idle(server), 30), server.metrics()


def test_sampled_answers_keep_their_accounting(server):
    client = server.client()
    out = client.chat.completions.create(model=None, messages=MESSAGES, max_tokens=40, temperature=0.8, seed=7,
                                         n=2, logprobs=True, top_logprobs=2)
    again = client.chat.completions.create(model=None, messages=MESSAGES, max_tokens=40, temperature=0.8, seed=7,
                                           n=2, logprobs=True, top_logprobs=2)
    assert [c.message.content for c in out.choices] == [c.message.content for c in again.choices]
    tokens = [len(c.logprobs.content) for c in out.choices]
    assert all(0 < n <= 40 for n in tokens) and out.usage.completion_tokens == sum(tokens)
    for choice in out.choices:
        assert all(len(t.top_logprobs) == 2 and t.logprob <= 0 for t in choice.logprobs.content)
        text = "".join(t.token for t in choice.logprobs.content)  # with EOS's, where it stopped (as vLLM's)
        assert text.removesuffix("<|im_end|>") == choice.message.content
    with pytest.raises(openai.BadRequestError):  # bad input is refused and changes nothing
        client.chat.completions.create(model=None, messages=MESSAGES, max_tokens=10, temperature=-1)
    assert wait_for(lambda: idle(server), 30), server.metrics()
    lines = server.log_lines()[-3:]
    assert [line["status"] for line in lines] == [200, 200, 400]
    assert lines[0]["completion_tokens"] == out.usage.completion_tokens
