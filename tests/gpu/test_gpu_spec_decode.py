"""Speculative decoding on the CUDA path (Triton attention; CUDA graphs for the steps
without drafts): greedy output equals the output without drafts."""

from __future__ import annotations

import pytest
import torch

pytestmark = [pytest.mark.gpu,
              pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")]

PROMPTS = [[5, 17, 33, 2, 90, 41, 7], list(range(40, 140)), [7] * 30, list(range(300, 340)) * 3]


def generate(path, speculative=None, **params):
    from kvloom import LLM, SamplingParams

    llm = LLM(model=str(path), dtype="float32", platform="cuda", attention="triton",
              speculative_config=speculative)
    outputs = llm.generate([{"prompt_token_ids": p} for p in PROMPTS],
                           SamplingParams(max_tokens=48, **params))
    return [o.outputs[0].token_ids for o in outputs], llm.engine.get_stats()


def test_cuda_ngram_greedy_equals_no_speculation(tiny_qwen2):
    ngram = {"method": "ngram", "num_speculative_tokens": 4, "prompt_lookup_min": 1,
             "prompt_lookup_max": 3}
    expected, _ = generate(tiny_qwen2, temperature=0)
    got, stats = generate(tiny_qwen2, ngram, temperature=0)
    assert got == expected
    assert stats.spec_num_accepted_tokens > 0
    sampled, _ = generate(tiny_qwen2, ngram, temperature=0.8, seed=3)
    again, _ = generate(tiny_qwen2, ngram, temperature=0.8, seed=3)
    assert sampled == again and all(0 < len(s) <= 48 for s in sampled)
