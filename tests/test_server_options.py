"""`stoke serve` options that change what requests get, on a real server (embedded default
model) driven by the `openai` SDK: `--chat-template`, `--generation-config`,
`--allowed-origins`, `--request-timeout`, `--max-pending-requests`, `--served-model-name`,
`--log-request-text`, `--quantization fp8` and `--kv-cache-dtype fp8` (the weights and KV cache
every test here is served by)."""

from __future__ import annotations

import asyncio
import http.client
import json
import time

import openai
import pytest

from server.launch import load_chat_template
from tests.server_harness import ServerProcess, idle, wait_for

ORIGIN = "https://chat.example.com"
TEMPLATE = "{% for m in messages %}<{{ m['role'] }}> {{ m['content'] }}\n{% endfor %}<assistant>"
# Far above what this module's other requests take (a few tokens each), far below two
# 1,600-token answers on this CPU.
REQUEST_TIMEOUT = 6.0
SERVED_NAME = "team/chat-model"


@pytest.fixture(scope="module")
def server(tmp_path_factory: pytest.TempPathFactory):
    root = tmp_path_factory.mktemp("options")
    (root / "chat.jinja").write_text(TEMPLATE)
    (root / "generation_config.json").write_text(json.dumps({"temperature": 0.0, "max_new_tokens": 3}))
    with ServerProcess("--kv-cache-memory-bytes", "160MiB", "--cpu-threads", "1",
                       "--chat-template", str(root / "chat.jinja"), "--generation-config", str(root),
                       "--allowed-origins", ORIGIN, "--request-timeout", str(REQUEST_TIMEOUT),
                       "--max-pending-requests", "2", "--served-model-name", SERVED_NAME,
                       "--log-request-text", "--quantization", "fp8", "--kv-cache-dtype", "fp8") as s:
        yield s


@pytest.fixture(scope="module")
def client(server):
    return server.client()


def test_chat_template_option_renders_chats(server, client):
    from transformers import AutoTokenizer

    from engine.default_model import default_model_path

    messages = [{"role": "system", "content": "Be brief."}, {"role": "user", "content": "Hi"}]
    expected = AutoTokenizer.from_pretrained(default_model_path()).encode(
        "<system> Be brief.\n<user> Hi\n<assistant>", add_special_tokens=False)
    root = openai.OpenAI(base_url=server.url, api_key="unused", max_retries=0)  # vLLM's /tokenize is not under /v1
    tokenized = root.post("/tokenize", body={"messages": messages}, cast_to=object)
    assert tokenized["tokens"] == expected
    chat = client.chat.completions.create(model=None, messages=messages, max_tokens=2)
    assert chat.usage.prompt_tokens == len(expected)


def test_generation_config_option_sets_what_requests_leave_unset(client):
    unset = [client.completions.create(model=None, prompt="1, 2, 3,", extra_body={"ignore_eos": True})
             for _ in range(2)]
    assert [u.usage.completion_tokens for u in unset] == [3, 3]  # max_new_tokens
    assert unset[0].choices[0].text == unset[1].choices[0].text  # temperature 0
    greedy = client.completions.create(model=None, prompt="1, 2, 3,", max_tokens=5, temperature=0.0,
                                       extra_body={"ignore_eos": True})
    assert greedy.usage.completion_tokens == 5 and greedy.choices[0].text.startswith(unset[0].choices[0].text)


def test_chat_template_values(tmp_path):
    assert load_chat_template(TEMPLATE) == TEMPLATE  # braces: the template itself
    (tmp_path / "t.jinja").write_text(TEMPLATE)
    assert load_chat_template(str(tmp_path / "t.jinja")) == TEMPLATE
    with pytest.raises(ValueError, match="looks like a path"):
        load_chat_template(str(tmp_path / "missing.jinja"))
    with pytest.raises(ValueError, match="not valid Jinja"):
        load_chat_template("{% for m in messages %}{{ m }}")


def _request(server, method: str, path: str, headers: dict, body: dict | None = None) -> http.client.HTTPResponse:
    conn = http.client.HTTPConnection("127.0.0.1", server.port, timeout=60)
    conn.request(method, path, body=None if body is None else json.dumps(body),
                 headers={"Content-Type": "application/json", **headers})
    response = conn.getresponse()
    response.read()
    conn.close()
    return response


def test_allowed_origins_get_cors_headers(server):
    """A browser page from an allowed origin gets its preflight answered and the headers on
    every response, errors included; another origin's preflight is refused."""
    preflight = {"Access-Control-Request-Method": "POST", "Access-Control-Request-Headers": "authorization,content-type"}
    ok = _request(server, "OPTIONS", "/v1/chat/completions", {"Origin": ORIGIN, **preflight})
    assert ok.status == 200 and ok.getheader("access-control-allow-origin") == ORIGIN
    assert "POST" in ok.getheader("access-control-allow-methods")
    refused = _request(server, "OPTIONS", "/v1/chat/completions", {"Origin": "https://evil.example", **preflight})
    assert refused.status == 400 and refused.getheader("access-control-allow-origin") is None
    served = _request(server, "POST", "/v1/completions", {"Origin": ORIGIN}, {"prompt": "Hi", "max_tokens": 1})
    assert served.status == 200 and served.getheader("access-control-allow-origin") == ORIGIN
    error = _request(server, "POST", "/v1/completions", {"Origin": ORIGIN}, {"prompt": "Hi", "max_tokens": -1})
    assert error.status == 400 and error.getheader("access-control-allow-origin") == ORIGIN


def test_request_timeout_answers_504_and_frees_the_engine(server, client):
    """Past --request-timeout (from arrival): a 504 in OpenAI's shape, or, once a stream has
    started, an error event and [DONE]; the engine requests are aborted, both counted as
    timeouts, and their log lines carry the engine's times up to the abort."""
    before = server.metrics()
    long = {"max_tokens": 1600, "extra_body": {"ignore_eos": True}}

    async def main() -> tuple[openai.APIStatusError, list[str], openai.APIError]:
        aclient = openai.AsyncOpenAI(base_url=server.base_url, api_key="unused", max_retries=0, timeout=120)
        try:
            async def whole() -> openai.APIStatusError:
                with pytest.raises(openai.APIStatusError) as info:
                    await aclient.completions.create(model=None, prompt="Tell me about the sea.", **long)
                return info.value

            async def streamed() -> tuple[list[str], openai.APIError]:
                texts: list[str] = []
                with pytest.raises(openai.APIError) as info:
                    stream = await aclient.completions.create(model=None, prompt="Tell me about the sky.",
                                                              stream=True, **long)
                    async for chunk in stream:
                        texts.append(chunk.choices[0].text)
                return texts, info.value

            async def third() -> openai.APIStatusError:  # once both are in flight: over --max-pending-requests
                for _ in range(600):
                    if server.metrics()["stoke_requests_running"] == 2:
                        break
                    await asyncio.sleep(0.05)
                with pytest.raises(openai.APIStatusError) as info:
                    await aclient.completions.create(model=None, prompt="Hi", max_tokens=1)
                return info.value

            error, (texts, stream_error), overloaded = await asyncio.gather(whole(), streamed(), third())
            assert overloaded.status_code == 503 and overloaded.body["code"] == "overloaded"
            return error, texts, stream_error
        finally:
            await aclient.close()

    start = time.monotonic()
    error, texts, stream_error = asyncio.run(main())
    assert REQUEST_TIMEOUT <= time.monotonic() - start < REQUEST_TIMEOUT + 30, (error.body, stream_error)
    assert error.status_code == 504
    assert error.body == {"message": error.body["message"], "type": "timeout_error", "param": None,
                          "code": "timeout"} and "6s request timeout" in error.body["message"]
    assert texts and stream_error.body["code"] == "timeout"

    assert wait_for(lambda: idle(server), 30), server.metrics()  # nothing running or waiting, no KV in use
    after = server.metrics()
    for name, count in (('stoke_request_errors_total{type="timeout"}', 2),
                        ('stoke_request_errors_total{type="overloaded"}', 1),
                        ('stoke_requests_total{finish_reason="abort"}', 2)):
        assert after[name] - before[name] == count, name
    lines = [line for line in server.log_lines() if line["error_type"] == "timeout"]
    assert sorted(line["status"] for line in lines) == [504, 504] and {line["stream"] for line in lines} == {True, False}
    assert all(0 <= line["queue_time_s"] <= line["ttft_s"] < REQUEST_TIMEOUT <= line["e2e_s"] for line in lines), lines
    assert all(line["completion_tokens"] > 0 for line in lines)

    fresh = client.completions.create(model=None, prompt="Hi", max_tokens=2)
    assert fresh.usage.completion_tokens == 2


def test_served_model_name_is_the_model_id(client):
    assert [m.id for m in client.models.list().data] == [SERVED_NAME]
    done = client.completions.create(model=SERVED_NAME, prompt="Hi", max_tokens=1)
    assert done.model == SERVED_NAME
    with pytest.raises(openai.NotFoundError) as info:  # the directory's name is not an alias
        client.completions.create(model="SmolLM2-135M-Instruct-Q4_1", prompt="Hi", max_tokens=1)
    assert info.value.body["code"] == "model_not_found"


def test_log_request_text_logs_what_the_model_saw(server, client):
    """Each log line carries the prompt the model saw and the text it wrote: a truncated
    prompt's kept end, a token-id prompt decoded, a chat as its template rendered it."""
    from transformers import AutoTokenizer

    from engine.default_model import default_model_path

    tokenizer = AutoTokenizer.from_pretrained(default_model_path())
    text = "one two three four five six"
    ids = tokenizer.encode(text)
    requests = [
        ({"prompt": text}, text),
        ({"prompt": text, "extra_body": {"truncate_prompt_tokens": 2}}, tokenizer.decode(ids[-2:])),
        ({"prompt": ids[:3]}, tokenizer.decode(ids[:3])),
        ({"prompt": [ids[:3], ids[-2:]]}, [tokenizer.decode(ids[:3]), tokenizer.decode(ids[-2:])]),
    ]
    for kwargs, seen in requests:
        out = client.completions.create(model=None, max_tokens=2, **kwargs)
        line = [entry for entry in server.log_lines() if entry["request_id"] == out.id]
        assert len(line) == 1 and line[0]["prompt"] == seen
        written = [c.text for c in sorted(out.choices, key=lambda c: c.index)]
        assert line[0]["output"] == (written[0] if len(written) == 1 else written)
    chat = client.chat.completions.create(model=None, messages=[{"role": "user", "content": "Hi"}], max_tokens=2)
    (line,) = [entry for entry in server.log_lines() if entry["request_id"] == chat.id]
    assert line["prompt"] == "<user> Hi\n<assistant>" and line["output"] == chat.choices[0].message.content
    for bad in ([-1], [ids[0], 10 ** 9]):  # ids outside the vocabulary: the engine's 400, not the decoder's 500
        with pytest.raises(openai.BadRequestError) as info:
            client.completions.create(model=None, max_tokens=2, prompt=bad)
        assert info.value.body["param"] == "prompt" and "[0, " in info.value.body["message"]


def test_fp8_options_serve_the_offline_fp8_engines_tokens(server, client):
    """`--quantization fp8 --kv-cache-dtype fp8`: the start-up line says the weights and the KV
    blocks are in fp8 (the blocks 4x fp32's in the same 160 MiB), and a greedy completion is the
    offline engine's with quantization="fp8" and kv_cache_dtype="fp8"."""
    from engine import LLM, SamplingParams

    ready = [line for line in server.stderr().splitlines() if "engine ready:" in line]
    assert ready and " GiB in fp8 (online), max_model_len " in ready[0], ready
    # SmolLM2-135M's block of 16 tokens: K and V of 30 layers, 3 heads of 64, a byte each
    blocks = (160 << 20) // (2 * 30 * 16 * 3 * 64)
    assert f" {blocks} KV blocks of 16 tokens in float8_e4m3fn" in ready[0], ready
    info = f'stoke_cache_config_info{{block_size="16",cache_dtype="float8_e4m3fn",num_blocks="{blocks}",num_host_blocks="0"}}'
    assert server.metrics()[info] == 1
    out = client.completions.create(model=None, prompt="The capital of France is", max_tokens=6, temperature=0)
    offline = LLM(kv_cache_memory_bytes=64 << 20, quantization="fp8", kv_cache_dtype="fp8").generate(
        ["The capital of France is"], SamplingParams(max_tokens=6, temperature=0.0), use_tqdm=False)
    assert out.choices[0].text == offline[0].outputs[0].text
