"""Paged KV block pool with reference counts and a prefix cache over full blocks.

A full block is keyed by a hash chained over its parent's hash and its own token ids, so one
hash names a whole prefix. Hits are verified exactly: against the stored token ids, and the
parent by its serial, the number of the exact token prefix the block's KV was computed after
(unique for ever, unlike hashes and block ids), so a hash collision can cost a cache miss,
never wrong KV. A hash may hold several blocks: twins (the same prefix computed by requests
admitted together, sharing one serial) and collisions (other prefixes), as in vLLM, so a
prefix stays cached while any copy of it does. A request's first block chains from its
`prefix_root` (its LoRA adapter's, where it has one: engine/lora.py), so an adapter's prefixes are never the
base model's. Blocks with no references stay in the cache
and are evicted only when no never-cached block is left: spare twins first (copies of a
prefix a request still holds: it stays cached), then least-recently-freed first.
"""

from __future__ import annotations

from collections import OrderedDict
from collections.abc import Callable, Collection, Mapping, Sequence
from dataclasses import dataclass

from scheduler.request import Request

BlockHasher = Callable[[int | None, tuple[int, ...]], int]


def chained_hash(parent_hash: int | None, token_ids: tuple[int, ...]) -> int:
    return hash((parent_hash, token_ids))


@dataclass(slots=True)
class Block:
    block_id: int
    ref_count: int = 0
    hash: int | None = None  # set while the block is registered in the prefix cache
    serial: int | None = None  # the number of the token prefix whose KV this block holds
    parent_serial: int | None = None  # the prefix before this block's tokens (first: the root)
    token_ids: tuple[int, ...] = ()


@dataclass(slots=True)
class PrefixCacheStats:
    queries_tokens: int = 0
    hits_tokens: int = 0
    evictions: int = 0


class BlockManager:
    def __init__(
        self,
        num_blocks: int,
        block_size: int,
        enable_prefix_caching: bool = True,
        hasher: BlockHasher = chained_hash,
    ) -> None:
        if num_blocks < 1 or block_size < 1:
            raise ValueError(f"need num_blocks >= 1 and block_size >= 1, got {num_blocks}, {block_size}")
        self.num_blocks = num_blocks
        self.block_size = block_size
        self.enable_prefix_caching = enable_prefix_caching
        self.hasher = hasher
        self.blocks = [Block(i) for i in range(num_blocks)]
        # Never-cached free blocks (a stack) and cached unreferenced blocks (LRU order).
        self.free_uncached: list[int] = list(range(num_blocks - 1, -1, -1))
        self.evictable: OrderedDict[int, None] = OrderedDict()
        self.cached: dict[int, dict[int, None]] = {}  # hash -> its registered block ids, in order
        self.stats = PrefixCacheStats()
        self._next_serial = 0

    # ------------------------------------------------------------------ queries
    @property
    def num_free_blocks(self) -> int:
        return len(self.free_uncached) + len(self.evictable)

    @property
    def num_used_blocks(self) -> int:
        return self.num_blocks - self.num_free_blocks

    @property
    def usage(self) -> float:
        return self.num_used_blocks / self.num_blocks

    def blocks_needed(self, num_tokens: int) -> int:
        return -(-num_tokens // self.block_size)

    def _update_hashes(self, request: Request) -> None:
        """Extend request.block_hashes over every full block of its tokens."""
        hashes, tokens, size = request.block_hashes, request.token_ids, self.block_size
        for i in range(len(hashes), len(tokens) // size):
            parent = hashes[-1] if hashes else request.prefix_root
            hashes.append(self.hasher(parent, tuple(tokens[i * size:(i + 1) * size])))

    def match_prefix(self, request: Request) -> list[int]:
        """Cached blocks holding the longest prefix of the request's tokens, leaving at least
        one token to compute (the last one must produce logits)."""
        if not self.enable_prefix_caching or not request.use_prefix_cache:
            return []
        self._update_hashes(request)
        max_blocks = (request.num_tokens - 1) // self.block_size
        hits: list[int] = []
        parent = request.prefix_root
        size, tokens = self.block_size, request.token_ids
        for i, h in enumerate(request.block_hashes[:max_blocks]):
            block_id = self._lookup(h, parent, tuple(tokens[i * size:(i + 1) * size]))
            if block_id is None:
                break
            hits.append(block_id)
            parent = self.blocks[block_id].serial
        return hits

    def _lookup(self, block_hash: int, parent: int | None, token_ids: tuple[int, ...]) -> int | None:
        """A registered block holding token_ids after the prefix numbered parent; one in use
        if any (sharing it takes no free block), else the first registered."""
        found = None
        for block_id in self.cached.get(block_hash, ()):
            block = self.blocks[block_id]
            if block.parent_serial == parent and block.token_ids == token_ids:
                if block.ref_count:
                    return block_id
                if found is None:
                    found = block_id
        return found

    # -------------------------------------------------------------- allocation
    def allocate_slots(self, request: Request, num_new_tokens: int, hits: Sequence[int] = ()) -> bool:
        """Give the request blocks for num_computed_tokens + len(hits) blocks + num_new_tokens.

        `hits` (from match_prefix, only while the request holds no blocks) are shared, not
        copied. Returns False, changing nothing, when the pool cannot supply the new blocks.
        """
        if not hits and self._fits_held(request, num_new_tokens):
            return True  # most decode steps
        num_new_blocks, short = self._new_blocks(request, num_new_tokens, hits)
        if short:
            return False
        for block_id in hits:
            self._ref(block_id)
        request.block_ids.extend(hits)
        if hits:
            request.num_prefix_cached_blocks = len(hits)
            request.prefix_tail_serial = self.blocks[hits[-1]].serial
        for _ in range(num_new_blocks):
            request.block_ids.append(self._take_free_block())
        return True

    def fork(self, parent: Request, child: Request) -> tuple[int, int] | None:
        """Give `child` (a beam search's fork, its tokens the parent's computed ones and one
        more) the parent's KV: its full blocks shared, and a fresh block for its partial last
        one, whose KV the caller copies (the (source, copy) pair returned; None: the computed
        tokens end on a block boundary). The caller checks that a free block is there."""
        size, computed = self.block_size, parent.num_computed_tokens
        full = computed // size
        for block_id in parent.block_ids[:full]:
            self._ref(block_id)
        child.block_ids = parent.block_ids[:full]
        child.num_computed_tokens = computed
        child.num_prefix_cached_blocks = parent.num_prefix_cached_blocks  # registered up to there, and no further
        child.prefix_tail_serial = parent.prefix_tail_serial
        if computed % size == 0:
            return None
        copy = self._take_free_block()
        child.block_ids.append(copy)
        return parent.block_ids[full], copy

    def blocks_short(self, request: Request, num_new_tokens: int, hits: Sequence[int] = ()) -> int:
        """How many more free blocks `allocate_slots` with these arguments needs (0: it fits)."""
        if not hits and self._fits_held(request, num_new_tokens):
            return 0
        return self._new_blocks(request, num_new_tokens, hits)[1]

    def _fits_held(self, request: Request, num_new_tokens: int) -> bool:
        return num_new_tokens <= self.held_room(request)

    def held_room(self, request: Request) -> int:
        """Tokens the request's blocks hold room for past its computed ones."""
        return len(request.block_ids) * self.block_size - request.num_computed_tokens

    def _new_blocks(self, request: Request, num_new_tokens: int, hits: Sequence[int]) -> tuple[int, int]:
        """(blocks to take from the pool, how many of them it lacks)."""
        assert not hits or not request.block_ids, "prefix hits only at admission"
        computed = request.num_computed_tokens + len(hits) * self.block_size
        num_new_blocks = self.blocks_needed(computed + num_new_tokens) - len(request.block_ids) - len(hits)
        reclaimed_hits = sum(1 for b in hits if self.blocks[b].ref_count == 0)
        return num_new_blocks, max(0, num_new_blocks - (self.num_free_blocks - reclaimed_hits))

    def num_freed_by(self, holds: Mapping[int, int], exclude: Collection[int] = ()) -> int:
        """Blocks that freeing some requests would give back to the pool, `holds` saying how many
        of them hold each of their blocks: those no other request holds, `exclude` left out."""
        return sum(1 for b, count in holds.items() if self.blocks[b].ref_count == count and b not in exclude)

    def _ref(self, block_id: int) -> None:
        block = self.blocks[block_id]
        if block.ref_count == 0:
            del self.evictable[block_id]
        block.ref_count += 1

    def _take_free_block(self) -> int:
        if self.free_uncached:
            block_id = self.free_uncached.pop()
        else:
            block_id, _ = self.evictable.popitem(last=False)
            self._uncache(self.blocks[block_id])
            self.stats.evictions += 1
        self.blocks[block_id].ref_count = 1
        return block_id

    def _uncache(self, block: Block) -> None:
        if block.hash is not None:
            twins = self.cached[block.hash]
            del twins[block.block_id]
            if not twins:
                del self.cached[block.hash]
        block.hash, block.serial, block.parent_serial, block.token_ids = None, None, None, ()

    def free(self, request: Request) -> None:
        """Drop the request's references. Tail blocks are freed first so that, being the
        least useful to other prefixes, they are also evicted first; a block whose prefix a
        twin in use also holds goes to the front: evicting it loses no hit."""
        for block_id in reversed(request.block_ids):
            block = self.blocks[block_id]
            block.ref_count -= 1
            assert block.ref_count >= 0, f"block {block_id} freed twice"
            if block.ref_count == 0:
                if block.hash is not None:
                    self.evictable[block_id] = None
                    if self._has_twin_in_use(block):
                        self.evictable.move_to_end(block_id, last=False)
                else:
                    self.free_uncached.append(block_id)
        request.block_ids.clear()
        request.num_prefix_cached_blocks, request.prefix_tail_serial = 0, None

    def _has_twin_in_use(self, block: Block) -> bool:
        """Whether a request holds another copy of the block's prefix (a free copy may be
        evicted first itself: this one would then be the last)."""
        return any(self.blocks[other].serial == block.serial and self.blocks[other].ref_count
                   for other in self.cached[block.hash] if other != block.block_id)

    def cache_full_blocks(self, request: Request) -> None:
        """Register the request's blocks whose KV is now fully computed.

        A block whose prefix a registered twin already holds (the same tokens after the same
        prefix) takes the twin's serial, so the prefix outlives either copy's eviction.
        """
        if not self.enable_prefix_caching:
            return
        size = self.block_size
        # Only blocks whose tokens the host knows: a pending token's KV may be computed already.
        num_full = min(request.num_computed_tokens, len(request.token_ids)) // size
        start = request.num_prefix_cached_blocks
        if start >= num_full:
            return
        self._update_hashes(request)
        tokens = request.token_ids
        parent = request.prefix_tail_serial if start else request.prefix_root
        for i in range(start, num_full):
            h = request.block_hashes[i]
            block_tokens = tuple(tokens[i * size:(i + 1) * size])
            block = self.blocks[request.block_ids[i]]
            assert block.hash is None, f"block {block.block_id} registered twice"
            twin_id = self._lookup(h, parent, block_tokens)
            if twin_id is not None:
                serial = self.blocks[twin_id].serial
            else:
                serial, self._next_serial = self._next_serial, self._next_serial + 1
            block.hash, block.serial, block.parent_serial, block.token_ids = h, serial, parent, block_tokens
            self.cached.setdefault(h, {})[block.block_id] = None
            parent = serial
            request.num_prefix_cached_blocks, request.prefix_tail_serial = i + 1, parent

    def reset_prefix_cache(self) -> bool:
        """Forget every cached block (after weights change, between benchmark runs), as vLLM's:
        refused (False, nothing changed) while requests hold blocks, as their KV stays valid."""
        if self.num_used_blocks:
            return False
        while self.evictable:
            block_id, _ = self.evictable.popitem(last=False)
            self._uncache(self.blocks[block_id])
            self.free_uncached.append(block_id)
        return True

    # -------------------------------------------------------------- invariants
    def check_invariants(self, live_requests: Sequence[Request] = ()) -> None:
        """Assert the pool's bookkeeping is consistent (used by tests)."""
        free = set(self.free_uncached)
        evictable = set(self.evictable)
        assert len(free) == len(self.free_uncached), "duplicate in free list"
        assert not free & evictable, "block both free and evictable"
        for block in self.blocks:
            in_free = block.block_id in free or block.block_id in evictable
            assert (block.ref_count == 0) == in_free, f"block {block.block_id}: ref {block.ref_count}, free {in_free}"
            if block.hash is not None:
                assert block.block_id in self.cached.get(block.hash, ()), f"block {block.block_id} unlisted"
            if block.block_id in evictable:
                assert block.hash is not None
            if block.block_id in free:
                assert block.hash is None
        for h, block_ids in self.cached.items():
            assert block_ids and all(self.blocks[b].hash == h for b in block_ids)
        if live_requests:
            refs: dict[int, int] = {}
            for request in live_requests:
                for block_id in request.block_ids:
                    refs[block_id] = refs.get(block_id, 0) + 1
            for block in self.blocks:
                assert block.ref_count == refs.get(block.block_id, 0), f"block {block.block_id} refcount"
