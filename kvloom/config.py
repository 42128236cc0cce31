"""Engine configuration: one pydantic model, built from YAML, a dict, or LLM(...) kwargs.

This is the only module that reads environment variables.

Example ``engine.yaml``::

    model: ./my-qwen2
    dtype: bfloat16
    attention: auto
    cache: {block_size: 16, enable_prefix_caching: true}
    scheduler: {max_num_seqs: 256, max_num_batched_tokens: 8192}
"""

from __future__ import annotations

import os
from pathlib import Path
from typing import Any, Literal

import yaml
from pydantic import BaseModel, ConfigDict, Field, field_validator, model_validator

from kvloom.scheduler.policy import SCHEDULING_POLICIES

PLUGIN_ALLOWLIST_ENV = "KVLOOM_PLUGINS"
API_KEY_ENV = "KVLOOM_API_KEY"


class Section(BaseModel):
    """A config section; unknown keys are errors that list the valid ones."""

    model_config = ConfigDict(extra="forbid", validate_assignment=True)

    @model_validator(mode="before")
    @classmethod
    def _reject_unknown_keys(cls, data: Any) -> Any:
        if isinstance(data, dict):
            valid = cls.valid_keys()
            unknown = sorted(set(data) - set(valid), key=str)
            if unknown:
                raise ValueError(
                    f"unknown key(s) {', '.join(map(repr, unknown))} in {cls.__name__}; "
                    f"valid keys: {', '.join(valid)}")
        return data

    @classmethod
    def valid_keys(cls) -> list[str]:
        """The keys this section accepts, sorted."""
        return sorted(cls.model_fields)


DTypeName = Literal["auto", "float32", "float16", "bfloat16"]
_DTYPE_ALIASES = {"float": "float32", "half": "float16", "bf16": "bfloat16", "fp16": "float16",
                  "fp32": "float32"}


class ModelConfig(Section):
    """Which model to run and how to load it."""

    model: str
    tokenizer: str | None = None
    dtype: DTypeName = "auto"
    max_model_len: int | None = Field(default=None, gt=0)
    load_format: str = "auto"
    seed: int = 0
    trust_remote_code: bool = False
    revision: str | None = None
    skip_tokenizer_init: bool = False
    enforce_eager: bool = False
    cuda_graph_sizes: list[int] | None = None

    @field_validator("cuda_graph_sizes")
    @classmethod
    def _positive_sizes(cls, value: list[int] | None) -> list[int] | None:
        if value is not None and any(size < 1 for size in value):
            raise ValueError("cuda_graph_sizes must be positive batch sizes")
        return value

    @field_validator("dtype", mode="before")
    @classmethod
    def _normalize_dtype(cls, value: Any) -> Any:
        if isinstance(value, str):
            return _DTYPE_ALIASES.get(value.lower(), value.lower())
        return value


class CacheConfig(Section):
    """The paged KV cache."""

    block_size: int = Field(default=16, gt=0, le=1024)
    gpu_memory_utilization: float = Field(default=0.9, gt=0.0, le=1.0)
    enable_prefix_caching: bool = True
    num_gpu_blocks_override: int | None = Field(default=None, gt=0)
    kv_cache_memory_bytes: int | None = Field(default=None, gt=0)


class SchedulerConfig(Section):
    """Continuous batching limits and policy."""

    max_num_seqs: int = Field(default=256, gt=0)
    max_num_batched_tokens: int | None = Field(default=None, gt=0)
    enable_chunked_prefill: bool = True
    # A name in SCHEDULING_POLICIES (scheduler/policy.py): "fcfs" or "priority".
    policy: str = "fcfs"
    # Schedule step N+1 while step N runs on the device (results are the same).
    async_scheduling: bool = True

    @field_validator("policy")
    @classmethod
    def _known_policy(cls, name: str) -> str:
        if name not in SCHEDULING_POLICIES:
            raise ValueError(f"unknown scheduling policy {name!r}; known: "
                             f"{', '.join(sorted(SCHEDULING_POLICIES))}")
        return name


class ParallelConfig(Section):
    """Model parallelism: how many ranks hold slices of the model, and which executor
    runs them (``uni``: one rank in the engine's process; ``mp``: a process per rank on
    this machine; ``ray``: Ray actors, on any node of a cluster; or a plugin's)."""

    tensor_parallel_size: int = Field(default=1, ge=1, le=1024)
    pipeline_parallel_size: int = Field(default=1, ge=1)
    distributed_executor_backend: str = "auto"  # auto: uni for one rank, else mp
    # ray: the cluster to join (an address such as "ray://host:10001" or "auto" for a
    # running local one); None starts a local cluster when none is running.
    ray_address: str | None = None

    @field_validator("pipeline_parallel_size")
    @classmethod
    def _no_pipeline_parallelism(cls, size: int) -> int:
        if size != 1:
            raise ValueError(f"pipeline parallelism is not supported (got {size}); use "
                             "tensor_parallel_size to split a model over devices")
        return size


class SpeculativeConfig(Section):
    """Speculative decoding; ``method`` names a registered drafter (``ngram``, ``eagle``,
    ``eagle3``, or a plugin's). ``model`` is a draft checkpoint for model-based
    drafters; ``load_format: dummy`` gives it random weights (speed work)."""

    method: str
    num_speculative_tokens: int = Field(gt=0, le=64)
    model: str | None = None
    load_format: Literal["auto", "dummy"] = "auto"
    prompt_lookup_min: int | None = Field(default=None, gt=0)
    prompt_lookup_max: int | None = Field(default=None, gt=0)

    @model_validator(mode="after")
    def _lookup_range(self) -> "SpeculativeConfig":
        low, high = self.prompt_lookup_min, self.prompt_lookup_max
        if low is not None and high is not None and low > high:
            raise ValueError(f"prompt_lookup_min ({low}) must not exceed "
                             f"prompt_lookup_max ({high})")
        return self


# Top-level keys that belong to the model section, so a YAML file can say
# ``dtype: bfloat16`` next to ``model:`` as vLLM users expect.
_MODEL_SHORTCUT_KEYS = set(ModelConfig.model_fields) - {"model"}


class EngineConfig(Section):
    """Everything the engine is built from."""

    model: ModelConfig
    platform: str = "auto"
    attention: str = "auto"
    sampler: str = "default"
    structured_output: str | None = None
    cache: CacheConfig = Field(default_factory=CacheConfig)
    scheduler: SchedulerConfig = Field(default_factory=SchedulerConfig)
    parallel: ParallelConfig = Field(default_factory=ParallelConfig)
    speculative: SpeculativeConfig | None = None
    plugins: list[str] | None = None

    @classmethod
    def valid_keys(cls) -> list[str]:
        # ``dtype: bfloat16`` next to ``model:`` is valid too, so a typo's error offers it.
        return sorted(set(cls.model_fields) | _MODEL_SHORTCUT_KEYS)

    @model_validator(mode="before")
    @classmethod
    def _lift_model_shortcuts(cls, data: Any) -> Any:
        if not isinstance(data, dict):
            return data
        data = dict(data)
        model = data.get("model")
        section = {"model": model} if isinstance(model, (str, os.PathLike)) else dict(model or {})
        for key in _MODEL_SHORTCUT_KEYS & set(data):
            section[key] = data.pop(key)
        if "model" in section:
            section["model"] = str(section["model"])
        data["model"] = section
        return data

    @classmethod
    def from_dict(cls, data: dict[str, Any]) -> "EngineConfig":
        return cls.model_validate(data)

    @classmethod
    def from_yaml(cls, path: str | os.PathLike) -> "EngineConfig":
        """Read a YAML file; a relative model path is taken relative to the file."""
        path = Path(path)
        try:
            data = yaml.safe_load(path.read_text())
        except yaml.YAMLError as exc:
            raise ValueError(f"{path}: malformed YAML: {exc}") from None
        if not isinstance(data, dict):
            raise ValueError(f"{path}: expected a mapping of config keys, got {type(data).__name__}")
        data = _resolve_model_path(data, path.parent)
        return cls.model_validate(data)

    def plugin_allowlist(self) -> list[str] | None:
        """The plugin allow-list: the config's ``plugins`` key, else $KVLOOM_PLUGINS."""
        return self.plugins if self.plugins is not None else plugin_allowlist_from_env()


def cache_dir() -> Path:
    """Where downloaded and converted models live: $KVLOOM_CACHE_DIR, else
    $XDG_CACHE_HOME/kvloom, else ~/.cache/kvloom."""
    explicit = os.environ.get("KVLOOM_CACHE_DIR")
    if explicit:
        return Path(explicit)
    base = os.environ.get("XDG_CACHE_HOME") or Path.home() / ".cache"
    return Path(base) / "kvloom"


FLASH_ATTN_LIBRARY_ENV = "KVLOOM_FLASH_ATTN_LIBRARY"


def flash_attn_library_from_env() -> str | None:
    """The FlashAttention-3 kernel library the flash_attn backend should load
    (``$KVLOOM_FLASH_ATTN_LIBRARY``), or None to look for an installed vllm's."""
    return os.environ.get(FLASH_ATTN_LIBRARY_ENV) or None


def plugin_allowlist_from_env() -> list[str] | None:
    """Entry-point names from ``$KVLOOM_PLUGINS`` (comma separated), or None for all."""
    raw = os.environ.get(PLUGIN_ALLOWLIST_ENV)
    if raw is None or not raw.strip():
        return None
    return [name.strip() for name in raw.split(",") if name.strip()]


def api_key_from_env() -> str | None:
    """The server's API key from ``$KVLOOM_API_KEY`` (so it stays off the command line,
    where ``ps`` shows it), or None when unset or blank."""
    return os.environ.get(API_KEY_ENV, "").strip() or None


def load_engine_config(source: str | os.PathLike | dict[str, Any] | EngineConfig) -> EngineConfig:
    """An EngineConfig from a YAML path, a dict, or an EngineConfig."""
    if isinstance(source, EngineConfig):
        return source
    if isinstance(source, dict):
        return EngineConfig.from_dict(source)
    return EngineConfig.from_yaml(source)


def _resolve_model_path(data: dict[str, Any], base_dir: Path) -> dict[str, Any]:
    model = data.get("model")
    if isinstance(model, dict):
        model = model.get("model")
    if isinstance(model, str) and not Path(model).is_absolute() and (base_dir / model).exists():
        resolved = str((base_dir / model).resolve())
        data = dict(data)
        if isinstance(data["model"], dict):
            data["model"] = {**data["model"], "model": resolved}
        else:
            data["model"] = resolved
    return data
