"""JSON schemas for checking structured-output backends with random-weight models.

Every schema bounds its sizes: a random model never *chooses* to close a string, stop
a number or end an array, so an unbounded one would run to max_tokens. Each uses only
features XGrammar 0.2 enforces (see tests/core/test_structured_output_schemas.py for
what was checked and what was left out). ``jsonschema`` is needed only by the
validation helpers.
"""

from __future__ import annotations

import json
import re
import uuid

def integer(low: int, high: int, **extra) -> dict:
    return {"type": "integer", "minimum": low, "maximum": high, **extra}


def number(low: float, high: float) -> dict:
    return {"type": "number", "minimum": low, "maximum": high}


def string(max_length: int, min_length: int = 0) -> dict:
    return {"type": "string", "minLength": min_length, "maxLength": max_length}


def closed(properties: dict, required: list[str] | None = None, **extra) -> dict:
    """An object with exactly these properties (all required unless told otherwise)."""
    return {"type": "object", "properties": properties,
            "required": list(properties) if required is None else required,
            "additionalProperties": False, **extra}


# A date-time with whole seconds: "format": "date-time" leaves the fraction unbounded.
STAMP = ("^[0-9]{4}-(0[1-9]|1[0-2])-(0[1-9]|[12][0-9]|3[01])"
         "T([01][0-9]|2[0-3]):[0-5][0-9]:[0-5][0-9]Z$")

SCHEMAS: dict[str, dict] = {
    "flat_required": closed({"name": string(8), "age": integer(0, 150)}),
    "optional_fields": closed({"id": integer(1, 99), "nickname": string(6),
                               "verified": {"type": "boolean"}}, required=["id"]),
    "nested_2_levels": closed({"point": closed({"x": integer(0, 9), "y": integer(-9, 9)}),
                               "label": string(4)}),
    "nested_3_levels": closed({
        "user": closed({"profile": closed({"id": integer(0, 999),
                                           "active": {"type": "boolean"}}),
                        "role": {"enum": ["admin", "guest"]}}),
        "meta": closed({"rev": integer(0, 9)})}),
    "array_of_integers": {"type": "array", "items": integer(-99, 99),
                          "minItems": 1, "maxItems": 4},
    "array_of_objects": {"type": "array", "minItems": 1, "maxItems": 3,
                         "items": closed({"sku": {"type": "string",
                                                  "pattern": "^[A-Z]{2}[0-9]{2}$"},
                                          "qty": integer(1, 20)})},
    "array_of_arrays": {"type": "array", "minItems": 2, "maxItems": 2,
                        "items": {"type": "array", "items": integer(0, 9),
                                  "minItems": 2, "maxItems": 2}},
    "string_enums": closed({"color": {"enum": ["red", "green", "blue"]},
                            "size": {"type": "string", "enum": ["S", "M", "L", "XL"]}}),
    "mixed_enum": {"enum": ["x", 1, 2.5, True, None, [1, 2], {"k": "v"}]},
    "consts": closed({"version": {"const": "v1"}, "answer": {"const": 42},
                      "flags": {"const": [True, None]}, "n": integer(0, 3)}),
    "integer_ranges": closed({"negative": integer(-1000, -10), "wide": integer(-100000, 100000),
                              "open": {"type": "integer", "exclusiveMinimum": 0,
                                       "exclusiveMaximum": 5},
                              "step": integer(0, 100, multipleOf=7)}),
    "bounded_numbers": closed({"ratio": number(0, 1), "celsius": number(-50, 50),
                               "open": {"type": "number", "exclusiveMinimum": 0,
                                        "exclusiveMaximum": 10}}),
    "array_of_numbers": {"type": "array", "items": number(-1, 1), "minItems": 3, "maxItems": 3},
    "booleans_and_null": closed({"on": {"type": "boolean"}, "off": {"type": "boolean"},
                                 "nothing": {"type": "null"}}),
    "nullable": closed({"count": {"type": ["integer", "null"], "minimum": 0, "maximum": 9},
                        "note": {"type": ["string", "null"], "maxLength": 3}}),
    "patterns": closed({"code": {"type": "string", "pattern": "^[A-Z]{3}-[0-9]{2,4}$"},
                        "slug": {"type": "string", "pattern": "^[a-z]{2,6}$"},
                        "hex": {"type": "string", "pattern": "[0-9a-f]{4}"}}),  # unanchored
    "string_lengths": closed({"short": string(3, 1), "exact": string(4, 4),
                              "ranged": string(6, 3)}),
    "any_of": closed({"value": {"anyOf": [integer(0, 9), string(4), {"type": "null"},
                                          {"type": "boolean"}]}}),
    "one_of_tagged": closed({"shape": {"oneOf": [
        closed({"kind": {"const": "circle"}, "r": integer(1, 9)}),
        closed({"kind": {"const": "rect"}, "w": integer(1, 9), "h": integer(1, 9)})]}}),
    "defs_and_refs": {
        "$defs": {"point": closed({"x": integer(0, 9), "y": integer(0, 9)}),
                  "segment": closed({"a": {"$ref": "#/$defs/point"},
                                     "b": {"$ref": "#/$defs/point"}})},
        **closed({"first": {"$ref": "#/$defs/segment"}, "origin": {"$ref": "#/$defs/point"}})},
    "definitions_ref_at_root": {"definitions": {"item": closed({"n": integer(0, 9)})},
                                "$ref": "#/definitions/item"},
    "formats": closed({"day": {"type": "string", "format": "date"},
                       "id": {"type": "string", "format": "uuid"},
                       "stamp": {"type": "string", "pattern": STAMP}}),
    "tuple_prefix_items": {"type": "array", "prefixItems": [string(4), integer(0, 9),
                                                            {"type": "boolean"}],
                           "items": False, "minItems": 3},
    "property_counts": closed({"a": integer(0, 9), "b": integer(0, 9), "c": integer(0, 9)},
                              required=[], minProperties=1, maxProperties=2),
    "pattern_properties": {"type": "object", "additionalProperties": False,
                           "patternProperties": {"^[a-z]{1,3}$": integer(0, 9)},
                           "minProperties": 1, "maxProperties": 2},
    "property_names": {"type": "object", "properties": {"id": integer(0, 9)}, "required": ["id"],
                       "propertyNames": {"pattern": "^[a-z]{1,4}$"},
                       "additionalProperties": {"type": "boolean"}, "maxProperties": 3},
    "escapes_and_unicode": closed({"word": {"enum": ['say "hi"', "back\\slash", "café", "日本"]},
                                   "tab": {"const": "a\tb\nc"}}),
    "top_level_string": string(6, 2),
    "top_level_integer": integer(-5, 5),
}

def format_checker():
    """A jsonschema FormatChecker for the formats used above, built on the standard library
    so that the checks hold whatever optional format packages jsonschema finds. "date" is
    RFC 3339's full-date shape: xgrammar bounds month and day but not the calendar
    ("2024-02-31")."""
    import jsonschema

    checker = jsonschema.FormatChecker(())
    checker.checks("date")(_is_date)
    checker.checks("uuid", raises=ValueError)(_is_uuid)
    return checker


def validate_json(text: str, schema: dict) -> None:
    """Parse ``text`` and validate it (formats included); raises on any violation."""
    import jsonschema

    jsonschema.validate(json.loads(text), schema, format_checker=format_checker(),
                        cls=jsonschema.Draft202012Validator)


def _is_date(value: object) -> bool:
    return not isinstance(value, str) or bool(
        re.fullmatch(r"[0-9]{4}-(0[1-9]|1[0-2])-(0[1-9]|[12][0-9]|3[01])", value))


def _is_uuid(value: object) -> bool:
    return (not isinstance(value, str)
            or (bool(uuid.UUID(value)) and len(value) == 36
                and all(value[i] == "-" for i in (8, 13, 18, 23))))


def formats_in(schema: object) -> set[str]:
    if isinstance(schema, dict):
        found = {schema["format"]} if isinstance(schema.get("format"), str) else set()
        return found.union(*(formats_in(value) for value in schema.values()))
    if isinstance(schema, list):
        return set().union(*(formats_in(value) for value in schema))
    return set()
