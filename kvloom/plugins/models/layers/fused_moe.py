"""Fused mixture-of-experts: the experts' MLPs as two grouped Triton GEMMs.

A layer's (token, expert) pairs are sorted by expert and each expert's run is
padded to a multiple of BLOCK_M rows (``moe_sort.align_to_blocks``), so every row
block of a GEMM belongs to one expert. Then:

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

from kvloom.plugins.models.layers.moe_sort import BlockLayout, align_to_blocks


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
