"""Request checks that turn bad input into a 400 naming the field before the engine
sees it, and the mapping of request fields onto SamplingParams.

The checks themselves live where the offline API runs them too (SamplingParams,
StructuredOutputsParams, the engine's InputProcessor); this module calls them and
maps their ValueErrors to 400s, keeping only the HTTP-shaped checks of its own."""

from __future__ import annotations

from typing import Any

from kvloom.engine.input_processor import ContextLengthError, InputProcessor, check_cache_salt
from kvloom.entrypoints.openai import protocol as p
from kvloom.entrypoints.openai.errors import APIError, param_of_value_error
from kvloom.entrypoints.openai.state import ServerState
from kvloom.structured_output.openai_formats import structured_outputs_from_request
from kvloom.sampling_params import OPENAI_SHARED_FIELDS, RequestOutputKind, SamplingParams


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


def input_processor(state: ServerState) -> InputProcessor:
    """The engine's input processor: the checks the offline API runs, shared."""
    return state.engine.engine.input_processor


def check_vocab(state: ServerState, token_ids: list[int], param: str) -> None:
    try:
        input_processor(state).check_token_ids(token_ids, name=param)
    except ValueError as exc:
        raise APIError(400, str(exc), param=param) from None


def check_prompt_text(state: ServerState, num_chars: int, param: str) -> None:
    """Refuse a prompt text that cannot fit the context before tokenizing it."""
    try:
        input_processor(state).check_text_length(num_chars)
    except ValueError as exc:
        raise _named_error(exc, {"prompt": param}) from None


def request_cache_salt(body: p.SamplingFields) -> str | None:
    try:
        return check_cache_salt(body.cache_salt)
    except ValueError as exc:
        raise APIError(400, str(exc), param="cache_salt") from None


def check_stream_fields(body: p.SamplingFields) -> None:
    if body.stream_options is not None and not body.stream:
        raise APIError(400, "stream_options is only allowed when stream is true",
                       param="stream_options")
    refuse_unsupported(body)


# Request fields kvloom does not act on yet -> (the values that change nothing, what to
# do instead). Any other value is a 400 naming the field: never a 200 that ignores it.
UNSUPPORTED_FIELDS: dict[str, tuple[tuple[Any, ...], str]] = {
    "logit_bias": ((None, {}), "logit_bias is not supported yet"),
    "best_of": ((None, 1), "best_of is not supported yet; use n"),
    "use_beam_search": ((None, False), "beam search is not supported yet"),
    "bad_words": ((None, []), "bad_words is not supported yet"),
    "allowed_token_ids": ((None,), "allowed_token_ids is not supported yet"),
    "prompt_logprobs": ((None,), "prompt_logprobs is not supported yet"),
    "truncate_prompt_tokens": ((None,), "truncate_prompt_tokens is not supported yet"),
    "suffix": ((None, ""), "suffix (insertion) is not supported"),
    "tools": ((None, []), "tool calling is not supported yet"),
    "tool_choice": ((None, "none"), "tool calling is not supported yet"),
}


def refuse_unsupported(body: p.SamplingFields) -> None:
    for name, (harmless, reason) in UNSUPPORTED_FIELDS.items():
        value = getattr(body, name, None)
        # type() too: 1 == True, but best_of: true is not best_of: 1.
        if not any(value == ok and type(value) is type(ok) for ok in harmless):
            raise APIError(400, reason, param=name)


def sampling_params(body: p.SamplingFields, max_tokens: int | None,
                    logprobs: int | None) -> SamplingParams:
    # The shared fields are SamplingParams' own; one left null keeps its default.
    values = {name: getattr(body, request_name)
              for name, request_name in OPENAI_SHARED_FIELDS.items()
              if getattr(body, request_name) is not None}
    structured_outputs = structured_outputs_from_request(body)
    try:
        params = SamplingParams(
            max_tokens=max_tokens, logprobs=logprobs, output_kind=RequestOutputKind.DELTA,
            structured_outputs=structured_outputs, **values)
    except ValueError as exc:
        raise APIError(400, str(exc), param=param_of_value_error(str(exc))) from None
    if params.n > 1 and params.is_greedy:
        raise APIError(400, "n > 1 needs sampling (temperature > 0): greedy samples would "
                            "all be identical", param="n")
    return params


def check_length(state: ServerState, num_prompt: int, params: SamplingParams,
                 prompt_param: str, max_tokens_param: str) -> None:
    """The engine's length checks, strict: a max_tokens past the context is a 400
    (offline it is clamped), named as the request named it."""
    try:
        input_processor(state).check_length(num_prompt, params, clamp=False)
    except ValueError as exc:
        raise _named_error(exc, {"prompt": prompt_param, "max_tokens": max_tokens_param}) from None


def _named_error(exc: ValueError, names: dict[str, str]) -> APIError:
    """A 400 for a shared check's ValueError, its leading field renamed to the request's
    name for it (``prompt`` -> ``messages``, ``max_tokens`` -> ``max_completion_tokens``)."""
    message = str(exc)
    first, _, rest = message.partition(" ")
    if first in names:
        message = f"{names[first]} {rest}"
    param = names.get(first) or param_of_value_error(message, names["prompt"])
    code = exc.code if isinstance(exc, ContextLengthError) else None
    return APIError(400, message, param=param, code=code)
