"""Conformance: a structured-output backend's grammars follow a valid output token by
token, their bitmasks agree with what they accept, rollback restores the state, and
they terminate on EOS exactly when the output is complete.

Spec kinds the backend refuses (``validate`` or ``compile`` raising ValueError) are
skipped with its message. The vocabulary has padding ids past the tokenizer's, as
models often do; no grammar may allow them.
"""

from __future__ import annotations

import random

import pytest
import torch

NUM_PADDING_IDS = 16
# kind -> (spec, a complete output it must accept, an invalid spec of that kind)
CASES = {
    "choice": (["yes", "no", "maybe"], "maybe", []),
    "regex": (r"[0-9]{3}-[a-c]+", "123-abca", "([0-9"),
    "json": ({"type": "object", "properties": {"n": {"type": "integer"}}, "required": ["n"]},
             '{"n": 42}', '{"type": 5}'),
    "json_object": (True, '{"a": [1, "x"]}', None),
    "grammar": ('root ::= "a" ("b" | "c")*', "abcb", "root ::= "),
}
# kind -> outputs that are valid so far but not complete: EOS must be refused there
INCOMPLETE = {"choice": ["", "ma"], "regex": ["", "12", "123-"], "json": ["{", '{"n": 4'],
              "json_object": ["", '{"a": [1'], "grammar": [""]}


@pytest.fixture(scope="module")
def tokenizer():
    from kvloom.testing.checkpoints import build_tokenizer

    return build_tokenizer(384)


@pytest.fixture
def backend(structured_output_component, tokenizer):
    return structured_output_component.factory(tokenizer, len(tokenizer) + NUM_PADDING_IDS)


def compile_or_skip(backend, kind: str, spec):
    try:
        backend.validate(kind, spec)
        return backend.compile(kind, spec)
    except ValueError as exc:
        pytest.skip(f"the backend refuses {kind} specs: {exc}")


class Masks:
    """A bitmask buffer that starts full of garbage, as a reused buffer is."""

    def __init__(self, vocab_size: int, num_rows: int = 3) -> None:
        self.vocab_size = vocab_size
        words = -(-vocab_size // 32)
        self.buffer = torch.randint(-2**31, 2**31 - 1, (num_rows, words), dtype=torch.int32,
                                    generator=torch.Generator().manual_seed(0))

    def allowed(self, grammar, row: int = 1) -> torch.Tensor:
        """bool [vocab]: the tokens ``grammar`` allows next."""
        grammar.fill_bitmask(self.buffer, row)
        return self.unpack(row)

    def unpack(self, row: int) -> torch.Tensor:
        words = self.buffer[row].to(torch.int64) & 0xFFFFFFFF
        bits = (words.unsqueeze(1) >> torch.arange(32)) & 1
        return bits.flatten()[:self.vocab_size].bool()


def probes(allowed: torch.Tensor, eos_token_id: int, vocab_size: int, rng) -> list[int]:
    """Some allowed and some refused tokens, EOS and a padding id among them."""
    allowed_ids = allowed.nonzero().flatten().tolist()
    refused_ids = (~allowed).nonzero().flatten().tolist()
    return sorted(set(rng.sample(allowed_ids, min(15, len(allowed_ids)))
                      + rng.sample(refused_ids, min(15, len(refused_ids)))
                      + [eos_token_id, vocab_size - 1]))


@pytest.mark.parametrize("kind", list(CASES))
def test_accept_bitmask_rollback_terminate(backend, tokenizer, kind):
    spec, text, _ = CASES[kind]
    grammar = compile_or_skip(backend, kind, spec)
    vocab_size = len(tokenizer) + NUM_PADDING_IDS
    masks, rng, eos = Masks(vocab_size), random.Random(0), tokenizer.eos_token_id
    token_ids = tokenizer.encode(text, add_special_tokens=False)
    first_mask = masks.allowed(grammar)
    for index, token_id in enumerate(token_ids):
        allowed = masks.allowed(grammar)
        assert not allowed[len(tokenizer):].any(), "a padding id is allowed"
        assert allowed[token_id], f"{text!r}: token {index} ({token_id}) is masked out"
        assert not grammar.is_terminated(), f"terminated after {index} of {len(token_ids)} tokens"
        for probe in probes(allowed, eos, vocab_size, rng):
            accepted = grammar.accept_tokens([probe])
            assert accepted == bool(allowed[probe]), (
                f"token {probe}: bitmask says {bool(allowed[probe])}, accept_tokens {accepted}")
            if accepted:
                grammar.rollback(1)
        assert torch.equal(masks.allowed(grammar), allowed), "probing changed the state"
        assert grammar.accept_tokens([token_id])
    complete_mask = masks.allowed(grammar)
    assert complete_mask[eos], f"EOS is not allowed after the complete output {text!r}"

    grammar.rollback(len(token_ids))
    assert torch.equal(masks.allowed(grammar), first_mask), "rollback did not restore the start"
    assert grammar.accept_tokens(token_ids), "accepting the whole output at once failed"
    assert torch.equal(masks.allowed(grammar), complete_mask)

    assert grammar.terminates_on(eos) and not grammar.is_terminated()
    assert grammar.accept_tokens([eos]) and grammar.is_terminated()


@pytest.mark.parametrize("kind", list(CASES))
def test_eos_is_refused_before_the_output_is_complete(backend, tokenizer, kind):
    spec, _, _ = CASES[kind]
    masks, eos = Masks(len(tokenizer) + NUM_PADDING_IDS), tokenizer.eos_token_id
    for prefix in INCOMPLETE[kind]:
        grammar = compile_or_skip(backend, kind, spec)
        assert grammar.accept_tokens(tokenizer.encode(prefix, add_special_tokens=False))
        assert not masks.allowed(grammar)[eos], f"EOS allowed after the incomplete {prefix!r}"
        assert not grammar.accept_tokens([eos]) and not grammar.is_terminated(), prefix


@pytest.mark.parametrize("kind", list(CASES))
def test_refused_tokens_leave_the_state_unchanged(backend, tokenizer, kind):
    spec, text, _ = CASES[kind]
    grammar = compile_or_skip(backend, kind, spec)
    masks = Masks(len(tokenizer) + NUM_PADDING_IDS)
    first, *_ = tokenizer.encode(text, add_special_tokens=False)
    before = masks.allowed(grammar)
    assert grammar.accept_tokens([first])
    refused_ids = (~masks.allowed(grammar)).nonzero().flatten()  # refused after `first`
    assert len(refused_ids), f"the {kind} grammar refuses nothing after {first}"
    refused = int(refused_ids[0])
    grammar.rollback(1)
    assert not grammar.accept_tokens([first, refused]), "a refused token was accepted"
    assert torch.equal(masks.allowed(grammar), before), (
        "accept_tokens must accept all of the tokens or none")


def test_fill_bitmasks_equals_row_by_row(backend, tokenizer):
    """A step's rows filled at once (backends may batch or thread this) equal one by one."""
    grammars = []
    for index in range(10):
        kind = ("choice", "grammar")[index % 2]
        grammar = compile_or_skip(backend, kind, CASES[kind][0])
        prefix = CASES[kind][1][:index // 2]
        assert grammar.accept_tokens(tokenizer.encode(prefix, add_special_tokens=False))
        grammars.append(grammar)
    rows = random.Random(0).sample(range(12), len(grammars))
    vocab_size = len(tokenizer) + NUM_PADDING_IDS
    together, alone = Masks(vocab_size, num_rows=12), Masks(vocab_size, num_rows=12)
    backend.fill_bitmasks(grammars, together.buffer, rows)
    for grammar, row in zip(grammars, rows):
        assert torch.equal(together.unpack(row), alone.allowed(grammar, row)), row


@pytest.mark.parametrize("kind", [kind for kind in CASES if CASES[kind][2] is not None])
def test_invalid_specs_raise_value_error(backend, kind):
    spec, _, invalid = CASES[kind]
    compile_or_skip(backend, kind, spec)  # the kind itself is supported
    with pytest.raises(ValueError):
        backend.validate(kind, invalid)
        backend.compile(kind, invalid)
