"""Serving benchmark: `kvloom serve` with dummy weights, then `kvloom bench serve` at
several Poisson request rates against it, in one command.

    python benchmarks/serve.py --model qwen2-0.5b --request-rate 4 16 64 inf
"""

from __future__ import annotations

import argparse
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))

from common import write_model_config  # noqa: E402


def wait_ready(base_url: str, process: subprocess.Popen, timeout: float = 600) -> None:
    import httpx

    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if process.poll() is not None:
            raise RuntimeError(f"the server exited with {process.returncode}")
        try:
            if httpx.get(f"{base_url}/ready", timeout=2).status_code == 200:
                return
        except httpx.HTTPError:
            pass
        time.sleep(1)
    raise RuntimeError("the server did not become ready")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--model", default="qwen2-0.5b")
    parser.add_argument("--model-path", default=None,
                        help="a checkpoint to serve instead of dummy weights for --model")
    parser.add_argument("--request-rate", nargs="+", default=["4", "16", "64", "inf"])
    parser.add_argument("--num-prompts", type=int, default=200)
    parser.add_argument("--input-len", type=int, default=256)
    parser.add_argument("--output-len", type=int, default=128)
    parser.add_argument("--max-token-id", type=int, default=10000)
    parser.add_argument("--port", type=int, default=8321)
    parser.add_argument("--extra", default="", help="extra YAML lines for engine.yaml")
    parser.add_argument("--json", type=Path, default=None)
    args = parser.parse_args()

    if args.model_path:
        engine_yaml = f"model: {args.model_path}\ndtype: float32\n"
    else:
        engine_yaml = (f"model: {write_model_config(args.model)}\nload_format: dummy\n"
                       "dtype: bfloat16\nskip_tokenizer_init: true\n")
    config_path = Path(os.environ.get("TMPDIR", "/tmp")) / f"serve-{args.model}.yaml"
    config_path.write_text(engine_yaml + args.extra.replace("\\n", "\n"))
    base_url = f"http://127.0.0.1:{args.port}"
    server = subprocess.Popen([sys.executable, "-m", "kvloom.entrypoints.cli", "serve",
                               str(config_path), "--port", str(args.port),
                               "--served-model-name", args.model, "--log-level", "warning"])
    try:
        wait_ready(base_url, server)
        command = [sys.executable, "-m", "kvloom.entrypoints.cli", "bench", "serve",
                   "--base-url", base_url, "--model", args.model,
                   "--num-prompts", str(args.num_prompts), "--input-len", str(args.input_len),
                   "--output-len", str(args.output_len), "--max-token-id",
                   str(args.max_token_id), "--request-rate", *args.request_rate]
        if args.json:
            command += ["--json", str(args.json)]
        status = subprocess.call(command)
    finally:
        server.send_signal(signal.SIGTERM)
        server.wait(60)
    sys.exit(status)


if __name__ == "__main__":
    main()
