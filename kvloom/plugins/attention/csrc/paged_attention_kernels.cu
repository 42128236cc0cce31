// Paged decode attention and the KV-cache write for kvloom's `cuda_paged` backend.
//
// Cache layout, one tensor per layer: [2, num_blocks, block_size, num_kv_heads, head_size]
// (keys, then values), contiguous. A token's row for one KV head is head_size contiguous
// elements; the block table maps a sequence's token t to block block_table[t / block_size].
//
// Decode: one query token per sequence. A thread block (CTA) owns one sequence, one KV
// head and up to 8 of the query heads that share it (GQA packing: each key and value row
// is read from memory once per KV head, not once per query head), over one split of the
// sequence. Its 4 warps take turns over tiles of 16 keys; each warp copies its tiles into
// shared memory asynchronously (cp.async, the next tile in flight while it computes on
// this one), multiplies them on the tensor cores (mma.sync m16n8k16: the packed query heads
// are the rows, padded to 16) and keeps its own online softmax. The warps' results are
// merged at the end, so a split of any length runs in fixed shared memory.
//
// One pass when num_splits == 1 (the CTA writes the output); otherwise each split writes
// its normalised partial output and log-sum-exp, and `combine_splits` merges them
// (flash-decoding). The host picks num_splits from the batch size alone, so the grid of
// a decode step depends only on the batch size and the step can be captured in a CUDA graph.
//
// Products accumulate in float32 and the softmax is in float32, in base 2.

#include <cuda_bf16.h>
#include <cuda_fp16.h>

#include <cstdint>

#include "paged_attention.h"

namespace kvloom_paged {

constexpr int WARP_SIZE = 32;
constexpr int NUM_WARPS = 4;
constexpr int THREADS = NUM_WARPS * WARP_SIZE;
constexpr int ROWS = 8;          // query heads per CTA (the mma's 16 rows, half padding)
constexpr int TILE = 16;         // keys per warp per step
constexpr int MIN_SPLIT = NUM_WARPS * TILE;  // a split shorter than this idles warps
constexpr unsigned FULL_MASK = 0xffffffffu;

template <typename T> struct Pack;

template <> struct Pack<__half> {
  static __device__ __forceinline__ __half from_float(float x) { return __float2half_rn(x); }
  static __device__ __forceinline__ uint32_t pair(float lo, float hi) {
    const __half2 v = __floats2half2_rn(lo, hi);
    return *reinterpret_cast<const uint32_t*>(&v);
  }
  // d += a * b on the tensor cores: a 16x16 (row), b 16x8 (col), float32 accumulators.
  static __device__ __forceinline__ void mma(float (&d)[4], const uint32_t (&a)[4],
                                             uint32_t b0, uint32_t b1) {
    asm volatile(
        "mma.sync.aligned.m16n8k16.row.col.f32.f16.f16.f32 "
        "{%0,%1,%2,%3}, {%4,%5,%6,%7}, {%8,%9}, {%0,%1,%2,%3};\n"
        : "+f"(d[0]), "+f"(d[1]), "+f"(d[2]), "+f"(d[3])
        : "r"(a[0]), "r"(a[1]), "r"(a[2]), "r"(a[3]), "r"(b0), "r"(b1));
  }
};

template <> struct Pack<__nv_bfloat16> {
  static __device__ __forceinline__ __nv_bfloat16 from_float(float x) {
    return __float2bfloat16_rn(x);
  }
  static __device__ __forceinline__ uint32_t pair(float lo, float hi) {
    const __nv_bfloat162 v = __floats2bfloat162_rn(lo, hi);
    return *reinterpret_cast<const uint32_t*>(&v);
  }
  static __device__ __forceinline__ void mma(float (&d)[4], const uint32_t (&a)[4],
                                             uint32_t b0, uint32_t b1) {
    asm volatile(
        "mma.sync.aligned.m16n8k16.row.col.f32.bf16.bf16.f32 "
        "{%0,%1,%2,%3}, {%4,%5,%6,%7}, {%8,%9}, {%0,%1,%2,%3};\n"
        : "+f"(d[0]), "+f"(d[1]), "+f"(d[2]), "+f"(d[3])
        : "r"(a[0]), "r"(a[1]), "r"(a[2]), "r"(a[3]), "r"(b0), "r"(b1));
  }
};

__device__ __forceinline__ uint32_t shared_address(const void* pointer) {
  return static_cast<uint32_t>(__cvta_generic_to_shared(pointer));
}

// Four 8x8 matrices of 16-bit values from shared memory; lane L gives the address of row
// L % 8 of matrix L / 8. Plain: lane L gets (row L/4, columns 2(L%4), +1) of each matrix;
// transposed: (rows 2(L%4), +1, column L/4).
__device__ __forceinline__ void load_matrices(uint32_t (&r)[4], const void* row) {
  asm volatile("ldmatrix.sync.aligned.m8n8.x4.shared.b16 {%0,%1,%2,%3}, [%4];\n"
               : "=r"(r[0]), "=r"(r[1]), "=r"(r[2]), "=r"(r[3])
               : "r"(shared_address(row)));
}

__device__ __forceinline__ void load_matrices_transposed(uint32_t (&r)[4], const void* row) {
  asm volatile("ldmatrix.sync.aligned.m8n8.x4.trans.shared.b16 {%0,%1,%2,%3}, [%4];\n"
               : "=r"(r[0]), "=r"(r[1]), "=r"(r[2]), "=r"(r[3])
               : "r"(shared_address(row)));
}

// 16 bytes global -> shared without passing through registers; zeros when !valid.
__device__ __forceinline__ void copy_async(void* dst, const void* src, bool valid) {
  asm volatile("cp.async.cg.shared.global [%0], [%1], 16, %2;\n"
               :: "r"(shared_address(dst)), "l"(src), "r"(valid ? 16 : 0) : "memory");
}

__device__ __forceinline__ void commit_copies() {
  asm volatile("cp.async.commit_group;\n" ::: "memory");
}

template <int PENDING>
__device__ __forceinline__ void wait_copies() {
  asm volatile("cp.async.wait_group %0;\n" :: "n"(PENDING) : "memory");
}

// Shared memory of the decode kernel for head size D.
template <int D>
struct DecodeLayout {
  static constexpr int ROW = D + 8;  // padded row: ldmatrix's 8 rows land in distinct banks
  static constexpr int STAGES = D <= 128 ? 2 : 1;  // double-buffered where it fits
  static constexpr int TILE_ELEMS = TILE * ROW;    // one key or value tile
  static constexpr int WARP_ELEMS = STAGES * 2 * TILE_ELEMS;
  static constexpr int TILE_BYTES = NUM_WARPS * WARP_ELEMS * 2;
  static constexpr int MERGE_BYTES = NUM_WARPS * ROWS * (D + 2) * 4;
  static constexpr int BYTES = TILE_BYTES > MERGE_BYTES ? TILE_BYTES : MERGE_BYTES;
};

// One CTA: sequence blockIdx.y, split blockIdx.z, KV head and (up to 8 of) its query
// heads from blockIdx.x. Lane L of a warp works on query head row g = L / 4 and key or
// dimension columns 2t, 2t + 1 (t = L % 4), as the mma fragments lay them out.
template <typename T, int D>
__global__ void __launch_bounds__(THREADS)
paged_decode_kernel(const DecodeParams p) {
  using Layout = DecodeLayout<D>;
  constexpr int ROW = Layout::ROW;
  constexpr int WORDS = D / 8;  // 16-byte words per key row
  extern __shared__ __align__(16) unsigned char shared_bytes[];

  const int lane = threadIdx.x % WARP_SIZE;
  const int warp = threadIdx.x / WARP_SIZE;
  const int g = lane / 4, t = lane % 4;
  const int seq = blockIdx.y;
  const int split = blockIdx.z;
  const int kv_head = blockIdx.x / p.head_chunks;
  const int chunk_index = blockIdx.x % p.head_chunks;
  const int first_head = kv_head * p.group + chunk_index * ROWS;
  const int heads_here = min(ROWS, p.group - chunk_index * ROWS);

  const int seq_len = p.seq_lens[seq];
  int split_len = max((seq_len + p.num_splits - 1) / p.num_splits, MIN_SPLIT);
  split_len = (split_len + TILE - 1) / TILE * TILE;
  const int start = split * split_len;
  const int end = min(seq_len, start + split_len);

  T* out = static_cast<T*>(p.out);
  const int64_t row_out = (int64_t)seq * p.num_heads;
  const int64_t row_partial = row_out * p.max_splits;
  if (start >= end) {
    // A padding row (length 0) gets zeros; a split past the sequence's end gets weight 0
    // (combine_splits never reads the partial output of a split whose lse is -inf).
    if (p.num_splits == 1) {
      for (int i = threadIdx.x; i < heads_here * D; i += THREADS)
        out[(row_out + first_head + i / D) * D + i % D] = Pack<T>::from_float(0.f);
    } else if (threadIdx.x < heads_here) {
      p.partial_lse[row_partial + (int64_t)(first_head + threadIdx.x) * p.max_splits + split] =
          -INFINITY;
    }
    return;
  }

  // The query as mma A fragments: row g's columns 2t, 2t+1 and 2t+8, 2t+9 of each
  // 16-wide k-step. Rows 8..15 (the other two A registers) are padding: zero.
  uint32_t q[D / 16][2];
  {
    const T* query = static_cast<const T*>(p.query) + seq * p.query_stride_token +
                     (int64_t)(first_head + g) * p.query_stride_head + 2 * t;
#pragma unroll
    for (int ks = 0; ks < D / 16; ++ks) {
      q[ks][0] = g < heads_here ? *reinterpret_cast<const uint32_t*>(query + ks * 16) : 0u;
      q[ks][1] = g < heads_here ? *reinterpret_cast<const uint32_t*>(query + ks * 16 + 8) : 0u;
    }
  }

  const T* key_cache = static_cast<const T*>(p.kv_cache);
  const T* value_cache = key_cache + p.cache_stride_kv;
  const int* block_table = p.block_tables + (int64_t)seq * p.block_table_stride;
  const int64_t head_offset = (int64_t)kv_head * D;
  const int64_t token_stride = (int64_t)p.num_kv_heads * D;
  T* tiles = reinterpret_cast<T*>(shared_bytes) + warp * Layout::WARP_ELEMS;

  // Copy keys and values [first, first + 16) into stage `stage` of this warp's tiles.
  auto load_tile = [&](int first, int stage) {
    const int token = first + lane % TILE;
    int64_t row = 0;
    if (token < end)
      row = (int64_t)block_table[token / p.block_size] * p.cache_stride_block +
            (int64_t)(token % p.block_size) * token_stride + head_offset;
    T* keys = tiles + stage * 2 * Layout::TILE_ELEMS;
    T* values = keys + Layout::TILE_ELEMS;
#pragma unroll
    for (int i = 0; i < TILE * WORDS / WARP_SIZE; ++i) {
      const int word = lane + i * WARP_SIZE;
      const int k = word / WORDS, column = (word % WORDS) * 8;
      const int64_t source = __shfl_sync(FULL_MASK, row, k) + column;
      const bool valid = first + k < end;
      copy_async(keys + k * ROW + column, key_cache + source, valid);
      copy_async(values + k * ROW + column, value_cache + source, valid);
    }
    commit_copies();
  };

  float o[D / 8][4];  // output fragments: dimensions 8n + 2t, +1 of rows g (and g + 8)
#pragma unroll
  for (int n = 0; n < D / 8; ++n) o[n][0] = o[n][1] = o[n][2] = o[n][3] = 0.f;
  float m = -INFINITY, l = 0.f;  // row g's running max and this lane's share of its sum

  const int step = NUM_WARPS * TILE;
  int stage = 0;
  if (start + warp * TILE < end) load_tile(start + warp * TILE, 0);
  for (int first = start + warp * TILE; first < end; first += step) {
    const bool more = first + step < end;
    if (Layout::STAGES == 2 && more) {
      load_tile(first + step, stage ^ 1);
      wait_copies<1>();
    } else {
      wait_copies<0>();
    }
    __syncwarp();
    const T* keys = tiles + stage * 2 * Layout::TILE_ELEMS;
    const T* values = keys + Layout::TILE_ELEMS;
    const int matrix = lane / 8, matrix_row = lane % 8;

    // Scores of row g against keys first + 8j + 2t, +1.
    float s[2][4] = {{0.f, 0.f, 0.f, 0.f}, {0.f, 0.f, 0.f, 0.f}};
#pragma unroll
    for (int j = 0; j < 2; ++j) {
#pragma unroll
      for (int ks = 0; ks < D / 16; ks += 2) {  // two k-steps per load: 4 matrices of 8 dims
        uint32_t b[4];
        load_matrices(b, keys + (j * 8 + matrix_row) * ROW + ks * 16 + matrix * 8);
        const uint32_t a0[4] = {q[ks][0], 0u, q[ks][1], 0u};
        Pack<T>::mma(s[j], a0, b[0], b[1]);
        const uint32_t a1[4] = {q[ks + 1][0], 0u, q[ks + 1][1], 0u};
        Pack<T>::mma(s[j], a1, b[2], b[3]);
      }
    }

    // Online softmax over the tile (the 4 lanes of row g hold its 16 scores).
    float tile_max = -INFINITY;
#pragma unroll
    for (int j = 0; j < 2; ++j) {
#pragma unroll
      for (int e = 0; e < 2; ++e) {
        const bool live = first + 8 * j + 2 * t + e < end;
        s[j][e] = live ? s[j][e] * p.scale_log2 : -INFINITY;
        tile_max = fmaxf(tile_max, s[j][e]);
      }
    }
    tile_max = fmaxf(tile_max, __shfl_xor_sync(FULL_MASK, tile_max, 1));
    tile_max = fmaxf(tile_max, __shfl_xor_sync(FULL_MASK, tile_max, 2));
    const float m_new = fmaxf(m, tile_max);  // finite: the tile's first key is live
    const float alpha = exp2f(m - m_new);
    m = m_new;
    float weights[2][2];
#pragma unroll
    for (int j = 0; j < 2; ++j) {
      weights[j][0] = exp2f(s[j][0] - m_new);
      weights[j][1] = exp2f(s[j][1] - m_new);
    }
    l = l * alpha + weights[0][0] + weights[0][1] + weights[1][0] + weights[1][1];
#pragma unroll
    for (int n = 0; n < D / 8; ++n) {
      o[n][0] *= alpha;
      o[n][1] *= alpha;
    }

    // o += weights (row g, 16 keys, as an A fragment) x values (16 keys x D).
    const uint32_t a[4] = {Pack<T>::pair(weights[0][0], weights[0][1]), 0u,
                           Pack<T>::pair(weights[1][0], weights[1][1]), 0u};
#pragma unroll
    for (int n = 0; n < D / 8; n += 2) {  // matrices: keys 0-7 / 8-15 x dims 8n / 8n + 8
      uint32_t b[4];
      load_matrices_transposed(b, values + ((matrix & 1) * 8 + matrix_row) * ROW + n * 8 +
                                      (matrix >> 1) * 8);
      Pack<T>::mma(o[n], a, b[0], b[1]);
      Pack<T>::mma(o[n + 1], a, b[2], b[3]);
    }
    __syncwarp();  // every lane is done with this stage before it is refilled
    if (Layout::STAGES == 2) {
      stage ^= 1;
    } else if (more) {
      load_tile(first + step, 0);
    }
  }
  l += __shfl_xor_sync(FULL_MASK, l, 1);
  l += __shfl_xor_sync(FULL_MASK, l, 2);

  // Merge the warps: each leaves its row maxima, sums and outputs in shared memory.
  __syncthreads();  // the tiles are free: reuse their memory
  float* warp_max = reinterpret_cast<float*>(shared_bytes);  // [NUM_WARPS][ROWS]
  float* warp_sum = warp_max + NUM_WARPS * ROWS;              // [NUM_WARPS][ROWS]
  float* warp_out = warp_sum + NUM_WARPS * ROWS;              // [NUM_WARPS][ROWS][D]
  if (t == 0) {
    warp_max[warp * ROWS + g] = m;
    warp_sum[warp * ROWS + g] = l;
  }
#pragma unroll
  for (int n = 0; n < D / 8; ++n) {
    float* dst = warp_out + (warp * ROWS + g) * D + n * 8 + 2 * t;
    dst[0] = o[n][0];
    dst[1] = o[n][1];
  }
  __syncthreads();
  for (int i = threadIdx.x; i < heads_here * D; i += THREADS) {
    const int h = i / D, d = i % D;
    float top = -INFINITY;
#pragma unroll
    for (int w = 0; w < NUM_WARPS; ++w) top = fmaxf(top, warp_max[w * ROWS + h]);
    float sum = 0.f, value = 0.f;
#pragma unroll
    for (int w = 0; w < NUM_WARPS; ++w) {
      const float weight = exp2f(warp_max[w * ROWS + h] - top);  // 0 for a warp with no keys
      sum += weight * warp_sum[w * ROWS + h];
      value += weight * warp_out[(w * ROWS + h) * D + d];
    }
    const int head = first_head + h;
    if (p.num_splits == 1) {
      out[(row_out + head) * D + d] = Pack<T>::from_float(value / sum);
    } else {
      const int64_t at = row_partial + (int64_t)head * p.max_splits + split;
      p.partial_out[at * D + d] = value / sum;
      if (d == 0) p.partial_lse[at] = top + log2f(sum);
    }
  }
}

// Merge the splits of each (sequence, head): weights 2^(lse - max).
template <typename T, int D>
__global__ void __launch_bounds__(D)
combine_splits_kernel(T* out, const float* partial_out, const float* partial_lse,
                      int num_heads, int num_splits, int max_splits) {
  const int64_t row = (int64_t)blockIdx.x * num_heads + blockIdx.y;  // seq, head
  const float* lse = partial_lse + row * max_splits;
  const int d = threadIdx.x;
  float m = -INFINITY;
  for (int s = 0; s < num_splits; ++s) m = fmaxf(m, lse[s]);
  float value = 0.f;
  if (m != -INFINITY) {
    float total = 0.f, sum = 0.f;
    for (int s = 0; s < num_splits; ++s) {
      const float w = exp2f(lse[s] - m);
      if (w > 0.f) {
        sum += w * partial_out[(row * max_splits + s) * D + d];
        total += w;
      }
    }
    value = sum / total;
  }
  out[row * D + d] = Pack<T>::from_float(value);
}

// Store each token's new key and value rows at its slot; slot -1 (CUDA-graph padding)
// writes nothing.
template <typename T>
__global__ void write_kv_kernel(const T* key, const T* value, T* kv_cache, const int64_t* slots,
                                int64_t key_stride_token, int64_t key_stride_head,
                                int64_t value_stride_token, int64_t value_stride_head,
                                int64_t cache_stride_kv, int num_kv_heads, int head_size) {
  const int64_t slot = slots[blockIdx.x];
  if (slot < 0) return;
  const int vecs_per_head = head_size / 8;
  const int64_t row = slot * num_kv_heads * head_size;
  for (int i = threadIdx.x; i < num_kv_heads * vecs_per_head; i += blockDim.x) {
    const int h = i / vecs_per_head, word = i % vecs_per_head;
    const uint4 k = reinterpret_cast<const uint4*>(
        key + blockIdx.x * key_stride_token + h * key_stride_head)[word];
    const uint4 v = reinterpret_cast<const uint4*>(
        value + blockIdx.x * value_stride_token + h * value_stride_head)[word];
    uint4* dst = reinterpret_cast<uint4*>(kv_cache + row + (int64_t)h * head_size);
    dst[word] = k;
    reinterpret_cast<uint4*>(kv_cache + cache_stride_kv + row + (int64_t)h * head_size)[word] = v;
  }
}

template <typename T>
cudaError_t write_kv(const void* key, const void* value, void* kv_cache, const int64_t* slots,
                     int num_tokens, int64_t key_stride_token, int64_t key_stride_head,
                     int64_t value_stride_token, int64_t value_stride_head,
                     int64_t cache_stride_kv, int num_kv_heads, int head_size,
                     cudaStream_t stream) {
  const int words = num_kv_heads * head_size / 8;
  const int threads = words < 32 ? 32 : (words > 256 ? 256 : words);
  write_kv_kernel<T><<<num_tokens, threads, 0, stream>>>(
      static_cast<const T*>(key), static_cast<const T*>(value), static_cast<T*>(kv_cache),
      slots, key_stride_token, key_stride_head, value_stride_token, value_stride_head,
      cache_stride_kv, num_kv_heads, head_size);
  return cudaGetLastError();
}

cudaError_t launch_write_kv(DType dtype, const void* key, const void* value, void* kv_cache,
                            const int64_t* slots, int num_tokens,
                            int64_t key_stride_token, int64_t key_stride_head,
                            int64_t value_stride_token, int64_t value_stride_head,
                            int64_t cache_stride_kv, int num_kv_heads, int head_size,
                            cudaStream_t stream) {
  auto run = dtype == DType::kHalf ? write_kv<__half> : write_kv<__nv_bfloat16>;
  return run(key, value, kv_cache, slots, num_tokens, key_stride_token, key_stride_head,
             value_stride_token, value_stride_head, cache_stride_kv, num_kv_heads, head_size,
             stream);
}

template <typename T, int D>
cudaError_t decode(const DecodeParams& params, int num_seqs, cudaStream_t stream) {
  constexpr int bytes = DecodeLayout<D>::BYTES;
  // Above 48 KB a kernel's dynamic shared memory must be allowed explicitly, once.
  static const cudaError_t allowed = cudaFuncSetAttribute(
      paged_decode_kernel<T, D>, cudaFuncAttributeMaxDynamicSharedMemorySize, bytes);
  if (allowed != cudaSuccess) return allowed;
  const dim3 grid(params.num_kv_heads * params.head_chunks, num_seqs, params.num_splits);
  paged_decode_kernel<T, D><<<grid, THREADS, bytes, stream>>>(params);
  cudaError_t status = cudaGetLastError();
  if (status != cudaSuccess || params.num_splits == 1) return status;
  combine_splits_kernel<T, D><<<dim3(num_seqs, params.num_heads), D, 0, stream>>>(
      static_cast<T*>(params.out), params.partial_out, params.partial_lse, params.num_heads,
      params.num_splits, params.max_splits);
  return cudaGetLastError();
}

template <typename T>
cudaError_t decode_head_size(int head_size, const DecodeParams& params, int num_seqs,
                             cudaStream_t stream) {
  switch (head_size) {
    case 64: return decode<T, 64>(params, num_seqs, stream);
    case 128: return decode<T, 128>(params, num_seqs, stream);
    case 256: return decode<T, 256>(params, num_seqs, stream);
    default: return cudaErrorInvalidValue;
  }
}

cudaError_t launch_paged_decode(DType dtype, int head_size, const DecodeParams& params,
                                int num_seqs, cudaStream_t stream) {
  if (dtype == DType::kHalf) return decode_head_size<__half>(head_size, params, num_seqs, stream);
  return decode_head_size<__nv_bfloat16>(head_size, params, num_seqs, stream);
}

}  // namespace kvloom_paged
