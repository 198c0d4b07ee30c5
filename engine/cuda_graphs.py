"""CUDA graphs: captured forwards that replay a step's few hundred kernels with one launch.

A step of a small model is a few hundred short kernels; launched one by one from Python, the
launches cost more than the work. A CUDA graph replays them all with one launch. A graph
freezes shapes and addresses, so every captured step reads static input buffers (a replay
first copies the step's inputs into their first rows) and is padded to a bucket. Two kinds:

- **decode** graphs, one per batch-size bucket (1, 2, 4, ..., 256, capped at max_num_seqs),
  replay pure-decode steps: the model and the LM head, with the split-K decode kernel. A batch
  of n replays the smallest bucket >= n, padded with rows that do nothing: slot -1 (store_kv
  skips it), context 0 (decode attention gives zeros, reading no block table), token 0,
  position 0. The graph's output is the logits of every row; the caller slices its rows.
- **mixed** graphs, one per token-count bucket (32, 48, 64, 96, ... up to
  max_num_batched_tokens), replay steps with prefill chunks (decodes beside them or not).
  The step's decode count and their split-K factor go in with its inputs (`decode_counts`):
  the graphed decode kernel reads them on the device and attends the leading sequences with a
  fixed number of programs, and the varlen prefill kernel, whose grid depends on the bucket
  only, skips them. So a long context beside a prompt chunk is split as in an eager step,
  not walked by one program. The sequences are padded to max_num_seqs with ones of no new
  token and context 0, the tokens to the bucket with slot -1 tokens of no sequence
  (attention leaves their rows unwritten; no later op mixes rows). The graph's output is the
  final hidden states of the sampling rows (`logits_indices`, padded to max_num_seqs); the LM
  head runs eagerly on the real ones, so a graph holds `[max_num_seqs, hidden]`, not a
  vocabulary of logits.

The block tables have a fixed width, ceil(max_model_len / block_size), so the decode kernel's
split count (derived from shapes only) is frozen with the graph; columns past a row's context
are never read, so only the batch's own columns are copied each step.

This needs kernels that never sync with the host and whose launch grid depends on shapes
(and counts read on the device) only: the Triton backend (kernels.triton_ops,
kernels.triton_norm_rope). The reference backend syncs (store_kv checks for skipped slots) and is never captured.

All graphs share one memory pool and are captured largest first, so the smaller ones reuse the
largest one's intermediate buffers; only each graph's output stays allocated for good.
"""

from __future__ import annotations

import bisect
import logging
import time
from collections.abc import Callable
from typing import Literal

import torch

from engine.attention import AttentionMetadata

logger = logging.getLogger(__name__)

BATCH_BUCKETS = (1, 2, 4, 8, 16, 32, 64, 128, 256)
MIN_TOKEN_BUCKET = 32

Kind = Literal["decode", "mixed"]
GraphKey = tuple[Kind, int]


def batch_buckets(max_num_seqs: int) -> list[int]:
    """The captured decode batch sizes: BATCH_BUCKETS capped at max_num_seqs (which becomes the
    largest bucket when it is not in the list)."""
    if max_num_seqs < 1:
        raise ValueError(f"max_num_seqs must be >= 1, got {max_num_seqs}")
    return sorted({min(b, max_num_seqs) for b in BATCH_BUCKETS})


def token_buckets(max_num_batched_tokens: int) -> list[int]:
    """The captured mixed-step token counts: powers of two from MIN_TOKEN_BUCKET and the
    midpoints 1.5x between them (a step pads by less than half), up to and including
    max_num_batched_tokens."""
    if max_num_batched_tokens < 1:
        raise ValueError(f"max_num_batched_tokens must be >= 1, got {max_num_batched_tokens}")
    buckets = {max_num_batched_tokens}
    b = MIN_TOKEN_BUCKET
    while b < max_num_batched_tokens:
        buckets.update(x for x in (b, b * 3 // 2) if x < max_num_batched_tokens)
        b *= 2
    return sorted(buckets)


def bucket_for(buckets: list[int], n: int) -> int | None:
    """The smallest bucket holding n rows; None if none does."""
    i = bisect.bisect_left(buckets, n)
    return buckets[i] if i < len(buckets) else None


def pad_decode_inputs(
    n: int, bucket: int, input_ids: list[int], positions: list[int], slots: list[int], context_lens: list[int],
) -> None:
    """Append bucket - n padding rows (in place): token 0, position 0, slot -1 (nothing is
    stored), context 0 (attention reads nothing and returns zeros, so their block-table rows,
    left as they are, are never read)."""
    pad = bucket - n
    pad_tokens(pad, input_ids, positions, slots)
    context_lens.extend([0] * pad)


def pad_tokens(pad: int, input_ids: list[int], positions: list[int], slots: list[int]) -> None:
    """Append pad tokens that store nothing (in place): token 0, position 0, slot -1."""
    input_ids.extend([0] * pad)
    positions.extend([0] * pad)
    slots.extend([-1] * pad)


def pad_mixed_sequences(
    num_seqs: int, cu_seqlens: list[int], context_lens: list[int], logits_indices: list[int]
) -> None:
    """Pad a mixed step's per-sequence lists to num_seqs sequences (in place): sequences of no
    new token (cu_seqlens repeats its end) and context 0; logits rows 0 (sliced off after)."""
    pad = num_seqs - len(context_lens)
    cu_seqlens.extend([cu_seqlens[-1]] * pad)
    context_lens.extend([0] * pad)
    logits_indices.extend([0] * (num_seqs - len(logits_indices)))


class CudaGraphRunner:
    """Captured decode and mixed steps of one model over one KV cache; see the module docstring."""

    def __init__(
        self,
        model_forward: Callable[[torch.Tensor, torch.Tensor, AttentionMetadata], torch.Tensor],
        compute_logits: Callable[[torch.Tensor], torch.Tensor],
        kv_caches: list[tuple[torch.Tensor, torch.Tensor]],
        backend,
        decode_buckets: list[int],
        token_buckets: list[int],
        max_num_seqs: int,
        table_width: int,
        device: torch.device,
        layer_groups: tuple[int, ...] = (),
    ) -> None:
        """model_forward(input_ids, positions, meta) → final hidden states of every row;
        compute_logits(hidden) → logits. No token bucket: decode graphs only. `layer_groups`:
        each layer's KV group, for a hybrid model (AttentionMetadata.layer_groups)."""
        if not decode_buckets:
            raise ValueError("no batch bucket to capture")
        if decode_buckets[-1] > max_num_seqs:
            raise ValueError(f"decode bucket {decode_buckets[-1]} exceeds max_num_seqs {max_num_seqs}")
        self.model_forward = model_forward
        self.compute_logits = compute_logits
        self.kv_caches = kv_caches
        self.backend = backend
        self.buckets = sorted(decode_buckets)
        self.token_buckets = sorted(token_buckets)
        self.max_num_seqs = max_num_seqs
        self.table_width = table_width
        self.device = device
        self.layer_groups = layer_groups
        groups = (max(layer_groups) + 1,) if layer_groups else ()  # a hybrid model's slots and tables, per group
        tokens = max(self.buckets[-1], self.token_buckets[-1] if self.token_buckets else 0)
        # Static inputs (outside the graphs' pool): every replay reads these addresses.
        self.input_ids = torch.zeros(tokens, dtype=torch.long, device=device)
        self.positions = torch.zeros(tokens, dtype=torch.long, device=device)
        self.slot_mapping = torch.full((*groups, tokens), -1, dtype=torch.long, device=device)
        self.context_lens = torch.zeros(max_num_seqs, dtype=torch.int32, device=device)
        self.block_tables = torch.zeros((*groups, max_num_seqs, table_width), dtype=torch.int32, device=device)
        self.cu_seqlens = torch.zeros(max_num_seqs + 1, dtype=torch.int32, device=device)
        self.logits_indices = torch.zeros(max_num_seqs, dtype=torch.long, device=device)
        self.no_prefill = torch.zeros(1, dtype=torch.int32, device=device)
        self.decode_counts = torch.zeros(2, dtype=torch.int32, device=device)  # mixed: decodes, their splits
        # Mixed steps' decodes by the graphed decode kernel where the backend has it (Triton);
        # else (a CPU backend standing in, in tests) every sequence by the prefill kernel.
        self.graphed_decodes = hasattr(backend, "paged_mixed_attention_graphed")
        self.graphs: dict[GraphKey, torch.cuda.CUDAGraph] = {}
        self.outputs: dict[GraphKey, torch.Tensor] = {}
        self.pool = None
        self.memory_bytes = 0  # what capturing took (pool + static inputs), measured
        self.capture_seconds = 0.0

    @property
    def static_bytes(self) -> int:
        """The static input buffers' bytes (allocated outside the graphs' pool)."""
        return sum(t.numel() * t.element_size() for t in (
            self.input_ids, self.positions, self.slot_mapping, self.context_lens, self.block_tables,
            self.cu_seqlens, self.logits_indices, self.decode_counts))

    @property
    def keys(self) -> list[GraphKey]:
        """Every graph, in capture order: mixed ones (the larger steps) first, largest first."""
        return ([("mixed", t) for t in reversed(self.token_buckets)]
                + [("decode", b) for b in reversed(self.buckets)])

    def meta(self, key: GraphKey) -> AttentionMetadata:
        kind, n = key
        if kind == "decode":
            return AttentionMetadata(
                slot_mapping=self.slot_mapping[..., :n], block_tables=self.block_tables[..., :n, :],
                context_lens=self.context_lens[:n], num_decodes=n, prefill_cu_seqlens_q=self.no_prefill,
                kv_caches=self.kv_caches, backend=self.backend, layer_groups=self.layer_groups,
            )
        return AttentionMetadata(
            slot_mapping=self.slot_mapping[..., :n], block_tables=self.block_tables,
            context_lens=self.context_lens, num_decodes=0, prefill_cu_seqlens_q=self.cu_seqlens,
            kv_caches=self.kv_caches, backend=self.backend, layer_groups=self.layer_groups,
            graphed_decodes=self.decode_counts if self.graphed_decodes else None,
        )

    def run(self, key: GraphKey) -> torch.Tensor:
        """The forward a graph holds, on the static inputs: decode → logits of every row; mixed
        → hidden states of the `logits_indices` rows."""
        kind, n = key
        hidden = self.model_forward(self.input_ids[:n], self.positions[:n], self.meta(key))
        if kind == "decode":
            return self.compute_logits(hidden)
        return hidden[self.logits_indices]

    @torch.inference_mode()
    def capture(self) -> None:
        """Warm up and capture every graph, largest first. The static inputs hold slot -1,
        context 0 and no new token throughout, so neither warm-up nor capture touches the KV
        cache."""
        t0 = time.perf_counter()
        torch.cuda.synchronize(self.device)
        torch.cuda.empty_cache()
        reserved0 = torch.cuda.memory_reserved(self.device)
        self.pool = torch.cuda.graph_pool_handle()
        for key in self.keys:
            # Eager warm-up: compiles and loads the Triton kernels for these shapes and
            # initialises cuBLAS, none of which may happen during capture.
            for _ in range(2):
                self.run(key)
            torch.cuda.synchronize(self.device)
            graph = torch.cuda.CUDAGraph()
            with torch.cuda.graph(graph, pool=self.pool, capture_error_mode="thread_local"):
                out = self.run(key)
            self.graphs[key], self.outputs[key] = graph, out
        torch.cuda.synchronize(self.device)
        torch.cuda.empty_cache()  # the warm-ups' blocks (outside the pool) go back
        self.memory_bytes = torch.cuda.memory_reserved(self.device) - reserved0 + self.static_bytes
        self.capture_seconds = time.perf_counter() - t0
        logger.info("captured CUDA graphs for decode batches %s and mixed steps of %s tokens in %.1fs (%.0f MiB)",
                    self.buckets, self.token_buckets, self.capture_seconds, self.memory_bytes / 2**20)

    def bucket(self, n: int) -> int | None:
        return bucket_for(self.buckets, n)

    def token_bucket(self, n: int) -> int | None:
        return bucket_for(self.token_buckets, n)

    def _copy_tables(self, block_tables: torch.Tensor) -> None:
        rows, w = block_tables.shape[-2:]
        if w > self.table_width:
            raise ValueError(f"block tables of width {w} exceed the captured {self.table_width}")
        if w:
            self.block_tables[..., :rows, :w].copy_(block_tables)

    def _copy_tokens(self, input_ids: torch.Tensor, positions: torch.Tensor, slot_mapping: torch.Tensor) -> None:
        n = input_ids.shape[0]
        self.input_ids[:n].copy_(input_ids)
        self.positions[:n].copy_(positions)
        self.slot_mapping[..., :n].copy_(slot_mapping)

    def replay(
        self, input_ids: torch.Tensor, positions: torch.Tensor, slot_mapping: torch.Tensor,
        context_lens: torch.Tensor, block_tables: torch.Tensor,
    ) -> torch.Tensor:
        """Run the decode graph of the bucket these (already padded) inputs fill: `[bucket]`
        each, and block tables `[n, w]` for the n real sequences, w <= table_width. Returns the
        graph's logits `[bucket, V]`: static memory that the next replay overwrites, so read
        it first."""
        b = input_ids.shape[0]
        if ("decode", b) not in self.graphs:
            raise ValueError(f"no CUDA graph for a batch of {b} (buckets {self.buckets})")
        self._copy_tables(block_tables)
        self._copy_tokens(input_ids, positions, slot_mapping)
        self.context_lens[:b].copy_(context_lens)
        self.graphs["decode", b].replay()
        return self.outputs["decode", b]

    def replay_mixed(
        self, input_ids: torch.Tensor, positions: torch.Tensor, slot_mapping: torch.Tensor,
        context_lens: torch.Tensor, block_tables: torch.Tensor, cu_seqlens: torch.Tensor,
        logits_indices: torch.Tensor, decode_counts: torch.Tensor,
    ) -> torch.Tensor:
        """Run the mixed graph of the token bucket these inputs fill, padded by
        pad_tokens/pad_mixed_sequences: tokens `[bucket]`, context_lens and logits_indices
        `[max_num_seqs]`, cu_seqlens `[max_num_seqs + 1]` over every sequence (decodes too),
        block tables `[n, w]` for the n real sequences, decode_counts `[2]`: the leading
        decodes and their split count (kernels.triton_ops.graphed_decode_splits). Returns the
        hidden states of the `logits_indices` rows, `[max_num_seqs, hidden]` (static memory,
        like `replay`)."""
        t = input_ids.shape[0]
        if ("mixed", t) not in self.graphs:
            raise ValueError(f"no CUDA graph for a mixed step of {t} tokens (buckets {self.token_buckets})")
        if context_lens.shape[0] != self.max_num_seqs:
            raise ValueError(f"a mixed step is padded to {self.max_num_seqs} sequences, got {context_lens.shape[0]}")
        self._copy_tables(block_tables)
        self._copy_tokens(input_ids, positions, slot_mapping)
        self.context_lens.copy_(context_lens)
        self.cu_seqlens.copy_(cu_seqlens)
        self.logits_indices.copy_(logits_indices)
        self.decode_counts.copy_(decode_counts)
        self.graphs["mixed", t].replay()
        return self.outputs["mixed", t]
