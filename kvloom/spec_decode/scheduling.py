"""The scheduler's side of speculative decoding: how many drafts a request may
get, which of them a step runs, taking back the rejected ones, and counts of
drafted and accepted tokens."""

from __future__ import annotations

from dataclasses import dataclass

from kvloom.request import Request, RequestStatus
from kvloom.step.scheduler_output import SchedulerOutput


@dataclass(slots=True)
class SpecDecodeStats:
    """Counts since the engine started.

    Attributes:
        num_drafts: verified rows that carried at least one draft token.
        num_draft_tokens: draft tokens verified.
        num_accepted_tokens: draft tokens the target accepted.
        accepted_per_position: accepted drafts by position (0 = first draft).
    """

    num_drafts: int = 0
    num_draft_tokens: int = 0
    num_accepted_tokens: int = 0
    accepted_per_position: list[int] | None = None

    def record(self, num_drafted: int, num_accepted: int) -> None:
        if num_drafted == 0:
            return
        self.num_drafts += 1
        self.num_draft_tokens += num_drafted
        self.num_accepted_tokens += num_accepted
        if self.accepted_per_position is None:
            self.accepted_per_position = []
        missing = num_accepted - len(self.accepted_per_position)
        if missing > 0:
            self.accepted_per_position.extend([0] * missing)
        for position in range(num_accepted):
            self.accepted_per_position[position] += 1

    @property
    def acceptance_rate(self) -> float:
        """Accepted draft tokens / draft tokens."""
        return self.num_accepted_tokens / self.num_draft_tokens if self.num_draft_tokens else 0.0

    @property
    def mean_accepted_length(self) -> float:
        """Tokens per verified row: accepted drafts plus the target's own token (as vLLM)."""
        return 1.0 + self.num_accepted_tokens / self.num_drafts if self.num_drafts else 0.0


def max_num_drafts(request: Request, num_speculative_tokens: int, max_model_len: int) -> int:
    """Drafts that could all be accepted without passing ``max_tokens`` or ``max_model_len``.

    A step verifying k drafts yields up to k + 1 tokens.
    """
    room_in_output = request.max_tokens - request.num_output_tokens - 1
    room_in_sequence = max_model_len - request.num_tokens - 1
    return max(0, min(num_speculative_tokens, room_in_output, room_in_sequence))


def take_scheduled_drafts(request: Request, end: int) -> list[int]:
    """The request's drafts that run in a step scheduled up to position ``end``.

    Drafts follow the known tokens, so a budget cut drops the last ones. The
    request's drafts are used up either way: new ones come after this step.
    """
    if not request.draft_token_ids:
        return []
    drafts = request.draft_token_ids[:max(0, end - request.num_tokens)]
    request.draft_token_ids = []
    return drafts


def take_back_rejected_drafts(request: Request, num_accepted: int,
                              stats: SpecDecodeStats) -> None:
    """Record a verified step; the KV of rejected drafts is invalid, so those
    positions are computed again."""
    num_drafted, request.num_drafts_in_flight = request.num_drafts_in_flight, 0
    stats.record(num_drafted, num_accepted)
    request.num_computed_tokens -= num_drafted - num_accepted


def draft_candidates(scheduler_output: SchedulerOutput, requests: dict[str, Request],
                     num_speculative_tokens: int,
                     max_model_len: int) -> list[tuple[Request, int]]:
    """Requests that sampled in this step and still run, with their draft limits."""
    candidates = []
    for item in scheduler_output.scheduled:
        request = requests.get(item.request_id)
        if (item.sample and request is not None and request.status == RequestStatus.RUNNING
                and request is scheduler_output.request_objects.get(item.request_id)):
            candidates.append((request, max_num_drafts(request, num_speculative_tokens,
                                                       max_model_len)))
    return candidates
