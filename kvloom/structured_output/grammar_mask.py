"""Structured-output masks: filled on the CPU, unpacked and applied on the device.

Works for any backend and any sampler: the logits of constrained rows are set
to -inf wherever the row's grammar forbids the next token. Filling runs on a
background thread (backends' native code releases the GIL), so it overlaps
the engine thread's output processing and scheduling.
"""

from __future__ import annotations

import logging
from concurrent.futures import Future, ThreadPoolExecutor
from dataclasses import dataclass
from typing import Callable

import torch

from kvloom.failures import describe_failure
from kvloom.interfaces.structured_output import Grammar

logger = logging.getLogger(__name__)

FillBitmasks = Callable[[list[Grammar], torch.Tensor, list[int]], None]


def fill_one_by_one(grammars: list[Grammar], bitmask: torch.Tensor, rows: list[int]) -> None:
    for grammar, row in zip(grammars, rows):
        grammar.fill_bitmask(bitmask, row)


@dataclass(eq=False, slots=True)
class TrackedGrammar:
    """A request's grammar and how many of the request's output tokens it has seen.

    Tokens reach the grammar on the mask-filling thread, just before its next mask
    is filled, so the engine's thread never waits for a grammar to advance.
    """

    grammar: Grammar
    output_token_ids: list[int]  # the request's own list, which the scheduler extends
    num_seen: int = 0

    def catch_up(self) -> None:
        new_tokens = self.output_token_ids[self.num_seen:]
        if new_tokens and not self.grammar.accept_tokens(new_tokens):
            # Only a token sampled without this grammar's mask can get here.
            logger.warning("a grammar rejected tokens %s; its masks may be wrong", new_tokens)
        self.num_seen += len(new_tokens)

    def terminates_on(self, token_id: int) -> bool:
        return self.grammar.terminates_on(token_id)


@dataclass(slots=True)
class MaskFill:
    """Bitmasks being filled for one step; ``done`` yields its FilledRows."""

    bitmask: torch.Tensor
    done: Future


@dataclass(slots=True)
class FilledRows:
    """Which logits rows got a mask (bitmask row i masks logits row ``rows[i]``), and
    the grammars that raised, by their index in the step's list of grammars."""

    rows: list[int]
    failed: dict[int, str]


class GrammarMasks:
    """Packed int32 bitmasks (bit i of word w allows token 32 * w + i) in host memory
    (pinned with ``pin_memory``, the platform's ``uses_pinned_memory``), filled on a
    background thread while the engine's own thread goes on.

    Two host buffers alternate, so filling step N+1's masks never overwrites a
    buffer whose copy to the device may still be pending.

    A grammar that raises fails only its own request: its row is left unmasked
    and reported in ``FilledRows.failed``; the other rows are masked as usual.
    """

    def __init__(self, max_num_rows: int, device: torch.device,
                 fill_bitmasks: FillBitmasks = fill_one_by_one, *,
                 pin_memory: bool = False) -> None:
        self.max_num_rows = max_num_rows
        self.device = device
        self.pin_memory = pin_memory
        self.fill_bitmasks = fill_bitmasks
        self.shifts = torch.arange(8, dtype=torch.uint8, device=device)
        self.host_buffers: list[torch.Tensor] = []
        self.next_buffer = 0
        self._filler: ThreadPoolExecutor | None = None

    def start(self, grammars: list[TrackedGrammar | None], vocab_size: int,
              drafts: list[list[int]] | None = None) -> MaskFill:
        """Begin bringing one step's grammars up to date and filling their masks
        (None rows pass unmasked). Nothing else may touch the grammars until
        ``apply`` has returned.

        With ``drafts`` (speculative decoding), row i of ``grammars`` owns
        ``len(drafts[i]) + 1`` logits rows: one per verified position.
        """
        bitmask = self._host_buffer(vocab_size)
        if self._filler is None:
            self._filler = ThreadPoolExecutor(1, thread_name_prefix="kvloom-bitmask")
        if drafts is not None:
            return MaskFill(bitmask, self._filler.submit(self._fill_along_drafts, grammars,
                                                         drafts, bitmask))
        return MaskFill(bitmask, self._filler.submit(self._fill, grammars, bitmask))

    def apply(self, logits: torch.Tensor, fill: MaskFill) -> tuple[torch.Tensor, dict[int, str]]:
        """Wait for ``fill``, then mask ``logits`` on the device, in place.

        Returns the logits and the grammars that failed (index -> what failed).
        """
        filled: FilledRows = fill.done.result()
        rows = filled.rows
        if not rows:
            return logits, filled.failed
        vocab_size = logits.shape[1]
        # Unpacked a byte at a time (little-endian: byte b of word w holds tokens
        # 32w + 8b .. 32w + 8b + 7), so the widest temporary is one byte per token.
        packed = fill.bitmask[:len(rows)].to(self.device, non_blocking=True).view(torch.uint8)
        allowed = ((packed.unsqueeze(-1) >> self.shifts) & 1).bool().flatten(1)[:, :vocab_size]
        index = torch.tensor(rows, dtype=torch.int64).to(self.device, non_blocking=True)
        logits[index] = logits[index].masked_fill(~allowed, float("-inf"))
        return logits, filled.failed

    def _fill(self, grammars: list[TrackedGrammar | None], bitmask: torch.Tensor) -> FilledRows:
        failed: dict[int, str] = {}
        live = []
        for row, tracked in enumerate(grammars):
            if tracked is None:
                continue
            try:
                tracked.catch_up()
                # A grammar that has terminated belongs to a request that finished while
                # this step was in flight: its token is discarded, so it needs no mask.
                if not tracked.grammar.is_terminated():
                    live.append(row)
            except Exception as error:
                failed[row] = _logged_failure("advancing the grammar", error)
        try:
            self.fill_bitmasks([grammars[row].grammar for row in live], bitmask,
                               list(range(len(live))))
        except Exception:  # find the grammar that raised: fill each on its own
            live = self._fill_each(grammars, live, bitmask, failed)
        return FilledRows(live, failed)

    @staticmethod
    def _fill_each(grammars: list[TrackedGrammar | None], rows: list[int],
                   bitmask: torch.Tensor, failed: dict[int, str]) -> list[int]:
        filled = []
        for row in rows:
            try:
                grammars[row].grammar.fill_bitmask(bitmask, len(filled))
                filled.append(row)
            except Exception as error:
                failed[row] = _logged_failure("filling the grammar mask", error)
        return filled

    def _fill_along_drafts(self, grammars: list[TrackedGrammar | None],
                           drafts: list[list[int]], bitmask: torch.Tensor) -> FilledRows:
        rows: list[int] = []
        failed: dict[int, str] = {}
        position = 0
        for index, (tracked, row_drafts) in enumerate(zip(grammars, drafts)):
            if tracked is not None:
                try:
                    tracked.catch_up()
                    if not tracked.grammar.is_terminated():
                        num_filled = fill_along_drafts(tracked.grammar, row_drafts, bitmask,
                                                       len(rows))
                        rows.extend(range(position, position + num_filled))
                except Exception as error:
                    failed[index] = _logged_failure("filling the grammar mask", error)
            position += len(row_drafts) + 1
        return FilledRows(rows, failed)

    def _host_buffer(self, vocab_size: int) -> torch.Tensor:
        num_words = (vocab_size + 31) // 32
        if not self.host_buffers or self.host_buffers[0].shape[1] != num_words:
            self.host_buffers = [torch.empty((self.max_num_rows, num_words), dtype=torch.int32,
                                             pin_memory=self.pin_memory) for _ in range(2)]
        buffer = self.host_buffers[self.next_buffer]
        self.next_buffer ^= 1
        return buffer


def _logged_failure(what: str, error: Exception) -> str:
    logger.error("%s raised; failing its request", what, exc_info=error)
    return describe_failure(what, error)


def fill_along_drafts(grammar: Grammar, drafts: list[int], bitmask: torch.Tensor,
                      first_row: int) -> int:
    """Masks for the position before each draft and after the last one, walking the
    grammar along the drafts and back; returns how many rows were filled.

    The walk stops at a draft the grammar refuses (its own mask forbids it, so the
    rejection sampler stops there too) or one that ends the grammar (the request
    stops there); the positions after it are left unmasked.
    """
    grammar.fill_bitmask(bitmask, first_row)
    num_filled, num_accepted = 1, 0
    for token_id in drafts:
        if not grammar.accept_tokens([token_id]):
            break
        num_accepted += 1
        if grammar.is_terminated():
            break
        grammar.fill_bitmask(bitmask, first_row + num_filled)
        num_filled += 1
    if num_accepted:
        grammar.rollback(num_accepted)
    return num_filled
