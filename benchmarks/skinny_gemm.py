"""Decode-sized linear layers (M = 1 and 8): the Triton skinny GEMM's tiles against cuBLAS.

Shapes are qwen2-7b's and qwen2-0.5b's projections and lm_heads, bf16. Prints GB/s of
weight bytes streamed for cuBLAS (torch.nn.functional.linear) and the best tile.

    python benchmarks/skinny_gemm.py
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path

SHAPES = {  # name: (N, K)
    "7b.qkv": (4608, 3584), "7b.o_proj": (3584, 3584), "7b.gate_up": (37888, 3584),
    "7b.down": (3584, 18944), "7b.lm_head": (152064, 3584),
    "0.5b.qkv": (1152, 896), "0.5b.o_proj": (896, 896), "0.5b.gate_up": (9728, 896),
    "0.5b.down": (896, 4864),
}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--rows", type=int, nargs="+", default=[1, 8])
    parser.add_argument("--json", type=Path, default=None)
    args = parser.parse_args()
    import torch
    import triton

    from kvloom.plugins.models.layers.skinny_gemm import candidate_tiles, skinny_linear

    results = []
    for name, (n, k) in SHAPES.items():
        weight = torch.randn(n, k, dtype=torch.bfloat16, device="cuda") * 0.02
        bias = torch.randn(n, dtype=torch.bfloat16, device="cuda") if "qkv" in name else None
        for rows in args.rows:
            x = torch.randn(rows, k, dtype=torch.bfloat16, device="cuda")
            reference = torch.nn.functional.linear(x.float(), weight.float(),
                                                   None if bias is None else bias.float())
            cublas_ms = triton.testing.do_bench(
                lambda: torch.nn.functional.linear(x, weight, bias), return_mode="median")
            best = None
            for tile in candidate_tiles():
                out = skinny_linear(x, weight, bias, tile)
                error = ((out.float() - reference).norm() / reference.norm()).item()
                if error > 2e-2:
                    raise AssertionError(f"{name} tile {tile}: relative error {error}")
                ms = triton.testing.do_bench(lambda: skinny_linear(x, weight, bias, tile),
                                             return_mode="median")
                if best is None or ms < best[1]:
                    best = (tile, ms)
            weight_bytes = n * k * 2
            row = {"shape": name, "rows": rows, "cublas_us": cublas_ms * 1e3,
                   "cublas_gbs": weight_bytes / cublas_ms / 1e6, "best_tile": best[0],
                   "triton_us": best[1] * 1e3, "triton_gbs": weight_bytes / best[1] / 1e6}
            results.append(row)
            print(f"{name:>14} M={rows}: cuBLAS {row['cublas_us']:7.1f} us "
                  f"{row['cublas_gbs']:6.0f} GB/s | triton {row['triton_us']:7.1f} us "
                  f"{row['triton_gbs']:6.0f} GB/s  tile {best[0]}", flush=True)
    if args.json:
        args.json.write_text(json.dumps(results, indent=2))


if __name__ == "__main__":
    main()
