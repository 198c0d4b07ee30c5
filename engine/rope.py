"""Rotary position embedding's frequencies, read from config.json as transformers 5 reads them
and computed as its ROPE_INIT_FUNCTIONS do: default, linear, llama3, dynamic (NTK), yarn and
longrope (Phi-3.5, Phi-4-mini; "su" is its older name), over all of each head or its leading
`rotary_dim` dims (partial rotary).

Two of them change with the length of the sequence in transformers: longrope takes its long
factors once a sequence passes the pretraining length (and re-encodes the cache when a sequence
crosses it), dynamic NTK grows its base past `max_position_embeddings`. A paged cache keeps
every key as it was rotated, so stoke fixes the choice once, by the longest sequence it serves
(vLLM's rule): the long factors when max_model_len passes the pretraining length, dynamic's
base for a sequence of max_model_len. A sequence gets transformers' numbers where transformers
makes the same choice for it: under longrope, every sequence when served within the
pretraining length, else those longer than it; under dynamic NTK, every sequence when served
within max_position_embeddings, else one of max_model_len tokens."""

from __future__ import annotations

import math
from typing import Any

import torch

# The kinds `inv_freq` computes (rope_type; "default": no scaling).
ROPE_TYPES = ("default", "linear", "llama3", "dynamic", "yarn", "longrope")


def read_rope(raw: dict[str, Any], params: dict[str, Any], max_positions: int, rotary_dim: int,
              default_theta: float = 10000.0, phi3: bool = False) -> tuple[float, dict[str, Any] | None]:
    """(rope_theta, scaling or None) from `params` (`rope_scaling` in older configs, else
    `rope_parameters`, whose own rope_theta wins over a top-level one). The scaling dict holds
    every value `inv_freq` needs, defaults filled as transformers fills them; a kind stoke does
    not compute, or a malformed one, is a ValueError before any weight is allocated."""
    rope = dict(params)
    rope_theta = float(rope.pop("rope_theta", None) or raw.get("rope_theta") or default_theta)
    rope.pop("partial_rotary_factor", None)  # ModelConfig.rotary_dim
    kind = rope.get("rope_type", rope.get("type", "default"))
    if phi3 and kind in ("su", "yarn"):  # Phi3Config's older names for LongRoPE
        kind = "longrope"
    kind = "longrope" if kind == "su" else kind
    if kind not in ROPE_TYPES:
        raise ValueError(f"rope scaling {kind!r} is not supported ({', '.join(ROPE_TYPES)} are)")
    if phi3 and kind not in ("default", "longrope"):  # as Phi3Config.validate_rope
        raise ValueError(f"rope scaling {kind!r} is not supported for Phi-3 (default and longrope are)")
    if kind == "default":
        return rope_theta, None
    scaling: dict[str, Any] = {**rope, "rope_type": kind}
    scaling.pop("type", None)
    if kind in ("llama3", "yarn", "longrope"):
        # The pretraining length: a top-level value wins (Phi3's layout), then the dict's, then
        # the context length.
        original = raw.get("original_max_position_embeddings") if "original_max_position_embeddings" in raw \
            else scaling.get("original_max_position_embeddings")
        scaling["original_max_position_embeddings"] = int(original or max_positions)
    original = scaling.get("original_max_position_embeddings", max_positions)
    if kind == "longrope":
        for name in ("short_factor", "long_factor"):
            factors = scaling.get(name)
            if not (isinstance(factors, list) and len(factors) == rotary_dim // 2
                    and all(isinstance(f, (int, float)) and f > 0 for f in factors)):
                raise ValueError(f"longrope's {name} must be {rotary_dim // 2} positive numbers (one per rotated "
                                 f"pair of the {rotary_dim} rotary dims), got {factors!r:.120}")
        if scaling.get("factor") is None:  # Phi-3's: the context length over the pretraining one
            scaling["factor"] = max_positions / original
        if scaling.get("attention_factor") is None:
            factor = scaling["factor"]
            scaling["attention_factor"] = 1.0 if factor <= 1.0 else \
                math.sqrt(1 + math.log(factor) / math.log(original))
    elif kind == "yarn":
        if scaling.get("factor") is None:
            scaling["factor"] = max_positions / original
        factor = float(scaling["factor"])
        if scaling.get("attention_factor") is None:
            mscale, mscale_all_dim = scaling.get("mscale"), scaling.get("mscale_all_dim")
            scaling["attention_factor"] = _yarn_mscale(factor, mscale) / _yarn_mscale(factor, mscale_all_dim) \
                if mscale and mscale_all_dim else _yarn_mscale(factor)
        scaling["beta_fast"] = scaling.get("beta_fast") or 32
        scaling["beta_slow"] = scaling.get("beta_slow") or 1
        scaling["truncate"] = bool(scaling.get("truncate", True))
    if kind in ("linear", "dynamic", "yarn", "llama3"):
        factor = scaling.get("factor")
        if not isinstance(factor, (int, float)) or isinstance(factor, bool) or factor <= 0:
            raise ValueError(f"rope scaling {kind!r} needs a positive factor, got {factor!r}")
    if kind == "llama3":
        for name in ("low_freq_factor", "high_freq_factor"):
            if not isinstance(scaling.get(name), (int, float)):
                raise ValueError(f"rope scaling 'llama3' needs {name}")
    if kind == "dynamic":  # its original length is the context length (transformers' dynamic NTK)
        scaling["original_max_position_embeddings"] = max_positions
    return rope_theta, scaling


def _yarn_mscale(scale: float, mscale: float = 1.0) -> float:
    return 1.0 if scale <= 1 else 0.1 * mscale * math.log(scale) + 1.0


def rope_max_len(scaling: dict[str, Any] | None, max_positions: int) -> int:
    """The longest sequence the rope serves. Dynamic NTK stretches the positions by its factor
    (past them is what it is for) and yarn its pretraining length by its factor (Qwen3's 32k ×
    4, beyond the 40k its config names), as vLLM derives max_model_len; linear, llama3 and
    longrope configs already name the stretched length (Gemma 3's 128k with linear × 8),
    where vLLM would stretch a linear one again."""
    if scaling is None or scaling["rope_type"] not in ("dynamic", "yarn"):
        return max_positions
    return max(max_positions, int(scaling["original_max_position_embeddings"] * scaling["factor"]))


def inv_freq(rotary_dim: int, theta: float, scaling: dict[str, Any] | None,
             max_model_len: int) -> tuple[torch.Tensor, float]:
    """(inverse frequencies [rotary_dim / 2] in fp32, the factor cos and sin are scaled by) for
    a model serving sequences up to `max_model_len`."""
    d = rotary_dim
    exponents = torch.arange(0, d, 2, dtype=torch.int64).float() / d
    if scaling is None:
        return 1.0 / (theta ** exponents), 1.0
    kind = scaling["rope_type"]
    if kind == "linear":
        return 1.0 / (theta ** exponents) / scaling["factor"], 1.0
    if kind == "llama3":
        base = 1.0 / (theta ** exponents)
        factor = scaling["factor"]
        low, high = scaling["low_freq_factor"], scaling["high_freq_factor"]
        old_len = scaling["original_max_position_embeddings"]
        wavelen = 2 * math.pi / base
        scaled = torch.where(wavelen > old_len / low, base / factor, base)
        smooth = (old_len / wavelen - low) / (high - low)
        smoothed = (1 - smooth) * scaled / factor + smooth * scaled
        medium = (wavelen >= old_len / high) & (wavelen <= old_len / low)
        return torch.where(medium, smoothed, scaled), 1.0
    if kind == "dynamic":
        factor, original = scaling["factor"], scaling["original_max_position_embeddings"]
        seq_len = max(max_model_len, original)
        base = theta * ((factor * seq_len / original) - (factor - 1)) ** (d / (d - 2))
        return 1.0 / (base ** exponents), 1.0
    if kind == "yarn":
        return _yarn_inv_freq(d, theta, scaling), float(scaling["attention_factor"])
    if kind == "longrope":
        long = max_model_len > scaling["original_max_position_embeddings"]
        factors = torch.tensor(scaling["long_factor" if long else "short_factor"], dtype=torch.float32)
        return 1.0 / (factors * theta ** exponents), float(scaling["attention_factor"])
    raise ValueError(f"rope scaling {kind!r} is not supported")  # read_rope refuses it first


def _yarn_inv_freq(d: int, theta: float, scaling: dict[str, Any]) -> torch.Tensor:
    """YaRN (arXiv 2309.00071): the fast-rotating pairs extrapolated (as trained), the slow
    ones interpolated by the factor, a linear ramp between the pairs that turn beta_fast and
    beta_slow times over the pretraining length."""
    factor, original = scaling["factor"], scaling["original_max_position_embeddings"]

    def pair_turning(turns: float) -> float:  # the pair that turns `turns` times over `original`
        return d * math.log(original / (turns * 2 * math.pi)) / (2 * math.log(theta))

    low, high = pair_turning(scaling["beta_fast"]), pair_turning(scaling["beta_slow"])
    if scaling["truncate"]:
        low, high = math.floor(low), math.ceil(high)
    low, high = max(low, 0), min(high, d - 1)
    if low == high:
        high += 0.001  # no zero-width ramp
    pos_freqs = theta ** (torch.arange(0, d, 2).float() / d)
    extrapolated, interpolated = 1.0 / pos_freqs, 1.0 / (factor * pos_freqs)
    keep = 1 - torch.clamp((torch.arange(d // 2, dtype=torch.float32) - low) / (high - low), 0, 1)
    return interpolated * (1 - keep) + extrapolated * keep
