"""The reference paged attention, in plain PyTorch, on any device.

Correct for any mix of prefill, chunked prefill, prefix-cache hits and decode
over any block table; every faster backend is checked against it. It loops
over sequences in Python, so it is meant for CPUs, tests and debugging.

KV cache layout per layer: [2, num_blocks, block_size, num_kv_heads, head_size].
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.nn.functional as F

from kvloom.hookspecs import hookimpl
from kvloom.interfaces.attention import AttentionBackend, AttentionImpl, AttentionInputs, AttentionSpec

KVLOOM_PLUGIN_API = ">=1.0,<2"  # the kvloom plugin API versions this module supports


@hookimpl
def register_attention_backends(register):
    register("torch", TorchReferenceBackend)


@dataclass(slots=True)
class TorchAttentionMetadata:
    inputs: AttentionInputs
    query_start_loc: list[int]
    seq_lens: list[int]


class TorchReferenceBackend(AttentionBackend):
    name = "torch"

    def kv_cache_shape(self, num_blocks: int, spec: AttentionSpec) -> tuple[int, ...]:
        return (2, num_blocks, spec.block_size, spec.num_kv_heads, spec.head_size)

    def build_metadata(self, inputs: AttentionInputs) -> TorchAttentionMetadata:
        return TorchAttentionMetadata(inputs, inputs.query_start_loc_cpu.tolist(),
                                      inputs.seq_lens_cpu.tolist())

    def make_impl(self, spec: AttentionSpec, scale: float) -> AttentionImpl:
        return TorchReferenceAttention(spec, scale)


class TorchReferenceAttention(AttentionImpl):
    def __init__(self, spec: AttentionSpec, scale: float) -> None:
        self.spec = spec
        self.scale = scale
        self.num_queries_per_kv = spec.num_heads // spec.num_kv_heads

    def forward(self, query, key, value, kv_cache, metadata: TorchAttentionMetadata):
        write_kv_cache(kv_cache, key, value, metadata.inputs.slot_mapping)
        output = torch.empty_like(query)
        block_size = kv_cache.shape[2]
        block_tables = metadata.inputs.block_tables
        starts = metadata.query_start_loc
        for index, seq_len in enumerate(metadata.seq_lens):
            start, end = starts[index], starts[index + 1]
            keys, values = gather_kv(kv_cache, block_tables[index], seq_len, block_size)
            output[start:end] = self._attend(query[start:end], keys, values)
        return output

    def _attend(self, query: torch.Tensor, keys: torch.Tensor, values: torch.Tensor) -> torch.Tensor:
        query_len, seq_len = query.shape[0], keys.shape[0]
        if self.num_queries_per_kv > 1:
            keys = keys.repeat_interleave(self.num_queries_per_kv, dim=1)
            values = values.repeat_interleave(self.num_queries_per_kv, dim=1)
        # Query i sits at position seq_len - query_len + i and sees keys up to it.
        query_positions = torch.arange(seq_len - query_len, seq_len, device=query.device)
        key_positions = torch.arange(seq_len, device=query.device)
        mask = key_positions.unsqueeze(0) <= query_positions.unsqueeze(1)
        out = F.scaled_dot_product_attention(
            query.transpose(0, 1), keys.transpose(0, 1), values.transpose(0, 1),
            attn_mask=mask, scale=self.scale)
        return out.transpose(0, 1)


def write_kv_cache(kv_cache: torch.Tensor, key: torch.Tensor, value: torch.Tensor,
                   slot_mapping: torch.Tensor) -> None:
    """Store new keys/values at their slots (slot = block_id * block_size + offset);
    slot -1 (padding) writes nothing."""
    num_kv_heads, head_size = kv_cache.shape[-2:]
    keep = slot_mapping >= 0
    if not bool(keep.all()):
        slot_mapping, key, value = slot_mapping[keep], key[keep], value[keep]
    kv_cache[0].view(-1, num_kv_heads, head_size)[slot_mapping] = key.to(kv_cache.dtype)
    kv_cache[1].view(-1, num_kv_heads, head_size)[slot_mapping] = value.to(kv_cache.dtype)


def gather_kv(kv_cache: torch.Tensor, block_table: torch.Tensor, seq_len: int,
              block_size: int) -> tuple[torch.Tensor, torch.Tensor]:
    """The first ``seq_len`` keys and values of one sequence, contiguous."""
    num_blocks = -(-seq_len // block_size)
    blocks = block_table[:num_blocks].long()
    num_kv_heads, head_size = kv_cache.shape[-2:]
    keys = kv_cache[0, blocks].reshape(-1, num_kv_heads, head_size)[:seq_len]
    values = kv_cache[1, blocks].reshape(-1, num_kv_heads, head_size)[:seq_len]
    return keys, values
