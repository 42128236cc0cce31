"""``nice``: tensor-parallel workers at the lowest CPU priority (nice 19), for a shared
machine whose other jobs should come first.

An executor only starts and watches processes; each runs kvloom's own worker main
(``launch.entrypoint``), which builds its slice of the model and follows the driver.
"""

from __future__ import annotations

import pickle
import subprocess
import sys

from kvloom.interfaces.executor import Executor, WorkerLaunch

_CHILD = ("import pickle, sys; launch, rank = pickle.load(sys.stdin.buffer); "
          "launch.entrypoint(launch, rank, rank)")
_STOP_WAIT_S = 5.0


class NiceExecutor(Executor):
    name = "nice"

    def __init__(self) -> None:
        self.processes: dict[int, subprocess.Popen] = {}

    def validate(self, world_size: int, num_devices: int | None) -> list[str]:
        if num_devices is not None and world_size > num_devices:
            return [f"{world_size} ranks need {world_size} devices here, not {num_devices}"]
        return []

    def launch(self, launch: WorkerLaunch) -> None:
        for rank in range(1, launch.world_size):
            process = subprocess.Popen(["nice", "-n", "19", sys.executable, "-c", _CHILD],
                                       stdin=subprocess.PIPE)
            process.stdin.write(pickle.dumps((launch, rank)))  # our own launch, to our child
            process.stdin.close()
            self.processes[rank] = process

    def dead_workers(self) -> list[str]:
        return [f"rank {rank} (pid {process.pid}) exited with code {process.returncode}"
                for rank, process in self.processes.items() if process.poll() is not None]

    def shutdown(self) -> None:
        for process in self.processes.values():
            try:
                process.wait(_STOP_WAIT_S)  # the driver has told them to stop
            except subprocess.TimeoutExpired:
                process.kill()
                process.wait()
        self.processes.clear()
