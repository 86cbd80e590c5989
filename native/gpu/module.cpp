// glmrt._native_cuda / glmrt._native_hip: the same bindings for both GPU targets (the build
// defines GLMRT_GPU_MODULE, GLMRT_GPU_PLATFORM and GLMRT_GPU_ARCHS, comma-separated). Compiled by the host C++
// compiler: it sees only the host-side declarations, never a GPU header.
//
// Like glmrt._native_cpu, functions take raw device pointers as integers, shapes, dtype codes
// (0 fp32, 1 bf16, 2 fp16), the device index and a stream handle as an integer
// (torch.cuda.current_stream().cuda_stream; 0 = the legacy default stream), so the module does not
// link against torch. Launches are queued on that stream and return at once (no host sync), so
// they can be captured in a CUDA / HIP graph. The GIL is released around each launch.
#include <pybind11/pybind11.h>
#include <pybind11/stl.h>

#include <sstream>
#include <string>
#include <vector>

#include "gemv_quant.h"
#include "norm.h"
#include "rope.h"

#ifndef GLMRT_GPU_MODULE
#error "GLMRT_GPU_MODULE (the Python module name) must be defined by the build"
#endif
#ifndef GLMRT_GPU_PLATFORM
#error "GLMRT_GPU_PLATFORM (\"cuda\" or \"hip\") must be defined by the build"
#endif
#ifndef GLMRT_GPU_ARCHS
#define GLMRT_GPU_ARCHS ""
#endif

namespace py = pybind11;
namespace gpu = glmrt::gpu;

namespace {

const void* as_ptr(uintptr_t p) { return reinterpret_cast<const void*>(p); }
void* as_out(uintptr_t p) { return reinterpret_cast<void*>(p); }

void check(const char* error, const char* what) {
  if (error != nullptr) throw std::runtime_error(std::string(what) + ": " + error);
}

std::vector<std::string> archs() {
  std::vector<std::string> out;
  std::stringstream list(GLMRT_GPU_ARCHS);
  std::string item;
  while (std::getline(list, item, ','))
    if (!item.empty()) out.push_back(item);
  return out;
}

}  // namespace

PYBIND11_MODULE(GLMRT_GPU_MODULE, m) {
  m.doc() = "glmrt native GPU kernels (" GLMRT_GPU_PLATFORM ")";
  m.attr("ABI_VERSION") = 1;
  m.attr("PLATFORM") = GLMRT_GPU_PLATFORM;
  m.attr("GEMV_ROWS_PER_LAUNCH") = gpu::kGemvRowsPerLaunch;
  m.def("archs", &archs, "The GPU architectures this module was compiled for (e.g. ['sm_80', 'sm_90'] or ['gfx906'])");
  m.def("runtime_version", &gpu::runtime_version, "The GPU runtime's version (-1 if it cannot be queried)");
  m.def("driver_version", &gpu::driver_version, "The driver's version (-1 / 0 when no driver is present)");
  m.def(
      "warp_size",
      [](int device) {
        int size = 0;
        check(gpu::device_warp_size(device, &size), "warp_size");
        return size;
      },
      py::arg("device"), "The device's warp / wavefront size (32 on NVIDIA, 64 on AMD CDNA / Hygon DCU)");

  m.def(
      "rms_norm",
      [](uintptr_t x, int x_dtype, uintptr_t w, int w_dtype, uintptr_t out, int64_t rows, int64_t cols, float eps,
         bool round_before_weight, int device, uintptr_t stream) {
        const char* error;
        {
          py::gil_scoped_release release;
          error = gpu::rms_norm(as_ptr(x), x_dtype, as_ptr(w), w_dtype, as_out(out), rows, cols, eps,
                                round_before_weight, device, as_out(stream));
        }
        check(error, "rms_norm");
      },
      py::arg("x"), py::arg("x_dtype"), py::arg("weight"), py::arg("w_dtype"), py::arg("out"), py::arg("rows"),
      py::arg("cols"), py::arg("eps"), py::arg("round_before_weight"), py::arg("device"), py::arg("stream"),
      "out[rows, cols] = RMSNorm(x) * weight (fp32 math); see native/gpu/norm.h for the two rounding conventions");

  m.def(
      "layer_norm",
      [](uintptr_t x, int x_dtype, uintptr_t w, int w_dtype, uintptr_t bias, int b_dtype, uintptr_t out, int64_t rows,
         int64_t cols, float eps, int device, uintptr_t stream) {
        const char* error;
        {
          py::gil_scoped_release release;
          error = gpu::layer_norm(as_ptr(x), x_dtype, as_ptr(w), w_dtype, bias ? as_ptr(bias) : nullptr, b_dtype,
                                  as_out(out), rows, cols, eps, device, as_out(stream));
        }
        check(error, "layer_norm");
      },
      py::arg("x"), py::arg("x_dtype"), py::arg("weight"), py::arg("w_dtype"), py::arg("bias"), py::arg("b_dtype"),
      py::arg("out"), py::arg("rows"), py::arg("cols"), py::arg("eps"), py::arg("device"), py::arg("stream"),
      "out[rows, cols] = LayerNorm(x) * weight + bias (fp32 math, rounded once); bias 0 = none");

  m.def(
      "residual_rms_norm",
      [](uintptr_t residual, uintptr_t branch, int x_dtype, float alpha, uintptr_t w, int w_dtype, uintptr_t h_out,
         uintptr_t out, int64_t rows, int64_t cols, float eps, bool round_before_weight, int device,
         uintptr_t stream) {
        const char* error;
        {
          py::gil_scoped_release release;
          error = gpu::residual_rms_norm(as_ptr(residual), as_ptr(branch), x_dtype, alpha, as_ptr(w), w_dtype,
                                         h_out ? as_out(h_out) : nullptr, as_out(out), rows, cols, eps,
                                         round_before_weight, device, as_out(stream));
        }
        check(error, "residual_rms_norm");
      },
      py::arg("residual"), py::arg("branch"), py::arg("x_dtype"), py::arg("alpha"), py::arg("weight"),
      py::arg("w_dtype"), py::arg("h_out"), py::arg("out"), py::arg("rows"), py::arg("cols"), py::arg("eps"),
      py::arg("round_before_weight"), py::arg("device"), py::arg("stream"),
      "h = branch + residual * alpha (rounded as torch does, in x's dtype), written to h_out (0 = not written); "
      "out = RMSNorm(h) * weight, see native/gpu/norm.h");

  m.def(
      "rope_interleaved",
      [](uintptr_t qkv, int dtype, uintptr_t cos, uintptr_t sin, uintptr_t q_out, uintptr_t k_out, int64_t rows,
         int64_t num_heads, int64_t num_kv_heads, int64_t head_dim, int64_t rotary_dim, int device, uintptr_t stream) {
        const char* error;
        {
          py::gil_scoped_release release;
          error = gpu::rope_interleaved(as_ptr(qkv), dtype, as_ptr(cos), as_ptr(sin), as_out(q_out), as_out(k_out),
                                        rows, num_heads, num_kv_heads, head_dim, rotary_dim, device, as_out(stream));
        }
        check(error, "rope_interleaved");
      },
      py::arg("qkv"), py::arg("dtype"), py::arg("cos"), py::arg("sin"), py::arg("q_out"), py::arg("k_out"),
      py::arg("rows"), py::arg("num_heads"), py::arg("num_kv_heads"), py::arg("head_dim"), py::arg("rotary_dim"),
      py::arg("device"), py::arg("stream"),
      "q_out, k_out = the q and k heads of qkv[rows, (nh + 2 nkv) * hd], interleaved rotary on the first "
      "rotary_dim dims with cos / sin [rows, rotary_dim / 2]; see native/gpu/rope.h");

  auto bind_linear = [&m](const char* name, int bits, const char* doc) {
    m.def(
        name,
        [bits](uintptr_t x, int x_dtype, uintptr_t w, uintptr_t scale, int scale_dtype, uintptr_t bias,
               int bias_dtype, uintptr_t out, int64_t M, int64_t N, int64_t K, int64_t group_size, int device,
               uintptr_t stream) {
          const char* error;
          {
            py::gil_scoped_release release;
            error = gpu::linear_quant(bits, as_ptr(x), x_dtype, as_ptr(w), as_ptr(scale), scale_dtype,
                                      bias ? as_ptr(bias) : nullptr, bias_dtype, as_out(out), M, N, K, group_size,
                                      device, as_out(stream));
          }
          check(error, bits == 8 ? "linear_int8" : "linear_int4");
        },
        py::arg("x"), py::arg("x_dtype"), py::arg("w"), py::arg("scale"), py::arg("scale_dtype"), py::arg("bias"),
        py::arg("bias_dtype"), py::arg("out"), py::arg("M"), py::arg("N"), py::arg("K"), py::arg("group_size"),
        py::arg("device"), py::arg("stream"), doc);
  };
  bind_linear("linear_int8", 8,
              "out[M,N] = x[M,K] @ (w[N,K] int8 * scale)^T + bias; scale [N] (group_size 0) or [N, ceil(K/g)]; "
              "bias 0 = none. GEMV: each launch covers GEMV_ROWS_PER_LAUNCH rows of x");
  bind_linear("linear_int4", 4,
              "out[M,N] = x[M,K] @ (unpack(w[N,ceil(K/2)]) * scale)^T + bias; even k in the high nibble; "
              "bias 0 = none. GEMV: each launch covers GEMV_ROWS_PER_LAUNCH rows of x");
}
