"""Structured outputs, as vLLM's `StructuredOutputsParams`: an answer held to a JSON schema, to
any JSON object, to one of a list of choices, to a regular expression, or to an EBNF grammar
(engine/ebnf.py). The sampler masks every token the grammar
does not allow next (`engine/token_masks.py`), and an end token (EOS) only once the answer is
whole, so a sample that stops by itself stops on a valid answer; max_tokens or a stop string
may still cut it short, as in vLLM.
"""

from __future__ import annotations

import json
from dataclasses import dataclass, field
from functools import lru_cache
from typing import Any

from engine.ebnf import ebnf_grammar
from engine.grammar import Grammar, JsonDocument, JsonObject, Literals, json_value
from engine.json_schema import schema_grammar
from engine.regex import RegexRule

KINDS = ("json", "json_object", "choice", "regex", "grammar")


@dataclass(slots=True)
class StructuredOutputsParams:
    """Exactly one of: `json` (a JSON schema, as a dict or its text), `json_object=True` (any
    JSON object), `choice` (one of these strings, exactly), `regex` (text it matches whole,
    Python's syntax: engine/regex.py), `grammar` (text its `root` rule derives, in GBNF as
    llama.cpp's and xgrammar's: engine/ebnf.py)."""

    json: dict[str, Any] | str | bool | None = None
    regex: str | None = None
    choice: list[str] | None = None
    grammar: str | None = None
    json_object: bool | None = None
    # (the structure's JSON it was compiled from, the grammar): compiled again if a field changed
    _built: tuple[str, Grammar] | None = field(default=None, init=False, repr=False, compare=False)

    def __post_init__(self) -> None:
        if isinstance(self.json, str):
            try:
                self.json = json.loads(self.json)
            except json.JSONDecodeError as exc:
                raise ValueError(f"the JSON schema is not JSON: {exc}") from None
            if self.json is None:
                raise ValueError("the JSON schema is null: it must be an object or a boolean")
        given = self._given()
        if len(given) != 1:
            raise ValueError(f"structured outputs take exactly one of {', '.join(KINDS)}, got "
                             f"{', '.join(given) if given else 'none'}")
        kind = given[0]
        if kind == "json_object" and self.json_object is not True:
            raise ValueError(f"json_object must be true or false, got {self.json_object!r:.40}")
        if kind == "choice" and (not isinstance(self.choice, list) or not self.choice
                                 or not all(isinstance(c, str) and c for c in self.choice)):
            raise ValueError("choice must be a non-empty list of non-empty strings")
        if kind in ("regex", "grammar") and not isinstance(getattr(self, kind), str):
            raise ValueError(f"{kind} must be a string, got {getattr(self, kind)!r:.40}")
        self.compile()  # a schema it cannot hold is an error now, not in the engine's step

    def to_dict(self) -> dict[str, Any]:
        """The fields set (a schema given as text, parsed): what the server sends its worker."""
        return {kind: getattr(self, kind) for kind in KINDS if getattr(self, kind) is not None}

    def _given(self) -> list[str]:
        return [kind for kind in KINDS if getattr(self, kind) not in (None, False)]

    @property
    def kind(self) -> str:
        return self._given()[0]

    def compile(self) -> Grammar:
        """The grammar, compiled once per params object (again if a field changed since). Small
        structures are also cached across requests (a repeated schema reuses its grammar and the
        token masks cached for it); a large one (past MAX_SHARED_CHARS of JSON: ~30 MB for 2 MB
        of schema) lives as long as its request."""
        kind = self.kind
        value = getattr(self, kind)
        text = kind + json.dumps(value)  # key order kept: members come in it
        if self._built is None or self._built[0] != text:
            grammar = _shared(kind, text) if len(text) <= MAX_SHARED_CHARS else _compiled(kind, value)
            self._built = text, grammar
        return self._built[1]


MAX_SHARED_CHARS = 1 << 16


@lru_cache(maxsize=64)
def _shared(kind: str, text: str) -> Grammar:
    """`_compiled`, one per distinct structure (`text`: the kind, then the value's JSON)."""
    return _compiled(kind, json.loads(text[len(kind):]))


def _compiled(kind: str, value: Any) -> Grammar:
    if kind == "json":
        return schema_grammar(value)
    if kind == "choice":
        return Grammar(Literals(c.encode() for c in value))
    if kind == "regex":
        return Grammar(RegexRule(value))
    if kind == "grammar":
        return ebnf_grammar(value)
    return Grammar(JsonDocument(JsonObject([], additional=json_value())))
