"""The Llama family in one file: Llama 2/3, SmolLM2, SmolLM3 (no rope on every fourth layer),
Mistral, Qwen2/2.5 (qkv bias), Qwen3 (q/k RMSNorm), Phi-3 and Phi-4 (q/k/v and gate/up saved
fused), and the mixtures of experts Mixtral, Qwen2-MoE and Qwen3-MoE, whose sparse layers' MLP
is engine/models/moe.py's; Gemma 2 and 3 are the same decoder with the changes ModelConfig's
Gemma fields name. Tokens of all sequences are flattened to [T, hidden]; attention goes through
the paged kernels, so this file knows nothing about batching or padding.

The layers pass the residual stream beside the hidden states (vLLM's style), so that the
residual add and the next RMSNorm run as one fused kernel; rotary embedding then runs in place
on q/k, and the MLP's SiLU * up in one pass. `LlamaForCausalLM.use_norm_rope_kernels(ops)`
switches to those kernels (kernels.triton_norm_rope on CUDA, kernels.cpu_ops' C on the CPU);
without it kernels.reference's norm and the torch code below run, with the same rounding
points, so all give the same numbers up to fp32 summation order. `use_linear_kernels(ops)`
likewise runs the projections and the LM head through a backend's product over weights it
packed once (kernels.cpu_ops)."""

from __future__ import annotations

import logging
import re
from collections.abc import Iterable
from dataclasses import dataclass
from types import ModuleType

import torch
import torch.nn.functional as F
from torch import nn

from engine.attention import AttentionMetadata, paged_attention
from engine.config import LANGUAGE_MODEL_OF, ModelConfig
from engine.fp8 import FP8, UNUSED_SCALES, WEIGHT_SCALES, kv_scale_of, quantize, scales_per_row
from engine.lora import LoRAProjection, LoRAState
from engine.models.moe import SparseMoeBlock
from engine.rope import inv_freq
from kernels import reference

logger = logging.getLogger(__name__)


class RMSNorm(nn.Module):
    def __init__(self, dim: int, eps: float) -> None:
        super().__init__()
        self.weight = nn.Parameter(torch.ones(dim))
        self.eps = eps
        self.kernels: ModuleType | None = None  # kernels.triton_norm_rope, or None: torch

    def forward(
        self, x: torch.Tensor, residual: torch.Tensor | None = None
    ) -> torch.Tensor | tuple[torch.Tensor, torch.Tensor]:
        """rmsnorm(x) * weight; with `residual`, (rmsnorm(x + residual) * weight, x + residual)."""
        return (self.kernels or reference).rms_norm(x, self.weight, self.eps, residual)


@dataclass(slots=True)
class RopeInputs:
    cos_sin: tuple[torch.Tensor, torch.Tensor] | None  # [T, 1, rotary_dim/2] each (torch path)
    cos_table: torch.Tensor  # [max_model_len, rotary_dim/2] (fused kernel)
    sin_table: torch.Tensor
    positions: torch.Tensor  # [T]


class Rotary(nn.Module):
    """Rotary embedding with a cos/sin table over every position served (HF's rotate-half
    layout, over each head's leading `rotary_dim` dims): the model's rope, or with `local`, its
    sliding layers' own (Gemma 3's). The tables carry the scaling's attention factor (yarn's,
    longrope's), as transformers scales its cos and sin."""

    def __init__(self, config: ModelConfig, max_model_len: int | None = None, local: bool = False) -> None:
        super().__init__()
        self.config = config
        self.positions = max_model_len or config.longest_sequence
        self.theta, self.scaling = config.local_rope if local else (config.rope_theta, config.rope_scaling)
        cos, sin = self._tables()
        self.register_buffer("cos", cos, persistent=False)
        self.register_buffer("sin", sin, persistent=False)

    def _tables(self) -> tuple[torch.Tensor, torch.Tensor]:
        frequencies, scale = inv_freq(self.config.rotary_dim or self.config.head_dim, self.theta, self.scaling,
                                      self.positions)
        freqs = torch.outer(torch.arange(self.positions, dtype=torch.float32), frequencies)
        return freqs.cos() * scale, freqs.sin() * scale

    def restore_fp32(self) -> None:
        """The tables in fp32 again after the model was cast to a 16-bit dtype: computed anew,
        as cast back they would keep bf16's rounding (~2e-3 at long positions)."""
        with torch.device(self.cos.device):
            self.cos, self.sin = self._tables()

    def lookup(self, positions: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """cos, sin [T, 1, D/2] for the step's positions (once per step, shared by every layer)."""
        return self.cos[positions].unsqueeze(1), self.sin[positions].unsqueeze(1)

    def inputs(self, positions: torch.Tensor, fused: bool) -> RopeInputs:
        """What every layer's rotary needs this step: the looked-up rows for the torch code,
        or the whole tables and the positions for the fused kernel (which looks up itself)."""
        if fused:
            return RopeInputs(None, self.cos, self.sin, positions)
        return RopeInputs(self.lookup(positions), self.cos, self.sin, positions)

    @staticmethod
    def apply(cos_sin: tuple[torch.Tensor, torch.Tensor], *xs: torch.Tensor) -> list[torch.Tensor]:
        cos, sin = cos_sin
        rotary_dim = 2 * cos.shape[-1]
        out = []
        for x in xs:
            x1, x2 = x[..., :rotary_dim].float().chunk(2, dim=-1)
            rotated = torch.cat([x1 * cos - x2 * sin, x2 * cos + x1 * sin], dim=-1).to(x.dtype)
            out.append(rotated if rotary_dim == x.shape[-1] else torch.cat([rotated, x[..., rotary_dim:]], dim=-1))
        return out


class Linear(nn.Linear):
    """nn.Linear, or, after `use_kernels(ops)`, `ops.linear` over the weight as `ops` packed it.
    The packed copy replaces the weight (which is then empty) until `use_kernels(None)`
    unpacks it again, so the weights are held once. With `fp8_group_size`, the weight is held
    in fp8 with a scale per row and group of that many input columns (engine/fp8.py), and the
    product is `fp8_kernels.fp8_linear`'s, or packed, `ops.fp8_linear`'s (the CPU's C). With
    LoRA adapters (engine/lora.py), each token's adapter product is added to it."""

    def __init__(self, in_features: int, out_features: int, bias: bool, fp8_group_size: int | None = None) -> None:
        # An fp8 weight is made in fp8 from the start (never first at the model's dtype).
        super().__init__(in_features, out_features, bias=bias, device="meta" if fp8_group_size else None)
        self.kernels: ModuleType | None = None
        self.packed: torch.Tensor | None = None
        self.lora: LoRAProjection | None = None
        self.fp8_group_size = fp8_group_size
        self.fp8_kernels: ModuleType = reference  # a module with fp8_linear
        self.weight_scale: nn.Parameter | None = None
        if fp8_group_size:
            groups = -(-in_features // fp8_group_size)
            self.weight = nn.Parameter(torch.empty(out_features, in_features, dtype=FP8), requires_grad=False)
            self.weight_scale = nn.Parameter(torch.empty(out_features, groups, dtype=torch.float32),
                                             requires_grad=False)
            if bias:
                self.bias = nn.Parameter(torch.empty(out_features))

    def use_kernels(self, ops: ModuleType | None) -> None:
        fp8 = self.weight_scale is not None  # packed by the fp8 packer, its scales kept apart
        if self.packed is not None:  # back to the plain weight first
            unpacked = self.kernels.unpack_linear_weight(self.packed, self.out_features, self.in_features)
            self.weight = nn.Parameter(unpacked, requires_grad=False)
            self.kernels = self.packed = None
        packed = None if ops is None else (ops.pack_fp8_linear_weight if fp8 else ops.pack_linear_weight)(self.weight)
        if packed is not None:
            self.kernels, self.packed = ops, packed
            self.weight = nn.Parameter(self.weight.new_empty(0), requires_grad=False)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if self.weight_scale is not None and self.packed is not None:
            y = self.kernels.fp8_linear(x, self.packed, self.weight_scale, self.fp8_group_size, self.bias,
                                        self.out_features)
        elif self.weight_scale is not None:
            y = self.fp8_kernels.fp8_linear(x, self.weight, self.weight_scale, self.fp8_group_size, self.bias)
        elif self.packed is not None:
            y = self.kernels.linear(x, self.packed, self.bias, self.out_features)
        else:
            y = F.linear(x, self.weight, self.bias)
        if self.lora is not None and self.lora.state.active:
            y = self.lora(x, y)
        return y


class Attention(nn.Module):
    def __init__(self, config: ModelConfig, layer: int) -> None:
        super().__init__()
        self.layer = layer
        self.rope_kernels: ModuleType | None = None  # kernels.triton_norm_rope, or None: torch
        self.num_heads, self.num_kv_heads, self.head_dim = config.num_heads, config.num_kv_heads, config.head_dim
        self.q_size = self.num_heads * self.head_dim
        self.kv_size = self.num_kv_heads * self.head_dim
        self.scale = config.attention_scale or self.head_dim**-0.5
        window = config.window(layer)
        # A window that covers every position served is none to the kernels (Phi-4-mini's 262,144
        # keys of 131,072), but its layer is still a sliding one: with a local rope (Gemma 3's),
        # it rotates by that one.
        self.sliding_window = window if window < config.longest_sequence else 0
        self.softcap = config.attn_softcap
        self.local_rope = bool(window) and config.local_rope is not None
        self.rotates = layer not in config.nope_layers
        # An fp8 KV cache holds K / k_scale and V / v_scale (the checkpoint's, else 1.0).
        self.kv_scales = (1.0, 1.0)
        where = f"model.layers.{layer}.self_attn"
        qkv = ["qkv_proj"] if config.fused_checkpoint else ["q_proj", "k_proj", "v_proj"]
        self.qkv_proj = Linear(config.hidden_size, self.q_size + 2 * self.kv_size, bias=config.qkv_bias,
                               fp8_group_size=fp8_group_size(config, where, qkv, config.hidden_size))
        self.o_proj = Linear(self.q_size, config.hidden_size, bias=False,
                             fp8_group_size=fp8_group_size(config, where, ["o_proj"], self.q_size))
        if config.qk_norm:
            self.q_norm = RMSNorm(self.head_dim, config.rms_norm_eps)
            self.k_norm = RMSNorm(self.head_dim, config.rms_norm_eps)
        else:
            self.q_norm = self.k_norm = None

    def forward(self, x: torch.Tensor, rope: RopeInputs, meta: AttentionMetadata) -> torch.Tensor:
        q, k, v = self.qkv_proj(x).split([self.q_size, self.kv_size, self.kv_size], dim=-1)
        q = q.view(-1, self.num_heads, self.head_dim)
        k = k.view(-1, self.num_kv_heads, self.head_dim)
        v = v.view(-1, self.num_kv_heads, self.head_dim)
        if self.q_norm is not None:
            q, k = self.q_norm(q), self.k_norm(k)
        if self.rotates:  # a NoPE layer (SmolLM3's) has no position but the causal order
            if self.rope_kernels is not None:  # in place on the (strided) views
                self.rope_kernels.apply_rotary(q, k, rope.cos_table, rope.sin_table, rope.positions)
            else:
                q, k = Rotary.apply(rope.cos_sin, q, k)
        out = paged_attention(q, k, v.contiguous(), self.layer, meta, self.scale,
                              sliding_window=self.sliding_window, softcap=self.softcap, kv_scales=self.kv_scales)
        return self.o_proj(out.reshape(-1, self.q_size))


def fp8_group_size(config: ModelConfig, where: str, modules: list[str], in_features: int) -> int | None:
    """The fp8 group size of the projection fusing checkpoint `modules` under `where` (a module
    path as the checkpoint names it), None where it is not quantized."""
    scheme = config.quantization
    if scheme is None or not scheme.quantizes_all([config.checkpoint_names(f"{where}.{m}" if where else m)
                                                    for m in modules]):
        return None
    return scheme.group(in_features)


class MLP(nn.Module):
    def __init__(self, config: ModelConfig, intermediate_size: int | None = None, where: str = "") -> None:
        """`where`: the MLP's module path in the checkpoint (model.layers.0.mlp), which its
        quantization config may name."""
        super().__init__()
        self.intermediate_size = intermediate_size or config.intermediate_size
        gate_up = ["gate_up_proj"] if config.fused_checkpoint else ["gate_proj", "up_proj"]
        self.gate_up_proj = Linear(config.hidden_size, 2 * self.intermediate_size, bias=False,
                                   fp8_group_size=fp8_group_size(config, where, gate_up, config.hidden_size))
        self.down_proj = Linear(self.intermediate_size, config.hidden_size, bias=False,
                                fp8_group_size=fp8_group_size(config, where, ["down_proj"], self.intermediate_size))
        self.kernels: ModuleType | None = None  # a module with silu_and_mul, or None: torch
        self.gelu = config.hidden_act == "gelu_pytorch_tanh"  # Gemma's gate, in torch

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        gate_up = self.gate_up_proj(x)
        if self.kernels is not None and not self.gelu:
            return self.down_proj(self.kernels.silu_and_mul(gate_up))
        gate, up = gate_up.split(self.intermediate_size, dim=-1)
        gate = F.gelu(gate, approximate="tanh") if self.gelu else F.silu(gate)
        return self.down_proj(gate * up)


class DecoderLayer(nn.Module):
    def __init__(self, config: ModelConfig, layer: int) -> None:
        super().__init__()
        self.self_attn = Attention(config, layer)
        sparse = config.moe is not None and layer in config.moe.sparse_layers
        self.mlp = SparseMoeBlock(config, MLP, f"model.layers.{layer}.mlp") if sparse else \
            MLP(config, where=f"model.layers.{layer}.mlp")
        self.input_layernorm = RMSNorm(config.hidden_size, config.rms_norm_eps)
        self.post_attention_layernorm = RMSNorm(config.hidden_size, config.rms_norm_eps)
        if config.sandwich_norms:  # Gemma's: post_attention_layernorm then norms the attention's output
            self.pre_feedforward_layernorm = RMSNorm(config.hidden_size, config.rms_norm_eps)
            self.post_feedforward_layernorm = RMSNorm(config.hidden_size, config.rms_norm_eps)
        else:
            self.pre_feedforward_layernorm = self.post_feedforward_layernorm = None

    def forward(
        self, x: torch.Tensor, residual: torch.Tensor | None, rope: RopeInputs, meta: AttentionMetadata
    ) -> tuple[torch.Tensor, torch.Tensor]:
        """(this layer's MLP output, the residual stream before it); their sum is the layer's
        output. `residual` None: the first layer, whose input is x alone."""
        if residual is None:
            residual, h = x, self.input_layernorm(x)
        else:
            h, residual = self.input_layernorm(x, residual)
        h = self.self_attn(h, rope, meta)
        if self.pre_feedforward_layernorm is None:
            h, residual = self.post_attention_layernorm(h, residual)
            return self.mlp(h), residual
        h, residual = self.pre_feedforward_layernorm(self.post_attention_layernorm(h), residual)
        return self.post_feedforward_layernorm(self.mlp(h)), residual


class LlamaModel(nn.Module):
    def __init__(self, config: ModelConfig, max_model_len: int | None = None) -> None:
        super().__init__()
        self.config = config
        self.embed_tokens = nn.Embedding(config.vocab_size, config.hidden_size)
        self.layers = nn.ModuleList(DecoderLayer(config, i) for i in range(config.num_layers))
        self.norm = RMSNorm(config.hidden_size, config.rms_norm_eps)
        self.rotary = Rotary(config, max_model_len)
        self.local_rotary = Rotary(config, max_model_len, local=True) if config.local_rope is not None else None


class LlamaForCausalLM(nn.Module):
    # HF checkpoint names that land in a slice of one of our fused parameters.
    FUSED = {
        "q_proj": ("qkv_proj", 0), "k_proj": ("qkv_proj", 1), "v_proj": ("qkv_proj", 2),
        "gate_proj": ("gate_up_proj", 0), "up_proj": ("gate_up_proj", 1),
    }
    # One expert's projection in a checkpoint (Mixtral's block_sparse_moe is renamed mlp first):
    # Qwen-MoE's gate/up/down_proj, Mixtral's w1/w3/w2; its rows of our stacked w13 or w2.
    EXPERT = re.compile(r"(model\.layers\.\d+\.mlp)\.experts\.(\d+)\.(\w+)\.weight(_scale)?")
    EXPERT_SHARDS = {"gate_proj": ("w13", 0), "w1": ("w13", 0), "up_proj": ("w13", 1), "w3": ("w13", 1),
                     "down_proj": ("w2", None), "w2": ("w2", None)}
    # Experts already stacked, as transformers 5 holds them: [E, 2I, H] and [E, H, I].
    STACKED_EXPERTS = {"experts.gate_up_proj": "w13", "experts.down_proj": "w2"}

    def __init__(self, config: ModelConfig, max_model_len: int | None = None) -> None:
        """`max_model_len`: the longest sequence served (the rope tables' rows, and the length
        longrope and dynamic NTK pick their frequencies by, engine/rope.py); None: the model's."""
        super().__init__()
        self.config = config
        self.model = LlamaModel(config, max_model_len)
        classifier = config.is_classifier
        self.lm_head = None if config.tie_word_embeddings or classifier else \
            Linear(config.hidden_size, config.vocab_size, bias=False,
                   fp8_group_size=fp8_group_size(config, "", ["lm_head"], config.hidden_size))
        # False for a classifier and a checkpoint without one (an embedding model's): no generation.
        self.has_lm_head = not classifier
        # A sequence classifier's head, transformers' `score` (torch's product: a few rows a step).
        self.score = nn.Linear(config.hidden_size, config.num_labels, bias=False) if classifier else None
        self.norm_rope_kernels: ModuleType | None = None
        self.linear_kernels: ModuleType | None = None
        # A tied head's packed weight: it also serves the embedding lookups, whose own weight is
        # then empty (held once, as with every Linear).
        self.head_packed: torch.Tensor | None = None
        self.lora_state: LoRAState | None = None  # set with LoRA adapters (engine/lora.py)

    def restore_fp32(self) -> None:
        """After a cast to a 16-bit dtype, before the weights load: the rope tables computed anew
        in fp32 (Rotary.restore_fp32), and Gemma's norm weights (1 + w) back in fp32, where its
        norms multiply and round once (kernels.reference.rms_norm)."""
        for rotary in (self.model.rotary, self.model.local_rotary):
            if rotary is not None:
                rotary.restore_fp32()
        if self.config.norm_plus_one:
            for module in self.modules():
                if isinstance(module, RMSNorm):
                    module.weight.data = module.weight.data.float()

    def use_norm_rope_kernels(self, ops: ModuleType | None) -> None:
        """Run every RMSNorm (with its residual add), the rotary embedding and the MLP's
        activation through `ops` (kernels.triton_norm_rope on CUDA, kernels.cpu_ops on the
        CPU); None: back to the torch code."""
        self.norm_rope_kernels = ops
        for module in self.modules():
            if isinstance(module, (RMSNorm, MLP)):
                module.kernels = ops
            elif isinstance(module, Attention):
                module.rope_kernels = ops

    def use_moe_kernels(self, ops: ModuleType) -> None:
        """Run every mixture of experts' MLP through `ops.fused_moe` (kernels.triton_moe on CUDA;
        kernels.reference, the default, elsewhere)."""
        for module in self.modules():
            if isinstance(module, SparseMoeBlock):
                module.kernels = ops

    def use_fp8_kernels(self, ops: ModuleType) -> None:
        """Run every fp8 projection as `ops.fp8_linear` (kernels.triton_fp8 on CUDA;
        kernels.reference, the default, elsewhere; the CPU's C product packs its own copy,
        `use_linear_kernels`)."""
        for module in self.modules():
            if isinstance(module, Linear):
                module.fp8_kernels = ops

    def use_linear_kernels(self, ops: ModuleType | None) -> None:
        """Run every projection and the LM head as `ops.linear` over weights `ops` packs now
        (kernels.cpu_ops: the product in C); call it once the weights are loaded. A tied head
        packs the embedding, and the lookups read the packed copy. None: back to torch."""
        embed = self.model.embed_tokens
        if self.head_packed is not None:  # back to the plain embedding first
            unpacked = self.linear_kernels.unpack_linear_weight(self.head_packed, embed.num_embeddings,
                                                                embed.embedding_dim)
            embed.weight = nn.Parameter(unpacked, requires_grad=False)
            self.head_packed = None
        self.linear_kernels = ops
        for module in self.modules():
            if isinstance(module, Linear):
                module.use_kernels(ops)
        if self.lm_head is None and ops is not None:
            self.head_packed = ops.pack_linear_weight(embed.weight)
            if self.head_packed is not None:
                embed.weight = nn.Parameter(embed.weight.new_empty(0), requires_grad=False)

    def lora_projections(self) -> Iterable[tuple[int, Linear, list[tuple[str, int, int]]]]:
        """Every projection a LoRA adapter may adapt: (layer, the Linear, and for each
        checkpoint module it fuses, its name and first and end output column)."""
        fused = self.config.fused_checkpoint  # the adapters name the fused modules (Phi-3)
        for i, layer in enumerate(self.model.layers):
            attn, mlp = layer.self_attn, layer.mlp
            yield i, attn.qkv_proj, [("qkv_proj", 0, attn.qkv_proj.out_features)] if fused else \
                [(m, *self._shard_bounds("qkv_proj", s, 0)) for m, s in (("q_proj", 0), ("k_proj", 1), ("v_proj", 2))]
            yield i, attn.o_proj, [("o_proj", 0, attn.o_proj.out_features)]
            if isinstance(mlp, MLP):  # experts are not adapted (engine/lora.py refuses adapters for them)
                rows = mlp.gate_up_proj.out_features
                yield i, mlp.gate_up_proj, [("gate_up_proj", 0, rows)] if fused else \
                    [(m, *self._shard_bounds("gate_up_proj", s, rows)) for m, s in (("gate_proj", 0), ("up_proj", 1))]
                yield i, mlp.down_proj, [("down_proj", 0, mlp.down_proj.out_features)]

    def forward(self, input_ids: torch.Tensor, positions: torch.Tensor, meta: AttentionMetadata) -> torch.Tensor:
        """input_ids, positions [T] → final hidden states [T, hidden] (before the norm)."""
        if self.lora_state is not None and self.lora_state.active:
            self.lora_state.begin(input_ids.shape[0])
        if self.head_packed is not None:
            x = self.linear_kernels.embedding_from_packed(self.head_packed, input_ids, self.config.hidden_size)
        else:
            x = self.model.embed_tokens(input_ids)
        if self.config.embedding_multiplier != 1.0:  # as transformers: the factor rounded to the dtype first
            x = x * torch.tensor(self.config.embedding_multiplier, dtype=x.dtype)
        fused = self.norm_rope_kernels is not None
        rope = self.model.rotary.inputs(positions, fused)
        local = self.model.local_rotary
        local_rope = rope if local is None else local.inputs(positions, fused)
        residual = None
        for layer in self.model.layers:
            x, residual = layer(x, residual, local_rope if layer.self_attn.local_rope else rope, meta)
        return x + residual

    def final_norm(self, hidden: torch.Tensor) -> torch.Tensor:
        """forward's hidden states → the model's last hidden states (transformers'
        `last_hidden_state`): what embeddings pool."""
        return self.model.norm(hidden)

    def classify(self, pooled: torch.Tensor) -> torch.Tensor:
        """Pooled last hidden states [..., hidden] → a classifier's logits [..., num_labels], fp32."""
        return self.score(pooled.to(self.score.weight.dtype)).float()

    def compute_logits(self, hidden: torch.Tensor) -> torch.Tensor:
        if not self.has_lm_head:
            raise RuntimeError("this model has no LM head: it generates nothing")
        hidden = self.model.norm(hidden)
        if self.lm_head is not None:
            logits = self.lm_head(hidden)
        elif self.head_packed is not None:
            logits = self.linear_kernels.linear(hidden, self.head_packed, None, self.config.vocab_size)
        else:
            logits = F.linear(hidden, self.model.embed_tokens.weight)
        cap = self.config.final_softcap
        return logits if not cap else torch.tanh(logits / cap) * cap

    def _no_score_head(self) -> ValueError:
        return ValueError(f"this checkpoint has no score head (a causal LM's?): served as {self.config.architecture} "
                          "it needs classifier_from_token (hf_overrides, as an LLM reranker's), else its own "
                          "architecture")

    def _score_from_rows(self, head_rows: torch.Tensor | None) -> None:
        """An LLM reranker's score head from its classifier tokens' LM-head rows (the
        embedding's, for a tied head), as vLLM builds it (engine/config.py)."""
        if head_rows is None:
            if not self.config.tie_word_embeddings:
                raise ValueError("classifier_from_token needs the checkpoint's lm_head.weight, and it has none")
            head_rows = self.model.embed_tokens.weight[list(self.config.classifier_token_ids)]
        rows = head_rows.float()
        if self.config.classifier_method == "from_2_way_softmax":  # false, true: sigmoid(true - false)
            rows = rows[1:2] - rows[0:1]
        self.score.weight.copy_(rows.to(self.score.weight))

    def _shard_bounds(self, fused: str, shard: int, rows: int) -> tuple[int, int]:
        """Which of a fused projection's `rows` rows hold one of the checkpoint's projections: q,
        k or v of qkv_proj; gate or up of gate_up_proj (a dense MLP's, or an expert's in w13)."""
        if fused == "qkv_proj":
            c = self.config
            q, kv = c.num_heads * c.head_dim, c.num_kv_heads * c.head_dim
            return [(0, q), (q, q + kv), (q + kv, q + 2 * kv)][shard]
        half = rows // 2
        return (shard * half, (shard + 1) * half)

    @staticmethod
    def _pieces(name: str, param: torch.Tensor) -> list[str]:
        """The parts a checkpoint may give a parameter of ours in separate tensors (none: it
        comes whole): a fused projection's shards, stacked experts' projections."""
        parts = name.split(".")
        kind = parts[-2] if parts[-1] in ("weight", "bias", "weight_scale") else parts[-1].removesuffix("_scale")
        if kind == "qkv_proj":
            return ["0", "1", "2"]
        if kind == "gate_up_proj":
            return ["0", "1"]
        if kind == "w13":
            return [f"{e}.{s}" for e in range(param.shape[0]) for s in (0, 1)]
        if kind == "w2":
            return [str(e) for e in range(param.shape[0])]
        return []

    def _set_kv_scales(self, scales: dict[tuple[int, str], float]) -> None:
        """The checkpoint's KV-cache scales, to their layers' attention (1.0 where it has none)."""
        layers = self.model.layers
        for layer, _ in scales:
            if layer >= len(layers):
                raise ValueError(f"the checkpoint has a KV-cache scale for layer {layer}, and the model has {len(layers)}")
        for i, layer in enumerate(layers):
            layer.self_attn.kv_scales = (scales.get((i, "k"), 1.0), scales.get((i, "v"), 1.0))

    def _covered(self, name: str, param: torch.Tensor, loaded: set[str]) -> bool:
        """Whether the checkpoint filled parameter `name`: whole, or every one of its parts."""
        pieces = self._pieces(name, param)
        return name in loaded or bool(pieces) and all(f"{name}#{p}" in loaded for p in pieces)

    def _fp8_fills(self, source: str, target: str, tensor: torch.Tensor, fp8_param: bool) -> dict[str, torch.Tensor]:
        """What a tensor of the other kind than its parameter fills: with quantization="fp8",
        a wide weight quantized with its scales; else a ValueError (a checkpoint that disagrees
        with its quantization config)."""
        scheme = self.config.quantization
        if not fp8_param and scheme is None:
            raise ValueError(f"checkpoint tensor {source!r} is fp8, and the checkpoint's config.json has no "
                             "quantization_config saying how its weights are quantized")
        if not fp8_param:
            raise ValueError(f"checkpoint tensor {source!r} is fp8, and stoke holds {target} at the model's dtype: "
                             "the quantization config leaves it out, or it is a module stoke serves in fp8 from no "
                             "checkpoint (a classifier's score head, a router)")
        if not scheme.online:
            raise ValueError(f"checkpoint tensor {source!r} is {str(tensor.dtype).removeprefix('torch.')}, and its "
                             "quantization config says the projection is fp8")
        weight, scale = quantize(tensor, self.fp8_group_size(target))
        return {target: weight, f"{target}_scale": scale}

    def fp8_group_size(self, param: str) -> int:
        """The group size of fp8 parameter `param` (a projection's weight, an expert stack)."""
        owner, leaf = param.rsplit(".", 1)
        module = self.get_submodule(owner)
        return module.fp8_group_size if isinstance(module, Linear) else module.fp8_groups[leaf]

    def cast(self, dtype: torch.dtype) -> None:
        """model.to(dtype), but for fp8 weights and their fp32 scales (an fp8 weight cast would
        be a copy at the model's dtype, twice the memory)."""
        kept = {id(p) for name, p in self.named_parameters() if p.dtype == FP8 or name.endswith("_scale")}
        self._apply(lambda t: t if id(t) in kept or not t.is_floating_point() else t.to(dtype))

    def load_weights(self, weights: Iterable[tuple[str, torch.Tensor]], *, read_kv_scales: bool = False) -> None:
        """Copy HF-named tensors into our parameters; every parameter must be covered.
        `read_kv_scales`: take the checkpoint's KV-cache scales for an fp8 KV cache (refusing
        what it cannot use); otherwise they are skipped, unread, as a cache at the model's dtype
        has no use for them (a checkpoint with per-head ones loads as it did)."""
        params = dict(self.named_parameters())
        loaded: set[str] = set()  # our parameters filled whole, and `name#piece` for their parts
        pieced: set[str] = set()  # our parameters filled in parts
        tied_head: torch.Tensor | None = None
        head_rows: torch.Tensor | None = None  # an LLM reranker's: its classifier tokens' LM-head rows
        token_ids = list(self.config.classifier_token_ids or ())
        renames, left_out = LANGUAGE_MODEL_OF.get(self.config.architecture, ({}, ()))
        scheme = self.config.quantization
        kv_scales: dict[tuple[int, str], float] = {}  # (layer, "k" | "v"): an fp8 KV cache's scale
        for name, tensor in weights:
            if "rotary_emb" in name or name.startswith(left_out):
                continue
            given, last = name, name.rsplit(".", 1)[-1]
            if (scheme is None or scheme.online) and (last in UNUSED_SCALES or last in WEIGHT_SCALES):
                raise ValueError(f"checkpoint tensor {given!r} is a quantization scale, and the checkpoint's "
                                 "config.json has no quantization_config saying how its weights are quantized")
            if scheme is not None and not scheme.online:
                if last in UNUSED_SCALES:
                    if read_kv_scales and (found := kv_scale_of(name, tensor)):
                        layer, which, scale = found
                        kv_scales.update({(layer, part): scale for part in which})  # "kv": both
                    continue
                if last == scheme.scale_suffix:  # our name for a projection's scales
                    name = name.removesuffix(last) + "weight_scale"
            prefix = next((p for p in renames if name.startswith(p)), None)
            if prefix is not None:
                name = renames[prefix] + name.removeprefix(prefix)
            if not name.startswith(("model.", "lm_head.", "score.")):  # a base model's checkpoint (LlamaModel's)
                name = f"model.{name}"
            if name == "lm_head.weight" and token_ids:
                if tensor.dtype == FP8:
                    raise ValueError("classifier_from_token reads the LM head's rows, and this checkpoint's is fp8: "
                                     "stoke builds a reranker's score head from a wide LM head only")
                head_rows = tensor[token_ids].clone()
                continue
            if name == "lm_head.weight" and self.config.is_classifier:
                raise self._no_score_head()
            if name.startswith("lm_head.") and self.lm_head is None and scheme is not None and \
                    (tensor.dtype == FP8 or name != "lm_head.weight"):
                continue  # a quantized copy of a tied head: the embedding is the head (vLLM reads past it too)
            if name == "lm_head.weight" and self.lm_head is None and self.has_lm_head:
                tied_head = tensor  # tied: the embedding serves as the head, if they are equal
                continue
            source, name = given, name.replace(".block_sparse_moe.", ".mlp.")
            parts = name.split(".")
            # target: our parameter; expert: its index in stacked experts; fused, shard: which
            # rows of a fused projection; piece: the part loaded, where the tensor is not all of it.
            target, expert, fused, shard, piece = name, None, "", None, None
            if (match := self.EXPERT.fullmatch(name)) and match.group(3) in self.EXPERT_SHARDS:
                prefix, index, projection, scales = match.groups()
                stacked, shard = self.EXPERT_SHARDS[projection]
                target, expert, fused = f"{prefix}.{stacked}{scales or ''}", int(index), stacked
                piece = index if shard is None else f"{index}.{shard}"
            elif len(parts) >= 3 and f"{parts[-2]}.{parts[-1]}" in self.STACKED_EXPERTS:
                target = ".".join(parts[:-2] + [self.STACKED_EXPERTS[f"{parts[-2]}.{parts[-1]}"]])
            elif len(parts) >= 2 and parts[-2] in self.FUSED:
                fused, shard = self.FUSED[parts[-2]]
                target, piece = ".".join(parts[:-2] + [fused, parts[-1]]), str(shard)
            if target not in params:
                raise ValueError(f"checkpoint tensor {source!r} has no place in {self.config.architecture}")

            def place(param: str) -> torch.Tensor:
                """Where the tensor lands in `param`: its expert's, its shard's rows."""
                dest = params[param].data
                if expert is not None:
                    if expert >= dest.shape[0]:
                        raise ValueError(f"checkpoint tensor {source!r} is for expert {expert}, and the model has "
                                         f"{dest.shape[0]}")
                    dest = dest[expert]
                if shard is not None:
                    first, end = self._shard_bounds(fused, shard, dest.shape[0])
                    dest = dest[first:end]
                return dest

            dest = place(target)
            fills = {target: tensor}  # what the tensor fills: an online quantization's scales too
            if target.endswith("_scale"):
                fills[target] = scales_per_row(tensor, *dest.shape, scheme.block_rows, source)
            elif (dest.dtype == FP8) != (tensor.dtype == FP8):
                fills = self._fp8_fills(source, target, tensor, dest.dtype == FP8)
            for target, tensor in fills.items():
                dest = place(target)
                if dest.shape != tensor.shape:
                    raise ValueError(f"checkpoint tensor {source!r} has shape {tuple(tensor.shape)}, "
                                     f"expected {tuple(dest.shape)}")
                key = target if piece is None else f"{target}#{piece}"
                if key in loaded or (target in pieced if piece is None else target in loaded):
                    raise ValueError(f"checkpoint tensor {source!r} fills {target} again (the checkpoint holds it "
                                     "twice, e.g. its experts both one by one and stacked)")
                if self.config.norm_plus_one and target.endswith("norm.weight"):
                    tensor = tensor.float() + 1.0  # Gemma's RMSNorm scales by 1 + w
                dest.copy_(tensor)
                loaded.add(key)
                if piece is not None:
                    pieced.add(target)
        self._set_kv_scales(kv_scales)
        missing = [name for name, param in params.items() if not self._covered(name, param, loaded)]
        if "score.weight" in missing:
            if not token_ids:
                raise self._no_score_head()
            missing.remove("score.weight")
            self._score_from_rows(head_rows)
        if "lm_head.weight" in missing:  # an embedding model's checkpoint: no head
            logger.warning("the checkpoint has no lm_head.weight: this model computes embeddings only")
            missing = [m for m in missing if m not in ("lm_head.weight", "lm_head.weight_scale")]
            self.lm_head, self.has_lm_head = None, False
        if missing:
            raise ValueError(f"checkpoint is missing weights: {', '.join(missing[:8])}{' …' if len(missing) > 8 else ''}")
        embed = self.model.embed_tokens.weight
        head = None if tied_head is None else tied_head.to(embed)
        if head is not None and not torch.equal(head, embed):
            # As transformers 5: a head the checkpoint holds apart from the embedding is its own.
            logger.warning("tie_word_embeddings is set but lm_head.weight differs from the embedding: "
                           "the checkpoint's lm_head is used")
            with torch.device("meta"):  # no full-size fp32 init to throw away
                self.lm_head = Linear(self.config.hidden_size, self.config.vocab_size, bias=False)
            self.lm_head.weight = nn.Parameter(head, requires_grad=embed.requires_grad)
