"""The example's components against kvloom's own: torch reference attention, default sampler."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from kvloom.interfaces.attention import AttentionInputs, AttentionSpec
from kvloom.interfaces.sampler import SamplingMetadata
from kvloom.plugins.attention.torch_reference import TorchReferenceBackend
from kvloom.plugins.samplers.default import DefaultSampler
from scipy import stats

from kvloom_plugin_example import nucleus
from kvloom_plugin_example.attention import SdpaBatchedBackend
from kvloom_plugin_example.sampler import FastNucleusSampler

# ------------------------------------------------------------------ attention
NUM_BLOCKS = 48


def step_inputs(tables, cached_lens, query_lens, block_size):
    """AttentionInputs for sequences that have ``cached_lens`` tokens and get ``query_lens`` more."""
    seq_lens = [c + q for c, q in zip(cached_lens, query_lens)]
    slots = [tables[i][p // block_size] * block_size + p % block_size
             for i, (c, s) in enumerate(zip(cached_lens, seq_lens)) for p in range(c, s)]
    width = max(len(t) for t in tables)
    query_start = torch.tensor([0, *np.cumsum(query_lens)], dtype=torch.int32)
    seq_lens_t = torch.tensor(seq_lens, dtype=torch.int32)
    return AttentionInputs(
        query_start_loc=query_start, seq_lens=seq_lens_t,
        block_tables=torch.tensor([t + [0] * (width - len(t)) for t in tables], dtype=torch.int32),
        slot_mapping=torch.tensor(slots, dtype=torch.int64),
        query_start_loc_cpu=query_start.clone(), seq_lens_cpu=seq_lens_t.clone(),
        max_query_len=max(query_lens), max_seq_len=max(seq_lens),
        num_decode_tokens=sum(q == 1 for q in query_lens))


def run_two_steps(backend, spec, steps, qkv):
    """A context prefill then the step under test, through one layer; both outputs and the cache."""
    impl = backend.make_impl(spec, spec.head_size ** -0.5)
    cache = torch.zeros(backend.kv_cache_shape(NUM_BLOCKS, spec), dtype=spec.dtype)
    outputs = [impl.forward(*tensors, cache, backend.build_metadata(inputs))
               for inputs, tensors in zip(steps, qkv)]
    return outputs, cache


@pytest.mark.parametrize("head_size", [32, 64])
@pytest.mark.parametrize("num_heads,num_kv_heads", [(4, 2), (4, 4)], ids=["gqa", "mha"])
@pytest.mark.parametrize("block_size", [8, 16])
def test_sdpa_batched_matches_torch_reference(num_heads, num_kv_heads, head_size, block_size):
    generator = torch.Generator().manual_seed(head_size + num_kv_heads + block_size)
    spec = AttentionSpec(num_heads, num_kv_heads, head_size, torch.float32, block_size, "cpu")
    # prefill, decode, chunked prefill over context, decode, prefill
    context_lens, query_lens = [0, 30, 17, 5, 0], [13, 1, 7, 1, 20]
    free = torch.randperm(NUM_BLOCKS, generator=generator).tolist()
    tables = [[free.pop() for _ in range(-(-(c + q) // block_size))]
              for c, q in zip(context_lens, query_lens)]
    with_context = [i for i, c in enumerate(context_lens) if c]
    steps = [step_inputs([tables[i] for i in with_context], [0] * len(with_context),
                         [context_lens[i] for i in with_context], block_size),
             step_inputs(tables, context_lens, query_lens, block_size)]

    def random_qkv(num_tokens):
        return [torch.randn(num_tokens, heads, head_size, generator=generator)
                for heads in (num_heads, num_kv_heads, num_kv_heads)]

    qkv = [random_qkv(sum(context_lens)), random_qkv(sum(query_lens))]
    ref_outputs, ref_cache = run_two_steps(TorchReferenceBackend(), spec, steps, qkv)
    outputs, cache = run_two_steps(SdpaBatchedBackend(), spec, steps, qkv)
    for out, ref in zip(outputs, ref_outputs):
        assert out.shape == ref.shape and out.dtype == ref.dtype
        torch.testing.assert_close(out, ref, atol=1e-5, rtol=1e-5)
    assert torch.equal(cache.transpose(0, 1), ref_cache)  # same data, own layout


def test_padding_tokens_write_nothing_and_stay_finite():
    spec = AttentionSpec(4, 2, 32, torch.float32, 8, "cpu")
    backend = SdpaBatchedBackend()
    impl = backend.make_impl(spec, 32 ** -0.5)
    real = step_inputs([[3, 5]], [0], [11], 8)
    # A CUDA-graph style padding sequence: length 0, one token at slot -1.
    padded = step_inputs([[3, 5], [0, 0]], [0, 0], [11, 1], 8)
    padded.seq_lens[1] = padded.seq_lens_cpu[1] = 0
    padded.slot_mapping[-1] = -1
    query, key, value = (torch.randn(12, h, 32) for h in (4, 2, 2))
    caches = [torch.zeros(backend.kv_cache_shape(8, spec)) for _ in range(2)]
    expected = impl.forward(query[:11], key[:11], value[:11], caches[0], backend.build_metadata(real))
    out = impl.forward(query, key, value, caches[1], backend.build_metadata(padded))
    torch.testing.assert_close(out[:11], expected)
    assert torch.isfinite(out).all()
    assert torch.equal(caches[0], caches[1])


def test_validate_names_unsupported_specs():
    backend = SdpaBatchedBackend()
    assert backend.validate(AttentionSpec(8, 2, 64, torch.bfloat16, 16, "cpu")) == []
    reasons = backend.validate(AttentionSpec(6, 4, 64, torch.float64, 16, "cpu"))
    assert len(reasons) == 2 and "num_kv_heads" in reasons[0] and "float64" in reasons[1]


# -------------------------------------------------------------------- sampler
def metadata_for(rows: list[dict], **shared) -> SamplingMetadata:
    """SamplingMetadata with one dict of settings per row (missing keys: off)."""
    def column(name, default, dtype=torch.float32):
        return torch.tensor([row.get(name, default) for row in rows], dtype=dtype)

    def lists(name):
        return [list(row.get(name, [])) for row in rows]

    temperature = column("temperature", 1.0)
    penalties = [column(name, off) for name, off in
                 (("presence_penalty", 0.0), ("frequency_penalty", 0.0),
                  ("repetition_penalty", 1.0))]
    no_penalties = all(bool((p == off).all()) for p, off in zip(penalties, (0.0, 0.0, 1.0)))
    return SamplingMetadata(
        temperature, column("top_k", 0, torch.int64), column("top_p", 1.0), column("min_p", 0.0),
        *penalties, lists("prompt_token_ids"), lists("output_token_ids"),
        lists("banned_token_ids"), shared.get("generators", {}),
        shared.get("max_num_logprobs"), bool((temperature == 0).all()),
        bool((temperature != 0).all()), no_penalties)


FILTER_MIX = [
    {},                                                  # temperature only: no filter
    {"top_k": 5},
    {"top_p": 0.9, "temperature": 0.8},
    {"min_p": 0.05},
    {"top_k": 40, "top_p": 0.8, "min_p": 0.01, "temperature": 0.7},
    {"top_k": 500},                                      # beyond the candidates (vocab 1000)
    {"top_k": 100, "top_p": 0.95},                       # likewise, with top-p
    {"top_p": 0.999, "flat": True},                      # nucleus reaching past the candidates
    {"top_p": 0.6, "min_p": 0.5, "flat": True},
    {"temperature": 0.0, "top_p": 0.5},                  # greedy row: filtered at temperature 1
    {"top_p": 0.7, "repetition_penalty": 1.3, "frequency_penalty": 0.2, "presence_penalty": 0.5,
     "prompt_token_ids": [1, 2, 3], "output_token_ids": [3, 4, 4, 9], "banned_token_ids": [0, 7]},
]


def mix_logits(rows, vocab_size, seed=0):
    logits = torch.randn(len(rows), vocab_size, generator=torch.Generator().manual_seed(seed)) * 3
    flat = torch.tensor([row.get("flat", False) for row in rows])
    return torch.where(flat.unsqueeze(1), logits * 0.01, logits)


@pytest.mark.parametrize("vocab_size", [200, 1000])
def test_same_distribution_as_default_sampler(vocab_size, monkeypatch):
    calls = []
    ranked = nucleus._filter_ranked
    monkeypatch.setattr(nucleus, "_filter_ranked",
                        lambda logits, *args: calls.append(len(logits)) or ranked(logits, *args))
    logits, metadata = mix_logits(FILTER_MIX, vocab_size), metadata_for(FILTER_MIX)
    probs = FastNucleusSampler().probabilities(logits, metadata)
    expected = DefaultSampler().probabilities(logits, metadata)
    torch.testing.assert_close(probs, expected, atol=1e-6, rtol=0)
    # Candidates first for every row; the full sort only for the rows that need it.
    assert calls[0] == len(FILTER_MIX) and len(calls) == 2 and calls[1] < len(FILTER_MIX)


@pytest.mark.parametrize("row", [{"top_k": 20, "top_p": 0.8}, {"top_p": 0.999, "flat": True},
                                 {"min_p": 0.1, "temperature": 1.5}, {"temperature": 0.9}],
                         ids=["candidates", "fallback", "min_p", "unfiltered"])
def test_samples_follow_the_filtered_distribution(row):
    num_samples = 20_000
    rows = [row] * num_samples
    logits = mix_logits([row], 200, seed=3).expand(num_samples, -1)
    sampler, metadata = FastNucleusSampler(), metadata_for(rows)
    probs = sampler.probabilities(logits[:1], metadata_for([row]))[0].double().numpy()
    torch.manual_seed(0)
    counts = np.bincount(sampler.sample(logits, metadata).sampled_token_ids.numpy(),
                         minlength=200)
    assert counts[probs == 0].sum() == 0
    expected = probs * num_samples
    big = expected >= 5  # pool the rare tokens so the chi-square approximation holds
    observed = np.append(counts[big], counts[~big].sum())
    expected = np.append(expected[big], expected[~big].sum())
    keep = expected > 0
    assert stats.chisquare(observed[keep], expected[keep] * observed.sum() / expected.sum()).pvalue > 1e-4


def test_greedy_rows_take_the_argmax_after_bans_and_penalties():
    rows = [dict(row, temperature=0.0) for row in FILTER_MIX[:5]] + [
        {"temperature": 0.0, "banned_token_ids": [int(i)]} for i in range(3)]
    rows += [{"temperature": 1.0, "top_p": 0.5}, {"temperature": 1e-6}]
    logits = mix_logits(rows, 1000, seed=5)
    for i in range(3):  # ban the argmax of the last three greedy rows
        rows[5 + i]["banned_token_ids"] = [int(logits[5 + i].argmax())]
    metadata = metadata_for(rows)
    sampled = FastNucleusSampler().sample(logits, metadata).sampled_token_ids
    reference = DefaultSampler().sample(logits, metadata).sampled_token_ids
    greedy = [i for i, row in enumerate(rows) if row["temperature"] < 1e-5]
    assert torch.equal(sampled[greedy], reference[greedy])
    assert torch.equal(sampled[:5], logits[:5].argmax(dim=-1))
    assert all(int(sampled[5 + i]) != rows[5 + i]["banned_token_ids"][0] for i in range(3))


def test_seeded_row_does_not_depend_on_the_batch():
    seeded = {"top_p": 0.9, "flat": True}
    batch = [{"top_k": 3}, {"temperature": 0.0}, seeded, {"top_p": 0.999, "flat": True}]
    logits = mix_logits(batch, 1000, seed=7)
    sampler, alone, together = FastNucleusSampler(), [], []
    generators = [torch.Generator().manual_seed(11) for _ in range(2)]
    for _ in range(8):
        alone.append(sampler.sample(logits[2:3], metadata_for(
            [seeded], generators={0: generators[0]})).sampled_token_ids[0])
        together.append(sampler.sample(logits, metadata_for(
            batch, generators={2: generators[1]})).sampled_token_ids[2])
    assert torch.equal(torch.stack(alone), torch.stack(together))
    assert len(set(torch.stack(alone).tolist())) > 1  # it really sampled


@pytest.mark.parametrize("num_logprobs", [0, 3])
def test_logprobs_score_the_raw_distribution(num_logprobs):
    rows = [FILTER_MIX[10], {"temperature": 0.0}, {"temperature": 0.5, "top_k": 2}]
    logits = mix_logits(rows, 200, seed=9)
    output = FastNucleusSampler().sample(logits, metadata_for(rows, max_num_logprobs=num_logprobs))
    raw = torch.log_softmax(logits, dim=-1)
    assert output.logprob_token_ids.shape == (3, 1 + num_logprobs)
    assert output.logprob_token_ids.dtype == output.sampled_ranks.dtype == torch.int64
    assert torch.equal(output.logprob_token_ids[:, 0], output.sampled_token_ids)
    assert torch.equal(output.logprobs, raw.gather(1, output.logprob_token_ids))
    assert torch.equal(output.logprob_token_ids[:, 1:], raw.topk(num_logprobs, dim=-1).indices)
    order = raw.argsort(dim=-1, descending=True)
    ranks = (order == output.sampled_token_ids.unsqueeze(1)).int().argmax(dim=-1) + 1
    assert torch.equal(output.sampled_ranks, ranks)


def test_banned_tokens_are_never_sampled():
    banned = list(range(0, 200, 3))
    rows = [{"banned_token_ids": banned, "top_p": 0.95, "flat": True}] * 2000
    logits = mix_logits(rows[:1], 200, seed=2).expand(2000, -1)
    sampled = FastNucleusSampler().sample(logits, metadata_for(rows)).sampled_token_ids
    assert not set(sampled.tolist()) & set(banned)
