"""Continuous batching with chunked prefill and preemption by recompute.

Every request is a list of known tokens and a count of those already in the KV
cache; a step gives each running request its uncomputed tokens (one for a
decode, a chunk for a prefill) under a token budget, then admits waiting
requests while budget, sequence slots and KV blocks last. When a running
request cannot get a block, the scheduling policy picks a running request to
preempt: its blocks are freed and it later recomputes its prompt and output so
far. The policy (scheduler/policy.py) also orders the waiting queue.
"""

from __future__ import annotations

import logging
from dataclasses import dataclass

from kvloom.failures import describe_failure
from kvloom.kv_cache.kv_cache_manager import KVCacheManager, PrefixHit
from kvloom.step.scheduler_output import (PLACEHOLDER_TOKEN_ID, EngineCoreOutput, ScheduledRequest,
                                     SchedulerOutput)
from kvloom.request import Request, RequestStatus
from kvloom.spec_decode.scheduling import (SpecDecodeStats, take_back_rejected_drafts,
                                           take_scheduled_drafts)
from kvloom.scheduler.policy import FirstComeFirstServed, SchedulingPolicy
from kvloom.step.runner_output import ModelRunnerOutput

logger = logging.getLogger(__name__)


@dataclass(slots=True)
class SchedulerLimits:
    """Resolved scheduler limits (no Nones)."""

    max_num_seqs: int
    max_num_batched_tokens: int
    max_model_len: int
    enable_chunked_prefill: bool
    # Speculative decoding: drafts per request, and KV slots reserved past them
    # for a model-based drafter's own positions.
    num_speculative_tokens: int = 0
    num_lookahead_tokens: int = 0


class Scheduler:
    """Decides which tokens of which requests run in each step."""

    def __init__(self, limits: SchedulerLimits, kv_cache_manager: KVCacheManager,
                 policy: SchedulingPolicy | None = None) -> None:
        self.limits = limits
        self.kv_cache_manager = kv_cache_manager
        self.policy = policy if policy is not None else FirstComeFirstServed()
        self.waiting = self.policy.make_waiting_queue()
        self.running: list[Request] = []
        self.requests: dict[str, Request] = {}
        self.finished_request_ids: set[str] = set()
        self.num_preemptions = 0
        self.spec_stats = SpecDecodeStats()

    # ----------------------------------------------------------------- requests
    def add_request(self, request: Request) -> None:
        if request.request_id in self.requests:
            raise ValueError(f"request_id {request.request_id!r} is already in use")
        self.requests[request.request_id] = request
        self.waiting.add(request)

    def finish_requests(self, request_ids: list[str], status: RequestStatus) -> None:
        """Finish requests from outside a step (abort, stop string); unknown ids are ignored."""
        for request_id in request_ids:
            request = self.requests.get(request_id)
            if request is None or request.is_finished():
                continue
            if request.status == RequestStatus.RUNNING:
                self.running.remove(request)
            else:
                self.waiting.remove(request)
            request.status = status
            self._free(request)

    def has_unfinished_requests(self) -> bool:
        return bool(self.running) or len(self.waiting) > 0

    def reset(self) -> None:
        """End every request with an error and free every KV block, whatever state a
        step that raised halfway left them in."""
        for request in self.requests.values():
            request.status = RequestStatus.FINISHED_ERROR
        self.finished_request_ids |= set(self.requests)
        self.requests = {}
        self.running = []
        self.waiting = self.policy.make_waiting_queue()
        self.kv_cache_manager.reset()

    def needs_every_token_on_host(self) -> bool:
        """True if a running request's sampling depends on its latest tokens on the host
        before the step is launched (penalties)."""
        return any(not _penalty_free(r.sampling_params) for r in self.running)

    @property
    def num_running(self) -> int:
        return len(self.running)

    @property
    def num_waiting(self) -> int:
        return len(self.waiting)

    # ----------------------------------------------------------------- schedule
    def schedule(self) -> SchedulerOutput:
        budget = self.limits.max_num_batched_tokens
        scheduled: dict[str, ScheduledRequest] = {}
        budget, num_preempted = self._schedule_running(budget, scheduled)
        if num_preempted == 0:  # admitting new work while evicting old would thrash
            budget = self._schedule_waiting(budget, scheduled)
        finished, self.finished_request_ids = self.finished_request_ids, set()
        num_tokens = self.limits.max_num_batched_tokens - budget
        objects = {request_id: self.requests[request_id] for request_id in scheduled}
        return SchedulerOutput(list(scheduled.values()), num_tokens, finished, num_preempted,
                               objects)

    def _schedule_running(self, budget: int,
                          scheduled: dict[str, ScheduledRequest]) -> tuple[int, int]:
        num_preempted = 0
        index = 0
        while index < len(self.running) and budget > 0:
            request = self.running[index]
            num_new = min(request.num_tokens_with_placeholders + len(request.draft_token_ids)
                          - request.num_computed_tokens, budget)
            if num_new <= 0 or self._finishes_in_flight(request):
                index += 1
                continue
            block_ids = self._allocate(request, num_new)
            while block_ids is None:
                victim = self.policy.pick_preemption_victim(self.running)
                victim_index = self.running.index(victim)
                budget += self._preempt(victim, scheduled)
                num_preempted += 1
                if victim is request:
                    break
                if victim_index < index:
                    index -= 1
                block_ids = self._allocate(request, num_new)
            if block_ids is None:
                continue  # the request itself was preempted; ``index`` now points past it
            scheduled[request.request_id] = self._make_scheduled(request, num_new, block_ids)
            budget -= num_new
            index += 1
        return budget, num_preempted

    def _schedule_waiting(self, budget: int, scheduled: dict[str, ScheduledRequest]) -> int:
        while len(self.waiting) and budget > 0 and len(self.running) < self.limits.max_num_seqs:
            request = self.waiting.peek()
            if request.num_output_placeholders:
                break  # preempted while its last token was in flight; it lands this step
            hit = self.kv_cache_manager.find_prefix_hit(request)
            num_new = request.num_tokens - hit.num_tokens
            if not self.limits.enable_chunked_prefill and num_new > budget:
                break
            num_new = min(num_new, budget)
            block_ids = self._allocate(request, num_new, hit)
            if block_ids is None:
                break
            self.waiting.pop()
            request.num_computed_tokens = hit.num_tokens
            if request.num_cached_tokens < 0:
                request.num_cached_tokens = hit.num_tokens
            request.status = RequestStatus.RUNNING
            self.running.append(request)
            scheduled[request.request_id] = self._make_scheduled(request, num_new, block_ids)
            budget -= num_new
        return budget

    def _allocate(self, request: Request, num_new: int,
                  prefix_hit: PrefixHit | None = None) -> list[int] | None:
        # A model-based drafter drafts right after any step that samples (a
        # prompt's last chunk too), at positions past the step's tokens.
        end = (request.num_computed_tokens + num_new
               + (prefix_hit.num_tokens if prefix_hit is not None else 0))
        lookahead = max(0, min(self.limits.num_lookahead_tokens,
                               self.limits.max_model_len - end))
        return self.kv_cache_manager.allocate_slots(request, num_new, prefix_hit,
                                                    num_lookahead_tokens=lookahead)

    def _finishes_in_flight(self, request: Request) -> bool:
        """Its in-flight token reaches a length limit: scheduling more would be waste."""
        if not request.num_output_placeholders:
            return False
        return (request.num_output_tokens + request.num_output_placeholders >= request.max_tokens
                or request.num_tokens_with_placeholders >= self.limits.max_model_len)

    def _preempt(self, request: Request, scheduled: dict[str, ScheduledRequest]) -> int:
        """Preempt a running request; returns the budget it gives back."""
        self.running.remove(request)
        unscheduled = scheduled.pop(request.request_id, None)
        if unscheduled is not None:  # scheduled earlier in this step: undo that first
            request.num_computed_tokens -= len(unscheduled.token_ids)
            request.num_output_placeholders -= int(unscheduled.sample)
        request.draft_token_ids = []  # they were guesses for the tokens it had; it recomputes
        request.num_drafts_in_flight = 0
        self.kv_cache_manager.free(request)
        request.status = RequestStatus.PREEMPTED
        request.num_computed_tokens = 0
        request.num_preemptions += 1
        self.num_preemptions += 1
        self.waiting.add_preempted(request)
        return len(unscheduled.token_ids) if unscheduled else 0

    def _make_scheduled(self, request: Request, num_new: int,
                        block_ids: list[int]) -> ScheduledRequest:
        start = request.num_computed_tokens
        params = request.sampling_params
        banned: list[int] = []
        if request.num_output_tokens + request.num_output_placeholders < params.min_tokens:
            banned = list(params.stop_token_ids or ())
            if not params.ignore_eos:
                banned += list(request.eos_token_ids)
        end = start + num_new
        token_ids = request.all_token_ids[start:end]
        drafts = take_scheduled_drafts(request, end)
        if drafts:
            token_ids += drafts
        elif len(token_ids) < num_new:  # tokens the in-flight step is still sampling
            token_ids += [PLACEHOLDER_TOKEN_ID] * (num_new - len(token_ids))
        sample = end >= request.num_tokens_with_placeholders
        # Computed as soon as scheduled: the next step may be scheduled before
        # this one's results are back (async scheduling). Rejected drafts are
        # taken back when the results arrive.
        request.num_computed_tokens = end
        request.num_output_placeholders += int(sample)
        request.num_drafts_in_flight = len(drafts)
        return ScheduledRequest(
            request_id=request.request_id,
            token_ids=token_ids,
            num_computed_tokens=start,
            block_ids=block_ids,
            sample=sample,
            sampling_params=params,
            prompt_token_ids=request.prompt_token_ids,
            output_token_ids=request.output_token_ids,
            banned_token_ids=banned,
            grammar=request.grammar,
            draft_token_ids=drafts,
        )

    # ------------------------------------------------------------------ update
    def update_from_output(self, scheduler_output: SchedulerOutput,
                           runner_output: ModelRunnerOutput) -> list[EngineCoreOutput]:
        """Record what a step sampled (its tokens were counted as computed when scheduled).

        A request the runner reports in ``errors``, or whose update raises (a
        grammar plugin deciding whether it terminates), fails on its own with
        finish_reason "error"; the others go on.
        """
        outputs = []
        finished_any = False
        for row, request_id in enumerate(runner_output.request_ids):
            request = self.requests.get(request_id)
            if request is None or request.is_finished():
                continue
            if request is not scheduler_output.request_objects.get(request_id, request):
                continue  # the id was reused after the step was launched
            error = runner_output.errors.get(request_id)
            try:
                output = None if error else self._update_request(request, runner_output, row)
            except Exception as exc:
                logger.error("updating request %s raised; failing it", request_id, exc_info=exc)
                error = describe_failure("checking the stop conditions", exc)
            if error:
                output = self._fail(request, error)
            finished_any |= request.is_finished()
            outputs.append(output)
        if finished_any:
            self.running = [r for r in self.running if not r.is_finished()]
        return outputs

    def _update_request(self, request: Request, runner_output: ModelRunnerOutput,
                        row: int) -> EngineCoreOutput:
        token_ids = runner_output.sampled_token_ids[row]
        request.num_output_placeholders -= 1
        if request.num_drafts_in_flight:
            take_back_rejected_drafts(request, len(token_ids) - 1, self.spec_stats)
        status, token_ids = self._append_until_stop(request, token_ids)
        logprobs = runner_output.logprobs[row]
        if status is not None:
            self._finish(request, status)
        return EngineCoreOutput(
            request_id=request.request_id,
            new_token_ids=token_ids,
            new_logprobs=logprobs[:len(token_ids)] if logprobs is not None else None,
            finish_reason=request.status.finish_reason,
            stop_reason=request.stop_reason,
            num_cached_tokens=max(request.num_cached_tokens, 0),
        )

    def _fail(self, request: Request, error: str) -> EngineCoreOutput:
        if request.is_finished():  # its update raised after finishing it
            request.status = RequestStatus.FINISHED_ERROR
        else:
            self._finish(request, RequestStatus.FINISHED_ERROR)
        return EngineCoreOutput(request.request_id, [], None, finish_reason="error", error=error,
                                num_cached_tokens=max(request.num_cached_tokens, 0))

    def _finish(self, request: Request, status: RequestStatus) -> None:
        """End a request while a step's output is applied (it may be running or waiting)."""
        if request.status != RequestStatus.RUNNING:  # preempted while in flight
            self.waiting.remove(request)
        request.status = status
        self._free(request)

    def _append_until_stop(self, request: Request,
                           token_ids: list[int]) -> tuple[RequestStatus | None, list[int]]:
        """Append a step's tokens up to the first that finishes the request."""
        for count, token_id in enumerate(token_ids, start=1):
            request.append_output_token(token_id)
            status = self._check_stop(request, token_id)
            if status is not None:
                return status, token_ids[:count]
        return None, token_ids

    def _check_stop(self, request: Request, token_id: int) -> RequestStatus | None:
        # A stop token wins over the length limit it coincides with: the model
        # did finish, so the reason is "stop" (as in vLLM), not "length".
        params = request.sampling_params
        if request.grammar is not None and request.grammar.terminates_on(token_id):
            return RequestStatus.FINISHED_STOPPED
        if request.num_output_tokens >= params.min_tokens:
            if not params.ignore_eos and token_id in request.eos_token_ids:
                return RequestStatus.FINISHED_STOPPED
            if params.stop_token_ids and token_id in params.stop_token_ids:
                request.stop_reason = token_id
                return RequestStatus.FINISHED_STOPPED
        if (request.num_output_tokens >= request.max_tokens
                or request.num_tokens >= self.limits.max_model_len):
            return RequestStatus.FINISHED_LENGTH
        return None

    def _free(self, request: Request) -> None:
        """Release a finished request's blocks and forget it."""
        self.kv_cache_manager.free(request)
        self.requests.pop(request.request_id, None)
        self.finished_request_ids.add(request.request_id)


def _penalty_free(params) -> bool:
    return (params.presence_penalty == 0.0 and params.frequency_penalty == 0.0
            and params.repetition_penalty == 1.0)
