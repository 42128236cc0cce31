"""Where a decode step's time goes: engine phases on the host, kernels on the GPU.

Runs ``--batch`` requests to steady decoding, then times ``--steps`` engine steps
phase by phase (schedule, model runner, scheduler update, output processing) and
profiles them with torch.profiler, printing the top GPU kernels.

    python benchmarks/profile_step.py --model qwen2-7b --batch 1 256
"""

from __future__ import annotations

import argparse
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))

from common import write_model_config  # noqa: E402


def timed_steps(engine, num_steps: int) -> dict[str, float]:
    import torch

    totals = {"schedule": 0.0, "runner": 0.0, "update": 0.0, "output": 0.0}
    core = engine.core
    for _ in range(num_steps):
        t0 = time.perf_counter()
        scheduler_output = core.scheduler.schedule()
        t1 = time.perf_counter()
        runner_output = core.runner.execute(scheduler_output)
        t2 = time.perf_counter()
        core_outputs = core.scheduler.update_from_output(scheduler_output, runner_output)
        t3 = time.perf_counter()
        engine.output_processor.process(core_outputs)
        t4 = time.perf_counter()
        for key, value in zip(totals, (t1 - t0, t2 - t1, t3 - t2, t4 - t3)):
            totals[key] += value
    torch.cuda.synchronize()
    return {key: value / num_steps * 1e3 for key, value in totals.items()}


def print_host_profile(engine, num_steps: int) -> None:
    """Host time per function over ``num_steps`` real (async) engine steps."""
    import cProfile
    import pstats

    profiler = cProfile.Profile()
    started = time.perf_counter()
    profiler.enable()
    for _ in range(num_steps):
        engine.step()
    profiler.disable()
    print(f"host profile: {(time.perf_counter() - started) / num_steps * 1e3:.2f} ms/step "
          "(with cProfile overhead)")
    pstats.Stats(profiler).sort_stats("tottime").print_stats(22)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--model", default="qwen2-0.5b")
    parser.add_argument("--batch", type=int, nargs="+", default=[1, 256])
    parser.add_argument("--steps", type=int, default=30)
    parser.add_argument("--context", type=int, default=512)
    parser.add_argument("--enforce-eager", action="store_true")
    parser.add_argument("--cprofile", action="store_true",
                        help="also profile the host side of Engine.step() (async scheduling)")
    args = parser.parse_args()

    import torch
    from torch.profiler import ProfilerActivity, profile

    from kvloom import LLM, SamplingParams

    llm = LLM(model=str(write_model_config(args.model)), load_format="dummy", dtype="bfloat16",
              skip_tokenizer_init=True, max_num_seqs=max(args.batch),
              enforce_eager=args.enforce_eager or None)
    engine = llm.engine
    params = SamplingParams(temperature=0, max_tokens=10_000, ignore_eos=True)
    for batch in args.batch:
        for index in range(batch):
            prompt = [(index * 31 + j) % 10000 for j in range(args.context)]
            engine.add_request(f"b{batch}-{index}", {"prompt_token_ids": prompt}, params)
        while engine.get_stats().num_waiting or any(  # finish every prefill
                r.num_computed_tokens < r.num_prompt_tokens
                for r in engine.core.scheduler.running):
            engine.step()
        timed_steps(engine, 5)
        phases = timed_steps(engine, args.steps)
        with profile(activities=[ProfilerActivity.CPU, ProfilerActivity.CUDA]) as prof:
            timed_steps(engine, 10)
        total = sum(phases.values())
        print(f"\n== {args.model} batch {batch}: {total:.2f} ms/step "
              + "  ".join(f"{k} {v:.2f}" for k, v in phases.items()))
        print(prof.key_averages().table(sort_by="cuda_time_total", row_limit=12,
                                        max_name_column_width=60))
        if args.cprofile:
            print_host_profile(engine, args.steps)
        engine.abort_request([f"b{batch}-{i}" for i in range(batch)])
        engine.step()


if __name__ == "__main__":
    main()
