"""Checkpoint discovery and weight loading: HF safetensors (single or sharded) or dummy."""

from __future__ import annotations

import json
import os
from collections.abc import Iterator

import torch
from safetensors import safe_open
from torch import nn

from engine.fp8 import FP8, quantize


def safetensors_files(path: str) -> list[str]:
    """The checkpoint's shard files, from model.safetensors.index.json or a lone file."""
    index = os.path.join(path, "model.safetensors.index.json")
    if os.path.exists(index):
        with open(index) as f:
            shards = sorted(set(json.load(f)["weight_map"].values()))
        return [os.path.join(path, s) for s in shards]
    files = sorted(f for f in os.listdir(path) if f.endswith(".safetensors"))
    if not files:
        raise FileNotFoundError(f"no *.safetensors in {path}; use load_format='dummy' for random weights")
    return [os.path.join(path, f) for f in files]


def iterate_safetensors(path: str) -> Iterator[tuple[str, torch.Tensor]]:
    for file in safetensors_files(path):
        with safe_open(file, framework="pt") as f:
            for name in f.keys():
                yield name, f.get_tensor(name)


def init_dummy_weights(model: nn.Module, seed: int = 0, std: float = 0.02) -> None:
    """Random weights from the config alone, for benchmarks where no checkpoint is at hand.
    Drawn where the parameters live (a GPU draws billions in milliseconds); the CPU and a GPU
    give different, each deterministic, weights for one seed."""
    device = next(model.parameters()).device
    generator = torch.Generator(device=device).manual_seed(seed)
    with torch.no_grad():
        for name, param in model.named_parameters():
            if name.endswith("norm.weight"):
                param.fill_(1.0)
            elif name.endswith("_scale"):
                continue  # an fp8 weight's: set with it
            else:
                values = torch.randn(param.shape, generator=generator, device=device) * std
                if param.dtype == FP8:  # quantized as quantization="fp8" quantizes a checkpoint's
                    values, scale = quantize(values, model.fp8_group_size(name))
                    model.get_parameter(f"{name}_scale").copy_(scale)
                param.copy_(values.to(param.dtype))
