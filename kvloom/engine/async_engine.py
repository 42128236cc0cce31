"""AsyncEngine: the Engine's step loop in a background thread, streamed to asyncio callers.

The HTTP event loop never waits on model execution: requests are handed to the loop
thread through a lock-protected inbox, and each step's outputs come back through
``loop.call_soon_threadsafe`` into a per-request asyncio queue. A request whose
consumer goes away (client disconnect, cancellation) is aborted and its KV blocks
are freed.

Admission control counts sequence slots (``n`` per request) before any tokenization:
past ``max_num_seqs + max_queued_requests`` slots, ``generate`` raises
:class:`EngineOverloadedError` at once (a ValueError for a request that could
never fit, since retrying it would never help).

A request that fails inside the engine gets its error and the others go on; a
model step that fails fails every request in flight and the engine resets. After
``MAX_CONSECUTIVE_FAILED_STEPS`` failed steps in a row the fault is taken to be
lasting: the loop stops, ``is_healthy`` turns False and the server exits.
"""

from __future__ import annotations

import asyncio
import itertools
import logging
import threading
import time
from dataclasses import dataclass, field
from typing import Any, AsyncIterator

from kvloom.engine.engine import Engine
from kvloom.engine.input_processor import PromptType
from kvloom.engine.stats import EngineStats
from kvloom.outputs import CompletionOutput, RequestOutput
from kvloom.sampling_params import SamplingParams

logger = logging.getLogger(__name__)

MAX_CONSECUTIVE_FAILED_STEPS = 3


class EngineOverloadedError(RuntimeError):
    """Too many requests in flight; retry after ``retry_after`` seconds."""

    def __init__(self, message: str, retry_after: float = 1.0) -> None:
        super().__init__(message)
        self.retry_after = retry_after


class EngineDeadError(RuntimeError):
    """The engine loop stopped after an internal error; no request can run."""


@dataclass(eq=False)
class _Stream:
    """One request's path back to its caller, and its timing for metrics."""

    request_id: str
    loop: asyncio.AbstractEventLoop
    queue: asyncio.Queue
    num_slots: int
    arrival: float = field(default_factory=time.monotonic)
    last_token: float | None = None
    num_generated: int = 0


class EngineObserver:
    """What AsyncEngine reports; the server's Prometheus metrics implement it.

    Token timings assume DELTA outputs (each output carries only new tokens).
    """

    def on_step(self, stats: EngineStats) -> None: ...

    def on_first_token(self, seconds_since_arrival: float) -> None: ...

    def on_inter_token(self, seconds: float, num_tokens: int) -> None: ...

    def on_finished(self, output: RequestOutput, e2e_seconds: float,
                    num_generated: int) -> None: ...


class AsyncEngine:
    """Thread-driven engine loop with asyncio streaming.

    Example::

        engine = AsyncEngine(Engine.from_config("engine.yaml"))
        engine.start()
        async for output in engine.generate("Hello", SamplingParams(max_tokens=8)):
            print(output.outputs[0].text)
    """

    def __init__(self, engine: Engine, max_queued_requests: int = 1024,
                 observer: Any = None) -> None:
        self.engine = engine
        self.max_slots = engine.config.scheduler.max_num_seqs + max_queued_requests
        self.observer: EngineObserver = observer or EngineObserver()
        self._lock = threading.Lock()
        self._inbox: list[tuple[str, Any]] = []
        self._wake = threading.Event()
        self._streams: dict[str, _Stream] = {}
        self._num_slots_in_use = 0
        self._ids = itertools.count()
        self._thread: threading.Thread | None = None
        self._stopping = False
        self._accepting = True
        self.dead_error: BaseException | None = None
        self.latest_stats: EngineStats = engine.get_stats()

    # ------------------------------------------------------------------ lifecycle
    def start(self) -> None:
        if self._thread is None:
            self._thread = threading.Thread(target=self._run, name="kvloom-engine", daemon=True)
            self._thread.start()

    def shutdown(self, timeout: float = 5.0) -> None:
        """Stop the loop thread (in-flight requests are aborted) and background work."""
        self._stopping = True
        self._wake.set()
        if self._thread is not None:
            self._thread.join(timeout)
        self.engine.shutdown(
            step_in_progress=self._thread is not None and self._thread.is_alive())

    @property
    def is_healthy(self) -> bool:
        return self.dead_error is None and self._thread is not None and self._thread.is_alive()

    @property
    def num_requests_in_flight(self) -> int:
        return len(self._streams)

    @property
    def tokenizer(self) -> Any:
        return self.engine.tokenizer

    # ------------------------------------------------------------------- requests
    async def generate(self, prompt: PromptType, params: SamplingParams,
                       request_id: str | None = None, priority: int = 0,
                       cache_salt: str | None = None) -> AsyncIterator[RequestOutput]:
        """Stream a request's outputs (as ``params.output_kind`` says) until it finishes.

        Raises ValueError for invalid input (before anything runs),
        EngineOverloadedError when full, EngineDeadError after an engine failure.
        """
        request_id = request_id or f"req-{next(self._ids)}"
        stream = self._admit(request_id, params.n)
        finished = False
        try:
            # Tokenize off the event loop; the engine thread only queues it.
            processed = await asyncio.to_thread(self.engine.input_processor.process_prompt,
                                                prompt)
            self._post("add", (request_id, processed, params, priority, cache_salt))
            while True:
                item = await stream.queue.get()
                if isinstance(item, BaseException):
                    raise item
                yield item
                if item.finished:
                    finished = True
                    return
        finally:
            if not finished and self._streams.get(request_id) is stream:
                self._post("abort", request_id)  # abandoned early: free its blocks

    def abort(self, request_id: str) -> None:
        """Stop a request; its ``generate`` ends with an output whose finish_reason is "abort"."""
        self._post("abort_notify", request_id)

    def _admit(self, request_id: str, num_slots: int) -> _Stream:
        with self._lock:  # the loop thread refuses new work under the same lock
            if self.dead_error is not None:
                raise EngineDeadError("the engine stopped after an internal error")
            if not self._accepting:  # nothing would ever drain the request
                raise EngineDeadError("the server is shutting down")
            if request_id in self._streams:
                raise ValueError(f"request_id {request_id!r} is already in use")
            if num_slots > self.max_slots:
                raise ValueError(f"n ({num_slots}) is more than the server can ever hold at "
                                 f"once ({self.max_slots} sequences)")
            if self._num_slots_in_use + num_slots > self.max_slots:
                raise EngineOverloadedError(
                    f"the server is at capacity ({self._num_slots_in_use} sequences in "
                    f"flight, limit {self.max_slots}); retry shortly")
            stream = _Stream(request_id, asyncio.get_running_loop(), asyncio.Queue(), num_slots)
            self._streams[request_id] = stream
            self._num_slots_in_use += num_slots
        return stream

    def _post(self, kind: str, payload: Any) -> None:
        with self._lock:
            self._inbox.append((kind, payload))
        self._wake.set()

    # ---------------------------------------------------------------- loop thread
    def _run(self) -> None:
        try:
            while not self._stopping:
                drained = self._drain_inbox()
                if self.engine.has_unfinished_requests():
                    self._deliver(self.engine.step())
                    self._publish_stats()
                    if self.engine.dead_error is not None:
                        raise EngineDeadError(str(self.engine.dead_error))
                    if self.engine.num_consecutive_failed_steps >= MAX_CONSECUTIVE_FAILED_STEPS:
                        raise EngineDeadError(f"{MAX_CONSECUTIVE_FAILED_STEPS} model steps "
                                              "failed in a row")
                else:
                    if self.engine.check_workers() is not None:  # a worker died while idle
                        raise EngineDeadError(str(self.engine.dead_error))
                    if drained:  # aborts freed blocks with no step after them
                        self._publish_stats()
                    self._wake.wait(0.05)
                    self._wake.clear()
        except BaseException as exc:  # the model failed: fail everyone, never hang
            logger.exception("engine loop failed")
            self.dead_error = exc
            self._refuse_new()
            self._fail_all(EngineDeadError(f"the engine failed: {type(exc).__name__}"))
        finally:
            self._refuse_new()
            if self._stopping:
                if self.dead_error is None:  # a healthy engine gives the blocks back
                    self.engine.abort_request(list(self._streams))
                self._fail_all(EngineDeadError("the server is shutting down"))

    def _publish_stats(self) -> None:
        self.latest_stats = self.engine.get_stats()
        self.observer.on_step(self.latest_stats)

    def _drain_inbox(self) -> bool:
        """Hand queued adds and aborts to the engine; True if there were any."""
        with self._lock:
            inbox, self._inbox = self._inbox, []
        for kind, payload in inbox:
            if kind in ("abort", "abort_notify"):
                self.engine.abort_request(payload)
                stream = self._streams.get(payload)
                if kind == "abort_notify" and stream is not None:
                    self._send(payload, _aborted_output(payload, stream.num_slots))
                self._close(payload)
                continue
            request_id, processed, params, priority, cache_salt = payload
            if request_id not in self._streams:
                continue  # cancelled before it reached the engine
            try:
                self.engine.add_request(request_id, _as_token_prompt(processed), params,
                                        priority=priority, cache_salt=cache_salt)
            except ValueError as exc:
                self._send(request_id, exc)
                self._close(request_id)
            except Exception:  # one request's preprocessing must not stop the others
                logger.exception("adding request %s failed", request_id)
                self._send(request_id, RuntimeError("the request could not be started"))
                self._close(request_id)
        return bool(inbox)

    def _deliver(self, outputs: list[RequestOutput]) -> None:
        now = time.monotonic()
        for output in outputs:
            stream = self._streams.get(output.request_id)
            if stream is None:
                continue
            error = self.engine.pop_request_error(output.request_id)
            if error is not None:  # a ValueError (nothing streamed yet) or a RequestFailedError
                self._send(output.request_id, error)
                self._close(output.request_id)
                continue
            self._record_timing(stream, output, now)
            self._send(output.request_id, output)
            if output.finished:
                self.observer.on_finished(output, now - stream.arrival, stream.num_generated)
                self._close(output.request_id)

    def _record_timing(self, stream: _Stream, output: RequestOutput, now: float) -> None:
        num_new = sum(len(completion.token_ids) for completion in output.outputs)
        if not num_new:
            return
        if stream.last_token is None:
            self.observer.on_first_token(now - stream.arrival)
        else:
            self.observer.on_inter_token(now - stream.last_token, num_new)
        stream.last_token = now
        stream.num_generated += num_new

    def _send(self, request_id: str, item: Any) -> None:
        stream = self._streams.get(request_id)
        if stream is not None:
            stream.loop.call_soon_threadsafe(stream.queue.put_nowait, item)

    def _close(self, request_id: str) -> None:
        with self._lock:
            stream = self._streams.pop(request_id, None)
            if stream is not None:
                self._num_slots_in_use -= stream.num_slots

    def _refuse_new(self) -> None:
        with self._lock:
            self._accepting = False

    def _fail_all(self, error: BaseException) -> None:
        for request_id in list(self._streams):
            self._send(request_id, error)
            self._close(request_id)


def _aborted_output(request_id: str, num_sequences: int) -> RequestOutput:
    """The last output of a request stopped by ``AsyncEngine.abort``."""
    completions = [CompletionOutput(index, "", [], None, None, finish_reason="abort")
                   for index in range(num_sequences)]
    return RequestOutput(request_id, None, [], completions, finished=True)


def _as_token_prompt(processed) -> dict[str, Any]:
    prompt: dict[str, Any] = {"prompt_token_ids": processed.token_ids}
    if processed.text is not None:
        prompt["prompt"] = processed.text
    if processed.cache_salt is not None:
        prompt["cache_salt"] = processed.cache_salt
    return prompt
