"""The ``ray`` executor on a local Ray cluster, on the CPU over gloo: two ranks give
the tokens of one, a killed worker is named and fails the engine, shutdown leaves no
actor or placement group behind, and a cluster that is missing or too small fails at
once, naming what is wrong.

The cluster tests share one local cluster (seconds to start), opened by this
process as a user's script would; the engine then uses that connection and leaves
it open. The conformance suite (tests/plugins/test_conformance_suite.py) covers the
executor starting a cluster of its own.
"""

from __future__ import annotations

import os
import signal
import time

import pytest
from worker_processes import assert_exited

from kvloom import LLM, SamplingParams
from kvloom.testing.checkpoints import make_tiny_qwen2

ray = pytest.importorskip("ray")

from kvloom.plugins.executors.ray_executor import RayClusterError, RayExecutor  # noqa: E402

SETTINGS = dict(dtype="float32", platform="cpu", max_model_len=64)
PROMPTS = [[5, 6, 7, 8] * 3, [40, 41, 42], [100, 3, 100, 3, 7]]
GREEDY = SamplingParams(temperature=0.0, max_tokens=10, ignore_eos=True)
SEEDED = SamplingParams(temperature=1.0, top_k=20, seed=11, max_tokens=10, ignore_eos=True)


@pytest.fixture(scope="module")
def checkpoint(tmp_path_factory):
    return make_tiny_qwen2(tmp_path_factory.mktemp("ray_executor"))


def generate(llm: LLM, params: SamplingParams) -> list[list[int]]:
    outputs = llm.generate([{"prompt_token_ids": p} for p in PROMPTS], params)
    return [output.outputs[0].token_ids for output in outputs]


def ray_llm(path, size: int = 2, **overrides) -> LLM:
    return LLM(str(path), tensor_parallel_size=size, distributed_executor_backend="ray",
               **{**SETTINGS, **overrides})


def test_an_unreachable_ray_address_fails_fast_naming_the_setting(checkpoint):
    assert not ray.is_initialized()
    start = time.monotonic()
    with pytest.raises(RayClusterError, match=r"parallel\.ray_address 'ray://127\.0\.0\.1:1'"):
        LLM(str(checkpoint), **SETTINGS, parallel=dict(
            tensor_parallel_size=2, distributed_executor_backend="ray",
            ray_address="ray://127.0.0.1:1"))
    assert time.monotonic() - start < 15  # no hang
    assert not ray.is_initialized()  # no connection or cluster left behind


class TestOnALocalCluster:
    """Two CPUs: room for one worker, not for three."""

    @pytest.fixture(scope="class", autouse=True)
    def cluster(self):
        ray.init(num_cpus=2, include_dashboard=False, log_to_driver=True)
        yield
        ray.shutdown()

    def test_two_ranks_give_the_tokens_of_one_and_leave_nothing_behind(self, checkpoint):
        one = LLM(str(checkpoint), **SETTINGS)
        expected_greedy, expected_seeded = generate(one, GREEDY), generate(one, SEEDED)
        llm = ray_llm(checkpoint)
        executor = llm.engine.components.workers.executor
        names = [worker.name for worker in executor.workers]
        pids = [ray.get(worker.where)[0] for worker in executor.workers]
        try:
            assert names and set(names) <= set(ray.util.list_named_actors())
            assert generate(llm, GREEDY) == expected_greedy
            assert generate(llm, SEEDED) == expected_seeded
            assert executor.dead_workers() == []
        finally:
            llm.engine.shutdown()
        assert not set(names) & set(ray.util.list_named_actors())
        assert_no_placement_group_left()
        assert_exited(pids)
        assert ray.is_initialized(), "the connection this process opened is left open"
        llm.engine.shutdown()  # twice is harmless

    def test_a_killed_worker_is_named_and_fails_the_engine(self, checkpoint):
        llm = ray_llm(checkpoint)
        engine = llm.engine
        executor = engine.components.workers.executor
        pid = ray.get(executor.workers[0].where)[0]
        engine.add_request("r", {"prompt_token_ids": PROMPTS[0]}, GREEDY)
        engine.step()
        os.kill(pid, signal.SIGKILL)
        deadline = time.monotonic() + 20
        while not executor.dead_workers() and time.monotonic() < deadline:
            time.sleep(0.05)
        [dead] = executor.dead_workers()
        assert dead.startswith("rank 1 (Ray actor kvloom-rank1-") and f"pid {pid}" in dead
        outputs = []
        while engine.has_unfinished_requests():
            outputs += engine.step()
        assert [o.outputs[0].finish_reason for o in outputs if o.finished] == ["error"]
        assert "rank 1 (Ray actor" in str(engine.dead_error)
        engine.shutdown()
        assert_no_placement_group_left()
        assert not any(name.startswith("kvloom-") for name in ray.util.list_named_actors())

    def test_too_small_a_cluster_fails_naming_what_is_missing(self, checkpoint, monkeypatch):
        monkeypatch.setattr(RayExecutor, "placement_timeout_s", 1.0)
        with pytest.raises(RayClusterError, match="the Ray cluster has 2 CPUs .*"
                           "tensor_parallel_size 4 needs 3 workers with a CPU each"):
            ray_llm(checkpoint, size=4)
        assert_no_placement_group_left()
        assert not any(name.startswith("kvloom-") for name in ray.util.list_named_actors())


def assert_no_placement_group_left() -> None:
    table = ray.util.placement_group_table()
    left = [pg["name"] for pg in table.values() if pg["state"] != "REMOVED"]
    assert left == [], f"placement groups left: {left}"


