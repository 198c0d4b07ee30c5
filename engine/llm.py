"""The offline API, as vLLM users know it: LLM(...).generate(prompts, sampling_params)."""

from __future__ import annotations

from collections.abc import Callable, Sequence
from dataclasses import replace
from typing import Any

from tqdm.auto import tqdm

from engine.beam_search import BeamSearchOutput, BeamSearchParams, BeamSearchSequence
from engine.chat_messages import template_message
from engine.config import EngineConfig
from engine.engine import LLMEngine
from engine.lora import LoRARequest
from engine.outputs import RequestOutput
from engine.pooling import EmbeddingRequestOutput, PoolingParams, PoolingRequestOutput
from engine.scoring import (ClassificationRequestOutput, ScoringOutput, ScoringRequestOutput, cosine_similarity,
                            cross_encoder_prompt, score_pairs)
from engine.sampling_params import SamplingParams, is_int

# A text, token ids, or vLLM's TextPrompt / TokensPrompt dicts: {"prompt": text} or
# {"prompt_token_ids": ids}.
Prompt = str | list[int] | dict[str, Any]
Message = dict[str, Any]  # {"role": ..., "content": ...}, as the OpenAI API's
ProgressBar = bool | Callable[..., Any]  # vLLM's use_tqdm: on, off, or a tqdm-like class


def _prompt_list(prompts: Prompt | Sequence[Prompt]) -> Sequence[Prompt]:
    """One prompt (a text, token ids, a dict) or a list of them, as a list."""
    if isinstance(prompts, (str, dict)) or (isinstance(prompts, list) and prompts and is_int(prompts[0])):
        return [prompts]
    return prompts


def _per_prompt(value: Any, n: int, kind: type, name: str, default: Callable[[], Any]) -> list[Any]:
    """One `kind` per prompt: `value` for all (None: `default()`), or a list of one per prompt."""
    if value is None:
        value = default()
    if isinstance(value, kind):
        return [value] * n
    if not isinstance(value, Sequence) or isinstance(value, str):
        raise TypeError(f"{name} must be a {kind.__name__} or a list of them, got {type(value).__name__}")
    values = list(value)
    if len(values) != n:
        raise ValueError(f"got {len(values)} {kind.__name__} for {n} prompts")
    return values


class LLM:
    def __init__(self, model: str | None = None, **engine_args: Any) -> None:
        self.engine = LLMEngine(EngineConfig(model=model, **engine_args))
        self._counter = 0

    def get_tokenizer(self):
        return self.engine.tokenizer

    def generate(
        self,
        prompts: Prompt | Sequence[Prompt],
        sampling_params: SamplingParams | Sequence[SamplingParams] | None = None,
        use_tqdm: ProgressBar = True,
        lora_request: LoRARequest | Sequence[LoRARequest | None] | None = None,
        priority: Sequence[int] | None = None,
    ) -> list[RequestOutput]:
        """Run every prompt to completion; outputs come back in prompt order. A prompt is a
        text, a list of token ids, or vLLM's {"prompt": text} / {"prompt_token_ids": ids}.
        `priority`: one per prompt, lower runs earlier (needs scheduling_policy="priority").
        `lora_request`: the LoRA adapter all prompts run with, or one per prompt (None: the
        base model; needs enable_lora=True)."""
        prompts = _prompt_list(prompts)
        texts, token_prompts = [], []
        for prompt in prompts:  # tokenize and check everything before anything is scheduled
            text, tokens = self._prompt(prompt)
            texts.append(text)
            token_prompts.append(tokens)
        if priority is not None:
            priority = list(priority)
            if len(priority) != len(texts):
                raise ValueError(f"got {len(priority)} priorities for {len(texts)} prompts")
            for p in priority:
                self.engine.check_priority(p)
        return self._run(texts, token_prompts, self._params(sampling_params, len(texts)), use_tqdm, priority,
                         lora_request)

    def beam_search(
        self,
        prompts: Prompt | Sequence[Prompt],
        params: BeamSearchParams,
        lora_request: LoRARequest | Sequence[LoRARequest | None] | None = None,
        use_tqdm: ProgressBar = False,
        concurrency_limit: int | None = None,
    ) -> list[BeamSearchOutput]:
        """vLLM's `LLM.beam_search`: each prompt's beam_width best sequences, best first, in
        prompt order (see engine/beam_search.py for the search, transformers' `num_beams`).
        Prompts as `generate`'s; `concurrency_limit`: at most this many searches at once (all
        of them by default: continuous batching runs their beams together)."""
        prompts = _prompt_list(prompts)
        if concurrency_limit is not None and (not is_int(concurrency_limit) or concurrency_limit < 1):
            raise ValueError(f"concurrency_limit must be None or an integer >= 1, got {concurrency_limit!r}")
        if not isinstance(params, BeamSearchParams):
            raise TypeError(f"params must be a BeamSearchParams, got {type(params).__name__}")
        if params.logprobs is None:  # vLLM's sequences carry each step's 2 x beam_width logprobs
            params = replace(params, logprobs=2 * params.beam_width)
        texts, prepared = [], []
        for prompt in prompts:  # everything checked before anything is scheduled
            text, tokens = self._prompt(prompt)
            texts.append(text)
            prepared.append(self.engine.prepare_beam_search(tokens, params, cap_at_context=True))
        loras = self._loras(lora_request, len(prepared))

        def add(i: int, request_id: str) -> None:
            self.engine.add_prepared_beam_search(request_id, texts[i], prepared[i], lora_request=loras[i])

        results = []
        for output in self._drive(len(prepared), add, use_tqdm, "Beam search", concurrency_limit):
            results.append(BeamSearchOutput([
                BeamSearchSequence(tokens=output.prompt_token_ids + c.token_ids, logprobs=c.logprobs or [],
                                   cum_logprob=c.cumulative_logprob, text=c.text, finish_reason=c.finish_reason,
                                   stop_reason=c.stop_reason, lora_request=output.lora_request)
                for c in output.outputs]))
        return results

    def embed(
        self,
        prompts: Prompt | Sequence[Prompt],
        pooling_params: PoolingParams | Sequence[PoolingParams] | None = None,
        *,
        truncate_prompt_tokens: int | None = None,
        use_tqdm: ProgressBar = True,
        lora_request: LoRARequest | Sequence[LoRARequest | None] | None = None,
    ) -> list[EmbeddingRequestOutput]:
        """vLLM's `LLM.embed`: each prompt's embedding (`outputs.embedding`, a list of floats),
        in prompt order, pooled as the model's pooler config says (engine/pooling.py). Prompts
        as `generate`'s; one PoolingParams for all or one per prompt; `truncate_prompt_tokens`
        (keep the last k; -1: the context length) for those whose params set none."""
        return self._pool(prompts, pooling_params, "embed", truncate_prompt_tokens, use_tqdm, lora_request,
                          "Embedded prompts")

    def classify(
        self,
        prompts: Prompt | Sequence[Prompt],
        pooling_params: PoolingParams | Sequence[PoolingParams] | None = None,
        *,
        truncate_prompt_tokens: int | None = None,
        use_tqdm: ProgressBar = True,
        lora_request: LoRARequest | Sequence[LoRARequest | None] | None = None,
    ) -> list[ClassificationRequestOutput]:
        """vLLM's `LLM.classify`, for a sequence classifier: each prompt's label probabilities
        (`outputs.probs`; the raw logits with use_activation=False), in prompt order.
        Arguments as `embed`'s."""
        return self._pool(prompts, pooling_params, "classify", truncate_prompt_tokens, use_tqdm, lora_request,
                          "Classified prompts")

    def score(
        self,
        data_1: str | Sequence[str],
        data_2: str | Sequence[str],
        /,
        *,
        truncate_prompt_tokens: int | None = None,
        use_tqdm: ProgressBar = True,
        pooling_params: PoolingParams | None = None,
        lora_request: LoRARequest | Sequence[LoRARequest | None] | None = None,
        chat_template: str | None = None,
        chat_template_kwargs: dict[str, Any] | None = None,
    ) -> list[ScoringRequestOutput]:
        """vLLM's `LLM.score`: how well each pair of texts match (`outputs.score`), pairing one
        text with one, one with N, or N with N in order (engine/scoring.py). A cross-encoder (a
        classifier with one label) reads each pair as one prompt; any other model embeds each
        text, and a pair's score is its embeddings' cosine similarity. `lora_request`: one for
        all, or one per pair. `chat_template`: a cross-encoder's score template (vLLM's), a
        Jinja template that renders each pair from the messages of roles "query" and
        "document" (Qwen3-Reranker's format, so the texts need not carry it);
        `chat_template_kwargs`: its variables (the shipped Qwen3-Reranker template's
        `instruction`)."""
        pairs = score_pairs(data_1, data_2)
        classifier = self.engine.classifier
        if classifier is not None:
            if self.engine.tokenizer is None:
                raise ValueError("this model has no tokenizer to read a pair of texts with")
            prompts = []
            for text_1, text_2 in pairs:
                text, ids = cross_encoder_prompt(self.engine.tokenizer, text_1, text_2, classifier.joins_pairs,
                                                 chat_template, chat_template_kwargs)
                prompts.append({"prompt": text, "prompt_token_ids": ids})
            return self._pool(prompts, pooling_params, "score", truncate_prompt_tokens, use_tqdm, lora_request,
                              "Scored pairs")
        for name, value in (("chat_template", chat_template), ("chat_template_kwargs", chat_template_kwargs),
                            ("use_activation", pooling_params and pooling_params.use_activation)):
            if value is not None:
                raise ValueError(f"{name} applies to a cross-encoder's score; this model's score is its embeddings' "
                                 "cosine similarity")
        if pooling_params is not None and pooling_params.task == "score":
            pooling_params = replace(pooling_params, task=None)
        shared = isinstance(data_1, str) or len(data_1) == 1
        loras = lora_request
        if not (lora_request is None or isinstance(lora_request, LoRARequest)):
            loras = self._per_pair(lora_request, len(pairs))
            shared = False  # the one first text, embedded with each pair's adapter
        side_1 = [pairs[0][0]] if shared else [t for t, _ in pairs]
        embedded = self._pool(side_1 + [t for _, t in pairs], pooling_params, "embed", truncate_prompt_tokens,
                              use_tqdm, loras, "Embedded texts")
        firsts, seconds = embedded[:len(side_1)], embedded[len(side_1):]
        return [self._cosine_score(firsts[i if len(firsts) > 1 else 0], second) for i, second in enumerate(seconds)]

    @staticmethod
    def _per_pair(loras: Sequence[LoRARequest | None], num_pairs: int) -> list[LoRARequest | None]:
        """One adapter per pair, as one per text embedded: each pair's two texts, first texts
        first."""
        loras = list(loras)
        if len(loras) != num_pairs:
            raise ValueError(f"got {len(loras)} LoRA requests for {num_pairs} pairs")
        return loras + loras

    @staticmethod
    def _cosine_score(first: EmbeddingRequestOutput, second: EmbeddingRequestOutput) -> ScoringRequestOutput:
        """A bi-encoder's pair: its two embeddings' cosine similarity."""
        return ScoringRequestOutput(
            request_id=f"{first.request_id}_{second.request_id}",
            outputs=ScoringOutput(cosine_similarity(first.outputs.embedding, second.outputs.embedding)),
            prompt_token_ids=first.prompt_token_ids + second.prompt_token_ids,
            num_cached_tokens=first.num_cached_tokens + second.num_cached_tokens,
            lora_request=second.lora_request,
        )

    def _pool(self, prompts: Prompt | Sequence[Prompt], pooling_params: PoolingParams | Sequence[PoolingParams] | None,
              task: str, truncate_prompt_tokens: int | None, use_tqdm: ProgressBar,
              lora_request: LoRARequest | Sequence[LoRARequest | None] | None, desc: str) -> list[PoolingRequestOutput]:
        """Run a pooling task on every prompt: one output each, in prompt order."""
        prompts = _prompt_list(prompts)
        params = _per_prompt(pooling_params, len(prompts), PoolingParams, "pooling_params", PoolingParams)
        texts, prepared = [], []
        for prompt, p in zip(prompts, params):  # everything checked before anything is scheduled
            p = PoolingParams() if p is None else p
            if not isinstance(p, PoolingParams):
                raise TypeError(f"pooling params must be a PoolingParams, got {type(p).__name__}")
            if p.task not in (None, task):
                raise ValueError(f"pooling params for {p.task} were given to {task}")
            p = replace(p, task=task)
            if truncate_prompt_tokens is not None and p.truncate_prompt_tokens is None:
                p = replace(p, truncate_prompt_tokens=truncate_prompt_tokens)
            text, tokens = self._prompt(prompt)
            texts.append(text)
            prepared.append(self.engine.prepare_pooling(tokens, p))
        loras = self._loras(lora_request, len(prepared))

        def add(i: int, request_id: str) -> None:
            self.engine.add_prepared_pooling(request_id, texts[i], prepared[i], lora_request=loras[i])

        return self._drive(len(prepared), add, use_tqdm, desc)

    def _prompt(self, prompt: Prompt) -> tuple[str | None, list[int]]:
        """(its text if it has one, its token ids)."""
        if isinstance(prompt, str):
            return prompt, self.engine.tokenize(prompt)
        if isinstance(prompt, list) and all(is_int(t) for t in prompt):
            return None, list(prompt)
        if isinstance(prompt, dict):
            unknown = sorted(set(prompt) - {"prompt", "prompt_token_ids"})
            if unknown:
                raise ValueError(f"a prompt dict takes 'prompt' or 'prompt_token_ids', not {unknown}")
            if "prompt_token_ids" in prompt:
                text, tokens = self._prompt(prompt["prompt_token_ids"])
                if text is not None:
                    raise ValueError("'prompt_token_ids' must be a list of token ids")
                return prompt.get("prompt"), tokens
            if isinstance(prompt.get("prompt"), str):
                return prompt["prompt"], self.engine.tokenize(prompt["prompt"])
        raise TypeError(f"a prompt must be a string, a list of token ids, or a dict with 'prompt' (a string) "
                        f"or 'prompt_token_ids', got {prompt!r:.100}")

    def chat(
        self,
        messages: Sequence[Message] | Sequence[Sequence[Message]],
        sampling_params: SamplingParams | Sequence[SamplingParams] | None = None,
        *,
        add_generation_prompt: bool = True,
        continue_final_message: bool = False,
        chat_template: str | None = None,
        chat_template_kwargs: dict[str, Any] | None = None,
        tools: list[dict[str, Any]] | None = None,
        use_tqdm: ProgressBar = True,
        lora_request: LoRARequest | Sequence[LoRARequest | None] | None = None,
    ) -> list[RequestOutput]:
        """vLLM's `LLM.chat`: one conversation (a list of messages) or a list of them, each
        rendered with the model's chat template, then generated as `generate` does (outputs
        in conversation order, `prompt` the rendered text). The rendered text is tokenized
        without special tokens: the template writes them (a BOS added again would be a
        second one). `chat_template`: a Jinja template to use instead of the tokenizer's.
        `tools`: OpenAI-style tool definitions for the template to show the model (its answer
        comes back as text: no tool-call parsing). Messages reach the template as the server's
        do: text content parts joined by newlines, tool calls' JSON arguments parsed.
        `lora_request` as `generate`'s."""
        tokenizer = self.engine.tokenizer
        if tokenizer is None or not (chat_template or getattr(tokenizer, "chat_template", None)):
            raise ValueError("this model has no chat template: pass chat_template, or use generate()")
        conversations = [messages] if messages and isinstance(messages[0], dict) else list(messages)
        # As vLLM's, chat_template_kwargs may also set the named arguments (theirs win).
        kwargs = {"add_generation_prompt": add_generation_prompt, "continue_final_message": continue_final_message,
                  "chat_template": chat_template, "tools": tools} | (chat_template_kwargs or {})
        kwargs["add_generation_prompt"] = kwargs["add_generation_prompt"] and not kwargs["continue_final_message"]
        texts = [tokenizer.apply_chat_template([template_message(m) for m in conversation],
                                               tokenize=False, **kwargs)
                 for conversation in conversations]
        token_prompts = [tokenizer.encode(text, add_special_tokens=False) for text in texts]
        return self._run(texts, token_prompts, self._params(sampling_params, len(texts)), use_tqdm,
                         lora_request=lora_request)

    def get_default_sampling_params(self) -> SamplingParams:
        """What `generate` and `chat` use when given no SamplingParams: the defaults, with
        the model's generation config's sampling where it has some (as vLLM's)."""
        return SamplingParams(**self.engine.default_sampling)

    def reset_prefix_cache(self) -> bool:
        """vLLM's: forget every cached prefix, so the next prompts are computed in full (a
        benchmark's rounds alike). False, and nothing changed, while requests hold KV blocks."""
        return self.engine.reset_prefix_cache()

    def _params(self, sampling_params: SamplingParams | Sequence[SamplingParams] | None, n: int) -> list[SamplingParams]:
        """One SamplingParams per prompt."""
        return _per_prompt(sampling_params, n, SamplingParams, "sampling_params", self.get_default_sampling_params)

    def _loras(self, lora_request: LoRARequest | Sequence[LoRARequest | None] | None,
               n: int) -> list[LoRARequest | None]:
        """One adapter (or None) per prompt, each read and checked."""
        if lora_request is None or isinstance(lora_request, LoRARequest):
            loras = [lora_request] * n
        elif isinstance(lora_request, Sequence) and not isinstance(lora_request, str):
            loras = list(lora_request)
            if len(loras) != n:
                raise ValueError(f"got {len(loras)} LoRA requests for {n} prompts")
        else:
            raise TypeError(f"lora_request must be a LoRARequest or a list of them, got {type(lora_request).__name__}")
        for lora in dict.fromkeys(loras):
            if lora is not None:
                self.engine.add_lora(lora)
        return loras

    def _run(self, texts: list[str | None], token_prompts: list[list[int]], params: list[SamplingParams],
             use_tqdm: ProgressBar, priority: list[int] | None = None,
             lora_request: LoRARequest | Sequence[LoRARequest | None] | None = None) -> list[RequestOutput]:
        """Check every prompt, then run them all to completion. As vLLM's offline API, a
        max_tokens past the end of the context (or of a smaller KV pool) stops there,
        finish_reason "length", instead of being refused (the server refuses it, as vLLM's)."""
        owned: dict[int, SamplingParams] = {}  # one engine copy per params object, not per prompt
        prepared = []
        for tokens, p in zip(token_prompts, params):
            if id(p) not in owned:
                owned[id(p)] = self.engine.own_params(p)
            prepared.append(self.engine.prepare(tokens, owned[id(p)], cap_at_context=True, owned=True))
        loras = self._loras(lora_request, len(token_prompts))

        def add(i: int, request_id: str) -> None:
            self.engine.add_prepared(request_id, texts[i], prepared[i], priority=priority[i] if priority else 0,
                                     lora_request=loras[i])

        return self._drive(len(prepared), add, use_tqdm, "Processed prompts")

    def _drive(self, count: int, add: Callable[[int, str], None], use_tqdm: ProgressBar, desc: str,
               limit: int | None = None) -> list[Any]:
        """Add requests 0..count-1 (`add(i, request_id)`; at most `limit` unfinished at once)
        and step the engine until each has finished: their final outputs, in order. Interrupted,
        every one is aborted."""
        ids = [f"offline-{self._counter + i}" for i in range(count)]
        self._counter += count
        finished: dict[str, Any] = {}  # RequestOutput, PoolingRequestOutput
        bar = (use_tqdm if callable(use_tqdm) else tqdm)(total=count, desc=desc) if use_tqdm and count else None
        try:
            added = 0
            while added < count or self.engine.has_unfinished_requests():
                while added < count and (limit is None or added - len(finished) < limit):
                    add(added, ids[added])
                    added += 1
                for output in self.engine.step(outputs="final"):
                    finished[output.request_id] = output
                    if bar is not None:
                        bar.update(1)
        except BaseException:  # e.g. Ctrl-C in a notebook: the next call must not run these first
            for request_id in ids:
                self.engine.abort_request(request_id)
            raise
        finally:
            if bar is not None:
                bar.close()
        return [finished[i] for i in ids]

