"""Which tokens a grammar allows next: the vocabulary's byte strings walked through the
grammar's automaton, one boolean mask over the vocabulary per state, cached.

The walk visits the tokens in byte order, so tokens that begin alike share the states of their
common prefix, and a prefix the grammar refuses skips every token that begins with it (one
bisect). Inside a JSON string every token made of plain string bytes is taken if it holds no more
characters than the string has room for (any, without a maxLength): those are allowed without a
walk, and only the tokens with a quote, a backslash or a control byte are walked (~2% of a 49k
vocabulary). A cold mask takes milliseconds; a cached
one a dictionary lookup and an unpack.
"""

from __future__ import annotations

import bisect
import copy
import math
from collections import OrderedDict
from collections.abc import Iterable
from typing import Any

import numpy as np
import torch

from engine.grammar import Grammar, State, utf8_prefix


class TokenVocabulary:
    """The tokens' bytes, sorted for the walk; `size` is the model's vocabulary (the masks' width)."""

    def __init__(self, token_bytes: list[bytes | None]) -> None:
        self.size = len(token_bytes)
        self.token_bytes = token_bytes
        by_text: dict[bytes, list[int]] = {}
        for token_id, text in enumerate(token_bytes):
            if text:  # an empty token would be allowed everywhere and write nothing
                by_text.setdefault(text, []).append(token_id)
        self._all = _Sorted(by_text)
        # Plain string bytes: not ", not backslash, not a control byte. And each plain token's
        # characters (its bytes but UTF-8's continuation bytes), and whether it is well-formed
        # UTF-8 from a character's start (it may end inside one): a bounded string's fast path.
        self.string_plain = np.zeros(self.size, dtype=bool)
        self.string_plain_chars = np.zeros(self.size, dtype=np.int32)
        self.string_plain_utf8 = np.zeros(self.size, dtype=bool)
        special: dict[bytes, list[int]] = {}
        for text, ids in by_text.items():
            if b'"' in text or b"\\" in text or min(text) < 0x20:
                special[text] = ids
            else:
                self.string_plain[ids] = True
                self.string_plain_chars[ids] = sum(1 for byte in text if not 0x80 <= byte <= 0xBF)
                self.string_plain_utf8[ids] = utf8_prefix(text)
        self._string_special = _Sorted(special)

    def allowed(self, grammar: Grammar, state: State) -> np.ndarray:
        """A bool mask over the vocabulary: the tokens whose bytes the grammar takes from `state`."""
        rooms = grammar.plain_text_rooms(state)
        if rooms is not None:
            mask = np.zeros(self.size, dtype=bool)
            for room, utf8 in rooms:
                plain = self.string_plain_utf8 if utf8 else self.string_plain
                mask |= plain if room == math.inf else plain & (self.string_plain_chars <= room)
            ids = self._string_special.walk(grammar, state)
        else:
            mask = np.zeros(self.size, dtype=bool)
            ids = self._all.walk(grammar, state)
        mask[ids] = True
        return mask


class _Sorted:
    """Distinct token texts in byte order, with their ids and each one's common prefix with the
    one before it."""

    def __init__(self, by_text: dict[bytes, list[int]]) -> None:
        self.texts = sorted(by_text)
        self.ids = [by_text[t] for t in self.texts]
        self.common = [0] + [_common_prefix(a, b) for a, b in zip(self.texts, self.texts[1:])]

    def walk(self, grammar: Grammar, state: State) -> list[int]:
        texts, common = self.texts, self.common
        allowed: list[int] = []
        states = [state]  # states[d]: after the first d bytes of the last text walked
        last = -1
        i, n = 0, len(texts)
        step = grammar.step
        while i < n:
            text = texts[i]
            keep = common[i] if last == i - 1 else _common_prefix(texts[last], text)
            del states[keep + 1:]
            s = states[-1]
            depth = len(states) - 1
            while depth < len(text):
                s = step(s, text[depth])
                if s is None:
                    break
                depth += 1
                states.append(s)
            last = i
            if s is None:  # no text that begins with text[:depth + 1] is allowed
                i = _after_prefix(texts, text[:depth + 1], i + 1)
                continue
            allowed.extend(self.ids[i])
            i += 1
        return allowed


def _common_prefix(a: bytes, b: bytes) -> int:
    n = min(len(a), len(b))
    i = 0
    while i < n and a[i] == b[i]:
        i += 1
    return i


def _after_prefix(texts: list[bytes], prefix: bytes, lo: int) -> int:
    """The first index from `lo` whose text does not begin with `prefix` (texts sorted)."""
    end = prefix.rstrip(b"\xff")
    if not end:
        return len(texts)
    bound = end[:-1] + bytes([end[-1] + 1])  # the least byte string after every one with the prefix
    return bisect.bisect_left(texts, bound, lo)


class TokenMasks:
    """Masks per (grammar, state, end tokens), least recently used dropped first, kept packed
    (8 tokens a byte, numpy's packbits order: what the sampler sends to the device, 8x less
    than bools). The end tokens (EOS, a request's stop_token_ids) are allowed once the answer
    is complete."""

    def __init__(self, vocabulary: TokenVocabulary, max_cached: int = 4096) -> None:
        self.vocabulary = vocabulary
        self._cached: OrderedDict[tuple[Grammar, State, tuple[int, ...]], tuple[torch.Tensor, bool, bool]] = \
            OrderedDict()
        self._max_cached = max_cached

    def packed(self, grammar: Grammar, state: State, end_ids: tuple[int, ...]) -> tuple[torch.Tensor, bool, bool]:
        """(the allowed tokens' bits (uint8, shared with the cache: read only), only end tokens
        are allowed, no token is: a dead end, where a grammar's limits refuse every way on)."""
        key = (grammar, state, end_ids)
        hit = self._cached.get(key)
        if hit is not None:
            self._cached.move_to_end(key)
            return hit
        mask = self.vocabulary.allowed(grammar, state)
        ends = np.zeros_like(mask)
        ends[[t for t in end_ids if t < mask.shape[0]]] = True
        if grammar.complete(state):
            mask |= ends
        entry = torch.from_numpy(np.packbits(mask)), bool(mask.any() and not (mask & ~ends).any()), not mask.any()
        self._cached[key] = entry
        if len(self._cached) > self._max_cached:
            self._cached.popitem(last=False)
        return entry

    def get(self, grammar: Grammar, state: State, end_ids: tuple[int, ...]) -> tuple[torch.Tensor, bool, bool]:
        """`packed`, with the mask as a bool tensor over the vocabulary."""
        bits, must_end, dead = self.packed(grammar, state, end_ids)
        return unpack_mask(bits, self.vocabulary.size), must_end, dead


def unpack_mask(bits: torch.Tensor, size: int) -> torch.Tensor:
    """Packed mask bits (`[..., ceil(size / 8)]` uint8, numpy's packbits order) as bools
    `[..., size]`, on the bits' device."""
    if bits.device.type == "cpu":  # numpy's one C loop: 15x faster than the shifts
        return torch.from_numpy(np.unpackbits(bits.numpy(), axis=-1, count=size).view(np.bool_))
    return unpack_mask_by_shifts(bits, size)


def unpack_mask_by_shifts(bits: torch.Tensor, size: int) -> torch.Tensor:
    """`unpack_mask` in tensor operations: what runs on a GPU."""
    shifts = torch.arange(7, -1, -1, dtype=torch.uint8, device=bits.device)
    return ((bits.unsqueeze(-1) >> shifts) & 1).flatten(-2)[..., :size].bool()


def masks_along(guide: Any, tokens: list[int]) -> list[tuple[torch.Tensor | None, bool]]:
    """Speculative decoding: a guide's packed_mask() here and after each of `tokens` in turn, as
    far as its grammar takes them on without ending or reaching a dead end (the guide itself
    does not move: a copy probes): a mask for each row that verifies `tokens[:len(masks) - 1]`."""
    probe = copy.copy(guide)
    masks = [probe.packed_mask()]
    for token in tokens:
        if not probe.advance(token) or probe.ended or probe.dead_end():
            break
        masks.append(probe.packed_mask())
    return masks


class Guide:
    """One sample's place in its grammar: the mask of its next token, and each token it took."""

    __slots__ = ("grammar", "masks", "end_ids", "state", "ended", "_mask")

    def __init__(self, grammar: Grammar, masks: TokenMasks, end_ids: Iterable[int]) -> None:
        self.grammar, self.masks = grammar, masks
        self.end_ids = tuple(sorted(set(end_ids)))
        self.state: State = grammar.start
        self.ended = False
        self._mask: tuple[State, tuple[torch.Tensor, bool, bool]] | None = None  # the current state's

    def packed_mask(self) -> tuple[torch.Tensor, bool]:
        """(the tokens allowed next, as packed bits; only end tokens are)."""
        return self._current()[:2]

    def mask(self) -> tuple[torch.Tensor, bool]:
        """(the tokens allowed next, as bools over the vocabulary; only end tokens are)."""
        bits, must_end = self.packed_mask()
        return unpack_mask(bits, self.masks.vocabulary.size), must_end

    def must_end(self) -> bool:
        """Only end tokens may follow: min_tokens yields to the grammar."""
        return not self.ended and self._current()[1]

    def dead_end(self) -> bool:
        """No token may follow, not even an end token: the grammar's limits (MAX_DEPTH,
        MAX_STACKS) refused every way on. The answer can only be cut here."""
        return not self.ended and self._current()[2]

    def _current(self) -> tuple[torch.Tensor, bool, bool]:
        if self._mask is None or self._mask[0] is not self.state:
            self._mask = self.state, self.masks.packed(self.grammar, self.state, self.end_ids)
        return self._mask[1]

    def masks_along(self, tokens: list[int]) -> list[tuple[torch.Tensor, bool]]:
        return masks_along(self, tokens)

    def advance(self, token_id: int) -> bool:
        """Take a sampled token; False if the grammar does not allow it (the state is kept)."""
        if self.ended:
            return False
        if token_id in self.end_ids and self.grammar.complete(self.state):
            self.ended = True
            return True
        text = self.masks.vocabulary.token_bytes[token_id] if token_id < self.masks.vocabulary.size else None
        state = self.grammar.advance(self.state, text) if text else None
        if state is None:
            return False
        self.state = state
        return True
