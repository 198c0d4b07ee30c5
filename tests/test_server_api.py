"""The OpenAI API of a real `stoke serve` (embedded default model), driven by the `openai` SDK.

One server for the module; small max_tokens throughout (the CPU does tens of tokens/s).
"""

from __future__ import annotations

import asyncio
import hashlib
import http.client
import importlib.metadata
import json
import re

import openai
import pytest

from tests.server_harness import ServerProcess

API_KEY = "sk-test-secret-0123456789"
PROMPT = "The capital of France is"


@pytest.fixture(scope="module")
def server():
    with ServerProcess("--kv-cache-memory-bytes", "256MiB", "--cpu-threads", "1", "--api-key", API_KEY, "--max-n", "4",
                       "--max-prompts", "8", "--max-tokens-limit", "512", "--max-stop", "4",
                       "--max-body-bytes", "65536") as s:
        yield s


@pytest.fixture(scope="module")
def client(server):
    return server.client(API_KEY)


@pytest.fixture(scope="module")
def model(client):
    return client.models.list().data[0].id


@pytest.fixture(scope="module")
def tokenizer(server):
    from transformers import AutoTokenizer

    from engine.default_model import default_model_path

    return AutoTokenizer.from_pretrained(default_model_path())


def test_models_health_ready(server, client, model):
    assert model == "SmolLM2-135M-Instruct-Q4_1"
    assert client.models.retrieve(model).id == model
    with pytest.raises(openai.NotFoundError) as info:
        client.models.retrieve("gpt-5")
    assert info.value.body["code"] == "model_not_found"
    assert server.get("/health")[0] == 200
    assert server.get("/ready")[0] == 200
    assert json.loads(server.get("/version")[1]) == {"version": importlib.metadata.version("stoke")}
    # vLLM's runtime LoRA updating needs --allow-runtime-lora-updating: a 404 in OpenAI's shape.
    with pytest.raises(openai.NotFoundError) as info:
        client.post("/load_lora_adapter", body={"lora_name": "a", "lora_path": "/tmp"}, cast_to=object)
    assert "--allow-runtime-lora-updating" in info.value.body["message"]


def test_completion_text_and_token_id_prompts(client, model, tokenizer):
    text = client.completions.create(model=model, prompt=PROMPT, max_tokens=6, temperature=0)
    choice = text.choices[0]
    assert choice.text and choice.finish_reason == "length"
    assert text.usage.completion_tokens == 6
    assert text.usage.prompt_tokens == len(tokenizer.encode(PROMPT))
    assert text.usage.prompt_tokens_details.cached_tokens == 0
    # The same prompt as token ids: same greedy text.
    ids = client.completions.create(model=model, prompt=tokenizer.encode(PROMPT), max_tokens=6, temperature=0)
    assert ids.choices[0].text == choice.text
    # Several prompts in one request: one choice each, in order.
    batch = client.completions.create(model=model, prompt=[PROMPT, "1, 2, 3,"], max_tokens=3, temperature=0)
    assert [c.index for c in batch.choices] == [0, 1]
    assert batch.choices[0].text == choice.text[:len(batch.choices[0].text)]
    batch_ids = client.completions.create(model=model, prompt=[tokenizer.encode(PROMPT), [16, 28, 1]],
                                          max_tokens=2, temperature=0)
    assert len(batch_ids.choices) == 2 and batch_ids.usage.completion_tokens == 4


def test_long_text_prompt(client, model, tokenizer):
    """A prompt long enough to be tokenized off the event loop gets the tokenizer's ids."""
    from server.serving import TOKENIZE_INLINE_CHARS

    text = "Paris is the capital of France. " * (TOKENIZE_INLINE_CHARS // 32 + 1)
    out = client.completions.create(model=model, prompt=text, max_tokens=1, temperature=0, echo=True)
    assert out.usage.prompt_tokens == len(tokenizer.encode(text))
    assert out.choices[0].text.startswith(text)


def test_chat_and_streaming_with_usage(server, client, model):
    messages = [{"role": "user", "content": "Say hello."}]
    full = client.chat.completions.create(model=model, messages=messages, max_tokens=8, temperature=0)
    content = full.choices[0].message.content
    assert content and full.choices[0].message.role == "assistant"
    assert full.usage.completion_tokens <= 8 and full.usage.prompt_tokens > 5

    chunks = list(client.chat.completions.create(model=model, messages=messages, max_tokens=8, temperature=0,
                                                 stream=True, stream_options={"include_usage": True}))
    assert chunks[0].choices[0].delta.role == "assistant"
    streamed = "".join(c.choices[0].delta.content or "" for c in chunks if c.choices)
    assert streamed == content
    assert chunks[-1].choices == [] and chunks[-1].usage.completion_tokens == full.usage.completion_tokens
    assert chunks[-1].usage.prompt_tokens_details is not None
    assert [c.choices[0].finish_reason for c in chunks if c.choices][-1] in ("stop", "length")
    assert all(c.usage is None for c in chunks[:-1])
    # OpenAI's keys that the SDK would also accept missing.
    status, raw = _post(server, "/v1/chat/completions", _j({"model": model, "messages": messages, "max_tokens": 2}))
    body = json.loads(raw)
    assert body["system_fingerprint"] is None and body["choices"][0]["message"]["refusal"] is None
    # In the raw stream, as OpenAI documents: every chunk before the usage chunk has "usage": null.
    status, raw = _post(server, "/v1/chat/completions", _j({"model": model, "messages": messages, "max_tokens": 4,
                                                              "stream": True, "stream_options": {"include_usage": True}}))
    events = [json.loads(line[6:]) for line in raw.decode().split("\n\n") if line.startswith("data: {")]
    assert status == 200 and len(events) >= 3
    assert all("usage" in e and e["usage"] is None for e in events[:-1]) and events[-1]["usage"]["total_tokens"]

    # vLLM's continuous_usage_stats: every chunk with its choice's tokens so far
    continuous = list(client.chat.completions.create(
        model=model, messages=messages, max_tokens=8, temperature=0, stream=True,
        stream_options={"include_usage": True, "continuous_usage_stats": True}))
    assert "".join(c.choices[0].delta.content or "" for c in continuous if c.choices) == content
    counts = [c.usage.completion_tokens for c in continuous]
    assert counts == sorted(counts) and counts[-2] == counts[-1] == full.usage.completion_tokens
    assert continuous[0].choices[0].delta.role == "assistant" and counts[0] == 0  # vLLM's role chunk
    assert all(c.usage.prompt_tokens == full.usage.prompt_tokens for c in continuous)

    max_completion = client.chat.completions.create(model=model, messages=messages, max_completion_tokens=2,
                                                    temperature=0)
    assert max_completion.usage.completion_tokens == 2


def test_async_streams_concurrently(server, model):
    async def main() -> list[str]:
        aclient = openai.AsyncOpenAI(base_url=server.base_url, api_key=API_KEY, max_retries=0, timeout=120)

        async def one(prompt: str) -> str:
            stream = await aclient.completions.create(model=model, prompt=prompt, max_tokens=5, temperature=0,
                                                      stream=True)
            return "".join([chunk.choices[0].text async for chunk in stream])

        try:
            return await asyncio.gather(*(one(p) for p in (PROMPT, "Once upon a time", "def add(a, b):")))
        finally:
            await aclient.close()

    texts = asyncio.run(main())
    assert all(texts)


def test_n_choices(client, model):
    out = client.completions.create(model=model, prompt=PROMPT, max_tokens=4, n=3, temperature=1.0, seed=7)
    assert sorted(c.index for c in out.choices) == [0, 1, 2]
    assert out.usage.completion_tokens == 12
    stream = client.chat.completions.create(model=model, messages=[{"role": "user", "content": "Hi"}], n=2,
                                            max_tokens=3, temperature=1.0, seed=3, stream=True,
                                            extra_body={"ignore_eos": True})
    chunks = [c.choices[0] for c in stream if c.choices]
    assert {c.index for c in chunks} == {0, 1}
    # Sample 1 prefills a step after sample 0, so it finishes a step later: sample 0's finish
    # is still sent once.
    assert sorted(c.index for c in chunks if c.finish_reason) == [0, 1]


def test_stop_strings(client, model):
    free = client.completions.create(model=model, prompt=PROMPT, max_tokens=8, temperature=0).choices[0].text
    words = free.split()
    assert len(words) >= 3, free
    stop = " " + words[2]
    out = client.completions.create(model=model, prompt=PROMPT, max_tokens=8, temperature=0, stop=[stop])
    assert out.choices[0].finish_reason == "stop"
    assert out.choices[0].text == free[:free.index(stop)]
    assert out.choices[0].model_extra["stop_reason"] == stop
    chunks = list(client.completions.create(model=model, prompt=PROMPT, max_tokens=8, temperature=0, stop=stop,
                                            stream=True))
    assert "".join(c.choices[0].text for c in chunks) == out.choices[0].text
    # The last chunk says what stopped the choice, as the body does (vLLM's stop_reason).
    assert chunks[-1].choices[0].finish_reason == "stop" and chunks[-1].choices[0].model_extra["stop_reason"] == stop
    chat = list(client.chat.completions.create(model=model, messages=[{"role": "user", "content": "Hi"}],
                                               max_tokens=2, stream=True))
    assert chat[-1].choices[0].finish_reason == "length" and chat[-1].choices[0].model_extra["stop_reason"] is None


def test_logprobs(client, model):
    out = client.completions.create(model=model, prompt=PROMPT, max_tokens=3, temperature=0, logprobs=2)
    lp = out.choices[0].logprobs
    assert len(lp.tokens) == len(lp.token_logprobs) == len(lp.top_logprobs) == 3
    assert "".join(lp.tokens) == out.choices[0].text
    for token, logprob, top in zip(lp.tokens, lp.token_logprobs, lp.top_logprobs):
        assert logprob <= 0 and token in top and max(top.values()) == pytest.approx(logprob)  # greedy: the best
    chat = client.chat.completions.create(model=model, messages=[{"role": "user", "content": "Hi"}], max_tokens=3,
                                          temperature=0, logprobs=True, top_logprobs=2)
    content = chat.choices[0].logprobs.content
    assert len(content) == chat.usage.completion_tokens
    assert all(len(c.top_logprobs) == 2 and c.top_logprobs[0].logprob == pytest.approx(c.logprob) for c in content)
    stream = client.chat.completions.create(model=model, messages=[{"role": "user", "content": "Hi"}], max_tokens=3,
                                            temperature=0, logprobs=True, top_logprobs=2, stream=True)
    streamed = [x for c in stream if c.choices and c.choices[0].logprobs for x in c.choices[0].logprobs.content]
    assert [x.model_dump() for x in streamed] == [x.model_dump() for x in content]  # the body's, chunk by chunk
    # Tokens that are parts of a character (an emoji's bytes, forced): each entry's `bytes` are
    # the token's own, not the UTF-8 of the U+FFFD its text shows.
    parts = {10813: [240, 159], 230: [140], 231: [141]}  # "🌍" in SmolLM2's vocabulary: f0 9f | 8c | 8d
    emoji = client.chat.completions.create(model=model, messages=[{"role": "user", "content": "Hi"}], max_tokens=3,
                                           temperature=0, logprobs=True, top_logprobs=3,
                                           logit_bias={str(t): 100 for t in parts})
    entries = emoji.choices[0].logprobs.content
    assert emoji.choices[0].message.content == "🌍" and [e.token for e in entries] == ["\ufffd"] * 3
    assert bytes(b for e in entries for b in e.bytes) == "🌍".encode()
    assert all(t.bytes != [239, 191, 189] for e in entries for t in e.top_logprobs)  # (the model's own top 3)


def test_echo(client, model):
    plain = client.completions.create(model=model, prompt=PROMPT, max_tokens=3, temperature=0)
    echoed = client.completions.create(model=model, prompt=PROMPT, max_tokens=3, temperature=0, echo=True)
    assert echoed.choices[0].text == PROMPT + plain.choices[0].text
    chunks = [c.choices[0].text for c in client.completions.create(
        model=model, prompt=PROMPT, max_tokens=3, temperature=0, echo=True, stream=True)]
    assert chunks[0] == PROMPT and "".join(chunks) == echoed.choices[0].text


def test_echo_with_logprobs_scores_the_prompt(client, model, tokenizer):
    """lm-eval style: echo + logprobs + max_tokens=1 gives the log-likelihood of every prompt token."""
    out = client.completions.create(model=model, prompt=PROMPT, max_tokens=1, temperature=0, echo=True, logprobs=2)
    lp = out.choices[0].logprobs
    prompt_ids = tokenizer.encode(PROMPT)
    assert len(lp.tokens) == len(prompt_ids) + 1 == out.usage.prompt_tokens + 1
    assert "".join(lp.tokens) == out.choices[0].text
    assert lp.token_logprobs[0] is None and lp.top_logprobs[0] is None
    assert all(v <= 0 for v in lp.token_logprobs[1:])
    assert all(len(top) >= 2 and token in top for token, top in zip(lp.tokens[1:], lp.top_logprobs[1:]))
    assert lp.text_offset[: len(prompt_ids)] == sorted(lp.text_offset[: len(prompt_ids)])
    chunks = list(client.completions.create(model=model, prompt=PROMPT, max_tokens=1, temperature=0, echo=True,
                                            logprobs=2, stream=True))
    first = chunks[0].choices[0]
    assert first.text == PROMPT and first.logprobs.token_logprobs == lp.token_logprobs[: len(prompt_ids)]
    # Tokens that are parts of a character ("\ufffd" each): offsets still run on, prompt to output,
    # each token's after the one before it, in the body and the stream alike.
    kwargs = dict(model=model, prompt="Café 日本語 🎉 ok", max_tokens=3, temperature=0, echo=True, logprobs=1)
    whole = client.completions.create(**kwargs).choices[0].logprobs
    assert all(b == a + len(t) for a, b, t in zip(whole.text_offset, whole.text_offset[1:], whole.tokens))
    streamed = [c.choices[0].logprobs for c in client.completions.create(stream=True, **kwargs)
                if c.choices and c.choices[0].logprobs]
    assert [x for part in streamed for x in part.text_offset] == whole.text_offset


def test_echo_with_max_tokens_0_returns_the_prompt_alone(client, model):
    """Legacy OpenAI and vLLM: echo with max_tokens=0 scores the prompt and completes nothing,
    streamed or not; without echo, max_tokens=0 is a 400."""
    scored = client.completions.create(model=model, prompt=PROMPT, max_tokens=1, temperature=0, echo=True,
                                       logprobs=2).choices[0].logprobs
    prompt_len = client.completions.create(model=model, prompt=PROMPT, max_tokens=1).usage.prompt_tokens
    out = client.completions.create(model=model, prompt=[PROMPT, PROMPT], max_tokens=0, echo=True, logprobs=2)
    assert out.usage.completion_tokens == 0 and out.usage.prompt_tokens == 2 * prompt_len
    for choice in out.choices:
        assert choice.text == PROMPT and choice.finish_reason == "length"
        assert choice.logprobs.tokens == scored.tokens[:prompt_len]
        assert choice.logprobs.token_logprobs == scored.token_logprobs[:prompt_len]
    chunks = list(client.completions.create(model=model, prompt=PROMPT, max_tokens=0, echo=True, stream=True,
                                            stream_options={"include_usage": True}))
    assert [(c.choices[0].text, c.choices[0].finish_reason) for c in chunks[:-1]] == [(PROMPT, None), ("", "length")]
    assert chunks[-1].usage.completion_tokens == 0
    with pytest.raises(openai.BadRequestError) as info:
        client.completions.create(model=model, prompt=PROMPT, max_tokens=0)
    assert info.value.body["param"] == "max_tokens"


def test_truncate_prompt_tokens_keeps_the_prompts_end(client, model, tokenizer):
    """vLLM's truncate_prompt_tokens: the prompt's last k tokens are what the model sees (and
    what echo returns); -1 means the context length, so an over-long prompt fits; k beyond it
    or below -1 is a 400."""
    ids = tokenizer.encode(PROMPT)
    k = len(ids) - 2
    whole = client.completions.create(model=model, prompt=ids[-k:], max_tokens=4, temperature=0)
    cut = client.completions.create(model=model, prompt=PROMPT, max_tokens=4, temperature=0, echo=True,
                                    extra_body={"truncate_prompt_tokens": k})
    assert cut.usage.prompt_tokens == k and cut.choices[0].text == tokenizer.decode(ids[-k:]) + whole.choices[0].text
    short = client.completions.create(model=model, prompt=ids, max_tokens=1, extra_body={"truncate_prompt_tokens": 99})
    assert short.usage.prompt_tokens == len(ids)  # no longer than k: unchanged
    chat = client.chat.completions.create(model=model, messages=[{"role": "user", "content": PROMPT}], max_tokens=1,
                                          extra_body={"truncate_prompt_tokens": 3})
    assert chat.usage.prompt_tokens == 3
    # 8,000 ids of an 8,192 context, cut to the last 100: room for the answer
    long = client.completions.create(model=model, prompt=[5] * 7900 + ids, max_tokens=2,
                                     extra_body={"truncate_prompt_tokens": 100})
    assert long.usage.prompt_tokens == 100
    with pytest.raises(openai.BadRequestError) as info:  # the whole context: no room left for max_tokens
        client.completions.create(model=model, prompt=[5] * 9000, max_tokens=2, extra_body={"truncate_prompt_tokens": -1})
    assert info.value.body["code"] == "context_length_exceeded"
    for bad in (0, -2, 8193):
        with pytest.raises(openai.BadRequestError) as info:
            client.completions.create(model=model, prompt=PROMPT, max_tokens=1, extra_body={"truncate_prompt_tokens": bad})
        assert info.value.body["param"] == "truncate_prompt_tokens"


@pytest.mark.parametrize("echo", [False, True])
def test_streamed_logprobs_add_up_to_the_whole(client, model, echo):
    """A streamed completion's logprobs, chunk after chunk, are the whole body's: the same
    tokens and values, and text offsets that run on from chunk to chunk (after the echoed
    prompt), not from 0 in each."""
    kwargs = dict(model=model, prompt=PROMPT, max_tokens=4, temperature=0, echo=echo, logprobs=1)
    whole = client.completions.create(**kwargs).choices[0].logprobs
    parts = [c.choices[0].logprobs for c in client.completions.create(stream=True, **kwargs)
             if c.choices and c.choices[0].logprobs]
    for field in ("tokens", "token_logprobs", "text_offset"):
        assert [x for p in parts for x in getattr(p, field)] == getattr(whole, field), field
    assert len(parts) >= 3


def test_logit_bias(client, model, tokenizer):
    """+100 on one token makes every sampled token that one; -100 on the greedy choice gives
    another; an invalid map is a 400 that names logit_bias."""
    the = tokenizer.encode(" the")[0]
    forced = client.completions.create(model=model, prompt=PROMPT, max_tokens=3, temperature=1.0,
                                       logit_bias={str(the): 100})
    assert forced.choices[0].text == " the the the"
    greedy = client.completions.create(model=model, prompt=PROMPT, max_tokens=1, temperature=0).choices[0].text
    (first,) = tokenizer.encode(greedy)
    banned = client.completions.create(model=model, prompt=PROMPT, max_tokens=1, temperature=0,
                                       logit_bias={str(first): -100})
    assert banned.choices[0].text not in ("", greedy)
    with pytest.raises(openai.BadRequestError) as info:
        client.chat.completions.create(model=model, messages=[{"role": "user", "content": "hi"}], max_tokens=1,
                                       logit_bias={"1": 250})
    assert info.value.body["param"] == "logit_bias"


def test_tokenize_and_detokenize(server, client, model, tokenizer):
    """vLLM's /tokenize and /detokenize: the ids the endpoints give the engine (a prompt with
    special tokens, chat messages through the template without), and back to text."""
    status, raw = _post(server, "/tokenize", _j({"model": model, "prompt": PROMPT}))
    body = json.loads(raw)
    assert status == 200 and body["tokens"] == tokenizer.encode(PROMPT) and body["count"] == len(body["tokens"])
    assert body["max_model_len"] == 8192
    messages = [{"role": "user", "content": "Hi"}]
    status, raw = _post(server, "/tokenize", _j({"messages": messages}))
    chat_ids = json.loads(raw)["tokens"]
    usage = client.chat.completions.create(model=model, messages=messages, max_tokens=1).usage
    assert status == 200 and len(chat_ids) == usage.prompt_tokens
    assert chat_ids == tokenizer.apply_chat_template(messages, add_generation_prompt=True, tokenize=True,
                                                     return_dict=False)
    # Text content parts reach the template as one string, joined by newlines (as vLLM).
    parts = [{"role": "user", "content": [{"type": "text", "text": "Say"}, {"type": "text", "text": "hello"}]}]
    status, raw = _post(server, "/tokenize", _j({"messages": parts}))
    assert status == 200 and json.loads(raw)["tokens"] == tokenizer.apply_chat_template(
        [{"role": "user", "content": "Say\nhello"}], add_generation_prompt=True, tokenize=True, return_dict=False)
    status, raw = _post(server, "/detokenize", _j({"model": model, "tokens": body["tokens"]}))
    assert status == 200 and json.loads(raw) == {"prompt": PROMPT}
    status, raw = _post(server, "/tokenize", '{"prompt": "\\ud83d\\ude00"}')  # a whole surrogate pair is text
    assert status == 200 and json.loads(raw)["tokens"] == tokenizer.encode("\U0001F600")
    errors = 'stoke_request_errors_total{type="invalid_request"}'
    before = server.metrics()[errors]
    for path, request, code in (("/tokenize", {}, "invalid_value"),
                                ("/tokenize", {"prompt": "a", "messages": messages}, "invalid_value"),
                                ("/tokenize", {"model": "gpt-5", "prompt": "a"}, "model_not_found"),
                                ("/detokenize", {"tokens": [1, 10 ** 9]}, "invalid_value"),
                                ("/detokenize", {"tokens": "abc"}, "invalid_type"),
                                ("/detokenize", {"tokens": [1] * 8193}, "invalid_value")):  # past the context
        status, raw = _post(server, path, _j(request))
        assert status in (400, 404) and json.loads(raw)["error"]["code"] == code, (path, request, raw)
    assert server.metrics()[errors] == before + 6, "every refusal is counted, not only the schema's"
    # A long chat is rendered off the event loop, to the same ids.
    many = [{"role": "user" if i % 2 == 0 else "assistant", "content": f"m{i}"} for i in range(101)]
    status, raw = _post(server, "/tokenize", _j({"messages": many}))
    assert status == 200 and json.loads(raw)["tokens"] == tokenizer.apply_chat_template(
        many, add_generation_prompt=True, tokenize=True, return_dict=False)


def _post(server, path: str, body: bytes | str, headers: dict | None = None, method: str = "POST"):
    conn = http.client.HTTPConnection("127.0.0.1", server.port, timeout=60)
    try:
        hdrs = {"Content-Type": "application/json", "Authorization": f"Bearer {API_KEY}", **(headers or {})}
        conn.request(method, path, body=body.encode() if isinstance(body, str) else body, headers=hdrs)
        response = conn.getresponse()
        return response.status, response.read()
    finally:
        conn.close()


def _j(obj) -> str:
    return json.dumps(obj)


def test_deeply_nested_json_is_not_a_500(server):
    """JSON nested as deep as the parser allows, in a field the surrogate check walks and in a
    tool call's arguments (parsed for the template): both were a RecursionError, a 500 (and
    two tracebacks in the server log) for a 1 KB body."""
    deep = "[" * 600 + "]" * 600
    status, raw = _post(server, "/v1/chat/completions",
                        '{"messages": [{"role": "user", "content": "hi", "x": ' + deep + '}], "max_tokens": 1}')
    assert status in (200, 400), raw[:300]  # 400: the template's renderer nests too deep for it
    call = {"id": "c", "type": "function", "function": {"name": "f", "arguments": "[" * 5000 + "]" * 5000}}
    status, raw = _post(server, "/v1/chat/completions", json.dumps(
        {"messages": [{"role": "assistant", "content": "", "tool_calls": [call]}], "max_tokens": 1}))
    assert status in (200, 400), raw[:300]


MODEL = "SmolLM2-135M-Instruct-Q4_1"
BAD_INPUTS = [
    # (name, path, body, status, code)
    ("malformed json", "/v1/completions", '{"prompt": "hi", ', 400, "invalid_json"),
    ("not an object", "/v1/completions", "[1, 2]", 400, "invalid_type"),
    ("wrong type", "/v1/completions", _j({"prompt": "hi", "max_tokens": "many"}), 400, "invalid_type"),
    ("prompt of mixed types", "/v1/completions", _j({"prompt": ["a", 1]}), 400, "invalid_type"),
    ("missing prompt", "/v1/completions", _j({"max_tokens": 2}), 400, "missing_required_parameter"),
    ("missing messages", "/v1/chat/completions", _j({"model": MODEL}), 400, "missing_required_parameter"),
    ("unknown model", "/v1/completions", _j({"model": "gpt-5", "prompt": "hi"}), 404, "model_not_found"),
    ("prompt too long", "/v1/completions", _j({"prompt": [5] * 8190, "max_tokens": 16}), 400,
     "context_length_exceeded"),
    ("max_tokens beyond context", "/v1/chat/completions",
     _j({"messages": [{"role": "user", "content": "hi"}], "max_tokens": 10 ** 6}), 400, "invalid_value"),
    ("max_tokens beyond cap", "/v1/completions", _j({"prompt": "hi", "max_tokens": 513}), 400, "invalid_value"),
    ("n beyond cap", "/v1/completions", _j({"prompt": "hi", "n": 5}), 400, "invalid_value"),
    ("prompts beyond cap", "/v1/completions", _j({"prompt": [[1]] * 9}), 400, "invalid_value"),
    ("stop list beyond cap", "/v1/completions", _j({"prompt": "hi", "stop": list("abcde")}), 400, "invalid_value"),
    ("negative temperature", "/v1/completions", _j({"prompt": "hi", "temperature": -1}), 400, "invalid_value"),
    ("NaN temperature", "/v1/completions", '{"prompt": "hi", "temperature": NaN}', 400, "invalid_value"),
    ("top_p zero", "/v1/completions", _j({"prompt": "hi", "top_p": 0}), 400, "invalid_value"),
    ("max_tokens zero", "/v1/completions", _j({"prompt": "hi", "max_tokens": 0}), 400, "invalid_value"),
    ("token id out of vocab", "/v1/completions", _j({"prompt": [1, 10 ** 9]}), 400, "invalid_value"),
    ("negative token id", "/v1/completions", _j({"prompt": [[1, -3]]}), 400, "invalid_value"),
    ("empty prompt", "/v1/completions", _j({"prompt": ""}), 400, "invalid_prompt"),
    ("empty prompt list", "/v1/completions", _j({"prompt": []}), 400, "invalid_value"),
    ("empty messages", "/v1/chat/completions", _j({"messages": []}), 400, "invalid_value"),
    ("huge seed", "/v1/completions", _j({"prompt": "hi", "seed": 2 ** 70}), 400, "invalid_value"),
    ("logprobs beyond cap", "/v1/completions", _j({"prompt": "hi", "logprobs": 50}), 400, "invalid_value"),
    ("logit_bias beyond 100", "/v1/completions", _j({"prompt": "hi", "logit_bias": {"5": 101}}), 400,
     "invalid_value"),
    ("logit_bias key not a token id", "/v1/completions", _j({"prompt": "hi", "logit_bias": {"five": 1}}), 400,
     "invalid_value"),
    ("logit_bias token beyond vocab", "/v1/chat/completions",
     _j({"messages": [{"role": "user", "content": "hi"}], "logit_bias": {"49152": 1}}), 400, "invalid_value"),
    ("continue_final_message with add_generation_prompt", "/v1/chat/completions",
     _j({"messages": [{"role": "user", "content": "hi"}, {"role": "assistant", "content": "Hel"}],
         "continue_final_message": True, "add_generation_prompt": True}), 400, "invalid_value"),
    ("image content", "/v1/chat/completions",
     _j({"messages": [{"role": "user", "content": [{"type": "image_url", "image_url": {"url": "x"}}]}]}), 400,
     "unsupported_parameter"),
    ("logit_bias token past int64", "/v1/completions", _j({"prompt": "hi", "logit_bias": {str(2 ** 63): 1}}), 400,
     "invalid_value"),
    ("tool_choice without tools", "/v1/chat/completions",
     _j({"messages": [{"role": "user", "content": "hi"}], "tool_choice": "required"}), 400, "invalid_value"),
    ("tools without --tool-call-parser", "/v1/chat/completions",  # tool_choice "auto", as vLLM's default
     _j({"messages": [{"role": "user", "content": "hi"}], "tools": [{"type": "function", "function": {"name": "f"}}]}),
     400, "invalid_value"),
    # Half a surrogate pair: valid JSON, but no text (the tokenizer, the pipe and the log line failed on it).
    ("lone surrogate in the prompt", "/v1/completions", '{"prompt": "\\ud800"}', 400, "invalid_value"),
    ("lone surrogate in a stop string", "/v1/completions", '{"prompt": "hi", "stop": "\\udfff"}', 400,
     "invalid_value"),
    ("lone surrogate in a message", "/v1/chat/completions",
     '{"messages": [{"role": "user", "content": [{"type": "text", "text": "\\udc80hi"}]}]}', 400, "invalid_value"),
    ("lone surrogate in the model name", "/v1/completions", '{"prompt": "hi", "model": "\\ud800"}', 400,
     "invalid_value"),
    ("lone surrogate in the user", "/v1/completions", '{"prompt": "hi", "user": "\\ud800"}', 400, "invalid_value"),
    ("lone surrogate to tokenize", "/tokenize", '{"prompt": "\\ud800"}', 400, "invalid_value"),
    ("body not UTF-8", "/v1/completions", b'{"prompt": "\xff"}', 400, "invalid_json"),
    ("number too long for JSON", "/v1/completions", '{"prompt": "hi", "seed": ' + "9" * 5000 + "}", 400,
     "invalid_json"),
    ("oversized body", "/v1/completions", _j({"prompt": "x" * 70000}), 413, "request_too_large"),
    ("unknown route", "/v1/engines", _j({}), 404, "not_found"),
]


def test_tools_with_tool_choice_none_answer_in_text(client, model):
    """Without --tool-call-parser, tools with tool_choice "none" are shown to the template and
    the answer comes back as text (vLLM's)."""
    tools = [{"type": "function", "function": {"name": "weather", "parameters": {"type": "object"}}}]
    out = client.chat.completions.create(model=model, messages=[{"role": "user", "content": "hi"}], tools=tools,
                                         tool_choice="none", max_tokens=2, temperature=0)
    assert out.choices[0].message.content and not out.choices[0].message.tool_calls
    assert out.choices[0].finish_reason == "length"


def test_continue_final_message_extends_the_assistants_text(server, client, model):
    """vLLM's continue_final_message: the last assistant message is continued, not closed (no
    generation prompt after it); add_generation_prompt left at its default is fine."""
    root = openai.OpenAI(base_url=server.url, api_key=API_KEY, max_retries=0)  # /tokenize is not under /v1
    messages = [{"role": "user", "content": "Count to five."}, {"role": "assistant", "content": "1, 2, 3"}]
    tokens = root.post("/tokenize", body={"messages": messages, "continue_final_message": True,
                                          "add_generation_prompt": False}, cast_to=object)["tokens"]
    out = client.chat.completions.create(model=model, messages=messages, max_tokens=2, temperature=0,
                                         extra_body={"continue_final_message": True})
    assert out.usage.prompt_tokens == len(tokens)


def test_errors_name_the_field_the_client_sent(server):
    """A chat's max_completion_tokens is checked as max_tokens, but its errors name it; and
    stream_options without stream is refused (OpenAI, vLLM), as is a priority without
    --scheduling-policy priority (vLLM)."""
    chat = {"messages": [{"role": "user", "content": "hi"}]}
    for body, param in ((chat | {"max_completion_tokens": 0}, "max_completion_tokens"),
                        (chat | {"max_completion_tokens": 513}, "max_completion_tokens"),
                        (chat | {"max_tokens": 513}, "max_tokens"),
                        (chat | {"stream_options": {"include_usage": True}}, "stream_options"),
                        ({"prompt": "hi", "stream": False, "stream_options": {"include_usage": True}}, "stream_options"),
                        (chat | {"priority": 1}, "priority"),  # this server is first come, first served
                        ({"prompt": "hi", "priority": -3}, "priority")):
        path = "/v1/chat/completions" if "messages" in body else "/v1/completions"
        status, raw = _post(server, path, _j(body))
        error = json.loads(raw)["error"]
        assert status == 400 and error["param"] == param and error["message"].startswith(param), raw
    assert server.log_lines()[-1]["priority"] == -3  # a refused request's line says what it asked for


@pytest.mark.parametrize("name,path,body,status,code", BAD_INPUTS, ids=[b[0] for b in BAD_INPUTS])
def test_bad_input(server, name, path, body, status, code):
    got, raw = _post(server, path, body)
    assert got == status, raw
    error = json.loads(raw)["error"]
    assert set(error) == {"message", "type", "param", "code"}
    assert error["code"] == code and isinstance(error["message"], str) and error["message"]
    assert "Traceback" not in error["message"]


def test_server_healthy_after_bad_inputs(server, client, model):
    assert server.get("/health")[0] == 200
    assert client.completions.create(model=model, prompt=PROMPT, max_tokens=2).usage.completion_tokens == 2
    m = server.metrics()
    assert m['stoke_request_errors_total{type="invalid_request"}'] >= 20
    assert m['stoke_request_errors_total{type="context_length"}'] >= 1
    assert m['stoke_request_errors_total{type="internal"}'] == 0
    assert m["stoke_requests_running"] == 0 and m["stoke_requests_waiting"] == 0


def test_auth_required(server, model):
    """Every route but the probes and /metrics needs the key, which is checked before the body
    is read: the 401's log line has nothing of the body (a client without a key wrote
    megabytes of `user` into the log)."""
    bad = openai.OpenAI(base_url=server.base_url, api_key="wrong", max_retries=0)
    with pytest.raises(openai.AuthenticationError):
        bad.completions.create(model=model, prompt="hi", max_tokens=1, user="mallory")
    line = server.log_lines()[-1]
    assert (line["status"], line["error_type"], line["user"], line["model"]) == (401, "invalid_request", None, None)
    for call in (lambda: bad.models.list(), lambda: bad.chat.completions.create(model=model, messages=[], max_tokens=1)):
        with pytest.raises(openai.AuthenticationError):
            call()
    counted = 'stoke_request_errors_total{type="invalid_request"}'
    before = server.metrics()[counted]
    for path in ("/tokenize", "/detokenize", "/v1/nothing-here"):
        assert _post(server, path, "{}", headers={"Authorization": "Bearer wrong"})[0] == 401
    assert server.metrics()[counted] == before + 2  # not a scanner's 401 on a path stoke does not serve
    assert _post(server, "/v1/completions", "{}", headers={"Authorization": "Bearer "})[0] == 401
    assert all(server.get(path)[0] == 200 for path in ("/health", "/ready", "/version", "/metrics"))


def test_request_log_lines(server, client, model):
    before = len(server.log_lines())
    out = client.completions.create(model=model, prompt=PROMPT, max_tokens=3, temperature=0, user="alice")
    lines = server.log_lines()
    assert len(lines) == before + 1
    line = lines[-1]
    assert line["request_id"] == out.id and line["user"] == "alice" and line["status"] == 200
    expected = {"event", "request_id", "endpoint", "model", "key_id", "user", "stream", "n", "beam_search", "priority",
                "structured",
                "prompt_tokens",
                "cached_tokens", "completion_tokens", "reasoning_tokens", "cost", "queue_time_s", "ttft_s", "mean_itl_s", "e2e_s",
                "finish_reason", "error_type", "status"}
    assert set(line) == expected  # no prompt/output text without --log-request-text
    assert line["prompt_tokens"] == out.usage.prompt_tokens and line["completion_tokens"] == 3
    assert line["finish_reason"] == "length" and line["error_type"] is None
    assert line["cost"] is None  # no --price-* options: no cost
    assert line["reasoning_tokens"] is None  # no --reasoning-parser
    assert 0 <= line["queue_time_s"] <= line["ttft_s"] <= line["e2e_s"] and line["mean_itl_s"] > 0
    assert line["key_id"] == "sha256:" + hashlib.sha256(API_KEY.encode()).hexdigest()[:12]
    # One line per request, errors included, and never the key itself.
    ids = [entry["request_id"] for entry in lines]
    assert len(ids) == len(set(ids))
    errors = [entry for entry in lines if entry["status"] >= 400]
    assert errors and all(entry["error_type"] for entry in errors)
    assert {400, 404, 413} <= {entry["status"] for entry in errors}  # the bad inputs' lines, 413 too
    assert API_KEY not in server.stdout() and API_KEY not in server.stderr()
    assert "Traceback" not in server.stderr()
    assert re.search(r"HTTP process: \d{5,} start-up objects frozen", server.stderr())
