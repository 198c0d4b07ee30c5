"""A sliding-window model served with the hybrid KV cache manager, over the real server with
the `openai` SDK: the HTTP process admits by the worker's plan of the pool (its full and sliding
groups), so a request that fits only because the sliding layers give their blocks back is
served, with transformers' tokens, and one past even that is a 400 that says why; the pool is
empty afterwards. The server also keeps a host tier of the prefix cache (--kv-offloading-size):
a prompt whose blocks the pool evicted is loaded back, every group's, with the same text."""

from __future__ import annotations

import shutil

import openai
import pytest

from tests.conftest import hf_greedy, random_prompts
from tests.server_harness import ServerProcess, idle, wait_for

BLOCKS, BLOCK_SIZE, CHUNK = 24, 4, 16
# Two groups of two layers (tests/test_gemma.py's Gemma 3: window 8, every other layer full):
# a sequence of T tokens holds ceil(T / 4) full blocks and at most (8 + 16 - 2) // 4 + 2 = 7
# sliding ones, so 24 blocks hold 68 tokens. Kept in every layer, the same bytes (12 blocks of
# four layers) would hold 48.
POOL_TOKENS = 68
HOST_GIB = 64 * 2 * 2 * 4 * 2 * 32 * 4 / 2**30  # 64 blocks of 2 layers' K and V (4 tokens, 2 heads of 32, fp32)


@pytest.fixture(scope="module")
def server(tmp_path_factory: pytest.TempPathFactory):
    from engine.default_model import default_model_path
    from tests.test_gemma import save

    path = str(tmp_path_factory.mktemp("gemma3"))
    save("gemma3", path, vocab_size=49152)
    for name in ("tokenizer.json", "tokenizer_config.json"):
        shutil.copy(f"{default_model_path()}/{name}", path)
    with ServerProcess(path, "--num-kv-blocks", str(BLOCKS), "--block-size", str(BLOCK_SIZE),
                       "--max-num-batched-tokens", str(CHUNK), "--cpu-threads", "1", "--generation-config", "none",
                       "--kv-offloading-size", str(HOST_GIB)) as s:
        s.path = path
        yield s


def test_a_request_that_fits_only_with_the_windows_given_back_is_served(server) -> None:
    from transformers import AutoTokenizer

    tokenizer = AutoTokenizer.from_pretrained(server.path)
    client = server.client()
    for prompt in random_prompts(11, (50, 44)):
        out = client.completions.create(model=None, prompt=prompt, max_tokens=POOL_TOKENS - len(prompt),
                                        temperature=0, extra_body={"ignore_eos": True})
        assert out.usage.prompt_tokens + out.usage.completion_tokens == POOL_TOKENS
        expected = hf_greedy(server.path, [prompt], POOL_TOKENS - len(prompt))[0]
        assert out.choices[0].text == tokenizer.decode(expected)
    assert wait_for(lambda: idle(server))


def test_a_request_past_the_pool_is_a_400_that_says_why(server) -> None:
    prompt = random_prompts(12, (50,))[0]
    with pytest.raises(openai.BadRequestError) as info:
        server.client().completions.create(model=None, prompt=prompt, max_tokens=POOL_TOKENS - 50 + 1)
    message = info.value.body["message"]
    assert f"needs {POOL_TOKENS + 1} tokens of KV cache" in message and f"holds {POOL_TOKENS}" in message
    assert "over 2 layer groups" in message
    assert f"in 2 layer groups of windows [0, 8]; a sequence of up to {POOL_TOKENS} tokens" in \
        server.stdout() + server.stderr(), "the start-up log names the groups"
    # ... and nothing changed: the server answers the next one
    out = server.client().completions.create(model=None, prompt=prompt, max_tokens=2)
    assert out.usage.completion_tokens == 2
    assert wait_for(lambda: idle(server))


def test_a_prefix_the_pool_evicted_is_loaded_back_from_host_memory(server) -> None:
    from transformers import AutoTokenizer

    client = server.client()
    before = server.metrics()
    first, *others = random_prompts(13, (41, 41, 41))

    def complete(prompt: list[int]):
        return client.completions.create(model=None, prompt=prompt, max_tokens=3, temperature=0,
                                         extra_body={"ignore_eos": True})

    original = complete(first)
    for prompt in others:  # their blocks take the pool's: the first prompt's are evicted, to host memory
        complete(prompt)
    assert wait_for(lambda: idle(server))
    middle = server.metrics()
    assert middle["stoke_kv_offload_saved_blocks_total"] > before["stoke_kv_offload_saved_blocks_total"]
    again = complete(first)
    assert again.choices[0].text == original.choices[0].text
    assert again.choices[0].text == AutoTokenizer.from_pretrained(server.path).decode(
        hf_greedy(server.path, [first], 3)[0])
    assert again.usage.prompt_tokens_details.cached_tokens == 40  # every full block of it, from the host
    assert wait_for(lambda: idle(server))
    after = server.metrics()
    # the full group's 10 blocks, and the sliding group's two the next token's window reads (8 keys)
    assert after["stoke_kv_offload_loaded_blocks_total"] - middle["stoke_kv_offload_loaded_blocks_total"] == 12
    assert 0 < after["stoke_kv_offload_usage_ratio"] <= 1
    assert "the prefix cache keeps 64 more blocks in host memory" in server.stdout() + server.stderr()
