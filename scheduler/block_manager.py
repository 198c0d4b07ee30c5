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

A hybrid model's layers share the pool in groups (scheduler/kv_cache_groups.py): a request
holds a block list per group, all of one length, and a block is one group's at a time. A
sliding group's blocks before its window go back to the pool as the request's computed tokens
pass them (each time it takes new blocks; their place in its list is NULL_BLOCK), still cached
for other requests of that prefix. Group 0 anchors the prefix cache: a hit is the anchor's
longest cached prefix, cut back until every other group has the blocks its layers read after it
(a sliding group: those of its window); a block of another group is verified against the
anchor's serial of the prefix before it, and registered with the anchor's serial of its own.

With a host tier (scheduler/host_kv_cache.py) a cached block about to be evicted is saved to
host memory first, and a hit may take blocks from there: each gets a fresh block, registered
as the host copy's twin, and a load (`take_transfers`) that the engine runs before the step.
"""

from __future__ import annotations

from collections import OrderedDict
from collections.abc import Callable, Collection, Iterator, Mapping, Sequence
from dataclasses import dataclass

from scheduler.host_kv_cache import HostBlock, HostKVCache, KVTransfer
from scheduler.kv_cache_groups import window_start_block
from scheduler.request import NULL_BLOCK, Request

BlockHasher = Callable[[int | None, tuple[int, ...]], int]

# A prefix hit's block held only in host memory: allocate_slots gives it a device block and a load.
HOST_BLOCK = -2


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
    group: int = 0  # the layer group whose KV the block holds (while taken or cached)


class PrefixHits(list):
    """match_prefix's answer, a list: the anchor group's cached blocks of the prefix. `groups`:
    every group's blocks of it, the anchor's first (a sliding group's NULL_BLOCK before its
    window; HOST_BLOCK: in host memory only). `serials`: the anchor's, of each block's prefix.
    `host`: the host copy found for each HOST_BLOCK, by (group, index)."""

    __slots__ = ("groups", "serials", "host")

    def __init__(self, anchor: list[int], groups: list[list[int]] | None = None,
                 serials: list[int] | None = None, host: dict[tuple[int, int], HostBlock] | None = None) -> None:
        super().__init__(anchor)
        self.groups = groups if groups is not None else [anchor]
        self.serials = serials if serials is not None else []
        self.host = host if host is not None else {}

    def held_block_ids(self) -> list[int]:
        """The device blocks of the hit."""
        return [b for ids in self.groups for b in ids if b >= 0]


@dataclass(slots=True)
class PrefixCacheStats:
    queries_tokens: int = 0
    hits_tokens: int = 0
    evictions: int = 0
    saved_blocks: int = 0  # to the host tier
    loaded_blocks: int = 0  # from it


class BlockManager:
    def __init__(
        self,
        num_blocks: int,
        block_size: int,
        enable_prefix_caching: bool = True,
        hasher: BlockHasher = chained_hash,
        windows: Sequence[int] = (0,),
        num_host_blocks: int = 0,
    ) -> None:
        """`windows`: each layer group's attention window (0: every key), the anchor first.
        `num_host_blocks`: the host tier's (0: none)."""
        if num_blocks < 1 or block_size < 1:
            raise ValueError(f"need num_blocks >= 1 and block_size >= 1, got {num_blocks}, {block_size}")
        self.num_blocks = num_blocks
        self.block_size = block_size
        self.enable_prefix_caching = enable_prefix_caching
        self.hasher = hasher
        self.windows = tuple(windows)
        self.num_groups = len(self.windows)
        self.blocks = [Block(i) for i in range(num_blocks)]
        # Never-cached free blocks (a stack) and cached unreferenced blocks (LRU order).
        self.free_uncached: list[int] = list(range(num_blocks - 1, -1, -1))
        self.evictable: OrderedDict[int, None] = OrderedDict()
        # per group: hash -> its registered block ids, in order
        self.cached: list[dict[int, dict[int, None]]] = [{} for _ in self.windows]
        self.stats = PrefixCacheStats()
        self._next_serial = 0
        self.host = HostKVCache(num_host_blocks) if num_host_blocks and enable_prefix_caching else None
        self.transfers: list[KVTransfer] = []  # to run before the next step's forward

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

    def match_prefix(self, request: Request) -> PrefixHits:
        """Cached blocks holding the longest prefix of the request's tokens, leaving at least
        one token to compute (the last one must produce logits)."""
        if not self.enable_prefix_caching or not request.use_prefix_cache:
            return PrefixHits([], [[] for _ in self.windows])
        self._update_hashes(request)
        max_blocks = (request.num_tokens - 1) // self.block_size
        hits: list[int] = []
        serials: list[int] = []
        host: dict[tuple[int, int], HostBlock] = {}
        parent = request.prefix_root
        size, tokens = self.block_size, request.token_ids
        for i, h in enumerate(request.block_hashes[:max_blocks]):
            found = self._find(0, h, parent, tuple(tokens[i * size:(i + 1) * size]))
            if found is None:
                break
            if isinstance(found, HostBlock):
                host[0, i] = found
            hits.append(HOST_BLOCK if isinstance(found, HostBlock) else found.block_id)
            serials.append(parent := found.serial)
        if self.num_groups == 1:
            return PrefixHits(hits, serials=serials, host=host)
        return self._other_groups_hits(request, hits, serials, host)

    def _other_groups_hits(self, request: Request, anchor: list[int], serials: list[int],
                           host: dict[tuple[int, int], HostBlock]) -> PrefixHits:
        """The anchor's hits cut back to the longest prefix after which every other group holds
        the blocks its layers read (a sliding group: its window's before the next token)."""
        size, tokens = self.block_size, request.token_ids
        found: list[dict[int, int | None]] = [{} for _ in self.windows]

        def lookup(group: int, j: int) -> int | None:
            if j not in found[group]:
                parent = serials[j - 1] if j else request.prefix_root
                hit = self._find(group, request.block_hashes[j], parent, tuple(tokens[j * size:(j + 1) * size]))
                if isinstance(hit, HostBlock):
                    host[group, j] = hit
                found[group][j] = None if hit is None else HOST_BLOCK if isinstance(hit, HostBlock) else hit.block_id
            return found[group][j]

        n = len(anchor)
        settled = False
        while not settled and n:
            settled = True
            for group in range(1, self.num_groups):
                start = window_start_block(self.windows[group], n * size, size)
                missing = next((j for j in range(n - 1, start - 1, -1) if lookup(group, j) is None), None)
                if missing is not None:
                    n, settled = missing, False  # the prefix before the missing block, if any
                    break
        groups = [anchor[:n]]
        for group in range(1, self.num_groups):
            start = window_start_block(self.windows[group], n * size, size)
            groups.append([NULL_BLOCK] * start + [found[group][j] for j in range(start, n)])
        return PrefixHits(anchor[:n], groups, serials[:n], {(g, j): b for (g, j), b in host.items() if j < n})

    def _find(self, group: int, block_hash: int, parent: int | None,
              token_ids: tuple[int, ...]) -> Block | HostBlock | None:
        """A cached copy of the group's block holding token_ids after the prefix numbered parent:
        a device block if any (`_lookup`'s), else one in host memory."""
        block_id = self._lookup(group, block_hash, parent, token_ids)
        if block_id is not None:
            return self.blocks[block_id]
        if self.host is not None:
            return self.host.lookup(group, block_hash, parent, token_ids)
        return None

    def _lookup(self, group: int, block_hash: int, parent: int | None, token_ids: tuple[int, ...]) -> int | None:
        """A registered block of the group holding token_ids after the prefix numbered parent;
        one in use if any (sharing it takes no free block), else the first registered."""
        found = None
        for block_id in self.cached[group].get(block_hash, ()):
            block = self.blocks[block_id]
            if block.parent_serial == parent and block.token_ids == token_ids:
                if block.ref_count:
                    return block_id
                if found is None:
                    found = block_id
        return found

    # -------------------------------------------------------------- allocation
    def allocate_slots(self, request: Request, num_new_tokens: int, hits: Sequence[int] = ()) -> bool:
        """Give the request blocks for num_computed_tokens + len(hits) blocks + num_new_tokens,
        in every layer group (a sliding group's blocks before its window given back first).

        `hits` (from match_prefix, only while the request holds no blocks) are shared, not
        copied. Returns False, taking nothing, when the pool cannot supply the new blocks.
        """
        if not hits and self._fits_held(request, num_new_tokens):
            return True  # most decode steps
        if len(request.kv_blocks) != self.num_groups:
            assert not request.held_block_ids(), "a request's groups change only while it holds nothing"
            request.kv_blocks = [[] for _ in self.windows]
        self._release_out_of_window(request)
        num_new_blocks, short = self._new_blocks(request, num_new_tokens, hits)
        if short:
            return False
        if hits:
            serials = getattr(hits, "serials", None)
            if not serials:  # a plain list of device blocks
                assert min(hits) >= 0, "a host hit comes with its serials (match_prefix's PrefixHits)"
                serials = [self.blocks[b].serial for b in hits]
            loads: list[tuple[int, int, HostBlock]] = []  # (group, index, the host copy)
            for group, (blocks, placed) in enumerate(zip(request.kv_blocks, self._placed_hits(request, hits))):
                for j, block_id in enumerate(placed):
                    if block_id >= 0:
                        self._ref(block_id)
                    elif block_id == HOST_BLOCK:
                        loads.append((group, j, hits.host[group, j]))
                        self.host.pin(loads[-1][2].slot)  # before taking blocks: their evictions save to host
                blocks.extend(placed)
            for group, j, saved in loads:
                self._load(request, group, j, saved)
            request.num_prefix_cached_blocks = len(hits)
            request.prefix_tail_serial = serials[len(hits) - 1]
        for group, blocks in enumerate(request.kv_blocks):
            for _ in range(num_new_blocks):
                blocks.append(self._take_free_block(group))
        return True

    def _load(self, request: Request, group: int, j: int, saved: HostBlock) -> None:
        """Give the request a fresh block for its hit j of the group held in host memory (the
        copy match_prefix found, by parent and tokens: another group's copy need not carry the
        anchor's serial), registered as the host copy's twin, and the load that fills it."""
        assert self.host.blocks.get(saved.slot) is saved, "a host hit no longer held"
        block_id = self._take_free_block(group)
        self._register(self.blocks[block_id], group, saved.hash, saved.serial, saved.parent_serial, saved.token_ids)
        request.kv_blocks[group][j] = block_id
        self.transfers.append(KVTransfer("load", saved.slot, block_id))
        self.stats.loaded_blocks += 1

    def take_transfers(self) -> list[KVTransfer]:
        """The host tier's transfers since the last call, in order, for the engine to run
        before the next forward (and before a fork's copies); the host blocks they read are
        no longer pinned."""
        transfers, self.transfers = self.transfers, []
        if self.host is not None:
            self.host.unpin_all()
        return transfers

    def _placed_hits(self, request: Request, hits: Sequence[int]) -> list[list[int]]:
        """Each group's hit blocks as the request holds them: those before the group's window
        (a sliding anchor's) NULL_BLOCK."""
        computed = request.num_computed_tokens + len(hits) * self.block_size
        placed = []
        for window, ids in zip(self.windows, getattr(hits, "groups", [list(hits)])):
            start = min(window_start_block(window, computed, self.block_size), len(ids))
            placed.append([NULL_BLOCK] * start + list(ids[start:]))
        return placed

    def _out_of_window(self, request: Request) -> list[tuple[list[int], int]]:
        """The request's blocks its later queries no longer read: (its group's list, index)
        for each before a sliding group's window, latest first."""
        found = []
        for window, blocks in zip(self.windows, request.kv_blocks):
            if window:
                j = min(window_start_block(window, request.num_computed_tokens, self.block_size), len(blocks)) - 1
                while j >= 0 and blocks[j] != NULL_BLOCK:
                    found.append((blocks, j))
                    j -= 1
        return found

    def _release_out_of_window(self, request: Request) -> None:
        for blocks, j in self._out_of_window(request):
            self._release(blocks[j])
            blocks[j] = NULL_BLOCK

    def fork(self, parent: Request, child: Request) -> list[tuple[int, int]]:
        """Give `child` (a beam search's fork, its tokens the parent's computed ones and one
        more) the parent's KV: its full blocks shared (in every group), and a fresh block for
        each group's partial last one, whose KV the caller copies (the (source, copy) pairs
        returned; none: the computed tokens end on a block boundary). The caller checks that
        the free blocks are there."""
        size, computed = self.block_size, parent.num_computed_tokens
        full = computed // size
        child.kv_blocks = [blocks[:full] for blocks in parent.kv_blocks]
        for block_id in child.held_block_ids():
            self._ref(block_id)
        child.num_computed_tokens = computed
        child.num_prefix_cached_blocks = parent.num_prefix_cached_blocks  # registered up to there, and no further
        child.prefix_tail_serial = parent.prefix_tail_serial
        if computed % size == 0:
            return []
        pairs = []
        for group, (blocks, own) in enumerate(zip(parent.kv_blocks, child.kv_blocks)):
            copy = self._take_free_block(group)
            own.append(copy)
            pairs.append((blocks[full], copy))
        return pairs

    def blocks_short(self, request: Request, num_new_tokens: int, hits: Sequence[int] = ()) -> int:
        """How many more free blocks `allocate_slots` with these arguments needs (0: it fits)."""
        if not hits and self._fits_held(request, num_new_tokens):
            return 0
        released = sum(1 for blocks, j in self._out_of_window(request) if self.blocks[blocks[j]].ref_count == 1)
        return self._new_blocks(request, num_new_tokens, hits, released)[1]

    def _fits_held(self, request: Request, num_new_tokens: int) -> bool:
        return num_new_tokens <= self.held_room(request)

    def held_room(self, request: Request) -> int:
        """Tokens the request's blocks hold room for past its computed ones."""
        return len(request.block_ids) * self.block_size - request.num_computed_tokens

    def _new_blocks(self, request: Request, num_new_tokens: int, hits: Sequence[int],
                    released: int = 0) -> tuple[int, int]:
        """(blocks to take from the pool for each group, how many of them all lack), with
        `released` more blocks free by then."""
        assert not hits or not request.block_ids, "prefix hits only at admission"
        computed = request.num_computed_tokens + len(hits) * self.block_size
        num_new_blocks = self.blocks_needed(computed + num_new_tokens) - len(request.block_ids) - len(hits)
        reclaimed_hits = loads = 0
        if hits:
            placed = [b for ids in self._placed_hits(request, hits) for b in ids]
            reclaimed_hits = sum(1 for b in placed if b >= 0 and self.blocks[b].ref_count == 0)
            loads = placed.count(HOST_BLOCK)
        free = self.num_free_blocks + released - reclaimed_hits
        return num_new_blocks, max(0, num_new_blocks * self.num_groups + loads - free)

    def num_freed_by(self, holds: Mapping[int, int], exclude: Collection[int] = ()) -> int:
        """Blocks that freeing some requests would give back to the pool, `holds` saying how many
        of them hold each of their blocks: those no other request holds, `exclude` left out."""
        return sum(1 for b, count in holds.items() if self.blocks[b].ref_count == count and b not in exclude)

    def _ref(self, block_id: int) -> None:
        block = self.blocks[block_id]
        if block.ref_count == 0:
            del self.evictable[block_id]
        block.ref_count += 1

    def _take_free_block(self, group: int = 0) -> int:
        if self.free_uncached:
            block_id = self.free_uncached.pop()
        else:
            block_id, _ = self.evictable.popitem(last=False)
            self._save(self.blocks[block_id])
            self._uncache(self.blocks[block_id])
            self.stats.evictions += 1
        block = self.blocks[block_id]
        block.ref_count, block.group = 1, group
        return block_id

    def _save(self, block: Block) -> None:
        """Before an evicted block is reused: its KV to the host tier, unless the host holds its
        prefix already or a device twin does (that one is saved when it goes)."""
        if self.host is None or self.host.holds(block.group, block.serial) or any(self._twins(block)):
            return
        slot = self.host.store(block.group, block.hash, block.serial, block.parent_serial, block.token_ids)
        if slot is not None:
            self.transfers.append(KVTransfer("save", block.block_id, slot))
            self.stats.saved_blocks += 1

    def _uncache(self, block: Block) -> None:
        if block.hash is not None:
            cached = self.cached[block.group]
            twins = cached[block.hash]
            del twins[block.block_id]
            if not twins:
                del cached[block.hash]
        block.hash, block.serial, block.parent_serial, block.token_ids = None, None, None, ()

    def free(self, request: Request) -> None:
        """Drop the request's references. Tail blocks are freed first so that, being the
        least useful to other prefixes, they are also evicted first; a block whose prefix a
        twin in use also holds goes to the front: evicting it loses no hit."""
        for blocks in request.kv_blocks:
            for block_id in reversed(blocks):
                if block_id != NULL_BLOCK:
                    self._release(block_id)
            blocks.clear()
        request.num_prefix_cached_blocks, request.prefix_tail_serial = 0, None

    def _release(self, block_id: int) -> None:
        """Drop one reference to the block: unreferenced, it is evictable if cached, else free."""
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

    def _has_twin_in_use(self, block: Block) -> bool:
        """Whether a request holds another copy of the block's prefix (a free copy may be
        evicted first itself: this one would then be the last)."""
        return any(twin.ref_count for twin in self._twins(block))

    def _twins(self, block: Block) -> Iterator[Block]:
        """The group's other registered blocks of the block's prefix (its serial)."""
        return (other for other in map(self.blocks.__getitem__, self.cached[block.group][block.hash])
                if other.serial == block.serial and other is not block)

    def cache_full_blocks(self, request: Request) -> None:
        """Register the request's blocks whose KV is now fully computed, in every group.

        A block whose prefix a registered twin already holds (the same tokens after the same
        prefix) takes the twin's serial, so the prefix outlives either copy's eviction. The
        other groups' blocks take the anchor's serials; a block already given back (before
        its window) is not registered.
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
            anchor_id = request.block_ids[i]
            if anchor_id == NULL_BLOCK:
                return  # a sliding anchor's block given back unregistered: the chain stops there
            h = request.block_hashes[i]
            block_tokens = tuple(tokens[i * size:(i + 1) * size])
            twin = self._find(0, h, parent, block_tokens)
            if twin is not None:
                serial = twin.serial
            else:
                serial, self._next_serial = self._next_serial, self._next_serial + 1
            for group, blocks in enumerate(request.kv_blocks):
                if blocks[i] != NULL_BLOCK:
                    self._register(self.blocks[blocks[i]], group, h, serial, parent, block_tokens)
            parent = serial
            request.num_prefix_cached_blocks, request.prefix_tail_serial = i + 1, parent

    def _register(self, block: Block, group: int, block_hash: int, serial: int, parent: int | None,
                  token_ids: tuple[int, ...]) -> None:
        assert block.hash is None, f"block {block.block_id} registered twice"
        block.hash, block.serial, block.parent_serial, block.token_ids, block.group = \
            block_hash, serial, parent, token_ids, group
        self.cached[group].setdefault(block_hash, {})[block.block_id] = None

    def reset_prefix_cache(self) -> bool:
        """Forget every cached block (after weights change, between benchmark runs), as vLLM's:
        refused (False, nothing changed) while requests hold blocks, as their KV stays valid."""
        if self.num_used_blocks:
            return False
        while self.evictable:
            block_id, _ = self.evictable.popitem(last=False)
            self._uncache(self.blocks[block_id])
            self.free_uncached.append(block_id)
        if self.host is not None:
            self.host.clear()
        return True

    # -------------------------------------------------------------- invariants
    def check_invariants(self, live_requests: Sequence[Request] = ()) -> None:
        """Assert the pool's bookkeeping is consistent (used by tests)."""
        if self.host is not None:
            self.host.check_invariants()
        free = set(self.free_uncached)
        evictable = set(self.evictable)
        assert len(free) == len(self.free_uncached), "duplicate in free list"
        assert not free & evictable, "block both free and evictable"
        for block in self.blocks:
            in_free = block.block_id in free or block.block_id in evictable
            assert (block.ref_count == 0) == in_free, f"block {block.block_id}: ref {block.ref_count}, free {in_free}"
            if block.hash is not None:
                assert block.block_id in self.cached[block.group].get(block.hash, ()), f"block {block.block_id} unlisted"
            if block.block_id in evictable:
                assert block.hash is not None
            if block.block_id in free:
                assert block.hash is None
        for group, cached in enumerate(self.cached):
            for h, block_ids in cached.items():
                assert block_ids and all(self.blocks[b].hash == h and self.blocks[b].group == group for b in block_ids)
        if live_requests:
            refs: dict[int, int] = {}
            for request in live_requests:
                assert len({len(blocks) for blocks in request.kv_blocks}) == 1, "groups of unequal lengths"
                for group, blocks in enumerate(request.kv_blocks):
                    for block_id in blocks:
                        assert block_id >= 0 or block_id == NULL_BLOCK, f"block id {block_id} held"
                        if block_id != NULL_BLOCK:
                            assert self.blocks[block_id].group == group, f"block {block_id} in two groups"
                            refs[block_id] = refs.get(block_id, 0) + 1
            for block in self.blocks:
                assert block.ref_count == refs.get(block.block_id, 0), f"block {block.block_id} refcount"
