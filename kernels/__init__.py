"""Attention kernels: `reference` (torch, any device) and `triton_ops` (Triton), one contract.

`triton_ops` is imported only when chosen: `TRITON_INTERPRET` must be set before Triton
kernels are first imported, so importing this package must never import them.
"""

import importlib
import os
from types import ModuleType

import torch

from kernels import reference

BACKEND_ENV = "STOKE_ATTENTION_BACKEND"
BACKENDS = {"reference": "kernels.reference", "triton": "kernels.triton_ops"}

__all__ = ["BACKENDS", "BACKEND_ENV", "attention_backend", "reference"]


def attention_backend(device: torch.device) -> ModuleType:
    """The kernels module to run on `device`: Triton on CUDA, else reference; env overrides."""
    default = "triton" if torch.device(device).type == "cuda" else "reference"
    name = os.environ.get(BACKEND_ENV) or default
    if name not in BACKENDS:
        raise ValueError(
            f"{BACKEND_ENV}={name!r} is not an attention backend; choose one of {sorted(BACKENDS)}"
        )
    try:
        return importlib.import_module(BACKENDS[name])
    except ModuleNotFoundError as e:
        raise RuntimeError(
            f"attention backend {name!r} ({BACKENDS[name]}) cannot be imported: {e}"
        ) from e
