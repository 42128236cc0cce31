"""Turning request prompts and chat messages into token ids (off the event loop)."""

from __future__ import annotations

import asyncio
import logging
from typing import Any

from kvloom.entrypoints.openai import protocol as p
from kvloom.entrypoints.openai.errors import APIError
from kvloom.entrypoints.openai.state import ServerState
from kvloom.entrypoints.openai.validation import (check_prompt_text, check_vocab,
                                                  require_tokenizer)

logger = logging.getLogger(__name__)


async def completion_prompt(state: ServerState, prompt: Any) -> tuple[str | None, list[int]]:
    """(text, token ids) of a completion prompt; one prompt per request for now."""
    if isinstance(prompt, list) and len(prompt) == 1 and isinstance(prompt[0], (str, list)):
        prompt = prompt[0]
    if isinstance(prompt, str):
        if not prompt:
            raise APIError(400, "prompt must not be empty", param="prompt")
        tokenizer = require_tokenizer(state)
        check_prompt_text(state, len(prompt), "prompt")  # before tokenizing megabytes
        token_ids = await asyncio.to_thread(tokenizer.encode, prompt)
        return prompt, list(token_ids)
    if isinstance(prompt, list) and all(isinstance(t, int) for t in prompt):
        check_vocab(state, prompt, "prompt")
        return None, list(prompt)
    raise APIError(400, "prompt must be a string or a list of token ids; batched prompts "
                        "are not supported yet", param="prompt")


async def render_chat(state: ServerState, messages: list[p.ChatMessage],
                      add_generation_prompt: bool) -> list[int]:
    tokenizer = require_tokenizer(state)
    conversation = [{"role": m.role, "content": _message_text(m)} for m in messages]
    # The rendered prompt holds every message's text: refuse before rendering and
    # tokenizing what could never fit.
    check_prompt_text(state, sum(len(m["content"]) for m in conversation), "messages")

    def render() -> list[int]:
        token_ids = tokenizer.apply_chat_template(conversation, tokenize=True,
                                                  add_generation_prompt=add_generation_prompt)
        if hasattr(token_ids, "keys"):
            token_ids = token_ids["input_ids"]  # transformers 5 returns a BatchEncoding
        return list(token_ids)

    try:
        return await asyncio.to_thread(render)
    except Exception as exc:
        logger.info("chat template failed: %s", type(exc).__name__)
        raise APIError(400, f"the chat template could not render messages "
                            f"({type(exc).__name__})", param="messages") from None


def _message_text(message: p.ChatMessage) -> str:
    if message.content is None:
        return ""
    if isinstance(message.content, str):
        return message.content
    return "".join(part.text for part in message.content)
