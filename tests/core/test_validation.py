"""Input validation: SamplingParams, prompts and requests are rejected before they enter the
engine, with a ValueError naming the field, and a rejection never disturbs other requests."""

from __future__ import annotations

import math

import pytest

from kvloom import LLM, Engine, EngineConfig, SamplingParams
from kvloom.sampling_params import MAX_LOGPROBS, MAX_N

MAX_MODEL_LEN = 64
GOOD_PROMPTS = [[11, 22, 33, 44, 55, 66, 77, 88], [101, 5, 250, 17, 9]]
GREEDY = SamplingParams(max_tokens=5, temperature=0.0, ignore_eos=True)


# ---------------------------------------------------------------- SamplingParams


@pytest.mark.parametrize("kwargs, field", [
    ({"n": 0}, "n"),
    ({"n": MAX_N + 1}, "n"),
    ({"n": 10**9}, "n"),
    ({"n": 1.5}, "n"),
    ({"n": True}, "n"),
    ({"temperature": -0.1}, "temperature"),
    ({"temperature": math.nan}, "temperature"),
    ({"temperature": math.inf}, "temperature"),
    ({"temperature": "hot"}, "temperature"),
    ({"top_p": 0.0}, "top_p"),
    ({"top_p": 1.5}, "top_p"),
    ({"top_p": -0.5}, "top_p"),
    ({"top_p": math.nan}, "top_p"),
    ({"top_k": -2}, "top_k"),
    ({"top_k": 2.5}, "top_k"),
    ({"min_p": 1.5}, "min_p"),
    ({"min_p": -0.1}, "min_p"),
    ({"max_tokens": 0}, "max_tokens"),
    ({"max_tokens": -1}, "max_tokens"),
    ({"max_tokens": 2.0}, "max_tokens"),
    ({"min_tokens": -1}, "min_tokens"),
    ({"min_tokens": 10, "max_tokens": 5}, "min_tokens"),
    ({"logprobs": -1}, "logprobs"),
    ({"logprobs": MAX_LOGPROBS + 1}, "logprobs"),
    ({"presence_penalty": 2.5}, "presence_penalty"),
    ({"presence_penalty": -2.01}, "presence_penalty"),
    ({"frequency_penalty": -3.0}, "frequency_penalty"),
    ({"frequency_penalty": math.inf}, "frequency_penalty"),
    ({"repetition_penalty": 0.0}, "repetition_penalty"),
    ({"repetition_penalty": -1.0}, "repetition_penalty"),
    ({"repetition_penalty": math.nan}, "repetition_penalty"),
    ({"stop": ""}, "stop"),
    ({"stop": ["ok", ""]}, "stop"),
    ({"stop": [1]}, "stop"),
    ({"stop": 5}, "stop"),
    ({"stop_token_ids": 5}, "stop_token_ids"),
    ({"stop_token_ids": ["a"]}, "stop_token_ids"),
    ({"seed": 1.5}, "seed"),
])
def test_sampling_params_rejects(kwargs, field):
    with pytest.raises(ValueError) as excinfo:
        SamplingParams(**kwargs)
    assert str(excinfo.value).startswith(field + " "), str(excinfo.value)


def test_sampling_params_accepts_edges():
    assert SamplingParams(top_k=-1).top_k == 0  # -1 and 0 both mean "off"
    assert SamplingParams(temperature=0).is_greedy
    assert not SamplingParams(temperature=1e-3).is_greedy
    for kwargs in ({"n": MAX_N}, {"top_p": 1.0}, {"min_p": 0.0}, {"min_p": 1.0},
                   {"logprobs": 0}, {"logprobs": MAX_LOGPROBS}, {"max_tokens": None},
                   {"min_tokens": 5, "max_tokens": 5}, {"presence_penalty": -2.0},
                   {"frequency_penalty": 2.0}, {"repetition_penalty": 0.5}, {"stop": "\n"},
                   {"stop": ("a", "b")}, {"stop_token_ids": (1, 2)}, {"seed": 0}):
        SamplingParams(**kwargs)
    assert SamplingParams(stop="x").stop_strings == ["x"]
    assert SamplingParams(stop_token_ids=(1, 2)).stop_token_ids == [1, 2]


def test_sampling_params_replace_revalidates():
    import dataclasses

    with pytest.raises(ValueError, match="temperature"):
        dataclasses.replace(SamplingParams(), temperature=-1.0)


# ---------------------------------------------------------------- requests


def make_llm(path) -> LLM:
    return LLM(str(path), dtype="float32", max_model_len=MAX_MODEL_LEN)


@pytest.fixture(scope="module")
def shared(tiny_qwen2):
    """One LLM for the module, and the greedy tokens of GOOD_PROMPTS, each generated alone."""
    llm = make_llm(tiny_qwen2)
    expected = [llm.generate({"prompt_token_ids": p}, GREEDY)[0].outputs[0].token_ids
                for p in GOOD_PROMPTS]
    return {"llm": llm, "expected": expected, "path": tiny_qwen2}


@pytest.fixture
def expected(shared):
    return shared["expected"]


@pytest.fixture
def llm(shared):
    """The shared LLM; rebuilt if a failed test left it dirty, so failures do not cascade."""
    engine = shared["llm"].engine
    kv = engine.components.kv_cache_manager
    if (engine.has_unfinished_requests() or engine.output_processor.states
            or kv.num_free_blocks() != kv.num_blocks):
        shared["llm"] = make_llm(shared["path"])
    return shared["llm"]


def run_to_completion(engine: Engine, max_steps: int = 500) -> dict[str, object]:
    finished = {}
    for _ in range(max_steps):
        if not engine.has_unfinished_requests():
            break
        for output in engine.step():
            if output.finished:
                finished[output.request_id] = output
    assert not engine.has_unfinished_requests(), "the engine did not drain"
    return finished


def assert_engine_clean(engine: Engine) -> None:
    kv = engine.components.kv_cache_manager
    assert kv.num_free_blocks() == kv.num_blocks, "KV blocks leaked"
    assert not engine.has_unfinished_requests()
    assert engine.output_processor.states == {}
    assert engine.output_processor.sequence_to_request == {}


def bad_prompts(vocab_size: int) -> list[tuple[object, str]]:
    return [
        ("", "prompt must not be empty"),
        ({"prompt": ""}, "prompt must not be empty"),
        ({"prompt_token_ids": []}, "prompt_token_ids"),
        ({"prompt_token_ids": [1, -1, 2]}, "prompt_token_ids.*-1"),
        ({"prompt_token_ids": [1, vocab_size]}, f"prompt_token_ids.*{vocab_size}"),
        ({"prompt_token_ids": [1, 2.0]}, "prompt_token_ids"),
        ({"prompt_token_ids": [1, "2"]}, "prompt_token_ids"),
        ({"prompt_token_ids": [True, 2]}, "prompt_token_ids"),
        ({"prompt_token_ids": "1 2 3"}, "prompt_token_ids"),
        ({"prompt_token_ids": [1] * MAX_MODEL_LEN}, "max_model_len"),
        ({"prompt_token_ids": [1] * (MAX_MODEL_LEN + 50)}, "max_model_len"),
        ({"prompt": "hi", "promt_token_ids": [1]}, "promt_token_ids"),
        ([1, 2, 3], "prompt must be a string"),
        (None, "prompt must be a string"),
    ]


NUM_BAD_PROMPTS = 14


@pytest.mark.parametrize("case", range(NUM_BAD_PROMPTS))
def test_bad_prompt_is_rejected_and_others_complete(llm, expected, case):
    engine = llm.engine
    bad, message = bad_prompts(engine.components.hf_config.vocab_size)[case]
    engine.add_request("before", {"prompt_token_ids": GOOD_PROMPTS[0]}, GREEDY)
    with pytest.raises(ValueError, match=message):
        engine.add_request("bad", bad, GREEDY)
    assert not engine.output_processor.has_request("bad")
    assert engine.core.scheduler.num_waiting == 1
    # Nothing of the rejected request is left: its id is free to use.
    engine.add_request("bad", {"prompt_token_ids": GOOD_PROMPTS[1]}, GREEDY)
    finished = run_to_completion(engine)
    assert finished["before"].outputs[0].token_ids == expected[0]
    assert finished["bad"].outputs[0].token_ids == expected[1]
    assert_engine_clean(engine)


def test_bad_prompt_list_is_exhaustive(llm):
    assert len(bad_prompts(llm.engine.components.hf_config.vocab_size)) == NUM_BAD_PROMPTS


@pytest.mark.parametrize("params, message", [
    (SamplingParams(stop_token_ids=[-1]), "stop_token_ids"),
    (SamplingParams(stop_token_ids=[10**6]), "stop_token_ids"),
    ({"max_tokens": 5}, "sampling_params"),
])
def test_bad_request_params_are_rejected(llm, expected, params, message):
    engine = llm.engine
    with pytest.raises(ValueError, match=message):
        engine.add_request("bad", {"prompt_token_ids": GOOD_PROMPTS[0]}, params)
    assert_engine_clean(engine)


def test_bad_request_options_are_rejected(llm):
    engine = llm.engine
    prompt = {"prompt_token_ids": GOOD_PROMPTS[0]}
    with pytest.raises(ValueError, match="request_id"):
        engine.add_request("", prompt, GREEDY)
    with pytest.raises(ValueError, match="priority"):
        engine.add_request("x", prompt, GREEDY, priority="high")
    with pytest.raises(ValueError, match="cache_salt"):
        engine.add_request("x", prompt, GREEDY, cache_salt=123)
    assert_engine_clean(engine)


def test_text_prompt_works_alongside(llm):
    engine = llm.engine
    tokens = llm.get_tokenizer().encode("Hello, my name is")
    engine.add_request("text", "Hello, my name is", GREEDY)
    engine.add_request("ids", {"prompt_token_ids": tokens}, GREEDY)
    finished = run_to_completion(engine)
    assert finished["text"].prompt_token_ids == tokens
    assert finished["text"].outputs[0].token_ids == finished["ids"].outputs[0].token_ids
    assert_engine_clean(engine)


def test_duplicate_request_id_is_rejected(llm, expected):
    engine = llm.engine
    engine.add_request("same", {"prompt_token_ids": GOOD_PROMPTS[0]}, GREEDY)
    with pytest.raises(ValueError, match="'same' is already in use"):
        engine.add_request("same", {"prompt_token_ids": GOOD_PROMPTS[1]}, GREEDY)
    finished = run_to_completion(engine)
    assert finished["same"].outputs[0].token_ids == expected[0]
    assert_engine_clean(engine)
    # Once finished, the id can be used again.
    engine.add_request("same", {"prompt_token_ids": GOOD_PROMPTS[1]}, GREEDY)
    assert run_to_completion(engine)["same"].outputs[0].token_ids == expected[1]
    assert_engine_clean(engine)


@pytest.mark.parametrize("first, second", [("a", "0_a"), ("0_a", "a")])
def test_request_id_colliding_with_a_sample_id(shared, expected, first, second):
    """With n=2, request "a" runs as samples "0_a" and "1_a": a user request "0_a" must be
    rejected cleanly (or run), never steal the other request's tokens."""
    engine = make_llm(shared["path"]).engine  # a failure here must not leak into other tests
    n2 = SamplingParams(n=2, max_tokens=5, temperature=0.0, ignore_eos=True)
    params = {"a": n2, "0_a": GREEDY}
    engine.add_request(first, {"prompt_token_ids": GOOD_PROMPTS[0]}, params[first])
    try:
        engine.add_request(second, {"prompt_token_ids": GOOD_PROMPTS[1]}, params[second])
        accepted = True
    except ValueError:
        accepted = False
    finished = run_to_completion(engine)
    assert first in finished, f"request {first!r} never finished (accepted {second!r}: {accepted})"
    expected_first = [expected[0]] * (2 if first == "a" else 1)
    assert [c.token_ids for c in finished[first].outputs] == expected_first
    if accepted:
        expected_second = [expected[1]] * (2 if second == "a" else 1)
        assert [c.token_ids for c in finished[second].outputs] == expected_second
    else:
        assert second not in finished
    assert_engine_clean(engine)


def test_max_tokens_is_clamped_to_the_context_window(llm):
    engine = llm.engine
    prompt = list(range(1, 11))
    long = SamplingParams(max_tokens=1000, temperature=0.0, ignore_eos=True)
    unlimited = SamplingParams(max_tokens=None, temperature=0.0, ignore_eos=True)
    engine.add_request("long", {"prompt_token_ids": prompt}, long)
    engine.add_request("unlimited", {"prompt_token_ids": prompt}, unlimited)
    engine.add_request("edge", {"prompt_token_ids": [7] * (MAX_MODEL_LEN - 1)}, long)
    finished = run_to_completion(engine)
    for request_id in ("long", "unlimited"):
        completion = finished[request_id].outputs[0]
        assert len(completion.token_ids) == MAX_MODEL_LEN - len(prompt)
        assert completion.finish_reason == "length"
    assert finished["long"].outputs[0].token_ids == finished["unlimited"].outputs[0].token_ids
    edge = finished["edge"].outputs[0]
    assert (len(edge.token_ids), edge.finish_reason) == (1, "length")
    assert_engine_clean(engine)


def test_llm_generate_bad_prompt_in_the_middle(llm, expected):
    prompts = [{"prompt_token_ids": GOOD_PROMPTS[0]}, {"prompt_token_ids": [1, -5]},
               {"prompt_token_ids": GOOD_PROMPTS[1]}]
    with pytest.raises(ValueError, match="prompt_token_ids"):
        llm.generate(prompts, GREEDY)
    assert_engine_clean(llm.engine)
    with pytest.raises(ValueError, match="prompt must not be empty"):
        llm.generate(["Hello", "", "World"], GREEDY)
    assert_engine_clean(llm.engine)
    with pytest.raises(ValueError, match="sampling_params"):
        llm.generate([prompts[0], prompts[2]], [GREEDY])
    assert_engine_clean(llm.engine)
    outputs = llm.generate([prompts[0], prompts[2]], GREEDY)
    assert [o.outputs[0].token_ids for o in outputs] == expected
    assert_engine_clean(llm.engine)


def test_llm_generate_rejects_bad_sampling_params_up_front(llm):
    with pytest.raises(ValueError, match="max_tokens"):
        llm.generate("Hello", SamplingParams(max_tokens=0))
    assert_engine_clean(llm.engine)


@pytest.fixture
def small_cache_engine(tiny_qwen2):
    """Two KV blocks of 16 tokens: 32 token slots in all."""
    return Engine(EngineConfig.from_dict({
        "model": str(tiny_qwen2), "dtype": "float32", "max_model_len": MAX_MODEL_LEN,
        "cache": {"num_gpu_blocks_override": 2, "block_size": 16}}))


def test_request_that_can_never_fit_in_the_kv_cache(small_cache_engine, expected):
    engine = small_cache_engine
    assert engine.components.kv_cache_manager.num_blocks == 2
    engine.add_request("good", {"prompt_token_ids": GOOD_PROMPTS[0]}, GREEDY)
    with pytest.raises(ValueError, match="KV-cache blocks"):
        engine.add_request("huge", {"prompt_token_ids": [3] * 40},
                           SamplingParams(max_tokens=1))
    # 20 prompt + 14 output tokens need 33 slots (the last token is never stored): too many.
    with pytest.raises(ValueError, match="needs 3 KV-cache blocks but the cache has 2"):
        engine.add_request("over", {"prompt_token_ids": [3] * 20},
                           SamplingParams(max_tokens=14, ignore_eos=True))
    # max_tokens unset means "up to max_model_len", which cannot fit either.
    with pytest.raises(ValueError, match="KV-cache blocks"):
        engine.add_request("open", {"prompt_token_ids": [3] * 20},
                           SamplingParams(max_tokens=None))
    assert not engine.output_processor.has_request("huge")
    finished = run_to_completion(engine)
    assert list(finished) == ["good"]
    assert finished["good"].outputs[0].token_ids == expected[0]
    assert_engine_clean(engine)


def test_request_that_exactly_fits_the_kv_cache_completes(small_cache_engine):
    engine = small_cache_engine
    # 20 + 13 tokens: 33 positions of which the last is never fed back -> 32 slots, 2 blocks.
    engine.add_request("exact", {"prompt_token_ids": [3] * 20},
                       SamplingParams(max_tokens=13, temperature=0.0, ignore_eos=True))
    finished = run_to_completion(engine, max_steps=100)
    completion = finished["exact"].outputs[0]
    assert (len(completion.token_ids), completion.finish_reason) == (13, "length")
    assert_engine_clean(engine)
