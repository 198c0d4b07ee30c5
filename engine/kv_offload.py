"""The bytes of the prefix cache's host tier (its bookkeeping: scheduler/host_kv_cache.py): KV
blocks saved from the device pool into host memory and loaded back.

A host block is one device block of every KV tensor, contiguous: [2 · tensors, block_size,
kv_heads, head_dim], keys then values of each tensor (a hybrid model's pool has one pair per
layer of a group). On CUDA the host memory is pinned and every copy is asynchronous, in stream
order: a save reads its block after the steps before it wrote it, a load lands before the step
that reads it, and the host never waits. Blocks move through a device staging buffer, a chunk
at a time: one gather (or scatter) per KV tensor, then one copy per run of consecutive host
blocks, so a transfer costs a few launches per chunk rather than a copy per block and layer.
"""

from __future__ import annotations

from collections.abc import Iterator, Sequence

import torch

from scheduler.host_kv_cache import KVTransfer

TRANSFER_CHUNK_BLOCKS = 32  # the staging buffer's blocks


class HostKVTier:
    def __init__(self, num_blocks: int, kv_tensors: Sequence[tuple[torch.Tensor, torch.Tensor]]) -> None:
        """`kv_tensors`: the pool's distinct (keys, values) pairs, whose blocks move together."""
        self.kv_tensors = list(kv_tensors)
        k = self.kv_tensors[0][0]
        block_shape = (2 * len(self.kv_tensors), *k.shape[1:])
        self.device = k.device
        self.host = torch.empty((num_blocks, *block_shape), dtype=k.dtype, pin_memory=k.is_cuda)
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
        index = torch.tensor(blocks, dtype=torch.long).to(self.device, non_blocking=True)
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
        index = torch.tensor(blocks, dtype=torch.long).to(self.device, non_blocking=True)
        for i, (k, v) in enumerate(self.kv_tensors):
            k.index_copy_(0, index, staged[:, 2 * i])
            v.index_copy_(0, index, staged[:, 2 * i + 1])


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
