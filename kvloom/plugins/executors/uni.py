"""``uni``: the whole model in the engine's own process (one rank), the default."""

from __future__ import annotations

from kvloom.hookspecs import hookimpl
from kvloom.interfaces.executor import Executor, WorkerLaunch

KVLOOM_PLUGIN_API = ">=1.1,<2"  # the kvloom plugin API versions this module supports


@hookimpl
def register_executors(register):
    register("uni", UniExecutor)


class UniExecutor(Executor):
    """Rank 0 is the only rank: nothing to start or watch."""

    name = "uni"

    def validate(self, world_size: int, num_devices: int | None) -> list[str]:
        if world_size > 1:
            return [f"runs one rank; tensor_parallel_size {world_size} needs "
                    "distributed_executor_backend mp or ray"]
        return []

    def launch(self, launch: WorkerLaunch) -> None:
        raise RuntimeError("the uni executor runs no workers")

    def dead_workers(self) -> list[str]:
        return []

    def shutdown(self) -> None:
        pass
