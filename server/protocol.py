"""OpenAI request bodies (pydantic): what the `openai` SDK and vLLM users send.

Only types live here; value checks (ranges, caps) happen when a request becomes
SamplingParams (server/serving.py): both are 400s, their codes tell them apart (invalid_type,
invalid_value).
Unknown fields are ignored, as OpenAI-compatible servers do.
"""

from __future__ import annotations

import re
from typing import Any, Literal

from pydantic import BaseModel, ConfigDict, model_validator
from pydantic_core import PydanticCustomError

from server import errors

# Half a UTF-16 pair: valid JSON ("\ud800"), but no UTF-8 text, so the tokenizer, the pipe to
# the worker and the log line would each fail on it.
_LONE_SURROGATE = re.compile("[\ud800-\udfff]")


# Fields pydantic types as token ids (list[int] or list[list[int]] among their forms): a list
# of them that starts with an int holds only ints, so a 100k-token prompt is not walked.
_TOKEN_FIELDS = frozenset({"prompt", "stop_token_ids", "tokens", "input"})


def _has_lone_surrogate(value: Any, token_ids: bool = False) -> bool:
    """Walked with a stack, not recursion: a body nests JSON as deep as the parser allows, and a
    RecursionError here was a 500 (and two tracebacks in the log) for a 1 KB request."""
    stack = [(value, token_ids)]
    while stack:
        value, token_ids = stack.pop()
        if isinstance(value, str):
            if not value.isascii() and _LONE_SURROGATE.search(value) is not None:
                return True
        elif isinstance(value, list):
            if not (token_ids and value and type(value[0]) is int):
                stack.extend((v, token_ids) for v in value)
        elif isinstance(value, dict):
            stack.extend((k, False) for k in value)
            stack.extend((v, False) for v in value.values())
    return False  # numbers, None, and nested models (each checked itself)


class _Model(BaseModel):
    model_config = ConfigDict(extra="ignore", protected_namespaces=())

    @model_validator(mode="after")
    def _text_is_unicode(self) -> _Model:
        fields = [(name, value, name in _TOKEN_FIELDS) for name, value in self.__dict__.items()]
        fields += [(name, value, False) for name, value in (self.__pydantic_extra__ or {}).items()]
        for name, value, token_ids in fields:
            if _has_lone_surrogate(value, token_ids):
                raise PydanticCustomError("lone_surrogate", "half a UTF-16 surrogate pair in '{field}'",
                                          {"field": name})
        return self


class StreamOptions(_Model):
    include_usage: bool | None = False
    continuous_usage_stats: bool | None = False  # vLLM's: usage in every chunk too


class _SamplingRequest(_Model):
    model: str | None = None
    n: int | None = 1
    max_tokens: int | None = None
    temperature: float | None = None
    top_p: float | None = None
    stop: str | list[str] | None = None
    seed: int | None = None
    presence_penalty: float | None = None
    frequency_penalty: float | None = None
    stream: bool | None = False
    stream_options: StreamOptions | None = None
    user: str | None = None
    logit_bias: dict[str, float] | None = None
    # vLLM's extras
    top_k: int | None = None
    min_p: float | None = None
    repetition_penalty: float | None = None
    min_tokens: int | None = 0
    ignore_eos: bool | None = False
    stop_token_ids: list[int] | None = None
    skip_special_tokens: bool | None = True
    include_stop_str_in_output: bool | None = False
    truncate_prompt_tokens: int | None = None  # keep the prompt's last k tokens (-1: max_model_len)
    priority: int | None = 0  # lower runs earlier; needs --scheduling-policy priority
    # Beam search (vLLM's): n beams, the n best sequences as the choices
    use_beam_search: bool | None = False
    length_penalty: float | None = 1.0
    early_stopping: bool | Literal["never"] | None = False
    # Structured outputs: OpenAI's response_format (text, json_object, json_schema), or vLLM's
    # structured_outputs (json, json_object, choice, regex) and its older guided_json /
    # guided_choice / guided_regex
    response_format: dict[str, Any] | None = None
    structured_outputs: dict[str, Any] | None = None
    guided_json: dict[str, Any] | str | None = None
    guided_choice: list[str] | None = None
    guided_regex: str | None = None
    guided_grammar: str | None = None  # an EBNF grammar (GBNF), as structured_outputs' grammar


class CompletionRequest(_SamplingRequest):
    # Token ids before strings: a union tries each member and a failed list[str] builds an error
    # per element, so a 100k-id prompt took 40 ms to validate (6 ms in this order), on the loop.
    prompt: str | list[int] | list[list[int]] | list[str]
    echo: bool | None = False
    logprobs: int | None = None
    suffix: str | None = None
    best_of: int | None = None


class ContentPart(_Model):
    model_config = ConfigDict(extra="allow")
    type: str
    text: str | None = None


class ChatMessage(_Model):
    model_config = ConfigDict(extra="allow")
    role: str
    content: str | list[ContentPart] | None = None
    name: str | None = None


class ChatCompletionRequest(_SamplingRequest):
    messages: list[ChatMessage]
    max_completion_tokens: int | None = None
    logprobs: bool | None = False
    top_logprobs: int | None = None
    tools: list[dict[str, Any]] | None = None
    tool_choice: Any = None
    parallel_tool_calls: bool | None = True
    add_generation_prompt: bool | None = True
    continue_final_message: bool | None = False
    chat_template_kwargs: dict[str, Any] | None = None
    chat_template: str | None = None  # vLLM's: needs a server started with --trust-request-chat-template
    include_reasoning: bool | None = True  # vLLM's: False leaves a reasoning model's thinking out


class ResponsesRequest(_Model):
    """OpenAI's Responses API body (server/responses.py turns it into a chat)."""

    model: str | None = None
    input: str | list[dict[str, Any]]
    instructions: str | None = None
    max_output_tokens: int | None = None
    temperature: float | None = None
    top_p: float | None = None
    tools: list[dict[str, Any]] | None = None
    tool_choice: Any = None
    parallel_tool_calls: bool | None = True
    text: dict[str, Any] | None = None  # {"format": {"type": "text" | "json_object" | "json_schema", ...}}
    stream: bool | None = False
    user: str | None = None
    metadata: dict[str, Any] | None = None
    store: bool | None = None
    previous_response_id: str | None = None
    reasoning: dict[str, Any] | None = None
    truncation: str | None = None
    include: list[str] | None = None
    top_logprobs: int | None = None
    # Not served (a 400, not silently ignored): state or modes stoke does not keep
    conversation: Any = None
    background: bool | None = None
    prompt: Any = None
    # vLLM's extras, as a chat's
    seed: int | None = None
    top_k: int | None = None
    min_p: float | None = None
    repetition_penalty: float | None = None
    stop: str | list[str] | None = None
    priority: int | None = 0
    chat_template_kwargs: dict[str, Any] | None = None


class PoolingRequest(_Model):
    """What every pooling body has (embeddings, score, rerank, classify): each prompt an engine
    request that computes it and samples nothing."""

    model: str | None = None
    user: str | None = None
    # vLLM's extras
    truncate_prompt_tokens: int | None = None  # keep each prompt's last k tokens (-1: max_model_len)
    priority: int | None = 0  # lower runs earlier; needs --scheduling-policy priority


class InputOrChat(PoolingRequest):
    """A pooling body of prompts (`input`: a text, token ids, or a list of either) or, as vLLM's
    chat-form embeddings and classifications, of one conversation (`messages`, rendered by the
    chat template as a chat's)."""

    # Token ids before strings, as a completion's prompt (a failed list[str] is slow on 100k ids).
    input: str | list[int] | list[list[int]] | list[str] | None = None
    messages: list[ChatMessage] | None = None
    add_special_tokens: bool | None = None  # default: True for input, False for messages (their template's)
    add_generation_prompt: bool | None = False
    continue_final_message: bool | None = False
    chat_template: str | None = None
    chat_template_kwargs: dict[str, Any] | None = None
    tools: list[dict[str, Any]] | None = None  # shown to the template, as a chat's


class EmbeddingRequest(InputOrChat):
    """OpenAI's embeddings body (server/embeddings.py), with vLLM's extras (its chat form too)."""

    # "base64": each vector's float32 bytes (little-endian), what the openai SDK asks for unless
    # told otherwise (it decodes them itself)
    encoding_format: Literal["float", "base64"] | None = "float"
    dimensions: int | None = None  # Matryoshka models only: the vector's first this many, normalised
    normalize: bool | None = None  # None: as the model's pooler config says


# /score's pairs of fields, as vLLM takes them: text_1 and text_2, or its newer names.
SCORE_SIDES = (("text_1", "text_2"), ("data_1", "data_2"), ("queries", "documents"), ("queries", "items"))


class PairsRequest(PoolingRequest):
    """What a body of scored pairs has (/score, /rerank): a cross-encoder's options."""

    use_activation: bool | None = None  # false: the raw logit
    chat_template_kwargs: dict[str, Any] | None = None  # the score template's variables (--chat-template)


class ScoreRequest(PairsRequest):
    """vLLM's /score body (server/scoring.py): pairs of texts, 1:1, 1:N or N:N, as `text_1` and
    `text_2` or any other of SCORE_SIDES."""

    text_1: str | list[str] | None = None
    text_2: str | list[str] | None = None
    data_1: str | list[str] | None = None
    data_2: str | list[str] | None = None
    queries: str | list[str] | None = None
    documents: str | list[str] | None = None
    items: str | list[str] | None = None

    def sides(self) -> tuple[str, str]:
        """The names of the fields the body's pairs come from; errors.invalid when it names
        no pair, half of one, or fields of two."""
        present = [name for name in dict.fromkeys(n for pair in SCORE_SIDES for n in pair)
                   if getattr(self, name) is not None]
        for first, second in SCORE_SIDES:
            if set(present) == {first, second}:
                return first, second
        for first, second in SCORE_SIDES:
            if present == [first]:
                raise errors.invalid(f"missing required parameter '{second}'", param=second,
                                     code="missing_required_parameter")
            if present == [second]:
                raise errors.invalid(f"missing required parameter '{first}'", param=first,
                                     code="missing_required_parameter")
        if not present:
            raise errors.invalid("missing required parameter 'text_1' (the pairs' first texts; and 'text_2', their "
                                 "second; or data_1 and data_2, or queries with documents or items)",
                                 param="text_1", code="missing_required_parameter")
        raise errors.invalid(f"a score's pairs come from one pair of fields (text_1 and text_2, data_1 and data_2, "
                             f"queries with documents or items), got {', '.join(present)}", param=present[-1])


class RerankDocument(_Model):
    """A document as Cohere's rerank API may send it: an object with its text."""

    text: str


class RerankRequest(PairsRequest):
    """vLLM's /rerank body, Jina's and Cohere's API (server/scoring.py): a query's score with
    each document."""

    query: str
    documents: list[str | RerankDocument]
    top_n: int | None = 0  # the best this many (0 or none: all)
    return_documents: bool | None = True  # false: results without their document's text (Cohere's)
    max_tokens_per_doc: int | None = None  # Cohere's: each document read as its first this many tokens


class ClassificationRequest(InputOrChat):
    """vLLM's /classify body (server/scoring.py): a sequence classifier's labels for each input
    (or for the conversation of its chat form)."""

    use_activation: bool | None = None  # false: the raw logits


class TokenizeRequest(_Model):
    """vLLM's /tokenize: a prompt, or chat messages rendered with the model's template."""

    model: str | None = None
    prompt: str | None = None
    messages: list[ChatMessage] | None = None
    add_special_tokens: bool | None = None  # default: True for a prompt, False for messages
    add_generation_prompt: bool | None = True
    continue_final_message: bool | None = False
    chat_template_kwargs: dict[str, Any] | None = None
    chat_template: str | None = None  # as a chat's
    tools: list[dict[str, Any]] | None = None  # shown to the template, as a chat's


class LoadLoRAAdapterRequest(_Model):
    """vLLM's /v1/load_lora_adapter."""

    lora_name: str
    lora_path: str


class UnloadLoRAAdapterRequest(_Model):
    """vLLM's /v1/unload_lora_adapter."""

    lora_name: str


class DetokenizeRequest(_Model):
    model: str | None = None
    tokens: list[int]
