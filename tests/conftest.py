"""Shared fixtures: tiny checkpoints, and a KV-leak check after every test."""

from __future__ import annotations

import weakref
from dataclasses import astuple

import pytest

from kvloom.testing.checkpoints import TinyQwen2Spec, make_tiny_qwen2


@pytest.fixture(autouse=True, scope="session")
def single_torch_thread():
    """Tiny matrices: a second intra-op thread only adds synchronisation, and stalls
    badly when other processes share the cores."""
    import torch

    previous = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(previous)


@pytest.fixture(scope="session")
def tiny_qwen2_factory(tmp_path_factory):
    """make(spec=None, num_shards=1) -> path of a tiny random Qwen2 checkpoint (cached)."""
    cache = {}

    def make(spec: TinyQwen2Spec | None = None, num_shards: int = 1):
        spec = spec or TinyQwen2Spec()
        key = (astuple(spec), num_shards)
        if key not in cache:
            cache[key] = make_tiny_qwen2(tmp_path_factory.mktemp("tiny_qwen2"), spec, num_shards)
        return cache[key]

    return make


@pytest.fixture(scope="session")
def tiny_qwen2(tiny_qwen2_factory):
    """The default tiny Qwen2 checkpoint (GQA 4/2 heads, untied embeddings)."""
    return tiny_qwen2_factory()


@pytest.fixture(autouse=True)
def kv_blocks_all_returned(monkeypatch):
    """Every engine built in a test must end it with every KV block back in the pool."""
    from kvloom.engine.engine import Engine

    engines: list[weakref.ref] = []
    original_init = Engine.__init__

    def tracking_init(self, *args, **kwargs):
        original_init(self, *args, **kwargs)
        engines.append(weakref.ref(self))

    monkeypatch.setattr(Engine, "__init__", tracking_init)
    yield
    for ref in engines:
        engine = ref()
        if engine is None or engine.has_unfinished_requests():
            continue
        kv = engine.components.kv_cache_manager
        assert kv.num_free_blocks() == kv.num_blocks, (
            f"{kv.num_blocks - kv.num_free_blocks()} KV blocks still held after the test")
