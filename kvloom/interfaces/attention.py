"""What an attention backend plugin implements.

The model runner describes each step's ragged batch with
:class:`AttentionInputs`; the backend turns it into its own metadata once per
step and every attention layer calls :meth:`AttentionImpl.forward` with it.

The batch is a concatenation of ``num_seqs`` query segments. Segment ``i``
holds the last ``query_lens[i]`` tokens of a sequence whose total length
(cached context plus these new tokens) is ``seq_lens[i]``. Decode segments have
one token; prefill and chunked-prefill segments have more. Earlier context
(a previous chunk, a prefix-cache hit) is read from the paged KV cache through
``block_tables``.

Contract: ``forward`` first writes the step's new keys and values into the
cache at ``slot_mapping`` for *all* tokens, then attends. Requests that share a
prefix block scheduled in the same step rely on that order.
"""

from __future__ import annotations

from abc import ABC, abstractmethod
from dataclasses import dataclass
from typing import Any

import torch


@dataclass(slots=True)
class AttentionSpec:
    """The shape of one model's attention, used to validate and size a backend."""

    num_heads: int
    num_kv_heads: int
    head_size: int
    dtype: torch.dtype
    block_size: int
    device_type: str


@dataclass(slots=True)
class AttentionInputs:
    """One step's batch layout, built by the model runner.

    Attributes:
        query_start_loc: int32 [num_seqs + 1], prefix sums of query lengths (device).
        seq_lens: int32 [num_seqs], context + new tokens per sequence (device).
        block_tables: int32 [num_seqs, max_blocks], padded with 0 (device).
        slot_mapping: int64 [num_tokens], cache slot of each new token (device).
        query_start_loc_cpu / seq_lens_cpu: the same on the host, for backends
            that plan on the CPU.
        max_query_len / max_seq_len: maxima over the batch.
        num_decode_tokens: how many segments are single-token decodes.
    """

    query_start_loc: torch.Tensor
    seq_lens: torch.Tensor
    block_tables: torch.Tensor
    slot_mapping: torch.Tensor
    query_start_loc_cpu: torch.Tensor
    seq_lens_cpu: torch.Tensor
    max_query_len: int
    max_seq_len: int
    num_decode_tokens: int

    @property
    def num_seqs(self) -> int:
        return self.seq_lens_cpu.shape[0]

    @property
    def num_tokens(self) -> int:
        return self.slot_mapping.shape[0]


class AttentionImpl(ABC):
    """Attention for one layer; built by the backend for each layer."""

    @abstractmethod
    def forward(
        self,
        query: torch.Tensor,
        key: torch.Tensor,
        value: torch.Tensor,
        kv_cache: torch.Tensor,
        metadata: Any,
    ) -> torch.Tensor:
        """Write key/value into ``kv_cache`` and attend.

        Args:
            query: [num_tokens, num_heads, head_size].
            key / value: [num_tokens, num_kv_heads, head_size].
            kv_cache: this layer's cache, shaped by ``kv_cache_shape``.
            metadata: what ``build_metadata`` returned for this step.

        Returns:
            [num_tokens, num_heads, head_size].
        """


class AttentionBackend(ABC):
    """A registered attention backend. Construct cheaply; import heavy deps lazily.

    Attributes:
        name: the registered name, for messages.
        supports_cuda_graphs: decode steps through this backend may be captured once
            and replayed with new inputs. The backend promises that the metadata
            ``build_metadata`` returns for the runner's static input buffers reads
            every per-step value (sequence lengths, block tables, slots) from those
            tensors rather than baking it in, and that ``forward``'s kernel launches
            depend only on the batch size. Graphs are used only when the platform
            supports them too (``Platform.supports_cuda_graphs``).
    """

    name: str = "unnamed"
    supports_cuda_graphs: bool = False

    def validate(self, spec: AttentionSpec) -> list[str]:
        """Reasons this backend cannot run ``spec``; empty when it can."""
        return []

    @abstractmethod
    def kv_cache_shape(self, num_blocks: int, spec: AttentionSpec) -> tuple[int, ...]:
        """Shape of one layer's KV cache tensor."""

    @abstractmethod
    def build_metadata(self, inputs: AttentionInputs) -> Any:
        """Per-step metadata shared by every layer."""

    @abstractmethod
    def make_impl(self, spec: AttentionSpec, scale: float) -> AttentionImpl:
        """Attention implementation for one layer."""
