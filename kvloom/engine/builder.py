"""Building every engine component from an EngineConfig and the plugin registries."""

from __future__ import annotations

import logging
from dataclasses import dataclass
from typing import Any, Callable

import torch

from kvloom.config import EngineConfig, cache_dir
from kvloom.distributed.driver import DistributedWorkers
from kvloom.engine.model_shard import (ModelShard, allocate_kv_caches, build_model_shard,
                                       full_spec, resolve_num_blocks, select_platform)
from kvloom.engine.selection import select_component
from kvloom.interfaces.attention import AttentionBackend, AttentionSpec
from kvloom.interfaces.drafter import Drafter
from kvloom.interfaces.executor import Executor
from kvloom.interfaces.loader import ModelLoader, describe_error
from kvloom.interfaces.platform import Platform
from kvloom.kv_cache.kv_cache_manager import KVCacheManager
from kvloom.model_source import resolve_model
from kvloom.registry import Registries
from kvloom.scheduler.policy import make_scheduling_policy
from kvloom.scheduler.scheduler import Scheduler, SchedulerLimits
from kvloom.spec_decode.building import build_drafter
from kvloom.structured_output.compiler import GrammarCompiler, make_structured_output_backend
from kvloom.structured_output.grammar_mask import FillBitmasks, fill_one_by_one
from kvloom.worker.cuda_graphs import default_capture_sizes
from kvloom.worker.input_batch import InputBuffers
from kvloom.worker.model_runner import ModelRunner

logger = logging.getLogger(__name__)

DEFAULT_CHUNKED_BATCHED_TOKENS = 8192


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
    executor: Executor | None = None  # None: one rank, in this process
    workers: DistributedWorkers | None = None  # ranks 1.. with tensor_parallel_size > 1
    drafter: Drafter | None = None


def build_engine(config: EngineConfig, registries: Registries,
                 plugin_allowlist: tuple[str, ...] | None = None) -> EngineComponents:
    """Every component, for rank 0; with ``tensor_parallel_size > 1`` the executor's
    workers build the other ranks meanwhile (``plugin_allowlist`` is what they load)."""
    config = with_resolved_model(config)
    platform = select_platform(config, registries)
    executor = select_executor(config, registries, platform)
    workers = None
    if config.parallel.tensor_parallel_size > 1:
        workers = DistributedWorkers.launch(executor, config, platform, plugin_allowlist)
    try:
        return _build_driver(config, registries, platform, executor, workers)
    except BaseException:
        if workers is not None:
            workers.shutdown()
        elif executor is not None:
            executor.shutdown()
        raise


def with_resolved_model(config: EngineConfig) -> EngineConfig:
    resolved = resolve_model(config.model.model, cache_dir())
    if resolved == config.model.model:
        return config
    # An alias or hub id, now a local path (the workers read the same one).
    return config.model_copy(update={"model": config.model.model_copy(
        update={"model": resolved})})


def _build_driver(config: EngineConfig, registries: Registries, platform: Platform,
                  executor: Executor | None, workers: DistributedWorkers | None,
                  ) -> EngineComponents:
    platform.use_device(0)
    shard = build_model_shard(config, registries, platform,
                              workers.group if workers is not None else None)
    tokenizer = _load_tokenizer(shard.loader, config)
    if workers is not None:
        workers.join()  # every rank has built its slice: from here on, collectives
    drafter = build_drafter(config, registries, platform, shard.model, shard.hf_config,
                            shard.backend, shard.dtype, shard.max_model_len)
    if drafter is not None and workers is not None and drafter.uses_target_hidden_states:
        raise ValueError(f"speculative method {config.speculative.method!r} reads the "
                         "target's hidden states, which tensor_parallel_size > 1 does not "
                         "support yet; use method: ngram")
    limits = resolve_scheduler_limits(config, shard.max_model_len, drafter)
    grammar_compiler = GrammarCompiler(
        lambda: make_structured_output_backend(config, registries, tokenizer, shard.hf_config))
    runner = build_runner(config, registries, shard, limits, grammar_compiler.fill_bitmasks,
                          drafter)
    draft_specs = [full_spec(s, config.cache.block_size, platform)
                   for s in drafter.kv_cache_layers()] if drafter is not None else []
    num_blocks = prepare_kv_caches(config, shard, runner, limits, draft_specs,
                                   workers.agree_on_minimum if workers is not None else None)
    if draft_specs:
        drafter.initialize_kv_caches([
            torch.zeros(shard.backend.kv_cache_shape(num_blocks, s), dtype=s.dtype,
                        device=platform.device()) for s in draft_specs])
    if use_cuda_graphs(config, platform, shard.backend, drafter):
        runner.capture_cuda_graphs(
            config.model.cuda_graph_sizes or default_capture_sizes(limits.max_num_seqs))
    kv_cache_manager = KVCacheManager(num_blocks, config.cache.block_size,
                                      config.cache.enable_prefix_caching)
    scheduler = Scheduler(limits, kv_cache_manager,
                          make_scheduling_policy(config.scheduler.policy))
    return EngineComponents(platform, shard.attention_name, tokenizer, shard.hf_config,
                            shard.dtype, shard.max_model_len,
                            eos_token_ids(config, shard.hf_config, tokenizer), scheduler,
                            runner, kv_cache_manager, grammar_compiler, executor, workers,
                            drafter)


def select_executor(config: EngineConfig, registries: Registries,
                    platform: Platform) -> Executor | None:
    """``distributed_executor_backend`` (``auto``: ``mp`` for several ranks). One rank
    with ``auto`` needs no executor: the model runs in this process, as with ``uni``."""
    world_size = config.parallel.tensor_parallel_size
    name = config.parallel.distributed_executor_backend
    if name == "auto":
        if world_size == 1:
            return None
        name = "mp"
    executors = registries["executor"]
    _, executor = select_component(executors, name, [name], executors.create,
                                   lambda e: e.validate(world_size, platform.device_count()))
    return executor


def prepare_kv_caches(config: EngineConfig, shard: ModelShard, runner: ModelRunner,
                      limits: SchedulerLimits, draft_specs: list[AttentionSpec],
                      agree: Callable[[int], int] | None = None) -> int:
    """Profile if the platform needs it, size the KV cache (``agree``: the smallest
    size any tensor-parallel rank can hold) and give the runner its caches."""
    if shard.platform.needs_profile_run:
        # The KV cache gets what the largest step leaves free.
        runner.profile_run(min(limits.max_num_batched_tokens, shard.max_model_len),
                           limits.max_num_seqs)
    spec = full_spec(shard.model.attention_spec(), config.cache.block_size, shard.platform)
    num_blocks = resolve_num_blocks(config, shard.platform, spec,
                                    shard.model.num_attention_layers(), shard.max_model_len,
                                    draft_specs)
    if agree is not None:
        num_blocks = agree(num_blocks)
    runner.initialize_kv_caches(allocate_kv_caches(shard, num_blocks, config.cache.block_size))
    logger.info("KV cache: %d blocks of %d tokens", num_blocks, config.cache.block_size)
    return num_blocks


def build_runner(config: EngineConfig, registries: Registries, shard: ModelShard,
                 limits: SchedulerLimits, fill_bitmasks: FillBitmasks = fill_one_by_one,
                 drafter: Drafter | None = None) -> ModelRunner:
    block_size = config.cache.block_size
    buffers = InputBuffers(
        max_num_tokens=max(limits.max_num_batched_tokens, limits.max_num_seqs),
        max_num_seqs=limits.max_num_seqs,
        max_blocks_per_seq=-(-limits.max_model_len // block_size),
        platform=shard.platform)
    sampler = registries["sampler"].create(config.sampler)
    return ModelRunner(shard.model, shard.backend, sampler, buffers, block_size,
                       shard.platform, fill_bitmasks, drafter, limits.num_speculative_tokens,
                       shard.hf_config.vocab_size)


def use_cuda_graphs(config: EngineConfig, platform: Platform, backend: AttentionBackend,
                    drafter: Drafter | None = None) -> bool:
    """Graphs need a platform and backend that support them, and no enforce_eager.

    A model-based drafter turns them off: it reads the target's hidden states of
    every step, which captured decode graphs do not keep.
    """
    if config.model.enforce_eager:
        return False
    if config.parallel.tensor_parallel_size > 1:
        # Every rank would have to capture (and replay) its collectives in step.
        logger.info("CUDA graphs off: tensor_parallel_size > 1 runs eagerly for now")
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
