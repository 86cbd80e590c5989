// Rotary position embedding (interleaved pairing, partial rotary), one block per token. One source
// for CUDA and HIP (portability.h).
#include "portability.h"

#include "rope.h"

namespace glmrt {
namespace gpu {
namespace {

// One block per token row; its threads stride over the (num_heads + num_kv_heads) * head_dim / 2
// pairs of the token's q and k heads. No reduction and no barrier: any block size works, and the
// host launches whole wavefronts. The products and sums use the _rn intrinsics and are rounded to
// T one by one, so no FMA contraction skips a rounding torch does.
template <typename T>
__global__ void __launch_bounds__(1024)
rope_interleaved_kernel(const typename T::storage* __restrict__ qkv, const typename T::storage* __restrict__ cos,
                        const typename T::storage* __restrict__ sin, typename T::storage* __restrict__ q_out,
                        typename T::storage* __restrict__ k_out, int64_t num_heads, int64_t num_kv_heads,
                        int64_t head_dim, int64_t rotary_dim) {
  const int64_t row = blockIdx.x;
  const int64_t half_head = head_dim / 2;
  const int64_t half_rot = rotary_dim / 2;
  const int64_t pairs = (num_heads + num_kv_heads) * half_head;
  const typename T::storage* xr = qkv + row * (num_heads + 2 * num_kv_heads) * head_dim;
  const typename T::storage* cr = cos + row * half_rot;
  const typename T::storage* sr = sin + row * half_rot;
  for (int64_t p = threadIdx.x; p < pairs; p += blockDim.x) {
    const int64_t head = p / half_head;
    const int64_t i = p - head * half_head;
    // q heads, then k heads, are contiguous in qkv: the flat index is the same.
    const int64_t src = head * head_dim + 2 * i;
    typename T::storage* dst = head < num_heads ? q_out + (row * num_heads + head) * head_dim + 2 * i
                                                : k_out + (row * num_kv_heads + head - num_heads) * head_dim + 2 * i;
    const float x0 = T::load(xr, src), x1 = T::load(xr, src + 1);
    if (i < half_rot) {
      const float c = T::load(cr, i), s = T::load(sr, i);
      const float x0c = T::round(gpu_mul_rn(x0, c)), x1s = T::round(gpu_mul_rn(x1, s));
      const float x1c = T::round(gpu_mul_rn(x1, c)), x0s = T::round(gpu_mul_rn(x0, s));
      T::store(dst, 0, gpu_add_rn(x0c, -x1s));
      T::store(dst, 1, gpu_add_rn(x1c, x0s));
    } else {
      T::store(dst, 0, x0);
      T::store(dst, 1, x1);
    }
  }
}

template <typename T>
void launch_rope_interleaved(const void* qkv, const void* cos, const void* sin, void* q_out, void* k_out,
                             int64_t rows, int64_t num_heads, int64_t num_kv_heads, int64_t head_dim,
                             int64_t rotary_dim, gpuStream_t stream) {
  using S = typename T::storage;
  // Whole wavefronts (64) on every platform, one thread per pair up to 256 threads.
  int64_t threads = (((num_heads + num_kv_heads) * (head_dim / 2) + 63) / 64) * 64;
  threads = threads > 256 ? 256 : threads;
  GLMRT_LAUNCH(static_cast<unsigned>(rows), static_cast<unsigned>(threads), 0, stream, rope_interleaved_kernel<T>)(
      static_cast<const S*>(qkv), static_cast<const S*>(cos), static_cast<const S*>(sin), static_cast<S*>(q_out),
      static_cast<S*>(k_out), num_heads, num_kv_heads, head_dim, rotary_dim);
}

}  // namespace

const char* rope_interleaved(const void* qkv, int dtype, const void* cos, const void* sin, void* q_out, void* k_out,
                             int64_t rows, int64_t num_heads, int64_t num_kv_heads, int64_t head_dim,
                             int64_t rotary_dim, int device, void* stream) {
  if (dtype < 0 || dtype > 2) return "dtype codes must be 0 (fp32), 1 (bf16) or 2 (fp16)";
  if (rows < 0 || num_heads < 0 || num_kv_heads < 0) return "rows and head counts must be >= 0";
  if (head_dim < 2 || head_dim % 2 || rotary_dim < 0 || rotary_dim % 2 || rotary_dim > head_dim)
    return "head_dim must be even and >= 2, rotary_dim even with 0 <= rotary_dim <= head_dim";
  if (rows > 0x7fffffffLL) return "rope_interleaved: more than 2^31 - 1 rows";
  if (rows == 0 || num_heads + num_kv_heads == 0) return nullptr;
  auto s = static_cast<gpuStream_t>(stream);
  return launch_on_device(device, [&] {
    switch (dtype) {
      case kF32:
        launch_rope_interleaved<F32>(qkv, cos, sin, q_out, k_out, rows, num_heads, num_kv_heads, head_dim, rotary_dim, s);
        break;
      case kBF16:
        launch_rope_interleaved<BF16>(qkv, cos, sin, q_out, k_out, rows, num_heads, num_kv_heads, head_dim, rotary_dim,
                                      s);
        break;
      default:
        launch_rope_interleaved<F16>(qkv, cos, sin, q_out, k_out, rows, num_heads, num_kv_heads, head_dim, rotary_dim, s);
        break;
    }
  });
}

}  // namespace gpu
}  // namespace glmrt
