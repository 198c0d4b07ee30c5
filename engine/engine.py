"""The engine loop: schedule → one forward pass → sample → advance → tokens → outputs.

With async scheduling (the default on CUDA) a step's tokens are taken back only after the next
step is launched: the host turns them into outputs while the device runs.

A request with n > 1 becomes n scheduler requests (samples); samples 1..n-1 wait for sample 0's
prompt to be computed and then share its KV blocks through the prefix cache.

A beam search (engine/beam_search.py) runs each running beam as a scheduler request, held
after each step until the search has chosen its beams' next tokens: a beam continues its
parent's request, or forks one of its own with the parent's KV (its full blocks shared, its
partial last block copied; where no seat or block is free, it waits and finds them through the
prefix cache). While a search runs, steps run one after the other (its next inputs are its choice).

An embedding (engine/pooling.py) computes its prompt and samples nothing: its final hidden
states are pooled on the device as its chunks are computed, and it gives its blocks back as soon
as the step with its last prompt token is launched; its vector comes back with that step's tokens.

With speculative decoding (engine/speculative.py) each step first proposes drafts for the
running decodes; a decode with drafts samples one token per position it computed, and keeps
its tokens up to the first one that differs from its draft.
"""

from __future__ import annotations

import logging
import os
import time
from collections.abc import Iterable
from dataclasses import dataclass, field, replace
from functools import lru_cache
from typing import Any, Literal, get_args

import torch
from transformers import AutoTokenizer, PreTrainedTokenizerBase

from engine.beam_search import BeamSearch, BeamSearchParams, TopLogprobs
from engine.config import EngineConfig, ModelConfig, generation_defaults, read_hf_config
from engine.detokenizer import IncrementalDetokenizer, special_token_ids
from engine.fp8 import resolve_scheme
from engine.lora import LoRAAdapter, LoRARegistry, LoRARequest
from engine.model_runner import ModelRunner, PreviousTokens
from engine.outputs import CompletionOutput, Logprob, RequestMetrics, RequestOutput
from engine.pooling import (EmbeddingOutput, EmbeddingRequestOutput, PooledSum, PoolerConfig, PoolingParams,
                            PoolingRequestOutput, PoolingState, finish_embedding)
from engine.scoring import (ClassificationOutput, ClassificationRequestOutput, ClassifierConfig, ScoringOutput,
                            ScoringRequestOutput, activate, classifier_token_ids)
from engine.reasoning import Reasoning, ReasoningGuide
from engine.sampler import SampledTokens, Sampler, SamplingRow, split_top_logprobs, top_logprobs_parts
from engine.sampling_params import SamplingParams, is_int, truncate_prompt
from engine.speculative import NgramProposer, SpeculativeConfig
from engine.token_bytes import vocabulary_bytes
from engine.token_masks import Guide, TokenMasks, TokenVocabulary
from engine.transfer import HostCopy, to_device
from scheduler import Request, ScheduledBatch, Scheduler, SchedulerConfig

logger = logging.getLogger(__name__)

OutputKind = Literal["cumulative", "delta", "final"]
OUTPUT_KINDS: tuple[str, ...] = get_args(OutputKind)


# The params of a row whose request finished after its step was launched: its token is discarded.
_SURPLUS = SamplingParams(temperature=0.0)


@dataclass(slots=True, eq=False)
class _Sample:
    """One of a request's n samples: its scheduler request and its output state."""

    index: int
    request: Request
    detokenizer: IncrementalDetokenizer | None
    generator: torch.Generator | None
    logprobs: list[dict[int, float]] | None  # Logprob objects unless logprob_objects is off
    cumulative_logprob: float = 0.0
    finish_reason: str | None = None
    stop_reason: int | str | None = None
    sent_tokens: int = 0  # output tokens already reported in a delta
    sent_finish: bool = False  # a delta output reported finish_reason already
    guide: Guide | ReasoningGuide | None = None  # structured outputs: where the sample is in its grammar
    # with a guide and drafts: the mask of each position the drafts put the next step at
    draft_masks: list[tuple[torch.Tensor, bool]] = field(default_factory=list)


@dataclass(slots=True, eq=False)
class _Group:
    request_id: str
    prompt: str | None
    prompt_token_ids: list[int]
    params: SamplingParams
    arrival_time: float
    samples: list[_Sample] = field(default_factory=list)
    prompt_logprobs: list[dict[int, float] | None] | None = None
    prompt_logprobs_pending: int = 0  # positions whose logprobs are still on their way back
    lora_request: LoRARequest | None = None

    @property
    def finished(self) -> bool:
        for s in self.samples:  # a loop, not all(genexpr): asked of every group every step
            if s.finish_reason is None:
                return False
        return True


@dataclass(slots=True, eq=False)
class _BeamGroup:
    """A beam search in flight: the requests of its running beams, in its order."""

    request_id: str
    prompt: str | None
    prompt_token_ids: list[int]
    params: BeamSearchParams
    search: BeamSearch
    row_params: SamplingParams  # what its rows sample: greedily, with the top K logprobs
    max_tokens: int
    arrival_time: float
    priority: int
    lora_request: LoRARequest | None
    first: Request  # the prompt's: its cache hits and first scheduling are the search's
    requests: list[Request] = field(default_factory=list)
    tops: dict[Request, TopLogprobs] = field(default_factory=dict)  # this step's, as they arrive
    num_requests: int = 1  # requests made so far (their ids' serial)
    num_preemptions: int = 0  # of its released requests


@dataclass(slots=True, eq=False)
class _Launched:
    """A step whose forward and sampling are launched: its tokens may still be on the device."""

    batch: ScheduledBatch
    rows: list[int]  # for each sampled token, its request's index in the batch
    sampled: SampledTokens
    events: tuple[torch.cuda.Event, torch.cuda.Event] | None  # CUDA: the step's device span
    # the prompt logprobs this step computed, per group, on their way back (in position order)
    prompt_logprobs: list[tuple[_Group, HostCopy[list[dict[int, float]]]]] = field(default_factory=list)
    # the embeddings this step finished, on their way back
    embeddings: list[tuple[PoolingState, HostCopy[list[float]]]] = field(default_factory=list)

    def previous_tokens(self) -> PreviousTokens:
        return PreviousTokens(self.sampled.token_ids, {self.batch.requests[i]: j for j, i in enumerate(self.rows)})


@dataclass(slots=True)
class StepStats:
    num_steps: int = 0
    num_batched_tokens: int = 0
    schedule_seconds: float = 0.0  # the scheduler's work, and turning tokens into outputs
    forward_seconds: float = 0.0
    sample_seconds: float = 0.0
    # CUDA: the GPU's time from each step's first operation to its sampler's last (CUDA events).
    # Wall time minus this is when the GPU waited on the host between steps: scheduling, input
    # preparation, outputs, and launches that did not keep up.
    device_seconds: float = 0.0
    last_batch_tokens: int = 0
    # Speculative decoding (vLLM's counters): decodes verified with drafts, their drafts, and
    # the drafts accepted.
    num_drafts: int = 0
    num_draft_tokens: int = 0
    num_accepted_tokens: int = 0


class LLMEngine:
    def __init__(self, config: EngineConfig | None = None) -> None:
        config = config or EngineConfig()
        config.check()  # before the weights load
        speculative = SpeculativeConfig.from_value(config.speculative_config)
        self.config = config
        from engine.default_model import model_dir

        path = model_dir(config.model)
        self.model_path = path
        hf_config = read_hf_config(path, config.hf_overrides)
        self.model_config = ModelConfig.from_dir(path, config.hf_overrides)
        self.model_config.quantization = resolve_scheme(self.model_config.quantization, config.quantization)
        self.tokenizer: PreTrainedTokenizerBase | None = self._load_tokenizer(path)
        if self.model_config.classifier_from_token is not None:
            self.model_config.classifier_token_ids = classifier_token_ids(self.tokenizer,
                                                                          self.model_config.classifier_from_token)
        # A token's text decoded alone: a Logprob's decoded_token (vLLM's), None without a tokenizer
        self._token_text = lru_cache(maxsize=1 << 16)(self.tokenizer.decode if self.tokenizer is not None
                                                      else lambda token_id: None)
        # Logprobs as vLLM's Logprob objects (rank, decoded_token); False: plain floats, what the
        # server's worker sends on (10x cheaper: 0.9 against 9 us a token with 20 top logprobs).
        self.logprob_objects = True
        self.default_sampling = self._default_sampling(config.generation_config, path)
        # A reasoning model's tags: structured outputs hold the answer once its reasoning ended
        self.reasoning = Reasoning.for_tokenizer(config.reasoning_parser, self.tokenizer) \
            if config.reasoning_parser is not None else None
        # ... whose tags stay in the text, special tokens or not: the server splits the text at them
        self._special_skipped = special_token_ids(self.tokenizer) - {self.reasoning.start_id, self.reasoning.end_id} \
            if self.reasoning is not None and self.reasoning.tags_special else None
        self.loras: LoRARegistry | None = None
        if config.enable_lora:
            self.loras = LoRARegistry(self.model_config, config.max_lora_rank, config.resolve_max_cpu_loras(),
                                      config.resolve_dtype(config.resolve_device()))
        self.runner = ModelRunner(path, self.model_config, config, self.loras)
        self.max_model_len = self.runner.max_model_len  # max_model_len, at most the model's positions
        self.scheduler = Scheduler(SchedulerConfig(
            max_model_len=self.max_model_len,
            num_blocks=self.runner.num_blocks,
            block_size=config.block_size,
            max_num_seqs=config.max_num_seqs,
            max_num_batched_tokens=config.max_num_batched_tokens,
            enable_prefix_caching=config.enable_prefix_caching,
            max_num_partial_prefills=config.max_num_partial_prefills,
            long_prefill_token_threshold=config.long_prefill_token_threshold,
            policy=config.scheduling_policy,
            max_loras=config.max_loras if config.enable_lora else 0,
            kv_groups=self.runner.kv_groups,
            num_host_blocks=self.runner.num_host_blocks,
        ))
        self.sampler = Sampler()
        self.eos_token_ids = list(self.model_config.eos_token_ids)
        # As vLLM: requests without a seed of their own sample the same way run after run.
        torch.manual_seed(config.seed)
        self.groups: dict[str, _Group] = {}
        self.samples: dict[Request, tuple[_Group, _Sample]] = {}
        self.beam_groups: dict[str, _BeamGroup] = {}
        self.beam_requests: dict[Request, _BeamGroup] = {}
        self.pooler = PoolerConfig.for_model(path, config.pooler_config, config.hf_overrides)
        self.classifier = ClassifierConfig.for_model(hf_config, self.model_config.num_labels) \
            if self.model_config.is_classifier else None
        self.poolings: dict[str, PoolingState] = {}  # embeddings, classifications, scores in flight, by id
        self.pooling_requests: dict[Request, PoolingState] = {}
        self.stats = StepStats()
        self.async_scheduling = config.resolve_async_scheduling(self.runner.device)
        self._in_flight: _Launched | None = None
        self._token_masks: TokenMasks | None = None  # built for the first structured output
        self._num_guided = 0  # unfinished samples with structured outputs
        self.proposer = NgramProposer(speculative) if speculative is not None else None

    @staticmethod
    def _load_tokenizer(path: str) -> PreTrainedTokenizerBase | None:
        if not any(os.path.exists(os.path.join(path, f)) for f in ("tokenizer.json", "tokenizer_config.json")):
            logger.info("no tokenizer in %s: only token-id prompts will work", path)
            return None
        try:
            return AutoTokenizer.from_pretrained(path)
        except (OSError, ValueError) as exc:
            logger.warning("no tokenizer in %s (%s): only token-id prompts will work", path, exc)
            return None

    @staticmethod
    def _default_sampling(source: str, path: str) -> dict[str, Any]:
        """SamplingParams fields a request leaves unset takes from the generation config."""
        defaults = generation_defaults(source, path)
        try:
            SamplingParams(**defaults)
        except (TypeError, ValueError) as exc:
            raise ValueError(f"the generation config's sampling defaults {defaults} are not valid: {exc} "
                             "(generation_config='none' ignores them)") from None
        if defaults:
            logger.info("requests default to the generation config's %s (generation_config='none': off)", defaults)
        return defaults

    # --------------------------------------------------------------- requests
    def tokenize(self, prompt: str) -> list[int]:
        if self.tokenizer is None:
            raise ValueError("this model has no tokenizer: pass prompts as token ids")
        return self.tokenizer.encode(prompt)

    def own_params(self, params: SamplingParams) -> SamplingParams:
        """The engine's own copy of a request's params, checked again (fields may have been set
        since construction; later edits to the caller's object change nothing). One copy may
        serve every prompt of a request: a copy derives the params' arrays anew (3 MB for a
        logit_bias over a 49k vocabulary)."""
        if not isinstance(params, SamplingParams):
            raise TypeError(f"sampling params must be a SamplingParams, got {type(params).__name__}")
        params = replace(params)  # construction checks it
        params.check_vocab(self.model_config.vocab_size)
        if params.stop_strings and self.tokenizer is None:
            raise ValueError("stop strings need a tokenizer, and this model has none")
        return params

    def prepare(self, prompt_token_ids: list[int], params: SamplingParams, *, cap_at_context: bool = False,
                owned: bool = False) -> tuple[list[int], SamplingParams, int]:
        """The request as it would run, or ValueError (AdmissionError) if it can't be served:
        its prompt (cut to the last `truncate_prompt_tokens`), params of the engine's own
        (`own_params`, unless they are already: `owned`), and its max_tokens (None: as long as
        the context and the KV pool allow; with cap_at_context, the offline API's rule as
        vLLM's, a larger one stops there too, finish_reason "length", where the server refuses
        it)."""
        if self.classifier is not None:
            raise ValueError(f"this model is a sequence classifier ({self.model_config.architecture}): "
                             "it classifies and scores, and generates nothing")
        if not self.runner.model.has_lm_head:
            raise ValueError("this model has no LM head (its checkpoint holds no lm_head.weight): "
                             "it computes embeddings only")
        if not owned:
            params = self.own_params(params)
        prompt_token_ids = self._checked_prompt(prompt_token_ids, params.truncate_prompt_tokens)
        room = self.scheduler.max_sequence_tokens - len(prompt_token_ids)
        max_tokens = params.max_tokens
        if max_tokens is None:
            max_tokens = max(1, room)
        elif cap_at_context and 1 <= room < max_tokens:
            # this prompt's own params (the owned ones may be shared by other prompts)
            params = replace(params, max_tokens=room, min_tokens=min(params.min_tokens, room))
            max_tokens = room
        self.scheduler.check_admissible(len(prompt_token_ids), max_tokens)
        return prompt_token_ids, params, max_tokens

    def _checked_prompt(self, prompt_token_ids: list[int], truncate_prompt_tokens: int | None) -> list[int]:
        """The prompt cut to its last `truncate_prompt_tokens`; ValueError for an id out of the vocabulary."""
        if truncate_prompt_tokens is not None:
            prompt_token_ids = truncate_prompt(prompt_token_ids, truncate_prompt_tokens, self.max_model_len)
        vocab = self.model_config.vocab_size
        bad = [t for t in prompt_token_ids if not is_int(t) or not 0 <= t < vocab]
        if bad:
            raise ValueError(f"prompt token ids must be integers in [0, {vocab}), got {bad[:5]}")
        return prompt_token_ids

    def add_request(self, request_id: str, prompt: str | list[int], params: SamplingParams,
                    arrival_time: float | None = None, prompt_token_ids: list[int] | None = None, *,
                    cap_at_context: bool = False, priority: int = 0, lora_request: LoRARequest | None = None) -> None:
        """Queue a request; a text prompt is tokenized unless its prompt_token_ids are given.
        See `prepare` for what it checks and `cap_at_context`; `priority` (lower runs earlier)
        needs the "priority" scheduling policy; `lora_request`, an engine with enable_lora."""
        if prompt_token_ids is None:
            prompt_token_ids = self.tokenize(prompt) if isinstance(prompt, str) else list(prompt)
        prepared = self.prepare(prompt_token_ids, params, cap_at_context=cap_at_context)
        self.add_prepared(request_id, prompt if isinstance(prompt, str) else None, prepared, arrival_time, priority,
                          lora_request)

    def check_priority(self, priority: int) -> None:
        """ValueError for a priority this engine cannot honour (any but 0 under FCFS, as vLLM)."""
        if not is_int(priority):
            raise ValueError(f"priority must be an integer, got {priority!r}")
        if priority and self.scheduler.config.policy != "priority":
            raise ValueError(f"priority {priority} needs the priority scheduling policy "
                             "(scheduling_policy='priority'); this engine schedules first come, first served")

    def add_prepared(self, request_id: str, text: str | None, prepared: tuple[list[int], SamplingParams, int],
                     arrival_time: float | None = None, priority: int = 0,
                     lora_request: LoRARequest | None = None) -> None:
        """Queue a request `prepare` returned (a batch checks all its prompts, then adds them)."""
        self._check_new_id(request_id)
        self.check_priority(priority)
        prompt_token_ids, params, max_tokens = prepared
        arrival = time.monotonic() if arrival_time is None else arrival_time
        group = _Group(request_id, text, prompt_token_ids, params, arrival, lora_request=lora_request)
        if params.prompt_logprobs is not None:
            group.prompt_logprobs = [None]
        # Every sample is built before any is queued: nothing stays behind if one fails.
        guides = self._guides(params, prompt_token_ids)
        lora_id, prefix_root = 0, None
        if lora_request is not None:
            self.add_lora(lora_request)  # read and checked (ValueError) before anything is queued
            lora_id, prefix_root = lora_request.lora_int_id, self.loras.get(lora_request.lora_int_id).prefix_root
        first: Request | None = None
        # Samples 1.. start once sample 0's prompt is in the prefix cache, to reuse it; with no
        # cache they would only wait to recompute it.
        caching = self.scheduler.config.enable_prefix_caching
        for index in range(params.n):
            # Prompt logprobs need logits at every prompt position: sample 0 computes them all.
            request = Request(f"{request_id}-{index}", prompt_token_ids, max_tokens,
                              prefill_after=first if caching else None,
                              use_prefix_cache=first is not None or params.prompt_logprobs is None,
                              arrival_time=arrival, priority=priority, lora_id=lora_id, prefix_root=prefix_root)
            first = first or request
            sample = _Sample(
                index=index,
                request=request,
                detokenizer=self._detokenizer(prompt_token_ids, params),
                generator=self._generator(params, index),
                logprobs=[] if params.logprobs is not None else None,
                guide=guides[index] if guides else None,
            )
            group.samples.append(sample)
        self._num_guided += sum(s.guide is not None for s in group.samples)
        for sample in group.samples:
            if lora_request is not None:
                self.loras.acquire(lora_request)  # held until the sample finishes
            self.samples[sample.request] = (group, sample)
            self.scheduler.add_request(sample.request)
        self.groups[request_id] = group

    def _check_new_id(self, request_id: str) -> None:
        if request_id in self.groups or request_id in self.beam_groups or request_id in self.poolings:
            raise ValueError(f"request id {request_id!r} is already in flight")

    # ------------------------------------------------------------------ embeddings, classification, scores
    def check_pooling_task(self, task: str) -> None:
        """ValueError if this model can't run the pooling task (embed, classify, score)."""
        classifier = self.classifier
        if task == "embed" and classifier is not None:
            raise ValueError(f"this model is a sequence classifier ({self.model_config.architecture}): it "
                             "classifies and scores, and computes no embeddings")
        if task in ("classify", "score") and classifier is None:
            raise ValueError(f"{task} needs a sequence classifier (a *ForSequenceClassification checkpoint); "
                             f"this model ({self.model_config.architecture}) computes embeddings"
                             + (": score pairs with LLM.score, their embeddings' cosine similarity"
                                if task == "score" else ""))
        if task == "score" and classifier.num_labels != 1:
            raise ValueError(f"score needs a cross-encoder (a classifier with one label); this classifier has "
                             f"{classifier.num_labels} labels: use classify")

    def prepare_pooling(self, prompt_token_ids: list[int],
                        params: PoolingParams | None = None) -> tuple[list[int], PoolingParams]:
        """An embedding (or a classification, or a cross-encoder's score: `params.task`) as it
        would run, or ValueError (AdmissionError) if it can't be served: its prompt (cut to the
        last `truncate_prompt_tokens`) and params of the engine's own, the task and
        `normalize` / `use_activation` resolved from the model's."""
        params = PoolingParams() if params is None else params
        if not isinstance(params, PoolingParams):
            raise TypeError(f"pooling params must be a PoolingParams, got {type(params).__name__}")
        params = replace(params)  # construction checks it
        params.task = params.task or "embed"
        self.check_pooling_task(params.task)
        if params.task == "embed":
            if params.use_activation is not None:
                raise ValueError("use_activation applies to classify and score, not to embeddings")
            if params.normalize is None:
                params.normalize = self.pooler.normalize
            self.pooler.check_dimensions(params.dimensions, self.model_config.hidden_size)
        else:
            if params.dimensions is not None or params.normalize is not None:
                raise ValueError(f"dimensions and normalize apply to embeddings, not to {params.task}")
            if params.use_activation is None:
                params.use_activation = True
        prompt_token_ids = self._checked_prompt(prompt_token_ids, params.truncate_prompt_tokens)
        self.scheduler.check_admissible(len(prompt_token_ids), 0)
        return prompt_token_ids, params

    def add_pooling_request(self, request_id: str, prompt: str | list[int], params: PoolingParams | None = None,
                            arrival_time: float | None = None, *, priority: int = 0,
                            lora_request: LoRARequest | None = None) -> None:
        """Queue an embedding (vLLM's `LLM.embed`, one prompt; `params.task` classify or score:
        a classification or a cross-encoder's score): its one output, an
        EmbeddingRequestOutput (a ClassificationRequestOutput, a ScoringRequestOutput),
        arrives once its prompt is computed."""
        tokens = self.tokenize(prompt) if isinstance(prompt, str) else list(prompt)
        prepared = self.prepare_pooling(tokens, params)
        self.add_prepared_pooling(request_id, prompt if isinstance(prompt, str) else None, prepared, arrival_time,
                                  priority, lora_request)

    def add_prepared_pooling(self, request_id: str, text: str | None, prepared: tuple[list[int], PoolingParams],
                             arrival_time: float | None = None, priority: int = 0,
                             lora_request: LoRARequest | None = None) -> None:
        """Queue what `prepare_pooling` returned."""
        self._check_new_id(request_id)
        self.check_priority(priority)
        prompt_token_ids, params = prepared
        lora_id, prefix_root = 0, None
        if lora_request is not None:
            self.add_lora(lora_request)
            lora_id, prefix_root = lora_request.lora_int_id, self.loras.get(lora_request.lora_int_id).prefix_root
        arrival = time.monotonic() if arrival_time is None else arrival_time
        pooling_type = self.pooler.pooling_type
        # The last token's hidden states need its prefix's KV only, which the prefix cache may
        # hold; a mean or the first token's need every position computed.
        request = Request(f"{request_id}-0", prompt_token_ids, 0, use_prefix_cache=pooling_type == "LAST",
                          arrival_time=arrival, priority=priority, lora_id=lora_id, prefix_root=prefix_root,
                          pooling=True)
        self.scheduler.add_request(request)
        if lora_request is not None:
            self.loras.acquire(lora_request)
        activation = None
        if params.task != "embed" and params.use_activation:
            activation = self.classifier.score_activation if params.task == "score" \
                else self.classifier.classify_activation
        state = PoolingState(request_id, text, prompt_token_ids, params.task, params.dimensions, bool(params.normalize),
                             activation, arrival, lora_request, request, PooledSum(pooling_type))
        self.poolings[request_id] = state
        self.pooling_requests[request] = state

    def _pool(self, batch: ScheduledBatch, pooled: torch.Tensor | None,
              pool_rows: list[int]) -> list[tuple[PoolingState, torch.Tensor]]:
        """The embeddings (classifications, scores) whose last prompt token this step computed,
        on the device."""
        if not pool_rows:
            return []
        done = []
        with torch.inference_mode():
            last = self.runner.model.final_norm(pooled)
            for j, i in enumerate(pool_rows):
                request = batch.requests[i]
                state = self.pooling_requests[request]
                vector = last[j] if state.pooled.pooling_type == "LAST" else state.pooled.result(request.num_prompt_tokens)
                if state.task == "embed":
                    done.append((state, finish_embedding(vector, state.dimensions, state.normalize)))
                else:
                    done.append((state, activate(self.runner.model.classify(vector), state.activation)))
        return done

    def _pooling_output(self, state: PoolingState, values: list[float] | None) -> PoolingRequestOutput:
        """The request's one output, from its vector (None: aborted); it leaves the engine."""
        del self.poolings[state.request_id]
        self.pooling_requests.pop(state.request, None)
        now = time.monotonic()
        r = state.request
        if state.task == "embed":
            kind, outputs = EmbeddingRequestOutput, None if values is None else EmbeddingOutput(values)
        elif state.task == "classify":
            kind, outputs = ClassificationRequestOutput, None if values is None else ClassificationOutput(values)
        else:
            kind, outputs = ScoringRequestOutput, None if values is None else ScoringOutput(values[0])
        return kind(
            request_id=state.request_id,
            outputs=outputs,
            prompt_token_ids=state.prompt_token_ids,
            prompt=state.prompt,
            num_cached_tokens=r.num_cached_tokens,
            metrics=RequestMetrics(arrival_time=state.arrival_time, first_scheduled_time=r.first_scheduled_time,
                                   first_token_time=now if values is not None else None, finish_time=now,
                                   num_preemptions=r.num_preemptions),
            lora_request=state.lora_request,
        )

    # ------------------------------------------------------------------ beam search
    def prepare_beam_search(self, prompt_token_ids: list[int], params: BeamSearchParams, *,
                            cap_at_context: bool = False) -> tuple[list[int], BeamSearchParams, int]:
        """A beam search as it would run, or ValueError (AdmissionError) if it can't be served:
        its prompt, params of the engine's own, and its max_tokens (as `prepare`'s; every beam
        may need blocks of its own for all of them)."""
        if not isinstance(params, BeamSearchParams):
            raise TypeError(f"beam search params must be a BeamSearchParams, got {type(params).__name__}")
        params = replace(params)  # construction checks it
        rows = SamplingParams(max_tokens=params.max_tokens, temperature=0.0, detokenize=False)
        prompt_token_ids, _, max_tokens = self.prepare(prompt_token_ids, rows, cap_at_context=cap_at_context,
                                                       owned=True)
        if cap_at_context:  # and at what the pool holds for every beam apart
            cfg = self.scheduler.config
            max_tokens = max(1, min(max_tokens, self.scheduler.kv_plan.beam_room(
                len(prompt_token_ids), params.beam_width, cfg.num_blocks, cfg.enable_prefix_caching)))
        self.scheduler.check_beams_admissible(len(prompt_token_ids), max_tokens, params.beam_width)
        return prompt_token_ids, params, max_tokens

    def add_beam_search(self, request_id: str, prompt: str | list[int], params: BeamSearchParams,
                        arrival_time: float | None = None, *, cap_at_context: bool = False, priority: int = 0,
                        lora_request: LoRARequest | None = None) -> None:
        """Queue a beam search (vLLM's `LLM.beam_search`, one prompt): its one output, when it
        finishes, holds its beam_width best sequences, best first (finish_reason "stop" for one
        that ended with an end token, "length" for max_tokens)."""
        tokens = self.tokenize(prompt) if isinstance(prompt, str) else list(prompt)
        prepared = self.prepare_beam_search(tokens, params, cap_at_context=cap_at_context)
        self.add_prepared_beam_search(request_id, prompt if isinstance(prompt, str) else None, prepared,
                                      arrival_time, priority, lora_request)

    def add_prepared_beam_search(self, request_id: str, text: str | None,
                                 prepared: tuple[list[int], BeamSearchParams, int], arrival_time: float | None = None,
                                 priority: int = 0, lora_request: LoRARequest | None = None) -> None:
        """Queue a beam search `prepare_beam_search` returned."""
        self._check_new_id(request_id)
        self.check_priority(priority)
        prompt_token_ids, params, max_tokens = prepared
        lora_id, prefix_root = 0, None
        if lora_request is not None:
            self.add_lora(lora_request)
            lora_id, prefix_root = lora_request.lora_int_id, self.loras.get(lora_request.lora_int_id).prefix_root
        search = BeamSearch(params, self.eos_token_ids, max_tokens)
        arrival = time.monotonic() if arrival_time is None else arrival_time
        first = Request(f"{request_id}-0", prompt_token_ids, max_tokens, arrival_time=arrival, priority=priority,
                        lora_id=lora_id, prefix_root=prefix_root)
        self.scheduler.add_request(first)
        group = _BeamGroup(request_id, text, prompt_token_ids, params, search,
                           SamplingParams(temperature=0.0, logprobs=search.num_candidates, detokenize=False),
                           max_tokens, arrival, priority, lora_request, first, [first])
        if lora_request is not None:
            self.loras.acquire(lora_request)
        self.beam_groups[request_id] = group
        self.beam_requests[first] = group

    def _choose_beams(self, group: _BeamGroup, now: float) -> bool:
        """The search's step, once every running beam's top logprobs arrived: each next beam
        continues its parent's request (the first of its children) or forks one
        (`Scheduler.add_fork`: with the parent's blocks, its partial last one copied here, where a
        seat and a block are free); parents without children are released first. True when the
        search is done (every request released)."""
        parents = group.requests
        following = group.search.step([group.tops.pop(r) for r in parents])
        continues: list[bool] = []  # for each next beam: it is its parent's first child
        kept: set[int] = set()
        for parent, _ in following:
            continues.append(parent not in kept)
            kept.add(parent)
        for i, request in enumerate(parents):  # their seats and blocks go to the forks first
            if i not in kept:
                self._release_beam(group, request)
        requests = [parents[parent] for parent, _ in following]  # the forks are replaced below
        copies: list[tuple[int, int]] = []
        for k, (parent, beam) in enumerate(following):  # forks first: from their parents' tokens before their next
            if continues[k]:
                continue
            source = parents[parent]
            fork = Request(f"{group.request_id}-{group.num_requests}", group.prompt_token_ids, group.max_tokens,
                           arrival_time=group.arrival_time, priority=group.priority, lora_id=source.lora_id,
                           prefix_root=source.prefix_root, preempts_later=True)
            group.num_requests += 1
            fork.token_ids = source.token_ids + [beam.token]
            if group.lora_request is not None:
                self.loras.acquire(group.lora_request)
            self.beam_requests[fork] = group
            copies += self.scheduler.add_fork(source, fork)
            requests[k] = fork
        self._transfer_kv()  # a fork's copy may go into a block whose KV an eviction saves first
        self.runner.copy_blocks(copies)
        for k, (_, beam) in enumerate(following):
            if continues[k]:
                self.scheduler.append_token(requests[k], beam.token, now)
                requests[k].held, requests[k].preempts_later = False, True
        group.requests = requests  # the search's order
        return group.search.done

    def _release_beam(self, group: _BeamGroup, request: Request) -> None:
        group.num_preemptions += request.num_preemptions
        del self.beam_requests[request]
        self._release(request)

    def _release(self, request: Request) -> None:
        """A finished scheduler request gives back its blocks, its block-table row, its adapter."""
        self.scheduler.finish(request)
        self.runner.release(request)
        if request.lora_id:
            self.loras.release(request.lora_id)

    def _beam_output(self, group: _BeamGroup, aborted: bool = False) -> RequestOutput:
        """The search's sequences, best first; aborted, its running beams as far as they got,
        finish_reason "abort" (what it computed: usage, and what a client that left is charged),
        or one empty sequence before its first step."""
        for request in list(group.requests):
            self._release_beam(group, request)
        group.requests = []
        del self.beam_groups[group.request_id]
        params, k = group.params, group.params.logprobs
        completions = []
        text_params = SamplingParams(skip_special_tokens=params.skip_special_tokens)
        beams = [beam for beam in group.search.running if beam.length] if aborted else group.search.finished
        for index, beam in enumerate(beams):
            chain = beam.chain()
            tokens = [b.token for b in chain]
            shown = tokens[:-1] if beam.ended_by_token and not params.include_stop_str_in_output else tokens
            text = ""
            detokenizer = self._detokenizer(group.prompt_token_ids, text_params)
            if detokenizer is not None:
                for token in shown:
                    detokenizer.add_token(token, True)
                detokenizer.finish()
                text = detokenizer.text
            logprobs = None
            if k is not None:
                logprobs = [self._logprobs_entry(b.token, b.logprob, next(i for i, (t, _) in enumerate(b.top, 1)
                                                                          if t == b.token), b.top[:k])
                            for b in chain]
            completions.append(CompletionOutput(
                index=index, text=text, token_ids=tokens, cumulative_logprob=beam.cumulative_logprob,
                logprobs=logprobs, finish_reason="abort" if aborted else "stop" if beam.ended_by_token else "length",
                delta_text=text, delta_token_ids=tokens, num_tokens=len(tokens),
            ))
        if not completions:
            completions.append(CompletionOutput(index=0, text="", token_ids=[], finish_reason="abort"))
        now = time.monotonic()
        return RequestOutput(
            request_id=group.request_id,
            prompt=group.prompt,
            prompt_token_ids=group.prompt_token_ids,
            outputs=completions,
            finished=True,
            num_cached_tokens=group.first.num_cached_tokens,
            # Its sequences arrive together, when the search ends: that is its first token's time.
            metrics=RequestMetrics(arrival_time=group.arrival_time, first_scheduled_time=group.first.first_scheduled_time,
                                   first_token_time=now, finish_time=now, num_preemptions=group.num_preemptions),
            lora_request=group.lora_request,
        )

    # ------------------------------------------------------------------ LoRA (vLLM's LLMEngine methods)
    def add_lora(self, lora_request: LoRARequest, pin: bool = False, *, read: LoRAAdapter | None = None) -> bool:
        """Read an adapter into host memory now (kept while max_cpu_loras allow, or until
        remove_lora if `pin`); ValueError if this engine can't serve it. `read`: the adapter
        already read (`engine.lora.load_adapter` with this engine's `loras` settings)."""
        if self.loras is None:
            raise ValueError("LoRA adapters need an engine started with enable_lora=True")
        self.loras.add(lora_request, read=read)
        if pin:
            self.loras.pin(lora_request.lora_int_id)
        return True

    def pin_lora(self, lora_id: int) -> bool:
        """vLLM's: keep a loaded adapter in memory whatever max_cpu_loras says."""
        return self.loras is not None and self.loras.pin(lora_id)

    def remove_lora(self, lora_id: int) -> bool:
        """Drop a loaded adapter; while requests use it, once they finish (False then, and if it
        is not loaded)."""
        return self.loras is not None and self.loras.remove(lora_id)

    def list_loras(self) -> set[int]:
        """The ids of the adapters in host memory."""
        return set() if self.loras is None else set(self.loras.adapters)

    def _guides(self, params: SamplingParams, prompt_token_ids: list[int]) -> list[Guide | ReasoningGuide]:
        """One guide per sample for a request with structured outputs (none without), held back
        while a reasoning model thinks; ValueError for a structure no answer satisfies (its
        first token has no way on)."""
        if params.structured_outputs is None:
            return []
        if self.tokenizer is None:
            raise ValueError("structured outputs need a tokenizer (the tokens' bytes), and this model has none")
        if self._token_masks is None:
            vocabulary = vocabulary_bytes(self.tokenizer, self.model_config.vocab_size)
            self._token_masks = TokenMasks(TokenVocabulary(vocabulary))
        grammar = params.structured_outputs.compile()
        ends = [*self.eos_token_ids, *params.stop_token_ids]
        guides = [Guide(grammar, self._token_masks, ends) for _ in range(params.n)]
        if guides[0].dead_end():
            raise ValueError("no answer satisfies these structured outputs (no token can begin one)")
        if self.reasoning is not None:
            return [ReasoningGuide(guide, self.reasoning.phase(prompt_token_ids)) for guide in guides]
        return guides

    def _detokenizer(self, prompt_token_ids: list[int], params: SamplingParams) -> IncrementalDetokenizer | None:
        if self.tokenizer is None or not params.detokenize:
            return None
        return IncrementalDetokenizer(
            self.tokenizer, prompt_token_ids, skip_special_tokens=params.skip_special_tokens,
            stop=params.stop_strings, include_stop_str_in_output=params.include_stop_str_in_output,
            special_skipped=self._special_skipped,
        )

    def _generator(self, params: SamplingParams, index: int) -> torch.Generator | None:
        if params.seed is None:
            return None
        return torch.Generator(device=self.runner.device).manual_seed(params.seed + index)

    def abort_request(self, request_id: str) -> RequestOutput | PoolingRequestOutput | None:
        """Stop a request wherever it is; all its blocks return to the pool."""
        pooling = self.poolings.get(request_id)
        if pooling is not None:
            if not pooling.request.finished:  # else released when its last step was launched
                self._release(pooling.request)
            return self._pooling_output(pooling, None)
        beams = self.beam_groups.get(request_id)
        if beams is not None:
            return self._beam_output(beams, aborted=True)
        group = self.groups.get(request_id)
        if group is None:
            return None
        for sample in group.samples:
            if sample.finish_reason is None:
                self._finish(sample, "abort")
        return self._output(group)

    def reset_prefix_cache(self) -> bool:
        """Empty the prefix cache; False (nothing changed) while requests hold KV blocks."""
        return self.scheduler.block_manager.reset_prefix_cache()

    def has_unfinished_requests(self) -> bool:
        """Requests in flight, or a launched step not yet taken back (its tokens are surplus
        when every request has finished, but its step still holds device memory)."""
        return bool(self.groups) or bool(self.beam_groups) or bool(self.poolings) or self._in_flight is not None

    # ------------------------------------------------------------------- step
    def _transfer_kv(self) -> None:
        """The prefix cache's host-tier saves and loads since the last, before anything else
        writes the device blocks they read or fill."""
        self.runner.transfer_kv(self.scheduler.block_manager.take_transfers())

    def step(self, outputs: OutputKind = "cumulative") -> list[RequestOutput | PoolingRequestOutput]:
        """One engine iteration, and the outputs it produced, as vLLM's RequestOutputKind:
        - "cumulative": every request that got tokens, with its whole text, tokens and logprobs
          so far, and what is new since its previous output (`delta_text`, `delta_token_ids`);
        - "delta": the same requests, with only what is new (text, tokens, logprobs) of only
          the samples that have news: what a streaming server sends, built in time that does
          not grow with the output's length;
        - "final": only the requests that finished, whole (the offline API: a step then builds
          no output for the hundreds of requests still running).

        With async scheduling a step launches its forward and sampling, then turns the previous
        step's tokens into outputs while the device runs: a step returns the outputs of the one
        before it, and a request that finished there has one surplus token computed, discarded.
        While a structured request runs, that turn comes between the forward and the sampling
        (the masks need those tokens); while drafts are proposed, a step is taken back at once."""
        if outputs not in OUTPUT_KINDS:
            raise ValueError(f"outputs must be one of {OUTPUT_KINDS}, got {outputs!r}")
        results: list[RequestOutput | PoolingRequestOutput] = []
        if self._in_flight is not None and self._in_sync():
            results += self._take_back(outputs)
        t0 = time.perf_counter()
        if self.proposer is not None:
            self._propose()
        batch = self.scheduler.schedule()
        t1 = time.perf_counter()
        # Left in self._in_flight until taken back: if launching this step raises, the engine
        # stays as it was (but for a take-back below, for structured outputs: its outputs are
        # lost with the error).
        in_flight = self._in_flight
        if not batch.requests:
            return self._take_back(outputs) if in_flight is not None else results
        all_logits_rows = [
            i for i, request in enumerate(batch.requests)
            if not request.use_prefix_cache and not request.prompt_computed
        ]
        events = None
        if self.runner.device.type == "cuda":
            events = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
            events[0].record()
        previous = in_flight.previous_tokens() if in_flight is not None else None
        self._transfer_kv()
        step_logits = self.runner.execute(batch, all_logits_rows, previous, bool(self.poolings))
        prompt_logprobs = []
        for i, hidden in step_logits.per_position.items():
            request = batch.requests[i]
            if request.pooling:  # a mean or the first token: every position's, as they are computed
                with torch.inference_mode():
                    self.pooling_requests[request].pooled.add(request.num_computed_tokens,
                                                              self.runner.model.final_norm(hidden))
            else:
                prompt_logprobs.append(self._prompt_logprobs(request, hidden))
        embeddings = self._pool(batch, step_logits.pooled, step_logits.pool_rows)
        t2 = time.perf_counter()
        if in_flight is not None and self._num_guided:
            # A structured output's mask needs its last token on the host: the step in flight
            # is taken back now, while this step's forward runs (vLLM's order), and this step
            # samples after it, with every token known (the take-back's time is its own).
            results += self._take_back(outputs)
            in_flight = previous = None
        t_rows = time.perf_counter()
        sampling_rows = []
        pending_ids = previous.token_ids if previous is not None else None
        drafts: list[int] = []  # the step's drafts, concatenated: the draft rows' pending ids
        position = 0  # of a request with drafts, the position of its current row
        for j, i in enumerate(step_logits.sampling_rows):
            request = batch.requests[i]
            entry = self.samples.get(request)
            if entry is None and (beams := self.beam_requests.get(request)) is not None:
                request.held = True  # until its search has chosen its next token
                sampling_rows.append(SamplingRow(beams.row_params, request.token_ids, request.num_prompt_tokens, None,
                                                 self.eos_token_ids, key=request))
                continue
            if entry is None or entry[1].finish_reason is not None:  # finished in that take-back: surplus
                sampling_rows.append(SamplingRow(_SURPLUS, request.token_ids, request.num_prompt_tokens, None, []))
                continue
            group, sample = entry
            allowed, must_end = None, False
            pending_rows, verifies_draft = (previous.rows[request],) if request.num_pending_tokens else (), False
            if batch.spec_token_ids and request in batch.spec_token_ids:
                # Row `position` follows the drafts before it, sampled as if they were known (the
                # sync steps of speculative decoding have no previous ids to index).
                spec = batch.spec_token_ids[request]
                position = position + 1 if j and step_logits.sampling_rows[j - 1] == i else 0
                if position == 0:
                    drafts.extend(spec)
                start = len(drafts) - len(spec)
                pending_rows = tuple(range(start, start + position))
                verifies_draft = position < len(spec)
                if sample.guide is not None:
                    allowed, must_end = sample.draft_masks[position]
            elif sample.guide is not None:
                allowed, must_end = sample.guide.packed_mask()
            sampling_rows.append(SamplingRow(
                params=group.params, token_ids=request.token_ids, num_prompt_tokens=request.num_prompt_tokens,
                generator=sample.generator, eos_token_ids=self.eos_token_ids,
                pending_rows=pending_rows, key=request, allowed_tokens=allowed, must_end=must_end,
                verifies_draft=verifies_draft,
            ))
        if drafts:
            (pending_ids,) = to_device([torch.tensor(drafts, dtype=torch.long)], self.runner.device)
        sampled = self.sampler.sample(step_logits.logits, sampling_rows, pending_ids)
        if events is not None:
            events[1].record()
        t3 = time.perf_counter()
        self.scheduler.advance(batch)
        for state, _ in embeddings:  # its prompt is computed: its blocks are free for the next step
            self._release(state.request)
        launched = _Launched(batch, step_logits.sampling_rows, sampled, events,
                             [p for p in prompt_logprobs if p is not None],
                             [(state, HostCopy(vector, torch.Tensor.tolist)) for state, vector in embeddings])
        t4 = time.perf_counter()
        if in_flight is not None:
            results += self._take_back(outputs)
        self._in_flight = launched
        # A step with drafts is taken back at once too: the next step's inputs follow its accepted
        # drafts, which only its tokens tell (though its admissions may have turned drafts off).
        if not self.async_scheduling or self._in_sync() or batch.spec_token_ids:
            results += self._take_back(outputs)

        s = self.stats
        s.num_steps += 1
        s.last_batch_tokens = batch.total_tokens
        s.num_batched_tokens += batch.total_tokens
        s.schedule_seconds += (t1 - t0) + (t4 - t3)
        s.forward_seconds += t2 - t1
        s.sample_seconds += t3 - t_rows
        return results

    def _take_back(self, outputs: OutputKind) -> list[RequestOutput | PoolingRequestOutput]:
        """Wait for the launched step's tokens, and turn them into the requests' progress and outputs."""
        launched, self._in_flight = self._in_flight, None
        t0 = time.perf_counter()
        out = launched.sampled.output()
        for group, copy in launched.prompt_logprobs:  # copied before the tokens: landed too
            entries = copy.result()
            group.prompt_logprobs.extend(entries)
            group.prompt_logprobs_pending -= len(entries)
        if launched.events is not None:  # recorded just after the copy back: done, or nearly
            launched.events[1].synchronize()
            self.stats.device_seconds += launched.events[0].elapsed_time(launched.events[1]) / 1e3
        t1 = time.perf_counter()
        self.stats.sample_seconds += t1 - t0
        final_only = outputs == "final"
        now = time.monotonic()
        touched: dict[str, _Group] = {}
        searched: dict[str, _BeamGroup] = {}
        token_ids, logprobs, top, ranks = out.token_ids, out.logprobs, out.top_logprobs, out.ranks
        spec = launched.batch.spec_token_ids
        rows, j = launched.rows, 0
        while j < len(rows):
            request = launched.batch.requests[rows[j]]
            drafts = spec.get(request, ()) if spec else ()
            first, j = j, j + 1 + len(drafts)
            entry = self.samples.get(request)
            if entry is None:
                beams = self.beam_requests.get(request)
                if beams is not None:
                    beams.tops[request] = top[first]
                    searched[beams.request_id] = beams
                continue  # else finished (or aborted) after this step was launched: a surplus token
            if entry[1].finish_reason is not None:
                continue
            group, sample = entry
            accepted = 0
            while accepted < len(drafts) and token_ids[first + accepted] == drafts[accepted]:
                accepted += 1
            if drafts:
                self.stats.num_drafts += 1
                self.stats.num_draft_tokens += len(drafts)
                self.stats.num_accepted_tokens += accepted
                state = launched.sampled.generator_states.get(first + accepted)
                if state is not None:  # refused: the draws after its row were for drafts not kept
                    sample.generator.set_state(state)
            for k in range(first, first + accepted + 1):
                if sample.finish_reason is not None:
                    break  # stopped at an accepted draft: the tokens after it are not the answer's
                self.scheduler.append_token(request, token_ids[k], now, accepted_draft=k > first)
                self._append(group, sample, token_ids[k], logprobs[k] if logprobs is not None else None,
                             ranks[k] if ranks is not None else None, top[k] if top is not None else None)
            if not final_only or sample.finish_reason is not None:
                touched[group.request_id] = group
        results: list[RequestOutput | PoolingRequestOutput] = [
            self._output(group, delta=outputs == "delta") for group in touched.values()
            if not final_only or group.finished]
        for state, copy in launched.embeddings:
            if self.poolings.get(state.request_id) is state:  # else aborted after its step was launched
                results.append(self._pooling_output(state, copy.result()))
        for beams in searched.values():
            if len(beams.tops) == len(beams.requests) and self._choose_beams(beams, now):
                results.append(self._beam_output(beams))
        self.stats.schedule_seconds += time.perf_counter() - t1
        return results

    def _in_sync(self) -> bool:
        """Whether a step is taken back before the next is scheduled: the next step's inputs need
        its tokens on the host (drafts are proposed from them, a beam search chooses them)."""
        return bool(self.beam_groups) or self._drafting()

    def _drafting(self) -> bool:
        """Whether the next step proposes drafts (speculative decoding, under disable_by_batch_size)."""
        if self.proposer is None:
            return False
        limit = self.proposer.config.disable_by_batch_size
        return limit is None or len(self.scheduler.running) < limit

    def _propose(self) -> None:
        """Drafts for the running decodes, for the step about to be scheduled: none past what
        max_tokens and the context leave, for a structured output none past what its grammar
        allows (or that would end it), none at all from disable_by_batch_size running up."""
        drafting = self._drafting()
        for request in self.scheduler.running:
            request.spec_token_ids = []
            if not drafting or request.num_uncomputed_tokens != 1 or request.num_pending_tokens:
                continue
            entry = self.samples.get(request)
            if entry is None:
                continue
            room = min(request.max_tokens - request.num_output_tokens, self.max_model_len - request.num_tokens) - 1
            drafts = self.proposer.propose(request, request.token_ids, room)
            guide = entry[1].guide
            if guide is not None and drafts:
                entry[1].draft_masks = guide.masks_along(drafts)
                drafts = drafts[:len(entry[1].draft_masks) - 1]
            request.spec_token_ids = drafts

    def _prompt_logprobs(self, request: Request, hidden: torch.Tensor,
                         ) -> tuple[_Group, HostCopy[list[dict[int, float]]]] | None:
        """Hidden states at positions start.. predict prompt tokens start+1..: their logprobs,
        launched and on their way back with the step's tokens (`_take_back` records them), so a
        step with prompt logprobs waits on the device no more than any other. A recompute after
        preemption skips the positions recorded or on their way. The logits are made max_num_seqs
        positions at a time: no more than a step's sampling logits, which the GPU memory profile
        charges (a 2,048-token chunk's at once would be gigabytes at a 150k vocabulary)."""
        group, _ = self.samples[request]
        start = request.num_computed_tokens
        known = len(group.prompt_logprobs) + group.prompt_logprobs_pending
        first = known - start - 1  # the first position whose prediction is not known
        last = min(hidden.shape[0], request.num_prompt_tokens - start - 1)
        if first >= last:
            return None
        n, k = last - first, group.params.prompt_logprobs
        targets = request.prompt_token_ids[start + first + 1:start + last + 1]
        (targets_dev,) = to_device([torch.tensor(targets, dtype=torch.long)], hidden.device)
        slices = []
        for i in range(first, last, self.config.max_num_seqs):
            j = min(last, i + self.config.max_num_seqs)
            with torch.inference_mode():
                logprobs = self.runner.model.compute_logits(hidden[i:j]).float().log_softmax(dim=-1)
            slices.append(top_logprobs_parts(logprobs, targets_dev[i - first:j - first], k))
        parts = [torch.cat(part) for part in zip(*slices)]  # each part's rows in order, as one call's

        def unpack(host: torch.Tensor) -> list[dict[int, float]]:
            chosen, ranks, values, ids = split_top_logprobs(host, n, k)
            return [self._logprobs_entry(target, lp, rank, zip(top_ids, top_values))
                    for target, lp, rank, top_ids, top_values in zip(targets, chosen, ranks, ids, values)]

        group.prompt_logprobs_pending += n
        return group, HostCopy(torch.cat(parts), unpack)

    def _logprobs_entry(self, token: int, logprob: float, rank: int,
                        top: Iterable[tuple[int, float]]) -> dict[int, float]:
        """A position's logprobs as vLLM gives them: the top-k (ranked 1..k) and the token."""
        if not self.logprob_objects:
            entry = dict(top)
            entry[token] = logprob
            return entry
        text = self._token_text
        entry = {token: Logprob(logprob, rank, text(token))}
        entry.update((t, Logprob(value, i, text(t))) for i, (t, value) in enumerate(top, 1))  # ties: k's rank
        return entry

    def _append(self, group: _Group, sample: _Sample, token: int, logprob: float | None, rank: int | None,
                top: list[tuple[int, float]] | None) -> None:
        params, request = group.params, sample.request
        if sample.logprobs is not None and logprob is not None:
            sample.logprobs.append(self._logprobs_entry(token, logprob, rank, top or ()))
            sample.cumulative_logprob += logprob
        num_out = request.num_output_tokens
        guide = sample.guide
        # Only end tokens were allowed: min_tokens yields to the grammar (so did the sampler).
        past_min = num_out >= params.min_tokens or (guide is not None and guide.must_end())
        if guide is not None and not guide.advance(token):
            logger.warning("request %s: token %d is not one its grammar allows; the answer is cut here",
                           request.request_id, token)
            return self._finish(sample, "length")
        eos = past_min and token in self.eos_token_ids and not params.ignore_eos
        stop_token = past_min and token in params.stop_token_ids
        # As vLLM: the text ends before a stop token (EOS included), whose id stays in the
        # output's ids, unless include_stop_str_in_output.
        if sample.detokenizer is not None and (not (eos or stop_token) or params.include_stop_str_in_output):
            # Stop strings count from the token after the first min_tokens, as in vLLM (the
            # sampler holds EOS and stop ids back until then too).
            stop_string = sample.detokenizer.add_token(token, num_out > params.min_tokens)
        else:
            stop_string = False
        if eos:
            return self._finish(sample, "stop")
        if stop_token:
            return self._finish(sample, "stop", token)
        if stop_string:
            return self._finish(sample, "stop", sample.detokenizer.stop_reason)
        if num_out >= request.max_tokens or len(request.token_ids) >= self.max_model_len:
            self._finish(sample, "length")
        elif guide is not None and guide.dead_end():  # "stop" would say the answer is whole
            logger.warning("request %s: its answer goes past what structured outputs follow (MAX_DEPTH open "
                           "rules, MAX_STACKS ways to read it); cut here", request.request_id)
            self._finish(sample, "length")

    def _finish(self, sample: _Sample, reason: str, stop_reason: int | str | None = None) -> None:
        sample.finish_reason, sample.stop_reason = reason, stop_reason
        if sample.guide is not None:
            self._num_guided -= 1
        if sample.detokenizer is not None and not sample.detokenizer.stop_reason:
            sample.detokenizer.finish()
        self._release(sample.request)
        if self.proposer is not None:
            self.proposer.forget(sample.request)

    def _output(self, group: _Group, delta: bool = False) -> RequestOutput:
        completions = []
        for sample in group.samples:
            request, detok = sample.request, sample.detokenizer
            num_prompt, num_out = request.num_prompt_tokens, request.num_output_tokens
            new_ids = request.token_ids[num_prompt + sample.sent_tokens:]
            new_text = detok.take_delta() if detok is not None else ""
            logprobs = sample.logprobs
            if delta:
                # Only the samples with news: a sibling that finished earlier (n > 1) would
                # otherwise report its finish again every step until the last one finishes.
                if not new_ids and not new_text and (sample.finish_reason is None or sample.sent_finish):
                    continue
                sample.sent_finish = sample.finish_reason is not None
                text, token_ids = new_text, new_ids
                logprobs = logprobs[sample.sent_tokens:] if logprobs is not None else None
            else:
                text, token_ids = detok.text if detok is not None else "", request.output_token_ids
            completions.append(CompletionOutput(
                index=sample.index,
                text=text,
                token_ids=token_ids,
                cumulative_logprob=sample.cumulative_logprob if sample.logprobs is not None else None,
                logprobs=logprobs,
                finish_reason=sample.finish_reason,
                stop_reason=sample.stop_reason,
                delta_text=new_text,
                delta_token_ids=new_ids,
                num_tokens=num_out,
            ))
            sample.sent_tokens = num_out
        finished = group.finished
        if finished:
            del self.groups[group.request_id]
            for sample in group.samples:
                self.samples.pop(sample.request, None)
        return RequestOutput(
            request_id=group.request_id,
            prompt=group.prompt,
            prompt_token_ids=group.prompt_token_ids,
            outputs=completions,
            finished=finished,
            num_cached_tokens=group.samples[0].request.num_cached_tokens,
            metrics=self._metrics(group, finished),
            prompt_logprobs=group.prompt_logprobs,
            lora_request=group.lora_request,
        )

    @staticmethod
    def _metrics(group: _Group, finished: bool) -> RequestMetrics:
        if not finished and len(group.samples) == 1:  # the common case of every step, cheaply
            r = group.samples[0].request
            return RequestMetrics(arrival_time=group.arrival_time, first_scheduled_time=r.first_scheduled_time,
                                  first_token_time=r.first_token_time, num_preemptions=r.num_preemptions)
        requests = [s.request for s in group.samples]

        def first(values: list[float | None]) -> float | None:
            present = [v for v in values if v is not None]
            return min(present) if present else None

        finish_times = [r.finish_time for r in requests]
        return RequestMetrics(
            arrival_time=group.arrival_time,
            first_scheduled_time=first([r.first_scheduled_time for r in requests]),
            first_token_time=first([r.first_token_time for r in requests]),
            finish_time=max(finish_times) if all(t is not None for t in finish_times) else None,
            # Between the steps that gave a sample tokens, as vLLM's: a speculative step's tokens arrive together.
            inter_token_latencies=[b - a for r in requests for a, b in zip(r.token_times, r.token_times[1:]) if b != a]
            if finished else [],
            num_preemptions=sum(r.num_preemptions for r in requests),
        )
