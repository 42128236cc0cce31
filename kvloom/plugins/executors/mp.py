"""``mp``: one process per tensor-parallel rank on this machine, each on its own
device (rank r on device r).

Workers are fresh interpreters (``python -c``), not ``multiprocessing`` children: a
forked child would inherit the engine's threads and CUDA state, and a spawned one
re-runs the user's script unless it sits under ``if __name__ == "__main__"``.
"""

from __future__ import annotations

import pickle
import subprocess
import sys
import time

from kvloom.hookspecs import hookimpl
from kvloom.interfaces.executor import Executor, WorkerLaunch

KVLOOM_PLUGIN_API = ">=1.1,<2"  # the kvloom plugin API versions this module supports

_STOP_WAIT_S = 5.0
_CHILD = "from kvloom.plugins.executors.mp import child_main; child_main()"


@hookimpl
def register_executors(register):
    register("mp", MultiprocessingExecutor)


class MultiprocessingExecutor(Executor):
    """Workers are child processes of the engine's process."""

    name = "mp"

    def __init__(self) -> None:
        self.processes: dict[int, subprocess.Popen] = {}

    def validate(self, world_size: int, num_devices: int | None) -> list[str]:
        if num_devices is not None and world_size > num_devices:
            return [f"tensor_parallel_size {world_size} needs {world_size} devices on this "
                    f"machine, which has {num_devices}"]
        return []

    def launch(self, launch: WorkerLaunch) -> None:
        for rank in range(1, launch.world_size):
            process = subprocess.Popen([sys.executable, "-c", _CHILD], stdin=subprocess.PIPE)
            # The launch description is the engine's own (its config, the rendezvous),
            # handed to its own child over a pipe: no client data is unpickled.
            process.stdin.write(pickle.dumps((launch, rank, rank)))
            process.stdin.close()
            self.processes[rank] = process

    def dead_workers(self) -> list[str]:
        return [f"rank {rank} (pid {process.pid}) exited with code {process.returncode}"
                for rank, process in self.processes.items() if process.poll() is not None]

    def shutdown(self) -> None:
        processes = list(self.processes.values())
        _wait_all(processes, _STOP_WAIT_S)  # they leave on the driver's stop message
        for process in processes:
            if process.poll() is None:
                process.terminate()
        _wait_all(processes, _STOP_WAIT_S)
        for process in processes:
            if process.poll() is None:
                process.kill()
                process.wait()
        self.processes.clear()


def _wait_all(processes: list[subprocess.Popen], seconds: float) -> None:
    """Wait until every process has exited or ``seconds`` have passed, in all."""
    deadline = time.monotonic() + seconds
    for process in processes:
        try:
            process.wait(max(0.0, deadline - time.monotonic()))
        except subprocess.TimeoutExpired:
            return


def child_main() -> None:
    """A worker process: read what to run from stdin, run it."""
    launch, rank, device_index = pickle.load(sys.stdin.buffer)
    launch.entrypoint(launch, rank, device_index)
