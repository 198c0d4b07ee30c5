"""Async scheduling: step N+1 is scheduled and launched while step N's tokens are still on the
device. The outputs must be those of the synchronous engine, request for request: tokens, text,
logprobs, stop and finish reasons; nothing leaks, and no token is computed past max_tokens."""

from __future__ import annotations

import pytest
import torch

from engine import LLM, SamplingParams
from engine.model_runner import ModelRunner
from engine.sampler import SampledTokens, Sampler, SamplingRow
from tests.conftest import assert_engine_idle
from tests.test_engine import GREEDY, random_prompts


def run(llm: LLM, async_scheduling: bool, prompts, params):
    llm.engine.async_scheduling = async_scheduling
    llm.engine.scheduler.block_manager.reset_prefix_cache()  # each run computes its prompts
    steps, tokens = llm.engine.stats.num_steps, llm.engine.stats.num_batched_tokens
    outputs = llm.generate(prompts, params)
    assert_engine_idle(llm)
    return outputs, llm.engine.stats.num_steps - steps, llm.engine.stats.num_batched_tokens - tokens


def start_async(llm: LLM, prefix: str, prompts, params: SamplingParams):
    """The synchronous engine's outputs for the prompts; then the same requests queued (ids
    prefix0, prefix1, ...) for the async engine to step through."""
    want, _, _ = run(llm, False, prompts, params)
    llm.engine.async_scheduling = True
    for i, prompt in enumerate(prompts):
        llm.engine.add_request(f"{prefix}{i}", prompt, params)
    return want


def drain(engine) -> dict[str, object]:
    """Step until nothing is left; each request's last output by id."""
    results = {}
    while engine.has_unfinished_requests():
        for out in engine.step():
            results[out.request_id] = out
    return results


@pytest.fixture(scope="module")
def default_llm(default_model_dir: str) -> LLM:
    return LLM(default_model_dir, kv_cache_memory_bytes=64 << 20, async_scheduling=True)


def test_every_sampling_feature_matches_the_synchronous_engine(default_llm: LLM) -> None:
    chat = default_llm.get_tokenizer().apply_chat_template([{"role": "user", "content": "Say hi."}],
                                                            tokenize=False, add_generation_prompt=True)
    natural, _, _ = run(default_llm, False, [chat], SamplingParams(max_tokens=60, temperature=0.0))
    n = len(natural[0].outputs[0].token_ids)
    assert natural[0].outputs[0].finish_reason == "stop" and n > 2
    prompts = ["The capital of France is", "Once upon a time", "def add(a, b):", "Water boils at",
               "The best way to learn", "My favourite colour is", "In 1969, the first", chat, "A list of fruits:"]
    params = [
        SamplingParams(max_tokens=12, logprobs=2, **GREEDY),
        SamplingParams(max_tokens=10, temperature=0.8, top_p=0.9, seed=7),
        SamplingParams(max_tokens=8, n=2, temperature=1.0, seed=3, logprobs=1),
        SamplingParams(max_tokens=30, stop=[" is"], **GREEDY),  # a stop string: one surplus token
        SamplingParams(max_tokens=16, min_tokens=6, temperature=0.0),
        SamplingParams(max_tokens=10, repetition_penalty=1.3, presence_penalty=0.5, **GREEDY),  # read the ids in flight
        SamplingParams(max_tokens=4, prompt_logprobs=2, **GREEDY),
        # EOS is allowed exactly when it comes: min_tokens counts the tokens still in flight
        SamplingParams(max_tokens=n + 5, min_tokens=n - 1, temperature=0.0),
        # samples that stop at different steps: the finished ones' surplus tokens are dropped
        SamplingParams(max_tokens=24, n=3, temperature=1.0, seed=11, stop=[",", " and"], logprobs=1),
    ]
    want, _, _ = run(default_llm, False, prompts, params)
    assert want[7].outputs[0].token_ids == natural[0].outputs[0].token_ids
    assert len({len(c.token_ids) for c in want[8].outputs}) > 1 and want[8].outputs[0].finish_reason == "stop"
    have, _, _ = run(default_llm, True, prompts, params)
    assert default_llm.engine._in_flight is None  # generate returns once the last step is taken back
    for a, b in zip(have, want, strict=True):
        assert a.request_id != b.request_id and a.prompt_token_ids == b.prompt_token_ids
        assert a.prompt_logprobs == b.prompt_logprobs or all(
            x.keys() == y.keys() and all(x[t] == pytest.approx(y[t], abs=1e-4) for t in x)
            for x, y in zip(a.prompt_logprobs[1:], b.prompt_logprobs[1:]))
        for ca, cb in zip(a.outputs, b.outputs, strict=True):
            assert (ca.token_ids, ca.text, ca.finish_reason, ca.stop_reason) == \
                (cb.token_ids, cb.text, cb.finish_reason, cb.stop_reason)
            assert (ca.logprobs is None) == (cb.logprobs is None)
            for x, y in zip(ca.logprobs or [], cb.logprobs or [], strict=True):
                assert x.keys() == y.keys() and all(x[t] == pytest.approx(y[t], abs=1e-4) for t in x)
    reasons = {c.finish_reason for o in want for c in o.outputs}
    assert reasons == {"stop", "length"}


@pytest.fixture(scope="module")
def tiny_llm(tiny_checkpoints: dict[str, str]) -> LLM:
    return LLM(tiny_checkpoints["llama"], num_kv_blocks=64, block_size=4, max_num_seqs=4,
               max_num_batched_tokens=32, async_scheduling=True)


def test_steps_overlap_and_compute_no_token_past_max_tokens(tiny_llm: LLM, monkeypatch: pytest.MonkeyPatch) -> None:
    """Decodes read their input from the ids the step in flight sampled; a step's outputs come
    back one step later; length-finished requests cost no surplus token (the synchronous
    engine's count of tokens computed); a stop token costs exactly one."""
    prompts = random_prompts(11, 6, 1, 30)
    params = [SamplingParams(max_tokens=n, **GREEDY) for n in (3, 9, 1, 12, 6, 8)]
    pending_inputs: list[int] = []
    host_inputs = ModelRunner.host_inputs

    def spy(self, batch, previous=None):
        h = host_inputs(self, batch, previous)
        pending_inputs.append(len(h.pending_positions))
        return h

    monkeypatch.setattr(ModelRunner, "host_inputs", spy)
    want, _, sync_tokens = run(tiny_llm, False, prompts, params)
    assert not any(pending_inputs)
    pending_inputs.clear()
    have, _, async_tokens = run(tiny_llm, True, prompts, params)
    assert [o.outputs[0].token_ids for o in have] == [o.outputs[0].token_ids for o in want]
    assert sum(pending_inputs) > 0 and async_tokens == sync_tokens
    assert tiny_llm.engine.scheduler.stats.num_preemptions == 0  # else recomputes would differ

    # The first step (prefills) returns nothing: its tokens are reported by the next one.
    engine = tiny_llm.engine
    engine.add_request("late", prompts[0], SamplingParams(max_tokens=3, **GREEDY))
    assert engine.step() == [] and engine._in_flight is not None
    first = engine.step()
    assert [o.outputs[0].token_ids for o in first] == [want[0].outputs[0].token_ids[:1]]
    while engine.has_unfinished_requests():
        engine.step()
    assert_engine_idle(tiny_llm)

    # A stop token is only seen on the host after the next step was launched: one surplus token.
    stop = want[1].outputs[0].token_ids[4]
    stopping = [SamplingParams(max_tokens=9, stop_token_ids=[stop], **GREEDY)]
    sync, _, sync_tokens = run(tiny_llm, False, prompts[1:2], stopping)
    out, _, async_tokens = run(tiny_llm, True, prompts[1:2], stopping)
    assert out[0].outputs[0].token_ids == sync[0].outputs[0].token_ids == want[1].outputs[0].token_ids[:5]
    assert out[0].outputs[0].stop_reason == stop and async_tokens == sync_tokens + 1


@pytest.mark.parametrize("async_scheduling", [False, True], ids=["sync", "async"])
def test_the_host_waits_for_a_step_only_after_launching_the_next(
        tiny_llm: LLM, monkeypatch: pytest.MonkeyPatch, async_scheduling: bool) -> None:
    """What lets the GPU run while the host works: with async scheduling, step N's tokens are
    waited for only once step N+1's forward and sampling are launched."""
    log: list[str] = []
    execute, output = ModelRunner.execute, SampledTokens.output

    def launch(self, *args, **kwargs):
        log.append("launch")
        return execute(self, *args, **kwargs)

    def wait(self):
        log.append("wait")
        return output(self)

    monkeypatch.setattr(ModelRunner, "execute", launch)
    monkeypatch.setattr(SampledTokens, "output", wait)
    run(tiny_llm, async_scheduling, random_prompts(13, 2, 3, 9), SamplingParams(max_tokens=4, **GREEDY))
    steps = log.count("launch")
    assert log.count("wait") == steps >= 4
    expected = ["launch", "wait"] * steps if not async_scheduling else \
        ["launch"] + ["launch", "wait"] * (steps - 1) + ["wait"]
    assert log == expected


def test_pending_inputs_through_the_packed_copy(tiny_llm: LLM, monkeypatch: pytest.MonkeyPatch) -> None:
    """As on CUDA, where a step's inputs are views of one packed buffer: the pending ids are
    written into the input ids' view."""
    import functools

    from engine import model_runner, transfer

    prompts = random_prompts(15, 4, 1, 20)
    params = SamplingParams(max_tokens=7, logprobs=1, **GREEDY)
    want, _, _ = run(tiny_llm, False, prompts, params)
    monkeypatch.setattr(model_runner, "to_device", functools.partial(transfer.to_device, pack=True))
    have, _, _ = run(tiny_llm, True, prompts, params)
    assert [o.outputs[0].token_ids for o in have] == [o.outputs[0].token_ids for o in want]


def test_a_step_that_fails_to_launch_leaves_the_engine_as_it_was(tiny_llm: LLM,
                                                                  monkeypatch: pytest.MonkeyPatch) -> None:
    engine = tiny_llm.engine
    want = start_async(tiny_llm, "f", random_prompts(14, 3, 2, 12), SamplingParams(max_tokens=6, **GREEDY))
    engine.step()
    engine.step()
    in_flight = engine._in_flight
    execute = ModelRunner.execute

    def fail(self, *args, **kwargs):
        raise RuntimeError("CUDA error: an illegal memory access was encountered")

    monkeypatch.setattr(ModelRunner, "execute", fail)
    with pytest.raises(RuntimeError, match="illegal memory access"):
        engine.step()
    assert engine._in_flight is in_flight  # not taken back: its tokens are not lost
    monkeypatch.setattr(ModelRunner, "execute", execute)
    results = drain(engine)
    assert [results[f"f{i}"].outputs[0].token_ids for i in range(3)] == [w.outputs[0].token_ids for w in want]
    assert_engine_idle(tiny_llm)


def test_abort_with_a_step_in_flight(tiny_llm: LLM) -> None:
    engine = tiny_llm.engine
    want = start_async(tiny_llm, "a", random_prompts(12, 3, 5, 20), SamplingParams(max_tokens=10, **GREEDY))
    for _ in range(3):
        engine.step()
    assert engine._in_flight is not None and "a0" in engine.groups
    aborted = engine.abort_request("a0")
    assert aborted.finished and aborted.outputs[0].finish_reason == "abort"
    results = drain(engine)
    assert "a0" not in results, "the aborted request's token in flight is dropped"
    assert [results[f"a{i}"].outputs[0].token_ids for i in (1, 2)] == [w.outputs[0].token_ids for w in want[1:]]
    assert engine._in_flight is None
    assert_engine_idle(tiny_llm)


def test_sampler_needs_the_pending_ids_for_penalties() -> None:
    params = SamplingParams(repetition_penalty=1.2, temperature=0.0)
    rows = [SamplingRow(params, [4, 5, 6], 2, None, [2], pending_rows=(0,))]
    with pytest.raises(ValueError, match="pending_ids"):
        Sampler()(torch.zeros(1, 8), rows)
    logits = torch.zeros(1, 8)
    logits[0, 3] = 1.0
    logits[0, 4] = 1.1
    # 4 is in the history (1.1 / 1.2 < 1); the pending token decides whether 3 is too
    assert Sampler()(logits, rows, torch.tensor([3])).token_ids == [4]
    assert Sampler()(logits, rows, torch.tensor([7])).token_ids == [3]
