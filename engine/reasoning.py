"""Reasoning models' thinking, as vLLM's `--reasoning-parser` reads it: DeepSeek-R1 and Qwen3
(and the models that think as they do: QwQ, the R1 distills) write their reasoning between
`<think>` and `</think>`, then the answer.

- `deepseek_r1`: the answer starts in reasoning (R1 leaves out `<think>`; R1-0528 and the
  distills write it or find it at the prompt's end): everything up to `</think>` is reasoning.
- `qwen3`: the answer thinks if it starts with `<think>`, or if the prompt ends with it (the
  Qwen3-Thinking-2507 template); otherwise (`enable_thinking=False` ends the prompt with
  `<think></think>`) it is all content.

For both, a prompt that ends with `</think>` (after whitespace) starts in the content, and one
that ends with `<think>` in reasoning. Reasoning never closed (EOS inside it, max_tokens) is all
reasoning, the content None.

The rules are kept twice, over the same prompt: on token ids (`ReasoningPhase`), where the
engine holds a structured output's grammar back until the reasoning ended (`ReasoningGuide`,
as vLLM's structured outputs with a reasoning parser) and the server counts reasoning tokens;
and on text (`ReasoningSplitter`), which splits an answer, whole or streamed, into reasoning
and content. The tags are single tokens of the model's vocabulary (and stay in the text when
they are special tokens: engine/detokenizer.py's `special_skipped`), so both agree on an answer
that writes each tag as its token; one spelled out in pieces ends the reasoning in the text
only (vLLM's gating has the same limit).
"""

from __future__ import annotations

import copy
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any

from engine.detokenizer import held_back, special_token_ids
from engine.token_masks import masks_along

if TYPE_CHECKING:
    import torch

    from engine.token_masks import Guide

REASONING_PARSERS = ("deepseek_r1", "qwen3")
START, END = "<think>", "</think>"

# Where an answer is in its thinking: "reasoning"; "content"; "first": its first token decides
# (`START` opens reasoning, anything else is content).
REASONING, CONTENT, FIRST = "reasoning", "content", "first"


@dataclass(frozen=True, slots=True)
class Reasoning:
    """A parser's rules for one model's tokenizer: the tags' token ids, and how an answer starts."""

    parser: str
    start_id: int
    end_id: int
    tags_special: bool  # the tags are special tokens: skip_special_tokens would drop their text
    tokenizer: Any = field(repr=False, compare=False)

    @classmethod
    def for_tokenizer(cls, parser: str, tokenizer: Any) -> Reasoning:
        """ValueError if the parser is unknown or the tokenizer lacks the tags as single tokens
        (as vLLM's parsers refuse such a model)."""
        if parser not in REASONING_PARSERS:
            raise ValueError(f"reasoning parser must be one of {REASONING_PARSERS}, got {parser!r:.40}")
        if tokenizer is None:
            raise ValueError(f"the {parser} reasoning parser needs the model's tokenizer, and this model has none")
        vocab = tokenizer.get_vocab()
        missing = [tag for tag in (START, END) if tag not in vocab]
        if missing:
            raise ValueError(f"the {parser} reasoning parser needs {' and '.join(missing)} as tokens of the "
                             "model's vocabulary, and this tokenizer has no such token")
        start, end, special = vocab[START], vocab[END], special_token_ids(tokenizer)
        return cls(parser, start, end, start in special or end in special, tokenizer)

    def opening(self, prompt_token_ids: list[int]) -> str:
        """Where an answer to this prompt starts: REASONING, CONTENT or FIRST."""
        for token in reversed(prompt_token_ids):
            if token == self.start_id:
                return REASONING
            if token == self.end_id:
                return CONTENT
            if self.tokenizer.decode([token]).strip():  # whitespace after a tag is read past
                break
        return REASONING if self.parser == "deepseek_r1" else FIRST

    def phase(self, prompt_token_ids: list[int]) -> ReasoningPhase:
        return ReasoningPhase(self, self.opening(prompt_token_ids))


class ReasoningPhase:
    """One answer's place in its thinking, token by token (the start and end tags count as
    reasoning tokens)."""

    __slots__ = ("reasoning", "phase", "reasoning_tokens", "at_start")

    def __init__(self, reasoning: Reasoning, phase: str) -> None:
        self.reasoning, self.phase = reasoning, phase
        self.reasoning_tokens = 0
        self.at_start = True  # no token taken yet: a START here opens reasoning, and is dropped

    def advance(self, token_id: int) -> None:
        at_start, self.at_start = self.at_start, False
        if at_start and token_id == self.reasoning.start_id and self.phase != CONTENT:
            self.phase = REASONING
        elif self.phase == FIRST:
            self.phase = CONTENT
        elif self.phase == REASONING and token_id == self.reasoning.end_id:
            self.phase = CONTENT
            self.reasoning_tokens += 1
            return
        if self.phase == REASONING:
            self.reasoning_tokens += 1

    def extend(self, token_ids: list[int]) -> ReasoningPhase:
        for token in token_ids:
            self.advance(token)
        return self


class ReasoningGuide:
    """A structured output's guide held back while its answer reasons: no mask until `</think>`,
    then the grammar's from its start. Where the first token decides (FIRST), that token may be
    `<think>` besides what the grammar allows. The Guide's interface, for the engine."""

    __slots__ = ("guide", "phase")

    def __init__(self, guide: Guide, phase: ReasoningPhase) -> None:
        self.guide, self.phase = guide, phase

    @property
    def ended(self) -> bool:
        return self.guide.ended

    def _free(self) -> bool:
        return self.phase.phase == REASONING

    def packed_mask(self) -> tuple[torch.Tensor | None, bool]:
        if self._free():
            return None, False
        bits, must_end = self.guide.packed_mask()
        if self.phase.phase == FIRST:
            start = self.phase.reasoning.start_id
            if start < bits.shape[0] * 8:
                bits = bits.clone()  # the cached mask is shared: read only
                bits[start // 8] |= 0x80 >> (start % 8)  # numpy's packbits order
            must_end = False
        return bits, must_end

    def must_end(self) -> bool:
        return self.phase.phase == CONTENT and self.guide.must_end()

    def dead_end(self) -> bool:
        return self.phase.phase == CONTENT and self.guide.dead_end()

    def advance(self, token_id: int) -> bool:
        """Take a sampled token; False if the grammar does not allow it (nothing moves)."""
        if self._free() or (self.phase.phase == FIRST and token_id == self.phase.reasoning.start_id):
            self.phase.advance(token_id)
            return True
        if not self.guide.advance(token_id):
            return False
        self.phase.advance(token_id)
        return True

    def masks_along(self, tokens: list[int]) -> list[tuple[torch.Tensor | None, bool]]:
        return masks_along(self, tokens)

    def __copy__(self) -> ReasoningGuide:  # a probe that moves apart from this guide
        return ReasoningGuide(copy.copy(self.guide), copy.copy(self.phase))


class ReasoningSplitter:
    """One answer's text, fed as it comes (`feed`), then `finish`ed: each returns the reasoning
    and the content it released. The tags themselves are in neither; whitespace is kept as
    the model wrote it (as vLLM's)."""

    __slots__ = ("phase", "_buffer", "_started", "reasoning", "content")

    def __init__(self, opening: str) -> None:
        self.phase = opening
        self._buffer = ""
        self._started = False  # the answer's start was read (a START there opens reasoning)
        self.reasoning: str | None = None  # the whole answer's, so far
        self.content: str | None = None

    def feed(self, text: str) -> tuple[str, str]:
        self._buffer += text
        return self._read(final=False)

    def finish(self) -> tuple[str, str]:
        return self._read(final=True)

    def read(self, text: str, final: bool) -> tuple[str, str]:
        """`feed`, and at the end (`final`) `finish` too: what both released (its reasoning
        always before its content)."""
        reasoning, content = self.feed(text)
        if final:
            more, rest = self.finish()
            reasoning, content = reasoning + more, content + rest
        return reasoning, content

    def split(self, text: str) -> tuple[str | None, str | None]:
        """A whole answer: (its reasoning, its content), None where it has none."""
        self.feed(text)
        self.finish()
        return self.reasoning, self.content

    def _read(self, final: bool) -> tuple[str, str]:
        reasoning = content = ""
        if not self._started:
            if self.phase != CONTENT and self._buffer.startswith(START):
                self._buffer = self._buffer[len(START):]
                self.phase = REASONING
            elif not final and START.startswith(self._buffer) and self.phase != CONTENT:
                return "", ""  # the tag's beginning, or nothing, so far
            elif self.phase == FIRST:
                self.phase = CONTENT
            self._started = True
        if self.phase == REASONING:
            end = self._buffer.find(END)
            if end >= 0:
                reasoning, self._buffer = self._buffer[:end], self._buffer[end + len(END):]
                self.phase = CONTENT
                self.reasoning = self.reasoning or ""  # closed: reasoning, if empty
            else:
                keep = 0 if final else held_back(self._buffer, END)
                reasoning, self._buffer = self._buffer[:len(self._buffer) - keep], self._buffer[len(self._buffer) - keep:]
        if self.phase == CONTENT:
            content, self._buffer = self._buffer, ""
        if reasoning:
            self.reasoning = (self.reasoning or "") + reasoning
        if content:
            self.content = (self.content or "") + content
        if final and self.reasoning is None and self.content is None and self.phase == CONTENT:
            self.content = ""  # an empty answer is empty content
        return reasoning, content
