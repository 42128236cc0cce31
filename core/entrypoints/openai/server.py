"""The OpenAI-compatible HTTP server over AsyncEngine (``kvloom serve``).

``build_app`` returns a FastAPI app; every request is validated (400 naming the
field) before it reaches the engine, streamed over SSE or collected, and aborted
in the engine when its client goes away.
"""

from __future__ import annotations

import asyncio
import hmac
import json
import logging
import time
import uuid
from contextlib import asynccontextmanager
from dataclasses import dataclass, field
from typing import Any, AsyncIterator

import anyio
from fastapi import FastAPI, Request
from fastapi.responses import JSONResponse, Response, StreamingResponse

from kvloom.engine.async_engine import AsyncEngine, EngineDeadError, EngineOverloadedError
from kvloom.entrypoints.openai import protocol as p
from kvloom.entrypoints.openai.errors import (APIError, error_body, error_response,
                                              install_error_handlers, param_of_value_error)
from kvloom.entrypoints.openai.metrics import ServerMetrics
from kvloom.outputs import PositionLogprobs, RequestOutput
from kvloom.sampling_params import RequestOutputKind, SamplingParams

logger = logging.getLogger(__name__)

DEFAULT_MAX_BODY_BYTES = 4 * 1024 * 1024
_PROTECTED_PREFIXES = ("/v1/", "/tokenize", "/detokenize")


@dataclass
class ServerState:
    engine: AsyncEngine
    model_name: str
    metrics: ServerMetrics
    ready: bool = False
    draining: bool = False  # SIGTERM received: finish what runs, take nothing new

    @property
    def tokenizer(self) -> Any:
        return self.engine.tokenizer

    @property
    def max_model_len(self) -> int:
        return self.engine.engine.max_model_len


def build_app(async_engine: AsyncEngine, served_model_name: str, api_key: str | None = None,
              max_body_bytes: int = DEFAULT_MAX_BODY_BYTES, warm_up: bool = True) -> FastAPI:
    """The FastAPI app; its lifespan starts the engine loop (the caller shuts it down)."""
    metrics = ServerMetrics(served_model_name)
    async_engine.observer = metrics
    metrics.on_step(async_engine.latest_stats)
    state = ServerState(async_engine, served_model_name, metrics)

    @asynccontextmanager
    async def lifespan(app: FastAPI):
        async_engine.start()
        if warm_up:
            await _warm_up(async_engine)
        state.ready = async_engine.is_healthy
        yield
        state.ready = False

    app = FastAPI(title="kvloom OpenAI-compatible server", lifespan=lifespan)
    app.state.kvloom = state
    install_error_handlers(app)
    app.add_middleware(GuardMiddleware, api_key=api_key, max_body_bytes=max_body_bytes)
    _add_routes(app, state)
    return app


async def _warm_up(engine: AsyncEngine) -> None:
    params = SamplingParams(max_tokens=1, output_kind=RequestOutputKind.DELTA)
    try:
        async for _ in engine.generate({"prompt_token_ids": [0]}, params, "warmup"):
            pass
    except Exception:  # readiness stays false; /health says why
        logger.exception("warm-up request failed")


# ------------------------------------------------------------------ middleware
class GuardMiddleware:
    """API key on inference routes (constant-time) and a request-body size cap (413)."""

    def __init__(self, app: Any, api_key: str | None, max_body_bytes: int) -> None:
        self.app = app
        self.api_key = api_key.encode() if api_key else None
        self.max_body_bytes = max_body_bytes

    async def __call__(self, scope: dict, receive: Any, send: Any) -> None:
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return
        headers = dict(scope.get("headers") or ())
        if self.api_key and scope["path"].startswith(_PROTECTED_PREFIXES):
            if not self._authorized(headers.get(b"authorization", b"")):
                await error_response(401, "invalid or missing API key",
                                     code="invalid_api_key")(scope, receive, send)
                return
        length = headers.get(b"content-length", b"0")
        if not length.isdigit() or int(length) > self.max_body_bytes:
            message = (f"request body exceeds {self.max_body_bytes} bytes" if length.isdigit()
                       else "invalid Content-Length")
            status = 413 if length.isdigit() else 400
            await error_response(status, message)(scope, receive, send)
            return
        await self.app(scope, self._capped(receive), send)

    def _authorized(self, header: bytes) -> bool:
        scheme, _, token = header.partition(b" ")
        return scheme.lower() == b"bearer" and hmac.compare_digest(token.strip(), self.api_key)

    def _capped(self, receive: Any) -> Any:
        received = 0

        async def capped_receive() -> dict:
            nonlocal received
            message = await receive()
            if message["type"] == "http.request":
                received += len(message.get("body", b""))
                if received > self.max_body_bytes:
                    raise APIError(413, f"request body exceeds {self.max_body_bytes} bytes")
            return message

        return capped_receive


# ---------------------------------------------------------------------- routes
def _add_routes(app: FastAPI, state: ServerState) -> None:
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

    @app.post("/tokenize")
    async def tokenize(body: p.TokenizeRequest) -> JSONResponse:
        _check_model(state, body.model)
        if (body.prompt is None) == (body.messages is None):
            raise APIError(400, "give exactly one of prompt or messages", param="prompt")
        if body.messages is not None:
            token_ids = await _render_chat(state, body.messages, body.add_generation_prompt)
        else:
            token_ids = await asyncio.to_thread(_require_tokenizer(state).encode, body.prompt)
        return JSONResponse({"count": len(token_ids), "max_model_len": state.max_model_len,
                             "tokens": list(token_ids)})

    @app.post("/detokenize")
    async def detokenize(body: p.DetokenizeRequest) -> JSONResponse:
        _check_model(state, body.model)
        _check_vocab(state, body.tokens, "tokens")
        text = await asyncio.to_thread(_require_tokenizer(state).decode, body.tokens)
        return JSONResponse({"prompt": text})

    @app.post("/v1/completions")
    async def completions(body: p.CompletionRequest, request: Request) -> Response:
        return await _serve_completion(state, body, request)

    @app.post("/v1/chat/completions")
    async def chat_completions(body: p.ChatCompletionRequest, request: Request) -> Response:
        return await _serve_chat(state, body, request)


# ------------------------------------------------------------- validation
def _check_model(state: ServerState, model: str | None) -> None:
    if state.draining:
        raise APIError(503, "the server is shutting down", err_type="unavailable",
                       headers={"Retry-After": "1"})
    if model is not None and model != state.model_name:
        raise APIError(404, f"the model {model[:100]!r} does not exist", param="model",
                       code="model_not_found")


def _require_tokenizer(state: ServerState) -> Any:
    if state.tokenizer is None:
        raise APIError(400, "the server runs without a tokenizer (skip_tokenizer_init)")
    return state.tokenizer


def _check_vocab(state: ServerState, token_ids: list[int], param: str) -> None:
    vocab_size = state.engine.engine.input_processor.limits.vocab_size
    if not token_ids:
        raise APIError(400, f"{param} must not be empty", param=param)
    for token_id in token_ids:
        if not 0 <= token_id < vocab_size:
            raise APIError(400, f"{param} contains {token_id}, outside the vocabulary "
                                f"[0, {vocab_size})", param=param)


def _check_stream_fields(body: p.SamplingFields) -> None:
    if body.stream_options is not None and not body.stream:
        raise APIError(400, "stream_options is only allowed when stream is true",
                       param="stream_options")


def _sampling_params(body: p.SamplingFields, max_tokens: int | None,
                     logprobs: int | None) -> SamplingParams:
    values = {name: getattr(body, name) for name in (
        "temperature", "top_p", "top_k", "min_p", "presence_penalty", "frequency_penalty",
        "repetition_penalty") if getattr(body, name) is not None}
    try:
        params = SamplingParams(
            n=body.n, max_tokens=max_tokens, seed=body.seed, stop=body.stop,
            stop_token_ids=body.stop_token_ids, ignore_eos=body.ignore_eos,
            min_tokens=body.min_tokens, logprobs=logprobs,
            skip_special_tokens=body.skip_special_tokens,
            include_stop_str_in_output=body.include_stop_str_in_output,
            output_kind=RequestOutputKind.DELTA, **values)
    except ValueError as exc:
        raise APIError(400, str(exc), param=param_of_value_error(str(exc))) from None
    if params.n > 1 and params.is_greedy:
        raise APIError(400, "n > 1 needs sampling (temperature > 0): greedy samples would "
                            "all be identical", param="n")
    return params


def _check_length(state: ServerState, num_prompt: int, params: SamplingParams,
                  prompt_param: str, max_tokens_param: str) -> None:
    limit = state.max_model_len
    if num_prompt >= limit:
        raise APIError(400, f"this model's maximum context length is {limit} tokens, but the "
                            f"prompt has {num_prompt} tokens", param=prompt_param,
                       code="context_length_exceeded")
    if params.max_tokens is not None and num_prompt + params.max_tokens > limit:
        raise APIError(400, f"this model's maximum context length is {limit} tokens, but "
                            f"{num_prompt} prompt tokens + {max_tokens_param} "
                            f"{params.max_tokens} exceed it", param=max_tokens_param,
                       code="context_length_exceeded")


async def _completion_prompt(state: ServerState, prompt: Any) -> tuple[str | None, list[int]]:
    """(text, token ids) of a completion prompt; one prompt per request for now."""
    if isinstance(prompt, list) and len(prompt) == 1 and isinstance(prompt[0], (str, list)):
        prompt = prompt[0]
    if isinstance(prompt, str):
        if not prompt:
            raise APIError(400, "prompt must not be empty", param="prompt")
        token_ids = await asyncio.to_thread(_require_tokenizer(state).encode, prompt)
        return prompt, list(token_ids)
    if isinstance(prompt, list) and all(isinstance(t, int) for t in prompt):
        _check_vocab(state, prompt, "prompt")
        return None, list(prompt)
    raise APIError(400, "prompt must be a string or a list of token ids; batched prompts "
                        "are not supported yet", param="prompt")


async def _render_chat(state: ServerState, messages: list[p.ChatMessage],
                       add_generation_prompt: bool) -> list[int]:
    tokenizer = _require_tokenizer(state)
    conversation = [{"role": m.role, "content": _message_text(m)} for m in messages]

    def render() -> list[int]:
        token_ids = tokenizer.apply_chat_template(conversation, tokenize=True,
                                                  add_generation_prompt=add_generation_prompt)
        if hasattr(token_ids, "keys"):
            token_ids = token_ids["input_ids"]  # transformers 5 returns a BatchEncoding
        return list(token_ids)

    try:
        return await asyncio.to_thread(render)
    except Exception as exc:
        logger.info("chat template failed: %s", type(exc).__name__)
        raise APIError(400, f"the chat template could not render messages "
                            f"({type(exc).__name__})", param="messages") from None


def _message_text(message: p.ChatMessage) -> str:
    if message.content is None:
        return ""
    if isinstance(message.content, str):
        return message.content
    return "".join(part.text for part in message.content)


# ------------------------------------------------------------------ generation
async def _start(state: ServerState, prompt: dict, params: SamplingParams,
                 request_id: str) -> tuple[RequestOutput, AsyncIterator[RequestOutput]]:
    """Submit and wait for the first output, so input errors still become 4xx."""
    generator = state.engine.generate(prompt, params, request_id)
    try:
        first = await generator.__anext__()
    except StopAsyncIteration:
        raise APIError(500, "the request produced no output") from None
    except ValueError as exc:
        raise APIError(400, str(exc), param=param_of_value_error(str(exc), "prompt")) from None
    except EngineOverloadedError as exc:
        raise APIError(503, str(exc), err_type="overloaded",
                       headers={"Retry-After": str(max(1, round(exc.retry_after)))}) from None
    except EngineDeadError as exc:
        raise APIError(503, str(exc)) from None
    return first, generator


def _stream_error(exc: BaseException) -> dict:
    if isinstance(exc, ValueError):
        return error_body(400, str(exc), param_of_value_error(str(exc)))
    if isinstance(exc, (EngineDeadError, EngineOverloadedError)):
        return error_body(503, str(exc))
    logger.exception("stream failed", exc_info=exc)
    return error_body(500, "internal server error")


@dataclass
class ChoiceState:
    """One choice's text and token count so far, and whether it has ended."""

    texts: list[str] = field(default_factory=list)
    num_tokens: int = 0
    num_chars: int = 0
    logprobs: list[tuple[int, PositionLogprobs]] = field(default_factory=list)
    finish_reason: str | None = None
    stop_reason: int | str | None = None


@dataclass
class Delta:
    index: int
    text: str
    logprobs: list[tuple[int, PositionLogprobs]]
    finish_reason: str | None
    stop_reason: int | str | None
    char_offset: int


class Accumulator:
    """Folds DELTA RequestOutputs into per-choice state; reports what is new."""

    def __init__(self, n: int) -> None:
        self.choices = [ChoiceState() for _ in range(n)]
        self.num_prompt_tokens = 0

    def add(self, output: RequestOutput) -> list[Delta]:
        self.num_prompt_tokens = len(output.prompt_token_ids)
        deltas = []
        for completion in output.outputs:
            choice = self.choices[completion.index]
            if choice.finish_reason is not None:
                continue
            new_logprobs = list(zip(completion.token_ids, completion.logprobs or ()))
            offset = choice.num_chars
            choice.texts.append(completion.text)
            choice.num_chars += len(completion.text)
            choice.num_tokens += len(completion.token_ids)
            choice.logprobs.extend(new_logprobs)
            if completion.finish_reason is not None:
                choice.finish_reason = _finish_reason(completion.finish_reason)
                choice.stop_reason = completion.stop_reason
            # Every step's tokens make a chunk, even when they decode to no text yet
            # (a split multi-byte character, a held-back stop string, no tokenizer):
            # clients and load generators time tokens by chunks.
            if (completion.token_ids or completion.text or new_logprobs
                    or choice.finish_reason is not None):
                deltas.append(Delta(completion.index, completion.text, new_logprobs,
                                    choice.finish_reason, choice.stop_reason, offset))
        return deltas

    def usage(self) -> p.UsageInfo:
        num_generated = sum(choice.num_tokens for choice in self.choices)
        return p.UsageInfo(prompt_tokens=self.num_prompt_tokens, completion_tokens=num_generated,
                           total_tokens=self.num_prompt_tokens + num_generated)


def _finish_reason(reason: str) -> str:
    return reason if reason in ("stop", "length") else "stop"


async def _collect(first: RequestOutput, generator: AsyncIterator[RequestOutput],
                   accumulator: Accumulator) -> None:
    try:
        accumulator.add(first)
        async for output in generator:
            accumulator.add(output)
    except ValueError as exc:
        raise APIError(400, str(exc), param=param_of_value_error(str(exc))) from None
    except (EngineDeadError, EngineOverloadedError) as exc:
        raise APIError(503, str(exc)) from None
    finally:
        await generator.aclose()


async def _collect_unless_disconnected(request: Request, first: RequestOutput,
                                       generator: AsyncIterator[RequestOutput],
                                       accumulator: Accumulator) -> bool:
    """Collect the whole request; False (request aborted) if the client left first."""
    task = asyncio.ensure_future(_collect(first, generator, accumulator))
    watcher = asyncio.ensure_future(_wait_for_disconnect(request))
    try:
        await asyncio.wait({task, watcher}, return_when=asyncio.FIRST_COMPLETED)
    finally:
        watcher.cancel()
        if not task.done():
            task.cancel()
            await asyncio.gather(task, return_exceptions=True)
    if task.cancelled():
        return False
    task.result()
    return True


async def _wait_for_disconnect(request: Request) -> None:
    while (await request.receive())["type"] != "http.disconnect":
        pass


class EventStreamResponse(StreamingResponse):
    """SSE that stops (and so aborts the request) as soon as the client disconnects,
    whatever ASGI spec version the server speaks."""

    def __init__(self, content: AsyncIterator[str]) -> None:
        super().__init__(content, media_type="text/event-stream",
                         headers={"Cache-Control": "no-cache"})

    async def __call__(self, scope: dict, receive: Any, send: Any) -> None:
        try:
            async with anyio.create_task_group() as group:
                async def stream() -> None:
                    try:
                        await self.stream_response(send)
                    except OSError:
                        pass
                    group.cancel_scope.cancel()

                group.start_soon(stream)
                await self.listen_for_disconnect(receive)
                group.cancel_scope.cancel()
        finally:
            await self.body_iterator.aclose()


def _sse(data: Any) -> str:
    if hasattr(data, "model_dump"):
        data = p.dump(data)
    return f"data: {json.dumps(data, ensure_ascii=False, separators=(',', ':'))}\n\n"


async def _events(first: RequestOutput, generator: AsyncIterator[RequestOutput],
                  accumulator: Accumulator, make_chunks: Any, usage_chunk: Any,
                  include_usage: bool) -> AsyncIterator[str]:
    try:
        for chunk in make_chunks(accumulator.add(first)):
            yield _sse(chunk)
        async for output in generator:
            for chunk in make_chunks(accumulator.add(output)):
                yield _sse(chunk)
        if include_usage:
            yield _sse(usage_chunk(accumulator.usage()))
    except Exception as exc:  # mid-stream: the status line has gone out already
        yield _sse(_stream_error(exc))
    finally:
        await generator.aclose()
    yield "data: [DONE]\n\n"


# ----------------------------------------------------------------- completions
async def _serve_completion(state: ServerState, body: p.CompletionRequest,
                            request: Request) -> Response:
    _check_model(state, body.model)
    _check_stream_fields(body)
    if body.echo and body.logprobs is not None:
        raise APIError(400, "echo with logprobs (prompt logprobs) is not supported yet",
                       param="echo")
    params = _sampling_params(body, body.max_tokens, body.logprobs)
    text, token_ids = await _completion_prompt(state, body.prompt)
    _check_length(state, len(token_ids), params, "prompt", "max_tokens")
    prompt: dict[str, Any] = {"prompt_token_ids": token_ids}
    if text is not None:
        prompt["prompt"] = text
    request_id = f"cmpl-{uuid.uuid4().hex}"
    created = int(time.time())
    echo_text = None
    if body.echo:
        echo_text = text if text is not None else await asyncio.to_thread(
            state.tokenizer.decode, token_ids)
    first, generator = await _start(state, prompt, params, request_id)
    accumulator = Accumulator(params.n)

    def choice(index: int, text: str, logprobs: list, finish: str | None,
               stop_reason: Any, offset: int) -> p.CompletionChoice:
        return p.CompletionChoice(
            index=index, text=text, finish_reason=finish, stop_reason=stop_reason,
            logprobs=_completion_logprobs(logprobs, offset) if body.logprobs is not None else None)

    if body.stream:
        echoed: set[int] = set()

        def make_chunks(deltas: list[Delta]) -> list[p.CompletionResponse]:
            chunks = []
            for d in deltas:
                text = d.text
                if echo_text is not None and d.index not in echoed:
                    echoed.add(d.index)
                    text = echo_text + text
                chunks.append(p.CompletionResponse(
                    id=request_id, created=created, model=state.model_name,
                    choices=[choice(d.index, text, d.logprobs, d.finish_reason, d.stop_reason,
                                    d.char_offset)]))
            return chunks

        def usage_chunk(usage: p.UsageInfo) -> p.CompletionResponse:
            return p.CompletionResponse(id=request_id, created=created, model=state.model_name,
                                        choices=[], usage=usage)

        include_usage = bool(body.stream_options and body.stream_options.include_usage)
        return EventStreamResponse(_events(first, generator, accumulator, make_chunks,
                                           usage_chunk, include_usage))

    if not await _collect_unless_disconnected(request, first, generator, accumulator):
        return Response(status_code=499)
    choices = [choice(i, (echo_text or "") + "".join(c.texts), c.logprobs, c.finish_reason,
                      c.stop_reason, 0) for i, c in enumerate(accumulator.choices)]
    response = p.CompletionResponse(id=request_id, created=created, model=state.model_name,
                                    choices=choices, usage=accumulator.usage())
    return JSONResponse(p.dump(response))


def _completion_logprobs(entries: list[tuple[int, PositionLogprobs]],
                         offset: int) -> p.CompletionLogprobs:
    result = p.CompletionLogprobs()
    for token_id, position in entries:
        sampled = position.get(token_id)
        token = (sampled.decoded_token or "") if sampled else ""
        result.tokens.append(token)
        result.token_logprobs.append(sampled.logprob if sampled else None)
        result.top_logprobs.append({(lp.decoded_token or ""): lp.logprob
                                    for lp in position.values()})
        result.text_offset.append(offset)
        offset += len(token)
    return result


# ------------------------------------------------------------------------ chat
async def _serve_chat(state: ServerState, body: p.ChatCompletionRequest,
                      request: Request) -> Response:
    _check_model(state, body.model)
    _check_stream_fields(body)
    if body.top_logprobs is not None and not body.logprobs:
        raise APIError(400, "top_logprobs needs logprobs to be true", param="top_logprobs")
    max_tokens_param = "max_completion_tokens" if body.max_completion_tokens is not None \
        else "max_tokens"
    max_tokens = body.max_completion_tokens if body.max_completion_tokens is not None \
        else body.max_tokens
    num_top = (body.top_logprobs or 0) if body.logprobs else None
    try:
        params = _sampling_params(body, max_tokens, num_top)
    except APIError as exc:
        if exc.param == "max_tokens":
            exc.param = max_tokens_param
        elif exc.param == "logprobs":
            exc.param = "top_logprobs"
        raise
    token_ids = await _render_chat(state, body.messages, body.add_generation_prompt)
    if not token_ids:
        raise APIError(400, "messages rendered to an empty prompt", param="messages")
    _check_length(state, len(token_ids), params, "messages", max_tokens_param)
    request_id = f"chatcmpl-{uuid.uuid4().hex}"
    created = int(time.time())
    first, generator = await _start(state, {"prompt_token_ids": token_ids}, params, request_id)
    accumulator = Accumulator(params.n)

    def logprobs_of(entries: list) -> p.ChatLogprobs | None:
        return _chat_logprobs(entries, num_top) if num_top is not None else None

    if body.stream:
        def chunk(choices: list[p.ChatChunkChoice]) -> p.ChatCompletionChunk:
            return p.ChatCompletionChunk(id=request_id, created=created, model=state.model_name,
                                         choices=choices)

        def make_chunks(deltas: list[Delta]) -> list[p.ChatCompletionChunk]:
            return [chunk([p.ChatChunkChoice(
                index=d.index, delta=p.DeltaMessage(content=d.text),
                logprobs=logprobs_of(d.logprobs), finish_reason=d.finish_reason,
                stop_reason=d.stop_reason)]) for d in deltas]

        def usage_chunk(usage: p.UsageInfo) -> p.ChatCompletionChunk:
            return p.ChatCompletionChunk(id=request_id, created=created, model=state.model_name,
                                         choices=[], usage=usage)

        role_chunks = [chunk([p.ChatChunkChoice(index=i, delta=p.DeltaMessage(
            role="assistant", content=""))]) for i in range(params.n)]
        include_usage = bool(body.stream_options and body.stream_options.include_usage)
        events = _events(first, generator, accumulator, make_chunks, usage_chunk, include_usage)
        return EventStreamResponse(_prefixed(role_chunks, events))

    if not await _collect_unless_disconnected(request, first, generator, accumulator):
        return Response(status_code=499)
    choices = [p.ChatChoice(index=i, message=p.ChatResponseMessage(content="".join(c.texts)),
                            logprobs=logprobs_of(c.logprobs), finish_reason=c.finish_reason,
                            stop_reason=c.stop_reason)
               for i, c in enumerate(accumulator.choices)]
    response = p.ChatCompletionResponse(id=request_id, created=created, model=state.model_name,
                                        choices=choices, usage=accumulator.usage())
    return JSONResponse(p.dump(response))


async def _prefixed(chunks: list[Any], events: AsyncIterator[str]) -> AsyncIterator[str]:
    try:
        for chunk in chunks:
            yield _sse(chunk)
        async for event in events:
            yield event
    finally:
        await events.aclose()


def _chat_logprobs(entries: list[tuple[int, PositionLogprobs]],
                   num_top: int) -> p.ChatLogprobs:
    content = []
    for token_id, position in entries:
        sampled = position.get(token_id)
        token = (sampled.decoded_token or "") if sampled else ""
        ranked = sorted((lp for lp in position.values() if lp.rank is not None
                         and lp.rank <= num_top), key=lambda lp: lp.rank)
        top = [p.TopLogprob(token=lp.decoded_token or "", logprob=lp.logprob,
                            bytes=list((lp.decoded_token or "").encode()))
               for lp in ranked[:num_top]]
        content.append(p.TokenLogprob(token=token, bytes=list(token.encode()),
                                      logprob=sampled.logprob if sampled else float("-inf"),
                                      top_logprobs=top))
    return p.ChatLogprobs(content=content)
