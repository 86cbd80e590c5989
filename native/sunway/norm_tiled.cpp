#include "norm_tiled.h"

#include "convert.h"

#include <algorithm>
#include <cmath>
#include <cstring>
#include <stdexcept>

namespace glmrt::sunway {

namespace {

#if defined(__x86_64__) && (defined(__GNUC__) || defined(__clang__))
#define GLMRT_MULTIVERSION __attribute__((target_clones("avx512f", "avx2", "default")))
#else
#define GLMRT_MULTIVERSION
#endif

GLMRT_MULTIVERSION
float sum_of(const float* x, int64_t n) {
  float acc[kLanes] = {};
  int64_t i = 0;
  for (; i + kLanes <= n; i += kLanes)
    for (int j = 0; j < kLanes; ++j) acc[j] += x[i + j];
  float s = 0.f;
  for (int j = 0; j < kLanes; ++j) s += acc[j];
  for (; i < n; ++i) s += x[i];
  return s;
}

GLMRT_MULTIVERSION
float sum_of_squares(const float* x, float shift, int64_t n) {
  float acc[kLanes] = {};
  int64_t i = 0;
  for (; i + kLanes <= n; i += kLanes)
    for (int j = 0; j < kLanes; ++j) {
      const float d = x[i + j] - shift;
      acc[j] += d * d;
    }
  float s = 0.f;
  for (int j = 0; j < kLanes; ++j) s += acc[j];
  for (; i < n; ++i) s += (x[i] - shift) * (x[i] - shift);
  return s;
}

// "DMA get" of n elements starting at element `first` as fp32 (16-bit data through the stage).
void get_f32(const void* src, DType type, int64_t first, int64_t n, float* dst, uint16_t* stage) {
  if (type == DType::F32) {
    std::memcpy(dst, static_cast<const float*>(src) + first, n * sizeof(float));
    return;
  }
  std::memcpy(stage, static_cast<const uint16_t*>(src) + first, n * sizeof(uint16_t));
  widen(stage, type, dst, n);
}

// "DMA put" of n fp32 values, rounded to `type`.
void put_f32(const float* src, DType type, void* dst, int64_t first, int64_t n, uint16_t* stage) {
  if (type == DType::F32) {
    std::memcpy(static_cast<float*>(dst) + first, src, n * sizeof(float));
    return;
  }
  narrow(src, type, stage, n);
  std::memcpy(static_cast<uint16_t*>(dst) + first, stage, n * sizeof(uint16_t));
}

struct NormBuffers {
  float* x;
  uint16_t* stage;
  float* weight;
  float* bias;
};

NormBuffers take_buffers(const NormPlan& p, LocalStore& ldm, bool has_bias) {
  NormBuffers b;
  b.x = ldm.take<float>(p.chunk);
  b.stage = ldm.take<uint16_t>(2 * p.chunk);  // sized for fp32 so the plan's count is an upper bound
  b.weight = ldm.take<float>(p.chunk);
  b.bias = has_bias ? ldm.take<float>(p.chunk) : nullptr;
  return b;
}

}  // namespace

NormPlan plan_norm(int64_t rows, int64_t cols, bool has_bias) {
  if (rows < 0 || cols <= 0) throw std::invalid_argument("norm: rows must be >= 0 and cols > 0");
  NormPlan p;
  p.rows = rows;
  p.cols = cols;
  p.chunk = std::min(cols, kNormChunk);
  p.chunks = ceil_div(cols, p.chunk);
  p.x_bytes = ldm_alloc(4 * p.chunk);
  p.stage_bytes = ldm_alloc(4 * p.chunk);
  p.weight_bytes = ldm_alloc(4 * p.chunk);
  p.bias_bytes = has_bias ? ldm_alloc(4 * p.chunk) : 0;
  if (!p.fits()) throw std::logic_error("norm: plan exceeds the LDM budget (a bug in plan_norm)");
  return p;
}

void rms_norm_tiled(const NormPlan& p, const void* x, DType x_type, const void* weight, DType w_type, void* out,
                    float eps, bool round_before_weight) {
  // The reference multiplies in the promoted dtype of the weight and the (rounded) normalised value.
  const DType product_type = (x_type == DType::F32 || w_type == DType::F32) ? DType::F32 : x_type;
  const bool resident = p.chunks == 1;  // the whole row and weight stay in LDM between passes
  run_logical_workers([&](int worker, LocalStore& ldm) {
    NormBuffers b = take_buffers(p, ldm, false);
    if (resident) get_f32(weight, w_type, 0, p.cols, b.weight, b.stage);
    for (int64_t r = worker; r < p.rows; r += kLogicalWorkers) {
      const int64_t base = r * p.cols;
      float squares = 0.f;
      for (int64_t c0 = 0; c0 < p.cols; c0 += p.chunk) {
        const int64_t n = std::min(p.chunk, p.cols - c0);
        get_f32(x, x_type, base + c0, n, b.x, b.stage);
        squares += sum_of_squares(b.x, 0.f, n);
      }
      const float inv = 1.0f / std::sqrt(squares / static_cast<float>(p.cols) + eps);
      for (int64_t c0 = 0; c0 < p.cols; c0 += p.chunk) {
        const int64_t n = std::min(p.chunk, p.cols - c0);
        if (!resident) {
          get_f32(x, x_type, base + c0, n, b.x, b.stage);
          get_f32(weight, w_type, c0, n, b.weight, b.stage);
        }
        for (int64_t i = 0; i < n; ++i) {
          b.x[i] = round_before_weight ? round_to(b.weight[i] * round_to(b.x[i] * inv, x_type), product_type)
                                       : b.weight[i] * (b.x[i] * inv);
        }
        put_f32(b.x, x_type, out, base + c0, n, b.stage);
      }
    }
  });
}

void layer_norm_tiled(const NormPlan& p, const void* x, DType x_type, const void* weight, DType w_type,
                      const void* bias, DType b_type, void* out, float eps) {
  const bool has_bias = bias != nullptr;
  const bool resident = p.chunks == 1;
  run_logical_workers([&](int worker, LocalStore& ldm) {
    NormBuffers b = take_buffers(p, ldm, has_bias);
    auto get_params = [&](int64_t c0, int64_t n) {
      if (weight) get_f32(weight, w_type, c0, n, b.weight, b.stage);
      if (has_bias) get_f32(bias, b_type, c0, n, b.bias, b.stage);
    };
    if (resident) get_params(0, p.cols);
    for (int64_t r = worker; r < p.rows; r += kLogicalWorkers) {
      const int64_t base = r * p.cols;
      float sum = 0.f;
      for (int64_t c0 = 0; c0 < p.cols; c0 += p.chunk) {
        const int64_t n = std::min(p.chunk, p.cols - c0);
        get_f32(x, x_type, base + c0, n, b.x, b.stage);
        sum += sum_of(b.x, n);
      }
      const float mean = sum / static_cast<float>(p.cols);
      float squares = 0.f;
      for (int64_t c0 = 0; c0 < p.cols; c0 += p.chunk) {
        const int64_t n = std::min(p.chunk, p.cols - c0);
        if (!resident) get_f32(x, x_type, base + c0, n, b.x, b.stage);
        squares += sum_of_squares(b.x, mean, n);
      }
      const float rstd = 1.0f / std::sqrt(squares / static_cast<float>(p.cols) + eps);
      for (int64_t c0 = 0; c0 < p.cols; c0 += p.chunk) {
        const int64_t n = std::min(p.chunk, p.cols - c0);
        if (!resident) {
          get_f32(x, x_type, base + c0, n, b.x, b.stage);
          get_params(c0, n);
        }
        for (int64_t i = 0; i < n; ++i) {
          float y = (b.x[i] - mean) * rstd;
          if (weight) y *= b.weight[i];
          if (has_bias) y += b.bias[i];
          b.x[i] = y;
        }
        put_f32(b.x, x_type, out, base + c0, n, b.stage);
      }
    }
  });
}

}  // namespace glmrt::sunway
