"""SIGTERM: in-flight streams finish, the process exits 0 within the drain timeout."""

from __future__ import annotations

import json
import os
import signal
import socket
import subprocess
import sys
import threading
import time

import httpx
import pytest


def _free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


@pytest.mark.skipif(sys.platform == "win32", reason="POSIX signals")
def test_sigterm_drains_in_flight_streams_and_exits_zero(tiny_qwen2):
    port = _free_port()
    process = subprocess.Popen(
        [sys.executable, "-m", "kvloom.entrypoints.cli", "serve", str(tiny_qwen2),
         "--port", str(port), "--dtype", "float32", "--served-model-name", "tiny",
         "--drain-timeout", "20", "--log-level", "warning"],
        stdout=subprocess.PIPE, stderr=subprocess.STDOUT, env={**os.environ, "PYTHONUNBUFFERED": "1"})
    base = f"http://127.0.0.1:{port}"
    try:
        deadline = time.monotonic() + 90
        while True:
            try:
                if httpx.get(f"{base}/ready", timeout=1).status_code == 200:
                    break
            except httpx.HTTPError:
                pass
            assert process.poll() is None, process.stdout.read().decode()
            assert time.monotonic() < deadline, "server never became ready"
            time.sleep(0.2)

        chunks: list[dict] = []
        started = threading.Event()

        def stream() -> None:
            body = {"model": "tiny", "prompt": [1, 2, 3], "max_tokens": 300, "stream": True,
                    "temperature": 0, "ignore_eos": True,
                    "stream_options": {"include_usage": True}}
            with httpx.stream("POST", f"{base}/v1/completions", json=body, timeout=60) as response:
                for line in response.iter_lines():
                    if line.startswith("data: ") and line != "data: [DONE]":
                        chunks.append(json.loads(line[6:]))
                        started.set()

        client = threading.Thread(target=stream)
        client.start()
        assert started.wait(30), "the stream never started"
        process.send_signal(signal.SIGTERM)
        client.join(60)
        assert process.wait(30) == 0
        finish = [c["choices"][0]["finish_reason"] for c in chunks if c.get("choices")]
        assert finish[-1] == "length", "the in-flight stream was cut short"
        assert chunks[-1]["usage"]["completion_tokens"] == 300
    finally:
        if process.poll() is None:
            process.kill()
