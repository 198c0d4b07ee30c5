"""Structured outputs without a model: the texts a grammar takes (json_object against json.loads,
JSON schemas against their rules), the schemas and params refused, token masks against a
brute-force walk of the vocabulary, guides, the sampler's mask, and the tokens' bytes."""

from __future__ import annotations

import datetime
import json
import math
import random
import re
import uuid
from typing import Any
from typing import Literal as TypingLiteral

import numpy as np
import pytest
import torch
from pydantic import BaseModel, Field, ValidationError

from engine.grammar import MAX_WHITESPACE, Grammar, State
from engine.json_schema import schema_grammar
from engine.sampler import Sampler, SamplingRow
from engine.sampling_params import SamplingParams
from engine.structured_outputs import StructuredOutputsParams
from engine.token_bytes import vocabulary_bytes
from engine.token_masks import Guide, TokenMasks, TokenVocabulary, unpack_mask, unpack_mask_by_shifts

WHITESPACE = " \t\n\r"
VOCAB_SIZE = 49152  # the default model's
EOS = 2  # the default model's <|im_end|>


def json_object_grammar() -> Grammar:
    return StructuredOutputsParams(json_object=True).compile()


def max_whitespace_run(text: str) -> int:
    """The longest whitespace run outside strings (inside one, spaces are content)."""
    longest = run = 0
    in_string = escaped = False
    for ch in text:
        if in_string:
            if escaped:
                escaped = False
            elif ch == "\\":
                escaped = True
            elif ch == '"':
                in_string = False
            continue
        if ch in WHITESPACE:
            run += 1
            longest = max(longest, run)
        else:
            run = 0
            in_string = ch == '"'
    return longest


def _no_constants(name: str) -> None:
    raise ValueError(f"{name} is not JSON")  # json.loads takes NaN and Infinity; RFC 8259 does not


def json_object_oracle(text: str) -> bool:
    """What the json_object grammar must take: an RFC 8259 object, nothing after it, no
    whitespace run longer than MAX_WHITESPACE."""
    try:
        value = json.loads(text, parse_constant=_no_constants)
    except ValueError:
        return False
    return isinstance(value, dict) and text == text.rstrip(WHITESPACE) and max_whitespace_run(text) <= MAX_WHITESPACE


# ------------------------------------------------------------------ json_object
VALID_OBJECTS = [
    "{}",
    '{"a":1}',
    ' \n\t\r{}',
    " " * MAX_WHITESPACE + "{}",
    '{"a":' + " " * MAX_WHITESPACE + "1}",
    '{ "a" : [ ] , "b" : { } }',
    '{"a":{"b":[1,2,{"c":null}],"d":[[[]]]}}',
    r'{"a":"\u00e9\uD83D\uDE00 \" \\ \/ \b\f\n\r\t"}',
    '{"a":-0,"b":1e5,"c":1E+5,"d":-1.5e-3,"e":0.5,"f":0e0,"g":123456789012345678901234567890}',
    '{"a":true,"b":false,"c":null}',
    '{"é":"日本語 👋🏽","":""}',
    '{"a":1,"a":2}',  # duplicate keys: JSON, as json.loads has it
    '{"a":"\x7f"}',  # DEL is no control character to JSON
    '{\n  "a": [\n    1,\n    2\n  ]\n}',
]
INVALID_OBJECTS = [
    "", " ", "{", '{"a":1', '{"a":', '{"a"', "}",
    '{"a":01}', '{"a":-01}', '{"a":1.}', '{"a":.5}', '{"a":+1}', '{"a":1e}', '{"a":1e+}', '{"a":-}', '{"a":0x1}',
    '{"a":[1,]}', '{"a":1,}', "{,}", '{"a"}', "{'a':1}", '{a:1}', '{"a" 1}', '{"a":1 "b":2}',
    '{"a":"\x01"}', '{"a":"\t"}', '{"a":"\n"}', r'{"a":"\x41"}', r'{"a":"\u00g0"}', r'{"a":"\u00e"}', r'{"a":"\U0001"}',
    r"{'a':'\''}", '{"a":NaN}', '{"a":Infinity}', '{"a":-Infinity}', '{"a":tru}', '{"a":True}', '{"a":nul}',
    "[]", '"x"', "1", "null", "true",
    "{}{}", "{} ", "{}\n", '{"a":1} x',
    " " * (MAX_WHITESPACE + 1) + "{}", '{"a":' + " " * (MAX_WHITESPACE + 1) + "1}",
    '{"a":[1,' + "\n" * (MAX_WHITESPACE + 1) + "2]}",
]


@pytest.mark.parametrize("text", VALID_OBJECTS)
def test_json_object_takes_valid_objects(text: str) -> None:
    assert json_object_oracle(text)
    assert json_object_grammar().accepts(text)
    assert json_object_grammar().accepts(text.encode())


@pytest.mark.parametrize("text", INVALID_OBJECTS)
def test_json_object_refuses_invalid_texts(text: str) -> None:
    assert not json_object_oracle(text)
    assert not json_object_grammar().accepts(text)


def test_json_object_prefixes_are_viable_but_not_complete() -> None:
    g = json_object_grammar()
    for text in VALID_OBJECTS:
        data = text.encode()
        state = g.start
        for i, byte in enumerate(data):
            assert not g.complete(state), data[:i]
            state = g.step(state, byte)
            assert state is not None, data[:i + 1]
        assert g.complete(state)


def test_json_object_refuses_at_the_first_bad_byte() -> None:
    g = json_object_grammar()
    assert g.advance(g.start, b'{"a": 1') is not None
    assert g.advance(g.start, b'{"a": 0') is not None and g.advance(g.start, b'{"a": 01') is None
    assert g.advance(g.start, b'{"a": [1,') is not None and g.advance(g.start, b'{"a": [1,]') is None
    assert g.advance(g.start, b'{"a": "\x1f') is None
    assert g.advance(g.start, b'{}') is not None and g.advance(g.start, b'{} ') is None
    assert g.advance(g.start, b'{"a": "\xe6\x97') is not None  # part of a character: a token may hold it


def random_string(rng: random.Random) -> str:
    alphabet = 'ab "\\/\b\f\n\r\t\x00\x1f\x7fé日👋🏽{}[]:,'
    return "".join(rng.choice(alphabet) for _ in range(rng.randint(0, 8)))


def random_value(rng: random.Random, depth: int = 0, kind: str | None = None) -> Any:
    kind = kind or rng.choice(["object", "array", "string", "int", "float", "bool", "null"] if depth < 4
                              else ["string", "int", "float", "bool", "null"])
    if kind == "object":
        return {random_string(rng): random_value(rng, depth + 1) for _ in range(rng.randint(0, 4))}
    if kind == "array":
        return [random_value(rng, depth + 1) for _ in range(rng.randint(0, 4))]
    if kind == "string":
        return random_string(rng)
    if kind == "int":
        return rng.choice([0, -1, 7, 10 ** 30, -(10 ** 20), rng.randint(-10 ** 6, 10 ** 6)])
    if kind == "float":
        return rng.choice([0.0, -0.0, 1e-7, 1.5e300, -2.5e-300, 0.1, rng.uniform(-1e6, 1e6)])
    return {"bool": rng.random() < 0.5, "null": None}[kind]


def random_dump(rng: random.Random, value: Any) -> str:
    indent = rng.choice([None, None, 0, 2, "\t", " " * 7])
    separators = rng.choice([(",", ":"), (", ", ": "), (" , ", " : "), (",\n", ":\t")])
    text = json.dumps(value, indent=indent, separators=separators, ensure_ascii=rng.random() < 0.5)
    return rng.choice(["", " ", "\n", "\r\n\t", " " * MAX_WHITESPACE, " " * (MAX_WHITESPACE + 1)]) + text


MUTATION_ALPHABET = '{}[]":,.-+eE0123456789 \n\t\\u/atrueflsn\x01é'


def mutate(rng: random.Random, text: str) -> str:
    i = rng.randrange(len(text) + 1)
    action = rng.choice(["delete", "insert", "replace"])
    if action == "delete" and i < len(text):
        return text[:i] + text[i + 1:]
    if action == "replace" and i < len(text):
        return text[:i] + rng.choice(MUTATION_ALPHABET) + text[i + 1:]
    return text[:i] + rng.choice(MUTATION_ALPHABET) + text[i:]


@pytest.mark.parametrize("seed", range(4))
def test_json_object_agrees_with_json_loads_on_random_documents(seed: int) -> None:
    rng = random.Random(seed)
    g = json_object_grammar()
    objects = mutations = 0
    for _ in range(120):
        value = random_value(rng, kind="object" if rng.random() < 0.75 else None)
        text = random_dump(rng, value)
        expected = isinstance(value, dict) and max_whitespace_run(text) <= MAX_WHITESPACE
        assert json_object_oracle(text) == expected, text
        assert g.accepts(text) == expected, text
        objects += expected
        for _ in range(4):
            mutated = mutate(rng, text)
            assert g.accepts(mutated) == json_object_oracle(mutated), (text, mutated)
            mutations += json_object_oracle(mutated)
    assert objects > 20 and mutations > 20  # both sides of the comparison were exercised


# ------------------------------------------------------------------ JSON schemas
def assert_schema(schema: Any, valid: list[Any], invalid: list[Any]) -> None:
    """Values (dumped compactly and spaced) or texts (a str starting with a JSON opener)."""
    g = schema_grammar(schema)

    def texts(value: Any) -> list[str]:
        if isinstance(value, RawText):
            return [value.text]
        return [json.dumps(value, separators=(",", ":")), json.dumps(value), json.dumps(value, indent=2)]

    for value in valid:
        for text in texts(value):
            assert g.accepts(text), f"refused {text!r}"
    for value in invalid:
        for text in texts(value):
            assert not g.accepts(text), f"accepted {text!r}"


class RawText:
    def __init__(self, text: str) -> None:
        self.text = text


def test_schema_members_come_in_order_and_required_ones_are_present() -> None:
    schema = {"type": "object", "properties": {"a": {"type": "string"}, "b": {"type": "integer"},
                                               "c": {"type": "boolean"}}, "required": ["a", "c"]}
    assert_schema(schema,
                  valid=[{"a": "x", "c": True}, {"a": "x", "b": 1, "c": False}],
                  invalid=[{"c": True, "a": "x"}, {"a": "x"}, {"a": "x", "b": 1}, {"a": "x", "c": True, "d": 1},
                           {"a": 1, "c": True}, {"a": "x", "b": 1.5, "c": True}, {"b": 1, "a": "x", "c": True},
                           {}, [], "x", RawText('{"a":"x","c":true,}'), RawText('{"a":"x",,"c":true}')])
    optional = {"type": "object", "properties": {"a": {"type": "integer"}, "b": {"type": "integer"}}}
    assert_schema(optional, valid=[{}, {"a": 1}, {"b": 2}, {"a": 1, "b": 2}],
                  invalid=[{"b": 2, "a": 1}, {"c": 1}, RawText('{,"b":2}'), RawText('{"a":1,}')])


def test_schema_additional_properties() -> None:
    props = {"a": {"type": "integer"}}
    assert_schema({"type": "object", "properties": props, "additionalProperties": False},
                  valid=[{}, {"a": 1}], invalid=[{"a": 1, "b": 2}, {"b": 2}])
    # xgrammar's strict default: listed properties and no additionalProperties take no others
    assert_schema({"type": "object", "properties": props}, valid=[{"a": 1}], invalid=[{"a": 1, "b": 2}])
    assert_schema({"type": "object", "properties": props, "additionalProperties": True},
                  valid=[{"a": 1, "b": [1, {"x": None}]}, {"b": 2}, {}, {"a": 1, "b": 1, "c": "d"}],
                  invalid=[[1], RawText('{"a":1,}')])
    assert_schema({"type": "object", "properties": props, "required": ["a"], "additionalProperties": {"type": "string"}},
                  valid=[{"a": 1, "b": "x", "c": ""}],
                  invalid=[{"a": 1, "b": 2}, {"b": "x"}, {"a": 1, "b": None}])
    assert_schema({"type": "object"}, valid=[{}, {"x": {"y": []}}, {"k": "v", "n": 1.5}], invalid=[[], "x", None])
    assert_schema({"type": "object", "additionalProperties": {"type": "integer"}},
                  valid=[{}, {"x": 1, "y": -2}], invalid=[{"x": "1"}, {"x": 1.5}])


def test_additional_properties_do_not_take_a_listed_name() -> None:
    # A listed property's value must match its own schema, even where others are free.
    g = schema_grammar({"type": "object", "properties": {"a": {"type": "integer"}}, "additionalProperties": True})
    assert g.accepts('{"a":1,"b":"x"}')
    assert not g.accepts('{"a":"x"}')
    g = schema_grammar({"type": "object", "properties": {"a": {"type": "integer"}}, "required": ["a"],
                        "additionalProperties": {"type": "string"}})
    assert not g.accepts('{"a":1,"a":"x"}')  # json.loads keeps the last: {"a": "x"}


def test_schema_enum_and_const() -> None:
    # a member is written one way: compact, characters unescaped
    assert_schema({"enum": ["red", 1, None, {"a": [1]}, True, "é"]},
                  valid=["red", 1, None, True, RawText('"é"'), RawText('{"a":[1]}')],
                  invalid=["blue", 2, False, "Red", {"a": [2]}, "re", 10, RawText('"red" ')])
    assert_schema({"type": "string", "enum": ["x", "y"]}, valid=["x", "y"], invalid=["z", ""])
    assert_schema({"const": "x"}, valid=["x"], invalid=["y", "xx", None])
    assert_schema({"const": {"k": [1, None]}}, valid=[RawText('{"k":[1,null]}')], invalid=[{"k": [1]}, {}])
    assert_schema({"type": "object", "properties": {"v": {"const": 3}}, "required": ["v"]},
                  valid=[{"v": 3}], invalid=[{"v": 4}, {"v": 33}, {}])


def test_schema_any_of_one_of_and_type_lists() -> None:
    keyed = {"type": "object", "properties": {"k": {"type": "string"}}, "required": ["k"]}
    assert_schema({"anyOf": [{"type": "integer"}, keyed]},
                  valid=[5, -3, {"k": "v"}], invalid=["5", {"k": 1}, 1.5, None, {}])
    assert_schema({"oneOf": [{"type": "string"}, {"type": "null"}]}, valid=["a", "", None], invalid=[1, [], {}])
    assert_schema({"type": ["string", "null"]}, valid=["a", None], invalid=[1, True, []])
    assert_schema({"type": ["integer", "number"]}, valid=[1, 1.5, -0.0], invalid=["1"])
    assert_schema({"type": ["array", "object"], "items": {"type": "integer"}, "properties": {"x": {"type": "null"}}},
                  valid=[[1, 2], {"x": None}, {}], invalid=[["a"], {"x": 1}])
    # options that begin alike are followed side by side
    assert_schema({"anyOf": [{"const": "abc"}, {"const": "abd"}, {"type": "string"}]},
                  valid=["abc", "abd", "ab", "abcd"], invalid=[1])


def test_schema_arrays() -> None:
    assert_schema({"type": "array", "items": {"type": "integer"}, "minItems": 1, "maxItems": 3},
                  valid=[[1], [1, 2], [1, 2, 3]], invalid=[[], [1, 2, 3, 4], ["a"], [1.5], {}, RawText("[1,]")])
    assert_schema({"minItems": 2}, valid=[[1, "x"], [None, [], {}]], invalid=[[1], [], {}])
    assert_schema({"type": "array", "maxItems": 0}, valid=[[]], invalid=[[1], [[]]])
    assert_schema({"type": "array", "items": {"type": "array", "items": {"type": "boolean"}, "minItems": 2}},
                  valid=[[], [[True, False]], [[True, True, True], [False, False]]], invalid=[[[True]], [[]], [True]])
    assert_schema({"type": "array", "minItems": 3, "maxItems": 3, "items": {"enum": ["a", "b"]}},
                  valid=[["a", "b", "a"]], invalid=[["a", "b"], ["a", "b", "a", "b"], ["a", "c", "a"]])


def test_schema_scalars_integer_number_boolean_null_string() -> None:
    assert_schema({"type": "integer"}, valid=[0, -0, 12, -3, 10 ** 20, RawText("-0")],
                  invalid=[1.5, "1", True, None, RawText("1e3"), RawText("1.0"), RawText("01"), RawText("+1"),
                           RawText("1 "), RawText(" ")])
    assert_schema({"type": "number"}, valid=[0, 1.5, -0.0, 1e-3, 2e10, RawText("2E+10"), RawText("1e5")],
                  invalid=["1", RawText(".5"), RawText("1."), RawText("+1"), RawText("NaN"), RawText("-")])
    assert_schema({"type": "boolean"}, valid=[True, False], invalid=[0, "true", None])
    assert_schema({"type": "null"}, valid=[None], invalid=[0, "null", False])
    assert_schema({"type": "string"}, valid=["", "é 👋", 'quote " and \\ and \n'],
                  invalid=[1, None, RawText('"\n"'), RawText("'x'")])
    assert_schema({}, valid=[1, "x", None, [1, {"a": []}], {"b": True}], invalid=[RawText(""), RawText("[1,]")])
    assert_schema(True, valid=[1, {}], invalid=[RawText("{")])


def test_schema_refs_recursive_and_nested() -> None:
    tree = {"$defs": {"node": {"type": "object", "properties": {
        "value": {"type": "integer"}, "children": {"type": "array", "items": {"$ref": "#/$defs/node"}}},
        "required": ["value"]}}, "$ref": "#/$defs/node"}
    assert_schema(tree, valid=[{"value": 1}, {"value": 1, "children": [{"value": 2},
                                                                       {"value": 3, "children": [{"value": 4, "children": []}]}]}],
                  invalid=[{"value": 1, "children": [{"children": []}]}, {"value": 1, "children": [1]}, {}])
    linked = {"type": "object", "properties": {"next": {"anyOf": [{"$ref": "#"}, {"type": "null"}]}}, "required": ["next"]}
    assert_schema(linked, valid=[{"next": None}, {"next": {"next": {"next": None}}}], invalid=[{"next": {}}, {}])
    definitions = {"definitions": {"pos": {"type": "array", "items": {"type": "number"}, "minItems": 2, "maxItems": 2},
                                   "alias": {"$ref": "#/definitions/pos"}},
                   "type": "object", "properties": {"at": {"$ref": "#/definitions/alias"}}, "required": ["at"]}
    assert_schema(definitions, valid=[{"at": [1, 2.5]}], invalid=[{"at": [1]}, {"at": ["x", 1]}])
    escaped = {"$defs": {"a/b": {"type": "integer"}, "c~d": {"type": "string"}},
               "type": "array", "items": {"anyOf": [{"$ref": "#/$defs/a~1b"}, {"$ref": "#/$defs/c~0d"}]}}
    assert_schema(escaped, valid=[[1, "x"]], invalid=[[None]])
    mutual = {"$defs": {"a": {"type": "array", "items": {"$ref": "#/$defs/b"}},
                        "b": {"type": "object", "properties": {"a": {"$ref": "#/$defs/a"}}}},
              "$ref": "#/$defs/a"}
    assert_schema(mutual, valid=[[], [{}, {"a": [{"a": []}]}]], invalid=[[[]], [{"a": {}}]])


class Address(BaseModel):
    street: str
    zip_code: int | None = None


class Person(BaseModel):
    name: str
    role: TypingLiteral["admin", "user"]
    nickname: str | None = None
    tags: list[str]
    address: Address
    friends: list[Person] = []


def test_pydantic_schema() -> None:
    g = schema_grammar(Person.model_json_schema())
    bob = Person(name="Bob", role="admin", tags=[], address=Address(street="t", zip_code=5))
    alice = Person(name="Alice", role="user", nickname="Al", tags=["x", "é"], address=Address(street="s"),
                   friends=[bob])
    valid = [alice.model_dump_json(), alice.model_dump_json(exclude_none=True), alice.model_dump_json(indent=2),
             bob.model_dump_json(exclude_defaults=True)]
    for text in valid:
        assert g.accepts(text), text
        Person.model_validate_json(text, strict=True)
    invalid = [
        '{"name":"A","role":"boss","tags":[],"address":{"street":"s"}}',
        '{"name":"A","role":"user","tags":[]}',
        '{"name":"A","role":"user","tags":"x","address":{"street":"s"}}',
        '{"name":"A","role":"user","tags":[],"address":{}}',
        '{"name":"A","role":"user","tags":[],"address":{"street":"s","zip_code":"1"}}',
        '{"name":"A","role":"user","tags":[],"address":{"street":"s"},"friends":[{"name":"B"}]}',
        '{"role":"user","name":"A","tags":[],"address":{"street":"s"}}',  # out of order: refused, pydantic takes it
    ]
    for text in invalid:
        assert not g.accepts(text), text
    for text in invalid[:-1]:
        with pytest.raises(ValidationError):
            Person.model_validate_json(text, strict=True)
    assert not g.accepts('{"name":"A","role":"user","tags":[],"address":{"street":"s"},"extra":1}')


class Constrained(BaseModel):
    """Pydantic's constrained fields, as agent frameworks send them."""

    code: str = Field(pattern=r"^[A-Z]{2}-[0-9]{3}$")
    name: str = Field(min_length=2, max_length=5)
    qty: int = Field(ge=1, le=120)
    delta: int = Field(gt=-10, lt=10)
    quote: str = Field(pattern=r'^say "[a-z]+"\\?\n?$')  # a quote, a backslash, a newline: escaped in JSON


def test_pydantics_constrained_fields_hold_exactly_what_pydantic_validates() -> None:
    """Random candidates for each field (lengths by code point, escapes counting one, multi-byte
    text, bounds either side, near-misses of the patterns): the grammar takes a document exactly
    when Pydantic validates it."""
    grammar = schema_grammar(Constrained.model_json_schema())
    rng = random.Random(5)

    def text(alphabet: str, longest: int) -> str:
        return "".join(rng.choice(alphabet) for _ in range(rng.randint(0, longest)))

    taken = refused = 0
    for _ in range(1500):
        doc = {"code": rng.choice(["AB-123", "ZQ-009", text("AZaz-0129", 7)]),
               "name": text('ab"\\\né😀\x01', 7),
               "qty": rng.randint(-3, 125), "delta": rng.randint(-12, 12),
               "quote": rng.choice(['say "hi"', 'say "yes"\\', 'say "ok"\n', 'say "ok"\\\n', 'say "Hi"', 'say hi',
                                    'say "hi"\n\n'])}
        encoded = json.dumps(doc, ensure_ascii=False, separators=(",", ":"))
        try:
            Constrained.model_validate_json(encoded, strict=True)
            valid = True
        except ValidationError:
            valid = False
        assert grammar.accepts(encoded) == valid, encoded
        taken += valid
        refused += not valid
    assert taken > 50 and refused > 50


class Dated(BaseModel):
    when: datetime.datetime
    day: datetime.date
    at: datetime.time
    id: uuid.UUID


def test_formats_pydantic_writes_take_only_what_pydantic_validates() -> None:
    """datetime, date, time and UUID fields (`format` date-time, date, time, uuid): their RFC 3339
    forms are taken, and of 4,000 near-misses (a character or two changed: Feb 29 of a common
    year, a 13th month, a 24th hour, a bad offset ...) whatever the grammar takes, Pydantic
    validates."""
    grammar = schema_grammar(Dated.model_json_schema())
    good = {"when": "2024-02-29T23:59:59.123456+05:30", "day": "1999-12-31", "at": "08:00:00Z",
            "id": "123e4567-e89b-12d3-a456-426614174000"}
    assert grammar.accepts(json.dumps(good, separators=(",", ":")))
    rng = random.Random(0)
    taken = 0
    for _ in range(4000):
        doc = {}
        for key, value in good.items():
            chars = list(value)
            for _ in range(rng.randint(0, 2)):
                chars[rng.randrange(len(chars))] = rng.choice("0123456789:-TZ+.aX ")
            doc[key] = "".join(chars)
        text = json.dumps(doc, separators=(",", ":"))
        if grammar.accepts(text):
            taken += 1
            Dated.model_validate_json(text, strict=True)
    assert taken > 150
    email = schema_grammar({"type": "string", "format": "email"})
    assert [email.accepts(json.dumps(t)) for t in ("a@b.co", "jo.doe+x@mail.example.org", "a@b", "@b.co", "a@-b.co")] \
        == [True, True, False, False, False]
    ipv4 = schema_grammar({"type": "string", "format": "ipv4"})
    assert [ipv4.accepts(json.dumps(t)) for t in ("1.2.3.4", "255.255.255.255", "256.1.1.1", "01.2.3.4", "1.2.3")] \
        == [True, True, False, False, False]
    # a pattern or a length of its own comes first; a format stoke does not hold is an annotation
    assert schema_grammar({"type": "string", "format": "date", "pattern": "x+"}).accepts('"xx"')
    assert schema_grammar({"type": "string", "format": "date", "maxLength": 2}).accepts('"ab"')
    assert schema_grammar({"type": "string", "format": "hostname"}).accepts('"not a hostname"')


def test_integer_bounds_and_string_lengths() -> None:
    g = schema_grammar({"type": "integer", "minimum": -3.5, "exclusiveMaximum": 1000})
    assert [v for v in range(-20, 1020) if g.accepts(str(v))] == list(range(-3, 1000))
    assert not any(g.accepts(t) for t in ("-0", "0.0", "007", "1e2"))
    assert g.accepts("0") and g.accepts("-3")
    unbounded_above = schema_grammar({"type": "integer", "exclusiveMinimum": 98})
    assert not unbounded_above.accepts("98") and all(unbounded_above.accepts(str(v)) for v in (99, 100, 10**30))
    with pytest.raises(ValueError, match="no JSON value"):
        schema_grammar({"type": "integer", "minimum": 3, "maximum": 2})
    for bad in ("9", True, 10**31, float("nan")):  # draft 4's boolean form too
        with pytest.raises(ValueError, match="must be a number"):
            schema_grammar({"type": "integer", "maximum": bad})
    short = schema_grammar({"type": "string", "maxLength": 2})
    assert [short.accepts(json.dumps(t, ensure_ascii=False)) for t in ("", "ab", "abc", "\n\"", "é😀", "é😀a")] == \
        [True, True, False, True, True, False]
    assert schema_grammar({"type": "string", "minLength": 1}).accepts('"\\u00e9"')
    with pytest.raises(ValueError, match="maxLength"):
        schema_grammar({"type": "string", "minLength": 3, "maxLength": 2})
    with pytest.raises(ValueError, match="pattern .*does not parse"):
        schema_grammar({"type": "string", "pattern": "(a"})


def test_bounded_strings_read_well_formed_text_only() -> None:
    """A length bound counts characters of well-formed UTF-8: stray continuation bytes, overlong
    forms and surrogates' bytes are refused (a model's byte tokens could otherwise run on past
    maxLength), and so are a surrogate's \\u escapes (a pair is one character, a lone half no
    text); past minLength without a maximum, states stop counting."""
    one = schema_grammar({"type": "string", "maxLength": 1})
    for text in (b'"\x80"', b'"\xc3\xa9\xa9"', b'"\xc0\xaf"', b'"\xe0\x80\xaf"', b'"\xed\xa0\x80"',
                 b'"\xf4\x90\x80\x80"', b'"\xf5\x80\x80\x80"', b'"\\ud83d\\ude00"', b'"\\uDBFF"', b'"\x01"',
                 b'"\\u00g0"', b'"\\x41"'):
        assert not one.accepts(text), text
    for text in ('"é"', '"😀"', '"\\u00E9"', '"\\uD7FF"', '"\\/"', '"\\t"', '"\x7f"'):
        assert one.accepts(text), text
    at_least = schema_grammar({"type": "string", "minLength": 3})
    assert at_least.advance(at_least.start, b'"abc') == at_least.advance(at_least.start, b'"abcdefgh')


def test_patterns_write_their_characters_as_json_does() -> None:
    """A pattern's quote, backslash and control characters are written escaped (short escapes,
    or \\u00XX in either case), never raw; anchors hold only at the pattern's ends; (?s:...) and
    (?-s:...) hold inside their group."""
    g = schema_grammar({"type": "string", "pattern": '^a["\\\\\x01\x1f\n]b$'})
    for text in ('"a\\"b"', '"a\\\\b"', '"a\\u0001b"', '"a\\u001Fb"', '"a\\u001fb"', '"a\\nb"', '"a\\u000ab"'):
        assert g.accepts(text), text
    for text in ('"a"b"', '"a\\b"', '"a\x01b"', '"a\\u0011b"', '"a\\u0002b"', '"a\\tb"', '"a\\/b"'):
        assert not g.accepts(text), text
    for pattern in ("a$b", "^a$b$", "a^b"):
        with pytest.raises(ValueError, match="anchors"):
            schema_grammar({"type": "string", "pattern": pattern})
    assert [schema_grammar({"type": "string", "pattern": p}).accepts(json.dumps(t)) for p, t in (
        ("(^a|^b$)", "b"), ("(?s)a(?-s:.)", "a\n"), ("(?s:.)", "\n"), ("a.", "a\n"))] == [True, False, True, False]


def test_integer_ranges_equal_brute_force() -> None:
    """Random bounds, inclusive and exclusive, whole and fractional, one or both, either sign:
    the integers taken are exactly those within them."""
    rng = random.Random(3)
    for _ in range(300):
        schema: dict[str, Any] = {"type": "integer"}
        for name in rng.sample(["minimum", "maximum", "exclusiveMinimum", "exclusiveMaximum"], rng.randint(1, 3)):
            schema[name] = rng.choice([rng.randint(-150, 150), rng.randint(-3, 3), round(rng.uniform(-150, 150), 1)])
        want = [v for v in range(-200, 201) if v >= schema.get("minimum", -math.inf) and v <= schema.get(
            "maximum", math.inf) and v > schema.get("exclusiveMinimum", -math.inf) and v < schema.get(
            "exclusiveMaximum", math.inf)]
        try:
            g = schema_grammar(schema)
        except ValueError:
            assert not want, schema  # no integer: refused as no value
            continue
        assert [v for v in range(-200, 201) if g.accepts(str(v))] == want, schema
        assert not any(g.accepts(t) for t in ("-0", "00", "01", "-01", "1.0"))


def _decimal_candidates(rng: random.Random) -> list[str]:
    """Decimal numbers as JSON writes them and as it does not (-0, leading zeros, a bare point,
    an exponent), of either sign, whole and with fractions of 1-3 digits, trailing zeros too."""
    out = {"-0", "-0.0", "01", "00.5", "1.", ".5", "1e2", "1E-1", "-"}
    for _ in range(400):
        whole = rng.choice([0, 0, 1, 2, 3, 9, 10, 99, 100, 101, 150, rng.randint(0, 300)])
        fraction = rng.choice(["", "", "0", "00", "5", "50", "05", "1", "12", "125", "999", "001",
                               str(rng.randint(0, 999))])
        text = str(whole) + ("." + fraction if fraction else "")
        out |= {text, "-" + text}
    return sorted(out)


def test_number_ranges_equal_brute_force() -> None:
    """Random bounds, inclusive and exclusive, whole and fractional, one or two, either sign:
    a bounded number takes exactly the decimals within them (no exponent, no -0), each bound
    read as the decimal JSON wrote."""
    from decimal import Decimal

    rng = random.Random(5)
    candidates = _decimal_candidates(rng)
    canonical = re.compile(r"-?(0|[1-9][0-9]*)(\.[0-9]+)?")
    tests = {"minimum": Decimal.__ge__, "maximum": Decimal.__le__, "exclusiveMinimum": Decimal.__gt__,
             "exclusiveMaximum": Decimal.__lt__}
    for _ in range(300):
        schema: dict[str, Any] = {"type": "number"}
        for name in rng.sample(sorted(tests), rng.randint(1, 2)):
            schema[name] = rng.choice([rng.randint(-150, 150), rng.randint(-3, 3), 0, 0.5, -0.5, 0.125,
                                       round(rng.uniform(-150, 150), rng.randint(1, 3))])
        bounds = {name: Decimal(repr(v)) for name, v in schema.items() if name != "type"}
        want = [t for t in candidates if canonical.fullmatch(t) and not (t.startswith("-") and Decimal(t) == 0)
                and all(tests[name](Decimal(t), bound) for name, bound in bounds.items())]
        try:
            g = schema_grammar(schema)
        except ValueError:
            assert min(bounds.get("minimum", bounds.get("exclusiveMinimum", Decimal("-inf"))),
                       Decimal("inf")) >= min(bounds.get("maximum", bounds.get("exclusiveMaximum", Decimal("inf"))),
                                              Decimal("inf")), schema  # refused only as no value
            continue
        assert [t for t in candidates if g.accepts(t)] == want, schema


@pytest.mark.parametrize("schema,taken,refused", [
    ({"minimum": 0.1, "maximum": 0.45}, ["0.1", "0.3", "0.35", "0.45", "0.4499"], ["0.09", "0.451", "0.46"]),
    ({"minimum": 0, "maximum": 0.95}, ["0", "0.9", "0.93", "0.95", "0.950"], ["0.951", "0.96", "1"]),
    ({"exclusiveMinimum": 0.25, "maximum": 0.29}, ["0.26", "0.2500001", "0.29"], ["0.25", "0.250", "0.2900001"]),
    # 29 and 30 digits: past Decimal's 28, a negated bound would be rounded
    ({"maximum": -12345678901234567890123456789}, ["-12345678901234567890123456789", "-12345678901234567890123456790"],
     ["-12345678901234567890123456788", "-12345678901234567890123456788.5"]),
    ({"minimum": -999999999999999999999999999999}, ["-999999999999999999999999999999", "0.5"],
     ["-1000000000000000000000000000000", "-999999999999999999999999999999.1"]),
])
def test_number_bounds_within_one_integer_part_and_past_28_digits(schema: dict, taken: list[str],
                                                                  refused: list[str]) -> None:
    g = schema_grammar({"type": "number", **schema})
    assert [t for t in taken + refused if g.accepts(t)] == taken


class Reading(BaseModel):
    """Pydantic's bounded float fields (Field(ge=..., gt=..., le=..., lt=...), Optional too)."""

    confidence: float = Field(ge=0, le=1)
    price: float = Field(gt=0)
    kelvin_offset: float = Field(ge=-273.15, lt=1e6)
    ratio: float | None = Field(default=None, gt=-1.5, le=2.25)


def test_pydantic_float_fields_with_bounds() -> None:
    """Every document the grammar takes validates, and the near misses it refuses do not (or are
    numbers it writes without an exponent, a bare point or leading zeros)."""
    g = schema_grammar(Reading.model_json_schema())
    rng = random.Random(9)
    anywhere = _decimal_candidates(rng)
    near = {"confidence": ["0", "1", "0.5", "1.0000", "0.999", "1.01", "-0.01", "0.000", "-0"],
            "price": ["0", "0.0", "0.001", "5", "-1", "1e2"],
            "kelvin_offset": ["-273.15", "-273.150", "-273.151", "-273.14", "999999.99", "1000000", "0"],
            "ratio": ["null", "-1.5", "-1.4999", "2.25", "2.2500001", "0", "2.", "-1.50"]}
    taken = refused = 0
    for _ in range(3000):
        doc = {name: rng.choice(near[name] if rng.random() < 0.8 else anywhere) for name in near}
        text = "{" + ",".join(f'"{k}":{v}' for k, v in doc.items()) + "}"
        try:
            Reading.model_validate_json(text, strict=True)
            valid = True
        except ValidationError:
            valid = False
        if g.accepts(text):
            taken += 1
            assert valid, text
        else:
            refused += 1
            assert not valid or any(re.search(r"\.$|^-?0[0-9]|[eE]|^-0(\.0+)?$|^\.", v) for v in doc.values()), text
    assert taken > 100 and refused > 100
    with pytest.raises(ValueError, match="at most 30 digits after the point"):
        schema_grammar({"type": "number", "minimum": 1e-31})
    with pytest.raises(ValueError, match="must be a number"):
        schema_grammar({"type": "number", "maximum": True})


@pytest.mark.parametrize("keyword,schema", [
    ("maximum", {"properties": {"x": {"maximum": 1}}}),  # no type to bound
    ("pattern", {"type": "string", "pattern": "^a+$", "maxLength": 3}),  # both: refused
    ("minLength", {"properties": {"s": {"minLength": 1}}}),  # no type to bound
    ("allOf", {"allOf": [{"type": "string"}]}),
    ("not", {"not": {"type": "string"}}),
    ("uniqueItems", {"type": "array", "items": {"type": "integer", "multipleOf": 2}, "uniqueItems": True}),
    ("multipleOf", {"type": "array", "items": {"type": "integer", "multipleOf": 2}}),
    ("patternProperties", {"type": "object", "patternProperties": {"^x": {}}}),
    ("prefixItems", {"type": "array", "prefixItems": [{"type": "string"}]}),
])
def test_unsupported_keywords_are_value_errors_that_name_them(keyword: str, schema: dict) -> None:
    with pytest.raises(ValueError, match=f"'{keyword}'"):
        schema_grammar(schema)
    with pytest.raises(ValueError, match=f"'{keyword}'"):
        StructuredOutputsParams(json=schema)


@pytest.mark.parametrize("schema,message", [
    ({"$ref": "#"}, "itself"),
    ({"anyOf": [{"$ref": "#"}, {"type": "null"}]}, "itself"),
    ({"$defs": {"a": {"$ref": "#/$defs/b"}, "b": {"anyOf": [{"type": "null"}, {"$ref": "#/$defs/a"}]}},
      "$ref": "#/$defs/a"}, "itself"),
    ({"type": "object", "properties": {"a": {}}, "required": ["a", "b"]}, "'b'.*not in properties"),
    ({"type": "object", "required": ["a"]}, "'a'.*not in properties"),
    ({"type": "object", "properties": {}, "required": "a"}, "required"),
    ({"type": "object", "properties": ["a"]}, "properties"),
    ({"type": "str"}, "type"),
    ({"type": []}, "type"),
    ({"type": ["string", "text"]}, "type"),
    (5, "must be an object or a boolean"),
    ("string", "must be an object or a boolean"),
    (False, "false"),
    ({"type": "object", "properties": {"a": False}, "required": ["a"]}, "false"),
    ({"type": "array", "items": False, "minItems": 1}, "false"),
    ({"anyOf": [{"anyOf": [{"type": "string", "title": f"{i}.{j}"} for j in range(128)]} for i in range(8)]},
     "too many to follow"),
    ({"type": "array", "minItems": -1}, "minItems"),
    ({"type": "array", "minItems": True}, "minItems"),
    ({"type": "array", "maxItems": 1.5}, "maxItems"),
    ({"type": "array", "minItems": 3, "maxItems": 2}, "maxItems"),
    ({"enum": []}, "enum"),
    ({"enum": "abc"}, "enum"),
    ({"anyOf": []}, "anyOf"),
    ({"oneOf": {"type": "string"}}, "oneOf"),
    ({"anyOf": [{"type": "string"}], "type": "string"}, "anyOf"),
    ({"$ref": "#/$defs/missing"}, "points at nothing"),
    ({"$ref": "https://example.com/schema.json"}, "not supported"),
    ({"$ref": 5}, "not supported"),
    ({"$defs": {"a": {}}, "$ref": "#/$defs/a", "type": "object"}, r"\$ref beside"),
    ({"type": "string", "enum": [1, 2]}, "no value.*of its type"),
    ({"type": "integer", "const": "x"}, "no value.*of its type"),
    ({"const": 1, "enum": [True, 1]}, "enum beside const"),
    ({"enum": [[1, 2, 3]], "maxItems": 2}, "maxItems beside enum"),
    ({"enum": ["a", "b"], "anyOf": [{"const": "a"}]}, "anyOf beside enum"),
    ({"enum": [1e400]}, "NaN and infinities"),
    ({"const": float("nan")}, "NaN and infinities"),
])
def test_bad_schemas_are_value_errors(schema: Any, message: str) -> None:
    with pytest.raises(ValueError, match=message):
        schema_grammar(schema)


def test_reused_sub_schemas_count_their_levels() -> None:
    def nested(levels: int, inner: dict) -> dict:
        for _ in range(levels):
            inner = {"type": "array", "items": inner}
        return inner

    d1 = nested(60, {"type": "integer"})
    with pytest.raises(ValueError, match="deeper than 64"):  # p2 reuses p1's rule 60 levels down
        schema_grammar({"type": "object", "properties": {"p1": d1, "p2": nested(10, d1)}})
    deep = {"$defs": {"deep": nested(55, {"type": "integer"})}, "type": "object"}
    with pytest.raises(ValueError, match="deeper than 64"):
        schema_grammar(deep | {"properties": {"a": {"$ref": "#/$defs/deep"}, "b": nested(20, {"$ref": "#/$defs/deep"})}})
    assert schema_grammar(deep | {"properties": {"a": {"$ref": "#/$defs/deep"}, "b": nested(2, {"$ref": "#/$defs/deep"})}})


def test_enum_and_const_keep_the_values_of_their_type_and_formats_are_held_or_read_past() -> None:
    g = schema_grammar({"type": "string", "enum": ["a", 1, None]})
    assert g.accepts('"a"') and not g.accepts("1") and not g.accepts("null")
    g = schema_grammar({"type": ["integer", "null"], "enum": [1, 1.5, None, "x"]})
    assert g.accepts("1") and g.accepts("null") and not g.accepts("1.5") and not g.accepts('"x"')
    assert schema_grammar({"enum": [2.0, True]}).accepts("2")  # 2.0 is 2, and true is no 1
    # an enum with no value of its type is no value: left out where the schema can do without
    g = schema_grammar({"type": "object", "properties": {"a": {"const": 1, "type": "string"}, "b": {}}})
    assert g.accepts('{"b":1}') and g.advance(g.start, b'{"a') is None
    g = schema_grammar({"type": "string", "format": "date-time", "description": "when"})
    assert g.accepts('"2026-12-06T13:00:00Z"') and not g.accepts('"any text"')  # held, as xgrammar holds it
    g = schema_grammar({"type": "string", "format": "uri-template"})
    assert g.accepts('"any text"')  # not one stoke holds: read past, as 2020-12 does
    g = schema_grammar({"oneOf": [{"type": "object", "properties": {"k": {"const": "a"}}, "required": ["k"]},
                                  {"type": "object", "properties": {"k": {"const": "b"}}, "required": ["k"]}],
                        "discriminator": {"propertyName": "k"}})
    assert g.accepts('{"k":"a"}') and g.accepts('{"k":"b"}') and not g.accepts('{"k":"c"}')


def test_repeated_and_shared_unions_step_in_linear_time() -> None:
    defs = {"l0": {"type": "string"}}
    for i in range(1, 31):  # 128 ways to each level's $ref, 30 levels: 128**30 paths if walked
        defs[f"l{i}"] = {"anyOf": [{"$ref": f"#/$defs/l{i - 1}"}] * 128}
    g = schema_grammar({"$defs": defs, "$ref": "#/$defs/l30"})
    assert g.accepts('"x"')
    assert schema_grammar({"anyOf": [{"anyOf": [{"type": "string"}] * 128}] * 5}).accepts('"x"')
    # Distinct unions nested, each way open at once: the ways double with each "[", and past
    # MAX_STACKS the text is refused (the one valid shape nests 12 deep), in bounded time.
    def union(level: int) -> dict:
        if level == 0:
            return {"type": "string"}
        return {"anyOf": [{"type": "array", "items": union(level - 1), "title": f"{side}{level}"} for side in "ab"]}
    g = schema_grammar(union(12))
    state = g.advance(g.start, b"[" * 9)
    assert state is not None and len(state) == 512 and g.step(state, ord("[")) is None
    assert not g.accepts("[" * 12 + '"x"' + "]" * 12)


def test_false_schemas_leave_their_ways_out() -> None:
    g = schema_grammar({"type": "object", "properties": {"a": False, "b": {"type": "integer"}}})
    assert g.accepts('{"b":1}') and g.advance(g.start, b'{"a') is None
    g = schema_grammar({"type": "array", "items": False})
    assert g.accepts("[]") and not g.accepts("[1]")
    g = schema_grammar({"anyOf": [False, {"type": "null"}]})
    assert g.accepts("null") and not g.accepts("1")


def test_ways_that_never_end_are_left_out_and_a_schema_of_only_those_refused() -> None:
    for schema in ({"type": "array", "minItems": 1, "items": {"$ref": "#"}},
                   {"type": "object", "properties": {"a": {"$ref": "#"}}, "required": ["a"]}):
        with pytest.raises(ValueError, match="nest forever"):
            schema_grammar(schema)
    bad = {"type": "object", "properties": {"x": {"$ref": "#/$defs/bad"}}, "required": ["x"]}
    g = schema_grammar({"$defs": {"bad": bad}, "type": "object", "properties": {
        "a": {"$ref": "#/$defs/bad"}, "b": {"type": "integer"}, "c": {"anyOf": [{"$ref": "#/$defs/bad"},
                                                                              {"type": "null"}]},
        "d": {"type": "array", "items": {"$ref": "#/$defs/bad"}}}, "additionalProperties": {"$ref": "#/$defs/bad"}})
    assert g.accepts('{"b":1,"c":null,"d":[]}')
    for trap in (b'{"a', b'{"c":{', b'{"d":[{', b'{"zz'):  # no answer may walk in
        assert g.advance(g.start, trap) is None, trap
    tree = {"type": "object", "properties": {"v": {"type": "integer"}, "kids": {"type": "array", "items": {"$ref": "#"}}},
            "required": ["v", "kids"]}
    assert schema_grammar(tree).accepts('{"v":1,"kids":[{"v":2,"kids":[]}]}')


def nested(levels: int, wrap: Any) -> dict:
    schema: dict = {"type": "integer"}
    for _ in range(levels):
        schema = wrap(schema)
    return schema


def test_too_deep_schemas_are_value_errors() -> None:
    with pytest.raises(ValueError, match="deeper than 64"):
        schema_grammar(nested(70, lambda s: {"type": "array", "items": s}))
    with pytest.raises(ValueError, match="deeper than 64"):
        schema_grammar(nested(70, lambda s: {"type": "object", "properties": {"x": s}}))
    with pytest.raises(ValueError, match="deeper than 64"):
        schema_grammar(nested(40, lambda s: {"anyOf": [{"type": "array", "items": s}, {"type": "null"}]}))
    g = schema_grammar(nested(60, lambda s: {"type": "array", "items": s}))
    assert g.accepts("[" * 60 + "1" + "]" * 60) and not g.accepts("[" * 59 + "1" + "]" * 59)
    g = schema_grammar(nested(30, lambda s: {"type": "object", "properties": {"x": s}, "required": ["x"]}))
    assert g.accepts('{"x":' * 30 + "1" + "}" * 30)


def ref_chain(length: int, level: Any) -> dict:
    defs = {f"d{i}": level(f"#/$defs/d{i + 1}") for i in range(length)}
    defs[f"d{length}"] = {"type": "integer"}
    return {"$defs": defs, "$ref": "#/$defs/d0"}


@pytest.mark.parametrize("length", [50, 70, 200, 1000])
def test_deep_ref_chains_are_value_errors_or_grammars_that_take_their_instances(length: int) -> None:
    # Depth through $refs counts too: a chain of aliases, or of arrays, each one level down.
    for schema, instance in [
        (ref_chain(length, lambda ref: {"$ref": ref}), "1"),
        (ref_chain(length, lambda ref: {"type": "array", "items": {"$ref": ref}}), "[" * length + "1" + "]" * length),
    ]:
        try:
            g = schema_grammar(schema)
        except ValueError:
            continue
        assert g.accepts(instance), f"a schema was compiled whose instance {instance[:20]!r}... it refuses"


@pytest.mark.parametrize("width", [100, 300])
def test_wide_unions_are_value_errors_or_grammars_that_take_their_instances(width: int) -> None:
    # One object type per key, told apart only by it: every option is alive after "{".
    schema = {"anyOf": [{"type": "object", "properties": {f"k{i}": {"type": "integer"}}, "required": [f"k{i}"]}
                        for i in range(width)]}
    try:
        g = schema_grammar(schema)
    except ValueError:
        return
    assert g.accepts('{"k0":1}') and g.accepts(f'{{"k{width - 1}":1}}')


# ------------------------------------------------------------------ params
def test_structured_outputs_params_take_exactly_one_kind() -> None:
    with pytest.raises(ValueError, match="exactly one.*none"):
        StructuredOutputsParams()
    with pytest.raises(ValueError, match="exactly one.*none"):
        StructuredOutputsParams(json_object=False)
    with pytest.raises(ValueError, match="exactly one.*json, choice"):
        StructuredOutputsParams(json={"type": "integer"}, choice=["a"])
    with pytest.raises(ValueError, match="exactly one"):
        StructuredOutputsParams(json_object=True, choice=["a"])
    assert StructuredOutputsParams(grammar='root ::= "a"').compile().accepts("a")  # tests/test_ebnf.py
    with pytest.raises(ValueError, match="exactly one.*regex, grammar"):
        StructuredOutputsParams(regex="a", grammar='root ::= "a"')
    with pytest.raises(ValueError, match="json_object"):
        StructuredOutputsParams(json_object="yes")
    assert StructuredOutputsParams(json_object=True).kind == "json_object"
    assert StructuredOutputsParams(choice=["a"], json_object=False).kind == "choice"


def test_structured_outputs_json_as_text_and_choices() -> None:
    params = StructuredOutputsParams(json='{"type": "integer"}')
    assert params.json == {"type": "integer"} and params.kind == "json"
    assert params.to_dict() == {"json": {"type": "integer"}}  # what the server's pipe carries
    assert params.compile().accepts("12") and not params.compile().accepts('"12"')
    with pytest.raises(ValueError, match="not JSON"):
        StructuredOutputsParams(json="{not json")
    with pytest.raises(ValueError, match="'multipleOf'"):
        StructuredOutputsParams(json='{"type": "integer", "multipleOf": 2}')
    assert StructuredOutputsParams(json=True).compile().accepts("[1]")
    for choice in ([], ["a", ""], "ab", ["a", 1], [None]):
        with pytest.raises(ValueError, match="choice"):
            StructuredOutputsParams(choice=choice)
    g = StructuredOutputsParams(choice=["yes", "no", "yes please", "né"]).compile()
    for text in ("yes", "no", "yes please", "né"):
        assert g.accepts(text)
    for text in ("ye", "yesno", " yes", "yes ", "", "YES", '"yes"', "yes pleas", "ne"):
        assert not g.accepts(text)


REGEXES = [r"[\Da]+", r"[^\w\s]+", r"\d{3}-\d{4}", r"(yes|no|maybe)", r"[a-z]+@[a-z]+\.(com|org)", r"x.?\s*(?:ab)*[^0-9é]\w", r"é+ü?",
           r"[À-ÿ]{2}", r"(?s)a.b", r"^\w+$", r"a{2,4}b*?", r"(ab|a)(c|bcd)(d*)", r"[^a-c]+|_", r"\D\S\W?"]


@pytest.mark.parametrize("pattern", REGEXES)
def test_regex_agrees_with_re_fullmatch(pattern: str) -> None:
    g = StructuredOutputsParams(regex=pattern).compile()
    rng = random.Random(pattern)
    alphabet = "ab9 é\n_-.@xyzcdü٣"  # ٣: a decimal digit, but not \d's (ASCII's, as vLLM's engines)
    texts = ["".join(rng.choice(alphabet) for _ in range(rng.randint(0, 8))) for _ in range(2000)]
    texts += ["555-1234", "maybe", "bob@site.org", "xa  ababz_", "ééü", "Àÿ", "a\nb", "héllo", "aaab", "abcd"]
    for text in texts:
        assert g.accepts(text) == (re.fullmatch(pattern, text, re.ASCII) is not None), (pattern, text)


def test_regex_reads_characters_byte_by_byte() -> None:
    g = StructuredOutputsParams(regex="[À-ÿ]{2}").compile()
    assert g.advance(g.start, "À".encode()[:1]) is not None  # may still become À..ÿ
    assert g.advance(g.start, "日".encode()[:1]) is None  # no character it begins is in the set
    assert g.advance(g.start, b"\xc3\x28") is None  # not UTF-8
    assert not g.complete(g.advance(g.start, "Àÿ".encode()[:3]))  # half a character: not done


@pytest.mark.parametrize("pattern,message", [
    (r"(a)\1", "groupref"), (r"(?=a)a", "assert"), (r"(?<!a)b", "assert"), (r"(?i)a", "flags"), ("(", "parse"),
    (r"(a{100}){300}", "too large"), (r"a\b", "anchor"),
])
def test_regexes_that_are_not_regular_are_value_errors(pattern: str, message: str) -> None:
    with pytest.raises(ValueError, match=message):
        StructuredOutputsParams(regex=pattern)
    with pytest.raises(ValueError, match="regex must be a string"):
        StructuredOutputsParams(regex=["a"])


def test_a_changed_field_is_compiled_again_and_consts_stay_data_in_tool_schemas() -> None:
    params = StructuredOutputsParams(json={"type": "integer"})
    assert params.compile().accepts("1")
    params.json = {"type": "string"}
    assert params.compile().accepts('"a"') and not params.compile().accepts("1")
    from server.tool_parsers import forced_tool_schema

    tool = {"type": "function", "function": {"name": "f", "parameters": {
        "type": "object", "properties": {"x": {"const": {"$ref": "#"}}}, "required": ["x"]}}}
    g = schema_grammar(forced_tool_schema([tool], None))
    assert g.accepts('[{"name":"f","parameters":{"x":{"$ref":"#"}}}]')


def test_structured_outputs_compile_once_per_distinct_request() -> None:
    schema = {"type": "object", "properties": {"a": {"type": "integer"}, "b": {"type": "string"}}}
    first = StructuredOutputsParams(json=schema).compile()
    assert StructuredOutputsParams(json=json.dumps(schema)).compile() is first
    reordered = StructuredOutputsParams(json={"type": "object", "properties": {"b": {"type": "string"},
                                                                               "a": {"type": "integer"}}}).compile()
    assert reordered is not first  # members come in the schema's order
    assert first.accepts('{"a":1,"b":"x"}') and not first.accepts('{"b":"x","a":1}')
    assert reordered.accepts('{"b":"x","a":1}') and not reordered.accepts('{"a":1,"b":"x"}')


def test_sampling_params_structured_outputs() -> None:
    params = SamplingParams(structured_outputs={"choice": ["a", "b"]})
    assert isinstance(params.structured_outputs, StructuredOutputsParams)
    assert params.structured_outputs.choice == ["a", "b"]
    assert isinstance(SamplingParams(structured_outputs={"json": '{"type": "null"}'}).structured_outputs.json, dict)
    with pytest.raises(ValueError, match="structured_outputs"):
        SamplingParams(structured_outputs={"bogus": 1})
    with pytest.raises(ValueError, match="exactly one"):
        SamplingParams(structured_outputs={})
    with pytest.raises(ValueError, match="'multipleOf'"):
        SamplingParams(structured_outputs={"json": {"type": "number", "multipleOf": 1}})
    with pytest.raises(ValueError, match="structured_outputs"):
        SamplingParams(structured_outputs="json")
    with pytest.raises(ValueError, match="ignore_eos"):
        SamplingParams(structured_outputs=StructuredOutputsParams(choice=["a"]), ignore_eos=True)
    with pytest.raises(ValueError, match="ignore_eos"):
        SamplingParams(structured_outputs={"json_object": True}, ignore_eos=True)


# ------------------------------------------------------------------ token masks
@pytest.fixture(scope="module")
def tokenizer():
    from transformers import AutoTokenizer

    from engine.default_model import default_model_path

    return AutoTokenizer.from_pretrained(default_model_path())


@pytest.fixture(scope="module")
def vocab_bytes(tokenizer) -> list[bytes | None]:
    return vocabulary_bytes(tokenizer, VOCAB_SIZE)


@pytest.fixture(scope="module")
def vocabulary(vocab_bytes: list[bytes | None]) -> TokenVocabulary:
    return TokenVocabulary(vocab_bytes)


def brute_force_mask(vocab_bytes: list[bytes | None], grammar: Grammar, state: State) -> np.ndarray:
    fresh = Grammar(grammar.root)  # its own step cache: shares nothing with the walk's
    mask = np.zeros(len(vocab_bytes), dtype=bool)
    for token_id, data in enumerate(vocab_bytes):
        mask[token_id] = bool(data) and fresh.advance(state, data) is not None
    return mask


PERSON_SCHEMA = {"type": "object", "properties": {
    "name": {"type": "string"}, "age": {"type": "integer"},
    "tags": {"type": "array", "items": {"enum": ["a", "ab", 'b"c']}}, "price": {"type": "number"}},
    "required": ["name"]}
MASK_STATES = [  # (grammar, prefix, every stack inside a free string: the masks' fast path)
    ("object", b"", False),
    ("object", b"{", False),
    ("object", b'{"ke', True),
    ("object", b'{"key": "val', True),
    ("object", b'{"k": "\xe6\x97', True),  # part of a character
    ("object", b'{"k": "v\\', False),
    ("object", b'{"k": "\\u00', False),
    ("object", b'{"k": 12', False),
    ("object", b'{"k": 1.', False),
    ("object", b'{"k": -', False),
    ("object", b'{"k": 1e', False),
    ("object", b'{"k": tr', False),
    ("object", b'{"k": [1, {"x": null}', False),
    ("object", b"{" + b" " * MAX_WHITESPACE, False),
    ("object", b'{"k": 1}', False),
    ("person", b"", False),
    ("person", b'{"', False),
    ("person", b'{"na', False),
    ("person", b'{"name": "', True),
    ("person", b'{"name": "x", ', False),
    ("person", b'{"name": "x", "tags": ["a', False),
    ("person", b'{"name": "x", "age": 3', False),
    ("choice", b"", False),
    ("choice", b"yes", False),
    ("phone", b"", False),
    ("phone", b"555-1", False),
    ("accents", b"", False),
    ("accents", b"\xc3", False),  # half a character
    ("anything", b"ab", False),
    # Pydantic's constrained fields: a name of 2 to 5 characters (its room shrinks as it grows,
    # a multi-byte character counts one), a code's pattern, a date, an integer's bounds
    ("constrained", b'{"code":"', False),
    ("constrained", b'{"code":"AB-1', False),
    ("constrained", b'{"code":"AB-123","name":"', True),
    ("constrained", b'{"code":"AB-123","name":"ab', True),
    ("constrained", b'{"code":"AB-123","name":"\xc3\xa9\xc3', False),  # inside a character: walked
    ("constrained", b'{"code":"AB-123","name":"abcd', True),
    ("constrained", b'{"code":"AB-123","name":"abcde', True),  # full: only the quote, or a character's rest
    ("constrained", b'{"code":"AB-123","name":"ab\\', False),
    ("constrained", b'{"code":"AB-123","name":"ab","qty":', False),
    ("constrained", b'{"code":"AB-123","name":"ab","qty":1', False),
    ("constrained", b'{"code":"AB-123","name":"ab","qty":12,"delta":-', False),
    ("constrained", b'{"code":"AB-123","name":"ab","qty":12,"delta":-1,"quote":"say \\"hi\\"', False),
    ("dated", b'{"when":"2024-02-2', False),
    # a bounded float's digits: past 1 only zeros, and a price above 0 after its zeros
    ("reading", b'{"confidence":', False),
    ("reading", b'{"confidence":1.', False),
    ("reading", b'{"confidence":0.5,"price":0.00', False),
    ("reading", b'{"confidence":0.5,"price":1,"kelvin_offset":-273.1', False),
]


REGEX_GRAMMARS = {"phone": r"\d{3}-\d{4}", "accents": r"[À-ÿ]+ (ok|no)", "anything": r"(?s).{0,12}!"}


def grammar_named(name: str) -> Grammar:
    if name == "object":
        return json_object_grammar()
    if name == "person":
        return StructuredOutputsParams(json=PERSON_SCHEMA).compile()
    if name in REGEX_GRAMMARS:
        return StructuredOutputsParams(regex=REGEX_GRAMMARS[name]).compile()
    if name == "constrained":
        return StructuredOutputsParams(json=Constrained.model_json_schema()).compile()
    if name == "dated":
        return StructuredOutputsParams(json=Dated.model_json_schema()).compile()
    if name == "reading":
        return StructuredOutputsParams(json=Reading.model_json_schema()).compile()
    return StructuredOutputsParams(choice=["yes", "yes please", "no", "né"]).compile()


@pytest.mark.parametrize("name,prefix,in_string", MASK_STATES, ids=[f"{n}-{p!r}" for n, p, _ in MASK_STATES])
def test_token_mask_equals_brute_force(vocabulary: TokenVocabulary, vocab_bytes: list[bytes | None], name: str,
                                       prefix: bytes, in_string: bool) -> None:
    g = grammar_named(name)
    state = g.advance(g.start, prefix)
    assert state is not None
    assert (g.plain_text_rooms(state) is not None) == in_string
    mask = vocabulary.allowed(g, state)
    expected = brute_force_mask(vocab_bytes, g, state)
    assert mask.dtype == np.bool_ and mask.shape == (VOCAB_SIZE,)
    wrong = np.flatnonzero(mask != expected)[:10]
    assert not len(wrong), [(int(t), vocab_bytes[t], bool(mask[t])) for t in wrong]
    assert not mask[[t for t, data in enumerate(vocab_bytes) if not data]].any()
    assert mask.any() or g.complete(state)


def test_token_masks_add_end_ids_only_when_complete(vocabulary: TokenVocabulary) -> None:
    masks = TokenMasks(vocabulary, max_cached=2)
    ends = (EOS, 0)
    g = json_object_grammar()
    incomplete = g.advance(g.start, b'{"a": 1')
    mask, must_end, _ = masks.get(g, incomplete, ends)
    assert isinstance(mask, torch.Tensor) and mask.dtype == torch.bool and mask.shape == (VOCAB_SIZE,)
    assert not must_end and not mask[EOS] and not mask[0]
    assert torch.equal(mask, torch.from_numpy(vocabulary.allowed(g, incomplete)))
    done = g.advance(g.start, b'{"a": 1}')
    mask, must_end, _ = masks.get(g, done, ends)
    assert must_end and mask.nonzero().flatten().tolist() == [0, EOS]
    # complete but it may go on: the end tokens join what the grammar allows
    number = StructuredOutputsParams(json={"type": "integer"}).compile()
    twelve = number.advance(number.start, b"12")
    mask, must_end, _ = masks.get(number, twelve, (EOS,))
    assert not must_end and mask[EOS]
    assert torch.equal(mask.clone().index_fill_(0, torch.tensor([EOS]), False),
                       torch.from_numpy(vocabulary.allowed(number, twelve)))
    choice = grammar_named("choice")
    mask, must_end, _ = masks.get(choice, choice.advance(choice.start, b"yes"), (EOS,))
    assert not must_end and mask[EOS] and mask.sum() > 1
    mask, must_end, _ = masks.get(choice, choice.advance(choice.start, b"yes please"), (EOS, VOCAB_SIZE + 5))
    assert must_end and mask.nonzero().flatten().tolist() == [EOS]  # an id past the vocabulary is left out
    # evicted and recomputed alike
    for _ in range(2):
        again, must_end, _ = masks.get(g, done, ends)
        assert must_end and again.nonzero().flatten().tolist() == [0, EOS]
    # a stop token id that is also the grammar's only way on: only end tokens are allowed
    x = next(t for t, data in enumerate(vocabulary.token_bytes) if data == b"x")
    mask, must_end, dead = masks.get(grammar_named("phone"), grammar_named("phone").start, (EOS,))
    assert not must_end and not dead
    only_x = StructuredOutputsParams(choice=["x"]).compile()
    mask, must_end, dead = masks.get(only_x, only_x.start, (EOS, x))
    assert must_end and not dead and mask.nonzero().flatten().tolist() == [x]  # EOS: not before "x"
    nothing = StructuredOutputsParams(regex=r"[^\s\S]").compile()
    mask, must_end, dead = masks.get(nothing, nothing.start, (EOS,))
    assert dead and not must_end and not mask.any()


def test_guide_advances_on_allowed_tokens_only(tokenizer, vocabulary: TokenVocabulary) -> None:
    masks = TokenMasks(vocabulary)
    text = '{"a": [1, "é 👋"], "b": {"c": null}}'
    ids = tokenizer.encode(text, add_special_tokens=False)
    guide = Guide(json_object_grammar(), masks, [EOS, EOS, 0])
    assert guide.end_ids == (0, EOS)
    bad = tokenizer.encode("]", add_special_tokens=False)[0]
    start = guide.state
    assert not guide.mask()[0][bad] and not guide.advance(bad) and guide.state is start
    assert not guide.advance(EOS) and not guide.ended and guide.state is start  # not complete yet
    assert not guide.advance(1) and guide.state is start  # a special token: no bytes
    assert not guide.advance(VOCAB_SIZE + 1) and guide.state is start
    for token in ids:
        allowed, must_end = guide.mask()
        assert allowed[token] and not must_end
        assert guide.advance(token)
    assert guide.grammar.complete(guide.state)
    allowed, must_end = guide.mask()
    assert must_end and allowed[EOS] and allowed[0] and allowed.sum() == 2
    brace = tokenizer.encode("}", add_special_tokens=False)[0]
    state = guide.state
    assert not guide.advance(brace) and guide.state is state
    assert guide.advance(EOS) and guide.ended
    assert not guide.advance(EOS) and not guide.advance(ids[0])


def test_mask_bits_unpack_to_the_mask_on_any_shape() -> None:
    rng = np.random.default_rng(0)
    for size in (1, 7, 8, 9, 49152, 151936 + 3):
        masks = rng.random((3, size)) < 0.3
        bits = torch.from_numpy(np.packbits(masks, axis=-1))
        for unpack in (unpack_mask, unpack_mask_by_shifts):  # the CPU's way and the GPU's
            assert torch.equal(unpack(bits, size), torch.from_numpy(masks))
            assert torch.equal(unpack(bits[0], size), torch.from_numpy(masks[0]))


def test_sampler_samples_only_allowed_tokens() -> None:
    sampler = Sampler()
    logits = torch.tensor([[5.0, 4.0, 3.0, 2.0, 1.0, 0.0]] * 3)
    allowed = torch.tensor([False, False, True, False, True, False])
    only_end = torch.tensor([False, True, False, False, False, False])

    def make(params: SamplingParams, mask: torch.Tensor | None, must_end: bool = False) -> SamplingRow:
        bits = None if mask is None else torch.from_numpy(np.packbits(mask.numpy()))  # as TokenMasks keeps them
        return SamplingRow(params=params, token_ids=[7, 8], num_prompt_tokens=2, generator=None, eos_token_ids=[1],
                           allowed_tokens=bits, must_end=must_end)

    greedy = SamplingParams(temperature=0.0, logprobs=2)
    out = sampler(logits, [make(greedy, allowed), make(greedy, None), make(SamplingParams(logprobs=2), allowed)])
    assert out.token_ids[0] == 2 and out.token_ids[1] == 0 and out.token_ids[2] in (2, 4)
    assert math.isfinite(out.logprobs[0]) and math.isfinite(out.logprobs[2])
    # logprobs after the mask, as vLLM's: the allowed tokens' probabilities sum to 1
    top = dict(out.top_logprobs[0])
    assert set(top) == {2, 4} and math.isclose(sum(math.exp(v) for v in top.values()), 1.0, rel_tol=1e-5)
    # min_tokens yields where only an end token is allowed, and holds EOS back elsewhere
    waiting = SamplingParams(temperature=0.0, min_tokens=5)
    out = sampler(logits[:2], [make(waiting, only_end, must_end=True), make(waiting, only_end | allowed)])
    assert out.token_ids == [1, 2]
    # a logit bias does not lift a token the grammar refuses
    biased = SamplingParams(temperature=0.0, logit_bias={0: 100.0, 3: 100.0})
    assert sampler(logits[:1], [make(biased, allowed)]).token_ids == [2]
    seeded = SamplingParams(temperature=1.0, seed=3)
    for seed in range(20):
        row = make(seeded, allowed)
        row.generator = torch.Generator().manual_seed(seed)
        assert sampler(logits[:1], [row]).token_ids[0] in (2, 4)


# ------------------------------------------------------------------ token bytes
@pytest.mark.parametrize("text", [
    "héllo wörld, ça va?",
    "👋🏽 emoji 🇫🇷 and 日本語のテキスト",
    '{"name": "Zoë", "city": "São Paulo", "note": "naïve — “quoted”"}',
    " leading space\n\ttabs\r\n and\u00a0nbsp",
])
def test_vocabulary_bytes_join_to_the_texts_utf8(tokenizer, vocab_bytes: list[bytes | None], text: str) -> None:
    ids = tokenizer.encode(text, add_special_tokens=False)
    assert b"".join(vocab_bytes[i] for i in ids) == text.encode()


def test_vocabulary_bytes_hold_parts_of_characters_and_no_special_tokens(tokenizer,
                                                                         vocab_bytes: list[bytes | None]) -> None:
    ids = tokenizer.encode("👋🏽 日本語", add_special_tokens=False)
    partial = [vocab_bytes[i] for i in ids if "\ufffd" in tokenizer.decode([i])]
    assert partial and all(data and b"\xef\xbf\xbd" not in data for data in partial)
    special = set(tokenizer.all_special_ids) | {i for i, t in tokenizer.added_tokens_decoder.items() if t.special}
    assert {EOS, 0, 1} <= special
    assert all(vocab_bytes[i] is None for i in special)
    assert all(data for i, data in enumerate(vocab_bytes) if i not in special)
    assert len(vocab_bytes) == VOCAB_SIZE
    wider = vocabulary_bytes(tokenizer, len(tokenizer) + 3)
    assert wider[-3:] == [None, None, None] and wider[:len(tokenizer)] == vocab_bytes[:len(tokenizer)]
    assert vocabulary_bytes(tokenizer, 100) == vocab_bytes[:100]
