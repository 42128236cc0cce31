"""Mixture-of-experts layer: top-k routing and the experts' gated MLPs.

Every expert is a SiLU gated MLP. Their weights live stacked, one tensor per
projection, in the layout HF transformers 5 uses for fused experts:

    gate_up_proj [num_experts, 2 * intermediate, hidden]  (gate rows, then up rows)
    down_proj    [num_experts, hidden, intermediate]

On CUDA the experts run as the fused Triton grouped GEMMs of ``fused_moe``; on
the CPU as a per-expert loop in PyTorch, which is also the reference the kernel
is checked against.

Under tensor parallelism every rank holds every expert, each with a slice of its
intermediate dimension (gate and up rows, down columns), and returns a partial sum
that the caller all-reduces (once, with the shared expert's).
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import nn

from kvloom.interfaces.parallel import SingleRank, TensorParallelGroup
from kvloom.plugins.models.layers.parallel import split_part
from kvloom.plugins.models.layers.weights import ShardSpec, set_shard_spec


@dataclass(frozen=True, slots=True)
class Routing:
    """Which experts each token goes to, and with what weight.

    Attributes:
        weights: [num_tokens, top_k] routing weights in the activations' dtype.
        expert_ids: [num_tokens, top_k] expert indices (int64).
    """

    weights: torch.Tensor
    expert_ids: torch.Tensor


def route_top_k(router_logits: torch.Tensor, top_k: int, renormalize: bool) -> Routing:
    """Softmax over all experts in float32, keep the top k, optionally rescale them to sum
    to one (Qwen2-MoE's ``norm_topk_prob``); weights come back in the logits' dtype."""
    probabilities = torch.softmax(router_logits, dim=-1, dtype=torch.float32)
    weights, expert_ids = torch.topk(probabilities, top_k, dim=-1)
    if renormalize:
        weights = weights / weights.sum(dim=-1, keepdim=True)
    return Routing(weights.to(router_logits.dtype), expert_ids)


def experts_reference(hidden_states: torch.Tensor, gate_up_proj: torch.Tensor,
                      down_proj: torch.Tensor, routing: Routing) -> torch.Tensor:
    """The experts one at a time, in plain PyTorch: sum over a token's experts of
    weight * down(silu(gate(x)) * up(x)). Experts run in ascending order, each adding
    into the output, as HF transformers' eager path does."""
    output = torch.zeros_like(hidden_states)
    top_k = routing.expert_ids.shape[1]
    flat_experts = routing.expert_ids.flatten()
    flat_weights = routing.weights.flatten()
    for expert in flat_experts.unique().tolist():
        rows = (flat_experts == expert).nonzero().squeeze(1)
        tokens = rows // top_k
        gate, up = F.linear(hidden_states[tokens], gate_up_proj[expert]).chunk(2, dim=-1)
        expert_out = F.linear(F.silu(gate) * up, down_proj[expert])
        output.index_add_(0, tokens, expert_out * flat_weights[rows, None])
    return output


class FusedExperts(nn.Module):
    """The stacked weights of ``num_experts`` SiLU gated MLPs and their forward pass.

    With a ``parallel`` group of several ranks the weights are this rank's slice of
    each expert's intermediate dimension and ``forward`` returns a partial sum.
    """

    # The Triton kernel on CPU tensors, for tests under TRITON_INTERPRET=1.
    triton_on_cpu = False

    def __init__(self, num_experts: int, hidden_size: int, intermediate_size: int,
                 dtype: torch.dtype, parallel: TensorParallelGroup | None = None):
        super().__init__()
        parallel = parallel or SingleRank()
        what = "moe_intermediate_size"
        gate = split_part("gate_proj", intermediate_size, parallel, what)
        up = split_part("up_proj", intermediate_size, parallel, what, start=gate.size)
        local = gate.size
        self.gate_up_proj = nn.Parameter(
            torch.empty(num_experts, 2 * local, hidden_size, dtype=dtype), requires_grad=False)
        self.down_proj = nn.Parameter(
            torch.empty(num_experts, hidden_size, local, dtype=dtype), requires_grad=False)
        # dim counted from the end: one expert's checkpoint tensor is sliced alike.
        set_shard_spec(self.gate_up_proj, ShardSpec(-2, (gate, up)))
        set_shard_spec(self.down_proj, ShardSpec(-1, (split_part(None, intermediate_size,
                                                                  parallel, what),)))

    def forward(self, hidden_states: torch.Tensor, routing: Routing) -> torch.Tensor:
        if hidden_states.is_cuda or self.triton_on_cpu:
            from kvloom.plugins.models.layers import fused_moe

            return fused_moe.fused_experts(hidden_states, self.gate_up_proj, self.down_proj,
                                           routing.weights, routing.expert_ids)
        return experts_reference(hidden_states, self.gate_up_proj, self.down_proj, routing)
