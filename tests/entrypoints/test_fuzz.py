"""Property-based fuzz of every route in the server's own OpenAPI schema (schemathesis).

A live uvicorn server on 127.0.0.1 (``server_factory``) serves the tiny Qwen2 checkpoint
with a 64-token context; its ``/openapi.json`` is fetched over HTTP, and every operation
gets positive and negative cases (schemathesis's coverage and fuzzing phases) sent over
real loopback HTTP. After each case: no 5xx, every error is OpenAI-shaped, a 200 from an
inference route hides no error, ``/health`` is 200, and the engine is idle with every KV
block free (streams longer than STREAM_EVENTS_READ events are cut by the client, so this
also covers disconnects mid-stream).

Two runs: without an API key, on the schema with generation bounds (so positive cases
reach the engine), and a shorter one with a key, on the schema exactly as served (so a
case it calls invalid must get a 4xx) and again with a wrong key (401).

Reproducible: seeded (``KVLOOM_FUZZ_SEED``), no example database, KVLOOM_FUZZ_EXAMPLES
fuzzed cases per operation (coverage cases come on top). A case that kills the engine
cannot be replayed on the same server, so Hypothesis may call the failure flaky; the
report still names that case (its curl) and carries the engine's traceback.
"""

from __future__ import annotations

import copy
import json
import os
import time
from typing import Any

import pytest

# In the test extra, so CI always runs it; machines without it (the GPU one) skip.
schemathesis = pytest.importorskip("schemathesis")

import requests  # noqa: E402  (schemathesis's own dependency)
from hypothesis import HealthCheck, settings  # noqa: E402
from schemathesis.checks import negative_data_rejection, not_a_server_error  # noqa: E402
from schemathesis.config import SchemathesisConfig  # noqa: E402
from server_settings import API_KEY, MODEL_NAME  # noqa: E402

from kvloom.testing.checkpoints import TinyQwen2Spec  # noqa: E402

SEED = int(os.environ.get("KVLOOM_FUZZ_SEED", "20260611"))
MAX_EXAMPLES = int(os.environ.get("KVLOOM_FUZZ_EXAMPLES", "100"))
MAX_EXAMPLES_WITH_KEY = max(1, MAX_EXAMPLES // 4)
REQUEST_TIMEOUT_S = 30.0  # a case that takes longer is a hang: generation here is ~ms/token
# schemathesis reads this many SSE events, then closes the connection: longer streams
# are client disconnects mid-stream, which must abort the request and free its blocks.
STREAM_EVENTS_READ = 20
IDLE_TIMEOUT_S = 10.0  # aborts land asynchronously, after the response
MAX_MODEL_LEN = 64
VOCAB_SIZE = TinyQwen2Spec().vocab_size
ENGINE_KWARGS = dict(max_model_len=MAX_MODEL_LEN, max_num_seqs=4, block_size=16,
                     num_gpu_blocks_override=64)
PUBLIC_PATHS = {"/health", "/ready", "/metrics"}  # the probes; every other path needs the key
AUTH = {"Authorization": f"Bearer {API_KEY}"}

# Bounds for *generation* only (the served schema does not state the model's limits):
# positive cases stay inside them, so they reach the engine instead of being refused,
# and negative cases cross them (max_tokens 65, token id -1 or VOCAB_SIZE, ...), which the
# server must refuse with a 4xx.
_INT_BOUNDS = {
    "max_tokens": {"minimum": 1, "maximum": MAX_MODEL_LEN},
    "max_completion_tokens": {"minimum": 1, "maximum": MAX_MODEL_LEN},
    "min_tokens": {"minimum": 0, "maximum": MAX_MODEL_LEN},
    "n": {"minimum": 1, "maximum": 4},  # n sequences x 64 tokens each: keep it cheap
    "prompt": {"minimum": 0, "maximum": VOCAB_SIZE - 1},  # token-id prompts
    "tokens": {"minimum": 0, "maximum": VOCAB_SIZE - 1},
    "stop_token_ids": {"minimum": 0, "maximum": VOCAB_SIZE - 1},
}


def _non_empty(node: Any) -> None:
    if not isinstance(node, dict):
        return
    if node.get("type") == "string":
        node["minLength"] = 1
    elif node.get("type") == "array":
        node["minItems"] = 1
        _non_empty(node.get("items"))
    for branch in node.get("anyOf", ()):
        _non_empty(branch)


def _bound_integers(node: Any, bounds: dict[str, int]) -> None:
    if not isinstance(node, dict):
        return
    if node.get("type") == "integer":
        node.update(bounds)
    for branch in node.get("anyOf", ()):
        _bound_integers(branch, bounds)
    _bound_integers(node.get("items"), bounds)


# Any other integer field is fuzzed as what a 64-bit integer, signed or unsigned, holds:
# the coverage phase then sends both ends and one past each (2**64, -2**63 - 1), where a
# value that reaches a tensor or a torch.Generator unchecked overflows.
INT64_OR_UINT64 = {"minimum": -(2**63), "maximum": 2**64 - 1}


def _default_integer_domain(node: Any) -> None:
    if isinstance(node, dict):
        if node.get("type") == "integer" and "minimum" not in node and "maximum" not in node:
            node.update(INT64_OR_UINT64)
        for value in node.values():
            _default_integer_domain(value)
    elif isinstance(node, list):
        for value in node:
            _default_integer_domain(value)


def _generation_schema(raw: dict[str, Any]) -> dict[str, Any]:
    raw = copy.deepcopy(raw)
    for component in raw.get("components", {}).get("schemas", {}).values():
        for name, prop in component.get("properties", {}).items():
            if name in _INT_BOUNDS:
                _bound_integers(prop, _INT_BOUNDS[name])
            if name in ("prompt", "tokens"):  # "" and [] are refused (400)
                _non_empty(prop)
            elif name == "model":  # any other name is a (cheap) 404
                for branch in prop.get("anyOf", ()):
                    if branch.get("type") == "string":
                        branch["enum"] = [MODEL_NAME]
    _default_integer_domain(raw.get("components"))
    return raw


# Values random generation almost never draws, mixed into every integer, number and
# string the schema allows them in (positive cases) or forbids them in (negative cases):
# where int32/int64/uint64 and float32 end, subnormals, NUL and odd code points. (Lone
# surrogates cannot be among them: schemathesis encodes every generated string as UTF-8.)
EDGE_INTEGERS = [-1, 2**31 - 1, 2**31, 2**32, 2**53 + 1, 2**63 - 1, 2**63, 2**64, -(2**63) - 1,
                 10**30]
EDGE_NUMBERS = [5e-324, 1e-300, 1e-45, 3.5e38, 1e308, -1e308, -0.0]
EDGE_STRINGS = ["\x00", "a\x00b", "\ufffe", "\U0010ffff", "\u202e", " ", "\n"]
EDGE_PROBABILITY = 0.05  # per field and case


def _edge_bindings(raw: dict[str, Any]) -> dict[str, dict[str, Any]]:
    """``{"body.<path>": binding}`` for every scalar field of every request body (a
    dictionary reaches body fields only through a binding by path; ``[*]``: any item).
    schemathesis draws, for a positive case, only the entries the field's schema admits,
    and for a negative case only those it refuses."""
    components = raw.get("components", {}).get("schemas", {})
    bindings: dict[str, dict[str, Any]] = {}

    def visit(node: Any, path: list[str], seen: tuple[str, ...]) -> None:
        if not isinstance(node, dict) or len(path) > 6:
            return
        ref = node.get("$ref")
        if isinstance(ref, str):
            name = ref.rsplit("/", 1)[-1]
            if name not in seen:
                visit(components.get(name), path, (*seen, name))
            return
        if node.get("type") in ("integer", "number", "string") and path:
            bindings["body." + ".".join(path)] = {"dictionary": "edge-values",
                                                  "probability": EDGE_PROBABILITY}
        for branch in node.get("anyOf", ()):
            visit(branch, path, seen)
        for name, prop in node.get("properties", {}).items():
            visit(prop, [*path, name], seen)
        if path and not path[-1].endswith("]"):  # schemathesis spells items name[*] ...
            visit(node.get("items"), [*path[:-1], path[-1] + "[*]"], seen)
        else:  # ... and items of items name[*].[*]
            visit(node.get("items"), [*path, "[*]"], seen)

    for methods in raw.get("paths", {}).values():
        for operation in methods.values():
            for media in operation.get("requestBody", {}).get("content", {}).values():
                visit(media.get("schema"), [], ())
    return bindings


def _load_schema(live, max_examples: int, bounded: bool):
    response = requests.get(live.base_url + "/openapi.json", headers=AUTH, timeout=10)
    response.raise_for_status()
    raw = response.json()
    raw = _generation_schema(raw) if bounded else raw
    config = SchemathesisConfig.from_dict({
        "seed": SEED,
        "base-url": live.base_url,
        "request-timeout": REQUEST_TIMEOUT_S,
        "max-stream-events": STREAM_EVENTS_READ,
        "output": {"sanitization": {"enabled": False}},  # it hides max_tokens ("token")
        "dictionaries": {"edge-values": {"values": EDGE_INTEGERS + EDGE_NUMBERS + EDGE_STRINGS}},
        "parameters": _edge_bindings(raw),
        "generation": {"mode": "all", "max-examples": max_examples, "database": "none"},
        # Any 4xx refuses a schema-violating case (a 413 for a body over the cap, too);
        # a 5xx is not_a_server_error's to report.
        "checks": {"negative_data_rejection": {"expected-statuses": ["4XX"]}},
        "phases": {"examples": {"enabled": True}, "coverage": {"enabled": True},
                   "fuzzing": {"enabled": True}, "stateful": {"enabled": False}},
    })
    return schemathesis.openapi.from_dict(raw, config=config)


def error_is_openai_shaped(ctx, response, case) -> None:
    """Every 4xx/5xx is {"error": {message, type, param, code}} (RELIABILITY.md A1)."""
    if response.status_code < 400:
        return
    try:
        body = response.json()
    except ValueError:
        raise AssertionError(f"error body is not JSON: {response.text[:200]!r}") from None
    assert isinstance(body, dict) and set(body) == {"error"}, body
    assert set(body["error"]) == {"message", "type", "param", "code"}, body


FINISH_REASONS = {None, "stop", "length", "tool_calls", "content_filter", "function_call"}


def generation_did_not_fail(ctx, response, case) -> None:
    """A 200 from an inference route hides no failure: no error event, no choice that
    finished with "abort" or "error", and a stream either ends with ``[DONE]`` or was cut
    by the client after STREAM_EVENTS_READ events (then it must not have stalled)."""
    if response.status_code != 200 or not case.operation.path.startswith("/v1/") \
            or case.method.upper() != "POST":
        return
    content_type = (response.headers.get("content-type") or [""])[0]  # lowercase keys, lists
    if content_type.startswith("text/event-stream"):
        payloads = [line[len("data: "):] for line in response.text.splitlines()
                    if line.startswith("data: ")]
        if payloads and payloads[-1] == "[DONE]":
            payloads.pop()
        elif response.stream_cut_short:  # by the event limit, or by the request timeout
            assert len(payloads) >= STREAM_EVENTS_READ, (
                f"the stream stalled after {len(payloads)} events: {response.text[-300:]}")
        else:
            raise AssertionError(f"the stream ended without [DONE]: {response.text[-300:]}")
        chunks = [json.loads(payload) for payload in payloads]
    else:
        chunks = [response.json()]
    for chunk in chunks:
        assert "error" not in chunk, chunk
        for choice in chunk.get("choices", ()):
            assert choice.get("finish_reason") in FINISH_REASONS, choice


CHECKS = [not_a_server_error, error_is_openai_shaped, generation_did_not_fail]


def _wait_idle(live, timeout: float = IDLE_TIMEOUT_S):
    deadline = time.monotonic() + timeout
    while True:
        stats = live.async_engine.engine.get_stats()
        idle = (stats.num_running == 0 and stats.num_waiting == 0
                and stats.num_free_blocks == stats.num_total_blocks
                and live.async_engine.num_requests_in_flight == 0)
        if idle or time.monotonic() > deadline:
            return idle, stats
        time.sleep(0.01)


# base_url -> what broke that server, and after which case. A dead engine or a leak
# stays: every later case would fail the same way, so Hypothesis would shrink towards a
# trivial request that did nothing wrong; each later failure names the real culprit.
_BROKEN: dict[str, str] = {}


def _check_not_broken(live) -> None:
    if live.base_url in _BROKEN:
        pytest.fail(f"the server broke at an earlier case: {_BROKEN[live.base_url]}")


def _assert_alive_and_idle(live, case, headers=None) -> None:
    health = requests.get(live.base_url + "/health", timeout=5)
    idle, stats = _wait_idle(live) if health.status_code == 200 else (False, None)
    if health.status_code == 200 and idle:
        return
    problem = (f"/health answered {health.status_code} {health.text[:200]}"
               if health.status_code != 200 else f"the engine is not idle: {stats}")
    _BROKEN[live.base_url] = f"{problem} after\n{case.as_curl_command(headers=headers)}"
    pytest.fail(_BROKEN[live.base_url], pytrace=False)


@pytest.fixture(scope="module")
def open_server(tiny_qwen2, server_factory):
    return server_factory(tiny_qwen2, **ENGINE_KWARGS)


@pytest.fixture(scope="module")
def keyed_server(tiny_qwen2, server_factory):
    return server_factory(tiny_qwen2, api_key=API_KEY, **ENGINE_KWARGS)


@pytest.fixture(scope="module")
def open_schema(open_server):
    return _load_schema(open_server, MAX_EXAMPLES, bounded=True)


@pytest.fixture(scope="module")
def keyed_schema(keyed_server):
    return _load_schema(keyed_server, MAX_EXAMPLES_WITH_KEY, bounded=False)


FUZZ_SETTINGS = settings(deadline=None, database=None, derandomize=False,
                         suppress_health_check=list(HealthCheck))


def _fuzz_case(live, case, checks, headers=None):
    """Send the case; check the response, then that the server is alive and idle."""
    _check_not_broken(live)
    response = case.call(headers=headers, timeout=REQUEST_TIMEOUT_S)
    try:
        case.validate_response(response, checks=checks, headers=headers)
    finally:  # a 5xx that also killed the engine reports both
        _assert_alive_and_idle(live, case, headers)
    return response


@schemathesis.pytest.from_fixture("open_schema").parametrize()
@settings(FUZZ_SETTINGS, max_examples=MAX_EXAMPLES)
def test_fuzz_without_api_key(case, open_server):
    response = _fuzz_case(open_server, case, CHECKS)
    assert response.status_code < 500, response.text  # what not_a_server_error checks, too


@schemathesis.pytest.from_fixture("keyed_schema").parametrize()
@settings(FUZZ_SETTINGS, max_examples=MAX_EXAMPLES_WITH_KEY)
def test_fuzz_with_api_key(case, keyed_server):
    # The schema exactly as served (no generation bounds): what it calls invalid must get
    # a 4xx. With the key nothing may be a 401; with a wrong one everything guarded is.
    response = _fuzz_case(keyed_server, case, CHECKS + [negative_data_rejection], AUTH)
    assert response.status_code != 401, response.text
    wrong = _fuzz_case(keyed_server, case, CHECKS, {"Authorization": f"Bearer {API_KEY}x"})
    if case.operation.path not in PUBLIC_PATHS:
        assert wrong.status_code == 401, wrong.text


def test_engines_idle_after_fuzzing(open_server, keyed_server):
    for live in (open_server, keyed_server):
        assert live.base_url not in _BROKEN, _BROKEN[live.base_url]
        assert requests.get(live.base_url + "/health", timeout=5).status_code == 200
        idle, stats = _wait_idle(live)
        assert idle, stats
        assert stats.num_running == stats.num_waiting == 0
        assert stats.num_free_blocks == stats.num_total_blocks
