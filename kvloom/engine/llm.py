"""LLM: the vLLM-compatible offline API. Switching from vLLM is a change of import."""

from __future__ import annotations

import dataclasses
import itertools
import logging
from typing import Any, Sequence

from kvloom.config import EngineConfig
from kvloom.engine.engine import Engine
from kvloom.failures import EngineStepError, RequestFailedError
from kvloom.engine.input_processor import PromptType
from kvloom.outputs import RequestOutput
from kvloom.plugin_manager import KvloomPluginManager
from kvloom.sampling_params import RequestOutputKind, SamplingParams

logger = logging.getLogger(__name__)

# LLM(...) keyword -> (config section, key). Keys not listed go to the top level.
_KWARG_TO_SECTION = {
    "block_size": ("cache", "block_size"),
    "gpu_memory_utilization": ("cache", "gpu_memory_utilization"),
    "enable_prefix_caching": ("cache", "enable_prefix_caching"),
    "num_gpu_blocks_override": ("cache", "num_gpu_blocks_override"),
    "kv_cache_memory_bytes": ("cache", "kv_cache_memory_bytes"),
    "max_num_seqs": ("scheduler", "max_num_seqs"),
    "max_num_batched_tokens": ("scheduler", "max_num_batched_tokens"),
    "enable_chunked_prefill": ("scheduler", "enable_chunked_prefill"),
    "scheduling_policy": ("scheduler", "policy"),
    "tensor_parallel_size": ("parallel", "tensor_parallel_size"),
    "pipeline_parallel_size": ("parallel", "pipeline_parallel_size"),
    "distributed_executor_backend": ("parallel", "distributed_executor_backend"),
    "ray_address": ("parallel", "ray_address"),
    "speculative_config": ("speculative", None),
}


def engine_config_from_kwargs(model: str, **kwargs: Any) -> EngineConfig:
    """Map vLLM-style ``LLM(...)`` keyword arguments onto an EngineConfig."""
    valid = set(_KWARG_TO_SECTION) | set(EngineConfig.valid_keys())
    unknown = sorted(set(kwargs) - valid)
    if unknown:
        raise ValueError(f"unknown LLM argument(s) {', '.join(map(repr, unknown))}; "
                         f"valid keys: {', '.join(sorted(valid))}")
    data: dict[str, Any] = {"model": model}
    for key, value in kwargs.items():
        if value is None:
            continue
        section, field = _KWARG_TO_SECTION.get(key, (None, key))
        if section is None:
            data[key] = value
        elif field is None:
            data[section] = value
        else:
            data.setdefault(section, {})[field] = value
    return EngineConfig.from_dict(data)


class LLM:
    """Generate text offline for a batch of prompts.

    Example::

        from kvloom import LLM, SamplingParams
        llm = LLM(model="./my-qwen2", dtype="float32")
        outputs = llm.generate(["Hello, my name is"], SamplingParams(max_tokens=16))
        print(outputs[0].outputs[0].text)
    """

    def __init__(self, model: str, *, plugin_manager: KvloomPluginManager | None = None,
                 **kwargs: Any) -> None:
        self._init_engine(Engine(engine_config_from_kwargs(model, **kwargs), plugin_manager))

    @classmethod
    def from_config(cls, source: Any, plugin_manager: KvloomPluginManager | None = None) -> "LLM":
        """An LLM from an engine.yaml path, a dict, or an EngineConfig."""
        llm = cls.__new__(cls)
        llm._init_engine(Engine.from_config(source, plugin_manager))
        return llm

    def _init_engine(self, engine: Engine) -> None:
        self.engine = engine
        self._request_counter = itertools.count()

    def get_tokenizer(self) -> Any:
        return self.engine.tokenizer

    def generate(self, prompts: PromptType | Sequence[PromptType],
                 sampling_params: SamplingParams | Sequence[SamplingParams] | None = None,
                 use_tqdm: bool = False,
                 priority: Sequence[int] | None = None) -> list[RequestOutput]:
        """Run every prompt to completion; results come back in input order.

        ``priority`` (one int per prompt, lower runs first) matters only with
        ``scheduling_policy="priority"``.
        """
        if isinstance(prompts, (str, dict)):
            prompts = [prompts]
        prompts = list(prompts)
        params_list = self._params_per_prompt(sampling_params, len(prompts))
        priorities = list(priority) if priority is not None else [0] * len(prompts)
        if len(priorities) != len(prompts):
            raise ValueError(f"got {len(priorities)} priorities for {len(prompts)} prompts")
        request_ids = []
        try:
            for prompt, params, prio in zip(prompts, params_list, priorities):
                request_id = str(next(self._request_counter))
                self.engine.add_request(request_id, prompt, params, priority=prio)
                request_ids.append(request_id)
        except Exception:
            self.engine.abort_request(request_ids)  # leave nothing half-queued
            raise
        outputs = self._run_to_completion(request_ids, use_tqdm)
        errors = {request_id: error for request_id in request_ids
                  if (error := self.engine.pop_request_error(request_id)) is not None}
        step_error = next((e for e in errors.values() if isinstance(e, EngineStepError)), None)
        if step_error is not None:  # the engine reset itself; these outputs are cut short
            raise step_error
        for request_id, error in errors.items():
            reason = "error" if isinstance(error, RequestFailedError) else "abort"
            logger.warning("request %s ended with finish_reason %r: %s", request_id, reason, error)
        return outputs

    def chat(self, messages: list[dict[str, Any]] | list[list[dict[str, Any]]],
             sampling_params: SamplingParams | Sequence[SamplingParams] | None = None,
             use_tqdm: bool = False, chat_template: str | None = None,
             add_generation_prompt: bool = True,
             chat_template_kwargs: dict[str, Any] | None = None) -> list[RequestOutput]:
        """Generate replies to one conversation or a list of them via the chat template."""
        tokenizer = self.engine.tokenizer
        if tokenizer is None:
            raise ValueError("chat needs a tokenizer; the engine was started with "
                             "skip_tokenizer_init")
        conversations = [messages] if messages and isinstance(messages[0], dict) else messages
        prompts = []
        for conversation in conversations:
            token_ids = tokenizer.apply_chat_template(
                conversation, chat_template=chat_template, tokenize=True,
                add_generation_prompt=add_generation_prompt, **(chat_template_kwargs or {}))
            if isinstance(token_ids, dict) or hasattr(token_ids, "keys"):
                token_ids = token_ids["input_ids"]  # transformers 5 returns a BatchEncoding
            prompts.append({"prompt_token_ids": list(token_ids)})
        return self.generate(prompts, sampling_params, use_tqdm)

    def _params_per_prompt(self, sampling_params: Any, count: int) -> list[SamplingParams]:
        if sampling_params is None:
            sampling_params = SamplingParams()
        if isinstance(sampling_params, SamplingParams):
            sampling_params = [sampling_params] * count
        sampling_params = list(sampling_params)
        if len(sampling_params) != count:
            raise ValueError(f"got {len(sampling_params)} sampling_params for {count} prompts")
        return [dataclasses.replace(p, output_kind=RequestOutputKind.FINAL_ONLY)
                for p in sampling_params]

    def _run_to_completion(self, request_ids: list[str], use_tqdm: bool) -> list[RequestOutput]:
        results: dict[str, RequestOutput] = {}
        progress = _progress_bar(len(request_ids)) if use_tqdm else None
        while self.engine.has_unfinished_requests():
            for output in self.engine.step():
                if output.finished:
                    results[output.request_id] = output
                    if progress is not None:
                        progress.update(1)
        if progress is not None:
            progress.close()
        return [results[request_id] for request_id in request_ids]


def _progress_bar(total: int) -> Any:
    from tqdm import tqdm

    return tqdm(total=total, desc="Processed prompts", unit="req")
