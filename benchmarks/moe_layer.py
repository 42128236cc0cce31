"""One MoE layer's routed experts: the fused Triton kernel against the per-expert loop.

Defaults are qwen1.5-moe-a2.7b's sparse layer (hidden 2048, 60 experts, top-4,
moe_intermediate 1408), bf16; Qwen2-57B-A14B's is --hidden 3584 --experts 64 --top-k 8
--intermediate 2560. Routing: random router logits through route_top_k (no
renormalising). Every M is first checked against experts_reference run in float32 on the
same weights. Fused times are CUDA-graph replays of the whole fused_experts call (as the
engine's decode steps run it), "eager" the same call op by op; all times are
triton.testing.do_bench medians with L2 flushed before each rep. TFLOP/s count useful
work, 2 * M * top_k * 3 * H * I; GB/s count each expert hit once (3 * H * I weights) plus
the tokens in and out. --sweep times each GEMM's candidate tiles per block_m and compares
the best pair with pick_tiles.

    python benchmarks/moe_layer.py [--sweep] [--json results.json]
"""

from __future__ import annotations

import argparse
import json
import time
from pathlib import Path

import torch
import triton

from kvloom.plugins.models.layers import fused_moe, moe_sort
from kvloom.testing.cuda_graphs import capture_graph
from kvloom.plugins.models.layers.moe import Routing, experts_reference, route_top_k

TOKENS = [1, 8, 32, 64, 128, 256, 512, 1024, 2048, 4096, 8192]
ROUTER_SCALE = 2.0  # logit spread: sharper than uniform weights, like a trained router
SWEEP_BLOCK_M = (16, 32, 64, 128)
# (block_n, block_k, num_warps, num_stages): short row blocks stream weights (narrow N,
# deep K, more stages in flight); tall ones are compute bound (wide N, more warps).
SWEEP_SHORT = [(n, k, 4, s) for n, k in ((32, 128), (32, 256), (64, 128), (64, 256),
                                         (128, 128)) for s in (3, 5)]
SWEEP_TALL = [(n, k, w, s) for n, k in ((64, 64), (64, 128), (128, 64), (128, 128),
                                        (256, 64)) for w, s in ((4, 3), (8, 4))]


def tile_name(tile) -> str:
    return (f"{tile.block_m}x{tile.block_n}x{tile.block_k} g{tile.group_m} "
            f"w{tile.num_warps} s{tile.num_stages}")


def bench_ms(fn, rep: int = 40) -> float:
    return triton.testing.do_bench(fn, warmup=10, rep=rep, return_mode="median")


def rel_error(out, expected) -> float:
    return ((out.float() - expected).norm() / expected.norm()).item()


def check(out, x, weights32, routing) -> tuple[bool, float]:
    """(passes, relative error) of ``out`` against the float32 loop on the same weights.
    atol scales with the output's RMS so the bar is the same at any layer size."""
    reference = experts_reference(x.float(), *weights32,
                                  Routing(routing.weights.float(), routing.expert_ids))
    scale = reference.pow(2).mean().sqrt().item()
    try:
        torch.testing.assert_close(out.float(), reference, atol=2e-2 * scale, rtol=2e-2)
    except AssertionError:
        return False, rel_error(out, reference)
    return True, rel_error(out, reference)


def best_tile(run, out, expected, tiles) -> tuple[float, object] | None:
    """(ms, tile) of the fastest tile whose ``run(tile, out)`` matches ``expected``. Tiles that
    fail to compile or exceed shared memory raise at their first launch and are skipped."""
    best = None
    for tile in tiles:
        out.fill_(float("nan"))  # a tile that skips rows must not pass on stale values
        try:
            run(tile, out)
        except Exception:  # noqa: BLE001 - OutOfResources, compile errors: not a candidate
            continue
        if not rel_error(out, expected) <= 1e-2:
            print(f"    tile {tile_name(tile)}: wrong output, skipped", flush=True)
            continue
        ms = bench_ms(lambda: run(tile, out), rep=15)
        if best is None or ms < best[0]:
            best = (ms, tile)
    return best


def sweep(x, gate_up, down, routing, default_ms: float) -> dict:
    """Best (gate/up, down) tile pair for this batch: each GEMM timed alone on the layout of
    each block_m, the pair with the least total then timed as a whole graph."""
    ids, top_k = routing.expert_ids, routing.expert_ids.shape[1]
    num_experts, num_pairs = gate_up.shape[0], ids.numel()
    rows_per_expert = num_pairs / num_experts
    weights = routing.weights.flatten().contiguous()
    # The default tiles' intermediate and per-pair outputs are what every candidate must give.
    default = fused_moe.pick_tiles(num_pairs, num_experts)
    layout = moe_sort.align_to_blocks(ids, num_experts, default[0].block_m)
    activated = torch.empty(num_pairs, down.shape[2], dtype=x.dtype, device=x.device)
    per_pair = torch.empty(num_pairs, down.shape[1], dtype=x.dtype, device=x.device)
    fused_moe._grouped_gemm(x, gate_up, activated, layout, default[0], num_pairs, top_k,
                            True, None)
    fused_moe._grouped_gemm(activated, down, per_pair, layout, default[1], num_pairs, 1,
                            False, weights)
    expected = (activated.float(), per_pair.float())
    candidates = []
    for block_m in SWEEP_BLOCK_M:
        # Blocks far taller than an expert's rows are padding; far shorter ones re-read weights.
        if block_m > max(16, 4 * rows_per_expert) or block_m < rows_per_expert / 16:
            continue
        layout = moe_sort.align_to_blocks(ids, num_experts, block_m)
        group_m = {16: 1, 32: 4}.get(block_m, 8)
        tiles = [fused_moe.Tile(block_m, *shape[:2], group_m, *shape[2:])
                 for shape in (SWEEP_SHORT if block_m <= 32 else SWEEP_TALL)]

        def run_up(tile, out, layout=layout):
            fused_moe._grouped_gemm(x, gate_up, out, layout, tile, num_pairs, top_k, True, None)

        def run_down(tile, out, layout=layout):
            fused_moe._grouped_gemm(activated, down, out, layout, tile, num_pairs, 1, False,
                                    weights)

        up = best_tile(run_up, torch.empty_like(activated), expected[0], tiles)
        dn = best_tile(run_down, torch.empty_like(per_pair), expected[1], tiles)
        if up and dn:
            candidates.append((up[0] + dn[0], up[1], dn[1]))
    _, up_tile, down_tile = min(candidates, key=lambda c: c[0])
    graph, out = capture_graph(lambda: fused_moe.fused_experts(
        x, gate_up, down, routing.weights, ids, (up_tile, down_tile)))
    graph.replay()
    best_ms = bench_ms(graph.replay)
    default_out = per_pair.view(*ids.shape, -1).sum(1).float()
    return {"gate_up_tile": tile_name(up_tile), "down_tile": tile_name(down_tile),
            "best_us": best_ms * 1e3, "default_tiles": [tile_name(t) for t in default],
            "default_us": default_ms * 1e3,
            "best_matches": rel_error(out, default_out) < 1e-2}


def bench_tokens(m: int, gate_up, down, weights32, top_k: int, do_sweep: bool) -> dict:
    num_experts, hidden, intermediate = down.shape
    torch.manual_seed(m)
    x = torch.randn(m, hidden, dtype=gate_up.dtype, device=gate_up.device)
    logits = torch.randn(m, num_experts, device=x.device) * ROUTER_SCALE
    routing = route_top_k(logits.to(x.dtype), top_k, renormalize=False)

    def fused():
        return fused_moe.fused_experts(x, gate_up, down, routing.weights, routing.expert_ids)

    eager_out = fused()
    passed, error = check(eager_out, x, weights32, routing)
    graph, graph_out = capture_graph(fused)
    graph.replay()
    passed = passed and torch.equal(graph_out, eager_out)
    fused_ms, eager_ms = bench_ms(graph.replay), bench_ms(fused)
    loop_ms = bench_ms(lambda: experts_reference(x, gate_up, down, routing))
    flops = 2 * m * top_k * 3 * hidden * intermediate
    hit = routing.expert_ids.unique().numel()
    nbytes = (hit * 3 * hidden * intermediate + 2 * m * hidden) * x.element_size()
    row = {"tokens": m, "experts_hit": hit, "passed": passed, "rel_error": error,
           "fused_us": fused_ms * 1e3, "fused_tflops": flops / fused_ms / 1e9,
           "fused_gbs": nbytes / fused_ms / 1e6, "eager_us": eager_ms * 1e3,
           "loop_us": loop_ms * 1e3, "loop_tflops": flops / loop_ms / 1e9,
           "speedup": loop_ms / fused_ms}
    print(f"M={m:>5}: {'pass' if passed else 'FAIL'} (rel err {error:.1e}), fused "
          f"{row['fused_us']:8.1f} us {row['fused_tflops']:6.1f} TFLOP/s "
          f"{row['fused_gbs']:5.0f} GB/s | loop {row['loop_us']:8.1f} us", flush=True)
    del graph, graph_out
    if do_sweep:
        start = time.perf_counter()
        row["sweep"] = s = sweep(x, gate_up, down, routing, fused_ms)
        print(f"    best {s['gate_up_tile']} + {s['down_tile']}: {s['best_us']:.1f} us vs "
              f"default {s['default_us']:.1f} us ({s['default_us'] / s['best_us']:.2f}x), "
              f"swept in {time.perf_counter() - start:.0f} s"
              + ("" if s["best_matches"] else "  OUTPUT MISMATCH"), flush=True)
    torch.cuda.empty_cache()
    return row


def print_table(rows: list[dict]) -> None:
    sweep = "sweep" in rows[0]
    print(f"{'M':>6}{'hit':>5}{'check':>6}{'fused us':>10}{'TFLOP/s':>9}{'GB/s':>7}"
          f"{'eager us':>10}{'loop us':>10}{'TFLOP/s':>9}{'speedup':>9}"
          + (f"{'best us':>9}{'vs default':>11}" if sweep else ""))
    for r in rows:
        line = (f"{r['tokens']:>6}{r['experts_hit']:>5}{'ok' if r['passed'] else 'FAIL':>6}"
                f"{r['fused_us']:>10.1f}{r['fused_tflops']:>9.1f}{r['fused_gbs']:>7.0f}"
                f"{r['eager_us']:>10.1f}{r['loop_us']:>10.1f}{r['loop_tflops']:>9.1f}"
                f"{r['speedup']:>8.1f}x")
        if sweep:
            best, default = r["sweep"]["best_us"], r["sweep"]["default_us"]
            line += f"{best:>9.1f}{default / best:>10.2f}x"
        print(line)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--tokens", type=int, nargs="+", default=TOKENS)
    parser.add_argument("--experts", type=int, default=60)
    parser.add_argument("--hidden", type=int, default=2048)
    parser.add_argument("--intermediate", type=int, default=1408)
    parser.add_argument("--top-k", type=int, default=4)
    parser.add_argument("--dtype", choices=["bfloat16", "float16"], default="bfloat16")
    parser.add_argument("--sweep", action="store_true", help="search tiles per M")
    parser.add_argument("--json", type=Path, default=None)
    args = parser.parse_args()
    dtype = getattr(torch, args.dtype)
    torch.manual_seed(0)
    shape = (args.experts, 2 * args.intermediate, args.hidden)
    # Scaled by fan-in so activations stay O(1) at any layer size.
    gate_up = torch.randn(shape, dtype=dtype, device="cuda").mul_(args.hidden ** -0.5)
    down = torch.randn(args.experts, args.hidden, args.intermediate, dtype=dtype,
                       device="cuda").mul_(args.intermediate ** -0.5)
    weights32 = (gate_up.float(), down.float())
    rows = [bench_tokens(m, gate_up, down, weights32, args.top_k, args.sweep)
            for m in args.tokens]
    print(f"\nMoE experts E={args.experts} top-{args.top_k} H={args.hidden} "
          f"I={args.intermediate} {args.dtype}, {torch.cuda.get_device_name()}; fused = "
          "CUDA graph replay, eager = same call uncaptured, loop = experts_reference, "
          "speedup = loop / fused")
    print_table(rows)
    if args.json:
        config = {k: getattr(args, k) for k in ("experts", "hidden", "intermediate", "top_k",
                                                "dtype")}
        args.json.write_text(json.dumps({"device": torch.cuda.get_device_name(),
                                         "config": config, "fused_timing": "cuda_graph",
                                         "rows": rows}, indent=2))
    if not all(r["passed"] for r in rows):
        raise SystemExit("fused_experts does not match experts_reference")


if __name__ == "__main__":
    main()
