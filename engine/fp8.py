"""FP8 weights (e4m3), as vLLM serves them: checkpoints saved in fp8, and `quantization="fp8"`
over a 16- or 32-bit checkpoint.

Every way in ends in one layout. A quantized projection (engine/models/llama.py's Linear) holds
its weight in float8_e4m3fn `[N, K]` and an fp32 scale per row and group of `group_size` input
columns, `[N, ceil(K / group_size)]` (kernels.reference.dequantize_fp8). Scales per row hold any
checkpoint's exactly, so each is read into it:
- HF's quant_method "fp8" (transformers' FineGrainedFP8: Qwen3-*-FP8, DeepSeek's layout):
  `weight_scale_inv` per `weight_block_size` block, or per tensor without one;
- compressed-tensors' float quantization (llm-compressor's *-FP8 and *-FP8-dynamic, RedHatAI's):
  `weight_scale` per tensor, channel, group or block;
- quantization="fp8" on a checkpoint of wider weights: each row quantized at load with its own
  scale (its largest magnitude over 448, e4m3's largest value), one group per row.
A fused projection (q/k/v, gate/up) takes each of its shards' rows and scales as they come:
with scales per row, quantizing the shards apart is quantizing the fused weight.

Activations are not quantized: the product runs at the model's dtype over the dequantized weight
(w8a16). The weights take half the memory of bf16's and half the bytes a decode step reads; the
tokens are those of transformers, which dequantizes such checkpoints to serve them on a CPU. A
checkpoint's activation scales (`input_scale`, `q_scale`) are read past. Its KV-cache scales
(`kv_scale_of`) scale an fp8 KV cache (kv_cache_dtype="fp8"); a cache at the model's dtype
leaves them unread. What is quantized follows the config, as vLLM's:
every projection but those its `modules_to_not_convert` / `ignore` name, the LM head only where
compressed-tensors' config leaves it in (never under HF's fp8, as transformers); a checkpoint
that disagrees with its config is refused at load, tensor by tensor.
"""

from __future__ import annotations

import re
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

import torch

FP8 = torch.float8_e4m3fn
FP8_MAX = float(torch.finfo(FP8).max)  # 448
QUANTIZATIONS = ("fp8", "compressed-tensors")
# A quantized checkpoint's per-tensor activation and KV-cache scales: no parameter's. Activations
# are computed at the model's dtype; KV scales go to their layer's attention (kv_scale_of).
UNUSED_SCALES = ("input_scale", "output_scale", "q_scale", "k_scale", "v_scale", "kv_scale")
# Where checkpoints keep a layer's KV-cache scales, as vLLM reads them: llm-compressor's
# self_attn.k_scale / v_scale, vLLM's own attn.k_scale, one kv_scale for both, and AutoFP8's
# k_proj / v_proj output_scale.
_KV_SCALE = re.compile(r"(?:.*\.)?layers\.(\d+)\.self_attn\.(?:attn\.)?(?:(k|v|kv)_scale|(k|v)_proj\.output_scale)")
WEIGHT_SCALES = ("weight_scale", "weight_scale_inv")  # a projection's, as the formats name them
_CT_STRATEGIES = ("tensor", "channel", "group", "block")


@dataclass(frozen=True, slots=True)
class Fp8Scheme:
    """How the projections' fp8 weights are stored: what the checkpoint's quantization_config
    says, or "online" (quantization="fp8" over wider weights, quantized at load)."""

    method: str  # "fp8" (HF's), "compressed-tensors" or "online"
    group_size: int | None = None  # input columns per scale; None: a whole row
    block_rows: int | None = None  # the rows one checkpoint scale covers (a block's); None: one row, or all
    skip: tuple[str, ...] = ()  # modules left unquantized, as the format reads them (`_skips`)
    head: bool = False  # whether the LM head may be quantized (compressed-tensors': unless ignored)

    @property
    def online(self) -> bool:
        return self.method == "online"

    @property
    def scale_suffix(self) -> str:
        """The checkpoint's name for a projection's scales."""
        return "weight_scale_inv" if self.method == "fp8" else "weight_scale"

    def group(self, in_features: int) -> int:
        return self.group_size or in_features

    def quantizes(self, names: Sequence[str]) -> bool:
        """Whether a projection is held in fp8, given its names: stoke's first (model.layers.0.
        self_attn.q_proj, lm_head), then the others the checkpoint may use for it (Mixtral's
        block_sparse_moe, a multimodal model's language_model), which its config may name."""
        if names[0] == "lm_head" and not self.head:
            return False
        return not any(self._skips(pattern, name) for pattern in self.skip for name in names)

    def quantizes_all(self, modules: Sequence[Sequence[str]]) -> bool:
        """Whether the projection fusing these checkpoint modules (each given by its names) is
        held in fp8: all of them or none, else ValueError (one weight is held one way)."""
        held = {self.quantizes(names) for names in modules}
        if len(held) > 1:
            listed = [names[-1] for names in modules]
            raise ValueError(f"the quantization config leaves some of {', '.join(listed[:6])}"
                             f"{' …' if len(listed) > 6 else ''} unquantized and not the others: stoke holds them "
                             "in one weight, one way")
        return held.pop()

    def _skips(self, pattern: str, module: str) -> bool:
        """Whether an ignore entry names `module`, as the format's own code reads it:
        compressed-tensors (and vLLM) a name whole, or after "re:" a regex matched from the
        start; transformers (HF's fp8) a regex or name matched from the start to a module
        boundary (a parent's name too), or the name's end."""
        if self.method == "compressed-tensors":
            if pattern.startswith("re:"):
                return re.match(pattern[3:], module) is not None
            return module == pattern
        return re.match(rf"(?:{pattern})(?:(?<=\.)|(?=\.|$))", module) is not None or module.endswith(pattern)


def read_scheme(raw: dict[str, Any]) -> Fp8Scheme | None:
    """The fp8 scheme a config.json's `quantization_config` describes, None without one;
    ValueError for a quantization stoke does not serve, naming it."""
    quant = raw.get("quantization_config") or raw.get("compression_config")
    if not quant:
        return None
    method = quant.get("quant_method")
    if method == "fp8":
        return _hf_fp8(quant)
    if method == "compressed-tensors":
        return _compressed_tensors(quant)
    raise ValueError(f"quantization_config's quant_method {method!r} is not supported: stoke serves fp8 checkpoints "
                     "(quant_method fp8, or compressed-tensors' float8) and quantizes others with quantization='fp8'")


def _hf_fp8(quant: dict[str, Any]) -> Fp8Scheme:
    if quant.get("fmt", "e4m3") != "e4m3":
        raise ValueError(f"fp8 format {quant['fmt']!r} is not supported: stoke reads e4m3 weights")
    block = quant.get("weight_block_size")
    if block is not None and not (isinstance(block, list | tuple) and len(block) == 2
                                  and all(isinstance(b, int) and b > 0 for b in block)):
        raise ValueError(f"weight_block_size must be two positive integers, got {block!r:.60}")
    skip = tuple(quant.get("modules_to_not_convert") or ())
    return Fp8Scheme("fp8", group_size=block[1] if block else None, block_rows=block[0] if block else None,
                     skip=skip)


def _compressed_tensors(quant: dict[str, Any]) -> Fp8Scheme:
    groups = list((quant.get("config_groups") or {}).values())
    if not groups:
        raise ValueError("compressed-tensors quantization_config has no config_groups")
    schemes = set()
    for group in groups:
        weights = group.get("weights") or {}
        if (weights.get("type"), weights.get("num_bits")) != ("float", 8):
            raise ValueError(f"compressed-tensors weights of type {weights.get('type')!r} with "
                             f"{weights.get('num_bits')!r} bits are not supported: stoke serves float8 (FP8) weights")
        if not weights.get("symmetric", True) or weights.get("dynamic"):
            raise ValueError("compressed-tensors fp8 weights must be symmetric and static (saved with their scales)")
        strategy = weights.get("strategy")
        if strategy not in _CT_STRATEGIES:
            raise ValueError(f"compressed-tensors weight strategy {strategy!r} is not supported; stoke reads "
                             f"{', '.join(_CT_STRATEGIES)}")
        if strategy == "group":
            schemes.add((weights.get("group_size"), 1))
        elif strategy == "block":
            rows, cols = weights.get("block_structure") or (None, None)
            schemes.add((cols, rows))
        else:  # a tensor's one scale is read as every row's
            schemes.add((None, None))
        targets = set(group.get("targets") or ())
        if not targets <= {"Linear"}:
            raise ValueError(f"compressed-tensors targets {sorted(targets)} are not supported: stoke quantizes "
                             "whole Linear layers ('targets': ['Linear'])")
    if len(schemes) > 1:
        raise ValueError("compressed-tensors config_groups with different weight strategies are not supported")
    group_size, block_rows = schemes.pop()
    if group_size is not None and not (isinstance(group_size, int) and group_size > 0):
        raise ValueError(f"compressed-tensors group size must be a positive integer, got {group_size!r:.40}")
    ignore = tuple(quant.get("ignore") or ())
    # Its targets hold every Linear, the LM head too, unless `ignore` names it.
    return Fp8Scheme("compressed-tensors", group_size=group_size, block_rows=block_rows, skip=ignore, head=True)


def resolve_scheme(checkpoint: Fp8Scheme | None, requested: str | None) -> Fp8Scheme | None:
    """The scheme to serve with: the checkpoint's, or with quantization="fp8" over wider
    weights the online one; ValueError where the option and the checkpoint disagree."""
    if requested is None:
        return checkpoint
    if checkpoint is None:
        if requested != "fp8":
            raise ValueError(f"quantization={requested!r}: the checkpoint has no such quantization_config")
        return Fp8Scheme("online")
    if requested != checkpoint.method:
        raise ValueError(f"quantization={requested!r}, and the checkpoint is quantized as {checkpoint.method!r}")
    return checkpoint


def quantize(weight: torch.Tensor, group_size: int) -> tuple[torch.Tensor, torch.Tensor]:
    """`weight [..., N, K]` in fp8 e4m3 with a scale per row and group of `group_size` columns
    (the last group may be narrower), each scale the group's largest magnitude over 448 (an
    all-zero group's 1): (fp8 [..., N, K], fp32 scales [..., N, ceil(K / group_size)])."""
    k = weight.shape[-1]
    groups = -(-k // group_size)
    values = weight.float()
    padded = torch.nn.functional.pad(values, (0, groups * group_size - k)) if groups * group_size != k else values
    amax = padded.unflatten(-1, (groups, group_size)).abs().amax(-1)
    scale = torch.where(amax > 0, amax / FP8_MAX, torch.ones_like(amax))
    quantized = (values / scale.repeat_interleave(group_size, dim=-1)[..., :k]).clamp(-FP8_MAX, FP8_MAX).to(FP8)
    return quantized, scale


def scales_per_row(tensor: torch.Tensor, rows: int, groups: int, block_rows: int | None, name: str) -> torch.Tensor:
    """A checkpoint's scales for a projection of `rows` rows, as one per row and group `[rows,
    groups]`: a tensor's one scale for every row, a block's for each of its rows."""
    scale = tensor.float()
    if scale.numel() == 1:
        return scale.reshape(1, 1).expand(rows, groups)
    scale = scale.reshape(-1, groups) if scale.dim() < 2 else scale
    if block_rows is not None and block_rows > 1:
        if scale.shape[0] != -(-rows // block_rows):
            raise ValueError(f"checkpoint tensor {name!r} has {scale.shape[0]} rows of block scales, and {rows} rows "
                             f"in blocks of {block_rows} need {-(-rows // block_rows)}")
        scale = scale.repeat_interleave(block_rows, dim=0)[:rows]
    if tuple(scale.shape) != (rows, groups):
        raise ValueError(f"checkpoint tensor {name!r} has shape {tuple(tensor.shape)}: scales for {rows} rows in "
                         f"{groups} groups were expected")
    return scale


def kv_scale_of(name: str, tensor: torch.Tensor) -> tuple[int, str, float] | None:
    """(layer, "k" | "v" | "kv", scale) where checkpoint tensor `name` is a layer's KV-cache
    scale, else None. A scale per tensor only: an fp8 KV cache has one per layer for K and V."""
    match = _KV_SCALE.fullmatch(name)
    if match is None:
        return None
    if tensor.numel() != 1:
        raise ValueError(f"checkpoint tensor {name!r} holds {tensor.numel()} KV-cache scales: stoke scales an "
                         "fp8 KV cache per tensor (one scale per layer for K, one for V)")
    scale = float(tensor.float())
    if not 0.0 < scale < float("inf"):
        raise ValueError(f"checkpoint tensor {name!r} is a KV-cache scale of {scale}: it must be positive and finite")
    return int(match.group(1)), match.group(2) or match.group(3), scale
