"""Regressions found in review: request-id reuse across an in-flight step, AsyncEngine.abort."""

from __future__ import annotations

import asyncio

from kvloom import Engine, SamplingParams
from kvloom.engine.async_engine import AsyncEngine
from kvloom.sampling_params import RequestOutputKind
from kvloom.testing.reference import hf_greedy_generate


def test_reusing_an_id_while_its_last_step_is_in_flight(tiny_qwen2):
    engine = Engine.from_config({"model": str(tiny_qwen2), "dtype": "float32"})
    assert engine.core.async_scheduling
    first, second = [5, 17, 33, 2], [90, 41, 7, 200, 3]
    # Stop on a token (not a length limit), so the next step is already scheduled with a
    # placeholder for "x" when the stop is seen.
    stop_token = hf_greedy_generate(tiny_qwen2, [first], 3)[0][2]
    engine.add_request("x", {"prompt_token_ids": first},
                       SamplingParams(temperature=0, max_tokens=50, ignore_eos=True,
                                      stop_token_ids=[stop_token]))
    outputs = {}
    while "x" not in outputs:  # until the first "x" finishes (its next step may be in flight)
        outputs.update({o.request_id: o for o in engine.step() if o.finished})
    assert outputs["x"].outputs[0].finish_reason == "stop"
    assert engine.core.in_flight is not None  # the stale step that still names "x"
    engine.add_request("x", {"prompt_token_ids": second},
                       SamplingParams(temperature=0, max_tokens=6, ignore_eos=True))
    reused = None
    while engine.has_unfinished_requests():
        for output in engine.step():
            if output.finished:
                reused = output
    assert reused.outputs[0].token_ids == hf_greedy_generate(tiny_qwen2, [second], 6)[0]


def test_async_engine_abort_ends_the_callers_stream(tiny_qwen2):
    engine = AsyncEngine(Engine.from_config({"model": str(tiny_qwen2), "dtype": "float32"}))
    engine.start()

    async def run() -> list:
        outputs = []
        params = SamplingParams(max_tokens=400, ignore_eos=True,
                                output_kind=RequestOutputKind.DELTA)
        async for output in engine.generate({"prompt_token_ids": [1, 2, 3]}, params, "r1"):
            outputs.append(output)
            if len(outputs) == 2:
                engine.abort("r1")
        return outputs

    try:
        outputs = asyncio.run(asyncio.wait_for(run(), timeout=30))
    finally:
        engine.shutdown()
    assert outputs[-1].finished and outputs[-1].outputs[0].finish_reason == "abort"
    kv = engine.engine.components.kv_cache_manager
    assert kv.num_free_blocks() == kv.num_blocks
