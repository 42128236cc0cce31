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
                         skip: set[str] = frozenset(),
                         filled: set[tuple[str, str | None]] | None = None) -> set[str]:
    """Copy checkpoint tensors into ``model``; returns the checkpoint names consumed.

    Args:
        shards: how split checkpoint tensors map onto fused parameters.
        shard_sizes: fused module name -> output size of each shard, in order; a fused
            module not named here is split into equal parts (gate_up_proj).
        skip: checkpoint names that are expected and ignored (tied lm_head, ...).
        filled: if given, receives (parameter name, shard part or None) for every
            tensor copied, for ``require_filled``.
    """
    params = dict(model.named_parameters())
    consumed = set()
    for name, tensor in weights:
        if name in skip or name.endswith("rotary_emb.inv_freq"):
            consumed.add(name)
            continue
        target, shard = _locate(name, shards)
        if target not in params:
            continue  # not ours: the caller reports unconsumed names
        param = params[target]
        rows = None if shard is None else _rows_of(shard, shards, shard_sizes, param)
        destination = param.data if rows is None else param.data.narrow(0, *rows)
        if destination.shape != tensor.shape:
            raise ValueError(f"checkpoint tensor {name!r} has shape {tuple(tensor.shape)}, "
                             f"expected {tuple(destination.shape)}")
        destination.copy_(tensor)
        consumed.add(name)
        if filled is not None:
            filled.add((target, None if shard is None else shard.part))
    return consumed


def require_filled(model: nn.Module, filled: set[tuple[str, str | None]],
                   shards: list[StackedShard]) -> None:
    """Refuse a checkpoint that left any parameter (or part of a fused one) unwritten:
    it would run on whatever memory the parameter was allocated with."""
    for name, _ in model.named_parameters():
        if (name, None) in filled:
            continue  # written whole (a checkpoint that stores it fused)
        module_name = name.split(".")[-2] if "." in name else ""
        parts = [shard.part for shard in shards if shard.fused == module_name] or [None]
        for part in parts:
            if (name, part) not in filled:
                expected = name if part is None else name.replace(f".{module_name}.",
                                                                    f".{part}.")
                raise ValueError(f"checkpoint has no tensor {expected!r}")


def _locate(name: str, shards: list[StackedShard]) -> tuple[str, StackedShard | None]:
    """The parameter name a checkpoint tensor goes to, and the shard it fills if any."""
    for shard in shards:
        marker = f".{shard.part}."
        if marker in name:
            return name.replace(marker, f".{shard.fused}."), shard
    return name, None


def _rows_of(shard: StackedShard, shards: list[StackedShard],
             shard_sizes: dict[str, list[int]], param: torch.Tensor) -> tuple[int, int]:
    """(first row, row count) of ``shard`` in its fused parameter."""
    sizes = shard_sizes.get(shard.fused)
    if sizes is None:
        num_parts = sum(1 for other in shards if other.fused == shard.fused)
        sizes = [param.shape[0] // num_parts] * num_parts
    return sum(sizes[:shard.index]), sizes[shard.index]
