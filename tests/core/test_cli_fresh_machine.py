"""The ``kvloom`` command as a new user meets it on a fresh machine.

Mistakes in the command line or an engine.yaml are reported at once (exit 2, one line on
stderr) without loading torch, which takes 12-25 s there; every flag explains itself and
its default in ``--help``; and the README's first command prints only the answer on
stdout, so ``kvloom generate ... > answer.txt`` holds nothing else.
"""

from __future__ import annotations

import argparse
import os
import re
import shlex
import subprocess
import sys
import time
from pathlib import Path

import pytest

from kvloom.entrypoints import cli
from kvloom.entrypoints.cli_generate import (engine_config_from_args, looks_like_path,
                                             sampling_params_from_args)
from kvloom.model_source import MODEL_ALIASES

README = Path(__file__).resolve().parents[2] / "README.md"
HEAVY_MODULES = ("torch", "transformers", "fastapi", "uvicorn", "httpx")
# Runs the CLI in a fresh interpreter, then prints which heavy modules it imported.
PROBE = f"""
import sys
from kvloom.entrypoints.cli import main
try:
    code = main(sys.argv[1:])
except SystemExit as exc:
    code = exc.code
sys.stdout.write(repr([m for m in {HEAVY_MODULES!r} if m in sys.modules]))
sys.exit(code)
"""
# Far above the ~0.3 s these take without torch, far below torch's import on a cold disk.
FAST_SECONDS = 5.0

YAML_CASES = {
    "malformed": ("model: [unclosed\n", "malformed YAML"),
    "unknown_key": ("model: /m\ncache: {blocksize: 8}\n", "cache: unknown key(s) 'blocksize'"),
    "bad_value": ("model: /m\ncache: {block_size: -1}\n", "cache.block_size: "),
    "wrong_type": ("model: /m\nscheduler: {max_num_seqs: two}\n", "scheduler.max_num_seqs: "),
    "missing_model_dir": ("model: ./weights\n", "model path './weights' named in "),
}


def probe_cli(*argv: str, cwd: Path | None = None) -> tuple[subprocess.CompletedProcess, float]:
    env = {k: v for k, v in os.environ.items() if k not in ("KVLOOM_PLUGINS", "KVLOOM_API_KEY")}
    started = time.perf_counter()
    result = subprocess.run([sys.executable, "-c", PROBE, *argv], capture_output=True,
                            text=True, env=env, cwd=cwd, timeout=120)
    return result, time.perf_counter() - started


def assert_fast_one_line_error(argv: list[str], message: str, tmp_path: Path) -> None:
    result, seconds = probe_cli(*argv, cwd=tmp_path)
    assert result.returncode == 2, result.stderr
    assert result.stdout == "[]", f"imported {result.stdout} before the error"
    lines = result.stderr.splitlines()
    assert "Traceback" not in result.stderr
    assert message in lines[-1], result.stderr
    if lines[-1].startswith("kvloom: error: "):  # ours; argparse's come after its usage
        assert len(lines) == 1, result.stderr
    assert seconds < FAST_SECONDS, f"{seconds:.1f} s for {argv}"


@pytest.mark.parametrize("argv, message", [
    (["generate", "hi", "--temperature", "warm"], "argument --temperature: invalid float"),
    (["generate", "hi", "--temprature", "0"], "unrecognized arguments: --temprature"),
    (["generate"], "the following arguments are required: prompts"),
    (["generate", "hi", "--temperature", "-1"], "kvloom: error: temperature must be"),
    (["generate", "hi", "--dtype", "float64"], "kvloom: error: model.dtype: "),
    (["generate", "--model", "/no/such/dir", "hi"], "model path '/no/such/dir' does not exist"),
    (["generate", "--model", "./no-such-dir", "hi"], "model path './no-such-dir' does not"),
    (["generate", "--model", "~/no-such-dir", "hi"], "model path '~/no-such-dir' does not"),
    (["generate", "--model", "missing.gguf", "hi"], "model path 'missing.gguf' does not exist"),
    (["generate", "--model", "models/no/such", "hi"], "model path 'models/no/such' does not"),
    (["generate", "--model", "no-such.yaml", "hi"], "no such engine config file: no-such.yaml"),
    (["chat", "--model", "/no/such/dir"], "model path '/no/such/dir' does not exist"),
    (["chat", "--max-tokens", "0"], "kvloom: error: max_tokens"),
    (["serve", "/no/such/dir"], "model path '/no/such/dir' does not exist"),
    (["serve", "/no/such/dir", "--api-key", ""], "kvloom: error: --api-key is empty"),
    (["serve", "/no/such/dir", "--log-level", "loud"], "argument --log-level: invalid choice"),
    (["serve", "/no/such/dir", "--max-body-bytes", "0"], "--max-body-bytes must be positive"),
    (["bench", "serve", "--num-prompts", "5"], "the following arguments are required: --model"),
    (["bench", "serve", "--model", "m", "--num-prompts", "0"], "--num-prompts must be at least"),
    (["bench", "serve", "--model", "m", "--request-rate", "0"], "--request-rate must be positive"),
    (["bench", "serve", "--model", "m", "--base-url", "localhost:8000"], "--base-url must start"),
])
def test_command_line_mistakes_fail_at_once_without_torch(argv, message, tmp_path):
    assert_fast_one_line_error(argv, message, tmp_path)


@pytest.mark.parametrize("command", [["generate", "--model"], ["chat", "--model"], ["serve"]])
@pytest.mark.parametrize("case", sorted(YAML_CASES))
def test_engine_yaml_mistakes_fail_at_once_without_torch(command, case, tmp_path):
    text, message = YAML_CASES[case]
    config = tmp_path / "engine.yaml"
    config.write_text(text)
    prompt = ["hi"] if command[0] == "generate" else []
    assert_fast_one_line_error([*command, str(config), *prompt], message, tmp_path)


def test_version_and_help_load_no_engine(tmp_path):
    for argv in (["--version"], ["--help"], ["serve", "--help"], ["generate", "--help"]):
        result, seconds = probe_cli(*argv)
        assert result.returncode == 0, result.stderr
        assert result.stdout.endswith("[]"), f"{argv} imported {result.stdout[-80:]}"
        assert seconds < FAST_SECONDS


@pytest.mark.parametrize("model, is_path", [
    ("./my-qwen2", True), ("/models/qwen", True), ("~/models/qwen", True),
    ("model.gguf", True), ("engine.yml", True), ("models/qwen/v1", True),
    ("smollm2-135m", False), ("SmolLM2-135M", False), ("Qwen/Qwen2-0.5B", False),
    ("my-model", False),
])
def test_only_what_can_only_be_a_path_is_called_a_missing_path(model, is_path):
    # A bare name or "org/name" may still be an alias or a hub id: model_source decides.
    assert looks_like_path(model) is is_path


def test_a_home_relative_model_is_found(tiny_qwen2, tmp_path, monkeypatch):
    # `--model=~/m` and a quoted "~/m" reach kvloom with the tilde unexpanded.
    monkeypatch.setenv("HOME", str(tmp_path))
    (tmp_path / "m").symlink_to(tiny_qwen2, target_is_directory=True)
    args = cli.build_parser().parse_args(["generate", "--model", "~/m", "hi"])
    assert engine_config_from_args(args).model.model == str(tmp_path / "m")


def _all_actions():
    for parser in cli._all_parsers(cli.build_parser()):
        for action in parser._actions:
            if not isinstance(action, (argparse._HelpAction, argparse._VersionAction,
                                       argparse._SubParsersAction)):
                yield parser, action


def test_every_flag_has_help_that_names_its_default():
    formatter = cli.DefaultsHelpFormatter(prog="kvloom")
    checked = 0
    for parser, action in _all_actions():
        name = f"{parser.prog} {action.option_strings or action.dest}"
        assert action.help and action.help.strip(), f"{name} has no help"
        assert parser.formatter_class is cli.DefaultsHelpFormatter, parser.prog
        if not action.option_strings or action.required or action.nargs == 0:
            continue  # positionals and required flags have no default; switches are off
        shown = formatter._expand_help(action)
        assert "default" in shown, f"{name}: {shown!r} does not say its default"
        if action.default is not None:
            assert str(action.default) in shown, f"{name}: {shown!r}"
        checked += 1
    assert checked > 40  # generate, chat, serve and bench serve were all walked


@pytest.mark.parametrize("command", [["serve"], ["generate"], ["chat"]])
def test_help_names_the_model_aliases(command, capsys):
    with pytest.raises(SystemExit):
        cli.main([*command, "--help"])
    shown = " ".join(capsys.readouterr().out.split())
    for alias in MODEL_ALIASES:
        assert alias in shown, shown


def test_chat_help_shows_chat_defaults(capsys):
    with pytest.raises(SystemExit):
        cli.main(["chat", "--help"])
    shown = " ".join(capsys.readouterr().out.split())
    assert "most tokens to generate per completion (default: 512)" in shown
    assert "0 is greedy (default: 0.0)" in shown


def test_a_server_from_engine_yaml_is_named_after_the_model_it_names(tiny_qwen2, tmp_path):
    from kvloom.entrypoints.cli_serve import serve_engine_config, served_model_name

    (tmp_path / "weights").symlink_to(tiny_qwen2, target_is_directory=True)
    config_path = tmp_path / "engine.yaml"
    config_path.write_text("model: ./weights\n")
    args = cli.build_parser().parse_args(["serve", str(config_path)])
    config = serve_engine_config(args)
    # The model's path as EngineConfig.from_yaml resolves it, not the file's name.
    assert served_model_name(args, config.model.model) == str(tiny_qwen2.resolve())
    named = cli.build_parser().parse_args(["serve", str(config_path),
                                           "--served-model-name", "mine"])
    assert served_model_name(named, config.model.model) == "mine"


def test_ctrl_c_while_the_model_loads_exits_130_without_traceback(tiny_qwen2, monkeypatch,
                                                                  capsys):
    from kvloom.engine.llm import LLM

    def interrupted(*args, **kwargs):
        raise KeyboardInterrupt

    monkeypatch.setattr(LLM, "from_config", interrupted)
    assert cli.main(["generate", "--model", str(tiny_qwen2), "hi"]) == 130
    captured = capsys.readouterr()
    assert captured.out == "" and captured.err == "kvloom: interrupted\n"


def readme_first_command() -> list[str]:
    """The arguments of the README's first ``kvloom`` command."""
    for line in README.read_text().splitlines():
        match = re.search(r"\bkvloom (generate .*)$", line)
        if match:
            return shlex.split(match.group(1))
    raise AssertionError("the README has no `kvloom generate` command")


def test_the_readme_command_prints_only_the_answers_on_stdout(tiny_qwen2):
    from kvloom import LLM

    # The README's command (its prompt comes last), a second prompt, and the tiny model.
    argv = [*readme_first_command(), "Hello", "--model", str(tiny_qwen2)]
    args = cli.build_parser().parse_args(argv)
    prompts, params = args.prompts, sampling_params_from_args(args)
    assert len(prompts) == 2, prompts
    expected = [output.outputs[0].text for output in LLM(str(tiny_qwen2)).generate(prompts,
                                                                                     params)]
    # Every log, warning and progress line that can appear, to see where they go.
    env = {k: v for k, v in os.environ.items() if k != "KVLOOM_PLUGINS"}
    env.update(PYTHONIOENCODING="utf-8", PYTHONWARNINGS="always",
               TRANSFORMERS_VERBOSITY="info")
    result = subprocess.run([sys.executable, "-m", "kvloom.entrypoints.cli", *argv],
                            capture_output=True, env=env, timeout=300)
    stderr = result.stderr.decode("utf-8", "replace")
    assert result.returncode == 0, stderr[-2000:]
    assert result.stdout.decode("utf-8") == "".join(text + "\n" for text in expected)
    assert "[transformers]" in stderr  # the logs were there, and went to stderr
