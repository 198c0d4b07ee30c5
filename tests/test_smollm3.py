"""SmolLM3 (SmolLM3ForCausalLM: Llama's decoder with no rotary embedding on every fourth layer)
against transformers: tiny random checkpoints, with yarn and with windows on its NoPE layers."""

from __future__ import annotations

from typing import Any

import pytest
import torch

from engine import LLM
from engine.config import ModelConfig
from tests.conftest import (TINY_COMMON, assert_classify_and_embed_equal_transformers, assert_engine_idle,
                            assert_logprobs_equal_transformers, random_prompts)

SMALL = TINY_COMMON | dict(num_hidden_layers=4, pad_token_id=0)


def hf_config(**changes: Any):
    import transformers

    return transformers.SmolLM3Config(**(SMALL | changes))


def save(path: str, head: str = "ForCausalLM", **changes: Any) -> torch.nn.Module:
    import transformers

    torch.manual_seed(0)
    model = getattr(transformers, f"SmolLM3{head}")(hf_config(**changes)).eval()
    model.save_pretrained(path)
    return model


def raw(**changes: Any) -> dict[str, Any]:
    return hf_config(**changes).to_dict() | {"architectures": ["SmolLM3ForCausalLM"]}


@pytest.mark.parametrize("backend", ["cpu", "reference"])
def test_logprobs_equal_transformers(tmp_path, backend: str, monkeypatch) -> None:
    """Its fourth layer has no rope: its keys and queries are not rotated."""
    monkeypatch.setenv("STOKE_ATTENTION_BACKEND", backend)
    model = save(str(tmp_path))
    llm = LLM(str(tmp_path), num_kv_blocks=64, block_size=4, max_num_batched_tokens=16)
    assert llm.engine.runner.model_config.nope_layers == (3,)
    assert [layer.self_attn.rotates for layer in llm.engine.runner.model.model.layers] == [True, True, True, False]
    assert_logprobs_equal_transformers(llm, model, random_prompts(1, (40, 3, 19)), max_tokens=10)
    assert_engine_idle(llm)


def test_yarn_and_windows_on_the_nope_layers_equal_transformers(tmp_path) -> None:
    """SmolLM3's long-context settings: yarn over its pretraining length, and with
    use_sliding_window its NoPE layers (here the second and fourth) slide."""
    model = save(str(tmp_path), no_rope_layer_interval=2, use_sliding_window=True, sliding_window=6,
                 max_position_embeddings=32, rope_parameters={"rope_type": "yarn", "rope_theta": 2e6, "factor": 2.0,
                                                              "original_max_position_embeddings": 32})
    llm = LLM(str(tmp_path), num_kv_blocks=64, block_size=4, max_num_batched_tokens=16)
    config = llm.engine.runner.model_config
    assert (config.nope_layers, config.layer_windows, llm.engine.max_model_len) == ((1, 3), (0, 6, 0, 6), 64)
    assert_logprobs_equal_transformers(llm, model, random_prompts(2, (45, 12)), max_tokens=8)
    assert_engine_idle(llm)


def test_a_classifier_and_a_base_model_equal_transformers(tmp_path) -> None:
    classifier = save(str(tmp_path / "cls"), "ForSequenceClassification", num_labels=3)
    base = save(str(tmp_path / "base"), "Model")
    assert_classify_and_embed_equal_transformers((str(tmp_path / "cls"), classifier), (str(tmp_path / "base"), base),
                                                 random_prompts(3, (12, 30, 3)), has_lm_head=True)


def test_config_reading() -> None:
    """no_rope_layers (1: rope; a longer list's first flags) over no_rope_layer_interval;
    SmolLM3Config's defaults where keys are missing (theta 2e6, tied embeddings); windows only
    with use_sliding_window; short lists, and sliding layer_types without use_sliding_window
    (windowed by some of transformers' attention implementations only), refused."""
    assert ModelConfig.from_dict(raw(no_rope_layers=[0, 1, 1, 0])).nope_layers == (0, 3)
    assert ModelConfig.from_dict(raw(no_rope_layer_interval=1)).nope_layers == (0, 1, 2, 3)
    assert ModelConfig.from_dict(raw(sliding_window=8)).layer_windows == ()
    bare = ModelConfig.from_dict({"architectures": ["SmolLM3ForCausalLM"], **TINY_COMMON, "num_hidden_layers": 8})
    assert (bare.rope_theta, bare.tie_word_embeddings, bare.nope_layers) == (2e6, True, (3, 7))
    assert ModelConfig.from_dict(raw() | {"no_rope_layers": [1, 0, 1, 1, 0, 0]}).nope_layers == (1,)  # pruned
    with pytest.raises(ValueError, match="no_rope_layers must be a 0 or 1 for each of the 4 layers"):
        ModelConfig.from_dict(raw() | {"no_rope_layers": [1, 1, 0]})
    with pytest.raises(ValueError, match="use_sliding_window is false"):
        ModelConfig.from_dict(raw(sliding_window=8) | {"layer_types": ["full_attention", "sliding_attention"] * 2})
    with pytest.raises(ValueError, match="attention_bias"):
        ModelConfig.from_dict(raw(attention_bias=True))
