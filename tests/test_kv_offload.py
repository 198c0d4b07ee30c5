"""KV offloading (the prefix cache's host tier, `kv_offloading_size`) end to end on CPU:
prefixes the pool evicted are loaded back from host memory with transformers' tokens, under
chats, preemption, async scheduling and beam search's forks; the block moves themselves
(engine/kv_offload.py) against a plain copy; and the options a user can get wrong."""

from __future__ import annotations

import random

import pytest
import torch

from engine import LLM, EngineConfig, SamplingParams
from engine.kv_offload import TRANSFER_CHUNK_BLOCKS, HostKVTier, _runs
from scheduler import KVTransfer
from tests.conftest import assert_engine_idle, hf_greedy

GREEDY = dict(temperature=0.0, ignore_eos=True)
# The tiny llama's block of 4 tokens: K and V of 2 layers, 2 heads of 16, fp32.
BLOCK_BYTES = 2 * 2 * 4 * 2 * 16 * 4


def host_gib(blocks: int) -> float:
    return blocks * BLOCK_BYTES / 2**30


@pytest.fixture(scope="module")
def tiny_path(tiny_checkpoints: dict[str, str]) -> str:
    return tiny_checkpoints["llama"]


def chat_turns(llm: LLM, seed: int, chats: int = 4, turns: int = 3) -> list[tuple[list[int], list[int]]]:
    """Chats whose every turn resends the conversation so far (its answers, then 5 new tokens):
    (prompt, answer) of each turn of each chat."""
    rng = random.Random(seed)
    history = [[rng.randrange(3, 500) for _ in range(30)] for _ in range(chats)]
    done = []
    for _ in range(turns):
        outputs = llm.generate([list(h) for h in history], SamplingParams(max_tokens=8, **GREEDY), use_tqdm=False)
        for h, out in zip(history, outputs):
            done.append((list(h), list(out.outputs[0].token_ids)))
            h += list(out.outputs[0].token_ids) + [rng.randrange(3, 500) for _ in range(5)]
    return done


@pytest.mark.parametrize("async_scheduling", [False, True])
def test_chats_reload_the_prefixes_the_pool_evicted(tiny_path: str, async_scheduling: bool) -> None:
    """24 blocks hold one turn of the four chats, not their history: without a host tier every
    turn computes its conversation again; with one, the earlier turns come back from host
    memory, and every answer is transformers' either way."""
    config = dict(num_kv_blocks=24, block_size=4, max_num_batched_tokens=32, async_scheduling=async_scheduling)
    kept = LLM(tiny_path, **config)
    offloaded = LLM(tiny_path, kv_offloading_size=host_gib(256), **config)
    turns = chat_turns(offloaded, seed=1)
    assert turns == chat_turns(kept, seed=1)
    assert [answer for _, answer in turns] == hf_greedy(tiny_path, [prompt for prompt, _ in turns], 8)
    with_host, without = (llm.engine.scheduler.block_manager.stats for llm in (offloaded, kept))
    assert without.loaded_blocks == 0 and with_host.loaded_blocks > 0 and with_host.saved_blocks > 0
    assert with_host.hits_tokens >= 2 * without.hits_tokens > 0
    for llm in (offloaded, kept):
        llm.engine.scheduler.block_manager.check_invariants()
        assert_engine_idle(llm)


def test_preempted_requests_load_their_prompts_back(tiny_path: str) -> None:
    """Requests preempted for lack of blocks come back through the host tier, as vLLM's swap
    did: their computed prompt blocks are loaded, not recomputed, and the tokens stay the same."""
    rng = random.Random(5)
    prompts = [[rng.randrange(3, 500) for _ in range(rng.randint(24, 40))] for _ in range(6)]
    params = SamplingParams(max_tokens=20, **GREEDY)
    alone = LLM(tiny_path, num_kv_blocks=256, block_size=4, enable_prefix_caching=False)
    expected = [o.outputs[0].token_ids for o in alone.generate(prompts, params, use_tqdm=False)]
    llm = LLM(tiny_path, num_kv_blocks=30, block_size=4, kv_offloading_size=host_gib(64))
    assert [o.outputs[0].token_ids for o in llm.generate(prompts, params, use_tqdm=False)] == expected
    stats = llm.engine.scheduler.block_manager.stats
    assert llm.engine.scheduler.stats.num_preemptions > 0 and stats.loaded_blocks > 0
    assert stats.hits_tokens == 0, "a preempted request's reload is not a prefix-cache hit of its prompt"
    assert_engine_idle(llm)


def test_beam_search_forks_after_the_evictions_are_saved(tiny_path: str) -> None:
    """A fork's copy block may be one whose eviction saves its KV to host memory: the save runs
    before the copy overwrites the block (no transfer is pending when the copies run), and the
    searches, in a pool so small that their forks evict the earlier search's blocks, find the
    same beams as with room to spare."""
    from engine.beam_search import BeamSearchParams

    rng = random.Random(8)
    prompts = [{"prompt_token_ids": [rng.randrange(3, 500) for _ in range(30)]} for _ in range(2)]
    params = BeamSearchParams(beam_width=3, max_tokens=10, ignore_eos=True)
    roomy = LLM(tiny_path, num_kv_blocks=256, block_size=4)
    tight = LLM(tiny_path, num_kv_blocks=20, block_size=4, kv_offloading_size=host_gib(64))
    engine, bm = tight.engine, tight.engine.scheduler.block_manager
    fork_saves: list[int] = []  # blocks each fork's evictions saved
    pending_at_copies: list[int] = []
    add_fork, copy_blocks = engine.scheduler.add_fork, engine.runner.copy_blocks

    def spied_add_fork(parent, child):
        saved = bm.stats.saved_blocks
        copies = add_fork(parent, child)
        fork_saves.append(bm.stats.saved_blocks - saved)
        return copies

    def spied_copy_blocks(pairs):
        pending_at_copies.append(len(bm.transfers))
        copy_blocks(pairs)

    engine.scheduler.add_fork, engine.runner.copy_blocks = spied_add_fork, spied_copy_blocks
    expected = [[s.tokens for s in o.sequences] for o in roomy.beam_search(prompts, params)]
    assert [[s.tokens for s in tight.beam_search([p], params)[0].sequences] for p in prompts] == expected
    assert any(fork_saves), "no fork evicted a cached block: the order was not tested"
    assert pending_at_copies and not any(pending_at_copies)
    bm.check_invariants()
    assert_engine_idle(tight)


def test_reset_prefix_cache_forgets_the_host_tier(tiny_path: str) -> None:
    llm = LLM(tiny_path, num_kv_blocks=16, block_size=4, kv_offloading_size=host_gib(64))
    rng = random.Random(3)
    first, second = ([rng.randrange(3, 500) for _ in range(41)] for _ in range(2))
    params = SamplingParams(max_tokens=2, **GREEDY)
    # The second takes the first's five last full blocks (its tail is evicted first); the first,
    # again, finds its five first on the device and the others in host memory.
    for prompt in (first, second, first):
        out = llm.generate([prompt], params, use_tqdm=False)[0]
    bm = llm.engine.scheduler.block_manager
    assert out.num_cached_tokens == 40 and bm.stats.loaded_blocks == 5 and bm.host.usage > 0
    assert llm.reset_prefix_cache()
    assert bm.host.usage == 0
    out = llm.generate([first], params, use_tqdm=False)[0]
    assert out.num_cached_tokens == 0 and bm.stats.loaded_blocks == 5
    assert_engine_idle(llm)


def test_block_moves_equal_a_plain_copy() -> None:
    """Saves and loads through the staging buffer, in runs past its chunk, with consecutive and
    scattered slots, a host block saved twice in one run (the later wins) and a device block
    loaded twice (split into runs, the later wins): each KV tensor ends as copying block by
    block, in order, would leave it."""
    torch.manual_seed(0)
    tensors = [(torch.randn(90, 4, 2, 8), torch.randn(90, 4, 2, 8)) for _ in range(3)]
    tier = HostKVTier(80, tensors)
    tier.host.zero_()
    expected_host = tier.host.clone()
    expected_kv = [(k.clone(), v.clone()) for k, v in tensors]
    rng = random.Random(0)
    slots = list(range(40)) + rng.sample(range(40, 80), 20) + [3, 3]
    transfers = [KVTransfer("save", rng.randrange(90), s) for s in slots]
    transfers += [KVTransfer("load", s, b) for s, b in zip(rng.sample(range(80), 50), rng.sample(range(90), 50))]
    transfers += [KVTransfer("load", 7, 5), KVTransfer("load", 9, 5), KVTransfer("save", 5, 70)]
    assert len(transfers) > 2 * TRANSFER_CHUNK_BLOCKS
    for t in transfers:
        if t.kind == "save":
            expected_host[t.target] = torch.stack([x[t.source] for pair in expected_kv for x in pair])
        else:
            for i, (k, v) in enumerate(expected_kv):
                k[t.target], v[t.target] = expected_host[t.source, 2 * i], expected_host[t.source, 2 * i + 1]
    tier.run(transfers)
    assert torch.equal(tier.host, expected_host)
    for (k, v), (ek, ev) in zip(tensors, expected_kv):
        assert torch.equal(k, ek) and torch.equal(v, ev)


def test_runs_split_where_one_scatter_would_race() -> None:
    """A second load into a block in one run would scatter twice into one row (which wins is
    undefined on CUDA): it starts a new run. Two saves into one host block stay together (their
    copies run in order), and a run is at most a chunk."""
    transfers = [KVTransfer("load", 7, 5), KVTransfer("load", 9, 5), KVTransfer("save", 5, 1), KVTransfer("save", 6, 1),
                 KVTransfer("save", 2, 3), KVTransfer("load", 1, 4)]
    assert list(_runs(transfers, 32)) == [("load", [7], [5]), ("load", [9], [5]), ("save", [5, 6, 2], [1, 1, 3]),
                                          ("load", [1], [4])]
    assert list(_runs(transfers[2:5], 2)) == [("save", [5, 6], [1, 1]), ("save", [2], [3])]


def test_a_hybrid_models_host_block_is_one_device_block(tmp_path) -> None:
    """Gemma 3's layers share two KV tensor pairs (two groups of two layers): a host block holds
    each pair's block once, the device block's bytes, and the staging buffer as many."""
    from tests.test_gemma import save

    save("gemma3", str(tmp_path))
    runner = LLM(str(tmp_path), num_kv_blocks=16, block_size=4, kv_offloading_size=10 * 4096 / 2**30).engine.runner
    tier = runner.host_kv
    assert runner.kv_groups.num_groups == 2 and len(tier.kv_tensors) == runner.kv_groups.group_size == 2
    assert runner.num_host_blocks == 10 and runner.block_bytes == 4096
    assert tier.host.nbytes == 10 * runner.block_bytes and tier.staging[0].nbytes == runner.block_bytes
    assert not tier.pinned  # the CPU's: nothing to page-lock for


def test_the_cuda_pool_leaves_room_for_the_staging_buffer(monkeypatch: pytest.MonkeyPatch) -> None:
    """On CUDA the KV pool is what the memory profile leaves, less the host tier's staging buffer
    (allocated after the pool): a chunk of blocks, or the whole tier where it is smaller."""
    from engine.model_runner import ModelRunner

    runner = object.__new__(ModelRunner)
    runner.config, runner.device = EngineConfig(), torch.device("cuda")
    monkeypatch.setattr(ModelRunner, "block_bytes", 1000)
    monkeypatch.setattr(ModelRunner, "_profile_cuda_kv_budget", lambda self: 100 * 1000)
    for host_blocks, pool in ((0, 100), (64, 100 - TRANSFER_CHUNK_BLOCKS), (5, 95)):
        runner.num_host_blocks = host_blocks
        assert runner._num_kv_blocks() == pool


def test_a_containers_memory_limit_bounds_the_host_memory_available(tmp_path, monkeypatch: pytest.MonkeyPatch) -> None:
    """Inside a container, MemAvailable is the machine's: the cgroup's limit less its working set
    (usage less reclaimable page cache, as kubelet counts it) is what a host tier may take."""
    import engine.model_runner as model_runner

    def cgroup(limit: str, usage: int, inactive: int) -> tuple[str, str, str, str]:
        (tmp_path / "max").write_text(limit + "\n")
        (tmp_path / "current").write_text(f"{usage}\n")
        (tmp_path / "stat").write_text(f"anon 5\ninactive_file {inactive}\nactive_file 7\n")
        return str(tmp_path / "max"), str(tmp_path / "current"), str(tmp_path / "stat"), "inactive_file"

    (tmp_path / "meminfo").write_text("MemTotal:       32000000 kB\nMemAvailable:   20000000 kB\n")
    monkeypatch.setattr(model_runner, "MEMINFO", str(tmp_path / "meminfo"))
    machine = 20000000 * 1024
    monkeypatch.setattr(model_runner, "CGROUP_MEMORY", (cgroup(str(8 << 30), 6 << 30, 1 << 30),))
    assert model_runner.available_host_memory() == 3 << 30
    monkeypatch.setattr(model_runner, "CGROUP_MEMORY", (cgroup(str(1 << 30), 3 << 30, 0),))
    assert model_runner.available_host_memory() == 0  # over its limit already
    for unlimited in ("max", str(2**63 - 4096)):  # v2's and v1's "no limit"
        monkeypatch.setattr(model_runner, "CGROUP_MEMORY", (cgroup(unlimited, 3 << 30, 0),))
        assert model_runner.available_host_memory() == machine
    monkeypatch.setattr(model_runner, "CGROUP_MEMORY", ((str(tmp_path / "none"), "", "", ""),))
    assert model_runner.available_host_memory() == machine


@pytest.mark.parametrize("changes, message", [
    (dict(kv_offloading_size=-1.0), "kv_offloading_size must be a number of GiB >= 0"),
    (dict(kv_offloading_size=float("nan")), "kv_offloading_size must be a number of GiB >= 0"),
    (dict(kv_offloading_size="4"), "kv_offloading_size must be a number of GiB >= 0"),
    (dict(kv_offloading_size=True), "kv_offloading_size must be a number of GiB >= 0"),
    (dict(kv_offloading_size=4.0, kv_offloading_backend="lmcache"), "kv_offloading_backend must be native"),
    (dict(kv_offloading_size=4.0, enable_prefix_caching=False), "it needs the prefix cache on"),
])
def test_options_a_user_can_get_wrong(changes: dict, message: str) -> None:
    with pytest.raises(ValueError, match=message):
        EngineConfig(**changes).check()


def test_a_host_tier_of_less_than_a_block_or_more_than_the_host_has_is_an_error(tiny_path: str) -> None:
    from engine.model_runner import available_host_memory

    with pytest.raises(ValueError, match=f"holds no KV block of {BLOCK_BYTES} bytes"):
        LLM(tiny_path, num_kv_blocks=16, block_size=4, kv_offloading_size=host_gib(1) / 2)
    available = available_host_memory()
    assert available is not None and available > 0  # Linux
    with pytest.raises(ValueError, match=r"exceeds the host's available memory \(\d+\.\d GiB\)"):
        LLM(tiny_path, num_kv_blocks=16, block_size=4, kv_offloading_size=2 * available / 2**30)
    # the CPU's KV pool is host memory too: each fits alone, not both (checked before either is allocated)
    with pytest.raises(ValueError, match=r"GiB beside the \d+\.\d GiB KV pool exceeds the host's available memory"):
        LLM(tiny_path, block_size=4, kv_cache_memory_bytes=int(0.6 * available),
            kv_offloading_size=0.6 * available / 2**30)
