"""A tensor-parallel worker's main: build this rank's slice of the model, join the
driver, then run every step the driver sends until it says stop.

An executor calls :func:`run_worker` in a fresh process. A worker holds no request
state: each step arrives as the tokens, positions and block tables of its batch,
and the worker runs the forward pass (whose collectives need every rank) while the
driver samples. A failure before the worker has joined is written to the store for
the driver to report; one after makes the driver's next collective fail.
"""

from __future__ import annotations

import logging
import os
import threading
import time

import torch.distributed as dist

from kvloom.config import EngineConfig
from kvloom.distributed import messages
from kvloom.distributed.driver import STEP_TIMEOUT, control_group
from kvloom.distributed.group import TorchDistributedGroup
from kvloom.interfaces.executor import WorkerLaunch

logger = logging.getLogger(__name__)


def run_worker(launch: WorkerLaunch, rank: int, device_index: int) -> None:
    """Serve as tensor-parallel rank ``rank`` until the driver stops the workers."""
    _exit_with_parent()
    store = dist.TCPStore(launch.rendezvous_host, launch.rendezvous_port, launch.world_size,
                          is_master=False)
    try:
        runner, shard, config = _build(launch, rank, device_index)
        store.set(f"built/{rank}", "1")
        dist.init_process_group(shard.platform.distributed_backend,
                                store=dist.PrefixStore("pg", store), rank=rank,
                                world_size=launch.world_size, timeout=STEP_TIMEOUT)
        control = control_group(shard.platform.distributed_backend)
        _prepare_caches(config, shard, runner, control)
    except BaseException as error:
        # The operator's own settings or files went wrong: the message names them.
        store.set(f"error/{rank}", " ".join(f"{type(error).__name__}: {error}".split()))
        raise
    try:
        _serve(runner, control)
    finally:
        dist.destroy_process_group()


def _build(launch: WorkerLaunch, rank: int, device_index: int):
    from kvloom.engine.builder import build_runner, resolve_scheduler_limits
    from kvloom.engine.model_shard import build_model_shard, select_platform
    from kvloom.plugin_manager import make_plugin_manager
    from kvloom.registry import Registries

    config = EngineConfig.model_validate(launch.engine_config)
    registries = Registries(make_plugin_manager(
        list(launch.plugin_allowlist) if launch.plugin_allowlist is not None else None))
    platform = select_platform(config, registries)
    platform.use_device(device_index)
    shard = build_model_shard(config, registries, platform,
                              TorchDistributedGroup(rank, launch.world_size))
    limits = resolve_scheduler_limits(config, shard.max_model_len)
    return build_runner(config, registries, shard, limits), shard, config


def _prepare_caches(config: EngineConfig, shard, runner, control) -> None:
    from kvloom.engine.builder import prepare_kv_caches, resolve_scheduler_limits

    limits = resolve_scheduler_limits(config, shard.max_model_len)
    prepare_kv_caches(config, shard, runner, limits, [],
                      lambda value: messages.agree_on_minimum(value, control))


def _serve(runner, control) -> None:
    while True:
        kind, scheduled = messages.decode(messages.broadcast_bytes(None, control))
        if kind == messages.STOP:
            return
        runner.run_forward(scheduled)


def _exit_with_parent() -> None:
    """End this process if the one that started it dies (no orphaned workers even
    when the engine is killed outright and never says stop)."""
    parent = os.getppid()

    def watch() -> None:
        while os.getppid() == parent:
            time.sleep(1.0)
        os._exit(1)

    threading.Thread(target=watch, name="kvloom-parent-watch", daemon=True).start()
