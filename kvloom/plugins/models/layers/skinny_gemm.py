"""A Triton matrix product for decode batches of a few rows: y = x @ W.T (+ bias).

At batch 1-8 a linear layer only streams its weight matrix; cuBLAS then picks
split-K kernels plus a separate reduction, and the smaller projections (qkv,
o_proj) reach ~70% of memory bandwidth. This kernel gives each program a slice
of output columns and streams its weight rows once, with enough tiles in flight
to keep HBM busy. Tile shapes come from ``benchmarks/skinny_gemm.py`` runs on
an H200 (see docs/benchmarks.md).
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl

MAX_ROWS = 8


# (BLOCK_N, BLOCK_K, num_warps, num_stages)
DEFAULT_TILE = (64, 256, 4, 5)


def pick_tile(n: int, k: int) -> tuple[int, int, int, int] | None:
    """The fastest tile measured for a weight of [n, k], or None where cuBLAS was faster.

    From benchmarks/skinny_gemm.py on an H200 (docs/benchmarks.md): qwen2-7b's and
    qwen2-0.5b's projections and lm_heads at 1 and 8 rows.
    """
    if n >= 65536:
        return (64, 256, 4, 3)  # lm_head
    if k >= 8192:
        return (32, 512, 4, 3)  # a tall down projection
    if n >= 16384:
        return (64, 128, 4, 3)  # a wide gate/up projection
    if k < 2048:
        return (16, 512, 4, 3) if n < 2048 else (32, 128, 4, 3)
    if n < 2048:
        return None  # narrow and deep (0.5b's down_proj): cuBLAS's split-K wins
    return DEFAULT_TILE


def candidate_tiles() -> list[tuple[int, int, int, int]]:
    """The tile shapes the benchmark compares."""
    return [(block_n, block_k, warps, stages)
            for block_n in (16, 32, 64)
            for block_k in (128, 256, 512)
            for warps in (4, 8)
            for stages in (3, 5)
            if block_n * block_k <= 16384]


@triton.jit
def _skinny_gemm_kernel(x_ptr, w_ptr, bias_ptr, y_ptr, M, N, K, stride_xm, stride_wn, stride_ym,
                        HAS_BIAS: tl.constexpr, BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr,
                        BLOCK_K: tl.constexpr):
    pid = tl.program_id(0)
    rows = tl.arange(0, BLOCK_M)
    cols = pid * BLOCK_N + tl.arange(0, BLOCK_N)
    row_mask = rows < M
    col_mask = cols < N
    acc = tl.zeros([BLOCK_M, BLOCK_N], dtype=tl.float32)
    w_base = w_ptr + cols.to(tl.int64)[:, None] * stride_wn
    x_base = x_ptr + rows[:, None] * stride_xm
    for start in range(0, K, BLOCK_K):
        ks = start + tl.arange(0, BLOCK_K)
        k_mask = ks < K
        w = tl.load(w_base + ks[None, :], mask=col_mask[:, None] & k_mask[None, :], other=0.0)
        x = tl.load(x_base + ks[None, :], mask=row_mask[:, None] & k_mask[None, :], other=0.0)
        acc += tl.dot(x, tl.trans(w))
    if HAS_BIAS:
        acc += tl.load(bias_ptr + cols, mask=col_mask, other=0.0).to(tl.float32)[None, :]
    tl.store(y_ptr + rows[:, None] * stride_ym + cols[None, :], acc.to(y_ptr.dtype.element_ty),
             mask=row_mask[:, None] & col_mask[None, :])


def supports(x: torch.Tensor, weight: torch.Tensor) -> bool:
    """Worth using: a CUDA decode batch of at most 8 rows in a 16-bit dtype."""
    return (x.is_cuda and x.dim() == 2 and x.shape[0] <= MAX_ROWS
            and x.dtype in (torch.bfloat16, torch.float16) and weight.dtype == x.dtype
            and x.stride(1) == 1 and weight.stride(1) == 1)


def skinny_linear(x: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None = None,
                  tile: tuple[int, int, int, int] = DEFAULT_TILE) -> torch.Tensor:
    """x [M, K] @ weight [N, K].T + bias, for M <= 8."""
    num_rows, k = x.shape
    n = weight.shape[0]
    y = torch.empty((num_rows, n), dtype=x.dtype, device=x.device)
    if num_rows == 0:
        return y
    block_n, block_k, warps, stages = tile
    # BLOCK_M 16: tl.dot's smallest tile; the extra rows are masked loads.
    _skinny_gemm_kernel[(triton.cdiv(n, block_n),)](
        x, weight, bias if bias is not None else weight, y, num_rows, n, k,
        x.stride(0), weight.stride(0), y.stride(0), HAS_BIAS=bias is not None, BLOCK_M=16,
        BLOCK_N=block_n, BLOCK_K=block_k, num_warps=warps, num_stages=stages)
    return y
