"""The ``cuda_paged`` attention backend: our own CUDA C++ paged decode attention.

Decode-only steps run ``csrc/paged_attention_kernels.cu``: one thread block per
(sequence, KV head, split) that packs the query heads sharing the KV head (each key
and value row is read once per KV head), in one pass when the batch fills the GPU
and split over the sequence with a merge kernel when it does not (flash-decoding).
The split count depends only on the batch size, so decode steps can be captured in
CUDA graphs. New keys and values go into the cache through its own write kernel.

Steps with prefill chunks use the Triton backend's ragged prefill kernel on the same
cache layout (this plugin's decode is its own; its prefill is Triton's).

The kernels are compiled at first use (``cuda_paged_build``): CUDA, nvcc and ninja
are needed on the machine that runs it; ``validate`` says which is missing.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import torch

from kvloom.hookspecs import hookimpl
from kvloom.interfaces.attention import (AttentionBackend, AttentionImpl, AttentionInputs,
                                         AttentionSpec)
from kvloom.plugins.attention.triton_backend import TritonAttentionBackend

KVLOOM_PLUGIN_API = ">=1.0,<2"  # the kvloom plugin API versions this module supports

HEAD_SIZES = (64, 128, 256)  # the head sizes the kernels are instantiated for
MAX_PACKED_HEADS = 8          # query heads per thread block (the mma rows)
MAX_DECODE_SPLITS = 64
BLOCKS_PER_SM = 3             # decode thread blocks resident per SM (head size 128: shared memory)
# Decode grids of several waves: with about one, the last partial wave leaves SMs idle
# (64 x 4096 ran 1.3 waves at 74% of copy bandwidth).
TARGET_WAVES = 4


@hookimpl
def register_attention_backends(register):
    register("cuda_paged", CudaPagedBackend)


@dataclass(slots=True)
class CudaPagedDecodeMetadata:
    """A decode-only step; its tensors may be the static buffers of a CUDA graph."""

    slot_mapping: torch.Tensor
    block_tables: torch.Tensor
    seq_lens: torch.Tensor
    num_splits: int
    partial_out: torch.Tensor
    partial_lse: torch.Tensor


class CudaPagedBackend(AttentionBackend):
    name = "cuda_paged"
    supports_cuda_graphs = True

    def __init__(self) -> None:
        self.spec: AttentionSpec | None = None
        self.prefill = TritonAttentionBackend()
        self._num_sms: int | None = None

    def validate(self, spec: AttentionSpec) -> list[str]:
        from kvloom.plugins.attention.cuda_paged_build import missing_build_tools

        reasons = []
        if spec.device_type != "cuda":
            reasons.append(f"needs a CUDA device, got {spec.device_type}")
        elif not torch.cuda.is_available():
            reasons.append("torch.cuda.is_available() is False")
        if spec.dtype not in (torch.float16, torch.bfloat16):
            reasons.append(f"dtype {spec.dtype} is not supported (float16 and bfloat16 are)")
        if spec.head_size not in HEAD_SIZES:
            reasons.append(f"head size {spec.head_size} is not one of {HEAD_SIZES}")
        if spec.num_heads % spec.num_kv_heads:
            reasons.append("num_heads is not a multiple of num_kv_heads")
        try:
            import triton  # noqa: F401
        except ImportError:
            reasons.append("prefill steps run the triton backend's kernel: the triton "
                           "package is not installed")
        if spec.device_type == "cuda":
            reasons += missing_build_tools()
        return reasons

    def kv_cache_shape(self, num_blocks: int, spec: AttentionSpec) -> tuple[int, ...]:
        return (2, num_blocks, spec.block_size, spec.num_kv_heads, spec.head_size)

    def make_impl(self, spec: AttentionSpec, scale: float) -> AttentionImpl:
        from kvloom.plugins.attention.cuda_paged_build import load_kernels

        # The decode split buffers are shared by every layer, as the prefill
        # backend's metadata is: every layer must have the first layer's head shape.
        prefill = self.prefill.make_impl(spec, scale)
        self.spec = self.prefill.spec
        device = torch.device("cuda", torch.cuda.current_device())
        return CudaPagedAttention(scale, prefill, load_kernels(device))

    def build_metadata(self, inputs: AttentionInputs) -> Any:
        if inputs.max_query_len > 1:
            return self.prefill.build_metadata(inputs)
        num_seqs = inputs.seq_lens.shape[0]
        num_splits = self.num_decode_splits(num_seqs)
        device = inputs.seq_lens.device
        spec = self.spec
        partial_out = torch.empty((num_seqs, spec.num_heads, num_splits, spec.head_size),
                                  dtype=torch.float32, device=device)
        partial_lse = torch.empty((num_seqs, spec.num_heads, num_splits),
                                  dtype=torch.float32, device=device)
        return CudaPagedDecodeMetadata(inputs.slot_mapping, inputs.block_tables,
                                       inputs.seq_lens, num_splits, partial_out, partial_lse)

    def num_decode_splits(self, num_seqs: int) -> int:
        """Enough thread blocks for TARGET_WAVES waves of the GPU, from the batch size alone
        (a captured graph's grid may depend on nothing else)."""
        if self._num_sms is None:
            self._num_sms = torch.cuda.get_device_properties(
                torch.cuda.current_device()).multi_processor_count
        group = self.spec.num_heads // self.spec.num_kv_heads
        head_chunks = -(-group // MAX_PACKED_HEADS)
        programs = max(1, num_seqs * self.spec.num_kv_heads * head_chunks)
        wanted = TARGET_WAVES * BLOCKS_PER_SM * self._num_sms
        return int(min(MAX_DECODE_SPLITS, max(1, -(-wanted // programs))))


class CudaPagedAttention(AttentionImpl):
    def __init__(self, scale: float, prefill: AttentionImpl, kernels: Any) -> None:
        self.scale = scale
        self.prefill = prefill
        self.kernels = kernels

    def forward(self, query, key, value, kv_cache, metadata):
        self.kernels.write_kv_cache(key, value, kv_cache, metadata.slot_mapping)
        if not isinstance(metadata, CudaPagedDecodeMetadata):
            return self.prefill.prefill(query, kv_cache, metadata)
        out = torch.empty(query.shape, dtype=query.dtype, device=query.device)
        self.kernels.paged_decode(out, query, kv_cache, metadata.block_tables,
                                  metadata.seq_lens, metadata.partial_out, metadata.partial_lse,
                                  metadata.num_splits, self.scale)
        return out
