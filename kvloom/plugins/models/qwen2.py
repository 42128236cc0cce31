"""Qwen2ForCausalLM: qkv bias, GQA, RoPE, RMSNorm, SiLU MLP, optionally tied embeddings."""

from __future__ import annotations

from typing import Any, Iterable

import torch
from torch import nn

from kvloom.hookspecs import hookimpl
from kvloom.interfaces.attention import AttentionSpec
from kvloom.interfaces.model import ModelContext
from kvloom.plugins.models.layers.activation import silu_and_mul
from kvloom.plugins.models.layers.attention import PagedAttention
from kvloom.plugins.models.layers.linear import Linear
from kvloom.plugins.models.layers.norm import RMSNorm
from kvloom.plugins.models.layers.rotary import RotaryEmbedding, rope_scaling_of, rope_theta_of
from kvloom.plugins.models.layers.weights import (StackedShard, load_weights_by_name,
                                                  require_filled)

KVLOOM_PLUGIN_API = ">=1.0,<2"  # the kvloom plugin API versions this module supports


@hookimpl
def register_models(register):
    register("Qwen2ForCausalLM", Qwen2ForCausalLM)


STACKED_SHARDS = [
    StackedShard("qkv_proj", "q_proj", 0),
    StackedShard("qkv_proj", "k_proj", 1),
    StackedShard("qkv_proj", "v_proj", 2),
    StackedShard("gate_up_proj", "gate_proj", 0),
    StackedShard("gate_up_proj", "up_proj", 1),
]


def head_size_of(config) -> int:
    return getattr(config, "head_dim", None) or config.hidden_size // config.num_attention_heads


class Qwen2Attention(nn.Module):
    def __init__(self, config, context: ModelContext, layer_index: int, qkv_bias: bool = True,
                 o_proj_bias: bool = False):
        super().__init__()
        self.num_heads = config.num_attention_heads
        self.num_kv_heads = config.num_key_value_heads
        self.head_size = head_size_of(config)
        self.q_size = self.num_heads * self.head_size
        self.kv_size = self.num_kv_heads * self.head_size
        dtype = context.dtype
        self.qkv_proj = Linear(config.hidden_size, self.q_size + 2 * self.kv_size,
                                  bias=qkv_bias, dtype=dtype)
        self.o_proj = Linear(self.q_size, config.hidden_size, bias=o_proj_bias, dtype=dtype)
        self.rotary_emb = RotaryEmbedding(self.head_size, rope_theta_of(config),
                                          config.max_position_embeddings)
        self.attn = PagedAttention(self.num_heads, self.num_kv_heads, self.head_size,
                                   context, layer_index)

    def forward(self, positions: torch.Tensor, hidden_states: torch.Tensor,
                kv_caches: list[torch.Tensor], metadata: Any) -> torch.Tensor:
        q, k, v = self.qkv_proj(hidden_states).split([self.q_size, self.kv_size, self.kv_size], -1)
        num_tokens = hidden_states.shape[0]
        q, k = self.rotary_emb(positions, q.view(num_tokens, self.num_heads, self.head_size),
                               k.view(num_tokens, self.num_kv_heads, self.head_size))
        out = self.attn(q.reshape(num_tokens, -1), k.reshape(num_tokens, -1), v,
                        kv_caches, metadata)
        return self.o_proj(out)


class GatedMLP(nn.Module):
    def __init__(self, hidden_size: int, intermediate_size: int, dtype: torch.dtype):
        super().__init__()
        self.gate_up_proj = Linear(hidden_size, 2 * intermediate_size, bias=False, dtype=dtype)
        self.down_proj = Linear(intermediate_size, hidden_size, bias=False, dtype=dtype)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.down_proj(silu_and_mul(self.gate_up_proj(x)))


class Qwen2DecoderLayer(nn.Module):
    attention_cls = Qwen2Attention

    def __init__(self, config, context: ModelContext, layer_index: int):
        super().__init__()
        dtype = context.dtype
        self.self_attn = self.attention_cls(config, context, layer_index)
        self.mlp = self.make_mlp(config, dtype, layer_index)
        self.input_layernorm = RMSNorm(config.hidden_size, config.rms_norm_eps, dtype)
        self.post_attention_layernorm = RMSNorm(config.hidden_size, config.rms_norm_eps, dtype)

    @staticmethod
    def make_mlp(config, dtype: torch.dtype, layer_index: int) -> nn.Module:
        return GatedMLP(config.hidden_size, config.intermediate_size, dtype)

    def forward(self, positions, hidden_states, residual, kv_caches, metadata):
        hidden_states, residual = self.input_layernorm(hidden_states, residual)
        hidden_states = self.self_attn(positions, hidden_states, kv_caches, metadata)
        hidden_states, residual = self.post_attention_layernorm(hidden_states, residual)
        return self.mlp(hidden_states), residual


class Qwen2Model(nn.Module):
    def __init__(self, config, context: ModelContext, layer_cls=Qwen2DecoderLayer):
        super().__init__()
        self.embed_tokens = nn.Embedding(config.vocab_size, config.hidden_size, dtype=context.dtype)
        self.layers = nn.ModuleList(
            layer_cls(config, context, index) for index in range(config.num_hidden_layers))
        self.norm = RMSNorm(config.hidden_size, config.rms_norm_eps, context.dtype)
        self.aux_hidden_state_layers: tuple[int, ...] = ()

    def forward(self, input_ids, positions, kv_caches, metadata):
        hidden_states = self.embed_tokens(input_ids)
        residual = None
        aux_hidden_states = []
        for index, layer in enumerate(self.layers):
            if index in self.aux_hidden_state_layers:
                aux_hidden_states.append(hidden_states if residual is None
                                         else hidden_states + residual)
            hidden_states, residual = layer(positions, hidden_states, residual, kv_caches, metadata)
        hidden_states, _ = self.norm(hidden_states, residual)
        if self.aux_hidden_state_layers:
            return hidden_states, tuple(aux_hidden_states)
        return hidden_states


class Qwen2ForCausalLM(nn.Module):
    """The HF Qwen2ForCausalLM architecture over kvloom's paged attention."""

    model_cls = Qwen2Model

    def __init__(self, hf_config, context: ModelContext):
        super().__init__()
        self.check_supported(hf_config)
        self.config = hf_config
        self.context = context
        self.model = self.model_cls(hf_config, context)
        self.tie_word_embeddings = bool(getattr(hf_config, "tie_word_embeddings", False))
        self.lm_head = Linear(hf_config.hidden_size, hf_config.vocab_size, bias=False,
                                 dtype=context.dtype)
        if self.tie_word_embeddings:
            self.lm_head.weight = self.model.embed_tokens.weight

    @staticmethod
    def check_supported(hf_config) -> None:
        check_supported(hf_config)

    def forward(self, input_ids, positions, kv_caches, attn_metadata) -> torch.Tensor:
        return self.model(input_ids, positions, kv_caches, attn_metadata)

    def compute_logits(self, hidden_states: torch.Tensor) -> torch.Tensor:
        return self.lm_head(hidden_states)

    def set_aux_hidden_state_layers(self, layers: tuple[int, ...]) -> None:
        """From now on ``forward`` returns ``(hidden_states, aux)``, where aux holds the
        input of each listed decoder layer (EAGLE-3 drafts from them)."""
        self.model.aux_hidden_state_layers = tuple(layers)

    def attention_spec(self) -> AttentionSpec:
        return self.model.layers[0].self_attn.attn.spec

    def num_attention_layers(self) -> int:
        return len(self.model.layers)

    def load_weights(self, weights: Iterable[tuple[str, torch.Tensor]]) -> set[str]:
        """Every checkpoint tensor named as in HF; a parameter left unfilled is an error."""
        filled: set[tuple[str, str | None]] = set()
        consumed = self.load_named_weights(weights, filled)
        require_filled(self, filled, STACKED_SHARDS)
        return consumed

    def load_named_weights(self, weights: Iterable[tuple[str, torch.Tensor]],
                           filled: set[tuple[str, str | None]]) -> set[str]:
        """Copy the tensors in, recording what was filled; subclasses map other names."""
        attention = self.model.layers[0].self_attn
        sizes = {"qkv_proj": [attention.q_size, attention.kv_size, attention.kv_size]}
        skip = {"lm_head.weight"} if self.tie_word_embeddings else set()
        return load_weights_by_name(self, weights, STACKED_SHARDS, sizes, skip, filled)


def check_supported(hf_config) -> None:
    """Refuse configs whose features this implementation would silently get wrong."""
    if getattr(hf_config, "use_sliding_window", False):
        raise ValueError("Qwen2 with use_sliding_window=true is not supported yet")
    scaling = rope_scaling_of(hf_config)
    if scaling is not None:
        raise ValueError(f"Qwen2 rope scaling {scaling.get('rope_type', scaling.get('type'))!r} "
                         "is not supported yet")
