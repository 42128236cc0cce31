"""Dataclasses the scheduler hands to the model runner and the output processor."""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

from kvloom.sampling_params import SamplingParams


PLACEHOLDER_TOKEN_ID = -1


@dataclass(slots=True)
class ScheduledRequest:
    """One request's share of a step.

    Attributes:
        token_ids: the tokens to run now (a slice of prompt + output). An entry
            of PLACEHOLDER_TOKEN_ID stands for a token the previous step sampled
            on the device; the runner feeds it from there (async scheduling).
        num_computed_tokens: tokens already in the KV cache; the first new
            token sits at this position.
        block_ids: the request's whole block table.
        sample: True when these tokens complete everything known, so the step
            samples the next token; False for a non-final prefill chunk.
        prompt_token_ids / output_token_ids: read-only views for penalties.
        banned_token_ids: ids that must not be sampled yet (``min_tokens``).
        draft_token_ids: the last ``len(draft_token_ids)`` entries of
            ``token_ids`` are a drafter's guesses, verified in this step
            (speculative decoding); ``sample`` is then True.
    """

    request_id: str
    token_ids: list[int]
    num_computed_tokens: int
    block_ids: list[int]
    sample: bool
    sampling_params: SamplingParams
    prompt_token_ids: list[int]
    output_token_ids: list[int]
    banned_token_ids: list[int] = field(default_factory=list)
    grammar: Any = None  # fills this row's allowed-token bitmask when sampling
    draft_token_ids: list[int] = field(default_factory=list)


@dataclass(slots=True)
class SchedulerOutput:
    """Everything the model runner needs for one step."""

    scheduled: list[ScheduledRequest]
    num_scheduled_tokens: int
    finished_request_ids: set[str]
    num_preempted: int = 0
    # The scheduler's own Request objects, by id: a step completed late (async
    # scheduling) must not credit a new request that reused a finished one's id.
    request_objects: dict[str, Any] = field(default_factory=dict)

    @property
    def is_empty(self) -> bool:
        return not self.scheduled


@dataclass(slots=True)
class SampleLogprobs:
    """Logprobs of one sampled position: the sampled id first, then the top N."""

    token_ids: list[int]
    logprobs: list[float]
    sampled_rank: int


@dataclass(slots=True)
class EngineCoreOutput:
    """What one step produced for one request."""

    request_id: str
    new_token_ids: list[int]
    new_logprobs: list[SampleLogprobs] | None
    finish_reason: str | None = None
    stop_reason: int | str | None = None
    num_cached_tokens: int = 0
    error: str | None = None  # why the request failed (finish_reason "error")

    @property
    def finished(self) -> bool:
        return self.finish_reason is not None
