"""What a platform plugin implements: the device, its dtypes, its memory, and the
device operations the worker needs (synchronising, events, graph capture).

The platform is the worker's only device oracle: the model runner and the engine
builder ask it, and never test a device's name or call ``torch.cuda`` themselves.
Every capability below has a default that is right for a device that runs in step
with the host (the CPU), so a platform that predates a capability keeps working,
only without it.
"""

from __future__ import annotations

from abc import ABC, abstractmethod
from contextlib import AbstractContextManager
from typing import Any, Protocol

import torch


class DeviceEvent(Protocol):
    """A marker in the device's queue of work; ``torch.cuda.Event`` is one."""

    def record(self) -> None:
        """Mark the point the work queued so far has reached."""

    def synchronize(self) -> None:
        """Wait until the work queued before the last ``record`` is done."""


class DeviceGraph(Protocol):
    """Device work captured once and replayed; ``torch.cuda.CUDAGraph`` is one."""

    def replay(self) -> None:
        """Run the captured work again, on the tensors it was captured with."""


class SynchronizingEvent:
    """The default :class:`DeviceEvent`: waiting on it waits for all of the platform's
    queued work (``Platform.synchronize``).

    Correct on any device and free on a synchronous one; a platform with real events
    returns those instead, so that waiting does not also wait for work queued later.
    """

    def __init__(self, platform: Platform) -> None:
        self._platform = platform

    def record(self) -> None:
        pass  # synchronize() waits for everything, this point included

    def synchronize(self) -> None:
        self._platform.synchronize()


class Platform(ABC):
    """A hardware platform (cpu, cuda, a third-party accelerator).

    Attributes:
        name: the registered name, for messages.
        device_type: the ``torch.device`` type of :meth:`device` (``"cpu"``, ``"cuda"``).
        uses_pinned_memory: the worker allocates its host staging buffers (step inputs,
            sampled tokens, grammar bitmasks) in page-locked memory, so its
            ``non_blocking`` copies overlap device work. Set it only where
            ``torch.zeros(..., pin_memory=True)`` works on this machine.
        supports_cuda_graphs: :meth:`new_graph`, :meth:`new_graph_pool` and
            :meth:`capture_graph` work, so decode steps may be captured once and
            replayed; they are when the attention backend supports them too
            (``AttentionBackend.supports_cuda_graphs``) and ``enforce_eager`` is off.
        needs_profile_run: ``kv_cache_memory_bytes(None, ...)`` subtracts the peak
            memory the allocator has seen, so the engine runs the largest step the
            scheduler can produce (``ModelRunner.profile_run``) before asking.
        distributed_backend: the ``torch.distributed`` backend tensor-parallel ranks
            on this platform's devices talk through (``"gloo"``, ``"nccl"``).
    """

    name: str = "unnamed"
    device_type: str = "cpu"
    uses_pinned_memory: bool = False
    supports_cuda_graphs: bool = False
    needs_profile_run: bool = False
    distributed_backend: str = "gloo"

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

    def device_count(self) -> int | None:
        """How many of this platform's devices this machine has (None: not counted,
        as for the CPU, where every rank shares the one device)."""
        return None

    def use_device(self, index: int) -> None:
        """Make :meth:`device` this machine's ``index``-th device, for the process of
        one tensor-parallel rank (called before anything is built; index 0 is what a
        single-device engine uses). Default: there is one device, nothing to do."""

    def synchronize(self) -> None:
        """Wait for queued device work (no-op on the CPU)."""

    def new_event(self) -> DeviceEvent:
        """An event to ``record()`` after queueing work and ``synchronize()`` on later.

        The worker records one after its asynchronous copies to and from the host and
        waits on it before reading or rewriting the host buffers. The default waits
        for everything through :meth:`synchronize`: right on any device, but an
        asynchronous platform should return its own events, which let later work
        (the next step) run on while the host waits.
        """
        return SynchronizingEvent(self)

    def new_graph(self) -> DeviceGraph:
        """An empty graph for :meth:`capture_graph` (when ``supports_cuda_graphs``)."""
        raise NotImplementedError(self._no_graphs())

    def new_graph_pool(self) -> Any:
        """A memory pool handle that graphs captured with it share (when
        ``supports_cuda_graphs``); graphs captured largest first reuse its memory."""
        raise NotImplementedError(self._no_graphs())

    def capture_graph(self, graph: DeviceGraph, pool: Any) -> AbstractContextManager[Any]:
        """A context manager that records the device work queued inside it into ``graph``,
        allocating from ``pool`` (when ``supports_cuda_graphs``)."""
        raise NotImplementedError(self._no_graphs())

    def _no_graphs(self) -> str:
        return (f"platform {self.name!r} does not capture graphs (supports_cuda_graphs is "
                f"{self.supports_cuda_graphs}); override new_graph, new_graph_pool and "
                "capture_graph to support them")
