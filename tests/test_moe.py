"""Mixtures of experts (Mixtral, Qwen2-MoE, Qwen3-MoE) against transformers: the routed MLP
layer by layer, greedy tokens through the engine (batched, chunked, prefix-cached, preempted),
both checkpoint layouts of the experts, and what is refused."""

from __future__ import annotations

import os
import random

import pytest
import torch
from safetensors.torch import save_file

from engine import LLM, SamplingParams
from engine.config import ModelConfig
from engine.models.llama import MLP
from engine.models.moe import SparseMoeBlock
from tests.conftest import (TINY_COMMON, TINY_MOE, assert_classify_and_embed_equal_transformers, assert_engine_idle,
                            hf_greedy, save_tiny_moe)
from tests.lora_adapters import hf_lora_greedy, save_adapter

KINDS = list(TINY_MOE)
GREEDY = SamplingParams(max_tokens=10, temperature=0.0, ignore_eos=True)


@pytest.fixture(scope="module")
def moe_checkpoints(tmp_path_factory: pytest.TempPathFactory) -> dict[str, str]:
    root = tmp_path_factory.mktemp("moe")
    return {kind: save_tiny_moe(os.path.join(root, kind), kind) for kind in KINDS}


def prompts(seed: int, count: int, longest: int = 40) -> list[list[int]]:
    rng = random.Random(seed)
    return [[rng.randrange(3, 500) for _ in range(rng.randrange(1, longest))] for _ in range(count)]


def tokens(llm: LLM, batch: list[list[int]], params: SamplingParams = GREEDY) -> list[list[int]]:
    return [list(o.outputs[0].token_ids) for o in llm.generate([{"prompt_token_ids": p} for p in batch], params)]


def hf_model(path: str) -> torch.nn.Module:
    import transformers

    return transformers.AutoModelForCausalLM.from_pretrained(path, dtype=torch.float32).eval()


@pytest.mark.parametrize("kind", KINDS)
def test_each_layers_mlp_equals_transformers(moe_checkpoints: dict[str, str], kind: str) -> None:
    """The routed MLP (and Qwen2-MoE's dense layer) on 300 random hidden states: every routing
    pattern the router makes, not only those a short greedy run meets."""
    path = moe_checkpoints[kind]
    ours = LLM(path, num_kv_blocks=8).engine.runner.model
    theirs = hf_model(path)
    x = torch.randn(300, 64, generator=torch.Generator().manual_seed(1))
    kinds = []
    for layer, (mine, hf_layer) in enumerate(zip(ours.model.layers, theirs.model.layers)):
        hf_mlp = getattr(hf_layer, "mlp", None) or hf_layer.block_sparse_moe
        with torch.no_grad():
            expected = hf_mlp(x[None])
            expected = (expected[0] if isinstance(expected, tuple) else expected)[0]
            got = mine.mlp(x)
        torch.testing.assert_close(got, expected, atol=1e-5, rtol=1e-5)
        kinds.append(type(mine.mlp).__name__)
    # Qwen2-MoE's tiny checkpoint keeps layer 1 dense (mlp_only_layers).
    assert kinds == (["SparseMoeBlock", "MLP"] if kind == "qwen2_moe" else ["SparseMoeBlock"] * 2)


@pytest.mark.parametrize("kind", KINDS)
def test_greedy_tokens_equal_transformers(moe_checkpoints: dict[str, str], kind: str) -> None:
    """A batch of ragged prompts, prefilled in 16-token chunks beside the others' decodes."""
    path = moe_checkpoints[kind]
    batch = prompts(0, 6)
    llm = LLM(path, num_kv_blocks=64, block_size=8, max_num_batched_tokens=16)
    assert tokens(llm, batch) == hf_greedy(path, batch, GREEDY.max_tokens)
    assert_engine_idle(llm)


def test_prefix_hits_and_preemption_keep_the_tokens(moe_checkpoints: dict[str, str]) -> None:
    """Prompts sharing a long prefix, in a pool too small for all of them at once: cached
    prefixes and recomputed (preempted) sequences route as a fresh run does."""
    path = moe_checkpoints["qwen3_moe"]
    shared = [7] * 30
    batch = [shared + p for p in prompts(6, 5, 12)]
    params = SamplingParams(max_tokens=24, temperature=0.0, ignore_eos=True)
    alone = LLM(path, num_kv_blocks=64, enable_prefix_caching=False)
    expected = [tokens(alone, [p], params)[0] for p in batch]
    llm = LLM(path, num_kv_blocks=14, block_size=8, max_num_batched_tokens=32)
    assert tokens(llm, batch, params) == expected
    assert llm.engine.scheduler.block_manager.stats.hits_tokens > 0
    assert llm.engine.scheduler.stats.num_preemptions > 0
    assert_engine_idle(llm)


def test_experts_stored_stacked_load_as_per_expert_ones(moe_checkpoints: dict[str, str], tmp_path) -> None:
    """transformers 5 holds a layer's experts stacked (experts.gate_up_proj [E, 2I, H],
    experts.down_proj [E, H, I]); a checkpoint saved that way serves the same tokens."""
    path = moe_checkpoints["qwen3_moe"]
    state = {k: v.contiguous() for k, v in hf_model(path).state_dict().items()}
    assert any(k.endswith("mlp.experts.gate_up_proj") for k in state), sorted(state)[:20]
    stacked = tmp_path / "stacked"
    stacked.mkdir()
    save_file(state, str(stacked / "model.safetensors"))
    (stacked / "config.json").write_text((open(os.path.join(path, "config.json")).read()))
    batch = prompts(2, 3)
    assert tokens(LLM(str(stacked), num_kv_blocks=32), batch) == tokens(LLM(path, num_kv_blocks=32), batch)


def _config(kind: str, **changes: object) -> dict:
    import transformers

    prefix, own = TINY_MOE[kind]
    raw = getattr(transformers, f"{prefix}Config")(**(TINY_COMMON | own)).to_dict()
    raw["architectures"] = [f"{prefix}ForCausalLM"]
    return raw | changes


def test_config_reads_each_familys_experts() -> None:
    qwen3 = ModelConfig.from_dict(_config("qwen3_moe", num_hidden_layers=4, decoder_sparse_step=2,
                                          mlp_only_layers=[3]))
    assert qwen3.moe is not None and qwen3.qk_norm and not qwen3.qkv_bias
    assert (qwen3.moe.num_experts, qwen3.moe.top_k, qwen3.moe.intermediate_size) == (8, 2, 32)
    assert qwen3.moe.renormalize and qwen3.moe.sparse_layers == {1}  # layer 3 is dense by name
    assert qwen3.moe.shared_expert_intermediate_size == 0
    qwen2 = ModelConfig.from_dict(_config("qwen2_moe"))
    assert qwen2.qkv_bias and not qwen2.moe.renormalize and qwen2.moe.shared_expert_intermediate_size == 48
    assert not ModelConfig.from_dict(_config("qwen2_moe", qkv_bias=False)).qkv_bias
    mixtral = ModelConfig.from_dict(_config("mixtral"))
    assert mixtral.moe.renormalize and mixtral.moe.sparse_layers == {0, 1} and mixtral.moe.intermediate_size == 128
    assert mixtral.layer_windows == ()
    assert ModelConfig.from_dict(_config("mixtral", sliding_window=256)).layer_windows == (256, 256)
    # Released Qwen3-MoE configs name the count num_experts (transformers 5 writes num_local_experts).
    raw = _config("qwen3_moe")
    raw["num_experts"] = raw.pop("num_local_experts")
    assert ModelConfig.from_dict(raw).moe.num_experts == 8
    # Both given: transformers reads Qwen3-MoE's and Mixtral's num_local_experts, Qwen2-MoE's num_experts.
    assert ModelConfig.from_dict(raw | {"num_local_experts": 4}).moe.num_experts == 4
    assert ModelConfig.from_dict(_config("qwen2_moe") | {"num_local_experts": 8}).moe.num_experts == 4


def test_no_tokens_is_no_rows() -> None:
    from kernels import reference

    w13, w2 = torch.randn(4, 32, 16), torch.randn(4, 16, 16)
    out = reference.fused_moe(torch.randn(0, 16), w13, w2, torch.ones(0, 2), torch.zeros(0, 2, dtype=torch.long))
    assert out.shape == (0, 16)


@pytest.mark.parametrize("changes, message", [
    ({"num_experts_per_tok": 9}, "num_experts_per_tok (9) exceeds num_experts (8)"),
    ({"num_experts_per_tok": 0}, "num_experts_per_tok must be an integer >= 1"),
    ({"moe_intermediate_size": "wide"}, "moe_intermediate_size must be an integer >= 1"),
    ({"decoder_sparse_step": 0}, "decoder_sparse_step must be an integer >= 1"),
    ({"mlp_only_layers": 1}, "mlp_only_layers must be a list of layer indices, got 1"),
])
def test_config_refuses_experts_it_cannot_run(changes: dict, message: str) -> None:
    with pytest.raises(ValueError, match=message.replace("(", r"\(").replace(")", r"\)")):
        ModelConfig.from_dict(_config("qwen3_moe", **changes))


def _damaged(path: str, out: str, damage) -> str:
    """A copy of the checkpoint at `path` whose tensors `damage` changed in place."""
    from safetensors.torch import load_file

    state = load_file(os.path.join(path, "model.safetensors"))
    damage(state)
    os.makedirs(out)
    save_file(state, os.path.join(out, "model.safetensors"))
    with open(os.path.join(path, "config.json")) as f:
        config = f.read()
    with open(os.path.join(out, "config.json"), "w") as f:
        f.write(config)
    return out


MIXTRAL_EXPERT = "model.layers.{}.block_sparse_moe.experts.{}.{}.weight"


@pytest.mark.parametrize("case, damage, message", [
    ("a missing expert", lambda s: s.pop(MIXTRAL_EXPERT.format(1, 3, "w3")), "missing weights: model.layers.1.mlp.w13"),
    ("a missing router", lambda s: s.pop("model.layers.0.block_sparse_moe.gate.weight"),
     "missing weights: model.layers.0.mlp.gate.weight"),
    ("a missing norm", lambda s: s.pop("model.layers.1.post_attention_layernorm.weight"),
     "missing weights: model.layers.1.post_attention_layernorm.weight"),
    ("an extra expert", lambda s: s.__setitem__(MIXTRAL_EXPERT.format(0, 4, "w1"),
                                                s[MIXTRAL_EXPERT.format(0, 0, "w1")].clone()),
     "is for expert 4, and the model has 4"),
    ("experts given twice", lambda s: s.__setitem__(
        "model.layers.0.mlp.experts.down_proj", torch.stack([s[MIXTRAL_EXPERT.format(0, e, "w2")] for e in range(4)])),
     "fills model.layers.0.mlp.w2 again"),
    ("a wrong shape", lambda s: s.__setitem__(MIXTRAL_EXPERT.format(0, 2, "w2"), torch.zeros(64, 64)),
     r"has shape \(64, 64\), expected \(64, 128\)"),
])
def test_a_checkpoint_that_does_not_fit_is_refused(moe_checkpoints: dict[str, str], tmp_path, case: str, damage,
                                                   message: str) -> None:
    broken = _damaged(moe_checkpoints["mixtral"], str(tmp_path / "broken"), damage)
    with pytest.raises(ValueError, match=message):
        LLM(broken, num_kv_blocks=8)


def test_an_attention_adapter_serves_and_an_mlp_adapter_on_experts_is_refused(
    moe_checkpoints: dict[str, str], tmp_path
) -> None:
    from engine import LoRARequest

    path = moe_checkpoints["qwen2_moe"]  # layer 0 experts, layer 1 dense
    attention = save_adapter(str(tmp_path / "attn"), path, modules=("q_proj", "v_proj", "o_proj"), rank=4)
    dense_mlp = save_adapter(str(tmp_path / "dense"), path, modules=("gate_proj", "down_proj"), layers=[1], rank=4)
    experts_mlp = save_adapter(str(tmp_path / "experts"), path, modules=("up_proj",), layers=[0], rank=4)
    batch = prompts(9, 3)
    llm = LLM(path, num_kv_blocks=64, enable_lora=True, max_loras=2, max_lora_rank=4)
    for i, adapter in enumerate((attention, dense_mlp), start=1):
        got = [list(o.outputs[0].token_ids) for o in llm.generate(
            [{"prompt_token_ids": p} for p in batch], GREEDY, lora_request=LoRARequest(f"a{i}", i, adapter))]
        assert got == hf_lora_greedy(path, adapter, batch, GREEDY.max_tokens)
    with pytest.raises(ValueError, match="adapts layer 0's MLP, which is a mixture of experts here"):
        llm.generate([{"prompt_token_ids": batch[0]}], GREEDY, lora_request=LoRARequest("e", 3, experts_mlp))
    assert_engine_idle(llm)


@pytest.mark.parametrize("kind", KINDS)
def test_a_classifier_and_a_base_model_of_experts_equal_transformers(tmp_path, kind: str) -> None:
    """`*MoeForSequenceClassification` (its score head on the last token) and the base model
    saved without an LM head (`*MoeModel`, embeddings), as transformers computes them."""
    import transformers

    prefix, own = TINY_MOE[kind]
    config = getattr(transformers, f"{prefix}Config")(**(TINY_COMMON | own | {"num_labels": 3, "pad_token_id": 0}))
    batch = prompts(12, 3)
    torch.manual_seed(0)
    classifier = getattr(transformers, f"{prefix}ForSequenceClassification")(config).eval()
    classifier.save_pretrained(str(tmp_path / "cls"))
    base = getattr(transformers, f"{prefix}Model")(config).eval()
    base.save_pretrained(str(tmp_path / "base"))
    assert_classify_and_embed_equal_transformers((str(tmp_path / "cls"), classifier), (str(tmp_path / "base"), base),
                                                 batch)


def test_routing_weights_follow_the_model() -> None:
    """Renormalised top-k weights sum to 1; Qwen2-MoE's raw probabilities sum to less."""
    for kind, renormalised in (("qwen3_moe", True), ("qwen2_moe", False)):
        block = SparseMoeBlock(ModelConfig.from_dict(_config(kind)), MLP)
        torch.nn.init.normal_(block.gate.weight, std=0.5)
        weights, experts = block.route(torch.randn(50, 64))
        assert weights.dtype == torch.float32 and experts.shape == (50, 2)
        sums = weights.sum(-1)
        if renormalised:
            torch.testing.assert_close(sums, torch.ones(50))
        else:
            assert (sums < 1).all()
