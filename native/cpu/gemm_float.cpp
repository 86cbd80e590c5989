// Float16 prefill GEMM with the decode GEMV's sums (see gemm_float.h).
//
// linear_float's AVX2 path sums, per (weight row n, x row m), 16 lane sums
//   S_j = fma(w[16 s + j], x[16 s + j], S_j) for s = 0, 1, ... (j = 0..15; a0 holds j < 8, a1 j >= 8),
// then, when K % 16 >= 8, one more step into lanes j < 8, then hsum8(a0 + a1), the k % 8 tail in k
// order, + bias, one rounding. The 16 chains are independent, so they can be computed as a GEMM's
// outer products: for a lane j, an 8-wide accumulator holds S_j of 8 weight rows for one x row, and
// each step broadcasts x[m][16 s + j] against 8 weights w[n..n+8][16 s + j]. The weights are packed
// for that ([j][s][c]: 16 rows of W, the 16 s-chains of lane j contiguous), as are the x rows
// ([j][s][i] per 6 rows). A 6 x 16 register tile runs lane j's chain over the whole of K, then the
// next lane; the 16 results are combined per output in hsum8's tree. Every addition and multiply-add
// is the GEMV's, in the GEMV's order, so the outputs are equal bit for bit.
#include "gemm_float.h"

#include <immintrin.h>

#include <cmath>
#include <cstring>
#include <stdexcept>
#include <string>
#include <vector>

namespace glmrt {
namespace {

constexpr int64_t kMR = 6;      // x rows per register tile
constexpr int64_t kNR = 16;     // weight rows per register tile and per packed panel
constexpr int64_t kLanes = 16;  // the GEMV's lane sums (two 8-wide accumulators)
constexpr int64_t kChunk = 256; // steps of 16 along K per pass over the x blocks
constexpr int64_t kGroup = 16;  // blocks of x rows per pass over a chunk

bool detect_avx2() {
  __builtin_cpu_init();
  return __builtin_cpu_supports("avx2") && __builtin_cpu_supports("fma") && __builtin_cpu_supports("f16c");
}
const bool g_avx2 = detect_avx2();

#define GLMRT_GEMM_AVX2 __attribute__((target("avx2,fma,f16c")))

// 16 fp16 values at src widened exactly to fp32 into v (zeros where valid is false).
GLMRT_GEMM_AVX2 inline void widen16(const uint16_t* src, bool valid, float* v) {
  if (!valid) {
    _mm256_storeu_ps(v, _mm256_setzero_ps());
    _mm256_storeu_ps(v + 8, _mm256_setzero_ps());
    return;
  }
  _mm256_storeu_ps(v, _mm256_cvtph_ps(_mm_loadu_si128(reinterpret_cast<const __m128i*>(src))));
  _mm256_storeu_ps(v + 8, _mm256_cvtph_ps(_mm_loadu_si128(reinterpret_cast<const __m128i*>(src + 8))));
}

// x rows [b * kMR, b * kMR + kMR) into xp[(j * S + s) * kMR + i] = x[b * kMR + i][16 s + j] (rows past M zero).
GLMRT_GEMM_AVX2 void pack_x(const uint16_t* x, int64_t M, int64_t K, int64_t S, int64_t b, float* xp) {
  alignas(32) float v[kMR][kLanes];
  for (int64_t s = 0; s < S; ++s) {
    for (int64_t i = 0; i < kMR; ++i) {
      const int64_t m = b * kMR + i;
      widen16(x + m * K + 16 * s, m < M, v[i]);
    }
    for (int64_t j = 0; j < kLanes; ++j)
      for (int64_t i = 0; i < kMR; ++i) xp[(j * S + s) * kMR + i] = v[i][j];
  }
}

// Weight rows [n0, n0 + kNR) into wp[(j * S + s) * kNR + c] = W[n0 + c][16 s + j] (rows past N zero).
GLMRT_GEMM_AVX2 void pack_w(const uint16_t* w, int64_t N, int64_t K, int64_t S, int64_t n0, float* wp) {
  alignas(32) float v[kNR][kLanes];
  for (int64_t s = 0; s < S; ++s) {
    for (int64_t c = 0; c < kNR; ++c) widen16(w + (n0 + c) * K + 16 * s, n0 + c < N, v[c]);
    for (int64_t j = 0; j < kLanes; ++j) {
      float* dst = wp + (j * S + s) * kNR;
      for (int64_t c = 0; c < kNR; ++c) dst[c] = v[c][j];
    }
  }
}

// One lane's chains for a 6 x 16 tile over steps [0, steps) of wp / xp (pointers at the chunk's
// first step): acc[i * 16 + c] = S_j(x row i, weight row c), continued from acc when `resume`
// (a stored fp32 sum reloaded: the chain is unchanged).
GLMRT_GEMM_AVX2 void tile_lane(const float* wp, const float* xp, int64_t steps, float* acc, bool resume) {
  __m256 c0[kMR], c1[kMR];
  for (int i = 0; i < kMR; ++i) {
    c0[i] = resume ? _mm256_loadu_ps(acc + i * kNR) : _mm256_setzero_ps();
    c1[i] = resume ? _mm256_loadu_ps(acc + i * kNR + 8) : _mm256_setzero_ps();
  }
  for (int64_t s = 0; s < steps; ++s) {
    const __m256 w0 = _mm256_loadu_ps(wp + s * kNR), w1 = _mm256_loadu_ps(wp + s * kNR + 8);
#pragma GCC unroll 6
    for (int i = 0; i < kMR; ++i) {
      const __m256 xb = _mm256_broadcast_ss(xp + s * kMR + i);
      c0[i] = _mm256_fmadd_ps(w0, xb, c0[i]);
      c1[i] = _mm256_fmadd_ps(w1, xb, c1[i]);
    }
  }
  for (int i = 0; i < kMR; ++i) {
    _mm256_storeu_ps(acc + i * kNR, c0[i]);
    _mm256_storeu_ps(acc + i * kNR + 8, c1[i]);
  }
}

// The outputs of one tile: p[j * kMR * kNR + i * kNR + c] holds lane j's sum (all 16 lanes done).
GLMRT_GEMM_AVX2 void finish_tile(float* p, const uint16_t* x, const uint16_t* w, const uint16_t* bias, uint16_t* out,
                                 int64_t M, int64_t N, int64_t K, int64_t m0, int64_t n0) {
  const int64_t k8 = K - K % 8, k16 = k8 - k8 % 16;
  const int64_t rows = M - m0 < kMR ? M - m0 : kMR, cols = N - n0 < kNR ? N - n0 : kNR;
  constexpr int64_t L = kMR * kNR;  // floats per lane
  if (k8 > k16)  // the GEMV's 8-wide remainder, into lanes 0..7 before the reduction
    for (int64_t i = 0; i < rows; ++i)
      for (int64_t c = 0; c < cols; ++c)
        for (int64_t j = 0; j < 8; ++j) {
          float& a = p[j * L + i * kNR + c];
          a = std::fma(f16_to_f32(w[(n0 + c) * K + k16 + j]), f16_to_f32(x[(m0 + i) * K + k16 + j]), a);
        }
  for (int64_t i = 0; i < rows; ++i) {
    alignas(32) float sum[kNR];
    for (int64_t h = 0; h < kNR; h += 8) {
      // hsum8(a0 + a1): t_q = lane q + lane q+8; u_q = t_q + t_{q+4}; (u0 + u2) + (u1 + u3).
      __m256 t[8];
      for (int q = 0; q < 8; ++q)
        t[q] = _mm256_add_ps(_mm256_loadu_ps(p + q * L + i * kNR + h), _mm256_loadu_ps(p + (q + 8) * L + i * kNR + h));
      const __m256 u0 = _mm256_add_ps(t[0], t[4]), u1 = _mm256_add_ps(t[1], t[5]);
      const __m256 u2 = _mm256_add_ps(t[2], t[6]), u3 = _mm256_add_ps(t[3], t[7]);
      _mm256_store_ps(sum + h, _mm256_add_ps(_mm256_add_ps(u0, u2), _mm256_add_ps(u1, u3)));
    }
    const int64_t m = m0 + i;
    for (int64_t c = 0; c < cols; ++c) {
      const int64_t n = n0 + c;
      float s = sum[c];
      for (int64_t k = k8; k < K; ++k) s = std::fma(f16_to_f32(w[n * K + k]), f16_to_f32(x[m * K + k]), s);
      const float b = bias ? f16_to_f32(bias[n]) : 0.f;
      out[m * N + n] = f32_to_f16(s + b);
    }
  }
}

}  // namespace

void linear_float_gemm(const void* x, const void* weight, const void* bias, void* out, DType dtype, int64_t M,
                       int64_t N, int64_t K) {
  if (M < 0 || N < 0 || K < 0) throw std::invalid_argument("linear_float_gemm: M, N and K must be >= 0");
  if (dtype != DType::F16)
    throw std::invalid_argument("linear_float_gemm: float16 only (bf16 and fp32 prefill take the panel GEMM)");
  if (!g_avx2)
    throw std::runtime_error("linear_float_gemm: needs AVX2, FMA and F16C (linear_float_gemm_isa() is 'none'); "
                             "the caller falls back to torch's F.linear");
  if (M == 0 || N == 0) return;
  const uint16_t* xh = static_cast<const uint16_t*>(x);
  const uint16_t* wh = static_cast<const uint16_t*>(weight);
  const uint16_t* bh = static_cast<const uint16_t*>(bias);
  uint16_t* oh = static_cast<uint16_t*>(out);
  const int64_t k8 = K - K % 8, k16 = k8 - k8 % 16, S = k16 / 16;
  const int64_t mblocks = (M + kMR - 1) / kMR, nblocks = (N + kNR - 1) / kNR;
  const int64_t xblock = kLanes * S * kMR;  // floats per packed block of x rows
  std::vector<float> xp(static_cast<size_t>(mblocks * xblock > 0 ? mblocks * xblock : 1));
#pragma omp parallel for schedule(static)
  for (int64_t b = 0; b < mblocks; ++b) pack_x(xh, M, K, S, b, xp.data() + b * xblock);
  // K in chunks of kChunk steps, so the chunk of a weight panel (16 lanes x kChunk x 16 fp32,
  // 256 KiB) stays in L2 while a group of kGroup blocks of x rows passes; the lane sums of the
  // group (kGroup x 6 KiB) live in a per-thread buffer between chunks.
  const int64_t chunks = S > 0 ? (S + kChunk - 1) / kChunk : 1;
  constexpr int64_t L = kMR * kNR;  // floats per lane of one tile
#pragma omp parallel
  {
    std::vector<float> wp(static_cast<size_t>(kLanes * S * kNR > 0 ? kLanes * S * kNR : 1));
    std::vector<float> p(static_cast<size_t>((mblocks < kGroup ? mblocks : kGroup) * kLanes * L));
#pragma omp for schedule(dynamic, 1)
    for (int64_t nb = 0; nb < nblocks; ++nb) {
      const int64_t n0 = nb * kNR;
      pack_w(wh, N, K, S, n0, wp.data());
      for (int64_t g0 = 0; g0 < mblocks; g0 += kGroup) {  // x blocks in groups: their sums stay in L2
        const int64_t g1 = g0 + kGroup < mblocks ? g0 + kGroup : mblocks;
        for (int64_t ch = 0; ch < chunks; ++ch) {
          const int64_t s0 = ch * kChunk, steps = S - s0 < kChunk ? S - s0 : kChunk;
          for (int64_t b = g0; b < g1; ++b) {
            const float* xb = xp.data() + b * xblock;
            float* pb = p.data() + (b - g0) * kLanes * L;
            for (int64_t j = 0; j < kLanes; ++j)
              tile_lane(wp.data() + (j * S + s0) * kNR, xb + (j * S + s0) * kMR, steps, pb + j * L, ch > 0);
            if (ch == chunks - 1) finish_tile(pb, xh, wh, bh, oh, M, N, K, b * kMR, n0);
          }
        }
      }
    }
  }
}

const char* linear_float_gemm_isa() { return g_avx2 ? "avx2" : "none"; }

}  // namespace glmrt
