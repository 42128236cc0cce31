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
    from transformers import Qwen2Config

    spec = spec or TinyQwen2Spec()
    tokenizer = build_tokenizer(spec.vocab_size)
    fields = {k: v for k, v in asdict(spec).items() if k != "seed" and v is not None}
    config = Qwen2Config(**fields, rms_norm_eps=1e-6, eos_token_id=tokenizer.eos_token_id,
                         bos_token_id=tokenizer.eos_token_id, architectures=["Qwen2ForCausalLM"])
    return save_random_checkpoint(path, config, tokenizer, spec.seed, num_shards)


# A Qwen1.5-MoE-shaped toy: 8 experts, top 2, a shared expert, one dense layer of three.
TINY_QWEN2_MOE_CONFIG = dict(
    vocab_size=384, hidden_size=64, intermediate_size=96, moe_intermediate_size=32,
    shared_expert_intermediate_size=80, num_experts=8, num_experts_per_tok=2,
    norm_topk_prob=False, decoder_sparse_step=1, mlp_only_layers=[1], num_hidden_layers=3,
    num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=512,
    rope_theta=10000.0)


def make_tiny_qwen2_moe(path: str | Path, seed: int = 0, **config_overrides) -> Path:
    """A tiny random Qwen2-MoE checkpoint (per-expert tensors, as HF saves them)."""
    from transformers import Qwen2MoeConfig

    settings = dict(TINY_QWEN2_MOE_CONFIG, **config_overrides)
    tokenizer = build_tokenizer(settings["vocab_size"])
    config = Qwen2MoeConfig(**settings, rms_norm_eps=1e-6, eos_token_id=tokenizer.eos_token_id,
                            bos_token_id=tokenizer.eos_token_id,
                            architectures=["Qwen2MoeForCausalLM"])
    return save_random_checkpoint(path, config, tokenizer, seed)


def make_tiny_llama(path: str | Path, **overrides) -> Path:
    """A tiny random Llama checkpoint (GQA 4/2 heads unless ``overrides`` say otherwise),
    its embeddings and lm_head spread so greedy choices are far from ties."""
    import torch
    from transformers import LlamaConfig, LlamaForCausalLM

    tokenizer = build_tokenizer(384)
    settings = dict(vocab_size=384, hidden_size=64, intermediate_size=128, num_hidden_layers=2,
                    num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=512,
                    rms_norm_eps=1e-5, eos_token_id=tokenizer.eos_token_id,
                    bos_token_id=tokenizer.eos_token_id, architectures=["LlamaForCausalLM"])
    settings.update(overrides)
    config = LlamaConfig(**settings)
    torch.manual_seed(0)
    model = LlamaForCausalLM(config).float()
    generator = torch.Generator().manual_seed(1)
    with torch.no_grad():
        for param in model.parameters():
            if param.dim() > 1:
                param.normal_(0.0, 0.1, generator=generator)
        model.get_input_embeddings().weight.normal_(0.0, 1.0, generator=generator)
        if not config.tie_word_embeddings:
            model.get_output_embeddings().weight.normal_(0.0, 1.0, generator=generator)
    model.save_pretrained(path)
    tokenizer.save_pretrained(path)
    return Path(path)


def save_random_checkpoint(path: str | Path, config, tokenizer=None, seed: int = 0,
                           num_shards: int = 1) -> Path:
    """Write any transformers causal-LM config's randomly initialised model (float32,
    safetensors, with spread-out logits) and a tokenizer to ``path``.

    Args:
        config: a ``PretrainedConfig`` whose ``model_type`` transformers knows.
        tokenizer: saved alongside; default: :func:`build_tokenizer` for the config's vocabulary.
    """
    import torch
    from transformers import AutoModelForCausalLM

    path = Path(path)
    path.mkdir(parents=True, exist_ok=True)
    if tokenizer is None:
        tokenizer = build_tokenizer(config.vocab_size)
    architectures = list(config.architectures or [])  # save_pretrained overwrites them
    torch.manual_seed(seed)
    model = AutoModelForCausalLM.from_config(config).float()
    _spread_logits(model, seed)
    shard_size = None if num_shards == 1 else _shard_size(model, num_shards)
    model.save_pretrained(path, **({"max_shard_size": shard_size} if shard_size else {}))
    tokenizer.save_pretrained(path)
    if architectures:
        _set_architectures(path, architectures)
    return path


def _set_architectures(path: Path, architectures: list[str]) -> None:
    import json

    config_file = path / "config.json"
    saved = json.loads(config_file.read_text())
    saved["architectures"] = list(architectures)
    config_file.write_text(json.dumps(saved, indent=2))


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


# --- EAGLE draft checkpoints ------------------------------------------------------------

_EAGLE3_CONFIG_KEYS = ("hidden_size", "intermediate_size", "num_attention_heads",
                       "num_key_value_heads", "head_dim", "max_position_embeddings",
                       "rms_norm_eps", "rope_scaling", "vocab_size", "hidden_act")


@dataclass
class TinyEagleSpec:
    """A tiny EAGLE draft checkpoint for a given target, in the published tensor names.

    Attributes:
        version: 1 (EAGLE-1: ``fc`` over [embedding, hidden], ``layers.0.*``, the
            target's architecture) or 3 (EAGLE-3: ``LlamaForCausalLMEagle3``,
            ``midlayer.*``, ``norm``, ``lm_head``, ``d2t``/``t2d``).
        with_embed_tokens: include ``embed_tokens.weight`` (else the target's is shared).
        model_prefix: write every name with a ``model.`` prefix, as some releases do.
        fc_bias: include ``fc.bias``.
        draft_vocab_size: EAGLE-3's reduced vocabulary; None: half the target's.
        aux_layer_ids: EAGLE-3's ``eagle_config.eagle_aux_hidden_state_layer_ids``;
            None leaves them out (the engine's default applies).
        weights: False writes config.json only (for ``load_format: dummy``).
        seed: of the random weights.
    """

    version: int = 1
    with_embed_tokens: bool = False
    model_prefix: bool = False
    fc_bias: bool = False
    draft_vocab_size: int | None = None
    aux_layer_ids: tuple[int, ...] | None = None
    weights: bool = True
    seed: int = 0


def make_eagle_checkpoint(path: str | Path, target_path: str | Path,
                          spec: TinyEagleSpec | None = None) -> Path:
    """Write an EAGLE-1/EAGLE-3 draft for the checkpoint at ``target_path`` to ``path``
    (config.json and model.safetensors)."""
    import json

    spec = spec or TinyEagleSpec()
    path = Path(path)
    path.mkdir(parents=True, exist_ok=True)
    target = json.loads((Path(target_path) / "config.json").read_text())
    config = _eagle1_config(target) if spec.version == 1 else _eagle3_config(target, spec)
    (path / "config.json").write_text(json.dumps(config, indent=2))
    if spec.weights:
        from safetensors.torch import save_file

        tensors = _eagle_tensors(config, target, spec)
        prefix = "model." if spec.model_prefix else ""
        save_file({prefix + name: t.contiguous() for name, t in tensors.items()},
                  str(path / "model.safetensors"))
    return path


def _eagle1_config(target: dict) -> dict:
    config = dict(target, num_hidden_layers=1)
    if "layer_types" in config:
        config["layer_types"] = config["layer_types"][:1]
    return config


def _eagle3_config(target: dict, spec: TinyEagleSpec) -> dict:
    config = {key: target[key] for key in _EAGLE3_CONFIG_KEYS if target.get(key) is not None}
    parameters = target.get("rope_parameters") or {}
    config.update(architectures=["LlamaForCausalLMEagle3"], model_type="llama",
                  num_hidden_layers=1, tie_word_embeddings=False,
                  rope_theta=target.get("rope_theta", parameters.get("rope_theta", 10000.0)),
                  draft_vocab_size=spec.draft_vocab_size or target["vocab_size"] // 2)
    if spec.aux_layer_ids is not None:
        config["eagle_config"] = {"eagle_aux_hidden_state_layer_ids": list(spec.aux_layer_ids)}
    return config


def _eagle_tensors(config: dict, target: dict, spec: TinyEagleSpec) -> dict:
    """Matrices N(0, 0.1), embeddings and lm_head N(0, 1), norm weights near 1 (not
    exactly 1, so a norm applied to the wrong input shows)."""
    import torch

    generator = torch.Generator().manual_seed(spec.seed)
    hidden, vocab = config["hidden_size"], config["vocab_size"]
    heads, kv_heads = config["num_attention_heads"], config["num_key_value_heads"]
    head_dim = config.get("head_dim") or hidden // heads
    eagle3 = spec.version == 3
    qwen2 = target.get("model_type") == "qwen2" and not eagle3
    layer = "midlayer" if eagle3 else "layers.0"
    attention_input = 2 * hidden if eagle3 else hidden
    shapes = {"fc.weight": ((3 if eagle3 else 2) * hidden, hidden)}
    for name, rows in (("q_proj", heads * head_dim), ("k_proj", kv_heads * head_dim),
                       ("v_proj", kv_heads * head_dim)):
        shapes[f"{layer}.self_attn.{name}.weight"] = (attention_input, rows)
        if qwen2:
            shapes[f"{layer}.self_attn.{name}.bias"] = (rows,)
    shapes[f"{layer}.self_attn.o_proj.weight"] = (heads * head_dim, hidden)
    size = config["intermediate_size"]
    shapes.update({f"{layer}.mlp.gate_proj.weight": (hidden, size),
                   f"{layer}.mlp.up_proj.weight": (hidden, size),
                   f"{layer}.mlp.down_proj.weight": (size, hidden)})
    norms = [f"{layer}.post_attention_layernorm.weight"]
    if eagle3:
        norms += [f"{layer}.input_layernorm.weight", f"{layer}.hidden_norm.weight", "norm.weight"]
    tensors = {}
    for name, shape in shapes.items():
        # Sharp attention that outweighs the residual, so a draft depends on which
        # KV it reads (a paging or position bug changes the tokens).
        std = 0.3 if ".self_attn." in name else 0.1
        # (in, out) above reads like the math; nn.Linear stores (out, in).
        tensors[name] = torch.randn(tuple(reversed(shape)), generator=generator) * std
    for name in norms:
        tensors[name] = 1.0 + 0.1 * torch.randn(hidden, generator=generator)
    if spec.fc_bias:
        tensors["fc.bias"] = 0.1 * torch.randn(hidden, generator=generator)
    if spec.with_embed_tokens:
        tensors["embed_tokens.weight"] = torch.randn(vocab, hidden, generator=generator)
    if eagle3:
        tensors.update(_draft_vocabulary(config, generator))
    return tensors


def _draft_vocabulary(config: dict, generator) -> dict:
    """EAGLE-3's lm_head over a random sorted subset of the target vocabulary, with
    ``d2t`` (target id = draft id + d2t[draft id]) and ``t2d`` (membership mask)."""
    import torch

    vocab, draft_vocab = config["vocab_size"], config["draft_vocab_size"]
    chosen = torch.randperm(vocab, generator=generator)[:draft_vocab].sort().values
    t2d = torch.zeros(vocab, dtype=torch.bool)
    t2d[chosen] = True
    return {"lm_head.weight": torch.randn(draft_vocab, config["hidden_size"],
                                          generator=generator),
            "d2t": chosen - torch.arange(draft_vocab), "t2d": t2d}
