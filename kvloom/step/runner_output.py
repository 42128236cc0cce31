"""What the model runner returns for one step."""

from __future__ import annotations

from dataclasses import dataclass, field
import functools
from typing import Any, Callable

from kvloom.step.scheduler_output import SampleLogprobs


@dataclass(slots=True)
class ModelRunnerOutput:
    """Sampled tokens for the requests that sampled this step, in schedule order.

    Each row has one token, or with speculative decoding the accepted drafts
    followed by one token of the target's own. A request in ``errors`` failed
    in this step (its sampling or grammar raised): its row's tokens mean nothing.
    """

    request_ids: list[str]
    sampled_token_ids: list[list[int]]
    logprobs: list[list[SampleLogprobs] | None]
    errors: dict[str, str] = field(default_factory=dict)  # request id -> what failed


class PendingRunnerOutput:
    """A launched step whose sampled tokens are still on their way to the host.

    A step with structured-output rows launches its forward pass but defers
    sampling in two parts: ``start_masks()`` once its grammars have seen every
    earlier token (the masks then fill in the background), and ``sample()``
    before anything needs its tokens. ``result()`` runs whatever is left.
    """

    def __init__(self, wait: Callable[[], ModelRunnerOutput] | None = None,
                 start_masks: Callable[[], Any] | None = None,
                 deferred_sample: Callable[[Any], "PendingRunnerOutput"] | None = None) -> None:
        self._wait = wait
        self._start_masks = start_masks
        self._mask_fill: Any = None
        self._deferred_sample = deferred_sample
        self._result: ModelRunnerOutput | None = None

    def start_masks(self) -> None:
        """Begin filling the grammar masks (once)."""
        if self._start_masks is not None:
            start, self._start_masks = self._start_masks, None
            self._mask_fill = start()

    def sample(self) -> None:
        """Run the deferred sampling, if any (once)."""
        if self._deferred_sample is not None:
            self.start_masks()
            sample, self._deferred_sample = self._deferred_sample, None
            try:
                self._wait = sample(self._mask_fill).result
            except BaseException as error:  # result() must raise it too, not a TypeError
                self._wait = functools.partial(_raise, error)
                raise

    @classmethod
    def empty(cls) -> "PendingRunnerOutput":
        return cls.ready(ModelRunnerOutput([], [], []))

    @classmethod
    def ready(cls, output: ModelRunnerOutput) -> "PendingRunnerOutput":
        """A step whose output is already on the host."""
        pending = cls()
        pending._result = output
        return pending

    def then(self, check: Callable[[ModelRunnerOutput], None]) -> "PendingRunnerOutput":
        """This step, with ``check`` run on its output (to add errors) once it arrives."""
        def wait() -> ModelRunnerOutput:
            output = self.result()
            check(output)
            return output

        return PendingRunnerOutput(wait)

    def with_errors(self, errors: dict[str, str]) -> "PendingRunnerOutput":
        """This step, with ``errors`` (request id -> what failed) added to its output."""
        return self.then(lambda output: output.errors.update(errors)) if errors else self

    def result(self) -> ModelRunnerOutput:
        """Block until the step's tokens are on the host (once)."""
        self.sample()
        if self._result is None:
            self._result = self._wait()
            self._wait = None
        return self._result


def _raise(error: BaseException) -> ModelRunnerOutput:
    raise error
