"""Flattening a scheduled batch into the model's input tensors.

The runner owns one :class:`InputBuffers`: host buffers (pinned where the platform
uses pinned memory, so the copies are asynchronous) and device buffers of the
largest step's size. Each step fills a prefix of the host buffers with numpy and
copies it over; the device buffers double as the static inputs of captured CUDA
graphs.
"""

from __future__ import annotations

import itertools
from dataclasses import dataclass

import numpy as np
import torch

from kvloom.interfaces.attention import AttentionInputs
from kvloom.interfaces.platform import Platform
from kvloom.step.scheduler_output import ScheduledRequest


@dataclass(slots=True)
class ModelInputs:
    """One step's tensors (views into the runner's device buffers).

    Attributes:
        input_ids / positions: [num_tokens] on the device (padded to a CUDA
            graph's batch size when one is used).
        attention: the ragged layout for the attention backend.
        logits_indices: rows of the hidden states to turn into logits: the
            last token of each request that samples, or with drafts its last
            ``1 + len(draft_token_ids)`` tokens (one per position to verify).
        sampled_rows: indices into the scheduled list of those requests.
        num_tokens: real (unpadded) token count.
        placeholder_indices / placeholder_rows: token positions whose id the
            previous step is still sampling on the device, and the scheduled
            row each belongs to (empty without async scheduling).
    """

    input_ids: torch.Tensor
    positions: torch.Tensor
    attention: AttentionInputs
    logits_indices: torch.Tensor
    sampled_rows: list[int]
    num_tokens: int
    placeholder_indices: np.ndarray
    placeholder_rows: np.ndarray


class InputBuffers:
    """Host and device buffers for up to ``max_num_tokens`` tokens and ``max_num_seqs`` sequences."""

    def __init__(self, max_num_tokens: int, max_num_seqs: int, max_blocks_per_seq: int,
                 platform: Platform) -> None:
        device = platform.device()
        pin_memory = platform.uses_pinned_memory
        self.device = device
        self.max_num_tokens = max_num_tokens
        self.max_num_seqs = max_num_seqs
        self.max_blocks_per_seq = max_blocks_per_seq

        def pair(shape: tuple[int, ...], dtype: torch.dtype) -> tuple[torch.Tensor, torch.Tensor]:
            host = torch.zeros(shape, dtype=dtype, pin_memory=pin_memory)
            return host, torch.zeros(shape, dtype=dtype, device=device)

        self.input_ids = pair((max_num_tokens,), torch.int64)
        self.positions = pair((max_num_tokens,), torch.int64)
        self.slot_mapping = pair((max_num_tokens,), torch.int64)
        self.query_start_loc = pair((max_num_seqs + 1,), torch.int32)
        self.seq_lens = pair((max_num_seqs,), torch.int32)
        self.block_tables = pair((max_num_seqs, max_blocks_per_seq), torch.int32)
        self.logits_indices = pair((max(max_num_tokens, max_num_seqs),), torch.int64)
        # Which block list each host block-table row holds, so rows whose request and
        # blocks are unchanged since the last step are not rewritten (the lists are
        # replaced, never edited in place, when a request gets new blocks).
        self._row_lists: list[list[int] | None] = [None] * max_num_seqs
        self._row_lengths = [0] * max_num_seqs
        # The host buffers are rewritten every step: wait until the last step's
        # asynchronous copies have read them.
        self._uploaded = platform.new_event()

    def prepare(self, scheduled: list[ScheduledRequest], block_size: int,
                pad_to: int | None = None) -> ModelInputs:
        """Fill the buffers for one step; ``pad_to`` pads a decode batch for a CUDA graph.

        Padding sequences have length 0 and padding tokens slot -1, so
        attention skips them.
        """
        self._uploaded.synchronize()
        num_seqs = len(scheduled)
        query_lens = np.fromiter((len(item.token_ids) for item in scheduled), np.int64, num_seqs)
        num_computed = np.fromiter((item.num_computed_tokens for item in scheduled), np.int64,
                                   num_seqs)
        num_tokens = int(query_lens.sum())
        padded_seqs = pad_to or num_seqs
        padded_tokens = num_tokens + (padded_seqs - num_seqs)

        query_start = self.query_start_loc[0].numpy()
        query_start[0] = 0
        np.cumsum(query_lens, out=query_start[1:num_seqs + 1])
        query_start[num_seqs + 1:padded_seqs + 1] = num_tokens + np.arange(
            1, padded_seqs - num_seqs + 1)
        seq_lens = self.seq_lens[0].numpy()
        seq_lens[:num_seqs] = num_computed + query_lens
        seq_lens[num_seqs:padded_seqs] = 0

        # Position of each token: its request's first new position plus its offset.
        request_of_token = np.repeat(np.arange(num_seqs), query_lens)
        offsets = np.arange(num_tokens) - query_start[:num_seqs][request_of_token]
        positions = self.positions[0].numpy()
        positions[:num_tokens] = num_computed[request_of_token] + offsets
        positions[num_tokens:padded_tokens] = 0

        width = self._fill_block_tables(scheduled)
        table = self.block_tables[0].numpy()
        slots = self.slot_mapping[0].numpy()
        token_positions = positions[:num_tokens]
        slots[:num_tokens] = (table[request_of_token, token_positions // block_size]
                              * block_size + token_positions % block_size)
        slots[num_tokens:padded_tokens] = -1
        input_ids = self.input_ids[0].numpy()
        # chain() walks the lists in C: no Python bytecode per token.
        input_ids[:num_tokens] = np.fromiter(
            itertools.chain.from_iterable(item.token_ids for item in scheduled), np.int64,
            num_tokens)
        input_ids[num_tokens:padded_tokens] = 0
        placeholder_indices = np.flatnonzero(input_ids[:num_tokens] < 0)

        sampled_rows = [row for row, item in enumerate(scheduled) if item.sample]
        num_logits = self._fill_logits_indices(scheduled, sampled_rows, query_start)

        self._upload(padded_tokens, padded_seqs, width, num_logits)
        max_query_len = int(query_lens.max()) if num_seqs else 0
        attention = AttentionInputs(
            query_start_loc=self.query_start_loc[1][:padded_seqs + 1],
            seq_lens=self.seq_lens[1][:padded_seqs],
            block_tables=self.block_tables[1][:padded_seqs, :max(width, 1)],
            slot_mapping=self.slot_mapping[1][:padded_tokens],
            query_start_loc_cpu=self.query_start_loc[0][:padded_seqs + 1].clone(),
            seq_lens_cpu=self.seq_lens[0][:padded_seqs].clone(),
            max_query_len=max_query_len,
            max_seq_len=int(seq_lens[:num_seqs].max()) if num_seqs else 0,
            num_decode_tokens=int((query_lens == 1).sum()),
        )
        return ModelInputs(self.input_ids[1][:padded_tokens], self.positions[1][:padded_tokens],
                           attention, self.logits_indices[1][:num_logits], sampled_rows,
                           num_tokens, placeholder_indices,
                           request_of_token[placeholder_indices])

    def prepare_uniform_dummy(self, num_seqs: int, query_len: int) -> ModelInputs:
        """``num_seqs`` sequences of ``query_len`` new tokens each, in block 0 (for
        capturing the CUDA graphs of steps that verify drafts)."""
        dummy = [ScheduledRequest(f"capture-{row}", [0] * query_len, 0, [0], True, None, [], [],
                                  draft_token_ids=[0] * (query_len - 1))
                 for row in range(num_seqs)]
        return self.prepare(dummy, block_size=max(query_len, 1))

    def _fill_logits_indices(self, scheduled: list[ScheduledRequest], sampled_rows: list[int],
                             query_start: np.ndarray) -> int:
        logits_indices = self.logits_indices[0].numpy()
        last_tokens = query_start[1:][sampled_rows] - 1
        if not any(scheduled[row].draft_token_ids for row in sampled_rows):
            logits_indices[:len(sampled_rows)] = last_tokens
            return len(sampled_rows)
        counts = np.fromiter((1 + len(scheduled[row].draft_token_ids) for row in sampled_rows),
                             np.int64, len(sampled_rows))
        total = int(counts.sum())
        first = np.repeat(last_tokens - counts + 1, counts)
        offsets = np.arange(total) - np.repeat(np.cumsum(counts) - counts, counts)
        logits_indices[:total] = first + offsets
        return total

    def prepare_padding_only(self, num_seqs: int) -> ModelInputs:
        """A decode batch of ``num_seqs`` padding sequences (for capturing CUDA graphs)."""
        inputs = self.prepare([], block_size=1, pad_to=num_seqs)
        inputs.attention.max_query_len = 1
        inputs.attention.num_decode_tokens = num_seqs
        return inputs

    def _fill_block_tables(self, scheduled: list[ScheduledRequest]) -> int:
        table = self.block_tables[0].numpy()
        row_lists, row_lengths = self._row_lists, self._row_lengths
        width = 0
        for row, item in enumerate(scheduled):
            block_ids = item.block_ids
            count = len(block_ids)
            if row_lists[row] is not block_ids or row_lengths[row] != count:
                table[row, :count] = block_ids
                row_lists[row], row_lengths[row] = block_ids, count
            if count > width:
                width = count
        return width

    def _upload(self, num_tokens: int, num_seqs: int, width: int, num_sampled: int) -> None:
        for host, device in (self.input_ids, self.positions, self.slot_mapping):
            device[:num_tokens].copy_(host[:num_tokens], non_blocking=True)
        self.query_start_loc[1][:num_seqs + 1].copy_(self.query_start_loc[0][:num_seqs + 1],
                                                      non_blocking=True)
        self.seq_lens[1][:num_seqs].copy_(self.seq_lens[0][:num_seqs], non_blocking=True)
        self.block_tables[1][:num_seqs, :width].copy_(self.block_tables[0][:num_seqs, :width],
                                                      non_blocking=True)
        self.logits_indices[1][:num_sampled].copy_(self.logits_indices[0][:num_sampled],
                                                   non_blocking=True)
        self._uploaded.record()
