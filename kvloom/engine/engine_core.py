"""The loop body: schedule, execute, update. Owns no text, only token ids.

With async scheduling, step N+1 is scheduled and launched before step N's
sampled tokens are read back, so the host's bookkeeping overlaps the device's
work. Tokens step N+1 needs from step N stay on the device (placeholders).
Requests whose sampling needs every earlier token on the host (penalties)
make the loop wait for the step in flight first. Structured-output grammars
need them too, but only for masking, so a step with grammar rows is split:
its forward pass launches at once; its masks start filling in the background
once the previous step's tokens have reached the grammars; its sampling is
launched at the start of the next step(), just before the next forward pass.
The mask filling thus overlaps the device's forward pass and the host's
output processing and scheduling.

With speculative decoding the loop is synchronous: once a step's accepted
tokens are recorded, the drafter proposes the next step's drafts.
"""

from __future__ import annotations

from typing import TYPE_CHECKING

from kvloom.request import Request, RequestStatus
from kvloom.scheduler.scheduler import Scheduler
from kvloom.spec_decode.proposing import DraftProposer
from kvloom.step.runner_output import PendingRunnerOutput
from kvloom.step.scheduler_output import EngineCoreOutput, SchedulerOutput
from kvloom.worker.model_runner import ModelRunner

if TYPE_CHECKING:
    from kvloom.distributed.driver import DistributedWorkers


class EngineCore:
    def __init__(self, scheduler: Scheduler, runner: ModelRunner,
                 async_scheduling: bool = False, workers: DistributedWorkers | None = None,
                 ) -> None:
        self.scheduler = scheduler
        self.runner = runner
        self.async_scheduling = async_scheduling
        # Tensor-parallel ranks 1..: each step's forward pass runs on them too.
        self.workers = workers
        self.last_num_scheduled_tokens = 0
        self.in_flight: tuple[SchedulerOutput, PendingRunnerOutput] | None = None
        self.draft_proposer = (DraftProposer(scheduler, runner)
                               if runner.speculative is not None else None)

    @property
    def num_failed_proposals(self) -> int:
        """Steps whose drafter raised (they ran without drafts)."""
        return self.draft_proposer.num_failures if self.draft_proposer is not None else 0

    def add_requests(self, requests: list[Request]) -> None:
        for request in requests:
            self.scheduler.add_request(request)

    def finish_requests(self, request_ids: list[str], status: RequestStatus) -> None:
        self.scheduler.finish_requests(request_ids, status)

    def step(self) -> list[EngineCoreOutput]:
        """Schedule and launch a step; return the outputs of the step that completed."""
        outputs: list[EngineCoreOutput] = []
        if self.in_flight is not None and not self._can_schedule_ahead():
            outputs = self._complete_in_flight()
        scheduler_output = self.scheduler.schedule()
        self.last_num_scheduled_tokens = scheduler_output.num_scheduled_tokens
        if self.in_flight is not None:  # the next forward pass reads its tokens on the device
            self.in_flight[1].sample()
        launched = None
        if not scheduler_output.is_empty:
            if self.workers is not None:
                self.workers.send_step(scheduler_output)
            launched = (scheduler_output, self.runner.execute_async(scheduler_output))
        elif scheduler_output.finished_request_ids:
            self.runner.sampling_state.forget(scheduler_output.finished_request_ids)
        outputs += self._complete_in_flight()
        if launched is not None:  # every earlier token has reached the grammars now
            launched[1].start_masks()
        self.in_flight = launched
        if launched is not None and (not self.async_scheduling
                                     or self.runner.speculative is not None):
            outputs += self._complete_in_flight()
        return outputs

    def reset(self) -> None:
        """After a failed step: end every request (freeing its blocks), drop the step
        in flight and forget the prefix cache, whose blocks that step may have
        left half-written."""
        self.in_flight = None
        self.scheduler.reset()
        self.runner.reset()

    def has_unfinished_requests(self) -> bool:
        # A step still in flight for requests that were all aborted carries
        # nothing anyone waits for; the next step() completes it.
        return self.scheduler.has_unfinished_requests()

    def _complete_in_flight(self) -> list[EngineCoreOutput]:
        if self.in_flight is None:
            return []
        scheduler_output, pending = self.in_flight
        self.in_flight = None
        outputs = self.scheduler.update_from_output(scheduler_output, pending.result())
        if self.draft_proposer is not None:
            self.draft_proposer.propose(scheduler_output)
        return outputs

    def _can_schedule_ahead(self) -> bool:
        return (self.async_scheduling and self.runner.speculative is None
                and not self.scheduler.needs_every_token_on_host())
