"""Range limits shared by the offline API and the server: every numeric field stays in
what the engine's tensors and generators hold, every string is valid Unicode, structured
output specs are bounded, cache_salt isolates prefix-cache blocks, and a prompt text
that can never fit is refused before it is tokenized."""

from __future__ import annotations

import dataclasses
import json
import random
import time

import pytest
import torch

from kvloom import LLM, SamplingParams
from kvloom.engine.input_processor import (MAX_CACHE_SALT_CHARS, TEXT_LENGTH_MARGIN,
                                           ContextLengthError, InputLimits, InputProcessor,
                                           check_cache_salt, child_params, child_seed)
from kvloom.sampling_params import (MAX_CHOICES, MAX_JSON_SCHEMA_DEPTH, MAX_N, MAX_NUM_TOKENS,
                                    MAX_REPETITION_PENALTY, MAX_SEED, MAX_SPEC_BYTES,
                                    MAX_STOP_STRING_CHARS, MAX_STOP_STRINGS, MAX_STOP_TOKEN_IDS,
                                    MAX_TEMPERATURE, MAX_TOP_K, MIN_REPETITION_PENALTY, MIN_SEED,
                                    StructuredOutputsParams, check_text)

LONE = "a\ud800b"  # what JSON's "a\\ud800b" decodes to
MAX_MODEL_LEN = 64


def assert_names(excinfo, field: str) -> None:
    message = str(excinfo.value)
    assert message.startswith(field + " "), message
    assert len(message) < 400


# ------------------------------------------------------------------ numeric ranges
@pytest.mark.parametrize("kwargs, field", [
    ({"seed": 2**64}, "seed"),                  # the request
    ({"seed": 2**63}, "seed"),
    ({"seed": MIN_SEED - 1}, "seed"),
    ({"seed": 10**5000}, "seed"),               # too long for int -> str: still named
    ({"top_k": 2**63}, "top_k"),
    ({"top_k": MAX_TOP_K + 1}, "top_k"),
    ({"temperature": 1e39}, "temperature"),     # inf in float32
    ({"temperature": MAX_TEMPERATURE * 1.01}, "temperature"),
    ({"temperature": 10**400}, "temperature"),  # an int too large for a float
    ({"top_p": 1e-50}, "top_p"),                # positive, but 0.0 in float32
    ({"repetition_penalty": 1e-50}, "repetition_penalty"),
    ({"repetition_penalty": MIN_REPETITION_PENALTY / 2}, "repetition_penalty"),
    ({"repetition_penalty": MAX_REPETITION_PENALTY * 2}, "repetition_penalty"),
    ({"repetition_penalty": 1e39}, "repetition_penalty"),
    ({"presence_penalty": 1e39}, "presence_penalty"),
    ({"min_p": 1e39}, "min_p"),
    ({"max_tokens": MAX_NUM_TOKENS + 1}, "max_tokens"),
    ({"max_tokens": None, "min_tokens": MAX_NUM_TOKENS + 1}, "min_tokens"),
    ({"logprobs": 2**64}, "logprobs"),
    ({"n": 2**64}, "n"),
    ({"stop": ["x"] * (MAX_STOP_STRINGS + 1)}, "stop"),
    ({"stop": "x" * (MAX_STOP_STRING_CHARS + 1)}, "stop"),
    ({"stop_token_ids": [1] * (MAX_STOP_TOKEN_IDS + 1)}, "stop_token_ids"),
])
def test_out_of_range_values_are_named(kwargs, field):
    with pytest.raises(ValueError) as excinfo:
        SamplingParams(**kwargs)
    assert_names(excinfo, field)


def test_range_edges_are_accepted():
    for kwargs in ({"seed": MIN_SEED}, {"seed": MAX_SEED}, {"top_k": MAX_TOP_K},
                   {"temperature": MAX_TEMPERATURE}, {"top_p": 1e-30},
                   {"repetition_penalty": MIN_REPETITION_PENALTY},
                   {"repetition_penalty": MAX_REPETITION_PENALTY},
                   {"max_tokens": MAX_NUM_TOKENS}, {"max_tokens": None, "min_tokens": 100},
                   {"stop": ["x" * MAX_STOP_STRING_CHARS] * MAX_STOP_STRINGS},
                   {"stop_token_ids": [1] * MAX_STOP_TOKEN_IDS}):
        params = SamplingParams(**kwargs)
        assert {name: getattr(params, name) for name in kwargs} == kwargs


def test_seed_range_is_inside_what_torch_accepts():
    """Our int64 range, and every child seed derived from it, is accepted by this torch's
    manual_seed, whose own range ends exactly outside [-2**63, 2**64 - 1]."""
    generator = torch.Generator()
    for seed in (MIN_SEED, MAX_SEED, 2**64 - 1):
        generator.manual_seed(seed)
    for seed in (MIN_SEED - 1, 2**64):
        with pytest.raises((RuntimeError, ValueError, OverflowError)):
            generator.manual_seed(seed)


def test_child_seeds_wrap_inside_int64_and_keep_the_stream():
    params = SamplingParams(n=MAX_N, seed=MAX_SEED, temperature=1.0)
    seeds = [child_params(params, index).seed for index in range(MAX_N)]
    assert seeds[0] == MAX_SEED and seeds[1] == MIN_SEED
    assert all(MIN_SEED <= seed <= MAX_SEED for seed in seeds)
    assert len(set(seeds)) == MAX_N
    # torch reads a seed modulo 2**64: the wrapped seed is the unwrapped seed + index.
    wrapped, unwrapped = torch.Generator(), torch.Generator()
    wrapped.manual_seed(child_seed(MAX_SEED, 5))
    unwrapped.manual_seed(MAX_SEED + 5)
    assert torch.equal(torch.rand(8, generator=wrapped), torch.rand(8, generator=unwrapped))
    assert child_seed(7, 3) == 10 and child_seed(MIN_SEED, 0) == MIN_SEED


@pytest.fixture(scope="module")
def llm(tiny_qwen2):
    return LLM(str(tiny_qwen2), dtype="float32", max_model_len=MAX_MODEL_LEN)


def finish_reasons(outputs) -> list[str]:
    return [completion.finish_reason for output in outputs for completion in output.outputs]


def test_extreme_accepted_values_run_in_the_engine(llm):
    """The edges of every range sample valid tokens: no overflow, no NaN, no error."""
    vocab_size = llm.engine.components.hf_config.vocab_size
    prompt = {"prompt_token_ids": [11, 22, 33, 44, 55]}
    cases = [
        SamplingParams(n=2, seed=MAX_SEED, max_tokens=4, ignore_eos=True),
        SamplingParams(seed=MIN_SEED, max_tokens=4, ignore_eos=True),
        # min_tokens bans EOS (-inf) while T is huge: -inf / T must stay -inf
        SamplingParams(temperature=MAX_TEMPERATURE, min_tokens=4, max_tokens=4, seed=1),
        SamplingParams(repetition_penalty=MIN_REPETITION_PENALTY, max_tokens=4, seed=2,
                       ignore_eos=True),
        SamplingParams(repetition_penalty=MAX_REPETITION_PENALTY, max_tokens=4, seed=3,
                       ignore_eos=True),
        SamplingParams(top_k=MAX_TOP_K, top_p=1e-30, max_tokens=4, seed=4, ignore_eos=True),
    ]
    outputs = llm.generate([prompt] * len(cases), cases)
    assert finish_reasons(outputs) == ["length"] * (len(cases) + 1)
    for output in outputs:
        for completion in output.outputs:
            assert len(completion.token_ids) == 4
            assert all(0 <= token < vocab_size for token in completion.token_ids)


def test_top_k_beyond_the_vocabulary_means_all_tokens(llm):
    prompt = {"prompt_token_ids": [11, 22, 33, 44, 55]}
    vocab_size = llm.engine.components.hf_config.vocab_size
    runs = [llm.generate(prompt, SamplingParams(top_k=top_k, seed=123, max_tokens=8,
                                                ignore_eos=True))[0].outputs[0].token_ids
            for top_k in (0, vocab_size + 1, MAX_TOP_K)]
    assert runs[0] == runs[1] == runs[2]


# ------------------------------------------------------------------ strings
def test_check_text_finds_lone_surrogates_only():
    assert check_text("prompt", "plain") == "plain"
    assert check_text("prompt", "h\u00e9llo \U0001F600") == "h\u00e9llo \U0001F600"
    for bad in (LONE, "\udc00", "x" * 1000 + "\udfff"):
        with pytest.raises(ValueError, match=r"^prompt .*surrogate"):
            check_text("prompt", bad)


class SpyTokenizer:
    """Wraps a tokenizer and counts encode calls."""

    def __init__(self, tokenizer) -> None:
        self.tokenizer = tokenizer
        self.num_encodes = 0

    def encode(self, text, *args, **kwargs):
        self.num_encodes += 1
        return self.tokenizer.encode(text, *args, **kwargs)

    def get_vocab(self):
        return self.tokenizer.get_vocab()


@pytest.fixture
def processor(llm):
    real = llm.engine.input_processor
    limits = dataclasses.replace(real.limits)
    return InputProcessor(SpyTokenizer(llm.get_tokenizer()), limits, real.eos_token_ids)


@pytest.mark.parametrize("prompt, field", [
    (LONE, "prompt"),
    ({"prompt": LONE}, "prompt"),
    ({"prompt_token_ids": [1, 2], "prompt": LONE}, "prompt"),
    ({"prompt": "ok", "cache_salt": LONE}, "cache_salt"),
])
def test_lone_surrogate_in_a_prompt_is_a_value_error(processor, prompt, field):
    with pytest.raises(ValueError) as excinfo:
        processor.process_prompt(prompt)
    assert_names(excinfo, field)
    assert processor.tokenizer.num_encodes == 0


@pytest.mark.parametrize("kwargs", [
    {"stop": LONE}, {"stop": ["ok", LONE]},
])
def test_lone_surrogate_in_stop_strings(kwargs):
    with pytest.raises(ValueError) as excinfo:
        SamplingParams(**kwargs)
    assert_names(excinfo, "stop")


@pytest.mark.parametrize("spec, field", [
    ({"regex": LONE}, "structured_outputs.regex"),
    ({"grammar": f'root ::= "{LONE}"'}, "structured_outputs.grammar"),
    ({"choice": ["ok", LONE]}, "structured_outputs.choice"),
    ({"json": '{"const": "%s"}' % LONE}, "structured_outputs.json"),
    ({"json": {"type": "string", "enum": ["ok", LONE]}}, "structured_outputs.json"),
    ({"json": {"properties": {LONE: {"type": "string"}}}}, "structured_outputs.json"),
])
def test_lone_surrogate_in_structured_specs(spec, field):
    with pytest.raises(ValueError) as excinfo:
        StructuredOutputsParams(**spec)
    assert_names(excinfo, field)


def test_llm_generate_with_a_lone_surrogate_raises_and_the_engine_goes_on(llm):
    with pytest.raises(ValueError, match="^prompt"):
        llm.generate(["Hello", LONE], SamplingParams(max_tokens=2))
    assert not llm.engine.has_unfinished_requests()
    assert llm.generate("Hello", SamplingParams(max_tokens=2))[0].outputs[0].token_ids


# ------------------------------------------------------------------ structured outputs
def nested_dict(depth: int) -> dict:
    schema: dict = {"type": "string"}
    for _ in range(depth - 1):
        schema = {"items": schema}
    return schema


@pytest.mark.parametrize("spec, limit", [
    ({"choice": [f"c{i}" for i in range(MAX_CHOICES + 1)]}, "MAX_CHOICES"),
    ({"choice": ["x" * 1024] * 65}, "MAX_SPEC_BYTES"),
    ({"regex": "a" * (MAX_SPEC_BYTES + 1)}, "MAX_SPEC_BYTES"),
    ({"grammar": "root ::= " + '"a" ' * MAX_SPEC_BYTES}, "MAX_SPEC_BYTES"),
    ({"json": json.dumps({"enum": ["x" * 1000] * 70})}, "MAX_SPEC_BYTES"),
    ({"json": {"enum": ["x" * 1000] * 70}}, "MAX_SPEC_BYTES"),
    ({"json": {"enum": list(range(10**6))}}, "MAX_SPEC_BYTES"),
    ({"json": nested_dict(MAX_JSON_SCHEMA_DEPTH + 1)}, "MAX_JSON_SCHEMA_DEPTH"),
    ({"json": json.dumps(nested_dict(MAX_JSON_SCHEMA_DEPTH + 1))}, "MAX_JSON_SCHEMA_DEPTH"),
    ({"json": {"anyOf": [nested_dict(MAX_JSON_SCHEMA_DEPTH)]}}, "MAX_JSON_SCHEMA_DEPTH"),
])
def test_structured_spec_over_a_limit(spec, limit):
    kind = next(iter(spec))
    with pytest.raises(ValueError) as excinfo:
        StructuredOutputsParams(**spec)
    assert_names(excinfo, f"structured_outputs.{kind}")
    assert limit in str(excinfo.value)


def test_ten_thousand_deep_schema_is_refused_without_recursing():
    deep = nested_dict(10_000)
    with pytest.raises(RecursionError):  # what a recursive walk would do with it
        json.dumps(deep)
    started = time.monotonic()
    deep_text = '{"a":' * 10_000 + "1" + "}" * 10_000  # under MAX_SPEC_BYTES
    for spec in (deep, deep_text):
        with pytest.raises(ValueError, match="MAX_JSON_SCHEMA_DEPTH"):
            StructuredOutputsParams(json=spec)
    assert time.monotonic() - started < 1.0


def test_structured_specs_at_the_limits_are_accepted():
    StructuredOutputsParams(choice=[f"c{i}" for i in range(MAX_CHOICES)])
    StructuredOutputsParams(regex="a" * MAX_SPEC_BYTES)
    StructuredOutputsParams(json=nested_dict(MAX_JSON_SCHEMA_DEPTH))
    StructuredOutputsParams(json=json.dumps(nested_dict(MAX_JSON_SCHEMA_DEPTH)))
    # Brackets inside strings are not nesting.
    StructuredOutputsParams(json=json.dumps({"pattern": "[" * 500, "description": "{" * 500}))
    with pytest.raises(ValueError, match="JSON values"):
        StructuredOutputsParams(json={"enum": [object()]})
    with pytest.raises(ValueError, match="string keys"):
        StructuredOutputsParams(json={1: "x"})


def test_the_choice_limit_compiles_fast_in_the_engine(llm):
    """MAX_CHOICES short choices compile well under a second (XGrammar, tiny vocab here;
    ~0.1 s with a 32k vocabulary) and constrain the output."""
    choices = [f"choice_{i}" for i in range(MAX_CHOICES)]
    params = SamplingParams(max_tokens=12, temperature=0.0, structured_outputs=(
        StructuredOutputsParams(choice=choices)))
    started = time.monotonic()
    output = llm.generate("Pick one:", params)[0].outputs[0]
    assert time.monotonic() - started < 5.0
    assert output.text in choices


# ------------------------------------------------------------------ cache_salt
def test_cache_salt_from_the_prompt_dict(processor):
    text = processor.process_prompt({"prompt": "Hello", "cache_salt": "tenant-a"})
    ids = processor.process_prompt({"prompt_token_ids": [1, 2, 3], "cache_salt": "tenant-b"})
    assert (text.cache_salt, ids.cache_salt) == ("tenant-a", "tenant-b")
    assert processor.process_prompt({"prompt": "Hello"}).cache_salt is None
    requests = processor.make_requests("r", ids, SamplingParams(n=2))
    assert [r.cache_salt for r in requests] == ["tenant-b", "tenant-b"]
    # An explicit argument wins over the prompt's.
    assert processor.make_requests("r", ids, SamplingParams(), cache_salt="x")[0].cache_salt == "x"


@pytest.mark.parametrize("salt", ["", 123, "s" * (MAX_CACHE_SALT_CHARS + 1), LONE, b"bytes"])
def test_bad_cache_salt_is_named(processor, salt):
    with pytest.raises(ValueError) as excinfo:
        processor.process_prompt({"prompt_token_ids": [1, 2], "cache_salt": salt})
    assert_names(excinfo, "cache_salt")
    with pytest.raises(ValueError) as excinfo:
        check_cache_salt(salt)
    assert_names(excinfo, "cache_salt")
    assert check_cache_salt("s" * MAX_CACHE_SALT_CHARS)


def cached_tokens(llm, prompt_ids: list[int], salt: str | None) -> int:
    prompt = {"prompt_token_ids": prompt_ids}
    if salt is not None:
        prompt["cache_salt"] = salt
    params = SamplingParams(max_tokens=1, temperature=0.0)
    return llm.generate(prompt, params)[0].num_cached_tokens


def test_prefix_cache_blocks_are_shared_only_within_a_salt(llm):
    """Needs Engine.add_request to use ProcessedPrompt.cache_salt (or make_requests'
    fallback to it): the prompt dict's salt must reach the KV cache's block hashes."""
    rng = random.Random(0)
    vocab_size = llm.engine.components.hf_config.vocab_size

    def long_prompt() -> list[int]:
        return [rng.randrange(1, vocab_size) for _ in range(48)]  # three 16-token blocks

    same = long_prompt()
    assert cached_tokens(llm, same, "alice") == 0
    assert cached_tokens(llm, same, "bob") == 0
    assert cached_tokens(llm, same, "alice") > 0
    unsalted = long_prompt()
    assert cached_tokens(llm, unsalted, None) == 0
    assert cached_tokens(llm, unsalted, "alice") == 0
    assert cached_tokens(llm, unsalted, None) > 0
    text = ("Continuous batching mixes prefill and decode. Hello, my name is kvloom and I "
            "generate text one token at a time. ")
    first = llm.generate({"prompt": text, "cache_salt": "t"}, SamplingParams(max_tokens=1))
    second = llm.generate({"prompt": text, "cache_salt": "u"}, SamplingParams(max_tokens=1))
    third = llm.generate({"prompt": text, "cache_salt": "t"}, SamplingParams(max_tokens=1))
    assert len(first[0].prompt_token_ids) >= 32
    assert (second[0].num_cached_tokens, third[0].num_cached_tokens > 0) == (0, True)


# ------------------------------------------------------------------ prompt length
def test_longest_vocabulary_key_bounds_characters_per_token(processor, llm):
    """The bound the text check relies on: no text covers more than C characters a token."""
    max_chars = processor.max_token_chars()
    assert max_chars == max(len(key) for key in llm.get_tokenizer().get_vocab())
    rng = random.Random(1)
    alphabet = "The quick brown fox  jumps\n0123456789 \u00e9\u4e2d\U0001F600<|endoftext|>"
    tokenizer = llm.get_tokenizer()
    for _ in range(200):
        text = "".join(rng.choice(alphabet) for _ in range(rng.randrange(1, 300)))
        assert len(text) <= max_chars * len(tokenizer.encode(text))


def test_text_that_cannot_fit_is_refused_before_tokenizing(processor):
    limit = TEXT_LENGTH_MARGIN * processor.max_token_chars() * processor.limits.max_model_len
    started = time.monotonic()
    with pytest.raises(ContextLengthError) as excinfo:
        processor.process_prompt("x" * 2_000_000)
    assert time.monotonic() - started < 0.5
    assert_names(excinfo, "prompt")
    assert isinstance(excinfo.value, ValueError) and "max_model_len" in str(excinfo.value)
    with pytest.raises(ContextLengthError):
        processor.process_prompt({"prompt": "y" * (limit + 1)})
    assert processor.tokenizer.num_encodes == 0
    # At the bound the text is tokenized, and then judged by its token count.
    processed = processor.process_prompt("z " * (limit // 2))
    assert processor.tokenizer.num_encodes == 1
    with pytest.raises(ContextLengthError, match="^prompt has"):
        processor.make_requests("r", processed, SamplingParams())


def test_check_length_clamps_offline_and_is_strict_for_the_server(processor):
    limits = processor.limits
    params = SamplingParams(max_tokens=1000)
    assert processor.check_length(10, params) == limits.max_model_len - 10
    with pytest.raises(ContextLengthError) as excinfo:
        processor.check_length(10, params, clamp=False)
    assert_names(excinfo, "max_tokens")
    with pytest.raises(ContextLengthError) as excinfo:
        processor.check_length(limits.max_model_len, SamplingParams(), clamp=False)
    assert_names(excinfo, "prompt")
    # min_tokens beyond what the context leaves can never be honoured.
    with pytest.raises(ValueError) as excinfo:
        processor.check_length(limits.max_model_len - 4, SamplingParams(max_tokens=None,
                                                                        min_tokens=10))
    assert_names(excinfo, "min_tokens")
    assert processor.check_length(limits.max_model_len - 4,
                                  SamplingParams(max_tokens=None, min_tokens=4)) == 4


def test_kv_cache_messages_name_the_field(llm):
    real = llm.engine.input_processor
    small = InputProcessor(None, InputLimits(real.limits.vocab_size, 1000, 16, 2),
                           real.eos_token_ids)
    with pytest.raises(ValueError) as excinfo:
        small.check_length(40, SamplingParams(max_tokens=1))
    assert_names(excinfo, "prompt")
    with pytest.raises(ValueError) as excinfo:
        small.check_length(20, SamplingParams(max_tokens=20))
    assert_names(excinfo, "max_tokens")


@pytest.mark.parametrize("name", ["ignore_eos", "skip_special_tokens",
                                  "include_stop_str_in_output"])
def test_boolean_fields_must_be_booleans(name):
    with pytest.raises(ValueError, match=f"^{name} must be a boolean"):
        SamplingParams(**{name: "false"})
    assert getattr(SamplingParams(**{name: True}), name) is True
