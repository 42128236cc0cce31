"""Structured output from a request: OpenAI's ``response_format`` or vLLM's
``structured_outputs`` extra-body field, mapped onto StructuredOutputsParams.

The server only checks the request's shape; the spec's limits (size, choices, nesting)
are StructuredOutputsParams', shared with the offline API, and whether a schema, regex
or grammar compiles is for the engine's backend to say when the request is admitted.
"""

from __future__ import annotations

import re

from kvloom.entrypoints.openai import protocol as p
from kvloom.entrypoints.openai.errors import APIError
from kvloom.sampling_params import StructuredOutputsParams


def structured_outputs_from_request(body: p.SamplingFields) -> StructuredOutputsParams | None:
    """The request's output constraint, or None; raises APIError (400) for a bad one."""
    from_format = _from_response_format(body.response_format)
    from_extra = _from_structured_outputs(body.structured_outputs)
    if from_format is not None and from_extra is not None:
        raise APIError(400, "response_format and structured_outputs both constrain the "
                            "output; send only one of them", param="structured_outputs")
    return from_format or from_extra


def spec_path(body: p.SamplingFields) -> str | None:
    """Where the request's spec came from, to name it when the engine refuses it."""
    response_format = body.response_format
    if response_format is not None and response_format.type == "json_schema":
        return "response_format.json_schema.schema"
    if response_format is not None and response_format.type == "json_object":
        return "response_format"
    if body.structured_outputs is not None:
        chosen = _chosen_keys(body.structured_outputs)
        return f"structured_outputs.{chosen[0]}" if chosen else "structured_outputs"
    return None


def _from_response_format(response_format: p.ResponseFormat | None
                          ) -> StructuredOutputsParams | None:
    if response_format is None or response_format.type == "text":
        return None
    if response_format.type == "json_object":
        return _params("response_format", json_object=True)
    if response_format.json_schema is None:
        raise APIError(400, "response_format.json_schema is required when "
                            "response_format.type is 'json_schema'", param="response_format")
    if response_format.json_schema.schema_ is None:
        raise APIError(400, "response_format.json_schema.schema is required: the JSON schema "
                            "the output must follow", param="response_format")
    return _params("response_format", json=response_format.json_schema.schema_)


def _from_structured_outputs(request: p.StructuredOutputsRequest | None
                             ) -> StructuredOutputsParams | None:
    if request is None:
        return None
    chosen = _chosen_keys(request)
    if len(chosen) != 1:
        raise APIError(400, f"structured_outputs must set exactly one of "
                            f"{', '.join(p.STRUCTURED_OUTPUTS_KEYS)} "
                            f"(got {', '.join(chosen) or 'none'})", param="structured_outputs")
    return _params("structured_outputs", json=request.json_, regex=request.regex,
                   choice=request.choice, grammar=request.grammar,
                   json_object=request.json_object)


def _params(param: str, **spec: object) -> StructuredOutputsParams:
    """StructuredOutputsParams, its ValueError (a limit) a 400 naming the request field."""
    try:
        return StructuredOutputsParams(**spec)
    except ValueError as exc:
        message = str(exc)
        if param == "response_format":  # the message names vLLM's field the spec went to
            message = re.sub(r"^structured_outputs\.json\b",
                             "response_format.json_schema.schema", message)
        raise APIError(400, message, param=param) from None


def _chosen_keys(request: p.StructuredOutputsRequest) -> list[str]:
    values = {"json": request.json_, "regex": request.regex, "choice": request.choice,
              "grammar": request.grammar, "json_object": request.json_object}
    # json_object: false asks for nothing, as in StructuredOutputsParams.
    return [key for key, value in values.items() if value is not None and value is not False]
