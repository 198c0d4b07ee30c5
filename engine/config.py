"""Model and engine configuration: what the checkpoint says, and how the engine runs it."""

from __future__ import annotations

import json
import logging
import os
from dataclasses import dataclass, field
from typing import Any

import torch

from engine.fp8 import QUANTIZATIONS, Fp8Scheme, read_scheme
from engine.reasoning import REASONING_PARSERS
from engine.rope import read_rope, rope_max_len
from engine.sampling_params import is_int
from scheduler import SCHEDULING_POLICIES

logger = logging.getLogger(__name__)

SUPPORTED_ARCHITECTURES = {
    "LlamaForCausalLM": "llama",
    "MistralForCausalLM": "mistral",
    "Qwen2ForCausalLM": "qwen2",
    "Qwen3ForCausalLM": "qwen3",
    # Phi-3 and Phi-4: Llama's decoder with q/k/v and gate/up saved fused.
    "Phi3ForCausalLM": "phi3",
    # SmolLM3: Llama's decoder with no rotary embedding on every fourth layer (NoPE).
    "SmolLM3ForCausalLM": "smollm3",
    # Mixtures of experts: a routed MLP (engine/models/moe.py) on their sparse layers.
    "MixtralForCausalLM": "mixtral",
    "Qwen2MoeForCausalLM": "qwen2_moe",
    "Qwen3MoeForCausalLM": "qwen3_moe",
    # Gemma 2 and 3: the same decoder with Gemma's changes (ModelConfig's gemma fields).
    "Gemma2ForCausalLM": "gemma2",
    "Gemma3ForCausalLM": "gemma3_text",
    # Gemma 3 4B and up, image and text in: served as its language model (text in, text out).
    "Gemma3ForConditionalGeneration": "gemma3_text",
    # Base models without an LM head, as embedding models are saved (e5-mistral, gte-Qwen2): embeddings only.
    "LlamaModel": "llama",
    "MistralModel": "mistral",
    "Qwen2Model": "qwen2",
    "Qwen3Model": "qwen3",
    "Phi3Model": "phi3",
    "SmolLM3Model": "smollm3",
    "MixtralModel": "mixtral",
    "Qwen2MoeModel": "qwen2_moe",
    "Qwen3MoeModel": "qwen3_moe",
    "Gemma2Model": "gemma2",
    "Gemma3TextModel": "gemma3_text",
    # Sequence classifiers (a linear `score` head on the last token's hidden states, as
    # transformers'), rerankers among them: classification and scoring only.
    "LlamaForSequenceClassification": "llama",
    "MistralForSequenceClassification": "mistral",
    "Qwen2ForSequenceClassification": "qwen2",
    "Qwen3ForSequenceClassification": "qwen3",
    "Phi3ForSequenceClassification": "phi3",
    "SmolLM3ForSequenceClassification": "smollm3",
    "MixtralForSequenceClassification": "mixtral",
    "Qwen2MoeForSequenceClassification": "qwen2_moe",
    "Qwen3MoeForSequenceClassification": "qwen3_moe",
    "Gemma2ForSequenceClassification": "gemma2",
    "Gemma3TextForSequenceClassification": "gemma3_text",
}
GEMMA = ("gemma2", "gemma3_text")
# transformers' config classes' defaults where they differ from what from_dict assumes (Llama's),
# for keys config.json leaves out: a released Gemma 3 config names only six
_CLASS_DEFAULTS: dict[str, dict[str, Any]] = {
    "mistral": dict(sliding_window=4096),
    "qwen2": dict(sliding_window=4096),
    "qwen3": dict(sliding_window=4096),
    "qwen2_moe": dict(sliding_window=4096),
    "qwen3_moe": dict(sliding_window=4096),
    "gemma2": dict(vocab_size=256000, hidden_size=2304, intermediate_size=9216, num_hidden_layers=26,
                   num_attention_heads=8, num_key_value_heads=4, head_dim=256, max_position_embeddings=8192,
                   rms_norm_eps=1e-6, tie_word_embeddings=True, bos_token_id=2, eos_token_id=1,
                   sliding_window=4096, attn_logit_softcapping=50.0, final_logit_softcapping=30.0),
    "phi3": dict(vocab_size=32064, hidden_size=3072, intermediate_size=8192, num_hidden_layers=32,
                 num_attention_heads=32, max_position_embeddings=4096, rms_norm_eps=1e-5, bos_token_id=1,
                 eos_token_id=32000, original_max_position_embeddings=4096),
    "smollm3": dict(vocab_size=128256, hidden_size=2048, intermediate_size=11008, num_hidden_layers=36,
                    num_attention_heads=16, num_key_value_heads=4, max_position_embeddings=32768, rms_norm_eps=1e-6,
                    rope_theta=2e6, bos_token_id=128000, eos_token_id=128001, tie_word_embeddings=True,
                    no_rope_layer_interval=4),
    "mixtral": dict(vocab_size=32000, hidden_size=4096, intermediate_size=14336, num_hidden_layers=32,
                    num_attention_heads=32, num_key_value_heads=8, max_position_embeddings=131072,
                    rms_norm_eps=1e-5, rope_theta=1e6, bos_token_id=1, eos_token_id=2),
    "gemma3_text": dict(vocab_size=262208, hidden_size=2304, intermediate_size=9216, num_hidden_layers=26,
                        num_attention_heads=8, num_key_value_heads=4, head_dim=256, max_position_embeddings=131072,
                        rms_norm_eps=1e-6, tie_word_embeddings=True, bos_token_id=2, eos_token_id=1,
                        sliding_window=4096),
}
# Image-and-text checkpoints served as their language model: where its weights sit (the older
# and transformers 5's layouts) and what is left out, the vision tower and its projector.
LANGUAGE_MODEL_OF = {"Gemma3ForConditionalGeneration": (
    {"language_model.model.": "model.", "model.language_model.": "model.", "language_model.lm_head.": "lm_head."},
    ("vision_tower.", "multi_modal_projector.", "model.vision_tower.", "model.multi_modal_projector."),
)}

# generation_config.json keys that become a request's defaults where it sets none (the model's
# recommended sampling, as vLLM's `--generation-config auto`); max_new_tokens is max_tokens.
GENERATION_DEFAULT_KEYS = {"temperature": "temperature", "top_p": "top_p", "top_k": "top_k", "min_p": "min_p",
                           "repetition_penalty": "repetition_penalty", "max_new_tokens": "max_tokens"}

CUDA_GRAPH_MODES = ("full", "decode")  # full: decode and mixed steps; decode: pure decodes only

DTYPES = {"float32": torch.float32, "fp32": torch.float32, "float16": torch.float16,
          "fp16": torch.float16, "half": torch.float16, "bfloat16": torch.bfloat16, "bf16": torch.bfloat16}
# vLLM's --kv-cache-dtype: "auto" keeps K/V at the model's dtype; "fp8" (= "fp8_e4m3") stores
# them in e4m3 with a scale per layer (kernels/reference.py), half of bf16's bytes per block.
KV_CACHE_DTYPES = {"fp8": torch.float8_e4m3fn, "fp8_e4m3": torch.float8_e4m3fn}


@dataclass(frozen=True, slots=True)
class MoEConfig:
    """A mixture of experts' MLP: each token runs through the `top_k` of `num_experts` experts
    its router ranks first, weighted by their softmax probabilities."""

    num_experts: int
    top_k: int
    intermediate_size: int  # each expert's
    renormalize: bool  # the top-k probabilities rescaled to sum to 1 (norm_topk_prob; Mixtral's always)
    sparse_layers: frozenset[int]  # the layers with experts; the others keep the dense MLP
    shared_expert_intermediate_size: int = 0  # Qwen2-MoE's expert every token runs, sigmoid-gated; 0: none

    @classmethod
    def from_dict(cls, raw: dict[str, Any], family: str, num_layers: int) -> MoEConfig | None:
        """As transformers' config classes read config.json (their defaults where a key is missing)."""
        # Mixtral's name is num_local_experts, Qwen's num_experts; transformers 5 writes Qwen3-MoE's
        # as num_local_experts too (an alias it prefers, as here, where both are given).
        keys = ("num_experts", "num_local_experts") if family == "qwen2_moe" else ("num_local_experts", "num_experts")
        named = next((raw[k] for k in keys if raw.get(k) is not None), None)
        if family == "mixtral":
            return cls._checked(8 if named is None else named, raw.get("num_experts_per_tok", 2),
                                raw["intermediate_size"], True, frozenset(range(num_layers)))
        if family not in ("qwen2_moe", "qwen3_moe"):
            return None
        qwen2 = family == "qwen2_moe"
        experts = (60 if qwen2 else 128) if named is None else named
        step = raw.get("decoder_sparse_step", 1)
        if not is_int(step) or step < 1:
            raise ValueError(f"decoder_sparse_step must be an integer >= 1, got {step!r}")
        dense = raw.get("mlp_only_layers") or []
        if not isinstance(dense, list) or not all(is_int(i) for i in dense):
            raise ValueError(f"mlp_only_layers must be a list of layer indices, got {dense!r:.100}")
        layers = frozenset(range(step - 1, num_layers, step)) - set(dense) if experts else frozenset()
        return cls._checked(experts, raw.get("num_experts_per_tok", 4 if qwen2 else 8),
                            raw.get("moe_intermediate_size", 1408 if qwen2 else 768),
                            bool(raw.get("norm_topk_prob", False)), layers,
                            raw.get("shared_expert_intermediate_size", 5632) if qwen2 else 0)

    @classmethod
    def _checked(cls, experts: Any, top_k: Any, size: Any, renormalize: bool, layers: frozenset[int],
                 shared: Any = 0) -> MoEConfig:
        for name, value in (("num_experts", experts), ("num_experts_per_tok", top_k),
                            ("moe_intermediate_size", size)):
            _check_size(name, value)
        if top_k > experts:
            raise ValueError(f"num_experts_per_tok ({top_k}) exceeds num_experts ({experts})")
        if not is_int(shared) or shared < 0:
            raise ValueError(f"shared_expert_intermediate_size must be an integer >= 0, got {shared!r}")
        return cls(experts, top_k, size, renormalize, layers, shared)


@dataclass(slots=True)
class ModelConfig:
    """The architecture facts our Llama-family model needs, read from a HF config.json."""

    architecture: str
    vocab_size: int
    hidden_size: int
    intermediate_size: int
    num_layers: int
    num_heads: int
    num_kv_heads: int
    head_dim: int
    rms_norm_eps: float
    rope_theta: float
    rope_scaling: dict[str, Any] | None
    max_position_embeddings: int
    tie_word_embeddings: bool
    qkv_bias: bool
    qk_norm: bool
    bos_token_id: int | None = None
    eos_token_ids: list[int] = field(default_factory=list)
    rotary_dim: int = 0  # the leading dims of each head that rotate (Phi-4-mini's 3/4); 0: all of them
    nope_layers: tuple[int, ...] = ()  # the layers with no rotary embedding at all (SmolLM3's every fourth)
    # Each layer's attention window (0: full attention): a query at position p sees the keys
    # after p - window, as transformers' sliding-window layers. Empty: every layer full.
    layer_windows: tuple[int, ...] = ()
    # q/k/v and gate/up saved fused (Phi-3's qkv_proj, gate_up_proj), as LoRA adapters name them
    fused_checkpoint: bool = False
    # Gemma's changes to the decoder (the defaults are Llama's):
    hidden_act: str = "silu"  # the gated MLP's activation: silu, or gelu_pytorch_tanh
    attention_scale: float | None = None  # query_pre_attn_scalar ** -0.5; None: head_dim ** -0.5
    attn_softcap: float = 0.0  # scores capped by softcap · tanh(s / softcap); 0: not
    final_softcap: float = 0.0  # the logits capped likewise
    embedding_multiplier: float = 1.0  # the embeddings scaled by sqrt(hidden_size), in their dtype
    norm_plus_one: bool = False  # RMSNorm weights stored as w - 1 (Gemma's 1 + w); folded at load
    sandwich_norms: bool = False  # a norm after attention and around the MLP (Gemma 2/3's four per layer)
    # The sliding layers' own rope (Gemma 3's local base frequency): theta, then scaling.
    local_rope: tuple[float, dict[str, Any] | None] | None = None
    # A sequence classifier's number of labels (its `score` head's rows); None: not a classifier.
    num_labels: int | None = None
    # An LLM reranker's classifier, as vLLM builds it from a causal LM's checkpoint (hf_overrides
    # `classifier_from_token`, `method`): its score head is LM-head rows, those of these tokens
    # ("from_2_way_softmax": one label, the second's row less the first's, so its sigmoid is the
    # softmax of the two; "no_post_processing": a label per token, its row). The engine resolves
    # the token ids with the tokenizer before the weights load.
    classifier_from_token: tuple[str, ...] | None = None
    classifier_method: str | None = None
    classifier_token_ids: tuple[int, ...] | None = None
    moe: MoEConfig | None = None  # None: a dense model
    # How the projections' weights are held in fp8 (engine/fp8.py): the checkpoint's
    # quantization_config, or the engine's quantization="fp8"; None: at the model's dtype.
    quantization: Fp8Scheme | None = None

    @property
    def is_classifier(self) -> bool:
        return self.num_labels is not None

    @property
    def longest_sequence(self) -> int:
        """The positions the model serves: max_position_embeddings, stretched by a dynamic or
        yarn rope scaling's factor (engine/rope.py)."""
        return rope_max_len(self.rope_scaling, self.max_position_embeddings)

    def checkpoint_names(self, module: str) -> list[str]:
        """A module's names: stoke's (model.layers.0.mlp.experts), then those a checkpoint of this
        architecture may give it (Mixtral's block_sparse_moe, a multimodal model's
        language_model prefixes), as the checkpoint's quantization config names modules."""
        names = [module]
        if self.architecture.startswith("Mixtral") and ".mlp." in f"{module}.":
            names.append(f"{module}.".replace(".mlp.", ".block_sparse_moe.", 1).rstrip("."))
        renames, _ = LANGUAGE_MODEL_OF.get(self.architecture, ({}, ()))
        for theirs, ours in renames.items():
            if f"{module}.".startswith(ours):
                names.append((theirs + f"{module}."[len(ours):]).rstrip("."))
        return names

    def window(self, layer: int) -> int:
        return self.layer_windows[layer] if self.layer_windows else 0

    @classmethod
    def from_dict(cls, raw: dict[str, Any]) -> ModelConfig:
        archs = raw.get("architectures") or []
        arch = next((a for a in archs if a in SUPPORTED_ARCHITECTURES), None)
        if arch is None:
            raise ValueError(
                f"unsupported architecture {archs or raw.get('model_type')!r}; stoke runs "
                f"{', '.join(sorted(SUPPORTED_ARCHITECTURES))}"
            )
        family = SUPPORTED_ARCHITECTURES[arch]
        quantization = read_scheme(raw)  # top-level, also for a model whose text config is nested
        if arch in LANGUAGE_MODEL_OF:  # the language model's config, the checkpoint's end tokens
            raw = raw.get("text_config", {}) | {"architectures": [arch], "model_type": family} | \
                {key: raw[key] for key in ("bos_token_id", "eos_token_id") if key in raw}
        raw = _CLASS_DEFAULTS.get(family, {}) | raw
        model_type = raw.get("model_type", family)
        if model_type != family:  # e.g. Granite names LlamaForCausalLM but scales differently
            raise ValueError(f"model_type {model_type!r} is not supported: stoke runs {arch} as {family!r} "
                             f"computes it, and transformers would run this checkpoint as {model_type!r}")
        # What our one model file does not compute is refused, never approximated.
        gemma = family in GEMMA
        # Gemma's models read hidden_activation only (its hidden_act, "gelu" in Gemma 2's configs, never)
        act = raw.get("hidden_activation") or "gelu_pytorch_tanh" if gemma else raw.get("hidden_act", "silu")
        if act not in (("gelu_pytorch_tanh",) if gemma else ("silu", "swish")):
            raise ValueError(f"hidden_act {act!r} is not supported: stoke's MLP is "
                             f"{'tanh-GELU' if gemma else 'SiLU'}-gated for {arch}")
        if raw.get("use_bidirectional_attention"):
            raise ValueError("use_bidirectional_attention (EmbeddingGemma's) is not supported: stoke's attention is causal")
        if raw.get("mlp_bias"):
            raise ValueError("mlp_bias (biases on the MLP projections) is not supported")
        if raw.get("attention_bias") and family not in ("qwen2", "qwen2_moe"):
            raise ValueError(f"attention_bias (biases on every attention projection) is not supported for {arch}")
        num_heads = raw["num_attention_heads"]
        num_kv_heads = raw.get("num_key_value_heads") or num_heads
        if num_heads % num_kv_heads:
            raise ValueError(f"{num_heads} attention heads do not share {num_kv_heads} key/value heads evenly")
        max_positions = raw.get("max_position_embeddings", 2048)
        head_dim = raw.get("head_dim") or raw["hidden_size"] // num_heads
        params = raw.get("rope_scaling") or raw.get("rope_parameters") or {}
        if raw.get("rope_scaling") and isinstance(raw.get("rope_parameters"), dict):
            # A rope_scaling given over a transformers-5 config (--hf-overrides' yarn): the theta and
            # partial rotary that config saved in its rope_parameters still hold.
            kept = {key: raw["rope_parameters"][key] for key in ("rope_theta", "partial_rotary_factor")
                    if key in raw["rope_parameters"]}
            params = kept | params
        rotary_dim = _rotary_dim(raw, params, family, head_dim)
        local_rope = None
        if family == "gemma3_text":  # rope by layer type: the full layers' scaled, the sliding ones' local
            nested = raw.get("rope_parameters") or {}
            by_type = dict(nested) if "full_attention" in nested or "sliding_attention" in nested else \
                {"full_attention": nested}
            # transformers puts a legacy rope_scaling over the full layers' parameters
            params = {**(by_type.get("full_attention") or {}), **(raw.get("rope_scaling") or {})}
            # Its Gemma 3 reads neither a top-level pretraining length nor yarn's `truncate`
            # (looked up beside the layer types, so always the default) for the nested parameters.
            params.pop("truncate", None)
            raw = {key: value for key, value in raw.items() if key != "original_max_position_embeddings"}
            local = dict(by_type.get("sliding_attention") or {})
            local.setdefault("rope_theta", raw.get("rope_local_base_freq", 10000.0))
            local.pop("truncate", None)
            local_rope = read_rope(raw | {"rope_theta": None}, local, max_positions, rotary_dim)
        rope_theta, scaling = read_rope(raw, params, max_positions, rotary_dim,
                                        1e6 if family == "gemma3_text" else 10000.0, phi3=family == "phi3")
        nope = _nope_layers(raw, family)
        windows = _layer_windows(raw, family, nope)
        eos = raw.get("eos_token_id")
        tokens, method = _classifier_from_token(raw, arch)
        return cls(
            architecture=arch,
            vocab_size=raw["vocab_size"],
            hidden_size=raw["hidden_size"],
            intermediate_size=raw["intermediate_size"],
            num_layers=raw["num_hidden_layers"],
            num_heads=num_heads,
            num_kv_heads=num_kv_heads,
            head_dim=head_dim,
            rms_norm_eps=float(raw.get("rms_norm_eps", 1e-6)),
            rope_theta=rope_theta,
            rope_scaling=scaling,
            max_position_embeddings=max_positions,
            rotary_dim=rotary_dim,
            nope_layers=nope,
            tie_word_embeddings=bool(raw.get("tie_word_embeddings", False)),
            qkv_bias=family == "qwen2" or (family == "qwen2_moe" and bool(raw.get("qkv_bias", True))),
            qk_norm=family in ("qwen3", "qwen3_moe", "gemma3_text"),
            bos_token_id=raw.get("bos_token_id"),
            eos_token_ids=[] if eos is None else ([eos] if isinstance(eos, int) else list(eos)),
            layer_windows=windows,
            fused_checkpoint=family == "phi3",
            **(_gemma_fields(raw, family, act, local_rope) if gemma else {}),
            num_labels=_num_labels(raw, tokens, method) if arch.endswith("ForSequenceClassification") else None,
            classifier_from_token=tokens,
            classifier_method=method,
            moe=MoEConfig.from_dict(raw, family, raw["num_hidden_layers"]),
            quantization=quantization,
        )

    @classmethod
    def from_dir(cls, path: str, hf_overrides: dict[str, Any] | str | None = None) -> ModelConfig:
        config = cls.from_dict(read_hf_config(path, hf_overrides))
        gen_path = os.path.join(path, "generation_config.json")
        if os.path.exists(gen_path):
            with open(gen_path) as f:
                eos = json.load(f).get("eos_token_id")
            if eos is not None:
                config.eos_token_ids = [eos] if isinstance(eos, int) else list(eos)
        return config


def _rotary_dim(raw: dict[str, Any], params: dict[str, Any], family: str, head_dim: int) -> int:
    """The leading dims of each head that rotate: all, or Phi-3's `partial_rotary_factor` of
    them (Phi-4-mini's 3/4), its rope dict's value over the top-level one, as Phi3Config reads
    them. The other families' transformers models rotate every dim."""
    partial = params.get("partial_rotary_factor", raw.get("partial_rotary_factor"))
    if partial is None or partial == 1.0:
        return head_dim
    if family != "phi3":
        raise ValueError(f"partial_rotary_factor {partial} is not supported for {family}: its transformers "
                         f"model rotates every head dim")
    rotary_dim = int(head_dim * partial)
    if not 0 < partial <= 1 or rotary_dim < 2 or rotary_dim % 2:
        raise ValueError(f"partial_rotary_factor {partial} of head_dim {head_dim} does not give an even "
                         f"number of rotary dims")
    return rotary_dim


def _nope_layers(raw: dict[str, Any], family: str) -> tuple[int, ...]:
    """SmolLM3's layers without rope: `no_rope_layers` (1: rope, 0: none, per layer), else one
    every `no_rope_layer_interval` layers (the fourth, eighth, ...), as SmolLM3Config builds it."""
    if family != "smollm3":
        return ()
    num_layers = raw["num_hidden_layers"]
    flags = raw.get("no_rope_layers")
    if flags is None:
        interval = raw["no_rope_layer_interval"]
        if not is_int(interval) or interval < 1:
            raise ValueError(f"no_rope_layer_interval must be a positive integer, got {interval!r}")
        flags = [int((i + 1) % interval != 0) for i in range(num_layers)]
    # At least one flag a layer (a pruned model's list may run on), as SmolLM3's attention reads it.
    if not isinstance(flags, list) or len(flags) < num_layers or not all(f in (0, 1) for f in flags):
        raise ValueError(f"no_rope_layers must be a 0 or 1 for each of the {num_layers} layers, got {flags!r:.200}")
    return tuple(i for i, rotates in enumerate(flags[:num_layers]) if not rotates)


def _layer_windows(raw: dict[str, Any], family: str, nope_layers: tuple[int, ...] = ()) -> tuple[int, ...]:
    """Each layer's window (0: full), as transformers' config class and model read config.json:
    a missing `sliding_window` is the class default, an explicit null no window. Mistral,
    Mixtral, Qwen3-MoE and Phi-3 slide on every layer, Llama never; Qwen2/Qwen3 (and
    Qwen2-MoE) only with `use_sliding_window` (released configs carry a window they do not use), on the layers
    `layer_types` names, else by `max_window_layers`; SmolLM3 likewise, on its layers without
    rope; Gemma 2 on every other layer, Gemma 3 on five in six (`sliding_window_pattern`)."""
    window = raw.get("sliding_window")
    if family == "smollm3" and window and not raw.get("use_sliding_window") \
            and "sliding_attention" in (raw.get("layer_types") or []):
        # transformers' SmolLM3 masks those layers by their window under sdpa and eager but not
        # under flash attention: no one answer to give
        raise ValueError("layer_types names sliding layers while use_sliding_window is false: SmolLM3's "
                         "transformers model windows them under some attention implementations only")
    if family == "llama" or (family.startswith("qwen") or family == "smollm3") and not raw.get("use_sliding_window"):
        window = None
    num_layers = raw["num_hidden_layers"]
    if not window:
        return ()
    if not is_int(window) or window < 1:
        raise ValueError(f"sliding_window must be a positive integer, got {window!r}")
    types = raw.get("layer_types")
    if types is None or family in ("mistral", "mixtral", "qwen3_moe", "phi3"):  # these models ignore layer_types
        last = raw.get("max_window_layers", 28)
        pattern = raw.get("sliding_window_pattern", 6)
        slides = {"qwen2": lambda i: i >= last, "qwen3": lambda i: i >= last,
                  "qwen2_moe": lambda i: i % 2 == 0 and i < last,
                  "gemma2": lambda i: i % 2 == 0, "gemma3_text": lambda i: (i + 1) % pattern != 0,
                  "smollm3": lambda i: i in nope_layers}.get(family)
        types = ["sliding_attention" if slides is None or slides(i) else "full_attention" for i in range(num_layers)]
    if not isinstance(types, list) or len(types) != num_layers \
            or not set(types) <= {"sliding_attention", "full_attention"}:
        raise ValueError(f"layer_types must name each of the {num_layers} layers sliding_attention or "
                         f"full_attention, got {types!r:.200}")
    return tuple(window if t == "sliding_attention" else 0 for t in types)


def _gemma_fields(raw: dict[str, Any], family: str, act: str,
                  local_rope: tuple[float, dict[str, Any] | None] | None) -> dict[str, Any]:
    """ModelConfig's Gemma fields, as transformers' Gemma2/Gemma3 models compute."""
    # Gemma 3's attention keeps the key but never applies it (transformers 5.24, as Google's code)
    attn_cap = raw.get("attn_logit_softcapping") if family == "gemma2" else 0.0
    final_cap = raw.get("final_logit_softcapping")
    return dict(hidden_act=act, attention_scale=float(raw.get("query_pre_attn_scalar", 256)) ** -0.5,
                attn_softcap=float(attn_cap or 0.0), final_softcap=float(final_cap or 0.0),
                embedding_multiplier=raw["hidden_size"] ** 0.5, norm_plus_one=True, sandwich_norms=True,
                local_rope=local_rope)


def dict_option(value: dict[str, Any] | str | None, name: str) -> dict[str, Any] | None:
    """An engine option given as a dict or its JSON text (as the server's flags take it)."""
    if isinstance(value, str):
        try:
            value = json.loads(value)
        except json.JSONDecodeError as exc:
            raise ValueError(f"{name} is not valid JSON: {exc}") from None
    if value is not None and not isinstance(value, dict):
        raise ValueError(f"{name} must be a dict (or its JSON), got {value!r:.100}")
    return value


def read_hf_config(path: str, hf_overrides: dict[str, Any] | str | None = None) -> dict[str, Any]:
    """A checkpoint's config.json, with vLLM's `hf_overrides` (a dict, or its JSON) over its keys."""
    with open(os.path.join(path, "config.json")) as f:
        raw = json.load(f)
    return raw | (dict_option(hf_overrides, "hf_overrides") or {})


CLASSIFIER_METHODS = ("from_2_way_softmax", "no_post_processing")


def _classifier_from_token(raw: dict[str, Any], arch: str) -> tuple[tuple[str, ...] | None, str | None]:
    """An LLM reranker's classifier tokens and method (vLLM's keys; Qwen3-Reranker's
    `is_original_qwen3_reranker` means the 2-way softmax, whatever `method` says, as in vLLM),
    or (None, None)."""
    tokens = raw.get("classifier_from_token")
    if tokens is None:
        return None, None
    if not arch.endswith("ForSequenceClassification"):
        raise ValueError(f"classifier_from_token makes a sequence classifier: the architecture must be one "
                         f"(e.g. {arch.replace('ForCausalLM', '')}ForSequenceClassification), got {arch}")
    if not isinstance(tokens, list) or not tokens or not all(isinstance(t, str) for t in tokens):
        raise ValueError(f"classifier_from_token must be a list of tokens, got {tokens!r:.100}")
    method = "from_2_way_softmax" if raw.get("is_original_qwen3_reranker") else raw.get("method")
    if method not in CLASSIFIER_METHODS:
        raise ValueError(f"classifier_from_token needs a method, one of {CLASSIFIER_METHODS}, got {method!r}")
    if method == "from_2_way_softmax" and len(tokens) != 2:
        raise ValueError(f"from_2_way_softmax takes two tokens (false, true), got {len(tokens)}")
    return tuple(tokens), method


def _num_labels(raw: dict[str, Any], tokens: tuple[str, ...] | None, method: str | None) -> int:
    """A classifier's labels, as transformers counts them (its id2label's, else num_labels: 2,
    transformers' default, where it has neither); an LLM reranker's, as its method makes them."""
    if tokens is not None:
        return 1 if method == "from_2_way_softmax" else len(tokens)
    labels = raw.get("id2label")
    count = len(labels) if labels else raw.get("num_labels", 2)
    if not is_int(count) or count < 1:
        raise ValueError(f"a sequence classifier needs at least one label, got {count!r}")
    return count


def _check_size(name: str, value: Any) -> None:
    if not is_int(value) or value < 1:
        raise ValueError(f"{name} must be an integer >= 1, got {value!r}")


def generation_defaults(source: str, model_dir: str) -> dict[str, Any]:
    """The sampling defaults `source` names: "auto", those of the model's own
    generation_config.json (none if it has none); "none", none (OpenAI's and vLLM's built-in
    defaults apply); otherwise a directory whose generation_config.json holds them. Only the
    keys the file sets: transformers' own defaults (top_k 50) are not the model's advice."""
    if source == "none":
        return {}
    path = os.path.join(model_dir if source == "auto" else source, "generation_config.json")
    if not os.path.isfile(path):
        if source == "auto":
            return {}
        raise ValueError(f"generation_config must be auto, none or a directory with a generation_config.json; "
                         f"{path} does not exist")
    with open(path) as f:
        raw = json.load(f)
    return {ours: raw[key] for key, ours in GENERATION_DEFAULT_KEYS.items() if raw.get(key) is not None}


@dataclass(slots=True)
class EngineConfig:
    """How to run: device, dtype, KV pool size and batching limits. Defaults suit the CPU."""

    model: str | None = None  # HF checkpoint dir; None: the embedded default
    dtype: str = "auto"  # auto: fp32 on CPU, bf16 on CUDA
    device: str = "auto"
    load_format: str = "auto"  # auto | safetensors | dummy
    seed: int = 0
    block_size: int = 16
    kv_cache_memory_bytes: int | None = None  # CPU: the KV pool budget (default 2 GiB)
    # CUDA: the fraction of the GPU's total memory this engine may use (weights, activations,
    # CUDA graphs, KV cache). Memory taken before it started (another process) is not charged
    # to it, but its KV pool never exceeds what is free.
    gpu_memory_utilization: float = 0.9
    num_kv_blocks: int | None = None  # overrides both (tests use tiny pools)
    max_model_len: int | None = None
    max_num_seqs: int = 256
    max_num_batched_tokens: int = 2048
    max_num_partial_prefills: int = 2
    long_prefill_token_threshold: int = 0
    enable_prefix_caching: bool = True
    # A model with sliding-window layers beside others (Gemma 2/3), or only sliding ones: its
    # layers share the pool in groups, and a sliding group's blocks before its window go back to
    # the pool (scheduler/kv_cache_groups.py). True (vLLM's --disable-hybrid-kv-cache-manager):
    # every layer keeps every block of its sequence, as a full-attention model's.
    disable_hybrid_kv_cache_manager: bool = False
    # The prefix cache's host tier, as vLLM's --kv-offloading-size (GiB of host memory; 0: none):
    # a cached block the pool evicts is saved there first, and a later hit on it is loaded back
    # instead of computed again (scheduler/host_kv_cache.py). Needs the prefix cache.
    kv_offloading_size: float = 0.0
    kv_offloading_backend: str = "native"  # vLLM's choice of offloader: stoke has its own only
    # "fcfs": arrival order; "priority": each request's priority first (lower runs earlier; a
    # waiting request preempts running ones of lower priority), as vLLM's scheduling_policy.
    scheduling_policy: str = "fcfs"
    # CUDA graphs (CUDA with the Triton backend only): "full" replays pure-decode steps and
    # steps with prefills, "decode" pure-decode steps only; enforce_eager: never.
    cuda_graph_mode: str = "full"
    enforce_eager: bool = False
    # Schedule and launch step N+1 before step N's tokens reach the host, so the host's work
    # (outputs, detokenizing, scheduling, inputs) overlaps the device's. None: on for CUDA, off
    # for the CPU, where the forward runs on the host anyway.
    async_scheduling: bool | None = None
    # Where requests' default sampling comes from (`generation_defaults`): auto | none | a dir.
    generation_config: str = "auto"
    # Speculative decoding by prompt lookup, vLLM's dict (or its JSON): {"method": "ngram",
    # "num_speculative_tokens": k, "prompt_lookup_max": n, ...} (engine/speculative.py). While
    # drafts are proposed, steps run one after the other (the next step's drafts need this
    # step's tokens); where disable_by_batch_size turns them off, async scheduling resumes.
    speculative_config: dict[str, Any] | str | None = None
    # LoRA adapters (engine/lora.py), as vLLM's: requests may name one (lora_request); at most
    # max_loras of them run at once (slots on the device, ranks up to max_lora_rank), and up to
    # max_cpu_loras (None: max_loras) stay loaded in host memory once no request uses them.
    enable_lora: bool = False
    max_loras: int = 1
    max_lora_rank: int = 16
    max_cpu_loras: int | None = None
    # Reasoning models (engine/reasoning.py), as vLLM's --reasoning-parser: "deepseek_r1" or
    # "qwen3". A structured output's grammar then holds the answer only once its reasoning ended.
    reasoning_parser: str | None = None
    # vLLM's --hf-overrides: keys set over the checkpoint's config.json (a dict or its JSON), e.g.
    # to serve a causal LM as a reranker: {"architectures": ["Qwen3ForSequenceClassification"],
    # "classifier_from_token": ["no", "yes"], "is_original_qwen3_reranker": true}.
    hf_overrides: dict[str, Any] | str | None = None
    # Embeddings (engine/pooling.py), as vLLM's --pooler-config: {"pooling_type": "LAST" | "MEAN" |
    # "CLS", "normalize": bool, "matryoshka_dimensions": [...] or true} (or its JSON) over what the
    # checkpoint says (sentence-transformers modules; else the last token, normalised).
    pooler_config: dict[str, Any] | str | None = None
    # vLLM's --quantization: "fp8" holds the projections' weights in fp8 e4m3, a scale per row
    # (engine/fp8.py), quantized at load from a wider checkpoint; None: as the checkpoint's
    # quantization_config says (an fp8 checkpoint is served in fp8 either way).
    quantization: str | None = None
    # vLLM's --kv-cache-dtype (KV_CACHE_DTYPES): "fp8" holds twice the blocks of bf16 in the same
    # memory, each layer's K and V scaled by the checkpoint's k_scale / v_scale (else 1.0).
    kv_cache_dtype: str = "auto"

    def resolve_max_model_len(self, model: ModelConfig) -> int:
        """The longest sequence served: max_model_len, at most the model's positions."""
        longest = model.longest_sequence
        if self.max_model_len is not None and self.max_model_len > longest:  # as vLLM
            stretched = "" if longest == model.max_position_embeddings else ", stretched by its rope scaling"
            raise ValueError(f"max_model_len {self.max_model_len} exceeds the model's {longest} positions "
                             f"(max_position_embeddings {model.max_position_embeddings}{stretched}): past them "
                             f"its positions were never trained")
        return min(self.max_model_len or longest, longest)

    def check(self) -> None:
        """ValueError for an option no engine could run with, found without the model: the server
        asks before it starts anything, the engine before its weights load."""
        sizes = ["block_size", "max_num_seqs", "max_num_batched_tokens", "max_num_partial_prefills"]
        if self.enable_lora:
            sizes += ["max_loras", "max_lora_rank"]
        for name in sizes:
            _check_size(name, getattr(self, name))
        if self.num_kv_blocks is not None:
            _check_size("num_kv_blocks", self.num_kv_blocks)
        if (not isinstance(self.kv_offloading_size, int | float) or isinstance(self.kv_offloading_size, bool)
                or not 0 <= self.kv_offloading_size < float("inf")):
            raise ValueError(f"kv_offloading_size must be a number of GiB >= 0, got {self.kv_offloading_size!r:.40}")
        if self.kv_offloading_backend != "native":
            raise ValueError(f"kv_offloading_backend must be native, got {self.kv_offloading_backend!r:.40}")
        if self.kv_offloading_size and not self.enable_prefix_caching:
            raise ValueError("kv_offloading_size keeps evicted prefix-cache blocks: it needs the prefix cache on")
        if self.scheduling_policy not in SCHEDULING_POLICIES:
            raise ValueError(f"scheduling_policy must be one of {SCHEDULING_POLICIES}, got {self.scheduling_policy!r}")
        if self.dtype != "auto" and self.dtype not in DTYPES:
            raise ValueError(f"unknown dtype {self.dtype!r}; choose auto or one of {', '.join(DTYPES)}")
        self.resolve_cuda_graph_mode()
        if self.reasoning_parser is not None and self.reasoning_parser not in REASONING_PARSERS:
            raise ValueError(f"reasoning_parser must be one of {REASONING_PARSERS}, got {self.reasoning_parser!r:.40}")
        if self.quantization is not None and self.quantization not in QUANTIZATIONS:
            raise ValueError(f"quantization must be one of {', '.join(QUANTIZATIONS)}, got {self.quantization!r:.40}")
        if self.enable_lora:
            self.resolve_max_cpu_loras()
        self.resolve_kv_cache_dtype(torch.float32)

    def resolve_max_cpu_loras(self) -> int:
        """The LoRA adapters kept in host memory."""
        cpu = self.max_loras if self.max_cpu_loras is None else self.max_cpu_loras
        if not is_int(cpu) or cpu < self.max_loras:
            raise ValueError(f"max_cpu_loras must be an integer >= max_loras ({self.max_loras}), got {cpu!r}")
        return cpu

    def resolve_cuda_graph_mode(self) -> str:
        if self.cuda_graph_mode not in CUDA_GRAPH_MODES:
            raise ValueError(f"cuda_graph_mode must be one of {', '.join(CUDA_GRAPH_MODES)}, got {self.cuda_graph_mode!r}")
        return self.cuda_graph_mode

    def resolve_async_scheduling(self, device: torch.device) -> bool:
        return device.type == "cuda" if self.async_scheduling is None else self.async_scheduling

    def resolve_device(self) -> torch.device:
        """The device, with its index on CUDA: a tensor's device is "cuda:0", never "cuda", and
        the two compare unequal (a seeded request's generator made on "cuda" would not match
        its logits' device)."""
        device = torch.device(("cuda" if torch.cuda.is_available() else "cpu") if self.device == "auto" else self.device)
        if device.type == "cuda" and device.index is None:
            device = torch.device("cuda", torch.cuda.current_device())
        return device

    def resolve_kv_cache_dtype(self, dtype: torch.dtype) -> torch.dtype:
        """The KV cache's dtype, for a model computing in `dtype`."""
        if self.kv_cache_dtype == "auto":
            return dtype
        if self.kv_cache_dtype not in KV_CACHE_DTYPES:
            unsupported = " (stoke stores fp8 K/V as e4m3 only)" if str(self.kv_cache_dtype).startswith("fp8") else ""
            raise ValueError(f"kv_cache_dtype must be auto or one of {', '.join(KV_CACHE_DTYPES)}, "
                             f"got {self.kv_cache_dtype!r:.40}{unsupported}")
        return KV_CACHE_DTYPES[self.kv_cache_dtype]

    def resolve_dtype(self, device: torch.device) -> torch.dtype:
        if self.dtype == "auto":
            return torch.bfloat16 if device.type == "cuda" else torch.float32
        if self.dtype not in DTYPES:
            raise ValueError(f"unknown dtype {self.dtype!r}; choose auto or one of {', '.join(DTYPES)}")
        return DTYPES[self.dtype]
