// Micro-benchmark of the CPU decode GEMVs (native/cpu/gemv_float.cpp, gemv_quant.cpp) at the
// ChatGLM3-6B shapes, M = 1, 4, 8 rows, against a second build of the same files (a baseline from
// git, compiled into this binary under the namespace glmrt_old) timed in the same run, round by
// round alternating. Also measures the fp32 FMA peak of the cores with a register-only loop.
// Build and run: benchmarks/native/run_gemv_bench.sh [BASE_REF] (see there); GEMV_BENCH_M=1,2,3
// chooses the row counts (default 1, 4, 8).
#include <omp.h>

#include <immintrin.h>

#include <algorithm>
#include <chrono>
#include <cstdint>
#include <cstdio>
#include <cstdlib>
#include <cstring>
#include <random>
#include <string>
#include <vector>

#include "dtype.h"
#include "gemv_float.h"
#include "gemv_quant.h"

namespace glmrt_old {
enum class DType : int { F32 = 0, BF16 = 1, F16 = 2 };
enum class QuantFormat : int { Int8 = 8, Int4 = 4 };
void linear_float(const void* x, const void* weight, const void* bias, void* out, DType dtype, int64_t M, int64_t N,
                  int64_t K);
void linear_quant(QuantFormat format, const void* x, DType x_type, const void* weight, const void* scale,
                  DType scale_type, const void* bias, DType bias_type, void* out, int64_t M, int64_t N, int64_t K,
                  int64_t group_size);
}  // namespace glmrt_old

#include <time.h>
// The process CPU time (all threads): with OMP_WAIT_POLICY=passive it is the work done, which a
// machine shared with other jobs does not inflate the way it inflates the wall clock.
static bool g_cpu_clock = false;
static double now() {
  if (g_cpu_clock) {
    timespec ts;
    clock_gettime(CLOCK_PROCESS_CPUTIME_ID, &ts);
    return ts.tv_sec + 1e-9 * ts.tv_nsec;
  }
  return std::chrono::duration<double>(std::chrono::steady_clock::now().time_since_epoch()).count();
}

// fp32 FMA throughput: 12 independent accumulator chains per thread, registers only.
__attribute__((target("avx2,fma"))) static double fma_peak_gflops(int threads) {
  const long iters = 200000000L / 12;
  double best = 0;
  for (int rep = 0; rep < 3; ++rep) {
    const double t0 = now();
#pragma omp parallel num_threads(threads)
    {
      __m256 a[12];
      for (int i = 0; i < 12; ++i) a[i] = _mm256_set1_ps(1.0f + i * 1e-3f);
      const __m256 m = _mm256_set1_ps(0.999999f), c = _mm256_set1_ps(1e-7f);
      for (long it = 0; it < iters; ++it) {
#pragma GCC unroll 12
        for (int i = 0; i < 12; ++i) a[i] = _mm256_fmadd_ps(a[i], m, c);
        __asm__ volatile("" : "+x"(a[0]), "+x"(a[1]), "+x"(a[2]), "+x"(a[3]), "+x"(a[4]), "+x"(a[5]));
        __asm__ volatile("" : "+x"(a[6]), "+x"(a[7]), "+x"(a[8]), "+x"(a[9]), "+x"(a[10]), "+x"(a[11]));
      }
      float s = 0;
      for (int i = 0; i < 12; ++i) s += _mm256_cvtss_f32(a[i]);
      if (s == 12345.f) std::printf("!");
    }
    const double dt = now() - t0;
    // the CPU clock counts every thread's time: GFLOP per CPU second x threads = the threads' peak
    const double gf = threads * iters * 12.0 * 16 / dt / 1e9 * (g_cpu_clock ? threads : 1);  // 8 lanes x 2 flops
    best = std::max(best, gf);
  }
  return best;
}

struct Case {
  std::string name;
  int kind;  // 0: float, 1: int4, 2: int8
  glmrt::DType dt;
  int64_t N, K, group;
};

int main(int argc, char** argv) {
  const int threads = omp_get_max_threads();
  const char* clk = std::getenv("GEMV_BENCH_CLOCK");
  g_cpu_clock = clk && std::string(clk) == "cpu";
  int rounds = argc > 1 ? std::atoi(argv[1]) : 5;
  std::string only = argc > 2 ? argv[2] : "";
  std::vector<int64_t> Ms = {1, 4, 8};
  if (const char* ms = std::getenv("GEMV_BENCH_M")) {  // e.g. GEMV_BENCH_M=1,2,3
    Ms.clear();
    for (const char* c = ms; *c;) {
      Ms.push_back(std::strtoll(c, const_cast<char**>(&c), 10));
      if (*c == ',') ++c;
    }
  }
  const double peak = fma_peak_gflops(threads);
  std::printf("clock: %s (times below: %s)\n", g_cpu_clock ? "process CPU time" : "wall",
              g_cpu_clock ? "CPU seconds per call / threads, i.e. the wall time on idle cores" : "wall time per call");
  std::printf("threads %d, measured fp32 FMA peak %.1f GFLOP/s (%.2f GHz-equivalent at 2 x 8-wide FMA/cycle/core)\n",
              threads, peak, peak / threads / 32);
  std::vector<Case> cases = {
      {"lm_head bf16 65024x4096", 0, glmrt::DType::BF16, 65024, 4096, 0},
      {"lm_head fp16 65024x4096", 0, glmrt::DType::F16, 65024, 4096, 0},
      {"fp32 16384x4096", 0, glmrt::DType::F32, 16384, 4096, 0},
      {"int4 4608x4096", 1, glmrt::DType::BF16, 4608, 4096, 0},
      {"int4 4096x4096", 1, glmrt::DType::BF16, 4096, 4096, 0},
      {"int4 27392x4096", 1, glmrt::DType::BF16, 27392, 4096, 0},
      {"int4 4096x13696", 1, glmrt::DType::BF16, 4096, 13696, 0},
      {"int4 g32 27392x4096", 1, glmrt::DType::BF16, 27392, 4096, 32},
      {"int8 27392x4096", 2, glmrt::DType::BF16, 27392, 4096, 0},
  };
  std::mt19937 rng(1);
  for (const Case& c : cases) {
    if (!only.empty() && c.name.find(only) == std::string::npos) continue;
    const int64_t esz = c.dt == glmrt::DType::F32 ? 4 : 2;
    const int64_t row_bytes = c.kind == 0 ? c.K * esz : (c.kind == 1 ? (c.K + 1) / 2 : c.K);
    const int64_t wbytes = c.N * row_bytes;
    const int copies = (int)std::max<int64_t>(1, (int64_t)(96e6 / wbytes) + 1);
    std::vector<std::vector<uint8_t>> w(copies);
    for (auto& v : w) {
      v.resize(wbytes);
      uint32_t s = rng();
      for (int64_t i = 0; i < wbytes; i += 2) {
        s = s * 1664525u + 1013904223u;
        if (c.kind == 0 && c.dt == glmrt::DType::BF16) {
          uint16_t h = (uint16_t)(0x3c00 | ((s >> 16) & 0x3ff) | ((s >> 15) & 0x8000));
          std::memcpy(&v[i], &h, 2);
        } else if (c.kind == 0 && c.dt == glmrt::DType::F16) {
          uint16_t h = (uint16_t)(0x2c00 | ((s >> 16) & 0x3ff) | ((s >> 15) & 0x8000));
          std::memcpy(&v[i], &h, 2);
        } else {
          v[i] = (uint8_t)(s >> 24);
          if (i + 1 < wbytes) v[i + 1] = (uint8_t)(s >> 16);
        }
      }
      if (c.kind == 0 && c.dt == glmrt::DType::F32)
        for (int64_t i = 0; i < wbytes / 4; ++i) reinterpret_cast<float*>(v.data())[i] = ((int)(rng() % 2001) - 1000) * 1e-4f;
    }
    const int64_t groups = c.group ? (c.K + c.group - 1) / c.group : 1;
    std::vector<float> scale(c.N * groups, 0.01f);
    std::vector<uint16_t> xbuf(8 * c.K * 2);
    for (auto& h : xbuf) h = glmrt::f32_to_bf16(((int)(rng() % 2001) - 1000) * 1e-3f);
    if (c.dt == glmrt::DType::F16)
      for (auto& h : xbuf) h = glmrt::f32_to_f16(((int)(rng() % 2001) - 1000) * 1e-3f);
    std::vector<float> xf32(8 * c.K);
    for (auto& f : xf32) f = ((int)(rng() % 2001) - 1000) * 1e-3f;
    const void* x = c.dt == glmrt::DType::F32 ? (const void*)xf32.data() : (const void*)xbuf.data();
    std::vector<uint8_t> out_old(8 * c.N * 4), out_new(8 * c.N * 4);
    for (int64_t M : Ms) {
      std::vector<double> t_old, t_new;
      int ci = 0;
      auto run = [&](bool old, void* out) {
        const void* wp = w[ci % copies].data();
        ++ci;
        const double t0 = now();
        if (c.kind == 0) {
          if (old)
            glmrt_old::linear_float(x, wp, nullptr, out, (glmrt_old::DType)c.dt, M, c.N, c.K);
          else
            glmrt::linear_float(x, wp, nullptr, out, c.dt, M, c.N, c.K);
        } else {
          const auto fmt = c.kind == 1 ? glmrt::QuantFormat::Int4 : glmrt::QuantFormat::Int8;
          if (old)
            glmrt_old::linear_quant((glmrt_old::QuantFormat)fmt, x, glmrt_old::DType::BF16, wp, scale.data(),
                                    glmrt_old::DType::F32, nullptr, glmrt_old::DType::F32, out, M, c.N, c.K, c.group);
          else
            glmrt::linear_quant(fmt, x, glmrt::DType::BF16, wp, scale.data(), glmrt::DType::F32, nullptr,
                                glmrt::DType::F32, out, M, c.N, c.K, c.group);
        }
        return (now() - t0) / (g_cpu_clock ? threads : 1);
      };
      const int inner = std::max(1, (int)(copies));
      for (int r = 0; r < rounds + 1; ++r) {
        double so = 0, sn = 0;
        for (int i = 0; i < inner; ++i) so += run(true, out_old.data());
        for (int i = 0; i < inner; ++i) sn += run(false, out_new.data());
        if (r) {  // round 0 warms up
          t_old.push_back(so / inner);
          t_new.push_back(sn / inner);
        }
      }
      std::sort(t_old.begin(), t_old.end());
      std::sort(t_new.begin(), t_new.end());
      const double mo = t_old[t_old.size() / 2], mn = t_new[t_new.size() / 2];
      const double flops = 2.0 * M * c.N * c.K;
      const bool same = std::memcmp(out_old.data(), out_new.data(), M * c.N * (c.dt == glmrt::DType::F32 ? 4 : 2)) == 0;
      // float: % of the measured fp32 FMA peak; quantized: integer multiply-adds per second (the
      // int8 products of vpmaddubsw), which the FMA peak does not bound.
      char eo[64], en[64];
      if (c.kind == 0) {
        std::snprintf(eo, sizeof eo, "%5.1f%% FMA peak", 100 * flops / mo / 1e9 / peak);
        std::snprintf(en, sizeof en, "%5.1f%% FMA peak", 100 * flops / mn / 1e9 / peak);
      } else {
        std::snprintf(eo, sizeof eo, "%6.1f GMAC/s", flops / 2 / mo / 1e9);
        std::snprintf(en, sizeof en, "%6.1f GMAC/s", flops / 2 / mn / 1e9);
      }
      std::printf("%-24s M=%lld  old %8.3f ms (%6.1f GB/s %s)  new %8.3f ms (%6.1f GB/s %s)  x%.2f%s\n",
                  c.name.c_str(), (long long)M, mo * 1e3, wbytes / mo / 1e9, eo, mn * 1e3, wbytes / mn / 1e9, en,
                  mo / mn, same ? "  (same bits)" : "  (bits differ)");
      std::fflush(stdout);
    }
  }
  return 0;
}
