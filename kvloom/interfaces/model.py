"""What a model architecture plugin implements."""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any, Iterable, Protocol

import torch

from kvloom.interfaces.attention import AttentionBackend
from kvloom.interfaces.parallel import SingleRank, TensorParallelGroup


@dataclass(slots=True)
class ModelContext:
    """What a model needs from the engine at construction time.

    Attributes:
        parallel: the tensor-parallel group the model is built in (added in API 1.1).
            With ``size > 1`` the model holds only this rank's slice of every sharded
            weight (heads, MLP columns, vocabulary), loads only that slice from the
            full checkpoint tensors, and reduces or gathers through the group; its
            ``attention_spec()`` then describes this rank's heads.
    """

    attention_backend: AttentionBackend
    dtype: torch.dtype
    device: torch.device
    block_size: int
    parallel: TensorParallelGroup = field(default_factory=SingleRank)


class CausalLM(Protocol):
    """A decoder-only language model over a paged KV cache.

    Implementations are ``torch.nn.Module`` subclasses built by
    ``factory(hf_config, context)``. They take attention metadata and KV caches
    as arguments: there is no global forward context.
    """

    def forward(
        self,
        input_ids: torch.Tensor,
        positions: torch.Tensor,
        kv_caches: list[torch.Tensor],
        attn_metadata: Any,
    ) -> torch.Tensor:
        """Hidden states [num_tokens, hidden_size] for a flattened batch."""

    def compute_logits(self, hidden_states: torch.Tensor) -> torch.Tensor:
        """Logits [n, vocab_size] for the rows that are sampled."""

    def load_weights(self, weights: Iterable[tuple[str, torch.Tensor]]) -> set[str]:
        """Consume checkpoint tensors named as in the HF checkpoint; return the names used."""

    def attention_spec(self) -> Any:
        """The :class:`AttentionSpec` without block_size/device (see ModelContext)."""

    def num_attention_layers(self) -> int:
        """How many KV caches the model needs."""

    # Optional, for EAGLE-3 drafters:
    #   set_aux_hidden_state_layers(layers: tuple[int, ...]) -> None
    # makes forward return (hidden_states, aux), aux holding the input of each
    # listed decoder layer (residual stream) as [num_tokens, hidden] tensors.
