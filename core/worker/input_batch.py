"""Flattening a scheduled batch into the model's input tensors."""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import torch

from kvloom.interfaces.attention import AttentionInputs
from kvloom.scheduler.output import ScheduledRequest


@dataclass(slots=True)
class ModelInputs:
    """One step's tensors.

    Attributes:
        input_ids / positions: [num_tokens] on the device.
        attention: the ragged layout for the attention backend.
        logits_indices: [num_sampled] rows of the hidden states to turn into
            logits (the last token of each request that samples).
        sampled_rows: indices into the scheduled list of those requests.
    """

    input_ids: torch.Tensor
    positions: torch.Tensor
    attention: AttentionInputs
    logits_indices: torch.Tensor
    sampled_rows: list[int]


def build_model_inputs(scheduled: list[ScheduledRequest], block_size: int,
                       device: torch.device) -> ModelInputs:
    """Vectorized (numpy) preparation of input ids, positions, slots and block tables."""
    query_lens = np.array([len(item.token_ids) for item in scheduled], dtype=np.int64)
    num_computed = np.array([item.num_computed_tokens for item in scheduled], dtype=np.int64)
    seq_lens = num_computed + query_lens
    query_start_loc = np.zeros(len(scheduled) + 1, dtype=np.int64)
    np.cumsum(query_lens, out=query_start_loc[1:])
    num_tokens = int(query_start_loc[-1])

    # Position of each token: its request's first new position plus its offset.
    request_of_token = np.repeat(np.arange(len(scheduled)), query_lens)
    offsets = np.arange(num_tokens) - query_start_loc[:-1][request_of_token]
    positions = num_computed[request_of_token] + offsets

    block_table = _padded_block_table(scheduled)
    slot_mapping = (block_table[request_of_token, positions // block_size] * block_size
                    + positions % block_size)
    input_ids = np.fromiter((t for item in scheduled for t in item.token_ids),
                            dtype=np.int64, count=num_tokens)

    sampled_rows = [row for row, item in enumerate(scheduled) if item.sample]
    logits_indices = query_start_loc[1:][sampled_rows] - 1

    def to_device(array: np.ndarray, dtype: torch.dtype) -> torch.Tensor:
        return torch.from_numpy(array).to(device=device, dtype=dtype, non_blocking=True)

    seq_lens_cpu = torch.from_numpy(seq_lens.astype(np.int32))
    query_start_loc_cpu = torch.from_numpy(query_start_loc.astype(np.int32))
    attention = AttentionInputs(
        query_start_loc=query_start_loc_cpu.to(device),
        seq_lens=seq_lens_cpu.to(device),
        block_tables=to_device(block_table, torch.int32),
        slot_mapping=to_device(slot_mapping, torch.int64),
        query_start_loc_cpu=query_start_loc_cpu,
        seq_lens_cpu=seq_lens_cpu,
        max_query_len=int(query_lens.max()),
        max_seq_len=int(seq_lens.max()),
        num_decode_tokens=int((query_lens == 1).sum()),
    )
    return ModelInputs(
        input_ids=to_device(input_ids, torch.int64),
        positions=to_device(positions, torch.int64),
        attention=attention,
        logits_indices=to_device(np.asarray(logits_indices, dtype=np.int64), torch.int64),
        sampled_rows=sampled_rows,
    )


def _padded_block_table(scheduled: list[ScheduledRequest]) -> np.ndarray:
    width = max(len(item.block_ids) for item in scheduled)
    table = np.zeros((len(scheduled), width), dtype=np.int64)
    for row, item in enumerate(scheduled):
        table[row, :len(item.block_ids)] = item.block_ids
    return table
