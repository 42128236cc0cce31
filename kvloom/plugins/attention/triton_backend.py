"""The ``triton`` attention backend: paged attention kernels in Triton.

Runs on CUDA GPUs, and on the CPU under ``TRITON_INTERPRET=1`` (slowly; that is
how CI checks it). Decode-only steps use the split-KV decode kernel, whose
launch depends only on the batch size, so decode steps can be captured in CUDA
graphs; any step with a multi-token query uses the ragged prefill kernel.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import torch

from kvloom.hookspecs import hookimpl
from kvloom.interfaces.attention import (AttentionBackend, AttentionImpl, AttentionInputs,
                                         AttentionSpec)

KVLOOM_PLUGIN_API = ">=1.0,<2"  # the kvloom plugin API versions this module supports

MAX_HEAD_SIZE = 256
KV_TILE = 64          # keys per inner-loop iteration
MAX_DECODE_SPLITS = 16


@hookimpl
def register_attention_backends(register):
    register("triton", TritonAttentionBackend)


@dataclass(slots=True)
class TritonDecodeMetadata:
    """A decode-only step: one query token per sequence."""

    slot_mapping: torch.Tensor
    block_tables: torch.Tensor
    seq_lens: torch.Tensor
    num_splits: int
    partial_out: torch.Tensor
    partial_lse: torch.Tensor


@dataclass(slots=True)
class TritonPrefillMetadata:
    """A step with prefill chunks (decodes may be mixed in)."""

    slot_mapping: torch.Tensor
    block_tables: torch.Tensor
    seq_lens: torch.Tensor
    query_start_loc: torch.Tensor
    tile_seq: torch.Tensor
    tile_start: torch.Tensor
    block_q: int


def interpreter_enabled() -> bool:
    """Whether Triton runs kernels with its CPU interpreter (TRITON_INTERPRET=1)."""
    try:
        from triton import knobs
    except ImportError:  # triton < 3.4
        return False
    return bool(knobs.runtime.interpret)


class TritonAttentionBackend(AttentionBackend):
    name = "triton"
    supports_cuda_graphs = True

    def __init__(self) -> None:
        self.spec: AttentionSpec | None = None
        self._num_sms: int | None = None

    def validate(self, spec: AttentionSpec) -> list[str]:
        reasons = []
        try:
            import triton  # noqa: F401
        except ImportError:
            return ["the triton package is not installed"]
        if spec.device_type != "cuda" and not interpreter_enabled():
            reasons.append(f"needs a CUDA device (or TRITON_INTERPRET=1), got {spec.device_type}")
        if spec.device_type != "cuda" and spec.dtype == torch.bfloat16:
            # triton 3.6's interpreter returns garbage from tl.dot on bfloat16 inputs.
            reasons.append("bfloat16 needs a CUDA device: Triton's CPU interpreter "
                           "computes bfloat16 dot products wrongly")
        if spec.head_size > MAX_HEAD_SIZE:
            reasons.append(f"head size {spec.head_size} is above {MAX_HEAD_SIZE}")
        if spec.num_heads % spec.num_kv_heads:
            reasons.append("num_heads is not a multiple of num_kv_heads")
        if spec.dtype not in (torch.float32, torch.float16, torch.bfloat16):
            reasons.append(f"dtype {spec.dtype} is not supported")
        return reasons

    def kv_cache_shape(self, num_blocks: int, spec: AttentionSpec) -> tuple[int, ...]:
        return (2, num_blocks, spec.block_size, spec.num_kv_heads, spec.head_size)

    def make_impl(self, spec: AttentionSpec, scale: float) -> AttentionImpl:
        # The per-step metadata (decode split buffers) is shared by every layer, so
        # every layer, a drafter's included, must have the first layer's head shape.
        if self.spec is None:
            self.spec = spec
        elif (spec.num_heads, spec.head_size) != (self.spec.num_heads, self.spec.head_size):
            raise ValueError(
                f"triton attention: a layer with {spec.num_heads} heads of size "
                f"{spec.head_size} cannot share a step's metadata with layers of "
                f"{self.spec.num_heads} heads of size {self.spec.head_size}")
        return TritonAttention(scale)

    def build_metadata(self, inputs: AttentionInputs):
        if inputs.max_query_len == 1:
            return self.build_decode_metadata(inputs)
        return self._build_prefill_metadata(inputs)

    def build_decode_metadata(self, inputs: AttentionInputs) -> TritonDecodeMetadata:
        """Decode metadata; its tensors may be static buffers reused by CUDA graphs."""
        spec = self.spec
        num_seqs = inputs.seq_lens.shape[0]
        num_splits = self.num_decode_splits(num_seqs, inputs.seq_lens.device)
        device = inputs.seq_lens.device
        partial_out = torch.empty((num_seqs, spec.num_heads, num_splits, spec.head_size),
                                  dtype=torch.float32, device=device)
        partial_lse = torch.empty((num_seqs, spec.num_heads, num_splits),
                                  dtype=torch.float32, device=device)
        return TritonDecodeMetadata(inputs.slot_mapping, inputs.block_tables, inputs.seq_lens,
                                    num_splits, partial_out, partial_lse)

    def num_decode_splits(self, num_seqs: int, device: torch.device) -> int:
        """Enough programs to fill the GPU (a few per multiprocessor), at most 16 splits."""
        if device.type != "cuda":
            return 2  # exercise the split/reduce path in the interpreter
        if self._num_sms is None:
            self._num_sms = torch.cuda.get_device_properties(device).multi_processor_count
        programs = max(1, num_seqs * self.spec.num_kv_heads)
        return int(min(MAX_DECODE_SPLITS, max(1, -(-4 * self._num_sms // programs))))

    def _build_prefill_metadata(self, inputs: AttentionInputs) -> TritonPrefillMetadata:
        spec = self.spec
        group = spec.num_heads // spec.num_kv_heads
        block_q = max(1, 128 // (1 << (group - 1).bit_length()))
        query_start = inputs.query_start_loc_cpu.numpy()
        query_lens = np.diff(query_start)
        tiles_per_seq = -(-query_lens // block_q)
        tile_seq = np.repeat(np.arange(len(query_lens), dtype=np.int32), tiles_per_seq)
        first_tile = np.cumsum(tiles_per_seq) - tiles_per_seq
        tile_start = ((np.arange(len(tile_seq)) - first_tile[tile_seq]) * block_q).astype(np.int32)
        device = inputs.seq_lens.device
        return TritonPrefillMetadata(
            inputs.slot_mapping, inputs.block_tables, inputs.seq_lens, inputs.query_start_loc,
            torch.from_numpy(tile_seq).to(device, non_blocking=True),
            torch.from_numpy(tile_start).to(device, non_blocking=True), block_q)


class TritonAttention(AttentionImpl):
    def __init__(self, scale: float) -> None:
        self.scale = scale

    def forward(self, query, key, value, kv_cache, metadata):
        from kvloom.plugins.attention import triton_kernels as kernels

        kernels.write_kv_cache(key, value, kv_cache, metadata.slot_mapping)
        if not isinstance(metadata, TritonDecodeMetadata):
            return self.prefill(query, kv_cache, metadata)
        out = torch.empty_like(query)
        kernels.decode_attention(query, kv_cache, out, metadata.block_tables,
                                 metadata.seq_lens, self.scale, metadata.partial_out,
                                 metadata.partial_lse, metadata.num_splits, KV_TILE)
        return out

    def prefill(self, query, kv_cache, metadata: TritonPrefillMetadata):
        """Attention for a step with prefill chunks, the new keys already in the cache
        (the cuda_paged backend runs its prefill steps through this too)."""
        from kvloom.plugins.attention import triton_kernels as kernels

        out = torch.empty_like(query)
        kernels.prefill_attention(query, kv_cache, out, metadata.block_tables,
                                  metadata.seq_lens, metadata.query_start_loc,
                                  metadata.tile_seq, metadata.tile_start, self.scale,
                                  metadata.block_q, KV_TILE)
        return out
