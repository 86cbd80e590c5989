// Float-weight decode GEMV (see gemv_float.h). At M = 1 memory-bound: per weight element one load,
// one widening to fp32 (bf16: a 16-bit shift or mask; fp16: F16C), one FMA per row of x. The weight
// is streamed once per call whatever M: every weight element is loaded and widened once per
// register block and multiplied with all its x rows (the AVX2 path: R weight rows x MB x rows per
// micro-kernel, see block_avx2; at M = 8 it is bound by the FMA throughput, not by memory). Output
// rows are split over the threads in contiguous blocks or tiles.
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

__attribute__((target("avx2,fma,f16c"))) float hsum8(__m256 v) {
  __m128 s = _mm_add_ps(_mm256_castps256_ps128(v), _mm256_extractf128_ps(v, 1));
  s = _mm_add_ps(s, _mm_movehl_ps(s, s));
  s = _mm_add_ss(s, _mm_movehdup_ps(s));
  return _mm_cvtss_f32(s);
}

// ---- AVX2, every dtype, any M (M = 1 included): one summation order per (weight row, x row).
// K is taken in steps of 16. A step's 16 weights are widened to fp32 as two 8-lane halves, A and
// B, and x is stored once per call in the matching order: bf16 reads the 16 weights as one 256-bit
// load whose 32-bit lanes give the even elements (`lane << 16`) as A and the odd ones
// (`lane & 0xffff0000`) as B, so x is permuted per 16 to its 8 even elements then its 8 odd ones;
// fp16 (F16C) and fp32 take elements 0-7 as A and 8-15 as B, x in natural order.
// Per (weight row, x row) the sum is always, whatever M, the row tile, the K block or the register
// block (so a row's result does not depend on how many rows share the call):
//  * bf16: one 8-lane accumulator, acc += A * xA then acc += B * xB per step (fused multiply-adds,
//    in k order), hsum8, then the k % 16 tail in k order with scalar fused multiply-adds;
//  * fp16, fp32: two accumulators, a += A * xA and b += B * xB per step, an 8-wide remainder
//    (k % 16 >= 8) into a, hsum8(a + b), then the k % 8 tail with scalar fused multiply-adds. This
//    is the order these dtypes had before the register blocks, kept because a padded fp16 prefill
//    batch taking torch's F.linear matches its prompts run alone through this GEMV only in this
//    order (tests/models/test_original_code_half_precision.py); it costs registers (2 per pair).
// The speed at M > 1 comes from register blocks of R weight rows x MB x rows: per half step the R
// weight halves are widened once into registers and each x half is loaded once into a register
// and used for the R rows: R * MB accumulators (the independent FMA chains that hide the FMA
// latency: Zen 2 needs 10 for its 2 FMAs per cycle at 5 cycles), R widened weights, one x
// register: (R, MB) = (8, 1), (4, 2), (3, 3), (3, 4), (2, 5) fit the 16 ymm registers of AVX2 (12
// chains for MB = 4); with two accumulators per pair (4, 1), (2, 2), (2, 3), (1, 4), (1, 5). The weights of a half are re-read from L1 for half B (one load, cheaper than a
// register). Output rows go in tiles of kTileRows, K in blocks whose x slice (all M rows) stays in
// L1, the accumulators between K blocks in a small buffer (same lanes, same order). The weights
// of the next K block are prefetched while the current one is computed.
constexpr int64_t kTileRows = 24;
constexpr int64_t kXBlockBytes = 16 * 1024;  // the x slice of one K block, all M rows, in fp32

template <DType t>
struct Widen;
template <>
struct Widen<DType::BF16> {
  using T = uint16_t;
  static constexpr int kAcc = 1;
  __attribute__((target("avx2,fma,f16c"))) static inline __m256 a(const T* w) {
    return _mm256_castsi256_ps(_mm256_slli_epi32(_mm256_loadu_si256(reinterpret_cast<const __m256i*>(w)), 16));
  }
  __attribute__((target("avx2,fma,f16c"))) static inline __m256 b(const T* w) {
    // two shifts rather than an AND: no mask constant to hold in a register
    return _mm256_castsi256_ps(
        _mm256_slli_epi32(_mm256_srli_epi32(_mm256_loadu_si256(reinterpret_cast<const __m256i*>(w)), 16), 16));
  }
  static float one(const T* w, int64_t k) { return bf16_to_f32(w[k]); }
};
template <>
struct Widen<DType::F16> {
  using T = uint16_t;
  static constexpr int kAcc = 2;
  __attribute__((target("avx2,fma,f16c"))) static inline __m256 a(const T* w) {
    return _mm256_cvtph_ps(_mm_loadu_si128(reinterpret_cast<const __m128i*>(w)));
  }
  __attribute__((target("avx2,fma,f16c"))) static inline __m256 b(const T* w) {
    return _mm256_cvtph_ps(_mm_loadu_si128(reinterpret_cast<const __m128i*>(w + 8)));
  }
  static float one(const T* w, int64_t k) { return f16_to_f32(w[k]); }
};
template <>
struct Widen<DType::F32> {
  using T = float;
  static constexpr int kAcc = 2;
  __attribute__((target("avx2,fma,f16c"))) static inline __m256 a(const T* w) { return _mm256_loadu_ps(w); }
  __attribute__((target("avx2,fma,f16c"))) static inline __m256 b(const T* w) { return _mm256_loadu_ps(w + 8); }
  static float one(const T* w, int64_t k) { return w[k]; }
};

// acc[r * acc_stride + 8 * m]: the accumulator of (weight row r, x row m), R x MB of them, over
// the nk (a multiple of 16) values of K from w and xp (both already offset to the K block).
// pf != 0: prefetch each weight row pf elements ahead.
template <DType t, int R, int MB>
__attribute__((target("avx2,fma,f16c"))) void block_avx2(const typename Widen<t>::T* w, int64_t wstride, int64_t nk,
                                                         const float* xp, int64_t K, float* acc, int64_t acc_stride,
                                                         int64_t pf) {
  using W = Widen<t>;
  // x in a register, loaded once for the R rows, where the registers allow it (else the compiler
  // spills accumulators); for (3, 4) each FMA reads its x operand from L1.
  constexpr bool kXReg = R > 1 && (MB == 1 || Widen<t>::kAcc * R * MB + R + 1 < 16);
  constexpr int A = W::kAcc;  // B halves into a second accumulator (fp16, fp32)
  __m256 a[R][MB], b[R][MB];
  for (int r = 0; r < R; ++r)
    for (int m = 0; m < MB; ++m) {
      a[r][m] = _mm256_load_ps(acc + r * acc_stride + 8 * A * m);
      if (A == 2) b[r][m] = _mm256_load_ps(acc + r * acc_stride + 8 * A * m + 8);
    }
  for (int64_t k = 0; k < nk; k += 16) {
    if (pf && (k & 31) == 0)  // one prefetch per 64-byte line of a 2-byte row (twice for fp32: k & 15)
#pragma GCC unroll 8
      for (int r = 0; r < R; ++r) {
        _mm_prefetch(reinterpret_cast<const char*>(w + r * wstride + k + pf), _MM_HINT_T0);
        if (t == DType::F32) _mm_prefetch(reinterpret_cast<const char*>(w + r * wstride + k + 16 + pf), _MM_HINT_T0);
      }
    __m256 wv[R];
#pragma GCC unroll 8
    for (int r = 0; r < R; ++r) wv[r] = W::a(w + r * wstride + k);
#pragma GCC unroll 4
    for (int m = 0; m < MB; ++m) {
      __m256 xv = _mm256_loadu_ps(xp + m * K + k);
      if (kXReg) __asm__("" : "+x"(xv));  // one load for the R rows, not R folded into the FMAs
#pragma GCC unroll 8
      for (int r = 0; r < R; ++r) a[r][m] = _mm256_fmadd_ps(wv[r], xv, a[r][m]);
    }
#pragma GCC unroll 8
    for (int r = 0; r < R; ++r) wv[r] = W::b(w + r * wstride + k);
#pragma GCC unroll 4
    for (int m = 0; m < MB; ++m) {
      __m256 xv = _mm256_loadu_ps(xp + m * K + k + 8);
      if (kXReg) __asm__("" : "+x"(xv));
#pragma GCC unroll 8
      for (int r = 0; r < R; ++r) {
        if (A == 2)
          b[r][m] = _mm256_fmadd_ps(wv[r], xv, b[r][m]);
        else
          a[r][m] = _mm256_fmadd_ps(wv[r], xv, a[r][m]);
      }
    }
  }
  for (int r = 0; r < R; ++r)
    for (int m = 0; m < MB; ++m) {
      _mm256_store_ps(acc + r * acc_stride + 8 * A * m, a[r][m]);
      if (A == 2) _mm256_store_ps(acc + r * acc_stride + 8 * A * m + 8, b[r][m]);
    }
}

template <DType t>
using BlockFn = void (*)(const typename Widen<t>::T*, int64_t, int64_t, const float*, int64_t, float*, int64_t,
                         int64_t);

// The register block for mb (1..5) x rows: R weight rows (r1: the one-row block for the rows a
// tile has left over).
template <DType t>
BlockFn<t> block_fn(int mb, bool r1) {
  if (r1) {
    switch (mb) {
      case 1: return &block_avx2<t, 1, 1>;
      case 2: return &block_avx2<t, 1, 2>;
      case 3: return &block_avx2<t, 1, 3>;
      case 4: return &block_avx2<t, 1, 4>;
      default: return &block_avx2<t, 1, 5>;
    }
  }
  if (Widen<t>::kAcc == 2) {  // two accumulators per (weight row, x row)
    switch (mb) {
      case 1: return &block_avx2<t, 4, 1>;
      case 2: return &block_avx2<t, 2, 2>;
      case 3: return &block_avx2<t, 2, 3>;
      case 4: return &block_avx2<t, 1, 4>;
      default: return &block_avx2<t, 1, 5>;
    }
  }
  switch (mb) {
    case 1: return &block_avx2<t, 8, 1>;
    case 2: return &block_avx2<t, 4, 2>;
    case 3: return &block_avx2<t, 3, 3>;
    case 4: return &block_avx2<t, 3, 4>;
    default: return &block_avx2<t, 2, 5>;
  }
}
inline int block_rows(int mb, int n_acc) {
  if (n_acc == 2) return mb == 1 ? 4 : (mb <= 3 ? 2 : 1);
  return mb == 1 ? 8 : (mb == 2 ? 4 : (mb == 5 ? 2 : 3));
}
// The x rows of the next register block, rest rows left: one accumulator per pair, M <= 5 in one
// block, 6 = 3 + 3, 7 = 4 + 3, 8 = 5 + 3; two: blocks of at most 3 (4 = 2 + 2, 7 = 3 + 2 + 2,
// 8 = 3 + 3 + 2). Each block has at least 8 FMA chains.
inline int next_block(int64_t rest, int n_acc) {
  if (n_acc == 2) return rest <= 3 ? static_cast<int>(rest) : (rest == 4 || rest == 7 ? 2 : 3);
  return rest <= 5 ? static_cast<int>(rest) : (rest == 6 ? 3 : static_cast<int>(rest) - 3);
}

// Output rows [n0, n1) for all M rows of xp (x in the order of Widen<t>, M rows of K floats).
template <DType t>
__attribute__((target("avx2,fma,f16c"))) void tile_avx2(const typename Widen<t>::T* weight, const float* xp,
                                                        const typename Widen<t>::T* bias,
                                                        typename Widen<t>::T* out, int64_t M, int64_t N, int64_t K,
                                                        int64_t n0, int64_t n1) {
  const int64_t k16 = K - K % 16;
  int64_t kb = kXBlockBytes / (4 * M) / 32 * 32;
  if (kb < 64) kb = 64;
  constexpr int A = Widen<t>::kAcc;
  alignas(32) float acc[kTileRows * kFloatGemvMaxM * 8 * A];
  const int64_t rows = n1 - n0, acc_stride = M * 8 * A;
  std::memset(acc, 0, sizeof(float) * rows * acc_stride);
  for (int64_t k0 = 0; k0 < k16; k0 += kb) {
    const int64_t nk = k0 + kb < k16 ? kb : k16 - k0;
    // The first x block prefetches what its weight rows need next: the next K block of the same
    // rows (M >= 3; at M = 2, still memory-bound, it measured slower than the hardware
    // prefetchers alone), or (one K block) the rows R further on.
    for (int64_t m0 = 0; m0 < M;) {
      const int mb = next_block(M - m0, A);
      const int R = block_rows(mb, A);
      const int64_t pf = m0 ? 0 : (nk == k16 ? R * K : (M >= 3 ? kb : 0));
      int64_t r0 = 0;
      for (; r0 + R <= rows; r0 += R)
        block_fn<t>(mb, false)(weight + (n0 + r0) * K + k0, K, nk, xp + m0 * K + k0, K,
                               acc + r0 * acc_stride + m0 * 8 * A, acc_stride, pf);
      for (; r0 < rows; ++r0)
        block_fn<t>(mb, true)(weight + (n0 + r0) * K + k0, K, nk, xp + m0 * K + k0, K,
                              acc + r0 * acc_stride + m0 * 8 * A, acc_stride, 0);
      m0 += mb;
    }
  }
  for (int64_t r = 0; r < rows; ++r) {
    const int64_t n = n0 + r;
    const typename Widen<t>::T* w = weight + n * K;
    const float b = bias ? Widen<t>::one(bias, n) : 0.f;
    for (int64_t m = 0; m < M; ++m) {
      float s;
      int64_t k = k16;
      if (A == 2) {  // the order of fp16 / fp32 before the register blocks: an 8-wide remainder into a
        __m256 va = _mm256_load_ps(acc + r * acc_stride + 16 * m), vb = _mm256_load_ps(acc + r * acc_stride + 16 * m + 8);
        if (K - k16 >= 8) {
          va = _mm256_fmadd_ps(Widen<t>::a(w + k16), _mm256_loadu_ps(xp + m * K + k16), va);
          k += 8;
        }
        s = hsum8(_mm256_add_ps(va, vb));
      } else {
        s = hsum8(_mm256_load_ps(acc + r * acc_stride + 8 * m));
      }
      for (; k < K; ++k) s = std::fma(Widen<t>::one(w, k), xp[m * K + k], s);
      store1(out, t, m * N + n, s + b);
    }
  }
}

template <DType t>
void linear_avx2(const float* xf, const void* weight, const void* bias, void* out, int64_t M, int64_t N,
                 int64_t K) {
  using T = typename Widen<t>::T;
  std::vector<float> xperm;
  const float* xp = xf;
  if (t == DType::BF16) {
    // x in the even/odd order per 16 (see above), the k % 16 tail in natural order.
    xperm.resize(static_cast<size_t>(M * K));
    const int64_t k16 = K - K % 16;
    for (int64_t m = 0; m < M; ++m)
      for (int64_t k = 0; k < K; ++k) {
        const int64_t j = k >= k16 ? k : k - k % 16 + (k % 2 ? 8 + (k % 16) / 2 : (k % 16) / 2);
        xperm[static_cast<size_t>(m * K + j)] = xf[m * K + k];
      }
    xp = xperm.data();
  }
  // Tiles of output rows dealt out dynamically, so a thread slowed down by a busy core does not
  // hold the other back.
  const int64_t tiles = (N + kTileRows - 1) / kTileRows;
#pragma omp parallel for schedule(dynamic, 2)
  for (int64_t i = 0; i < tiles; ++i) {
    const int64_t n0 = i * kTileRows, n1 = n0 + kTileRows < N ? n0 + kTileRows : N;
    tile_avx2<t>(static_cast<const T*>(weight), xp, static_cast<const T*>(bias), static_cast<T*>(out), M, N, K, n0,
                 n1);
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

// Per (weight row, x row): two accumulators over steps of 32, a 16-wide remainder into the first,
// the masked tail into the second, reduce(a0 + a1): the order of rows4_avx512 (M = 1), so a row's
// result does not depend on M.
template <DType t>
__attribute__((target("avx512f,avx512bw,avx512vl,f16c"))) void row_avx512(const void* w, int64_t K, const float* xf,
                                                                           int64_t M, float* acc) {
  const __mmask16 all = 0xffff;
  const int64_t k16 = K - K % 16;
  const __mmask16 tail = static_cast<__mmask16>((1u << (K % 16)) - 1u);
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
    for (int64_t n = 4 * quads; n < N; ++n) {  // the last N % 4 rows, in the same order as rows4_avx512
      float acc[1];
      const void* row = wbytes + n * K * esize;
      if (dtype == DType::BF16)
        row_avx512<DType::BF16>(row, K, xf.data(), 1, acc);
      else if (dtype == DType::F16)
        row_avx512<DType::F16>(row, K, xf.data(), 1, acc);
      else
        row_avx512<DType::F32>(row, K, xf.data(), 1, acc);
      store1(out, dtype, n, acc[0] + (bias ? load1(bias, dtype, n) : 0.f));
    }
    return;
  }
  if (isa == Isa::Avx2) {
    if (dtype == DType::BF16)
      linear_avx2<DType::BF16>(xf.data(), weight, bias, out, M, N, K);
    else if (dtype == DType::F16)
      linear_avx2<DType::F16>(xf.data(), weight, bias, out, M, N, K);
    else
      linear_avx2<DType::F32>(xf.data(), weight, bias, out, M, N, K);
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
