#include "gemv_quant.h"

#include <atomic>
#include <cmath>
#include <cstdlib>
#include <cstring>
#include <new>
#include <stdexcept>
#include <string>
#include <vector>

#if defined(__x86_64__) && (defined(__GNUC__) || defined(__clang__))
#define GLMRT_X86 1
#include <immintrin.h>
#endif
#ifdef GLMRT_HAVE_OPENMP
#include <omp.h>
#endif

// How it works. Batch-1 decode reads every weight byte once per token, so the kernels are built to
// stream the weight matrix at DRAM speed with as few instructions per byte as possible:
//  * the activation rows are quantized to int8 once per call (blocks of 32 along K), so the inner
//    loop is an integer dot product (AVX-512 VNNI vpdpbusd, or AVX2 vpmaddubsw + vpmaddwd) on the
//    weight bytes as they come from memory, with one int->float conversion and one FMA per chunk;
//  * vpdpbusd/vpmaddubsw need one unsigned operand. The weights are made unsigned by an offset
//    (int4 nibble ^ 8 = q + 8, int8 byte ^ 0x80 = q + 128) and the offset's contribution,
//    offset * sum(x_q of the block), which depends only on the activations, is precomputed and
//    used as the initial value of the integer accumulator: it costs nothing in the inner loop;
//  * INT4 keeps the released layout (even index in the high nibble). Instead of interleaving
//    nibbles, the quantized activations are stored split into even / odd positions per SIMD chunk,
//    so high nibbles multiply the even half and low nibbles the odd half;
//  * a kernel call works on 4 weight rows at once, sharing each activation load among them;
//  * threads take tiles of contiguous output rows (sequential weight streams) dynamically, so a
//    thread slowed down by a busy core does not hold the others back.
// With M > 1 each group of weight rows is reused, from L1, for a block of activation rows; on
// AVX2 each weight chunk is also unpacked once for two activation rows (see step_avx2).

namespace glmrt {
namespace {

constexpr int64_t kBlock = 32;    // activation quantization block along K
constexpr int64_t kKAlign = 128;  // K is padded to this, so every SIMD chunk of every path is whole

enum class Isa { Scalar, Avx2, Avx512Vnni };
enum ScaleMode { kPerRow = 0, kGroupPermute = 1, kGroupBroadcast = 2 };

// ---------------------------------------------------------------------------------------------
// Scratch memory: 64-byte aligned, grow-only, one per calling thread.
struct Scratch {
  void* ptr = nullptr;
  size_t size = 0;
  Scratch() = default;
  Scratch(const Scratch&) = delete;
  Scratch& operator=(const Scratch&) = delete;
  ~Scratch() { std::free(ptr); }
  void* get(size_t bytes) {
    if (bytes > size) {
      std::free(ptr);
      ptr = nullptr;
      size = 0;
      size_t rounded = (bytes + 63) / 64 * 64;
      ptr = std::aligned_alloc(64, rounded);
      if (!ptr) throw std::bad_alloc();
      size = rounded;
    }
    return ptr;
  }
};

// Quantized activations, M rows. The layout of q depends on the kernel that reads it.
struct Acts {
  int64_t M = 0, K = 0, Kpad = 0;
  int64_t nblocks = 0;  // Kpad / 32
  int64_t lanes = 0;    // int32 dot-product lanes per row: Kpad/4 (int8) or Kpad/8 (int4)
  int8_t* q = nullptr;        // [M][Kpad]
  float* dblock = nullptr;    // [M][nblocks] scale of each block (0 for the padding)
  float* dx = nullptr;        // [M][lanes] scale of the block each lane belongs to
  int32_t* corr = nullptr;    // [M][lanes] -offset * sum(q of the block) at the block's first lane
};

// ---------------------------------------------------------------------------------------------
// Quantization of one block of 32 fp32 activations. Scalar and AVX2 versions give identical bits:
// amax in fp32, id = 127 / amax, q = round-half-even(x * id), d = amax / 127.
inline void block_scales(float amax, float* id, float* d) {
  if (amax >= 1e-30f) {  // also false for NaN
    *id = 127.f / amax;
    *d = amax / 127.f;
  } else {  // all-zero (or vanishing) block; a NaN propagates through d
    *id = 0.f;
    *d = (amax == amax) ? 0.f : amax;
  }
}

void quantize_block_scalar(const float* x, int8_t* q, float* d, int32_t* sum) {
  float amax = 0.f;
  for (int i = 0; i < kBlock; ++i) {
    float a = std::fabs(x[i]);
    amax = a > amax ? a : amax;
  }
  float id;
  block_scales(amax, &id, d);
  int32_t s = 0;
  for (int i = 0; i < kBlock; ++i) {
    int v = static_cast<int>(std::nearbyint(x[i] * id));
    v = v > 127 ? 127 : (v < -127 ? -127 : v);
    q[i] = static_cast<int8_t>(v);
    s += v;
  }
  *sum = s;
}

#ifdef GLMRT_X86
#define GLMRT_F16C_FN __attribute__((target("f16c")))
#define GLMRT_AVX2_FN __attribute__((target("avx2,fma,f16c")))
#define GLMRT_AVX512_FN __attribute__((target("avx512f,avx512bw,avx512vl,avx512dq,avx512vnni,avx2,fma,f16c")))
#define GLMRT_INLINE inline __attribute__((always_inline))

GLMRT_F16C_FN GLMRT_INLINE float load_f32_hw(const void* p, int64_t i, DType t) {
  switch (t) {
    case DType::F32: return static_cast<const float*>(p)[i];
    case DType::BF16: return bf16_to_f32(static_cast<const uint16_t*>(p)[i]);
    default: return _cvtsh_ss(static_cast<const uint16_t*>(p)[i]);
  }
}

GLMRT_F16C_FN GLMRT_INLINE void store_f32_hw(void* p, int64_t i, float v, DType t) {
  switch (t) {
    case DType::F32: static_cast<float*>(p)[i] = v; break;
    case DType::BF16: static_cast<uint16_t*>(p)[i] = f32_to_bf16(v); break;
    default: static_cast<uint16_t*>(p)[i] = _cvtss_sh(v, _MM_FROUND_TO_NEAREST_INT); break;
  }
}

// n values starting at element `offset` of src (dtype t) -> fp32 dst.
GLMRT_AVX2_FN void to_f32_avx2(const void* src, int64_t offset, int64_t n, DType t, float* dst) {
  if (t == DType::F32) {
    std::memcpy(dst, static_cast<const float*>(src) + offset, n * sizeof(float));
    return;
  }
  const uint16_t* s = static_cast<const uint16_t*>(src) + offset;
  int64_t i = 0;
  if (t == DType::BF16) {
    for (; i + 8 <= n; i += 8) {
      __m256i v = _mm256_cvtepu16_epi32(_mm_loadu_si128(reinterpret_cast<const __m128i*>(s + i)));
      _mm256_storeu_ps(dst + i, _mm256_castsi256_ps(_mm256_slli_epi32(v, 16)));
    }
    for (; i < n; ++i) dst[i] = bf16_to_f32(s[i]);
  } else {
    for (; i + 8 <= n; i += 8)
      _mm256_storeu_ps(dst + i, _mm256_cvtph_ps(_mm_loadu_si128(reinterpret_cast<const __m128i*>(s + i))));
    for (; i < n; ++i) dst[i] = _cvtsh_ss(s[i]);
  }
}

GLMRT_AVX2_FN void quantize_block_avx2(const float* x, int8_t* q, float* d, int32_t* sum) {
  const __m256 abs_mask = _mm256_castsi256_ps(_mm256_set1_epi32(0x7fffffff));
  __m256 v0 = _mm256_loadu_ps(x), v1 = _mm256_loadu_ps(x + 8);
  __m256 v2 = _mm256_loadu_ps(x + 16), v3 = _mm256_loadu_ps(x + 24);
  __m256 m = _mm256_max_ps(_mm256_max_ps(_mm256_and_ps(v0, abs_mask), _mm256_and_ps(v1, abs_mask)),
                           _mm256_max_ps(_mm256_and_ps(v2, abs_mask), _mm256_and_ps(v3, abs_mask)));
  __m128 m4 = _mm_max_ps(_mm256_castps256_ps128(m), _mm256_extractf128_ps(m, 1));
  m4 = _mm_max_ps(m4, _mm_movehl_ps(m4, m4));
  m4 = _mm_max_ss(m4, _mm_movehdup_ps(m4));
  float amax = _mm_cvtss_f32(m4);
  // max_ps may drop NaNs; keep the scalar path's NaN propagation.
  __m256 nan = _mm256_or_ps(_mm256_or_ps(_mm256_cmp_ps(v0, v0, _CMP_UNORD_Q), _mm256_cmp_ps(v1, v1, _CMP_UNORD_Q)),
                            _mm256_or_ps(_mm256_cmp_ps(v2, v2, _CMP_UNORD_Q), _mm256_cmp_ps(v3, v3, _CMP_UNORD_Q)));
  if (_mm256_movemask_ps(nan)) amax = std::nanf("");
  float id;
  block_scales(amax, &id, d);
  const __m256 s = _mm256_set1_ps(id);
  __m256i i0 = _mm256_cvtps_epi32(_mm256_mul_ps(v0, s)), i1 = _mm256_cvtps_epi32(_mm256_mul_ps(v1, s));
  __m256i i2 = _mm256_cvtps_epi32(_mm256_mul_ps(v2, s)), i3 = _mm256_cvtps_epi32(_mm256_mul_ps(v3, s));
  __m256i t = _mm256_add_epi32(_mm256_add_epi32(i0, i1), _mm256_add_epi32(i2, i3));
  __m128i t4 = _mm_add_epi32(_mm256_castsi256_si128(t), _mm256_extracti128_si256(t, 1));
  t4 = _mm_add_epi32(t4, _mm_shuffle_epi32(t4, 0x4e));
  t4 = _mm_add_epi32(t4, _mm_shuffle_epi32(t4, 0xb1));
  *sum = _mm_cvtsi128_si32(t4);
  // packs work per 128-bit lane: the bytes come out as dwords [i0a i1a i2a i3a i0b i1b i2b i3b].
  __m256i p = _mm256_packs_epi16(_mm256_packs_epi32(i0, i1), _mm256_packs_epi32(i2, i3));
  p = _mm256_permutevar8x32_epi32(p, _mm256_setr_epi32(0, 4, 1, 5, 2, 6, 3, 7));
  _mm256_storeu_si256(reinterpret_cast<__m256i*>(q), p);
}
#endif  // GLMRT_X86

#ifdef GLMRT_X86
// Natural-order int8 -> the int4 kernels' layout: per chunk of 2*chunk values, the even positions
// (which meet the high nibbles) then the odd ones.
GLMRT_AVX2_FN void split_even_odd_avx2(const int8_t* src, int8_t* dst, int64_t n, int64_t chunk) {
  const __m256i shuf = _mm256_setr_epi8(0, 2, 4, 6, 8, 10, 12, 14, 1, 3, 5, 7, 9, 11, 13, 15,  //
                                        0, 2, 4, 6, 8, 10, 12, 14, 1, 3, 5, 7, 9, 11, 13, 15);
  for (int64_t c0 = 0; c0 < n; c0 += 2 * chunk)
    for (int64_t i = 0; i < 2 * chunk / 32; ++i) {
      __m256i v = _mm256_loadu_si256(reinterpret_cast<const __m256i*>(src + c0 + 32 * i));
      v = _mm256_permute4x64_epi64(_mm256_shuffle_epi8(v, shuf), 0xd8);  // [16 even | 16 odd]
      _mm_storeu_si128(reinterpret_cast<__m128i*>(dst + c0 + 16 * i), _mm256_castsi256_si128(v));
      _mm_storeu_si128(reinterpret_cast<__m128i*>(dst + c0 + chunk + 16 * i), _mm256_extracti128_si256(v, 1));
    }
}

GLMRT_AVX2_FN void quantize_row_avx2(const void* x, DType xt, int64_t K, const Acts& a, int64_t m, int64_t chunk,
                                     int32_t offset, float* xr, int8_t* qnat) {
  to_f32_avx2(x, m * K, K, xt, xr);
  std::memset(xr + K, 0, (a.Kpad - K) * sizeof(float));
  int8_t* q = a.q + m * a.Kpad;
  int8_t* qb = chunk ? qnat : q;
  float* db = a.dblock + m * a.nblocks;
  float* dx = a.dx + m * a.lanes;
  int32_t* corr = a.corr + m * a.lanes;
  const int64_t lpb = a.lanes / a.nblocks;  // 8 (int8) or 4 (int4)
  for (int64_t b = 0; b < a.nblocks; ++b) {
    int32_t sum;
    quantize_block_avx2(xr + b * kBlock, qb + b * kBlock, db + b, &sum);
    if (lpb == 8) {
      _mm256_storeu_ps(dx + b * 8, _mm256_set1_ps(db[b]));
      _mm256_storeu_si256(reinterpret_cast<__m256i*>(corr + b * 8), _mm256_setr_epi32(-offset * sum, 0, 0, 0, 0, 0, 0, 0));
    } else {
      _mm_storeu_ps(dx + b * 4, _mm_set1_ps(db[b]));
      _mm_storeu_si128(reinterpret_cast<__m128i*>(corr + b * 4), _mm_setr_epi32(-offset * sum, 0, 0, 0));
    }
  }
  if (chunk) split_even_odd_avx2(qnat, q, a.Kpad, chunk);
}
#endif  // GLMRT_X86

void quantize_row_scalar(const void* x, DType xt, int64_t K, const Acts& a, int64_t m, float* xr) {
  for (int64_t k = 0; k < K; ++k) xr[k] = load_as_f32(x, m * K + k, xt);
  for (int64_t k = K; k < a.Kpad; ++k) xr[k] = 0.f;
  int32_t sum;
  for (int64_t b = 0; b < a.nblocks; ++b)
    quantize_block_scalar(xr + b * kBlock, a.q + m * a.Kpad + b * kBlock, a.dblock + m * a.nblocks + b, &sum);
}

// Quantizes M rows of x into `a`, laid out for the kernel of `isa`.
void quantize_activations(const void* x, DType xt, int64_t M, int64_t K, Isa isa, QuantFormat fmt, Scratch& mem,
                          Acts& a) {
  a.M = M;
  a.K = K;
  a.Kpad = (K + kKAlign - 1) / kKAlign * kKAlign;
  a.nblocks = a.Kpad / kBlock;
  a.lanes = fmt == QuantFormat::Int4 ? a.Kpad / 8 : a.Kpad / 4;
  // int4 on SIMD: even/odd split per chunk of 32 (AVX2) or 64 (AVX-512) weight bytes.
  const int64_t chunk = (isa == Isa::Scalar || fmt == QuantFormat::Int8) ? 0 : (isa == Isa::Avx2 ? 32 : 64);
  // Offset that makes the weights unsigned in the SIMD kernels (see the top of the file).
  const int32_t offset = fmt == QuantFormat::Int4 ? 8 : (isa == Isa::Avx512Vnni ? 128 : 0);

  auto align64 = [](size_t v) { return (v + 63) / 64 * 64; };
  const size_t q_bytes = align64(M * a.Kpad), d_bytes = align64(M * a.nblocks * 4), l_bytes = align64(M * a.lanes * 4);
  const size_t xr_bytes = align64((a.Kpad + kBlock) * 4), qn_bytes = align64(a.Kpad + kBlock);
  char* base = static_cast<char*>(mem.get(q_bytes + d_bytes + 2 * l_bytes + xr_bytes + qn_bytes));
  a.q = reinterpret_cast<int8_t*>(base);
  a.dblock = reinterpret_cast<float*>(base + q_bytes);
  a.dx = reinterpret_cast<float*>(base + q_bytes + d_bytes);
  a.corr = reinterpret_cast<int32_t*>(base + q_bytes + d_bytes + l_bytes);
  float* xr = reinterpret_cast<float*>(base + q_bytes + d_bytes + 2 * l_bytes);  // single-thread row buffers
  int8_t* qnat = reinterpret_cast<int8_t*>(base + q_bytes + d_bytes + 2 * l_bytes + xr_bytes);
  if (a.nblocks == 0) return;

  auto one_row = [&](int64_t m, float* row, int8_t* natural) {
#ifdef GLMRT_X86
    if (isa != Isa::Scalar) return quantize_row_avx2(x, xt, K, a, m, chunk, offset, row, natural);
#endif
    (void)natural;
    quantize_row_scalar(x, xt, K, a, m, row);
  };
  if (M == 1 || M * K < (1 << 16)) {
    for (int64_t m = 0; m < M; ++m) one_row(m, xr, qnat);
    return;
  }
#pragma omp parallel
  {
    std::vector<float> row(a.Kpad + kBlock);
    std::vector<int8_t> natural(a.Kpad + kBlock);
#pragma omp for schedule(static)
    for (int64_t m = 0; m < M; ++m) one_row(m, row.data(), natural.data());
  }
}

// ---------------------------------------------------------------------------------------------
struct Problem {
  QuantFormat fmt;
  const uint8_t* w;
  int64_t row_bytes;
  const void* scale;
  DType scale_type;
  int64_t group_size, groups, log2_group;
  const void* bias;
  DType bias_type;
  void* out;
  DType out_type;
  int64_t M, N, K;
};

// Activation rows processed against each group of weight rows before moving on (sized for L2).
int64_t activation_rows_per_pass(const Acts& a) {
  const int64_t bytes_per_row = a.Kpad + a.lanes * 8 + 64;
  int64_t m = (512 * 1024) / (bytes_per_row ? bytes_per_row : 1);
  return m < 1 ? 1 : m;
}

// ---- portable path ----------------------------------------------------------------------------
inline int int4_at(const uint8_t* row, int64_t k) {
  const int8_t byte = static_cast<int8_t>(row[k >> 1]);
  // even index: high nibble (arithmetic shift); odd index: low nibble, sign-extended.
  return (k & 1) ? static_cast<int8_t>(static_cast<uint8_t>(byte << 4)) >> 4 : byte >> 4;
}

void rows_scalar(const Problem& p, const Acts& a, int64_t n0, int64_t n1) {
  std::vector<float> srow(p.groups + 1);
  const int64_t mstep = activation_rows_per_pass(a);
  for (int64_t mb = 0; mb < p.M; mb += mstep) {
    const int64_t me = mb + mstep < p.M ? mb + mstep : p.M;
    for (int64_t n = n0; n < n1; ++n) {
      const uint8_t* w = p.w + n * p.row_bytes;
      float s = 1.f;
      if (p.group_size == 0)
        s = load_as_f32(p.scale, n, p.scale_type);
      else
        for (int64_t g = 0; g < p.groups; ++g) srow[g] = load_as_f32(p.scale, n * p.groups + g, p.scale_type);
      const float bias = p.bias ? load_as_f32(p.bias, n, p.bias_type) : 0.f;
      for (int64_t m = mb; m < me; ++m) {
        const int8_t* xq = a.q + m * a.Kpad;
        const float* db = a.dblock + m * a.nblocks;
        float y = 0.f;
        for (int64_t k0 = 0; k0 < p.K; k0 += kBlock) {
          const int64_t k1 = k0 + kBlock < p.K ? k0 + kBlock : p.K;
          int32_t t = 0;
          if (p.fmt == QuantFormat::Int8) {
            const int8_t* wr = reinterpret_cast<const int8_t*>(w);
            for (int64_t k = k0; k < k1; ++k) t += static_cast<int32_t>(wr[k]) * xq[k];
          } else {
            for (int64_t k = k0; k < k1; ++k) t += int4_at(w, k) * xq[k];
          }
          float d = db[k0 / kBlock];
          if (p.group_size) d *= srow[k0 / p.group_size];
          y += static_cast<float>(t) * d;
        }
        store_from_f32(p.out, m * p.N + n, y * s + bias, p.out_type);
      }
    }
  }
}

#ifdef GLMRT_X86
// ---- SIMD kernels ------------------------------------------------------------------------------
// A kernel consumes the weights in chunks of kChunkBytes bytes (kChunkK values of K), R weight rows
// at a time, so each activation chunk is loaded once for R rows. load_x() loads the activation
// operands of chunk c; dot() returns the chunk's int32 lanes for one weight row, each lane the exact
// sum over 4 (int8) or 8 (int4) consecutive k of one activation block, offset correction included.

// AVX2 (+FMA, F16C): 256-bit vpmaddubsw + vpmaddwd.
struct Avx2Int4 {
  static constexpr int64_t kChunkBytes = 32, kChunkK = 64;
  struct X { __m256i even, odd, corr; __m256 d; };
  GLMRT_AVX2_FN static GLMRT_INLINE X load_x(const int8_t* xq, const float* dx, const int32_t* corr, int64_t c) {
    return {_mm256_load_si256(reinterpret_cast<const __m256i*>(xq + c * 64)),
            _mm256_load_si256(reinterpret_cast<const __m256i*>(xq + c * 64 + 32)),
            _mm256_load_si256(reinterpret_cast<const __m256i*>(corr + c * 8)), _mm256_load_ps(dx + c * 8)};
  }
  struct U { __m256i hi, lo; };  // one weight chunk unpacked: shared by all the activation rows
  GLMRT_AVX2_FN static GLMRT_INLINE U unpack(__m256i b) {
    b = _mm256_xor_si256(b, _mm256_set1_epi8(static_cast<char>(0x88)));  // each nibble q -> q + 8, unsigned
    const __m256i m0f = _mm256_set1_epi8(0x0f);
    return {_mm256_and_si256(_mm256_srli_epi16(b, 4), m0f), _mm256_and_si256(b, m0f)};
  }
  GLMRT_AVX2_FN static GLMRT_INLINE __m256i dot(const X& x, const U& u) {
    // u8 [0, 15] x s8 [-127, 127]: the int16 pair sums stay far from saturation.
    const __m256i p = _mm256_add_epi16(_mm256_maddubs_epi16(u.hi, x.even), _mm256_maddubs_epi16(u.lo, x.odd));
    return _mm256_add_epi32(_mm256_madd_epi16(p, _mm256_set1_epi16(1)), x.corr);  // corr: -8 * sum(x_q)
  }
};

struct Avx2Int8 {
  static constexpr int64_t kChunkBytes = 32, kChunkK = 32;
  struct X { __m256i q; __m256 d; };
  GLMRT_AVX2_FN static GLMRT_INLINE X load_x(const int8_t* xq, const float* dx, const int32_t*, int64_t c) {
    return {_mm256_load_si256(reinterpret_cast<const __m256i*>(xq + c * 32)), _mm256_load_ps(dx + c * 8)};
  }
  struct U { __m256i w, absw; };
  GLMRT_AVX2_FN static GLMRT_INLINE U unpack(__m256i w) { return {w, _mm256_abs_epi8(w)}; }
  GLMRT_AVX2_FN static GLMRT_INLINE __m256i dot(const X& x, const U& u) {
    // |w| * (x * sign(w)): u8 x s8 pairs stay within int16 (2 * 128 * 127); no offset needed.
    const __m256i p = _mm256_maddubs_epi16(u.absw, _mm256_sign_epi8(x.q, u.w));
    return _mm256_madd_epi16(p, _mm256_set1_epi16(1));
  }
};

// AVX-512 VNNI: 512-bit vpdpbusd, the offset correction is the accumulator's initial value.
struct Avx512Int4 {
  static constexpr int64_t kChunkBytes = 64, kChunkK = 128;
  struct X { __m512i even, odd, corr; __m512 d; };
  GLMRT_AVX512_FN static GLMRT_INLINE X load_x(const int8_t* xq, const float* dx, const int32_t* corr, int64_t c) {
    return {_mm512_load_si512(xq + c * 128), _mm512_load_si512(xq + c * 128 + 64), _mm512_load_si512(corr + c * 16),
            _mm512_load_ps(dx + c * 16)};
  }
  GLMRT_AVX512_FN static GLMRT_INLINE __m512i dot(const X& x, __m512i b) {
    b = _mm512_xor_si512(b, _mm512_set1_epi8(static_cast<char>(0x88)));  // each nibble q -> q + 8, unsigned
    const __m512i m0f = _mm512_set1_epi8(0x0f);
    const __m512i hi = _mm512_and_si512(_mm512_srli_epi16(b, 4), m0f), lo = _mm512_and_si512(b, m0f);
    return _mm512_dpbusd_epi32(_mm512_dpbusd_epi32(x.corr, hi, x.even), lo, x.odd);  // corr: -8 * sum(x_q)
  }
};

struct Avx512Int8 {
  static constexpr int64_t kChunkBytes = 64, kChunkK = 64;
  struct X { __m512i q, corr; __m512 d; };
  GLMRT_AVX512_FN static GLMRT_INLINE X load_x(const int8_t* xq, const float* dx, const int32_t* corr, int64_t c) {
    return {_mm512_load_si512(xq + c * 64), _mm512_load_si512(corr + c * 16), _mm512_load_ps(dx + c * 16)};
  }
  GLMRT_AVX512_FN static GLMRT_INLINE __m512i dot(const X& x, __m512i w) {
    w = _mm512_xor_si512(w, _mm512_set1_epi8(static_cast<char>(0x80)));  // q -> q + 128, unsigned
    return _mm512_dpbusd_epi32(x.corr, w, x.q);                          // corr: -128 * sum(x_q)
  }
};

// y[r] = dot product of weight row w + r * stride (r < R) with one activation row; srows[r] holds
// row r's group scales in fp32 (grouped modes); idx maps lanes to groups (permute mode); pf > 0
// prefetches each row pf bytes ahead.
using DotRowsFn = void (*)(const uint8_t* w, int64_t stride, int64_t nbytes, const int8_t* xq, const float* dx,
                           const int32_t* corr, const float* const* srows, int64_t lg, const int32_t* idx, float* y,
                           int64_t pf);

// AVX2: R weight rows x MB activation rows per call. Each weight chunk is unpacked (and, grouped,
// its scale vector built) once per row and used for the MB activation rows; per (weight row,
// activation row) the operations are exactly those of MB = 1 (8 fp32 lanes, acc += float(t) * d
// per chunk in K order, the hsum below), so a row's result does not depend on M.
template <class Kern, int SM, int R, int MB>
GLMRT_AVX2_FN GLMRT_INLINE void step_avx2(const uint8_t* w, int64_t stride, const int8_t* const* xq,
                                          const float* const* dx, const int32_t* const* corr, int64_t c,
                                          const float* const* srows, int64_t lg, __m256i sidx, __m256* acc) {
#pragma GCC unroll 8
  for (int r = 0; r < R; ++r) {
    const typename Kern::U u = Kern::unpack(_mm256_loadu_si256(reinterpret_cast<const __m256i*>(w + r * stride)));
    __m256 sc = _mm256_setzero_ps();
    if (SM == kGroupPermute) sc = _mm256_permutevar8x32_ps(_mm256_loadu_ps(srows[r] + ((c * Kern::kChunkK) >> lg)), sidx);
    if (SM == kGroupBroadcast) sc = _mm256_set1_ps(srows[r][(c * Kern::kChunkK) >> lg]);
#pragma GCC unroll 4
    for (int m = 0; m < MB; ++m) {
      const typename Kern::X x = Kern::load_x(xq[m], dx[m], corr[m], c);
      const __m256i t = Kern::dot(x, u);
      __m256 d = x.d;
      if (SM != kPerRow) d = _mm256_mul_ps(d, sc);
      acc[r * MB + m] = _mm256_fmadd_ps(_mm256_cvtepi32_ps(t), d, acc[r * MB + m]);
    }
  }
}

// y[m * R + r] = dot product of weight row w + r * stride (r < R) with activation row m (m < MB).
template <class Kern, int SM, int R, int MB>
GLMRT_AVX2_FN void dot_rows_avx2(const uint8_t* w, int64_t stride, int64_t nbytes, const int8_t* const* xq,
                                 const float* const* dx, const int32_t* const* corr, const float* const* srows,
                                 int64_t lg, const int32_t* idx, float* y, int64_t pf) {
  constexpr int64_t CB = Kern::kChunkBytes;
  const __m256i sidx = _mm256_loadu_si256(reinterpret_cast<const __m256i*>(idx));
  __m256 acc[R * MB];
  for (int i = 0; i < R * MB; ++i) acc[i] = _mm256_setzero_ps();
  const int64_t full = nbytes / CB;
  for (int64_t c = 0; c < full; ++c) {
    if (pf)
      for (int r = 0; r < R; ++r) _mm_prefetch(reinterpret_cast<const char*>(w + r * stride + c * CB + pf), _MM_HINT_T0);
    step_avx2<Kern, SM, R, MB>(w + c * CB, stride, xq, dx, corr, c, srows, lg, sidx, acc);
  }
  if (nbytes > full * CB) {  // tail: zero bytes are harmless (x is zero-padded, offsets cancel)
    alignas(32) uint8_t tail[R][CB];
    std::memset(tail, 0, sizeof(tail));
    for (int r = 0; r < R; ++r) std::memcpy(tail[r], w + r * stride + full * CB, nbytes - full * CB);
    step_avx2<Kern, SM, R, MB>(&tail[0][0], CB, xq, dx, corr, full, srows, lg, sidx, acc);
  }
  for (int r = 0; r < R; ++r)
    for (int m = 0; m < MB; ++m) {
      const __m256 v = acc[r * MB + m];
      __m128 s = _mm_add_ps(_mm256_castps256_ps128(v), _mm256_extractf128_ps(v, 1));
      s = _mm_add_ps(s, _mm_movehl_ps(s, s));
      s = _mm_add_ss(s, _mm_movehdup_ps(s));
      y[m * R + r] = _mm_cvtss_f32(s);
    }
}

template <class Kern, int SM, int R, bool Tail>
GLMRT_AVX512_FN GLMRT_INLINE void step_avx512(const uint8_t* w, int64_t stride, const typename Kern::X& x, int64_t c,
                                              const float* const* srows, int64_t lg, __m512i sidx, __mmask64 mask,
                                              __m512* acc) {
#pragma GCC unroll 8
  for (int r = 0; r < R; ++r) {
    const __m512i b = Tail ? _mm512_maskz_loadu_epi8(mask, w + r * stride) : _mm512_loadu_si512(w + r * stride);
    const __m512i t = Kern::dot(x, b);
    __m512 d = x.d;
    if (SM == kGroupPermute)
      d = _mm512_mul_ps(d, _mm512_permutexvar_ps(sidx, _mm512_loadu_ps(srows[r] + ((c * Kern::kChunkK) >> lg))));
    if (SM == kGroupBroadcast) d = _mm512_mul_ps(d, _mm512_set1_ps(srows[r][(c * Kern::kChunkK) >> lg]));
    acc[r] = _mm512_fmadd_ps(_mm512_cvtepi32_ps(t), d, acc[r]);
  }
}

template <class Kern, int SM, int R>
GLMRT_AVX512_FN void dot_rows_avx512(const uint8_t* w, int64_t stride, int64_t nbytes, const int8_t* xq,
                                     const float* dx, const int32_t* corr, const float* const* srows, int64_t lg,
                                     const int32_t* idx, float* y, int64_t pf) {
  constexpr int64_t CB = Kern::kChunkBytes;
  const __m512i sidx = _mm512_loadu_si512(idx);
  __m512 acc[R];
  for (int r = 0; r < R; ++r) acc[r] = _mm512_setzero_ps();
  const int64_t full = nbytes / CB;
  for (int64_t c = 0; c < full; ++c) {
    if (pf)
      for (int r = 0; r < R; ++r) _mm_prefetch(reinterpret_cast<const char*>(w + r * stride + c * CB + pf), _MM_HINT_T0);
    step_avx512<Kern, SM, R, false>(w + c * CB, stride, Kern::load_x(xq, dx, corr, c), c, srows, lg, sidx, 0, acc);
  }
  if (nbytes > full * CB) {  // tail: masked-off bytes read as zero, which is harmless
    const __mmask64 mask = (~0ULL) >> (64 - (nbytes - full * CB));
    step_avx512<Kern, SM, R, true>(w + full * CB, stride, Kern::load_x(xq, dx, corr, full), full, srows, lg, sidx,
                                   mask, acc);
  }
  for (int r = 0; r < R; ++r) y[r] = _mm512_reduce_add_ps(acc[r]);
}

constexpr int kRows = 4;  // weight rows per kernel call

// The rr weight rows from n: their per-row scale (1 in group modes) and bias in s / bias, and in
// group modes each row's group scales widened to fp32 into srows (sstride floats per row).
template <int SM>
GLMRT_AVX2_FN void row_scales(const Problem& p, int64_t n, int rr, float* s, float* bias, float* srows,
                              int64_t sstride) {
  for (int r = 0; r < rr; ++r) {
    s[r] = 1.f;
    if (SM == kPerRow)
      s[r] = load_f32_hw(p.scale, n + r, p.scale_type);
    else
      to_f32_avx2(p.scale, (n + r) * p.groups, p.groups, p.scale_type, srows + r * sstride);
    bias[r] = p.bias ? load_f32_hw(p.bias, n + r, p.bias_type) : 0.f;
  }
}

// The per-row loop, shared by every SIMD kernel (an AVX2 function; the kernels are calls).
template <int SM, class Kern>
GLMRT_AVX2_FN void rows_simd(const Problem& p, const Acts& a, int64_t n0, int64_t n1, DotRowsFn dot_r,
                             DotRowsFn dot_1, int lanes) {
  // Permute mode: a chunk spans gpc groups; idx maps each int32 lane to its group.
  const int64_t gpc = p.group_size ? Kern::kChunkK / p.group_size : 0;
  int32_t idx[16];
  for (int l = 0; l < 16; ++l) idx[l] = (gpc && l < lanes) ? static_cast<int32_t>(l * gpc / lanes) : 0;
  const int64_t sstride = SM == kPerRow ? 0 : p.groups + 32;  // padded: permute mode loads whole vectors
  std::vector<float> srow_buf(kRows * sstride + 1, 0.f);
  const float* srows[kRows];
  for (int r = 0; r < kRows; ++r) srows[r] = srow_buf.data() + r * sstride;
  float s[kRows], bias[kRows], y[kRows];
  const int64_t mstep = activation_rows_per_pass(a);
  // The kRows interleaved row streams are prefetched one row group ahead in software: the hardware
  // stream prefetchers follow them poorly, worst when rows are shorter than a 4 KiB page (measured
  // on a Xeon, 2 threads: INT4 K=4096 from 12-17 to 22-28 GB/s, K=13696 from 22 to 24-26 GB/s).
  const int64_t pf_r = kRows * p.row_bytes;
  for (int64_t mb = 0; mb < p.M; mb += mstep) {
    const int64_t me = mb + mstep < p.M ? mb + mstep : p.M;
    for (int64_t n = n0; n < n1; n += kRows) {
      const int rr = n1 - n < kRows ? static_cast<int>(n1 - n) : kRows;
      row_scales<SM>(p, n, rr, s, bias, srow_buf.data(), sstride);
      const uint8_t* w = p.w + n * p.row_bytes;
      for (int64_t m = mb; m < me; ++m) {
        const int8_t* xq = a.q + m * a.Kpad;
        const float* dx = a.dx + m * a.lanes;
        const int32_t* corr = a.corr + m * a.lanes;
        if (rr == kRows)
          dot_r(w, p.row_bytes, p.row_bytes, xq, dx, corr, srows, p.log2_group, idx, y, m == mb ? pf_r : 0);
        else
          for (int r = 0; r < rr; ++r)
            dot_1(w + r * p.row_bytes, p.row_bytes, p.row_bytes, xq, dx, corr, srows + r, p.log2_group, idx, y + r, 0);
        for (int r = 0; r < rr; ++r) store_f32_hw(p.out, m * p.N + n + r, y[r] * s[r] + bias[r], p.out_type);
      }
    }
  }
}

// The AVX2 per-row loop: as rows_simd, with the activation rows taken kMB at a time against
// kMBRows weight rows (the unpacked weights shared), the rest one at a time against kRows rows.
// Measured on a 2-core Zen 2 (benchmarks/native/run_gemv_bench.sh), M = 4 / 8 against one
// activation row at a time: INT4 x1.03-1.19, INT8 x1.10-1.16; (2, 4) and (4, 4) were no better.
constexpr int kMB = 2, kMBRows = 4;

template <class Kern, int SM>
GLMRT_AVX2_FN void rows_avx2(const Problem& p, const Acts& a, int64_t n0, int64_t n1) {
  const int64_t gpc = p.group_size ? Kern::kChunkK / p.group_size : 0;
  int32_t idx[16];
  for (int l = 0; l < 16; ++l) idx[l] = (gpc && l < 8) ? static_cast<int32_t>(l * gpc / 8) : 0;
  const int64_t sstride = SM == kPerRow ? 0 : p.groups + 32;  // padded: permute mode loads whole vectors
  std::vector<float> srow_buf(kRows * sstride + 1, 0.f);
  const float* srows[kRows];
  for (int r = 0; r < kRows; ++r) srows[r] = srow_buf.data() + r * sstride;
  float s[kRows], bias[kRows], y[kRows * kMB];
  const int64_t mstep = activation_rows_per_pass(a);
  const int64_t pf_r = kRows * p.row_bytes;  // the row streams prefetched one row group ahead (see rows_simd)
  for (int64_t mb = 0; mb < p.M; mb += mstep) {
    const int64_t me = mb + mstep < p.M ? mb + mstep : p.M;
    for (int64_t n = n0; n < n1; n += kRows) {
      const int rr = n1 - n < kRows ? static_cast<int>(n1 - n) : kRows;
      row_scales<SM>(p, n, rr, s, bias, srow_buf.data(), sstride);
      const uint8_t* w = p.w + n * p.row_bytes;
      for (int64_t m = mb; m < me;) {
        const int8_t* xq[kMB];
        const float* dx[kMB];
        const int32_t* corr[kMB];
        const int nm = me - m >= kMB && rr == kRows ? kMB : 1;
        for (int i = 0; i < nm; ++i) {
          xq[i] = a.q + (m + i) * a.Kpad;
          dx[i] = a.dx + (m + i) * a.lanes;
          corr[i] = a.corr + (m + i) * a.lanes;
        }
        const int64_t pf = m == mb ? pf_r : 0;
        if (nm == kMB) {
          for (int r0 = 0; r0 < kRows; r0 += kMBRows)
            dot_rows_avx2<Kern, SM, kMBRows, kMB>(w + r0 * p.row_bytes, p.row_bytes, p.row_bytes, xq, dx, corr,
                                                  srows + r0, p.log2_group, idx, y + r0 * kMB, pf);
          // y + r0 * kMB holds [m][kMBRows] for rows r0..: out row n + r0 + r, activation row m + i
          for (int r0 = 0; r0 < kRows; r0 += kMBRows)
            for (int i = 0; i < kMB; ++i)
              for (int r = 0; r < kMBRows; ++r)
                store_f32_hw(p.out, (m + i) * p.N + n + r0 + r, y[r0 * kMB + i * kMBRows + r] * s[r0 + r] + bias[r0 + r],
                             p.out_type);
        } else if (rr == kRows) {
          dot_rows_avx2<Kern, SM, kRows, 1>(w, p.row_bytes, p.row_bytes, xq, dx, corr, srows, p.log2_group, idx, y,
                                            pf);
          for (int r = 0; r < rr; ++r) store_f32_hw(p.out, m * p.N + n + r, y[r] * s[r] + bias[r], p.out_type);
        } else {
          for (int r = 0; r < rr; ++r)
            dot_rows_avx2<Kern, SM, 1, 1>(w + r * p.row_bytes, p.row_bytes, p.row_bytes, xq, dx, corr, srows + r,
                                          p.log2_group, idx, y + r, 0);
          for (int r = 0; r < rr; ++r) store_f32_hw(p.out, m * p.N + n + r, y[r] * s[r] + bias[r], p.out_type);
        }
        m += nm;
      }
    }
  }
}

template <class Kern, int SM>
void rows_avx512(const Problem& p, const Acts& a, int64_t n0, int64_t n1) {
  rows_simd<SM, Kern>(p, a, n0, n1, &dot_rows_avx512<Kern, SM, kRows>, &dot_rows_avx512<Kern, SM, 1>, 16);
}
#endif  // GLMRT_X86

// ---------------------------------------------------------------------------------------------
Isa detect_isa() {
#ifdef GLMRT_X86
  __builtin_cpu_init();
  const bool avx2 = __builtin_cpu_supports("avx2") && __builtin_cpu_supports("fma") && __builtin_cpu_supports("f16c");
  if (avx2 && __builtin_cpu_supports("avx512f") && __builtin_cpu_supports("avx512bw") &&
      __builtin_cpu_supports("avx512vl") && __builtin_cpu_supports("avx512dq") &&
      __builtin_cpu_supports("avx512vnni"))
    return Isa::Avx512Vnni;
  if (avx2) return Isa::Avx2;
#endif
  return Isa::Scalar;
}

const Isa g_best_isa = detect_isa();
std::atomic<Isa> g_isa{g_best_isa};

const char* isa_name(Isa isa) {
  switch (isa) {
    case Isa::Avx512Vnni: return "avx512vnni";
    case Isa::Avx2: return "avx2";
    default: return "scalar";
  }
}

using RowsFn = void (*)(const Problem&, const Acts&, int64_t, int64_t);

// The rows function for this problem on this path; null -> the portable path.
RowsFn pick_rows(Isa isa, QuantFormat fmt, int64_t group_size) {
#ifdef GLMRT_X86
  auto mode = [group_size](int64_t chunk_k) {
    if (group_size == 0) return kPerRow;
    return chunk_k > group_size ? kGroupPermute : kGroupBroadcast;
  };
  if (isa == Isa::Avx512Vnni) {
    if (fmt == QuantFormat::Int4) {
      switch (mode(Avx512Int4::kChunkK)) {
        case kPerRow: return &rows_avx512<Avx512Int4, kPerRow>;
        case kGroupPermute: return &rows_avx512<Avx512Int4, kGroupPermute>;
        default: return &rows_avx512<Avx512Int4, kGroupBroadcast>;
      }
    }
    switch (mode(Avx512Int8::kChunkK)) {
      case kPerRow: return &rows_avx512<Avx512Int8, kPerRow>;
      case kGroupPermute: return &rows_avx512<Avx512Int8, kGroupPermute>;
      default: return &rows_avx512<Avx512Int8, kGroupBroadcast>;
    }
  }
  if (isa == Isa::Avx2) {
    if (fmt == QuantFormat::Int4) {
      switch (mode(Avx2Int4::kChunkK)) {
        case kPerRow: return &rows_avx2<Avx2Int4, kPerRow>;
        case kGroupPermute: return &rows_avx2<Avx2Int4, kGroupPermute>;
        default: return &rows_avx2<Avx2Int4, kGroupBroadcast>;
      }
    }
    switch (mode(Avx2Int8::kChunkK)) {  // a 32-wide chunk never spans two groups
      case kPerRow: return &rows_avx2<Avx2Int8, kPerRow>;
      default: return &rows_avx2<Avx2Int8, kGroupBroadcast>;
    }
  }
#else
  (void)isa;
  (void)fmt;
  (void)group_size;
#endif
  return nullptr;
}

}  // namespace

void linear_quant(QuantFormat fmt, const void* x, DType x_type, const void* weight, const void* scale,
                  DType scale_type, const void* bias, DType bias_type, void* out, int64_t M, int64_t N, int64_t K,
                  int64_t group_size) {
  if (M < 0 || N < 0 || K < 0) throw std::invalid_argument("linear_quant: negative shape");
  if (group_size < 0 || group_size % kBlock != 0)
    throw std::invalid_argument("linear_quant: group_size must be 0 (one scale per row) or a multiple of 32, got " +
                                std::to_string(group_size));
  if (M == 0 || N == 0) return;

  Problem p;
  p.fmt = fmt;
  p.w = static_cast<const uint8_t*>(weight);
  p.row_bytes = fmt == QuantFormat::Int4 ? (K + 1) / 2 : K;
  p.scale = scale;
  p.scale_type = scale_type;
  p.group_size = group_size;
  p.groups = group_size ? (K + group_size - 1) / group_size : 1;
  p.log2_group = 0;
  while (group_size && (int64_t{1} << p.log2_group) < group_size) ++p.log2_group;
  p.bias = bias;
  p.bias_type = bias_type;
  p.out = out;
  p.out_type = x_type;
  p.M = M;
  p.N = N;
  p.K = K;

  Isa isa = g_isa.load(std::memory_order_relaxed);
  const bool pow2_group = group_size == 0 || (int64_t{1} << p.log2_group) == group_size;
  if (!pow2_group) isa = Isa::Scalar;  // the SIMD paths index groups with shifts
  const RowsFn rows = pick_rows(isa, fmt, group_size);

  thread_local Scratch act_mem;
  Acts a;
  quantize_activations(x, x_type, M, K, isa, fmt, act_mem, a);

  // Output rows are dealt out in tiles of contiguous rows (one sequential weight stream each),
  // dynamically, so a thread that is slowed down (a busy core) does not hold the others back.
  const int64_t tile_bytes = 256 * 1024 / (M < 8 ? 1 : 4);
  int64_t tile = (tile_bytes / (p.row_bytes ? p.row_bytes : 1)) / 4 * 4;
  int64_t threads = 1;
#ifdef GLMRT_HAVE_OPENMP
  threads = omp_get_max_threads();
#endif
  const int64_t balanced = (N + 4 * threads - 1) / (4 * threads);  // at least ~4 tiles per thread
  if (tile > balanced) tile = (balanced + 3) / 4 * 4;
  if (tile < 4) tile = 4;
  const int64_t tiles = (N + tile - 1) / tile;
  const int64_t work = M * N * (K + 64);
  (void)work;
#pragma omp parallel for schedule(dynamic, 1) if (work >= (1 << 15) && tiles > 1)
  for (int64_t t = 0; t < tiles; ++t) {
    const int64_t n0 = t * tile, n1 = n0 + tile < N ? n0 + tile : N;
    if (rows)
      rows(p, a, n0, n1);
    else
      rows_scalar(p, a, n0, n1);
  }
}

const char* quant_linear_isa() { return isa_name(g_isa.load()); }

bool set_quant_linear_isa(const char* name) {
  const std::string s(name);
  Isa want;
  if (s == "avx512vnni")
    want = Isa::Avx512Vnni;
  else if (s == "avx2")
    want = Isa::Avx2;
  else if (s == "scalar")
    want = Isa::Scalar;
  else
    return false;
  if (static_cast<int>(want) > static_cast<int>(g_best_isa)) return false;
  g_isa = want;
  return true;
}

}  // namespace glmrt
