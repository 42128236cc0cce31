"""What a structured-output backend plugin implements.

A backend compiles a request's spec (JSON schema, regex, choice, grammar) into
a grammar that follows the generated tokens and masks the logits.
"""

from __future__ import annotations

from abc import ABC, abstractmethod
from typing import Any

import torch


class Grammar(ABC):
    """The matcher state of one request."""

    @abstractmethod
    def accept_tokens(self, token_ids: list[int]) -> bool:
        """Advance over ``token_ids``; False if one is not allowed (state unchanged)."""

    @abstractmethod
    def rollback(self, num_tokens: int) -> None:
        """Undo the last ``num_tokens`` accepted tokens."""

    @abstractmethod
    def fill_bitmask(self, bitmask: torch.Tensor, row: int) -> None:
        """Write the allowed-token bitmask for the next token into ``bitmask[row]``."""

    @abstractmethod
    def is_terminated(self) -> bool:
        """True once the grammar has reached an accepting end state."""


class StructuredOutputBackend(ABC):
    """Compiles specs into grammars for one tokenizer."""

    name: str = "unnamed"

    @abstractmethod
    def compile(self, spec_kind: str, spec: Any) -> Grammar:
        """Compile one request's spec; raise ValueError for an invalid spec."""

    @abstractmethod
    def allocate_bitmask(self, num_rows: int) -> torch.Tensor:
        """A bitmask tensor with room for ``num_rows`` requests."""
