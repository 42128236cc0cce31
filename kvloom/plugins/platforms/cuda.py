"""The CUDA platform: NVIDIA GPUs, bf16/fp16, KV cache sized from free memory."""

from __future__ import annotations

from contextlib import AbstractContextManager
from typing import Any

import torch

from kvloom.hookspecs import hookimpl
from kvloom.interfaces.platform import DeviceEvent, DeviceGraph, Platform

KVLOOM_PLUGIN_API = ">=1.0,<2"  # the kvloom plugin API versions this module supports


@hookimpl
def register_platforms(register):
    register("cuda", CudaPlatform, priority=10)


class CudaPlatform(Platform):
    """One CUDA device per process (``cuda:0``, or the rank's device under tensor
    parallelism; ranks talk through NCCL).

    The KV cache gets ``gpu_memory_utilization`` of the device's total memory
    minus what the weights, the profiling forward pass's peak activations and
    non-torch allocations (CUDA context, NCCL, other processes) take.
    """

    name = "cuda"
    device_type = "cuda"
    supports_cuda_graphs = True
    uses_pinned_memory = True
    needs_profile_run = True  # kv_cache_memory_bytes subtracts max_memory_allocated()
    distributed_backend = "nccl"

    def __init__(self) -> None:
        self.index = 0

    def validate(self) -> list[str]:
        if not torch.cuda.is_available():
            return ["torch.cuda.is_available() is False (no CUDA device or CPU-only torch)"]
        return []

    def device(self) -> torch.device:
        return torch.device("cuda", self.index)

    def device_count(self) -> int | None:
        return torch.cuda.device_count()

    def use_device(self, index: int) -> None:
        self.index = index
        torch.cuda.set_device(index)  # NCCL and the allocator act on the current device

    def supported_dtypes(self) -> list[torch.dtype]:
        if torch.cuda.is_bf16_supported():
            return [torch.bfloat16, torch.float16, torch.float32]
        return [torch.float16, torch.float32]

    def attention_candidates(self) -> list[str]:
        # Measured on an H200 (docs/gpu.md): FlashAttention-3 prefills 3.4x faster than
        # Triton and decodes as fast or faster; it needs Hopper and vLLM's FA3 library,
        # else Triton. cuda_paged is never picked unasked: it compiles at first use.
        return ["flash_attn", "triton", "torch"]

    def kv_cache_memory_bytes(self, requested_bytes: int | None, memory_fraction: float) -> int:
        if requested_bytes is not None:
            return requested_bytes
        torch.cuda.synchronize()
        free, total = torch.cuda.mem_get_info()
        peak_torch = torch.cuda.max_memory_allocated()
        non_torch = max(0, (total - free) - torch.cuda.memory_reserved())
        return max(0, int(total * memory_fraction) - peak_torch - non_torch)

    def seed_everything(self, seed: int) -> None:
        torch.manual_seed(seed)
        torch.cuda.manual_seed_all(seed)

    def synchronize(self) -> None:
        torch.cuda.synchronize()

    def new_event(self) -> DeviceEvent:
        return torch.cuda.Event()

    def new_graph(self) -> DeviceGraph:
        return torch.cuda.CUDAGraph()

    def new_graph_pool(self) -> Any:
        return torch.cuda.graph_pool_handle()

    def capture_graph(self, graph: DeviceGraph, pool: Any) -> AbstractContextManager[Any]:
        return torch.cuda.graph(graph, pool=pool)
