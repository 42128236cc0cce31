"""Loads HF checkpoints: config.json, tokenizer files and *.safetensors (sharded too).

Every weight file is checked before the model is built: the safetensors library's own
errors for a truncated or foreign file ("header too large", "incomplete metadata") do
not say which file or that it was cut short, so the 8-byte header length and the tensor
byte ranges are compared with the file size first, and whatever the library still
refuses is reported as ``<file>: <reason>`` (a ModelLoadError, one line).
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any, Iterator

import torch

from kvloom.hookspecs import hookimpl
from kvloom.interfaces.loader import ModelLoader, ModelLoadError, describe_error

KVLOOM_PLUGIN_API = ">=1.1,<2"  # the kvloom plugin API versions this module supports

INDEX_FILE = "model.safetensors.index.json"
HEADER_LENGTH_BYTES = 8  # a little-endian u64, then that many bytes of JSON header
MAX_HEADER_BYTES = 100_000_000  # the safetensors library refuses larger headers


@hookimpl
def register_model_loaders(register):
    register("safetensors", SafetensorsLoader, auto=True, priority=10)


class SafetensorsLoader(ModelLoader):
    name = "safetensors"

    def validate(self, model_config: Any) -> list[str]:
        path = Path(model_config.model)
        if not path.is_dir():
            return [f"{model_config.model!r} is not a local directory"]
        if not (path / INDEX_FILE).exists() and not any(path.glob("*.safetensors")):
            return [f"no *.safetensors files in {path}"]
        return []

    def load_hf_config(self, model_config: Any) -> Any:
        hf_config = super().load_hf_config(model_config)
        # The builder asks for the config before it builds the model: checking the weight
        # files here reports a broken one before memory goes to a model it cannot fill.
        check_checkpoint(Path(model_config.model))
        return hf_config

    def load_weights(self, model: torch.nn.Module, model_config: Any) -> None:
        load_checkpoint_dir(model, Path(model_config.model))


def load_checkpoint_dir(model: torch.nn.Module, path: Path) -> None:
    """Load every tensor of an HF safetensors checkpoint; unused tensors are an error.

    A model that reads slices (``reads_weight_slices``, e.g. one tensor-parallel rank
    of it) gets each tensor unread, and reads only its own part of the file.
    """
    files = check_checkpoint(path)
    names = set()
    slices = getattr(model, "reads_weight_slices", False)

    def tensors() -> Iterator[tuple[str, torch.Tensor]]:
        for file in files:
            for name, tensor in read_safetensors_file(file, slices):
                names.add(name)
                yield name, tensor

    consumed = model.load_weights(tensors())
    unused = sorted(names - consumed)
    if unused:
        shown = ", ".join(unused[:8]) + (" ..." if len(unused) > 8 else "")
        raise ValueError(f"{len(unused)} checkpoint tensor(s) in {path} "
                         f"are not used by {type(model).__name__}: {shown}")


def read_safetensors_file(file: Path, slices: bool = False
                          ) -> Iterator[tuple[str, torch.Tensor | SafetensorsSlice]]:
    """Every tensor of one file (with ``slices``, unread: each is valid until the next
    is asked for); the library's errors become a ModelLoadError naming it."""
    from safetensors import SafetensorError, safe_open

    try:
        with safe_open(str(file), framework="pt", device="cpu") as reader:
            for name in reader.keys():
                yield name, SafetensorsSlice(reader, name) if slices else reader.get_tensor(name)
    except (SafetensorError, OSError) as exc:
        raise ModelLoadError(file, describe_error(exc)) from exc


class SafetensorsSlice:
    """A :class:`~kvloom.interfaces.loader.TensorSlice` of an open safetensors file:
    ``narrow`` reads only the bytes of the rows asked for."""

    def __init__(self, reader: Any, name: str) -> None:
        self._reader = reader
        self._name = name
        self.shape = torch.Size(reader.get_slice(name).get_shape())

    def narrow(self, dim: int, start: int, length: int) -> torch.Tensor:
        index = [slice(None)] * len(self.shape)
        index[dim % len(self.shape)] = slice(start, start + length)
        return self._reader.get_slice(self._name)[tuple(index)]

    def read(self) -> torch.Tensor:
        return self._reader.get_tensor(self._name)


def checkpoint_files(path: Path) -> list[Path]:
    """The safetensors files of a checkpoint directory, via the index when there is one."""
    index = path / INDEX_FILE
    if index.exists():
        return [path / name for name in sorted(set(_weight_map(index).values()))]
    return sorted(path.glob("*.safetensors"))


def check_checkpoint(path: Path) -> list[Path]:
    """The checkpoint's safetensors files, each checked with :func:`check_safetensors_file`."""
    files = checkpoint_files(path)
    for file in files:
        check_safetensors_file(file)
    return files


def _weight_map(index: Path) -> dict[str, str]:
    try:
        weight_map = json.loads(index.read_bytes()).get("weight_map")
    except (ValueError, OSError, AttributeError) as exc:  # AttributeError: not an object
        raise ModelLoadError(index, f"not a valid index ({describe_error(exc)})") from exc
    if not isinstance(weight_map, dict) or not all(
            isinstance(name, str) for name in weight_map.values()):
        raise ModelLoadError(index, "has no 'weight_map' object of tensor name -> file name")
    return weight_map


def check_safetensors_file(file: Path) -> None:
    """Raise a ModelLoadError if ``file`` is missing, empty, foreign, truncated or refused
    by the safetensors library; reads only the header."""
    from safetensors import SafetensorError, safe_open

    try:
        size = file.stat().st_size
        with open(file, "rb") as handle:
            data_start, header = _read_header(file, handle, size)
    except FileNotFoundError:
        raise ModelLoadError(file, "missing, or a broken link") from None
    except OSError as exc:
        raise ModelLoadError(file, f"cannot be read ({describe_error(exc)})") from exc
    data_end = _data_end(header)
    expected = None if data_end is None else data_start + data_end
    if expected is not None and size < expected:
        raise ModelLoadError(file, f"truncated: header says {expected} bytes, file has {size}")
    try:  # the library checks the rest: dtypes, shapes, overlapping byte ranges
        with safe_open(str(file), framework="pt", device="cpu"):
            pass
    except (SafetensorError, OSError) as exc:
        raise ModelLoadError(file, f"not a valid safetensors file ({exc})") from exc


def _read_header(file: Path, handle: Any, size: int) -> tuple[int, Any]:
    """Where the tensor bytes start, and the JSON header, after checking the header's
    length field against the file size."""
    if size == 0:
        raise ModelLoadError(file, "empty file (0 bytes)")
    if size < HEADER_LENGTH_BYTES:
        raise ModelLoadError(file, f"truncated: {size} bytes, shorter than the "
                                   f"{HEADER_LENGTH_BYTES}-byte safetensors header length")
    header_length = int.from_bytes(handle.read(HEADER_LENGTH_BYTES), "little")
    first = handle.read(1)
    if not 2 <= header_length <= MAX_HEADER_BYTES or first not in (b"{", b""):
        raise ModelLoadError(file, f"not a safetensors file: its first {HEADER_LENGTH_BYTES} "
                                   f"bytes give a header length of {header_length} and no "
                                   "JSON header follows")
    needed = HEADER_LENGTH_BYTES + header_length
    if size < needed:
        raise ModelLoadError(file, f"truncated: header says {needed} bytes, file has {size} "
                                   "(cut inside the header)")
    try:
        return needed, json.loads(first + handle.read(header_length - 1))
    except ValueError as exc:
        raise ModelLoadError(file, f"not a safetensors file: its header is not JSON "
                                   f"({exc})") from exc


def _data_end(header: Any) -> int | None:
    """The end of the last tensor's bytes, counted from where they start; None when the
    header is malformed (the library then says how)."""
    try:
        return max((int(info["data_offsets"][1]) for name, info in header.items()
                    if name != "__metadata__"), default=0)
    except (AttributeError, KeyError, IndexError, TypeError, ValueError):
        return None
