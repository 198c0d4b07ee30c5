"""Embeddings, as vLLM's pooling: a request computes its prompt and gives back one vector, the
model's final hidden states pooled over its positions (its last token's, their mean, or the
first's), optionally truncated (Matryoshka) and L2-normalised. No token is sampled.

How a model pools is its `PoolerConfig`: the engine's `pooler_config` option, else what a
sentence-transformers checkpoint says (`modules.json`, its Pooling module's `config.json`, a
Normalize module), else vLLM's default for a decoder: the last token, normalised.
"""

from __future__ import annotations

import json
import os
from dataclasses import dataclass
from typing import Any

import torch

from engine.config import dict_option, read_hf_config
from engine.outputs import RequestMetrics
from engine.sampling_params import is_int

POOLING_TYPES = ("LAST", "MEAN", "CLS")

# sentence-transformers' Pooling module's modes that stoke computes (any other is refused).
_SENTENCE_TRANSFORMERS_MODES = {"pooling_mode_lasttoken": "LAST", "pooling_mode_mean_tokens": "MEAN",
                                "pooling_mode_cls_token": "CLS"}
_SENTENCE_TRANSFORMERS_MODULES = ("Transformer", "Pooling", "Normalize")


@dataclass(frozen=True, slots=True)
class PoolerConfig:
    """How the model's hidden states become one embedding."""

    pooling_type: str = "LAST"
    normalize: bool = True
    # Matryoshka: a request's `dimensions` truncate the embedding, to any size (True) or to
    # these; None: the model was not trained for it, and a request that asks is refused.
    matryoshka_dimensions: tuple[int, ...] | bool | None = None

    def __post_init__(self) -> None:
        if self.pooling_type not in POOLING_TYPES:
            raise ValueError(f"pooling_type must be one of {POOLING_TYPES}, got {self.pooling_type!r}")
        if not isinstance(self.normalize, bool):
            raise ValueError(f"normalize must be true or false, got {self.normalize!r}")
        dims = self.matryoshka_dimensions
        if not (dims is None or isinstance(dims, bool)
                or (isinstance(dims, tuple) and dims and all(is_int(d) and d >= 1 for d in dims))):
            raise ValueError(f"matryoshka_dimensions must be a list of sizes or true, got {dims!r}")

    @staticmethod
    def for_model(path: str, override: dict[str, Any] | str | None,
                  hf_overrides: dict[str, Any] | str | None = None) -> PoolerConfig:
        """The engine's `pooler_config` (a dict or its JSON: pooling_type, normalize,
        matryoshka_dimensions) over what the checkpoint at `path` says (its config.json with
        `hf_overrides` over it)."""
        hf_config = read_hf_config(path, hf_overrides)
        found = _sentence_transformers_pooling(path) or {}
        dims = hf_config.get("matryoshka_dimensions")
        found["matryoshka_dimensions"] = tuple(dims) if dims else (True if hf_config.get("is_matryoshka") else None)
        override = dict(dict_option(override, "pooler_config") or {})
        unknown = sorted(set(override) - {"pooling_type", "normalize", "matryoshka_dimensions"})
        if unknown:
            raise ValueError(f"pooler_config takes pooling_type, normalize and matryoshka_dimensions, not {unknown}")
        if isinstance(override.get("pooling_type"), str):
            override["pooling_type"] = override["pooling_type"].upper()
        if isinstance(override.get("matryoshka_dimensions"), list):
            override["matryoshka_dimensions"] = tuple(override["matryoshka_dimensions"])
        return PoolerConfig(**(found | override))

    def check_dimensions(self, dimensions: int | None, hidden_size: int) -> None:
        """ValueError for a request's `dimensions` this model can't give (vLLM's rules)."""
        if dimensions is None:
            return
        if self.matryoshka_dimensions is None or self.matryoshka_dimensions is False:
            raise ValueError("this model does not support Matryoshka representation: changing the output "
                             "dimensions would give poor embeddings (pooler_config's matryoshka_dimensions "
                             "says which it was trained for)")
        if dimensions < 1:
            raise ValueError(f"dimensions must be at least 1, got {dimensions}")
        if dimensions > hidden_size:
            raise ValueError(f"dimensions must be at most the model's {hidden_size}, got {dimensions}")
        if isinstance(self.matryoshka_dimensions, tuple) and dimensions not in self.matryoshka_dimensions:
            raise ValueError(f"dimensions {dimensions} is not supported: this model was trained for "
                             f"{list(self.matryoshka_dimensions)}")


def _sentence_transformers_pooling(path: str) -> dict[str, Any] | None:
    """pooling_type and normalize from a sentence-transformers checkpoint's modules, None where it
    has none; ValueError for a module stoke does not compute (Dense, other pooling modes)."""
    try:
        with open(os.path.join(path, "modules.json")) as f:
            modules = json.load(f)
    except FileNotFoundError:
        return None
    found: dict[str, Any] = {"normalize": False}
    for module in modules:
        kind = str(module.get("type", "")).rsplit(".", 1)[-1]
        if kind not in _SENTENCE_TRANSFORMERS_MODULES:
            raise ValueError(f"the checkpoint's sentence-transformers module {module.get('type')!r} is not supported "
                             f"(stoke computes {', '.join(_SENTENCE_TRANSFORMERS_MODULES)})")
        if kind == "Normalize":
            found["normalize"] = True
        elif kind == "Pooling":
            with open(os.path.join(path, module.get("path", ""), "config.json")) as f:
                pooling = json.load(f)
            modes = [mode for mode, on in pooling.items() if mode.startswith("pooling_mode_") and on]
            if len(modes) != 1 or modes[0] not in _SENTENCE_TRANSFORMERS_MODES:
                raise ValueError(f"sentence-transformers pooling {modes} is not supported: stoke pools one of "
                                 f"{', '.join(_SENTENCE_TRANSFORMERS_MODES)}")
            if pooling.get("include_prompt") is False:
                raise ValueError("sentence-transformers pooling without the prompt (include_prompt false) "
                                 "is not supported")
            found["pooling_type"] = _SENTENCE_TRANSFORMERS_MODES[modes[0]]
    return found


POOLING_TASKS = ("embed", "classify", "score")


@dataclass(slots=True)
class PoolingParams:
    """vLLM's PoolingParams. `task`: "embed" (the default), "classify" or "score" (a
    cross-encoder's score of a pair, engine/scoring.py). For embeddings: `dimensions`
    (Matryoshka models: keep the first this many, before normalising) and `normalize` (None:
    the model's pooler config); for classify and score: `use_activation` (None: true; false:
    the raw logits). For all: `truncate_prompt_tokens` (keep the prompt's last k tokens; -1:
    the context length)."""

    dimensions: int | None = None
    normalize: bool | None = None
    truncate_prompt_tokens: int | None = None
    task: str | None = None
    use_activation: bool | None = None

    def __post_init__(self) -> None:
        if self.task is not None and self.task not in POOLING_TASKS:
            raise ValueError(f"task must be one of {POOLING_TASKS}, got {self.task!r}")
        if self.use_activation is not None and not isinstance(self.use_activation, bool):
            raise ValueError(f"use_activation must be true, false or None, got {self.use_activation!r}")
        if self.dimensions is not None and not is_int(self.dimensions):
            raise ValueError(f"dimensions must be an integer, got {self.dimensions!r}")
        if self.normalize is not None and not isinstance(self.normalize, bool):
            raise ValueError(f"normalize must be true, false or None, got {self.normalize!r}")
        t = self.truncate_prompt_tokens
        if t is not None and (not is_int(t) or (t < 1 and t != -1)):
            raise ValueError(f"truncate_prompt_tokens must be -1 or an integer >= 1, got {t!r}")


@dataclass(slots=True)
class EmbeddingOutput:
    embedding: list[float]

    @property
    def hidden_size(self) -> int:
        return len(self.embedding)


@dataclass(slots=True)
class PoolingRequestOutput:
    """vLLM's: one prompt's pooled result (an embedding, its classes' probabilities, a pair's
    score). `outputs` is None for a request aborted before it ended."""

    request_id: str
    outputs: Any
    prompt_token_ids: list[int]
    finished: bool = True
    prompt: str | None = None
    num_cached_tokens: int = 0  # prefix-cache hits (last-token pooling only)
    metrics: RequestMetrics | None = None
    lora_request: Any = None


@dataclass(slots=True)
class EmbeddingRequestOutput(PoolingRequestOutput):
    """One prompt's embedding: `outputs` an EmbeddingOutput (None: aborted)."""


@dataclass(slots=True, eq=False)
class PooledSum:
    """A prompt's pooling in progress, on the device: what its computed positions gave so far."""

    pooling_type: str
    total: torch.Tensor | None = None  # MEAN: the sum of the normed positions; CLS: the first
    upto: int = 0  # positions included

    def add(self, start: int, normed: torch.Tensor) -> None:
        """The normed hidden states of positions start.. (a chunk; a recompute after preemption
        repeats positions already included, which are skipped)."""
        if start > self.upto:  # a mean needs every position: these requests skip the prefix cache
            raise RuntimeError(f"positions {self.upto}..{start} were never pooled")
        skip = self.upto - start
        if skip >= normed.shape[0]:
            return
        rows = normed[max(skip, 0):].float()
        if self.pooling_type == "CLS":
            if self.upto == 0:
                self.total = rows[0].clone()
            self.upto = start + normed.shape[0]
            return
        part = rows.sum(dim=0)
        self.total = part if self.total is None else self.total + part
        self.upto = start + normed.shape[0]

    def result(self, num_positions: int) -> torch.Tensor:
        assert self.total is not None and self.upto == num_positions, "pooled before every position was computed"
        return self.total / num_positions if self.pooling_type == "MEAN" else self.total


def finish_embedding(pooled: torch.Tensor, dimensions: int | None, normalize: bool) -> torch.Tensor:
    """The embedding from a pooled vector (fp32): Matryoshka truncation, then normalisation, as
    vLLM's."""
    pooled = pooled.float()
    if dimensions is not None:
        pooled = pooled[:dimensions]
    if normalize:
        pooled = torch.nn.functional.normalize(pooled, p=2.0, dim=-1)
    return pooled


@dataclass(slots=True, eq=False)
class PoolingState:
    """An embedding request in flight in the engine."""

    request_id: str
    prompt: str | None
    prompt_token_ids: list[int]
    task: str  # embed, classify or score
    dimensions: int | None
    normalize: bool
    activation: str | None  # classify and score: engine/scoring.py's ACTIVATIONS; None: the logits
    arrival_time: float
    lora_request: Any
    request: Any  # its scheduler Request
    pooled: PooledSum
