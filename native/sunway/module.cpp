// glmrt._native_sunway: kernels tiled for the SW26010-Pro (256 KB LDM per compute core, 64
// compute cores per core group), run on the host CPU. Like glmrt._native_cpu, functions take raw
// data pointers as integers, shapes and dtype codes (0 fp32, 1 bf16, 2 fp16), so the module does
// not link against torch. The tile plans are exposed so tests can check the LDM budget.
#include <pybind11/pybind11.h>

#include "gemm_tiled.h"
#include "ldm.h"
#include "norm_tiled.h"

namespace py = pybind11;
namespace sw = glmrt::sunway;

namespace {

glmrt::DType to_dtype(int code) {
  if (code < 0 || code > 2) throw py::value_error("dtype code must be 0 (fp32), 1 (bf16) or 2 (fp16)");
  return static_cast<glmrt::DType>(code);
}

const void* as_ptr(uintptr_t p) { return reinterpret_cast<const void*>(p); }
void* as_out(uintptr_t p) { return reinterpret_cast<void*>(p); }

sw::WeightFormat to_format(int bits) {
  switch (bits) {
    case 0: return sw::WeightFormat::Float;
    case 8: return sw::WeightFormat::Int8;
    case 4: return sw::WeightFormat::Int4;
    default: throw py::value_error("weight bits must be 0 (float weights), 8 or 4");
  }
}

py::dict linear_plan_dict(const sw::LinearPlan& p) {
  py::dict d;
  d["bits"] = static_cast<int>(p.format);
  d["M"] = p.M;
  d["N"] = p.N;
  d["K"] = p.K;
  d["group_size"] = p.group_size;
  d["tile_m"] = p.tile_m;
  d["tile_n"] = p.tile_n;
  d["tile_k"] = p.tile_k;
  d["tiles"] = p.tiles();
  d["k_slices"] = p.k_blocks;
  py::dict bytes;
  bytes["a"] = p.a_bytes;
  bytes["b"] = p.b_bytes;
  bytes["c"] = p.c_bytes;
  bytes["stage"] = p.stage_bytes;
  bytes["scales"] = p.scale_bytes;
  bytes["bias"] = p.bias_bytes;
  d["buffer_bytes"] = bytes;
  d["ldm_bytes"] = p.ldm_bytes();
  d["fits"] = p.fits();
  return d;
}

py::dict norm_plan_dict(const sw::NormPlan& p) {
  py::dict d;
  d["rows"] = p.rows;
  d["cols"] = p.cols;
  d["chunk"] = p.chunk;
  d["chunks"] = p.chunks;
  py::dict bytes;
  bytes["x"] = p.x_bytes;
  bytes["stage"] = p.stage_bytes;
  bytes["weight"] = p.weight_bytes;
  bytes["bias"] = p.bias_bytes;
  d["buffer_bytes"] = bytes;
  d["ldm_bytes"] = p.ldm_bytes();
  d["fits"] = p.fits();
  return d;
}

}  // namespace

// std::invalid_argument from a plan reaches Python as ValueError (pybind11's translation).
PYBIND11_MODULE(_native_sunway, m) {
  m.doc() = "glmrt kernels tiled for the SW26010-Pro LDM, run on the host CPU";
  m.attr("ABI_VERSION") = 1;
  m.attr("LDM_BYTES") = sw::kLdmBytes;
  m.attr("LDM_RESERVE_BYTES") = sw::kLdmReserveBytes;
  m.attr("LDM_TILE_BUDGET") = sw::kLdmTileBudget;
  m.attr("LOGICAL_WORKERS") = sw::kLogicalWorkers;
  m.attr("TILE_M") = sw::kTileM;
  m.attr("TILE_N_MAX") = sw::kTileNMax;
  m.attr("TILE_K") = sw::kTileK;
  m.attr("NORM_CHUNK") = sw::kNormChunk;

  m.def("simd_level", &sw::simd_level, "Instruction set the fp32 inner loops run with on this CPU");
  m.def(
      "isa_paths",
      []() {
        py::list paths;
#if defined(__x86_64__) && (defined(__GNUC__) || defined(__clang__))
        // The target_clones of gemm_tiled.cpp / norm_tiled.cpp, best first.
        paths.append("avx512f");
        paths.append("avx2");
#endif
        paths.append("scalar");
        return paths;
      },
      "Instruction-set paths this build holds for the fp32 inner loops (one is picked at load time)");
  m.def("target_arch", []() {
#if defined(__x86_64__)
    return "x86_64";
#elif defined(__aarch64__)
    return "aarch64";
#elif defined(__sw_64__)
    return "sw_64";
#else
    return "unknown";
#endif
  }, "The CPU architecture this module was compiled for");
  m.def("host_threads", &sw::host_threads, "Host threads that run the 64 logical workers");
  m.def("last_ldm_peak", &sw::last_ldm_peak,
        "Bytes of LDM arena the busiest logical worker held at once during the last kernel call");
  m.def("openmp", []() {
#ifdef GLMRT_HAVE_OPENMP
    return true;
#else
    return false;
#endif
  });
  m.def("supported_group_size", &sw::supported_group_size, py::arg("group_size"));

  m.def(
      "linear_plan",
      [](int bits, int64_t M, int64_t N, int64_t K, int64_t group_size) {
        return linear_plan_dict(sw::plan_linear(to_format(bits), M, N, K, group_size));
      },
      py::arg("bits"), py::arg("M"), py::arg("N"), py::arg("K"), py::arg("group_size") = 0,
      "The tile plan linear() uses for these shapes, with the LDM bytes of every buffer of one tile");
  m.def(
      "norm_plan",
      [](int64_t rows, int64_t cols, bool has_bias) { return norm_plan_dict(sw::plan_norm(rows, cols, has_bias)); },
      py::arg("rows"), py::arg("cols"), py::arg("has_bias"), "The chunk plan of rms_norm / layer_norm");

  m.def(
      "linear",
      [](uintptr_t x, int x_dtype, uintptr_t w, int bits, int w_dtype, uintptr_t scale, int scale_dtype,
         uintptr_t bias, int bias_dtype, uintptr_t out, int64_t M, int64_t N, int64_t K, int64_t group_size) {
        const glmrt::DType xt = to_dtype(x_dtype);
        const sw::WeightFormat format = to_format(bits);
        const glmrt::DType wt = format == sw::WeightFormat::Float ? to_dtype(w_dtype) : xt;
        const glmrt::DType st = scale ? to_dtype(scale_dtype) : glmrt::DType::F32;
        const glmrt::DType bt = bias ? to_dtype(bias_dtype) : glmrt::DType::F32;
        const sw::LinearPlan plan = sw::plan_linear(format, M, N, K, group_size);  // ValueError if unsupported
        py::gil_scoped_release release;
        sw::linear_tiled(plan, as_ptr(x), xt, as_ptr(w), wt, scale ? as_ptr(scale) : nullptr, st,
                         bias ? as_ptr(bias) : nullptr, bt, as_out(out));
      },
      py::arg("x"), py::arg("x_dtype"), py::arg("w"), py::arg("bits"), py::arg("w_dtype"), py::arg("scale"),
      py::arg("scale_dtype"), py::arg("bias"), py::arg("bias_dtype"), py::arg("out"), py::arg("M"), py::arg("N"),
      py::arg("K"), py::arg("group_size"),
      "out[M,N] = x[M,K] @ W^T + bias. bits 0: W [N,K] float (w_dtype); 8: int8 [N,K]; 4: packed "
      "[N,ceil(K/2)], even k in the high nibble; scale [N] (group_size 0) or [N, ceil(K/group_size)]. "
      "Pass 0 for an absent scale or bias.");

  m.def(
      "rms_norm",
      [](uintptr_t x, int x_dtype, uintptr_t w, int w_dtype, uintptr_t out, int64_t rows, int64_t cols, float eps,
         bool round_before_weight) {
        const glmrt::DType xt = to_dtype(x_dtype), wt = to_dtype(w_dtype);
        const sw::NormPlan plan = sw::plan_norm(rows, cols, false);
        py::gil_scoped_release release;
        sw::rms_norm_tiled(plan, as_ptr(x), xt, as_ptr(w), wt, as_out(out), eps, round_before_weight);
      },
      py::arg("x"), py::arg("x_dtype"), py::arg("weight"), py::arg("w_dtype"), py::arg("out"), py::arg("rows"),
      py::arg("cols"), py::arg("eps"), py::arg("round_before_weight"));

  m.def(
      "layer_norm",
      [](uintptr_t x, int x_dtype, uintptr_t w, int w_dtype, uintptr_t b, int b_dtype, uintptr_t out, int64_t rows,
         int64_t cols, float eps) {
        const glmrt::DType xt = to_dtype(x_dtype);
        const glmrt::DType wt = w ? to_dtype(w_dtype) : glmrt::DType::F32;
        const glmrt::DType bt = b ? to_dtype(b_dtype) : glmrt::DType::F32;
        const sw::NormPlan plan = sw::plan_norm(rows, cols, b != 0);
        py::gil_scoped_release release;
        sw::layer_norm_tiled(plan, as_ptr(x), xt, w ? as_ptr(w) : nullptr, wt, b ? as_ptr(b) : nullptr, bt,
                             as_out(out), eps);
      },
      py::arg("x"), py::arg("x_dtype"), py::arg("weight"), py::arg("w_dtype"), py::arg("bias"), py::arg("b_dtype"),
      py::arg("out"), py::arg("rows"), py::arg("cols"), py::arg("eps"), "Pass 0 for an absent weight or bias.");
}
