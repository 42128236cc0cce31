"""Building the configured drafter (``speculative:``) and wiring it to the target model."""

from __future__ import annotations

import logging
from typing import Any

import torch

from kvloom.config import EngineConfig, cache_dir
from kvloom.interfaces.attention import AttentionBackend
from kvloom.interfaces.drafter import Drafter, DrafterContext
from kvloom.interfaces.platform import Platform
from kvloom.model_source import resolve_model
from kvloom.registry import PluginSelectionError, Registries

logger = logging.getLogger(__name__)


def build_drafter(config: EngineConfig, registries: Registries, platform: Platform,
                   model: torch.nn.Module, hf_config: Any, backend: AttentionBackend,
                   dtype: torch.dtype, max_model_len: int) -> Drafter | None:
    """The ``speculative.method`` drafter, wired to the target model."""
    speculative = config.speculative
    if speculative is None:
        return None
    if speculative.model is not None:  # an alias or hub id becomes a local path
        speculative = speculative.model_copy(
            update={"model": resolve_model(speculative.model, cache_dir())})
    context = DrafterContext(model, hf_config, backend, dtype, platform.device(),
                             config.cache.block_size, max_model_len)
    drafter = registries["drafter"].create(speculative.method, speculative, context)
    if drafter.aux_hidden_state_layers:
        if not hasattr(model, "set_aux_hidden_state_layers"):
            raise PluginSelectionError(
                f"drafter {speculative.method!r} reads hidden states of target layers "
                f"{list(drafter.aux_hidden_state_layers)}, but model "
                f"{type(model).__name__} cannot return them (set_aux_hidden_state_layers)")
        model.set_aux_hidden_state_layers(tuple(drafter.aux_hidden_state_layers))
    logger.info("speculative decoding: %s, %d tokens per step (scheduling is synchronous)",
                speculative.method, speculative.num_speculative_tokens)
    return drafter
