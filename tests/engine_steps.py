"""Driving an Engine step by step in tests."""

from __future__ import annotations


def run_until_finished(engine, request_ids, max_steps=500) -> dict:
    """Step until every one of ``request_ids`` has finished; their last outputs by id."""
    finished = {}
    for _ in range(max_steps):
        for output in engine.step():
            if output.finished:
                finished[output.request_id] = output
        if set(request_ids) <= set(finished):
            return finished
    missing = set(request_ids) - set(finished)
    raise AssertionError(f"not finished after {max_steps} steps: {missing}")
