"""Capturing one function in a CUDA graph, for GPU tests and benchmarks."""

from __future__ import annotations

from typing import Any, Callable


def capture_graph(fn: Callable[[], Any]) -> tuple[Any, Any]:
    """(graph, static output) of ``fn()``.

    ``fn`` runs once on a side stream first (Triton compiles, the allocator settles),
    as capture requires; replaying the graph rewrites the static output in place.
    """
    import torch

    stream = torch.cuda.Stream()
    stream.wait_stream(torch.cuda.current_stream())
    with torch.cuda.stream(stream):
        fn()
    torch.cuda.current_stream().wait_stream(stream)
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        output = fn()
    return graph, output
