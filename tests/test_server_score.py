"""`/score`, `/rerank` and `/classify` over a real server of a cross-encoder (a tiny random
sequence classifier with one label) driven by the `openai` SDK's generic `post`: scores and
probabilities are the offline `LLM.score` / `LLM.classify`'s, pairs 1:1, 1:N and N:N, a rerank's
documents best first (top_n, return_documents, Cohere's document objects), usage; what can't be
served is a 400 in OpenAI's shape that names the field, and the server goes on with nothing
queued; keys, the log line, metrics, rate limits on prompt tokens. A timeout's and a client's
leaving abort every engine request of the call: in-process, against a fake worker."""

from __future__ import annotations

import asyncio
import hashlib
import json
import logging
import math
import time
import types
from typing import Any

import openai
import pytest

from engine import LLM, PoolingParams
from engine.scoring import cross_encoder_prompt
from tests.conftest import save_tiny_classifier
from tests.server_harness import ServerProcess, idle, sdk_post, wait_for

KEY, LIMITED_KEY = "sk-score-a-0123", "sk-score-b-4567"
TOKENS_PER_MINUTE = 3000  # refills 50 a second
PROMPT_PRICE, CACHED_PRICE = 1000.0, 100.0  # per million tokens
MAX_MODEL_LEN, MAX_PROMPTS = 256, 8
TOLERANCE = 1e-5
QUERY = "What is the capital of France?"
DOCUMENTS = ["Paris is the capital of France.", "Bananas are yellow.", "France is in Europe.", "hello"]


@pytest.fixture(scope="module")
def checkpoint(tmp_path_factory: pytest.TempPathFactory) -> str:
    return save_tiny_classifier(str(tmp_path_factory.mktemp("cross-encoder")), "llama", num_labels=1)


@pytest.fixture(scope="module")
def server(checkpoint: str):
    with ServerProcess(checkpoint, "--cpu-threads", "1", "--kv-cache-memory-bytes", "16MiB",
                       "--max-model-len", str(MAX_MODEL_LEN), "--max-prompts", str(MAX_PROMPTS),
                       "--api-key", KEY, "--api-key", LIMITED_KEY, "--rate-limit-tokens", str(TOKENS_PER_MINUTE),
                       "--price-prompt", str(PROMPT_PRICE), "--price-cached-prompt", str(CACHED_PRICE)) as s:
        yield s


@pytest.fixture(scope="module")
def client(server: ServerProcess) -> openai.OpenAI:
    return server.client(KEY)


@pytest.fixture(scope="module")
def offline(checkpoint: str) -> LLM:
    return LLM(checkpoint, num_kv_blocks=64)


def scores(offline: LLM, text_1: str | list[str], text_2: str | list[str], **kwargs: Any) -> list[float]:
    return [out.outputs.score for out in offline.score(text_1, text_2, use_tqdm=False, **kwargs)]


def tokens(offline: LLM, pairs: list[tuple[str, str]]) -> int:
    """The prompt tokens of a cross-encoder's pairs: each read as one prompt."""
    tokenizer, joins = offline.get_tokenizer(), offline.engine.classifier.joins_pairs
    return sum(len(cross_encoder_prompt(tokenizer, first, second, joins)[1]) for first, second in pairs)


def _line(server: ServerProcess, request_id: str) -> dict[str, Any]:
    return wait_for(lambda: next((x for x in reversed(server.log_lines()) if x["request_id"] == request_id), None))


@pytest.mark.parametrize("path", ["/score", "/v1/score"])
@pytest.mark.parametrize("text_1, text_2", [
    (QUERY, DOCUMENTS[0]),  # 1:1
    (QUERY, DOCUMENTS),  # 1:N
    (DOCUMENTS[:2], DOCUMENTS[2:]),  # N:N
])
def test_scores_are_the_offline_cross_encoders(client, offline, path: str, text_1, text_2):
    got = sdk_post(client, path, {"text_1": text_1, "text_2": text_2})
    expected = scores(offline, text_1, text_2)
    assert [d["index"] for d in got["data"]] == list(range(len(expected)))
    assert all(d["object"] == "score" for d in got["data"])
    assert max(abs(d["score"] - e) for d, e in zip(got["data"], expected)) < TOLERANCE
    assert got["id"].startswith("score-") and got["object"] == "list" and got["model"] == client.models.list().data[0].id
    pairs = [(text_1 if isinstance(text_1, str) else text_1[i], t) for i, t in
             enumerate([text_2] if isinstance(text_2, str) else text_2)]
    n = tokens(offline, pairs)  # vLLM's UsageInfo
    usage = got["usage"]
    assert (usage["prompt_tokens"], usage["completion_tokens"], usage["total_tokens"]) == (n, 0, n)
    assert set(usage["prompt_tokens_details"]) == {"cached_tokens"}


@pytest.mark.parametrize("first, second", [("data_1", "data_2"), ("queries", "documents"), ("queries", "items")])
def test_vllms_other_names_for_the_pairs_fields(client, offline, first: str, second: str):
    """vLLM's newer /score bodies name the pairs' sides data_1 and data_2, or queries with
    documents or items: the same scores as text_1 and text_2."""
    got = sdk_post(client, "/score", {first: QUERY, second: DOCUMENTS[:2]})
    assert [d["score"] for d in got["data"]] == pytest.approx(scores(offline, QUERY, DOCUMENTS[:2]), abs=TOLERANCE)


def test_use_activation_and_truncation(client, offline):
    raw = sdk_post(client, "/score", {"text_1": QUERY, "text_2": DOCUMENTS[:2], "use_activation": False})
    logits = scores(offline, QUERY, DOCUMENTS[:2], pooling_params=PoolingParams(use_activation=False))
    assert max(abs(d["score"] - e) for d, e in zip(raw["data"], logits)) < TOLERANCE
    activated = sdk_post(client, "/score", {"text_1": QUERY, "text_2": DOCUMENTS[:2]})["data"]
    for d, logit in zip(activated, logits):  # the checkpoint names no activation: a sigmoid
        assert abs(d["score"] - 1 / (1 + math.exp(-logit))) < TOLERANCE
    cut = sdk_post(client, "/score", {"text_1": QUERY, "text_2": DOCUMENTS[:2], "truncate_prompt_tokens": 3})
    assert cut["usage"]["prompt_tokens"] == 6
    expected = scores(offline, QUERY, DOCUMENTS[:2], truncate_prompt_tokens=3)
    assert max(abs(d["score"] - e) for d, e in zip(cut["data"], expected)) < TOLERANCE


@pytest.mark.parametrize("path", ["/rerank", "/v1/rerank", "/v2/rerank"])
def test_rerank_orders_the_documents_by_score(client, offline, path: str):
    expected = scores(offline, QUERY, DOCUMENTS)
    best_first = sorted(range(len(DOCUMENTS)), key=lambda i: -expected[i])
    sent = [DOCUMENTS[0], {"text": DOCUMENTS[1]}, *DOCUMENTS[2:]]  # Cohere's objects too
    got = sdk_post(client, path, {"query": QUERY, "documents": sent})
    assert [r["index"] for r in got["results"]] == best_first
    for r in got["results"]:
        assert abs(r["relevance_score"] - expected[r["index"]]) < TOLERANCE
        assert r["document"] == {"text": DOCUMENTS[r["index"]]}
    assert got["id"].startswith("rerank-") and set(got) == {"id", "model", "usage", "results"}
    n = tokens(offline, [(QUERY, d) for d in DOCUMENTS])
    assert got["usage"] == {"prompt_tokens": n, "total_tokens": n}
    top = sdk_post(client, path, {"query": QUERY, "documents": DOCUMENTS, "top_n": 2, "return_documents": False})
    assert [r["index"] for r in top["results"]] == best_first[:2]
    assert all(set(r) == {"index", "relevance_score"} for r in top["results"])
    assert top["usage"]["prompt_tokens"] == n  # every document is scored
    everything = sdk_post(client, path, {"query": QUERY, "documents": DOCUMENTS, "top_n": 10})
    assert [r["index"] for r in everything["results"]] == best_first


def test_max_tokens_per_doc_reads_each_document_as_its_first_tokens(client, offline):
    """Cohere's max_tokens_per_doc: each document scored as the text of its first k tokens (the
    results still carry the documents as sent); a limit past every document changes nothing."""
    tokenizer = offline.get_tokenizer()
    documents = [*DOCUMENTS, "日本語の文書です。"]  # a cut inside a character keeps it whole (no U+FFFD)
    cut = [tokenizer.decode(tokenizer.encode(d, add_special_tokens=False)[:1]) for d in DOCUMENTS] + ["日"]
    assert tokenizer.decode(tokenizer.encode(documents[-1], add_special_tokens=False)[:1]) == "\ufffd"
    expected = scores(offline, QUERY, cut)
    got = sdk_post(client, "/v2/rerank", {"query": QUERY, "documents": documents, "max_tokens_per_doc": 1})
    for r in got["results"]:
        assert abs(r["relevance_score"] - expected[r["index"]]) < TOLERANCE
        assert r["document"] == {"text": documents[r["index"]]}
    assert got["usage"]["prompt_tokens"] == tokens(offline, [(QUERY, d) for d in cut])
    plain = sdk_post(client, "/v2/rerank", {"query": QUERY, "documents": DOCUMENTS})
    for limit in (4096, 0):  # past every document; 0: off, as vLLM's
        whole = sdk_post(client, "/v2/rerank", {"query": QUERY, "documents": DOCUMENTS, "max_tokens_per_doc": limit})
        assert whole == plain | {"id": whole["id"]}


def test_classify_gives_the_offline_probabilities(client, offline):
    tokenizer = offline.get_tokenizer()
    for sent in (DOCUMENTS[:3], DOCUMENTS[1], [tokenizer.encode(d) for d in DOCUMENTS[:2]]):
        got = sdk_post(client, "/classify", {"input": sent})
        expected = offline.classify(sent, use_tqdm=False)
        assert [d["index"] for d in got["data"]] == list(range(len(expected)))
        for d, e in zip(got["data"], expected):
            assert abs(d["probs"][0] - e.outputs.probs[0]) < TOLERANCE
            assert (d["label"], d["num_classes"]) == ("LABEL_0", 1)  # transformers' name for a label without one
        assert got["id"].startswith("classify-") and got["object"] == "list"
        assert got["usage"]["prompt_tokens"] == got["usage"]["total_tokens"] == sum(len(p) for p in (
            [tokenizer.encode(t) if isinstance(t, str) else t for t in ([sent] if isinstance(sent, str) else sent)]))
    logits = sdk_post(client, "/classify", {"input": DOCUMENTS[0], "use_activation": False})["data"][0]["probs"]
    expected = offline.classify(DOCUMENTS[0], PoolingParams(use_activation=False), use_tqdm=False)[0].outputs.probs
    assert abs(logits[0] - expected[0]) < TOLERANCE


@pytest.mark.parametrize("path, body, param, code", [
    ("/score", {"text_1": [], "text_2": "a"}, "text_1", "invalid_value"),
    ("/score", {"text_1": ["a", "b"], "text_2": ["c", "d", "e"]}, "text_2", "invalid_value"),  # 2:3
    ("/score", {"text_1": "", "text_2": "a"}, "text_1", "invalid_value"),
    ("/score", {"text_1": "a"}, "text_2", "missing_required_parameter"),
    ("/score", {"queries": "a"}, "documents", "missing_required_parameter"),
    ("/score", {"data_2": "a"}, "data_1", "missing_required_parameter"),
    ("/score", {}, "text_1", "missing_required_parameter"),
    ("/score", {"text_1": "a", "documents": ["b"]}, "documents", "invalid_value"),  # two namings mixed
    ("/score", {"queries": "a", "documents": ["b"], "items": ["c"]}, "items", "invalid_value"),
    ("/score", {"queries": "a", "items": [[1, 2]]}, "items", "invalid_type"),
    ("/score", {"text_1": "a", "text_2": ["b"] * (MAX_PROMPTS + 1)}, "text_2", "invalid_value"),  # --max-prompts
    ("/score", {"text_1": "a", "text_2": "b " * MAX_MODEL_LEN}, "text_2", "context_length_exceeded"),
    ("/rerank", {"query": "q" * (600 << 10), "documents": ["d"] * MAX_PROMPTS}, "query", "invalid_value"),  # 4.8 MiB
    ("/score", {"text_1": "a", "text_2": "b", "truncate_prompt_tokens": 0}, "truncate_prompt_tokens",
     "invalid_value"),
    ("/score", {"text_1": "a", "text_2": "b", "priority": 1}, "priority", "invalid_value"),  # first come, first served
    ("/rerank", {"query": "q", "documents": []}, "documents", "invalid_value"),
    ("/rerank", {"query": "q", "documents": ["a", ""]}, "documents", "invalid_value"),
    ("/rerank", {"query": "", "documents": ["a"]}, "query", "invalid_value"),
    ("/rerank", {"query": "q", "documents": [{"title": "a"}]}, "documents.0", "invalid_type"),
    ("/v2/rerank", {"query": "q", "documents": ["a"], "top_n": "many"}, "top_n", "invalid_type"),
    ("/v2/rerank", {"query": "q", "documents": ["a"], "max_tokens_per_doc": -1}, "max_tokens_per_doc", "invalid_value"),
    ("/v2/rerank", {"query": "q", "documents": ["d"] * (MAX_PROMPTS + 1), "max_tokens_per_doc": 1}, "documents",
     "invalid_value"),  # counted before the documents are tokenized
    ("/classify", {"input": []}, "input", "invalid_value"),
    ("/classify", {"input": ["a", ""]}, "input", "invalid_value"),
    ("/classify", {"input": [[5, 6], [1, 2, 10 ** 6]]}, "input", "invalid_value"),  # a token id past the vocabulary
    ("/classify", {"input": [list(range(MAX_MODEL_LEN + 1))]}, "input", "context_length_exceeded"),
    ("/v1/embeddings", {"input": "a"}, "model", "invalid_value"),  # a classifier embeds nothing
    ("/v1/completions", {"prompt": "a", "max_tokens": 2}, "model", "invalid_value"),  # nor generates
    ("/v1/chat/completions", {"messages": [{"role": "user", "content": "a"}]}, "model", "invalid_value"),
])
def test_what_cannot_be_served_is_a_400_and_the_server_goes_on(server, client, path: str, body, param, code):
    before = server.metrics()
    with pytest.raises(openai.BadRequestError) as info:
        sdk_post(client, path, body)
    error = info.value.body
    assert (error["param"], error["code"]) == (param, code), error
    if param == "model":
        assert "sequence classifier" in error["message"] and "/classify" in error["message"]
    if isinstance(body.get("text_2"), list) and len(body["text_2"]) > MAX_PROMPTS:
        assert f"at most {MAX_PROMPTS} pairs" in error["message"]
    if len(body.get("query", "")) > MAX_MODEL_LEN:  # a long query joined to every document: not tokenized
        assert "--max-body-bytes" in error["message"]
    assert wait_for(lambda: idle(server)), server.metrics()  # nothing queued, no KV block held
    after = server.metrics()
    kind = "context_length" if code == "context_length_exceeded" else "invalid_request"
    assert after[f'stoke_request_errors_total{{type="{kind}"}}'] - before[f'stoke_request_errors_total{{type="{kind}"}}'] == 1
    assert after["stoke_prompt_tokens_total"] == before["stoke_prompt_tokens_total"]
    assert len(sdk_post(client, "/score", {"text_1": "a", "text_2": "b"})["data"]) == 1


@pytest.mark.parametrize("path, body, endpoint", [
    ("/score", {"text_1": "a", "text_2": "b"}, "score"),
    ("/v2/rerank", {"query": "a", "documents": ["b"]}, "rerank"),
    ("/classify", {"input": "a"}, "classify"),
])
def test_a_wrong_key_is_a_401(server, path: str, body, endpoint: str):
    with pytest.raises(openai.AuthenticationError):
        sdk_post(server.client("wrong"), path, body)
    line = server.log_lines()[-1]
    assert (line["endpoint"], line["status"], line["error_type"]) == (endpoint, 401, "invalid_request")
    assert line["request_id"].startswith(endpoint + "-")


def test_the_log_line_metrics_and_cost(server, client, offline):
    """One line per call (no generated token: no TTFT or inter-token latency), with its
    endpoint; each pair counted as a finished request, its prompt tokens and its latency."""
    before = server.metrics()
    scored = sdk_post(client, "/score", {"text_1": QUERY, "text_2": DOCUMENTS, "user": "alice"})
    ranked = sdk_post(client, "/rerank", {"query": QUERY, "documents": DOCUMENTS[:2]})
    classified = sdk_post(client, "/classify", {"input": DOCUMENTS[:3]})
    after = server.metrics()
    line = _line(server, scored["id"])
    key = "sha256:" + hashlib.sha256(KEY.encode()).hexdigest()[:12]
    n = tokens(offline, [(QUERY, d) for d in DOCUMENTS])
    assert {k: line[k] for k in ("endpoint", "key_id", "user", "stream", "n", "prompt_tokens", "completion_tokens",
                                 "ttft_s", "mean_itl_s", "finish_reason", "error_type", "status")} == {
        "endpoint": "score", "key_id": key, "user": "alice", "stream": False, "n": 1, "prompt_tokens": n,
        "completion_tokens": 0, "ttft_s": None, "mean_itl_s": None, "finish_reason": "stop", "error_type": None,
        "status": 200}
    assert 0 <= line["queue_time_s"] <= line["e2e_s"] < 30
    assert line["cost"] == pytest.approx((n - line["cached_tokens"]) * PROMPT_PRICE / 1e6
                                         + line["cached_tokens"] * CACHED_PRICE / 1e6)
    lines = [line, _line(server, ranked["id"]), _line(server, classified["id"])]
    assert [x["endpoint"] for x in lines] == ["score", "rerank", "classify"]
    total = sum(x["prompt_tokens"] for x in lines)
    assert total == n + ranked["usage"]["prompt_tokens"] + classified["usage"]["prompt_tokens"]

    def delta(name: str) -> float:
        return after[name] - before[name]

    requests = len(DOCUMENTS) + 2 + 3  # one engine request per pair, and per input
    assert delta('stoke_requests_total{finish_reason="stop"}') == requests
    assert delta("stoke_prompt_tokens_total") == total and delta("stoke_request_prompt_tokens_sum") == total
    assert delta("stoke_e2e_request_latency_seconds_count") == delta("stoke_request_queue_time_seconds_count") \
        == requests
    for unused in ("stoke_time_to_first_token_seconds_count", "stoke_inter_token_latency_seconds_count",
                   "stoke_generation_tokens_total", "stoke_request_generation_tokens_count"):
        assert delta(unused) == 0, unused
    assert delta("stoke_cost_total") == pytest.approx(sum(x["cost"] for x in lines))


def test_rate_limits_take_the_prompt_tokens_alone(server, offline):
    client = server.client(LIMITED_KEY)  # a budget of its own
    documents = [f"{i} " + "word " * 200 for i in range(MAX_PROMPTS)]
    needs = tokens(offline, [(QUERY, d) for d in documents])
    assert TOKENS_PER_MINUTE / 2 < needs < TOKENS_PER_MINUTE - 400  # the second can't fit for 8 s or more
    assert sdk_post(client, "/rerank", {"query": QUERY, "documents": documents})["usage"]["prompt_tokens"] == needs
    with pytest.raises(openai.RateLimitError) as info:
        sdk_post(client, "/rerank", {"query": QUERY, "documents": documents})
    assert (info.value.code, info.value.type) == ("rate_limit_exceeded", "tokens")
    assert f"this request needs {needs};" in info.value.message  # its prompts' tokens, nothing more


def test_pooling_outputs_cross_the_pipe_packed():
    """A classification's probabilities and a score cross the worker's pipe as an embedding's
    vector does (float32 exactly), an aborted one's without values; metrics count each as a
    finished request with no generated token."""
    import numpy as np

    from engine.outputs import RequestMetrics
    from engine.scoring import (ClassificationOutput, ClassificationRequestOutput, ScoringOutput,
                                ScoringRequestOutput)
    from server.ipc import unpack_embedding, unpack_output
    from server.metrics import Metrics
    from server.worker import encode_output

    probs = [float(np.float32(x)) for x in (0.25, 0.7, 0.05)]
    score = float(np.float32(-3.125e-3))
    times = RequestMetrics(arrival_time=1.0, first_scheduled_time=1.25, first_token_time=1.5, finish_time=2.0)
    classified = unpack_output(json.loads(json.dumps(encode_output(ClassificationRequestOutput(
        "c-0", ClassificationOutput(probs), [1, 2, 3], metrics=times)))))
    scored = unpack_output(encode_output(ScoringRequestOutput("s-0", ScoringOutput(score), [4, 5], metrics=times)))
    aborted = unpack_output(encode_output(ScoringRequestOutput("s-1", None, [4], metrics=times)))
    assert unpack_embedding(classified["embedding"]) == probs and unpack_embedding(scored["embedding"]) == [score]
    assert aborted["embedding"] is None and classified["outputs"] == []
    assert classified["metrics"]["first_token_time"] is None
    m = Metrics(gpu=False)
    m.on_frame({"outputs": [classified, scored, aborted]})
    assert (m.requests.labels("stop")._value.get(), m.requests.labels("abort")._value.get()) == (2, 1)
    assert m.prompt_tokens._value.get() == 5 and m.generation_tokens._value.get() == 0


# ------------------------------------------------------------------ in-process, a fake worker
BODIES = {  # three engine requests each on a cross-encoder
    "score": ({"text_1": "q", "text_2": ["a", "b", "c"]}, "score_job", "ScoreRequest"),
    "rerank": ({"query": "q", "documents": ["a", "b", "c"]}, "rerank_job", "RerankRequest"),
    "classify": ({"input": ["a", "b", "c"]}, "classify_job", "ClassificationRequest"),
}


class FakeWorker:
    """The engine client a serving object talks to: it queues nothing, acks (or not) at once,
    and answers an abort with each aborted request's last output, as the worker does."""

    def __init__(self, acked: bool) -> None:
        from server.engine_client import WorkerInfo

        self.info = WorkerInfo("m", 256, 49152, 16, 16, {}, 256, 64, {}, False, ["LABEL_0"])
        self.acked = acked
        self.generation: Any = None
        self.aborted: list[str] = []

    def generate(self, request_id, prompts, params, arrival, priority, lora):
        from server.engine_client import Generation

        self.generation = Generation(self, [f"{request_id}-{i}" for i in range(len(prompts))])
        for engine_id in self.generation.ids if self.acked else ():
            self.generation._on_added(engine_id)
        return self.generation

    def abort(self, ids: list[str]) -> None:
        self.aborted.extend(ids)
        for engine_id in ids:
            self.generation._deliver(self.generation.ids.index(engine_id), {
                "id": engine_id, "finished": True, "num_prompt_tokens": 1, "num_cached_tokens": 0, "outputs": [],
                "embedding": None, "metrics": {"arrival_time": 1.0, "first_scheduled_time": None,
                                               "first_token_time": None, "finish_time": 1.2,
                                               "inter_token_latencies": [], "num_preemptions": 0}})


@pytest.fixture(scope="module")
def tokenizer(checkpoint: str) -> Any:
    import transformers

    return transformers.AutoTokenizer.from_pretrained(checkpoint)


def run_call(endpoint: str, worker: FakeWorker, tokenizer: Any, receive: Any, **config: Any) -> tuple[Any, Any]:
    """One call of the endpoint on an in-process serving object: (its response or error, the
    serving object), failed as the route fails it."""
    from server import protocol, scoring
    from server.config import ServerConfig
    from server.errors import APIError
    from server.metrics import Metrics
    from server.request_log import RequestLogger, RequestRecord
    from server.serving import OpenAIServing

    body, job_builder, request_type = BODIES[endpoint]
    serving = OpenAIServing(ServerConfig(**config), tokenizer, client=worker, metrics=Metrics(gpu=False),
                            request_logger=RequestLogger(log_text=False), model_name="m")

    async def call() -> Any:
        record = RequestRecord(f"{endpoint}-1", endpoint)
        job = await getattr(scoring, job_builder)(serving, getattr(protocol, request_type)(**body), record,
                                                  time.monotonic())
        try:
            return await serving.run(job, types.SimpleNamespace(receive=receive))
        except APIError as exc:
            serving.fail(record, exc)  # as the route does
            return exc

    return asyncio.run(call()), serving


async def _never(*_: Any) -> dict[str, Any]:
    await asyncio.Event().wait()
    return {}


async def _gone(*_: Any) -> dict[str, Any]:
    return {"type": "http.disconnect"}


@pytest.mark.parametrize("endpoint", list(BODIES))
@pytest.mark.parametrize("acked", [True, False])
def test_a_timeout_aborts_every_engine_request_of_the_call(caplog, tokenizer, endpoint: str, acked: bool):
    """Past --request-timeout (the worker's first step with the call still running where it has
    not acked it): a 504, every engine request aborted, the line written once their aborts are in."""
    worker = FakeWorker(acked)
    with caplog.at_level(logging.INFO, logger="stoke.requests"):
        error, serving = run_call(endpoint, worker, tokenizer, _never, request_timeout=0.05, price_prompt=1e6)
    assert (error.status, error.code) == (504, "timeout")
    assert worker.aborted == [f"{endpoint}-1-{i}" for i in range(3)]
    line = json.loads(caplog.records[-1].getMessage())
    assert (line["endpoint"], line["status"], line["finish_reason"], line["cost"]) == (endpoint, 504, "abort", 0.0)
    assert serving.in_flight == 0


@pytest.mark.parametrize("endpoint", list(BODIES))
@pytest.mark.parametrize("acked", [True, False])
def test_a_client_that_leaves_aborts_every_engine_request_of_the_call(caplog, tokenizer, endpoint: str,
                                                                      acked: bool):
    worker = FakeWorker(acked)
    with caplog.at_level(logging.INFO, logger="stoke.requests"):
        response, serving = run_call(endpoint, worker, tokenizer, _gone)
    assert response.status_code == 499 and worker.aborted == [f"{endpoint}-1-{i}" for i in range(3)]
    line = json.loads(caplog.records[-1].getMessage())
    assert (line["endpoint"], line["status"], line["error_type"]) == (endpoint, 499, "aborted")
    assert serving.in_flight == 0


@pytest.mark.parametrize("endpoint", list(BODIES))
def test_too_many_requests_in_flight_is_a_503_that_queues_nothing(tokenizer, endpoint: str):
    worker = FakeWorker(acked=True)
    error, _ = run_call(endpoint, worker, tokenizer, _never, max_pending_requests=0)
    assert (error.status, error.code) == (503, "overloaded") and worker.generation is None


@pytest.mark.parametrize("template_given", [True, False])
def test_chat_template_is_a_cross_encoders_score_template(tokenizer, template_given: bool):
    """vLLM's score template: with --chat-template, each pair's prompt is its rendering from the
    query and document messages (Qwen3-Reranker's format here); without it, the model's own chat
    template is not used (rerankers inherit ones that are not theirs): the pair's encoding."""
    import copy

    from engine.scoring import cross_encoder_prompt
    from server import protocol, scoring
    from server.config import ServerConfig
    from server.metrics import Metrics
    from server.request_log import RequestLogger, RequestRecord
    from server.serving import OpenAIServing
    from tests.conftest import QWEN3_RERANKER_TEMPLATE

    with open(QWEN3_RERANKER_TEMPLATE) as f:
        template = f.read()
    served_tokenizer = copy.deepcopy(tokenizer)
    served_tokenizer.chat_template = template  # as `stoke serve --chat-template` sets it
    config = ServerConfig(chat_template=QWEN3_RERANKER_TEMPLATE if template_given else None)
    serving = OpenAIServing(config, served_tokenizer, client=FakeWorker(acked=True), metrics=Metrics(gpu=False),
                            request_logger=RequestLogger(log_text=False), model_name="m")
    body = protocol.RerankRequest(query="the capital of France?", documents=["Paris", "bananas"])
    job = asyncio.run(scoring.rerank_job(serving, body, RequestRecord("rerank-1", "rerank"), time.monotonic()))
    for prompt, doc in zip(job.prompts, body.documents):
        want = cross_encoder_prompt(tokenizer, body.query, doc, False, template if template_given else None)[1]
        assert prompt == want
    assert (job.prompts[0] == tokenizer(body.query, text_pair="Paris")["input_ids"]) != template_given
    kwargs = {"instruction": "Find the city"}  # the template's variables
    body = protocol.RerankRequest(query="the capital of France?", documents=["Paris"], chat_template_kwargs=kwargs)
    job = asyncio.run(scoring.rerank_job(serving, body, RequestRecord("rerank-2", "rerank"), time.monotonic()))
    want = cross_encoder_prompt(tokenizer, body.query, "Paris", False, template if template_given else None, kwargs)
    assert job.prompts[0] == want[1] and ("Find the city" in want[0]) == template_given


def test_a_score_template_that_refuses_a_pair_is_a_400(tokenizer):
    """A template that raises for roles it does not know (as chat templates do): the template's
    message in a 400, not a 500."""
    import copy

    from server import protocol, scoring
    from server.config import ServerConfig
    from server.errors import APIError
    from server.metrics import Metrics
    from server.request_log import RequestLogger, RequestRecord
    from server.serving import OpenAIServing

    served_tokenizer = copy.deepcopy(tokenizer)
    served_tokenizer.chat_template = ("{% for m in messages %}{% if m.role not in ('user', 'assistant') %}"
                                      "{{ raise_exception('roles must be user or assistant') }}{% endif %}{% endfor %}")
    serving = OpenAIServing(ServerConfig(chat_template="mine.jinja"), served_tokenizer, client=FakeWorker(acked=True),
                            metrics=Metrics(gpu=False), request_logger=RequestLogger(log_text=False), model_name="m")
    body = protocol.RerankRequest(query="q", documents=["a", "b"])
    with pytest.raises(APIError) as info:
        asyncio.run(scoring.rerank_job(serving, body, RequestRecord("rerank-1", "rerank"), time.monotonic()))
    assert info.value.status == 400 and "roles must be user or assistant" in info.value.message
