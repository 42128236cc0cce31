"""What a model loader plugin implements: config, tokenizer and weights for a model.

Also the error every loader raises for a broken model file, and the checks of
``config.json`` that the default ``load_hf_config`` runs, so that a broken file is
reported as ``<path>: <what is wrong>`` on one line rather than as a library traceback.
"""

from __future__ import annotations

import json
from abc import ABC, abstractmethod
from pathlib import Path
from typing import Any, Protocol

import torch

CONFIG_FILE = "config.json"
# Sizes the engine divides by or allocates from; zero or negative ones would fail far
# from the file (a ZeroDivisionError while building the model).
POSITIVE_CONFIG_FIELDS = ("vocab_size", "hidden_size", "num_hidden_layers",
                          "num_attention_heads", "num_key_value_heads", "intermediate_size")


class TensorSlice(Protocol):
    """A checkpoint tensor not read yet (added in API 1.1): a loader hands these to a
    model whose class sets ``reads_weight_slices = True``, so a tensor-parallel rank
    reads only the bytes of its own slice of each tensor.

    Attributes:
        shape: the full tensor's shape.
    """

    shape: torch.Size

    def narrow(self, dim: int, start: int, length: int) -> torch.Tensor:
        """Read rows ``start .. start + length`` of dimension ``dim`` only."""

    def read(self) -> torch.Tensor:
        """Read the whole tensor."""


def as_tensor(tensor: torch.Tensor | TensorSlice) -> torch.Tensor:
    """``tensor`` itself, or the whole of a :class:`TensorSlice`."""
    return tensor if isinstance(tensor, torch.Tensor) else tensor.read()


class ModelLoadError(ValueError):
    """A model file is missing, unreadable, truncated or malformed.

    ``str()`` is one line, ``"<path>: <reason>"``. The arguments stay ``(path, reason)``
    so the error survives pickling across processes.
    """

    def __init__(self, path: str | Path, reason: str) -> None:
        super().__init__(str(path), " ".join(str(reason).split()))

    @property
    def path(self) -> str:
        return self.args[0]

    @property
    def reason(self) -> str:
        return self.args[1]

    def __str__(self) -> str:
        return f"{self.path}: {self.reason}"


def describe_error(exc: BaseException) -> str:
    """A library exception as ``Type: message`` on one line, for a ModelLoadError reason."""
    message = " ".join(str(exc).split())
    return f"{type(exc).__name__}: {message}" if message else type(exc).__name__


def read_config_file(path: Path) -> dict[str, Any]:
    """The JSON object in ``path``, checked for what kvloom needs before transformers sees it.

    Raises:
        ModelLoadError: the file is missing, empty, not a JSON object, has no string
            ``model_type``, no list of architecture names, or a non-positive size.
    """
    try:
        raw = path.read_bytes()
    except FileNotFoundError:
        raise ModelLoadError(path, "missing; an HF model directory needs config.json") from None
    except OSError as exc:
        raise ModelLoadError(path, f"cannot be read ({describe_error(exc)})") from exc
    if not raw.strip():
        raise ModelLoadError(path, f"empty file ({len(raw)} bytes)")
    try:
        data = json.loads(raw)
    except ValueError as exc:  # JSONDecodeError, or bytes that are not UTF-8/16/32
        raise ModelLoadError(path, f"not valid JSON ({exc})") from exc
    if not isinstance(data, dict):
        raise ModelLoadError(path, f"not a JSON object (found a {type(data).__name__})")
    _check_config_fields(path, data)
    return data


def _check_config_fields(path: Path, data: dict[str, Any]) -> None:
    model_type = data.get("model_type")
    if not isinstance(model_type, str) or not model_type:
        raise ModelLoadError(path, f"'model_type' must be a non-empty string, e.g. \"qwen2\" "
                                   f"(found {model_type!r})")
    architectures = data.get("architectures")
    if (not isinstance(architectures, list) or not architectures
            or not all(isinstance(name, str) for name in architectures)):
        # kvloom picks the model class by these names; HF tolerates their absence.
        raise ModelLoadError(path, "'architectures' must be a non-empty list of class names, "
                                   f"e.g. [\"Qwen2ForCausalLM\"] (found {architectures!r})")
    for field in POSITIVE_CONFIG_FIELDS:
        value = data.get(field)
        if value is not None and (not isinstance(value, int) or isinstance(value, bool)
                                  or value < 1):
            raise ModelLoadError(path, f"{field!r} must be a positive integer (found {value!r})")


def load_hf_config_dir(directory: str | Path, **kwargs: Any) -> Any:
    """``AutoConfig.from_pretrained(directory)``, with the config file checked first and
    transformers' errors (not JSON, unknown model type, a field of the wrong type)
    turned into a one-line ModelLoadError naming it."""
    from huggingface_hub.errors import StrictDataclassError
    from transformers import AutoConfig

    config_file = Path(directory) / CONFIG_FILE
    if Path(directory).is_dir():  # a hub id is left to transformers
        read_config_file(config_file)
    try:
        return AutoConfig.from_pretrained(directory, **kwargs)
    except (OSError, ValueError, TypeError, KeyError, StrictDataclassError) as exc:
        raise ModelLoadError(config_file, describe_error(exc)) from exc


class ModelLoader(ABC):
    """Loads a model's HF config, tokenizer and weights.

    The default ``load_hf_config`` / ``load_tokenizer`` read a Hugging Face
    directory with transformers; loaders for other formats override them. A loader
    reports a broken model file by raising :class:`ModelLoadError`.
    """

    name: str = "unnamed"

    def validate(self, model_config: Any) -> list[str]:
        """Reasons this loader cannot load ``model_config.model``; empty when it can."""
        return []

    def load_hf_config(self, model_config: Any) -> Any:
        return load_hf_config_dir(
            model_config.model,
            trust_remote_code=model_config.trust_remote_code,
            revision=model_config.revision,
        )

    def load_tokenizer(self, model_config: Any) -> Any:
        from transformers import AutoTokenizer

        return AutoTokenizer.from_pretrained(
            model_config.tokenizer or model_config.model,
            trust_remote_code=model_config.trust_remote_code,
            revision=model_config.revision,
        )

    @abstractmethod
    def load_weights(self, model: torch.nn.Module, model_config: Any) -> None:
        """Fill ``model``'s parameters in place."""
