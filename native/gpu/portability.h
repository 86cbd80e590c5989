// One kernel source for CUDA (nvcc) and HIP (hipcc / clang, AMD and Hygon DCU).
//
// Every .cu file in native/gpu includes this header first and uses only what it defines for the
// runtime API and the warp primitives, so the same source compiles as CUDA and as HIP (the way
// ggml builds its HIP backend from its CUDA sources). The HIP build defines GLMRT_PLATFORM_HIP.
//
// Warps: 32 lanes on NVIDIA; 64-lane wavefronts on AMD GCN/CDNA (gfx9xx) and Hygon DCU (gfx906,
// gfx926, gfx928, gfx936); RDNA (gfx10+) compiles for 32. So:
//   * GLMRT_WARP_SIZE is a compile-time constant of the target being compiled (device code);
//   * host code that must size a launch before knowing the device uses GLMRT_MAX_WARP_SIZE and
//     kernels are written so that more rows per block than the host assumed is harmless (warps
//     past the last row still take part in every barrier and shuffle, but load and store nothing);
//   * warp ids are threadIdx.x / GLMRT_WARP_SIZE, never / 32; lane masks are 64-bit on HIP;
//   * every reduction goes through warp_reduce_sum<Width>, with an explicit width.
#pragma once

#include <cstdint>

#if defined(GLMRT_PLATFORM_EMULATE)
// Tests only: the same kernels run on the CPU, one OS thread per GPU thread (emulate.h).
#include "emulate.h"

#elif defined(GLMRT_PLATFORM_HIP) || defined(__HIP__) || defined(__HIPCC__)
#ifndef GLMRT_PLATFORM_HIP
#define GLMRT_PLATFORM_HIP 1
#endif
#include <hip/hip_runtime.h>
#include <hip/hip_fp16.h>
#include <hip/hip_bfloat16.h>

using gpuStream_t = hipStream_t;
using gpuError_t = hipError_t;
#define gpuSuccess hipSuccess
#define gpuGetLastError hipGetLastError
#define gpuGetErrorString hipGetErrorString
#define gpuGetDevice hipGetDevice
#define gpuSetDevice hipSetDevice
#define gpuGetDeviceCount hipGetDeviceCount
#define gpuRuntimeGetVersion hipRuntimeGetVersion
#define gpuDriverGetVersion hipDriverGetVersion
#define gpuDeviceGetAttribute hipDeviceGetAttribute
#define gpuDevAttrWarpSize hipDeviceAttributeWarpSize

// The storage types torch's half dtypes correspond to (kernels move them as raw uint16_t bits).
using gpu_half_t = __half;
using gpu_bfloat16_t = hip_bfloat16;

// clang defines the wavefront size of the offload target being compiled (64 on gfx9xx, 32 on
// gfx10+ in its default wave32 mode); the host pass sees the default, 64.
#if defined(__AMDGCN_WAVEFRONT_SIZE)
#define GLMRT_WARP_SIZE __AMDGCN_WAVEFRONT_SIZE
#else
#define GLMRT_WARP_SIZE 64
#endif
#define GLMRT_MAX_WARP_SIZE 64
using gpu_lane_mask_t = uint64_t;

// HIP's shuffles take no mask (every lane of the wavefront takes part); ROCm >= 6.2 also has
// __shfl_xor_sync with a 64-bit mask, which older ROCm / DTK releases lack.
template <typename T>
__device__ __forceinline__ T gpu_shfl_xor(T v, int lane_mask, int width) {
  return __shfl_xor(v, lane_mask, width);
}
__device__ __forceinline__ gpu_lane_mask_t gpu_ballot(int predicate) {
  return static_cast<gpu_lane_mask_t>(__ballot(predicate));
}

#else  // CUDA
#define GLMRT_PLATFORM_CUDA 1
#include <cuda_runtime.h>
#include <cuda_fp16.h>
#include <cuda_bf16.h>

using gpuStream_t = cudaStream_t;
using gpuError_t = cudaError_t;
#define gpuSuccess cudaSuccess
#define gpuGetLastError cudaGetLastError
#define gpuGetErrorString cudaGetErrorString
#define gpuGetDevice cudaGetDevice
#define gpuSetDevice cudaSetDevice
#define gpuGetDeviceCount cudaGetDeviceCount
#define gpuRuntimeGetVersion cudaRuntimeGetVersion
#define gpuDriverGetVersion cudaDriverGetVersion
#define gpuDeviceGetAttribute cudaDeviceGetAttribute
#define gpuDevAttrWarpSize cudaDevAttrWarpSize

using gpu_half_t = __half;
using gpu_bfloat16_t = __nv_bfloat16;

#define GLMRT_WARP_SIZE 32
#define GLMRT_MAX_WARP_SIZE 32
using gpu_lane_mask_t = uint32_t;

template <typename T>
__device__ __forceinline__ T gpu_shfl_xor(T v, int lane_mask, int width) {
  return __shfl_xor_sync(0xffffffffu, v, lane_mask, width);
}
__device__ __forceinline__ gpu_lane_mask_t gpu_ballot(int predicate) {
  return __ballot_sync(0xffffffffu, predicate);
}
#endif

// fp32 product / sum rounded on its own: the compiler may not contract them into an FMA (which
// would skip a rounding torch does, e.g. of residual * alpha before the add).
#if defined(GLMRT_PLATFORM_EMULATE)
inline float gpu_mul_rn(float a, float b) { volatile float p = a * b; return p; }
inline float gpu_add_rn(float a, float b) { volatile float s = a + b; return s; }
#else
__device__ __forceinline__ float gpu_mul_rn(float a, float b) { return __fmul_rn(a, b); }
__device__ __forceinline__ float gpu_add_rn(float a, float b) { return __fadd_rn(a, b); }
#endif

#if !defined(GLMRT_PLATFORM_EMULATE)
// kernel<<<grid, block, shared bytes, stream>>>(args), spelled so that the CPU emulation can
// define it too: GLMRT_LAUNCH(grid, block, smem, stream, kernel<T, ...>)(args...).
#define GLMRT_LAUNCH(grid, block, smem, stream, ...) __VA_ARGS__<<<(grid), (block), (smem), (stream)>>>
// The block's dynamic shared memory (the launch's third argument), as an array of `type`.
#define GLMRT_DYNAMIC_SHARED(type, name) extern __shared__ type name[]
#endif

namespace glmrt {
namespace gpu {

// Sum over groups of `Width` consecutive lanes (Width a power of two <= GLMRT_WARP_SIZE); every
// lane of a group ends with the group's sum. All lanes of the warp must call it.
template <int Width>
__device__ __forceinline__ float warp_reduce_sum(float v) {
  static_assert((Width & (Width - 1)) == 0, "reduction width must be a power of two");
  static_assert(Width <= GLMRT_WARP_SIZE, "reduction width exceeds the warp / wavefront");
#pragma unroll
  for (int offset = Width / 2; offset > 0; offset >>= 1) v += gpu_shfl_xor(v, offset, Width);
  return v;
}

__device__ __forceinline__ int lane_id() { return static_cast<int>(threadIdx.x) % GLMRT_WARP_SIZE; }
__device__ __forceinline__ int warp_id() { return static_cast<int>(threadIdx.x) / GLMRT_WARP_SIZE; }

// Sum over the whole block (blockDim.x a multiple of the warp size, at most 1024 threads). Every
// thread gets the result. `scratch` holds one float per warp (>= 1024 / 32 = 32 floats).
__device__ __forceinline__ float block_reduce_sum(float v, float* scratch) {
  v = warp_reduce_sum<GLMRT_WARP_SIZE>(v);
  const int warps = static_cast<int>(blockDim.x) / GLMRT_WARP_SIZE;
  if (lane_id() == 0) scratch[warp_id()] = v;
  __syncthreads();
  float total = lane_id() < warps ? scratch[lane_id()] : 0.f;
  total = warp_reduce_sum<GLMRT_WARP_SIZE>(total);
  __syncthreads();  // scratch may be reused by the caller
  return total;
}

// ---------------------------------------------------------------------------- storage dtypes
// Codes shared with glmrt._native: 0 = fp32, 1 = bf16, 2 = fp16. Half types travel as raw bits;
// conversions round to nearest even, exactly as torch's casts do.
enum DTypeCode : int { kF32 = 0, kBF16 = 1, kF16 = 2 };

__device__ __forceinline__ float bf16_bits_to_float(uint16_t h) {
  return __uint_as_float(static_cast<uint32_t>(h) << 16);
}
__device__ __forceinline__ uint16_t float_to_bf16_bits(float f) {
  const uint32_t bits = __float_as_uint(f);
  if ((bits & 0x7fffffffu) > 0x7f800000u) return static_cast<uint16_t>((bits >> 16) | 0x40u);  // quiet NaN
  return static_cast<uint16_t>((bits + 0x7fffu + ((bits >> 16) & 1u)) >> 16);
}
__device__ __forceinline__ float f16_bits_to_float(uint16_t h) { return __half2float(__ushort_as_half(h)); }
__device__ __forceinline__ uint16_t float_to_f16_bits(float f) { return __half_as_ushort(__float2half_rn(f)); }

// Typed element access for the activation dtype (a template parameter of the kernels).
struct F32 {
  using storage = float;
  static constexpr int code = kF32;
  __device__ static float load(const storage* p, int64_t i) { return p[i]; }
  __device__ static void store(storage* p, int64_t i, float v) { p[i] = v; }
  __device__ static float round(float v) { return v; }
};
struct BF16 {
  using storage = uint16_t;
  static constexpr int code = kBF16;
  __device__ static float load(const storage* p, int64_t i) { return bf16_bits_to_float(p[i]); }
  __device__ static void store(storage* p, int64_t i, float v) { p[i] = float_to_bf16_bits(v); }
  __device__ static float round(float v) { return bf16_bits_to_float(float_to_bf16_bits(v)); }
};
struct F16 {
  using storage = uint16_t;
  static constexpr int code = kF16;
  __device__ static float load(const storage* p, int64_t i) { return f16_bits_to_float(p[i]); }
  __device__ static void store(storage* p, int64_t i, float v) { p[i] = float_to_f16_bits(v); }
  __device__ static float round(float v) { return f16_bits_to_float(float_to_f16_bits(v)); }
};

// Element access for a dtype known only at run time (small per-row operands: weights of a norm,
// scales, biases). The switch is uniform across the warp.
__device__ __forceinline__ float load_any(const void* p, int64_t i, int code) {
  switch (code) {
    case kF32: return static_cast<const float*>(p)[i];
    case kBF16: return bf16_bits_to_float(static_cast<const uint16_t*>(p)[i]);
    default: return f16_bits_to_float(static_cast<const uint16_t*>(p)[i]);
  }
}
__device__ __forceinline__ float round_any(float v, int code) {
  switch (code) {
    case kF32: return v;
    case kBF16: return bf16_bits_to_float(float_to_bf16_bits(v));
    default: return f16_bits_to_float(float_to_f16_bits(v));
  }
}

// The one run-time -> compile-time dtype switch of the entry points: calls fn(F32{}), fn(BF16{})
// or fn(F16{}) for a dtype code, so an entry point writes its launch once, as a generic lambda
// that takes the element type from its tag (`[&](auto tag) { launch<decltype(tag)>(...); }`),
// and all three instantiations are compiled. The entry points check their codes first; any code
// but kF32 / kBF16 is fp16 here (as their own switches had it).
template <typename Fn>
inline void dispatch_dtype(int code, Fn&& fn) {
  switch (code) {
    case kF32: fn(F32{}); break;
    case kBF16: fn(BF16{}); break;
    default: fn(F16{}); break;
  }
}

// Runs `launch` with the device made current (restored afterwards) and returns nullptr, or the
// runtime's message for the first error (a bad launch configuration, an unsupported arch, ...).
template <typename Launch>
inline const char* launch_on_device(int device, Launch&& launch) {
  int previous = -1;
  gpuError_t err = gpuGetDevice(&previous);
  if (err == gpuSuccess && previous != device) err = gpuSetDevice(device);
  if (err != gpuSuccess) return gpuGetErrorString(err);
  launch();
  err = gpuGetLastError();
  if (previous >= 0 && previous != device) (void)gpuSetDevice(previous);  // best effort
  return err == gpuSuccess ? nullptr : gpuGetErrorString(err);
}

// The common tail of every entry point: on `device`, fn(tag) for the element type of dtype
// `code` (dispatch_dtype), returning launch_on_device's nullptr or error message.
template <typename Fn>
inline const char* launch_for_dtype(int device, int code, Fn&& fn) {
  return launch_on_device(device, [&] { dispatch_dtype(code, fn); });
}

}  // namespace gpu
}  // namespace glmrt
