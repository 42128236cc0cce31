"""Triton kernels for attention over the paged KV cache.

Layout of one layer's cache: [2, num_blocks, block_size, num_kv_heads, head_size]
(keys then values). Every kernel finds a token's slot through the block table, so
tiles of BLOCK_N keys may span several cache blocks.

* ``write_kv_cache``: store the step's new keys and values at their slots
  (slot -1 marks padding and is skipped, for CUDA-graph batches).
* ``prefill_attention``: causal attention for a ragged batch of query segments
  whose earlier context sits in the cache (chunked prefill, prefix hits, and
  decodes mixed in). One program per (query tile, KV head); the query heads that
  share a KV head are packed into the tile's rows (GQA).
* ``decode_attention``: one query token per sequence, the KV length split over
  several programs (flash-decoding), then a reduction over the splits. Its grid
  depends only on the batch size, so it can be captured in a CUDA graph.

All softmax arithmetic is in float32.
"""

from __future__ import annotations

import triton
import triton.language as tl


@triton.jit
def _write_kv_kernel(key_ptr, value_ptr, cache_ptr, slot_ptr,
                     stride_key_token, stride_value_token, stride_cache_kv, num_elements,
                     BLOCK: tl.constexpr):
    token = tl.program_id(0)
    slot = tl.load(slot_ptr + token)
    if slot < 0:
        return
    offsets = tl.arange(0, BLOCK)
    mask = offsets < num_elements
    key = tl.load(key_ptr + token * stride_key_token + offsets, mask=mask)
    value = tl.load(value_ptr + token * stride_value_token + offsets, mask=mask)
    base = cache_ptr + slot.to(tl.int64) * num_elements + offsets
    tl.store(base, key.to(cache_ptr.dtype.element_ty), mask=mask)
    tl.store(base + stride_cache_kv, value.to(cache_ptr.dtype.element_ty), mask=mask)


def dot_precision(dtype) -> str:
    """Full float32 products for float32 models (exactness against references); the
    16-bit types run natively whatever this says."""
    import torch

    return "ieee" if dtype == torch.float32 else "tf32"


def write_kv_cache(key, value, kv_cache, slot_mapping) -> None:
    """key/value: [num_tokens, num_kv_heads, head_size], contiguous per token."""
    num_tokens = key.shape[0]
    if num_tokens == 0:
        return
    num_elements = key.shape[1] * key.shape[2]
    _write_kv_kernel[(num_tokens,)](
        key, value, kv_cache, slot_mapping,
        key.stride(0), value.stride(0), kv_cache.stride(0), num_elements,
        BLOCK=triton.next_power_of_2(num_elements))


@triton.jit
def _load_kv_tile(cache_ptr, block_table_ptr, kv_head, token_index, token_mask, dims, dim_mask,
                  stride_block, stride_slot, stride_head, BLOCK_SIZE: tl.constexpr):
    """[BLOCK_N, HEAD_DIM_PADDED] keys or values of the given token positions."""
    block = tl.load(block_table_ptr + token_index // BLOCK_SIZE, mask=token_mask, other=0)
    offsets = (block.to(tl.int64) * stride_block + (token_index % BLOCK_SIZE) * stride_slot
               + kv_head * stride_head)
    return tl.load(cache_ptr + offsets[:, None] + dims[None, :],
                   mask=token_mask[:, None] & dim_mask[None, :], other=0.0)


@triton.jit
def _prefill_kernel(q_ptr, cache_ptr, out_ptr, block_tables_ptr, seq_lens_ptr,
                    query_start_ptr, tile_seq_ptr, tile_start_ptr, scale,
                    stride_q_token, stride_q_head, stride_o_token, stride_o_head,
                    stride_cache_kv, stride_block, stride_slot, stride_head, stride_table,
                    HEAD_DIM: tl.constexpr, HEAD_DIM_PADDED: tl.constexpr,
                    GROUP: tl.constexpr, BLOCK_Q: tl.constexpr, BLOCK_M: tl.constexpr,
                    BLOCK_N: tl.constexpr, BLOCK_SIZE: tl.constexpr,
                    DOT_PRECISION: tl.constexpr):
    tile = tl.program_id(0)
    kv_head = tl.program_id(1)
    seq = tl.load(tile_seq_ptr + tile)
    tile_start = tl.load(tile_start_ptr + tile)
    query_start = tl.load(query_start_ptr + seq)
    query_len = tl.load(query_start_ptr + seq + 1) - query_start
    seq_len = tl.load(seq_lens_ptr + seq)
    context_len = seq_len - query_len

    rows = tl.arange(0, BLOCK_M)
    token_in_query = tile_start + rows // GROUP
    head = kv_head * GROUP + rows % GROUP
    row_mask = (token_in_query < query_len) & (rows < BLOCK_Q * GROUP)
    dims = tl.arange(0, HEAD_DIM_PADDED)
    dim_mask = dims < HEAD_DIM

    q_offsets = ((query_start + token_in_query).to(tl.int64) * stride_q_token
                 + head * stride_q_head)
    q = tl.load(q_ptr + q_offsets[:, None] + dims[None, :],
                mask=row_mask[:, None] & dim_mask[None, :], other=0.0)
    query_pos = context_len + token_in_query

    m_i = tl.full([BLOCK_M], float("-inf"), tl.float32)
    l_i = tl.zeros([BLOCK_M], tl.float32)
    acc = tl.zeros([BLOCK_M, HEAD_DIM_PADDED], tl.float32)
    table = block_tables_ptr + seq.to(tl.int64) * stride_table
    # Keys up to the last query of this tile are visible.
    kv_end = tl.minimum(seq_len, context_len + tile_start + BLOCK_Q)
    for start in range(0, kv_end, BLOCK_N):
        token_index = start + tl.arange(0, BLOCK_N)
        token_mask = token_index < kv_end
        k = _load_kv_tile(cache_ptr, table, kv_head, token_index, token_mask, dims, dim_mask,
                          stride_block, stride_slot, stride_head, BLOCK_SIZE)
        scores = tl.dot(q, tl.trans(k).to(q.dtype), input_precision=DOT_PRECISION).to(tl.float32) * scale
        visible = (token_index[None, :] <= query_pos[:, None]) & token_mask[None, :]
        scores = tl.where(visible, scores, float("-inf"))
        m_new = tl.maximum(m_i, tl.max(scores, 1))
        m_safe = tl.where(m_new == float("-inf"), 0.0, m_new)
        p = tl.exp(scores - m_safe[:, None])
        alpha = tl.exp(m_i - m_safe)
        l_i = l_i * alpha + tl.sum(p, 1)
        v = _load_kv_tile(cache_ptr + stride_cache_kv, table, kv_head, token_index, token_mask,
                          dims, dim_mask, stride_block, stride_slot, stride_head, BLOCK_SIZE)
        acc = acc * alpha[:, None] + tl.dot(p.to(v.dtype), v, input_precision=DOT_PRECISION).to(tl.float32)
        m_i = m_new
    out = acc / tl.where(l_i == 0.0, 1.0, l_i)[:, None]
    o_offsets = ((query_start + token_in_query).to(tl.int64) * stride_o_token
                 + head * stride_o_head)
    tl.store(out_ptr + o_offsets[:, None] + dims[None, :], out.to(out_ptr.dtype.element_ty),
             mask=row_mask[:, None] & dim_mask[None, :])


def prefill_attention(query, kv_cache, out, block_tables, seq_lens, query_start_loc,
                      tile_seq, tile_start, scale: float, block_q: int, block_n: int = 64) -> None:
    """Causal attention for a ragged batch; tiles are (sequence, first query) pairs."""
    num_tiles = tile_seq.shape[0]
    if num_tiles == 0:
        return
    num_heads, head_size = query.shape[1], query.shape[2]
    num_kv_heads = kv_cache.shape[3]
    group = num_heads // num_kv_heads
    block_m = max(16, triton.next_power_of_2(block_q * group))
    _prefill_kernel[(num_tiles, num_kv_heads)](
        query, kv_cache, out, block_tables, seq_lens, query_start_loc, tile_seq, tile_start,
        scale, query.stride(0), query.stride(1), out.stride(0), out.stride(1),
        kv_cache.stride(0), kv_cache.stride(1), kv_cache.stride(2), kv_cache.stride(3),
        block_tables.stride(0),
        HEAD_DIM=head_size, HEAD_DIM_PADDED=triton.next_power_of_2(head_size), GROUP=group,
        BLOCK_Q=block_q, BLOCK_M=block_m, BLOCK_N=block_n, BLOCK_SIZE=kv_cache.shape[2],
        DOT_PRECISION=dot_precision(query.dtype))


@triton.jit
def _decode_split_kernel(q_ptr, cache_ptr, partial_out_ptr, partial_lse_ptr, block_tables_ptr,
                         seq_lens_ptr, scale,
                         stride_q_token, stride_q_head, stride_cache_kv, stride_block,
                         stride_slot, stride_head, stride_table,
                         stride_po_seq, stride_po_head, stride_po_split,
                         stride_pl_seq, stride_pl_head,
                         NUM_SPLITS: tl.constexpr, HEAD_DIM: tl.constexpr,
                         HEAD_DIM_PADDED: tl.constexpr, GROUP: tl.constexpr,
                         GROUP_PADDED: tl.constexpr, BLOCK_N: tl.constexpr,
                         BLOCK_SIZE: tl.constexpr, DOT_PRECISION: tl.constexpr):
    seq = tl.program_id(0)
    kv_head = tl.program_id(1)
    split = tl.program_id(2)
    seq_len = tl.load(seq_lens_ptr + seq)
    rows = tl.arange(0, GROUP_PADDED)
    row_mask = rows < GROUP
    head = kv_head * GROUP + rows
    dims = tl.arange(0, HEAD_DIM_PADDED)
    dim_mask = dims < HEAD_DIM

    # Each split covers a whole number of BLOCK_N tiles.
    tiles_per_split = tl.cdiv(tl.cdiv(seq_len, BLOCK_N), NUM_SPLITS)
    kv_start = split * tiles_per_split * BLOCK_N
    kv_end = tl.minimum(seq_len, kv_start + tiles_per_split * BLOCK_N)

    q = tl.load(q_ptr + seq.to(tl.int64) * stride_q_token + head[:, None] * stride_q_head
                + dims[None, :], mask=row_mask[:, None] & dim_mask[None, :], other=0.0)
    m_i = tl.full([GROUP_PADDED], float("-inf"), tl.float32)
    l_i = tl.zeros([GROUP_PADDED], tl.float32)
    acc = tl.zeros([GROUP_PADDED, HEAD_DIM_PADDED], tl.float32)
    table = block_tables_ptr + seq.to(tl.int64) * stride_table
    for start in range(kv_start, kv_end, BLOCK_N):
        token_index = start + tl.arange(0, BLOCK_N)
        token_mask = token_index < kv_end
        k = _load_kv_tile(cache_ptr, table, kv_head, token_index, token_mask, dims, dim_mask,
                          stride_block, stride_slot, stride_head, BLOCK_SIZE)
        scores = tl.dot(q, tl.trans(k).to(q.dtype), input_precision=DOT_PRECISION).to(tl.float32) * scale
        scores = tl.where(token_mask[None, :], scores, float("-inf"))
        m_new = tl.maximum(m_i, tl.max(scores, 1))
        m_safe = tl.where(m_new == float("-inf"), 0.0, m_new)
        p = tl.exp(scores - m_safe[:, None])
        alpha = tl.exp(m_i - m_safe)
        l_i = l_i * alpha + tl.sum(p, 1)
        v = _load_kv_tile(cache_ptr + stride_cache_kv, table, kv_head, token_index, token_mask,
                          dims, dim_mask, stride_block, stride_slot, stride_head, BLOCK_SIZE)
        acc = acc * alpha[:, None] + tl.dot(p.to(v.dtype), v, input_precision=DOT_PRECISION).to(tl.float32)
        m_i = m_new
    out = acc / tl.where(l_i == 0.0, 1.0, l_i)[:, None]
    lse = tl.where(l_i == 0.0, float("-inf"), m_i + tl.log(l_i))
    po = (partial_out_ptr + seq.to(tl.int64) * stride_po_seq + head[:, None] * stride_po_head
          + split * stride_po_split + dims[None, :])
    tl.store(po, out, mask=row_mask[:, None] & dim_mask[None, :])
    tl.store(partial_lse_ptr + seq.to(tl.int64) * stride_pl_seq + head * stride_pl_head + split,
             lse, mask=row_mask)


@triton.jit
def _decode_reduce_kernel(partial_out_ptr, partial_lse_ptr, out_ptr,
                          stride_po_seq, stride_po_head, stride_po_split,
                          stride_pl_seq, stride_pl_head, stride_o_token, stride_o_head,
                          NUM_SPLITS: tl.constexpr, SPLITS_PADDED: tl.constexpr,
                          HEAD_DIM: tl.constexpr, HEAD_DIM_PADDED: tl.constexpr):
    seq = tl.program_id(0)
    head = tl.program_id(1)
    splits = tl.arange(0, SPLITS_PADDED)
    split_mask = splits < NUM_SPLITS
    dims = tl.arange(0, HEAD_DIM_PADDED)
    dim_mask = dims < HEAD_DIM
    lse = tl.load(partial_lse_ptr + seq.to(tl.int64) * stride_pl_seq + head * stride_pl_head
                  + splits, mask=split_mask, other=float("-inf"))
    lse_max = tl.max(lse, 0)
    lse_max = tl.where(lse_max == float("-inf"), 0.0, lse_max)
    weights = tl.exp(lse - lse_max)
    total = tl.sum(weights, 0)
    partial = tl.load(partial_out_ptr + seq.to(tl.int64) * stride_po_seq + head * stride_po_head
                      + splits[:, None] * stride_po_split + dims[None, :],
                      mask=split_mask[:, None] & dim_mask[None, :], other=0.0)
    out = tl.sum(partial * weights[:, None], 0) / tl.where(total == 0.0, 1.0, total)
    tl.store(out_ptr + seq.to(tl.int64) * stride_o_token + head * stride_o_head + dims,
             out.to(out_ptr.dtype.element_ty), mask=dim_mask)


def decode_attention(query, kv_cache, out, block_tables, seq_lens, scale: float,
                     partial_out, partial_lse, num_splits: int, block_n: int = 64) -> None:
    """One query token per sequence; sequences with seq_len 0 (padding) produce zeros.

    Args:
        partial_out: float32 [num_seqs, num_heads, >= num_splits, head_size] scratch.
        partial_lse: float32 [num_seqs, num_heads, >= num_splits] scratch.
    """
    num_seqs, num_heads, head_size = query.shape
    if num_seqs == 0:
        return
    num_kv_heads = kv_cache.shape[3]
    group = num_heads // num_kv_heads
    head_dim_padded = triton.next_power_of_2(head_size)
    _decode_split_kernel[(num_seqs, num_kv_heads, num_splits)](
        query, kv_cache, partial_out, partial_lse, block_tables, seq_lens, scale,
        query.stride(0), query.stride(1), kv_cache.stride(0), kv_cache.stride(1),
        kv_cache.stride(2), kv_cache.stride(3), block_tables.stride(0),
        partial_out.stride(0), partial_out.stride(1), partial_out.stride(2),
        partial_lse.stride(0), partial_lse.stride(1),
        NUM_SPLITS=num_splits, HEAD_DIM=head_size, HEAD_DIM_PADDED=head_dim_padded,
        GROUP=group, GROUP_PADDED=max(16, triton.next_power_of_2(group)), BLOCK_N=block_n,
        BLOCK_SIZE=kv_cache.shape[2], DOT_PRECISION=dot_precision(query.dtype))
    _decode_reduce_kernel[(num_seqs, num_heads)](
        partial_out, partial_lse, out,
        partial_out.stride(0), partial_out.stride(1), partial_out.stride(2),
        partial_lse.stride(0), partial_lse.stride(1), out.stride(0), out.stride(1),
        NUM_SPLITS=num_splits, SPLITS_PADDED=triton.next_power_of_2(num_splits),
        HEAD_DIM=head_size, HEAD_DIM_PADDED=head_dim_padded)
