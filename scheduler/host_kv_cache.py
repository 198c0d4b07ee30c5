"""The prefix cache's second tier: KV blocks kept in host memory (vLLM's `--kv-offloading-size`,
SGLang's HiCache), bookkeeping only; the engine moves the bytes (`KVTransfer`).

A cached device block about to be evicted is saved here first (unless its prefix is here
already), so a prefix the device pool could not keep is loaded back into fresh device blocks
instead of computed again: later turns of long chats, agents' long shared contexts, and a
preempted request's prompt. A host block keeps the device block's prefix-cache identity (its
layer group, hash, serial, the parent's serial, its tokens), so a hit is verified exactly as on
the device. Host blocks are evicted least-recently-used; those a pending load reads are pinned
until the transfers are taken, so a later save in the same step cannot overwrite them.
"""

from __future__ import annotations

from collections import OrderedDict
from dataclasses import dataclass
from typing import Literal


@dataclass(slots=True, frozen=True)
class KVTransfer:
    """Copy one block's KV (every KV tensor's) between the device pool and host memory:
    "save" device block `source` into host block `target`, "load" host `source` into device
    `target`. Transfers run in their order, before the step's forward and a fork's copies."""

    kind: Literal["save", "load"]
    source: int
    target: int


@dataclass(slots=True)
class HostBlock:
    slot: int
    group: int
    hash: int
    serial: int
    parent_serial: int | None
    token_ids: tuple[int, ...]


class HostKVCache:
    def __init__(self, num_blocks: int) -> None:
        if num_blocks < 1:
            raise ValueError(f"a host KV cache needs at least one block, got {num_blocks}")
        self.num_blocks = num_blocks
        self.free: list[int] = list(range(num_blocks - 1, -1, -1))
        self.blocks: OrderedDict[int, HostBlock] = OrderedDict()  # slot → block, least recently used first
        self.by_hash: dict[tuple[int, int], dict[int, None]] = {}  # (group, hash) → slots
        self.by_serial: dict[tuple[int, int], int] = {}  # (group, serial) → slot
        self.pinned: set[int] = set()

    @property
    def usage(self) -> float:
        return len(self.blocks) / self.num_blocks

    def holds(self, group: int, serial: int) -> bool:
        return (group, serial) in self.by_serial

    def lookup(self, group: int, block_hash: int, parent: int | None, token_ids: tuple[int, ...]) -> HostBlock | None:
        for slot in self.by_hash.get((group, block_hash), ()):
            block = self.blocks[slot]
            if block.parent_serial == parent and block.token_ids == token_ids:
                return block
        return None

    def store(self, group: int, block_hash: int, serial: int, parent: int | None,
              token_ids: tuple[int, ...]) -> int | None:
        """A slot to save this block into (the least recently used unpinned one if none is free),
        registered; None when every block is pinned."""
        assert not self.holds(group, serial), "a prefix is saved once"
        if self.free:
            slot = self.free.pop()
        else:
            slot = next((s for s in self.blocks if s not in self.pinned), None)
            if slot is None:
                return None
            self._drop(slot)
        self.blocks[slot] = HostBlock(slot, group, block_hash, serial, parent, token_ids)
        self.by_hash.setdefault((group, block_hash), {})[slot] = None
        self.by_serial[group, serial] = slot
        return slot

    def pin(self, slot: int) -> None:
        """A load reads the block: kept, and most recently used."""
        self.pinned.add(slot)
        self.blocks.move_to_end(slot)

    def unpin_all(self) -> None:
        self.pinned.clear()

    def _drop(self, slot: int) -> None:
        block = self.blocks.pop(slot)
        twins = self.by_hash[block.group, block.hash]
        del twins[slot]
        if not twins:
            del self.by_hash[block.group, block.hash]
        del self.by_serial[block.group, block.serial]

    def clear(self) -> None:
        """Forget every block (after weights change). A pending load still reads its slot before
        any later save writes it (transfers run in order)."""
        self.pinned.clear()
        for slot in list(self.blocks):
            self._drop(slot)
            self.free.append(slot)

    def check_invariants(self) -> None:
        assert len(self.free) + len(self.blocks) == self.num_blocks
        assert not set(self.free) & set(self.blocks), "a host block both free and held"
        assert len(self.by_serial) == len(self.blocks)
        for slot, block in self.blocks.items():
            assert block.slot == slot and slot in self.by_hash[block.group, block.hash]
            assert self.by_serial[block.group, block.serial] == slot
        assert sum(len(s) for s in self.by_hash.values()) == len(self.blocks)
        assert self.pinned <= set(self.blocks), "a pinned host block is not held"
