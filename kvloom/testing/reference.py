"""Reference outputs from Hugging Face transformers, for exactness checks."""

from __future__ import annotations

from pathlib import Path


def hf_greedy_generate(path: str | Path, prompts_token_ids: list[list[int]],
                       max_new_tokens: int) -> list[list[int]]:
    """Greedy continuations by transformers ``generate`` in float32 on the CPU.

    Each prompt runs alone (no padding), so the reference is exact. Generation
    stops at EOS as HF's generation config says.
    """
    import torch
    from transformers import AutoModelForCausalLM

    model = AutoModelForCausalLM.from_pretrained(str(path), dtype=torch.float32)
    model.eval()
    results = []
    with torch.no_grad():
        for token_ids in prompts_token_ids:
            input_ids = torch.tensor([token_ids])
            output = model.generate(input_ids, attention_mask=torch.ones_like(input_ids),
                                    max_new_tokens=max_new_tokens, do_sample=False)
            results.append(output[0, len(token_ids):].tolist())
    return results
