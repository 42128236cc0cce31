"""CUDA graphs for decode steps: one graph per padded batch size, replayed with new inputs.

A decode step launches a few hundred small kernels; replaying a captured graph
removes their launch overhead. Graphs are captured for a ladder of batch sizes
(1, 2, 4, 8, then multiples of 16); a batch runs in the smallest graph that
fits it, padded with length-0 sequences whose KV writes are skipped.

With speculative decoding, steps that verify drafts have several query tokens
per request. Graphs are also captured for those when every request in the step
has the same number of tokens q (2 .. k + 1) and there are 1, 2, 4 or 8 of them
(no padding: a padded row would need q tokens of its own); other verify steps
run eagerly.

Contract with the attention backend (``supports_cuda_graphs = True``): the
metadata built from the runner's static buffers must read every per-step value
from those tensors, and its launches must depend only on the batch size. The
platform (``supports_cuda_graphs = True``) makes, captures and pools the graphs.
"""

from __future__ import annotations

import bisect
import logging
import time
from typing import Any

import torch

from kvloom.interfaces.attention import AttentionBackend
from kvloom.interfaces.platform import DeviceGraph, Platform
from kvloom.worker.input_batch import InputBuffers

logger = logging.getLogger(__name__)


VERIFY_BATCH_SIZES = (1, 2, 4, 8)


def default_capture_sizes(max_num_seqs: int) -> list[int]:
    sizes = [size for size in (1, 2, 4, 8) if size <= max_num_seqs]
    sizes += list(range(16, max_num_seqs + 1, 16))
    if max_num_seqs not in sizes:
        sizes.append(max_num_seqs)
    return sizes


class CudaGraphDecoder:
    """Captured decode forward passes, by padded batch size."""

    def __init__(self, platform: Platform, model: torch.nn.Module, backend: AttentionBackend,
                 kv_caches: list[torch.Tensor], buffers: InputBuffers,
                 capture_sizes: list[int], num_speculative_tokens: int = 0) -> None:
        self.platform = platform
        self.model = model
        self.backend = backend
        self.kv_caches = kv_caches
        self.buffers = buffers
        self.sizes = sorted(set(capture_sizes))
        # Keyed by (number of sequences, query tokens per sequence).
        self.graphs: dict[tuple[int, int], DeviceGraph] = {}
        self.outputs: dict[tuple[int, int], torch.Tensor] = {}
        self.metadata: dict[tuple[int, int], Any] = {}
        self.verify_keys = [(num_seqs, q) for q in range(2, num_speculative_tokens + 2)
                            for num_seqs in VERIFY_BATCH_SIZES if num_seqs <= self.max_batch_size]
        self.num_replays = 0
        self.num_verify_replays = 0

    @property
    def max_batch_size(self) -> int:
        return self.sizes[-1] if self.sizes else 0

    def padded_size(self, num_seqs: int) -> int | None:
        """The smallest captured size that fits ``num_seqs``, or None."""
        index = bisect.bisect_left(self.sizes, num_seqs)
        return self.sizes[index] if index < len(self.sizes) else None

    def key_for(self, query_lens: list[int]) -> tuple[int, int] | None:
        """The graph for a step whose requests have these query lengths, or None."""
        q = query_lens[0]
        if any(length != q for length in query_lens):
            return None
        if q == 1:
            padded = self.padded_size(len(query_lens))
            return None if padded is None else (padded, 1)
        key = (len(query_lens), q)
        return key if key in self.graphs else None

    @torch.inference_mode()
    def capture(self) -> None:
        started = time.perf_counter()
        pool = self.platform.new_graph_pool()
        # Largest first, so smaller graphs reuse the largest one's memory pool.
        for size in reversed(self.sizes):
            self._capture_one((size, 1), self.buffers.prepare_padding_only(size), pool)
        for key in sorted(self.verify_keys, reverse=True):
            # Block 0's slots get written while capturing: no request owns them yet.
            self._capture_one(key, self.buffers.prepare_uniform_dummy(*key), pool)
        self.platform.synchronize()
        logger.info("captured %d CUDA graphs (batch sizes %s, verify shapes %s) in %.1f s",
                    len(self.graphs), self.sizes, self.verify_keys,
                    time.perf_counter() - started)

    def _capture_one(self, key: tuple[int, int], inputs, pool: Any) -> None:
        metadata = self.backend.build_metadata(inputs.attention)
        for _ in range(2):  # warm up: triton compiles, allocator settles
            self.model(inputs.input_ids, inputs.positions, self.kv_caches, metadata)
        self.platform.synchronize()
        graph = self.platform.new_graph()
        with self.platform.capture_graph(graph, pool):
            output = self.model(inputs.input_ids, inputs.positions, self.kv_caches, metadata)
        self.graphs[key], self.outputs[key], self.metadata[key] = graph, output, metadata

    def replay(self, key: tuple[int, int], num_tokens: int) -> torch.Tensor:
        """Run the graph for ``key``; the inputs are already in the buffers."""
        self.graphs[key].replay()
        self.num_replays += 1
        self.num_verify_replays += key[1] > 1
        return self.outputs[key][:num_tokens]
