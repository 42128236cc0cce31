"""EAGLE-1 / EAGLE-3 speculative decoding: a small draft head over the target's hidden states.

``speculative: {method: eagle, model: <draft checkpoint dir>, num_speculative_tokens: k}``
picks the format from the checkpoint; ``method: eagle3`` insists on EAGLE-3.
Without a draft model (or with ``load_format: dummy``) the head gets random
weights and the target's dimensions, for speed work.

Each step the head first re-reads everything the target just computed (so its
own KV cache covers every position the target's does), then drafts greedily,
one token per drafting request per pass.
"""

from __future__ import annotations

from typing import Any

import numpy as np
import torch

from kvloom.hookspecs import hookimpl
from kvloom.interfaces.attention import AttentionSpec
from kvloom.interfaces.drafter import DraftInputs, Drafter, DrafterContext, TargetStep

KVLOOM_PLUGIN_API = ">=1.0,<2"  # the kvloom plugin API versions this module supports


@hookimpl
def register_drafters(register):
    register("eagle", make_eagle, tiny_speculative_config=tiny_draft_settings(version=1))
    register("eagle3", make_eagle3, tiny_speculative_config=tiny_draft_settings(version=3))


def tiny_draft_settings(version: int):
    """For the conformance suite: ``speculative:`` settings with a tiny random EAGLE
    draft checkpoint for its tiny target."""
    def settings(target_dir, work_dir) -> dict:
        import json

        from kvloom.testing.checkpoints import TinyEagleSpec, make_eagle_checkpoint

        # Tiny targets are too shallow for EAGLE-3's default aux layers (2, L/2, L-3).
        num_layers = json.loads((target_dir / "config.json").read_text())["num_hidden_layers"]
        aux = (0, num_layers // 2, num_layers - 1) if version == 3 else None
        spec = TinyEagleSpec(version=version, aux_layer_ids=aux)
        draft = make_eagle_checkpoint(work_dir / f"eagle{version}", target_dir, spec)
        return {"model": str(draft)}
    return settings


def make_eagle(speculative_config: Any, context: DrafterContext) -> "EagleDrafter":
    """EAGLE-1 or EAGLE-3, as the draft checkpoint says."""
    return EagleDrafter(speculative_config, context, force_eagle3=False)


def make_eagle3(speculative_config: Any, context: DrafterContext) -> "EagleDrafter":
    return EagleDrafter(speculative_config, context, force_eagle3=True)


class EagleDrafter(Drafter):
    """Greedy EAGLE drafting over the engine's paged KV layout."""

    uses_target_hidden_states = True

    def __init__(self, speculative_config: Any, context: DrafterContext,
                 force_eagle3: bool = False) -> None:
        from kvloom.plugins.spec_decode.eagle_checkpoint import build_eagle_head

        self.head = build_eagle_head(speculative_config, context, force_eagle3)
        self.name = "eagle3" if self.head.eagle_version == 3 else "eagle"
        self.aux_hidden_state_layers = self.head.aux_hidden_state_layers
        self.attention_backend = context.attention_backend
        self.kv_caches: list[torch.Tensor] = []

    def kv_cache_layers(self) -> list[AttentionSpec]:
        return self.head.attention_specs()

    def initialize_kv_caches(self, kv_caches: list[torch.Tensor]) -> None:
        expected = len(self.head.attention_specs())
        if len(kv_caches) != expected:
            raise ValueError(f"the EAGLE head needs {expected} KV caches, got {len(kv_caches)}")
        self.kv_caches = list(kv_caches)

    @torch.inference_mode()
    def propose(self, inputs: DraftInputs) -> list[list[int]]:
        from kvloom.plugins.spec_decode.eagle_batch import KeptTokens

        step = inputs.target
        if step is None:
            raise ValueError("EAGLE drafts from the target's hidden states: "
                             "DraftInputs.target is missing")
        if not self.kv_caches:
            raise RuntimeError("initialize_kv_caches() was not called on the EAGLE drafter")
        kept = KeptTokens.of(step)
        hidden = self._read_target_step(step, kept)
        limits = np.asarray(inputs.max_num_drafts, dtype=np.int64)
        if not len(limits) or limits.max() == 0:
            return [[] for _ in limits]
        rows = np.asarray(step.draft_rows, dtype=np.int64)
        drafted = self._draft(step, hidden[torch.from_numpy(kept.index[rows]).to(hidden.device)],
                              rows, kept.position[rows], limits)
        return [tokens[:limit] for tokens, limit in zip(drafted.tolist(), limits.tolist())]

    def _read_target_step(self, step: TargetStep, kept) -> torch.Tensor:
        """Run the head over every position the target computed, at the target's slots;
        returns the head's output hidden state for each."""
        from kvloom.plugins.spec_decode.eagle_batch import shifted_input_ids

        metadata = self.attention_backend.build_metadata(step.attention)
        return self.head(shifted_input_ids(step, kept), step.positions,
                         self.head.target_hidden(step), self.kv_caches, metadata)

    def _draft(self, step: TargetStep, hidden: torch.Tensor, rows: np.ndarray,
               last_positions: np.ndarray, limits: np.ndarray) -> torch.Tensor:
        """Greedy drafts [num_requests, max(limits)]; row i is valid up to limits[i].

        Pass s feeds draft token s at position last_position + s. A request drops
        out once it has its limit, so nothing is written past the slots it has.
        """
        from kvloom.plugins.spec_decode.eagle_batch import decode_batch

        device = hidden.device
        tokens = self.head.draft_token_ids(hidden)
        drafted = torch.zeros((len(rows), int(limits.max())), dtype=torch.int64, device=device)
        drafted[:, 0] = tokens
        active = np.arange(len(rows))
        for s in range(1, drafted.shape[1]):
            still = np.flatnonzero(limits[active] > s)
            if len(still) < len(active):
                index = torch.from_numpy(still).to(device, non_blocking=True)
                hidden, tokens, active = hidden[index], tokens[index], active[still]
            batch = decode_batch(step.attention, rows[active], last_positions[active] + s,
                                 step.block_size, device)
            metadata = self.attention_backend.build_metadata(batch.attention)
            hidden = self.head(tokens, batch.positions, hidden, self.kv_caches, metadata)
            tokens = self.head.draft_token_ids(hidden)
            drafted[torch.from_numpy(active).to(device, non_blocking=True), s] = tokens
        return drafted
