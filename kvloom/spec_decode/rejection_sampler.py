"""Speculative-decoding verification: keep a prefix of each row's drafts, then add one token.

Why the output follows the target distribution p (standard speculative sampling,
Leviathan et al. 2023; Chen et al. 2023): a draft d ~ q is kept with probability
min(1, p(d) / q(d)), so token x leaves through the accept branch with probability
min(p(x), q(x)). A rejection happens with probability sum_x max(0, q(x) - p(x)), which
equals sum_x max(0, p(x) - q(x)), and then draws from normalize(max(0, p - q)), adding
max(0, p(x) - q(x)). The two branches sum to p(x). Applied position by position, each
emitted token is distributed exactly as the target's given its prefix; when every draft
is kept the bonus token comes straight from the target's next distribution. Greedy rows
are the temperature-0 case: keep drafts while they equal the target's argmax.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

PAD_TOKEN_ID = -1


@dataclass(slots=True)
class RejectionOutput:
    """The tokens each row emits this step.

    Attributes:
        token_ids: int64 [num_rows, max_num_drafts + 1] on the device: the accepted
            drafts, then the correction or bonus token, padded with -1.
        num_tokens: int64 [num_rows]: accepted drafts + 1.
    """

    token_ids: torch.Tensor
    num_tokens: torch.Tensor


@dataclass(slots=True)
class _Layout:
    """Where each row's drafts and target positions live in the flattened inputs.

    Padded to ``max_num_drafts`` columns; indices past a row's end are clamped to a
    valid entry so gathers stay in bounds, and ``valid`` masks them out.
    """

    num_drafts: torch.Tensor      # int64 [R]
    greedy: torch.Tensor          # bool [R]
    positions: torch.Tensor       # int64 [R, K + 1]: index into the P target positions
    draft_index: torch.Tensor     # int64 [R, K]: index into the flattened drafts
    valid: torch.Tensor           # bool [R, K]: column t < the row's number of drafts
    max_num_drafts: int


def rejection_sample(
    num_drafts: list[int],
    draft_token_ids: torch.Tensor,
    target_argmax: torch.Tensor,
    target_probs: torch.Tensor | None,
    greedy: list[bool],
    draft_probs: torch.Tensor | None = None,
    generators: dict[int, torch.Generator] | None = None,
) -> RejectionOutput:
    """Verify drafts against the target model.

    Args:
        num_drafts: per row, its number of drafts k_i >= 0.
        draft_token_ids: int64 [sum(k_i)], the drafts flattened in row order.
        target_argmax: int64 [sum(k_i + 1)]: the target's greedy token per position; row
            i owns k_i + 1 consecutive positions, the last one for the bonus token.
        target_probs: float32 [sum(k_i + 1), V], the target's sampling distribution per
            position; None when every row is greedy.
        greedy: per row, verify against ``target_argmax`` (True) or ``target_probs``.
        draft_probs: float32 [sum(k_i), V], the drafter's distribution at each draft;
            None when drafts were picked deterministically (one-hot q).
        generators: row -> seeded generator; that row draws all its randomness from it.

    Returns:
        RejectionOutput on the drafts' device; nothing here waits for the device.
    """
    generators = generators or {}
    _validate(num_drafts, draft_token_ids, target_argmax, target_probs, greedy,
              draft_probs, generators)
    layout = _make_layout(num_drafts, greedy, draft_token_ids.device)
    drafts = _pad_drafts(draft_token_ids, layout)
    num_accepted, final_token = _verify_greedy(layout, drafts, target_argmax)
    if target_probs is not None and not all(greedy):
        random_accepted, random_final = _verify_random(
            layout, drafts, target_probs, draft_probs,
            _draw_randomness(num_drafts, greedy, target_probs, generators, layout))
        num_accepted = torch.where(layout.greedy, num_accepted, random_accepted)
        final_token = torch.where(layout.greedy, final_token, random_final)
    return _assemble(layout, drafts, num_accepted, final_token)


def _validate(num_drafts, draft_token_ids, target_argmax, target_probs, greedy,
              draft_probs, generators) -> None:
    """Shape checks that need no device sync."""
    num_rows = len(num_drafts)
    if len(greedy) != num_rows:
        raise ValueError(f"greedy has {len(greedy)} rows, num_drafts has {num_rows}")
    if any(k < 0 for k in num_drafts):
        raise ValueError(f"num_drafts must be >= 0, got {num_drafts}")
    total_drafts = sum(num_drafts)
    num_positions = total_drafts + num_rows
    if tuple(draft_token_ids.shape) != (total_drafts,):
        raise ValueError(f"draft_token_ids has shape {tuple(draft_token_ids.shape)}, "
                         f"expected ({total_drafts},) = sum(num_drafts)")
    if tuple(target_argmax.shape) != (num_positions,):
        raise ValueError(f"target_argmax has shape {tuple(target_argmax.shape)}, expected "
                         f"({num_positions},) = sum(num_drafts) + number of rows")
    if target_probs is None:
        if not all(greedy):
            raise ValueError("target_probs is required when some row is not greedy")
        return
    if target_probs.dim() != 2 or target_probs.shape[0] != num_positions:
        raise ValueError(f"target_probs has shape {tuple(target_probs.shape)}, expected "
                         f"({num_positions}, vocab_size)")
    vocab_size = target_probs.shape[1]
    if draft_probs is not None and tuple(draft_probs.shape) != (total_drafts, vocab_size):
        raise ValueError(f"draft_probs has shape {tuple(draft_probs.shape)}, expected "
                         f"({total_drafts}, {vocab_size})")
    bad_rows = [row for row in generators if not 0 <= row < num_rows]
    if bad_rows:
        raise ValueError(f"generators name rows {bad_rows} outside 0..{num_rows - 1}")


def _make_layout(num_drafts: list[int], greedy: list[bool], device: torch.device) -> _Layout:
    max_num_drafts = max(num_drafts, default=0)
    # One host-to-device copy for both per-row lists.
    per_row = torch.tensor([num_drafts, greedy], dtype=torch.int64).to(device, non_blocking=True)
    k, is_greedy = per_row[0], per_row[1].bool()
    position_offsets = torch.cumsum(k + 1, dim=0) - (k + 1)
    draft_offsets = torch.cumsum(k, dim=0) - k
    columns = torch.arange(max_num_drafts + 1, device=device)
    positions = position_offsets[:, None] + torch.minimum(columns, k[:, None])
    valid = columns[:max_num_drafts] < k[:, None]
    total_drafts = sum(num_drafts)
    draft_index = (draft_offsets[:, None] + columns[:max_num_drafts]).clamp(
        max=max(total_drafts - 1, 0))
    return _Layout(k, is_greedy, positions, draft_index, valid, max_num_drafts)


def _pad_drafts(draft_token_ids: torch.Tensor, layout: _Layout) -> torch.Tensor:
    """[R, K] drafts; padding columns hold some real draft so they can index the vocab."""
    if layout.max_num_drafts == 0:
        return layout.draft_index.clone()
    return draft_token_ids[layout.draft_index]


def _count_leading(accepted: torch.Tensor) -> torch.Tensor:
    """Per row, how many columns are True before the first False."""
    return torch.cumprod(accepted.to(torch.int64), dim=1).sum(dim=1)


def _verify_greedy(layout: _Layout, drafts: torch.Tensor,
                   target_argmax: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    targets = target_argmax[layout.positions]
    accepted = (drafts == targets[:, :-1]) & layout.valid
    num_accepted = _count_leading(accepted)
    # Both the correction and the bonus are the target's choice at the first unmatched slot.
    return num_accepted, targets.gather(1, num_accepted[:, None]).squeeze(1)


@dataclass(slots=True)
class _Randomness:
    uniforms: torch.Tensor        # [R, K]: one acceptance test per draft
    exponentials: torch.Tensor    # [R, V]: the race that picks the final token


def _draw_randomness(num_drafts: list[int], greedy: list[bool], target_probs: torch.Tensor,
                     generators: dict[int, torch.Generator], layout: _Layout) -> _Randomness:
    """Default-stream draws for every row, then seeded rows redraw from their generator.

    A seeded row draws exactly k_i uniforms and then V exponentials, independent of the
    batch's widest row, so its outputs depend only on its own inputs and seed. One
    exponential vector serves whichever distribution the row ends on: which one that is
    depends only on the uniforms, so the race stays independent of the choice.
    """
    num_rows, vocab_size = len(num_drafts), target_probs.shape[1]
    device, dtype = target_probs.device, target_probs.dtype
    # float32 uniforms even for half-precision probs: their resolution sets how finely
    # p/q acceptance ratios are honoured.
    uniforms = torch.rand(num_rows, layout.max_num_drafts, device=device, dtype=torch.float32)
    exponentials = torch.empty(num_rows, vocab_size, device=device, dtype=dtype).exponential_()
    for row, generator in generators.items():
        if greedy[row]:
            continue  # a greedy row uses no randomness; leave its stream untouched
        uniforms[row, :num_drafts[row]].uniform_(generator=generator)
        exponentials[row].exponential_(generator=generator)
    # An exact 0 would make 0/0 = NaN, which argmax prefers.
    exponentials.clamp_(min=torch.finfo(dtype).tiny)
    return _Randomness(uniforms, exponentials)


def _verify_random(layout: _Layout, drafts: torch.Tensor, target_probs: torch.Tensor,
                   draft_probs: torch.Tensor | None,
                   randomness: _Randomness) -> tuple[torch.Tensor, torch.Tensor]:
    positions = layout.positions[:, :-1]
    p_at_draft = target_probs[positions, drafts]
    if draft_probs is None:
        accepted = randomness.uniforms < p_at_draft
    else:
        q_at_draft = draft_probs[layout.draft_index, drafts]
        # u < p/q without dividing: q = 0 (a draft q could not pick) then accepts iff p > 0.
        accepted = randomness.uniforms * q_at_draft < p_at_draft
    num_accepted = _count_leading(accepted & layout.valid)
    final_probs = _final_distribution(layout, drafts, target_probs, draft_probs, num_accepted)
    final_token = (final_probs / randomness.exponentials).argmax(dim=-1)
    return num_accepted, final_token


def _final_distribution(layout: _Layout, drafts: torch.Tensor, target_probs: torch.Tensor,
                        draft_probs: torch.Tensor | None,
                        num_accepted: torch.Tensor) -> torch.Tensor:
    """[R, V]: max(0, p - q) at the first rejection, or p at the bonus position.

    Left unnormalized: the exponential race only compares ratios.
    """
    rows = torch.arange(layout.num_drafts.shape[0], device=num_accepted.device)
    p = target_probs[layout.positions[rows, num_accepted]]
    if layout.max_num_drafts == 0:
        return p
    rejected = (num_accepted < layout.num_drafts).to(p.dtype)[:, None]
    column = num_accepted.clamp(max=layout.max_num_drafts - 1)
    if draft_probs is None:
        q = torch.zeros_like(p).scatter_(1, drafts[rows, column][:, None], 1.0)
    else:
        q = draft_probs[layout.draft_index[rows, column]]
    residual = (p - q * rejected).clamp_(min=0)
    # Empty only when p == q up to rounding, where a rejection was all but impossible.
    return torch.where(residual.sum(dim=-1, keepdim=True) > 0, residual, p)


def _assemble(layout: _Layout, drafts: torch.Tensor, num_accepted: torch.Tensor,
              final_token: torch.Tensor) -> RejectionOutput:
    columns = torch.arange(layout.max_num_drafts + 1, device=drafts.device)
    padded_drafts = torch.cat([drafts, drafts.new_full((drafts.shape[0], 1), PAD_TOKEN_ID)],
                              dim=1)
    n = num_accepted[:, None]
    tail = torch.where(columns == n, final_token[:, None], PAD_TOKEN_ID)
    token_ids = torch.where(columns < n, padded_drafts, tail)
    return RejectionOutput(token_ids, num_accepted + 1)
