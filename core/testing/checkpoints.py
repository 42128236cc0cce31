"""Tiny random Hugging Face checkpoints, made locally (nothing is downloaded).

Used by the test suite, the conformance suite and the README's first command::

    python -m kvloom.testing.checkpoints /tmp/kvloom-tiny-qwen2

The embeddings and lm_head are drawn from N(0, 1) rather than HF's small
default init: near-uniform logits would make greedy choices ties that flip
between implementations, so comparisons with transformers would mean nothing.
"""

from __future__ import annotations

import argparse
from dataclasses import asdict, dataclass
from pathlib import Path

CHAT_TEMPLATE = (
    "{% for message in messages %}<|im_start|>{{ message['role'] }}\n"
    "{{ message['content'] }}<|im_end|>\n{% endfor %}"
    "{% if add_generation_prompt %}<|im_start|>assistant\n{% endif %}"
)
SPECIAL_TOKENS = ["<|endoftext|>", "<|im_start|>", "<|im_end|>"]
_CORPUS = (
    "The quick brown fox jumps over the lazy dog. Paged attention keeps the KV cache in "
    "blocks. Continuous batching mixes prefill and decode. Hello, my name is kvloom and I "
    "generate text one token at a time. 0123456789 + - * / = ( ) [ ] { } < > ! ? , . ; :"
)


@dataclass
class TinyQwen2Spec:
    """Shape of a tiny Qwen2 checkpoint."""

    vocab_size: int = 384
    hidden_size: int = 64
    intermediate_size: int = 128
    num_hidden_layers: int = 2
    num_attention_heads: int = 4
    num_key_value_heads: int = 2
    head_dim: int | None = None
    tie_word_embeddings: bool = False
    max_position_embeddings: int = 512
    rope_theta: float = 10000.0
    seed: int = 0


def build_tokenizer(vocab_size: int):
    """A byte-level BPE tokenizer trained on a tiny corpus, with a ChatML template."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
    from transformers import PreTrainedTokenizerFast

    tokenizer = Tokenizer(models.BPE())
    tokenizer.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tokenizer.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(vocab_size=vocab_size, special_tokens=SPECIAL_TOKENS,
                                  initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
                                  show_progress=False)
    tokenizer.train_from_iterator([_CORPUS] * 4, trainer)
    wrapped = PreTrainedTokenizerFast(tokenizer_object=tokenizer, eos_token="<|endoftext|>",
                                      pad_token="<|endoftext|>")
    wrapped.chat_template = CHAT_TEMPLATE
    return wrapped


def make_tiny_qwen2(path: str | Path, spec: TinyQwen2Spec | None = None,
                    num_shards: int = 1) -> Path:
    """Write config.json, tokenizer files and safetensors weights to ``path``."""
    import torch
    from transformers import Qwen2Config, Qwen2ForCausalLM

    spec = spec or TinyQwen2Spec()
    path = Path(path)
    path.mkdir(parents=True, exist_ok=True)
    tokenizer = build_tokenizer(spec.vocab_size)
    fields = {k: v for k, v in asdict(spec).items() if k != "seed" and v is not None}
    config = Qwen2Config(**fields, rms_norm_eps=1e-6, eos_token_id=tokenizer.eos_token_id,
                         bos_token_id=tokenizer.eos_token_id, architectures=["Qwen2ForCausalLM"])
    torch.manual_seed(spec.seed)
    model = Qwen2ForCausalLM(config).float()
    _spread_logits(model, spec.seed)
    shard_size = None if num_shards == 1 else _shard_size(model, num_shards)
    save_kwargs = {"max_shard_size": shard_size} if shard_size else {}
    model.save_pretrained(path, **save_kwargs)
    tokenizer.save_pretrained(path)
    return path


def _spread_logits(model, seed: int) -> None:
    import torch

    generator = torch.Generator().manual_seed(seed + 1)
    with torch.no_grad():
        for param in model.parameters():
            if param.dim() > 1:
                param.normal_(0.0, 0.1, generator=generator)
        embed = model.get_input_embeddings().weight
        embed.normal_(0.0, 1.0, generator=generator)
        head = model.get_output_embeddings().weight
        if head.data_ptr() != embed.data_ptr():
            head.normal_(0.0, 1.0, generator=generator)


def _shard_size(model, num_shards: int) -> str:
    total = sum(p.numel() * p.element_size() for p in model.parameters())
    return f"{max(total // num_shards, 1024) // 1024 + 1}KB"


def main() -> None:
    parser = argparse.ArgumentParser(description="write a tiny random Qwen2 checkpoint")
    parser.add_argument("path")
    parser.add_argument("--seed", type=int, default=0)
    args = parser.parse_args()
    print(make_tiny_qwen2(args.path, TinyQwen2Spec(seed=args.seed)))


if __name__ == "__main__":
    main()
