"""Sampling that fails one request, not the batch.

A sampler plugin (or a request's own parameters) can make sampling raise. The
batch is sampled in one call as usual; only when that raises is each row
sampled on its own, so the rows that raise are found and reported in
``ModelRunnerOutput.errors`` while the others keep the tokens they sampled.
"""

from __future__ import annotations

import itertools
import logging
from typing import Callable

import torch

from kvloom.failures import describe_failure
from kvloom.step.scheduler_output import ScheduledRequest
from kvloom.step.runner_output import ModelRunnerOutput

logger = logging.getLogger(__name__)

# Samples one request from its own logits rows, synchronously.
SampleOne = Callable[[ScheduledRequest, torch.Tensor], ModelRunnerOutput]


def logits_spans(rows: list[ScheduledRequest], with_drafts: bool) -> list[tuple[int, int]]:
    """Each row's slice of the logits: one position, or one per draft plus one."""
    spans = []
    start = 0
    for row in rows:
        stop = start + 1 + (len(row.draft_token_ids) if with_drafts else 0)
        spans.append((start, stop))
        start = stop
    return spans


def sample_row_by_row(rows: list[ScheduledRequest], logits: torch.Tensor,
                      spans: list[tuple[int, int]], sample_one: SampleOne) -> ModelRunnerOutput:
    """Every row sampled alone; a row that raises gets no token and an error."""
    merged = ModelRunnerOutput([], [], [])
    for row, (start, stop) in zip(rows, spans):
        merged.request_ids.append(row.request_id)
        try:
            output = sample_one(row, logits[start:stop])
        except Exception as error:
            logger.error("sampling request %s raised; failing it", row.request_id,
                         exc_info=error)
            merged.errors[row.request_id] = describe_failure("sampling", error)
            merged.sampled_token_ids.append([0])  # read by nobody: the request fails
            merged.logprobs.append(None)
            continue
        merged.sampled_token_ids.append(output.sampled_token_ids[0])
        merged.logprobs.append(output.logprobs[0])
        merged.errors.update(output.errors)
    return merged


def flag_tokens_outside_vocabulary(output: ModelRunnerOutput, vocab_size: int) -> None:
    """Fail the rows whose sampler returned an id no embedding row has (fed back,
    it would fail the next step for every request)."""
    every_token = list(itertools.chain.from_iterable(output.sampled_token_ids))
    if not every_token or (min(every_token) >= 0 and max(every_token) < vocab_size):
        return  # the usual case, checked at C speed: this runs every step
    for request_id, token_ids in zip(output.request_ids, output.sampled_token_ids):
        if request_id not in output.errors and not all(0 <= t < vocab_size for t in token_ids):
            logger.error("request %s sampled a token id outside the vocabulary [0, %d): %s",
                         request_id, vocab_size, token_ids)
            output.errors[request_id] = "sampling failed (a token id outside the vocabulary)"
