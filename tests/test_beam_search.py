"""Beam search: transformers' `generate(num_beams=...)` sequences and scores, token for token, and
the engine's books after it (forks, held beams, preemption, aborts, admission)."""

from __future__ import annotations

import json
import os
import random
import shutil

import pytest
import torch

from engine import LLM, SamplingParams
from engine.beam_search import BeamSearch, BeamSearchParams
from scheduler import Request, Scheduler, SchedulerConfig
from scheduler.request import AdmissionError
from tests.conftest import assert_engine_idle, hf_beams

# In the tiny model's top 8 at about one position in ten: searches meet it often.
FREQUENT = (43, 119)


def _prompts(seed: int, count: int) -> list[list[int]]:
    rng = random.Random(seed)
    return [[rng.randrange(3, 500) for _ in range(rng.randrange(3, 40))] for _ in range(count)]


@pytest.fixture(scope="module")
def ends_often(tiny_checkpoints: dict[str, str], tmp_path_factory: pytest.TempPathFactory) -> str:
    """The tiny llama with end tokens the searches meet (its own, 2, hardly ever is)."""
    path = str(tmp_path_factory.mktemp("beams") / "llama")
    shutil.copytree(tiny_checkpoints["llama"], path)
    for name in ("config.json", "generation_config.json"):
        file = os.path.join(path, name)
        if os.path.exists(file):
            with open(file) as f:
                config = json.load(f)
            config["eos_token_id"] = list(FREQUENT)
            with open(file, "w") as f:
                json.dump(config, f)
    return path


def _score(tokens: list[int], cumulative_logprob: float, length_penalty: float) -> float:
    return cumulative_logprob / len(tokens) ** length_penalty


@pytest.fixture(scope="module")
def searcher(ends_often: str) -> LLM:
    return LLM(ends_often, seed=0, num_kv_blocks=512)


@pytest.fixture(scope="module")
def hf_model(ends_often: str):
    import transformers

    return transformers.AutoModelForCausalLM.from_pretrained(ends_often, dtype=torch.float32).eval()


@pytest.mark.parametrize("width, length_penalty, early_stopping, ignore_eos", [
    (4, 1.0, False, False),
    (3, 0.5, "never", False),
    (4, 1.0, True, False),
    (3, 2.0, False, False),
    (2, 1.0, False, True),
    (1, 1.0, False, False),
    (1, 2.0, "never", False),  # one beam is greedy search to transformers, whatever early_stopping says
    (5, -0.5, "never", False),
])
def test_sequences_and_scores_are_transformers(searcher: LLM, hf_model, width: int, length_penalty: float,
                                               early_stopping, ignore_eos: bool) -> None:
    params = BeamSearchParams(beam_width=width, max_tokens=14, length_penalty=length_penalty,
                              early_stopping=early_stopping, ignore_eos=ignore_eos)
    prompts = _prompts(width, 5)
    outputs = searcher.beam_search([{"prompt_token_ids": p} for p in prompts], params)
    ended = 0
    for prompt, output in zip(prompts, outputs):
        expected, scores = hf_beams(hf_model, prompt, params, None if ignore_eos else list(FREQUENT))
        got = [s.tokens[len(prompt):] for s in output.sequences]
        assert got == expected, prompt
        ours = [_score(t, s.cum_logprob, length_penalty) for t, s in zip(got, output.sequences)]
        if scores is not None:
            # fp32 logprobs summed over up to 14 tokens (length_penalty -0.5 scales the sum up):
            # a few ulps of a score near -90 is 1e-5 of it; an AMD EPYC's BLAS differed by 1.1e-6.
            assert ours == pytest.approx(scores, abs=1e-4, rel=1e-5)
        for tokens, sequence in zip(got, output.sequences):
            assert sequence.tokens[:len(prompt)] == prompt
            by_token = not ignore_eos and tokens[-1] in FREQUENT
            ended += by_token
            assert sequence.finish_reason == ("stop" if by_token else "length")
            # each token's logprob is in its step's 2 x width logprobs, and they add up
            assert len(sequence.logprobs) == len(tokens)
            assert sum(entry[t].logprob for entry, t in zip(sequence.logprobs, tokens)) == \
                pytest.approx(sequence.cum_logprob, abs=1e-5)
            assert all(len(entry) == min(2 * width, 512) for entry in sequence.logprobs)
    # a larger length penalty favours the longest, which run to the end; one beam rarely meets them
    if not ignore_eos and length_penalty <= 1.0 and width > 1:
        assert ended, "no sequence ended with an end token: the test would not cover them"
    assert_engine_idle(searcher)


def test_the_default_model_searches_as_transformers(default_model_dir: str) -> None:
    import transformers

    llm = LLM(default_model_dir, seed=0, num_kv_blocks=256)
    tokenizer = llm.get_tokenizer()
    model = transformers.AutoModelForCausalLM.from_pretrained(default_model_dir, dtype=torch.float32).eval()
    params = BeamSearchParams(beam_width=3, max_tokens=10)
    prompts = ["The capital of France is", "def fibonacci(n):"]
    outputs = llm.beam_search(prompts, params)
    eos = list(llm.engine.eos_token_ids)
    for prompt, output in zip(prompts, outputs):
        ids = tokenizer.encode(prompt)
        expected, _ = hf_beams(model, ids, params, eos)
        assert [s.tokens[len(ids):] for s in output.sequences] == expected
        for sequence in output.sequences:
            out = sequence.tokens[len(ids):]
            shown = out[:-1] if sequence.finish_reason == "stop" else out
            assert sequence.text == tokenizer.decode(shown, skip_special_tokens=True)
    assert_engine_idle(llm)


def _run_together(llm: LLM, searches: list[list[int]], params: BeamSearchParams, others: list[list[int]],
                  other_params: SamplingParams) -> tuple[dict, dict]:
    engine = llm.engine
    for i, prompt in enumerate(searches):
        engine.add_beam_search(f"b{i}", prompt, params)
        if i < len(others):
            engine.add_request(f"g{i}", others[i], other_params)
    for i in range(len(searches), len(others)):
        engine.add_request(f"g{i}", others[i], other_params)
    beams, greedy = {}, {}
    while engine.has_unfinished_requests():
        for output in engine.step(outputs="final"):
            if output.request_id.startswith("b"):
                beams[output.request_id] = [c.token_ids for c in output.outputs]
            else:
                greedy[output.request_id] = output.outputs[0].token_ids
    return beams, greedy


@pytest.mark.parametrize("engine_args", [
    dict(max_num_seqs=6, num_kv_blocks=40, block_size=4),  # forks wait for seats, and preempt for blocks
    dict(max_num_seqs=5, num_kv_blocks=34, block_size=4, scheduling_policy="priority"),
    dict(max_num_seqs=16, num_kv_blocks=64, block_size=8, async_scheduling=True),
    dict(max_num_seqs=8, num_kv_blocks=64, block_size=4, enable_prefix_caching=False, max_num_batched_tokens=24),
])
def test_searches_beside_other_requests_give_their_sequences_alone(ends_often: str, engine_args: dict) -> None:
    params = BeamSearchParams(beam_width=4, max_tokens=10)
    searches, others = _prompts(11, 4), _prompts(12, 6)
    other_params = SamplingParams(max_tokens=12, temperature=0.0, ignore_eos=True)
    alone = LLM(ends_often, seed=0, num_kv_blocks=512)
    expected_beams = [[s.tokens[len(p):] for s in o.sequences]
                      for p, o in zip(searches, alone.beam_search(searches, params))]
    expected_greedy = [o.outputs[0].token_ids for o in alone.generate(others, other_params, use_tqdm=False)]
    llm = LLM(ends_often, seed=0, **engine_args)
    beams, greedy = _run_together(llm, searches, params, others, other_params)
    assert [beams[f"b{i}"] for i in range(len(searches))] == expected_beams
    assert [greedy[f"g{i}"] for i in range(len(others))] == expected_greedy
    if engine_args.get("num_kv_blocks", 512) <= 40:
        assert llm.engine.scheduler.stats.num_preemptions > 0, "the pool was to run short"
    assert_engine_idle(llm)


@pytest.mark.parametrize("prompt_len", [37, 48])  # a partial last block to copy, and none
def test_forks_take_their_parents_kv_and_compute_nothing_twice(searcher: LLM, prompt_len: int) -> None:
    """With seats and blocks free, a fork runs at once with its parent's blocks (the partial
    last one copied): the search computes its prompt once and one token per beam per step."""
    width, max_tokens = 4, 9
    prompt = _prompts(41, 1)[0][:3] * 20
    prompt = prompt[:prompt_len]
    stats = searcher.engine.stats
    before = stats.num_batched_tokens
    searcher.reset_prefix_cache()
    output = searcher.beam_search(prompt, BeamSearchParams(beam_width=width, max_tokens=max_tokens, ignore_eos=True))
    assert stats.num_batched_tokens - before == prompt_len + width * (max_tokens - 1)
    assert len({tuple(s.tokens) for s in output[0].sequences}) == width
    assert_engine_idle(searcher)


def test_concurrency_limit_and_prompt_forms(searcher: LLM) -> None:
    params = BeamSearchParams(beam_width=2, max_tokens=6)
    prompts = _prompts(21, 3)
    together = searcher.beam_search(prompts, params)
    one_at_a_time = searcher.beam_search([{"prompt_token_ids": p} for p in prompts], params, concurrency_limit=1)
    assert [[s.tokens for s in o.sequences] for o in together] == \
        [[s.tokens for s in o.sequences] for o in one_at_a_time]
    single = searcher.beam_search(prompts[0], params)
    assert [s.tokens for s in single[0].sequences] == [s.tokens for s in together[0].sequences]
    with pytest.raises(ValueError, match="concurrency_limit"):
        searcher.beam_search(prompts, params, concurrency_limit=0)
    assert_engine_idle(searcher)


def test_abort_mid_search_returns_every_block(searcher: LLM) -> None:
    engine = searcher.engine
    engine.add_beam_search("search", _prompts(31, 1)[0], BeamSearchParams(beam_width=4, max_tokens=30))
    for _ in range(4):
        engine.step()
    assert len(engine.beam_groups["search"].requests) == 4
    output = engine.abort_request("search")
    # its running beams as far as they got: what it computed, and what a client that left is charged
    assert output.finished and [c.finish_reason for c in output.outputs] == ["abort"] * 4
    assert {len(c.token_ids) for c in output.outputs} == {4}
    assert engine.abort_request("search") is None
    assert_engine_idle(searcher)


def test_searches_that_cannot_run_are_refused_and_change_nothing(ends_often: str) -> None:
    llm = LLM(ends_often, seed=0, max_num_seqs=4, num_kv_blocks=20, block_size=4)
    engine = llm.engine
    with pytest.raises(AdmissionError, match="max_num_seqs") as e:
        engine.add_beam_search("wide", [5, 6, 7], BeamSearchParams(beam_width=5, max_tokens=4))
    assert e.value.code == "beam_width_too_large"
    with pytest.raises(AdmissionError, match="at most 17 max_tokens") as e:  # 4 beams x 5 blocks of their own
        engine.add_beam_search("long", [5, 6, 7], BeamSearchParams(beam_width=4, max_tokens=20))
    assert e.value.code == "kv_cache_too_small"
    with pytest.raises(TypeError, match="BeamSearchParams"):
        engine.add_beam_search("typed", [5, 6, 7], SamplingParams())
    with pytest.raises(ValueError, match="prompt token ids"):
        engine.add_beam_search("vocab", [5, 6, 9999], BeamSearchParams(beam_width=2, max_tokens=4))
    engine.add_beam_search("ok", [5, 6, 7], BeamSearchParams(beam_width=2, max_tokens=4))
    with pytest.raises(ValueError, match="already in flight"):
        engine.add_beam_search("ok", [5, 6, 7], BeamSearchParams(beam_width=2, max_tokens=4))
    with pytest.raises(ValueError, match="already in flight"):
        engine.add_request("ok", [5, 6, 7], SamplingParams(max_tokens=2))
    while engine.has_unfinished_requests():
        engine.step()
    assert_engine_idle(llm)
    # the offline API stops at the end of the context, as generate does
    long = llm.beam_search([5, 6, 7], BeamSearchParams(beam_width=1, max_tokens=5000))
    assert len(long[0].sequences[0].tokens) <= 80


@pytest.mark.parametrize("bad", [
    dict(beam_width=0), dict(max_tokens=0), dict(temperature=-1.0), dict(length_penalty=float("nan")),
    dict(early_stopping="sometimes"), dict(logprobs=9), dict(beam_width=2.5),
])
def test_invalid_params_raise(bad: dict) -> None:
    with pytest.raises(ValueError):
        BeamSearchParams(**{"beam_width": 4, "max_tokens": 8, **bad})


def test_the_search_step_by_step() -> None:
    """A hand-checked search: width 2, end token 9, max 3 tokens, no length penalty."""
    search = BeamSearch(BeamSearchParams(beam_width=2, max_tokens=3, length_penalty=0.0), [9], 3)
    assert search.num_candidates == 4
    # step 1: the likeliest is the end token; it is among the 2 best, so it is a hypothesis
    following = search.step([[(9, -0.1), (5, -0.5), (6, -0.7), (7, -3.0)]])
    assert [(p, b.token_ids) for p, b in following] == [(0, [5]), (0, [6])]
    assert [(b.token_ids, b.score) for b in search.finished] == [([9], -0.1)]
    # step 2: beam 0's end token ranks 3rd: not a hypothesis, and two children of beam 1 go on
    following = search.step([[(9, -0.5), (1, -2.0), (2, -2.1), (3, -2.2)],
                             [(4, -0.01), (8, -0.05), (9, -2.0), (3, -2.3)]])
    assert [(p, b.token_ids) for p, b in following] == [(1, [6, 4]), (1, [6, 8])]
    assert len(search.finished) == 1 and not search.done
    # step 3 reaches max_tokens: the two best candidates finish, by length
    assert search.step([[(1, -0.3), (2, -0.4), (3, -5.0), (4, -6.0)],
                        [(1, -0.2), (2, -5.0), (3, -6.0), (4, -7.0)]]) == []
    assert search.done
    assert [(b.token_ids, round(b.score, 6), b.ended_by_token) for b in search.finished] == \
        [([9], -0.1, True), ([6, 8, 1], -0.95, False)]
    with pytest.raises(ValueError):
        search.step([[(1, -0.1)]])


def test_early_stopping_true_stops_at_width_hypotheses() -> None:
    search = BeamSearch(BeamSearchParams(beam_width=2, max_tokens=10, early_stopping=True), [9], 10)
    search.step([[(5, -0.1), (6, -0.2), (7, -0.3), (8, -0.4)]])
    following = search.step([[(9, -0.1), (5, -3.0), (6, -3.0), (7, -3.0)], [(9, -0.1), (5, -3.0), (6, -3.0), (7, -3.0)]])
    assert following == [] and search.done
    assert [b.token_ids for b in search.finished] == [[5, 9], [6, 9]]


def test_a_fork_runs_though_its_adapter_drains() -> None:
    """Under max_loras=1, a request of another adapter makes the running one drain; the fork of a
    search of the draining adapter still runs (its search holds the adapter, held, until then)."""
    scheduler = Scheduler(SchedulerConfig(max_model_len=64, num_blocks=16, block_size=4, max_num_seqs=2,
                                          policy="priority", max_loras=1))
    parent = Request("a-0", [1, 2, 3], 4, priority=1, lora_id=1, arrival_time=1.0)
    scheduler.add_request(parent)
    scheduler.advance(scheduler.schedule())
    parent.held = True  # its search waits for the fork's logprobs
    fork = Request("a-1", [1, 2, 3], 4, priority=1, lora_id=1, arrival_time=1.0, preempts_later=True)
    fork.token_ids = [1, 2, 3, 9]
    scheduler.add_request(fork)
    scheduler.add_request(Request("b-0", [5, 6], 4, priority=0, lora_id=2, arrival_time=2.0))
    batch = scheduler.schedule()
    assert batch.requests == [fork]
    assert scheduler.draining_lora == 1


def test_a_later_searchs_held_beams_at_their_last_token_give_way(ends_often: str) -> None:
    """A later search's held beams whose pending token is their last still wait for their
    search: an earlier search's beam that needs their room preempts them (a review's hang)."""
    a = [49, 136, 283, 336, 400, 44, 435, 55, 390, 412, 74, 360, 489, 273, 216, 337, 450, 280, 234, 418, 410,
         264, 291, 274, 99, 387, 205, 247]
    b = [8, 472, 27, 171, 300, 181, 55, 285, 247, 153, 401, 51, 42, 471, 109, 161, 406, 403, 414, 210, 147, 288, 87]
    first = BeamSearchParams(beam_width=2, max_tokens=4, ignore_eos=True, early_stopping=True, length_penalty=0.5)
    second = BeamSearchParams(beam_width=3, max_tokens=3, ignore_eos=True, length_penalty=0.5)
    llm = LLM(ends_often, seed=0, max_num_seqs=5, num_kv_blocks=30, block_size=2)
    engine = llm.engine
    engine.add_beam_search("a", a, first)
    outputs = {o.request_id: o for o in engine.step(outputs="final")}
    engine.add_beam_search("b", b, second)
    for _ in range(200):
        if not engine.has_unfinished_requests():
            break
        outputs.update((o.request_id, o) for o in engine.step(outputs="final"))
    assert not engine.has_unfinished_requests(), "the searches wait on each other"
    alone = LLM(ends_often, seed=0, num_kv_blocks=512)
    for request_id, prompt, params in (("a", a, first), ("b", b, second)):
        expected = alone.beam_search([prompt], params)[0].sequences
        assert [c.token_ids for c in outputs[request_id].outputs] == [s.tokens[len(prompt):] for s in expected]
    assert llm.engine.scheduler.stats.num_preemptions > 0
    assert_engine_idle(llm)
