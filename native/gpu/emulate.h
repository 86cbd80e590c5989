// CPU emulation of the CUDA / HIP subset that native/gpu uses, for tests on machines without a GPU
// (portability.h includes it when GLMRT_PLATFORM_EMULATE is defined; tests/ops/test_native_gpu.py
// compiles module.cpp + the .cu files as C++ this way, once with 32-lane and once with 64-lane
// warps). It runs the real kernel code: every GPU thread of a block is an OS thread, blocks run one
// after another, __syncthreads() and the warp shuffles are barriers, and shared memory is shared.
// So a kernel that reduces a 64-lane wavefront as if it had 32 lanes, skips a shuffle on some
// lanes (a deadlock here), or indexes past its data gives wrong numbers or hangs here too.
// Slow (a barrier costs microseconds): for small shapes only. Never built into the package.
#pragma once

#include <condition_variable>
#include <cmath>
#include <cstddef>
#include <cstdint>
#include <cstring>
#include <functional>
#include <mutex>
#include <stdexcept>
#include <thread>
#include <vector>

#include "../cpu/dtype.h"

#ifndef GLMRT_EMULATE_WARP_SIZE
#define GLMRT_EMULATE_WARP_SIZE 32
#endif
#define GLMRT_WARP_SIZE GLMRT_EMULATE_WARP_SIZE
// As on HIP, the host sizes grids for the widest warp, so with 32-lane warps the emulation also
// runs the blocks that find no row.
#define GLMRT_MAX_WARP_SIZE 64

#define __global__
#define __device__
#define __host__
#define __forceinline__ inline
#define __launch_bounds__(...)
// Blocks run one after another, so one static array per kernel is each block's shared memory.
#define __shared__ static

struct uint4 { uint32_t x, y, z, w; };
struct float4 { float x, y, z, w; };
inline uint4 make_uint4(uint32_t x, uint32_t y, uint32_t z, uint32_t w) { return uint4{x, y, z, w}; }
struct emu_dim3 { unsigned x = 0, y = 1, z = 1; };

inline thread_local emu_dim3 threadIdx;
inline thread_local emu_dim3 blockIdx;
inline emu_dim3 blockDim;

using gpuStream_t = void*;
using gpuError_t = int;
#define gpuSuccess 0
inline gpuError_t gpuGetLastError() { return 0; }
inline const char* gpuGetErrorString(gpuError_t) { return "emulation error"; }
inline gpuError_t gpuGetDevice(int* d) { *d = 0; return 0; }
inline gpuError_t gpuSetDevice(int) { return 0; }
inline gpuError_t gpuGetDeviceCount(int* n) { *n = 1; return 0; }
inline gpuError_t gpuRuntimeGetVersion(int* v) { *v = 1; return 0; }
inline gpuError_t gpuDriverGetVersion(int* v) { *v = 0; return 0; }
#define gpuDevAttrWarpSize 0
inline gpuError_t gpuDeviceGetAttribute(int* v, int, int) { *v = GLMRT_WARP_SIZE; return 0; }

struct __half { uint16_t bits; };
using gpu_half_t = __half;
using gpu_bfloat16_t = uint16_t;
using gpu_lane_mask_t = uint64_t;

inline float __uint_as_float(uint32_t u) { float f; std::memcpy(&f, &u, 4); return f; }
inline uint32_t __float_as_uint(float f) { uint32_t u; std::memcpy(&u, &f, 4); return u; }
inline __half __ushort_as_half(uint16_t u) { return __half{u}; }
inline uint16_t __half_as_ushort(__half h) { return h.bits; }
inline float __half2float(__half h) { return glmrt::f16_to_f32(h.bits); }
inline __half __float2half_rn(float f) { return __half{glmrt::f32_to_f16(f)}; }

namespace glmrt {
namespace emu {

class Barrier {
 public:
  explicit Barrier(int count) : count_(count) {}
  void wait() {
    std::unique_lock<std::mutex> lock(mutex_);
    const long generation = generation_;
    if (++arrived_ == count_) {
      arrived_ = 0;
      ++generation_;
      cv_.notify_all();
    } else {
      cv_.wait(lock, [&] { return generation != generation_; });
    }
  }

 private:
  std::mutex mutex_;
  std::condition_variable cv_;
  int count_;
  int arrived_ = 0;
  long generation_ = 0;
};

struct Warp {
  Warp() : barrier(GLMRT_WARP_SIZE) {}
  Barrier barrier;
  uint64_t slots[GLMRT_WARP_SIZE];
};

inline thread_local Barrier* block_barrier = nullptr;
inline thread_local Warp* warp = nullptr;
inline unsigned char* dynamic_shared = nullptr;

// Runs body() for every thread of every block of a 1-D launch.
inline void run(unsigned grid, unsigned block, size_t shared_bytes, const std::function<void()>& body) {
  if (grid == 0 || block == 0) return;
  if (block % GLMRT_WARP_SIZE != 0) throw std::runtime_error("emulated launch: block is not whole warps");
  std::vector<unsigned char> shared(shared_bytes + 16);
  dynamic_shared = shared.data();
  blockDim.x = block;
  Barrier barrier(static_cast<int>(block));
  std::vector<Warp> warps(block / GLMRT_WARP_SIZE);
  std::vector<std::thread> threads;
  threads.reserve(block);
  for (unsigned t = 0; t < block; ++t) {
    threads.emplace_back([&, t] {
      threadIdx.x = t;
      block_barrier = &barrier;
      warp = &warps[t / GLMRT_WARP_SIZE];
      for (unsigned b = 0; b < grid; ++b) {
        blockIdx.x = b;
        body();
        barrier.wait();  // the next block reuses the shared memory
      }
    });
  }
  for (auto& th : threads) th.join();
  dynamic_shared = nullptr;
}

struct Launch {
  unsigned grid, block;
  size_t shared_bytes;
  template <typename... Params>
  auto operator()(void (*kernel)(Params...)) const {
    const Launch self = *this;
    return [self, kernel](auto&&... args) { run(self.grid, self.block, self.shared_bytes, [&] { kernel(args...); }); };
  }
};

}  // namespace emu
}  // namespace glmrt

inline void __syncthreads() { glmrt::emu::block_barrier->wait(); }

template <typename T>
inline T gpu_shfl_xor(T v, int lane_mask, int width) {
  static_assert(sizeof(T) <= 8, "emulated shuffles move at most 8 bytes");
  auto* w = glmrt::emu::warp;
  const int lane = static_cast<int>(threadIdx.x) % GLMRT_WARP_SIZE;
  std::memcpy(&w->slots[lane], &v, sizeof(T));
  w->barrier.wait();
  int src = lane ^ lane_mask;
  if (src / width != lane / width || src >= GLMRT_WARP_SIZE) src = lane;  // outside the segment: own value
  T out;
  std::memcpy(&out, &w->slots[src], sizeof(T));
  w->barrier.wait();
  return out;
}

inline gpu_lane_mask_t gpu_ballot(int predicate) {
  auto* w = glmrt::emu::warp;
  const int lane = static_cast<int>(threadIdx.x) % GLMRT_WARP_SIZE;
  w->slots[lane] = predicate ? 1u : 0u;
  w->barrier.wait();
  gpu_lane_mask_t mask = 0;
  for (int i = 0; i < GLMRT_WARP_SIZE; ++i) mask |= static_cast<gpu_lane_mask_t>(w->slots[i] & 1u) << i;
  w->barrier.wait();
  return mask;
}

#define GLMRT_LAUNCH(grid, block, smem, stream, ...) \
  ::glmrt::emu::Launch{static_cast<unsigned>(grid), static_cast<unsigned>(block), static_cast<size_t>(smem)}(__VA_ARGS__)
#define GLMRT_DYNAMIC_SHARED(type, name) type* name = reinterpret_cast<type*>(::glmrt::emu::dynamic_shared)
