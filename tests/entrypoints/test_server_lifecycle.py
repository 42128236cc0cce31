"""The server's lifecycle (issue "No request can kill the engine"): a client that leaves
before its first token is aborted at once, the drain timeout cuts what still runs with
an error (a stream's last events: the error, then [DONE]), and a dead engine stops the
server with a non-zero exit code so a supervisor restarts it."""

from __future__ import annotations

import json
import re
import signal
import socket
import sys
import threading
import time

import httpx
import pytest
from test_server_limits import (assert_alive, assert_error, completion_body, raw_request,
                                serve_in_thread, start_serve, stop)

from kvloom.testing.checkpoints import TinyQwen2Spec

LONG_CONTEXT = 4096  # room for requests that outlive every wait in these tests


@pytest.fixture(scope="module")
def long_model(tiny_qwen2_factory):
    return tiny_qwen2_factory(TinyQwen2Spec(max_position_embeddings=LONG_CONTEXT))


def _wait_for(predicate, timeout: float = 5.0) -> bool:
    deadline = time.monotonic() + timeout
    while not predicate():
        if time.monotonic() > deadline:
            return False
        time.sleep(0.02)
    return True


def _num_running(base: str) -> float:
    text = httpx.get(f"{base}/metrics", timeout=10).text
    return float(re.search(r"^kvloom:num_requests_running\{[^}]*\} (\S+)$", text,
                           re.MULTILINE).group(1))


# ------------------------------------------------------- 3. the drain timeout
@pytest.mark.skipif(sys.platform == "win32", reason="POSIX signals")
def test_drain_timeout_cuts_streams_with_an_error_then_done(long_model):
    process, base = start_serve(long_model, "--drain-timeout", "1")
    lines: list[str] = []
    collected: list[httpx.Response] = []
    streaming = threading.Event()
    try:
        def stream() -> None:
            body = completion_body(max_tokens=LONG_CONTEXT - 8, stream=True, ignore_eos=True)
            with httpx.stream("POST", f"{base}/v1/completions", json=body, timeout=60) as response:
                for line in response.iter_lines():
                    if line.startswith("data: "):
                        lines.append(line)
                        streaming.set()

        def collect() -> None:
            body = completion_body(max_tokens=LONG_CONTEXT - 8, ignore_eos=True)
            collected.append(httpx.post(f"{base}/v1/completions", json=body, timeout=60))

        clients = [threading.Thread(target=stream), threading.Thread(target=collect)]
        for client in clients:
            client.start()
        assert streaming.wait(30), "the stream never started"
        assert _wait_for(lambda: _num_running(base) == 2, timeout=30), "not both running"
        sigterm_at = time.monotonic()
        process.send_signal(signal.SIGTERM)
        for client in clients:
            client.join(30)
        cut_after = time.monotonic() - sigterm_at
        exit_code = process.wait(30)
    finally:
        if process.poll() is None:
            process.kill()
    assert lines[-1] == "data: [DONE]"
    error = json.loads(lines[-2][6:])["error"]
    assert error["code"] == 503 and "drain timeout" in error["message"]
    assert all("error" not in json.loads(line[6:]) for line in lines[:-2])
    assert "drain timeout" in assert_error(collected[0], 503)["message"]
    assert 0.9 < cut_after < 10, cut_after  # after the drain timeout, not at SIGTERM
    assert exit_code == 0, process.stdout.read().decode()[-2000:]


# ---------------------------------------------- 5. leaving before the first token
@pytest.fixture(scope="module")
def one_seat(long_model):
    """A server that runs one sequence at a time: a second request has to wait."""
    live = serve_in_thread(long_model, max_num_seqs=1)
    yield live
    stop(live)


def test_a_client_leaving_before_its_first_token_is_aborted_at_once(one_seat):
    engine = one_seat.async_engine
    long_body = json.dumps(completion_body(max_tokens=LONG_CONTEXT - 8, stream=True,
                                           ignore_eos=True)).encode()
    occupant = socket.create_connection(("127.0.0.1", one_seat.port))
    try:
        occupant.sendall(raw_request(one_seat.port, "/v1/completions", long_body))
        assert _wait_for(lambda: engine.latest_stats.num_running == 1)
        for stream in (False, True):
            body = json.dumps(completion_body(max_tokens=8, stream=stream)).encode()
            with socket.create_connection(("127.0.0.1", one_seat.port)) as waiting:
                waiting.sendall(raw_request(one_seat.port, "/v1/completions", body))
                assert _wait_for(lambda: engine.num_requests_in_flight == 2
                                 and engine.latest_stats.num_waiting == 1), "never queued"
            # Closed before any token: gone from the engine at once, the occupant runs on.
            assert _wait_for(lambda: engine.num_requests_in_flight == 1
                             and engine.latest_stats.num_waiting == 0, timeout=2), stream
            assert engine.latest_stats.num_running == 1
    finally:
        occupant.close()
    assert _wait_for(lambda: engine.num_requests_in_flight == 0)
    assert _wait_for(lambda: engine.latest_stats.num_running == 0)
    stats = engine.engine.get_stats()
    assert stats.num_running == stats.num_waiting == 0
    assert stats.num_free_blocks == stats.num_total_blocks
    assert_alive(one_seat.base_url)


# -------------------------------------------------------------- 6. engine death
def test_a_dead_engine_stops_the_server_with_exit_code_1(tiny_qwen2):
    from kvloom.entrypoints.openai.draining import ENGINE_FAILURE_EXIT_CODE

    live = serve_in_thread(tiny_qwen2)
    try:
        def broken_forward(*args, **kwargs):
            raise RuntimeError("CUDA error: an illegal memory access was encountered")

        live.async_engine.engine.core.runner.execute_async = broken_forward
        response = httpx.post(f"{live.base_url}/v1/completions", json=completion_body(),
                              timeout=30)
        assert response.status_code >= 500
        assert set(response.json()["error"]) == {"message", "type", "param", "code"}
        if live.async_engine.is_healthy:  # an engine that survives one failed step
            live.async_engine.dead_error = RuntimeError("the test declares the engine dead")
        live.thread.join(10)
        assert not live.thread.is_alive(), "the server kept running on a dead engine"
        assert live.server.exit_code == ENGINE_FAILURE_EXIT_CODE
    finally:
        stop(live)
