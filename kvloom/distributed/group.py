"""The tensor-parallel group over ``torch.distributed``: one process per rank."""

from __future__ import annotations

import torch
import torch.distributed as dist


class TorchDistributedGroup:
    """A :class:`~kvloom.interfaces.parallel.TensorParallelGroup` over a process group
    (gloo on CPU, NCCL on CUDA), the default group unless one is given.

    Built before the process group exists (a rank builds its model slice, then joins):
    only the collectives need ``torch.distributed`` to be initialised.
    """

    def __init__(self, rank: int, size: int, group: dist.ProcessGroup | None = None) -> None:
        self.rank = rank
        self.size = size
        self.group = group

    def all_reduce(self, tensor: torch.Tensor) -> torch.Tensor:
        """Sums in place (callers pass a fresh layer output) and returns ``tensor``."""
        if self.size == 1:
            return tensor
        dist.all_reduce(tensor, group=self.group)
        return tensor

    def all_gather(self, tensor: torch.Tensor, dim: int = -1) -> torch.Tensor:
        if self.size == 1:
            return tensor
        tensor = tensor.contiguous()
        parts = [torch.empty_like(tensor) for _ in range(self.size)]
        dist.all_gather(parts, tensor, group=self.group)
        return torch.cat(parts, dim=dim)
