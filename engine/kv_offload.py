"""The bytes of the prefix cache's host tier (its bookkeeping: scheduler/host_kv_cache.py): KV
blocks saved from the device pool into host memory and loaded back.

A host block is one device block of every KV tensor, contiguous: [2 · tensors, block_size,
kv_heads, head_dim], keys then values of each tensor (a hybrid model's pool has one pair per
layer of a group). On CUDA the host memory is pinned (registered with CUDA as allocated, not
through torch's caching host allocator, which rounds a request up to a power of two: 40 GiB
would pin 64) and every copy is asynchronous on the compute stream, in its order: a save reads
its block after the steps before it wrote it, a load lands before the step that reads it, and
the host never waits; the device does, as the copies run before the step's forward. Blocks move
through a device staging buffer, a chunk at a time: one gather (or scatter) per KV tensor, then
one copy per run of consecutive host blocks, so a transfer costs a few launches per chunk
rather than a copy per block and layer. The one stream is what keeps the staging buffer safe to
reuse chunk after chunk: copies moved to a side stream would need events.
"""

from __future__ import annotations

import logging
import weakref
from collections.abc import Iterator, Sequence

import torch

from engine.transfer import to_device
from kernels.reference import indexable_kv
from scheduler.host_kv_cache import KVTransfer

logger = logging.getLogger(__name__)

TRANSFER_CHUNK_BLOCKS = 32  # the staging buffer's blocks


class HostKVTier:
    def __init__(self, num_blocks: int, kv_tensors: Sequence[tuple[torch.Tensor, torch.Tensor]]) -> None:
        """`kv_tensors`: the pool's distinct (keys, values) pairs, whose blocks move together."""
        self.kv_tensors = [(indexable_kv(k), indexable_kv(v)) for k, v in kv_tensors]
        k = self.kv_tensors[0][0]
        block_shape = (2 * len(self.kv_tensors), *k.shape[1:])
        self.device = k.device
        self.host = torch.empty((num_blocks, *block_shape), dtype=k.dtype)
        self.pinned = k.is_cuda and _pin(self.host, self)
        self.staging = torch.empty((min(TRANSFER_CHUNK_BLOCKS, num_blocks), *block_shape), dtype=k.dtype,
                                   device=self.device)

    @staticmethod
    def staging_bytes(num_blocks: int, block_bytes: int) -> int:
        return min(TRANSFER_CHUNK_BLOCKS, num_blocks) * block_bytes

    def run(self, transfers: Sequence[KVTransfer]) -> None:
        """The transfers, in their order."""
        for kind, sources, targets in _runs(transfers, len(self.staging)):
            if kind == "save":
                self._save(sources, targets)
            else:
                self._load(sources, targets)

    def _save(self, blocks: list[int], slots: list[int]) -> None:
        n = len(blocks)
        index = to_device([torch.tensor(blocks)], self.device)[0]
        staged = self.staging[:n]
        for i, (k, v) in enumerate(self.kv_tensors):
            staged[:, 2 * i] = k[index]
            staged[:, 2 * i + 1] = v[index]
        for first, slot, count in _consecutive(slots):
            self.host[slot:slot + count].copy_(staged[first:first + count], non_blocking=True)

    def _load(self, slots: list[int], blocks: list[int]) -> None:
        n = len(blocks)
        staged = self.staging[:n]
        for first, slot, count in _consecutive(slots):
            staged[first:first + count].copy_(self.host[slot:slot + count], non_blocking=True)
        index = to_device([torch.tensor(blocks)], self.device)[0]
        for i, (k, v) in enumerate(self.kv_tensors):
            k.index_copy_(0, index, staged[:, 2 * i])
            v.index_copy_(0, index, staged[:, 2 * i + 1])


def _pin(host: torch.Tensor, owner: object) -> bool:
    """Register `host` with CUDA (page-locked, for asynchronous copies) until `owner` is gone;
    False, with a warning, where CUDA refuses (the copies then wait for the host)."""
    cudart = torch.cuda.cudart()
    pointer = host.data_ptr()
    error = int(cudart.cudaHostRegister(pointer, host.numel() * host.element_size(), 0))
    if error:
        logger.warning("could not pin the %.1f GiB host KV tier (CUDA error %d): its copies will be synchronous",
                       host.numel() * host.element_size() / 2**30, error)
        return False
    weakref.finalize(owner, cudart.cudaHostUnregister, pointer)
    return True


def _runs(transfers: Sequence[KVTransfer], chunk: int) -> Iterator[tuple[str, list[int], list[int]]]:
    """(kind, sources, targets) of consecutive transfers of one kind, at most `chunk` of them; a
    load into a block an earlier load of the run fills starts a new run (its scatter would
    race). Two saves into one host block stay in a run: its copies run in order."""
    kind, sources, targets = "", [], []
    for t in transfers:
        if t.kind != kind or len(targets) == chunk or t.kind == "load" and t.target in targets:
            if targets:
                yield kind, sources, targets
            kind, sources, targets = t.kind, [], []
        sources.append(t.source)
        targets.append(t.target)
    if targets:
        yield kind, sources, targets


def _consecutive(slots: list[int]) -> Iterator[tuple[int, int, int]]:
    """(first index, first slot, count) of each run of consecutive slots, in order."""
    first = 0
    for i in range(1, len(slots) + 1):
        if i == len(slots) or slots[i] != slots[i - 1] + 1:
            yield first, slots[first], i - first
            first = i
