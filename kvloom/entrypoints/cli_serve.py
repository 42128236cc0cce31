"""``kvloom serve MODEL_OR_YAML``: the OpenAI-compatible server under uvicorn."""

from __future__ import annotations

import argparse
import signal

# The HTTP edge's limits. The same values as guard.DEFAULT_* (not imported from there:
# that pulls FastAPI into every `kvloom` command); test_server_limits checks they agree.
DEFAULT_MAX_BODY_BYTES = 4 * 1024 * 1024
DEFAULT_H11_MAX_INCOMPLETE_EVENT_SIZE = 64 * 1024
DEFAULT_H11_MAX_HEADER_COUNT = 256
DEFAULT_TIMEOUT_REQUEST_HEADERS = 20.0
DEFAULT_TIMEOUT_REQUEST_BODY = 60.0
DEFAULT_TIMEOUT_KEEP_ALIVE = 5.0  # uvicorn's default, made explicit
# uvicorn's graceful-shutdown timeout is the drain timeout plus this, so requests cut at
# the drain timeout still send their error (and a stream its [DONE]) before uvicorn
# cancels whatever is left.
DRAIN_GRACE_SECONDS = 2.0
LOG_LEVELS = ("critical", "error", "warning", "info", "debug", "trace")  # uvicorn's


def add_serve_parser(commands) -> None:
    from kvloom.entrypoints.cli_generate import add_engine_flags, model_help

    parser = commands.add_parser("serve", help="run the OpenAI-compatible HTTP server")
    parser.add_argument("model", help=model_help())
    parser.add_argument("--host", default="127.0.0.1", help="address to listen on")
    parser.add_argument("--port", type=int, default=8000, help="port to listen on")
    parser.add_argument("--api-key", default=None,
                        help="require 'Authorization: Bearer KEY' on every route but /health, "
                             "/ready and /metrics (default: $KVLOOM_API_KEY, which keeps the "
                             "key out of the process list)")
    parser.add_argument("--served-model-name", default=None,
                        help="the model name clients send (default: the model argument, or "
                             "the model an engine.yaml names)")
    add_engine_flags(parser)
    parser.add_argument("--max-num-seqs", type=int, default=None,
                        help="most sequences the engine runs at once (default: the "
                             "engine.yaml's, else 256)")
    parser.add_argument("--max-queued-requests", type=int, default=1024,
                        help="sequences that may wait beyond max-num-seqs before 503s")
    parser.add_argument("--drain-timeout", type=float, default=30.0,
                        help="seconds in-flight requests get to finish after SIGTERM; then "
                             "streams end with an error event and [DONE], others get 503")
    # choices: a typo fails here, not in uvicorn after the model has loaded.
    parser.add_argument("--log-level", default="info", choices=LOG_LEVELS,
                        help="uvicorn's log level")
    _add_http_limit_arguments(parser)
    parser.set_defaults(handler=run_serve)


def _add_http_limit_arguments(parser: argparse.ArgumentParser) -> None:
    group = parser.add_argument_group("HTTP limits")
    group.add_argument("--max-body-bytes", type=int, default=DEFAULT_MAX_BODY_BYTES,
                       help="largest request body, chunked or not; more gets 413 "
                            "(default: %(default)s)")
    group.add_argument("--h11-max-incomplete-event-size", type=int,
                       default=DEFAULT_H11_MAX_INCOMPLETE_EVENT_SIZE,
                       help="largest request line + headers in bytes; more gets 431 "
                            "(default: %(default)s)")
    group.add_argument("--h11-max-header-count", type=int, default=DEFAULT_H11_MAX_HEADER_COUNT,
                       help="most request headers; more gets 431 (default: %(default)s)")
    group.add_argument("--timeout-request-headers", type=float,
                       default=DEFAULT_TIMEOUT_REQUEST_HEADERS,
                       help="seconds for a whole request head to arrive, from its first byte; "
                            "else 408 and the connection is closed (default: %(default)s)")
    group.add_argument("--timeout-request-body", type=float, default=DEFAULT_TIMEOUT_REQUEST_BODY,
                       help="seconds for a whole request body to arrive; else 408 "
                            "(default: %(default)s)")
    group.add_argument("--timeout-keep-alive", type=float, default=DEFAULT_TIMEOUT_KEEP_ALIVE,
                       help="seconds an idle kept-alive connection stays open "
                            "(default: %(default)s)")
    group.add_argument("--limit-concurrency", type=int, default=None,
                       help="most open connections + requests before uvicorn answers a "
                            "plain 503 (default: no limit; --max-queued-requests bounds "
                            "the engine's work)")


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


def served_model_name(args: argparse.Namespace, config_model: str) -> str:
    """The name clients send: --served-model-name, else the model as given (for an
    engine.yaml, the model it names, not the file's name)."""
    if args.served_model_name:
        return args.served_model_name
    return config_model if args.model.endswith((".yaml", ".yml")) else args.model


def check_http_limits(args: argparse.Namespace) -> None:
    """ValueError for a limit that would refuse everything or nothing, or an empty key."""
    if args.max_queued_requests < 0:
        raise ValueError("--max-queued-requests must be non-negative")
    if args.api_key is not None and not args.api_key.strip():
        # `--api-key "$KVLOOM_API_KEY"` with the variable unset must not mean "no key".
        raise ValueError("--api-key is empty; give the key, or leave the flag out (the "
                         "server then reads $KVLOOM_API_KEY, or runs without a key)")
    positive = ("max_body_bytes", "h11_max_incomplete_event_size", "h11_max_header_count",
                "timeout_request_headers", "timeout_request_body", "timeout_keep_alive")
    for name in positive:
        if getattr(args, name) <= 0:
            raise ValueError(f"--{name.replace('_', '-')} must be positive")
    if args.drain_timeout < 0:
        raise ValueError("--drain-timeout must be non-negative")
    if args.limit_concurrency is not None and args.limit_concurrency <= 0:
        raise ValueError("--limit-concurrency must be positive")


def uvicorn_config(app, args: argparse.Namespace):
    """uvicorn's settings with every limit explicit (some of uvicorn's defaults are
    unbounded, and "auto" choices would change them with what happens to be installed)."""
    import functools

    import uvicorn

    from kvloom.entrypoints.openai.guard import GuardedH11Protocol

    return uvicorn.Config(
        app, host=args.host, port=args.port, log_level=args.log_level,
        # h11, even when httptools is installed ("auto" would pick it): the head size
        # limit and the head deadline are h11's and GuardedH11Protocol's.
        http=functools.partial(GuardedH11Protocol, header_timeout=args.timeout_request_headers),
        h11_max_incomplete_event_size=args.h11_max_incomplete_event_size,
        ws="none",  # no WebSocket routes: an upgrade is served as plain HTTP (404/401)
        lifespan="on",  # the engine starts in the lifespan: a failure there stops startup
        timeout_keep_alive=args.timeout_keep_alive,
        limit_concurrency=args.limit_concurrency,
        timeout_graceful_shutdown=args.drain_timeout + DRAIN_GRACE_SECONDS)


def run_serve(args: argparse.Namespace) -> int:
    """Serve until SIGTERM (exit 0 after the drain) or the engine's death (exit 1)."""
    check_http_limits(args)
    config = serve_engine_config(args)
    return serve(args, config)


def serve(args: argparse.Namespace, config) -> int:
    """Build the engine and the app from checked arguments and serve (torch loads here)."""
    from kvloom.config import api_key_from_env
    from kvloom.engine.async_engine import AsyncEngine
    from kvloom.engine.engine import Engine
    from kvloom.entrypoints.openai.draining import DrainingServer
    from kvloom.entrypoints.openai.server import build_app

    engine = Engine.from_config(config)
    async_engine = AsyncEngine(engine, max_queued_requests=args.max_queued_requests)
    app = build_app(async_engine, served_model_name(args, config.model.model),
                    api_key=args.api_key if args.api_key is not None else api_key_from_env(),
                    max_body_bytes=args.max_body_bytes,
                    max_header_count=args.h11_max_header_count,
                    body_timeout=args.timeout_request_body)
    server = DrainingServer(uvicorn_config(app, args), app.state.kvloom,
                            drain_timeout=args.drain_timeout)
    # uvicorn re-raises the exit signal once its graceful shutdown is done; by then the
    # drain has happened, so let that re-raise end in a normal exit (status 0).
    previous = signal.signal(signal.SIGTERM, lambda signum, frame: None)
    try:
        server.run()
    finally:
        signal.signal(signal.SIGTERM, previous)
        async_engine.shutdown()
    return server.exit_code
