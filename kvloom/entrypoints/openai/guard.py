"""The HTTP edge: what a request must get past before any route sees it.

``GuardMiddleware`` (ASGI, so it holds under any asyncio server) refuses too many
headers (431), a missing API key on every path but the probes (401), and a body over
the cap (413) or slower than the body deadline (408). It reads the body itself, chunked
or not, and replays it to the app; a client that leaves before its response starts
cancels the request, so the engine aborts it at once instead of running it for nobody.

``GuardedH11Protocol`` is uvicorn's h11 protocol plus what uvicorn lacks: a deadline for
each request head (408; uvicorn's keep-alive timer stops at the first byte, so a client
sending its headers a byte at a time would hold the connection forever), and protocol
errors in the OpenAI shape (431 for a head over ``h11_max_incomplete_event_size``).
"""

from __future__ import annotations

import asyncio
import hmac
import json
from http import HTTPStatus
from typing import Any

import anyio
import h11
from uvicorn.protocols.http.h11_impl import H11Protocol

from kvloom.entrypoints.openai.errors import APIError, error_body, error_response

DEFAULT_MAX_BODY_BYTES = 4 * 1024 * 1024
DEFAULT_MAX_HEADER_COUNT = 256  # vLLM's --h11-max-header-count default
DEFAULT_MAX_HEAD_BYTES = 64 * 1024  # request line + headers; h11's own default is 16 KiB
DEFAULT_HEADER_TIMEOUT = 20.0  # seconds for a whole request head (Apache mod_reqtimeout: 20)
DEFAULT_BODY_TIMEOUT = 60.0  # seconds for a whole body: a full 4 MiB body at ~70 KB/s
# Paths anyone may call when an API key is set: probes and scrapers carry no key. Every
# other path, including routes added later and /docs and /openapi.json, needs the key.
PUBLIC_PATHS = frozenset({"/health", "/ready", "/metrics"})
_CLOSE = {"Connection": "close"}  # the rest of a refused body is never read


class GuardMiddleware:
    """Header count, API key (constant-time), body cap and deadline, early-disconnect cancel."""

    def __init__(self, app: Any, api_key: str | None, max_body_bytes: int,
                 max_header_count: int = DEFAULT_MAX_HEADER_COUNT,
                 body_timeout: float = DEFAULT_BODY_TIMEOUT) -> None:
        self.app = app
        self.api_key = api_key.encode() if api_key else None
        self.max_body_bytes = max_body_bytes
        self.max_header_count = max_header_count
        self.body_timeout = body_timeout

    async def __call__(self, scope: dict, receive: Any, send: Any) -> None:
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return
        try:
            self._check_head(scope)
            body = await self._read_body(receive)
        except APIError as exc:
            await error_response(exc.status, exc.message, code=exc.code,
                                 headers=exc.headers)(scope, receive, send)
            return
        if body is not None:  # None: the client left while sending it
            await self._run_app(scope, body, receive, send)

    def _check_head(self, scope: dict) -> None:
        raw_headers = scope.get("headers") or ()
        if len(raw_headers) > self.max_header_count:
            raise APIError(431, f"more than {self.max_header_count} request headers")
        headers = dict(raw_headers)
        if self.api_key and scope["path"] not in PUBLIC_PATHS \
                and not self._authorized(headers.get(b"authorization", b"")):
            raise APIError(401, "invalid or missing API key", code="invalid_api_key",
                           headers={"WWW-Authenticate": "Bearer"})
        length = headers.get(b"content-length")
        if length is not None and not length.isdigit():
            raise APIError(400, "invalid Content-Length", headers=_CLOSE)
        if length is not None and int(length) > self.max_body_bytes:
            raise APIError(413, self._too_large(), headers=_CLOSE)

    def _authorized(self, header: bytes) -> bool:
        scheme, _, token = header.partition(b" ")
        return scheme.lower() == b"bearer" and hmac.compare_digest(token.strip(), self.api_key)

    def _too_large(self) -> str:
        return f"request body exceeds {self.max_body_bytes} bytes"

    async def _read_body(self, receive: Any) -> bytes | None:
        """The whole body, held to the cap as it arrives (a chunked body declares no
        length) and to the deadline (a body sent a byte at a time holds a connection)."""
        chunks: list[bytes] = []
        size = 0
        with anyio.move_on_after(self.body_timeout):
            while True:
                message = await receive()
                if message["type"] == "http.disconnect":
                    return None
                chunk = message.get("body", b"")
                size += len(chunk)
                if size > self.max_body_bytes:
                    raise APIError(413, self._too_large(), headers=_CLOSE)
                chunks.append(chunk)
                if not message.get("more_body", False):
                    return b"".join(chunks)
        raise APIError(408, f"the request body did not arrive within {self.body_timeout:g} s",
                       headers=_CLOSE)

    async def _run_app(self, scope: dict, body: bytes, receive: Any, send: Any) -> None:
        """Run the app on the buffered body; cancel it if the client leaves before the
        response starts (once it has started, the streaming response watches itself)."""
        disconnected = asyncio.Event()
        response_started = False
        body_sent = False

        async def replay_receive() -> dict:
            nonlocal body_sent
            if not body_sent:
                body_sent = True
                return {"type": "http.request", "body": body, "more_body": False}
            await disconnected.wait()
            return {"type": "http.disconnect"}

        async def tracking_send(message: dict) -> None:
            nonlocal response_started
            response_started = response_started or message["type"] == "http.response.start"
            await send(message)

        with anyio.CancelScope() as app_scope:
            async def watch() -> None:
                # The one reader of the server's receive once the body is in.
                while (await receive())["type"] != "http.disconnect":
                    pass
                disconnected.set()
                if not response_started:
                    app_scope.cancel()  # nobody to answer: abort the request now

            watcher = asyncio.ensure_future(watch())
            try:
                await self.app(scope, replay_receive, tracking_send)
            finally:
                watcher.cancel()


class GuardedH11Protocol(H11Protocol):
    """uvicorn's h11 protocol with a deadline for each request head and JSON errors.

    The deadline runs from the connection's first byte (or from the first byte after a
    response on a kept-alive connection; the idle time before it is uvicorn's
    ``timeout_keep_alive``) to the end of the head, so trickling bytes does not renew it.
    """

    def __init__(self, *args: Any, header_timeout: float = DEFAULT_HEADER_TIMEOUT,
                 **kwargs: Any) -> None:
        super().__init__(*args, **kwargs)
        self.header_timeout = header_timeout
        self._head_deadline: asyncio.TimerHandle | None = None

    def connection_made(self, transport: Any) -> None:
        super().connection_made(transport)
        self._watch_head()

    def data_received(self, data: bytes) -> None:
        super().data_received(data)
        self._watch_head()

    def connection_lost(self, exc: Exception | None) -> None:
        self._stop_head_deadline()
        super().connection_lost(exc)

    def _watch_head(self) -> None:
        """Arm the deadline while a head is awaited (h11: the client is IDLE), else stop it."""
        awaiting_head = self.conn.their_state is h11.IDLE and not self.transport.is_closing()
        if awaiting_head and self._head_deadline is None:
            self._head_deadline = self.loop.call_later(self.header_timeout, self._head_timed_out)
        elif not awaiting_head:
            self._stop_head_deadline()

    def _stop_head_deadline(self) -> None:
        if self._head_deadline is not None:
            self._head_deadline.cancel()
            self._head_deadline = None

    def _head_timed_out(self) -> None:
        self._head_deadline = None
        if self.conn.their_state is h11.IDLE and not self.transport.is_closing():
            self._send_error(408, "the request headers did not arrive within "
                                  f"{self.header_timeout:g} s")

    def send_400_response(self, msg: str) -> None:
        if self.cycle is not None and not self.cycle.response_complete:
            super().send_400_response(msg)  # mid-request: the app owns the response
            return
        # h11 keeps what it could not parse: more than the limit means the head was too big.
        limit = self.config.h11_max_incomplete_event_size
        if limit is not None and len(self.conn.trailing_data[0]) > limit:
            self._send_error(431, f"request headers exceed {limit} bytes")
        else:
            self._send_error(400, "invalid HTTP request")

    def _send_error(self, status: int, message: str) -> None:
        body = json.dumps(error_body(status, message)).encode()
        headers = [(b"content-type", b"application/json"), (b"connection", b"close"),
                   (b"content-length", str(len(body)).encode())]
        response = h11.Response(status_code=status, headers=headers,
                                reason=HTTPStatus(status).phrase.encode())
        for event in (response, h11.Data(data=body), h11.EndOfMessage()):
            self.transport.write(self.conn.send(event))
        self.transport.close()
