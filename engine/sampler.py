"""Batched sampling: logits processors, greedy / random sampling, logprobs.

One call handles one decode step for a batch of sequences (one logits row each). Stages run
in vLLM's order and each is skipped entirely when no row in the batch needs it, so an
all-greedy batch without penalties costs one argmax:

    min_tokens suppression → repetition penalty → frequency/presence penalties
    → greedy rows: argmax → temperature → top-k → top-p → min-p → sample

Random sampling uses the exponential race (argmax of probs / Exp(1) noise), which draws from
`probs` exactly. A row with its own `torch.Generator` (a seeded request) draws its noise from
that generator alone, so its tokens do not depend on its batch mates or its row index.

Logprobs are computed from the raw logits (before penalties and temperature), as vLLM V1
does by default.
"""

from __future__ import annotations

import itertools
from dataclasses import dataclass

import torch

from engine.sampling_params import SamplingParams

_GREEDY_EPS = 1e-5


@dataclass(slots=True)
class SamplingRow:
    """One row of the logits: a sequence that samples this step."""

    params: SamplingParams
    prompt_token_ids: list[int]
    output_token_ids: list[int]  # generated so far (before this step)
    generator: torch.Generator | None  # set when params.seed is set; else the default RNG
    # suppressed (with params.stop_token_ids) while len(output_token_ids) < params.min_tokens
    eos_token_ids: list[int]


@dataclass(slots=True)
class SamplerOutput:
    token_ids: list[int]  # one per row
    # logprob of the sampled token per row; None if no row asked (rows that didn't: 0.0)
    logprobs: list[float] | None
    # per row, the top-k (token_id, logprob) pairs, best first (k = params.logprobs; [] if not asked)
    top_logprobs: list[list[tuple[int, float]]] | None


def _rows(mask: list[bool], device: torch.device) -> torch.Tensor | None:
    """Indices of the rows where mask holds; None when every row does (use the whole batch)."""
    if all(mask):
        return None
    return torch.tensor([i for i, m in enumerate(mask) if m], dtype=torch.long, device=device)


def _take(x: torch.Tensor, idx: torch.Tensor | None) -> torch.Tensor:
    return x if idx is None else x[idx]


def _put(x: torch.Tensor, idx: torch.Tensor | None, value: torch.Tensor) -> torch.Tensor:
    if idx is None:
        return value
    x[idx] = value
    return x


def _col(values: list[float], device: torch.device) -> torch.Tensor:
    return torch.tensor(values, dtype=torch.float32, device=device).unsqueeze(1)


def _token_pairs(
    seqs: list[list[int]], rows: list[int], vocab: int, device: torch.device
) -> tuple[torch.Tensor, torch.Tensor]:
    """Flattened (row index, token id) pairs of the given sequences: the scatter indices of
    the penalty stages, O(total tokens) instead of O(batch × vocab). Ids outside [0, vocab)
    are dropped."""
    lengths = torch.tensor([len(q) for q in seqs], dtype=torch.long)
    tok = torch.tensor(list(itertools.chain.from_iterable(seqs)), dtype=torch.long)
    row = torch.repeat_interleave(torch.tensor(rows, dtype=torch.long), lengths)
    ok = (tok >= 0) & (tok < vocab)
    return row[ok].to(device), tok[ok].to(device)


def _apply_top_k_top_p(x: torch.Tensor, top_k: list[int], top_p: list[float]) -> torch.Tensor:
    """Mask logits outside each row's top-k, then outside its nucleus (top-p), with -inf.

    One sort; when every row has a top-k, a top-k selection of the k_max best replaces it.
    """
    vocab = x.shape[1]
    ks = [k if 0 < k < vocab else vocab for k in top_k]
    k_max = max(ks)
    if k_max < vocab:
        vals, order = x.topk(k_max, dim=-1)  # sorted, best first
    else:
        vals, order = x.sort(dim=-1, descending=True)
    width = vals.shape[1]
    if any(k < width for k in ks):
        pos = torch.arange(width, device=x.device).unsqueeze(0)
        k_col = torch.tensor(ks, device=x.device).unsqueeze(1)
        vals = vals.masked_fill(pos >= k_col, float("-inf"))
    if any(p < 1.0 for p in top_p):
        probs = vals.softmax(dim=-1)
        before = probs.cumsum(dim=-1) - probs  # probability mass strictly before each token
        p_col = _col(top_p, x.device)
        drop = (before >= p_col) & (p_col < 1.0)  # rows without top-p keep everything
        drop[:, 0] = False  # always keep the best token
        vals = vals.masked_fill(drop, float("-inf"))
    return torch.full_like(x, float("-inf")).scatter_(1, order, vals)


class Sampler:
    """Turns a [B, V] logits tensor and B SamplingRows into B token ids (+ logprobs)."""

    def __call__(self, logits: torch.Tensor, rows: list[SamplingRow]) -> SamplerOutput:
        if logits.dim() != 2 or logits.shape[0] != len(rows):
            raise ValueError(f"logits must be [len(rows)={len(rows)}, V], got {tuple(logits.shape)}")
        batch, vocab = logits.shape
        device = logits.device
        params = [r.params for r in rows]

        # Logprobs come from the raw logits, so take them before anything changes.
        want_lp = [p.logprobs is not None for p in params]
        lp_idx = _rows(want_lp, device) if any(want_lp) else None
        raw_logprobs = _take(logits, lp_idx).float().log_softmax(dim=-1) if any(want_lp) else None

        need_min = [len(r.output_token_ids) < r.params.min_tokens for r in rows]
        need_rep = [p.repetition_penalty != 1.0 for p in params]
        need_freq = [p.frequency_penalty != 0.0 or p.presence_penalty != 0.0 for p in params]
        greedy = [p.temperature < _GREEDY_EPS for p in params]

        modifies = any(need_min) or any(need_rep) or any(need_freq) or not all(greedy)
        x = logits.to(torch.float32, copy=True) if modifies else logits.float()

        # 1. min_tokens: no EOS / stop token until the row has generated min_tokens.
        if any(need_min):
            banned = [
                (i, t)
                for i, r in enumerate(rows)
                if need_min[i]
                for t in itertools.chain(r.eos_token_ids, r.params.stop_token_ids or ())
                if 0 <= t < vocab
            ]
            if banned:
                ri, ti = zip(*banned)
                x[torch.tensor(ri, device=device), torch.tensor(ti, device=device)] = float("-inf")

        # 2. Repetition penalty (HF): over prompt + output tokens, positive logits divided.
        #    Duplicate (row, token) pairs all write the same value, so no dedup is needed.
        if any(need_rep):
            sel = [i for i in range(batch) if need_rep[i]]
            ri, ti = _token_pairs(
                [rows[i].prompt_token_ids + rows[i].output_token_ids for i in sel], sel, vocab, device
            )
            pen = torch.ones(batch, device=device)
            pen[sel] = torch.tensor([params[i].repetition_penalty for i in sel], device=device)
            v, p = x[ri, ti], pen[ri]
            x[ri, ti] = torch.where(v > 0, v / p, v * p)

        # 3. Frequency / presence penalties (OpenAI): over output tokens only.
        if any(need_freq):
            sel = [i for i in range(batch) if need_freq[i]]
            ri, ti = _token_pairs([rows[i].output_token_ids for i in sel], sel, vocab, device)
            freq = torch.zeros(batch, device=device)
            pres = torch.zeros(batch, device=device)
            freq[sel] = torch.tensor([params[i].frequency_penalty for i in sel], device=device)
            pres[sel] = torch.tensor([params[i].presence_penalty for i in sel], device=device)
            x.index_put_((ri, ti), -freq[ri], accumulate=True)  # once per occurrence
            flat = torch.unique(ri * vocab + ti)  # once per distinct token
            ru, tu = flat // vocab, flat % vocab
            x.index_put_((ru, tu), -pres[ru], accumulate=True)

        # 4. Greedy rows: exactly the argmax of the (penalised) logits.
        #    Random rows: x is our own copy here, so the stages below may write into it.
        if all(greedy):
            tokens = x.argmax(dim=-1)
        else:
            rand = [not g for g in greedy]
            idx = _rows(rand, device)
            sel = [i for i in range(batch) if rand[i]]
            sub = self._process(_take(x, idx), [params[i] for i in sel])
            sampled = self._sample(sub, [rows[i].generator for i in sel])
            tokens = sampled if idx is None else _put(x.argmax(dim=-1), idx, sampled)

        token_list = tokens.tolist()
        if raw_logprobs is None:
            return SamplerOutput(token_ids=token_list, logprobs=None, top_logprobs=None)
        return self._logprobs(raw_logprobs, lp_idx, want_lp, tokens, token_list, params)

    @staticmethod
    def _process(x: torch.Tensor, params: list[SamplingParams]) -> torch.Tensor:
        """Temperature, top-k, top-p, min-p for the rows that sample at random."""
        vocab, device = x.shape[1], x.device
        temps = [p.temperature for p in params]
        if any(t != 1.0 for t in temps):
            x = x / _col(temps, device)
        top_k = [p.top_k for p in params]
        top_p = [p.top_p for p in params]
        use_k = any(0 < k < vocab for k in top_k)
        use_p = any(p < 1.0 for p in top_p)
        if use_k or use_p:
            need = [0 < k < vocab or p < 1.0 for k, p in zip(top_k, top_p)]
            idx = _rows(need, device)
            sel = [i for i in range(len(params)) if need[i]]
            sub = _apply_top_k_top_p(_take(x, idx), [top_k[i] for i in sel], [top_p[i] for i in sel])
            x = _put(x, idx, sub)
        min_p = [p.min_p for p in params]
        if any(m > 0.0 for m in min_p):
            need = [m > 0.0 for m in min_p]
            idx = _rows(need, device)
            sub = _take(x, idx)
            probs = sub.softmax(dim=-1)
            thresh = probs.amax(dim=-1, keepdim=True) * _col([m for m in min_p if m > 0.0], device)
            x = _put(x, idx, sub.masked_fill(probs < thresh, float("-inf")))
        return x

    @staticmethod
    def _sample(x: torch.Tensor, generators: list[torch.Generator | None]) -> torch.Tensor:
        """Exponential race: argmax(probs / q), q ~ Exp(1) i.i.d., samples from probs."""
        n, vocab = x.shape
        probs = x.softmax(dim=-1)
        shared = [i for i, g in enumerate(generators) if g is None]
        if len(shared) == n:
            q = torch.empty_like(probs).exponential_()
        else:
            q = torch.empty_like(probs)
            if shared:
                noise = torch.empty(len(shared), vocab, device=x.device).exponential_()
                q[torch.tensor(shared, device=x.device)] = noise
            for i, g in enumerate(generators):
                if g is None:
                    continue
                if g.device == q.device:  # same draws as torch.empty(V).exponential_(generator=g)
                    q[i].exponential_(generator=g)
                else:  # e.g. a CPU generator for CUDA logits: draw where the generator lives
                    q[i].copy_(torch.empty(vocab, device=g.device).exponential_(generator=g))
        # q == 0 would turn a masked token (p == 0) into NaN, which argmax would pick.
        q.clamp_(min=torch.finfo(torch.float32).tiny)
        return probs.div_(q).argmax(dim=-1)

    @staticmethod
    def _logprobs(
        raw: torch.Tensor,
        lp_idx: torch.Tensor | None,
        want: list[bool],
        tokens: torch.Tensor,
        token_list: list[int],
        params: list[SamplingParams],
    ) -> SamplerOutput:
        sel = [i for i, w in enumerate(want) if w]
        chosen = raw.gather(1, _take(tokens, lp_idx).unsqueeze(1)).squeeze(1).tolist()
        logprobs = [0.0] * len(token_list)
        top: list[list[tuple[int, float]]] = [[] for _ in token_list]
        k_max = min(max(params[i].logprobs or 0 for i in sel), raw.shape[1])
        if k_max > 0:
            vals, ids = raw.topk(k_max, dim=-1)
            vals_l, ids_l = vals.tolist(), ids.tolist()
        for j, i in enumerate(sel):
            logprobs[i] = chosen[j]
            k = params[i].logprobs or 0
            if k > 0:
                top[i] = list(zip(ids_l[j][:k], vals_l[j][:k]))
        return SamplerOutput(token_ids=token_list, logprobs=logprobs, top_logprobs=top)
