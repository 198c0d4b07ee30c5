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

__all__ = ["BACKENDS", "BACKEND_ENV", "attention_backend", "reference", "triton_takes_head_dim"]

TRITON_MIN_HEAD_DIM = 16  # tl.dot needs every tile dimension >= 16
TRITON_MAX_PADDED_HEAD_DIM = 256  # the widest tile the kernels are sized, tuned and compile-checked for


def triton_takes_head_dim(head_dim: int) -> bool:
    """The Triton attention kernels' head dims: multiples of 16 from 16 to 256 (Phi-3-mini's 96,
    80, 112, 160, 192 as well as the powers of two), and the larger powers of two as before.
    A head dim that is not a power of two is tiled as the next one (BLOCK_D) with the rest of
    each row masked; a multiple of 16 keeps every head's row 16-element aligned, so the masked
    loads still vectorise (16 bytes at a time)."""
    if head_dim < TRITON_MIN_HEAD_DIM:
        return False
    if head_dim & (head_dim - 1) == 0:
        return True
    return head_dim % TRITON_MIN_HEAD_DIM == 0 and head_dim <= TRITON_MAX_PADDED_HEAD_DIM


def _triton_head_dims() -> str:
    return (f"multiples of {TRITON_MIN_HEAD_DIM} from {TRITON_MIN_HEAD_DIM} to {TRITON_MAX_PADDED_HEAD_DIM} "
            "and larger powers of two")


def attention_backend(device: torch.device, head_dim: int | None = None) -> ModuleType:
    """The kernels module to run on `device`: Triton on CUDA (the torch reference, with a
    warning, for a `head_dim` Triton does not take (`triton_takes_head_dim`: not a multiple of
    16, say 72, or wider than 256 and not a power of two), else the C kernels (the reference
    where they can't be built); the env var overrides, and then a failure is an error."""
    name = os.environ.get(BACKEND_ENV)
    if name == "triton" and head_dim is not None and not triton_takes_head_dim(head_dim):
        raise ValueError(f"{BACKEND_ENV}=triton: the Triton attention kernels take head dims that are "
                         f"{_triton_head_dims()}, and this model's is {head_dim}; choose reference")
    if not name:
        if torch.device(device).type == "cuda" and head_dim is not None and not triton_takes_head_dim(head_dim):
            logger.warning("head_dim %d: the Triton attention kernels take %s; running the torch reference "
                           "attention (no CUDA graphs)", head_dim, _triton_head_dims())
            return reference
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
