// Fused residual add + RMSNorm / LayerNorm (see norm.h): one sweep per row over an L1-resident
// buffer instead of two full passes over memory (the add's output written and read back).
#include <algorithm>
#include <cmath>
#include <vector>

#include "norm.h"
#include "rows.h"

#if defined(__x86_64__) && (defined(__GNUC__) || defined(__clang__))
#define GLMRT_MULTIVERSION __attribute__((target_clones("avx512f", "avx2", "default")))
#else
#define GLMRT_MULTIVERSION
#endif

namespace glmrt {

namespace {

// Each loop is its own function, so the product residual * alpha is rounded (stored) before the
// add and can never be contracted into one fused multiply-add: torch rounds it in between.
GLMRT_MULTIVERSION
void scale_in_place(float* x, float alpha, int64_t n) {
  for (int64_t i = 0; i < n; ++i) x[i] = x[i] * alpha;
}

GLMRT_MULTIVERSION
void add_in_place(float* x, const float* y, int64_t n) {
  for (int64_t i = 0; i < n; ++i) x[i] = x[i] + y[i];
}

GLMRT_MULTIVERSION
void rms_scale(const float* x, const float* w, float r, float* y, int64_t n) {
  for (int64_t i = 0; i < n; ++i) y[i] = (x[i] * r) * w[i];
}

GLMRT_MULTIVERSION
void ln_affine(const float* x, float mean, float rstd, const float* w, const float* b, float* y, int64_t n) {
  for (int64_t i = 0; i < n; ++i) y[i] = ((x[i] - mean) * rstd) * w[i] + b[i];
}

}  // namespace

void add_norm(const void* residual, const void* branch, DType x_type, float alpha, const void* weight,
              DType w_type, const void* bias, DType b_type, void* h_out, void* out, int64_t rows, int64_t cols,
              float eps, AddNormKind kind, bool round_before_weight) {
  if (rows <= 0 || cols <= 0) return;
  std::vector<float> w(cols), b(cols, 0.f);
  load_row_f32(weight, w_type, w.data(), cols);
  if (bias) load_row_f32(bias, b_type, b.data(), cols);
  const int64_t es = x_type == DType::F32 ? 4 : 2;
  // RMSNorm rounding before the weight: the product is in the promoted dtype of x and weight.
  const DType product_type = (x_type == DType::F32 || w_type == DType::F32) ? DType::F32 : x_type;
  const bool scaled = alpha != 1.0f;

  // One row is a few microseconds: threads only pay off for several.
#pragma omp parallel if (rows >= 8)
  {
    std::vector<float> h(cols), t(cols), y(cols);
#pragma omp for schedule(static)
    for (int64_t r = 0; r < rows; ++r) {
      const int64_t offset = r * cols * es;
      // h = branch + residual [* alpha], each step rounded to x_type like torch's ops.
      load_row_f32(static_cast<const char*>(residual) + offset, x_type, h.data(), cols);
      load_row_f32(static_cast<const char*>(branch) + offset, x_type, t.data(), cols);
      if (scaled) {
        scale_in_place(h.data(), alpha, cols);
        round_row(h.data(), x_type, cols);
      }
      add_in_place(h.data(), t.data(), cols);
      round_row(h.data(), x_type, cols);
      if (h_out) store_row_f32(h.data(), x_type, static_cast<char*>(h_out) + offset, cols);

      if (kind == AddNormKind::RMS) {
        const float mean = row_centered_sum_of_squares(h.data(), 0.0f, cols) / static_cast<float>(cols);
        const float inv = 1.0f / std::sqrt(mean + eps);
        if (!round_before_weight) {
          rms_scale(h.data(), w.data(), inv, y.data(), cols);  // fp32 product, rounded once below
        } else {
          for (int64_t c = 0; c < cols; ++c)
            y[c] = round_to(w[c] * round_to(h[c] * inv, x_type), product_type);
        }
      } else {
        // Two-pass mean and biased variance in fp32, as torch's layer_norm.
        const float mean = row_sum(h.data(), cols) / static_cast<float>(cols);
        const float var = row_centered_sum_of_squares(h.data(), mean, cols) / static_cast<float>(cols);
        const float rstd = 1.0f / std::sqrt(std::max(var, 0.0f) + eps);
        ln_affine(h.data(), mean, rstd, w.data(), b.data(), y.data(), cols);
      }
      store_row_f32(y.data(), x_type, static_cast<char*>(out) + offset, cols);
    }
  }
}

}  // namespace glmrt
