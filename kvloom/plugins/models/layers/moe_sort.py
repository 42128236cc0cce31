"""Sorting a MoE layer's (token, expert) pairs into per-expert blocks of rows, on the device.

The grouped GEMMs of ``fused_moe`` need every BLOCK_M rows to belong to one expert:
each expert's pairs are laid end to end, padded to a multiple of BLOCK_M. Nothing is
read back to the host and the buffers' sizes depend only on the pair count, so the
sort can be captured in a CUDA graph.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
import triton
import triton.language as tl


@dataclass(frozen=True, slots=True)
class BlockLayout:
    """(token, expert) pairs sorted by expert, each expert's run padded to BLOCK_M.

    Attributes:
        sorted_pairs: [capacity] int32 flat pair index (token * top_k + slot); padding
            rows hold num_pairs.
        block_experts: [capacity / BLOCK_M] int32 expert of each row block.
        num_padded: [1] int32 rows in use (a multiple of BLOCK_M); later blocks are idle.
    """

    sorted_pairs: torch.Tensor
    block_experts: torch.Tensor
    num_padded: torch.Tensor


# Up to this many pairs (a decode batch of 1024 tokens at top-4) one Triton program
# sorts them; beyond, the PyTorch ops below are cheaper than one program's serial loop.
SINGLE_PROGRAM_MAX_PAIRS = 4096


def align_to_blocks(expert_ids: torch.Tensor, num_experts: int, block_m: int) -> BlockLayout:
    """Sort the pairs of ``expert_ids`` [tokens, top_k] by expert, on the device."""
    flat = expert_ids.flatten()
    num_pairs = flat.numel()
    # At most min(pairs, experts) experts are in use, each wasting < block_m rows.
    capacity = min(num_pairs * block_m,
                   triton.cdiv(num_pairs + num_experts * (block_m - 1), block_m) * block_m)
    if num_pairs <= SINGLE_PROGRAM_MAX_PAIRS:
        return _align_in_one_program(flat, num_experts, block_m, capacity)
    return _align_with_torch(flat.long(), num_experts, block_m, capacity)


def _align_with_torch(flat: torch.Tensor, num_experts: int, block_m: int,
                      capacity: int) -> BlockLayout:
    num_pairs = flat.numel()
    device = flat.device
    counts = torch.zeros(num_experts, dtype=torch.int64, device=device)
    counts.scatter_add_(0, flat, torch.ones_like(flat))
    padded_counts = (counts + block_m - 1) // block_m * block_m
    padded_end = torch.cumsum(padded_counts, 0)
    start = torch.cumsum(counts, 0) - counts
    order = torch.argsort(flat, stable=True)
    sorted_experts = flat[order]
    rank = torch.arange(num_pairs, device=device) - start[sorted_experts]
    destination = padded_end[sorted_experts] - padded_counts[sorted_experts] + rank
    sorted_pairs = torch.full((capacity,), num_pairs, dtype=torch.int32, device=device)
    sorted_pairs[destination] = order.to(torch.int32)
    block_starts = torch.arange(0, capacity, block_m, device=device)
    block_experts = torch.searchsorted(padded_end, block_starts, right=True)
    block_experts = block_experts.clamp_(max=num_experts - 1).to(torch.int32)
    return BlockLayout(sorted_pairs, block_experts, padded_end[-1:].to(torch.int32))


def _align_in_one_program(flat: torch.Tensor, num_experts: int, block_m: int,
                          capacity: int) -> BlockLayout:
    device = flat.device
    sorted_pairs = torch.empty(capacity, dtype=torch.int32, device=device)
    block_experts = torch.empty(capacity // block_m, dtype=torch.int32, device=device)
    num_padded = torch.empty(1, dtype=torch.int32, device=device)
    experts_padded = triton.next_power_of_2(num_experts)
    _align_kernel[(1,)](flat, sorted_pairs, block_experts, num_padded, flat.numel(),
                        num_experts, capacity, BLOCK_M=block_m, EXPERTS=experts_padded,
                        CHUNK=max(16, 8192 // experts_padded), num_warps=4)
    return BlockLayout(sorted_pairs, block_experts, num_padded)


@triton.jit(do_not_specialize=["num_pairs", "capacity"])
def _align_kernel(expert_ids_ptr, sorted_pairs_ptr, block_experts_ptr, num_padded_ptr,
                  num_pairs, num_experts, capacity, BLOCK_M: tl.constexpr,
                  EXPERTS: tl.constexpr, CHUNK: tl.constexpr):
    """``align_to_blocks`` in one launch: count pairs per expert, lay the experts' padded
    runs end to end, then give each pair the next slot of its expert's run."""
    experts = tl.arange(0, EXPERTS)
    counts = tl.zeros([EXPERTS], tl.int32)
    for start in range(0, num_pairs, CHUNK):
        pairs = start + tl.arange(0, CHUNK)
        ids = tl.load(expert_ids_ptr + pairs, mask=pairs < num_pairs, other=-1).to(tl.int32)
        counts += tl.sum((ids[:, None] == experts[None, :]).to(tl.int32), axis=0)
    padded = (counts + BLOCK_M - 1) // BLOCK_M * BLOCK_M
    padded_end = tl.cumsum(padded, axis=0)

    for start in range(0, capacity, CHUNK):  # padding rows; real pairs overwrite theirs
        slots = start + tl.arange(0, CHUNK)
        tl.store(sorted_pairs_ptr + slots, tl.zeros([CHUNK], tl.int32) + num_pairs,
                 mask=slots < capacity)
    tl.debug_barrier()
    next_slot = padded_end - padded
    for start in range(0, num_pairs, CHUNK):
        pairs = start + tl.arange(0, CHUNK)
        ids = tl.load(expert_ids_ptr + pairs, mask=pairs < num_pairs, other=-1).to(tl.int32)
        one_hot = (ids[:, None] == experts[None, :]).to(tl.int32)
        rank = tl.cumsum(one_hot, axis=0) - 1  # earlier pairs of the same expert in the chunk
        slot = tl.sum(one_hot * (next_slot[None, :] + rank), axis=1)
        tl.store(sorted_pairs_ptr + slot, pairs.to(tl.int32), mask=pairs < num_pairs)
        next_slot += tl.sum(one_hot, axis=0)

    num_blocks = capacity // BLOCK_M
    for start in range(0, num_blocks, CHUNK):
        blocks = start + tl.arange(0, CHUNK)
        # The block's expert: how many experts' runs end at or before its first row.
        ended = (padded_end[None, :] <= (blocks * BLOCK_M)[:, None]).to(tl.int32)
        owner = tl.minimum(tl.sum(ended, axis=1), num_experts - 1)
        tl.store(block_experts_ptr + blocks, owner, mask=blocks < num_blocks)
    tl.store(num_padded_ptr, tl.sum(padded, axis=0))
