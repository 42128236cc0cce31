"""Errors that end requests inside the engine, without ending the engine, and how a
failure is described to the request's client."""

from __future__ import annotations


def describe_failure(stage: str, error: BaseException) -> str:
    """A short, client-safe account of a failure: the stage and the exception's type
    (its text may hold paths or input; it goes to the log instead)."""
    return f"{stage} failed ({type(error).__name__})"


class RequestFailedError(RuntimeError):
    """A request failed inside the engine (its sampling, grammar or detokenizing
    raised); the requests beside it went on. The message says at which stage and
    the exception's type, never its text (that goes to the log)."""


class EngineStepError(RequestFailedError):
    """The model step failed, and every request in flight failed with it.

    The engine freed their KV blocks, forgot its prefix cache and serves new
    requests; a fault that persists fails every step, and the server then exits.
    """
