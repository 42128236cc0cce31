"""LlamaForCausalLM (Llama 2/3, SmolLM2, ...): Qwen2's block without the qkv bias by default,
plus Llama-3 rope scaling."""

from __future__ import annotations

import math

import torch

from kvloom.hookspecs import hookimpl
from kvloom.interfaces.model import ModelContext
from kvloom.plugins.models.layers.rotary import RotaryEmbedding, rope_scaling_of, rope_theta_of
from kvloom.plugins.models.qwen2 import (Qwen2Attention, Qwen2DecoderLayer, Qwen2ForCausalLM,
                                         Qwen2Model)

KVLOOM_PLUGIN_API = ">=1.1,<2"  # the kvloom plugin API versions this module supports


@hookimpl
def register_models(register):
    register("LlamaForCausalLM", LlamaForCausalLM)


def llama3_inv_freq(head_size: int, base: float, scaling: dict) -> torch.Tensor:
    """Llama 3.1's frequency-dependent rope scaling (as HF's ``_compute_llama3_parameters``)."""
    exponents = torch.arange(0, head_size, 2, dtype=torch.int64, device="cpu").float()
    inv_freq = 1.0 / (base ** (exponents / head_size))
    factor = scaling["factor"]
    low_freq_factor = scaling.get("low_freq_factor", 1.0)
    high_freq_factor = scaling.get("high_freq_factor", 4.0)
    old_context = scaling["original_max_position_embeddings"]
    low_freq_wavelen = old_context / low_freq_factor
    high_freq_wavelen = old_context / high_freq_factor
    wavelen = 2 * math.pi / inv_freq
    scaled = torch.where(wavelen > low_freq_wavelen, inv_freq / factor, inv_freq)
    smooth = (old_context / wavelen - low_freq_factor) / (high_freq_factor - low_freq_factor)
    smoothed = (1 - smooth) * scaled / factor + smooth * scaled
    is_medium = ~(wavelen < high_freq_wavelen) * ~(wavelen > low_freq_wavelen)
    return torch.where(is_medium, smoothed, scaled)


class LlamaAttention(Qwen2Attention):
    def __init__(self, config, context: ModelContext, layer_index: int):
        bias = bool(getattr(config, "attention_bias", False))  # HF puts it on q, k, v and o
        super().__init__(config, context, layer_index, qkv_bias=bias, o_proj_bias=bias)
        scaling = rope_scaling_of(config)
        theta = rope_theta_of(config)
        inv_freq = None if scaling is None else llama3_inv_freq(self.head_size, theta, scaling)
        self.rotary_emb = RotaryEmbedding(self.head_size, theta, config.max_position_embeddings,
                                          inv_freq)


class LlamaDecoderLayer(Qwen2DecoderLayer):
    attention_cls = LlamaAttention


class LlamaModel(Qwen2Model):
    def __init__(self, config, context: ModelContext):
        super().__init__(config, context, layer_cls=LlamaDecoderLayer)


class LlamaForCausalLM(Qwen2ForCausalLM):
    """HF's LlamaForCausalLM over kvloom's paged attention."""

    model_cls = LlamaModel

    @staticmethod
    def check_supported(hf_config) -> None:
        if getattr(hf_config, "mlp_bias", False):
            raise ValueError("Llama with mlp_bias=true is not supported yet")
        scaling = rope_scaling_of(hf_config)
        if scaling is not None and scaling.get("rope_type", scaling.get("type")) != "llama3":
            raise ValueError(f"Llama rope scaling {scaling.get('rope_type')!r} is not supported")

