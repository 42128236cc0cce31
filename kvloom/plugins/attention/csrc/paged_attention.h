// What the host binding (paged_attention.cpp) and the kernels (paged_attention_kernels.cu)
// share: the decode parameters and the launchers. Kept free of torch headers so that nvcc
// compiles only the kernels, and quickly.
#pragma once

#include <cuda_runtime_api.h>

#include <cstdint>

namespace kvloom_paged {

enum class DType { kHalf, kBFloat16 };

struct DecodeParams {
  void* out;                  // [num_seqs, num_heads, D], contiguous
  float* partial_out;         // [num_seqs, num_heads, max_splits, D]
  float* partial_lse;         // [num_seqs, num_heads, max_splits], base 2
  const void* query;          // [num_seqs, num_heads, D], last stride 1
  const void* kv_cache;
  const int* block_tables;    // [num_seqs, block_table_stride]
  const int* seq_lens;        // [num_seqs]
  int64_t query_stride_token, query_stride_head;
  int64_t cache_stride_kv, cache_stride_block;
  int block_table_stride;
  int num_heads, num_kv_heads, group, head_chunks;
  int block_size;
  int num_splits, max_splits;
  float scale_log2;           // softmax scale * log2 e
};

// Launch on `stream`; return the launch's error (cudaSuccess when it started).
cudaError_t launch_write_kv(DType dtype, const void* key, const void* value, void* kv_cache,
                            const int64_t* slots, int num_tokens,
                            int64_t key_stride_token, int64_t key_stride_head,
                            int64_t value_stride_token, int64_t value_stride_head,
                            int64_t cache_stride_kv, int num_kv_heads, int head_size,
                            cudaStream_t stream);

// head_size 64, 128 or 256; up to 8 query heads per CTA (params.head_chunks CTAs per KV head).
cudaError_t launch_paged_decode(DType dtype, int head_size, const DecodeParams& params,
                                int num_seqs, cudaStream_t stream);

}  // namespace kvloom_paged
