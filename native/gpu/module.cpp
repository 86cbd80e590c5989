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

#include "attention.h"
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
      [](uintptr_t x, int x_dtype, uintptr_t w, int w_dtype, uintptr_t out, int out_dtype, int64_t rows, int64_t cols,
         float eps, bool round_before_weight, int device, uintptr_t stream) {
        const char* error;
        {
          py::gil_scoped_release release;
          error = gpu::rms_norm(as_ptr(x), x_dtype, as_ptr(w), w_dtype, as_out(out), out_dtype, rows, cols, eps,
                                round_before_weight, device, as_out(stream));
        }
        check(error, "rms_norm");
      },
      py::arg("x"), py::arg("x_dtype"), py::arg("weight"), py::arg("w_dtype"), py::arg("out"), py::arg("out_dtype"),
      py::arg("rows"), py::arg("cols"), py::arg("eps"), py::arg("round_before_weight"), py::arg("device"),
      py::arg("stream"),
      "out[rows, cols] = RMSNorm(x) * weight (fp32 math); see native/gpu/norm.h for the two rounding conventions "
      "and out_dtype (x's, or with round_before_weight the promoted dtype of x and weight)");

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
         uintptr_t out, int out_dtype, int64_t rows, int64_t cols, float eps, bool round_before_weight, int device,
         uintptr_t stream) {
        const char* error;
        {
          py::gil_scoped_release release;
          error = gpu::residual_rms_norm(as_ptr(residual), as_ptr(branch), x_dtype, alpha, as_ptr(w), w_dtype,
                                         h_out ? as_out(h_out) : nullptr, as_out(out), out_dtype, rows, cols, eps,
                                         round_before_weight, device, as_out(stream));
        }
        check(error, "residual_rms_norm");
      },
      py::arg("residual"), py::arg("branch"), py::arg("x_dtype"), py::arg("alpha"), py::arg("weight"),
      py::arg("w_dtype"), py::arg("h_out"), py::arg("out"), py::arg("out_dtype"), py::arg("rows"), py::arg("cols"),
      py::arg("eps"), py::arg("round_before_weight"), py::arg("device"), py::arg("stream"),
      "h = branch + residual * alpha (rounded as torch does, in x's dtype), written to h_out (0 = not written); "
      "out = RMSNorm(h) * weight in out_dtype, see native/gpu/norm.h");

  m.def(
      "residual_layer_norm",
      [](uintptr_t residual, uintptr_t branch, int x_dtype, float alpha, uintptr_t w, int w_dtype, uintptr_t bias,
         int b_dtype, uintptr_t h_out, uintptr_t out, int64_t rows, int64_t cols, float eps, int device,
         uintptr_t stream) {
        const char* error;
        {
          py::gil_scoped_release release;
          error = gpu::residual_layer_norm(as_ptr(residual), as_ptr(branch), x_dtype, alpha, as_ptr(w), w_dtype,
                                           bias ? as_ptr(bias) : nullptr, b_dtype, h_out ? as_out(h_out) : nullptr,
                                           as_out(out), rows, cols, eps, device, as_out(stream));
        }
        check(error, "residual_layer_norm");
      },
      py::arg("residual"), py::arg("branch"), py::arg("x_dtype"), py::arg("alpha"), py::arg("weight"),
      py::arg("w_dtype"), py::arg("bias"), py::arg("b_dtype"), py::arg("h_out"), py::arg("out"), py::arg("rows"),
      py::arg("cols"), py::arg("eps"), py::arg("device"), py::arg("stream"),
      "h = branch + residual * alpha (rounded as torch does, in x's dtype), written to h_out (0 = not written); "
      "out = LayerNorm(h) * weight + bias (bias 0 = none), see native/gpu/norm.h");

  m.def(
      "rope",
      [](uintptr_t qkv, int dtype, int kind, uintptr_t cos, uintptr_t sin, uintptr_t cos2, uintptr_t sin2,
         uintptr_t q_out, uintptr_t k_out, int64_t rows, int64_t num_heads, int64_t num_kv_heads, int64_t head_dim,
         int64_t rotary_dim, int device, uintptr_t stream) {
        const char* error;
        {
          py::gil_scoped_release release;
          error = gpu::rope(as_ptr(qkv), dtype, kind, as_ptr(cos), as_ptr(sin), cos2 ? as_ptr(cos2) : nullptr,
                            sin2 ? as_ptr(sin2) : nullptr, as_out(q_out), as_out(k_out), rows, num_heads,
                            num_kv_heads, head_dim, rotary_dim, device, as_out(stream));
        }
        check(error, "rope");
      },
      py::arg("qkv"), py::arg("dtype"), py::arg("kind"), py::arg("cos"), py::arg("sin"), py::arg("cos2"),
      py::arg("sin2"), py::arg("q_out"), py::arg("k_out"), py::arg("rows"), py::arg("num_heads"),
      py::arg("num_kv_heads"), py::arg("head_dim"), py::arg("rotary_dim"), py::arg("device"), py::arg("stream"),
      "q_out, k_out = the q and k heads of qkv[rows, (nh + 2 nkv) * hd] rotated; kind 0 interleaved, 1 half "
      "(NeoX), 2 2-D (ChatGLM-6B: cos2 / sin2 the block-position tables, else 0); cos / sin [rows, rotary_dim / 2] "
      "(head_dim / 4 for 2-D); see native/gpu/rope.h");

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

  // Prefill: dequantize the weight once, then the caller runs a cuBLAS / hipBLAS GEMM (torch).
  auto bind_dequantize = [&m](const char* name, int bits, const char* doc) {
    m.def(
        name,
        [bits](uintptr_t w, uintptr_t scale, int scale_dtype, uintptr_t out, int out_dtype, int64_t N, int64_t K,
               int64_t group_size, int device, uintptr_t stream) {
          const char* error;
          {
            py::gil_scoped_release release;
            error = gpu::dequantize_weight(bits, as_ptr(w), as_ptr(scale), scale_dtype, as_out(out), out_dtype, N, K,
                                           group_size, device, as_out(stream));
          }
          check(error, bits == 8 ? "dequantize_int8" : "dequantize_int4");
        },
        py::arg("w"), py::arg("scale"), py::arg("scale_dtype"), py::arg("out"), py::arg("out_dtype"), py::arg("N"),
        py::arg("K"), py::arg("group_size"), py::arg("device"), py::arg("stream"), doc);
  };
  bind_dequantize("dequantize_int8", 8,
                  "out[N,K] = w[N,K] int8 * scale in out_dtype (fp32 product, rounded once: glmrt.quant.dequantize "
                  "bit for bit); scale [N] (group_size 0) or [N, ceil(K/g)]. For prefill: dequantize, then GEMM");
  bind_dequantize("dequantize_int4", 4,
                  "out[N,K] = unpack(w[N,ceil(K/2)]) * scale in out_dtype, even k in the high nibble (fp32 "
                  "product, rounded once: glmrt.quant.dequantize bit for bit). For prefill: dequantize, then GEMM");

  // Decode attention over the KV cache; see native/gpu/attention.h for the layouts and the numerics.
  m.attr("ATTENTION_MAX_HEAD_DIM") = gpu::kAttentionMaxHeadDim;
  m.def(
      "attention_workspace_bytes",
      [](int64_t batch, int64_t q_len, int64_t kv_len, int64_t num_heads, int64_t num_kv_heads, int64_t head_dim,
         int64_t kv_split) {
        const int64_t bytes =
            gpu::attention_workspace_bytes(batch, q_len, kv_len, num_heads, num_kv_heads, head_dim, kv_split);
        if (bytes < 0) throw std::runtime_error("attention_workspace_bytes: invalid shapes");
        return bytes;
      },
      py::arg("batch"), py::arg("q_len"), py::arg("kv_len"), py::arg("num_heads"), py::arg("num_kv_heads"),
      py::arg("head_dim"), py::arg("kv_split") = 0,
      "Bytes of device scratch attention() needs for these shapes (depends on the shapes and kv_split only)");
  m.def(
      "attention_kv_splits",
      [](int64_t batch, int64_t q_len, int64_t kv_len, int64_t num_heads, int64_t num_kv_heads, int64_t head_dim,
         int64_t kv_split) {
        const int64_t n = gpu::attention_kv_splits(batch, q_len, kv_len, num_heads, num_kv_heads, head_dim, kv_split);
        if (n < 0) throw std::runtime_error("attention_kv_splits: invalid shapes");
        return n;
      },
      py::arg("batch"), py::arg("q_len"), py::arg("kv_len"), py::arg("num_heads"), py::arg("num_kv_heads"),
      py::arg("head_dim"), py::arg("kv_split") = 0, "How many KV splits attention() uses for these shapes");
  m.def(
      "attention",
      [](int dtype, int64_t batch, int64_t q_len, int64_t kv_len, int64_t num_heads, int64_t num_kv_heads,
         int64_t head_dim, uintptr_t q, int64_t q_sb, int64_t q_st, int64_t q_sh, uintptr_t k, int64_t k_sb,
         int64_t k_sh, int64_t k_ss, uintptr_t v, int64_t v_sb, int64_t v_sh, int64_t v_ss, uintptr_t allowed,
         int64_t m_sb, int64_t m_st, int64_t m_ss, uintptr_t out, bool layer_scaled, float scale, float q_divisor,
         float coeff, uintptr_t workspace, int64_t workspace_bytes, int64_t kv_split, int device, uintptr_t stream) {
        gpu::AttentionArgs a{};
        a.dtype = dtype;
        a.batch = batch;
        a.q_len = q_len;
        a.kv_len = kv_len;
        a.num_heads = num_heads;
        a.num_kv_heads = num_kv_heads;
        a.head_dim = head_dim;
        a.q = as_ptr(q);
        a.q_stride_b = q_sb;
        a.q_stride_t = q_st;
        a.q_stride_h = q_sh;
        a.k = as_ptr(k);
        a.k_stride_b = k_sb;
        a.k_stride_h = k_sh;
        a.k_stride_s = k_ss;
        a.v = as_ptr(v);
        a.v_stride_b = v_sb;
        a.v_stride_h = v_sh;
        a.v_stride_s = v_ss;
        a.allowed = as_ptr(allowed);
        a.m_stride_b = m_sb;
        a.m_stride_t = m_st;
        a.m_stride_s = m_ss;
        a.out = as_out(out);
        a.layer_scaled = layer_scaled;
        a.scale = scale;
        a.q_divisor = q_divisor;
        a.coeff = coeff;
        a.kv_split = kv_split;
        const char* error;
        {
          py::gil_scoped_release release;
          error = gpu::attention(a, as_out(workspace), workspace_bytes, device, as_out(stream));
        }
        check(error, "attention");
      },
      py::arg("dtype"), py::arg("batch"), py::arg("q_len"), py::arg("kv_len"), py::arg("num_heads"),
      py::arg("num_kv_heads"), py::arg("head_dim"), py::arg("q"), py::arg("q_stride_b"), py::arg("q_stride_t"),
      py::arg("q_stride_h"), py::arg("k"), py::arg("k_stride_b"), py::arg("k_stride_h"), py::arg("k_stride_s"),
      py::arg("v"), py::arg("v_stride_b"), py::arg("v_stride_h"), py::arg("v_stride_s"), py::arg("allowed"),
      py::arg("m_stride_b"), py::arg("m_stride_t"), py::arg("m_stride_s"), py::arg("out"), py::arg("layer_scaled"),
      py::arg("scale"), py::arg("q_divisor"), py::arg("coeff"), py::arg("workspace"), py::arg("workspace_bytes"),
      py::arg("kv_split"), py::arg("device"), py::arg("stream"),
      "out[B, T, nh * hd] = attention of q[B, T, nh, hd] over k, v [B, nkv, S, hd] (element strides) under "
      "allowed[B, T, S] (byte strides), fp32 softmax; workspace of attention_workspace_bytes. See "
      "native/gpu/attention.h");
}
