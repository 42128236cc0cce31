"""The flash_attn (FlashAttention-3) backend on the CPU: registration, validate's
reasons, finding and loading the kernel library once, and the metadata a CUDA graph
relies on. The kernels themselves need a Hopper GPU and vLLM's library; there the
conformance suite checks them (pytest --pyargs kvloom.testing --kvloom-plugin flash_attn)."""

from __future__ import annotations

import json
import os
import subprocess
import sys

import pytest
import torch

from kvloom import make_plugin_manager
from kvloom.interfaces.attention import AttentionInputs, AttentionSpec
from kvloom.plugins.attention import flash_attn
from kvloom.plugins.attention.flash_attn import FlashAttentionBackend
from kvloom.registry import Registries


def cuda_spec(**changes) -> AttentionSpec:
    fields = dict(num_heads=8, num_kv_heads=2, head_size=128, dtype=torch.bfloat16,
                  block_size=16, device_type="cuda")
    fields.update(changes)
    return AttentionSpec(**fields)


@pytest.fixture(autouse=True)
def isolated(monkeypatch, tmp_path):
    """No real library, no load from an earlier test, and a developer's own vllm or
    $KVLOOM_FLASH_ATTN_LIBRARY stays out of sight."""
    monkeypatch.setattr(flash_attn, "_LOADED", {})
    monkeypatch.setenv(flash_attn.LIBRARY_ENV, str(tmp_path / "absent" / "lib.so"))


@pytest.fixture
def fake_library(monkeypatch, tmp_path):
    """A library file whose loads are recorded instead of performed."""
    path = tmp_path / flash_attn.LIBRARY_NAME
    path.write_bytes(b"")
    loads = []
    monkeypatch.setattr(torch.ops, "load_library", loads.append)
    monkeypatch.setenv(flash_attn.LIBRARY_ENV, str(path))
    return path, loads


@pytest.fixture
def hopper(monkeypatch):
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    monkeypatch.setattr(torch.cuda, "get_device_capability", lambda device=None: (9, 0))


def test_registers_under_flash_attn_through_the_registry():
    manager = make_plugin_manager()
    registry = Registries(manager)["attention"]
    component = registry.get("flash_attn")
    assert component.plugin_name == "flash_attn_attention"
    assert component.factory is FlashAttentionBackend
    assert manager.plugin_infos["flash_attn_attention"].module == "kvloom.plugins.attention.flash_attn"
    backend = registry.create("flash_attn")
    assert backend.name == "flash_attn" and backend.supports_cuda_graphs is True


def test_cpu_spec_names_the_device_and_the_missing_library(monkeypatch, tmp_path):
    missing = tmp_path / "nowhere" / flash_attn.LIBRARY_NAME
    monkeypatch.setenv(flash_attn.LIBRARY_ENV, str(missing))
    reasons = FlashAttentionBackend().validate(cuda_spec(device_type="cpu"))
    text = "\n".join(reasons)
    assert "needs a CUDA device, got cpu" in text
    if not torch.cuda.is_available():
        assert "torch.cuda is not available" in text
    [library] = [reason for reason in reasons if str(missing) in reason]
    assert flash_attn.LIBRARY_ENV in library and "vllm 0.26" in library


@pytest.mark.parametrize("changes, expected", [
    (dict(dtype=torch.float32), "dtype torch.float32"),
    (dict(head_size=80), "head size 80"),
    (dict(block_size=8), "block size 8"),
    (dict(num_heads=6, num_kv_heads=4), "num_heads 6 is not a multiple of num_kv_heads 4"),
])
def test_each_unsupported_shape_is_named(hopper, fake_library, changes, expected):
    assert FlashAttentionBackend().validate(cuda_spec()) == []
    reasons = FlashAttentionBackend().validate(cuda_spec(**changes))
    assert [reason for reason in reasons if expected in reason], reasons
    assert len(reasons) == 1, reasons


def test_a_gpu_that_is_not_hopper_is_named(monkeypatch, fake_library):
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    monkeypatch.setattr(torch.cuda, "get_device_capability", lambda device=None: (8, 0))
    assert FlashAttentionBackend().validate(cuda_spec()) == [
        "compute capability 8.0 is not 9.x: FlashAttention-3 runs on Hopper GPUs only"]


def test_missing_triton_is_named(monkeypatch, hopper, fake_library):
    real_find_spec = flash_attn.importlib.util.find_spec
    monkeypatch.setattr(flash_attn.importlib.util, "find_spec",
                        lambda name: None if name == "triton" else real_find_spec(name))
    reasons = FlashAttentionBackend().validate(cuda_spec())
    assert reasons == ["the triton package is not installed (it writes the KV cache)"]


def test_the_library_is_loaded_once(hopper, fake_library):
    path, loads = fake_library
    backend = FlashAttentionBackend()
    assert backend.validate(cuda_spec()) == []
    assert backend.validate(cuda_spec()) == []
    assert FlashAttentionBackend().validate(cuda_spec()) == []
    assert loads == [str(path.resolve())]


def test_a_load_error_is_a_reason_and_is_not_retried(monkeypatch, hopper, fake_library):
    path, _ = fake_library
    attempts = []

    def fail(library):
        attempts.append(library)
        raise OSError("undefined symbol: _ZN3c104cuda9SetDevice")

    monkeypatch.setattr(torch.ops, "load_library", fail)
    backend = FlashAttentionBackend()
    for _ in range(2):
        [reason] = backend.validate(cuda_spec())
        assert str(path) in reason and "undefined symbol: _ZN3c104cuda9SetDevice" in reason
        assert torch.__version__ in reason
    assert len(attempts) == 1
    with pytest.raises(RuntimeError, match="undefined symbol"):
        backend.make_impl(cuda_spec(), 0.1)


def test_the_library_is_found_in_an_installed_vllm_without_importing_it(
        monkeypatch, tmp_path):
    monkeypatch.delenv(flash_attn.LIBRARY_ENV)
    package = tmp_path / "site" / "vllm"
    (package / "vllm_flash_attn").mkdir(parents=True)
    (package / "__init__.py").write_text("raise ImportError('vllm must not be imported')\n")
    monkeypatch.syspath_prepend(str(tmp_path / "site"))
    path, why = flash_attn.find_library()
    assert path is None and str(package) in why and flash_attn.LIBRARY_NAME in why
    library = package / "vllm_flash_attn" / flash_attn.LIBRARY_NAME
    library.write_bytes(b"")
    assert flash_attn.find_library() == (str(library), "")
    assert "vllm" not in sys.modules


def test_without_vllm_or_the_variable_the_reason_says_how_to_get_it(monkeypatch):
    monkeypatch.delenv(flash_attn.LIBRARY_ENV)
    monkeypatch.setattr(flash_attn.importlib.util, "find_spec", lambda name: None)
    path, why = flash_attn.find_library()
    assert path is None
    assert "vllm is not installed" in why and flash_attn.LIBRARY_ENV in why


def test_importing_the_module_loads_nothing(tmp_path):
    library = tmp_path / flash_attn.LIBRARY_NAME
    library.write_bytes(b"")
    code = (
        "import json, sys, torch\n"
        "loads = []\n"
        "torch.ops.load_library = loads.append\n"
        "import kvloom.plugins.attention.flash_attn\n"
        "heavy = ('triton', 'vllm', 'kvloom.plugins.attention.triton_kernels')\n"
        "print(json.dumps([loads, [m for m in heavy if m in sys.modules]]))\n"
    )
    env = {**os.environ, flash_attn.LIBRARY_ENV: str(library)}
    result = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True,
                            env=env, timeout=120)
    assert result.returncode == 0, result.stderr
    assert json.loads(result.stdout) == [[], []]


def inputs(query_lens, seq_lens, width, max_num_blocks) -> AttentionInputs:
    """A batch whose block tables are the first ``width`` columns of a wider buffer."""
    num_seqs = len(seq_lens)
    buffer = torch.zeros(num_seqs, max_num_blocks, dtype=torch.int32)
    query_start = torch.tensor([0, *torch.tensor(query_lens).cumsum(0).tolist()],
                               dtype=torch.int32)
    seq_lens_t = torch.tensor(seq_lens, dtype=torch.int32)
    return AttentionInputs(query_start, seq_lens_t, buffer[:, :width],
                           torch.zeros(sum(query_lens), dtype=torch.int64), query_start,
                           seq_lens_t, max(query_lens), max(seq_lens),
                           sum(q == 1 for q in query_lens))


def test_decode_metadata_depends_only_on_the_batch_shape(fake_library):
    backend = FlashAttentionBackend()
    backend.make_impl(cuda_spec(block_size=16), 0.1)
    decode = backend.build_metadata(inputs([1, 1, 1], [5, 40, 17], width=3, max_num_blocks=8))
    assert (decode.max_seqlen_q, decode.max_seqlen_k, decode.num_splits) == (1, 48, 1)
    longer = backend.build_metadata(inputs([1, 1, 1], [9, 44, 30], width=3, max_num_blocks=8))
    assert (longer.max_seqlen_q, longer.max_seqlen_k) == (1, 48)
    prefill = backend.build_metadata(inputs([7, 1], [7, 40], width=3, max_num_blocks=8))
    assert (prefill.max_seqlen_q, prefill.max_seqlen_k, prefill.num_splits) == (7, 40, 0)


@pytest.mark.parametrize("num_seqs, splits", [(1, 32), (8, 17), (64, 3), (512, 1)])
def test_decode_splits_fill_the_gpu(fake_library, num_seqs, splits):
    backend = FlashAttentionBackend()
    backend.make_impl(cuda_spec(num_kv_heads=2), 0.1)
    backend._num_sms = 132  # an H100 SXM / H200
    assert backend.num_decode_splits(num_seqs, torch.device("cuda")) == splits


def test_metadata_before_make_impl_is_a_clear_error():
    with pytest.raises(RuntimeError, match="make_impl must be called before build_metadata"):
        FlashAttentionBackend().build_metadata(inputs([1], [3], 1, 1))


def test_kv_cache_shape_is_kvloom_layout():
    assert FlashAttentionBackend().kv_cache_shape(10, cuda_spec()) == (2, 10, 16, 2, 128)
