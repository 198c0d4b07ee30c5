"""A mixture of experts' MLP (Mixtral, Qwen2-MoE, Qwen3-MoE): a router ranks the experts for
each token, the token runs through its top-k, and their outputs are summed by the router's
probabilities. Qwen2-MoE adds a shared expert every token runs, gated by a sigmoid.

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
from kernels import reference


class SparseMoeBlock(nn.Module):
    def __init__(self, config: ModelConfig, mlp: type[nn.Module], where: str = "") -> None:
        """`mlp`: the model's dense MLP class, for the shared expert; `where`: this block's module
        path in the checkpoint (model.layers.0.mlp), which its quantization config may name."""
        super().__init__()
        moe = config.moe
        assert moe is not None
        scheme = config.quantization
        if scheme is not None and scheme.quantizes(f"{where}.experts"):
            raise ValueError("fp8 expert weights are not supported yet: a mixture of experts is served with its "
                             "experts at the model's dtype (an fp8 checkpoint whose quantization config leaves the "
                             "experts out serves; quantization='fp8' does not)")
        self.top_k, self.renormalize = moe.top_k, moe.renormalize
        self.intermediate_size = moe.intermediate_size
        # The router: torch's product, not a packed Linear's (its logits decide discrete choices,
        # so they are computed as transformers computes them).
        self.gate = nn.Linear(config.hidden_size, moe.num_experts, bias=False)
        self.w13 = nn.Parameter(torch.empty(moe.num_experts, 2 * moe.intermediate_size, config.hidden_size))
        self.w2 = nn.Parameter(torch.empty(moe.num_experts, config.hidden_size, moe.intermediate_size))
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
        out = self.kernels.fused_moe(x, self.w13, self.w2, weights, experts)
        if self.shared_expert is not None:
            out = out + F.sigmoid(self.shared_expert_gate(x)) * self.shared_expert(x)
        return out
