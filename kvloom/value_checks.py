"""Checks every request field's text shares: valid Unicode, byte lengths, and
short renderings of bad values for error messages."""

from __future__ import annotations

import re

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


def describe_value(value: object) -> str:
    """A short rendering of a bad value for a message (a huge int has no cheap repr)."""
    if isinstance(value, int) and not isinstance(value, bool) and value.bit_length() > 128:
        return f"an integer of {value.bit_length()} bits"
    text = repr(value)
    return text if len(text) <= 60 else text[:60] + "..."


def utf8_length(text: str) -> int:
    return len(text) if text.isascii() else len(text.encode("utf-8", "surrogatepass"))
