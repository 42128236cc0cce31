"""Qwen2ForCausalLM: qkv bias, GQA, RoPE, RMSNorm, SiLU MLP, optionally tied embeddings.

Built in ``context.parallel``: with tensor parallelism each rank holds its slice of the
heads, MLP columns and vocabulary (layers/parallel.py), one all-reduce after the
attention and one after the MLP of every layer.
"""

from __future__ import annotations

from typing import Any, Iterable

import torch
from torch import nn

from kvloom.hookspecs import hookimpl
from kvloom.interfaces.attention import AttentionSpec
from kvloom.interfaces.model import ModelContext
from kvloom.interfaces.parallel import SingleRank, TensorParallelGroup
from kvloom.plugins.models.layers.activation import silu_and_mul
from kvloom.plugins.models.layers.attention import PagedAttention
from kvloom.plugins.models.layers.norm import RMSNorm
from kvloom.plugins.models.layers.parallel import (MergedColumnParallelLinear, ParallelLMHead,
                                                   QKVParallelLinear, RowParallelLinear,
                                                   VocabParallelEmbedding, check_attention_heads,
                                                   divide)
from kvloom.plugins.models.layers.rotary import RotaryEmbedding, rope_scaling_of, rope_theta_of
from kvloom.plugins.models.layers.weights import (StackedShard, load_weights_by_name,
                                                  require_filled)

KVLOOM_PLUGIN_API = ">=1.1,<2"  # the kvloom plugin API versions this module supports


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
    """Attention over this rank's heads: ``num_heads`` / ``num_kv_heads`` and the q/kv
    sizes are per rank (the whole model's with one rank)."""

    def __init__(self, config, context: ModelContext, layer_index: int, qkv_bias: bool = True,
                 o_proj_bias: bool = False):
        super().__init__()
        parallel = context.parallel
        self.head_size = head_size_of(config)
        dtype = context.dtype
        self.qkv_proj = QKVParallelLinear(config.hidden_size, self.head_size,
                                          config.num_attention_heads,
                                          num_kv_heads_of(config), parallel,
                                          bias=qkv_bias, dtype=dtype)
        self.num_heads, self.num_kv_heads = self.qkv_proj.num_heads, self.qkv_proj.num_kv_heads
        self.q_size, self.kv_size = self.qkv_proj.q_size, self.qkv_proj.kv_size
        self.o_proj = RowParallelLinear(config.num_attention_heads * self.head_size,
                                        config.hidden_size, parallel, bias=o_proj_bias,
                                        dtype=dtype, what="num_attention_heads * head_dim")
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
    """down(silu(gate(x)) * up(x)), gate/up column- and down row-parallel.

    Args:
        reduce_results: False returns this rank's partial sum for the caller to reduce.
        what: the config field named when tensor parallelism cannot split it.
    """

    def __init__(self, hidden_size: int, intermediate_size: int, dtype: torch.dtype,
                 parallel: TensorParallelGroup | None = None, reduce_results: bool = True,
                 what: str = "intermediate_size"):
        super().__init__()
        parallel = parallel or SingleRank()
        self.gate_up_proj = MergedColumnParallelLinear(
            hidden_size, [intermediate_size] * 2, ["gate_proj", "up_proj"], parallel,
            dtype=dtype, what=what)
        self.down_proj = RowParallelLinear(intermediate_size, hidden_size, parallel,
                                           dtype=dtype, reduce_results=reduce_results,
                                           what=what)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.down_proj(silu_and_mul(self.gate_up_proj(x)))


class Qwen2DecoderLayer(nn.Module):
    attention_cls = Qwen2Attention

    def __init__(self, config, context: ModelContext, layer_index: int):
        super().__init__()
        dtype = context.dtype
        self.self_attn = self.attention_cls(config, context, layer_index)
        self.mlp = self.make_mlp(config, context, layer_index)
        self.input_layernorm = RMSNorm(config.hidden_size, config.rms_norm_eps, dtype)
        self.post_attention_layernorm = RMSNorm(config.hidden_size, config.rms_norm_eps, dtype)

    @staticmethod
    def make_mlp(config, context: ModelContext, layer_index: int) -> nn.Module:
        return GatedMLP(config.hidden_size, config.intermediate_size, context.dtype,
                        context.parallel)

    def forward(self, positions, hidden_states, residual, kv_caches, metadata):
        hidden_states, residual = self.input_layernorm(hidden_states, residual)
        hidden_states = self.self_attn(positions, hidden_states, kv_caches, metadata)
        hidden_states, residual = self.post_attention_layernorm(hidden_states, residual)
        return self.mlp(hidden_states), residual


class Qwen2Model(nn.Module):
    def __init__(self, config, context: ModelContext, layer_cls=Qwen2DecoderLayer):
        super().__init__()
        self.embed_tokens = VocabParallelEmbedding(config.vocab_size, config.hidden_size,
                                                   context.parallel, dtype=context.dtype)
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
    # load_weights takes unread tensors (TensorSlice): each rank reads only its slice.
    reads_weight_slices = True
    # Built from the parallel layers: context.parallel slices it.
    supports_tensor_parallel = True

    def __init__(self, hf_config, context: ModelContext):
        super().__init__()
        self.check_supported(hf_config)
        self.check_tensor_parallel(hf_config, context.parallel.size)
        self.config = hf_config
        self.context = context
        self.model = self.model_cls(hf_config, context)
        self.tie_word_embeddings = bool(getattr(hf_config, "tie_word_embeddings", False))
        self.lm_head = ParallelLMHead(hf_config.hidden_size, hf_config.vocab_size,
                                      context.parallel, dtype=context.dtype)
        if self.tie_word_embeddings:
            self.lm_head.tie_to(self.model.embed_tokens)

    @staticmethod
    def check_supported(hf_config) -> None:
        check_supported(hf_config)

    @staticmethod
    def check_tensor_parallel(hf_config, parallel_size: int) -> None:
        """Refuse, before allocating anything, a tensor-parallel size that does not
        split the heads and the MLP evenly (the vocabulary is padded instead)."""
        check_attention_heads(hf_config.num_attention_heads, num_kv_heads_of(hf_config),
                              parallel_size)
        divide(hf_config.intermediate_size, parallel_size, "intermediate_size")

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
        """Copy the tensors in (this rank's slice of each, through the parameters'
        shard specs), recording what was filled; subclasses map other names."""
        skip = {"lm_head.weight"} if self.tie_word_embeddings else set()
        return load_weights_by_name(self, weights, STACKED_SHARDS, {}, skip, filled)


def num_kv_heads_of(config) -> int:
    return getattr(config, "num_key_value_heads", None) or config.num_attention_heads


def check_supported(hf_config) -> None:
    """Refuse configs whose features this implementation would silently get wrong."""
    if getattr(hf_config, "use_sliding_window", False):
        raise ValueError("Qwen2 with use_sliding_window=true is not supported yet")
    scaling = rope_scaling_of(hf_config)
    if scaling is not None:
        raise ValueError(f"Qwen2 rope scaling {scaling.get('rope_type', scaling.get('type'))!r} "
                         "is not supported yet")
