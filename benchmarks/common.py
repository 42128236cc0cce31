"""Shared pieces of the benchmarks: model configs and workloads (docs/benchmarks.md describes them)."""

from __future__ import annotations

import json
import random
import tempfile
from pathlib import Path

_COMMON = dict(rope_theta=1000000.0, rms_norm_eps=1e-6, max_position_embeddings=32768,
               torch_dtype="bfloat16", hidden_act="silu")

MODEL_CONFIGS = {
    "qwen2-0.5b": dict(_COMMON, architectures=["Qwen2ForCausalLM"], model_type="qwen2",
                       vocab_size=151936, hidden_size=896, intermediate_size=4864,
                       num_hidden_layers=24, num_attention_heads=14, num_key_value_heads=2,
                       tie_word_embeddings=True),
    "qwen2-7b": dict(_COMMON, architectures=["Qwen2ForCausalLM"], model_type="qwen2",
                     vocab_size=152064, hidden_size=3584, intermediate_size=18944,
                     num_hidden_layers=28, num_attention_heads=28, num_key_value_heads=4,
                     tie_word_embeddings=False),
    "qwen1.5-moe-a2.7b": dict(_COMMON, architectures=["Qwen2MoeForCausalLM"],
                              model_type="qwen2_moe", vocab_size=151936, hidden_size=2048,
                              intermediate_size=5632, moe_intermediate_size=1408,
                              shared_expert_intermediate_size=5632, num_experts=60,
                              num_experts_per_tok=4, norm_topk_prob=False,
                              decoder_sparse_step=1, mlp_only_layers=[],
                              num_hidden_layers=24, num_attention_heads=16,
                              num_key_value_heads=16, tie_word_embeddings=False),
}

# Physical ceilings of the throughput workload (out tok/s), as docs/benchmarks.md gives them.
CEILINGS = {("qwen2-7b", "H200"): 17300, ("qwen2-7b", "H100"): 13600,
            ("qwen2-0.5b", "H200"): 175000}


def write_model_config(name: str) -> Path:
    """A directory with just config.json, for ``load_format: dummy``."""
    path = Path(tempfile.mkdtemp(prefix=f"kvloom-{name}-"))
    (path / "config.json").write_text(json.dumps(MODEL_CONFIGS[name], indent=2))
    return path


def throughput_workload(num_prompts: int = 256, max_input_len: int = 1024,
                        max_output_len: int = 1024, seed: int = 0):
    """nano-vllm's bench.py workload: 142,827 prompt and 133,966 output tokens for 256."""
    rng = random.Random(seed)
    prompts = [[rng.randint(0, 10000) for _ in range(rng.randint(100, max_input_len))]
               for _ in range(num_prompts)]
    output_lens = [rng.randint(100, max_output_len) for _ in range(num_prompts)]
    return prompts, output_lens


def device_short_name() -> str:
    import torch

    name = torch.cuda.get_device_name() if torch.cuda.is_available() else "cpu"
    for short in ("H200", "H100", "A100"):
        if short in name:
            return short
    return name
