"""Serving /v1/completions, streamed or collected, with OpenAI's completion logprobs."""

from __future__ import annotations

import asyncio
import time
import uuid
from typing import Any

from fastapi import Request
from fastapi.responses import JSONResponse, Response

from kvloom.entrypoints.openai import protocol as p
from kvloom.entrypoints.openai.accumulator import Accumulator, Delta
from kvloom.entrypoints.openai.errors import APIError
from kvloom.entrypoints.openai.prompts import completion_prompt
from kvloom.entrypoints.openai.state import ServerState
from kvloom.entrypoints.openai.streaming import (EventStreamResponse,
                                                 collect_unless_disconnected, events, start)
from kvloom.structured_output.openai_formats import spec_path
from kvloom.entrypoints.openai.validation import (check_length, check_model,
                                                  check_stream_fields, request_cache_salt,
                                                  sampling_params)
from kvloom.outputs import PositionLogprobs


async def serve_completion(state: ServerState, body: p.CompletionRequest,
                           request: Request) -> Response:
    check_model(state, body.model)
    check_stream_fields(body)
    if body.echo and body.logprobs is not None:
        raise APIError(400, "echo with logprobs (prompt logprobs) is not supported yet",
                       param="echo")
    params = sampling_params(body, body.max_tokens, body.logprobs)
    cache_salt = request_cache_salt(body)
    text, token_ids = await completion_prompt(state, body.prompt)
    check_length(state, len(token_ids), params, "prompt", "max_tokens")
    prompt: dict[str, Any] = {"prompt_token_ids": token_ids}
    if text is not None:
        prompt["prompt"] = text
    if cache_salt is not None:
        prompt["cache_salt"] = cache_salt
    request_id = f"cmpl-{uuid.uuid4().hex}"
    created = int(time.time())
    echo_text = None
    if body.echo:
        echo_text = text if text is not None else await asyncio.to_thread(
            state.tokenizer.decode, token_ids)
    first, generator = await start(state, prompt, params, request_id, spec_path(body))
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
        return EventStreamResponse(events(first, generator, accumulator, make_chunks,
                                          usage_chunk, include_usage))

    if not await collect_unless_disconnected(request, first, generator, accumulator):
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
