"""Test helpers for LoRA: random adapters saved as PEFT saves them, and transformers' greedy
tokens with an adapter applied as PEFT applies it (W x + s · B A x on each adapted
projection; peft itself is not a dependency)."""

from __future__ import annotations

import json
import math
import os
import re
from collections.abc import Sequence

import torch

MODULE_PARENT = {"q_proj": "self_attn", "k_proj": "self_attn", "v_proj": "self_attn", "o_proj": "self_attn",
                 "gate_proj": "mlp", "up_proj": "mlp", "down_proj": "mlp"}
FUSED_PARENT = {"qkv_proj": "self_attn", "gate_up_proj": "mlp"}  # Phi-3's modules


def _shapes(config: dict) -> dict[str, tuple[int, int]]:
    h, i = config["hidden_size"], config["intermediate_size"]
    heads = config["num_attention_heads"]
    kv_heads = config.get("num_key_value_heads") or heads
    d = config.get("head_dim") or h // heads
    return {"q_proj": (h, heads * d), "k_proj": (h, kv_heads * d), "v_proj": (h, kv_heads * d),
            "o_proj": (heads * d, h), "gate_proj": (h, i), "up_proj": (h, i), "down_proj": (i, h),
            "qkv_proj": (h, (heads + 2 * kv_heads) * d), "gate_up_proj": (h, 2 * i)}


def save_adapter(out_dir: str, base_dir: str, *, rank: int = 8, alpha: float = 16.0,
                 modules: Sequence[str] = tuple(MODULE_PARENT), layers: Sequence[int] | None = None, seed: int = 0,
                 scale: float = 0.5, use_rslora: bool = False, rank_pattern: dict[str, int] | None = None,
                 alpha_pattern: dict[str, float] | None = None, fmt: str = "safetensors",
                 extra_config: dict | None = None) -> str:
    """A random LoRA adapter for the checkpoint at base_dir, as PEFT's save_pretrained writes it.
    `scale`: the std of the random A and B (B is nonzero, unlike a fresh PEFT init, so the
    adapter changes the model's answers)."""
    with open(os.path.join(base_dir, "config.json")) as f:
        config = json.load(f)
    shapes = _shapes(config)
    layers = range(config["num_hidden_layers"]) if layers is None else layers
    generator = torch.Generator().manual_seed(seed)
    tensors = {}
    for layer in layers:
        for module in modules:
            name = f"model.layers.{layer}.{(MODULE_PARENT | FUSED_PARENT)[module]}.{module}"
            r = rank
            for pattern, value in (rank_pattern or {}).items():
                if re.match(rf"(^|.*\.){pattern}$", name):
                    r = value
                    break
            fan_in, fan_out = shapes[module]
            tensors[f"base_model.model.{name}.lora_A.weight"] = torch.randn(r, fan_in, generator=generator) * scale
            tensors[f"base_model.model.{name}.lora_B.weight"] = torch.randn(fan_out, r, generator=generator) * scale
    os.makedirs(out_dir, exist_ok=True)
    adapter_config = {
        "peft_type": "LORA", "task_type": "CAUSAL_LM", "base_model_name_or_path": base_dir, "r": rank,
        "lora_alpha": alpha, "target_modules": sorted(set(modules)), "lora_dropout": 0.0, "bias": "none",
        "use_rslora": use_rslora, "use_dora": False, "fan_in_fan_out": False, "modules_to_save": None,
        "rank_pattern": rank_pattern or {}, "alpha_pattern": alpha_pattern or {}, **(extra_config or {}),
    }
    with open(os.path.join(out_dir, "adapter_config.json"), "w") as f:
        json.dump(adapter_config, f)
    if fmt == "safetensors":
        from safetensors.torch import save_file

        save_file(tensors, os.path.join(out_dir, "adapter_model.safetensors"))
    else:
        torch.save(tensors, os.path.join(out_dir, "adapter_model.bin"))
    return out_dir


def apply_adapter(model: torch.nn.Module, adapter_dir: str) -> None:
    """Wrap each adapted nn.Linear of a transformers model: y = base(x) + s · B (A x), PEFT's
    forward (dropout 0), with PEFT's scaling (alpha_pattern, rsLoRA)."""
    from safetensors.torch import load_file

    with open(os.path.join(adapter_dir, "adapter_config.json")) as f:
        config = json.load(f)
    path = os.path.join(adapter_dir, "adapter_model.safetensors")
    tensors = load_file(path) if os.path.exists(path) else torch.load(
        os.path.join(adapter_dir, "adapter_model.bin"), weights_only=True)
    modules = dict(model.named_modules())
    for key, a in tensors.items():
        if ".lora_A." not in key:
            continue
        name = key.removeprefix("base_model.model.").removesuffix(".lora_A.weight")
        b = tensors[key.replace("lora_A", "lora_B")]
        r = a.shape[0]
        alpha = config["lora_alpha"]
        for pattern, value in (config.get("alpha_pattern") or {}).items():
            if re.match(rf"(^|.*\.){pattern}$", name):
                alpha = value
                break
        s = alpha / math.sqrt(r) if config.get("use_rslora") else alpha / r
        linear = modules[name]
        base = linear.forward

        def forward(x: torch.Tensor, base=base, a=a, b=b, s=s) -> torch.Tensor:
            return base(x) + s * torch.nn.functional.linear(torch.nn.functional.linear(x, a), b)

        linear.forward = forward


def hf_lora_greedy(base_dir: str, adapter_dir: str | None, prompts: list[list[int]],
                   max_new_tokens: int) -> list[list[int]]:
    """transformers' greedy tokens (fp32, EOS ignored) with the adapter applied (None: the base)."""
    import transformers

    from tests.conftest import greedy_tokens

    model = transformers.AutoModelForCausalLM.from_pretrained(base_dir, dtype=torch.float32).eval()
    if adapter_dir is not None:
        apply_adapter(model, adapter_dir)
    return greedy_tokens(model, prompts, max_new_tokens)
