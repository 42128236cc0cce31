"""Batch-1 latency with and without n-gram speculative decoding, plus acceptance figures.

The workload is repetitive: each prompt holds a passage written out twice and then
its start once more, so a model that continues the pattern copies earlier text.

    python benchmarks/spec_decode.py --model qwen2-7b            # GPU, dummy weights
    python benchmarks/spec_decode.py --model smollm2-135m --real  # any device, real weights

With dummy weights the target's output is whatever random weights produce (they
tend to fall into loops, which prompt lookup then predicts): the acceptance figures
describe that, not a trained model. ``--real`` loads a real checkpoint (the built-in
SmolLM2 alias) and asks it, through its chat template, to copy a passage.
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))

PASSAGE = ("The paged KV cache stores keys and values in fixed-size blocks. A block table maps "
           "each sequence to its blocks, so memory is allocated as tokens arrive and shared "
           "prefixes are stored once. ")


def dummy_prompts(num_prompts: int, passage_len: int) -> list[dict]:
    prompts = []
    for index in range(num_prompts):
        passage = [(997 * index + 31 * j) % 20000 + 100 for j in range(passage_len)]
        prompts.append({"prompt_token_ids": passage * 2 + passage[:passage_len // 4]})
    return prompts


def real_prompts(llm, num_prompts: int) -> list[dict]:
    tokenizer = llm.engine.tokenizer
    prompts = []
    for index in range(num_prompts):
        text = PASSAGE * (1 + index % 2)
        messages = [{"role": "user", "content": f"Copy this text exactly:\n\n{text}"}]
        ids = tokenizer.apply_chat_template(messages, tokenize=True, add_generation_prompt=True)
        if hasattr(ids, "keys"):
            ids = ids["input_ids"]
        prompts.append({"prompt_token_ids": list(ids)})
    return prompts


def make_llm(args, speculative: dict | None):
    from kvloom import LLM

    if args.real:
        return LLM(model=args.model, dtype=args.dtype, speculative_config=speculative,
                   kv_cache_memory_bytes=args.kv_bytes)
    from common import write_model_config

    return LLM(model=str(write_model_config(args.model)), load_format="dummy", dtype=args.dtype,
               skip_tokenizer_init=True, speculative_config=speculative,
               kv_cache_memory_bytes=args.kv_bytes)


def measure(llm, prompts: list[dict], output_len: int, iterations: int,
            ignore_eos: bool) -> dict:
    """Seconds per output token over requests run one at a time (batch 1)."""
    from kvloom import SamplingParams

    params = SamplingParams(temperature=0, max_tokens=output_len, ignore_eos=ignore_eos)
    llm.generate(prompts[:1], params)  # warm-up
    before = llm.engine.get_stats()
    times, outputs = [], []
    for _ in range(iterations):
        for prompt in prompts:
            started = time.perf_counter()
            result = llm.generate([prompt], params)
            times.append(time.perf_counter() - started)
            outputs.append(result[0].outputs[0].token_ids)
    after = llm.engine.get_stats()
    drafted = after.spec_num_draft_tokens - before.spec_num_draft_tokens
    accepted = after.spec_num_accepted_tokens - before.spec_num_accepted_tokens
    rows = after.spec_num_drafts - before.spec_num_drafts
    num_tokens = sum(len(output) for output in outputs)
    return {"seconds": sum(times), "num_tokens": num_tokens,
            "ms_per_token": sum(times) / num_tokens * 1e3,
            "acceptance_rate": accepted / drafted if drafted else None,
            "mean_accepted_length": 1 + accepted / rows if rows else None,
            "outputs": outputs}


def release(llm) -> None:
    import gc

    import torch

    del llm
    gc.collect()
    if torch.cuda.is_available():
        torch.cuda.empty_cache()


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--model", default="qwen2-7b")
    parser.add_argument("--real", action="store_true", help="load real weights (an alias/path)")
    parser.add_argument("--dtype", default="bfloat16")
    parser.add_argument("--num-speculative-tokens", type=int, nargs="+", default=[2, 4, 6])
    parser.add_argument("--lookup", type=int, nargs=2, default=[2, 5], metavar=("MIN", "MAX"))
    parser.add_argument("--num-prompts", type=int, default=4)
    parser.add_argument("--passage-len", type=int, default=200)
    parser.add_argument("--output-len", type=int, default=256)
    parser.add_argument("--iterations", type=int, default=2)
    parser.add_argument("--kv-bytes", type=int, default=4 << 30)
    parser.add_argument("--json", type=Path, default=None)
    args = parser.parse_args()

    configs: list[tuple[str, dict | None]] = [("none", None)]
    for k in args.num_speculative_tokens:
        configs.append((f"ngram k={k}", {"method": "ngram", "num_speculative_tokens": k,
                                         "prompt_lookup_min": args.lookup[0],
                                         "prompt_lookup_max": args.lookup[1]}))
    results = {}
    reference = None
    for name, speculative in configs:
        llm = make_llm(args, speculative)
        prompts = (real_prompts(llm, args.num_prompts) if args.real
                   else dummy_prompts(args.num_prompts, args.passage_len))
        # A real model stops at its EOS once the text is copied; dummy weights never would.
        result = measure(llm, prompts, args.output_len, args.iterations,
                         ignore_eos=not args.real)
        release(llm)
        outputs = result.pop("outputs")
        if reference is None:
            reference = outputs
        result["same_tokens_as_none"] = outputs == reference
        results[name] = result

    base = results["none"]["ms_per_token"]
    print(f"\nspec decode: model {args.model} ({'real' if args.real else 'dummy'} weights, "
          f"{args.dtype}), batch 1, {args.num_prompts} prompts, output {args.output_len}, "
          f"lookup {args.lookup[0]}-{args.lookup[1]}")
    print(f"{'config':>12}{'ms/token':>10}{'speedup':>9}{'accept':>8}{'mean len':>10}"
          f"{'same tokens':>13}")
    for name, row in results.items():
        rate = "-" if row["acceptance_rate"] is None else f"{row['acceptance_rate']:.1%}"
        length = ("-" if row["mean_accepted_length"] is None
                  else f"{row['mean_accepted_length']:.2f}")
        print(f"{name:>12}{row['ms_per_token']:>10.2f}{base / row['ms_per_token']:>8.2f}x"
              f"{rate:>8}{length:>10}{str(row['same_tokens_as_none']):>13}")
    if args.json:
        args.json.write_text(json.dumps({"model": args.model, "real": args.real,
                                         "results": results}, indent=2))


if __name__ == "__main__":
    main()
