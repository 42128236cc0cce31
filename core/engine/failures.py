"""Errors that end requests inside the engine, without ending the engine."""

from __future__ import annotations


class RequestFailedError(RuntimeError):
    """A request failed inside the engine (its sampling, grammar or detokenizing
    raised); the requests beside it went on. The message says at which stage and
    the exception's type, never its text (that goes to the log)."""


class EngineStepError(RequestFailedError):
    """The model step failed, and every request in flight failed with it.

    The engine freed their KV blocks, forgot its prefix cache and serves new
    requests; a fault that persists fails every step, and the server then exits.
    """
