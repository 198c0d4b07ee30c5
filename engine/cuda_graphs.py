"""CUDA graphs for pure-decode steps: one captured forward (model + LM head) per batch bucket.

A decode step of a small model is a few hundred short kernels; launched one by one from
Python, the launches cost more than the work. A CUDA graph replays them all with one launch.
A graph freezes shapes and addresses, so:

- one graph per batch-size bucket (1, 2, 4, ..., 256, capped at max_num_seqs); a decode batch
  of n sequences replays the smallest bucket >= n, padded with rows that do nothing: slot -1
  (store_kv skips it), context 0 (decode attention gives zeros), token 0, position 0;
- static input buffers, sized for the largest bucket, are what the graphs read: a replay first
  copies the step's inputs into their first rows;
- the block tables have a fixed width, ceil(max_model_len / block_size), so that the decode
  kernel's split count (derived from shapes only) is frozen with the graph; columns past a
  row's context are never read, so only the batch's own columns are copied each step;
- the graph's output is the logits of every row of the bucket; the caller slices its rows.

This needs kernels that never sync with the host and whose launch grid depends on shapes
only: the Triton backend (kernels.triton_ops, kernels.triton_norm_rope). The reference
backend syncs (store_kv checks for skipped slots) and is never captured.

All graphs share one memory pool and are captured largest first, so the smaller ones reuse the
largest one's intermediate buffers; only each graph's logits stay allocated for good.
"""

from __future__ import annotations

import bisect
import logging
import time
from collections.abc import Callable

import torch

from engine.attention import AttentionMetadata

logger = logging.getLogger(__name__)

BATCH_BUCKETS = (1, 2, 4, 8, 16, 32, 64, 128, 256)


def batch_buckets(max_num_seqs: int) -> list[int]:
    """The captured batch sizes: BATCH_BUCKETS capped at max_num_seqs (which becomes the
    largest bucket when it is not in the list)."""
    if max_num_seqs < 1:
        raise ValueError(f"max_num_seqs must be >= 1, got {max_num_seqs}")
    return sorted({min(b, max_num_seqs) for b in BATCH_BUCKETS})


def bucket_for(buckets: list[int], n: int) -> int | None:
    """The smallest bucket holding n rows; None if none does."""
    i = bisect.bisect_left(buckets, n)
    return buckets[i] if i < len(buckets) else None


def pad_decode_inputs(
    n: int, bucket: int, input_ids: list[int], positions: list[int], slots: list[int],
    context_lens: list[int], tables: list[list[int]],
) -> None:
    """Append bucket - n padding rows (in place): token 0, position 0, slot -1 (nothing is
    stored), context 0 (attention reads nothing and returns zeros), an all-zero table row."""
    pad = bucket - n
    width = len(tables[0]) if tables else 0
    input_ids.extend([0] * pad)
    positions.extend([0] * pad)
    slots.extend([-1] * pad)
    context_lens.extend([0] * pad)
    tables.extend([[0] * width for _ in range(pad)])


class CudaGraphRunner:
    """Captured decode steps of one model over one KV cache; see the module docstring."""

    def __init__(
        self,
        forward: Callable[[torch.Tensor, torch.Tensor, AttentionMetadata], torch.Tensor],
        kv_caches: list[tuple[torch.Tensor, torch.Tensor]],
        backend,
        buckets: list[int],
        table_width: int,
        device: torch.device,
    ) -> None:
        """forward(input_ids, positions, meta) → logits of every row (model + LM head)."""
        if not buckets:
            raise ValueError("no batch bucket to capture")
        self.forward = forward
        self.kv_caches = kv_caches
        self.backend = backend
        self.buckets = sorted(buckets)
        self.table_width = table_width
        self.device = device
        rows = self.buckets[-1]
        # Static inputs (outside the graphs' pool): every replay reads these addresses.
        self.input_ids = torch.zeros(rows, dtype=torch.long, device=device)
        self.positions = torch.zeros(rows, dtype=torch.long, device=device)
        self.slot_mapping = torch.full((rows,), -1, dtype=torch.long, device=device)
        self.context_lens = torch.zeros(rows, dtype=torch.int32, device=device)
        self.block_tables = torch.zeros((rows, table_width), dtype=torch.int32, device=device)
        self.graphs: dict[int, torch.cuda.CUDAGraph] = {}
        self.outputs: dict[int, torch.Tensor] = {}
        self.pool = None
        self.memory_bytes = 0  # what capturing took (pool + static inputs), measured
        self.capture_seconds = 0.0

    def _meta(self, b: int) -> AttentionMetadata:
        return AttentionMetadata(
            slot_mapping=self.slot_mapping[:b],
            block_tables=self.block_tables[:b],
            context_lens=self.context_lens[:b],
            num_decodes=b,
            prefill_cu_seqlens_q=torch.zeros(1, dtype=torch.int32, device=self.device),
            kv_caches=self.kv_caches,
            backend=self.backend,
        )

    @torch.inference_mode()
    def capture(self) -> None:
        """Warm up and capture every bucket, largest first. The static inputs hold slot -1 and
        context 0 throughout, so neither warm-up nor capture touches the KV cache."""
        t0 = time.perf_counter()
        torch.cuda.synchronize(self.device)
        torch.cuda.empty_cache()
        reserved0 = torch.cuda.memory_reserved(self.device)
        self.pool = torch.cuda.graph_pool_handle()
        for b in reversed(self.buckets):
            meta = self._meta(b)
            # Eager warm-up: compiles and loads the Triton kernels for these shapes and
            # initialises cuBLAS, none of which may happen during capture.
            for _ in range(2):
                self.forward(self.input_ids[:b], self.positions[:b], meta)
            torch.cuda.synchronize(self.device)
            graph = torch.cuda.CUDAGraph()
            with torch.cuda.graph(graph, pool=self.pool, capture_error_mode="thread_local"):
                out = self.forward(self.input_ids[:b], self.positions[:b], meta)
            self.graphs[b], self.outputs[b] = graph, out
        torch.cuda.synchronize(self.device)
        torch.cuda.empty_cache()  # the warm-ups' blocks (outside the pool) go back
        static = sum(t.numel() * t.element_size() for t in (
            self.input_ids, self.positions, self.slot_mapping, self.context_lens, self.block_tables))
        self.memory_bytes = torch.cuda.memory_reserved(self.device) - reserved0 + static
        self.capture_seconds = time.perf_counter() - t0
        logger.info("captured CUDA graphs for decode batches %s in %.1fs (%.0f MiB)",
                    self.buckets, self.capture_seconds, self.memory_bytes / 2**20)

    def bucket(self, n: int) -> int | None:
        return bucket_for(self.buckets, n)

    def replay(
        self, input_ids: torch.Tensor, positions: torch.Tensor, slot_mapping: torch.Tensor,
        context_lens: torch.Tensor, block_tables: torch.Tensor,
    ) -> torch.Tensor:
        """Run the graph of the bucket these (already padded) inputs fill: `[bucket]` each and
        block tables `[bucket, w]` with w <= table_width. Returns the graph's logits
        `[bucket, V]`: static memory that the next replay overwrites, so read it first."""
        b = input_ids.shape[0]
        if b not in self.graphs:
            raise ValueError(f"no CUDA graph for a batch of {b} (buckets {self.buckets})")
        w = block_tables.shape[1]
        if w > self.table_width:
            raise ValueError(f"block tables of width {w} exceed the captured {self.table_width}")
        self.input_ids[:b].copy_(input_ids)
        self.positions[:b].copy_(positions)
        self.slot_mapping[:b].copy_(slot_mapping)
        self.context_lens[:b].copy_(context_lens)
        if w:
            self.block_tables[:b, :w].copy_(block_tables)
        self.graphs[b].replay()
        return self.outputs[b]
