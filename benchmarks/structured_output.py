"""Structured-output overhead on the throughput workload: a fraction of the requests
under a JSON schema, against the same workload all unconstrained, in one engine.

Dummy bf16 weights for the named config, greedy, EOS ignored. Grammars need a real
tokenizer: pass a directory with tokenizer.json (SmolLM2's BPE, 49,152 tokens, works;
ids past it up to the model's vocabulary are never allowed). The schema asks for at
least 1,000 records, so no constrained request can finish early: every run produces
exactly the workload's output tokens. Schemas are compiled in a warm-up first (cached
by spec, as in serving); its time is printed separately.

    python benchmarks/structured_output.py --model qwen2-0.5b --tokenizer .bench-tokenizer
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))

from common import device_short_name, throughput_workload, write_model_config  # noqa: E402

RECORD = {"type": "object", "additionalProperties": False,
          "required": ["id", "name", "email", "tags", "active"],
          "properties": {"id": {"type": "integer", "minimum": 0, "maximum": 99999},
                         "name": {"type": "string"},
                         "email": {"type": "string"},
                         "tags": {"type": "array", "maxItems": 3,
                                  "items": {"enum": ["new", "vip", "churned"]}},
                         "active": {"type": "boolean"}}}
SCHEMA = {"type": "object", "additionalProperties": False, "required": ["records"],
          "properties": {"records": {"type": "array", "minItems": 1000, "items": RECORD}}}


def make_params(output_lens, fraction: float, temperature: float):
    from kvloom import SamplingParams, StructuredOutputsParams

    every = round(1 / fraction) if fraction else 0
    params = []
    for index, num_tokens in enumerate(output_lens):
        constrained = every and index % every == 0 or fraction == 1
        params.append(SamplingParams(
            temperature=temperature, seed=index, max_tokens=num_tokens, ignore_eos=True,
            structured_outputs=StructuredOutputsParams(json=SCHEMA) if constrained else None))
    return params


def run(llm, prompts, output_lens, fraction: float, temperature: float) -> dict:
    params = make_params(output_lens, fraction, temperature)
    started = time.perf_counter()
    outputs = llm.generate([{"prompt_token_ids": p} for p in prompts], params)
    seconds = time.perf_counter() - started
    num_output = sum(len(o.outputs[0].token_ids) for o in outputs)
    assert num_output == sum(output_lens), "wrong number of output tokens"
    constrained = [o for o, p in zip(outputs, params) if p.structured_outputs is not None]
    for output in constrained:  # the grammar's prefix, cut by max_tokens
        assert output.outputs[0].text.lstrip().startswith('{'), output.outputs[0].text[:80]
    return {"fraction": fraction, "num_constrained": len(constrained), "seconds": seconds,
            "output_tokens": num_output, "tok_per_s": num_output / seconds,
            "sample_text": constrained[0].outputs[0].text[:160] if constrained else ""}


def profile_decode_steps(engine, prompts, num_steps: int = 100) -> None:
    """Steady decoding of a full batch, half constrained: wall time per step, then cProfile."""
    from profile_step import print_host_profile

    from kvloom import SamplingParams, StructuredOutputsParams

    for index, prompt in enumerate(prompts):
        spec = StructuredOutputsParams(json=SCHEMA) if index % 2 == 0 else None
        engine.add_request(f"p{index}", {"prompt_token_ids": prompt},
                           SamplingParams(temperature=0, max_tokens=10_000, ignore_eos=True,
                                          structured_outputs=spec))
    while engine.get_stats().num_waiting or any(
            r.num_computed_tokens < r.num_prompt_tokens for r in engine.core.scheduler.running):
        engine.step()
    started = time.perf_counter()
    for _ in range(num_steps):
        engine.step()
    print(f"\nsteady decode, {len(prompts)} rows, half constrained: "
          f"{(time.perf_counter() - started) / num_steps * 1e3:.2f} ms/step")
    print_host_profile(engine, num_steps)
    engine.abort_request([f"p{i}" for i in range(len(prompts))])
    engine.step()


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--model", default="qwen2-0.5b")
    parser.add_argument("--tokenizer", required=True, help="directory with tokenizer.json")
    parser.add_argument("--num-prompts", type=int, default=256)
    parser.add_argument("--max-num-seqs", type=int, default=64)
    parser.add_argument("--fractions", type=float, nargs="+", default=[0.0, 0.5, 0.0])
    parser.add_argument("--temperature", type=float, default=0.0)
    parser.add_argument("--json", type=Path, default=None, help="also write results here")
    parser.add_argument("--cprofile", action="store_true",
                        help="then profile the host side of decode steps, half constrained")
    args = parser.parse_args()

    from kvloom import LLM, SamplingParams, StructuredOutputsParams

    llm = LLM(model=str(write_model_config(args.model)), tokenizer=args.tokenizer,
              load_format="dummy", dtype="bfloat16", max_num_seqs=args.max_num_seqs)
    prompts, output_lens = throughput_workload(args.num_prompts)
    started = time.perf_counter()  # warm-up: every prompt's prefill, the schema compiled
    llm.generate([{"prompt_token_ids": p} for p in prompts],
                 [SamplingParams(temperature=0, max_tokens=8, ignore_eos=True,
                                 structured_outputs=StructuredOutputsParams(json=SCHEMA)
                                 if i % 2 == 0 else None) for i in range(len(prompts))])
    warmup_seconds = time.perf_counter() - started
    results = [run(llm, prompts, output_lens, fraction, args.temperature)
               for fraction in args.fractions]

    baselines = [row["tok_per_s"] for row in results if row["fraction"] == 0]
    base = sum(baselines) / len(baselines)
    print(f"\nstructured output overhead: model {args.model}, device {device_short_name()}, "
          f"max_num_seqs {args.max_num_seqs}, {len(prompts)} prompts, "
          f"{sum(output_lens)} output tokens, temperature {args.temperature}")
    print(f"warm-up (every prefill, 8 tokens each, first compilation of the schema): "
          f"{warmup_seconds:.2f} s")
    samples = [row["sample_text"] for row in results if row["sample_text"]]
    print(f"sample constrained output: {samples[0] if samples else ''!r}")
    print(f"{'constrained':>12}{'seconds':>10}{'out tok/s':>12}{'overhead':>10}"
          "  (vs the mean of the unconstrained runs)")
    for row in results:
        overhead = 1 - row["tok_per_s"] / base
        print(f"{row['num_constrained']:>12}{row['seconds']:>10.2f}{row['tok_per_s']:>12.0f}"
              f"{overhead:>10.1%}")
    if args.cprofile:
        profile_decode_steps(llm.engine, prompts[:args.max_num_seqs])
    if args.json:
        args.json.write_text(json.dumps({"model": args.model, "device": device_short_name(),
                                         "warmup_seconds": warmup_seconds,
                                         "results": results}, indent=2))


if __name__ == "__main__":
    main()
