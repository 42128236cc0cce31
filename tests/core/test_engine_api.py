"""The request-level Engine API, checked against Hugging Face transformers.

add_request / step / abort_request, output kinds, stop strings, stop token ids,
EOS handling (ignore_eos, min_tokens), max_tokens and logprobs. Tokens are
compared with HF greedy generation and logprobs with HF's own logits, so the
semantics are pinned down by an independent implementation wherever one exists.
"""

from __future__ import annotations

import functools
import json
import random
import shutil
from pathlib import Path

import pytest

from kvloom import Engine, RequestOutputKind, SamplingParams

VOCAB_SIZE = 384
EOS = 0  # <|endoftext|> in the tiny checkpoints


# --------------------------------------------------------------------- helpers
def make_engine(path: Path, **cache_and_scheduler) -> Engine:
    cache = {"block_size": cache_and_scheduler.pop("block_size", 8)}
    for key in ("num_gpu_blocks_override", "enable_prefix_caching"):
        if key in cache_and_scheduler:
            cache[key] = cache_and_scheduler.pop(key)
    scheduler = {key: cache_and_scheduler.pop(key) for key in
                 ("max_num_seqs", "max_num_batched_tokens") if key in cache_and_scheduler}
    return Engine.from_config({"model": str(path), "dtype": "float32", "seed": 0,
                               "platform": "cpu", "attention": "torch", "cache": cache,
                               "scheduler": scheduler, **cache_and_scheduler})


def greedy(**kwargs) -> SamplingParams:
    return SamplingParams(temperature=0.0, **{"max_tokens": 24, **kwargs})


def run(engine: Engine, max_steps: int = 1000) -> dict[str, list]:
    """Step to completion; every RequestOutput each request produced, in order."""
    outputs: dict[str, list] = {}
    for _ in range(max_steps):
        if not engine.has_unfinished_requests():
            break
        for output in engine.step():
            outputs.setdefault(output.request_id, []).append(output)
    assert not engine.has_unfinished_requests()
    return outputs


def final(outputs: dict[str, list], request_id: str):
    last = outputs[request_id][-1]
    assert last.finished
    assert all(not output.finished for output in outputs[request_id][:-1])
    return last.outputs[0]


def prompt_ids(seed: int, length: int) -> list[int]:
    rng = random.Random(seed)
    return [rng.randrange(3, VOCAB_SIZE) for _ in range(length)]


@functools.lru_cache(maxsize=None)
def hf_model(path: str):
    import torch
    from transformers import AutoModelForCausalLM

    model = AutoModelForCausalLM.from_pretrained(path, dtype=torch.float32)
    return model.eval()


def hf_generate(path: Path, token_ids: list[int], max_new_tokens: int, **kwargs) -> list[int]:
    """HF greedy generation of one prompt (generation_config.json's EOS ids apply)."""
    import torch

    input_ids = torch.tensor([token_ids])
    with torch.no_grad():
        output = hf_model(str(path)).generate(
            input_ids, attention_mask=torch.ones_like(input_ids), do_sample=False,
            max_new_tokens=max_new_tokens, **kwargs)
    return output[0, len(token_ids):].tolist()


def hf_logprobs(path: Path, token_ids: list[int], output_ids: list[int]):
    """log_softmax of HF's logits for each output position: [len(output_ids), vocab]."""
    import torch

    sequence = torch.tensor([token_ids + output_ids[:-1]])
    with torch.no_grad():
        logits = hf_model(str(path))(sequence).logits[0].float()
    return torch.log_softmax(logits[len(token_ids) - 1:], dim=-1)


def stream_text(tokenizer, token_ids: list[int]) -> str:
    """Decode of the output tokens, less a trailing incomplete character."""
    for end in range(len(token_ids), -1, -1):
        text = tokenizer.decode(token_ids[:end], skip_special_tokens=True)
        if not text.endswith("\ufffd"):
            return text
    return ""


def text_lengths(tokenizer, token_ids: list[int]) -> list[int]:
    """len(stream_text) after each output token."""
    return [len(stream_text(tokenizer, token_ids[:end])) for end in range(1, len(token_ids) + 1)]


def unique_ascii_substring(text: str, start: int, end: int, size: int = 3) -> tuple[str, int]:
    """A printable ASCII substring of ``text`` inside [start, end) found nowhere else."""
    for position in range(start, end - size + 1):
        candidate = text[position:position + size]
        if candidate.isascii() and candidate.isprintable() and text.count(candidate) == 1:
            return candidate, position
    raise AssertionError(f"no unique ASCII substring in {text[start:end]!r}")


# ---------------------------------------------------------- step loop basics
def test_step_loop_cumulative_and_delta_outputs(tiny_qwen2):
    engine = make_engine(tiny_qwen2, max_num_batched_tokens=16)
    tokenizer = engine.tokenizer
    prompt_a, prompt_b = prompt_ids(1, 40), prompt_ids(2, 7)
    engine.add_request("cumulative", {"prompt_token_ids": prompt_a}, greedy())
    engine.add_request("delta", {"prompt_token_ids": prompt_b},
                       greedy(output_kind=RequestOutputKind.DELTA))
    engine.add_request("final-only", "Hello, my name is",
                       greedy(output_kind=RequestOutputKind.FINAL_ONLY))
    with pytest.raises(ValueError, match="already in use"):
        engine.add_request("delta", {"prompt_token_ids": prompt_b}, greedy())
    outputs = run(engine)

    expected_a = hf_generate(tiny_qwen2, prompt_a, 24)
    cumulative = outputs["cumulative"]
    # One output per sampled token, each carrying everything so far.
    assert [len(o.outputs[0].token_ids) for o in cumulative] == list(range(1, 25))
    for output in cumulative:
        ids = output.outputs[0].token_ids
        assert ids == expected_a[:len(ids)]
        assert output.prompt_token_ids == prompt_a
    assert final(outputs, "cumulative").finish_reason == "length"
    assert final(outputs, "cumulative").text == stream_text(tokenizer, expected_a)

    delta = outputs["delta"]
    assert all(len(o.outputs[0].token_ids) == 1 for o in delta)
    assert sum((o.outputs[0].token_ids for o in delta), []) == hf_generate(tiny_qwen2, prompt_b, 24)
    assert "".join(o.outputs[0].text for o in delta) == stream_text(
        tokenizer, hf_generate(tiny_qwen2, prompt_b, 24))

    assert len(outputs["final-only"]) == 1
    hello = tokenizer.encode("Hello, my name is")
    assert final(outputs, "final-only").token_ids == hf_generate(tiny_qwen2, hello, 24)
    assert outputs["final-only"][0].prompt == "Hello, my name is"

    stats = engine.get_stats()
    assert stats.num_running == stats.num_waiting == 0
    assert stats.num_free_blocks == stats.num_total_blocks
    # A finished request's id may be used again.
    engine.add_request("delta", {"prompt_token_ids": prompt_b}, greedy(max_tokens=3))
    assert final(run(engine), "delta").token_ids == hf_generate(tiny_qwen2, prompt_b, 3)


# ------------------------------------------------------------------- aborts
def test_abort_running_and_waiting_requests(tiny_qwen2):
    engine = make_engine(tiny_qwen2, max_num_seqs=2)
    prompts = {name: prompt_ids(seed, 30) for seed, name in enumerate(["keep", "abort", "queued"])}
    for name, ids in prompts.items():
        engine.add_request(name, {"prompt_token_ids": ids}, greedy(n=2) if name == "abort"
                           else greedy())
    seen: dict[str, int] = {}
    for _ in range(5):
        for output in engine.step():
            seen[output.request_id] = len(output.outputs[0].token_ids)
    assert seen.get("abort", 0) > 0 and "queued" not in seen  # running, and still waiting
    assert engine.get_stats().num_waiting > 0
    engine.abort_request("abort")           # both of its n=2 samples
    engine.abort_request(["queued", "never-added"])
    assert engine.get_stats().num_running == 1 and engine.get_stats().num_waiting == 0

    outputs = run(engine)
    assert set(outputs) == {"keep"}
    assert final(outputs, "keep").token_ids == hf_generate(tiny_qwen2, prompts["keep"], 24)
    stats = engine.get_stats()
    assert stats.num_free_blocks == stats.num_total_blocks

    # An aborted id can be reused, and the new request runs from scratch.
    engine.add_request("abort", {"prompt_token_ids": prompts["abort"]}, greedy(max_tokens=5))
    assert final(run(engine), "abort").token_ids == hf_generate(tiny_qwen2, prompts["abort"], 5)


def test_abort_mid_generation_frees_blocks(tiny_qwen2):
    engine = make_engine(tiny_qwen2, block_size=4)
    engine.add_request("a", {"prompt_token_ids": prompt_ids(5, 50)}, greedy(max_tokens=64))
    for _ in range(6):
        engine.step()
    assert engine.get_stats().num_free_blocks < engine.get_stats().num_total_blocks
    engine.abort_request("a")
    assert not engine.has_unfinished_requests()
    assert engine.step() == []
    stats = engine.get_stats()
    assert stats.num_free_blocks == stats.num_total_blocks and stats.kv_cache_usage == 0.0


# ------------------------------------------------------------- stop strings
@pytest.fixture(scope="module")
def reference_run(tiny_qwen2):
    """A prompt, its 32 greedy HF tokens, and the text they decode to."""
    ids = prompt_ids(11, 20)
    expected = hf_generate(tiny_qwen2, ids, 32)
    from transformers import AutoTokenizer

    tokenizer = AutoTokenizer.from_pretrained(str(tiny_qwen2))
    assert EOS not in expected
    return ids, expected, stream_text(tokenizer, expected), tokenizer


def test_stop_strings_do_not_leak(tiny_qwen2, reference_run):
    ids, expected, text, tokenizer = reference_run
    stop, position = unique_ascii_substring(text, len(text) // 3, len(text))
    early, early_position = unique_ascii_substring(text, 2, position - 3)
    engine = make_engine(tiny_qwen2)
    prompt = {"prompt_token_ids": ids}
    engine.add_request("plain", prompt, greedy(max_tokens=32, stop=stop))
    engine.add_request("two-stops", prompt, greedy(max_tokens=32, stop=[stop, early]))
    engine.add_request("include", prompt, greedy(max_tokens=32, stop=stop,
                                                 include_stop_str_in_output=True))
    engine.add_request("stream", prompt, greedy(max_tokens=32, stop=stop,
                                                output_kind=RequestOutputKind.DELTA))
    engine.add_request("other", {"prompt_token_ids": prompt_ids(12, 9)}, greedy(max_tokens=32))
    outputs = run(engine)

    plain = final(outputs, "plain")
    assert plain.text == text[:position]
    assert plain.finish_reason == "stop" and plain.stop_reason == stop
    # Generation stopped at the token that completed the stop string.
    lengths = text_lengths(tokenizer, expected)
    completing = next(i for i, n in enumerate(lengths) if n >= position + len(stop))
    assert plain.token_ids == expected[:completing + 1]
    # Text shown before the end never runs ahead of the final text: a partial stop
    # string is held back until it is known not to be one.
    for name, shown in (("plain", text[:position]), ("include", text[:position + len(stop)])):
        assert all(shown.startswith(o.outputs[0].text) for o in outputs[name])

    two = final(outputs, "two-stops")
    assert (two.text, two.stop_reason) == (text[:early_position], early)
    include = final(outputs, "include")
    assert include.text == text[:position + len(stop)] and include.stop_reason == stop
    streamed = outputs["stream"]
    assert "".join(o.outputs[0].text for o in streamed) == text[:position]
    assert sum((o.outputs[0].token_ids for o in streamed), []) == plain.token_ids
    assert streamed[-1].outputs[0].finish_reason == "stop"
    assert final(outputs, "other").token_ids == hf_generate(
        tiny_qwen2, prompt_ids(12, 9), 32)


def test_stop_strings_wait_for_min_tokens(tiny_qwen2, reference_run):
    """As in vLLM, a stop string inside the first min_tokens tokens' text is ignored."""
    ids, expected, text, tokenizer = reference_run
    lengths = text_lengths(tokenizer, expected)
    stop, position = unique_ascii_substring(text, 0, lengths[15])
    completing = next(i for i, n in enumerate(lengths) if n >= position + len(stop))
    engine = make_engine(tiny_qwen2)
    engine.add_request("min", {"prompt_token_ids": ids},
                       greedy(max_tokens=32, stop=stop, min_tokens=completing + 2))
    engine.add_request("no-min", {"prompt_token_ids": ids}, greedy(max_tokens=32, stop=stop))
    outputs = run(engine)
    assert final(outputs, "no-min").text == text[:position]
    waited = final(outputs, "min")
    assert waited.token_ids == expected and waited.finish_reason == "length"
    assert waited.text == text and stop in waited.text


# --------------------------------------------------------- stop token ids
def test_stop_token_ids(tiny_qwen2, reference_run):
    ids, expected, text, tokenizer = reference_run
    index = next(i for i in range(6, 32) if expected[i] not in expected[:i])
    stop_id = expected[index]
    engine = make_engine(tiny_qwen2)
    engine.add_request("stop", {"prompt_token_ids": ids},
                       greedy(max_tokens=32, stop_token_ids=[stop_id, EOS + 1]))
    assert EOS + 1 not in expected
    engine.add_request("include", {"prompt_token_ids": ids},
                       greedy(max_tokens=32, stop_token_ids=[stop_id],
                              include_stop_str_in_output=True))
    engine.add_request("min", {"prompt_token_ids": ids},
                       greedy(max_tokens=32, stop_token_ids=[stop_id], min_tokens=index + 1))
    outputs = run(engine)

    stopped = final(outputs, "stop")
    assert stopped.token_ids == expected[:index + 1]  # the stop token itself is returned
    assert stopped.finish_reason == "stop" and stopped.stop_reason == stop_id
    # ... but, as in vLLM, its text is not (unless include_stop_str_in_output).
    assert stopped.text == stream_text(tokenizer, expected[:index])
    included = final(outputs, "include")
    assert included.token_ids == expected[:index + 1]
    assert included.text == stream_text(tokenizer, expected[:index + 1])
    # min_tokens bans the stop token (and EOS) until it is reached (here: exactly at
    # the position where greedy would stop); HF's min_new_tokens does the same for
    # its EOS ids.
    waited = final(outputs, "min")
    reference = hf_generate(tiny_qwen2, ids, 32, eos_token_id=[EOS, stop_id],
                            min_new_tokens=index + 1)
    assert waited.token_ids == reference
    assert len(waited.token_ids) > index + 1 and waited.token_ids[index] != stop_id
    assert waited.finish_reason == ("stop" if reference[-1] == stop_id else "length")


# ------------------------------------------------------ EOS, ignore_eos, min_tokens
@pytest.fixture(scope="module")
def eos_checkpoint(tiny_qwen2, tmp_path_factory, reference_run):
    """The tiny checkpoint with a generation_config.json naming a second EOS id that
    greedy decoding of the reference prompt produces after a few tokens."""
    ids, expected, _, _ = reference_run
    index = next(i for i in range(4, 32) if expected[i] not in expected[:i])
    path = tmp_path_factory.mktemp("eos") / "ckpt"
    shutil.copytree(tiny_qwen2, path)
    config = json.loads((path / "generation_config.json").read_text())
    config["eos_token_id"] = [EOS, expected[index]]
    (path / "generation_config.json").write_text(json.dumps(config))
    return path, index


def test_eos_ignore_eos_and_min_tokens(tiny_qwen2, reference_run, eos_checkpoint):
    ids, expected, text, tokenizer = reference_run
    path, index = eos_checkpoint
    engine = make_engine(path)
    assert expected[index] in engine.components.eos_token_ids
    prompt = {"prompt_token_ids": ids}
    engine.add_request("eos", prompt, greedy(max_tokens=32))
    engine.add_request("ignore", prompt, greedy(max_tokens=32, ignore_eos=True))
    engine.add_request("min", prompt, greedy(max_tokens=32, min_tokens=index + 1))
    engine.add_request("short", prompt, greedy(max_tokens=index + 1))
    outputs = run(engine)

    stopped = final(outputs, "eos")
    assert stopped.token_ids == hf_generate(path, ids, 32) == expected[:index + 1]
    assert stopped.finish_reason == "stop"
    assert stopped.text == stream_text(tokenizer, expected[:index])  # EOS text left out
    ignored = final(outputs, "ignore")
    assert ignored.token_ids == expected and ignored.finish_reason == "length"
    waited = final(outputs, "min")
    reference = hf_generate(path, ids, 32, min_new_tokens=index + 1)
    assert waited.token_ids == reference and len(reference) > index + 1
    assert reference[index] != expected[index]  # banned exactly up to min_tokens
    # An EOS token that is also the max_tokens-th token finishes with "stop", as in
    # vLLM: the model did stop there.
    short = final(outputs, "short")
    assert short.token_ids == expected[:index + 1] and short.finish_reason == "stop"
    assert short.text == stopped.text


# ---------------------------------------------------------------- max_tokens
def test_max_tokens_and_max_model_len(tiny_qwen2):
    engine = make_engine(tiny_qwen2, max_model_len=48)
    ids = prompt_ids(21, 30)
    for max_tokens in (1, 7):
        engine.add_request(f"max-{max_tokens}", {"prompt_token_ids": ids},
                           greedy(max_tokens=max_tokens))
    engine.add_request("unbounded", {"prompt_token_ids": ids}, greedy(max_tokens=None))
    outputs = run(engine)
    full = hf_generate(tiny_qwen2, ids, 18)
    assert EOS not in full
    for max_tokens in (1, 7):
        output = final(outputs, f"max-{max_tokens}")
        assert output.token_ids == full[:max_tokens]
        assert output.finish_reason == "length" and output.stop_reason is None
    # max_tokens=None runs to max_model_len (48 - 30 prompt tokens = 18 tokens).
    unbounded = final(outputs, "unbounded")
    assert unbounded.token_ids == full and unbounded.finish_reason == "length"
    with pytest.raises(ValueError):
        engine.add_request("too-long", {"prompt_token_ids": prompt_ids(22, 48)}, greedy())


# ------------------------------------------------------------------ logprobs
def test_logprobs_match_hf(tiny_qwen2):
    import torch

    engine = make_engine(tiny_qwen2, max_num_batched_tokens=16)
    tokenizer = engine.tokenizer
    requests = {"top5": (prompt_ids(31, 25), 5), "top0": (prompt_ids(32, 6), 0),
                "top2": (prompt_ids(33, 12), 2), "none": (prompt_ids(34, 9), None)}
    for name, (ids, num) in requests.items():
        engine.add_request(name, {"prompt_token_ids": ids}, greedy(max_tokens=12, logprobs=num))
    outputs = run(engine)

    for name, (ids, num) in requests.items():
        completion = final(outputs, name)
        assert completion.token_ids == hf_generate(tiny_qwen2, ids, 12)
        if num is None:
            assert completion.logprobs is None and completion.cumulative_logprob is None
            continue
        reference = hf_logprobs(tiny_qwen2, ids, completion.token_ids)
        assert len(completion.logprobs) == len(completion.token_ids)
        total = 0.0
        for position, (token_id, entries) in enumerate(
                zip(completion.token_ids, completion.logprobs)):
            # Greedy: the sampled token is the top-1, so no extra entry.
            assert len(entries) == max(num, 1)
            sampled = entries[token_id]
            assert sampled.rank == 1
            assert sampled.logprob == pytest.approx(reference[position, token_id].item(),
                                                    abs=1e-4)
            assert sampled.decoded_token == tokenizer.decode([token_id])
            total += sampled.logprob
            top_values, top_ids = reference[position].topk(max(num, 1))
            assert list(entries) == top_ids.tolist()
            for rank, (top_id, value) in enumerate(zip(top_ids.tolist(), top_values.tolist()),
                                                   start=1):
                assert entries[top_id].rank == rank
                assert entries[top_id].logprob == pytest.approx(value, abs=1e-4)
        assert completion.cumulative_logprob == pytest.approx(total, abs=1e-4)
        assert torch.isfinite(torch.tensor(completion.cumulative_logprob))


def test_logprobs_of_a_non_top_sample(tiny_qwen2):
    """Sampling below the top 1: the sampled token's rank is its true rank, and it
    comes with the top-1 entry (N + 1 entries)."""
    engine = make_engine(tiny_qwen2)
    ids = prompt_ids(41, 10)
    engine.add_request("r", {"prompt_token_ids": ids},
                       SamplingParams(temperature=1.5, top_k=3, seed=7, max_tokens=16, logprobs=1))
    completion = final(run(engine), "r")
    reference = hf_logprobs(tiny_qwen2, ids, completion.token_ids)
    saw_non_top = False
    for position, (token_id, entries) in enumerate(zip(completion.token_ids, completion.logprobs)):
        rank = int((reference[position] > reference[position, token_id]).sum()) + 1
        assert entries[token_id].rank == rank <= 3  # top_k=3 keeps only the 3 best
        assert entries[token_id].logprob == pytest.approx(
            reference[position, token_id].item(), abs=1e-4)
        assert len(entries) == (1 if rank == 1 else 2)
        saw_non_top |= rank > 1
    assert saw_non_top
