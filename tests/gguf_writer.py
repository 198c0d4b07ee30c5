"""Write a tiny Hugging Face checkpoint as a GGUF file, the way llama.cpp's convert_hf_to_gguf.py does.

Why this exists: engine/gguf.py turns llama.cpp GGUF files back into Hugging Face checkpoints, and its
tests need GGUF files whose source weights they know. Real GGUF files are large and need the network,
so the tests build a tiny random HF model, write it here, read it back with engine/gguf.py and compare.
That only proves something if this writer follows llama.cpp's conventions rather than our reader's
guesses, so every rule below is taken from convert_hf_to_gguf.py (classes TextModel, LlamaModel,
Qwen2Model, Qwen3Model, Gemma2Model, Gemma3Model; ModelBase.prepare_tensors for the tensor types):

- metadata: TextModel.set_gguf_parameters' keys (Gemma2 writes its own short list, with no rope keys);
  llama adds ``vocab_size`` and ``rope.dimension_count``; Gemma3 overrides a few with its defaults.
- tensors: HF names mapped with gguf's TensorNameMap; llama/mistral q/k rows permuted (LlamaModel.permute)
  to ggml's interleaved RoPE layout; every Gemma ``*norm.weight`` (Gemma3's q_norm/k_norm included)
  stored +1; Gemma2 drops ``lm_head``; a tied ``lm_head`` is not written, so ``output.weight`` is absent;
  a llama3 rope scaling becomes the ``rope_freqs`` tensor.
- types: 1-D tensors and ``*_norm.weight`` stay F32; the rest is F32, F16 or Q8_0 (F16 where a row does
  not split into Q8_0 blocks), quantised with gguf.quants.quantize.
- tokenizer: the SmolLM2 vocabulary's ``tokenizer.*`` fields, copied from the embedded GGUF file
  (for a model of a smaller vocabulary, its first tokens and the merges among them).

The model's shape comes from ``AutoConfig.to_dict()``, as the convert script reads it, so legacy
``rope_theta``/``rope_scaling`` configs and ``rope_parameters`` configs both work. A Gemma2 rope other
than theta 10000 and rope scalings other than linear/yarn/llama3 are refused. Some settings the format
does not state at all, as in llama.cpp, so a test model that should survive the round trip must use
llama.cpp's fixed values: Mistral's ``sliding_window`` (not written; llama.cpp's llama arch has none),
Gemma's ``query_pre_attn_scalar`` (llama.cpp uses head_dim, bar the 27B sizes) and Gemma3's layer
pattern (llama.cpp makes every 6th layer global, the rest sliding).
"""

from __future__ import annotations

import functools
import glob
import math
import os
from pathlib import Path
from typing import Any, Iterator

import gguf
import numpy as np
import torch

__all__ = ["GGUF_ARCHS", "write_gguf"]

# HF model_type -> GGUF general.architecture (llama.cpp converts MistralForCausalLM with LlamaModel).
GGUF_ARCHS = {
    "llama": "llama",
    "mistral": "llama",
    "qwen2": "qwen2",
    "qwen3": "qwen3",
    "gemma2": "gemma2",
    "gemma3_text": "gemma3",
    "qwen3_moe": "qwen3moe",
}

_FILE_TYPES = {
    "F32": gguf.LlamaFileType.ALL_F32,
    "F16": gguf.LlamaFileType.MOSTLY_F16,
    "Q8_0": gguf.LlamaFileType.MOSTLY_Q8_0,
    "BF16": gguf.LlamaFileType.MOSTLY_BF16,
}
_TENSOR_TYPES = {
    gguf.LlamaFileType.ALL_F32: gguf.GGMLQuantizationType.F32,
    gguf.LlamaFileType.MOSTLY_F16: gguf.GGMLQuantizationType.F16,
    gguf.LlamaFileType.MOSTLY_Q8_0: gguf.GGMLQuantizationType.Q8_0,
    gguf.LlamaFileType.MOSTLY_BF16: gguf.GGMLQuantizationType.BF16,
}


def write_gguf(hf_dir: str, out_path: str, dtype: str = "F32") -> None:
    """Write the Hugging Face checkpoint at hf_dir (config.json + model*.safetensors) to out_path as a
    GGUF file the way llama.cpp's convert_hf_to_gguf.py would, with tensors in ``dtype`` ("F32",
    "F16", "BF16" or "Q8_0") and the embedded SmolLM2 tokenizer. Raises ValueError for what it cannot write."""
    if dtype not in _FILE_TYPES:
        raise ValueError(f"dtype must be one of {sorted(_FILE_TYPES)}, got {dtype!r}")
    ftype = _FILE_TYPES[dtype]
    hparams = _load_hparams(hf_dir)
    model_type = hparams.get("model_type")
    if model_type not in GGUF_ARCHS:
        raise ValueError(f"model_type {model_type!r} is not supported; supported: {sorted(GGUF_ARCHS)}")
    arch = GGUF_ARCHS[model_type]
    tokenizer = _tokenizer_fields(hparams["vocab_size"])

    writer = gguf.GGUFWriter(out_path, arch)
    for name, data in _gguf_tensors(hf_dir, hparams, arch):
        data, qtype = _encode(name, data, ftype)
        writer.add_tensor(name, data, raw_dtype=qtype)
    _write_general(writer, hf_dir)
    for method, value in _arch_params(hparams, arch).items():
        getattr(writer, method)(value)
    writer.add_file_type(ftype)
    writer.add_quantization_version(gguf.GGML_QUANT_VERSION)
    for key, (value, types) in tokenizer.items():
        writer.add_key_value(key, value, types[0], sub_type=types[1] if len(types) > 1 else None)

    writer.write_header_to_file()
    writer.write_kv_data_to_file()
    writer.write_tensors_to_file()
    writer.close()


# ---------------------------------------------------------------------------------------------
# Config


def _load_hparams(hf_dir: str) -> dict[str, Any]:
    """The config as convert_hf_to_gguf.py sees it (ModelBase.load_hparams), plus TextModel.__init__'s
    ``rope_parameters``: the rope settings whichever layout config.json uses."""
    from transformers import AutoConfig

    hparams = AutoConfig.from_pretrained(hf_dir, trust_remote_code=False).to_dict()
    rope = dict(hparams.get("rope_parameters", hparams.get("rope_scaling")) or {})
    if "full_attention" not in rope and "sliding_attention" not in rope:
        local_theta = _find(
            hparams, "local_rope_theta", "rope_local_theta", "rope_theta_local", "swa_rope_theta",
            "rope_local_base_freq",
        )
        theta = _find(
            hparams, "global_rope_theta", "rope_global_theta", "rope_theta_global", "rope_theta", "rotary_emb_base"
        )
        if local_theta is not None:
            rope["sliding_attention"] = {"rope_theta": local_theta}
        if "rope_theta" not in rope and theta is not None:
            rope["rope_theta"] = theta
        if "rope_type" not in rope and rope.get("type") is not None:
            rope["rope_type"] = rope["type"]
    hparams["rope_parameters"] = rope
    return hparams


def _find(hparams: dict[str, Any], *keys: str) -> Any:
    """The first of keys present in hparams (ModelBase.find_hparam with optional=True)."""
    return next((hparams[k] for k in keys if k in hparams), None)


def _head_dim(hparams: dict[str, Any]) -> int:
    return hparams.get("head_dim") or hparams["hidden_size"] // hparams["num_attention_heads"]


def _global_rope(hparams: dict[str, Any]) -> dict[str, Any]:
    """The rope settings of full-attention layers (Gemma3 keeps a separate set for sliding layers)."""
    rope = hparams["rope_parameters"]
    return rope.get("full_attention", rope)


# ---------------------------------------------------------------------------------------------
# Metadata


def _write_general(writer: gguf.GGUFWriter, hf_dir: str) -> None:
    """general.type/name/size_label as ModelBase.prepare_metadata writes them (after the tensors, whose
    parameter count gives the size label)."""
    total, shared, expert, count = writer.get_total_parameter_count()
    metadata = gguf.Metadata.load(None, Path(hf_dir), None, total)
    if metadata.name is None:
        metadata.name = Path(hf_dir).name
    if metadata.size_label is None and total > 0:
        metadata.size_label = gguf.size_label(total, shared, expert, count)
    writer.add_type(gguf.GGUFType.MODEL)
    metadata.set_gguf_meta_model(writer)


def _arch_params(hparams: dict[str, Any], arch: str) -> dict[str, Any]:
    """GGUFWriter method name -> value, in convert_hf_to_gguf.py's order; a later override of the same
    key keeps its first position, as GGUFWriter does. general.file_type is written by the caller."""
    if arch == "gemma2":
        return _gemma2_params(hparams)
    params = _text_model_params(hparams)
    if arch == "llama":
        params["add_vocab_size"] = hparams["vocab_size"]
        params["add_rope_dimension_count"] = _head_dim(hparams)
    elif arch == "gemma3":
        params.update(_gemma3_overrides(hparams))
    elif arch == "qwen3moe":  # TextModel's expert counts, then Qwen2MoeModel's expert width
        params["add_expert_count"] = _find(hparams, "num_local_experts", "num_experts")
        params["add_expert_used_count"] = hparams["num_experts_per_tok"]
        params["add_expert_feed_forward_length"] = hparams["moe_intermediate_size"]
    return params


def _text_model_params(hparams: dict[str, Any]) -> dict[str, Any]:
    """TextModel.set_gguf_parameters, for the dense attention models this writer supports."""
    params: dict[str, Any] = {"add_block_count": hparams["num_hidden_layers"]}
    for method, keys in (
        (
            "add_context_length",
            ("max_position_embeddings", "n_ctx", "n_positions", "max_length", "max_sequence_length",
             "model_max_length"),
        ),
        ("add_embedding_length", ("hidden_size", "n_embd", "dim")),
        ("add_feed_forward_length", ("intermediate_size", "n_inner", "hidden_dim")),
        ("add_head_count", ("num_attention_heads", "n_head", "n_heads")),
        ("add_head_count_kv", ("num_key_value_heads", "n_kv_heads")),
    ):
        if (value := _find(hparams, *keys)) is not None:
            params[method] = value
    if hparams.get("is_causal") is False:
        params["add_causal_attention"] = False
    params.update(_rope_scaling_params(_global_rope(hparams)))
    if (theta := _global_rope(hparams).get("rope_theta")) is not None:
        params["add_rope_freq_base"] = theta
    if (local_theta := hparams["rope_parameters"].get("sliding_attention", {}).get("rope_theta")) is not None:
        params["add_rope_freq_base_swa"] = local_theta
    if (rms_eps := _find(hparams, "rms_norm_eps", "norm_eps")) is not None:
        params["add_layer_norm_rms_eps"] = rms_eps
    if (norm_eps := _find(hparams, "layer_norm_eps", "layer_norm_epsilon", "norm_epsilon")) is not None:
        params["add_layer_norm_eps"] = norm_eps
    if (head_dim := hparams.get("head_dim")) is not None:
        params["add_key_length"] = head_dim
        params["add_value_length"] = head_dim
    return params


def _rope_scaling_params(rope: dict[str, Any]) -> dict[str, Any]:
    """rope.scaling.* keys for a linear or yarn scaling; llama3's lives in the rope_freqs tensor."""
    rope_type, factor = rope.get("rope_type"), rope.get("factor")
    if rope_type in (None, "default", "llama3"):
        return {}
    if rope_type == "linear" and factor is not None:
        return {"add_rope_scaling_type": gguf.RopeScalingType.LINEAR, "add_rope_scaling_factor": factor}
    if rope_type == "yarn" and factor is not None:
        params: dict[str, Any] = {
            "add_rope_scaling_type": gguf.RopeScalingType.YARN,
            "add_rope_scaling_factor": factor,
            "add_rope_scaling_orig_ctx_len": rope["original_max_position_embeddings"],
        }
        for method, value in (
            ("add_rope_scaling_yarn_ext_factor", rope.get("extrapolation_factor")),
            ("add_rope_scaling_yarn_attn_factor", rope.get("attention_factor", rope.get("attn_factor"))),
            ("add_rope_scaling_yarn_beta_fast", rope.get("beta_fast")),
            ("add_rope_scaling_yarn_beta_slow", rope.get("beta_slow")),
        ):
            if value is not None:
                params[method] = value
        return params
    raise ValueError(f"rope scaling {rope_type!r} is not supported by this writer")


def _gemma2_params(hparams: dict[str, Any]) -> dict[str, Any]:
    """Gemma2Model.set_gguf_parameters: no rope keys at all (llama.cpp's gemma2 uses theta 10000)."""
    rope = hparams["rope_parameters"]
    if rope.get("rope_type", "default") != "default" or rope.get("rope_theta", 10000.0) != 10000.0:
        raise ValueError(f"llama.cpp's gemma2 GGUF cannot state rope settings {rope}")
    return {
        "add_context_length": hparams["max_position_embeddings"],
        "add_embedding_length": hparams["hidden_size"],
        "add_block_count": hparams["num_hidden_layers"],
        "add_feed_forward_length": hparams["intermediate_size"],
        "add_head_count": hparams["num_attention_heads"],
        "add_head_count_kv": hparams.get("num_key_value_heads", hparams["num_attention_heads"]),
        "add_layer_norm_rms_eps": hparams["rms_norm_eps"],
        "add_key_length": hparams["head_dim"],
        "add_value_length": hparams["head_dim"],
        "add_attn_logit_softcapping": hparams["attn_logit_softcapping"],
        "add_final_logit_softcapping": hparams["final_logit_softcapping"],
        "add_sliding_window": hparams["sliding_window"],
    }


def _gemma3_overrides(hparams: dict[str, Any]) -> dict[str, Any]:
    """What Gemma3Model.set_gguf_parameters writes after TextModel's, with its defaults."""
    if hparams.get("attn_logit_softcapping") is not None:
        raise ValueError("gemma3 has no attention logit softcapping in llama.cpp")
    params: dict[str, Any] = {
        "add_context_length": hparams.get("max_position_embeddings", 131072),
        "add_head_count": hparams.get("num_attention_heads", 8),
        "add_layer_norm_rms_eps": hparams.get("rms_norm_eps", 1e-6),
        "add_key_length": hparams.get("head_dim", 256),
        "add_value_length": hparams.get("head_dim", 256),
        "add_rope_freq_base": _global_rope(hparams).get("rope_theta", 1_000_000.0),
    }
    if final_softcap := hparams.get("final_logit_softcapping"):
        params["add_final_logit_softcapping"] = final_softcap
    if hparams.get("sliding_window_pattern") != 1:
        params["add_sliding_window"] = hparams["sliding_window"]
    params["add_head_count_kv"] = hparams.get("num_key_value_heads", 4)
    return params


@functools.cache
def _embedded_tokenizer_fields() -> dict[str, tuple[Any, list[gguf.GGUFValueType]]]:
    """Every ``tokenizer.*`` field of the embedded SmolLM2 GGUF: key -> (value, GGUF value types).
    Read once per process (parsing 49152 tokens and their merges takes seconds); never mutated."""
    from engine.default_model import default_gguf_path

    reader = gguf.GGUFReader(default_gguf_path())
    fields = reader.fields.items()
    return {key: (field.contents(), field.types) for key, field in fields if key.startswith("tokenizer.")}


def _tokenizer_fields(vocab_size: int) -> dict[str, tuple[Any, list[gguf.GGUFValueType]]]:
    """The embedded tokenizer's fields for a model of `vocab_size` tokens: all of them, or its
    first `vocab_size` tokens and the merges among them (a smaller BPE tokenizer, quicker to
    read back: the byte tokens come first, then each merge's result in merge order)."""
    fields = _embedded_tokenizer_fields()
    tokens = fields["tokenizer.ggml.tokens"][0]
    if vocab_size > len(tokens):
        raise ValueError(f"config vocab_size {vocab_size} exceeds the SmolLM2 tokenizer's {len(tokens)} tokens")
    if vocab_size == len(tokens):
        return fields
    kept = set(tokens[:vocab_size])
    merges = [m for m in fields["tokenizer.ggml.merges"][0] if m.replace(" ", "", 1) in kept
              and all(part in kept for part in m.split(" ", 1))]
    small = dict(fields)
    for key, value in (("tokenizer.ggml.tokens", tokens[:vocab_size]), ("tokenizer.ggml.merges", merges),
                       ("tokenizer.ggml.token_type", fields["tokenizer.ggml.token_type"][0][:vocab_size])):
        small[key] = (value, fields[key][1])
    return small


# ---------------------------------------------------------------------------------------------
# Tensors


def _gguf_tensors(hf_dir: str, hparams: dict[str, Any], arch: str) -> Iterator[tuple[str, np.ndarray]]:
    """(GGUF name, fp32/fp16 array) for every tensor llama.cpp would write, in its order: generated
    tensors first, then the checkpoint's in file order."""
    name_map = gguf.get_tensor_name_map(_model_arch(arch), hparams["num_hidden_layers"])
    if arch == "llama" and (rope_freqs := _llama3_rope_freqs(hparams)) is not None:
        yield gguf.TENSOR_NAMES[gguf.MODEL_TENSOR.ROPE_FREQS] + ".weight", rope_freqs
    experts: dict[str, torch.Tensor] = {}  # Qwen2MoeModel's: one layer's experts, until all are read
    for hf_name, tensor in _checkpoint_tensors(hf_dir):
        if hf_name.endswith((".attention.masked_bias", ".attention.bias", ".rotary_emb.inv_freq")):
            continue
        if ".mlp.experts." in hf_name:
            experts[hf_name] = tensor
            stacked = _stacked_experts(experts, hf_name, _find(hparams, "num_local_experts", "num_experts"))
            for name, data in stacked:
                yield name_map.get_name(name, try_suffixes=(".weight",)), data.to(torch.float32).numpy()
            continue
        if hf_name == "lm_head.weight" and (arch == "gemma2" or hparams.get("tie_word_embeddings")):
            continue  # Gemma2Model skips it; a tied head is the embedding, written once
        if tensor.dtype not in (torch.float16, torch.float32):
            tensor = tensor.to(torch.float32)
        tensor = _modify(tensor, hf_name, hparams, arch)
        gguf_name = name_map.get_name(hf_name, try_suffixes=(".weight", ".bias"))
        if gguf_name is None:
            raise ValueError(f"cannot map tensor {hf_name!r} for GGUF arch {arch!r}")
        yield gguf_name, tensor.numpy()


def _stacked_experts(experts: dict[str, torch.Tensor], name: str, n_experts: int
                     ) -> list[tuple[str, torch.Tensor]]:
    """Qwen2MoeModel.modify_tensors: once a layer's experts are all read, each projection's
    experts stacked [n_expert, rows, columns] as `model.layers.{bid}.mlp.experts.{w}.weight`."""
    prefix = name.split(".mlp.experts.")[0]
    mine = [k for k in experts if k.startswith(prefix + ".mlp.experts.")]
    if len(mine) < n_experts * 3:
        return []
    stacked = []
    for w_name in ("down_proj", "gate_proj", "up_proj"):
        data = torch.stack([experts.pop(f"{prefix}.mlp.experts.{x}.{w_name}.weight") for x in range(n_experts)])
        stacked.append((f"{prefix}.mlp.experts.{w_name}.weight", data))
    return stacked


def _model_arch(arch: str) -> gguf.MODEL_ARCH:
    return next(key for key, name in gguf.MODEL_ARCH_NAMES.items() if name == arch)


def _checkpoint_tensors(hf_dir: str) -> Iterator[tuple[str, torch.Tensor]]:
    """The checkpoint's tensors, over model*.safetensors in name order (ModelBase.index_tensors)."""
    from safetensors import safe_open

    parts = sorted(glob.glob(os.path.join(hf_dir, "model*.safetensors")))
    if not parts:
        raise ValueError(f"no model*.safetensors in {hf_dir}")
    for part in parts:
        with safe_open(part, framework="pt") as f:
            for name in f.keys():
                yield name, f.get_tensor(name)


def _modify(tensor: torch.Tensor, hf_name: str, hparams: dict[str, Any], arch: str) -> torch.Tensor:
    """The per-architecture modify_tensors steps: llama's q/k permutation, Gemma's norm +1."""
    if arch == "llama":
        n_head, n_kv = hparams["num_attention_heads"], hparams["num_key_value_heads"]
        if hf_name.endswith(("q_proj.weight", "q_proj.bias")):
            return _permute(tensor, n_head, n_head)
        if hf_name.endswith(("k_proj.weight", "k_proj.bias")):
            return _permute(tensor, n_head, n_kv)
    elif arch in ("gemma2", "gemma3") and hf_name.endswith("norm.weight"):
        return tensor + 1  # Gemma's RMSNorm scales by (1 + weight); llama.cpp's by weight
    return tensor


def _permute(weights: torch.Tensor, n_head: int, n_head_kv: int | None) -> torch.Tensor:
    """LlamaModel.permute: per head, HF's rotate-half row order -> ggml's interleaved pairs."""
    if n_head_kv is not None and n_head != n_head_kv:
        n_head = n_head_kv
    grouped = weights.reshape(n_head, 2, weights.shape[0] // n_head // 2, *weights.shape[1:])
    return grouped.swapaxes(1, 2).reshape(weights.shape)


def _llama3_rope_freqs(hparams: dict[str, Any]) -> np.ndarray | None:
    """LlamaModel.generate_extra_tensors: a llama3 rope scaling as per-frequency divisors."""
    rope = _global_rope(hparams)
    if str(rope.get("rope_type", "")).lower() != "llama3":
        return None
    base, dim = rope.get("rope_theta", 10000.0), _head_dim(hparams)
    freqs = 1.0 / (base ** (torch.arange(0, dim, 2, dtype=torch.float32) / dim))
    factor = rope.get("factor", 8.0)
    low_freq_factor, high_freq_factor = rope.get("low_freq_factor", 1.0), rope.get("high_freq_factor", 4.0)
    # Older convert scripts read this from rope_scaling; the newest reads the top level, where
    # transformers 5 no longer puts it. The scaling's own value is what HF's llama3 rope uses.
    old_context_len = rope.get("original_max_position_embeddings") or hparams.get(
        "original_max_position_embeddings", 8192
    )
    low_freq_wavelen, high_freq_wavelen = old_context_len / low_freq_factor, old_context_len / high_freq_factor
    factors = []
    for freq in freqs.tolist():
        wavelen = 2 * math.pi / freq
        if wavelen < high_freq_wavelen:
            factors.append(1.0)
        elif wavelen > low_freq_wavelen:
            factors.append(factor)
        else:
            smooth = (old_context_len / wavelen - low_freq_factor) / (high_freq_factor - low_freq_factor)
            factors.append(1 / ((1 - smooth) / factor + smooth))
    return np.asarray(factors, dtype=np.float32)


def _encode(name: str, data: np.ndarray, ftype: gguf.LlamaFileType) -> tuple[np.ndarray, gguf.GGMLQuantizationType]:
    """ModelBase.prepare_tensors' choice of type: norms and 1-D tensors in F32, the rest in the file's
    type, falling back to F16 where the rows do not split into quantisation blocks."""
    if data.ndim <= 1 or name.endswith("_norm.weight") or not name.endswith(".weight"):
        qtype = gguf.GGMLQuantizationType.F32
    else:
        qtype = _TENSOR_TYPES[ftype]
    try:
        return gguf.quants.quantize(data, qtype), qtype
    except gguf.QuantError:
        return gguf.quants.quantize(data, gguf.GGMLQuantizationType.F16), gguf.GGMLQuantizationType.F16
