"""An exception inside the model fails the in-flight requests, turns /health to 503,
and never hangs (RELIABILITY.md item 27)."""

from __future__ import annotations

import httpx

from server_settings import MODEL_NAME


def test_model_exception_fails_requests_and_health(tiny_qwen2, server_factory):
    live = server_factory(tiny_qwen2)
    assert httpx.get(f"{live.base_url}/health", timeout=10).status_code == 200
    runner = live.async_engine.engine.core.runner

    def broken_forward(*args, **kwargs):
        raise RuntimeError("CUDA error: an illegal memory access was encountered")

    runner.execute_async = broken_forward
    body = {"model": MODEL_NAME, "prompt": [1, 2, 3], "max_tokens": 5}
    response = httpx.post(f"{live.base_url}/v1/completions", json=body, timeout=30)
    assert response.status_code >= 500
    error = response.json()["error"]
    assert set(error) >= {"message", "type", "param", "code"}
    assert "Traceback" not in error["message"] and "/" not in error["message"]
    assert httpx.get(f"{live.base_url}/health", timeout=10).status_code == 503
    # Later requests fail fast instead of hanging.
    again = httpx.post(f"{live.base_url}/v1/completions", json=body, timeout=10)
    assert again.status_code == 503
