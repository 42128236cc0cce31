"""Loads HF checkpoints: config.json, tokenizer files and *.safetensors (sharded too)."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any, Iterator

import torch

from kvloom.hookspecs import hookimpl
from kvloom.interfaces.loader import ModelLoader

KVLOOM_PLUGIN_API = ">=1.0,<2"  # the kvloom plugin API versions this module supports

INDEX_FILE = "model.safetensors.index.json"


@hookimpl
def register_model_loaders(register):
    register("safetensors", SafetensorsLoader, auto=True, priority=10)


class SafetensorsLoader(ModelLoader):
    name = "safetensors"

    def validate(self, model_config: Any) -> list[str]:
        path = Path(model_config.model)
        if not path.is_dir():
            return [f"{model_config.model!r} is not a local directory"]
        if not checkpoint_files(path):
            return [f"no *.safetensors files in {path}"]
        return []

    def load_weights(self, model: torch.nn.Module, model_config: Any) -> None:
        load_checkpoint_dir(model, Path(model_config.model))


def load_checkpoint_dir(model: torch.nn.Module, path: Path) -> None:
    """Load every tensor of an HF safetensors checkpoint; unused tensors are an error."""
    files = checkpoint_files(path)
    names = set()

    def tensors() -> Iterator[tuple[str, torch.Tensor]]:
        from safetensors import safe_open

        for file in files:
            with safe_open(str(file), framework="pt", device="cpu") as reader:
                for name in reader.keys():
                    names.add(name)
                    yield name, reader.get_tensor(name)

    consumed = model.load_weights(tensors())
    unused = sorted(names - consumed)
    if unused:
        shown = ", ".join(unused[:8]) + (" ..." if len(unused) > 8 else "")
        raise ValueError(f"{len(unused)} checkpoint tensor(s) in {path} "
                         f"are not used by {type(model).__name__}: {shown}")


def checkpoint_files(path: Path) -> list[Path]:
    """The safetensors files of a checkpoint directory, via the index when there is one."""
    index = path / INDEX_FILE
    if index.exists():
        weight_map = json.loads(index.read_text())["weight_map"]
        return [path / name for name in sorted(set(weight_map.values()))]
    return sorted(path.glob("*.safetensors"))
