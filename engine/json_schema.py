"""A JSON schema as a grammar (`engine/grammar.py`): the answers that are JSON documents valid
against it, as OpenAI's `response_format: json_schema` and vLLM's `structured_outputs.json`.

What a grammar can hold is supported: `type` (one or a list), `properties`, `required`,
`additionalProperties`, `items`, `minItems`, `maxItems`, `enum`, `const`, `anyOf` / `oneOf`
(read as anyOf), `$ref` to `#`, `#/$defs/...` or `#/definitions/...` (recursive ones too), and
as Pydantic's constrained fields write them (`Field(max_length=..., pattern=..., ge=...)`):
a string's `minLength`, `maxLength` or `pattern` (matched whole, as xgrammar does: any text it
allows matches the unanchored pattern too), and an integer's or a number's `minimum`, `maximum`,
`exclusiveMinimum`, `exclusiveMaximum` (a bounded number is written without an exponent: every
decimal within its bounds, and only those); a string's `format` date-time, date, time, uuid,
email or ipv4 (FORMAT_PATTERNS, where it has no pattern or length). Annotations (`title`,
`description`, `default`, other formats, ...) are read past. Any other keyword (`multipleOf`,
`allOf`, a pattern beside a length, ...) is a ValueError that names it: silently ignoring a constraint
would hand back answers the schema forbids. `enum` and `const` keep the values of the schema's
`type`; other keywords beside them are refused.

As xgrammar's strict mode (what vLLM uses): an object with `properties` and no
`additionalProperties` takes no other members; members come in the order listed.
"""

from __future__ import annotations

import json
import math
from decimal import Decimal
from typing import Any

from engine.grammar import (
    MAX_STACKS,
    Alternatives,
    BoundedJsonString,
    Grammar,
    JsonArray,
    JsonDocument,
    JsonNumber,
    JsonObject,
    JsonString,
    Literals,
    Rule,
    json_literals,
    json_value,
    trim,
)
from engine.regex import JsonStringPattern, RegexRule

# Read past: they do not constrain the value (`format` is an annotation in JSON Schema 2020-12
# unless a validator opts in, and `discriminator` is OpenAPI's hint beside a oneOf).
ANNOTATIONS = frozenset({"title", "description", "default", "examples", "$schema", "$id", "$comment",
                         "deprecated", "readOnly", "writeOnly", "$defs", "definitions", "strict", "format",
                         "discriminator"})
_OBJECT_KEYWORDS = frozenset({"properties", "required", "additionalProperties"})
_ARRAY_KEYWORDS = frozenset({"items", "minItems", "maxItems"})
_STRING_KEYWORDS = frozenset({"minLength", "maxLength", "pattern"})
_BOUND_KEYWORDS = frozenset({"minimum", "maximum", "exclusiveMinimum", "exclusiveMaximum"})
_COMBINATIONS = frozenset({"anyOf", "oneOf"})
SUPPORTED = (ANNOTATIONS | _OBJECT_KEYWORDS | _ARRAY_KEYWORDS | _STRING_KEYWORDS | _BOUND_KEYWORDS | _COMBINATIONS
             | {"type", "enum", "const", "$ref"})
# Schemas nested in one another (through $ref too): deeper ones are refused, well before
# Python's recursion limit and the grammar's MAX_DEPTH (a level opens at most two rules).
MAX_SCHEMA_DEPTH = 64
# A union's options: each may stay open side by side (MAX_STACKS), so wider ones are refused.
MAX_OPTIONS = 128
TYPES = ("object", "array", "string", "number", "integer", "boolean", "null")
# An integer's or a number's bounds are written as a digit-range regex: larger ones are refused,
# not unrolled, and so are a number's bounds with more fractional digits.
MAX_INTEGER_BOUND = 10**30
MAX_FRACTION_DIGITS = 30


def schema_grammar(schema: Any) -> Grammar:
    """The grammar of JSON documents valid against `schema`; ValueError for a schema that is
    not one or uses what is not supported."""
    compiler = _Compiler(schema)
    root = JsonDocument(compiler.rule(schema, "#"))
    compiler.check_refs()
    if not trim(root):
        raise ValueError("no JSON value satisfies the schema (where a value is needed: a false schema, an enum or "
                         "const with no value of its type, or a $ref required within itself, where each value "
                         "would nest forever)")
    grammar = Grammar(root)
    if not any(grammar.step(grammar.start, byte) for byte in b'{["-0123456789tfn'):
        raise ValueError(f"the schema's unions are too many to follow at once (more than {MAX_STACKS} ways to read "
                         "its first byte)")
    return grammar


class _Compiler:
    def __init__(self, root: Any) -> None:
        self.root = root
        self.refs: dict[str, Alternatives] = {}
        self.ref_levels: dict[str, int] = {}  # each resolved $ref's levels
        self.compiled: dict[str, tuple[Rule, int]] = {}  # a sub-schema's JSON → its rule, its levels
        self.depth = 0
        self.deepest = 0  # the deepest level reached in the sub-schema being compiled
        self.last_levels = 0  # the levels of the rule `rule` returned last

    def check_refs(self) -> None:
        """A $ref that can reach itself before any byte is read (`{"$ref": "#"}`, or through
        anyOf) would push itself forever: refused."""
        for ref, rule in self.refs.items():
            seen, todo = set(), list(rule.options)
            while todo:
                option = todo.pop()
                if option is rule:
                    raise ValueError(f"$ref {ref!r} refers to itself before any value begins: no JSON is valid")
                if isinstance(option, Alternatives) and id(option) not in seen:
                    seen.add(id(option))
                    todo.extend(option.options)

    def rule(self, schema: Any, path: str) -> Rule:
        """The schema's rule, one per distinct sub-schema (repeats, as anyOf of the same shapes,
        share their stacks); a reused one still counts its levels (`_levels`)."""
        if self.depth >= MAX_SCHEMA_DEPTH:
            raise ValueError(f"the JSON schema nests deeper than {MAX_SCHEMA_DEPTH} levels, $refs followed "
                             f"(at {path[:200]})")
        try:
            key = json.dumps(schema)
        except (TypeError, ValueError):
            key = None
        if key is not None and key in self.compiled:
            rule, levels = self.compiled[key]
            self._levels(levels, path)
            return rule
        outer, self.deepest = self.deepest, self.depth
        self.depth += 1
        try:
            rule = self._rule(schema, path)
            self.deepest = max(self.deepest, self.depth)
        finally:
            self.depth -= 1
        self.last_levels = self.deepest - self.depth
        self.deepest = max(outer, self.deepest)
        if key is not None:
            self.compiled[key] = rule, self.last_levels
        return rule

    def _levels(self, levels: int, path: str) -> None:
        """A rule compiled before, `levels` deep, used again here."""
        if self.depth + levels > MAX_SCHEMA_DEPTH:
            raise ValueError(f"the JSON schema nests deeper than {MAX_SCHEMA_DEPTH} levels, $refs followed "
                             f"(at {path[:200]})")
        self.deepest = max(self.deepest, self.depth + levels)
        self.last_levels = levels

    def _rule(self, schema: Any, path: str) -> Rule:
        if schema is True or schema == {}:
            return json_value()
        if schema is False:  # no value: `trim` leaves out the ways through it
            return Literals(())
        if not isinstance(schema, dict):
            raise ValueError(f"a JSON schema must be an object or a boolean, got {schema!r:.80} at {path}")
        unknown = sorted(set(schema) - SUPPORTED)
        if unknown:
            raise ValueError(f"JSON schema keyword {unknown[0]!r} (at {path}) is not supported; structured outputs "
                             f"support {', '.join(sorted(SUPPORTED - ANNOTATIONS))}")
        given = set(schema) - ANNOTATIONS
        if "$ref" in schema:
            if given != {"$ref"}:
                raise ValueError(f"$ref beside other keywords (at {path}) is not supported")
            return self._ref(schema["$ref"], path)
        if "const" in schema or "enum" in schema:
            return self._values(schema, given, path)
        combined = given & _COMBINATIONS
        if combined:
            if len(given) > 1:
                raise ValueError(f"{sorted(given)[0]} beside {sorted(combined)[0]} (at {path}) is not supported: "
                                 "put the shared keywords in each option")
            key = combined.pop()
            options = schema[key]
            if not isinstance(options, list) or not options:
                raise ValueError(f"{key} (at {path}) must be a non-empty list of schemas")
            if len(options) > MAX_OPTIONS:
                raise ValueError(f"{key} (at {path}) has {len(options)} options; at most {MAX_OPTIONS} are supported")
            return Alternatives(self.rule(option, f"{path}/{key}/{i}") for i, option in enumerate(options))
        kind = schema.get("type")
        if kind is None:
            if given & (_STRING_KEYWORDS | _BOUND_KEYWORDS):
                raise ValueError(f"{sorted(given & (_STRING_KEYWORDS | _BOUND_KEYWORDS))[0]!r} without a type (at "
                                 f"{path}) is not supported: say which type it bounds (\"type\": \"string\", "
                                 "\"integer\" or \"number\")")
            kind = "object" if given & _OBJECT_KEYWORDS else "array" if given & _ARRAY_KEYWORDS else None
            if kind is None:
                return json_value()
        if isinstance(kind, list):
            if not kind:
                raise ValueError(f"type (at {path}) must not be an empty list")
            return Alternatives(self._typed(schema, k, path) for k in kind)
        return self._typed(schema, kind, path)

    @staticmethod
    def _values(schema: dict[str, Any], given: set[str], path: str) -> Rule:
        """const / enum: the values, those of the schema's `type` (no other keyword beside)."""
        others = sorted(given - {"const", "enum", "type"})
        if others:
            raise ValueError(f"{others[0]} beside enum or const (at {path}) is not supported: list only the values "
                             "that satisfy it")
        if "const" in schema and "enum" in schema:
            raise ValueError(f"enum beside const (at {path}) is not supported: give one")
        values = schema["enum"] if "enum" in schema else [schema["const"]]
        if not isinstance(values, list) or not values:
            raise ValueError(f"enum (at {path}) must be a non-empty list")
        kinds = schema.get("type", list(TYPES))
        kinds = kinds if isinstance(kinds, list) else [kinds]
        # None of its type: no value, as a false schema (`trim` leaves the ways through it out).
        values = [v for v in values if any(_is_type(v, kind) for kind in kinds)]
        try:
            return json_literals(values)
        except ValueError:
            raise ValueError(f"enum and const values (at {path}) must be JSON: NaN and infinities are not") from None

    def _typed(self, schema: dict[str, Any], kind: Any, path: str) -> Rule:
        if kind not in TYPES:
            raise ValueError(f"type (at {path}) must be one of {', '.join(TYPES)}, got {kind!r:.40}")
        if kind == "object":
            return self._object(schema, path)
        if kind == "array":
            return self._array(schema, path)
        if kind == "string":
            return _string(schema, path)
        if kind == "integer":
            return _integer(schema, path)
        if kind == "number":
            return _number(schema, path)
        if kind == "boolean":
            return Literals([b"true", b"false"])
        return Literals([b"null"])

    def _object(self, schema: dict[str, Any], path: str) -> Rule:
        properties = schema.get("properties", {})
        required = schema.get("required", [])
        if not isinstance(properties, dict):
            raise ValueError(f"properties (at {path}) must be an object")
        if not isinstance(required, list) or not all(isinstance(name, str) for name in required):
            raise ValueError(f"required (at {path}) must be a list of property names")
        missing = [name for name in required if name not in properties]
        if missing:
            raise ValueError(f"required property {missing[0]!r} (at {path}) is not in properties")
        additional = schema.get("additionalProperties", "properties" not in schema)
        if additional is False:
            extra = None
        elif additional is True:
            extra = json_value()
        else:
            extra = self.rule(additional, f"{path}/additionalProperties")
        members = [(name, self.rule(sub, f"{path}/properties/{name}"), name in required)
                   for name, sub in properties.items()]
        return JsonObject(members, extra)

    def _array(self, schema: dict[str, Any], path: str) -> Rule:
        low, high = _count_bounds(schema, "minItems", "maxItems", "array", path)
        items = self.rule(schema.get("items", True), f"{path}/items")
        return JsonArray(items, low, high)  # `items: false`: `trim` leaves only []

    def _ref(self, ref: Any, path: str) -> Rule:
        if not isinstance(ref, str) or not ref.startswith("#"):
            raise ValueError(f"$ref {ref!r:.80} (at {path}) is not supported: only references inside the schema "
                             "(#, #/$defs/..., #/definitions/...)")
        rule = self.refs.get(ref)
        if rule is not None:  # its levels are not known yet while it is being compiled (recursion)
            self._levels(self.ref_levels.get(ref, 0), path)
            return rule
        target: Any = self.root
        for part in filter(None, ref[1:].split("/")):
            part = part.replace("~1", "/").replace("~0", "~")
            if not isinstance(target, dict) or part not in target:
                raise ValueError(f"$ref {ref!r} (at {path}) points at nothing in the schema")
            target = target[part]
        # A placeholder first: a recursive reference to it resolves to the same rule.
        rule = self.refs[ref] = Alternatives()
        rule.set_options([self.rule(target, ref)])
        self.ref_levels[ref] = self.last_levels
        return rule


# `format`s a string is held to where it has no pattern or length of its own (as xgrammar holds
# them; Pydantic writes them for datetime, date, time, UUID and EmailStr fields), each in the
# strict form RFC 3339 and its RFCs give, which every validator takes (the Gregorian calendar's
# days, leap years included; no leap second; at most microseconds); any other format is read
# past, an annotation, as JSON Schema 2020-12 has it by default.
_OFFSET = "(?:Z|[+-](?:[01][0-9]|2[0-3]):[0-5][0-9])"
_TIME = f"(?:[01][0-9]|2[0-3]):[0-5][0-9]:[0-5][0-9](?:\\.[0-9]{{1,6}})?{_OFFSET}"
_YEAR = "(?:[1-9][0-9]{3}|0[1-9][0-9]{2}|00[1-9][0-9]|000[1-9])"  # 0001-9999, as Python's dates
_LEAP_YEAR = "(?:[0-9]{2}(?:0[48]|[2468][048]|[13579][26])|(?:0[48]|[2468][048]|[13579][26])00)"
_DATE = (f"(?:{_YEAR}-(?:0[1-9]|1[0-2])-(?:0[1-9]|1[0-9]|2[0-8])|{_YEAR}-(?:0[13-9]|1[0-2])-(?:29|30)"
         f"|{_YEAR}-(?:0[13578]|1[02])-31|{_LEAP_YEAR}-02-29)")
_HEX = "[0-9a-fA-F]"
FORMAT_PATTERNS = {
    "date-time": f"{_DATE}T{_TIME}",
    "date": _DATE,
    "time": _TIME,
    "uuid": f"{_HEX}{{8}}-{_HEX}{{4}}-{_HEX}{{4}}-{_HEX}{{4}}-{_HEX}{{12}}",
    "email": "[A-Za-z0-9._%+-]{1,64}@[A-Za-z0-9](?:[A-Za-z0-9-]{0,61}[A-Za-z0-9])?"
             "(?:\\.[A-Za-z0-9](?:[A-Za-z0-9-]{0,61}[A-Za-z0-9])?)+",
    "ipv4": "(?:(?:25[0-5]|2[0-4][0-9]|1[0-9]{2}|[1-9]?[0-9])\\.){3}(?:25[0-5]|2[0-4][0-9]|1[0-9]{2}|[1-9]?[0-9])",
}


def _string(schema: dict[str, Any], path: str) -> Rule:
    """A string, of its length bounds or whole matches of its pattern (both: refused), or else
    of its format where it is one of FORMAT_PATTERNS."""
    low, high = _count_bounds(schema, "minLength", "maxLength", "string", path)
    pattern = schema.get("pattern")
    if pattern is None and not set(schema) & {"minLength", "maxLength"}:
        pattern = FORMAT_PATTERNS.get(schema.get("format"))
    if pattern is not None:
        if not isinstance(pattern, str):
            raise ValueError(f"pattern (at {path}) must be a string")
        if "minLength" in schema or "maxLength" in schema:
            raise ValueError(f"'pattern' beside minLength or maxLength (at {path}) is not supported: bound the "
                             "length in the pattern ({m,n})")
        try:
            return JsonStringPattern(pattern)
        except ValueError as exc:
            raise ValueError(f"pattern (at {path}): {exc}") from None
    if low or high is not None:
        return BoundedJsonString(low, high)
    return JsonString()


def _count_bounds(schema: dict[str, Any], low_name: str, high_name: str, what: str,
                  path: str) -> tuple[int, int | None]:
    """An array's item count or a string's length bounds (minItems/maxItems, minLength/maxLength):
    integers >= 0, the maximum (None: none) not below the minimum."""
    low, high = schema.get(low_name, 0), schema.get(high_name)
    for name, value in ((low_name, low), (high_name, high)):
        if value is not None and (not isinstance(value, int) or isinstance(value, bool) or value < 0):
            raise ValueError(f"{name} (at {path}) must be an integer >= 0")
    if high is not None and high < low:
        raise ValueError(f"{high_name} ({high}) < {low_name} ({low}) at {path}: no {what} is valid")
    return low, high


def _bounds(schema: dict[str, Any], path: str) -> list[tuple[str, Any]]:
    """The schema's bounds, (keyword, value), each checked to be a number a regex can hold."""
    bounds = []
    for name in sorted(set(schema) & _BOUND_KEYWORDS):
        value = schema[name]
        if isinstance(value, bool):
            raise ValueError(f"{name} (at {path}) must be a number: JSON Schema draft 4's boolean form is not "
                             "supported (give the bound itself)")
        if not isinstance(value, (int, float)) or value != value or abs(value) > MAX_INTEGER_BOUND:
            raise ValueError(f"{name} (at {path}) must be a number of at most {MAX_INTEGER_BOUND:.0e} in magnitude")
        bounds.append((name, value))
    return bounds


def _integer(schema: dict[str, Any], path: str) -> Rule:
    """An integer, within its bounds (inclusive or exclusive) where it has any."""
    low = high = None
    for name, value in _bounds(schema, path):
        if name == "minimum":
            bound = math.ceil(value)
        elif name == "exclusiveMinimum":
            bound = math.floor(value) + 1
        elif name == "maximum":
            bound = math.floor(value)
        else:
            bound = math.ceil(value) - 1
        if name.endswith("inimum"):
            low = bound if low is None else max(low, bound)
        else:
            high = bound if high is None else min(high, bound)
    if low is None and high is None:
        return JsonNumber(integer=True)
    if low is not None and high is not None and low > high:
        return Literals(())  # no integer: `trim` leaves out the ways through it
    return RegexRule(integer_range_pattern(low, high))


def _number(schema: dict[str, Any], path: str) -> Rule:
    """A number, within its bounds (inclusive or exclusive) where it has any: then written as a
    decimal, without an exponent."""
    low: tuple[Decimal, bool] | None = None  # (bound, exclusive)
    high: tuple[Decimal, bool] | None = None
    for name, value in _bounds(schema, path):
        bound = Decimal(repr(value)) if isinstance(value, float) else Decimal(value)
        if -bound.as_tuple().exponent > MAX_FRACTION_DIGITS:
            raise ValueError(f"{name} (at {path}) must have at most {MAX_FRACTION_DIGITS} digits after the point")
        exclusive = name.startswith("exclusive")
        if name.endswith("inimum"):  # the tighter: the larger, and of equals the exclusive
            low = max(low, (bound, exclusive)) if low is not None else (bound, exclusive)
        else:  # the smaller, and of equals the exclusive
            high = min(high, (bound, not exclusive)) if high is not None else (bound, not exclusive)
    if low is None and high is None:
        return JsonNumber()
    pattern = number_range_pattern(low, None if high is None else (high[0], not high[1]))
    return Literals(()) if pattern is None else RegexRule(pattern)


def number_range_pattern(low: tuple[Decimal, bool] | None, high: tuple[Decimal, bool] | None) -> str | None:
    """A regex of the decimal numbers (JSON's form without an exponent; no -0) within `low` and
    `high`, each (bound, exclusive) or None (unbounded); None where no number is."""
    if low is not None and high is not None and (low[0] > high[0] or low[0] == high[0] and (low[1] or high[1])):
        return None
    parts = []
    if high is None or high[0] > 0 or high[0] == 0 and not high[1]:  # x >= 0
        start = low if low is not None and low[0] >= 0 else (Decimal(0), False)
        parts += _decimals(start, high)
    if low is None or low[0] < 0:  # x = -y, y > 0
        # copy_negate: exact, where unary minus rounds to the context's 28 digits
        y_low = (high[0].copy_negate(), high[1]) if high is not None and high[0] < 0 else (Decimal(0), True)
        y_high = None if low is None else (low[0].copy_negate(), low[1])
        negative = _decimals(y_low, y_high)
        if negative:
            parts.append(f"-(?:{'|'.join(negative)})")
    return "|".join(parts) or None


def _decimals(low: tuple[Decimal, bool], high: tuple[Decimal, bool] | None) -> list[str]:
    """Regex alternatives of the decimals x >= 0 within `low` (at least 0) and `high`."""
    whole, a = _split(low[0])
    if high is None:
        return [p for p in (_with_fraction(whole, _fractions(a, low[1], None, False)),
                            f"(?:{_naturals(whole + 1, None)})(?:\\.[0-9]+)?") if p]
    top, b = _split(high[0])
    if whole == top:
        return [p for p in (_with_fraction(whole, _fractions(a, low[1], b, high[1])),) if p]
    parts = [_with_fraction(whole, _fractions(a, low[1], None, False))]
    if whole + 1 <= top - 1:
        parts.append(f"(?:{_naturals(whole + 1, top - 1)})(?:\\.[0-9]+)?")
    parts.append(_with_fraction(top, _fractions("", False, b, high[1])))
    return [p for p in parts if p]


def _split(value: Decimal) -> tuple[int, str]:
    """A decimal >= 0 as its whole part and its fraction's digits (no trailing zeros)."""
    whole, _, fraction = format(value, "f").partition(".")
    return int(whole), fraction.rstrip("0")


def _with_fraction(whole: int, fractions: tuple[bool, list[str]]) -> str | None:
    """`whole` followed by the fractions (`_fractions`): none, or a point and digits."""
    bare, digits = fractions
    if not digits:
        return str(whole) if bare else None
    return f"{whole}(?:\\.(?:{'|'.join(digits)})){'?' if bare else ''}"


def _fractions(a: str, a_open: bool, b: str | None, b_open: bool) -> tuple[bool, list[str]]:
    """The digit strings D with 0.a < 0.D < 0.b (<= where not open; b None: no upper bound):
    whether the empty one (0) is among them, and regex alternatives of the others. Digits are
    compared as written, the shorter padded with zeros."""
    a_zero, b_zero = not a.strip("0"), b is not None and not b.strip("0")
    if b_zero:  # at most 0: zeros, if 0 is in
        return (True, ["0+"]) if a_zero and not a_open and not b_open else (False, [])
    bare = a_zero and not a_open
    if a_zero and b is None:
        return bare, ["0*[1-9][0-9]*" if a_open else "[0-9]+"]
    first, last = int(a[0]) if a else 0, int(b[0]) if b is not None else 10
    digits = []
    if first == last:  # b is not None
        digits += _prefixed(a[0] if a else "0", _fractions(a[1:], a_open, b[1:], b_open))
    else:
        digits += _prefixed(str(first), _fractions(a[1:], a_open, None, False))
        if first + 1 <= min(last - 1, 9):
            middle = str(first + 1) if first + 1 == min(last - 1, 9) else f"[{first + 1}-{min(last - 1, 9)}]"
            digits.append(middle + "[0-9]*")
        if last <= 9:
            digits += _prefixed(str(last), _fractions("", False, b[1:], b_open))
    return bare, digits


def _prefixed(digit: str, fractions: tuple[bool, list[str]]) -> list[str]:
    bare, rest = fractions
    if not rest:
        return [digit] if bare else []
    return [f"{digit}(?:{'|'.join(rest)}){'?' if bare else ''}"]


def integer_range_pattern(low: int | None, high: int | None) -> str:
    """A regex of the integers in [low, high] (None: unbounded) as JSON writes them."""
    if low is not None and low >= 0:
        return _naturals(low, high)
    if high is not None and high < 0:
        return f"-(?:{_naturals(-high, None if low is None else -low)})"
    return f"-(?:{_naturals(1, None if low is None else -low)})|{_naturals(0, high)}"


def _naturals(low: int, high: int | None) -> str:
    """A regex of the integers in [low, high] (None: unbounded), 0 <= low <= high."""
    parts = []
    top = len(str(low)) if high is None else len(str(high))
    for digits in range(len(str(low)), top + 1):
        a = max(low, 10 ** (digits - 1) if digits > 1 else 0)
        b = 10**digits - 1 if high is None else min(high, 10**digits - 1)
        if a <= b:
            parts += _same_length(str(a), str(b))
    if high is None:  # and every longer one
        parts.append(f"[1-9][0-9]{{{top},}}")
    return "|".join(parts)


def _same_length(a: str, b: str) -> list[str]:
    """Regex alternatives of the numbers from a to b, both of the same number of digits."""
    if not a:
        return [""]
    if a[0] == b[0]:
        return [a[0] + rest for rest in _same_length(a[1:], b[1:])]
    tail = len(a) - 1
    out, first, last = [], int(a[0]), int(b[0])
    if a[1:] != "0" * tail:  # a's own first digit, from a's rest up
        out += [a[0] + rest for rest in _same_length(a[1:], "9" * tail)]
        first += 1
    whole_last = b[1:] == "9" * tail
    if not whole_last:
        last -= 1
    if first <= last:
        out.append((str(first) if first == last else f"[{first}-{last}]") + "[0-9]" * tail)
    if not whole_last:  # b's own first digit, up to b's rest
        out += [b[0] + rest for rest in _same_length("0" * tail, b[1:])]
    return out


def _is_type(value: Any, kind: str) -> bool:
    """JSON Schema's type test of a Python value read from JSON."""
    if kind == "integer":
        return isinstance(value, int) and not isinstance(value, bool) or isinstance(value, float) and value.is_integer()
    if kind == "number":
        return isinstance(value, (int, float)) and not isinstance(value, bool)
    python = {"string": str, "boolean": bool, "null": type(None), "object": dict, "array": list}.get(kind)
    return python is not None and isinstance(value, python)
