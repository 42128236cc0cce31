"""What the model runner returns for one step."""

from __future__ import annotations

from dataclasses import dataclass

from kvloom.scheduler.output import SampleLogprobs


@dataclass(slots=True)
class ModelRunnerOutput:
    """Sampled tokens for the requests that sampled this step, in schedule order."""

    request_ids: list[str]
    sampled_token_ids: list[int]
    logprobs: list[SampleLogprobs | None]
