"""Loading HF checkpoint tensors into fused parameters (qkv_proj, gate_up_proj)."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Iterable

import torch
from torch import nn


@dataclass(frozen=True, slots=True)
class StackedShard:
    """Checkpoint tensors named ``*.{part}.*`` land in rows of ``*.{fused}.*``.

    Attributes:
        fused: name of the fused parameter's module (e.g. "qkv_proj").
        part: name in the checkpoint (e.g. "k_proj").
        index: which slice of the fused output dimension it fills.
    """

    fused: str
    part: str
    index: int


def load_weights_by_name(model: nn.Module, weights: Iterable[tuple[str, torch.Tensor]],
                         shards: list[StackedShard], shard_sizes: dict[str, list[int]],
                         skip: set[str] = frozenset()) -> set[str]:
    """Copy checkpoint tensors into ``model``; returns the checkpoint names consumed.

    Args:
        shards: how split checkpoint tensors map onto fused parameters.
        shard_sizes: fused module name -> output size of each shard, in order.
        skip: checkpoint names that are expected and ignored (tied lm_head, ...).
    """
    params = dict(model.named_parameters())
    consumed = set()
    for name, tensor in weights:
        if name in skip or name.endswith("rotary_emb.inv_freq"):
            consumed.add(name)
            continue
        target, rows = _locate(name, shards, shard_sizes)
        if target not in params:
            continue  # not ours: the caller reports unconsumed names
        param = params[target]
        destination = param.data if rows is None else param.data.narrow(0, *rows)
        if destination.shape != tensor.shape:
            raise ValueError(f"checkpoint tensor {name!r} has shape {tuple(tensor.shape)}, "
                             f"expected {tuple(destination.shape)}")
        destination.copy_(tensor)
        consumed.add(name)
    return consumed


def _locate(name: str, shards: list[StackedShard],
            shard_sizes: dict[str, list[int]]) -> tuple[str, tuple[int, int] | None]:
    for shard in shards:
        marker = f".{shard.part}."
        if marker in name:
            sizes = shard_sizes[shard.fused]
            start = sum(sizes[:shard.index])
            return name.replace(marker, f".{shard.fused}."), (start, sizes[shard.index])
    return name, None
