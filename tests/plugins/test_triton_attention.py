"""Triton paged attention against the torch reference (CPU: TRITON_INTERPRET=1)."""

from __future__ import annotations

import os

import pytest
import torch

triton = pytest.importorskip("triton")
if not torch.cuda.is_available() and os.environ.get("TRITON_INTERPRET") != "1":
    pytest.skip("needs CUDA or TRITON_INTERPRET=1 (set in tests/plugins/conftest.py)",
                allow_module_level=True)

from kvloom.interfaces.attention import AttentionInputs, AttentionSpec  # noqa: E402
from kvloom.plugins.attention.torch_reference import TorchReferenceBackend  # noqa: E402
from kvloom.plugins.attention.triton_backend import TritonAttentionBackend  # noqa: E402

DEVICE = torch.device("cuda" if torch.cuda.is_available() else "cpu")


def make_batch(query_lens, context_lens, block_size, num_blocks, generator):
    """Random block tables: each sequence gets distinct random blocks."""
    seq_lens = [q + c for q, c in zip(query_lens, context_lens)]
    permutation = torch.randperm(num_blocks, generator=generator).tolist()
    tables, slots = [], []
    for query_len, seq_len in zip(query_lens, seq_lens):
        needed = -(-seq_len // block_size)
        blocks = [permutation.pop() for _ in range(needed)]
        tables.append(blocks)
        for position in range(seq_len - query_len, seq_len):
            slots.append(blocks[position // block_size] * block_size + position % block_size)
    width = max(len(t) for t in tables)
    block_tables = torch.tensor([t + [0] * (width - len(t)) for t in tables], dtype=torch.int32)
    query_start = torch.zeros(len(query_lens) + 1, dtype=torch.int32)
    query_start[1:] = torch.cumsum(torch.tensor(query_lens), 0)
    seq_lens_t = torch.tensor(seq_lens, dtype=torch.int32)
    return AttentionInputs(
        query_start_loc=query_start.to(DEVICE), seq_lens=seq_lens_t.to(DEVICE),
        block_tables=block_tables.to(DEVICE),
        slot_mapping=torch.tensor(slots, dtype=torch.int64, device=DEVICE),
        query_start_loc_cpu=query_start, seq_lens_cpu=seq_lens_t,
        max_query_len=max(query_lens), max_seq_len=max(seq_lens),
        num_decode_tokens=sum(1 for q in query_lens if q == 1))


def run_both(spec, query_lens, context_lens, num_blocks=64, seed=0):
    generator = torch.Generator().manual_seed(seed)
    inputs = make_batch(query_lens, context_lens, spec.block_size, num_blocks, generator)
    num_tokens = sum(query_lens)
    shape = (2, num_blocks, spec.block_size, spec.num_kv_heads, spec.head_size)
    # Earlier context is random data already in the cache; new tokens are written.
    cache = torch.randn(shape, generator=generator).to(DEVICE, spec.dtype)
    query = torch.randn(num_tokens, spec.num_heads, spec.head_size, generator=generator)
    key = torch.randn(num_tokens, spec.num_kv_heads, spec.head_size, generator=generator)
    value = torch.randn(num_tokens, spec.num_kv_heads, spec.head_size, generator=generator)
    query, key, value = (t.to(DEVICE, spec.dtype) for t in (query, key, value))
    scale = spec.head_size ** -0.5
    outputs, caches = [], []
    for backend in (TorchReferenceBackend(), TritonAttentionBackend()):
        impl = backend.make_impl(spec, scale)
        layer_cache = cache.clone()
        metadata = backend.build_metadata(inputs)
        outputs.append(impl.forward(query, key, value, layer_cache, metadata))
        caches.append(layer_cache)
    return outputs, caches


def relative_error(out, ref):
    return ((out.float() - ref.float()).norm() / ref.float().norm()).item()


SPECS = [
    AttentionSpec(4, 2, 16, torch.float32, 16, DEVICE.type),   # GQA
    AttentionSpec(4, 4, 32, torch.float32, 8, DEVICE.type),    # MHA, small blocks
    AttentionSpec(6, 1, 24, torch.float32, 16, DEVICE.type),   # group 6, odd head size
]


@pytest.mark.parametrize("spec", SPECS, ids=["gqa", "mha", "mqa-odd-head"])
def test_mixed_prefill_and_decode_matches_reference(spec):
    # fresh prefill, chunked prefill over cached context (a prefix hit), decodes
    query_lens = [37, 20, 1, 1, 5]
    context_lens = [0, 45, 70, 3, 16]
    (ref, out), (ref_cache, out_cache) = run_both(spec, query_lens, context_lens)
    assert relative_error(out, ref) < 1e-4
    assert torch.equal(ref_cache, out_cache)


@pytest.mark.parametrize("spec", SPECS, ids=["gqa", "mha", "mqa-odd-head"])
def test_decode_only_matches_reference(spec):
    query_lens = [1, 1, 1, 1]
    context_lens = [0, 130, 17, 64]
    (ref, out), (ref_cache, out_cache) = run_both(spec, query_lens, context_lens, seed=3)
    assert relative_error(out, ref) < 1e-4
    assert torch.equal(ref_cache, out_cache)


def test_padding_slots_are_skipped():
    from kvloom.plugins.attention.triton_kernels import write_kv_cache

    cache = torch.zeros(2, 4, 4, 2, 8, device=DEVICE)
    key = torch.randn(3, 2, 8, device=DEVICE)
    value = torch.randn(3, 2, 8, device=DEVICE)
    write_kv_cache(key, value, cache, torch.tensor([5, -1, 0], device=DEVICE))
    flat = cache.view(2, 16, 2, 8)
    assert torch.equal(flat[0, 5], key[0]) and torch.equal(flat[1, 0], value[2])
    assert flat[:, [i for i in range(16) if i not in (0, 5)]].abs().sum() == 0


def test_engine_with_triton_attention_matches_hf(tiny_qwen2):
    from kvloom import LLM, SamplingParams
    from kvloom.testing.reference import hf_greedy_generate

    prompts = [[5, 17, 33, 2, 90, 41, 7], list(range(40, 75)), [200, 3]]
    llm = LLM(model=str(tiny_qwen2), dtype="float32", attention="triton",
              max_num_batched_tokens=32, block_size=8, enable_prefix_caching=True)
    outputs = llm.generate([{"prompt_token_ids": p} for p in prompts],
                           SamplingParams(temperature=0, max_tokens=12))
    expected = hf_greedy_generate(tiny_qwen2, prompts, 12)
    assert [o.outputs[0].token_ids for o in outputs] == expected


REAL_SPECS = [
    AttentionSpec(28, 4, 128, torch.bfloat16, 16, "cuda"),   # qwen2-7b
    AttentionSpec(14, 2, 64, torch.bfloat16, 16, "cuda"),    # qwen2-0.5b
    AttentionSpec(28, 4, 128, torch.float32, 16, "cuda"),
]


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")
@pytest.mark.parametrize("spec", REAL_SPECS, ids=["7b-bf16", "0.5b-bf16", "7b-fp32"])
def test_real_sizes_on_gpu_match_reference(spec):
    """Long contexts, chunked prefill over a prefix hit, many decodes, at model sizes."""
    generator = torch.Generator().manual_seed(7)
    query_lens = [512, 300, 1, 1, 1, 64] + [1] * 26
    context_lens = [0, 1800, 4095, 2000, 17, 700] + torch.randint(
        0, 3000, (26,), generator=generator).tolist()
    (ref, out), (ref_cache, out_cache) = run_both(spec, query_lens, context_lens,
                                                  num_blocks=6000, seed=11)
    tolerance = 1e-4 if spec.dtype == torch.float32 else 2e-2
    assert relative_error(out, ref) < tolerance
    assert torch.equal(ref_cache, out_cache)
    decode = [1] * 64
    contexts = torch.randint(1, 4096, (64,), generator=generator).tolist()
    (ref, out), _ = run_both(spec, decode, contexts, num_blocks=20000, seed=12)
    assert relative_error(out, ref) < tolerance
