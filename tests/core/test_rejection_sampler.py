"""Tests for speculative-decoding verification (kvloom.spec_decode.rejection_sampler).

Statistical tests run under a fixed seed, so they are deterministic; their threshold
(the 0.999 quantile of chi-square) is loose enough that a correct sampler would almost
never fail even if the draw order changed, and each has a negative control showing the
same check rejects a wrong distribution.
"""

from __future__ import annotations

import pytest
import torch

from kvloom.spec_decode.rejection_sampler import RejectionOutput, rejection_sample

try:
    from scipy import stats
except ImportError:  # the statistic is simple; only the quantile needs a table
    stats = None

VOCAB = 8
NUM_ROWS = 40_000
# 0.999 quantile of chi-square with VOCAB - 1 = 7 degrees of freedom (standard tables).
CHI2_7DOF_Q999 = 24.322


# ---------------------------------------------------------------------------- helpers

def one_hot(token_ids: list[int], vocab: int = VOCAB) -> torch.Tensor:
    return torch.nn.functional.one_hot(torch.tensor(token_ids), vocab).float()


def ids(values: list[int]) -> torch.Tensor:
    return torch.tensor(values, dtype=torch.int64)


def rows(output: RejectionOutput) -> list[list[int]]:
    """Each row's emitted tokens, checking the -1 padding after them."""
    result = []
    for token_ids, num_tokens in zip(output.token_ids.tolist(), output.num_tokens.tolist()):
        assert all(t == -1 for t in token_ids[num_tokens:])
        assert all(t >= 0 for t in token_ids[:num_tokens])
        result.append(token_ids[:num_tokens])
    return result


def greedy_reference(num_drafts: list[int], drafts: list[int], argmax: list[int]) -> list[list]:
    """Plain-Python greedy verification, one token at a time."""
    result, draft_at, position = [], 0, 0
    for k in num_drafts:
        row_drafts, row_targets = drafts[draft_at:draft_at + k], argmax[position:position + k + 1]
        out = []
        for draft, target in zip(row_drafts, row_targets):
            if draft != target:
                break
            out.append(draft)
        out.append(row_targets[len(out)])
        result.append(out)
        draft_at, position = draft_at + k, position + k + 1
    return result


def chi_square(samples: torch.Tensor, probs: torch.Tensor) -> float:
    """Pearson's statistic for ``samples`` (token ids) against ``probs``."""
    counts = torch.bincount(samples, minlength=probs.numel()).double()
    probs = probs.double()
    # float32 softmax sums to 1 only within rounding, which scipy checks strictly.
    expected = probs / probs.sum() * samples.numel()
    if stats is not None:
        return float(stats.chisquare(counts.numpy(), expected.numpy()).statistic)
    return float(((counts - expected) ** 2 / expected).sum())


def chi_square_limit(dof: int = VOCAB - 1) -> float:
    return float(stats.chi2.ppf(0.999, dof)) if stats is not None else CHI2_7DOF_Q999


def fixed_distributions(seed: int, num: int, scale: float = 1.0) -> torch.Tensor:
    """[num, VOCAB] distributions with every entry comfortably above zero.

    A smaller ``scale`` gives flatter distributions.
    """
    generator = torch.Generator().manual_seed(seed)
    return torch.softmax(scale * torch.randn(num, VOCAB, generator=generator), dim=-1)


# ------------------------------------------------------------------- greedy rows

@pytest.mark.parametrize("drafts, argmax, expected", [
    ([1, 2, 3], [1, 2, 3, 4], [1, 2, 3, 4]),          # all accepted + bonus
    ([5, 2, 3], [1, 2, 3, 4], [1]),                   # first draft rejected
    ([1, 2, 7, 4], [1, 2, 3, 4, 5], [1, 2, 3]),       # mismatch at t=2
    ([1, 2, 3, 9], [1, 2, 3, 4, 5], [1, 2, 3, 4]),    # last draft rejected
])
def test_greedy_single_row(drafts, argmax, expected):
    output = rejection_sample([len(drafts)], ids(drafts), ids(argmax), None, [True])
    assert output.token_ids.dtype == torch.int64
    assert output.token_ids.shape == (1, len(drafts) + 1)
    assert rows(output) == [expected]
    assert output.num_tokens.tolist() == [len(expected)]


def test_greedy_batch_of_mixed_lengths_including_zero():
    num_drafts = [2, 0, 4, 0, 1, 3]
    drafts = [7, 1,   3, 3, 9, 0,   6,   2, 2, 2]
    argmax = [7, 1, 5,   4,   3, 3, 8, 0, 1,   4,   6, 0, 2, 2, 2, 6]
    output = rejection_sample(num_drafts, ids(drafts), ids(argmax), None, [True] * 6)
    assert output.token_ids.shape == (6, 5)
    assert rows(output) == [[7, 1, 5], [4], [3, 3, 8], [4], [6, 0], [2, 2, 2, 6]]


def test_greedy_matches_reference_on_random_batches():
    generator = torch.Generator().manual_seed(0)
    for _ in range(20):
        num_drafts = torch.randint(0, 6, (16,), generator=generator).tolist()
        # Tiny vocabulary so drafts match often and every stopping point occurs.
        drafts = torch.randint(0, 3, (sum(num_drafts),), generator=generator)
        argmax = torch.randint(0, 3, (sum(num_drafts) + 16,), generator=generator)
        output = rejection_sample(num_drafts, drafts, argmax, None, [True] * 16)
        assert rows(output) == greedy_reference(num_drafts, drafts.tolist(), argmax.tolist())


def test_all_rows_without_drafts_take_the_target_token():
    output = rejection_sample([0, 0, 0], ids([]), ids([4, 1, 6]), None, [True] * 3)
    assert output.token_ids.shape == (3, 1)
    assert rows(output) == [[4], [1], [6]]


def test_empty_batch():
    output = rejection_sample([], ids([]), ids([]), None, [])
    assert output.token_ids.shape == (0, 1)
    assert output.num_tokens.shape == (0,)


def test_greedy_rows_ignore_target_probs_in_a_mixed_batch():
    # The probabilities put all mass elsewhere; greedy rows must follow target_argmax.
    probs = one_hot([0, 0, 0, 0, 0])
    output = rejection_sample([2, 1], ids([3, 4, 0]), ids([3, 4, 5, 0, 0]), probs,
                              [True, False])
    assert rows(output) == [[3, 4, 5], [0, 0]]


# ------------------------------------------------------------------- random rows

@pytest.mark.parametrize("drafts, targets, expected", [
    ([1, 2, 3], [1, 2, 3, 4], [1, 2, 3, 4]),          # p(d) = 1: all accepted + bonus
    ([5, 2, 3], [1, 2, 3, 4], [1]),                   # p(d) = 0 at t=0
    ([1, 2, 7, 4], [1, 2, 3, 4, 5], [1, 2, 3]),       # p(d) = 0 at t=2
])
def test_random_rows_with_one_hot_targets(drafts, targets, expected):
    num_rows = 200  # the same row many times: the outcome must never vary
    output = rejection_sample([len(drafts)] * num_rows, ids(drafts * num_rows),
                              ids(targets * num_rows), one_hot(targets * num_rows),
                              [False] * num_rows)
    assert rows(output) == [expected] * num_rows


def test_random_rejection_never_returns_the_rejected_draft():
    # p(d) = 0 and p uniform elsewhere: always rejected, replacement anything but d.
    num_rows, draft = 2_000, 3
    p = torch.full((VOCAB,), 1 / (VOCAB - 1))
    p[draft] = 0.0
    target_probs = torch.stack([p, one_hot([0])[0]]).repeat(num_rows, 1)
    output = rejection_sample([1] * num_rows, ids([draft] * num_rows),
                              ids([0, 0] * num_rows), target_probs, [False] * num_rows)
    assert (output.num_tokens == 1).all()
    first = output.token_ids[:, 0]
    assert (first != draft).all()
    assert set(first.tolist()) == set(range(VOCAB)) - {draft}


def test_random_rejection_with_draft_probs_samples_the_residual():
    # p = [.5, .5, 0...], q = [1, 0, ...]: residual max(0, p - q) is all on token 1.
    num_rows = 2_000
    p = torch.zeros(VOCAB)
    p[:2] = 0.5
    target_probs = torch.stack([p, p]).repeat(num_rows, 1)
    output = rejection_sample([1] * num_rows, ids([0] * num_rows), ids([0, 0] * num_rows),
                              target_probs, [False] * num_rows,
                              draft_probs=one_hot([0] * num_rows))
    first = output.token_ids[:, 0]
    accepted = output.num_tokens == 2
    # Accepted drafts are token 0; rejections must be replaced by token 1, never 0.
    assert (first[accepted] == 0).all() and (first[~accepted] == 1).all()
    assert 0.45 < accepted.float().mean() < 0.55


def test_draft_with_p_at_least_q_is_always_accepted():
    num_rows = 2_000
    p, q = torch.zeros(VOCAB), torch.zeros(VOCAB)
    p[2], p[5] = 0.5, 0.5
    q[2], q[6] = 0.3, 0.7
    output = rejection_sample([1] * num_rows, ids([2] * num_rows), ids([2, 2] * num_rows),
                              torch.stack([p, one_hot([4])[0]]).repeat(num_rows, 1),
                              [False] * num_rows, draft_probs=q.repeat(num_rows, 1))
    assert rows(output) == [[2, 4]] * num_rows


def test_empty_residual_falls_back_to_the_target():
    # p == q and the draft has no mass under either: rejected, and max(0, p - q) is
    # all zero. The replacement must come from p (tokens 1..2), not be the draft 0.
    num_rows = 500
    p = torch.zeros(VOCAB)
    p[1], p[2] = 0.5, 0.5
    output = rejection_sample([1] * num_rows, ids([0] * num_rows), ids([1, 1] * num_rows),
                              p.repeat(2 * num_rows, 1), [False] * num_rows,
                              draft_probs=p.repeat(num_rows, 1))
    assert (output.num_tokens == 1).all()
    assert set(output.token_ids[:, 0].tolist()) == {1, 2}


def test_random_batch_of_mixed_lengths_including_zero():
    num_drafts = [2, 0, 3, 1]
    drafts = [4, 5,   1, 2, 7,   3]
    targets = [4, 5, 6,   2,   1, 0, 7, 7,   3, 1]
    output = rejection_sample(num_drafts, ids(drafts), ids(targets), one_hot(targets),
                              [False, False, True, False])
    assert rows(output) == [[4, 5, 6], [2], [1, 0], [3, 1]]


# ------------------------------------------------------------- distribution checks

def _sample_drafts(q: torch.Tensor, num_rows: int) -> torch.Tensor:
    """[num_rows * len(q)] drafts, row-major, position t drawn from q[t]."""
    samples = torch.multinomial(q, num_rows, replacement=True)  # [K, num_rows]
    return samples.t().reshape(-1)


def _verify_fixed(p: torch.Tensor, drafts: torch.Tensor, q: torch.Tensor | None,
                  num_drafts: int) -> RejectionOutput:
    """Every row verifies ``num_drafts`` drafts against the same per-position p."""
    num_rows = drafts.numel() // num_drafts
    draft_probs = None if q is None else q.repeat(num_rows, 1)
    return rejection_sample([num_drafts] * num_rows, drafts,
                            p.argmax(dim=-1).repeat(num_rows), p.repeat(num_rows, 1),
                            [False] * num_rows, draft_probs=draft_probs)


@pytest.fixture
def seeded():
    with torch.random.fork_rng():
        torch.manual_seed(1234)
        yield


@pytest.mark.usefixtures("seeded")
def test_sampled_drafts_reproduce_the_target_distribution():
    p = fixed_distributions(seed=1, num=3)   # positions 0, 1 and the bonus
    q = fixed_distributions(seed=2, num=2)
    output = _verify_fixed(p, _sample_drafts(q, NUM_ROWS), q, num_drafts=2)
    limit = chi_square_limit()
    assert chi_square(output.token_ids[:, 0], p[0]) < limit
    # Given the first draft was kept, the second token must still follow p_1.
    first_kept = output.num_tokens >= 2
    assert first_kept.sum() > NUM_ROWS // 4
    assert chi_square(output.token_ids[first_kept, 1], p[1]) < limit
    all_kept = output.num_tokens == 3
    assert all_kept.sum() > NUM_ROWS // 8
    assert chi_square(output.token_ids[all_kept, 2], p[2]) < limit


@pytest.mark.usefixtures("seeded")
def test_fixed_drafts_reproduce_the_target_distribution():
    p = fixed_distributions(seed=3, num=3)
    # Deterministic drafter: always the same tokens, q one-hot (draft_probs None).
    drafts = ids([int(p[0].argmax()), int(p[1].argmin())] * NUM_ROWS)
    output = _verify_fixed(p, drafts, None, num_drafts=2)
    limit = chi_square_limit()
    assert chi_square(output.token_ids[:, 0], p[0]) < limit
    first_kept = output.num_tokens >= 2
    assert chi_square(output.token_ids[first_kept, 1], p[1]) < limit


@pytest.mark.usefixtures("seeded")
def test_chi_square_check_has_power():
    """The check above would catch a sampler that ends up following the wrong law."""
    p = fixed_distributions(seed=1, num=3)
    q = fixed_distributions(seed=2, num=2)
    limit = chi_square_limit()
    # Fed q as its target, the sampler (correctly) reproduces q, which fails against p.
    wrong_target = torch.cat([q, p[2:]])
    output = _verify_fixed(wrong_target, _sample_drafts(q, NUM_ROWS), q, num_drafts=2)
    assert chi_square(output.token_ids[:, 0], p[0]) > 10 * limit
    # The classic bug: resample from p instead of max(0, p - q) after a rejection.
    drafts = _sample_drafts(q[:1], NUM_ROWS)
    kept = torch.rand(NUM_ROWS) < (p[0][drafts] / q[0][drafts])
    naive = torch.where(kept, drafts, torch.multinomial(p[0], NUM_ROWS, replacement=True))
    assert chi_square(naive, p[0]) > 10 * limit


# --------------------------------------------------------------------------- seeds

def _seeded_row_setup(seed: int):
    """A random row whose outcome genuinely varies: near-uniform p, different q."""
    p = fixed_distributions(seed=10, num=4, scale=0.3)
    q = fixed_distributions(seed=11, num=3, scale=0.3)
    drafts = ids([1, 4, 6])
    return p, q, drafts, torch.Generator().manual_seed(seed)


def _run_with_neighbours(seed: int, layout: str) -> list[int]:
    """Verify the seeded row inside a batch whose other rows depend on ``layout``."""
    p, q, drafts, generator = _seeded_row_setup(seed)
    other_p = fixed_distributions(seed=12, num=6)
    if layout == "alone":
        batch = [(3, drafts, p, q, False)]
    elif layout == "wide_neighbours":
        batch = [(5, ids([0, 1, 2, 3, 4]), other_p, other_p[:5], False),
                 (3, drafts, p, q, False),
                 (0, ids([]), other_p[:1], other_p[:0], True)]
    else:  # "greedy_neighbours": seeded row last, narrower others
        batch = [(1, ids([2]), other_p[:2], other_p[:1], True),
                 (0, ids([]), other_p[:1], other_p[:0], False),
                 (3, drafts, p, q, False)]
    row = next(i for i, entry in enumerate(batch) if entry[1] is drafts)
    target_probs = torch.cat([entry[2] for entry in batch])
    output = rejection_sample(
        [entry[0] for entry in batch], torch.cat([entry[1] for entry in batch]),
        target_probs.argmax(dim=-1), target_probs, [entry[4] for entry in batch],
        draft_probs=torch.cat([entry[3] for entry in batch]), generators={row: generator})
    return rows(output)[row]


def test_same_seed_same_output_whatever_the_other_rows():
    for seed in range(30):
        with torch.random.fork_rng():
            torch.manual_seed(seed + 100)  # the default stream differs on every call
            alone = _run_with_neighbours(seed, "alone")
            assert _run_with_neighbours(seed, "wide_neighbours") == alone
            assert _run_with_neighbours(seed, "greedy_neighbours") == alone


def test_different_seeds_give_different_outputs():
    outputs = {tuple(_run_with_neighbours(seed, "alone")) for seed in range(200)}
    assert len(outputs) > 10
    assert len({len(out) for out in outputs}) > 1  # acceptance varies too, not only tokens


def test_greedy_row_leaves_its_generator_untouched():
    generator = torch.Generator().manual_seed(7)
    state = generator.get_state()
    probs = one_hot([1, 2, 3, 4])
    rejection_sample([1, 1], ids([1, 3]), ids([1, 2, 3, 4]), probs, [True, False],
                     generators={0: generator})
    assert torch.equal(generator.get_state(), state)


# ---------------------------------------------------------------------- validation

@pytest.mark.parametrize("kwargs, message", [
    (dict(greedy=[True]), "greedy has 1 rows"),
    (dict(num_drafts=[2, -1]), "must be >= 0"),
    (dict(draft_token_ids=ids([1, 2])), "draft_token_ids has shape"),
    (dict(target_argmax=ids([1, 2, 3])), "target_argmax has shape"),
    (dict(target_probs=None), "target_probs is required"),
    (dict(target_probs=torch.rand(4, VOCAB)), "target_probs has shape"),
    (dict(target_probs=torch.rand(5)), "target_probs has shape"),
    (dict(draft_probs=torch.rand(3, VOCAB + 1)), "draft_probs has shape"),
    (dict(draft_probs=torch.rand(2, VOCAB)), "draft_probs has shape"),
    (dict(generators={2: torch.Generator()}), "outside"),
])
def test_invalid_inputs_are_refused(kwargs, message):
    args = dict(num_drafts=[2, 1], draft_token_ids=ids([1, 2, 3]),
                target_argmax=ids([1, 2, 3, 4, 5]), target_probs=torch.rand(5, VOCAB),
                greedy=[True, False])
    args.update(kwargs)
    with pytest.raises(ValueError, match=message):
        rejection_sample(**args)
