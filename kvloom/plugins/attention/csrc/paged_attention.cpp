// The Python binding of the cuda_paged kernels: argument checks, then the launchers in
// paged_attention_kernels.cu on the current stream (so the calls can be captured in CUDA
// graphs). Built at first use by kvloom/plugins/attention/cuda_paged_build.py.

#include <torch/extension.h>
#include <c10/cuda/CUDAGuard.h>
#include <c10/cuda/CUDAStream.h>

#include <cstdint>

#include "paged_attention.h"

namespace kvloom_paged {
namespace {

constexpr float LOG2E = 1.4426950408889634f;

void check_rows(const torch::Tensor& t, const char* name) {
  TORCH_CHECK(t.is_cuda(), name, " must be on a CUDA device");
  TORCH_CHECK(t.dim() == 3, name, " must be [tokens, heads, head_size]");
  TORCH_CHECK(t.stride(2) == 1, name, "'s last dimension must be contiguous");
  TORCH_CHECK(t.stride(0) % 8 == 0 && t.stride(1) % 8 == 0 &&
                  reinterpret_cast<uintptr_t>(t.data_ptr()) % 16 == 0,
              name, " rows must be 16-byte aligned");
}

void check_cache(const torch::Tensor& kv_cache, int64_t head_size) {
  TORCH_CHECK(kv_cache.is_cuda() && kv_cache.is_contiguous() && kv_cache.dim() == 5 &&
                  kv_cache.size(0) == 2 && kv_cache.size(4) == head_size,
              "kv_cache must be a contiguous [2, blocks, block_size, kv_heads, head_size] "
              "CUDA tensor");
  TORCH_CHECK(head_size % 8 == 0, "head_size must be a multiple of 8");
}

DType dtype_of(const torch::Tensor& t) {
  if (t.scalar_type() == at::kHalf) return DType::kHalf;
  TORCH_CHECK(t.scalar_type() == at::kBFloat16,
              "cuda_paged supports float16 and bfloat16, got ", t.scalar_type());
  return DType::kBFloat16;
}

void check_launch(cudaError_t status, const char* what) {
  TORCH_CHECK(status == cudaSuccess, what, " failed to launch: ", cudaGetErrorString(status));
}

constexpr int HEADS_PER_CTA = 8;  // the query heads one thread block packs (mma rows)

}  // namespace

void write_kv_cache(torch::Tensor key, torch::Tensor value, torch::Tensor kv_cache,
                    torch::Tensor slot_mapping) {
  check_rows(key, "key");
  check_rows(value, "value");
  check_cache(kv_cache, key.size(2));
  TORCH_CHECK(key.scalar_type() == kv_cache.scalar_type() &&
                  value.scalar_type() == kv_cache.scalar_type(),
              "key/value must have the cache's dtype");
  TORCH_CHECK(key.sizes() == value.sizes() && key.size(1) == kv_cache.size(3),
              "key/value must be [tokens, kv_heads, head_size] like the cache");
  TORCH_CHECK(slot_mapping.scalar_type() == at::kLong && slot_mapping.is_contiguous() &&
                  slot_mapping.size(0) == key.size(0),
              "slot_mapping must be contiguous int64, one slot per token");
  if (key.size(0) == 0) return;
  const c10::cuda::OptionalCUDAGuard guard(key.device());
  check_launch(launch_write_kv(dtype_of(key), key.data_ptr(), value.data_ptr(),
                               kv_cache.data_ptr(), slot_mapping.data_ptr<int64_t>(),
                               key.size(0), key.stride(0), key.stride(1), value.stride(0),
                               value.stride(1), kv_cache.stride(0), key.size(1), key.size(2),
                               c10::cuda::getCurrentCUDAStream().stream()),
               "write_kv_cache");
}

void paged_decode(torch::Tensor out, torch::Tensor query, torch::Tensor kv_cache,
                  torch::Tensor block_tables, torch::Tensor seq_lens, torch::Tensor partial_out,
                  torch::Tensor partial_lse, int64_t num_splits, double scale) {
  check_rows(query, "query");
  const int num_seqs = query.size(0), num_heads = query.size(1), head_size = query.size(2);
  check_cache(kv_cache, head_size);
  TORCH_CHECK(head_size == 64 || head_size == 128 || head_size == 256,
              "cuda_paged supports head sizes 64, 128 and 256, got ", head_size);
  TORCH_CHECK(out.is_contiguous() && out.sizes() == query.sizes() &&
                  out.scalar_type() == query.scalar_type(),
              "out must be contiguous and shaped like query");
  TORCH_CHECK(query.scalar_type() == kv_cache.scalar_type(), "query must have the cache's dtype");
  TORCH_CHECK(block_tables.scalar_type() == at::kInt && block_tables.dim() == 2 &&
                  block_tables.stride(1) == 1 && block_tables.size(0) >= num_seqs,
              "block_tables must be int32 [num_seqs, max_blocks] with contiguous rows");
  TORCH_CHECK(seq_lens.scalar_type() == at::kInt && seq_lens.is_contiguous() &&
                  seq_lens.size(0) >= num_seqs,
              "seq_lens must be contiguous int32 [num_seqs]");
  const int num_kv_heads = kv_cache.size(3);
  TORCH_CHECK(num_heads % num_kv_heads == 0, "num_heads must be a multiple of num_kv_heads");
  TORCH_CHECK(num_splits >= 1, "num_splits must be at least 1");
  if (num_splits > 1) {
    TORCH_CHECK(partial_out.scalar_type() == at::kFloat && partial_out.is_contiguous() &&
                    partial_out.dim() == 4 && partial_out.size(0) >= num_seqs &&
                    partial_out.size(1) == num_heads && partial_out.size(2) >= num_splits &&
                    partial_out.size(3) == head_size,
                "partial_out must be float32 [num_seqs, num_heads, >= num_splits, head_size]");
    TORCH_CHECK(partial_lse.scalar_type() == at::kFloat && partial_lse.is_contiguous() &&
                    partial_lse.dim() == 3 && partial_lse.size(2) == partial_out.size(2),
                "partial_lse must be float32 [num_seqs, num_heads, max_splits]");
  }
  if (num_seqs == 0) return;
  const int group = num_heads / num_kv_heads;

  DecodeParams params;
  params.out = out.data_ptr();
  params.partial_out = num_splits > 1 ? partial_out.data_ptr<float>() : nullptr;
  params.partial_lse = num_splits > 1 ? partial_lse.data_ptr<float>() : nullptr;
  params.query = query.data_ptr();
  params.kv_cache = kv_cache.data_ptr();
  params.block_tables = block_tables.data_ptr<int>();
  params.seq_lens = seq_lens.data_ptr<int>();
  params.query_stride_token = query.stride(0);
  params.query_stride_head = query.stride(1);
  params.cache_stride_kv = kv_cache.stride(0);
  params.cache_stride_block = kv_cache.stride(1);
  params.block_table_stride = block_tables.stride(0);
  params.num_heads = num_heads;
  params.num_kv_heads = num_kv_heads;
  params.group = group;
  params.head_chunks = (group + HEADS_PER_CTA - 1) / HEADS_PER_CTA;
  params.block_size = kv_cache.size(2);
  params.num_splits = num_splits;
  params.max_splits = num_splits > 1 ? partial_out.size(2) : 1;
  params.scale_log2 = static_cast<float>(scale) * LOG2E;

  const c10::cuda::OptionalCUDAGuard guard(query.device());
  check_launch(launch_paged_decode(dtype_of(query), head_size, params, num_seqs,
                                   c10::cuda::getCurrentCUDAStream().stream()),
               "paged_decode");
}

}  // namespace kvloom_paged

PYBIND11_MODULE(TORCH_EXTENSION_NAME, m) {
  m.def("write_kv_cache", &kvloom_paged::write_kv_cache,
        "Store new keys/values at their cache slots (slot -1 skipped)");
  m.def("paged_decode", &kvloom_paged::paged_decode,
        "Decode attention over the paged KV cache (split-KV when num_splits > 1)");
}
