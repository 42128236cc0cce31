"""The CUDA path end to end: greedy output equals HF transformers, with and without graphs."""

from __future__ import annotations

import pytest
import torch

pytestmark = [pytest.mark.gpu,
              pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")]

PROMPTS = [[5, 17, 33, 2, 90, 41, 7], list(range(40, 140)), [200, 3], list(range(300, 340)) * 3]


@pytest.mark.parametrize("enforce_eager", [False, True], ids=["cuda-graphs", "eager"])
def test_cuda_greedy_matches_hf(tiny_qwen2, enforce_eager):
    from kvloom import LLM, SamplingParams
    from kvloom.testing.reference import hf_greedy_generate

    llm = LLM(model=str(tiny_qwen2), dtype="float32", platform="cuda", attention="triton",
              max_num_seqs=8, max_num_batched_tokens=64, enforce_eager=enforce_eager)
    outputs = llm.generate([{"prompt_token_ids": p} for p in PROMPTS],
                           SamplingParams(temperature=0, max_tokens=24))
    expected = hf_greedy_generate(tiny_qwen2, PROMPTS, 24)
    assert [o.outputs[0].token_ids for o in outputs] == expected
    graphs = llm.engine.components.runner.cuda_graphs
    if enforce_eager:
        assert graphs is None
    else:
        assert graphs is not None and graphs.num_replays > 0


def test_cuda_platform_is_chosen_automatically(tiny_qwen2):
    from kvloom import LLM, SamplingParams

    llm = LLM(model=str(tiny_qwen2), dtype="float32", max_num_seqs=4)
    assert llm.engine.components.platform.name == "cuda"
    assert llm.engine.components.attention_name == "triton"
    output = llm.generate({"prompt_token_ids": [1, 2, 3]}, SamplingParams(max_tokens=4))
    assert len(output[0].outputs[0].token_ids) == 4
