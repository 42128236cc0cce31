"""The model runner's side of speculative decoding: verify drafts, then ask for new ones.

A request with k drafts runs k + 1 tokens through the target in one forward
pass (its last known token, then the drafts); the logits of those k + 1
positions are the target's distributions after each draft prefix. Each
position is sampled with the request's own parameters (penalties and
``min_tokens`` see the drafts before it, structured-output masks follow the
grammar along the drafts), and the rejection sampler keeps the drafts the
target agrees with plus one token of its own.

Speculative decoding runs with synchronous scheduling: drafts for the next
step depend on this step's accepted tokens.
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass

import numpy as np
import torch

from kvloom.interfaces.drafter import Drafter, DraftInputs, TargetStep
from kvloom.interfaces.platform import Platform
from kvloom.interfaces.sampler import Sampler
from kvloom.step.scheduler_output import SampleLogprobs, ScheduledRequest
from kvloom.worker.input_batch import ModelInputs
from kvloom.spec_decode.rejection_sampler import rejection_sample
from kvloom.step.runner_output import ModelRunnerOutput, PendingRunnerOutput
from kvloom.worker.sampling import SampledTokenStore, SamplingState, copies_marker


@dataclass(slots=True)
class DraftCandidate:
    """A request that may get drafts for its next step."""

    request_id: str
    token_ids: list[int]  # prompt + output, including this step's tokens
    max_num_drafts: int


@dataclass(slots=True)
class VerifiedStep:
    """What a model-based drafter needs of the step that was just verified."""

    scheduled: list[ScheduledRequest]
    inputs: ModelInputs
    hidden_states: torch.Tensor
    aux_hidden_states: tuple[torch.Tensor, ...]
    output: ModelRunnerOutput | None = None


def sampler_exposes_distribution(sampler: Sampler) -> bool:
    """Whether the sampler overrides ``Sampler.probabilities``."""
    return type(sampler).probabilities is not Sampler.probabilities


def position_rows(rows: list[ScheduledRequest]) -> list[ScheduledRequest]:
    """One row per verified position: row r with k drafts becomes k + 1 rows, the
    t-th seeing drafts[:t] as generated tokens (for penalties and min_tokens)."""
    expanded = []
    for row in rows:
        expanded.append(row)
        num_output = len(row.output_token_ids)
        min_tokens = row.sampling_params.min_tokens
        for count in range(1, len(row.draft_token_ids) + 1):
            banned = row.banned_token_ids if num_output + count < min_tokens else []
            expanded.append(dataclasses.replace(
                row, output_token_ids=row.output_token_ids + row.draft_token_ids[:count],
                banned_token_ids=banned))
    return expanded


class SpeculativeDecoder:
    """Verifies drafts with the rejection sampler and keeps the step for the drafter."""

    def __init__(self, drafter: Drafter, sampler: Sampler, sampling_state: SamplingState,
                 sampled_tokens: SampledTokenStore, vocab_size: int, block_size: int,
                 platform: Platform) -> None:
        self.drafter = drafter
        self.sampler = sampler
        self.sampling_state = sampling_state
        self.sampled_tokens = sampled_tokens
        self.vocab_size = vocab_size
        self.block_size = block_size
        self.platform = platform
        self.device = platform.device()
        self._host = {name: torch.zeros(0, dtype=torch.int64,
                                        pin_memory=platform.uses_pinned_memory)
                      for name in ("tokens", "counts")}
        self.last_step: VerifiedStep | None = None

    # ------------------------------------------------------------------ verify
    def verify(self, rows: list[ScheduledRequest], logits: torch.Tensor) -> PendingRunnerOutput:
        """Sample every row's positions and accept or reject its drafts.

        ``logits`` has one row per position (see ``position_rows``), already
        masked for structured output.
        """
        if not any(row.draft_token_ids for row in rows):  # plain sampling, one token each
            output = self.sampler.sample(logits, self.sampling_state.metadata_for(rows))
            return self._keeping_output(self.sampled_tokens.record(rows, output))
        expanded = position_rows(rows)
        metadata = self.sampling_state.metadata_for(expanded)
        # The token ``sample`` picks greedily (penalties and bans applied), drawing no randomness.
        greedy_view = dataclasses.replace(metadata, all_greedy=True, max_num_logprobs=None)
        target_argmax = self.sampler.sample(logits, greedy_view).sampled_token_ids
        greedy = [row.sampling_params.is_greedy for row in rows]
        target_probs = None if all(greedy) else self.sampler.probabilities(logits, metadata)
        num_drafts = [len(row.draft_token_ids) for row in rows]
        drafts = torch.tensor([t for row in rows for t in row.draft_token_ids],
                              dtype=torch.int64).to(self.device, non_blocking=True)
        generators = {index: self.sampling_state.generator_for(row)
                      for index, row in enumerate(rows)
                      if row.sampling_params.seed is not None and not greedy[index]}
        result = rejection_sample(num_drafts, drafts, target_argmax, target_probs, greedy,
                                  generators=generators)
        logprobs = None
        if metadata.max_num_logprobs is not None:
            logprobs = _logprobs_of(logits, result.token_ids, num_drafts,
                                    metadata.max_num_logprobs)
        return self._to_host(rows, result.token_ids, result.num_tokens, logprobs)

    def _to_host(self, rows: list[ScheduledRequest], token_ids: torch.Tensor,
                 num_tokens: torch.Tensor, logprobs) -> PendingRunnerOutput:
        tokens_host = self._host_buffer("tokens", token_ids.numel()).view(token_ids.shape)
        counts_host = self._host_buffer("counts", num_tokens.numel())
        tokens_host.copy_(token_ids, non_blocking=True)
        counts_host.copy_(num_tokens, non_blocking=True)
        wait_for_copies = copies_marker(self.platform)

        def wait() -> ModelRunnerOutput:
            wait_for_copies()
            counts = counts_host.tolist()
            sampled = [ids[:count] for ids, count in zip(tokens_host.tolist(), counts)]
            return ModelRunnerOutput([row.request_id for row in rows], sampled,
                                     _host_logprobs(rows, counts, logprobs))

        return self._keeping_output(PendingRunnerOutput(wait))

    def _keeping_output(self, pending: PendingRunnerOutput) -> PendingRunnerOutput:
        """Record the step's tokens for the drafter once they reach the host."""
        step = self.last_step
        if step is None:
            return pending

        def wait() -> ModelRunnerOutput:
            step.output = pending.result()
            return step.output

        return PendingRunnerOutput(wait)

    def remember_output(self, output: ModelRunnerOutput) -> None:
        """The step's output, when it was put together outside ``verify``."""
        if self.last_step is not None:
            self.last_step.output = output

    def _host_buffer(self, name: str, size: int) -> torch.Tensor:
        # One step's result is read before the next step is verified (no async
        # scheduling here), so a single buffer per name suffices.
        if self._host[name].numel() < size:
            self._host[name] = torch.zeros(max(size, 2 * self._host[name].numel()),
                                           dtype=torch.int64,
                                           pin_memory=self.platform.uses_pinned_memory)
        return self._host[name][:size]

    # ------------------------------------------------------------------ drafts
    def remember(self, scheduled: list[ScheduledRequest], inputs: ModelInputs,
                 hidden_states: torch.Tensor, aux: tuple[torch.Tensor, ...]) -> None:
        """Keep the step's forward pass for a drafter that reads it."""
        self.last_step = (VerifiedStep(scheduled, inputs, hidden_states, aux)
                          if self.drafter.uses_target_hidden_states else None)

    def propose(self, candidates: list[DraftCandidate]) -> list[list[int]]:
        """Drafts for each candidate, checked against its limit and the vocabulary."""
        limits = [candidate.max_num_drafts for candidate in candidates]
        target = None
        if self.drafter.uses_target_hidden_states:
            if self.last_step is None:
                return [[] for _ in candidates]
            # Called even with nothing to draft: the drafter writes its own KV for
            # every position the target computed (prompt chunks included).
            target = self._target_step([c.request_id for c in candidates])
            self.last_step = None
        elif not any(limits):
            return [[] for _ in candidates]
        inputs = DraftInputs([c.request_id for c in candidates],
                             [c.token_ids for c in candidates], limits, target)
        drafts = self.drafter.propose(inputs)
        self._check_drafts(drafts, limits)
        return [list(row[:limit]) for row, limit in zip(drafts, limits)]

    def _check_drafts(self, drafts: list[list[int]], limits: list[int]) -> None:
        name = getattr(self.drafter, "name", type(self.drafter).__name__)
        if len(drafts) != len(limits):
            raise RuntimeError(f"drafter {name!r} returned {len(drafts)} rows for "
                               f"{len(limits)} requests")
        for row in drafts:
            for token_id in row:
                if not 0 <= token_id < self.vocab_size:
                    raise RuntimeError(f"drafter {name!r} proposed token id {token_id}, "
                                       f"outside the vocabulary (size {self.vocab_size})")

    def _target_step(self, request_ids: list[str]) -> TargetStep:
        step = self.last_step
        # A step of prompt chunks only samples nothing and has no output.
        output = step.output or ModelRunnerOutput([], [], [])
        scheduled, inputs = step.scheduled, step.inputs
        query_start = inputs.attention.query_start_loc_cpu.numpy()[:len(scheduled) + 1]
        query_lens = np.diff(query_start)
        num_kept = query_lens.copy()
        next_tokens = np.zeros(len(scheduled), dtype=np.int64)
        sampled_row_of = {rid: i for i, rid in enumerate(output.request_ids)}
        for row, item in enumerate(scheduled):
            index = sampled_row_of.get(item.request_id)
            if index is None:  # a prompt chunk: the next prompt (or recomputed output) token
                known = item.num_computed_tokens + len(item.token_ids)
                history = item.prompt_token_ids + item.output_token_ids
                next_tokens[row] = history[known] if known < len(history) else 0
                continue
            tokens = output.sampled_token_ids[index]
            num_kept[row] -= len(item.draft_token_ids) - (len(tokens) - 1)
            next_tokens[row] = tokens[-1]
        row_of = {item.request_id: row for row, item in enumerate(scheduled)}
        return TargetStep(
            input_ids=inputs.input_ids[:inputs.num_tokens],
            positions=inputs.positions[:inputs.num_tokens],
            hidden_states=step.hidden_states[:inputs.num_tokens],
            aux_hidden_states=tuple(h[:inputs.num_tokens] for h in step.aux_hidden_states),
            attention=inputs.attention,
            query_start_loc=query_start,
            num_kept_tokens=num_kept,
            next_token_ids=torch.from_numpy(next_tokens).to(self.device),
            draft_rows=np.array([row_of[rid] for rid in request_ids], dtype=np.int64),
            block_size=self.block_size)


def _logprobs_of(logits: torch.Tensor, token_ids: torch.Tensor, num_drafts: list[int],
                 num_top: int) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Logprobs (under the masked logits, as without drafts) of each output token at
    its position, its rank, and the top ``num_top`` at that position."""
    raw = torch.log_softmax(logits, dim=-1)
    counts = torch.tensor(num_drafts, dtype=torch.int64) + 1
    offsets = (torch.cumsum(counts, 0) - counts).to(logits.device)
    width = token_ids.shape[1]
    positions = (offsets.unsqueeze(1) + torch.arange(width, device=logits.device)).clamp_(
        max=raw.shape[0] - 1)
    tokens = token_ids.clamp(min=0)
    at_position = raw[positions]                                    # [rows, width, vocab]
    sampled = at_position.gather(2, tokens.unsqueeze(2))            # [rows, width, 1]
    ranks = (at_position > sampled).sum(dim=-1) + 1
    top_values, top_ids = raw.topk(num_top, dim=-1) if num_top else (
        raw[:, :0], tokens.new_empty((raw.shape[0], 0)))
    ids = torch.cat([tokens.unsqueeze(2), top_ids[positions]], dim=2)
    values = torch.cat([sampled, top_values[positions]], dim=2)
    return ids.cpu(), values.cpu(), ranks.cpu()


def _host_logprobs(rows: list[ScheduledRequest], counts: list[int],
                   logprobs) -> list[list[SampleLogprobs] | None]:
    result: list[list[SampleLogprobs] | None] = [None] * len(rows)
    if logprobs is None:
        return result
    ids, values, ranks = (tensor.tolist() for tensor in logprobs)
    for index, row in enumerate(rows):
        count = row.sampling_params.logprobs
        if count is not None:
            result[index] = [SampleLogprobs(ids[index][t][:1 + count],
                                            values[index][t][:1 + count], ranks[index][t])
                             for t in range(counts[index])]
    return result
