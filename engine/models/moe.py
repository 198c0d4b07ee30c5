"""A mixture of experts' MLP (Mixtral, Qwen2-MoE, Qwen3-MoE): a router ranks the experts for
each token, the token runs through its top-k, and their outputs are summed by the router's
probabilities. Qwen2-MoE adds a shared expert every token runs, gated by a sigmoid.
Experts may be held in fp8 (engine/fp8.py's layout: each expert's rows with their scales).

The experts' weights are stacked, `w13 [E, 2I, H]` (gate then up rows, as the dense MLP's
gate_up_proj) and `w2 [E, H, I]`, so one kernel call runs them all: `kernels.reference.fused_moe`
(a product per expert, reading the routing on the host) unless the model's `use_moe_kernels`
gave the Triton one (kernels.triton_moe, free of host syncs, so it runs inside CUDA graphs)."""

from __future__ import annotations

from types import ModuleType

import torch
import torch.nn.functional as F
from torch import nn

from engine.config import ModelConfig
from engine.fp8 import FP8
from kernels import reference


class SparseMoeBlock(nn.Module):
    def __init__(self, config: ModelConfig, mlp: type[nn.Module], where: str = "") -> None:
        """`mlp`: the model's dense MLP class, for the shared expert; `where`: this block's module
        path in the checkpoint (model.layers.0.mlp), which its quantization config may name."""
        super().__init__()
        moe = config.moe
        assert moe is not None
        self.top_k, self.renormalize = moe.top_k, moe.renormalize
        self.intermediate_size = moe.intermediate_size
        # The router: torch's product, not a packed Linear's (its logits decide discrete choices,
        # so they are computed as transformers computes them).
        self.gate = nn.Linear(config.hidden_size, moe.num_experts, bias=False)
        experts, hidden, inter = moe.num_experts, config.hidden_size, moe.intermediate_size
        scheme = config.quantization
        # fp8 experts (engine/fp8.py): each expert's rows with their scales, a group size per stack
        self.fp8_groups: dict[str, int] = {}
        self.w13_scale: nn.Parameter | None = None
        self.w2_scale: nn.Parameter | None = None
        projections = ("w1", "w3", "w2") if config.architecture.startswith("Mixtral") else \
            ("gate_proj", "up_proj", "down_proj")
        if scheme is not None and scheme.quantizes_all([config.checkpoint_names(f"{where}.experts.{e}.{p}")
                                                        for e in range(experts) for p in projections]):
            self.fp8_groups = {"w13": scheme.group(hidden), "w2": scheme.group(inter)}
            for name, rows, cols in (("w13", 2 * inter, hidden), ("w2", hidden, inter)):
                groups = -(-cols // self.fp8_groups[name])
                setattr(self, name, nn.Parameter(torch.empty(experts, rows, cols, dtype=FP8), requires_grad=False))
                setattr(self, f"{name}_scale", nn.Parameter(torch.empty(experts, rows, groups, dtype=torch.float32),
                                                            requires_grad=False))
        else:
            self.w13 = nn.Parameter(torch.empty(experts, 2 * inter, hidden))
            self.w2 = nn.Parameter(torch.empty(experts, hidden, inter))
        shared = moe.shared_expert_intermediate_size
        self.shared_expert = mlp(config, shared, f"{where}.shared_expert") if shared else None
        self.shared_expert_gate = nn.Linear(config.hidden_size, 1, bias=False) if shared else None
        self.kernels: ModuleType = reference  # a module with fused_moe

    def route(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """Each token's experts [T, K] and their weights [T, K] (fp32): the top-k of the
        router's softmax (in fp32), rescaled to sum to 1 where the model does."""
        probs = torch.softmax(self.gate(x).float(), dim=-1)
        weights, experts = torch.topk(probs, self.top_k, dim=-1)
        if self.renormalize:
            weights = weights / weights.sum(dim=-1, keepdim=True)
        return weights, experts

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        weights, experts = self.route(x)
        if self.fp8_groups:
            out = self.kernels.fused_moe(x, self.w13, self.w2, weights, experts,
                                         fp8_scales=(self.w13_scale, self.w2_scale),
                                         fp8_groups=(self.fp8_groups["w13"], self.fp8_groups["w2"]))
        else:
            out = self.kernels.fused_moe(x, self.w13, self.w2, weights, experts)
        if self.shared_expert is not None:
            out = out + F.sigmoid(self.shared_expert_gate(x)) * self.shared_expert(x)
        return out
