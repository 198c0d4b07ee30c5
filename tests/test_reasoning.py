"""Reasoning models (engine/reasoning.py): where an answer's thinking starts and ends, read alike
on token ids and on text, whole and streamed; and structured outputs held back while a model
thinks, through the engine, on a scripted checkpoint (tests/scripted_model.py) whose greedy
answer is known, so every token can be checked."""

from __future__ import annotations

import json
import random

import pytest

from engine import LLM, SamplingParams, StructuredOutputsParams
from engine.reasoning import CONTENT, FIRST, REASONING, Reasoning, ReasoningGuide, ReasoningPhase, ReasoningSplitter
from engine.token_masks import Guide, TokenMasks, TokenVocabulary, unpack_mask
from engine.token_bytes import vocabulary_bytes
from tests.conftest import assert_engine_idle
from tests.scripted_model import scripted_checkpoint

TAGS = ("<think>", "</think>")
ANSWER = '<think>Let me see.</think>{"n": 7}'
SCHEMA = {"type": "object", "properties": {"n": {"type": "integer"}}, "required": ["n"]}
OTHER_SCHEMA = {"type": "object", "properties": {"ok": {"type": "boolean"}}, "required": ["ok"]}


@pytest.fixture(scope="module")
def tokenizer(default_model_dir: str):
    from transformers import AutoTokenizer

    tokenizer = AutoTokenizer.from_pretrained(default_model_dir)
    tokenizer.add_tokens(list(TAGS))
    return tokenizer


@pytest.fixture(scope="module")
def scripted(tmp_path_factory: pytest.TempPathFactory) -> str:
    return scripted_checkpoint(str(tmp_path_factory.mktemp("thinking")), ANSWER, TAGS)


@pytest.fixture(scope="module")
def engines(scripted: str) -> dict[str | None, LLM]:
    return {parser: LLM(scripted, reasoning_parser=parser, num_kv_blocks=64) for parser in (None, "qwen3", "deepseek_r1")}


# ------------------------------------------------------------------ the rules
def test_a_parser_needs_its_tags_as_single_tokens(default_model_dir: str, tokenizer) -> None:
    from transformers import AutoTokenizer

    plain = AutoTokenizer.from_pretrained(default_model_dir)
    with pytest.raises(ValueError, match="needs <think> and </think> as tokens"):
        Reasoning.for_tokenizer("qwen3", plain)
    with pytest.raises(ValueError, match="must be one of"):
        Reasoning.for_tokenizer("granite", tokenizer)
    with pytest.raises(ValueError, match="needs the model's tokenizer"):
        Reasoning.for_tokenizer("deepseek_r1", None)
    with pytest.raises(ValueError, match="reasoning_parser must be one of"):
        LLM(default_model_dir, reasoning_parser="nope")
    with pytest.raises(ValueError, match="needs <think> and </think>"):
        LLM(default_model_dir, reasoning_parser="qwen3")
    reasoning = Reasoning.for_tokenizer("qwen3", tokenizer)
    assert (reasoning.start_id, reasoning.end_id) == tuple(tokenizer.convert_tokens_to_ids(list(TAGS)))
    assert not reasoning.tags_special


@pytest.mark.parametrize("tail, qwen3, deepseek_r1", [
    ("<|im_start|>assistant\n", FIRST, REASONING),
    ("<|im_start|>assistant\n<think>\n", REASONING, REASONING),  # Qwen3-Thinking-2507, R1-0528's templates
    ("<|im_start|>assistant\n<think>", REASONING, REASONING),
    ("<|im_start|>assistant\n<think>\n\n</think>\n\n", CONTENT, CONTENT),  # Qwen3's enable_thinking=False
    ("<think>a</think> b", FIRST, REASONING),  # tags earlier in the prompt say nothing
    ("", FIRST, REASONING),
])
def test_where_an_answer_starts(tokenizer, tail: str, qwen3: str, deepseek_r1: str) -> None:
    ids = tokenizer.encode("<|im_start|>user\nHi<|im_end|>\n" + tail, add_special_tokens=False) if tail else []
    assert Reasoning.for_tokenizer("qwen3", tokenizer).opening(ids) == qwen3
    assert Reasoning.for_tokenizer("deepseek_r1", tokenizer).opening(ids) == deepseek_r1


@pytest.mark.parametrize("opening, text, reasoning, content", [
    (FIRST, "<think>\nhmm\n</think>\n\nHi", "\nhmm\n", "\n\nHi"),
    (FIRST, "Hi</think> there", None, "Hi</think> there"),  # not thinking: tags are text
    (FIRST, " <think>x</think>y", None, " <think>x</think>y"),  # only the first token opens it
    (FIRST, "<think>cut by max_tokens", "cut by max_tokens", None),
    (FIRST, "<think></think>", "", None),
    (FIRST, "", None, ""),
    (FIRST, "<thi", None, "<thi"),
    (REASONING, "hmm</think>Hi", "hmm", "Hi"),
    (REASONING, "<think>hmm</think>Hi", "hmm", "Hi"),  # R1-0528 writes the tag the prompt has too
    (REASONING, "never closed <think>", "never closed <think>", None),
    (REASONING, "a</think>b</think>c", "a", "b</think>c"),
    (REASONING, "", None, None),
    (CONTENT, "<think>x</think>y", None, "<think>x</think>y"),
    (CONTENT, "Hi", None, "Hi"),
])
def test_an_answer_splits_alike_whole_and_streamed(opening: str, text: str, reasoning: str | None,
                                                   content: str | None) -> None:
    assert ReasoningSplitter(opening).split(text) == (reasoning, content)
    rng = random.Random(len(text))
    for _ in range(50):
        cuts = sorted(rng.sample(range(1, len(text)), min(len(text) - 1, rng.randrange(4)))) if len(text) > 1 else []
        pieces = [text[i:j] for i, j in zip([0, *cuts], [*cuts, len(text)])]
        splitter, sent_reasoning, sent_content = ReasoningSplitter(opening), "", ""
        for piece in pieces:
            r, c = splitter.feed(piece)
            sent_reasoning, sent_content = sent_reasoning + r, sent_content + c
            assert "<think>" not in r + c or opening == CONTENT or reasoning is None or "<think>" in reasoning
        r, c = splitter.finish()
        assert (sent_reasoning + r, sent_content + c) == (reasoning or "", content or "")
        assert (splitter.reasoning, splitter.content) == (reasoning, content)


@pytest.mark.parametrize("parser, prompt_tail", [("qwen3", ""), ("qwen3", "<think>\n"), ("deepseek_r1", ""),
                                                 ("qwen3", "<think></think>")])
def test_token_phases_count_the_tokens_the_text_calls_reasoning(tokenizer, parser: str, prompt_tail: str) -> None:
    """ReasoningPhase (the engine's gate, the usage's reasoning_tokens) and ReasoningSplitter
    (the text) agree: the reasoning tokens are the tags and the tokens of the reasoning text."""
    reasoning = Reasoning.for_tokenizer(parser, tokenizer)
    prompt = tokenizer.encode("<|im_start|>assistant\n" + prompt_tail, add_special_tokens=False)
    opening = reasoning.opening(prompt)
    for answer in ("<think>\nLet me see.\n</think>\n\nSeven.", "Let me see.</think>Seven.", "Seven.",
                   "<think>never closed", "</think>x"):
        ids = tokenizer.encode(answer, add_special_tokens=False)
        phase = reasoning.phase(prompt).extend(ids)
        splitter = ReasoningSplitter(opening)
        thought, _ = splitter.split(answer)
        tags = [t for t in ids[:phase.reasoning_tokens] if t in (reasoning.start_id, reasoning.end_id)]
        expected = len(tokenizer.encode(thought, add_special_tokens=False)) + len(tags) if thought is not None else 0
        assert phase.reasoning_tokens == expected, (answer, opening)
        assert phase.phase == splitter.phase, (answer, opening)  # both still thinking, or both past it


def test_the_guide_waits_for_the_end_of_the_reasoning(tokenizer) -> None:
    reasoning = Reasoning.for_tokenizer("qwen3", tokenizer)
    masks = TokenMasks(TokenVocabulary(vocabulary_bytes(tokenizer, len(tokenizer))))
    grammar = StructuredOutputsParams(json=SCHEMA).compile()
    eos = tokenizer.eos_token_id

    def guide(phase: str) -> tuple[ReasoningGuide, Guide]:
        plain = Guide(grammar, masks, [eos])
        return ReasoningGuide(Guide(grammar, masks, [eos]), ReasoningPhase(reasoning, phase)), plain

    brace, letter = tokenizer.encode("{", add_special_tokens=False)[0], tokenizer.encode("Let", add_special_tokens=False)[0]
    gated, plain = guide(FIRST)
    bits, must_end = gated.packed_mask()
    allowed = unpack_mask(bits, len(tokenizer))
    expected = unpack_mask(plain.packed_mask()[0], len(tokenizer)).clone()
    expected[reasoning.start_id] = True
    assert allowed.equal(expected) and not must_end  # the grammar's first tokens, and <think>
    assert plain.packed_mask()[0][reasoning.start_id // 8] == masks.packed(grammar, grammar.start, (eos,))[0][
        reasoning.start_id // 8]  # the shared, cached mask was not written
    assert gated.advance(reasoning.start_id)
    for token in (letter, eos, reasoning.start_id):  # thinking: anything goes, no mask at all
        assert gated.packed_mask() == (None, False) and not gated.must_end() and not gated.dead_end()
        assert gated.advance(token)
    along = gated.masks_along([letter, reasoning.end_id, brace])
    assert [m[0] is None for m in along] == [True, True, False, False] and gated.phase.phase == REASONING
    assert gated.advance(reasoning.end_id) and gated.phase.phase == CONTENT
    assert gated.packed_mask()[0].equal(plain.packed_mask()[0])  # then the grammar, from its start
    assert not gated.advance(letter) and gated.advance(brace)
    assert along[3][0].equal(gated.packed_mask()[0])

    not_thinking, _ = guide(FIRST)
    assert not not_thinking.advance(letter) and not_thinking.advance(brace)  # the first token chose content
    assert not not_thinking.advance(reasoning.start_id)
    closed, _ = guide(CONTENT)
    assert not closed.advance(reasoning.start_id)
    assert closed.packed_mask()[0].equal(plain.packed_mask()[0])


# ------------------------------------------------------------------ the engine
def _chat_ids(llm: LLM, tail: list[int] | None = None) -> list[int]:
    tokenizer = llm.engine.tokenizer
    text = tokenizer.apply_chat_template([{"role": "user", "content": "x"}], add_generation_prompt=True, tokenize=False)
    return tokenizer.encode(text, add_special_tokens=False) + (tail or [])


def _answer(llm: LLM, prompt: list[int], schema: dict | None, **params) -> str:
    structured = StructuredOutputsParams(json=schema) if schema is not None else None
    out = llm.generate([prompt], SamplingParams(max_tokens=40, temperature=0, structured_outputs=structured, **params),
                       use_tqdm=False)[0].outputs[0]
    return out.text


def test_structured_outputs_hold_the_answer_once_its_reasoning_ended(engines: dict[str | None, LLM]) -> None:
    """The scripted model thinks, then answers {"n": 7}: with a reasoning parser the schema
    leaves the thinking alone and holds the rest; without one it holds every token, so the
    thinking can't even start."""
    prompt = _chat_ids(engines[None])
    assert _answer(engines[None], prompt, None) == ANSWER
    assert not _answer(engines[None], prompt, SCHEMA).startswith("<think>")
    for parser in ("qwen3", "deepseek_r1"):
        llm = engines[parser]
        assert _answer(llm, prompt, None) == ANSWER
        assert _answer(llm, prompt, SCHEMA) == ANSWER
        held = _answer(llm, prompt, OTHER_SCHEMA)  # the content the model wanted does not fit
        assert held.startswith("<think>Let me see.</think>")
        assert json.loads(held.removeprefix("<think>Let me see.</think>")).keys() == {"ok"}
        end, start = llm.engine.reasoning.end_id, llm.engine.reasoning.start_id
        # A prompt that ends the thinking (enable_thinking=False): the grammar from the first token
        assert _answer(llm, _chat_ids(llm, [end]), SCHEMA) == '{"n": 7}'
        # One that opens it: the answer thinks from its first token
        assert _answer(llm, _chat_ids(llm, [start]), SCHEMA) == 'Let me see.</think>{"n": 7}'
        assert json.loads(_answer(llm, _chat_ids(llm, [start]), OTHER_SCHEMA).split("</think>")[1]).keys() == {"ok"}
        assert_engine_idle(llm)


def test_reasoning_under_drafts_n_and_async_scheduling(scripted: str) -> None:
    """Speculative drafts verified through the gate (masks_along), several samples, async
    scheduling: the same tokens as the plain engine. The prompt holds the answer's own tokens,
    so prompt lookup drafts the rest of it."""
    plain = LLM(scripted, num_kv_blocks=64)
    answer_ids = plain.generate([_chat_ids(plain)], SamplingParams(max_tokens=40, temperature=0),
                                use_tqdm=False)[0].outputs[0].token_ids[:-1]  # without EOS
    prompt = answer_ids + _chat_ids(plain)
    expected = None
    for options in ({}, {"speculative_config": {"method": "ngram", "num_speculative_tokens": 3,
                                                "prompt_lookup_min": 1, "prompt_lookup_max": 2}},
                    {"async_scheduling": True}):
        llm = LLM(scripted, reasoning_parser="qwen3", num_kv_blocks=64, **options)
        params = SamplingParams(max_tokens=40, temperature=0, n=2,
                                structured_outputs=StructuredOutputsParams(json=OTHER_SCHEMA))
        outs = [[o.token_ids for o in out.outputs]
                for out in llm.generate([prompt, prompt + [llm.engine.reasoning.end_id]], params, use_tqdm=False)]
        expected = expected or outs
        assert outs == expected and all(a == b for a, b in outs)
        assert outs[0][0][:len(answer_ids) - 6] == answer_ids[:len(answer_ids) - 6]  # thought as it wanted
        if "speculative_config" in options:
            assert llm.engine.stats.num_accepted_tokens > 0
        assert_engine_idle(llm)


def test_special_tags_stay_in_the_text_and_other_special_tokens_do_not(tmp_path) -> None:
    """Where the tokenizer marks the tags special, skip_special_tokens (the default) would drop
    them and the server could not split the text: a reasoning engine shows them, and skips the
    other special tokens as before (min_tokens holds EOS back here, so the model's next best
    token, special <|endoftext|>, fills the rest)."""
    model = scripted_checkpoint(str(tmp_path / "special"), ANSWER, TAGS, special=True)
    params = SamplingParams(max_tokens=30, min_tokens=20, temperature=0)
    llm = LLM(model, reasoning_parser="deepseek_r1", num_kv_blocks=64)
    assert llm.engine.reasoning.tags_special
    out = llm.chat([{"role": "user", "content": "x"}], params, use_tqdm=False)[0].outputs[0]
    filler = llm.engine.tokenizer.convert_tokens_to_ids("<|endoftext|>")
    assert out.text == ANSWER and out.token_ids.count(filler) > 5
    assert ReasoningSplitter(REASONING).split(out.text) == ("Let me see.", '{"n": 7}')
    shown = llm.chat([{"role": "user", "content": "x"}],
                     SamplingParams(max_tokens=30, min_tokens=20, temperature=0, skip_special_tokens=False),
                     use_tqdm=False)[0].outputs[0]
    assert shown.text.startswith(ANSWER + "<|endoftext|>")
    plain = LLM(model, num_kv_blocks=64).chat([{"role": "user", "content": "x"}], params, use_tqdm=False)[0].outputs[0]
    assert plain.text == "Let me see." + '{"n": 7}'  # no reasoning parser: special tags skipped, as ever
