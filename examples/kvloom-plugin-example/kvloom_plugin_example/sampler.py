"""The ``fast_nucleus`` sampler: kvloom's sampling semantics without full-vocabulary sorts.

Same order of operations as kvloom's default sampler: banned tokens, then
penalties, then (for sampled rows) temperature, min-p, top-k and top-p. The
filtering lives in :mod:`kvloom_plugin_example.nucleus`; this module handles
the rest and the random draws.
"""

from __future__ import annotations

from collections.abc import Callable
from itertools import chain

import torch
from kvloom.interfaces.sampler import Sampler, SamplerOutput, SamplingMetadata

from kvloom_plugin_example.nucleus import filter_top_k_top_p, mask_below_min_p

# Below this temperature a row is greedy: dividing by it could overflow to inf.
GREEDY_TEMPERATURE = 1e-5


class FastNucleusSampler(Sampler):
    """Exact top-k / top-p / min-p sampling that sorts only rows that need it.

    Random rows race Gumbel-perturbed logits (argmax of logit - log E with
    E ~ Exp(1), the exponential race in log space), which draws each token with
    its filtered probability and lets a seeded row use only its own generator.
    """

    name = "fast_nucleus"
    # How many of the most likely tokens are tried before sorting a whole row.
    num_candidates = 64

    def sample(self, logits: torch.Tensor, metadata: SamplingMetadata) -> SamplerOutput:
        raw_logprobs = None
        if metadata.max_num_logprobs is not None:
            raw_logprobs = torch.log_softmax(logits, dim=-1)
        adjusted = self._adjusted_logits(logits, metadata)
        sampled = adjusted.argmax(dim=-1)
        if not metadata.all_greedy:
            # all_random only knows about temperature 0, not tiny temperatures.
            drawn = race(self._filtered_logits(adjusted, metadata), metadata.generators)
            sampled = torch.where(metadata.temperature < GREEDY_TEMPERATURE, sampled, drawn)
        if raw_logprobs is None:
            return SamplerOutput(sampled)
        return with_logprobs(raw_logprobs, sampled, metadata.max_num_logprobs)

    def probabilities(self, logits: torch.Tensor, metadata: SamplingMetadata) -> torch.Tensor:
        """The filtered distribution ``sample`` draws from (greedy rows at temperature 1)."""
        adjusted = self._adjusted_logits(logits, metadata)
        return torch.softmax(self._filtered_logits(adjusted, metadata), dim=-1)

    def _adjusted_logits(self, logits: torch.Tensor, metadata: SamplingMetadata) -> torch.Tensor:
        logits = ban_tokens(logits, metadata.banned_token_ids)
        if not metadata.no_penalties:
            logits = apply_penalties(logits, metadata)
        return logits

    def _filtered_logits(self, logits: torch.Tensor, metadata: SamplingMetadata) -> torch.Tensor:
        temperature = torch.where(metadata.temperature < GREEDY_TEMPERATURE, 1.0,
                                  metadata.temperature)
        logits = logits / temperature.unsqueeze(1)
        if _any(metadata.any_min_p, lambda: metadata.min_p > 0):
            logits = mask_below_min_p(logits, metadata.min_p)
        if _any(metadata.any_top_k_top_p,
                lambda: (metadata.top_k > 0) | (metadata.top_p < 1.0)):
            logits = filter_top_k_top_p(logits, metadata.top_k, metadata.top_p,
                                        self.num_candidates)
        return logits


def _any(known: bool | None, rows_using: Callable[[], torch.Tensor]) -> bool:
    """Trust the runner's host-side flag when it has one: asking the device syncs."""
    return bool(rows_using().any()) if known is None else known


def race(logits: torch.Tensor, generators: dict[int, torch.Generator]) -> torch.Tensor:
    """Draw one token per row from softmax(logits).

    A seeded row refills its noise from its own generator, so its tokens do not
    depend on which other rows share the batch.
    """
    noise = torch.empty_like(logits).exponential_()
    for row, generator in generators.items():
        noise[row].exponential_(generator=generator)
    # log(0) would be -inf and turn a dropped token's -inf into NaN.
    noise.clamp_(min=torch.finfo(noise.dtype).tiny)
    return (logits - noise.log()).argmax(dim=-1)


def ban_tokens(logits: torch.Tensor, banned_token_ids: list[list[int]]) -> torch.Tensor:
    rows = [row for row, ids in enumerate(banned_token_ids) for _ in ids]
    if not rows:
        return logits
    ids = list(chain.from_iterable(banned_token_ids))
    index = (torch.tensor(rows, device=logits.device), torch.tensor(ids, device=logits.device))
    return logits.index_put(index, torch.tensor(float("-inf"), device=logits.device))


def apply_penalties(logits: torch.Tensor, metadata: SamplingMetadata) -> torch.Tensor:
    """Repetition on prompt + output tokens; frequency and presence on output tokens."""
    output_counts = count_tokens(metadata.output_token_ids, logits)
    seen = (output_counts > 0) | (count_tokens(metadata.prompt_token_ids, logits) > 0)
    repetition = metadata.repetition_penalty.unsqueeze(1)
    # Dividing a negative logit would make it more likely, hence the two cases.
    repeated = torch.where(logits > 0, logits / repetition, logits * repetition)
    logits = torch.where(seen, repeated, logits)
    logits = logits - metadata.frequency_penalty.unsqueeze(1) * output_counts
    return logits - metadata.presence_penalty.unsqueeze(1) * (output_counts > 0).float()


def count_tokens(token_ids: list[list[int]], logits: torch.Tensor) -> torch.Tensor:
    """How often each vocabulary id occurs in each row, float [n, vocab]."""
    num_rows, vocab_size = logits.shape
    counts = torch.zeros(num_rows, vocab_size, device=logits.device)
    lengths = torch.tensor([len(ids) for ids in token_ids], dtype=torch.int64)
    if int(lengths.sum()) == 0:
        return counts
    rows = torch.repeat_interleave(torch.arange(num_rows), lengths)
    ids = torch.tensor(list(chain.from_iterable(token_ids)), dtype=torch.int64)
    inside = (ids >= 0) & (ids < vocab_size)  # ids the logits cannot hold count for nothing
    index = (rows[inside].to(logits.device), ids[inside].to(logits.device))
    counts.index_put_(index, torch.ones(index[0].shape, device=logits.device), accumulate=True)
    return counts


def with_logprobs(raw_logprobs: torch.Tensor, sampled: torch.Tensor,
                  num_top: int) -> SamplerOutput:
    """The sampled id and the ``num_top`` most likely ids, scored by the raw distribution."""
    sampled_logprob = raw_logprobs.gather(1, sampled.unsqueeze(1))
    ranks = 1 + (raw_logprobs > sampled_logprob).sum(dim=-1)
    top_logprobs, top_ids = raw_logprobs.topk(num_top, dim=-1)
    return SamplerOutput(sampled,
                         torch.cat([sampled.unsqueeze(1), top_ids], dim=1),
                         torch.cat([sampled_logprob, top_logprobs], dim=1),
                         ranks)
