"""The engine's side of speculative decoding: once a step's accepted tokens are
recorded, ask the drafter for the next drafts of every request that sampled."""

from __future__ import annotations

import logging

from kvloom.scheduler.scheduler import Scheduler
from kvloom.spec_decode.decoder import DraftCandidate
from kvloom.spec_decode.scheduling import draft_candidates
from kvloom.step.scheduler_output import SchedulerOutput
from kvloom.worker.model_runner import ModelRunner

logger = logging.getLogger(__name__)


class DraftProposer:
    """Fills ``Request.draft_token_ids`` after each step, for the next one to verify."""

    def __init__(self, scheduler: Scheduler, runner: ModelRunner) -> None:
        self.scheduler = scheduler
        self.runner = runner
        self.num_failures = 0

    def propose(self, scheduler_output: SchedulerOutput) -> None:
        limits = self.scheduler.limits
        candidates = draft_candidates(scheduler_output, self.scheduler.requests,
                                      limits.num_speculative_tokens, limits.max_model_len)
        try:
            drafts = self.runner.propose_drafts([
                DraftCandidate(request.request_id, request.all_token_ids, limit)
                for request, limit in candidates])
        except Exception as error:
            # Drafts are only guesses: without them every request still gets its
            # tokens (one a step), exactly as the target model picks them.
            self.num_failures += 1
            logger.error("the drafter raised (%d times so far); this step has no drafts",
                         self.num_failures, exc_info=error if self.num_failures == 1 else None)
            return
        for (request, _), request_drafts in zip(candidates, drafts):
            request.draft_token_ids = request_drafts
