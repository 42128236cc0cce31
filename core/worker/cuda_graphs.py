"""CUDA graphs for decode steps: one graph per padded batch size, replayed with new inputs.

A decode step launches a few hundred small kernels; replaying a captured graph
removes their launch overhead. Graphs are captured for a ladder of batch sizes
(1, 2, 4, 8, then multiples of 16); a batch runs in the smallest graph that
fits it, padded with length-0 sequences whose KV writes are skipped.

Contract with the attention backend (``supports_cuda_graphs = True``): the
metadata built from the runner's static buffers must read every per-step value
from those tensors, and its launches must depend only on the batch size.
"""

from __future__ import annotations

import bisect
import logging
import time
from typing import Any

import torch

from kvloom.interfaces.attention import AttentionBackend
from kvloom.worker.input_batch import InputBuffers

logger = logging.getLogger(__name__)


def default_capture_sizes(max_num_seqs: int) -> list[int]:
    sizes = [size for size in (1, 2, 4, 8) if size <= max_num_seqs]
    sizes += list(range(16, max_num_seqs + 1, 16))
    if max_num_seqs not in sizes:
        sizes.append(max_num_seqs)
    return sizes


class CudaGraphDecoder:
    """Captured decode forward passes, by padded batch size."""

    def __init__(self, model: torch.nn.Module, backend: AttentionBackend,
                 kv_caches: list[torch.Tensor], buffers: InputBuffers,
                 capture_sizes: list[int]) -> None:
        self.model = model
        self.backend = backend
        self.kv_caches = kv_caches
        self.buffers = buffers
        self.sizes = sorted(set(capture_sizes))
        self.graphs: dict[int, torch.cuda.CUDAGraph] = {}
        self.outputs: dict[int, torch.Tensor] = {}
        self.metadata: dict[int, Any] = {}
        self.num_replays = 0

    @property
    def max_batch_size(self) -> int:
        return self.sizes[-1] if self.sizes else 0

    def padded_size(self, num_seqs: int) -> int | None:
        """The smallest captured size that fits ``num_seqs``, or None."""
        index = bisect.bisect_left(self.sizes, num_seqs)
        return self.sizes[index] if index < len(self.sizes) else None

    @torch.inference_mode()
    def capture(self) -> None:
        started = time.perf_counter()
        pool = torch.cuda.graph_pool_handle()
        # Largest first, so smaller graphs reuse the largest one's memory pool.
        for size in reversed(self.sizes):
            inputs = self.buffers.prepare_padding_only(size)
            metadata = self.backend.build_metadata(inputs.attention)
            for _ in range(2):  # warm up: triton compiles, allocator settles
                self.model(inputs.input_ids, inputs.positions, self.kv_caches, metadata)
            torch.cuda.synchronize()
            graph = torch.cuda.CUDAGraph()
            with torch.cuda.graph(graph, pool=pool):
                output = self.model(inputs.input_ids, inputs.positions, self.kv_caches, metadata)
            self.graphs[size], self.outputs[size], self.metadata[size] = graph, output, metadata
        torch.cuda.synchronize()
        logger.info("captured %d CUDA graphs (batch sizes %s) in %.1f s", len(self.graphs),
                    self.sizes, time.perf_counter() - started)

    def replay(self, padded_size: int, num_tokens: int) -> torch.Tensor:
        """Run the graph for ``padded_size``; the inputs are already in the buffers."""
        self.graphs[padded_size].replay()
        self.num_replays += 1
        return self.outputs[padded_size][:num_tokens]
