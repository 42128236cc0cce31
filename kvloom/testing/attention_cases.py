"""Multi-step attention scenarios and their dense reference, for backend conformance.

A scenario is a few steps over sequences whose KV lives in randomly chosen cache
blocks. The backend under test writes every key and value into its own cache
layout through ``forward``; this module only tracks each sequence's keys and
values densely and computes causal attention over them in float32, so it never
needs to know the backend's cache layout.
"""

from __future__ import annotations

from dataclasses import dataclass, field

import torch

from kvloom.interfaces.attention import AttentionInputs, AttentionSpec


@dataclass
class Sequence:
    """One sequence: its blocks, and the keys/values written so far (float32, on CPU)."""

    blocks: list[int]
    keys: list[torch.Tensor] = field(default_factory=list)    # [kv_heads, head] each
    values: list[torch.Tensor] = field(default_factory=list)
    # (sequence, num_tokens): a prefix-cache hit on that sequence's first tokens
    prefix: tuple[Sequence, int] | None = None

    @property
    def length(self) -> int:
        return len(self.keys)


@dataclass
class Segment:
    """``num_tokens`` new tokens of a sequence in one step."""

    sequence: Sequence
    num_tokens: int


@dataclass
class StepData:
    """One step's inputs, as the model runner would hand them to a backend."""

    inputs: AttentionInputs
    query: torch.Tensor
    key: torch.Tensor
    value: torch.Tensor
    expected: torch.Tensor  # float32 [num_tokens, heads, head_size]


class Scenario:
    """Sequences over a pool of cache blocks, advanced step by step."""

    def __init__(self, spec: AttentionSpec, num_blocks: int, seed: int) -> None:
        self.spec = spec
        self.num_blocks = num_blocks
        self.generator = torch.Generator().manual_seed(seed)
        # Block 0 is never handed out: padded block-table entries point at it.
        self.free_blocks = (torch.randperm(num_blocks - 1, generator=self.generator) + 1).tolist()

    def new_sequence(self, max_len: int, shared_prefix: Sequence | None = None,
                     num_shared_blocks: int = 0) -> Sequence:
        """A sequence with room for ``max_len`` tokens; it may start with another
        sequence's first blocks (a prefix-cache hit), reading the keys and values
        that sequence wrote (or writes in the same step) there."""
        shared = shared_prefix.blocks[:num_shared_blocks] if shared_prefix else []
        needed = -(-max_len // self.spec.block_size) - len(shared)
        blocks = shared + [self.free_blocks.pop() for _ in range(needed)]
        prefix = (shared_prefix, len(shared) * self.spec.block_size) if shared else None
        return Sequence(blocks, prefix=prefix)

    def step(self, segments: list[Segment], device: torch.device) -> StepData:
        """Random new tokens for each segment, the step's inputs, and the reference output."""
        spec = self.spec
        num_tokens = sum(s.num_tokens for s in segments)
        query = self._random(num_tokens, spec.num_heads)
        key = self._random(num_tokens, spec.num_kv_heads)
        value = self._random(num_tokens, spec.num_kv_heads)
        slots, starts, seq_lens = [], [0], []
        for segment in segments:
            start = starts[-1]
            sequence = segment.sequence
            self._inherit_prefix(sequence)
            for offset in range(segment.num_tokens):
                position = sequence.length + offset
                block = sequence.blocks[position // spec.block_size]
                slots.append(block * spec.block_size + position % spec.block_size)
            sequence.keys += list(key[start:start + segment.num_tokens])
            sequence.values += list(value[start:start + segment.num_tokens])
            starts.append(start + segment.num_tokens)
            seq_lens.append(sequence.length)
        expected = torch.cat([self._reference(query[starts[i]:starts[i + 1]], s.sequence)
                              for i, s in enumerate(segments)])
        inputs = self._inputs(segments, slots, starts, seq_lens, device)
        on_device = [t.to(device=device, dtype=spec.dtype) for t in (query, key, value)]
        return StepData(inputs, *on_device, expected)

    def _random(self, num_tokens: int, num_heads: int) -> torch.Tensor:
        # Rounded to the dtype under test, so the reference sees what the backend sees.
        values = torch.randn(num_tokens, num_heads, self.spec.head_size, generator=self.generator)
        return values.to(self.spec.dtype).float()

    def _inherit_prefix(self, sequence: Sequence) -> None:
        if sequence.prefix is not None and sequence.length == 0:
            prefix, length = sequence.prefix
            sequence.keys = list(prefix.keys[:length])
            sequence.values = list(prefix.values[:length])
            assert len(sequence.keys) == length, "the shared prefix must be written first"

    def _reference(self, query: torch.Tensor, sequence: Sequence) -> torch.Tensor:
        keys, values = torch.stack(sequence.keys), torch.stack(sequence.values)
        group = self.spec.num_heads // self.spec.num_kv_heads
        keys = keys.repeat_interleave(group, dim=1)
        values = values.repeat_interleave(group, dim=1)
        seq_len, query_len = keys.shape[0], query.shape[0]
        scores = torch.einsum("qhd,khd->hqk", query, keys) * self.spec.head_size ** -0.5
        query_positions = torch.arange(seq_len - query_len, seq_len).unsqueeze(1)
        scores = scores.masked_fill(torch.arange(seq_len) > query_positions, float("-inf"))
        return torch.einsum("hqk,khd->qhd", scores.softmax(dim=-1), values)

    def _inputs(self, segments: list[Segment], slots: list[int], starts: list[int],
                seq_lens: list[int], device: torch.device) -> AttentionInputs:
        # Two spare columns of padding: a backend must not read past a sequence's blocks.
        width = max(len(s.sequence.blocks) for s in segments) + 2
        tables = [s.sequence.blocks + [0] * (width - len(s.sequence.blocks)) for s in segments]
        query_start = torch.tensor(starts, dtype=torch.int32)
        lens = torch.tensor(seq_lens, dtype=torch.int32)
        query_lens = [s.num_tokens for s in segments]
        return AttentionInputs(
            query_start_loc=query_start.to(device), seq_lens=lens.to(device),
            block_tables=torch.tensor(tables, dtype=torch.int32, device=device),
            slot_mapping=torch.tensor(slots, dtype=torch.int64, device=device),
            query_start_loc_cpu=query_start, seq_lens_cpu=lens,
            max_query_len=max(query_lens), max_seq_len=max(seq_lens),
            num_decode_tokens=sum(1 for n in query_lens if n == 1))


def mixed_batch_steps(scenario: Scenario) -> list[list[Segment]]:
    """Three steps that cover what an engine sends a backend.

    1. prefill: whole prompts, and the context later chunks build on;
    2. mixed: a decode, a decode at a block boundary, a prompt chunk after
       cached context, a new prompt, a prefix-cache hit on blocks written in an
       earlier step, and one on blocks written in this very step;
    3. decode only (backends often take a separate path for it).
    """
    block = scenario.spec.block_size
    decode = scenario.new_sequence(3 * block)
    boundary = scenario.new_sequence(3 * block)
    chunked = scenario.new_sequence(4 * block)
    fresh = scenario.new_sequence(3 * block)
    cached_hit = scenario.new_sequence(4 * block, shared_prefix=chunked, num_shared_blocks=2)
    same_step_hit = scenario.new_sequence(3 * block, shared_prefix=fresh, num_shared_blocks=1)
    first = [Segment(decode, block - 3), Segment(boundary, block), Segment(chunked, 2 * block + 5)]
    # same_step_hit reads the block `fresh` writes in step 2, in step 2.
    second = [Segment(decode, 1), Segment(boundary, 1), Segment(chunked, 7),
              Segment(fresh, block + 3), Segment(cached_hit, 6), Segment(same_step_hit, 4)]
    third = [Segment(s, 1) for s in (decode, boundary, chunked, fresh, cached_hit, same_step_hit)]
    return [first, second, third]
