"""What a speculative-decoding drafter plugin implements.

The engine's rejection sampler and draft scheduling build on this contract;
no built-in drafter ships yet.
"""

from __future__ import annotations

from abc import ABC, abstractmethod
from dataclasses import dataclass

import torch


@dataclass(slots=True)
class DraftInputs:
    """The batch a drafter proposes for.

    Attributes:
        request_ids: one per row.
        token_ids: each row's full token history (prompt + output), read-only.
        max_num_drafts: per row, the most tokens it may propose (respects
            ``num_speculative_tokens`` and ``max_model_len``).
        hidden_states: the target model's hidden states for the last
            positions, for model-based drafters; None otherwise.
    """

    request_ids: list[str]
    token_ids: list[list[int]]
    max_num_drafts: list[int]
    hidden_states: torch.Tensor | None = None


class Drafter(ABC):
    """Proposes up to k tokens per request for the target model to verify."""

    name: str = "unnamed"

    @abstractmethod
    def propose(self, inputs: DraftInputs) -> list[list[int]]:
        """Draft tokens per row; row i has at most ``inputs.max_num_drafts[i]``."""
