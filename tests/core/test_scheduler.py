"""Scheduler: continuous batching, chunked prefill, preemption, priorities and stops.

No model runs. ``Harness.step`` stands in for the model runner: it writes every
scheduled token into a fake KV cache keyed by (block id, offset), then checks
that each scheduled request can read its whole context (prompt + output so
far) back from its block table, exactly as attention would. A prefix hit on
a block that was never computed, or two live requests writing one slot,
fails that check. It then samples token 7 (or what the test asks) for every
request whose ScheduledRequest has ``sample=True``.
"""

from __future__ import annotations

import random
from typing import Callable

import pytest

from kvloom.config import SchedulerConfig
from kvloom.kv_cache.kv_cache_manager import KVCacheManager
from kvloom.request import Request, RequestStatus
from kvloom.sampling_params import SamplingParams
from kvloom.scheduler.policy import SCHEDULING_POLICIES, SchedulingPolicy, make_scheduling_policy
from kvloom.scheduler.scheduler import Scheduler, SchedulerLimits
from kvloom.scheduler.waiting_queue import FCFSQueue
from kvloom.step.runner_output import ModelRunnerOutput
from kvloom.step.scheduler_output import EngineCoreOutput, ScheduledRequest, SchedulerOutput

BLOCK_SIZE = 4
EOS = 2
SAMPLED = 7


def tokens(num: int, start: int = 100) -> list[int]:
    return list(range(start, start + num))


def make_request(request_id: str, prompt: list[int], *, max_tokens: int = 4,
                 arrival_time: float = 0.0, priority: int = 0, cache_salt: str | None = None,
                 request_max_tokens: int | None = None, **params) -> Request:
    sampling_params = SamplingParams(max_tokens=max_tokens, **params)
    return Request(request_id, list(prompt), sampling_params, frozenset({EOS}),
                   request_max_tokens if request_max_tokens is not None else max_tokens,
                   arrival_time=arrival_time, priority=priority, cache_salt=cache_salt)


class Harness:
    """A scheduler, its KV cache manager and a fake model runner."""

    def __init__(self, *, num_blocks: int = 64, max_num_seqs: int = 16,
                 max_num_batched_tokens: int = 64, max_model_len: int = 1024,
                 chunked: bool = True, policy: str | SchedulingPolicy = "fcfs",
                 caching: bool = True) -> None:
        self.kv = KVCacheManager(num_blocks, BLOCK_SIZE, caching, engine_salt=b"tests")
        self.limits = SchedulerLimits(max_num_seqs, max_num_batched_tokens, max_model_len,
                                      chunked)
        scheduling_policy = make_scheduling_policy(policy) if isinstance(policy, str) else policy
        self.scheduler = Scheduler(self.limits, self.kv, scheduling_policy)
        self.slots: dict[tuple[int, int], int] = {}
        self.sample: Callable[[ScheduledRequest], int] = lambda item: SAMPLED
        self.outputs: dict[str, list[EngineCoreOutput]] = {}
        self.num_steps = 0

    def add(self, *requests: Request) -> None:
        for request in requests:
            self.scheduler.add_request(request)

    def step(self) -> tuple[SchedulerOutput, dict[str, EngineCoreOutput]]:
        out = self.scheduler.schedule()
        self.num_steps += 1
        self._run_fake_model(out)
        sampled = [item for item in out.scheduled if item.sample]
        runner_output = ModelRunnerOutput([item.request_id for item in sampled],
                                          [[self.sample(item)] for item in sampled],
                                          [None] * len(sampled))
        results = self.scheduler.update_from_output(out, runner_output)
        for result in results:
            self.outputs.setdefault(result.request_id, []).append(result)
        self.check_pool()
        return out, {result.request_id: result for result in results}

    def run(self, max_steps: int = 500) -> None:
        while self.scheduler.has_unfinished_requests():
            assert self.num_steps < max_steps, "the scheduler made no progress"
            self.step()

    def finish_reason(self, request_id: str) -> str | None:
        return self.outputs[request_id][-1].finish_reason

    def output_ids(self, request_id: str) -> list[int]:
        return [t for result in self.outputs.get(request_id, []) for t in result.new_token_ids]

    def _run_fake_model(self, out: SchedulerOutput) -> None:
        limits = self.limits
        ids = [item.request_id for item in out.scheduled]
        assert len(ids) == len(set(ids))
        assert len(ids) <= limits.max_num_seqs
        assert self.scheduler.num_running <= limits.max_num_seqs
        assert out.num_scheduled_tokens == sum(len(item.token_ids) for item in out.scheduled)
        assert 0 <= out.num_scheduled_tokens <= limits.max_num_batched_tokens
        for item in out.scheduled:
            assert item.token_ids
            known = item.prompt_token_ids + item.output_token_ids
            end = item.num_computed_tokens + len(item.token_ids)
            assert item.token_ids == known[item.num_computed_tokens:end]
            assert item.sample == (end == len(known))
            assert len(item.block_ids) * BLOCK_SIZE >= end
            if not limits.enable_chunked_prefill:
                assert item.sample
            # Attention writes every new token's KV before any request reads.
            for offset, token_id in enumerate(item.token_ids):
                position = item.num_computed_tokens + offset
                block_id = item.block_ids[position // BLOCK_SIZE]
                self.slots[(block_id, position % BLOCK_SIZE)] = token_id
        for item in out.scheduled:
            known = item.prompt_token_ids + item.output_token_ids
            end = item.num_computed_tokens + len(item.token_ids)
            read = [self.slots.get((item.block_ids[p // BLOCK_SIZE], p % BLOCK_SIZE))
                    for p in range(end)]
            assert read == known[:end], f"{item.request_id} reads KV it did not write"

    def check_pool(self) -> None:
        assert self.kv.consistency_problems() == []
        live = {r.request_id for r in self.scheduler.running}
        assert set(self.kv.request_to_blocks) == live
        for request in self.scheduler.waiting:
            assert request.num_computed_tokens == 0

    def assert_all_blocks_free(self) -> None:
        assert not self.scheduler.has_unfinished_requests()
        assert self.kv.num_free_blocks() == self.kv.num_blocks
        assert all(block.ref_count == 0 for block in self.kv.pool.blocks)
        assert self.kv.request_to_blocks == {}
        assert self.scheduler.requests == {}


def scheduled_ids(out: SchedulerOutput) -> list[str]:
    return [item.request_id for item in out.scheduled]


def by_id(out: SchedulerOutput) -> dict[str, ScheduledRequest]:
    return {item.request_id: item for item in out.scheduled}


# ---------------------------------------------------------------- batching
def test_continuous_batching_runs_decodes_and_new_prefill_in_one_step():
    h = Harness()
    h.add(make_request("a", tokens(6), max_tokens=3))
    out, results = h.step()
    assert scheduled_ids(out) == ["a"] and out.num_scheduled_tokens == 6
    assert results["a"].new_token_ids == [SAMPLED] and not results["a"].finished

    h.add(make_request("b", tokens(5, start=300), max_tokens=2, arrival_time=1.0))
    out, results = h.step()
    items = by_id(out)
    assert list(items) == ["a", "b"]
    assert items["a"].token_ids == [SAMPLED] and items["a"].num_computed_tokens == 6
    assert items["b"].token_ids == tokens(5, start=300) and items["b"].num_computed_tokens == 0
    assert items["a"].sample and items["b"].sample
    assert out.num_scheduled_tokens == 6
    assert set(results) == {"a", "b"}

    h.run()
    assert h.output_ids("a") == [SAMPLED] * 3 and h.finish_reason("a") == "length"
    assert h.output_ids("b") == [SAMPLED] * 2 and h.finish_reason("b") == "length"
    h.assert_all_blocks_free()


def test_chunked_prefill_splits_a_long_prompt_and_samples_only_the_last_chunk():
    h = Harness(max_num_batched_tokens=8)
    h.add(make_request("long", tokens(20), max_tokens=2))
    chunks = []
    for _ in range(3):
        out, results = h.step()
        (item,) = out.scheduled
        chunks.append((item.num_computed_tokens, len(item.token_ids), item.sample))
        if not item.sample:
            assert results == {}
    assert chunks == [(0, 8, False), (8, 8, False), (16, 4, True)]
    assert h.output_ids("long") == [SAMPLED]
    h.run()
    assert h.output_ids("long") == [SAMPLED, SAMPLED]
    h.assert_all_blocks_free()


def test_chunked_prefill_shares_the_budget_with_running_decodes():
    h = Harness(max_num_batched_tokens=8)
    h.add(make_request("a", tokens(3), max_tokens=10))
    h.step()
    h.add(make_request("b", tokens(20, start=300), max_tokens=1, arrival_time=1.0))
    out, _ = h.step()
    items = by_id(out)
    assert len(items["a"].token_ids) == 1 and items["a"].sample
    assert len(items["b"].token_ids) == 7 and not items["b"].sample
    assert out.num_scheduled_tokens == 8
    h.run()
    assert h.finish_reason("b") == "length" and h.output_ids("b") == [SAMPLED]
    h.assert_all_blocks_free()


def test_without_chunked_prefill_a_prompt_over_the_remaining_budget_waits():
    h = Harness(max_num_batched_tokens=8, chunked=False)
    h.add(make_request("a", tokens(3), max_tokens=3))
    h.step()
    h.add(make_request("b", tokens(8, start=300), max_tokens=1, arrival_time=1.0))
    out, _ = h.step()  # a's decode takes one token: 7 left, b needs 8
    assert scheduled_ids(out) == ["a"]
    assert h.scheduler.num_waiting == 1
    out, _ = h.step()
    assert scheduled_ids(out) == ["a"]
    out, _ = h.step()  # a finished: b runs whole
    assert scheduled_ids(out) == ["b"] and len(out.scheduled[0].token_ids) == 8
    assert out.scheduled[0].sample
    h.run()
    h.assert_all_blocks_free()


def test_max_num_seqs_is_respected():
    h = Harness(max_num_seqs=2)
    for index, max_tokens in enumerate([2, 3, 2]):
        h.add(make_request(f"r{index}", tokens(3, start=100 * (index + 1)),
                           max_tokens=max_tokens, arrival_time=float(index)))
    out, _ = h.step()
    assert scheduled_ids(out) == ["r0", "r1"] and h.scheduler.num_waiting == 1
    out, _ = h.step()  # r0 finishes here, freeing a slot for the next step
    assert scheduled_ids(out) == ["r0", "r1"]
    out, _ = h.step()
    assert scheduled_ids(out) == ["r1", "r2"]
    h.run()
    h.assert_all_blocks_free()


# ---------------------------------------------------------------- preemption
def preemption_scenario(caching: bool) -> tuple[Harness, Request, Request]:
    """Two requests fill a 4-block cache; the first needs a 3rd block at its 3rd decode."""
    h = Harness(num_blocks=4, caching=caching)
    first = make_request("first", tokens(7), max_tokens=4)
    second = make_request("second", tokens(7, start=300), max_tokens=4, arrival_time=1.0)
    h.add(first, second)
    out, _ = h.step()
    assert scheduled_ids(out) == ["first", "second"]
    out, _ = h.step()
    assert scheduled_ids(out) == ["first", "second"] and out.num_preempted == 0
    return h, first, second


@pytest.mark.parametrize("caching", [False, True])
def test_preemption_by_recompute_when_blocks_run_out(caching):
    h, first, second = preemption_scenario(caching)
    out, _ = h.step()
    assert scheduled_ids(out) == ["first"]
    assert out.num_preempted == 1 and h.scheduler.num_preemptions == 1
    assert second.num_preemptions == 1 and first.num_preemptions == 0
    assert second.status == RequestStatus.PREEMPTED
    assert second.num_computed_tokens == 0
    assert second.output_token_ids == [SAMPLED, SAMPLED]  # what it generated is kept
    assert list(h.scheduler.waiting) == [second]
    assert "second" not in h.kv.request_to_blocks

    # first finishes at its 4th token; second is re-admitted and recomputes everything.
    out, results = h.step()
    assert scheduled_ids(out) == ["first"] and results["first"].finish_reason == "length"
    out, _ = h.step()
    (item,) = out.scheduled
    assert item.request_id == "second" and item.sample
    assert item.num_computed_tokens + len(item.token_ids) == 9
    if caching:
        # Its first block survived in the prefix cache (the tail was evicted first).
        assert item.num_computed_tokens == 4
        # num_cached_tokens reports the hit of the first admission, as in vLLM.
        assert second.num_cached_tokens == 0
    else:
        assert item.num_computed_tokens == 0
        assert item.token_ids == tokens(7, start=300) + [SAMPLED, SAMPLED]
    h.run()
    assert h.output_ids("second") == [SAMPLED] * 4 and h.finish_reason("second") == "length"
    assert h.output_ids("first") == [SAMPLED] * 4
    h.assert_all_blocks_free()


def test_preempted_request_goes_back_to_the_front_of_waiting():
    h, first, second = preemption_scenario(caching=False)
    third = make_request("third", tokens(3, start=500), max_tokens=1, arrival_time=2.0)
    h.add(third)  # no block for it yet
    assert list(h.scheduler.waiting) == [third]
    out, _ = h.step()
    assert out.num_preempted == 1
    assert list(h.scheduler.waiting) == [second, third]
    assert "third" not in scheduled_ids(out)  # no admissions in a step that preempts
    h.run()
    h.assert_all_blocks_free()


def test_fcfs_victim_is_the_latest_running_request():
    h = Harness(num_blocks=6)
    requests = [make_request(f"r{i}", tokens(7, start=100 * (i + 1)), max_tokens=6,
                             arrival_time=float(i)) for i in range(3)]
    h.add(*requests)
    h.step()
    h.step()
    out, _ = h.step()  # r0 needs a third block: none is free
    assert out.num_preempted == 1
    assert requests[2].num_preemptions == 1
    assert requests[0].num_preemptions == requests[1].num_preemptions == 0
    assert scheduled_ids(out) == ["r0", "r1"]
    h.run()
    assert all(h.output_ids(r.request_id) == [SAMPLED] * 6 for r in requests)
    h.assert_all_blocks_free()


# ---------------------------------------------------------------- priority
def test_priority_policy_admits_lowest_priority_value_first():
    h = Harness(max_num_seqs=1, policy="priority")
    h.add(make_request("late-low", tokens(3), priority=2, max_tokens=1, arrival_time=0.0),
          make_request("urgent", tokens(3, start=200), priority=0, max_tokens=1,
                       arrival_time=1.0),
          make_request("middle", tokens(3, start=300), priority=1, max_tokens=1,
                       arrival_time=2.0),
          make_request("urgent-2", tokens(3, start=400), priority=0, max_tokens=1,
                       arrival_time=3.0))
    order = []
    while h.scheduler.has_unfinished_requests():
        out, _ = h.step()
        order += scheduled_ids(out)
    assert order == ["urgent", "urgent-2", "middle", "late-low"]
    h.assert_all_blocks_free()


def test_priority_victim_is_lowest_priority_not_latest():
    h = Harness(num_blocks=6, policy="priority")
    h.add(make_request("p0-early", tokens(7), priority=0, max_tokens=6, arrival_time=0.0),
          make_request("p5", tokens(7, start=200), priority=5, max_tokens=6, arrival_time=1.0))
    h.step()
    h.add(make_request("p0-late", tokens(7, start=300), priority=0, max_tokens=6,
                       arrival_time=2.0))
    h.step()
    # p0-late is the latest running request; FCFS would preempt it.
    assert [r.request_id for r in h.scheduler.running] == ["p0-early", "p5", "p0-late"]
    # A small request that would fit the block left over by the preemption:
    # a step that preempts admits nothing, or the victim's room would be taken.
    h.add(make_request("small", tokens(3, start=900), priority=1, max_tokens=1,
                       arrival_time=3.0))
    out, _ = h.step()
    assert out.num_preempted == 1
    assert scheduled_ids(out) == ["p0-early", "p0-late"]
    assert h.kv.num_free_blocks() == 1
    assert [r.request_id for r in h.scheduler.waiting] == ["small", "p5"]
    h.run()
    h.assert_all_blocks_free()


def test_priority_victim_with_equal_priority_is_the_latest_arrival():
    h = Harness(num_blocks=6, policy="priority")
    # "late" arrived last but was admitted first, so it is not last in the running list.
    h.add(make_request("p0", tokens(7), priority=0, max_tokens=6, arrival_time=0.0),
          make_request("late", tokens(7, start=200), priority=5, max_tokens=6,
                       arrival_time=9.0))
    h.step()
    h.add(make_request("early", tokens(7, start=300), priority=5, max_tokens=6,
                       arrival_time=1.0))
    h.step()
    assert [r.request_id for r in h.scheduler.running] == ["p0", "late", "early"]
    out, _ = h.step()
    assert out.num_preempted == 1
    assert [r.request_id for r in h.scheduler.waiting] == ["late"]
    h.run()
    h.assert_all_blocks_free()


def test_preempting_a_request_scheduled_earlier_in_the_step_uncaches_its_new_blocks():
    # "low" sits ahead of "high" and "other" in the running list. In step 3
    # low's decode (position 7) completes its block 1, which is cached on
    # scheduling; then high's decode (position 4) needs a block and none is
    # free, so low (the lowest priority) is preempted although it was already
    # scheduled. "other" must still get its turn in that step.
    h = Harness(num_blocks=4, policy="priority")
    low = make_request("low", tokens(6), priority=9, max_tokens=6, arrival_time=0.0)
    high = make_request("high", tokens(4, start=500), priority=0, max_tokens=3,
                        arrival_time=1.0)
    other = make_request("other", tokens(2, start=600), priority=1, max_tokens=3,
                         arrival_time=2.0)
    h.add(low)
    h.step()
    h.add(other, high)
    out, _ = h.step()
    assert scheduled_ids(out) == ["low", "high", "other"] and h.kv.num_free_blocks() == 0
    assert low.block_hashes[0] in h.kv.pool.hash_to_block and len(low.block_hashes) == 1

    out, _ = h.step()
    assert out.num_preempted == 1 and low.num_preemptions == 1
    assert scheduled_ids(out) == ["high", "other"]
    assert out.num_scheduled_tokens == 2  # low's scheduled token was handed back
    assert low.status == RequestStatus.PREEMPTED and low.num_computed_tokens == 0
    assert len(low.block_hashes) == 2
    # Block 0 was computed and stays findable; block 1 was never written.
    assert h.kv.pool.lookup(low.block_hashes[0]) is not None
    assert h.kv.pool.lookup(low.block_hashes[1]) is None
    h.run()
    assert h.output_ids("low") == [SAMPLED] * 6 and h.output_ids("high") == [SAMPLED] * 3
    h.assert_all_blocks_free()


class NewestFirstOldestGivesWay(SchedulingPolicy):
    """A policy no built-in has: admits the newest arrival first, preempts the oldest."""

    name = "newest-first"

    def make_waiting_queue(self):
        class Stack(FCFSQueue):
            def peek(self):
                return self._queue[-1]

            def pop(self):
                return self._queue.pop()

        return Stack()

    def pick_preemption_victim(self, running):
        return running[0]


def test_a_policy_object_decides_admission_order_and_victim():
    h = Harness(max_num_seqs=1, policy=NewestFirstOldestGivesWay())
    h.add(*(make_request(f"r{i}", tokens(3, start=100 * i), max_tokens=1) for i in range(3)))
    order = []
    while h.scheduler.has_unfinished_requests():
        out, _ = h.step()
        order += scheduled_ids(out)
    assert order == ["r2", "r1", "r0"]

    # Two 7-token prompts fill 4 of 5 blocks; the first to need a third block
    # preempts, and this policy's victim is the oldest running request.
    h = Harness(num_blocks=5, policy=NewestFirstOldestGivesWay())
    h.add(make_request("old", tokens(7), max_tokens=6))
    h.step()
    h.add(make_request("new", tokens(7, start=200), max_tokens=6))
    num_preempted = 0
    while not num_preempted:
        out, _ = h.step()
        num_preempted = out.num_preempted
    assert num_preempted == 1
    assert [r.request_id for r in h.scheduler.waiting] == ["old"]
    assert [r.request_id for r in h.scheduler.running] == ["new"]
    h.run()
    h.assert_all_blocks_free()


def test_the_config_accepts_exactly_the_known_policies():
    for name in SCHEDULING_POLICIES:
        assert SchedulerConfig(policy=name).policy == name
        assert make_scheduling_policy(name).name == name
    with pytest.raises(ValueError, match=r"unknown scheduling policy 'lifo'; known: fcfs, priority"):
        SchedulerConfig(policy="lifo")
    with pytest.raises(ValueError, match=r"scheduler.policy: unknown .* known: fcfs, priority"):
        make_scheduling_policy("lifo")


# ---------------------------------------------------------------- stops
def test_max_tokens_finishes_with_length():
    h = Harness()
    h.add(make_request("a", tokens(5), max_tokens=3))
    h.run()
    assert h.output_ids("a") == [SAMPLED] * 3
    assert [r.finish_reason for r in h.outputs["a"]] == [None, None, "length"]
    assert h.outputs["a"][-1].stop_reason is None
    h.assert_all_blocks_free()


def test_eos_finishes_with_stop_unless_ignore_eos():
    h = Harness()
    h.sample = lambda item: EOS
    h.add(make_request("a", tokens(5), max_tokens=5),
          make_request("b", tokens(5, start=300), max_tokens=3, ignore_eos=True))
    h.run()
    assert h.output_ids("a") == [EOS] and h.finish_reason("a") == "stop"
    assert h.outputs["a"][-1].stop_reason is None
    assert h.output_ids("b") == [EOS] * 3 and h.finish_reason("b") == "length"
    h.assert_all_blocks_free()


def test_stop_token_id_finishes_with_stop_reason_the_token():
    h = Harness()
    produced = {"a": [SAMPLED, 42, SAMPLED]}
    h.sample = lambda item: produced[item.request_id][len(item.output_token_ids)]
    h.add(make_request("a", tokens(5), max_tokens=3, stop_token_ids=[42]))
    h.run()
    assert h.output_ids("a") == [SAMPLED, 42]
    assert h.finish_reason("a") == "stop" and h.outputs["a"][-1].stop_reason == 42
    h.assert_all_blocks_free()


def test_eos_as_the_last_allowed_token_is_a_stop():
    h = Harness()
    produced = [SAMPLED, SAMPLED, EOS]
    h.sample = lambda item: produced[len(item.output_token_ids)]
    h.add(make_request("a", tokens(5), max_tokens=3),
          make_request("b", tokens(5, start=300), max_tokens=3, stop_token_ids=[EOS],
                       ignore_eos=True))
    h.run()
    assert h.output_ids("a") == produced and h.finish_reason("a") == "stop"
    assert h.finish_reason("b") == "stop" and h.outputs["b"][-1].stop_reason == EOS
    h.assert_all_blocks_free()


def test_min_tokens_bans_and_suppresses_stops():
    h = Harness()
    banned_seen = []

    def sample(item: ScheduledRequest) -> int:
        banned_seen.append((item.request_id, len(item.output_token_ids),
                            sorted(item.banned_token_ids)))
        # A sampler honouring the ban picks 7; otherwise it would pick EOS.
        return SAMPLED if EOS in item.banned_token_ids else EOS

    h.sample = sample
    h.add(make_request("a", tokens(5), max_tokens=6, min_tokens=2, stop_token_ids=[42]),
          make_request("b", tokens(5, start=300), max_tokens=6, min_tokens=1, ignore_eos=True,
                       stop_token_ids=[42]))
    h.run()
    a_bans = [bans for rid, _, bans in banned_seen if rid == "a"]
    assert a_bans == [[EOS, 42], [EOS, 42], []]
    assert h.output_ids("a") == [SAMPLED, SAMPLED, EOS] and h.finish_reason("a") == "stop"
    b_bans = [bans for rid, _, bans in banned_seen if rid == "b"]
    assert b_bans[0] == [42] and all(bans == [] for bans in b_bans[1:])
    assert h.output_ids("b") == [EOS] * 6 and h.finish_reason("b") == "length"
    h.assert_all_blocks_free()


def test_min_tokens_suppresses_a_stop_the_sampler_did_not_honour():
    h = Harness()
    h.sample = lambda item: EOS
    h.add(make_request("a", tokens(5), max_tokens=6, min_tokens=3))
    h.run()
    assert h.output_ids("a") == [EOS] * 3 and h.finish_reason("a") == "stop"
    h.assert_all_blocks_free()


def test_max_model_len_finishes_with_length():
    h = Harness(max_model_len=10)
    h.add(make_request("a", tokens(8), max_tokens=50))
    h.run()
    assert h.output_ids("a") == [SAMPLED] * 2 and h.finish_reason("a") == "length"
    h.assert_all_blocks_free()


# ---------------------------------------------------------------- abort
def test_abort_from_waiting_and_running_frees_blocks_and_reports_ids():
    h = Harness(max_num_seqs=1)
    h.add(make_request("running", tokens(9), max_tokens=20),
          make_request("waiting", tokens(5, start=300), max_tokens=20, arrival_time=1.0))
    h.step()
    assert h.kv.num_free_blocks() == h.kv.num_blocks - 3
    h.scheduler.finish_requests(["running", "waiting", "unknown"],
                                RequestStatus.FINISHED_ABORTED)
    assert h.kv.num_free_blocks() == h.kv.num_blocks
    assert not h.scheduler.has_unfinished_requests()
    out = h.scheduler.schedule()
    assert out.is_empty and out.finished_request_ids == {"running", "waiting"}
    assert h.scheduler.schedule().finished_request_ids == set()  # reported once
    h.assert_all_blocks_free()


def test_finished_requests_are_reported_in_the_next_schedule():
    h = Harness()
    h.add(make_request("a", tokens(3), max_tokens=1))
    out, results = h.step()
    assert results["a"].finish_reason == "length"
    assert out.finished_request_ids == set()
    assert h.scheduler.schedule().finished_request_ids == {"a"}
    h.assert_all_blocks_free()


def test_abort_of_a_preempted_request_and_of_a_finished_one_is_harmless():
    h, first, second = preemption_scenario(caching=True)
    h.step()  # second preempted
    h.scheduler.finish_requests(["second"], RequestStatus.FINISHED_ABORTED)
    assert second.status == RequestStatus.FINISHED_ABORTED
    assert h.scheduler.num_waiting == 0
    h.run()
    h.scheduler.finish_requests(["first"], RequestStatus.FINISHED_ABORTED)
    assert first.status == RequestStatus.FINISHED_LENGTH
    h.assert_all_blocks_free()


# ---------------------------------------------------------------- prefix sharing
def test_n_siblings_share_prompt_blocks_in_the_same_step():
    h = Harness()
    prompt = tokens(9)
    siblings = [make_request(f"{i}-x", prompt, max_tokens=3) for i in range(3)]
    h.add(*siblings)
    out, _ = h.step()
    items = out.scheduled
    assert scheduled_ids(out) == ["0-x", "1-x", "2-x"]
    assert items[0].num_computed_tokens == 0 and len(items[0].token_ids) == 9
    for item in items[1:]:
        assert item.num_computed_tokens == 8 and item.token_ids == [prompt[-1]]
        assert item.block_ids[:2] == items[0].block_ids[:2]
        assert item.block_ids[2] != items[0].block_ids[2]
    assert out.num_scheduled_tokens == 11
    assert h.kv.num_free_blocks() == h.kv.num_blocks - 5
    assert [s.num_cached_tokens for s in siblings] == [0, 8, 8]
    stats = h.kv.prefix_stats
    assert (stats.num_queried_tokens, stats.num_hit_tokens) == (27, 16)
    h.run()
    assert [h.outputs[s.request_id][-1].num_cached_tokens for s in siblings] == [0, 8, 8]
    h.assert_all_blocks_free()


def test_later_request_hits_the_prefix_of_a_finished_one():
    h = Harness()
    h.add(make_request("a", tokens(10), max_tokens=2))
    h.run()
    h.add(make_request("b", tokens(8) + [55, 56], max_tokens=2))
    out, _ = h.step()
    assert out.scheduled[0].num_computed_tokens == 8
    h.add(make_request("c", tokens(10), max_tokens=2, cache_salt="other-user"))
    out, _ = h.step()
    assert by_id(out)["c"].num_computed_tokens == 0
    h.run()
    h.assert_all_blocks_free()


# ---------------------------------------------------------------- stress
@pytest.mark.parametrize("seed", range(12))
def test_random_workloads_keep_kv_consistent_and_return_every_block(seed):
    rng = random.Random(seed)
    chunked = seed % 3 != 0
    policy = "priority" if seed % 2 else "fcfs"
    budget = rng.choice([8, 16, 32]) if chunked else 64
    h = Harness(num_blocks=rng.randint(8, 16), max_num_seqs=rng.randint(2, 6),
                max_num_batched_tokens=budget, max_model_len=64, chunked=chunked,
                policy=policy, caching=seed % 4 != 3)
    prefixes = [tokens(rng.randint(0, 12), start=1000 * (k + 1)) for k in range(3)]
    produced: dict[str, int] = {}

    def sample(item: ScheduledRequest) -> int:
        if EOS not in item.banned_token_ids and rng.random() < 0.1:
            return EOS
        return rng.choice([SAMPLED, 8, 9])

    h.sample = sample
    num_added = 0
    for step in range(200):
        if num_added < 25 and rng.random() < 0.5:
            prompt = rng.choice(prefixes) + [rng.randint(10, 20) for _ in range(rng.randint(1, 8))]
            capacity = h.kv.num_blocks * BLOCK_SIZE
            max_tokens = rng.randint(1, min(12, capacity - len(prompt) + 1))
            request = make_request(f"r{num_added}", prompt, max_tokens=max_tokens,
                                   min_tokens=rng.randint(0, max_tokens), arrival_time=step,
                                   priority=rng.randint(0, 3),
                                   cache_salt=rng.choice([None, None, "s"]))
            produced[request.request_id] = max_tokens
            h.add(request)
            num_added += 1
        if rng.random() < 0.05 and h.scheduler.requests:
            victim = rng.choice(sorted(h.scheduler.requests))
            h.scheduler.finish_requests([victim], RequestStatus.FINISHED_ABORTED)
            h.check_pool()
        h.step()
    h.run(max_steps=2000)
    h.assert_all_blocks_free()
    for request_id, results in h.outputs.items():
        num_out = len(h.output_ids(request_id))
        assert num_out <= produced[request_id]
        assert all(r.finish_reason is None for r in results[:-1])
        if results[-1].finish_reason == "length":
            assert num_out == produced[request_id]
