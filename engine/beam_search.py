"""Beam search: its params, its outputs (vLLM's shapes), and the search itself, step by step.

The search is transformers' `generate(num_beams=W)` (with `length_penalty` and `early_stopping`
as it reads them), so its sequences are transformers' for the same model. Each step, every
running beam's next-token logprobs are added to its cumulative logprob; of all the beams'
candidates the K best are kept (K = max(2, 1 + the number of end tokens) x W, so that W of them
go on whatever ends). A candidate among the W best that ends (an end token, or max_tokens
reached) is a finished hypothesis, scored by its cumulative logprob over its length (end token
included) to the power `length_penalty`, and the W best hypotheses are kept; the W best
candidates that do not end are the next step's beams. The search stops when no running beam
can beat the W-th hypothesis any more (`early_stopping` False: judged at the current length, a
heuristic; "never": at max_tokens when length_penalty > 0, exact), when W hypotheses are found
(`early_stopping` True), or at max_tokens.

This module only chooses: `LLMEngine` runs each beam as a scheduler request; a beam continues
its parent's request if it is the parent's first child, else forks a request of its own with
the parent's KV (see engine/engine.py).
"""

from __future__ import annotations

from collections.abc import Collection
from itertools import islice
from dataclasses import dataclass, field
from typing import Any, Literal

from engine.sampling_params import is_int

# A step's logprobs of one beam: its top K (token id, logprob), best first.
TopLogprobs = list[tuple[int, float]]


@dataclass(slots=True)
class BeamSearchParams:
    """vLLM's BeamSearchParams, with transformers' `early_stopping` (False, True or "never"),
    `logprobs` (per output token, the chosen token's logprob and the top k of its step, k at
    most 2 x beam_width) and `skip_special_tokens` (of the text, as SamplingParams'). As in vLLM, `temperature` does not change the search: its scores are
    the model's own logprobs."""

    beam_width: int
    max_tokens: int
    ignore_eos: bool = False
    temperature: float = 0.0
    length_penalty: float = 1.0
    include_stop_str_in_output: bool = False
    early_stopping: bool | Literal["never"] = False
    logprobs: int | None = None
    skip_special_tokens: bool = True

    def __post_init__(self) -> None:
        def fail(name: str, rule: str) -> None:
            raise ValueError(f"{name} {rule}, got {getattr(self, name)!r}")

        if not is_int(self.beam_width) or self.beam_width < 1:
            fail("beam_width", "must be an integer >= 1")
        if not is_int(self.max_tokens) or self.max_tokens < 1:
            fail("max_tokens", "must be an integer >= 1")
        if not isinstance(self.temperature, (int, float)) or isinstance(self.temperature, bool) \
                or not self.temperature >= 0.0:
            fail("temperature", "must be a number >= 0")
        if not isinstance(self.length_penalty, (int, float)) or isinstance(self.length_penalty, bool) \
                or self.length_penalty != self.length_penalty or abs(self.length_penalty) == float("inf"):
            fail("length_penalty", "must be a finite number")
        if self.early_stopping not in (False, True, "never") or not isinstance(self.early_stopping, (bool, str)):
            fail("early_stopping", "must be False, True or 'never'")
        if self.logprobs is not None and (not is_int(self.logprobs) or not 0 <= self.logprobs <= 2 * self.beam_width):
            fail("logprobs", f"must be None or an integer from 0 to 2 x beam_width ({2 * self.beam_width})")

    def num_candidates(self, num_end_tokens: int) -> int:
        """K: how many continuations of all the beams each step keeps (transformers' rule)."""
        return max(2, 1 + num_end_tokens) * self.beam_width


@dataclass(slots=True, eq=False)
class Beam:
    """A running beam or a finished hypothesis: its last output token, that token's logprob and
    the top logprobs of its step (the logprobs of vLLM's BeamSearchSequence), after the beam it
    continues. A chain, so that extending a beam copies nothing: its lists are read once, at the
    end."""

    parent: Beam | None = None  # None: the prompt's, before any output token
    token: int = -1
    logprob: float = 0.0
    top: TopLogprobs = field(default_factory=list)
    length: int = 0  # output tokens
    cumulative_logprob: float = 0.0
    score: float = 0.0  # a hypothesis's: cumulative_logprob / length ** length_penalty
    ended_by_token: bool = False  # its last token is an end token (else it reached max_tokens)

    def extended(self, token: int, logprob: float, top: TopLogprobs) -> Beam:
        return Beam(self, token, logprob, top, self.length + 1, self.cumulative_logprob + logprob)

    def chain(self) -> list[Beam]:
        """The beams from its first output token to itself."""
        chain, beam = [], self
        while beam.parent is not None:
            chain.append(beam)
            beam = beam.parent
        return chain[::-1]

    @property
    def token_ids(self) -> list[int]:
        return [b.token for b in self.chain()]


@dataclass(slots=True)
class BeamSearchSequence:
    """vLLM's: one of a prompt's best sequences. `tokens` holds the prompt's then the output's;
    `text` is the output's (its end token's text left out, unless include_stop_str_in_output)."""

    tokens: list[int]
    logprobs: list[dict[int, Any]]
    cum_logprob: float = 0.0
    text: str | None = None
    finish_reason: str | None = None
    stop_reason: int | str | None = None
    lora_request: Any = None


@dataclass(slots=True)
class BeamSearchOutput:
    """vLLM's: a prompt's best sequences, best first."""

    sequences: list[BeamSearchSequence] = field(default_factory=list)


class BeamSearch:
    """One prompt's search. `step` takes the running beams' top logprobs and chooses the next
    beams; `finished` holds the best hypotheses so far, best first: the search's sequences once
    it is `done` (W of them, unless the vocabulary offered fewer candidates)."""

    def __init__(self, params: BeamSearchParams, end_token_ids: Collection[int], max_tokens: int) -> None:
        self.width = params.beam_width
        self.length_penalty = float(params.length_penalty)
        self.early_stopping = params.early_stopping
        self.end_token_ids = frozenset(() if params.ignore_eos else end_token_ids)
        self.num_candidates = params.num_candidates(len(self.end_token_ids))
        self.max_tokens = max_tokens
        self.running: list[Beam] = [Beam()]
        self.finished: list[Beam] = []
        self.done = False
        self._improvable = True  # a running beam may still beat the W-th hypothesis

    @property
    def _full(self) -> bool:
        return len(self.finished) == self.width

    def step(self, tops: list[TopLogprobs]) -> list[tuple[int, Beam]]:
        """tops[i]: running beam i's top K (token, logprob) this step, best first. The next
        running beams, best first, each with the index of the beam it continues."""
        if self.done or len(tops) != len(self.running):
            raise ValueError(f"a step takes the top logprobs of the {len(self.running)} running beams")
        length = self.running[0].length + 1
        # (cumulative logprob, beam, rank in its top): ties go to the earlier beam, then the likelier token
        candidates = sorted(((beam.cumulative_logprob + lp, i, r) for i, beam in enumerate(self.running)
                             for r, (_, lp) in enumerate(tops[i])), key=lambda c: (-c[0], c[1], c[2]))
        candidates = candidates[:self.num_candidates]
        at_max = length >= self.max_tokens

        def ends(i: int, r: int) -> bool:
            return at_max or tops[i][r][0] in self.end_token_ids

        # Only the W best candidates may finish; the rest are there so that W beams go on.
        if self._improvable and not (self.early_stopping is True and self._full):
            for _, i, r in candidates[:self.width]:
                if ends(i, r):
                    self._add_hypothesis(self._extend(i, r, tops), length,
                                         ended_by_token=tops[i][r][0] in self.end_token_ids)
        going_on = (c for c in candidates if not ends(c[1], c[2]))
        following = [(i, self._extend(i, r, tops)) for _, i, r in islice(going_on, self.width)]
        self.running = [beam for _, beam in following]
        if following and self._improvable and self._full:
            best_length = self.max_tokens if self.early_stopping == "never" and self.length_penalty > 0 else length
            self._improvable = following[0][1].cumulative_logprob / best_length ** self.length_penalty \
                > self.finished[-1].score
        # One beam is greedy search to transformers: done at its first hypothesis, whatever early_stopping says.
        self.done = not following or not self._improvable or self._full and (self.early_stopping is True
                                                                              or self.width == 1)
        if self.done:
            self.running = []
        return following if not self.done else []

    def _extend(self, i: int, r: int, tops: list[TopLogprobs]) -> Beam:
        token, logprob = tops[i][r]
        return self.running[i].extended(token, logprob, tops[i])

    def _add_hypothesis(self, beam: Beam, length: int, ended_by_token: bool) -> None:
        beam.score = beam.cumulative_logprob / length ** self.length_penalty
        beam.ended_by_token = ended_by_token
        # stable: of equal scores, the hypothesis found first stays ahead
        self.finished = sorted(self.finished + [beam], key=lambda b: -b.score)[:self.width]

