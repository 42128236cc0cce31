"""The HTTP edge (issue "No request can kill the engine"): body and header limits,
slow clients, and the API key on every path but the probes.

The in-process servers are built exactly as ``kvloom serve`` builds them (its flags,
``uvicorn_config``, ``DrainingServer``), with short timeouts so the slow-client tests
take a second; the API key from the environment runs a real ``kvloom serve``. The
helpers here are shared with test_server_lifecycle.py.
"""

from __future__ import annotations

import json
import os
import socket
import subprocess
import sys
import threading
import time
from dataclasses import dataclass

import httpx
import pytest
from server_settings import API_KEY, MODEL_NAME
from server_threads import start_in_thread

AUTH = {"Authorization": f"Bearer {API_KEY}"}
SLOW_CLIENT_TIMEOUT = 0.5  # --timeout-request-headers / --timeout-request-body under test
BODY_CAP = 64 * 1024


@dataclass
class ThreadServer:
    base_url: str
    port: int
    async_engine: object
    server: object
    thread: threading.Thread


def _free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def serve_in_thread(model_path, flags=(), **engine_kwargs) -> ThreadServer:
    """What run_serve builds, with an engine from LLM-style kwargs, in a thread."""
    from kvloom.engine.async_engine import AsyncEngine
    from kvloom.engine.engine import Engine
    from kvloom.engine.llm import engine_config_from_kwargs
    from kvloom.entrypoints.cli import build_parser
    from kvloom.entrypoints.cli_serve import uvicorn_config
    from kvloom.entrypoints.openai.draining import DrainingServer
    from kvloom.entrypoints.openai.server import build_app

    port = _free_port()
    args = build_parser().parse_args(["serve", str(model_path), "--port", str(port),
                                      "--log-level", "warning", *flags])
    config = engine_config_from_kwargs(str(model_path), dtype="float32", **engine_kwargs)
    async_engine = AsyncEngine(Engine(config), max_queued_requests=16)
    app = build_app(async_engine, MODEL_NAME, api_key=args.api_key,
                    max_body_bytes=args.max_body_bytes,
                    max_header_count=args.h11_max_header_count,
                    body_timeout=args.timeout_request_body)
    server = DrainingServer(uvicorn_config(app, args), app.state.kvloom,
                            drain_timeout=args.drain_timeout)
    thread = start_in_thread(server)
    return ThreadServer(f"http://127.0.0.1:{port}", port, async_engine, server, thread)


def stop(live: ThreadServer) -> None:
    live.server.should_exit = True
    live.thread.join(10)
    live.async_engine.shutdown()


@pytest.fixture(scope="module")
def edge(tiny_qwen2):
    """A server with an API key, a 64 KiB body cap and half-second slow-client timeouts."""
    live = serve_in_thread(tiny_qwen2, [
        "--api-key", API_KEY, "--max-body-bytes", str(BODY_CAP),
        "--timeout-request-headers", str(SLOW_CLIENT_TIMEOUT),
        "--timeout-request-body", str(SLOW_CLIENT_TIMEOUT)])
    yield live
    stop(live)


def assert_error(response: httpx.Response, status: int) -> dict:
    assert response.status_code == status, response.text
    error = response.json()["error"]
    assert set(error) == {"message", "type", "param", "code"}
    return error


def completion_body(**fields) -> dict:
    return {"model": MODEL_NAME, "prompt": [1, 2, 3], "max_tokens": 2, **fields}


# --------------------------------------------------------------- raw HTTP/1.1
def raw_request(port: int, path: str, body: bytes = b"", headers: dict | None = None,
                method: str = "POST") -> bytes:
    """One request's bytes, with a Content-Length (unless given headers replace it)."""
    fields = {"Host": "127.0.0.1", "Content-Type": "application/json",
              "Content-Length": str(len(body)), **(headers or {})}
    head = f"{method} {path} HTTP/1.1\r\n" + "".join(f"{k}: {v}\r\n" for k, v in fields.items())
    return (head + "\r\n").encode() + body


def read_until_closed(sock: socket.socket, timeout: float = 5.0) -> bytes:
    """Everything the server sends until it closes the connection (or ``timeout``)."""
    sock.settimeout(timeout)
    data = b""
    try:
        while chunk := sock.recv(65536):
            data += chunk
    except (TimeoutError, ConnectionResetError):
        pass
    return data


def parse_response(data: bytes) -> tuple[int, dict]:
    head, _, body = data.partition(b"\r\n\r\n")
    status = int(head.split(b" ", 2)[1])
    return status, json.loads(body)


def assert_alive(base_url: str) -> None:
    assert httpx.get(f"{base_url}/health", timeout=10).status_code == 200


# ------------------------------------------------------------------- 1. bodies
def _chunks(data: bytes, size: int = 8192):
    for start in range(0, len(data), size):
        yield data[start:start + size]


def test_chunked_body_over_the_cap_is_413_like_a_content_length_one(edge):
    url = f"{edge.base_url}/v1/completions"
    big = json.dumps(completion_body(prompt="x" * (2 * BODY_CAP))).encode()
    headers = {**AUTH, "Content-Type": "application/json"}
    chunked = httpx.post(url, content=_chunks(big), headers=headers, timeout=30)
    declared = httpx.post(url, content=big, headers=headers, timeout=30)
    assert "content-length" not in chunked.request.headers  # the body really was chunked
    assert assert_error(chunked, 413) == assert_error(declared, 413)
    assert_alive(edge.base_url)


def test_chunked_body_under_the_cap_reaches_the_route(edge):
    body = json.dumps(completion_body()).encode()
    response = httpx.post(f"{edge.base_url}/v1/completions", content=_chunks(body, 7),
                          headers={**AUTH, "Content-Type": "application/json"}, timeout=30)
    assert response.status_code == 200, response.text
    assert response.json()["usage"]["completion_tokens"] == 2


def test_body_sent_too_slowly_is_408_and_closed(edge):
    with socket.create_connection(("127.0.0.1", edge.port)) as sock:
        request = raw_request(edge.port, "/v1/completions", b"{" + b" " * 99, AUTH)
        started = time.monotonic()
        sock.sendall(request[:-90])  # the head and 10 of the 100 body bytes, then nothing
        data = read_until_closed(sock)
    elapsed = time.monotonic() - started
    status, body = parse_response(data)
    assert status == 408 and "body" in body["error"]["message"]
    assert SLOW_CLIENT_TIMEOUT * 0.8 < elapsed < SLOW_CLIENT_TIMEOUT + 3
    assert_alive(edge.base_url)


# ----------------------------------------------------------------- 2. headers
def test_headers_sent_a_byte_at_a_time_get_408_and_closed(edge):
    """Slowloris: each byte arrives well inside any idle timeout; the head never ends."""
    head = raw_request(edge.port, "/health", method="GET")[:-2]  # never the final CRLF
    with socket.create_connection(("127.0.0.1", edge.port)) as sock:
        started = time.monotonic()
        for byte in head:  # bounded by the head's length (~90 bytes, 0.05 s apart)
            try:
                sock.sendall(bytes([byte]))
            except OSError:
                break  # closed on us: the deadline fired
            if time.monotonic() - started > SLOW_CLIENT_TIMEOUT + 2:
                break
            time.sleep(0.05)
        data = read_until_closed(sock)
    elapsed = time.monotonic() - started
    status, body = parse_response(data)
    assert status == 408 and "headers" in body["error"]["message"]
    assert elapsed < SLOW_CLIENT_TIMEOUT + 2, "the deadline was renewed by each byte"
    assert_alive(edge.base_url)


def _send_ignoring_reset(sock: socket.socket, data: bytes) -> None:
    try:
        sock.sendall(data)
    except OSError:
        pass  # the server answered and closed before reading all of it


@pytest.mark.parametrize("headers", [
    {"X-Big": "a" * 1_000_000},  # one 1 MB header
    {f"X-H{i}": "v" for i in range(10_000)},  # 10k headers (~150 KB)
], ids=["1MB-header", "10k-headers"])
def test_oversized_request_head_is_431_and_the_server_lives(edge, headers):
    with socket.create_connection(("127.0.0.1", edge.port)) as sock:
        _send_ignoring_reset(sock, raw_request(edge.port, "/health", headers=headers,
                                               method="GET"))
        status, body = parse_response(read_until_closed(sock))
    assert status == 431 and set(body["error"]) == {"message", "type", "param", "code"}
    assert_alive(edge.base_url)


def test_too_many_small_headers_are_431(edge):
    headers = [(f"x-h{i}", "v") for i in range(300)]  # 300 > 256 but only ~3 KB
    response = httpx.get(f"{edge.base_url}/health", headers=headers, timeout=10)
    assert "request headers" in assert_error(response, 431)["message"]
    assert_alive(edge.base_url)


def test_malformed_request_line_is_400_json(edge):
    with socket.create_connection(("127.0.0.1", edge.port)) as sock:
        sock.sendall(b"NOT HTTP AT ALL\r\n\r\n")
        status, body = parse_response(read_until_closed(sock))
    assert status == 400 and body["error"]["code"] == 400
    assert_alive(edge.base_url)


# ----------------------------------------------------------------- 4. API key
@pytest.mark.parametrize("path", ["/openapi.json", "/docs", "/redoc"])
def test_api_docs_need_the_key(edge, path):
    error = assert_error(httpx.get(edge.base_url + path, timeout=10), 401)
    assert error["code"] == "invalid_api_key"
    assert httpx.get(edge.base_url + path, headers=AUTH, timeout=10).status_code == 200


def test_unknown_routes_need_the_key_and_probes_do_not(edge):
    response = httpx.get(f"{edge.base_url}/no-such-route", timeout=10)
    assert_error(response, 401)
    assert response.headers["www-authenticate"] == "Bearer"
    assert_error(httpx.get(f"{edge.base_url}/no-such-route", headers=AUTH, timeout=10), 404)
    for path in ("/health", "/ready", "/metrics"):
        assert httpx.get(edge.base_url + path, timeout=10).status_code == 200, path
    assert_error(httpx.get(f"{edge.base_url}/health/", timeout=10), 401)  # exact paths only


def test_api_key_from_env_is_read_by_config(monkeypatch):
    from kvloom.config import API_KEY_ENV, api_key_from_env

    monkeypatch.setenv(API_KEY_ENV, "s3cret")
    assert api_key_from_env() == "s3cret"
    monkeypatch.setenv(API_KEY_ENV, "  ")
    assert api_key_from_env() is None


def test_cli_defaults_are_the_guard_defaults(tiny_qwen2):
    from kvloom.entrypoints.cli import build_parser
    from kvloom.entrypoints.openai import guard

    args = build_parser().parse_args(["serve", str(tiny_qwen2)])
    assert (args.max_body_bytes, args.h11_max_incomplete_event_size, args.h11_max_header_count,
            args.timeout_request_headers, args.timeout_request_body) == (
        guard.DEFAULT_MAX_BODY_BYTES, guard.DEFAULT_MAX_HEAD_BYTES,
        guard.DEFAULT_MAX_HEADER_COUNT, guard.DEFAULT_HEADER_TIMEOUT, guard.DEFAULT_BODY_TIMEOUT)


# ------------------------------------------------------------ subprocess serve
def start_serve(model_path, *flags, env=None) -> tuple[subprocess.Popen, str]:
    port = _free_port()
    process = subprocess.Popen(
        [sys.executable, "-m", "kvloom.entrypoints.cli", "serve", str(model_path),
         "--port", str(port), "--dtype", "float32", "--served-model-name", MODEL_NAME,
         "--log-level", "warning", *flags],
        stdout=subprocess.PIPE, stderr=subprocess.STDOUT,
        env={**os.environ, "PYTHONUNBUFFERED": "1", **(env or {})})
    base = f"http://127.0.0.1:{port}"
    deadline = time.monotonic() + 90
    while True:
        try:
            if httpx.get(f"{base}/ready", timeout=1).status_code == 200:
                return process, base
        except httpx.HTTPError:
            pass
        if process.poll() is not None or time.monotonic() > deadline:
            process.kill()
            raise AssertionError(f"server never became ready:\n{process.stdout.read().decode()}")
        time.sleep(0.2)


def test_serve_takes_the_api_key_from_the_environment(tiny_qwen2):
    process, base = start_serve(tiny_qwen2, env={"KVLOOM_API_KEY": "from-env"})
    try:
        assert_error(httpx.post(f"{base}/v1/completions", json=completion_body(), timeout=30), 401)
        ok = httpx.post(f"{base}/v1/completions", json=completion_body(), timeout=30,
                        headers={"Authorization": "Bearer from-env"})
        assert ok.status_code == 200, ok.text
    finally:
        process.terminate()
        process.wait(30)


