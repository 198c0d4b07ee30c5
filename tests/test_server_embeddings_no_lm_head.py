"""A checkpoint without an LM head (a base model, as embedding models are saved: transformers'
`LlamaModel`) on a real server: it starts (its warm-up is an embedding), `/v1/embeddings` gives
transformers' last hidden state of the last token, normalised (the default pooling of a decoder
without sentence-transformers files), Matryoshka `dimensions` where `--pooler-config` allows
them, and what would generate is a 400 that says why."""

from __future__ import annotations

import numpy as np
import openai
import pytest
import torch

from tests.conftest import TINY_COMMON
from tests.server_harness import ServerProcess, idle, wait_for

PROMPTS = [[1, 17, 42, 99, 5], [1, 300, 7]]


@pytest.fixture(scope="module")
def checkpoint(tmp_path_factory: pytest.TempPathFactory) -> str:
    import transformers

    torch.manual_seed(0)
    path = str(tmp_path_factory.mktemp("no-lm-head"))
    transformers.LlamaModel(transformers.LlamaConfig(**TINY_COMMON)).save_pretrained(path)
    return path


@pytest.fixture(scope="module")
def server(checkpoint: str):
    with ServerProcess(checkpoint, "--cpu-threads", "1", "--kv-cache-memory-bytes", "16MiB",
                       "--pooler-config", '{"matryoshka_dimensions": [16, 32]}') as s:
        yield s


def test_embeddings_are_transformers_last_hidden_state(server, checkpoint):
    import transformers

    model = transformers.AutoModel.from_pretrained(checkpoint, dtype=torch.float32).eval()
    client = server.client()
    got = client.embeddings.create(model=None, input=PROMPTS, encoding_format="float")
    short = client.embeddings.create(model=None, input=PROMPTS, dimensions=16)
    for prompt, data, cut in zip(PROMPTS, got.data, short.data):
        with torch.no_grad():
            last = model(torch.tensor([prompt])).last_hidden_state[0, -1]
        expected = torch.nn.functional.normalize(last, dim=-1).numpy()
        assert np.abs(np.array(data.embedding) - expected).max() < 1e-5
        assert np.abs(np.array(cut.embedding) - torch.nn.functional.normalize(last[:16], dim=-1).numpy()).max() < 1e-5
    assert got.usage.prompt_tokens == sum(map(len, PROMPTS))
    with pytest.raises(openai.BadRequestError) as info:  # not one it was trained for
        client.embeddings.create(model=None, input=PROMPTS, dimensions=20)
    assert info.value.body["param"] == "dimensions" and "[16, 32]" in info.value.body["message"]


def test_what_would_generate_is_a_400(server):
    client = server.client()
    with pytest.raises(openai.BadRequestError) as info:
        client.completions.create(model=None, prompt=PROMPTS[0], max_tokens=2)
    assert "no LM head" in info.value.body["message"] and "/v1/embeddings only" in info.value.body["message"]
    assert info.value.body["param"] == "model"
    with pytest.raises(openai.BadRequestError):
        client.completions.create(model=None, prompt=PROMPTS[0], max_tokens=2, n=2,
                                  extra_body={"use_beam_search": True})
    for call in (lambda: client.chat.completions.create(model=None, messages=[{"role": "user", "content": "hi"}]),
                 lambda: client.responses.create(model=None, input="hi")):  # said first, not "no chat template"
        with pytest.raises(openai.BadRequestError) as info:
            call()
        assert "no LM head" in info.value.body["message"]
    assert wait_for(lambda: idle(server))
    assert server.metrics()['stoke_request_errors_total{type="internal"}'] == 0
    assert len(client.embeddings.create(model=None, input=PROMPTS[1]).data) == 1  # and it goes on
