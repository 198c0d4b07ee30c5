"""EBNF grammars (GBNF, as llama.cpp's and xgrammar's) as structured outputs: the texts a grammar
takes and refuses, against Python's own matching of the same language where one exists, the
grammars that are refused and why, and answers the engine samples under one."""

from __future__ import annotations

import json
import random
import re

import pytest

from engine import LLM, SamplingParams
from engine.ebnf import ebnf_grammar
from engine.structured_outputs import StructuredOutputsParams
from tests.conftest import assert_engine_idle

JSON_GBNF = r'''
root   ::= value
value  ::= object | array | string | number | ("true" | "false" | "null")
object ::= "{" ws ( string ws ":" ws value ws ( "," ws string ws ":" ws value ws )* )? "}"
array  ::= "[" ws ( value ws ( "," ws value ws )* )? "]"
string ::= "\"" ( [^"\\\x00-\x1f] | "\\" ( ["\\/bfnrt] | "u" [0-9a-fA-F]{4} ) )* "\""
number ::= "-"? ( "0" | [1-9] [0-9]* ) ( "." [0-9]+ )? ( [eE] [-+]? [0-9]+ )?
ws     ::= [ \t\n]{0,8}   # bounded, as the JSON grammar's whitespace is
'''

SQL = '''
root   ::= "SELECT " column (", " column)* " FROM " table where?
column ::= [a-z_]+ | "*"          # a column, or all of them
table  ::= "users" | "orders"
where  ::= " WHERE " column " = " value
value  ::= [0-9]+ | "'" [^'\\n]* "'"
'''


@pytest.mark.parametrize("text, ok", [
    ("SELECT a FROM users", True), ("SELECT a, b_c FROM orders", True), ("SELECT * FROM users WHERE id = 42", True),
    ("SELECT name FROM users WHERE name = 'Ann O''", False), ("SELECT name FROM users WHERE name = 'Ann'", True),
    ("SELECT FROM users", False), ("SELECT a FROM x", False), ("SELECT a FROM users ", False), ("", False),
])
def test_a_grammar_takes_its_language_and_nothing_else(text: str, ok: bool) -> None:
    assert ebnf_grammar(SQL).accepts(text) is ok


def test_a_recursive_grammar_takes_json_as_json_does() -> None:
    """Nested, recursive rules: random JSON values are taken; each broken by one change is
    taken exactly when Python's json still parses it (within the grammar's own limits)."""
    grammar = ebnf_grammar(JSON_GBNF)
    rng = random.Random(0)

    def value(depth: int):
        kind = rng.randrange(6 if depth < 3 else 4)
        return [lambda: rng.randrange(-999, 999), lambda: rng.random() * 100, lambda: "x\"\\é\n"[:rng.randrange(6)],
                lambda: rng.choice([True, False, None]), lambda: [value(depth + 1) for _ in range(rng.randrange(3))],
                lambda: {f"k{i}": value(depth + 1) for i in range(rng.randrange(3))}][kind]()

    checked = 0
    for _ in range(150):
        text = json.dumps(value(0), indent=rng.choice([None, 1]), ensure_ascii=rng.random() < 0.5)
        assert grammar.accepts(text), text
        i = rng.randrange(len(text))
        broken = text[:i] + rng.choice(['"', "]", ",", "x", "", "}"]) + text[i + 1:]
        try:
            parsed = json.loads(broken) is not None or True
        except json.JSONDecodeError:
            parsed = False
        bounded = all(len(run) <= 8 for run in re.findall(r"[ \t\n]+", broken))
        # JSON takes infinities and lone surrogates' escapes the grammar has no rule for.
        if bounded and "Infinity" not in broken and "NaN" not in broken:
            assert grammar.accepts(broken) == parsed, broken
            checked += 1
    assert checked > 100


@pytest.mark.parametrize("text, ok", [
    ("abab", True), ("ababab", True), ("abababab", False), ("ab", False), ("ababé", True), ("ababéé", False),
    ("abab12", True), ("abab123", False), ("ababé\u00ff", False), ("abab\U0001F600", True), ("abab\n", False),
])
def test_repetitions_optional_items_and_classes(text: str, ok: bool) -> None:
    grammar = ebnf_grammar(r'root ::= ("a" "b"){2,3} "é"? [^a-z\n\u00e0-\u00ff]{0,2}')
    assert grammar.accepts(text) is ok


def test_rules_that_may_be_empty_and_escapes() -> None:
    grammar = ebnf_grammar('root ::= a b "!" tab\na ::= "x"*\nb ::= "y"?\ntab ::= "\\t" | "\\x41\\u00e9\\U0001F600"')
    for text, ok in [("!\t", True), ("xxy!\t", True), ("y!Aé\U0001F600", True), ("yy!\t", False), ("!", False)]:
        assert grammar.accepts(text) is ok, text
    assert ebnf_grammar("root ::= 'single' [\\]\\-]").accepts("single]")
    assert ebnf_grammar("root ::= . .").accepts("é\n")


@pytest.mark.parametrize("grammar, message", [
    ('x ::= "a"', "has no 'root' rule"),
    ("", "the grammar is empty"),
    ('root ::= "a" b', "refers to rules it does not define: b"),
    ('root ::= "a"\nroot ::= "b"', "rule 'root' is defined twice"),
    ('root ::= expr\nexpr ::= expr "+" "1" | "1"', "rule 'expr' is left-recursive"),
    ('root ::= a\na ::= b? a "x"\nb ::= "y"', "rule 'a' is left-recursive"),
    ('root ::= "x" root', "derives no text that ends"),
    ('root ::= "a', "without its closing quote"),
    ('root ::= "a\nb"', "runs past the end of its line"),
    ('root ::= [a-', "without its closing ]"),
    ("root ::= [z-a]", "out of order"),
    ('root ::= "a"* [^\\x00-\\U0010FFFF] | "b"', "matches no character"),
    ("root ::= []", "matches no character"),
    ('root ::= "a"{3,2}', "maximum below its minimum"),
    ('root ::= "a"{x}', "expected a repetition"),
    ('root ::= ("a" | "b"', "expected `)`"),
    ('root ::= "\\q"', "unknown escape \\q"),
    ('root ::= "\\x4"', "escape \\x needs 2 hex digits"),
    ('root ::= "\\ud800"', "is not a character"),
    ('root: "a"', "written as Lark writes rules"),
    ('?start: "a"', "rule 'start' is written as Lark writes rules"),
    ("root ::= " + "(" * 70 + '"a"' + ")" * 70, "groups nest deeper than 64"),
    ('root ::= "a"{,}', "expected a repetition"),
    ('root ::= "a" | * "b"', "line 1, column 16: expected an item"),
    ('root ::= ("a"{9999}){30}', "too large"),
])
def test_a_grammar_that_cannot_be_served_says_why(grammar: str, message: str) -> None:
    with pytest.raises(ValueError, match=re.escape(message)):
        StructuredOutputsParams(grammar=grammar)
    with pytest.raises(ValueError, match="grammar must be a string"):
        StructuredOutputsParams(grammar=["root ::= 'a'"])


def test_nesting_repeats_and_many_alternatives_stay_one_way_to_read_the_text() -> None:
    """A repeat holding a rule reads its text one way (a second way at every level would double
    the stacks until the automaton gives up, ~10 levels deep), and 600 one-keyword rules in one
    alternation are copied in rather than run as 600 children (past MAX_STACKS)."""
    arithmetic = ebnf_grammar('root ::= expr\nexpr ::= term ("+" term)*\nterm ::= "1" | "(" expr ")"')
    deep = "(1+" * 40 + "1" + ")" * 40
    assert arithmetic.accepts(deep) and not arithmetic.accepts(deep[:-1])
    assert len(arithmetic.advance(arithmetic.start, deep[:-20].encode())) == 1
    parens = ebnf_grammar('root ::= p*\np ::= "(" p* ")"')
    assert parens.accepts("(" * 50 + ")" * 50 + "()") and not parens.accepts("(" * 50 + ")" * 49)
    keywords = ebnf_grammar("root ::= " + " | ".join(f"w{i}" for i in range(600)) + "\n"
                            + "".join(f'w{i} ::= "word{i}"\n' for i in range(600)))
    assert keywords.accepts("word0") and keywords.accepts("word599") and not keywords.accepts("word600")
    assert len(keywords.advance(keywords.start, b"word5")) == 1
    # Past the copies' budget (1,200 rules of ~70 states), the rest stay children: still served.
    long_keywords = ebnf_grammar("root ::= " + " | ".join(f"k{i}" for i in range(1200)) + "\n" + "".join(
        f'k{i} ::= "keyword-number-{i:05d}-abcdefghij"\n' for i in range(1200)))
    assert all(long_keywords.accepts(f"keyword-number-{i:05d}-abcdefghij") for i in (0, 700, 1199))
    chain = ebnf_grammar('root ::= "ok" | r0\n' + "".join(f'r{i} ::= "b" r{i + 1}\n' for i in range(3000))
                         + 'r3000 ::= "end"')
    assert chain.accepts("b" * 3000 + "end") and chain.accepts("ok") and not chain.accepts("b" * 2999 + "end")


def test_the_dialects_leniencies() -> None:
    """What llama.cpp and xgrammar also take: space before a repeat, `{,n}`, `{0}`, names that
    begin with a digit, a byte-order mark."""
    grammar = ebnf_grammar('\ufeffroot ::= "a" * "b" {,2} "c"{0} 1st\n1st ::= "!"')
    for text, ok in [("!", True), ("aab!", True), ("bb!", True), ("bbb!", False), ("c!", False)]:
        assert grammar.accepts(text) is ok, text


def test_a_branch_that_never_ends_is_left_out() -> None:
    """`loop` recurses forever: the root keeps its other branch, and no answer walks into it."""
    grammar = ebnf_grammar('root ::= "ok" | "x" loop\nloop ::= "x" loop')
    assert grammar.accepts("ok")
    assert grammar.step(grammar.start, ord("x")) is None


@pytest.fixture(scope="module")
def llm(default_model_dir: str) -> LLM:
    return LLM(default_model_dir, num_kv_blocks=128)


def test_sampled_answers_keep_to_the_grammar(llm: LLM) -> None:
    """Greedy and seeded samples from the embedded model: each answer that stopped by itself is
    the grammar's, and one cut by max_tokens is a prefix of one (the grammar never refused it)."""
    structure = StructuredOutputsParams(grammar=SQL)
    grammar = structure.compile()
    prompts = ["Write an SQL query that lists every user's name:", "SQL for all orders with id 7:"]
    greedy = SamplingParams(max_tokens=40, temperature=0.0, structured_outputs=structure)
    seeded = SamplingParams(n=3, max_tokens=40, temperature=1.0, seed=11, structured_outputs=structure)
    completions = [c for params in (greedy, seeded) for o in llm.generate(prompts, params, use_tqdm=False)
                   for c in o.outputs]
    assert len(completions) == 8
    for completion in completions:
        state = grammar.advance(grammar.start, completion.text.encode())
        assert state is not None, completion.text
        assert grammar.complete(state) or completion.finish_reason == "length", completion.text
    assert sum(c.finish_reason == "stop" for c in completions) >= 4
    assert all(c.text.startswith("SELECT ") for c in completions)
    assert_engine_idle(llm)
