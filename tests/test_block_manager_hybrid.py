"""Randomised tests of the hybrid KV cache manager: one block pool shared by layer groups of
different attention windows (scheduler/block_manager.py, scheduler/kv_cache_groups.py).

A simulation drives BlockManager as the scheduler does (admit with prefix hits, allocate and
compute chunks, decode, fork beams, preempt, free) over tiny pools, block sizes 2-4 and
vocabularies of 2-3 tokens, for windows (0, 8), (0, 8, 8), (0, 0, 5), (0, 3) and (6,), so that
prefixes repeat and hit, sliding blocks go back to the pool, cached blocks are evicted and
allocations fail. Beside the manager it models the KV each block really holds: the group, the
prefix root and the exact token prefix written into it, wiped when the block is handed out
again. It proves, after every operation:

1. KV correctness: a hit block of group g at index j holds (g, root, tokens[:(j+1)*bs]); each
   chunk a request computes reads, in every group, only blocks holding its own prefix (every
   key in its window); every full computed block a live request holds is its own prefix's; every
   registered block holds the KV its hash entry claims, and a serial names one prefix.
2. Window coverage: every entry a live request holds from its sliding groups' window start on
   is a real block; after an allocation that took new blocks (or failed), every entry before
   it is NULL_BLOCK.
3. No leak: `check_invariants` (reference counts equal the live requests' holdings), all
   blocks free once every request is freed, and a sliding group of window w never holds more
   than (w + chunk - 2) // bs + 2 blocks (chunk: the most tokens allocated in one call).
4. Hit accounting: `blocks_short(request, n, hits) > 0` exactly when `allocate_slots` fails; a
   failed allocation changes no reference count but releasing the request's out-of-window
   blocks, evicts nothing, and leaves the cache as it was; a successful one adds exactly the
   placed hits and fresh (unreferenced) blocks.
5. Deterministic prefix hits over a (0, 8) pool, cut back when the sliding group's window
   blocks were evicted; 6. fork() shares full blocks in every group and copies the partial one.
"""

from __future__ import annotations

import random
from dataclasses import dataclass, field

import pytest

from scheduler.block_manager import BlockManager, PrefixHits, chained_hash
from scheduler.kv_cache_groups import window_start_block
from scheduler.request import NULL_BLOCK, Request

# (group, prefix root, the token prefix whose KV the block holds, up to its last written slot)
Content = tuple[int, int | None, tuple[int, ...]]


def _weak_hash(parent: int | None, token_ids: tuple[int, ...]) -> int:
    return hash((parent, token_ids)) % 5  # collisions everywhere: hits must be verified exactly


@dataclass
class HybridSim:
    bm: BlockManager
    rng: random.Random
    vocab: int
    max_len: int
    max_chunk: int
    live: list[Request] = field(default_factory=list)
    waiting: list[Request] = field(default_factory=list)
    content: dict[int, Content | None] = field(default_factory=dict)
    serials: dict[int, tuple[int | None, tuple[int, ...]]] = field(default_factory=dict)
    bases: list[list[int]] = field(default_factory=list)
    async_tokens: bool = False  # sampled tokens pending (their KV computed before their ids are known)
    most_allocated: int = 1
    future: dict[str, int] = field(default_factory=dict)  # request id -> its pending token
    next_id: int = 0
    counts: dict[str, int] = field(default_factory=dict)

    @property
    def bs(self) -> int:
        return self.bm.block_size

    @property
    def windows(self) -> tuple[int, ...]:
        return self.bm.windows

    def _count(self, what: str) -> None:
        self.counts[what] = self.counts.get(what, 0) + 1

    # ------------------------------------------------------------ model helpers
    def _truth(self, request: Request, group: int, end: int) -> Content:
        sequence = request.token_ids + ([self.future[request.request_id]] if request.num_pending_tokens else [])
        return (group, request.prefix_root, tuple(sequence[:end]))

    def _arrive(self, request: Request) -> None:
        """The pending token's id comes back from the device (scheduler.append_token)."""
        if request.num_pending_tokens:
            request.append_token(self.future.pop(request.request_id), 0.0, pending=True)
            self.bm.cache_full_blocks(request)

    def _groups_of(self, request: Request) -> list[list[int]]:
        """The request's block lists, one per group (a fresh request has a single empty one)."""
        if len(request.kv_blocks) != self.bm.num_groups:
            assert not request.held_block_ids()
            return [[] for _ in self.windows]
        return [list(blocks) for blocks in request.kv_blocks]

    def _refs(self) -> list[int]:
        return [block.ref_count for block in self.bm.blocks]

    def _cache_state(self) -> tuple[object, ...]:
        bm = self.bm
        return ([dict(c) for c in bm.cached], bm.stats.evictions,
                [(b.hash, b.serial, b.group if b.hash is not None else None) for b in bm.blocks])

    # ------------------------------------------------------------ allocation
    def allocate(self, request: Request, n: int, hits: PrefixHits | None = None) -> bool:
        """allocate_slots with properties 2-4 checked around it."""
        bm, bs = self.bm, self.bs
        hit_list: PrefixHits | list[int] = hits if hits is not None else []
        c = request.num_computed_tokens
        before_lists = self._groups_of(request)
        slow = bool(hit_list) or n > len(before_lists[0]) * bs - c
        released: list[tuple[int, int]] = []  # (group, index) of the out-of-window blocks it gives back
        if slow:
            for g, (w, blocks) in enumerate(zip(self.windows, before_lists)):
                if w:
                    start = min(window_start_block(w, c, bs), len(blocks))
                    released += [(g, j) for j in range(start) if blocks[j] != NULL_BLOCK]
        refs_before, cache_before = self._refs(), self._cache_state()
        free_before = bm.num_free_blocks
        short = bm.blocks_short(request, n, hit_list)
        assert self._refs() == refs_before and self._cache_state() == cache_before, "blocks_short changed state"
        ok = bm.allocate_slots(request, n, hit_list)
        assert (short > 0) == (not ok), f"blocks_short {short} but allocate_slots {ok}"
        self.most_allocated = max(self.most_allocated, n)
        expected = list(refs_before)
        for g, j in released:
            expected[before_lists[g][j]] -= 1
        after_lists = self._groups_of(request)
        for g, j in released:
            assert after_lists[g][j] == NULL_BLOCK, "an out-of-window block was not given back"
        if not ok:
            self._count("alloc_fail")
            assert self._refs() == expected, "a failed allocation changed reference counts"
            assert self._cache_state() == cache_before, "a failed allocation changed the cache"
            assert bm.num_free_blocks == free_before + sum(1 for r in expected if r == 0) - \
                sum(1 for r in refs_before if r == 0)
            assert [len(b) for b in after_lists] == [len(b) for b in before_lists]
            return False
        self._count("alloc_ok")
        old_len = len(before_lists[0])
        num_hits = len(hit_list)
        assert hits is None or old_len == 0
        new_len = bm.blocks_needed(c + num_hits * bs + n)
        assert all(len(blocks) == max(new_len, old_len) for blocks in after_lists)
        if hits is not None:
            for g, ids in enumerate(hits.groups):
                start = min(window_start_block(self.windows[g], num_hits * bs, bs), len(ids))
                placed = [NULL_BLOCK] * start + list(ids[start:])
                assert after_lists[g][:num_hits] == placed, "hits not placed as matched"
                for b in placed:
                    if b != NULL_BLOCK:
                        expected[b] += 1
        for g, blocks in enumerate(after_lists):
            for j in range(max(old_len, num_hits), len(blocks)):
                fresh = blocks[j]
                assert fresh != NULL_BLOCK and expected[fresh] == 0, f"block {fresh} handed out while held"
                assert bm.blocks[fresh].hash is None and bm.blocks[fresh].group == g
                expected[fresh] = 1
                self.content[fresh] = None  # its old KV is overwritten from now on
        assert self._refs() == expected, "allocation changed reference counts beyond its own blocks"
        # 2. after the allocation, the window's blocks are held, and those before it are not
        # (given back only when it takes new blocks: a step its held blocks fit takes nothing).
        computed = c + num_hits * bs
        for w, blocks in zip(self.windows, after_lists):
            start = window_start_block(w, computed, bs)
            if slow:
                assert all(b == NULL_BLOCK for b in blocks[:start]), "block before the window still held"
            assert all(b != NULL_BLOCK for b in blocks[start:]), "block of the window missing"
        return True

    # ------------------------------------------------------------ computing
    def compute(self, request: Request, n: int) -> None:
        """The model ran n more positions: check what each group's queries read, write the KV."""
        bs, c = self.bs, request.num_computed_tokens
        assert c + n <= request.num_tokens
        for g, (w, blocks) in enumerate(zip(self.windows, request.kv_blocks)):
            for j in range(window_start_block(w, c, bs), (c + n - 1) // bs + 1):
                b = blocks[j]
                assert b != NULL_BLOCK, f"group {g} reads or writes block {j}, which is not held"
                if (j + 1) * bs <= c:  # read only: a block of earlier keys
                    assert self.content.get(b) == self._truth(request, g, (j + 1) * bs), f"block {b}: wrong KV read"
                elif j * bs < c:  # the partial block the chunk goes on writing
                    assert self.content.get(b) == self._truth(request, g, c), f"block {b}: wrong KV read"
                else:  # written from its start: this request's own fresh block
                    assert self.content.get(b) is None and self.bm.blocks[b].ref_count == 1, f"block {b} not fresh"
                if (j + 1) * bs > c:
                    self.content[b] = self._truth(request, g, min(c + n, (j + 1) * bs))
        request.num_computed_tokens += n
        self.bm.cache_full_blocks(request)

    # ------------------------------------------------------------ operations
    def _prompt(self) -> list[int]:
        rng = self.rng
        tail = [rng.randrange(self.vocab) for _ in range(rng.randrange(0, 6))]
        tokens = list(rng.choice(self.bases)) + tail
        if self.live and rng.random() < 0.3:  # a live request's sequence, one token changed
            tokens = list(rng.choice(self.live).token_ids)
            tokens[rng.randrange(len(tokens))] = rng.randrange(self.vocab)
        return tokens[:self.max_len] or [0]

    def _chunk(self, most: int) -> int:
        if most <= 1 or self.rng.random() < 0.4:
            return min(most, self.max_chunk)
        return self.rng.randint(1, min(most, self.max_chunk))

    def admit(self) -> None:
        rng, bs = self.rng, self.bs
        if self.waiting and rng.random() < 0.5:
            request = self.waiting.pop(rng.randrange(len(self.waiting)))  # a preempted one comes back
        else:
            root = rng.choice([None, None, None, -1])
            request = Request(f"r{self.next_id}", self._prompt(), max_tokens=1, prefix_root=root,
                              use_prefix_cache=rng.random() > 0.1)
            self.next_id += 1
        assert request.num_computed_tokens == 0 and not request.held_block_ids()
        hits = self.bm.match_prefix(request)
        assert isinstance(hits, PrefixHits) and hits.groups[0] == list(hits)
        assert len(hits) <= (request.num_tokens - 1) // bs, "a hit must leave a token to compute"
        self.check_hits(request, hits)
        if hits:
            self._count("hit")
        n = self._chunk(request.num_tokens - len(hits) * bs)
        if not self.allocate(request, n, hits):
            self.waiting.append(request)
            return
        request.num_computed_tokens = len(hits) * bs
        self.live.append(request)
        self.compute(request, n)

    def check_hits(self, request: Request, hits: PrefixHits) -> None:
        """Every group's hit blocks: NULL_BLOCK before its window, each holding the request's own KV."""
        bs = self.bs
        for g, (w, ids) in enumerate(zip(self.windows, hits.groups)):
            assert len(ids) == len(hits)
            start = window_start_block(w, len(hits) * bs, bs) if g else 0
            for j, b in enumerate(ids):
                assert (b == NULL_BLOCK) == (j < start), f"group {g} hit {j}: {b}"
                if b != NULL_BLOCK:
                    assert self.bm.blocks[b].group == g
                    assert self.content.get(b) == self._truth(request, g, (j + 1) * bs), "wrong KV served"

    def grow(self) -> None:
        request = self.rng.choice(self.live)
        uncomputed = request.num_uncomputed_tokens
        if not uncomputed:
            if request.num_pending_tokens:
                self._arrive(request)
            elif len(request.token_ids) < self.max_len:
                if self.async_tokens and self.rng.random() < 0.7:  # sampled: its KV comes first
                    request.num_pending_tokens = 1
                    self.future[request.request_id] = self.rng.randrange(self.vocab)
                else:
                    request.append_token(self.rng.randrange(self.vocab), 0.0)
                    self.bm.cache_full_blocks(request)
            return
        if request.num_pending_tokens and self.rng.random() < 0.3:
            self._arrive(request)
        n = self._chunk(uncomputed)
        extra = self.rng.choice([0, 0, 0, 1, 3])  # room for drafts, as a speculative step asks
        if self.allocate(request, n + extra):
            self.compute(request, n)

    def fork(self) -> None:
        bm, bs = self.bm, self.bs
        ready = [r for r in self.live if r.num_uncomputed_tokens == 0 and not r.num_pending_tokens
                 and len(r.token_ids) < self.max_len]
        if not ready:
            return
        parent = self.rng.choice(ready)
        c = parent.num_computed_tokens
        if c % bs and bm.num_free_blocks < bm.num_groups:
            return
        child = Request(f"r{self.next_id}", parent.token_ids + [self.rng.randrange(self.vocab)], max_tokens=1,
                        prefix_root=parent.prefix_root)
        self.next_id += 1
        child.block_hashes = list(parent.block_hashes)
        full = c // bs
        refs_before = self._refs()
        pairs = bm.fork(parent, child)
        check_fork(bm, parent, child, pairs, refs_before)
        for g, (source, copy) in enumerate(pairs):
            assert self.content.get(source) == self._truth(parent, g, c)
            self.content[copy] = self.content[source]  # the caller copies the partial block's KV
        assert len(pairs) == (bm.num_groups if c % bs else 0) and all(len(b) == full + bool(c % bs)
                                                                       for b in child.kv_blocks)
        self._count("fork")
        self.live.append(child)

    def free(self, preempt: bool) -> None:
        request = self.live.pop(self.rng.randrange(len(self.live)))
        self._arrive(request)
        self.bm.free(request)
        assert not request.held_block_ids()
        if preempt:
            request.num_computed_tokens = 0
            self.waiting.append(request)

    def free_all(self) -> None:
        while self.live:
            request = self.live.pop()
            self._arrive(request)
            self.bm.free(request)
        self.waiting.clear()
        self.bm.check_invariants()
        assert self.bm.num_free_blocks == self.bm.num_blocks, "blocks leaked"

    # ------------------------------------------------------------ invariants
    def check(self) -> None:
        bm, bs = self.bm, self.bs
        bm.check_invariants(self.live)
        bound = [(w + self.most_allocated - 2) // bs + 2 for w in self.windows]
        for request in self.live:
            c = request.num_computed_tokens
            for g, (w, blocks) in enumerate(zip(self.windows, request.kv_blocks)):
                start = window_start_block(w, c, bs)
                assert all(b != NULL_BLOCK for b in blocks[start:]), f"{request.request_id}: window block missing"
                for j, b in enumerate(blocks[:c // bs]):
                    if b != NULL_BLOCK:
                        assert self.content.get(b) == self._truth(request, g, (j + 1) * bs), \
                            f"{request.request_id} holds block {b} of another prefix"
                if w:
                    held = sum(1 for b in blocks if b != NULL_BLOCK)
                    assert held <= bound[g], f"window {w} group holds {held} blocks, bound {bound[g]}"
        for block in bm.blocks:
            if block.hash is None:
                continue
            truth = self.content.get(block.block_id)
            assert truth is not None, f"registered block {block.block_id} without KV"
            group, root, prefix = truth
            assert group == block.group and len(prefix) % bs == 0 and prefix[-bs:] == block.token_ids
            assert self.serials.setdefault(block.serial, (root, prefix)) == (root, prefix), "serial names two prefixes"
            if len(prefix) == bs:
                assert block.parent_serial == root
            elif block.parent_serial in self.serials:
                assert self.serials[block.parent_serial] == (root, prefix[:-bs])
        assert bm.num_free_blocks == sum(1 for b in bm.blocks if b.ref_count == 0)

    def step(self) -> None:
        rng = self.rng
        r = rng.random()
        if not self.live or r < 0.3:
            self.admit()
        elif r < 0.75:
            self.grow()
        elif r < 0.82:
            self.fork()
        elif r < 0.95:
            self.free(preempt=rng.random() < 0.4)
        elif r < 0.97:
            self.free_all()
        else:
            if self.waiting:
                self.waiting.pop(rng.randrange(len(self.waiting)))  # aborted while waiting
        self.check()


def check_fork(bm: BlockManager, parent: Request, child: Request, pairs: list[tuple[int, int]],
               refs_before: list[int]) -> None:
    """Property 6: the child shares the parent's full blocks in every group (NULL staying
    NULL), and has a fresh copy of each group's partial last block."""
    full = parent.num_computed_tokens // bm.block_size
    expected = list(refs_before)
    for g, (own, theirs) in enumerate(zip(child.kv_blocks, parent.kv_blocks)):
        assert own[:full] == theirs[:full]
        for b in own[:full]:
            if b != NULL_BLOCK:
                expected[b] += 1
    if pairs:
        assert [source for source, _ in pairs] == [blocks[full] for blocks in parent.kv_blocks]
    for g, (source, copy) in enumerate(pairs):
        assert source != NULL_BLOCK and refs_before[copy] == 0 and copy != source
        assert child.kv_blocks[g][full] == copy and bm.blocks[copy].group == g
        expected[copy] = 1
    assert [b.ref_count for b in bm.blocks] == expected
    assert child.num_computed_tokens == parent.num_computed_tokens


CONFIGS = [
    # windows, block sizes, (min, max) pool blocks
    ((0, 8), (2, 3, 4), (8, 30)),
    ((0, 8, 8), (2, 3, 4), (10, 36)),
    ((0, 0, 5), (2, 3, 4), (10, 36)),
    ((0, 3), (2, 3), (6, 24)),
    ((6,), (2, 3, 4), (4, 20)),
]


@pytest.mark.parametrize("windows,block_sizes,pool", CONFIGS, ids=[str(c[0]) for c in CONFIGS])
def test_random_schedules_keep_kv_correct(windows: tuple[int, ...], block_sizes: tuple[int, ...],
                                          pool: tuple[int, int]) -> None:
    totals: dict[str, int] = {}
    for seed in range(60):
        rng = random.Random(1000 * len(CONFIGS) * seed + sum(windows) + 7 * len(windows))
        bs = rng.choice(block_sizes)
        num_blocks = rng.randint(*pool)
        hasher = rng.choice([chained_hash, chained_hash, _weak_hash])
        bm = BlockManager(num_blocks, bs, enable_prefix_caching=seed % 10 != 9, hasher=hasher, windows=windows)
        vocab = rng.choice([2, 3])
        sim = HybridSim(bm, rng, vocab=vocab, max_len=rng.randint(8, 28), max_chunk=rng.choice([3, 5, 8, 100]),
                        async_tokens=seed % 2 == 1, bases=[[rng.randrange(vocab) for _ in range(rng.randint(0, 12))] for _ in range(3)])
        for _ in range(200):
            sim.step()
        sim.free_all()
        for k, v in sim.counts.items():
            totals[k] = totals.get(k, 0) + v
    # The schedules did reach the states the properties are about.
    for what in ("hit", "alloc_fail", "fork", "alloc_ok"):
        assert totals.get(what, 0) > 20, (what, totals)


# ------------------------------------------------------------------ deterministic cases
def _run_chunks(bm: BlockManager, request: Request, chunk: int, hits: PrefixHits | None = None) -> list[list[int]]:
    """Admit the request (with its hits) and compute its whole prompt, chunk tokens a step:
    each group's blocks, as held at each index before any was given back."""
    held = [[NULL_BLOCK] * len(blocks) for blocks in (hits.groups if hits is not None else bm.windows)] \
        if hits is not None else [[] for _ in bm.windows]

    def note() -> None:
        for seen, blocks in zip(held, request.kv_blocks):
            seen.extend([NULL_BLOCK] * (len(blocks) - len(seen)))
            for j, b in enumerate(blocks):
                if b != NULL_BLOCK:
                    seen[j] = b

    computed = len(hits) * bm.block_size if hits is not None else 0
    first = min(chunk, request.num_tokens - computed)
    assert bm.allocate_slots(request, first, hits if hits is not None else [])
    note()
    request.num_computed_tokens = computed + first
    bm.cache_full_blocks(request)
    while request.num_uncomputed_tokens:
        n = min(chunk, request.num_uncomputed_tokens)
        assert bm.allocate_slots(request, n)
        note()
        request.num_computed_tokens += n
        bm.cache_full_blocks(request)
    return held


def test_hit_needs_the_sliding_window_blocks_and_is_cut_back_when_they_are_evicted() -> None:
    bs = 4
    bm = BlockManager(40, bs, windows=(0, 8))
    prompt = [t % 3 for t in range(40)]
    a = Request("a", prompt, max_tokens=1)
    assert bm.match_prefix(a) == []
    anchor, sliding = _run_chunks(bm, a, 8)
    assert anchor == a.kv_blocks[0]
    # 40 computed: the sliding group kept blocks 6.. only (window_start_block(8, 32, 4) at its last step).
    assert len(anchor) == 10 and all(b != NULL_BLOCK for b in anchor)
    assert a.kv_blocks[1] == [NULL_BLOCK] * 6 + sliding[6:] and NULL_BLOCK not in sliding
    assert bm.num_used_blocks == 14
    bm.free(a)
    bm.check_invariants()
    assert bm.num_free_blocks == 40

    # B: the same first 36 tokens (9 blocks), then its own: 9 anchor blocks hit, and the
    # sliding group's blocks of the window before its 37th token (7 and 8), the rest NULL.
    b = Request("b", prompt[:36] + [9, 9, 9, 9, 9], max_tokens=1)
    hits = bm.match_prefix(b)
    assert list(hits) == anchor[:9]
    assert window_start_block(8, 36, bs) == 7
    assert hits.groups[1] == [NULL_BLOCK] * 7 + a_sliding_blocks(sliding, bm, 7, 9)
    assert bm.num_free_blocks == 40  # matching takes nothing

    # C (a's 40 tokens and more) holds every anchor block and the sliding blocks 8 and 9; D (its
    # first 28 tokens and more) the sliding blocks 5 and 6. Then a filler takes every free block:
    # a's other sliding blocks (7 among them) are evicted.
    c = Request("c", prompt + [2, 2, 2, 2], max_tokens=1)
    c_hits = bm.match_prefix(c)
    assert list(c_hits) == anchor and c_hits.groups[1][:8] == [NULL_BLOCK] * 8
    _run_chunks(bm, c, 8, c_hits)
    d = Request("d", prompt[:28] + [9, 9, 9, 9], max_tokens=1)
    d_hits = bm.match_prefix(d)
    assert list(d_hits) == anchor[:7] and d_hits.groups[1] == [NULL_BLOCK] * 5 + a_sliding_blocks(sliding, bm, 5, 7)
    _run_chunks(bm, d, 8, d_hits)
    free = bm.num_free_blocks
    filler = Request("f", [7] * (free // 2 * bs), max_tokens=1)
    assert bm.allocate_slots(filler, filler.num_tokens)  # one prefill: nothing given back before the window
    assert bm.num_free_blocks == free % 2 and bm.stats.evictions > 0
    assert bm.blocks[sliding[7]].ref_count == 1, "a's sliding block 7 went to the filler"
    bm.check_invariants([c, d, filler])

    bm.free(filler)  # its blocks were never cached: the cache stays as it is

    # B again: the anchor still has 9 blocks, but the window of 36 tokens needs sliding block 7,
    # evicted; cut back to 7 blocks, whose window (blocks 5 and 6) D holds.
    hits = bm.match_prefix(b)
    assert list(hits) == anchor[:7]
    assert hits.groups[1] == [NULL_BLOCK] * 5 + d.kv_blocks[1][5:7]
    assert bm.allocate_slots(b, b.num_tokens - 28, hits)
    b.num_computed_tokens = b.num_tokens
    assert b.kv_blocks[1][:7] == hits.groups[1] and bm.blocks[d.kv_blocks[1][5]].ref_count == 2
    bm.check_invariants([b, c, d])

    # With B and D gone and every cached block C does not hold evicted, nothing of the window is
    # left: no hit at all (every shorter prefix's window reaches an evicted sliding block).
    for request in (b, d):
        bm.free(request)
    more = Request("g", [8] * (bm.num_free_blocks // 2 * bs), max_tokens=1)
    assert bm.allocate_slots(more, more.num_tokens)
    assert bm.num_free_blocks <= 1
    assert len(bm.match_prefix(Request("e", prompt[:36] + [1], max_tokens=1))) == 0
    for request in (c, more):
        bm.free(request)
    bm.check_invariants()
    assert bm.num_free_blocks == bm.num_blocks


def a_sliding_blocks(sliding: list[int], bm: BlockManager, start: int, end: int) -> list[int]:
    """The sliding group's blocks start..end-1 of the first request (all still registered)."""
    blocks = sliding[start:end]
    assert all(b != NULL_BLOCK and bm.blocks[b].hash is not None for b in blocks)
    return blocks


@pytest.mark.parametrize("windows", [(0, 8), (0, 8, 8), (0, 0, 5), (6,)])
def test_fork_shares_full_blocks_and_copies_the_partial_one(windows: tuple[int, ...]) -> None:
    bs = 4
    bm = BlockManager(64, bs, windows=windows)
    parent = Request("p", [t % 3 for t in range(22)], max_tokens=1)
    _run_chunks(bm, parent, 5)  # 22 computed: 5 full blocks and 2 tokens of a sixth
    assert any(NULL_BLOCK in blocks for blocks in parent.kv_blocks), "a sliding group gave blocks back"
    child = Request("c", parent.token_ids + [1], max_tokens=1)
    child.block_hashes = list(parent.block_hashes)
    refs = [b.ref_count for b in bm.blocks]
    pairs = bm.fork(parent, child)
    check_fork(bm, parent, child, pairs, refs)
    assert len(pairs) == len(windows)
    for blocks, own in zip(parent.kv_blocks, child.kv_blocks):
        assert [b == NULL_BLOCK for b in own[:5]] == [b == NULL_BLOCK for b in blocks[:5]]
    bm.check_invariants([parent, child])
    # The child goes on from its own copy; the parent from its block.
    assert bm.allocate_slots(child, 1)
    child.num_computed_tokens += 1
    bm.cache_full_blocks(child)
    bm.check_invariants([parent, child])
    # On a block boundary nothing is copied.
    parent.append_token(2, 0.0)
    parent.append_token(0, 0.0)
    assert bm.allocate_slots(parent, 2)
    parent.num_computed_tokens += 2
    bm.cache_full_blocks(parent)
    second = Request("c2", parent.token_ids + [0], max_tokens=1)
    refs = [b.ref_count for b in bm.blocks]
    assert bm.fork(parent, second) == []
    check_fork(bm, parent, second, [], refs)
    assert all(len(blocks) == 6 for blocks in second.kv_blocks)
    for request in (parent, child, second):
        bm.free(request)
    bm.check_invariants()
    assert bm.num_free_blocks == bm.num_blocks


@pytest.mark.parametrize("windows,bs,chunk", [((0, 8), 4, 1), ((0, 8), 4, 8), ((6,), 2, 3), ((0, 0, 5), 3, 4)])
def test_a_long_sequence_holds_only_its_window_in_sliding_groups(windows: tuple[int, ...], bs: int,
                                                                 chunk: int) -> None:
    bm = BlockManager(400, bs, windows=windows)
    request = Request("long", [t % 5 for t in range(300)], max_tokens=1)
    held_most = [0] * len(windows)
    while request.num_uncomputed_tokens:
        n = min(chunk, request.num_uncomputed_tokens)
        assert bm.allocate_slots(request, n)
        request.num_computed_tokens += n
        bm.cache_full_blocks(request)
        bm.check_invariants([request])
        for g, (w, blocks) in enumerate(zip(windows, request.kv_blocks)):
            held = sum(1 for b in blocks if b != NULL_BLOCK)
            held_most[g] = max(held_most[g], held)
            if w:
                assert held <= -(-(w + chunk) // bs) + 1
                start = window_start_block(w, request.num_computed_tokens, bs)
                assert NULL_BLOCK not in blocks[start:]
    full_blocks = -(-300 // bs)
    for w, most in zip(windows, held_most):
        assert most == full_blocks if not w else most < full_blocks // 4
    assert bm.num_used_blocks == sum(sum(1 for b in blocks if b != NULL_BLOCK) for blocks in request.kv_blocks)
    bm.free(request)
    bm.check_invariants()
    assert bm.num_free_blocks == bm.num_blocks


@pytest.mark.parametrize("windows", [(0, 8), (0, 0)])
def test_an_adapters_prefix_hits_in_every_group(windows: tuple[int, ...]) -> None:
    """A LoRA adapter's prefixes chain from its own root (Request.prefix_root) in every group:
    its next request with the same prompt hits every block the first computed, in each group,
    and the base model's request (root None) hits none of them."""
    bm = BlockManager(32, 4, windows=windows)
    prompt = [1, 2, 3, 4, 5, 6, 7, 8, 9]
    first = Request("a", prompt, max_tokens=1, prefix_root=-5)
    assert bm.allocate_slots(first, first.num_tokens)
    first.num_computed_tokens = first.num_tokens
    bm.cache_full_blocks(first)
    held = [list(blocks[:2]) for blocks in first.kv_blocks]
    bm.free(first)
    again = bm.match_prefix(Request("b", prompt, max_tokens=1, prefix_root=-5))
    assert again == held[0] and again.groups == held
    assert bm.match_prefix(Request("c", prompt, max_tokens=1)) == []
