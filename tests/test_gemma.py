"""Gemma 2 and Gemma 3 (text) against transformers: tiny random checkpoints whose windows the
prompts outgrow, on the CPU serving kernels and the torch reference."""

from __future__ import annotations

import re
from pathlib import Path
import shutil

import pytest
import torch
from safetensors.torch import load_file, save_file

from engine import LLM, SamplingParams
from engine.config import ModelConfig
from tests.conftest import (TINY_COMMON, assert_classify_and_embed_equal_transformers, assert_engine_idle,
                            assert_logprobs_equal_transformers, random_prompts)

# Small windows (8 keys) under 4-key blocks and 16-token chunks: prompts of 60 cross them
# mid-block and mid-chunk. Random norm weights, so Gemma's 1 + w counts.
GEMMA = {
    "gemma2": ("Gemma2", dict(sliding_window=8, query_pre_attn_scalar=24, attn_logit_softcapping=5.0,
                              final_logit_softcapping=3.0)),
    "gemma3": ("Gemma3Text", dict(sliding_window=8, sliding_window_pattern=2, query_pre_attn_scalar=24,
                                  rope_scaling={"rope_type": "linear", "factor": 4.0}, rope_local_base_freq=100.0)),
}
SHAPE = dict(head_dim=32, num_hidden_layers=4, tie_word_embeddings=True)


def hf_class(kind: str, head: str):
    import transformers

    prefix = GEMMA[kind][0]
    if head == "ForCausalLM":
        prefix = prefix.removesuffix("Text")
    return getattr(transformers, f"{prefix}{head}")


def hf_config(kind: str, **changes: object):
    import transformers

    prefix, own = GEMMA[kind]
    return getattr(transformers, f"{prefix}Config")(**(TINY_COMMON | SHAPE | own | changes))


def raw_config(kind: str, **changes: object) -> dict:
    """config.json as transformers saves it for the causal LM."""
    return hf_config(kind, **changes).to_dict() | {"architectures": [hf_class(kind, "ForCausalLM").__name__]}


def save(kind: str, path: str, head: str = "ForCausalLM", **changes: object) -> torch.nn.Module:
    torch.manual_seed(0)
    model = hf_class(kind, head)(hf_config(kind, **changes))
    with torch.no_grad():
        for name, param in model.named_parameters():
            if "norm" in name:
                param.normal_(0.0, 0.5)
    model.save_pretrained(path)
    return model.eval()


@pytest.fixture(scope="module")
def gemmas(tmp_path_factory: pytest.TempPathFactory) -> dict[str, tuple[str, torch.nn.Module]]:
    root = tmp_path_factory.mktemp("gemma")
    return {kind: (str(root / kind), save(kind, str(root / kind))) for kind in GEMMA}



@pytest.mark.parametrize("backend", ["cpu", "reference"])
@pytest.mark.parametrize("kind", list(GEMMA))
def test_logprobs_equal_transformers_past_the_window(gemmas, kind: str, backend: str, monkeypatch) -> None:
    """Every prompt and answer token's logprob, prompts of 1 to 60 tokens in a batch prefilled
    in 16-token chunks beside the others' decodes, each answer 12 decodes."""
    monkeypatch.setenv("STOKE_ATTENTION_BACKEND", backend)
    path, model = gemmas[kind]
    llm = LLM(path, num_kv_blocks=96, block_size=4, max_num_batched_tokens=16)
    assert llm.engine.max_model_len == TINY_COMMON["max_position_embeddings"]  # not capped at the window
    assert_logprobs_equal_transformers(llm, model, random_prompts(1, (60, 1, 17, 9, 33)), max_tokens=12)
    assert_engine_idle(llm)


@pytest.mark.parametrize("hybrid, offload", [(True, False), (False, False), (True, True)])
def test_prefix_hits_and_preemption_keep_the_logprobs(gemmas, hybrid: bool, offload: bool) -> None:
    """Prompts sharing a 30-token prefix in a pool too small for all of them: cached prefixes
    and recomputed sequences attend to the same windows as a fresh run, with the sliding layers'
    blocks before their window given back (hybrid: two groups of two layers, so a block is half
    the bytes) or kept; and with a host tier, every group's blocks the pool evicted come back
    from host memory (`kv_offloading_size`: 64 blocks)."""
    path, model = gemmas["gemma3"]
    shared = random_prompts(2, (30,))[0]
    batch = [shared + p for p in random_prompts(3, (10, 20, 5, 14))]
    llm = LLM(path, num_kv_blocks=28 if hybrid else 22, block_size=4, max_num_batched_tokens=32,
              disable_hybrid_kv_cache_manager=not hybrid, kv_offloading_size=64 * 4096 / 2**30 if offload else 0)
    bm = llm.engine.scheduler.block_manager
    assert bm.windows == ((0, 8) if hybrid else (0,))
    for part, max_tokens in ((batch[:1], 4), (batch[1:], 16)):  # the first caches the prefix
        assert_logprobs_equal_transformers(llm, model, part, max_tokens, prompt_logprobs=False)
    assert bm.stats.hits_tokens > 0
    assert llm.engine.scheduler.stats.num_preemptions > 0
    assert (bm.stats.loaded_blocks > 0) == offload
    bm.check_invariants()
    assert_engine_idle(llm)


def test_beam_search_forks_every_groups_blocks(gemmas) -> None:
    """Three beams over Gemma 2's two KV groups, in a pool that holds them only with their
    sliding blocks given back (40 blocks; kept, the same bytes would give them 12 tokens each):
    each fork shares its parent's full blocks and copies its partial one in both groups, and
    the beams are transformers' `num_beams` search."""
    from engine.beam_search import BeamSearchParams
    from tests.conftest import hf_beams

    path, model = gemmas["gemma2"]
    llm = LLM(path, num_kv_blocks=40, block_size=4, max_num_batched_tokens=32)
    params = BeamSearchParams(beam_width=3, max_tokens=16, ignore_eos=True)
    prompts = random_prompts(13, (40, 27))
    outputs = llm.beam_search([{"prompt_token_ids": p} for p in prompts], params)
    for prompt, output in zip(prompts, outputs):
        expected, _ = hf_beams(model, prompt, params, None)
        assert [s.tokens[len(prompt):] for s in output.sequences] == expected
    assert_engine_idle(llm)


@pytest.mark.parametrize("kind", list(GEMMA))
def test_a_classifier_and_a_base_model_equal_transformers(tmp_path, kind: str) -> None:
    """Gemma's sequence classifier (its score head on the last token) and its base model's
    embeddings."""
    classifier = save(kind, str(tmp_path / "cls"), "ForSequenceClassification", num_labels=3, pad_token_id=0)
    base = save(kind, str(tmp_path / "base"), "Model")
    # tied: the base model's embedding is its head
    assert_classify_and_embed_equal_transformers((str(tmp_path / "cls"), classifier), (str(tmp_path / "base"), base),
                                                 random_prompts(4, (12, 30, 3)), has_lm_head=True)


def test_config_reads_gemma_as_transformers_does() -> None:
    """Windows by layer type, the scale, the softcaps (Gemma 2's class defaults where the
    key is missing, none where null) and Gemma 3's two ropes, in the old and new layouts."""
    gemma2 = ModelConfig.from_dict(raw_config("gemma2", sliding_window=16))
    assert gemma2.layer_windows == (16, 0, 16, 0)
    assert gemma2.attention_scale == 24 ** -0.5 and (gemma2.attn_softcap, gemma2.final_softcap) == (5.0, 3.0)
    raw = raw_config("gemma2")
    for key in ("attn_logit_softcapping", "final_logit_softcapping", "layer_types"):
        raw.pop(key)
    defaults = ModelConfig.from_dict(raw)
    assert (defaults.attn_softcap, defaults.final_softcap) == (50.0, 30.0) and defaults.layer_windows == (8, 0, 8, 0)
    nulls = ModelConfig.from_dict(raw | {"attn_logit_softcapping": None, "final_logit_softcapping": None})
    assert (nulls.attn_softcap, nulls.final_softcap) == (0.0, 0.0)
    gemma3 = ModelConfig.from_dict(raw_config("gemma3"))
    assert gemma3.layer_windows == (8, 0, 8, 0) and gemma3.local_rope == (100.0, None)
    assert (gemma3.rope_theta, gemma3.rope_scaling) == (1e6, {"rope_type": "linear", "factor": 4.0})
    legacy = {key: value for key, value in raw_config("gemma3").items()
              if key not in ("rope_parameters", "layer_types")}
    legacy |= {"rope_theta": 5e5, "rope_local_base_freq": 20.0, "rope_scaling": {"rope_type": "linear", "factor": 2.0},
               "sliding_window_pattern": 3, "num_hidden_layers": 6}
    old = ModelConfig.from_dict(legacy)
    assert old.layer_windows == (8, 8, 0, 8, 8, 0) and old.local_rope == (20.0, None)
    assert (old.rope_theta, old.rope_scaling) == (5e5, {"rope_type": "linear", "factor": 2.0})
    # Both layouts at once: transformers puts rope_scaling over the nested full-layer parameters.
    both = raw_config("gemma3") | {"rope_scaling": {"rope_type": "linear", "factor": 2.0}}
    theirs = hf_config("gemma3", rope_parameters=both["rope_parameters"],
                       rope_scaling=both["rope_scaling"]).rope_parameters
    ours = ModelConfig.from_dict(both)
    assert (ours.rope_theta, ours.rope_scaling["factor"]) == (theirs["full_attention"]["rope_theta"],
                                                              theirs["full_attention"]["factor"])
    assert ours.local_rope[0] == theirs["sliding_attention"]["rope_theta"]
    # What the models ignore: Gemma 3's attention softcap, Gemma 2's hidden_act (hidden_activation rules).
    assert ModelConfig.from_dict(raw_config("gemma3", attn_logit_softcapping=4.0)).attn_softcap == 0.0
    gelu = {key: value for key, value in raw_config("gemma2").items() if key != "hidden_activation"}
    assert ModelConfig.from_dict(gelu | {"hidden_act": "gelu"}).hidden_act == "gelu_pytorch_tanh"


@pytest.mark.parametrize(("changes", "message"), [
    ({"hidden_activation": "gelu"}, "hidden_act"),
    ({"use_bidirectional_attention": True}, "bidirectional"),
    ({"layer_types": ["full_attention"]}, "layer_types"),
    ({"sliding_window": -4}, "sliding_window"),
])
def test_config_refuses_what_it_cannot_compute(changes: dict, message: str) -> None:
    raw = raw_config("gemma3") | changes
    with pytest.raises(ValueError, match=message):
        ModelConfig.from_dict(raw)


def test_gemma3_with_a_vision_tower_is_served_as_its_language_model(tmp_path) -> None:
    """Gemma 3 4B and up (Gemma3ForConditionalGeneration): its text config and language
    model's weights, the vision tower left out; text logprobs equal transformers'."""
    import transformers

    torch.manual_seed(0)
    vision = transformers.SiglipVisionConfig(hidden_size=16, intermediate_size=32, num_hidden_layers=1,
                                             num_attention_heads=2, image_size=28, patch_size=14)
    config = transformers.Gemma3Config(text_config=hf_config("gemma3"), vision_config=vision, mm_tokens_per_image=4,
                                       eos_token_id=[2, 7])
    model = transformers.Gemma3ForConditionalGeneration(config).eval()
    with torch.no_grad():
        for name, param in model.named_parameters():
            if "norm" in name:
                param.normal_(0.0, 0.5)
    model.save_pretrained(str(tmp_path / "saved"))
    # transformers saves language_model.model.*; its version 5 holds model.language_model.*
    renamed = tmp_path / "renamed"
    shutil.copytree(tmp_path / "saved", renamed)
    tensors = load_file(str(renamed / "model.safetensors"))
    save_file({re.sub(r"^language_model\.model\.|^(vision_tower|multi_modal_projector)\.",
                      lambda m: f"model.{m.group(1) or 'language_model'}.", name): t for name, t in tensors.items()},
              str(renamed / "model.safetensors"))
    for path in (tmp_path / "saved", renamed):
        llm = LLM(str(path), num_kv_blocks=64, block_size=4, max_num_batched_tokens=16)
        assert llm.engine.runner.model_config.eos_token_ids == [2, 7]
        assert_logprobs_equal_transformers(llm, model, random_prompts(7, (40, 11)), max_tokens=8)
        assert_engine_idle(llm)


@pytest.mark.parametrize("name", ["gemma-3-4b", "gemma-3-small"])
def test_shipped_configs_read_as_transformers_reads_them(name: str) -> None:
    """configs/: Gemma 3 4B's released config.json (a text config naming only what differs
    from the class's defaults) and the CPU benchmark's small Gemma 3."""
    import transformers

    path = str(Path(__file__).resolve().parent.parent / "configs" / name)
    ours = ModelConfig.from_dir(path)
    theirs = transformers.AutoConfig.from_pretrained(path)
    theirs = getattr(theirs, "text_config", theirs)
    rope = theirs.rope_parameters
    assert (ours.vocab_size, ours.hidden_size, ours.num_heads, ours.num_kv_heads, ours.head_dim, ours.num_layers,
            ours.max_position_embeddings, ours.tie_word_embeddings) == \
        (theirs.vocab_size, theirs.hidden_size, theirs.num_attention_heads, theirs.num_key_value_heads,
         theirs.head_dim, theirs.num_hidden_layers, theirs.max_position_embeddings, theirs.tie_word_embeddings)
    assert ours.layer_windows == tuple(theirs.sliding_window if t == "sliding_attention" else 0
                                       for t in theirs.layer_types)
    assert ours.rope_theta == rope["full_attention"]["rope_theta"]
    assert ours.local_rope[0] == rope["sliding_attention"]["rope_theta"]
    assert ours.attention_scale == theirs.query_pre_attn_scalar ** -0.5


def test_bf16_keeps_gemmas_norms_in_fp32(tmp_path) -> None:
    """In bf16 Gemma's norms multiply by 1 + w in fp32 and round once, as transformers': the
    weights stay fp32 (the rest bf16), and each norm's output equals transformers' bit for bit
    (a bf16 checkpoint, as released)."""
    path = str(tmp_path)
    save("gemma3", path).to(torch.bfloat16).save_pretrained(path)
    llm = LLM(path, dtype="bfloat16", num_kv_blocks=64, block_size=4)
    ours = llm.engine.runner.model
    assert ours.model.embed_tokens.weight.dtype == torch.bfloat16
    theirs = hf_class("gemma3", "ForCausalLM").from_pretrained(path, dtype=torch.bfloat16).eval()
    x = torch.randn(5, TINY_COMMON["hidden_size"]).to(torch.bfloat16) * 3
    heads = torch.randn(5, 2, SHAPE["head_dim"]).to(torch.bfloat16)
    for mine, hf in ((ours.model.layers[1].pre_feedforward_layernorm, theirs.model.layers[1].pre_feedforward_layernorm),
                     (ours.model.norm, theirs.model.norm),
                     (ours.model.layers[0].self_attn.k_norm, theirs.model.layers[0].self_attn.k_norm)):
        assert mine.weight.dtype == torch.float32
        torch.testing.assert_close(mine.weight, hf.weight.float() + 1, atol=0, rtol=0)
        value = heads if mine is ours.model.layers[0].self_attn.k_norm else x
        with torch.no_grad():
            torch.testing.assert_close(mine(value), hf(value), atol=0, rtol=0)
    with torch.no_grad():  # the fused residual step rounds the sum in bf16 first, as the model does
        out, residual = ours.model.norm(x, x)
        torch.testing.assert_close(out, theirs.model.norm(x + x), atol=0, rtol=0)
    outputs = llm.generate(random_prompts(8, (40,)), SamplingParams(max_tokens=4, temperature=0.0), use_tqdm=False)
    assert len(outputs[0].outputs[0].token_ids) == 4
    assert_engine_idle(llm)
