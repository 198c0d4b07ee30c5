"""`/classify` over a real server of a sequence classifier of three named labels (a tiny random
one): each input's probabilities are the offline `LLM.classify`'s, its label the most probable
one's name from config.json's id2label (which the worker's ready frame carries); pairs are
scored by a cross-encoder (one label) alone, so `/score` and `/rerank` are a 400 that says to
classify, and embeddings and generations are a 400 too."""

from __future__ import annotations

import openai
import pytest

from engine import LLM, PoolingParams
from tests.conftest import save_tiny_classifier
from tests.server_harness import ServerProcess, idle, sdk_post, wait_for

LABELS = ["negative", "neutral", "positive"]
TEXTS = ["I loved it.", "It was fine, I suppose.", "a b c d e f g", "Never again!"]


@pytest.fixture(scope="module")
def checkpoint(tmp_path_factory: pytest.TempPathFactory) -> str:
    return save_tiny_classifier(str(tmp_path_factory.mktemp("three-labels")), "qwen3", num_labels=3,
                                id2label=dict(enumerate(LABELS)), label2id={name: i for i, name in enumerate(LABELS)})


@pytest.fixture(scope="module")
def server(checkpoint: str):
    with ServerProcess(checkpoint, "--cpu-threads", "1", "--kv-cache-memory-bytes", "16MiB") as s:
        yield s


def test_probabilities_and_labels_are_the_offline_classifiers(server, checkpoint):
    offline = LLM(checkpoint, num_kv_blocks=32)
    client = server.client()
    got = sdk_post(client, "/classify", {"input": TEXTS})
    expected = offline.classify(TEXTS, use_tqdm=False)
    for d, e in zip(got["data"], expected):
        assert max(abs(p - q) for p, q in zip(d["probs"], e.outputs.probs)) < 1e-5
        assert abs(sum(d["probs"]) - 1) < 1e-5  # a softmax over the labels
        assert d["label"] == LABELS[max(range(3), key=e.outputs.probs.__getitem__)] and d["num_classes"] == 3
    assert len({d["label"] for d in got["data"]}) > 1  # the labels are told apart, not the first every time
    raw = sdk_post(client, "/classify", {"input": TEXTS[:2], "use_activation": False})
    logits = offline.classify(TEXTS[:2], PoolingParams(use_activation=False), use_tqdm=False)
    for d, e in zip(raw["data"], logits):
        assert max(abs(p - q) for p, q in zip(d["probs"], e.outputs.probs)) < 1e-5


@pytest.mark.parametrize("path, body, says", [
    ("/score", {"text_1": "a", "text_2": ["b", "c"]}, "3 labels: use /classify"),
    ("/v2/rerank", {"query": "a", "documents": ["b"]}, "3 labels: use /classify"),
    ("/v1/embeddings", {"input": "a"}, "it computes no embeddings (it serves /classify)"),
    ("/v1/completions", {"prompt": "a", "max_tokens": 2}, "it serves /classify only"),
])
def test_what_a_classifier_of_several_labels_cannot_do_is_a_400(server, path: str, body, says: str):
    client = server.client()
    with pytest.raises(openai.BadRequestError) as info:
        sdk_post(client, path, body)
    assert info.value.body["param"] == "model" and says in info.value.body["message"], info.value.body
    assert wait_for(lambda: idle(server))
    assert sdk_post(client, "/classify", {"input": "a"})["data"][0]["num_classes"] == 3


def test_a_chat_form_classification_classifies_the_rendered_conversation(server, checkpoint):
    """vLLM's chat-form /classify: `messages` rendered by the chat template, classified as one
    prompt (no special tokens added: the template writes them)."""
    offline = LLM(checkpoint, num_kv_blocks=32)
    tokenizer = offline.get_tokenizer()
    messages = [{"role": "user", "content": "Is this review positive? I loved it."}]
    ids = tokenizer.encode(tokenizer.apply_chat_template(messages, tokenize=False), add_special_tokens=False)
    got = sdk_post(server.client(), "/classify", {"messages": messages})
    (want,) = offline.classify([ids], use_tqdm=False)
    assert max(abs(p - q) for p, q in zip(got["data"][0]["probs"], want.outputs.probs)) < 1e-5
    assert got["usage"]["prompt_tokens"] == len(ids)
