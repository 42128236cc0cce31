"""The plugin inside a real engine: same greedy tokens as kvloom's defaults."""

from __future__ import annotations

import pytest
from kvloom import LLM, SamplingParams, make_plugin_manager
from kvloom.testing.checkpoints import make_tiny_qwen2

import kvloom_plugin_example.plugin

# Lengths chosen to span several blocks, a chunked prefill and a shared prefix.
PROMPTS = [[5, 17, 33, 2, 90, 41, 7], list(range(40, 85)), list(range(40, 60)) + [3]]


@pytest.fixture(scope="module")
def tiny_model(tmp_path_factory):
    return str(make_tiny_qwen2(tmp_path_factory.mktemp("model") / "tiny"))


def plugin_manager():
    """Every installed plugin, plus this one when it is not pip-installed (then its
    entry point is not there to find it)."""
    manager = make_plugin_manager()
    if "kvloom_example" not in manager.plugin_infos:
        manager.add_plugin(kvloom_plugin_example.plugin, "kvloom_example")
    return manager


def generate(llm: LLM, params: SamplingParams) -> list[list[int]]:
    outputs = llm.generate([{"prompt_token_ids": p} for p in PROMPTS], params)
    return [list(output.outputs[0].token_ids) for output in outputs]


def test_greedy_tokens_match_the_defaults(tiny_model):
    manager = plugin_manager()
    shared = dict(dtype="float32", block_size=8, max_num_batched_tokens=32,
                  enable_prefix_caching=True)
    params = SamplingParams(temperature=0, max_tokens=8, ignore_eos=True)
    plugin_llm = LLM(model=tiny_model, sampler="fast_nucleus", attention="sdpa_batched",
                     plugin_manager=manager, **shared)
    default_llm = LLM(model=tiny_model, attention="torch", **shared)
    tokens = generate(plugin_llm, params)
    assert tokens == generate(default_llm, params)
    assert all(len(t) == 8 for t in tokens)


def test_seeded_nucleus_sampling_runs_in_the_engine(tiny_model):
    manager = plugin_manager()
    llm = LLM(model=tiny_model, dtype="float32", sampler="fast_nucleus",
              attention="sdpa_batched", plugin_manager=manager)
    params = SamplingParams(temperature=0.8, top_p=0.9, top_k=50, seed=1, max_tokens=6,
                            ignore_eos=True, logprobs=2)
    first, again = generate(llm, params), generate(llm, params)
    assert first == again  # seeded requests repeat exactly
    output = llm.generate({"prompt_token_ids": PROMPTS[0]}, params)[0].outputs[0]
    assert list(output.token_ids) == first[0] and len(output.logprobs) == 6
