"""SamplingParams: how to pick tokens for one request (vLLM's field names and defaults).

Every limit a request field has lives here (structured-output specs' in
structured_output/params.py; what needs the model, in the input processor) and is shared by the offline API and the OpenAI server, which
turns these ValueErrors (their message starts with the field) into 400s.

Each SamplingParams field is declared once, on the field (a ``SamplingField`` in its
metadata: help, range, and where else it appears). The OpenAI request models, the
server's error params, the ``kvloom generate`` flags and the runner's per-row sampler
columns are derived from ``SAMPLING_FIELDS``, so a new parameter is one field here.
"""

from __future__ import annotations

import dataclasses
import enum
import functools
import math
import struct
import types
import typing
from collections.abc import Mapping
from dataclasses import dataclass, field
from typing import Any

# Re-exported: the structured-output limits and params are part of this module's API.
from kvloom.structured_output.params import (MAX_CHOICES, MAX_JSON_SCHEMA_DEPTH,  # noqa: F401
                                             MAX_SPEC_BYTES, StructuredOutputsParams)
from kvloom.value_checks import check_text, describe_value as _describe  # noqa: F401

# Logprobs are returned for at most this many top tokens, so a request cannot
# make the engine allocate vocabulary-sized results per step.
MAX_LOGPROBS = 20
MAX_N = 128
# Temperatures below this are greedy: dividing logits by them overflows (as in vLLM).
GREEDY_TEMPERATURE = 1e-5
# vLLM's seed range (int64). torch.Generator.manual_seed takes [-2**63, 2**64 - 1];
# the samples of an n > 1 request get seed + index wrapped back into int64 (the
# same generator state as the unwrapped seed: torch reads seeds modulo 2**64).
MIN_SEED = -2**63
MAX_SEED = 2**63 - 1
# top_k larger than the vocabulary means "every token"; the bound keeps it in an
# int32, which any sampler kernel can hold (the runner's int64 tensor overflowed at 2**63).
MAX_TOP_K = 2**31 - 1
# max_tokens and min_tokens: no context window comes near int32's range, and a
# bound keeps the values in any integer tensor a plugin puts them in.
MAX_NUM_TOKENS = 2**31 - 1
# Above ~10 sampling is already near uniform. 1e4 keeps 1/T a normal float16
# (>= 6.1e-5), so a kernel multiplying by 1/T never flushes it to 0, and T itself
# far from float32's max: at 1e39 T is inf in float32 and a banned token's
# -inf / inf is NaN, which poisons the softmax.
MAX_TEMPERATURE = 1e4
# repetition_penalty divides the positive logits of seen tokens and multiplies
# the negative ones: 100x either way already all but forbids (or forces) a
# repeat, while near 0 it divides by ~0 (inf logits, NaN probabilities).
MIN_REPETITION_PENALTY = 0.01
MAX_REPETITION_PENALTY = 100.0
# presence_penalty / frequency_penalty: OpenAI's range.
MAX_ABS_PENALTY = 2.0
# Stop strings are searched for after every token and stop token ids looked up
# in a list per token: bounded so one request cannot slow every step. (OpenAI
# allows 4 stop strings; vLLM has no cap.)
MAX_STOP_STRINGS = 64
MAX_STOP_STRING_CHARS = 1024
MAX_STOP_TOKEN_IDS = 1024
class RequestOutputKind(enum.Enum):
    """What each RequestOutput of a request carries."""

    CUMULATIVE = "cumulative"  # everything so far (Engine.step default)
    DELTA = "delta"            # only what is new since the last output (streaming)
    FINAL_ONLY = "final_only"  # nothing until the request finishes (LLM.generate)


@dataclass(frozen=True)
class SamplingField:
    """The declaration of one SamplingParams field: what its type and default do not say.

    Written in the field's metadata (``_declare``); ``name``, ``type`` and ``default``
    are filled in from the field itself when ``SAMPLING_FIELDS`` is built.

    Attributes:
        help: one line, for ``kvloom generate --help`` and the OpenAPI schema.
        low / high: the range an int or float field must lie in, checked on
            construction (every number declares one; None passes where the type
            allows None). Other types have checks of their own in SamplingParams.
        low_open: ``low`` itself is out of range.
        range_text: how an int's error words its range, where "between {low} and
            {high}" would mislead.
        openai: /v1/completions and /v1/chat/completions have a request field
            that sets it (named ``openai_name`` where that differs).
        openai_own_shape: protocol.py writes that request field itself, as its
            shape is not this field's (max_tokens, logprobs, structured_outputs).
            The other request fields are built from this declaration, with this
            type and default, and copied into SamplingParams as they are.
        openai_null_default: the request field defaults to null, which leaves
            this default (vLLM's request shape for the sampling knobs).
        openai_high: OpenAI's upper bound, where tighter than ``high``.
        cli: a ``kvloom generate --flag`` (numbers only: other flags need a shape).
        per_row: SamplingMetadata carries it as a per-row tensor (float32 for a
            float, int64 for an int), and a sampler plugin reads it there.
    """

    help: str
    low: float | None = None
    high: float | None = None
    low_open: bool = False
    range_text: str | None = None
    openai: bool = False
    openai_name: str | None = None
    openai_own_shape: bool = False
    openai_null_default: bool = False
    openai_high: float | None = None
    cli: bool = False
    per_row: bool = False
    name: str = ""
    type: Any = None
    default: Any = None

    @property
    def request_name(self) -> str:
        return self.openai_name or self.name

    # Cached: every SamplingParams construction asks each field (a frozen dataclass's
    # cached_property writes its own __dict__, which freezing leaves alone).
    @functools.cached_property
    def optional(self) -> bool:
        return type(None) in self._type_members

    @functools.cached_property
    def number_type(self) -> type | None:
        """bool, int or float for a scalar field of that type (None allowed), else None."""
        members = [member for member in self._type_members if member is not type(None)]
        return members[0] if len(members) == 1 and members[0] in (bool, int, float) else None

    @property
    def _type_members(self) -> tuple[Any, ...]:
        if typing.get_origin(self.type) in (typing.Union, types.UnionType):
            return typing.get_args(self.type)
        return (self.type,)

    def check(self, value: object) -> None:
        """A ValueError naming the field unless ``value`` is of its type and range."""
        kind = self.number_type
        if kind is None or (value is None and self.optional):
            return
        if kind is bool:
            if not isinstance(value, bool):  # "false" would be truthy
                raise ValueError(f"{self.name} must be a boolean, got {value!r}")
        elif kind is int:
            _require_int_in(self.name, value, self.low, self.high, self.range_text)
        else:
            _require_float_in(self.name, value, self.low, self.high, self.low_open)


_DECLARATION = "kvloom.sampling_field"


def _declare(default: object, help: str, **declaration: Any) -> Any:
    """A dataclass field with its default and its SamplingField declaration."""
    return field(default=default,
                 metadata={_DECLARATION: SamplingField(help=help, **declaration)})


# What the sampling knobs have in common: a request field that defaults to null
# (vLLM's shape), a CLI flag, and a per-row tensor in SamplingMetadata.
_SAMPLER_KNOB = {"openai": True, "openai_null_default": True, "cli": True, "per_row": True}


@dataclass
class SamplingParams:
    """Sampling parameters, validated on construction.

    Every invalid value raises ``ValueError`` naming the field. ``top_k`` 0 or
    -1 and ``top_p`` 1.0 disable those filters; ``temperature`` 0 is greedy.
    The limits are this module's constants. Each field's declaration (help,
    range, request field, CLI flag, sampler column) is its ``SamplingField``.
    """

    n: int = _declare(1, "completions per prompt", low=1, high=MAX_N, openai=True, cli=True)
    temperature: float = _declare(
        1.0, "randomness of sampling; 0 is greedy", low=0.0, high=MAX_TEMPERATURE,
        openai_high=2.0, **_SAMPLER_KNOB)  # OpenAI's range
    top_p: float = _declare(
        1.0, "sample from the smallest set of tokens whose probabilities reach this; 1 is off",
        low=0.0, low_open=True, high=1.0, **_SAMPLER_KNOB)
    top_k: int = _declare(
        0, "sample from the k most likely tokens; 0 or -1 is off", low=-1, high=MAX_TOP_K,
        range_text="-1 or 0 (off) or between 1 and {high}", **_SAMPLER_KNOB)
    min_p: float = _declare(
        0.0, "drop tokens less likely than this fraction of the most likely one; 0 is off",
        low=0.0, high=1.0, **_SAMPLER_KNOB)
    presence_penalty: float = _declare(
        0.0, f"lower the logits of tokens already generated ({-MAX_ABS_PENALTY:g} to "
        f"{MAX_ABS_PENALTY:g})", low=-MAX_ABS_PENALTY, high=MAX_ABS_PENALTY, **_SAMPLER_KNOB)
    frequency_penalty: float = _declare(
        0.0, f"lower the logits of tokens by how often they were generated "
        f"({-MAX_ABS_PENALTY:g} to {MAX_ABS_PENALTY:g})", low=-MAX_ABS_PENALTY,
        high=MAX_ABS_PENALTY, **_SAMPLER_KNOB)
    repetition_penalty: float = _declare(
        1.0, "scale down the logits of tokens already seen; 1 is off",
        low=MIN_REPETITION_PENALTY, high=MAX_REPETITION_PENALTY, **_SAMPLER_KNOB)
    seed: int | None = _declare(None, "seed for this request's random sampling", low=MIN_SEED,
                                high=MAX_SEED, openai=True, cli=True)
    max_tokens: int | None = _declare(
        16, "most tokens to generate per completion", low=1, high=MAX_NUM_TOKENS,
        openai=True, openai_own_shape=True, cli=True)
    min_tokens: int = _declare(
        0, "tokens to generate before EOS or a stop may end a completion", low=0,
        high=MAX_NUM_TOKENS, openai=True, cli=True)
    stop: str | list[str] | None = _declare(
        None, "end a completion at this string (or any of these)", openai=True)
    stop_token_ids: list[int] | None = _declare(
        None, "end a completion at any of these token ids", openai=True)
    ignore_eos: bool = _declare(False, "keep generating past the end-of-sequence token",
                                openai=True)
    logprobs: int | None = _declare(
        None, "log-probabilities of this many top tokens per step", low=0, high=MAX_LOGPROBS,
        openai=True, openai_own_shape=True, cli=True)
    skip_special_tokens: bool = _declare(
        True, "leave special tokens out of the completion's text", openai=True)
    include_stop_str_in_output: bool = _declare(
        False, "end the completion's text with the stop string that ended it", openai=True)
    output_kind: RequestOutputKind = _declare(
        RequestOutputKind.CUMULATIVE, "what each RequestOutput of the request carries")
    structured_outputs: StructuredOutputsParams | None = _declare(
        None, "constrain the output to a JSON schema, regex, choice or grammar",
        openai=True, openai_own_shape=True)
    _stop_list: list[str] = field(default_factory=list, init=False, repr=False)

    def __post_init__(self) -> None:
        for declared in SAMPLING_FIELDS.values():
            declared.check(getattr(self, declared.name))
        if self.max_tokens is not None and self.min_tokens > self.max_tokens:
            raise ValueError(f"min_tokens ({self.min_tokens}) must not exceed "
                             f"max_tokens ({self.max_tokens})")
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
        if len(stops) > MAX_STOP_STRINGS:
            raise ValueError(f"stop has {len(stops)} strings; at most {MAX_STOP_STRINGS} "
                             "are allowed")
        for stop_string in stops:
            if stop_string == "":
                raise ValueError("stop must not contain empty strings")
            if len(stop_string) > MAX_STOP_STRING_CHARS:
                raise ValueError(f"stop strings must be at most {MAX_STOP_STRING_CHARS} "
                                 f"characters long, got one of {len(stop_string)}")
            check_text("stop", stop_string)
        self._stop_list = stops
        if self.stop_token_ids is not None:
            if not isinstance(self.stop_token_ids, (list, tuple)):
                raise ValueError("stop_token_ids must be a list of integers")
            if len(self.stop_token_ids) > MAX_STOP_TOKEN_IDS:
                raise ValueError(f"stop_token_ids has {len(self.stop_token_ids)} ids; at most "
                                 f"{MAX_STOP_TOKEN_IDS} are allowed")
            for token_id in self.stop_token_ids:
                _require_int("stop_token_ids", token_id)
            self.stop_token_ids = list(self.stop_token_ids)


def _require_int(name: str, value: object) -> None:
    if isinstance(value, bool) or not isinstance(value, int):
        raise ValueError(f"{name} must be an integer, got {_describe(value)}")


def _require_int_in(name: str, value: object, low: int, high: int,
                    range_text: str | None = None) -> None:
    _require_int(name, value)
    if not low <= value <= high:
        wording = (range_text or "between {low} and {high}").format(low=low, high=high)
        raise ValueError(f"{name} must be {wording}, got {_describe(value)}")


def _require_float_in(name: str, value: object, low: float, high: float,
                      low_open: bool = False) -> None:
    """A finite number in [low, high] (or (low, high]) as given and once rounded to
    float32, the dtype the runner's sampling tensors hold: 1e-50 is a positive
    top_p, but 0.0 in float32."""
    if isinstance(value, bool) or not isinstance(value, (int, float)):
        raise ValueError(f"{name} must be a number, got {_describe(value)}")
    try:
        value = float(value)
    except OverflowError:  # an int too large for a float
        raise ValueError(f"{name} must be finite, got {_describe(value)}") from None
    if not math.isfinite(value):
        raise ValueError(f"{name} must be finite, got {value!r}")
    for candidate, bottom, top in ((value, low, high), (_as_float32(value), _as_float32(low),
                                                        _as_float32(high))):
        if not (bottom < candidate if low_open else bottom <= candidate) or candidate > top:
            opening = "(" if low_open else "["
            raise ValueError(f"{name} must be in {opening}{low:g}, {high:g}], got {value!r}"
                             + ("" if candidate == value else
                                f" ({candidate!r} in float32)"))


def _as_float32(value: float) -> float:
    try:
        return struct.unpack("f", struct.pack("f", value))[0]
    except OverflowError:
        return math.copysign(math.inf, value)


# ------------------------------------------------------------ the derived places
def _declared_fields() -> dict[str, SamplingField]:
    """Every SamplingParams field's declaration, completed from the field and checked
    for what the places that derive from it need."""
    types_by_name = typing.get_type_hints(SamplingParams)
    declared = {}
    for dataclass_field in dataclasses.fields(SamplingParams):
        if not dataclass_field.init:
            continue
        if _DECLARATION not in dataclass_field.metadata:
            raise TypeError(f"SamplingParams.{dataclass_field.name} has no declaration: "
                            "give it a default with _declare(...)")
        entry = dataclasses.replace(dataclass_field.metadata[_DECLARATION],
                                    name=dataclass_field.name,
                                    type=types_by_name[dataclass_field.name],
                                    default=dataclass_field.default)
        _check_declaration(entry)
        declared[entry.name] = entry
    return declared


def _check_declaration(entry: SamplingField) -> None:
    number_type = entry.number_type
    if number_type in (int, float) and (entry.low is None or entry.high is None):
        raise TypeError(f"SamplingParams.{entry.name} declares no range (low, high): every "
                        "number a request sets is bounded")
    if entry.cli and number_type not in (int, float):
        raise TypeError(f"SamplingParams.{entry.name}: only numbers are declared CLI flags")
    if entry.per_row and (number_type not in (int, float) or entry.optional):
        raise TypeError(f"SamplingParams.{entry.name}: a per-row sampler column is an int "
                        "or a float, never None")


SAMPLING_FIELDS: Mapping[str, SamplingField] = types.MappingProxyType(_declared_fields())
# SamplingParams field -> request field, for the request fields built from the declaration
# and copied as they are (both request models have them).
OPENAI_SHARED_FIELDS: Mapping[str, str] = types.MappingProxyType({
    name: entry.request_name for name, entry in SAMPLING_FIELDS.items()
    if entry.openai and not entry.openai_own_shape})
# SamplingParams field -> request field, for every field a request sets.
OPENAI_REQUEST_NAMES: Mapping[str, str] = types.MappingProxyType({
    name: entry.request_name for name, entry in SAMPLING_FIELDS.items() if entry.openai})
# The per-row tensors of SamplingMetadata, in declaration order.
PER_ROW_FLOAT_FIELDS = tuple(name for name, entry in SAMPLING_FIELDS.items()
                             if entry.per_row and entry.number_type is float)
PER_ROW_INT_FIELDS = tuple(name for name, entry in SAMPLING_FIELDS.items()
                           if entry.per_row and entry.number_type is int)


def cli_sampling_fields() -> list[tuple[str, type, str]]:
    """(name, int or float, help) of each field ``kvloom generate`` has a flag for."""
    return [(name, entry.number_type, entry.help) for name, entry in SAMPLING_FIELDS.items()
            if entry.cli]
