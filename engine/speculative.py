"""Speculative decoding by prompt lookup (vLLM's `speculative_config={"method": "ngram", ...}`).

Each step, a running request's last tokens are looked up earlier in its own sequence (prompt
and output); the tokens that followed there are proposed as drafts. The step computes the
request's last token and its drafts together, one position each, and samples every position;
each position samples as it would without speculation, and drafts are accepted while they
equal what was sampled. Against a draft that is one token for certain this is rejection
sampling exactly (d is kept with probability p(d), and where it is refused the token is drawn
from p without d), so each token is distributed as without speculation; a seeded request's
generator is wound back past the refused positions' draws, so it samples the same tokens.

A step then emits between 1 and drafts + 1 tokens for the cost of one forward over a few more
positions. On a GPU at small batches, decoding is bound by reading the weights and those
positions are nearly free; on a CPU they cost compute (benchmarks/speculative.py,
benchmarks/speculative_cost.py).

No draft model: prompt lookup pays off where answers repeat their context (editing code,
summaries that quote, retrieval-augmented answers, structured rewrites).
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import numpy as np

from engine.config import dict_option
from engine.sampling_params import is_int

SPECULATIVE_METHODS = ("ngram",)


@dataclass(slots=True, frozen=True)
class SpeculativeConfig:
    """vLLM's keys. The lookup tries the longest n-gram first, from prompt_lookup_max down to
    prompt_lookup_min tokens (one given: both; none: 5, vLLM's default); with
    disable_by_batch_size, no drafts while that many requests or more are running (large
    batches are bound by compute, where drafts that fail cost real work)."""

    method: str = "ngram"
    num_speculative_tokens: int = 0
    prompt_lookup_max: int = 5
    prompt_lookup_min: int = 5
    disable_by_batch_size: int | None = None

    @classmethod
    def from_value(cls, value: SpeculativeConfig | dict[str, Any] | str | None) -> SpeculativeConfig | None:
        """A config from vLLM's dict (or its JSON text, as `--speculative-config` takes it)."""
        if value is None or isinstance(value, SpeculativeConfig):
            return value
        value = dict_option(value, "speculative_config")
        known = {"method", "num_speculative_tokens", "prompt_lookup_max", "prompt_lookup_min",
                 "disable_by_batch_size"}
        unknown = sorted(set(value) - known)
        if unknown:
            raise ValueError(f"speculative_config key {unknown[0]!r} is not supported (stoke takes {sorted(known)})")
        method = value.get("method")
        if method == "[ngram]":  # vLLM's older spelling
            method = "ngram"
        if method not in SPECULATIVE_METHODS:
            raise ValueError(f"speculative_config method must be one of {SPECULATIVE_METHODS} (prompt lookup; "
                             f"stoke has no draft models), got {method!r}")
        k = value.get("num_speculative_tokens")
        if not is_int(k) or k < 1:
            raise ValueError(f"speculative_config num_speculative_tokens must be an integer >= 1, got {k!r}")
        low, high = value.get("prompt_lookup_min"), value.get("prompt_lookup_max")
        for name, n in (("prompt_lookup_min", low), ("prompt_lookup_max", high)):
            if n is not None and (not is_int(n) or n < 1):
                raise ValueError(f"speculative_config {name} must be an integer >= 1, got {n!r}")
        low, high = (5, 5) if low is None and high is None else (low if low is not None else high,
                                                                   high if high is not None else low)
        if low > high:
            raise ValueError(f"speculative_config prompt_lookup_min ({low}) exceeds prompt_lookup_max ({high})")
        limit = value.get("disable_by_batch_size")
        if limit is not None and (not is_int(limit) or limit < 1):
            raise ValueError(f"speculative_config disable_by_batch_size must be an integer >= 1, got {limit!r}")
        return cls(method, k, high, low, limit)

    def to_dict(self) -> dict[str, Any]:
        return {"method": self.method, "num_speculative_tokens": self.num_speculative_tokens,
                "prompt_lookup_max": self.prompt_lookup_max, "prompt_lookup_min": self.prompt_lookup_min,
                "disable_by_batch_size": self.disable_by_batch_size}


class NgramProposer:
    """Drafts by prompt lookup. Each sequence's tokens are kept as an array from one step to
    the next (a sequence only grows), so a step converts only its new tokens."""

    def __init__(self, config: SpeculativeConfig) -> None:
        self.config = config
        self._kept: dict[object, tuple[np.ndarray, int]] = {}  # key → (buffer, tokens in it)

    def propose(self, key: object, token_ids: list[int], max_drafts: int) -> list[int]:
        """Up to min(num_speculative_tokens, max_drafts) tokens that followed the latest earlier
        occurrence of the sequence's longest matching suffix ([] when none matches)."""
        k = min(self.config.num_speculative_tokens, max_drafts)
        if k < 1:
            return []
        tokens = self._array(key, token_ids)
        n_total = tokens.shape[0]
        for n in range(min(self.config.prompt_lookup_max, n_total - 1), self.config.prompt_lookup_min - 1, -1):
            suffix = tokens[n_total - n:]
            # Starts of earlier occurrences: each must leave a token after it, before the suffix itself.
            starts = np.flatnonzero(tokens[:n_total - n] == suffix[0])
            for j in range(1, n):
                if starts.size == 0:
                    break
                starts = starts[tokens[starts + j] == suffix[j]]
            if starts.size:
                after = int(starts[-1]) + n
                return tokens[after:after + k].tolist()
        return []

    def _array(self, key: object, token_ids: list[int]) -> np.ndarray:
        n = len(token_ids)
        kept = self._kept.get(key)
        if kept is None or kept[1] > n:
            buf = np.empty(2 * n + 16, dtype=np.int64)
            buf[:n] = token_ids
        else:
            buf, have = kept
            if n > buf.shape[0]:
                grown = np.empty(2 * n, dtype=np.int64)
                grown[:have] = buf[:have]
                buf = grown
            buf[have:n] = token_ids[have:]
        self._kept[key] = buf, n
        return buf[:n]

    def forget(self, key: object) -> None:
        """The sequence finished: its array goes."""
        self._kept.pop(key, None)
