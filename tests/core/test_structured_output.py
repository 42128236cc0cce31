"""Structured output through the engine (xgrammar): random weights, so the mask alone must
make every output valid; unconstrained requests in the same batch are unaffected."""

from __future__ import annotations

import json
import re

import pytest

jsonschema = pytest.importorskip("jsonschema")
pytest.importorskip("xgrammar")

from kvloom import LLM, SamplingParams, StructuredOutputsParams  # noqa: E402
from kvloom.testing.reference import hf_greedy_generate  # noqa: E402

# Random weights never choose to stop a number or a string, so sizes are bounded by the
# schema (a real model ends them itself).
SCHEMAS = [
    {"type": "object", "properties": {"name": {"type": "string", "maxLength": 8},
                                      "age": {"type": "integer", "minimum": 0, "maximum": 150}},
     "required": ["name", "age"], "additionalProperties": False},
    {"type": "array", "items": {"type": "integer", "minimum": -99, "maximum": 99},
     "minItems": 1, "maxItems": 4},
    {"type": "object", "properties": {"color": {"enum": ["red", "green", "blue"]},
                                      "ok": {"type": "boolean"}},
     "required": ["color", "ok"], "additionalProperties": False},
    {"type": "object", "properties": {"point": {
        "type": "object", "properties": {"x": {"type": "integer", "minimum": 0, "maximum": 9},
                                         "y": {"type": "integer", "minimum": 0, "maximum": 9}},
        "required": ["x", "y"], "additionalProperties": False}},
     "required": ["point"], "additionalProperties": False},
    {"type": "object", "properties": {"code": {"type": "string", "pattern": "^[A-Z]{3}$"}},
     "required": ["code"], "additionalProperties": False},
]


@pytest.fixture(scope="module")
def llm(tiny_qwen2):
    return LLM(model=str(tiny_qwen2), dtype="float32")


def constrained(max_tokens=120, temperature=0.0, seed=None, **spec):
    return SamplingParams(temperature=temperature, seed=seed, max_tokens=max_tokens,
                          structured_outputs=StructuredOutputsParams(**spec))


def test_json_schemas_regex_choice_and_plain_in_one_batch(llm, tiny_qwen2):
    prompts, params = [], []
    for index, schema in enumerate(SCHEMAS):
        for temperature, seed in ((0.0, None), (1.0, index)):
            prompts.append(f"Item {index}")
            params.append(constrained(json=schema, temperature=temperature, seed=seed))
    prompts += ["Answer:", "Pick:", "plain"]
    params += [constrained(regex=r"(yes|no), [0-9]{3}"),
               constrained(choice=["alpha", "beta gamma"]),
               SamplingParams(temperature=0, max_tokens=16)]
    outputs = llm.generate(prompts, params)
    for output, schema in zip(outputs, [s for s in SCHEMAS for _ in range(2)]):
        completion = output.outputs[0]
        assert completion.finish_reason == "stop", completion.text
        jsonschema.validate(json.loads(completion.text), schema)
    assert re.fullmatch(r"(yes|no), [0-9]{3}", outputs[-3].outputs[0].text)
    assert outputs[-2].outputs[0].text in ("alpha", "beta gamma")
    plain_ids = llm.get_tokenizer().encode("plain")
    assert outputs[-1].outputs[0].token_ids == hf_greedy_generate(tiny_qwen2, [plain_ids], 16)[0]


def test_invalid_specs_fail_alone(llm):
    # Specs are checked on the compile threads: each bad one ends its own request.
    outputs = llm.generate(["x", "x", "x"], [constrained(json='{"type": "nosuchtype"}'),
                                           constrained(regex="(unclosed"),
                                           constrained(choice=["fine"])])
    assert [o.outputs[0].finish_reason for o in outputs] == ["abort", "abort", "stop"]
    assert outputs[2].outputs[0].text == "fine"
    with pytest.raises(ValueError):
        StructuredOutputsParams(json={}, regex="a")


def test_a_grammar_that_cannot_finish_in_time_ends_with_length(llm):
    output = llm.generate("x", constrained(regex="[a-z]{50}", max_tokens=5))[0].outputs[0]
    assert output.finish_reason == "length" and len(output.token_ids) == 5
