"""Embeddings (engine/pooling.py, LLM.embed): transformers' last hidden states pooled, beside
generation in the continuous batch, under chunked prefill, the prefix cache, preemption and
aborts, with no KV block left behind; pooler configs from the engine option and from
sentence-transformers checkpoints; base-model checkpoints without an LM head."""

from __future__ import annotations

import json
import os

import pytest
import torch

from engine import LLM, LoRARequest, PoolerConfig, PoolingParams, SamplingParams
from scheduler import AdmissionError
from tests.conftest import TINY_COMMON, assert_engine_idle, random_prompts

GREEDY = dict(temperature=0.0, ignore_eos=True)
TOLERANCE = 2e-5  # fp32, the same math in another order



def hf_hidden(path: str, prompt: list[int], adapter: str | None = None) -> torch.Tensor:
    """transformers' last_hidden_state [len, hidden] (fp32), with a LoRA adapter applied as PEFT's."""
    import transformers

    from tests.lora_adapters import apply_adapter

    model = transformers.AutoModelForCausalLM.from_pretrained(path, dtype=torch.float32).eval()
    if adapter is not None:
        apply_adapter(model, adapter)
    with torch.no_grad():
        return model.model(torch.tensor([prompt])).last_hidden_state[0]


def pooled(hidden: torch.Tensor, kind: str, normalize: bool = True, dimensions: int | None = None) -> torch.Tensor:
    vector = {"LAST": hidden[-1], "MEAN": hidden.mean(dim=0), "CLS": hidden[0]}[kind]
    if dimensions is not None:
        vector = vector[:dimensions]
    return torch.nn.functional.normalize(vector, dim=-1) if normalize else vector


def assert_close(have: list[float], want: torch.Tensor) -> None:
    assert len(have) == want.shape[0]
    assert torch.allclose(torch.tensor(have), want, atol=TOLERANCE, rtol=0), \
        (torch.tensor(have) - want).abs().max().item()


# Lengths: one token, exact block multiples (16), past a chunk (max_num_batched_tokens 32).
LENGTHS = [1, 5, 16, 17, 32, 47, 70]


@pytest.mark.parametrize("kind", ["LAST", "MEAN", "CLS"])
@pytest.mark.parametrize("model", ["llama", "qwen2", "qwen3"])
def test_embeddings_equal_transformers_pooled_hidden_states(tiny_checkpoints: dict[str, str], kind: str,
                                                            model: str) -> None:
    """Each pooling type, normalised and not, on prompts chunked across steps (and several in
    one step): transformers' last hidden states, pooled."""
    path = tiny_checkpoints[model]
    ps = random_prompts(1, LENGTHS)
    llm = LLM(path, num_kv_blocks=64, max_num_batched_tokens=32, pooler_config={"pooling_type": kind})
    normed = llm.embed(ps, use_tqdm=False)
    raw = llm.embed(ps, PoolingParams(normalize=False), use_tqdm=False)
    for p, a, b in zip(ps, normed, raw):
        hidden = hf_hidden(path, p)
        assert a.prompt_token_ids == p and a.finished
        assert_close(a.outputs.embedding, pooled(hidden, kind))
        assert_close(b.outputs.embedding, pooled(hidden, kind, normalize=False))
    assert_engine_idle(llm)


def test_embeddings_of_the_embedded_model_text_prompts(default_model_dir: str) -> None:
    """The embedded SmolLM2 with text prompts: tokenized as the tokenizer does, the last token
    pooled and normalised (a decoder's default, as vLLM's)."""
    import transformers

    texts = ["The capital of France is Paris.", "A GPU computes many things at once."]
    llm = LLM(default_model_dir)
    outs = llm.embed(texts, use_tqdm=False)
    tokenizer = transformers.AutoTokenizer.from_pretrained(default_model_dir)
    for text, out in zip(texts, outs):
        ids = tokenizer.encode(text)
        assert out.prompt_token_ids == ids and out.prompt == text
        assert out.outputs.hidden_size == llm.engine.model_config.hidden_size
        assert_close(out.outputs.embedding, pooled(hf_hidden(default_model_dir, ids), "LAST"))
    assert_engine_idle(llm)


def test_last_token_pooling_uses_the_prefix_cache_and_mean_pooling_does_not(tiny_checkpoints: dict[str, str]) -> None:
    """The last token needs only its prefix's KV: a prompt that shares cached blocks computes
    the rest, and its embedding is the same. A mean needs every position's hidden states: it
    computes them all."""
    path = tiny_checkpoints["llama"]
    shared = random_prompts(2, [48])[0]
    first, second = shared + [7, 8, 9], shared + [10, 11]
    for kind, hits in (("LAST", 48), ("MEAN", 0)):
        llm = LLM(path, num_kv_blocks=32, pooler_config={"pooling_type": kind})
        llm.embed([first], use_tqdm=False)
        (out,) = llm.embed([second], use_tqdm=False)
        assert out.num_cached_tokens == hits
        assert_close(out.outputs.embedding, pooled(hf_hidden(path, second), kind))
        # A generation reuses an embedding's cached prompt too.
        (gen,) = llm.generate([first], SamplingParams(max_tokens=2, **GREEDY), use_tqdm=False)
        assert gen.num_cached_tokens == 48
        assert_engine_idle(llm)


@pytest.mark.parametrize("options", [
    dict(),
    dict(async_scheduling=True),
    dict(scheduling_policy="priority"),
    dict(enable_prefix_caching=False, max_num_batched_tokens=24, long_prefill_token_threshold=8),
])
@pytest.mark.parametrize("kind", ["LAST", "MEAN"])
def test_embeddings_beside_generation_give_what_each_gives_alone(tiny_checkpoints: dict[str, str], options: dict,
                                                                 kind: str) -> None:
    """Embeddings and generations in one continuous batch: every embedding is the one it is
    alone, every generation the tokens it has alone; nothing leaks."""
    path = tiny_checkpoints["llama"]
    base = dict(num_kv_blocks=48, max_num_seqs=6, max_num_batched_tokens=40, pooler_config={"pooling_type": kind})
    base |= options
    embed_ps, gen_ps = random_prompts(3, [9, 40, 1, 23, 64]), random_prompts(4, [12, 30, 5])
    params = [SamplingParams(max_tokens=n, **GREEDY) for n in (9, 4, 14)]
    alone = LLM(path, **base)
    want_embeddings = [o.outputs.embedding for o in alone.embed(embed_ps, use_tqdm=False)]
    want_tokens = [o.outputs[0].token_ids for o in alone.generate(gen_ps, params, use_tqdm=False)]

    llm = LLM(path, **base)
    engine = llm.engine
    for i, p in enumerate(gen_ps):
        engine.add_request(f"g{i}", p, params[i])
    for i, p in enumerate(embed_ps):
        engine.add_pooling_request(f"e{i}", p)
    outputs = {}
    mixed_steps = 0
    while engine.has_unfinished_requests():
        running = engine.scheduler.running
        mixed_steps += any(r.pooling for r in running) and any(not r.pooling for r in running)
        for out in engine.step(outputs="final"):
            outputs[out.request_id] = out
    assert mixed_steps > 0
    for i, want in enumerate(want_embeddings):
        assert_close(outputs[f"e{i}"].outputs.embedding, torch.tensor(want))
    assert [outputs[f"g{i}"].outputs[0].token_ids for i in range(len(gen_ps))] == want_tokens
    assert_engine_idle(llm)


@pytest.mark.parametrize("kind", ["MEAN", "CLS", "LAST"])
def test_a_preempted_embedding_is_recomputed_to_the_same_vector(tiny_checkpoints: dict[str, str], kind: str) -> None:
    """A pool too small for everyone: generations that arrived first take blocks back from an
    embedding halfway through its prompt's chunks; it is recomputed later, its pooling restarts
    where it must, and its vector is the one transformers gives."""
    path = tiny_checkpoints["llama"]
    gen_ps, (long_prompt,) = random_prompts(5, [30, 30]), random_prompts(6, [90])
    llm = LLM(path, num_kv_blocks=10, block_size=16, max_num_seqs=3, max_num_batched_tokens=16,
              enable_prefix_caching=False, pooler_config={"pooling_type": kind})
    engine = llm.engine
    for i, p in enumerate(gen_ps):
        engine.add_request(f"g{i}", p, SamplingParams(max_tokens=40, **GREEDY))
    engine.add_pooling_request("e", long_prompt)
    outputs = {}
    while engine.has_unfinished_requests():
        for out in engine.step(outputs="final"):
            outputs[out.request_id] = out
    assert outputs["e"].metrics.num_preemptions > 0
    assert_close(outputs["e"].outputs.embedding, pooled(hf_hidden(path, long_prompt), kind))
    assert_engine_idle(llm)


@pytest.mark.parametrize("async_scheduling", [False, True])
def test_aborted_embeddings_give_every_block_back(tiny_checkpoints: dict[str, str], async_scheduling: bool) -> None:
    """An embedding aborted while waiting, halfway through its chunks, or after the step with
    its last token was launched (async: before its vector was taken back) reports no vector,
    and the pool is whole; the others go on."""
    path = tiny_checkpoints["llama"]
    llm = LLM(path, num_kv_blocks=32, max_num_batched_tokens=16, async_scheduling=async_scheduling,
              pooler_config={"pooling_type": "MEAN"})
    engine = llm.engine
    ps = random_prompts(7, [50, 8, 8, 20])
    for i, p in enumerate(ps):
        engine.add_pooling_request(f"e{i}", p)
    finished = {o.request_id: o for o in engine.step(outputs="final")}  # e0's first chunk, e1's prompt
    assert 0 < engine.poolings["e0"].request.num_computed_tokens < 50
    out = engine.abort_request("e0")  # halfway
    assert out.outputs is None and out.finished and out.request_id == "e0"
    assert engine.abort_request("e3").outputs is None  # still waiting
    while engine.has_unfinished_requests():
        for o in engine.step(outputs="final"):
            finished[o.request_id] = o
    assert set(finished) == {"e1", "e2"}
    for i in (1, 2):
        assert_close(finished[f"e{i}"].outputs.embedding, pooled(hf_hidden(path, ps[i]), "MEAN"))
    assert engine.abort_request("e1") is None  # finished: nothing to abort
    assert_engine_idle(llm)
    if async_scheduling:  # launched, then aborted before its vector was taken back
        engine.add_pooling_request("late", ps[1])
        engine.step()
        assert engine._in_flight is not None and "late" in engine.poolings
        assert engine.abort_request("late").outputs is None
        assert [o.request_id for o in engine.step(outputs="final")] == []
        assert_engine_idle(llm)


def test_matryoshka_dimensions(tiny_checkpoints: dict[str, str]) -> None:
    """`dimensions` keeps the first ones, then normalises (vLLM's order), on a model whose pooler
    config says it was trained for them; any other model, or size, is refused."""
    path = tiny_checkpoints["qwen3"]
    p = random_prompts(8, [20])[0]
    hidden = hf_hidden(path, p)
    llm = LLM(path, num_kv_blocks=16, pooler_config={"matryoshka_dimensions": [16, 32]})
    (out,) = llm.embed([p], PoolingParams(dimensions=16), use_tqdm=False)
    assert_close(out.outputs.embedding, pooled(hidden, "LAST", dimensions=16))
    for bad, match in ((8, "trained for"), (0, "at least 1"), (65, "at most")):
        with pytest.raises(ValueError, match=match):
            llm.embed([p], PoolingParams(dimensions=bad), use_tqdm=False)
    anything = LLM(path, num_kv_blocks=16, pooler_config='{"matryoshka_dimensions": true}')
    (out,) = anything.embed([p], PoolingParams(dimensions=7, normalize=False), use_tqdm=False)
    assert_close(out.outputs.embedding, pooled(hidden, "LAST", normalize=False, dimensions=7))
    plain = LLM(path, num_kv_blocks=16)
    with pytest.raises(ValueError, match="Matryoshka"):
        plain.embed([p], PoolingParams(dimensions=16), use_tqdm=False)
    assert_engine_idle(plain)


def test_refusals_queue_nothing(tiny_checkpoints: dict[str, str]) -> None:
    path = tiny_checkpoints["llama"]
    llm = LLM(path, num_kv_blocks=8, max_model_len=100)
    good = random_prompts(9, [10])[0]
    with pytest.raises(AdmissionError, match="maximum context length is 100 tokens, but 101") as info:
        llm.embed([good, [5] * 101], use_tqdm=False)
    assert info.value.code == "context_length_exceeded"
    with pytest.raises(AdmissionError, match="pool holds 32") as info:
        LLM(path, num_kv_blocks=2, max_model_len=100).embed([[5] * 40], use_tqdm=False)
    assert info.value.code == "kv_cache_too_small"
    with pytest.raises(ValueError, match="at least one token"):
        llm.embed([[]], use_tqdm=False)
    with pytest.raises(ValueError, match=r"\[0, 512\)"):
        llm.embed([[1, 512]], use_tqdm=False)
    with pytest.raises(ValueError, match="truncate_prompt_tokens"):
        PoolingParams(truncate_prompt_tokens=0)
    with pytest.raises(ValueError, match="normalize"):
        PoolingParams(normalize="yes")
    with pytest.raises(TypeError, match="PoolingParams"):
        llm.embed([good], SamplingParams(), use_tqdm=False)
    with pytest.raises(ValueError, match="2 PoolingParams for 1 prompts"):
        llm.embed([good], [PoolingParams(), PoolingParams()], use_tqdm=False)
    assert_engine_idle(llm)
    (out,) = llm.embed([[5] * 150], truncate_prompt_tokens=100, use_tqdm=False)  # the last 100 kept
    assert out.prompt_token_ids == [5] * 100
    outs = llm.embed([[5] * 30] * 3, [None, PoolingParams(), PoolingParams(truncate_prompt_tokens=20)],
                     truncate_prompt_tokens=10, use_tqdm=False)  # for those that set none
    assert [len(o.prompt_token_ids) for o in outs] == [10, 10, 20]
    engine = llm.engine
    engine.add_pooling_request("x", good)
    with pytest.raises(ValueError, match="already in flight"):
        engine.add_request("x", good, SamplingParams())
    with pytest.raises(ValueError, match="already in flight"):
        engine.add_pooling_request("x", good)
    engine.abort_request("x")
    assert_engine_idle(llm)


@pytest.mark.parametrize("option", [{"pooling_type": "MAX"}, {"normalize": 1}, {"dimensions": 3},
                                    {"matryoshka_dimensions": [0]}, "{not json"])
def test_bad_pooler_configs_are_refused(tiny_checkpoints: dict[str, str], option) -> None:
    with pytest.raises(ValueError, match="pooling_type|normalize|pooler_config|matryoshka"):
        LLM(tiny_checkpoints["llama"], num_kv_blocks=8, pooler_config=option)


def _sentence_transformers(path: str, modes: dict[str, bool], modules: list[str]) -> None:
    """Write a sentence-transformers checkpoint's module files beside a transformers one."""
    kinds = {"Transformer": "", "Pooling": "1_Pooling", "Normalize": "2_Normalize", "Dense": "2_Dense"}
    entries = [{"idx": i, "name": str(i), "path": kinds[m], "type": f"sentence_transformers.models.{m}"}
               for i, m in enumerate(modules)]
    with open(os.path.join(path, "modules.json"), "w") as f:
        json.dump(entries, f)
    os.makedirs(os.path.join(path, "1_Pooling"), exist_ok=True)
    with open(os.path.join(path, "1_Pooling", "config.json"), "w") as f:
        json.dump({"word_embedding_dimension": 64, "pooling_mode_cls_token": False,
                   "pooling_mode_mean_tokens": False, "pooling_mode_max_tokens": False,
                   "pooling_mode_lasttoken": False, "include_prompt": True} | modes, f)


def test_sentence_transformers_checkpoints_pool_as_their_modules_say(tiny_checkpoints: dict[str, str],
                                                                     tmp_path) -> None:
    import shutil

    path = str(tmp_path / "st")
    shutil.copytree(tiny_checkpoints["llama"], path)
    p = random_prompts(10, [25])[0]
    hidden = hf_hidden(path, p)
    _sentence_transformers(path, {"pooling_mode_mean_tokens": True}, ["Transformer", "Pooling", "Normalize"])
    llm = LLM(path, num_kv_blocks=16)
    assert llm.engine.pooler == PoolerConfig("MEAN", True)
    assert_close(llm.embed([p], use_tqdm=False)[0].outputs.embedding, pooled(hidden, "MEAN"))
    # The engine option wins over the checkpoint's.
    llm = LLM(path, num_kv_blocks=16, pooler_config={"pooling_type": "cls"})
    assert llm.engine.pooler == PoolerConfig("CLS", True)
    _sentence_transformers(path, {"pooling_mode_lasttoken": True}, ["Transformer", "Pooling"])  # no Normalize
    assert LLM(path, num_kv_blocks=16).engine.pooler == PoolerConfig("LAST", False)
    for modes, modules, match in (({"pooling_mode_max_tokens": True}, ["Transformer", "Pooling"], "pooling"),
                                  ({"pooling_mode_mean_tokens": True}, ["Transformer", "Pooling", "Dense"], "Dense"),
                                  ({"pooling_mode_mean_tokens": True, "include_prompt": False},
                                   ["Transformer", "Pooling"], "include_prompt")):
        _sentence_transformers(path, modes, modules)
        with pytest.raises(ValueError, match=match):
            LLM(path, num_kv_blocks=16)


def test_a_checkpoint_without_an_lm_head_serves_embeddings_only(tmp_path) -> None:
    """A base model saved as such (transformers' LlamaModel: no `model.` prefix, no
    lm_head.weight), as embedding models are: it loads, embeds as transformers computes it,
    and generation is refused with a message that says why."""
    import transformers

    torch.manual_seed(0)
    path = str(tmp_path / "base")
    config = transformers.LlamaConfig(**TINY_COMMON, tie_word_embeddings=False)
    transformers.LlamaModel(config).save_pretrained(path)
    p = random_prompts(11, [30])[0]
    model = transformers.AutoModel.from_pretrained(path, dtype=torch.float32).eval()
    with torch.no_grad():
        hidden = model(torch.tensor([p])).last_hidden_state[0]
    llm = LLM(path, num_kv_blocks=16)
    assert not llm.engine.runner.model.has_lm_head
    assert_close(llm.embed([p], use_tqdm=False)[0].outputs.embedding, pooled(hidden, "LAST"))
    with pytest.raises(ValueError, match="embeddings only"):
        llm.generate([p], SamplingParams(max_tokens=2), use_tqdm=False)
    from engine import BeamSearchParams

    with pytest.raises(ValueError, match="embeddings only"):
        llm.beam_search([p], BeamSearchParams(beam_width=2, max_tokens=2))
    assert_engine_idle(llm)


def test_embeddings_with_lora_adapters(tiny_checkpoints: dict[str, str], tmp_path) -> None:
    """An embedding with an adapter pools the adapted model's hidden states (PEFT's), beside
    one of the base model; their prefixes are cached apart."""
    from tests.lora_adapters import save_adapter

    path = tiny_checkpoints["llama"]
    adapter = save_adapter(str(tmp_path / "a"), path, seed=3)
    p = random_prompts(12, [40])[0]
    llm = LLM(path, num_kv_blocks=32, enable_lora=True, max_loras=1, max_lora_rank=8)
    lora = LoRARequest("a", 1, adapter)
    outs = llm.embed([p, p], lora_request=[lora, None], use_tqdm=False)
    assert_close(outs[0].outputs.embedding, pooled(hf_hidden(path, p, adapter), "LAST"))
    assert_close(outs[1].outputs.embedding, pooled(hf_hidden(path, p), "LAST"))
    assert outs[0].lora_request is lora
    (again,) = llm.embed([p], lora_request=lora, use_tqdm=False)
    assert again.num_cached_tokens == 32 and again.outputs.embedding == pytest.approx(outs[0].outputs.embedding, abs=1e-5)
    assert_engine_idle(llm)


def test_an_embedding_aborted_in_flight_gives_its_adapter_back_once(tiny_checkpoints: dict[str, str],
                                                                     tmp_path) -> None:
    """Async: an embedding whose last step was launched has given its blocks and its adapter
    back; aborted before its vector is taken back, it gives nothing back twice (another
    request's hold on the adapter stays)."""
    from tests.lora_adapters import save_adapter

    path = tiny_checkpoints["llama"]
    lora = LoRARequest("a", 1, save_adapter(str(tmp_path / "a"), path, seed=4))
    llm = LLM(path, num_kv_blocks=32, max_num_batched_tokens=16, async_scheduling=True, enable_lora=True,
              max_lora_rank=8)
    engine = llm.engine
    short, long = random_prompts(13, [5, 60])
    engine.add_pooling_request("short", short, lora_request=lora)
    engine.add_pooling_request("long", long, lora_request=lora)
    engine.step()  # short's whole prompt and long's first chunk, launched
    assert engine.poolings["short"].request.finished and engine.loras.users[1] == 1
    assert engine.abort_request("short").outputs is None
    assert engine.loras.users[1] == 1  # long's
    finished = {}
    while engine.has_unfinished_requests():
        finished.update((o.request_id, o) for o in engine.step(outputs="final"))
    assert list(finished) == ["long"] and 1 not in engine.loras.users
    assert_close(finished["long"].outputs.embedding, pooled(hf_hidden(path, long, lora.lora_path), "LAST"))
    assert_engine_idle(llm)
