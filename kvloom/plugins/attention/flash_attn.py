"""The ``flash_attn`` attention backend: FlashAttention-3 on Hopper GPUs.

FA3 is the fastest paged attention for Hopper (sm_90) GPUs. Its kernels are not
built here: building FA3 from source takes hours, so this backend loads the
prebuilt kernel library that vLLM's wheel ships, ``_vllm_fa3_C.abi3.so`` (vllm
0.26.x, built for torch 2.11 and CUDA 13), with ``torch.ops.load_library`` and
calls ``torch.ops._vllm_fa3_C.fwd``. vllm itself is never imported (it is heavy);
only its package directory is looked up. ``KVLOOM_FLASH_ATTN_LIBRARY`` names the
library directly, for a copy outside an installed vllm.

FA3 reads kvloom's cache layout as it is: ``kv_cache[0]`` and ``kv_cache[1]`` are
its paged keys and values, ``(num_blocks, block_size, num_kv_heads, head_size)``,
and its causal mask is aligned to the bottom right, so each segment's queries are
the last tokens of their sequence. New keys and values are written to the cache
with the Triton backend's graph-safe write kernel first.

Decode-only steps pass an explicit split count chosen from the batch size alone
and FA3 reads every per-step value from the tensors, so they can be captured in
CUDA graphs.
"""

from __future__ import annotations

import importlib.util
import os
from dataclasses import dataclass
from pathlib import Path

import torch

from kvloom.config import FLASH_ATTN_LIBRARY_ENV, flash_attn_library_from_env
from kvloom.hookspecs import hookimpl
from kvloom.interfaces.attention import (AttentionBackend, AttentionImpl, AttentionInputs,
                                         AttentionSpec)

# Setting supports_cuda_graphs needs nothing from API 1.1 (a 1.0 core never reads it),
# so this matches the triton backend's range.
KVLOOM_PLUGIN_API = ">=1.0,<2"  # the kvloom plugin API versions this module supports

LIBRARY_ENV = FLASH_ATTN_LIBRARY_ENV
LIBRARY_NAME = "_vllm_fa3_C.abi3.so"
HOW_TO_GET = (f"pip install 'kvloom[flash]' (vllm 0.26, whose wheel ships FA3 prebuilt "
              f"for torch 2.11 with CUDA 13), or set {LIBRARY_ENV} to the path of a "
              f"vllm/vllm_flash_attn/{LIBRARY_NAME}")
HEAD_SIZES = (64, 96, 128, 192, 256)  # the head sizes vLLM's FA3 build has kernels for
BLOCK_SIZE_MULTIPLE = 16
MAX_DECODE_SPLITS = 32

# Load-once cache: real path of a library -> None once loaded, else the load error.
# Loading the same library twice would register its operators twice, which fails.
_LOADED: dict[str, str | None] = {}


@hookimpl
def register_attention_backends(register):
    register("flash_attn", FlashAttentionBackend)


def find_library() -> tuple[str | None, str]:
    """The FA3 library's path and "", or None and why it was not found."""
    configured = flash_attn_library_from_env()
    if configured:
        if os.path.isfile(configured):
            return configured, ""
        return None, f"{LIBRARY_ENV}={configured} is not a file; {HOW_TO_GET}"
    # find_spec on a top-level name locates the package without importing it.
    spec = importlib.util.find_spec("vllm")
    if spec is None or not spec.submodule_search_locations:
        return None, f"the FA3 library was not found: vllm is not installed; {HOW_TO_GET}"
    for location in spec.submodule_search_locations:
        candidate = Path(location) / "vllm_flash_attn" / LIBRARY_NAME
        if candidate.is_file():
            return str(candidate), ""
    places = ", ".join(spec.submodule_search_locations)
    return None, (f"the installed vllm ({places}) has no vllm_flash_attn/{LIBRARY_NAME}; "
                  f"{HOW_TO_GET}")


def load_library(path: str) -> str | None:
    """Load the library at ``path`` once per process: None when loaded, else the error."""
    key = os.path.realpath(path)
    if key not in _LOADED:
        try:
            torch.ops.load_library(key)
        except Exception as exc:  # a torch/CUDA mismatch shows up as OSError or RuntimeError
            _LOADED[key] = (f"loading {path} failed ({type(exc).__name__}: "
                            f"{' '.join(str(exc).split())}); it is built for torch 2.11 "
                            f"with CUDA 13, this is torch {torch.__version__}")
        else:
            _LOADED[key] = None
    return _LOADED[key]


def library_problem() -> str | None:
    """Why the FA3 operators cannot be used (finding and loading them once), or None."""
    path, missing = find_library()
    if path is None:
        return missing
    return load_library(path)


@dataclass(slots=True)
class FlashAttentionMetadata:
    """One step's arguments to FA3; the tensors may be the runner's static buffers."""

    slot_mapping: torch.Tensor
    block_tables: torch.Tensor
    seq_lens: torch.Tensor
    query_start_loc: torch.Tensor
    max_seqlen_q: int
    max_seqlen_k: int
    num_splits: int  # 0 lets FA3 choose


class FlashAttentionBackend(AttentionBackend):
    name = "flash_attn"
    supports_cuda_graphs = True

    def __init__(self) -> None:
        self.spec: AttentionSpec | None = None
        self._num_sms: int | None = None

    def validate(self, spec: AttentionSpec) -> list[str]:
        reasons = []
        cuda = torch.cuda.is_available()
        if spec.device_type != "cuda":
            reasons.append(f"needs a CUDA device, got {spec.device_type}")
        if not cuda:
            reasons.append("torch.cuda is not available (no GPU, or a CPU-only torch "
                           f"{torch.__version__})")
        else:
            major, minor = torch.cuda.get_device_capability()
            if major != 9:
                reasons.append(f"compute capability {major}.{minor} is not 9.x: "
                               "FlashAttention-3 runs on Hopper GPUs only")
        if spec.dtype not in (torch.float16, torch.bfloat16):
            reasons.append(f"dtype {spec.dtype} is not supported (float16 or bfloat16 only)")
        if spec.head_size not in HEAD_SIZES:
            reasons.append(f"head size {spec.head_size} is not one of {HEAD_SIZES}")
        if spec.block_size % BLOCK_SIZE_MULTIPLE:
            reasons.append(f"block size {spec.block_size} is not a multiple of "
                           f"{BLOCK_SIZE_MULTIPLE}")
        if spec.num_heads % spec.num_kv_heads:
            reasons.append(f"num_heads {spec.num_heads} is not a multiple of "
                           f"num_kv_heads {spec.num_kv_heads}")
        if importlib.util.find_spec("triton") is None:
            reasons.append("the triton package is not installed (it writes the KV cache)")
        if cuda:
            # Loading a CUDA kernel library needs a CUDA torch: without one the error
            # would only restate the reason above.
            problem = library_problem()
        else:
            problem = find_library()[1] or None
        if problem:
            reasons.append(problem)
        return reasons

    def kv_cache_shape(self, num_blocks: int, spec: AttentionSpec) -> tuple[int, ...]:
        return (2, num_blocks, spec.block_size, spec.num_kv_heads, spec.head_size)

    def make_impl(self, spec: AttentionSpec, scale: float) -> AttentionImpl:
        problem = library_problem()
        if problem:
            raise RuntimeError(f"flash_attn attention: {problem}")
        if self.spec is None:
            self.spec = spec  # the block size and KV head count metadata is built for
        return FlashAttention(scale)

    def build_metadata(self, inputs: AttentionInputs) -> FlashAttentionMetadata:
        if self.spec is None:
            raise RuntimeError("flash_attn attention: make_impl must be called before "
                               "build_metadata (the metadata needs the block size)")
        if inputs.max_query_len == 1:
            # Everything host-side is fixed by the batch size, so a captured graph stays
            # right for any sequence lengths: FA3 bounds keys by seq_lens on the device,
            # and the split count bounds its own per-sequence splitting.
            num_seqs = inputs.seq_lens.shape[0]
            return FlashAttentionMetadata(
                inputs.slot_mapping, inputs.block_tables, inputs.seq_lens,
                inputs.query_start_loc, 1, inputs.block_tables.shape[1] * self.spec.block_size,
                self.num_decode_splits(num_seqs, inputs.seq_lens.device))
        return FlashAttentionMetadata(
            inputs.slot_mapping, inputs.block_tables, inputs.seq_lens, inputs.query_start_loc,
            inputs.max_query_len, inputs.max_seq_len, 0)

    def num_decode_splits(self, num_seqs: int, device: torch.device) -> int:
        """Splits of each sequence's keys so the CTAs fill the GPU about twice over."""
        if device.type != "cuda":
            return 1  # FA3 cannot run there; keeps build_metadata usable in CPU tests
        if self._num_sms is None:
            self._num_sms = torch.cuda.get_device_properties(device).multi_processor_count
        programs = max(1, num_seqs * self.spec.num_kv_heads)
        return int(min(MAX_DECODE_SPLITS, max(1, -(-2 * self._num_sms // programs))))


class FlashAttention(AttentionImpl):
    def __init__(self, scale: float) -> None:
        self.scale = scale

    def forward(self, query, key, value, kv_cache, metadata):
        from kvloom.plugins.attention import triton_kernels

        triton_kernels.write_kv_cache(key, value, kv_cache, metadata.slot_mapping)
        # FA3 takes any row and head strides, but needs the head dimension contiguous.
        q = query if query.stride(-1) == 1 else query.contiguous()
        out = torch.empty_like(query, memory_format=torch.contiguous_format)
        torch.ops._vllm_fa3_C.fwd(
            q, kv_cache[0], kv_cache[1],
            None, None,           # k_new, v_new: the cache is already written
            None,                 # q_v
            out,
            metadata.query_start_loc,
            None,                 # cu_seqlens_k: paged keys are bounded by seqused_k
            None,                 # cu_seqlens_k_new
            None,                 # seqused_q
            metadata.seq_lens,    # seqused_k
            metadata.max_seqlen_q,
            metadata.max_seqlen_k,
            metadata.block_tables,  # page_table
            None,                 # kv_batch_idx
            None,                 # leftpad_k
            None, None, None,     # rotary_cos, rotary_sin, seqlens_rotary
            None, None, None,     # q_descale, k_descale, v_descale (fp8 only)
            self.scale,
            True,                 # causal, aligned to the bottom right
            -1, -1,               # window_left, window_right: no sliding window
            0.0,                  # softcap: off
            True,                 # rotary_interleaved (no rotary here)
            None,                 # scheduler_metadata
            metadata.num_splits,
            None,                 # pack_gqa: FA3's choice
            0,                    # sm_margin
            None,                 # s_aux: no attention sinks
            1, 0,                 # cp_world_size, cp_rank: no context parallelism
            None,                 # cp_tot_seqused_k
        )
        return out
