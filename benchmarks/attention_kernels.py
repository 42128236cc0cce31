"""Paged decode attention kernel: GB/s moved, against the measured copy bandwidth and SDPA.

Batch 1/16/64/256 and context 512-8192, GQA 28/4 heads of 128 (qwen2-7b), bf16,
block size 16, random block tables. Bytes counted: every K and V element read
once, plus the query and output. The same table prints PyTorch SDPA on the same
data laid out contiguously (unpaged), the peer figure docs/benchmarks.md reports.

    python benchmarks/attention_kernels.py
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path


def bench_decode(batch: int, context: int, num_heads: int = 28, num_kv_heads: int = 4,
                 head_size: int = 128, block_size: int = 16) -> dict:
    import torch
    import triton

    from kvloom.interfaces.attention import AttentionInputs, AttentionSpec
    from kvloom.plugins.attention.triton_backend import TritonAttentionBackend

    device = torch.device("cuda")
    dtype = torch.bfloat16
    blocks_per_seq = context // block_size
    num_blocks = batch * blocks_per_seq + 1
    cache = torch.randn(2, num_blocks, block_size, num_kv_heads, head_size, dtype=dtype,
                        device=device)
    block_tables = torch.randperm(num_blocks - 1, device=device)[:batch * blocks_per_seq]
    block_tables = block_tables.view(batch, blocks_per_seq).to(torch.int32)
    seq_lens = torch.full((batch,), context, dtype=torch.int32, device=device)
    query = torch.randn(batch, num_heads, head_size, dtype=dtype, device=device)
    key = torch.randn(batch, num_kv_heads, head_size, dtype=dtype, device=device)
    value = torch.randn_like(key)
    # The new token goes in the last slot of each sequence.
    last_slots = block_tables[:, -1].long() * block_size + block_size - 1
    inputs = AttentionInputs(
        query_start_loc=torch.arange(batch + 1, dtype=torch.int32, device=device),
        seq_lens=seq_lens, block_tables=block_tables, slot_mapping=last_slots,
        query_start_loc_cpu=torch.arange(batch + 1, dtype=torch.int32),
        seq_lens_cpu=seq_lens.cpu(), max_query_len=1, max_seq_len=context,
        num_decode_tokens=batch)
    backend = TritonAttentionBackend()
    spec = AttentionSpec(num_heads, num_kv_heads, head_size, dtype, block_size, "cuda")
    impl = backend.make_impl(spec, head_size ** -0.5)
    metadata = backend.build_metadata(inputs)

    def paged():
        return impl.forward(query, key, value, cache, metadata)

    kv_bytes = 2 * batch * context * num_kv_heads * head_size * 2
    qo_bytes = 2 * batch * num_heads * head_size * 2
    paged_ms = triton.testing.do_bench(paged, warmup=25, rep=100, return_mode="median")

    # Check against SDPA on the same keys/values, gathered contiguously.
    gathered = cache[:, block_tables.long()].reshape(2, batch, context, num_kv_heads, head_size)
    k = gathered[0].transpose(1, 2).repeat_interleave(num_heads // num_kv_heads, dim=1)
    v = gathered[1].transpose(1, 2).repeat_interleave(num_heads // num_kv_heads, dim=1)
    k_c, v_c = gathered[0].transpose(1, 2).contiguous(), gathered[1].transpose(1, 2).contiguous()
    q = query.unsqueeze(2)
    reference = torch.nn.functional.scaled_dot_product_attention(q.float(), k.float(), v.float())
    error = ((paged().float() - reference.squeeze(2)).norm() / reference.norm()).item()

    def sdpa():
        return torch.nn.functional.scaled_dot_product_attention(q, k_c, v_c, enable_gqa=True)

    sdpa_ms = triton.testing.do_bench(sdpa, warmup=25, rep=100, return_mode="median")
    total = kv_bytes + qo_bytes
    return {"batch": batch, "context": context, "paged_us": paged_ms * 1e3,
            "paged_gbs": total / paged_ms / 1e6, "sdpa_us": sdpa_ms * 1e3,
            "sdpa_gbs": total / sdpa_ms / 1e6, "rel_error": error,
            "num_splits": metadata.num_splits}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--batches", type=int, nargs="+", default=[1, 16, 64, 256])
    parser.add_argument("--contexts", type=int, nargs="+", default=[512, 1024, 4096, 8192])
    parser.add_argument("--json", type=Path, default=None)
    args = parser.parse_args()
    import torch

    from latency import measure_copy_bandwidth

    bandwidth = measure_copy_bandwidth() / 1e9
    rows = []
    for batch in args.batches:
        for context in args.contexts:
            if batch * context > 256 * 8192:
                continue
            rows.append(bench_decode(batch, context))
            torch.cuda.empty_cache()
    print(f"\npaged decode attention, GQA 28/4 x 128, bf16, block 16, "
          f"{torch.cuda.get_device_name()}; copy bandwidth {bandwidth:.0f} GB/s")
    print(f"{'batch':>6}{'ctx':>6}{'splits':>7}{'paged us':>10}{'GB/s':>8}{'%copy':>7}"
          f"{'sdpa us':>9}{'GB/s':>8}{'%copy':>7}{'rel err':>9}")
    for r in rows:
        print(f"{r['batch']:>6}{r['context']:>6}{r['num_splits']:>7}{r['paged_us']:>10.1f}"
              f"{r['paged_gbs']:>8.0f}{r['paged_gbs'] / bandwidth:>7.0%}{r['sdpa_us']:>9.1f}"
              f"{r['sdpa_gbs']:>8.0f}{r['sdpa_gbs'] / bandwidth:>7.0%}{r['rel_error']:>9.1e}")
    if args.json:
        args.json.write_text(json.dumps({"bandwidth_gbs": bandwidth, "rows": rows}, indent=2))


if __name__ == "__main__":
    main()
