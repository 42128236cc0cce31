"""Structured-output grammars compiled off the engine's step loop.

Compiling a JSON schema against a 150k-token vocabulary can take from
milliseconds to seconds, and so can parsing a large spec or building the backend
(its tokenizer tables) for the first constrained request. All of it runs on
compile threads: a request whose grammar is compiling waits here, outside the
scheduler, while the requests already running keep stepping; it joins the
scheduler on the first step after its grammar is ready, or ends with its error.
"""

from __future__ import annotations

import logging
import queue
import threading
import weakref
from concurrent.futures import FIRST_COMPLETED, Future, wait
from dataclasses import dataclass
from typing import Any, Callable

import torch

from kvloom.config import EngineConfig
from kvloom.failures import RequestFailedError, describe_failure
from kvloom.interfaces.structured_output import Grammar, StructuredOutputBackend
from kvloom.registry import Registries
from kvloom.request import Request
from kvloom.structured_output.grammar_mask import TrackedGrammar

logger = logging.getLogger(__name__)

# Compilation is mostly native code that releases the GIL; two threads keep a
# burst of new schemas moving without starving the step loop of CPU, and one
# slow compilation leaves the other thread to the requests behind it.
NUM_COMPILE_THREADS = 2

_Job = tuple[Future, Callable[[], Any]]


@dataclass(slots=True)
class _PendingCompile:
    requests: list[Request]  # the n samples of one request, one matcher each
    future: Future


@dataclass(slots=True)
class CompiledRequests:
    """What finished compiling since the last look."""

    ready: list[Request]   # grammars attached; hand them to the scheduler
    failed: list[Request]  # raised or cancelled; end them with finish_reason "abort"
    errors: dict[str, Exception]  # why it raised, by the request id given to submit()


class _CompilePool:
    """A few daemon threads running jobs from a queue, each answered by a Future.

    Not a ThreadPoolExecutor: the interpreter joins its threads at exit, so one
    compilation stuck in native code kept a stopped server from exiting. Daemon
    threads are abandoned at exit instead; what they compile is thrown away.
    """

    def __init__(self, num_threads: int, thread_name_prefix: str) -> None:
        self._num_threads = num_threads
        self._thread_name_prefix = thread_name_prefix
        self._jobs: queue.SimpleQueue[_Job | None] = queue.SimpleQueue()
        self._threads: list[threading.Thread] = []
        self._closed = False
        self._lock = threading.Lock()  # no job is queued behind the stop signals
        # Workers hold the queue, not the pool, so a pool dropped without
        # shutdown() is still collected and its idle threads told to stop.
        weakref.finalize(self, _stop_workers, self._jobs, num_threads)

    def submit(self, job: Callable[[], Any]) -> Future:
        """Queue ``job``; its Future is cancelled instead if shutdown() comes first."""
        future: Future = Future()
        with self._lock:
            if self._closed:
                raise RuntimeError("the grammar compiler is shut down")
            if not self._threads:  # engines without structured output start none
                self._start_threads()
            self._jobs.put((future, job))
        return future

    def shutdown(self) -> None:
        """Cancel the jobs no thread has taken yet; each thread ends after its current one."""
        with self._lock:
            self._closed = True
            while True:
                try:
                    item = self._jobs.get_nowait()
                except queue.Empty:
                    break
                if item is not None:
                    item[0].cancel()
            _stop_workers(self._jobs, len(self._threads))

    def _start_threads(self) -> None:
        for index in range(self._num_threads):
            thread = threading.Thread(target=_work, args=(self._jobs,), daemon=True,
                                      name=f"{self._thread_name_prefix}-{index}")
            thread.start()
            self._threads.append(thread)


def _work(jobs: queue.SimpleQueue) -> None:
    """A compile thread: run jobs until told to stop (None)."""
    while (item := jobs.get()) is not None:
        future, job = item
        del item  # a finished job must not keep its backend alive while idle
        if future.set_running_or_notify_cancel():  # False: cancelled while queued
            try:
                future.set_result(job())
            except BaseException as error:  # the engine thread decides what it means
                future.set_exception(error)
        del future, job


def _stop_workers(jobs: queue.SimpleQueue, num_threads: int) -> None:
    for _ in range(num_threads):
        jobs.put(None)


class GrammarCompiler:
    """Builds the backend, validates specs and compiles them, all on compile threads."""

    def __init__(self, make_backend: Callable[[], StructuredOutputBackend]) -> None:
        self._make_backend = make_backend
        self._backend: StructuredOutputBackend | None = None
        self._backend_lock = threading.Lock()  # two first requests build one backend
        self._pool = _CompilePool(NUM_COMPILE_THREADS, "kvloom-grammar")
        self._pending: dict[str, _PendingCompile] = {}

    @property
    def backend(self) -> StructuredOutputBackend:
        """The configured backend, built on the first constrained request.

        Built on a compile thread; a failure is not kept, so each request
        retries it and ends with the reason.
        """
        with self._backend_lock:
            if self._backend is None:
                self._backend = self._make_backend()
            return self._backend

    def submit(self, request_id: str, requests: list[Request], kind: str, spec: Any) -> None:
        """Start compiling in the background; nothing here touches the backend.

        An invalid spec is found on a compile thread and reported by
        take_compiled() (the request's entry in ``errors``). Raises RuntimeError
        after shutdown().
        """
        future = self._pool.submit(lambda: self._compile(kind, spec, len(requests)))
        self._pending[request_id] = _PendingCompile(requests, future)

    def _compile(self, kind: str, spec: Any, num_grammars: int) -> list[Grammar]:
        """One request's job: validate once, then a matcher per sample."""
        backend = self.backend
        backend.validate(kind, spec)
        return [backend.compile(kind, spec) for _ in range(num_grammars)]

    def take_compiled(self) -> CompiledRequests:
        """Requests whose compilation ended, with their grammars attached."""
        done = CompiledRequests([], [], {})
        for request_id, pending in list(self._pending.items()):
            if not pending.future.done():
                continue
            del self._pending[request_id]
            if pending.future.cancelled():  # by shutdown(): nobody's fault, no error
                done.failed += pending.requests
                continue
            error = _error_of(request_id, pending.future)
            if error is not None:
                done.failed += pending.requests
                done.errors[request_id] = error
                continue
            for request, grammar in zip(pending.requests, pending.future.result()):
                request.grammar = TrackedGrammar(grammar, request.output_token_ids)
            done.ready += pending.requests
        return done

    def wait_for_any(self, timeout: float) -> None:
        """Block until a compilation ends or ``timeout`` seconds pass."""
        if self._pending:
            wait([p.future for p in self._pending.values()], timeout, FIRST_COMPLETED)

    def cancel(self, request_id: str) -> bool:
        """Forget a request still compiling; True if it was."""
        pending = self._pending.pop(request_id, None)
        if pending is not None:
            pending.future.cancel()  # a running compilation finishes into the cache
        return pending is not None

    def shutdown(self) -> None:
        """Cancel queued compilations and stop the compile threads.

        A compilation already running cannot be interrupted (it is native code);
        its thread is a daemon, so it does not keep the process from exiting.
        Requests still waiting end with "abort" (no error) at the next take_compiled();
        submit() raises RuntimeError from now on. Safe to call twice.
        """
        self._pool.shutdown()

    @property
    def num_pending(self) -> int:
        return sum(len(p.requests) for p in self._pending.values())

    def fill_bitmasks(self, grammars: list[Grammar], bitmask: torch.Tensor,
                      rows: list[int]) -> None:
        """The backend's (possibly parallel) bitmask filling, for the model runner.

        Only called with grammars, so a compilation has built the backend already.
        """
        self.backend.fill_bitmasks(grammars, bitmask, rows)


def _error_of(request_id: str, future: Future) -> Exception | None:
    """Why a finished compilation gave no grammars, worded for the request's caller."""
    error = future.exception()
    if error is None:
        return None
    if isinstance(error, ValueError):  # the spec's fault: the caller hears it, no alarm here
        logger.info("request %s: its grammar was refused: %s", request_id, error)
        return error
    # Not the spec's fault (a plugin bug, a file it could not read): a server error whose
    # text, which may hold paths, goes to the log only.
    logger.error("compiling the grammar of request %s failed", request_id, exc_info=error)
    return RequestFailedError(describe_failure("compiling the grammar", error))


def make_structured_output_backend(config: EngineConfig, registries: Registries,
                                    tokenizer: Any, hf_config: Any) -> Any:
    """The configured backend (``structured_output:``, default xgrammar), for the
    model's padded vocabulary."""
    if tokenizer is None:
        raise ValueError("structured_outputs needs a tokenizer; the engine was started "
                         "with skip_tokenizer_init")
    name = config.structured_output or "xgrammar"
    return registries["structured_output"].create(name, tokenizer, hf_config.vocab_size)
