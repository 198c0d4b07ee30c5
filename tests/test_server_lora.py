"""LoRA adapters over HTTP (vLLM's --enable-lora --lora-modules) on a real server (embedded default
model) driven by the `openai` SDK: /v1/models lists each adapter with its root and parent; a
request naming an adapter gets exactly the offline engine's tokens with the same LoRARequest
(completions and chat, whole and streamed, alone and among requests for the other adapter and
the base model, with one device slot so that the adapters take turns); the per-adapter gauges
of /metrics; bad input with an adapter is a 400 that leaves the server serving; the request
log names the adapter; vLLM's /v1/load_lora_adapter and /v1/unload_lora_adapter."""

from __future__ import annotations

import http.client
import json
import os
import threading
from concurrent.futures import ThreadPoolExecutor

import openai
import pytest
import torch
from prometheus_client.parser import text_string_to_metric_families

from tests.lora_adapters import save_adapter
from tests.server_harness import ServerProcess, idle, wait_for

PROMPT = "Once upon a time"
MESSAGES = [{"role": "user", "content": "Name three colors."}]
MAX_TOKENS = 5
# name → save_adapter's arguments: small random adapters (a change the model still answers text with)
ADAPTERS = {
    "qv": dict(rank=4, modules=["q_proj", "v_proj"], seed=1, scale=0.06),
    "mlp": dict(rank=4, modules=["down_proj"], seed=2, scale=0.06),
    "late": dict(rank=2, modules=["o_proj", "up_proj"], seed=3, scale=0.08),  # loaded at runtime
}
BASE = "SmolLM2-135M-Instruct-Q4_1"


@pytest.fixture(scope="module")
def adapter_dirs(default_model_dir: str, tmp_path_factory: pytest.TempPathFactory) -> dict[str, str]:
    root = tmp_path_factory.mktemp("server-lora")
    return {name: save_adapter(str(root / name), default_model_dir, **spec) for name, spec in ADAPTERS.items()}


@pytest.fixture(scope="module")
def setup(default_model_dir: str, adapter_dirs: dict[str, str]):
    """(the server, the offline answers): the server boots while the offline engine (the same
    adapters, the ids of their places in --lora-modules) computes each model's answers."""
    from engine import LLM, LoRARequest, SamplingParams

    qv, mlp = adapter_dirs["qv"], adapter_dirs["mlp"]
    server = ServerProcess("--kv-cache-memory-bytes", "64MiB", "--cpu-threads", "1", "--enable-lora",
                           "--lora-modules", f"qv={qv}", json.dumps({"name": "mlp", "path": mlp}),
                           "--max-loras", "1", "--max-lora-rank", "4", "--allow-runtime-lora-updating")
    started: list[BaseException | None] = []

    def start() -> None:
        try:
            server.start()
            started.append(None)
        except BaseException as exc:  # noqa: BLE001 - re-raised in the test process
            started.append(exc)

    booting = threading.Thread(target=start)
    booting.start()
    # One thread, as the server's worker (--cpu-threads 1): two OpenMP threads on two cores shared
    # with the booting server spin-wait for each other (a step took seconds, not milliseconds).
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        try:
            llm = LLM(default_model_dir, enable_lora=True, max_loras=1, max_lora_rank=4,
                      kv_cache_memory_bytes=32 << 20)
            loras = [None, LoRARequest("qv", 1, qv), LoRARequest("mlp", 2, mlp),
                     LoRARequest("late", 3, adapter_dirs["late"])]
            params = SamplingParams(max_tokens=MAX_TOKENS, temperature=0.0)
            completions = llm.generate([PROMPT] * 4, params, lora_request=loras, use_tqdm=False)
            chats = llm.chat([MESSAGES] * 4, params, lora_request=loras, use_tqdm=False)
            del llm
        finally:
            torch.set_num_threads(threads)
            booting.join()
        if started[0] is not None:
            raise started[0]
        expected = {(kind, model): out.outputs[0] for kind, outs in (("completion", completions), ("chat", chats))
                    for model, out in zip((BASE, "qv", "mlp", "late"), outs)}
        expected["prompt_tokens"] = len(completions[0].prompt_token_ids)
        yield server, expected
        server.stop()
    finally:
        server.close()


@pytest.fixture(scope="module")
def server(setup) -> ServerProcess:
    return setup[0]


@pytest.fixture(scope="module")
def expected(setup) -> dict:
    return setup[1]


def lora_gauges(server: ServerProcess) -> dict[tuple[str, str], float]:
    """(running or waiting, adapter) → the gauge's value, from /metrics parsed as Prometheus does."""
    status, body = server.get("/metrics")
    assert status == 200
    gauges = {}
    for family in text_string_to_metric_families(body.decode()):
        for state in ("running", "waiting"):
            if family.name == f"stoke_lora_requests_{state}":
                assert family.type == "gauge"
                for sample in family.samples:
                    gauges[state, sample.labels["adapter"]] = sample.value
    return gauges


def post(server: ServerProcess, path: str, body: dict) -> tuple[int, dict]:
    conn = http.client.HTTPConnection("127.0.0.1", server.port, timeout=60)
    try:
        conn.request("POST", path, body=json.dumps(body).encode(), headers={"Content-Type": "application/json"})
        response = conn.getresponse()
        return response.status, json.loads(response.read())
    finally:
        conn.close()


def complete(client: openai.OpenAI, model: str, **kwargs):
    return client.completions.create(model=model, prompt=PROMPT, max_tokens=MAX_TOKENS, temperature=0, **kwargs)


def chat(client: openai.OpenAI, model: str, **kwargs):
    return client.chat.completions.create(model=model, messages=MESSAGES, max_tokens=MAX_TOKENS, temperature=0,
                                          **kwargs)


def test_models_lists_the_base_model_and_each_adapter(server, adapter_dirs):
    client = server.client()
    cards = {card.id: card for card in client.models.list().data}
    assert list(cards) == [BASE, "qv", "mlp"]
    assert cards[BASE].model_extra["parent"] is None
    for name in ("qv", "mlp"):
        assert cards[name].model_extra["parent"] == BASE and cards[name].model_extra["root"] == adapter_dirs[name]
        assert cards[name].owned_by == "stoke" and cards[name].object == "model"
        assert cards[name].model_extra["max_model_len"] == cards[BASE].model_extra["max_model_len"]
        one = client.models.retrieve(name)
        assert (one.id, one.model_extra["parent"], one.model_extra["root"]) == (name, BASE, adapter_dirs[name])
    status, body = server.get("/v1/models/mlp")
    card = json.loads(body)
    assert status == 200 and (card["id"], card["parent"], card["root"]) == ("mlp", BASE, adapter_dirs["mlp"])
    # a model that is neither: OpenAI's 404, from the SDK and raw
    with pytest.raises(openai.NotFoundError) as info:
        client.models.retrieve("qv2")
    assert info.value.body["code"] == "model_not_found"
    status, body = server.get("/v1/models/nope")
    assert status == 404
    error = json.loads(body)["error"]
    assert set(error) == {"message", "type", "param", "code"} and error["code"] == "model_not_found"
    assert "nope" in error["message"]
    with pytest.raises(openai.NotFoundError) as info:
        complete(client, "qv-not-served")
    assert info.value.body["code"] == "model_not_found"
    # /tokenize takes an adapter as the model too (the base model's tokenizer)
    status, body = post(server, "/tokenize", {"model": "qv", "prompt": PROMPT})
    assert status == 200, body
    assert body["tokens"] == post(server, "/tokenize", {"model": BASE, "prompt": PROMPT})[1]["tokens"]
    assert post(server, "/tokenize", {"model": "nope", "prompt": PROMPT})[0] == 404


def test_idle_gauges_are_zero_for_each_adapter(server):
    assert wait_for(lambda: idle(server), 30), server.metrics()
    assert lora_gauges(server) == {(state, name): 0.0 for state in ("running", "waiting") for name in ("qv", "mlp")}


@pytest.mark.parametrize("name", ["qv", "mlp"])
def test_an_adapter_answers_as_the_offline_engine_with_its_lora_request(server, expected, name):
    client = server.client()
    want, want_chat = expected["completion", name], expected["chat", name]
    out = complete(client, name, logprobs=1)
    choice = out.choices[0]
    assert out.model == name and choice.text == want.text
    assert choice.logprobs.tokens and "".join(choice.logprobs.tokens) == want.text
    assert out.usage.completion_tokens == len(choice.logprobs.tokens) == len(want.token_ids) == MAX_TOKENS
    assert out.usage.prompt_tokens == expected["prompt_tokens"]
    said = chat(client, name, logprobs=True)
    assert said.model == name and said.choices[0].message.content == want_chat.text
    assert said.usage.completion_tokens == len(said.choices[0].logprobs.content) == len(want_chat.token_ids)
    # not the base model's answer
    assert want.token_ids != expected["completion", BASE].token_ids
    assert want_chat.token_ids != expected["chat", BASE].token_ids
    base = complete(client, BASE)
    assert base.model == BASE and base.choices[0].text == expected["completion", BASE].text != choice.text
    # streamed: the deltas join to the same text, the usage chunk counts its tokens
    chunks = list(complete(client, name, stream=True, stream_options={"include_usage": True}))
    assert {c.model for c in chunks} == {name}
    assert "".join(c.choices[0].text for c in chunks if c.choices) == want.text
    assert chunks[-1].usage.completion_tokens == len(want.token_ids)
    chunks = list(chat(client, name, stream=True, stream_options={"include_usage": True}))
    assert {c.model for c in chunks} == {name}
    assert "".join(c.choices[0].delta.content or "" for c in chunks if c.choices) == want_chat.text
    assert chunks[-1].usage.completion_tokens == len(want_chat.token_ids)
    assert wait_for(lambda: idle(server), 30), server.metrics()


def test_requests_for_both_adapters_and_the_base_at_once(server, expected):
    """Six at once, two per model; one device slot: the adapters take turns, each answer is its
    own model's."""
    client = server.client()
    jobs = [(kind, model) for model in ("qv", "mlp", BASE) for kind in ("completion", "chat")]

    def run(job):
        kind, model = job
        if kind == "completion":
            out = complete(client, model)
            return out.model, out.choices[0].text, out.usage.completion_tokens
        out = chat(client, model)
        return out.model, out.choices[0].message.content, out.usage.completion_tokens

    with ThreadPoolExecutor(len(jobs)) as pool:
        answers = list(pool.map(run, jobs))
    for (kind, model), answer in zip(jobs, answers):
        want = expected[kind, model]
        assert answer == (model, want.text, len(want.token_ids)), (kind, model)
    assert wait_for(lambda: idle(server), 30), server.metrics()
    assert set(lora_gauges(server).values()) == {0.0}


def test_a_second_adapter_waits_for_the_slot_and_the_base_does_not(server, expected):
    """With --max-loras 1, a request for `mlp` waits while one for `qv` runs (the gauges say so),
    a base-model request runs beside it, and `mlp`'s runs once `qv`'s is cut short."""
    client = server.client()
    stream = client.completions.create(model="qv", prompt=PROMPT, max_tokens=400, temperature=0, stream=True,
                                       extra_body={"ignore_eos": True})
    try:
        first = next(iter(stream))
        assert first.model == "qv"
        with ThreadPoolExecutor(1) as pool:
            waiting = pool.submit(complete, client, "mlp")
            assert wait_for(lambda: lora_gauges(server) == {("running", "qv"): 1.0, ("waiting", "qv"): 0.0,
                                                            ("running", "mlp"): 0.0, ("waiting", "mlp"): 1.0},
                            30), lora_gauges(server)
            base = complete(client, BASE)  # the base model is never held up by the adapters
            assert base.choices[0].text == expected["completion", BASE].text
            assert not waiting.done() and lora_gauges(server)["waiting", "mlp"] == 1.0
            stream.close()  # the client leaves: qv's request is aborted and its slot freed
            out = waiting.result(timeout=60)
    finally:
        stream.close()
    assert out.model == "mlp" and out.choices[0].text == expected["completion", "mlp"].text
    assert wait_for(lambda: idle(server), 30), server.metrics()
    assert set(lora_gauges(server).values()) == {0.0}


def test_a_bad_request_for_an_adapter_is_a_400_and_the_server_keeps_serving(server, expected):
    client = server.client()
    errors = server.metrics()
    with pytest.raises(openai.BadRequestError) as info:
        client.completions.create(model="qv", prompt=PROMPT, max_tokens=1_000_000, temperature=0)
    assert set(info.value.body) >= {"message", "type", "param", "code"}
    with pytest.raises(openai.BadRequestError):
        client.chat.completions.create(model="mlp", messages=MESSAGES, max_tokens=10, temperature=-1)
    after = server.metrics()
    refused = sum(after[k] - errors.get(k, 0) for k in after if k.startswith("stoke_request_errors_total{"))
    assert refused == 2
    out = complete(client, "qv")
    assert out.choices[0].text == expected["completion", "qv"].text
    assert wait_for(lambda: idle(server), 30), server.metrics()
    assert set(lora_gauges(server).values()) == {0.0}
    lines = server.log_lines()[-3:]
    assert [(line["model"], line["status"]) for line in lines] == [("qv", 400), ("mlp", 400), ("qv", 200)]


def test_the_request_log_names_the_adapter(server, expected):
    client = server.client()
    outs = [complete(client, "mlp"), chat(client, "qv", stream=True), complete(client, BASE)]
    ids = [outs[0].id, None, outs[2].id]
    chunks = list(outs[1])
    ids[1] = chunks[0].id
    lines = {line["request_id"]: line for line in server.log_lines()}
    for request_id, model, endpoint in zip(ids, ("mlp", "qv", BASE), ("completions", "chat", "completions")):
        line = lines[request_id]
        assert line["model"] == model and line["status"] == 200 and endpoint in line["endpoint"]
        assert line["completion_tokens"] == MAX_TOKENS or line["finish_reason"] == "stop"
    assert lines[ids[0]]["completion_tokens"] == len(expected["completion", "mlp"].token_ids)
    assert lines[ids[0]]["prompt_tokens"] == expected["prompt_tokens"]
    assert "Traceback" not in server.stderr()


def post_text(server: ServerProcess, path: str, body: dict) -> tuple[int, str]:
    conn = http.client.HTTPConnection("127.0.0.1", server.port, timeout=60)
    try:
        conn.request("POST", path, body=json.dumps(body).encode(), headers={"Content-Type": "application/json"})
        response = conn.getresponse()
        return response.status, response.read().decode()
    finally:
        conn.close()


def test_adapters_load_and_unload_at_runtime(server, expected, adapter_dirs, tiny_checkpoints, default_model_dir,
                                             tmp_path):
    """vLLM's runtime LoRA updating: an adapter loaded over HTTP is listed, served (the offline
    engine's tokens) and counted; refusals (a name taken, the base model's, a directory that is
    no adapter, an adapter of another model) are 400s that change nothing; once unloaded it is
    a 404 again, and it can be loaded again."""
    client = server.client()
    late = adapter_dirs["late"]
    with pytest.raises(openai.NotFoundError):
        complete(client, "late")
    assert post_text(server, "/v1/load_lora_adapter", {"lora_name": "late", "lora_path": late}) == (
        200, "Success: LoRA adapter 'late' added successfully.")
    assert [card.id for card in client.models.list().data] == [BASE, "qv", "mlp", "late"]
    assert client.models.retrieve("late").model_extra == {"root": late, "parent": BASE, "max_model_len": 8192}
    out = complete(client, "late")
    assert out.model == "late" and out.choices[0].text == expected["completion", "late"].text
    assert out.choices[0].text != expected["completion", BASE].text
    assert chat(client, "late").choices[0].message.content == expected["chat", "late"].text
    assert lora_gauges(server)["running", "late"] == 0.0
    other_model = save_adapter(str(tmp_path / "tiny"), tiny_checkpoints["llama"], rank=2, modules=["q_proj"])
    bad_regex = save_adapter(str(tmp_path / "regex"), default_model_dir, rank=2, modules=["q_proj"], layers=[0],
                             alpha_pattern={"q_proj(": 4.0})
    for body, message in (({"lora_name": "late", "lora_path": late}, "has already been loaded"),
                          ({"lora_name": "x", "lora_path": bad_regex}, "is malformed"),
                          ({"lora_name": "qv", "lora_path": late}, "has already been loaded"),
                          ({"lora_name": BASE, "lora_path": late}, "is the base model's name"),
                          ({"lora_name": "x", "lora_path": str(tmp_path)}, "has no adapter_config.json"),
                          ({"lora_name": "x", "lora_path": other_model}, "do not fit"),
                          ({"lora_name": "x"}, "lora_path")):
        status, text = post_text(server, "/v1/load_lora_adapter", body)
        assert status == 400 and message in json.loads(text)["error"]["message"], (body, text)
    assert [card.id for card in client.models.list().data] == [BASE, "qv", "mlp", "late"]
    # Three served adapters, more than the default max_cpu_loras (2: the --lora-modules): served
    # ones stay in memory, not read again (here: their directory gone for a moment).
    moved = adapter_dirs["qv"] + ".moved"
    os.rename(adapter_dirs["qv"], moved)
    try:
        assert complete(client, "qv").choices[0].text == expected["completion", "qv"].text
    finally:
        os.rename(moved, adapter_dirs["qv"])
    assert post_text(server, "/v1/unload_lora_adapter", {"lora_name": "late"}) == (
        200, "Success: LoRA adapter 'late' removed successfully.")
    with pytest.raises(openai.NotFoundError):
        complete(client, "late")
    assert "late" not in [card.id for card in client.models.list().data]
    assert lora_gauges(server)["running", "late"] == 0.0  # kept: an unloaded adapter's requests in flight count
    status, text = post_text(server, "/v1/unload_lora_adapter", {"lora_name": "late"})
    assert status == 404 and json.loads(text)["error"]["message"] == "The lora adapter 'late' cannot be found."
    # Loaded again (a new id, the same weights): the same answers.
    assert post_text(server, "/v1/load_lora_adapter", {"lora_name": "late", "lora_path": late})[0] == 200
    assert complete(client, "late").choices[0].text == expected["completion", "late"].text
    assert post_text(server, "/v1/unload_lora_adapter", {"lora_name": "late"})[0] == 200
    assert complete(client, "qv").choices[0].text == expected["completion", "qv"].text
    assert wait_for(lambda: idle(server), 30), server.metrics()
    assert "Traceback" not in server.stderr()
