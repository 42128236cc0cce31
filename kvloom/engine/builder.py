"""Building every engine component from an EngineConfig and the plugin registries."""

from __future__ import annotations

import logging
from dataclasses import dataclass
from typing import Any, Callable

import torch

from kvloom.config import EngineConfig, cache_dir
from kvloom.engine.selection import loader_candidates, platform_candidates, select_component
from kvloom.interfaces.attention import AttentionBackend, AttentionSpec
from kvloom.interfaces.drafter import Drafter
from kvloom.interfaces.loader import ModelLoader, ModelLoadError, describe_error
from kvloom.interfaces.model import ModelContext
from kvloom.interfaces.platform import Platform
from kvloom.kv_cache.kv_cache_manager import KVCacheManager
from kvloom.model_source import resolve_model
from kvloom.registry import PluginSelectionError, Registries
from kvloom.scheduler.policy import make_scheduling_policy
from kvloom.scheduler.scheduler import Scheduler, SchedulerLimits
from kvloom.spec_decode.building import build_drafter
from kvloom.structured_output.compiler import GrammarCompiler, make_structured_output_backend
from kvloom.worker.cuda_graphs import default_capture_sizes
from kvloom.worker.input_batch import InputBuffers
from kvloom.worker.model_runner import ModelRunner

logger = logging.getLogger(__name__)

DEFAULT_CHUNKED_BATCHED_TOKENS = 8192
_DTYPES = {"float32": torch.float32, "float16": torch.float16, "bfloat16": torch.bfloat16}


@dataclass(slots=True)
class EngineComponents:
    """Everything the engine runs with, chosen and built."""

    platform: Platform
    attention_name: str
    tokenizer: Any
    hf_config: Any
    dtype: torch.dtype
    max_model_len: int
    eos_token_ids: frozenset[int]
    scheduler: Scheduler
    runner: ModelRunner
    kv_cache_manager: KVCacheManager
    grammar_compiler: GrammarCompiler
    drafter: Drafter | None = None


def build_engine(config: EngineConfig, registries: Registries) -> EngineComponents:
    resolved = resolve_model(config.model.model, cache_dir())
    if resolved != config.model.model:  # an alias or hub id, now a local path
        config = config.model_copy(update={"model": config.model.model_copy(
            update={"model": resolved})})
    _, platform = select_component(
        registries["platform"], config.platform, platform_candidates(registries["platform"]),
        registries["platform"].create, lambda p: p.validate())
    _, loader = select_component(
        registries["loader"], config.model.load_format, loader_candidates(registries["loader"]),
        registries["loader"].create, lambda loader_: loader_.validate(config.model))
    hf_config = _at_model_path(config, loader.load_hf_config, config.model)
    tokenizer = _load_tokenizer(loader, config)
    dtype = resolve_dtype(config.model.dtype, hf_config, platform)
    max_model_len = resolve_max_model_len(config.model.max_model_len, hf_config)
    platform.seed_everything(config.model.seed)

    model, attention_name, backend = _build_model(config, registries, platform, hf_config, dtype)
    _at_model_path(config, loader.load_weights, model, config.model)
    model.eval()
    drafter = build_drafter(config, registries, platform, model, hf_config, backend, dtype,
                            max_model_len)

    limits = resolve_scheduler_limits(config, max_model_len, drafter)
    grammar_compiler = GrammarCompiler(
        lambda: make_structured_output_backend(config, registries, tokenizer, hf_config))
    runner = _build_runner(config, registries, platform, model, backend, limits,
                           grammar_compiler, drafter, hf_config.vocab_size)
    if platform.needs_profile_run:
        # The KV cache gets what the largest step leaves free.
        runner.profile_run(min(limits.max_num_batched_tokens, max_model_len),
                           limits.max_num_seqs)
    spec = _full_spec(model.attention_spec(), config, platform)
    draft_specs = [_full_spec(s, config, platform) for s in drafter.kv_cache_layers()] \
        if drafter is not None else []
    num_blocks = resolve_num_blocks(config, platform, spec, model.num_attention_layers(),
                                    max_model_len, draft_specs)
    runner.initialize_kv_caches([
        torch.zeros(backend.kv_cache_shape(num_blocks, spec), dtype=dtype,
                    device=platform.device())
        for _ in range(model.num_attention_layers())])
    if draft_specs:
        drafter.initialize_kv_caches([
            torch.zeros(backend.kv_cache_shape(num_blocks, s), dtype=s.dtype,
                        device=platform.device()) for s in draft_specs])
    logger.info("KV cache: %d blocks of %d tokens", num_blocks, config.cache.block_size)
    if use_cuda_graphs(config, platform, backend, drafter):
        runner.capture_cuda_graphs(
            config.model.cuda_graph_sizes or default_capture_sizes(limits.max_num_seqs))

    kv_cache_manager = KVCacheManager(num_blocks, config.cache.block_size,
                                      config.cache.enable_prefix_caching)
    scheduler = Scheduler(limits, kv_cache_manager,
                          make_scheduling_policy(config.scheduler.policy))
    return EngineComponents(platform, attention_name, tokenizer, hf_config, dtype, max_model_len,
                            eos_token_ids(config, hf_config, tokenizer), scheduler, runner,
                            kv_cache_manager, grammar_compiler, drafter)


def _build_runner(config: EngineConfig, registries: Registries, platform: Platform,
                  model: torch.nn.Module, backend: AttentionBackend,
                  limits: SchedulerLimits, grammar_compiler: GrammarCompiler,
                  drafter: Drafter | None, vocab_size: int) -> ModelRunner:
    block_size = config.cache.block_size
    buffers = InputBuffers(
        max_num_tokens=max(limits.max_num_batched_tokens, limits.max_num_seqs),
        max_num_seqs=limits.max_num_seqs,
        max_blocks_per_seq=-(-limits.max_model_len // block_size),
        platform=platform)
    sampler = registries["sampler"].create(config.sampler)
    return ModelRunner(model, backend, sampler, buffers, block_size, platform,
                       grammar_compiler.fill_bitmasks, drafter,
                       limits.num_speculative_tokens, vocab_size)


def use_cuda_graphs(config: EngineConfig, platform: Platform, backend: AttentionBackend,
                    drafter: Drafter | None = None) -> bool:
    """Graphs need a platform and backend that support them, and no enforce_eager.

    A model-based drafter turns them off: it reads the target's hidden states of
    every step, which captured decode graphs do not keep.
    """
    if config.model.enforce_eager:
        return False
    if drafter is not None and drafter.uses_target_hidden_states:
        logger.info("CUDA graphs off: drafter %r reads the target's hidden states",
                    getattr(drafter, "name", "?"))
        return False
    if not platform.supports_cuda_graphs:
        logger.info("CUDA graphs off: platform %r does not support them", platform.name)
        return False
    if not backend.supports_cuda_graphs:
        logger.info("CUDA graphs off: attention backend %r does not support them", backend.name)
        return False
    return True


def _build_model(config: EngineConfig, registries: Registries, platform: Platform,
                 hf_config: Any, dtype: torch.dtype) -> tuple[torch.nn.Module, str, AttentionBackend]:
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
    # spec from the config to choose the backend first.
    probe = AttentionSpec(hf_config.num_attention_heads,
                          getattr(hf_config, "num_key_value_heads", None)
                          or hf_config.num_attention_heads,
                          getattr(hf_config, "head_dim", None)
                          or hf_config.hidden_size // hf_config.num_attention_heads,
                          dtype, config.cache.block_size, platform.device().type)
    attention = registries["attention"]
    attention_name, backend = select_component(
        attention, config.attention, platform.attention_candidates(), attention.create,
        lambda b: b.validate(probe))
    context = ModelContext(backend, dtype, platform.device(), config.cache.block_size)
    with torch.device(platform.device()):
        model = models.create(architecture, hf_config, context)
    return model, attention_name, backend


def _full_spec(spec: AttentionSpec, config: EngineConfig, platform: Platform) -> AttentionSpec:
    return AttentionSpec(spec.num_heads, spec.num_kv_heads, spec.head_size, spec.dtype,
                         config.cache.block_size, platform.device().type)


def _at_model_path(config: EngineConfig, load: Callable[..., Any], *args: Any) -> Any:
    """``load(*args)``, an OSError from any loader (a third-party one, a permission
    problem) becoming a one-line ModelLoadError naming the model: the built-in loaders
    name the exact file themselves."""
    try:
        return load(*args)
    except OSError as exc:
        raise ModelLoadError(config.model.model, describe_error(exc)) from exc


def _load_tokenizer(loader: ModelLoader, config: EngineConfig) -> Any:
    if config.model.skip_tokenizer_init:
        return None
    try:
        return loader.load_tokenizer(config.model)
    except Exception as exc:
        raise ValueError(
            f"could not load a tokenizer for {config.model.tokenizer or config.model.model!r} "
            f"({describe_error(exc)}); set tokenizer to a tokenizer directory, or "
            "skip_tokenizer_init: true to pass prompt_token_ids only") from exc


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


def resolve_scheduler_limits(config: EngineConfig, max_model_len: int,
                             drafter: Drafter | None = None) -> SchedulerLimits:
    scheduler = config.scheduler
    budget = scheduler.max_num_batched_tokens
    if budget is None:
        budget = (DEFAULT_CHUNKED_BATCHED_TOKENS if scheduler.enable_chunked_prefill
                  else max(max_model_len, DEFAULT_CHUNKED_BATCHED_TOKENS))
    if not scheduler.enable_chunked_prefill and budget < max_model_len:
        raise ValueError(
            f"max_num_batched_tokens ({budget}) is smaller than max_model_len "
            f"({max_model_len}) with enable_chunked_prefill off: long prompts could never run; "
            "raise max_num_batched_tokens, lower max_model_len or enable chunked prefill")
    num_drafts = config.speculative.num_speculative_tokens if drafter is not None else 0
    lookahead = num_drafts if drafter is not None and drafter.uses_target_hidden_states else 0
    return SchedulerLimits(scheduler.max_num_seqs, budget, max_model_len,
                           scheduler.enable_chunked_prefill, num_drafts, lookahead)


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


def eos_token_ids(config: EngineConfig, hf_config: Any, tokenizer: Any) -> frozenset[int]:
    """EOS ids as HF generate sees them: generation_config.json, config, tokenizer."""
    ids: set[int] = set()
    for value in (_generation_config_eos(config), getattr(hf_config, "eos_token_id", None),
                  getattr(tokenizer, "eos_token_id", None)):
        if isinstance(value, int):
            ids.add(value)
        elif isinstance(value, (list, tuple)):
            ids.update(v for v in value if isinstance(v, int))
    return frozenset(ids)


def _generation_config_eos(config: EngineConfig) -> Any:
    try:
        from transformers import GenerationConfig

        return GenerationConfig.from_pretrained(config.model.model).eos_token_id
    except Exception:  # most checkpoints without generation_config.json land here
        return None
