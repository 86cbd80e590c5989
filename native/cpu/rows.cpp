#include "rows.h"

#include <cstring>

#if defined(__x86_64__) && (defined(__GNUC__) || defined(__clang__))
#include <immintrin.h>
#define GLMRT_ROWS_X86 1
#endif

namespace glmrt {

namespace {

#ifdef GLMRT_ROWS_X86
const bool kHaveF16C = [] {
  __builtin_cpu_init();
  return __builtin_cpu_supports("f16c") && __builtin_cpu_supports("avx");
}();

__attribute__((target("avx,f16c"))) void f16_to_f32_hw(const uint16_t* s, float* d, int64_t n) {
  int64_t i = 0;
  for (; i + 8 <= n; i += 8)
    _mm256_storeu_ps(d + i, _mm256_cvtph_ps(_mm_loadu_si128(reinterpret_cast<const __m128i*>(s + i))));
  for (; i < n; ++i) d[i] = _cvtsh_ss(s[i]);
}

__attribute__((target("avx,f16c"))) void f32_to_f16_hw(const float* s, uint16_t* d, int64_t n) {
  int64_t i = 0;
  for (; i + 8 <= n; i += 8)
    _mm_storeu_si128(reinterpret_cast<__m128i*>(d + i), _mm256_cvtps_ph(_mm256_loadu_ps(s + i), _MM_FROUND_TO_NEAREST_INT));
  for (; i < n; ++i) d[i] = _cvtss_sh(s[i], _MM_FROUND_TO_NEAREST_INT);
}
#endif

void bf16_to_f32_scalar(const uint16_t* s, float* d, int64_t n) {
  for (int64_t i = 0; i < n; ++i) d[i] = bf16_to_f32(s[i]);
}

void f32_to_bf16_scalar(const float* s, uint16_t* d, int64_t n) {
  for (int64_t i = 0; i < n; ++i) d[i] = f32_to_bf16(s[i]);
}

#ifdef GLMRT_ROWS_X86
__attribute__((target("avx2"))) void bf16_to_f32_avx2(const uint16_t* s, float* d, int64_t n) {
  int64_t i = 0;
  for (; i + 8 <= n; i += 8) {
    const __m256i v = _mm256_cvtepu16_epi32(_mm_loadu_si128(reinterpret_cast<const __m128i*>(s + i)));
    _mm256_storeu_ps(d + i, _mm256_castsi256_ps(_mm256_slli_epi32(v, 16)));
  }
  bf16_to_f32_scalar(s + i, d + i, n - i);
}

// Round to nearest even as f32_to_bf16: (bits + 0x7fff + lsb) >> 16; NaN -> quiet NaN.
__attribute__((target("avx2"))) void f32_to_bf16_avx2(const float* s, uint16_t* d, int64_t n) {
  const __m256i bias = _mm256_set1_epi32(0x7fff), one = _mm256_set1_epi32(1), abs = _mm256_set1_epi32(0x7fffffff);
  const __m256i inf = _mm256_set1_epi32(0x7f800000), quiet = _mm256_set1_epi32(0x40);
  int64_t i = 0;
  for (; i + 8 <= n; i += 8) {
    const __m256i bits = _mm256_castps_si256(_mm256_loadu_ps(s + i));
    const __m256i lsb = _mm256_and_si256(_mm256_srli_epi32(bits, 16), one);
    __m256i r = _mm256_srli_epi32(_mm256_add_epi32(bits, _mm256_add_epi32(bias, lsb)), 16);
    const __m256i nan = _mm256_cmpgt_epi32(_mm256_and_si256(bits, abs), inf);
    r = _mm256_blendv_epi8(r, _mm256_or_si256(_mm256_srli_epi32(bits, 16), quiet), nan);
    // 8 x u32 (each < 2^16) -> 8 x u16
    const __m256i packed = _mm256_permute4x64_epi64(_mm256_packus_epi32(r, r), 0x08);
    _mm_storeu_si128(reinterpret_cast<__m128i*>(d + i), _mm256_castsi256_si128(packed));
  }
  f32_to_bf16_scalar(s + i, d + i, n - i);
}

__attribute__((target("avx512f,avx512bw"))) void bf16_to_f32_avx512(const uint16_t* s, float* d, int64_t n) {
  int64_t i = 0;
  for (; i + 16 <= n; i += 16) {
    const __m512i v = _mm512_cvtepu16_epi32(_mm256_loadu_si256(reinterpret_cast<const __m256i*>(s + i)));
    _mm512_storeu_ps(d + i, _mm512_castsi512_ps(_mm512_slli_epi32(v, 16)));
  }
  bf16_to_f32_scalar(s + i, d + i, n - i);
}

__attribute__((target("avx512f,avx512bw"))) void f32_to_bf16_avx512(const float* s, uint16_t* d, int64_t n) {
  const __m512i bias = _mm512_set1_epi32(0x7fff), one = _mm512_set1_epi32(1), abs = _mm512_set1_epi32(0x7fffffff);
  const __m512i inf = _mm512_set1_epi32(0x7f800000), quiet = _mm512_set1_epi32(0x40);
  int64_t i = 0;
  for (; i + 16 <= n; i += 16) {
    const __m512i bits = _mm512_castps_si512(_mm512_loadu_ps(s + i));
    const __m512i lsb = _mm512_and_si512(_mm512_srli_epi32(bits, 16), one);
    __m512i r = _mm512_srli_epi32(_mm512_add_epi32(bits, _mm512_add_epi32(bias, lsb)), 16);
    const __mmask16 nan = _mm512_cmpgt_epi32_mask(_mm512_and_si512(bits, abs), inf);
    r = _mm512_mask_mov_epi32(r, nan, _mm512_or_si512(_mm512_srli_epi32(bits, 16), quiet));
    _mm256_storeu_si256(reinterpret_cast<__m256i*>(d + i), _mm512_cvtepi32_epi16(r));
  }
  f32_to_bf16_scalar(s + i, d + i, n - i);
}
#endif

using LoadBF16 = void (*)(const uint16_t*, float*, int64_t);
using StoreBF16 = void (*)(const float*, uint16_t*, int64_t);

const LoadBF16 bf16_to_f32_row = [] {
#ifdef GLMRT_ROWS_X86
  __builtin_cpu_init();
  if (__builtin_cpu_supports("avx512f") && __builtin_cpu_supports("avx512bw")) return &bf16_to_f32_avx512;
  if (__builtin_cpu_supports("avx2")) return &bf16_to_f32_avx2;
#endif
  return &bf16_to_f32_scalar;
}();

const StoreBF16 f32_to_bf16_row = [] {
#ifdef GLMRT_ROWS_X86
  __builtin_cpu_init();
  if (__builtin_cpu_supports("avx512f") && __builtin_cpu_supports("avx512bw")) return &f32_to_bf16_avx512;
  if (__builtin_cpu_supports("avx2")) return &f32_to_bf16_avx2;
#endif
  return &f32_to_bf16_scalar;
}();

}  // namespace

void load_row_f32(const void* src, DType t, float* dst, int64_t n) {
  switch (t) {
    case DType::F32: std::memcpy(dst, src, n * sizeof(float)); return;
    case DType::BF16: bf16_to_f32_row(static_cast<const uint16_t*>(src), dst, n); return;
    case DType::F16:
#ifdef GLMRT_ROWS_X86
      if (kHaveF16C) { f16_to_f32_hw(static_cast<const uint16_t*>(src), dst, n); return; }
#endif
      for (int64_t i = 0; i < n; ++i) dst[i] = f16_to_f32(static_cast<const uint16_t*>(src)[i]);
      return;
  }
}

void store_row_f32(const float* src, DType t, void* dst, int64_t n) {
  switch (t) {
    case DType::F32: std::memcpy(dst, src, n * sizeof(float)); return;
    case DType::BF16: f32_to_bf16_row(src, static_cast<uint16_t*>(dst), n); return;
    case DType::F16:
#ifdef GLMRT_ROWS_X86
      if (kHaveF16C) { f32_to_f16_hw(src, static_cast<uint16_t*>(dst), n); return; }
#endif
      for (int64_t i = 0; i < n; ++i) static_cast<uint16_t*>(dst)[i] = f32_to_f16(src[i]);
      return;
  }
}

void round_row(float* x, DType t, int64_t n) {
  if (t == DType::F32) return;
  uint16_t buf[256];
  for (int64_t i = 0; i < n; i += 256) {
    const int64_t m = n - i < 256 ? n - i : 256;
    store_row_f32(x + i, t, buf, m);
    load_row_f32(buf, t, x + i, m);
  }
}

#if defined(__x86_64__) && (defined(__GNUC__) || defined(__clang__))
#define GLMRT_ROWS_MULTIVERSION __attribute__((target_clones("avx512f", "avx2", "default")))
#else
#define GLMRT_ROWS_MULTIVERSION
#endif

GLMRT_ROWS_MULTIVERSION
float row_sum(const float* x, int64_t n) {
  float acc[16] = {0};
  int64_t i = 0;
  for (; i + 16 <= n; i += 16)
    for (int j = 0; j < 16; ++j) acc[j] += x[i + j];
  float s = 0.f;
  for (; i < n; ++i) s += x[i];
  for (int j = 0; j < 16; ++j) s += acc[j];
  return s;
}

GLMRT_ROWS_MULTIVERSION
float row_centered_sum_of_squares(const float* x, float center, int64_t n) {
  float acc[16] = {0};
  int64_t i = 0;
  for (; i + 16 <= n; i += 16)
    for (int j = 0; j < 16; ++j) {
      const float d = x[i + j] - center;
      acc[j] += d * d;
    }
  float s = 0.f;
  for (; i < n; ++i) s += (x[i] - center) * (x[i] - center);
  for (int j = 0; j < 16; ++j) s += acc[j];
  return s;
}

}  // namespace glmrt
