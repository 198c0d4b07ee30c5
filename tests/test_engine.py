"""The engine end to end on CPU: token equality with transformers, and invariance of the
output under batching, prefix-cache hits, preemption and chunked prefill."""

from __future__ import annotations

import random

import pytest
import torch

from engine import LLM, EngineConfig, LLMEngine, Logprob, SamplingParams
from scheduler import AdmissionError
from tests.conftest import assert_engine_idle, hf_greedy

GREEDY = dict(temperature=0.0, ignore_eos=True)


def random_prompts(seed: int, count: int, lo: int, hi: int, vocab: int = 500) -> list[list[int]]:
    rng = random.Random(seed)
    return [[rng.randrange(3, vocab) for _ in range(rng.randint(lo, hi))] for _ in range(count)]


def token_ids(outputs) -> list[list[int]]:
    return [o.outputs[0].token_ids for o in outputs]


@pytest.mark.parametrize("kind", ["llama", "mistral", "qwen2", "qwen3"])
def test_greedy_matches_transformers_tiny(tiny_checkpoints: dict[str, str], kind: str) -> None:
    path = tiny_checkpoints[kind]
    prompts = random_prompts(1, 4, 1, 40)
    expected = hf_greedy(path, prompts, 16)
    llm = LLM(path, num_kv_blocks=64)
    assert token_ids(llm.generate(prompts, SamplingParams(max_tokens=16, **GREEDY))) == expected
    assert_engine_idle(llm)


@pytest.fixture(scope="module")
def default_llm(default_model_dir: str) -> LLM:
    return LLM(default_model_dir, kv_cache_memory_bytes=256 << 20)


def test_greedy_matches_transformers_default_model(default_llm: LLM, default_model_dir: str) -> None:
    tokenizer = default_llm.get_tokenizer()
    texts = ["The capital of France is", "def fibonacci(n):", "Once upon a time, in a land far away,"]
    prompts = [tokenizer.encode(t) for t in texts]
    expected = hf_greedy(default_model_dir, prompts, 24)
    outputs = default_llm.generate(texts, SamplingParams(max_tokens=24, **GREEDY))
    assert token_ids(outputs) == expected
    assert outputs[0].outputs[0].text == tokenizer.decode(expected[0], skip_special_tokens=True)
    assert_engine_idle(default_llm)


def test_default_model_chat_stops_at_eos(default_llm: LLM) -> None:
    tokenizer = default_llm.get_tokenizer()
    prompt = tokenizer.apply_chat_template([{"role": "user", "content": "What is the capital of France?"}],
                                           tokenize=False, add_generation_prompt=True)
    out = default_llm.generate(prompt, SamplingParams(max_tokens=64, temperature=0.0))[0].outputs[0]
    assert "Paris" in out.text
    assert out.finish_reason == "stop" and out.token_ids[-1] in default_llm.engine.eos_token_ids


def test_chat_renders_the_template_once_without_a_second_bos(default_llm: LLM, tiny_checkpoints) -> None:
    """LLM.chat (vLLM's): each conversation through the chat template, tokenized without
    special tokens (the template wrote them), outputs in conversation order."""
    tokenizer = default_llm.get_tokenizer()
    conversations = [[{"role": "user", "content": "What is the capital of France?"}],
                     [{"role": "system", "content": "Answer in one word."}, {"role": "user", "content": "Hi"}]]
    texts = [tokenizer.apply_chat_template(c, tokenize=False, add_generation_prompt=True) for c in conversations]
    ids = [tokenizer.encode(t, add_special_tokens=False) for t in texts]
    params = SamplingParams(max_tokens=8, **GREEDY)
    chats = default_llm.chat(conversations, params)
    assert [c.prompt for c in chats] == texts and [c.prompt_token_ids for c in chats] == ids
    assert token_ids(chats) == token_ids(default_llm.generate(ids, params))
    assert default_llm.chat(conversations[0], params)[0].outputs[0].token_ids == chats[0].outputs[0].token_ids
    answer = default_llm.chat(conversations[0], SamplingParams(max_tokens=32, temperature=0.0))[0].outputs[0]
    assert "Paris" in answer.text
    cont = default_llm.chat(conversations[0] + [{"role": "assistant", "content": "The capital is"}], params,
                            continue_final_message=True)[0]
    assert cont.prompt.rstrip().endswith("The capital is")
    # chat_template_kwargs may set the named arguments too, as in vLLM.
    bare = default_llm.chat(conversations[0], params, chat_template_kwargs={"add_generation_prompt": False})[0]
    assert bare.prompt == tokenizer.apply_chat_template(conversations[0], tokenize=False, add_generation_prompt=False)
    with pytest.raises(ValueError, match="no chat template"):
        LLM(tiny_checkpoints["llama"], num_kv_blocks=16).chat(conversations[0])
    plain = "{% for m in messages %}{{ m['role'] }}: {{ m['content'] }}\n{% endfor %}assistant:"
    given = default_llm.chat(conversations[1], params, chat_template=plain)[0]
    assert given.prompt == "system: Answer in one word.\nuser: Hi\nassistant:"
    assert given.prompt_token_ids == tokenizer.encode(given.prompt, add_special_tokens=False)
    # tools for the template, and a history's tool calls with their JSON arguments parsed (vLLM's).
    tool_template = ("{% if tools %}tools: {{ tools | map(attribute='function.name') | join(',') }};{% endif %}"
                     "{% for m in messages %}{{ m['role'] }}: {% if m.tool_calls %}"
                     "{{ m.tool_calls[0].function.arguments.city }}{% else %}{{ m['content'] }}{% endif %};"
                     "{% endfor %}")
    call = {"id": "c1", "type": "function", "function": {"name": "weather", "arguments": '{"city": "Paris"}'}}
    history = [{"role": "user", "content": "Weather?"}, {"role": "assistant", "tool_calls": [call]},
               {"role": "tool", "tool_call_id": "c1", "content": "sunny"}]
    tools = [{"type": "function", "function": {"name": "weather", "parameters": {}}}]
    rendered = default_llm.chat(history, params, chat_template=tool_template, tools=tools)[0]
    assert rendered.prompt == "tools: weather;user: Weather?;assistant: Paris;tool: sunny;"
    assert call["function"]["arguments"] == '{"city": "Paris"}', "the caller's messages are left as they were"
    assert_engine_idle(default_llm)


@pytest.fixture(scope="module")
def tiny_path(tiny_checkpoints: dict[str, str]) -> str:
    return tiny_checkpoints["llama"]


@pytest.fixture(scope="module")
def alone(tiny_path: str) -> dict[tuple[int, ...], list[int]]:
    """Each prompt of the mixed set run alone, prefix caching off: the expected outputs."""
    llm = LLM(tiny_path, num_kv_blocks=128, enable_prefix_caching=False)
    prompts = mixed_prompts()
    return {tuple(p): llm.generate([p], SamplingParams(max_tokens=20, **GREEDY))[0].outputs[0].token_ids
            for p in prompts}


def mixed_prompts() -> list[list[int]]:
    shared = random_prompts(7, 1, 40, 40)[0]
    return random_prompts(2, 6, 1, 70) + [shared + p for p in random_prompts(3, 3, 1, 20)]


@pytest.mark.parametrize("engine_args", [
    dict(num_kv_blocks=256),
    dict(num_kv_blocks=256, max_num_batched_tokens=8, max_num_partial_prefills=1),  # chunked prefill
    dict(num_kv_blocks=256, max_num_batched_tokens=32, long_prefill_token_threshold=5),
    dict(num_kv_blocks=14, block_size=8),  # preemption: the pool holds ~2 requests at a time
    dict(num_kv_blocks=40, block_size=4, max_num_seqs=3),
], ids=["batched", "chunked", "long-cap", "preempt", "preempt-small-blocks"])
@pytest.mark.parametrize("async_scheduling", [False, True], ids=["sync", "async"])
def test_batch_invariance(tiny_path: str, alone: dict, engine_args: dict, async_scheduling: bool) -> None:
    llm = LLM(tiny_path, async_scheduling=async_scheduling, **engine_args)
    prompts = mixed_prompts()
    outputs = llm.generate(prompts, SamplingParams(max_tokens=20, **GREEDY))
    assert token_ids(outputs) == [alone[tuple(p)] for p in prompts]
    if engine_args["num_kv_blocks"] < 100:
        assert llm.engine.scheduler.stats.num_preemptions > 0
    assert_engine_idle(llm)


@pytest.mark.parametrize("async_scheduling", [False, True], ids=["sync", "async"])
def test_priority_policy_preempts_for_a_late_urgent_request(tiny_path: str, alone: dict,
                                                            async_scheduling: bool) -> None:
    """Low-priority requests fill the seats; a later urgent one takes a seat at once (a low one
    recomputed later), and every output is the prompt's output run alone."""
    llm = LLM(tiny_path, num_kv_blocks=128, max_num_seqs=3, scheduling_policy="priority",
              async_scheduling=async_scheduling)
    engine, params = llm.engine, SamplingParams(max_tokens=20, **GREEDY)
    prompts = mixed_prompts()
    for i, prompt in enumerate(prompts[:-1]):
        engine.add_request(f"low{i}", prompt, params, priority=5)
    for _ in range(3):
        engine.step()
    engine.add_request("urgent", prompts[-1], params, priority=-1)
    finished = []
    for steps in range(1, 10):  # its first token comes from the next step (async: the one after)
        outputs = engine.step()
        finished += [o for o in outputs if o.finished]
        if any(o.request_id == "urgent" for o in outputs):
            break
    assert steps == 1 + async_scheduling and engine.scheduler.stats.num_preemptions == 1
    while engine.has_unfinished_requests():
        finished += [o for o in engine.step() if o.finished]
    by_id = {o.request_id: o.outputs[0].token_ids for o in finished}
    assert [by_id[f"low{i}"] for i in range(len(prompts) - 1)] + [by_id["urgent"]] == [alone[tuple(p)] for p in prompts]
    assert_engine_idle(llm)
    outputs = llm.generate(prompts[:3], params, priority=[2, 0, 1], use_tqdm=False)  # outputs in prompt order
    assert token_ids(outputs) == [alone[tuple(p)] for p in prompts[:3]]
    with pytest.raises(ValueError, match="3 priorities for 2 prompts"):
        llm.generate(prompts[:2], params, priority=[0, 1, 2])


def test_priority_needs_the_priority_policy(tiny_path: str) -> None:
    llm = LLM(tiny_path, num_kv_blocks=64)
    with pytest.raises(ValueError, match="priority scheduling policy"):
        llm.engine.add_request("r", [1, 2, 3], SamplingParams(max_tokens=2), priority=1)
    with pytest.raises(ValueError, match="priority scheduling policy"):
        llm.generate([[1, 2, 3]], SamplingParams(max_tokens=2), priority=[1])
    assert not llm.engine.has_unfinished_requests()
    assert token_ids(llm.generate([[1, 2, 3]], SamplingParams(max_tokens=2, **GREEDY), priority=[0]))
    with pytest.raises(ValueError, match="scheduling_policy must be one of"):
        LLM(tiny_path, scheduling_policy="shortest-first")


def test_prefix_cache_hits_give_identical_outputs(tiny_path: str, alone: dict) -> None:
    llm = LLM(tiny_path, num_kv_blocks=128, block_size=4)
    prompts = mixed_prompts()[-3:]  # share a 40-token prefix
    first = llm.generate(prompts[:1], SamplingParams(max_tokens=20, **GREEDY))
    rest = llm.generate(prompts[1:], SamplingParams(max_tokens=20, **GREEDY))
    assert token_ids(first + rest) == [alone[tuple(p)] for p in prompts]
    assert [o.num_cached_tokens for o in rest] == [40, 40]
    stats = llm.engine.scheduler.block_manager.stats
    assert stats.hits_tokens == 80
    assert stats.queries_tokens == sum(len(p) for p in prompts)
    assert_engine_idle(llm)
    # vLLM's reset_prefix_cache: refused while a request holds blocks, then the prefix is gone.
    llm.engine.add_request("held", prompts[0], SamplingParams(max_tokens=2, **GREEDY))
    llm.engine.step()
    assert not llm.reset_prefix_cache()
    llm.engine.abort_request("held")
    assert llm.reset_prefix_cache()
    again = [llm.generate([p], SamplingParams(max_tokens=20, **GREEDY))[0] for p in prompts[1:]]
    assert [o.num_cached_tokens for o in again] == [0, 40] and token_ids(again) == token_ids(rest)
    assert_engine_idle(llm)


def test_prefix_cache_hit_counts_skip_recomputation_after_preemption(tiny_path: str) -> None:
    llm = LLM(tiny_path, num_kv_blocks=14, block_size=8)
    prompts = random_prompts(5, 6, 20, 40)
    llm.generate(prompts, SamplingParams(max_tokens=20, **GREEDY))
    stats = llm.engine.scheduler.block_manager.stats
    assert llm.engine.scheduler.stats.num_preemptions > 0
    assert stats.queries_tokens == sum(len(p) for p in prompts)  # each prompt queried once
    assert stats.hits_tokens == 0  # unrelated prompts: recomputation is not a hit


def test_n_samples_share_prompt_blocks(tiny_path: str) -> None:
    llm = LLM(tiny_path, num_kv_blocks=64, block_size=4)
    prompt = random_prompts(9, 1, 21, 21)[0]
    engine = llm.engine
    engine.add_request("r", prompt, SamplingParams(n=3, max_tokens=8, temperature=1.0, seed=1))
    samples = engine.groups["r"].samples
    shared_seen = False
    while engine.has_unfinished_requests():
        engine.step()
        live = [s.request for s in samples if s.request.block_ids]
        if len(live) == 3:
            first_blocks = [r.block_ids[:5] for r in live]
            assert first_blocks[0] == first_blocks[1] == first_blocks[2]  # 5 full blocks of 4
            bm = engine.scheduler.block_manager
            assert all(bm.blocks[b].ref_count == 3 for b in first_blocks[0])
            shared_seen = True
    assert shared_seen
    assert_engine_idle(llm)


def test_n_samples_and_seeds(tiny_path: str) -> None:
    llm = LLM(tiny_path, num_kv_blocks=128)
    prompt = random_prompts(4, 1, 10, 10)[0]
    sampled = SamplingParams(n=3, max_tokens=12, temperature=1.0, seed=123, ignore_eos=True)
    out = llm.generate([prompt], sampled)[0]
    assert [c.index for c in out.outputs] == [0, 1, 2]
    assert len({tuple(c.token_ids) for c in out.outputs}) > 1  # different samples
    # Same seed, different batch mates and position in the batch → the same tokens.
    others = random_prompts(5, 3, 5, 30)
    again = llm.generate(others + [prompt], [SamplingParams(max_tokens=12, temperature=0.7, seed=5)] * 3 + [sampled])
    assert token_ids([again[-1]]) == token_ids([out]) and [c.token_ids for c in again[-1].outputs] == [c.token_ids for c in out.outputs]
    assert_engine_idle(llm)


def test_abort_mid_flight_returns_every_block(tiny_path: str) -> None:
    llm = LLM(tiny_path, num_kv_blocks=64, block_size=4, max_num_batched_tokens=16)
    engine = llm.engine
    prompts = random_prompts(6, 5, 20, 60)
    for i, p in enumerate(prompts):
        engine.add_request(f"r{i}", p, SamplingParams(n=2 if i == 0 else 1, max_tokens=30, **GREEDY))
    engine.step()  # r0 mid-prefill, others waiting
    engine.abort_request("r1")  # waiting
    for _ in range(6):
        engine.step()
    aborted = engine.abort_request("r0")  # decoding / mid-prefill
    assert aborted.finished and {c.finish_reason for c in aborted.outputs} == {"abort"}
    for i in range(2, 5):
        engine.abort_request(f"r{i}")
    assert not engine.has_unfinished_requests()
    assert engine.abort_request("r0") is None
    assert_engine_idle(llm)
    # The engine keeps serving after aborts.
    out = llm.generate([prompts[0]], SamplingParams(max_tokens=4, **GREEDY))
    assert len(out[0].outputs[0].token_ids) == 4


def test_stop_token_ids_min_tokens_and_logprobs(tiny_path: str, alone: dict) -> None:
    llm = LLM(tiny_path, num_kv_blocks=64)
    prompt = mixed_prompts()[0]
    expected = alone[tuple(prompt)]
    stop_at = expected[5]
    first = expected.index(stop_at)
    out = llm.generate([prompt], SamplingParams(max_tokens=20, stop_token_ids=[stop_at], **GREEDY))[0].outputs[0]
    assert out.token_ids == expected[: first + 1] and out.finish_reason == "stop" and out.stop_reason == stop_at
    out = llm.generate([prompt], SamplingParams(max_tokens=20, logprobs=3, **GREEDY))[0].outputs[0]
    assert out.token_ids == expected and out.finish_reason == "length"
    assert len(out.logprobs) == 20
    for token, entry in zip(out.token_ids, out.logprobs):
        assert token in entry and len(entry) in (3, 4)
        assert entry[token] == max(entry.values())  # greedy picks the most likely token
    assert out.cumulative_logprob == pytest.approx(sum(e[t] for t, e in zip(out.token_ids, out.logprobs)))


def test_more_top_logprobs_than_the_vocabulary_is_refused(tiny_path: str) -> None:
    """Asking for more top logprobs than there are tokens is a ValueError before anything is
    queued (prompt logprobs used to fail inside the step, every step after)."""
    llm = LLM(tiny_path, num_kv_blocks=64)
    vocab = llm.engine.model_config.vocab_size
    for name in ("logprobs", "prompt_logprobs"):
        with pytest.raises(ValueError, match=name):
            llm.generate([[1, 2, 3]], SamplingParams(max_tokens=2, **{name: vocab + 1}))
        assert_engine_idle(llm)
    out = llm.generate([[1, 2, 3]], SamplingParams(max_tokens=2, logprobs=vocab, prompt_logprobs=vocab, **GREEDY))
    assert len(out[0].outputs[0].logprobs[0]) == vocab and len(out[0].prompt_logprobs[1]) == vocab


def test_unset_max_tokens_runs_to_the_context_or_the_pool(tiny_path: str) -> None:
    """max_tokens=None: up to the context length, or to the whole KV pool where it holds less
    (4 blocks of 16 here, under a 4,096-token context): served, never refused. Offline, as
    vLLM's, a max_tokens past them stops there too (min_tokens with it)."""
    llm = LLM(tiny_path, num_kv_blocks=4, block_size=16)
    assert llm.engine.max_model_len > 64
    for params in (SamplingParams(max_tokens=None, **GREEDY), SamplingParams(max_tokens=100, min_tokens=80, **GREEDY)):
        out = llm.generate([[1, 2, 3]], params)[0].outputs[0]
        assert len(out.token_ids) == 64 - 3 and out.finish_reason == "length"
        assert params.max_tokens in (None, 100)  # the caller's own params are left as they were
    assert_engine_idle(llm)
    short = LLM(tiny_path, num_kv_blocks=64, block_size=16, max_model_len=40)
    out = short.generate([[1, 2, 3] * 10], SamplingParams(max_tokens=50, **GREEDY))[0].outputs[0]
    assert len(out.token_ids) == 10 and out.finish_reason == "length"
    # The prompts of one call share one engine copy of their params: one prompt's cap is its own.
    outs = short.generate([[1, 2, 3] * 10, [1, 2, 3]], SamplingParams(max_tokens=20, **GREEDY))
    assert [len(o.outputs[0].token_ids) for o in outs] == [10, 20]
    with pytest.raises(AdmissionError, match="maximum context length"):  # no room for one token
        short.generate([[1] * 40], SamplingParams(max_tokens=5))
    assert_engine_idle(short)


def test_an_interrupted_generate_leaves_nothing_behind(tiny_path: str, monkeypatch) -> None:
    """Ctrl-C (or any error) inside generate aborts its requests: their blocks return, and the
    next call runs only its own prompts."""
    llm = LLM(tiny_path, num_kv_blocks=64)
    real_step, calls = llm.engine.step, []

    def step(*args, **kwargs):
        calls.append(1)
        if len(calls) == 3:
            raise KeyboardInterrupt
        return real_step(*args, **kwargs)

    monkeypatch.setattr(llm.engine, "step", step)
    with pytest.raises(KeyboardInterrupt):
        llm.generate([[1, 2, 3], [4, 5]], SamplingParams(max_tokens=20, **GREEDY))
    monkeypatch.setattr(llm.engine, "step", real_step)
    while llm.engine.has_unfinished_requests():  # a launched step's surplus tokens, if any
        assert llm.engine.step() == []
    assert_engine_idle(llm)
    out = llm.generate([[1, 2, 3]], SamplingParams(max_tokens=4, **GREEDY))
    assert len(out) == 1 and len(out[0].outputs[0].token_ids) == 4


def test_configs_stoke_cannot_compute_exactly_are_refused() -> None:
    """What the one model file does not compute is refused (another activation, MLP or o_proj
    biases), never approximated; a context past the positions trained is refused, as vLLM."""
    from engine.config import EngineConfig, ModelConfig

    base = {"architectures": ["LlamaForCausalLM"], "vocab_size": 64, "hidden_size": 32, "intermediate_size": 64,
            "num_hidden_layers": 2, "num_attention_heads": 4, "num_key_value_heads": 2,
            "max_position_embeddings": 256}
    for bad, match in (({"hidden_act": "gelu_pytorch_tanh"}, "hidden_act"), ({"mlp_bias": True}, "mlp_bias"),
                       ({"attention_bias": True}, "attention_bias"), ({"num_key_value_heads": 3}, "evenly")):
        with pytest.raises(ValueError, match=match):
            ModelConfig.from_dict(base | bad)
    with pytest.raises(ValueError, match="max_position_embeddings"):  # as vLLM: never trained that far
        EngineConfig(max_model_len=512).resolve_max_model_len(ModelConfig.from_dict(base))
    assert EngineConfig(max_model_len=32).resolve_max_model_len(ModelConfig.from_dict(base)) == 32
    # Granite's checkpoints name LlamaForCausalLM but scale what Llama does not.
    with pytest.raises(ValueError, match="model_type 'granite'"):
        ModelConfig.from_dict(base | {"model_type": "granite"})


def test_rope_settings_read_as_transformers_reads_them() -> None:
    """rope_scaling (older configs) or rope_parameters, whose own rope_theta wins over a
    top-level one; a llama3 rope's pretraining length from the top level, the dict, or else
    the context length."""
    from engine.config import ModelConfig

    base = {"architectures": ["LlamaForCausalLM"], "vocab_size": 64, "hidden_size": 32, "intermediate_size": 64,
            "num_hidden_layers": 2, "num_attention_heads": 4, "max_position_embeddings": 256}
    inner = ModelConfig.from_dict(base | {"rope_theta": 5e5, "rope_parameters": {"rope_type": "default",
                                                                                 "rope_theta": 1e4}})
    assert inner.rope_theta == 1e4 and inner.rope_scaling is None
    legacy = ModelConfig.from_dict(base | {"rope_scaling": {"rope_type": "linear", "factor": 2.0, "rope_theta": 5e5}})
    assert legacy.rope_theta == 5e5 and legacy.rope_scaling == {"rope_type": "linear", "factor": 2.0}
    assert ModelConfig.from_dict(base).rope_theta == 1e4
    llama3 = {"rope_type": "llama3", "factor": 8.0, "low_freq_factor": 1.0, "high_freq_factor": 4.0}
    for extra, original in (({}, 256), ({"original_max_position_embeddings": 64}, 64)):
        config = ModelConfig.from_dict(base | extra | {"rope_scaling": llama3})
        assert config.rope_scaling["original_max_position_embeddings"] == original
    top = ModelConfig.from_dict(base | {"original_max_position_embeddings": 64,
                                        "rope_scaling": llama3 | {"original_max_position_embeddings": 128}})
    assert top.rope_scaling["original_max_position_embeddings"] == 64


def test_edited_configs_give_transformers_tokens(tmp_path, tiny_path: str) -> None:
    """Checkpoints whose config transformers resolves in its own way: a legacy rope_scaling
    holding rope_theta, and tie_word_embeddings over a checkpoint whose lm_head differs from
    the embedding (transformers 5 then keeps the head): stoke's greedy tokens are its tokens."""
    import json
    import shutil

    prompts = [[5, 17, 99, 3, 250, 42] * 30]  # 180 tokens: past the llama3 rope's pretraining length
    for edit in ("legacy_rope_theta", "tied_but_different"):
        path = tmp_path / edit
        shutil.copytree(tiny_path, path)
        config = json.loads((path / "config.json").read_text())
        if edit == "legacy_rope_theta":
            config.pop("rope_parameters", None)
            config.pop("rope_theta", None)
            config["rope_scaling"] = {"rope_type": "linear", "factor": 2.0, "rope_theta": 500000.0}
        else:
            config["tie_word_embeddings"] = True
        (path / "config.json").write_text(json.dumps(config))
        llm = LLM(str(path), num_kv_blocks=64)
        assert token_ids(llm.generate(prompts, SamplingParams(max_tokens=12, **GREEDY))) == \
            hf_greedy(str(path), prompts, 12), edit


@pytest.mark.parametrize("caching", [True, False])
def test_samples_wait_for_the_first_prompt_only_to_reuse_it(tiny_path: str, caching: bool) -> None:
    """n = 3: with the prefix cache, samples 1 and 2 start once sample 0's prompt is cached
    (then hit it); without it they start at once (waiting would only delay their recompute)."""
    llm = LLM(tiny_path, num_kv_blocks=64, enable_prefix_caching=caching)
    engine = llm.engine
    engine.add_request("r", list(range(1, 40)), SamplingParams(n=3, max_tokens=3, **GREEDY))
    engine.step()
    assert len(engine.scheduler.running) == (1 if caching else 3)
    while engine.has_unfinished_requests():
        engine.step()
    assert_engine_idle(llm)


def test_eos_ends_unless_ignored(default_llm: LLM) -> None:
    eos = default_llm.engine.eos_token_ids
    tokenizer = default_llm.get_tokenizer()
    prompt = tokenizer.apply_chat_template([{"role": "user", "content": "Say hi."}], tokenize=False,
                                           add_generation_prompt=True)
    stopped = default_llm.generate(prompt, SamplingParams(max_tokens=60, temperature=0.0))[0].outputs[0]
    assert stopped.finish_reason == "stop" and stopped.token_ids[-1] in eos
    n = len(stopped.token_ids)
    longer = default_llm.generate(prompt, SamplingParams(max_tokens=n + 3, temperature=0.0, min_tokens=n + 3))[0].outputs[0]
    assert len(longer.token_ids) == n + 3 and longer.finish_reason == "length"
    assert longer.token_ids[: n - 1] == stopped.token_ids[: n - 1] and longer.token_ids[n - 1] not in eos


def test_a_stop_tokens_text_is_not_output(default_llm: LLM) -> None:
    """As vLLM: generation that ends on a stop token (stop_token_ids, or EOS) keeps the
    token's id but not its text, unless include_stop_str_in_output; special tokens too."""
    prompt = "The capital of France is"
    ids = default_llm.generate(prompt, SamplingParams(max_tokens=8, **GREEDY))[0].outputs[0].token_ids
    k = next(i for i in range(2, 8) if ids[i] not in ids[:i])  # the first time the token comes

    def text(**params) -> tuple[str, list[int]]:
        out = default_llm.generate(prompt, SamplingParams(**(dict(max_tokens=8, **GREEDY) | params)))[0].outputs[0]
        return out.text, out.token_ids

    assert text(stop_token_ids=[ids[k]]) == (text(max_tokens=k)[0], ids[:k + 1])
    assert text(stop_token_ids=[ids[k]], include_stop_str_in_output=True) == (text(max_tokens=k + 1)[0], ids[:k + 1])
    tokenizer = default_llm.get_tokenizer()
    chat = tokenizer.apply_chat_template([{"role": "user", "content": "Say hi."}], tokenize=False,
                                         add_generation_prompt=True)
    for include in (False, True):
        out = default_llm.generate(chat, SamplingParams(max_tokens=60, temperature=0.0, skip_special_tokens=False,
                                                        include_stop_str_in_output=include))[0].outputs[0]
        eos = tokenizer.decode(out.token_ids[-1:])
        assert out.finish_reason == "stop" and eos.startswith("<|")
        assert out.text == tokenizer.decode(out.token_ids[:len(out.token_ids) - (not include)])
        assert out.text.endswith(eos) == include


def test_stop_strings_count_from_the_token_after_min_tokens(default_llm: LLM) -> None:
    """As vLLM: a stop string ending in one of the first min_tokens tokens does not stop (EOS
    and stop ids cannot come before then either)."""
    prompt = "The capital of France is"
    full = default_llm.generate(prompt, SamplingParams(max_tokens=8, **GREEDY))[0].outputs[0]
    tokenizer = default_llm.get_tokenizer()
    k = 1 + next(i for i, t in enumerate(full.token_ids) if "." in tokenizer.decode([t]))  # "." ends token k
    assert "." not in full.text[full.text.index(".") + 1:]  # once only: stopping later would be "length"
    for min_tokens in range(k + 1):
        out = default_llm.generate(prompt, SamplingParams(max_tokens=8, stop=["."], min_tokens=min_tokens,
                                                          **GREEDY))[0].outputs[0]
        stops = min_tokens < k
        assert out.finish_reason == ("stop" if stops else "length"), min_tokens
        assert out.text == (full.text[:full.text.index(".")] if stops else full.text)


def test_stop_strings_are_cut_from_text(default_llm: LLM) -> None:
    full = default_llm.generate("The capital of France is", SamplingParams(max_tokens=24, **GREEDY))[0].outputs[0]
    words = full.text.split()
    stop = words[3]
    out = default_llm.generate("The capital of France is", SamplingParams(max_tokens=24, stop=[stop], **GREEDY))[0].outputs[0]
    assert out.finish_reason == "stop" and out.stop_reason == stop
    assert stop not in out.text and full.text.startswith(out.text)


@pytest.mark.parametrize("bad", [
    dict(max_tokens=-1), dict(max_tokens=0), dict(top_p=0.0), dict(top_p=1.5), dict(n=0),
    dict(temperature=-0.1), dict(top_k=-2), dict(min_p=2.0), dict(min_tokens=5, max_tokens=2),
    dict(logprobs=-1), dict(stop=[""]), dict(presence_penalty=3.0), dict(repetition_penalty=0.0),
    dict(n=True), dict(logprobs=True), dict(ignore_eos="no"), dict(stop=5), dict(seed=2 ** 64 - 1),
    dict(seed=-(2 ** 63) - 1), dict(truncate_prompt_tokens=0), dict(stop="x", detokenize=False),
])
def test_invalid_sampling_params_raise(bad: dict) -> None:
    with pytest.raises(ValueError) as info:
        SamplingParams(**bad)
    assert next(iter(bad)) in str(info.value)


def test_admission_errors_leave_the_engine_untouched(tiny_path: str) -> None:
    engine = LLMEngine(EngineConfig(model=tiny_path, num_kv_blocks=8, block_size=4, max_model_len=100))
    with pytest.raises(AdmissionError, match=r"maximum context length is 100.*101") as info:
        engine.add_request("a", [5] * 90, SamplingParams(max_tokens=11))
    assert info.value.code == "context_length_exceeded"
    with pytest.raises(AdmissionError, match=r"32") as info:
        engine.add_request("b", [5] * 30, SamplingParams(max_tokens=10))
    assert info.value.code == "kv_cache_too_small"
    with pytest.raises(ValueError, match="token ids"):
        engine.add_request("c", [5, 100000], SamplingParams(max_tokens=1))
    llm = LLM.__new__(LLM)
    llm.engine, llm._counter = engine, 0
    with pytest.raises(AdmissionError):  # one bad prompt: nothing at all is scheduled
        llm.generate([[5] * 4, [5] * 90], SamplingParams(max_tokens=20))
    assert not engine.has_unfinished_requests() and not engine.scheduler.waiting
    assert llm.generate([[5] * 4], SamplingParams(max_tokens=3, **GREEDY))[0].outputs[0].finish_reason == "length"


def test_dummy_weights_from_config_alone(tmp_path, tiny_path: str) -> None:
    import shutil

    shutil.copy(f"{tiny_path}/config.json", tmp_path / "config.json")  # no weights at all
    outs = [LLM(str(tmp_path), load_format="dummy", num_kv_blocks=32, seed=s).generate(
        [[5, 6, 7]], SamplingParams(max_tokens=6, **GREEDY))[0].outputs[0].token_ids for s in (0, 0, 1)]
    assert outs[0] == outs[1] and len(outs[0]) == 6
    with pytest.raises(FileNotFoundError, match="dummy"):
        LLM(str(tmp_path), num_kv_blocks=32)


def test_generation_config_gives_the_default_sampling(tmp_path, tiny_path: str) -> None:
    """vLLM's `--generation-config auto`: the sampling the model's generation_config.json sets
    (max_new_tokens as max_tokens, not transformers' own defaults) is what `generate` uses
    without SamplingParams; "none" and another directory choose otherwise; a bad value fails
    at start."""
    import json
    import shutil

    from engine.config import generation_defaults

    model = tmp_path / "model"
    shutil.copytree(tiny_path, model)
    with open(model / "generation_config.json") as f:
        saved = json.load(f)
    advice = {"temperature": 0.0, "top_k": 5, "max_new_tokens": 3, "do_sample": True, "top_p": None}
    (model / "generation_config.json").write_text(json.dumps(saved | advice))
    llm = LLM(str(model), num_kv_blocks=32)
    assert llm.engine.default_sampling == {"temperature": 0.0, "top_k": 5, "max_tokens": 3}
    assert llm.get_default_sampling_params() == SamplingParams(temperature=0.0, top_k=5, max_tokens=3)
    prompts = [[5, 6, 7], [9, 8]]
    defaulted = [o.outputs[0].token_ids for o in llm.generate(prompts)]
    explicit = [o.outputs[0].token_ids for o in llm.generate(prompts, SamplingParams(temperature=0.0, max_tokens=3))]
    assert defaulted == explicit and all(len(t) == 3 for t in defaulted)

    assert generation_defaults("none", str(model)) == {}
    assert generation_defaults("auto", tiny_path) == {}  # bos/eos only: no sampling advice
    other = tmp_path / "other"
    other.mkdir()
    (other / "generation_config.json").write_text(json.dumps({"top_p": 0.5, "repetition_penalty": 1.1}))
    assert generation_defaults(str(other), str(model)) == {"top_p": 0.5, "repetition_penalty": 1.1}
    with pytest.raises(ValueError, match="generation_config"):
        generation_defaults(str(tmp_path / "missing"), str(model))
    (model / "generation_config.json").write_text(json.dumps(saved | {"temperature": -1.0}))
    with pytest.raises(ValueError, match="generation config"):
        LLM(str(model), num_kv_blocks=32)


@pytest.mark.parametrize("dtype", ["float16", "bfloat16"])
def test_half_precision_follows_fp32(tiny_path: str, dtype: str) -> None:
    import torch

    prompts = mixed_prompts()[:4]
    fp32 = LLM(tiny_path, num_kv_blocks=64).generate(prompts, SamplingParams(max_tokens=1, logprobs=5, **GREEDY))
    llm = LLM(tiny_path, num_kv_blocks=64, dtype=dtype)
    assert llm.engine.runner.kv_caches[0][0].dtype == getattr(torch, dtype)
    half = llm.generate(prompts, SamplingParams(max_tokens=1, **GREEDY))
    for ref, out in zip(fp32, half):
        # Rounding may flip a near tie: the half-precision choice must be a near-best fp32 token.
        fp32_logprobs = ref.outputs[0].logprobs[0]
        token = out.outputs[0].token_ids[0]
        assert token in fp32_logprobs and fp32_logprobs[token] >= max(fp32_logprobs.values()) - 0.3


@pytest.mark.parametrize("async_scheduling", [False, True])
def test_prompt_logprobs_equal_transformers(tiny_path: str, async_scheduling: bool) -> None:
    """Prompt logprobs come back with the step's tokens; asynchronously, a step's are recorded
    only after the next step was scheduled, which may have preempted the request. Their logits
    are made max_num_seqs (here 4) positions at a time, so a chunk's span several slices."""
    import torch
    import transformers

    prompts = random_prompts(11, 2, 20, 45)
    model = transformers.AutoModelForCausalLM.from_pretrained(tiny_path, dtype=torch.float32)
    # A tiny pool and budget: chunked prefill and preemption must not lose or repeat entries.
    llm = LLM(tiny_path, num_kv_blocks=10, block_size=8, max_num_batched_tokens=16, max_num_seqs=4,
              async_scheduling=async_scheduling)
    llm.generate([prompts[0]], SamplingParams(max_tokens=2, **GREEDY))  # cached: must not be used
    outputs = llm.generate(prompts, SamplingParams(max_tokens=20, prompt_logprobs=2, **GREEDY))
    for prompt, out in zip(prompts, outputs):
        with torch.no_grad():
            expected = model(torch.tensor([prompt])).logits[0].log_softmax(-1)
        entries = out.prompt_logprobs
        assert len(entries) == len(prompt) and entries[0] is None
        for pos, entry in enumerate(entries[1:], start=1):
            token = prompt[pos]
            assert entry[token] == pytest.approx(expected[pos - 1, token].item(), abs=1e-4)
            best = expected[pos - 1].topk(2).indices.tolist()
            assert set(best) <= set(entry) and len(entry) in (2, 3)
            # vLLM's Logprob: the top-k ranked 1..k, the token by the tokens at least as likely
            # (bounds for fp32's differences from transformers)
            value = entry[token]
            assert isinstance(value, Logprob) and value.logprob == float(value)
            assert int((expected[pos - 1] > value + 1e-4).sum()) + 1 <= value.rank \
                <= int((expected[pos - 1] >= value - 1e-4).sum())
            assert all(entry[t].rank == i for i, t in enumerate(best, 1) if t != token)
    assert outputs[0].num_cached_tokens == 0
    assert llm.engine.scheduler.stats.num_preemptions > 0
    assert_engine_idle(llm)


def test_logprobs_are_vllms_logprob_objects(default_llm: LLM) -> None:
    """Sampled, a token is often not the likeliest: its rank says where it stood. Each entry
    is vLLM's Logprob (logprob, rank, decoded_token: the token's text alone), and a float."""
    params = SamplingParams(max_tokens=12, temperature=1.5, seed=3, logprobs=2, prompt_logprobs=1)
    out = default_llm.generate(["The weather today is"], params, use_tqdm=False)[0]
    tokenizer, sample = default_llm.get_tokenizer(), out.outputs[0]
    ranks = []
    for token, entry in zip(sample.token_ids, sample.logprobs, strict=True):
        top = sorted((t for t in entry if entry[t].rank <= 2), key=lambda t: entry[t].rank)
        assert [entry[t].rank for t in top] == [1, 2] and len(entry) == 2 + (token not in top)
        assert all(entry[a].logprob >= entry[b].logprob for a, b in zip(top, top[1:]))
        assert (entry[token].rank == 1) == (token == top[0])  # no ties in these logits
        assert all(v.decoded_token == tokenizer.decode([t]) for t, v in entry.items())
        ranks.append(entry[token].rank)
    assert max(ranks) > 2 and sample.cumulative_logprob == pytest.approx(
        sum(entry[t] for t, entry in zip(sample.token_ids, sample.logprobs)))
    assert out.prompt_logprobs[0] is None
    assert all(isinstance(v, Logprob) and v.rank >= 1 for e in out.prompt_logprobs[1:] for v in e.values())
    default_llm.engine.logprob_objects = False  # the server's worker: plain numbers, the same ones
    try:
        plain = default_llm.generate(["The weather today is"], params, use_tqdm=False)[0]
    finally:
        default_llm.engine.logprob_objects = True
    assert plain.outputs[0].logprobs == sample.logprobs and plain.prompt_logprobs == out.prompt_logprobs
    assert {type(v) for e in plain.outputs[0].logprobs + plain.prompt_logprobs[1:] for v in e.values()} == {float}


def test_output_kinds_agree(default_llm: LLM) -> None:
    """`step(outputs="final")` (what LLM.generate runs) builds outputs for finished requests
    only, and each equals the last output of the cumulative steps; the "delta" steps (what the
    server streams) add up to it: text (with a stop string), tokens, logprobs, n samples,
    metrics, and their running count of tokens."""
    engine = default_llm.engine
    params = [SamplingParams(max_tokens=12, logprobs=2, **GREEDY),
              SamplingParams(max_tokens=9, n=2, temperature=0.8, seed=3),
              SamplingParams(max_tokens=30, stop=[" is"], **GREEDY)]
    prompts = ["The capital of France is", "Once upon a time", "Water boils at"]

    def run(kind: str) -> tuple[dict[str, object], dict[tuple[str, int], dict[str, list]]]:
        for i, (prompt, p) in enumerate(zip(prompts, params)):
            engine.add_request(f"{kind}-{i}", prompt, p)
        last, added = {}, {}
        while engine.has_unfinished_requests():
            for out in engine.step(outputs=kind):
                assert out.finished or kind != "final"
                key = out.request_id.rsplit("-", 1)[1]
                if kind == "delta":  # only the samples with news: each finish reported once
                    assert all(c.token_ids or c.text or c.finish_reason for c in out.outputs)
                    assert all(added.get((key, c.index), {}).get("finish", (None,))[0] is None for c in out.outputs)
                for c in out.outputs:
                    acc = added.setdefault((key, c.index), {"delta_text": [], "text": [], "ids": [], "logprobs": []})
                    acc["delta_text"].append(c.delta_text)
                    acc["text"].append(c.text)
                    acc["ids"] += c.token_ids
                    acc["logprobs"] += c.logprobs or []
                    acc["finish"] = (c.finish_reason, c.stop_reason, c.num_tokens, c.cumulative_logprob)
                    if kind == "delta":
                        assert c.delta_token_ids == c.token_ids and c.num_tokens == len(acc["ids"])
                    else:
                        n = len(c.token_ids)
                        assert c.num_tokens == n and c.token_ids[n - len(c.delta_token_ids):] == c.delta_token_ids
                last[key] = out
        return last, added

    streamed, _ = run("cumulative")
    final, final_added = run("final")
    delta, delta_added = run("delta")
    assert sorted(final) == sorted(streamed) == sorted(delta) == ["0", "1", "2"]
    with pytest.raises(ValueError, match="outputs must be one of"):
        engine.step(outputs="partial")
    for key in final:
        a, b, d = final[key], streamed[key], delta[key]
        assert a.finished and b.finished and d.finished and a.metrics.finish_time is not None
        assert len(a.metrics.inter_token_latencies) == len(b.metrics.inter_token_latencies)
        for ca, cb in zip(a.outputs, b.outputs, strict=True):
            assert (ca.text, ca.token_ids, ca.finish_reason, ca.stop_reason) == \
                (cb.text, cb.token_ids, cb.finish_reason, cb.stop_reason)
            assert ca.logprobs == cb.logprobs and ca.cumulative_logprob == cb.cumulative_logprob
            assert "".join(final_added[key, ca.index]["delta_text"]) == ca.text  # one delta: the whole text
            got = delta_added[key, ca.index]
            assert "".join(got["text"]) == "".join(got["delta_text"]) == cb.text
            assert got["ids"] == cb.token_ids and got["logprobs"] == (cb.logprobs or [])
        assert d.outputs  # the last delta: the samples that finished in its step
        for cb in b.outputs:
            assert delta_added[key, cb.index]["finish"] == (cb.finish_reason, cb.stop_reason, len(cb.token_ids),
                                                            cb.cumulative_logprob)


def test_vllm_prompt_forms_and_offline_options(default_llm: LLM) -> None:
    """vLLM's prompt dicts ({"prompt": text}, {"prompt_token_ids": ids}, alone or in a list),
    a progress bar class for use_tqdm, truncate_prompt_tokens, detokenize=False, and chat
    content given as text parts."""
    tokenizer, params = default_llm.get_tokenizer(), SamplingParams(max_tokens=4, **GREEDY)
    text = "The capital of France is"
    ids = tokenizer.encode(text)
    expected = default_llm.generate(text, params)[0]
    for prompt in ({"prompt": text}, [{"prompt": text}], {"prompt_token_ids": ids}, [{"prompt_token_ids": ids}]):
        (out,) = default_llm.generate(prompt, params)
        assert out.prompt_token_ids == ids and out.outputs[0].token_ids == expected.outputs[0].token_ids, prompt
        assert out.prompt == (text if "prompt" in (prompt if isinstance(prompt, dict) else prompt[0]) else None)
    for bad, error in (({"prompt_token_ids": ids, "multi_modal_data": {}}, ValueError), ({"prompt": 5}, TypeError),
                       ([(1, 2, 3)], TypeError), ({"prompt_token_ids": "abc"}, ValueError)):
        with pytest.raises(error):
            default_llm.generate(bad, params)
    with pytest.raises(TypeError, match="sampling_params"):
        default_llm.generate(text, {"max_tokens": 4})

    class Bar:  # a tqdm-like class, as vLLM's use_tqdm takes
        made: list["Bar"] = []

        def __init__(self, total: int, desc: str) -> None:
            self.total, self.count, self.closed = total, 0, False
            Bar.made.append(self)

        def update(self, n: int) -> None:
            self.count += n

        def close(self) -> None:
            self.closed = True

    default_llm.generate([text, ids], params, use_tqdm=Bar)
    assert [(b.total, b.count, b.closed) for b in Bar.made] == [(2, 2, True)]
    default_llm.generate(text, params, use_tqdm=False)
    assert len(Bar.made) == 1

    (cut,) = default_llm.generate(text, SamplingParams(max_tokens=4, truncate_prompt_tokens=2, **GREEDY))
    assert cut.prompt_token_ids == ids[-2:]
    assert default_llm.generate(text, SamplingParams(max_tokens=4, truncate_prompt_tokens=-1, **GREEDY))[0] \
        .prompt_token_ids == ids
    with pytest.raises(ValueError, match="truncate_prompt_tokens"):
        default_llm.generate(text, SamplingParams(max_tokens=4, truncate_prompt_tokens=10 ** 6))
    later = SamplingParams(max_tokens=24, **GREEDY)  # vLLM's pattern: set a field after construction
    words = default_llm.generate(text, later)[0].outputs[0].text.split()
    later.stop = [words[2]]
    cut_at_stop = default_llm.generate(text, later)[0].outputs[0]
    assert cut_at_stop.finish_reason == "stop" and words[2] not in cut_at_stop.text
    (raw,) = default_llm.generate(text, SamplingParams(max_tokens=4, detokenize=False, **GREEDY))
    assert raw.outputs[0].token_ids == expected.outputs[0].token_ids and raw.outputs[0].text == ""

    parts = [{"role": "user", "content": [{"type": "text", "text": "Say"}, {"type": "text", "text": "hello"}]}]
    joined = [{"role": "user", "content": "Say\nhello"}]
    assert default_llm.chat(parts, params)[0].prompt == default_llm.chat(joined, params)[0].prompt
    with pytest.raises(ValueError, match="image_url"):
        default_llm.chat([{"role": "user", "content": [{"type": "image_url", "image_url": {"url": "x"}}]}], params)
    assert_engine_idle(default_llm)


def test_fields_set_after_construction_take_effect(tiny_path: str) -> None:
    """vLLM users take the defaults and set fields (llm.get_default_sampling_params(), then
    .stop = ...): each is read, and checked, when the request is added."""
    llm = LLM(tiny_path, num_kv_blocks=64)
    params = SamplingParams(max_tokens=4, **GREEDY)
    params.logit_bias = {7: 100}
    assert token_ids(llm.generate([[1, 2, 3]], params)) == [[7] * 4]
    params.logit_bias = None
    assert token_ids(llm.generate([[1, 2, 3]], params)) != [[7] * 4]
    params.temperature = -1.0
    with pytest.raises(ValueError, match="temperature"):
        llm.generate([[1, 2, 3]], params)
    # A request runs on its own copy: an edit made while it runs reaches only later requests.
    shared = SamplingParams(max_tokens=6, **GREEDY)
    alone = token_ids(llm.generate([[1, 2, 3]], shared))[0]
    engine = llm.engine
    engine.add_request("a", [1, 2, 3], shared)
    engine.step()
    shared.logit_bias = {7: 100}
    engine.add_request("b", [4, 5, 6], shared)
    outputs = {}
    while engine.has_unfinished_requests():
        outputs |= {o.request_id: o.outputs[0].token_ids for o in engine.step(outputs="final")}
    assert outputs == {"a": alone, "b": [7] * 6}
    # truncate_prompt_tokens holds on the engine's own API too.
    engine.add_request("t", list(range(3, 23)), SamplingParams(max_tokens=1, truncate_prompt_tokens=2))
    while engine.has_unfinished_requests():
        for out in engine.step(outputs="final"):
            assert out.prompt_token_ids == [21, 22]
    assert_engine_idle(llm)


def test_a_failing_sample_leaves_nothing_queued(tiny_path: str, monkeypatch) -> None:
    """n > 1: every sample is built before any is queued, so one that fails (its generator,
    here) leaves no half-added request behind for the next call to trip over."""
    llm = LLM(tiny_path, num_kv_blocks=64)
    real = llm.engine._generator

    def generator(params, index):
        if index == 1:
            raise RuntimeError("no generator")
        return real(params, index)

    monkeypatch.setattr(llm.engine, "_generator", generator)
    with pytest.raises(RuntimeError):
        llm.generate([[7, 8, 9]], SamplingParams(n=2, max_tokens=3, temperature=1.0, seed=5))
    assert not llm.engine.scheduler.waiting and not llm.engine.samples and not llm.engine.groups
    monkeypatch.undo()
    assert len(llm.generate([[1, 2, 3]], SamplingParams(max_tokens=3, **GREEDY))[0].outputs[0].token_ids) == 3
    assert_engine_idle(llm)


def test_engine_seed_makes_unseeded_sampling_repeatable(tiny_path: str) -> None:
    """As vLLM (seed 0 by default): requests without a seed sample alike run after run."""
    params = SamplingParams(max_tokens=12, temperature=1.0, ignore_eos=True)

    def run(seed: int) -> list[list[int]]:
        return token_ids(LLM(tiny_path, num_kv_blocks=64, seed=seed).generate([[1, 2, 3], [4, 5]], params))

    first = run(0)
    assert run(0) == first and run(1) != first


def test_a_16_bit_model_keeps_exact_fp32_rope_tables(tiny_checkpoints) -> None:
    """Cast with the model to bf16 and back, the tables lost up to ~2e-3 at long positions."""
    from engine.config import ModelConfig
    from engine.models.llama import Rotary

    config = ModelConfig.from_dict({"architectures": ["LlamaForCausalLM"], "vocab_size": 64, "hidden_size": 256,
                                    "intermediate_size": 64, "num_hidden_layers": 1, "num_attention_heads": 2,
                                    "max_position_embeddings": 8192, "rope_theta": 5e5})
    rotary = Rotary(config)
    exact = rotary.cos.clone()
    rotary.to(torch.bfloat16)
    assert not torch.equal(rotary.cos.float(), exact)
    rotary.restore_fp32()
    assert rotary.cos.dtype == torch.float32 and torch.equal(rotary.cos, exact)
    runner = LLM(tiny_checkpoints["llama"], dtype="bfloat16", num_kv_blocks=16).engine.runner
    tables = runner.model.model.rotary
    assert tables.cos.dtype == torch.float32 and torch.equal(tables.cos, Rotary(runner.model_config).cos)
