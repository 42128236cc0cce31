"""The contract of every ``register_*`` hook: what ``register(name, factory, **metadata)``
takes, per plugin kind.

* A **factory Protocol** per kind says how the core calls ``factory`` (the arguments
  are passed positionally, so a plugin may name them as it likes) and what it must
  return. Any callable fits: a class, a function, a ``functools.partial``.
* A **register Protocol** per kind types the callback the hook receives, with the
  registration metadata that kind understands as keyword-only arguments.
* :data:`REGISTRATION_METADATA` is the one table of those metadata keys: their types,
  defaults and meaning. The core reads nothing else; a key outside the table (a typo
  such as ``priorty=``) or a value of the wrong type is a registration error: the
  component is not used, ``kvloom plugins`` shows why, and so does selecting it.

A static type checker sees these through the hook's annotation::

    from kvloom.interfaces.registration import RegisterPlatform

    @hookimpl
    def register_platforms(register: RegisterPlatform) -> None:
        register("my_npu", MyPlatform, priority=20)   # priorty=20 would not type-check

Nothing here imports torch or a plugin: the interface types are for annotations only.
"""

from __future__ import annotations

import types
from collections.abc import Mapping
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any, Callable, Protocol

if TYPE_CHECKING:
    from pathlib import Path

    import torch

    from kvloom.config import SpeculativeConfig
    from kvloom.interfaces.attention import AttentionBackend
    from kvloom.interfaces.drafter import Drafter, DrafterContext
    from kvloom.interfaces.executor import Executor
    from kvloom.interfaces.loader import ModelLoader
    from kvloom.interfaces.model import ModelContext
    from kvloom.interfaces.platform import Platform
    from kvloom.interfaces.sampler import Sampler
    from kvloom.interfaces.structured_output import StructuredOutputBackend


# ---------------------------------------------------------------- factories


class PlatformFactory(Protocol):
    """``factory()``: called when the platform is selected by name, or for each
    ``platform: auto`` candidate (highest ``priority`` first)."""

    def __call__(self) -> Platform: ...


class AttentionBackendFactory(Protocol):
    """``factory()``: called when the backend is selected by name, or for each of the
    platform's ``attention_candidates()`` under ``attention: auto``."""

    def __call__(self) -> AttentionBackend: ...


class ModelFactory(Protocol):
    """``factory(hf_config, context)``: the checkpoint's transformers config and a
    :class:`~kvloom.interfaces.model.ModelContext`; returns the ``nn.Module``
    (a :class:`~kvloom.interfaces.model.CausalLM`), built under the platform's
    ``torch.device``."""

    def __call__(self, hf_config: Any, context: ModelContext, /) -> torch.nn.Module: ...


class ModelLoaderFactory(Protocol):
    """``factory()``: called when ``load_format`` names the loader, or for each
    ``auto=True`` loader under ``load_format: auto`` (lowest ``priority`` first)."""

    def __call__(self) -> ModelLoader: ...


class SamplerFactory(Protocol):
    """``factory()``: called once when the engine starts with ``sampler: NAME``."""

    def __call__(self) -> Sampler: ...


class DrafterFactory(Protocol):
    """``factory(speculative_config, context)``: the ``speculative:`` section (a
    :class:`kvloom.config.SpeculativeConfig`, its ``model`` resolved to a local path)
    and a :class:`~kvloom.interfaces.drafter.DrafterContext`."""

    def __call__(self, speculative_config: SpeculativeConfig, context: DrafterContext,
                 /) -> Drafter: ...


class StructuredOutputBackendFactory(Protocol):
    """``factory(tokenizer, vocab_size)``: the transformers tokenizer and the model's
    vocabulary size (padding included); called the first time a request asks for
    structured output."""

    def __call__(self, tokenizer: Any, vocab_size: int, /) -> StructuredOutputBackend: ...


class ExecutorFactory(Protocol):
    """``factory()``: called when the engine starts with
    ``parallel.distributed_executor_backend: NAME`` (or ``auto``: ``uni`` for one rank,
    ``mp`` for more)."""

    def __call__(self) -> Executor: ...


class TinyConfigFactory(Protocol):
    """``tiny_config()``: a small transformers ``PretrainedConfig`` of the architecture,
    for the conformance suite."""

    def __call__(self) -> Any: ...


class TinySpeculativeConfigFactory(Protocol):
    """``tiny_speculative_config(target_dir, work_dir)``: extra ``speculative:`` settings
    (a draft checkpoint written to ``work_dir``, say) for the conformance suite's tiny
    target model in ``target_dir``."""

    def __call__(self, target_dir: Path, work_dir: Path, /) -> dict[str, Any]: ...


# ---------------------------------------------------------------- register callbacks
# Keyword-only arguments after ``factory`` are the kind's metadata (REGISTRATION_METADATA).


class RegisterPlatform(Protocol):
    """The ``register`` callback of ``register_platforms``."""

    def __call__(self, name: str, factory: PlatformFactory, *, priority: int = 0) -> None: ...


class RegisterAttentionBackend(Protocol):
    """The ``register`` callback of ``register_attention_backends``."""

    def __call__(self, name: str, factory: AttentionBackendFactory) -> None: ...


class RegisterModel(Protocol):
    """The ``register`` callback of ``register_models``; ``name`` is the Hugging Face
    architecture name (``config.json``'s ``architectures``)."""

    def __call__(self, name: str, factory: ModelFactory, *,
                 tiny_config: TinyConfigFactory | None = None) -> None: ...


class RegisterModelLoader(Protocol):
    """The ``register`` callback of ``register_model_loaders``."""

    def __call__(self, name: str, factory: ModelLoaderFactory, *, auto: bool = False,
                 priority: int = 100) -> None: ...


class RegisterSampler(Protocol):
    """The ``register`` callback of ``register_samplers``."""

    def __call__(self, name: str, factory: SamplerFactory) -> None: ...


class RegisterDrafter(Protocol):
    """The ``register`` callback of ``register_drafters``; ``name`` is the
    ``speculative.method`` that selects it."""

    def __call__(self, name: str, factory: DrafterFactory, *,
                 tiny_speculative_config: TinySpeculativeConfigFactory | None = None) -> None: ...


class RegisterStructuredOutputBackend(Protocol):
    """The ``register`` callback of ``register_structured_output_backends``."""

    def __call__(self, name: str, factory: StructuredOutputBackendFactory) -> None: ...


class RegisterExecutor(Protocol):
    """The ``register`` callback of ``register_executors``; ``name`` is the
    ``distributed_executor_backend`` that selects it."""

    def __call__(self, name: str, factory: ExecutorFactory) -> None: ...


# kind -> the register Protocol of its hook (kinds as in kvloom.registry.PLUGIN_KINDS)
REGISTER_PROTOCOLS: dict[str, type] = {
    "platform": RegisterPlatform,
    "attention": RegisterAttentionBackend,
    "model": RegisterModel,
    "loader": RegisterModelLoader,
    "sampler": RegisterSampler,
    "drafter": RegisterDrafter,
    "structured_output": RegisterStructuredOutputBackend,
    "executor": RegisterExecutor,
}


# ---------------------------------------------------------------- registration metadata


@dataclass(frozen=True, slots=True)
class MetadataKey:
    """One registration metadata key: what its value must be, its default, its use."""

    expected: str  # the accepted values, as an error message says them ("an int")
    accepts: Callable[[Any], bool]
    default: Any
    meaning: str


def _is_int(value: Any) -> bool:
    return isinstance(value, int) and not isinstance(value, bool)


def _is_bool(value: Any) -> bool:
    return isinstance(value, bool)


def _is_callable_or_none(value: Any) -> bool:
    return value is None or callable(value)


def _frozen(table: dict[str, dict[str, MetadataKey]]) -> Mapping[str, Mapping[str, MetadataKey]]:
    return types.MappingProxyType({kind: types.MappingProxyType(keys)
                                   for kind, keys in table.items()})


# kind -> metadata key -> its contract. The only keys the core and the conformance suite
# read; the register Protocols above spell the same keys and defaults.
REGISTRATION_METADATA: Mapping[str, Mapping[str, MetadataKey]] = _frozen({
    "platform": {
        "priority": MetadataKey("an int", _is_int, 0,
                                "order of `platform: auto` candidates, highest first"),
    },
    "attention": {},
    "model": {
        "tiny_config": MetadataKey(
            "a callable or None", _is_callable_or_none, None,
            "conformance suite: `() -> PretrainedConfig`, a small config of the "
            "architecture (default: transformers' own config class at tiny sizes)"),
    },
    "loader": {
        "auto": MetadataKey("a bool", _is_bool, False,
                            "a candidate for `load_format: auto`"),
        "priority": MetadataKey("an int", _is_int, 100,
                                "order of `load_format: auto` candidates, lowest first"),
    },
    "sampler": {},
    "drafter": {
        "tiny_speculative_config": MetadataKey(
            "a callable or None", _is_callable_or_none, None,
            "conformance suite: `(target_dir, work_dir) -> dict` of extra `speculative:` "
            "settings for its tiny target model (a draft checkpoint, say)"),
    },
    "structured_output": {},
    "executor": {},
})
