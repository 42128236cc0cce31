"""`kvloom serve`: the OpenAI-compatible server driven by the official openai client."""

from __future__ import annotations

import asyncio
import json
import re
import time

import httpx
import openai
import pytest

from kvloom import LLM, SamplingParams

API_KEY = "test-key"
MODEL_NAME = "tiny-qwen2"

PROMPT = "Hello, my name is"


@pytest.fixture(scope="module")
def client(live_server):
    return openai.OpenAI(base_url=live_server.base_url + "/v1", api_key=API_KEY, max_retries=0)


@pytest.fixture(scope="module")
def http(live_server):
    with httpx.Client(base_url=live_server.base_url, timeout=30,
                      headers={"Authorization": f"Bearer {API_KEY}"}) as session:
        yield session


@pytest.fixture(scope="module")
def offline_greedy(tiny_qwen2):
    llm = LLM(str(tiny_qwen2), dtype="float32")
    params = SamplingParams(max_tokens=12, temperature=0.0)
    text = llm.generate([PROMPT], params)[0].outputs[0].text
    chat = llm.chat([{"role": "user", "content": "Hi"}], params)[0].outputs[0].text
    return text, chat


def assert_error(response, status, param=None):
    assert response.status_code == status, response.text
    error = response.json()["error"]
    assert set(error) == {"message", "type", "param", "code"}
    assert "Traceback" not in error["message"] and "/" not in error["message"].split("GET")[0]
    if param is not None:
        assert error["param"] == param, error
    return error


def kv_metrics(http) -> dict[str, float]:
    text = http.get("/metrics").text
    values = {}
    for name in ("num_requests_running", "num_requests_waiting", "kv_cache_free_blocks",
                 "kv_cache_total_blocks", "kv_cache_usage_perc"):
        match = re.search(rf"^kvloom:{name}\{{[^}}]*\}} (\S+)$", text, re.MULTILINE)
        values[name] = float(match.group(1))
    return values


def finished_requests(http) -> float:
    text = http.get("/metrics").text
    return float(re.search(r"^kvloom:request_success_total\{[^}]*\} (\S+)$", text,
                           re.MULTILINE).group(1))


def wait_until_idle(http, timeout=20.0) -> dict[str, float]:
    deadline = time.monotonic() + timeout
    while True:
        values = kv_metrics(http)
        idle = (values["num_requests_running"] == values["num_requests_waiting"] == 0
                and values["kv_cache_free_blocks"] == values["kv_cache_total_blocks"])
        if idle or time.monotonic() > deadline:
            return values
        time.sleep(0.05)


# ------------------------------------------------------------------ happy paths
def test_health_ready_models(http, client):
    assert http.get("/health").status_code == 200
    assert http.get("/ready").status_code == 200
    models = client.models.list()
    assert [m.id for m in models.data] == [MODEL_NAME]


def test_completion_greedy_matches_offline_llm(client, offline_greedy):
    response = client.completions.create(model=MODEL_NAME, prompt=PROMPT, max_tokens=12,
                                         temperature=0)
    assert response.object == "text_completion"
    assert response.choices[0].text == offline_greedy[0]
    assert response.choices[0].finish_reason in ("stop", "length")
    usage = response.usage
    assert usage.completion_tokens > 0
    assert usage.total_tokens == usage.prompt_tokens + usage.completion_tokens


def test_completion_token_prompt_and_echo(client, tiny_qwen2):
    from transformers import AutoTokenizer

    ids = AutoTokenizer.from_pretrained(str(tiny_qwen2)).encode(PROMPT)
    by_ids = client.completions.create(model=MODEL_NAME, prompt=ids, max_tokens=6, temperature=0)
    by_text = client.completions.create(model=MODEL_NAME, prompt=[PROMPT], max_tokens=6,
                                        temperature=0, echo=True)
    assert by_text.choices[0].text == PROMPT + by_ids.choices[0].text
    assert by_ids.usage.prompt_tokens == len(ids)


def test_completion_streaming_equals_non_streaming(client, offline_greedy):
    chunks = list(client.completions.create(
        model=MODEL_NAME, prompt=PROMPT, max_tokens=12, temperature=0, stream=True,
        stream_options={"include_usage": True}))
    assert len({c.id for c in chunks}) == 1 and len({c.created for c in chunks}) == 1
    text = "".join(c.choices[0].text for c in chunks if c.choices)
    assert text == offline_greedy[0]
    assert chunks[-1].choices == [] and chunks[-1].usage.completion_tokens > 0
    assert [c.choices[0].finish_reason for c in chunks if c.choices][-1] in ("stop", "length")


def test_chat_and_chat_streaming(client, offline_greedy):
    messages = [{"role": "user", "content": "Hi"}]
    response = client.chat.completions.create(model=MODEL_NAME, messages=messages,
                                              max_tokens=12, temperature=0)
    assert response.object == "chat.completion"
    assert response.choices[0].message.role == "assistant"
    assert response.choices[0].message.content == offline_greedy[1]
    stream = client.chat.completions.create(model=MODEL_NAME, messages=messages,
                                            max_completion_tokens=12, temperature=0,
                                            stream=True, stream_options={"include_usage": True})
    chunks = list(stream)
    assert all(c.object == "chat.completion.chunk" for c in chunks)
    assert len({c.id for c in chunks}) == 1
    assert chunks[0].choices[0].delta.role == "assistant"
    text = "".join(c.choices[0].delta.content or "" for c in chunks if c.choices)
    assert text == response.choices[0].message.content
    assert chunks[-1].choices == []
    assert chunks[-1].usage.completion_tokens == response.usage.completion_tokens


def test_n_stop_seed_and_logprobs(client, offline_greedy):
    response = client.completions.create(model=MODEL_NAME, prompt=PROMPT, max_tokens=8, n=3,
                                         temperature=1.0, seed=7, logprobs=2)
    assert sorted(c.index for c in response.choices) == [0, 1, 2]
    for choice in response.choices:
        lp = choice.logprobs
        assert len(lp.tokens) == len(lp.token_logprobs) == len(lp.top_logprobs)
        assert all(value <= 0 for value in lp.token_logprobs)
    assert response.usage.completion_tokens == sum(len(c.logprobs.tokens)
                                                   for c in response.choices)
    stop = offline_greedy[0][3:5]
    stopped = client.completions.create(model=MODEL_NAME, prompt=PROMPT, max_tokens=12,
                                        temperature=0, stop=[stop])
    assert stop not in stopped.choices[0].text
    assert stopped.choices[0].finish_reason == "stop"
    chat = client.chat.completions.create(
        model=MODEL_NAME, messages=[{"role": "user", "content": "Hi"}], max_tokens=4,
        temperature=0, logprobs=True, top_logprobs=3)
    content = chat.choices[0].logprobs.content
    assert content and all(len(entry.top_logprobs) == 3 for entry in content)
    assert content[0].top_logprobs[0].logprob >= content[0].top_logprobs[1].logprob


def test_streaming_n_gives_every_choice_one_finish(client):
    chunks = list(client.chat.completions.create(
        model=MODEL_NAME, messages=[{"role": "user", "content": "Hi"}], max_tokens=5, n=2,
        temperature=0.8, seed=1, stream=True))
    finishes = [(ch.index, ch.finish_reason) for c in chunks for ch in c.choices
                if ch.finish_reason]
    assert sorted(index for index, _ in finishes) == [0, 1]


def test_tokenize_detokenize(http):
    tokens = http.post("/tokenize", json={"prompt": PROMPT}).json()
    assert tokens["count"] == len(tokens["tokens"]) > 0
    text = http.post("/detokenize", json={"tokens": tokens["tokens"]}).json()["prompt"]
    assert text == PROMPT
    chat = http.post("/tokenize", json={"messages": [{"role": "user", "content": "Hi"}]}).json()
    assert chat["count"] > tokens["count"] - 10
    assert_error(http.post("/detokenize", json={"tokens": [10**9]}), 400, "tokens")


# ------------------------------------------------------------------- bad input
BAD_COMPLETIONS = [
    ({"prompt": "x", "max_tokens": 0}, "max_tokens"),
    ({"prompt": "x", "max_tokens": -1}, "max_tokens"),
    ({"prompt": "x", "max_tokens": True}, "max_tokens"),
    ({"prompt": "x", "max_tokens": "5"}, "max_tokens"),
    ({"prompt": "x", "temperature": -0.1}, "temperature"),
    ({"prompt": "x", "temperature": 2.5}, "temperature"),
    ({"prompt": "x", "top_p": 0}, "top_p"),
    ({"prompt": "x", "n": 1_000_000_000}, "n"),
    ({"prompt": "x", "n": 0}, "n"),
    ({"prompt": "x", "n": 2, "temperature": 0}, "n"),
    ({"prompt": ""}, "prompt"),
    ({"prompt": []}, "prompt"),
    ({"prompt": [-1]}, "prompt"),
    ({"prompt": [10**6]}, "prompt"),
    ({"prompt": "x", "max_tokens": 10_000}, "max_tokens"),
    ({"prompt": "x " * 600}, "prompt"),
    ({"prompt": "x", "stream_options": {"include_usage": True}}, "stream_options"),
    ({"prompt": "x", "logprobs": -1}, "logprobs"),
    ({"prompt": "x", "logprobs": 10_000}, "logprobs"),
    ({"prompt": "x", "stop": [""]}, "stop"),
    ({"prompt": "x", "stop": 5}, "stop"),
    ({"prompt": "x", "presence_penalty": 3}, "presence_penalty"),
    ({"prompt": "x", "stop_token_ids": [10**6]}, "stop_token_ids"),
    ({}, "prompt"),
]


@pytest.mark.parametrize("body,param", BAD_COMPLETIONS, ids=[str(i) for i in range(len(BAD_COMPLETIONS))])
def test_bad_completion_requests_are_400(http, body, param):
    assert_error(http.post("/v1/completions", json={"model": MODEL_NAME, **body}), 400, param)


@pytest.mark.parametrize("raw", ["NaN", "Infinity", "-Infinity"])
def test_non_finite_temperature_is_400(http, raw):
    body = '{"prompt": "x", "temperature": %s}' % raw
    response = http.post("/v1/completions", content=body,
                         headers={"content-type": "application/json"})
    error = assert_error(response, 400, "temperature")
    assert "finite number" in error["message"]  # not a range it is not out of


def test_bad_chat_requests_are_400(http):
    def post(**body):
        return http.post("/v1/chat/completions", json=body)

    assert_error(post(messages=[]), 400, "messages")
    assert_error(post(messages="hi"), 400, "messages")
    assert_error(post(messages=[{"role": "user", "content": "x"}], max_completion_tokens=0),
                 400, "max_completion_tokens")
    assert_error(post(messages=[{"role": "user", "content": "x"}], top_logprobs=2),
                 400, "top_logprobs")
    assert_error(post(messages=[{"role": "user", "content": "x"}], logprobs=True,
                      top_logprobs=99), 400, "top_logprobs")


def test_malformed_bodies(http, live_server):
    headers = {"content-type": "application/json"}
    assert_error(http.post("/v1/completions", content=b"{not json", headers=headers), 400)
    assert_error(http.post("/v1/completions", content=b"[1, 2]", headers=headers), 400)
    huge = json.dumps({"prompt": "x", "stop": [[1] * 5000] * 2})
    error = assert_error(http.post("/v1/completions", content=huge, headers=headers), 400, "stop")
    assert len(json.dumps(error)) < 1000
    too_big = json.dumps({"prompt": "x" * 100_000})
    assert_error(http.post("/v1/completions", content=too_big, headers=headers), 413)


def test_unknown_model_route_and_auth(http, live_server):
    assert_error(http.post("/v1/completions", json={"model": "nope", "prompt": "x"}), 404, "model")
    assert_error(http.get("/v1/no-such-route"), 404)
    assert_error(http.get("/no-such-route"), 404)
    url = live_server.base_url
    assert_error(httpx.post(f"{url}/v1/completions", json={"prompt": "x"}), 401)
    assert_error(httpx.get(f"{url}/v1/models", headers={"Authorization": "Bearer wrong"}), 401)
    assert_error(httpx.post(f"{url}/tokenize", json={"prompt": "x"}), 401)
    assert httpx.get(f"{url}/health").status_code == 200  # probes need no key
    with pytest.raises(openai.AuthenticationError):
        openai.OpenAI(base_url=f"{url}/v1", api_key="wrong", max_retries=0).models.list()


def test_good_request_after_bad_ones(client, http):
    for _ in range(3):
        http.post("/v1/completions", content=b"{", headers={"content-type": "application/json"})
        http.post("/v1/completions", json={"prompt": [10**6]})
    response = client.completions.create(model=MODEL_NAME, prompt=PROMPT, max_tokens=3)
    assert response.usage.completion_tokens >= 1
    values = wait_until_idle(http)
    assert values["kv_cache_free_blocks"] == values["kv_cache_total_blocks"]


# ------------------------------------------------------------------------ load
async def _stream_one(session: httpx.AsyncClient, index: int) -> str:
    leaves = index % 4 == 0  # asks for far more than it reads, so it must be aborted
    body = {"model": MODEL_NAME, "prompt": f"{PROMPT} {index}",
            "max_tokens": 400 if leaves else 24,
            "temperature": 0.8, "seed": index, "stream": True, "ignore_eos": True}
    async with session.stream("POST", "/v1/completions", json=body) as response:
        assert response.status_code == 200
        events = 0
        async for line in response.aiter_lines():
            if not line.startswith("data: "):
                continue
            if leaves and events == 3:
                return "disconnected"  # leaving the block closes the connection
            if line == "data: [DONE]":
                return "done"
            assert "error" not in json.loads(line[6:])
            events += 1
    return "eof"


def test_64_concurrent_streams_with_disconnects_free_everything(live_server, http):
    async def main():
        limits = httpx.Limits(max_connections=100)
        async with httpx.AsyncClient(base_url=live_server.base_url, timeout=60, limits=limits,
                                     headers={"Authorization": f"Bearer {API_KEY}"}) as session:
            return await asyncio.gather(*(_stream_one(session, i) for i in range(64)))

    finished_before = finished_requests(http)
    results = asyncio.run(main())
    assert results.count("done") == 48 and results.count("disconnected") == 16
    values = wait_until_idle(http)
    assert finished_requests(http) - finished_before == 48  # the 16 were aborted
    assert values["num_requests_running"] == values["num_requests_waiting"] == 0
    assert values["kv_cache_free_blocks"] == values["kv_cache_total_blocks"]
    assert values["kv_cache_usage_perc"] == 0
    engine = live_server.async_engine
    assert engine.num_requests_in_flight == 0 and engine.is_healthy


def test_overload_is_503_with_retry_after(live_server, http):
    engine = live_server.async_engine
    saved, engine._num_slots_in_use = engine._num_slots_in_use, engine.max_slots  # all taken
    try:
        response = http.post("/v1/completions", json={"prompt": PROMPT})
    finally:
        engine._num_slots_in_use = saved
    error = assert_error(response, 503)
    assert response.headers["retry-after"] == "1" and error["type"] == "overloaded"
    assert http.get("/health").status_code == 200  # a full queue is not a dead server
    assert http.post("/v1/completions", json={"prompt": PROMPT}).status_code == 200


def test_kv_blocks_free_at_end(http, live_server):
    values = wait_until_idle(http)
    assert values["kv_cache_free_blocks"] == values["kv_cache_total_blocks"]
    kv = live_server.async_engine.engine.components.kv_cache_manager
    assert kv.num_free_blocks() == kv.num_blocks


def test_cli_serve_flags_build_the_engine_config(tiny_qwen2):
    from kvloom.entrypoints.cli import build_parser
    from kvloom.entrypoints.cli_serve import serve_engine_config

    args = build_parser().parse_args(["serve", str(tiny_qwen2), "--dtype", "float32",
                                      "--max-num-seqs", "4", "--max-model-len", "128",
                                      "--api-key", "k", "--port", "0"])
    config = serve_engine_config(args)
    assert config.scheduler.max_num_seqs == 4 and config.model.max_model_len == 128
    assert args.handler.__name__ == "run_serve" and args.api_key == "k"
