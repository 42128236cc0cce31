"""RMSNorm, with the residual add fused in (computed in float32 like HF)."""

from __future__ import annotations

import torch
from torch import nn


class RMSNorm(nn.Module):
    def __init__(self, hidden_size: int, eps: float, dtype: torch.dtype) -> None:
        super().__init__()
        self.weight = nn.Parameter(torch.ones(hidden_size, dtype=dtype))
        self.eps = eps

    def forward(self, x: torch.Tensor,
                residual: torch.Tensor | None = None) -> tuple[torch.Tensor, torch.Tensor]:
        """Returns (normalized x + residual, x + residual), so the caller keeps the sum."""
        if x.is_cuda and x.dim() == 2:
            from kvloom.plugins.models.layers import fused_kernels

            return fused_kernels.rms_norm(x, self.weight, self.eps, residual)
        if residual is not None:
            x = x + residual
        residual = x
        hidden = x.float()
        hidden = hidden * torch.rsqrt(hidden.pow(2).mean(-1, keepdim=True) + self.eps)
        return self.weight * hidden.to(x.dtype), residual
