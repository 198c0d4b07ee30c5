"""Classification and scoring, as vLLM's pooling tasks.

- `classify`: a sequence classifier's (a `*ForSequenceClassification` checkpoint's) labels for
  a prompt: its `score` head over the pooled last hidden states, then an activation.
- `score`: how well a pair of texts match. A cross-encoder (a classifier with one label, a
  reranker) reads the pair as one prompt, as vLLM builds it: the tokenizer's encoding of the
  pair (its separators, as sentence-transformers' CrossEncoder reads it), or for an LLM reranker
  the two texts joined, or a score template's rendering of them (Qwen3-Reranker's instruction
  and format: configs/score_templates/). An embedding model (a
  bi-encoder) embeds each text alone, and the score is the cosine similarity of the two
  embeddings.

The activation is transformers' and vLLM's: for classify, a softmax over the labels (a sigmoid
for one label, or for a multi-label classifier; none for a regression); for score, the
sentence-transformers CrossEncoder's `activation_fn` where config.json names one, else a
sigmoid. `use_activation=False` gives the raw logits.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import Any

import torch

from engine.chat_messages import template_variables
from engine.pooling import PoolingRequestOutput

ACTIVATIONS: dict[str, Callable[[torch.Tensor], torch.Tensor]] = {
    "softmax": lambda logits: torch.softmax(logits, dim=-1),
    "sigmoid": torch.sigmoid,
    "tanh": torch.tanh,
    "identity": lambda logits: logits,
}

# The CrossEncoder activations config.json may name (as vLLM, torch.nn.modules classes only).
_CROSS_ENCODER_ACTIVATIONS = {
    "torch.nn.modules.activation.Sigmoid": "sigmoid",
    "torch.nn.modules.activation.Tanh": "tanh",
    "torch.nn.modules.linear.Identity": "identity",
}


@dataclass(frozen=True, slots=True)
class ClassifierConfig:
    """A sequence classifier's labels and the activation each task applies to its logits."""

    num_labels: int
    classify_activation: str
    score_activation: str
    labels: tuple[str, ...] = ()  # the labels' names in id order: config.json's id2label, else LABEL_i
    # A pair's prompt is the two texts joined (an LLM reranker's) rather than the tokenizer's
    # pair encoding: vLLM's use_sep_token false (its older use_pad_token).
    joins_pairs: bool = False

    @staticmethod
    def for_model(hf_config: dict[str, Any], num_labels: int) -> ClassifierConfig:
        """From the checkpoint's config.json (hf_overrides over it)."""
        problem = hf_config.get("problem_type")
        if problem == "regression":
            classify = "identity"
        elif problem == "multi_label_classification" or num_labels == 1:
            classify = "sigmoid"
        else:
            classify = "softmax"
        named = (hf_config.get("sentence_transformers") or {}).get("activation_fn") \
            or hf_config.get("sbert_ce_default_activation_function")
        if named is not None and named not in _CROSS_ENCODER_ACTIVATIONS:
            raise ValueError(f"the checkpoint's cross-encoder activation {named!r} is not supported "
                             f"(stoke applies {', '.join(_CROSS_ENCODER_ACTIVATIONS)})")
        score = _CROSS_ENCODER_ACTIVATIONS[named] if named is not None else "sigmoid"
        id2label = hf_config.get("id2label") or {}
        labels = tuple(str(id2label.get(str(i), id2label.get(i, f"LABEL_{i}"))) for i in range(num_labels))
        separates = hf_config.get("use_pad_token", hf_config.get("use_sep_token"))
        joins = hf_config.get("classifier_from_token") is not None if separates is None else not separates
        return ClassifierConfig(num_labels, classify, score, labels, joins)


def classifier_token_ids(tokenizer: Any, tokens: tuple[str, ...]) -> tuple[int, ...]:
    """An LLM reranker's classifier tokens' ids (each must be one token of the vocabulary)."""
    if tokenizer is None:
        raise ValueError("classifier_from_token needs the model's tokenizer")
    ids = []
    for token in tokens:
        token_id = tokenizer.convert_tokens_to_ids(token)
        if token_id is None or token_id == tokenizer.unk_token_id:
            raise ValueError(f"classifier_from_token: {token!r} is not a token of this model's vocabulary")
        ids.append(token_id)
    return tuple(ids)


def activate(logits: torch.Tensor, activation: str | None) -> torch.Tensor:
    """A classifier's logits (fp32) through the named activation (None: as they are)."""
    return logits if activation is None else ACTIVATIONS[activation](logits)


@dataclass(slots=True)
class ClassificationOutput:
    probs: list[float]  # one per label (the raw logits with use_activation=False)

    @property
    def num_classes(self) -> int:
        return len(self.probs)


@dataclass(slots=True)
class ScoringOutput:
    score: float


@dataclass(slots=True)
class ClassificationRequestOutput(PoolingRequestOutput):
    """One prompt's classification: `outputs` a ClassificationOutput (None: aborted)."""


@dataclass(slots=True)
class ScoringRequestOutput(PoolingRequestOutput):
    """One pair's score: `outputs` a ScoringOutput (None: aborted). A bi-encoder's pair has
    both texts' tokens as its prompt_token_ids."""


def score_pairs(data_1: str | Sequence[str], data_2: str | Sequence[str]) -> list[tuple[str, str]]:
    """vLLM's pairing: a text or a list of texts each side, 1:1, 1:N (the one text with each of
    the N) or N:N (in order)."""
    side_1, side_2 = _texts(data_1, "data_1"), _texts(data_2, "data_2")
    if not side_1 or not side_2:
        raise ValueError("score needs at least one text on each side")
    if len(side_1) > 1 and len(side_1) != len(side_2):
        raise ValueError(f"score pairs 1:1, 1:N or N:N texts, got {len(side_1)}:{len(side_2)}")
    return [(side_1[0] if len(side_1) == 1 else side_1[i], text) for i, text in enumerate(side_2)]


def _texts(data: Any, name: str) -> list[str]:
    texts = [data] if isinstance(data, str) else list(data) if isinstance(data, Sequence) else None
    if texts is None or not all(isinstance(t, str) for t in texts):
        raise TypeError(f"{name} must be a text or a list of texts, got {data!r:.100}")
    return texts


def cross_encoder_prompt(tokenizer: Any, text_1: str, text_2: str, joins: bool, template: str | None = None,
                         template_kwargs: dict[str, Any] | None = None) -> tuple[str, list[int]]:
    """The one prompt (its text, its token ids) a cross-encoder scores a pair from, as vLLM
    builds it: a score template's rendering where one is given (a Jinja chat template over the
    messages {"role": "query", "content": text_1} and {"role": "document", "content": text_2},
    as Qwen3-Reranker's instruction and format; `template_kwargs`: its variables, e.g. an
    `instruction`), else the texts joined for an LLM reranker (`joins`), else the tokenizer's
    encoding of the pair (the text is its decoding)."""
    if template is not None:
        messages = [{"role": "query", "content": text_1}, {"role": "document", "content": text_2}]
        text = tokenizer.apply_chat_template(messages, chat_template=template, tokenize=False,
                                             **template_variables(template_kwargs))
        return text, tokenizer.encode(text)
    if joins:
        text = text_1 + text_2
        return text, tokenizer.encode(text)
    ids = tokenizer(text=text_1, text_pair=text_2)["input_ids"]
    return tokenizer.decode(ids), ids


def cosine_similarity(embedding_1: Sequence[float], embedding_2: Sequence[float]) -> float:
    """A bi-encoder's score of a pair: its two embeddings' cosine similarity (as torch's, eps 1e-8)."""
    a = torch.tensor(embedding_1, dtype=torch.float32)
    b = torch.tensor(embedding_2, dtype=torch.float32)
    return float(torch.nn.functional.cosine_similarity(a, b, dim=0))
