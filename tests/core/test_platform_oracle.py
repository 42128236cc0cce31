"""The platform is the worker's only device oracle.

The worker, the engine builder, speculative decoding and structured output ask the
Platform (``uses_pinned_memory``, ``new_event``, ``synchronize``, graph capture)
and never test device names or call ``torch.cuda``: a source scan keeps it so. A
third-party platform that implements only the abstract methods gets the defaults
and runs the engine.
"""

from __future__ import annotations

import ast
from pathlib import Path

import pytest
import torch

import kvloom
from kvloom import Engine, EngineConfig, SamplingParams, hookimpl, make_plugin_manager
from kvloom.engine.builder import use_cuda_graphs
from kvloom.interfaces.attention import AttentionBackend
from kvloom.interfaces.platform import Platform

PACKAGE_DIR = Path(kvloom.__file__).resolve().parent
# Where device decisions must come from the platform.
ORACLE_USERS = ("worker", "engine/builder.py", "spec_decode", "structured_output")


# ------------------------------------------------------------------ source scan
def device_assumptions(source: str) -> list[tuple[int, str]]:
    """(line, what) for each place ``source`` names CUDA itself: a ``"cuda"`` or
    ``"cuda:N"`` string, a ``.cuda`` attribute (``torch.cuda.*``, ``tensor.cuda()``),
    or an import of ``torch.cuda``."""
    found = []
    for node in ast.walk(ast.parse(source)):
        if isinstance(node, ast.Constant) and isinstance(node.value, str):
            if node.value == "cuda" or node.value.startswith("cuda:"):
                found.append((node.lineno, f"string {node.value!r}"))
        elif isinstance(node, ast.Attribute) and node.attr == "cuda":
            found.append((node.lineno, f"attribute {ast.unparse(node)}"))
        elif isinstance(node, ast.Import):
            found += [(node.lineno, f"import {alias.name}") for alias in node.names
                      if alias.name == "torch.cuda" or alias.name.startswith("torch.cuda.")]
        elif isinstance(node, ast.ImportFrom) and node.module:
            if node.module == "torch.cuda" or node.module.startswith("torch.cuda."):
                found.append((node.lineno, f"from {node.module} import"))
            elif node.module == "torch" and any(a.name == "cuda" for a in node.names):
                found.append((node.lineno, "from torch import cuda"))
    return sorted(found)


def oracle_user_files() -> list[Path]:
    files = []
    for relative in ORACLE_USERS:
        path = PACKAGE_DIR / relative
        files += sorted(path.rglob("*.py")) if path.is_dir() else [path]
    return files


@pytest.mark.parametrize("source", [
    'pin = device.type == "cuda"',
    'torch.device("cuda:0")',
    "torch.cuda.synchronize()",
    "event = torch.cuda.Event()",
    "graphs: dict[int, torch.cuda.CUDAGraph] = {}",
    "with torch.cuda.graph(graph, pool=pool):\n    pass",
    "x = tensor.cuda()",
    "import torch.cuda",
    "from torch.cuda import Event",
    "from torch import cuda",
    "import torch as t\nt.cuda.current_stream()",
    "name = f\"{'cuda'}\"",
])
def test_scanner_catches_every_spelling(source):
    assert device_assumptions(source)


@pytest.mark.parametrize("source", [
    '"""Captures CUDA graphs for decode steps."""',
    "pin = platform.uses_pinned_memory",
    "self.cuda_graphs = None",
    "from kvloom.worker.cuda_graphs import CudaGraphDecoder",
    "platform.synchronize()",
    "device_type = spec.device_type",
])
def test_scanner_allows_platform_queries(source):
    assert device_assumptions(source) == []


def test_scanner_covers_the_oracle_users():
    names = {str(path.relative_to(PACKAGE_DIR)) for path in oracle_user_files()}
    assert {"worker/model_runner.py", "worker/cuda_graphs.py", "worker/input_batch.py",
            "worker/sampling.py", "engine/builder.py", "spec_decode/decoder.py",
            "structured_output/grammar_mask.py"} <= names


def test_worker_asks_the_platform_about_the_device():
    offenders = [f"{path.relative_to(PACKAGE_DIR.parent)}:{line}: {what}"
                 for path in oracle_user_files()
                 for line, what in device_assumptions(path.read_text())]
    assert offenders == [], (
        "ask the Platform (kvloom/interfaces/platform.py) instead of naming CUDA:\n"
        + "\n".join(offenders))


# ----------------------------------------------------- a platform with defaults
class MinimalPlatform(Platform):
    """Only the abstract methods: what a third-party platform must write."""

    name = "minimal"

    def device(self) -> torch.device:
        return torch.device("cpu")

    def supported_dtypes(self) -> list[torch.dtype]:
        return [torch.float32]

    def attention_candidates(self) -> list[str]:
        return ["torch"]

    def kv_cache_memory_bytes(self, requested_bytes: int | None, memory_fraction: float) -> int:
        return requested_bytes or 16 << 20


class CountingPlatform(MinimalPlatform):
    """An 'asynchronous' platform that implements synchronize() and nothing else."""

    name = "counting"

    def __init__(self) -> None:
        self.num_synchronizes = 0

    def synchronize(self) -> None:
        self.num_synchronizes += 1


class BareBackend(AttentionBackend):
    """An attention backend that says nothing about graphs."""

    def kv_cache_shape(self, num_blocks, spec):
        raise NotImplementedError

    def build_metadata(self, inputs):
        raise NotImplementedError

    def make_impl(self, spec, scale):
        raise NotImplementedError


def test_capability_defaults_are_the_cpu_ones():
    platform = MinimalPlatform()
    assert platform.uses_pinned_memory is False
    assert platform.supports_cuda_graphs is False
    assert platform.needs_profile_run is False
    assert BareBackend.supports_cuda_graphs is False
    event = platform.new_event()
    event.record()
    event.synchronize()
    platform.synchronize()


@pytest.mark.parametrize("operation", [
    lambda p: p.new_graph(), lambda p: p.new_graph_pool(),
    lambda p: p.capture_graph(None, None)])
def test_graph_operations_without_support_say_so(operation):
    with pytest.raises(NotImplementedError, match="'minimal'.*supports_cuda_graphs"):
        operation(MinimalPlatform())


def test_default_event_waits_through_synchronize():
    platform = CountingPlatform()
    event = platform.new_event()
    event.record()
    assert platform.num_synchronizes == 0
    event.synchronize()
    assert platform.num_synchronizes == 1


@pytest.mark.parametrize("platform_graphs, backend_graphs, enforce_eager, expected", [
    (False, False, False, False), (True, False, False, False), (False, True, False, False),
    (True, True, False, True), (True, True, True, False)])
def test_graphs_need_platform_and_backend(tiny_qwen2, platform_graphs, backend_graphs,
                                          enforce_eager, expected):
    platform, backend = MinimalPlatform(), BareBackend()
    platform.supports_cuda_graphs = platform_graphs
    backend.supports_cuda_graphs = backend_graphs
    config = EngineConfig.from_dict({"model": str(tiny_qwen2), "enforce_eager": enforce_eager})
    assert use_cuda_graphs(config, platform, backend) is expected


class PlatformPlugin:
    def __init__(self, platform: Platform) -> None:
        self.platform = platform

    @hookimpl
    def register_platforms(self, register):
        register(self.platform.name, lambda: self.platform, priority=-1)


def greedy_tokens(tiny_qwen2, platform: str, manager=None, **overrides) -> list[list[int]]:
    config = EngineConfig.from_dict({
        "model": str(tiny_qwen2), "dtype": "float32", "max_model_len": 64,
        "platform": platform, "attention": "torch", **overrides})
    engine = Engine(config, plugin_manager=manager)
    params = SamplingParams(max_tokens=6, temperature=0.0, ignore_eos=True)
    for index, prompt in enumerate([[1, 2, 3], [4, 5, 6, 7, 8]]):
        engine.add_request(f"r{index}", {"prompt_token_ids": prompt}, params)
    finished = {}
    while engine.has_unfinished_requests():
        for output in engine.step():
            if output.finished:
                finished[output.request_id] = output.outputs[0].token_ids
    assert engine.components.runner.cuda_graphs is None
    return [finished["r0"], finished["r1"]]


@pytest.mark.parametrize("async_scheduling", [False, True])
def test_platform_with_only_the_abstract_methods_runs_the_engine(tiny_qwen2, async_scheduling):
    scheduler = {"scheduler": {"async_scheduling": async_scheduling}}
    platform = CountingPlatform()
    manager = make_plugin_manager(extra_plugins={"counting_platform": PlatformPlugin(platform)})
    tokens = greedy_tokens(tiny_qwen2, "counting", manager, **scheduler)
    assert tokens == greedy_tokens(tiny_qwen2, "cpu", **scheduler)
    # Its default events waited for the host copies through its synchronize().
    assert platform.num_synchronizes > 0
