"""Request checks that turn bad input into a 400 naming the field before the engine
sees it, and the mapping of request fields onto SamplingParams."""

from __future__ import annotations

from typing import Any

from kvloom.entrypoints.openai import protocol as p
from kvloom.entrypoints.openai.errors import APIError, param_of_value_error
from kvloom.entrypoints.openai.state import ServerState
from kvloom.entrypoints.openai.structured import structured_outputs_from_request
from kvloom.sampling_params import RequestOutputKind, SamplingParams


def check_model(state: ServerState, model: str | None) -> None:
    if state.draining:
        raise APIError(503, "the server is shutting down", err_type="unavailable",
                       headers={"Retry-After": "1"})
    if model is not None and model != state.model_name:
        raise APIError(404, f"the model {model[:100]!r} does not exist", param="model",
                       code="model_not_found")


def require_tokenizer(state: ServerState) -> Any:
    if state.tokenizer is None:
        raise APIError(400, "the server runs without a tokenizer (skip_tokenizer_init)")
    return state.tokenizer


def check_vocab(state: ServerState, token_ids: list[int], param: str) -> None:
    vocab_size = state.engine.engine.input_processor.limits.vocab_size
    if not token_ids:
        raise APIError(400, f"{param} must not be empty", param=param)
    for token_id in token_ids:
        if not 0 <= token_id < vocab_size:
            raise APIError(400, f"{param} contains {token_id}, outside the vocabulary "
                                f"[0, {vocab_size})", param=param)


def check_stream_fields(body: p.SamplingFields) -> None:
    if body.stream_options is not None and not body.stream:
        raise APIError(400, "stream_options is only allowed when stream is true",
                       param="stream_options")


def sampling_params(body: p.SamplingFields, max_tokens: int | None,
                    logprobs: int | None) -> SamplingParams:
    values = {name: getattr(body, name) for name in (
        "temperature", "top_p", "top_k", "min_p", "presence_penalty", "frequency_penalty",
        "repetition_penalty") if getattr(body, name) is not None}
    structured_outputs = structured_outputs_from_request(body)
    try:
        params = SamplingParams(
            n=body.n, max_tokens=max_tokens, seed=body.seed, stop=body.stop,
            stop_token_ids=body.stop_token_ids, ignore_eos=body.ignore_eos,
            min_tokens=body.min_tokens, logprobs=logprobs,
            skip_special_tokens=body.skip_special_tokens,
            include_stop_str_in_output=body.include_stop_str_in_output,
            output_kind=RequestOutputKind.DELTA, structured_outputs=structured_outputs,
            **values)
    except ValueError as exc:
        raise APIError(400, str(exc), param=param_of_value_error(str(exc))) from None
    if params.n > 1 and params.is_greedy:
        raise APIError(400, "n > 1 needs sampling (temperature > 0): greedy samples would "
                            "all be identical", param="n")
    return params


def check_length(state: ServerState, num_prompt: int, params: SamplingParams,
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
