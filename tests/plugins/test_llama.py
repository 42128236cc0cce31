"""LlamaForCausalLM: greedy output equals HF transformers (float32, CPU), incl. Llama-3 rope scaling."""

from __future__ import annotations

import pytest

from kvloom import LLM, SamplingParams
from kvloom.testing.checkpoints import make_tiny_llama
from kvloom.testing.reference import hf_greedy_generate


LLAMA3_SCALING = {"rope_type": "llama3", "factor": 8.0, "low_freq_factor": 1.0,
                  "high_freq_factor": 4.0, "original_max_position_embeddings": 64}


@pytest.mark.parametrize("overrides", [
    {},
    {"tie_word_embeddings": True, "rope_theta": 100000.0},
    {"rope_scaling": LLAMA3_SCALING, "rope_theta": 500000.0},
    {"attention_bias": True, "num_key_value_heads": 4},
], ids=["gqa", "tied", "llama3-rope-scaling", "attention-bias"])
def test_llama_greedy_matches_hf(tmp_path, overrides):
    path = make_tiny_llama(tmp_path / "llama", **overrides)
    prompts = [[5, 17, 33, 2, 90, 41, 7], list(range(40, 200)), [200, 3]]
    llm = LLM(model=str(path), dtype="float32", max_num_batched_tokens=64, block_size=8)
    outputs = llm.generate([{"prompt_token_ids": p} for p in prompts],
                           SamplingParams(temperature=0, max_tokens=24))
    assert [o.outputs[0].token_ids for o in outputs] == hf_greedy_generate(path, prompts, 24)
