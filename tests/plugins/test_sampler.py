"""Tests for the default sampler plugin (kvloom.plugins.samplers.default).

Statistical tests draw from fixed seeds, so they are deterministic; their
thresholds (p > 1e-4 against the right distribution, p < 1e-12 against a wrong
one) are loose enough that a correct sampler would essentially never fail
even if the draw order changed.
"""

from __future__ import annotations

import numpy as np
import pytest
import torch
from scipy import stats

from kvloom import LLM, SamplingParams
from kvloom.testing.sampling import make_metadata
from kvloom.plugins.samplers.default import (
    DefaultSampler,
    apply_min_p,
    apply_penalties,
    apply_top_k_top_p,
)

P_ACCEPT = 1e-4   # a correct sampler must give p-values above this
P_REJECT = 1e-12  # a wrong reference distribution must give p-values below this
NUM_SAMPLES = 20_000

# A hand-made distribution over 8 tokens, deliberately not in sorted order.
# Sorted: token 1 (0.30), 5 (0.22), 3 (0.16), 6 (0.12), 0 (0.09), 2 and 7 (0.05), 4 (0.01).
BASE_PROBS = np.array([0.09, 0.30, 0.05, 0.16, 0.01, 0.22, 0.12, 0.05])
BASE_LOGITS = np.log(BASE_PROBS)
VOCAB = len(BASE_PROBS)


# ----------------------------------------------------------------- helpers
def softmax(x: np.ndarray) -> np.ndarray:
    e = np.exp(x - x.max())
    return e / e.sum()


def restricted(probs: np.ndarray, keep: list[int]) -> np.ndarray:
    """``probs`` renormalized over ``keep``, zero elsewhere."""
    out = np.zeros_like(probs)
    out[keep] = probs[keep]
    return out / out.sum()


def sample_counts(logits_row: np.ndarray, num_samples: int = NUM_SAMPLES, seed: int = 0,
                  **params) -> np.ndarray:
    """Token counts from ``num_samples`` identical rows sampled in one call."""
    logits = torch.tensor(logits_row, dtype=torch.float32).expand(num_samples, -1).contiguous()
    with torch.random.fork_rng():
        torch.manual_seed(seed)
        output = DefaultSampler().sample(logits, make_metadata(num_samples, **params))
    sampled = output.sampled_token_ids
    assert sampled.shape == (num_samples,) and sampled.dtype == torch.int64
    return np.bincount(sampled.numpy(), minlength=len(logits_row))


def chisquare_pvalue(counts: np.ndarray, probs: np.ndarray) -> float:
    """Goodness of fit on ``probs``' support; tokens outside it must never be drawn."""
    support = probs > 0
    outside = np.nonzero(counts * ~support)[0].tolist()
    assert not outside, f"sampled tokens {outside} that have probability 0"
    expected = probs[support] / probs[support].sum() * counts.sum()
    return float(stats.chisquare(counts[support], expected).pvalue)


def assert_no_near_ties(logits: torch.Tensor, gap: float = 1e-3) -> None:
    top2 = logits.topk(2, dim=-1).values
    assert bool(((top2[:, 0] - top2[:, 1]) > gap).all()), "test logits have a near tie"


# --------------------------------------------------------------- 1. greedy
def test_all_greedy_rows_are_argmax():
    logits = torch.randn(16, 100, generator=torch.Generator().manual_seed(0)) * 3
    assert_no_near_ties(logits)
    output = DefaultSampler().sample(logits, make_metadata(16, temperature=0.0))
    assert torch.equal(output.sampled_token_ids, logits.argmax(dim=-1))
    assert output.logprobs is None and output.logprob_token_ids is None


def test_greedy_rows_in_mixed_batch_are_argmax():
    num_rows, vocab = 32, 50
    # Fairly flat logits so random rows rarely land on the argmax.
    logits = torch.randn(num_rows, vocab, generator=torch.Generator().manual_seed(1))
    assert_no_near_ties(logits)
    greedy_rows = torch.arange(num_rows) % 2 == 0
    temperature = [0.0 if g else 1.5 for g in greedy_rows.tolist()]
    # Filters and seeds on the batch must not change what the greedy rows pick.
    generators = {row: torch.Generator().manual_seed(row) for row in range(1, num_rows, 4)}
    metadata = make_metadata(num_rows, temperature=temperature, top_k=[5] * num_rows,
                             top_p=0.9, min_p=0.05, generators=generators)
    assert not metadata.all_greedy and not metadata.all_random
    with torch.random.fork_rng():
        torch.manual_seed(0)
        sampled = DefaultSampler().sample(logits, metadata).sampled_token_ids
    argmax = logits.argmax(dim=-1)
    assert torch.equal(sampled[greedy_rows], argmax[greedy_rows])
    # The random rows really were sampled (not all argmax) and respected top_k=5.
    random_rows = ~greedy_rows
    assert bool((sampled[random_rows] != argmax[random_rows]).any())
    top5 = logits.topk(5, dim=-1).indices
    assert bool((top5 == sampled.unsqueeze(1)).any(dim=1).all())


@pytest.mark.parametrize("temperature", [1e-6, 1e-20, 1e-38, 1e-45])
def test_tiny_temperature_is_greedy(temperature):
    """As in vLLM, temperatures below 1e-5 are greedy; logits / T must not overflow to NaN."""
    logits = torch.randn(8, 50, generator=torch.Generator().manual_seed(4)) * 3
    assert_no_near_ties(logits)
    generators = {0: torch.Generator().manual_seed(0)}
    for temperatures in ([temperature] * 8, [temperature, 1.0] * 4):
        metadata = make_metadata(8, temperature=temperatures, generators=generators,
                                 max_num_logprobs=1)
        with torch.random.fork_rng():
            torch.manual_seed(0)
            output = DefaultSampler().sample(logits, metadata)
        tiny = torch.tensor(temperatures) < 1.0
        assert torch.equal(output.sampled_token_ids[tiny], logits.argmax(dim=-1)[tiny])
        assert bool(torch.isfinite(output.logprobs).all())


# ------------------------------------------------- 2. seeded determinism
def _step_logits(step: int, prev_token: int, vocab: int, scale: float = 2.0) -> torch.Tensor:
    """Logits that depend on the step and the previous token, like a model's."""
    generator = torch.Generator().manual_seed(10_000 * step + prev_token)
    return torch.randn(vocab, generator=generator) * scale


def _run_seeded_sequence(seed: int, num_steps: int, vocab: int, batch_size: int,
                         global_seed: int) -> list[int]:
    """Drive the sampler step by step; the target row moves around the batch.

    The other rows mix greedy, unseeded and differently seeded rows with other
    filters; their logits are unrelated noise.
    """
    sampler = DefaultSampler()
    target_generator = torch.Generator().manual_seed(seed)
    other_generator = torch.Generator().manual_seed(seed + 1)
    noise = torch.Generator().manual_seed(global_seed)
    tokens: list[int] = []
    prev = 0
    torch.manual_seed(global_seed)
    for step in range(num_steps):
        row = step % batch_size
        logits = torch.randn(batch_size, vocab, generator=noise) * 3
        logits[row] = _step_logits(step, prev, vocab)
        temperature = [0.0, 1.0, 0.7, 1.3, 1.0][:batch_size]
        top_k = [0, 5, 0, 10, 0][:batch_size]
        min_p = [0.0, 0.0, 0.1, 0.0, 0.0][:batch_size]
        generators = {}
        if batch_size > 1:
            generators[(row + 1) % batch_size] = other_generator
        temperature[row], top_k[row], min_p[row] = 0.9, 40, 0.0
        generators[row] = target_generator
        metadata = make_metadata(batch_size, temperature=temperature, top_k=top_k,
                                 top_p=[0.95 if r == row else 1.0 for r in range(batch_size)],
                                 min_p=min_p, generators=generators)
        prev = int(sampler.sample(logits, metadata).sampled_token_ids[row])
        tokens.append(prev)
    return tokens


def test_seeded_row_is_independent_of_batch_composition():
    vocab, num_steps = 64, 24
    with torch.random.fork_rng():
        alone = _run_seeded_sequence(1234, num_steps, vocab, batch_size=1, global_seed=0)
        in_batch = _run_seeded_sequence(1234, num_steps, vocab, batch_size=5, global_seed=1)
        in_small_batch = _run_seeded_sequence(1234, num_steps, vocab, batch_size=3,
                                              global_seed=2)
        other_seed = _run_seeded_sequence(4321, num_steps, vocab, batch_size=1, global_seed=0)
    assert alone == in_batch == in_small_batch
    assert other_seed != alone
    # The sequence is actually sampled: it is not the greedy path.
    prev, greedy_path = 0, []
    for step in range(num_steps):
        prev = int(_step_logits(step, prev, vocab).argmax())
        greedy_path.append(prev)
    assert alone != greedy_path


def test_seeded_generators_advance_only_their_own_row():
    """Identically seeded rows draw identically: each generator feeds only its own row."""
    vocab = 32
    logits = torch.randn(4, vocab, generator=torch.Generator().manual_seed(5))
    logits[2] = logits[0]
    sampler = DefaultSampler()
    gens = {0: torch.Generator().manual_seed(77), 2: torch.Generator().manual_seed(77)}
    draws = []
    for _ in range(20):
        out = sampler.sample(logits, make_metadata(4, temperature=1.5, generators=gens))
        draws.append((int(out.sampled_token_ids[0]), int(out.sampled_token_ids[2])))
    assert all(a == b for a, b in draws)
    assert len({a for a, _ in draws}) > 1


# ------------------------------------------------ 3. sampled distributions
@pytest.mark.parametrize("case", [
    # name, params, kept tokens, temperature used for the reference probabilities
    ("temperature_1", dict(temperature=1.0), list(range(VOCAB)), 1.0),
    ("temperature_0.5", dict(temperature=0.5), list(range(VOCAB)), 0.5),
    ("top_k_3", dict(top_k=3), [1, 5, 3], 1.0),
    # 0.30 + 0.22 + 0.16 = 0.68 < 0.7, adding token 6 (0.12) reaches 0.80.
    ("top_p_0.7", dict(top_p=0.7), [1, 5, 3, 6], 1.0),
    # Threshold 0.2 * 0.30 = 0.06: keeps 0.30, 0.22, 0.16, 0.12, 0.09.
    ("min_p_0.2", dict(min_p=0.2), [1, 5, 3, 6, 0], 1.0),
    # softmax(logits / 0.8) = tokens 1: .345, 5: .234, 3: .157, 6: .110, 0: .077, 2/7: .037,
    # 4: .005. min_p 0.15 (threshold .052) drops 2, 7, 4; top_k 4 drops 0; renormalized
    # over {1, 5, 3, 6} = .408, .277, .186, .130, so top_p 0.8 keeps {1, 5, 3} (.870 >= .8).
    # (top_p on the un-renormalized distribution would keep 6 as well: .736 < .8.)
    ("combined", dict(temperature=0.8, min_p=0.15, top_k=4, top_p=0.8), [1, 5, 3], 0.8),
], ids=lambda case: case[0])
def test_sampled_distribution_matches(case):
    _, params, keep, temperature = case
    expected = restricted(softmax(BASE_LOGITS / temperature), keep)
    counts = sample_counts(BASE_LOGITS, seed=11, **params)
    assert chisquare_pvalue(counts, expected) > P_ACCEPT
    excluded = sorted(set(range(VOCAB)) - set(keep))
    assert counts[excluded].sum() == 0


@pytest.mark.parametrize("params, wrong", [
    # Untruncated distribution where a filter was asked for.
    (dict(top_k=3), BASE_PROBS),
    (dict(top_p=0.7), BASE_PROBS),
    (dict(min_p=0.2), BASE_PROBS),
    # top_p set one token too large (0.89 mass instead of 0.80).
    (dict(top_p=0.7), restricted(BASE_PROBS, [1, 5, 3, 6, 0])),
    # A slightly wrong temperature.
    (dict(temperature=0.5), softmax(BASE_LOGITS / 0.55)),
    (dict(temperature=0.5), BASE_PROBS),
], ids=["top_k_vs_full", "top_p_vs_full", "min_p_vs_full", "top_p_vs_one_more",
        "temperature_0.5_vs_0.55", "temperature_0.5_vs_1"])
def test_goodness_of_fit_rejects_wrong_distribution(params, wrong):
    """The statistic has power: it rejects near-misses of the right distribution."""
    counts = sample_counts(BASE_LOGITS, seed=11, **params)
    assert chisquare_pvalue(counts, wrong) < P_REJECT


def test_per_row_parameters_in_one_batch():
    """Rows with different filters in one call each follow their own distribution."""
    group_params = [dict(top_k=3), dict(top_p=0.7), dict(min_p=0.2), dict(temperature=0.5)]
    group_expected = [restricted(BASE_PROBS, [1, 5, 3]),
                      restricted(BASE_PROBS, [1, 5, 3, 6]),
                      restricted(BASE_PROBS, [1, 5, 3, 6, 0]),
                      softmax(BASE_LOGITS / 0.5)]
    num_groups, per_group = len(group_params), 5_000
    num_rows = num_groups * per_group
    columns = {"temperature": 1.0, "top_k": 0, "top_p": 1.0, "min_p": 0.0}
    values = {name: [group_params[r % num_groups].get(name, default) for r in range(num_rows)]
              for name, default in columns.items()}
    logits = torch.tensor(BASE_LOGITS, dtype=torch.float32).expand(num_rows, -1).contiguous()
    with torch.random.fork_rng():
        torch.manual_seed(3)
        sampled = DefaultSampler().sample(logits, make_metadata(num_rows, **values))
    sampled = sampled.sampled_token_ids.numpy()
    for group, expected in enumerate(group_expected):
        counts = np.bincount(sampled[group::num_groups], minlength=VOCAB)
        assert chisquare_pvalue(counts, expected) > P_ACCEPT, group_params[group]


def test_seeded_generators_sample_the_right_distribution():
    """The per-row generator path draws from the same distribution as the shared stream."""
    num_rows, num_steps = 64, 100
    logits = torch.tensor(BASE_LOGITS, dtype=torch.float32).expand(num_rows, -1).contiguous()
    generators = {row: torch.Generator().manual_seed(1000 + row) for row in range(num_rows)}
    metadata = make_metadata(num_rows, top_p=0.7, generators=generators)
    sampler = DefaultSampler()
    counts = np.zeros(VOCAB, dtype=np.int64)
    for _ in range(num_steps):
        counts += np.bincount(sampler.sample(logits, metadata).sampled_token_ids.numpy(),
                              minlength=VOCAB)
    assert chisquare_pvalue(counts, restricted(BASE_PROBS, [1, 5, 3, 6])) > P_ACCEPT
    assert chisquare_pvalue(counts, BASE_PROBS) < P_REJECT


def test_filters_on_logits_directly():
    logits = torch.tensor(BASE_LOGITS, dtype=torch.float32).repeat(4, 1)
    top_k = torch.tensor([3, 0, 0, 4])
    top_p = torch.tensor([1.0, 0.7, 1.0, 0.8])
    filtered = apply_top_k_top_p(logits, top_k, top_p)
    kept = [set(torch.nonzero(torch.isfinite(row)).flatten().tolist()) for row in filtered]
    assert kept == [{1, 5, 3}, {1, 5, 3, 6}, set(range(VOCAB)), {1, 5, 3}]
    finite = torch.isfinite(filtered)
    assert torch.equal(filtered[finite], logits[finite])  # survivors keep their logits

    min_p = torch.tensor([0.2, 0.0, 0.5, 1.0])
    filtered = apply_min_p(logits, min_p)
    kept = [set(torch.nonzero(torch.isfinite(row)).flatten().tolist()) for row in filtered]
    # 0.5 * 0.30 = 0.15: keeps 0.30, 0.22, 0.16; min_p 1.0 keeps only the top token.
    assert kept == [{1, 5, 3, 6, 0}, set(range(VOCAB)), {1, 5, 3}, {1}]


# ------------------------------------------------------------ 4. penalties
PENALTY_LOGITS = [2.0, -1.0, 0.5, 3.0, -2.0, 0.0, 1.0, -0.5]
PROMPT = [0, 1, 5]
OUTPUT = [2, 2, 3, 2, 4]  # token 2 three times, 3 and 4 once


@pytest.mark.parametrize("penalties, prompt, output, expected", [
    # repetition 2: prompt/output tokens 0..5 positive -> /2, non-positive -> *2;
    # frequency 0.5 * count; presence 0.25 once per generated token.
    (dict(repetition_penalty=2.0, frequency_penalty=0.5, presence_penalty=0.25),
     PROMPT, OUTPUT, [1.0, -2.0, -1.5, 0.75, -4.75, 0.0, 1.0, -0.5]),
    (dict(presence_penalty=0.25), PROMPT, OUTPUT,
     [2.0, -1.0, 0.25, 2.75, -2.25, 0.0, 1.0, -0.5]),
    (dict(frequency_penalty=0.5), PROMPT, OUTPUT,
     [2.0, -1.0, -1.0, 2.5, -2.5, 0.0, 1.0, -0.5]),
    (dict(repetition_penalty=2.0), PROMPT, OUTPUT,
     [1.0, -2.0, 0.25, 1.5, -4.0, 0.0, 1.0, -0.5]),
    (dict(), PROMPT, OUTPUT, PENALTY_LOGITS),
    # Negative presence/frequency encourage; repetition < 1 also encourages.
    (dict(repetition_penalty=0.5, frequency_penalty=-0.5, presence_penalty=-1.0),
     PROMPT, OUTPUT, [4.0, -0.5, 3.5, 7.5, 0.5, 0.0, 1.0, -0.5]),
    # Same penalties, different history: only tokens 6 (generated twice) and 7 (prompt).
    (dict(repetition_penalty=2.0, frequency_penalty=0.5, presence_penalty=0.25),
     [7], [6, 6], [2.0, -1.0, 0.5, 3.0, -2.0, 0.0, -0.75, -1.0]),
    # Nothing generated yet: only the repetition penalty on the prompt applies.
    (dict(repetition_penalty=2.0, frequency_penalty=0.5, presence_penalty=0.25),
     [3, 3], [], [2.0, -1.0, 0.5, 1.5, -2.0, 0.0, 1.0, -0.5]),
])
def test_penalties_single_row(penalties, prompt, output, expected):
    logits = torch.tensor([PENALTY_LOGITS])
    metadata = make_metadata(1, prompt_token_ids=[prompt], output_token_ids=[output],
                             **penalties)
    result = apply_penalties(logits.clone(), metadata)
    torch.testing.assert_close(result, torch.tensor([expected]), rtol=0, atol=1e-6)


def test_penalties_are_per_row_and_do_not_modify_input():
    logits = torch.tensor([PENALTY_LOGITS] * 3)
    original = logits.clone()
    metadata = make_metadata(
        3, repetition_penalty=[2.0, 1.0, 1.0], frequency_penalty=[0.0, 0.5, 0.0],
        presence_penalty=[0.0, 0.0, 0.25],
        prompt_token_ids=[PROMPT, PROMPT, [6]], output_token_ids=[OUTPUT, OUTPUT, [7, 7]])
    assert not metadata.no_penalties
    result = apply_penalties(logits, metadata)
    expected = torch.tensor([
        [1.0, -2.0, 0.25, 1.5, -4.0, 0.0, 1.0, -0.5],
        [2.0, -1.0, -1.0, 2.5, -2.5, 0.0, 1.0, -0.5],
        [2.0, -1.0, 0.5, 3.0, -2.0, 0.0, 1.0, -0.75],
    ])
    torch.testing.assert_close(result, expected, rtol=0, atol=1e-6)
    assert torch.equal(logits, original)


def test_sampler_applies_penalties_before_greedy_and_sampling():
    logits = torch.tensor([PENALTY_LOGITS] * 2)  # argmax is token 3 (3.0), then 0 (2.0)
    metadata = make_metadata(2, temperature=[0.0, 1.0], top_k=1, presence_penalty=[1.5, 1.5],
                             prompt_token_ids=[[5], [5]], output_token_ids=[[3], [3]])
    sampled = DefaultSampler().sample(logits, metadata).sampled_token_ids
    # 3.0 - 1.5 = 1.5 < 2.0, so token 0 wins for greedy and for top_k=1 sampling.
    assert sampled.tolist() == [0, 0]
    no_penalty = make_metadata(2, temperature=[0.0, 1.0], top_k=1,
                               prompt_token_ids=[[5], [5]], output_token_ids=[[3], [3]])
    assert DefaultSampler().sample(logits, no_penalty).sampled_token_ids.tolist() == [3, 3]


# -------------------------------------------------------- 5. banned tokens
def test_banned_tokens_are_never_sampled():
    vocab, per_group = 16, 2_000
    logits_row = torch.zeros(vocab)
    logits_row[7] = 10.0   # overwhelmingly likely unless banned
    logits_row[3] = 1.0    # the best remaining token
    logits_row[11] = 0.5
    # Groups: greedy banned, random banned, random banned with top_k=1,
    # random banned with a presence penalty that favours the banned token, random unbanned.
    groups = [
        dict(temperature=0.0, banned=[7], presence=0.0, top_k=0),
        dict(temperature=1.0, banned=[7, 3], presence=0.0, top_k=0),
        dict(temperature=1.0, banned=[7], presence=0.0, top_k=1),
        dict(temperature=2.0, banned=[7], presence=-2.0, top_k=0),
        dict(temperature=1.0, banned=[], presence=0.0, top_k=0),
    ]
    rows = [g for g in groups for _ in range(per_group)]
    metadata = make_metadata(
        len(rows), temperature=[g["temperature"] for g in rows],
        top_k=[g["top_k"] for g in rows], presence_penalty=[g["presence"] for g in rows],
        repetition_penalty=[0.5 if g["presence"] else 1.0 for g in rows],
        prompt_token_ids=[[7]] * len(rows), output_token_ids=[[7, 7]] * len(rows),
        banned_token_ids=[g["banned"] for g in rows])
    logits = logits_row.expand(len(rows), -1).contiguous()
    with torch.random.fork_rng():
        torch.manual_seed(0)
        sampled = DefaultSampler().sample(logits, metadata).sampled_token_ids
    sampled = sampled.view(len(groups), per_group)
    assert bool((sampled[0] == 3).all())           # greedy falls to the next best
    assert not bool(torch.isin(sampled[1], torch.tensor([7, 3])).any())
    assert bool((sampled[2] == 3).all())           # ban applies before top_k
    assert not bool((sampled[3] == 7).any())
    # The ban is per row: the unbanned rows still pick token 7 almost always.
    assert int((sampled[4] == 7).sum()) > 0.99 * per_group


def test_min_tokens_bans_stop_tokens_end_to_end(tiny_qwen2):
    llm = LLM(str(tiny_qwen2), dtype="float32")
    prompt = "Hello, my name is"
    free = llm.generate([prompt], SamplingParams(temperature=0.0, max_tokens=10,
                                                 ignore_eos=True))[0].outputs[0].token_ids
    # A token the greedy path first produces at step ``index`` >= 1 becomes a stop token.
    index = next((i for i in range(1, len(free)) if free[i] not in free[:i]), None)
    assert index is not None and index < 8
    stop_token = free[index]
    params = SamplingParams(temperature=0.0, max_tokens=10, min_tokens=8, ignore_eos=True,
                            stop_token_ids=[stop_token])
    constrained = llm.generate([prompt], params)[0].outputs[0].token_ids
    assert constrained[:index] == free[:index]
    assert stop_token not in constrained[:8]
    assert len(constrained) >= 8


# -------------------------------------------------------------- 6. logprobs
def test_logprobs_are_raw_and_ranked():
    num_rows, vocab, k = 5, 40, 4
    logits = torch.randn(num_rows, vocab, generator=torch.Generator().manual_seed(9)) * 2
    raw = logits.clone()
    argmax = logits.argmax(dim=-1)
    metadata = make_metadata(
        num_rows, temperature=[0.0, 0.5, 1.0, 1.3, 0.0], top_k=[0, 0, 10, 0, 0],
        repetition_penalty=[1.0, 1.0, 1.0, 1.3, 1.0], presence_penalty=[0.0, 0.5, 0.0, 0.0, 0.0],
        prompt_token_ids=[[1, 2]] * num_rows, output_token_ids=[[3, 4]] * num_rows,
        # Ban row 4's argmax so its greedy token is not the raw top-1.
        banned_token_ids=[[], [], [], [], [int(argmax[4])]], max_num_logprobs=k)
    with torch.random.fork_rng():
        torch.manual_seed(0)
        output = DefaultSampler().sample(logits, metadata)
    assert torch.equal(logits, raw)
    sampled = output.sampled_token_ids
    assert output.logprob_token_ids.shape == (num_rows, 1 + k)
    assert output.logprobs.shape == (num_rows, 1 + k)
    assert output.logprob_token_ids.dtype == torch.int64
    assert output.sampled_ranks.shape == (num_rows,)
    assert torch.equal(output.logprob_token_ids[:, 0], sampled)

    raw_logprobs = torch.log_softmax(raw.double(), dim=-1)
    top = raw_logprobs.topk(k, dim=-1)
    assert torch.equal(output.logprob_token_ids[:, 1:], top.indices)
    torch.testing.assert_close(output.logprobs[:, 1:].double(), top.values,
                               rtol=0, atol=1e-5)
    torch.testing.assert_close(output.logprobs[:, 0].double(),
                               raw_logprobs.gather(1, sampled.unsqueeze(1)).squeeze(1),
                               rtol=0, atol=1e-5)
    order = raw.argsort(dim=-1, descending=True)
    expected_ranks = (order == sampled.unsqueeze(1)).int().argmax(dim=-1) + 1
    assert torch.equal(output.sampled_ranks, expected_ranks)
    assert int(output.sampled_ranks[0]) == 1   # unpenalized greedy row
    assert int(output.sampled_ranks[4]) == 2   # raw top-1 was banned
    assert sampled[4] != argmax[4] and bool(torch.isfinite(output.logprobs[4, 0]))


def test_zero_logprobs_returns_only_the_sampled_token():
    logits = torch.randn(3, 20, generator=torch.Generator().manual_seed(2))
    output = DefaultSampler().sample(logits, make_metadata(3, temperature=0.0,
                                                           max_num_logprobs=0))
    assert output.logprob_token_ids.shape == (3, 1)
    assert output.logprobs.shape == (3, 1)
    assert torch.equal(output.logprob_token_ids[:, 0], logits.argmax(dim=-1))
    torch.testing.assert_close(output.logprobs[:, 0],
                               torch.log_softmax(logits, dim=-1).max(dim=-1).values)
    assert output.sampled_ranks.tolist() == [1, 1, 1]


# ------------------------------------------------------ 2b. seeds end to end
PROMPTS = ["Hello, my name is", "The quick brown fox", "Paged attention keeps the",
           "0123456789 + -", "Continuous batching mixes"]


def _token_ids(outputs) -> list[list[int]]:
    return [list(output.outputs[0].token_ids) for output in outputs]


def test_seeded_request_is_reproducible_in_any_batch(tiny_qwen2):
    llm = LLM(str(tiny_qwen2), dtype="float32")
    target = SamplingParams(seed=1234, temperature=1.0, max_tokens=16)
    others = [SamplingParams(temperature=1.0, max_tokens=16),
              SamplingParams(seed=99, temperature=0.8, top_k=20, max_tokens=12),
              SamplingParams(temperature=0.0, max_tokens=7),
              SamplingParams(seed=1234, temperature=1.0, top_p=0.9, max_tokens=16)]
    alone = _token_ids(llm.generate([PROMPTS[0]], target))[0]
    assert len(alone) >= 4
    first = _token_ids(llm.generate(PROMPTS, [target] + others))[0]
    middle = _token_ids(llm.generate(PROMPTS[1:3] + PROMPTS[:1] + PROMPTS[3:],
                                     others[:2] + [target] + others[2:]))[2]
    last = _token_ids(llm.generate(PROMPTS[1:] + PROMPTS[:1], others + [target]))[-1]
    # The same seeded request twice in one batch: each gets its own generator.
    twice = _token_ids(llm.generate([PROMPTS[2], PROMPTS[0], PROMPTS[0]],
                                    [others[0], target, target]))
    assert first == alone
    assert middle == alone
    assert last == alone
    assert twice[1] == alone and twice[2] == alone


def test_seeded_request_survives_chunked_prefill_and_preemption(tiny_qwen2):
    target = SamplingParams(seed=7, temperature=1.0, max_tokens=16, ignore_eos=True)
    baseline = _token_ids(LLM(str(tiny_qwen2), dtype="float32").generate(
        [PROMPTS[0]], target))[0]
    # Prefill in chunks of 3 tokens: non-final chunks must not consume the seed's draws.
    chunked = LLM(str(tiny_qwen2), dtype="float32", max_num_batched_tokens=3,
                  enable_chunked_prefill=True)
    assert _token_ids(chunked.generate([PROMPTS[0]], target))[0] == baseline
    # A tiny KV cache forces preemption (recompute) of some of these requests.
    tight = LLM(str(tiny_qwen2), dtype="float32", block_size=4, num_gpu_blocks_override=12)
    params = [target if i == 0 else SamplingParams(seed=i, max_tokens=16, ignore_eos=True)
              for i in range(len(PROMPTS))]
    outputs = _token_ids(tight.generate(PROMPTS, params))
    assert tight.engine.get_stats().num_preemptions > 0
    assert outputs[0] == baseline


def test_different_seeds_give_different_outputs(tiny_qwen2):
    llm = LLM(str(tiny_qwen2), dtype="float32")
    params = [SamplingParams(seed=seed, temperature=1.0, max_tokens=16) for seed in (1, 2, 3)]
    outputs = _token_ids(llm.generate([PROMPTS[0]] * 3, params))
    assert len({tuple(tokens) for tokens in outputs}) == 3
    # n > 1 with a seed: the samples differ from each other and repeat across calls.
    many = SamplingParams(n=3, seed=5, temperature=1.0, max_tokens=16)
    first = [list(c.token_ids) for c in llm.generate([PROMPTS[0]], many)[0].outputs]
    again = [list(c.token_ids) for c in llm.generate([PROMPTS[0]], many)[0].outputs]
    assert first == again
    assert len({tuple(tokens) for tokens in first}) == 3
