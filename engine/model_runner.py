"""Turns a ScheduledBatch into one flattened forward pass over the paged KV cache.

The model's RMSNorm/residual adds, rotary and SiLU * up run as fused kernels where the
backend has them (C with the CPU backend, Triton on CUDA). On CUDA with the Triton backend,
two more things change (the CPU path is the plain one below): steps replay CUDA graphs
(engine/cuda_graphs.py: pure decodes by batch size, steps with prefills by token count;
`cuda_graph_mode="decode"` keeps only the first, `enforce_eager` turns both off); and a step's
inputs reach the device in one packed copy (engine/transfer.py).
"""

from __future__ import annotations

import importlib
import logging
from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import Any

import numpy as np
import torch

import kernels
from kernels.reference import FP8_KV, indexable_kv
from engine.attention import AttentionMetadata
from engine.block_tables import BlockTables
from engine.config import EngineConfig, ModelConfig
from engine.cuda_graphs import (
    CudaGraphRunner,
    GraphKey,
    batch_buckets,
    pad_decode_inputs,
    pad_mixed_sequences,
    pad_tokens,
    token_buckets,
)
from engine.kv_offload import HostKVTier
from engine.lora import LoRARegistry, LoRASlots
from engine.models.llama import Linear, LlamaForCausalLM
from engine.speculative import SpeculativeConfig
from engine.transfer import to_device
from engine.weights import init_dummy_weights, iterate_safetensors
from scheduler import KVCacheGroups, KVTransfer, Request, ScheduledBatch

logger = logging.getLogger(__name__)

DEFAULT_CPU_KV_CACHE_BYTES = 2 << 30
# Set aside beyond the measured decode peak for the CUDA graphs' pool: allocator rounding and the
# cuBLAS workspace of the capture stream, which is allocated inside the pool.
CUDA_GRAPH_SLACK_BYTES = 128 << 20
# Left unplanned when the pool is bound by the card's free memory (little else is left then):
# the allocator's rounding of a real step's blocks, and memory CUDA takes outside torch's
# allocator (graph instantiation, library handles). Each KV tensor may also round up to one
# more 2 MiB segment (FREE_MEMORY_SEGMENT_BYTES apiece).
FREE_MEMORY_MARGIN_BYTES = 256 << 20
FREE_MEMORY_SEGMENT_BYTES = 2 << 20


@dataclass(slots=True)
class StepInputs:
    input_ids: torch.Tensor
    positions: torch.Tensor
    meta: AttentionMetadata
    logits_indices: torch.Tensor  # rows of the hidden states that sample, then those that pool
    sampling_rows: list[int]  # for each logits row, the index of its request in the batch
    pool_rows: list[int]  # for each pooled row after them, the index of its embedding request


DECODE_GROUPS = 4
MIN_DECODE_GROUP = 8


@dataclass(slots=True)
class StepLogits:
    logits: torch.Tensor  # [num sampling requests, vocab] fp32
    # for each logits row, the index of its request in the batch (a request with drafts has a
    # row for each position it computed, in order)
    sampling_rows: list[int]
    # batch index → the final hidden states [n, hidden] of every position it computed (prompt
    # logprobs): their logits, a vocabulary per position, are made a slice at a time.
    per_position: dict[int, torch.Tensor] = field(default_factory=dict)
    # Embeddings that reached their last prompt token: its final hidden states (before the
    # model's last norm) [len(pool_rows), hidden], and their batch indices.
    pooled: torch.Tensor | None = None
    pool_rows: list[int] = field(default_factory=list)


@dataclass(slots=True)
class HostInputs:
    """A step's inputs as host lists, before they go to the device."""

    input_ids: list[int] = field(default_factory=list)
    positions: list[int] = field(default_factory=list)
    slots: list[int] = field(default_factory=list)
    # A hybrid model's: the slots of its other KV groups, [groups - 1, tokens] (then slots and
    # tables go per group); None: one group.
    group_slots: np.ndarray | None = None
    context_lens: list[int] = field(default_factory=list)
    cu_seqlens: list[int] = field(default_factory=lambda: [0])
    logits_indices: list[int] = field(default_factory=list)  # the sampling rows', then the pooled rows'
    sampling_rows: list[int] = field(default_factory=list)
    pool_rows: list[int] = field(default_factory=list)
    tables: np.ndarray = field(default_factory=lambda: np.zeros((0, 0), dtype=np.int32))  # [sequences, width]
    # Input positions whose token is still on the device (async scheduling), and for each, its
    # row in the previous step's sampled ids (`previous_ids`, on the device).
    pending_positions: list[int] = field(default_factory=list)
    pending_rows: list[int] = field(default_factory=list)
    previous_ids: torch.Tensor | None = None
    # With LoRA adapters: each input token's adapter slot (-1: the base model).
    lora_slots: list[int] | None = None

    def on_device(self, device: torch.device) -> list[torch.Tensor]:
        """input_ids, positions, slots, tables, context_lens, cu_seqlens, logits_indices (and
        with LoRA, lora_slots), in one copy; the pending input ids are then taken from the
        previous step's sampled ids."""
        lora = [] if self.lora_slots is None else [torch.tensor(self.lora_slots, dtype=torch.long)]
        pending = [torch.tensor(self.pending_positions, dtype=torch.long),
                   torch.tensor(self.pending_rows, dtype=torch.long)] if self.pending_positions else []
        tensors = to_device([
            torch.tensor(self.input_ids, dtype=torch.long),
            torch.tensor(self.positions, dtype=torch.long),
            torch.tensor(self.slots, dtype=torch.int64) if self.group_slots is None else
            torch.cat([torch.tensor(self.slots, dtype=torch.int64)[None], torch.from_numpy(self.group_slots)]),
            torch.from_numpy(self.tables),
            torch.tensor(self.context_lens, dtype=torch.int32),
            torch.tensor(self.cu_seqlens, dtype=torch.int32),
            torch.tensor(self.logits_indices, dtype=torch.long),
            *lora,
            *pending,
        ], device)
        if pending:
            positions, rows = tensors[-2:]
            tensors[0][positions] = self.previous_ids[rows]
        return tensors[:7 + len(lora)]

    def pad_group_slots(self) -> None:
        """The other groups' slots padded as `slots` was (graph padding: slot -1)."""
        if self.group_slots is not None:
            pad = len(self.slots) - self.group_slots.shape[1]
            self.group_slots = np.pad(self.group_slots, ((0, 0), (0, pad)), constant_values=-1)


@dataclass(slots=True)
class PreviousTokens:
    """The ids the step before sampled, still on the device; rows: each sampling request's row."""

    token_ids: torch.Tensor
    rows: dict[Request, int]


def kv_cache_groups(model: ModelConfig, max_model_len: int, hybrid: bool) -> KVCacheGroups:
    """How the model's layers share the KV pool (scheduler/kv_cache_groups.py): a window that
    covers every sequence served is none."""
    windows = [w if w < max_model_len else 0 for w in map(model.window, range(model.num_layers))]
    return KVCacheGroups.of(windows, hybrid=hybrid)


def kv_block_bytes(model: ModelConfig, groups: KVCacheGroups, block_size: int, element_size: int) -> int:
    """A KV block's bytes: keys and values of block_size tokens in a group's layers."""
    return 2 * groups.group_size * block_size * model.num_kv_heads * model.head_dim * element_size


MEMINFO = "/proc/meminfo"
# A container's memory limit, cgroup v2's then v1's: (limit, usage, stats) files, and the stat of
# reclaimable page cache (what the kernel drops before it kills: kubelet's working set leaves it out).
CGROUP_MEMORY = (("/sys/fs/cgroup/memory.max", "/sys/fs/cgroup/memory.current", "/sys/fs/cgroup/memory.stat",
                  "inactive_file"),
                 ("/sys/fs/cgroup/memory/memory.limit_in_bytes", "/sys/fs/cgroup/memory/memory.usage_in_bytes",
                  "/sys/fs/cgroup/memory/memory.stat", "total_inactive_file"))


def available_host_memory() -> int | None:
    """Bytes of host memory available to new allocations: Linux's MemAvailable, or less where
    the process's cgroup (a container's memory limit) leaves less; None where neither is known."""
    found = [n for n in (_read_stat(MEMINFO, "MemAvailable:", 1024), _cgroup_headroom()) if n is not None]
    return min(found) if found else None


def _cgroup_headroom() -> int | None:
    """The cgroup's limit less its working set (usage less reclaimable page cache); None without
    a limit."""
    for limit_path, usage_path, stat_path, inactive in CGROUP_MEMORY:
        try:
            with open(limit_path) as f:
                limit = f.read().strip()
            with open(usage_path) as f:
                usage = int(f.read())
        except (OSError, ValueError):
            continue
        if limit == "max" or not limit.isdigit() or int(limit) >= 1 << 60:  # v1 writes "no limit" as ~2**63
            return None
        return max(0, int(limit) - usage + (_read_stat(stat_path, inactive) or 0))
    return None


def _read_stat(path: str, key: str, unit: int = 1) -> int | None:
    """The number after `key` on its line of a stats file, times `unit`; None if absent."""
    try:
        with open(path) as f:
            for line in f:
                name, _, value = line.partition(" ")
                if name == key:
                    return int(value.split()[0]) * unit
    except (OSError, ValueError):
        pass
    return None


def is_triton(backend) -> bool:
    return backend.__name__ == kernels.BACKENDS["triton"]


@dataclass(frozen=True, slots=True)
class CudaMemory:
    """One reading of the card's memory: free and total (all processes), and this process's
    live tensors."""

    free: int
    total: int
    allocated: int

    @staticmethod
    def read(device: torch.device) -> "CudaMemory":
        free, total = torch.cuda.mem_get_info(device)
        return CudaMemory(free, total, torch.cuda.memory_allocated(device))


class ModelRunner:
    def __init__(self, model_path: str, model_config: ModelConfig, config: EngineConfig,
                 loras: LoRARegistry | None = None) -> None:
        """`loras`: the adapters requests may run with (LoRA slots on the device, as many as
        config.max_loras); None: the base model alone."""
        self.config = config
        self.model_config = model_config
        self.device = config.resolve_device()
        self.dtype = config.resolve_dtype(self.device)
        self.kv_cache_dtype = config.resolve_kv_cache_dtype(self.dtype)
        self.block_size = config.block_size
        self.backend = kernels.attention_backend(self.device, model_config.head_dim)
        self.max_model_len = config.resolve_max_model_len(model_config)
        self.cuda_graph_mode = config.resolve_cuda_graph_mode()
        # What the card held before this engine took anything: the memory profile charges this
        # engine for its own growth only, so another engine or process beside it is not counted.
        self.cuda_baseline: CudaMemory | None = None
        if self.device.type == "cuda":
            torch.cuda.empty_cache()
            self.cuda_baseline = CudaMemory.read(self.device)
        self.model = self._load_model(model_path)
        on_gpu_triton = self.device.type == "cuda" and is_triton(self.backend)
        if on_gpu_triton:  # fused RMSNorm+residual and in-place rotary
            self.model.use_norm_rope_kernels(importlib.import_module("kernels.triton_norm_rope"))
        elif self.backend.__name__ == kernels.BACKENDS["cpu"]:  # the same in C, and the projections
            self.model.use_norm_rope_kernels(self.backend)
            self.model.use_linear_kernels(self.backend)
        if is_triton(self.backend) and model_config.quantization is not None:
            # The fp8 projections' product tile by tile (the reference dequantizes whole weights)
            self.model.use_fp8_kernels(importlib.import_module("kernels.triton_fp8"))
        if is_triton(self.backend) and model_config.moe is not None:
            # The graph-safe experts (the reference reads the routing on the host); off CUDA in
            # Triton's interpreter, as the attention kernels then run.
            self.model.use_moe_kernels(importlib.import_module("kernels.triton_moe"))
        self.lora: LoRASlots | None = None
        if loras is not None:  # before the memory profile, which then counts the slots and their products
            self.lora = LoRASlots(self.model, loras, config.max_loras,
                                  max(config.max_num_batched_tokens, config.max_num_seqs), self.device, self.dtype)
        # CUDA graphs need host-sync-free kernels: CUDA with the Triton backend only; and an LM
        # head (a model without one computes prompts only, prefill-bound).
        graphs = on_gpu_triton and not config.enforce_eager and self.model.has_lm_head
        self.graph_buckets = batch_buckets(config.max_num_seqs) if graphs else []
        self.graph_token_buckets = (token_buckets(config.max_num_batched_tokens)
                                    if graphs and self.cuda_graph_mode == "full" else [])
        self.graph_table_width = -(-self.max_model_len // self.block_size)
        self.kv_groups = kv_cache_groups(model_config, self.max_model_len, not config.disable_hybrid_kv_cache_manager)
        places = self.kv_groups.layer_places()
        self.layer_groups = tuple(g for g, _ in places) if self.kv_groups.num_groups > 1 else ()
        self.block_tables = BlockTables(self.graph_table_width, rows=config.max_num_seqs,
                                        num_groups=self.kv_groups.num_groups)
        self.memory_profile: dict[str, Any] = {}
        self.num_host_blocks = self._num_host_kv_blocks()
        self.num_blocks = self._num_kv_blocks()
        self._check_host_memory()
        self.kv_caches = self._allocate_kv_caches(self.num_blocks)
        self.host_kv: HostKVTier | None = None  # the prefix cache's host tier
        if self.num_host_blocks:
            self.host_kv = HostKVTier(self.num_host_blocks, self._distinct_kv_caches())
        self.cuda_graphs: CudaGraphRunner | None = None
        if self.graph_buckets:
            self._capture_cuda_graphs()

    def _graph_runner(self, kv_caches: list[tuple[torch.Tensor, torch.Tensor]]) -> CudaGraphRunner:
        return CudaGraphRunner(self.model, self.model.compute_logits, kv_caches, self.backend, self.graph_buckets,
                               self.graph_token_buckets, self.config.max_num_seqs, self.graph_table_width, self.device,
                               self.layer_groups)

    def _capture_cuda_graphs(self) -> None:
        graphs = self._graph_runner(self.kv_caches)
        try:
            graphs.capture()
        except Exception as e:  # noqa: BLE001 - serve eagerly rather than not at all, and say so
            logger.error("CUDA graph capture failed, running every step eagerly: %s", e)
            self.memory_profile["cuda_graphs_error"] = f"{type(e).__name__}: {e}"[:500]
            del graphs
            if torch.cuda.is_available():
                torch.cuda.synchronize(self.device)
                torch.cuda.empty_cache()
            return
        self.cuda_graphs = graphs
        self.memory_profile["cuda_graphs_actual"] = graphs.memory_bytes
        estimate = self.memory_profile.get("cuda_graphs_reserved")
        if estimate is not None and graphs.memory_bytes > estimate:
            logger.warning("CUDA graphs took %.0f MiB, more than the %.0f MiB set aside for them",
                           graphs.memory_bytes / 2**20, estimate / 2**20)

    # ------------------------------------------------------------------ set-up
    def _load_model(self, path: str) -> LlamaForCausalLM:
        # On a GPU, parameters are created in the target dtype (an 8B model built in fp32 first
        # would take 32 GB); every one is overwritten below, and the rope tables are computed in
        # explicit fp32 either way.
        default = torch.get_default_dtype()
        if self.device.type == "cuda":
            torch.set_default_dtype(self.dtype)
        try:
            with torch.device(self.device):
                model = LlamaForCausalLM(self.model_config, self.max_model_len)
        finally:
            torch.set_default_dtype(default)
        model.cast(self.dtype)
        # The rope tables stay fp32, as in the reference implementation.
        model.restore_fp32()
        if self.config.load_format == "dummy":
            init_dummy_weights(model, self.config.seed)
        else:
            with torch.no_grad():
                model.load_weights(iterate_safetensors(path), read_kv_scales=self.kv_cache_dtype == FP8_KV)
        model.eval().requires_grad_(False)
        return model

    @property
    def weight_bytes(self) -> int:
        """The memory the model's weights take: its parameters, and the copies kernels packed."""
        packed = [m.packed for m in self.model.modules() if isinstance(m, Linear) and m.packed is not None]
        if self.model.head_packed is not None:
            packed.append(self.model.head_packed)
        return sum(t.nbytes for t in [*self.model.parameters(), *packed])

    @property
    def block_bytes(self) -> int:
        return kv_block_bytes(self.model_config, self.kv_groups, self.block_size, self.kv_cache_dtype.itemsize)

    def _num_kv_blocks(self) -> int:
        if self.config.num_kv_blocks is not None:
            return self.config.num_kv_blocks
        if self.device.type == "cuda":
            budget = self._profile_cuda_kv_budget() - HostKVTier.staging_bytes(self.num_host_blocks, self.block_bytes)
        else:
            budget = self.config.kv_cache_memory_bytes or DEFAULT_CPU_KV_CACHE_BYTES
        num_blocks = budget // self.block_bytes
        if num_blocks < 1:
            hint = ""
            if self.memory_profile.get("bound") == "free memory":
                hint = (f" (only {self.memory_profile['free']} bytes are free on the GPU: free memory, or lower "
                        "max_num_batched_tokens / max_num_seqs)")
            elif self.device.type == "cuda":
                hint = " (raise gpu_memory_utilization, or lower max_num_batched_tokens / max_num_seqs)"
            raise ValueError(f"KV cache budget of {budget} bytes holds no block of {self.block_bytes} bytes{hint}")
        return num_blocks

    def _num_host_kv_blocks(self) -> int:
        size = self.config.kv_offloading_size
        if not size:
            return 0
        num_blocks = int(size * 2**30) // self.block_bytes
        if num_blocks < 1:
            raise ValueError(f"kv_offloading_size of {size} GiB holds no KV block of {self.block_bytes} bytes")
        return num_blocks

    def _check_host_memory(self) -> None:
        """The host tier (and on the CPU, the KV pool, host memory too) must fit what the host
        has free: pinned, a tier past it fails to allocate; unpinned, the kernel would kill the
        worker once it filled, long after start-up."""
        tier = self.num_host_blocks * self.block_bytes
        available = available_host_memory()
        if not tier or available is None:
            return
        pool = self.num_blocks * self.block_bytes if self.device.type == "cpu" else 0
        if tier + pool > available:
            beside = f" beside the {pool / 2**30:.1f} GiB KV pool" if pool else ""
            raise ValueError(f"kv_offloading_size of {self.config.kv_offloading_size} GiB{beside} exceeds the host's "
                             f"available memory ({available / 2**30:.1f} GiB)")

    def _profile_cuda_kv_budget(self) -> int:
        """The KV pool's bytes, as vLLM sizes it: gpu_memory_utilization × total memory is this
        engine's share of the card, and the pool gets what is left of it after the weights, the
        peak of the largest step (forward, logits and sampling), the CUDA graphs (their pool
        holds every bucket's logits for good) and the non-tensor memory this engine added
        (library workspaces, allocator slack) — measured by running those steps once with
        a throwaway cache. Memory that was taken before the engine started (another engine in
        this process, another process) is not charged, but the pool must fit in what is free,
        with a margin. The CUDA context is made before the baseline is read, so it is not
        charged either (as in vLLM)."""
        from engine.sampler import Sampler, SamplingRow
        from engine.sampling_params import SamplingParams

        util = self.config.gpu_memory_utilization
        if not 0.0 < util <= 1.0:
            raise ValueError(f"gpu_memory_utilization must be in (0, 1], got {util}")
        dev = self.device
        baseline = self.cuda_baseline or CudaMemory.read(dev)
        torch.cuda.synchronize(dev)
        torch.cuda.empty_cache()
        loaded = CudaMemory.read(dev)
        torch.cuda.reset_peak_memory_stats(dev)
        n = self.config.max_num_batched_tokens
        bs = self.block_size
        blocks = -(-n // bs)
        caches = self._allocate_kv_caches(blocks)
        cache_bytes = blocks * self.block_bytes
        groups = (self.kv_groups.num_groups,) if self.layer_groups else ()  # every group the same blocks
        with torch.inference_mode():
            meta = AttentionMetadata(
                slot_mapping=torch.arange(n, device=dev).expand(*groups, n),
                block_tables=torch.arange(blocks, dtype=torch.int32, device=dev).expand(*groups, 1, blocks),
                context_lens=torch.tensor([n], dtype=torch.int32, device=dev),
                num_decodes=0,
                prefill_cu_seqlens_q=torch.tensor([0, n], dtype=torch.int32, device=dev),
                kv_caches=caches,
                backend=self.backend,
                layer_groups=self.layer_groups,
            )
            ids = torch.zeros(n, dtype=torch.long, device=dev)
            positions = torch.arange(n, device=dev) % self.max_model_len
            hidden = self.model(ids, positions, meta)
            # A step samples a row per sequence, and with speculative decoding one per draft too.
            speculative = SpeculativeConfig.from_value(self.config.speculative_config)
            rows = min(n, self.config.max_num_seqs * (1 + (speculative.num_speculative_tokens if speculative else 0)))
            if self.model.has_lm_head:
                logits = self.model.compute_logits(hidden[-rows:]).float()
                del hidden
                # Sampling at its most memory-hungry: a full-vocabulary sort (top-p) and logprobs.
                worst = SamplingParams(temperature=0.7, top_p=0.9, logprobs=5)
                Sampler()(logits, [SamplingRow(worst, [], 0, None, []) for _ in range(rows)])
                del logits
            else:  # embeddings: each row's last hidden states, pooled
                del hidden
            torch.cuda.synchronize(dev)
            step_peak = torch.cuda.max_memory_allocated(dev) - loaded.allocated - cache_bytes
            graph_reserve = 0
            if self.graph_buckets:
                graph_reserve = self._cuda_graph_reserve(caches)
        del caches, meta
        torch.cuda.empty_cache()
        now = CudaMemory.read(dev)
        weights = loaded.allocated - baseline.allocated
        # Bytes this engine took from the card that are not live tensors of its own.
        non_tensor = max(0, (baseline.free - now.free) - (now.allocated - baseline.allocated))
        allowed = int(now.total * util)
        share = allowed - weights - step_peak - non_tensor - graph_reserve
        margin = FREE_MEMORY_MARGIN_BYTES + 2 * self.kv_groups.group_size * FREE_MEMORY_SEGMENT_BYTES
        fits = now.free - step_peak - graph_reserve - margin
        budget = min(share, fits)
        self.memory_profile.update(total=now.total, allowed=allowed, weights=weights, step_peak=step_peak,
                                   non_tensor=non_tensor, free=now.free, cuda_graphs_reserved=graph_reserve,
                                   free_margin=margin, kv_cache_budget=budget,
                                   bound="free memory" if fits < share else "share")
        logger.info("GPU memory: %.2f GiB allowed (%.0f%% of %.2f GiB); weights %.2f GiB, step peak %.2f GiB, "
                    "non-tensor %.2f GiB, CUDA graphs %.2f GiB → KV cache %.2f GiB (%.2f GiB free)",
                    allowed / 2**30, util * 100, now.total / 2**30, weights / 2**30, step_peak / 2**30,
                    non_tensor / 2**30, graph_reserve / 2**30, budget / 2**30, now.free / 2**30)
        return budget

    def _cuda_graph_reserve(self, caches: list[tuple[torch.Tensor, torch.Tensor]]) -> int:
        """Bytes the captured graphs will hold: the peak of the largest decode and mixed graphs'
        forwards (measured eagerly here on the static inputs; every capture's intermediates reuse
        the largest one's, they share one pool), plus every other graph's output, plus the
        static inputs, plus allocator rounding."""
        dev = self.device
        graphs = self._graph_runner(caches)
        largest: list[GraphKey] = [("decode", graphs.buckets[-1])]
        if graphs.token_buckets:
            largest.append(("mixed", graphs.token_buckets[-1]))
        peak, row_bytes = 0, {}
        for key in largest:
            torch.cuda.synchronize(dev)
            before = torch.cuda.memory_allocated(dev)
            torch.cuda.reset_peak_memory_stats(dev)
            out = graphs.run(key)
            torch.cuda.synchronize(dev)
            peak = max(peak, torch.cuda.max_memory_allocated(dev) - before)
            row_bytes[key[0]] = out.shape[1] * out.element_size()
            del out
        others = sum(graphs.buckets[:-1]) * row_bytes["decode"]
        if graphs.token_buckets:
            others += (len(graphs.token_buckets) - 1) * graphs.max_num_seqs * row_bytes["mixed"]
        rounding = 2 * (2 << 20) * len(graphs.keys)
        return peak + others + graphs.static_bytes + rounding + CUDA_GRAPH_SLACK_BYTES

    def _allocate_kv_caches(self, num_blocks: int) -> list[tuple[torch.Tensor, torch.Tensor]]:
        """Each layer's (k_cache, v_cache): a hybrid model's layers share the pool's tensors, the
        i-th layer of each group the i-th pair."""
        c = self.model_config
        shape = (num_blocks, self.block_size, c.num_kv_heads, c.head_dim)
        # Zeroed: masked-out slots still enter the matmuls, and garbage NaNs would poison them.
        tensors = [
            (torch.zeros(shape, dtype=self.kv_cache_dtype, device=self.device),
             torch.zeros(shape, dtype=self.kv_cache_dtype, device=self.device))
            for _ in range(self.kv_groups.group_size)
        ]
        return [tensors[slot] for _, slot in self.kv_groups.layer_places()]

    # ------------------------------------------------------------------ a step
    def host_inputs(self, batch: ScheduledBatch, previous: PreviousTokens | None = None) -> HostInputs:
        bs = self.block_size
        h = HostInputs()
        max_blocks = 0
        pooled: list[int] = []  # the last positions of embeddings that pool this step
        lora_slot: dict[int, int] = {}
        if self.lora is not None:
            lora_slot = self.lora.slots_for({r.lora_id for r in batch.requests if r.lora_id})
            lora_slot[0] = -1
            h.lora_slots = []
        for i, (request, n) in enumerate(zip(batch.requests, batch.num_tokens)):
            if h.lora_slots is not None:
                h.lora_slots.extend([lora_slot[request.lora_id]] * n)
            start, end = request.num_computed_tokens, request.num_computed_tokens + n
            blocks = request.block_ids
            if n == 1:  # a decode: most rows of most steps, without the generic path's ranges
                if start < len(request.token_ids):
                    h.input_ids.append(request.token_ids[start])
                else:  # its token was sampled by the step still in flight
                    h.pending_positions.append(len(h.input_ids))
                    h.pending_rows.append(previous.rows[request])
                    h.previous_ids = previous.token_ids
                    h.input_ids.append(0)
                h.positions.append(start)
                h.slots.append(blocks[start // bs] * bs + start % bs)
            else:
                drafts = batch.spec_token_ids.get(request) if batch.spec_token_ids else None
                if drafts:  # the last token, then its drafts: each position's logits verify the next
                    h.input_ids.extend(request.token_ids[start:])
                    h.input_ids.extend(drafts)
                    h.logits_indices.extend(range(len(h.input_ids) - n, len(h.input_ids)))
                    h.sampling_rows.extend([i] * n)
                elif end > len(request.token_ids):
                    raise RuntimeError(f"{request.request_id}: a chunk of {n} tokens reaches a pending token")
                else:
                    h.input_ids.extend(request.token_ids[start:end])
                h.positions.extend(range(start, end))
                h.slots.extend(blocks[p // bs] * bs + p % bs for p in range(start, end))
            h.context_lens.append(end)
            if i >= batch.num_decodes:
                h.cu_seqlens.append(h.cu_seqlens[-1] + n)
            if end == request.num_tokens:
                if request.pooling:
                    pooled.append(len(h.input_ids) - 1)
                    h.pool_rows.append(i)
                else:
                    h.logits_indices.append(len(h.input_ids) - 1)
                    h.sampling_rows.append(i)
            max_blocks = max(max_blocks, -(-end // bs))
        h.logits_indices += pooled
        h.tables = self.block_tables.gather(batch.requests, max_blocks)
        if self.layer_groups:  # the other groups' slots, read off their tables at once
            rows = np.repeat(np.arange(len(batch.requests)), batch.num_tokens)
            positions = np.asarray(h.positions)
            h.group_slots = h.tables[1:, rows, positions // bs].astype(np.int64) * bs + positions % bs
        return h

    def copy_blocks(self, pairs: list[tuple[int, int]]) -> None:
        """Copy whole KV blocks, (source, copy) pairs, in every KV tensor: a beam search's forks get
        their parents' partial last blocks, in stream order before the next step writes them."""
        if not pairs:
            return
        source, copy = (torch.tensor(ids, dtype=torch.long, device=self.device) for ids in zip(*pairs))
        for pair in self._distinct_kv_caches():
            for cache in map(indexable_kv, pair):
                cache[copy] = cache[source]

    def _distinct_kv_caches(self) -> list[tuple[torch.Tensor, torch.Tensor]]:
        """The pool's (keys, values) tensors, once each: a hybrid model's layers share them."""
        return list({id(pair): pair for pair in self.kv_caches}.values())

    def transfer_kv(self, transfers: Sequence[KVTransfer]) -> None:
        """Run the prefix cache's host-tier transfers (BlockManager.take_transfers), in stream
        order before whatever runs next."""
        if transfers:
            with torch.inference_mode():
                self.host_kv.run(transfers)

    def release(self, request: Request) -> None:
        """The request finished: what the runner kept for it across steps (its block-table row)
        goes back."""
        self.block_tables.release(request)

    def _on_device(self, h: HostInputs) -> list[torch.Tensor]:
        """h.on_device; with LoRA, each token's adapter slot goes where the model reads it."""
        tensors = h.on_device(self.device)
        if self.lora is not None:
            state = self.lora.state
            state.num_slots = max(h.lora_slots, default=-1) + 1  # eager steps: up to the last slot in use
            state.active = state.num_slots > 0
            state.token_slots[:len(h.lora_slots)].copy_(tensors.pop())
        return tensors

    def prepare(self, batch: ScheduledBatch, previous: PreviousTokens | None = None) -> StepInputs:
        h = self.host_inputs(batch, previous)
        ids, positions, slots, tables, context_lens, cu_seqlens, logits_indices = self._on_device(h)
        meta = AttentionMetadata(
            slot_mapping=slots,
            block_tables=tables,
            context_lens=context_lens,
            num_decodes=batch.num_decodes,
            prefill_cu_seqlens_q=cu_seqlens,
            kv_caches=self.kv_caches,
            backend=self.backend,
            decode_groups=self._decode_groups(batch.num_decodes),
            layer_groups=self.layer_groups,
        )
        return StepInputs(input_ids=ids, positions=positions, meta=meta,
                          logits_indices=logits_indices, sampling_rows=h.sampling_rows, pool_rows=h.pool_rows)

    def _decode_groups(self, num_decodes: int) -> tuple[int, ...]:
        """For the padded reference kernels: up to DECODE_GROUPS groups of at least
        MIN_DECODE_GROUP decodes (the scheduler sorts them by context length), so each group
        gathers and attends only up to its own longest context. The C and Triton kernels don't pad."""
        if self.backend is not kernels.reference or num_decodes < 2 * MIN_DECODE_GROUP:
            return ()
        groups = min(DECODE_GROUPS, num_decodes // MIN_DECODE_GROUP)
        return tuple(num_decodes * (g + 1) // groups for g in range(groups))

    def graph_key(self, batch: ScheduledBatch, pooling: bool = False) -> GraphKey | None:
        """The CUDA graph that runs this step, or None (eager): a decode graph for pure decodes,
        else a mixed one for the step's token count (decodes verifying drafts are chunks there,
        their logits rows as many as the graph keeps: max_num_seqs; an embedding's one-token
        prompt too, whose hidden states the decode graph does not keep); every context within
        the captured width. `pooling`: the batch may hold embeddings."""
        if self.cuda_graphs is None or not batch.requests:
            return None
        if max(r.num_computed_tokens + n for r, n in zip(batch.requests, batch.num_tokens)) > self.max_model_len:
            return None
        if batch.num_decodes == len(batch.requests) and not (pooling and any(r.pooling for r in batch.requests)):
            bucket = self.cuda_graphs.bucket(len(batch.requests))
            if bucket is not None:
                return "decode", bucket
        bucket = self.cuda_graphs.token_bucket(sum(batch.num_tokens))
        max_rows = len(batch.requests) + sum(map(len, batch.spec_token_ids.values()))
        if bucket is None or max_rows > self.cuda_graphs.max_num_seqs:
            return None
        return "mixed", bucket

    def _execute_graph(self, batch: ScheduledBatch, key: GraphKey, previous: PreviousTokens | None) -> StepLogits:
        h = self.host_inputs(batch, previous)
        kind, bucket = key
        n = len(batch.requests)
        num_logits = len(h.sampling_rows)
        if kind == "decode":
            pad_decode_inputs(n, bucket, h.input_ids, h.positions, h.slots, h.context_lens)
            h.pad_group_slots()
            self._pad_lora_slots(h)
            ids, positions, slots, tables, context_lens, _, logits_indices = self._on_device(h)
            out = self.cuda_graphs.replay(ids, positions, slots, context_lens, tables)
            rows = out[:num_logits] if h.logits_indices == list(range(num_logits)) else out[logits_indices]
            # A copy: `out` is the graph's static memory, which the next replay overwrites.
            return StepLogits(rows.to(torch.float32, copy=True), h.sampling_rows)
        # cu_seqlens spans every sequence, the decodes (first) as one-token ones; the graphed
        # decode kernel takes those, split as its counts say, and the prefill kernel the rest.
        nd = batch.num_decodes
        splits = 1
        if self.cuda_graphs.graphed_decodes:
            splits = self.backend.graphed_decode_splits(nd, self.model_config.num_kv_heads,
                                                        max(h.context_lens[:nd], default=0), self.device)
        h.cu_seqlens = list(range(nd + 1)) + [nd + c for c in h.cu_seqlens[1:]]
        pad_tokens(bucket - len(h.input_ids), h.input_ids, h.positions, h.slots)
        h.pad_group_slots()
        pad_mixed_sequences(self.cuda_graphs.max_num_seqs, h.cu_seqlens, h.context_lens, h.logits_indices)
        h.cu_seqlens += [nd, splits]  # the decode counts ride in cu_seqlens' copy
        self._pad_lora_slots(h)
        ids, positions, slots, tables, context_lens, cu_counts, logits_indices = self._on_device(h)
        hidden = self.cuda_graphs.replay_mixed(ids, positions, slots, context_lens, tables, cu_counts[:-2],
                                               logits_indices, cu_counts[-2:])
        pooled = hidden[num_logits:num_logits + len(h.pool_rows)].clone() if h.pool_rows else None
        return StepLogits(self._logits(hidden[:num_logits]), h.sampling_rows, pooled=pooled, pool_rows=h.pool_rows)

    def _logits(self, hidden: torch.Tensor) -> torch.Tensor:
        """fp32 logits of these final hidden states; none for none (a model without an LM head
        serves embeddings alone)."""
        if not hidden.shape[0]:
            return hidden.new_empty((0, self.model_config.vocab_size), dtype=torch.float32)
        return self.model.compute_logits(hidden).float()

    @staticmethod
    def _pad_lora_slots(h: HostInputs) -> None:
        """A graph's padding tokens run with no adapter (the graph computes every slot's product
        regardless: it was captured with them)."""
        if h.lora_slots is not None:
            h.lora_slots.extend([-1] * (len(h.input_ids) - len(h.lora_slots)))

    @torch.inference_mode()
    def execute(self, batch: ScheduledBatch, all_logits_rows: Sequence[int] = (),
                previous: PreviousTokens | None = None, pooling: bool = False) -> StepLogits:
        """Run the step: fp32 logits for the sampling requests, for the requests at batch
        indices `all_logits_rows` (prompt logprobs, mean and first-token pooling) the hidden
        states of every position computed, and for embeddings at their last prompt token, its
        hidden states (`pooling`: the batch may hold embeddings). A decode whose token is not in
        the host's token_ids yet takes it from `previous`."""
        key = None if all_logits_rows else self.graph_key(batch, pooling)
        if key is not None:
            return self._execute_graph(batch, key, previous)
        inputs = self.prepare(batch, previous)
        hidden = self.model(inputs.input_ids, inputs.positions, inputs.meta)
        rows = hidden[inputs.logits_indices]
        num_logits = len(inputs.sampling_rows)
        logits = self._logits(rows[:num_logits])
        pooled = rows[num_logits:] if inputs.pool_rows else None
        per_position: dict[int, torch.Tensor] = {}
        if all_logits_rows:
            starts = [0]
            for n in batch.num_tokens:
                starts.append(starts[-1] + n)
            for i in all_logits_rows:
                per_position[i] = hidden[starts[i]:starts[i + 1]]
        return StepLogits(logits, inputs.sampling_rows, per_position, pooled, inputs.pool_rows)
