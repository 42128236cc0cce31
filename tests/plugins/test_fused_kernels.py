"""Fused Triton layer kernels against the PyTorch layers (CPU: TRITON_INTERPRET=1)."""

from __future__ import annotations

import os

import pytest
import torch

pytest.importorskip("triton")
if not torch.cuda.is_available() and os.environ.get("TRITON_INTERPRET") != "1":
    pytest.skip("needs CUDA or TRITON_INTERPRET=1", allow_module_level=True)

from kvloom.plugins.models.layers import fused_kernels  # noqa: E402
from kvloom.plugins.models.layers.activation import silu_and_mul  # noqa: E402
from kvloom.plugins.models.layers.norm import RMSNorm  # noqa: E402
from kvloom.plugins.models.layers.rotary import RotaryEmbedding  # noqa: E402

DEVICE = torch.device("cuda" if torch.cuda.is_available() else "cpu")
# Triton's CPU interpreter emulates bfloat16 loosely (truncating casts), so bf16 is
# checked on the GPU only.
DTYPES = [torch.float32] + ([torch.bfloat16] if torch.cuda.is_available() else [])
BF16_TOLERANCE = 2e-2  # two bf16 ulps: exp/rsqrt implementations differ by one


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("with_residual", [False, True])
def test_rms_norm(dtype, with_residual):
    generator = torch.Generator().manual_seed(0)
    x = torch.randn(5, 96, generator=generator).to(dtype)
    residual = torch.randn(5, 96, generator=generator).to(dtype) if with_residual else None
    norm = RMSNorm(96, 1e-6, dtype)
    norm.weight.data = torch.randn(96, generator=generator).to(dtype)
    expected, expected_sum = norm(x, residual)
    out, out_sum = fused_kernels.rms_norm(x.to(DEVICE), norm.weight.to(DEVICE), 1e-6,
                                          residual.to(DEVICE) if with_residual else None)
    tolerance = 1e-5 if dtype == torch.float32 else BF16_TOLERANCE
    torch.testing.assert_close(out.cpu(), expected, atol=tolerance, rtol=tolerance)
    assert torch.equal(out_sum.cpu(), expected_sum)


@pytest.mark.parametrize("dtype", DTYPES)
def test_rotary(dtype):
    generator = torch.Generator().manual_seed(1)
    rope = RotaryEmbedding(32, 10000.0, max_position=64)
    positions = torch.tensor([0, 5, 63, 17])
    qkv = torch.randn(4, 7 * 32, generator=generator).to(dtype)
    # Strided views, as the split of a fused qkv projection gives.
    query = qkv[:, :4 * 32].view(4, 4, 32)
    key = qkv[:, 4 * 32:6 * 32].view(4, 2, 32)
    expected_q, expected_k = rope(positions, query, key)
    rope._cos_sin(positions.to(DEVICE)[:0])
    out_q, out_k = fused_kernels.rotary(positions.to(DEVICE), query.to(DEVICE), key.to(DEVICE),
                                        rope._cos_sin_cache)
    tolerance = 1e-6 if dtype == torch.float32 else BF16_TOLERANCE
    torch.testing.assert_close(out_q.cpu(), expected_q, atol=tolerance, rtol=tolerance)
    torch.testing.assert_close(out_k.cpu(), expected_k, atol=tolerance, rtol=tolerance)


@pytest.mark.parametrize("dtype", DTYPES)
def test_silu_and_mul(dtype):
    generator = torch.Generator().manual_seed(2)
    gate_up = (3 * torch.randn(6, 2 * 1500, generator=generator)).to(dtype)
    expected = silu_and_mul(gate_up)
    out = fused_kernels.silu_and_mul(gate_up.to(DEVICE))
    tolerance = 1e-6 if dtype == torch.float32 else BF16_TOLERANCE
    torch.testing.assert_close(out.cpu(), expected, atol=tolerance, rtol=tolerance)


@pytest.mark.parametrize("rows", [1, 3, 8])
@pytest.mark.parametrize("with_bias", [False, True])
def test_skinny_gemm(rows, with_bias):
    from kvloom.plugins.models.layers.skinny_gemm import skinny_linear

    generator = torch.Generator().manual_seed(3)
    dtype = torch.bfloat16 if torch.cuda.is_available() else torch.float32
    x = torch.randn(rows, 200, generator=generator).to(DEVICE, dtype)
    weight = torch.randn(70, 200, generator=generator).to(DEVICE, dtype)
    bias = torch.randn(70, generator=generator).to(DEVICE, dtype) if with_bias else None
    expected = torch.nn.functional.linear(x.float(), weight.float(),
                                          None if bias is None else bias.float())
    out = skinny_linear(x, weight, bias, tile=(16, 64, 4, 2))
    tolerance = 1e-4 if dtype == torch.float32 else BF16_TOLERANCE
    torch.testing.assert_close(out.float(), expected, atol=tolerance * 10, rtol=tolerance)
