"""Decode latency at batch 1 and 8 (prompt 32, output 128; vLLM ``bench latency`` defaults).

Prints ms per output token and, for batch 1, the fraction of the weight-bandwidth
floor (weight bytes one token reads / measured device copy bandwidth) that was
achieved. A MoE token reads only its top-k experts of each layer.

    python benchmarks/latency.py --model qwen2-7b
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))

from common import device_short_name, write_model_config  # noqa: E402


def measure_copy_bandwidth() -> float:
    """Device-to-device copy bandwidth in bytes/s, counting bytes read plus written."""
    import torch

    src = torch.empty(2 << 30, dtype=torch.uint8, device="cuda").random_()
    dst = torch.empty_like(src)
    for _ in range(3):
        dst.copy_(src)
    torch.cuda.synchronize()
    start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
    times = []
    for _ in range(10):
        start.record()
        dst.copy_(src)
        end.record()
        end.synchronize()
        times.append(start.elapsed_time(end) / 1e3)
    del src, dst
    return 2 * (2 << 30) / sorted(times)[len(times) // 2]


def weight_bytes_per_token(model) -> float:
    """Weight bytes a batch-1 decode step reads: all of them, except that each layer's
    stacked experts (``*.experts.*``) are read only for the token's top-k."""
    config = model.config
    num_experts = getattr(config, "num_experts", 0) or 0
    expert_share = config.num_experts_per_tok / num_experts if num_experts else 1.0
    total = 0.0
    for name, param in model.named_parameters():
        size = param.numel() * param.element_size()
        total += size * expert_share if ".experts." in name else size
    return total


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--model", default="qwen2-0.5b")
    parser.add_argument("--batch-sizes", type=int, nargs="+", default=[1, 8])
    parser.add_argument("--input-len", type=int, default=32)
    parser.add_argument("--output-len", type=int, default=128)
    parser.add_argument("--iterations", type=int, default=5)
    parser.add_argument("--enforce-eager", action="store_true")
    parser.add_argument("--json", type=Path, default=None)
    args = parser.parse_args()

    from kvloom import LLM, SamplingParams

    bandwidth = measure_copy_bandwidth()
    llm = LLM(model=str(write_model_config(args.model)), load_format="dummy", dtype="bfloat16",
              skip_tokenizer_init=True, enforce_eager=args.enforce_eager or None)
    model = llm.engine.components.runner.model
    weight_bytes = weight_bytes_per_token(model)
    floor_ms = weight_bytes / bandwidth * 1e3
    params = SamplingParams(temperature=0, max_tokens=args.output_len, ignore_eos=True)
    rows = []
    for batch in args.batch_sizes:
        prompts = [{"prompt_token_ids": [(7 * i + j) % 10000 for j in range(args.input_len)]}
                   for i in range(batch)]
        llm.generate(prompts, params)  # warm-up
        times = []
        for _ in range(args.iterations):
            started = time.perf_counter()
            llm.generate(prompts, params)
            times.append(time.perf_counter() - started)
        seconds = sorted(times)[len(times) // 2]
        rows.append({"batch": batch, "seconds": seconds,
                     "ms_per_token": seconds / args.output_len * 1e3})

    print(f"\nlatency: model {args.model}, device {device_short_name()}, prompt "
          f"{args.input_len}, output {args.output_len}; weights read per token "
          f"{weight_bytes / 1e9:.2f} GB, "
          f"copy bandwidth {bandwidth / 1e12:.2f} TB/s, floor {floor_ms:.2f} ms/token")
    print(f"{'batch':>6}{'request s':>11}{'ms/token':>10}{'floor/actual':>14}")
    for row in rows:
        print(f"{row['batch']:>6}{row['seconds']:>11.3f}{row['ms_per_token']:>10.2f}"
              f"{floor_ms / row['ms_per_token']:>14.1%}")
    if args.json:
        args.json.write_text(json.dumps({"model": args.model, "floor_ms": floor_ms,
                                         "bandwidth": bandwidth, "rows": rows}, indent=2))


if __name__ == "__main__":
    main()
