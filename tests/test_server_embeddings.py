"""`POST /v1/embeddings` over a real server (the embedded default model) driven by the `openai`
SDK: the vectors are the offline `LLM.embed`'s, whether the SDK asks for base64 (its default)
or floats; inputs as texts or token ids come back in order with their usage; what can't be
served is a 400 in OpenAI's shape that names the field, and the server goes on with no block in
use; the request's log line, metrics, rate limits (prompt tokens only) and prices; a client that
leaves aborts its embeddings. A request timeout's abort runs in-process, against a fake worker.
The same model scores pairs (`/score`, `/rerank`) by its embeddings' cosine similarity, as a
bi-encoder."""

from __future__ import annotations

import asyncio
import base64
import hashlib
import json
import logging
import socket
import time

import numpy as np
import openai
import pytest

from engine import LLM
from tests.server_harness import ServerProcess, idle, sdk_post, wait_for

KEY, LIMITED_KEY = "sk-embed-a-0123", "sk-embed-b-4567"
TOKENS_PER_MINUTE = 6000  # refills 100 a second
PROMPT_PRICE, CACHED_PRICE = 1000.0, 100.0  # per million tokens
MAX_MODEL_LEN = 256
TEXTS = ["The sky is blue.", "Embeddings map text to vectors", "hello"]


@pytest.fixture(scope="module")
def server():
    # Steps of at most 256 tokens: an abort takes effect within one (~0.5 s on this CPU).
    with ServerProcess("--cpu-threads", "1", "--kv-cache-memory-bytes", "64MiB", "--max-model-len", str(MAX_MODEL_LEN),
                       "--max-num-batched-tokens", "256", "--api-key", KEY, "--api-key", LIMITED_KEY,
                       "--rate-limit-tokens", str(TOKENS_PER_MINUTE), "--price-prompt", str(PROMPT_PRICE),
                       "--price-cached-prompt", str(CACHED_PRICE)) as s:
        yield s


@pytest.fixture(scope="module")
def client(server) -> openai.OpenAI:
    return server.client(KEY)


@pytest.fixture(scope="module")
def model(client: openai.OpenAI) -> str:
    return client.models.list().data[0].id


@pytest.fixture(scope="module")
def offline(default_model_dir: str) -> LLM:
    return LLM(default_model_dir, num_kv_blocks=64)


def _offline(offline: LLM, prompts: list) -> list[np.ndarray]:
    return [np.array(out.outputs.embedding) for out in offline.embed(prompts, use_tqdm=False)]


def _line(server: ServerProcess, request_id: str) -> dict:
    return next(line for line in reversed(server.log_lines()) if line["request_id"] == request_id)


def test_base64_and_floats_are_the_offline_vectors(server, client, model, offline):
    expected = _offline(offline, TEXTS[:1])[0]
    default = client.embeddings.create(model=model, input=TEXTS[0])  # the SDK asks for base64, decodes it
    floats = client.embeddings.create(model=model, input=TEXTS[0], encoding_format="float")
    raw = client.embeddings.with_raw_response.create(model=model, input=TEXTS[0], encoding_format="base64")
    sent = json.loads(raw.text)["data"][0]["embedding"]
    assert isinstance(sent, str)  # OpenAI's base64: little-endian float32
    assert np.frombuffer(base64.b64decode(sent), dtype="<f4").tolist() == floats.data[0].embedding
    for got in (default, floats):
        vector = np.array(got.data[0].embedding)
        assert vector.shape == expected.shape and np.abs(vector - expected).max() < 1e-5
        assert abs(np.linalg.norm(vector) - 1.0) < 1e-5
        assert got.id.startswith("embd-") and got.model == model and got.object == "list"
        assert got.data[0].object == "embedding" and got.data[0].index == 0
    assert default.data[0].embedding == floats.data[0].embedding  # float32 both ways, exactly


def test_inputs_come_back_in_order_with_their_usage(client, model, offline):
    tokenizer = offline.get_tokenizer()
    ids = [tokenizer.encode(text) for text in TEXTS]
    expected = _offline(offline, TEXTS)
    for sent in (TEXTS, ids):
        got = client.embeddings.create(model=model, input=sent, encoding_format="float")
        assert [d.index for d in got.data] == [0, 1, 2]
        for d, vector in zip(got.data, expected):
            assert np.abs(np.array(d.embedding) - vector).max() < 1e-5
        assert got.usage.prompt_tokens == got.usage.total_tokens == sum(map(len, ids))
    many = [[5 + i, 6] for i in range(16)]  # 16 x 576 floats: rendered off the event loop
    floats = client.embeddings.create(model=model, input=many, encoding_format="float")
    assert [d.embedding for d in floats.data] == [d.embedding for d in client.embeddings.create(model=model,
                                                                                                  input=many).data]
    one = client.embeddings.create(model=model, input=ids[1])  # one prompt's token ids
    assert len(one.data) == 1 and np.abs(np.array(one.data[0].embedding) - expected[1]).max() < 1e-5
    assert one.usage.prompt_tokens == len(ids[1])


def test_truncate_and_add_special_tokens(client, model, offline):
    tokenizer = offline.get_tokenizer()
    ids = tokenizer.encode(TEXTS[1])
    cut = client.embeddings.create(model=model, input=TEXTS[1], encoding_format="float",
                                   extra_body={"truncate_prompt_tokens": 3})
    assert cut.usage.prompt_tokens == 3
    assert np.abs(np.array(cut.data[0].embedding) - _offline(offline, [ids[-3:]])[0]).max() < 1e-5
    plain = client.embeddings.create(model=model, input=TEXTS[1], extra_body={"add_special_tokens": False,
                                                                              "normalize": False})
    assert plain.usage.prompt_tokens == len(tokenizer.encode(TEXTS[1], add_special_tokens=False))
    assert np.linalg.norm(plain.data[0].embedding) > 1.5  # the last hidden state itself


@pytest.mark.parametrize("kwargs, param, code", [
    ({"input": "hi", "dimensions": 8}, "dimensions", "invalid_value"),  # not a Matryoshka model
    ({"input": ""}, "input", "invalid_value"),
    ({"input": []}, "input", "invalid_value"),
    ({"input": ["hi", ""]}, "input", "invalid_value"),
    ({"input": [[5, 6], [1, 2, 10 ** 6]]}, "input", "invalid_value"),  # a token id past the vocabulary
    ({"input": [[5, 6], list(range(MAX_MODEL_LEN + 1))]}, "input", "context_length_exceeded"),
    ({"input": [[5]] * 1025}, "input", "invalid_value"),  # past --max-prompts (1,024)
    ({"input": "hi", "encoding_format": "bf16"}, "encoding_format", "invalid_type"),
    ({"input": "hi", "extra_body": {"priority": 1}}, "priority", "invalid_value"),  # first come, first served
])
def test_what_cannot_be_served_is_a_400_and_the_server_goes_on(server, client, model, kwargs, param, code):
    before = server.metrics()
    with pytest.raises(openai.BadRequestError) as info:
        client.embeddings.create(model=model, **kwargs)
    error = info.value.body
    assert (error["param"], error["code"]) == (param, code), error
    if param == "dimensions":
        assert "Matryoshka" in error["message"]  # the engine's reason
    assert wait_for(lambda: idle(server)), server.metrics()  # nothing queued, no KV block held
    after = server.metrics()
    kind = "context_length" if code == "context_length_exceeded" else "invalid_request"
    assert after[f'stoke_request_errors_total{{type="{kind}"}}'] - before[f'stoke_request_errors_total{{type="{kind}"}}'] == 1
    assert after["stoke_prompt_tokens_total"] == before["stoke_prompt_tokens_total"]
    assert client.embeddings.create(model=model, input=[[5, 6]]).usage.prompt_tokens == 2


QUERY = "Where is the Eiffel Tower?"
DOCUMENTS = ["The Eiffel Tower is in Paris.", "Bananas are yellow.", "Paris is in France."]


def test_a_bi_encoder_scores_pairs_by_cosine_similarity(server, client, offline):
    """Scores are the offline LLM.score's (its embeddings' cosine similarity), 1:N and N:N; a
    rerank's documents best first. Each distinct text is embedded once (a 1:N request's one
    text too): the engine requests that usage, the log line and metrics count."""
    tokenizer = offline.get_tokenizer()
    for text_1, text_2 in ((DOCUMENTS[:2], [QUERY, DOCUMENTS[2]]), (QUERY, DOCUMENTS)):
        got = sdk_post(client, "/score", {"text_1": text_1, "text_2": text_2})
        expected = [out.outputs.score for out in offline.score(text_1, text_2, use_tqdm=False)]
        assert [d["index"] for d in got["data"]] == [0, 1, 2][:len(expected)]
        assert max(abs(d["score"] - e) for d, e in zip(got["data"], expected)) < 1e-5
        texts = {text_1} | set(text_2) if isinstance(text_1, str) else set(text_1) | set(text_2)
        assert got["usage"]["prompt_tokens"] == sum(len(tokenizer.encode(t)) for t in texts)
    before = server.metrics()
    ranked = sdk_post(client, "/rerank", {"query": QUERY, "documents": [*DOCUMENTS, DOCUMENTS[0]], "top_n": 3})
    after = server.metrics()
    sent = expected + expected[:1]  # one text, one embedding, the same score: ties keep document order
    assert [r["index"] for r in ranked["results"]] == sorted(range(len(sent)), key=lambda i: -sent[i])[:3]
    for r in ranked["results"]:
        assert abs(r["relevance_score"] - expected[r["index"] % len(DOCUMENTS)]) < 1e-5
        assert r["document"]["text"] == DOCUMENTS[r["index"] % len(DOCUMENTS)]
    embedded = sum(len(tokenizer.encode(t)) for t in [QUERY, *DOCUMENTS])  # the repeated document once
    assert ranked["usage"] == {"prompt_tokens": embedded, "total_tokens": embedded}
    assert after['stoke_requests_total{finish_reason="stop"}'] - before['stoke_requests_total{finish_reason="stop"}'] == 4
    line = _line(server, ranked["id"])
    assert (line["endpoint"], line["prompt_tokens"], line["completion_tokens"]) == ("rerank", embedded, 0)


@pytest.mark.parametrize("path, body, param", [
    ("/classify", {"input": "hi"}, "model"),  # not a sequence classifier
    ("/score", {"text_1": "a", "text_2": "b", "use_activation": False}, "use_activation"),  # a cross-encoder's
    ("/rerank", {"query": "a", "documents": [str(i) for i in range(1024)]}, "documents"),  # 1,025 past --max-prompts
])
def test_what_a_bi_encoder_cannot_do_is_a_400(server, client, path: str, body, param: str):
    with pytest.raises(openai.BadRequestError) as info:
        sdk_post(client, path, body)
    assert info.value.body["param"] == param, info.value.body
    if param == "documents":
        assert "at most 1024 distinct texts (each embedded once)" in info.value.body["message"]
    assert wait_for(lambda: idle(server)), server.metrics()
    # 1,024 documents of one text: two texts to embed, well within --max-prompts
    assert sdk_post(client, "/rerank", {"query": "a", "documents": ["b"] * 1024})["usage"]["prompt_tokens"] == 2


def test_a_wrong_key_is_a_401(server, model):
    with pytest.raises(openai.AuthenticationError):
        server.client("wrong").embeddings.create(model=model, input="hi")
    line = server.log_lines()[-1]
    assert (line["endpoint"], line["status"], line["error_type"]) == ("embeddings", 401, "invalid_request")


def test_the_log_line_metrics_and_cost(server, client, model):
    """One line per request (no generated token: no TTFT or inter-token latency); each input
    counted as a finished request, its prompt tokens and its latency; prefix-cache hits at the
    cached prompt price."""
    before = server.metrics()
    long = list(range(100, 160))  # 60 tokens: three full blocks to find again
    first = client.embeddings.create(model=model, input=[long, [7, 8, 9]], user="alice")
    again = client.embeddings.create(model=model, input=[long])
    after = server.metrics()
    line = _line(server, first.id)
    key = "sha256:" + hashlib.sha256(KEY.encode()).hexdigest()[:12]
    assert {k: line[k] for k in ("endpoint", "model", "key_id", "user", "stream", "n", "prompt_tokens",
                                 "completion_tokens", "ttft_s", "mean_itl_s", "finish_reason", "error_type",
                                 "status")} == {
        "endpoint": "embeddings", "model": model, "key_id": key, "user": "alice", "stream": False, "n": 1,
        "prompt_tokens": 63, "completion_tokens": 0, "ttft_s": None, "mean_itl_s": None, "finish_reason": "stop",
        "error_type": None, "status": 200}
    assert 0 <= line["queue_time_s"] <= line["e2e_s"] < 30
    assert line["cost"] == pytest.approx((63 - line["cached_tokens"]) * PROMPT_PRICE / 1e6
                                         + line["cached_tokens"] * CACHED_PRICE / 1e6)
    hit = _line(server, again.id)
    assert hit["cached_tokens"] == 48 and hit["cost"] == pytest.approx((12 * PROMPT_PRICE + 48 * CACHED_PRICE) / 1e6)

    def delta(name: str) -> float:
        return after[name] - before[name]

    assert delta('stoke_requests_total{finish_reason="stop"}') == 3
    assert delta("stoke_prompt_tokens_total") == 123 and delta("stoke_request_prompt_tokens_sum") == 123
    assert delta("stoke_e2e_request_latency_seconds_count") == delta("stoke_request_queue_time_seconds_count") == 3
    for unused in ("stoke_time_to_first_token_seconds_count", "stoke_inter_token_latency_seconds_count",
                   "stoke_generation_tokens_total", "stoke_request_generation_tokens_count"):
        assert delta(unused) == 0, unused
    assert delta("stoke_cost_total") == pytest.approx(line["cost"] + hit["cost"])


def test_rate_limits_take_the_prompt_tokens_alone(server, model):
    client = server.client(LIMITED_KEY)  # a budget of its own
    start = time.monotonic()
    raw = client.embeddings.with_raw_response.create(model=model, input=[[5] * 250] * 4)  # 1,000 tokens
    refill = (time.monotonic() - start + 1) * TOKENS_PER_MINUTE / 60
    assert raw.headers["x-ratelimit-limit-tokens"] == str(TOKENS_PER_MINUTE)
    remaining = int(raw.headers["x-ratelimit-remaining-tokens"])
    assert TOKENS_PER_MINUTE - 1000 <= remaining <= TOKENS_PER_MINUTE - 1000 + refill
    inputs = (remaining + 300) // 250 + 1  # more than the bucket holds for 3 s more
    with pytest.raises(openai.RateLimitError) as info:
        client.embeddings.create(model=model, input=[[5] * 250] * inputs)
    error = info.value
    assert (error.code, error.type) == ("rate_limit_exceeded", "tokens")
    assert f"this request needs {inputs * 250};" in error.message  # its prompts' tokens, nothing more


def test_a_client_that_leaves_aborts_its_embeddings(server):
    before = server.metrics()
    inputs = [[(i * 7 + j) % 1000 + 10 for j in range(250)] for i in range(12)]  # seconds of work
    body = json.dumps({"input": inputs}).encode()
    sock = socket.create_connection(("127.0.0.1", server.port))
    sock.sendall(b"POST /v1/embeddings HTTP/1.1\r\nHost: x\r\nContent-Type: application/json\r\n"
                 b"Authorization: Bearer %s\r\nContent-Length: %d\r\n\r\n%s" % (KEY.encode(), len(body), body))
    assert wait_for(lambda: server.metrics()["stoke_requests_waiting"] >= 1, 30)  # one a step: the others wait
    sock.close()
    assert wait_for(lambda: idle(server), 30), server.metrics()
    after = server.metrics()
    assert after['stoke_request_errors_total{type="aborted"}'] - before['stoke_request_errors_total{type="aborted"}'] == 1
    aborted = after['stoke_requests_total{finish_reason="abort"}'] - before['stoke_requests_total{finish_reason="abort"}']
    embedded = after['stoke_requests_total{finish_reason="stop"}'] - before['stoke_requests_total{finish_reason="stop"}']
    assert aborted >= 1 and aborted + embedded == 12
    line = wait_for(lambda: next((x for x in reversed(server.log_lines()) if x["status"] == 499), None), 10)
    assert line["endpoint"] == "embeddings" and "abort" in line["finish_reason"] and line["completion_tokens"] == 0


@pytest.mark.parametrize("acked", [True, False])
def test_a_timed_out_embedding_is_aborted_and_logged(caplog, acked: bool):
    """Past --request-timeout: a 504, the engine request aborted, and the line written once the
    worker's abort output (no vector) is in; queued all its life, it costs nothing. Not acked:
    the worker's first step with it is still running (a long prompt on the CPU), and the
    deadline holds there too."""
    import types

    from server.config import ServerConfig
    from server.embeddings import embedding_job
    from server.engine_client import Generation, WorkerInfo
    from server.errors import APIError
    from server.metrics import Metrics
    from server.protocol import EmbeddingRequest
    from server.request_log import RequestLogger, RequestRecord
    from server.serving import OpenAIServing

    aborted: list[str] = []

    def generate(request_id, prompts, params, arrival, priority, lora):
        assert params == {"pooling": {"dimensions": None, "normalize": None}}
        client.generation = Generation(client, [f"{request_id}-{i}" for i in range(len(prompts))])
        for engine_id in client.generation.ids if acked else ():
            client.generation._on_added(engine_id)
        return client.generation

    def abort(ids):
        aborted.extend(ids)
        for i, engine_id in enumerate(ids):
            client.generation._deliver(i, {
                "id": engine_id, "finished": True, "num_prompt_tokens": 3, "num_cached_tokens": 0, "outputs": [],
                "embedding": None, "metrics": {"arrival_time": 1.0, "first_scheduled_time": None,
                                               "first_token_time": None, "finish_time": 1.2,
                                               "inter_token_latencies": [], "num_preemptions": 0}})

    client = types.SimpleNamespace(info=WorkerInfo("m", 256, 1000, 16, 16, {}, 256, 64, {}), generate=generate,
                                   abort=abort)
    metrics = Metrics(gpu=False)
    serving = OpenAIServing(ServerConfig(request_timeout=0.05, price_prompt=1e6), None, client=client,
                            metrics=metrics, request_logger=RequestLogger(log_text=False), model_name="m")

    async def never(*_):
        await asyncio.Event().wait()

    async def run() -> APIError:
        record = RequestRecord("embd-1", "embeddings")
        job = await embedding_job(serving, EmbeddingRequest(input=[1, 2, 3]), record, time.monotonic())
        with pytest.raises(APIError) as info:
            await serving.run(job, types.SimpleNamespace(receive=never))
        serving.fail(record, info.value)  # as the route does
        return info.value

    with caplog.at_level(logging.INFO, logger="stoke.requests"):
        error = asyncio.run(run())
    assert (error.status, error.code) == (504, "timeout") and aborted == ["embd-1-0"]
    line = json.loads(caplog.records[-1].getMessage())
    assert (line["status"], line["error_type"], line["finish_reason"]) == (504, "timeout", "abort")
    assert line["cost"] == 0.0 and line["queue_time_s"] == line["e2e_s"] == pytest.approx(0.2)
    assert metrics.errors.labels("timeout")._value.get() == 1
    assert serving.in_flight == 0


def test_an_embeddings_frame_round_trip():
    """The worker's output for an embedding: its vector packed (float32 exactly), no samples, no
    first-token time; an aborted one's has no vector. Metrics count each as a finished request
    (stop or abort) and its prompt, with no generated token or token latency."""
    from engine.outputs import RequestMetrics
    from engine.pooling import EmbeddingOutput, EmbeddingRequestOutput
    from server.ipc import unpack_embedding, unpack_output
    from server.metrics import Metrics
    from server.worker import encode_output

    vector = [float(np.float32(x)) for x in (0.1, -2.5, 3e-8, 1.0)]
    times = RequestMetrics(arrival_time=1.0, first_scheduled_time=1.25, first_token_time=1.5, finish_time=2.0)
    done = unpack_output(json.loads(json.dumps(encode_output(EmbeddingRequestOutput(
        "e-0", EmbeddingOutput(vector), [1, 2, 3], num_cached_tokens=2, metrics=times)))))
    assert unpack_embedding(done["embedding"]) == vector and done["outputs"] == []
    assert (done["finished"], done["num_prompt_tokens"], done["num_cached_tokens"]) == (True, 3, 2)
    assert done["metrics"]["first_token_time"] is None and done["metrics"]["inter_token_latencies"] == []
    aborted = unpack_output(encode_output(EmbeddingRequestOutput("e-1", None, [1, 2], metrics=times)))
    assert aborted["embedding"] is None
    m = Metrics(gpu=False)
    m.on_frame({"outputs": [done, aborted]})
    assert (m.requests.labels("stop")._value.get(), m.requests.labels("abort")._value.get()) == (1, 1)
    assert m.prompt_tokens._value.get() == 3 and m.generation_tokens._value.get() == 0
    text = m.render()[0].decode()
    for line in ("stoke_e2e_request_latency_seconds_count 1.0", "stoke_request_queue_time_seconds_sum 0.25",
                 "stoke_time_to_first_token_seconds_count 0.0", "stoke_request_prompt_tokens_count 2.0",
                 "stoke_request_generation_tokens_count 0.0"):
        assert line in text, line


def test_pooler_config_option():
    """`--pooler-config` (vLLM's flag) is a JSON object, passed to the engine as it is."""
    import argparse

    from server.launch import build_parser, config_from_args, json_object

    args = build_parser().parse_args(["--pooler-config", '{"pooling_type": "MEAN", "normalize": true}'])
    assert config_from_args(args).engine_args["pooler_config"] == {"pooling_type": "MEAN", "normalize": True}
    assert config_from_args(build_parser().parse_args([])).engine_args["pooler_config"] is None
    for bad in ("MEAN", "[1]", "{"):
        with pytest.raises(argparse.ArgumentTypeError):
            json_object(bad)


def test_a_drain_cut_off_before_the_first_step_ended_is_a_503():
    """The drain timeout cuts off a request whose first step has not ended (the worker has not
    acked it): a 503 shutting down, as for any request it cuts off, not a 500."""
    import types

    from server.config import ServerConfig
    from server.embeddings import embedding_job
    from server.engine_client import Generation, WorkerInfo
    from server.errors import APIError
    from server.metrics import Metrics
    from server.protocol import EmbeddingRequest
    from server.request_log import RequestLogger, RequestRecord
    from server.serving import OpenAIServing

    def generate(request_id, prompts, params, arrival, priority, lora):
        return Generation(client, [f"{request_id}-{i}" for i in range(len(prompts))])

    client = types.SimpleNamespace(info=WorkerInfo("m", 256, 1000, 16, 16, {}, 256, 64, {}), generate=generate,
                                   abort=lambda ids: None)
    serving = OpenAIServing(ServerConfig(), None, client=client, metrics=Metrics(gpu=False),
                            request_logger=RequestLogger(log_text=False), model_name="m")

    async def never(*_):
        await asyncio.Event().wait()

    async def run() -> APIError:
        job = await embedding_job(serving, EmbeddingRequest(input=[1, 2, 3]), RequestRecord("embd-2", "embeddings"),
                                  time.monotonic())
        running = asyncio.ensure_future(serving.run(job, types.SimpleNamespace(receive=never)))
        await asyncio.sleep(0.05)
        serving.cut_off()
        with pytest.raises(APIError) as info:
            await running
        return info.value

    error = asyncio.run(run())
    assert (error.status, error.code) == (503, "shutting_down")
    assert serving.in_flight == 0


def test_chat_form_embeddings_embed_the_rendered_conversation(client, model, offline):
    """vLLM's chat-form embeddings: `messages` rendered by the model's chat template (no
    generation prompt unless asked; no special tokens added: the template writes them) and
    embedded as one prompt. Either input or messages, not both nor neither."""
    tokenizer = offline.get_tokenizer()
    messages = [{"role": "system", "content": "Represent this query for retrieval."},
                {"role": "user", "content": "What is the capital of France?"}]
    for extra in ({}, {"add_generation_prompt": True}):
        text = tokenizer.apply_chat_template(messages, tokenize=False, **extra)
        got = sdk_post(client, "/v1/embeddings", {"model": model, "messages": messages, **extra})
        (want,) = _offline(offline, [tokenizer.encode(text, add_special_tokens=False)])
        assert np.abs(np.array(got["data"][0]["embedding"]) - want).max() < 1e-5
        assert got["usage"]["prompt_tokens"] == len(tokenizer.encode(text, add_special_tokens=False))
    for body, param in (({"input": "a", "messages": messages}, "input"), ({}, "input"),
                        ({"messages": []}, "messages")):
        with pytest.raises(openai.BadRequestError) as info:
            sdk_post(client, "/v1/embeddings", {"model": model, **body})
        assert info.value.body["param"] == param, info.value.body
