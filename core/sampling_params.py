"""SamplingParams: how to pick tokens for one request (vLLM's field names and defaults)."""

from __future__ import annotations

import enum
import math
from dataclasses import dataclass, field

# Logprobs are returned for at most this many top tokens, so a request cannot
# make the engine allocate vocabulary-sized results per step.
MAX_LOGPROBS = 20
MAX_N = 128
# Temperatures below this are greedy: dividing logits by them overflows (as in vLLM).
GREEDY_TEMPERATURE = 1e-5


class RequestOutputKind(enum.Enum):
    """What each RequestOutput of a request carries."""

    CUMULATIVE = "cumulative"  # everything so far (Engine.step default)
    DELTA = "delta"            # only what is new since the last output (streaming)
    FINAL_ONLY = "final_only"  # nothing until the request finishes (LLM.generate)


@dataclass
class StructuredOutputsParams:
    """Constrain a request's output (vLLM's field names); set exactly one field.

    Attributes:
        json: a JSON schema (dict or JSON string).
        regex: a regular expression the whole output must match.
        choice: the output is exactly one of these strings.
        grammar: an EBNF grammar (XGrammar's dialect).
        json_object: any JSON object.
    """

    json: dict | str | None = None
    regex: str | None = None
    choice: list[str] | None = None
    grammar: str | None = None
    json_object: bool | None = None

    def __post_init__(self) -> None:
        chosen = [name for name in ("json", "regex", "choice", "grammar", "json_object")
                  if getattr(self, name) not in (None, False)]
        if len(chosen) != 1:
            raise ValueError("structured_outputs must set exactly one of json, regex, choice, "
                             f"grammar, json_object (got {chosen or 'none'})")

    @property
    def kind_and_spec(self) -> tuple[str, object]:
        for name in ("json", "regex", "choice", "grammar"):
            if getattr(self, name) is not None:
                return name, getattr(self, name)
        return "json_object", True


@dataclass
class SamplingParams:
    """Sampling parameters, validated on construction.

    Every invalid value raises ``ValueError`` naming the field. ``top_k`` 0 or
    -1 and ``top_p`` 1.0 disable those filters; ``temperature`` 0 is greedy.
    """

    n: int = 1
    temperature: float = 1.0
    top_p: float = 1.0
    top_k: int = 0
    min_p: float = 0.0
    presence_penalty: float = 0.0
    frequency_penalty: float = 0.0
    repetition_penalty: float = 1.0
    seed: int | None = None
    max_tokens: int | None = 16
    min_tokens: int = 0
    stop: str | list[str] | None = None
    stop_token_ids: list[int] | None = None
    ignore_eos: bool = False
    logprobs: int | None = None
    skip_special_tokens: bool = True
    include_stop_str_in_output: bool = False
    output_kind: RequestOutputKind = RequestOutputKind.CUMULATIVE
    structured_outputs: StructuredOutputsParams | None = None
    _stop_list: list[str] = field(default_factory=list, init=False, repr=False)

    def __post_init__(self) -> None:
        self._check_counts()
        self._check_probabilities()
        self._check_penalties()
        self._check_stops()
        if self.top_k == -1:
            self.top_k = 0
        if self.structured_outputs is not None and not isinstance(
                self.structured_outputs, StructuredOutputsParams):
            raise ValueError("structured_outputs must be a StructuredOutputsParams")

    @property
    def stop_strings(self) -> list[str]:
        return self._stop_list

    @property
    def is_greedy(self) -> bool:
        return self.temperature < GREEDY_TEMPERATURE

    def _check_counts(self) -> None:
        _require_int("n", self.n)
        if not 1 <= self.n <= MAX_N:
            raise ValueError(f"n must be between 1 and {MAX_N}, got {self.n}")
        if self.max_tokens is not None:
            _require_int("max_tokens", self.max_tokens)
            if self.max_tokens < 1:
                raise ValueError(f"max_tokens must be at least 1, got {self.max_tokens}")
        _require_int("min_tokens", self.min_tokens)
        if self.min_tokens < 0:
            raise ValueError(f"min_tokens must be non-negative, got {self.min_tokens}")
        if self.max_tokens is not None and self.min_tokens > self.max_tokens:
            raise ValueError(f"min_tokens ({self.min_tokens}) must not exceed "
                             f"max_tokens ({self.max_tokens})")
        if self.logprobs is not None:
            _require_int("logprobs", self.logprobs)
            if not 0 <= self.logprobs <= MAX_LOGPROBS:
                raise ValueError(f"logprobs must be between 0 and {MAX_LOGPROBS}, "
                                 f"got {self.logprobs}")
        if self.seed is not None:
            _require_int("seed", self.seed)
        _require_int("top_k", self.top_k)
        if self.top_k < -1:
            raise ValueError(f"top_k must be -1, 0 (off) or positive, got {self.top_k}")

    def _check_probabilities(self) -> None:
        _require_finite("temperature", self.temperature)
        if self.temperature < 0:
            raise ValueError(f"temperature must be non-negative, got {self.temperature}")
        _require_finite("top_p", self.top_p)
        if not 0.0 < self.top_p <= 1.0:
            raise ValueError(f"top_p must be in (0, 1], got {self.top_p}")
        _require_finite("min_p", self.min_p)
        if not 0.0 <= self.min_p <= 1.0:
            raise ValueError(f"min_p must be in [0, 1], got {self.min_p}")

    def _check_penalties(self) -> None:
        for name in ("presence_penalty", "frequency_penalty"):
            value = getattr(self, name)
            _require_finite(name, value)
            if not -2.0 <= value <= 2.0:
                raise ValueError(f"{name} must be in [-2, 2], got {value}")
        _require_finite("repetition_penalty", self.repetition_penalty)
        if self.repetition_penalty <= 0.0:
            raise ValueError(f"repetition_penalty must be positive, got {self.repetition_penalty}")

    def _check_stops(self) -> None:
        stop = self.stop
        if stop is None:
            stops: list[str] = []
        elif isinstance(stop, str):
            stops = [stop]
        elif isinstance(stop, (list, tuple)) and all(isinstance(s, str) for s in stop):
            stops = list(stop)
        else:
            raise ValueError("stop must be a string or a list of strings")
        if any(s == "" for s in stops):
            raise ValueError("stop must not contain empty strings")
        self._stop_list = stops
        if self.stop_token_ids is not None:
            if not isinstance(self.stop_token_ids, (list, tuple)):
                raise ValueError("stop_token_ids must be a list of integers")
            for token_id in self.stop_token_ids:
                _require_int("stop_token_ids", token_id)
            self.stop_token_ids = list(self.stop_token_ids)


def _require_int(name: str, value: object) -> None:
    if isinstance(value, bool) or not isinstance(value, int):
        raise ValueError(f"{name} must be an integer, got {value!r}")


def _require_finite(name: str, value: object) -> None:
    if isinstance(value, bool) or not isinstance(value, (int, float)):
        raise ValueError(f"{name} must be a number, got {value!r}")
    if not math.isfinite(value):
        raise ValueError(f"{name} must be finite, got {value!r}")
