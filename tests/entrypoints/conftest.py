"""A live `kvloom serve` app (uvicorn in a thread) on the tiny Qwen2 checkpoint."""

from __future__ import annotations

import socket
from dataclasses import dataclass

import pytest
from server_settings import API_KEY, MODEL_NAME
from server_threads import start_in_thread


@dataclass
class LiveServer:
    base_url: str
    async_engine: object
    app: object


def _free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def start_server(model_path, api_key=None, max_body_bytes=64 * 1024, plugin_manager=None,
                 **engine_kwargs):
    import uvicorn

    from kvloom.engine.async_engine import AsyncEngine
    from kvloom.engine.engine import Engine
    from kvloom.engine.llm import engine_config_from_kwargs
    from kvloom.entrypoints.openai.server import build_app

    config = engine_config_from_kwargs(str(model_path), dtype="float32", **engine_kwargs)
    async_engine = AsyncEngine(Engine(config, plugin_manager), max_queued_requests=256)
    app = build_app(async_engine, MODEL_NAME, api_key=api_key, max_body_bytes=max_body_bytes)
    port = _free_port()
    server = uvicorn.Server(uvicorn.Config(app, host="127.0.0.1", port=port, log_level="warning"))
    thread = start_in_thread(server)
    return LiveServer(f"http://127.0.0.1:{port}", async_engine, app), server, thread


def stop_server(server, thread, async_engine) -> None:
    server.should_exit = True
    thread.join(10)
    async_engine.shutdown()


@pytest.fixture(scope="module")
def server_factory():
    """start(model_path, api_key=None, plugin_manager=None, **engine_kwargs) -> LiveServer,
    stopped at teardown."""
    started = []

    def start(model_path, api_key=None, plugin_manager=None, **engine_kwargs) -> LiveServer:
        live, server, thread = start_server(model_path, api_key=api_key,
                                            plugin_manager=plugin_manager, **engine_kwargs)
        started.append((server, thread, live.async_engine))
        return live

    yield start
    for server, thread, async_engine in started:
        stop_server(server, thread, async_engine)


@pytest.fixture(scope="module")
def live_server(tiny_qwen2):
    live, server, thread = start_server(tiny_qwen2, api_key=API_KEY)
    yield live
    stop_server(server, thread, live.async_engine)
