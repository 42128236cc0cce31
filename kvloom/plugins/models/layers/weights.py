"""Loading HF checkpoint tensors into fused parameters (qkv_proj, gate_up_proj) and into
tensor-parallel shards of them.

A checkpoint always holds full tensors. A parameter that a tensor-parallel layer
made carries a :class:`ShardSpec` (``param.shard_spec``) saying which slice of each
full tensor this rank keeps and where it goes; the loader consults it, so every
rank reads the same files. Parameters without one are copied whole, as before.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Iterable

import torch
from torch import nn

from kvloom.interfaces.loader import as_tensor


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


@dataclass(frozen=True, slots=True)
class PartShard:
    """Where this rank's share of one checkpoint tensor lands in a parameter.

    Along the split dimension the rank reads ``size`` entries from ``source_start``
    of a checkpoint tensor that has ``full_size`` there, and writes them at ``start``.

    Attributes:
        part: the checkpoint tensor's part name ("k_proj", "gate_proj"), None for a
            parameter that is not fused.
    """

    part: str | None
    full_size: int
    source_start: int
    start: int
    size: int


@dataclass(frozen=True, slots=True)
class ShardSpec:
    """How a parameter takes its slice of full checkpoint tensors.

    Attributes:
        dim: the split dimension, counted from the end (-2: a weight's rows, -1: its
            columns, or a bias), so one expert's tensor is sliced like the stacked
            parameter of all experts.
        parts: one per checkpoint tensor the parameter fuses, in their fused order.
    """

    dim: int
    parts: tuple[PartShard, ...]

    def pieces(self, part: str | None) -> list[PartShard]:
        """What to copy for the checkpoint tensor of ``part``; ``None`` on a fused
        parameter means a checkpoint that stores it fused (all parts back to back)."""
        if part is not None:
            found = [piece for piece in self.parts if piece.part == part]
            if not found:
                raise ValueError(f"no part {part!r} in a parameter fusing "
                                 f"{[piece.part for piece in self.parts]}")
            return found
        total = sum(piece.full_size for piece in self.parts)
        pieces, offset = [], 0
        for piece in self.parts:
            pieces.append(PartShard(None, total, offset + piece.source_start, piece.start,
                                    piece.size))
            offset += piece.full_size
        return pieces


def set_shard_spec(param: nn.Parameter, spec: ShardSpec) -> None:
    param.shard_spec = spec


def copy_shard(destination: torch.Tensor, tensor: torch.Tensor, spec: ShardSpec,
               part: str | None, name: str) -> None:
    """Copy this rank's slice of the full checkpoint tensor ``name`` into ``destination``.

    Only ``tensor.shape`` and ``tensor.narrow`` are used, so a lazily read tensor (a
    safetensors slice) that offers both would read only this rank's bytes.
    """
    pieces = spec.pieces(part)
    expected = list(destination.shape)
    expected[spec.dim] = pieces[0].full_size
    if tuple(tensor.shape) != tuple(expected):
        raise ValueError(f"checkpoint tensor {name!r} has shape {tuple(tensor.shape)}, "
                         f"expected {tuple(expected)}")
    for piece in pieces:
        destination.narrow(spec.dim, piece.start, piece.size).copy_(
            tensor.narrow(spec.dim, piece.source_start, piece.size))


def load_weights_by_name(model: nn.Module, weights: Iterable[tuple[str, torch.Tensor]],
                         shards: list[StackedShard], shard_sizes: dict[str, list[int]],
                         skip: set[str] = frozenset(),
                         filled: set[tuple[str, str | None]] | None = None) -> set[str]:
    """Copy checkpoint tensors into ``model``; returns the checkpoint names consumed.

    Args:
        shards: how split checkpoint tensors map onto fused parameters.
        shard_sizes: fused module name -> output size of each shard, in order, for
            fused parameters without a ShardSpec; one not named here is split into
            equal parts (gate_up_proj).
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
        part = None if shard is None else shard.part
        spec = getattr(param, "shard_spec", None)
        if spec is not None:
            copy_shard(param.data, tensor, spec, part, name)
        else:
            _copy_whole(param, tensor, name, shard, shards, shard_sizes)
        consumed.add(name)
        if filled is not None:
            filled.add((target, part))
    return consumed


def _copy_whole(param: nn.Parameter, tensor: torch.Tensor, name: str,
                shard: StackedShard | None, shards: list[StackedShard],
                shard_sizes: dict[str, list[int]]) -> None:
    rows = None if shard is None else _rows_of(shard, shards, shard_sizes, param)
    destination = param.data if rows is None else param.data.narrow(0, *rows)
    if destination.shape != tensor.shape:
        raise ValueError(f"checkpoint tensor {name!r} has shape {tuple(tensor.shape)}, "
                         f"expected {tuple(destination.shape)}")
    destination.copy_(as_tensor(tensor))


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
