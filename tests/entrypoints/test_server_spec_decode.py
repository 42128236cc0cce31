"""A server with speculative decoding: same greedy text as offline without drafts,
and the acceptance counters on /metrics."""

from __future__ import annotations

import re

import httpx
import openai
from server_settings import MODEL_NAME

from kvloom import LLM, SamplingParams

PROMPT = [7] * 30


def metric(text: str, name: str) -> float:
    match = re.search(rf"^kvloom:{name}_total{{[^}}]*}} (\S+)$", text, re.MULTILINE)
    assert match, f"{name} missing from /metrics"
    return float(match.group(1))


def test_ngram_server_matches_offline_and_exports_acceptance(tiny_qwen2, server_factory):
    ngram = {"method": "ngram", "num_speculative_tokens": 3, "prompt_lookup_min": 1,
             "prompt_lookup_max": 3}
    live = server_factory(tiny_qwen2, speculative_config=ngram)
    client = openai.OpenAI(base_url=f"{live.base_url}/v1", api_key="unused")
    response = client.completions.create(model=MODEL_NAME, prompt=PROMPT, max_tokens=40,
                                         temperature=0)
    offline = LLM(str(tiny_qwen2), dtype="float32").generate(
        [{"prompt_token_ids": PROMPT}], SamplingParams(temperature=0, max_tokens=40))
    assert response.choices[0].text == offline[0].outputs[0].text
    text = httpx.get(f"{live.base_url}/metrics").text
    drafted = metric(text, "spec_decode_num_draft_tokens")
    accepted = metric(text, "spec_decode_num_accepted_tokens")
    assert drafted >= accepted > 0
    assert metric(text, "spec_decode_num_drafts") > 0
