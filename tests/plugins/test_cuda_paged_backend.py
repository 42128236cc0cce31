"""The cuda_paged backend on a machine without CUDA: clean refusals, nothing built.

Its kernels are checked on the GPU by the conformance suite and
tests/gpu/test_gpu_attention_backends.py.
"""

from __future__ import annotations

import torch

from kvloom import make_plugin_manager
from kvloom.interfaces.attention import AttentionSpec
from kvloom.plugins.attention import cuda_paged_build
from kvloom.registry import Registries


def spec(**overrides) -> AttentionSpec:
    fields = dict(num_heads=8, num_kv_heads=2, head_size=128, dtype=torch.bfloat16,
                  block_size=16, device_type="cuda")
    fields.update(overrides)
    return AttentionSpec(**fields)


def backend():
    return Registries(make_plugin_manager())["attention"].create("cuda_paged")


def test_registered_and_refuses_the_cpu_with_the_device_named():
    reasons = backend().validate(spec(device_type="cpu"))
    assert reasons == ["needs a CUDA device, got cpu"]


def test_refuses_what_the_kernels_do_not_cover(monkeypatch):
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    monkeypatch.setattr(cuda_paged_build, "missing_build_tools", lambda: [])
    assert backend().validate(spec()) == []
    assert backend().validate(spec(dtype=torch.float32)) == [
        "dtype torch.float32 is not supported (float16 and bfloat16 are)"]
    assert backend().validate(spec(head_size=80)) == [
        "head size 80 is not one of (64, 128, 256)"]
    assert backend().validate(spec(num_heads=6, num_kv_heads=4)) == [
        "num_heads is not a multiple of num_kv_heads"]


def test_missing_build_tools_are_reasons(monkeypatch):
    from torch.utils import cpp_extension

    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    monkeypatch.setattr(cpp_extension, "CUDA_HOME", None)
    monkeypatch.setattr(cpp_extension, "is_ninja_available", lambda: False)
    reasons = backend().validate(spec())
    assert "the CUDA toolkit (nvcc) was not found: set CUDA_HOME" in reasons
    assert "ninja is not installed (pip install ninja)" in reasons
    if torch.version.cuda is None:  # the CPU build CI runs
        assert any("built without CUDA" in reason for reason in reasons)


def test_the_build_key_follows_sources_torch_and_arch(monkeypatch, tmp_path):
    for name in cuda_paged_build.SOURCES + cuda_paged_build.HEADERS:
        (tmp_path / name).write_bytes((cuda_paged_build.SOURCE_DIR / name).read_bytes())
    monkeypatch.setattr(cuda_paged_build, "SOURCE_DIR", tmp_path)
    key = cuda_paged_build.build_key("90")
    assert key.endswith("-sm90") and cuda_paged_build.build_key("80") != key
    with open(tmp_path / "paged_attention_kernels.cu", "a") as source:
        source.write("\n// changed\n")
    changed = cuda_paged_build.build_key("90")
    assert changed != key
    monkeypatch.setattr(torch, "__version__", "0.0.0-other")
    assert cuda_paged_build.build_key("90") != changed


def test_the_sources_ship_beside_the_module():
    for name in cuda_paged_build.SOURCES + cuda_paged_build.HEADERS:
        assert (cuda_paged_build.SOURCE_DIR / name).is_file(), name
