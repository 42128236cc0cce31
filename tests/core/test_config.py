"""EngineConfig: YAML and dict loading, unknown keys, value checks, LLM(...) kwargs."""

from __future__ import annotations

from pathlib import Path

import pytest

from kvloom.config import EngineConfig, load_engine_config
from kvloom.engine.llm import LLM, engine_config_from_kwargs

ARCHITECTURE_YAML = """\
model: ./my-qwen2            # HF directory, hub id, or a built-in alias
dtype: bfloat16
platform: auto               # cpu | cuda | any registered platform
attention: auto              # torch | triton | flash_attn | cuda_paged | ...
sampler: default
cache: {block_size: 16, gpu_memory_utilization: 0.9, enable_prefix_caching: true}
scheduler: {max_num_seqs: 256, max_num_batched_tokens: 8192}
speculative: {method: ngram, num_speculative_tokens: 4}
structured_output: xgrammar
"""


def write(tmp_path: Path, text: str, name: str = "engine.yaml") -> Path:
    path = tmp_path / name
    path.write_text(text)
    return path


def test_from_yaml_architecture_example(tmp_path):
    (tmp_path / "my-qwen2").mkdir()
    config = EngineConfig.from_yaml(write(tmp_path, ARCHITECTURE_YAML))
    # A relative model directory is taken relative to the YAML file, not the cwd.
    assert config.model.model == str((tmp_path / "my-qwen2").resolve())
    assert config.model.dtype == "bfloat16"
    assert (config.platform, config.attention, config.sampler) == ("auto", "auto", "default")
    assert config.cache.block_size == 16
    assert config.cache.gpu_memory_utilization == 0.9
    assert config.cache.enable_prefix_caching is True
    assert config.scheduler.max_num_seqs == 256
    assert config.scheduler.max_num_batched_tokens == 8192
    assert config.speculative.method == "ngram"
    assert config.speculative.num_speculative_tokens == 4
    assert config.structured_output == "xgrammar"


def test_from_yaml_accepts_a_path_string_and_keeps_hub_ids(tmp_path):
    path = write(tmp_path, "model: Qwen/Qwen2-0.5B\nmax_model_len: 128\nseed: 7\n")
    config = load_engine_config(str(path))
    assert config.model.model == "Qwen/Qwen2-0.5B"  # no such directory: left as written
    assert (config.model.max_model_len, config.model.seed) == (128, 7)
    assert config.speculative is None and config.plugins is None


def test_from_yaml_model_section_as_mapping(tmp_path):
    (tmp_path / "weights").mkdir()
    path = write(tmp_path, "model: {model: weights, dtype: half, load_format: dummy}\n")
    config = EngineConfig.from_yaml(path)
    assert config.model.model == str((tmp_path / "weights").resolve())
    assert config.model.dtype == "float16"
    assert config.model.load_format == "dummy"


def test_from_dict_defaults():
    config = EngineConfig.from_dict({"model": "some/model"})
    assert config.model.model == "some/model"
    assert config.model.dtype == "auto"
    assert config.cache.block_size == 16
    assert config.parallel.tensor_parallel_size == 1
    assert load_engine_config(config) is config
    assert load_engine_config({"model": "x"}).model.model == "x"


def test_from_dict_does_not_mutate_its_input():
    data = {"model": "m", "dtype": "half", "cache": {"block_size": 8}}
    EngineConfig.from_dict(data)
    assert data == {"model": "m", "dtype": "half", "cache": {"block_size": 8}}


@pytest.mark.parametrize("data, bad_key, where", [
    ({"model": "m", "attn": "torch"}, "attn", "EngineConfig"),
    ({"model": "m", "cache": {"blocksize": 16}}, "blocksize", "CacheConfig"),
    ({"model": "m", "scheduler": {"max_seqs": 4}}, "max_seqs", "SchedulerConfig"),
    ({"model": "m", "parallel": {"tp": 2}}, "tp", "ParallelConfig"),
    ({"model": {"model": "m", "dtpye": "half"}}, "dtpye", "ModelConfig"),
    ({"model": "m", "speculative": {"method": "ngram", "num_speculative_tokens": 2, "k": 1}},
     "k", "SpeculativeConfig"),
])
def test_unknown_keys_fail_listing_valid_keys(data, bad_key, where):
    with pytest.raises(ValueError) as excinfo:
        EngineConfig.from_dict(data)
    message = str(excinfo.value)
    assert f"unknown key(s) '{bad_key}' in {where}" in message
    assert "valid keys: " in message


def test_non_string_keys_fail_cleanly(tmp_path):
    """YAML allows int keys; mixed with str keys they must not break the error message."""
    with pytest.raises(ValueError, match="unknown key.*16.*'foo'"):
        EngineConfig.from_yaml(write(tmp_path, "model: m\n16: x\nfoo: 1\n"))
    with pytest.raises(ValueError, match="unknown key.*1.*'x'"):
        EngineConfig.from_dict({"model": "m", "cache": {1: 2, "x": 3}})


def test_unknown_key_messages_list_the_real_keys():
    with pytest.raises(ValueError) as excinfo:
        EngineConfig.from_dict({"model": "m", "cache": {"blocksize": 16}})
    valid = str(excinfo.value).split("valid keys: ")[1].splitlines()[0]
    assert valid.startswith("block_size, enable_prefix_caching, gpu_memory_utilization")


def test_unknown_top_level_key_lists_the_model_shortcuts():
    """Top-level ``dtype:``/``max_model_len:`` are valid, so a typo's error must offer them."""
    with pytest.raises(ValueError) as excinfo:
        EngineConfig.from_dict({"model": "m", "dtpye": "bf16"})
    valid = str(excinfo.value).split("valid keys: ")[1].splitlines()[0].split(", ")
    for key in ("model", "attention", "cache", "scheduler", "dtype", "max_model_len",
                "load_format", "tokenizer", "seed"):
        assert key in valid, (key, valid)


def test_unknown_key_from_yaml_names_the_key(tmp_path):
    path = write(tmp_path, "model: m\ncache:\n  block_size: 16\n  swap_space: 4\n")
    with pytest.raises(ValueError, match="unknown key.*'swap_space'.*valid keys: block_size"):
        EngineConfig.from_yaml(path)


def test_malformed_yaml_names_the_file(tmp_path):
    path = write(tmp_path, "model: m\ncache: {block_size: 16\n", name="broken.yaml")
    with pytest.raises(ValueError, match="broken.yaml.*malformed YAML"):
        EngineConfig.from_yaml(path)


@pytest.mark.parametrize("text, kind", [
    ("- model: m\n- dtype: half\n", "list"),
    ("just-a-model-name\n", "str"),
    ("", "NoneType"),
])
def test_non_mapping_yaml_fails(tmp_path, text, kind):
    path = write(tmp_path, text, name="odd.yaml")
    with pytest.raises(ValueError, match=f"odd.yaml.*expected a mapping.*{kind}"):
        EngineConfig.from_yaml(path)


def test_missing_yaml_file_fails(tmp_path):
    with pytest.raises(FileNotFoundError):
        EngineConfig.from_yaml(tmp_path / "absent.yaml")


def test_model_is_required():
    with pytest.raises(ValueError, match="model"):
        EngineConfig.from_dict({"attention": "torch"})


@pytest.mark.parametrize("data, field", [
    ({"cache": {"block_size": 0}}, "cache.block_size"),
    ({"cache": {"block_size": -16}}, "cache.block_size"),
    ({"cache": {"block_size": "sixteen"}}, "cache.block_size"),
    ({"cache": {"gpu_memory_utilization": 1.5}}, "cache.gpu_memory_utilization"),
    ({"cache": {"gpu_memory_utilization": 0}}, "cache.gpu_memory_utilization"),
    ({"cache": {"num_gpu_blocks_override": 0}}, "cache.num_gpu_blocks_override"),
    ({"cache": {"enable_prefix_caching": "sometimes"}}, "cache.enable_prefix_caching"),
    ({"parallel": {"tensor_parallel_size": 0}}, "parallel.tensor_parallel_size"),
    ({"parallel": {"pipeline_parallel_size": 0}}, "parallel.pipeline_parallel_size"),
    ({"parallel": {"pipeline_parallel_size": 2}}, "parallel.pipeline_parallel_size"),
    ({"scheduler": {"max_num_seqs": 0}}, "scheduler.max_num_seqs"),
    ({"scheduler": {"max_num_batched_tokens": -1}}, "scheduler.max_num_batched_tokens"),
    ({"scheduler": {"policy": "lifo"}}, "scheduler.policy"),
    ({"dtype": "float64"}, "model.dtype"),
    ({"dtype": 16}, "model.dtype"),
    ({"max_model_len": 0}, "model.max_model_len"),
    ({"speculative": {"method": "ngram", "num_speculative_tokens": 0}},
     "speculative.num_speculative_tokens"),
    ({"speculative": {"method": "ngram"}}, "speculative.num_speculative_tokens"),
    ({"plugins": "cpu"}, "plugins"),
])
def test_bad_values_fail_naming_the_field(data, field):
    with pytest.raises(ValueError) as excinfo:
        EngineConfig.from_dict({"model": "m", **data})
    assert field in str(excinfo.value)


def test_assignment_is_validated():
    config = EngineConfig.from_dict({"model": "m"})
    with pytest.raises(ValueError, match="block_size"):
        config.cache.block_size = 0


@pytest.mark.parametrize("alias, dtype", [
    ("half", "float16"), ("fp16", "float16"), ("float16", "float16"),
    ("bf16", "bfloat16"), ("BF16", "bfloat16"), ("bfloat16", "bfloat16"),
    ("float", "float32"), ("fp32", "float32"), ("float32", "float32"), ("auto", "auto"),
])
def test_dtype_aliases(alias, dtype):
    assert EngineConfig.from_dict({"model": "m", "dtype": alias}).model.dtype == dtype
    assert engine_config_from_kwargs("m", dtype=alias).model.dtype == dtype


def test_llm_kwargs_map_to_sections():
    config = engine_config_from_kwargs(
        "some/model", dtype="half", max_model_len=256, seed=3, tokenizer="tok",
        load_format="dummy", attention="torch", platform="cpu", sampler="default",
        block_size=32, gpu_memory_utilization=0.5, enable_prefix_caching=False,
        num_gpu_blocks_override=64, kv_cache_memory_bytes=1 << 20,
        max_num_seqs=8, max_num_batched_tokens=512, enable_chunked_prefill=False,
        scheduling_policy="priority", tensor_parallel_size=1, pipeline_parallel_size=1,
        speculative_config={"method": "ngram", "num_speculative_tokens": 3})
    model = config.model
    assert (model.model, model.dtype, model.max_model_len, model.seed, model.tokenizer,
            model.load_format) == ("some/model", "float16", 256, 3, "tok", "dummy")
    assert (config.attention, config.platform, config.sampler) == ("torch", "cpu", "default")
    cache = config.cache
    assert (cache.block_size, cache.gpu_memory_utilization, cache.enable_prefix_caching,
            cache.num_gpu_blocks_override, cache.kv_cache_memory_bytes) == (
        32, 0.5, False, 64, 1 << 20)
    scheduler = config.scheduler
    assert (scheduler.max_num_seqs, scheduler.max_num_batched_tokens,
            scheduler.enable_chunked_prefill, scheduler.policy) == (8, 512, False, "priority")
    assert config.parallel.tensor_parallel_size == 1
    assert (config.speculative.method, config.speculative.num_speculative_tokens) == ("ngram", 3)


def test_llm_kwargs_none_means_default():
    config = engine_config_from_kwargs("m", block_size=None, dtype=None, max_num_seqs=None)
    assert (config.cache.block_size, config.model.dtype, config.scheduler.max_num_seqs) == (
        16, "auto", 256)


def test_llm_kwarg_values_are_validated_naming_the_field():
    with pytest.raises(ValueError, match="cache.block_size"):
        engine_config_from_kwargs("m", block_size=0)
    with pytest.raises(ValueError, match="parallel.tensor_parallel_size"):
        engine_config_from_kwargs("m", tensor_parallel_size=0)
    with pytest.raises(ValueError, match="pipeline parallelism is not supported"):
        engine_config_from_kwargs("m", pipeline_parallel_size=2)
    config = engine_config_from_kwargs("m", tensor_parallel_size=2,
                                       distributed_executor_backend="mp")
    assert (config.parallel.tensor_parallel_size,
            config.parallel.distributed_executor_backend) == (2, "mp")


def test_unknown_llm_kwarg_fails_listing_valid_keys():
    with pytest.raises(ValueError) as excinfo:
        LLM("m", blok_size=16)  # fails before anything is loaded
    message = str(excinfo.value)
    assert "'blok_size'" in message
    valid = message.split("valid keys: ")[1].splitlines()[0].split(", ")
    # The keys an LLM(...) user can actually pass, including the vLLM-style flat ones.
    for key in ("block_size", "max_num_seqs", "gpu_memory_utilization", "dtype",
                "max_model_len", "attention"):
        assert key in valid, (key, valid)


def test_plugin_allowlist_from_env_only_via_config(monkeypatch):
    monkeypatch.setenv("KVLOOM_PLUGINS", "cpu,qwen2")
    assert EngineConfig.from_dict({"model": "m"}).plugin_allowlist() == ["cpu", "qwen2"]
    assert EngineConfig.from_dict({"model": "m", "plugins": []}).plugin_allowlist() == []
