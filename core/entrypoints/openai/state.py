"""What every route of the OpenAI-compatible server shares: the engine, the served name,
the metrics, and the readiness and draining flags."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

from kvloom.engine.async_engine import AsyncEngine
from kvloom.entrypoints.openai.metrics import ServerMetrics


@dataclass
class ServerState:
    engine: AsyncEngine
    model_name: str
    metrics: ServerMetrics
    ready: bool = False
    draining: bool = False  # SIGTERM received: finish what runs, take nothing new

    @property
    def tokenizer(self) -> Any:
        return self.engine.tokenizer

    @property
    def max_model_len(self) -> int:
        return self.engine.engine.max_model_len
