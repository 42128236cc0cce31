"""Async scheduling (step N+1 launched before step N's tokens are read) changes nothing
but timing: every output equals the synchronous engine's, and HF's for greedy."""

from __future__ import annotations

import pytest

from kvloom import LLM, SamplingParams
from kvloom.testing.reference import hf_greedy_generate

PROMPTS = [[5, 17, 33, 2, 90, 41, 7], list(range(40, 140)), [200, 3], list(range(300, 340)) * 3,
           [7] * 30, list(range(1, 60, 2))]


def make_llm(path, async_scheduling: bool, **overrides) -> LLM:
    settings = dict(dtype="float32", block_size=8, max_num_batched_tokens=48,
                    scheduler_async=async_scheduling)
    settings.update(overrides)
    async_flag = settings.pop("scheduler_async")
    llm = LLM(str(path), **settings)
    llm.engine.core.async_scheduling = async_flag
    return llm


def run(llm: LLM, params) -> list[list[int]]:
    outputs = llm.generate([{"prompt_token_ids": p} for p in PROMPTS], params)
    return [[c.token_ids for c in o.outputs] for o in outputs]


def count_placeholder_fills(llm: LLM) -> list[int]:
    store = llm.engine.core.runner.sampled_tokens
    calls = [0]
    original = store.fill_placeholders

    def counting(*args, **kwargs):
        calls[0] += 1
        return original(*args, **kwargs)

    store.fill_placeholders = counting
    return calls


@pytest.mark.parametrize("overrides", [
    {},
    {"num_gpu_blocks_override": 20, "max_num_batched_tokens": 16},  # preemption + chunks
    {"enable_prefix_caching": False},
], ids=["default", "tight-kv", "no-prefix-cache"])
def test_async_greedy_equals_sync_and_hf(tiny_qwen2, overrides):
    params = [SamplingParams(temperature=0, max_tokens=n) for n in (24, 5, 1, 17, 24, 9)]
    async_llm = make_llm(tiny_qwen2, True, **overrides)
    fills = count_placeholder_fills(async_llm)
    async_out = run(async_llm, params)
    sync_out = run(make_llm(tiny_qwen2, False, **overrides), params)
    assert async_out == sync_out
    expected = [hf_greedy_generate(tiny_qwen2, [p], params[i].max_tokens)[0]
                for i, p in enumerate(PROMPTS)]
    assert [o[0] for o in async_out] == expected
    assert fills[0] > 0, "async scheduling never fed a token from the device"
    if "num_gpu_blocks_override" in overrides:
        assert async_llm.engine.get_stats().num_preemptions > 0


def test_async_sampling_stops_and_penalties_equal_sync(tiny_qwen2):
    params = [
        SamplingParams(temperature=0.9, top_k=20, seed=3, max_tokens=20, n=2),
        SamplingParams(temperature=0, max_tokens=20, stop_token_ids=[PROMPTS[0][0]]),
        SamplingParams(temperature=0.7, seed=5, max_tokens=12, min_tokens=6,
                       presence_penalty=0.5, repetition_penalty=1.2),
        SamplingParams(temperature=1.0, top_p=0.8, seed=9, max_tokens=16),
        SamplingParams(temperature=0, max_tokens=30, ignore_eos=True),
        SamplingParams(temperature=0.5, seed=1, max_tokens=8, logprobs=2),
    ]
    assert run(make_llm(tiny_qwen2, True), params) == run(make_llm(tiny_qwen2, False), params)


def test_async_stop_strings_equal_sync(tiny_qwen2):
    prompts = ["The quick brown fox", "Hello, my name is", "Paged attention keeps"]
    results = []
    for async_flag in (True, False):
        llm = make_llm(tiny_qwen2, async_flag)
        reference = llm.generate(prompts, SamplingParams(temperature=0, max_tokens=24))
        stops = [o.outputs[0].text[3:6] or "x" for o in reference]
        outputs = llm.generate(prompts, [SamplingParams(temperature=0, max_tokens=24, stop=[s])
                                         for s in stops])
        results.append([(o.outputs[0].text, o.outputs[0].finish_reason) for o in outputs])
    assert results[0] == results[1]
    assert any(reason == "stop" for _, reason in results[0])


def test_abort_with_a_step_in_flight(tiny_qwen2):
    llm = make_llm(tiny_qwen2, True)
    engine = llm.engine
    engine.add_request("a", {"prompt_token_ids": PROMPTS[1]}, SamplingParams(max_tokens=50))
    engine.add_request("b", {"prompt_token_ids": PROMPTS[0]}, SamplingParams(max_tokens=50))
    for _ in range(5):
        engine.step()
    assert engine.core.in_flight is not None
    engine.abort_request(["a", "b"])
    assert not engine.has_unfinished_requests()
    kv = engine.components.kv_cache_manager
    assert kv.num_free_blocks() == kv.num_blocks
    # The engine keeps working after the stale step is completed.
    output = llm.generate({"prompt_token_ids": PROMPTS[2]}, SamplingParams(temperature=0,
                                                                          max_tokens=6))
    assert output[0].outputs[0].token_ids == hf_greedy_generate(tiny_qwen2, [PROMPTS[2]], 6)[0]
