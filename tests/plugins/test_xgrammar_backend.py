"""The xgrammar structured-output backend: accept / rollback / bitmask agree, and masked
random decoding always yields output that satisfies the spec."""

from __future__ import annotations

import json
import re

import pytest
import torch

xgrammar = pytest.importorskip("xgrammar")
jsonschema = pytest.importorskip("jsonschema")

from kvloom.plugins.structured_output.json_schema_features import unenforced_features  # noqa: E402,E501
from kvloom.plugins.structured_output.xgrammar_backend import XGrammarBackend  # noqa: E402
from kvloom.testing.checkpoints import build_tokenizer  # noqa: E402

VOCAB = 384


@pytest.fixture(scope="module")
def tokenizer():
    return build_tokenizer(VOCAB)


@pytest.fixture(scope="module")
def backend(tokenizer):
    return XGrammarBackend(tokenizer, VOCAB)


def allowed_ids(backend, grammar) -> set[int]:
    bitmask = backend.allocate_bitmask(1)
    grammar.fill_bitmask(bitmask, 0)
    bits = ((bitmask[0].unsqueeze(-1) >> torch.arange(32, dtype=torch.int32)) & 1).flatten()
    return {i for i in range(VOCAB) if bits[i]}


def masked_random_decode(backend, tokenizer, grammar, seed: int, max_steps: int = 300):
    """Sample from random logits under the mask until the grammar terminates."""
    generator = torch.Generator().manual_seed(seed)
    bitmask = backend.allocate_bitmask(1)
    tokens = []
    for _ in range(max_steps):
        if grammar.is_terminated():
            break
        logits = torch.randn(1, VOCAB, generator=generator) * 3
        grammar.fill_bitmask(bitmask, 0)
        xgrammar.apply_token_bitmask_inplace(logits, bitmask)
        token = int(logits.argmax())
        assert grammar.accept_tokens([token])
        tokens.append(token)
    assert grammar.is_terminated(), "grammar did not terminate"
    return tokenizer.decode([t for t in tokens if t != tokenizer.eos_token_id])


@pytest.mark.parametrize("kind,spec,prefixes", [
    ("regex", r"[a-z]+ [0-9]{2,4}", ["", "abc", "abc 1"]),
    ("json", {"type": "object", "properties": {"a": {"type": "string"}}, "required": ["a"]},
     ["", '{"a"', '{"a": "x']),
])
def test_bitmask_agrees_with_acceptance(backend, tokenizer, kind, spec, prefixes):
    grammar = backend.compile(kind, spec)
    for prefix in prefixes:
        prefix_ids = tokenizer.encode(prefix)
        assert grammar.accept_tokens(prefix_ids)
        allowed = allowed_ids(backend, grammar)
        assert allowed, "some token must be allowed"
        for token in range(VOCAB):
            accepted = grammar.accept_tokens([token])
            if token in allowed:
                assert accepted, token
            elif accepted:  # only JSON narrows the grammar: tokens with control characters
                assert kind == "json" and any(ord(c) < 0x20 for c in tokenizer.decode([token]))
            if accepted:
                grammar.rollback(1)
        grammar.rollback(len(prefix_ids))


def test_rollback_restores_the_state(backend, tokenizer):
    grammar = backend.compile("regex", r"[a-z]+ [0-9]{2,4}")
    before = allowed_ids(backend, grammar)
    tokens = tokenizer.encode("abc 12")
    assert grammar.accept_tokens(tokens)
    grammar.rollback(len(tokens))
    assert allowed_ids(backend, grammar) == before
    assert not grammar.accept_tokens(tokenizer.encode("12"))  # digits cannot start it


SCHEMAS = [
    {"type": "object", "properties": {"name": {"type": "string", "maxLength": 8},
                                      "age": {"type": "integer", "minimum": 0}},
     "required": ["name", "age"], "additionalProperties": False},
    {"type": "array", "items": {"enum": ["red", "green", "blue"]}, "minItems": 1,
     "maxItems": 3},
    {"type": "object", "properties": {"ok": {"type": "boolean"},
                                      "score": {"type": "number"}},
     "required": ["ok", "score"], "additionalProperties": False},
]


@pytest.mark.parametrize("schema", SCHEMAS, ids=["object", "enum-array", "bool-number"])
@pytest.mark.parametrize("seed", [0, 1, 2])
def test_masked_random_decoding_satisfies_json_schema(backend, tokenizer, schema, seed):
    text = masked_random_decode(backend, tokenizer, backend.compile("json", schema), seed)
    errors = list(jsonschema.Draft202012Validator(schema).iter_errors(json.loads(text)))
    assert errors == [], (text, errors)


@pytest.mark.parametrize("seed", [0, 1, 2])
def test_regex_and_choice(backend, tokenizer, seed):
    pattern = r"(yes|no), [0-9]{3}"
    text = masked_random_decode(backend, tokenizer, backend.compile("regex", pattern), seed)
    assert re.fullmatch(pattern, text), text
    choices = ["Paged attention", "continuous batching", "KV cache"]
    text = masked_random_decode(backend, tokenizer, backend.compile("choice", choices), seed)
    assert text in choices


@pytest.mark.parametrize("kind,spec", [
    ("json", '{"type": "object", "properties": {"a": {"type": "nosuchtype"}}}'),
    ("json", "{not json"),
    ("regex", "(unclosed"),
    ("grammar", "root ::= undefined_rule"),
    ("choice", []),
    ("bogus", "x"),
])
def test_invalid_specs_are_value_errors(backend, kind, spec):
    with pytest.raises(ValueError) as error:
        backend.compile(kind, spec)
    assert "\n" not in str(error.value)


def test_batched_bitmask_filling_matches_one_by_one(backend, tokenizer):
    """Above BATCH_FILL_MIN_ROWS the batch matcher fills rows on its threads; each row
    (control characters masked out for JSON) must equal the row's own fill."""
    from kvloom.plugins.structured_output.xgrammar_backend import BATCH_FILL_MIN_ROWS

    specs = [("json", {"type": "object", "properties": {"a": {"type": "string"}}}),
             ("regex", r"[a-z]+ [0-9]{2}"), ("choice", ["yes", "no"]), ("json_object", True)]
    grammars = [backend.compile(*specs[i % len(specs)]) for i in range(BATCH_FILL_MIN_ROWS + 2)]
    for grammar, text in zip(grammars, ['{"a": "x', "ab", "y", "{", '{"a"', "abc 1"]):
        assert grammar.accept_tokens(tokenizer.encode(text))
    rows = [2 * i + 1 for i in range(len(grammars))]  # scattered rows, gaps untouched
    batched = backend.allocate_bitmask(2 * len(grammars) + 1)
    batched.fill_(7)
    backend.fill_bitmasks(grammars, batched, rows)
    single = backend.allocate_bitmask(1)
    for grammar, row in zip(grammars, rows):
        grammar.fill_bitmask(single, 0)
        assert torch.equal(batched[row], single[0])
    assert (batched[0::2] == 7).all()


@pytest.mark.parametrize("schema,named", [
    ({"type": "array", "items": {"type": "integer"}, "uniqueItems": True}, "uniqueItems at $"),
    ({"type": "object", "properties": {"not": {"not": {"type": "null"}}}},
     "not at $.properties.not"),
    ({"type": "array", "contains": {"const": 1}}, "contains at $"),
    ({"if": {"type": "string"}, "then": {"maxLength": 2}}, "if at $"),
    ({"allOf": [{"type": "object"}, {"required": ["a"]}]}, "allOf with several subschemas"),
    ({"$defs": {"code": {"type": "string", "pattern": "^[a-z]+$", "maxLength": 3}},
      "$ref": "#/$defs/code"}, "pattern or format at $.$defs.code"),
    ('{"type": "array", "uniqueItems": true}', "uniqueItems at $"),
    ({"type": "number", "multipleOf": 0.5}, "multipleOf on a non-integer at $"),
    ({"$defs": {"x": {"type": "integer"}}, "$ref": "#/$defs/x", "minimum": 5},
     "minimum beside $ref at $"),
    ({"type": "integer", "allOf": [{"minimum": 5}]}, "type beside allOf at $"),
    ({"anyOf": [{"type": "integer"}, {"type": "null"}], "minimum": 5}, "minimum beside anyOf"),
])
def test_schemas_with_unenforced_features_are_refused(backend, schema, named):
    with pytest.raises(ValueError, match="cannot enforce") as error:
        backend.validate("json", schema)
    assert named in str(error.value)


def test_property_names_that_look_like_keywords_are_fine(backend, tokenizer):
    schema = {"type": "object", "properties": {"if": {"type": "boolean"},
                                               "contains": {"type": "integer"}},
              "uniqueItems": False}
    backend.validate("json", schema)  # would raise ValueError if refused
    assert unenforced_features(schema) == []
    grammar = backend.compile("json", schema)
    assert grammar.accept_tokens(tokenizer.encode('{"if": true, "contains": 3}'))


def test_json_never_allows_raw_control_characters(backend, tokenizer):
    """XGrammar's bounded strings (maxLength) admit control characters; JSON specs compile
    against a vocabulary where those tokens are blanked."""
    control = {i for i in range(VOCAB)
               if any(ord(char) < 0x20 for char in tokenizer.decode([i]))}
    assert control, "the test tokenizer has no control-character tokens"
    schema = {"type": "array", "items": {"type": "string", "maxLength": 5}}
    for kind, spec, prefix in (("json", schema, '["ab'), ("json_object", True, '{"k": "v')):
        grammar = backend.compile(kind, spec)
        assert grammar.accept_tokens(tokenizer.encode(prefix))
        allowed = allowed_ids(backend, grammar)
        assert len(allowed) > 10 and not allowed & control
    regex = backend.compile("regex", r"a\nb")  # other specs keep the whole vocabulary
    assert regex.accept_tokens(tokenizer.encode("a"))
    assert allowed_ids(backend, regex) & control


def test_pydantic_style_unions_and_refs_are_fine(backend):
    schemas = [{"anyOf": [{"type": "integer"}, {"type": "null"}], "default": None,
                "title": "Count"},
               {"$defs": {"p": {"type": "object"}}, "type": "object",
                "properties": {"p": {"$ref": "#/$defs/p", "description": "d"}}}]
    for schema in schemas:
        assert unenforced_features(schema) == []
        backend.validate("json", schema)  # would raise ValueError if refused


# Specs that are wrong in themselves, whatever XGrammar's version can or cannot compile.
@pytest.mark.parametrize("kind,spec", [
    ("json", {"type": "no-such-type"}),                 # not a JSON Schema type
    ("json", {"type": "string", "pattern": "[a-z"}),    # its pattern is no regex
    ("regex", "[a-z"),                                  # unbalanced bracket
    ("grammar", 'root ::= "a'),                         # unterminated string literal
])
def test_malformed_specs_name_the_kind_without_xgrammars_log_prefix(backend, kind, spec):
    backend.validate(kind, spec)  # parse errors are compile()'s, which parses once
    with pytest.raises(ValueError, match=f"^invalid {kind} for structured output: ") as error:
        backend.compile(kind, spec)
    reason = str(error.value).split(": ", 1)[1]
    assert reason and "\n" not in reason
    assert "/" not in reason and not reason.startswith("["), reason  # no "[hh:mm:ss] x.cc:1: "


def test_an_assertion_without_a_message_still_says_what_failed():
    from kvloom.plugins.structured_output.xgrammar_backend import _invalid

    raised = RuntimeError("[07:44:50] /project/cpp/grammar_compiler.cc:83: Check failed: "
                          "(error.empty()) is false: \nStack trace:\n  /lib/x.so(+0x1)")
    assert str(_invalid("json", raised)) == ("invalid json for structured output: XGrammar "
                                             "could not compile it (Check failed: "
                                             "(error.empty()) is false)")


def test_choices_escape_only_what_xgrammar_treats_as_special(backend, tokenizer, capfd):
    """re.escape's "\\ " and "\\#" make XGrammar warn on stderr for every occurrence."""
    import string

    choices = [string.punctuation, "two words # and ~ & more", "a.b", "ab"]
    for choice in choices:
        grammar = backend.compile("choice", choices)
        assert grammar.accept_tokens(tokenizer.encode(choice)), choice
        assert grammar.terminates_on(tokenizer.eos_token_id), choice
    wildcard = backend.compile("choice", choices)  # "." must match only itself
    assert not wildcard.accept_tokens(tokenizer.encode("aXb"))
    assert "Escape sequence" not in capfd.readouterr().err


def test_the_default_terminates_on_agrees_with_xgrammars(backend, tokenizer):
    from kvloom.interfaces.structured_output import Grammar

    grammar = backend.compile("choice", ["yes"])
    assert grammar.accept_tokens(tokenizer.encode("yes"))
    for token_id in (tokenizer.eos_token_id, tokenizer.encode("y")[0]):
        assert Grammar.terminates_on(grammar, token_id) == grammar.terminates_on(token_id)
    assert grammar.terminates_on(tokenizer.eos_token_id)
    assert not grammar.is_terminated()  # the default rolled back what it tried
