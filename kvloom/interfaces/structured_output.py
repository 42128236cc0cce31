"""What a structured-output backend plugin implements.

A backend compiles a request's spec (JSON schema, regex, choice, grammar) into
a grammar that follows the generated tokens and masks the logits.

Bitmasks are packed int32 rows owned by the core: bit ``i`` of word ``w`` allows
token ``32 * w + i``, one row per constrained request, ``ceil(vocab_size / 32)``
words per row (the model's vocabulary size, padding included).
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
        """Write the allowed-token bitmask for the next token into the whole of
        ``bitmask[row]`` (the buffer is reused, not cleared between steps)."""

    @abstractmethod
    def is_terminated(self) -> bool:
        """True once the grammar has reached an accepting end state."""

    def terminates_on(self, token_id: int) -> bool:
        """True if ``token_id``, sampled under this grammar's latest mask, ends it.

        Asked on the engine's thread before the token is accepted (tokens reach
        grammars on the mask-filling thread, which is idle then). This default
        accepts the token, looks, and rolls back; override it with something
        cheaper (XGrammar: is it one of the grammar's stop tokens?).
        """
        if not self.accept_tokens([token_id]):
            return False
        terminated = self.is_terminated()
        self.rollback(1)
        return terminated


class StructuredOutputBackend(ABC):
    """Compiles specs into grammars for one tokenizer.

    The engine builds the backend, calls ``validate`` once per request and then
    ``compile`` once per sample, all on a compile thread while other requests keep
    running; each may be called from several threads at once. A ValueError from
    either ends that request with its message (a 400 from the server).
    """

    name: str = "unnamed"

    def validate(self, spec_kind: str, spec: Any) -> None:
        """Raise ValueError for a spec this backend refuses, before any ``compile``.

        Optional: for checks that are cheaper than compiling (the spec kind, keywords
        the backend would not enforce). A spec that only fails to parse may be left
        to ``compile``, which runs next on the same thread.
        """

    @abstractmethod
    def compile(self, spec_kind: str, spec: Any) -> Grammar:
        """Compile one request's spec; raise ValueError for an invalid spec."""

    def fill_bitmasks(self, grammars: list[Grammar], bitmask: torch.Tensor,
                      rows: list[int]) -> None:
        """Fill ``bitmask[rows[i]]`` from ``grammars[i]``; override to batch or parallelize."""
        for grammar, row in zip(grammars, rows):
            grammar.fill_bitmask(bitmask, row)
