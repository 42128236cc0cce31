"""Exact min-p / top-k / top-p filtering that sorts the vocabulary only when it must.

Nucleus sampling is usually written as a full sort of every row, which dominates
the sampler's cost on 150k-token vocabularies. Almost always, though, the kept
set lies among the few most likely tokens, and those come from one
``torch.topk``. The result here equals the sort-everything rule of kvloom's
default sampler:

* min-p is a threshold relative to the top probability, so it needs no sort
  at all and is applied over the whole vocabulary;
* top-k with ``k`` at most the number of candidates reads the k-th largest
  logit from the candidates;
* top-p is decided from the candidates plus the probability mass of all other
  tokens: when that mass alone is at most ``1 - top_p``, none of the other
  tokens can be kept, so the candidates settle the row.

Rows that these tests cannot settle (``k`` beyond the candidates, or a top-p
nucleus that may reach past them, e.g. top_p=0.999 over flat logits) are
sorted in full, and only those rows.
"""

from __future__ import annotations

import torch

NEG_INF = float("-inf")


def mask_below_min_p(logits: torch.Tensor, min_p: torch.Tensor) -> torch.Tensor:
    """Drop tokens less likely than ``min_p`` times the row's most likely token.

    Compared in probability space (not log space) so the boundary matches the
    default sampler: a token exactly at the threshold is kept.
    """
    probs = torch.softmax(logits, dim=-1)
    threshold = probs.max(dim=-1, keepdim=True).values * min_p.unsqueeze(1)
    return torch.where(probs >= threshold, logits, NEG_INF)


def filter_top_k_top_p(logits: torch.Tensor, top_k: torch.Tensor, top_p: torch.Tensor,
                       num_candidates: int) -> torch.Tensor:
    """Top-k then top-p over each row, exactly; -inf marks dropped tokens.

    Args:
        logits: float [n, vocab], already divided by temperature (and min-p'd).
        top_k: int64 [n]; 0 (or >= vocab) is off.
        top_p: float [n]; 1.0 is off.
        num_candidates: how many of the most likely tokens to try first.

    Deciding which rows need the full sort reads one flag back from the device.
    """
    vocab_size = logits.shape[-1]
    k = torch.where((top_k > 0) & (top_k < vocab_size), top_k, 0)
    values, ids = logits.topk(min(num_candidates, vocab_size), dim=-1)
    filtered, settled = _filter_ranked(logits, values, ids, k, top_p)
    settled &= k <= values.shape[1]
    rows = (~settled).nonzero().squeeze(1)
    if rows.numel() > 0:
        row_logits = logits[rows]
        values, ids = row_logits.sort(dim=-1, descending=True)
        filtered[rows] = _filter_ranked(row_logits, values, ids, k[rows], top_p[rows])[0]
    return filtered


def _filter_ranked(logits: torch.Tensor, values: torch.Tensor, ids: torch.Tensor,
                   k: torch.Tensor, top_p: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Filter rows given their most likely tokens, in descending order.

    ``values``/``ids`` are the row's R largest logits (R may be the whole
    vocabulary). Returns the filtered logits and, per row, whether the R tokens
    were enough to decide it (rows with ``k > R`` are the caller's to reject).
    """
    num_ranked = values.shape[1]
    top_k_on = (k > 0).unsqueeze(1)
    kth_largest = values.gather(1, (k.clamp(1, num_ranked) - 1).unsqueeze(1))
    # Ties with the k-th largest logit stay, as in the default sampler.
    logits = logits.masked_fill(top_k_on & (logits < kth_largest), NEG_INF)
    values = values.masked_fill(top_k_on & (values < kth_largest), NEG_INF)

    probs = torch.softmax(logits, dim=-1)
    unranked_mass = probs.scatter(1, ids, 0.0).sum(dim=-1, keepdim=True)
    # The default's rule, walking up from the least likely token: a token goes
    # when it and everything less likely hold at most 1 - top_p of the mass.
    # Summing in that same order keeps float rounding at the boundary alike.
    ascending = torch.cat([unranked_mass, probs.gather(1, ids).flip(1)], dim=1)
    mass_up_to = ascending.cumsum(dim=1)[:, 1:].flip(1)
    limit = (1.0 - top_p).unsqueeze(1)
    drop = mass_up_to <= limit
    drop[:, 0] = False  # the most likely token always stays
    nucleus = torch.full_like(logits, NEG_INF).scatter(1, ids, values.masked_fill(drop, NEG_INF))

    top_p_on = (top_p < 1.0).unsqueeze(1)
    filtered = torch.where(top_p_on, nucleus, logits)
    # With the unranked mass within the limit, even the likeliest unranked token goes.
    settled = ~top_p_on | (unranked_mass <= limit)
    return filtered, settled.squeeze(1)
