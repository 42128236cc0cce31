"""Runs one scheduled step: inputs -> attention metadata -> model -> logits -> sampler."""

from __future__ import annotations

import torch

from kvloom.interfaces.attention import AttentionBackend
from kvloom.interfaces.sampler import Sampler, SamplerOutput, SamplingMetadata
from kvloom.scheduler.output import SampleLogprobs, ScheduledRequest, SchedulerOutput
from kvloom.worker.input_batch import build_model_inputs
from kvloom.worker.runner_output import ModelRunnerOutput


class ModelRunner:
    """Owns the model, its KV caches and the per-request sampling state."""

    def __init__(self, model: torch.nn.Module, attention_backend: AttentionBackend,
                 sampler: Sampler, kv_caches: list[torch.Tensor], block_size: int,
                 device: torch.device) -> None:
        self.model = model
        self.attention_backend = attention_backend
        self.sampler = sampler
        self.kv_caches = kv_caches
        self.block_size = block_size
        self.device = device
        self.request_to_generator: dict[str, torch.Generator] = {}

    @torch.inference_mode()
    def execute(self, scheduler_output: SchedulerOutput) -> ModelRunnerOutput:
        for request_id in scheduler_output.finished_request_ids:
            self.request_to_generator.pop(request_id, None)
        if scheduler_output.is_empty:
            return ModelRunnerOutput([], [], [])

        inputs = build_model_inputs(scheduler_output.scheduled, self.block_size, self.device)
        metadata = self.attention_backend.build_metadata(inputs.attention)
        hidden_states = self.model(inputs.input_ids, inputs.positions, self.kv_caches, metadata)
        if not inputs.sampled_rows:
            return ModelRunnerOutput([], [], [])

        logits = self.model.compute_logits(hidden_states[inputs.logits_indices]).float()
        rows = [scheduler_output.scheduled[row] for row in inputs.sampled_rows]
        sampler_output = self.sampler.sample(logits, self._sampling_metadata(rows))
        return _to_runner_output(rows, sampler_output)

    def _sampling_metadata(self, rows: list[ScheduledRequest]) -> SamplingMetadata:
        params = [row.sampling_params for row in rows]

        def column(name: str, dtype: torch.dtype) -> torch.Tensor:
            return torch.tensor([getattr(p, name) for p in params], dtype=dtype,
                                device=self.device)

        generators = {}
        for index, row in enumerate(rows):
            if row.sampling_params.seed is not None and not row.sampling_params.is_greedy:
                generators[index] = self._generator_for(row)
        num_logprobs = [p.logprobs for p in params if p.logprobs is not None]
        greedy = [p.is_greedy for p in params]
        return SamplingMetadata(
            temperature=column("temperature", torch.float32),
            top_k=column("top_k", torch.int64),
            top_p=column("top_p", torch.float32),
            min_p=column("min_p", torch.float32),
            presence_penalty=column("presence_penalty", torch.float32),
            frequency_penalty=column("frequency_penalty", torch.float32),
            repetition_penalty=column("repetition_penalty", torch.float32),
            prompt_token_ids=[row.prompt_token_ids for row in rows],
            output_token_ids=[row.output_token_ids for row in rows],
            banned_token_ids=[row.banned_token_ids for row in rows],
            generators=generators,
            max_num_logprobs=max(num_logprobs) if num_logprobs else None,
            all_greedy=all(greedy),
            all_random=not any(greedy),
            no_penalties=all(p.presence_penalty == 0 and p.frequency_penalty == 0
                             and p.repetition_penalty == 1.0 for p in params),
        )

    def _generator_for(self, row: ScheduledRequest) -> torch.Generator:
        generator = self.request_to_generator.get(row.request_id)
        if generator is None:
            generator = torch.Generator(device=self.device)
            generator.manual_seed(row.sampling_params.seed)
            self.request_to_generator[row.request_id] = generator
        return generator


def _to_runner_output(rows: list[ScheduledRequest], output: SamplerOutput) -> ModelRunnerOutput:
    sampled = output.sampled_token_ids.tolist()
    logprobs: list[SampleLogprobs | None] = [None] * len(rows)
    if output.logprob_token_ids is not None:
        token_ids = output.logprob_token_ids.tolist()
        values = output.logprobs.tolist()
        ranks = output.sampled_ranks.tolist()
        for index, row in enumerate(rows):
            count = row.sampling_params.logprobs
            if count is not None:
                logprobs[index] = SampleLogprobs(token_ids[index][:1 + count],
                                                 values[index][:1 + count], ranks[index])
    return ModelRunnerOutput([row.request_id for row in rows], sampled, logprobs)
