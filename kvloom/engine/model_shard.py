"""One rank's model: the platform, the checkpoint's config, the model (this rank's
slice of it under tensor parallelism) with its weights, and its KV caches.

The engine's process (rank 0) and every tensor-parallel worker build theirs with the
same functions, so all ranks agree on the model, its dtype and its cache layout.
"""

from __future__ import annotations

import logging
from dataclasses import dataclass
from typing import Any, Callable

import torch

from kvloom.config import EngineConfig
from kvloom.engine.selection import loader_candidates, platform_candidates, select_component
from kvloom.interfaces.attention import AttentionBackend, AttentionSpec
from kvloom.interfaces.loader import ModelLoader, ModelLoadError, describe_error
from kvloom.interfaces.model import ModelContext
from kvloom.interfaces.parallel import SingleRank, TensorParallelGroup
from kvloom.interfaces.platform import Platform
from kvloom.registry import PluginSelectionError, Registries

logger = logging.getLogger(__name__)

_DTYPES = {"float32": torch.float32, "float16": torch.float16, "bfloat16": torch.bfloat16}


@dataclass(slots=True)
class ModelShard:
    """A rank's model and what was chosen to build it."""

    platform: Platform
    loader: ModelLoader
    hf_config: Any
    dtype: torch.dtype
    max_model_len: int
    model: torch.nn.Module
    attention_name: str
    backend: AttentionBackend


def select_platform(config: EngineConfig, registries: Registries) -> Platform:
    _, platform = select_component(
        registries["platform"], config.platform, platform_candidates(registries["platform"]),
        registries["platform"].create, lambda p: p.validate())
    return platform


def build_model_shard(config: EngineConfig, registries: Registries, platform: Platform,
                      parallel: TensorParallelGroup | None = None) -> ModelShard:
    """The loader, the checkpoint's config and this rank's model with its weights."""
    _, loader = select_component(
        registries["loader"], config.model.load_format, loader_candidates(registries["loader"]),
        registries["loader"].create, lambda loader_: loader_.validate(config.model))
    hf_config = at_model_path(config, loader.load_hf_config, config.model)
    dtype = resolve_dtype(config.model.dtype, hf_config, platform)
    max_model_len = resolve_max_model_len(config.model.max_model_len, hf_config)
    platform.seed_everything(config.model.seed)
    model, attention_name, backend = _build_model(config, registries, platform, hf_config,
                                                  dtype, parallel or SingleRank())
    at_model_path(config, loader.load_weights, model, config.model)
    model.eval()
    return ModelShard(platform, loader, hf_config, dtype, max_model_len, model,
                      attention_name, backend)


def allocate_kv_caches(shard: ModelShard, num_blocks: int,
                       block_size: int) -> list[torch.Tensor]:
    spec = full_spec(shard.model.attention_spec(), block_size, shard.platform)
    return [torch.zeros(shard.backend.kv_cache_shape(num_blocks, spec), dtype=shard.dtype,
                        device=shard.platform.device())
            for _ in range(shard.model.num_attention_layers())]


def _build_model(config: EngineConfig, registries: Registries, platform: Platform,
                 hf_config: Any, dtype: torch.dtype, parallel: TensorParallelGroup,
                 ) -> tuple[torch.nn.Module, str, AttentionBackend]:
    architectures = getattr(hf_config, "architectures", None) or []
    models = registries["model"]
    architecture = next((a for a in architectures if a in models.components), None)
    if architecture is None:
        conflicts = [message for message in map(models.conflict_message, architectures)
                     if message]
        if conflicts:
            raise PluginSelectionError(conflicts[0])
        raise PluginSelectionError(
            f"no model architecture registered for {architectures or 'this config'}; "
            f"registered: {', '.join(models.names()) or 'none'}"
            + "".join(f"; {problem}" for problem in models.problems()))
    # The model reports its attention shape only once built, so build a probe
    # spec from the config to choose the backend first: this rank's heads (a KV head
    # is repeated on several ranks when there are fewer than ranks).
    num_heads = hf_config.num_attention_heads
    num_kv_heads = getattr(hf_config, "num_key_value_heads", None) or num_heads
    probe = AttentionSpec(max(1, num_heads // parallel.size),
                          max(1, num_kv_heads // parallel.size),
                          getattr(hf_config, "head_dim", None)
                          or hf_config.hidden_size // num_heads,
                          dtype, config.cache.block_size, platform.device().type)
    attention = registries["attention"]
    attention_name, backend = select_component(
        attention, config.attention, platform.attention_candidates(), attention.create,
        lambda b: b.validate(probe))
    context = ModelContext(backend, dtype, platform.device(), config.cache.block_size,
                           parallel)
    with torch.device(platform.device()):
        model = models.create(architecture, hf_config, context)
    if parallel.size > 1 and not getattr(model, "supports_tensor_parallel", False):
        # A model that ignores context.parallel would run whole on every rank.
        raise ValueError(f"model architecture {architecture!r} does not support "
                         f"tensor_parallel_size > 1 (its class does not set "
                         "supports_tensor_parallel = True)")
    return model, attention_name, backend


def full_spec(spec: AttentionSpec, block_size: int, platform: Platform) -> AttentionSpec:
    return AttentionSpec(spec.num_heads, spec.num_kv_heads, spec.head_size, spec.dtype,
                         block_size, platform.device().type)


def at_model_path(config: EngineConfig, load: Callable[..., Any], *args: Any) -> Any:
    """``load(*args)``, an OSError from any loader (a third-party one, a permission
    problem) becoming a one-line ModelLoadError naming the model: the built-in loaders
    name the exact file themselves."""
    try:
        return load(*args)
    except OSError as exc:
        raise ModelLoadError(config.model.model, describe_error(exc)) from exc


def resolve_dtype(requested: str, hf_config: Any, platform: Platform) -> torch.dtype:
    supported = platform.supported_dtypes()
    if requested != "auto":
        dtype = _DTYPES[requested]
        if dtype not in supported:
            raise ValueError(f"dtype {requested!r} is not supported on platform "
                             f"{platform.name!r}; supported: {supported}")
        return dtype
    config_dtype = getattr(hf_config, "dtype", None) or getattr(hf_config, "torch_dtype", None)
    if isinstance(config_dtype, str):
        config_dtype = _DTYPES.get(config_dtype)
    return config_dtype if config_dtype in supported else supported[0]


def resolve_max_model_len(requested: int | None, hf_config: Any) -> int:
    limit = getattr(hf_config, "max_position_embeddings", None)
    if requested is None:
        if limit is None:
            raise ValueError("the model config has no max_position_embeddings; set max_model_len")
        return int(limit)
    if limit is not None and requested > limit:
        raise ValueError(f"max_model_len {requested} exceeds the model's "
                         f"max_position_embeddings {limit}")
    return requested


def resolve_num_blocks(config: EngineConfig, platform: Platform, spec: AttentionSpec,
                       num_layers: int, max_model_len: int,
                       extra_layers: list[AttentionSpec] | None = None) -> int:
    """Blocks that fit the KV budget; each block holds a slice of every layer's cache,
    the target's ``num_layers`` and ``extra_layers`` (a drafter's)."""
    cache = config.cache
    if cache.num_gpu_blocks_override is not None:
        return cache.num_gpu_blocks_override
    bytes_per_block = num_layers * _bytes_per_block(spec, cache.block_size) + sum(
        _bytes_per_block(extra, cache.block_size) for extra in extra_layers or [])
    budget = platform.kv_cache_memory_bytes(cache.kv_cache_memory_bytes,
                                            cache.gpu_memory_utilization)
    num_blocks = budget // bytes_per_block
    # No point in more blocks than every sequence slot filled to max_model_len.
    useful = config.scheduler.max_num_seqs * -(-max_model_len // cache.block_size)
    num_blocks = min(num_blocks, useful)
    if num_blocks < 1:
        raise ValueError(f"the KV cache budget ({budget} bytes) is smaller than one block "
                         f"({bytes_per_block} bytes); raise kv_cache_memory_bytes")
    return int(num_blocks)


def _bytes_per_block(spec: AttentionSpec, block_size: int) -> int:
    element_size = torch.tensor([], dtype=spec.dtype).element_size()
    return 2 * block_size * spec.num_kv_heads * spec.head_size * element_size
