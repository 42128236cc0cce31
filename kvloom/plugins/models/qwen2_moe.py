"""Qwen2MoeForCausalLM (Qwen1.5-MoE, Qwen2-57B-A14B): Qwen2 with sparse MoE MLPs.

A decoder layer is sparse when it is not in ``mlp_only_layers`` and its
1-based index is a multiple of ``decoder_sparse_step``; the others keep a dense
gated MLP of ``intermediate_size``. A sparse block routes every token to its
top-k experts and adds a shared expert scaled by a sigmoid gate.

Under tensor parallelism the router and the shared expert's gate are replicated,
each expert and the shared expert hold a slice of their intermediate dimension, and
the block all-reduces once: routed + sigmoid(g) * shared is linear in the experts'
partial sums, and g is the same on every rank.
"""

from __future__ import annotations

import re
from typing import Iterable, Iterator

import torch
from torch import nn

from kvloom.hookspecs import hookimpl
from kvloom.interfaces.model import ModelContext
from kvloom.plugins.models.layers.linear import Linear
from kvloom.plugins.models.layers.moe import FusedExperts, route_top_k
from kvloom.plugins.models.layers.parallel import check_attention_heads, divide
from kvloom.plugins.models.layers.weights import copy_shard
from kvloom.plugins.models.qwen2 import (GatedMLP, Qwen2Attention, Qwen2DecoderLayer,
                                         Qwen2ForCausalLM, Qwen2Model, num_kv_heads_of)
from kvloom.plugins.models.qwen2 import check_supported as check_qwen2_supported

KVLOOM_PLUGIN_API = ">=1.1,<2"  # the kvloom plugin API versions this module supports


@hookimpl
def register_models(register):
    register("Qwen2MoeForCausalLM", Qwen2MoeForCausalLM)


def is_sparse_layer(config, layer_index: int) -> bool:
    """HF's rule for which decoder layers get a mixture of experts."""
    return (layer_index not in (getattr(config, "mlp_only_layers", None) or [])
            and config.num_experts > 0
            and (layer_index + 1) % config.decoder_sparse_step == 0)


class Qwen2MoeSparseBlock(nn.Module):
    """Router, routed experts and the gated shared expert of one layer."""

    def __init__(self, config, context: ModelContext):
        super().__init__()
        dtype, parallel = context.dtype, context.parallel
        self.parallel = parallel
        self.top_k = config.num_experts_per_tok
        self.renormalize = bool(config.norm_topk_prob)
        self.gate = Linear(config.hidden_size, config.num_experts, bias=False, dtype=dtype)
        self.experts = FusedExperts(config.num_experts, config.hidden_size,
                                    config.moe_intermediate_size, dtype, parallel)
        self.shared_expert = GatedMLP(config.hidden_size, config.shared_expert_intermediate_size,
                                      dtype, parallel, reduce_results=False,
                                      what="shared_expert_intermediate_size")
        self.shared_expert_gate = Linear(config.hidden_size, 1, bias=False, dtype=dtype)

    def forward(self, hidden_states: torch.Tensor) -> torch.Tensor:
        routing = route_top_k(self.gate(hidden_states), self.top_k, self.renormalize)
        routed = self.experts(hidden_states, routing)
        shared = self.shared_expert(hidden_states)
        out = routed + torch.sigmoid(self.shared_expert_gate(hidden_states)) * shared
        return self.parallel.all_reduce(out)  # partial sums until here


class Qwen2MoeAttention(Qwen2Attention):
    def __init__(self, config, context: ModelContext, layer_index: int):
        # Older configs have no qkv_bias field; Qwen1.5-MoE checkpoints carry the bias.
        super().__init__(config, context, layer_index,
                         qkv_bias=bool(getattr(config, "qkv_bias", True)))


class Qwen2MoeDecoderLayer(Qwen2DecoderLayer):
    attention_cls = Qwen2MoeAttention

    @staticmethod
    def make_mlp(config, context: ModelContext, layer_index: int) -> nn.Module:
        if is_sparse_layer(config, layer_index):
            return Qwen2MoeSparseBlock(config, context)
        return GatedMLP(config.hidden_size, config.intermediate_size, context.dtype,
                        context.parallel)


class Qwen2MoeModel(Qwen2Model):
    def __init__(self, config, context: ModelContext):
        super().__init__(config, context, layer_cls=Qwen2MoeDecoderLayer)


class Qwen2MoeForCausalLM(Qwen2ForCausalLM):
    """HF's Qwen2MoeForCausalLM over kvloom's paged attention and fused experts."""

    model_cls = Qwen2MoeModel

    @staticmethod
    def check_supported(hf_config) -> None:
        check_qwen2_supported(hf_config)
        if getattr(hf_config, "hidden_act", "silu") != "silu":
            raise ValueError(f"Qwen2-MoE with hidden_act={hf_config.hidden_act!r} is not "
                             "supported (experts are SiLU gated MLPs)")
        if hf_config.num_experts > 0 and not 0 < hf_config.num_experts_per_tok <= \
                hf_config.num_experts:
            raise ValueError(f"num_experts_per_tok={hf_config.num_experts_per_tok} must be in "
                             f"1..num_experts ({hf_config.num_experts})")

    @staticmethod
    def check_tensor_parallel(hf_config, parallel_size: int) -> None:
        """The heads, and the intermediate size of every MLP the layers have, must
        split evenly over the ranks."""
        check_attention_heads(hf_config.num_attention_heads, num_kv_heads_of(hf_config),
                              parallel_size)
        layers = range(hf_config.num_hidden_layers)
        if any(is_sparse_layer(hf_config, index) for index in layers):
            for what in ("moe_intermediate_size", "shared_expert_intermediate_size"):
                divide(getattr(hf_config, what), parallel_size, what)
        if not all(is_sparse_layer(hf_config, index) for index in layers):
            divide(hf_config.intermediate_size, parallel_size, "intermediate_size")

    def load_named_weights(self, weights: Iterable[tuple[str, torch.Tensor]],
                           filled: set[tuple[str, str | None]]) -> set[str]:
        """HF checkpoints store experts one by one (``experts.{e}.gate_proj.weight``);
        transformers 5 may also save them stacked (``experts.gate_up_proj``). Both load."""
        expert_loader = PerExpertLoader(dict(self.named_parameters()))
        consumed = super().load_named_weights(expert_loader.filter(weights), filled)
        filled |= expert_loader.filled_parameters()
        return consumed | expert_loader.consumed


_PER_EXPERT_NAME = re.compile(
    r"^(?P<experts>.+\.experts)\.(?P<expert>\d+)\.(?P<proj>gate_proj|up_proj|down_proj)\.weight$")


class PerExpertLoader:
    """Copies per-expert checkpoint tensors into the stacked expert parameters."""

    def __init__(self, params: dict[str, nn.Parameter]):
        self.params = params
        self.consumed: set[str] = set()
        self._seen: dict[str, set[tuple[int, str]]] = {}

    def filter(self, weights: Iterable[tuple[str, torch.Tensor]]
               ) -> Iterator[tuple[str, torch.Tensor]]:
        """Loads the per-expert tensors of ``weights`` and yields every other one."""
        for name, tensor in weights:
            match = _PER_EXPERT_NAME.match(name)
            if match is None or f"{match['experts']}.down_proj" not in self.params:
                yield name, tensor
                continue
            self._load(name, tensor, match["experts"], int(match["expert"]), match["proj"])

    def _load(self, name: str, tensor: torch.Tensor, experts: str, expert: int,
              proj: str) -> None:
        stacked = self.params[f"{experts}.{'down_proj' if proj == 'down_proj' else 'gate_up_proj'}"]
        if expert >= stacked.shape[0]:
            raise ValueError(f"checkpoint tensor {name!r} is for expert {expert}, but the "
                             f"config has num_experts={stacked.shape[0]}")
        # The stacked parameter's shard spec slices one expert's tensor too (this
        # rank's intermediate rows of gate/up, columns of down).
        copy_shard(stacked.data[expert], tensor, stacked.shard_spec,
                   None if proj == "down_proj" else proj, name)
        self.consumed.add(name)
        self._seen.setdefault(experts, set()).add((expert, proj))

    def filled_parameters(self) -> set[tuple[str, None]]:
        """The stacked parameters filled expert by expert, as ``require_filled`` counts
        them; a layer that had some of its experts' tensors must have had all."""
        filled = set()
        for experts, seen in self._seen.items():
            num_experts = self.params[f"{experts}.down_proj"].shape[0]
            for expert in range(num_experts):
                for proj in ("gate_proj", "up_proj", "down_proj"):
                    if (expert, proj) not in seen:
                        raise ValueError(f"checkpoint has no tensor "
                                         f"'{experts}.{expert}.{proj}.weight'")
            filled |= {(f"{experts}.gate_up_proj", None), (f"{experts}.down_proj", None)}
        return filled
