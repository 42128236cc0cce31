"""ASGI middleware in front of every route: API key and request-body size cap."""

from __future__ import annotations

import hmac
from typing import Any

from kvloom.entrypoints.openai.errors import APIError, error_response

DEFAULT_MAX_BODY_BYTES = 4 * 1024 * 1024
_PROTECTED_PREFIXES = ("/v1/", "/tokenize", "/detokenize")


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
