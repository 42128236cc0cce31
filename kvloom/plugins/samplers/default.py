"""The default sampler: greedy, temperature, top-k, top-p, min-p, penalties, seeds, logprobs."""

from __future__ import annotations

import torch

from kvloom.hookspecs import hookimpl
from kvloom.interfaces.sampler import Sampler, SamplerOutput, SamplingMetadata

KVLOOM_PLUGIN_API = ">=1.0,<2"  # the kvloom plugin API versions this module supports

# Temperatures below this are greedy, as in vLLM: dividing logits by a tinier one
# can overflow to inf, and softmax then turns the row into NaN.
_SAMPLING_EPS = 1e-5


@hookimpl
def register_samplers(register):
    register("default", DefaultSampler)


class DefaultSampler(Sampler):
    """Vectorized over the batch; seeded rows draw from their own generators.

    Sampling uses the exponential-race trick (argmax of p / E with E ~ Exp(1)),
    which picks token i with probability p_i and lets each row use its own
    random stream without a Python loop over the vocabulary.
    """

    name = "default"

    def sample(self, logits: torch.Tensor, metadata: SamplingMetadata) -> SamplerOutput:
        raw_logprobs = None
        if metadata.max_num_logprobs is not None:
            raw_logprobs = torch.log_softmax(logits, dim=-1)
        logits = _ban_tokens(logits, metadata.banned_token_ids)
        if not metadata.no_penalties:
            logits = apply_penalties(logits, metadata)
        greedy = logits.argmax(dim=-1)
        if metadata.all_greedy:
            sampled = greedy
        else:
            # Not gated on all_random: that flag only knows about temperature 0.
            sampled = torch.where(metadata.temperature < _SAMPLING_EPS, greedy,
                                  self._sample_random(logits, metadata))
        if raw_logprobs is None:
            return SamplerOutput(sampled)
        return _gather_logprobs(raw_logprobs, sampled, metadata.max_num_logprobs)

    def probabilities(self, logits: torch.Tensor, metadata: SamplingMetadata) -> torch.Tensor:
        logits = _ban_tokens(logits, metadata.banned_token_ids)
        if not metadata.no_penalties:
            logits = apply_penalties(logits, metadata)
        return self._filtered_probs(logits, metadata)

    def _filtered_probs(self, logits: torch.Tensor, metadata: SamplingMetadata) -> torch.Tensor:
        """Temperature, min-p, top-k and top-p, then softmax (greedy rows at temperature 1)."""
        temperature = torch.where(metadata.temperature < _SAMPLING_EPS, 1.0, metadata.temperature)
        logits = logits / temperature.unsqueeze(1)
        if _flag(metadata.any_min_p, lambda: (metadata.min_p > 0).any()):
            logits = apply_min_p(logits, metadata.min_p)
        if _flag(metadata.any_top_k_top_p,
                 lambda: (metadata.top_k > 0).any() | (metadata.top_p < 1.0).any()):
            logits = apply_top_k_top_p(logits, metadata.top_k, metadata.top_p)
        return torch.softmax(logits, dim=-1)

    def _sample_random(self, logits: torch.Tensor, metadata: SamplingMetadata) -> torch.Tensor:
        probs = self._filtered_probs(logits, metadata)
        noise = torch.empty_like(probs).exponential_()
        for row, generator in metadata.generators.items():
            noise[row].exponential_(generator=generator)
        # An exact 0 draw would turn 0/0 into NaN, which argmax prefers.
        noise.clamp_(min=torch.finfo(noise.dtype).tiny)
        return (probs / noise).argmax(dim=-1)


def _flag(known: bool | None, compute) -> bool:
    """A host-side flag when the runner provided one (asking the GPU would sync)."""
    return bool(compute()) if known is None else known


def _ban_tokens(logits: torch.Tensor, banned: list[list[int]]) -> torch.Tensor:
    if not any(banned):
        return logits
    logits = logits.clone()
    for row, token_ids in enumerate(banned):
        if token_ids:
            logits[row, token_ids] = float("-inf")
    return logits


def apply_penalties(logits: torch.Tensor, metadata: SamplingMetadata) -> torch.Tensor:
    """Presence/frequency penalties on generated tokens, repetition on prompt + generated."""
    num_rows, vocab_size = logits.shape
    output_counts = _token_counts(metadata.output_token_ids, num_rows, vocab_size, logits.device)
    prompt_counts = _token_counts(metadata.prompt_token_ids, num_rows, vocab_size, logits.device)
    seen = (output_counts + prompt_counts) > 0
    repetition = metadata.repetition_penalty.unsqueeze(1)
    penalized = torch.where(logits > 0, logits / repetition, logits * repetition)
    logits = torch.where(seen, penalized, logits)
    logits = logits - metadata.frequency_penalty.unsqueeze(1) * output_counts
    logits = logits - metadata.presence_penalty.unsqueeze(1) * (output_counts > 0).float()
    return logits


def _token_counts(token_ids: list[list[int]], num_rows: int, vocab_size: int,
                  device: torch.device) -> torch.Tensor:
    counts = torch.zeros(num_rows, vocab_size + 1, dtype=torch.float32, device=device)
    width = max((len(ids) for ids in token_ids), default=0)
    if width == 0:
        return counts[:, :vocab_size]
    # Pad with an id one past the vocabulary, counted in a column we drop.
    padded = torch.full((num_rows, width), vocab_size, dtype=torch.int64)
    for row, ids in enumerate(token_ids):
        padded[row, :len(ids)] = torch.as_tensor(ids, dtype=torch.int64)
    padded = padded.clamp_(max=vocab_size).to(device)
    counts.scatter_add_(1, padded, torch.ones_like(padded, dtype=torch.float32))
    return counts[:, :vocab_size]


def apply_min_p(logits: torch.Tensor, min_p: torch.Tensor) -> torch.Tensor:
    """Drop tokens whose probability is below min_p times the top probability."""
    probs = torch.softmax(logits, dim=-1)
    threshold = probs.amax(dim=-1, keepdim=True) * min_p.unsqueeze(1)
    return logits.masked_fill(probs < threshold, float("-inf"))


def apply_top_k_top_p(logits: torch.Tensor, top_k: torch.Tensor,
                      top_p: torch.Tensor) -> torch.Tensor:
    """Keep each row's k largest logits, then the smallest set with mass >= top_p.

    ``top_k`` 0 and ``top_p`` 1.0 leave a row untouched.
    """
    vocab_size = logits.shape[-1]
    sorted_logits, order = logits.sort(dim=-1, descending=False)
    k = torch.where(top_k > 0, top_k.clamp(max=vocab_size), vocab_size)
    kth_largest = sorted_logits.gather(1, (vocab_size - k).unsqueeze(1))
    sorted_logits = sorted_logits.masked_fill(sorted_logits < kth_largest, float("-inf"))
    cumulative = torch.softmax(sorted_logits, dim=-1).cumsum(dim=-1)
    outside_top_p = cumulative <= (1.0 - top_p).unsqueeze(1)
    outside_top_p[:, -1] = False  # always keep the most likely token
    sorted_logits = sorted_logits.masked_fill(outside_top_p, float("-inf"))
    return torch.empty_like(logits).scatter_(1, order, sorted_logits)


def _gather_logprobs(raw_logprobs: torch.Tensor, sampled: torch.Tensor,
                     num_top: int) -> SamplerOutput:
    sampled_logprob = raw_logprobs.gather(1, sampled.unsqueeze(1))
    ranks = (raw_logprobs > sampled_logprob).sum(dim=-1) + 1
    top_values, top_ids = raw_logprobs.topk(num_top, dim=-1) if num_top else (
        raw_logprobs[:, :0], sampled.new_empty((sampled.shape[0], 0)))
    token_ids = torch.cat([sampled.unsqueeze(1), top_ids], dim=1)
    logprobs = torch.cat([sampled_logprob, top_values], dim=1)
    return SamplerOutput(sampled, token_ids, logprobs, ranks)
