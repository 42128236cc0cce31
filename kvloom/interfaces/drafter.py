"""What a speculative-decoding drafter plugin implements.

After each step, the engine asks the drafter for up to k tokens per running
request; the next step runs them through the target model together with the
request's last token, and the core's rejection sampler keeps the drafts the
target agrees with (plus one token of the target's own), so the output
distribution is exactly the target's.

Two kinds of drafter fit this contract:

* Token-history drafters (n-gram prompt lookup) read ``DraftInputs.token_ids``.
* Model-based drafters (EAGLE) set ``uses_target_hidden_states`` and read
  ``DraftInputs.target``: the step's tokens, the target's hidden states, and
  the attention layout, so they can run their own layers over the same paged
  KV blocks (in their own cache tensors, which the engine allocates after
  asking ``kv_cache_layers()``).
"""

from __future__ import annotations

from abc import ABC, abstractmethod
from dataclasses import dataclass
from typing import Any

import numpy as np
import torch

from kvloom.interfaces.attention import AttentionBackend, AttentionInputs, AttentionSpec


@dataclass(slots=True)
class DrafterContext:
    """What a drafter is built with: ``factory(speculative_config, context)``.

    Attributes:
        target_model: the target ``CausalLM`` module (EAGLE shares its token
            embeddings and lm_head when the draft checkpoint has none).
        target_hf_config: the target's HF config.
        attention_backend: the engine's attention backend; build the drafter's
            attention layers with it (``make_impl``) and its metadata with
            ``build_metadata``.
        dtype / device / block_size / max_model_len: as the engine runs.
    """

    target_model: Any
    target_hf_config: Any
    attention_backend: AttentionBackend
    dtype: torch.dtype
    device: torch.device
    block_size: int
    max_model_len: int


@dataclass(slots=True)
class TargetStep:
    """The target model's forward pass of the step that was just verified.

    The step's batch is flat: row ``r`` of the scheduled batch owns tokens
    ``query_start_loc[r]:query_start_loc[r + 1]``, at positions
    ``positions[...]``, written to KV slots ``attention.slot_mapping[...]``.
    Every row is here, also rows that do not draft (a prompt chunk that does
    not finish its prompt), because a model-based drafter must write its own
    KV for every position the target computed.

    Attributes:
        input_ids / positions: int64 [num_tokens] on the device.
        hidden_states: [num_tokens, hidden] on the device, what the target's
            lm_head reads (after its final norm).
        aux_hidden_states: one [num_tokens, hidden] tensor per layer index the
            drafter listed in ``aux_hidden_state_layers``: the input of that
            decoder layer (residual stream, before its norm), in that order.
        attention: the layout the target ran with.
        query_start_loc: int [num_rows + 1] on the host.
        num_kept_tokens: int [num_rows] on the host: how many of the row's
            tokens this step stay in the sequence (drafts the target rejected
            are dropped; their KV slots get overwritten later).
        next_token_ids: int64 [num_rows] on the device: the token that follows
            each row's last kept token (the token just sampled, or for a
            prompt chunk the next prompt token).
        draft_rows: int [len(DraftInputs.request_ids)] on the host: the row of
            this batch each drafting request is.
        block_size: tokens per KV block.
    """

    input_ids: torch.Tensor
    positions: torch.Tensor
    hidden_states: torch.Tensor
    aux_hidden_states: tuple[torch.Tensor, ...]
    attention: AttentionInputs
    query_start_loc: np.ndarray
    num_kept_tokens: np.ndarray
    next_token_ids: torch.Tensor
    draft_rows: np.ndarray
    block_size: int


@dataclass(slots=True)
class DraftInputs:
    """The batch a drafter proposes for.

    Attributes:
        request_ids: one per drafting request.
        token_ids: each request's full token history (prompt + output,
            including the tokens this step produced), read-only.
        max_num_drafts: per request, the most tokens it may propose (respects
            ``num_speculative_tokens``, ``max_tokens`` and ``max_model_len``);
            may be 0.
        target: the step's target forward pass, for drafters that set
            ``uses_target_hidden_states``; None otherwise.
    """

    request_ids: list[str]
    token_ids: list[list[int]]
    max_num_drafts: list[int]
    target: TargetStep | None = None


class Drafter(ABC):
    """Proposes up to k tokens per request for the target model to verify.

    Example (a drafter that always guesses the last token repeats)::

        class RepeatDrafter(Drafter):
            name = "repeat"

            def __init__(self, speculative_config, context):
                self.k = speculative_config.num_speculative_tokens

            def propose(self, inputs):
                return [[ids[-1]] * limit for ids, limit
                        in zip(inputs.token_ids, inputs.max_num_drafts)]
    """

    name: str = "unnamed"
    # Model-based drafters: they get DraftInputs.target, KV caches of their own,
    # and the scheduler reserves KV slots for the positions they draft at.
    uses_target_hidden_states: bool = False
    # Target decoder layers whose inputs the drafter reads (EAGLE-3).
    aux_hidden_state_layers: tuple[int, ...] = ()

    def kv_cache_layers(self) -> list[AttentionSpec]:
        """One AttentionSpec (block size and device filled in by the engine) per
        KV cache the drafter's own attention layers need; none by default."""
        return []

    def initialize_kv_caches(self, kv_caches: list[torch.Tensor]) -> None:
        """The caches asked for by ``kv_cache_layers``, sharing the target's block ids."""

    @abstractmethod
    def propose(self, inputs: DraftInputs) -> list[list[int]]:
        """Draft tokens per request; request i gets at most ``inputs.max_num_drafts[i]``."""
