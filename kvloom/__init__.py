"""kvloom: a small, pluggable LLM inference engine in the vLLM V1 mould.

Public names are imported lazily, so ``import kvloom`` does not load torch or
transformers until something needs them.
"""

from __future__ import annotations

import importlib
from typing import Any

_EXPORTS = {
    "LLM": "kvloom.engine.llm",
    "Engine": "kvloom.engine.engine",
    "EngineConfig": "kvloom.config",
    "SamplingParams": "kvloom.sampling_params",
    "RequestOutputKind": "kvloom.sampling_params",
    "StructuredOutputsParams": "kvloom.sampling_params",
    "RequestOutput": "kvloom.outputs",
    "CompletionOutput": "kvloom.outputs",
    "Logprob": "kvloom.outputs",
    "hookimpl": "kvloom.hookspecs",
    "PLUGIN_API_VERSION": "kvloom.hookspecs",
    "make_plugin_manager": "kvloom.plugin_manager",
}

__all__ = sorted(_EXPORTS)


def __getattr__(name: str) -> Any:
    if name == "__version__":  # the installed distribution's, so it never drifts from pyproject
        return _installed_version()
    module = _EXPORTS.get(name)
    if module is None:
        raise AttributeError(f"module 'kvloom' has no attribute {name!r}")
    return getattr(importlib.import_module(module), name)


def _installed_version() -> str:
    from importlib.metadata import PackageNotFoundError, version

    try:
        return version("kvloom")
    except PackageNotFoundError:  # a source tree used without installing it
        return "0+unknown"
