"""The offline benchmark runs end to end at tiny sizes and writes a complete report.

Numbers are not judged here (performance is shown by the benchmark itself, never by timed
tests): only that every field is present and positive.
"""

from __future__ import annotations

import json
import os

import pytest
import torch


@pytest.fixture(scope="module")
def tiny_llama(tmp_path_factory: pytest.TempPathFactory) -> str:
    import transformers

    torch.manual_seed(0)
    config = transformers.LlamaConfig(
        vocab_size=512, hidden_size=64, intermediate_size=128, num_hidden_layers=2, num_attention_heads=4,
        num_key_value_heads=2, max_position_embeddings=1024, initializer_range=0.3,
        bos_token_id=1, eos_token_id=2, tie_word_embeddings=False,
    )
    path = str(tmp_path_factory.mktemp("bench") / "tiny-llama")
    transformers.LlamaForCausalLM(config).save_pretrained(path)
    return path


def _positive(value: object) -> bool:
    return isinstance(value, (int, float)) and value > 0


def test_workload_is_deterministic_and_avoids_special_ids() -> None:
    from benchmarks.offline import make_workload

    a = make_workload(16, (8, 16), (4, 8), vocab_size=64, exclude={0, 1, 2}, seed=0)
    b = make_workload(16, (8, 16), (4, 8), vocab_size=64, exclude={0, 1, 2}, seed=0)
    assert a == b
    assert all(8 <= len(p) <= 16 for p in a.prompts)
    assert all(4 <= n <= 8 for n in a.output_lens)
    assert not {t for p in a.prompts for t in p} & {0, 1, 2}


def test_offline_benchmark_tiny(tiny_llama: str, tmp_path) -> None:
    from benchmarks.offline import main

    out = tmp_path / "offline.json"
    report = main([
        "--model", tiny_llama, "--num-requests", "4", "--min-prompt", "8", "--max-prompt", "16",
        "--min-output", "4", "--max-output", "8", "--sched-seqs", "16", "--sched-steps", "5",
        "--out", str(out),
    ])
    assert os.path.exists(out)
    data = json.loads(out.read_text())
    assert data["ratios"] == pytest.approx(report["ratios"])

    assert set(data["systems"]) == {"stoke", "static", "continuous"}
    for key, system in data["systems"].items():
        for field in ("wall_seconds", "useful_output_tokens", "generated_tokens", "useful_tokens_per_second",
                      "useful_gflops"):
            assert _positive(system[field]), (key, field, system[field])
        assert system["generated_tokens"] >= system["useful_output_tokens"]
        assert system["useful_output_tokens"] == data["workload"]["output_tokens"]
    for key in ("static", "continuous"):
        assert _positive(data["ratios"][key])
        assert 0 <= data["systems"][key]["exact_match_vs_stoke"] <= 1

    stoke = data["systems"]["stoke"]["extra"]
    for field in ("num_steps", "num_batched_tokens", "forward_seconds", "schedule_seconds", "sample_seconds"):
        assert _positive(stoke[field]), field

    for field in ("gflops", "median_ms"):
        assert _positive(data["matmul"][field])
    assert _positive(data["engine_gflops"]) and _positive(data["engine_matmul_fraction"])
    for field in ("prompt_tokens", "output_tokens"):
        assert _positive(data["workload"][field])
    assert _positive(data["useful_flops"]["total"])

    sched = data["scheduler_microbench"]
    assert sched["num_seqs"] == 16
    for field in ("median_ms", "p90_ms", "mean_ms"):
        assert _positive(sched[field])


def test_skip_flags_through_stoke_bench(tiny_llama: str, tmp_path) -> None:
    from server.cli import main

    status = main([
        "bench", "--model", tiny_llama, "--num-requests", "2", "--min-prompt", "4", "--max-prompt", "6",
        "--min-output", "2", "--max-output", "3", "--skip-transformers", "--sched-seqs", "4",
        "--sched-steps", "3", "--out", str(tmp_path / "o.json"),
    ])
    report = json.loads((tmp_path / "o.json").read_text())
    assert status == 0 and set(report["systems"]) == {"stoke"} and report["ratios"] == {}


def test_bad_arguments_are_rejected() -> None:
    from benchmarks.offline import parse_args

    with pytest.raises(SystemExit):
        parse_args(["--min-prompt", "10", "--max-prompt", "5"])


def test_host_overhead_benchmark_tiny(tmp_path) -> None:
    """benchmarks/host_overhead.py at a tiny batch: a window time per kind, in the JSON too."""
    from benchmarks.host_overhead import main as host_main

    out = tmp_path / "host.json"
    report = host_main(["--batch", "4", "--steps", "20", "--window", "10", "--out", str(out)])
    assert json.loads(out.read_text()) == json.loads(json.dumps(report))
    assert [(r["kind"], r["scheduling"]) for r in report["rows"]] == [
        ("cumulative", "sync"), ("delta", "sync"), ("final", "sync")]
    assert all(len(r["ms_per_step"]) == 2 and all(x > 0 for x in r["ms_per_step"]) and r["median_ms"] > 0
               and r["p99_step_ms"] >= min(r["ms_per_step"]) for r in report["rows"])
    assert report["prompt_tokens"] == [32, 128]
    assert all(r["gc_ms_per_step"] >= 0 and r["gc_longest_ms"] >= 0 and r["gc_full_collections"] >= 0
               for r in report["rows"]) and report["gc_freeze"] is False
    # With a stand-in device beside the host, synchronous and async scheduling.
    report = host_main(["--batch", "4", "--steps", "10", "--window", "5", "--kinds", "delta", "--device-ms", "1",
                        "--scheduling", "sync", "async", "--prompt-tokens", "300", "--out", str(out)])
    assert report["device_ms"] == 1.0 and report["prompt_tokens"] == [300, 300]
    assert [(r["scheduling"], len(r["ms_per_step"])) for r in report["rows"]] == [("sync", 2), ("async", 2)]
    # The stand-in device runs one 1 ms job a step, one after another: a window of 5 steps takes
    # at least 5 ms, or 4 ms with async scheduling, whose first job may have begun before the
    # window did (it was launched while the step before was taken back).
    sync, async_ = report["rows"]
    assert all(x >= 1.0 for x in sync["ms_per_step"]) and all(x >= 0.8 for x in async_["ms_per_step"])


def test_structured_benchmark_tiny(tmp_path) -> None:
    """benchmarks/structured.py at a tiny size: mask times and each kind's run, in the JSON too."""
    from benchmarks.structured import KINDS
    from benchmarks.structured import main as structured_main

    out = tmp_path / "structured.json"
    report = structured_main(["--prompts", "2", "--max-tokens", "6", "--rounds", "1", "--out", str(out)])
    assert json.loads(out.read_text()) == json.loads(json.dumps(report))
    assert list(report["masks"]) == ["json_schema", "grammar"]
    for masks in report["masks"].values():  # one answer's states, under the schema and the EBNF grammar alike
        assert masks["vocabulary"] == 49152 and masks["states"] > 10
        assert all(_positive(masks[k]) for k in ("cold_mask_ms", "cached_mask_ms", "advance_ms", "vocabulary_build_ms"))
    assert list(report["engine"]) == list(KINDS)
    assert all(_positive(e["tok_s"]) and e["tokens"] == 12 for e in report["engine"].values())


def test_speculative_benchmark_tiny(tmp_path) -> None:
    """benchmarks/speculative.py at a tiny size: every workload, batch and config, peers in the JSON."""
    from benchmarks.speculative import WORKLOADS
    from benchmarks.speculative import main as speculative_main

    out = tmp_path / "speculative.json"
    report = speculative_main(["--prompts", "2", "--max-tokens", "12", "--rounds", "1", "--configs",
                               "off,ngram:4:1:3", "--out", str(out)])
    assert json.loads(out.read_text()) == json.loads(json.dumps(report))
    results = report["results"]
    assert [(r["workload"], r["batch"], r["config"]) for r in results] == [
        (w, b, c) for w in WORKLOADS for b in (1, 2) for c in ("off", "ngram:4:1:3")]
    assert all(_positive(r["tok_s"]) and r["tokens"] == 24 for r in results)
    off = [r for r in results if r["config"] == "off"]
    assert all(r["speedup"] == 1.0 and r["acceptance"] is None for r in off)
    edit = [r for r in results if r["config"] != "off" and r["workload"] == "edit"]
    assert all(r["acceptance"] > 0 and r["tokens_per_verified_step"] > 1 for r in edit)


def test_lora_benchmark_tiny(tiny_llama: str, tmp_path) -> None:
    """benchmarks/lora.py at a tiny size: every case timed against the same requests without
    LoRA, its answers checked (LoRA unused gives the base model's; fewer slots, the same)."""
    from benchmarks.lora import main as lora_main

    out = tmp_path / "lora.json"
    report = lora_main(["--model", tiny_llama, "--num-requests", "3", "--adapters", "2", "--rank", "4",
                        "--prompt-len", "8", "--max-tokens", "4", "--rounds", "1", "--device", "cpu",
                        "--out", str(out)])
    assert json.loads(out.read_text()) == json.loads(json.dumps(report))
    assert [r["case"] for r in report["results"]] == ["no LoRA", "LoRA on, unused", "1 adapter",
                                                      "2 adapters, 2 slots", "2 adapters, 1 slots"]
    assert all(_positive(r["tok_s"]) and _positive(r["ms_per_step"]) for r in report["results"])
    assert report["results"][0]["vs_no_lora"] == 1.0
    assert report["checks"] == {"unused_equals_no_lora": True, "half_slots_equal_full": True}


def test_kv_offload_benchmark_tiny(tiny_llama: str, tmp_path) -> None:
    """benchmarks/kv_offload.py at a tiny size: chats that outgrow the pool, their histories
    loaded back from host memory with the host tier and computed again without, the answers
    the same."""
    from benchmarks.kv_offload import main as offload_main

    out = tmp_path / "kv_offload.json"
    report = offload_main(["--model", tiny_llama, "--chats", "3", "--turns", "3", "--system-len", "8",
                           "--user-len", "8", "--output-len", "4", "--max-num-seqs", "1", "--block-size", "4",
                           "--rounds", "1", "--device", "cpu", "--out", str(out)])
    assert json.loads(out.read_text()) == json.loads(json.dumps(report))
    assert report["same_tokens"] is True and report["host_pinned"] is False  # the CPU's
    offload, none = report["summary"]["offload"], report["summary"]["none"]
    assert offload["loaded_blocks"] > 0 and none["loaded_blocks"] == none["num_host_blocks"] == 0
    assert offload["computed_prompt_tokens"] < none["computed_prompt_tokens"]
    assert offload["prompt_tokens"] == none["prompt_tokens"] == 3 * (16 + 28 + 40)
    assert all(_positive(s[k]) for s in (offload, none) for k in ("seconds", "output_tok_s", "ttft_p50", "ttft_p99"))


def test_speculative_cost_benchmark_tiny(tiny_llama: str, tmp_path) -> None:
    """benchmarks/speculative_cost.py at a tiny size: with and without drafts at each batch, the
    oracle's drafts accepted at about their odds, the answers unchanged."""
    from benchmarks.speculative_cost import main as cost_main

    out = tmp_path / "speculative_cost.json"
    report = cost_main(["--model", tiny_llama, "--batches", "1,3", "--max-tokens", "16", "--prompt-len", "12",
                        "--rounds", "1", "--acceptance", "0.5", "--device", "cpu", "--out", str(out)])
    assert json.loads(out.read_text()) == json.loads(json.dumps(report))
    results = report["results"]
    assert [(r["batch"], r["drafts"]) for r in results] == [(1, False), (1, True), (3, False), (3, True)]
    assert all(_positive(r["tok_s"]) and _positive(r["ms_per_step"]) and r["same_tokens"] == r["batch"]
               for r in results)
    assert all(r["acceptance"] is None for r in results if not r["drafts"])
    assert all(0.2 < r["acceptance"] < 0.8 for r in results if r["drafts"])


def test_stream_rendering_benchmark_tiny(tmp_path) -> None:
    """benchmarks/stream_rendering.py at a tiny size: every case streamed through the server's
    own code, timed against the chat's content."""
    from benchmarks.stream_rendering import CASES
    from benchmarks.stream_rendering import main as rendering_main

    out = tmp_path / "stream_rendering.json"
    report = rendering_main(["--tokens", "16", "--rounds", "1", "--out", str(out)])
    assert json.loads(out.read_text()) == json.loads(json.dumps(report))
    assert [r["case"] for r in report["results"]] == list(CASES)
    assert all(_positive(r["us_per_token"]) for r in report["results"]) and report["results"][0]["vs_chat_content"] == 1.0


def test_beam_search_benchmark_tiny(tiny_llama: str, tmp_path) -> None:
    """benchmarks/beam_search.py at a tiny size: every case timed on the same searches, whose
    sequences are transformers' in each; stoke computes no token twice."""
    from benchmarks.beam_search import CASES
    from benchmarks.beam_search import main as beam_main

    out = tmp_path / "beam_search.json"
    report = beam_main(["--model", tiny_llama, "--num-prompts", "2", "--prompt-len", "20", "40", "--width", "3",
                        "--max-tokens", "5", "--rounds", "1", "--out", str(out)])
    assert json.loads(out.read_text()) == json.loads(json.dumps(report))
    results = report["results"]
    assert [r["case"] for r in results] == list(CASES)
    assert all(_positive(r["tok_s"]) and _positive(r["seconds"]) and r["same_as_transformers"] == 2 for r in results)
    stoke = {r["case"]: r for r in results}
    # past the prompt (whose prefill gives the first token), 3 beams x 4 steps for 3 x 5 sequence tokens
    assert stoke["stoke"]["computed_per_token"] == round(12 / 15, 3)
    assert stoke["per-step requests"]["computed_per_token"] > 1.0


def test_embeddings_benchmark_tiny(tiny_llama: str, tmp_path) -> None:
    """benchmarks/embeddings.py at a tiny size: every case timed on the same prompts, its vectors
    transformers' (one prompt at a time, unpadded)."""
    from benchmarks.embeddings import CASES
    from benchmarks.embeddings import main as embeddings_main

    out = tmp_path / "embeddings.json"
    report = embeddings_main(["--model", tiny_llama, "--num-prompts", "5", "--prompt-len", "3", "30",
                              "--shared-prefix", "16", "--batch-size", "2", "--rounds", "1", "--out", str(out)])
    assert json.loads(out.read_text()) == json.loads(json.dumps(report))
    results = report["results"]
    assert [r["case"] for r in results] == list(CASES)
    assert all(_positive(r["tok_s"]) and _positive(r["seconds"]) and r["max_abs_diff"] < 1e-4 for r in results)
    assert report["pooler"] == {"pooling_type": "LAST", "normalize": True}
    # with the prefix cache, the 16 shared tokens (one block) once; without it, every prompt token
    computed = {r["case"]: r["computed_tokens"] for r in results}
    assert computed["stoke"] == report["prompt_tokens"] - 4 * 16
    assert computed["stoke, no prefix cache"] == report["prompt_tokens"]


@pytest.mark.parametrize("kind", ["llm reranker", "cross-encoder"])
def test_rerank_benchmark_tiny(tmp_path, kind: str) -> None:
    """benchmarks/rerank.py at a tiny size, on a causal LM served as an LLM reranker and on a
    sequence classifier: every case scores the same pairs, as transformers one at a time does;
    with the prefix cache, a query's shared prefix is computed once for its documents."""
    from benchmarks.rerank import CASES
    from benchmarks.rerank import main as rerank_main
    from tests.conftest import save_tiny_causal_lm, save_tiny_classifier

    model = str(tmp_path / "model")
    if kind == "llm reranker":
        save_tiny_causal_lm(model)
    else:
        save_tiny_classifier(model, "llama", num_labels=1)
    out = tmp_path / "rerank.json"
    report = rerank_main(["--model", model, "--queries", "2", "--docs", "3", "--doc-len", "3", "12",
                          "--batch-size", "2", "--rounds", "1", "--out", str(out)])
    assert json.loads(out.read_text()) == json.loads(json.dumps(report))
    results = report["results"]
    assert [r["case"] for r in results] == list(CASES)
    assert all(_positive(r["tok_s"]) and _positive(r["pairs_s"]) and r["max_abs_diff"] < 1e-4 for r in results)
    assert (report["hf_overrides"] is not None) == (kind == "llm reranker") and report["pairs"] == 6
    computed = {r["case"]: r["computed_tokens"] for r in results}
    assert computed["stoke, no prefix cache"] == report["prompt_tokens"]
    assert computed["stoke"] <= report["prompt_tokens"] - 2 * 2 * 16  # at least one block per query, twice


def test_fp8_benchmark_on_the_default_model(tmp_path) -> None:
    """benchmarks/fp8.py at a tiny size over the embedded default's real weights: the fp8
    engine's projections take a byte a weight, its perplexity over the README stays near the
    wide model's, and the answers are compared."""
    from benchmarks.fp8 import main as fp8_main

    out = tmp_path / "fp8.json"
    report = fp8_main(["--num-requests", "2", "--prompt-len", "8", "--max-tokens", "4", "--rounds", "1",
                       "--text-tokens", "128", "--device", "cpu", "--out", str(out)])
    assert json.loads(out.read_text()) == json.loads(json.dumps(report))
    memory, quality = report["memory"], report["quality"]
    assert memory["fp8"]["weight_gib"] < 0.5 * memory["wide"]["weight_gib"]  # fp32 projections, embedding kept
    assert quality["real_weights"] and quality["text_tokens"] == 128
    assert 0.9 < quality["perplexity_ratio"] < 1.1  # fp8 per channel moves a model, a little (either way)
    assert 0 <= quality["same_answers"] <= 1 and 0 <= quality["mean_common_prefix"] <= 4
    assert [(r["case"], r["batch"]) for r in report["results"]] == [("wide", "batch 1"), ("fp8", "batch 1"),
                                                                    ("wide", "batch 2"), ("fp8", "batch 2")]
    assert all(_positive(r["tok_s"]) and _positive(r["ms_per_step"]) for r in report["results"])
