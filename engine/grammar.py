"""Byte-level grammars for structured outputs: what text a sample may still write.

A grammar is a tree (or, through `$ref`, a graph) of rules, each a small automaton over bytes
that may hand a byte to a child rule and resume when the child is done: a pushdown automaton.
A position in it is a set of stacks (`State`), so alternatives that begin alike (`anyOf`, enum
values, keys that share a prefix) are followed side by side until the text tells them apart.
States are immutable and hashable: token masks are cached per state (`engine/token_masks.py`).

JSON is written as RFC 8259 has it, with two limits a sampler needs: at most `MAX_WHITESPACE`
whitespace bytes in a row between tokens (a small model can otherwise write newlines until
max_tokens), and none after the value (the answer ends there). Object members come in the
schema's order, optional ones may be left out (as xgrammar and outlines write them).
"""

from __future__ import annotations

import bisect
import json
import math
from collections.abc import Hashable, Iterable
from typing import Any

MAX_WHITESPACE = 16
WHITESPACE = frozenset(b" \t\n\r")

# Rules open at once, at most: deeper nesting is not written (and stays far from Python's
# recursion limit, which hashing a state's nested tuples runs into).
MAX_DEPTH = 160

# Stacks (ways to read the text so far) a state may hold, and stacks one byte's step may look
# at: past them the text is refused (`_expand`), so no schema makes a step cost seconds.
MAX_STACKS = 512
MAX_EXPANSION = 2048

# A stack: (rule, its local state, the stack below it or None, its depth). A state: the
# stacks alive.
Stack = tuple[Any, Hashable, Any, int]
State = frozenset

Move = tuple[Hashable, "Rule | None"]  # (the rule's next local state, a child to run first or None)
NO_MOVES: tuple[Move, ...] = ()
# A move's local for a child run in the rule's place: the rule has nothing left to read after
# it (a tail call), so right recursion (`list ::= item ("," list)?`) nests no deeper.
TAIL = "tail"


class Rule:
    """A piece of grammar. `moves(local, byte)`: what reading `byte` in `local` can do, each a
    (next local, None) when this rule reads it, or (local to resume in, child) when a child
    rule starts with it. `accepts(local)`: this rule may end here."""

    __slots__ = ()
    start: Hashable = 0
    # The local state, if any, that a byte of plain string text (no quote, backslash or control
    # byte) leaves as it is: the token masks' fast path (Grammar.plain_text_rooms).
    plain_text: Hashable = None
    # plain_room's text must be well-formed UTF-8 (a whole token's: it may end inside a character)
    plain_utf8 = False

    def moves(self, local: Any, byte: int) -> tuple[Move, ...]:
        raise NotImplementedError

    def plain_room(self, local: Any) -> float | None:
        """The characters of plain string text this rule takes from `local` (math.inf: any);
        None where it is not in plain string text."""
        return math.inf if self.plain_text is not None and local == self.plain_text else None

    def accepts(self, local: Any) -> bool:
        raise NotImplementedError

    def parts(self) -> tuple[Rule, ...]:
        """The rules this one may start (for `trim`)."""
        return ()

    def finite(self, finite: set[Rule]) -> bool:
        """Some text of this rule ends, given the parts known to (`trim`)."""
        return True

    def drop(self, finite: set[Rule]) -> None:
        """Leave out the parts whose texts never end (`trim`), where this rule can do without."""


def _trie(texts: Iterable[bytes]) -> tuple[list[dict[int, int]], list[list[int]]]:
    """The texts' trie (node 0 the root; each node's children by byte) and each text's path of
    nodes, root first."""
    children: list[dict[int, int]] = [{}]
    paths = []
    for text in texts:
        node, path = 0, [0]
        for byte in text:
            nxt = children[node].get(byte)
            if nxt is None:
                nxt = children[node][byte] = len(children)
                children.append({})
            node = nxt
            path.append(node)
        paths.append(path)
    return children, paths


class Literals(Rule):
    """Exactly one of these byte strings, read through their trie: one stack however many
    there are (an enum of thousands costs what one literal does)."""

    __slots__ = ("_children", "_ends")

    def __init__(self, texts: Iterable[bytes]) -> None:
        self._children, paths = _trie(texts)
        self._ends = frozenset(path[-1] for path in paths)

    def moves(self, local: int, byte: int) -> tuple[Move, ...]:
        child = self._children[local].get(byte)
        return NO_MOVES if child is None else ((child, None),)

    def accepts(self, local: int) -> bool:
        return local in self._ends

    def finite(self, finite: set[Rule]) -> bool:
        return bool(self._ends)


class Alternatives(Rule):
    """Any one of its options (an empty list until `set_options`: a `$ref` resolved later)."""

    __slots__ = ("options", "_starts")

    def __init__(self, options: Iterable[Rule] = ()) -> None:
        self.set_options(options)

    def set_options(self, options: Iterable[Rule]) -> None:
        self.options = tuple(options)
        self._starts = tuple((1, option) for option in self.options)

    def moves(self, local: int, byte: int) -> tuple[Move, ...]:
        return self._starts if local == 0 else NO_MOVES

    def accepts(self, local: int) -> bool:
        return local == 1

    def parts(self) -> tuple[Rule, ...]:
        return self.options

    def finite(self, finite: set[Rule]) -> bool:
        return any(option in finite for option in self.options)

    def drop(self, finite: set[Rule]) -> None:
        self.set_options(option for option in self.options if option in finite)


class JsonString(Rule):
    """Any JSON string: quotes, escapes (\\uXXXX too), no raw control characters. Bytes from
    0x80 up are taken as they come (a token may hold part of a character)."""

    __slots__ = ()
    OPEN, CONTENT, ESCAPE, HEX, CLOSED = 0, 1, 2, 3, 7  # HEX..HEX+3: \\u's four digits
    plain_text = CONTENT
    _TO_CONTENT: tuple[Move, ...] = ((CONTENT, None),)
    _TO_ESCAPE: tuple[Move, ...] = ((ESCAPE, None),)
    _TO_CLOSED: tuple[Move, ...] = ((CLOSED, None),)
    _ESCAPED = frozenset(b'"\\/bfnrt')
    _HEX_DIGITS = frozenset(b"0123456789abcdefABCDEF")
    _HEX_NEXT: dict[int, tuple[Move, ...]] = {3: ((4, None),), 4: ((5, None),), 5: ((6, None),),
                                              6: ((CONTENT, None),)}

    def moves(self, local: int, byte: int) -> tuple[Move, ...]:
        if local == self.CONTENT:
            if byte == 0x22:  # "
                return self._TO_CLOSED
            if byte == 0x5C:  # backslash
                return self._TO_ESCAPE
            return self._TO_CONTENT if byte >= 0x20 else NO_MOVES
        if local == self.OPEN:
            return self._TO_CONTENT if byte == 0x22 else NO_MOVES
        if local == self.ESCAPE:
            if byte in self._ESCAPED:
                return self._TO_CONTENT
            return ((self.HEX, None),) if byte == 0x75 else NO_MOVES  # u
        if local in self._HEX_NEXT:
            return self._HEX_NEXT[local] if byte in self._HEX_DIGITS else NO_MOVES
        return NO_MOVES

    def accepts(self, local: int) -> bool:
        return local == self.CLOSED


class BoundedJsonString(JsonString):
    """A JSON string of `min_length` to `max_length` (None: any) characters (JSON Schema's
    minLength / maxLength: code points, as Pydantic counts them): a character is a UTF-8
    sequence, which must be well formed (a model's stray continuation bytes would pass a count
    of first bytes), or an escape; a \\u escape of a surrogate is refused (a pair would count
    one character, a lone half is no text): the model writes the character itself. Without a
    maximum the count stops at the minimum, so long strings share their states and masks.
    Locals: (JsonString's phase, the characters so far, the continuation bytes the character
    being read still has, the range its next one must be in)."""

    __slots__ = ("min_length", "max_length")
    HEX_D = 8  # \\u's first digit was d: the second must keep it below the surrogates
    start = (JsonString.OPEN, 0, 0, None)
    plain_text = None  # plain text counts: its room is the local's (plain_room)
    plain_utf8 = True
    _LOW_HEX = frozenset(b"01234567")
    _CONTINUATION = (0x80, 0xBF)
    # A first byte's continuation count, and where its second byte's range is narrower than
    # 0x80-0xBF (no overlong forms, no surrogates, nothing past U+10FFFF)
    _FIRST_NARROW = {0xE0: (0xA0, 0xBF), 0xED: (0x80, 0x9F), 0xF0: (0x90, 0xBF), 0xF4: (0x80, 0x8F)}

    def __init__(self, min_length: int = 0, max_length: int | None = None) -> None:
        self.min_length, self.max_length = min_length, max_length

    def moves(self, local: tuple[int, int, int, Any], byte: int) -> tuple[Move, ...]:
        phase, count, more, narrow = local
        if phase == self.CONTENT:
            if more:  # a character's later bytes
                low, high = narrow or self._CONTINUATION
                return (((self.CONTENT, count, more - 1, None), None),) if low <= byte <= high else NO_MOVES
            if byte == 0x22:  # "
                return (((self.CLOSED, count, 0, None), None),) if count >= self.min_length else NO_MOVES
            size = utf8_char_size(byte)
            if not size or byte < 0x20 or self.max_length is not None and count >= self.max_length:
                return NO_MOVES
            count = count + 1 if self.max_length is not None or count < self.min_length else count
            if byte == 0x5C:  # backslash
                return (((self.ESCAPE, count, 0, None), None),)
            return (((self.CONTENT, count, size - 1, self._FIRST_NARROW.get(byte)), None),)
        if phase == self.OPEN:
            return (((self.CONTENT, 0, 0, None), None),) if byte == 0x22 else NO_MOVES
        if phase == self.ESCAPE:
            if byte in self._ESCAPED:
                return (((self.CONTENT, count, 0, None), None),)
            return (((self.HEX, count, 0, None), None),) if byte == 0x75 else NO_MOVES  # u
        if phase == self.HEX and byte in b"dD":
            return (((self.HEX_D, count, 0, None), None),)
        if phase == self.HEX_D:
            return (((self.HEX + 2, count, 0, None), None),) if byte in self._LOW_HEX else NO_MOVES
        if phase in self._HEX_NEXT and byte in self._HEX_DIGITS:
            return (((self._HEX_NEXT[phase][0][0], count, 0, None), None),)
        return NO_MOVES

    def accepts(self, local: tuple[int, int, int, Any]) -> bool:
        return local[0] == self.CLOSED

    def plain_room(self, local: tuple[int, int, int, Any]) -> float | None:
        if local[0] != self.CONTENT or local[2]:
            return None
        return math.inf if self.max_length is None else self.max_length - local[1]


def utf8_prefix(text: bytes) -> bool:
    """Well-formed UTF-8 from its first byte, but for a last character it may cut short (as
    BoundedJsonString reads it)."""
    more, narrow = 0, None
    for byte in text:
        if more:
            low, high = narrow or BoundedJsonString._CONTINUATION
            if not low <= byte <= high:
                return False
            more, narrow = more - 1, None
        else:
            size = utf8_char_size(byte)
            if not size:
                return False
            more, narrow = size - 1, BoundedJsonString._FIRST_NARROW.get(byte)
    return True


def utf8_char_size(first: int) -> int:
    """A character's byte count from its first byte (0: no character begins with it)."""
    if first < 0x80:
        return 1
    if 0xC2 <= first <= 0xDF:
        return 2
    if 0xE0 <= first <= 0xEF:
        return 3
    return 4 if 0xF0 <= first <= 0xF4 else 0


class JsonNumber(Rule):
    """A JSON number (`-? (0 | [1-9][0-9]*) (.[0-9]+)? ([eE][+-]?[0-9]+)?`), or an integer only."""

    __slots__ = ("integer",)
    _DIGITS = frozenset(b"0123456789")
    # START, MINUS, ZERO, INT, DOT, FRAC, E, E_SIGN, EXP
    _ACCEPTING = frozenset({2, 3, 5, 8})
    _TO = tuple(((i, None),) for i in range(9))

    def __init__(self, integer: bool = False) -> None:
        self.integer = integer

    def moves(self, local: int, byte: int) -> tuple[Move, ...]:
        to, digit = self._TO, byte in self._DIGITS
        if local == 3 or local == 5 or local == 8:  # in digits: more of them
            if digit:
                return to[local]
            if self.integer:
                return NO_MOVES
            if byte == 0x2E and local == 3:  # .
                return to[4]
            return to[6] if byte in (0x65, 0x45) and local != 8 else NO_MOVES  # e E
        if local == 0 or local == 1:
            if byte == 0x2D and local == 0:  # -
                return to[1]
            return (to[2] if byte == 0x30 else to[3]) if digit else NO_MOVES
        if local == 2:  # a leading 0: no more digits
            if self.integer:
                return NO_MOVES
            return to[4] if byte == 0x2E else to[6] if byte in (0x65, 0x45) else NO_MOVES
        if local == 4:
            return to[5] if digit else NO_MOVES
        if local == 6:
            return to[7] if byte in (0x2B, 0x2D) else to[8] if digit else NO_MOVES
        if local == 7:
            return to[8] if digit else NO_MOVES
        return NO_MOVES

    def accepts(self, local: int) -> bool:
        return local in self._ACCEPTING


class _Bracketed(Rule):
    """An object or an array: locals (phase, index, whitespace bytes in a row), from OPEN
    (before the opening bracket) to DONE."""

    __slots__ = ()
    start = (0, 0, 0)
    OPEN, FIRST = 0, 1
    DONE: int
    BRACKET: int  # the opening byte

    def _framing(self, local: tuple[int, int, int], byte: int) -> tuple[Move, ...] | None:
        """The moves of the opening bracket, of DONE (none) and of whitespace (the phase kept,
        up to MAX_WHITESPACE); None for any other byte and phase."""
        phase, index, run = local
        if phase == self.OPEN:
            return (((self.FIRST, 0, 0), None),) if byte == self.BRACKET else NO_MOVES
        if phase == self.DONE:
            return NO_MOVES
        if byte in WHITESPACE:
            return (((phase, index, run + 1), None),) if run < MAX_WHITESPACE else NO_MOVES
        return None

    def accepts(self, local: tuple[int, int, int]) -> bool:
        return local[0] == self.DONE


class JsonObject(_Bracketed):
    """`{ "key": value, ... }` with the given members, in order, the required ones present;
    `additional` (a rule, or None for none) is the value of members past the listed ones, any
    key. The keys are read through one trie: one stack however many members may come next."""

    __slots__ = ("values", "additional", "_children", "_members_below", "_member_at", "_last", "_can_close",
                 "_free_key")
    OPEN, FIRST, KEY, KEY_TEXT, COLON, VALUE, AFTER, DONE = range(8)
    BRACKET = 0x7B  # {
    _DONE: tuple[Move, ...] = (((DONE, 0, 0), None),)

    def __init__(self, members: list[tuple[str, Rule, bool]], additional: Rule | None) -> None:
        n = len(members)
        self.values = [rule for _, rule, _ in members]
        self.additional = additional
        # Index i: members i.. are still to come (n: only additional ones). The next may be any
        # of i..last[i], up to the first required one; the object may close if none is left.
        self._last, self._can_close = [n - 1] * (n + 1), [True] * (n + 1)
        required = None
        for i in range(n - 1, -1, -1):
            if members[i][2]:
                required = i
            self._last[i] = n - 1 if required is None else required
            self._can_close[i] = required is None
        # The trie of the quoted keys: per node, its children, and the members below it (in order).
        children, paths = _trie(json.dumps(name, ensure_ascii=False).encode() for name, _, _ in members)
        below: list[list[int]] = [[] for _ in children]
        for j, path in enumerate(paths):  # in member order: each node's list is sorted
            for node in path:
                below[node].append(j)
        self._member_at = {path[-1]: j for j, path in enumerate(paths)}  # the node that ends a key → its member
        self._children = children
        self._members_below = below
        self._free_key = _OtherKey(children, self._member_at) if members else JsonString()

    def _viable(self, node: int, i: int) -> bool:
        """A key below `node` may come next when members i.. are still to come."""
        members = self._members_below[node]
        k = bisect.bisect_left(members, i)
        return k < len(members) and members[k] <= self._last[i]

    def _key_starts(self, i: int) -> tuple[Move, ...]:
        """A key's opening quote, members i.. still to come: a listed key, or any (additional)."""
        moves: list[Move] = []
        quote = self._children[0].get(0x22)
        if quote is not None and i < len(self.values) and self._viable(quote, i):
            moves.append(((self.KEY_TEXT, i, quote), None))
        if self.additional is not None and self._can_close[i]:
            moves.append(((self.COLON, len(self.values), 0), self._free_key))
        return tuple(moves)

    def moves(self, local: tuple[int, int, int], byte: int) -> tuple[Move, ...]:
        phase, i, node = local
        if phase == self.KEY_TEXT:
            child = self._children[node].get(byte)
            if child is None or not self._viable(child, i):
                return NO_MOVES
            j = self._member_at.get(child)  # a key's closing quote: no key goes on past it
            return (((self.COLON, j, 0), None),) if j is not None else (((self.KEY_TEXT, i, child), None),)
        framing = self._framing(local, byte)
        if framing is not None:
            return framing
        if phase == self.VALUE:
            return (((self.AFTER, i, 0), self.values[i] if i < len(self.values) else self.additional),)
        if phase == self.FIRST or phase == self.KEY:
            if byte == 0x22:  # "
                return self._key_starts(i)
            return self._DONE if byte == 0x7D and phase == self.FIRST and self._can_close[i] else NO_MOVES
        if phase == self.COLON:
            return (((self.VALUE, i, 0), None),) if byte == 0x3A else NO_MOVES  # :
        # AFTER a value
        after = min(i + 1, len(self.values))
        if byte == 0x2C:  # ,
            return (((self.KEY, after, 0), None),) if self._key_starts(after) else NO_MOVES
        return self._DONE if byte == 0x7D and self._can_close[after] else NO_MOVES

    def parts(self) -> tuple[Rule, ...]:
        return (*self.values, self.additional) if self.additional is not None else tuple(self.values)

    def finite(self, finite: set[Rule]) -> bool:
        required = {self._last[i] for i in range(len(self.values)) if not self._can_close[i]}
        return all(self.values[j] in finite for j in required)

    def drop(self, finite: set[Rule]) -> None:
        gone = {j for j, value in enumerate(self.values) if value not in finite}  # optional ones (finite)
        if gone:
            self._members_below = [[j for j in below if j not in gone] for below in self._members_below]
        if self.additional is not None and self.additional not in finite:
            self.additional = None


class _OtherKey(Rule):
    """An additional member's key: a JSON string that is none of the object's listed keys (a
    listed member's value keeps its own schema), written without escapes. Locals: OPEN, then
    the node of the listed keys' trie the text is still on, DIVERGED once it left them all."""

    __slots__ = ("_children", "_member_at")
    OPEN, DIVERGED, CLOSED = -1, -2, -3
    start = OPEN
    plain_text = DIVERGED
    _STAY: tuple[Move, ...] = ((DIVERGED, None),)
    _CLOSE: tuple[Move, ...] = ((CLOSED, None),)

    def __init__(self, children: list[dict[int, int]], member_at: dict[int, int]) -> None:
        self._children, self._member_at = children, member_at

    def moves(self, local: int, byte: int) -> tuple[Move, ...]:
        if local == self.OPEN:
            if byte != 0x22:
                return NO_MOVES
            node = self._children[0].get(0x22)
            return ((self.DIVERGED if node is None else node, None),)
        if local == self.CLOSED or byte == 0x5C or byte < 0x20:
            return NO_MOVES
        if byte == 0x22:  # the closing quote: refused where it would end a listed key
            return NO_MOVES if local >= 0 and self._children[local].get(0x22) in self._member_at else self._CLOSE
        if local == self.DIVERGED:
            return self._STAY
        node = self._children[local].get(byte)
        return self._STAY if node is None else ((node, None),)

    def accepts(self, local: int) -> bool:
        return local == self.CLOSED


class JsonArray(_Bracketed):
    """`[ item, ... ]` with min_items..max_items items (max_items None: no limit)."""

    __slots__ = ("items", "min_items", "max_items", "_cap")
    OPEN, FIRST, NEXT, AFTER, DONE = range(5)
    BRACKET = 0x5B  # [
    _DONE: tuple[Move, ...] = (((DONE, 0, 0), None),)

    def __init__(self, items: Rule, min_items: int = 0, max_items: int | None = None) -> None:
        self.items, self.min_items, self.max_items = items, min_items, max_items
        self._cap = max_items if max_items is not None else min_items  # counts past it need not differ

    def moves(self, local: tuple[int, int, int], byte: int) -> tuple[Move, ...]:
        phase, count, _ = local
        framing = self._framing(local, byte)
        if framing is not None:
            return framing
        if phase == self.AFTER:
            if byte == 0x2C:  # ,
                return (((self.NEXT, count, 0), None),) if self.max_items is None or count < self.max_items \
                    else NO_MOVES
            return self._DONE if byte == 0x5D and count >= self.min_items else NO_MOVES  # ]
        if phase == self.FIRST and byte == 0x5D:
            return self._DONE if self.min_items == 0 else NO_MOVES
        if phase == self.FIRST and self.max_items == 0:
            return NO_MOVES
        return (((self.AFTER, min(count + 1, max(self._cap, 1)), 0), self.items),)

    def parts(self) -> tuple[Rule, ...]:
        return (self.items,)

    def finite(self, finite: set[Rule]) -> bool:
        return self.min_items == 0 or self.items in finite

    def drop(self, finite: set[Rule]) -> None:
        if self.items not in finite:
            self.max_items = 0


class JsonDocument(Rule):
    """A value, after at most MAX_WHITESPACE whitespace bytes, and nothing after it."""

    __slots__ = ("value",)
    start = 0  # leading whitespace bytes so far; END once the value has begun
    END = -1

    def __init__(self, value: Rule) -> None:
        self.value = value

    def moves(self, local: int, byte: int) -> tuple[Move, ...]:
        if local == self.END:
            return NO_MOVES
        if byte in WHITESPACE:
            return ((local + 1, None),) if local < MAX_WHITESPACE else NO_MOVES
        return ((self.END, self.value),)

    def accepts(self, local: int) -> bool:
        return local == self.END

    def parts(self) -> tuple[Rule, ...]:
        return (self.value,)

    def finite(self, finite: set[Rule]) -> bool:
        return self.value in finite


def json_value() -> Rule:
    """Any JSON value, objects and arrays of any JSON values included."""
    value = Alternatives()
    value.set_options([
        JsonObject([], additional=value), JsonArray(value), JsonString(), JsonNumber(),
        Literals([b"true", b"false", b"null"]),
    ])
    return value


def json_literals(values: Iterable[Any]) -> Literals:
    """One of these JSON values, each written compactly (a schema's const or enum; a whole
    float as the integer it equals: JSON Schema's 1.0 is 1)."""
    def text(value: Any) -> bytes:
        if isinstance(value, float) and value.is_integer():
            value = int(value)
        return json.dumps(value, ensure_ascii=False, separators=(",", ":"), allow_nan=False).encode()

    return Literals([text(v) for v in values])


def trim(root: Rule) -> bool:
    """Leave out the ways whose texts never end (an optional member, a union's option or an
    array's items that must nest forever: `{"$ref": "#"}` required in itself), so no answer can
    walk into one and write until max_tokens; False if the root's own texts never end."""
    rules, todo = {root}, [root]
    while todo:
        for part in todo.pop().parts():
            if part not in rules:
                rules.add(part)
                todo.append(part)
    users: dict[Rule, list[Rule]] = {rule: [] for rule in rules}
    for rule in rules:
        for part in rule.parts():
            users[part].append(rule)
    # Least fixed point: finite once its needed parts are; a rule is looked at again only when
    # one of its parts turned out finite (linear in the grammar, not quadratic).
    finite: set[Rule] = set()
    todo = list(rules)
    while todo:
        rule = todo.pop()
        if rule not in finite and rule.finite(finite):
            finite.add(rule)
            todo.extend(users[rule])
    for rule in rules & finite:
        rule.drop(finite)
    return root in finite


# ------------------------------------------------------------------ the automaton
def _expand(state: State, byte: int) -> set[Stack] | None:
    """The stacks `state` becomes by reading `byte`: each stack's rule reads it, or hands it to
    a child it starts, or ends and hands it to the rule below. A stack met twice (alternatives
    that share a $ref) is expanded once. None: past MAX_STACKS, or MAX_EXPANSION stacks looked
    at (nested unions can multiply the ways to read a byte without bound)."""
    out: set[Stack] = set()
    seen: set[Stack] = set()
    todo = list(state)
    while todo:
        stack = todo.pop()
        if stack in seen:
            continue
        seen.add(stack)
        if len(seen) > MAX_EXPANSION:
            return None
        rule, local, below, depth = stack
        for next_local, child in rule.moves(local, byte):
            if child is None:
                out.add((rule, next_local, below, depth))
            elif next_local is TAIL:
                todo.append((child, child.start, below, depth))
            elif depth < MAX_DEPTH:
                todo.append((child, child.start, (rule, next_local, below, depth), depth + 1))
        if below is not None and rule.accepts(local):  # this rule may end: the byte is the one below's
            todo.append(below)
    return out if len(out) <= MAX_STACKS else None


def _finished(stack: Stack | None) -> bool:
    while stack is not None:
        rule, local, stack, _ = stack
        if not rule.accepts(local):
            return False
    return True


class Grammar:
    """A root rule and its automaton: `start`, `advance` over bytes, `complete`. Equal states
    are one object (interned) and each (state, byte) step is computed once: a token mask walks
    thousands of tokens that begin alike."""

    __slots__ = ("root", "start", "_interned", "_steps", "_complete")
    MAX_CACHED_STEPS = 1 << 16

    def __init__(self, root: Rule) -> None:
        self.root = root
        self._interned: dict[State, State] = {}
        self._steps: dict[tuple[State, int], State | None] = {}
        self._complete: dict[State, bool] = {}
        self.start = self._intern(frozenset({(root, root.start, None, 0)}))

    def _intern(self, state: State) -> State:
        return self._interned.setdefault(state, state)

    def step(self, state: State, byte: int) -> State | None:
        """The state after one byte; None if the grammar does not allow it."""
        key = (state, byte)
        try:
            return self._steps[key]
        except KeyError:
            pass
        out = _expand(state, byte)
        result = self._intern(frozenset(out)) if out else None
        if len(self._steps) >= self.MAX_CACHED_STEPS:  # a long-lived grammar: start over
            self._steps.clear()
            self._interned.clear()
            self._complete.clear()
        self._steps[key] = result
        return result

    def advance(self, state: State, data: bytes) -> State | None:
        for byte in data:
            state = self.step(state, byte)
            if state is None:
                return None
        return state

    def complete(self, state: State) -> bool:
        """The text so far is a whole answer."""
        done = self._complete.get(state)
        if done is None:
            done = self._complete[state] = any(_finished(stack) for stack in state)
        return done

    def plain_text_rooms(self, state: State) -> set[tuple[float, bool]] | None:
        """Every stack is inside string text (`Rule.plain_room`): a token of plain string text is
        taken where, for some stack, it holds at most its room in characters (and is well-formed
        UTF-8 where that stack's `plain_utf8` says so); None: some stack is not."""
        rooms = set()
        for rule, local, _, _ in state:
            room = rule.plain_room(local)
            if room is None:
                return None
            rooms.add((room, rule.plain_utf8))
        return rooms

    def accepts(self, text: bytes | str) -> bool:
        """The whole text is an answer this grammar allows (tests, and checks of examples)."""
        state = self.advance(self.start, text.encode() if isinstance(text, str) else text)
        return state is not None and self.complete(state)
