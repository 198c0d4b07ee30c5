"""Structured outputs end to end on the default model (CPU): answers that parse and keep to their
schema or choice, tokens the grammar allowed, and outputs unchanged by async scheduling,
batch mates and preemption."""

from __future__ import annotations

import datetime
import json
import math

import pytest

from engine import LLM, LLMEngine, SamplingParams
from engine.grammar import Grammar
from engine.outputs import CompletionOutput
from engine.structured_outputs import StructuredOutputsParams
from engine.token_bytes import vocabulary_bytes
from engine.token_masks import Guide, TokenMasks, TokenVocabulary
from tests.conftest import assert_engine_idle

CITIES = ["Paris", "London", "Tokyo"]
PERSON = {"type": "object", "properties": {"name": {"type": "string"}, "age": {"type": "integer"},
                                           "city": {"enum": CITIES}}, "required": ["name", "age", "city"]}
PERSON_PROMPTS = [
    [{"role": "user", "content": "Describe a person as JSON with name, age and city."}],
    [{"role": "user", "content": "Give me a JSON object for Marie, 31 years old, living in Paris."}],
    [{"role": "user", "content": "Invent a character who lives in Tokyo. Answer in JSON."}],
]
ANSWERS = ["yes", "no", "maybe"]
QUESTION = [{"role": "user", "content": "Is Paris in France? Answer yes, no or maybe."}]


def person(**params) -> SamplingParams:
    return SamplingParams(structured_outputs=StructuredOutputsParams(json=PERSON), **params)


def is_person(value: object) -> bool:
    return (isinstance(value, dict) and list(value) == ["name", "age", "city"] and isinstance(value["name"], str)
            and type(value["age"]) is int and value["city"] in CITIES)


def assert_viable(grammar: Grammar, completion: CompletionOutput) -> None:
    """A cut answer is still a prefix the grammar allows; a stopped one is whole."""
    state = grammar.advance(grammar.start, completion.text.encode())
    assert state is not None, completion.text
    if completion.finish_reason == "stop":
        assert grammar.complete(state), completion.text


def token_ids(outputs) -> list[list[int]]:
    return [list(c.token_ids) for o in outputs for c in o.outputs]


@pytest.fixture(scope="module")
def llm(default_model_dir: str) -> LLM:
    return LLM(default_model_dir, kv_cache_memory_bytes=256 << 20)


@pytest.fixture(scope="module")
def masks(llm: LLM) -> TokenMasks:
    """Masks of our own, built apart from the engine's."""
    return TokenMasks(TokenVocabulary(vocabulary_bytes(llm.get_tokenizer(), llm.engine.model_config.vocab_size)))


@pytest.fixture(scope="module")
def greedy_people(llm: LLM) -> list[list[int]]:
    """The greedy schema answers, run together on the sync engine: what the others must match."""
    outputs = llm.chat(PERSON_PROMPTS, person(max_tokens=48, temperature=0.0), use_tqdm=False)
    return token_ids(outputs)


def test_greedy_chat_with_a_json_schema(llm: LLM, greedy_people: list[list[int]]) -> None:
    outputs = llm.chat(PERSON_PROMPTS, person(max_tokens=48, temperature=0.0), use_tqdm=False)
    assert token_ids(outputs) == greedy_people
    for output in outputs:
        completion = output.outputs[0]
        assert completion.finish_reason == "stop" and completion.token_ids[-1] in llm.engine.eos_token_ids
        assert is_person(json.loads(completion.text)), completion.text
    assert_engine_idle(llm)


def test_seeded_samples_keep_to_the_schema_and_the_choice(llm: LLM) -> None:
    grammar = StructuredOutputsParams(json=PERSON).compile()
    outputs = llm.chat(PERSON_PROMPTS[:2], person(n=2, max_tokens=40, temperature=1.0, seed=7), use_tqdm=False)
    completions = [c for o in outputs for c in o.outputs]
    assert len(completions) == 4
    for completion in completions:
        assert_viable(grammar, completion)
        if completion.finish_reason == "stop":
            assert is_person(json.loads(completion.text)), completion.text
    assert any(c.finish_reason == "stop" for c in completions)
    again = llm.chat(PERSON_PROMPTS[:2], person(n=2, max_tokens=40, temperature=1.0, seed=7), use_tqdm=False)
    assert token_ids(again) == token_ids(outputs)
    choice = SamplingParams(n=2, max_tokens=8, temperature=1.0, seed=3,
                            structured_outputs=StructuredOutputsParams(choice=ANSWERS))
    for output in llm.chat([QUESTION, PERSON_PROMPTS[0]], choice, use_tqdm=False):
        assert len(output.outputs) == 2
        for completion in output.outputs:
            assert completion.text in ANSWERS and completion.finish_reason == "stop"
    assert_engine_idle(llm)


def test_json_object_answers_parse_as_objects(llm: LLM) -> None:
    grammar = StructuredOutputsParams(json_object=True).compile()
    params = SamplingParams(max_tokens=40, temperature=0.0, structured_outputs={"json_object": True})
    outputs = llm.chat(PERSON_PROMPTS[:2], params, use_tqdm=False)
    completions = [o.outputs[0] for o in outputs]
    for completion in completions:
        assert_viable(grammar, completion)
        if completion.finish_reason == "stop":
            assert isinstance(json.loads(completion.text), dict)
    assert completions[0].finish_reason == "stop"
    prompt = "Here is a JSON object describing a cat:"  # a plain prompt, without the chat template
    completion = llm.generate(prompt, params, use_tqdm=False)[0].outputs[0]
    assert_viable(grammar, completion)
    assert completion.text.lstrip().startswith("{")
    assert_engine_idle(llm)


def test_every_sampled_token_was_allowed(llm: LLM, masks: TokenMasks) -> None:
    ends = llm.engine.eos_token_ids
    requests = [
        (PERSON_PROMPTS[0], person(max_tokens=32, temperature=1.0, seed=11, logprobs=5)),
        (PERSON_PROMPTS[1], SamplingParams(max_tokens=32, temperature=0.8, seed=5, logprobs=5,
                                           structured_outputs={"json_object": True})),
        (QUESTION, SamplingParams(max_tokens=8, temperature=1.0, seed=2, logprobs=5,
                                  structured_outputs={"choice": ANSWERS})),
    ]
    outputs = llm.chat([conversation for conversation, _ in requests], [p for _, p in requests], use_tqdm=False)
    masked = 0
    for output, (_, params) in zip(outputs, requests):
        completion = output.outputs[0]
        guide = Guide(params.structured_outputs.compile(), masks, ends)
        assert len(completion.logprobs) == len(completion.token_ids)
        for token, entry in zip(completion.token_ids, completion.logprobs):
            allowed, _ = guide.mask()
            assert allowed[token] and math.isfinite(entry[token].logprob)
            # logprobs come after the mask: a refused token has none
            for top_token, logprob in entry.items():
                assert math.isfinite(logprob.logprob) == bool(allowed[top_token]), (top_token, logprob)
                masked += not math.isfinite(logprob.logprob)
            assert guide.advance(token)
        assert guide.ended == (completion.finish_reason == "stop")
    assert masked  # the choice's first step allows fewer than 5 tokens
    assert_engine_idle(llm)


def test_min_tokens_yields_to_the_grammar_and_stop_token_ids_end_it(llm: LLM) -> None:
    eos = llm.engine.eos_token_ids
    choice = StructuredOutputsParams(choice=ANSWERS)
    waiting = SamplingParams(max_tokens=12, min_tokens=10, temperature=0.0, structured_outputs=choice)
    completion = llm.chat(QUESTION, waiting, use_tqdm=False)[0].outputs[0]
    assert completion.text in ANSWERS and completion.finish_reason == "stop"
    assert completion.token_ids[-1] in eos and len(completion.token_ids) < 10
    # <repo_name> as a stop token, pushed hard: it ends the answer, and only once it is whole
    stop_id = 3
    assert stop_id not in eos
    stopping = SamplingParams(max_tokens=12, min_tokens=10, temperature=0.0, structured_outputs=choice,
                              stop_token_ids=[stop_id], logit_bias={stop_id: 100.0})
    completion = llm.chat(QUESTION, stopping, use_tqdm=False)[0].outputs[0]
    assert completion.text in ANSWERS and completion.finish_reason == "stop"
    assert completion.stop_reason == stop_id and completion.token_ids[-1] == stop_id
    # a bias on a token the grammar refuses does not bring it in
    banned = llm.get_tokenizer().encode(" no", add_special_tokens=False)
    biased = SamplingParams(max_tokens=8, temperature=0.0, structured_outputs=choice,
                            logit_bias={t: 100.0 for t in banned})
    completion = llm.chat(QUESTION, biased, use_tqdm=False)[0].outputs[0]
    assert completion.text in ANSWERS
    assert_engine_idle(llm)


def test_an_aborted_structured_request_gives_everything_back(llm: LLM) -> None:
    engine: LLMEngine = llm.engine
    prompt = llm.get_tokenizer().apply_chat_template(PERSON_PROMPTS[0], tokenize=False, add_generation_prompt=True)
    engine.add_request("structured-abort", prompt, person(n=2, max_tokens=32, temperature=1.0, seed=1))
    assert engine._num_guided == 2
    for _ in range(3):
        engine.step()
    assert engine._num_guided == 2 and engine.scheduler.block_manager.num_used_blocks > 0
    aborted = engine.abort_request("structured-abort")
    assert [c.finish_reason for c in aborted.outputs] == ["abort", "abort"]
    while engine.has_unfinished_requests():
        engine.step()
    assert_engine_idle(llm)


def mixed_requests() -> tuple[list[str], list[SamplingParams]]:
    plain = SamplingParams(max_tokens=12, temperature=0.0)
    prompts = ["The capital of France is", "def fibonacci(n):"]
    return prompts, [plain, plain]


def test_async_scheduling_matches_sync_in_mixed_batches(default_model_dir: str, llm: LLM,
                                                        greedy_people: list[list[int]]) -> None:
    tokenizer = llm.get_tokenizer()
    plain_prompts, plain_params = mixed_requests()
    plain_alone = token_ids(llm.generate(plain_prompts, plain_params, use_tqdm=False))
    structured = [tokenizer.apply_chat_template(c, tokenize=False, add_generation_prompt=True) for c in PERSON_PROMPTS]
    choice = SamplingParams(max_tokens=8, temperature=0.0, structured_outputs={"choice": ANSWERS})
    question = tokenizer.apply_chat_template(QUESTION, tokenize=False, add_generation_prompt=True)
    choice_alone = token_ids(llm.generate(question, choice, use_tqdm=False))
    # structured and plain interleaved, in one batch
    prompts = [structured[0], plain_prompts[0], structured[1], question, plain_prompts[1], structured[2]]
    params = [person(max_tokens=48, temperature=0.0), plain_params[0], person(max_tokens=48, temperature=0.0),
              choice, plain_params[1], person(max_tokens=48, temperature=0.0)]
    expected = [greedy_people[0], plain_alone[0], greedy_people[1], choice_alone[0], plain_alone[1], greedy_people[2]]
    assert token_ids(llm.generate(prompts, params, use_tqdm=False)) == expected
    assert_engine_idle(llm)
    async_llm = LLM(default_model_dir, kv_cache_memory_bytes=256 << 20, async_scheduling=True)
    assert async_llm.engine.async_scheduling
    # Each forward is launched over the step in flight (vLLM's order): only the sampling waits
    # for that step's tokens, which the structured outputs' masks need.
    overlapped: list[bool] = []  # per forward: launched while the step before it was in flight
    execute = async_llm.engine.runner.execute

    def recorded_execute(batch, all_logits_rows=(), previous=None, pooling=False):
        overlapped.append(previous is not None)
        return execute(batch, all_logits_rows, previous, pooling)

    async_llm.engine.runner.execute = recorded_execute
    assert token_ids(async_llm.generate(prompts, params, use_tqdm=False)) == expected
    assert sum(overlapped) >= len(overlapped) - 2, overlapped  # all but the first, and one after a lone prefill
    assert token_ids(async_llm.generate(plain_prompts, plain_params, use_tqdm=False)) == plain_alone
    assert_engine_idle(async_llm)


def test_preemption_keeps_structured_outputs(default_model_dir: str, llm: LLM,
                                             greedy_people: list[list[int]]) -> None:
    params = person(max_tokens=48, temperature=0.0)
    alone = [token_ids(llm.chat(c, params, use_tqdm=False))[0] for c in PERSON_PROMPTS]
    assert alone == greedy_people
    small = LLM(default_model_dir, num_kv_blocks=10, block_size=16)
    conversations = PERSON_PROMPTS + [PERSON_PROMPTS[0]]
    outputs = small.chat(conversations, params, use_tqdm=False)
    assert small.engine.scheduler.stats.num_preemptions > 0
    assert token_ids(outputs) == alone + alone[:1]
    for output in outputs:
        assert is_person(json.loads(output.outputs[0].text))
    assert_engine_idle(small)


def alias_chain(length: int) -> dict:
    defs: dict = {f"d{i}": {"$ref": f"#/$defs/d{i + 1}"} for i in range(length)}
    defs[f"d{length}"] = {"type": "integer"}
    return {"$defs": defs, "$ref": "#/$defs/d0"}


WIDE_UNION = {"anyOf": [{"type": "object", "properties": {f"k{i}": {"type": "integer"}}, "required": [f"k{i}"]}
                        for i in range(300)]}


@pytest.mark.parametrize("schema", [alias_chain(200), WIDE_UNION], ids=["alias-chain", "wide-union"])
def test_a_schema_past_the_grammars_limits_is_refused_up_front(schema: dict) -> None:
    with pytest.raises(ValueError, match="deeper than|options"):
        SamplingParams(max_tokens=24, temperature=0.0, structured_outputs={"json": schema})


# 40 objects whose "a" is one of 40 objects: past `{"a":`, 1,600 ways to read `{` (> MAX_STACKS).
NESTED_UNIONS = {
    "$defs": {"inner": {"anyOf": [{"type": "object", "properties": {f"b{j}": {"type": "integer"}},
                                   "required": [f"b{j}"]} for j in range(40)]}},
    "anyOf": [{"type": "object", "properties": {"a": {"$ref": "#/$defs/inner"}, f"x{i}": {"type": "integer"}},
               "required": ["a"]} for i in range(40)],
}


def test_an_answer_at_a_dead_end_is_cut_with_length_not_stop(llm: LLM) -> None:
    params = SamplingParams(max_tokens=64, temperature=0.0, structured_outputs={"json": NESTED_UNIONS})
    completion = llm.generate("Write the JSON:", params, use_tqdm=False)[0].outputs[0]
    assert completion.finish_reason == "length" and len(completion.token_ids) < 64, completion
    assert '"a":' in completion.text and not params.structured_outputs.compile().accepts(completion.text)
    assert_engine_idle(llm)


def test_a_structure_no_answer_satisfies_is_refused_when_added(llm: LLM) -> None:
    params = SamplingParams(max_tokens=8, structured_outputs={"regex": r"[^\s\S]"})
    with pytest.raises(ValueError, match="no answer satisfies"):
        llm.generate("Anything:", params, use_tqdm=False)
    assert_engine_idle(llm)
    # a stop token id that is the grammar's only way on, min_tokens unmet: it ends the answer
    space = llm.get_tokenizer().convert_tokens_to_ids("Ġ")
    params = SamplingParams(max_tokens=8, temperature=0.0, min_tokens=3, stop_token_ids=[space],
                            structured_outputs={"choice": [" "]})
    completion = llm.generate("A space:", params, use_tqdm=False)[0].outputs[0]
    assert completion.token_ids == [space] and completion.finish_reason == "stop" and completion.stop_reason == space
    assert_engine_idle(llm)


def test_pydantic_constrained_fields_on_the_default_model(llm: LLM) -> None:
    """A schema of Pydantic's constrained fields (a pattern, length bounds, integer bounds, a date) held
    by a real model's sampling: every answer that stops validates, one cut is still a prefix."""
    from pydantic import BaseModel, Field

    class Order(BaseModel):
        code: str = Field(pattern=r"^[A-Z]{2}-[0-9]{3}$")
        item: str = Field(min_length=3, max_length=12)
        qty: int = Field(ge=1, le=20)
        due: datetime.date

    schema = Order.model_json_schema()
    grammar = StructuredOutputsParams(json=schema).compile()
    params = SamplingParams(max_tokens=64, temperature=1.0, seed=11, n=3,
                            structured_outputs=StructuredOutputsParams(json=schema))
    prompt = [{"role": "user", "content": "Write an order as JSON: a code like AB-123, an item, a quantity and a "
                                          "due date."}]
    completions = [c for o in llm.chat([prompt, PERSON_PROMPTS[0]], params, use_tqdm=False) for c in o.outputs]
    for completion in completions:
        assert_viable(grammar, completion)
        if completion.finish_reason == "stop":
            Order.model_validate_json(completion.text, strict=True)
    assert any(c.finish_reason == "stop" for c in completions)
    assert_engine_idle(llm)
