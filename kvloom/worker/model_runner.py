"""Runs one scheduled step: inputs -> attention metadata -> model -> logits -> sampler."""

from __future__ import annotations

import functools
import logging

import torch

from kvloom.interfaces.attention import AttentionBackend
from kvloom.interfaces.drafter import Drafter
from kvloom.interfaces.platform import Platform
from kvloom.interfaces.sampler import Sampler
from kvloom.sampling_params import SamplingParams
from kvloom.step.scheduler_output import ScheduledRequest, SchedulerOutput
from kvloom.worker.cuda_graphs import CudaGraphDecoder
from kvloom.structured_output.grammar_mask import FillBitmasks, GrammarMasks, MaskFill, fill_one_by_one
from kvloom.worker.input_batch import InputBuffers, ModelInputs
from kvloom.worker.row_isolation import (flag_tokens_outside_vocabulary, logits_spans,
                                         sample_row_by_row)
from kvloom.step.runner_output import ModelRunnerOutput, PendingRunnerOutput
from kvloom.worker.sampling import SampledTokenStore, SamplingState, to_runner_output
from kvloom.spec_decode.decoder import DraftCandidate, SpeculativeDecoder

logger = logging.getLogger(__name__)


class ModelRunner:
    """Owns the model, its KV caches, the input buffers and the per-request sampling state.

    Everything device-specific (pinned buffers, events, synchronising, graph capture)
    goes through ``platform``.
    """

    def __init__(self, model: torch.nn.Module, attention_backend: AttentionBackend,
                 sampler: Sampler, buffers: InputBuffers, block_size: int,
                 platform: Platform, fill_bitmasks: FillBitmasks = fill_one_by_one,
                 drafter: Drafter | None = None, num_speculative_tokens: int = 0,
                 vocab_size: int = 0) -> None:
        self.model = model
        self.attention_backend = attention_backend
        self.sampler = sampler
        self.buffers = buffers
        self.block_size = block_size
        self.platform = platform
        device = platform.device()
        self.device = device
        self.kv_caches: list[torch.Tensor] = []
        self.sampling_state = SamplingState(device)
        self.vocab_size = vocab_size
        self.num_failed_batches = 0  # batches sampled again row by row after raising
        self.sampled_tokens = SampledTokenStore(buffers.max_num_seqs, platform, vocab_size)
        self.cuda_graphs: CudaGraphDecoder | None = None
        # With drafts, a request has a mask row per verified position.
        self.grammar_masks = GrammarMasks(buffers.max_num_seqs * (1 + num_speculative_tokens),
                                          device, fill_bitmasks,
                                          pin_memory=platform.uses_pinned_memory)
        self.speculative = None
        self.num_speculative_tokens = num_speculative_tokens
        if drafter is not None:
            self.speculative = SpeculativeDecoder(drafter, sampler, self.sampling_state,
                                                  self.sampled_tokens, vocab_size, block_size,
                                                  platform)

    def initialize_kv_caches(self, kv_caches: list[torch.Tensor]) -> None:
        self.kv_caches = kv_caches

    def capture_cuda_graphs(self, capture_sizes: list[int]) -> None:
        """Capture decode graphs; needs a platform and a backend that support them."""
        self.cuda_graphs = CudaGraphDecoder(self.platform, self.model, self.attention_backend,
                                            self.kv_caches, self.buffers, capture_sizes,
                                            self.num_speculative_tokens)
        self.cuda_graphs.capture()

    def execute(self, scheduler_output: SchedulerOutput) -> ModelRunnerOutput:
        """Run a step and wait for its sampled tokens."""
        return self.execute_async(scheduler_output).result()

    @torch.inference_mode()
    def execute_async(self, scheduler_output: SchedulerOutput) -> PendingRunnerOutput:
        """Launch a step; its tokens are copied to the host in the background.

        The next step may be launched before ``result()`` is called: tokens it
        needs from this one (placeholders) are taken from the device directly.
        With structured-output rows, sampling is deferred (see PendingRunnerOutput).
        """
        self.sampling_state.forget(scheduler_output.finished_request_ids)
        scheduled = scheduler_output.scheduled
        if not scheduled:
            return PendingRunnerOutput.empty()
        hidden_states, inputs = self._forward(scheduled)
        if not inputs.sampled_rows:
            return PendingRunnerOutput.empty()
        logits = self.model.compute_logits(hidden_states[inputs.logits_indices]).float()
        rows = [scheduled[row] for row in inputs.sampled_rows]
        if any(row.grammar is not None for row in rows):
            grammars = [row.grammar for row in rows]
            drafts = [row.draft_token_ids for row in rows] if self.speculative is not None else None
            return PendingRunnerOutput(
                start_masks=lambda: self.grammar_masks.start(grammars, logits.shape[1], drafts),
                deferred_sample=lambda mask_fill: self._sample(rows, logits, mask_fill))
        return self._sample(rows, logits)

    @torch.inference_mode()
    def run_forward(self, scheduled: list[ScheduledRequest]) -> None:
        """A step's forward pass and logits, without sampling: what a tensor-parallel
        worker runs while the driver samples (the model's collectives need every rank,
        the logits' gather included)."""
        if not scheduled:
            return
        hidden_states, inputs = self._run_model(scheduled)
        if isinstance(hidden_states, tuple):  # (hidden states, EAGLE-3 auxiliary layers)
            hidden_states = hidden_states[0]
        if inputs.sampled_rows:
            self.model.compute_logits(hidden_states[inputs.logits_indices])

    @torch.inference_mode()
    def _sample(self, rows: list[ScheduledRequest], logits: torch.Tensor,
                mask_fill: MaskFill | None = None) -> PendingRunnerOutput:
        errors: dict[str, str] = {}
        if mask_fill is not None:
            logits, failed = self.grammar_masks.apply(logits, mask_fill)
            errors = {rows[index].request_id: message for index, message in failed.items()}
        seeds = self.sampling_state.snapshot()
        try:
            pending = self._sample_batch(rows, logits)
        except Exception as error:
            self.num_failed_batches += 1
            logger.warning("sampling a batch of %d requests raised (%d batches so far); "
                           "sampling them one by one to fail only those that raise", len(rows),
                           self.num_failed_batches,
                           exc_info=error if self.num_failed_batches == 1 else None)
            self.sampling_state.restore(seeds)  # seeded rows draw what they would have
            pending = PendingRunnerOutput.ready(self._sample_each(rows, logits))
        if self.vocab_size:
            pending = pending.then(functools.partial(flag_tokens_outside_vocabulary,
                                                     vocab_size=self.vocab_size))
        return pending.with_errors(errors)

    def _sample_batch(self, rows: list[ScheduledRequest],
                      logits: torch.Tensor) -> PendingRunnerOutput:
        if self.speculative is not None:
            return self.speculative.verify(rows, logits)
        output = self.sampler.sample(logits, self.sampling_state.metadata_for(rows))
        return self.sampled_tokens.record(rows, output)

    def _sample_each(self, rows: list[ScheduledRequest], logits: torch.Tensor) -> ModelRunnerOutput:
        spans = logits_spans(rows, with_drafts=self.speculative is not None)
        merged = sample_row_by_row(rows, logits, spans, self._sample_one)
        # The next step's placeholders (async scheduling) and the drafter read this step.
        self.sampled_tokens.remember(rows, [tokens[-1] for tokens in merged.sampled_token_ids])
        if self.speculative is not None:
            self.speculative.remember_output(merged)
        return merged

    def _sample_one(self, row: ScheduledRequest, logits: torch.Tensor) -> ModelRunnerOutput:
        if self.speculative is not None:  # synchronous: nothing else waits on its buffers
            return self.speculative.verify([row], logits).result()
        output = self.sampler.sample(logits, self.sampling_state.metadata_for([row]))
        return to_runner_output([row], output, output.sampled_token_ids.tolist())

    def reset(self) -> None:
        """Forget every request's state, after a failed step ended them all."""
        self.sampling_state.request_to_generator.clear()
        self.sampled_tokens.remember([], [])
        if self.speculative is not None:
            self.speculative.last_step = None

    @torch.inference_mode()
    def propose_drafts(self, candidates: list[DraftCandidate]) -> list[list[int]]:
        """Drafts for the next step of requests that just sampled (speculative decoding)."""
        return self.speculative.propose(candidates)

    def _forward(self, scheduled: list[ScheduledRequest]) -> tuple[torch.Tensor, ModelInputs]:
        hidden, inputs = self._run_model(scheduled)
        aux: tuple[torch.Tensor, ...] = ()
        if isinstance(hidden, tuple):  # the model also returns layers an EAGLE-3 drafter reads
            hidden, aux = hidden
        if self.speculative is not None:
            self.speculative.remember(scheduled, inputs, hidden, aux)
        return hidden, inputs

    def _run_model(self, scheduled: list[ScheduledRequest]):
        graph_key = self._graph_key_for(scheduled)
        padded = graph_key[0] if graph_key is not None else None
        inputs = self.buffers.prepare(scheduled, self.block_size, pad_to=padded)
        if len(inputs.placeholder_indices):
            self.sampled_tokens.fill_placeholders(
                inputs.input_ids, inputs.placeholder_indices,
                [scheduled[row].request_id for row in inputs.placeholder_rows])
        if graph_key is not None:
            return self.cuda_graphs.replay(graph_key, inputs.num_tokens), inputs
        metadata = self.attention_backend.build_metadata(inputs.attention)
        hidden = self.model(inputs.input_ids, inputs.positions, self.kv_caches, metadata)
        return hidden, inputs

    def _graph_key_for(self, scheduled: list[ScheduledRequest]) -> tuple[int, int] | None:
        if self.cuda_graphs is None:
            return None
        return self.cuda_graphs.key_for([len(item.token_ids) for item in scheduled])

    @torch.inference_mode()
    def profile_run(self, num_tokens: int, num_seqs: int) -> None:
        """The largest step the scheduler can produce, so the allocator sees its peak.

        One sequence of ``num_tokens`` prompt tokens through the model (with a
        throwaway KV cache), then ``num_seqs`` rows through a sampler using
        top-k, top-p and penalties.
        """
        spec = self.model.attention_spec()
        num_blocks = -(-num_tokens // self.block_size)
        shape = self.attention_backend.kv_cache_shape(num_blocks, _with_block_size(spec, self))
        caches = [torch.zeros(shape, dtype=spec.dtype, device=self.device)
                  for _ in range(self.model.num_attention_layers())]
        prompt = ScheduledRequest("profile", [0] * num_tokens, 0, list(range(num_blocks)), True,
                                  SamplingParams(max_tokens=1), [0] * num_tokens, [])
        inputs = self.buffers.prepare([prompt], self.block_size)
        metadata = self.attention_backend.build_metadata(inputs.attention)
        hidden = self.model(inputs.input_ids, inputs.positions, caches, metadata)
        if isinstance(hidden, tuple):  # (hidden states, EAGLE-3 auxiliary layers)
            hidden = hidden[0]
        rows = [ScheduledRequest(f"profile-{i}", [0], 0, [0], True,
                                 SamplingParams(temperature=1.0, top_p=0.9, top_k=50,
                                                presence_penalty=0.1, logprobs=5),
                                 [0] * 16, [1] * 16) for i in range(num_seqs)]
        logits = self.model.compute_logits(hidden[-1:].expand(num_seqs, -1)).float()
        self.sampler.sample(logits, self.sampling_state.metadata_for(rows))
        self.sampling_state.forget({row.request_id for row in rows})
        del caches, hidden, logits
        self.platform.synchronize()  # the peak is reached only once the queued work ran


def _with_block_size(spec, runner: ModelRunner):
    from dataclasses import replace

    return replace(spec, block_size=runner.block_size, device_type=runner.device.type)
