// RMSNorm, LayerNorm and residual add + RMSNorm / LayerNorm, one block per row, fp32 accumulation.
// One source for CUDA and HIP (portability.h).
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

// Store to an output whose dtype is known only at run time (the RMSNorm output of the
// round-before-weight convention is in the promoted dtype of x and weight). Uniform across the warp.
__device__ __forceinline__ void store_any(void* p, int64_t i, float v, int code) {
  switch (code) {
    case kF32: static_cast<float*>(p)[i] = v; break;
    case kBF16: static_cast<uint16_t*>(p)[i] = float_to_bf16_bits(v); break;
    default: static_cast<uint16_t*>(p)[i] = float_to_f16_bits(v); break;
  }
}

// The dtype torch gives the RMSNorm output: with round_before_weight the product weight *
// normed.to(x dtype) is in the promoted dtype of the two (fp32 with anything, fp32 for bf16 with
// fp16), and the reference returns it as it is; otherwise the fp32 product is rounded to x's dtype.
inline int rms_out_code(int x_dtype, int w_dtype, bool round_before_weight) {
  return (round_before_weight && x_dtype != w_dtype) ? kF32 : x_dtype;
}

// One block per row. Two passes over the row (the second read hits L1/L2): the sum of squares,
// then the scaled output, stored in `out_code` (rms_out_code: with round_before_weight the
// product's dtype, torch's promotion of (weight dtype, x dtype), so the one store is its rounding).
template <typename T>
__global__ void __launch_bounds__(1024)
rms_norm_kernel(const typename T::storage* __restrict__ x, const void* __restrict__ weight, int w_dtype,
                void* __restrict__ out, int out_code, int64_t cols, float eps, bool round_before_weight) {
  __shared__ float scratch[1024 / 32];
  const int64_t base = static_cast<int64_t>(blockIdx.x) * cols;
  const typename T::storage* xr = x + base;

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
    store_any(out, base + c, round_before_weight ? w * T::round(normed) : w * normed, out_code);
  }
}

template <typename T>
void launch_rms_norm(const void* x, const void* weight, int w_dtype, void* out, int out_code, int64_t rows,
                     int64_t cols, float eps, bool round_before_weight, gpuStream_t stream) {
  GLMRT_LAUNCH(static_cast<unsigned>(rows), row_threads(cols), 0, stream, rms_norm_kernel<T>)(
      static_cast<const typename T::storage*>(x), weight, w_dtype, out, out_code, cols, eps, round_before_weight);
}

// The rows the norm kernels read: a plain row of x, or the residual sum h computed on the fly.
// h = round(branch + round(residual * alpha)) in T (torch's two ops on tensors of one dtype: each
// computed in fp32, rounded to T); it is recomputed in every pass (the same operations give the
// same bits). The products and sums use the _rn intrinsics so the compiler cannot contract them
// into an FMA (which would not round residual * alpha as torch does).
template <typename T>
__device__ __forceinline__ float residual_sum(const typename T::storage* r, const typename T::storage* b, int64_t c,
                                              float alpha, bool scale) {
  const float scaled = scale ? T::round(gpu_mul_rn(T::load(r, c), alpha)) : T::load(r, c);
  return T::round(gpu_add_rn(T::load(b, c), scaled));
}

template <typename T>
struct PlainRow {
  const typename T::storage* x;
  __device__ float operator()(int64_t c) const { return T::load(x, c); }
};

template <typename T>
struct ResidualRow {
  const typename T::storage* residual;
  const typename T::storage* branch;
  float alpha;
  bool scale;
  __device__ float operator()(int64_t c) const { return residual_sum<T>(residual, branch, c, alpha, scale); }
};

// LayerNorm of one row (the calling block's), three passes over it: the mean, the sum of squared
// deviations (two-pass, no cancellation), then (x - mean) * rstd * weight + bias in fp32, rounded
// once to T. `bias` may be null. The first pass also stores each value to `h_out` when it is not
// null (the fused residual's h).
template <typename T, typename Row>
__device__ __forceinline__ void layer_norm_row(const Row& row, const void* __restrict__ weight, int w_dtype,
                                               const void* __restrict__ bias, int b_dtype,
                                               typename T::storage* __restrict__ h_out,
                                               typename T::storage* __restrict__ yr, int64_t cols, float eps,
                                               float* scratch) {
  const float n = static_cast<float>(cols);

  float sum = 0.f;
  for (int64_t c = threadIdx.x; c < cols; c += blockDim.x) {
    const float v = row(c);
    if (h_out != nullptr) T::store(h_out, c, v);
    sum += v;
  }
  const float mean = block_reduce_sum(sum, scratch) / n;

  float sum_sq = 0.f;
  for (int64_t c = threadIdx.x; c < cols; c += blockDim.x) {
    const float d = row(c) - mean;
    sum_sq = fmaf(d, d, sum_sq);
  }
  const float inv = 1.0f / sqrtf(block_reduce_sum(sum_sq, scratch) / n + eps);

  for (int64_t c = threadIdx.x; c < cols; c += blockDim.x) {
    const float normed = (row(c) - mean) * inv;
    float y = normed * load_any(weight, c, w_dtype);
    if (bias != nullptr) y += load_any(bias, c, b_dtype);
    T::store(yr, c, y);
  }
}

template <typename T>
__global__ void __launch_bounds__(1024)
layer_norm_kernel(const typename T::storage* __restrict__ x, const void* __restrict__ weight, int w_dtype,
                  const void* __restrict__ bias, int b_dtype, typename T::storage* __restrict__ out, int64_t cols,
                  float eps) {
  __shared__ float scratch[1024 / 32];
  const int64_t base = static_cast<int64_t>(blockIdx.x) * cols;
  layer_norm_row<T>(PlainRow<T>{x + base}, weight, w_dtype, bias, b_dtype, nullptr, out + base, cols, eps, scratch);
}

// h (see residual_sum) written to h_out when it is not null, then LayerNorm(h) exactly as
// layer_norm_kernel computes it for a stored h.
template <typename T>
__global__ void __launch_bounds__(1024)
residual_layer_norm_kernel(const typename T::storage* __restrict__ residual,
                           const typename T::storage* __restrict__ branch, float alpha, bool scale,
                           const void* __restrict__ weight, int w_dtype, const void* __restrict__ bias, int b_dtype,
                           typename T::storage* __restrict__ h_out, typename T::storage* __restrict__ out,
                           int64_t cols, float eps) {
  __shared__ float scratch[1024 / 32];
  const int64_t base = static_cast<int64_t>(blockIdx.x) * cols;
  layer_norm_row<T>(ResidualRow<T>{residual + base, branch + base, alpha, scale}, weight, w_dtype, bias, b_dtype,
                    h_out != nullptr ? h_out + base : nullptr, out + base, cols, eps, scratch);
}

// h (see residual_sum) written to h_out when it is not null, then RMSNorm(h) exactly as
// rms_norm_kernel computes it for a stored h (output in out_code).
template <typename T>
__global__ void __launch_bounds__(1024)
residual_rms_norm_kernel(const typename T::storage* __restrict__ residual,
                         const typename T::storage* __restrict__ branch, float alpha, bool scale,
                         const void* __restrict__ weight, int w_dtype, typename T::storage* __restrict__ h_out,
                         void* __restrict__ out, int out_code, int64_t cols, float eps, bool round_before_weight) {
  __shared__ float scratch[1024 / 32];
  const int64_t base = static_cast<int64_t>(blockIdx.x) * cols;
  const typename T::storage* rr = residual + base;
  const typename T::storage* br = branch + base;

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
    store_any(out, base + c, round_before_weight ? w * T::round(normed) : w * normed, out_code);
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
                              void* h_out, void* out, int out_code, int64_t rows, int64_t cols, float eps,
                              bool round_before_weight, gpuStream_t stream) {
  using S = typename T::storage;
  GLMRT_LAUNCH(static_cast<unsigned>(rows), row_threads(cols), 0, stream, residual_rms_norm_kernel<T>)(
      static_cast<const S*>(residual), static_cast<const S*>(branch), alpha, alpha != 1.0f, weight, w_dtype,
      static_cast<S*>(h_out), out, out_code, cols, eps, round_before_weight);
}

template <typename T>
void launch_residual_layer_norm(const void* residual, const void* branch, float alpha, const void* weight,
                                int w_dtype, const void* bias, int b_dtype, void* h_out, void* out, int64_t rows,
                                int64_t cols, float eps, gpuStream_t stream) {
  using S = typename T::storage;
  GLMRT_LAUNCH(static_cast<unsigned>(rows), row_threads(cols), 0, stream, residual_layer_norm_kernel<T>)(
      static_cast<const S*>(residual), static_cast<const S*>(branch), alpha, alpha != 1.0f, weight, w_dtype, bias,
      b_dtype, static_cast<S*>(h_out), static_cast<S*>(out), cols, eps);
}

}  // namespace

namespace {

// The argument checks shared by the entry points (nullptr: fine).
const char* check_codes(int x_dtype, int w_dtype, const void* bias, int b_dtype) {
  const auto bad = [](int code) { return code < kF32 || code > kF16; };
  if (bad(x_dtype) || bad(w_dtype) || (bias != nullptr && bad(b_dtype)))
    return "dtype codes must be 0 (fp32), 1 (bf16) or 2 (fp16)";
  return nullptr;
}

const char* check_rows(int64_t rows, int64_t cols) {
  if (rows < 0 || cols < 0) return "rows and cols must be >= 0";
  if (rows > 0x7fffffffLL) return "more than 2^31 - 1 rows";
  return nullptr;
}

const char* check_rms_out(int x_dtype, int w_dtype, int out_dtype, bool round_before_weight) {
  if (out_dtype == rms_out_code(x_dtype, w_dtype, round_before_weight)) return nullptr;
  return round_before_weight
             ? "out_dtype must be the promoted dtype of x and weight (x's when they match, else fp32) with "
               "round_before_weight, as torch's product"
             : "out_dtype must be x's dtype without round_before_weight";
}

}  // namespace

const char* rms_norm(const void* x, int x_dtype, const void* weight, int w_dtype, void* out, int out_dtype,
                     int64_t rows, int64_t cols, float eps, bool round_before_weight, int device, void* stream) {
  if (const char* e = check_codes(x_dtype, w_dtype, nullptr, 0)) return e;
  if (const char* e = check_rms_out(x_dtype, w_dtype, out_dtype, round_before_weight)) return e;
  if (const char* e = check_rows(rows, cols)) return e;
  if (rows == 0 || cols == 0) return nullptr;
  auto s = static_cast<gpuStream_t>(stream);
  return launch_for_dtype(device, x_dtype, [&](auto tag) {
    launch_rms_norm<decltype(tag)>(x, weight, w_dtype, out, out_dtype, rows, cols, eps, round_before_weight, s);
  });
}

const char* layer_norm(const void* x, int x_dtype, const void* weight, int w_dtype, const void* bias, int b_dtype,
                       void* out, int64_t rows, int64_t cols, float eps, int device, void* stream) {
  if (const char* e = check_codes(x_dtype, w_dtype, bias, b_dtype)) return e;
  if (const char* e = check_rows(rows, cols)) return e;
  if (rows == 0 || cols == 0) return nullptr;
  auto s = static_cast<gpuStream_t>(stream);
  return launch_for_dtype(device, x_dtype, [&](auto tag) {
    launch_layer_norm<decltype(tag)>(x, weight, w_dtype, bias, b_dtype, out, rows, cols, eps, s);
  });
}

const char* residual_rms_norm(const void* residual, const void* branch, int x_dtype, float alpha, const void* weight,
                              int w_dtype, void* h_out, void* out, int out_dtype, int64_t rows, int64_t cols,
                              float eps, bool round_before_weight, int device, void* stream) {
  if (const char* e = check_codes(x_dtype, w_dtype, nullptr, 0)) return e;
  if (const char* e = check_rms_out(x_dtype, w_dtype, out_dtype, round_before_weight)) return e;
  if (const char* e = check_rows(rows, cols)) return e;
  if (rows == 0 || cols == 0) return nullptr;
  auto s = static_cast<gpuStream_t>(stream);
  return launch_for_dtype(device, x_dtype, [&](auto tag) {
    launch_residual_rms_norm<decltype(tag)>(residual, branch, alpha, weight, w_dtype, h_out, out, out_dtype, rows,
                                            cols, eps, round_before_weight, s);
  });
}

const char* residual_layer_norm(const void* residual, const void* branch, int x_dtype, float alpha,
                                const void* weight, int w_dtype, const void* bias, int b_dtype, void* h_out,
                                void* out, int64_t rows, int64_t cols, float eps, int device, void* stream) {
  if (const char* e = check_codes(x_dtype, w_dtype, bias, b_dtype)) return e;
  if (const char* e = check_rows(rows, cols)) return e;
  if (rows == 0 || cols == 0) return nullptr;
  auto s = static_cast<gpuStream_t>(stream);
  return launch_for_dtype(device, x_dtype, [&](auto tag) {
    launch_residual_layer_norm<decltype(tag)>(residual, branch, alpha, weight, w_dtype, bias, b_dtype, h_out, out,
                                              rows, cols, eps, s);
  });
}

}  // namespace gpu
}  // namespace glmrt
