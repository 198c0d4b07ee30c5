"""A regular expression as a grammar rule (vLLM's `structured_outputs.regex`): the answer is
text the pattern matches whole.

The pattern is parsed by Python's own `re` parser (Python's syntax; `re.compile` accepts it)
and built into a Thompson NFA over characters; the rule reads bytes, gathering a character's
UTF-8 bytes before it steps. A token may end inside a character only where some character
that begins so can be taken. Every character class is a set of code point ranges (maybe
negated), so that test is interval arithmetic. `\\d`, `\\w` and `\\s` are ASCII's (`[0-9]`,
`[A-Za-z0-9_]`, `[ \\t\\n\\r\\f\\v]`), as in vLLM's regex engines and JSON Schema's
patterns, not Python's Unicode classes (asked for `\\d{3}`, a model wrote digits of another
script). Backreferences and lookarounds are not regular: a ValueError, as are flags other
than DOTALL (and the default UNICODE; `(?s:...)` holds inside its group). `^` and `$` at the
pattern's start and end are read past (the whole answer matches anyway), anywhere else a
ValueError; lazy, possessive and atomic forms match as their greedy ones (the same set of texts).
"""

from __future__ import annotations

import bisect
import re
import re._constants as sre  # noqa: PLC2701 (Python's own regex parser: its syntax, exactly)
import re._parser as sre_parse
from typing import Any

from engine.grammar import NO_MOVES, TAIL, Move, Rule, utf8_char_size

MAX_NFA_STATES = 20_000  # bounded repeats are unrolled: (a{1000}){1000} would be a million
_SUPPORTED_FLAGS = re.UNICODE | re.DOTALL
_LAST = 0x10FFFF
_SURROGATES = (0xD800, 0xDFFF)

Range = tuple[int, int]  # code points, both ends included


def _complement(ranges: tuple[Range, ...]) -> tuple[Range, ...]:
    out, at = [], 0
    for low, high in ranges:
        if low > at:
            out.append((at, low - 1))
        at = max(at, high + 1)
    if at <= _LAST:
        out.append((at, _LAST))
    return tuple(out)


_DIGIT = ((48, 57),)
_SPACE = ((9, 13), (32, 32))
_WORD = ((48, 57), (65, 90), (95, 95), (97, 122))
_CATEGORIES: dict[Any, tuple[Range, ...]] = {
    sre.CATEGORY_DIGIT: _DIGIT, sre.CATEGORY_NOT_DIGIT: _complement(_DIGIT),
    sre.CATEGORY_SPACE: _SPACE, sre.CATEGORY_NOT_SPACE: _complement(_SPACE),
    sre.CATEGORY_WORD: _WORD, sre.CATEGORY_NOT_WORD: _complement(_WORD),
}


class CharClass:
    """Characters in any of `ranges` (merged, sorted), or outside all of them if `negate`."""

    __slots__ = ("lows", "highs", "negate")

    def __init__(self, ranges: list[Range], negate: bool = False) -> None:
        merged: list[list[int]] = []
        for low, high in sorted(ranges):
            if merged and low <= merged[-1][1] + 1:
                merged[-1][1] = max(merged[-1][1], high)
            else:
                merged.append([low, high])
        self.lows, self.highs = [r[0] for r in merged], [r[1] for r in merged]
        self.negate = negate

    def __call__(self, ch: str) -> bool:
        c = ord(ch)
        i = bisect.bisect_right(self.lows, c) - 1
        return (i >= 0 and c <= self.highs[i]) != self.negate

    def any_in(self, low: int, high: int) -> bool:
        """Some character in [low, high] (surrogates aside: no UTF-8 spells them) is in the class."""
        parts = [(low, high)]
        if low <= _SURROGATES[1] and _SURROGATES[0] <= high:
            parts = [(a, b) for a, b in ((low, _SURROGATES[0] - 1), (_SURROGATES[1] + 1, high)) if a <= b]
        if self.negate:
            return any(not self._covers_all(a, b) for a, b in parts)
        return any(self._covers_some(a, b) for a, b in parts)

    def _covers_some(self, low: int, high: int) -> bool:
        i = bisect.bisect_right(self.lows, high) - 1  # the last range starting at or before high
        return i >= 0 and self.highs[i] >= low

    def _covers_all(self, low: int, high: int) -> bool:
        i = bisect.bisect_right(self.lows, low) - 1
        return i >= 0 and self.highs[i] >= high  # merged: one range must hold it all


class Nfa:
    """States are ints; `edges[s]`: (character class, target); `empty[s]`: targets reached
    without a character; `refs[s]`: (rule, target), the target reached once a child rule's
    text was read (an EBNF grammar's rule references: engine/ebnf.py)."""

    def __init__(self, what: str, limit: int = MAX_NFA_STATES) -> None:
        self.what = what  # "regex" or "grammar", for the error past the limit
        self.limit = limit
        self.edges: list[list[tuple[CharClass, int]]] = []
        self.empty: list[list[int]] = []
        self.refs: list[list[tuple[Rule, int]]] = []

    def state(self) -> int:
        if len(self.edges) >= self.limit:
            raise ValueError(f"the {self.what} is too large (more than {self.limit} states once its repeats are "
                             "unrolled)")
        self.edges.append([])
        self.empty.append([])
        self.refs.append([])
        return len(self.edges) - 1


class _PatternNfa(Nfa):
    """An NFA built from Python's parse of a pattern."""

    def __init__(self, dotall: bool) -> None:
        super().__init__("regex")
        self.dotall = dotall

    def build(self, items: Any, start: int) -> int:
        """Add the sequence `items` (a parsed pattern) from `start`; its end state."""
        at = start
        for op, arg in items:
            at = self._item(op, arg, at)
        return at

    def _item(self, op: Any, arg: Any, start: int) -> int:
        if op in (sre.LITERAL, sre.NOT_LITERAL, sre.ANY, sre.IN):
            end = self.state()
            self.edges[start].append((self._char(op, arg), end))
            return end
        if op is sre.AT:  # those at the pattern's ends were taken out (_without_end_anchors)
            raise ValueError("regex anchors are supported only at the pattern's start (^) and end ($): the whole "
                             "text matches")
        if op is sre.SUBPATTERN:
            _, add_flags, del_flags, items = arg
            if (add_flags | del_flags) & ~_SUPPORTED_FLAGS:
                raise ValueError("regex flags other than (?s) are not supported")
            outer = self.dotall  # (?s:...) and (?-s:...) hold inside their group only
            self.dotall = bool(add_flags & re.DOTALL) or outer and not del_flags & re.DOTALL
            try:
                return self.build(items, start)
            finally:
                self.dotall = outer
        if op is sre.ATOMIC_GROUP:
            return self.build(arg, start)
        if op is sre.BRANCH:
            end = self.state()
            for items in arg[1]:
                branch = self.state()
                self.empty[start].append(branch)
                self.empty[self.build(items, branch)].append(end)
            return end
        if op in (sre.MAX_REPEAT, sre.MIN_REPEAT, sre.POSSESSIVE_REPEAT):
            low, high, items = arg
            at = start
            for _ in range(low):
                at = self.build(items, at)
            if high is sre.MAXREPEAT:  # a loop: items, any number of times more
                loop = self.state()
                self.empty[at].append(loop)
                self.empty[self.build(items, loop)].append(loop)
                return loop
            end = self.state()
            for _ in range(high - low):
                self.empty[at].append(end)
                at = self.build(items, at)
            self.empty[at].append(end)
            return end
        raise ValueError(f"regex feature {str(op).lower()} is not supported (structured outputs take regular "
                         "expressions: no backreferences or lookarounds)")

    def _char(self, op: Any, arg: Any) -> CharClass:
        if op is sre.LITERAL:
            return CharClass([(arg, arg)])
        if op is sre.NOT_LITERAL:
            return CharClass([(arg, arg)], negate=True)
        if op is sre.ANY:
            return CharClass([] if self.dotall else [(10, 10)], negate=True)
        negate, ranges = False, []
        for kind, value in arg:
            if kind is sre.NEGATE:
                negate = True
            elif kind is sre.LITERAL:
                ranges.append((value, value))
            elif kind is sre.RANGE:
                ranges.append(value)
            elif kind is sre.CATEGORY and value in _CATEGORIES:
                ranges.extend(_CATEGORIES[value])
            else:
                raise ValueError(f"regex set member {kind} {value} is not supported")
        return CharClass(ranges, negate)


class NfaRule(Rule):
    """Text an NFA over characters (and child rules) takes from its first state to its final
    one, read byte by byte. Locals: (NFA states, the bytes of a character not complete yet). A
    child rule starts only between characters; `skippable` are the children that may read no
    text, whose references the closure also steps over."""

    __slots__ = ("nfa", "final", "start", "skippable")

    def __init__(self, nfa: Nfa, first: int, final: int, skippable: frozenset[Rule] = frozenset()) -> None:
        self.nfa, self.final, self.skippable = nfa, final, skippable
        self.start = (self.closure({first}), b"")

    def closure(self, states: set[int]) -> frozenset[int]:
        todo, seen = list(states), set(states)
        while todo:
            state = todo.pop()
            for nxt in [*self.nfa.empty[state], *(t for rule, t in self.nfa.refs[state] if rule in self.skippable)]:
                if nxt not in seen:
                    seen.add(nxt)
                    todo.append(nxt)
        return frozenset(seen)

    def _step(self, states: frozenset[int], ch: str) -> frozenset[int]:
        """The NFA states after `ch` (the grammar caches each step: no cache of its own here)."""
        return self.closure({target for s in states for chars, target in self.nfa.edges[s] if chars(ch)})

    def _may_begin(self, states: frozenset[int], low: int, high: int) -> bool:
        """Some transition may take a character in [low, high] (a partial character's span)."""
        return any(chars.any_in(low, high) for s in states for chars, _ in self.nfa.edges[s])

    def moves(self, local: tuple[frozenset[int], bytes], byte: int) -> tuple[Move, ...]:
        states, pending = local
        children = () if pending else self._children(states)
        if not pending and byte < 0x80:
            nxt = self._step(states, chr(byte))
            return ((((nxt, b""), None),) if nxt else NO_MOVES) + children
        data = pending + bytes([byte])
        size = utf8_char_size(data[0])  # data[0] >= 0x80 here: 0 unless it begins a character
        if size == 0 or (len(data) > 1 and not 0x80 <= byte <= 0xBF):
            return children
        if len(data) < size:
            span = utf8_span(data, size)
            return ((((states, data), None),) if span and self._may_begin(states, *span) else NO_MOVES) + children
        try:
            ch = data.decode()
        except UnicodeDecodeError:
            return NO_MOVES
        nxt = self._step(states, ch)
        return (((nxt, b""), None),) if nxt else NO_MOVES

    def _children(self, states: frozenset[int]) -> tuple[Move, ...]:
        """A child for each rule some state references, to resume in every state that follows
        one of its references: one stack, however many places (or copies of a repeat) read it."""
        resume: dict[Rule, set[int]] = {}
        for state in states:
            for rule, target in self.nfa.refs[state]:
                resume.setdefault(rule, set()).add(target)
        return tuple((self._resume(targets), rule) for rule, targets in resume.items())

    def _resume(self, targets: set[int]) -> Any:
        """The local to resume in after a child: TAIL where nothing but the end follows."""
        states = self.closure(targets)
        if self.final in states and not any(self.nfa.edges[s] or self.nfa.refs[s] for s in states):
            return TAIL
        return states, b""

    def accepts(self, local: tuple[frozenset[int], bytes]) -> bool:
        states, pending = local
        return not pending and self.final in states


class RegexRule(NfaRule):
    """The pattern's full matches."""

    __slots__ = ()

    def __init__(self, pattern: str) -> None:
        super().__init__(*_pattern_nfa(pattern))


class JsonStringPattern(NfaRule):
    """A JSON string whose text the pattern matches whole (JSON Schema's `pattern`, anchored as
    xgrammar and outlines read it: every text it allows also matches the unanchored pattern).
    The pattern's NFA reads the characters as a JSON string holds them, between quotes: a
    quote, backslash or control character by its escape (the short one, or \\u00XX)."""

    __slots__ = ()

    def __init__(self, pattern: str) -> None:
        nfa, first, final = _pattern_nfa(pattern)
        _escape_for_json(nfa)
        opened, closed = nfa.state(), nfa.state()
        nfa.edges[opened].append((_QUOTE, first))
        nfa.edges[final].append((_QUOTE, closed))
        super().__init__(nfa, opened, closed)


_QUOTE = CharClass([(0x22, 0x22)])
_BACKSLASH = CharClass([(0x5C, 0x5C)])
# The characters a JSON string writes escaped, and the short escapes it has
_JSON_SPECIAL = (*range(0x20), 0x22, 0x5C)
_SHORT_ESCAPES = {0x22: '"', 0x5C: "\\", 0x08: "b", 0x0C: "f", 0x0A: "n", 0x0D: "r", 0x09: "t"}


class _JsonPlain:
    """A class's characters a JSON string holds as they are: not a quote, a backslash or a
    control character."""

    __slots__ = ("chars",)

    def __init__(self, chars: CharClass) -> None:
        self.chars = chars

    def __call__(self, ch: str) -> bool:
        return ch >= " " and ch not in '"\\' and self.chars(ch)

    def any_in(self, low: int, high: int) -> bool:
        return self.chars.any_in(low, high)  # asked of multi-byte characters only, none escaped


def _escape_for_json(nfa: Nfa) -> None:
    """Rewrite every character edge of `nfa` to read its characters as a JSON string writes
    them: plain ones as they are, the others by their escapes."""
    for state in range(len(nfa.edges)):  # the escapes' own states, added below, are left as they are
        edges: list[tuple[Any, int]] = []
        for chars, target in nfa.edges[state]:
            edges.append((_JsonPlain(chars), target))
            special = [c for c in _JSON_SPECIAL if chars(chr(c))]
            if not special:
                continue
            escape = nfa.state()
            edges.append((_BACKSLASH, escape))
            short = [ord(_SHORT_ESCAPES[c]) for c in special if c in _SHORT_ESCAPES]
            if short:
                nfa.edges[escape].append((CharClass([(c, c) for c in short]), target))
            controls = [c for c in special if c < 0x20]
            if controls:
                at = escape
                for digit in b"u00":
                    nxt = nfa.state()
                    nfa.edges[at].append((CharClass([(digit, digit)]), nxt))
                    at = nxt
                for high in (0, 1):
                    lows = [c & 0xF for c in controls if c >> 4 == high]
                    if lows:
                        last = nfa.state()
                        nfa.edges[at].append((CharClass([(0x30 + high, 0x30 + high)]), last))
                        hex_digits = [ord(f"{low:x}") for low in lows] + [ord(f"{low:X}") for low in lows]
                        nfa.edges[last].append((CharClass([(c, c) for c in hex_digits]), target))
        nfa.edges[state] = edges


def _pattern_nfa(pattern: str) -> tuple[_PatternNfa, int, int]:
    """The pattern's NFA, its first state and its final one."""
    try:
        parsed = sre_parse.parse(pattern)
    except re.error as exc:
        raise ValueError(f"the regex does not parse: {exc}") from None
    flags = parsed.state.flags
    if flags & ~_SUPPORTED_FLAGS:
        raise ValueError("regex flags other than (?s) are not supported")
    nfa = _PatternNfa(dotall=bool(flags & re.DOTALL))
    first = nfa.state()
    return nfa, first, nfa.build(_without_end_anchors(list(parsed), True, True), first)


_STARTS = (sre.AT_BEGINNING, sre.AT_BEGINNING_STRING)
_ENDS = (sre.AT_END, sre.AT_END_STRING)


def _without_end_anchors(items: list[Any], at_start: bool, at_end: bool) -> list[Any]:
    """The parsed items with the anchors that sit at the pattern's start or end left out (the
    whole text matches anyway), within the groups and branches that begin or end it too."""
    while at_start and items and items[0][0] is sre.AT and items[0][1] in _STARTS:
        items = items[1:]
    while at_end and items and items[-1][0] is sre.AT and items[-1][1] in _ENDS:
        items = items[:-1]
    out = []
    for i, (op, arg) in enumerate(items):
        first, last = at_start and i == 0, at_end and i == len(items) - 1
        if op is sre.SUBPATTERN and (first or last):
            group, add_flags, del_flags, inner = arg
            arg = (group, add_flags, del_flags, _without_end_anchors(list(inner), first, last))
        elif op is sre.BRANCH and (first or last):
            arg = (arg[0], [_without_end_anchors(list(branch), first, last) for branch in arg[1]])
        out.append((op, arg))
    return out


_SIZE_SPANS = {2: (0x80, 0x7FF), 3: (0x800, 0xFFFF), 4: (0x10000, 0x10FFFF)}


def utf8_span(prefix: bytes, size: int) -> tuple[int, int] | None:
    """The code points whose UTF-8 begins with `prefix` (None: none does: an overlong or
    out-of-range beginning, or only surrogates)."""
    bits = prefix[0] & (0x7F >> size)
    for byte in prefix[1:]:
        bits = bits << 6 | byte & 0x3F
    free = 6 * (size - len(prefix))
    low, high = bits << free, (bits << free) | ((1 << free) - 1)
    least, most = _SIZE_SPANS[size]
    low, high = max(low, least), min(high, most)
    if low > high or _SURROGATES[0] <= low and high <= _SURROGATES[1]:
        return None
    return low, high
