"""Tensor parallelism in the model layers: Qwen2, Llama and Qwen2-MoE split over 2 and 4
CPU processes (gloo) compute the logits of one process, through a paged KV cache.

Each spawned group runs several models, since starting the processes (importing torch
and transformers) costs more than the tiny models. The sharded model and the TP=1
reference are built in every rank from the same checkpoint files; a step's logits must
agree to float32 rounding (the row-parallel sums run in a different order) and give
the same argmax.
"""

from __future__ import annotations

import importlib
import re
from dataclasses import dataclass
from datetime import timedelta
from pathlib import Path
from types import SimpleNamespace

import pytest
import torch

from kvloom.testing.checkpoints import (TinyQwen2Spec, make_tiny_llama, make_tiny_qwen2,
                                        make_tiny_qwen2_moe)

BLOCK_SIZE = 8
BLOCKS_PER_SEQUENCE = 4
QWEN2 = "kvloom.plugins.models.qwen2:Qwen2ForCausalLM"
LLAMA = "kvloom.plugins.models.llama:LlamaForCausalLM"
QWEN2_MOE = "kvloom.plugins.models.qwen2_moe:Qwen2MoeForCausalLM"


@dataclass(frozen=True)
class Case:
    """One model to check in every rank of a spawned group."""

    model: str             # "module:class"
    checkpoint: str
    aux_layers: tuple[int, ...] = ()  # EAGLE-3's aux hidden states, checked too


def randomize_biases(path: Path) -> Path:
    """HF initialises biases to zero, which would hide a bias added on every rank (or
    on none): draw them at random."""
    from safetensors.torch import load_file, save_file

    file = path / "model.safetensors"
    tensors = load_file(file)
    generator = torch.Generator().manual_seed(2)
    for name, tensor in tensors.items():
        if name.endswith(".bias"):
            tensors[name] = torch.randn(tensor.shape, generator=generator)
    save_file(tensors, file, metadata={"format": "pt"})
    return path


@pytest.fixture(scope="module")
def checkpoints(tmp_path_factory):
    """Shapes whose heads and MLPs split over 4 ranks; vocabularies that do not (385),
    so the lm_head and embedding pad their slices."""
    root = tmp_path_factory.mktemp("tp")
    return {
        "qwen2-tied": randomize_biases(make_tiny_qwen2(root / "qwen2", TinyQwen2Spec(
            vocab_size=385, tie_word_embeddings=True))),
        "llama-bias": randomize_biases(make_tiny_llama(
            root / "llama", attention_bias=True, num_key_value_heads=4)),
        "qwen2-moe": randomize_biases(make_tiny_qwen2_moe(root / "moe", vocab_size=385)),
    }


def run_ranks(world_size: int, rendezvous: Path, cases: list[Case]) -> None:
    """Every rank checks every case; a failing rank fails the test (its traceback is
    re-raised here) and the others are terminated rather than left in a collective."""
    import torch.multiprocessing as mp

    mp.spawn(_rank_main, args=(world_size, str(rendezvous), cases), nprocs=world_size,
             join=True)


def _rank_main(rank: int, world_size: int, rendezvous: str, cases: list[Case]) -> None:
    import os
    import sys

    import torch.distributed as dist

    from kvloom.distributed.group import TorchDistributedGroup

    torch.set_num_threads(1)
    dist.init_process_group("gloo", init_method=f"file://{rendezvous}", rank=rank,
                            world_size=world_size, timeout=timedelta(seconds=120))
    try:
        group = TorchDistributedGroup(rank, world_size)
        for case in cases:
            check_case(case, group)
        dist.barrier()  # no rank leaves while another still talks to it
    finally:
        dist.destroy_process_group()
    # Every check passed. Skip the interpreter's teardown: gloo's transport threads
    # met there at times abort the process ("terminate called without an active
    # exception"), seen about once in five runs on a loaded machine.
    sys.stdout.flush()
    sys.stderr.flush()
    os._exit(0)


def check_case(case: Case, group) -> None:
    from transformers import AutoConfig

    from kvloom.interfaces.parallel import SingleRank

    hf_config = AutoConfig.from_pretrained(case.checkpoint)
    reference = build_model(case, hf_config, SingleRank())
    sharded = build_model(case, hf_config, group)
    check_attention_spec(sharded, hf_config, group)
    check_kv_rows(sharded, reference, hf_config, group)
    expected, got = run_steps(reference), run_steps(sharded)
    for step, ((want, want_aux), (have, have_aux)) in enumerate(zip(expected, got)):
        where = f"{case.model} tp={group.size} rank {group.rank} step {step}"
        assert have.shape == want.shape, where
        assert_close(have, want, where)
        assert torch.equal(have.argmax(-1), want.argmax(-1)), where
        assert len(have_aux) == len(want_aux) == len(case.aux_layers), where
        for layer, (a, b) in zip(case.aux_layers, zip(have_aux, want_aux)):
            assert_close(a, b, f"{where} aux hidden state of layer {layer}")


def assert_close(actual: torch.Tensor, expected: torch.Tensor, where: str) -> None:
    """Float32 agreement, relative to the tensor's scale (logits reach ~10s)."""
    scale = expected.abs().max().item()
    torch.testing.assert_close(actual, expected, rtol=1e-5, atol=1e-5 * scale, msg=lambda m:
                               f"{where}: {m}")


def build_model(case: Case, hf_config, parallel):
    from kvloom.interfaces.model import ModelContext
    from kvloom.plugins.attention.torch_reference import TorchReferenceBackend
    from kvloom.plugins.loaders.safetensors_loader import load_checkpoint_dir

    module, name = case.model.split(":")
    model_cls = getattr(importlib.import_module(module), name)
    context = ModelContext(TorchReferenceBackend(), torch.float32, torch.device("cpu"),
                           BLOCK_SIZE, parallel)
    model = model_cls(hf_config, context)
    load_checkpoint_dir(model, Path(case.checkpoint))  # every tensor used, none missing
    if case.aux_layers:
        model.set_aux_hidden_state_layers(case.aux_layers)
    return model.eval()


def check_attention_spec(model, hf_config, group) -> None:
    """The KV cache is sized per rank from this: the rank's heads only."""
    spec = model.attention_spec()
    assert spec.num_heads == hf_config.num_attention_heads // group.size
    assert spec.num_kv_heads == max(1, hf_config.num_key_value_heads // group.size)


def check_kv_rows(sharded, reference, hf_config, group) -> None:
    """A rank's k rows are those of the KV heads its query heads read (a replicated
    head when there are fewer KV heads than ranks)."""
    mine, full = sharded.model.layers[0].self_attn, reference.model.layers[0].self_attn
    head = mine.head_size
    first = group.rank * hf_config.num_key_value_heads // group.size
    k_rows = full.qkv_proj.weight[full.q_size + first * head:][:mine.kv_size]
    assert torch.equal(mine.qkv_proj.weight[mine.q_size:mine.q_size + mine.kv_size], k_rows)


def run_steps(model) -> list[tuple[torch.Tensor, tuple[torch.Tensor, ...]]]:
    """A prefill of two prompts, then a step with both decoding and a third prompt's
    first chunk; returns each step's logits (every row) and aux hidden states."""
    from kvloom.plugins.attention.torch_reference import TorchReferenceBackend

    backend = TorchReferenceBackend()
    spec = model.attention_spec()
    num_blocks = 1 + 3 * BLOCKS_PER_SEQUENCE
    caches = [torch.zeros(backend.kv_cache_shape(num_blocks, spec))
              for _ in range(model.num_attention_layers())]
    generator = torch.Generator().manual_seed(0)
    vocab_size = model.config.vocab_size
    outputs = []
    # (sequence, tokens already cached, new tokens) per segment
    for step in ([(0, 0, 7), (1, 0, 13)], [(0, 7, 1), (1, 13, 1), (2, 0, 5)]):
        ids = torch.randint(vocab_size, (sum(n for _, _, n in step),), generator=generator)
        positions, inputs = step_layout(step)
        with torch.inference_mode():
            hidden = model(ids, positions, caches, backend.build_metadata(inputs))
            hidden, aux = hidden if isinstance(hidden, tuple) else (hidden, ())
            outputs.append((model.compute_logits(hidden), tuple(aux)))
    return outputs


def step_layout(segments: list[tuple[int, int, int]]):
    """Positions and AttentionInputs of segments (sequence, cached, new); sequence i
    owns blocks 1 + i * BLOCKS_PER_SEQUENCE onwards (block 0 is padding)."""
    from kvloom.interfaces.attention import AttentionInputs

    positions, slots, starts, seq_lens, tables = [], [], [0], [], []
    for sequence, cached, new in segments:
        blocks = [1 + sequence * BLOCKS_PER_SEQUENCE + b for b in range(BLOCKS_PER_SEQUENCE)]
        for position in range(cached, cached + new):
            positions.append(position)
            slots.append(blocks[position // BLOCK_SIZE] * BLOCK_SIZE + position % BLOCK_SIZE)
        starts.append(starts[-1] + new)
        seq_lens.append(cached + new)
        tables.append(blocks)
    query_start = torch.tensor(starts, dtype=torch.int32)
    lens = torch.tensor(seq_lens, dtype=torch.int32)
    inputs = AttentionInputs(
        query_start_loc=query_start, seq_lens=lens,
        block_tables=torch.tensor(tables, dtype=torch.int32),
        slot_mapping=torch.tensor(slots, dtype=torch.int64),
        query_start_loc_cpu=query_start, seq_lens_cpu=lens,
        max_query_len=max(n for _, _, n in segments), max_seq_len=max(seq_lens),
        num_decode_tokens=sum(1 for _, _, n in segments if n == 1))
    return torch.tensor(positions, dtype=torch.int64), inputs


def test_tp2_logits_equal_tp1(checkpoints, tmp_path):
    """Qwen2 (qkv bias, tied and padded vocabulary, EAGLE-3 aux states), Llama (o_proj
    bias added once after the reduce) and Qwen2-MoE (experts and shared expert split,
    one reduce) over 2 ranks."""
    run_ranks(2, tmp_path / "rendezvous", [
        Case(QWEN2, str(checkpoints["qwen2-tied"]), aux_layers=(0, 1)),
        Case(LLAMA, str(checkpoints["llama-bias"])),
        Case(QWEN2_MOE, str(checkpoints["qwen2-moe"])),
    ])


def test_tp4_replicates_kv_heads(checkpoints, tmp_path):
    """4 ranks over 2 KV heads: each KV head lives on two ranks."""
    run_ranks(4, tmp_path / "rendezvous", [
        Case(QWEN2, str(checkpoints["qwen2-tied"])),
        Case(QWEN2_MOE, str(checkpoints["qwen2-moe"])),
    ])


# --- in one process: what needs no collective --------------------------------------------


def rank_of(rank: int, size: int):
    """A group member for building and loading only (no forward, no collectives)."""
    return SimpleNamespace(rank=rank, size=size)


def qwen2_config(**overrides):
    from transformers import Qwen2Config

    settings = dict(vocab_size=64, hidden_size=32, intermediate_size=64, num_hidden_layers=1,
                    num_attention_heads=4, num_key_value_heads=2)
    return Qwen2Config(**dict(settings, **overrides))


def moe_config(**overrides):
    from transformers import Qwen2MoeConfig

    settings = dict(vocab_size=64, hidden_size=32, intermediate_size=64,
                    moe_intermediate_size=16, shared_expert_intermediate_size=32, num_experts=4,
                    num_experts_per_tok=2, num_hidden_layers=2, num_attention_heads=4,
                    num_key_value_heads=2, mlp_only_layers=[1])
    return Qwen2MoeConfig(**dict(settings, **overrides))


def build(model_cls, hf_config, parallel):
    from kvloom.interfaces.model import ModelContext
    from kvloom.plugins.attention.torch_reference import TorchReferenceBackend

    context = ModelContext(TorchReferenceBackend(), torch.float32, torch.device("cpu"),
                           BLOCK_SIZE, parallel)
    return model_cls(hf_config, context)


@pytest.mark.parametrize("make_config, size, message", [
    (lambda: qwen2_config(), 3, "tensor_parallel_size=3 must divide num_attention_heads=4"),
    (lambda: qwen2_config(num_attention_heads=6, num_key_value_heads=3), 2,
     "tensor_parallel_size=2 must divide num_key_value_heads=3 or be a multiple of it"),
    (lambda: qwen2_config(num_attention_heads=8, num_key_value_heads=2), 8, None),
    (lambda: qwen2_config(intermediate_size=66), 4,
     "tensor_parallel_size=4 must divide intermediate_size=66"),
    (lambda: moe_config(moe_intermediate_size=18), 4,
     "tensor_parallel_size=4 must divide moe_intermediate_size=18"),
    (lambda: moe_config(shared_expert_intermediate_size=30), 4,
     "tensor_parallel_size=4 must divide shared_expert_intermediate_size=30"),
    (lambda: moe_config(intermediate_size=66, mlp_only_layers=[]), 4, None),
], ids=["heads", "kv-heads", "kv-heads-replicated", "intermediate", "moe-intermediate",
        "shared-expert", "no-dense-layer"])
def test_tensor_parallel_size_that_does_not_split_is_refused(make_config, size, message):
    from kvloom.plugins.models.qwen2 import Qwen2ForCausalLM
    from kvloom.plugins.models.qwen2_moe import Qwen2MoeForCausalLM

    hf_config = make_config()
    model_cls = Qwen2MoeForCausalLM if hf_config.model_type == "qwen2_moe" else Qwen2ForCausalLM
    if message is None:
        build(model_cls, hf_config, rank_of(size - 1, size))  # splits: builds
        return
    with pytest.raises(ValueError, match=re.escape(message)):
        build(model_cls, hf_config, rank_of(0, size))


def full_tensors(hf_config, seed: int = 0) -> dict[str, torch.Tensor]:
    """The HF model's tensors (random) in transformers 5's memory layout: q/k/v and
    gate/up separate, experts stacked (``experts.gate_up_proj``)."""
    from transformers import AutoModelForCausalLM

    torch.manual_seed(seed)
    model = AutoModelForCausalLM.from_config(hf_config).float()
    return {name: tensor.detach().clone() for name, tensor in model.state_dict().items()}


def per_expert(tensors: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """Experts one by one, as HF checkpoints on disk store them."""
    out = {}
    for name, tensor in tensors.items():
        prefix, _, proj = name.rpartition(".")
        if not prefix.endswith(".experts"):
            out[name] = tensor
            continue
        for expert, weight in enumerate(tensor):
            parts = (zip(("gate_proj", "up_proj"), weight.chunk(2)) if proj == "gate_up_proj"
                     else [("down_proj", weight)])
            out.update({f"{prefix}.{expert}.{part}.weight": w for part, w in parts})
    return out


def fuse_checkpoint(tensors: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """The same weights with q/k/v and gate/up fused as well (qkv_proj, gate_up_proj)."""
    fused = dict(tensors)
    for name in [n for n in tensors if ".q_proj." in n]:
        parts = [fused.pop(name.replace("q_proj", p)) for p in ("q_proj", "k_proj", "v_proj")]
        fused[name.replace("q_proj", "qkv_proj")] = torch.cat(parts)
    for name in [n for n in tensors if ".gate_proj." in n]:
        parts = [fused.pop(name.replace("gate_proj", p)) for p in ("gate_proj", "up_proj")]
        fused[name.replace("gate_proj", "gate_up_proj")] = torch.cat(parts)
    return fused


@pytest.mark.parametrize("model_name", ["qwen2", "qwen2_moe"])
def test_fused_checkpoints_shard_like_split_ones(model_name):
    """A rank takes the same slice from fused/stacked tensors as from per-part ones,
    including replicated KV heads (tp=4 over 2) and padded vocabulary rows (zeros)."""
    from kvloom.plugins.models.qwen2 import Qwen2ForCausalLM
    from kvloom.plugins.models.qwen2_moe import Qwen2MoeForCausalLM

    model_cls, hf_config = ((Qwen2ForCausalLM, qwen2_config(vocab_size=62))
                            if model_name == "qwen2" else
                            (Qwen2MoeForCausalLM, moe_config(vocab_size=62)))
    tensors = full_tensors(hf_config)
    for rank in range(4):
        split = build(model_cls, hf_config, rank_of(rank, 4))
        fused = build(model_cls, hf_config, rank_of(rank, 4))
        split.load_weights(iter(per_expert(tensors).items()))
        fused.load_weights(iter(fuse_checkpoint(tensors).items()))
        for (name, a), (_, b) in zip(split.named_parameters(), fused.named_parameters()):
            assert torch.equal(a, b), f"rank {rank}: {name}"
        embed = split.model.embed_tokens.weight
        assert embed.shape[0] == 16  # 62 padded to 64, over 4 ranks
        real = min(16, 62 - 16 * rank)
        assert torch.equal(embed[:real], tensors["model.embed_tokens.weight"][16 * rank:][:real])
        assert not embed[real:].any()


def test_missing_tensor_is_still_refused_per_rank():
    from kvloom.plugins.models.qwen2_moe import Qwen2MoeForCausalLM

    hf_config = moe_config()
    tensors = full_tensors(hf_config)
    del tensors["model.layers.0.mlp.shared_expert.up_proj.weight"]
    model = build(Qwen2MoeForCausalLM, hf_config, rank_of(1, 2))
    with pytest.raises(ValueError, match=re.escape(
            "checkpoint has no tensor 'model.layers.0.mlp.shared_expert.up_proj.weight'")):
        model.load_weights(iter(tensors.items()))


def test_wrong_full_shape_is_named():
    """A rank checks the checkpoint tensor's full shape, not just its own slice."""
    from kvloom.plugins.models.qwen2 import Qwen2ForCausalLM

    hf_config = qwen2_config()
    tensors = full_tensors(hf_config)
    tensors["model.layers.0.mlp.down_proj.weight"] = torch.zeros(32, 68)
    model = build(Qwen2ForCausalLM, hf_config, rank_of(0, 2))
    with pytest.raises(ValueError, match=re.escape(
            "'model.layers.0.mlp.down_proj.weight' has shape (32, 68), expected (32, 64)")):
        model.load_weights(iter(tensors.items()))


def test_single_rank_keeps_parameter_names_and_shapes():
    """TP=1 is today's model: HF-fused names, full shapes, no padding."""
    from kvloom.interfaces.parallel import SingleRank
    from kvloom.plugins.models.qwen2 import Qwen2ForCausalLM

    model = build(Qwen2ForCausalLM, qwen2_config(vocab_size=62), SingleRank())
    shapes = {name: tuple(p.shape) for name, p in model.named_parameters()}
    assert shapes["model.embed_tokens.weight"] == (62, 32)
    assert shapes["lm_head.weight"] == (62, 32)
    assert shapes["model.layers.0.self_attn.qkv_proj.weight"] == (4 * 8 + 2 * 2 * 8, 32)
    assert shapes["model.layers.0.self_attn.qkv_proj.bias"] == (64,)
    assert shapes["model.layers.0.self_attn.o_proj.weight"] == (32, 32)
    assert shapes["model.layers.0.mlp.gate_up_proj.weight"] == (128, 32)
    assert shapes["model.layers.0.mlp.down_proj.weight"] == (32, 64)
