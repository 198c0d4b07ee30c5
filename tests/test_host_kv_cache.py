"""The prefix cache's host tier (scheduler/host_kv_cache.py, BlockManager's `num_host_blocks`):
a model-based random walk and targeted cases.

The walk extends tests/test_block_manager_hybrid.py's HybridSim (which models the KV every
device block holds: group, prefix root and exact token prefix) with the host tier's bytes and
the engine's order of events. A step either schedules (a few admissions with prefix hits,
chunk allocations, preemptions and frees, whose computation runs after the step's transfers),
forks beams (after the step ran, its transfers taken before the copies, as LLMEngine does), or
frees everything (and may reset the prefix cache). The model applies the manager's KVTransfers
in their order as they are queued ("save": device block -> host slot, "load": host slot ->
device block; nothing is computed between a step's transfers being queued and run, so that is
what the step's forward reads), wipes a block when it is handed out fresh, and proves after
every operation:

1. KV correctness: every hit, on either tier, holds the request's own prefix; a host hit is
   loaded into a fresh block registered as the twin of the host copy its load reads (hash,
   group, parent; the copy's serial, group 0's the one matched), by a load queued in that
   allocation; every block a running request reads holds its own prefix (HybridSim's checks);
   every registered device block and every host block holds the prefix its metadata names, and
   a serial names one prefix on both tiers.
2. Saves: only a cached block being evicted is saved, and only while neither the host nor a
   registered device twin holds its prefix; a prefix leaves both tiers only while the host
   tier is full; host slots pending loads read are pinned, exactly those, until the transfers
   are taken (and nothing is pinned after).
3. Accounting: blocks_short (which counts the loads) agrees with allocate_slots, changes
   nothing and queues no transfer; a failed allocation queues none; check_invariants after
   every operation, and no block is left held once every request is freed.
The walks must reach host hits (stats.loaded_blocks), saves, failed allocations and forks.

Targeted cases, with the bytes modelled the same way (KV): an evicted block is saved once (not
again while the host holds its prefix, nor while a registered twin does); a host hit is loaded
into a fresh block registered as the copy's twin, which the next request hits on the device;
host blocks pending loads read are not overwritten with a 1-3 block tier; blocks_short counts
the loads; a sliding group loads only its window's blocks; a group's host copy under an older
serial than the anchor's is loaded; a fork's copy goes after the save of the block it took;
reset_prefix_cache clears the host tier; HostKVCache's LRU; the scheduler's stats.
"""

from __future__ import annotations

import random
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

import pytest

from scheduler import HostKVCache, KVTransfer, Request, Scheduler, SchedulerConfig
from scheduler.block_manager import HOST_BLOCK, BlockManager, PrefixHits, chained_hash
from scheduler.kv_cache_groups import window_start_block
from scheduler.request import NULL_BLOCK
from tests.test_block_manager_hybrid import Content, HybridSim, _weak_hash


class ObservedBlockManager(BlockManager):
    """The real manager; each call that may queue transfers goes through the model's `observe`."""

    sim: HostSim

    def allocate_slots(self, request: Request, num_new_tokens: int, hits: Any = ()) -> bool:
        return self.sim.observe(super().allocate_slots, request, num_new_tokens, hits)

    def fork(self, parent: Request, child: Request) -> list[tuple[int, int]]:
        return self.sim.observe(super().fork, parent, child)

    def blocks_short(self, request: Request, num_new_tokens: int, hits: Any = ()) -> int:
        before = self.sim.host_state()
        short = super().blocks_short(request, num_new_tokens, hits)
        assert self.sim.host_state() == before, "blocks_short changed the host tier or queued a transfer"
        return short


@dataclass
class HostSim(HybridSim):
    host_content: dict[int, Content | None] = field(default_factory=dict)  # host slot -> its bytes
    pending: list[KVTransfer] = field(default_factory=list)  # queued, and applied to the model
    scheduled: dict[Request, int] = field(default_factory=dict)  # this step's chunks, computed by run()
    cleared_with_pending: bool = False  # reset_prefix_cache unpinned the pending loads' slots

    # ------------------------------------------------------------ the host tier's bytes
    def host_state(self) -> tuple[object, ...]:
        host = self.bm.host
        held = None if host is None else (list(host.blocks), sorted(host.pinned), list(host.free))
        return held, list(self.bm.transfers)

    def observe(self, call: Callable[..., Any], request: Request, *args: Any) -> Any:
        """Run an allocate_slots or fork; check the transfers it queued and apply them."""
        bm, host = self.bm, self.bm.host
        cached_before = {b.block_id: (b.group, b.serial) for b in bm.blocks if b.hash is not None}
        host_before = set(host.by_serial) if host is not None else set()
        copies = {slot: (b.hash, b.serial, b.group, b.parent_serial) for slot, b in host.blocks.items()} \
            if host is not None else {}
        first = len(bm.transfers)
        result = call(request, *args)
        queued = bm.transfers[first:]
        registered = {(b.group, b.serial) for b in bm.blocks if b.hash is not None}
        held = set(host.by_serial) if host is not None else set()
        full = host is not None and len(host.blocks) == host.num_blocks
        loads: dict[int, int] = {}
        for t in queued:
            if t.kind == "save":
                assert t.source in cached_before, f"saved block {t.source}, which was not cached"
                prefix = cached_before[t.source]
                assert prefix not in host_before or full, f"{prefix} saved again while the host holds it"
                assert prefix not in registered, f"{prefix} saved while a registered device twin holds it"
                self.host_content[t.target] = self.content.get(t.source)
                self._count("save")
            else:
                assert t.kind == "load" and t.target not in loads
                self.content[t.target] = self.host_content.get(t.source)
                loads[t.target] = t.source
        if host is not None:
            lost = (set(cached_before.values()) | host_before) - registered - held
            assert not lost or full, f"prefixes {lost} dropped from both tiers while the host had room"
        if call.__name__ == "allocate_slots":
            self._check_loads(request, args[1], result, {b: copies[slot] for b, slot in loads.items()})
        else:
            assert not loads, "a fork loads nothing"
        self.pending += queued
        self._check_pins()
        return result

    def _check_loads(self, request: Request, hits: Any, ok: bool, loads: dict[int, tuple[Any, ...]]) -> None:
        """A placed host hit got a fresh block, registered as the twin of the host copy its load
        reads (`loads`: block -> that copy's hash, serial, group, parent); then HybridSim.allocate's
        checks see the loaded blocks as the hits."""
        if not ok:
            assert not loads, "a failed allocation queued a load"
            return
        loaded = 0
        for g, ids in enumerate(getattr(hits, "groups", ())):
            for j, b in enumerate(ids):
                got = request.kv_blocks[g][j]
                if b != HOST_BLOCK or got == NULL_BLOCK:  # (a sliding group's hit before its window)
                    continue
                block = self.bm.blocks[got]
                assert got in loads, f"host hit {g}/{j} placed in block {got} without its load"
                parent = hits.serials[j - 1] if j else request.prefix_root
                assert (block.hash, block.serial, block.group, block.parent_serial) == loads[got], \
                    f"loaded block {got} not registered as the host copy's twin"
                assert (block.hash, block.group, block.parent_serial) == (request.block_hashes[j], g, parent)
                assert g or block.serial == hits.serials[j], "the anchor's hit has the serial matched"
                assert block.token_ids == tuple(request.token_ids[j * self.bs:(j + 1) * self.bs])
                assert self.content.get(got) == self._truth(request, g, (j + 1) * self.bs), "wrong KV loaded"
                ids[j] = got  # for HybridSim.allocate: the hit as placed
                loaded += 1
        assert loaded == len(loads), "a load for no host hit"
        self.counts["loaded"] = self.counts.get("loaded", 0) + loaded

    def _check_pins(self) -> None:
        host = self.bm.host
        if host is None:
            return
        reading = {t.source for t in self.bm.transfers if t.kind == "load"}
        if self.cleared_with_pending:
            assert host.pinned <= reading
        else:
            assert host.pinned == reading, f"pinned {host.pinned}, pending loads read {reading}"

    def run(self) -> None:
        """The engine's step: take the transfers (the model applied them as queued), then
        compute the scheduled chunks."""
        taken = self.bm.take_transfers()
        assert taken == self.pending, "the transfers taken are not those queued"
        assert not self.bm.transfers and (self.bm.host is None or not self.bm.host.pinned)
        self.pending, self.cleared_with_pending = [], False
        scheduled, self.scheduled = self.scheduled, {}
        for request, n in scheduled.items():
            HybridSim.compute(self, request, n)

    # ------------------------------------------------------------ operations
    def compute(self, request: Request, n: int) -> None:
        """HybridSim's operations compute at once; here the chunk waits for the step to run."""
        assert request not in self.scheduled
        self.scheduled[request] = n

    def check_hits(self, request: Request, hits: PrefixHits) -> None:
        """HybridSim's, and a hit held in host memory holds the request's own KV there."""
        bm, bs, tokens = self.bm, self.bs, request.token_ids
        assert len(hits.serials) == len(hits)
        for g, ids in enumerate(hits.groups):
            assert len(ids) == len(hits)
            start = window_start_block(self.windows[g], len(hits) * bs, bs) if g else 0
            for j, b in enumerate(ids):
                assert (b == NULL_BLOCK) == (j < start), f"group {g} hit {j}: {b}"
                truth = self._truth(request, g, (j + 1) * bs)
                if b == HOST_BLOCK:
                    parent = hits.serials[j - 1] if j else request.prefix_root
                    saved = bm.host.lookup(g, request.block_hashes[j], parent, tuple(tokens[j * bs:(j + 1) * bs]))
                    assert saved is not None and self.host_content.get(saved.slot) == truth, "wrong KV on the host"
                    self._count("host_hit")
                elif b != NULL_BLOCK:
                    assert bm.blocks[b].group == g and self.content.get(b) == truth, "wrong KV served"
            if ids and g == 0:
                assert self.serials.get(hits.serials[-1], (request.prefix_root, tuple(tokens[:len(ids) * bs]))) == \
                    (request.prefix_root, tuple(tokens[:len(ids) * bs])), "the hit's serial names another prefix"

    def grow(self) -> None:
        """HybridSim's, for a request not scheduled in this step already."""
        live, self.live = self.live, [r for r in self.live if r not in self.scheduled]
        try:
            if self.live:
                super().grow()
        finally:
            self.live = live

    def free(self, preempt: bool) -> None:
        super().free(preempt)
        self.scheduled = {r: n for r, n in self.scheduled.items() if r in self.live}  # preempted: not run

    def free_all(self) -> None:
        super().free_all()
        self.scheduled.clear()
        if self.rng.random() < 0.5:  # idle: the prefix cache may be reset, both tiers
            assert self.bm.reset_prefix_cache()
            assert not any(b.hash is not None for b in self.bm.blocks)
            host = self.bm.host
            if host is not None:
                assert not host.blocks and not host.by_hash and not host.by_serial and not host.pinned
                assert len(host.free) == host.num_blocks
                self.cleared_with_pending = bool(self.bm.transfers)
            self._count("reset")

    # ------------------------------------------------------------ invariants
    def check(self) -> None:
        """HybridSim's (the model's bytes already include the queued transfers: what the next
        forward reads), and the host blocks', after every operation."""
        super().check()
        self._check_pins()
        host = self.bm.host
        if host is None:
            return
        for slot, saved in host.blocks.items():
            truth = self.host_content.get(slot)
            assert truth is not None, f"host block {slot} without KV"
            group, root, prefix = truth
            assert group == saved.group and len(prefix) % self.bs == 0 and prefix[-self.bs:] == saved.token_ids
            assert self.serials.setdefault(saved.serial, (root, prefix)) == (root, prefix), "serial names two prefixes"
            if len(prefix) == self.bs:
                assert saved.parent_serial == root
            elif saved.parent_serial in self.serials:
                assert self.serials[saved.parent_serial] == (root, prefix[:-self.bs])

    def step(self) -> None:
        rng = self.rng
        r = rng.random()
        if r < 0.08:  # beams fork after the step ran: their transfers run before the copies
            self.run()
            for _ in range(rng.choice([1, 1, 2])):
                self.fork()
                self.check()
            self.run()
        elif r < 0.11:
            if rng.random() < 0.7:
                self.run()
            self.free_all()
            self.check()
            self.run()
        else:  # a scheduling step: several allocations share one batch of transfers
            for _ in range(rng.randint(1, 4)):
                r = rng.random()
                if not self.live or r < 0.35:
                    self.admit()
                elif r < 0.8:
                    self.grow()
                elif r < 0.96:
                    self.free(preempt=rng.random() < 0.4)
                elif self.waiting:
                    self.waiting.pop(rng.randrange(len(self.waiting)))  # aborted while waiting
                self.check()
            self.run()
        self.check()


CONFIGS = [
    # windows, block sizes, (min, max) pool blocks
    ((0,), (2, 3, 4), (4, 16)),
    ((0, 8), (2, 3, 4), (8, 28)),
    ((0, 8, 8), (2, 3, 4), (10, 36)),
    ((0, 0, 5), (2, 3), (10, 32)),
    ((0, 3), (2, 3), (6, 22)),
    ((6,), (2, 3), (4, 16)),
]


def walk(windows: tuple[int, ...], block_sizes: tuple[int, ...], pool: tuple[int, int], seeds: range,
         steps: int = 150) -> dict[str, int]:
    """Random walks over these seeds; what they reached, summed."""
    totals: dict[str, int] = {}
    for seed in seeds:
        rng = random.Random(7919 * seed + 31 * sum(windows) + len(windows))
        bs = rng.choice(block_sizes)
        num_blocks = rng.randint(*pool)
        num_host_blocks = [1, 2, rng.randint(3, 6), 64][seed % 4]
        bm = ObservedBlockManager(num_blocks, bs, enable_prefix_caching=seed % 12 != 11,
                                  hasher=rng.choice([chained_hash, chained_hash, _weak_hash]),
                                  windows=windows, num_host_blocks=num_host_blocks)
        vocab = rng.choice([2, 3])
        sim = HostSim(bm, rng, vocab=vocab, max_len=rng.randint(8, 24), max_chunk=rng.choice([3, 5, 8, 100]),
                      async_tokens=seed % 2 == 1,
                      bases=[[rng.randrange(vocab) for _ in range(rng.randint(0, 12))] for _ in range(3)])
        bm.sim = sim
        for _ in range(steps):
            sim.step()
        sim.run()
        sim.free_all()
        sim.run()
        assert not bm.transfers and (bm.host is None or not bm.host.pinned)
        assert bm.stats.loaded_blocks == sim.counts.get("loaded", 0)
        assert bm.stats.saved_blocks == sim.counts.get("save", 0)
        for k, v in sim.counts.items():
            totals[k] = totals.get(k, 0) + v
    return totals


@pytest.mark.parametrize("windows,block_sizes,pool", CONFIGS, ids=[str(c[0]) for c in CONFIGS])
def test_random_schedules_keep_kv_correct_across_both_tiers(windows: tuple[int, ...], block_sizes: tuple[int, ...],
                                                            pool: tuple[int, int]) -> None:
    totals = walk(windows, block_sizes, pool, range(36))
    # The walks reached the states the properties are about: host hits loaded above all.
    for what in ("host_hit", "loaded", "save", "hit", "alloc_fail", "fork", "reset"):
        assert totals.get(what, 0) > 20, (what, totals)


# ------------------------------------------------------------------ targeted cases
class KV:
    """The bytes, for the cases below: what each device block and host slot holds (group, the
    token prefix), moved by the transfers in their order, written by computation."""

    def __init__(self, bm: BlockManager) -> None:
        self.bm = bm
        self.device: dict[int, tuple[int, tuple[int, ...]]] = {}
        self.host: dict[int, tuple[int, tuple[int, ...]]] = {}

    def run(self) -> list[KVTransfer]:
        transfers = self.bm.take_transfers()
        assert self.bm.host is None or not self.bm.host.pinned
        for t in transfers:
            if t.kind == "save":
                self.host[t.target] = self.device[t.source]
            else:
                self.device[t.target] = self.host[t.source]
        return transfers

    def compute(self, request: Request, num_tokens: int | None = None) -> None:
        """The transfers run, then the request's next tokens are computed (all, by default)."""
        self.run()
        n = request.num_uncomputed_tokens if num_tokens is None else num_tokens
        self.write(request, n)
        request.num_computed_tokens += n
        self.bm.cache_full_blocks(request)

    def write(self, request: Request, n: int) -> None:
        """The KV of the request's next n tokens, after reading its own prefix's."""
        self.assert_holds_own(request)
        bs, start, end = self.bm.block_size, request.num_computed_tokens, request.num_computed_tokens + n
        for g, blocks in enumerate(request.kv_blocks):
            for j in range(start // bs, (end - 1) // bs + 1):
                self.device[blocks[j]] = (g, tuple(request.token_ids[:min(end, (j + 1) * bs)]))

    def assert_holds_own(self, request: Request) -> None:
        bs = self.bm.block_size
        for g, blocks in enumerate(request.kv_blocks):
            for j, b in enumerate(blocks[:request.num_computed_tokens // bs]):
                if b != NULL_BLOCK:
                    assert self.device.get(b) == (g, tuple(request.token_ids[:(j + 1) * bs])), f"block {b}"


def admit(bm: BlockManager, kv: KV, rid: str, tokens: list[int], compute: bool = True) -> Request:
    """Match, allocate the whole prompt and (by default) compute it."""
    request = Request(rid, list(tokens), max_tokens=1)
    hits = bm.match_prefix(request)
    assert bm.blocks_short(request, request.num_tokens - len(hits) * bm.block_size, hits) == 0
    assert bm.allocate_slots(request, request.num_tokens - len(hits) * bm.block_size, hits)
    request.num_computed_tokens = len(hits) * bm.block_size
    if compute:
        kv.compute(request)
        kv.assert_holds_own(request)
    return request


def filler(bm: BlockManager, num_blocks: int, rid: str = "filler") -> Request:
    """Takes num_blocks blocks of each group; computes and caches nothing."""
    request = Request(rid, [99] * (num_blocks * bm.block_size), max_tokens=1)
    assert bm.allocate_slots(request, request.num_tokens)
    return request


def saves(transfers: list[KVTransfer]) -> list[KVTransfer]:
    return [t for t in transfers if t.kind == "save"]


def test_an_evicted_cached_block_is_saved_once() -> None:
    bm = BlockManager(4, 2, num_host_blocks=4)
    kv = KV(bm)
    a = admit(bm, kv, "a", [1, 1, 2, 2, 9])
    a0, a1 = a.block_ids[:2]
    serials = [bm.blocks[a0].serial, bm.blocks[a1].serial]
    bm.free(a)
    f = filler(bm, 4)  # the 2 never-cached blocks, then a's, least recently freed (its tail) first
    transfers = kv.run()
    assert [(t.kind, t.source) for t in transfers] == [("save", a1), ("save", a0)]
    assert bm.stats.saved_blocks == 2 and bm.stats.evictions == 2
    assert all(bm.host.holds(0, s) for s in serials) and kv.host[transfers[1].target] == (0, (1, 1))
    bm.free(f)
    # b loads a's prefix back; its blocks, evicted again, are not saved: the host holds them.
    b = admit(bm, kv, "b", [1, 1, 2, 2, 7])
    assert [bm.blocks[x].serial for x in b.block_ids[:2]] == serials
    bm.free(b)
    f = filler(bm, 4)
    assert saves(kv.run()) == [] and bm.stats.saved_blocks == 2 and bm.stats.evictions == 4
    bm.free(f)
    bm.check_invariants()


def test_a_block_whose_registered_twin_stays_is_not_saved() -> None:
    """Twins (one prefix computed by two requests together) share a serial: evicting one while
    the other is registered saves nothing; the last of them is saved when it goes."""
    bm = BlockManager(4, 2, num_host_blocks=4)
    kv = KV(bm)
    c1 = admit(bm, kv, "c1", [3, 3, 9], compute=False)
    c2 = admit(bm, kv, "c2", [3, 3, 8], compute=False)  # no hit: c1's block is not computed yet
    kv.compute(c1)
    kv.compute(c2)
    twins = c1.block_ids[0], c2.block_ids[0]
    assert bm.blocks[twins[0]].serial == bm.blocks[twins[1]].serial
    bm.free(c1)  # its twin in use: first to go
    bm.free(c2)
    f = filler(bm, 3)  # 2 never-cached blocks and c1's twin
    assert saves(kv.run()) == [] and bm.stats.evictions == 1
    assert len(bm.match_prefix(Request("x", [3, 3, 1], max_tokens=1))) == 1  # on the device still
    g = filler(bm, 1, "g")  # c2's, the last copy: saved
    assert [(t.kind, t.source) for t in kv.run()] == [("save", twins[1])]
    assert bm.host.holds(0, bm.host.blocks[next(iter(bm.host.blocks))].serial) and bm.stats.saved_blocks == 1
    for request in (f, g):
        bm.free(request)
    bm.check_invariants()


def _saved_prefix(bm: BlockManager, kv: KV, tokens: list[int]) -> Request:
    """Computes a request of these tokens, frees it and evicts its blocks (saved to the host)."""
    a = admit(bm, kv, "a", tokens)
    bm.free(a)
    f = filler(bm, bm.num_free_blocks)
    kv.run()
    bm.free(f)
    assert not any(b.hash is not None for b in bm.blocks), "every cached block evicted"
    return a


def test_a_host_hit_loads_into_a_fresh_block_registered_as_its_twin() -> None:
    bm = BlockManager(6, 2, num_host_blocks=4)
    kv = KV(bm)
    _saved_prefix(bm, kv, [1, 1, 2, 2, 9])
    b = Request("b", [1, 1, 2, 2, 7], max_tokens=1)
    hits = bm.match_prefix(b)
    assert list(hits) == [HOST_BLOCK, HOST_BLOCK]
    slots = [bm.host.by_serial[0, s] for s in hits.serials]
    assert bm.blocks_short(b, 1, hits) == 0
    assert bm.allocate_slots(b, 1, hits)
    assert bm.host.pinned == set(slots)
    loaded = b.block_ids[:2]
    assert [(t.kind, t.source, t.target) for t in bm.transfers] == [("load", s, x) for s, x in zip(slots, loaded)]
    for x, serial, h in zip(loaded, hits.serials, b.block_hashes):
        assert bm.blocks[x].serial == serial and bm.blocks[x].hash == h and bm.blocks[x].ref_count == 1
    b.num_computed_tokens = 4
    kv.compute(b)
    kv.assert_holds_own(b)
    assert bm.stats.loaded_blocks == 2
    # The next request of that prefix hits the loaded blocks on the device: no transfer.
    c = Request("c", [1, 1, 2, 2, 5], max_tokens=1)
    assert bm.match_prefix(c) == loaded
    assert bm.allocate_slots(c, 1, bm.match_prefix(c)) and bm.transfers == [] and bm.stats.loaded_blocks == 2
    bm.check_invariants([b, c])
    for request in (b, c):
        bm.free(request)
    assert bm.num_free_blocks == bm.num_blocks


@pytest.mark.parametrize("num_host_blocks", [1, 2, 3])
def test_pinned_host_blocks_are_not_overwritten_before_their_loads(num_host_blocks: int) -> None:
    """A hit on host blocks whose own allocation, and the next one in the same step, evict cached
    blocks the host would save: saves go only into unpinned host blocks (with 1 or 2 host blocks,
    all pinned: none is saved), and each load reads the prefix it was matched to."""
    n = min(num_host_blocks, 2)  # the host prefix's blocks, all pinned by the hit
    bm = BlockManager(8, 2, num_host_blocks=num_host_blocks)
    kv = KV(bm)
    prompt = [1, 1, 2, 2][:2 * n]
    _saved_prefix(bm, kv, prompt + [9])
    z = admit(bm, kv, "z", [5, 5, 6, 6, 7, 7, 8, 8])  # 4 cached blocks, freed: the only ones left to take
    bm.free(z)
    f = filler(bm, bm.num_free_blocks - 4)
    b = Request("b", prompt + [8], max_tokens=1)
    hits = bm.match_prefix(b)
    assert list(hits) == [HOST_BLOCK] * n
    order = [bm.host.by_serial[0, s] for s in hits.serials]
    slots = set(order)
    assert bm.allocate_slots(b, 1, hits)  # n loads and a new block: n + 1 of z's evicted
    b.num_computed_tokens = 2 * n
    d = filler(bm, bm.num_free_blocks, "d")  # the same step: z's last blocks go too
    pinned, transfers = set(bm.host.pinned), list(bm.transfers)
    kv.compute(b)  # the step's transfers, in order, then b's forward
    kv.assert_holds_own(b)  # the loads read the prefix b matched
    assert pinned == slots
    assert [(t.source, t.target) for t in transfers if t.kind == "load"] == list(zip(order, b.block_ids[:n]))
    assert not any(t.target in slots for t in saves(transfers)), "a pinned block was overwritten"
    assert len(saves(transfers)) == (4 if num_host_blocks > n else 0)  # into the one unpinned block, in turn
    assert bm.stats.saved_blocks == n + len(saves(transfers))
    if num_host_blocks > n:
        assert kv.host[saves(transfers)[-1].target] == (0, (5, 5))  # z's first block, the last evicted
    loaded = b.block_ids[:n]
    for request in (b, d, f):
        bm.free(request)
    assert bm.match_prefix(Request("e", prompt + [3], max_tokens=1)) == loaded  # registered, on the device
    bm.check_invariants()


def test_blocks_short_counts_the_loads() -> None:
    bm = BlockManager(7, 2, num_host_blocks=4)
    kv = KV(bm)
    _saved_prefix(bm, kv, [1, 1, 2, 2, 3, 3, 9])
    f = filler(bm, 5)  # 2 free blocks left; b needs 3 loads and a new block
    b = Request("b", [1, 1, 2, 2, 3, 3, 8], max_tokens=1)
    hits = bm.match_prefix(b)
    assert list(hits) == [HOST_BLOCK] * 3
    assert bm.blocks_short(b, 1, hits) == 2
    assert not bm.allocate_slots(b, 1, hits)
    assert bm.transfers == [] and not bm.host.pinned and not b.held_block_ids() and bm.stats.loaded_blocks == 0
    bm.free(f)
    g = filler(bm, 3, "g")  # 4 free: it fits
    assert bm.blocks_short(b, 1, hits) == 0 and bm.allocate_slots(b, 1, hits)
    assert bm.num_free_blocks == 0 and bm.stats.loaded_blocks == 3
    b.num_computed_tokens = 6
    kv.compute(b)
    kv.assert_holds_own(b)
    for request in (b, g):
        bm.free(request)
    bm.check_invariants()


def test_a_sliding_groups_loads_are_those_of_its_window() -> None:
    bs = 2
    bm = BlockManager(24, bs, windows=(0, 4), num_host_blocks=16)
    kv = KV(bm)
    a = Request("a", [t % 3 for t in range(13)], max_tokens=1)
    assert bm.allocate_slots(a, 13)
    kv.compute(a)  # one prefill: every block of both groups held, then all cached
    bm.free(a)
    f = filler(bm, bm.num_free_blocks // 2)
    kv.run()
    bm.free(f)
    b = Request("b", [t % 3 for t in range(12)] + [7], max_tokens=1)
    hits = bm.match_prefix(b)
    assert list(hits) == [HOST_BLOCK] * 6
    start = window_start_block(4, 12, bs)
    assert hits.groups[1] == [NULL_BLOCK] * start + [HOST_BLOCK] * (6 - start)
    loads = 6 + 6 - start
    free = bm.num_free_blocks
    assert bm.blocks_short(b, 1, hits) == 0 and bm.allocate_slots(b, 1, hits)
    assert len(bm.transfers) == loads and free - bm.num_free_blocks == loads + 2
    b.num_computed_tokens = 12
    kv.compute(b)
    kv.assert_holds_own(b)
    bm.free(b)
    bm.check_invariants()


def test_a_groups_host_copy_under_an_older_serial_is_loaded() -> None:
    """Group 0's copies of a prefix may all be gone while another group's is kept (group 0's
    blocks are freed, so evicted, first): computed again, the prefix takes a new serial, and a
    later hit may find that group's older copy on the host (allocate_slots raised KeyError)."""
    bm = BlockManager(9, 2, windows=(0, 8, 8), num_host_blocks=3)
    kv = KV(bm)
    a = admit(bm, kv, "a", [1, 1, 2, 2, 3, 3])
    old = bm.blocks[a.kv_blocks[2][0]].serial
    bm.free(a)
    f1 = filler(bm, 2)  # evicts a's group 0 and 1 blocks (saved; the host keeps group 1's last 3)
    kv.run()
    bm.free(f1)
    assert not bm.host.holds(0, old) and bm.host.holds(1, old)
    b = admit(bm, kv, "b", [1, 1, 8])
    new = bm.blocks[b.kv_blocks[0][0]].serial
    assert new != old
    bm.free(b)
    c = admit(bm, kv, "c", [1, 1, 7])  # group 2's hit: a's copy (serial old), first registered
    assert bm.blocks[c.kv_blocks[2][0]].serial == old
    f2 = filler(bm, 1, "f2")  # evicts b's group 2 copy (saved)
    bm.free(c)
    f3 = filler(bm, 2, "f3")  # evicts c's blocks: saved, the host drops b's group 2 copy
    kv.run()
    assert {(s.group, s.serial) for s in bm.host.blocks.values()} == {(0, new), (1, new), (2, old)}
    for request in (f2, f3):
        bm.free(request)
    d = Request("d", [1, 1, 5], max_tokens=1)
    hits = bm.match_prefix(d)
    assert hits.groups == [[HOST_BLOCK]] * 3 and hits.serials == [new]
    assert bm.allocate_slots(d, 1, hits)
    assert [bm.blocks[blocks[0]].serial for blocks in d.kv_blocks] == [new, new, old]
    d.num_computed_tokens = 2
    kv.compute(d)
    kv.assert_holds_own(d)
    e = Request("e", [1, 1, 4], max_tokens=1)
    assert bm.match_prefix(e).groups == [blocks[:1] for blocks in d.kv_blocks]  # on the device now
    bm.free(d)
    bm.check_invariants()


def test_a_forks_copy_goes_after_the_save_of_the_block_it_takes() -> None:
    """fork() may evict a cached block for the partial block's copy: the engine runs the save
    (take_transfers) before the copy, so the host gets the evicted prefix's KV."""
    bm = BlockManager(3, 2, num_host_blocks=2)
    kv = KV(bm)
    z = admit(bm, kv, "z", [5, 5, 6])
    cached = z.block_ids[0]
    bm.free(z)  # z's full block cached; its partial one free
    p = admit(bm, kv, "p", [1, 1, 2])  # 2 blocks: no never-cached block left
    child = Request("c", [1, 1, 2, 3], max_tokens=1)
    child.block_hashes = list(p.block_hashes)
    [(source, copy)] = bm.fork(p, child)
    assert copy == cached and bm.stats.evictions == 1
    transfers = kv.run()  # before the copy
    kv.device[copy] = kv.device[source]
    assert [(t.kind, t.source) for t in transfers] == [("save", copy)] and kv.host[transfers[0].target] == (0, (5, 5))
    kv.assert_holds_own(child)
    for request in (p, child):
        bm.free(request)
    assert bm.match_prefix(Request("y", [5, 5, 1], max_tokens=1)) == [HOST_BLOCK]


def test_reset_prefix_cache_clears_the_host_tier() -> None:
    bm = BlockManager(4, 2, num_host_blocks=4)
    kv = KV(bm)
    _saved_prefix(bm, kv, [1, 1, 2, 2, 9])
    assert len(bm.host.blocks) == 2
    held = admit(bm, kv, "h", [4, 4, 9])
    assert not bm.reset_prefix_cache() and len(bm.host.blocks) == 2  # refused while blocks are held
    bm.free(held)
    assert bm.reset_prefix_cache()
    assert not bm.host.blocks and not bm.host.by_hash and not bm.host.by_serial and len(bm.host.free) == 4
    assert bm.match_prefix(Request("b", [1, 1, 2, 2, 7], max_tokens=1)) == []
    assert bm.match_prefix(Request("c", [4, 4, 7], max_tokens=1)) == []
    bm.check_invariants()


def test_host_kv_cache_evicts_the_least_recently_used_unpinned_block() -> None:
    host = HostKVCache(2)
    first = host.store(0, 11, 1, None, (1,))
    second = host.store(0, 12, 2, 1, (2,))
    host.pin(first)  # a load reads it: kept, and most recently used
    assert host.store(0, 13, 3, None, (3,)) == second and not host.holds(0, 2)
    host.pin(second)
    assert host.store(0, 14, 4, None, (4,)) is None  # every block pinned: nothing saved
    host.unpin_all()
    assert host.store(0, 14, 4, None, (4,)) == first and host.lookup(0, 14, None, (4,)).slot == first
    host.check_invariants()
    with pytest.raises(ValueError):
        HostKVCache(0)


def test_scheduler_stats_count_saved_and_loaded_blocks_and_host_hits() -> None:
    """Through the scheduler (the engine takes the transfers each step): a prompt evicted by
    another one's is saved, and computed again only past its host hits."""
    sched = Scheduler(SchedulerConfig(max_model_len=32, num_blocks=8, block_size=4, num_host_blocks=8,
                                      max_num_batched_tokens=64))
    bm, kv = sched.block_manager, KV(sched.block_manager)
    prompt = list(range(1, 17))

    def serve(request: Request) -> None:
        sched.add_request(request)
        while sched.has_unfinished:
            batch = sched.schedule()
            kv.run()
            for r, n in zip(batch.requests, batch.num_tokens):
                kv.write(r, n)
            sched.update(batch, [1000 + r.num_output_tokens if batch.samples(i) else None
                                 for i, r in enumerate(batch.requests)])
            for r in batch.requests:
                if r.num_output_tokens >= r.max_tokens:
                    sched.finish(r)
            bm.check_invariants(sched.running + list(sched.waiting))

    serve(Request("a", prompt, max_tokens=1))
    serve(Request("b", [50 + t for t in range(30)], max_tokens=1))  # every block: a's 4 saved
    assert bm.stats.saved_blocks == 4 and bm.stats.loaded_blocks == 0
    hits_before = bm.stats.hits_tokens
    c = Request("c", prompt, max_tokens=1)
    serve(c)
    assert c.num_cached_tokens == 12 and bm.stats.hits_tokens - hits_before == 12
    assert bm.stats.loaded_blocks == 3
    assert bm.num_free_blocks == bm.num_blocks
