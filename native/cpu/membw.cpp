#include "membw.h"

#include <immintrin.h>

#include <algorithm>

#ifdef GLMRT_HAVE_OPENMP
#include <omp.h>
#endif

namespace glmrt {

namespace {

using SliceFn = uint64_t (*)(const uint8_t*, int64_t);

// Four independent 512-bit accumulators: enough loads in flight to keep the memory system busy.
__attribute__((target("avx512f"))) uint64_t slice_avx512(const uint8_t* p, int64_t n) {
  __m512i a0 = _mm512_setzero_si512(), a1 = a0, a2 = a0, a3 = a0;
  int64_t i = 0;
  for (; i + 256 <= n; i += 256) {
    a0 = _mm512_add_epi64(a0, _mm512_loadu_si512(p + i));
    a1 = _mm512_add_epi64(a1, _mm512_loadu_si512(p + i + 64));
    a2 = _mm512_add_epi64(a2, _mm512_loadu_si512(p + i + 128));
    a3 = _mm512_add_epi64(a3, _mm512_loadu_si512(p + i + 192));
  }
  for (; i + 64 <= n; i += 64) a0 = _mm512_add_epi64(a0, _mm512_loadu_si512(p + i));
  a0 = _mm512_add_epi64(_mm512_add_epi64(a0, a1), _mm512_add_epi64(a2, a3));
  return static_cast<uint64_t>(_mm512_reduce_add_epi64(a0));
}

__attribute__((target("avx2"))) uint64_t slice_avx2(const uint8_t* p, int64_t n) {
  __m256i a0 = _mm256_setzero_si256(), a1 = a0, a2 = a0, a3 = a0;
  int64_t i = 0;
  for (; i + 128 <= n; i += 128) {
    a0 = _mm256_add_epi64(a0, _mm256_loadu_si256(reinterpret_cast<const __m256i*>(p + i)));
    a1 = _mm256_add_epi64(a1, _mm256_loadu_si256(reinterpret_cast<const __m256i*>(p + i + 32)));
    a2 = _mm256_add_epi64(a2, _mm256_loadu_si256(reinterpret_cast<const __m256i*>(p + i + 64)));
    a3 = _mm256_add_epi64(a3, _mm256_loadu_si256(reinterpret_cast<const __m256i*>(p + i + 96)));
  }
  for (; i + 32 <= n; i += 32)
    a0 = _mm256_add_epi64(a0, _mm256_loadu_si256(reinterpret_cast<const __m256i*>(p + i)));
  a0 = _mm256_add_epi64(_mm256_add_epi64(a0, a1), _mm256_add_epi64(a2, a3));
  alignas(32) uint64_t lanes[4];
  _mm256_store_si256(reinterpret_cast<__m256i*>(lanes), a0);
  return lanes[0] + lanes[1] + lanes[2] + lanes[3];
}

uint64_t slice_scalar(const uint8_t* p, int64_t n) {
  const uint64_t* w = reinterpret_cast<const uint64_t*>(p);
  uint64_t a0 = 0, a1 = 0, a2 = 0, a3 = 0;
  int64_t i = 0, words = n / 8;
  for (; i + 4 <= words; i += 4) {
    a0 += w[i];
    a1 += w[i + 1];
    a2 += w[i + 2];
    a3 += w[i + 3];
  }
  for (; i < words; ++i) a0 += w[i];
  return a0 + a1 + a2 + a3;
}

struct Path {
  SliceFn fn;
  const char* name;
};

Path choose() {
  __builtin_cpu_init();
  if (__builtin_cpu_supports("avx512f")) return {&slice_avx512, "avx512"};
  if (__builtin_cpu_supports("avx2")) return {&slice_avx2, "avx2"};
  return {&slice_scalar, "scalar"};
}

const Path& path() {
  static const Path p = choose();
  return p;
}

}  // namespace

uint64_t read_stream(const void* data, int64_t bytes, int threads) {
  const uint8_t* base = static_cast<const uint8_t*>(data);
  const SliceFn fn = path().fn;
  uint64_t total = 0;
  // Each thread reads its slice as kStreams sequential streams advanced in turn, a block at a
  // time: one sequential stream per core is limited by that core's outstanding misses and
  // prefetchers, while a GEMV streams many weight rows at once; several streams per thread read
  // what the memory system can deliver to the kernels.
  constexpr int kStreams = 8;
  constexpr int64_t kBlock = 4096;
  const int64_t lines = bytes / 64;
  auto read_slice = [&](int64_t lo, int64_t hi) -> uint64_t {
    uint64_t acc = 0;
    const int64_t len = hi - lo;
    int64_t starts[kStreams], ends[kStreams];
    for (int s = 0; s < kStreams; ++s) {
      starts[s] = lo + len * s / kStreams / 64 * 64;
      ends[s] = s + 1 == kStreams ? hi : lo + len * (s + 1) / kStreams / 64 * 64;
    }
    for (bool more = true; more;) {
      more = false;
      for (int s = 0; s < kStreams; ++s) {
        const int64_t n = std::min(kBlock, ends[s] - starts[s]);
        if (n <= 0) continue;
        acc += fn(base + starts[s], n);
        starts[s] += n;
        more = more || starts[s] < ends[s];
      }
    }
    return acc;
  };
#ifdef GLMRT_HAVE_OPENMP
  const int nt = threads > 0 ? threads : omp_get_max_threads();
#pragma omp parallel num_threads(nt) reduction(+ : total)
  {
    const int t = omp_get_thread_num(), n = omp_get_num_threads();
    total += read_slice(lines * t / n * 64, lines * (t + 1) / n * 64);  // contiguous, 64-byte multiples
  }
#else
  (void)threads;
  total = read_slice(0, lines * 64);
#endif
  return total;
}

const char* read_stream_isa() { return path().name; }

}  // namespace glmrt
