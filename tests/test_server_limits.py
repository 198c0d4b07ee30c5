"""Per-key rate limits, prices and the cost cap on a real server (a tiny checkpoint, token-id
prompts) driven by the `openai` SDK: 429s as OpenAI sends them, x-ratelimit-* headers, each
request's cost in its log line and stoke_cost_total."""

from __future__ import annotations

import hashlib

import openai
import pytest

from tests.server_harness import ServerProcess, idle, wait_for

KEY_A, KEY_B = "sk-limits-a-0123", "sk-limits-b-4567"
PROMPT = [5, 6, 7]  # 3 tokens: 0.003 at the prompt price below
TOKEN_PRICE = 0.1  # a generated token's, from --price-completion 100000 (per million)


@pytest.fixture(scope="module")
def server(tiny_checkpoints):
    with ServerProcess(tiny_checkpoints["llama"], "--kv-cache-memory-bytes", "16MiB", "--cpu-threads", "1",
                       "--api-key", KEY_A, "--api-key", KEY_B, "--rate-limit-requests", "4",
                       "--price-prompt", "1000", "--price-completion", "100000", "--cost-cap", "1.1") as s:
        yield s


def _complete(client: openai.OpenAI, max_tokens: int, **kwargs):
    model = client.models.list().data[0].id
    return client.completions.with_raw_response.create(model=model, prompt=PROMPT, max_tokens=max_tokens,
                                                       extra_body={"ignore_eos": True}, **kwargs)


def _key_lines(server: ServerProcess, key: str) -> list[dict]:
    key_id = "sha256:" + hashlib.sha256(key.encode()).hexdigest()[:12]
    return [line for line in server.log_lines() if line["key_id"] == key_id]


def test_each_key_has_its_requests_per_minute(server):
    before = server.metrics()
    client = server.client(KEY_A)
    remaining = []
    for stream in (False, True, False, False):
        raw = _complete(client, 1, stream=stream)
        assert raw.headers["x-ratelimit-limit-requests"] == "4"
        remaining.append(raw.headers["x-ratelimit-remaining-requests"])
        list(raw.parse()) if stream else raw.parse()
    assert remaining[0] == "3" and remaining[3] == "0"
    with pytest.raises(openai.RateLimitError) as info:
        _complete(client, 1)
    error = info.value
    assert (error.status_code, error.code, error.type) == (429, "rate_limit_exceeded", "requests")
    assert 1 <= int(error.response.headers["retry-after"]) <= 15  # 4 a minute: one more within 15 s
    assert _complete(server.client(KEY_B), 1).parse().usage.completion_tokens == 1  # B's budget is its own
    after = server.metrics()
    assert after['stoke_request_errors_total{type="rate_limited"}'] - \
        before['stoke_request_errors_total{type="rate_limited"}'] == 1
    lines = _key_lines(server, KEY_A)
    assert [line["status"] for line in lines] == [200, 200, 200, 200, 429]
    assert [line["cost"] for line in lines] == pytest.approx([0.003 + TOKEN_PRICE] * 4 + [0.0])
    assert after["stoke_cost_total"] - before["stoke_cost_total"] == pytest.approx(5 * (0.003 + TOKEN_PRICE))


def test_the_cost_cap_refuses_what_might_pass_it(server):
    client = server.client(KEY_B)
    spent = 0.003 + TOKEN_PRICE  # the previous test's request
    for _ in range(2):
        usage = _complete(client, 4).parse().usage
        assert usage.completion_tokens == 4
        spent += 0.003 + 4 * TOKEN_PRICE
    with pytest.raises(openai.RateLimitError) as info:  # 0.909 spent: 0.403 more might pass 1.1
        _complete(client, 4)
    error = info.value
    assert (error.status_code, error.code) == (429, "insufficient_quota")
    assert error.response.headers["x-should-retry"] == "false"  # the SDK does not retry it
    assert "0.191 of this day's 1.1 is left" in error.message and "Lower max_tokens" in error.message
    with pytest.raises(openai.BadRequestError) as info:  # can never run: a 400, not the cap's 429
        _complete(client, 5000)
    assert info.value.code == "context_length_exceeded"
    with pytest.raises(openai.RateLimitError):
        _complete(client, 2)
    _complete(client, 1)  # 0.103 fits what is left
    lines = _key_lines(server, KEY_B)
    assert [line["status"] for line in lines] == [200, 200, 200, 429, 400, 429, 200]
    assert sum(line["cost"] for line in lines) == pytest.approx(spent + 0.003 + TOKEN_PRICE)
    assert wait_for(lambda: idle(server))  # refused requests hold no KV block
