"""Broken model files give one-line errors naming the file; conversions leave no scratch.

Each broken checkpoint is a copy of the tiny Qwen2 checkpoint with one file damaged.
The GGUF cases use a tiny GGUF written here from the same checkpoint with the ``gguf``
package, so the conversion through transformers runs for real.
"""

from __future__ import annotations

import json
import os
import random
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pytest

from kvloom import LLM, SamplingParams
from kvloom.engine.engine import Engine
from kvloom.entrypoints import cli
from kvloom.interfaces.loader import ModelLoadError
from kvloom.model_source import SCRATCH_TAG, remove_stale_scratch
from kvloom.plugins.loaders import gguf_loader

WEIGHTS = "model.safetensors"
CONFIG = "config.json"
DELETE = object()  # edit_config(key=DELETE) removes the key


# ---------------------------------------------------------------- helpers and fixtures


def assert_one_line_naming(message: str, path: Path, *phrases: str) -> None:
    assert "\n" not in message, message
    assert str(path) in message, f"{path} not named in: {message}"
    for phrase in phrases:
        assert phrase in message, f"{phrase!r} not in: {message}"


def load_error(model: Path) -> str:
    """The message of the error LLM(model) raises; it must be a ModelLoadError."""
    with pytest.raises(ModelLoadError) as error:
        LLM(str(model))
    assert isinstance(error.value, ValueError)
    return str(error.value)


@pytest.fixture
def checkpoint(tiny_qwen2, tmp_path) -> Path:
    """A private copy of the tiny checkpoint, to damage."""
    return Path(shutil.copytree(tiny_qwen2, tmp_path / "model"))


@pytest.fixture
def cache(tmp_path, monkeypatch) -> Path:
    """A kvloom cache of this test's own, for the GGUF conversions."""
    path = tmp_path / "cache"
    monkeypatch.setenv("KVLOOM_CACHE_DIR", str(path))
    return path


def converted_entries(cache: Path) -> list[str]:
    converted = cache / "converted"
    return sorted(p.name for p in converted.iterdir()) if converted.exists() else []


def edit_config(checkpoint: Path, **changes) -> None:
    config = json.loads((checkpoint / CONFIG).read_text())
    for key, value in changes.items():
        if value is DELETE:
            config.pop(key)
        else:
            config[key] = value
    (checkpoint / CONFIG).write_text(json.dumps(config))


def write_gguf(checkpoint: Path, out: Path) -> Path:
    """A float32 Qwen2 GGUF with a GPT-2 style tokenizer, from an HF checkpoint."""
    import gguf
    from safetensors.numpy import load_file

    config = json.loads((checkpoint / CONFIG).read_text())
    tokenizer = json.loads((checkpoint / "tokenizer.json").read_text())
    writer = gguf.GGUFWriter(str(out), "qwen2")
    writer.add_context_length(config["max_position_embeddings"])
    writer.add_embedding_length(config["hidden_size"])
    writer.add_block_count(config["num_hidden_layers"])
    writer.add_feed_forward_length(config["intermediate_size"])
    writer.add_head_count(config["num_attention_heads"])
    writer.add_head_count_kv(config["num_key_value_heads"])
    writer.add_layer_norm_rms_eps(config["rms_norm_eps"])
    writer.add_rope_freq_base(10000.0)
    added = {token["content"]: token["id"] for token in tokenizer["added_tokens"]}
    id_to_token = {i: t for t, i in {**tokenizer["model"]["vocab"], **added}.items()}
    tokens = [id_to_token.get(i, f"[PAD{i}]") for i in range(config["vocab_size"])]
    writer.add_tokenizer_model("gpt2")
    writer.add_token_list(tokens)
    writer.add_token_types([3 if token in added else 1 for token in tokens])
    writer.add_token_merges([m if isinstance(m, str) else " ".join(m)
                             for m in tokenizer["model"]["merges"]])
    writer.add_eos_token_id(config["eos_token_id"])
    writer.add_bos_token_id(config["bos_token_id"])
    names = gguf.get_tensor_name_map(gguf.MODEL_ARCH.QWEN2, config["num_hidden_layers"])
    for name, array in load_file(str(checkpoint / WEIGHTS)).items():
        writer.add_tensor(names.get_name(name, try_suffixes=(".weight", ".bias")),
                          array.astype(np.float32))
    writer.write_header_to_file()
    writer.write_kv_data_to_file()
    writer.write_tensors_to_file()
    writer.close()
    return out


@pytest.fixture(scope="module")
def tiny_gguf(tiny_qwen2, tmp_path_factory) -> Path:
    return write_gguf(tiny_qwen2, tmp_path_factory.mktemp("gguf") / "tiny.gguf")


@pytest.fixture
def gguf_copy(tiny_gguf, tmp_path) -> Path:
    """A private copy of the tiny GGUF, to damage or convert into this test's cache."""
    return Path(shutil.copy(tiny_gguf, tmp_path / "tiny.gguf"))


# ---------------------------------------------------------------- broken checkpoints


def _random_bytes(path: Path) -> None:
    path.write_bytes(random.Random(0).randbytes(4096))


def _cut_in_half(path: Path) -> None:
    data = path.read_bytes()
    path.write_bytes(data[:len(data) // 2])


def _cut_inside_header(path: Path) -> None:
    path.write_bytes(path.read_bytes()[:50])


def _cut_inside_length(path: Path) -> None:
    path.write_bytes(path.read_bytes()[:5])


def _empty(path: Path) -> None:
    path.write_bytes(b"")


@pytest.mark.parametrize("damage, phrases", [
    (_random_bytes, ["not a safetensors file", "header length of"]),
    (_cut_inside_header, ["truncated: header says", "file has 50", "cut inside the header"]),
    (_cut_inside_length, ["truncated: 5 bytes"]),
    (_empty, ["empty file"]),
], ids=["random-bytes", "cut-inside-header", "cut-inside-length", "empty"])
def test_broken_safetensors_is_named_on_one_line(checkpoint, damage, phrases):
    damage(checkpoint / WEIGHTS)
    assert_one_line_naming(load_error(checkpoint), checkpoint / WEIGHTS, *phrases)


def test_truncated_safetensors_says_how_many_bytes_are_missing(checkpoint):
    weights = checkpoint / WEIGHTS
    full = weights.stat().st_size
    _cut_in_half(weights)
    message = load_error(checkpoint)
    # The header describes every tensor, so it still says how long the file should be.
    assert_one_line_naming(message, weights,
                           f"truncated: header says {full} bytes, file has {full // 2}")


def test_safetensors_refused_by_the_library_is_named(checkpoint):
    """Framing intact but overlapping tensor byte ranges: the library's own reason."""
    weights = checkpoint / WEIGHTS
    data = weights.read_bytes()
    length = int.from_bytes(data[:8], "little")
    header = json.loads(data[8:8 + length])
    first, second = [name for name in header if name != "__metadata__"][:2]
    header[second]["data_offsets"] = header[first]["data_offsets"]
    text = json.dumps(header).encode()
    weights.write_bytes(len(text).to_bytes(8, "little") + text + data[8 + length:])
    assert_one_line_naming(load_error(checkpoint), weights, "not a valid safetensors file")


def test_shard_missing_from_an_index_is_named(tiny_qwen2_factory, tmp_path):
    sharded = Path(shutil.copytree(tiny_qwen2_factory(num_shards=2), tmp_path / "sharded"))
    shard = sorted(sharded.glob("*.safetensors"))[-1]
    shard.unlink()
    assert_one_line_naming(load_error(sharded), shard, "missing")


def test_index_that_is_not_json_is_named(tiny_qwen2_factory, tmp_path):
    sharded = Path(shutil.copytree(tiny_qwen2_factory(num_shards=2), tmp_path / "sharded"))
    index = sharded / "model.safetensors.index.json"
    index.write_text("{\"weight_map\": ")
    assert_one_line_naming(load_error(sharded), index, "not a valid index")


@pytest.mark.parametrize("write, phrases", [
    (lambda c: (c / CONFIG).write_text("{not json"), ["not valid JSON"]),
    (lambda c: (c / CONFIG).write_text(""), ["empty file"]),
    (lambda c: (c / CONFIG).write_text("[1, 2]"), ["not a JSON object"]),
    (lambda c: (c / CONFIG).unlink(), ["missing"]),
    (lambda c: edit_config(c, model_type=DELETE), ["'model_type'"]),
    (lambda c: edit_config(c, model_type=5), ["'model_type'", "found 5"]),
    (lambda c: edit_config(c, architectures=DELETE), ["'architectures'"]),
    (lambda c: edit_config(c, architectures="Qwen2ForCausalLM"), ["'architectures'"]),
    (lambda c: edit_config(c, hidden_size="64"), ["'hidden_size' must be a positive integer"]),
    (lambda c: edit_config(c, num_attention_heads=0), ["'num_attention_heads'", "found 0"]),
    # Reasons transformers gives, kept and put on one line.
    (lambda c: edit_config(c, rms_norm_eps="x"), ["rms_norm_eps", "expected float"]),
    (lambda c: edit_config(c, model_type="no_such_model"), ["no_such_model",
                                                            "does not recognize"]),
], ids=["not-json", "empty", "not-an-object", "missing", "no-model-type", "model-type-int",
        "no-architectures", "architectures-str", "hidden-size-str", "zero-heads",
        "transformers-field-type", "unknown-model-type"])
def test_invalid_config_is_named_on_one_line(checkpoint, write, phrases):
    write(checkpoint)
    assert_one_line_naming(load_error(checkpoint), checkpoint / CONFIG, *phrases)


def test_engine_from_config_gives_the_same_error(checkpoint):
    _cut_in_half(checkpoint / WEIGHTS)
    with pytest.raises(ModelLoadError) as error:
        Engine.from_config({"model": str(checkpoint)})
    assert_one_line_naming(str(error.value), checkpoint / WEIGHTS, "truncated")


def test_error_survives_pickling(checkpoint):
    """The engine core may run in another process and send its errors back."""
    import pickle

    error = ModelLoadError(checkpoint / WEIGHTS, "truncated:\nheader says 10 bytes")
    copy = pickle.loads(pickle.dumps(error))
    assert str(copy) == str(error) == f"{checkpoint / WEIGHTS}: truncated: header says 10 bytes"


# ---------------------------------------------------------------- broken GGUF files


def test_truncated_gguf_is_named_and_leaves_no_directory(gguf_copy, cache):
    full = gguf_copy.stat().st_size
    _cut_in_half(gguf_copy)
    message = load_error(gguf_copy)
    assert_one_line_naming(message, gguf_copy, "truncated: header says at least",
                           f"file has {full // 2}")
    assert "reshape" not in message
    assert converted_entries(cache) == []


@pytest.mark.parametrize("damage, phrases", [
    (_cut_inside_header, ["truncated: header says at least", "file has 50"]),
    (lambda p: p.write_bytes(p.read_bytes()[:-1]), ["truncated"]),
    (_random_bytes, ["not a GGUF file"]),
    (_empty, ["empty file"]),
], ids=["cut-inside-header", "last-byte-missing", "random-bytes", "empty"])
def test_broken_gguf_is_named_on_one_line(gguf_copy, cache, damage, phrases):
    damage(gguf_copy)
    assert_one_line_naming(load_error(gguf_copy), gguf_copy, *phrases)
    assert converted_entries(cache) == []


# ---------------------------------------------------------------- the CLI


def _generate(model: Path) -> list[str]:
    return ["generate", "--model", str(model), "Hello", "--max-tokens", "1"]


@pytest.mark.parametrize("damage, broken", [
    (lambda c: _random_bytes(c / WEIGHTS), WEIGHTS),
    (lambda c: _cut_in_half(c / WEIGHTS), WEIGHTS),
    (lambda c: (c / CONFIG).write_text("{not json"), CONFIG),
    (lambda c: edit_config(c, architectures=DELETE), CONFIG),
], ids=["random-safetensors", "truncated-safetensors", "config-not-json",
        "config-no-architectures"])
def test_cli_prints_one_error_line(checkpoint, capsys, damage, broken):
    damage(checkpoint)
    assert cli.main(_generate(checkpoint)) == 2
    captured = capsys.readouterr()
    assert captured.out == ""
    lines = captured.err.splitlines()
    assert len(lines) == 1 and lines[0].startswith("kvloom: error: "), captured.err
    assert_one_line_naming(lines[0], checkpoint / broken)


def _run_cli(args: list[str], cache: Path) -> subprocess.CompletedProcess:
    env = {k: v for k, v in os.environ.items() if k != "KVLOOM_PLUGINS"}
    env.update(PYTHONIOENCODING="utf-8", KVLOOM_CACHE_DIR=str(cache))
    return subprocess.run([sys.executable, "-m", "kvloom.entrypoints.cli", *args],
                          capture_output=True, text=True, env=env, timeout=300)


@pytest.mark.parametrize("kind", ["safetensors", "gguf"])
def test_cli_subprocess_exits_2_without_traceback(checkpoint, gguf_copy, cache, kind):
    broken = checkpoint / WEIGHTS if kind == "safetensors" else gguf_copy
    _cut_in_half(broken)
    result = _run_cli(_generate(checkpoint if kind == "safetensors" else gguf_copy), cache)
    assert result.returncode == 2, result.stderr
    assert "Traceback" not in result.stderr
    errors = [line for line in result.stderr.splitlines() if line.startswith("kvloom: error:")]
    assert errors == result.stderr.splitlines(), result.stderr  # nothing but the one line
    assert len(errors) == 1
    assert_one_line_naming(errors[0], broken, "truncated: header says")
    assert converted_entries(cache) == []


# ---------------------------------------------------------------- interrupted conversions


class Interrupt(Exception):
    pass


@pytest.mark.parametrize("raised", [Interrupt, KeyboardInterrupt])
def test_conversion_failing_midway_leaves_nothing(gguf_copy, cache, monkeypatch, raised):
    scratch_seen = []

    def fail_while_saving(model, directory):
        (directory / WEIGHTS).write_bytes(b"half a file")
        scratch_seen.append(sorted(p.name for p in directory.iterdir()))
        assert directory.name.startswith(".tiny-")
        assert f"{SCRATCH_TAG}{os.getpid()}@" in directory.name
        raise raised("disk unplugged")

    monkeypatch.setattr(gguf_loader, "save_weights", fail_while_saving)
    expected = ModelLoadError if raised is Interrupt else KeyboardInterrupt
    with pytest.raises(expected) as error:
        LLM(str(gguf_copy))
    # The failure came after config and tokenizer were written into the scratch directory.
    assert scratch_seen and CONFIG in scratch_seen[0] and WEIGHTS in scratch_seen[0]
    assert converted_entries(cache) == []
    if raised is Interrupt:
        assert_one_line_naming(str(error.value), gguf_copy.resolve(),
                               "could not convert", "Interrupt: disk unplugged")


# Converts the GGUF in argv[1], blocking once the scratch directory is half written.
BLOCKING_CONVERSION = """
import sys, time
from kvloom.plugins.loaders import gguf_loader

def block(model, directory):
    (directory / "model.safetensors").write_bytes(b"half a file")
    time.sleep(600)

gguf_loader.save_weights = block
from kvloom import LLM
LLM(sys.argv[1])
"""


def _start_blocked_conversion(gguf: Path, cache: Path) -> tuple[subprocess.Popen, Path]:
    """A subprocess converting ``gguf``, and its scratch directory once half written."""
    env = dict(os.environ, KVLOOM_CACHE_DIR=str(cache))
    process = subprocess.Popen([sys.executable, "-c", BLOCKING_CONVERSION, str(gguf)],
                               env=env, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE,
                               text=True)
    deadline = time.monotonic() + 240
    while time.monotonic() < deadline and process.poll() is None:
        half_written = list((cache / "converted").glob(f".*{SCRATCH_TAG}*/{WEIGHTS}"))
        if half_written:
            return process, half_written[0].parent
        time.sleep(0.2)
    process.kill()
    _, stderr = process.communicate()
    pytest.fail(f"the conversion never reached save_weights: {stderr[-2000:]}")


def test_scratch_of_a_killed_conversion_is_removed_by_the_next_run(gguf_copy, cache):
    process, scratch = _start_blocked_conversion(gguf_copy, cache)
    assert f"{SCRATCH_TAG}{process.pid}@" in scratch.name
    process.send_signal(signal.SIGKILL)
    process.communicate(timeout=60)  # reaped: its pid is gone
    assert scratch.is_dir()  # SIGKILL ran no cleanup
    llm = LLM(str(gguf_copy))
    output = llm.generate(["Hello"], SamplingParams(max_tokens=2, temperature=0))[0]
    assert len(output.outputs[0].token_ids) == 2
    assert not scratch.exists()
    [target] = converted_entries(cache)  # the finished conversion and nothing else
    assert not target.startswith(".") and (cache / "converted" / target / CONFIG).exists()


def test_sigterm_during_conversion_removes_the_scratch(gguf_copy, cache):
    process, scratch = _start_blocked_conversion(gguf_copy, cache)
    process.send_signal(signal.SIGTERM)
    _, stderr = process.communicate(timeout=60)
    assert process.returncode == 128 + signal.SIGTERM, stderr[-2000:]
    assert "Traceback" not in stderr
    assert not scratch.exists()
    assert converted_entries(cache) == []


def test_only_scratch_of_gone_processes_on_this_host_is_removed(tmp_path):
    import socket

    finished = subprocess.run([sys.executable, "-c", "import os; print(os.getpid())"],
                              capture_output=True, text=True, check=True)
    gone_pid = int(finished.stdout)
    host = socket.gethostname()
    gone = tmp_path / f".model{SCRATCH_TAG}{gone_pid}@{host}-abc123"
    alive = tmp_path / f".model{SCRATCH_TAG}{os.getpid()}@{host}-def456"
    elsewhere = tmp_path / f".model{SCRATCH_TAG}{gone_pid}@not-{host}-ghi789"
    unrelated = tmp_path / ".model-unrelated"
    for path in (gone, alive, elsewhere, unrelated):
        path.mkdir()
    assert remove_stale_scratch(tmp_path) == [gone]
    assert sorted(p.name for p in tmp_path.iterdir()) == sorted(
        p.name for p in (alive, elsewhere, unrelated))
