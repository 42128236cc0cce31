"""Running a request in the engine and delivering its outputs: submitted with input
errors still mapped to 4xx, then either collected whole (aborted if the client leaves)
or streamed as server-sent events."""

from __future__ import annotations

import asyncio
import json
import logging
from typing import Any, AsyncIterator

import anyio
from fastapi import Request
from fastapi.responses import StreamingResponse

from kvloom.engine.async_engine import EngineDeadError, EngineOverloadedError
from kvloom.failures import RequestFailedError
from kvloom.entrypoints.openai import protocol as p
from kvloom.entrypoints.openai.accumulator import Accumulator
from kvloom.entrypoints.openai.errors import APIError, error_body, param_of_value_error
from kvloom.entrypoints.openai.state import ServerState
from kvloom.outputs import RequestOutput
from kvloom.sampling_params import SamplingParams

logger = logging.getLogger(__name__)


class StreamCut(RuntimeError):
    """The drain timeout ended a request that was still running."""


async def start(state: ServerState, prompt: dict, params: SamplingParams, request_id: str,
                spec_path: str | None = None
                ) -> tuple[RequestOutput, AsyncIterator[RequestOutput]]:
    """Submit and wait for the first output, so input errors still become 4xx.

    ``spec_path`` names the request field holding a structured-output spec, so the
    engine refusing the spec (checked at admission) becomes a 400 naming it. A client
    that leaves meanwhile is handled by GuardMiddleware, which cancels the request.
    """
    generator = _cut_at_drain_timeout(state, request_id,
                                      state.engine.generate(prompt, params, request_id))
    try:
        first = await generator.__anext__()
    except StopAsyncIteration:
        raise APIError(500, "the request produced no output") from None
    except ValueError as exc:
        raise _admission_error(str(exc), spec_path) from None
    except EngineOverloadedError as exc:
        raise APIError(503, str(exc), err_type="overloaded",
                       headers={"Retry-After": str(max(1, round(exc.retry_after)))}) from None
    except (EngineDeadError, StreamCut) as exc:
        raise APIError(503, str(exc)) from None
    except RequestFailedError as exc:  # its message names the stage, nothing internal
        raise APIError(500, str(exc)) from None
    return first, generator


async def _cut_at_drain_timeout(state: ServerState, request_id: str,
                                generator: AsyncIterator[RequestOutput]
                                ) -> AsyncIterator[RequestOutput]:
    """``generator``'s outputs, until ServerState.cut_streams aborts the request: that
    abort becomes StreamCut (an error for the client, never finish_reason "abort")."""
    state.live_request_ids.add(request_id)
    try:
        async for output in generator:
            if state.streams_cut and _aborted(output):
                raise StreamCut("the server is shutting down; the request was cut "
                                "at the drain timeout")
            yield output
    finally:
        state.live_request_ids.discard(request_id)
        await generator.aclose()


def _aborted(output: RequestOutput) -> bool:
    return output.finished and all(c.finish_reason == "abort" for c in output.outputs)


def _admission_error(message: str, spec_path: str | None) -> APIError:
    param = param_of_value_error(message)
    if param is None and spec_path is not None:
        # The server checked everything else already; what is left is the spec.
        return APIError(400, f"{spec_path}: {message}", param=spec_path.split(".")[0])
    return APIError(400, message, param=param or "prompt")


def _stream_error(exc: BaseException) -> dict:
    if isinstance(exc, ValueError):
        return error_body(400, str(exc), param_of_value_error(str(exc)))
    if isinstance(exc, (EngineDeadError, EngineOverloadedError, StreamCut)):
        return error_body(503, str(exc))
    if isinstance(exc, RequestFailedError):
        return error_body(500, str(exc))
    logger.exception("stream failed", exc_info=exc)
    return error_body(500, "internal server error")


async def _collect(first: RequestOutput, generator: AsyncIterator[RequestOutput],
                   accumulator: Accumulator) -> None:
    try:
        accumulator.add(first)
        async for output in generator:
            accumulator.add(output)
    except ValueError as exc:
        raise APIError(400, str(exc), param=param_of_value_error(str(exc))) from None
    except (EngineDeadError, EngineOverloadedError, StreamCut) as exc:
        raise APIError(503, str(exc)) from None
    except RequestFailedError as exc:
        raise APIError(500, str(exc)) from None
    finally:
        await generator.aclose()


async def collect_unless_disconnected(request: Request, first: RequestOutput,
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


def sse(data: Any) -> str:
    if hasattr(data, "model_dump"):
        data = p.dump(data)
    return f"data: {json.dumps(data, ensure_ascii=False, separators=(',', ':'))}\n\n"


async def events(first: RequestOutput, generator: AsyncIterator[RequestOutput],
                 accumulator: Accumulator, make_chunks: Any, usage_chunk: Any,
                 include_usage: bool) -> AsyncIterator[str]:
    try:
        for chunk in make_chunks(accumulator.add(first)):
            yield sse(chunk)
        async for output in generator:
            for chunk in make_chunks(accumulator.add(output)):
                yield sse(chunk)
        if include_usage:
            yield sse(usage_chunk(accumulator.usage()))
    except Exception as exc:  # mid-stream: the status line has gone out already
        yield sse(_stream_error(exc))
    finally:
        await generator.aclose()
    yield "data: [DONE]\n\n"


async def prefixed(chunks: list[Any], stream: AsyncIterator[str]) -> AsyncIterator[str]:
    """``chunks`` as events, then the events of ``stream``."""
    try:
        for chunk in chunks:
            yield sse(chunk)
        async for event in stream:
            yield event
    finally:
        await stream.aclose()
