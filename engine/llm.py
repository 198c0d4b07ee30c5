"""The offline API, as vLLM users know it: LLM(...).generate(prompts, sampling_params)."""

from __future__ import annotations

import dataclasses
from collections.abc import Sequence
from typing import Any

from engine.chat_messages import with_tool_arguments_parsed
from engine.config import EngineConfig
from engine.engine import LLMEngine
from engine.outputs import RequestOutput
from engine.sampling_params import SamplingParams

Prompt = str | list[int]
Message = dict[str, Any]  # {"role": ..., "content": ...}, as the OpenAI API's


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
    ) -> list[RequestOutput]:
        """Run every prompt to completion; outputs come back in prompt order."""
        if isinstance(prompts, str) or (isinstance(prompts, list) and prompts and isinstance(prompts[0], int)):
            prompts = [prompts]
        prompts = list(prompts)
        params = self._params(sampling_params, len(prompts))
        # Tokenize and validate everything before anything is scheduled.
        token_prompts = [self.engine.tokenize(p) if isinstance(p, str) else list(p) for p in prompts]
        return self._run(prompts, token_prompts, params)

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
    ) -> list[RequestOutput]:
        """vLLM's `LLM.chat`: one conversation (a list of messages) or a list of them, each
        rendered with the model's chat template, then generated as `generate` does (outputs
        in conversation order, `prompt` the rendered text). The rendered text is tokenized
        without special tokens: the template writes them (a BOS added again would be a
        second one). `chat_template`: a Jinja template to use instead of the tokenizer's.
        `tools`: OpenAI-style tool definitions for the template to show the model (its answer
        comes back as text: no tool-call parsing). A history's tool calls reach the template
        with their JSON arguments parsed, as the server's do."""
        tokenizer = self.engine.tokenizer
        if tokenizer is None or not (chat_template or getattr(tokenizer, "chat_template", None)):
            raise ValueError("this model has no chat template: pass chat_template, or use generate()")
        conversations = [messages] if messages and isinstance(messages[0], dict) else list(messages)
        # As vLLM's, chat_template_kwargs may also set the named arguments (theirs win).
        kwargs = {"add_generation_prompt": add_generation_prompt, "continue_final_message": continue_final_message,
                  "chat_template": chat_template, "tools": tools} | (chat_template_kwargs or {})
        kwargs["add_generation_prompt"] = kwargs["add_generation_prompt"] and not kwargs["continue_final_message"]
        texts = [tokenizer.apply_chat_template([with_tool_arguments_parsed(m) for m in conversation],
                                               tokenize=False, **kwargs)
                 for conversation in conversations]
        token_prompts = [tokenizer.encode(text, add_special_tokens=False) for text in texts]
        return self._run(texts, token_prompts, self._params(sampling_params, len(texts)))

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
        if sampling_params is None:
            sampling_params = self.get_default_sampling_params()
        if isinstance(sampling_params, SamplingParams):
            return [sampling_params] * n
        params = list(sampling_params)
        if len(params) != n:
            raise ValueError(f"got {len(params)} SamplingParams for {n} prompts")
        return params

    def _within_context(self, tokens: list[int], params: SamplingParams) -> SamplingParams:
        """As vLLM's offline API, a max_tokens past the end of the context (or of the KV pool,
        when it holds less) stops there, finish_reason "length", instead of being refused (the
        server refuses it, as vLLM's). A prompt with no room left is still an error."""
        room = self.engine.scheduler.max_sequence_tokens - len(tokens)
        if params.max_tokens is None or params.max_tokens <= room or room < 1:
            return params
        return dataclasses.replace(params, max_tokens=room, min_tokens=min(params.min_tokens, room))

    def _run(self, prompts: list[Prompt], token_prompts: list[list[int]],
             params: list[SamplingParams]) -> list[RequestOutput]:
        """Validate every prompt, then run them all to completion."""
        params = [self._within_context(tokens, p) for tokens, p in zip(token_prompts, params)]
        for tokens, p in zip(token_prompts, params):
            self.engine.validate(tokens, p)
        ids = []
        finished: dict[str, RequestOutput] = {}
        try:
            for prompt, tokens, p in zip(prompts, token_prompts, params):
                request_id = f"offline-{self._counter}"
                self._counter += 1
                self.engine.add_request(request_id, prompt, p, prompt_token_ids=tokens)
                ids.append(request_id)
            while self.engine.has_unfinished_requests():
                for output in self.engine.step(outputs="final"):
                    finished[output.request_id] = output
        except BaseException:  # e.g. Ctrl-C in a notebook: the next call must not run these first
            for request_id in ids:
                self.engine.abort_request(request_id)
            raise
        return [finished[i] for i in ids]
