"""Turns a ScheduledBatch into one flattened forward pass over the paged KV cache."""

from __future__ import annotations

import logging
from dataclasses import dataclass

import torch

import kernels
from engine.attention import AttentionMetadata
from engine.config import EngineConfig, ModelConfig
from engine.models.llama import LlamaForCausalLM
from engine.weights import init_dummy_weights, iterate_safetensors
from scheduler import ScheduledBatch

logger = logging.getLogger(__name__)

DEFAULT_CPU_KV_CACHE_BYTES = 2 << 30


@dataclass(slots=True)
class StepInputs:
    input_ids: torch.Tensor
    positions: torch.Tensor
    meta: AttentionMetadata
    logits_indices: torch.Tensor  # rows of the hidden states that sample
    sampling_rows: list[int]  # for each logits row, the index of its request in the batch


class ModelRunner:
    def __init__(self, model_path: str, model_config: ModelConfig, config: EngineConfig) -> None:
        self.config = config
        self.model_config = model_config
        self.device = config.resolve_device()
        self.dtype = config.resolve_dtype(self.device)
        self.block_size = config.block_size
        self.backend = kernels.attention_backend(self.device)
        self.model = self._load_model(model_path)
        self.num_blocks = self._num_kv_blocks()
        self.kv_caches = self._allocate_kv_caches(self.num_blocks)

    # ------------------------------------------------------------------ set-up
    def _load_model(self, path: str) -> LlamaForCausalLM:
        with torch.device(self.device):
            model = LlamaForCausalLM(self.model_config)
        model.to(self.dtype)
        # The rope tables stay fp32, as in the reference implementation.
        model.model.rotary.float()
        if self.config.load_format == "dummy":
            init_dummy_weights(model, self.config.seed)
        else:
            with torch.no_grad():
                model.load_weights(iterate_safetensors(path))
        model.eval().requires_grad_(False)
        return model

    @property
    def block_bytes(self) -> int:
        c = self.model_config
        element = torch.empty((), dtype=self.dtype).element_size()
        return 2 * c.num_layers * self.block_size * c.num_kv_heads * c.head_dim * element

    def _num_kv_blocks(self) -> int:
        if self.config.num_kv_blocks is not None:
            return self.config.num_kv_blocks
        if self.device.type == "cuda":
            budget = self._profile_cuda_kv_budget()
        else:
            budget = self.config.kv_cache_memory_bytes or DEFAULT_CPU_KV_CACHE_BYTES
        num_blocks = budget // self.block_bytes
        if num_blocks < 1:
            raise ValueError(f"KV cache budget of {budget} bytes holds no block of {self.block_bytes} bytes")
        return num_blocks

    def _profile_cuda_kv_budget(self) -> int:
        """Run the largest step once with a throwaway cache; what is left of the allowed
        fraction of memory after its peak is the KV pool."""
        torch.cuda.empty_cache()
        torch.cuda.reset_peak_memory_stats()
        n = self.config.max_num_batched_tokens
        bs = self.block_size
        blocks = -(-n // bs)
        caches = self._allocate_kv_caches(blocks)
        meta = AttentionMetadata(
            slot_mapping=torch.arange(n, device=self.device),
            block_tables=torch.arange(blocks, dtype=torch.int32, device=self.device)[None],
            context_lens=torch.tensor([n], dtype=torch.int32, device=self.device),
            num_decodes=0,
            prefill_cu_seqlens_q=torch.tensor([0, n], dtype=torch.int32, device=self.device),
            kv_caches=caches,
            backend=self.backend,
        )
        ids = torch.zeros(n, dtype=torch.long, device=self.device)
        with torch.inference_mode():
            hidden = self.model(ids, torch.arange(n, device=self.device), meta)
            self.model.compute_logits(hidden[-min(n, self.config.max_num_seqs):])
        torch.cuda.synchronize()
        peak = torch.cuda.max_memory_allocated()
        del caches, hidden
        torch.cuda.empty_cache()
        free, total = torch.cuda.mem_get_info()
        used_elsewhere = total - free - torch.cuda.memory_allocated()
        return int(total * self.config.gpu_memory_utilization) - peak - used_elsewhere

    def _allocate_kv_caches(self, num_blocks: int) -> list[tuple[torch.Tensor, torch.Tensor]]:
        c = self.model_config
        shape = (num_blocks, self.block_size, c.num_kv_heads, c.head_dim)
        # Zeroed: masked-out slots still enter the matmuls, and garbage NaNs would poison them.
        return [
            (torch.zeros(shape, dtype=self.dtype, device=self.device),
             torch.zeros(shape, dtype=self.dtype, device=self.device))
            for _ in range(c.num_layers)
        ]

    # ------------------------------------------------------------------ a step
    def prepare(self, batch: ScheduledBatch) -> StepInputs:
        bs = self.block_size
        input_ids: list[int] = []
        positions: list[int] = []
        slots: list[int] = []
        context_lens: list[int] = []
        cu_seqlens = [0]
        logits_indices: list[int] = []
        sampling_rows: list[int] = []
        max_blocks = 0
        for i, (request, n) in enumerate(zip(batch.requests, batch.num_tokens)):
            start, end = request.num_computed_tokens, request.num_computed_tokens + n
            input_ids.extend(request.token_ids[start:end])
            positions.extend(range(start, end))
            blocks = request.block_ids
            slots.extend(blocks[p // bs] * bs + p % bs for p in range(start, end))
            context_lens.append(end)
            if i >= batch.num_decodes:
                cu_seqlens.append(cu_seqlens[-1] + n)
            if end == request.num_tokens:
                logits_indices.append(len(input_ids) - 1)
                sampling_rows.append(i)
            max_blocks = max(max_blocks, -(-end // bs))
        tables = [r.block_ids[:max_blocks] + [0] * (max_blocks - len(r.block_ids[:max_blocks])) for r in batch.requests]
        dev = self.device
        meta = AttentionMetadata(
            slot_mapping=torch.tensor(slots, dtype=torch.int64, device=dev),
            block_tables=torch.tensor(tables, dtype=torch.int32, device=dev),
            context_lens=torch.tensor(context_lens, dtype=torch.int32, device=dev),
            num_decodes=batch.num_decodes,
            prefill_cu_seqlens_q=torch.tensor(cu_seqlens, dtype=torch.int32, device=dev),
            kv_caches=self.kv_caches,
            backend=self.backend,
        )
        return StepInputs(
            input_ids=torch.tensor(input_ids, dtype=torch.long, device=dev),
            positions=torch.tensor(positions, dtype=torch.long, device=dev),
            meta=meta,
            logits_indices=torch.tensor(logits_indices, dtype=torch.long, device=dev),
            sampling_rows=sampling_rows,
        )

    @torch.inference_mode()
    def execute(self, batch: ScheduledBatch) -> tuple[torch.Tensor, list[int]]:
        """Run the step; returns fp32 logits for the sampling requests and their batch indices."""
        inputs = self.prepare(batch)
        hidden = self.model(inputs.input_ids, inputs.positions, inputs.meta)
        logits = self.model.compute_logits(hidden[inputs.logits_indices])
        return logits.float(), inputs.sampling_rows
