"""``kvloom generate [--model PATH_OR_YAML_OR_ALIAS] "prompt" ...``."""

from __future__ import annotations

import argparse
from pathlib import Path

_SAMPLING_FLAGS = {
    "n": int, "temperature": float, "top_p": float, "top_k": int, "min_p": float,
    "presence_penalty": float, "frequency_penalty": float, "repetition_penalty": float,
    "seed": int, "max_tokens": int, "min_tokens": int, "logprobs": int,
}


def add_generate_parser(commands) -> None:
    parser = commands.add_parser("generate", help="generate text for one or more prompts")
    parser.add_argument("prompts", nargs="+", help="prompt text(s)")
    add_model_flags(parser)
    parser.add_argument("--chat", action="store_true",
                        help="wrap each prompt as a user message through the chat template")
    add_sampling_flags(parser)
    parser.set_defaults(handler=run_generate)


def add_model_flags(parser: argparse.ArgumentParser) -> None:
    from kvloom.model_source import DEFAULT_MODEL, MODEL_ALIASES

    parser.add_argument("--model", default=DEFAULT_MODEL,
                        help="an HF model directory, a .gguf file, an engine.yaml, a hub id, "
                             f"or an alias ({', '.join(MODEL_ALIASES)}; default "
                             f"{DEFAULT_MODEL})")
    parser.add_argument("--dtype", default=None)
    parser.add_argument("--attention", default=None)
    parser.add_argument("--platform", default=None)
    parser.add_argument("--max-model-len", type=int, default=None)
    parser.add_argument("--load-format", default=None)


def add_sampling_flags(parser: argparse.ArgumentParser) -> None:
    for name, kind in _SAMPLING_FLAGS.items():
        parser.add_argument(f"--{name.replace('_', '-')}", type=kind, default=None, dest=name)
    parser.add_argument("--stop", action="append", default=None, help="stop string (repeatable)")
    parser.add_argument("--stop-token-ids", type=int, nargs="+", default=None)
    parser.add_argument("--ignore-eos", action="store_true")


def engine_overrides(args: argparse.Namespace) -> dict:
    overrides = {"dtype": args.dtype, "attention": args.attention, "platform": args.platform,
                 "max_model_len": args.max_model_len, "load_format": args.load_format}
    return {key: value for key, value in overrides.items() if value is not None}


def sampling_params_from_args(args: argparse.Namespace):
    from kvloom.sampling_params import SamplingParams

    values = {name: getattr(args, name) for name in _SAMPLING_FLAGS
              if getattr(args, name) is not None}
    values.update(stop=args.stop, stop_token_ids=args.stop_token_ids, ignore_eos=args.ignore_eos)
    return SamplingParams(**values)


def engine_config_from_args(args: argparse.Namespace):
    """An engine.yaml (with flags overriding its model section) or a model path plus flags."""
    from kvloom.config import EngineConfig
    from kvloom.engine.llm import engine_config_from_kwargs

    path = Path(args.model)
    if path.suffix in (".yaml", ".yml"):
        if not path.is_file():
            raise FileNotFoundError(f"no such engine config file: {path}")
        config = EngineConfig.from_yaml(path)
        overrides = engine_overrides(args)
        model_keys = set(type(config.model).model_fields)
        config.model = config.model.model_copy(
            update={k: v for k, v in overrides.items() if k in model_keys})
        for key in ("attention", "platform"):
            if key in overrides:
                setattr(config, key, overrides[key])
        return EngineConfig.model_validate(config.model_dump())
    return engine_config_from_kwargs(args.model, **engine_overrides(args))


def run_generate(args: argparse.Namespace) -> int:
    from kvloom.engine.llm import LLM

    params = sampling_params_from_args(args)
    llm = LLM.from_config(engine_config_from_args(args))
    if args.chat:
        outputs = llm.chat([[{"role": "user", "content": p}] for p in args.prompts], params)
    else:
        outputs = llm.generate(args.prompts, params)
    for output in outputs:
        for completion in output.outputs:
            print(completion.text)
    return 0
