"""Paged attention in plain torch: the CPU serving path and the oracle for the Triton kernels
(and likewise the layers' other kernels: norm, rotary, the MoE MLP, fp8 projections).

Every function is vectorised over the batch: K/V are gathered through the block tables with
one index op, padding and causality become one boolean mask, and torch's fused
`scaled_dot_product_attention` does the rest (GQA via `enable_gqa`, no K/V repeat).
"""

import torch
import torch.nn.functional as F

# An fp8 KV cache (vLLM's kv_cache_dtype="fp8"): e4m3 values, each tensor's K and V with a
# scale of their own (1.0 unless the checkpoint brings one). A key is stored as
# saturate(key / k_scale) rounded to e4m3, and read as that byte times k_scale in fp32, then
# rounded once to the queries' dtype; every kernel reads every key so, the step's own too.
FP8_KV = torch.float8_e4m3fn
FP8_KV_MAX = float(torch.finfo(FP8_KV).max)  # 448


def indexable_kv(cache: torch.Tensor) -> torch.Tensor:
    """`cache` as torch can index-copy it: an fp8 cache as its bytes (a view), which torch's fp8
    lacks on the CPU; any other as it is."""
    return cache.view(torch.uint8) if cache.dtype == FP8_KV else cache


def quantize_kv(x: torch.Tensor, scale: float) -> torch.Tensor:
    """x in any float dtype → e4m3, as an fp8 cache stores it (saturated at ±448, as vLLM's
    kernels convert, where torch's cast would give NaN). Divided by a tensor: CUDA divides by a
    Python scalar as a product with its reciprocal, a bit off IEEE division (the other backends').
    Filled on the device, not copied from the host: no transfer per call, and a CUDA graph's
    capture allows it."""
    divisor = torch.full((), scale, dtype=torch.float32, device=x.device)
    return (x.float() / divisor).clamp_(-FP8_KV_MAX, FP8_KV_MAX).to(FP8_KV)


def dequantize_kv(x: torch.Tensor, scale: float, dtype: torch.dtype) -> torch.Tensor:
    """What an fp8 cache's bytes hold, at `dtype` (one rounding, from fp32); other caches as they are."""
    if x.dtype != FP8_KV:
        return x.to(dtype)
    return (x.float() * scale).to(dtype)


def store_kv(
    key: torch.Tensor,
    value: torch.Tensor,
    k_cache: torch.Tensor,
    v_cache: torch.Tensor,
    slot_mapping: torch.Tensor,
    *,
    k_scale: float = 1.0,
    v_scale: float = 1.0,
) -> None:
    """Write key/value `[T, Hkv, D]` into the caches at `slot_mapping` `[T]`; slot -1 = skip.
    An fp8 cache stores key / k_scale and value / v_scale (other caches take no scales). A slot
    past the caches is an IndexError, raised before either is written."""
    slots = slot_mapping.long()
    keep = slots >= 0
    if not bool(keep.all()):
        slots, key, value = slots[keep], key[keep], value[keep]
    num_slots = k_cache.shape[0] * k_cache.shape[1]
    if slots.numel() and int(slots.max()) >= num_slots:
        raise IndexError(f"slot {int(slots.max())} is past the caches' {num_slots} slots")
    for cache, x, scale in ((k_cache, key, k_scale), (v_cache, value, v_scale)):
        stored = quantize_kv(x, scale) if cache.dtype == FP8_KV else x.to(cache.dtype)
        rows = cache.view(-1, *cache.shape[2:])  # one row per slot, so the copy lands in place
        indexable_kv(rows).index_copy_(0, slots, indexable_kv(stored))


# Gather destinations reused across calls: a fresh multi-MB tensor per layer per step costs
# more in page faults than the copy itself. One buffer for K and one for V per (device, dtype).
_workspaces: dict[tuple[torch.device, torch.dtype, int], torch.Tensor] = {}


def _workspace(which: int, numel: int, like: torch.Tensor) -> torch.Tensor:
    key = (like.device, like.dtype, which)
    buf = _workspaces.get(key)
    if buf is None or buf.numel() < numel:
        # A normal tensor (not an inference tensor) serves callers in and out of inference mode.
        with torch.inference_mode(False):
            buf = _workspaces[key] = torch.empty(numel, dtype=like.dtype, device=like.device)
    return buf[:numel]


def _gather_kv(
    k_cache: torch.Tensor,
    v_cache: torch.Tensor,
    block_tables: torch.Tensor,
    context_lens: torch.Tensor,
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """K/V of every sequence as `[B, Hkv, L, D]` views and the key-validity mask `[B, L]`.

    Masked keys still enter the matmuls with weight 0, so every cache slot must hold a finite
    value (the engine zero-initialises its caches): zeroing the stale tail here per call would
    cost as much as the gather itself. The K/V returned live in a workspace that the next call
    overwrites."""
    block_size = k_cache.shape[1]
    num_blocks = -(-int(context_lens.max()) // block_size)
    # Ids past a sequence's blocks may be padding (-1): clamp to index, then mask out.
    ids = block_tables[:, :num_blocks].clamp_min(0).flatten().long()
    batch = block_tables.shape[0]
    shape = (batch, num_blocks * block_size, *k_cache.shape[2:])
    numel = ids.numel() * k_cache[0].numel()
    k = torch.index_select(k_cache, 0, ids, out=_workspace(0, numel, k_cache).view(ids.numel(), *k_cache.shape[1:]))
    v = torch.index_select(v_cache, 0, ids, out=_workspace(1, numel, v_cache).view(ids.numel(), *v_cache.shape[1:]))
    valid = torch.arange(shape[1], device=k.device) < context_lens[:, None]
    return k.view(shape).transpose(1, 2), v.view(shape).transpose(1, 2), valid


def _attend(
    q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, mask: torch.Tensor, scale: float, softcap: float = 0.0
) -> torch.Tensor:
    """q `[B, Hq, Lq, D]`, k/v `[B, Hkv, L, D]`, mask broadcastable to `[B, Hq, Lq, L]`."""
    if softcap:
        return _attend_softcapped(q, k, v, mask, scale, softcap)
    # An additive float mask takes a faster SDPA path on CPU than a boolean one.
    bias = torch.zeros(mask.shape, dtype=q.dtype, device=q.device).masked_fill_(~mask, float("-inf"))
    return F.scaled_dot_product_attention(
        q, k.to(q.dtype), v.to(q.dtype), attn_mask=bias, scale=scale, enable_gqa=True
    )


def _attend_softcapped(
    q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, mask: torch.Tensor, scale: float, softcap: float
) -> torch.Tensor:
    """`_attend` with Gemma 2's capped scores, softcap · tanh(q·k · scale / softcap), which SDPA
    cannot take: the products in fp32, each kv head's query heads side by side."""
    batch, num_heads, num_q, head_dim = q.shape
    num_kv_heads = k.shape[1]
    g = q.float().reshape(batch, num_kv_heads, num_heads // num_kv_heads * num_q, head_dim)
    scores = torch.tanh(g @ k.float().transpose(-1, -2) * (scale / softcap)) * softcap
    scores = scores.view(batch, num_kv_heads, num_heads // num_kv_heads, num_q, -1)
    scores = scores.masked_fill(~mask.unsqueeze(2), float("-inf"))
    weights = scores.softmax(-1).view(batch, num_kv_heads, -1, scores.shape[-1])
    return (weights @ v.float()).view(q.shape).to(q.dtype)


def paged_decode_attention(
    q: torch.Tensor,
    k_cache: torch.Tensor,
    v_cache: torch.Tensor,
    block_tables: torch.Tensor,
    context_lens: torch.Tensor,
    scale: float,
    *,
    sliding_window: int = 0,
    softcap: float = 0.0,
    k_scale: float = 1.0,
    v_scale: float = 1.0,
) -> torch.Tensor:
    """One query per sequence, q `[B, Hq, D]`, over its `context_lens[b]` cached keys: the last
    `sliding_window` of them where that is not 0. `softcap` (not 0) caps the scaled scores at
    ±softcap by softcap · tanh(s / softcap), as Gemma 2 does. An fp8 cache's keys and values
    are read times `k_scale` / `v_scale`."""
    k, v, valid = _gather_kv(k_cache, v_cache, block_tables, context_lens)
    k, v = dequantize_kv(k, k_scale, q.dtype), dequantize_kv(v, v_scale, q.dtype)
    if sliding_window:
        valid &= torch.arange(valid.shape[1], device=valid.device) >= (context_lens[:, None] - sliding_window)
    out = _attend(q[:, :, None], k, v, valid[:, None, None, :], scale, softcap)
    return out[:, :, 0]


def paged_prefill_attention(
    q: torch.Tensor,
    k_cache: torch.Tensor,
    v_cache: torch.Tensor,
    block_tables: torch.Tensor,
    cu_seqlens_q: torch.Tensor,
    context_lens: torch.Tensor,
    scale: float,
    *,
    key: torch.Tensor | None = None,
    value: torch.Tensor | None = None,
    sliding_window: int = 0,
    softcap: float = 0.0,
    k_scale: float = 1.0,
    v_scale: float = 1.0,
) -> torch.Tensor:
    """Causal attention for the new tokens q `[Tq, Hq, D]` of B sequences (ragged, concatenated).
    `key`/`value` `[Tq, Hkv, D]` are the new tokens' K/V, already stored in the cache: a kernel
    may read them from there instead (the oracle reads everything from the cache), but not
    from an fp8 cache, whose keys are what it stored. A query at position p sees keys
    p - sliding_window < k <= p where `sliding_window` is not 0, as transformers'
    sliding-window mask; `softcap` and the scales as in `paged_decode_attention`."""
    device = q.device
    starts = cu_seqlens_q[:-1].long()
    q_lens = cu_seqlens_q[1:].long() - starts
    max_q = int(q_lens.max())
    # Token t belongs to sequence seq[t] at row row[t] of the padded batch.
    seq = torch.repeat_interleave(
        torch.arange(len(q_lens), device=device), q_lens, output_size=q.shape[0]
    )
    row = torch.arange(q.shape[0], device=device) - starts[seq]
    padded = q.new_zeros(len(q_lens), max_q, *q.shape[1:])
    padded[seq, row] = q

    k, v, valid = _gather_kv(k_cache, v_cache, block_tables, context_lens)
    k, v = dequantize_kv(k, k_scale, q.dtype), dequantize_kv(v, v_scale, q.dtype)
    positions = (context_lens - q_lens)[:, None] + torch.arange(max_q, device=device)
    key_pos = torch.arange(k.shape[2], device=device)
    # Padding rows (past q_len) see every valid key: never a fully masked (NaN) row.
    mask = (key_pos <= positions[:, :, None]) & valid[:, None, :]  # [B, max_q, L]
    if sliding_window:  # padding rows take the last query's window
        last = torch.minimum(positions, context_lens[:, None].long() - 1)
        mask &= key_pos > last[:, :, None] - sliding_window
    out = _attend(padded.transpose(1, 2), k, v, mask[:, None], scale, softcap)
    return out.transpose(1, 2)[seq, row]


def rms_norm(
    x: torch.Tensor, weight: torch.Tensor, eps: float, residual: torch.Tensor | None = None
) -> torch.Tensor | tuple[torch.Tensor, torch.Tensor]:
    """RMSNorm over the last dim, as transformers' Llama computes it: fp32 statistics, cast back
    to x's dtype, then times the weight. A weight in fp32 with x in 16 bits is Gemma's (its
    1 + w kept in fp32): the product in fp32, rounded once to x's dtype. With `residual`,
    normalises `x + residual` (added in x's dtype) and returns `(out, x + residual)`: the fused
    pre-norm residual step."""
    if residual is not None:
        x = x + residual
        residual = x
    dtype = x.dtype
    h = x.float()
    h = h * torch.rsqrt(h.pow(2).mean(-1, keepdim=True) + eps)
    out = (h * weight).to(dtype) if weight.dtype == torch.float32 != dtype else weight * h.to(dtype)
    return out if residual is None else (out, residual)


def apply_rotary(
    q: torch.Tensor, k: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor, positions: torch.Tensor
) -> tuple[torch.Tensor, torch.Tensor]:
    """Rotary embedding in HF's rotate-half layout, in place on q `[T, Hq, D]` and k `[T, Hkv, D]`
    (views welcome); cos/sin `[max_positions, R/2]` are indexed by positions `[T]` and rotate
    each head's leading R <= D dims (partial rotary: the rest pass through). Computed in fp32
    and cast back, as engine/models/llama.py does. Returns (q, k)."""
    rotary_dim = 2 * cos.shape[-1]
    if q.shape[-1] != k.shape[-1]:
        raise ValueError(f"q {tuple(q.shape)} and k {tuple(k.shape)} need the same head_dim")
    if rotary_dim > q.shape[-1]:
        raise ValueError(f"cos/sin tables {tuple(cos.shape)} rotate more than head_dim {q.shape[-1]} dims")
    c, s = cos[positions].float().unsqueeze(1), sin[positions].float().unsqueeze(1)
    for x in (q, k):
        x1, x2 = x[..., :rotary_dim].float().chunk(2, dim=-1)
        x[..., :rotary_dim].copy_(torch.cat([x1 * c - x2 * s, x2 * c + x1 * s], dim=-1))
    return q, k


def silu_and_mul(x: torch.Tensor) -> torch.Tensor:
    """The gated MLP's activation: x `[T, 2I]` holds gate then up; returns silu(gate) * up."""
    gate, up = x.chunk(2, dim=-1)
    return F.silu(gate) * up


def fused_moe(
    x: torch.Tensor, w13: torch.Tensor, w2: torch.Tensor, topk_weights: torch.Tensor, topk_ids: torch.Tensor,
    fp8_scales: tuple[torch.Tensor, torch.Tensor] | None = None, fp8_groups: tuple[int, int] | None = None,
) -> torch.Tensor:
    """A mixture-of-experts MLP: each token `x [T, H]` through its `K` routed experts, summed by
    weight. `w13 [E, 2I, H]` holds each expert's gate then up projection, `w2 [E, H, I]` its down
    projection; `topk_weights [T, K]` (fp32) and `topk_ids [T, K]` (any int) are the router's.
    out[t] = Σ_k topk_weights[t, k] · w2[e] @ (silu(w13[e, :I] @ x[t]) * (w13[e, I:] @ x[t])),
    e = topk_ids[t, k]: each expert's products in x's dtype, as transformers' experts compute
    them, then weighted and summed over k in fp32 and rounded once.

    One batched product per expert that has tokens, its rows written in expert order and put
    back in token order by one gather (torch's index_add_ on the CPU costs more than the
    products). It reads the routing on the host: not for CUDA graphs, where kernels.triton_moe
    runs. With `fp8_scales`, w13 and w2 are fp8 with scales `[E, rows, groups]` per row and group
    of `fp8_groups` columns (dequantize_fp8's), each expert's dequantized when it runs.
    → `[T, H]` in x's dtype."""
    num_tokens, top_k = topk_ids.shape
    num_experts, inter = w13.shape[0], w2.shape[-1]
    if num_tokens == 0:
        return x.new_zeros(x.shape)
    flat = topk_ids.reshape(-1).long()
    order = flat.argsort(stable=True)  # (token, k) pairs grouped by expert, tokens in order
    weights = topk_weights.reshape(-1)[order].float()
    rows = order // top_k
    by_expert = torch.empty(flat.numel(), x.shape[1], dtype=torch.float32, device=x.device)
    start = 0
    for expert, count in enumerate(torch.bincount(flat, minlength=num_experts).tolist()):
        if not count:
            continue
        end = start + count
        up_weight, down_weight = w13[expert], w2[expert]
        if fp8_scales is not None:
            up_weight = dequantize_fp8(up_weight, fp8_scales[0][expert], fp8_groups[0], x.dtype)
            down_weight = dequantize_fp8(down_weight, fp8_scales[1][expert], fp8_groups[1], x.dtype)
        gate, up = F.linear(x[rows[start:end]], up_weight).split(inter, dim=-1)
        y = F.linear(F.silu(gate) * up, down_weight)
        torch.mul(y.float(), weights[start:end, None], out=by_expert[start:end])
        start = end
    back = torch.empty_like(order)
    back[order] = torch.arange(order.numel(), device=order.device)
    return by_expert.index_select(0, back).view(num_tokens, top_k, -1).sum(1).to(x.dtype)


def dequantize_fp8(weight: torch.Tensor, scale: torch.Tensor, group_size: int, dtype: torch.dtype) -> torch.Tensor:
    """An fp8 (e4m3) weight `[..., N, K]` at `dtype`: each element times its row's scale for its
    group of `group_size` input columns, `scale [..., N, ceil(K / group_size)]` (fp32; the last
    group may be narrower), in fp32 and rounded to `dtype` once, as transformers dequantizes."""
    k, groups = weight.shape[-1], scale.shape[-1]
    values = weight.float()
    if groups * group_size == k:  # whole groups: the scales broadcast over a view
        return (values.unflatten(-1, (groups, group_size)) * scale.unsqueeze(-1)).flatten(-2).to(dtype)
    return (values * scale.repeat_interleave(group_size, dim=-1)[..., :k]).to(dtype)


def fp8_linear(x: torch.Tensor, weight: torch.Tensor, scale: torch.Tensor, group_size: int,
               bias: torch.Tensor | None = None) -> torch.Tensor:
    """A projection over an fp8 weight: x `[..., K]` @ dequantize_fp8(weight `[N, K]`, scale,
    group_size, x's dtype)ᵀ (+ bias `[N]`) → `[..., N]` in x's dtype. The weight is dequantized
    whole for each call: memory holds it in fp8, and only one projection's at a time wider."""
    return F.linear(x, dequantize_fp8(weight, scale, group_size, x.dtype), bias)
