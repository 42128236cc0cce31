"""What a platform plugin implements: the device, its dtypes and its memory."""

from __future__ import annotations

from abc import ABC, abstractmethod

import torch


class Platform(ABC):
    """A hardware platform (cpu, cuda, a third-party accelerator)."""

    name: str = "unnamed"
    device_type: str = "cpu"

    def validate(self) -> list[str]:
        """Reasons this platform cannot run on this machine; empty when it can."""
        return []

    @abstractmethod
    def device(self) -> torch.device:
        """The torch device models and caches live on."""

    @abstractmethod
    def supported_dtypes(self) -> list[torch.dtype]:
        """Dtypes models may run in, preferred first."""

    @abstractmethod
    def attention_candidates(self) -> list[str]:
        """Attention backend names to try, best first, for ``attention: auto``."""

    @abstractmethod
    def kv_cache_memory_bytes(self, requested_bytes: int | None, memory_fraction: float) -> int:
        """Bytes to give the KV cache.

        Args:
            requested_bytes: an explicit budget from the config, or None.
            memory_fraction: ``cache.gpu_memory_utilization``.
        """

    def seed_everything(self, seed: int) -> None:
        torch.manual_seed(seed)

    def synchronize(self) -> None:
        """Wait for queued device work (no-op on the CPU)."""
