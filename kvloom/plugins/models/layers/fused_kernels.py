"""Fused Triton kernels for the per-token layers of a decoder block.

Each replaces a chain of small PyTorch kernels with one launch: at batch 1 a
7B decoder step otherwise spends more time launching ~40 tiny kernels per layer
than reading weights. They follow the PyTorch reference semantics exactly where
HF rounds (RMSNorm's cast before the weight multiply).

Used on CUDA tensors (and tested on the CPU under TRITON_INTERPRET=1); the
layers fall back to PyTorch elsewhere.
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl


@triton.jit
def _rms_norm_kernel(x_ptr, residual_ptr, weight_ptr, out_ptr, residual_out_ptr,
                     stride_x, stride_residual, stride_out, stride_residual_out,
                     hidden_size, eps, HAS_RESIDUAL: tl.constexpr, BLOCK: tl.constexpr):
    row = tl.program_id(0).to(tl.int64)
    offsets = tl.arange(0, BLOCK)
    mask = offsets < hidden_size
    x = tl.load(x_ptr + row * stride_x + offsets, mask=mask, other=0.0)
    if HAS_RESIDUAL:
        residual = tl.load(residual_ptr + row * stride_residual + offsets, mask=mask, other=0.0)
        # Round the sum to the activation dtype, as the unfused add would.
        x = (x.to(tl.float32) + residual.to(tl.float32)).to(x_ptr.dtype.element_ty)
    tl.store(residual_out_ptr + row * stride_residual_out + offsets, x, mask=mask)
    hidden = x.to(tl.float32)
    variance = tl.sum(hidden * hidden, axis=0) / hidden_size
    normed = (hidden * tl.math.rsqrt(variance + eps)).to(x_ptr.dtype.element_ty)
    weight = tl.load(weight_ptr + offsets, mask=mask, other=0.0)
    out = (weight.to(tl.float32) * normed.to(tl.float32)).to(out_ptr.dtype.element_ty)
    tl.store(out_ptr + row * stride_out + offsets, out, mask=mask)


def rms_norm(x: torch.Tensor, weight: torch.Tensor, eps: float,
             residual: torch.Tensor | None = None) -> tuple[torch.Tensor, torch.Tensor]:
    """(weight * normalize(x + residual), x + residual) for 2-D ``x``."""
    out = torch.empty_like(x)
    residual_out = torch.empty_like(x)
    num_rows, hidden_size = x.shape
    if num_rows:
        _rms_norm_kernel[(num_rows,)](
            x, residual if residual is not None else x, weight, out, residual_out,
            x.stride(0), residual.stride(0) if residual is not None else 0, out.stride(0),
            residual_out.stride(0), hidden_size, eps, HAS_RESIDUAL=residual is not None,
            BLOCK=triton.next_power_of_2(hidden_size))
    return out, residual_out


@triton.jit
def _rotary_kernel(q_ptr, k_ptr, cos_sin_ptr, positions_ptr, q_out_ptr, k_out_ptr,
                   stride_q_token, stride_q_head, stride_k_token, stride_k_head,
                   stride_cache_kind, stride_qo_token, stride_ko_token,
                   num_q_heads, num_k_heads, HALF: tl.constexpr, BLOCK_H: tl.constexpr):
    token = tl.program_id(0).to(tl.int64)
    position = tl.load(positions_ptr + token).to(tl.int64)
    dims = tl.arange(0, HALF)
    cos = tl.load(cos_sin_ptr + position * 2 * HALF + dims)
    sin = tl.load(cos_sin_ptr + stride_cache_kind + position * 2 * HALF + dims)
    heads = tl.arange(0, BLOCK_H)
    for kind in tl.static_range(2):
        if kind == 0:
            src, dst, num_heads = q_ptr, q_out_ptr, num_q_heads
            stride_token, stride_head, stride_out = stride_q_token, stride_q_head, stride_qo_token
        else:
            src, dst, num_heads = k_ptr, k_out_ptr, num_k_heads
            stride_token, stride_head, stride_out = stride_k_token, stride_k_head, stride_ko_token
        mask = (heads < num_heads)[:, None]
        base = src + token * stride_token + heads[:, None] * stride_head + dims[None, :]
        first = tl.load(base, mask=mask, other=0.0)
        second = tl.load(base + HALF, mask=mask, other=0.0)
        # The unfused version rounds cos/sin and each product to the activation dtype.
        dtype = first.dtype
        c = cos.to(dtype)[None, :]
        s = sin.to(dtype)[None, :]
        out_first = (first * c).to(dtype) - (second * s).to(dtype)
        out_second = (second * c).to(dtype) + (first * s).to(dtype)
        out = dst + token * stride_out + heads[:, None] * HALF * 2 + dims[None, :]
        tl.store(out, out_first.to(dtype), mask=mask)
        tl.store(out + HALF, out_second.to(dtype), mask=mask)


def rotary(positions: torch.Tensor, query: torch.Tensor, key: torch.Tensor,
           cos_sin_cache: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """RoPE (rotate-half layout) on [tokens, heads, head_size] query and key.

    ``cos_sin_cache``: float32 [2, max_position, head_size] (cos, sin; both halves equal).
    """
    num_tokens, num_q_heads, head_size = query.shape
    num_k_heads = key.shape[1]
    q_out = torch.empty((num_tokens, num_q_heads, head_size), dtype=query.dtype,
                        device=query.device)
    k_out = torch.empty((num_tokens, num_k_heads, head_size), dtype=key.dtype, device=key.device)
    if num_tokens:
        # The cache's halves are equal; the kernel reads the first half of each row.
        _rotary_kernel[(num_tokens,)](
            query, key, cos_sin_cache, positions, q_out, k_out,
            query.stride(0), query.stride(1), key.stride(0), key.stride(1),
            cos_sin_cache.stride(0), q_out.stride(0), k_out.stride(0),
            num_q_heads, num_k_heads, HALF=head_size // 2,
            BLOCK_H=triton.next_power_of_2(max(num_q_heads, num_k_heads)))
    return q_out, k_out


@triton.jit
def _silu_and_mul_kernel(x_ptr, out_ptr, stride_x, stride_out, width,
                         BLOCK: tl.constexpr):
    row = tl.program_id(0).to(tl.int64)
    start = tl.program_id(1) * BLOCK
    offsets = start + tl.arange(0, BLOCK)
    mask = offsets < width
    gate = tl.load(x_ptr + row * stride_x + offsets, mask=mask, other=0.0)
    up = tl.load(x_ptr + row * stride_x + width + offsets, mask=mask, other=0.0)
    gate32 = gate.to(tl.float32)
    # F.silu computes in float32 and rounds once; the product is rounded again.
    activated = (gate32 / (1.0 + tl.exp(-gate32))).to(gate.dtype)
    out = (activated.to(tl.float32) * up.to(tl.float32)).to(out_ptr.dtype.element_ty)
    tl.store(out_ptr + row * stride_out + offsets, out, mask=mask)


def silu_and_mul(gate_up: torch.Tensor) -> torch.Tensor:
    """SiLU(gate) * up for 2-D ``gate_up`` = [gate | up]."""
    num_rows, double_width = gate_up.shape
    width = double_width // 2
    out = torch.empty((num_rows, width), dtype=gate_up.dtype, device=gate_up.device)
    block = min(1024, triton.next_power_of_2(width))
    if num_rows:
        _silu_and_mul_kernel[(num_rows, triton.cdiv(width, block))](
            gate_up, out, gate_up.stride(0), out.stride(0), width, BLOCK=block)
    return out
