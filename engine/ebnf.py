"""An EBNF grammar as a grammar rule (vLLM's `structured_outputs.grammar`, `guided_grammar`):
the answer is text the grammar's `root` rule derives.

The dialect is GBNF, llama.cpp's and xgrammar's (what vLLM takes):

    root   ::= "SELECT " column (", " column)* " FROM " table
    column ::= [a-z_]+ | "*"          # a comment
    table  ::= "users" | "orders"

A rule is `name ::= alternatives`; an item is a string ("..." or '...', escapes `\\n \\r \\t
\\\\ \\" \\xHH \\uHHHH \\UHHHHHHHH`), a character class (`[a-z]`, `[^"\\\\]`), `.` (any
character), another rule's name, or a parenthesised group; `*`, `+`, `?`, `{m}`, `{m,}`,
`{,n}` and `{m,n}` repeat an item. Whitespace and newlines between items are free: a rule ends
where the next `name ::=` begins.

Each rule is an NFA over characters and references to other rules (engine/regex.py's
`NfaRule`), built so that a text is read one way where the grammar allows only one; small rules
that reference none are copied into their references. The grammar's pushdown automaton
(engine/grammar.py) runs a remaining reference as a child, so rules may nest and recurse; a
child with nothing after it runs in its parent's place (right recursion nests no deeper).
Left recursion (`expr ::= expr "+" term`) would descend forever before reading a byte: it is
refused, as llama.cpp refuses it (write `expr ::= term ("+" term)*`). Rules whose texts never
end are left out where the grammar can do without them (`trim`), and a grammar whose root
never ends is refused. Compiling is linear in the grammar's size.
"""

from __future__ import annotations

import re
from collections.abc import Callable, Set as AbstractSet

from engine.grammar import Grammar, trim
from engine.regex import CharClass, Nfa, NfaRule

ROOT = "root"
MAX_GROUP_DEPTH = 64  # parenthesised groups open at once (the parser recurses into each)
MAX_STATES = 200_000  # NFA states of a grammar (its repeats unrolled, small rules copied in)
INLINE_STATES = 64  # a rule copied into its references has at most this many states
INLINE_BUDGET = 50_000  # and copies add at most this many states to the grammar's NFA
_NAME = re.compile(r"[A-Za-z0-9_][A-Za-z0-9_.-]*")
_SPACE = re.compile(r"(?:\s|#[^\n]*)*")
_ESCAPES = {"n": "\n", "r": "\r", "t": "\t", "\\": "\\", '"': '"', "'": "'", "[": "[", "]": "]", "-": "-",
            "^": "^", "/": "/", "0": "\0", "f": "\f", "v": "\v", "b": "\b", "a": "\a", "e": "\x1b"}
_HEX_ESCAPES = {"x": 2, "u": 4, "U": 8}
_ANY = CharClass([], negate=True)


class EbnfRule(NfaRule):
    """One named rule of the grammar (its NFA filled in by the parser)."""

    __slots__ = ("name", "states", "first")

    def __init__(self, name: str, nfa: Nfa) -> None:
        self.name = name
        self.nfa = nfa
        self.states: list[int] = []  # its states in the grammar's one NFA
        self.first = self.final = -1
        self.skippable: frozenset = frozenset()
        self.start = (frozenset(), b"")

    def finish(self, skippable: AbstractSet[EbnfRule]) -> None:
        """Its start, the children in `skippable` (those that may read no text) stepped over."""
        self.skippable = skippable
        self.start = (self.closure({self.first}), b"")

    def __repr__(self) -> str:
        return f"EbnfRule({self.name!r})"

    def children(self) -> dict[EbnfRule, None]:
        """The rules it references (in order, once each)."""
        return {rule: None for state in self.states for rule, _ in self.nfa.refs[state]}

    # trim: a rule's text ends if a path from its start to its final state takes only
    # characters and rules whose texts end.
    def parts(self) -> tuple[EbnfRule, ...]:
        return tuple(self.children())

    def finite(self, finite: set) -> bool:
        return self.final in self._reachable(lambda rule: rule in finite)

    def drop(self, finite: set) -> None:
        """Leave out references to rules that never end, then every way into a state that can no
        longer reach the end (a character there would lead the answer into a dead end)."""
        nfa = self.nfa
        for state in self.states:
            nfa.refs[state] = [(rule, target) for rule, target in nfa.refs[state] if rule in finite]
        into: dict[int, list[int]] = {}
        for state in self.states:
            for target in _targets(nfa, state):
                into.setdefault(target, []).append(state)
        alive, todo = {self.final}, [self.final]
        while todo:
            for source in into.get(todo.pop(), ()):
                if source not in alive:
                    alive.add(source)
                    todo.append(source)
        for state in self.states:
            nfa.empty[state] = [t for t in nfa.empty[state] if t in alive]
            nfa.edges[state] = [(chars, t) for chars, t in nfa.edges[state] if t in alive]
            nfa.refs[state] = [(rule, t) for rule, t in nfa.refs[state] if t in alive]

    def _reachable(self, passable: Callable[[EbnfRule], bool]) -> set[int]:
        todo, seen = [self.first], {self.first}
        while todo:
            for nxt in _targets(self.nfa, todo.pop(), passable):
                if nxt not in seen:
                    seen.add(nxt)
                    todo.append(nxt)
        return seen


def _targets(nfa: Nfa, state: int, passable: Callable[[EbnfRule], bool] = lambda rule: True) -> list[int]:
    """The states one step from `state`: without a character, by one, or past a child rule
    (those `passable` lets by)."""
    return [*nfa.empty[state], *(t for _, t in nfa.edges[state]),
            *(t for rule, t in nfa.refs[state] if passable(rule))]


def ebnf_grammar(text: str) -> Grammar:
    """The grammar of `text`'s `root` rule; a ValueError that names what is wrong."""
    if not isinstance(text, str):
        raise ValueError(f"the grammar must be a string, got {text!r:.40}")
    rules = _Parser(text.removeprefix("\ufeff")).parse()
    if ROOT not in rules:
        raise ValueError(f"the grammar has no {ROOT!r} rule (its answer is what `{ROOT} ::= ...` derives)")
    _inline(rules)
    _settle(rules)
    root = rules[ROOT]
    if not trim(root):
        raise ValueError(f"the grammar's {ROOT!r} rule derives no text that ends (every way through it recurses "
                         "forever)")
    return Grammar(root)


def _inline(rules: dict[str, EbnfRule]) -> None:
    """Copy each small rule that references no other into the places that reference it, leaves
    first (so a rule whose references were all copied is a leaf in turn): its characters then
    join the referencing rule's NFA, where alternatives that begin alike share one stack (520
    keyword rules in one alternation would otherwise be 520 stacks, past MAX_STACKS). Rules on
    or above a cycle stay references, run as children; so do big ones, and all once copies
    added INLINE_BUDGET states."""
    nfa = next(iter(rules.values())).nfa
    # sites[child][user]: the user's states that reference the child.
    sites: dict[EbnfRule, dict[EbnfRule, list[int]]] = {rule: {} for rule in rules.values()}
    waiting: dict[EbnfRule, int] = {}
    for rule in rules.values():
        for state in rule.states:
            for child, _ in nfa.refs[state]:
                places = sites[child].setdefault(rule, [])
                if not places or places[-1] != state:
                    places.append(state)
        waiting[rule] = len(rule.children())
    leaves = [rule for rule, count in waiting.items() if count == 0]
    budget = min(INLINE_BUDGET, MAX_STATES - len(nfa.edges))
    while leaves:
        leaf = leaves.pop()
        for user, states in sites[leaf].items():
            if len(leaf.states) <= INLINE_STATES:
                budget = _copy_into(user, leaf, states, nfa, budget)
            waiting[user] -= 1
            if waiting[user] == 0:
                leaves.append(user)


def _copy_into(user: EbnfRule, leaf: EbnfRule, states: list[int], nfa: Nfa, budget: int) -> int:
    """Replace the references to `leaf` in these `states` of `user` by copies of leaf's states
    while `budget` (states) lasts; what is left of it."""
    for state in states:
        kept = []
        for rule, target in nfa.refs[state]:
            if rule is not leaf or len(leaf.states) > budget:
                kept.append((rule, target))
                continue
            budget -= len(leaf.states)
            copy = {old: nfa.state() for old in leaf.states}
            user.states.extend(copy.values())
            for old, new in copy.items():
                nfa.empty[new] = [copy[t] for t in nfa.empty[old]]
                nfa.edges[new] = [(chars, copy[t]) for chars, t in nfa.edges[old]]
                nfa.refs[new] = [(r, copy[t]) for r, t in nfa.refs[old]]
            nfa.empty[state].append(copy[leaf.first])
            nfa.empty[copy[leaf.final]].append(target)
        nfa.refs[state] = kept
    return budget


def _settle(rules: dict[str, EbnfRule]) -> None:
    """Each rule's start, once every rule is parsed: the rules that may derive no text are found
    (a least fixed point, each rule looked at again only when a child turned out so), then a
    rule that can reach itself without reading a character is refused (left recursion)."""
    users: dict[EbnfRule, list[EbnfRule]] = {rule: [] for rule in rules.values()}
    for rule in rules.values():
        for child in rule.children():
            users[child].append(rule)
    empty: set[EbnfRule] = set()  # read live while it grows; frozen once complete
    todo = list(rules.values())
    while todo:
        rule = todo.pop()
        if rule not in empty:
            rule.finish(empty)
            if rule.final in rule.start[0]:
                empty.add(rule)
                todo.extend(users[rule])
    skippable = frozenset(empty)
    for rule in rules.values():
        rule.finish(skippable)
    # A rule's left children: those it may start before reading a character. A cycle among
    # them is left recursion (found by one depth-first walk, without Python's recursion).
    left = {rule: list({child: None for state in rule.start[0] for child, _ in rule.nfa.refs[state]})
            for rule in rules.values()}
    done: set[EbnfRule] = set()
    for root in rules.values():
        if root in done:
            continue
        path, on_path = [(root, iter(left[root]))], {root}
        while path:
            rule, children = path[-1]
            child = next(children, None)
            if child is None:
                path.pop()
                on_path.discard(rule)
                done.add(rule)
            elif child in on_path:
                raise ValueError(f"rule {child.name!r} is left-recursive (it may derive itself before any "
                                 f"character): write it with a repetition, e.g. `{child.name} ::= item (sep item)*`")
            elif child not in done:
                path.append((child, iter(left[child])))
                on_path.add(child)


class _Parser:
    """A recursive-descent reader of GBNF text, building each rule's NFA as it goes."""

    def __init__(self, text: str) -> None:
        self.text, self.at = text, 0
        self.nfa = Nfa("grammar", MAX_STATES)  # one NFA holds every rule's states
        self.rules: dict[str, EbnfRule] = {}
        self.defined: set[str] = set()
        self.rule: EbnfRule | None = None  # the rule being read
        self.depth = 0  # groups open

    def parse(self) -> dict[str, EbnfRule]:
        self._space()
        if self.at == len(self.text):
            raise ValueError("the grammar is empty")
        while self.at < len(self.text):
            self._take("?")  # Lark's inlined-rule mark, for the message below
            name = self._name()
            if name is not None and not self._rule_follows() and self.text.startswith(":", self._after_space()):
                raise ValueError(f"rule {name!r} is written as Lark writes rules (`{name}: ...`): stoke takes GBNF, "
                                 f"as llama.cpp and xgrammar do (`{name} ::= ...`)")
            if name is None or not self._rule_follows():
                self._fail("a rule (`name ::= ...`)")
            self._space()
            self.at += 3  # ::=
            if name in self.defined:
                raise ValueError(f"rule {name!r} is defined twice")
            self.defined.add(name)
            self.rule = self._rule(name)
            self.rule.first = self._state()
            self.rule.final = self._alternatives(self.rule.first, top=True)
        undefined = sorted(set(self.rules) - self.defined)
        if undefined:
            raise ValueError(f"the grammar refers to rules it does not define: {', '.join(undefined)}")
        return self.rules

    def _rule(self, name: str) -> EbnfRule:
        return self.rules.setdefault(name, EbnfRule(name, self.nfa))

    def _state(self) -> int:
        state = self.nfa.state()
        self.rule.states.append(state)
        return state

    # ---------------------------------------------------------------- grammar of the grammar
    def _alternatives(self, start: int, top: bool = False) -> int:
        self.depth += 1
        if self.depth > MAX_GROUP_DEPTH:
            raise ValueError(f"the grammar's groups nest deeper than {MAX_GROUP_DEPTH}")
        end = self._state()
        while True:
            branch = self._state()
            self.nfa.empty[start].append(branch)
            self.nfa.empty[self._sequence(branch, top)].append(end)
            self._space()
            if not self._take("|"):
                self.depth -= 1
                return end

    def _sequence(self, start: int, top: bool) -> int:
        at = start
        while True:
            self._space()
            if self.at == len(self.text) or self.text[self.at] in "|)":
                return at
            if top and self._at_rule_start():
                return at
            at = self._repeated(at)

    def _repeated(self, start: int) -> int:
        """An item and its repetition operator, if any. The item is built as a fragment from a
        state of its own, then wired so that each text is read one way only (a repeat read two
        ways doubles the stacks of every rule it holds, at every level they nest); a bounded
        repeat builds the item anew, from its text, for each copy it needs."""
        item_at = self.at
        first = self._state()
        fragments = [(first, self._item(first))]
        item_end = self.at
        self._space()
        if self.at >= len(self.text) or self.text[self.at] not in "*+?{":
            self.at = item_end
            self.nfa.empty[start].append(first)
            return fragments[0][1]
        low, high = self._repetition()
        after = self.at

        def fragment(i: int) -> tuple[int, int]:
            while len(fragments) <= i:
                self.at = item_at
                begin = self._state()
                fragments.append((begin, self._item(begin)))
            return fragments[i]

        at = start
        for i in range(low):
            begin, end = fragment(i)
            self.nfa.empty[at].append(begin)
            at = end
        if high is None:  # any number more: the last copy loops (x+), or one copy does (x*)
            if low:
                self.nfa.empty[at].append(fragments[low - 1][0])
            else:
                loop = self._state()
                begin, end = fragment(0)
                self.nfa.empty[at].append(loop)
                self.nfa.empty[loop].append(begin)
                self.nfa.empty[end].append(loop)
                at = loop
        elif high > low:
            done = self._state()
            for i in range(low, high):
                begin, end = fragment(i)
                self.nfa.empty[at].extend((done, begin))
                at = end
            self.nfa.empty[at].append(done)
            at = done
        self.at = after
        return at

    def _repetition(self) -> tuple[int, int | None]:
        op = self.text[self.at]
        self.at += 1
        if op != "{":
            return {"*": (0, None), "+": (1, None), "?": (0, 1)}[op]
        match = re.compile(r"\s*(\d*)\s*(?:(,)\s*(\d*)\s*)?}").match(self.text, self.at)
        if match is None or not (match.group(1) or match.group(3)):
            self._fail("a repetition `{m}`, `{m,}`, `{,n}` or `{m,n}`")
        self.at = match.end()
        low = int(match.group(1) or 0)
        high = low if match.group(2) is None else (int(match.group(3)) if match.group(3) else None)
        if high is not None and high < low:
            raise ValueError(f"repetition {{{low},{high}}} has a maximum below its minimum")
        return low, high

    def _item(self, start: int) -> int:
        self._space()
        if self.at == len(self.text):
            self._fail("an item")
        ch = self.text[self.at]
        if ch in "\"'":
            return self._string(start, ch)
        if ch == "[":
            return self._edge(start, self._char_class())
        if ch == ".":
            self.at += 1
            return self._edge(start, _ANY)
        if ch == "(":
            self.at += 1
            end = self._alternatives(start)
            self._space()
            if not self._take(")"):
                self._fail("`)`")
            return end
        name = self._name()
        if name is None:
            self._fail("an item (a string, a character class, `.`, a rule's name or a group)")
        end = self._state()
        self.nfa.refs[start].append((self._rule(name), end))
        return end

    def _string(self, start: int, quote: str) -> int:
        self.at += 1
        at = start
        while True:
            if self.at == len(self.text):
                raise ValueError("the grammar has a string without its closing quote")
            ch = self.text[self.at]
            if ch == quote:
                self.at += 1
                return at
            if ch == "\n":
                raise ValueError("a string in the grammar runs past the end of its line (write \\n for a newline)")
            at = self._edge(at, CharClass([(ord(c := self._char()), ord(c))]))

    def _char_class(self) -> CharClass:
        self.at += 1
        negate = self._take("^")
        ranges: list[tuple[int, int]] = []
        while True:
            if self.at == len(self.text):
                raise ValueError("the grammar has a character class without its closing ]")
            if self.text[self.at] == "]":
                self.at += 1
                return CharClass(ranges, negate)
            low = ord(self._char())
            high = low
            if self.text.startswith("-", self.at) and not self.text.startswith("-]", self.at):
                self.at += 1
                if self.at == len(self.text):
                    raise ValueError("the grammar has a character class without its closing ]")
                high = ord(self._char())
                if high < low:
                    raise ValueError(f"character range {chr(low)!r}-{chr(high)!r} is out of order")
            ranges.append((low, high))

    def _char(self) -> str:
        """One character of a string or class, its escape read."""
        ch = self.text[self.at]
        self.at += 1
        if ch != "\\":
            return ch
        if self.at == len(self.text):
            raise ValueError("the grammar ends inside an escape")
        kind = self.text[self.at]
        self.at += 1
        if kind in _HEX_ESCAPES:
            digits = self.text[self.at:self.at + _HEX_ESCAPES[kind]]
            if len(digits) != _HEX_ESCAPES[kind] or not all(c in "0123456789abcdefABCDEF" for c in digits):
                raise ValueError(f"escape \\{kind} needs {_HEX_ESCAPES[kind]} hex digits, got {digits!r}")
            self.at += len(digits)
            code = int(digits, 16)
            if code > 0x10FFFF or 0xD800 <= code <= 0xDFFF:
                raise ValueError(f"escape \\{kind}{digits} is not a character")
            return chr(code)
        if kind not in _ESCAPES:
            raise ValueError(f"unknown escape \\{kind} in the grammar")
        return _ESCAPES[kind]

    def _edge(self, start: int, chars: CharClass) -> int:
        if not chars.any_in(0, 0x10FFFF):
            raise ValueError("a character class in the grammar matches no character")
        end = self._state()
        self.nfa.edges[start].append((chars, end))
        return end

    # ---------------------------------------------------------------- lexing
    def _space(self) -> None:
        self.at = _SPACE.match(self.text, self.at).end()

    def _take(self, token: str) -> bool:
        if self.text.startswith(token, self.at):
            self.at += len(token)
            return True
        return False

    def _name(self) -> str | None:
        match = _NAME.match(self.text, self.at)
        if match is None:
            return None
        self.at = match.end()
        return match.group()

    def _after_space(self) -> int:
        return _SPACE.match(self.text, self.at).end()

    def _rule_follows(self) -> bool:
        """The text after a name just read is `::=` (after whitespace): a rule begins."""
        return self.text.startswith("::=", self._after_space())

    def _at_rule_start(self) -> bool:
        match = _NAME.match(self.text, self.at)
        return match is not None and self.text.startswith("::=", _SPACE.match(self.text, match.end()).end())

    def _fail(self, wanted: str) -> None:
        line = self.text.count("\n", 0, self.at) + 1
        column = self.at - (self.text.rfind("\n", 0, self.at) + 1) + 1
        found = self.text[self.at:self.at + 20] or "the end"
        raise ValueError(f"the grammar does not parse at line {line}, column {column}: expected {wanted}, "
                         f"found {found!r}")
