"""Serving /v1/chat/completions, streamed or collected, with OpenAI's chat logprobs."""

from __future__ import annotations

import time
import uuid

from fastapi import Request
from fastapi.responses import JSONResponse, Response

from kvloom.entrypoints.openai import protocol as p
from kvloom.entrypoints.openai.accumulator import Accumulator, Delta
from kvloom.entrypoints.openai.errors import APIError
from kvloom.entrypoints.openai.prompts import render_chat
from kvloom.entrypoints.openai.state import ServerState
from kvloom.entrypoints.openai.streaming import (EventStreamResponse,
                                                 collect_unless_disconnected, events,
                                                 prefixed, start)
from kvloom.structured_output.openai_formats import spec_path
from kvloom.entrypoints.openai.validation import (check_length, check_model,
                                                  check_stream_fields, request_cache_salt,
                                                  sampling_params)
from kvloom.outputs import PositionLogprobs


async def serve_chat(state: ServerState, body: p.ChatCompletionRequest,
                     request: Request) -> Response:
    check_model(state, body.model)
    check_stream_fields(body)
    if body.top_logprobs is not None and not body.logprobs:
        raise APIError(400, "top_logprobs needs logprobs to be true", param="top_logprobs")
    max_tokens_param = "max_completion_tokens" if body.max_completion_tokens is not None \
        else "max_tokens"
    max_tokens = body.max_completion_tokens if body.max_completion_tokens is not None \
        else body.max_tokens
    num_top = (body.top_logprobs or 0) if body.logprobs else None
    try:
        params = sampling_params(body, max_tokens, num_top)
    except APIError as exc:
        if exc.param == "max_tokens":
            exc.param = max_tokens_param
        elif exc.param == "logprobs":
            exc.param = "top_logprobs"
        raise
    cache_salt = request_cache_salt(body)
    token_ids = await render_chat(state, body.messages, body.add_generation_prompt)
    if not token_ids:
        raise APIError(400, "messages rendered to an empty prompt", param="messages")
    check_length(state, len(token_ids), params, "messages", max_tokens_param)
    request_id = f"chatcmpl-{uuid.uuid4().hex}"
    created = int(time.time())
    prompt = {"prompt_token_ids": token_ids}
    if cache_salt is not None:
        prompt["cache_salt"] = cache_salt
    first, generator = await start(state, prompt, params, request_id, spec_path(body))
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
        stream = events(first, generator, accumulator, make_chunks, usage_chunk, include_usage)
        return EventStreamResponse(prefixed(role_chunks, stream))

    if not await collect_unless_disconnected(request, first, generator, accumulator):
        return Response(status_code=499)
    choices = [p.ChatChoice(index=i, message=p.ChatResponseMessage(content="".join(c.texts)),
                            logprobs=logprobs_of(c.logprobs), finish_reason=c.finish_reason,
                            stop_reason=c.stop_reason)
               for i, c in enumerate(accumulator.choices)]
    response = p.ChatCompletionResponse(id=request_id, created=created, model=state.model_name,
                                        choices=choices, usage=accumulator.usage())
    return JSONResponse(p.dump(response))


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
