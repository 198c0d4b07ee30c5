"""The offline API, as vLLM users know it: LLM(...).generate(prompts, sampling_params)."""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

from engine.config import EngineConfig
from engine.engine import LLMEngine
from engine.outputs import RequestOutput
from engine.sampling_params import SamplingParams

Prompt = str | list[int]


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
        if sampling_params is None:
            sampling_params = SamplingParams()
        if isinstance(sampling_params, SamplingParams):
            params = [sampling_params] * len(prompts)
        else:
            params = list(sampling_params)
            if len(params) != len(prompts):
                raise ValueError(f"got {len(params)} SamplingParams for {len(prompts)} prompts")
        # Tokenize and validate everything before anything is scheduled.
        token_prompts = [self.engine.tokenize(p) if isinstance(p, str) else list(p) for p in prompts]
        for tokens, p in zip(token_prompts, params):
            self.engine.validate(tokens, p)
        ids = []
        for prompt, tokens, p in zip(prompts, token_prompts, params):
            request_id = f"offline-{self._counter}"
            self._counter += 1
            self.engine.add_request(request_id, prompt, p, prompt_token_ids=tokens)
            ids.append(request_id)
        finished: dict[str, RequestOutput] = {}
        while self.engine.has_unfinished_requests():
            for output in self.engine.step(outputs="final"):
                finished[output.request_id] = output
        return [finished[i] for i in ids]
