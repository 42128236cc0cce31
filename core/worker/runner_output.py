"""What the model runner returns for one step."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Callable

from kvloom.scheduler.output import SampleLogprobs


@dataclass(slots=True)
class ModelRunnerOutput:
    """Sampled tokens for the requests that sampled this step, in schedule order."""

    request_ids: list[str]
    sampled_token_ids: list[int]
    logprobs: list[SampleLogprobs | None]


class PendingRunnerOutput:
    """A launched step whose sampled tokens are still on their way to the host."""

    def __init__(self, wait: Callable[[], ModelRunnerOutput] | None = None) -> None:
        self._wait = wait
        self._result: ModelRunnerOutput | None = None

    @classmethod
    def empty(cls) -> "PendingRunnerOutput":
        pending = cls()
        pending._result = ModelRunnerOutput([], [], [])
        return pending

    def result(self) -> ModelRunnerOutput:
        """Block until the step's tokens are on the host (once)."""
        if self._result is None:
            self._result = self._wait()
            self._wait = None
        return self._result
