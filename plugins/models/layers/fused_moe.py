"""Fused mixture-of-experts: the experts' MLPs as two grouped Triton GEMMs.

A layer's (token, expert) pairs are sorted by expert and each expert's run is
padded to a multiple of BLOCK_M rows (``align_to_blocks``), so every row block
of a GEMM belongs to one expert. Then:

1. gate/up GEMM: each program multiplies a block of gathered token rows by one
   expert's gate and up rows, and writes SiLU(gate) * up, [pairs, intermediate];
2. down GEMM: the same blocks times the expert's down projection, scaled by the
   routing weight, [pairs, hidden];
3. the top-k rows of each token are summed.

No step reads a value back to the host and every buffer has a size fixed by the
token count, so the whole layer can be captured in a CUDA graph. Blocks past
the padded end exit at once. Used on CUDA tensors; tested on the CPU under
TRITON_INTERPRET=1 against ``moe.experts_reference``.
"""

from __future__ import annotations

from dataclasses import dataclass, replace

import torch
import triton
import triton.language as tl


@dataclass(frozen=True, slots=True)
class Tile:
    block_m: int
    block_n: int
    block_k: int
    group_m: int
    num_warps: int
    num_stages: int


def pick_tiles(num_pairs: int, num_experts: int) -> tuple[Tile, Tile]:
    """Tiles for the gate/up and the down GEMM, by the mean rows per expert.

    Few rows per expert (decode) stream weights: short row blocks, deep K tiles.
    Many rows (prefill) are compute bound: tall tiles, 8 warps. From
    ``benchmarks/moe_layer.py --sweep`` on an H200 at qwen1.5-moe-a2.7b's sizes
    (docs/benchmarks.md, "Mixture of experts").
    """
    rows_per_expert = num_pairs / num_experts
    if rows_per_expert <= 12:
        return Tile(16, 64, 128, 1, 4, 4), Tile(16, 64, 128, 1, 4, 4)
    if rows_per_expert <= 24:
        return Tile(32, 64, 128, 4, 4, 3), Tile(32, 128, 128, 4, 4, 3)
    if rows_per_expert <= 48:
        return Tile(64, 64, 64, 8, 8, 4), Tile(64, 128, 64, 8, 8, 4)
    return Tile(128, 128, 64, 8, 8, 4), Tile(128, 256, 64, 8, 8, 4)


def fit_to_device(tile: Tile, element_size: int, gated: bool,
                  shared_memory: int | None) -> Tile:
    """The tile with fewer pipeline stages, then narrower N, until its operand buffers fit
    ``shared_memory`` bytes per block (None: no limit, as in the interpreter).

    The tiles above were tuned on Hopper (227 KB); an A100 has 163 KB, consumer GPUs
    99 KB, and float32 operands need twice the room per stage (kept to two stages,
    the setting tested on the GPU).
    """
    if element_size > 2:
        tile = replace(tile, num_stages=min(tile.num_stages, 2))
    if shared_memory is None:
        return tile
    b_tiles = 2 if gated else 1  # the gated GEMM loads gate and up tiles
    while (tile.num_stages * (tile.block_m + b_tiles * tile.block_n) * tile.block_k
           * element_size > shared_memory):
        if tile.num_stages > 2:
            tile = replace(tile, num_stages=tile.num_stages - 1)
        elif tile.block_n > 16:
            tile = replace(tile, block_n=tile.block_n // 2)
        else:
            break
    return tile


def shared_memory_per_block(device: torch.device) -> int | None:
    if device.type != "cuda":
        return None
    return getattr(torch.cuda.get_device_properties(device), "shared_memory_per_block_optin",
                   None)


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


# num_pairs changes with the batch: specializing on it would compile per batch size class.
@triton.jit(do_not_specialize=["num_pairs"])
def _grouped_gemm_kernel(
        a_ptr, b_ptr, out_ptr, weights_ptr,
        sorted_pairs_ptr, block_experts_ptr, num_padded_ptr,
        num_pairs, n_out, k_in, gate_offset,
        stride_am, stride_ak, stride_be, stride_bn, stride_bk, stride_om, stride_on,
        A_ROWS_PER_TOKEN: tl.constexpr, GATED: tl.constexpr, MUL_WEIGHTS: tl.constexpr,
        FULL_PRECISION: tl.constexpr, BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr,
        BLOCK_K: tl.constexpr, GROUP_M: tl.constexpr):
    """out[pair, n] = A[pair's row] . B[expert, n] for one BLOCK_M x BLOCK_N tile.

    A's row of a pair is pair // A_ROWS_PER_TOKEN (top_k for the token activations,
    1 for per-pair activations). GATED: B rows n and n + gate_offset are gate and up;
    the tile stores SiLU(gate) * up. MUL_WEIGHTS scales each row by its routing weight.
    """
    pid = tl.program_id(0)
    num_blocks_m = tl.num_programs(0) // tl.cdiv(n_out, BLOCK_N)
    num_blocks_n = tl.cdiv(n_out, BLOCK_N)
    # Grouped order: GROUP_M row blocks share B tiles while they are in L2.
    group_size = GROUP_M * num_blocks_n
    first_m = (pid // group_size) * GROUP_M
    rows_in_group = tl.minimum(num_blocks_m - first_m, GROUP_M)
    block_m = first_m + (pid % group_size) % rows_in_group
    block_n = (pid % group_size) // rows_in_group
    if block_m * BLOCK_M >= tl.load(num_padded_ptr):
        return

    offsets_m = block_m * BLOCK_M + tl.arange(0, BLOCK_M)
    pairs = tl.load(sorted_pairs_ptr + offsets_m)
    row_mask = pairs < num_pairs
    expert = tl.load(block_experts_ptr + block_m).to(tl.int64)
    offsets_n = block_n * BLOCK_N + tl.arange(0, BLOCK_N)
    n_mask = offsets_n < n_out
    offsets_k = tl.arange(0, BLOCK_K)

    a_rows = (pairs // A_ROWS_PER_TOKEN).to(tl.int64)
    a_ptrs = a_ptr + a_rows[:, None] * stride_am + offsets_k[None, :] * stride_ak
    b_ptrs = (b_ptr + expert * stride_be + offsets_n[None, :].to(tl.int64) * stride_bn
              + offsets_k[:, None] * stride_bk)
    up_shift = gate_offset * stride_bn
    acc = tl.zeros((BLOCK_M, BLOCK_N), dtype=tl.float32)
    if GATED:
        acc_up = tl.zeros((BLOCK_M, BLOCK_N), dtype=tl.float32)
    for k_start in range(0, k_in, BLOCK_K):
        k_mask = offsets_k < k_in - k_start
        a = tl.load(a_ptrs, mask=row_mask[:, None] & k_mask[None, :], other=0.0)
        b_mask = k_mask[:, None] & n_mask[None, :]
        b = tl.load(b_ptrs, mask=b_mask, other=0.0)
        if FULL_PRECISION:
            acc = tl.dot(a, b, acc, input_precision="ieee")
        else:
            acc = tl.dot(a, b, acc)
        if GATED:
            b_up = tl.load(b_ptrs + up_shift, mask=b_mask, other=0.0)
            if FULL_PRECISION:
                acc_up = tl.dot(a, b_up, acc_up, input_precision="ieee")
            else:
                acc_up = tl.dot(a, b_up, acc_up)
        a_ptrs += BLOCK_K * stride_ak
        b_ptrs += BLOCK_K * stride_bk

    if GATED:
        acc = acc / (1.0 + tl.exp(-acc)) * acc_up
    if MUL_WEIGHTS:
        weights = tl.load(weights_ptr + pairs, mask=row_mask, other=0.0)
        acc = acc * weights.to(tl.float32)[:, None]
    out_ptrs = (out_ptr + pairs[:, None].to(tl.int64) * stride_om
                + offsets_n[None, :] * stride_on)
    tl.store(out_ptrs, acc.to(out_ptr.dtype.element_ty), mask=row_mask[:, None] & n_mask[None, :])


def _grouped_gemm(a: torch.Tensor, weight: torch.Tensor, out: torch.Tensor,
                  layout: BlockLayout, tile: Tile, num_pairs: int, rows_per_token: int,
                  gated: bool, routing_weights: torch.Tensor | None) -> None:
    n_out = out.shape[1]
    num_blocks_m = layout.block_experts.numel()
    grid = (num_blocks_m * triton.cdiv(n_out, tile.block_n),)
    _grouped_gemm_kernel[grid](
        a, weight, out, routing_weights if routing_weights is not None else out,
        layout.sorted_pairs, layout.block_experts, layout.num_padded,
        num_pairs, n_out, a.shape[1], n_out if gated else 0,
        a.stride(0), a.stride(1), weight.stride(0), weight.stride(1), weight.stride(2),
        out.stride(0), out.stride(1),
        A_ROWS_PER_TOKEN=rows_per_token, GATED=gated,
        MUL_WEIGHTS=routing_weights is not None,
        FULL_PRECISION=a.dtype == torch.float32,
        BLOCK_M=tile.block_m, BLOCK_N=tile.block_n, BLOCK_K=tile.block_k,
        GROUP_M=tile.group_m, num_warps=tile.num_warps, num_stages=tile.num_stages)


def fused_experts(hidden_states: torch.Tensor, gate_up_proj: torch.Tensor,
                  down_proj: torch.Tensor, routing_weights: torch.Tensor,
                  expert_ids: torch.Tensor,
                  tiles: tuple[Tile, Tile] | None = None) -> torch.Tensor:
    """Sum over each token's experts of weight * down(SiLU(gate(x)) * up(x)).

    Args:
        hidden_states: [tokens, hidden].
        gate_up_proj: [experts, 2 * intermediate, hidden], gate rows then up rows.
        down_proj: [experts, hidden, intermediate].
        routing_weights, expert_ids: [tokens, top_k].
        tiles: gate/up and down GEMM tiles (same block_m); ``pick_tiles`` by default.
    """
    num_tokens, top_k = expert_ids.shape
    num_experts, double_intermediate, _ = gate_up_proj.shape
    hidden_size = down_proj.shape[1]
    num_pairs = num_tokens * top_k
    if num_pairs == 0:
        return torch.zeros_like(hidden_states)
    gate_up_tile, down_tile = tiles or pick_tiles(num_pairs, num_experts)
    shared_memory = shared_memory_per_block(hidden_states.device)
    gate_up_tile = fit_to_device(gate_up_tile, hidden_states.element_size(), True, shared_memory)
    down_tile = fit_to_device(down_tile, hidden_states.element_size(), False, shared_memory)
    if gate_up_tile.block_m != down_tile.block_m:
        raise ValueError("both GEMMs must use the same block_m (they share one layout)")
    layout = align_to_blocks(expert_ids, num_experts, gate_up_tile.block_m)
    hidden_states = hidden_states.contiguous()
    activated = torch.empty((num_pairs, double_intermediate // 2), dtype=hidden_states.dtype,
                            device=hidden_states.device)
    _grouped_gemm(hidden_states, gate_up_proj, activated, layout, gate_up_tile, num_pairs,
                  rows_per_token=top_k, gated=True, routing_weights=None)
    per_pair = torch.empty((num_pairs, hidden_size), dtype=hidden_states.dtype,
                           device=hidden_states.device)
    _grouped_gemm(activated, down_proj, per_pair, layout, down_tile, num_pairs,
                  rows_per_token=1, gated=False,
                  routing_weights=routing_weights.flatten().contiguous())
    return per_pair.view(num_tokens, top_k, hidden_size).sum(dim=1)
