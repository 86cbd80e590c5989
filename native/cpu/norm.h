#pragma once
#include <cstdint>
#include "dtype.h"

namespace glmrt {

// RMSNorm over the last dimension of a row-major [rows, cols] tensor.
// The mean of squares and the scaling are done in fp32. With round_before_weight=false the
// result is multiplied by the weight in fp32 and rounded once (THUDM ChatGLM2/3/GLM-4 code);
// with true it is rounded to the storage dtype first and the product rounded again
// (transformers' glm / glm4).
void rms_norm(const void* x, DType x_type, const void* weight, DType w_type, void* out,
              int64_t rows, int64_t cols, float eps, bool round_before_weight);

// LayerNorm over the last dimension of a row-major [rows, cols] tensor, as torch's
// F.layer_norm computes it: mean and biased variance in fp32 (two passes),
// y = ((x - mean) * rstd) * weight + bias in fp32, rounded once to x's dtype.
// bias may be null (no bias); weight and bias may have a different dtype from x.
void layer_norm(const void* x, DType x_type, const void* weight, DType w_type, const void* bias, DType b_type,
                void* out, int64_t rows, int64_t cols, float eps);

// Fused residual add + norm (the residual_norm node of glmrt.fusion), one row at a time:
//   h   = round(branch + round(residual * alpha))   (alpha == 1: round(branch + residual))
// elementwise in fp32 with each product and sum rounded to x_type, exactly as torch's two
// elementwise ops round them; h is stored to h_out (null: not wanted). Then
//   out = norm(h), computed from the rounded h as rms_norm / layer_norm above compute it
//   (kind 0: RMSNorm with either rounding convention; kind 1: LayerNorm, bias may be null).
// residual, branch, h_out and out are row-major [rows, cols] in x_type.
enum class AddNormKind : int { RMS = 0, Layer = 1 };
void add_norm(const void* residual, const void* branch, DType x_type, float alpha, const void* weight,
              DType w_type, const void* bias, DType b_type, void* h_out, void* out, int64_t rows, int64_t cols,
              float eps, AddNormKind kind, bool round_before_weight);

// Whether the running CPU takes the AVX2 path (chosen at run time).
const char* cpu_simd_level();

}  // namespace glmrt
