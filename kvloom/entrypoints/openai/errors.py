"""OpenAI-shaped errors: every 4xx/5xx is ``{"error": {message, type, param, code}}``.

Messages are short and never echo more than a snippet of the input, and never
carry tracebacks or file paths: a 4 KB bad body must not become a 20 MB error.
"""

from __future__ import annotations

import logging
import re
from http import HTTPStatus
from typing import Any

from fastapi import FastAPI, Request
from fastapi.exceptions import RequestValidationError
from fastapi.responses import JSONResponse
from starlette.exceptions import HTTPException as StarletteHTTPException

from kvloom.sampling_params import OPENAI_REQUEST_NAMES

logger = logging.getLogger(__name__)

MAX_MESSAGE_CHARS = 300
MAX_REPORTED_ERRORS = 3

_TYPE_BY_STATUS = {401: "authentication_error", 404: "not_found_error",
                   429: "rate_limit_error", 503: "service_unavailable"}


class APIError(Exception):
    """An error to send to the client as-is."""

    def __init__(self, status: int, message: str, *, param: str | None = None,
                 code: str | None = None, err_type: str | None = None,
                 headers: dict[str, str] | None = None) -> None:
        super().__init__(message)
        self.status = status
        self.message = message
        self.param = param
        self.code = code
        self.err_type = err_type
        self.headers = headers


def error_body(status: int, message: str, param: str | None = None,
               code: str | None = None, err_type: str | None = None) -> dict[str, Any]:
    if err_type is None:
        err_type = _TYPE_BY_STATUS.get(status, "server_error" if status >= 500
                                       else "invalid_request_error")
    return {"error": {"message": _clip(message), "type": err_type, "param": param,
                      "code": code if code is not None else status}}


def error_response(status: int, message: str, param: str | None = None,
                   code: str | None = None, err_type: str | None = None,
                   headers: dict[str, str] | None = None) -> JSONResponse:
    return JSONResponse(error_body(status, message, param, code, err_type), status_code=status,
                        headers=headers)


# Native libraries' log prefixes (XGrammar's "[07:44:50] /project/cpp/x.cc:83: ") would
# put source paths into messages that reach clients.
_SOURCE_LOCATION = re.compile(r"(\[\d{2}:\d{2}:\d{2}\] )?/[^\s:]+:\d+: ")


def _clip(message: str) -> str:
    message = _SOURCE_LOCATION.sub("", " ".join(str(message).split()))
    message = message if len(message) <= MAX_MESSAGE_CHARS else message[:MAX_MESSAGE_CHARS] + "..."
    # A lone surrogate from the request would make the JSON response unencodable (a 500).
    return message.encode("utf-8", "backslashreplace").decode("utf-8")


# Field names a SamplingParams / input-processor ValueError message may start with:
# SamplingParams' request fields (from its declaration), then the request's and the
# input processor's own.
_REQUEST_ONLY_PARAMS = {"top_logprobs", "prompt", "messages", "prompt_token_ids", "tokens",
                        "cache_salt", "response_format"}
_KNOWN_PARAMS = {*OPENAI_REQUEST_NAMES.values(), *_REQUEST_ONLY_PARAMS}


def param_of_value_error(message: str, default: str | None = None) -> str | None:
    """The field a ``ValueError`` names (kvloom's messages start with it)."""
    match = re.match(r"[a-z_]+", message)
    if match is None:
        return default
    name = match.group(0)
    if name == "prompt_token_ids":
        return "prompt" if default is None else default
    name = OPENAI_REQUEST_NAMES.get(name, name)  # a SamplingParams name -> the request's
    return name if name in _KNOWN_PARAMS else default


def describe_validation_errors(errors: list[dict[str, Any]]) -> tuple[str, str | None]:
    """A short message and the first bad field from pydantic's error list."""
    parts = []
    param = None
    # A union field reports every member's failure; ours (value_error) says what is wrong.
    ours = [error for error in errors if error.get("type") == "value_error"]
    errors = ours or errors
    for error in errors[:MAX_REPORTED_ERRORS]:
        loc = [str(part) for part in error.get("loc", ())
               if part != "body" and "[" not in str(part)]  # union member tags
        if error.get("type") == "json_invalid":
            return "the request body is not valid JSON", None
        field = ".".join(loc)
        if param is None and loc:
            param = loc[0] if not loc[0].isdigit() else None
        message = str(error.get("msg", "invalid value")).removeprefix("Value error, ")
        if error.get("type") in ("model_attributes_type", "dict_type") and not loc:
            message = "the request body must be a JSON object"
        parts.append(f"{field}: {message}" if field else message)
    if len(errors) > MAX_REPORTED_ERRORS:
        parts.append(f"and {len(errors) - MAX_REPORTED_ERRORS} more error(s)")
    return "; ".join(parts), param


def install_error_handlers(app: FastAPI) -> None:
    @app.exception_handler(APIError)
    async def _api_error(request: Request, exc: APIError) -> JSONResponse:
        return error_response(exc.status, exc.message, exc.param, exc.code, exc.err_type,
                              exc.headers)

    @app.exception_handler(RequestValidationError)
    async def _validation_error(request: Request, exc: RequestValidationError) -> JSONResponse:
        message, param = describe_validation_errors(list(exc.errors()))
        return error_response(400, message, param)

    @app.exception_handler(StarletteHTTPException)
    async def _http_error(request: Request, exc: StarletteHTTPException) -> JSONResponse:
        message = exc.detail if isinstance(exc.detail, str) else HTTPStatus(exc.status_code).phrase
        if isinstance(exc.__cause__, RecursionError):  # json.loads gave up on the body
            message = "the request body nests JSON objects or arrays too deeply to parse"
        if exc.status_code == 404 and message == "Not Found":
            message = f"no route {request.method} {request.url.path[:100]}"
        return error_response(exc.status_code, message, headers=getattr(exc, "headers", None))

    @app.exception_handler(Exception)
    async def _internal_error(request: Request, exc: Exception) -> JSONResponse:
        logger.exception("unhandled error on %s", request.url.path)
        return error_response(500, "internal server error")
