"""Tensor parallelism through the engine, on the CPU over gloo: the ``mp`` executor's
ranks give the tokens of one rank and of HF transformers, with prefix caching,
chunked prefill and preemption at work; a dead worker fails its requests, turns the
engine unhealthy and leaves no process behind; bad settings fail naming them.

Each engine with tensor_parallel_size N starts N - 1 Python processes (a few seconds
each on a small machine), so the cases share engines where they can.
"""

from __future__ import annotations

import dataclasses
import os
import pickle
import signal
import subprocess
import sys
import time

import pytest
from worker_processes import assert_exited

from kvloom import LLM, SamplingParams, hookimpl, make_plugin_manager
from kvloom.distributed.driver import WorkerFailedError
from kvloom.interfaces.executor import Executor
from kvloom.testing.checkpoints import (TinyQwen2Spec, make_tiny_llama, make_tiny_qwen2,
                                        make_tiny_qwen2_moe)
from kvloom.testing.reference import hf_greedy_generate

# Prompts sharing a block-aligned prefix (prefix caching), one long enough to be
# chunked (max_num_batched_tokens 16), and a KV cache too small for all at once
# (preemption).
SHARED = list(range(20, 36))
PROMPTS = [SHARED + [3, 4, 5], SHARED + [6], list(range(100, 140)), [7, 8, 9, 10]]
MAX_TOKENS = 10
SETTINGS = dict(dtype="float32", platform="cpu", max_model_len=96, block_size=8,
                max_num_batched_tokens=16, num_gpu_blocks_override=10,
                enable_prefix_caching=True)
GREEDY = SamplingParams(temperature=0.0, max_tokens=MAX_TOKENS, ignore_eos=True)
SEEDED = SamplingParams(temperature=1.0, top_k=20, seed=11, max_tokens=MAX_TOKENS,
                        ignore_eos=True)


def generate(llm: LLM, params: SamplingParams) -> list[list[int]]:
    outputs = llm.generate([{"prompt_token_ids": p} for p in PROMPTS], params)
    return [output.outputs[0].token_ids for output in outputs]


def tensor_parallel_llm(path, size: int, **overrides) -> LLM:
    return LLM(str(path), tensor_parallel_size=size, distributed_executor_backend="mp",
               **{**SETTINGS, **overrides})


def worker_pids(llm: LLM) -> list[int]:
    return [process.pid for process in llm.engine.components.workers.executor.processes.values()]


@pytest.fixture(scope="module")
def checkpoints(tmp_path_factory):
    root = tmp_path_factory.mktemp("tp")
    return {
        "qwen2": make_tiny_qwen2(root / "qwen2", TinyQwen2Spec(num_key_value_heads=2)),
        "llama": make_tiny_llama(root / "llama"),
        "qwen2_moe": make_tiny_qwen2_moe(root / "qwen2_moe"),
    }


@pytest.mark.parametrize("architecture", ["qwen2", "llama", "qwen2_moe"])
def test_two_ranks_give_the_tokens_of_one_and_of_hf(checkpoints, architecture):
    path = checkpoints[architecture]
    one = LLM(str(path), **SETTINGS)
    expected_greedy, expected_seeded = generate(one, GREEDY), generate(one, SEEDED)
    assert one.engine.get_stats().num_preemptions > 0, "the case should preempt"
    assert expected_greedy == hf_greedy_generate(path, PROMPTS, MAX_TOKENS)

    llm = tensor_parallel_llm(path, 2)
    pids = worker_pids(llm)
    try:
        assert generate(llm, GREEDY) == expected_greedy
        assert generate(llm, SEEDED) == expected_seeded
        stats = llm.engine.get_stats()
        assert stats.num_preemptions > 0 and stats.prefix_cache_hit_tokens > 0
    finally:
        llm.engine.shutdown()
    assert_exited(pids)


def test_four_ranks_with_fewer_kv_heads_than_ranks(checkpoints):
    """2 KV heads over 4 ranks: each pair of ranks holds one KV head, replicated."""
    path = checkpoints["qwen2"]
    expected = generate(LLM(str(path), **SETTINGS), GREEDY)
    llm = tensor_parallel_llm(path, 4)
    try:
        assert generate(llm, GREEDY) == expected
    finally:
        llm.engine.shutdown()


def test_a_dead_worker_fails_its_requests_and_the_engine(checkpoints):
    llm = tensor_parallel_llm(checkpoints["qwen2"], 2)
    engine = llm.engine
    pids = worker_pids(llm)
    engine.add_request("r", {"prompt_token_ids": PROMPTS[0]}, GREEDY)
    engine.step()
    os.kill(pids[0], signal.SIGKILL)
    outputs = []
    while engine.has_unfinished_requests():
        outputs += engine.step()
    assert [o.outputs[0].finish_reason for o in outputs if o.finished] == ["error"]
    assert isinstance(engine.dead_error, WorkerFailedError)
    assert "rank 1" in str(engine.dead_error)
    engine.shutdown()
    assert_exited(pids)


def test_heads_that_do_not_divide_fail_naming_the_setting(checkpoints):
    with pytest.raises(ValueError, match="tensor_parallel_size"):
        tensor_parallel_llm(checkpoints["qwen2"], 3)


def test_pipeline_parallelism_is_refused_before_anything_starts(checkpoints):
    with pytest.raises(ValueError, match="pipeline parallelism is not supported"):
        LLM(str(checkpoints["qwen2"]), pipeline_parallel_size=2, **SETTINGS)


class ExitingExecutor(Executor):
    """Starts workers that exit at once, as a worker that cannot start would."""

    name = "exiting"

    def __init__(self) -> None:
        self.processes: list[subprocess.Popen] = []

    def launch(self, launch) -> None:
        self.processes = [subprocess.Popen([sys.executable, "-c", "raise SystemExit(3)"])
                          for _ in range(1, launch.world_size)]

    def dead_workers(self) -> list[str]:
        return [f"rank {rank} exited with code {p.returncode}"
                for rank, p in enumerate(self.processes, start=1) if p.poll() is not None]

    def shutdown(self) -> None:
        for process in self.processes:
            process.wait()


class ExitingExecutorPlugin:
    @hookimpl
    def register_executors(self, register):
        register("exiting", ExitingExecutor)


def test_a_worker_that_dies_at_start_is_an_error_naming_it(checkpoints):
    manager = make_plugin_manager(extra_plugins={"exiting": ExitingExecutorPlugin()})
    start = time.monotonic()
    with pytest.raises(WorkerFailedError, match="rank 1 exited with code 3"):
        LLM(str(checkpoints["qwen2"]), tensor_parallel_size=2,
            distributed_executor_backend="exiting", plugin_manager=manager, **SETTINGS)
    assert time.monotonic() - start < 60  # no hang


def test_an_unknown_executor_lists_the_known_ones(checkpoints):
    with pytest.raises(ValueError, match="mp"):
        LLM(str(checkpoints["qwen2"]), tensor_parallel_size=2,
            distributed_executor_backend="slurm", **SETTINGS)


def test_the_uni_executor_refuses_several_ranks(checkpoints):
    with pytest.raises(ValueError, match="needs distributed_executor_backend mp or ray"):
        LLM(str(checkpoints["qwen2"]), tensor_parallel_size=2,
            distributed_executor_backend="uni", **SETTINGS)


def test_an_idle_engine_notices_a_dead_worker(checkpoints):
    from kvloom.engine.async_engine import AsyncEngine

    llm = tensor_parallel_llm(checkpoints["qwen2"], 2)
    pids = worker_pids(llm)
    async_engine = AsyncEngine(llm.engine)
    async_engine.start()
    try:
        assert async_engine.is_healthy
        os.kill(pids[0], signal.SIGKILL)
        deadline = time.monotonic() + 10
        while async_engine.is_healthy and time.monotonic() < deadline:
            time.sleep(0.05)
        assert not async_engine.is_healthy, "/health would still say ok"
        assert "rank 1" in str(async_engine.dead_error)
    finally:
        async_engine.shutdown()
    assert_exited(pids)


class BrokenLaunchExecutor(ExitingExecutor):
    """Runs the real worker main, but points the workers at a model that is not there:
    the worker fails while building, after the driver has started waiting."""

    name = "broken_launch"

    def launch(self, launch) -> None:
        config = {**launch.engine_config, "model": {**launch.engine_config["model"],
                                                    "model": "/nonexistent/model"}}
        broken = dataclasses.replace(launch, engine_config=config)
        code = ("import pickle, sys; launch, rank = pickle.load(sys.stdin.buffer); "
                "launch.entrypoint(launch, rank, 0)")
        for rank in range(1, launch.world_size):
            process = subprocess.Popen([sys.executable, "-c", code], stdin=subprocess.PIPE,
                                       stderr=subprocess.DEVNULL)
            process.stdin.write(pickle.dumps((broken, rank)))
            process.stdin.close()
            self.processes.append(process)


class BrokenLaunchPlugin:
    @hookimpl
    def register_executors(self, register):
        register("broken_launch", BrokenLaunchExecutor)


def test_a_worker_that_fails_to_build_reports_its_own_error(checkpoints):
    manager = make_plugin_manager(extra_plugins={"broken": BrokenLaunchPlugin()})
    with pytest.raises(WorkerFailedError,
                       match=r"worker 1 failed to start: .*/nonexistent/model"):
        LLM(str(checkpoints["qwen2"]), tensor_parallel_size=2,
            distributed_executor_backend="broken_launch", plugin_manager=manager, **SETTINGS)


def test_mp_refuses_more_ranks_than_devices():
    from kvloom.plugins.executors.mp import MultiprocessingExecutor

    executor = MultiprocessingExecutor()
    assert executor.validate(2, 2) == []
    assert executor.validate(2, None) == []  # the CPU: every rank shares it
    (reason,) = executor.validate(4, 2)
    assert "tensor_parallel_size 4 needs 4 devices" in reason and "has 2" in reason


def test_a_model_that_ignores_tensor_parallelism_is_refused(checkpoints):
    from kvloom.plugins.models.qwen2 import Qwen2ForCausalLM

    class WholeOnEveryRank(Qwen2ForCausalLM):
        supports_tensor_parallel = False

    class Plugin:
        @hookimpl
        def register_models(self, register):
            register("WholeOnEveryRank", WholeOnEveryRank)

    import json
    import shutil

    path = checkpoints["qwen2"].parent / "whole"
    if not path.exists():
        shutil.copytree(checkpoints["qwen2"], path)
        config = json.loads((path / "config.json").read_text())
        config["architectures"] = ["WholeOnEveryRank"]
        (path / "config.json").write_text(json.dumps(config))
    manager = make_plugin_manager(extra_plugins={"whole": Plugin()})
    with pytest.raises(ValueError, match="does not support tensor_parallel_size > 1"):
        LLM(str(path), tensor_parallel_size=2, distributed_executor_backend="mp",
            plugin_manager=manager, **SETTINGS)
