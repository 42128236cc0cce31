"""Turning a user's prompt and SamplingParams into validated scheduler Requests.

Every check here raises ValueError naming the offending field before anything
enters the engine, so a bad request never disturbs the others.
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass
from typing import Any, Union

from kvloom.sampling_params import SamplingParams
from kvloom.scheduler.request import Request

# A prompt: text, a {"prompt": text} dict, or a {"prompt_token_ids": [...]} dict.
PromptType = Union[str, dict[str, Any]]


@dataclass(slots=True)
class ProcessedPrompt:
    text: str | None
    token_ids: list[int]


@dataclass(slots=True)
class InputLimits:
    vocab_size: int
    max_model_len: int
    block_size: int
    num_kv_blocks: int


class InputProcessor:
    def __init__(self, tokenizer: Any, limits: InputLimits, eos_token_ids: frozenset[int]) -> None:
        self.tokenizer = tokenizer
        self.limits = limits
        self.eos_token_ids = eos_token_ids

    def process_prompt(self, prompt: PromptType) -> ProcessedPrompt:
        if isinstance(prompt, dict):
            unknown = set(prompt) - {"prompt", "prompt_token_ids"}
            if unknown:
                raise ValueError(f"unknown prompt field(s) {sorted(unknown)}; "
                                 "use 'prompt' or 'prompt_token_ids'")
            if "prompt_token_ids" in prompt:
                token_ids = self._check_token_ids(prompt["prompt_token_ids"])
                return ProcessedPrompt(prompt.get("prompt"), token_ids)
            prompt = prompt.get("prompt")
        if not isinstance(prompt, str):
            raise ValueError(f"prompt must be a string or a dict with 'prompt' or "
                             f"'prompt_token_ids', got {type(prompt).__name__}")
        if prompt == "":
            raise ValueError("prompt must not be empty")
        if self.tokenizer is None:
            raise ValueError("the engine was started with skip_tokenizer_init; "
                             "pass {'prompt_token_ids': [...]} instead of text")
        return ProcessedPrompt(prompt, self._check_token_ids(self.tokenizer.encode(prompt)))

    def make_requests(self, request_id: str, prompt: ProcessedPrompt, params: SamplingParams,
                      priority: int = 0, cache_salt: str | None = None,
                      arrival_time: float | None = None) -> list[Request]:
        """One Request per sample (``params.n``), sharing the prompt."""
        if not isinstance(params, SamplingParams):
            raise ValueError(f"sampling_params must be SamplingParams, got {type(params).__name__}")
        if isinstance(priority, bool) or not isinstance(priority, int):
            raise ValueError(f"priority must be an integer, got {priority!r}")
        if cache_salt is not None and not isinstance(cache_salt, str):
            raise ValueError("cache_salt must be a string")
        max_tokens = self._check_length(prompt.token_ids, params)
        self._check_stop_token_ids(params)
        extra = {} if arrival_time is None else {"arrival_time": arrival_time}
        if params.n == 1:
            return [Request(request_id, prompt.token_ids, params, self.eos_token_ids, max_tokens,
                            priority=priority, cache_salt=cache_salt, **extra)]
        return [Request(child_request_id(request_id, index), prompt.token_ids,
                        child_params(params, index), self.eos_token_ids, max_tokens,
                        priority=priority, cache_salt=cache_salt, **extra)
                for index in range(params.n)]

    def _check_token_ids(self, token_ids: Any) -> list[int]:
        if not isinstance(token_ids, (list, tuple)) or len(token_ids) == 0:
            raise ValueError("prompt_token_ids must be a non-empty list of integers")
        vocab_size = self.limits.vocab_size
        for token_id in token_ids:
            if isinstance(token_id, bool) or not isinstance(token_id, int):
                raise ValueError(f"prompt_token_ids must be integers, got {token_id!r}")
            if not 0 <= token_id < vocab_size:
                raise ValueError(f"prompt_token_ids contains {token_id}, outside the "
                                 f"vocabulary [0, {vocab_size})")
        return list(token_ids)

    def _check_length(self, token_ids: list[int], params: SamplingParams) -> int:
        """The request's output budget, after checking it can ever run."""
        limits = self.limits
        num_prompt = len(token_ids)
        if num_prompt >= limits.max_model_len:
            raise ValueError(f"the prompt has {num_prompt} tokens but max_model_len is "
                             f"{limits.max_model_len}: no room for any output token")
        room = limits.max_model_len - num_prompt
        max_tokens = room if params.max_tokens is None else min(params.max_tokens, room)
        # The last sampled token is never fed back, so it needs no KV slot.
        num_blocks = -(-(num_prompt + max_tokens - 1) // limits.block_size)
        if num_blocks > limits.num_kv_blocks:
            raise ValueError(
                f"the prompt ({num_prompt} tokens) plus max_tokens ({max_tokens}) needs "
                f"{num_blocks} KV-cache blocks but the cache has {limits.num_kv_blocks}: "
                "lower max_tokens or give the KV cache more memory")
        return max_tokens

    def _check_stop_token_ids(self, params: SamplingParams) -> None:
        for token_id in params.stop_token_ids or ():
            if not 0 <= token_id < self.limits.vocab_size:
                raise ValueError(f"stop_token_ids contains {token_id}, outside the "
                                 f"vocabulary [0, {self.limits.vocab_size})")


def child_request_id(request_id: str, index: int) -> str:
    return f"{index}_{request_id}"


def child_params(params: SamplingParams, index: int) -> SamplingParams:
    """The params of sample ``index`` of an n > 1 request: n=1, its own seed."""
    seed = None if params.seed is None else params.seed + index
    return dataclasses.replace(params, n=1, seed=seed)
