"""Paged attention for one flattened step: write the step's K/V into the cache, then attend.

The step's sequences are ordered decodes first (one query each), then prefill chunks; each
part goes to its kernel of the contract in kernels/ (reference on CPU, Triton on CUDA).
"""

from __future__ import annotations

from dataclasses import dataclass
from types import ModuleType

import torch


@dataclass(slots=True)
class AttentionMetadata:
    # A hybrid model's (layer_groups) are per KV group: [groups, T] and [groups, B, max_blocks].
    slot_mapping: torch.Tensor  # [T] int64
    block_tables: torch.Tensor  # [B, max_blocks] int32, decodes first
    context_lens: torch.Tensor  # [B] int32: keys per sequence after this step
    num_decodes: int  # the first num_decodes sequences (and tokens) are decodes
    prefill_cu_seqlens_q: torch.Tensor  # [num_prefills + 1] int32, offsets into the prefill tokens
    kv_caches: list[tuple[torch.Tensor, torch.Tensor]]  # per layer: k_cache, v_cache
    backend: ModuleType
    # Ends of the groups the decodes (sorted by context length) are attended in; a padded
    # kernel (the reference) then pads each group only to its own longest context. () = one.
    decode_groups: tuple[int, ...] = ()
    # A mixed CUDA graph's step: int32 [2] on the device, its decode count (the leading
    # sequences) and their split count, which change at every replay. num_decodes is then 0
    # and prefill_cu_seqlens_q spans every sequence, decodes included.
    graphed_decodes: torch.Tensor | None = None
    # A hybrid model's: each layer's KV group (scheduler/kv_cache_groups.py), which picks its
    # slots and block tables. () = one group.
    layer_groups: tuple[int, ...] = ()


def paged_attention(
    q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, layer: int, meta: AttentionMetadata, scale: float,
    *, sliding_window: int = 0, softcap: float = 0.0, kv_scales: tuple[float, float] = (1.0, 1.0),
) -> torch.Tensor:
    """q [T, Hq, D], k/v [T, Hkv, D] of this step's tokens → [T, Hq, D]; a sliding layer's
    queries see their last `sliding_window` keys, `softcap` caps the scores (kernels/); an fp8
    cache holds the layer's K and V divided by `kv_scales`."""
    k_cache, v_cache = meta.kv_caches[layer]
    ops = meta.backend
    slot_mapping, block_tables = meta.slot_mapping, meta.block_tables
    if meta.layer_groups:
        group = meta.layer_groups[layer]
        slot_mapping, block_tables = slot_mapping[group], block_tables[group]
    k_scale, v_scale = kv_scales
    ops.store_kv(k, v, k_cache, v_cache, slot_mapping, k_scale=k_scale, v_scale=v_scale)
    scores = dict(sliding_window=sliding_window, softcap=softcap, k_scale=k_scale, v_scale=v_scale)
    if meta.graphed_decodes is not None:
        return ops.paged_mixed_attention_graphed(q, k_cache, v_cache, block_tables, meta.prefill_cu_seqlens_q,
                                                 meta.context_lens, scale, meta.graphed_decodes, key=k, value=v,
                                                 **scores)
    nd = meta.num_decodes
    parts = []
    start = 0
    for end in meta.decode_groups or ((nd,) if nd else ()):
        parts.append(ops.paged_decode_attention(
            q[start:end], k_cache, v_cache, block_tables[start:end], meta.context_lens[start:end], scale,
            **scores,
        ))
        start = end
    if nd < q.shape[0]:
        # The chunks' own K/V go along: their new keys need no trip through the block table.
        parts.append(ops.paged_prefill_attention(
            q[nd:], k_cache, v_cache, block_tables[nd:], meta.prefill_cu_seqlens_q, meta.context_lens[nd:], scale,
            key=k[nd:], value=v[nd:], **scores,
        ))
    return parts[0] if len(parts) == 1 else torch.cat(parts)
