"""SamplingParams: how to pick tokens for one request (vLLM's field names and defaults).

Every limit a request field has lives here (or, for what needs the model, in the
input processor) and is shared by the offline API and the OpenAI server, which
turns these ValueErrors (their message starts with the field) into 400s.
"""

from __future__ import annotations

import enum
import math
import re
import struct
from dataclasses import dataclass, field

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
# Structured output specs are compiled against the whole vocabulary. 100,000
# choices stalled every structured request for minutes; 1,024 short choices
# compile in ~0.1 s with XGrammar and a 32k vocabulary (1,024 choices filling
# all 64 KiB take ~1 s).
MAX_CHOICES = 1024
MAX_SPEC_BYTES = 64 * 1024
# Nested JSON objects and arrays in a schema (a level of nested object schemas
# is two: the schema and its "properties"); deeper ones would run recursive
# parsers and schema converters out of stack.
MAX_JSON_SCHEMA_DEPTH = 64

_LONE_SURROGATE = re.compile("[\ud800-\udfff]")


def check_text(name: str, value: str) -> str:
    """``value`` unchanged, or a ValueError naming ``name`` if it holds a lone surrogate.

    JSON allows ``"\\ud800"`` and Python decodes it into a str that cannot be
    encoded as UTF-8: tokenizers, grammar compilers and JSON responses would fail
    on it deep inside the engine or the server.
    """
    if not value.isascii():
        match = _LONE_SURROGATE.search(value)
        if match is not None:
            raise ValueError(f"{name} is not valid Unicode: it holds a lone surrogate "
                             f"(U+{ord(match.group()):04X}) at index {match.start()}")
    return value


class RequestOutputKind(enum.Enum):
    """What each RequestOutput of a request carries."""

    CUMULATIVE = "cumulative"  # everything so far (Engine.step default)
    DELTA = "delta"            # only what is new since the last output (streaming)
    FINAL_ONLY = "final_only"  # nothing until the request finishes (LLM.generate)


@dataclass
class StructuredOutputsParams:
    """Constrain a request's output (vLLM's field names); set exactly one field.

    Specs are bounded (``MAX_SPEC_BYTES``, ``MAX_CHOICES``, ``MAX_JSON_SCHEMA_DEPTH``)
    on construction; whether one compiles is for the engine's backend to say.

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
        kind = chosen[0]
        name = f"structured_outputs.{kind}"
        if kind == "json":
            _check_json_schema(name, self.json)
        elif kind in ("regex", "grammar"):
            _check_spec_text(name, getattr(self, kind))
        elif kind == "choice":
            self.choice = _check_choices(name, self.choice)
        elif self.json_object is not True:
            raise ValueError(f"{name} must be true or false, got {_describe(self.json_object)}")

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
    The limits are this module's constants.
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
        for name in ("ignore_eos", "skip_special_tokens", "include_stop_str_in_output"):
            if not isinstance(getattr(self, name), bool):  # "false" would be truthy
                raise ValueError(f"{name} must be a boolean, got {getattr(self, name)!r}")
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
        _require_int_in("n", self.n, 1, MAX_N)
        if self.max_tokens is not None:
            _require_int_in("max_tokens", self.max_tokens, 1, MAX_NUM_TOKENS)
        _require_int_in("min_tokens", self.min_tokens, 0, MAX_NUM_TOKENS)
        if self.max_tokens is not None and self.min_tokens > self.max_tokens:
            raise ValueError(f"min_tokens ({self.min_tokens}) must not exceed "
                             f"max_tokens ({self.max_tokens})")
        if self.logprobs is not None:
            _require_int_in("logprobs", self.logprobs, 0, MAX_LOGPROBS)
        if self.seed is not None:
            _require_int_in("seed", self.seed, MIN_SEED, MAX_SEED)
        _require_int("top_k", self.top_k)
        if not (self.top_k in (-1, 0) or 1 <= self.top_k <= MAX_TOP_K):
            raise ValueError(f"top_k must be -1 or 0 (off) or between 1 and {MAX_TOP_K}, "
                             f"got {_describe(self.top_k)}")

    def _check_probabilities(self) -> None:
        _require_float_in("temperature", self.temperature, 0.0, MAX_TEMPERATURE)
        _require_float_in("top_p", self.top_p, 0.0, 1.0, low_open=True)
        _require_float_in("min_p", self.min_p, 0.0, 1.0)

    def _check_penalties(self) -> None:
        for name in ("presence_penalty", "frequency_penalty"):
            _require_float_in(name, getattr(self, name), -MAX_ABS_PENALTY, MAX_ABS_PENALTY)
        _require_float_in("repetition_penalty", self.repetition_penalty,
                          MIN_REPETITION_PENALTY, MAX_REPETITION_PENALTY)

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


def _describe(value: object) -> str:
    """A short rendering of a bad value for a message (a huge int has no cheap repr)."""
    if isinstance(value, int) and not isinstance(value, bool) and value.bit_length() > 128:
        return f"an integer of {value.bit_length()} bits"
    text = repr(value)
    return text if len(text) <= 60 else text[:60] + "..."


def _require_int(name: str, value: object) -> None:
    if isinstance(value, bool) or not isinstance(value, int):
        raise ValueError(f"{name} must be an integer, got {_describe(value)}")


def _require_int_in(name: str, value: object, low: int, high: int) -> None:
    _require_int(name, value)
    if not low <= value <= high:
        raise ValueError(f"{name} must be between {low} and {high}, got {_describe(value)}")


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


# ------------------------------------------------------------ structured-output specs
def _check_spec_text(name: str, spec: object) -> None:
    if not isinstance(spec, str):
        raise ValueError(f"{name} must be a string, got {type(spec).__name__}")
    _check_spec_size(name, _utf8_length(spec))
    check_text(name, spec)


def _check_spec_size(name: str, num_bytes: int) -> None:
    if num_bytes > MAX_SPEC_BYTES:
        raise ValueError(f"{name} is {num_bytes} bytes long; the limit is {MAX_SPEC_BYTES} "
                         "bytes (MAX_SPEC_BYTES)")


def _check_choices(name: str, choices: object) -> list[str]:
    if not isinstance(choices, (list, tuple)) or not choices:
        raise ValueError(f"{name} must be a non-empty list of strings")
    if len(choices) > MAX_CHOICES:
        raise ValueError(f"{name} has {len(choices)} choices; the limit is {MAX_CHOICES} "
                         "(MAX_CHOICES)")
    if not all(isinstance(choice, str) for choice in choices):
        raise ValueError(f"{name} must be a non-empty list of strings")
    _check_spec_size(name, sum(_utf8_length(choice) for choice in choices))
    for choice in choices:
        check_text(name, choice)
    return list(choices)


def _check_json_schema(name: str, schema: object) -> None:
    if isinstance(schema, str):
        _check_spec_text(name, schema)
        depth = _json_text_depth(schema, MAX_JSON_SCHEMA_DEPTH)
    elif isinstance(schema, dict):
        depth = _walk_json_value(name, schema)
    else:
        raise ValueError(f"{name} must be a JSON schema (a dict or a JSON string), "
                         f"got {type(schema).__name__}")
    if depth > MAX_JSON_SCHEMA_DEPTH:
        raise ValueError(f"{name} nests objects and arrays more than {MAX_JSON_SCHEMA_DEPTH} "
                         "levels deep (MAX_JSON_SCHEMA_DEPTH)")


def _json_text_depth(text: str, limit: int) -> int:
    """How deep a JSON text nests objects and arrays, counted up to ``limit + 1``
    without parsing it (a parser would recurse once per level)."""
    depth = max_depth = 0
    in_string = escaped = False
    for char in text:
        if in_string:
            if escaped:
                escaped = False
            elif char == "\\":
                escaped = True
            elif char == '"':
                in_string = False
        elif char == '"':
            in_string = True
        elif char in "[{":
            depth += 1
            max_depth = max(max_depth, depth)
            if max_depth > limit:
                break
        elif char in "]}":
            depth -= 1
    return max_depth


def _walk_json_value(name: str, value: object) -> int:
    """The nesting depth of a JSON-like value (counted up to ``MAX_JSON_SCHEMA_DEPTH + 1``),
    after checking it holds only JSON types, valid text and at most ``MAX_SPEC_BYTES``
    (roughly, as compact JSON). Iterative: a 10,000-deep dict must not recurse."""
    max_depth = 0
    num_bytes = 0
    stack: list[tuple[object, int]] = [(value, 0)]
    while stack:
        item, depth = stack.pop()
        if isinstance(item, (dict, list, tuple)):
            depth += 1
            max_depth = max(max_depth, depth)
            if max_depth > MAX_JSON_SCHEMA_DEPTH:
                return max_depth
            num_bytes += 2
            if isinstance(item, dict):
                for key, child in item.items():
                    if not isinstance(key, str):
                        raise ValueError(f"{name} must have string keys, got "
                                         f"{type(key).__name__}")
                    check_text(name, key)
                    num_bytes += _utf8_length(key) + 4
                    stack.append((child, depth))
            else:
                num_bytes += len(item)
                stack.extend((child, depth) for child in item)
        elif isinstance(item, str):
            check_text(name, item)
            num_bytes += _utf8_length(item) + 2
        elif item is None or isinstance(item, bool):
            num_bytes += 5
        elif isinstance(item, int):
            num_bytes += item.bit_length() // 3 + 2  # about its digits
        elif isinstance(item, float):
            num_bytes += 24
        else:
            raise ValueError(f"{name} must hold only JSON values, got {type(item).__name__}")
        if num_bytes > MAX_SPEC_BYTES:
            _check_spec_size(name, num_bytes)
    return max_depth


def _utf8_length(text: str) -> int:
    return len(text) if text.isascii() else len(text.encode("utf-8", "surrogatepass"))
