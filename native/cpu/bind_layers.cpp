// Python bindings of the LayerNorm, RoPE and attention kernels (see module.cpp for the convention:
// raw data pointers as integers, shapes, dtype codes; no torch linking).
#include <pybind11/pybind11.h>

#include "attention.h"
#include "norm.h"
#include "rope.h"

namespace py = pybind11;

namespace glmrt {

namespace {
DType dtype_of(int code) {
  if (code < 0 || code > 2) throw py::value_error("dtype code must be 0 (fp32), 1 (bf16) or 2 (fp16)");
  return static_cast<DType>(code);
}
const void* cptr(uintptr_t p) { return reinterpret_cast<const void*>(p); }
void* mptr(uintptr_t p) { return reinterpret_cast<void*>(p); }
}  // namespace

void bind_layer_kernels(py::module_& m) {
  m.def(
      "layer_norm",
      [](uintptr_t x, int x_dtype, uintptr_t w, int w_dtype, uintptr_t bias, int b_dtype, uintptr_t out,
         int64_t rows, int64_t cols, float eps) {
        const DType xt = dtype_of(x_dtype), wt = dtype_of(w_dtype), bt = bias ? dtype_of(b_dtype) : DType::F32;
        py::gil_scoped_release release;
        layer_norm(cptr(x), xt, cptr(w), wt, bias ? cptr(bias) : nullptr, bt, mptr(out), rows, cols, eps);
      },
      py::arg("x"), py::arg("x_dtype"), py::arg("weight"), py::arg("w_dtype"), py::arg("bias"), py::arg("b_dtype"),
      py::arg("out"), py::arg("rows"), py::arg("cols"), py::arg("eps"),
      "LayerNorm over the last dim of [rows, cols] (bias 0 = none), torch F.layer_norm numerics");

  m.def(
      "add_norm",
      [](uintptr_t residual, uintptr_t branch, int x_dtype, float alpha, uintptr_t w, int w_dtype, uintptr_t bias,
         int b_dtype, uintptr_t h_out, uintptr_t out, int64_t rows, int64_t cols, float eps, int kind,
         bool round_before_weight) {
        const DType xt = dtype_of(x_dtype), wt = dtype_of(w_dtype), bt = bias ? dtype_of(b_dtype) : DType::F32;
        if (kind != 0 && kind != 1) throw py::value_error("add_norm kind must be 0 (RMSNorm) or 1 (LayerNorm)");
        if (!residual || !branch || !w || !out) throw py::value_error("add_norm: residual, branch, weight and out "
                                                                      "must not be null");
        py::gil_scoped_release release;
        add_norm(cptr(residual), cptr(branch), xt, alpha, cptr(w), wt, bias ? cptr(bias) : nullptr, bt,
                 h_out ? mptr(h_out) : nullptr, mptr(out), rows, cols, eps, static_cast<AddNormKind>(kind),
                 round_before_weight);
      },
      py::arg("residual"), py::arg("branch"), py::arg("x_dtype"), py::arg("alpha"), py::arg("weight"),
      py::arg("w_dtype"), py::arg("bias"), py::arg("b_dtype"), py::arg("h_out"), py::arg("out"), py::arg("rows"),
      py::arg("cols"), py::arg("eps"), py::arg("kind"), py::arg("round_before_weight"),
      "h = branch + residual * alpha (rounded like torch), then RMSNorm (kind 0) or LayerNorm (kind 1) of h over "
      "the last dim of [rows, cols]; h_out 0 = do not store h, bias 0 = none. See norm.h");

  m.def(
      "rope",
      [](uintptr_t qkv, int dtype, int64_t rows, int64_t row_stride, int64_t num_heads, int64_t num_kv_heads,
         int64_t head_dim, int kind, int64_t rotary_dim, uintptr_t cos, uintptr_t sin, uintptr_t cos2,
         uintptr_t sin2, uintptr_t q_out, uintptr_t k_out) {
        const DType t = dtype_of(dtype);
        if (kind < 0 || kind > 2) throw py::value_error("rope kind must be 0 (interleaved), 1 (half) or 2 (2-D)");
        py::gil_scoped_release release;
        rope_split(cptr(qkv), t, rows, row_stride, num_heads, num_kv_heads, head_dim, static_cast<RopeKind>(kind),
                   rotary_dim, cptr(cos), cptr(sin), cos2 ? cptr(cos2) : nullptr, sin2 ? cptr(sin2) : nullptr,
                   mptr(q_out), mptr(k_out));
      },
      py::arg("qkv"), py::arg("dtype"), py::arg("rows"), py::arg("row_stride"), py::arg("num_heads"),
      py::arg("num_kv_heads"), py::arg("head_dim"), py::arg("kind"), py::arg("rotary_dim"), py::arg("cos"),
      py::arg("sin"), py::arg("cos2"), py::arg("sin2"), py::arg("q_out"), py::arg("k_out"),
      "Split fused qkv rows into contiguous q, k and rotate them (kinds: 0 interleaved, 1 half, 2 2-D)");

  m.def(
      "attention",
      [](int dtype, int64_t batch, int64_t q_len, int64_t kv_len, int64_t num_heads, int64_t num_kv_heads,
         int64_t head_dim, uintptr_t q, int64_t q_sb, int64_t q_st, int64_t q_sh, uintptr_t k, int64_t k_sb,
         int64_t k_sh, int64_t k_ss, uintptr_t v, int64_t v_sb, int64_t v_sh, int64_t v_ss, uintptr_t allowed,
         int64_t m_sb, int64_t m_st, int64_t m_ss, uintptr_t out, bool layer_scaled, float scale, float q_divisor,
         float coeff, uintptr_t kv_lens) {
        AttentionArgs a{dtype_of(dtype), batch, q_len, kv_len, num_heads, num_kv_heads, head_dim,
                        cptr(q), q_sb, q_st, q_sh, cptr(k), k_sb, k_sh, k_ss, cptr(v), v_sb, v_sh, v_ss,
                        static_cast<const uint8_t*>(cptr(allowed)), m_sb, m_st, m_ss, mptr(out),
                        layer_scaled, scale, q_divisor, coeff,
                        kv_lens ? static_cast<const int64_t*>(cptr(kv_lens)) : nullptr};
        py::gil_scoped_release release;
        attention(a);
      },
      py::arg("dtype"), py::arg("batch"), py::arg("q_len"), py::arg("kv_len"), py::arg("num_heads"),
      py::arg("num_kv_heads"), py::arg("head_dim"), py::arg("q"), py::arg("q_sb"), py::arg("q_st"), py::arg("q_sh"),
      py::arg("k"), py::arg("k_sb"), py::arg("k_sh"), py::arg("k_ss"), py::arg("v"), py::arg("v_sb"),
      py::arg("v_sh"), py::arg("v_ss"), py::arg("allowed"), py::arg("m_sb"), py::arg("m_st"), py::arg("m_ss"),
      py::arg("out"), py::arg("layer_scaled"), py::arg("scale"), py::arg("q_divisor"), py::arg("coeff"),
      py::arg("kv_lens") = 0,
      "GQA attention of q [B,T,nh,hd] over keys/values [B,nkv,S,hd] (element strides) under allowed [B,T,S] "
      "(byte strides); out [B,T,nh*hd]; kv_lens: optional int64 [B] per-row key counts (0: none). See "
      "attention.h for the numerics");
}

}  // namespace glmrt
