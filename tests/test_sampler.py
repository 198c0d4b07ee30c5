"""Sampler: greedy exactness, penalties against a naive reference, filters, seeds, logprobs."""

from __future__ import annotations

import math
import random

import numpy as np
import pytest
import torch

from engine.sampler import Sampler, SamplerOutput, SamplingRow
from engine.sampling_params import SamplingParams

sampler = Sampler()


def row(
    params: SamplingParams | None = None,
    prompt: list[int] | None = None,
    output: list[int] | None = None,
    generator: torch.Generator | None = None,
    eos: list[int] | None = None,
) -> SamplingRow:
    return SamplingRow(
        params=params or SamplingParams(),
        token_ids=list(prompt or []) + list(output or []),
        num_prompt_tokens=len(prompt or []),
        generator=generator,
        eos_token_ids=list(eos or []),
    )


def naive_penalised(logits: torch.Tensor, r: SamplingRow) -> torch.Tensor:
    """Per-row, per-token reference: min_tokens, logit bias, repetition (HF), frequency/presence
    (OpenAI)."""
    x = logits.clone().float()
    p = r.params
    output = r.token_ids[r.num_prompt_tokens:]
    if len(output) < p.min_tokens:
        for t in list(r.eos_token_ids) + list(p.stop_token_ids):
            x[t] = float("-inf")
    for t, bias in (p.logit_bias or {}).items():
        x[t] += bias
    if p.repetition_penalty != 1.0:
        for t in set(r.token_ids[:r.num_prompt_tokens]) | set(output):
            x[t] = x[t] / p.repetition_penalty if x[t] > 0 else x[t] * p.repetition_penalty
    for t in set(output):
        c = output.count(t)
        x[t] -= p.frequency_penalty * c + p.presence_penalty
    return x


def test_greedy_is_argmax_any_dtype():
    g = torch.Generator().manual_seed(0)
    logits = torch.randn(8, 100, generator=g)
    rows = [row(SamplingParams(temperature=0.0)) for _ in range(8)]
    out = sampler(logits, rows)
    assert isinstance(out, SamplerOutput)
    assert out.token_ids == logits.argmax(-1).tolist()
    assert out.logprobs is None and out.top_logprobs is None
    half = logits.to(torch.bfloat16)
    assert sampler(half, rows).token_ids == half.float().argmax(-1).tolist()
    # the caller's logits are never modified
    before = logits.clone()
    sampler(logits, [row(SamplingParams(temperature=0.7, repetition_penalty=1.3), prompt=[1, 2])] * 8)
    sampler(logits, [row(SamplingParams(top_k=3))] * 4 + [row(SamplingParams(min_p=0.2))] * 4)
    sampler(logits, [row(SamplingParams(temperature=0.0, min_tokens=1), eos=[0])] * 8)
    assert torch.equal(logits, before)


def test_penalties_match_naive_reference():
    rng = random.Random(1)
    V = 24
    for trial in range(60):
        B = rng.randint(1, 6)
        logits = torch.randn(B, V, generator=torch.Generator().manual_seed(trial)) * 3
        rows = []
        for _ in range(B):
            params = SamplingParams(
                temperature=0.0,
                max_tokens=64,
                min_tokens=rng.choice([0, 0, 3, 10]),
                repetition_penalty=rng.choice([1.0, 1.0, 0.7, 1.5, 2.0]),
                frequency_penalty=rng.choice([0.0, 0.0, 0.5, -1.0, 2.0]),
                presence_penalty=rng.choice([0.0, 0.0, 1.0, -0.5]),
                stop_token_ids=rng.sample(range(V), rng.randint(0, 2)),
                logit_bias=rng.choice([None, None, {str(t): rng.uniform(-100, 100) for t in rng.sample(range(V), 3)},
                                       {t: rng.uniform(-4, 4) for t in rng.sample(range(V), rng.randint(1, V))}]),
            )
            prompt = [rng.randrange(V) for _ in range(rng.randint(0, 12))]
            output = [rng.randrange(V) for _ in range(rng.randint(0, 12))]
            rows.append(row(params, prompt, output, eos=[rng.randrange(V)]))
        want = [int(naive_penalised(logits[i], r).argmax()) for i, r in enumerate(rows)]
        assert sampler(logits, rows).token_ids == want, trial
        # Async scheduling: a row's last output tokens still on the device, in pending_ids (among
        # other rows' tokens); min_tokens counts them and the penalties read them there.
        pending_ids: list[int] = [rng.randrange(V)]
        in_flight = []
        for r in rows:
            k = rng.randint(0, min(2, r.num_output_tokens))
            known = r.token_ids[:len(r.token_ids) - k]
            at = tuple(range(len(pending_ids), len(pending_ids) + k))
            pending_ids += r.token_ids[len(known):] + [rng.randrange(V)]
            in_flight.append(SamplingRow(r.params, known, r.num_prompt_tokens, None, r.eos_token_ids, pending_rows=at))
        assert sampler(logits, in_flight, torch.tensor(pending_ids)).token_ids == want, trial


def test_penalties_over_growing_histories_kept_between_steps():
    """Rows with a key: the sampler keeps each history as a tensor and converts only the new
    tokens. Over steps in which sequences grow, leave the batch and come back (and one is
    replaced by a shorter sequence under the same key), every step equals the reference."""
    rng = random.Random(5)
    V = 32
    s = Sampler()  # one sampler across steps, as the engine has
    params = SamplingParams(temperature=0.0, repetition_penalty=1.6, frequency_penalty=0.7, presence_penalty=0.4)
    seqs = {k: [rng.randrange(V) for _ in range(rng.randint(1, 6))] for k in "abcd"}
    for step in range(12):
        keys = [k for k in "abcd" if (step + ord(k)) % 4]  # each key sits out every fourth step
        if step == 7:
            seqs["b"] = seqs["b"][:2]  # shorter than what was kept: rebuilt
        logits = torch.randn(len(keys), V, generator=torch.Generator().manual_seed(step)) * 2
        rows = [SamplingRow(params, seqs[k], 2 if len(seqs[k]) > 2 else 0, None, [], key=k) for k in keys]
        want = [int(naive_penalised(logits[i], r).argmax()) for i, r in enumerate(rows)]
        got = s(logits, rows).token_ids
        assert got == want, step
        for k, t in zip(keys, got):
            seqs[k].append(t)  # the engine appends to the same list


def test_kept_histories_equal_the_sequences():
    """The sampler's kept history arrays, through growth past their buffers, a step without
    the row, and a shorter sequence under the same key: always the prompt's distinct tokens,
    then the outputs with their repeats."""
    from engine.sampler import _Histories

    def expected(seq: list[int], num_prompt: int) -> tuple[list[int], int]:
        prompt = sorted(set(seq[:num_prompt]))
        return prompt + seq[num_prompt:], len(prompt)

    def got(tokens: np.ndarray, d: int) -> tuple[list[int], int]:
        """The prompt's distinct tokens come in no particular order."""
        return sorted(tokens[:d].tolist()) + tokens[d:].tolist(), d

    histories = _Histories()
    rng = random.Random(6)
    num_prompt = 12
    seq = [rng.randrange(8) for _ in range(num_prompt + 1)]  # a prompt that repeats itself
    for step in range(40):
        if step == 25:
            seq = seq[:num_prompt + 2]
        if step % 7 != 3:
            row = SamplingRow(SamplingParams(), seq, num_prompt, None, [], key="k")
            for _ in range(2):  # asked twice in a step: the same
                assert got(*histories.tokens(row)) == expected(seq, num_prompt), step
        histories.end_step()
        seq.append(rng.randrange(8))
    no_key = SamplingRow(SamplingParams(), [7, 8, 7, 9], 3, None, [])
    assert got(*histories.tokens(no_key)) == ([7, 8, 9], 2)


def test_repetition_penalty_signs():
    logits = torch.tensor([[2.0, -1.0, 1.5, -3.0]])
    # token 0 (positive) is divided: 2/2 = 1 < 1.5; so greedy moves to token 2
    r = row(SamplingParams(temperature=0.0, repetition_penalty=2.0), prompt=[0])
    assert sampler(logits, [r]).token_ids == [2]
    # a negative logit is multiplied (pushed further down), never lifted
    logits = torch.tensor([[-1.0, -1.2, -5.0]])
    r = row(SamplingParams(temperature=0.0, repetition_penalty=1.5), output=[0])
    assert sampler(logits, [r]).token_ids == [1]


def test_frequency_penalty_uses_output_only():
    logits = torch.tensor([[3.0, 2.5, 0.0]])
    in_prompt = row(SamplingParams(temperature=0.0, frequency_penalty=2.0), prompt=[0, 0, 0])
    in_output = row(SamplingParams(temperature=0.0, frequency_penalty=2.0), output=[0])
    assert sampler(logits, [in_prompt]).token_ids == [0]
    assert sampler(logits, [in_output]).token_ids == [1]


def test_top_k_1_and_tiny_top_p_are_greedy():
    g = torch.Generator().manual_seed(3)
    logits = torch.randn(16, 200, generator=g)
    want = logits.argmax(-1).tolist()
    for params in (SamplingParams(temperature=1.5, top_k=1), SamplingParams(temperature=1.5, top_p=1e-6)):
        for _ in range(5):
            rows = [row(params, generator=torch.Generator().manual_seed(i) if i % 2 else None) for i in range(16)]
            assert sampler(logits, rows).token_ids == want


def test_top_k_top_p_min_p_keep_only_allowed_tokens():
    torch.manual_seed(0)
    logits = torch.tensor([4.0, 3.5, 3.0, 1.0, 0.0, -1.0, -2.0, -3.0])
    probs = logits.softmax(-1)
    n = 4000
    cases = [
        (SamplingParams(top_k=3), {0, 1, 2}),
        # top_p keeps the tokens whose probability mass strictly before them is < top_p
        (SamplingParams(top_p=0.8), {i for i in range(8) if float(probs[:i].sum()) < 0.8}),
        (SamplingParams(min_p=0.3), {i for i in range(8) if float(probs[i]) >= 0.3 * float(probs.max())}),
        (SamplingParams(top_k=5, top_p=0.8, temperature=0.5), None),  # checked below
        # vLLM V1's order: min-p first, then top-p over what it left. top-p first would keep
        # token 2 (the mass before it, 0.8, is below 0.85), and min-p (0.08 >= 0.05) too.
        (SamplingParams(min_p=0.1, top_p=0.85), {0, 1}, torch.tensor([0.5, 0.3, 0.08] + [0.01] * 12).log()),
    ]
    for params, allowed, *own_logits in cases:
        if allowed is None:  # temperature first, then top-k, then top-p on what is left
            p = (logits / 0.5)[:5].softmax(-1)
            allowed = {i for i in range(5) if float(p[:i].sum()) < 0.8}
        out = sampler((own_logits or [logits])[0].expand(n, -1), [row(params)] * n).token_ids
        seen = set(out)
        assert seen <= allowed, (params, seen, allowed)
        assert seen == allowed, (params, seen, allowed)  # every allowed token still sampled
    assert len(cases[1][1]) == 3 and len(cases[2][1]) == 3


def test_min_tokens_suppresses_eos_and_stop_ids():
    logits = torch.tensor([[0.0, 10.0, 9.0, 1.0], [0.0, 10.0, 9.0, 1.0], [0.0, 10.0, 9.0, 1.0]])
    params = SamplingParams(temperature=0.0, min_tokens=2, stop_token_ids=[2])
    rows = [
        row(params, output=[], eos=[1]),  # both eos (1) and stop id (2) banned → 3
        row(params, output=[3], eos=[1]),  # still < min_tokens
        row(params, output=[3, 3], eos=[1]),  # reached min_tokens → eos allowed
    ]
    assert sampler(logits, rows).token_ids == [3, 3, 1]
    # random sampling never emits them either
    rows = [row(SamplingParams(min_tokens=5, stop_token_ids=[2]), eos=[1])] * 500
    out = sampler(logits[0].expand(500, -1), rows).token_ids
    assert not {1, 2} & set(out)


def test_logit_bias_forces_and_bans_tokens():
    """OpenAI's semantics: +100 makes a token all but certain, -100 all but impossible, at any
    temperature; it moves the sampled distribution, not the logprobs (taken from the raw
    logits, as vLLM does); rows without a bias are untouched."""
    logits = torch.randn(4, 50, generator=torch.Generator().manual_seed(3))
    force = SamplingParams(temperature=1.0, logit_bias={"7": 100}, logprobs=0)
    ban = SamplingParams(temperature=0.0, logit_bias={str(int(logits[1].argmax())): -100})
    rows = [row(force), row(ban), row(SamplingParams(temperature=0.0)), row(force)]
    out = sampler(logits, rows)
    assert out.token_ids[0] == out.token_ids[3] == 7
    assert out.token_ids[1] == int(logits[1].topk(2).indices[1])  # the runner-up
    assert out.token_ids[2] == int(logits[2].argmax())
    assert out.logprobs[0] == pytest.approx(float(logits[0].log_softmax(-1)[7]), abs=1e-5)
    # vLLM's rank of the sampled token: the tokens at least as likely, itself included
    assert out.ranks[0] == int((logits[0] >= logits[0][7]).sum()) > 1 and out.ranks[1] == 0
    draws = sampler(logits[0].expand(400, -1), [row(SamplingParams(logit_bias={3: -100, 4: -100}))] * 400)
    assert not {3, 4} & set(draws.token_ids)
    assert torch.equal(logits, torch.randn(4, 50, generator=torch.Generator().manual_seed(3)))  # unmodified


def test_logit_bias_validated():
    assert SamplingParams(logit_bias={"12": 5, 3: -1.5}).logit_bias == {12: 5.0, 3: -1.5}
    for bad in ({"x": 1}, {"1.5": 1}, {"-1": 1}, {"1": 101}, {"1": float("nan")}, {True: 1}, {"1": "2"}, [1],
                {str(2**63): 1}, {2**64: 1}):  # past int64: raised OverflowError
        with pytest.raises(ValueError, match="^logit_bias"):
            SamplingParams(logit_bias=bad)
    SamplingParams(logit_bias={"49": 1}).check_vocab(50)
    with pytest.raises(ValueError, match="^logit_bias"):
        SamplingParams(logit_bias={"50": 1}).check_vocab(50)


def _seeded_run(seed: int, position: int, mates: int, steps: int = 12) -> list[int]:
    """Sample `steps` tokens for one seeded request at `position` in a batch with mates."""
    V = 64
    gen = torch.Generator().manual_seed(seed)
    params = SamplingParams(temperature=0.9, top_p=0.95, seed=seed)
    mate_rng = random.Random(position * 100 + mates)
    tokens: list[int] = []
    for step in range(steps):
        logits = torch.randn(mates + 1, V, generator=torch.Generator().manual_seed(1000 + step))
        mine = torch.randn(V, generator=torch.Generator().manual_seed(step))
        rows = []
        for j in range(mates):
            mp = SamplingParams(
                temperature=mate_rng.choice([0.0, 0.5, 1.0]),
                top_k=mate_rng.choice([0, 5]),
                seed=mate_rng.choice([None, 7]),
            )
            mg = torch.Generator().manual_seed(7) if mp.seed is not None else None
            rows.append(row(mp, generator=mg))
        rows.insert(position, row(params, output=list(tokens), generator=gen))
        logits[position] = mine
        tokens.append(sampler(logits, rows).token_ids[position])
    return tokens


def test_seeded_row_independent_of_batch():
    alone = _seeded_run(seed=42, position=0, mates=0)
    assert len(set(alone)) > 1  # it really samples
    for position, mates in [(0, 3), (2, 3), (5, 5), (1, 7)]:
        torch.manual_seed(position)  # the default RNG state must not matter either
        assert _seeded_run(seed=42, position=position, mates=mates) == alone
    assert _seeded_run(seed=43, position=0, mates=0) != alone


def test_temperature_sampling_distribution():
    torch.manual_seed(1234)
    logits = torch.tensor([1.0, 0.5, 0.0, -0.5, -1.0, 2.0])
    temp = 0.7
    n = 30000
    out = sampler(logits.expand(n, -1), [row(SamplingParams(temperature=temp))] * n).token_ids
    counts = torch.bincount(torch.tensor(out), minlength=6).double()
    expected = (logits.double() / temp).softmax(-1) * n
    chi2 = float(((counts - expected) ** 2 / expected).sum())
    assert chi2 < 25.0, (chi2, counts.tolist(), expected.tolist())  # df = 5; p ≈ 1e-4
    # seeded generators give the same distribution
    gens = [torch.Generator().manual_seed(i) for i in range(2000)]
    out = sampler(logits.expand(2000, -1), [row(SamplingParams(temperature=temp), generator=g) for g in gens])
    counts = torch.bincount(torch.tensor(out.token_ids), minlength=6).double()
    expected = (logits.double() / temp).softmax(-1) * 2000
    assert float(((counts - expected) ** 2 / expected).sum()) < 25.0


def test_logprobs_from_raw_logits_and_topk_order():
    g = torch.Generator().manual_seed(5)
    logits = torch.randn(4, 50, generator=g) * 2
    raw = logits.log_softmax(-1)
    rows = [
        row(SamplingParams(temperature=0.0, logprobs=5, repetition_penalty=1.8), prompt=list(range(10))),
        row(SamplingParams(temperature=0.8, logprobs=0)),
        row(SamplingParams(temperature=0.8)),  # no logprobs asked
        row(SamplingParams(temperature=1.3, logprobs=3, top_k=10, frequency_penalty=1.0), output=[1, 2, 2]),
    ]
    out = sampler(logits, rows)
    assert out.logprobs is not None and out.top_logprobs is not None
    for i in (0, 1, 3):
        tok = out.token_ids[i]
        assert out.logprobs[i] == pytest.approx(float(raw[i, tok]), abs=1e-5)
    assert out.top_logprobs[1] == [] and out.top_logprobs[2] == []
    for i, k in ((0, 5), (3, 3)):
        top = out.top_logprobs[i]
        assert len(top) == k
        vals, ids = raw[i].topk(k)
        assert [t for t, _ in top] == ids.tolist()
        assert [v for _, v in top] == pytest.approx(vals.tolist(), abs=1e-5)
        assert all(top[j][1] >= top[j + 1][1] for j in range(k - 1))
        assert all(isinstance(t, int) and not math.isnan(v) for t, v in top)


def test_mixed_batch_greedy_rows_stay_exact():
    g = torch.Generator().manual_seed(9)
    logits = torch.randn(6, 80, generator=g)
    rows = [
        row(SamplingParams(temperature=0.0)),
        row(SamplingParams(temperature=1.0, top_k=4)),
        row(SamplingParams(temperature=0.0, presence_penalty=1.0), output=[int(logits[2].argmax())]),
        row(SamplingParams(temperature=0.5, min_p=0.1)),
        row(SamplingParams(temperature=0.0)),
        row(SamplingParams(temperature=2.0, top_p=0.5)),
    ]
    out = sampler(logits, rows).token_ids
    assert out[0] == int(logits[0].argmax())
    assert out[2] == int(naive_penalised(logits[2], rows[2]).argmax())
    assert out[4] == int(logits[4].argmax())
    assert all(0 <= t < 80 for t in out)
