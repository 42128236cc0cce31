"""Graceful shutdown: SIGTERM makes the server unready and finishes in-flight requests."""

from __future__ import annotations

from typing import Any

import uvicorn


class DrainingServer(uvicorn.Server):
    """On the first SIGTERM/SIGINT, /ready and new inference requests answer 503 at once;
    uvicorn then stops accepting connections and lets in-flight requests finish within
    ``timeout_graceful_shutdown`` seconds before the process exits 0."""

    def __init__(self, config: uvicorn.Config, state: Any) -> None:
        super().__init__(config)
        self.kvloom_state = state

    def handle_exit(self, sig: int, frame: Any) -> None:
        self.kvloom_state.draining = True
        super().handle_exit(sig, frame)
