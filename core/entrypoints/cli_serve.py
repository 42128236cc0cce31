"""``kvloom serve MODEL_OR_YAML``: the OpenAI-compatible server under uvicorn."""

from __future__ import annotations

import argparse
import signal


def add_serve_parser(commands) -> None:
    parser = commands.add_parser("serve", help="run the OpenAI-compatible HTTP server")
    parser.add_argument("model", help="an HF model directory, or an engine.yaml file")
    parser.add_argument("--host", default="127.0.0.1")
    parser.add_argument("--port", type=int, default=8000)
    parser.add_argument("--api-key", default=None,
                        help="require 'Authorization: Bearer KEY' on inference routes")
    parser.add_argument("--served-model-name", default=None,
                        help="the model name clients send (default: the model argument)")
    parser.add_argument("--dtype", default=None)
    parser.add_argument("--attention", default=None)
    parser.add_argument("--platform", default=None)
    parser.add_argument("--load-format", default=None)
    parser.add_argument("--max-model-len", type=int, default=None)
    parser.add_argument("--max-num-seqs", type=int, default=None)
    parser.add_argument("--max-queued-requests", type=int, default=1024,
                        help="sequences that may wait beyond max-num-seqs before 503s")
    parser.add_argument("--max-body-bytes", type=int, default=4 * 1024 * 1024)
    parser.add_argument("--drain-timeout", type=float, default=30.0,
                        help="seconds in-flight requests get to finish after SIGTERM")
    parser.add_argument("--log-level", default="info")
    parser.set_defaults(handler=run_serve)


def serve_engine_config(args: argparse.Namespace):
    """The engine config from the model/YAML argument plus flags."""
    from kvloom.config import EngineConfig
    from kvloom.entrypoints.cli_generate import engine_config_from_args

    config = engine_config_from_args(args)
    if args.max_num_seqs is not None:
        data = config.model_dump()
        data["scheduler"]["max_num_seqs"] = args.max_num_seqs
        config = EngineConfig.model_validate(data)
    return config


def run_serve(args: argparse.Namespace) -> int:
    import uvicorn

    from kvloom.engine.async_engine import AsyncEngine
    from kvloom.engine.engine import Engine
    from kvloom.entrypoints.openai.draining import DrainingServer
    from kvloom.entrypoints.openai.server import build_app

    if args.max_queued_requests < 0:
        raise ValueError("--max-queued-requests must be non-negative")
    engine = Engine.from_config(serve_engine_config(args))
    async_engine = AsyncEngine(engine, max_queued_requests=args.max_queued_requests)
    app = build_app(async_engine, args.served_model_name or args.model, api_key=args.api_key,
                    max_body_bytes=args.max_body_bytes)
    config = uvicorn.Config(app, host=args.host, port=args.port, log_level=args.log_level,
                            timeout_graceful_shutdown=args.drain_timeout)
    server = DrainingServer(config, app.state.kvloom)
    # uvicorn re-raises the exit signal once its graceful shutdown is done; by then the
    # drain has happened, so let that re-raise end in a normal exit (status 0).
    previous = signal.signal(signal.SIGTERM, lambda signum, frame: None)
    try:
        server.run()
    finally:
        signal.signal(signal.SIGTERM, previous)
        async_engine.shutdown()
    return 0
