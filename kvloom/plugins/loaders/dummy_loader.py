"""Random weights for any supported HF config (``load_format: dummy``), for speed work."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import torch

from kvloom.hookspecs import hookimpl
from kvloom.interfaces.loader import ModelLoader

KVLOOM_PLUGIN_API = ">=1.0,<2"  # the kvloom plugin API versions this module supports

DUMMY_STD = 0.02  # keeps activations finite through dozens of layers


@hookimpl
def register_model_loaders(register):
    register("dummy", DummyLoader)


class DummyLoader(ModelLoader):
    """Needs only config.json; weights are N(0, 0.02), norm weights 1, biases 0."""

    name = "dummy"

    def validate(self, model_config: Any) -> list[str]:
        if not (Path(model_config.model) / "config.json").exists():
            return [f"no config.json in {model_config.model!r}"]
        return []

    @torch.no_grad()
    def load_weights(self, model: torch.nn.Module, model_config: Any) -> None:
        for name, param in model.named_parameters():
            generator = torch.Generator(device=param.device)
            generator.manual_seed(model_config.seed + _stable_hash(name))
            if "norm" in name:
                param.fill_(1.0)
            elif name.endswith("bias"):
                param.zero_()
            else:
                param.normal_(0.0, DUMMY_STD, generator=generator)


def _stable_hash(text: str) -> int:
    # Python's hash() is salted per process; this one is not.
    return sum((index + 1) * ord(char) for index, char in enumerate(text)) % (1 << 31)
