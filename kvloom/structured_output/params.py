"""StructuredOutputsParams: what a request's output must follow, and the limits on
its specs. Part of the plugin API (a foundation module): SamplingParams holds one,
and kvloom.sampling_params re-exports it where vLLM users look for it."""

from __future__ import annotations

from dataclasses import dataclass

from kvloom.value_checks import check_text, describe_value, utf8_length

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
            raise ValueError(f"{name} must be true or false, got {describe_value(self.json_object)}")

    @property
    def kind_and_spec(self) -> tuple[str, object]:
        for name in ("json", "regex", "choice", "grammar"):
            if getattr(self, name) is not None:
                return name, getattr(self, name)
        return "json_object", True


def _check_spec_text(name: str, spec: object) -> None:
    if not isinstance(spec, str):
        raise ValueError(f"{name} must be a string, got {type(spec).__name__}")
    _check_spec_size(name, utf8_length(spec))
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
    _check_spec_size(name, sum(utf8_length(choice) for choice in choices))
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
                    num_bytes += utf8_length(key) + 4
                    stack.append((child, depth))
            else:
                num_bytes += len(item)
                stack.extend((child, depth) for child in item)
        elif isinstance(item, str):
            check_text(name, item)
            num_bytes += utf8_length(item) + 2
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
