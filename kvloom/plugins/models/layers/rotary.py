"""Rotary position embeddings (rotate-half / NeoX layout, as in HF Llama and Qwen2)."""

from __future__ import annotations

import torch
from torch import nn


class RotaryEmbedding(nn.Module):
    """Applies RoPE to query and key; cos/sin are cached per device on first use.

    The cache covers every position up to ``max_position`` at once, so a
    forward pass never looks at the positions' values on the host (no device
    sync, and CUDA graphs can capture it).

    Args:
        head_size: size of one attention head.
        base: rope_theta.
        max_position: max_position_embeddings.
        inv_freq: optional precomputed inverse frequencies (rope-scaling variants).
    """

    def __init__(self, head_size: int, base: float, max_position: int,
                 inv_freq: torch.Tensor | None = None) -> None:
        super().__init__()
        self.head_size = head_size
        self.max_position = max_position
        if inv_freq is None:
            exponents = torch.arange(0, head_size, 2, dtype=torch.int64, device="cpu").float()
            inv_freq = 1.0 / (base ** (exponents / head_size))
        self._inv_freq = inv_freq.to("cpu", torch.float32)
        self._cos_sin_cache: torch.Tensor | None = None

    def _cos_sin(self, positions: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        cache = self._cos_sin_cache
        if cache is None or cache.device != positions.device:
            inv_freq = self._inv_freq.to(positions.device)
            freqs = torch.outer(torch.arange(self.max_position, device=positions.device,
                                             dtype=torch.float32), inv_freq)
            emb = torch.cat((freqs, freqs), dim=-1)
            cache = torch.stack((emb.cos(), emb.sin()))
            self._cos_sin_cache = cache
        return cache[0][positions], cache[1][positions]

    def forward(self, positions: torch.Tensor, query: torch.Tensor,
                key: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """query: [tokens, heads, head_size]; key: [tokens, kv_heads, head_size]."""
        if query.is_cuda:
            from kvloom.plugins.models.layers import fused_kernels

            self._cos_sin(positions[:0])  # builds the cache on this device once
            return fused_kernels.rotary(positions, query, key, self._cos_sin_cache)
        cos, sin = self._cos_sin(positions)
        cos = cos.unsqueeze(1).to(query.dtype)
        sin = sin.unsqueeze(1).to(query.dtype)
        return _rotate(query, cos, sin), _rotate(key, cos, sin)


def _rotate(x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> torch.Tensor:
    half = x.shape[-1] // 2
    rotated = torch.cat((-x[..., half:], x[..., :half]), dim=-1)
    return x * cos + rotated * sin


def rope_theta_of(hf_config) -> float:
    """rope_theta from a transformers 4.x or 5.x config."""
    theta = getattr(hf_config, "rope_theta", None)
    if theta is None:
        parameters = getattr(hf_config, "rope_parameters", None) or {}
        theta = parameters.get("rope_theta", 10000.0)
    return float(theta)


def rope_scaling_of(hf_config) -> dict | None:
    """The rope scaling dict, or None for plain RoPE."""
    scaling = getattr(hf_config, "rope_scaling", None)
    if scaling is None:
        scaling = getattr(hf_config, "rope_parameters", None)
    if not scaling:
        return None
    rope_type = scaling.get("rope_type", scaling.get("type", "default"))
    return None if rope_type == "default" else dict(scaling)
