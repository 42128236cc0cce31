"""The OpenAI-compatible HTTP server over AsyncEngine (``kvloom serve``).

``build_app`` returns a FastAPI app; every request is validated (400 naming the
field) before it reaches the engine, streamed over SSE or collected, and aborted
in the engine when its client goes away.

The pieces live beside this module: ``guard`` (the HTTP edge: API key, header and
body limits, early disconnects), ``draining`` (SIGTERM, engine death), ``validation``
and ``prompts`` (request checks, token ids), ``streaming`` and ``accumulator``
(engine outputs to SSE or one response), ``completions`` and ``chat`` (the two
inference routes).
"""

from __future__ import annotations

import asyncio
import logging
from contextlib import asynccontextmanager

from fastapi import FastAPI, Request
from fastapi.responses import JSONResponse, Response

from kvloom.engine.async_engine import AsyncEngine
from kvloom.entrypoints.openai import protocol as p
from kvloom.entrypoints.openai.chat import serve_chat
from kvloom.entrypoints.openai.completions import serve_completion
from kvloom.entrypoints.openai.errors import APIError, error_response, install_error_handlers
from kvloom.entrypoints.openai.guard import (DEFAULT_BODY_TIMEOUT, DEFAULT_MAX_BODY_BYTES,
                                             DEFAULT_MAX_HEADER_COUNT, GuardMiddleware)
from kvloom.entrypoints.openai.metrics import ServerMetrics
from kvloom.entrypoints.openai.prompts import render_chat
from kvloom.entrypoints.openai.state import ServerState
from kvloom.entrypoints.openai.validation import check_model, check_vocab, require_tokenizer
from kvloom.sampling_params import RequestOutputKind, SamplingParams

__all__ = ["DEFAULT_MAX_BODY_BYTES", "GuardMiddleware", "ServerState", "build_app"]

logger = logging.getLogger(__name__)

ENGINE_WATCH_INTERVAL = 0.25  # seconds between checks that the engine loop is alive


def build_app(async_engine: AsyncEngine, served_model_name: str, api_key: str | None = None,
              max_body_bytes: int = DEFAULT_MAX_BODY_BYTES, warm_up: bool = True,
              max_header_count: int = DEFAULT_MAX_HEADER_COUNT,
              body_timeout: float = DEFAULT_BODY_TIMEOUT) -> FastAPI:
    """The FastAPI app; its lifespan starts the engine loop (the caller shuts it down)
    and watches it: once it dies, ``ServerState.on_engine_dead`` is called."""
    metrics = ServerMetrics(served_model_name)
    async_engine.observer = metrics
    metrics.on_step(async_engine.latest_stats)
    state = ServerState(async_engine, served_model_name, metrics)

    @asynccontextmanager
    async def lifespan(app: FastAPI):
        async_engine.start()
        warmed_up = await _warm_up(async_engine) if warm_up else True
        state.ready = warmed_up and async_engine.is_healthy
        watcher = asyncio.ensure_future(_watch_engine(state))
        try:
            yield
        finally:
            watcher.cancel()
            state.ready = False

    app = FastAPI(title="kvloom OpenAI-compatible server", lifespan=lifespan)
    app.state.kvloom = state
    install_error_handlers(app)
    app.add_middleware(GuardMiddleware, api_key=api_key, max_body_bytes=max_body_bytes,
                       max_header_count=max_header_count, body_timeout=body_timeout)
    _add_routes(app, state)
    return app


async def _warm_up(engine: AsyncEngine) -> bool:
    """Whether a one-token request went through (the engine may survive a failed one)."""
    params = SamplingParams(max_tokens=1, output_kind=RequestOutputKind.DELTA)
    try:
        async for _ in engine.generate({"prompt_token_ids": [0]}, params, "warmup"):
            pass
    except Exception:  # readiness stays false
        logger.exception("warm-up request failed")
        return False
    return True


async def _watch_engine(state: ServerState) -> None:
    """A dead engine loop never comes back: rather than answer 503 forever, tell the
    server to exit (in-flight requests have had their errors from AsyncEngine)."""
    while state.engine.is_healthy:
        await asyncio.sleep(ENGINE_WATCH_INTERVAL)
    if state.on_engine_dead is None:
        logger.error("the engine loop has stopped; every request will get 503")
        return
    logger.error("the engine loop has stopped; shutting the server down")
    state.on_engine_dead()


def _add_routes(app: FastAPI, state: ServerState) -> None:
    _add_status_routes(app, state)
    _add_token_routes(app, state)

    @app.post("/v1/completions")
    async def completions(body: p.CompletionRequest, request: Request) -> Response:
        return await serve_completion(state, body, request)

    @app.post("/v1/chat/completions")
    async def chat_completions(body: p.ChatCompletionRequest, request: Request) -> Response:
        return await serve_chat(state, body, request)


def _add_status_routes(app: FastAPI, state: ServerState) -> None:
    @app.get("/health")
    async def health() -> Response:
        if not state.engine.is_healthy:
            return error_response(503, "the engine is not running")
        return JSONResponse({"status": "ok"})

    @app.get("/ready")
    async def ready() -> Response:
        if state.draining or not (state.ready and state.engine.is_healthy):
            return error_response(503, "the server is not ready")
        return JSONResponse({"status": "ready"})

    @app.get("/metrics")
    async def metrics() -> Response:
        from prometheus_client import CONTENT_TYPE_LATEST

        return Response(state.metrics.render(), media_type=CONTENT_TYPE_LATEST)

    @app.get("/v1/models")
    async def models() -> JSONResponse:
        card = p.ModelCard(id=state.model_name, max_model_len=state.max_model_len,
                           root=state.engine.engine.config.model.model)
        return JSONResponse(p.dump(p.ModelList(data=[card])))


def _add_token_routes(app: FastAPI, state: ServerState) -> None:
    @app.post("/tokenize")
    async def tokenize(body: p.TokenizeRequest) -> JSONResponse:
        check_model(state, body.model)
        if (body.prompt is None) == (body.messages is None):
            raise APIError(400, "give exactly one of prompt or messages", param="prompt")
        if body.messages is not None:
            token_ids = await render_chat(state, body.messages, body.add_generation_prompt)
        else:
            token_ids = await asyncio.to_thread(require_tokenizer(state).encode, body.prompt)
        return JSONResponse({"count": len(token_ids), "max_model_len": state.max_model_len,
                             "tokens": list(token_ids)})

    @app.post("/detokenize")
    async def detokenize(body: p.DetokenizeRequest) -> JSONResponse:
        check_model(state, body.model)
        check_vocab(state, body.tokens, "tokens")
        text = await asyncio.to_thread(require_tokenizer(state).decode, body.tokens)
        return JSONResponse({"prompt": text})
