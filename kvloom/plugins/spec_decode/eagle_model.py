"""EAGLE-1 and EAGLE-3 draft heads over kvloom's paged attention.

Both heads read one draft token and one hidden state per position and return the
hidden state the next draft step reads; they differ in what that hidden state is:

* EAGLE-1: ``fc([embed(token), h])`` with ``h`` the target's final hidden state
  (after its norm), then decoder layers whose first one has no input norm.
* EAGLE-3: ``g = fc([aux_0, aux_1, aux_2])`` from three target layers' inputs,
  then one layer attending over ``[norm(embed(token)), norm(g)]`` (2 x hidden),
  and its own final norm and (possibly reduced-vocabulary) lm_head.

Checkpoint names are those of the published checkpoints (without a ``model.``
prefix, which the loader strips), so the modules here are named after them.
"""

from __future__ import annotations

from abc import ABC, abstractmethod
from dataclasses import dataclass
from typing import Any, Callable, Iterable

import torch
from torch import nn

from kvloom.interfaces.attention import AttentionSpec
from kvloom.interfaces.drafter import TargetStep
from kvloom.interfaces.model import ModelContext
from kvloom.plugins.models.layers.linear import Linear
from kvloom.plugins.models.layers.norm import RMSNorm
from kvloom.plugins.models.layers.weights import load_weights_by_name
from kvloom.plugins.models.llama import LlamaAttention, LlamaForCausalLM
from kvloom.plugins.models.qwen2 import STACKED_SHARDS, GatedMLP, Qwen2Attention
from kvloom.plugins.models.qwen2 import check_supported as check_qwen2_supported


@dataclass(slots=True)
class TargetParts:
    """What a head borrows from the target model when its checkpoint has no copy.

    Held outside ``nn.Module`` registration on purpose: the head's parameters
    are then only its own, so dummy initialisation never touches the target.
    """

    embed_tokens: nn.Module
    compute_logits: Callable[[torch.Tensor], torch.Tensor]


def is_qwen2_style(config) -> bool:
    """Qwen2 drafts carry a q/k/v bias without saying so in their config."""
    architectures = getattr(config, "architectures", None) or []
    return getattr(config, "model_type", None) == "qwen2" or any(
        name.startswith("Qwen2") for name in architectures)


def make_attention(config, context: ModelContext, layer_index: int, input_size: int) -> nn.Module:
    """The target family's attention block, with q/k/v reading ``input_size`` features."""
    if is_qwen2_style(config):
        check_qwen2_supported(config)
        attention = Qwen2Attention(config, context, layer_index)
    else:
        LlamaForCausalLM.check_supported(config)
        attention = LlamaAttention(config, context, layer_index)
    if input_size != config.hidden_size:  # EAGLE-3 attends over [embedding, hidden]
        fused = attention.qkv_proj
        attention.qkv_proj = Linear(input_size, fused.out_features, bias=fused.bias is not None,
                                    dtype=context.dtype)
    return attention


class EagleHead(nn.Module, ABC):
    """What the drafter drives; subclasses are the two published formats."""

    eagle_version: int = 0
    aux_hidden_state_layers: tuple[int, ...] = ()

    def __init__(self, config, context: ModelContext, target: TargetParts,
                 own_embedding: bool) -> None:
        super().__init__()
        self.config = config
        self.target = target
        self.embed_tokens = (nn.Embedding(config.vocab_size, config.hidden_size,
                                          dtype=context.dtype) if own_embedding else None)

    def embed(self, input_ids: torch.Tensor) -> torch.Tensor:
        table = self.embed_tokens if self.embed_tokens is not None else self.target.embed_tokens
        return table(input_ids)

    def attention_layers(self) -> list[nn.Module]:
        return [module for module in self.modules() if isinstance(module, Qwen2Attention)]

    def attention_specs(self) -> list[AttentionSpec]:
        """One spec per KV cache, in the order of the layers' ``layer_index``."""
        return [attention.attn.spec for attention in self.attention_layers()]

    @abstractmethod
    def target_hidden(self, step: TargetStep) -> torch.Tensor:
        """The hidden input of each position the target computed this step."""

    @abstractmethod
    def draft_token_ids(self, hidden: torch.Tensor) -> torch.Tensor:
        """Greedy next tokens (target vocabulary) from output hidden states."""

    def load_weights(self, weights: Iterable[tuple[str, torch.Tensor]]) -> set[str]:
        attention = self.attention_layers()[0]
        mlp_size = self.config.intermediate_size
        sizes = {"qkv_proj": [attention.q_size, attention.kv_size, attention.kv_size],
                 "gate_up_proj": [mlp_size, mlp_size]}
        return load_weights_by_name(self, weights, STACKED_SHARDS, sizes)


class Eagle1Layer(nn.Module):
    def __init__(self, config, context: ModelContext, layer_index: int) -> None:
        super().__init__()
        hidden, dtype = config.hidden_size, context.dtype
        self.self_attn = make_attention(config, context, layer_index, hidden)
        self.mlp = GatedMLP(hidden, config.intermediate_size, dtype)
        # EAGLE-1 trained its first layer without an input norm: fc's output goes in as is.
        self.input_layernorm = (RMSNorm(hidden, config.rms_norm_eps, dtype)
                                if layer_index > 0 else None)
        self.post_attention_layernorm = RMSNorm(hidden, config.rms_norm_eps, dtype)

    def forward(self, positions, hidden_states, residual, kv_caches, metadata):
        if self.input_layernorm is None:
            residual = hidden_states if residual is None else hidden_states + residual
        else:
            hidden_states, residual = self.input_layernorm(hidden_states, residual)
        hidden_states = self.self_attn(positions, hidden_states, kv_caches, metadata)
        hidden_states, residual = self.post_attention_layernorm(hidden_states, residual)
        return self.mlp(hidden_states), residual


class Eagle1Head(EagleHead):
    """EAGLE-1: logits come from the target's lm_head."""

    eagle_version = 1

    def __init__(self, config, context: ModelContext, target: TargetParts, own_embedding: bool,
                 fc_bias: bool) -> None:
        super().__init__(config, context, target, own_embedding)
        hidden = config.hidden_size
        self.fc = Linear(2 * hidden, hidden, bias=fc_bias, dtype=context.dtype)
        self.layers = nn.ModuleList(Eagle1Layer(config, context, index)
                                    for index in range(config.num_hidden_layers))

    def target_hidden(self, step: TargetStep) -> torch.Tensor:
        return step.hidden_states

    def forward(self, input_ids: torch.Tensor, positions: torch.Tensor, hidden: torch.Tensor,
                kv_caches: list[torch.Tensor], metadata: Any) -> torch.Tensor:
        hidden_states = self.fc(torch.cat([self.embed(input_ids), hidden], dim=-1))
        residual = None
        for layer in self.layers:
            hidden_states, residual = layer(positions, hidden_states, residual, kv_caches,
                                            metadata)
        return hidden_states + residual  # EAGLE-1 has no final norm

    def draft_token_ids(self, hidden: torch.Tensor) -> torch.Tensor:
        return self.target.compute_logits(hidden).argmax(dim=-1)


class Eagle3Layer(nn.Module):
    """EAGLE-3's single layer ("midlayer")."""

    def __init__(self, config, context: ModelContext) -> None:
        super().__init__()
        hidden, eps, dtype = config.hidden_size, config.rms_norm_eps, context.dtype
        self.self_attn = make_attention(config, context, 0, 2 * hidden)
        self.mlp = GatedMLP(hidden, config.intermediate_size, dtype)
        self.input_layernorm = RMSNorm(hidden, eps, dtype)   # for the token embedding
        self.hidden_norm = RMSNorm(hidden, eps, dtype)       # for the hidden state
        self.post_attention_layernorm = RMSNorm(hidden, eps, dtype)

    def forward(self, positions, embeds, hidden, kv_caches, metadata):
        attention_input = torch.cat([self.input_layernorm(embeds)[0],
                                     self.hidden_norm(hidden)[0]], dim=-1)
        out = self.self_attn(positions, attention_input, kv_caches, metadata)
        out, residual = self.post_attention_layernorm(out, hidden)
        return self.mlp(out), residual


class Eagle3Head(EagleHead):
    """EAGLE-3: own norm and lm_head, over a draft vocabulary mapped back by ``d2t``."""

    eagle_version = 3

    def __init__(self, config, context: ModelContext, target: TargetParts, own_embedding: bool,
                 own_lm_head: bool, fc_bias: bool, aux_layers: tuple[int, ...]) -> None:
        super().__init__(config, context, target, own_embedding)
        hidden, dtype = config.hidden_size, context.dtype
        self.aux_hidden_state_layers = aux_layers
        self.fc = Linear(len(aux_layers) * hidden, hidden, bias=fc_bias, dtype=dtype)
        self.midlayer = Eagle3Layer(config, context)
        self.norm = RMSNorm(hidden, config.rms_norm_eps, dtype)
        draft_vocab_size = draft_vocab_size_of(config)
        self.lm_head = (Linear(hidden, draft_vocab_size, bias=False, dtype=dtype)
                        if own_lm_head else None)
        # target id = draft id + d2t[draft id]; zeros when the vocabularies are the same.
        self.register_buffer("d2t", torch.zeros(draft_vocab_size, dtype=torch.int64))

    def target_hidden(self, step: TargetStep) -> torch.Tensor:
        if len(step.aux_hidden_states) != len(self.aux_hidden_state_layers):
            raise ValueError(f"EAGLE-3 needs the inputs of target layers "
                             f"{self.aux_hidden_state_layers}, the step has "
                             f"{len(step.aux_hidden_states)} aux hidden states")
        return self.fc(torch.cat(step.aux_hidden_states, dim=-1))

    def forward(self, input_ids: torch.Tensor, positions: torch.Tensor, hidden: torch.Tensor,
                kv_caches: list[torch.Tensor], metadata: Any) -> torch.Tensor:
        out, residual = self.midlayer(positions, self.embed(input_ids), hidden, kv_caches,
                                      metadata)
        return out + residual  # pre-norm: what the next draft step reads

    def draft_token_ids(self, hidden: torch.Tensor) -> torch.Tensor:
        normed, _ = self.norm(hidden)
        if self.lm_head is None:
            return self.target.compute_logits(normed).argmax(dim=-1)
        draft_ids = self.lm_head(normed).argmax(dim=-1)
        return draft_ids + self.d2t[draft_ids]

    def load_weights(self, weights: Iterable[tuple[str, torch.Tensor]]) -> set[str]:
        consumed = set()

        def own_tensors():
            for name, tensor in weights:
                if name in ("d2t", "t2d"):  # t2d only matters when training
                    if name == "d2t":
                        self._load_d2t(tensor)
                    consumed.add(name)
                    continue
                yield name, tensor

        used = super().load_weights(own_tensors())
        return used | consumed

    def _load_d2t(self, tensor: torch.Tensor) -> None:
        if tensor.shape != self.d2t.shape:
            raise ValueError(f"checkpoint tensor 'd2t' has shape {tuple(tensor.shape)}, "
                             f"expected {tuple(self.d2t.shape)} (draft_vocab_size)")
        self.d2t.copy_(tensor)


def draft_vocab_size_of(config) -> int:
    return int(getattr(config, "draft_vocab_size", None) or config.vocab_size)
