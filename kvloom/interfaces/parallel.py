"""The tensor-parallel group a model is built in: which rank it is, how many ranks
there are, and the two collectives tensor-parallel layers need.

A model gets one through ``ModelContext.parallel``. With one rank (the default,
:class:`SingleRank`) both collectives return their input, so a model written for
tensor parallelism runs unchanged on one device. The engine's implementation over
``torch.distributed`` lives in ``kvloom.distributed``; a model never imports it.
"""

from __future__ import annotations

from typing import Protocol

import torch


class TensorParallelGroup(Protocol):
    """The ranks that hold slices of one model.

    Attributes:
        rank: this process's index in the group, 0 to ``size - 1``.
        size: how many ranks hold a slice (the tensor-parallel size).
    """

    rank: int
    size: int

    def all_reduce(self, tensor: torch.Tensor) -> torch.Tensor:
        """The elementwise sum of ``tensor`` over every rank (same shape on each)."""

    def all_gather(self, tensor: torch.Tensor, dim: int = -1) -> torch.Tensor:
        """Every rank's ``tensor`` concatenated along ``dim``, in rank order."""


class SingleRank:
    """The group of one: nothing to exchange."""

    rank = 0
    size = 1

    def all_reduce(self, tensor: torch.Tensor) -> torch.Tensor:
        return tensor

    def all_gather(self, tensor: torch.Tensor, dim: int = -1) -> torch.Tensor:
        return tensor
