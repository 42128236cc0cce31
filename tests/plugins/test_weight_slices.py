"""A tensor-parallel rank reads only its slice of each checkpoint tensor: the
safetensors loader hands a model that asks for it (``reads_weight_slices``) unread
tensors, and the parameters come out as from whole tensors."""

from __future__ import annotations

import torch
from safetensors import safe_open

from kvloom.interfaces.model import ModelContext
from kvloom.plugins.attention.torch_reference import TorchReferenceBackend
from kvloom.plugins.loaders.safetensors_loader import (SafetensorsSlice, checkpoint_files,
                                                       load_checkpoint_dir)
from kvloom.plugins.models.qwen2 import Qwen2ForCausalLM
from kvloom.testing.checkpoints import make_tiny_qwen2


class SecondOfTwoRanks:
    """Rank 1 of 2, for building and loading only (no collective runs)."""

    rank, size = 1, 2


def build(path, parallel=None):
    from transformers import AutoConfig

    context = ModelContext(TorchReferenceBackend(), torch.float32, torch.device("cpu"), 16,
                           *([parallel] if parallel is not None else []))
    return Qwen2ForCausalLM(AutoConfig.from_pretrained(path), context)


def test_a_slice_reads_the_rows_asked_for(tmp_path):
    path = make_tiny_qwen2(tmp_path / "tiny")
    (file,) = checkpoint_files(path)
    with safe_open(str(file), framework="pt") as reader:
        name = next(n for n in reader.keys() if n.endswith("q_proj.weight"))
        whole = reader.get_tensor(name)
        lazy = SafetensorsSlice(reader, name)
        assert lazy.shape == whole.shape
        assert torch.equal(lazy.narrow(0, 16, 16), whole.narrow(0, 16, 16))
        assert torch.equal(lazy.narrow(-1, 3, 5), whole.narrow(-1, 3, 5))
        assert torch.equal(lazy.read(), whole)


def test_a_rank_gets_unread_tensors_and_the_same_parameters(tmp_path):
    path = make_tiny_qwen2(tmp_path / "tiny")
    by_slices = build(path, SecondOfTwoRanks())
    received = []
    load = by_slices.load_weights
    by_slices.load_weights = lambda weights: load(
        (received.append(type(tensor)) or (name, tensor)) for name, tensor in weights)
    load_checkpoint_dir(by_slices, path)
    assert received and set(received) == {SafetensorsSlice}

    whole = build(path, SecondOfTwoRanks())
    (file,) = checkpoint_files(path)
    with safe_open(str(file), framework="pt") as reader:
        whole.load_weights([(name, reader.get_tensor(name)) for name in reader.keys()])
    for (name, got), (_, expected) in zip(by_slices.named_parameters(),
                                          whole.named_parameters()):
        assert torch.equal(got, expected), name
