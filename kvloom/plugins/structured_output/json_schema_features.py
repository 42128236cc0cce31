"""JSON-schema keywords XGrammar 0.2 accepts but does not enforce.

A schema using one would compile, and the output could still break it; such a
schema is refused instead, naming the keyword and where it is. Found by feeding
violating instances to XGrammar's matcher (see tests/core/test_structured_output_schemas.py).
"""

from __future__ import annotations

from typing import Any, Iterator

UNENFORCED_KEYWORDS = ("uniqueItems", "contains", "minContains", "maxContains", "not",
                       "dependentRequired", "dependentSchemas", "dependencies",
                       "if", "then", "else", "unevaluatedProperties", "unevaluatedItems")
# Keywords whose value maps names to subschemas, and those holding one subschema or a list.
_SCHEMA_MAPS = ("properties", "patternProperties", "$defs", "definitions")
_SCHEMA_VALUES = ("items", "additionalProperties", "propertyNames", "additionalItems")
_SCHEMA_LISTS = ("anyOf", "oneOf", "allOf", "prefixItems")
# XGrammar takes a $ref or a combinator in place of the schema around it: constraints
# next to one are dropped ({"$ref": ..., "minimum": 5} accepts 3).
_REPLACING = ("$ref", "anyOf", "oneOf", "allOf")
_CONSTRAINTS = ("type", "enum", "const", "minimum", "maximum", "exclusiveMinimum",
                "exclusiveMaximum", "multipleOf", "minLength", "maxLength", "pattern",
                "format", "properties", "required", "additionalProperties",
                "patternProperties", "propertyNames", "minProperties", "maxProperties",
                "items", "prefixItems", "minItems", "maxItems")


def unenforced_features(schema: Any, path: str = "$") -> list[str]:
    """``"keyword at path"`` for each feature the backend would silently ignore."""
    return list(_walk(schema, path))


def _walk(schema: Any, path: str) -> Iterator[str]:
    if not isinstance(schema, dict):
        return
    for keyword in UNENFORCED_KEYWORDS:
        if keyword in schema and schema[keyword] is not False:
            yield f"{keyword} at {path}"
    if isinstance(schema.get("allOf"), list) and len(schema["allOf"]) > 1:
        yield f"allOf with several subschemas at {path}"
    if ("pattern" in schema or "format" in schema) and (
            "maxLength" in schema or "minLength" in schema):
        yield f"minLength/maxLength together with pattern or format at {path}"
    if "multipleOf" in schema and schema.get("type") != "integer":
        yield f"multipleOf on a non-integer at {path}"
    replacing = [keyword for keyword in _REPLACING if keyword in schema]
    beside = [keyword for keyword in _CONSTRAINTS if keyword in schema]
    if replacing and beside:
        yield f"{', '.join(beside)} beside {replacing[0]} at {path}"
    for keyword in _SCHEMA_MAPS:
        if isinstance(schema.get(keyword), dict):
            for name, subschema in schema[keyword].items():
                yield from _walk(subschema, f"{path}.{keyword}.{name}")
    for keyword in _SCHEMA_VALUES:
        yield from _walk(schema.get(keyword), f"{path}.{keyword}")
    for keyword in _SCHEMA_LISTS:
        if isinstance(schema.get(keyword), list):
            for index, subschema in enumerate(schema[keyword]):
                yield from _walk(subschema, f"{path}.{keyword}[{index}]")
