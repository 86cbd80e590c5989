// glmrt._native_cpu: CPU kernels. Functions take raw data pointers (as integers), shapes and
// dtype codes, so the module does not link against torch; glmrt wraps them as torch ops.
#include <pybind11/pybind11.h>

#include "dequant.h"
#include "gemm_float.h"
#include "gemv_float.h"
#include "gemv_quant.h"
#include "membw.h"
#include "norm.h"

namespace py = pybind11;

namespace glmrt {
void bind_layer_kernels(py::module_& m);  // bind_layers.cpp: LayerNorm, RoPE, attention
}

namespace {
glmrt::DType to_dtype(int code) {
  if (code < 0 || code > 2) throw py::value_error("dtype code must be 0 (fp32), 1 (bf16) or 2 (fp16)");
  return static_cast<glmrt::DType>(code);
}
void* as_ptr(uintptr_t p) { return reinterpret_cast<void*>(p); }
}  // namespace

PYBIND11_MODULE(_native_cpu, m) {
  m.doc() = "glmrt native CPU kernels";
  m.attr("ABI_VERSION") = 1;
  m.def("simd_level", &glmrt::cpu_simd_level, "Instruction set the multi-versioned kernels run with");
  m.def("openmp", []() {
#ifdef GLMRT_HAVE_OPENMP
    return true;
#else
    return false;
#endif
  });
  m.def(
      "rms_norm",
      [](uintptr_t x, int x_dtype, uintptr_t w, int w_dtype, uintptr_t out, int64_t rows, int64_t cols,
         float eps, bool round_before_weight) {
        py::gil_scoped_release release;
        glmrt::rms_norm(as_ptr(x), to_dtype(x_dtype), as_ptr(w), to_dtype(w_dtype), as_ptr(out), rows, cols, eps,
                        round_before_weight);
      },
      py::arg("x"), py::arg("x_dtype"), py::arg("weight"), py::arg("w_dtype"), py::arg("out"), py::arg("rows"),
      py::arg("cols"), py::arg("eps"), py::arg("round_before_weight"));
  glmrt::bind_layer_kernels(m);

  // Weight-only quantized linear: out[M, N] = x[M, K] @ dequant(w)^T (+ bias). See gemv_quant.h for
  // the formats and the numerics (activations quantized to int8 per block of 32 along K).
  auto bind_linear = [&m](const char* name, glmrt::QuantFormat fmt, const char* doc) {
    m.def(
        name,
        [fmt](uintptr_t x, int x_dtype, uintptr_t w, uintptr_t scale, int scale_dtype, uintptr_t bias,
              int bias_dtype, uintptr_t out, int64_t M, int64_t N, int64_t K, int64_t group_size) {
          const glmrt::DType xt = to_dtype(x_dtype), st = to_dtype(scale_dtype);
          const glmrt::DType bt = bias ? to_dtype(bias_dtype) : glmrt::DType::F32;
          py::gil_scoped_release release;
          glmrt::linear_quant(fmt, as_ptr(x), xt, as_ptr(w), as_ptr(scale), st, bias ? as_ptr(bias) : nullptr, bt,
                              as_ptr(out), M, N, K, group_size);
        },
        py::arg("x"), py::arg("x_dtype"), py::arg("w"), py::arg("scale"), py::arg("scale_dtype"), py::arg("bias"),
        py::arg("bias_dtype"), py::arg("out"), py::arg("M"), py::arg("N"), py::arg("K"), py::arg("group_size"), doc);
  };
  bind_linear("linear_int8", glmrt::QuantFormat::Int8,
              "out[M,N] = x[M,K] @ (w[N,K] int8 * scale)^T + bias; scale [N] (group_size 0) or [N, ceil(K/g)]");
  bind_linear("linear_int4", glmrt::QuantFormat::Int4,
              "out[M,N] = x[M,K] @ (unpack(w[N,ceil(K/2)]) * scale)^T + bias; even k in the high nibble");
  m.def("quant_linear_isa", &glmrt::quant_linear_isa,
        "Instruction-set path of linear_int8/linear_int4: 'avx512vnni', 'avx2' or 'scalar'");
  m.def("set_quant_linear_isa", [](const std::string& name) { return glmrt::set_quant_linear_isa(name.c_str()); },
        py::arg("name"), "Force a path no better than the CPU's (tests/benchmarks); False if unavailable");
  m.def(
      "dequantize_rows",
      [](int bits, uintptr_t w, uintptr_t scale, int scale_dtype, int64_t N, int64_t K, int64_t group_size,
         int64_t n0, int64_t n1, uintptr_t out, int out_dtype, int64_t ld) {
        if (bits != 8 && bits != 4) throw py::value_error("dequantize_rows: bits must be 8 or 4");
        const glmrt::DType st = to_dtype(scale_dtype), ot = to_dtype(out_dtype);
        py::gil_scoped_release release;
        glmrt::dequantize_rows(bits == 8 ? glmrt::QuantFormat::Int8 : glmrt::QuantFormat::Int4, as_ptr(w),
                               as_ptr(scale), st, N, K, group_size, n0, n1, as_ptr(out), ot, ld);
      },
      py::arg("bits"), py::arg("w"), py::arg("scale"), py::arg("scale_dtype"), py::arg("N"), py::arg("K"),
      py::arg("group_size"), py::arg("n0"), py::arg("n1"), py::arg("out"), py::arg("out_dtype"), py::arg("ld"),
      "out[(n-n0)*ld + k] = dequant(w)[n, k] for rows [n0, n1), in out_dtype (glmrt.quant.dequantize's values, "
      "exactly)");
  m.def("dequantize_rows_isa", &glmrt::dequantize_rows_isa, "Vector path of dequantize_rows: avx2 or scalar");
  m.def(
      "read_stream",
      [](uintptr_t data, int64_t bytes, int threads) {
        if (bytes % 64 != 0) throw py::value_error("read_stream: bytes must be a multiple of 64");
        py::gil_scoped_release release;
        return glmrt::read_stream(reinterpret_cast<const void*>(data), bytes, threads);
      },
      py::arg("data"), py::arg("bytes"), py::arg("threads"),
      "Read bytes once with wide vector loads on `threads` threads (memory bandwidth probe); returns a checksum "
      "(the wrapping sum of the 64-bit words)");
  m.def("read_stream_isa", &glmrt::read_stream_isa, "Vector path of read_stream: avx512, avx2 or scalar");
  m.def(
      "linear_float",
      [](uintptr_t x, uintptr_t w, uintptr_t bias, uintptr_t out, int dtype, int64_t M, int64_t N, int64_t K) {
        const glmrt::DType t = to_dtype(dtype);
        if (M > glmrt::kFloatGemvMaxM) throw py::value_error("linear_float: M must be <= FLOAT_GEMV_MAX_M");
        py::gil_scoped_release release;
        glmrt::linear_float(as_ptr(x), as_ptr(w), bias ? as_ptr(bias) : nullptr, as_ptr(out), t, M, N, K);
      },
      py::arg("x"), py::arg("w"), py::arg("bias"), py::arg("out"), py::arg("dtype"), py::arg("M"), py::arg("N"),
      py::arg("K"),
      "out[M,N] = x[M,K] @ w[N,K]^T + bias, one dtype for all (fp32 math, rounded once); M <= FLOAT_GEMV_MAX_M; "
      "bias 0 = none");
  m.attr("FLOAT_GEMV_MAX_M") = glmrt::kFloatGemvMaxM;
  m.def("linear_float_isa", &glmrt::linear_float_isa, "Vector path of linear_float: avx512, avx2 or scalar");
  m.def("set_linear_float_isa", [](const std::string& name) { return glmrt::set_linear_float_isa(name.c_str()); },
        py::arg("name"), "Force a path no better than the CPU's (tests); False if unavailable");
  m.def(
      "linear_float_gemm",
      [](uintptr_t x, uintptr_t w, uintptr_t bias, uintptr_t out, int dtype, int64_t M, int64_t N, int64_t K) {
        const glmrt::DType t = to_dtype(dtype);
        py::gil_scoped_release release;
        glmrt::linear_float_gemm(as_ptr(x), as_ptr(w), bias ? as_ptr(bias) : nullptr, as_ptr(out), t, M, N, K);
      },
      py::arg("x"), py::arg("w"), py::arg("bias"), py::arg("out"), py::arg("dtype"), py::arg("M"), py::arg("N"),
      py::arg("K"),
      "out[M,N] = x[M,K] @ w[N,K]^T + bias in fp16, any M, every output equal to linear_float's AVX2 path bit for "
      "bit (a prefill GEMM whose rows do not depend on M); bias 0 = none");
  m.def("linear_float_gemm_isa", &glmrt::linear_float_gemm_isa, "Vector path of linear_float_gemm: avx2 or none");
  m.def("linear_int8_has_vnni", []() { return std::string(glmrt::quant_linear_isa()) == "avx512vnni"; });
}
