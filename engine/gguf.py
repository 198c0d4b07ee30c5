"""llama.cpp's GGUF files as Hugging Face checkpoints: `stoke serve model.gguf`, `LLM("model.gguf")`.

A GGUF file holds the weights (quantised or not), the model's hyperparameters under its
architecture's keys, and the tokenizer. The engine loads Hugging Face checkpoints, so a GGUF file
is converted once, as the embedded default is (engine/default_model.py): every tensor read with
the `gguf` package and dequantised (`gguf.quants.dequantize`), renamed, and written as safetensors
shards with a `config.json`, a `generation_config.json` (its stop tokens the ones llama.cpp
ends a generation at) and the tokenizer transformers builds from the file. What can be refused
is, before any weight is read. The conversion undoes what llama.cpp's convert_hf_to_gguf.py does
to a checkpoint:

- llama (Llama, Mistral, SmolLM2): q/k rows permuted for ggml's interleaved rope; a Llama 3
  rope scaling written as per-pair frequency factors (`rope_freqs`), which become a longrope
  scaling with those factors (the same inverse frequencies, as llama.cpp applies them);
- qwen2 (attention biases), qwen3 (q/k norms): the tensors as they are;
- qwen3moe (Qwen3-30B-A3B, Qwen3-Coder-30B-A3B): every layer's experts stacked, gate and up
  written as the engine's one stacked gate_up_proj;
- gemma2, gemma3: every RMSNorm weight stored plus one (Gemma's norm scales by 1 + weight),
  the embedding's rows past the tokenizer's dropped (the vocabulary is the file's), and the
  query scale llama.cpp derives from the model's size (27B: hidden / heads; others: head dim).

Weights keep their precision where the file has one (F32, F16, BF16); quantised ones are written
as float16 (a block's scale times its small integers, rounded once more: ~5e-4 relative). Other
architectures (Qwen2-MoE, Mixtral, Phi-3 ...) are refused with the list of those converted.
"""

from __future__ import annotations

import json
import os
import sys
from typing import Any

import numpy as np
import torch

# GGUF architecture -> (HF architectures entry, model_type)
ARCHITECTURES: dict[str, tuple[str, str]] = {
    "llama": ("LlamaForCausalLM", "llama"),
    "qwen2": ("Qwen2ForCausalLM", "qwen2"),
    "qwen3": ("Qwen3ForCausalLM", "qwen3"),
    "gemma2": ("Gemma2ForCausalLM", "gemma2"),
    "gemma3": ("Gemma3ForCausalLM", "gemma3_text"),
    "qwen3moe": ("Qwen3MoeForCausalLM", "qwen3_moe"),
}
_GEMMA = ("gemma2", "gemma3")
# The layer count of Gemma 2's and Gemma 3's 27B, whose queries llama.cpp scales by hidden / heads.
_GEMMA_27B_LAYERS = {"gemma2": 46, "gemma3": 62}
_SHARD_BYTES = 2 << 30

_GLOBAL_NAMES = {
    "token_embd.weight": "model.embed_tokens.weight",
    "output_norm.weight": "model.norm.weight",
    "output.weight": "lm_head.weight",
}
_LAYER_NAMES = {
    "attn_norm": "input_layernorm",
    "attn_q": "self_attn.q_proj",
    "attn_k": "self_attn.k_proj",
    "attn_v": "self_attn.v_proj",
    "attn_output": "self_attn.o_proj",
    "attn_q_norm": "self_attn.q_norm",
    "attn_k_norm": "self_attn.k_norm",
    "ffn_gate": "mlp.gate_proj",
    "ffn_up": "mlp.up_proj",
    "ffn_down": "mlp.down_proj",
    # a mixture of experts': its router, and its experts stacked [experts, rows, columns]
    "ffn_gate_inp": "mlp.gate",
    "ffn_gate_exps": "mlp.experts.gate_proj",
    "ffn_up_exps": "mlp.experts.up_proj",
    "ffn_down_exps": "mlp.experts.down_proj",
}
# Gemma's four norms a layer: llama.cpp's ffn_norm is Gemma's pre-feedforward norm.
_NORMS = {"ffn_norm": "post_attention_layernorm"}
_GEMMA_NORMS = {"post_attention_norm": "post_attention_layernorm", "ffn_norm": "pre_feedforward_layernorm",
                "post_ffw_norm": "post_feedforward_layernorm"}


def field(reader: Any, key: str, default: Any = None) -> Any:
    """A metadata value of the GGUF file (a str, a number, a list), or `default`."""
    entry = reader.fields.get(key)
    if entry is None:
        return default
    value = entry.contents()
    if isinstance(value, np.generic):
        value = value.item()
    return value


def hf_name(gguf_name: str, arch: str) -> str | None:
    """The Hugging Face name of a GGUF tensor; None for one the architecture does not have."""
    if gguf_name in _GLOBAL_NAMES:
        return _GLOBAL_NAMES[gguf_name]
    if not gguf_name.startswith("blk."):
        return None
    _, layer, rest = gguf_name.split(".", 2)
    base, _, kind = rest.rpartition(".")
    names = _LAYER_NAMES | (_GEMMA_NORMS if arch in _GEMMA else _NORMS)
    if base not in names or kind not in ("weight", "bias") or not layer.isdigit():
        return None
    name = f"model.layers.{int(layer)}.{names[base]}"
    # stacked experts are named as transformers 5 holds them, without ".weight"
    return name if base.endswith("_exps") and kind == "weight" else f"{name}.{kind}"


def reverse_llama_permute(w: np.ndarray, n_head: int) -> np.ndarray:
    """Undo llama.cpp's `permute` of q/k projection rows (and biases).

    llama.cpp's convert script maps HF's rotate-half rope layout (per head: the first half of
    the rows, then the second half) to the interleaved layout ggml's rope expects, with
    `w.reshape(n_head, 2, d/2, ...).swapaxes(1, 2)`; this applies the inverse,
    `w.reshape(n_head, d/2, 2, ...).swapaxes(1, 2)`.
    """
    rows = w.shape[0]
    if rows % (2 * n_head):
        raise ValueError(f"cannot un-permute {w.shape} with {n_head} heads")
    half = rows // n_head // 2
    return np.ascontiguousarray(w.reshape(n_head, half, 2, *w.shape[1:]).swapaxes(1, 2).reshape(w.shape))


def gguf_config(reader: Any) -> dict[str, Any]:
    """The Hugging Face config.json of the GGUF file's model, from its metadata and tensors."""
    arch = field(reader, "general.architecture")
    if arch not in ARCHITECTURES:
        raise ValueError(f"GGUF architecture {arch!r} is not supported (those converted: "
                         f"{', '.join(ARCHITECTURES)})")

    def meta(key: str, default: Any = None, *, required: bool = False) -> Any:
        value = field(reader, f"{arch}.{key}", default)
        if value is None and required:
            raise ValueError(f"the GGUF file's metadata lacks {arch}.{key}")
        if isinstance(value, list):  # per-layer values (head counts, widths): other architectures'
            raise ValueError(f"the GGUF file's {arch}.{key} differs by layer, which {arch} models do not")
        return value

    if int(field(reader, "split.count", 1)) > 1:
        raise ValueError("the GGUF file is one part of a split model: merge its parts first "
                         "(llama.cpp's `llama-gguf-split --merge first-part.gguf merged.gguf`)")
    tensors = {t.name: t for t in reader.tensors}
    if "token_embd.weight" not in tensors:
        raise ValueError("the GGUF file has no token_embd.weight")
    hidden = int(meta("embedding_length", required=True))
    experts = arch == "qwen3moe"
    layers = int(meta("block_count", required=True))
    n_head = int(meta("attention.head_count", required=True))
    n_kv = int(meta("attention.head_count_kv", n_head))
    head_dim = int(meta("attention.key_length", hidden // n_head))
    if int(meta("attention.value_length", head_dim)) != head_dim:
        raise ValueError("keys and values of different head dims are not supported")
    rope_dims = meta("rope.dimension_count")
    if rope_dims is not None and int(rope_dims) != head_dim:
        raise ValueError(f"partial rotary embeddings (rope dims {rope_dims} != head dim {head_dim}) are not supported")
    # The embedding's rows are the vocabulary (Gemma's files drop the rows past the tokenizer's).
    vocab = int(tensors["token_embd.weight"].shape[-1])
    max_positions = int(meta("context_length", 2048))
    config: dict[str, Any] = {
        "architectures": [ARCHITECTURES[arch][0]],
        "model_type": ARCHITECTURES[arch][1],
        "vocab_size": vocab,
        "hidden_size": hidden,
        "intermediate_size": int(meta("feed_forward_length", required=not experts) or 0),
        "num_hidden_layers": layers,
        "num_attention_heads": n_head,
        "num_key_value_heads": n_kv,
        "head_dim": head_dim,
        "max_position_embeddings": max_positions,
        "rms_norm_eps": float(meta("attention.layer_norm_rms_epsilon", 1e-6 if arch in _GEMMA else 1e-5)),
        "rope_theta": float(meta("rope.freq_base", 10000.0)),
        "tie_word_embeddings": "output.weight" not in tensors,
        "torch_dtype": "float32",
    }
    for key, name in (("bos_token_id", "bos_token_id"), ("eos_token_id", "eos_token_id"),
                      ("pad_token_id", "padding_token_id")):
        value = field(reader, f"tokenizer.ggml.{name}")
        config[key] = None if value is None else int(value)
    config["eos_token_id"] = _stop_tokens(reader, config["eos_token_id"])
    if experts:  # llama.cpp's Qwen3-MoE: every layer sparse, its top-k weights renormalised
        config |= {"num_experts": int(meta("expert_count", required=True)),
                   "num_experts_per_tok": int(meta("expert_used_count", required=True)),
                   "moe_intermediate_size": int(meta("expert_feed_forward_length", required=True)),
                   "norm_topk_prob": True, "decoder_sparse_step": 1, "mlp_only_layers": []}
        config["intermediate_size"] = config["intermediate_size"] or config["moe_intermediate_size"]
    if arch == "llama":
        config |= {"hidden_act": "silu", "attention_bias": "blk.0.attn_q.bias" in tensors, "mlp_bias": False}
    if arch in _GEMMA:
        big = layers == _GEMMA_27B_LAYERS[arch]
        config["query_pre_attn_scalar"] = hidden // n_head if big else head_dim
        config["hidden_activation"] = "gelu_pytorch_tanh"
        # Gemma 2's keys default as llama.cpp defaults them (files written before they were)
        window = meta("attention.sliding_window", 4096 if arch == "gemma2" else None)
        config["sliding_window"] = None if window is None else int(window)
        config["final_logit_softcapping"] = meta("final_logit_softcapping", 30.0 if arch == "gemma2" else None)
        if arch == "gemma2":
            config["attn_logit_softcapping"] = meta("attn_logit_softcapping", 50.0)
        elif meta("rope.freq_base_swa") is not None:  # the sliding layers' (llama.cpp's default: 10,000)
            config["rope_local_base_freq"] = float(meta("rope.freq_base_swa"))
    config["rope_scaling"] = _rope_scaling(meta, tensors, head_dim, max_positions)
    return config


# Tokens that end a generation in llama.cpp besides the file's EOS (llama-vocab.cpp's list, by text).
_END_OF_GENERATION = ("<|eot_id|>", "<|eom_id|>", "<|im_end|>", "<|end|>", "<end_of_turn>", "<|endoftext|>")


def _stop_tokens(reader: Any, eos: int | None) -> int | list[int] | None:
    """The file's EOS, with its end-of-turn and end-of-message tokens (Llama 3's <|eot_id|>,
    Gemma's <end_of_turn>) and those llama.cpp ends a generation at by their text: a chat
    stops at its turn's end, as it does in llama.cpp."""
    tokens = field(reader, "tokenizer.ggml.tokens") or []
    types = field(reader, "tokenizer.ggml.token_type") or []
    ids = [eos] + [field(reader, f"tokenizer.ggml.{key}") for key in ("eot_token_id", "eom_token_id")]
    ids += [i for i, text in enumerate(tokens) if text in _END_OF_GENERATION and i < len(types) and types[i] in (3, 4)]
    stops = list(dict.fromkeys(int(i) for i in ids if i is not None))
    return stops[0] if len(stops) == 1 else stops or None


def _rope_scaling(meta: Any, tensors: dict[str, Any], head_dim: int, max_positions: int) -> dict[str, Any] | None:
    """The rope scaling the file describes: its `rope.scaling.*` keys, or llama.cpp's
    per-pair frequency factors (`rope_freqs`: Llama 3's scaling, precomputed)."""
    kind = meta("rope.scaling.type")
    if "rope_freqs.weight" in tensors:
        if kind not in (None, "none"):
            raise ValueError(f"the GGUF file has both rope_freqs and a {kind!r} rope scaling")
        from gguf.quants import dequantize

        tensor = tensors["rope_freqs.weight"]
        factors = [float(f) for f in np.asarray(dequantize(tensor.data, tensor.tensor_type)).reshape(-1)]
        if len(factors) != head_dim // 2:
            raise ValueError(f"rope_freqs has {len(factors)} factors, not one per rotated pair ({head_dim // 2})")
        return {"rope_type": "longrope", "short_factor": factors, "long_factor": factors,
                "original_max_position_embeddings": max_positions, "factor": 1.0, "attention_factor": 1.0}
    # llama.cpp reads a factor without a type as linear, and the older `rope.scale_linear` too.
    factor = meta("rope.scaling.factor", meta("rope.scale_linear"))
    if kind is None and factor not in (None, 1.0):
        kind = "linear"
    if kind in (None, "none"):
        return None
    if not isinstance(factor, (int, float)) or factor <= 0:
        raise ValueError(f"the GGUF file's {kind!r} rope scaling has no positive factor ({factor!r})")
    if meta("rope.scaling.attn_factor", 1.0) != 1.0:
        raise ValueError("the GGUF file's rope.scaling.attn_factor is not supported")
    if kind == "linear":
        return {"rope_type": "linear", "factor": float(factor)}
    if kind == "yarn":
        if meta("rope.scaling.yarn_ext_factor", 1.0) != 1.0 or meta("rope.scaling.yarn_log_multiplier") is not None:
            raise ValueError("the GGUF file's yarn extrapolation factor and log multiplier are not supported")
        scaling: dict[str, Any] = {"rope_type": "yarn", "factor": float(factor)}
        for key, name in (("original_context_length", "original_max_position_embeddings"),
                          ("yarn_beta_fast", "beta_fast"), ("yarn_beta_slow", "beta_slow"),
                          ("yarn_attn_factor", "attention_factor")):
            if (value := meta(f"rope.scaling.{key}")) is not None:
                scaling[name] = value
        return scaling
    raise ValueError(f"the GGUF file's rope scaling {kind!r} is not supported (linear, yarn and Llama 3's "
                     "rope_freqs are)")


def _target_dtype(tensor_type: Any) -> torch.dtype:
    """The dtype a tensor is written in: its own for F32, F16 and BF16; quantised ones float16."""
    from gguf import GGMLQuantizationType as Q

    return {Q.F32: torch.float32, Q.BF16: torch.bfloat16}.get(tensor_type, torch.float16)


def _dequantized(reader_tensor: Any, want: tuple[int, ...]) -> np.ndarray:
    """A GGUF tensor dequantised to float32, in the numpy (row-major) shape: gguf lists dims
    innermost first, so a linear weight comes out [out_features, in_features]."""
    from gguf.quants import dequantize

    w = np.asarray(dequantize(reader_tensor.data, reader_tensor.tensor_type), dtype=np.float32)
    shape = tuple(reversed([int(d) for d in reader_tensor.shape]))
    if w.shape != shape:
        w = w.reshape(shape)
    if w.shape != want:
        raise ValueError(f"{reader_tensor.name}: shape {w.shape} != expected {want}")
    return w


def _expected_shapes(config: dict[str, Any]) -> dict[str, tuple[int, ...]]:
    h, v = config["hidden_size"], config["vocab_size"]
    ff, hd = config["intermediate_size"], config["head_dim"]
    nq, nkv = config["num_attention_heads"], config["num_key_value_heads"]
    shapes: dict[str, tuple[int, ...]] = {"model.embed_tokens.weight": (v, h), "model.norm.weight": (h,)}
    if not config["tie_word_embeddings"]:
        shapes["lm_head.weight"] = (v, h)
    for i in range(config["num_hidden_layers"]):
        p = f"model.layers.{i}."
        shapes |= {p + "self_attn.q_proj.weight": (nq * hd, h), p + "self_attn.k_proj.weight": (nkv * hd, h),
                   p + "self_attn.v_proj.weight": (nkv * hd, h), p + "self_attn.o_proj.weight": (h, nq * hd),
                   p + "input_layernorm.weight": (h,), p + "post_attention_layernorm.weight": (h,)}
        if "num_experts" in config:
            e, fe = config["num_experts"], config["moe_intermediate_size"]
            shapes |= {p + "mlp.gate.weight": (e, h), p + "mlp.experts.gate_proj": (e, fe, h),
                       p + "mlp.experts.up_proj": (e, fe, h), p + "mlp.experts.down_proj": (e, h, fe)}
        else:
            shapes |= {p + "mlp.gate_proj.weight": (ff, h), p + "mlp.up_proj.weight": (ff, h),
                       p + "mlp.down_proj.weight": (h, ff)}
    return shapes


def _optional_shapes(config: dict[str, Any]) -> dict[str, tuple[int, ...]]:
    """Tensors a file of the architecture may or must have beyond Llama's."""
    hd, nq, nkv = config["head_dim"], config["num_attention_heads"], config["num_key_value_heads"]
    h = config["hidden_size"]
    shapes: dict[str, tuple[int, ...]] = {}
    for i in range(config["num_hidden_layers"]):
        p = f"model.layers.{i}."
        shapes |= {p + "self_attn.q_proj.bias": (nq * hd,), p + "self_attn.k_proj.bias": (nkv * hd,),
                   p + "self_attn.v_proj.bias": (nkv * hd,), p + "self_attn.q_norm.weight": (hd,),
                   p + "self_attn.k_norm.weight": (hd,), p + "pre_feedforward_layernorm.weight": (h,),
                   p + "post_feedforward_layernorm.weight": (h,)}
    return shapes


def _required_by_architecture(config: dict[str, Any]) -> set[str]:
    """The names beyond Llama's that the architecture's model reads (a file lacking one is refused)."""
    model_type, layers = config["model_type"], range(config["num_hidden_layers"])
    per_layer: tuple[str, ...] = ()
    if model_type == "qwen2":
        per_layer = ("self_attn.q_proj.bias", "self_attn.k_proj.bias", "self_attn.v_proj.bias")
    elif model_type in ("qwen3", "qwen3_moe"):
        per_layer = ("self_attn.q_norm.weight", "self_attn.k_norm.weight")
    elif model_type in ("gemma2", "gemma3_text"):
        per_layer = ("pre_feedforward_layernorm.weight", "post_feedforward_layernorm.weight")
        if model_type == "gemma3_text":
            per_layer += ("self_attn.q_norm.weight", "self_attn.k_norm.weight")
    return {f"model.layers.{i}.{name}" for i in layers for name in per_layer}


def convert_gguf(gguf_path: str, out_dir: str, keep_fp32: bool = False) -> None:
    """Write the GGUF file's model as a Hugging Face checkpoint in `out_dir`: safetensors
    shards (with their index when there are several), config.json, generation_config.json and
    the tokenizer. `keep_fp32`: every weight in float32 (the embedded default's format)."""
    from gguf import GGUFReader
    from safetensors.torch import save_file
    from tqdm.auto import tqdm

    os.makedirs(out_dir, exist_ok=True)
    try:
        reader = GGUFReader(gguf_path)
    except Exception as exc:  # gguf-py's own errors say little of what is wrong with the file
        raise ValueError(f"{gguf_path} does not read as a GGUF file (truncated or corrupt?): {exc}") from None
    config = gguf_config(reader)
    arch = field(reader, "general.architecture")
    expected = _expected_shapes(config)
    allowed = expected | _optional_shapes(config)
    required = set(expected) | _required_by_architecture(config)
    # What can be refused is, before minutes of dequantising: a tensor the model has no place
    # for, one it lacks, a tokenizer transformers cannot build.
    names = {tensor.name: hf_name(tensor.name, arch) for tensor in reader.tensors if tensor.name != "rope_freqs.weight"}
    unknown = [gguf_name for gguf_name, name in names.items() if name not in allowed]
    if unknown:
        raise ValueError(f"the GGUF file's tensor {unknown[0]!r} is not one a {arch} model has")
    missing = sorted(required - set(names.values()))
    if missing:
        raise ValueError(f"the GGUF file lacks tensors: {missing[:5]}{' ...' if len(missing) > 5 else ''}")
    write_tokenizer(gguf_path, out_dir, reader)
    shards = _Shards(out_dir, save_file)
    halves: dict[str, torch.Tensor] = {}  # a layer's stacked gate or up experts, until both are read
    for tensor in tqdm(reader.tensors, desc="Converting GGUF tensors", unit="tensor", file=sys.stderr):
        if tensor.name not in names:
            continue  # rope_freqs: in the config's rope scaling
        name = names[tensor.name]
        assert name is not None
        w = _dequantized(tensor, allowed[name])
        if arch == "llama" and ".self_attn.q_proj." in name:
            w = reverse_llama_permute(w, config["num_attention_heads"])
        elif arch == "llama" and ".self_attn.k_proj." in name:
            w = reverse_llama_permute(w, config["num_key_value_heads"])
        elif arch in _GEMMA and name.endswith("norm.weight"):
            w = w - 1.0
        weight = torch.from_numpy(np.array(w)).to(  # a copy: a tensor of the file is read-only
            torch.float32 if keep_fp32 else _target_dtype(tensor.tensor_type))
        if name.endswith((".experts.gate_proj", ".experts.up_proj")):
            # the engine's stacked experts hold gate and up in one [experts, 2 rows, columns]
            halves[name] = weight
            layer = name.rsplit(".", 1)[0]
            if f"{layer}.gate_proj" not in halves or f"{layer}.up_proj" not in halves:
                continue
            gate, up = halves.pop(f"{layer}.gate_proj"), halves.pop(f"{layer}.up_proj")
            name, weight = f"{layer}.gate_up_proj", torch.cat([gate, up.to(gate.dtype)], dim=1)
        shards.add(name, weight)
    shards.close()
    _write_json(os.path.join(out_dir, "config.json"), config)
    generation = {"_from_model_config": True} | {key: config[key] for key in ("bos_token_id", "eos_token_id",
                                                                              "pad_token_id") if config[key] is not None}
    _write_json(os.path.join(out_dir, "generation_config.json"), generation)


class _Shards:
    """Safetensors shards of at most _SHARD_BYTES, each written as soon as it is full (a model's
    weights are never all in memory at once), named and indexed as transformers names them once
    their count is known."""

    def __init__(self, out_dir: str, save_file: Any) -> None:
        self.out_dir, self.save_file = out_dir, save_file
        self.current: dict[str, torch.Tensor] = {}
        self.size = 0
        self.written: list[tuple[str, list[str], int]] = []  # (temporary file, its names, its bytes)

    def add(self, name: str, weight: torch.Tensor) -> None:
        nbytes = weight.numel() * weight.element_size()
        if self.current and self.size + nbytes > _SHARD_BYTES:
            self._flush()
        self.current[name] = weight
        self.size += nbytes

    def _flush(self) -> None:
        path = os.path.join(self.out_dir, f".shard-{len(self.written)}.safetensors")
        self.save_file(self.current, path, metadata={"format": "pt"})
        self.written.append((path, list(self.current), self.size))
        self.current, self.size = {}, 0

    def close(self) -> None:
        self._flush()
        if len(self.written) == 1:
            os.replace(self.written[0][0], os.path.join(self.out_dir, "model.safetensors"))
            return
        weight_map: dict[str, str] = {}
        for i, (path, names, _) in enumerate(self.written):
            name = f"model-{i + 1:05d}-of-{len(self.written):05d}.safetensors"
            os.replace(path, os.path.join(self.out_dir, name))
            weight_map |= dict.fromkeys(names, name)
        total = sum(nbytes for _, _, nbytes in self.written)
        _write_json(os.path.join(self.out_dir, "model.safetensors.index.json"),
                    {"metadata": {"total_size": total}, "weight_map": weight_map})


def _write_json(path: str, value: dict[str, Any]) -> None:
    with open(path, "w", encoding="utf-8") as f:
        json.dump(value, f, indent=2, sort_keys=True)
        f.write("\n")


def write_tokenizer(gguf_path: str, out_dir: str, reader: Any) -> None:
    """tokenizer.json + tokenizer_config.json (chat template inline) built by transformers'
    GGUF tokenizer converter, its special tokens the file's."""
    from transformers import AutoTokenizer
    from transformers.utils import logging as hf_logging

    verbosity = hf_logging.get_verbosity()
    hf_logging.set_verbosity_error()
    try:
        tok = AutoTokenizer.from_pretrained(
            os.path.dirname(os.path.abspath(gguf_path)), gguf_file=os.path.basename(gguf_path)
        )
    finally:
        hf_logging.set_verbosity(verbosity)

    template = field(reader, "tokenizer.chat_template")
    if template and tok.chat_template != template:
        tok.chat_template = template
    tokens = reader.fields["tokenizer.ggml.tokens"].contents() if "tokenizer.ggml.tokens" in reader.fields else None

    def token(key: str) -> str | None:
        idx = field(reader, key)
        if idx is None or tokens is None or not 0 <= int(idx) < len(tokens):
            return None
        return tokens[int(idx)]

    # Make the special tokens follow the GGUF ids exactly.
    for attr, key in (
        ("bos_token", "tokenizer.ggml.bos_token_id"),
        ("eos_token", "tokenizer.ggml.eos_token_id"),
        ("pad_token", "tokenizer.ggml.padding_token_id"),
        ("unk_token", "tokenizer.ggml.unknown_token_id"),
    ):
        value = token(key)
        if value is not None and getattr(tok, attr) != value:
            setattr(tok, attr, value)

    # Keep the template in tokenizer_config.json (legacy layout) rather than a separate
    # chat_template.jinja, so readers of the JSON alone find it too.
    tok.save_pretrained(out_dir, save_jinja_files=False)

    # Drop loader bookkeeping that save_pretrained copies into the config.
    cfg_path = os.path.join(out_dir, "tokenizer_config.json")
    with open(cfg_path, encoding="utf-8") as f:
        tok_config = json.load(f)
    for key in ("is_local", "local_files_only"):
        tok_config.pop(key, None)
    if template and tok_config.get("chat_template") != template:
        raise RuntimeError("chat template was not preserved in tokenizer_config.json")
    with open(cfg_path, "w", encoding="utf-8") as f:
        json.dump(tok_config, f, indent=2, ensure_ascii=False)
        f.write("\n")
