"""The ``ngram`` drafter: prompt lookup in the request's own tokens.

Finds the longest suffix of the token history (between ``prompt_lookup_min``
and ``prompt_lookup_max`` tokens) that occurred earlier, and proposes the
tokens that followed its most recent earlier occurrence. No model, no
device work: it pays off when the output copies the prompt (code edits,
summaries quoting their source, RAG answers) or repeats itself.
"""

from __future__ import annotations

import numpy as np

from kvloom.hookspecs import hookimpl
from kvloom.interfaces.drafter import Drafter, DraftInputs

KVLOOM_PLUGIN_API = ">=1.0,<2"  # the kvloom plugin API versions this module supports

# As vLLM: with neither bound set, both are 5.
DEFAULT_LOOKUP = 5


@hookimpl
def register_drafters(register):
    register("ngram", NgramDrafter)


class NgramDrafter(Drafter):
    name = "ngram"

    def __init__(self, speculative_config, context=None) -> None:
        low, high = speculative_config.prompt_lookup_min, speculative_config.prompt_lookup_max
        if low is None and high is None:
            low = high = DEFAULT_LOOKUP
        self.min_n = low if low is not None else min(high, DEFAULT_LOOKUP)
        self.max_n = high if high is not None else max(low, DEFAULT_LOOKUP)
        self.num_speculative_tokens = speculative_config.num_speculative_tokens

    def propose(self, inputs: DraftInputs) -> list[list[int]]:
        return [propose_from_history(tokens, limit, self.min_n, self.max_n) if limit else []
                for tokens, limit in zip(inputs.token_ids, inputs.max_num_drafts)]


def propose_from_history(token_ids: list[int], num_drafts: int, min_n: int,
                         max_n: int) -> list[int]:
    """Up to ``num_drafts`` tokens that followed an earlier occurrence of the longest
    matching suffix (``min_n`` to ``max_n`` tokens long): the latest occurrence
    that is followed by ``num_drafts`` tokens, else the earliest (in a tight loop
    the latest one overlaps the suffix and is followed by too few)."""
    length = len(token_ids)
    if length <= min_n:
        return []
    tokens = np.asarray(token_ids, dtype=np.int64)
    for n in range(min(max_n, length - 1), min_n - 1, -1):
        starts = _earlier_matches(tokens, n)
        if len(starts):
            roomy = starts[starts + n + num_drafts <= length]
            follow = int(roomy[-1] if len(roomy) else starts[0]) + n
            return token_ids[follow:follow + num_drafts]
    return []


def _earlier_matches(tokens: np.ndarray, n: int) -> np.ndarray:
    """Starts of the n-grams before the final one that equal the final one."""
    suffix = tokens[-n:]
    # Windows starting at 0 .. len - n - 1: every n-gram except the suffix itself.
    windows = np.lib.stride_tricks.sliding_window_view(tokens[:-1], n)
    return np.flatnonzero((windows == suffix).all(axis=1))
