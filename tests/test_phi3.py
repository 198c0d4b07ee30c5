"""Phi-3 and Phi-4 (Phi3ForCausalLM: Llama's decoder with q/k/v and gate/up saved fused)
against transformers: tiny random checkpoints, a sliding window the prompts outgrow (their
LongRoPE and partial rotary: tests/test_rope.py)."""

from __future__ import annotations


import pytest
import torch

from engine import LLM, LoRARequest, SamplingParams
from engine.config import ModelConfig
from tests.conftest import (TINY_COMMON, assert_classify_and_embed_equal_transformers, assert_engine_idle,
                            assert_logprobs_equal_transformers, random_prompts, save_tiny_causal_lm)
from tests.lora_adapters import hf_lora_greedy, save_adapter


def hf_config(**changes: object):
    import transformers

    return transformers.Phi3Config(**(TINY_COMMON | dict(sliding_window=6, tie_word_embeddings=False, pad_token_id=0)
                                      | changes))


def save(path: str, head: str = "ForCausalLM", **changes: object) -> torch.nn.Module:
    import transformers

    torch.manual_seed(0)
    model = getattr(transformers, f"Phi3{head}")(hf_config(**changes)).eval()
    model.save_pretrained(path)
    return model


@pytest.fixture(scope="module")
def phi3(tmp_path_factory: pytest.TempPathFactory) -> tuple[str, torch.nn.Module]:
    path = str(tmp_path_factory.mktemp("phi3") / "model")
    return path, save(path)



@pytest.mark.parametrize("backend", ["cpu", "reference"])
def test_logprobs_equal_transformers_past_the_window(phi3, backend: str, monkeypatch) -> None:
    """Its fused checkpoint tensors load whole; every layer slides over 6 keys."""
    monkeypatch.setenv("STOKE_ATTENTION_BACKEND", backend)
    path, model = phi3
    llm = LLM(path, num_kv_blocks=64, block_size=4, max_num_batched_tokens=16)
    assert llm.engine.runner.model_config.layer_windows == (6, 6)
    assert_logprobs_equal_transformers(llm, model, random_prompts(1, (40, 3, 19)), max_tokens=10)
    assert_engine_idle(llm)


def test_a_fused_lora_adapter_equals_transformers(phi3, tmp_path) -> None:
    """Phi-3's adapters name its fused modules (qkv_proj, gate_up_proj); the split names are
    no module of Phi-3's, and the fused ones none of Llama's: both refused."""
    path, _ = phi3
    adapter = save_adapter(str(tmp_path / "fused"), path, modules=("qkv_proj", "o_proj", "gate_up_proj", "down_proj"),
                           rank=4)
    batch = random_prompts(2, (12, 30))
    params = SamplingParams(max_tokens=8, temperature=0.0, ignore_eos=True)
    llm = LLM(path, num_kv_blocks=64, enable_lora=True, max_loras=1, max_lora_rank=4)
    got = [list(o.outputs[0].token_ids) for o in llm.generate(
        [{"prompt_token_ids": p} for p in batch], params, lora_request=LoRARequest("fused", 1, adapter))]
    assert got == hf_lora_greedy(path, adapter, batch, 8)
    assert got != hf_lora_greedy(path, None, batch, 8)
    split = save_adapter(str(tmp_path / "split"), path, modules=("q_proj",), rank=4)
    with pytest.raises(ValueError, match="q_proj.*qkv_proj"):
        llm.generate([{"prompt_token_ids": batch[0]}], params, lora_request=LoRARequest("split", 2, split))
    assert_engine_idle(llm)
    llama = save_tiny_causal_lm(str(tmp_path / "llama"), "llama")
    fused = save_adapter(str(tmp_path / "on_llama"), llama, modules=("qkv_proj",), rank=4)
    llm = LLM(llama, num_kv_blocks=32, enable_lora=True, max_loras=1, max_lora_rank=4)
    with pytest.raises(ValueError, match="qkv_proj"):
        llm.generate([{"prompt_token_ids": batch[0]}], params, lora_request=LoRARequest("fused", 1, fused))


def test_a_classifier_and_a_base_model_equal_transformers(tmp_path) -> None:
    classifier = save(str(tmp_path / "cls"), "ForSequenceClassification", num_labels=3)
    base = save(str(tmp_path / "base"), "Model")
    assert_classify_and_embed_equal_transformers((str(tmp_path / "cls"), classifier), (str(tmp_path / "base"), base),
                                                 random_prompts(3, (12, 30, 3)))


def test_keys_left_out_are_phi3s_defaults() -> None:
    """A config.json without rms_norm_eps, max_position_embeddings or eos_token_id reads
    Phi3Config's defaults (1e-5, 4096, 32000), not Llama's."""
    import transformers

    raw = {"architectures": ["Phi3ForCausalLM"], "model_type": "phi3", "vocab_size": 512, "hidden_size": 64,
           "intermediate_size": 128, "num_hidden_layers": 2, "num_attention_heads": 4}
    ours, theirs = ModelConfig.from_dict(raw), transformers.Phi3Config(**raw)
    assert (ours.rms_norm_eps, ours.max_position_embeddings, ours.eos_token_ids, ours.tie_word_embeddings) == \
        (theirs.rms_norm_eps, theirs.max_position_embeddings, [theirs.eos_token_id], theirs.tie_word_embeddings)
