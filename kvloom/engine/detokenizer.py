"""Incremental detokenization: text grows as tokens arrive, multi-byte characters intact."""

from __future__ import annotations

from typing import Any

# Prompt tokens fed to the decoder first, so the first output token is decoded
# in context (a leading space is kept, as in the full decode). If the last few
# prompt tokens end inside a multi-byte character, a longer suffix is tried.
NUM_CONTEXT_TOKENS = 6
MAX_CONTEXT_TOKENS = 24


class IncrementalDetokenizer:
    """Wraps the tokenizers library's DecodeStream for one sequence."""

    def __init__(self, tokenizer: Any, prompt_token_ids: list[int], skip_special_tokens: bool):
        self.tokenizer = tokenizer
        self.skip_special_tokens = skip_special_tokens
        self.stream = None
        self.output_token_ids: list[int] = []
        self.text = ""
        backend = getattr(tokenizer, "backend_tokenizer", None)
        if backend is not None:
            from tokenizers.decoders import DecodeStream

            self.backend = backend
            context = self._clean_context(prompt_token_ids)
            try:
                self.stream = DecodeStream(ids=context, skip_special_tokens=skip_special_tokens)
            except TypeError:  # tokenizers < 0.21.1 has no prefill argument
                self.stream = DecodeStream(skip_special_tokens=skip_special_tokens)

    def _clean_context(self, prompt_token_ids: list[int]) -> list[int]:
        """The shortest prompt suffix (of at least NUM_CONTEXT_TOKENS) that decodes to
        complete characters, or no context at all.

        DecodeStream only takes a prefill whose text does not end in an incomplete
        character as its prefix; otherwise its first step returns the prefill's text
        too, and the prompt's tail would leak into the output.
        """
        longest = min(len(prompt_token_ids), MAX_CONTEXT_TOKENS)
        for length in range(min(NUM_CONTEXT_TOKENS, longest), longest + 1):
            context = prompt_token_ids[-length:]
            text = self.tokenizer.decode(context, skip_special_tokens=self.skip_special_tokens)
            if not text.endswith("\ufffd"):
                return context
        return []

    def add_tokens(self, token_ids: list[int]) -> str:
        """Feed new tokens; returns the text they completed (possibly empty)."""
        self.output_token_ids.extend(token_ids)
        if self.stream is None:
            return self._add_by_full_decode()
        pieces = [self.stream.step(self.backend, token_id) for token_id in token_ids]
        new_text = "".join(piece for piece in pieces if piece)
        self.text += new_text
        return new_text

    def _add_by_full_decode(self) -> str:
        # Slow tokenizers: decode everything and keep the new suffix.
        text = self.tokenizer.decode(self.output_token_ids,
                                     skip_special_tokens=self.skip_special_tokens)
        if text.endswith("\ufffd"):  # wait for the rest of a multi-byte character
            return ""
        new_text = text[len(self.text):] if text.startswith(self.text) else text
        self.text = text
        return new_text
