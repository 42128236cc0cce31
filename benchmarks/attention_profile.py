"""Where paged decode attention's time goes: a profile by differences, on the GPU.

For batch 1 and 64 at 4096 tokens of context (GQA 28/4 x 128, bf16, block 16) it
times, each from a CUDA graph of several layers' worth (as attention_kernels.py does):
the cuda_paged backend's cache write alone, its decode kernel at several fixed split
counts (the merge kernel included when split), and the whole forward as the engine
runs it; and the flash_attn backend's forward at several split counts. The rows say
what a miss in attention_kernels.py's table is made of.

    python benchmarks/attention_profile.py [--contexts 4096] [--batches 1 64]
"""

from __future__ import annotations

import argparse
import dataclasses

import torch

from attention_kernels import (Case, Config, build_case, copies_beyond_l2, load_attention_registry,
                               make_timer, time_steps)
from latency import measure_copy_bandwidth


def cuda_paged_rows(registry, cfg: Config, data, timer) -> list[tuple[str, float]]:
    backend = registry.create("cuda_paged")
    impl = backend.make_impl(cfg.spec(), cfg.head_size ** -0.5)
    metadata = backend.build_metadata(data.inputs)
    caches = new_caches(backend, cfg, data)
    kernels = impl.kernels

    def decode_at(splits: int):
        partial_out = metadata.partial_out.new_empty(
            (data.case.batch, cfg.num_heads, splits, cfg.head_size))
        partial_lse = metadata.partial_lse.new_empty((data.case.batch, cfg.num_heads, splits))
        out = torch.empty_like(data.query)
        return [lambda c=c: kernels.paged_decode(out, data.query, c, metadata.block_tables,
                                                 metadata.seq_lens, partial_out, partial_lse,
                                                 splits, cfg.head_size ** -0.5)
                for c in caches]

    rows = [("cuda_paged write only", timed(timer, [
        lambda c=c: kernels.write_kv_cache(data.key, data.value, c, metadata.slot_mapping)
        for c in caches]))]
    for splits in sorted({1, 4, 16, 64, metadata.num_splits}):
        rows.append((f"cuda_paged decode, {splits} splits", timed(timer, decode_at(splits))))
    rows.append((f"cuda_paged forward ({metadata.num_splits} splits)", timed(timer, [
        lambda c=c: impl.forward(data.query, data.key, data.value, c, metadata)
        for c in caches])))
    return rows


def flash_attn_rows(registry, cfg: Config, data, timer) -> list[tuple[str, float]]:
    backend = registry.create("flash_attn")
    impl = backend.make_impl(cfg.spec(), cfg.head_size ** -0.5)
    metadata = backend.build_metadata(data.inputs)
    caches = new_caches(backend, cfg, data)
    rows = []
    for splits in sorted({1, 2, 4, 8, 16, metadata.num_splits}):
        fixed = dataclasses.replace(metadata, num_splits=splits)
        label = f"flash_attn forward, {splits} splits" + (
            " (the backend's choice)" if splits == metadata.num_splits else "")
        rows.append((label, timed(timer, [
            lambda c=c: impl.forward(data.query, data.key, data.value, c, fixed)
            for c in caches])))
    return rows


def new_caches(backend, cfg: Config, data) -> list[torch.Tensor]:
    """Random caches, enough of them that rotating over them misses the L2."""
    shape = backend.kv_cache_shape(data.num_blocks, cfg.spec())
    first = torch.randn(shape, dtype=cfg.dtype, device=cfg.device)
    count = copies_beyond_l2(first.numel() * first.element_size(), cfg.device)
    return [first] + [first.clone() for _ in range(count - 1)]


def timed(timer, steps) -> float:
    ms, _ = time_steps(steps, True, timer)
    return ms


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--batches", type=int, nargs="+", default=[1, 64])
    parser.add_argument("--contexts", type=int, nargs="+", default=[4096])
    args = parser.parse_args()
    cfg = Config()
    timer = make_timer(cfg.device)
    registry = load_attention_registry()
    bandwidth = measure_copy_bandwidth() / 1e9
    table = []
    for batch in args.batches:
        for context in args.contexts:
            case = Case("decode", batch, context, 1)
            data = build_case(case, cfg)
            for rows in (cuda_paged_rows, flash_attn_rows):
                try:
                    measured = rows(registry, cfg, data, timer)
                except Exception as exc:  # report and go on with the other backend
                    print(f"{case.label} {rows.__name__}: failed: {type(exc).__name__}: {exc}")
                    continue
                for label, ms in measured:
                    table.append((case.label, label, ms, case.work(cfg) / ms / 1e6))
            del data
            torch.cuda.empty_cache()
    print(f"\ndecode attention profile, GQA 28/4 x 128, bf16, block 16; "
          f"{torch.cuda.get_device_name()}; copy {bandwidth:.0f} GB/s")
    print(f"{'shape':>10}  {'variant':<48}{'us':>9}{'GB/s':>8}{'%copy':>7}")
    for shape, label, ms, gbs in table:
        print(f"{shape:>10}  {label:<48}{ms * 1e3:>9.1f}{gbs:>8.0f}{gbs / bandwidth:>7.0%}")


if __name__ == "__main__":
    main()
