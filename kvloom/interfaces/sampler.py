"""What a sampler plugin implements, and the batch it receives."""

from __future__ import annotations

from abc import ABC, abstractmethod
from dataclasses import dataclass

import torch


@dataclass(slots=True)
class SamplingMetadata:
    """Per-row sampling parameters for one step, aligned with the logits rows.

    Tensors live on the logits' device. ``top_k`` 0 and ``top_p`` 1.0 and
    ``min_p`` 0.0 mean "off". ``generators`` holds a seeded ``torch.Generator``
    for rows whose request set a seed; other rows draw from the engine's stream.

    The per-row tensors are the SamplingParams fields declared ``per_row``
    (``PER_ROW_FLOAT_FIELDS``, ``PER_ROW_INT_FIELDS``), under the same names; they
    are written out here for plugin authors, and a test keeps the two in step.

    Attributes:
        temperature: float [n]; 0 means greedy for that row.
        top_k: int64 [n].
        top_p / min_p: float [n].
        presence_penalty / frequency_penalty / repetition_penalty: float [n].
        prompt_token_ids: per row, read-only view of the prompt ids.
        output_token_ids: per row, read-only view of the generated ids so far.
        banned_token_ids: per row, ids that must not be sampled now (e.g. EOS
            and stop tokens before ``min_tokens`` is reached).
        generators: row index -> seeded generator.
        max_num_logprobs: the largest ``logprobs`` any row asked for (None: no row).
        all_greedy / all_random: shortcuts for the common uniform batches.
        no_penalties: True when no row uses a penalty.
        any_min_p / any_top_k_top_p: host-side flags saying whether any row
            uses those filters, so the sampler need not ask the device (None:
            unknown, check the tensors).
    """

    temperature: torch.Tensor
    top_k: torch.Tensor
    top_p: torch.Tensor
    min_p: torch.Tensor
    presence_penalty: torch.Tensor
    frequency_penalty: torch.Tensor
    repetition_penalty: torch.Tensor
    prompt_token_ids: list[list[int]]
    output_token_ids: list[list[int]]
    banned_token_ids: list[list[int]]
    generators: dict[int, torch.Generator]
    max_num_logprobs: int | None
    all_greedy: bool
    all_random: bool
    no_penalties: bool
    any_min_p: bool | None = None
    any_top_k_top_p: bool | None = None


@dataclass(slots=True)
class SamplerOutput:
    """What the sampler chose.

    Attributes:
        sampled_token_ids: int64 [n].
        logprob_token_ids: int64 [n, 1 + k]: the sampled id, then the top-k ids
            (k = max_num_logprobs), or None when no row asked for logprobs.
        logprobs: float [n, 1 + k], the log-probabilities of those ids under the
            model's raw distribution (before temperature and penalties).
        sampled_ranks: int64 [n], rank of the sampled id (1 = most likely), or None.
    """

    sampled_token_ids: torch.Tensor
    logprob_token_ids: torch.Tensor | None = None
    logprobs: torch.Tensor | None = None
    sampled_ranks: torch.Tensor | None = None


class Sampler(ABC):
    """Turns logits into next tokens."""

    name: str = "unnamed"

    @abstractmethod
    def sample(self, logits: torch.Tensor, metadata: SamplingMetadata) -> SamplerOutput:
        """Sample one token per row of ``logits`` [n, vocab] (float32)."""

    def probabilities(self, logits: torch.Tensor, metadata: SamplingMetadata) -> torch.Tensor:
        """The distribution ``sample`` draws each row from, float [n, vocab].

        Speculative decoding verifies drafts against it, so the accepted tokens
        follow exactly this distribution. Greedy rows (temperature 0) may be
        anything: they are verified against ``sample``'s own choice. Samplers
        without it can only run speculative decoding on greedy requests.
        """
        raise NotImplementedError(
            f"sampler {self.name!r} does not expose its distribution (Sampler.probabilities); "
            "speculative decoding with temperature > 0 needs it")
