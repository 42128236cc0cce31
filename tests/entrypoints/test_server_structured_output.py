"""Structured output through the server (response_format and vLLM's structured_outputs),
driven by the official openai client. The weights are random, so only the grammar makes
outputs valid: schemas bound every string, number and array so outputs end with "stop"."""

from __future__ import annotations

import json
import re

import openai
import pytest

jsonschema = pytest.importorskip("jsonschema")
pytest.importorskip("xgrammar")

API_KEY = "test-key"
MODEL_NAME = "tiny-qwen2"
MAX_TOKENS = 150
MESSAGES = [{"role": "user", "content": "Describe a person as JSON."}]

PERSON = {"type": "object", "additionalProperties": False, "required": ["name", "age", "tags"],
          "properties": {"name": {"type": "string", "maxLength": 8},
                         "age": {"type": "integer", "minimum": 0, "maximum": 150},
                         "color": {"enum": ["red", "green", "blue"]},
                         "tags": {"type": "array", "maxItems": 3,
                                  "items": {"type": "string", "maxLength": 4}}}}
PERSON_FORMAT = {"type": "json_schema",
                 "json_schema": {"name": "person", "schema": PERSON, "strict": True}}


@pytest.fixture(scope="module")
def client(live_server):
    return openai.OpenAI(base_url=live_server.base_url + "/v1", api_key=API_KEY, max_retries=0)


def chat(client, **kwargs):
    return client.chat.completions.create(model=MODEL_NAME, messages=MESSAGES,
                                          max_tokens=MAX_TOKENS, **kwargs)


def assert_person(text: str, finish_reason: str) -> None:
    assert finish_reason == "stop", text
    jsonschema.validate(json.loads(text), PERSON)


# ------------------------------------------------------------------ outputs follow the spec
@pytest.mark.parametrize("sampling", [{"temperature": 0.0},
                                      {"temperature": 1.0, "seed": 7, "n": 2}])
def test_chat_json_schema_output_validates(client, sampling):
    reply = chat(client, response_format=PERSON_FORMAT, **sampling)
    assert len(reply.choices) == sampling.get("n", 1)
    for choice in reply.choices:
        assert_person(choice.message.content, choice.finish_reason)


def test_completions_accept_response_format(client):
    reply = client.completions.create(model=MODEL_NAME, prompt="Person:", max_tokens=MAX_TOKENS,
                                      temperature=0, extra_body={"response_format": PERSON_FORMAT})
    assert_person(reply.choices[0].text, reply.choices[0].finish_reason)


def test_json_object_output_is_an_object(client):
    reply = chat(client, response_format={"type": "json_object"}, temperature=1.0, seed=3)
    choice = reply.choices[0]
    # Unconstrained text from these weights almost never opens with "{".
    assert choice.message.content.startswith("{"), choice.message.content
    assert choice.finish_reason in ("stop", "length")
    if choice.finish_reason == "stop":  # an unbounded object may run out of tokens
        assert isinstance(json.loads(choice.message.content), dict)


def is_person(text: str) -> bool:
    jsonschema.validate(json.loads(text), PERSON)
    return True


@pytest.mark.parametrize("spec, check", [
    pytest.param({"regex": r"(yes|no), [0-9]{3}"},
                 lambda text: re.fullmatch(r"(yes|no), [0-9]{3}", text), id="regex"),
    pytest.param({"choice": ["alpha", "beta gamma"]},
                 lambda text: text in ("alpha", "beta gamma"), id="choice"),
    pytest.param({"grammar": 'root ::= "x=" [0-9] [0-9]?'},
                 lambda text: re.fullmatch(r"x=[0-9]{1,2}", text), id="grammar"),
    pytest.param({"json": json.dumps(PERSON)}, is_person, id="json-as-string"),
])
def test_structured_outputs_field(client, spec, check):
    reply = chat(client, temperature=0, extra_body={"structured_outputs": spec})
    choice = reply.choices[0]
    assert choice.finish_reason == "stop", choice.message.content
    assert check(choice.message.content), choice.message.content


def test_structured_outputs_on_completions_with_text_response_format(client):
    reply = client.completions.create(
        model=MODEL_NAME, prompt="Pick:", max_tokens=20, temperature=0,
        extra_body={"response_format": {"type": "text"},
                    "structured_outputs": {"choice": ["red", "blue"]}})
    assert reply.choices[0].text in ("red", "blue")


def test_streamed_deltas_make_a_valid_document(client):
    stream = chat(client, response_format=PERSON_FORMAT, temperature=1.0, seed=11, stream=True)
    texts, finish_reasons = [], []
    for chunk in stream:
        for choice in chunk.choices:
            texts.append(choice.delta.content or "")
            finish_reasons.append(choice.finish_reason)
    assert len(texts) > 3  # really streamed, not one piece
    assert_person("".join(texts), finish_reasons[-1])


# ------------------------------------------------------------------ refused with a 400
INVALID = [
    pytest.param({"response_format": {"type": "json_schema", "json_schema": {
        "name": "bad", "schema": {"type": "nosuchtype"}}}},
        ["response_format.json_schema.schema", "nosuchtype"], id="schema-the-engine-refuses"),
    pytest.param({"response_format": {"type": "json_schema", "json_schema": {
        "name": "ids", "schema": {"type": "array", "uniqueItems": True}}}},
        ["response_format.json_schema.schema", "cannot enforce", "uniqueItems"],
        id="unenforceable-schema"),
    pytest.param({"structured_outputs": {"json": {"type": "string", "pattern": "[a-z"}}},
                 ["structured_outputs.json: invalid json for structured output", "["],
                 id="schema-whose-pattern-is-no-regex"),
    pytest.param({"structured_outputs": {"regex": "(unclosed"}},
                 ["structured_outputs.regex", "parenthesis"], id="bad-regex"),
    pytest.param({"structured_outputs": {"grammar": 'rule ::= "a"'}},
                 ["structured_outputs.grammar", "root"], id="grammar-without-root"),
    pytest.param({"response_format": {"type": "json_object"},
                  "structured_outputs": {"choice": ["a"]}},
                 ["response_format", "structured_outputs", "only one"], id="both-fields"),
    pytest.param({"structured_outputs": {"jsn": {"type": "object"}}},
                 ["structured_outputs: unknown key(s) 'jsn'; expected one of json, regex"],
                 id="unknown-key"),
    pytest.param({"structured_outputs": {"regex": "a", "choice": ["a"]}},
                 ["exactly one", "regex, choice"], id="two-keys"),
    pytest.param({"structured_outputs": {}}, ["exactly one", "none"], id="no-key"),
    pytest.param({"structured_outputs": {"choice": []}},
                 ["structured_outputs.choice"], id="empty-choice"),
    pytest.param({"response_format": {"type": "json_schema"}},
                 ["response_format.json_schema is required"], id="json-schema-missing"),
    pytest.param({"response_format": {"type": "json_schema", "json_schema": {"name": "x"}}},
                 ["response_format.json_schema.schema is required"], id="schema-missing"),
    pytest.param({"response_format": {"type": "json_schema", "json_schema": {
        "name": "x", "schema": "not an object"}}},
        ["response_format.json_schema.schema"], id="schema-not-an-object"),
    pytest.param({"response_format": {"type": "xml"}},
                 ["response_format.type", "'text', 'json_object' or 'json_schema'"],
                 id="unknown-type"),
]


@pytest.mark.parametrize("stream", [False, True])
@pytest.mark.parametrize("extra_body, expected", INVALID)
def test_invalid_specs_are_400_and_the_server_keeps_serving(client, extra_body, expected,
                                                            stream):
    with pytest.raises(openai.BadRequestError) as caught:
        chat(client, temperature=0, extra_body=extra_body, stream=stream)
    error = caught.value
    assert error.status_code == 400
    assert error.param in ("response_format", "structured_outputs"), error.body
    message = error.body["message"]
    for fragment in expected:
        assert fragment in message, message
    assert "/" not in message  # no source paths from the grammar library
    reply = client.chat.completions.create(model=MODEL_NAME, messages=MESSAGES, max_tokens=4,
                                           temperature=0)
    assert reply.choices[0].finish_reason in ("stop", "length")
