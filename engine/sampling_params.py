"""Per-request sampling parameters, vLLM-compatible names; validated on construction (and
the engine's copy of them when a request is added)."""

from __future__ import annotations

from dataclasses import dataclass, field

import numpy as np

from engine.structured_outputs import StructuredOutputsParams

LOGIT_BIAS_RANGE = (-100.0, 100.0)  # OpenAI's
SEED_RANGE = (-(2 ** 63), 2 ** 63 - 1)  # a signed 64-bit integer: sample i draws with seed + i


@dataclass(slots=True)
class SamplingParams:
    n: int = 1
    max_tokens: int | None = 16  # None: as long as the context and the KV pool allow
    min_tokens: int = 0
    temperature: float = 1.0
    top_p: float = 1.0
    top_k: int = 0  # 0 or -1: disabled
    min_p: float = 0.0
    presence_penalty: float = 0.0
    frequency_penalty: float = 0.0
    repetition_penalty: float = 1.0
    seed: int | None = None
    stop: list[str] | str | None = None
    stop_token_ids: list[int] | None = None
    ignore_eos: bool = False
    logprobs: int | None = None  # None: no logprobs; k: the sampled token's plus the top k
    prompt_logprobs: int | None = None  # the same for every prompt token after the first
    skip_special_tokens: bool = True
    include_stop_str_in_output: bool = False
    detokenize: bool = True  # False: token ids only, no text (no stop strings then)
    # Offline (vLLM's): keep the prompt's last k tokens; -1: max_model_len. The server applies
    # its request's own before the prompt reaches the engine.
    truncate_prompt_tokens: int | None = None
    # token id → added to its logit before the penalties and sampling (OpenAI's logit_bias);
    # keys may arrive as decimal strings (JSON object keys)
    logit_bias: dict[int, float] | None = None
    # the answer held to a JSON schema, any JSON object, a choice or a regex (a dict of its
    # fields is taken too: what the server's worker receives)
    structured_outputs: StructuredOutputsParams | None = None
    _stop_list: list[str] = field(default_factory=list, repr=False)
    # logit_bias as (token ids, biases) arrays, for the sampler's scatter every step
    _bias_arrays: tuple[np.ndarray, np.ndarray] | None = field(default=None, repr=False)

    def __post_init__(self) -> None:
        """Normalise and check every field, and derive what the engine reads (the stop list, the
        bias arrays). The engine runs each request on a copy, made (so checked) when it is
        added: fields set after construction take effect (vLLM users take
        `llm.get_default_sampling_params()` and set `.stop = ...`), and later edits do not
        reach requests already running."""
        if isinstance(self.stop, str):
            self._stop_list = [self.stop]
        elif self.stop is None or isinstance(self.stop, (list, tuple)):
            self._stop_list = list(self.stop or [])
        else:
            raise ValueError(f"stop must be a string or a list of strings, got {self.stop!r:.100}")
        if self.stop_token_ids is not None and not isinstance(self.stop_token_ids, (list, tuple)):
            raise ValueError(f"stop_token_ids must be a list of token ids, got {self.stop_token_ids!r:.100}")
        self.stop_token_ids = list(self.stop_token_ids or [])
        if self.top_k == -1:
            self.top_k = 0
        self._validate()
        self._bias_arrays = None
        if self.logit_bias:
            n = len(self.logit_bias)
            self._bias_arrays = (np.fromiter(self.logit_bias.keys(), dtype=np.int64, count=n),
                                 np.fromiter(self.logit_bias.values(), dtype=np.float32, count=n))

    def check_vocab(self, vocab_size: int) -> None:
        """Raise ValueError if logit_bias names a token id the model does not have, or top
        logprobs ask for more tokens than it has."""
        if self._bias_arrays is not None and self._bias_arrays[0].max() >= vocab_size:
            raise ValueError(f"logit_bias token ids must be < the vocabulary size {vocab_size}, "
                             f"got {int(self._bias_arrays[0].max())}")
        for name in ("logprobs", "prompt_logprobs"):
            k = getattr(self, name)
            if k is not None and k > vocab_size:
                raise ValueError(f"{name} must be <= the vocabulary size {vocab_size}, got {k}")

    @property
    def logit_bias_arrays(self) -> tuple[np.ndarray, np.ndarray] | None:
        """(token ids, biases) of logit_bias; None without one."""
        return self._bias_arrays

    @property
    def stop_strings(self) -> list[str]:
        return self._stop_list

    @property
    def greedy(self) -> bool:
        return self.temperature < 1e-5

    def _validate(self) -> None:
        def fail(name: str, rule: str) -> None:
            raise ValueError(f"{name} {rule}, got {getattr(self, name)!r}")

        if not is_int(self.n) or self.n < 1:
            fail("n", "must be an integer >= 1")
        if self.max_tokens is not None and (not is_int(self.max_tokens) or self.max_tokens < 1):
            fail("max_tokens", "must be an integer >= 1")
        if not is_int(self.min_tokens) or self.min_tokens < 0:
            fail("min_tokens", "must be an integer >= 0")
        if self.max_tokens is not None and self.min_tokens > self.max_tokens:
            raise ValueError(
                f"min_tokens ({self.min_tokens}) must be <= max_tokens ({self.max_tokens})"
            )
        if not self.temperature >= 0.0:
            fail("temperature", "must be >= 0")
        if not 0.0 < self.top_p <= 1.0:
            fail("top_p", "must be in (0, 1]")
        if not is_int(self.top_k) or self.top_k < 0:
            fail("top_k", "must be -1, 0 (disabled) or a positive integer")
        if not 0.0 <= self.min_p <= 1.0:
            fail("min_p", "must be in [0, 1]")
        if not -2.0 <= self.presence_penalty <= 2.0:
            fail("presence_penalty", "must be in [-2, 2]")
        if not -2.0 <= self.frequency_penalty <= 2.0:
            fail("frequency_penalty", "must be in [-2, 2]")
        if not self.repetition_penalty > 0.0:
            fail("repetition_penalty", "must be > 0")
        if self.logprobs is not None and (not is_int(self.logprobs) or self.logprobs < 0):
            fail("logprobs", "must be None or an integer >= 0")
        if self.prompt_logprobs is not None and (not is_int(self.prompt_logprobs) or self.prompt_logprobs < 0):
            fail("prompt_logprobs", "must be None or an integer >= 0")
        if self.seed is not None and not (is_int(self.seed) and SEED_RANGE[0] <= self.seed <= SEED_RANGE[1]):
            fail("seed", "must be an integer that fits in a signed 64-bit integer")
        for name in ("ignore_eos", "skip_special_tokens", "include_stop_str_in_output", "detokenize"):
            if not isinstance(getattr(self, name), bool):
                fail(name, "must be true or false")
        k = self.truncate_prompt_tokens
        if k is not None and not (is_int(k) and (k == -1 or k >= 1)):
            fail("truncate_prompt_tokens", "must be -1 or >= 1")
        if any(not isinstance(s, str) or not s for s in self._stop_list):
            fail("stop", "must be a non-empty string or a list of non-empty strings")
        if self._stop_list and not self.detokenize:
            fail("stop", "needs detokenize=True (stop strings are matched in the text)")
        if any(not is_int(t) or t < 0 for t in self.stop_token_ids):
            fail("stop_token_ids", "must be non-negative integers")
        if self.logit_bias is not None:
            self.logit_bias = _token_biases(self.logit_bias)
        if isinstance(self.structured_outputs, dict):
            try:
                self.structured_outputs = StructuredOutputsParams(**self.structured_outputs)
            except TypeError as exc:  # a field it does not have
                raise ValueError(f"structured_outputs: {exc}") from None
        if self.structured_outputs is not None:
            if not isinstance(self.structured_outputs, StructuredOutputsParams):
                fail("structured_outputs", "must be a StructuredOutputsParams")
            if self.ignore_eos:
                raise ValueError("ignore_eos cannot be set with structured_outputs: the answer ends where its "
                                 "grammar does")


def truncate_prompt(tokens: list[int], keep: int, max_model_len: int) -> list[int]:
    """vLLM's truncate_prompt_tokens: the prompt's last `keep` tokens (-1: max_model_len), the
    same list when it is no longer."""
    if keep == -1:
        keep = max_model_len
    if keep < 1:
        raise ValueError(f"truncate_prompt_tokens must be -1 or >= 1, got {keep}")
    if keep > max_model_len:
        raise ValueError(f"truncate_prompt_tokens ({keep}) is greater than max_model_len ({max_model_len})")
    return tokens[-keep:] if len(tokens) > keep else tokens


def is_int(value: object) -> bool:
    """An int, and not a bool (which Python counts as one)."""
    return isinstance(value, int) and not isinstance(value, bool)


def _token_biases(bias: object) -> dict[int, float]:
    """logit_bias with int keys (decimal strings accepted) and float biases in range."""
    low, high = LOGIT_BIAS_RANGE
    rule = f"logit_bias must map token ids (integers >= 0) to numbers in [{low:g}, {high:g}]"
    if not isinstance(bias, dict):
        raise ValueError(f"{rule}, got {bias!r:.100}")
    out: dict[int, float] = {}
    for key, value in bias.items():
        if isinstance(key, int) and not isinstance(key, bool):
            token: int | None = key
        elif isinstance(key, str) and key.isascii() and key.isdigit():
            token = int(key)
        else:
            token = None
        ok_value = isinstance(value, (int, float)) and not isinstance(value, bool) and low <= value <= high
        if token is None or not 0 <= token < 2**63 or not ok_value:  # past int64: no such token either
            raise ValueError(f"{rule}, got {key!r:.40}: {value!r:.40}")
        out[token] = float(value)
    return out
