#include "gemm_tiled.h"

#include "convert.h"

#include <algorithm>
#include <cstring>
#include <stdexcept>
#include <string>

#ifdef GLMRT_HAVE_OPENMP
#include <omp.h>
#endif

namespace glmrt::sunway {

namespace {

// The fp32 inner loop is compiled for several instruction sets and picked at load time, so one
// build runs on any x86-64 (the SW26010-Pro's own 512-bit vectors are what the 16 lanes mirror).
#if defined(__x86_64__) && (defined(__GNUC__) || defined(__clang__))
#define GLMRT_MULTIVERSION __attribute__((target_clones("avx512f", "avx2", "default")))
#else
#define GLMRT_MULTIVERSION
#endif

// C[m, n] += sum_k A[m, k] * B[n, k] for m < rows_m, n < cols_n (a multiple of 4), k < kp (a
// multiple of kLanes). A, B rows are kp long, C rows ldc long. Four weight rows at a time share
// each activation load; sixteen partial sums per row keep the loop vectorisable without
// reassociating fp32 additions behind the compiler's back.
GLMRT_MULTIVERSION
void tile_multiply(const float* A, const float* B, float* C, int64_t rows_m, int64_t cols_n, int64_t kp,
                   int64_t ldc) {
  for (int64_t m = 0; m < rows_m; ++m) {
    const float* a = A + m * kp;
    for (int64_t n = 0; n < cols_n; n += 4) {
      const float* b0 = B + (n + 0) * kp;
      const float* b1 = B + (n + 1) * kp;
      const float* b2 = B + (n + 2) * kp;
      const float* b3 = B + (n + 3) * kp;
      float acc0[kLanes] = {}, acc1[kLanes] = {}, acc2[kLanes] = {}, acc3[kLanes] = {};
      for (int64_t k = 0; k < kp; k += kLanes) {
        for (int j = 0; j < kLanes; ++j) {
          const float av = a[k + j];
          acc0[j] += av * b0[k + j];
          acc1[j] += av * b1[k + j];
          acc2[j] += av * b2[k + j];
          acc3[j] += av * b3[k + j];
        }
      }
      float s0 = 0.f, s1 = 0.f, s2 = 0.f, s3 = 0.f;
      for (int j = 0; j < kLanes; ++j) {
        s0 += acc0[j];
        s1 += acc1[j];
        s2 += acc2[j];
        s3 += acc3[j];
      }
      float* c = C + m * ldc + n;
      c[0] += s0;
      c[1] += s1;
      c[2] += s2;
      c[3] += s3;
    }
  }
}

// "DMA get" of `rows` rows of `cols` elements (row stride src_ld elements, starting at element
// col0) into fp32 rows of dst_ld floats, zero-padding each row to dst_ld. fp32 goes straight in;
// 16-bit data arrives kStageRows rows at a time in the stage buffer and is widened from there.
void get_rows_f32(const void* src, DType type, int64_t src_ld, int64_t row0, int64_t col0, int64_t rows,
                  int64_t cols, float* dst, int64_t dst_ld, void* stage) {
  for (int64_t r0 = 0; r0 < rows; r0 += kStageRows) {
    const int64_t nr = std::min(kStageRows, rows - r0);
    if (type != DType::F32) {
      for (int64_t r = 0; r < nr; ++r)
        std::memcpy(static_cast<uint16_t*>(stage) + r * cols,
                    static_cast<const uint16_t*>(src) + (row0 + r0 + r) * src_ld + col0, cols * sizeof(uint16_t));
    }
    for (int64_t r = 0; r < nr; ++r) {
      float* d = dst + (r0 + r) * dst_ld;
      if (type == DType::F32) {
        std::memcpy(d, static_cast<const float*>(src) + (row0 + r0 + r) * src_ld + col0, cols * sizeof(float));
      } else {
        widen(static_cast<const uint16_t*>(stage) + r * cols, type, d, cols);
      }
      std::fill(d + cols, d + dst_ld, 0.f);
    }
  }
}

GLMRT_MULTIVERSION
void unpack_int8(const int8_t* q, float* d, int64_t n) {
  for (int64_t i = 0; i < n; ++i) d[i] = static_cast<float>(q[i]);
}

// Even index from the high nibble (an arithmetic shift sign-extends it), odd index from the low
// nibble (moved up, then shifted back down to sign-extend).
GLMRT_MULTIVERSION
void unpack_int4(const int8_t* q, float* d, int64_t n) {
  const int64_t pairs = n / 2;
  for (int64_t j = 0; j < pairs; ++j) {
    const int8_t byte = q[j];
    d[2 * j] = static_cast<float>(byte >> 4);
    d[2 * j + 1] = static_cast<float>(static_cast<int8_t>(static_cast<uint8_t>(byte) << 4) >> 4);
  }
  if (n % 2) d[n - 1] = static_cast<float>(q[pairs] >> 4);
}

GLMRT_MULTIVERSION
void scale_by(float* d, int64_t n, float s) {
  for (int64_t i = 0; i < n; ++i) d[i] *= s;
}

// The quantized weights of rows [n0, n0 + rows) and columns [k0, k0 + cols) into fp32 B rows,
// dequantized with the slice's scales (scales[r * scales_per_row + g], g the group within the
// slice) and rounded to the activation dtype, as the reference dequantization does.
void get_quant_rows(WeightFormat format, const int8_t* w, int64_t K, int64_t n0, int64_t k0, int64_t rows,
                    int64_t cols, const float* scales, int64_t scales_per_row, int64_t group_size, DType x_type,
                    float* dst, int64_t dst_ld, int8_t* stage) {
  const bool int8 = format == WeightFormat::Int8;
  const int64_t row_bytes = int8 ? K : ceil_div(K, 2);
  const int64_t byte0 = int8 ? k0 : k0 / 2;  // k0 is a multiple of tile_k, so even
  const int64_t nbytes = int8 ? cols : ceil_div(cols, 2);
  for (int64_t r0 = 0; r0 < rows; r0 += kStageRows) {
    const int64_t nr = std::min(kStageRows, rows - r0);
    for (int64_t r = 0; r < nr; ++r)
      std::memcpy(stage + r * nbytes, w + (n0 + r0 + r) * row_bytes + byte0, nbytes);
    for (int64_t r = 0; r < nr; ++r) {
      float* d = dst + (r0 + r) * dst_ld;
      const float* s = scales + (r0 + r) * scales_per_row;
      if (int8) {
        unpack_int8(stage + r * nbytes, d, cols);
      } else {
        unpack_int4(stage + r * nbytes, d, cols);
      }
      if (group_size == 0) {
        scale_by(d, cols, s[0]);
      } else {
        for (int64_t c0 = 0, g = 0; c0 < cols; c0 += group_size, ++g)
          scale_by(d + c0, std::min(group_size, cols - c0), s[g]);
      }
      round_in_place(d, x_type, cols);
      std::fill(d + cols, d + dst_ld, 0.f);
    }
  }
}

}  // namespace

int host_threads() {
#ifdef GLMRT_HAVE_OPENMP
  // OpenMP's thread count (OMP_NUM_THREADS), never more than the host's cores or the 64 workers.
  return std::max(1, std::min({kLogicalWorkers, omp_get_max_threads(), omp_get_num_procs()}));
#else
  return 1;
#endif
}

bool supported_group_size(int64_t group_size) {
  return group_size == 0 || (group_size > 0 && group_size % kMinGroup == 0 && kTileK % group_size == 0);
}

LinearPlan plan_linear(WeightFormat format, int64_t M, int64_t N, int64_t K, int64_t group_size) {
  if (M <= 0 || N <= 0 || K <= 0) throw std::invalid_argument("linear: M, N and K must be positive");
  if (format == WeightFormat::Float) group_size = 0;
  if (!supported_group_size(group_size))
    throw std::invalid_argument("linear: group_size " + std::to_string(group_size) +
                                " is not 0 or a multiple of 32 that divides " + std::to_string(kTileK));
  LinearPlan p;
  p.format = format;
  p.M = M;
  p.N = N;
  p.K = K;
  p.group_size = group_size;
  p.tile_m = std::min(M, kTileM);
  p.tile_k = std::min(round_up(K, kLanes), kTileK);
  p.m_blocks = ceil_div(M, p.tile_m);
  // Narrow the weight tiles until there are tiles for all 64 workers (or the minimum width).
  const int64_t want_n_blocks = ceil_div(kLogicalWorkers, p.m_blocks);
  p.tile_n = std::clamp(round_up(ceil_div(N, want_n_blocks), kTileNMin), kTileNMin, kTileNMax);
  p.n_blocks = ceil_div(N, p.tile_n);
  p.k_blocks = ceil_div(K, p.tile_k);
  // tile_k is kTileK (a multiple of the group) unless one slice covers all of K.
  p.scales_per_row = format == WeightFormat::Float ? 0 : (group_size == 0 ? 1 : ceil_div(p.tile_k, group_size));
  const int64_t kp = round_up(p.tile_k, kLanes);
  p.a_bytes = ldm_alloc(4 * p.tile_m * kp);
  p.b_bytes = ldm_alloc(4 * round_up(p.tile_n, 4) * kp);
  p.c_bytes = ldm_alloc(4 * p.tile_m * round_up(p.tile_n, 4));
  p.stage_bytes = ldm_alloc(4 * kStageRows * p.tile_k);  // the widest element any stage holds
  p.scale_bytes = p.scales_per_row ? ldm_alloc(4 * p.tile_n * p.scales_per_row) : 0;
  p.bias_bytes = ldm_alloc(4 * p.tile_n);
  if (!p.fits()) throw std::logic_error("linear: tile plan exceeds the LDM budget (a bug in plan_linear)");
  return p;
}

void linear_tiled(const LinearPlan& p, const void* x, DType x_type, const void* w, DType w_type,
                  const void* scale, DType scale_type, const void* bias, DType bias_type, void* out) {
  if (!p.fits()) throw std::logic_error("linear: tile plan exceeds the LDM budget");
  const bool quantized = p.format != WeightFormat::Float;
  if (quantized && scale == nullptr) throw std::invalid_argument("linear: quantized weights need scales");
  const int64_t kp_max = round_up(p.tile_k, kLanes);
  const int64_t ldc = round_up(p.tile_n, 4);
  const int64_t groups = p.group_size == 0 ? 1 : ceil_div(p.K, p.group_size);

  run_logical_workers([&](int worker, LocalStore& ldm) {
    float* A = ldm.take<float>(p.tile_m * kp_max);
    float* B = ldm.take<float>(ldc * kp_max);
    float* C = ldm.take<float>(p.tile_m * ldc);
    void* stage = ldm.take<std::byte>(4 * kStageRows * p.tile_k);
    float* S = p.scales_per_row ? ldm.take<float>(p.tile_n * p.scales_per_row) : nullptr;
    float* bias_tile = ldm.take<float>(p.tile_n);

    for (int64_t t = worker; t < p.tiles(); t += kLogicalWorkers) {
      const int64_t mb = t % p.m_blocks, nb = t / p.m_blocks;
      const int64_t m0 = mb * p.tile_m, n0 = nb * p.tile_n;
      const int64_t mt = std::min(p.tile_m, p.M - m0), nt = std::min(p.tile_n, p.N - n0);
      const int64_t nt4 = round_up(nt, 4);
      std::fill(C, C + p.tile_m * ldc, 0.f);
      if (quantized && p.group_size == 0) {  // one scale per row, for every K slice
        for (int64_t r = 0; r < nt; ++r) S[r] = load_as_f32(scale, n0 + r, scale_type);
      }
      for (int64_t kb = 0; kb < p.k_blocks; ++kb) {
        const int64_t k0 = kb * p.tile_k;
        const int64_t kt = std::min(p.tile_k, p.K - k0);
        const int64_t kp = round_up(kt, kLanes);
        get_rows_f32(x, x_type, p.K, m0, k0, mt, kt, A, kp, stage);
        if (!quantized) {
          get_rows_f32(w, w_type, p.K, n0, k0, nt, kt, B, kp, stage);
        } else {
          if (p.group_size != 0) {
            const int64_t g0 = k0 / p.group_size, ng = ceil_div(kt, p.group_size);
            for (int64_t r = 0; r < nt; ++r)
              for (int64_t g = 0; g < ng; ++g)
                S[r * p.scales_per_row + g] = load_as_f32(scale, (n0 + r) * groups + g0 + g, scale_type);
          }
          get_quant_rows(p.format, static_cast<const int8_t*>(w), p.K, n0, k0, nt, kt, S,
                         p.group_size == 0 ? 1 : p.scales_per_row, p.group_size, x_type, B, kp,
                         static_cast<int8_t*>(stage));
        }
        std::fill(B + nt * kp, B + nt4 * kp, 0.f);  // padding rows of the last, narrower tile
        tile_multiply(A, B, C, mt, nt4, kp, ldc);
      }
      // Bias in fp32, one rounding to the output dtype, then the "DMA put" of the tile's rows.
      for (int64_t r = 0; r < nt; ++r) bias_tile[r] = bias ? load_as_f32(bias, n0 + r, bias_type) : 0.f;
      for (int64_t m = 0; m < mt; ++m) {
        float* c = C + m * ldc;
        for (int64_t n = 0; n < nt; ++n) c[n] += bias_tile[n];
        const int64_t dst = (m0 + m) * p.N + n0;
        if (x_type == DType::F32) {
          std::memcpy(static_cast<float*>(out) + dst, c, nt * sizeof(float));
        } else {
          uint16_t* s = static_cast<uint16_t*>(stage);
          narrow(c, x_type, s, nt);
          std::memcpy(static_cast<uint16_t*>(out) + dst, s, nt * sizeof(uint16_t));
        }
      }
    }
  });
}

const char* simd_level() {
#if defined(__x86_64__) && (defined(__GNUC__) || defined(__clang__))
  __builtin_cpu_init();
  if (__builtin_cpu_supports("avx512f")) return "avx512f";
  if (__builtin_cpu_supports("avx2")) return "avx2";
#endif
  return "scalar";
}

}  // namespace glmrt::sunway
