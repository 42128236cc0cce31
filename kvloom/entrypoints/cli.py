"""The ``kvloom`` command: ``generate``, ``chat``, ``serve``, ``bench`` and ``plugins``.

Importing this module and parsing arguments load no torch, so ``--help``, ``--version``
and every mistake in the command line or an engine.yaml answer at once; each command
imports the engine only after checking what it was given.
"""

from __future__ import annotations

import argparse
import difflib
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
    for each in _all_parsers(parser):
        each.formatter_class = DefaultsHelpFormatter
        each.set_defaults(parser=each)  # the innermost wins: the command that was run
    return parser


class DefaultsHelpFormatter(argparse.HelpFormatter):
    """Adds "(default: X)" to a flag's help unless the help already says its default.

    Unlike argparse.ArgumentDefaultsHelpFormatter it leaves out "(default: None)" and
    "(default: False)": a flag whose default is None says in its own help what happens
    without it (the engine.yaml's value, the model's, none), which "None" would not.
    """

    def _get_help_string(self, action: argparse.Action) -> str:
        text = action.help or ""
        if ("default" in text or not action.option_strings or action.default is None
                or action.default is False or action.default is argparse.SUPPRESS):
            return text
        return f"{text} (default: %(default)s)"


def _all_parsers(parser: argparse.ArgumentParser) -> list[argparse.ArgumentParser]:
    """``parser`` and every subcommand's parser below it."""
    found = [parser]
    for action in parser._actions:
        if isinstance(action, argparse._SubParsersAction):
            for child in dict.fromkeys(action.choices.values()):  # aliases repeat a parser
                found.extend(_all_parsers(child))
    return found


def main(argv: Sequence[str] | None = None) -> int:
    args, unknown = build_parser().parse_known_args(argv)
    if unknown:
        reject_unknown_arguments(args.parser, unknown)
    try:
        return args.handler(args)
    except (ValueError, FileNotFoundError) as exc:
        print(f"kvloom: error: {one_line_error(exc)}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:  # Ctrl-C while a model loads: no traceback, the shell's status
        print("kvloom: interrupted", file=sys.stderr)
        return 130


def reject_unknown_arguments(parser: argparse.ArgumentParser, unknown: list[str]) -> None:
    """Exit 2 with the command's own usage (argparse gives the top level's) and, for a
    misspelt flag, the one that was probably meant."""
    message = f"unrecognized arguments: {' '.join(unknown)}"
    if unknown[0].startswith("--"):
        flags = [flag for action in parser._actions for flag in action.option_strings]
        guesses = difflib.get_close_matches(unknown[0].partition("=")[0], flags, n=1)
        if guesses:
            message += f" (did you mean {guesses[0]}?)"
    parser.error(message)


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
