// RMSNorm, LayerNorm and residual add + RMSNorm, one block per row, fp32 accumulation. One source
// for CUDA and HIP (portability.h).
#include "portability.h"

#include "norm.h"

namespace glmrt {
namespace gpu {
namespace {

// Whole wavefronts (64) on every platform; about 8 elements per thread, 128 to 1024 threads.
inline unsigned row_threads(int64_t cols) {
  int64_t threads = ((cols / 8 + 63) / 64) * 64;
  return static_cast<unsigned>(threads < 128 ? 128 : (threads > 1024 ? 1024 : threads));
}

// One block per row. Two passes over the row (the second read hits L1/L2): the sum of squares,
// then the scaled output. `product_code` is the dtype the round-before-weight product is rounded
// to: torch's promotion of (weight dtype, x dtype).
template <typename T>
__global__ void __launch_bounds__(1024)
rms_norm_kernel(const typename T::storage* __restrict__ x, const void* __restrict__ weight, int w_dtype,
                typename T::storage* __restrict__ out, int64_t cols, float eps, bool round_before_weight,
                int product_code) {
  __shared__ float scratch[1024 / 32];
  const int64_t base = static_cast<int64_t>(blockIdx.x) * cols;
  const typename T::storage* xr = x + base;
  typename T::storage* yr = out + base;

  float sum_sq = 0.f;
  for (int64_t c = threadIdx.x; c < cols; c += blockDim.x) {
    const float v = T::load(xr, c);
    sum_sq = fmaf(v, v, sum_sq);
  }
  sum_sq = block_reduce_sum(sum_sq, scratch);
  const float inv = 1.0f / sqrtf(sum_sq / static_cast<float>(cols) + eps);

  for (int64_t c = threadIdx.x; c < cols; c += blockDim.x) {
    const float normed = T::load(xr, c) * inv;
    const float w = load_any(weight, c, w_dtype);
    const float y = round_before_weight ? round_any(w * T::round(normed), product_code) : w * normed;
    T::store(yr, c, y);
  }
}

template <typename T>
void launch_rms_norm(const void* x, const void* weight, int w_dtype, void* out, int64_t rows, int64_t cols, float eps,
                     bool round_before_weight, int product_code, gpuStream_t stream) {
  GLMRT_LAUNCH(static_cast<unsigned>(rows), row_threads(cols), 0, stream, rms_norm_kernel<T>)(
      static_cast<const typename T::storage*>(x), weight, w_dtype, static_cast<typename T::storage*>(out), cols, eps,
      round_before_weight, product_code);
}


// LayerNorm, one block per row, three passes over the row: the mean, the sum of squared
// deviations (two-pass, no cancellation), then (x - mean) * rstd * weight + bias in fp32, rounded
// once. `bias` may be null.
template <typename T>
__global__ void __launch_bounds__(1024)
layer_norm_kernel(const typename T::storage* __restrict__ x, const void* __restrict__ weight, int w_dtype,
                  const void* __restrict__ bias, int b_dtype, typename T::storage* __restrict__ out, int64_t cols,
                  float eps) {
  __shared__ float scratch[1024 / 32];
  const int64_t base = static_cast<int64_t>(blockIdx.x) * cols;
  const typename T::storage* xr = x + base;
  typename T::storage* yr = out + base;
  const float n = static_cast<float>(cols);

  float sum = 0.f;
  for (int64_t c = threadIdx.x; c < cols; c += blockDim.x) sum += T::load(xr, c);
  const float mean = block_reduce_sum(sum, scratch) / n;

  float sum_sq = 0.f;
  for (int64_t c = threadIdx.x; c < cols; c += blockDim.x) {
    const float d = T::load(xr, c) - mean;
    sum_sq = fmaf(d, d, sum_sq);
  }
  const float inv = 1.0f / sqrtf(block_reduce_sum(sum_sq, scratch) / n + eps);

  for (int64_t c = threadIdx.x; c < cols; c += blockDim.x) {
    const float normed = (T::load(xr, c) - mean) * inv;
    float y = normed * load_any(weight, c, w_dtype);
    if (bias != nullptr) y += load_any(bias, c, b_dtype);
    T::store(yr, c, y);
  }
}

// h = round(branch + round(residual * alpha)) in T (torch's two ops on tensors of one dtype: each
// computed in fp32, rounded to T), written to h_out when it is not null, then RMSNorm(h) exactly
// as rms_norm_kernel. h is recomputed in the second pass (the same operations give the same bits).
// The products and sums use the _rn intrinsics so the compiler cannot contract them into an FMA
// (which would not round residual * alpha as torch does).
template <typename T>
__device__ __forceinline__ float residual_sum(const typename T::storage* r, const typename T::storage* b, int64_t c,
                                              float alpha, bool scale) {
  const float scaled = scale ? T::round(gpu_mul_rn(T::load(r, c), alpha)) : T::load(r, c);
  return T::round(gpu_add_rn(T::load(b, c), scaled));
}

template <typename T>
__global__ void __launch_bounds__(1024)
residual_rms_norm_kernel(const typename T::storage* __restrict__ residual,
                         const typename T::storage* __restrict__ branch, float alpha, bool scale,
                         const void* __restrict__ weight, int w_dtype, typename T::storage* __restrict__ h_out,
                         typename T::storage* __restrict__ out, int64_t cols, float eps, bool round_before_weight,
                         int product_code) {
  __shared__ float scratch[1024 / 32];
  const int64_t base = static_cast<int64_t>(blockIdx.x) * cols;
  const typename T::storage* rr = residual + base;
  const typename T::storage* br = branch + base;
  typename T::storage* yr = out + base;

  float sum_sq = 0.f;
  for (int64_t c = threadIdx.x; c < cols; c += blockDim.x) {
    const float h = residual_sum<T>(rr, br, c, alpha, scale);
    if (h_out != nullptr) T::store(h_out + base, c, h);
    sum_sq = fmaf(h, h, sum_sq);
  }
  sum_sq = block_reduce_sum(sum_sq, scratch);
  const float inv = 1.0f / sqrtf(sum_sq / static_cast<float>(cols) + eps);

  for (int64_t c = threadIdx.x; c < cols; c += blockDim.x) {
    const float normed = residual_sum<T>(rr, br, c, alpha, scale) * inv;
    const float w = load_any(weight, c, w_dtype);
    const float y = round_before_weight ? round_any(w * T::round(normed), product_code) : w * normed;
    T::store(yr, c, y);
  }
}


template <typename T>
void launch_layer_norm(const void* x, const void* weight, int w_dtype, const void* bias, int b_dtype, void* out,
                       int64_t rows, int64_t cols, float eps, gpuStream_t stream) {
  GLMRT_LAUNCH(static_cast<unsigned>(rows), row_threads(cols), 0, stream, layer_norm_kernel<T>)(
      static_cast<const typename T::storage*>(x), weight, w_dtype, bias, b_dtype,
      static_cast<typename T::storage*>(out), cols, eps);
}

template <typename T>
void launch_residual_rms_norm(const void* residual, const void* branch, float alpha, const void* weight, int w_dtype,
                              void* h_out, void* out, int64_t rows, int64_t cols, float eps, bool round_before_weight,
                              int product_code, gpuStream_t stream) {
  using S = typename T::storage;
  GLMRT_LAUNCH(static_cast<unsigned>(rows), row_threads(cols), 0, stream, residual_rms_norm_kernel<T>)(
      static_cast<const S*>(residual), static_cast<const S*>(branch), alpha, alpha != 1.0f, weight, w_dtype,
      static_cast<S*>(h_out), static_cast<S*>(out), cols, eps, round_before_weight, product_code);
}

}  // namespace

const char* rms_norm(const void* x, int x_dtype, const void* weight, int w_dtype, void* out, int64_t rows,
                     int64_t cols, float eps, bool round_before_weight, int device, void* stream) {
  if (x_dtype < 0 || x_dtype > 2 || w_dtype < 0 || w_dtype > 2) return "dtype codes must be 0 (fp32), 1 (bf16) or 2 (fp16)";
  if (rows < 0 || cols < 0) return "rows and cols must be >= 0";
  if (rows > 0x7fffffffLL) return "rms_norm: more than 2^31 - 1 rows";
  if (rows == 0 || cols == 0) return nullptr;
  // torch promotes a product of two different dtypes to fp32 (fp32 with anything; bf16 with fp16).
  const int product_code = (x_dtype == w_dtype) ? x_dtype : kF32;
  auto s = static_cast<gpuStream_t>(stream);
  return launch_on_device(device, [&] {
    switch (x_dtype) {
      case kF32: launch_rms_norm<F32>(x, weight, w_dtype, out, rows, cols, eps, round_before_weight, product_code, s); break;
      case kBF16: launch_rms_norm<BF16>(x, weight, w_dtype, out, rows, cols, eps, round_before_weight, product_code, s); break;
      default: launch_rms_norm<F16>(x, weight, w_dtype, out, rows, cols, eps, round_before_weight, product_code, s); break;
    }
  });
}

const char* layer_norm(const void* x, int x_dtype, const void* weight, int w_dtype, const void* bias, int b_dtype,
                       void* out, int64_t rows, int64_t cols, float eps, int device, void* stream) {
  if (x_dtype < 0 || x_dtype > 2 || w_dtype < 0 || w_dtype > 2 || (bias != nullptr && (b_dtype < 0 || b_dtype > 2)))
    return "dtype codes must be 0 (fp32), 1 (bf16) or 2 (fp16)";
  if (rows < 0 || cols < 0) return "rows and cols must be >= 0";
  if (rows > 0x7fffffffLL) return "layer_norm: more than 2^31 - 1 rows";
  if (rows == 0 || cols == 0) return nullptr;
  auto s = static_cast<gpuStream_t>(stream);
  return launch_on_device(device, [&] {
    switch (x_dtype) {
      case kF32: launch_layer_norm<F32>(x, weight, w_dtype, bias, b_dtype, out, rows, cols, eps, s); break;
      case kBF16: launch_layer_norm<BF16>(x, weight, w_dtype, bias, b_dtype, out, rows, cols, eps, s); break;
      default: launch_layer_norm<F16>(x, weight, w_dtype, bias, b_dtype, out, rows, cols, eps, s); break;
    }
  });
}

const char* residual_rms_norm(const void* residual, const void* branch, int x_dtype, float alpha, const void* weight,
                              int w_dtype, void* h_out, void* out, int64_t rows, int64_t cols, float eps,
                              bool round_before_weight, int device, void* stream) {
  if (x_dtype < 0 || x_dtype > 2 || w_dtype < 0 || w_dtype > 2) return "dtype codes must be 0 (fp32), 1 (bf16) or 2 (fp16)";
  if (rows < 0 || cols < 0) return "rows and cols must be >= 0";
  if (rows > 0x7fffffffLL) return "residual_rms_norm: more than 2^31 - 1 rows";
  if (rows == 0 || cols == 0) return nullptr;
  const int product_code = (x_dtype == w_dtype) ? x_dtype : kF32;
  auto s = static_cast<gpuStream_t>(stream);
  return launch_on_device(device, [&] {
    switch (x_dtype) {
      case kF32:
        launch_residual_rms_norm<F32>(residual, branch, alpha, weight, w_dtype, h_out, out, rows, cols, eps,
                                      round_before_weight, product_code, s);
        break;
      case kBF16:
        launch_residual_rms_norm<BF16>(residual, branch, alpha, weight, w_dtype, h_out, out, rows, cols, eps,
                                       round_before_weight, product_code, s);
        break;
      default:
        launch_residual_rms_norm<F16>(residual, branch, alpha, weight, w_dtype, h_out, out, rows, cols, eps,
                                      round_before_weight, product_code, s);
        break;
    }
  });
}

}  // namespace gpu
}  // namespace glmrt
