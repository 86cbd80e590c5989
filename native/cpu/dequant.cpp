// INT8 / INT4 rows -> fp32 (see dequant.h). Memory-light and branch-free per 16 values: INT4 bytes
// are sign-extended to int32, the high nibble (even index) and the low nibble (odd index) split by
// arithmetic shifts, interleaved back into index order, converted and scaled with one multiply
// (the value and the scale are exact in fp32, so the product is the reference's rounding of it).
#include "dequant.h"

#include <stdexcept>
#include <string>

#if defined(__x86_64__) || defined(_M_X64)
#include <immintrin.h>
#define GLMRT_DQ_X86 1
#endif

namespace glmrt {
namespace {

inline int int4_at(const uint8_t* row, int64_t k) {
  const int byte = row[k >> 1];
  const int nib = (k & 1) ? (byte & 0xF) : (byte >> 4);
  return nib >= 8 ? nib - 16 : nib;
}

inline float scale_at(const void* scale, DType t, int64_t i) { return load_as_f32(scale, i, t); }

// One row, scalar: also the tail of the vector path.
void row_scalar(QuantFormat fmt, const uint8_t* w, const void* scale, DType st, int64_t srow, int64_t K,
                int64_t group, int64_t k0, void* out, DType ot) {
  for (int64_t k = k0; k < K; ++k) {
    const int q = fmt == QuantFormat::Int8 ? static_cast<int8_t>(w[k]) : int4_at(w, k);
    const float s = scale_at(scale, st, srow + (group ? k / group : 0));
    store_from_f32(out, k, static_cast<float>(q) * s, ot);
  }
}

#ifdef GLMRT_DQ_X86
#define GLMRT_DQ_AVX2 __attribute__((target("avx2,fma,f16c")))

// 16 values from 8 packed INT4 bytes at w (values 2j from the high nibble, 2j+1 from the low).
// 8 fp32 -> out[0..8) in the output dtype (bf16 / fp16 rounded to nearest even; NaN cannot occur:
// the products are finite whenever the scales are).
GLMRT_DQ_AVX2 inline void store8(__m256 v, void* out, int64_t i, DType ot) {
  if (ot == DType::F32) {
    _mm256_storeu_ps(static_cast<float*>(out) + i, v);
  } else if (ot == DType::F16) {
    _mm_storeu_si128(reinterpret_cast<__m128i*>(static_cast<uint16_t*>(out) + i),
                     _mm256_cvtps_ph(v, _MM_FROUND_TO_NEAREST_INT | _MM_FROUND_NO_EXC));
  } else {
    const __m256i b = _mm256_castps_si256(v);
    const __m256i lsb = _mm256_and_si256(_mm256_srli_epi32(b, 16), _mm256_set1_epi32(1));
    const __m256i r = _mm256_srli_epi32(_mm256_add_epi32(b, _mm256_add_epi32(lsb, _mm256_set1_epi32(0x7fff))), 16);
    const __m128i packed = _mm_packus_epi32(_mm256_castsi256_si128(r), _mm256_extracti128_si256(r, 1));
    _mm_storeu_si128(reinterpret_cast<__m128i*>(static_cast<uint16_t*>(out) + i), packed);
  }
}

GLMRT_DQ_AVX2 inline void int4x16(const uint8_t* w, __m256 s, void* out, int64_t i, DType ot) {
  const __m256i b = _mm256_cvtepi8_epi32(_mm_loadl_epi64(reinterpret_cast<const __m128i*>(w)));  // 8 bytes
  const __m256i hi = _mm256_srai_epi32(b, 4);
  const __m256i lo = _mm256_srai_epi32(_mm256_slli_epi32(b, 28), 28);
  const __m256i a = _mm256_unpacklo_epi32(hi, lo);  // h0 l0 h1 l1 | h4 l4 h5 l5
  const __m256i c = _mm256_unpackhi_epi32(hi, lo);  // h2 l2 h3 l3 | h6 l6 h7 l7
  const __m256i first = _mm256_permute2x128_si256(a, c, 0x20);
  const __m256i second = _mm256_permute2x128_si256(a, c, 0x31);
  store8(_mm256_mul_ps(_mm256_cvtepi32_ps(first), s), out, i, ot);
  store8(_mm256_mul_ps(_mm256_cvtepi32_ps(second), s), out, i + 8, ot);
}

GLMRT_DQ_AVX2 inline void int8x16(const uint8_t* w, __m256 s, void* out, int64_t i, DType ot) {
  const __m128i v = _mm_loadu_si128(reinterpret_cast<const __m128i*>(w));
  const __m256i a = _mm256_cvtepi8_epi32(v);
  const __m256i b = _mm256_cvtepi8_epi32(_mm_srli_si128(v, 8));
  store8(_mm256_mul_ps(_mm256_cvtepi32_ps(a), s), out, i, ot);
  store8(_mm256_mul_ps(_mm256_cvtepi32_ps(b), s), out, i + 8, ot);
}

// Groups are multiples of 32, so 16 values starting at a multiple of 16 share one scale.
GLMRT_DQ_AVX2 void row_avx2(QuantFormat fmt, const uint8_t* w, const void* scale, DType st, int64_t srow, int64_t K,
                            int64_t group, void* out, DType ot) {
  const int64_t full = K / 16 * 16;
  if (group == 0) {
    const __m256 s = _mm256_set1_ps(scale_at(scale, st, srow));
    if (fmt == QuantFormat::Int8)
      for (int64_t k = 0; k < full; k += 16) int8x16(w + k, s, out, k, ot);
    else
      for (int64_t k = 0; k < full; k += 16) int4x16(w + k / 2, s, out, k, ot);
  } else {
    for (int64_t g0 = 0; g0 < full; g0 += group) {
      const __m256 s = _mm256_set1_ps(scale_at(scale, st, srow + g0 / group));
      const int64_t g1 = g0 + group < full ? g0 + group : full;
      if (fmt == QuantFormat::Int8)
        for (int64_t k = g0; k < g1; k += 16) int8x16(w + k, s, out, k, ot);
      else
        for (int64_t k = g0; k < g1; k += 16) int4x16(w + k / 2, s, out, k, ot);
    }
  }
  row_scalar(fmt, w, scale, st, srow, K, group, full, out, ot);
}

bool detect_avx2() {
  __builtin_cpu_init();
  return __builtin_cpu_supports("avx2") && __builtin_cpu_supports("fma") && __builtin_cpu_supports("f16c");
}
const bool g_avx2 = detect_avx2();
#else
const bool g_avx2 = false;
#endif

}  // namespace

void dequantize_rows(QuantFormat fmt, const void* weight, const void* scale, DType st, int64_t N, int64_t K,
                     int64_t group, int64_t n0, int64_t n1, void* out, DType ot, int64_t ld) {
  if (N < 0 || K < 0 || n0 < 0 || n1 < n0 || n1 > N || ld < K)
    throw std::invalid_argument("dequantize_rows: rows [" + std::to_string(n0) + ", " + std::to_string(n1) +
                                ") of " + std::to_string(N) + " with K " + std::to_string(K) + " and ld " +
                                std::to_string(ld));
  if (group < 0 || group % 32 != 0)
    throw std::invalid_argument("dequantize_rows: group_size must be 0 or a multiple of 32, got " +
                                std::to_string(group));
  const int64_t row_bytes = fmt == QuantFormat::Int4 ? (K + 1) / 2 : K;
  const int64_t groups = group ? (K + group - 1) / group : 1;
  const uint8_t* w = static_cast<const uint8_t*>(weight);
#pragma omp parallel for schedule(static) if ((n1 - n0) * K >= (1 << 16))
  for (int64_t n = n0; n < n1; ++n) {
    void* o = static_cast<char*>(out) + (n - n0) * ld * (ot == DType::F32 ? 4 : 2);
#ifdef GLMRT_DQ_X86
    if (g_avx2) {
      row_avx2(fmt, w + n * row_bytes, scale, st, n * groups, K, group, o, ot);
      continue;
    }
#endif
    row_scalar(fmt, w + n * row_bytes, scale, st, n * groups, K, group, 0, o, ot);
  }
}

const char* dequantize_rows_isa() { return g_avx2 ? "avx2" : "scalar"; }

}  // namespace glmrt
