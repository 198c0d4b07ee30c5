"""The running requests' block tables, kept across steps as rows of one int32 array.

A step's block table is `[sequences, width]`: each sequence's KV block ids, zero-padded. Built
from the requests' Python lists every step, it costs O(context): at 256 sequences of 8k
tokens (512 blocks each) the lists and their conversion took ~3.8 ms of host time per step
here, more than the rest of a decode step's host work. As vLLM's persistent block table does,
each request here owns a row for as long as it runs; a step copies in only the block ids
allocated since the request's previous step (one per block_size tokens), then gathers its
batch's rows in one numpy indexing.

A request's block ids only grow while it runs; they are dropped and reallocated when it is
preempted (its `num_preemptions` then changes, and its row is rewritten from scratch) and when
it finishes, when the engine calls `release`. A hybrid model's requests hold a block list per
KV group (scheduler/kv_cache_groups.py): a row then has a table per group, `[groups, sequences,
width]` gathered. A sliding group's block given back before its window keeps its old id in the
row (the kernels read no block before a query's window); one a prefix hit never held reads 0.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np

from scheduler import Request
from scheduler.request import NULL_BLOCK


@dataclass(slots=True, eq=False)
class _Row:
    index: int
    synced: int = 0  # block ids of the request already in the row
    preemptions: int = 0  # the request's num_preemptions when the row was written


class BlockTables:
    def __init__(self, max_blocks_per_seq: int, rows: int = 64, num_groups: int = 1) -> None:
        self.num_groups = num_groups
        self._array = np.zeros((num_groups, max(rows, 1), max(max_blocks_per_seq, 1)), dtype=np.int32)
        self._rows: dict[Request, _Row] = {}
        self._free = list(range(self._array.shape[1] - 1, -1, -1))

    def __len__(self) -> int:
        """Requests that own a row."""
        return len(self._rows)

    def gather(self, requests: list[Request], width: int) -> np.ndarray:
        """`[len(requests), width]`: each request's first `width` block ids, zeros past its
        own (a hybrid model's: `[groups, len(requests), width]`). A copy: later steps may
        rewrite the rows."""
        if width > self._array.shape[2]:
            self._grow(self._array.shape[1], width)
        rows = [self._sync(r) for r in requests]  # first: it may grow the array
        if self.num_groups == 1:
            return self._array[0, rows, :width]
        return self._array[:, rows, :width]

    def release(self, request: Request) -> None:
        """The request finished: its row goes back (zeroed when next owned)."""
        row = self._rows.pop(request, None)
        if row is not None:
            self._array[:, row.index, :row.synced] = 0
            self._free.append(row.index)

    def _sync(self, request: Request) -> int:
        row = self._rows.get(request)
        if row is None:
            if not self._free:
                self._grow(2 * self._array.shape[1], self._array.shape[2])
            row = self._rows[request] = _Row(self._free.pop(), preemptions=request.num_preemptions)
        elif row.preemptions != request.num_preemptions:  # its blocks were dropped and reallocated
            self._array[:, row.index, :row.synced] = 0
            row.synced, row.preemptions = 0, request.num_preemptions
        ids = request.block_ids
        n = len(ids)
        if n > row.synced:
            if n > self._array.shape[2]:
                self._grow(self._array.shape[1], n)
            for group, blocks in enumerate(request.kv_blocks):
                new = self._array[group, row.index, row.synced:n]
                new[:] = blocks[row.synced:n]
                if NULL_BLOCK in blocks[row.synced:row.synced + 1]:  # a hit's window starts later
                    new[new == NULL_BLOCK] = 0
            row.synced = n
        elif n < row.synced:
            raise RuntimeError(f"{request.request_id}: its block table shrank from {row.synced} to {n} blocks "
                               "without a preemption")
        return row.index

    def _grow(self, rows: int, width: int) -> None:
        old = self._array
        self._array = np.zeros((self.num_groups, rows, width), dtype=np.int32)
        self._array[:, :old.shape[1], :old.shape[2]] = old
        self._free[:0] = range(rows - 1, old.shape[1] - 1, -1)
