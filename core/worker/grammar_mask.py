"""Applying structured-output grammars to logits: any backend, any sampler."""

from __future__ import annotations

from typing import Any

import torch


def apply_grammar_masks(logits: torch.Tensor, grammars: list[Any]) -> torch.Tensor:
    """Set to -inf every logit a row's grammar does not allow next (rows without one pass).

    Grammars fill a packed int32 bitmask row (bit i of word w allows token 32 * w + i).
    """
    num_rows, vocab_size = logits.shape
    num_words = (vocab_size + 31) // 32
    bitmask = torch.full((num_rows, num_words), -1, dtype=torch.int32)
    for row, grammar in enumerate(grammars):
        if grammar is not None:
            grammar.fill_bitmask(bitmask, row)
    shifts = torch.arange(32, dtype=torch.int32)
    allowed = ((bitmask.unsqueeze(-1) >> shifts) & 1).bool().reshape(num_rows, num_words * 32)
    allowed = allowed[:, :vocab_size].to(logits.device, non_blocking=True)
    return logits.masked_fill(~allowed, float("-inf"))
