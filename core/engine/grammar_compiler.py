"""Structured-output grammars compiled off the engine's step loop.

Compiling a JSON schema against a 150k-token vocabulary can take from
milliseconds to seconds. A request whose grammar is compiling waits here, outside
the scheduler, while the requests already running keep stepping; it joins the
scheduler on the first step after its grammar is ready.
"""

from __future__ import annotations

import logging
from concurrent.futures import FIRST_COMPLETED, Future, ThreadPoolExecutor, wait
from dataclasses import dataclass
from typing import Any, Callable

import torch

from kvloom.interfaces.structured_output import Grammar, StructuredOutputBackend
from kvloom.scheduler.request import Request
from kvloom.worker.grammar_mask import TrackedGrammar

logger = logging.getLogger(__name__)

# Compilation is mostly native code that releases the GIL; two threads keep a
# burst of new schemas moving without starving the step loop of CPU.
NUM_COMPILE_THREADS = 2


@dataclass(slots=True)
class _PendingCompile:
    requests: list[Request]  # the n samples of one request, one matcher each
    future: Future


@dataclass(slots=True)
class CompiledRequests:
    """What finished compiling since the last look."""

    ready: list[Request]   # grammars attached; hand them to the scheduler
    failed: list[Request]  # compilation raised; end them with finish_reason "abort"
    errors: dict[str, ValueError]  # why, by the request id given to submit()


class GrammarCompiler:
    """Validates specs as requests arrive and compiles them on worker threads."""

    def __init__(self, make_backend: Callable[[], StructuredOutputBackend]) -> None:
        self._make_backend = make_backend
        self._backend: StructuredOutputBackend | None = None
        self._executor: ThreadPoolExecutor | None = None
        self._pending: dict[str, _PendingCompile] = {}

    @property
    def backend(self) -> StructuredOutputBackend:
        """The configured backend, built on the first constrained request."""
        if self._backend is None:
            self._backend = self._make_backend()
        return self._backend

    def submit(self, request_id: str, requests: list[Request], kind: str, spec: Any) -> None:
        """Start compiling; raises ValueError (nothing queued) if the spec is invalid."""
        backend = self.backend
        backend.validate(kind, spec)
        if self._executor is None:
            self._executor = ThreadPoolExecutor(NUM_COMPILE_THREADS,
                                                thread_name_prefix="kvloom-grammar")
        future = self._executor.submit(
            lambda: [backend.compile(kind, spec) for _ in requests])
        self._pending[request_id] = _PendingCompile(requests, future)

    def take_compiled(self) -> CompiledRequests:
        """Requests whose compilation ended, with their grammars attached."""
        done = CompiledRequests([], [], {})
        for request_id, pending in list(self._pending.items()):
            if not pending.future.done():
                continue
            del self._pending[request_id]
            error = pending.future.exception()
            if error is not None:
                logger.error("compiling the grammar of request %s failed: %s", request_id, error)
                done.failed += pending.requests
                done.errors[request_id] = (error if isinstance(error, ValueError)
                                           else ValueError(f"the grammar did not compile: {error}"))
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

    @property
    def num_pending(self) -> int:
        return sum(len(p.requests) for p in self._pending.values())

    def fill_bitmasks(self, grammars: list[Grammar], bitmask: torch.Tensor,
                      rows: list[int]) -> None:
        """The backend's (possibly parallel) bitmask filling, for the model runner."""
        self.backend.fill_bitmasks(grammars, bitmask, rows)
