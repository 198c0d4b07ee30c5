"""Sliding-window attention: each family's windows read as transformers reads them, and
windowed models served past their window with transformers' logprobs."""

from __future__ import annotations


import pytest
import torch

from engine import LLM
from engine.config import ModelConfig
from tests.conftest import TINY_COMMON, assert_engine_idle, assert_logprobs_equal_transformers, random_prompts

BASE = {"vocab_size": 64, "hidden_size": 32, "intermediate_size": 64, "num_hidden_layers": 4,
        "num_attention_heads": 4, "num_key_value_heads": 2, "max_position_embeddings": 256}


def windows(arch: str, **raw: object) -> tuple[int, ...]:
    return ModelConfig.from_dict(BASE | {"architectures": [arch]} | raw).layer_windows


def test_each_familys_windows_are_read_as_transformers_reads_them() -> None:
    """Mistral, Mixtral and Qwen3-MoE slide on every layer; Qwen2/Qwen3 only with
    use_sliding_window, on the layers from max_window_layers (or layer_types); Qwen2-MoE on even
    layers below it; Llama never. A missing window is the config class's default, a null none."""
    assert windows("MistralForCausalLM", sliding_window=64) == (64,) * 4
    assert windows("MistralForCausalLM") == (4096,) * 4
    assert windows("MistralForCausalLM", sliding_window=None) == ()
    assert windows("MistralForCausalLM", sliding_window=64, layer_types=["full_attention"] * 4) == (64,) * 4
    assert windows("MixtralForCausalLM") == () and windows("MixtralForCausalLM", sliding_window=32) == (32,) * 4
    assert windows("LlamaForCausalLM", sliding_window=64) == ()
    for arch in ("Qwen2ForCausalLM", "Qwen3ForCausalLM"):
        assert windows(arch, sliding_window=64) == ()  # released configs carry a window they do not use
        assert windows(arch, sliding_window=64, layer_types=["sliding_attention"] * 4) == ()
        assert windows(arch, sliding_window=64, use_sliding_window=True, max_window_layers=2) == (0, 0, 64, 64)
        assert windows(arch, sliding_window=64, use_sliding_window=True,
                       layer_types=["sliding_attention", "full_attention"] * 2) == (64, 0, 64, 0)
    assert windows("Qwen2MoeForCausalLM", sliding_window=64, use_sliding_window=True, max_window_layers=3) == \
        (64, 0, 64, 0)
    assert windows("Qwen3MoeForCausalLM", sliding_window=64, use_sliding_window=True) == (64,) * 4
    config = ModelConfig.from_dict(BASE | {"architectures": ["Qwen3ForCausalLM"], "sliding_window": 64,
                                           "use_sliding_window": True, "max_window_layers": 3})
    assert [config.window(i) for i in range(4)] == [0, 0, 0, 64]


def test_transformers_config_classes_agree() -> None:
    """Our windows against transformers' own layer types, config.json without layer_types."""
    import transformers

    cases = [
        (transformers.Qwen2Config, "Qwen2ForCausalLM", dict(use_sliding_window=True, sliding_window=16,
                                                             max_window_layers=1)),
        (transformers.Qwen3Config, "Qwen3ForCausalLM", dict(use_sliding_window=True, sliding_window=16,
                                                             max_window_layers=3)),
        (transformers.Gemma2Config, "Gemma2ForCausalLM", dict(sliding_window=16, head_dim=8)),
        (transformers.Gemma3TextConfig, "Gemma3ForCausalLM", dict(sliding_window=16, head_dim=8,
                                                                  sliding_window_pattern=3)),
    ]
    for config_class, arch, own in cases:
        theirs = config_class(**BASE, **own)
        expected = tuple(theirs.sliding_window if t == "sliding_attention" else 0 for t in theirs.layer_types)
        assert windows(arch, **own) == expected, arch


@pytest.mark.parametrize(("raw", "message"), [
    ({"sliding_window": -3}, "sliding_window"),
    ({"sliding_window": 2.5}, "sliding_window"),
    ({"layer_types": ["sliding_attention"] * 3}, "layer_types"),
    ({"layer_types": ["chunked_attention"] * 4}, "layer_types"),
])
def test_windows_that_make_no_sense_are_refused(raw: dict, message: str) -> None:
    with pytest.raises(ValueError, match=message):
        windows("Qwen2ForCausalLM", use_sliding_window=True, sliding_window=raw.pop("sliding_window", 8), **raw)


@pytest.fixture(scope="module")
def windowed_mistral(tmp_path_factory: pytest.TempPathFactory) -> tuple[str, torch.nn.Module]:
    """A tiny Mistral that attends to its last 6 keys, and a Qwen2 sliding on its upper layer."""
    import transformers

    torch.manual_seed(0)
    path = str(tmp_path_factory.mktemp("windowed") / "mistral")
    model = transformers.MistralForCausalLM(transformers.MistralConfig(**TINY_COMMON, sliding_window=6))
    model.save_pretrained(path)
    return path, model.eval()



@pytest.mark.parametrize("backend", ["cpu", "reference"])
def test_a_windowed_model_is_served_past_its_window(windowed_mistral, backend: str, monkeypatch) -> None:
    """Prompts up to 10 windows long, chunked mid-window, and answers decoded past the window:
    transformers' logprobs, at the model's full context length."""
    monkeypatch.setenv("STOKE_ATTENTION_BACKEND", backend)
    path, model = windowed_mistral
    llm = LLM(path, num_kv_blocks=64, block_size=4, max_num_batched_tokens=20)
    assert llm.engine.max_model_len == TINY_COMMON["max_position_embeddings"]
    assert_logprobs_equal_transformers(llm, model, random_prompts(5, (60, 2, 6, 13, 24)), max_tokens=10)
    assert_engine_idle(llm)


def test_blocks_given_back_before_the_window_are_reused_at_once(windowed_mistral) -> None:
    """Without a prefix cache a block given back is the next one taken, and written over: one
    request at a time in a pool of 6 blocks of 4 (window 6: a query reads into the block before
    its own from mid-block), prompts chunked by 8 across the window, answers decoded past it,
    each with transformers' logprobs. A block given back one step early is read after a chunk
    wrote over it."""
    path, model = windowed_mistral
    llm = LLM(path, num_kv_blocks=6, block_size=4, max_num_batched_tokens=8, enable_prefix_caching=False,
              max_num_seqs=1)
    assert llm.engine.scheduler.max_sequence_tokens == TINY_COMMON["max_position_embeddings"]
    assert_logprobs_equal_transformers(llm, model, random_prompts(5, (60, 33, 45)), max_tokens=12)
    assert_engine_idle(llm)


def test_a_qwen2_sliding_on_its_upper_layer_equals_transformers(tmp_path) -> None:
    """Qwen2's max_window_layers: layer 0 attends to every key, layer 1 to its last 5."""
    import transformers

    torch.manual_seed(0)
    config = transformers.Qwen2Config(**TINY_COMMON, use_sliding_window=True, sliding_window=5, max_window_layers=1)
    model = transformers.Qwen2ForCausalLM(config).eval()
    model.save_pretrained(str(tmp_path))
    llm = LLM(str(tmp_path), num_kv_blocks=64, block_size=4, max_num_batched_tokens=16)
    assert llm.engine.runner.model_config.layer_windows == (0, 5)
    assert_logprobs_equal_transformers(llm, model, random_prompts(6, (40, 7)), max_tokens=8)
    assert_engine_idle(llm)


def test_a_window_covering_every_position_is_none_to_the_kernels(tmp_path) -> None:
    """Phi-4-mini's 262,144-key window over 131,072 positions: the kernels take no window,
    while a Gemma 3 layer with such a window is still a sliding one, rotated by its local rope."""
    from engine.models.llama import LlamaForCausalLM
    from tests.test_gemma import save

    model = LlamaForCausalLM(ModelConfig.from_dict(BASE | {"architectures": ["MistralForCausalLM"],
                                                           "sliding_window": 256}))
    assert [layer.self_attn.sliding_window for layer in model.model.layers] == [0] * 4
    hf = save("gemma3", str(tmp_path), max_position_embeddings=64, sliding_window=64)
    llm = LLM(str(tmp_path), num_kv_blocks=64, block_size=4)
    layers = [layer.self_attn for layer in llm.engine.runner.model.model.layers]
    sliding = [bool(window) for window in llm.engine.runner.model_config.layer_windows]
    assert any(sliding) and [(a.sliding_window, a.local_rope) for a in layers] == [(0, s) for s in sliding]
    assert llm.engine.scheduler.block_manager.windows == (0,)  # nothing to give back: one KV group
    assert_logprobs_equal_transformers(llm, hf, random_prompts(1, (40, 9)), max_tokens=6)
    assert_engine_idle(llm)
