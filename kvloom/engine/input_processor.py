"""Turning a user's prompt and SamplingParams into validated scheduler Requests.

Every check here raises ValueError naming the offending field before anything
enters the engine, so a bad request never disturbs the others. The OpenAI server
calls the same checks (``check_text_length``, ``check_length``, ``check_token_ids``,
``check_cache_salt``) before its own tokenization, so both entry points share them.
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass
from typing import Any, Union

from kvloom.sampling_params import MAX_SEED, MIN_SEED, SamplingParams, check_text
from kvloom.request import Request

# A prompt: text, or a dict with "prompt" (text) or "prompt_token_ids", and
# optionally "cache_salt" (vLLM's keys).
PromptType = Union[str, dict[str, Any]]
PROMPT_KEYS = ("prompt", "prompt_token_ids", "cache_salt")

# vLLM has no cap; a salt is a tenant or user id, so 256 characters is plenty
# and keeps what is hashed into every block's root hash small.
MAX_CACHE_SALT_CHARS = 256
# A text longer than (longest vocabulary key) * max_model_len characters needs
# more than max_model_len tokens: a token covers at most as many characters as
# its key has (byte-level BPE: one key character per byte, and a character is
# at least one byte). The margin leaves room for normalizers that compose
# characters (NFC). Assumes the tokenizer drops no characters (true of
# byte-level BPE and SentencePiece byte-fallback tokenizers).
TEXT_LENGTH_MARGIN = 2


class ContextLengthError(ValueError):
    """A prompt, or prompt plus max_tokens, that does not fit the model's context;
    the message starts with the field (``prompt`` or ``max_tokens``)."""

    code = "context_length_exceeded"


@dataclass(slots=True)
class ProcessedPrompt:
    text: str | None
    token_ids: list[int]
    cache_salt: str | None = None


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
        self._max_token_chars: int | None = None  # computed on the first text prompt

    def process_prompt(self, prompt: PromptType) -> ProcessedPrompt:
        cache_salt = None
        if isinstance(prompt, dict):
            unknown = set(prompt) - set(PROMPT_KEYS)
            if unknown:
                raise ValueError(f"unknown prompt field(s) {sorted(map(str, unknown))[:5]}; "
                                 "use 'prompt' or 'prompt_token_ids' (and 'cache_salt')")
            cache_salt = check_cache_salt(prompt.get("cache_salt"))
            if "prompt_token_ids" in prompt:
                token_ids = self.check_token_ids(prompt["prompt_token_ids"])
                text = prompt.get("prompt")
                if text is not None and not isinstance(text, str):
                    raise ValueError("prompt must be a string when given with prompt_token_ids")
                return ProcessedPrompt(None if text is None else check_text("prompt", text),
                                       token_ids, cache_salt)
            prompt = prompt.get("prompt")
        if not isinstance(prompt, str):
            raise ValueError(f"prompt must be a string or a dict with 'prompt' or "
                             f"'prompt_token_ids', got {type(prompt).__name__}")
        if prompt == "":
            raise ValueError("prompt must not be empty")
        check_text("prompt", prompt)
        if self.tokenizer is None:
            raise ValueError("the engine was started with skip_tokenizer_init; "
                             "pass {'prompt_token_ids': [...]} instead of text")
        self.check_text_length(len(prompt))
        return ProcessedPrompt(prompt, self.check_token_ids(self.tokenizer.encode(prompt)),
                               cache_salt)

    def make_requests(self, request_id: str, prompt: ProcessedPrompt, params: SamplingParams,
                      priority: int = 0, cache_salt: str | None = None,
                      arrival_time: float | None = None) -> list[Request]:
        """One Request per sample (``params.n``), sharing the prompt.

        ``cache_salt`` defaults to the prompt's own (its dict's "cache_salt").
        """
        if not isinstance(params, SamplingParams):
            raise ValueError(f"sampling_params must be SamplingParams, got {type(params).__name__}")
        if isinstance(priority, bool) or not isinstance(priority, int):
            raise ValueError(f"priority must be an integer, got {priority!r}")
        cache_salt = check_cache_salt(cache_salt if cache_salt is not None
                                      else prompt.cache_salt)
        max_tokens = self.check_length(len(prompt.token_ids), params)
        self._check_stop_token_ids(params)
        extra = {} if arrival_time is None else {"arrival_time": arrival_time}
        if params.n == 1:
            return [Request(request_id, prompt.token_ids, params, self.eos_token_ids, max_tokens,
                            priority=priority, cache_salt=cache_salt, **extra)]
        return [Request(child_request_id(request_id, index), prompt.token_ids,
                        child_params(params, index), self.eos_token_ids, max_tokens,
                        priority=priority, cache_salt=cache_salt, **extra)
                for index in range(params.n)]

    def check_token_ids(self, token_ids: Any, name: str = "prompt_token_ids") -> list[int]:
        """``token_ids`` as a list, if it is a non-empty list of ids in the vocabulary."""
        if not isinstance(token_ids, (list, tuple)) or len(token_ids) == 0:
            raise ValueError(f"{name} must be a non-empty list of integers")
        vocab_size = self.limits.vocab_size
        for token_id in token_ids:
            if isinstance(token_id, bool) or not isinstance(token_id, int):
                raise ValueError(f"{name} must be integers, got {type(token_id).__name__}")
            if not 0 <= token_id < vocab_size:
                shown = token_id if abs(token_id) < 10**12 else "an id"
                raise ValueError(f"{name} contains {shown}, outside the "
                                 f"vocabulary [0, {vocab_size})")
        return list(token_ids)

    def check_text_length(self, num_chars: int) -> None:
        """Refuse, before tokenizing it, a prompt text too long to ever fit.

        Raises ContextLengthError (field ``prompt``) when ``num_chars`` characters
        must make more than max_model_len tokens (see ``TEXT_LENGTH_MARGIN``).
        """
        max_token_chars = self.max_token_chars()
        if max_token_chars is None:
            return
        max_model_len = self.limits.max_model_len
        max_chars = TEXT_LENGTH_MARGIN * max_token_chars * max_model_len
        if num_chars > max_chars:
            raise ContextLengthError(
                f"prompt is {num_chars} characters long: with at most {max_token_chars} "
                f"characters per token that is more than this model's maximum context "
                f"length (max_model_len) of {max_model_len} tokens")

    def max_token_chars(self) -> int | None:
        """The longest vocabulary key's length (None without a tokenizer or vocabulary)."""
        if self._max_token_chars is None and self.tokenizer is not None:
            get_vocab = getattr(self.tokenizer, "get_vocab", None)
            vocab = get_vocab() if callable(get_vocab) else None
            if vocab:
                self._max_token_chars = max(1, max(len(key) for key in vocab))
        return self._max_token_chars

    def check_length(self, num_prompt: int, params: SamplingParams, clamp: bool = True) -> int:
        """The request's output budget, after checking it can ever run.

        With ``clamp`` (offline, as in vLLM) a ``max_tokens`` beyond the context
        window is cut to the room left; without (the OpenAI server) it is an error.
        Raises ContextLengthError for the context window, ValueError for the KV
        cache and ``min_tokens``.
        """
        limits = self.limits
        if num_prompt >= limits.max_model_len:
            raise ContextLengthError(
                f"prompt has {num_prompt} tokens, but this model's maximum context length "
                f"(max_model_len) is {limits.max_model_len} tokens: no room for any output "
                "token")
        room = limits.max_model_len - num_prompt
        if params.max_tokens is None:
            max_tokens = room
        elif params.max_tokens > room and not clamp:
            raise ContextLengthError(
                f"max_tokens ({params.max_tokens}) plus the prompt's {num_prompt} tokens "
                f"exceed this model's maximum context length (max_model_len) of "
                f"{limits.max_model_len} tokens")
        else:
            max_tokens = min(params.max_tokens, room)
        if params.min_tokens > max_tokens:
            raise ValueError(
                f"min_tokens ({params.min_tokens}) is more than the {max_tokens} tokens this "
                f"request can generate (max_model_len {limits.max_model_len} minus the "
                f"prompt's {num_prompt} tokens, or max_tokens)")
        self._check_kv_blocks(num_prompt, max_tokens)
        return max_tokens

    def _check_kv_blocks(self, num_prompt: int, max_tokens: int) -> None:
        limits = self.limits
        # The last sampled token is never fed back, so it needs no KV slot.
        num_blocks = -(-(num_prompt + max_tokens - 1) // limits.block_size)
        if num_blocks <= limits.num_kv_blocks:
            return
        num_prompt_blocks = -(-num_prompt // limits.block_size)
        if num_prompt_blocks > limits.num_kv_blocks:
            raise ValueError(
                f"prompt ({num_prompt} tokens) needs {num_prompt_blocks} KV-cache blocks but "
                f"the cache has {limits.num_kv_blocks}: give the KV cache more memory")
        raise ValueError(
            f"max_tokens ({max_tokens}) plus the prompt's {num_prompt} tokens needs "
            f"{num_blocks} KV-cache blocks but the cache has {limits.num_kv_blocks}: "
            "lower max_tokens or give the KV cache more memory")

    def _check_stop_token_ids(self, params: SamplingParams) -> None:
        for token_id in params.stop_token_ids or ():
            if not 0 <= token_id < self.limits.vocab_size:
                shown = token_id if abs(token_id) < 10**12 else "an id"
                raise ValueError(f"stop_token_ids contains {shown}, outside the "
                                 f"vocabulary [0, {self.limits.vocab_size})")


def check_cache_salt(cache_salt: Any) -> str | None:
    """``cache_salt`` if it is None or a non-empty, valid string of at most
    ``MAX_CACHE_SALT_CHARS`` characters; a ValueError naming the field otherwise."""
    if cache_salt is None:
        return None
    if not isinstance(cache_salt, str):
        raise ValueError(f"cache_salt must be a string, got {type(cache_salt).__name__}")
    if not cache_salt:
        raise ValueError("cache_salt must not be empty")
    if len(cache_salt) > MAX_CACHE_SALT_CHARS:
        raise ValueError(f"cache_salt must be at most {MAX_CACHE_SALT_CHARS} characters, "
                         f"got {len(cache_salt)}")
    return check_text("cache_salt", cache_salt)


def child_request_id(request_id: str, index: int) -> str:
    return f"{index}_{request_id}"


def child_seed(seed: int, index: int) -> int:
    """Sample ``index``'s seed: seed + index (as vLLM), wrapped into int64 so it is
    still a valid seed; torch reads seeds modulo 2**64, so the stream is the same."""
    return (seed + index - MIN_SEED) % (MAX_SEED - MIN_SEED + 1) + MIN_SEED


def child_params(params: SamplingParams, index: int) -> SamplingParams:
    """The params of sample ``index`` of an n > 1 request: n=1, its own seed."""
    seed = None if params.seed is None else child_seed(params.seed, index)
    return dataclasses.replace(params, n=1, seed=seed)
