"""The driver's side of tensor parallelism: it starts the workers through the
executor, waits for each to build its slice of the model, joins them in
``torch.distributed``, sends every step, and stops them.

Start-up goes through a ``TCPStore`` the driver hosts: a worker writes
``built/RANK`` when its slice is loaded, or ``error/RANK`` with the reason before it
exits. The driver waits for every ``built`` key while asking the executor for dead
workers, so a worker that fails at start is an error naming it, never a hang; only
then does anyone enter a collective.
"""

from __future__ import annotations

import datetime
import logging
import time

import torch.distributed as dist

from kvloom.config import EngineConfig
from kvloom.distributed import messages
from kvloom.distributed.group import TorchDistributedGroup
from kvloom.interfaces.executor import Executor, WorkerLaunch
from kvloom.interfaces.platform import Platform
from kvloom.step.scheduler_output import SchedulerOutput

logger = logging.getLogger(__name__)

# Each worker loads its slice of the checkpoint first; a large model on a slow disk
# takes minutes, so the wait is long, but a worker that dies ends it at once.
START_TIMEOUT_S = 1800.0
_POLL_S = 0.05
# The control group waits between steps for as long as the engine is idle.
_IDLE_FOREVER = datetime.timedelta(days=365)
# The model's collectives: no step takes this long; a rank stuck longer is gone.
STEP_TIMEOUT = datetime.timedelta(minutes=10)


class WorkerFailedError(RuntimeError):
    """A tensor-parallel worker failed to start or died: the engine cannot go on."""


class DistributedWorkers:
    """Ranks 1 .. world_size - 1, seen from rank 0."""

    def __init__(self, executor: Executor, store: dist.TCPStore, world_size: int,
                 backend: str) -> None:
        self.executor = executor
        self.store = store
        self.world_size = world_size
        self.backend = backend
        self.group = TorchDistributedGroup(0, world_size)
        self.control: dist.ProcessGroup | None = None
        self.failure: str | None = None
        # Workers are told to stop only from their step loop: elsewhere (building, a
        # start-up collective, mid-step) a stop message would meet another collective.
        self.serving = False
        self.stop_requested = True
        self._stopped = False

    @classmethod
    def launch(cls, executor: Executor, config: EngineConfig, platform: Platform,
               plugin_allowlist: tuple[str, ...] | None) -> "DistributedWorkers":
        from kvloom.distributed.worker import run_worker

        world_size = config.parallel.tensor_parallel_size
        if dist.is_initialized():
            raise RuntimeError("torch.distributed is already initialised in this process; "
                               "an engine with tensor_parallel_size > 1 forms its own "
                               "process group (one such engine per process)")
        host = executor.rendezvous_host()
        store = dist.TCPStore(host, 0, world_size, is_master=True, wait_for_workers=False,
                              timeout=datetime.timedelta(seconds=START_TIMEOUT_S))
        workers = cls(executor, store, world_size, platform.distributed_backend)
        logger.info("starting %d tensor-parallel workers with executor %r (rendezvous %s:%d)",
                    world_size - 1, executor.name, host, store.port)
        try:
            executor.launch(WorkerLaunch(run_worker, world_size, host, store.port,
                                         config.model_dump(), plugin_allowlist))
        except BaseException:
            executor.shutdown()  # whatever it started before failing
            raise
        return workers

    def join(self, timeout_s: float = START_TIMEOUT_S) -> None:
        """Wait until every worker has built its slice, then form the process groups."""
        self._wait_for("built", timeout_s)
        dist.init_process_group(self.backend, store=dist.PrefixStore("pg", self.store),
                                rank=0, world_size=self.world_size, timeout=STEP_TIMEOUT)
        self.control = control_group(self.backend)

    def _wait_for(self, key: str, timeout_s: float) -> None:
        deadline = time.monotonic() + timeout_s
        pending = list(range(1, self.world_size))
        while pending:
            for rank in list(pending):
                if self.store.check([f"error/{rank}"]):
                    self._fail(f"tensor-parallel worker {rank} failed to start: "
                               f"{self.store.get(f'error/{rank}').decode()}")
                if self.store.check([f"{key}/{rank}"]):
                    pending.remove(rank)
            dead = self.executor.dead_workers()
            if dead and pending:
                self._fail(f"tensor-parallel workers died while starting: {'; '.join(dead)}")
            if pending and time.monotonic() > deadline:
                self._fail(f"tensor-parallel workers {pending} did not start within "
                           f"{timeout_s:.0f} s")
            if pending:
                time.sleep(_POLL_S)

    def _fail(self, message: str) -> None:
        self.failure = message
        raise WorkerFailedError(message)

    def agree_on_minimum(self, value: int) -> int:
        """The KV blocks every rank can hold; the workers go to their step loop next."""
        agreed = messages.agree_on_minimum(value, self.control)
        self.serving = True
        return agreed

    def send_step(self, scheduler_output: SchedulerOutput) -> None:
        """Every worker runs this step's forward pass alongside the driver."""
        self.check_alive()
        try:
            messages.broadcast_bytes(messages.encode_step(scheduler_output.scheduled),
                                     self.control)
        except Exception as error:  # a worker's socket closed mid-broadcast
            self.diagnose()
            raise WorkerFailedError(self.failure or "sending the step to the workers "
                                    f"failed: {error}") from error

    def check_alive(self) -> None:
        """Raise WorkerFailedError if a worker has died (now or before)."""
        if self.failure is not None or self._note_dead():
            raise WorkerFailedError(self.failure)

    def diagnose(self, wait_s: float = 3.0) -> str | None:
        """After a collective failed: which worker died, if one did. A killed worker's
        sockets close before its exit is visible, so wait a little for the executor to
        see it."""
        deadline = time.monotonic() + wait_s
        while self.failure is None and not self._note_dead() and time.monotonic() < deadline:
            time.sleep(_POLL_S)
        return self.failure

    def _note_dead(self) -> bool:
        dead = self.executor.dead_workers()
        if dead:
            self.failure = f"tensor-parallel workers died: {'; '.join(dead)}"
        return bool(dead)

    def shutdown(self) -> None:
        """Tell live workers to stop, then have the executor end every process."""
        if self._stopped:
            return
        self._stopped = True
        if (self.serving and self.stop_requested and self.failure is None
                and not self.executor.dead_workers()):
            try:
                messages.broadcast_bytes(messages.encode_stop(), self.control)
            except Exception as error:
                logger.warning("telling the workers to stop failed: %s", error)
        self.executor.shutdown()
        if dist.is_initialized():
            dist.destroy_process_group()


def control_group(backend: str) -> dist.ProcessGroup | None:
    """The group steps are sent over: gloo, which waits as long as the engine idles.
    On CPU that is a second gloo group (the model's own may time out at its default)."""
    return dist.new_group(backend="gloo", timeout=_IDLE_FOREVER)
