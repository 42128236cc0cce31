"""The ``kvloom`` command: ``plugins`` and ``generate``."""

from __future__ import annotations

import importlib.metadata
import os
import re
import subprocess
import sys

import pytest

from kvloom import LLM, SamplingParams
from kvloom.entrypoints import cli

PROMPTS = ["Hello", "The quick"]


def run_cli(*args: str, env_update: dict[str, str] | None = None) -> subprocess.CompletedProcess:
    env = {k: v for k, v in os.environ.items() if k != "KVLOOM_PLUGINS"}
    env.update(PYTHONIOENCODING="utf-8", **(env_update or {}))
    return subprocess.run([sys.executable, "-m", "kvloom.entrypoints.cli", *args],
                          capture_output=True, env=env, timeout=300)


def decoded(stream: bytes) -> str:
    return stream.decode("utf-8")


@pytest.fixture(scope="module")
def expected_texts(tiny_qwen2):
    """Greedy text of PROMPTS from the Python API with default settings, as the CLI runs."""
    llm = LLM(str(tiny_qwen2))
    outputs = llm.generate(PROMPTS, SamplingParams(max_tokens=5, temperature=0.0))
    texts = [output.outputs[0].text for output in outputs]
    assert all(texts), texts  # an empty text would make the comparisons meaningless
    return texts


def test_console_script_is_declared():
    scripts = {ep.name: ep.value
               for ep in importlib.metadata.distribution("kvloom").entry_points
               if ep.group == "console_scripts"}
    assert scripts["kvloom"] == "kvloom.entrypoints.cli:main"


def test_plugins_lists_every_builtin():
    result = run_cli("plugins")
    out = decoded(result.stdout)
    assert result.returncode == 0, decoded(result.stderr)
    table, machine = out.split("\n\n")
    header, *lines = table.splitlines()
    columns = header.split()
    assert columns == ["KIND", "NAME", "PLUGIN", "MODULE", "DISTRIBUTION", "VERSION", "API",
                       "STATUS"]
    rows = [dict(zip(columns, re.split(r"\s{2,}", line.strip()))) for line in lines]
    version = importlib.metadata.version("kvloom")
    builtins = {ep.name: ep.value for ep in importlib.metadata.distribution("kvloom").entry_points
                if ep.group == "kvloom"}
    assert {"cpu", "torch_attention", "qwen2", "default_sampler"} <= set(builtins)
    for name, module in builtins.items():
        mine = [row for row in rows if row["PLUGIN"] == name]
        assert mine, f"plugin {name} is not listed:\n{out}"
        declared = importlib.import_module(module).KVLOOM_PLUGIN_API
        assert declared in (">=1.0,<2", ">=1.1,<2"), (module, declared)
        for row in mine:
            assert (row["MODULE"], row["DISTRIBUTION"], row["VERSION"], row["API"],
                    row["STATUS"]) == (module, "kvloom", version, declared, "ok"), row
    kinds_names = {(row["KIND"], row["NAME"]) for row in rows}
    assert {("platform", "cpu"), ("attention", "torch"), ("model", "Qwen2ForCausalLM"),
            ("loader", "safetensors"), ("loader", "dummy"), ("sampler", "default")} <= kinds_names


def test_plugins_says_which_attention_backends_run_here(capsys):
    assert cli.main(["plugins"]) == 0
    machine = capsys.readouterr().out.split("\n\n")[1].splitlines()
    assert machine[0].startswith("attention backends on this machine (platform cpu;")
    status = {line.split()[0]: line.split(None, 1)[1] for line in machine[1:]}
    assert status["torch"] == "usable  (attention: auto picks it)"
    assert status["cuda_paged"] == "not usable: needs a CUDA device, got cpu"
    assert status["flash_attn"].startswith("not usable: needs a CUDA device, got cpu")
    assert set(status) == {"torch", "triton", "cuda_paged", "flash_attn"}


def test_plugins_honours_the_allowlist(monkeypatch, capsys):
    monkeypatch.setenv("KVLOOM_PLUGINS", "cpu,default_sampler")
    assert cli.main(["plugins"]) == 0
    table, machine = capsys.readouterr().out.split("\n\n")
    assert sorted(line.split()[2] for line in table.splitlines()[1:]) == ["cpu",
                                                                          "default_sampler"]
    assert machine.splitlines()[1:] == []  # no attention plugin allowed: none to list


def test_generate_matches_the_python_api(tiny_qwen2, expected_texts):
    result = run_cli("generate", "--model", str(tiny_qwen2), PROMPTS[0],
                     "--max-tokens", "5", "--temperature", "0")
    assert result.returncode == 0, decoded(result.stderr)
    assert decoded(result.stdout) == expected_texts[0] + "\n"
    assert "Traceback" not in decoded(result.stderr)


def test_generate_from_engine_yaml(tiny_qwen2, expected_texts, tmp_path, capsys):
    (tmp_path / "weights").symlink_to(tiny_qwen2, target_is_directory=True)
    config = tmp_path / "engine.yaml"
    config.write_text("model: ./weights\ndtype: float32\nmax_model_len: 128\n"
                      "attention: torch\ncache: {block_size: 8}\nscheduler: {max_num_seqs: 4}\n")
    argv = ["generate", "--model", str(config), *PROMPTS, "--max-tokens", "5",
            "--temperature", "0"]
    assert cli.main(argv) == 0
    assert capsys.readouterr().out == "".join(text + "\n" for text in expected_texts)


def test_flags_override_the_engine_yaml(tiny_qwen2, tmp_path, capsys):
    config = tmp_path / "engine.yaml"
    config.write_text(f"model: {tiny_qwen2}\nmax_model_len: 128\n")
    # The prompt is longer than the overridden context window.
    assert cli.main(["generate", "--model", str(config), "--max-model-len", "2",
                     "The quick brown fox", "--max-tokens", "1"]) == 2
    err = capsys.readouterr().err
    assert "(max_model_len) is 2 tokens" in err


def test_bad_flag_value_is_one_line_without_traceback(tiny_qwen2):
    result = run_cli("generate", "--model", str(tiny_qwen2), "Hello", "--temperature", "-1")
    assert result.returncode != 0
    assert decoded(result.stdout) == ""
    err = decoded(result.stderr)
    assert err.count("\n") == 1 and err.endswith("\n"), err
    assert err.startswith("kvloom: error: temperature"), err
    assert "Traceback" not in err


@pytest.mark.parametrize("flags, field", [
    (["--n", "0"], "n must be"),
    (["--top-p", "0"], "top_p"),
    (["--stop", ""], "stop"),
    (["--max-tokens", "0"], "max_tokens"),
    (["--dtype", "float64"], "model.dtype"),
    (["--max-model-len", "0"], "model.max_model_len"),
    (["--attention", "nope"], "no attention backend named 'nope'; registered: "),
    (["--load-format", "nope"], "no model loader named 'nope'"),
    (["--stop-token-ids", "100000"], "stop_token_ids"),
])
def test_bad_values_give_one_line_errors(tiny_qwen2, capsys, flags, field):
    assert cli.main(["generate", "--model", str(tiny_qwen2), "Hello", *flags]) == 2
    captured = capsys.readouterr()
    assert captured.out == ""
    lines = captured.err.splitlines()
    assert len(lines) == 1, captured.err
    assert lines[0].startswith("kvloom: error: ") and field in lines[0], lines[0]


@pytest.mark.parametrize("model, message", [
    ("/nonexistent/model-dir", "/nonexistent/model-dir"),
    ("/nonexistent/engine.yaml", "no such engine config file"),
])
def test_missing_model_is_one_line_error(capsys, model, message):
    assert cli.main(["generate", "--model", model, "Hello"]) == 2
    lines = capsys.readouterr().err.splitlines()
    assert len(lines) == 1 and message in lines[0], lines


def test_bad_yaml_is_one_line_error(tmp_path, capsys):
    config = tmp_path / "engine.yaml"
    config.write_text("model: m\ncache: {blocksize: 8}\n")
    assert cli.main(["generate", "--model", str(config), "Hello"]) == 2
    [line] = capsys.readouterr().err.splitlines()
    assert "'blocksize'" in line and "valid keys: block_size" in line


def test_unparseable_flag_is_an_argparse_error(capsys):
    with pytest.raises(SystemExit) as excinfo:
        cli.main(["generate", "--model", "m", "Hello", "--temperature", "warm"])
    assert excinfo.value.code == 2
    assert "--temperature" in capsys.readouterr().err


def test_version_is_printed_without_loading_anything():
    result = subprocess.run([sys.executable, "-m", "kvloom.entrypoints.cli", "--version"],
                            capture_output=True, text=True, timeout=60)
    assert result.returncode == 0
    assert result.stdout.strip() == f"kvloom {importlib.metadata.version('kvloom')}"


def test_an_empty_api_key_refuses_to_start(capsys):
    # An unset variable in `--api-key "$KVLOOM_API_KEY"` must not mean "no key".
    assert cli.main(["serve", "/no/such/model", "--api-key", ""]) == 2
    err = capsys.readouterr().err
    assert err.startswith("kvloom: error: --api-key is empty") and err.count("\n") == 1


@pytest.mark.parametrize("model", ["/no/such/dir", "./no-such-dir", "~/no-such-dir",
                                   "missing.gguf"])
def test_a_missing_model_path_says_it_does_not_exist(model, capsys):
    assert cli.main(["generate", "--model", model, "hi"]) == 2
    assert capsys.readouterr().err == f"kvloom: error: model path {model!r} does not exist\n"


def test_a_server_started_from_engine_yaml_is_named_after_its_model(tmp_path):
    from kvloom.entrypoints.cli_serve import served_model_name

    parse = cli.build_parser().parse_args
    config = tmp_path / "engine.yaml"
    assert served_model_name(parse(["serve", str(config)]), "/models/qwen") == "/models/qwen"
    assert served_model_name(parse(["serve", "./my-qwen2"]), "./my-qwen2") == "./my-qwen2"
    named = parse(["serve", str(config), "--served-model-name", "mine"])
    assert served_model_name(named, "/models/qwen") == "mine"
