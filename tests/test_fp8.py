"""FP8 weights (engine/fp8.py): checkpoints saved in fp8, and quantization="fp8" over wider ones.

The oracle is transformers over the same weights dequantized: each fp8 checkpoint here is
written by its format's own writer (transformers' FineGrainedFP8 quantizer for HF's "fp8";
compressed-tensors' layouts by hand, as llm-compressor saves them), dequantized by the format's
rule into a plain fp32 checkpoint (transformers' own dequantizer for "fp8"), and run by
transformers. stoke must give its greedy tokens and, prompt and answer, its logprobs.
"""

from __future__ import annotations

import json
import os
import shutil

import pytest
import torch
from safetensors.torch import save_file

from engine import LLM, SamplingParams
from engine.config import ModelConfig
from engine.fp8 import FP8, FP8_MAX
from engine.weights import iterate_safetensors
from tests.conftest import (assert_engine_idle, assert_logprobs_equal_transformers, hf_greedy, random_prompts,
                            save_tiny_causal_lm, save_tiny_moe)

PROMPTS = random_prompts(7, [5, 23, 40])
PROJECTIONS = ("q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj")


def _state(path: str) -> dict[str, torch.Tensor]:
    return {name: tensor.contiguous() for name, tensor in iterate_safetensors(path)}


def _config(path: str) -> dict:
    with open(os.path.join(path, "config.json")) as f:
        return json.load(f)


def _save(path: str, state: dict[str, torch.Tensor], config: dict) -> str:
    os.makedirs(path, exist_ok=True)
    save_file(state, os.path.join(path, "model.safetensors"))
    with open(os.path.join(path, "config.json"), "w") as f:
        json.dump(config, f)
    return path


def _is_projection(name: str) -> bool:
    return name.endswith(".weight") and name.split(".")[-2] in PROJECTIONS


def _amax_scale(values: torch.Tensor) -> torch.Tensor:
    amax = values.abs().amax(-1, keepdim=True)
    return torch.where(amax > 0, amax / FP8_MAX, torch.ones_like(amax))


def _ct_quantize(weight: torch.Tensor, strategy: str, group: int = 0, block: tuple[int, int] = (0, 0)
                 ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """compressed-tensors' float8 weight, its `weight_scale` as saved for `strategy`, and the
    weight it stands for (fp8 times the scale): per tensor [1], channel [N, 1], group [N, G],
    block [ceil(N / bn), ceil(K / bk)], each scale amax / 448 over what it covers."""
    w = weight.float()
    n, k = w.shape
    if strategy == "tensor":
        scale = _amax_scale(w.reshape(1, -1)).reshape(1)
        expanded = scale.expand(n, k)
    elif strategy == "channel":
        scale = _amax_scale(w)
        expanded = scale.expand(n, k)
    else:
        rows, cols = (1, group) if strategy == "group" else block
        tiles = torch.zeros(-(-n // rows) * rows, -(-k // cols) * cols)
        tiles[:n, :k] = w
        grid = tiles.unflatten(0, (-1, rows)).unflatten(-1, (-1, cols)).transpose(1, 2)  # [R, C, rows, cols]
        scale = _amax_scale(grid.flatten(-2)).squeeze(-1)
        expanded = scale.repeat_interleave(rows, 0).repeat_interleave(cols, 1)[:n, :k]
    quantized = (w / expanded).clamp(-FP8_MAX, FP8_MAX).to(FP8)
    return quantized, scale, quantized.float() * expanded


def _run(path: str, **engine_args: object) -> LLM:
    return LLM(path, num_kv_blocks=64, block_size=8, max_num_batched_tokens=32, **engine_args)


def _greedy(llm: LLM, max_tokens: int = 8) -> list[list[int]]:
    params = SamplingParams(max_tokens=max_tokens, temperature=0.0, ignore_eos=True)
    outs = llm.generate([{"prompt_token_ids": p} for p in PROMPTS], params, use_tqdm=False)
    return [list(o.outputs[0].token_ids) for o in outs]


def _assert_like_transformers(llm: LLM, reference: str) -> None:
    import transformers

    assert _greedy(llm) == hf_greedy(reference, PROMPTS, 8)
    model = transformers.AutoModelForCausalLM.from_pretrained(reference, dtype=torch.float32).eval()
    assert_logprobs_equal_transformers(llm, model, PROMPTS, 6)
    assert_engine_idle(llm)


def _weight(module: torch.nn.Module) -> torch.Tensor:
    """An fp8 projection's weight, unpacked where the CPU's C product packed it."""
    if module.packed is None:
        return module.weight
    return module.kernels.unpack_linear_weight(module.packed, module.out_features, module.in_features)


def _fp8_linears(llm: LLM) -> dict[str, torch.nn.Module]:
    from engine.models.llama import Linear

    return {name: m for name, m in llm.engine.runner.model.named_modules()
            if isinstance(m, Linear) and m.weight.dtype == FP8}


def _assert_experts_fp8(llm: LLM, held: bool, group: int | None = None) -> None:
    """Every sparse layer's experts in fp8 (with scales per row and `group` columns) if `held`,
    else none; whether or not, the router at the model's dtype."""
    from engine.models.moe import SparseMoeBlock

    blocks = [m for m in llm.engine.runner.model.modules() if isinstance(m, SparseMoeBlock)]
    assert blocks or not held
    for block in blocks:
        assert block.gate.weight.dtype == torch.float32
        assert (block.w13.dtype == FP8) == held and (block.w2.dtype == FP8) == held
    for block in blocks if held else []:
        hidden, inter = block.w13.shape[-1], block.w2.shape[-1]
        assert block.w13_scale.shape[-1] == -(-hidden // (group or hidden))
        assert block.w2_scale.shape[-1] == -(-inter // (group or inter))


# ----------------------------------------------------------------------------- HF's "fp8"


def _source(kind: str, tiny_checkpoints: dict[str, str], tmp_path, **config: object) -> str:
    """A tiny checkpoint: conftest's dense ones, or a mixture of experts saved here."""
    return tiny_checkpoints[kind] if kind in tiny_checkpoints else save_tiny_moe(str(tmp_path / kind), kind, **config)


def _with_biases(name: str, tensor: torch.Tensor) -> torch.Tensor:
    """Qwen2's qkv biases drawn away from the zeros transformers saves, so the product's bias counts."""
    return torch.randn(tensor.shape, generator=torch.Generator().manual_seed(len(name))) * 0.5 \
        if name.endswith("proj.bias") else tensor


# (tiny model, modules_to_not_convert: transformers' reading, a parent's name and a regex)
HF_CASES = {"llama": ("llama", ["model.layers.1.self_attn", "model.layers.0.mlp.down_proj"]),
            "qwen3_moe": ("qwen3_moe", ["model.layers.[1].self_attn"])}


@pytest.mark.parametrize("kind", list(HF_CASES))
def test_hf_fp8_block_checkpoint_gives_the_tokens_of_transformers(kind, tiny_checkpoints, tmp_path) -> None:
    """Qwen3-FP8's and Qwen3-30B-A3B-FP8's layout: 16 x 32 blocks (128 x 128 there; rows and
    columns apart), written and dequantized by transformers' own FineGrainedFP8 code; q/k/v and
    gate/up fused from shards with their own block grids, experts stacked from theirs; the
    router, the LM head and what modules_to_not_convert names left wide."""
    from transformers import FineGrainedFP8Config
    from transformers.integrations.finegrained_fp8 import Fp8Dequantize, Fp8Quantize

    model, skip = HF_CASES[kind]
    source = _source(model, tiny_checkpoints, tmp_path)
    quant_config = FineGrainedFP8Config(weight_block_size=(16, 32), modules_to_not_convert=skip)
    quantizer = type("Quantizer", (), {"quantization_config": quant_config})()
    write, read = Fp8Quantize(quantizer), Fp8Dequantize(quantizer)
    state, plain = {}, {}
    for name, tensor in _state(source).items():
        wide = name.startswith(("model.layers.1.self_attn.", "model.layers.0.mlp.down_proj."))
        if _is_projection(name) and not wide:
            saved = write._quantize_one(name, tensor)
            state |= saved
            plain[name] = read._dequantize_one(saved[name], saved[name + "_scale_inv"], torch.float32)
        else:
            state[name] = plain[name] = tensor
    config = _config(source)
    quantized = _save(str(tmp_path / "fp8"), state, config | {"quantization_config": json.loads(
        json.dumps(quant_config.to_dict(), default=str))})
    reference = _save(str(tmp_path / "plain"), plain, config)

    llm = _run(quantized)
    linears = _fp8_linears(llm)
    expected = {"model.layers.0.self_attn.qkv_proj", "model.layers.0.self_attn.o_proj"}
    if kind == "llama":
        expected |= {"model.layers.0.mlp.gate_up_proj", "model.layers.1.mlp.gate_up_proj",
                     "model.layers.1.mlp.down_proj"}
    assert set(linears) == expected
    _assert_experts_fp8(llm, kind == "qwen3_moe", 32)
    assert all(m.fp8_group_size == 32 and m.weight_scale.shape == (m.out_features, m.in_features // 32)
               for m in linears.values())
    _assert_like_transformers(llm, reference)


# ----------------------------------------------------------------------------- compressed-tensors


CT_CASES = {
    # (tiny model, weight strategy, its arguments, what the config ignores, and whether a module is
    # then left wide: compressed-tensors reads a name whole, after "re:" a regex from the start)
    "tensor": ("llama", "tensor", {}, ["lm_head"], lambda m: m == "lm_head"),
    "channel": ("qwen3", "channel", {}, ["lm_head", "model.layers.1.mlp.down_proj"],
                lambda m: m in ("lm_head", "model.layers.1.mlp.down_proj")),
    # a narrower last group: 64 = 48 + 16; qkv biases
    "group": ("qwen2", "group", {"group": 48}, ["re:.*lm_head"], lambda m: m == "lm_head"),
    # rows and columns apart, ragged both ways; the LM head quantized too
    "block": ("mistral", "block", {"block": (48, 40)}, [], lambda m: False),
    # Mixtral's names for its experts, left wide; its attention per channel
    "experts": ("mixtral", "channel", {}, ["lm_head", "re:.*block_sparse_moe.experts"],
                lambda m: m == "lm_head" or ".experts." in m),
    # Qwen2-MoE's shared expert left wide, its experts per channel
    "shared": ("qwen2_moe", "channel", {}, ["lm_head", "re:model.layers.0.mlp.shared_expert."],
               lambda m: m == "lm_head" or ".shared_expert." in m),
}


def _ct_config(strategy: str, args: dict, ignore: list[str]) -> dict:
    weights = {"num_bits": 8, "type": "float", "strategy": strategy, "symmetric": True, "dynamic": False,
               "group_size": args.get("group"), "block_structure": list(args["block"]) if "block" in args else None}
    activations = {"num_bits": 8, "type": "float", "strategy": "tensor", "symmetric": True, "dynamic": False}
    return {"quant_method": "compressed-tensors", "format": "float-quantized", "quantization_status": "compressed",
            "config_groups": {"group_0": {"targets": ["Linear"], "weights": weights, "input_activations": activations}},
            "ignore": ignore, "kv_cache_scheme": None}


@pytest.mark.parametrize("case", list(CT_CASES))
def test_compressed_tensors_fp8_checkpoint_gives_the_tokens_of_transformers(case, tiny_checkpoints, tmp_path) -> None:
    """llm-compressor's FP8 layouts: a scale per tensor (fused shards of different scales), per
    channel, per group (the last narrower), per block (a ragged grid, the LM head quantized);
    modules the config ignores stay wide (by Mixtral's own names too); static input, output and
    KV-cache scales are read past."""
    kind, strategy, args, ignore, wide = CT_CASES[case]
    source = _source(kind, tiny_checkpoints, tmp_path)
    state, plain = {}, {}
    config = _config(source)
    for name, tensor in _state(source).items():
        tensor = _with_biases(name, tensor)
        module = name.removesuffix(".weight")
        if (_is_projection(name) or name in ("lm_head.weight", *(f"{m}.weight" for m in ("w1", "w2", "w3")))
                or name.split(".")[-2] in ("w1", "w2", "w3")) and not wide(module):
            state[name], state[f"{module}.weight_scale"], plain[name] = _ct_quantize(tensor, strategy, **args)
            state[f"{module}.input_scale"] = torch.tensor([0.02])
        else:
            state[name] = plain[name] = tensor
        if name.endswith("self_attn.k_proj.weight"):
            attention = name.removesuffix(".k_proj.weight")
            state |= {f"{attention}.k_scale": torch.tensor(0.1), f"{attention}.v_scale": torch.tensor(0.1),
                      f"{module}.output_scale": torch.tensor([0.1])}
    quantized = _save(str(tmp_path / "ct"), state, config | {"quantization_config": _ct_config(strategy, args, ignore)})
    reference = _save(str(tmp_path / "plain"), plain, config)

    llm = _run(quantized)
    linears = _fp8_linears(llm)
    assert ("lm_head" in linears) == (case == "block")
    assert ("model.layers.1.mlp.down_proj" in linears) == (case not in ("channel", "experts"))  # Mixtral: experts
    assert ("model.layers.0.mlp.shared_expert.down_proj" in linears) is False
    _assert_experts_fp8(llm, case == "shared", None)
    _assert_like_transformers(llm, reference)


# ----------------------------------------------------------------------------- quantization="fp8"


@pytest.mark.parametrize("kind", ["qwen3", "qwen2_moe"])
def test_online_fp8_gives_the_tokens_of_transformers_over_the_weights_it_kept(kind, tiny_checkpoints,
                                                                              tmp_path) -> None:
    """quantization="fp8" over an fp32 checkpoint: each projection row quantized with its own
    scale (amax / 448), experts' and a shared expert's too (Qwen2-MoE); transformers over those
    weights dequantized gives the same tokens, and the projections hold a byte a weight."""
    # experts wider than the model (96 > 64): their down projection's rows are 96 long
    source = _source(kind, tiny_checkpoints, tmp_path, moe_intermediate_size=96)
    plain = {}
    for name, tensor in _state(source).items():
        plain[name] = _ct_quantize(tensor, "channel")[2] if _is_projection(name) else tensor
    reference = _save(str(tmp_path / "plain"), plain, _config(source))

    llm = _run(source, quantization="fp8")
    linears = _fp8_linears(llm)
    # qkv, o, and gate_up, down of the dense MLP (Qwen2-MoE's: its shared expert's, and layer 1's)
    assert len(linears) == (4 + 2 + 2 if kind == "qwen2_moe" else 8)
    assert all(m.weight_scale.shape == (m.out_features, 1) for m in linears.values())
    _assert_experts_fp8(llm, kind == "qwen2_moe")
    for module in linears.values():  # a byte a weight (a quarter of fp32's), and a scale a row
        assert module.packed is not None  # the CPU's C product, over its packed copy (rows padded to 16)
        assert module.packed.dtype == FP8 and module.weight.numel() == 0
        assert module.packed.nbytes == -(-module.out_features // 16) * 16 * module.in_features
        assert module.weight_scale.nbytes == module.out_features * 4
    _assert_like_transformers(llm, reference)


def test_online_fp8_with_dummy_weights_quantizes_them(tiny_checkpoints) -> None:
    """load_format="dummy" with quantization="fp8" (a benchmark's): the random weights are
    quantized as a checkpoint's would be, scales and all, and the engine generates."""
    llm = _run(tiny_checkpoints["llama"], load_format="dummy", quantization="fp8")
    for module in _fp8_linears(llm).values():
        assert bool((module.weight_scale > 0).all())
        weight = _weight(module)
        assert float(weight.float().abs().amax(-1).min()) == FP8_MAX  # each row's largest weight is 448
    assert all(len(tokens) == 8 for tokens in _greedy(llm))


# ----------------------------------------------------------------------------- refused


def test_quantizations_stoke_does_not_serve_are_refused_with_their_names(tiny_checkpoints, tmp_path) -> None:
    source = tiny_checkpoints["llama"]
    raw = _config(source)
    with pytest.raises(ValueError, match="quant_method 'awq' is not supported"):
        ModelConfig.from_dict(raw | {"quantization_config": {"quant_method": "awq", "bits": 4}})
    int8 = _ct_config("channel", {}, []) | {"config_groups": {"g": {"targets": ["Linear"], "weights": {
        "num_bits": 8, "type": "int", "strategy": "channel", "symmetric": True}}}}
    with pytest.raises(ValueError, match="type 'int' with 8 bits are not supported"):
        ModelConfig.from_dict(raw | {"quantization_config": int8})
    with pytest.raises(ValueError, match="fp8 format 'e5m2'"):
        ModelConfig.from_dict(raw | {"quantization_config": {"quant_method": "fp8", "fmt": "e5m2"}})
    with pytest.raises(ValueError, match="quantization must be one of fp8, compressed-tensors"):
        LLM(source, quantization="int4")
    with pytest.raises(ValueError, match="the checkpoint has no such quantization_config"):
        LLM(source, quantization="compressed-tensors")


def test_a_checkpoint_that_disagrees_with_its_quantization_config_is_refused(tiny_checkpoints, tmp_path) -> None:
    """Tensor by tensor: a projection the config quantizes saved wide, an fp8 tensor in a module
    the config leaves out, and a fused projection the config would split."""
    source = tiny_checkpoints["llama"]
    config = _config(source)
    state = {}
    for name, tensor in _state(source).items():
        if _is_projection(name):
            state[name], state[name + "_scale"], _ = _ct_quantize(tensor, "channel")
        else:
            state[name] = tensor
    wide_down = dict(state, **{"model.layers.0.mlp.down_proj.weight": torch.zeros(64, 128)})
    path = _save(str(tmp_path / "wide"), wide_down, config | {"quantization_config": _ct_config("channel", {}, ["lm_head"])})
    with pytest.raises(ValueError, match="'model.layers.0.mlp.down_proj.weight' is float32, and its quantization "
                                         "config says the projection is fp8"):
        _run(path)
    left_out = _ct_config("channel", {}, ["lm_head", "model.layers.0.mlp.down_proj"])
    path = _save(str(tmp_path / "left_out"), state, config | {"quantization_config": left_out})
    with pytest.raises(ValueError, match="'model.layers.0.mlp.down_proj.weight' is fp8, and stoke holds "
                                         "model.layers.0.mlp.down_proj.weight at the model's dtype"):
        _run(path)
    split = _ct_config("channel", {}, ["lm_head", "model.layers.0.self_attn.k_proj"])
    shutil.copytree(path, str(tmp_path / "split"))
    with open(tmp_path / "split" / "config.json", "w") as f:
        json.dump(config | {"quantization_config": split}, f)
    with pytest.raises(ValueError, match="leaves some of .*q_proj.*k_proj.*v_proj unquantized"):
        _run(str(tmp_path / "split"))


def test_what_the_heads_and_scales_of_a_checkpoint_say_is_read_or_refused_by_name(tiny_checkpoints,
                                                                                  tmp_path) -> None:
    """A base model (no LM head) saved with every Linear targeted loads for embeddings; a tied
    head's quantized copy is read past (the embedding is the head, as vLLM reads it); fp8
    tensors without a quantization_config, an fp8 score head, and an LLM reranker over an fp8 LM
    head are refused by name; experts the config would split are refused."""
    import transformers

    from tests.conftest import TINY_COMMON

    def channel(state: dict[str, torch.Tensor], head: bool = False) -> dict[str, torch.Tensor]:
        out = {}
        for name, tensor in state.items():
            if _is_projection(name) or (head and name in ("lm_head.weight", "score.weight")):
                out[name], out[name + "_scale"], _ = _ct_quantize(tensor, "channel")
            else:
                out[name] = tensor
        return out

    torch.manual_seed(0)
    base = str(tmp_path / "base")
    transformers.LlamaModel(transformers.LlamaConfig(**TINY_COMMON)).save_pretrained(base)
    path = _save(str(tmp_path / "base_ct"), channel(_state(base)), _config(base) | {"quantization_config":
                                                                                    _ct_config("channel", {}, [])})
    embedder = _run(path)
    assert not embedder.engine.runner.model.has_lm_head and _fp8_linears(embedder)
    assert len(embedder.embed([[5, 6, 7]], use_tqdm=False)[0].outputs.embedding) == TINY_COMMON["hidden_size"]

    tied = tiny_checkpoints["qwen2"]  # tie_word_embeddings: the head is the embedding
    state = channel(_state(tied) | {"lm_head.weight": _state(tied)["model.embed_tokens.weight"]}, head=True)
    llm = _run(_save(str(tmp_path / "tied"), state, _config(tied) | {"quantization_config":
                                                                    _ct_config("channel", {}, [])}))
    assert llm.engine.runner.model.lm_head is None and "lm_head" not in _fp8_linears(llm)

    source = tiny_checkpoints["llama"]
    path = _save(str(tmp_path / "no_config"), channel(_state(source)), _config(source))
    with pytest.raises(ValueError, match="'model.layers.0.mlp.down_proj.weight' is fp8, and the checkpoint's "
                                         "config.json has no quantization_config"):
        _run(path)
    path = _save(str(tmp_path / "scales_only"), _state(source) | {"model.layers.0.self_attn.k_scale": torch.tensor(1.0)},
                 _config(source))
    with pytest.raises(ValueError, match="'model.layers.0.self_attn.k_scale' is a quantization scale, and the "
                                         "checkpoint's config.json has no quantization_config"):
        _run(path)
    classifier = str(tmp_path / "classifier")
    torch.manual_seed(0)
    transformers.LlamaForSequenceClassification(transformers.LlamaConfig(**TINY_COMMON, num_labels=2)
                                                ).save_pretrained(classifier)
    path = _save(str(tmp_path / "classifier_ct"), channel(_state(classifier), head=True),
                 _config(classifier) | {"quantization_config": _ct_config("channel", {}, [])})
    with pytest.raises(ValueError, match="'score.weight' is fp8, and stoke holds score.weight at the model's dtype"):
        _run(path)
    causal = save_tiny_causal_lm(str(tmp_path / "causal"), "llama", tie_word_embeddings=False)  # with a tokenizer
    reranker = _save(causal, channel(_state(causal), head=True),
                     _config(causal) | {"quantization_config": _ct_config("channel", {}, [])})
    with pytest.raises(ValueError, match="classifier_from_token reads the LM head's rows, and this checkpoint's is fp8"):
        _run(reranker, hf_overrides={"architectures": ["LlamaForSequenceClassification"],
                                     "classifier_from_token": ["no", "yes"], "method": "from_2_way_softmax"})
    moe = save_tiny_moe(str(tmp_path / "moe"), "qwen3_moe")
    half = _ct_config("channel", {}, ["lm_head", "re:.*experts.*down_proj"])
    config = _config(moe) | {"quantization_config": half}
    with open(os.path.join(moe, "config.json"), "w") as f:
        json.dump(config, f)
    with pytest.raises(ValueError, match="leaves some of model.layers.0.mlp.experts.0.gate_proj, .* unquantized"):
        _run(moe)


def test_dequantizing_rounds_once_and_a_16_bit_engine_keeps_fp8_weights_and_fp32_scales(tiny_checkpoints) -> None:
    """The weight times its scale in fp32, then one rounding to the dtype (as transformers
    dequantizes), with scales a bf16 could not hold; a bf16 engine casts all but the fp8
    weights and their scales."""
    from kernels.reference import dequantize_fp8

    for columns in (40, 48):  # a narrower last group, and whole ones
        weight = (torch.randn(8, columns) * 100).to(FP8)
        scale = torch.rand(8, 3) * 1e-3 + 1e-4
        exact = weight.float() * scale.repeat_interleave(16, dim=1)[:, :columns]
        assert torch.equal(dequantize_fp8(weight, scale, 16, torch.bfloat16), exact.to(torch.bfloat16))
    llm = _run(tiny_checkpoints["qwen3"], quantization="fp8", dtype="bfloat16")
    for name, param in llm.engine.runner.model.named_parameters():
        want = FP8 if name in {f"{m}.weight" for m in _fp8_linears(llm)} else \
            torch.float32 if name.endswith("_scale") else torch.bfloat16
        assert param.dtype == want or param.numel() == 0, name
    assert all(len(tokens) == 8 for tokens in _greedy(llm))
