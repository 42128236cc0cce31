"""Plugins that fail on purpose, registered as third-party ones are, for the fault
isolation tests (tests/core/test_fault_isolation.py, tests/entrypoints/test_engine_failure.py):
a sampler raising for one request, a structured-output backend whose grammars raise,
and a model forward that raises a given number of times."""

from __future__ import annotations

from kvloom import hookimpl
from kvloom.interfaces.structured_output import Grammar, StructuredOutputBackend
from kvloom.plugins.samplers.default import DefaultSampler
from kvloom.plugins.structured_output.xgrammar_backend import XGrammarBackend

# A request asks for a fault with this top_p (it means nothing else to greedy rows).
FAULTY_TOP_P = 0.625
FAULT_AFTER_TOKENS = 3


class FaultySampler(DefaultSampler):
    """The default sampler, raising for a batch holding a row with FAULTY_TOP_P once
    that row has FAULT_AFTER_TOKENS output tokens."""

    name = "faulty"

    def sample(self, logits, metadata):
        for row, top_p in enumerate(metadata.top_p.tolist()):
            if (abs(top_p - FAULTY_TOP_P) < 1e-6
                    and len(metadata.output_token_ids[row]) >= FAULT_AFTER_TOKENS):
                raise OverflowError("a request this sampler cannot handle")
        return super().sample(logits, metadata)


class FaultyGrammar(Grammar):
    """An XGrammar grammar that raises in ``method`` once it has accepted a token."""

    def __init__(self, inner: Grammar, method: str) -> None:
        self.inner = inner
        self.method = method
        self.num_accepted = 0

    def _maybe_raise(self, method: str) -> None:
        if method == self.method and self.num_accepted >= 1:
            raise RuntimeError("grammar plugin bug")

    def accept_tokens(self, token_ids):
        self._maybe_raise("accept_tokens")
        self.num_accepted += len(token_ids)
        return self.inner.accept_tokens(token_ids)

    def rollback(self, num_tokens):
        self.num_accepted -= num_tokens
        self.inner.rollback(num_tokens)

    def fill_bitmask(self, bitmask, row):
        self._maybe_raise("fill_bitmask")
        self.inner.fill_bitmask(bitmask, row)

    def is_terminated(self):
        return self.inner.is_terminated()

    def terminates_on(self, token_id):
        self._maybe_raise("terminates_on")
        return self.inner.terminates_on(token_id)


class FaultyGrammarBackend(StructuredOutputBackend):
    """XGrammar, except that a choice starting with "faulty-<method>" raises there."""

    name = "faulty_grammar"

    def __init__(self, tokenizer, vocab_size):
        self.inner = XGrammarBackend(tokenizer, vocab_size)

    def validate(self, spec_kind, spec):
        self.inner.validate(spec_kind, spec)

    def compile(self, spec_kind, spec):
        grammar = self.inner.compile(spec_kind, spec)
        if spec_kind == "choice" and spec[0].startswith("faulty-"):
            return FaultyGrammar(grammar, spec[0].removeprefix("faulty-").split()[0])
        return grammar

    def fill_bitmasks(self, grammars, bitmask, rows):
        for grammar, row in zip(grammars, rows):
            grammar.fill_bitmask(bitmask, row)


class FaultPlugins:
    @hookimpl
    def register_samplers(self, register):
        register("faulty", FaultySampler)

    @hookimpl
    def register_structured_output_backends(self, register):
        register("faulty_grammar", FaultyGrammarBackend)


class BreakingForward:
    """Wraps a model's forward so that the next ``num_failures`` calls raise."""

    def __init__(self, model, num_failures: int) -> None:
        self.model = model
        self.forward = model.forward
        self.num_failures = num_failures

    def __call__(self, *args, **kwargs):
        if self.num_failures > 0:
            self.num_failures -= 1
            raise RuntimeError("CUDA error: an illegal memory access was encountered")
        return self.forward(*args, **kwargs)
