// RMSNorm, one block per row, fp32 accumulation. One source for CUDA and HIP (portability.h).
#include "portability.h"

#include "norm.h"

namespace glmrt {
namespace gpu {
namespace {

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
  // Whole wavefronts (64) on every platform; about 8 elements per thread, 128 to 1024 threads.
  int64_t threads = ((cols / 8 + 63) / 64) * 64;
  threads = threads < 128 ? 128 : (threads > 1024 ? 1024 : threads);
  GLMRT_LAUNCH(static_cast<unsigned>(rows), static_cast<unsigned>(threads), 0, stream, rms_norm_kernel<T>)(
      static_cast<const typename T::storage*>(x), weight, w_dtype, static_cast<typename T::storage*>(out), cols, eps,
      round_before_weight, product_code);
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

}  // namespace gpu
}  // namespace glmrt
