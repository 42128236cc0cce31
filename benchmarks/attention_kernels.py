"""Attention backends side by side: paged decode GB/s and prefill TFLOP/s, against SDPA.

Every registered attention backend except "torch" (the Python reference, far too
slow) is created by name from the plugin registry, as the engine does, and checked
with ``validate``; one that cannot run the shape is listed as skipped with its
reasons, one whose forward raises is listed as failed, and the run goes on.
The shape is qwen2-7b's: GQA 28 query / 4 KV heads of 128, bf16, block size 16.

Decode: batch 1/16/64/256 x context 512-8192 (batch x context at most 256 x 8192);
random block tables over a randomly filled cache, the new token in each sequence's
last slot. The step (cache write + attention) is timed as the engine runs it: replayed
from a CUDA graph when the backend supports graphs, else eagerly ("mode" says which).
GB/s counts every K and V element read once plus the query read and the output
written; % is of the device copy bandwidth measured in the same run.

Prefill (eager): a fresh 4096-token sequence, 4 fresh sequences of 1024, and 1024
new tokens after 3072 cached ones (chunked prefill). TFLOP/s counts causal work,
4 * head_size * heads * (keys each new query sees, summed); % is of a measured
8192^3 bf16 torch.matmul.

The cached keys and values are written through each backend's own forward, so no
cache layout is assumed. rel err = |out - ref| / |ref| against fp32 attention over
the same keys and values, contiguous. The SDPA row is PyTorch
scaled_dot_product_attention on contiguous q/k/v (bf16, enable_gqa; cuDNN, flash or
memory-efficient kernel, named in its mode column), causal for fresh sequences only.
Times are triton.testing.do_bench medians.

    python benchmarks/attention_kernels.py [--backends triton cuda_paged] [--skip-prefill]
        [--batches 1 64] [--contexts 4096] [--json out.json]
"""

from __future__ import annotations

import argparse
import json
import statistics
import sys
import time
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any, Callable

import torch
import torch.nn.functional as F

sys.path.insert(0, str(Path(__file__).resolve().parent))

from latency import measure_copy_bandwidth  # noqa: E402

from kvloom.interfaces.attention import AttentionInputs, AttentionSpec  # noqa: E402

EXCLUDED_BY_DEFAULT = ("torch",)
MAX_DECODE_TOKENS = 256 * 8192          # batch x context above this is skipped
REFERENCE_ELEMENTS = 1 << 28            # fp32 reference, rows per chunk bounded by this
SDPA_KERNELS = {"CUDNN_ATTENTION": "cudnn", "FLASH_ATTENTION": "flash",
                "EFFICIENT_ATTENTION": "mem_eff", "MATH": "math"}
# kind: (unit, divisor of work/s, ceiling key)
METRICS = {"decode": ("GB/s", 1e9, "copy_gbs"), "prefill": ("TFLOP/s", 1e12, "matmul_tflops")}


@dataclass(frozen=True)
class Config:
    """What is measured, and where."""

    device: str = "cuda"
    num_heads: int = 28
    num_kv_heads: int = 4
    head_size: int = 128
    block_size: int = 16
    dtype: torch.dtype = torch.bfloat16
    batches: tuple[int, ...] = (1, 16, 64, 256)
    contexts: tuple[int, ...] = (512, 1024, 4096, 8192)
    prefill: tuple[tuple[int, int, int], ...] = ((1, 4096, 4096), (4, 1024, 1024),
                                                 (1, 4096, 1024))  # batch, context, new
    matmul_size: int = 8192
    fill_chunk_tokens: int = 32768      # cached tokens written per fill step

    def spec(self) -> AttentionSpec:
        return AttentionSpec(self.num_heads, self.num_kv_heads, self.head_size, self.dtype,
                             self.block_size, torch.device(self.device).type)


# A few seconds on a CPU with the "torch" backend: exercises everything but the GPU.
TINY = dict(num_heads=4, num_kv_heads=2, head_size=32, batches=(1, 3), contexts=(32, 40),
            prefill=((1, 64, 64), (2, 32, 32), (1, 64, 16)), matmul_size=256,
            fill_chunk_tokens=40)


@dataclass(frozen=True)
class Case:
    """``batch`` sequences of ``context`` tokens each, the last ``new`` of them this step."""

    kind: str  # "decode" or "prefill"
    batch: int
    context: int
    new: int

    @property
    def cached(self) -> int:
        return self.context - self.new

    @property
    def label(self) -> str:
        if self.kind == "decode":
            return f"{self.batch}x{self.context}"
        return f"{self.batch}x{self.new}" + (f" after {self.cached}" if self.cached else "")

    def work(self, cfg: Config) -> float:
        """Decode: bytes moved; prefill: causal flops."""
        if self.kind == "decode":
            element = torch.empty((), dtype=cfg.dtype).element_size()
            kv = 2 * self.batch * self.context * cfg.num_kv_heads * cfg.head_size
            qo = 2 * self.batch * self.new * cfg.num_heads * cfg.head_size
            return float((kv + qo) * element)
        keys_seen = self.new * self.cached + self.new * (self.new + 1) // 2
        return 4.0 * cfg.head_size * cfg.num_heads * self.batch * keys_seen

    def sdpa_causal(self) -> bool | None:
        """is_causal for the SDPA row; None when SDPA cannot express the mask (chunked)."""
        if self.cached and self.new > 1:
            return None
        return self.new > 1


@dataclass
class CaseData:
    """One case's tensors, shared by every backend: the step's inputs and the reference."""

    case: Case
    query: torch.Tensor      # [tokens, heads, head], the step's new tokens
    key: torch.Tensor        # [tokens, kv_heads, head]
    value: torch.Tensor
    keys: torch.Tensor       # [batch, kv_heads, context, head], every position, contiguous
    values: torch.Tensor
    slots: torch.Tensor      # [batch, context] cache slot of every position (CPU)
    num_blocks: int
    inputs: AttentionInputs
    reference: torch.Tensor | None = None  # fp32 [tokens, heads, head], once built


# --- inputs -------------------------------------------------------------------------------

def make_inputs(query_lens: torch.Tensor, seq_lens: torch.Tensor, block_tables: torch.Tensor,
                slot_mapping: torch.Tensor, device: torch.device) -> AttentionInputs:
    """AttentionInputs as the model runner builds them, from host tensors."""
    starts = torch.zeros(len(query_lens) + 1, dtype=torch.int32)
    starts[1:] = torch.cumsum(query_lens, 0)
    seq_lens = seq_lens.to(torch.int32)
    return AttentionInputs(
        query_start_loc=starts.to(device), seq_lens=seq_lens.to(device),
        block_tables=block_tables.to(device, torch.int32),
        slot_mapping=slot_mapping.to(device, torch.int64),
        query_start_loc_cpu=starts, seq_lens_cpu=seq_lens,
        max_query_len=int(query_lens.max()), max_seq_len=int(seq_lens.max()),
        num_decode_tokens=int((query_lens == 1).sum()))


def token_major(x: torch.Tensor, start: int, stop: int) -> torch.Tensor:
    """Positions [start, stop) of [batch, heads, context, head] as contiguous [tokens, heads,
    head] (backends may take only the token stride; reshape alone can return a strided view)."""
    return x[:, :, start:stop].transpose(1, 2).contiguous().view(-1, x.shape[1], x.shape[3])


def head_major(x: torch.Tensor, batch: int) -> torch.Tensor:
    """[tokens, heads, head] as contiguous [batch, heads, tokens per sequence, head]."""
    return x.view(batch, -1, *x.shape[1:]).transpose(1, 2).contiguous()


def build_case(case: Case, cfg: Config) -> CaseData:
    """Random keys, values and queries over random block tables (block 0 is padding)."""
    device, bs = torch.device(cfg.device), cfg.block_size
    generator = torch.Generator().manual_seed(0)
    blocks_per_seq = -(-case.context // bs)
    num_blocks = case.batch * blocks_per_seq + 1
    tables = (torch.randperm(num_blocks - 1, generator=generator) + 1).view(case.batch, -1)
    positions = torch.arange(case.context)
    slots = tables[:, positions // bs].long() * bs + positions % bs
    torch.manual_seed(0)
    shape = (case.batch, cfg.num_kv_heads, case.context, cfg.head_size)
    keys = torch.randn(shape, dtype=cfg.dtype, device=device)
    values = torch.randn_like(keys)
    query = torch.randn(case.batch * case.new, cfg.num_heads, cfg.head_size, dtype=cfg.dtype,
                        device=device)
    inputs = make_inputs(torch.full((case.batch,), case.new), torch.full((case.batch,), case.context),
                         tables, slots[:, case.cached:].reshape(-1), device)
    data = CaseData(case, query, token_major(keys, case.cached, case.context),
                    token_major(values, case.cached, case.context), keys, values, slots,
                    num_blocks, inputs)
    data.reference = reference_attention(data)
    return data


def reference_attention(data: CaseData) -> torch.Tensor:
    """fp32 causal attention of the new queries over every key, a few sequences at a time."""
    case = data.case
    query = head_major(data.query, case.batch)
    mask = None
    if case.new > 1:
        positions = torch.arange(case.context, device=query.device)
        mask = positions[None, :] <= positions[case.cached:, None]
    heads = query.shape[1]
    rows = max(1, REFERENCE_ELEMENTS // (heads * case.context * max(case.new, query.shape[3])))
    chunks = [F.scaled_dot_product_attention(
        query[b:b + rows].float(), data.keys[b:b + rows].float(),
        data.values[b:b + rows].float(), attn_mask=mask, enable_gqa=True)
        for b in range(0, case.batch, rows)]
    return torch.cat(chunks).transpose(1, 2).reshape(data.query.shape)


def fill_cache(backend: Any, cfg: Config, cache: torch.Tensor, data: CaseData) -> None:
    """Write the cached positions' keys and values through ``backend``'s own forward, so
    its cache layout need not be known: each token a one-token decode at its offset in
    its block (the attention output is discarded)."""
    case, bs = data.case, cfg.block_size
    if case.cached == 0:
        return
    impl = backend.make_impl(cfg.spec(), cfg.head_size ** -0.5)
    rows = max(1, cfg.fill_chunk_tokens // case.cached)
    for b in range(0, case.batch, rows):
        slots = data.slots[b:b + rows, :case.cached].reshape(-1)
        inputs = make_inputs(torch.ones(len(slots), dtype=torch.int32), slots % bs + 1,
                             (slots // bs)[:, None], slots, cache.device)
        query = data.query.new_zeros(len(slots), *data.query.shape[1:])
        impl.forward(query, token_major(data.keys[b:b + rows], 0, case.cached),
                     token_major(data.values[b:b + rows], 0, case.cached), cache,
                     backend.build_metadata(inputs))


# --- timing -------------------------------------------------------------------------------

def make_timer(device: str) -> Callable[[Callable[[], Any]], float]:
    """fn -> median milliseconds: triton's do_bench on CUDA, a wall clock elsewhere."""
    if torch.device(device).type == "cuda":
        import triton

        return lambda fn: triton.testing.do_bench(fn, warmup=25, rep=100, return_mode="median")

    def wall_clock(fn: Callable[[], Any]) -> float:
        fn()
        times = []
        for _ in range(5):
            started = time.perf_counter()
            fn()
            times.append(time.perf_counter() - started)
        return statistics.median(times) * 1e3

    return wall_clock


def copies_beyond_l2(nbytes: int, device: str) -> int:
    """How many copies of ``nbytes`` of inputs make rotating over them miss the L2 cache
    (at least 4x its size), at most 8: small decode shapes would otherwise be timed from L2."""
    if torch.device(device).type != "cuda":
        return 1
    l2 = getattr(torch.cuda.get_device_properties(device), "L2_cache_size", 64 << 20)
    return max(1, min(8, -(-4 * l2 // max(1, nbytes))))


def time_steps(steps: list[Callable[[], torch.Tensor]], graph: bool,
               timer: Callable) -> tuple[float, torch.Tensor]:
    """(median ms per step, the first step's output). With ``graph``, all the steps (one
    per input copy) are captured in one CUDA graph and its replay time is divided among
    them, as a decode step runs in the engine: a graph of every layer's attention, so the
    host's launch cost is not in the figure."""
    if graph:
        from kvloom.testing.cuda_graphs import capture_graph

        captured, outs = capture_graph(lambda: [step() for step in steps])
        return timer(captured.replay) / len(steps), outs[0]
    out = steps[0]()
    return timer(steps[0]), out


def measure_ceilings(cfg: Config, timer: Callable) -> dict:
    """Device name, copy bandwidth (GB/s, read + written) and bf16 matmul TFLOP/s."""
    device = torch.device(cfg.device)
    if device.type == "cuda":
        name, copy_gbs = torch.cuda.get_device_name(device), measure_copy_bandwidth() / 1e9
    else:
        src = torch.empty(1 << 26, dtype=torch.uint8).random_()
        dst = torch.empty_like(src)
        name, copy_gbs = device.type, 2 * src.numel() / timer(lambda: dst.copy_(src)) / 1e6
    n = cfg.matmul_size
    a, b = (torch.randn(n, n, dtype=torch.bfloat16, device=device) for _ in range(2))
    matmul_tflops = 2 * n ** 3 / timer(lambda: a @ b) / 1e9
    return {"device": name, "copy_gbs": copy_gbs, "matmul_tflops": matmul_tflops}


def free_memory(cfg: Config) -> None:
    if torch.device(cfg.device).type == "cuda":
        torch.cuda.empty_cache()


# --- backends -----------------------------------------------------------------------------

def load_attention_registry():
    from kvloom.config import plugin_allowlist_from_env
    from kvloom.plugin_manager import make_plugin_manager
    from kvloom.registry import Registries

    return Registries(make_plugin_manager(plugin_allowlist_from_env()))["attention"]


def first_line(exc: BaseException) -> str:
    lines = str(exc).strip().splitlines()
    return f"{type(exc).__name__}: {lines[0]}" if lines else type(exc).__name__


def select_backends(registry, requested: list[str] | None,
                    spec: AttentionSpec) -> tuple[list[str], dict[str, list[str]]]:
    """(names that can run ``spec``, {name: reasons} for the rest)."""
    names = requested or sorted(
        {*registry.names(), *(e.name for e in registry.errors if e.name)}
        - set(EXCLUDED_BY_DEFAULT))
    usable, skipped = [], {}
    for name in names:
        try:
            reasons = registry.create(name).validate(spec)
        except Exception as exc:  # unknown name, a conflict, a broken factory
            reasons = [f"cannot be created: {first_line(exc)}"]
        if reasons:
            skipped[name] = list(reasons)
            print(f"{name}: skipped: {'; '.join(reasons)}")
        else:
            usable.append(name)
    return usable, skipped


def run_backend(registry, name: str, cfg: Config, data: CaseData,
                timer: Callable) -> tuple[float, torch.Tensor, dict]:
    """A fresh backend instance for this shape; its cache filled by another fresh one."""
    spec = cfg.spec()
    backend = registry.create(name)
    impl = backend.make_impl(spec, cfg.head_size ** -0.5)
    cache = torch.randn(backend.kv_cache_shape(data.num_blocks, spec), dtype=cfg.dtype,
                        device=cfg.device)
    fill_cache(registry.create(name), cfg, cache, data)
    metadata = backend.build_metadata(data.inputs)
    graph = (data.case.kind == "decode" and backend.supports_cuda_graphs
             and cache.device.type == "cuda")

    caches = [cache] + [cache.clone() for _ in range(
        copies_beyond_l2(cache.numel() * cache.element_size(), cfg.device) - 1 if graph else 0)]
    steps = [lambda c=c: impl.forward(data.query, data.key, data.value, c, metadata)
             for c in caches]
    ms, out = time_steps(steps, graph, timer)
    extra = {"mode": f"graph x{len(steps)}" if graph else "eager"}
    if getattr(metadata, "num_splits", None) is not None:
        extra["num_splits"] = metadata.num_splits
    return ms, out, extra


def run_sdpa(cfg: Config, data: CaseData,
             timer: Callable) -> tuple[float, torch.Tensor, dict] | None:
    """PyTorch SDPA on contiguous q/k/v with the fused kernels only; None for chunked."""
    from torch.nn.attention import SDPBackend, sdpa_kernel

    case, causal = data.case, data.case.sdpa_causal()
    if causal is None:
        return None
    query = head_major(data.query, case.batch)

    graph = case.kind == "decode" and query.device.type == "cuda"
    nbytes = 2 * data.keys.numel() * data.keys.element_size()
    inputs = [(data.keys, data.values)] + [
        (data.keys.clone(), data.values.clone())
        for _ in range(copies_beyond_l2(nbytes, cfg.device) - 1 if graph else 0)]
    steps = [lambda k=k, v=v: F.scaled_dot_product_attention(query, k, v, is_causal=causal,
                                                              enable_gqa=True)
             for k, v in inputs]
    with sdpa_kernel([SDPBackend.CUDNN_ATTENTION, SDPBackend.FLASH_ATTENTION,
                      SDPBackend.EFFICIENT_ATTENTION]):
        kernel = sdpa_choice(query, data.keys, data.values, causal)
        ms, out = time_steps(steps, graph, timer)
    mode = f"{kernel} graph x{len(steps)}" if graph else kernel
    return ms, out.transpose(1, 2).reshape(data.query.shape), {"mode": mode}


def sdpa_choice(query, keys, values, causal: bool) -> str:
    """The fused SDPA kernel PyTorch picks under the current sdpa_kernel context."""
    from torch.nn.attention import SDPBackend

    try:
        choice = torch._fused_sdp_choice(query, keys, values, is_causal=causal, enable_gqa=True)
        name = SDPBackend(choice).name
    except Exception:  # a private API: its absence must not stop the run
        return "sdpa"
    return SDPA_KERNELS.get(name, name.lower())


def attempt(label: str, run: Callable, data: CaseData, cfg: Config,
            ceilings: dict) -> dict | None:
    """Run one backend (or SDPA) on one case: its numbers, or the error's first line."""
    case = data.case
    try:
        measured = run()
    except Exception as exc:
        print(f"{case.label:>18} {label:>12}: failed: {first_line(exc)}", flush=True)
        return {"error": first_line(exc)}
    if measured is None:
        return None
    ms, out, extra = measured
    unit, divisor, ceiling_key = METRICS[case.kind]
    rate = case.work(cfg) / (ms * 1e-3) / divisor
    error = ((out.float() - data.reference).norm() / data.reference.norm()).item()
    result = {"us": ms * 1e3, "rate": rate, "of_ceiling": rate / ceilings[ceiling_key],
              "rel_error": error, **extra}
    print(f"{case.label:>18} {label:>12}: {result['us']:9.1f} us {rate:9.4g} {unit} "
          f"{result['of_ceiling']:5.0%}  rel err {error:.1e}  {extra['mode']}", flush=True)
    return result


def measure_case(data: CaseData, cfg: Config, registry, backends: list[str],
                 timer: Callable, ceilings: dict) -> dict:
    results = {}
    for name in backends:
        results[name] = attempt(name, lambda: run_backend(registry, name, cfg, data, timer),
                                data, cfg, ceilings)
        free_memory(cfg)
    results["sdpa"] = attempt("sdpa", lambda: run_sdpa(cfg, data, timer), data, cfg, ceilings)
    return results


def bench_case(case: Case, cfg: Config, registry, backends: list[str], timer: Callable,
               ceilings: dict) -> dict:
    results = measure_case(build_case(case, cfg), cfg, registry, backends, timer, ceilings)
    free_memory(cfg)  # the case's tensors went with measure_case's frame
    return {**asdict(case), "label": case.label, "work": case.work(cfg), "results": results}


# --- output -------------------------------------------------------------------------------

LABEL_WIDTH = 18
CELL_WIDTHS = (9, 8, 6, 8, 15)  # us, rate, %, rel err, mode


def format_cell(result: dict | None) -> str:
    width = sum(CELL_WIDTHS)
    if result is None:
        return f"{'-':>{width}}"
    if "error" in result:
        return f"{'failed':>{width}}"
    us, rate_width, pct, err, mode = CELL_WIDTHS
    rate = result["rate"]
    rate_text = f"{rate:.0f}" if rate >= 100 else f"{rate:.3g}" if rate >= 0.01 else f"{rate:.1e}"
    return (f"{result['us']:>{us}.1f}{rate_text:>{rate_width}}{result['of_ceiling']:>{pct}.0%}"
            f"{result['rel_error']:>{err}.1e}{result['mode']:>{mode}}")


def print_table(kind: str, rows: list[dict], columns: list[str], cfg: Config,
                ceilings: dict) -> None:
    unit, _, _ = METRICS[kind]
    shape = "batch x context" if kind == "decode" else "batch x new tokens"
    print(f"\n{kind} attention, GQA {cfg.num_heads}/{cfg.num_kv_heads} x {cfg.head_size}, "
          f"{str(cfg.dtype).removeprefix('torch.')}, block {cfg.block_size}; "
          f"{ceilings['device']}; copy {ceilings['copy_gbs']:.0f} GB/s, "
          f"bf16 matmul {ceilings['matmul_tflops']:.0f} TFLOP/s")
    ceiling = "%copy" if kind == "decode" else "%peak"
    sub = "".join(f"{h:>{w}}" for h, w in zip(("us", unit, ceiling, "rel err", "mode"),
                                              CELL_WIDTHS))
    print(f"{'':>{LABEL_WIDTH}}" + "".join(f"{c:>{sum(CELL_WIDTHS)}}" for c in columns))
    print(f"{shape:>{LABEL_WIDTH}}" + sub * len(columns))
    for row in rows:
        print(f"{row['label']:>{LABEL_WIDTH}}"
              + "".join(format_cell(row["results"].get(c)) for c in columns))


def cases(cfg: Config, batches: list[int], contexts: list[int],
          skip_prefill: bool) -> list[Case]:
    decode = [Case("decode", b, c, 1) for b in batches for c in contexts
              if b * c <= MAX_DECODE_TOKENS]
    prefill = [] if skip_prefill else [Case("prefill", *shape) for shape in cfg.prefill]
    return decode + prefill


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--batches", type=int, nargs="+", default=None,
                        help="decode batch sizes (default: 1 16 64 256)")
    parser.add_argument("--contexts", type=int, nargs="+", default=None,
                        help="decode context lengths (default: 512 1024 4096 8192)")
    parser.add_argument("--backends", nargs="+", metavar="NAME", default=None,
                        help="registered attention backends to measure (default: all but "
                             "'torch')")
    parser.add_argument("--skip-prefill", action="store_true")
    parser.add_argument("--json", type=Path, default=None)
    # CPU smoke test of the harness: --device cpu --tiny --backends torch
    parser.add_argument("--device", default="cuda", help=argparse.SUPPRESS)
    parser.add_argument("--tiny", action="store_true", help=argparse.SUPPRESS)
    args = parser.parse_args()

    cfg = Config(device=args.device, **(TINY if args.tiny else {}))
    registry = load_attention_registry()
    for problem in registry.problems():
        print(f"attention plugins: {problem}")
    backends, skipped = select_backends(registry, args.backends, cfg.spec())
    timer = make_timer(cfg.device)
    ceilings = measure_ceilings(cfg, timer)
    rows = [bench_case(case, cfg, registry, backends, timer, ceilings)
            for case in cases(cfg, args.batches or list(cfg.batches),
                              args.contexts or list(cfg.contexts), args.skip_prefill)]
    columns = [*backends, "sdpa"]
    for kind in METRICS:
        kind_rows = [row for row in rows if row["kind"] == kind]
        if kind_rows:
            print_table(kind, kind_rows, columns, cfg, ceilings)
    if args.json:
        config = {**asdict(cfg), "dtype": str(cfg.dtype)}
        args.json.write_text(json.dumps({
            "ceilings": ceilings, "config": config, "backends": backends,
            "skipped": skipped, "plugin_problems": registry.problems(),
            "decode": [r for r in rows if r["kind"] == "decode"],
            "prefill": [r for r in rows if r["kind"] == "prefill"]}, indent=2))


if __name__ == "__main__":
    main()
