"""From per-step token ids to RequestOutputs: text, stop strings, logprobs, n > 1.

A request whose detokenizing or stop-string search raises, or that the core
reports as failed, ends with finish_reason "error" (all its samples); the
others in the step are processed as usual.
"""

from __future__ import annotations

import logging
from dataclasses import dataclass, field
from typing import Any

from kvloom.engine.detokenizer import IncrementalDetokenizer
from kvloom.failures import describe_failure
from kvloom.outputs import CompletionOutput, Logprob, PositionLogprobs, RequestOutput
from kvloom.sampling_params import RequestOutputKind, SamplingParams
from kvloom.step.scheduler_output import EngineCoreOutput, SampleLogprobs

logger = logging.getLogger(__name__)


@dataclass(eq=False)
class SequenceState:
    """One generated sequence (one of a request's n samples)."""

    index: int
    params: SamplingParams
    detokenizer: IncrementalDetokenizer | None
    token_ids: list[int] = field(default_factory=list)
    text: str = ""
    logprobs: list[PositionLogprobs] | None = None
    cumulative_logprob: float | None = None
    finish_reason: str | None = None
    stop_reason: int | str | None = None
    num_sent_tokens: int = 0
    num_sent_chars: int = 0


@dataclass(eq=False)
class RequestState:
    """A user request and its sequences."""

    request_id: str
    prompt: str | None
    prompt_token_ids: list[int]
    params: SamplingParams
    sequences: dict[str, SequenceState]
    num_cached_tokens: int = 0
    num_unfinished: int = -1

    def __post_init__(self) -> None:
        if self.num_unfinished < 0:
            self.num_unfinished = len(self.sequences)

    def finished(self) -> bool:
        return self.num_unfinished == 0


@dataclass(slots=True)
class RequestFailure:
    """A request that failed in this step; its sequences must leave the core."""

    request_id: str
    message: str
    sequence_ids: list[str]


@dataclass(slots=True)
class ProcessedOutputs:
    outputs: list[RequestOutput]  # to hand to the user
    stopped: list[str]            # sequence ids a stop string ended
    failed: list[RequestFailure]


class OutputProcessor:
    """Tracks live requests' text and turns core outputs into RequestOutputs."""

    def __init__(self, tokenizer: Any) -> None:
        self.tokenizer = tokenizer
        self.states: dict[str, RequestState] = {}
        self.sequence_to_request: dict[str, str] = {}

    def add_request(self, request_id: str, prompt: str | None, prompt_token_ids: list[int],
                    params: SamplingParams, sequence_ids: list[str],
                    sequence_params: list[SamplingParams]) -> None:
        sequences = {}
        for index, (sequence_id, seq_params) in enumerate(zip(sequence_ids, sequence_params)):
            detokenizer = None
            if self.tokenizer is not None:
                detokenizer = IncrementalDetokenizer(self.tokenizer, prompt_token_ids,
                                                     seq_params.skip_special_tokens)
            sequences[sequence_id] = SequenceState(
                index, seq_params, detokenizer,
                logprobs=[] if seq_params.logprobs is not None else None,
                cumulative_logprob=0.0 if seq_params.logprobs is not None else None)
            self.sequence_to_request[sequence_id] = request_id
        self.states[request_id] = RequestState(request_id, prompt, prompt_token_ids, params,
                                               sequences)

    def request_of(self, sequence_id: str) -> str | None:
        return self.sequence_to_request.get(sequence_id)

    def request_ids(self) -> list[str]:
        return list(self.states)

    def sequence_ids(self, request_id: str) -> list[str]:
        state = self.states.get(request_id)
        return list(state.sequences) if state else []

    def abort_request(self, request_id: str) -> None:
        state = self.states.pop(request_id, None)
        for sequence_id in (state.sequences if state else ()):
            self.sequence_to_request.pop(sequence_id, None)

    def has_request(self, request_id: str) -> bool:
        return request_id in self.states

    def has_sequence(self, sequence_id: str) -> bool:
        return sequence_id in self.sequence_to_request

    def process(self, core_outputs: list[EngineCoreOutput]) -> ProcessedOutputs:
        """The outputs to hand to the user, the sequences stopped by a stop string,
        and the requests that failed."""
        touched: dict[str, RequestState] = {}
        stopped: list[str] = []
        failed: dict[str, RequestFailure] = {}
        for core_output in core_outputs:
            request_id = self.sequence_to_request.get(core_output.request_id)
            if request_id is None or request_id in failed:
                continue
            state = self.states[request_id]
            touched[request_id] = state
            error = core_output.error
            if error is None:
                try:
                    if self._apply(state, core_output):
                        stopped.append(core_output.request_id)
                except Exception as exc:
                    logger.error("detokenizing request %s raised; failing it", request_id,
                                 exc_info=exc)
                    error = describe_failure("detokenizing", exc)
            if error is not None:
                failed[request_id] = self._fail(state, error)
        outputs = [output for state in touched.values()
                   if (output := self._output_of(state, failed)) is not None]
        for request_id, state in touched.items():
            if state.finished():
                self.abort_request(request_id)
        return ProcessedOutputs(outputs, stopped, list(failed.values()))

    def _apply(self, state: RequestState, core_output: EngineCoreOutput) -> bool:
        """Apply one sequence's step; True when a stop string ended it."""
        state.num_cached_tokens = core_output.num_cached_tokens
        sequence = state.sequences[core_output.request_id]
        was_running = sequence.finish_reason is None
        stopped = self._update_sequence(sequence, core_output)
        if was_running and sequence.finish_reason is not None:
            state.num_unfinished -= 1
        return stopped

    @staticmethod
    def _fail(state: RequestState, message: str) -> RequestFailure:
        for sequence in state.sequences.values():
            if sequence.finish_reason is None:
                sequence.finish_reason = "error"
        state.num_unfinished = 0
        return RequestFailure(state.request_id, message, list(state.sequences))

    def _output_of(self, state: RequestState,
                   failed: dict[str, RequestFailure]) -> RequestOutput | None:
        try:
            return self._make_output(state)
        except Exception as exc:
            logger.error("building the output of request %s raised; failing it",
                         state.request_id, exc_info=exc)
            failed.setdefault(state.request_id,
                              self._fail(state, describe_failure("building its output", exc)))
            completions = [CompletionOutput(seq.index, "", [], None, None, finish_reason="error")
                           for seq in state.sequences.values()]
            return RequestOutput(state.request_id, state.prompt, state.prompt_token_ids,
                                 completions, True, state.num_cached_tokens)

    def _update_sequence(self, sequence: SequenceState, core_output: EngineCoreOutput) -> bool:
        """Apply one step; True when a stop string ended the sequence here."""
        if sequence.finish_reason is not None:
            return False
        num_previous_tokens = len(sequence.token_ids)
        sequence.token_ids.extend(core_output.new_token_ids)
        if core_output.new_logprobs and sequence.logprobs is not None:
            for sample in core_output.new_logprobs:
                sequence.logprobs.append(self._position_logprobs(sample))
                sequence.cumulative_logprob += sample.logprobs[0]
        stopped_by_string = False
        if sequence.detokenizer is not None:
            stopped_by_string = _update_text(sequence, core_output, num_previous_tokens)
        if not stopped_by_string and core_output.finished:
            sequence.finish_reason = core_output.finish_reason
            sequence.stop_reason = core_output.stop_reason
        return stopped_by_string and not core_output.finished

    def _position_logprobs(self, sample: SampleLogprobs) -> PositionLogprobs:
        entries: PositionLogprobs = {}
        for position, (token_id, logprob) in enumerate(zip(sample.token_ids, sample.logprobs)):
            if token_id in entries:
                continue  # the sampled token is also among the top N
            rank = sample.sampled_rank if position == 0 else position
            entries[token_id] = Logprob(logprob, rank, self._decode_one(token_id))
        return entries

    def _decode_one(self, token_id: int) -> str | None:
        return None if self.tokenizer is None else self.tokenizer.decode([token_id])

    def _make_output(self, state: RequestState) -> RequestOutput | None:
        kind = state.params.output_kind
        finished = state.finished()
        if kind == RequestOutputKind.FINAL_ONLY and not finished:
            return None
        completions = [self._completion(seq, kind == RequestOutputKind.DELTA)
                       for seq in sorted(state.sequences.values(), key=lambda s: s.index)]
        return RequestOutput(state.request_id, state.prompt, state.prompt_token_ids, completions,
                             finished, state.num_cached_tokens)

    @staticmethod
    def _completion(sequence: SequenceState, delta: bool) -> CompletionOutput:
        token_start = sequence.num_sent_tokens if delta else 0
        text_start = sequence.num_sent_chars if delta else 0
        text = sequence.text
        if sequence.finish_reason is None and sequence.params.stop_strings:
            # Hold back a tail that could still become a stop string.
            hold = max(len(s) for s in sequence.params.stop_strings) - 1
            text = text[:max(len(text) - hold, text_start)]
        if delta:
            sequence.num_sent_tokens = len(sequence.token_ids)
            sequence.num_sent_chars = len(text)
        logprobs = sequence.logprobs[token_start:] if sequence.logprobs is not None else None
        return CompletionOutput(sequence.index, text[text_start:],
                                sequence.token_ids[token_start:], sequence.cumulative_logprob,
                                logprobs, sequence.finish_reason, sequence.stop_reason)


def _update_text(sequence: SequenceState, core_output: EngineCoreOutput,
                 num_previous_tokens: int) -> bool:
    """Detokenize a step's tokens; True when a stop string ended the sequence.

    As in vLLM, the text of the EOS or stop token id that ended a sequence is left
    out (unless ``include_stop_str_in_output``), and stop strings are only looked
    for in text that tokens after the first ``min_tokens`` produced.
    """
    params = sequence.params
    token_ids = core_output.new_token_ids
    if core_output.finish_reason == "stop" and not params.include_stop_str_in_output:
        token_ids = token_ids[:-1]
    search_start = len(sequence.text)
    text_lengths = []  # the text's length after each new token
    for num_tokens, token_id in enumerate(token_ids, start=num_previous_tokens + 1):
        sequence.text += sequence.detokenizer.add_tokens([token_id])
        text_lengths.append(len(sequence.text))
        if num_tokens <= params.min_tokens:
            search_start = len(sequence.text)
    if not params.stop_strings or len(sequence.token_ids) <= params.min_tokens:
        return False
    stop = find_stop_string(sequence.text, search_start, params)
    if stop is None:
        return False
    stop_string, cut, stop_end = stop
    sequence.text = sequence.text[:cut]
    sequence.finish_reason, sequence.stop_reason = "stop", stop_string
    # A step may bring several tokens (speculative decoding): drop those after the
    # one that completed the stop string, as if generation had stopped there.
    completing = next(i for i, length in enumerate(text_lengths) if length >= stop_end)
    keep = num_previous_tokens + completing + 1
    if sequence.logprobs is not None:
        for token_id, position in zip(sequence.token_ids[keep:], sequence.logprobs[keep:]):
            sequence.cumulative_logprob -= position[token_id].logprob
        del sequence.logprobs[keep:]
    del sequence.token_ids[keep:]
    return True


def find_stop_string(text: str, previous_length: int,
                     params: SamplingParams) -> tuple[str, int, int] | None:
    """The first stop string in the newly grown part of ``text``, where to cut the
    text, and where the stop string ends."""
    best = None
    for stop in params.stop_strings:
        start = max(0, previous_length - len(stop) + 1)
        position = text.find(stop, start)
        if position != -1 and (best is None or position < best[1]):
            best = (stop, position)
    if best is None:
        return None
    stop, position = best
    end = position + len(stop)
    return stop, end if params.include_stop_str_in_output else position, end
