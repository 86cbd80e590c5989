#include "attention.h"

#include <algorithm>
#include <cmath>
#include <cstring>
#include <limits>
#include <stdexcept>
#include <string>
#include <vector>

#include "rows.h"

#ifdef GLMRT_HAVE_OPENMP
#include <omp.h>
#endif
#if defined(__x86_64__) && (defined(__GNUC__) || defined(__clang__))
#include <immintrin.h>
#define GLMRT_ATTN_X86 1
#define GLMRT_MULTIVERSION __attribute__((target_clones("avx512f", "avx2", "default")))
#else
#define GLMRT_MULTIVERSION
#endif

namespace glmrt {

namespace {

constexpr int kKeys = 16;  // keys per block: one zmm (two ymm) of scores per query row
constexpr int kRows = 8;   // query rows scored together: independent accumulator chains

// scores[r][j] = q_r . k_j for 8 query rows (q: [8][hd]) and a block of 16 keys given transposed
// (kt: [hd][16]), accumulated over d in order in fp32 (with FMA where the CPU has it).
void score_block_scalar(const float* q, int64_t hd, const float* kt, float* out) {
  for (int r = 0; r < kRows; ++r) {
    float a[kKeys] = {};
    for (int64_t d = 0; d < hd; ++d)
      for (int j = 0; j < kKeys; ++j) a[j] += q[r * hd + d] * kt[d * kKeys + j];
    std::memcpy(out + r * kKeys, a, sizeof(a));
  }
}

#ifdef GLMRT_ATTN_X86
__attribute__((target("avx2,fma"))) void score_block_avx2(const float* q, int64_t hd, const float* kt, float* out) {
  for (int r0 = 0; r0 < kRows; r0 += 4) {
    __m256 a[4][2];
    for (int r = 0; r < 4; ++r) a[r][0] = a[r][1] = _mm256_setzero_ps();
    for (int64_t d = 0; d < hd; ++d) {
      const __m256 k0 = _mm256_loadu_ps(kt + d * kKeys), k1 = _mm256_loadu_ps(kt + d * kKeys + 8);
      for (int r = 0; r < 4; ++r) {
        const __m256 qd = _mm256_broadcast_ss(q + (r0 + r) * hd + d);
        a[r][0] = _mm256_fmadd_ps(qd, k0, a[r][0]);
        a[r][1] = _mm256_fmadd_ps(qd, k1, a[r][1]);
      }
    }
    for (int r = 0; r < 4; ++r) {
      _mm256_storeu_ps(out + (r0 + r) * kKeys, a[r][0]);
      _mm256_storeu_ps(out + (r0 + r) * kKeys + 8, a[r][1]);
    }
  }
}

__attribute__((target("avx512f"))) void score_block_avx512(const float* q, int64_t hd, const float* kt, float* out) {
  __m512 a[kRows];
  for (int r = 0; r < kRows; ++r) a[r] = _mm512_setzero_ps();
  for (int64_t d = 0; d < hd; ++d) {
    const __m512 k = _mm512_loadu_ps(kt + d * kKeys);
    for (int r = 0; r < kRows; ++r) a[r] = _mm512_fmadd_ps(_mm512_set1_ps(q[r * hd + d]), k, a[r]);
  }
  for (int r = 0; r < kRows; ++r) _mm512_storeu_ps(out + r * kKeys, a[r]);
}
#endif

using ScoreBlockFn = void (*)(const float*, int64_t, const float*, float*);
const ScoreBlockFn score_block = [] {
#ifdef GLMRT_ATTN_X86
  __builtin_cpu_init();
  if (__builtin_cpu_supports("avx512f")) return &score_block_avx512;
  if (__builtin_cpu_supports("avx2") && __builtin_cpu_supports("fma")) return &score_block_avx2;
#endif
  return &score_block_scalar;
}();

// One query row against one key: for tiles too small to pay for transposing a key block.
GLMRT_MULTIVERSION
float dot(const float* a, const float* b, int64_t n) {
  float acc[16] = {0};
  int64_t i = 0;
  for (; i + 16 <= n; i += 16)
    for (int j = 0; j < 16; ++j) acc[j] += a[i + j] * b[i + j];
  float s = 0.f;
  for (; i < n; ++i) s += a[i] * b[i];
  for (int j = 0; j < 16; ++j) s += acc[j];
  return s;
}

GLMRT_MULTIVERSION
void axpy(float a, const float* x, float* y, int64_t n) {
  for (int64_t i = 0; i < n; ++i) y[i] += a * x[i];
}

GLMRT_MULTIVERSION
float row_max(const float* x, int64_t n) {
  float acc[16];
  for (int j = 0; j < 16; ++j) acc[j] = x[0];
  int64_t i = 0;
  for (; i + 16 <= n; i += 16)
    for (int j = 0; j < 16; ++j) acc[j] = acc[j] > x[i + j] ? acc[j] : x[i + j];
  float m = acc[0];
  for (int j = 1; j < 16; ++j) m = m > acc[j] ? m : acc[j];
  for (; i < n; ++i) m = m > x[i] ? m : x[i];
  return m;
}

// x[i] = exp(x[i] - m), for x - m <= 0 (m is the row's max). exp = 2^n * p(r), r = x - n ln2 in
// [-ln2/2, ln2/2], p the degree-7 Taylor polynomial (relative error < 1e-8 before fp32 rounding);
// arguments below -104, where fp32 underflows, give 0 as expf does; NaN stays NaN. Branch-free,
// so the loop vectorises.
GLMRT_MULTIVERSION
void exp_shifted(float* x, float m, int64_t n) {
  for (int64_t i = 0; i < n; ++i) {
    const float v = x[i] - m;
    float c = v >= -104.0f ? v : -104.0f;  // NaN -> -104 here; restored below
    c = c > 0.0f ? 0.0f : c;
    const float magic = 12582912.0f;  // 1.5 * 2^23: adding it rounds to an integer
    const float nf = (c * 1.44269504088896341f + magic) - magic;
    float r = c - nf * 0.693145751953125f;
    r = r - nf * 1.428606765330187045e-06f;
    float p = 1.0f / 5040.0f;
    p = p * r + 1.0f / 720.0f;
    p = p * r + 1.0f / 120.0f;
    p = p * r + 1.0f / 24.0f;
    p = p * r + 1.0f / 6.0f;
    p = p * r + 0.5f;
    p = p * r + 1.0f;
    p = p * r + 1.0f;
    const int32_t e = static_cast<int32_t>(nf);
    const int32_t e1 = e / 2, e2 = e - e1;  // two factors keep 2^e normal down to 2^-150
    const uint32_t b1 = static_cast<uint32_t>(e1 + 127) << 23, b2 = static_cast<uint32_t>(e2 + 127) << 23;
    float s1, s2;
    std::memcpy(&s1, &b1, 4);
    std::memcpy(&s2, &b2, 4);
    float y = p * s1 * s2;
    y = v < -104.0f ? 0.0f : y;
    x[i] = v != v ? v : y;
  }
}

GLMRT_MULTIVERSION
void scale_row(float* x, float a, int64_t n) {
  for (int64_t i = 0; i < n; ++i) x[i] *= a;
}

float lowest_of(DType t) {
  switch (t) {
    case DType::F32: return std::numeric_limits<float>::lowest();
    case DType::BF16: return bf16_to_f32(0xff7fu);  // torch.finfo(torch.bfloat16).min
    default: return -65504.0f;                       // torch.finfo(torch.float16).min
  }
}

}  // namespace

void attention(const AttentionArgs& a) {
  const int64_t B = a.batch, T = a.q_len, S = a.kv_len, nh = a.num_heads, nkv = a.num_kv_heads, hd = a.head_dim;
  if (B <= 0 || T <= 0 || nh <= 0 || nkv <= 0 || hd <= 0 || S <= 0)
    throw std::invalid_argument("attention: batch, q_len, kv_len, heads and head_dim must be positive");
  if (nh % nkv != 0)
    throw std::invalid_argument("attention: num_heads (" + std::to_string(nh) + ") must be a multiple of num_kv_heads (" +
                                std::to_string(nkv) + ")");
  const DType t = a.dtype;
  const int64_t es = t == DType::F32 ? 4 : 2;
  const int64_t group = nh / nkv;
  // Query rows of one KV head, token-major: row r is token r / group, head kvh * group + r % group,
  // so a tile holds all heads of a few tokens (causal masks then skip whole key blocks per tile).
  const int64_t rows_per_kv = group * T;
  const int64_t total_rows = B * nkv * rows_per_kv;
  // Threads only where there is enough work to hide the fork/join (a short decode step runs on one).
  const double work = static_cast<double>(total_rows) * static_cast<double>(S) * static_cast<double>(hd);
  int threads = 1;
#ifdef GLMRT_HAVE_OPENMP
  if (work >= 4.0e6) threads = omp_get_max_threads();
#endif
  int64_t tile = (total_rows + 2 * threads - 1) / (2 * threads);
  tile = std::max<int64_t>(1, std::min<int64_t>({tile, 32, rows_per_kv}));
  const int64_t tiles_per_kv = (rows_per_kv + tile - 1) / tile;
  const int64_t tasks = B * nkv * tiles_per_kv;
  const int64_t tile_pad = (tile + kRows - 1) / kRows * kRows;
  const int64_t blocks = (S + kKeys - 1) / kKeys;

  // Standard scaling (SDPA's flash kernels in the original code): fp32 scores, the unnormalised
  // exps rounded to the model dtype, divided by their fp32 sum. Layer-scaled (GLM-130B, ChatGLM-6B):
  // scores and probabilities rounded to the model dtype.
  const float fill = a.layer_scaled ? round_to(-10000.0f, t) : std::numeric_limits<float>::lowest();
  if (a.kv_lens)
    for (int64_t b = 0; b < B; ++b)
      if (a.kv_lens[b] < 1)
        throw std::invalid_argument("attention: kv_lens[" + std::to_string(b) + "] = " + std::to_string(a.kv_lens[b]) +
                                    "; every row must read at least one key");

#pragma omp parallel num_threads(threads) if (threads > 1 && tasks > 1)
  {
    std::vector<float> qf(tile_pad * hd, 0.f), scores(tile * blocks * kKeys), kraw(kKeys * hd), kt(hd * kKeys),
        acc(tile * hd), vrow(hd), block(kRows * kKeys);
    std::vector<uint8_t> ok(tile * kKeys);
#pragma omp for schedule(dynamic, 1)
    for (int64_t task = 0; task < tasks; ++task) {
      const int64_t b = task / (nkv * tiles_per_kv);
      const int64_t kvh = (task / tiles_per_kv) % nkv;
      const int64_t r0 = (task % tiles_per_kv) * tile;
      const int64_t nr = std::min(tile, rows_per_kv - r0);
      const int64_t ld = blocks * kKeys;  // scores row stride
      // The tile's query rows in fp32 (layer-scaled: divided and rounded first, as the reference).
      std::fill(qf.begin(), qf.end(), 0.f);
      for (int64_t i = 0; i < nr; ++i) {
        const int64_t r = r0 + i, tok = r / group, h = kvh * group + r % group;
        float* qrow = qf.data() + i * hd;
        load_row_f32(static_cast<const char*>(a.q) + (b * a.q_stride_b + tok * a.q_stride_t + h * a.q_stride_h) * es,
                     t, qrow, hd);
        if (a.layer_scaled) {
          for (int64_t d = 0; d < hd; ++d) qrow[d] /= a.q_divisor;
          round_row(qrow, t, hd);
        }
      }
      // Keys this row reads: all S, or its own count (kv_lens) so that other rows' lengths cannot
      // change its arithmetic.
      const int64_t Sb = a.kv_lens ? std::min<int64_t>(S, a.kv_lens[b]) : S;
      const int64_t blocks_b = (Sb + kKeys - 1) / kKeys;
      const char* kbase = static_cast<const char*>(a.k) + (b * a.k_stride_b + kvh * a.k_stride_h) * es;
      const char* vbase = static_cast<const char*>(a.v) + (b * a.v_stride_b + kvh * a.v_stride_h) * es;
      const uint8_t* mbase = a.allowed + b * a.m_stride_b;

      // Scores, a block of 16 keys at a time; fully masked blocks are not computed.
      for (int64_t blk = 0; blk < blocks_b; ++blk) {
        const int64_t s0 = blk * kKeys, nk = std::min<int64_t>(kKeys, Sb - s0);
        bool any = false;
        for (int64_t i = 0; i < nr; ++i) {
          const uint8_t* m = mbase + ((r0 + i) / group) * a.m_stride_t;
          for (int64_t j = 0; j < kKeys; ++j) {
            const uint8_t allowed = j < nk && m[(s0 + j) * a.m_stride_s] != 0;
            ok[i * kKeys + j] = allowed;
            any |= allowed != 0;
          }
        }
        if (!any) {
          for (int64_t i = 0; i < nr; ++i) std::fill_n(scores.data() + i * ld + s0, kKeys, fill);
          continue;
        }
        for (int64_t j = 0; j < nk; ++j) load_row_f32(kbase + (s0 + j) * a.k_stride_s * es, t, kraw.data() + j * hd, hd);
        for (int64_t j = nk; j < kKeys; ++j) std::fill_n(kraw.data() + j * hd, hd, 0.f);
        // Few rows (MHA decode): plain dot products. With kv_lens the choice depends on the head
        // grouping only, so a row takes the same path whatever batch it is in.
        const bool direct = (a.kv_lens ? std::min<int64_t>(32, rows_per_kv) : nr) < kRows / 2;
        if (!direct)
          for (int64_t d = 0; d < hd; ++d)
            for (int64_t j = 0; j < kKeys; ++j) kt[d * kKeys + j] = kraw[j * hd + d];
        for (int64_t i0 = 0; i0 < nr; i0 += kRows) {
          if (direct) {
            for (int64_t i = i0; i < nr; ++i)
              for (int64_t j = 0; j < kKeys; ++j)
                block[(i - i0) * kKeys + j] = ok[i * kKeys + j] ? dot(qf.data() + i * hd, kraw.data() + j * hd, hd) : 0.f;
          } else {
            score_block(qf.data() + i0 * hd, hd, kt.data(), block.data());
          }
          for (int64_t i = i0; i < std::min<int64_t>(i0 + kRows, nr); ++i) {
            float* out = scores.data() + i * ld + s0;
            const float* raw = block.data() + (i - i0) * kKeys;
            for (int64_t j = 0; j < kKeys; ++j) {
              if (!ok[i * kKeys + j]) { out[j] = fill; continue; }
              // layer-scaled: q . k rounded to the model dtype; standard: fp32 q . k * 1/sqrt(d)
              out[j] = a.layer_scaled ? round_to(raw[j], t) : raw[j] * a.scale;
            }
          }
        }
      }
      // fp32 softmax per row. Layer-scaled: the probabilities rounded to the storage dtype;
      // standard: exp(x - max) rounded, then times 1 / (fp32 sum of the exps).
      for (int64_t i = 0; i < nr; ++i) {
        float* row = scores.data() + i * ld;
        if (a.layer_scaled) scale_row(row, a.coeff, Sb);
        const float m = row_max(row, Sb);
        exp_shifted(row, m, Sb);
        const float sum = row_sum(row, Sb);
        if (a.layer_scaled) {
          scale_row(row, 1.0f / sum, Sb);
          round_row(row, t, Sb);
        } else {
          round_row(row, t, Sb);
          scale_row(row, 1.0f / sum, Sb);
        }
      }
      // out = P @ V, fp32 accumulation; keys whose probability rounded to 0 add nothing.
      std::fill(acc.begin(), acc.begin() + nr * hd, 0.f);
      for (int64_t s = 0; s < Sb; ++s) {
        bool any = false;
        for (int64_t i = 0; i < nr; ++i) any |= scores[i * ld + s] != 0.f;
        if (!any) continue;
        load_row_f32(vbase + s * a.v_stride_s * es, t, vrow.data(), hd);
        for (int64_t i = 0; i < nr; ++i) {
          const float p = scores[i * ld + s];
          if (p != 0.f) axpy(p, vrow.data(), acc.data() + i * hd, hd);
        }
      }
      for (int64_t i = 0; i < nr; ++i) {
        const int64_t r = r0 + i, tok = r / group, h = kvh * group + r % group;
        store_row_f32(acc.data() + i * hd, t, static_cast<char*>(a.out) + ((b * T + tok) * nh + h) * hd * es, hd);
      }
    }
  }
}

}  // namespace glmrt
