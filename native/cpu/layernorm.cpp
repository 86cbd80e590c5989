// LayerNorm with weight and optional bias over the last dimension (ChatGLM-6B, GLM-130B).
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

GLMRT_MULTIVERSION
void affine(const float* x, float mean, float rstd, const float* w, const float* b, float* y, int64_t n) {
  for (int64_t i = 0; i < n; ++i) y[i] = ((x[i] - mean) * rstd) * w[i] + b[i];
}

}  // namespace

void layer_norm(const void* x, DType x_type, const void* weight, DType w_type, const void* bias, DType b_type,
                void* out, int64_t rows, int64_t cols, float eps) {
  if (cols <= 0 || rows <= 0) return;
  std::vector<float> w(cols), b(cols, 0.f);
  load_row_f32(weight, w_type, w.data(), cols);
  if (bias) load_row_f32(bias, b_type, b.data(), cols);
  const int64_t es = x_type == DType::F32 ? 4 : 2;

  // One row is a few microseconds: threads only pay off for several.
#pragma omp parallel if (rows >= 8)
  {
    std::vector<float> row(cols), y(cols);
#pragma omp for schedule(static)
    for (int64_t r = 0; r < rows; ++r) {
      load_row_f32(static_cast<const char*>(x) + r * cols * es, x_type, row.data(), cols);
      // Two-pass mean and biased variance in fp32 (torch: fp32 moments too).
      const float mean = row_sum(row.data(), cols) / static_cast<float>(cols);
      const float var = row_centered_sum_of_squares(row.data(), mean, cols) / static_cast<float>(cols);
      const float rstd = 1.0f / std::sqrt(std::max(var, 0.0f) + eps);
      // ((x - mean) * rstd) * weight + bias in fp32, rounded once. (torch writes the first product
      // as x * rstd - mean * rstd; both are within an fp32 rounding of each other, and x - mean is
      // exact near the mean, so a constant row normalises to exactly 0.)
      affine(row.data(), mean, rstd, w.data(), b.data(), y.data(), cols);
      store_row_f32(y.data(), x_type, static_cast<char*>(out) + r * cols * es, cols);
    }
  }
}

}  // namespace glmrt
