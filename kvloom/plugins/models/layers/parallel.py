"""Tensor-parallel layers (Megatron-style) over a :class:`TensorParallelGroup`.

Every rank holds a slice of each sharded weight and the layers exchange through the
group only where the math needs it:

* column-parallel linear (``qkv_proj``, ``gate_up_proj``): each rank computes a slice
  of the output features, which stays split;
* row-parallel linear (``o_proj``, ``down_proj``): each rank multiplies its slice of
  the input features, the partial outputs are summed (all-reduce), the bias is added
  once after the sum;
* vocab-parallel embedding: each rank looks up the ids in its vocabulary slice
  (zeros for the others), then all-reduce;
* parallel lm_head: each rank computes the logits of its vocabulary slice, then
  all-gather along the vocabulary.

A column-parallel layer followed by a row-parallel one costs one all-reduce per
block, as in Megatron-LM and vLLM. With ``group.size == 1`` every layer is exactly
the layer it replaces (same parameter names and shapes, same kernels), so one device
computes what it did before tensor parallelism existed.

Each sharded parameter carries a :class:`~.weights.ShardSpec`: the loader copies this
rank's slice out of the full checkpoint tensors with it.
"""

from __future__ import annotations

from types import SimpleNamespace
from typing import Sequence

import torch
import torch.nn.functional as F
from torch import nn

from kvloom.interfaces.parallel import TensorParallelGroup
from kvloom.plugins.models.layers.linear import Linear, linear
from kvloom.plugins.models.layers.weights import PartShard, ShardSpec, set_shard_spec

SETTING = "tensor_parallel_size"  # the engine setting errors name, as vLLM spells it


def divide(value: int, parallel_size: int, what: str) -> int:
    """``value / tp``, refusing a remainder with the setting and the field named."""
    if value % parallel_size:
        raise ValueError(f"{SETTING}={parallel_size} must divide {what}={value}")
    return value // parallel_size


def split_part(part: str | None, full_size: int, parallel: TensorParallelGroup, what: str,
               start: int = 0) -> PartShard:
    """This rank's equal share of a ``full_size`` dimension, written at ``start``."""
    size = divide(full_size, parallel.size, what)
    return PartShard(part, full_size, parallel.rank * size, start, size)


def kv_heads_of(num_kv_heads: int, parallel: TensorParallelGroup) -> tuple[int, int]:
    """(how many, first) of the KV heads this rank holds.

    With fewer KV heads than ranks each rank keeps the one KV head its query heads
    read (a copy of it lives on ``tp / num_kv_heads`` ranks), as vLLM does.
    """
    if num_kv_heads % parallel.size and parallel.size % num_kv_heads:
        raise ValueError(f"{SETTING}={parallel.size} must divide num_key_value_heads="
                         f"{num_kv_heads} or be a multiple of it")
    count = max(1, num_kv_heads // parallel.size)
    return count, parallel.rank * num_kv_heads // parallel.size


def check_attention_heads(num_heads: int, num_kv_heads: int, parallel_size: int) -> None:
    """Refuse a tensor-parallel size the attention heads cannot be split by."""
    divide(num_heads, parallel_size, "num_attention_heads")
    kv_heads_of(num_kv_heads, SimpleNamespace(rank=0, size=parallel_size))


def _zero_padding(weight: torch.Tensor, num_real_rows: int) -> None:
    with torch.no_grad():
        weight[num_real_rows:].zero_()


def _shard_output(layer: nn.Linear, parts: Sequence[PartShard]) -> None:
    set_shard_spec(layer.weight, ShardSpec(-2, tuple(parts)))
    if layer.bias is not None:
        set_shard_spec(layer.bias, ShardSpec(-1, tuple(parts)))


class ColumnParallelLinear(Linear):
    """``Linear`` holding this rank's slice of the output features (and bias); the
    output stays split across ranks."""

    def __init__(self, input_size: int, output_size: int, parallel: TensorParallelGroup,
                 bias: bool = False, dtype: torch.dtype | None = None,
                 what: str = "output size") -> None:
        part = split_part(None, output_size, parallel, what)
        super().__init__(input_size, part.size, bias=bias, dtype=dtype)
        _shard_output(self, [part])


class MergedColumnParallelLinear(Linear):
    """Several column-parallel outputs fused in one GEMM (gate_up_proj): each part is
    split across ranks on its own, so a rank's output is [its gate slice, its up slice].

    Args:
        output_sizes: the full size of each part, in fused order.
        part_names: each part's checkpoint name ("gate_proj", "up_proj").
    """

    def __init__(self, input_size: int, output_sizes: Sequence[int],
                 part_names: Sequence[str], parallel: TensorParallelGroup,
                 bias: bool = False, dtype: torch.dtype | None = None,
                 what: str = "intermediate_size") -> None:
        parts, start = [], 0
        for name, size in zip(part_names, output_sizes, strict=True):
            parts.append(split_part(name, size, parallel, what, start))
            start += parts[-1].size
        super().__init__(input_size, start, bias=bias, dtype=dtype)
        _shard_output(self, parts)


class QKVParallelLinear(Linear):
    """The fused q, k, v projection of this rank's heads: num_heads / tp query heads
    and the KV heads they read (:func:`kv_heads_of`).

    Attributes:
        num_heads / num_kv_heads: this rank's head counts.
        q_size / kv_size: this rank's output features of q and of k (= v).
    """

    def __init__(self, hidden_size: int, head_size: int, num_heads: int, num_kv_heads: int,
                 parallel: TensorParallelGroup, bias: bool = False,
                 dtype: torch.dtype | None = None) -> None:
        q = split_part("q_proj", num_heads * head_size, parallel, "num_attention_heads")
        self.num_heads = q.size // head_size
        self.num_kv_heads, first_kv = kv_heads_of(num_kv_heads, parallel)
        self.q_size, self.kv_size = q.size, self.num_kv_heads * head_size
        full_kv, kv_start = num_kv_heads * head_size, first_kv * head_size
        k = PartShard("k_proj", full_kv, kv_start, q.size, self.kv_size)
        v = PartShard("v_proj", full_kv, kv_start, q.size + self.kv_size, self.kv_size)
        super().__init__(hidden_size, q.size + 2 * self.kv_size, bias=bias, dtype=dtype)
        _shard_output(self, [q, k, v])


class RowParallelLinear(Linear):
    """``Linear`` holding this rank's slice of the input features: partial outputs are
    summed over ranks, then the (replicated) bias is added once.

    Args:
        reduce_results: False leaves the partial sum for the caller to reduce, so a
            block that adds several row-parallel outputs (MoE experts and the shared
            expert) reduces once; such a layer may have no bias.
    """

    def __init__(self, input_size: int, output_size: int, parallel: TensorParallelGroup,
                 bias: bool = False, dtype: torch.dtype | None = None,
                 reduce_results: bool = True, what: str = "input size") -> None:
        if bias and not reduce_results:
            raise ValueError("a row-parallel layer whose caller reduces cannot add a bias")
        part = split_part(None, input_size, parallel, what)
        super().__init__(part.size, output_size, bias=bias, dtype=dtype)
        self.parallel = parallel
        self.reduce_results = reduce_results
        set_shard_spec(self.weight, ShardSpec(-1, (part,)))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if self.parallel.size == 1:
            return super().forward(x)  # the bias inside the GEMM, as on one device always
        out = linear(x, self.weight, None)
        if self.reduce_results:
            out = self.parallel.all_reduce(out)
        return out if self.bias is None else out + self.bias


def vocab_shard(vocab_size: int, parallel: TensorParallelGroup) -> tuple[PartShard, int]:
    """This rank's contiguous vocabulary slice, and the rows every rank holds: the
    vocabulary padded up to a multiple of tp, so all slices have one shape (the
    padding rows, at the end of the last slices, match no id and are trimmed from
    the logits)."""
    rows = -(-vocab_size // parallel.size)
    start = min(parallel.rank * rows, vocab_size)
    return PartShard(None, vocab_size, start, 0, min(rows, vocab_size - start)), rows


class VocabParallelEmbedding(nn.Embedding):
    """``nn.Embedding`` holding this rank's vocabulary slice: ids outside it embed to
    zeros, and the sum over ranks is every id's row.

    Attributes:
        vocab_size: the model's vocabulary; ``num_embeddings`` is the slice, padded.
    """

    def __init__(self, vocab_size: int, embedding_dim: int, parallel: TensorParallelGroup,
                 dtype: torch.dtype | None = None) -> None:
        shard, rows = vocab_shard(vocab_size, parallel)
        super().__init__(rows, embedding_dim, dtype=dtype)
        self.parallel = parallel
        self.vocab_size = vocab_size
        self.vocab_start, self.num_real_rows = shard.source_start, shard.size
        _zero_padding(self.weight, shard.size)
        set_shard_spec(self.weight, ShardSpec(-2, (shard,)))

    def forward(self, input_ids: torch.Tensor) -> torch.Tensor:
        if self.parallel.size == 1:
            return super().forward(input_ids)
        local_ids = input_ids - self.vocab_start
        outside = (local_ids < 0) | (local_ids >= self.num_real_rows)
        embedded = F.embedding(local_ids.masked_fill(outside, 0), self.weight)
        # Exact: each id's row comes from one rank, the others add zeros.
        return self.parallel.all_reduce(embedded.masked_fill_(outside.unsqueeze(-1), 0))


class ParallelLMHead(Linear):
    """The output projection over this rank's vocabulary slice; the logits of all
    slices are gathered in rank (= vocabulary) order and the padding trimmed.

    Shares its slicing with :class:`VocabParallelEmbedding`, so tied embeddings
    share one parameter per rank (``tie_to``).
    """

    def __init__(self, hidden_size: int, vocab_size: int, parallel: TensorParallelGroup,
                 dtype: torch.dtype | None = None) -> None:
        shard, rows = vocab_shard(vocab_size, parallel)
        super().__init__(hidden_size, rows, bias=False, dtype=dtype)
        self.parallel = parallel
        self.vocab_size = vocab_size
        _zero_padding(self.weight, shard.size)
        set_shard_spec(self.weight, ShardSpec(-2, (shard,)))

    def tie_to(self, embedding: VocabParallelEmbedding) -> None:
        self.weight = embedding.weight

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if self.parallel.size == 1:
            return super().forward(x)
        logits = self.parallel.all_gather(linear(x, self.weight, None), dim=-1)
        if logits.shape[-1] == self.vocab_size:
            return logits
        return logits[..., :self.vocab_size].contiguous()
