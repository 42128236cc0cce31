"""``ray``: each tensor-parallel worker is a Ray actor, so the ranks can span the
nodes of a Ray cluster. Ray is the cluster manager; this executor only asks it for
room and starts the workers there.

* **Cluster.** ``parallel.ray_address`` names one to join (``"auto"``,
  ``"host:6379"``, ``"ray://host:10001"``; ``"local"`` starts a new one). Without it
  the executor uses the connection this process opened already, else a cluster
  found on this machine (``RAY_ADDRESS``, ``ray start``), else starts a local one
  for as long as the engine runs. It ends only the connection (and the cluster) it
  opened itself.
* **Placement.** A placement group holds one bundle per worker (ranks 1 to N - 1;
  rank 0 runs in the engine's process): ``{"CPU": 1}``, with ``"GPU": 1`` unless the
  platform is the CPU. Strategy PACK: as few nodes as the bundles fit on, since
  every layer's all-reduce crosses each node boundary, but more when one is not
  enough. A local cluster started here leaves out the engine's own GPU.
* **Rendezvous.** The driver's store listens at this node's address as Ray sees it,
  which every node of the cluster reaches.
* **Failure detection.** A worker's ``run`` call returns only when the driver stops
  it, so one that has finished before shutdown is a worker that died;
  ``ray.wait(timeout=0)`` finds them, cheaply enough for every step.

Ray is imported when an executor method runs, never with this module: listing the
plugins needs no Ray.
"""

from __future__ import annotations

import logging
import os
import socket
import time
import uuid
from contextlib import contextmanager
from dataclasses import dataclass
from typing import Any, Iterator

from kvloom.hookspecs import hookimpl
from kvloom.interfaces.executor import Executor, WorkerLaunch

KVLOOM_PLUGIN_API = ">=1.1,<2"  # the kvloom plugin API versions this module supports

logger = logging.getLogger(__name__)

INSTALL_HINT = 'pip install "kvloom[ray]"'
_STOP_WAIT_S = 5.0  # workers leave on the driver's stop message; then they are killed
_CONNECT_TIMEOUT_S = 5.0
_PLACEMENT_LOG_EVERY_S = 30.0
_MAX_REASON_CHARS = 400


class RayClusterError(RuntimeError):
    """The Ray cluster cannot be joined, or cannot hold the workers."""


@hookimpl
def register_executors(register):
    register("ray", RayExecutor)


class KvloomWorker:
    """The process of one tensor-parallel rank (made a Ray actor class at launch, so
    this module imports without Ray)."""

    def where(self) -> tuple[int, str]:
        """This process's id and its node's address."""
        import ray

        return os.getpid(), ray.util.get_node_ip_address()

    def run(self, launch: WorkerLaunch, rank: int) -> None:
        # Ray shows a GPU actor only the GPU it was given: device 0 of its process.
        launch.entrypoint(launch, rank, 0)


@dataclass(slots=True)
class _Worker:
    rank: int
    name: str
    actor: Any
    where: Any  # ObjectRef of KvloomWorker.where: (pid, node address)
    run: Any  # ObjectRef of KvloomWorker.run: ready once the worker has stopped
    exit: str | None = None  # why run() finished, once it has


class RayExecutor(Executor):
    """Workers are Ray actors in a placement group, one bundle per rank.

    Attributes:
        placement_timeout_s: how long to wait for the cluster to make room for the
            workers (an autoscaling cluster adds nodes in minutes); a local cluster
            started here fails at once when it is too small.
    """

    name = "ray"
    placement_timeout_s: float = 300.0

    def __init__(self) -> None:
        self.workers: list[_Worker] = []
        self.placement_group: Any = None
        self.owns_connection = False  # this executor called ray.init()
        self.started_cluster = False  # ... and it started a local cluster
        self.excluded_gpu: str | None = None  # the engine's GPU, left out of that cluster

    def validate(self, world_size: int, num_devices: int | None) -> list[str]:
        # num_devices counts this machine's devices; Ray places workers on any node.
        try:
            import ray  # noqa: F401
        except ImportError:
            return [f"Ray is not installed: {INSTALL_HINT}"]
        return []

    def rendezvous_host(self) -> str:
        import ray

        return ray.util.get_node_ip_address()

    def launch(self, launch: WorkerLaunch) -> None:
        parallel = launch.engine_config["parallel"]
        use_gpu = _wants_gpus(str(launch.engine_config.get("platform", "auto")))
        try:
            self._join_cluster(parallel.get("ray_address"), launch.world_size, use_gpu)
            self._place_bundles(launch.world_size, use_gpu)
            self._start_workers(launch, use_gpu)
        except BaseException:
            self.shutdown()  # nothing left behind: no actors, bundles or cluster
            raise

    def dead_workers(self) -> list[str]:
        if not self.workers:
            return []
        import ray

        if not ray.is_initialized():
            return [f"rank {w.rank} (Ray actor {w.name}) is unreachable: Ray was shut down"
                    for w in self.workers]
        running = [w for w in self.workers if w.exit is None]
        if running:
            done, _ = ray.wait([w.run for w in running], num_returns=len(running), timeout=0,
                               fetch_local=False)
            for worker in running:
                if worker.run in done:
                    worker.exit = _exit_reason(worker.run)
        return [f"rank {w.rank} (Ray actor {w.name}{_where(w)}) exited: {w.exit}"
                for w in self.workers if w.exit is not None]

    def shutdown(self) -> None:
        if not (self.workers or self.placement_group is not None or self.owns_connection):
            return  # nothing started, or shut down already
        import ray

        if ray.is_initialized():
            runs = [w.run for w in self.workers]
            if runs:
                ray.wait(runs, num_returns=len(runs), timeout=_STOP_WAIT_S, fetch_local=False)
            for worker in self.workers:
                _quietly(ray.kill, worker.actor, no_restart=True)
            if self.placement_group is not None:
                from ray.util.placement_group import remove_placement_group

                _quietly(remove_placement_group, self.placement_group)
            if self.owns_connection:
                ray.shutdown()  # a local cluster it started goes with it
        self.workers = []
        self.placement_group = None
        self.owns_connection = self.started_cluster = False
        self.excluded_gpu = None

    def _join_cluster(self, address: str | None, world_size: int, use_gpu: bool) -> None:
        import ray

        if ray.is_initialized():
            if address:
                logger.warning("Ray is connected already; parallel.ray_address %r is not used",
                               address)
            return
        if address and address != "local":
            _check_reachable(address)
            try:
                ray.init(address=address, log_to_driver=True)
            except Exception as error:
                raise RayClusterError(
                    f"cannot join the Ray cluster at parallel.ray_address {address!r}: "
                    f"{_one_line(error)}") from error
            self.owns_connection = True
            return
        try:
            self._start_local_cluster(address, world_size, use_gpu)
        except ValueError as error:
            # Ray's default (no address) joins the cluster named by RAY_ADDRESS or left
            # by `ray start` on this machine, and refuses a local cluster's options then.
            if "existing cluster" not in str(error):
                raise
            ray.init(log_to_driver=True)
            self.owns_connection = True

    def _start_local_cluster(self, address: str | None, world_size: int,
                             use_gpu: bool) -> None:
        import ray

        # CPUs are counted, not pinned: a small machine still places every worker.
        options = dict(address=address, include_dashboard=False, log_to_driver=True,
                       num_cpus=max(os.cpu_count() or 1, world_size - 1))
        visible = _visible_gpus() if use_gpu else []
        if visible:
            # Rank 0 uses the engine's first visible GPU, which Ray does not know about:
            # hand Ray the others, or a worker would share it.
            with _environment("CUDA_VISIBLE_DEVICES", ",".join(visible[1:])):
                ray.init(**options)
            self.excluded_gpu = visible[0]
        else:
            ray.init(**options)
        self.owns_connection = self.started_cluster = True
        logger.info("started a local Ray cluster: %s", _resources(ray.cluster_resources()))

    def _place_bundles(self, world_size: int, use_gpu: bool) -> None:
        import ray
        from ray.util.placement_group import placement_group

        num_workers = world_size - 1
        bundle = {"CPU": 1, "GPU": 1} if use_gpu else {"CPU": 1}
        shortfall = _shortfall(ray.cluster_resources(), bundle, num_workers)
        if shortfall and self.started_cluster:  # a local cluster never grows
            raise RayClusterError(self._placement_message(world_size, use_gpu, shortfall))
        self.placement_group = placement_group([dict(bundle)] * num_workers, strategy="PACK",
                                               name=f"kvloom-tp-{uuid.uuid4().hex[:8]}")
        deadline = time.monotonic() + self.placement_timeout_s
        while not self.placement_group.wait(
                max(0.0, min(_PLACEMENT_LOG_EVERY_S, deadline - time.monotonic()))):
            if time.monotonic() >= deadline:
                raise RayClusterError(self._placement_message(
                    world_size, use_gpu, _shortfall(ray.cluster_resources(), bundle,
                                                    num_workers), waited=True))
            logger.info("waiting for the Ray cluster to make room for %d workers (%s)",
                        num_workers, _resources(ray.available_resources()))

    def _placement_message(self, world_size: int, use_gpu: bool, shortfall: str,
                           waited: bool = False) -> str:
        import ray

        device = "GPU" if use_gpu else "CPU"
        has = ray.cluster_resources().get(device, 0)
        workers = f"{world_size - 1} worker{'s' if world_size > 2 else ''}"
        message = (f"the Ray cluster has {has:g} {device}s (free now: "
                   f"{_resources(ray.available_resources())}); tensor_parallel_size "
                   f"{world_size} needs {workers} with a {device} each (rank 0 runs in the "
                   "engine's process)")
        if self.excluded_gpu is not None:
            message += f"; the engine's own GPU {self.excluded_gpu} is not lent to Ray"
        if waited:
            message += (f"; Ray could not place them within {self.placement_timeout_s:g} s"
                        f"{' (short: ' + shortfall + ')' if shortfall else ''}")
        return message + ": add nodes, or lower tensor_parallel_size"

    def _start_workers(self, launch: WorkerLaunch, use_gpu: bool) -> None:
        import ray
        from ray.util.scheduling_strategies import PlacementGroupSchedulingStrategy

        actor_class = ray.remote(KvloomWorker)
        token = uuid.uuid4().hex[:8]
        for rank in range(1, launch.world_size):
            name = f"kvloom-rank{rank}-{token}"
            actor = actor_class.options(
                name=name, num_cpus=1, num_gpus=1 if use_gpu else 0, max_restarts=0,
                scheduling_strategy=PlacementGroupSchedulingStrategy(
                    self.placement_group, placement_group_bundle_index=rank - 1),
            ).remote()
            # Calls on an actor run in order: where() first, then run() until stop.
            self.workers.append(_Worker(rank, name, actor, actor.where.remote(),
                                        actor.run.remote(launch, rank)))


def _wants_gpus(platform: str) -> bool:
    """Whether workers need a GPU: the CPU platform never; ``auto`` (or a plugin's
    platform) when the engine's process sees CUDA, as its own rank 0 does."""
    if platform == "cpu":
        return False
    if platform == "cuda":
        return True
    import torch

    return torch.cuda.is_available()


def _visible_gpus() -> list[str]:
    """The GPUs this process may use, as CUDA_VISIBLE_DEVICES names them."""
    import torch

    visible = os.environ.get("CUDA_VISIBLE_DEVICES")
    if visible is not None:
        return [device.strip() for device in visible.split(",") if device.strip()]
    return [str(index) for index in range(torch.cuda.device_count())]


@contextmanager
def _environment(name: str, value: str) -> Iterator[None]:
    """Set an environment variable for the processes started meanwhile."""
    old = os.environ.get(name)
    os.environ[name] = value
    try:
        yield
    finally:
        if old is None:
            os.environ.pop(name, None)
        else:
            os.environ[name] = old


def _check_reachable(address: str) -> None:
    """Fail at once when nothing listens at ``host:port`` (Ray itself retries a
    missing cluster for minutes)."""
    if address == "auto":
        return
    host, _, port = address.removeprefix("ray://").rpartition(":")
    if not host or not port.isdigit():
        return  # not host:port: Ray says what is wrong with it
    try:
        socket.create_connection((host.strip("[]"), int(port)), _CONNECT_TIMEOUT_S).close()
    except OSError as error:
        raise RayClusterError(
            f"no Ray cluster answers at parallel.ray_address {address!r} ({error}); start "
            "one (`ray start --head`) or correct the address") from error


def _shortfall(total: dict[str, float], bundle: dict[str, float], count: int) -> str:
    """What the cluster lacks for ``count`` bundles, in all (empty: nothing)."""
    missing = {name: amount * count - total.get(name, 0) for name, amount in bundle.items()}
    return ", ".join(f"{amount:g} {name}" for name, amount in missing.items() if amount > 0)


def _resources(resources: dict[str, float]) -> str:
    shown = [f"{resources[name]:g} {name}" for name in ("CPU", "GPU") if name in resources]
    return ", ".join(shown) or "no CPUs or GPUs"


def _exit_reason(run: Any) -> str:
    import ray

    try:
        ray.get(run, timeout=0)
    except ray.exceptions.RayTaskError as error:  # run() raised: the worker's own error
        cause = error.cause if isinstance(error.cause, BaseException) else error
        return _one_line(cause)
    except Exception as error:  # the actor's process died, or its node
        return _one_line(error)
    return "run() returned before the engine stopped it"


def _where(worker: _Worker) -> str:
    import ray

    try:
        pid, node = ray.get(worker.where, timeout=0)
    except Exception:  # died before it answered
        return ""
    return f", pid {pid} on {node}"


def _one_line(error: BaseException) -> str:
    text = " ".join(f"{type(error).__name__}: {error}".split())
    return text if len(text) <= _MAX_REASON_CHARS else text[:_MAX_REASON_CHARS - 3] + "..."


def _quietly(function, *args, **kwargs) -> None:
    try:
        function(*args, **kwargs)
    except Exception as error:  # shutting down: report, and release the rest
        logger.warning("Ray executor shutdown: %s failed: %s", function.__name__, error)
