"""What a model loader plugin implements: config, tokenizer and weights for a model."""

from __future__ import annotations

from abc import ABC, abstractmethod
from typing import Any

import torch


class ModelLoader(ABC):
    """Loads a model's HF config, tokenizer and weights.

    The default ``load_hf_config`` / ``load_tokenizer`` read a Hugging Face
    directory with transformers; loaders for other formats override them.
    """

    name: str = "unnamed"

    def validate(self, model_config: Any) -> list[str]:
        """Reasons this loader cannot load ``model_config.model``; empty when it can."""
        return []

    def load_hf_config(self, model_config: Any) -> Any:
        from transformers import AutoConfig

        return AutoConfig.from_pretrained(
            model_config.model,
            trust_remote_code=model_config.trust_remote_code,
            revision=model_config.revision,
        )

    def load_tokenizer(self, model_config: Any) -> Any:
        from transformers import AutoTokenizer

        return AutoTokenizer.from_pretrained(
            model_config.tokenizer or model_config.model,
            trust_remote_code=model_config.trust_remote_code,
            revision=model_config.revision,
        )

    @abstractmethod
    def load_weights(self, model: torch.nn.Module, model_config: Any) -> None:
        """Fill ``model``'s parameters in place."""
