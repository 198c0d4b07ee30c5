"""How a model's layers share the KV pool: groups of layers with one attention window each.

A model whose layers all attend alike (every one full, or every one the same sliding window)
is one group: a block holds a block's tokens in every layer. A hybrid model (Gemma 2's
alternate sliding and full layers, Gemma 3's five sliding in six, Qwen2's `max_window_layers`)
has layers that need every key beside layers that need only their window's; as vLLM's hybrid KV
cache manager does, its layers are split into groups of equal size, each of one window. A block
then holds a block's tokens in one group's layers: the pool keeps group-size KV tensors, the
i-th of a group's layers reading and writing the i-th tensor, and each request holds a block
list per group. A sliding group's blocks before its window go back to the pool as its
sequence moves on: at Gemma 3's 1024-key window a 32k-token sequence holds its sliding layers'
last 1024 tokens, not 32k.

The group size is the smallest number of layers of one window; a window with more layers has
several groups (the last may be short: its missing layers' tensor slots go unused). Group 0 is
the anchor of the prefix cache: a full group where the model has one (engine/ and the block
manager read a prefix's identity from its blocks).
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import Any


@dataclass(frozen=True, slots=True)
class KVCacheGroups:
    windows: tuple[int, ...]  # each group's window (0: every key), the anchor first
    layers: tuple[tuple[int, ...], ...]  # each group's layers: the i-th reads the i-th KV tensor

    @staticmethod
    def of(layer_windows: Sequence[int], hybrid: bool = True) -> KVCacheGroups:
        """The groups of layers with these windows (0: full). Not `hybrid` (vLLM's
        --disable-hybrid-kv-cache-manager): one group that keeps every block, whatever the
        windows; the kernels still apply each layer's."""
        windows = tuple(layer_windows)
        if not windows:
            raise ValueError("a model has at least one layer")
        kinds = sorted(set(windows)) if hybrid else [0]  # full (0) first: the anchor
        if len(kinds) == 1:
            return KVCacheGroups((kinds[0],), (tuple(range(len(windows))),))
        by_kind = {w: [layer for layer, lw in enumerate(windows) if lw == w] for w in kinds}
        size = min(len(layers) for layers in by_kind.values())
        groups = [(w, tuple(layers[i:i + size])) for w in kinds for layers in [by_kind[w]]
                  for i in range(0, len(layers), size)]
        return KVCacheGroups(tuple(w for w, _ in groups), tuple(layers for _, layers in groups))

    @property
    def num_groups(self) -> int:
        return len(self.windows)

    @property
    def one_full_group(self) -> bool:
        """A model whose every layer keeps every block (no hybrid grouping)."""
        return self.windows == (0,)

    @property
    def group_size(self) -> int:
        """KV tensors the pool keeps (each of num_blocks blocks): the largest group's layers."""
        return max(len(layers) for layers in self.layers)

    def layer_places(self) -> list[tuple[int, int]]:
        """Each layer's (group, KV tensor), in layer order."""
        places: dict[int, tuple[int, int]] = {}
        for group, layers in enumerate(self.layers):
            for slot, layer in enumerate(layers):
                places[layer] = (group, slot)
        return [places[layer] for layer in range(len(places))]


def window_start_block(window: int, num_computed_tokens: int, block_size: int) -> int:
    """The first block a sequence's later queries can read in a layer of this window (0: every
    key), with num_computed_tokens computed: a query at position p sees the keys after
    p - window, and the next query sits at num_computed_tokens."""
    if not window:
        return 0
    return max(0, (num_computed_tokens - window + 1) // block_size)


@dataclass(frozen=True, slots=True)
class KVCachePlan:
    """What a sequence takes of a pool of these groups, for admission checks (the engine's and the
    HTTP process's alike): `chunk`, the most tokens one step computes for a sequence."""

    groups: KVCacheGroups
    block_size: int
    chunk: int

    def to_dict(self) -> dict[str, Any]:
        """For the worker's ready frame (plain JSON)."""
        return {"windows": list(self.groups.windows), "layers": [list(layers) for layers in self.groups.layers],
                "block_size": self.block_size, "chunk": self.chunk}

    @staticmethod
    def from_dict(d: dict[str, Any]) -> KVCachePlan:
        groups = KVCacheGroups(tuple(d["windows"]), tuple(tuple(layers) for layers in d["layers"]))
        return KVCachePlan(groups, d["block_size"], d["chunk"])

    def sequence_blocks(self, num_tokens: int) -> int:
        """The most blocks a sequence of num_tokens tokens holds at once: every block of a full
        group, a sliding group's window and the step's chunk."""
        blocks = -(-num_tokens // self.block_size)
        total = 0
        for window in self.groups.windows:
            total += blocks if not window else min(blocks, (window + self.chunk - 2) // self.block_size + 2)
        return total

    def pool_tokens(self, num_blocks: int) -> int:
        """The longest sequence the whole pool holds."""
        if self.sequence_blocks(1) > num_blocks:
            return 0
        if self.groups.one_full_group:
            return num_blocks * self.block_size
        return _largest(lambda tokens: self.sequence_blocks(tokens) <= num_blocks, 1)

    def beam_room(self, num_prompt_tokens: int, beam_width: int, num_blocks: int, prefix_caching: bool) -> int:
        """The most max_tokens a beam search of this width can be sure of in this pool: the
        prompt's full blocks in the full groups (shared, with prefix caching), and each beam's
        own blocks for the rest of its sequence, as though the beams all parted; in a sliding
        group, each beam's window (beams decode a token a step), shared or not. One beam must
        also fit alone, computed a chunk at a time (the prompt; a preempted beam again)."""
        size = self.block_size
        held = num_prompt_tokens // size if prefix_caching else 0
        if self.groups.one_full_group:  # in closed form
            return (held + (num_blocks - held) // beam_width) * size - num_prompt_tokens
        full_groups = sum(1 for w in self.groups.windows if not w)
        decoding = KVCachePlan(self.groups, size, 1)

        def fits(total_tokens: int) -> bool:
            own = decoding.sequence_blocks(total_tokens) - full_groups * held
            return full_groups * held + beam_width * own <= num_blocks and self.sequence_blocks(total_tokens) <= num_blocks

        if not fits(num_prompt_tokens + 1):
            return -1
        return _largest(fits, num_prompt_tokens + 1) - num_prompt_tokens


_UNBOUNDED = 1 << 40  # tokens: a sequence past this fits a pool of sliding windows alone


def _largest(fits: Callable[[int], bool], low: int) -> int:
    """The largest n >= low that `fits` (true at low, and for every n below one that is), or
    _UNBOUNDED and beyond where it never stops: doubling, then bisecting."""
    high = low + 1
    while fits(high) and high < _UNBOUNDED:
        low, high = high, 2 * high
    if fits(high):
        return high
    while high - low > 1:  # fits(low), not fits(high)
        mid = (low + high) // 2
        low, high = (mid, high) if fits(mid) else (low, mid)
    return low
