"""The ``sdpa_batched`` attention backend: the whole batch in one SDPA call, on any device.

kvloom's torch reference backend loops over sequences in Python, one
``scaled_dot_product_attention`` call each. This backend gathers every
sequence's keys and values out of the paged cache into a padded
[num_seqs, max_seq_len] layout and the queries into [num_seqs, max_query_len],
then attends once with a boolean mask. It needs nothing but torch, so it runs
wherever torch does (CPU, CUDA, MPS, XPU, ...).

The price of padding: a step costs num_seqs * max_query_len * max_seq_len,
so one long prefill chunk next to many decodes wastes work on the decodes'
padded query rows. Backends built for throughput split such batches.

KV cache layout per layer (chosen by this backend, to show that a backend may):
[num_blocks, 2, block_size, num_kv_heads, head_size], i.e. a block's keys and
values sit next to each other.
"""

from __future__ import annotations

from dataclasses import dataclass, field

import torch
import torch.nn.functional as F
from kvloom.interfaces.attention import AttentionBackend, AttentionImpl, AttentionInputs, AttentionSpec

SUPPORTED_DTYPES = (torch.float32, torch.float16, torch.bfloat16)


@dataclass(slots=True)
class SdpaBatchedMetadata:
    """One step's padded layout, built once and shared by every layer.

    Attributes:
        token_seqs / token_rows: int64 [num_tokens], where each new token sits in
            the padded query layout (sequence, row).
        max_query_len: width of the padded query layout.
        key_positions: int64 [num_seqs, max_seq_len], the position each padded
            key slot reads (clamped into the sequence, so padding reads real data).
        block_tables: int32 [num_seqs, max_blocks].
        mask: bool [num_seqs, 1, max_query_len, max_seq_len], True where a query
            may attend to a key.
        slot_mapping: int64 [num_tokens], where this step's keys/values go.
    """

    token_seqs: torch.Tensor
    token_rows: torch.Tensor
    max_query_len: int
    key_positions: torch.Tensor
    block_tables: torch.Tensor
    mask: torch.Tensor
    slot_mapping: torch.Tensor
    # build_metadata is not told the block size; the first layer learns it from
    # its cache and the (block, offset) gather indices are kept for the others.
    _key_slots: dict[int, tuple[torch.Tensor, torch.Tensor]] = field(default_factory=dict)

    def key_slots(self, block_size: int) -> tuple[torch.Tensor, torch.Tensor]:
        """(block ids, offsets) [num_seqs, max_seq_len] of every padded key slot."""
        if block_size not in self._key_slots:
            columns = self.key_positions // block_size
            blocks = self.block_tables.gather(1, columns).long()
            self._key_slots[block_size] = (blocks, self.key_positions % block_size)
        return self._key_slots[block_size]


class SdpaBatchedBackend(AttentionBackend):
    """Paged attention as one padded ``scaled_dot_product_attention`` call per layer."""

    name = "sdpa_batched"

    def validate(self, spec: AttentionSpec) -> list[str]:
        reasons = []
        if spec.num_heads % spec.num_kv_heads:
            reasons.append(f"num_heads ({spec.num_heads}) is not a multiple of "
                           f"num_kv_heads ({spec.num_kv_heads})")
        if spec.dtype not in SUPPORTED_DTYPES:
            reasons.append(f"dtype {spec.dtype} is not one of float32, float16, bfloat16")
        return reasons

    def kv_cache_shape(self, num_blocks: int, spec: AttentionSpec) -> tuple[int, ...]:
        return (num_blocks, 2, spec.block_size, spec.num_kv_heads, spec.head_size)

    def build_metadata(self, inputs: AttentionInputs) -> SdpaBatchedMetadata:
        device = inputs.seq_lens.device
        num_seqs, num_tokens = inputs.num_seqs, inputs.num_tokens
        query_lens_cpu = inputs.query_start_loc_cpu.diff()
        # The host copy gives the sizes without waiting on the device.
        max_query_len = max(int(query_lens_cpu.max()) if num_seqs else 0, 1)
        max_seq_len = max(inputs.max_seq_len, 1)

        query_lens = inputs.query_start_loc.diff().long()
        seq_lens = inputs.seq_lens.long()
        token_seqs = torch.repeat_interleave(torch.arange(num_seqs, device=device), query_lens,
                                             output_size=num_tokens)
        token_rows = (torch.arange(num_tokens, device=device)
                      - inputs.query_start_loc.long()[token_seqs])

        keys = torch.arange(max_seq_len, device=device)
        # Query row i of a segment of q new tokens in a sequence of s sits at s - q + i.
        query_positions = (seq_lens - query_lens).unsqueeze(1) + torch.arange(
            max_query_len, device=device)
        mask = ((keys.view(1, 1, -1) <= query_positions.unsqueeze(2))
                & (keys.view(1, 1, -1) < seq_lens.view(-1, 1, 1)))
        # A row that sees nothing (a padding sequence of length 0) would come out
        # of the softmax as NaN; let it see slot 0 instead, its output is dropped.
        mask[..., 0] |= ~mask.any(dim=-1)
        key_positions = torch.minimum(keys.unsqueeze(0), (seq_lens - 1).clamp(min=0).unsqueeze(1))
        return SdpaBatchedMetadata(token_seqs, token_rows, max_query_len, key_positions,
                                   inputs.block_tables, mask.unsqueeze(1), inputs.slot_mapping)

    def make_impl(self, spec: AttentionSpec, scale: float) -> AttentionImpl:
        return SdpaBatchedAttention(spec, scale)


class SdpaBatchedAttention(AttentionImpl):
    def __init__(self, spec: AttentionSpec, scale: float) -> None:
        self.num_heads = spec.num_heads
        self.num_kv_heads = spec.num_kv_heads
        self.scale = scale

    def forward(self, query, key, value, kv_cache, metadata: SdpaBatchedMetadata):
        write_kv(kv_cache, key, value, metadata.slot_mapping)
        num_seqs = metadata.key_positions.shape[0]
        padded_query = query.new_zeros(num_seqs, metadata.max_query_len, *query.shape[1:])
        padded_query[metadata.token_seqs, metadata.token_rows] = query
        blocks, offsets = metadata.key_slots(kv_cache.shape[2])
        # Advanced indices around a slice: [num_seqs, max_seq_len, 2, kv_heads, head_size].
        gathered = kv_cache[blocks, :, offsets].to(query.dtype)
        keys = self._expand_kv_heads(gathered[:, :, 0])
        values = self._expand_kv_heads(gathered[:, :, 1])
        out = F.scaled_dot_product_attention(padded_query.transpose(1, 2), keys, values,
                                             attn_mask=metadata.mask, scale=self.scale)
        return out.transpose(1, 2)[metadata.token_seqs, metadata.token_rows]

    def _expand_kv_heads(self, kv: torch.Tensor) -> torch.Tensor:
        """[seqs, len, kv_heads, d] -> [seqs, heads, len, d]; query head h reads kv head h // group."""
        kv = kv.transpose(1, 2)
        group = self.num_heads // self.num_kv_heads
        if group == 1:
            return kv
        seqs, kv_heads, length, head_size = kv.shape
        return (kv.unsqueeze(2).expand(seqs, kv_heads, group, length, head_size)
                .reshape(seqs, self.num_heads, length, head_size))


def write_kv(kv_cache: torch.Tensor, key: torch.Tensor, value: torch.Tensor,
             slot_mapping: torch.Tensor) -> None:
    """Store the step's keys/values at slot = block * block_size + offset; slot < 0 is padding."""
    keep = slot_mapping >= 0
    slots, key, value = slot_mapping[keep], key[keep], value[keep]
    block_size = kv_cache.shape[2]
    blocks, offsets = slots // block_size, slots % block_size
    kv_cache[blocks, 0, offsets] = key.to(kv_cache.dtype)
    kv_cache[blocks, 1, offsets] = value.to(kv_cache.dtype)
