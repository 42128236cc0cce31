"""Conformance: an executor runs the tensor-parallel ranks of a tiny model on the CPU
(gloo), with the same greedy and seeded tokens as one rank, keeps its workers alive
while the engine runs, and stops them with the engine.

An executor that cannot run two ranks here (``validate`` says why) is checked with
one rank instead; one that can run neither is skipped with its reasons.
"""

from __future__ import annotations

from pathlib import Path

import pytest

PROMPTS = [[5, 6, 7, 8] * 3, [40, 41, 42], [100, 3, 100, 3, 7]]


@pytest.fixture(scope="module")
def tiny_target(tmp_path_factory) -> Path:
    from kvloom.testing.checkpoints import make_tiny_qwen2

    return make_tiny_qwen2(tmp_path_factory.mktemp("executor_target"))


def generate(llm) -> list[list[int]]:
    from kvloom import SamplingParams

    greedy = SamplingParams(temperature=0.0, max_tokens=12, ignore_eos=True)
    seeded = SamplingParams(temperature=1.0, top_p=0.9, seed=7, max_tokens=12,
                            ignore_eos=True)
    prompts = [{"prompt_token_ids": p} for p in PROMPTS]
    return [o.outputs[0].token_ids for params in (greedy, seeded)
            for o in llm.generate(prompts, params)]


def test_ranks_give_the_tokens_of_one_rank(executor_component, tiny_target):
    from kvloom import LLM

    executor = executor_component.factory()
    reasons = {size: executor.validate(size, None) for size in (2, 1)}
    assert all(isinstance(r, list) and all(isinstance(x, str) for x in r)
               for r in reasons.values()), "validate() returns a list of reasons (strings)"
    world_size = next((size for size, why in reasons.items() if not why), None)
    if world_size is None:
        pytest.skip(f"executor {executor_component.name!r} cannot run here: "
                    f"{'; '.join(reasons[1])}")
    settings = dict(dtype="float32", platform="cpu", max_model_len=64)
    expected = generate(LLM(str(tiny_target), **settings))
    llm = LLM(str(tiny_target), tensor_parallel_size=world_size,
              distributed_executor_backend=executor_component.name, **settings)
    try:
        assert generate(llm) == expected, "tensor-parallel ranks changed the tokens"
        workers = llm.engine.components.workers
        if workers is not None:
            assert workers.executor.dead_workers() == [], "a worker died while serving"
    finally:
        llm.engine.shutdown()
