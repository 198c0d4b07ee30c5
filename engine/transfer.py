"""Host → device in one copy: a step's small index and parameter tensors, packed.

A step needs a handful of small tensors on the device (input ids, positions, slot mapping,
block tables, ...; the sampler's per-row parameters and index lists). Each `torch.tensor(...,
device="cuda")` is its own host-to-device copy with its own latency, so on CUDA they are
packed into one pinned byte buffer, copied once (asynchronously), and handed out as typed views
of the device buffer. On the CPU nothing is copied: the host tensors are returned as they are.

Device → host without waiting (`HostCopy`): a step's results (sampled ids, logprobs) start
back into pinned memory while the host goes on launching the next step, and are read once
they have landed.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Generic, TypeVar

import torch

T = TypeVar("T")

_ALIGN = 16  # every segment starts 16-byte aligned, so any dtype can view it


def to_device(tensors: list[torch.Tensor], device: torch.device, *, pack: bool | None = None) -> list[torch.Tensor]:
    """The CPU tensors `tensors` on `device`, same dtypes, shapes and values.

    pack=None packs only for CUDA; pack=True forces the packed path (tests run it on the CPU)."""
    device = torch.device(device)
    if not tensors:
        return []
    if pack is None:
        pack = device.type == "cuda"
    if not pack:
        return [t.to(device) for t in tensors]
    offsets, total = [], 0
    for t in tensors:
        offsets.append(total)
        total += -(-t.numel() * t.element_size() // _ALIGN) * _ALIGN
    pin = device.type == "cuda"
    buf = torch.empty(max(total, _ALIGN), dtype=torch.uint8, pin_memory=pin)
    for t, off in zip(tensors, offsets):
        n = t.numel() * t.element_size()
        if n:
            buf[off : off + n].copy_(t.contiguous().reshape(-1).view(torch.uint8))
    # Pinned memory → the copy is asynchronous; the caching host allocator keeps `buf` alive
    # (not reused) until the copy has run.
    dev = buf.to(device, non_blocking=pin) if device.type != "cpu" else buf
    out = []
    for t, off in zip(tensors, offsets):
        n = t.numel() * t.element_size()
        out.append(dev[off : off + n].view(t.dtype).view(t.shape))
    return out


class HostCopy(Generic[T]):
    """A device tensor on its way back to the host, the other direction: on CUDA an
    asynchronous copy into pinned memory and an event that says when it has landed, so the
    caller can go on launching work; `result()` waits for it and unpacks."""

    def __init__(self, packed: torch.Tensor, unpack: Callable[[torch.Tensor], T]) -> None:
        self._unpack = unpack
        self._ready: torch.cuda.Event | None = None
        if packed.device.type == "cuda":
            self._host = torch.empty(packed.shape, dtype=packed.dtype, pin_memory=True)
            self._host.copy_(packed, non_blocking=True)
            self._ready = torch.cuda.Event()
            self._ready.record()
        else:
            self._host = packed.cpu()

    def result(self) -> T:
        if self._ready is not None:
            self._ready.synchronize()
        return self._unpack(self._host)
