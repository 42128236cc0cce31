"""The fused Triton MoE experts on CUDA against the per-expert loop at real layer sizes
(uneven, empty and single-expert loads; CUDA graph replay), and a tiny Qwen2-MoE engine
on the CUDA path against HF transformers."""

from __future__ import annotations

import pytest
import torch

from kvloom.testing.cuda_graphs import capture_graph

pytestmark = [pytest.mark.gpu,
              pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")]

# name: (experts, hidden, moe_intermediate, top_k)
LAYERS = {"qwen1.5-moe-a2.7b": (60, 2048, 1408, 4), "qwen2-57b-a14b": (64, 3584, 2560, 8)}
DTYPES = [torch.bfloat16, torch.float32]
PROMPTS = [[5, 17, 33, 2, 90, 41, 7], list(range(40, 140)), [200, 3], list(range(300, 340)) * 3]


def make_weights(layer: str, dtype: torch.dtype):
    """(gate_up_proj, down_proj) scaled by fan-in, so outputs stay O(1) at any size."""
    experts, hidden, intermediate, _ = LAYERS[layer]
    generator = torch.Generator("cuda").manual_seed(0)
    gate_up = torch.randn(experts, 2 * intermediate, hidden, generator=generator,
                          device="cuda", dtype=dtype).mul_(hidden ** -0.5)
    down = torch.randn(experts, hidden, intermediate, generator=generator, device="cuda",
                       dtype=dtype).mul_(intermediate ** -0.5)
    return gate_up, down


def randn(*shape: int, dtype: torch.dtype, seed: int = 0) -> torch.Tensor:
    generator = torch.Generator("cuda").manual_seed(seed)
    return torch.randn(*shape, generator=generator, device="cuda", dtype=dtype)


def sampled_routing(m: int, top_k: int, probabilities: torch.Tensor, dtype: torch.dtype):
    """(weights, expert_ids) with each token's top_k distinct experts drawn from
    ``probabilities`` [experts]: how the tests shape the load on each expert."""
    generator = torch.Generator("cuda").manual_seed(m)
    ids = torch.multinomial(probabilities.repeat(m, 1), top_k, generator=generator)
    weights = torch.rand(m, top_k, generator=generator, device="cuda") / top_k + 0.05
    return weights.to(dtype), ids


def assert_matches_reference(x, gate_up, down, weights, ids):
    """fused_experts against experts_reference in float32 on the same (rounded) weights;
    atol scales with the output's RMS. float32 runs ieee dots, so its bar is tight."""
    from kvloom.plugins.models.layers.fused_moe import fused_experts
    from kvloom.plugins.models.layers.moe import Routing, experts_reference

    out = fused_experts(x, gate_up, down, weights, ids)
    reference = experts_reference(x.float(), gate_up.float(), down.float(),
                                  Routing(weights.float(), ids))
    tolerance = 2e-2 if x.dtype == torch.bfloat16 else 1e-4
    scale = reference.pow(2).mean().sqrt().item()
    assert out.dtype == x.dtype and scale > 0
    torch.testing.assert_close(out.float(), reference, atol=tolerance * scale, rtol=tolerance)


@pytest.mark.parametrize("m", [1, 7, 64, 300, 2048])
@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@pytest.mark.parametrize("layer", LAYERS)
def test_fused_experts_match_loop(layer, dtype, m):
    from kvloom.plugins.models.layers.moe import route_top_k

    experts, hidden, _, top_k = LAYERS[layer]
    gate_up, down = make_weights(layer, dtype)
    routing = route_top_k(randn(m, experts, dtype=dtype, seed=1) * 2, top_k, renormalize=False)
    x = randn(m, hidden, dtype=dtype)
    assert_matches_reference(x, gate_up, down, routing.weights, routing.expert_ids)


@pytest.mark.parametrize("m", [7, 300, 2048])
@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@pytest.mark.parametrize("load", ["skewed", "subset", "single"])
def test_fused_experts_uneven_loads(load, dtype, m):
    """skewed: three experts in nearly every token's top-k, the rest a few rows each;
    subset: only top_k + 1 experts get any token; single: top-1, every token to the last
    expert (the end of the block layout), all others empty."""
    layer = "qwen1.5-moe-a2.7b"
    experts, hidden, _, top_k = LAYERS[layer]
    gate_up, down = make_weights(layer, dtype)
    x = randn(m, hidden, dtype=dtype)
    if load == "skewed":
        allowed = torch.arange(experts)
        probabilities = torch.ones(experts, device="cuda").index_fill_(0, allowed[:3].cuda(), 1e3)
    else:
        top_k, num_used = (top_k, top_k + 1) if load == "subset" else (1, 1)
        # Spread out and including the last expert: empty experts lie between and before.
        allowed = torch.arange(experts - 1, -1, -(experts // num_used))[:num_used]
        probabilities = torch.zeros(experts, device="cuda").index_fill_(0, allowed.cuda(), 1.0)
    weights, ids = sampled_routing(m, top_k, probabilities, dtype)
    counts = torch.bincount(ids.flatten(), minlength=experts)
    assert counts.sum() == m * top_k and (counts > 0).sum() <= len(allowed)
    if load == "skewed":
        assert counts[:3].min() > counts[3:].max()
    assert_matches_reference(x, gate_up, down, weights, ids)


@pytest.mark.parametrize("m", [1, 300])
@pytest.mark.parametrize("dtype", DTYPES, ids=str)
def test_cuda_graph_replays_with_new_inputs(dtype, m):
    """Captured once, replayed on inputs copied into the static buffers, including a
    routing that uses other experts and blocks: bit-identical to eager calls."""
    from kvloom.plugins.models.layers.fused_moe import fused_experts

    layer = "qwen1.5-moe-a2.7b"
    experts, hidden, _, top_k = LAYERS[layer]
    gate_up, down = make_weights(layer, dtype)
    uniform, skewed = torch.ones(experts, device="cuda"), torch.ones(experts, device="cuda")
    skewed[-5:] = 1000.0
    batches = [(randn(m, hidden, dtype=dtype, seed=seed),
                *sampled_routing(m, top_k, probabilities, dtype))
               for seed, probabilities in enumerate((uniform, skewed))]
    expected = [fused_experts(x, gate_up, down, w, ids) for x, w, ids in batches]
    static = [t.clone() for t in batches[0]]

    def run():
        return fused_experts(static[0], gate_up, down, static[1], static[2])

    graph, out = capture_graph(run)
    for index in (1, 0, 1):
        for buffer, new in zip(static, batches[index]):
            buffer.copy_(new)
        graph.replay()
        assert torch.equal(out, expected[index])
    x, weights, ids = batches[1]
    assert_matches_reference(x, gate_up, down, weights, ids)


def test_tiny_qwen2_moe_greedy_matches_hf(tmp_path, monkeypatch):
    from kvloom import LLM, SamplingParams
    from kvloom.plugins.models.layers import fused_moe
    from kvloom.testing.checkpoints import make_tiny_qwen2_moe
    from kvloom.testing.reference import hf_greedy_generate

    calls = []
    original = fused_moe.fused_experts
    monkeypatch.setattr(fused_moe, "fused_experts",
                        lambda *args, **kwargs: calls.append(1) or original(*args, **kwargs))
    path = make_tiny_qwen2_moe(tmp_path)
    llm = LLM(model=str(path), dtype="float32", platform="cuda", attention="triton",
              max_num_seqs=8, max_num_batched_tokens=64, enforce_eager=False)
    outputs = llm.generate([{"prompt_token_ids": p} for p in PROMPTS],
                           SamplingParams(temperature=0, max_tokens=24))
    assert [o.outputs[0].token_ids for o in outputs] == hf_greedy_generate(path, PROMPTS, 24)
    assert calls, "the experts never ran the fused Triton kernel"
    assert llm.engine.components.runner.cuda_graphs.num_replays > 0
