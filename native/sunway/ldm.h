// The SW26010-Pro execution model the Sunway kernels are written for, emulated on the host CPU.
//
// A core group has 64 compute cores (8x8). Each compute core owns 256 KB of local data memory
// (LDM) and reaches main memory only by DMA. A kernel for it therefore
//   * splits its work into tiles whose working set (every buffer a tile needs at once) fits in
//     one core's LDM, and
//   * deals the tiles out to the 64 compute cores (athread's 64 "logical workers").
// Here each logical worker is run by a host thread (OpenMP, capped to the host's cores), and its
// LDM is a 256 KB arena: a tile takes its buffers from the arena and nothing else, and a "DMA get"
// is a copy from the caller's tensors into the arena. The tile sizes are compile-time maxima
// whose worst-case working set is checked by static_assert, and every plan is checked again at
// run time before a kernel starts (plan_*().fits()).
#pragma once

#include <atomic>
#include <cstddef>
#include <cstdint>
#include <cstdio>
#include <cstdlib>
#include <memory>

namespace glmrt::sunway {

constexpr int64_t kLdmBytes = 256 * 1024;  // local data memory of one compute core
constexpr int kLogicalWorkers = 64;        // compute cores of one core group
// Kept free for the compute core's stack and the athread runtime; tiles use the rest.
constexpr int64_t kLdmReserveBytes = 16 * 1024;
constexpr int64_t kLdmTileBudget = kLdmBytes - kLdmReserveBytes;

constexpr int64_t round_up(int64_t x, int64_t m) { return (x + m - 1) / m * m; }
constexpr int64_t ceil_div(int64_t x, int64_t m) { return (x + m - 1) / m; }

// One logical worker's LDM: a fixed 256 KB arena handed out front to back. take() never
// returns memory outside the arena; running out means a plan was wrong, which is a bug, so it
// aborts with a message rather than touching memory a compute core would not have.
class LocalStore {
 public:
  LocalStore() : base_(static_cast<std::byte*>(std::aligned_alloc(64, kLdmBytes))) {
    if (!base_) {
      std::fprintf(stderr, "glmrt._native_sunway: cannot allocate a %lld-byte LDM arena\n",
                   static_cast<long long>(kLdmBytes));
      std::abort();
    }
  }
  ~LocalStore() { std::free(base_); }
  LocalStore(const LocalStore&) = delete;
  LocalStore& operator=(const LocalStore&) = delete;

  template <typename T>
  T* take(int64_t count) {
    const int64_t bytes = round_up(count * static_cast<int64_t>(sizeof(T)), 64);
    if (used_ + bytes > kLdmTileBudget) {
      std::fprintf(stderr, "glmrt._native_sunway: tile needs %lld bytes of LDM, budget is %lld\n",
                   static_cast<long long>(used_ + bytes), static_cast<long long>(kLdmTileBudget));
      std::abort();
    }
    T* p = reinterpret_cast<T*>(base_ + used_);
    used_ += bytes;
    if (used_ > peak_) peak_ = used_;
    return p;
  }
  void reset() { used_ = 0; }
  int64_t used() const { return used_; }
  // The most bytes this arena held at once since it was made (across reset()s).
  int64_t peak() const { return peak_; }

 private:
  std::byte* base_;
  int64_t used_ = 0;
  int64_t peak_ = 0;
};

// What the arenas of the last run_logical_workers call actually held: the largest working set any
// one logical worker took (bytes, as LocalStore rounds them), so tests can check the LDM budget on
// what the kernels did rather than on the planner's own arithmetic.
inline std::atomic<int64_t> g_last_ldm_peak{0};
inline int64_t last_ldm_peak() { return g_last_ldm_peak.load(); }

// Host threads that run the 64 logical workers: OpenMP's thread count, capped to the host's cores
// and to 64.
int host_threads();

// Runs body(worker, store) for worker = 0..63, each logical worker on some host thread with an
// LDM arena of that thread's (reset before every worker). Work is dealt to workers by the body,
// round robin: worker w takes tiles w, w + 64, w + 128, ...
template <typename Body>
void run_logical_workers(Body&& body) {
  g_last_ldm_peak.store(0);
#pragma omp parallel num_threads(host_threads())
  {
    LocalStore store;
#pragma omp for schedule(static)
    for (int worker = 0; worker < kLogicalWorkers; ++worker) {
      store.reset();
      body(worker, store);
    }
    int64_t seen = g_last_ldm_peak.load();
    while (store.peak() > seen && !g_last_ldm_peak.compare_exchange_weak(seen, store.peak())) {
    }
  }
}

}  // namespace glmrt::sunway
