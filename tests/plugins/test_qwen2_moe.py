"""Qwen2MoeForCausalLM: greedy output equals HF transformers (float32, CPU); loading checks."""

from __future__ import annotations

import json
import re

import pytest
import torch
from safetensors.torch import load_file, save_file

from kvloom import LLM, SamplingParams
from kvloom.plugins.models.layers.moe import route_top_k
from kvloom.plugins.models.qwen2_moe import is_sparse_layer
from kvloom.testing.checkpoints import make_tiny_qwen2_moe
from kvloom.testing.reference import hf_greedy_generate

PROMPTS = [[5, 17, 33, 2, 90, 41, 7], list(range(40, 200)), [200, 3]]


def generate(path, **engine_args):
    llm = LLM(model=str(path), dtype="float32", max_num_batched_tokens=64, block_size=8,
              **engine_args)
    outputs = llm.generate([{"prompt_token_ids": p} for p in PROMPTS],
                           SamplingParams(temperature=0, max_tokens=24))
    return [o.outputs[0].token_ids for o in outputs]


@pytest.mark.parametrize("overrides", [
    {},
    {"norm_topk_prob": True},
    {"decoder_sparse_step": 2, "mlp_only_layers": [], "num_hidden_layers": 4},
    # Qwen2-57B-A14B's shape in small: GQA 4/1, top 4 of 16, a wide shared expert.
    {"num_experts": 16, "num_experts_per_tok": 4, "num_key_value_heads": 1,
     "moe_intermediate_size": 24, "shared_expert_intermediate_size": 192, "mlp_only_layers": []},
    {"mlp_only_layers": [0, 1, 2]},
    {"num_experts_per_tok": 1, "tie_word_embeddings": True, "qkv_bias": False, "head_dim": 32},
], ids=["qwen1.5-moe", "renormalized-top-k", "sparse-step-2", "qwen2-57b-shape", "all-dense",
        "top-1-tied-no-qkv-bias-head-dim"])
def test_greedy_matches_hf(tmp_path, overrides):
    path = make_tiny_qwen2_moe(tmp_path / "moe", **overrides)
    assert generate(path) == hf_greedy_generate(path, PROMPTS, 24)


def test_sparse_layer_rule_follows_hf():
    from transformers import Qwen2MoeConfig
    from transformers.models.qwen2_moe.modeling_qwen2_moe import Qwen2MoeDecoderLayer as HFLayer
    from transformers.models.qwen2_moe.modeling_qwen2_moe import Qwen2MoeSparseMoeBlock

    config = Qwen2MoeConfig(hidden_size=16, intermediate_size=32, moe_intermediate_size=8,
                            shared_expert_intermediate_size=8, num_experts=4,
                            num_attention_heads=2, num_key_value_heads=2, num_hidden_layers=7,
                            decoder_sparse_step=3, mlp_only_layers=[5])
    for index in range(7):
        hf_sparse = isinstance(HFLayer(config, index).mlp, Qwen2MoeSparseMoeBlock)
        assert is_sparse_layer(config, index) == hf_sparse


@pytest.mark.parametrize("renormalize", [False, True])
def test_routing_matches_hf_router(renormalize):
    from transformers import Qwen2MoeConfig
    from transformers.models.qwen2_moe.modeling_qwen2_moe import Qwen2MoeTopKRouter

    config = Qwen2MoeConfig(hidden_size=16, num_experts=6, num_experts_per_tok=3,
                            norm_topk_prob=renormalize)
    router = Qwen2MoeTopKRouter(config)
    torch.nn.init.normal_(router.weight, generator=torch.Generator().manual_seed(0))
    x = torch.randn(9, 16, generator=torch.Generator().manual_seed(1))
    _, hf_weights, hf_experts = router(x)
    routing = route_top_k(x @ router.weight.T, 3, renormalize)
    assert torch.equal(routing.expert_ids, hf_experts)
    torch.testing.assert_close(routing.weights, hf_weights)
    if renormalize:
        torch.testing.assert_close(routing.weights.sum(-1), torch.ones(9))


def stack_experts(path, num_experts):
    """Rewrite a per-expert checkpoint in transformers 5's stacked expert layout."""
    tensors = load_file(path / "model.safetensors")
    layers = {name.split(".experts.")[0] for name in tensors if ".experts." in name}
    for layer in layers:
        def take(expert, proj):
            return tensors.pop(f"{layer}.experts.{expert}.{proj}.weight")
        tensors[f"{layer}.experts.gate_up_proj"] = torch.stack(
            [torch.cat([take(e, "gate_proj"), take(e, "up_proj")]) for e in range(num_experts)])
        tensors[f"{layer}.experts.down_proj"] = torch.stack(
            [take(e, "down_proj") for e in range(num_experts)])
    save_file(tensors, path / "model.safetensors", metadata={"format": "pt"})


def test_stacked_expert_checkpoint_loads_the_same(tmp_path):
    path = make_tiny_qwen2_moe(tmp_path / "moe")
    expected = generate(path)
    stack_experts(path, num_experts=8)
    assert generate(path) == expected


def edit_checkpoint(path, edit):
    tensors = load_file(path / "model.safetensors")
    edit(tensors)
    save_file(tensors, path / "model.safetensors", metadata={"format": "pt"})


@pytest.mark.parametrize("removed,named", [
    ("model.layers.2.mlp.experts.5.up_proj.weight", None),
    ("model.layers.0.mlp.shared_expert.down_proj.weight", None),
    ("model.layers.0.mlp.shared_expert_gate.weight", None),
    ("model.layers.2.mlp.gate.weight", None),
    ("model.layers.1.self_attn.k_proj.bias", None),
    ("model.layers.2.mlp.experts.", "model.layers.2.mlp.experts.gate_up_proj"),
], ids=["one-expert", "shared-expert", "shared-gate", "router", "k-bias", "all-experts"])
def test_missing_tensor_is_named(tmp_path, removed, named):
    """A checkpoint without a tensor the model needs is refused, naming it."""
    path = make_tiny_qwen2_moe(tmp_path / "moe")

    def remove(tensors):
        for name in [name for name in tensors if name.startswith(removed)]:
            del tensors[name]

    edit_checkpoint(path, remove)
    message = f"checkpoint has no tensor '{named or removed}'"
    with pytest.raises(ValueError, match=re.escape(message)):
        LLM(model=str(path), dtype="float32")


def test_expert_beyond_num_experts_is_refused(tmp_path):
    path = make_tiny_qwen2_moe(tmp_path / "moe")
    name = "model.layers.0.mlp.experts.8.down_proj.weight"
    edit_checkpoint(path, lambda t: t.__setitem__(
        name, t["model.layers.0.mlp.experts.0.down_proj.weight"].clone()))
    with pytest.raises(ValueError, match=r"experts\.8\.down_proj.*num_experts=8"):
        LLM(model=str(path), dtype="float32")


def test_wrong_expert_shape_is_refused(tmp_path):
    path = make_tiny_qwen2_moe(tmp_path / "moe")
    name = "model.layers.0.mlp.experts.1.gate_proj.weight"
    edit_checkpoint(path, lambda t: t.__setitem__(name, torch.zeros(31, 64)))
    with pytest.raises(ValueError, match=r"experts\.1\.gate_proj\.weight.*\(31, 64\)"):
        LLM(model=str(path), dtype="float32")


def test_unsupported_activation_is_refused(tmp_path):
    path = make_tiny_qwen2_moe(tmp_path / "moe")
    config = json.loads((path / "config.json").read_text())
    config["hidden_act"] = "gelu"
    (path / "config.json").write_text(json.dumps(config))
    with pytest.raises(ValueError, match="hidden_act='gelu'"):
        LLM(model=str(path), dtype="float32")


def test_dummy_weights_and_prefix_cache(tmp_path):
    """Dummy weights fill the stacked experts; a prefix-cache hit changes nothing."""
    path = make_tiny_qwen2_moe(tmp_path / "moe")
    (path / "model.safetensors").unlink()
    llm = LLM(model=str(path), dtype="float32", load_format="dummy", block_size=8)
    params = SamplingParams(temperature=0, max_tokens=8)
    first = llm.generate([{"prompt_token_ids": PROMPTS[1]}], params)[0].outputs[0].token_ids
    again = llm.generate([{"prompt_token_ids": PROMPTS[1]}], params)[0].outputs[0].token_ids
    assert first == again and len(first) == 8
    experts = llm.engine.core.runner.model.model.layers[0].mlp.experts.gate_up_proj
    assert 0.018 < experts.std().item() < 0.022  # the dummy loader's N(0, 0.02)


def test_greedy_matches_hf_through_the_triton_kernel(tmp_path, monkeypatch):
    """The whole engine with the fused kernel (interpreted on the CPU) in every MoE layer."""
    import os

    if not torch.cuda.is_available() and os.environ.get("TRITON_INTERPRET") != "1":
        pytest.skip("needs CUDA or TRITON_INTERPRET=1")
    from kvloom.plugins.models.layers import fused_moe, moe

    calls = []
    original = fused_moe.fused_experts
    monkeypatch.setattr(fused_moe, "fused_experts",
                        lambda x, *args: calls.append(x.shape[0]) or original(x, *args))
    monkeypatch.setattr(moe.FusedExperts, "triton_on_cpu", True)
    path = make_tiny_qwen2_moe(tmp_path / "moe", norm_topk_prob=True)
    assert generate(path) == hf_greedy_generate(path, PROMPTS, 24)
    assert max(calls) > 1 and min(calls) >= 1
