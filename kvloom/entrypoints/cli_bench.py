"""``kvloom bench serve``: Poisson-arrival load against a running OpenAI-compatible server.

Sends streaming /v1/completions requests with random token-id prompts (EOS ignored, so
lengths are exact) at a given request rate and reports TTFT, TPOT, inter-token latency
and end-to-end latency (median, p99, mean) and throughput, like ``vllm bench serve``.

    kvloom bench serve --base-url http://127.0.0.1:8000 --model tiny --request-rate 4 8 inf
"""

from __future__ import annotations

import argparse
import asyncio
import json
import random
import time
from dataclasses import dataclass, field
from pathlib import Path


@dataclass(slots=True)
class RequestResult:
    ok: bool
    start: float
    first_token: float | None = None
    end: float = 0.0
    chunk_times: list[float] = field(default_factory=list)
    num_output_tokens: int = 0
    error: str | None = None


def add_bench_parser(commands) -> None:
    bench = commands.add_parser("bench", help="benchmarks")
    kinds = bench.add_subparsers(dest="bench_kind", required=True)
    serve = kinds.add_parser("serve", help="load-test a running server")
    serve.add_argument("--base-url", default="http://127.0.0.1:8000",
                       help="the server to load")
    serve.add_argument("--model", required=True,
                       help="served model name (the server's /v1/models lists it)")
    serve.add_argument("--api-key", default=None,
                       help="sent as 'Authorization: Bearer KEY' (default: none)")
    serve.add_argument("--num-prompts", type=int, default=100, help="requests per rate")
    serve.add_argument("--request-rate", type=float, nargs="+", default=[float("inf")],
                       help="requests per second (inf: all at once); several give one row each")
    serve.add_argument("--input-len", type=int, default=256, help="prompt length in tokens")
    serve.add_argument("--output-len", type=int, default=128,
                       help="tokens generated per request (EOS is ignored)")
    serve.add_argument("--seed", type=int, default=0,
                       help="seed of the prompts and the arrival times")
    serve.add_argument("--max-token-id", type=int, default=10000,
                       help="prompts are random token ids below this (keep it under the vocabulary)")
    serve.add_argument("--json", type=Path, default=None,
                       help="also write results here (default: no file)")
    serve.set_defaults(handler=run_bench_serve)


def check_bench_args(args: argparse.Namespace) -> None:
    """ValueError for settings that would crash or measure nothing, before any request."""
    for name in ("num_prompts", "input_len", "output_len", "max_token_id"):
        if getattr(args, name) < 1:
            raise ValueError(f"--{name.replace('_', '-')} must be at least 1")
    if any(not rate > 0 for rate in args.request_rate):  # `not >` also catches nan
        raise ValueError("--request-rate must be positive (inf: all at once)")
    if not args.base_url.startswith(("http://", "https://")):
        raise ValueError(f"--base-url must start with http:// or https://, got "
                         f"{args.base_url!r}")


def run_bench_serve(args: argparse.Namespace) -> int:
    check_bench_args(args)
    rows = []
    for rate in args.request_rate:
        results, seconds = asyncio.run(run_load(args, rate))
        rows.append(summarize(results, seconds, rate))
    print_table(rows, args)
    if args.json:
        args.json.write_text(json.dumps(rows, indent=2))
    return 0 if all(row["failed"] == 0 for row in rows) else 1


async def run_load(args: argparse.Namespace, rate: float) -> tuple[list[RequestResult], float]:
    import httpx

    rng = random.Random(args.seed)
    prompts = [[rng.randrange(args.max_token_id) for _ in range(args.input_len)]
               for _ in range(args.num_prompts)]
    headers = {"Authorization": f"Bearer {args.api_key}"} if args.api_key else {}
    limits = httpx.Limits(max_connections=None, max_keepalive_connections=None)
    async with httpx.AsyncClient(base_url=args.base_url, headers=headers, timeout=None,
                                 limits=limits) as client:
        tasks = []
        started = time.perf_counter()
        for prompt in prompts:
            tasks.append(asyncio.create_task(send_one(client, args, prompt)))
            if rate != float("inf"):
                await asyncio.sleep(rng.expovariate(rate))
        results = await asyncio.gather(*tasks)
        return results, time.perf_counter() - started


async def send_one(client, args: argparse.Namespace, prompt: list[int]) -> RequestResult:
    body = {"model": args.model, "prompt": prompt, "max_tokens": args.output_len,
            "temperature": 0.0, "ignore_eos": True, "stream": True,
            "stream_options": {"include_usage": True}}
    result = RequestResult(ok=False, start=time.perf_counter())
    try:
        async with client.stream("POST", "/v1/completions", json=body) as response:
            if response.status_code != 200:
                result.error = f"HTTP {response.status_code}: {(await response.aread())[:200]!r}"
                return result
            async for line in response.aiter_lines():
                if not line.startswith("data: ") or line == "data: [DONE]":
                    continue
                read_chunk(json.loads(line[6:]), result, time.perf_counter())
        result.ok = result.error is None
    except Exception as exc:  # a failed request is counted, not fatal to the run
        result.error = f"{type(exc).__name__}: {exc}"
    result.end = time.perf_counter()
    return result


def read_chunk(chunk: dict, result: RequestResult, now: float) -> None:
    if "error" in chunk:
        result.error = str(chunk["error"].get("message"))
        return
    if chunk.get("usage"):
        result.num_output_tokens = chunk["usage"]["completion_tokens"]
    # A chunk with choices carries a step's tokens, even when they decode to no text
    # (or the server runs without a tokenizer).
    if chunk.get("choices"):
        if result.first_token is None:
            result.first_token = now
        result.chunk_times.append(now)


def summarize(results: list[RequestResult], seconds: float, rate: float) -> dict:
    done = [r for r in results if r.ok and r.first_token is not None]
    ttft = [r.first_token - r.start for r in done]
    e2e = [r.end - r.start for r in done]
    tpot = [(r.end - r.first_token) / (r.num_output_tokens - 1)
            for r in done if r.num_output_tokens > 1]
    itl = [b - a for r in done for a, b in zip(r.chunk_times, r.chunk_times[1:])]
    num_tokens = sum(r.num_output_tokens for r in done)
    row = {"request_rate": rate, "completed": len(done), "failed": len(results) - len(done),
           "seconds": seconds, "request_throughput": len(done) / seconds,
           "output_throughput": num_tokens / seconds}
    for name, values in (("ttft_ms", ttft), ("tpot_ms", tpot), ("itl_ms", itl), ("e2e_ms", e2e)):
        row[name] = {"median": _percentile(values, 50) * 1e3, "p99": _percentile(values, 99) * 1e3,
                     "mean": (sum(values) / len(values) * 1e3) if values else float("nan")}
    errors = [r.error for r in results if r.error]
    row["first_error"] = errors[0] if errors else None
    return row


def _percentile(values: list[float], percent: float) -> float:
    if not values:
        return float("nan")
    ordered = sorted(values)
    index = min(len(ordered) - 1, max(0, round(percent / 100 * (len(ordered) - 1))))
    return ordered[index]


def print_table(rows: list[dict], args: argparse.Namespace) -> None:
    print(f"\nbench serve: {args.num_prompts} prompts x {args.input_len} in / {args.output_len} "
          f"out tokens against {args.base_url} (model {args.model})")
    print(f"{'rate':>6} {'ok':>5} {'fail':>5} {'req/s':>7} {'out tok/s':>10} "
          f"{'TTFT med/p99 ms':>17} {'TPOT med/p99':>15} {'ITL med/p99':>15} {'E2E med/p99 ms':>17}")
    for row in rows:
        def pair(name):
            return f"{row[name]['median']:.1f}/{row[name]['p99']:.1f}"
        print(f"{row['request_rate']:>6} {row['completed']:>5} {row['failed']:>5} "
              f"{row['request_throughput']:>7.2f} {row['output_throughput']:>10.1f} "
              f"{pair('ttft_ms'):>17} {pair('tpot_ms'):>15} {pair('itl_ms'):>15} "
              f"{pair('e2e_ms'):>17}")
        if row["first_error"]:
            print(f"       first error: {row['first_error']}")
