"""Constrained decoding over many JSON schemas (xgrammar), in one mixed batch.

The tiny model has random weights, so the grammar mask alone has to make every output
valid, and every schema here bounds its sizes: a random model never *chooses* to close a
string, stop a number or end an array (a real model does), so an unbounded ``"type":
"string"`` or ``"type": "integer"`` runs to ``max_tokens`` and ends with "length".
Strings carry maxLength, an enum, a const, a format of fixed shape or a pattern with
bounded repetition; integers carry minimum and maximum; arrays carry maxItems; objects
list their properties (additionalProperties false, or bounded keys and maxProperties).

What xgrammar 0.2.8 enforced when these schemas were written (each feature sampled 25
times at temperature 1 and validated with jsonschema, and invalid instances fed to its
grammar matcher):

* enforced, and used below: type (incl. type lists), properties / required /
  additionalProperties false (and xgrammar's strict mode forbids unlisted properties even
  without it), nested objects, items / minItems / maxItems, prefixItems with items false,
  enum (strings and mixed values), const (scalars and containers), integer minimum /
  maximum / exclusiveMinimum / exclusiveMaximum / multipleOf, number minimum / maximum
  (see NUMBERS), minLength / maxLength, pattern (a pattern is matched whole, anchored or
  not), anyOf, oneOf (as anyOf: overlapping branches are not excluded, so the branches
  below are exclusive by a const tag), $defs / definitions with $ref, minProperties /
  maxProperties, patternProperties, propertyNames with a schema for
  additionalProperties, and the formats date (its shape only: "2024-02-31" passes) and
  uuid.
* not enforced (the grammar accepts violations), so not used: uniqueItems, contains, not,
  dependentRequired, if / then / else, allOf with several subschemas (xgrammar warns
  "Support for allOf with multiple options is still ongoing"; it produced bare numbers).
* enforced but unbounded, so unusable with random weights: maxLength next to a pattern or
  a format (xgrammar warns that it ignores it: ``"pattern": "^[a-z]+$", "maxLength": 5``
  never ends); the formats email, hostname, uri and duration; time and date-time, whose
  fractional seconds have no limit (the "stamp" pattern below is the bounded spelling).
  ipv4, and the IPv4 tail of ipv6, let octets have leading zeros ("88.000.68.68"), which
  Python's ipaddress (and so jsonschema) rejects, so they are left out too.

NUMBERS: ``"type": "number"`` with both minimum and maximum is bounded by xgrammar: the
integer part by the range, the fraction to at most 6 digits, no exponent. With only one
bound (or none) the integer part is unbounded, like a bare integer, so every number below
has both bounds.
"""

from __future__ import annotations

import random
import re

import pytest

jsonschema = pytest.importorskip("jsonschema")
pytest.importorskip("xgrammar")

from kvloom import LLM, SamplingParams, StructuredOutputsParams  # noqa: E402
from kvloom.testing.json_schemas import SCHEMAS, format_checker, formats_in  # noqa: E402
from kvloom.testing.json_schemas import validate_json  # noqa: E402
from kvloom.testing.reference import hf_greedy_generate  # noqa: E402

JSON_MAX_TOKENS = 256  # the longest schema below stays well under this (tokens >= 1 byte)
PLAIN_MAX_TOKENS = 24
REGEX = r"(yes|no), [0-9]{3}"
CHOICES = ["alpha", "beta gamma", "δ"]


def test_the_schemas_themselves_are_valid_and_every_format_is_checked():
    checker = format_checker()
    assert len(SCHEMAS) >= 20
    for name, schema in SCHEMAS.items():
        jsonschema.Draft202012Validator.check_schema(schema)
    assert set().union(*map(formats_in, SCHEMAS.values())) <= set(checker.checkers)
    # The checks bite: each rejects what xgrammar must never produce.
    with pytest.raises(jsonschema.ValidationError):
        jsonschema.validate("2024-13-01", {"format": "date"}, format_checker=checker)
    with pytest.raises(jsonschema.ValidationError):
        jsonschema.validate("2024-1-01", {"format": "date"}, format_checker=checker)
    with pytest.raises(jsonschema.ValidationError):
        jsonschema.validate("ee88-c688", {"format": "uuid"}, format_checker=checker)


@pytest.fixture(scope="module", params=[True, False], ids=["async_scheduling", "sync"])
def llm(request, tiny_qwen2):
    return LLM(model=str(tiny_qwen2), dtype="float32",
               scheduler={"async_scheduling": request.param})


@pytest.fixture(scope="module")
def hf_greedy(tiny_qwen2):
    """HF's greedy continuation of some token ids, computed once per module."""
    cache: dict[tuple[int, ...], list[int]] = {}

    def generate(prompt_ids: list[int]) -> list[int]:
        key = tuple(prompt_ids)
        if key not in cache:
            cache[key] = hf_greedy_generate(tiny_qwen2, [prompt_ids], PLAIN_MAX_TOKENS)[0]
        return cache[key]

    return generate


def constrained(temperature: float, seed: int | None, max_tokens: int = JSON_MAX_TOKENS,
                **spec) -> SamplingParams:
    return SamplingParams(temperature=temperature, seed=seed, max_tokens=max_tokens,
                          structured_outputs=StructuredOutputsParams(**spec))


# Outputs of the whole batch per scheduling mode: both modes must produce the same tokens.
_TOKENS_BY_MODE: dict[str, list[list[int]]] = {}


def test_every_schema_greedy_and_sampled_in_one_mixed_batch(llm, hf_greedy, request):
    # (label, prompt, params, check(completion)) for every request of the one batch.
    requests = []
    for index, (name, schema) in enumerate(SCHEMAS.items()):
        for temperature, seed in ((0.0, None), (1.0, 1000 + index)):
            def check(completion, schema=schema):
                validate_json(completion.text, schema)

            requests.append((f"{name} T={temperature}", f"Item {index}: {name}",
                             constrained(temperature, seed, json=schema), check))

    def matches_regex(completion):
        assert re.fullmatch(REGEX, completion.text), "no match"

    def is_a_choice(completion):
        assert completion.text in CHOICES, "not one of the choices"

    requests.append(("regex", "Answer:", constrained(0.0, None, regex=REGEX), matches_regex))
    requests.append(("regex sampled", "Answer:", constrained(1.0, 7, regex=REGEX),
                     matches_regex))
    requests.append(("choice", "Pick:", constrained(1.0, 3, choice=CHOICES), is_a_choice))
    tokenizer = llm.get_tokenizer()
    for prompt in ("plain", "The quick brown fox", "Hello, my name is"):
        expected = hf_greedy(tokenizer.encode(prompt))

        def same_as_hf(completion, expected=expected):
            assert completion.token_ids == expected, f"HF greedy: {expected}"

        requests.append((f"plain {prompt!r}", prompt,
                         SamplingParams(temperature=0, max_tokens=PLAIN_MAX_TOKENS), same_as_hf))

    def has_tokens(completion):
        assert completion.token_ids, "no tokens"

    requests.append(("plain sampled", "plain",
                     SamplingParams(temperature=1.0, seed=11, max_tokens=PLAIN_MAX_TOKENS),
                     has_tokens))
    # Interleave plain and constrained requests so that a grammar mask landing on the wrong
    # batch row shows up on both sides.
    random.Random(0).shuffle(requests)

    outputs = llm.generate([prompt for _, prompt, _, _ in requests],
                           [params for _, _, params, _ in requests])

    assert len(outputs) == len(requests)
    failures = []
    for (label, _, params, check), output in zip(requests, outputs):
        completion = output.outputs[0]
        try:
            if params.structured_outputs is not None:
                assert completion.finish_reason == "stop", completion.finish_reason
            check(completion)
        except Exception as exc:  # collect them all: one schema's failure hides no other
            message = (str(exc).splitlines() or [""])[0][:200]
            failures.append(f"{label}: {type(exc).__name__}: {message}\n"
                            f"    output: {completion.text[:200]!r}")
    assert not failures, f"{len(failures)} of {len(requests)} requests failed:\n" + "\n".join(
        failures)

    # Same batch, other scheduling mode (the module's other llm): the same tokens.
    tokens = [output.outputs[0].token_ids for output in outputs]
    mode = request.node.callspec.id
    for other_mode, other_tokens in _TOKENS_BY_MODE.items():
        assert tokens == other_tokens, f"{mode} and {other_mode} generated different tokens"
    _TOKENS_BY_MODE[mode] = tokens
