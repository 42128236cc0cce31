"""Speculative decoding end to end: greedy output is the output without drafts,
token for token, while drafts do get accepted."""

from __future__ import annotations

import logging

import json
import types

import pytest

from kvloom import LLM, SamplingParams, hookimpl, make_plugin_manager
from kvloom.interfaces.drafter import Drafter

# Prompts whose greedy continuations (tiny random models loop) give n-gram lookup
# something to find, of mixed lengths: some longer than the prefill chunk.
PROMPTS = [[5, 17, 33, 2, 90, 41, 7], list(range(40, 140)), [200, 3],
           list(range(300, 340)) * 3, [7] * 30, list(range(1, 60, 2))]
MAX_TOKENS = [40, 12, 3, 33, 40, 20]

NGRAM = {"method": "ngram", "num_speculative_tokens": 3, "prompt_lookup_min": 1,
         "prompt_lookup_max": 3}


def make_llm(path, speculative=None, plugin_manager=None, **overrides) -> LLM:
    settings = dict(dtype="float32", block_size=8, max_num_batched_tokens=48,
                    speculative_config=speculative)
    settings.update(overrides)
    return LLM(str(path), plugin_manager=plugin_manager, **settings)


def run(llm: LLM, params) -> list[list[list[int]]]:
    outputs = llm.generate([{"prompt_token_ids": p} for p in PROMPTS], params)
    return [[c.token_ids for c in o.outputs] for o in outputs]


def greedy(**extra) -> list[SamplingParams]:
    return [SamplingParams(temperature=0, max_tokens=n, **extra) for n in MAX_TOKENS]


@pytest.fixture(scope="module")
def reference(tiny_qwen2):
    """Greedy outputs without speculation."""
    return run(make_llm(tiny_qwen2), greedy())


@pytest.mark.parametrize("overrides", [
    {},
    {"num_gpu_blocks_override": 24, "max_num_batched_tokens": 16},  # preemption + chunks
    {"enable_prefix_caching": False, "max_num_batched_tokens": 128},
], ids=["default", "tight-kv", "no-prefix-cache"])
def test_ngram_greedy_equals_no_speculation(tiny_qwen2, reference, overrides):
    llm = make_llm(tiny_qwen2, NGRAM, **overrides)
    assert run(llm, greedy()) == reference
    stats = llm.engine.get_stats()
    assert stats.spec_num_accepted_tokens > 0
    assert stats.spec_num_draft_tokens >= stats.spec_num_accepted_tokens
    assert 1.0 < stats.spec_mean_accepted_length <= 1 + NGRAM["num_speculative_tokens"]
    if "num_gpu_blocks_override" in overrides:
        assert stats.num_preemptions > 0


def test_penalties_min_tokens_and_stop_tokens_equal_no_speculation(tiny_qwen2):
    params = [
        SamplingParams(temperature=0, max_tokens=30, repetition_penalty=1.3),
        SamplingParams(temperature=0, max_tokens=20, frequency_penalty=0.4,
                       presence_penalty=0.2),
        SamplingParams(temperature=0, max_tokens=5, stop_token_ids=[PROMPTS[2][0]]),
        SamplingParams(temperature=0, max_tokens=33, min_tokens=20, stop_token_ids=[7]),
        SamplingParams(temperature=0, max_tokens=40, stop_token_ids=[7]),
        SamplingParams(temperature=0, max_tokens=20, ignore_eos=True),
    ]
    assert run(make_llm(tiny_qwen2, NGRAM), params) == run(make_llm(tiny_qwen2), params)


def test_logprobs_match_no_speculation(tiny_qwen2):
    params = SamplingParams(temperature=0, max_tokens=24, logprobs=3)
    prompts = [{"prompt_token_ids": p} for p in (PROMPTS[0], PROMPTS[4])]
    with_spec = make_llm(tiny_qwen2, NGRAM)
    spec_out = with_spec.generate(prompts, params)
    plain_out = make_llm(tiny_qwen2).generate(prompts, params)
    assert with_spec.engine.get_stats().spec_num_accepted_tokens > 0
    for spec, plain in zip(spec_out, plain_out):
        spec_seq, plain_seq = spec.outputs[0], plain.outputs[0]
        assert spec_seq.token_ids == plain_seq.token_ids
        assert len(spec_seq.logprobs) == len(plain_seq.logprobs) == len(spec_seq.token_ids)
        for spec_position, plain_position in zip(spec_seq.logprobs, plain_seq.logprobs):
            assert spec_position.keys() == plain_position.keys()
            for token_id, entry in spec_position.items():
                assert entry.rank == plain_position[token_id].rank
                assert entry.logprob == pytest.approx(plain_position[token_id].logprob,
                                                      abs=1e-4)


def test_seeded_sampling_is_reproducible_and_respects_limits(tiny_qwen2):
    params = [SamplingParams(temperature=0.8, top_k=20, seed=11 + i, max_tokens=n)
              for i, n in enumerate(MAX_TOKENS)]
    first = run(make_llm(tiny_qwen2, NGRAM), params)
    second = run(make_llm(tiny_qwen2, NGRAM), params)
    assert first == second
    for output, limit in zip(first, MAX_TOKENS):
        assert 0 < len(output[0]) <= limit


# ----------------------------------------------------------- drafter plugins
class ScriptedDrafter(Drafter):
    """Proposes from a fixed continuation per prompt (an oracle), or wrong tokens."""

    name = "scripted"
    uses_target_hidden_states = False

    def __init__(self, continuations: dict[tuple, list[int]], wrong: bool) -> None:
        self.continuations = continuations
        self.wrong = wrong

    def propose(self, inputs):
        drafts = []
        for tokens, limit in zip(inputs.token_ids, inputs.max_num_drafts):
            for prompt, continuation in self.continuations.items():
                if tuple(tokens[:len(prompt)]) == prompt:
                    done = len(tokens) - len(prompt)
                    guess = continuation[done:done + limit]
                    if self.wrong:
                        guess = [(t + 1) % 256 for t in guess]
                    drafts.append(guess)
                    break
            else:
                drafts.append([])
        return drafts


def scripted_plugins(continuations, wrong: bool):
    plugin = types.SimpleNamespace(register_drafters=hookimpl(
        lambda register: register("scripted", lambda config, context:
                                  ScriptedDrafter(continuations, wrong))))
    return make_plugin_manager(extra_plugins={"scripted_test": plugin})


@pytest.mark.parametrize("wrong", [False, True], ids=["oracle", "always-wrong"])
def test_plugin_drafter_acceptance_follows_its_guesses(tiny_qwen2, reference, wrong):
    continuations = {tuple(p): out[0] for p, out in zip(PROMPTS, reference)}
    spec = {"method": "scripted", "num_speculative_tokens": 4}
    llm = make_llm(tiny_qwen2, spec, scripted_plugins(continuations, wrong))
    assert run(llm, greedy()) == reference
    stats = llm.engine.get_stats()
    assert stats.spec_num_draft_tokens > 0
    if wrong:
        assert stats.spec_num_accepted_tokens == 0
    else:
        # Every draft is the true continuation; only a preempted or budget-cut
        # request could lose any, and neither happens here.
        assert stats.spec_acceptance_rate == 1.0


def test_a_drafter_that_raises_costs_only_its_drafts(tiny_qwen2, caplog):
    class Broken(Drafter):
        name = "broken"

        def propose(self, inputs):
            return [[10**9] if limit else [] for limit in inputs.max_num_drafts]

    plugin = types.SimpleNamespace(register_drafters=hookimpl(
        lambda register: register("broken", lambda config, context: Broken())))
    manager = make_plugin_manager(extra_plugins={"broken_test": plugin})
    llm = make_llm(tiny_qwen2, {"method": "broken", "num_speculative_tokens": 2}, manager)
    reference = make_llm(tiny_qwen2, None)
    params = SamplingParams(temperature=0, max_tokens=6, ignore_eos=True)
    prompt = [{"prompt_token_ids": PROMPTS[0]}]
    with caplog.at_level(logging.ERROR, logger="kvloom.engine.engine_core"):
        [output] = llm.generate(prompt, params)
    assert output.outputs[0].token_ids == reference.generate(prompt, params)[0].outputs[0].token_ids
    assert "outside the vocabulary" in caplog.text  # the first failure, with its reason
    assert llm.engine.core.num_failed_proposals >= 1
    assert llm.engine.get_stats().spec_num_draft_tokens == 0


# --------------------------------------------------------- structured output
STRUCTURED_SPECS = [
    {"json": {"type": "object", "additionalProperties": False, "required": ["n", "tag"],
              "properties": {"n": {"type": "integer", "minimum": 0, "maximum": 99},
                             "tag": {"enum": ["a", "bb", "ccc"]}}}},
    {"regex": "(ab|cd){6,10}x"},
    {"choice": ["yes", "no", "maybe"]},
    {"regex": "(hello ){4,8}world"},
]


def structured_params(seed_offset=0) -> list[SamplingParams]:
    from kvloom import StructuredOutputsParams

    return [SamplingParams(temperature=0, max_tokens=40,
                           structured_outputs=StructuredOutputsParams(**spec))
            for spec in STRUCTURED_SPECS]


def run_structured(llm: LLM) -> list[list[int]]:
    prompts = [{"prompt_token_ids": p} for p in PROMPTS[:len(STRUCTURED_SPECS)]]
    return [o.outputs[0].token_ids for o in llm.generate(prompts, structured_params())]


@pytest.mark.parametrize("drafter", ["ngram", "oracle", "always-wrong"])
def test_structured_output_with_drafts_equals_without(tiny_qwen2, drafter):
    pytest.importorskip("xgrammar")
    reference = run_structured(make_llm(tiny_qwen2))
    if drafter == "ngram":
        llm = make_llm(tiny_qwen2, NGRAM)
    else:
        continuations = {tuple(p): out for p, out in zip(PROMPTS, reference)}
        llm = make_llm(tiny_qwen2, {"method": "scripted", "num_speculative_tokens": 4},
                       scripted_plugins(continuations, wrong=drafter == "always-wrong"))
    assert run_structured(llm) == reference
    stats = llm.engine.get_stats()
    assert stats.spec_num_draft_tokens > 0
    if drafter == "always-wrong":
        assert stats.spec_num_accepted_tokens == 0
    else:
        assert stats.spec_num_accepted_tokens > 0
    text = llm.engine.tokenizer.decode(reference[0], skip_special_tokens=True)
    assert set(json.loads(text)) == {"n", "tag"}


def test_stop_strings_cut_tokens_accepted_past_them(tiny_qwen2):
    """A step brings several tokens; those after the one completing a stop string go."""
    prompts = ["The quick brown fox", "Hello, my name is", "Paged attention keeps"]
    plain = make_llm(tiny_qwen2)
    free = plain.generate(prompts, SamplingParams(temperature=0, max_tokens=30))
    stops = [r.outputs[0].text[5:7] for r in free]
    params = [SamplingParams(temperature=0, max_tokens=30, stop=[stop], logprobs=1)
              for stop in stops]
    expected = plain.generate(prompts, params)
    continuations = {tuple(r.prompt_token_ids): r.outputs[0].token_ids for r in free}
    spec = make_llm(tiny_qwen2, {"method": "scripted", "num_speculative_tokens": 4},
                    scripted_plugins(continuations, wrong=False))
    got = spec.generate(prompts, params)
    for want, have in zip(expected, got):
        want_seq, have_seq = want.outputs[0], have.outputs[0]
        assert have_seq.finish_reason == want_seq.finish_reason == "stop"
        assert (have_seq.text, have_seq.token_ids) == (want_seq.text, want_seq.token_ids)
        assert len(have_seq.logprobs) == len(have_seq.token_ids)
        assert have_seq.cumulative_logprob == pytest.approx(want_seq.cumulative_logprob,
                                                            abs=1e-3)
    assert spec.engine.get_stats().spec_num_accepted_tokens > 0
