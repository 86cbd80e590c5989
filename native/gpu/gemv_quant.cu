// Weight-only INT8 / INT4 GEMV (W8A16 / W4A16) for decode, and the dequantization that prefill uses
// before a cuBLAS / hipBLAS GEMM (torch, in the caller; there is no fused quantized GEMM here).
// One source for CUDA and HIP.
//
// Layout of the work: one warp / wavefront per output row n; its lanes stream the row's weight in
// 16-byte chunks (16 int8 or 32 int4 weights; 128-bit loads, consecutive lanes on consecutive
// chunks so a warp reads one contiguous 512 B / 1 KiB span), two chunks in flight per lane. The
// block first stages the activations of one K tile (M rows; at most kTileFloats floats, fewer when
// K is short so that more blocks fit a multiprocessor) in dynamic shared memory as fp32, laid out
// so that consecutive lanes read consecutive float4s (no bank conflicts). Partial sums are fp32;
// one warp reduction per output, with an explicit width. Rows whose bytes are not 16-byte aligned
// (odd K) take byte loads instead of 128-bit ones, with the same arithmetic.
//
// Template instantiations are kept few for build time: activation dtype (3) x bits (2) x rows
// per launch (1, 2, 4) = 18 GEMV kernels, plus output dtype (3) x bits (2) = 6 dequantize kernels.
#include "portability.h"

#include <climits>

#include "gemv_quant.h"

namespace glmrt {
namespace gpu {
namespace {

constexpr int kThreads = 256;      // 8 warps (CUDA) or 4 wavefronts (HIP) per block
constexpr int kTileFloats = 8192;  // 32 KiB of staged activations per block
constexpr int kChunksInFlight = 2;

// 16 bytes of the weight row at p; bytes past the row's end read as 0. `vector_ok` says the row
// starts 16-byte aligned (the base pointer is aligned and the row length a multiple of 16 bytes).
__device__ __forceinline__ uint4 load_chunk(const uint8_t* __restrict__ p, int64_t bytes_left, bool vector_ok) {
  if (vector_ok && bytes_left >= 16) return *reinterpret_cast<const uint4*>(p);
  uint32_t word[4] = {0u, 0u, 0u, 0u};
#pragma unroll
  for (int b = 0; b < 16; ++b)
    if (b < bytes_left) word[b / 4] |= static_cast<uint32_t>(p[b]) << (8 * (b % 4));
  return make_uint4(word[0], word[1], word[2], word[3]);
}

// Sign-extended 8-bit and 4-bit fields of a 32-bit word (little-endian: byte i holds k = 4i.. of
// the chunk; in a byte the EVEN k is the HIGH nibble).
__device__ __forceinline__ float s8(uint32_t word, int byte) {
  return static_cast<float>(static_cast<int32_t>(word << (24 - 8 * byte)) >> 24);
}
__device__ __forceinline__ float s4_hi(uint32_t word, int byte) {
  return static_cast<float>(static_cast<int32_t>(word << (24 - 8 * byte)) >> 28);
}
__device__ __forceinline__ float s4_lo(uint32_t word, int byte) {
  return static_cast<float>(static_cast<int32_t>(word << (28 - 8 * byte)) >> 28);
}

// dot[m] = sum over the chunk's weights of w * x[m, k]. xs holds float4 (m, q, c) at
// xs[(m * Q + q) * chunks_per_tile + c], Q = weights per chunk / 4.
template <int BITS, int MT>
__device__ __forceinline__ void chunk_dot(const uint4& wv, const float4* __restrict__ xs, int c, int chunks_per_tile,
                                          float (&dot)[MT]) {
  const uint32_t word[4] = {wv.x, wv.y, wv.z, wv.w};
  constexpr int Q = BITS == 8 ? 4 : 8;
#pragma unroll
  for (int m = 0; m < MT; ++m) dot[m] = 0.f;
#pragma unroll
  for (int j = 0; j < 4; ++j) {
    if (BITS == 8) {
      const float w0 = s8(word[j], 0), w1 = s8(word[j], 1), w2 = s8(word[j], 2), w3 = s8(word[j], 3);
#pragma unroll
      for (int m = 0; m < MT; ++m) {
        const float4 xv = xs[(m * Q + j) * chunks_per_tile + c];
        dot[m] = fmaf(w0, xv.x, fmaf(w1, xv.y, fmaf(w2, xv.z, fmaf(w3, xv.w, dot[m]))));
      }
    } else {
      const float a0 = s4_hi(word[j], 0), a1 = s4_lo(word[j], 0), a2 = s4_hi(word[j], 1), a3 = s4_lo(word[j], 1);
      const float b0 = s4_hi(word[j], 2), b1 = s4_lo(word[j], 2), b2 = s4_hi(word[j], 3), b3 = s4_lo(word[j], 3);
#pragma unroll
      for (int m = 0; m < MT; ++m) {
        const float4 xa = xs[(m * Q + 2 * j) * chunks_per_tile + c];
        const float4 xb = xs[(m * Q + 2 * j + 1) * chunks_per_tile + c];
        float d = fmaf(a0, xa.x, fmaf(a1, xa.y, fmaf(a2, xa.z, a3 * xa.w)));
        d = fmaf(b0, xb.x, fmaf(b1, xb.y, fmaf(b2, xb.z, fmaf(b3, xb.w, d))));
        dot[m] += d;
      }
    }
  }
}

// out[m, n] for m < m_rows (<= MT) and the rows n of this block.
// The K tile: kTileFloats / MT, or K rounded up to whole chunks when that is less.
template <int BITS, int MT>
int chunks_per_tile(int K) {
  constexpr int E = BITS == 8 ? 16 : 32;
  const int full = kTileFloats / MT / E;
  const int needed = (K + E - 1) / E;
  return needed < full ? (needed > 0 ? needed : 1) : full;
}

template <typename T, int BITS, int MT>
__global__ void __launch_bounds__(kThreads)
gemv_quant_kernel(const typename T::storage* __restrict__ x, const uint8_t* __restrict__ w,
                  const void* __restrict__ scale, int scale_dtype, const void* __restrict__ bias, int bias_dtype,
                  typename T::storage* __restrict__ out, int m_rows, int N, int K, int64_t row_bytes, int group_size,
                  int num_groups, bool vector_ok, int CT) {
  constexpr int E = BITS == 8 ? 16 : 32;  // weights per 16-byte chunk
  constexpr int Q = E / 4;                // float4s of activations per chunk and row of x
  const int KT = CT * E;                  // K per tile; CT = chunks per tile
  // Dynamic shared memory: MT * CT * E floats (at most kTileFloats).
  GLMRT_DYNAMIC_SHARED(float4, staged_x);
  const float4* xs = staged_x;
  float* xs_flat = reinterpret_cast<float*>(staged_x);

  // Rows per block follow the compiled warp size: the host sized the grid for the largest one, so
  // a device with narrower warps (RDNA's wave32) only has blocks that find no row.
  constexpr int kRowsPerBlock = kThreads / GLMRT_WARP_SIZE;
  const int64_t n = static_cast<int64_t>(blockIdx.x) * kRowsPerBlock + warp_id();
  const bool active = n < N;  // uniform across the warp
  const int lane = lane_id();
  const uint8_t* wrow = w + (active ? n : 0) * row_bytes;
  const bool grouped = group_size > 0;

  float acc[MT];
#pragma unroll
  for (int m = 0; m < MT; ++m) acc[m] = 0.f;

  for (int k_tile = 0; k_tile < K; k_tile += KT) {
    const int tile_k = K - k_tile < KT ? K - k_tile : KT;
    const int tile_chunks = (tile_k + E - 1) / E;
    const int tile_span = tile_chunks * E;  // zero-padded to whole chunks
    __syncthreads();                        // the previous tile has been consumed
    for (int i = threadIdx.x; i < MT * tile_span; i += kThreads) {
      const int m = i / tile_span;
      const int kk = i - m * tile_span;
      const int c = kk / E, r = kk % E;
      float v = 0.f;
      if (m < m_rows && kk < tile_k) v = T::load(x, static_cast<int64_t>(m) * K + k_tile + kk);
      xs_flat[((m * Q + r / 4) * CT + c) * 4 + (r % 4)] = v;
    }
    __syncthreads();

    if (active) {
      for (int c0 = lane; c0 < tile_chunks; c0 += kChunksInFlight * GLMRT_WARP_SIZE) {
        uint4 wv[kChunksInFlight];
#pragma unroll
        for (int u = 0; u < kChunksInFlight; ++u) {
          const int c = c0 + u * GLMRT_WARP_SIZE;
          const int64_t byte0 = static_cast<int64_t>(k_tile + c * E) * BITS / 8;
          wv[u] = c < tile_chunks ? load_chunk(wrow + byte0, row_bytes - byte0, vector_ok) : make_uint4(0u, 0u, 0u, 0u);
        }
#pragma unroll
        for (int u = 0; u < kChunksInFlight; ++u) {
          const int c = c0 + u * GLMRT_WARP_SIZE;
          if (c >= tile_chunks) break;
          float dot[MT];
          chunk_dot<BITS, MT>(wv[u], xs, c, CT, dot);
          // A chunk never straddles two groups: it starts at a multiple of E and groups are
          // multiples of 32 >= E.
          const float s = grouped ? load_any(scale, n * num_groups + (k_tile + c * E) / group_size, scale_dtype) : 1.f;
#pragma unroll
          for (int m = 0; m < MT; ++m) acc[m] = fmaf(s, dot[m], acc[m]);
        }
      }
    }
  }

#pragma unroll
  for (int m = 0; m < MT; ++m) acc[m] = warp_reduce_sum<GLMRT_WARP_SIZE>(acc[m]);

  if (active && lane == 0) {
    const float s = grouped ? 1.f : load_any(scale, n, scale_dtype);
    const float b = bias != nullptr ? load_any(bias, n, bias_dtype) : 0.f;
#pragma unroll
    for (int m = 0; m < MT; ++m)
      if (m < m_rows) T::store(out, static_cast<int64_t>(m) * N + n, fmaf(acc[m], s, b));
  }
}

template <typename T, int BITS, int MT>
void launch_gemv(const void* x, const void* w, const void* scale, int scale_dtype, const void* bias, int bias_dtype,
                 void* out, int m_rows, int N, int K, int64_t row_bytes, int group_size, int num_groups,
                 bool vector_ok, gpuStream_t stream) {
  const int rows_per_block = kThreads / GLMRT_MAX_WARP_SIZE;
  const unsigned blocks = static_cast<unsigned>((static_cast<int64_t>(N) + rows_per_block - 1) / rows_per_block);
  constexpr int E = BITS == 8 ? 16 : 32;
  const int ct = chunks_per_tile<BITS, MT>(K);
  const size_t smem = static_cast<size_t>(MT) * ct * E * sizeof(float);  // <= 32 KiB: no opt-in needed
  GLMRT_LAUNCH(blocks, kThreads, smem, stream, gemv_quant_kernel<T, BITS, MT>)(
      static_cast<const typename T::storage*>(x), static_cast<const uint8_t*>(w), scale, scale_dtype, bias,
      bias_dtype, static_cast<typename T::storage*>(out), m_rows, N, K, row_bytes, group_size, num_groups, vector_ok,
      ct);
}

template <typename T, int BITS>
void launch_rows(const void* x, const void* w, const void* scale, int scale_dtype, const void* bias, int bias_dtype,
                 void* out, int m_rows, int N, int K, int64_t row_bytes, int group_size, int num_groups,
                 bool vector_ok, gpuStream_t stream) {
  if (m_rows == 1)
    launch_gemv<T, BITS, 1>(x, w, scale, scale_dtype, bias, bias_dtype, out, m_rows, N, K, row_bytes, group_size,
                            num_groups, vector_ok, stream);
  else if (m_rows == 2)
    launch_gemv<T, BITS, 2>(x, w, scale, scale_dtype, bias, bias_dtype, out, m_rows, N, K, row_bytes, group_size,
                            num_groups, vector_ok, stream);
  else
    launch_gemv<T, BITS, 4>(x, w, scale, scale_dtype, bias, bias_dtype, out, m_rows, N, K, row_bytes, group_size,
                            num_groups, vector_ok, stream);
}

template <typename T>
void launch_all(int bits, const char* x, const void* w, const void* scale, int scale_dtype, const void* bias,
                int bias_dtype, char* out, int64_t M, int N, int K, int64_t row_bytes, int group_size, int num_groups,
                bool vector_ok, gpuStream_t stream) {
  const int64_t elem = sizeof(typename T::storage);
  for (int64_t m0 = 0; m0 < M; m0 += kGemvRowsPerLaunch) {
    const int m_rows = static_cast<int>(M - m0 < kGemvRowsPerLaunch ? M - m0 : kGemvRowsPerLaunch);
    const char* xm = x + m0 * K * elem;
    char* om = out + m0 * N * elem;
    if (bits == 8)
      launch_rows<T, 8>(xm, w, scale, scale_dtype, bias, bias_dtype, om, m_rows, N, K, row_bytes, group_size,
                        num_groups, vector_ok, stream);
    else
      launch_rows<T, 4>(xm, w, scale, scale_dtype, bias, bias_dtype, om, m_rows, N, K, row_bytes, group_size,
                        num_groups, vector_ok, stream);
  }
}

// ---------------------------------------------------------------------------- dequantize (prefill)
// out[n, k] = q[n, k] * scale, one fp32 product rounded once to the output dtype: exactly what
// glmrt.quant.dequantize computes (values.float() * scale.float(), then .to(dtype)). Each thread
// writes kDequantPerThread consecutive k of one row (reading 8 int8 or 4 packed bytes); the grid
// strides over all (row, chunk) pairs, so any N * K fits one launch. No shared memory, no barriers.
constexpr int kDequantPerThread = 8;
constexpr int64_t kDequantMaxBlocks = 65535;

template <typename T, int BITS>
__global__ void __launch_bounds__(kThreads)
dequantize_kernel(const uint8_t* __restrict__ w, const void* __restrict__ scale, int scale_dtype,
                  typename T::storage* __restrict__ out, int64_t K, int64_t row_bytes, int64_t group_size,
                  int64_t num_groups, int64_t chunks_per_row, int64_t total_chunks, int64_t grid_threads) {
  for (int64_t c = static_cast<int64_t>(blockIdx.x) * kThreads + threadIdx.x; c < total_chunks; c += grid_threads) {
    const int64_t n = c / chunks_per_row;
    const int64_t k0 = (c - n * chunks_per_row) * kDequantPerThread;
    const uint8_t* wrow = w + n * row_bytes;
    typename T::storage* orow = out + n * K;
    const bool grouped = group_size > 0;
    // Per-channel: the row's scale. Grouped: the scale of k0's group, advanced when k crosses into
    // the next group (one division per chunk, not per element).
    int64_t group = grouped ? k0 / group_size : 0;
    int64_t next_group_k = grouped ? (group + 1) * group_size : INT64_MAX;
    float s = load_any(scale, grouped ? n * num_groups + group : n, scale_dtype);
#pragma unroll
    for (int j = 0; j < kDequantPerThread; ++j) {
      const int64_t k = k0 + j;
      if (k >= K) break;
      if (k == next_group_k) {
        ++group;
        next_group_k += group_size;
        s = load_any(scale, n * num_groups + group, scale_dtype);
      }
      float q;
      if (BITS == 8) {
        q = s8(static_cast<uint32_t>(wrow[k]), 0);
      } else {
        const uint32_t byte = wrow[k >> 1];
        q = (k & 1) ? s4_lo(byte, 0) : s4_hi(byte, 0);  // even k: the high nibble
      }
      T::store(orow, k, q * s);  // a plain fp32 product (nothing to contract), rounded once by the store
    }
  }
}

template <typename T>
void launch_dequantize(int bits, const void* w, const void* scale, int scale_dtype, void* out, int64_t N, int64_t K,
                       int64_t group_size, gpuStream_t stream) {
  const int64_t row_bytes = bits == 8 ? K : (K + 1) / 2;
  const int64_t num_groups = group_size > 0 ? (K + group_size - 1) / group_size : 1;
  const int64_t chunks_per_row = (K + kDequantPerThread - 1) / kDequantPerThread;
  const int64_t total = N * chunks_per_row;
  int64_t blocks = (total + kThreads - 1) / kThreads;
  if (blocks > kDequantMaxBlocks) blocks = kDequantMaxBlocks;
  const int64_t grid_threads = blocks * kThreads;
  const auto* wb = static_cast<const uint8_t*>(w);
  auto* ob = static_cast<typename T::storage*>(out);
  if (bits == 8)
    GLMRT_LAUNCH(static_cast<unsigned>(blocks), kThreads, 0, stream, dequantize_kernel<T, 8>)(
        wb, scale, scale_dtype, ob, K, row_bytes, group_size, num_groups, chunks_per_row, total, grid_threads);
  else
    GLMRT_LAUNCH(static_cast<unsigned>(blocks), kThreads, 0, stream, dequantize_kernel<T, 4>)(
        wb, scale, scale_dtype, ob, K, row_bytes, group_size, num_groups, chunks_per_row, total, grid_threads);
}

}  // namespace

const char* linear_quant(int bits, const void* x, int x_dtype, const void* weight, const void* scale,
                         int scale_dtype, const void* bias, int bias_dtype, void* out, int64_t M, int64_t N,
                         int64_t K, int64_t group_size, int device, void* stream) {
  if (bits != 8 && bits != 4) return "bits must be 8 (int8) or 4 (packed int4)";
  for (int code : {x_dtype, scale_dtype, bias_dtype})
    if (code < 0 || code > 2) return "dtype codes must be 0 (fp32), 1 (bf16) or 2 (fp16)";
  if (M < 0 || N < 0 || K < 0) return "M, N and K must be >= 0";
  if (N > INT_MAX || K > INT_MAX) return "N and K must be < 2^31";
  if (group_size < 0 || (group_size > 0 && group_size % 32 != 0))
    return "group_size must be 0 (per output channel) or a positive multiple of 32";
  if (M == 0 || N == 0) return nullptr;
  if (x == nullptr || weight == nullptr || scale == nullptr || out == nullptr)
    return "x, weight, scale and out must be device pointers";
  const int64_t row_bytes = bits == 8 ? K : (K + 1) / 2;
  const int num_groups = group_size > 0 ? static_cast<int>((K + group_size - 1) / group_size) : 1;
  const bool vector_ok = (reinterpret_cast<uintptr_t>(weight) % 16 == 0) && (row_bytes % 16 == 0);
  auto s = static_cast<gpuStream_t>(stream);
  const auto* xb = static_cast<const char*>(x);
  auto* ob = static_cast<char*>(out);
  const int n32 = static_cast<int>(N), k32 = static_cast<int>(K), g32 = static_cast<int>(group_size);
  return launch_for_dtype(device, x_dtype, [&](auto tag) {
    launch_all<decltype(tag)>(bits, xb, weight, scale, scale_dtype, bias, bias_dtype, ob, M, n32, k32, row_bytes, g32,
                              num_groups, vector_ok, s);
  });
}

const char* dequantize_weight(int bits, const void* weight, const void* scale, int scale_dtype, void* out,
                              int out_dtype, int64_t N, int64_t K, int64_t group_size, int device, void* stream) {
  if (bits != 8 && bits != 4) return "bits must be 8 (int8) or 4 (packed int4)";
  for (int code : {scale_dtype, out_dtype})
    if (code < 0 || code > 2) return "dtype codes must be 0 (fp32), 1 (bf16) or 2 (fp16)";
  if (N < 0 || K < 0) return "N and K must be >= 0";
  if (group_size < 0) return "group_size must be 0 (per output channel) or positive";
  if (N == 0 || K == 0) return nullptr;
  if (N > INT64_MAX / K) return "N * K overflows";
  if (weight == nullptr || scale == nullptr || out == nullptr) return "weight, scale and out must be device pointers";
  auto s = static_cast<gpuStream_t>(stream);
  return launch_for_dtype(device, out_dtype, [&](auto tag) {
    launch_dequantize<decltype(tag)>(bits, weight, scale, scale_dtype, out, N, K, group_size, s);
  });
}

}  // namespace gpu
}  // namespace glmrt
