"""The linear layer models use: nn.Linear, with a faster path for decode batches on GPUs."""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn


class Linear(nn.Linear):
    """``nn.Linear`` that streams CUDA decode batches (<= 8 rows, bf16/fp16) through the
    Triton skinny GEMM where it measured faster than cuBLAS; identical results otherwise
    up to summation order."""

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if x.is_cuda and x.dim() == 2 and x.shape[0] <= 8:
            from kvloom.plugins.models.layers import skinny_gemm

            tile = skinny_gemm.pick_tile(*self.weight.shape)
            if tile is not None and skinny_gemm.supports(x, self.weight):
                return skinny_gemm.skinny_linear(x, self.weight, self.bias, tile)
        return F.linear(x, self.weight, self.bias)
