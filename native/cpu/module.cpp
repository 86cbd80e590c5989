// glmrt._native_cpu: CPU kernels. Functions take raw data pointers (as integers), shapes and
// dtype codes, so the module does not link against torch; glmrt wraps them as torch ops.
#include <pybind11/pybind11.h>

#include "norm.h"

namespace py = pybind11;

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
}
