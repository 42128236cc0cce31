"""Conformance: a drafter, run by the engine on a tiny model, proposes well-formed
drafts within its limits, and speculative decoding with it changes no greedy token.

Every ``propose`` call is recorded: one list per request, of token ids in the
vocabulary, at most ``max_num_drafts[i]`` long (which already respects
``num_speculative_tokens`` and ``max_model_len``), never reaching past
``max_model_len``. A drafter that needs more than ``method`` and
``num_speculative_tokens`` (a draft checkpoint, say) registers
``tiny_speculative_config``: a callable ``(target_dir, work_dir) -> dict`` of extra
``speculative:`` settings for the tiny target.
"""

from __future__ import annotations

from pathlib import Path

import pytest

NUM_SPECULATIVE_TOKENS = 3
MAX_MODEL_LEN = 48
# Repetitive prompts, so history-based drafters find matches; long enough that
# generation runs into max_model_len.
PROMPTS = [[5, 6, 7, 8] * 8, [40, 41, 42] * 3, [100, 3, 100, 3, 100, 3, 7]]


@pytest.fixture(scope="module")
def tiny_target(tmp_path_factory) -> Path:
    from kvloom.testing.checkpoints import TinyQwen2Spec, make_tiny_qwen2

    return make_tiny_qwen2(tmp_path_factory.mktemp("drafter_target"),
                           TinyQwen2Spec(num_hidden_layers=4))


def speculative_settings(drafter_component, target: Path, work_dir: Path) -> dict:
    settings = {"method": drafter_component.name,
                "num_speculative_tokens": NUM_SPECULATIVE_TOKENS}
    extra = drafter_component.metadata.get("tiny_speculative_config")
    if extra is not None:
        settings.update(extra(target, work_dir))
    return settings


def generate(llm) -> list[list[int]]:
    from kvloom import SamplingParams

    params = SamplingParams(temperature=0.0, max_tokens=MAX_MODEL_LEN, ignore_eos=True)
    outputs = llm.generate([{"prompt_token_ids": p} for p in PROMPTS], params)
    return [output.outputs[0].token_ids for output in outputs]


def test_drafts_are_within_limits_and_change_no_token(drafter_component, tiny_target,
                                                      tmp_path):
    from kvloom import LLM

    speculative = speculative_settings(drafter_component, tiny_target, tmp_path)
    llm = LLM(str(tiny_target), dtype="float32", max_model_len=MAX_MODEL_LEN,
              speculative=speculative)
    vocab_size = llm.engine.components.hf_config.vocab_size
    drafter = llm.engine.components.drafter
    calls = []
    propose = drafter.propose

    def recording_propose(inputs):
        drafts = propose(inputs)
        # The histories are live views of the requests' tokens: keep their lengths now.
        calls.append(([len(ids) for ids in inputs.token_ids], list(inputs.max_num_drafts),
                      len(inputs.request_ids), drafts))
        return drafts

    drafter.propose = recording_propose
    with_drafts = generate(llm)

    assert calls, "the engine never asked the drafter for drafts"
    for history_lens, limits, num_requests, drafts in calls:
        assert isinstance(drafts, list) and len(drafts) == num_requests, (
            "propose returns one list of drafts per request")
        for history_len, limit, proposed in zip(history_lens, limits, drafts):
            assert len(proposed) <= limit, f"{len(proposed)} drafts where at most {limit} fit"
            assert len(proposed) <= NUM_SPECULATIVE_TOKENS
            assert history_len + len(proposed) <= MAX_MODEL_LEN, "drafts past max_model_len"
            assert all(isinstance(t, int) and 0 <= t < vocab_size for t in proposed), proposed
    assert any(proposed for *_, drafts in calls for proposed in drafts), (
        "the drafter proposed nothing on repetitive prompts, so nothing was checked")

    reference = generate(LLM(str(tiny_target), dtype="float32", max_model_len=MAX_MODEL_LEN))
    assert with_drafts == reference, "speculative decoding changed greedy tokens"
    assert all(len(p) + len(out) == MAX_MODEL_LEN for p, out in zip(PROMPTS, with_drafts))
