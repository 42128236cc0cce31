"""Conformance: a model architecture equals Hugging Face transformers on a tiny random
checkpoint (float32: identical greedy tokens, log-probabilities to 1e-4), and its
loader consumes every tensor of the checkpoint.

The tiny config is the registration's ``tiny_config`` metadata (a callable returning a
transformers ``PretrainedConfig``) or, for an architecture transformers implements,
that class's config at the sizes below. Architectures with neither are skipped.
"""

from __future__ import annotations

import random

import pytest
import torch

TINY_SIZES = dict(
    vocab_size=384, hidden_size=64, intermediate_size=128, num_hidden_layers=2,
    num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=512,
    rms_norm_eps=1e-6,
    # read only by mixture-of-experts configs
    num_experts=8, num_local_experts=8, num_experts_per_tok=2, moe_intermediate_size=32,
    shared_expert_intermediate_size=64)
MAX_TOKENS = 12
NUM_LOGPROBS = 5


def tiny_config(model_component):
    """The registration's tiny config, else transformers' config class at tiny sizes."""
    make = model_component.metadata.get("tiny_config")
    if make is not None:
        return make()
    import transformers

    hf_class = getattr(transformers, model_component.name, None)
    if hf_class is None:
        pytest.skip(f"transformers has no {model_component.name}; register the model with "
                    "tiny_config=<callable returning a PretrainedConfig> to check it")
    return hf_class.config_class(**TINY_SIZES, architectures=[model_component.name])


@pytest.fixture
def checkpoint(model_component, tmp_path_factory):
    from kvloom.testing.checkpoints import build_tokenizer, save_random_checkpoint

    config = tiny_config(model_component)
    tokenizer = build_tokenizer(config.vocab_size)
    config.eos_token_id = config.bos_token_id = tokenizer.eos_token_id
    path = tmp_path_factory.mktemp(model_component.name)
    return save_random_checkpoint(path, config, tokenizer, seed=0)


@pytest.fixture
def llm(checkpoint):
    from kvloom import LLM

    return LLM(str(checkpoint), dtype="float32", max_model_len=128)


def prompts(vocab_size: int) -> list[list[int]]:
    rng = random.Random(0)
    return [[rng.randrange(vocab_size) for _ in range(length)] for length in (3, 17, 40)]


def test_greedy_tokens_match_transformers(checkpoint, llm):
    from kvloom import SamplingParams
    from kvloom.testing.reference import hf_greedy_generate

    batch = prompts(llm.engine.components.hf_config.vocab_size)
    expected = hf_greedy_generate(checkpoint, batch, MAX_TOKENS)
    outputs = llm.generate([{"prompt_token_ids": p} for p in batch],
                           SamplingParams(temperature=0.0, max_tokens=MAX_TOKENS))
    for prompt, output, reference in zip(batch, outputs, expected):
        assert output.outputs[0].token_ids == reference, (
            f"{len(prompt)}-token prompt: kvloom {output.outputs[0].token_ids} != HF {reference}")


def test_logprobs_match_transformers(checkpoint, llm):
    from transformers import AutoModelForCausalLM

    from kvloom import SamplingParams

    batch = prompts(llm.engine.components.hf_config.vocab_size)
    params = SamplingParams(temperature=0.0, max_tokens=6, logprobs=NUM_LOGPROBS,
                            ignore_eos=True)
    outputs = llm.generate([{"prompt_token_ids": p} for p in batch], params)
    reference = AutoModelForCausalLM.from_pretrained(str(checkpoint), dtype=torch.float32)
    for prompt, output in zip(batch, outputs):
        completion = output.outputs[0]
        with torch.no_grad():
            logits = reference(torch.tensor([prompt + completion.token_ids])).logits[0]
        expected = torch.log_softmax(logits[len(prompt) - 1:-1].float(), dim=-1)
        for step, position_logprobs in enumerate(completion.logprobs):
            for token_id, logprob in position_logprobs.items():
                assert abs(logprob.logprob - expected[step, token_id].item()) < 1e-4, (
                    f"{len(prompt)}-token prompt, output {step}, token {token_id}")


def test_every_checkpoint_tensor_is_consumed(model_component, checkpoint,
                                            conformance_registries):
    """Built outside the engine, so this holds whichever loader a user picks (kvloom's
    safetensors loader also refuses unused tensors, but other loaders need not)."""
    from safetensors.torch import load_file
    from transformers import AutoConfig

    from kvloom.interfaces.model import ModelContext

    attention = conformance_registries["attention"]
    if "torch" not in attention.components:
        pytest.skip("needs the built-in 'torch' attention backend to build the model")
    context = ModelContext(attention.create("torch"), torch.float32, torch.device("cpu"), 16)
    model = model_component.factory(AutoConfig.from_pretrained(checkpoint), context)
    tensors = {}
    for shard in sorted(checkpoint.glob("*.safetensors")):
        tensors.update(load_file(shard))
    consumed = model.load_weights(iter(tensors.items()))
    unused = sorted(set(tensors) - set(consumed))
    assert not unused, f"load_weights left checkpoint tensors unused: {unused[:10]}"
