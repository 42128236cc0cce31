"""End-to-end exactness: kvloom's greedy output equals Hugging Face transformers'.

Every test runs tiny random Qwen2 checkpoints in float32 on the CPU and compares
token ids with ``transformers`` ``generate`` (each prompt alone, no padding), so
any difference in the model, the paged attention, the scheduler (chunked
prefill, preemption, prefix caching) or the input/output plumbing shows up as a
different token. The checkpoints' embeddings are N(0, 1), so greedy choices are
far from ties and an exact comparison means something.
"""

from __future__ import annotations

import json
import os
import random
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import pytest
import yaml

from kvloom import LLM, Engine, SamplingParams
from kvloom.testing.checkpoints import TinyQwen2Spec
from kvloom.testing.reference import hf_greedy_generate

MAX_TOKENS = 32
GREEDY = SamplingParams(temperature=0.0, max_tokens=MAX_TOKENS)
ENGINE_DEFAULTS = dict(dtype="float32", seed=0, platform="cpu", attention="torch")

# Text prompts from short to long; with the tiny tokenizer they are ~3 to ~150 tokens.
TEXT_PROMPTS = [
    "Hello, my name",
    "The quick brown fox jumps over the lazy dog.",
    ("Paged attention keeps the KV cache in blocks. Continuous batching mixes prefill "
     "and decode. ") * 5 + "Hello, my name is",
]
TOKEN_PROMPT_LENGTHS = [3, 17, 61, 150]


# --------------------------------------------------------------------- helpers
def make_llm(path: Path, **overrides: Any) -> LLM:
    return LLM(str(path), **{**ENGINE_DEFAULTS, **overrides})


def tokenizer_of(path: Path):
    from transformers import AutoTokenizer

    return AutoTokenizer.from_pretrained(str(path))


_HF_CACHE: dict[tuple, list[list[int]]] = {}


def hf_greedy(path: Path, prompts_token_ids: list[list[int]],
              max_new_tokens: int = MAX_TOKENS) -> list[list[int]]:
    """hf_greedy_generate, memoized: several tests compare against the same runs."""
    key = (str(path), tuple(map(tuple, prompts_token_ids)), max_new_tokens)
    if key not in _HF_CACHE:
        _HF_CACHE[key] = hf_greedy_generate(path, prompts_token_ids, max_new_tokens)
    return [list(ids) for ids in _HF_CACHE[key]]


def random_token_ids(rng: random.Random, length: int, vocab_size: int) -> list[int]:
    # Ids 0-2 are the special tokens; everything else is an ordinary BPE token.
    return [rng.randrange(3, vocab_size) for _ in range(length)]


@dataclass
class PromptBatch:
    prompts: list[Any]           # what the engine receives
    token_ids: list[list[int]]   # what HF receives


def mixed_prompts(path: Path, vocab_size: int = 384, seed: int = 0) -> PromptBatch:
    """Text prompts, {"prompt": ...} and {"prompt_token_ids": ...} prompts, interleaved."""
    tokenizer = tokenizer_of(path)
    rng = random.Random(seed)
    prompts, token_ids = [], []
    token_prompts = [random_token_ids(rng, n, vocab_size) for n in TOKEN_PROMPT_LENGTHS]
    for index, ids in enumerate(token_prompts):
        prompts.append({"prompt_token_ids": ids})
        token_ids.append(ids)
        if index < len(TEXT_PROMPTS):
            text = TEXT_PROMPTS[index]
            prompts.append({"prompt": text} if index == 1 else text)
            token_ids.append(tokenizer.encode(text))
    lengths = [len(ids) for ids in token_ids]
    assert min(lengths) <= 5 and max(lengths) >= 140, lengths
    return PromptBatch(prompts, token_ids)


def stream_text(tokenizer, token_ids: list[int]) -> str:
    """The text incremental detokenization must show for ``token_ids``.

    It is the decode of the output tokens alone (no prompt text), up to the
    last token after which the text does not end in an incomplete character:
    a trailing partial UTF-8 sequence is held back, as vLLM does.
    """
    for end in range(len(token_ids), -1, -1):
        text = tokenizer.decode(token_ids[:end], skip_special_tokens=True)
        if not text.endswith("\ufffd"):
            return text
    return ""


def assert_matches_hf(outputs, expected: list[list[int]], prompts_token_ids: list[list[int]],
                      tokenizer, max_tokens: int = MAX_TOKENS, eos_token_id: int = 0) -> None:
    """Token-for-token identity with HF, plus finish reasons and text consistent with it."""
    assert len(outputs) == len(expected)
    for index, (output, reference, prompt_ids) in enumerate(
            zip(outputs, expected, prompts_token_ids)):
        assert output.finished
        assert output.prompt_token_ids == prompt_ids, f"prompt {index}: tokenization differs"
        for completion in output.outputs:
            assert completion.token_ids == reference, (
                f"prompt {index} ({len(prompt_ids)} tokens): kvloom {completion.token_ids} "
                f"!= HF {reference}")
            # HF stops at EOS; an EOS wins over a length limit it coincides with.
            assert completion.finish_reason == (
                "stop" if reference[-1] == eos_token_id else "length")
            assert len(reference) == max_tokens or reference[-1] == eos_token_id
            assert completion.text == stream_text(tokenizer, completion.token_ids), (
                f"prompt {index}: text is not the decode of the output tokens")


def record_schedules(engine: Engine) -> list[list[tuple]]:
    """Spy on the scheduler: per step, (request_id, num_computed, num_new, num_prompt, sample)."""
    steps: list[list[tuple]] = []
    scheduler = engine.core.scheduler
    original = scheduler.schedule

    def schedule():
        output = original()
        steps.append([(item.request_id, item.num_computed_tokens, len(item.token_ids),
                       len(item.prompt_token_ids), item.sample) for item in output.scheduled])
        return output

    scheduler.schedule = schedule
    return steps


def assert_all_blocks_free(llm: LLM) -> None:
    stats = llm.engine.get_stats()
    assert not llm.engine.has_unfinished_requests()
    assert stats.num_free_blocks == stats.num_total_blocks
    assert stats.num_running == 0 and stats.num_waiting == 0


# ---------------------------------------------------------- 1. model shapes
SHAPES = {
    "gqa_4q_2kv": (TinyQwen2Spec(), 16),
    "mha_4q_4kv": (TinyQwen2Spec(num_key_value_heads=4, seed=1), 8),
    "tied_embeddings": (TinyQwen2Spec(tie_word_embeddings=True, seed=2), 8),
    "odd_6q_3kv_head_dim_16": (TinyQwen2Spec(num_attention_heads=6, num_key_value_heads=3,
                                             head_dim=16, seed=3), 8),
    "odd_5q_1kv_head_dim_12": (TinyQwen2Spec(num_attention_heads=5, num_key_value_heads=1,
                                             head_dim=12, seed=4), 4),
    "four_layers_rope_1e6": (TinyQwen2Spec(num_hidden_layers=4, rope_theta=1e6, seed=5), 16),
}


@pytest.mark.parametrize("shape", list(SHAPES))
def test_greedy_matches_hf_for_model_shapes(tiny_qwen2_factory, shape):
    spec, block_size = SHAPES[shape]
    path = tiny_qwen2_factory(spec)
    batch = mixed_prompts(path, spec.vocab_size, seed=len(shape))
    llm = make_llm(path, block_size=block_size)
    outputs = llm.generate(batch.prompts, GREEDY)
    expected = hf_greedy(path, batch.token_ids)
    # The outputs must be varied for the comparison to mean anything.
    assert len({tuple(ids) for ids in expected}) == len(expected)
    assert_matches_hf(outputs, expected, batch.token_ids, llm.get_tokenizer())
    assert_all_blocks_free(llm)


def hf_generate_with(path: Path, token_ids: list[int], max_new_tokens: int, **kwargs) -> list[int]:
    """HF greedy generation of one prompt with extra ``generate`` arguments."""
    import torch
    from transformers import AutoModelForCausalLM

    model = AutoModelForCausalLM.from_pretrained(str(path), dtype=torch.float32).eval()
    input_ids = torch.tensor([token_ids])
    with torch.no_grad():
        output = model.generate(input_ids, attention_mask=torch.ones_like(input_ids),
                                do_sample=False, max_new_tokens=max_new_tokens, **kwargs)
    return output[0, len(token_ids):].tolist()


def test_greedy_rows_match_hf_next_to_sampled_rows(tiny_qwen2):
    """Per-row sampling settings stay in their row: greedy rows batched with sampled,
    penalized rows still equal HF, repetition_penalty equals HF's, and seeded rows
    reproduce whatever batch they run in."""
    batch = mixed_prompts(tiny_qwen2, seed=10)
    count = len(batch.prompts)
    sampled = [SamplingParams(temperature=0.8, top_p=0.9, top_k=40, min_p=0.02,
                              presence_penalty=0.5, frequency_penalty=0.3,
                              repetition_penalty=1.1, seed=index, max_tokens=MAX_TOKENS)
               for index in range(count)]
    penalized = SamplingParams(temperature=0.0, repetition_penalty=1.5, max_tokens=MAX_TOKENS)
    llm = make_llm(tiny_qwen2, block_size=8)
    outputs = llm.generate(batch.prompts * 3, [GREEDY] * count + sampled + [penalized] * count)
    assert_matches_hf(outputs[:count], hf_greedy(tiny_qwen2, batch.token_ids), batch.token_ids,
                      llm.get_tokenizer())
    for output, ids in zip(outputs[2 * count:], batch.token_ids):
        assert output.outputs[0].token_ids == hf_generate_with(
            tiny_qwen2, ids, MAX_TOKENS, repetition_penalty=1.5)
    assert [o.outputs[0].token_ids for o in outputs[2 * count:]] != [
        o.outputs[0].token_ids for o in outputs[:count]]

    alone = llm.generate(batch.prompts[::-1], sampled[::-1])
    assert [o.outputs[0].token_ids for o in alone[::-1]] == [
        o.outputs[0].token_ids for o in outputs[count:2 * count]]
    assert_all_blocks_free(llm)


# --------------------------------------------------------- 2. chunked prefill
@pytest.mark.parametrize("budget", [16, 32])
def test_chunked_prefill_matches_hf(tiny_qwen2, budget):
    batch = mixed_prompts(tiny_qwen2)
    llm = make_llm(tiny_qwen2, block_size=8, max_num_batched_tokens=budget,
                   enable_prefix_caching=False)
    steps = record_schedules(llm.engine)
    budgets_seen = []
    original_step = llm.engine.step

    def step():
        outputs = original_step()
        budgets_seen.append(llm.engine.get_stats().num_scheduled_tokens)
        return outputs

    llm.engine.step = step
    outputs = llm.generate(batch.prompts, GREEDY)
    assert_matches_hf(outputs, hf_greedy(tiny_qwen2, batch.token_ids), batch.token_ids,
                      llm.get_tokenizer())

    # The engine really chunked: never over budget, the budget often full, and the
    # 150-token prompt took many prefill steps before its first sample.
    assert budgets_seen == [sum(item[2] for item in step) for step in steps]
    assert max(budgets_seen) == budget
    assert sum(num == budget for num in budgets_seen) >= 150 // budget
    longest = max(range(len(batch.token_ids)), key=lambda i: len(batch.token_ids[i]))
    chunks = [item for step in steps for item in step
              if item[3] == len(batch.token_ids[longest]) and item[1] < item[3]]
    assert len(chunks) >= -(-150 // budget)
    assert sum(not item[4] for item in chunks) >= len(chunks) - 1
    # Decodes of short requests ran in the same steps as prefill chunks of long ones.
    mixed_steps = [step for step in steps
                   if any(item[1] >= item[3] for item in step)
                   and any(item[1] < item[3] for item in step)]
    assert mixed_steps
    assert_all_blocks_free(llm)


def test_chunked_prefill_off_runs_whole_prompts(tiny_qwen2):
    batch = mixed_prompts(tiny_qwen2)
    llm = make_llm(tiny_qwen2, block_size=8, enable_chunked_prefill=False, max_model_len=200,
                   max_num_batched_tokens=200, enable_prefix_caching=False)
    steps = record_schedules(llm.engine)
    outputs = llm.generate(batch.prompts, GREEDY)
    assert_matches_hf(outputs, hf_greedy(tiny_qwen2, batch.token_ids), batch.token_ids,
                      llm.get_tokenizer())
    prefills = [item for step in steps for item in step if item[1] < item[3]]
    assert all(item[1] == 0 and item[2] == item[3] and item[4] for item in prefills)
    assert all(sum(item[2] for item in step) <= 200 for step in steps)


# -------------------------------------------------------------- 3. preemption
@pytest.mark.parametrize("prefix_caching", [False, True], ids=["no_prefix_cache", "prefix_cache"])
def test_preemption_matches_hf(tiny_qwen2, prefix_caching):
    rng = random.Random(3)
    token_ids = [random_token_ids(rng, rng.randrange(8, 40), 384) for _ in range(10)]
    # Two requests share a prefix, so recomputation after preemption can hit the cache.
    token_ids[7] = token_ids[6][:24] + token_ids[7][:6]
    prompts = [{"prompt_token_ids": ids} for ids in token_ids]
    llm = make_llm(tiny_qwen2, block_size=4, num_gpu_blocks_override=24,
                   max_num_batched_tokens=48, enable_prefix_caching=prefix_caching)
    steps = record_schedules(llm.engine)
    outputs = llm.generate(prompts, SamplingParams(temperature=0.0, max_tokens=24))
    stats = llm.engine.get_stats()
    assert stats.num_preemptions > 0
    # Preempted requests had generated tokens, which they recomputed with their prompt.
    recomputed = [item for step in steps for item in step
                  if item[2] > 1 and item[1] + item[2] > item[3]]
    if prefix_caching:
        assert stats.prefix_cache_hit_tokens > 0
    else:
        assert recomputed
    assert_matches_hf(outputs, hf_greedy(tiny_qwen2, token_ids, 24), token_ids,
                      llm.get_tokenizer(), max_tokens=24)
    assert_all_blocks_free(llm)


# ---------------------------------------------------------- 4. prefix caching
@pytest.mark.parametrize("budget", [None, 24], ids=["one_step_prefill", "chunked"])
def test_prefix_caching_matches_hf(tiny_qwen2, budget):
    rng = random.Random(4)
    prefix = random_token_ids(rng, 64, 384)  # eight full blocks of 8
    token_ids = [prefix + random_token_ids(rng, n, 384) for n in (5, 1, 13, 0, 8)]
    token_ids.append(list(token_ids[2]))  # an exact repeat: everything but the last token hits
    prompts = [{"prompt_token_ids": ids} for ids in token_ids]
    expected = hf_greedy(tiny_qwen2, token_ids)

    llm = make_llm(tiny_qwen2, block_size=8, max_num_batched_tokens=budget,
                   enable_prefix_caching=True)
    first = llm.generate(prompts, GREEDY)
    assert_matches_hf(first, expected, token_ids, llm.get_tokenizer())
    # The first prompt computes the prefix; the others reuse its full blocks (the
    # prompt that is only the prefix must still compute its last block), and the
    # repeat reuses everything but the block holding its last token.
    first_hits = [0, 64, 64, 56, 64, 72]
    assert [output.num_cached_tokens for output in first] == first_hits
    stats = llm.engine.get_stats()
    assert stats.prefix_cache_hit_tokens == sum(first_hits)
    assert stats.prefix_cache_queried_tokens == sum(map(len, token_ids))

    # Run again: every full block except the one holding the last token is found
    # (the freed blocks still hold the prompts, and output tokens extended them).
    second = llm.generate(prompts, GREEDY)
    assert_matches_hf(second, expected, token_ids, llm.get_tokenizer())
    second_hits = [(len(ids) - 1) // 8 * 8 for ids in token_ids]
    assert [output.num_cached_tokens for output in second] == second_hits
    assert llm.engine.get_stats().prefix_cache_hit_tokens == sum(first_hits) + sum(second_hits)
    assert_all_blocks_free(llm)

    uncached = make_llm(tiny_qwen2, block_size=8, max_num_batched_tokens=budget,
                        enable_prefix_caching=False)
    plain = uncached.generate(prompts, GREEDY)
    assert [o.outputs[0].token_ids for o in plain] == [o.outputs[0].token_ids for o in first]
    assert uncached.engine.get_stats().prefix_cache_hit_tokens == 0


# ------------------------------------------------------- 5. sharded checkpoint
def test_sharded_checkpoint_matches_hf(tiny_qwen2_factory):
    spec = TinyQwen2Spec(seed=7)
    path = tiny_qwen2_factory(spec, num_shards=3)
    index = json.loads((path / "model.safetensors.index.json").read_text())
    shard_files = set(index["weight_map"].values())
    assert len(shard_files) >= 2
    assert all((path / name).exists() for name in shard_files)
    assert not (path / "model.safetensors").exists()

    batch = mixed_prompts(path, seed=7)
    llm = make_llm(path, block_size=16)
    outputs = llm.generate(batch.prompts, GREEDY)
    assert_matches_hf(outputs, hf_greedy(path, batch.token_ids), batch.token_ids,
                      llm.get_tokenizer())
    # Same seed, one file: the same weights, so the same tokens.
    single = make_llm(tiny_qwen2_factory(spec), block_size=16).generate(batch.prompts, GREEDY)
    assert [o.outputs[0].token_ids for o in single] == [o.outputs[0].token_ids for o in outputs]


# ------------------------------------------------------ 6. engine.yaml vs LLM
def test_engine_from_yaml_matches_llm(tiny_qwen2, tmp_path, monkeypatch):
    config_dir = tmp_path / "configs"
    config_dir.mkdir()
    relative_model = os.path.relpath(tiny_qwen2, config_dir)
    (config_dir / "engine.yaml").write_text(yaml.safe_dump({
        "model": relative_model,
        "dtype": "float32",
        "seed": 0,
        "platform": "cpu",
        "attention": "torch",
        "cache": {"block_size": 8, "enable_prefix_caching": False},
        "scheduler": {"max_num_seqs": 3, "max_num_batched_tokens": 40},
    }))
    # From somewhere else, the relative path only makes sense next to the YAML file.
    elsewhere = tmp_path / "elsewhere" / "deeper"
    elsewhere.mkdir(parents=True)
    monkeypatch.chdir(elsewhere)
    assert not Path(relative_model).exists()

    engine = Engine.from_config(config_dir / "engine.yaml")
    assert Path(engine.config.model.model).resolve() == Path(tiny_qwen2).resolve()
    llm = make_llm(tiny_qwen2, block_size=8, enable_prefix_caching=False, max_num_seqs=3,
                   max_num_batched_tokens=40)
    yaml_config = engine.config.model_dump()
    llm_config = llm.engine.config.model_dump()
    yaml_config["model"].pop("model")
    llm_config["model"].pop("model")
    assert yaml_config == llm_config

    batch = mixed_prompts(tiny_qwen2, seed=6)
    for index, prompt in enumerate(batch.prompts):
        engine.add_request(f"req-{index}", prompt, GREEDY)
    finals = {}
    while engine.has_unfinished_requests():
        for output in engine.step():
            if output.finished:
                assert output.request_id not in finals
                finals[output.request_id] = output
    from_yaml = [finals[f"req-{index}"] for index in range(len(batch.prompts))]
    from_llm = llm.generate(batch.prompts, GREEDY)
    for a, b in zip(from_yaml, from_llm):
        assert a.outputs[0].token_ids == b.outputs[0].token_ids
        assert a.outputs[0].text == b.outputs[0].text
        assert a.outputs[0].finish_reason == b.outputs[0].finish_reason
    assert_matches_hf(from_yaml, hf_greedy(tiny_qwen2, batch.token_ids), batch.token_ids,
                      engine.tokenizer)

    via_llm_from_config = LLM.from_config(config_dir / "engine.yaml")
    again = via_llm_from_config.generate(batch.prompts[:2], GREEDY)
    assert [o.outputs[0].token_ids for o in again] == [
        o.outputs[0].token_ids for o in from_llm[:2]]


# ------------------------------------------------------------------- 7. chat
def test_chat_matches_hf_on_chat_template(tiny_qwen2):
    conversations = [
        [{"role": "user", "content": "Hello, my name is"}],
        [{"role": "system", "content": "You are kvloom."},
         {"role": "user", "content": "What does paged attention keep?"},
         {"role": "assistant", "content": "The KV cache in blocks."},
         {"role": "user", "content": "And continuous batching?"}],
    ]
    tokenizer = tokenizer_of(tiny_qwen2)
    token_ids = []
    for conversation in conversations:
        ids = tokenizer.apply_chat_template(conversation, add_generation_prompt=True,
                                            tokenize=True)
        if hasattr(ids, "keys"):
            ids = ids["input_ids"]
        text = tokenizer.apply_chat_template(conversation, add_generation_prompt=True,
                                             tokenize=False)
        assert text.endswith("<|im_start|>assistant\n")
        assert list(ids) == tokenizer.encode(text)
        token_ids.append(list(ids))

    llm = make_llm(tiny_qwen2, block_size=8)
    expected = hf_greedy(tiny_qwen2, token_ids)
    outputs = llm.chat(conversations, GREEDY)
    assert_matches_hf(outputs, expected, token_ids, llm.get_tokenizer())
    # A single conversation (not wrapped in a list) works the same.
    single = llm.chat(conversations[1], GREEDY)
    assert len(single) == 1
    assert single[0].outputs[0].token_ids == expected[1]


# ------------------------------------------------- 8. n > 1 and output order
def test_n_greedy_samples_equal_hf(tiny_qwen2):
    batch = mixed_prompts(tiny_qwen2, seed=8)
    prompts, token_ids = batch.prompts[:4], batch.token_ids[:4]
    llm = make_llm(tiny_qwen2, block_size=8)
    outputs = llm.generate(prompts, SamplingParams(n=3, temperature=0.0, max_tokens=MAX_TOKENS))
    expected = hf_greedy(tiny_qwen2, token_ids)
    for output in outputs:
        assert [c.index for c in output.outputs] == [0, 1, 2]
    assert_matches_hf(outputs, expected, token_ids, llm.get_tokenizer())
    # The samples share their prompt's blocks through the prefix cache.
    assert llm.engine.get_stats().prefix_cache_hit_tokens > 0
    assert_all_blocks_free(llm)


def test_results_come_back_in_input_order(tiny_qwen2):
    rng = random.Random(9)
    token_ids = [random_token_ids(rng, n, 384) for n in (120, 60, 20, 4)]
    max_tokens = [30, 20, 10, 3]  # later prompts finish first
    params = [SamplingParams(temperature=0.0, max_tokens=n) for n in max_tokens]
    llm = make_llm(tiny_qwen2, block_size=8)
    finish_order = []
    original_step = llm.engine.step

    def step():
        outputs = original_step()
        finish_order.extend(output.request_id for output in outputs if output.finished)
        return outputs

    llm.engine.step = step
    outputs = llm.generate([{"prompt_token_ids": ids} for ids in token_ids], params)
    assert finish_order[0] == outputs[-1].request_id  # the last prompt finished first
    assert finish_order != [output.request_id for output in outputs]
    for output, ids, n in zip(outputs, token_ids, max_tokens):
        assert output.prompt_token_ids == ids
        assert output.outputs[0].token_ids == hf_greedy(tiny_qwen2, [ids], n)[0]
        assert output.outputs[0].finish_reason == "length"
