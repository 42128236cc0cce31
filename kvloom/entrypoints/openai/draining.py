"""Graceful shutdown: SIGTERM makes the server unready and finishes in-flight requests;
a dead engine makes it exit non-zero so a supervisor restarts it."""

from __future__ import annotations

import asyncio
from typing import Any

import uvicorn

ENGINE_FAILURE_EXIT_CODE = 1


class DrainingServer(uvicorn.Server):
    """On the first SIGTERM/SIGINT, /ready and new inference requests answer 503 at once;
    uvicorn then stops accepting connections and lets in-flight requests finish.

    With ``drain_timeout``, requests still running that long after shutdown began are
    cut: streams end with an error event and ``data: [DONE]``, collected requests get a
    503. Give uvicorn's ``timeout_graceful_shutdown`` a little more, so the cut responses
    are sent before uvicorn cancels what is left.

    When the engine loop dies (ServerState.on_engine_dead), the server shuts down and
    ``exit_code`` becomes ENGINE_FAILURE_EXIT_CODE.
    """

    def __init__(self, config: uvicorn.Config, state: Any,
                 drain_timeout: float | None = None) -> None:
        super().__init__(config)
        self.kvloom_state = state
        self.drain_timeout = drain_timeout
        self.exit_code = 0
        state.on_engine_dead = self.exit_for_engine_failure

    def handle_exit(self, sig: int, frame: Any) -> None:
        # A signal handler: set flags only, the event loop does the rest.
        self.kvloom_state.draining = True
        super().handle_exit(sig, frame)

    def exit_for_engine_failure(self) -> None:
        self.exit_code = ENGINE_FAILURE_EXIT_CODE
        self.kvloom_state.draining = True
        self.should_exit = True

    async def shutdown(self, sockets: Any = None) -> None:
        cut = None
        if self.drain_timeout is not None:
            cut = asyncio.get_running_loop().call_later(self.drain_timeout,
                                                        self.kvloom_state.cut_streams)
        try:
            await super().shutdown(sockets)
        finally:
            if cut is not None:
                cut.cancel()
