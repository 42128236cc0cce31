"""The ``kvloom`` command: ``generate``, ``plugins`` and ``serve``."""

from __future__ import annotations

import argparse
import sys
from typing import Sequence

from kvloom.entrypoints.cli_bench import add_bench_parser
from kvloom.entrypoints.cli_chat import add_chat_parser
from kvloom.entrypoints.cli_generate import add_generate_parser
from kvloom.entrypoints.cli_plugins import add_plugins_parser
from kvloom.entrypoints.cli_serve import add_serve_parser


def build_parser() -> argparse.ArgumentParser:
    from kvloom import __version__

    parser = argparse.ArgumentParser(prog="kvloom", description="kvloom LLM engine")
    parser.add_argument("--version", action="version", version=f"kvloom {__version__}")
    commands = parser.add_subparsers(dest="command", required=True)
    add_generate_parser(commands)
    add_plugins_parser(commands)
    add_bench_parser(commands)
    add_chat_parser(commands)
    add_serve_parser(commands)
    return parser


def main(argv: Sequence[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    try:
        return args.handler(args)
    except (ValueError, FileNotFoundError) as exc:
        print(f"kvloom: error: {one_line_error(exc)}", file=sys.stderr)
        return 2


def one_line_error(exc: Exception) -> str:
    """A user-facing error on one line; pydantic's multi-line report becomes ``field: why``."""
    from pydantic import ValidationError

    if isinstance(exc, ValidationError):
        return "; ".join(_describe_validation_error(error) for error in exc.errors())
    return " ".join(line.strip() for line in str(exc).splitlines() if line.strip())


def _describe_validation_error(error: dict) -> str:
    field = ".".join(str(part) for part in error.get("loc", ()))
    message = error.get("msg", "invalid value").removeprefix("Value error, ")
    value = error.get("input")
    if field and error.get("type") != "value_error" and not isinstance(value, (dict, list)):
        message = f"{message} (got {value!r})"
    return f"{field}: {message}" if field else message


if __name__ == "__main__":
    sys.exit(main())
