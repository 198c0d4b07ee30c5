"""Shared fixtures: tiny random checkpoints saved by transformers, and the transformers oracle."""

from __future__ import annotations

import os
import random
from collections.abc import Sequence

import pytest
import torch

TINY_COMMON = dict(
    vocab_size=512, hidden_size=64, intermediate_size=128, num_hidden_layers=2,
    num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=1024,
    # A wide init spreads the logits, so greedy argmax is not decided by rounding noise.
    initializer_range=0.3, bos_token_id=1, eos_token_id=2,
)


def _save_tiny(kind: str, path: str) -> str:
    import transformers

    torch.manual_seed(0)
    if kind == "llama":
        config = transformers.LlamaConfig(**TINY_COMMON, tie_word_embeddings=False,
                                          rope_scaling={"rope_type": "llama3", "factor": 8.0, "low_freq_factor": 1.0,
                                                        "high_freq_factor": 4.0, "original_max_position_embeddings": 128})
        model = transformers.LlamaForCausalLM(config)
    elif kind == "qwen2":
        config = transformers.Qwen2Config(**TINY_COMMON, tie_word_embeddings=True)
        model = transformers.Qwen2ForCausalLM(config)
    elif kind == "mistral":
        config = transformers.MistralConfig(**TINY_COMMON, sliding_window=None, tie_word_embeddings=False)
        model = transformers.MistralForCausalLM(config)
    elif kind == "qwen3":
        config = transformers.Qwen3Config(**TINY_COMMON, head_dim=32, tie_word_embeddings=False)
        model = transformers.Qwen3ForCausalLM(config)
    else:
        raise ValueError(kind)
    # Qwen2 is saved in shards, so the sharded-index path is covered too.
    model.save_pretrained(path, max_shard_size="200KB" if kind == "qwen2" else "5GB")
    return path


# Tiny mixtures of experts, each covering its family's own parts: Qwen3-MoE renormalised top-k
# and q/k norm; Qwen2-MoE a shared expert, qkv bias and a dense layer (mlp_only_layers); Mixtral
# its block_sparse_moe names.
TINY_MOE = {
    "qwen3_moe": ("Qwen3Moe", dict(head_dim=32, num_experts=8, num_experts_per_tok=2, moe_intermediate_size=32,
                                   norm_topk_prob=True)),
    "qwen2_moe": ("Qwen2Moe", dict(num_experts=4, num_experts_per_tok=2, moe_intermediate_size=32,
                                   shared_expert_intermediate_size=48, mlp_only_layers=[1])),
    "mixtral": ("Mixtral", dict(num_local_experts=4, num_experts_per_tok=2, sliding_window=None)),
}


def save_tiny_moe(path: str, kind: str, **config: object) -> str:
    """A tiny random mixture of experts (TINY_MOE's kinds), saved as transformers saves it."""
    import transformers

    torch.manual_seed(0)
    prefix, own = TINY_MOE[kind]
    hf_config = getattr(transformers, f"{prefix}Config")(**(TINY_COMMON | {"tie_word_embeddings": False} | own | config))
    getattr(transformers, f"{prefix}ForCausalLM")(hf_config).save_pretrained(path)
    return path


@pytest.fixture(scope="session")
def tiny_checkpoints(tmp_path_factory: pytest.TempPathFactory) -> dict[str, str]:
    root = tmp_path_factory.mktemp("tiny")
    return {kind: _save_tiny(kind, os.path.join(root, kind)) for kind in ("llama", "mistral", "qwen2", "qwen3")}

# The score template shipped for Qwen3-Reranker (`--chat-template` for a cross-encoder).
QWEN3_RERANKER_TEMPLATE = os.path.join(os.path.dirname(os.path.dirname(os.path.abspath(__file__))), "configs",
                                       "score_templates", "qwen3_reranker.jinja")


def save_tiny_classifier(path: str, kind: str, num_labels: int, **config: object) -> str:
    """A tiny random `*ForSequenceClassification` checkpoint (llama or qwen3) with the embedded
    model's tokenizer, so text prompts work: a cross-encoder with one label."""
    return _save_with_tokenizer(path, kind, "ForSequenceClassification",
                                dict(num_labels=num_labels, pad_token_id=2, **config))


def save_tiny_causal_lm(path: str, kind: str = "qwen3", **config: object) -> str:
    """A tiny random causal LM (llama or qwen3) with the embedded model's tokenizer: an LLM
    reranker's checkpoint, as Qwen3-Reranker's."""
    return _save_with_tokenizer(path, kind, "ForCausalLM", config)


def _save_with_tokenizer(path: str, kind: str, head: str, config: dict[str, object]) -> str:
    import shutil

    import transformers

    from engine.default_model import default_model_path

    torch.manual_seed(0)
    common = dict(TINY_COMMON, vocab_size=49152, **config)
    if kind == "llama":
        model = getattr(transformers, f"Llama{head}")(transformers.LlamaConfig(**common))
    elif kind == "qwen3":
        model = getattr(transformers, f"Qwen3{head}")(transformers.Qwen3Config(**common, head_dim=32))
    else:
        raise ValueError(kind)
    model.save_pretrained(path)
    for name in ("tokenizer.json", "tokenizer_config.json"):
        shutil.copy(os.path.join(default_model_path(), name), path)
    return path


@pytest.fixture(scope="session")
def default_model_dir() -> str:
    from engine.default_model import default_model_path

    return default_model_path()


def random_prompts(seed: int, lengths: Sequence[int]) -> list[list[int]]:
    """Prompts of these lengths, token ids drawn in [3, 500) (past the tiny models' special ones)."""
    rng = random.Random(seed)
    return [[rng.randrange(3, 500) for _ in range(n)] for n in lengths]


def hf_greedy(path: str, prompts: list[list[int]], max_new_tokens: int) -> list[list[int]]:
    """transformers' own greedy tokens (fp32, eager), one prompt at a time, EOS ignored."""
    import transformers

    model = transformers.AutoModelForCausalLM.from_pretrained(path, dtype=torch.float32)
    return greedy_tokens(model.eval(), prompts, max_new_tokens)


def greedy_tokens(model: torch.nn.Module, prompts: list[list[int]], max_new_tokens: int) -> list[list[int]]:
    """A transformers model's greedy tokens, one prompt at a time, EOS ignored."""
    outs = []
    for prompt in prompts:
        ids = torch.tensor([prompt])
        with torch.no_grad():
            gen = model.generate(ids, attention_mask=torch.ones_like(ids), max_new_tokens=max_new_tokens,
                                 min_new_tokens=max_new_tokens, do_sample=False, eos_token_id=None, pad_token_id=0)
        outs.append(gen[0, len(prompt):].tolist())
    return outs


def assert_logprobs_equal_transformers(llm, model: torch.nn.Module, prompts: list[list[int]], max_tokens: int,
                                      atol: float = 1e-4, prompt_logprobs: bool = True) -> None:
    """The engine's greedy run of `prompts` against the transformers `model`'s logits over each
    prompt and its answer: every prompt token's (unless not `prompt_logprobs`, which a cached
    prefix would not serve) and answer token's logprob (prefill and decode attention both), and
    each answer token the argmax, up to a near tie."""
    from engine import SamplingParams

    params = SamplingParams(max_tokens=max_tokens, temperature=0.0, ignore_eos=True, logprobs=0,
                            prompt_logprobs=0 if prompt_logprobs else None)
    for prompt, out in zip(prompts, llm.generate([{"prompt_token_ids": p} for p in prompts], params, use_tqdm=False)):
        answer = list(out.outputs[0].token_ids)
        ids = prompt + answer
        with torch.no_grad():
            expected = model(torch.tensor([ids])).logits[0, :-1].float().log_softmax(-1)
        first = 1 if prompt_logprobs else len(prompt)
        ours = [float(d[t]) for d, t in zip(out.prompt_logprobs[1:], prompt[1:])] if prompt_logprobs else []
        ours += [float(d[t]) for d, t in zip(out.outputs[0].logprobs, answer)]
        theirs = expected[torch.arange(first - 1, len(ids) - 1), torch.tensor(ids[first:])]
        torch.testing.assert_close(torch.tensor(ours), theirs, atol=atol, rtol=0)
        best = expected[len(prompt) - 1:].max(-1).values
        assert bool((theirs[-len(answer):] >= best - atol).all()), "an answer token is not transformers' argmax"


def assert_classify_and_embed_equal_transformers(classifier: tuple[str, torch.nn.Module],
                                                base: tuple[str, torch.nn.Module], prompts: list[list[int]],
                                                has_lm_head: bool = False) -> None:
    """A saved `*ForSequenceClassification` (path, model) classifies `prompts` with
    transformers' probabilities, and a saved base model (`*Model`) embeds them as its last
    hidden state, normalised; `has_lm_head`: the base model's tied embedding serves as a head."""
    from engine import LLM

    llm = LLM(classifier[0], num_kv_blocks=32)
    for p, out in zip(prompts, llm.classify(prompts, use_tqdm=False)):
        with torch.no_grad():
            expected = classifier[1](torch.tensor([p])).logits[0].softmax(-1)
        torch.testing.assert_close(torch.tensor(out.outputs.probs), expected, atol=1e-5, rtol=0)
    llm = LLM(base[0], num_kv_blocks=32)
    assert llm.engine.runner.model.has_lm_head == has_lm_head
    for p, out in zip(prompts, llm.embed(prompts, use_tqdm=False)):
        with torch.no_grad():
            last = base[1](torch.tensor([p])).last_hidden_state[0, -1]
        torch.testing.assert_close(torch.tensor(out.outputs.embedding), torch.nn.functional.normalize(last, dim=-1),
                                   atol=1e-5, rtol=0)
    assert_engine_idle(llm)


def hf_beams(model, prompt: list[int], params, eos: list[int] | None
             ) -> tuple[list[list[int]], list[float] | None]:
    """transformers' beam search (`params`: engine.BeamSearchParams): each sequence's output
    tokens (end token kept) and score."""
    ids = torch.tensor([prompt])
    with torch.no_grad():
        out = model.generate(ids, attention_mask=torch.ones_like(ids), max_new_tokens=params.max_tokens,
                             num_beams=params.beam_width, num_return_sequences=params.beam_width, do_sample=False,
                             length_penalty=params.length_penalty, early_stopping=params.early_stopping,
                             eos_token_id=eos, pad_token_id=0, output_scores=True, return_dict_in_generate=True)
    sequences = []
    for row in out.sequences.tolist():
        tokens = row[len(prompt):]
        # padding after an end token (or after a shorter sequence's length)
        end = next((i + 1 for i, t in enumerate(tokens) if eos and t in eos), None)
        sequences.append(tokens[:end] if end is not None else tokens)
    # one beam is greedy search to transformers, which scores nothing then
    return sequences, out.sequences_scores.tolist() if params.beam_width > 1 else None


def assert_engine_idle(llm) -> None:
    """Nothing of a finished workload left in the engine: every KV block free, no scheduler
    entry, block-table row, request, guide or proposer array."""
    engine = llm.engine
    bm = engine.scheduler.block_manager
    assert bm.num_used_blocks == 0 and bm.num_free_blocks == bm.num_blocks
    assert not engine.scheduler.running and not engine.scheduler.waiting
    assert len(engine.runner.block_tables) == 0, "block-table rows leaked"
    assert not engine.groups and not engine.samples and not engine.has_unfinished_requests()
    assert not engine.beam_groups and not engine.beam_requests
    assert not engine.poolings and not engine.pooling_requests
    assert engine._num_guided == 0
    if engine.proposer is not None:
        assert not engine.proposer._kept, "the proposer kept finished requests' arrays"
    bm.check_invariants()


# The longest modules first, longest first (a 2-core CI run, tests/ with --durations=0): under
# `--dist loadfile` a module is one worker's, so the compile checks' minutes, scheduled last,
# had one worker finishing them alone while the other sat idle. The Makefile keeps this order
# (--no-loadscope-reorder: xdist would otherwise start with the modules of the most tests).
LONGEST_FIRST = ("tests/test_kernels_compile.py", "tests/test_runner_gpu_path.py", "tests/test_kernels_triton.py",
                 "tests/test_speculative.py", "tests/test_benchmarks_kernels.py", "tests/test_engine.py")


def pytest_collection_modifyitems(items: list[pytest.Item]) -> None:
    rank = {module: i for i, module in enumerate(LONGEST_FIRST)}
    items.sort(key=lambda item: rank.get(item.nodeid.split("::")[0], len(rank)))  # stable: the rest as collected
