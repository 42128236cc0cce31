"""The fused Triton MoE kernel against the per-expert PyTorch loop (CPU: TRITON_INTERPRET=1)."""

from __future__ import annotations

import os

import pytest
import torch

pytest.importorskip("triton")
if not torch.cuda.is_available() and os.environ.get("TRITON_INTERPRET") != "1":
    pytest.skip("needs CUDA or TRITON_INTERPRET=1", allow_module_level=True)

from kvloom.plugins.models.layers import fused_moe, moe_sort  # noqa: E402
from kvloom.plugins.models.layers.moe import Routing, experts_reference, route_top_k  # noqa: E402

DEVICE = torch.device("cuda" if torch.cuda.is_available() else "cpu")


def make_experts(num_experts, hidden, intermediate, seed=0):
    generator = torch.Generator().manual_seed(seed)
    gate_up = torch.randn(num_experts, 2 * intermediate, hidden, generator=generator) * 0.2
    down = torch.randn(num_experts, hidden, intermediate, generator=generator) * 0.2
    return gate_up, down


def routing_from(logits, top_k, renormalize=False):
    return route_top_k(logits, top_k, renormalize)


def check(hidden_states, gate_up, down, routing, tiles=None, dtype=torch.float32):
    expected = experts_reference(hidden_states, gate_up, down, routing)
    out = fused_moe.fused_experts(*(t.to(DEVICE, dtype) for t in (hidden_states, gate_up, down,
                                                                  routing.weights)),
                                  routing.expert_ids.to(DEVICE), tiles)
    assert out.dtype == dtype
    tolerance = 1e-5 if dtype == torch.float32 else 1e-2
    torch.testing.assert_close(out.cpu().float(), expected, atol=tolerance, rtol=tolerance)
    return out


@pytest.mark.parametrize("num_tokens,hidden,intermediate,num_experts,top_k", [
    (1, 64, 48, 6, 3),       # one decode token; widths that are not tile multiples
    (5, 32, 16, 8, 2),
    (37, 48, 40, 8, 2),      # several row blocks per expert
    (20, 64, 32, 4, 4),      # every token visits every expert
])
def test_matches_reference_on_random_routing(align_path, num_tokens, hidden, intermediate, num_experts,
                                             top_k):
    gate_up, down = make_experts(num_experts, hidden, intermediate)
    generator = torch.Generator().manual_seed(1)
    x = torch.randn(num_tokens, hidden, generator=generator)
    logits = torch.randn(num_tokens, num_experts, generator=generator)
    check(x, gate_up, down, routing_from(logits, top_k, renormalize=True))


def test_float16():
    """Half-precision operands with float32 accumulation (Triton's interpreter cannot
    emulate bfloat16 dots; the GPU tests cover bf16)."""
    gate_up, down = make_experts(8, 64, 48, seed=9)
    generator = torch.Generator().manual_seed(10)
    x = torch.randn(21, 64, generator=generator)
    routing = routing_from(torch.randn(21, 8, generator=generator), 2)
    as_half = [t.half().float() for t in (x, gate_up, down, routing.weights)]
    check(*as_half[:3], Routing(as_half[3], routing.expert_ids), dtype=torch.float16)


@pytest.mark.parametrize("limit,element_size,gated,expected_stages,expected_n", [
    (None, 2, True, 4, 128),          # interpreter: as picked
    (232_448, 2, True, 4, 128),       # Hopper: 4 x (128 + 256) x 64 x 2 = 196,608 fits
    (166_912, 2, True, 3, 128),       # A100: one stage fewer
    (101_376, 2, True, 2, 128),       # sm86/sm89: two stages
    (65_536, 2, True, 2, 64),         # then narrower N tiles
    (232_448, 4, False, 2, 128),      # float32: at most two stages
])
def test_tiles_shrink_to_fit_shared_memory(limit, element_size, gated, expected_stages,
                                           expected_n):
    tile = fused_moe.fit_to_device(fused_moe.Tile(128, 128, 64, 8, 8, 4), element_size, gated,
                                   limit)
    assert (tile.num_stages, tile.block_n, tile.block_m) == (expected_stages, expected_n, 128)


def test_uneven_loads_and_experts_without_tokens(align_path):
    num_experts, top_k = 8, 2
    gate_up, down = make_experts(num_experts, 32, 24, seed=2)
    generator = torch.Generator().manual_seed(3)
    x = torch.randn(45, 32, generator=generator)
    # Experts 0 and 5 take nearly everything, 6 a few tokens, the rest none.
    logits = torch.full((45, num_experts), -30.0)
    logits[:, 0] = 5.0
    logits[:40, 5] = 4.0
    logits[40:, 6] = 4.5
    routing = routing_from(logits, top_k)
    used = set(routing.expert_ids.flatten().tolist())
    assert used == {0, 5, 6}
    check(x, gate_up, down, routing)


def test_every_token_on_one_expert_with_top_1():
    gate_up, down = make_experts(4, 32, 16, seed=4)
    x = torch.randn(33, 32, generator=torch.Generator().manual_seed(5))
    routing = Routing(torch.rand(33, 1, generator=torch.Generator().manual_seed(6)),
                      torch.full((33, 1), 3, dtype=torch.int64))
    check(x, gate_up, down, routing)


@pytest.mark.parametrize("block_m", [16, 32, 64])
def test_any_block_m_gives_the_same_result(block_m):
    gate_up, down = make_experts(6, 32, 32, seed=7)
    generator = torch.Generator().manual_seed(8)
    x = torch.randn(29, 32, generator=generator)
    routing = routing_from(torch.randn(29, 6, generator=generator), 2)
    tile = fused_moe.Tile(block_m, 32, 32, 2, 4, 2)
    check(x, gate_up, down, routing, tiles=(tile, tile))


def test_tiles_must_share_block_m():
    gate_up, down = make_experts(4, 32, 16)
    routing = routing_from(torch.randn(3, 4), 2)
    with pytest.raises(ValueError, match="block_m"):
        fused_moe.fused_experts(torch.randn(3, 32), gate_up, down, routing.weights,
                                routing.expert_ids,
                                (fused_moe.Tile(16, 32, 32, 1, 4, 2),
                                 fused_moe.Tile(32, 32, 32, 1, 4, 2)))


@pytest.fixture(params=["one-program", "torch"])
def align_path(request, monkeypatch):
    """Run a test through each of align_to_blocks' two implementations."""
    if request.param == "torch":
        monkeypatch.setattr(moe_sort, "SINGLE_PROGRAM_MAX_PAIRS", -1)
    return request.param


def test_block_layout_sorts_every_pair_into_single_expert_blocks(align_path):
    expert_ids = torch.tensor([[3, 0], [3, 1], [0, 3], [3, 2], [1, 3]])
    block_m = 4
    layout = moe_sort.align_to_blocks(expert_ids.to(DEVICE), num_experts=5, block_m=block_m)
    layout = moe_sort.BlockLayout(*(t.cpu() for t in (layout.sorted_pairs,
                                                       layout.block_experts, layout.num_padded)))
    num_pairs = expert_ids.numel()
    num_padded = int(layout.num_padded)
    # Expert 0: 2 pairs, 1: 2, 2: 1, 3: 5, 4: 0 -> padded 4 + 4 + 4 + 8 = 20 rows.
    assert num_padded == 20
    rows = layout.sorted_pairs[:num_padded]
    real = rows[rows < num_pairs]
    assert sorted(real.tolist()) == list(range(num_pairs))
    flat = expert_ids.flatten()
    for block, expert in enumerate(layout.block_experts[:num_padded // block_m].tolist()):
        pairs = rows[block * block_m:(block + 1) * block_m]
        pairs = pairs[pairs < num_pairs]
        assert pairs.numel() > 0 and (flat[pairs] == expert).all()
    assert (layout.sorted_pairs[num_padded:] == num_pairs).all()


@pytest.mark.parametrize("num_experts,block_m", [(60, 16), (8, 64), (5, 32)])
def test_both_sorts_give_the_same_layout(monkeypatch, num_experts, block_m):
    """The one-program sort (chunks of pairs, several chunks here) is stable like argsort."""
    generator = torch.Generator().manual_seed(num_experts)
    expert_ids = torch.randint(0, num_experts, (750, 4), generator=generator).to(DEVICE)
    expert_ids[:300] = expert_ids[:300] % 3  # uneven: the first experts get more
    one_program = moe_sort.align_to_blocks(expert_ids, num_experts, block_m)
    monkeypatch.setattr(moe_sort, "SINGLE_PROGRAM_MAX_PAIRS", -1)
    with_torch = moe_sort.align_to_blocks(expert_ids, num_experts, block_m)
    num_blocks = int(with_torch.num_padded) // block_m
    assert int(one_program.num_padded) == int(with_torch.num_padded)
    assert torch.equal(one_program.sorted_pairs, with_torch.sorted_pairs)
    assert torch.equal(one_program.block_experts[:num_blocks],
                       with_torch.block_experts[:num_blocks])


def test_no_tokens():
    gate_up, down = make_experts(4, 32, 16)
    out = fused_moe.fused_experts(torch.zeros(0, 32), gate_up, down, torch.zeros(0, 2),
                                  torch.zeros(0, 2, dtype=torch.int64))
    assert out.shape == (0, 32)
