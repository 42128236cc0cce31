"""A request whose sampling, grammar or detokenizing raises fails alone; a failed model
step fails the batch and the engine resets itself (RELIABILITY.md items 27-28).

The faults come from plugins registered the way third-party ones are (a sampler and
a structured-output backend), and from a tokenizer that raises on one token.
"""

from __future__ import annotations

import asyncio
import time
import types

import pytest

from fault_plugins import FAULT_AFTER_TOKENS, FAULTY_TOP_P, BreakingForward, FaultPlugins
from kvloom import LLM, SamplingParams, hookimpl, make_plugin_manager
from kvloom.engine.async_engine import AsyncEngine, EngineDeadError
from kvloom.failures import EngineStepError, RequestFailedError
from kvloom.plugins.samplers.default import DefaultSampler
from kvloom.sampling_params import RequestOutputKind, StructuredOutputsParams

PROMPTS = [[5, 9, 13, 2], [7, 7, 3, 1, 4], [11, 2, 8]]

def make_llm(model_path, **kwargs) -> LLM:
    manager = make_plugin_manager(extra_plugins={"faults": FaultPlugins()})
    return LLM(str(model_path), dtype="float32", plugin_manager=manager, max_num_seqs=8,
               **kwargs)


def greedy(max_tokens=8, **kwargs) -> SamplingParams:
    return SamplingParams(temperature=0, max_tokens=max_tokens, ignore_eos=True, **kwargs)


def assert_engine_idle(llm: LLM) -> None:
    stats = llm.engine.get_stats()
    assert (stats.num_running, stats.num_waiting) == (0, 0)
    assert stats.num_free_blocks == stats.num_total_blocks


def token_ids(outputs) -> list[list[int]]:
    return [output.outputs[0].token_ids for output in outputs]


@pytest.mark.parametrize("async_scheduling", [True, False])
def test_a_sampler_raising_for_one_request_fails_only_that_request(tiny_qwen2,
                                                                   async_scheduling):
    llm = make_llm(tiny_qwen2, sampler="faulty",
                   scheduler={"async_scheduling": async_scheduling})
    expected = token_ids(llm.generate([{"prompt_token_ids": p} for p in PROMPTS], greedy()))
    prompts = [{"prompt_token_ids": p} for p in PROMPTS]
    params = [greedy(), greedy(top_p=FAULTY_TOP_P), greedy()]
    outputs = llm.generate(prompts, params)
    faulty = outputs[1].outputs[0]
    assert faulty.finish_reason == "error"
    # It failed once the sampler saw FAULT_AFTER_TOKENS of its tokens (with async
    # scheduling one more is in flight then): the tokens before the failure stand.
    num_kept = len(faulty.token_ids)
    assert FAULT_AFTER_TOKENS <= num_kept <= FAULT_AFTER_TOKENS + int(async_scheduling)
    assert faulty.token_ids == expected[1][:num_kept]
    assert [o.outputs[0].finish_reason for o in (outputs[0], outputs[2])] == ["length"] * 2
    assert token_ids([outputs[0], outputs[2]]) == [expected[0], expected[2]]
    assert_engine_idle(llm)
    # And the engine goes on as before.
    assert token_ids(llm.generate([{"prompt_token_ids": PROMPTS[0]}], greedy())) == expected[:1]


def test_every_row_of_a_broken_sampler_fails_and_the_engine_survives(tiny_qwen2):
    llm = make_llm(tiny_qwen2, sampler="faulty")
    prompts = [{"prompt_token_ids": p} for p in PROMPTS]
    outputs = llm.generate(prompts, greedy(top_p=FAULTY_TOP_P))
    assert [o.outputs[0].finish_reason for o in outputs] == ["error"] * 3
    assert_engine_idle(llm)
    error = llm.engine.request_errors  # popped by generate: nothing left behind
    assert error == {}


def test_the_failed_requests_error_names_the_stage_not_the_exception_text(tiny_qwen2):
    llm = make_llm(tiny_qwen2, sampler="faulty")
    engine = llm.engine
    engine.add_request("bad", {"prompt_token_ids": PROMPTS[0]}, greedy(top_p=FAULTY_TOP_P))
    engine.add_request("good", {"prompt_token_ids": PROMPTS[1]}, greedy())
    finished = {}
    while engine.has_unfinished_requests():
        finished.update({o.request_id: o for o in engine.step() if o.finished})
    error = engine.pop_request_error("bad")
    assert isinstance(error, RequestFailedError) and not isinstance(error, EngineStepError)
    assert str(error) == "sampling failed (OverflowError)"
    assert engine.pop_request_error("good") is None
    assert finished["good"].outputs[0].finish_reason == "length"


@pytest.mark.parametrize("method", ["fill_bitmask", "accept_tokens", "terminates_on"])
def test_a_grammar_raising_for_one_request_fails_only_that_request(tiny_qwen2, method):
    llm = make_llm(tiny_qwen2, structured_output="faulty_grammar")
    choices = ["yes please", "no thanks"]
    constrained = SamplingParams(temperature=0, max_tokens=16, structured_outputs=(
        StructuredOutputsParams(choice=choices)))
    faulty = SamplingParams(temperature=0, max_tokens=16, structured_outputs=(
        StructuredOutputsParams(choice=[f"faulty-{method} a b c d", "faulty- e f g"])))
    prompts = [{"prompt_token_ids": p} for p in PROMPTS]
    expected_plain = token_ids(llm.generate(prompts[:1], greedy()))
    outputs = llm.generate(prompts, [greedy(), faulty, constrained])
    assert outputs[1].outputs[0].finish_reason == "error"
    assert token_ids(outputs[:1]) == expected_plain
    assert outputs[2].outputs[0].text in choices
    assert outputs[2].outputs[0].finish_reason == "stop"
    assert_engine_idle(llm)


class TokenizerRaisingOn:
    """A tokenizer whose decoding raises when it meets one token id (and which has no
    fast backend, so the detokenizer decodes through it)."""

    def __init__(self, tokenizer, bad_token_id: int) -> None:
        self._tokenizer = tokenizer
        self._bad_token_id = bad_token_id

    def decode(self, token_ids, **kwargs):
        if self._bad_token_id in token_ids:
            raise UnicodeDecodeError("utf-8", b"\xff", 0, 1, "a tokenizer bug")
        return self._tokenizer.decode(token_ids, **kwargs)

    def __getattr__(self, name):
        if name == "backend_tokenizer":
            raise AttributeError(name)
        return getattr(self._tokenizer, name)


def test_a_detokenizer_raising_for_one_request_fails_only_that_request(tiny_qwen2):
    llm = make_llm(tiny_qwen2)
    prompts = [{"prompt_token_ids": p} for p in PROMPTS[:2]]
    expected = llm.generate(prompts, greedy())
    first, second = token_ids(expected)
    bad = next(token for token in first if token not in second)
    processor = llm.engine.output_processor
    processor.tokenizer = TokenizerRaisingOn(processor.tokenizer, bad)
    outputs = llm.generate(prompts, greedy())
    assert outputs[0].outputs[0].finish_reason == "error"
    assert outputs[1].outputs[0].finish_reason == "length"
    assert outputs[1].outputs[0].token_ids == second
    assert outputs[1].outputs[0].text == expected[1].outputs[0].text
    assert_engine_idle(llm)


def test_a_failed_sample_of_n_fails_the_whole_request(tiny_qwen2):
    llm = make_llm(tiny_qwen2, sampler="faulty")
    params = SamplingParams(n=3, temperature=1.0, top_p=FAULTY_TOP_P, max_tokens=8, seed=1,
                            ignore_eos=True)
    [output] = llm.generate([{"prompt_token_ids": PROMPTS[0]}], params)
    assert [c.finish_reason for c in output.outputs] == ["error"] * 3
    assert_engine_idle(llm)


def test_a_failed_model_step_fails_the_batch_and_the_engine_recovers(tiny_qwen2):
    llm = make_llm(tiny_qwen2, enable_prefix_caching=True)
    prompts = [{"prompt_token_ids": p * 8} for p in PROMPTS]  # several full blocks each
    expected = token_ids(llm.generate(prompts, greedy()))
    model = llm.engine.core.runner.model
    model.forward = BreakingForward(model, num_failures=1)
    with pytest.raises(EngineStepError, match=r"the model step failed \(RuntimeError\)"):
        llm.generate(prompts, greedy())
    assert_engine_idle(llm)
    # Blocks the failed step may have half-written are no prefix-cache hits.
    assert llm.engine.components.kv_cache_manager.num_cached_blocks() == 0
    again = llm.generate(prompts, greedy())
    assert token_ids(again) == expected
    assert [o.num_cached_tokens for o in again] == [0, 0, 0]
    assert llm.engine.num_consecutive_failed_steps == 0


def run_async(engine: AsyncEngine, prompt, params, request_id):
    async def consume():
        outputs = []
        async for output in engine.generate(prompt, params, request_id):
            outputs.append(output)
        return outputs

    return asyncio.run(consume())


def test_async_engine_serves_on_after_a_failed_step_and_stops_when_failures_persist(
        tiny_qwen2):
    llm = make_llm(tiny_qwen2)
    engine = AsyncEngine(llm.engine)
    engine.start()
    params = SamplingParams(temperature=0, max_tokens=4, output_kind=RequestOutputKind.DELTA)
    prompt = {"prompt_token_ids": PROMPTS[0]}
    try:
        model = llm.engine.core.runner.model
        model.forward = BreakingForward(model, num_failures=1)
        with pytest.raises(EngineStepError):
            run_async(engine, prompt, params, "first")
        assert engine.is_healthy
        assert run_async(engine, prompt, params, "second")[-1].finished
        model.forward.num_failures = 1_000  # a fault that stays
        for attempt in range(3):
            with pytest.raises((EngineStepError, EngineDeadError)):
                run_async(engine, prompt, params, f"broken-{attempt}")
        deadline = time.monotonic() + 5
        while engine.is_healthy and time.monotonic() < deadline:
            time.sleep(0.01)
        assert not engine.is_healthy
        with pytest.raises(EngineDeadError):
            run_async(engine, prompt, params, "after")
    finally:
        engine.shutdown()
    assert_engine_idle(llm)


def test_a_request_that_can_never_fit_is_a_value_error_not_overload(tiny_qwen2):
    llm = make_llm(tiny_qwen2)
    engine = AsyncEngine(llm.engine, max_queued_requests=2)  # 8 + 2 slots
    engine.start()
    try:
        params = SamplingParams(n=11, temperature=1.0, max_tokens=2,
                                output_kind=RequestOutputKind.DELTA)
        with pytest.raises(ValueError, match=r"^n \(11\) is more than the server can ever hold"):
            run_async(engine, {"prompt_token_ids": PROMPTS[0]}, params, "too-wide")
        params.n = 10
        assert run_async(engine, {"prompt_token_ids": PROMPTS[0]}, params, "fits")[-1].finished
    finally:
        engine.shutdown()


class OutOfVocabularySampler(DefaultSampler):
    """Returns an id past the vocabulary for rows with FAULTY_TOP_P."""

    name = "out_of_vocabulary"

    def sample(self, logits, metadata):
        output = super().sample(logits, metadata)
        for row, top_p in enumerate(metadata.top_p.tolist()):
            if abs(top_p - FAULTY_TOP_P) < 1e-6:
                output.sampled_token_ids[row] = 10**6
        return output


@pytest.mark.parametrize("async_scheduling", [True, False])
def test_a_sampled_id_outside_the_vocabulary_fails_only_its_request(tiny_qwen2,
                                                                    async_scheduling):
    plugin = types.SimpleNamespace(register_samplers=hookimpl(
        lambda register: register("out_of_vocabulary", OutOfVocabularySampler)))
    manager = make_plugin_manager(extra_plugins={"oov": plugin})
    llm = LLM(str(tiny_qwen2), dtype="float32", plugin_manager=manager,
              sampler="out_of_vocabulary", scheduler={"async_scheduling": async_scheduling})
    prompts = [{"prompt_token_ids": p} for p in PROMPTS]
    expected = token_ids(llm.generate(prompts[:1], greedy()))
    outputs = llm.generate(prompts[:2], [greedy(), greedy(top_p=FAULTY_TOP_P)])
    assert outputs[1].outputs[0].finish_reason == "error"
    assert outputs[1].outputs[0].token_ids == []
    assert token_ids(outputs[:1]) == expected
    assert_engine_idle(llm)


class SamplerAdvancingSeedsThenRaising(DefaultSampler):
    """Samples the batch (drawing from seeded generators) and then raises for a batch
    holding a FAULTY_TOP_P row: the row-by-row retry must not see advanced streams."""

    name = "advancing"

    def sample(self, logits, metadata):
        output = super().sample(logits, metadata)
        if any(abs(top_p - FAULTY_TOP_P) < 1e-6 for top_p in metadata.top_p.tolist()):
            raise RuntimeError("fails after drawing")
        return output


def test_seeded_neighbours_of_a_failing_row_keep_their_stream(tiny_qwen2):
    plugin = types.SimpleNamespace(register_samplers=hookimpl(
        lambda register: register("advancing", SamplerAdvancingSeedsThenRaising)))
    manager = make_plugin_manager(extra_plugins={"advancing": plugin})
    llm = LLM(str(tiny_qwen2), dtype="float32", plugin_manager=manager, sampler="advancing")
    seeded = SamplingParams(temperature=1.0, seed=7, max_tokens=8, ignore_eos=True)
    prompts = [{"prompt_token_ids": p} for p in PROMPTS[:2]]
    alone = token_ids(llm.generate(prompts[:1], seeded))
    outputs = llm.generate(prompts, [seeded, greedy(top_p=FAULTY_TOP_P)])
    assert outputs[1].outputs[0].finish_reason == "error"
    assert token_ids(outputs[:1]) == alone
