"""Rope scalings (yarn, dynamic NTK, longrope, linear, llama3) and partial rotary against
transformers: the tables equal its rotary embeddings' cos and sin over a sequence as long as
the served length (the length engine/rope.py fixes the choice by), the served lengths are
vLLM's, and tiny checkpoints give transformers' logprobs."""

from __future__ import annotations

import importlib
from typing import Any

import pytest
import torch

from engine import LLM
from engine.config import EngineConfig, ModelConfig
from engine.models.llama import Rotary
from tests.conftest import TINY_COMMON, assert_engine_idle, assert_logprobs_equal_transformers, random_prompts

HEAD_DIM = TINY_COMMON["hidden_size"] // TINY_COMMON["num_attention_heads"]  # 16
PAIRS = int(HEAD_DIM * 0.75) // 2  # Phi-4-mini's partial rotary: 12 of 16 dims rotate


def longrope(**changes: Any) -> dict[str, Any]:
    return {"rope_type": "longrope", "rope_theta": 10000.0, "short_factor": [1.0 + i / 4 for i in range(PAIRS)],
            "long_factor": [1.5 + 2 * i for i in range(PAIRS)], "partial_rotary_factor": 0.75} | changes


def hf_config(family: str, **changes: Any):
    import transformers

    cls = {"llama": "LlamaConfig", "qwen3": "Qwen3Config", "phi3": "Phi3Config"}
    extra = {"phi3": dict(sliding_window=None, pad_token_id=0), "qwen3": dict(head_dim=HEAD_DIM)}.get(family, {})
    return getattr(transformers, cls[family])(**(TINY_COMMON | dict(tie_word_embeddings=False) | extra | changes))


def hf_tables(config, length: int) -> tuple[torch.Tensor, torch.Tensor]:
    """transformers' cos and sin (their first half: rotate-half repeats it) at positions
    0..length-1, computed as one forward over a sequence of that length computes them."""
    module = importlib.import_module(f"transformers.models.{config.model_type}.modeling_{config.model_type}")
    rotary = next(v for k, v in vars(module).items() if k.endswith("RotaryEmbedding") and "Scaled" not in k)(config)
    cos, sin = rotary(torch.zeros(1), torch.arange(length)[None])
    half = cos.shape[-1] // 2
    return cos[0, :, :half], sin[0, :, :half]


ARCHITECTURES = {"llama": "LlamaForCausalLM", "qwen3": "Qwen3ForCausalLM", "phi3": "Phi3ForCausalLM"}

# (family, served length, config changes)
TABLE_CASES = {
    "linear": ("llama", 32, dict(max_position_embeddings=32, rope_scaling={"rope_type": "linear", "factor": 2.0})),
    "llama3": ("llama", 64, dict(max_position_embeddings=64, rope_scaling={
        "rope_type": "llama3", "factor": 8.0, "low_freq_factor": 1.0, "high_freq_factor": 4.0,
        "original_max_position_embeddings": 16})),
    "dynamic within its positions": ("llama", 32, dict(max_position_embeddings=32, rope_scaling={
        "rope_type": "dynamic", "factor": 2.0})),
    "dynamic past its positions": ("llama", 64, dict(max_position_embeddings=32, rope_scaling={
        "rope_type": "dynamic", "factor": 2.0})),
    "yarn": ("llama", 64, dict(max_position_embeddings=64, rope_scaling={
        "rope_type": "yarn", "factor": 4.0, "original_max_position_embeddings": 16})),
    "yarn, Qwen3's layout": ("qwen3", 64, dict(max_position_embeddings=40, rope_parameters={
        "rope_type": "yarn", "rope_theta": 1e6, "factor": 4.0, "original_max_position_embeddings": 16})),
    "yarn, untruncated with betas": ("qwen3", 48, dict(max_position_embeddings=48, rope_parameters={
        "rope_type": "yarn", "rope_theta": 5e5, "factor": 3.0, "original_max_position_embeddings": 16,
        "truncate": False, "beta_fast": 8, "beta_slow": 2})),
    "yarn, DeepSeek's mscales": ("llama", 64, dict(max_position_embeddings=64, rope_scaling={
        "rope_type": "yarn", "factor": 4.0, "original_max_position_embeddings": 16, "mscale": 1.0,
        "mscale_all_dim": 0.5})),
    "yarn, an explicit attention factor": ("llama", 32, dict(max_position_embeddings=32, rope_scaling={
        "rope_type": "yarn", "factor": 2.0, "attention_factor": 0.9})),
    "yarn, no factor": ("llama", 64, dict(max_position_embeddings=64, rope_scaling={
        "rope_type": "yarn", "factor": None, "original_max_position_embeddings": 16})),
    "longrope, long": ("phi3", 64, dict(max_position_embeddings=64, original_max_position_embeddings=16,
                                        rope_parameters=longrope())),
    "longrope, short": ("phi3", 16, dict(max_position_embeddings=64, original_max_position_embeddings=16,
                                         rope_parameters=longrope())),
    "longrope, given factor and attention factor": ("phi3", 64, dict(
        max_position_embeddings=64, original_max_position_embeddings=16,
        rope_parameters=longrope(factor=8.0, attention_factor=1.1))),
    "longrope, full rotary": ("phi3", 64, dict(
        max_position_embeddings=64, original_max_position_embeddings=16, rope_parameters=longrope(
            partial_rotary_factor=1.0, short_factor=[1.0] * (HEAD_DIM // 2),
            long_factor=[1.0 + i for i in range(HEAD_DIM // 2)]))),
    "partial rotary, no scaling": ("phi3", 32, dict(max_position_embeddings=32, partial_rotary_factor=0.5)),
}


@pytest.mark.parametrize("case", TABLE_CASES)
def test_tables_equal_transformers(case: str) -> None:
    family, served, changes = TABLE_CASES[case]
    config = hf_config(family, **changes)
    ours = ModelConfig.from_dict(config.to_dict() | {"architectures": [ARCHITECTURES[family]]})
    rotary = Rotary(ours, served)
    cos, sin = hf_tables(config, served)
    assert rotary.cos.shape == cos.shape == (served, (ours.rotary_dim or HEAD_DIM) // 2)
    torch.testing.assert_close(rotary.cos, cos, atol=2e-7, rtol=0)
    torch.testing.assert_close(rotary.sin, sin, atol=2e-7, rtol=0)


def test_older_longrope_names_and_the_pretraining_length() -> None:
    """Phi3Config reads "su" and "yarn" as LongRoPE; its top-level pretraining length wins
    over the dict's, as transformers' standardisation puts it."""
    config = hf_config("phi3", max_position_embeddings=64, original_max_position_embeddings=16,
                       rope_parameters=longrope())
    for name in ("su", "yarn"):
        raw = config.to_dict() | {"architectures": ["Phi3ForCausalLM"], "rope_scaling": longrope(type=name)}
        raw.pop("rope_parameters")
        ours = ModelConfig.from_dict(raw)
        assert ours.rope_scaling["rope_type"] == "longrope" and ours.rotary_dim == 2 * PAIRS
        torch.testing.assert_close(Rotary(ours, 64).cos, hf_tables(config, 64)[0], atol=2e-7, rtol=0)
    raw = {"architectures": ["LlamaForCausalLM"], **TINY_COMMON, "original_max_position_embeddings": 8,
           "rope_scaling": {"rope_type": "yarn", "factor": 2.0, "original_max_position_embeddings": 16}}
    assert ModelConfig.from_dict(raw).rope_scaling["original_max_position_embeddings"] == 8


def model_config(family: str = "llama", **changes: Any) -> ModelConfig:
    return ModelConfig.from_dict({"architectures": [ARCHITECTURES[family]], **TINY_COMMON, **changes})


def test_served_lengths_are_vllms() -> None:
    """A dynamic or yarn scaling serves its factor times the positions (yarn's pretraining
    length's, as Qwen3's 32k × 4); linear (Gemma 3's), llama3 and longrope configs name
    theirs. Past them max_model_len is refused."""
    qwen3_yarn = model_config("qwen3", max_position_embeddings=40960, rope_scaling={
        "rope_type": "yarn", "factor": 4.0, "original_max_position_embeddings": 32768})
    cases = [
        (qwen3_yarn, 131072),
        (model_config(max_position_embeddings=2048, rope_scaling={"rope_type": "linear", "factor": 2.0}), 2048),
        (model_config(max_position_embeddings=2048, rope_scaling={"rope_type": "dynamic", "factor": 4.0}), 8192),
        (model_config(max_position_embeddings=131072, rope_scaling={
            "rope_type": "llama3", "factor": 8.0, "low_freq_factor": 1.0, "high_freq_factor": 4.0,
            "original_max_position_embeddings": 8192}), 131072),
        (model_config("phi3", max_position_embeddings=131072, original_max_position_embeddings=4096,
                      rope_scaling=longrope()), 131072),
        (model_config(max_position_embeddings=2048), 2048),
    ]
    for config, longest in cases:
        assert config.longest_sequence == longest
        assert EngineConfig().resolve_max_model_len(config) == longest
        assert EngineConfig(max_model_len=longest // 2).resolve_max_model_len(config) == longest // 2
    with pytest.raises(ValueError, match=r"131073 exceeds the model's 131072 positions \(max_position_embeddings 40960, stretched"):
        EngineConfig(max_model_len=131073).resolve_max_model_len(qwen3_yarn)


@pytest.mark.parametrize(("changes", "message"), [
    (dict(partial_rotary_factor=0.5), "partial_rotary_factor 0.5 is not supported for llama"),
    (dict(rope_scaling={"rope_type": "mrope", "factor": 2.0}), "rope scaling 'mrope' is not supported"),
    (dict(rope_scaling={"rope_type": "linear"}), "'linear' needs a positive factor"),
    (dict(rope_scaling={"rope_type": "dynamic", "factor": "2"}), "'dynamic' needs a positive factor"),
    (dict(rope_scaling={"rope_type": "llama3", "factor": 8.0}), "'llama3' needs low_freq_factor"),
    (dict(rope_scaling={"rope_type": "longrope", "short_factor": [1.0] * 3, "long_factor": [1.0] * 8}),
     "longrope's short_factor must be 8 positive numbers"),
])
def test_what_is_not_computed_is_refused(changes: dict[str, Any], message: str) -> None:
    """Refused with the config, before any weight is allocated; never approximated."""
    with pytest.raises(ValueError, match=message):
        model_config(**changes)


def test_phi3_refusals() -> None:
    """Phi3Config's: LongRoPE only; and partial rotary must leave an even number of dims."""
    with pytest.raises(ValueError, match="'linear' is not supported for Phi-3"):
        model_config("phi3", rope_scaling={"rope_type": "linear", "factor": 2.0})
    with pytest.raises(ValueError, match="does not give an even number of rotary dims"):
        model_config("phi3", partial_rotary_factor=0.35)
    with pytest.raises(ValueError, match="long_factor must be 6 positive numbers"):
        model_config("phi3", rope_scaling=longrope(long_factor=[1.0] * 8))


def save(path: str, family: str, **changes: Any) -> torch.nn.Module:
    import transformers

    torch.manual_seed(0)
    model = getattr(transformers, ARCHITECTURES[family])(hf_config(family, **changes)).eval()
    model.save_pretrained(path)
    return model


@pytest.mark.parametrize("backend", ["cpu", "reference"])
def test_yarn_logprobs_equal_transformers(tmp_path, backend: str, monkeypatch) -> None:
    """Qwen3 with yarn 4x over 16 pretraining positions: prompts past them, chunked."""
    monkeypatch.setenv("STOKE_ATTENTION_BACKEND", backend)
    model = save(str(tmp_path), "qwen3", max_position_embeddings=40, rope_parameters={
        "rope_type": "yarn", "rope_theta": 1e6, "factor": 4.0, "original_max_position_embeddings": 16})
    llm = LLM(str(tmp_path), num_kv_blocks=64, block_size=4, max_num_batched_tokens=16)
    assert llm.engine.max_model_len == 64
    assert_logprobs_equal_transformers(llm, model, random_prompts(1, (40, 3, 19)), max_tokens=10)
    assert_engine_idle(llm)


@pytest.mark.parametrize("backend", ["cpu", "reference"])
def test_longrope_with_partial_rotary_logprobs_equal_transformers(tmp_path, backend: str, monkeypatch) -> None:
    """Phi-4-mini's layout in small: LongRoPE over 16 pretraining positions, 12 of 16 dims
    rotating. Served past 16, the long factors (transformers' for a sequence past 16); served
    at most 16, the short ones."""
    monkeypatch.setenv("STOKE_ATTENTION_BACKEND", backend)
    model = save(str(tmp_path), "phi3", max_position_embeddings=64, original_max_position_embeddings=16,
                 rope_parameters=longrope())
    llm = LLM(str(tmp_path), num_kv_blocks=64, block_size=4, max_num_batched_tokens=16)
    assert_logprobs_equal_transformers(llm, model, random_prompts(2, (17, 30, 45)), max_tokens=8)
    assert_engine_idle(llm)
    short = LLM(str(tmp_path), num_kv_blocks=16, block_size=4, max_model_len=16)
    assert_logprobs_equal_transformers(short, model, random_prompts(3, (9, 3, 12)), max_tokens=4)
    assert_engine_idle(short)


def test_dynamic_ntk_logprobs_equal_transformers(tmp_path) -> None:
    """Within its positions dynamic NTK is the plain rope; served past them, the base
    transformers grows to for a sequence of the served length."""
    model = save(str(tmp_path), "llama", max_position_embeddings=32,
                 rope_scaling={"rope_type": "dynamic", "factor": 2.0})
    within = LLM(str(tmp_path), num_kv_blocks=32, block_size=4, max_model_len=32)
    assert_logprobs_equal_transformers(within, model, random_prompts(4, (20, 5)), max_tokens=12)
    past = LLM(str(tmp_path), num_kv_blocks=32, block_size=4, max_num_batched_tokens=16)
    assert past.engine.max_model_len == 64
    assert_logprobs_equal_transformers(past, model, random_prompts(5, (54,)), max_tokens=10)
    assert_engine_idle(past)


def test_phi4_minis_released_config() -> None:
    """configs/phi-4-mini: Phi-4-mini-instruct's config.json. 96 of its 128 head dims rotate;
    served to 131,072 its long factors, to 4,096 its short ones (both scaled by
    sqrt(1 + ln 32 / ln 4096))."""
    import math
    from pathlib import Path

    import transformers

    path = Path(__file__).resolve().parent.parent / "configs" / "phi-4-mini"
    ours = ModelConfig.from_dir(str(path))
    theirs = transformers.AutoConfig.from_pretrained(str(path))
    assert (ours.head_dim, ours.rotary_dim, ours.longest_sequence) == (128, 96, 131072)
    assert ours.tie_word_embeddings and ours.eos_token_ids == [200020]
    for served, hf_length in ((131072, 4097), (4096, 4096)):  # transformers: long past 4,096 tokens
        rotary = Rotary(ours, served)
        cos, sin = hf_tables(theirs, hf_length)
        torch.testing.assert_close(rotary.cos[:4096], cos[:4096], atol=2e-6, rtol=0)
        torch.testing.assert_close(rotary.sin[:4096], sin[:4096], atol=2e-6, rtol=0)
    assert math.isclose(ours.rope_scaling["attention_factor"], math.sqrt(1 + math.log(32) / math.log(4096)))
    small = ModelConfig.from_dir(str(path.parent / "phi-4-mini-small"))  # the CPU benchmark's
    assert (small.head_dim, small.rotary_dim, small.longest_sequence) == (128, 96, 8192)


def test_a_rope_scaling_override_keeps_the_checkpoints_theta(tmp_path) -> None:
    """YaRN switched on with --hf-overrides' rope_scaling over a config transformers 5 saved,
    whose rope_theta (and partial rotary) sit in its rope_parameters: they still hold."""
    import transformers

    yarn = {"rope_type": "yarn", "factor": 4.0, "original_max_position_embeddings": 32}
    model = save(str(tmp_path), "qwen3", max_position_embeddings=32,
                 rope_parameters={"rope_type": "default", "rope_theta": 1e6})
    intended = transformers.Qwen3ForCausalLM.from_pretrained(str(tmp_path), rope_parameters=yarn | {
        "rope_theta": 1e6}).eval()
    llm = LLM(str(tmp_path), num_kv_blocks=64, block_size=4, hf_overrides={"rope_scaling": yarn})
    assert llm.engine.runner.model_config.rope_theta == 1e6 and llm.engine.max_model_len == 128
    assert_logprobs_equal_transformers(llm, intended, random_prompts(6, (100,)), max_tokens=4)
    assert model.config.rope_parameters["rope_type"] == "default"
    without_partial = {key: value for key, value in longrope().items() if key != "partial_rotary_factor"}
    phi3 = model_config("phi3", rope_parameters=longrope(), rope_scaling=without_partial)
    assert phi3.rotary_dim == 2 * PAIRS


def test_phi3s_class_default_pretraining_length() -> None:
    """Phi3Config's original_max_position_embeddings (4,096) is always there, and it wins over
    the rope dict's, as transformers' standardisation puts it."""
    import transformers

    rope = longrope(original_max_position_embeddings=16)
    ours = model_config("phi3", max_position_embeddings=8192, rope_scaling=rope)
    theirs = transformers.Phi3Config(**(TINY_COMMON | dict(max_position_embeddings=8192, rope_parameters=rope)))
    assert ours.rope_scaling["original_max_position_embeddings"] == theirs.original_max_position_embeddings == 4096
    torch.testing.assert_close(Rotary(ours, 4097).cos, hf_tables(theirs, 4097)[0], atol=2e-5, rtol=0)


def test_gemma3s_yarn_reads_as_its_transformers_model() -> None:
    """Gemma 3's nested rope parameters: transformers reads neither yarn's `truncate` nor a
    top-level pretraining length for them, so neither does stoke; both layer types' tables
    equal its rotary embedding's."""
    import transformers
    from transformers.models.gemma3.modeling_gemma3 import Gemma3RotaryEmbedding

    yarn = {"rope_type": "yarn", "rope_theta": 1e6, "factor": 4.0, "original_max_position_embeddings": 16,
            "truncate": False}
    config = transformers.Gemma3TextConfig(**(TINY_COMMON | dict(
        head_dim=HEAD_DIM, max_position_embeddings=64, original_max_position_embeddings=4096,
        layer_types=["sliding_attention", "full_attention"], rope_parameters={
            "full_attention": yarn, "sliding_attention": {"rope_type": "default", "rope_theta": 1e4}})))
    ours = ModelConfig.from_dict(config.to_dict() | {"architectures": ["Gemma3ForCausalLM"]})
    assert ours.longest_sequence == 64 and ours.rope_scaling["truncate"] is True
    theirs = Gemma3RotaryEmbedding(config)
    for local, layer_type in ((False, "full_attention"), (True, "sliding_attention")):
        cos = theirs(torch.zeros(1), torch.arange(64)[None], layer_type)[0][0, :, :HEAD_DIM // 2]
        torch.testing.assert_close(Rotary(ours, 64, local=local).cos, cos, atol=2e-7, rtol=0)
