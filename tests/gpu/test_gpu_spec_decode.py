"""Speculative decoding on the CUDA path (Triton attention; CUDA graphs for the steps
without drafts): greedy output equals the output without drafts."""

from __future__ import annotations

import pytest
import torch

pytestmark = [pytest.mark.gpu,
              pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")]

PROMPTS = [[5, 17, 33, 2, 90, 41, 7], list(range(40, 140)), [7] * 30, list(range(300, 340)) * 3]


def generate(path, speculative=None, prompts=PROMPTS, **params):
    from kvloom import LLM, SamplingParams

    llm = LLM(model=str(path), dtype="float32", platform="cuda", attention="triton",
              speculative_config=speculative)
    outputs = llm.generate([{"prompt_token_ids": p} for p in prompts],
                           SamplingParams(max_tokens=48, **params))
    graphs = llm.engine.components.runner.cuda_graphs
    if speculative is not None and len(prompts) == 1:
        assert graphs.num_verify_replays > 0, "no verify step ran in a CUDA graph"
    return [o.outputs[0].token_ids for o in outputs], llm.engine.get_stats()


def test_cuda_ngram_greedy_equals_no_speculation(tiny_qwen2):
    ngram = {"method": "ngram", "num_speculative_tokens": 4, "prompt_lookup_min": 1,
             "prompt_lookup_max": 3}
    expected, _ = generate(tiny_qwen2, temperature=0)
    got, stats = generate(tiny_qwen2, ngram, temperature=0)
    assert got == expected
    assert stats.spec_num_accepted_tokens > 0
    # One request at a time: every verify step has a captured graph of its shape.
    single, single_stats = generate(tiny_qwen2, ngram, temperature=0, prompts=PROMPTS[2:3])
    assert single == expected[2:3] and single_stats.spec_num_accepted_tokens > 0
    sampled, _ = generate(tiny_qwen2, ngram, temperature=0.8, seed=3)
    again, _ = generate(tiny_qwen2, ngram, temperature=0.8, seed=3)
    assert sampled == again and all(0 < len(s) <= 48 for s in sampled)
