"""``kvloom chat``: an interactive conversation in the terminal, replies streamed as they come."""

from __future__ import annotations

import argparse
import dataclasses
import itertools
import sys

from kvloom.entrypoints.cli_generate import (add_model_flags, add_sampling_flags,
                                             engine_config_from_args, sampling_params_from_args)


def add_chat_parser(commands) -> None:
    parser = commands.add_parser("chat", help="chat with a model in the terminal")
    add_model_flags(parser)
    parser.add_argument("--system", default=None,
                        help="a system message to start with (default: none)")
    # Replies are conversation-length and deterministic unless asked otherwise.
    add_sampling_flags(parser, defaults={"max_tokens": 512, "temperature": 0.0})
    parser.set_defaults(handler=run_chat)


def run_chat(args: argparse.Namespace) -> int:
    from kvloom.sampling_params import RequestOutputKind

    params = dataclasses.replace(sampling_params_from_args(args),
                                 output_kind=RequestOutputKind.DELTA)
    config = engine_config_from_args(args)
    from kvloom.engine.engine import Engine  # torch: only once the arguments are known good

    engine = Engine.from_config(config)
    if engine.tokenizer is None:
        raise ValueError("chat needs a tokenizer; this model has none")
    messages = [{"role": "system", "content": args.system}] if args.system else []
    print("kvloom chat: type a message; an empty line, Ctrl-D or Ctrl-C ends "
          "(Ctrl-C during a reply stops the reply).", file=sys.stderr)
    for turn in itertools.count():
        try:
            line = input("> ")
        except (EOFError, KeyboardInterrupt):
            print(file=sys.stderr)  # end the prompt's line
            break
        if not line.strip():
            break
        messages.append({"role": "user", "content": line})
        reply = stream_reply(engine, messages, params, f"chat-{turn}")
        messages.append({"role": "assistant", "content": reply})
    return 0


def stream_reply(engine, messages: list[dict], params, request_id: str) -> str:
    """Generate one reply, printing each piece as it is produced; returns the whole text."""
    token_ids = engine.tokenizer.apply_chat_template(messages, add_generation_prompt=True,
                                                     tokenize=True)
    if hasattr(token_ids, "keys"):
        token_ids = token_ids["input_ids"]  # transformers 5 returns a BatchEncoding
    engine.add_request(request_id, {"prompt_token_ids": list(token_ids)}, params)
    pieces = []
    try:
        while engine.has_unfinished_requests():
            for output in engine.step():
                piece = output.outputs[0].text
                pieces.append(piece)
                print(piece, end="", flush=True)
    except KeyboardInterrupt:  # stop this reply (keeping what came) and go back to the prompt
        engine.abort_request(request_id)
        print(" [interrupted]", end="", file=sys.stderr)
    print()
    return "".join(pieces)
