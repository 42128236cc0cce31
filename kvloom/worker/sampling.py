"""Per-request sampling state in the runner, and the per-step SamplingMetadata."""

from __future__ import annotations

from typing import Callable

import numpy as np
import torch

from kvloom.interfaces.platform import Platform
from kvloom.interfaces.sampler import SamplerOutput, SamplingMetadata
from kvloom.sampling_params import PER_ROW_FLOAT_FIELDS, PER_ROW_INT_FIELDS, SamplingParams
from kvloom.step.scheduler_output import SampleLogprobs, ScheduledRequest
from kvloom.step.runner_output import ModelRunnerOutput, PendingRunnerOutput


class SamplingState:
    """Seeded generators live as long as their request, across steps and preemptions."""

    def __init__(self, device: torch.device) -> None:
        self.device = device
        self.request_to_generator: dict[str, torch.Generator] = {}

    def forget(self, request_ids: set[str]) -> None:
        for request_id in request_ids:
            self.request_to_generator.pop(request_id, None)

    def snapshot(self) -> dict[str, torch.Tensor]:
        """Every live seeded generator's state (usually none: a dict lookup per step), to
        draw the same numbers again if a batch is sampled a second time, row by row."""
        return {request_id: generator.get_state()
                for request_id, generator in self.request_to_generator.items()}

    def restore(self, saved: dict[str, torch.Tensor]) -> None:
        """Back to ``saved``: generators made since are dropped (made again from their
        seeds), the others rewound."""
        for request_id in list(self.request_to_generator):
            state = saved.get(request_id)
            if state is None:
                del self.request_to_generator[request_id]
            else:
                self.request_to_generator[request_id].set_state(state)

    def metadata_for(self, rows: list[ScheduledRequest]) -> SamplingMetadata:
        params = [row.sampling_params for row in rows]
        columns = {**self.per_row_tensors(params, PER_ROW_FLOAT_FIELDS, np.float32),
                   **self.per_row_tensors(params, PER_ROW_INT_FIELDS, np.int64)}
        generators = {index: self.generator_for(row) for index, row in enumerate(rows)
                      if row.sampling_params.seed is not None
                      and not row.sampling_params.is_greedy}
        num_logprobs = [p.logprobs for p in params if p.logprobs is not None]
        greedy = [p.is_greedy for p in params]
        return SamplingMetadata(
            **columns,
            prompt_token_ids=[row.prompt_token_ids for row in rows],
            output_token_ids=[row.output_token_ids for row in rows],
            banned_token_ids=[row.banned_token_ids for row in rows],
            generators=generators,
            max_num_logprobs=max(num_logprobs) if num_logprobs else None,
            all_greedy=all(greedy),
            all_random=not any(greedy),
            no_penalties=all(p.presence_penalty == 0 and p.frequency_penalty == 0
                             and p.repetition_penalty == 1.0 for p in params),
            any_min_p=any(p.min_p > 0 for p in params),
            any_top_k_top_p=any(p.top_k > 0 or p.top_p < 1.0 for p in params),
        )

    def per_row_tensors(self, params: list[SamplingParams], names: tuple[str, ...],
                        dtype: type) -> dict[str, torch.Tensor]:
        """A tensor per field of ``names``, one value per row: one host array and one
        copy for all of them."""
        host = np.array([[getattr(p, name) for p in params] for name in names], dtype=dtype)
        return dict(zip(names, torch.from_numpy(host).to(self.device, non_blocking=True)))

    def generator_for(self, row: ScheduledRequest) -> torch.Generator:
        generator = self.request_to_generator.get(row.request_id)
        if generator is None:
            generator = torch.Generator(device=self.device)
            generator.manual_seed(row.sampling_params.seed)
            self.request_to_generator[row.request_id] = generator
        return generator


class SampledTokenStore:
    """The last step's sampled tokens: on the device for the next step's placeholders,
    and copied to host memory (pinned where the platform uses it) for the scheduler.

    Two host buffers alternate, so copying step N+1's tokens never overwrites
    step N's before they are read.
    """

    def __init__(self, max_num_seqs: int, platform: Platform, vocab_size: int = 0) -> None:
        self.vocab_size = vocab_size
        self.host_buffers = [torch.zeros(max_num_seqs, dtype=torch.int64,
                                         pin_memory=platform.uses_pinned_memory)
                             for _ in range(2)]
        self.next_buffer = 0
        self.last_sampled: torch.Tensor | None = None
        self.last_row_of: dict[str, int] = {}
        self.platform = platform
        self.device = platform.device()

    def record(self, rows: list[ScheduledRequest], output: SamplerOutput) -> PendingRunnerOutput:
        sampled = output.sampled_token_ids
        # The next step may feed these to the model before the host has seen them: an id
        # outside the vocabulary (a sampler bug, failed on the host) must not reach the
        # embedding there.
        self.last_sampled = sampled.clamp(0, self.vocab_size - 1) if self.vocab_size else sampled
        self.last_row_of = {row.request_id: index for index, row in enumerate(rows)}
        host = self.host_buffers[self.next_buffer][:len(rows)]
        self.next_buffer ^= 1
        host.copy_(sampled, non_blocking=True)
        wait_for_copies = copies_marker(self.platform)

        def wait() -> ModelRunnerOutput:
            wait_for_copies()
            return to_runner_output(rows, output, host.tolist())

        return PendingRunnerOutput(wait)

    def remember(self, rows: list[ScheduledRequest], token_ids: list[int]) -> None:
        """Record tokens sampled on the host (a batch sampled row by row)."""
        sampled = torch.tensor(token_ids, dtype=torch.int64)
        self.last_sampled = (sampled.clamp(0, self.vocab_size - 1) if self.vocab_size
                             else sampled).to(self.device)
        self.last_row_of = {row.request_id: index for index, row in enumerate(rows)}

    def fill_placeholders(self, input_ids: torch.Tensor, token_indices, request_ids: list[str]) -> None:
        """Write the last step's sampled tokens into this step's input ids, on the device."""
        try:
            rows = [self.last_row_of[request_id] for request_id in request_ids]
        except KeyError as missing:
            raise RuntimeError(f"request {missing} has a placeholder token but was not "
                               "sampled by the previous step") from None
        indices = torch.as_tensor(token_indices, dtype=torch.int64).to(self.device,
                                                                      non_blocking=True)
        rows_on_device = torch.tensor(rows, dtype=torch.int64).to(self.device, non_blocking=True)
        input_ids[indices] = self.last_sampled[rows_on_device]


def copies_marker(platform: Platform) -> Callable[[], None]:
    """A function that waits until the work queued so far on the platform's device
    (the asynchronous copies to the host) is done."""
    event = platform.new_event()
    event.record()
    return event.synchronize


def to_runner_output(rows: list[ScheduledRequest], output: SamplerOutput,
                     sampled: list[int]) -> ModelRunnerOutput:
    logprobs: list[list[SampleLogprobs] | None] = [None] * len(rows)
    if output.logprob_token_ids is not None:
        token_ids = output.logprob_token_ids.tolist()
        values = output.logprobs.tolist()
        ranks = output.sampled_ranks.tolist()
        for index, row in enumerate(rows):
            count = row.sampling_params.logprobs
            if count is not None:
                logprobs[index] = [SampleLogprobs(token_ids[index][:1 + count],
                                                  values[index][:1 + count], ranks[index])]
    return ModelRunnerOutput([row.request_id for row in rows], [[token] for token in sampled],
                             logprobs)
