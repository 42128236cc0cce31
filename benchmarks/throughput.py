"""Throughput on the nano-vllm workload: kvloom, then HF transformers continuous batching.

Both run in this one command on the same prompts (random token ids, EOS ignored,
greedy), with dummy bf16 weights for the named config. Prints output tokens per
second for each, their ratio, and kvloom's fraction of the physical ceiling.

    python benchmarks/throughput.py --model qwen2-7b
    python benchmarks/throughput.py --model qwen2-0.5b --skip-hf --num-prompts 64
"""

from __future__ import annotations

import argparse
import gc
import json
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))

from common import CEILINGS, device_short_name, throughput_workload, write_model_config  # noqa: E402


def run_kvloom(config_dir: Path, prompts, output_lens, args) -> dict:
    from kvloom import LLM, SamplingParams

    started = time.perf_counter()
    llm = LLM(model=str(config_dir), load_format="dummy", dtype="bfloat16",
              skip_tokenizer_init=True, max_num_seqs=args.max_num_seqs,
              max_num_batched_tokens=args.max_num_batched_tokens,
              gpu_memory_utilization=args.gpu_memory_utilization,
              enforce_eager=args.enforce_eager or None,
              tensor_parallel_size=args.tensor_parallel_size,
              distributed_executor_backend=args.distributed_executor_backend,
              attention=args.attention)
    build_seconds = time.perf_counter() - started
    warmup = [{"prompt_token_ids": p[:64]} for p in prompts[:8]]
    llm.generate(warmup, SamplingParams(temperature=0, max_tokens=16, ignore_eos=True))

    params = [SamplingParams(temperature=0, max_tokens=n, ignore_eos=True) for n in output_lens]
    started = time.perf_counter()
    outputs = llm.generate([{"prompt_token_ids": p} for p in prompts], params)
    seconds = time.perf_counter() - started
    num_output = sum(len(o.outputs[0].token_ids) for o in outputs)
    assert num_output == sum(output_lens), "kvloom produced the wrong number of tokens"
    stats = llm.engine.get_stats()
    attention = getattr(llm.engine.components, "attention_name", args.attention)
    llm.engine.shutdown()
    result = {"engine": "kvloom", "attention": attention, "seconds": seconds, "output_tokens": num_output,
              "tok_per_s": num_output / seconds, "build_seconds": build_seconds,
              "num_kv_blocks": stats.num_total_blocks, "preemptions": stats.num_preemptions}
    del llm, outputs
    _free_gpu()
    return result


def run_hf(config_dir: Path, prompts, output_lens, args) -> dict:
    """HF continuous batching, the peer docs/benchmarks.md describes (paged|sdpa, CUDA graphs on)."""
    import torch
    from transformers import AutoConfig, AutoModelForCausalLM, GenerationConfig

    config = AutoConfig.from_pretrained(config_dir)
    with torch.device("cuda"):
        model = AutoModelForCausalLM.from_config(config, dtype=torch.bfloat16,
                                                 attn_implementation="paged|sdpa")
    model.eval()
    generation_config = GenerationConfig(do_sample=False, eos_token_id=-1, pad_token_id=0,
                                         max_new_tokens=max(output_lens))
    manager_kwargs = {"generation_config": generation_config}
    try:
        from transformers import ContinuousBatchingConfig

        # HF sizes its paged cache from free memory without counting MoE activations;
        # --hf-memory-percent leaves room for them (its default OOMs on qwen1.5-moe).
        memory = ({} if args.hf_memory_percent is None
                  else {"max_memory_percent": args.hf_memory_percent})
        manager_kwargs["continuous_batching_config"] = ContinuousBatchingConfig(
            use_cuda_graph=True, **memory)
    except ImportError:
        pass
    with model.continuous_batching_context_manager(**manager_kwargs) as manager:
        started = time.perf_counter()
        for prompt, num_new in zip(prompts, output_lens):
            manager.add_request(prompt, max_new_tokens=num_new, eos_token_id=-1)
        num_output, remaining = 0, len(prompts)
        while remaining:
            result = manager.get_result(timeout=600)
            if result is None:
                raise RuntimeError("HF continuous batching stopped before finishing")
            num_output += len(result.generated_tokens)
            remaining -= 1
        seconds = time.perf_counter() - started
    if num_output != sum(output_lens):
        raise RuntimeError(f"HF produced {num_output} of {sum(output_lens)} output tokens")
    del model
    _free_gpu()
    return {"engine": "hf-transformers", "seconds": seconds, "output_tokens": num_output,
            "tok_per_s": num_output / seconds}


def _free_gpu() -> None:
    import torch

    gc.collect()
    if torch.cuda.is_available():
        torch.cuda.empty_cache()


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--model", default="qwen2-0.5b")
    parser.add_argument("--num-prompts", type=int, default=256)
    parser.add_argument("--max-num-seqs", type=int, default=256)
    parser.add_argument("--max-num-batched-tokens", type=int, default=8192)
    parser.add_argument("--gpu-memory-utilization", type=float, default=0.9)
    parser.add_argument("--enforce-eager", action="store_true")
    parser.add_argument("--attention", default="auto",
                        help="attention backend (triton, cuda_paged, flash_attn, ...)")
    parser.add_argument("--skip-hf", action="store_true")
    parser.add_argument("-tp", "--tensor-parallel-size", type=int, default=1)
    parser.add_argument("--distributed-executor-backend", default="auto",
                        help="uni, mp, ray (default auto: uni for one rank)")
    parser.add_argument("--hf-memory-percent", type=float, default=None,
                        help="HF's max_memory_percent for its paged cache (default: HF's own)")
    parser.add_argument("--json", type=Path, default=None, help="also write results here")
    args = parser.parse_args()

    config_dir = write_model_config(args.model)
    prompts, output_lens = throughput_workload(args.num_prompts)
    results = [run_kvloom(config_dir, prompts, output_lens, args)]
    if not args.skip_hf:
        results.append(run_hf(config_dir, prompts, output_lens, args))

    device = device_short_name()
    ceiling = CEILINGS.get((args.model, device))
    print(f"\nthroughput workload: {len(prompts)} prompts, {sum(map(len, prompts))} prompt "
          f"tokens, {sum(output_lens)} output tokens; model {args.model}; device {device}")
    print(f"{'engine':<24}{'seconds':>10}{'out tok/s':>12}")
    for row in results:
        name = row['engine'] + (f" ({row['attention']})" if 'attention' in row else '')
        print(f"{name:<24}{row['seconds']:>10.1f}{row['tok_per_s']:>12.0f}")
    kvloom = results[0]["tok_per_s"]
    if len(results) > 1:
        print(f"kvloom / HF = {kvloom / results[1]['tok_per_s']:.2f}x")
    if ceiling:
        print(f"kvloom / physical ceiling ({ceiling} tok/s) = {kvloom / ceiling:.1%}")
    if args.json:
        args.json.write_text(json.dumps({"model": args.model, "device": device,
                                         "results": results}, indent=2))


if __name__ == "__main__":
    main()
