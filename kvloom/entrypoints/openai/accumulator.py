"""Folding the engine's DELTA outputs into per-choice state, for streaming and collecting."""

from __future__ import annotations

from dataclasses import dataclass, field

from kvloom.entrypoints.openai import protocol as p
from kvloom.outputs import PositionLogprobs, RequestOutput


@dataclass
class ChoiceState:
    """One choice's text and token count so far, and whether it has ended."""

    texts: list[str] = field(default_factory=list)
    num_tokens: int = 0
    num_chars: int = 0
    logprobs: list[tuple[int, PositionLogprobs]] = field(default_factory=list)
    finish_reason: str | None = None
    stop_reason: int | str | None = None


@dataclass
class Delta:
    index: int
    text: str
    logprobs: list[tuple[int, PositionLogprobs]]
    finish_reason: str | None
    stop_reason: int | str | None
    char_offset: int


class Accumulator:
    """Folds DELTA RequestOutputs into per-choice state; reports what is new."""

    def __init__(self, n: int) -> None:
        self.choices = [ChoiceState() for _ in range(n)]
        self.num_prompt_tokens = 0

    def add(self, output: RequestOutput) -> list[Delta]:
        self.num_prompt_tokens = len(output.prompt_token_ids)
        deltas = []
        for completion in output.outputs:
            choice = self.choices[completion.index]
            if choice.finish_reason is not None:
                continue
            new_logprobs = list(zip(completion.token_ids, completion.logprobs or ()))
            offset = choice.num_chars
            choice.texts.append(completion.text)
            choice.num_chars += len(completion.text)
            choice.num_tokens += len(completion.token_ids)
            choice.logprobs.extend(new_logprobs)
            if completion.finish_reason is not None:
                choice.finish_reason = _finish_reason(completion.finish_reason)
                choice.stop_reason = completion.stop_reason
            # Every step's tokens make a chunk, even when they decode to no text yet
            # (a split multi-byte character, a held-back stop string, no tokenizer):
            # clients and load generators time tokens by chunks.
            if (completion.token_ids or completion.text or new_logprobs
                    or choice.finish_reason is not None):
                deltas.append(Delta(completion.index, completion.text, new_logprobs,
                                    choice.finish_reason, choice.stop_reason, offset))
        return deltas

    def usage(self) -> p.UsageInfo:
        num_generated = sum(choice.num_tokens for choice in self.choices)
        return p.UsageInfo(prompt_tokens=self.num_prompt_tokens, completion_tokens=num_generated,
                           total_tokens=self.num_prompt_tokens + num_generated)


def _finish_reason(reason: str) -> str:
    return reason if reason in ("stop", "length") else "stop"
