"""Failures inside the engine, seen from the server (RELIABILITY.md items 27-28): a
request whose sampling raises gets its own error while the others stream on; a failed
model step fails the requests in flight and the server serves on; a fault that
persists kills the engine loop, and /health turns 503."""

from __future__ import annotations

import json
import threading
import time

import httpx
import pytest

from fault_plugins import FAULTY_TOP_P, BreakingForward, FaultPlugins
from server_settings import MODEL_NAME


@pytest.fixture(scope="module")
def faulty_server(tiny_qwen2, server_factory):
    """A live server whose sampler raises for requests with FAULTY_TOP_P."""
    from kvloom import make_plugin_manager

    manager = make_plugin_manager(extra_plugins={"faults": FaultPlugins()})
    return server_factory(tiny_qwen2, plugin_manager=manager, sampler="faulty")


def completion(prompt, **fields) -> dict:
    return {"model": MODEL_NAME, "prompt": prompt, "max_tokens": 12, "temperature": 0,
            "ignore_eos": True, **fields}


def stream_events(base_url: str, body: dict) -> list:
    with httpx.stream("POST", f"{base_url}/v1/completions", json={**body, "stream": True},
                      timeout=60) as response:
        assert response.status_code == 200
        lines = [line.removeprefix("data: ") for line in response.iter_lines()
                 if line.startswith("data: ")]
    return [line if line == "[DONE]" else json.loads(line) for line in lines]


def wait_idle(live) -> None:
    deadline = time.monotonic() + 10
    while time.monotonic() < deadline:
        stats = live.async_engine.engine.get_stats()
        if (stats.num_running, stats.num_waiting) == (0, 0) and (
                stats.num_free_blocks == stats.num_total_blocks):
            return
        time.sleep(0.02)
    raise AssertionError(f"the engine did not go idle: {stats}")


def test_a_request_whose_sampling_fails_gets_its_error_and_the_others_finish(faulty_server):
    base = faulty_server.base_url
    results = {}

    def good_stream():
        results["good"] = stream_events(base, completion([1, 2, 3]))

    threads = [threading.Thread(target=good_stream)]
    threads[0].start()
    bad = httpx.post(f"{base}/v1/completions", json=completion([4, 5, 6], top_p=FAULTY_TOP_P),
                     timeout=60)
    bad_stream = stream_events(base, completion([7, 8, 9], top_p=FAULTY_TOP_P))
    threads[0].join(60)
    assert bad.status_code == 500
    assert bad.json()["error"]["message"] == "sampling failed (OverflowError)"
    # The streamed one failed after its first tokens: an error event, then [DONE].
    assert bad_stream[-1] == "[DONE]"
    assert bad_stream[-2]["error"]["message"] == "sampling failed (OverflowError)"
    assert all("choices" in event for event in bad_stream[:-2])
    good = results["good"]
    assert good[-1] == "[DONE]" and not any("error" in e for e in good[:-1])
    assert sum(len(e["choices"][0]["text"]) > 0 for e in good[:-1]) > 0
    assert good[-2]["choices"][0]["finish_reason"] == "length"
    assert httpx.get(f"{base}/health", timeout=10).status_code == 200
    wait_idle(faulty_server)


def test_a_failed_model_step_fails_its_requests_and_the_server_serves_on(faulty_server):
    base = faulty_server.base_url
    model = faulty_server.async_engine.engine.core.runner.model
    breaking = BreakingForward(model, num_failures=1)
    model.forward = breaking
    try:
        failed = httpx.post(f"{base}/v1/completions", json=completion([1, 2, 3]), timeout=60)
        error = failed.json()["error"]
        assert failed.status_code == 500
        assert error["message"] == "the model step failed (RuntimeError)"
        assert "Traceback" not in error["message"] and "/" not in error["message"]
        assert httpx.get(f"{base}/health", timeout=10).status_code == 200
        again = httpx.post(f"{base}/v1/completions", json=completion([1, 2, 3]), timeout=60)
        assert again.status_code == 200
        assert again.json()["choices"][0]["finish_reason"] == "length"
    finally:
        model.forward = breaking.forward
    wait_idle(faulty_server)


def test_a_lasting_fault_stops_the_engine_and_health_turns_503(tiny_qwen2, server_factory):
    live = server_factory(tiny_qwen2)
    base = live.base_url
    model = live.async_engine.engine.core.runner.model
    model.forward = BreakingForward(model, num_failures=10**6)
    statuses = [httpx.post(f"{base}/v1/completions", json=completion([1, 2, 3]),
                           timeout=30).status_code for _ in range(4)]
    assert all(status >= 500 for status in statuses)
    deadline = time.monotonic() + 10
    while live.async_engine.is_healthy and time.monotonic() < deadline:
        time.sleep(0.02)
    assert httpx.get(f"{base}/health", timeout=10).status_code == 503
    # Later requests fail fast instead of hanging.
    assert httpx.post(f"{base}/v1/completions", json=completion([1]),
                      timeout=10).status_code == 503
