"""Conformance: a platform answers its device and memory queries consistently, and
tensors round-trip through its device. A platform that says it cannot run on this
machine (``validate``) is skipped with its reasons."""

from __future__ import annotations

import pytest
import torch


@pytest.fixture
def platform(platform_component):
    platform = platform_component.factory()
    reasons = platform.validate()
    assert isinstance(reasons, list) and all(isinstance(r, str) for r in reasons), (
        "validate() returns a list of reasons (strings)")
    if reasons:
        pytest.skip(f"platform {platform_component.name!r} cannot run here: "
                    f"{'; '.join(reasons)}")
    return platform


def test_device_matches_device_type(platform):
    device = platform.device()
    assert isinstance(device, torch.device)
    assert device.type == platform.device_type


def test_supported_dtypes(platform):
    dtypes = platform.supported_dtypes()
    assert dtypes and all(isinstance(dtype, torch.dtype) for dtype in dtypes)
    assert all(dtype.is_floating_point for dtype in dtypes)


def test_tensors_round_trip(platform):
    device = platform.device()
    generator = torch.Generator().manual_seed(0)
    for dtype in platform.supported_dtypes():
        host = torch.randn(257, 33, generator=generator).to(dtype)
        on_device = host.to(device)
        result = (on_device * 2).cpu()
        platform.synchronize()
        assert on_device.device.type == platform.device_type
        assert torch.equal(result, host * 2), dtype


def test_seeding_is_reproducible(platform):
    device = platform.device()
    platform.seed_everything(1234)
    first = torch.randn(64, device=device).cpu()
    platform.seed_everything(1234)
    assert torch.equal(torch.randn(64, device=device).cpu(), first)


def test_kv_cache_memory(platform):
    requested = 64 << 20
    assert platform.kv_cache_memory_bytes(requested, 0.9) == requested, (
        "an explicit KV-cache budget is used as given")
    default = platform.kv_cache_memory_bytes(None, 0.5)
    assert isinstance(default, int) and default > 0
    assert platform.kv_cache_memory_bytes(None, 0.25) <= platform.kv_cache_memory_bytes(None, 0.9)


def test_attention_candidates_are_names(platform, conformance_registries):
    candidates = platform.attention_candidates()
    assert candidates and all(isinstance(name, str) for name in candidates)
    registered = set(conformance_registries["attention"].names())
    assert registered & set(candidates), (
        f"none of {candidates} is an installed attention backend ({sorted(registered)})")


def test_capabilities_are_declared_flags(platform):
    for name in ("uses_pinned_memory", "supports_cuda_graphs", "needs_profile_run"):
        assert isinstance(getattr(platform, name), bool), f"{name} is a bool class attribute"


def test_an_event_orders_a_copy_to_the_host(platform):
    """The worker copies results into (pinned, when the platform says so) host memory
    without blocking, records an event and waits on it before reading."""
    on_device = torch.arange(4096, dtype=torch.float32, device=platform.device()) * 3
    host = torch.empty(4096, dtype=torch.float32, pin_memory=platform.uses_pinned_memory)
    host.copy_(on_device, non_blocking=True)
    event = platform.new_event()
    event.record()
    event.synchronize()
    assert torch.equal(host, torch.arange(4096, dtype=torch.float32) * 3)


def test_graph_capture_matches_the_declared_capability(platform):
    """With ``supports_cuda_graphs`` a captured graph replays on refilled inputs;
    without, asking for a graph fails clearly rather than half-working."""
    if not platform.supports_cuda_graphs:
        with pytest.raises(NotImplementedError):
            platform.new_graph()
        return
    static_input = torch.zeros(16, device=platform.device())
    graph, pool = platform.new_graph(), platform.new_graph_pool()
    static_input.copy_(torch.ones(16))
    static_output = static_input * 2 + 1  # warm up outside the capture
    platform.synchronize()
    with platform.capture_graph(graph, pool):
        static_output = static_input * 2 + 1
    static_input.copy_(torch.arange(16, dtype=torch.float32))
    graph.replay()
    platform.synchronize()
    assert torch.equal(static_output.cpu(), torch.arange(16, dtype=torch.float32) * 2 + 1)
