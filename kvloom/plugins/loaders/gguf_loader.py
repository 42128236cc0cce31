"""Loads GGUF files (llama.cpp's format): config, tokenizer, chat template and weights.

The first load converts the file once, through transformers and the ``gguf`` package
(they dequantize; nothing here does), into an HF directory under the kvloom cache
(``<cache>/converted/<name>-<hash>``): config.json, the tokenizer with its chat
template, and float32 safetensors. Later loads read that directory like any checkpoint.

The file is checked first (:func:`check_gguf_file`): a truncated GGUF otherwise fails
deep inside the conversion with numpy's "cannot reshape array". The conversion is
written to a scratch directory next to the destination and renamed into place only
when complete, so a failed, interrupted or killed run leaves nothing half-written
(see :func:`kvloom.model_source.scratch_directory`).
"""

from __future__ import annotations

import hashlib
import os
from pathlib import Path
from typing import Any

import torch

from kvloom.config import cache_dir
from kvloom.hookspecs import hookimpl
from kvloom.interfaces.loader import (CONFIG_FILE, ModelLoader, ModelLoadError, describe_error,
                                      load_hf_config_dir)
from kvloom.model_source import GGUF_MAGIC, remove_stale_scratch, scratch_directory
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
        return load_hf_config_dir(self.converted_dir(model_config))

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
        if target.parent.is_dir():  # what runs killed with SIGKILL left behind
            remove_stale_scratch(target.parent)
        if not (target / CONFIG_FILE).exists():
            check_gguf_file(Path(model_config.model))  # named as the user gave it
            convert_gguf(gguf, target)
        return target


def check_gguf_file(path: Path) -> None:
    """Raise a ModelLoadError naming ``path`` if it is empty, not GGUF, truncated or
    unreadable by the ``gguf`` package's reader (which reads the header and maps the
    tensors without copying them)."""
    try:
        size = path.stat().st_size
        with open(path, "rb") as handle:
            magic = handle.read(len(GGUF_MAGIC))
    except OSError as exc:
        raise ModelLoadError(path, f"cannot be read ({describe_error(exc)})") from exc
    if size == 0:
        raise ModelLoadError(path, "empty file (0 bytes)")
    if magic != GGUF_MAGIC:
        raise ModelLoadError(path, f"not a GGUF file: it starts with {magic!r}, "
                                   f"not {GGUF_MAGIC!r}")
    try:
        _bounds_checked_reader(path)
    except _PastEndOfFile as exc:
        raise ModelLoadError(path, f"truncated: header says at least {exc.needed} bytes, "
                                   f"file has {size}") from None
    except Exception as exc:  # the reader parses untrusted bytes: any failure means corrupt
        raise ModelLoadError(path, f"not a valid GGUF file ({describe_error(exc)})") from exc


class _PastEndOfFile(Exception):
    def __init__(self, needed: int) -> None:
        super().__init__(needed)
        self.needed = needed


def _bounds_checked_reader(path: Path) -> Any:
    """A ``gguf.GGUFReader`` of ``path`` that raises _PastEndOfFile for a read past the end.

    Every read of the reader goes through ``_get``, whose slice of the memory map comes
    back short past the end of the file without complaint; the short array then fails
    later as an IndexError or numpy's "cannot reshape", which does not say truncated.
    """
    import numpy as np
    from gguf import GGUFReader

    class BoundsCheckedReader(GGUFReader):
        def _get(self, offset, dtype, count=1, *args, **kwargs):
            end = int(offset) + np.dtype(dtype).itemsize * int(count)
            if end > len(self.data):
                raise _PastEndOfFile(end)
            return super()._get(offset, dtype, count, *args, **kwargs)

    return BoundsCheckedReader(path)


def convert_gguf(gguf: Path, target: Path) -> None:
    """Write config, tokenizer and float32 safetensors for ``gguf`` into ``target``,
    through a scratch directory renamed into place when complete.

    Raises:
        ModelLoadError: naming ``gguf``, when transformers cannot convert it.
    """
    with scratch_directory(target) as scratch:
        try:
            write_hf_checkpoint(gguf, scratch)
            _publish(scratch, target)
        except ModelLoadError:
            raise
        except Exception as exc:  # unsupported architecture, disk full, ...
            raise ModelLoadError(gguf, f"could not convert it to an HF checkpoint in "
                                       f"{target.parent} ({describe_error(exc)})") from exc


def write_hf_checkpoint(gguf: Path, directory: Path) -> None:
    """The conversion proper: transformers dequantizes, we save an HF directory."""
    model, tokenizer = load_with_transformers(gguf)
    save_config_and_tokenizer(model, tokenizer, directory)
    save_weights(model, directory)


def load_with_transformers(gguf: Path) -> tuple[Any, Any]:
    from transformers import AutoModelForCausalLM, AutoTokenizer

    model = AutoModelForCausalLM.from_pretrained(gguf.parent, gguf_file=gguf.name,
                                                 dtype=torch.float32)
    tokenizer = AutoTokenizer.from_pretrained(gguf.parent, gguf_file=gguf.name)
    return model, tokenizer


def save_config_and_tokenizer(model: Any, tokenizer: Any, directory: Path) -> None:
    config = model.config
    config.architectures = [type(model).__name__]
    if hasattr(config, "quantization_config"):
        del config.quantization_config  # the saved weights are plain float32
    config.save_pretrained(directory)
    model.generation_config.save_pretrained(directory)
    tokenizer.save_pretrained(directory)


def save_weights(model: Any, directory: Path) -> None:
    from safetensors.torch import save_file

    state = {name: tensor.detach().contiguous().clone()
             for name, tensor in model.state_dict().items()}
    if getattr(model.config, "tie_word_embeddings", False):
        state.pop("lm_head.weight", None)  # shares the embedding's storage
    save_file(state, str(directory / "model.safetensors"))


def _publish(scratch: Path, target: Path) -> None:
    try:
        os.replace(scratch, target)
    except OSError:
        if not (target / CONFIG_FILE).exists():
            raise
        # Another process converted the same file meanwhile; its copy is as good as ours.
