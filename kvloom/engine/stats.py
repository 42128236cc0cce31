"""A snapshot of engine state, passed to ``on_engine_step`` hooks and metrics."""

from __future__ import annotations

from dataclasses import dataclass


@dataclass(slots=True)
class EngineStats:
    num_running: int
    num_waiting: int
    kv_cache_usage: float
    num_free_blocks: int
    num_total_blocks: int
    prefix_cache_queried_tokens: int
    prefix_cache_hit_tokens: int
    num_preemptions: int
    num_scheduled_tokens: int = 0
    # Speculative decoding, since start: rows verified with drafts, draft tokens,
    # accepted draft tokens.
    spec_num_drafts: int = 0
    spec_num_draft_tokens: int = 0
    spec_num_accepted_tokens: int = 0

    @property
    def prefix_cache_hit_rate(self) -> float:
        queried = self.prefix_cache_queried_tokens
        return self.prefix_cache_hit_tokens / queried if queried else 0.0

    @property
    def spec_acceptance_rate(self) -> float:
        """Accepted draft tokens / draft tokens."""
        drafted = self.spec_num_draft_tokens
        return self.spec_num_accepted_tokens / drafted if drafted else 0.0

    @property
    def spec_mean_accepted_length(self) -> float:
        """Tokens per verified row: accepted drafts plus the target's own token."""
        rows = self.spec_num_drafts
        return 1.0 + self.spec_num_accepted_tokens / rows if rows else 0.0
