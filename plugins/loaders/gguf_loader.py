"""Loads GGUF files (llama.cpp's format): config, tokenizer, chat template and weights.

The first load converts the file once, through transformers and the ``gguf`` package
(they dequantize; nothing here does), into an HF directory under the kvloom cache:
config.json, the tokenizer with its chat template, and float32 safetensors. Later loads
read that directory like any checkpoint. The conversion is written to a scratch
directory and renamed into place, so an interrupted run leaves nothing half-written.
"""

from __future__ import annotations

import hashlib
import os
import shutil
import tempfile
from pathlib import Path
from typing import Any

import torch

from kvloom.config import cache_dir
from kvloom.hookspecs import hookimpl
from kvloom.interfaces.loader import ModelLoader
from kvloom.plugins.loaders.safetensors_loader import load_checkpoint_dir

KVLOOM_PLUGIN_API = ">=1.0,<2"  # the kvloom plugin API versions this module supports


@hookimpl
def register_model_loaders(register):
    register("gguf", GGUFLoader, auto=True, priority=20)


class GGUFLoader(ModelLoader):
    name = "gguf"

    def validate(self, model_config: Any) -> list[str]:
        path = Path(model_config.model)
        if path.suffix != ".gguf" or not path.is_file():
            return [f"{model_config.model!r} is not a .gguf file"]
        return []

    def load_hf_config(self, model_config: Any) -> Any:
        from transformers import AutoConfig

        return AutoConfig.from_pretrained(self.converted_dir(model_config))

    def load_tokenizer(self, model_config: Any) -> Any:
        from transformers import AutoTokenizer

        return AutoTokenizer.from_pretrained(model_config.tokenizer
                                             or self.converted_dir(model_config))

    def load_weights(self, model: torch.nn.Module, model_config: Any) -> None:
        load_checkpoint_dir(model, self.converted_dir(model_config))

    def converted_dir(self, model_config: Any) -> Path:
        """The cached HF-format copy of the GGUF file, made on first use."""
        gguf = Path(model_config.model).resolve()
        stat = gguf.stat()
        key = hashlib.sha256(f"{gguf}|{stat.st_size}|{stat.st_mtime_ns}".encode()).hexdigest()
        target = cache_dir() / "converted" / f"{gguf.stem}-{key[:16]}"
        if not (target / "config.json").exists():
            convert_gguf(gguf, target)
        return target


def convert_gguf(gguf: Path, target: Path) -> None:
    """Write config, tokenizer and float32 safetensors for ``gguf`` into ``target``."""
    from safetensors.torch import save_file
    from transformers import AutoModelForCausalLM, AutoTokenizer

    target.parent.mkdir(parents=True, exist_ok=True)
    scratch = Path(tempfile.mkdtemp(dir=target.parent, prefix=f".{target.name}-"))
    try:
        model = AutoModelForCausalLM.from_pretrained(gguf.parent, gguf_file=gguf.name,
                                                     dtype=torch.float32)
        tokenizer = AutoTokenizer.from_pretrained(gguf.parent, gguf_file=gguf.name)
        config = model.config
        config.architectures = [type(model).__name__]
        if hasattr(config, "quantization_config"):
            del config.quantization_config  # the saved weights are plain float32
        config.save_pretrained(scratch)
        model.generation_config.save_pretrained(scratch)
        tokenizer.save_pretrained(scratch)
        state = {name: tensor.detach().contiguous().clone()
                 for name, tensor in model.state_dict().items()}
        if getattr(config, "tie_word_embeddings", False):
            state.pop("lm_head.weight", None)  # shares the embedding's storage
        save_file(state, str(scratch / "model.safetensors"))
        os.replace(scratch, target)
    finally:
        shutil.rmtree(scratch, ignore_errors=True)
