"""The CPU platform: always available, float32 first, the torch reference attention."""

from __future__ import annotations

import torch

from kvloom.hookspecs import hookimpl
from kvloom.interfaces.platform import Platform

KVLOOM_PLUGIN_API = ">=1.0,<2"  # the kvloom plugin API versions this module supports

DEFAULT_CPU_KV_CACHE_BYTES = 4 << 30  # vLLM's CPU default KV space is 4 GiB too


@hookimpl
def register_platforms(register):
    register("cpu", CpuPlatform, priority=0)


class CpuPlatform(Platform):
    """The host itself. The Platform defaults are the CPU's: work is done when it is
    queued (events and synchronize wait for nothing), no pinned buffers, no graphs,
    and the KV budget is fixed rather than measured (no profiling run)."""

    name = "cpu"
    device_type = "cpu"

    def device(self) -> torch.device:
        return torch.device("cpu")

    def supported_dtypes(self) -> list[torch.dtype]:
        return [torch.float32, torch.bfloat16, torch.float16]

    def attention_candidates(self) -> list[str]:
        return ["torch"]

    def kv_cache_memory_bytes(self, requested_bytes: int | None, memory_fraction: float) -> int:
        return requested_bytes if requested_bytes is not None else DEFAULT_CPU_KV_CACHE_BYTES
