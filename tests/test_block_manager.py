"""Property tests of the paged block pool and its prefix cache.

A state machine drives BlockManager the way the scheduler does (admit with prefix hits,
compute chunks, free) over a tiny pool and a tiny vocabulary, so prefix hits, hash
collisions and evictions all happen often. Beside the manager it keeps its own model:
who references which block, the order cached blocks were freed in, and which token prefix
each block's KV was really computed after. The last is what "no wrong KV" means: a hit at
position i must hold KV computed after exactly the request's first (i+1) blocks of tokens.
"""

from __future__ import annotations

from collections import OrderedDict

import hypothesis.strategies as st
from hypothesis import HealthCheck, settings
from hypothesis.stateful import RuleBasedStateMachine, initialize, invariant, precondition, rule

from scheduler.block_manager import BlockManager, chained_hash
from scheduler.request import Request

VOCAB = 3  # tiny, so different requests share blocks and weak hashers collide


def _weak_hash(parent: int | None, token_ids: tuple[int, ...]) -> int:
    return hash((parent, token_ids)) % 5


def _first_blocks_collide(parent: int | None, token_ids: tuple[int, ...]) -> int:
    return 0 if parent is None else hash((parent, token_ids))


def _tokens_only(parent: int | None, token_ids: tuple[int, ...]) -> int:
    return hash(token_ids)  # equal blocks after different prefixes collide


HASHERS = {"chained": chained_hash, "weak": _weak_hash, "first_collide": _first_blocks_collide,
           "tokens_only": _tokens_only}


class BlockManagerMachine(RuleBasedStateMachine):
    @initialize(
        num_blocks=st.integers(8, 24),
        block_size=st.integers(2, 4),
        # Mostly colliding hashers: the real one never collides in a test this size.
        hasher=st.sampled_from(["chained", "weak", "first_collide", "tokens_only"]),
        prefixes=st.lists(st.lists(st.integers(0, VOCAB - 1), min_size=0, max_size=12), min_size=1, max_size=3),
    )
    def setup(self, num_blocks: int, block_size: int, hasher: str, prefixes: list[list[int]]) -> None:
        self.bm = BlockManager(num_blocks, block_size, hasher=HASHERS[hasher])
        self.size = block_size
        self.prefixes = prefixes
        self.max_len = num_blocks * block_size // 2
        self.live: dict[str, Request] = {}
        self.next_id = 0
        # The model.
        self.refs: dict[int, int] = {}
        self.lru: OrderedDict[int, None] = OrderedDict()  # cached, unreferenced, in free order
        self.uncached_free: set[int] = set(range(num_blocks))
        self.content: dict[int, tuple[int, ...]] = {}  # block -> the whole prefix its KV was computed after
        self.evictions = 0
        self.history: list[tuple[int, ...]] = []

    # ----------------------------------------------------------- helpers
    def _snapshot(self) -> tuple:
        bm = self.bm
        return (list(bm.free_uncached), list(bm.evictable), [dict(c) for c in bm.cached], bm.stats.evictions,
                [(b.ref_count, b.hash) for b in bm.blocks])

    def _check_allocation(self, request: Request, before: int, hits: list[int]) -> None:
        """Replay the allocation in the model: hits are referenced, then each new block must be
        unreferenced, and come from the never-cached blocks while any are left, else be the
        least recently freed cached block."""
        for block_id in hits:
            if self.refs.get(block_id, 0) == 0:
                assert block_id in self.lru, f"hit block {block_id} is neither live nor cached"
                del self.lru[block_id]
            self.refs[block_id] = self.refs.get(block_id, 0) + 1
        new = request.block_ids[before + len(hits):]
        assert len(set(new)) == len(new)
        for block_id in new:
            assert self.refs.get(block_id, 0) == 0, f"block {block_id} handed out while referenced"
            if self.uncached_free:
                assert block_id in self.uncached_free, "evicted a cached block while never-cached ones were free"
                self.uncached_free.remove(block_id)
            else:
                oldest = next(iter(self.lru))
                assert block_id == oldest, f"evicted {block_id}, least recently freed is {oldest}"
                del self.lru[block_id]
                self.evictions += 1
            self.refs[block_id] = 1
            self.content.pop(block_id, None)  # its old KV is about to be overwritten

    def _compute(self, request: Request, num_tokens: int) -> None:
        """The model ran: num_tokens more KV entries are written, full blocks registered."""
        request.num_computed_tokens += num_tokens
        size = self.size
        for i in range(request.num_computed_tokens // size):
            block_id = request.block_ids[i]
            truth = tuple(request.token_ids[:(i + 1) * size])
            assert self.content.setdefault(block_id, truth) == truth, f"block {block_id} shared by different prefixes"
        self.bm.cache_full_blocks(request)
        if request.num_computed_tokens == request.num_tokens and request.num_tokens < self.max_len:
            request.append_token(request.num_tokens % VOCAB, 0.0)

    # ------------------------------------------------------------- rules
    @rule(data=st.data(), tail=st.lists(st.integers(0, VOCAB - 1), max_size=8))
    def admit(self, data: st.DataObject, tail: list[int]) -> None:
        mode = data.draw(st.sampled_from(["fresh", "mutate", "splice"] if self.history else ["fresh"]))
        if mode == "fresh":
            tokens = data.draw(st.sampled_from(self.prefixes)) + tail
        elif mode == "mutate":
            # An earlier request's tokens with one token changed: the same later blocks after
            # a different earlier block, the shape that exposes a parent-hash collision.
            tokens = list(data.draw(st.sampled_from(self.history)))
            tokens[data.draw(st.integers(0, len(tokens) - 1))] = data.draw(st.integers(0, VOCAB - 1))
        else:
            # The leading blocks of one earlier request, then the rest of another.
            first, second = data.draw(st.sampled_from(self.history)), data.draw(st.sampled_from(self.history))
            cut = data.draw(st.integers(1, 2)) * self.size
            tokens = list(first[:cut]) + list(second[cut:]) + tail[:2]
        tokens = tokens[:self.max_len] or [0]
        request = Request(f"r{self.next_id}", tokens, max_tokens=1)
        self.next_id += 1
        hits = self.bm.match_prefix(request)
        size = self.size
        assert len(hits) * size < request.num_tokens, "a hit must leave a token to compute"
        for i, block_id in enumerate(hits):
            block = self.bm.blocks[block_id]
            assert block.token_ids == tuple(tokens[i * size:(i + 1) * size])
            assert self.content.get(block_id) == tuple(tokens[:(i + 1) * size]), "wrong KV served"
        need = request.num_tokens - len(hits) * size
        chunk = data.draw(st.one_of(st.just(need), st.integers(1, need)))  # often the whole prompt
        before = self._snapshot()
        if not self.bm.allocate_slots(request, chunk, hits):
            assert self._snapshot() == before and not request.block_ids, "a failed allocation changed state"
            return
        self._check_allocation(request, 0, hits)
        request.num_computed_tokens = len(hits) * size
        self.live[request.request_id] = request
        self.history.append(tuple(tokens))
        self._compute(request, chunk)

    @precondition(lambda self: self.live)
    @rule(data=st.data())
    def grow(self, data: st.DataObject) -> None:
        request = self.live[data.draw(st.sampled_from(sorted(self.live)))]
        if request.num_uncomputed_tokens == 0:
            return
        n = data.draw(st.one_of(st.just(request.num_uncomputed_tokens), st.integers(1, request.num_uncomputed_tokens)))
        before_blocks = len(request.block_ids)
        before = self._snapshot()
        if not self.bm.allocate_slots(request, n):
            assert self._snapshot() == before and len(request.block_ids) == before_blocks
            return
        self._check_allocation(request, before_blocks, [])
        self._compute(request, n)
        self.history.append(tuple(request.token_ids))

    def _release(self, request: Request) -> None:
        """Free the request in the manager and the model: tail blocks first; a cached block
        whose prefix a block in use also holds (same serial) to the front of the LRU."""
        blocks = self.bm.blocks
        released = list(reversed(request.block_ids))
        self.bm.free(request)
        assert request.block_ids == []
        for block_id in released:
            self.refs[block_id] -= 1
            if self.refs[block_id] == 0:
                del self.refs[block_id]
                block = blocks[block_id]
                if block.hash is None:
                    self.uncached_free.add(block_id)
                    continue
                self.lru[block_id] = None
                if any(other.block_id != block_id and other.hash is not None and other.serial == block.serial
                       and self.refs.get(other.block_id, 0) for other in blocks):
                    self.lru.move_to_end(block_id, last=False)

    @precondition(lambda self: self.live)
    @rule(data=st.data())
    def free(self, data: st.DataObject) -> None:
        self._release(self.live.pop(data.draw(st.sampled_from(sorted(self.live)))))

    @rule()
    def free_all(self) -> None:
        while self.live:
            self._release(self.live.pop(next(iter(self.live))))
        assert self.bm.num_free_blocks == self.bm.num_blocks, "blocks leaked"

    @rule()
    def reset_prefix_cache(self) -> None:
        before = self._snapshot()
        if self.live:
            assert not self.bm.reset_prefix_cache() and self._snapshot() == before, "reset while blocks are held"
            return
        assert self.bm.reset_prefix_cache()
        self.uncached_free.update(self.lru)
        self.lru.clear()
        for block in self.bm.blocks:
            if block.ref_count == 0:
                assert block.hash is None

    # -------------------------------------------------------- invariants
    @invariant()
    def consistent(self) -> None:
        bm = self.bm
        bm.check_invariants(list(self.live.values()))
        for block in bm.blocks:
            assert block.ref_count == self.refs.get(block.block_id, 0)
            if block.hash is not None:
                truth = self.content.get(block.block_id)
                assert truth is not None and truth[-self.size:] == block.token_ids, "cached block without its KV"
        assert bm.num_free_blocks == bm.num_blocks - len(self.refs)
        assert bm.num_free_blocks == len(self.lru) + len(self.uncached_free)
        assert bm.stats.evictions == self.evictions
        if not self.live:
            assert bm.num_free_blocks == bm.num_blocks, "blocks leaked"
        for request in self.live.values():
            assert len(request.block_ids) * self.size >= request.num_computed_tokens

    def teardown(self) -> None:
        # Only release; a failed run's model may be inconsistent, and its error is the one to see.
        for request in getattr(self, "live", {}).values():
            self.bm.free(request)


TestBlockManagerMachine = BlockManagerMachine.TestCase
TestBlockManagerMachine.settings = settings(
    max_examples=200, stateful_step_count=50, deadline=None, suppress_health_check=[HealthCheck.too_slow],
)


# ------------------------------------------------------------------ plain tests
def _admit_and_compute(bm: BlockManager, request_id: str, tokens: list[int]) -> tuple[Request, list[int]]:
    request = Request(request_id, tokens, max_tokens=1)
    hits = bm.match_prefix(request)
    assert bm.allocate_slots(request, request.num_tokens - len(hits) * bm.block_size, hits)
    request.num_computed_tokens = request.num_tokens
    bm.cache_full_blocks(request)
    return request, hits


def test_forced_collision_never_serves_different_tokens() -> None:
    bm = BlockManager(16, 2, hasher=lambda parent, toks: 0)  # every block hashes equal
    a, _ = _admit_and_compute(bm, "a", [1, 2, 3, 4, 5])
    # The same two blocks: hits, told apart from each other by their tokens and parents.
    b, hits = _admit_and_compute(bm, "b", [1, 2, 3, 4, 9])
    assert hits == a.block_ids[:2]
    assert bm.blocks[b.block_ids[0]].ref_count == 2
    # The same first block, then another: a hit on the first only.
    d, hits = _admit_and_compute(bm, "d", [1, 2, 3, 5, 9])
    assert hits == [a.block_ids[0]]
    # Different first block with the same hash: a miss, never the other tokens' KV.
    c, hits = _admit_and_compute(bm, "c", [7, 7, 3, 4, 5])
    assert hits == []
    for request in (a, b, c, d):
        bm.free(request)
    bm.check_invariants()
    assert bm.num_free_blocks == bm.num_blocks


def test_collision_on_parent_does_not_serve_child_computed_after_other_tokens() -> None:
    """Regression: first blocks collide; a child block computed after (2, 2) must not be a hit
    for a request whose first block is (1, 1), even though its own tokens and parent hash match."""
    bm = BlockManager(16, 2, hasher=_first_blocks_collide)
    a, _ = _admit_and_compute(bm, "a", [1, 1, 9])
    b, _ = _admit_and_compute(bm, "b", [2, 2, 5, 5, 9])
    probe = Request("c", [1, 1, 5, 5, 7], max_tokens=1)
    assert bm.match_prefix(probe) == [a.block_ids[0]]
    assert b.block_ids[1] not in bm.match_prefix(probe)


def test_equal_block_after_a_different_prefix_is_not_a_twin() -> None:
    """A block with our tokens and hash but another prefix before it is no twin: our block is
    cached beside it, and each chain serves only after its own prefix."""
    bm = BlockManager(16, 2, hasher=_tokens_only)
    a, _ = _admit_and_compute(bm, "a", [1, 1, 5, 5, 7])
    b, _ = _admit_and_compute(bm, "b", [2, 2, 5, 5, 6, 6, 9])
    probe = Request("c", [1, 1, 5, 5, 6, 6, 8], max_tokens=1)
    assert bm.match_prefix(probe) == a.block_ids[:2], "b's (6, 6) was computed after (2, 2), not (1, 1)"
    assert bm.match_prefix(Request("d", [2, 2, 5, 5, 6, 6, 8], max_tokens=1)) == b.block_ids[:3]


def _admit_together(bm: BlockManager, tokens: list[int], count: int) -> list[Request]:
    """Requests with the same prompt admitted in one step: none hits, each computes it."""
    requests = [Request(f"t{i}", tokens, max_tokens=1) for i in range(count)]
    for request in requests:
        assert bm.match_prefix(request) == []
        assert bm.allocate_slots(request, request.num_tokens)
    for request in requests:
        request.num_computed_tokens = request.num_tokens
        bm.cache_full_blocks(request)
    return requests


def test_chain_continues_through_a_twin_block() -> None:
    """Two requests computing the same prompt at once: both copies are cached as one prefix,
    and the second's own later blocks are hits after either copy."""
    bm = BlockManager(16, 2)
    a, b = _admit_together(bm, [1, 2, 3, 4, 5], 2)
    assert [bm.blocks[i].serial for i in a.block_ids[:2]] == [bm.blocks[i].serial for i in b.block_ids[:2]]
    b.append_token(6, 0.0)  # b goes its own way: [1 2][3 4][5 6]
    assert bm.allocate_slots(b, 1)
    b.num_computed_tokens = 6
    bm.cache_full_blocks(b)
    probe = Request("p", [1, 2, 3, 4, 5, 6, 7], max_tokens=1)
    assert bm.match_prefix(probe) in (a.block_ids[:2] + [b.block_ids[2]], b.block_ids[:3])
    bm.check_invariants([a, b])


def test_prefix_outlives_the_eviction_of_one_twin() -> None:
    """The first copy of a prefix computed twice is evicted while the second's request runs:
    the prefix is still a hit, in the second copy, and a later block computed after it too
    (before, only the first copy was cached: the prefix was lost, and a block registered
    behind it stayed unreachable)."""
    bm = BlockManager(6, 2)
    a, b = _admit_together(bm, [1, 2, 3, 4, 5], 2)
    bm.free(a)  # a's two cached blocks and one uncached tail
    filler, _ = _admit_and_compute(bm, "f", [9] * 5)  # takes the 3 free blocks: evicts a's
    assert bm.stats.evictions == 2
    probe = Request("p", [1, 2, 3, 4, 5], max_tokens=1)
    assert bm.match_prefix(probe) == b.block_ids[:2]
    bm.free(filler)
    bm.check_invariants([b])


def test_the_last_copy_of_a_prefix_keeps_its_place_in_the_lru() -> None:
    """Both copies freed: the first (freed while its twin ran) is spare and goes first, but
    the second is the prefix's last copy and waits its turn behind older prefixes."""
    bm = BlockManager(9, 2)
    older, _ = _admit_and_compute(bm, "o", [7, 7, 8, 8, 9])
    bm.free(older)  # least recently freed
    a, b = _admit_together(bm, [1, 2, 3, 4, 5], 2)
    bm.free(a)
    bm.free(b)
    filler, _ = _admit_and_compute(bm, "f", [9] * 11)  # 6 blocks: 3 never cached, then 3 evictions
    assert bm.stats.evictions == 3
    assert len(bm.match_prefix(Request("q", [1, 2, 3, 4, 5], max_tokens=1))) == 2, "the last copy was evicted"
    assert len(bm.match_prefix(Request("p", [7, 7, 8, 8, 9], max_tokens=1))) == 1
    bm.free(filler)
    bm.check_invariants()


def test_spare_twins_are_evicted_before_other_prefixes() -> None:
    """Freed copies of a prefix that another copy still holds are evicted first: evicting them
    loses no hit, where plain least-recently-freed order would evict another prefix."""
    bm = BlockManager(8, 2)
    other, _ = _admit_and_compute(bm, "o", [7, 7, 7])
    bm.free(other)  # freed first: least recently
    a, b = _admit_together(bm, [1, 2, 3, 4, 5], 2)
    bm.free(a)
    bm.free(b)
    assert bm.num_free_blocks == 8
    filler, _ = _admit_and_compute(bm, "f", [9] * 9)  # 5 blocks: 3 never cached, 2 evicted
    assert bm.stats.evictions == 2
    assert len(bm.match_prefix(Request("p", [7, 7, 7], max_tokens=1))) == 1
    assert len(bm.match_prefix(Request("q", [1, 2, 3, 4, 5], max_tokens=1))) == 2
    bm.free(filler)
    bm.check_invariants()


def test_evictions_counted_and_never_cached_blocks_used_first() -> None:
    bm = BlockManager(4, 2)
    a, _ = _admit_and_compute(bm, "a", [1, 2, 3, 4, 5])  # 3 blocks, 2 full ones cached
    a0, a1, a2 = a.block_ids
    bm.free(a)
    assert bm.num_free_blocks == 4 and bm.stats.evictions == 0
    b, hits = _admit_and_compute(bm, "b", [9, 9, 9, 9, 9, 9, 9])  # needs all 4 blocks
    assert hits == []
    # The two never-cached blocks first, then a's cached ones, tail (freed first) before head.
    assert set(b.block_ids[:2]) == {a2, 3}
    assert b.block_ids[2:] == [a1, a0]
    assert bm.stats.evictions == 2
    bm.free(b)
    assert bm.num_free_blocks == 4


def test_eviction_is_least_recently_freed_across_requests() -> None:
    bm = BlockManager(4, 2)
    a, _ = _admit_and_compute(bm, "a", [1, 1, 0])
    b, _ = _admit_and_compute(bm, "b", [2, 2, 0])
    assert bm.num_free_blocks == 0
    b0 = b.block_ids[0]
    bm.free(b)  # b's cached block freed before a's
    bm.free(a)
    c, _ = _admit_and_compute(bm, "c", [3, 3, 3, 3, 3])  # 2 uncached tails, then 1 eviction
    assert bm.stats.evictions == 1
    assert c.block_ids[-1] == b0
    probe_a, probe_b = Request("pa", [1, 1, 5], 1), Request("pb", [2, 2, 5], 1)
    assert len(bm.match_prefix(probe_a)) == 1, "a's block was freed last; it must survive"
    assert bm.match_prefix(probe_b) == [], "b's block was least recently freed; it goes first"


def test_hit_leaves_one_token_and_failed_allocation_changes_nothing() -> None:
    bm = BlockManager(3, 2)
    a, _ = _admit_and_compute(bm, "a", [1, 2, 3, 4])
    # A prompt exactly two cached blocks long reuses only one: the last token needs logits.
    probe = Request("p", [1, 2, 3, 4], max_tokens=1)
    assert bm.match_prefix(probe) == [a.block_ids[0]]
    big = Request("big", [5] * 5, max_tokens=1)
    assert not bm.allocate_slots(big, 5)
    assert big.block_ids == [] and bm.num_free_blocks == 1 and bm.stats.evictions == 0
    bm.check_invariants([a])
