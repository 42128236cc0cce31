"""Conformance: a sampler is greedy where asked, reproducible per seed whatever the
batch, and draws from the distribution SamplingParams describe.

Statistical checks draw from fixed seeds, so a run is deterministic; a correct
sampler passes with p > 1e-4 (a wrong distribution over 20,000 draws gives p
values far below that).
"""

from __future__ import annotations

import numpy as np
import pytest
import torch

from kvloom.testing.sampling import (chi_square_p_value, make_metadata, penalized_logits,
                                     reference_distribution)

P_ACCEPT = 1e-4
NUM_SAMPLES = 20_000
# Eight tokens, not in sorted order; no two filters below cut near a tie.
PROBS = np.array([0.09, 0.30, 0.05, 0.16, 0.01, 0.22, 0.12, 0.05])
LOGITS = np.log(PROBS)


def sample(sampler_component, logits: torch.Tensor, metadata):
    output = sampler_component.factory().sample(logits, metadata)
    sampled = output.sampled_token_ids
    assert sampled.shape == (logits.shape[0],), "one token per row"
    assert sampled.dtype == torch.int64, "sampled_token_ids must be int64"
    return output


def random_logits(num_rows: int, vocab: int, seed: int, device, scale: float = 3.0):
    logits = torch.randn(num_rows, vocab, generator=torch.Generator().manual_seed(seed)) * scale
    top2 = logits.topk(2, dim=-1).values
    assert bool((top2[:, 0] - top2[:, 1] > 1e-3).all()), "test logits have a near tie"
    return logits.to(device)


def test_greedy_is_argmax(sampler_component, kvloom_device):
    logits = random_logits(16, 100, seed=0, device=kvloom_device)
    output = sample(sampler_component, logits, make_metadata(16, temperature=0.0,
                                                             device=kvloom_device))
    assert torch.equal(output.sampled_token_ids, logits.argmax(dim=-1))


def test_greedy_rows_in_a_mixed_batch_are_argmax(sampler_component, kvloom_device):
    logits = random_logits(32, 50, seed=1, device=kvloom_device, scale=1.0)
    greedy = [row % 2 == 0 for row in range(32)]
    generators = {row: torch.Generator(kvloom_device).manual_seed(row) for row in (1, 5, 9)}
    metadata = make_metadata(32, temperature=[0.0 if g else 1.5 for g in greedy], top_k=5,
                             top_p=0.9, min_p=0.05, generators=generators, device=kvloom_device)
    sampled = sample(sampler_component, logits, metadata).sampled_token_ids
    rows = torch.tensor(greedy, device=kvloom_device)
    assert torch.equal(sampled[rows], logits.argmax(dim=-1)[rows])


def test_seeded_rows_do_not_depend_on_the_batch(sampler_component, kvloom_device):
    """A seeded request gives the same tokens alone or among other requests."""
    logits = random_logits(6, 40, seed=2, device=kvloom_device, scale=1.0)
    row = 3

    def draws(batch_rows: list[int], num_steps: int = 8) -> list[int]:
        generators = {index: torch.Generator(kvloom_device).manual_seed(1234 if r == row else r)
                      for index, r in enumerate(batch_rows) if r in (row, 0, 5)}
        metadata = make_metadata(len(batch_rows), temperature=[1.0 + 0.1 * r for r in batch_rows],
                                 top_k=[0 if r == row else 7 for r in batch_rows],
                                 generators=generators, device=kvloom_device)
        position = batch_rows.index(row)
        return [int(sample(sampler_component, logits[batch_rows], metadata)
                    .sampled_token_ids[position]) for _ in range(num_steps)]

    torch.manual_seed(0)
    alone = draws([row])
    torch.manual_seed(1)  # a different global stream must not matter either
    assert draws([0, 1, 2, row, 4, 5]) == alone
    assert draws([5, row, 1]) == alone
    assert len(set(alone)) > 1, "a seeded row drew the same token every step"


FILTERS = {
    "plain": {},
    "temperature-0.5": {"temperature": 0.5},
    "temperature-1.7": {"temperature": 1.7},
    "top_k-3": {"top_k": 3},
    "top_p-0.6": {"top_p": 0.6},
    "min_p-0.35": {"min_p": 0.35},
    "temperature-0.7-top_p-0.8": {"temperature": 0.7, "top_p": 0.8},
    "top_k-5-top_p-0.9": {"top_k": 5, "top_p": 0.9},
}


@pytest.mark.parametrize("name", list(FILTERS))
def test_draws_follow_the_filtered_distribution(sampler_component, kvloom_device, name):
    params = FILTERS[name]
    logits = torch.tensor(LOGITS, dtype=torch.float32).expand(NUM_SAMPLES, -1).contiguous()
    torch.manual_seed(0)
    output = sample(sampler_component, logits.to(kvloom_device),
                    make_metadata(NUM_SAMPLES, device=kvloom_device, **params))
    counts = np.bincount(output.sampled_token_ids.cpu().numpy(), minlength=len(PROBS))
    expected = reference_distribution(LOGITS, **params)
    p_value = chi_square_p_value(counts, expected)
    assert p_value > P_ACCEPT, (f"{name}: draws {counts.tolist()} do not follow "
                                f"{np.round(expected, 4).tolist()} (p = {p_value:.2e})")


def test_probabilities_are_the_filtered_distribution(sampler_component, kvloom_device):
    """``probabilities`` is optional (speculative decoding at temperature > 0 needs it)."""
    names = [name for name in FILTERS if name != "plain"]
    logits = torch.tensor(LOGITS, dtype=torch.float32).expand(len(names), -1).contiguous()
    columns = {key: [FILTERS[name].get(key, default) for name in names]
               for key, default in (("temperature", 1.0), ("top_k", 0), ("top_p", 1.0),
                                    ("min_p", 0.0))}
    metadata = make_metadata(len(names), device=kvloom_device, **columns)
    try:
        probs = sampler_component.factory().probabilities(logits.to(kvloom_device), metadata)
    except NotImplementedError as exc:
        pytest.skip(f"optional Sampler.probabilities not implemented: {exc}")
    for row, name in enumerate(names):
        np.testing.assert_allclose(probs[row].cpu().double().numpy(),
                                   reference_distribution(LOGITS, **FILTERS[name]),
                                   atol=1e-5, err_msg=name)


def test_banned_tokens_are_never_sampled(sampler_component, kvloom_device):
    logits = random_logits(8, 30, seed=3, device=kvloom_device)
    banned = [logits[row].topk(3).indices.tolist() for row in range(8)]
    for temperature in (0.0, 1.0):
        torch.manual_seed(0)
        metadata = make_metadata(8, temperature=temperature, banned_token_ids=banned,
                                 device=kvloom_device)
        sampled = sample(sampler_component, logits, metadata).sampled_token_ids.tolist()
        assert all(token not in ban for token, ban in zip(sampled, banned)), (sampled, banned)
    # Greedy picks the best token that is not banned.
    greedy = sample(sampler_component, logits, make_metadata(
        8, temperature=0.0, banned_token_ids=banned, device=kvloom_device))
    fourth = [logits[row].topk(4).indices[3].item() for row in range(8)]
    assert greedy.sampled_token_ids.tolist() == fourth


def test_greedy_applies_penalties(sampler_component, kvloom_device):
    vocab = 12
    logits = torch.tensor(np.linspace(2.0, -1.5, vocab), dtype=torch.float32).repeat(4, 1)
    prompts, outputs = [[0, 3], [1], [0, 0], [5]], [[0, 1, 1], [0], [2, 2, 2], []]
    penalties = {"presence_penalty": [0.6, 0.0, 0.0, 0.3],
                 "frequency_penalty": [0.0, 0.5, 0.2, 0.0],
                 "repetition_penalty": [1.0, 1.3, 2.0, 1.0]}
    metadata = make_metadata(4, temperature=0.0, prompt_token_ids=prompts,
                             output_token_ids=outputs, device=kvloom_device, **penalties)
    sampled = sample(sampler_component, logits.to(kvloom_device), metadata).sampled_token_ids
    expected = [int(np.argmax(penalized_logits(logits[row].numpy(), prompts[row], outputs[row],
                                               *(penalties[k][row] for k in penalties))))
                for row in range(4)]
    assert sampled.tolist() == expected
    assert expected != [0, 0, 0, 0], "the penalties must change some greedy choices"


@pytest.mark.parametrize("num_logprobs", [0, 3])
def test_logprobs_are_the_raw_distribution(sampler_component, kvloom_device, num_logprobs):
    logits = random_logits(5, 40, seed=4, device=kvloom_device)
    metadata = make_metadata(5, temperature=[0.0, 0.8, 1.0, 0.0, 1.3], top_k=[0, 5, 0, 0, 2],
                             max_num_logprobs=num_logprobs, device=kvloom_device)
    torch.manual_seed(0)
    output = sample(sampler_component, logits, metadata)
    assert output.logprob_token_ids is not None and output.logprobs is not None
    assert output.logprob_token_ids.shape == (5, 1 + num_logprobs)
    assert output.logprobs.shape == (5, 1 + num_logprobs)
    assert torch.equal(output.logprob_token_ids[:, 0], output.sampled_token_ids)
    raw = torch.log_softmax(logits.float(), dim=-1)
    top = raw.topk(num_logprobs, dim=-1).indices
    assert torch.equal(output.logprob_token_ids[:, 1:], top)
    torch.testing.assert_close(output.logprobs.float(),
                               raw.gather(1, output.logprob_token_ids), atol=1e-5, rtol=1e-5)
    if output.sampled_ranks is not None:
        sampled = raw.gather(1, output.sampled_token_ids.unsqueeze(1))
        assert torch.equal(output.sampled_ranks, (raw > sampled).sum(dim=-1) + 1)
