"""The server's edge uses the shared checks (issue "No request can kill the engine"):
out-of-range numbers, lone surrogates in any string, oversized structured-output specs
and a megabyte prompt are 400s naming the field, before the engine or the tokenizer
sees them, and the engine keeps serving; cache_salt reaches the prefix cache."""

from __future__ import annotations

import json
import time

import httpx
import pytest
from server_settings import MODEL_NAME

from kvloom.sampling_params import (MAX_CHOICES, MAX_JSON_SCHEMA_DEPTH, MAX_SEED,
                                    MAX_SPEC_BYTES, MAX_STOP_STRINGS, MAX_STOP_TOKEN_IDS,
                                    MAX_TOP_K, MIN_SEED)

MAX_MODEL_LEN = 128
BODY_CAP = 8 * 1024 * 1024  # room for the 2 MB prompt and the oversized specs
LONE = "\\ud800"  # a lone surrogate, escaped as JSON sends it


@pytest.fixture(scope="module")
def live(server_factory, tiny_qwen2):
    return server_factory(tiny_qwen2, max_model_len=MAX_MODEL_LEN, max_body_bytes=BODY_CAP)


@pytest.fixture(scope="module")
def http(live):
    with httpx.Client(base_url=live.base_url, timeout=60) as session:
        yield session


def post_raw(http, path: str, body: str) -> httpx.Response:
    """A body written by hand, so it can hold escapes json.dumps would not write."""
    return http.post(path, content=body.encode("ascii"),
                     headers={"content-type": "application/json"})


def assert_400(response: httpx.Response, param: str | None, code: str | int | None = None,
               mentions: str | None = None) -> dict:
    assert response.status_code == 400, response.text
    error = response.json()["error"]
    assert set(error) == {"message", "type", "param", "code"}
    assert error["param"] == param, error
    if code is not None:
        assert error["code"] == code, error
    if mentions is not None:
        assert mentions in error["message"], error
    assert len(response.content) < 1000
    return error


def assert_serving(http) -> None:
    assert http.get("/health").status_code == 200
    response = http.post("/v1/completions", json={"model": MODEL_NAME, "prompt": "Hello",
                                                  "max_tokens": 2, "temperature": 0.7,
                                                  "seed": 1})
    assert response.status_code == 200, response.text
    assert response.json()["choices"][0]["finish_reason"] == "length"


# ------------------------------------------------------------------ the requests
@pytest.mark.parametrize("fields, param", [
    ({"seed": 2**64}, "seed"),
    ({"seed": MIN_SEED - 1}, "seed"),
    ({"seed": 2**64 - 1, "n": 2}, "seed"),
    ({"top_k": 2**63}, "top_k"),
    ({"top_k": MAX_TOP_K + 1}, "top_k"),
    ({"top_p": 1e-50}, "top_p"),
    ({"repetition_penalty": 1e-50}, "repetition_penalty"),
    ({"repetition_penalty": 1000.0}, "repetition_penalty"),
    ({"temperature": 1e39}, "temperature"),
    ({"max_tokens": 2**64}, "max_tokens"),
    ({"max_tokens": None, "min_tokens": 2**40}, "min_tokens"),
    ({"logprobs": 2**64}, "logprobs"),
    ({"stop": ["x"] * (MAX_STOP_STRINGS + 1)}, "stop"),
    ({"stop": "x" * 5000}, "stop"),
    ({"stop_token_ids": [1] * (MAX_STOP_TOKEN_IDS + 1)}, "stop_token_ids"),
    ({"cache_salt": ""}, "cache_salt"),
    ({"cache_salt": "s" * 257}, "cache_salt"),
])
def test_out_of_range_fields_are_400_and_the_engine_lives(http, fields, param):
    body = {"model": MODEL_NAME, "prompt": "Hello", "max_tokens": 4, "temperature": 1.0,
            **fields}
    assert_400(http.post("/v1/completions", json=body), param)
    assert_serving(http)


def test_edge_seeds_sample_every_choice(http):
    for seed in (MAX_SEED, MIN_SEED):
        response = http.post("/v1/completions", json={
            "model": MODEL_NAME, "prompt": "Hello", "max_tokens": 3, "temperature": 1.0,
            "n": 2, "seed": seed, "top_k": MAX_TOP_K, "ignore_eos": True})
        assert response.status_code == 200, response.text
        assert [c["finish_reason"] for c in response.json()["choices"]] == ["length"] * 2


def test_chat_names_its_own_fields(http):
    messages = [{"role": "user", "content": "Hi"}]
    assert_400(http.post("/v1/chat/completions", json={
        "messages": messages, "max_completion_tokens": 2**40}), "max_completion_tokens")
    assert_400(http.post("/v1/chat/completions", json={
        "messages": messages, "max_completion_tokens": MAX_MODEL_LEN}),
        "max_completion_tokens", "context_length_exceeded", "max_completion_tokens")
    assert_400(http.post("/v1/chat/completions", json={
        "messages": messages, "seed": 2**64, "temperature": 0.5}), "seed")


# ------------------------------------------------------------------ lone surrogates
SURROGATE_CASES = [
    ("/v1/completions", '{"prompt": "a%sb"}', "prompt"),
    ("/v1/completions", '{"prompt": ["a%sb"]}', "prompt"),
    ("/v1/completions", '{"prompt": "x", "stop": ["a%s"]}', "stop"),
    ("/v1/completions", '{"prompt": "x", "stop": "a%s"}', "stop"),
    ("/v1/completions", '{"prompt": "x", "user": "a%s"}', "user"),
    ("/v1/completions", '{"prompt": "x", "model": "a%s"}', "model"),
    ("/v1/completions", '{"prompt": "x", "cache_salt": "a%s"}', "cache_salt"),
    ("/v1/completions", '{"prompt": "x", "structured_outputs": {"regex": "a%s"}}',
     "structured_outputs"),
    ("/v1/completions", '{"prompt": "x", "structured_outputs": {"grammar": "root ::= \\"%s\\""}}',
     "structured_outputs"),
    ("/v1/completions", '{"prompt": "x", "structured_outputs": {"choice": ["ok", "a%s"]}}',
     "structured_outputs"),
    ("/v1/completions",
     '{"prompt": "x", "structured_outputs": {"json": "{\\"const\\": \\"%s\\"}"}}',
     "structured_outputs"),
    ("/v1/completions", '{"prompt": "x", "structured_outputs": {"json": {"enum": ["a%s"]}}}',
     "structured_outputs"),
    ("/v1/completions", '{"prompt": "x", "structured_outputs": {"json": {"properties": '
                        '{"a%s": {"type": "string"}}}}}', "structured_outputs"),
    ("/v1/chat/completions", '{"messages": [{"role": "user", "content": "a%s"}]}', "messages"),
    ("/v1/chat/completions", '{"messages": [{"role": "user", "content": [{"type": "text", '
                             '"text": "a%s"}]}]}', "messages"),
    ("/v1/chat/completions", '{"messages": [{"role": "a%s", "content": "hi"}]}', "messages"),
    ("/v1/chat/completions", '{"messages": [{"role": "user", "name": "a%s", "content": "hi"}]}',
     "messages"),
    ("/v1/chat/completions", '{"messages": [{"role": "user", "content": "hi"}], '
                             '"response_format": {"type": "json_schema", "json_schema": '
                             '{"name": "x", "schema": {"enum": ["a%s"]}}}}', "response_format"),
    ("/v1/chat/completions", '{"messages": [{"role": "user", "content": "hi"}], '
                             '"cache_salt": "%s"}', "cache_salt"),
    ("/tokenize", '{"prompt": "a%sb"}', "prompt"),
    ("/tokenize", '{"messages": [{"role": "user", "content": "a%s"}]}', "messages"),
]


@pytest.mark.parametrize("path, template, param", SURROGATE_CASES,
                         ids=[f"{i}-{case[2]}" for i, case in enumerate(SURROGATE_CASES)])
def test_lone_surrogate_anywhere_is_400_naming_the_field(http, path, template, param):
    body = template % LONE
    json.loads(body)  # valid JSON: only the decoded text is not valid Unicode
    error = assert_400(post_raw(http, path, body), param)
    assert "surrogate" in error["message"] or "unicode" in error["message"].lower()


def test_valid_surrogate_pairs_are_text(http):
    response = post_raw(http, "/tokenize", '{"prompt": "smile \\ud83d\\ude00"}')
    assert response.status_code == 200, response.text
    assert_serving(http)


# ------------------------------------------------------------------ structured outputs
def nested_schema(depth: int) -> dict:
    schema: dict = {"type": "string"}
    for _ in range(depth - 1):
        schema = {"items": schema}
    return schema


def test_too_many_choices_is_400_fast(http):
    choices = [f"c{i}" for i in range(100_000)]  # used to stall every structured request
    started = time.monotonic()
    error = assert_400(http.post("/v1/completions", json={
        "prompt": "x", "structured_outputs": {"choice": choices}}), "structured_outputs",
        mentions="MAX_CHOICES")
    assert str(MAX_CHOICES) in error["message"]
    assert time.monotonic() - started < 5.0
    assert_serving(http)


@pytest.mark.parametrize("structured, limit", [
    ({"regex": "a" * (MAX_SPEC_BYTES + 1)}, "MAX_SPEC_BYTES"),
    ({"grammar": "root ::= " + '"a" ' * (MAX_SPEC_BYTES // 4)}, "MAX_SPEC_BYTES"),
    ({"choice": ["x" * 1000] * 70}, "MAX_SPEC_BYTES"),
    ({"json": {"enum": ["x" * 1000] * 70}}, "MAX_SPEC_BYTES"),
    ({"json": nested_schema(MAX_JSON_SCHEMA_DEPTH + 1)}, "MAX_JSON_SCHEMA_DEPTH"),
    ({"json": json.dumps(nested_schema(200))}, "MAX_JSON_SCHEMA_DEPTH"),
])
def test_structured_outputs_over_a_limit_is_400(http, structured, limit):
    assert_400(http.post("/v1/completions", json={"prompt": "x", "structured_outputs": structured}),
               "structured_outputs", mentions=limit)


def test_response_format_over_a_limit_names_response_format(http):
    body = {"messages": [{"role": "user", "content": "hi"}], "response_format": {
        "type": "json_schema", "json_schema": {"name": "deep", "schema": nested_schema(100)}}}
    error = assert_400(http.post("/v1/chat/completions", json=body), "response_format",
                       mentions="MAX_JSON_SCHEMA_DEPTH")
    assert error["message"].startswith("response_format.json_schema.schema")


def test_ten_thousand_deep_schema_is_400_and_the_server_lives(http):
    """json.loads gives up on the body (FastAPI's 400); nothing recurses into a 500."""
    depth = 10_000
    schema = '{"a":' * depth + "1" + "}" * depth
    for body in ('{"prompt": "x", "structured_outputs": {"json": %s}}' % schema,
                 '{"messages": [{"role": "user", "content": "hi"}], "response_format": '
                 '{"type": "json_schema", "json_schema": {"name": "x", "schema": %s}}}' % schema):
        path = "/v1/completions" if body.startswith('{"prompt"') else "/v1/chat/completions"
        error = assert_400(post_raw(http, path, body), None)
        assert "deep" in error["message"]
    # As a JSON string it parses, and the shared depth check refuses it.
    body = json.dumps({"prompt": "x", "structured_outputs": {"json": schema}})
    assert_400(post_raw(http, "/v1/completions", body), "structured_outputs",
               mentions="MAX_JSON_SCHEMA_DEPTH")
    assert_serving(http)


# ------------------------------------------------------------------ prompt length
class EncodeSpy:
    def __init__(self, monkeypatch, tokenizer, name: str) -> None:
        self.calls = 0
        original = getattr(tokenizer, name)

        def spy(*args, **kwargs):
            self.calls += 1
            return original(*args, **kwargs)

        monkeypatch.setattr(tokenizer, name, spy)


def test_megabyte_prompt_is_refused_before_tokenizing(http, live, monkeypatch):
    tokenizer = live.async_engine.tokenizer
    encode = EncodeSpy(monkeypatch, tokenizer, "encode")
    template = EncodeSpy(monkeypatch, tokenizer, "apply_chat_template")
    huge = "hello world " * 175_000  # 2.1 MB
    started = time.monotonic()
    assert_400(http.post("/v1/completions", json={"prompt": huge}), "prompt",
               "context_length_exceeded", "max_model_len")
    assert_400(http.post("/v1/completions", json={"prompt": [huge]}), "prompt",
               "context_length_exceeded")
    assert_400(http.post("/v1/chat/completions", json={
        "messages": [{"role": "user", "content": huge}]}), "messages", "context_length_exceeded")
    assert_400(http.post("/v1/chat/completions", json={"messages": [
        {"role": "user", "content": [{"type": "text", "text": huge[:1_000_000]}] * 2}]}),
        "messages", "context_length_exceeded")
    assert time.monotonic() - started < 5.0
    assert (encode.calls, template.calls) == (0, 0)
    assert_serving(http)
    assert encode.calls == 1  # the spy does see the tokenizer's use


def test_context_length_errors_share_the_engine_check(http):
    long_text = "Hello, my name is kvloom " * 40  # far more than MAX_MODEL_LEN tokens
    assert_400(http.post("/v1/completions", json={"prompt": long_text}), "prompt",
               "context_length_exceeded", "max_model_len")
    assert_400(http.post("/v1/completions", json={"prompt": [1] * MAX_MODEL_LEN}), "prompt",
               "context_length_exceeded")
    assert_400(http.post("/v1/completions", json={"prompt": [1] * 10, "max_tokens": 200}),
               "max_tokens", "context_length_exceeded")
    # max_tokens unset: room for the whole context, so min_tokens past it can never hold.
    assert_400(http.post("/v1/chat/completions", json={
        "messages": [{"role": "user", "content": "hi"}], "min_tokens": MAX_MODEL_LEN}),
        "min_tokens")


def test_kv_cache_limits_name_the_request_field(server_factory, tiny_qwen2):
    small = server_factory(tiny_qwen2, max_model_len=MAX_MODEL_LEN, block_size=16,
                           num_gpu_blocks_override=2)  # 32 token slots
    with httpx.Client(base_url=small.base_url, timeout=60) as session:
        assert_400(session.post("/v1/completions", json={"prompt": [1] * 40, "max_tokens": 1}),
                   "prompt", mentions="KV-cache blocks")
        assert_400(session.post("/v1/completions", json={"prompt": [1] * 20, "max_tokens": 20}),
                   "max_tokens", mentions="KV-cache blocks")
        error = assert_400(session.post("/v1/chat/completions", json={
            "messages": [{"role": "user", "content": "Hi"}], "max_completion_tokens": 40}),
            "max_completion_tokens", mentions="KV-cache blocks")
        assert error["message"].startswith("max_completion_tokens")
        assert session.post("/v1/completions", json={"prompt": [1] * 10, "max_tokens": 4}
                            ).status_code == 200


# ------------------------------------------------------------------ cache_salt
def test_cache_salt_reaches_the_prefix_cache(http, live, monkeypatch):
    """Requests share prefix-cache blocks only with the same salt (needs the engines to
    use the prompt dict's cache_salt)."""
    engine = live.async_engine
    original = engine.generate
    seen: list[tuple[dict, int]] = []

    async def spy(prompt, params, *args, **kwargs):
        async for output in original(prompt, params, *args, **kwargs):
            if output.finished:
                seen.append((prompt, output.num_cached_tokens))
            yield output

    monkeypatch.setattr(engine, "generate", spy)
    text = ("Continuous batching mixes prefill and decode. Hello, my name is kvloom and I "
            "generate text one token at a time. ")

    def cached(path: str, salt: str | None, **body) -> int:
        if salt is not None:
            body["cache_salt"] = salt
        response = http.post(path, json={"max_tokens": 1, "temperature": 0, **body})
        assert response.status_code == 200, response.text
        prompt, num_cached = seen[-1]
        assert prompt.get("cache_salt") == salt
        return num_cached

    completion = {"prompt": text}
    assert cached("/v1/completions", "alice", **completion) == 0
    assert cached("/v1/completions", "bob", **completion) == 0
    assert cached("/v1/completions", "alice", **completion) > 0
    chat = {"messages": [{"role": "user", "content": text * 2}]}
    assert cached("/v1/chat/completions", None, **chat) == 0
    assert cached("/v1/chat/completions", "carol", **chat) == 0
    assert cached("/v1/chat/completions", "carol", **chat) > 0


def test_n_that_can_never_fit_is_400_not_503(http, live):
    engine = live.async_engine
    saved, engine.max_slots = engine.max_slots, 3  # max_num_seqs + max_queued_requests
    try:
        too_wide = http.post("/v1/completions", json={"model": MODEL_NAME, "prompt": "Hi",
                                                      "n": 4, "temperature": 1.0,
                                                      "max_tokens": 2})
        fits = http.post("/v1/completions", json={"model": MODEL_NAME, "prompt": "Hi", "n": 3,
                                                  "temperature": 1.0, "max_tokens": 2})
    finally:
        engine.max_slots = saved
    assert "retry-after" not in too_wide.headers
    assert_400(too_wide, "n", mentions="can ever hold")
    assert fits.status_code == 200 and len(fits.json()["choices"]) == 3


@pytest.mark.parametrize("path, field, value", [
    ("/v1/completions", "logit_bias", {"42": -100}),
    ("/v1/completions", "best_of", 2),
    ("/v1/completions", "best_of", True),
    ("/v1/completions", "use_beam_search", True),
    ("/v1/completions", "bad_words", ["no"]),
    ("/v1/completions", "allowed_token_ids", [1, 2]),
    ("/v1/completions", "prompt_logprobs", 1),
    ("/v1/completions", "truncate_prompt_tokens", 4),
    ("/v1/completions", "suffix", " end"),
    ("/v1/chat/completions", "tools", [{"type": "function",
                                        "function": {"name": "f", "parameters": {}}}]),
    ("/v1/chat/completions", "tool_choice", "required"),
    ("/v1/chat/completions", "logit_bias", {"7": 5}),
])
def test_a_field_kvloom_does_not_act_on_is_400_not_ignored(http, path, field, value):
    body = ({"model": MODEL_NAME, "prompt": "Hello", "max_tokens": 2} if "chat" not in path
            else {"model": MODEL_NAME, "messages": [{"role": "user", "content": "Hi"}],
                  "max_tokens": 2})
    assert_400(http.post(path, json={**body, field: value}), field,
               mentions="not supported")
    assert_serving(http)


@pytest.mark.parametrize("field, value", [("logit_bias", {}), ("best_of", 1),
                                          ("use_beam_search", False), ("suffix", ""),
                                          ("bad_words", [])])
def test_values_of_those_fields_that_change_nothing_are_accepted(http, field, value):
    response = http.post("/v1/completions", json={"model": MODEL_NAME, "prompt": "Hello",
                                                  "max_tokens": 2, field: value})
    assert response.status_code == 200, response.text
