"""Attention kernels, one contract: `reference` (torch, any device, the oracle), `cpu_ops` (the
CPU serving path: decode attention and the fused layer ops in C, prefill as unpadded SDPA) and
`triton_ops` (Triton, CUDA).

Backends are imported only when chosen: `TRITON_INTERPRET` must be set before Triton kernels
are first imported, and `cpu_ops` compiles its C library on import.
"""

import importlib
import logging
import os
from types import ModuleType

import torch

from kernels import reference

BACKEND_ENV = "STOKE_ATTENTION_BACKEND"
BACKENDS = {"reference": "kernels.reference", "cpu": "kernels.cpu_ops", "triton": "kernels.triton_ops"}

logger = logging.getLogger(__name__)

__all__ = ["BACKENDS", "BACKEND_ENV", "attention_backend", "reference"]


def attention_backend(device: torch.device) -> ModuleType:
    """The kernels module to run on `device`: Triton on CUDA, else the C kernels (the reference
    where they can't be built); the env var overrides, and then a failure is an error."""
    name = os.environ.get(BACKEND_ENV)
    if not name:
        if torch.device(device).type == "cuda":
            name = "triton"
        else:
            from kernels.native import NativeBuildError

            try:
                return importlib.import_module(BACKENDS["cpu"])
            except NativeBuildError as e:
                logger.warning("C attention kernels unavailable, using the torch reference: %s", e)
                return reference
    if name not in BACKENDS:
        raise ValueError(
            f"{BACKEND_ENV}={name!r} is not an attention backend; choose one of {sorted(BACKENDS)}"
        )
    if name == "triton" and torch.device(device).type != "cuda" and os.environ.get("TRITON_INTERPRET", "0") in ("", "0"):
        raise ValueError(f"{BACKEND_ENV}=triton off CUDA runs the kernels in Triton's interpreter: "
                         "set TRITON_INTERPRET=1 as well (before the process starts)")
    try:
        return importlib.import_module(BACKENDS[name])
    except (ModuleNotFoundError, RuntimeError) as e:
        raise RuntimeError(
            f"attention backend {name!r} ({BACKENDS[name]}) cannot be imported: {e}"
        ) from e
