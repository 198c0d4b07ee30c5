"""server/tool_parsers.py: the calls vLLM's hermes, llama3_json, mistral, pythonic and
qwen3_coder parsers find, the content around them, and a stream cut anywhere giving what the
whole text gives."""

from __future__ import annotations

import json
import random
import re

import pytest

from server.tool_parsers import ToolCallParser, forced_tool_schema


# The request's tools, which type qwen3_coder's values.
TOOLS = [{"type": "function", "function": {"name": "w", "parameters": {"type": "object", "properties": {
    "city": {"type": "string"}, "days": {"type": "integer"}, "temp": {"type": "number"}, "ok": {"type": "boolean"},
    "opts": {"type": "object"}, "tags": {"type": "array"}, "code": {"type": "string"},
    "maybe": {"type": ["integer", "null"]}, "any": {}}}}}]


def calls_of(result: tuple[str | None, list[dict]]) -> tuple[str | None, list[tuple[int, str, object]]]:
    content, calls = result
    for call in calls:
        assert call["type"] == "function" and re.fullmatch("call_[0-9a-f]{24}", call["id"])
    return content, [(c["index"], c["function"]["name"], json.loads(c["function"]["arguments"])) for c in calls]


CASES = [
    ("hermes", "Just text, no < tool call.", ("Just text, no < tool call.", [])),
    ("hermes", '<tool_call>\n{"name": "weather", "arguments": {"city": "Paris"}}\n</tool_call>',
     (None, [(0, "weather", {"city": "Paris"})])),
    ("hermes", 'Let me look.\n<tool_call>{"name": "a", "arguments": {"x": 1}}</tool_call>\n'
               '<tool_call>{"name": "b", "arguments": "{\\"y\\": 2}"}</tool_call>\n',
     ("Let me look.\n", [(0, "a", {"x": 1}), (1, "b", {"y": 2})])),  # arguments given as a JSON string
    ("hermes", '<tool_call>{"name": "a", "arguments": {"x": [1, 2]}}',  # cut by max_tokens: whole JSON counts
     (None, [(0, "a", {"x": [1, 2]})])),
    ("hermes", '<tool_call>{"name": "a", "arguments": {"x": [1, ',  # not whole: text
     ('<tool_call>{"name": "a", "arguments": {"x": [1, ', [])),
    ("hermes", "<tool_call>not JSON</tool_call> and more", ("<tool_call>not JSON</tool_call> and more", [])),
    ("hermes", '<tool_call>{"arguments": {}}</tool_call>', ('<tool_call>{"arguments": {}}</tool_call>', [])),
    ("hermes", 'x <tool_call>{"name": "a", "arguments": {}}</tool_call> then words',
     ("x  then words", [(0, "a", {})])),
    ("hermes", "ends with the start of <tool_", ("ends with the start of <tool_", [])),
    ("llama3_json", '{"name": "weather", "parameters": {"city": "Paris"}}', (None, [(0, "weather", {"city": "Paris"})])),
    ("llama3_json", '<|python_tag|>{"name": "a", "parameters": {"x": 1}}; {"name": "b", "parameters": {}}',
     (None, [(0, "a", {"x": 1}), (1, "b", {})])),
    ("llama3_json", "It is 4 {degrees}.", ("It is 4 {degrees}.", [])),
    ("llama3_json", '{"not": "a call"}', ('{"not": "a call"}', [])),
    ("llama3_json", '{"name": "a", "parameters": {"x": 1}}; oops', ("oops", [(0, "a", {"x": 1})])),
    ("llama3_json", "", ("", [])),
    # found by review: whitespace alike whole and streamed; vLLM's keys; arguments made JSON
    ("hermes", '\n\n<tool_call>{"name": "f", "arguments": {}}</tool_call>', ("\n\n", [(0, "f", {})])),
    ("hermes", 'Hi<tool_call>{"name": "f", "arguments": {}}</tool_call>\n\n<3 love', ("Hi\n\n<3 love", [(0, "f", {})])),
    ("hermes", 'A<tool_call>{"name": "f", "arguments": {}}</tool_call> x\n<tool_call>{"name": "g", "arguments": {}}'
               '</tool_call>\n', ("A x\n", [(0, "f", {}), (1, "g", {})])),
    ("hermes", '<tool_call>{"name": "f", "arguments": {}}</tool_call> Bye  ', (" Bye  ", [(0, "f", {})])),
    ("hermes", '<tool_call>{"name": "w", "arguments": "Paris"}</tool_call>', (None, [(0, "w", "Paris")])),
    ("hermes", '<tool_call>{"name": "w", "arguments": {"q": "a } { \\" é"}}</tool_call>',
     (None, [(0, "w", {"q": 'a } { " é'})])),
    ("llama3_json", '{"name": "Alice", "age": 30}', ('{"name": "Alice", "age": 30}', [])),
    ("llama3_json", "  {Note} prose", ("  {Note} prose", [])),
    ("llama3_json", '<|python_tag|><|python_tag|>hi', ('<|python_tag|><|python_tag|>hi', [])),
    # mistral: v0.3's JSON array, v11's name[ARGS]{...}, content before and after
    ("mistral", "Use [brackets] and [TOOL", ("Use [brackets] and [TOOL", [])),
    ("mistral", 'Sure. [TOOL_CALLS] [{"name": "w", "arguments": {"city": "Paris"}}, {"name": "x", "arguments": {}}]',
     ("Sure. ", [(0, "w", {"city": "Paris"}), (1, "x", {})])),
    ("mistral", '[TOOL_CALLS]w[ARGS]{"city": "Paris"}[TOOL_CALLS]x[CALL_ID]a1B2c3D4e[ARGS]{}',
     (None, [(0, "w", {"city": "Paris"}), (1, "x", {})])),
    ("mistral", '[TOOL_CALLS]w{"a": [1, "}]"]}', (None, [(0, "w", {"a": [1, "}]"]})])),
    ("mistral", '[TOOL_CALLS]{"name": "w", "arguments": {}}\n', (None, [(0, "w", {})])),
    ("mistral", '[TOOL_CALLS][{"name": "w", "arguments": {"a": 1}}] Done.', (" Done.", [(0, "w", {"a": 1})])),
    ("mistral", "[TOOL_CALLS] not json", ("[TOOL_CALLS] not json", [])),
    ("mistral", '[TOOL_CALLS][{"name": "w", "arguments": {"a": 1', ('[TOOL_CALLS][{"name": "w", "arguments": {"a": 1', [])),
    ("mistral", '[TOOL_CALLS][{"name": "w"}]', ('[TOOL_CALLS][{"name": "w"}]', [])),
    ("mistral", "[TOOL_CALLS]w", ("[TOOL_CALLS]w", [])),
    ("mistral", "[TOOL_CALLS]w[ARGS]", ("[TOOL_CALLS]w[ARGS]", [])),
    ("mistral", "[TOOL_CALLS]w[ARGS][1]", ("[TOOL_CALLS]w[ARGS][1]", [])),
    ("mistral", "[TOOL_CALLS][] and [TOOL_CALLS]w[ARGS]{}", ("[TOOL_CALLS][] and ", [(0, "w", {})])),
    # pythonic: a list of calls with keyword literals, or text
    ("pythonic", '[get_weather(city="Paris", days=-3), now()]',
     (None, [(0, "get_weather", {"city": "Paris", "days": -3}), (1, "now", {})])),
    ("pythonic", '  [f(opts={"a": [1, None, True]}, t=(1, 2))]',
     (None, [(0, "f", {"opts": {"a": [1, None, True]}, "t": [1, 2]})])),
    ("pythonic", '<|python_start|>[f(a="x)]")]<|python_end|>', (None, [(0, "f", {"a": "x)]"})])),
    ("pythonic", r"""[f(s='it\'s', t='''a
)b''')]""", (None, [(0, "f", {"s": "it's", "t": "a\n)b"})])),
    ("pythonic", "[f(a=1)] Done", ("Done", [(0, "f", {"a": 1})])),
    ("pythonic", "[f(a=1), g(b=2)", (None, [(0, "f", {"a": 1}), (1, "g", {"b": 2})])),  # cut: whole calls count
    ("pythonic", "[f(a=1), g(b=)] tail", ("g(b=)] tail", [(0, "f", {"a": 1})])),
    ("pythonic", "The answer is [1, 2].", ("The answer is [1, 2].", [])),
    ("pythonic", "[1, 2, 3]", ("[1, 2, 3]", [])),
    ("pythonic", "[f(1)]", ("[f(1)]", [])),
    ("pythonic", "[link](http://x.org)", ("[link](http://x.org)", [])),
    ("pythonic", "[f(a={1, 2})]", ("[f(a={1, 2})]", [])),
    ("pythonic", "[f(a=float('nan'))]", ("[f(a=float('nan'))]", [])),
    ("pythonic", "[f(a=1]", ("[f(a=1]", [])),
    ("pythonic", "[]", ("[]", [])),
    ("pythonic", "<|python_start|>", ("<|python_start|>", [])),
    # qwen3_coder: hermes's <tool_call>s around XML-like functions, values typed by the tools' schemas
    ("qwen3_coder", "Let me.\n<tool_call>\n<function=w>\n<parameter=city>\n42\n</parameter>\n<parameter=days>\n3\n"
                    "</parameter>\n<parameter=temp>\n21.5\n</parameter>\n<parameter=ok>\nTrue\n</parameter>\n"
                    "<parameter=opts>\n{\"a\": 1}\n</parameter>\n<parameter=tags>\n['x']\n</parameter>\n"
                    "<parameter=maybe>\nnull\n</parameter>\n<parameter=any>\n[1]\n</parameter>\n"
                    "<parameter=other>\n7\n</parameter>\n</function>\n</tool_call>",
     ("Let me.\n", [(0, "w", {"city": "42", "days": 3, "temp": 21.5, "ok": True, "opts": {"a": 1}, "tags": ["x"],
                             "maybe": None, "any": "[1]", "other": "7"})])),
    ("qwen3_coder", "<tool_call>\n<function=w>\n<parameter=code>\ndef f():\n    return 1\n\n</parameter>\n"
                    "<parameter=days>\nthree\n<parameter=temp>\n2\n</function>\n</tool_call>\n"
                    "<tool_call><function=x></function></tool_call> ok",
     (" ok", [(0, "w", {"code": "def f():\n    return 1\n", "days": "three", "temp": 2}), (1, "x", {})])),
    ("qwen3_coder", "<tool_call>\n<function=w>\n<parameter=days>\n1\n</parameter>\n",
     ("<tool_call>\n<function=w>\n<parameter=days>\n1\n</parameter>\n", [])),
    ("qwen3_coder", "<tool_call>\n<function=w>\n</function>", (None, [(0, "w", {})])),  # cut: a whole function counts
    ("qwen3_coder", '<tool_call>{"name": "w", "arguments": {}}</tool_call>',
     ('<tool_call>{"name": "w", "arguments": {}}</tool_call>', [])),
    # found by review: malformed or huge input is content, never an exception; emoji escaped
    # as surrogate halves joined; two functions in one call; Qwen3-Coder's bare functions
    ("pythonic", "[f(a=" + "-" * 7000 + "1)]", ("[f(a=" + "-" * 7000 + "1)]", [])),
    ("pythonic", r'[f(s="hi \ud83d\ude00", t="\ud83d")]', (None, [(0, "f", {"s": "hi \U0001F600", "t": "\ufffd"})])),
    ("pythonic", "[f(a=1), g(b=2),]", (None, [(0, "f", {"a": 1}), (1, "g", {"b": 2})])),
    ("pythonic", "[f(a=1),]", (None, [(0, "f", {"a": 1})])),
    ("pythonic", '[f(s="""a"b)""")]', (None, [(0, "f", {"s": 'a"b)'})])),
    ("pythonic", "<|python_tag|>[f(a=1)]", (None, [(0, "f", {"a": 1})])),
    ("pythonic", "[f(**x)]", ("[f(**x)]", [])),
    ("pythonic", "[f(a=1e999)]", ("[f(a=1e999)]", [])),
    ("mistral", '[TOOL_CALLS]f[ARGS]{"a": ' + "1" * 5000 + "}", ('[TOOL_CALLS]f[ARGS]{"a": ' + "1" * 5000 + "}", [])),
    ("mistral", '[TOOL_CALLS]f[ARGS]{"x": NaN}', ('[TOOL_CALLS]f[ARGS]{"x": NaN}', [])),
    ("mistral", "[TOOL_CALLS]f{}Hi[TOOL_CALLS]g{} ", ("Hi", [(0, "f", {}), (1, "g", {})])),
    ("hermes", "<tool_call>" + "[" * 100000 + "</tool_call>", ("<tool_call>" + "[" * 100000 + "</tool_call>", [])),
    ("hermes", '<tool_call>{"name": "f", "arguments": "' + "1" * 5000 + '"}</tool_call>',
     (None, [(0, "f", "1" * 5000)])),
    ("hermes", r'<tool_call>{"name": "f", "arguments": {"e": "\ud83d\ude00 \ud83d"}}</tool_call>',
     (None, [(0, "f", {"e": "\U0001F600 \ufffd"})])),
    ("llama3_json", '{"name": "f", "parameters": {"x": Infinity}}', ('{"name": "f", "parameters": {"x": Infinity}}', [])),
    ("qwen3_coder", "<tool_call>\n<function=f>\n<parameter=a>\n1\n</parameter>\n</function>\n<function=g>\n"
                    "<parameter=b>\n2\n</parameter>\n</function>\n</tool_call>",
     (None, [(0, "f", {"a": "1"}), (1, "g", {"b": "2"})])),
    ("qwen3_coder", "I'll fetch it.\n\n<function=w>\n<parameter=city>\nParis\n</parameter>\n</function>\n</tool_call>"
                    " done", ("I'll fetch it.\n\n done", [(0, "w", {"city": "Paris"})])),
    ("qwen3_coder", "<tool_call>\n<function=w>\n<parameter=days>\n4\n</parameter>\n</tool_call>",
     (None, [(0, "w", {"days": 4})])),  # the function's closing tag left out inside a closed call
    ("qwen3_coder", "<function=w>\n<parameter=days>\n4\n", ("<function=w>\n<parameter=days>\n4\n", [])),
    ("qwen3_coder", "A </tool_call> tag", ("A </tool_call> tag", [])),
    ("qwen3_coder", "<tool_call><function=w><parameter=opts>\n{\"x\": NaN}\n</parameter></function></tool_call>",
     (None, [(0, "w", {"opts": "{\"x\": NaN}"})])),
]




@pytest.mark.parametrize("kind,text,expected", CASES, ids=[f"{k}-{i}" for i, (k, _, _) in enumerate(CASES)])
def test_whole_and_streamed_alike(kind: str, text: str, expected) -> None:
    assert calls_of(ToolCallParser(kind, tools=TOOLS).parse(text)) == expected
    rng = random.Random(len(text))
    for _ in range(100):  # the same text cut at random places, into 1 to 8 pieces
        cuts = sorted(rng.sample(range(len(text) + 1), min(len(text), rng.randrange(0, 8))))
        parser, content, calls = ToolCallParser(kind, tools=TOOLS), "", []
        for a, b in zip([0, *cuts], [*cuts, len(text)]):
            more, made = parser.feed(text[a:b])
            content, calls = content + more, calls + made
        more, made = parser.finish()
        content, calls = content + more, calls + made
        assert calls_of(((content or None) if calls else content, calls)) == expected
        assert parser.calls == len(expected[1])


def test_a_marker_is_held_until_the_text_says_what_it_is() -> None:
    parser = ToolCallParser("hermes")
    assert parser.feed("Hi <tool") == ("Hi ", [])  # might begin a call
    assert parser.feed("kit>") == ("<toolkit>", [])  # it did not
    assert parser.feed(' <tool_call>{"name": "f", "arguments": {}}')[1] == []  # not closed yet
    content, calls = parser.feed("</tool_call>")
    assert content == "" and [c["function"]["name"] for c in calls] == ["f"]
    assert parser.feed("\n") == ("", [])  # whitespace after a call waits: it may be all that comes
    assert parser.finish() == ("", [])


def test_unknown_parser_is_refused() -> None:
    with pytest.raises(ValueError, match="hermes"):
        ToolCallParser("granite")


def test_a_mistral_servers_call_ids_are_what_mistral_templates_take() -> None:
    answers = {"mistral": '[TOOL_CALLS]w[ARGS]{"a": 1}', "named": '{"a": 1}',
               "required": '[{"name": "w", "parameters": {"a": 1}}]'}
    for kind, answer in answers.items():
        (call,) = ToolCallParser(kind, "w", short_ids=True).parse(answer)[1]
        assert re.fullmatch("[A-Za-z0-9]{9}", call["id"]) and call["function"] == {"name": "w", "arguments": '{"a": 1}'}


def test_a_long_call_is_parsed_once_it_can_end() -> None:
    """A call's arguments streamed token by token are not re-read for every token: a JSON call
    is tried again only past a character that can end it; a Python call's text is read once,
    where it stopped."""
    parser = ToolCallParser("mistral")
    assert parser.feed('[TOOL_CALLS]w[ARGS]{"code": "') == ("", [])
    tries = parser._tried
    for _ in range(200):
        assert parser.feed("f(x); ") == ("", []) and parser._tried == tries
    content, (call,) = parser.feed('"}')
    assert content == "" and json.loads(call["function"]["arguments"]) == {"code": "f(x); " * 200}
    parser = ToolCallParser("pythonic")
    assert parser.feed('[w(code="') == ("", [])
    for i in range(1, 201):
        assert parser.feed("f(x); ") == ("", []) and parser._call_end.read == len('w(code="') + 6 * i
    assert parser.feed("\\") == ("", []) and parser._call_end.read == len('w(code="') + 1200  # what it escapes comes next
    content, (call,) = parser.feed('"")]')
    assert content == "" and json.loads(call["function"]["arguments"]) == {"code": "f(x); " * 200 + '"'}


def test_qwen3_coder_values_take_their_schemas_types() -> None:
    """Each value's type as vLLM's parser makes it (2 an integer where the schema says number,
    2.5 a float), a list of types tried in turn, a tool without `properties` read as its own."""
    from server.tool_parsers import _typed

    cases = [("2", {"type": "number"}, 2), ("2.5", {"type": "number"}, 2.5), ("nan", {"type": "number"}, "nan"),
             ("2", {"type": ["boolean", "integer"]}, 2), ("true", {"type": ["integer", "boolean"]}, True),
             ("x", {"type": ["integer", "null"]}, "x"), ("NULL", {"type": "string"}, None),
             ("{1, 2}", {"type": "object"}, "{1, 2}"), ("[1, 2]", None, "[1, 2]"), ("7", {"type": "int64"}, 7)]
    for value, schema, expected in cases:
        got = _typed(value, schema)
        assert got == expected and type(got) is type(expected), (value, schema, got)
    tools = [{"type": "function", "function": {"name": "w", "parameters": {"days": {"type": "integer"}}}}]
    (call,) = ToolCallParser("qwen3_coder", tools=tools).parse(
        "<tool_call><function=w><parameter=days>3</parameter></function></tool_call>")[1]
    assert call["function"]["arguments"] == '{"days": 3}'


def test_forced_tool_schemas_keep_each_tools_refs_and_names() -> None:
    from engine.json_schema import schema_grammar

    ship = {"$defs": {"Address": {"type": "object", "properties": {"city": {"type": "string"}}, "required": ["city"]}},
            "type": "object", "properties": {"to": {"$ref": "#/$defs/Address"}}, "required": ["to"]}
    person = {"type": "object", "properties": {"name": {"type": "string"}, "parent": {"$ref": "#"}},
              "required": ["name"]}
    tools = [{"type": "function", "function": {"name": "ship", "parameters": ship}},
             {"type": "function", "function": {"name": "required", "parameters": person}}]
    calls = schema_grammar(forced_tool_schema(tools, None))
    assert calls.accepts('[{"name":"ship","parameters":{"to":{"city":"Oslo"}}}]')
    assert calls.accepts('[{"name":"required","parameters":{"name":"a","parent":{"name":"b"}}}]')
    # "#" is the tool's own parameters, not the array of calls around them
    assert not calls.accepts('[{"name":"required","parameters":{"name":"a","parent":[{"name":"required",'
                             '"parameters":{"name":"b"}}]}}]')
    assert not schema_grammar(forced_tool_schema(tools, None, parallel=False)).accepts(
        '[{"name":"ship","parameters":{"to":{"city":"x"}}},{"name":"ship","parameters":{"to":{"city":"y"}}}]')
    # a function named "required" is a named choice like any other
    named = schema_grammar(forced_tool_schema(tools, "required"))
    assert named.accepts('{"name":"a","parent":{"name":"b"}}') and not named.accepts('[]')
    content, (call,) = ToolCallParser("named", "required").parse(' {"name": "a"}\n')
    assert content is None and call["function"] == {"name": "required", "arguments": '{"name": "a"}'}
    # cut by max_tokens: a forced choice's JSON is no call, even where it parses
    parser = ToolCallParser("named", "count")
    assert parser.feed("1234") == ("", []) and parser.finish(cut=True) == ("1234", [])
    parser = ToolCallParser("required")
    parser.feed('[{"name": "ship", "parameters": {}}]')
    assert parser.finish(cut=True) == ('[{"name": "ship", "parameters": {}}]', [])
