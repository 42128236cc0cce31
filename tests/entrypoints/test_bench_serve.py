"""`kvloom bench serve` against a live server: every request completes and is measured."""

from __future__ import annotations

import json
import math

from server_settings import API_KEY, MODEL_NAME

from kvloom.entrypoints.cli import build_parser


def test_bench_serve_reports_latencies_and_throughput(live_server, tmp_path, capsys):
    out = tmp_path / "bench.json"
    args = build_parser().parse_args([
        "bench", "serve", "--base-url", live_server.base_url, "--model", MODEL_NAME,
        "--api-key", API_KEY, "--num-prompts", "12", "--request-rate", "inf", "30",
        "--input-len", "16", "--output-len", "8", "--max-token-id", "300", "--json", str(out)])
    assert args.handler(args) == 0
    rows = json.loads(out.read_text())
    assert [row["request_rate"] for row in rows] == [math.inf, 30.0]
    for row in rows:
        assert row["completed"] == 12 and row["failed"] == 0
        assert row["output_throughput"] > 0
        # ignore_eos: every request produced exactly output-len tokens
        assert math.isclose(row["output_throughput"] * row["seconds"], 12 * 8, rel_tol=1e-6)
        for name in ("ttft_ms", "tpot_ms", "itl_ms", "e2e_ms"):
            assert 0 < row[name]["median"] <= row[name]["p99"]
        assert row["ttft_ms"]["median"] <= row["e2e_ms"]["median"]
    assert "TTFT" in capsys.readouterr().out
