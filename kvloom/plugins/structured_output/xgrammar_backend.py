"""The ``xgrammar`` structured-output backend: JSON schema, any JSON, regex, choice, EBNF.

Compiles a request's spec into an XGrammar matcher that follows the generated tokens and
fills a packed int32 bitmask row of allowed next tokens. Compiled grammars are cached by
spec, so repeated schemas compile once per engine; a step's rows are filled together by
XGrammar's multi-threaded batch matcher.
"""

from __future__ import annotations

import json
import os
import re
import threading
from contextlib import contextmanager
from typing import Any

import torch

from kvloom.hookspecs import hookimpl
from kvloom.interfaces.structured_output import Grammar, StructuredOutputBackend
from kvloom.plugins.structured_output.json_schema_features import unenforced_features

KVLOOM_PLUGIN_API = ">=1.0,<2"  # the kvloom plugin API versions this module supports

SPEC_KINDS = ("json", "json_object", "regex", "choice", "grammar")
MAX_JSON_WHITESPACE = 2   # bounds runaway whitespace between JSON tokens
ANY_JSON_OBJECT = '{"type": "object"}'
BATCH_FILL_MIN_ROWS = 8   # below this, starting the batch matcher's threads costs more


@hookimpl
def register_structured_output_backends(register):
    register("xgrammar", XGrammarBackend)


class XGrammarGrammar(Grammar):
    """One request's matcher."""

    def __init__(self, matcher: Any) -> None:
        self.matcher = matcher
        self.stop_token_ids = frozenset(matcher.stop_token_ids)

    def accept_tokens(self, token_ids: list[int]) -> bool:
        accepted = 0
        for token_id in token_ids:
            if not self.matcher.accept_token(token_id):
                self.matcher.rollback(accepted)  # all or nothing
                return False
            accepted += 1
        return True

    def rollback(self, num_tokens: int) -> None:
        if num_tokens:
            self.matcher.rollback(num_tokens)

    def fill_bitmask(self, bitmask: torch.Tensor, row: int) -> None:
        self.matcher.fill_next_token_bitmask(bitmask, row)

    def is_terminated(self) -> bool:
        return self.matcher.is_terminated()

    def terminates_on(self, token_id: int) -> bool:
        return token_id in self.stop_token_ids


class XGrammarBackend(StructuredOutputBackend):
    """Compiles specs for one tokenizer and vocabulary size (the model's, padding included).

    JSON specs compile against a copy of the vocabulary without the tokens that hold a
    raw control character (U+0000-U+001F): XGrammar lets some into strings (those with
    maxLength), which strict JSON forbids. Blanked tokens count as special, so no JSON
    grammar ever allows them (whitespace between JSON tokens is then spaces only) and no
    per-step mask arithmetic is needed.
    """

    name = "xgrammar"

    def __init__(self, tokenizer: Any, vocab_size: int) -> None:
        import xgrammar

        self.xgrammar = xgrammar
        self.vocab_size = vocab_size
        self.tokenizer_info = xgrammar.TokenizerInfo.from_huggingface(tokenizer,
                                                                      vocab_size=vocab_size)
        self.compiler = xgrammar.GrammarCompiler(self.tokenizer_info, cache_enabled=True)
        self._json_compiler: Any = None
        self._json_compiler_lock = threading.Lock()  # compile runs on several threads
        self._batch_matcher: Any = None

    def validate(self, spec_kind: str, spec: Any) -> None:
        """The checks that need no parsing: the kind, the choices, unenforced keywords.

        XGrammar finds a malformed spec while parsing it, which compile() does next
        on the same compile thread (and caches, unlike a parse here: 100,000
        choices took 4 s to parse); a second parse here would only double that.
        """
        with _as_value_error(spec_kind):
            if spec_kind == "json":
                _schema_text(spec)
            elif spec_kind == "choice":
                _check_choices(spec)
            elif spec_kind not in SPEC_KINDS:
                raise _unknown_kind(spec_kind)

    def compile(self, spec_kind: str, spec: Any) -> Grammar:
        """Raises ValueError naming the spec kind for anything invalid or unsupported."""
        with _as_value_error(spec_kind):
            compiled = self._compile(spec_kind, spec)
        return XGrammarGrammar(self.xgrammar.GrammarMatcher(compiled))

    def fill_bitmasks(self, grammars: list[Grammar], bitmask: torch.Tensor,
                      rows: list[int]) -> None:
        if len(grammars) < BATCH_FILL_MIN_ROWS:
            super().fill_bitmasks(grammars, bitmask, rows)
            return
        if self._batch_matcher is None:
            self._batch_matcher = self.xgrammar.BatchGrammarMatcher(max_threads=_fill_threads())
        self._batch_matcher.batch_fill_next_token_bitmask(
            [grammar.matcher for grammar in grammars], bitmask, rows)

    def allocate_bitmask(self, num_rows: int) -> torch.Tensor:
        return self.xgrammar.allocate_token_bitmask(num_rows, self.vocab_size)

    @property
    def json_compiler(self) -> Any:
        with self._json_compiler_lock:
            if self._json_compiler is None:
                self._json_compiler = self._compiler_without_control_chars()
        return self._json_compiler

    def _compiler_without_control_chars(self) -> Any:
        info = self.tokenizer_info
        vocab = [b"" if any(byte < 0x20 for byte in bytes(token)) else bytes(token)
                 for token in info.decoded_vocab]
        json_info = self.xgrammar.TokenizerInfo(
            vocab, self.xgrammar.VocabType.RAW, vocab_size=self.vocab_size,
            stop_token_ids=info.stop_token_ids, add_prefix_space=info.add_prefix_space)
        return self.xgrammar.GrammarCompiler(json_info, cache_enabled=True)

    def _compile(self, spec_kind: str, spec: Any):
        if spec_kind in ("json", "json_object"):
            # json_object: XGrammar's built-in JSON grammar would allow arrays too.
            schema = _schema_text(spec) if spec_kind == "json" else ANY_JSON_OBJECT
            return self.json_compiler.compile_json_schema(
                schema, any_whitespace=True, max_whitespace_cnt=MAX_JSON_WHITESPACE)
        if spec_kind in ("regex", "choice"):
            return self.compiler.compile_regex(_regex_for(spec_kind, spec))
        if spec_kind == "grammar":
            return self.compiler.compile_grammar(spec)
        raise _unknown_kind(spec_kind)


def _fill_threads() -> int:
    """All but two of the CPUs this process may use (the engine's thread and the
    driver's keep theirs), at most 16. XGrammar's own "auto" counts the host's
    hardware threads, which in a container can be far more than it may use."""
    usable = (len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity")
              else os.cpu_count() or 1)  # macOS has no affinity call
    return max(1, min(16, usable - 2))


def _schema_text(spec: Any) -> str:
    """The schema as text, refused if it uses a keyword XGrammar would not enforce."""
    try:
        schema = json.loads(spec) if isinstance(spec, str) else spec
    except json.JSONDecodeError:
        return spec  # XGrammar's parser says what is wrong with it
    unenforced = unenforced_features(schema)
    if unenforced:
        raise ValueError(f"the json schema uses features the xgrammar backend cannot "
                         f"enforce: {'; '.join(unenforced[:5])}")
    return spec if isinstance(spec, str) else json.dumps(spec)


def _regex_for(spec_kind: str, spec: Any) -> str:
    if spec_kind == "regex":
        return spec
    return "|".join(choice.translate(_REGEX_ESCAPES) for choice in _check_choices(spec))


def _check_choices(spec: Any) -> list[str]:
    if not spec or not all(isinstance(choice, str) for choice in spec):
        raise ValueError("choice must be a non-empty list of strings")
    return spec


# Only XGrammar's regex metacharacters are escaped: it warns on stderr, once per
# occurrence, about escapes it does not know, such as re.escape's "\ " for a space
# (100,000 choices wrote 200,000 lines).
_REGEX_ESCAPES = {ord(char): "\\" + char for char in "\\^$.|?*+()[]{}"}


def _unknown_kind(spec_kind: str) -> ValueError:
    return ValueError(f"unknown structured-output kind {spec_kind!r}; "
                      f"expected one of {', '.join(SPEC_KINDS)}")


@contextmanager
def _as_value_error(spec_kind: str):
    """XGrammar's parse errors come in several types; callers get one ValueError."""
    try:
        yield
    except ValueError as exc:
        if type(exc) is ValueError:  # ours, already worded for the user
            raise
        raise _invalid(spec_kind, exc) from None
    except Exception as exc:
        raise _invalid(spec_kind, exc) from None


# XGrammar prefixes its errors with its C++ log location ("[07:44:50] /project/cpp/x.cc:83: ")
# and often an assertion ("Check failed: (error.empty()) is false: "); users need neither,
# unless the assertion is all there is.
_LOG_LOCATION = re.compile(r"^(\[[\d:]+\] )?(/\S+:\d+: )?")
_ASSERTION = re.compile(r"^Check failed: .*? is false: ?")


def _invalid(spec_kind: str, exc: Exception) -> ValueError:
    first_line = (str(exc).strip().splitlines() or [type(exc).__name__])[0]
    reason = _LOG_LOCATION.sub("", first_line)
    reason = (_ASSERTION.sub("", reason) or "XGrammar could not compile it "
              f"({reason.rstrip(': ')})")[:300]
    return ValueError(f"invalid {spec_kind} for structured output: {reason}")
