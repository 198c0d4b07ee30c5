"""Batched sampling: logits processors, greedy / random sampling, logprobs.

One call handles one decode step for a batch of sequences (one logits row each). Stages run
in vLLM's order and each is skipped entirely when no row in the batch needs it, so an
all-greedy batch without penalties costs one argmax:

    structured outputs' mask → min_tokens suppression → logit bias → repetition penalty
    → frequency/presence penalties → greedy rows: argmax → temperature → min-p → top-k → top-p → sample

Random sampling uses the exponential race (argmax of probs / Exp(1) noise), which draws from
`probs` exactly. A row with its own `torch.Generator` (a seeded request) draws its noise from
that generator alone, so its tokens do not depend on its batch mates or its row index.

A speculative draft is accepted when its row samples it: against a draft that is one token for
certain, that is rejection sampling exactly (kept with probability p(draft), otherwise drawn
from p without it), and every token keeps its distribution.

Logprobs are computed from the raw logits (before penalties and temperature), as vLLM V1
does by default; for a structured output, after its grammar's mask (as vLLM's).

No host sync per row, on any device: which stages run, and over which rows, is decided on the
host from the SamplingParams alone (never from device values). Every per-row parameter and
index list the stages need is built on the host first and reaches the device in one copy
(`engine.transfer.to_device`); the sampled ids, with the logprobs when asked, come back in one
copy at the end, which `Sampler.sample` leaves in flight (`SampledTokens`): the engine can
prepare and launch the next step before it waits for them. Seeded rows still draw their noise
one row at a time (each from its own generator): kernel launches, not syncs.
"""

from __future__ import annotations

import itertools
from collections.abc import Callable
from dataclasses import dataclass

import numpy as np
import torch

from engine.sampling_params import SamplingParams
from engine.token_masks import unpack_mask
from engine.transfer import HostCopy, to_device

_GREEDY_EPS = 1e-5


@dataclass(slots=True)
class SamplingRow:
    """One row of the logits: a sequence that samples this step."""

    params: SamplingParams
    # The sequence so far, prompt then output, before this step's token. The request's own list,
    # not a copy: copying every row's history every step grows with the output's length.
    token_ids: list[int]
    num_prompt_tokens: int
    generator: torch.Generator | None  # set when params.seed is set; else the default RNG
    # suppressed (with params.stop_token_ids) while num_output_tokens < params.min_tokens
    eos_token_ids: list[int]
    # Earlier tokens sampled but not yet in token_ids (async scheduling): their rows in the
    # `pending_ids` given to Sampler.sample, still on the device. They count towards min_tokens,
    # and the penalties read them there.
    pending_rows: tuple[int, ...] = ()
    # The sequence's identity across steps (the engine's Request): the sampler then keeps its
    # history as an array and converts only the tokens added since (see _Histories).
    key: object = None
    # Structured outputs: the tokens the row's grammar allows, as mask bits on the host (uint8,
    # 8 tokens a byte: engine.token_masks), and whether only end tokens are (min_tokens then
    # yields to the grammar).
    allowed_tokens: torch.Tensor | None = None
    must_end: bool = False
    # Speculative decoding: the row verifies a draft (its token is sampled as any other's; the
    # draft is accepted when they are equal). A seeded row's generator state after its draw is
    # kept (SampledTokens.generator_states): where the draft is refused, the engine winds the
    # generator back to it, so a seeded request draws one noise row per token it keeps, with
    # speculation or without, and samples the same tokens.
    verifies_draft: bool = False

    @property
    def num_output_tokens(self) -> int:
        return len(self.token_ids) + len(self.pending_rows) - self.num_prompt_tokens


@dataclass(slots=True)
class SamplerOutput:
    token_ids: list[int]  # one per row
    # logprob of the sampled token per row; None if no row asked (rows that didn't: 0.0)
    logprobs: list[float] | None
    # per row, the top-k (token_id, logprob) pairs, best first (k = params.logprobs; [] if not asked)
    top_logprobs: list[list[tuple[int, float]]] | None
    # the sampled token's rank per row (1: the likeliest), with logprobs (rows that didn't ask: 0)
    ranks: list[int] | None = None


class _Staged:
    """The step's host tensors by name, sent to the device together (one copy on CUDA)."""

    def __init__(self) -> None:
        self._host: dict[str, torch.Tensor] = {}
        self.dev: dict[str, torch.Tensor] = {}

    def long(self, name: str, values: list[int] | torch.Tensor) -> None:
        self._host[name] = values if isinstance(values, torch.Tensor) else torch.tensor(values, dtype=torch.long)

    def float(self, name: str, values: list[float] | torch.Tensor) -> None:
        self._host[name] = values if isinstance(values, torch.Tensor) else torch.tensor(values, dtype=torch.float32)

    def tensor(self, name: str, values: torch.Tensor) -> None:
        self._host[name] = values

    def send(self, device: torch.device) -> None:
        names = list(self._host)
        self.dev = dict(zip(names, to_device([self._host[n] for n in names], device)))

    def get(self, name: str) -> torch.Tensor | None:
        return self.dev.get(name)

    def col(self, name: str) -> torch.Tensor:
        return self.dev[name].unsqueeze(1)


def _subset(mask: list[bool]) -> list[int] | None:
    """Indices of the rows where mask holds; None when every row does (use the whole batch)."""
    if all(mask):
        return None
    return [i for i, m in enumerate(mask) if m]


def _take(x: torch.Tensor, idx: torch.Tensor | None) -> torch.Tensor:
    return x if idx is None else x[idx]


def _put(x: torch.Tensor, idx: torch.Tensor | None, value: torch.Tensor) -> torch.Tensor:
    if idx is None:
        return value
    x[idx] = value
    return x


class _Histories:
    """The penalised rows' tokens as host arrays: the prompt's distinct tokens, then every
    output token. The repetition penalty needs each token once, and a long prompt repeats
    most of its tokens (8k tokens of English: 1.6k distinct), so the prompt is deduplicated
    once; the outputs keep their repeats (the frequency penalty counts them). For rows with a
    key the arrays are kept from one step to the next, and since a sequence only grows, a step
    converts just the tokens added since its last one: converting every row's whole history
    from Python ints each step took ~26 ms a stage at 256 rows of 1,000 tokens. numpy, not
    torch: a row's step is a few small operations, each ~1 µs in numpy and several in torch (a
    decode step at 256 rows with every penalty: 8.5 → 4.9 ms of host time,
    `benchmarks/host_overhead.py --penalties`)."""

    def __init__(self) -> None:
        # key → (buffer with room to grow, entries in it, the prompt's distinct tokens among
        # them, the sequence's tokens they hold)
        self._kept: dict[object, tuple[np.ndarray, int, int, int]] = {}
        self._used: dict[object, tuple[np.ndarray, int, int, int]] = {}

    def tokens(self, row: SamplingRow) -> tuple[np.ndarray, int]:
        """(the prompt's distinct tokens followed by the output tokens, how many of them are
        the prompt's)."""
        tokens = row.token_ids
        n, num_prompt = len(tokens), row.num_prompt_tokens
        kept = None if row.key is None else self._used.get(row.key) or self._kept.get(row.key)
        if kept is None or kept[3] > n:  # new, or a shorter sequence than the one kept
            # A set, not np.unique: 5x faster at 8k tokens, and np.unique imports numpy.ma on
            # first use, mid-step, leaving the import's reference cycles behind.
            prompt = np.fromiter(set(tokens[:num_prompt]), dtype=np.int64)
            d = prompt.shape[0]
            buf = np.empty(d + 2 * (n - num_prompt) + 16, dtype=np.int64)
            buf[:d] = prompt
            used, have = d, num_prompt
        else:
            buf, used, d, have = kept
        new = n - have
        if used + new > buf.shape[0]:  # outgrown: twice the room, the known tokens kept
            grown = np.empty(2 * (used + new), dtype=np.int64)
            grown[:used] = buf[:used]
            buf = grown
        if new:
            buf[used:used + new] = tokens[have:]
            used += new
        if row.key is not None:
            self._used[row.key] = buf, used, d, n
        return buf[:used], d

    def end_step(self) -> None:
        """Keep the rows this step saw (finished requests fall out)."""
        self._kept, self._used = self._used, {}


def _token_pairs(seqs: list[np.ndarray], rows: list[int], vocab: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Flattened (row index, token id) pairs of the given sequences, on the host: the scatter
    indices of the penalty stages, O(total tokens) instead of O(batch × vocab). Ids outside
    [0, vocab) are dropped."""
    tok = np.concatenate(seqs) if seqs else np.empty(0, dtype=np.int64)
    row = np.repeat(np.asarray(rows, dtype=np.int64), [q.shape[0] for q in seqs])
    if tok.size and not (tok.min() >= 0 and tok.max() < vocab):  # rare: mask the others out
        ok = (tok >= 0) & (tok < vocab)
        row, tok = row[ok], tok[ok]
    return torch.from_numpy(row), torch.from_numpy(tok)


def _stage_pairs(st: _Staged, name: str, rows: list[SamplingRow], sel: list[int], seqs: list[np.ndarray],
                 vocab: int) -> None:
    """The (row, token) pairs of a penalty stage: the known tokens' on the host, and for the
    tokens still on the device, their rows and where they are in pending_ids."""
    ri, ti = _token_pairs(seqs, sel, vocab)
    st.long(f"{name}_rows", ri)
    st.long(f"{name}_tokens", ti)
    pending = [(i, j) for i in sel for j in rows[i].pending_rows]
    if pending:
        st.long(f"{name}_pending_rows", [i for i, _ in pending])
        st.long(f"{name}_pending_at", [j for _, j in pending])


def _stage_biases(st: _Staged, biases: list[tuple[np.ndarray, np.ndarray]], rows: list[int], vocab: int) -> None:
    """The logit-bias stage's (row, token, bias) triples, flattened; ids outside [0, vocab)
    dropped (the engine rejects them at admission)."""
    tok = np.concatenate([t for t, _ in biases])
    val = np.concatenate([v for _, v in biases])
    row = np.repeat(np.asarray(rows, dtype=np.int64), [t.shape[0] for t, _ in biases])
    if tok.max() >= vocab:
        ok = tok < vocab
        row, tok, val = row[ok], tok[ok], val[ok]
    st.long("bias_rows", torch.from_numpy(row))
    st.long("bias_tokens", torch.from_numpy(tok))
    st.float("bias_values", torch.from_numpy(val))


def _pairs(st: _Staged, name: str, pending_ids: torch.Tensor | None) -> tuple[torch.Tensor, torch.Tensor]:
    """A penalty stage's (row, token) index tensors on the device, pending tokens included."""
    ri, ti = st.dev[f"{name}_rows"], st.dev[f"{name}_tokens"]
    at = st.get(f"{name}_pending_at")
    if at is None:
        return ri, ti
    return torch.cat([ri, st.dev[f"{name}_pending_rows"]]), torch.cat([ti, pending_ids[at]])


def top_logprobs_parts(logprobs: torch.Tensor, chosen_ids: torch.Tensor, k: int) -> list[torch.Tensor]:
    """Each row's logprob of its chosen token and that token's rank (as vLLM's: how many tokens
    are at least as likely, itself included; 1 is the likeliest), then (k > 0) its k best
    logprobs and their ids: float64, exact for fp32 values and for ids < 2**53, so they go back
    to the host in one copy with whatever else is concatenated to them; `split_top_logprobs`
    reads them."""
    chosen = logprobs.gather(1, chosen_ids.unsqueeze(1))
    parts = [chosen.squeeze(1).double(), (logprobs >= chosen).sum(dim=1).double()]
    if k > 0:
        values, ids = logprobs.topk(k, dim=-1)
        parts += [values.double().flatten(), ids.double().flatten()]
    return parts


def split_top_logprobs(host: torch.Tensor, n: int, k: int
                       ) -> tuple[list[float], list[int], list[list[float]], list[list[int]]]:
    """`top_logprobs_parts` of n rows, from the start of `host`: (chosen, their ranks, top
    values, top ids)."""
    chosen, ranks = host[:n].tolist(), host[n:2 * n].long().tolist()
    if k == 0:
        return chosen, ranks, [[]] * n, [[]] * n
    values = host[2 * n:2 * n + n * k].view(n, k).tolist()
    ids = host[2 * n + n * k:2 * n + 2 * n * k].long().view(n, k).tolist()
    return chosen, ranks, values, ids


def _apply_top_k_top_p(
    x: torch.Tensor, k_max: int, k_col: torch.Tensor | None, p_col: torch.Tensor | None
) -> torch.Tensor:
    """Mask logits outside each row's top-k (k_col `[n, 1]`, None: no row cuts below k_max),
    then outside its nucleus (p_col `[n, 1]`, None: no row has a top-p), with -inf.

    One sort; when every row has a top-k, a top-k selection of the k_max best replaces it.
    """
    vocab = x.shape[1]
    if k_max < vocab:
        vals, order = x.topk(k_max, dim=-1)  # sorted, best first
    else:
        vals, order = x.sort(dim=-1, descending=True)
    width = vals.shape[1]
    if k_col is not None:
        pos = torch.arange(width, device=x.device).unsqueeze(0)
        vals = vals.masked_fill(pos >= k_col, float("-inf"))
    if p_col is not None:
        probs = vals.softmax(dim=-1)
        before = probs.cumsum(dim=-1) - probs  # probability mass strictly before each token
        drop = (before >= p_col) & (p_col < 1.0)  # rows without top-p keep everything
        drop[:, 0] = False  # always keep the best token
        vals = vals.masked_fill(drop, float("-inf"))
    return torch.full_like(x, float("-inf")).scatter_(1, order, vals)


class SampledTokens:
    """A step's sampled ids on the device, and on their way to the host with the logprobs:
    `token_ids` can feed the next step at once; `output()` waits for the copy back."""

    def __init__(self, token_ids: torch.Tensor, packed: torch.Tensor,
                 unpack: Callable[[torch.Tensor], SamplerOutput]) -> None:
        self.token_ids = token_ids
        self._copy = HostCopy(packed, unpack)
        # batch row → its generator's state after the row's draw (seeded rows that verify drafts)
        self.generator_states: dict[int, torch.Tensor] = {}

    def output(self) -> SamplerOutput:
        return self._copy.result()


class Sampler:
    """Turns a [B, V] logits tensor and B SamplingRows into B token ids (+ logprobs)."""

    def __init__(self) -> None:
        self._histories = _Histories()

    def __call__(self, logits: torch.Tensor, rows: list[SamplingRow],
                 pending_ids: torch.Tensor | None = None) -> SamplerOutput:
        return self.sample(logits, rows, pending_ids).output()

    def sample(self, logits: torch.Tensor, rows: list[SamplingRow],
               pending_ids: torch.Tensor | None = None) -> SampledTokens:
        """Launch the step's sampling; nothing here waits for the device. `pending_ids`: the
        ids the rows' `pending_rows` index (the previous step's, on the device)."""
        if logits.dim() != 2 or logits.shape[0] != len(rows):
            raise ValueError(f"logits must be [len(rows)={len(rows)}, V], got {tuple(logits.shape)}")
        batch, vocab = logits.shape
        params = [r.params for r in rows]

        want_lp = [p.logprobs is not None for p in params]
        need_min = [r.num_output_tokens < r.params.min_tokens and not r.must_end for r in rows]
        guided = [i for i, r in enumerate(rows) if r.allowed_tokens is not None]
        biased = [i for i, p in enumerate(params) if p.logit_bias_arrays is not None]
        need_rep = [p.repetition_penalty != 1.0 for p in params]
        need_freq = [p.frequency_penalty != 0.0 or p.presence_penalty != 0.0 for p in params]
        if pending_ids is None and any(r.pending_rows and (need_rep[i] or need_freq[i]) for i, r in enumerate(rows)):
            raise ValueError("rows with penalties and pending tokens need the pending_ids they index")
        greedy = [p.temperature < _GREEDY_EPS for p in params]
        rand = [i for i in range(batch) if not greedy[i]]

        # ---- host: every index list and per-row value the stages below use, then one copy.
        st = _Staged()
        if guided:
            st.tensor("allowed", torch.stack([rows[i].allowed_tokens for i in guided]))
            if len(guided) < batch:
                st.long("guided_idx", guided)
        lp_rows = _subset(want_lp) if any(want_lp) else None
        if lp_rows is not None:
            st.long("lp_idx", lp_rows)
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
                st.long("ban_rows", list(ri))
                st.long("ban_tokens", list(ti))
        if biased:
            _stage_biases(st, [params[i].logit_bias_arrays for i in biased], biased, vocab)
        if any(need_rep):
            sel = [i for i in range(batch) if need_rep[i]]
            _stage_pairs(st, "rep", rows, sel, [self._histories.tokens(rows[i])[0] for i in sel], vocab)
            st.float("rep", [p.repetition_penalty if need_rep[i] else 1.0 for i, p in enumerate(params)])
        if any(need_freq):
            sel = [i for i in range(batch) if need_freq[i]]
            outputs = [tokens[d:] for tokens, d in map(self._histories.tokens, (rows[i] for i in sel))]
            _stage_pairs(st, "freq", rows, sel, outputs, vocab)
            st.float("freq", [p.frequency_penalty if need_freq[i] else 0.0 for i, p in enumerate(params)])
            st.float("pres", [p.presence_penalty if need_freq[i] else 0.0 for i, p in enumerate(params)])
        self._histories.end_step()
        plan = self._plan_random(st, [params[i] for i in rand], [rows[i].generator for i in rand], vocab)
        if rand and len(rand) < batch:
            st.long("rand_idx", rand)
        # Within the random rows (the plan's indices): the seeded draft rows, and their batch rows.
        plan["keep_states"] = {j: i for j, i in enumerate(rand)
                               if rows[i].verifies_draft and rows[i].generator is not None}
        st.send(logits.device)

        # ---- device: no sync until the one copy back.
        # 0. Structured outputs: what the grammar does not allow is never sampled, and has no
        #    logprob (as vLLM, which applies the grammar's bitmask to the logits first).
        if guided:
            idx = st.get("guided_idx")
            allowed = unpack_mask(st.dev["allowed"], vocab)
            logits = _put(logits.clone() if idx is not None else logits, idx,
                          _take(logits, idx).masked_fill(~allowed, float("-inf")))
        # Logprobs come from the raw logits, so take them before anything changes.
        lp_idx = st.get("lp_idx")
        raw_logprobs = _take(logits, lp_idx).float().log_softmax(dim=-1) if any(want_lp) else None

        modifies = any(need_min) or bool(biased) or any(need_rep) or any(need_freq) or not all(greedy)
        x = logits.to(torch.float32, copy=not guided) if modifies else logits.float()

        # 1. min_tokens: no EOS / stop token until the row has generated min_tokens.
        if st.get("ban_rows") is not None:
            x[st.dev["ban_rows"], st.dev["ban_tokens"]] = float("-inf")

        # 2. Logit bias (OpenAI): each row's (token, bias) pairs are distinct, so one scatter-add.
        if biased:
            x.index_put_((st.dev["bias_rows"], st.dev["bias_tokens"]), st.dev["bias_values"], accumulate=True)

        # 3. Repetition penalty (HF): over prompt + output tokens, positive logits divided.
        #    Duplicate (row, token) pairs all write the same value, so no dedup is needed.
        if any(need_rep):
            ri, ti = _pairs(st, "rep", pending_ids)
            v, p = x[ri, ti], st.dev["rep"][ri]
            x[ri, ti] = torch.where(v > 0, v / p, v * p)

        # 4. Frequency / presence penalties (OpenAI): over output tokens only.
        if any(need_freq):
            ri, ti = _pairs(st, "freq", pending_ids)
            x.index_put_((ri, ti), -st.dev["freq"][ri], accumulate=True)  # once per occurrence
            # Once per distinct token: duplicate pairs all write the same value, as above.
            x[ri, ti] = x[ri, ti] - st.dev["pres"][ri]

        # 5. Greedy rows: exactly the argmax of the (penalised) logits.
        #    Random rows: x is our own copy here, so the stages below may write into it.
        states: dict[int, torch.Tensor] = {}
        if not rand:
            tokens = x.argmax(dim=-1)
        else:
            idx = st.get("rand_idx")
            sub = self._process(_take(x, idx), plan, st)
            sampled = self._sample(sub, plan, st, states)
            tokens = sampled if idx is None else _put(x.argmax(dim=-1), idx, sampled)

        if raw_logprobs is None:
            out = SampledTokens(tokens, tokens, lambda host: SamplerOutput(host.tolist(), None, None))
        else:
            out = self._logprobs(raw_logprobs, lp_idx, want_lp, tokens, params)
        out.generator_states = states
        return out

    @staticmethod
    def _plan_random(st: _Staged, params: list[SamplingParams], generators: list[torch.Generator | None],
                     vocab: int) -> dict:
        """Host half of temperature, top-k, top-p, min-p and the noise of the random rows
        (indices below are within those rows)."""
        plan: dict = {"generators": generators, "top_k_top_p": False, "k_max": vocab}
        if not params:
            return plan
        temps = [p.temperature for p in params]
        if any(t != 1.0 for t in temps):
            st.float("temp", temps)
        top_k = [p.top_k for p in params]
        top_p = [p.top_p for p in params]
        if any(0 < k < vocab for k in top_k) or any(p < 1.0 for p in top_p):
            need = [0 < k < vocab or p < 1.0 for k, p in zip(top_k, top_p)]
            sel = _subset(need)
            if sel is not None:
                st.long("kp_idx", sel)
            sel = sel if sel is not None else list(range(len(params)))
            ks = [top_k[i] if 0 < top_k[i] < vocab else vocab for i in sel]
            plan["top_k_top_p"], plan["k_max"] = True, max(ks)
            if any(k < plan["k_max"] for k in ks):
                st.long("top_k", ks)
            if any(top_p[i] < 1.0 for i in sel):
                st.float("top_p", [top_p[i] for i in sel])
        min_p = [p.min_p for p in params]
        if any(m > 0.0 for m in min_p):
            plan["min_p"] = True
            sel = _subset([m > 0.0 for m in min_p])
            if sel is not None:
                st.long("min_p_idx", sel)
            st.float("min_p", [m for m in min_p if m > 0.0])
        shared = [i for i, g in enumerate(generators) if g is None]
        if 0 < len(shared) < len(generators):
            st.long("shared_idx", shared)
        return plan

    @staticmethod
    def _process(x: torch.Tensor, plan: dict, st: _Staged) -> torch.Tensor:
        """Temperature, min-p, then top-k and top-p over what min-p left (vLLM V1's order)
        for the rows that sample at random."""
        if st.get("temp") is not None:
            x = x / st.col("temp")
        if plan.get("min_p"):
            idx = st.get("min_p_idx")
            sub = _take(x, idx)
            probs = sub.softmax(dim=-1)
            thresh = probs.amax(dim=-1, keepdim=True) * st.col("min_p")
            x = _put(x, idx, sub.masked_fill(probs < thresh, float("-inf")))
        if plan["top_k_top_p"]:
            idx = st.get("kp_idx")
            k_col = st.col("top_k") if st.get("top_k") is not None else None
            p_col = st.col("top_p") if st.get("top_p") is not None else None
            x = _put(x, idx, _apply_top_k_top_p(_take(x, idx), plan["k_max"], k_col, p_col))
        return x

    @staticmethod
    def _sample(x: torch.Tensor, plan: dict, st: _Staged, states: dict[int, torch.Tensor]) -> torch.Tensor:
        """Exponential race: argmax(probs / q), q ~ Exp(1) i.i.d., samples from probs. The
        generator states of plan["keep_states"]'s rows after their draws go into `states`, by
        batch row."""
        generators, keep = plan["generators"], plan["keep_states"]
        n, vocab = x.shape
        probs = x.softmax(dim=-1)
        num_shared = sum(g is None for g in generators)
        if num_shared == n:
            q = torch.empty_like(probs).exponential_()
        else:
            q = torch.empty_like(probs)
            if num_shared:
                noise = torch.empty(num_shared, vocab, device=x.device).exponential_()
                q[st.dev["shared_idx"]] = noise
            for i, g in enumerate(generators):
                if g is None:
                    continue
                if g.device == q.device:  # same draws as torch.empty(V).exponential_(generator=g)
                    q[i].exponential_(generator=g)
                else:  # e.g. a CPU generator for CUDA logits: draw where the generator lives
                    q[i].copy_(torch.empty(vocab, device=g.device).exponential_(generator=g))
                if i in keep:  # a host copy of (seed, offset) on CUDA: no sync
                    states[keep[i]] = g.get_state()
        # q == 0 would turn a masked token (p == 0) into NaN, which argmax would pick.
        q.clamp_(min=torch.finfo(torch.float32).tiny)
        return probs.div_(q).argmax(dim=-1)

    @staticmethod
    def _logprobs(
        raw: torch.Tensor,
        lp_idx: torch.Tensor | None,
        want: list[bool],
        tokens: torch.Tensor,
        params: list[SamplingParams],
    ) -> SampledTokens:
        """Sampled ids, their logprobs and the top-k logprobs, back to the host in one copy
        (as float64: exact for fp32 values and for ids < 2**53)."""
        batch = tokens.shape[0]
        sel = [i for i, w in enumerate(want) if w]
        k_max = min(max(params[i].logprobs or 0 for i in sel), raw.shape[1])
        parts = [tokens.double()] + top_logprobs_parts(raw, _take(tokens, lp_idx), k_max)
        ks = [params[i].logprobs or 0 for i in sel]

        def unpack(host: torch.Tensor) -> SamplerOutput:
            token_list = host[:batch].long().tolist()
            chosen_l, ranks_l, vals_l, ids_l = split_top_logprobs(host[batch:], len(sel), k_max)
            logprobs, ranks = [0.0] * batch, [0] * batch
            top: list[list[tuple[int, float]]] = [[] for _ in range(batch)]
            for j, (i, k) in enumerate(zip(sel, ks)):
                logprobs[i], ranks[i] = chosen_l[j], ranks_l[j]
                if k > 0:
                    top[i] = list(zip(ids_l[j][:k], vals_l[j][:k]))
            return SamplerOutput(token_ids=token_list, logprobs=logprobs, top_logprobs=top, ranks=ranks)

        return SampledTokens(tokens, torch.cat(parts), unpack)
