"""The attention layer models use: delegates to the selected backend's implementation."""

from __future__ import annotations

from typing import Any

import torch
from torch import nn

from kvloom.interfaces.attention import AttentionSpec
from kvloom.interfaces.model import ModelContext


class PagedAttention(nn.Module):
    """Backend-agnostic attention over the paged KV cache for one layer.

    ``num_heads`` and ``num_kv_heads`` are this rank's under tensor parallelism, so
    ``spec`` (which the engine sizes each rank's KV cache from) holds only its heads.
    """

    def __init__(self, num_heads: int, num_kv_heads: int, head_size: int,
                 context: ModelContext, layer_index: int, scale: float | None = None) -> None:
        super().__init__()
        self.num_heads = num_heads
        self.num_kv_heads = num_kv_heads
        self.head_size = head_size
        self.layer_index = layer_index
        self.spec = AttentionSpec(num_heads, num_kv_heads, head_size, context.dtype,
                                  context.block_size, context.device.type)
        self.impl = context.attention_backend.make_impl(
            self.spec, scale if scale is not None else head_size ** -0.5)

    def forward(self, query: torch.Tensor, key: torch.Tensor, value: torch.Tensor,
                kv_caches: list[torch.Tensor], metadata: Any) -> torch.Tensor:
        """query/key/value: [tokens, heads * head_size]; returns the same shape as query."""
        num_tokens = query.shape[0]
        out = self.impl.forward(
            query.view(num_tokens, self.num_heads, self.head_size),
            key.view(num_tokens, self.num_kv_heads, self.head_size),
            value.view(num_tokens, self.num_kv_heads, self.head_size),
            kv_caches[self.layer_index], metadata)
        return out.reshape(num_tokens, self.num_heads * self.head_size)
