// Rotary position embeddings of every GLM generation (interleaved, half-split and 2-D), fused with
// the split of the qkv projection, one block per token. One source for CUDA and HIP (portability.h).
#include "portability.h"

#include "rope.h"

namespace glmrt {
namespace gpu {
namespace {

// Where pair i (0 <= i < head_dim / 2) of a head lives for each kind: its two elements a and b
// (offsets in the head), whether it rotates, and by which entry of which table. The pairs that do
// not rotate (the dims past rotary_dim) are still whole pairs of neighbouring elements, so every
// element of the head is written exactly once.
struct PairSlot {
  int64_t a, b, entry;
  bool rotate, second_table;
};

__device__ __forceinline__ PairSlot pair_slot(int kind, int64_t i, int64_t head_dim, int64_t rotary_dim) {
  PairSlot s{0, 0, 0, false, false};
  switch (kind) {
    case kRopeInterleaved:  // GPT-J: (x[2i], x[2i+1]) by angle i, for i < rotary_dim / 2
      s.a = 2 * i;
      s.b = 2 * i + 1;
      s.entry = i;
      s.rotate = i < rotary_dim / 2;
      break;
    case kRopeHalf: {  // NeoX: (x[i], x[i + rotary_dim/2]) by angle i; then copied pairs
      const int64_t h = rotary_dim / 2;
      if (i < h) {
        s.a = i;
        s.b = i + h;
        s.entry = i;
        s.rotate = true;
      } else {
        s.a = rotary_dim + 2 * (i - h);
        s.b = s.a + 1;
      }
      break;
    }
    default: {  // 2-D: NeoX over each half of the head, the second half with the second tables
      const int64_t quarter = head_dim / 4;
      const bool second = i >= quarter;
      const int64_t j = second ? i - quarter : i;
      s.a = (second ? head_dim / 2 : 0) + j;
      s.b = s.a + quarter;
      s.entry = j;
      s.rotate = true;
      s.second_table = second;
      break;
    }
  }
  return s;
}

// One block per token row; its threads stride over the (num_heads + num_kv_heads) * head_dim / 2
// pairs of the token's q and k heads. No reduction and no barrier: any block size works, and the
// host launches whole wavefronts. The products and sums use the _rn intrinsics and are rounded to
// T one by one, so no FMA contraction skips a rounding torch does.
template <typename T>
__global__ void __launch_bounds__(1024)
rope_kernel(const typename T::storage* __restrict__ qkv, const typename T::storage* __restrict__ cos,
            const typename T::storage* __restrict__ sin, const typename T::storage* __restrict__ cos2,
            const typename T::storage* __restrict__ sin2, typename T::storage* __restrict__ q_out,
            typename T::storage* __restrict__ k_out, int kind, int64_t num_heads, int64_t num_kv_heads,
            int64_t head_dim, int64_t rotary_dim) {
  const int64_t row = blockIdx.x;
  const int64_t half_head = head_dim / 2;
  const int64_t entries = kind == kRope2D ? head_dim / 4 : rotary_dim / 2;  // table width
  const int64_t pairs = (num_heads + num_kv_heads) * half_head;
  const typename T::storage* xr = qkv + row * (num_heads + 2 * num_kv_heads) * head_dim;
  for (int64_t p = threadIdx.x; p < pairs; p += blockDim.x) {
    const int64_t head = p / half_head;
    const PairSlot slot = pair_slot(kind, p - head * half_head, head_dim, rotary_dim);
    // q heads, then k heads, are contiguous in qkv: the flat index is the same.
    const typename T::storage* x = xr + head * head_dim;
    typename T::storage* dst = head < num_heads ? q_out + (row * num_heads + head) * head_dim
                                                : k_out + (row * num_kv_heads + head - num_heads) * head_dim;
    const float x0 = T::load(x, slot.a), x1 = T::load(x, slot.b);
    if (slot.rotate) {
      const int64_t t = row * entries + slot.entry;
      const float c = T::load(slot.second_table ? cos2 : cos, t), s = T::load(slot.second_table ? sin2 : sin, t);
      const float x0c = T::round(gpu_mul_rn(x0, c)), x1s = T::round(gpu_mul_rn(x1, s));
      const float x1c = T::round(gpu_mul_rn(x1, c)), x0s = T::round(gpu_mul_rn(x0, s));
      T::store(dst, slot.a, gpu_add_rn(x0c, -x1s));
      T::store(dst, slot.b, gpu_add_rn(x1c, x0s));
    } else {
      T::store(dst, slot.a, x0);
      T::store(dst, slot.b, x1);
    }
  }
}

template <typename T>
void launch_rope(const void* qkv, const void* cos, const void* sin, const void* cos2, const void* sin2, void* q_out,
                 void* k_out, int kind, int64_t rows, int64_t num_heads, int64_t num_kv_heads, int64_t head_dim,
                 int64_t rotary_dim, gpuStream_t stream) {
  using S = typename T::storage;
  // Whole wavefronts (64) on every platform, one thread per pair up to 256 threads.
  int64_t threads = (((num_heads + num_kv_heads) * (head_dim / 2) + 63) / 64) * 64;
  threads = threads > 256 ? 256 : threads;
  GLMRT_LAUNCH(static_cast<unsigned>(rows), static_cast<unsigned>(threads), 0, stream, rope_kernel<T>)(
      static_cast<const S*>(qkv), static_cast<const S*>(cos), static_cast<const S*>(sin), static_cast<const S*>(cos2),
      static_cast<const S*>(sin2), static_cast<S*>(q_out), static_cast<S*>(k_out), kind, num_heads, num_kv_heads,
      head_dim, rotary_dim);
}

}  // namespace

const char* rope(const void* qkv, int dtype, int kind, const void* cos, const void* sin, const void* cos2,
                 const void* sin2, void* q_out, void* k_out, int64_t rows, int64_t num_heads, int64_t num_kv_heads,
                 int64_t head_dim, int64_t rotary_dim, int device, void* stream) {
  if (dtype < 0 || dtype > 2) return "dtype codes must be 0 (fp32), 1 (bf16) or 2 (fp16)";
  if (kind < kRopeInterleaved || kind > kRope2D) return "kind must be 0 (interleaved), 1 (half) or 2 (2d)";
  if (rows < 0 || num_heads < 0 || num_kv_heads < 0) return "rows and head counts must be >= 0";
  if (head_dim < 2 || head_dim % 2 || rotary_dim < 0 || rotary_dim % 2 || rotary_dim > head_dim)
    return "head_dim must be even and >= 2, rotary_dim even with 0 <= rotary_dim <= head_dim";
  if (kind == kRope2D && (rotary_dim != head_dim || head_dim % 4))
    return "2-D RoPE rotates whole heads in two halves: rotary_dim must equal head_dim, a multiple of 4";
  if (rows > 0x7fffffffLL) return "more than 2^31 - 1 rows";
  if (rows == 0 || num_heads + num_kv_heads == 0) return nullptr;
  if (kind == kRope2D && (cos2 == nullptr || sin2 == nullptr)) return "2-D RoPE needs the block-position tables";
  auto s = static_cast<gpuStream_t>(stream);
  return launch_for_dtype(device, dtype, [&](auto tag) {
    launch_rope<decltype(tag)>(qkv, cos, sin, cos2, sin2, q_out, k_out, kind, rows, num_heads, num_kv_heads, head_dim,
                               rotary_dim, s);
  });
}

}  // namespace gpu
}  // namespace glmrt
