"""What every route of the OpenAI-compatible server shares: the engine, the served name,
the metrics, the readiness and draining flags, and the hooks of the server's lifecycle."""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any, Callable

from kvloom.engine.async_engine import AsyncEngine
from kvloom.entrypoints.openai.metrics import ServerMetrics


@dataclass
class ServerState:
    engine: AsyncEngine
    model_name: str
    metrics: ServerMetrics
    ready: bool = False
    draining: bool = False  # SIGTERM received: finish what runs, take nothing new
    # The drain timeout passed: requests still running are ended with an error.
    streams_cut: bool = False
    # Requests between start() and their last output, so the drain can cut them.
    live_request_ids: set[str] = field(default_factory=set)
    # Called once when the engine loop has died, so the process can exit and a
    # supervisor restart it (DrainingServer sets it; without it the server stays up).
    on_engine_dead: Callable[[], None] | None = None

    @property
    def tokenizer(self) -> Any:
        return self.engine.tokenizer

    @property
    def max_model_len(self) -> int:
        return self.engine.engine.max_model_len

    def cut_streams(self) -> None:
        """End every live request now: the engine aborts each (through its own loop, so
        a waiting stream wakes at once) and streaming turns that abort into an error."""
        self.streams_cut = True
        for request_id in list(self.live_request_ids):
            self.engine.abort(request_id)
