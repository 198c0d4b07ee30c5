"""The worker: offline LLM API, engine loop, model runner, models, weights, sampler."""

from engine.beam_search import BeamSearchOutput, BeamSearchParams, BeamSearchSequence
from engine.config import EngineConfig, ModelConfig
from engine.engine import LLMEngine
from engine.llm import LLM
from engine.lora import LoRARequest
from engine.outputs import CompletionOutput, Logprob, RequestMetrics, RequestOutput
from engine.pooling import EmbeddingOutput, EmbeddingRequestOutput, PoolerConfig, PoolingParams, PoolingRequestOutput
from engine.sampling_params import SamplingParams
from engine.scoring import ClassificationOutput, ClassificationRequestOutput, ScoringOutput, ScoringRequestOutput
from engine.structured_outputs import StructuredOutputsParams

__all__ = [
    "LLM", "BeamSearchOutput", "BeamSearchParams", "BeamSearchSequence", "ClassificationOutput",
    "ClassificationRequestOutput", "CompletionOutput", "EmbeddingOutput", "EmbeddingRequestOutput", "EngineConfig",
    "LLMEngine", "Logprob", "LoRARequest", "ModelConfig", "PoolerConfig", "PoolingParams", "PoolingRequestOutput",
    "RequestMetrics", "RequestOutput", "SamplingParams", "ScoringOutput", "ScoringRequestOutput",
    "StructuredOutputsParams",
]
