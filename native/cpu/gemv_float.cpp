// Float-weight decode GEMV (see gemv_float.h). At M = 1 memory-bound: per weight element one load,
// one widening to fp32 (bf16: a 16-bit shift or mask; fp16: F16C), one FMA per row of x. The weight
// is streamed once per call whatever M: every weight element is loaded and widened once and
// multiplied with all M rows of x (the AVX2 paths; at M = 8 they are bound by the FMAs and loads,
// not by memory). Output rows are split over the threads in contiguous blocks or tiles.
#include "gemv_float.h"

#include <immintrin.h>

#include <cmath>
#include <cstring>
#include <stdexcept>
#include <string>
#include <vector>

#ifdef _OPENMP
#include <omp.h>
#endif

namespace glmrt {
namespace {

enum class Isa { Scalar = 0, Avx2 = 1, Avx512 = 2 };

Isa detect() {
  __builtin_cpu_init();
  if (__builtin_cpu_supports("avx512f") && __builtin_cpu_supports("avx512bw") && __builtin_cpu_supports("f16c"))
    return Isa::Avx512;
  if (__builtin_cpu_supports("avx2") && __builtin_cpu_supports("fma") && __builtin_cpu_supports("f16c"))
    return Isa::Avx2;
  return Isa::Scalar;
}

Isa& best() {
  static Isa isa = detect();
  return isa;
}
Isa& chosen() {
  static Isa isa = best();
  return isa;
}

inline float load1(const void* p, DType t, int64_t i) {
  switch (t) {
    case DType::BF16: return bf16_to_f32(static_cast<const uint16_t*>(p)[i]);
    case DType::F16: return f16_to_f32(static_cast<const uint16_t*>(p)[i]);
    default: return static_cast<const float*>(p)[i];
  }
}

inline void store1(void* p, DType t, int64_t i, float v) {
  switch (t) {
    case DType::BF16: static_cast<uint16_t*>(p)[i] = f32_to_bf16(v); break;
    case DType::F16: static_cast<uint16_t*>(p)[i] = f32_to_f16(v); break;
    default: static_cast<float*>(p)[i] = v; break;
  }
}

// Dot products of one weight row with the M fp32 rows xf[m * K ...]; acc[m] receives the sums.
void row_scalar(const void* w, DType t, int64_t K, const float* xf, int64_t M, float* acc) {
  for (int64_t m = 0; m < M; ++m) acc[m] = 0.f;
  for (int64_t k = 0; k < K; ++k) {
    const float wk = load1(w, t, k);
    for (int64_t m = 0; m < M; ++m) acc[m] += wk * xf[m * K + k];
  }
}

__attribute__((target("avx2,fma,f16c"))) inline __m256 widen8(const void* w, DType t, int64_t k) {
  if (t == DType::BF16) {
    const __m128i h = _mm_loadu_si128(reinterpret_cast<const __m128i*>(static_cast<const uint16_t*>(w) + k));
    return _mm256_castsi256_ps(_mm256_slli_epi32(_mm256_cvtepu16_epi32(h), 16));
  }
  if (t == DType::F16)
    return _mm256_cvtph_ps(_mm_loadu_si128(reinterpret_cast<const __m128i*>(static_cast<const uint16_t*>(w) + k)));
  return _mm256_loadu_ps(static_cast<const float*>(w) + k);
}

__attribute__((target("avx2,fma,f16c"))) float hsum8(__m256 v) {
  __m128 s = _mm_add_ps(_mm256_castps256_ps128(v), _mm256_extractf128_ps(v, 1));
  s = _mm_add_ps(s, _mm_movehl_ps(s, s));
  s = _mm_add_ss(s, _mm_movehdup_ps(s));
  return _mm_cvtss_f32(s);
}

__attribute__((target("avx2,fma,f16c"))) void row_avx2(const void* w, DType t, int64_t K, const float* xf,
                                                       int64_t M, float* acc) {
  const int64_t k8 = K - K % 8;
  for (int64_t m = 0; m < M; ++m) {
    // Two accumulators per row hide the FMA latency; the weight vector is re-widened per row,
    // which costs nothing against the memory stream (M is small and the row sits in L1).
    __m256 a0 = _mm256_setzero_ps(), a1 = _mm256_setzero_ps();
    const float* xr = xf + m * K;
    int64_t k = 0;
    for (; k + 16 <= k8; k += 16) {
      a0 = _mm256_fmadd_ps(widen8(w, t, k), _mm256_loadu_ps(xr + k), a0);
      a1 = _mm256_fmadd_ps(widen8(w, t, k + 8), _mm256_loadu_ps(xr + k + 8), a1);
    }
    for (; k < k8; k += 8) a0 = _mm256_fmadd_ps(widen8(w, t, k), _mm256_loadu_ps(xr + k), a0);
    float s = hsum8(_mm256_add_ps(a0, a1));
    for (; k < K; ++k) s = std::fma(load1(w, t, k), xr[k], s);  // explicit: the tiled path does the same
    acc[m] = s;
  }
}

// ---- AVX2, fp32 / fp16, M >= 2 (bf16 takes tile_bf16_avx2 below): every weight element is loaded
// and widened once for all rows of x.
// Per (weight row, x row) the sums run exactly as row_avx2 runs them (two accumulators over steps
// of 16, an 8-wide remainder into the first, hsum8, a scalar tail), so a row's result does not
// depend on M. What changes is the loop order: output rows are taken in tiles of kTileRows, K in
// blocks whose x slice (M rows) stays in L1 across the tile, x rows in register blocks of up to 4;
// the accumulators live in a small buffer between K blocks (same lanes, same order of additions).
constexpr int64_t kTileRows = 8;
constexpr int64_t kXBlockBytes = 16 * 1024;  // the x slice of one K block, all M rows, in fp32
constexpr int64_t kMB = 4;                  // x rows per register block: 2 * kMB accumulators

template <DType t>
__attribute__((target("avx2,fma,f16c"))) inline __m256 widen8t(const void* w, int64_t k) {
  if constexpr (t == DType::BF16) {
    const __m128i h = _mm_loadu_si128(reinterpret_cast<const __m128i*>(static_cast<const uint16_t*>(w) + k));
    return _mm256_castsi256_ps(_mm256_slli_epi32(_mm256_cvtepu16_epi32(h), 16));
  }
  if constexpr (t == DType::F16)
    return _mm256_cvtph_ps(_mm_loadu_si128(reinterpret_cast<const __m128i*>(static_cast<const uint16_t*>(w) + k)));
  return _mm256_loadu_ps(static_cast<const float*>(w) + k);
}

// acc[2 * m], acc[2 * m + 1]: the two accumulators of x row m (MB rows), over k in [k0, k1), a
// range of whole steps of 16.
template <DType t, int MB>
__attribute__((target("avx2,fma,f16c"))) void block_avx2(const void* w, int64_t k0, int64_t k1, const float* xf,
                                                         int64_t K, float* acc) {
  __m256 a[2 * MB];
  for (int i = 0; i < 2 * MB; ++i) a[i] = _mm256_load_ps(acc + 8 * i);
  for (int64_t k = k0; k < k1; k += 16) {
    const __m256 w0 = widen8t<t>(w, k), w1 = widen8t<t>(w, k + 8);
#pragma GCC unroll 4
    for (int m = 0; m < MB; ++m) {
      a[2 * m] = _mm256_fmadd_ps(w0, _mm256_loadu_ps(xf + m * K + k), a[2 * m]);
      a[2 * m + 1] = _mm256_fmadd_ps(w1, _mm256_loadu_ps(xf + m * K + k + 8), a[2 * m + 1]);
    }
  }
  for (int i = 0; i < 2 * MB; ++i) _mm256_store_ps(acc + 8 * i, a[i]);
}

using BlockFn = void (*)(const void*, int64_t, int64_t, const float*, int64_t, float*);

template <DType t>
BlockFn block_fn(int mb) {
  switch (mb) {
    case 1: return &block_avx2<t, 1>;
    case 2: return &block_avx2<t, 2>;
    case 3: return &block_avx2<t, 3>;
    default: return &block_avx2<t, 4>;
  }
}

// Output rows [n0, n1) for all M rows of x.
template <DType t>
__attribute__((target("avx2,fma,f16c"))) void tile_avx2(const char* wbytes, const float* xf, const void* bias,
                                                        void* out, int64_t M, int64_t N, int64_t K, int64_t n0,
                                                        int64_t n1) {
  constexpr int64_t esize = t == DType::F32 ? 4 : 2;
  const int64_t k8 = K - K % 8, k16 = k8 - k8 % 16;
  int64_t kb = kXBlockBytes / (4 * M) / 16 * 16;
  if (kb < 64) kb = 64;
  alignas(32) float acc[kTileRows][kFloatGemvMaxM][16];
  const int64_t rows = n1 - n0;
  for (int64_t r = 0; r < rows; ++r)
    for (int64_t m = 0; m < M; ++m)
      for (int i = 0; i < 16; ++i) acc[r][m][i] = 0.f;
  for (int64_t k0 = 0; k0 < k16; k0 += kb) {
    const int64_t k1 = k0 + kb < k16 ? k0 + kb : k16;
    for (int64_t r = 0; r < rows; ++r) {
      const void* w = wbytes + (n0 + r) * K * esize;
      for (int64_t m0 = 0; m0 < M; m0 += kMB) {
        const int mb = M - m0 < kMB ? static_cast<int>(M - m0) : static_cast<int>(kMB);
        block_fn<t>(mb)(w, k0, k1, xf + m0 * K, K, &acc[r][m0][0]);
      }
    }
  }
  for (int64_t r = 0; r < rows; ++r) {
    const int64_t n = n0 + r;
    const void* w = wbytes + n * K * esize;
    const float b = bias ? load1(bias, t, n) : 0.f;
    for (int64_t m = 0; m < M; ++m) {
      const float* xr = xf + m * K;
      __m256 a0 = _mm256_load_ps(&acc[r][m][0]), a1 = _mm256_load_ps(&acc[r][m][8]);
      if (k8 > k16) a0 = _mm256_fmadd_ps(widen8t<t>(w, k16), _mm256_loadu_ps(xr + k16), a0);
      float s = hsum8(_mm256_add_ps(a0, a1));
      for (int64_t k = k8; k < K; ++k) s = std::fma(load1(w, t, k), xr[k], s);  // as row_avx2
      store1(out, t, m * N + n, s + b);
    }
  }
}

// ---- AVX2, bf16, any M: one accumulator per (weight row, x row), even and odd elements apart.
// 16 bf16 weights are one 256-bit load; as 32-bit lanes, `lane << 16` is the even elements in fp32
// and `lane & 0xffff0000` the odd ones, so widening costs two cheap operations per 16 weights. x
// is stored once per call in the matching order (per 16: the 8 even elements, then the 8 odd). Per
// (weight row, x row) the sum is: acc += w_even * x_even, acc += w_odd * x_odd per step of 16
// (fused multiply-adds, in k order), hsum8, then the k % 16 tail in k order, whatever M, the row
// tile or the K block, so a row's result does not depend on M. Register blocks of R weight rows x
// MB x rows: (8, 1), (4, 2), (2, 3), (2, 4), enough independent sums to hide the FMA latency.
template <int R, int MB>
__attribute__((target("avx2,fma,f16c"))) void bf16_block_avx2(const uint16_t* w, int64_t wstride, int64_t nk,
                                                              const float* xp, int64_t K, float* acc,
                                                              int64_t acc_stride, int64_t pf) {
  __m256 a[R][MB];
  for (int r = 0; r < R; ++r)
    for (int m = 0; m < MB; ++m) a[r][m] = _mm256_load_ps(acc + r * acc_stride + 8 * m);
  const __m256i hi = _mm256_set1_epi32(static_cast<int>(0xffff0000u));
  for (int64_t k = 0; k < nk; k += 16) {
    __m256 we[R], wo[R];
#pragma GCC unroll 8
    for (int r = 0; r < R; ++r) {
      if (pf) _mm_prefetch(reinterpret_cast<const char*>(w + r * wstride + k + pf), _MM_HINT_T0);
      const __m256i raw = _mm256_loadu_si256(reinterpret_cast<const __m256i*>(w + r * wstride + k));
      we[r] = _mm256_castsi256_ps(_mm256_slli_epi32(raw, 16));
      wo[r] = _mm256_castsi256_ps(_mm256_and_si256(raw, hi));
    }
#pragma GCC unroll 4
    for (int m = 0; m < MB; ++m) {
      const __m256 xe = _mm256_loadu_ps(xp + m * K + k), xo = _mm256_loadu_ps(xp + m * K + k + 8);
#pragma GCC unroll 8
      for (int r = 0; r < R; ++r) {
        a[r][m] = _mm256_fmadd_ps(we[r], xe, a[r][m]);
        a[r][m] = _mm256_fmadd_ps(wo[r], xo, a[r][m]);
      }
    }
  }
  for (int r = 0; r < R; ++r)
    for (int m = 0; m < MB; ++m) _mm256_store_ps(acc + r * acc_stride + 8 * m, a[r][m]);
}

using Bf16BlockFn = void (*)(const uint16_t*, int64_t, int64_t, const float*, int64_t, float*, int64_t, int64_t);

// The register block for mb x rows: (R, function); R = 1 for the rows a tile has left over.
Bf16BlockFn bf16_block_fn(int R, int mb) {
  if (R == 8) return &bf16_block_avx2<8, 1>;
  if (R == 4) return &bf16_block_avx2<4, 2>;
  if (R == 2) return mb == 3 ? &bf16_block_avx2<2, 3> : &bf16_block_avx2<2, 4>;
  switch (mb) {
    case 1: return &bf16_block_avx2<1, 1>;
    case 2: return &bf16_block_avx2<1, 2>;
    case 3: return &bf16_block_avx2<1, 3>;
    default: return &bf16_block_avx2<1, 4>;
  }
}

// xp: x in the even/odd order (see above), M rows of K floats.
__attribute__((target("avx2,fma,f16c"))) void tile_bf16_avx2(const uint16_t* weight, const float* xp,
                                                             const uint16_t* bias, uint16_t* out, int64_t M,
                                                             int64_t N, int64_t K, int64_t n0, int64_t n1) {
  const int64_t k16 = K - K % 16;
  int64_t kb = kXBlockBytes / (4 * M) / 16 * 16;
  if (kb < 64) kb = 64;
  alignas(32) float acc[kTileRows * kFloatGemvMaxM * 8];
  const int64_t rows = n1 - n0, acc_stride = M * 8;
  std::memset(acc, 0, sizeof(float) * rows * acc_stride);
  for (int64_t k0 = 0; k0 < k16; k0 += kb) {
    const int64_t nk = k0 + kb < k16 ? kb : k16 - k0;
    const bool whole_rows = nk == k16;  // one K block: the next rows are read next, prefetch them
    for (int64_t m0 = 0; m0 < M; m0 += 4) {
      const int mb = M - m0 < 4 ? static_cast<int>(M - m0) : 4;
      const int R = mb == 1 ? 8 : (mb == 2 ? 4 : 2);
      int64_t r0 = 0;
      for (; r0 + R <= rows; r0 += R)
        bf16_block_fn(R, mb)(weight + (n0 + r0) * K + k0, K, nk, xp + m0 * K + k0, K, acc + r0 * acc_stride + m0 * 8,
                             acc_stride, whole_rows && m0 == 0 ? R * K : 0);
      for (; r0 < rows; ++r0)
        bf16_block_fn(1, mb)(weight + (n0 + r0) * K + k0, K, nk, xp + m0 * K + k0, K, acc + r0 * acc_stride + m0 * 8,
                             acc_stride, 0);
    }
  }
  for (int64_t r = 0; r < rows; ++r) {
    const int64_t n = n0 + r;
    const uint16_t* w = weight + n * K;
    const float b = bias ? bf16_to_f32(bias[n]) : 0.f;
    for (int64_t m = 0; m < M; ++m) {
      float s = hsum8(_mm256_load_ps(acc + r * acc_stride + 8 * m));
      for (int64_t k = k16; k < K; ++k) s = std::fma(bf16_to_f32(w[k]), xp[m * K + k], s);
      out[m * N + n] = f32_to_bf16(s + b);
    }
  }
}

template <DType t>
__attribute__((target("avx512f,avx512bw,avx512vl,f16c"))) inline __m512 widen16(const void* w, int64_t k,
                                                                                 __mmask16 mask) {
  if constexpr (t == DType::BF16) {
    const __m256i h = _mm256_maskz_loadu_epi16(mask, static_cast<const uint16_t*>(w) + k);
    return _mm512_castsi512_ps(_mm512_slli_epi32(_mm512_cvtepu16_epi32(h), 16));
  }
  if constexpr (t == DType::F16)
    return _mm512_cvtph_ps(_mm256_maskz_loadu_epi16(mask, static_cast<const uint16_t*>(w) + k));
  return _mm512_maskz_loadu_ps(mask, static_cast<const float*>(w) + k);
}

template <DType t>
__attribute__((target("avx512f,avx512bw,avx512vl,f16c"))) void row_avx512(const void* w, int64_t K, const float* xf,
                                                                           int64_t M, float* acc) {
  const __mmask16 all = 0xffff;
  const int64_t k16 = K - K % 16;
  const __mmask16 tail = static_cast<__mmask16>((1u << (K % 16)) - 1u);
  if (M == 1) {
    // The decode case: four accumulators, the weight widened once.
    __m512 a0 = _mm512_setzero_ps(), a1 = _mm512_setzero_ps(), a2 = _mm512_setzero_ps(), a3 = _mm512_setzero_ps();
    int64_t k = 0;
    for (; k + 64 <= k16; k += 64) {
      a0 = _mm512_fmadd_ps(widen16<t>(w, k, all), _mm512_loadu_ps(xf + k), a0);
      a1 = _mm512_fmadd_ps(widen16<t>(w, k + 16, all), _mm512_loadu_ps(xf + k + 16), a1);
      a2 = _mm512_fmadd_ps(widen16<t>(w, k + 32, all), _mm512_loadu_ps(xf + k + 32), a2);
      a3 = _mm512_fmadd_ps(widen16<t>(w, k + 48, all), _mm512_loadu_ps(xf + k + 48), a3);
    }
    for (; k < k16; k += 16) a0 = _mm512_fmadd_ps(widen16<t>(w, k, all), _mm512_loadu_ps(xf + k), a0);
    if (tail) a1 = _mm512_fmadd_ps(widen16<t>(w, k16, tail), _mm512_maskz_loadu_ps(tail, xf + k16), a1);
    acc[0] = _mm512_reduce_add_ps(_mm512_add_ps(_mm512_add_ps(a0, a1), _mm512_add_ps(a2, a3)));
    return;
  }
  for (int64_t m = 0; m < M; ++m) {
    __m512 a0 = _mm512_setzero_ps(), a1 = _mm512_setzero_ps();
    const float* xr = xf + m * K;
    int64_t k = 0;
    for (; k + 32 <= k16; k += 32) {
      a0 = _mm512_fmadd_ps(widen16<t>(w, k, all), _mm512_loadu_ps(xr + k), a0);
      a1 = _mm512_fmadd_ps(widen16<t>(w, k + 16, all), _mm512_loadu_ps(xr + k + 16), a1);
    }
    for (; k < k16; k += 16) a0 = _mm512_fmadd_ps(widen16<t>(w, k, all), _mm512_loadu_ps(xr + k), a0);
    if (tail) a1 = _mm512_fmadd_ps(widen16<t>(w, k16, tail), _mm512_maskz_loadu_ps(tail, xr + k16), a1);
    acc[m] = _mm512_reduce_add_ps(_mm512_add_ps(a0, a1));
  }
}

// M == 1, four weight rows at once: four independent streams keep more loads in flight than one
// row at a time (the difference between ~70% and ~80% of the read bandwidth on the machines tried).
template <DType t>
__attribute__((target("avx512f,avx512bw,avx512vl,f16c"))) void rows4_avx512(const char* w, int64_t row_bytes,
                                                                             int64_t K, const float* xf,
                                                                             float* acc) {
  const __mmask16 all = 0xffff;
  const int64_t k16 = K - K % 16;
  const __mmask16 tail = static_cast<__mmask16>((1u << (K % 16)) - 1u);
  const void* r0 = w;
  const void* r1 = w + row_bytes;
  const void* r2 = w + 2 * row_bytes;
  const void* r3 = w + 3 * row_bytes;
  __m512 a0 = _mm512_setzero_ps(), a1 = _mm512_setzero_ps(), a2 = _mm512_setzero_ps(), a3 = _mm512_setzero_ps();
  __m512 b0 = _mm512_setzero_ps(), b1 = _mm512_setzero_ps(), b2 = _mm512_setzero_ps(), b3 = _mm512_setzero_ps();
  int64_t k = 0;
  for (; k + 32 <= k16; k += 32) {
    const __m512 x0 = _mm512_loadu_ps(xf + k), x1 = _mm512_loadu_ps(xf + k + 16);
    a0 = _mm512_fmadd_ps(widen16<t>(r0, k, all), x0, a0);
    a1 = _mm512_fmadd_ps(widen16<t>(r1, k, all), x0, a1);
    a2 = _mm512_fmadd_ps(widen16<t>(r2, k, all), x0, a2);
    a3 = _mm512_fmadd_ps(widen16<t>(r3, k, all), x0, a3);
    b0 = _mm512_fmadd_ps(widen16<t>(r0, k + 16, all), x1, b0);
    b1 = _mm512_fmadd_ps(widen16<t>(r1, k + 16, all), x1, b1);
    b2 = _mm512_fmadd_ps(widen16<t>(r2, k + 16, all), x1, b2);
    b3 = _mm512_fmadd_ps(widen16<t>(r3, k + 16, all), x1, b3);
  }
  for (; k < k16; k += 16) {
    const __m512 x0 = _mm512_loadu_ps(xf + k);
    a0 = _mm512_fmadd_ps(widen16<t>(r0, k, all), x0, a0);
    a1 = _mm512_fmadd_ps(widen16<t>(r1, k, all), x0, a1);
    a2 = _mm512_fmadd_ps(widen16<t>(r2, k, all), x0, a2);
    a3 = _mm512_fmadd_ps(widen16<t>(r3, k, all), x0, a3);
  }
  if (tail) {
    const __m512 x0 = _mm512_maskz_loadu_ps(tail, xf + k16);
    b0 = _mm512_fmadd_ps(widen16<t>(r0, k16, tail), x0, b0);
    b1 = _mm512_fmadd_ps(widen16<t>(r1, k16, tail), x0, b1);
    b2 = _mm512_fmadd_ps(widen16<t>(r2, k16, tail), x0, b2);
    b3 = _mm512_fmadd_ps(widen16<t>(r3, k16, tail), x0, b3);
  }
  acc[0] = _mm512_reduce_add_ps(_mm512_add_ps(a0, b0));
  acc[1] = _mm512_reduce_add_ps(_mm512_add_ps(a1, b1));
  acc[2] = _mm512_reduce_add_ps(_mm512_add_ps(a2, b2));
  acc[3] = _mm512_reduce_add_ps(_mm512_add_ps(a3, b3));
}

int64_t element_size(DType t) { return t == DType::F32 ? 4 : 2; }

}  // namespace

void linear_float(const void* x, const void* weight, const void* bias, void* out, DType dtype, int64_t M, int64_t N,
                  int64_t K) {
  if (M < 0 || N < 0 || K < 0) throw std::invalid_argument("linear_float: M, N and K must be >= 0");
  if (M > kFloatGemvMaxM)
    throw std::invalid_argument("linear_float: at most " + std::to_string(kFloatGemvMaxM) +
                                " rows of x (a decode GEMV); use a GEMM for more");
  if (M == 0 || N == 0) return;
  // x in fp32 once (M * K floats, cache-resident), shared by every thread.
  std::vector<float> xf(static_cast<size_t>(M * K));
  for (int64_t i = 0; i < M * K; ++i) xf[static_cast<size_t>(i)] = load1(x, dtype, i);
  const Isa isa = chosen();
  const int64_t esize = element_size(dtype);
  const char* wbytes = static_cast<const char*>(weight);
  if (M == 1 && isa == Isa::Avx512) {
    const int64_t quads = N / 4;
#pragma omp parallel for schedule(static)
    for (int64_t q = 0; q < quads; ++q) {
      float acc[4];
      const char* rows = wbytes + 4 * q * K * esize;
      if (dtype == DType::BF16)
        rows4_avx512<DType::BF16>(rows, K * esize, K, xf.data(), acc);
      else if (dtype == DType::F16)
        rows4_avx512<DType::F16>(rows, K * esize, K, xf.data(), acc);
      else
        rows4_avx512<DType::F32>(rows, K * esize, K, xf.data(), acc);
      for (int i = 0; i < 4; ++i) {
        const int64_t n = 4 * q + i;
        store1(out, dtype, n, acc[i] + (bias ? load1(bias, dtype, n) : 0.f));
      }
    }
    for (int64_t n = 4 * quads; n < N; ++n) {  // the last N % 4 rows
      float acc[1];
      row_scalar(wbytes + n * K * esize, dtype, K, xf.data(), 1, acc);
      store1(out, dtype, n, acc[0] + (bias ? load1(bias, dtype, n) : 0.f));
    }
    return;
  }
  if (isa == Isa::Avx2 && dtype == DType::BF16) {
    // x in the even/odd order of tile_bf16_avx2, the k % 16 tail in natural order.
    std::vector<float> xp(static_cast<size_t>(M * K));
    const int64_t k16 = K - K % 16;
    for (int64_t m = 0; m < M; ++m)
      for (int64_t k = 0; k < K; ++k) {
        const int64_t j = k >= k16 ? k : k - k % 16 + (k % 2 ? 8 + (k % 16) / 2 : (k % 16) / 2);
        xp[static_cast<size_t>(m * K + j)] = xf[static_cast<size_t>(m * K + k)];
      }
    const int64_t tiles = (N + kTileRows - 1) / kTileRows;
#pragma omp parallel for schedule(dynamic, 4)
    for (int64_t i = 0; i < tiles; ++i) {
      const int64_t n0 = i * kTileRows, n1 = n0 + kTileRows < N ? n0 + kTileRows : N;
      tile_bf16_avx2(static_cast<const uint16_t*>(weight), xp.data(), static_cast<const uint16_t*>(bias),
                     static_cast<uint16_t*>(out), M, N, K, n0, n1);
    }
    return;
  }
  if (M > 1 && isa == Isa::Avx2) {
    // Tiles of output rows dealt out dynamically, so a thread slowed down by a busy core does not
    // hold the other back.
    const int64_t tiles = (N + kTileRows - 1) / kTileRows;
#pragma omp parallel for schedule(dynamic, 4)
    for (int64_t i = 0; i < tiles; ++i) {
      const int64_t n0 = i * kTileRows, n1 = n0 + kTileRows < N ? n0 + kTileRows : N;
      if (dtype == DType::F16)
        tile_avx2<DType::F16>(wbytes, xf.data(), bias, out, M, N, K, n0, n1);
      else
        tile_avx2<DType::F32>(wbytes, xf.data(), bias, out, M, N, K, n0, n1);
    }
    return;
  }
#pragma omp parallel for schedule(static)
  for (int64_t n = 0; n < N; ++n) {
    float acc[kFloatGemvMaxM];
    const void* row = wbytes + n * K * esize;
    if (isa == Isa::Avx512 && dtype == DType::BF16)
      row_avx512<DType::BF16>(row, K, xf.data(), M, acc);
    else if (isa == Isa::Avx512 && dtype == DType::F16)
      row_avx512<DType::F16>(row, K, xf.data(), M, acc);
    else if (isa == Isa::Avx512)
      row_avx512<DType::F32>(row, K, xf.data(), M, acc);
    else if (isa == Isa::Avx2)
      row_avx2(row, dtype, K, xf.data(), M, acc);
    else
      row_scalar(row, dtype, K, xf.data(), M, acc);
    const float b = bias ? load1(bias, dtype, n) : 0.f;
    for (int64_t m = 0; m < M; ++m) store1(out, dtype, m * N + n, acc[m] + b);
  }
}

const char* linear_float_isa() {
  switch (chosen()) {
    case Isa::Avx512: return "avx512";
    case Isa::Avx2: return "avx2";
    default: return "scalar";
  }
}

bool set_linear_float_isa(const char* name) {
  const std::string n = name ? name : "";
  Isa want;
  if (n == "avx512") want = Isa::Avx512;
  else if (n == "avx2") want = Isa::Avx2;
  else if (n == "scalar") want = Isa::Scalar;
  else return false;
  if (static_cast<int>(want) > static_cast<int>(best())) return false;
  chosen() = want;
  return true;
}

}  // namespace glmrt
