"""A request as the scheduler tracks it."""

from __future__ import annotations

import enum
import time
from dataclasses import dataclass, field
from typing import Any

from kvloom.sampling_params import SamplingParams


class RequestStatus(enum.Enum):
    WAITING = "waiting"
    RUNNING = "running"
    PREEMPTED = "preempted"
    FINISHED_STOPPED = "stop"
    FINISHED_LENGTH = "length"
    FINISHED_ABORTED = "abort"
    FINISHED_ERROR = "error"  # failed inside the engine (sampling, grammar, detokenizing)

    @property
    def is_finished(self) -> bool:
        return self in _FINISHED  # checked per request per step: keep it a set lookup

    @property
    def finish_reason(self) -> str | None:
        return self.value if self in _FINISHED else None


_FINISHED = frozenset({RequestStatus.FINISHED_STOPPED, RequestStatus.FINISHED_LENGTH,
                       RequestStatus.FINISHED_ABORTED, RequestStatus.FINISHED_ERROR})


@dataclass(eq=False)
class Request:
    """One sequence to generate. ``n > 1`` becomes n of these sharing a prompt.

    Attributes:
        all_token_ids: prompt followed by every generated token.
        num_computed_tokens: how many of ``all_token_ids`` have KV in the cache.
        block_hashes: chained hashes of the full blocks of ``all_token_ids``,
            extended by the KV cache manager as tokens arrive.
        max_tokens: the output budget after clamping to the model's length.
        num_output_placeholders: tokens sampled by a step still running on the
            device (async scheduling); their ids are not known on the host yet,
            but the next step may already feed them to the model.
    """

    request_id: str
    prompt_token_ids: list[int]
    sampling_params: SamplingParams
    eos_token_ids: frozenset[int]
    max_tokens: int
    arrival_time: float = field(default_factory=time.monotonic)
    priority: int = 0
    cache_salt: str | None = None
    status: RequestStatus = RequestStatus.WAITING
    output_token_ids: list[int] = field(default_factory=list)
    all_token_ids: list[int] = field(default_factory=list)
    num_computed_tokens: int = 0
    num_cached_tokens: int = -1
    num_preemptions: int = 0
    num_output_placeholders: int = 0
    grammar: Any = None  # a TrackedGrammar following this request's tokens (structured output)
    block_hashes: list[bytes] = field(default_factory=list)
    stop_reason: int | str | None = None
    # Speculative decoding: tokens a drafter proposed for the next step, and how
    # many drafts the step in flight is verifying (their KV is dropped if rejected).
    draft_token_ids: list[int] = field(default_factory=list)
    num_drafts_in_flight: int = 0

    def __post_init__(self) -> None:
        if not self.all_token_ids:
            self.all_token_ids = list(self.prompt_token_ids)

    @property
    def num_prompt_tokens(self) -> int:
        return len(self.prompt_token_ids)

    @property
    def num_tokens(self) -> int:
        return len(self.all_token_ids)

    @property
    def num_output_tokens(self) -> int:
        return len(self.output_token_ids)

    @property
    def num_tokens_with_placeholders(self) -> int:
        return len(self.all_token_ids) + self.num_output_placeholders

    def append_output_token(self, token_id: int) -> None:
        self.output_token_ids.append(token_id)
        self.all_token_ids.append(token_id)

    def is_finished(self) -> bool:
        return self.status.is_finished
