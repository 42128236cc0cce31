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
    """A launched step whose sampled tokens are still on their way to the host.

    A step with structured-output rows launches its forward pass but defers
    sampling: the grammar masks need the previous step's tokens, which are
    read back while this step's forward pass runs on the device.
    """

    def __init__(self, wait: Callable[[], ModelRunnerOutput] | None = None,
                 deferred_sample: Callable[[], "PendingRunnerOutput"] | None = None) -> None:
        self._wait = wait
        self._deferred_sample = deferred_sample
        self._result: ModelRunnerOutput | None = None

    def sample(self) -> None:
        """Run the deferred sampling, if any (once)."""
        if self._deferred_sample is not None:
            sample, self._deferred_sample = self._deferred_sample, None
            self._wait = sample()._wait

    @classmethod
    def empty(cls) -> "PendingRunnerOutput":
        pending = cls()
        pending._result = ModelRunnerOutput([], [], [])
        return pending

    def result(self) -> ModelRunnerOutput:
        """Block until the step's tokens are on the host (once)."""
        self.sample()
        if self._result is None:
            self._result = self._wait()
            self._wait = None
        return self._result
