#include "norm.h"

#include <cmath>
#include <vector>

namespace glmrt {

namespace {

// The fp32 inner loops are compiled for several instruction sets; the loader picks one at run
// time (GCC/Clang function multi-versioning), so the same binary runs on any x86-64.
#if defined(__x86_64__) && (defined(__GNUC__) || defined(__clang__))
#define GLMRT_MULTIVERSION __attribute__((target_clones("avx512f", "avx2", "default")))
#else
#define GLMRT_MULTIVERSION
#endif

GLMRT_MULTIVERSION
float sum_of_squares(const float* x, int64_t n) {
  // Eight partial sums so the compiler can vectorise without -ffast-math.
  float acc[8] = {0, 0, 0, 0, 0, 0, 0, 0};
  int64_t i = 0;
  for (; i + 8 <= n; i += 8)
    for (int j = 0; j < 8; ++j) acc[j] += x[i + j] * x[i + j];
  float s = 0.f;
  for (int j = 0; j < 8; ++j) s += acc[j];
  for (; i < n; ++i) s += x[i] * x[i];
  return s;
}

GLMRT_MULTIVERSION
void scale_by(const float* x, const float* w, float r, float* y, int64_t n) {
  for (int64_t i = 0; i < n; ++i) y[i] = (x[i] * r) * w[i];
}

}  // namespace

void rms_norm(const void* x, DType x_type, const void* weight, DType w_type, void* out,
              int64_t rows, int64_t cols, float eps, bool round_before_weight) {
  std::vector<float> w(cols);
  for (int64_t c = 0; c < cols; ++c) w[c] = load_as_f32(weight, c, w_type);
  // The product weight * normalized is computed in the promoted dtype of the two operands.
  const bool f32_product = (x_type == DType::F32 || w_type == DType::F32);
  const DType product_type = f32_product ? DType::F32 : x_type;

#pragma omp parallel
  {
    std::vector<float> row(cols), y(cols);
#pragma omp for schedule(static)
    for (int64_t r = 0; r < rows; ++r) {
      const int64_t base = r * cols;
      if (x_type == DType::F32) {
        const float* xr = static_cast<const float*>(x) + base;
        for (int64_t c = 0; c < cols; ++c) row[c] = xr[c];
      } else {
        for (int64_t c = 0; c < cols; ++c) row[c] = load_as_f32(x, base + c, x_type);
      }
      const float mean = sum_of_squares(row.data(), cols) / static_cast<float>(cols);
      const float inv = 1.0f / std::sqrt(mean + eps);
      if (!round_before_weight) {
        scale_by(row.data(), w.data(), inv, y.data(), cols);
      } else {
        for (int64_t c = 0; c < cols; ++c)
          y[c] = round_to(w[c] * round_to(row[c] * inv, x_type), product_type);
      }
      for (int64_t c = 0; c < cols; ++c) store_from_f32(out, base + c, y[c], x_type);
    }
  }
}

const char* cpu_simd_level() {
#if defined(__x86_64__) && (defined(__GNUC__) || defined(__clang__))
  __builtin_cpu_init();
  if (__builtin_cpu_supports("avx512f")) return "avx512f";
  if (__builtin_cpu_supports("avx2")) return "avx2";
#endif
  return "scalar";
}

}  // namespace glmrt
