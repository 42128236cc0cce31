"""Building sampler batches, and reference distributions to test samplers against.

The references are plain numpy over one row, written for clarity rather than speed,
so they share nothing with the samplers they check.
"""

from __future__ import annotations

import numpy as np
import torch

from kvloom.interfaces.sampler import SamplingMetadata


def make_metadata(num_rows: int, *, temperature=1.0, top_k=0, top_p=1.0, min_p=0.0,
                  presence_penalty=0.0, frequency_penalty=0.0, repetition_penalty=1.0,
                  prompt_token_ids=None, output_token_ids=None, banned_token_ids=None,
                  generators=None, max_num_logprobs=None,
                  device: torch.device | str = "cpu") -> SamplingMetadata:
    """SamplingMetadata the way the model runner builds it; a scalar applies to every
    row, a list gives one value per row."""

    def column(value, dtype):
        values = list(value) if isinstance(value, (list, tuple)) else [value] * num_rows
        assert len(values) == num_rows
        return torch.tensor(values, dtype=dtype, device=device)

    def per_row(value):
        return [list(v) for v in value] if value is not None else [[] for _ in range(num_rows)]

    temperature = column(temperature, torch.float32)
    presence = column(presence_penalty, torch.float32)
    frequency = column(frequency_penalty, torch.float32)
    repetition = column(repetition_penalty, torch.float32)
    return SamplingMetadata(
        temperature=temperature,
        top_k=column(top_k, torch.int64),
        top_p=column(top_p, torch.float32),
        min_p=column(min_p, torch.float32),
        presence_penalty=presence,
        frequency_penalty=frequency,
        repetition_penalty=repetition,
        prompt_token_ids=per_row(prompt_token_ids),
        output_token_ids=per_row(output_token_ids),
        banned_token_ids=per_row(banned_token_ids),
        generators=dict(generators or {}),
        max_num_logprobs=max_num_logprobs,
        all_greedy=bool((temperature == 0).all()),
        all_random=bool((temperature != 0).all()),
        no_penalties=bool((presence == 0).all() and (frequency == 0).all()
                          and (repetition == 1).all()),
    )


def reference_distribution(logits: np.ndarray, temperature: float = 1.0, top_k: int = 0,
                           top_p: float = 1.0, min_p: float = 0.0) -> np.ndarray:
    """What one row is sampled from: temperature, then min-p, top-k and top-p.

    min-p drops tokens below ``min_p`` times the top probability; top-k keeps the k
    most likely; top-p keeps the most likely tokens until their mass reaches
    ``top_p``. The test rows have no ties at these boundaries.
    """
    probs = _softmax(logits / temperature)
    keep = probs >= min_p * probs.max()
    order = np.argsort(-probs, kind="stable")
    if top_k:
        keep[order[top_k:]] = False
    if top_p < 1.0:
        kept_order = [token for token in order if keep[token]]
        mass = np.cumsum(probs[kept_order]) / probs[kept_order].sum()
        num_kept = int(np.searchsorted(mass, top_p) + 1)
        keep[kept_order[num_kept:]] = False
    filtered = np.where(keep, probs, 0.0)
    return filtered / filtered.sum()


def penalized_logits(logits: np.ndarray, prompt: list[int], output: list[int],
                     presence: float, frequency: float, repetition: float) -> np.ndarray:
    """vLLM's penalties on one row: repetition divides positive (multiplies negative)
    logits of tokens in the prompt or output; frequency subtracts per occurrence in the
    output; presence subtracts once for tokens in the output."""
    logits = logits.astype(np.float64).copy()
    for token in set(prompt) | set(output):
        logits[token] = logits[token] / repetition if logits[token] > 0 \
            else logits[token] * repetition
    for token in set(output):
        logits[token] -= frequency * output.count(token) + presence
    return logits


def chi_square_p_value(counts: np.ndarray, probs: np.ndarray) -> float:
    """Pearson's goodness of fit of ``counts`` to ``probs`` over its support.

    Raises:
        AssertionError: a token outside the support was drawn.
    """
    support = probs > 0
    outside = np.nonzero(counts * ~support)[0].tolist()
    assert not outside, f"sampled tokens {outside}, which have probability 0"
    expected = probs[support] / probs[support].sum() * counts.sum()
    statistic = float(((counts[support] - expected) ** 2 / expected).sum())
    degrees = int(support.sum()) - 1
    if degrees == 0:
        return 1.0
    # The chi-square survival function is the regularized upper incomplete gamma.
    return float(torch.special.gammaincc(torch.tensor(degrees / 2, dtype=torch.float64),
                                         torch.tensor(statistic / 2, dtype=torch.float64)))


def _softmax(x: np.ndarray) -> np.ndarray:
    e = np.exp(x - x.max())
    return e / e.sum()
