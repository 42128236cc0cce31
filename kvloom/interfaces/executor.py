"""What an executor plugin implements: starting and watching the processes that hold
the tensor-parallel ranks of a model.

Rank 0, the *driver*, runs in the engine's own process: it schedules, samples and
talks to users. Ranks 1 to ``size - 1`` are *workers*. An executor starts each
worker by calling ``launch.entrypoint(launch, rank, device_index)`` in a new process (a
``multiprocessing`` child, a Ray actor on any node of a cluster, a job of some other
launcher) and reports workers that have died. Everything after that is the core's:
each worker builds its slice of the model, joins ``torch.distributed`` through the
rendezvous in ``launch``, and runs every step the driver broadcasts, in lockstep.
So an executor holds no model code and no step loop, and a third-party launcher is
a small class.
"""

from __future__ import annotations

from abc import ABC, abstractmethod
from dataclasses import dataclass
from typing import Any, Callable


@dataclass(frozen=True, slots=True)
class WorkerLaunch:
    """Everything a worker needs to start; picklable, and holds no request data.

    Attributes:
        entrypoint: ``entrypoint(launch, rank, device_index)``, the core's worker main;
            an executor calls it with this object, the worker's rank and the index of
            the device it should use on its machine (its rank, for an executor that
            runs every rank on one machine; 0 for a process that sees one device). It
            returns when the driver stops the workers, and raises if the worker fails.
        world_size: the tensor-parallel size (driver included).
        rendezvous_host / rendezvous_port: where the driver's ``torch.distributed``
            store listens; workers on other machines must reach it.
        engine_config: the engine's configuration, as ``EngineConfig.model_dump()``.
        plugin_allowlist: the plugins the driver loads (None: every installed one);
            a worker loads the same, through entry points.
    """

    entrypoint: Callable[["WorkerLaunch", int, int], None]
    world_size: int
    rendezvous_host: str
    rendezvous_port: int
    engine_config: dict[str, Any]
    plugin_allowlist: tuple[str, ...] | None = None


class Executor(ABC):
    """Starts the worker processes of ranks ``1 .. world_size - 1`` and watches them.

    Attributes:
        name: the registered name, for messages.
    """

    name: str = "unnamed"

    def validate(self, world_size: int, num_devices: int | None) -> list[str]:
        """Why this executor cannot run ``world_size`` ranks here (empty: it can).

        ``num_devices`` is how many devices the platform sees on this machine (None:
        unknown, e.g. the CPU); an executor that places every rank on this machine
        refuses more ranks than devices.
        """
        return []

    def rendezvous_host(self) -> str:
        """The address of this machine that every worker can reach (the driver's
        ``torch.distributed`` store listens there). Default: workers on this machine."""
        return "127.0.0.1"

    @abstractmethod
    def launch(self, launch: WorkerLaunch) -> None:
        """Start ``launch.entrypoint(launch, rank, device_index)`` for every rank from 1
        to ``world_size - 1``, each in its own process, and return without waiting for
        them (the core waits for each worker to report in, and watches
        :meth:`dead_workers` meanwhile)."""

    @abstractmethod
    def dead_workers(self) -> list[str]:
        """A line per worker that has exited or is unreachable (``"rank 1 exited with
        code -9"``); empty while every worker runs. Called before every step, so it
        must be cheap."""

    @abstractmethod
    def shutdown(self) -> None:
        """Stop every worker still running and release what the executor holds
        (processes, actors, a cluster it started). Safe to call twice."""
