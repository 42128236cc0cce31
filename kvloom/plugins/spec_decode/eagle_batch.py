"""The batches an EAGLE drafter runs: the target's step re-read, then one token per row.

Everything that decides shapes is computed on the host from the step's host
arrays, so drafting never waits for the device until its final copy.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import torch

from kvloom.interfaces.attention import AttentionInputs
from kvloom.interfaces.drafter import TargetStep


@dataclass(slots=True)
class KeptTokens:
    """Where each row of the target step ends once rejected drafts are dropped.

    Attributes:
        index: [num_rows] flat index of each row's last kept token (-1 when the
            row keeps none).
        position: [num_rows] that token's position in its sequence.
    """

    index: np.ndarray
    position: np.ndarray

    @classmethod
    def of(cls, step: TargetStep) -> "KeptTokens":
        starts = np.asarray(step.query_start_loc, dtype=np.int64)
        num_rows = len(starts) - 1
        query_lens = np.diff(starts)
        kept = np.asarray(step.num_kept_tokens, dtype=np.int64)
        seq_lens = step.attention.seq_lens_cpu[:num_rows].numpy().astype(np.int64)
        index = np.where(kept > 0, starts[:-1] + kept - 1, -1)
        # A row's first new token sits at position seq_len - query_len.
        return cls(index, seq_lens - query_lens + kept - 1)


def shifted_input_ids(step: TargetStep, kept: KeptTokens) -> torch.Tensor:
    """Each position's draft input is the token after it: the step's own next token,
    or, at a row's last kept token, the token sampled (or prompted) after it.

    Positions past a row's kept tokens get whatever follows; their outputs are
    never read and their KV slots are rewritten by later steps.
    """
    input_ids = step.input_ids
    shifted = torch.cat([input_ids[1:], input_ids[-1:]])
    rows = np.flatnonzero(kept.index >= 0)
    device = input_ids.device
    index = _to_device(kept.index[rows], device)
    next_ids = step.next_token_ids
    if len(rows) != len(kept.index):
        next_ids = next_ids[_to_device(rows, device)]
    shifted[index] = next_ids.to(shifted.dtype)
    return shifted


@dataclass(slots=True)
class DecodeBatch:
    """One draft token per row, as the attention backend and the head read it."""

    positions: torch.Tensor
    attention: AttentionInputs


def decode_batch(target: AttentionInputs, rows: np.ndarray, positions: np.ndarray,
                 block_size: int, device: torch.device) -> DecodeBatch:
    """Rows ``rows`` of the target step, each with one new token at ``positions``.

    The slots come from the target's block tables: the engine reserved blocks
    for the positions drafted at (lookahead), so they are already there.
    """
    width = target.block_tables.shape[1]
    if int(positions.max()) // block_size >= width:
        raise ValueError(f"draft position {int(positions.max())} is past the block tables "
                         f"({width} blocks of {block_size}): the engine did not reserve "
                         "KV slots for the drafted positions")
    num_rows = len(rows)
    positions_device = _to_device(positions, device)
    block_tables = target.block_tables[_to_device(rows, device)]
    blocks = block_tables.gather(1, (positions_device // block_size).unsqueeze(1)).squeeze(1)
    slot_mapping = blocks.long() * block_size + positions_device % block_size
    query_start_loc = torch.arange(num_rows + 1, dtype=torch.int32)
    seq_lens = torch.from_numpy((positions + 1).astype(np.int32))
    attention = AttentionInputs(
        query_start_loc=query_start_loc.to(device, non_blocking=True),
        seq_lens=seq_lens.to(device, non_blocking=True),
        block_tables=block_tables,
        slot_mapping=slot_mapping,
        query_start_loc_cpu=query_start_loc,
        seq_lens_cpu=seq_lens,
        max_query_len=1,
        max_seq_len=int(positions.max()) + 1,
        num_decode_tokens=num_rows,
    )
    return DecodeBatch(positions_device, attention)


def _to_device(array: np.ndarray, device: torch.device) -> torch.Tensor:
    # From pageable memory, a non-blocking copy is staged at once and does not
    # wait for the device.
    return torch.from_numpy(np.ascontiguousarray(array, dtype=np.int64)).to(
        device, non_blocking=True)
