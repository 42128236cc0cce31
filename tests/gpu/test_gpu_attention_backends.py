"""Every GPU attention backend end to end: the engine's greedy tokens equal HF's.

A tiny Llama with head size 64 (what the 16-bit GPU backends need) and spread
weights, so float16 greedy choices sit far from ties (HF's own float16 run picks
the same tokens as its float32 one); the engine runs float16 with CUDA graphs on
and is compared with HF transformers in float32.
"""

from __future__ import annotations

import pytest
import torch

pytestmark = [pytest.mark.gpu,
              pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")]

PROMPTS = [[5, 17, 33, 2, 90, 41, 7], list(range(40, 140)), [200, 3], list(range(300, 340)) * 3]
BACKENDS = ["triton", "cuda_paged", "flash_attn"]


@pytest.fixture(scope="module")
def tiny_llama_d64(tmp_path_factory):
    from kvloom.testing.checkpoints import make_tiny_llama

    return make_tiny_llama(tmp_path_factory.mktemp("tiny_llama_d64"), hidden_size=256,
                           intermediate_size=512, num_attention_heads=4, num_key_value_heads=2)


@pytest.fixture(scope="module")
def hf_tokens(tiny_llama_d64):
    from kvloom.testing.reference import hf_greedy_generate

    return hf_greedy_generate(tiny_llama_d64, PROMPTS, 24)


@pytest.mark.parametrize("attention", BACKENDS)
def test_float16_greedy_matches_hf_with_cuda_graphs(tiny_llama_d64, hf_tokens, attention):
    from kvloom import LLM, SamplingParams, make_plugin_manager
    from kvloom.interfaces.attention import AttentionSpec
    from kvloom.registry import Registries

    backend = Registries(make_plugin_manager())["attention"].create(attention)
    reasons = backend.validate(AttentionSpec(4, 2, 64, torch.float16, 16, "cuda"))
    if reasons:
        pytest.skip(f"{attention} cannot run here: {'; '.join(reasons)}")

    llm = LLM(model=str(tiny_llama_d64), dtype="float16", platform="cuda", attention=attention,
              max_num_seqs=8, max_num_batched_tokens=64, enforce_eager=False)
    outputs = llm.generate([{"prompt_token_ids": p} for p in PROMPTS],
                           SamplingParams(temperature=0, max_tokens=24))
    assert [o.outputs[0].token_ids for o in outputs] == hf_tokens
    assert llm.engine.components.attention_name == attention
    graphs = llm.engine.components.runner.cuda_graphs
    assert graphs is not None and graphs.num_replays > 0, "decode steps ran without graphs"
