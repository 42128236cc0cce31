"""``kvloom serve -tp 2`` and ``-tp 4`` on the CPU: the official openai client gets the
tokens one rank gives; killing one worker fails the request in flight, turns /health
503, and the server exits, taking the other workers with it."""

from __future__ import annotations

import os
import signal
import socket
import subprocess
import sys
import threading
import time
from pathlib import Path

import httpx
import openai
import pytest
from worker_processes import assert_exited

from kvloom import LLM, SamplingParams

PROMPT = [5, 6, 7, 8, 9]


def _free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def child_pids(pid: int) -> list[int]:
    children = []
    for stat in Path("/proc").glob("[0-9]*/stat"):
        try:
            fields = stat.read_text().rsplit(")", 1)[1].split()
        except OSError:
            continue
        if int(fields[1]) == pid:
            children.append(int(stat.parent.name))
    return children


def wait_ready(process: subprocess.Popen, base: str) -> None:
    deadline = time.monotonic() + 120
    while True:
        try:
            if httpx.get(f"{base}/ready", timeout=1).status_code == 200:
                return
        except httpx.HTTPError:
            pass
        assert process.poll() is None, "the server exited while starting"
        assert time.monotonic() < deadline, "the server never became ready"
        time.sleep(0.2)


@pytest.mark.skipif(not sys.platform.startswith("linux"), reason="reads /proc")
@pytest.mark.parametrize("ranks", [2, 4])
def test_serve_answers_and_ends_cleanly_when_a_worker_dies(tiny_qwen2, ranks):
    expected = LLM(str(tiny_qwen2), dtype="float32").generate(
        [{"prompt_token_ids": PROMPT}], SamplingParams(temperature=0, max_tokens=8,
                                                       ignore_eos=True))[0].outputs[0].text
    port = _free_port()
    process = subprocess.Popen(
        [sys.executable, "-m", "kvloom.entrypoints.cli", "serve", str(tiny_qwen2),
         "-tp", str(ranks), "--port", str(port), "--dtype", "float32", "--served-model-name", "tiny",
         "--log-level", "warning"],
        env={**os.environ, "PYTHONUNBUFFERED": "1"})
    base = f"http://127.0.0.1:{port}"
    try:
        wait_ready(process, base)
        workers = child_pids(process.pid)
        assert len(workers) == ranks - 1, f"expected {ranks - 1} workers, found {workers}"
        client = openai.OpenAI(base_url=f"{base}/v1", api_key="none")
        completion = client.completions.create(model="tiny", prompt=PROMPT, max_tokens=8,
                                               temperature=0, extra_body={"ignore_eos": True})
        assert completion.choices[0].text == expected

        errors: list[BaseException] = []
        started = threading.Event()

        def stream() -> None:
            try:
                for _ in client.completions.create(model="tiny", prompt=PROMPT, stream=True,
                                                   max_tokens=2000, temperature=0,
                                                   extra_body={"ignore_eos": True}):
                    started.set()
            except BaseException as error:  # the stream ends with the engine's error
                errors.append(error)
            finally:
                started.set()

        reader = threading.Thread(target=stream)
        reader.start()
        assert started.wait(60)
        os.kill(workers[0], signal.SIGKILL)
        reader.join(60)
        assert errors, "the stream in flight did not fail"
        statuses = set()
        deadline = time.monotonic() + 30
        while process.poll() is None and time.monotonic() < deadline:
            try:
                statuses.add(httpx.get(f"{base}/health", timeout=1).status_code)
            except httpx.HTTPError:
                pass
            time.sleep(0.05)
        assert 503 in statuses or process.poll() is not None
        assert process.wait(30) is not None, "the server kept running without its worker"
        assert_exited(workers[1:], timeout_s=15)  # the server took the survivors along
    finally:
        if process.poll() is None:
            process.kill()
            process.wait()
