"""The engine's GPU path, exercised on the CPU wherever it can be: the one-copy transfer, the
sampler through packed tensors, the fused RMSNorm/rotary switch (Triton interpreter), the CUDA
graph replay logic (buckets, padding, static buffers, slicing) with an eager stand-in for the
captured graph, and the KV-budget arithmetic of the memory profile.

What only a GPU can show (a real capture and replay, the memory the graphs really take) runs in
`make gpu-check`; the `gpu` tests at the bottom capture for real when CUDA is present.

(Named to run after test_kernels_reference: a test here selects the Triton backend, which that
file checks is never imported unless chosen.)
"""

from __future__ import annotations

import contextlib
import importlib
import os
import random
import sys
from collections.abc import Iterator
from typing import Any

import torch

CUDA = torch.cuda.is_available()
if not CUDA:  # before any Triton kernel module is imported (see test_kernels_triton)
    os.environ["TRITON_INTERPRET"] = "1"

import pytest  # noqa: E402

import kernels  # noqa: E402
from engine import LLM, SamplingParams  # noqa: E402
from engine.cuda_graphs import (  # noqa: E402
    CudaGraphRunner,
    batch_buckets,
    bucket_for,
    pad_decode_inputs,
    pad_mixed_sequences,
    pad_tokens,
    token_buckets,
)
from engine.model_runner import is_triton  # noqa: E402
from engine.sampler import Sampler, SamplingRow  # noqa: E402
from engine.transfer import to_device  # noqa: E402

GREEDY = dict(temperature=0.0, ignore_eos=True)
CPU = dict(device="cpu")  # the CPU stand-ins below run on the CPU even on a GPU machine
# The Triton interpreter (TRITON_INTERPRET, set above) runs only on a machine without CUDA.
interpreter_only = pytest.mark.skipif(CUDA, reason="Triton on CPU tensors needs the interpreter (no CUDA)")


def prompts(seed: int, count: int, lo: int, hi: int) -> list[list[int]]:
    rng = random.Random(seed)
    return [[rng.randrange(3, 500) for _ in range(rng.randint(lo, hi))] for _ in range(count)]


def assert_same_tokens_and_logprobs(have, want) -> None:
    for a, b in zip(have, want, strict=True):
        assert a.outputs[0].token_ids == b.outputs[0].token_ids
        for da, db in zip(a.outputs[0].logprobs, b.outputs[0].logprobs):
            assert da.keys() == db.keys() and all(abs(da[t] - db[t]) < 1e-4 for t in da)


# ----------------------------------------------------------------------------- transfer


def test_packed_transfer_gives_equal_tensors() -> None:
    tensors = [
        torch.arange(5, dtype=torch.long), torch.tensor([], dtype=torch.long),
        torch.arange(12, dtype=torch.int32).view(3, 4), torch.tensor([0.5, -1.25, 3.0]),
        torch.tensor([True, False, True]), torch.zeros((0, 7), dtype=torch.int32), torch.tensor(7),
        torch.randn(2, 3, dtype=torch.float64),
    ]
    out = to_device(tensors, torch.device("cpu"), pack=True)
    assert len(out) == len(tensors)
    for a, b in zip(tensors, out):
        assert a.dtype == b.dtype and a.shape == b.shape and torch.equal(a, b)
        assert b.is_contiguous()
    # unpacked (the CPU default) hands the tensors back as they are
    assert all(a is b for a, b in zip(tensors, to_device(tensors, torch.device("cpu"))))


# ----------------------------------------------------------------------------- sampler


def _rows(rng: random.Random, batch: int, vocab: int) -> list[SamplingRow]:
    rows = []
    for _ in range(batch):
        p = SamplingParams(
            temperature=rng.choice([0.0, 0.7, 1.0]), top_k=rng.choice([0, 3]), top_p=rng.choice([1.0, 0.8]),
            min_p=rng.choice([0.0, 0.1]), repetition_penalty=rng.choice([1.0, 1.2]),
            frequency_penalty=rng.choice([0.0, 0.5]), presence_penalty=rng.choice([0.0, 0.3]),
            logprobs=rng.choice([None, 0, 3]), min_tokens=rng.choice([0, 3]), stop_token_ids=[1],
            seed=rng.choice([None, 11]),
        )
        gen = torch.Generator().manual_seed(p.seed) if p.seed is not None else None
        rows.append(SamplingRow(p, [rng.randrange(vocab) for _ in range(6)], 4, gen, [2]))  # 4 prompt, 2 output
    return rows


def test_sampler_one_transfer_per_step_and_packed_equals_unpacked(monkeypatch: pytest.MonkeyPatch) -> None:
    import engine.sampler as sampler_module

    calls: list[int] = []

    def packed(tensors, device, pack=None):
        calls.append(len(tensors))
        return to_device(tensors, device, pack=True)

    for seed in range(6):
        logits = torch.randn(7, 40, generator=torch.Generator().manual_seed(seed)) * 2
        results = []
        for patch in (False, True):
            if patch:
                monkeypatch.setattr(sampler_module, "to_device", packed)
            torch.manual_seed(seed)
            out = Sampler()(logits, _rows(random.Random(seed), 7, 40))
            results.append((out.token_ids, out.logprobs, out.top_logprobs))
        monkeypatch.undo()
        assert results[0] == results[1]
    assert len(calls) == 6  # one host-to-device transfer per step


# ----------------------------------------------------------------------------- fused norm/rope


@pytest.fixture(scope="module")
def norm_rope():
    return importlib.import_module("kernels.triton_norm_rope")


@interpreter_only
@pytest.mark.parametrize("kind", ["llama", "qwen3"])
def test_fused_norm_rope_kernels_give_the_same_tokens(tiny_checkpoints: dict[str, str], norm_rope, kind: str) -> None:
    ps = prompts(5, 3, 2, 20)
    params = SamplingParams(max_tokens=5, logprobs=3, **GREEDY)
    llm = LLM(tiny_checkpoints[kind], num_kv_blocks=32, **CPU)
    expected = llm.generate(ps, params)
    model = llm.engine.runner.model
    model.use_norm_rope_kernels(norm_rope)
    assert model.model.norm.kernels is norm_rope and model.model.layers[0].self_attn.rope_kernels is norm_rope
    got = llm.generate(ps, params)
    assert [o.outputs[0].token_ids for o in got] == [o.outputs[0].token_ids for o in expected]
    for a, b in zip(got, expected):
        for da, db in zip(a.outputs[0].logprobs, b.outputs[0].logprobs):
            assert da.keys() == db.keys()
            assert all(abs(da[t] - db[t]) < 1e-4 for t in da)
    model.use_norm_rope_kernels(None)
    assert [o.outputs[0].token_ids for o in llm.generate(ps, params)] == [o.outputs[0].token_ids for o in expected]


# ----------------------------------------------------------------------------- CUDA graphs


def test_buckets_and_padding() -> None:
    assert batch_buckets(256) == [1, 2, 4, 8, 16, 32, 64, 128, 256]
    assert batch_buckets(1000) == [1, 2, 4, 8, 16, 32, 64, 128, 256]
    assert batch_buckets(100) == [1, 2, 4, 8, 16, 32, 64, 100]
    assert batch_buckets(1) == [1]
    with pytest.raises(ValueError):
        batch_buckets(0)
    b = batch_buckets(100)
    assert [bucket_for(b, n) for n in (1, 3, 4, 5, 64, 65, 100, 101)] == [1, 4, 4, 8, 64, 100, 100, None]
    ids, pos, slots, ctx = [5, 6], [10, 3], [42, 7], [11, 4]
    pad_decode_inputs(2, 4, ids, pos, slots, ctx)
    assert ids == [5, 6, 0, 0] and pos == [10, 3, 0, 0] and slots == [42, 7, -1, -1] and ctx == [11, 4, 0, 0]
    assert token_buckets(2048) == [32, 48, 64, 96, 128, 192, 256, 384, 512, 768, 1024, 1536, 2048]
    assert token_buckets(100) == [32, 48, 64, 96, 100]
    assert token_buckets(64) == [32, 48, 64]
    assert token_buckets(20) == [20]
    with pytest.raises(ValueError):
        token_buckets(0)
    ids, pos, slots = [5, 6, 7], [0, 1, 9], [3, 4, 8]
    pad_tokens(2, ids, pos, slots)
    assert ids == [5, 6, 7, 0, 0] and pos == [0, 1, 9, 0, 0] and slots == [3, 4, 8, -1, -1]
    cu, ctx, rows = [0, 1, 3], [9, 2], [0, 2]
    pad_mixed_sequences(4, cu, ctx, rows)
    assert cu == [0, 1, 3, 3, 3] and ctx == [9, 2, 0, 0] and rows == [0, 2, 0, 0]


# What reads a tensor's values on the host: on CUDA a sync, which a graph capture refuses (the
# runner would then fall back to eager steps, slow and silent).
HOST_READS = ("item", "tolist", "cpu", "numpy", "__bool__", "__int__", "__float__", "__index__")


@contextlib.contextmanager
def graph_rules() -> Iterator[list[tuple[Any, ...]]]:
    """What a captured forward must obey, checked on the CPU. Inside, a host read of a tensor
    (HOST_READS) raises, except the Triton interpreter's own; and every Triton launch is
    recorded: the kernel, its grid, its scalar arguments and its tensors' shapes, strides and
    dtypes. A CUDA graph replays its captured launches with exactly these, whatever the step,
    so they must not depend on the step."""
    from triton.runtime.interpreter import InterpretedFunction

    interpreter = os.path.dirname(InterpretedFunction.run.__code__.co_filename)
    originals = {name: getattr(torch.Tensor, name) for name in HOST_READS}

    def forbidden(name: str):
        original = originals[name]

        def read(self, *args, **kwargs):
            frame = sys._getframe(1)
            while frame is not None:  # the interpreter runs kernels on host copies: allowed
                if frame.f_code.co_filename.startswith(interpreter):
                    return original(self, *args, **kwargs)
                frame = frame.f_back
            raise AssertionError(f"Tensor.{name} in a graphed forward: a host sync, which CUDA graph capture refuses")
        return read

    launched: list[tuple[Any, ...]] = []
    run = InterpretedFunction.run

    def describe(value: Any) -> Any:
        if isinstance(value, torch.Tensor):
            return ("tensor", tuple(value.shape), value.stride(), value.dtype)
        return value if value is None or isinstance(value, (bool, int, float, str)) else type(value).__name__

    def recording(self, *args, grid, warmup, **kwargs):
        grid_now = grid(kwargs) if callable(grid) else grid
        launched.append((self.__name__, tuple(grid_now), tuple(describe(a) for a in args),
                         tuple(sorted((k, describe(v)) for k, v in kwargs.items()))))
        return run(self, *args, grid=grid, warmup=warmup, **kwargs)

    InterpretedFunction.run = recording
    for name in HOST_READS:
        setattr(torch.Tensor, name, forbidden(name))
    try:
        yield launched
    finally:
        InterpretedFunction.run = run
        for name, original in originals.items():
            setattr(torch.Tensor, name, original)


class EagerGraph:
    """Stands in for a captured CUDA graph on the CPU: replay runs the forward on the static
    input buffers and writes the graph's static output, exactly what a real replay does. The
    first replay stands for the capture: every later one must make the same Triton launches
    (grids, scalars, shapes), as a real graph can do nothing else; no replay may read a
    tensor on the host (`graph_rules`)."""

    def __init__(self, runner: CudaGraphRunner, key: tuple[str, int], log: list[tuple[str, int]]) -> None:
        self.runner, self.key, self.log = runner, key, log
        self.captured: list[tuple[Any, ...]] | None = None

    def replay(self) -> None:
        self.log.append(self.key)
        # The reference backend syncs (store_kv looks for skipped slots): it is never captured.
        rules = graph_rules() if is_triton(self.runner.backend) else contextlib.nullcontext([])
        with torch.inference_mode(), rules as launched:
            self.runner.outputs[self.key].copy_(self.runner.run(self.key))
        if self.captured is None:
            self.captured = launched
        for i, (now, then) in enumerate(zip(launched, self.captured)):
            assert now == then, f"{self.key}: launch {i} differs from the captured one:\n{now}\n{then}"
        assert len(launched) == len(self.captured), f"{self.key}: {len(launched)} launches, captured {len(self.captured)}"


def with_eager_graphs(llm: LLM, max_num_seqs: int, tokens: list[int] = ()) -> list[tuple[str, int]]:
    """Give llm's runner CUDA-graph machinery (decode graphs, and mixed ones for `tokens`)
    whose graphs replay eagerly; returns the log of replayed graphs."""
    runner = llm.engine.runner
    log: list[tuple[str, int]] = []
    g = CudaGraphRunner(runner.model, runner.model.compute_logits, runner.kv_caches, runner.backend,
                        batch_buckets(max_num_seqs), list(tokens), max_num_seqs, runner.graph_table_width,
                        runner.device, runner.layer_groups)
    c = runner.model_config
    for key in g.keys:
        g.graphs[key] = EagerGraph(g, key, log)
        shape = (key[1], c.vocab_size) if key[0] == "decode" else (max_num_seqs, c.hidden_size)
        g.outputs[key] = torch.full(shape, float("nan"))  # stale garbage must never leak out
    # Stale static inputs from "earlier steps": every replay must overwrite what it reads.
    g.input_ids.fill_(7)
    g.positions.fill_(3)
    g.block_tables.fill_(5)
    g.context_lens.fill_(9)
    g.cu_seqlens.fill_(2)
    runner.cuda_graphs = g
    execute_graph = runner._execute_graph

    def spy(batch, key, previous):
        padded.append(len(batch.requests) < key[1] if key[0] == "decode" else sum(batch.num_tokens) < key[1])
        steps.append((key[0], batch.num_decodes, len(batch.requests)))
        return execute_graph(batch, key, previous)

    padded: list[bool] = []
    steps: list[tuple[str, int, int]] = []  # (graph kind, decodes, sequences) of each replayed step
    runner._execute_graph = spy
    runner.padded_replays, runner.replayed_steps = padded, steps
    return log


@pytest.mark.parametrize("backend", ["reference", pytest.param("triton", marks=interpreter_only)])
def test_decode_graph_replay_path_gives_eager_tokens(tiny_checkpoints: dict[str, str],
                                                     monkeypatch: pytest.MonkeyPatch, backend: str) -> None:
    monkeypatch.setenv(kernels.BACKEND_ENV, backend)
    path = tiny_checkpoints["llama"]
    # The interpreter is slow: a smaller run for Triton (whose padding rows see context 0).
    lens = (2, 3, 5, 8, 9, 14) if backend == "reference" else (1, 2, 3, 5)
    ps = prompts(9, len(lens), 1, 40 if backend == "reference" else 12)
    params = [SamplingParams(max_tokens=n, **GREEDY) for n in lens]
    args = dict(num_kv_blocks=48, max_num_seqs=5, max_num_batched_tokens=64, max_model_len=256, dtype="float32", **CPU)
    expected = [o.outputs[0].token_ids for o in LLM(path, **args).generate(ps, params)]
    llm = LLM(path, **args)
    assert llm.engine.runner.cuda_graphs is None  # never on the CPU by itself
    log = with_eager_graphs(llm, 5)
    assert llm.engine.runner.cuda_graphs.buckets == [1, 2, 4, 5]
    got = [o.outputs[0].token_ids for o in llm.generate(ps, params)]
    assert got == expected
    # the batch shrinks as requests finish, down to one row; 3 decoding rows replay bucket 4
    assert {("decode", 1), ("decode", 2), ("decode", 4)} <= set(log), log
    assert any(llm.engine.runner.padded_replays)
    # logprobs through a replayed step are those of the eager step
    lp = SamplingParams(max_tokens=3, logprobs=2, **GREEDY)
    want = LLM(path, **args).generate(ps[:3], lp)
    have = llm.generate(ps[:3], lp)
    assert_same_tokens_and_logprobs(have, want)


@interpreter_only
@pytest.mark.parametrize("kind,splits", [("llama", 3), ("qwen3", None)])
def test_mixed_graph_replay_path_gives_eager_tokens(tiny_checkpoints: dict[str, str],
                                                    monkeypatch: pytest.MonkeyPatch, kind: str,
                                                    splits: int | None) -> None:
    """Steps with prefill chunks (whole prompts, chunks after a cached prefix, decodes beside
    them) through the mixed graphs' padded inputs, the graphed decode kernel and the prefill
    kernel skipping the decodes: the tokens and logprobs of the eager Triton path, and no KV
    block leaks. `splits`: the split-K factor forced (the CPU's own choice is 1), in eager
    decodes and graphed ones alike."""
    monkeypatch.setenv(kernels.BACKEND_ENV, "triton")
    triton_ops = importlib.import_module("kernels.triton_ops")
    if splits is not None:
        monkeypatch.setattr(triton_ops, "_num_splits", lambda *args, **kwargs: splits)
    chosen: list[tuple[int, int]] = []
    graphed_splits = triton_ops.graphed_decode_splits
    monkeypatch.setattr(triton_ops, "graphed_decode_splits",
                        lambda nd, *a: chosen.append((nd, graphed_splits(nd, *a))) or chosen[-1][1])
    path = tiny_checkpoints[kind]
    lens = (3, 6, 2, 5, 4)
    ps = prompts(4, len(lens), 2, 30)
    ps[3] = ps[0][:20] + ps[3]  # a cached prefix (prefix caching on): its chunk starts past it
    params = [SamplingParams(max_tokens=n, logprobs=1, **GREEDY) for n in lens]
    args = dict(num_kv_blocks=40, max_num_seqs=4, max_num_batched_tokens=40, max_model_len=128,
                max_num_partial_prefills=2, dtype="float32", **CPU)
    want = LLM(path, **args).generate(ps, params)
    for async_scheduling in (False, True):  # async: decodes read their token from the last step's ids
        llm = LLM(path, async_scheduling=async_scheduling, **args)
        log = with_eager_graphs(llm, 4, tokens=[8, 16, 40])
        have = llm.generate(ps, params)
        assert_same_tokens_and_logprobs(have, want)
    steps = llm.engine.runner.replayed_steps
    assert {k for k, _ in log} == {"decode", "mixed"}, log
    assert any(k == "mixed" and 0 < nd < n for k, nd, n in steps), steps  # decodes beside a chunk
    assert any(nd > 0 and s == (splits or 1) for nd, s in chosen), chosen
    assert any(llm.engine.runner.padded_replays)
    bm = llm.engine.scheduler.block_manager
    assert bm.num_free_blocks == bm.num_blocks, "blocks leaked"


@interpreter_only
def test_a_hybrid_models_groups_replay_the_graphs(tmp_path, monkeypatch: pytest.MonkeyPatch) -> None:
    """Gemma 3's full and sliding layers in two KV groups, each with its own slots and block
    tables in the graphs' static inputs, its sliding blocks before the window given back as
    sequences pass them: decode and mixed replays give the eager Triton path's tokens and
    logprobs (which transformers' are, tests/test_gemma.py), and no block leaks."""
    from tests.test_gemma import save

    monkeypatch.setenv(kernels.BACKEND_ENV, "triton")
    save("gemma3", str(tmp_path))
    lens = (8, 4, 6)
    ps = prompts(8, len(lens), 2, 24)
    ps[2] = ps[0][:20] + ps[2]  # a cached prefix: its sliding group's window blocks hit
    params = [SamplingParams(max_tokens=n, logprobs=1, **GREEDY) for n in lens]
    args = dict(num_kv_blocks=60, block_size=4, max_num_seqs=4, max_num_batched_tokens=16, max_model_len=128,
                dtype="float32", **CPU)
    want = LLM(str(tmp_path), **args).generate(ps, params)
    llm = LLM(str(tmp_path), **args)
    assert llm.engine.runner.layer_groups == (1, 0, 1, 0)  # layers 1 and 3 are full: the anchor
    log = with_eager_graphs(llm, 4, tokens=[8, 16])
    assert llm.engine.runner.cuda_graphs.block_tables.shape[0] == 2
    have = llm.generate(ps, params)
    assert_same_tokens_and_logprobs(have, want)
    assert {k for k, _ in log} == {"decode", "mixed"}, log
    assert llm.engine.scheduler.block_manager.stats.hits_tokens > 0
    bm = llm.engine.scheduler.block_manager
    assert bm.num_free_blocks == bm.num_blocks, "blocks leaked"


@interpreter_only
def test_speculative_steps_replay_the_mixed_graphs(tiny_checkpoints: dict[str, str],
                                                   monkeypatch: pytest.MonkeyPatch) -> None:
    """Decodes verifying drafts ride the mixed graphs as chunks, a logits row per position (up
    to max_num_seqs rows): the tokens and logprobs of the eager Triton path without speculation,
    and no KV block leaks."""
    monkeypatch.setenv(kernels.BACKEND_ENV, "triton")
    path = tiny_checkpoints["llama"]
    ps = prompts(5, 3, 3, 12)
    params = [SamplingParams(max_tokens=n, logprobs=1, **GREEDY) for n in (6, 4, 5)]
    args = dict(num_kv_blocks=40, max_num_seqs=8, max_num_batched_tokens=40, max_model_len=128, dtype="float32", **CPU)
    want = LLM(path, **args).generate(ps, params)
    llm = LLM(path, speculative_config={"method": "ngram", "num_speculative_tokens": 2}, **args)
    expected = {tuple(p): o.outputs[0].token_ids for p, o in zip(ps, want)}

    def propose(request, token_ids, max_drafts):  # a random model repeats nothing: drafts, one right, one wrong
        done = len(token_ids) - request.num_prompt_tokens
        return (expected[tuple(request.prompt_token_ids)][done:done + 1] + [3])[:max_drafts]

    monkeypatch.setattr(llm.engine.proposer, "propose", propose)
    with_eager_graphs(llm, 8, tokens=[8, 16, 40])
    have = llm.generate(ps, params)
    assert_same_tokens_and_logprobs(have, want)
    steps = llm.engine.runner.replayed_steps
    assert any(k == "mixed" and nd < n for k, nd, n in steps[1:]), steps  # decodes with drafts, graphed
    assert llm.engine.stats.num_accepted_tokens > 0
    bm = llm.engine.scheduler.block_manager
    assert bm.num_free_blocks == bm.num_blocks, "blocks leaked"


@interpreter_only
def test_embeddings_ride_the_mixed_graphs(tiny_checkpoints: dict[str, str], monkeypatch: pytest.MonkeyPatch) -> None:
    """An embedding's last prompt token rides a mixed graph (its hidden states kept after the
    sampling rows'), beside decodes; a one-token prompt among decodes takes the mixed graph,
    not the decode graph (which keeps logits only). The vectors and tokens of the eager path."""
    monkeypatch.setenv(kernels.BACKEND_ENV, "triton")
    path = tiny_checkpoints["llama"]
    embed_ps, gen_ps = prompts(6, 3, 1, 14), prompts(7, 2, 3, 8)
    embed_ps[0] = embed_ps[0][:1]
    params = SamplingParams(max_tokens=4, **GREEDY)
    args = dict(num_kv_blocks=40, max_num_seqs=4, max_num_batched_tokens=40, max_model_len=128, dtype="float32", **CPU)

    def run(llm: LLM) -> tuple[dict[str, list[float]], dict[str, list[int]]]:
        engine, outs = llm.engine, {}
        for i, p in enumerate(gen_ps):
            engine.add_request(f"g{i}", p, params)
        engine.step()  # the generations' prefill: they decode beside the embeddings from here
        for i, p in enumerate(embed_ps):
            engine.add_pooling_request(f"e{i}", p)
        while engine.has_unfinished_requests():
            outs.update((o.request_id, o) for o in engine.step(outputs="final"))
        return ({k: o.outputs.embedding for k, o in outs.items() if k[0] == "e"},
                {k: o.outputs[0].token_ids for k, o in outs.items() if k[0] == "g"})

    want_embeddings, want_tokens = run(LLM(path, **args))
    llm = LLM(path, **args)
    with_eager_graphs(llm, 4, tokens=[8, 16, 40])
    have_embeddings, have_tokens = run(llm)
    assert have_tokens == want_tokens
    for key, want in want_embeddings.items():
        assert torch.allclose(torch.tensor(have_embeddings[key]), torch.tensor(want), atol=1e-5)
    steps = llm.engine.runner.replayed_steps
    assert steps[0][0] == "mixed" and any(k == "mixed" and 0 < nd < n for k, nd, n in steps), steps
    bm = llm.engine.scheduler.block_manager
    assert bm.num_free_blocks == bm.num_blocks, "blocks leaked"


@interpreter_only
@pytest.mark.parametrize("kind", ["qwen3", "qwen2_moe"])
def test_fp8_projections_ride_the_graphs_through_the_triton_kernel(tiny_checkpoints: dict[str, str], kind: str,
                                                                  tmp_path, monkeypatch: pytest.MonkeyPatch) -> None:
    """quantization="fp8" on the Triton path: every fp8 projection runs kernels.triton_fp8 (the
    reference dequantizes whole weights), and fp8 experts kernels.triton_moe, in eager steps and
    replayed decode and mixed graphs, with the tokens and logprobs of the reference's fp8 engine."""
    from tests.conftest import save_tiny_moe

    path = tiny_checkpoints[kind] if kind in tiny_checkpoints else save_tiny_moe(str(tmp_path / kind), kind)
    ps = prompts(8, 3, 2, 12)
    params = [SamplingParams(max_tokens=n, logprobs=1, **GREEDY) for n in (4, 2, 3)]
    args = dict(num_kv_blocks=40, max_num_seqs=4, max_num_batched_tokens=40, max_model_len=128, dtype="float32",
                quantization="fp8", **CPU)
    monkeypatch.setenv(kernels.BACKEND_ENV, "reference")
    want = LLM(path, **args).generate(ps, params)
    monkeypatch.setenv(kernels.BACKEND_ENV, "triton")
    llm = LLM(path, **args)
    triton_fp8 = importlib.import_module("kernels.triton_fp8")
    fp8 = [m for m in llm.engine.runner.model.modules() if getattr(m, "weight_scale", None) is not None]
    assert fp8 and all(m.fp8_kernels is triton_fp8 for m in fp8)
    calls: list[int] = []
    run = triton_fp8.fp8_linear
    monkeypatch.setattr(triton_fp8, "fp8_linear", lambda x, *a, **k: calls.append(x.shape[0]) or run(x, *a, **k))
    triton_moe = importlib.import_module("kernels.triton_moe")
    experts: list[bool] = []
    moe = triton_moe.fused_moe
    monkeypatch.setattr(triton_moe, "fused_moe",
                        lambda *a, **k: experts.append(k.get("fp8_scales") is not None) or moe(*a, **k))
    log = with_eager_graphs(llm, 4, tokens=[8, 16, 40])
    assert_same_tokens_and_logprobs(llm.generate(ps, params), want)
    assert calls and {k for k, _ in log} == {"decode", "mixed"}, log
    assert experts == ([True] * len(experts) if kind == "qwen2_moe" else []) and (experts or kind == "qwen3")


def test_graph_choice(tiny_checkpoints: dict[str, str]) -> None:
    from scheduler import ScheduledBatch

    llm = LLM(tiny_checkpoints["llama"], num_kv_blocks=16, max_num_seqs=4, max_model_len=64, **CPU)
    runner = llm.engine.runner
    llm.engine.add_request("a", [5, 6, 7], SamplingParams(max_tokens=8, **GREEDY))
    llm.engine.step()  # the prefill
    request = llm.engine.scheduler.running[0]
    assert runner.graph_key(ScheduledBatch([request], [1], num_decodes=1)) is None  # no graphs yet
    with_eager_graphs(llm, 4)
    assert runner.graph_key(ScheduledBatch([request], [1], num_decodes=1)) == ("decode", 1)
    assert runner.graph_key(ScheduledBatch([request], [1], num_decodes=0)) is None  # a chunk; no mixed graph
    assert runner.graph_key(ScheduledBatch([], [], num_decodes=0)) is None
    assert runner.graph_key(ScheduledBatch([request] * 5, [1] * 5, num_decodes=5)) is None  # > largest bucket
    assert runner.graph_key(ScheduledBatch([request] * 3, [1] * 3, num_decodes=3)) == ("decode", 4)
    with_eager_graphs(llm, 4, tokens=[8, 32])
    assert runner.graph_key(ScheduledBatch([request], [1], num_decodes=0)) == ("mixed", 8)
    assert runner.graph_key(ScheduledBatch([request] * 2, [1, 9], num_decodes=1)) == ("mixed", 32)
    assert runner.graph_key(ScheduledBatch([request] * 2, [1, 32], num_decodes=1)) is None  # > largest bucket
    assert runner.graph_key(ScheduledBatch([request] * 3, [1] * 3, num_decodes=3)) == ("decode", 4)
    assert runner.graph_key(ScheduledBatch([request] * 5, [1] * 5, num_decodes=5)) is None  # > max_num_seqs
    assert runner.graph_key(ScheduledBatch([request], [62], num_decodes=0)) is None  # past max_model_len
    # decodes verifying drafts: mixed, while their logits rows fit the graph's max_num_seqs rows
    assert runner.graph_key(ScheduledBatch([request], [3], spec_token_ids={request: [5, 6]})) == ("mixed", 8)
    assert runner.graph_key(ScheduledBatch([request], [5], spec_token_ids={request: [5, 6, 7, 8]})) is None
    # an embedding's one-token prompt among decodes: the mixed graph keeps its hidden states
    llm.engine.add_pooling_request("e", [9])
    embedding = llm.engine.scheduler.waiting[0]
    assert runner.graph_key(ScheduledBatch([request, embedding], [1, 1], num_decodes=2), pooling=True) == ("mixed", 8)
    assert runner.graph_key(ScheduledBatch([request] * 2, [1, 1], num_decodes=2), pooling=True) == ("decode", 2)
    llm.engine.abort_request("e")
    llm.engine.abort_request("a")


def test_cuda_graph_mode_is_checked(tiny_checkpoints: dict[str, str]) -> None:
    with pytest.raises(ValueError, match="cuda_graph_mode"):
        LLM(tiny_checkpoints["llama"], num_kv_blocks=16, cuda_graph_mode="piecewise", **CPU)


def test_a_failed_capture_falls_back_to_eager(tiny_checkpoints: dict[str, str], monkeypatch: pytest.MonkeyPatch) -> None:
    def broken(self):
        raise RuntimeError("operation not permitted when stream is capturing")

    monkeypatch.setattr(CudaGraphRunner, "capture", broken)
    llm = LLM(tiny_checkpoints["llama"], num_kv_blocks=16, max_num_seqs=4, **CPU)
    runner = llm.engine.runner
    runner.graph_buckets = batch_buckets(4)
    runner._capture_cuda_graphs()
    assert runner.cuda_graphs is None and "not permitted" in runner.memory_profile["cuda_graphs_error"]
    out = llm.generate([[5, 6, 7]], SamplingParams(max_tokens=3, **GREEDY))
    assert len(out[0].outputs[0].token_ids) == 3


# ----------------------------------------------------------------------------- memory profile


def test_kv_budget_profile_arithmetic(tiny_checkpoints: dict[str, str], monkeypatch: pytest.MonkeyPatch) -> None:
    """The profile on the CPU with a fake CUDA memory model: it runs the largest step, the
    sampler and the largest decode and mixed graphs, charges this engine for its own growth since its
    baseline (not for what was taken before it), and never plans past the free memory."""
    from engine.model_runner import (CUDA_GRAPH_SLACK_BYTES, FREE_MEMORY_MARGIN_BYTES, FREE_MEMORY_SEGMENT_BYTES,
                                     CudaMemory)

    llm = LLM(tiny_checkpoints["qwen3"], num_kv_blocks=8, max_num_seqs=6, max_num_batched_tokens=96,
              max_model_len=200, gpu_memory_utilization=0.5, **CPU)
    runner = llm.engine.runner
    runner.graph_buckets = batch_buckets(6)
    runner.graph_token_buckets = token_buckets(96)
    GiB = 1 << 30
    # Before the engine: 2 GiB taken by others, 0.5 GiB of it live tensors of this process.
    runner.cuda_baseline = CudaMemory(free=78 * GiB, total=80 * GiB, allocated=GiB // 2)
    fake = dict(allocated=7 * GiB // 2, peak=6 * GiB, free=73 * GiB, total=80 * GiB)
    for name in ("synchronize", "empty_cache", "reset_peak_memory_stats"):
        monkeypatch.setattr(torch.cuda, name, lambda *a, **k: None)
    monkeypatch.setattr(torch.cuda, "memory_allocated", lambda *a: fake["allocated"])
    monkeypatch.setattr(torch.cuda, "max_memory_allocated", lambda *a: fake["peak"])
    monkeypatch.setattr(torch.cuda, "mem_get_info", lambda *a: (fake["free"], fake["total"]))
    budget = runner._profile_cuda_kv_budget()
    prof = runner.memory_profile
    c = runner.model_config
    cache_bytes = 2 * c.num_layers * (96 // 16) * 16 * c.num_kv_heads * c.head_dim * 4
    assert prof["weights"] == 3 * GiB
    assert prof["step_peak"] == 6 * GiB - 7 * GiB // 2 - cache_bytes
    assert prof["non_tensor"] == (78 - 73) * GiB - 3 * GiB
    # The largest decode and mixed graphs peak alike here (one fake peak); every other graph
    # keeps its output: decode logits [b, vocab], mixed hidden states [max_num_seqs, hidden].
    logits_row, hidden_row = c.vocab_size * 4, c.hidden_size * 4
    outputs = (1 + 2 + 4) * logits_row + (4 - 1) * 6 * hidden_row
    static = 96 * 3 * 8 + 6 * 4 + 6 * (-(-200 // 16)) * 4 + 7 * 4 + 6 * 8 + 2 * 4
    slack = (4 + 4) * (4 << 20) + CUDA_GRAPH_SLACK_BYTES
    assert prof["cuda_graphs_reserved"] == 5 * GiB // 2 + outputs + static + slack
    assert prof["bound"] == "share"
    assert budget == 40 * GiB - 3 * GiB - prof["step_peak"] - 2 * GiB - prof["cuda_graphs_reserved"]
    # Little free on the card: the pool is what fits, whatever the share would allow.
    runner.cuda_baseline = CudaMemory(free=12 * GiB, total=80 * GiB, allocated=GiB // 2)
    fake["free"] = 8 * GiB
    budget = runner._profile_cuda_kv_budget()
    assert runner.memory_profile["bound"] == "free memory"
    margin = FREE_MEMORY_MARGIN_BYTES + 2 * c.num_layers * FREE_MEMORY_SEGMENT_BYTES  # rounding, non-torch memory
    assert runner.memory_profile["free_margin"] == margin
    assert budget == 8 * GiB - runner.memory_profile["step_peak"] - runner.memory_profile["cuda_graphs_reserved"] \
        - margin
    runner.graph_buckets = runner.graph_token_buckets = []
    runner._profile_cuda_kv_budget()
    assert runner.memory_profile["cuda_graphs_reserved"] == 0
    runner.config.gpu_memory_utilization = 1.5
    with pytest.raises(ValueError, match="gpu_memory_utilization"):
        runner._profile_cuda_kv_budget()


def _scale_kv(monkeypatch: pytest.MonkeyPatch) -> None:
    """Models loaded from here on take per-layer KV scales that are not 1, as a checkpoint's
    would come (before any graph is captured): layer 0's small enough that keys saturate."""
    from engine.models.llama import LlamaForCausalLM

    def scales(model: LlamaForCausalLM, _: object) -> None:
        for i, layer in enumerate(model.model.layers):
            layer.self_attn.kv_scales = (0.004, 0.03) if i == 0 else (0.05, 0.02)

    monkeypatch.setattr(LlamaForCausalLM, "_set_kv_scales", scales)


@interpreter_only
def test_an_fp8_kv_cache_rides_the_graphs_through_the_triton_kernels(tiny_checkpoints: dict[str, str],
                                                                     monkeypatch: pytest.MonkeyPatch) -> None:
    """kv_cache_dtype="fp8" on the Triton path, with scales that are not 1: eager steps and
    replayed decode and mixed graphs (chunks after a cached prefix, decodes beside them) give
    the tokens and logprobs of the reference's fp8 engine, whose cache holds the same bytes."""
    path = tiny_checkpoints["llama"]
    ps = prompts(12, 4, 2, 24)
    ps[3] = ps[0][:16] + ps[3]  # a cached prefix: its chunk reads fp8 keys it did not compute
    params = [SamplingParams(max_tokens=n, logprobs=1, **GREEDY) for n in (4, 2, 3, 3)]
    args = dict(num_kv_blocks=40, max_num_seqs=4, max_num_batched_tokens=40, max_model_len=128, dtype="float32",
                kv_cache_dtype="fp8", **CPU)
    _scale_kv(monkeypatch)
    monkeypatch.setenv(kernels.BACKEND_ENV, "reference")
    reference = LLM(path, **args)
    want = reference.generate(ps, params)
    monkeypatch.setenv(kernels.BACKEND_ENV, "triton")
    llm = LLM(path, **args)
    log = with_eager_graphs(llm, 4, tokens=[8, 16, 40])
    assert_same_tokens_and_logprobs(llm.generate(ps, params), want)
    assert {k for k, _ in log} == {"decode", "mixed"}, log
    # Layer 0 stores the same bytes. Past it a byte may sit one code from the reference's: the
    # kernels apply the scales to scores and outputs, not to each value read (one rounding
    # fewer), and a value on a rounding boundary of the next layer's K/V goes the other way.
    for layer, caches in enumerate(zip(llm.engine.runner.kv_caches, reference.engine.runner.kv_caches)):
        for got, ref in zip(*caches):
            assert got.dtype == torch.float8_e4m3fn
            got, ref = got.view(torch.uint8).int(), ref.view(torch.uint8).int()
            off = got != ref
            assert not off.any() if layer == 0 else off.float().mean() < 1e-3, (layer, off.sum())
            assert ((got - ref)[off].abs() == 1).all(), "a byte more than one code from the reference's"
    bm = llm.engine.scheduler.block_manager
    assert bm.num_free_blocks == bm.num_blocks, "blocks leaked"


# ----------------------------------------------------------------------------- GPU only


@pytest.mark.gpu
@pytest.mark.skipif(not CUDA, reason="needs CUDA")
def test_cuda_graphs_give_eager_tokens_on_gpu(tiny_checkpoints: dict[str, str]) -> None:
    path = tiny_checkpoints["llama"]
    ps = prompts(9, 6, 1, 40)
    # Penalties on some rows: with async scheduling they read the tokens still on the device.
    params = [SamplingParams(max_tokens=n, **GREEDY, **({"repetition_penalty": 1.3, "frequency_penalty": 0.4,
                                                        "presence_penalty": 0.2} if i % 2 else {}))
              for i, n in enumerate((9, 3, 7, 12, 5, 10))]
    args = dict(num_kv_blocks=48, max_num_seqs=5, max_num_batched_tokens=64, max_model_len=256, dtype="float32")
    ps[4] = ps[1][:20] + ps[4]  # a cached prefix
    eager = LLM(path, enforce_eager=True, async_scheduling=False, **args)
    assert eager.engine.runner.cuda_graphs is None
    want = [o.outputs[0].token_ids for o in eager.generate(ps, params)]
    del eager
    for mode, tokens, async_scheduling in (("full", [32, 48, 64], True), ("full", [32, 48, 64], False),
                                           ("decode", [], True)):
        graphs = LLM(path, cuda_graph_mode=mode, async_scheduling=async_scheduling, **args)
        runner = graphs.engine.runner
        assert graphs.engine.async_scheduling is async_scheduling
        assert runner.cuda_graphs is not None and runner.cuda_graphs.token_buckets == tokens
        assert runner.model.norm_rope_kernels is not None
        assert [o.outputs[0].token_ids for o in graphs.generate(ps, params)] == want
        assert graphs.engine.stats.device_seconds > 0  # each step's span on the GPU, by CUDA events
        del graphs, runner


@pytest.mark.gpu
@pytest.mark.skipif(not CUDA, reason="needs CUDA")
def test_fp8_weights_through_cuda_graphs_give_the_cpus_tokens(tiny_checkpoints: dict[str, str]) -> None:
    """quantization="fp8" on the real GPU path (kernels.triton_fp8 inside captured graphs, async
    scheduling): the greedy tokens of the CPU's fp8 engine (fp32 both)."""
    path = tiny_checkpoints["llama"]
    ps = prompts(10, 6, 1, 40)
    params = [SamplingParams(max_tokens=n, **GREEDY) for n in (9, 3, 7, 12, 5, 10)]
    args = dict(num_kv_blocks=48, max_num_seqs=5, max_num_batched_tokens=64, max_model_len=256, dtype="float32",
                quantization="fp8")
    want = [o.outputs[0].token_ids for o in LLM(path, device="cpu", **args).generate(ps, params)]
    graphs = LLM(path, **args)
    assert graphs.engine.runner.cuda_graphs is not None
    assert [o.outputs[0].token_ids for o in graphs.generate(ps, params)] == want


@pytest.mark.gpu
@pytest.mark.skipif(not CUDA, reason="needs CUDA")
def test_an_fp8_kv_cache_through_cuda_graphs_gives_the_cpus_tokens(tiny_checkpoints: dict[str, str],
                                                                   monkeypatch: pytest.MonkeyPatch) -> None:
    """kv_cache_dtype="fp8" on the real GPU path (store and attention kernels inside captured
    graphs, scales that are not 1, async scheduling): the greedy tokens of the CPU's fp8 engine
    (fp32 both)."""
    path = tiny_checkpoints["llama"]
    ps = prompts(13, 6, 1, 40)
    ps[4] = ps[1][:20] + ps[4]  # a cached prefix
    params = [SamplingParams(max_tokens=n, **GREEDY) for n in (9, 3, 7, 12, 5, 10)]
    args = dict(num_kv_blocks=48, max_num_seqs=5, max_num_batched_tokens=64, max_model_len=256, dtype="float32",
                kv_cache_dtype="fp8")
    _scale_kv(monkeypatch)
    want = [o.outputs[0].token_ids for o in LLM(path, device="cpu", **args).generate(ps, params)]
    graphs = LLM(path, **args)
    assert graphs.engine.runner.cuda_graphs is not None
    assert [o.outputs[0].token_ids for o in graphs.generate(ps, params)] == want


@pytest.mark.gpu
@pytest.mark.skipif(not CUDA, reason="needs CUDA")
@pytest.mark.parametrize("async_scheduling", [True, False], ids=["async", "sync"])
def test_lora_adapters_through_cuda_graphs_match_transformers(tiny_checkpoints: dict[str, str], tmp_path,
                                                             async_scheduling: bool) -> None:
    """LoRA on the GPU: the adapters' products captured in the decode and mixed graphs (one
    capture, any mix of slots at replay), three adapters over two slots (loaded into slots while
    a step may be in flight) beside the base model, in fp32: each request equals transformers
    with its adapter applied; a captured step with no adapter gives the base model's tokens."""
    from engine import LoRARequest
    from tests.lora_adapters import hf_lora_greedy, save_adapter

    path = tiny_checkpoints["llama"]
    dirs = [save_adapter(str(tmp_path / str(i)), path, rank=r, seed=i, modules=m) for i, (r, m) in enumerate(
        [(8, ["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"]), (4, ["q_proj", "v_proj"]),
         (2, ["down_proj"])])]
    loras = [LoRARequest(f"a{i}", i + 1, d) for i, d in enumerate(dirs)]
    ps = prompts(8, 8, 1, 40)
    names = [None, 0, 1, 2, 0, None, 2, 1]
    llm = LLM(path, dtype="float32", enable_lora=True, max_loras=2, max_lora_rank=8, max_num_seqs=8,
              max_num_batched_tokens=128, max_model_len=256, num_kv_blocks=64, async_scheduling=async_scheduling)
    assert llm.engine.runner.cuda_graphs is not None
    outs = llm.generate(ps, SamplingParams(max_tokens=10, **GREEDY),
                        lora_request=[None if n is None else loras[n] for n in names])
    for prompt, name, out in zip(ps, names, outs):
        assert out.outputs[0].token_ids == hf_lora_greedy(path, None if name is None else dirs[name], [prompt], 10)[0]
    base = llm.generate(ps[:2], SamplingParams(max_tokens=10, **GREEDY))  # graphs replayed with no adapter
    assert [o.outputs[0].token_ids for o in base] == hf_lora_greedy(path, None, ps[:2], 10)
    assert not llm.engine.loras.users and llm.engine.scheduler.block_manager.num_used_blocks == 0


@pytest.mark.gpu
@pytest.mark.skipif(not CUDA, reason="needs CUDA")
def test_beam_search_through_cuda_graphs_matches_transformers(tiny_checkpoints: dict[str, str]) -> None:
    """Beam search on the GPU: forks copy their parents' partial last blocks on the device
    (ModelRunner.copy_blocks, outside the graphs), beams replay the decode graphs, and the
    sequences are transformers' (fp32)."""
    import transformers

    from engine import BeamSearchParams
    from tests.conftest import hf_beams

    path = tiny_checkpoints["llama"]
    llm = LLM(path, dtype="float32", max_num_seqs=16, max_num_batched_tokens=128, max_model_len=256,
              num_kv_blocks=96)
    assert llm.engine.runner.cuda_graphs is not None
    params = BeamSearchParams(beam_width=4, max_tokens=12, ignore_eos=True)
    ps = prompts(9, 4, 5, 40)
    outs = llm.beam_search(ps, params)
    model = transformers.AutoModelForCausalLM.from_pretrained(path, dtype=torch.float32).eval()
    for prompt, out in zip(ps, outs):
        assert [s.tokens[len(prompt):] for s in out.sequences] == hf_beams(model, prompt, params, None)[0]
    assert llm.engine.scheduler.block_manager.num_used_blocks == 0


@pytest.mark.gpu
@pytest.mark.skipif(not CUDA, reason="needs CUDA")
@pytest.mark.parametrize("pooling_type", ["LAST", "MEAN"])
def test_embeddings_on_the_gpu_match_transformers(tiny_checkpoints: dict[str, str], pooling_type: str) -> None:
    """Embeddings on the GPU beside generations (CUDA graphs, async scheduling): transformers'
    last hidden states pooled (fp32), and no block left behind."""
    import transformers

    path = tiny_checkpoints["llama"]
    llm = LLM(path, dtype="float32", max_num_seqs=16, max_num_batched_tokens=128, max_model_len=256,
              num_kv_blocks=96, pooler_config={"pooling_type": pooling_type})
    assert llm.engine.runner.cuda_graphs is not None
    engine = llm.engine
    embed_ps = prompts(11, 6, 1, 200)
    for i, p in enumerate(prompts(12, 4, 5, 40)):
        engine.add_request(f"g{i}", p, SamplingParams(max_tokens=24, **GREEDY))
    for i, p in enumerate(embed_ps):
        engine.add_pooling_request(f"e{i}", p)
    outs = {}
    while engine.has_unfinished_requests():
        outs.update((o.request_id, o) for o in engine.step(outputs="final"))
    model = transformers.AutoModel.from_pretrained(path, dtype=torch.float32).eval()
    for i, p in enumerate(embed_ps):
        with torch.no_grad():
            hidden = model(torch.tensor([p])).last_hidden_state[0]
        want = torch.nn.functional.normalize(hidden[-1] if pooling_type == "LAST" else hidden.mean(0), dim=-1)
        assert torch.allclose(torch.tensor(outs[f"e{i}"].outputs.embedding), want, atol=1e-4)
    assert engine.scheduler.block_manager.num_used_blocks == 0


@pytest.mark.gpu
@pytest.mark.skipif(not CUDA, reason="needs CUDA")
def test_a_classifier_on_the_gpu_matches_transformers(tmp_path) -> None:
    """A sequence classifier on the GPU (async scheduling, no CUDA graphs: it has no LM head to
    graph), prompts chunked across steps: transformers' softmax over its labels' logits."""
    import transformers

    from tests.conftest import TINY_COMMON

    torch.manual_seed(0)
    transformers.LlamaForSequenceClassification(transformers.LlamaConfig(**TINY_COMMON, num_labels=3)) \
        .save_pretrained(tmp_path)
    llm = LLM(str(tmp_path), dtype="float32", max_num_batched_tokens=64, max_model_len=256, num_kv_blocks=64)
    ps = prompts(13, 6, 1, 200)
    outs = llm.classify(ps, use_tqdm=False)
    model = transformers.AutoModelForSequenceClassification.from_pretrained(tmp_path, dtype=torch.float32).eval()
    for out, p in zip(outs, ps):
        with torch.no_grad():
            want = torch.softmax(model(torch.tensor([p])).logits[0], dim=-1)
        assert torch.allclose(torch.tensor(out.outputs.probs), want, atol=1e-4)
    assert llm.engine.scheduler.block_manager.num_used_blocks == 0


@pytest.mark.gpu
@pytest.mark.skipif(not CUDA, reason="needs CUDA")
@pytest.mark.parametrize("kind", ["llama", "qwen3"])
def test_gpu_engine_matches_transformers(tiny_checkpoints: dict[str, str], kind: str) -> None:
    """The whole GPU path (Triton attention, fused norm/rope, CUDA graphs, one-copy inputs,
    sampler on the device) in fp32 against transformers' greedy tokens, with the KV pool sized
    by the memory profile."""
    from tests.conftest import hf_greedy

    path = tiny_checkpoints[kind]
    ps = prompts(1, 4, 1, 40)
    expected = hf_greedy(path, ps, 16)
    llm = LLM(path, dtype="float32", max_num_batched_tokens=256, max_model_len=512, max_num_seqs=8,
              gpu_memory_utilization=0.05)
    runner = llm.engine.runner
    assert runner.cuda_graphs is not None and runner.cuda_graphs.buckets == [1, 2, 4, 8]
    prof = runner.memory_profile
    assert prof["kv_cache_budget"] > 0 and runner.num_blocks == prof["kv_cache_budget"] // runner.block_bytes
    assert 0 < prof["cuda_graphs_actual"] <= prof["cuda_graphs_reserved"], prof
    out = llm.generate(ps, SamplingParams(max_tokens=16, logprobs=2, **GREEDY))
    assert [o.outputs[0].token_ids for o in out] == expected
    # sampling on the device: seeded rows reproduce, whatever their batch mates
    params = SamplingParams(max_tokens=8, temperature=0.8, top_p=0.9, seed=3, ignore_eos=True)
    alone = llm.generate([ps[0]], params)[0].outputs[0].token_ids
    mixed = llm.generate(ps, [params] + [SamplingParams(max_tokens=8, temperature=1.0, ignore_eos=True)] * 3)
    assert mixed[0].outputs[0].token_ids == alone


@pytest.mark.gpu
@pytest.mark.skipif(not CUDA, reason="needs CUDA")
def test_a_hybrid_model_on_the_gpu_matches_transformers(tmp_path) -> None:
    """Gemma 3's full and sliding layers in two KV groups on the whole GPU path (Triton's
    windowed kernels, captured CUDA graphs with a table and slots per group, async scheduling,
    the memory profile counting a block as a group's layers), its sliding blocks given back and
    taken again in a small pool: transformers' logprobs, and no block leaked."""
    from tests.conftest import assert_engine_idle, assert_logprobs_equal_transformers, random_prompts
    from tests.test_gemma import save

    model = save("gemma3", str(tmp_path))
    llm = LLM(str(tmp_path), dtype="float32", block_size=4, num_kv_blocks=40, max_num_batched_tokens=32,
              max_num_seqs=4, max_model_len=256)
    runner = llm.engine.runner
    assert runner.layer_groups == (1, 0, 1, 0) and runner.cuda_graphs is not None
    assert runner.cuda_graphs.block_tables.shape[0] == 2 and llm.engine.async_scheduling
    assert_logprobs_equal_transformers(llm, model, random_prompts(1, (60, 1, 17, 9, 33)), max_tokens=12, atol=1e-3)
    assert_engine_idle(llm)
    budgeted = LLM(str(tmp_path), dtype="float32", max_num_batched_tokens=64, max_model_len=256, max_num_seqs=4,
                   gpu_memory_utilization=0.05)
    prof = budgeted.engine.runner.memory_profile
    assert budgeted.engine.runner.num_blocks == prof["kv_cache_budget"] // budgeted.engine.runner.block_bytes


@pytest.mark.gpu
@pytest.mark.skipif(not CUDA, reason="needs CUDA")
@pytest.mark.parametrize("enforce_eager", [False, True], ids=["graphs", "eager"])
def test_async_steps_launch_without_waiting_on_the_gpu(tiny_checkpoints: dict[str, str],
                                                        monkeypatch: pytest.MonkeyPatch, enforce_eager: bool) -> None:
    """What async scheduling needs of the GPU path: launching a step (its inputs' copy, the
    forward, sampling with penalties, seeds, top-k/top-p/min-p, logit bias, logprobs and prompt
    logprobs) never waits for the device; torch's sync debug mode makes any such wait an error."""
    from engine.engine import LLMEngine
    from engine.model_runner import ModelRunner
    from engine.sampler import Sampler

    path = tiny_checkpoints["llama"]
    # The shapes of test_cuda_graphs_give_eager_tokens_on_gpu: its compiled kernels serve here too.
    llm = LLM(path, num_kv_blocks=48, max_num_seqs=5, max_num_batched_tokens=64, max_model_len=256, dtype="float32",
              enforce_eager=enforce_eager, async_scheduling=True)
    assert (llm.engine.runner.cuda_graphs is None) is enforce_eager
    launches: list[str] = []

    def strict(cls: type, name: str) -> None:
        """cls.name in sync debug mode "error": a wait on the device inside it raises."""
        method = getattr(cls, name)

        def wrapped(self, *args, **kwargs):
            torch.cuda.set_sync_debug_mode("error")
            try:
                return method(self, *args, **kwargs)
            finally:
                torch.cuda.set_sync_debug_mode("default")
                launches.append(name)

        monkeypatch.setattr(cls, name, wrapped)

    # A step's launch: the forward, the prompt logprobs, sampling (then, a step later, the wait).
    for cls, name in ((ModelRunner, "execute"), (LLMEngine, "_prompt_logprobs"), (Sampler, "sample")):
        strict(cls, name)
    ps = prompts(5, 6, 1, 40)
    params = [SamplingParams(max_tokens=12, temperature=0.0, prompt_logprobs=2, ignore_eos=True),
              SamplingParams(max_tokens=12, temperature=0.9, top_p=0.8, top_k=20, seed=7, ignore_eos=True),
              SamplingParams(max_tokens=12, temperature=0.7, min_p=0.1, logprobs=3, ignore_eos=True),
              SamplingParams(max_tokens=12, repetition_penalty=1.2, frequency_penalty=0.5, presence_penalty=0.3,
                             ignore_eos=True),
              SamplingParams(max_tokens=12, temperature=0.0, logit_bias={5: 4.0, 7: -100.0}, ignore_eos=True),
              SamplingParams(max_tokens=12, n=2, temperature=1.0, seed=3, ignore_eos=True)]
    out = llm.generate(ps, params)
    assert launches.count("execute") > 12 and launches.count("sample") == launches.count("execute")
    assert "_prompt_logprobs" in launches and all(len(c.token_ids) == 12 for o in out for c in o.outputs)
    assert len(out[0].prompt_logprobs) == len(ps[0])


@pytest.mark.gpu
@pytest.mark.skipif(not CUDA, reason="needs CUDA")
def test_kv_offloading_on_the_gpu_gives_the_tokens_of_a_roomy_pool(tiny_checkpoints: dict[str, str]) -> None:
    """The prefix cache's host tier on the GPU path: page-locked host memory, its saves and loads
    asynchronous on the compute stream between captured-graph steps with async scheduling. Chats
    that outgrow a 24-block pool load their histories back and answer as a pool with room does."""
    from tests.conftest import assert_engine_idle
    from tests.test_kv_offload import chat_turns, host_gib

    path = tiny_checkpoints["llama"]
    shapes = dict(block_size=4, max_num_seqs=5, max_num_batched_tokens=64, max_model_len=256, dtype="float32")
    roomy = LLM(path, num_kv_blocks=256, **shapes)
    tight = LLM(path, num_kv_blocks=24, kv_offloading_size=host_gib(256), **shapes)
    tier = tight.engine.runner.host_kv
    assert tier.pinned and tier.host.is_pinned() and tight.engine.async_scheduling
    assert tight.engine.runner.cuda_graphs is not None
    assert chat_turns(tight, seed=1) == chat_turns(roomy, seed=1)
    stats = tight.engine.scheduler.block_manager.stats
    assert stats.saved_blocks > 0 and stats.loaded_blocks > 0
    tight.engine.scheduler.block_manager.check_invariants()
    assert_engine_idle(tight)
