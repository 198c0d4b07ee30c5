"""The worker: offline LLM API, engine loop, model runner, models, weights, sampler."""

from engine.beam_search import BeamSearchOutput, BeamSearchParams, BeamSearchSequence
from engine.config import EngineConfig, ModelConfig
from engine.engine import LLMEngine
from engine.llm import LLM
from engine.lora import LoRARequest
from engine.outputs import CompletionOutput, Logprob, RequestMetrics, RequestOutput
from engine.pooling import EmbeddingOutput, EmbeddingRequestOutput, PoolerConfig, PoolingParams
from engine.sampling_params import SamplingParams
from engine.structured_outputs import StructuredOutputsParams

__all__ = [
    "LLM", "BeamSearchOutput", "BeamSearchParams", "BeamSearchSequence", "CompletionOutput", "EmbeddingOutput",
    "EmbeddingRequestOutput", "EngineConfig", "LLMEngine", "Logprob", "LoRARequest", "ModelConfig", "PoolerConfig",
    "PoolingParams", "RequestMetrics", "RequestOutput", "SamplingParams", "StructuredOutputsParams",
]
