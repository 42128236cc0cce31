"""Structured output on the CUDA path (Triton attention, CUDA graphs, async scheduling):
masks filled in pinned memory and applied on the device make every output valid."""

from __future__ import annotations

import re

import pytest
import torch

pytestmark = [pytest.mark.gpu,
              pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")]
pytest.importorskip("xgrammar")
pytest.importorskip("jsonschema")


def test_cuda_constrained_and_plain_requests_in_one_batch(tiny_qwen2):
    from kvloom import LLM, SamplingParams, StructuredOutputsParams
    from kvloom.testing.json_schemas import SCHEMAS, validate_json
    from kvloom.testing.reference import hf_greedy_generate

    llm = LLM(model=str(tiny_qwen2), dtype="float32", platform="cuda", attention="triton",
              max_num_seqs=64)
    schemas = list(SCHEMAS.values())
    params = [SamplingParams(temperature=t, seed=i, max_tokens=256,
                             structured_outputs=StructuredOutputsParams(json=schema))
              for i, schema in enumerate(schemas) for t in (0.0, 1.0)]
    params.append(SamplingParams(temperature=0, max_tokens=40,
                                 structured_outputs=StructuredOutputsParams(regex=r"[a-z]{4}-[0-9]{3}")))
    plain_prompt = [5, 17, 33, 2, 90]
    params.append(SamplingParams(temperature=0, max_tokens=24))
    prompts = [f"Item {i}" for i in range(len(params) - 1)] + [{"prompt_token_ids": plain_prompt}]
    outputs = llm.generate(prompts, params)
    for output, schema in zip(outputs, [s for s in schemas for _ in range(2)]):
        assert output.outputs[0].finish_reason == "stop", output.outputs[0].text
        validate_json(output.outputs[0].text, schema)
    assert re.fullmatch(r"[a-z]{4}-[0-9]{3}", outputs[-2].outputs[0].text)
    assert outputs[-1].outputs[0].token_ids == hf_greedy_generate(tiny_qwen2, [plain_prompt], 24)[0]
    graphs = llm.engine.components.runner.cuda_graphs
    assert graphs is not None and graphs.num_replays > 0
