"""The loop body: schedule, execute, update. Owns no text, only token ids."""

from __future__ import annotations

from kvloom.scheduler.output import EngineCoreOutput
from kvloom.scheduler.request import Request, RequestStatus
from kvloom.scheduler.scheduler import Scheduler
from kvloom.worker.model_runner import ModelRunner


class EngineCore:
    def __init__(self, scheduler: Scheduler, runner: ModelRunner) -> None:
        self.scheduler = scheduler
        self.runner = runner
        self.last_num_scheduled_tokens = 0

    def add_requests(self, requests: list[Request]) -> None:
        for request in requests:
            self.scheduler.add_request(request)

    def finish_requests(self, request_ids: list[str], status: RequestStatus) -> None:
        self.scheduler.finish_requests(request_ids, status)

    def step(self) -> list[EngineCoreOutput]:
        scheduler_output = self.scheduler.schedule()
        self.last_num_scheduled_tokens = scheduler_output.num_scheduled_tokens
        runner_output = self.runner.execute(scheduler_output)
        if scheduler_output.is_empty:
            return []
        return self.scheduler.update_from_output(scheduler_output, runner_output)

    def has_unfinished_requests(self) -> bool:
        return self.scheduler.has_unfinished_requests()
