"""The ``kvloom`` command: ``generate`` and ``plugins``."""

from __future__ import annotations

import argparse
import sys
from typing import Sequence

from kvloom.entrypoints.cli_generate import add_generate_parser
from kvloom.entrypoints.cli_plugins import add_plugins_parser


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="kvloom", description="kvloom LLM engine")
    commands = parser.add_subparsers(dest="command", required=True)
    add_generate_parser(commands)
    add_plugins_parser(commands)
    return parser


def main(argv: Sequence[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    try:
        return args.handler(args)
    except (ValueError, FileNotFoundError) as exc:
        print(f"kvloom: error: {exc}", file=sys.stderr)
        return 2


if __name__ == "__main__":
    sys.exit(main())
