"""An fp8 KV cache (kv_cache_dtype="fp8", vLLM's --kv-cache-dtype fp8) end to end on CPU.

The oracle is transformers with every layer's keys and values rounded as the cache stores them,
through an attention function of its own (its AttentionInterface): x / scale saturated at ±448,
rounded to e4m3, times the scale. stoke must give its greedy tokens and logprobs, over chunked
prefills that read their cached prefix, prefix-cache hits, and blocks the host tier saved and
loaded back; with the checkpoint's per-layer scales; in a quarter of fp32's bytes per block.
"""

from __future__ import annotations

import sys

import pytest
import torch
import transformers
from transformers import AttentionInterface
from transformers.masking_utils import AttentionMaskInterface, eager_mask

from engine import LLM, SamplingParams
from engine.beam_search import BeamSearchParams
from engine.fp8 import kv_scale_of
from tests.conftest import (assert_engine_idle, assert_logprobs_equal_transformers, greedy_tokens, hf_beams,
                            random_prompts)
from tests.test_gemma import save as save_gemma
from tests.test_fp8 import _config, _ct_config, _ct_quantize, _is_projection, _save, _state
from tests.test_kv_offload import chat_turns, host_gib

# Two prompts sharing 24 tokens, so the second run of them hits the prefix cache.
SHARED = random_prompts(11, [24])[0]
PROMPTS = [SHARED + p for p in random_prompts(12, [9, 17])] + random_prompts(13, [5, 40])
E4M3_MAX = 448.0


def _rounded(x: torch.Tensor, scale: float) -> torch.Tensor:
    return ((x.float() / scale).clamp(-E4M3_MAX, E4M3_MAX).to(torch.float8_e4m3fn).float() * scale).to(x.dtype)


def _attention_over_fp8_kv(module: torch.nn.Module, query: torch.Tensor, key: torch.Tensor, value: torch.Tensor,
                           attention_mask: torch.Tensor | None, **kwargs: object) -> tuple[torch.Tensor, torch.Tensor]:
    """The model's own eager attention (Gemma 2's softcap and every window as transformers
    computes them) over its K/V rounded as an fp8 cache stores them."""
    k_scale, v_scale = getattr(module, "fp8_kv_scales", (1.0, 1.0))
    eager = sys.modules[type(module).__module__].eager_attention_forward
    return eager(module, query, _rounded(key, k_scale), _rounded(value, v_scale), attention_mask, **kwargs)


AttentionInterface.register("fp8_kv", _attention_over_fp8_kv)
AttentionMaskInterface.register("fp8_kv", eager_mask)


def _transformers_over_fp8_kv(path: str, scales: dict[int, tuple[float, float]] | None = None) -> torch.nn.Module:
    """transformers' model of `path` (fp32), its K/V rounded through e4m3 with `scales` per layer."""
    model = transformers.AutoModelForCausalLM.from_pretrained(path, dtype=torch.float32, attn_implementation="fp8_kv")
    for i, layer in enumerate(model.model.layers):
        layer.self_attn.fp8_kv_scales = (scales or {}).get(i, (1.0, 1.0))
    return model.eval()


def _run(path: str, **engine_args: object) -> LLM:
    return LLM(path, **{"num_kv_blocks": 64, "block_size": 8, "max_num_batched_tokens": 32} | engine_args)


def _greedy(llm: LLM, prompts: list[list[int]], max_tokens: int = 8) -> list[list[int]]:
    params = SamplingParams(max_tokens=max_tokens, temperature=0.0, ignore_eos=True)
    outs = llm.generate([{"prompt_token_ids": p} for p in prompts], params, use_tqdm=False)
    return [list(o.outputs[0].token_ids) for o in outs]


def _assert_caches_fp8(llm: LLM) -> None:
    for k_cache, v_cache in llm.engine.runner.kv_caches:
        assert k_cache.dtype == v_cache.dtype == torch.float8_e4m3fn


@pytest.mark.parametrize("kind", ["llama", "qwen3"])
def test_fp8_kv_cache_gives_the_tokens_of_transformers_over_kv_rounded_as_stored(kind, tiny_checkpoints) -> None:
    """Chunked prefills of 32 tokens (40-token prompts read their first chunk back from the
    cache), decodes, and a second run whose shared prefix comes from the prefix cache: each
    gives transformers' tokens over K/V rounded through e4m3, and logprobs to 1e-4."""
    path = tiny_checkpoints[kind]
    llm = _run(path, kv_cache_dtype="fp8")
    _assert_caches_fp8(llm)
    oracle = _transformers_over_fp8_kv(path)
    expected = greedy_tokens(oracle, PROMPTS, 8)
    assert _greedy(llm, PROMPTS) == expected
    hits = llm.engine.scheduler.block_manager.stats.hits_tokens
    assert _greedy(llm, PROMPTS) == expected  # again, the shared prefixes' blocks from the prefix cache
    assert llm.engine.scheduler.block_manager.stats.hits_tokens >= hits + 2 * 24
    assert_logprobs_equal_transformers(llm, oracle, PROMPTS, 6, prompt_logprobs=False)
    assert_engine_idle(llm)


@pytest.mark.parametrize("kind", ["gemma2", "gemma3"])
def test_fp8_kv_cache_under_windows_and_softcaps(kind, tmp_path) -> None:
    """Gemma 2 (windows of 8 keys on every other layer, softcapped scores) and Gemma 3 (its
    sliding layers a KV group of their own, their blocks before the window given back) over an
    fp8 cache: transformers' logprobs over K/V rounded as stored, past the windows."""
    path = str(tmp_path / kind)
    save_gemma(kind, path)
    llm = LLM(path, kv_cache_dtype="fp8", num_kv_blocks=96, block_size=4, max_num_batched_tokens=16)
    _assert_caches_fp8(llm)
    oracle = _transformers_over_fp8_kv(path)
    assert_logprobs_equal_transformers(llm, oracle, random_prompts(1, (40, 1, 17)), max_tokens=8)
    assert_engine_idle(llm)


def test_fp8_kv_cache_holds_four_times_the_blocks_of_fp32_in_one_budget(tiny_checkpoints) -> None:
    """The KV budget buys blocks at a byte per element: 4x fp32's (2x bf16's on a GPU)."""
    budget = 1 << 20
    wide, fp8 = (_run(tiny_checkpoints["llama"], num_kv_blocks=None, kv_cache_memory_bytes=budget, kv_cache_dtype=d)
                 for d in ("auto", "fp8"))
    # The tiny llama's block of 8 tokens: K and V of 2 layers, 2 heads of 16.
    assert fp8.engine.runner.block_bytes == 2 * 2 * 8 * 2 * 16 == wide.engine.runner.block_bytes // 4
    assert fp8.engine.runner.num_blocks == budget // (2 * 2 * 8 * 2 * 16) == 4 * wide.engine.runner.num_blocks
    assert sum(k.nbytes + v.nbytes for k, v in fp8.engine.runner.kv_caches) <= budget


def test_checkpoint_kv_scales_scale_the_fp8_cache(tiny_checkpoints, tmp_path) -> None:
    """An FP8 checkpoint with KV-cache scales (llm-compressor's kv_cache_scheme): layer 0 as
    llm-compressor names them (self_attn.k_scale / v_scale), small enough that keys saturate at
    448 · k_scale; layer 1 as AutoFP8 does (k_proj / v_proj output_scale). With an fp8 cache
    they scale it, transformers' tokens over the weights dequantized and K/V rounded so."""
    source = tiny_checkpoints["llama"]
    # as a checkpoint holds them, in fp32
    scales = {i: tuple(float(torch.tensor(s)) for s in pair) for i, pair in {0: (0.004, 0.01), 1: (0.03, 0.02)}.items()}
    state, plain = {}, {}
    for name, tensor in _state(source).items():
        if _is_projection(name):
            state[name], state[f"{name}_scale"], plain[name] = _ct_quantize(tensor, "channel")
        else:
            state[name] = plain[name] = tensor
    attn = "model.layers.{}.self_attn"
    state |= {f"{attn.format(0)}.k_scale": torch.tensor(scales[0][0]),
              f"{attn.format(0)}.v_scale": torch.tensor(scales[0][1]),
              f"{attn.format(1)}.k_proj.output_scale": torch.tensor([scales[1][0]]),
              f"{attn.format(1)}.v_proj.output_scale": torch.tensor([scales[1][1]])}
    kv_scheme = {"num_bits": 8, "type": "float", "strategy": "tensor", "dynamic": False, "symmetric": True}
    config = _config(source) | {"quantization_config": _ct_config("channel", {}, ["lm_head"]) | {
        "kv_cache_scheme": kv_scheme}}
    quantized = _save(str(tmp_path / "ct"), state, config)
    reference = _save(str(tmp_path / "plain"), plain, _config(source))

    llm = _run(quantized, kv_cache_dtype="fp8")
    layers = llm.engine.runner.model.model.layers
    assert [layer.self_attn.kv_scales for layer in layers] == [scales[0], scales[1]]
    oracle = _transformers_over_fp8_kv(reference, scales)
    assert _greedy(llm, PROMPTS) == greedy_tokens(oracle, PROMPTS, 8)
    # Layer 0's scale is small enough that some of its keys were stored saturated, at ±448.
    assert float(llm.engine.runner.kv_caches[0][0].float().abs().max()) == E4M3_MAX
    assert_logprobs_equal_transformers(llm, oracle, PROMPTS, 6)
    assert_engine_idle(llm)

    # KV scales an fp8 cache cannot take (one per head, or 0) leave a wide cache's load alone,
    # as before the fp8 cache; an fp8 cache refuses them by name.
    wide = _run(quantized)
    assert [layer.self_attn.kv_scales for layer in wide.engine.runner.model.model.layers] == [(1.0, 1.0)] * 2
    for name, bad in (("k_scale", torch.tensor([0.01, 0.02]).view(2, 1, 1)), ("v_scale", torch.tensor(0.0))):
        state_bad = state | {f"{attn.format(0)}.{name}": bad}
        path = _save(str(tmp_path / f"bad_{name}"), state_bad, config)
        assert _greedy(_run(path), PROMPTS) == _greedy(wide, PROMPTS)
        with pytest.raises(ValueError, match=f"self_attn.{name}"):
            _run(path, kv_cache_dtype="fp8")


def test_kv_scale_names_as_checkpoints_save_them() -> None:
    one = torch.tensor(0.5)
    assert kv_scale_of("model.layers.3.self_attn.k_scale", one) == (3, "k", 0.5)
    assert kv_scale_of("model.layers.3.self_attn.attn.v_scale", torch.tensor([0.25])) == (3, "v", 0.25)
    assert kv_scale_of("model.layers.0.self_attn.kv_scale", one) == (0, "kv", 0.5)  # one for both
    assert kv_scale_of("language_model.model.layers.7.self_attn.v_proj.output_scale", one) == (7, "v", 0.5)
    assert kv_scale_of("model.layers.0.self_attn.q_scale", one) is None
    assert kv_scale_of("model.layers.0.self_attn.o_proj.output_scale", one) is None
    assert kv_scale_of("model.layers.0.mlp.down_proj.input_scale", one) is None
    with pytest.raises(ValueError, match="holds 2 KV-cache scales: stoke scales an fp8 KV cache per tensor"):
        kv_scale_of("model.layers.0.self_attn.k_scale", torch.tensor([0.5, 0.5]))
    for bad in (0.0, -1.0, float("inf"), float("nan")):
        with pytest.raises(ValueError, match="must be positive and finite"):
            kv_scale_of("model.layers.0.self_attn.k_scale", torch.tensor(bad))


def test_fp8_blocks_the_host_tier_saved_come_back_as_they_left(tiny_checkpoints) -> None:
    """kv_offloading_size over an fp8 pool: the host tier holds the bytes (its blocks a quarter
    of fp32's), evicted prefixes load back from it, and every answer is the one computed with
    nothing offloaded, and transformers' over K/V rounded as stored."""
    path = tiny_checkpoints["llama"]
    config = dict(num_kv_blocks=24, block_size=4, max_num_batched_tokens=32, kv_cache_dtype="fp8")
    kept = LLM(path, **config)
    offloaded = LLM(path, kv_offloading_size=host_gib(64), **config)
    assert offloaded.engine.runner.host_kv.host.element_size() == 1
    assert offloaded.engine.runner.num_host_blocks == 4 * 64  # host_gib counts fp32 blocks
    turns = chat_turns(offloaded, seed=3, chats=3, turns=2)
    assert turns == chat_turns(kept, seed=3, chats=3, turns=2)
    stats = offloaded.engine.scheduler.block_manager.stats
    assert stats.loaded_blocks > 0 and stats.saved_blocks > 0
    oracle = _transformers_over_fp8_kv(path)
    assert [answer for _, answer in turns] == greedy_tokens(oracle, [prompt for prompt, _ in turns], 8)
    for llm in (offloaded, kept):
        assert_engine_idle(llm)


def test_beam_search_forks_copy_fp8_blocks(tiny_checkpoints) -> None:
    """Beam search over an fp8 cache: forks take copies of their parents' partial last blocks
    (bytes copied as they are) and the sequences are transformers' over K/V rounded as stored."""
    path = tiny_checkpoints["llama"]
    llm = _run(path, kv_cache_dtype="fp8", num_kv_blocks=256)
    oracle = _transformers_over_fp8_kv(path)
    params = BeamSearchParams(beam_width=3, max_tokens=9, ignore_eos=True)
    prompts = random_prompts(21, [13, 30])  # partial last blocks of 8 to copy
    for prompt, output in zip(prompts, llm.beam_search([{"prompt_token_ids": p} for p in prompts], params)):
        expected, scores = hf_beams(oracle, prompt, params, None)
        assert [s.tokens[len(prompt):] for s in output.sequences] == expected
        assert [s.cum_logprob / len(s.tokens[len(prompt):]) for s in output.sequences] == pytest.approx(scores, abs=1e-4)
    assert_engine_idle(llm)


@pytest.mark.parametrize("value", ["fp8_e5m2", "int8", "float16", ""])
def test_kv_cache_dtypes_stoke_does_not_store_are_refused(value, tiny_checkpoints) -> None:
    hint = " (stoke stores fp8 K/V as e4m3 only)" if value.startswith("fp8") else ""
    with pytest.raises(ValueError, match=f"kv_cache_dtype must be auto or one of fp8, fp8_e4m3, got '{value}'"
                                         + hint.replace("(", r"\(").replace(")", r"\)")):
        LLM(tiny_checkpoints["llama"], kv_cache_dtype=value)
