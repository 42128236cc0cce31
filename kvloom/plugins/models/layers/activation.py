"""Activations used by gated MLPs."""

from __future__ import annotations

import torch
import torch.nn.functional as F


def silu_and_mul(gate_up: torch.Tensor) -> torch.Tensor:
    """SiLU(gate) * up for a fused [..., 2 * d] gate/up projection."""
    if gate_up.is_cuda and gate_up.dim() == 2:
        from kvloom.plugins.models.layers import fused_kernels

        return fused_kernels.silu_and_mul(gate_up)
    gate, up = gate_up.chunk(2, dim=-1)
    return F.silu(gate) * up
