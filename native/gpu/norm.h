// RMSNorm, LayerNorm and residual add + RMSNorm / LayerNorm for CUDA and HIP. Host-side declaration only: no GPU header needed to call it.
#pragma once
#include <cstdint>

namespace glmrt {
namespace gpu {

// out[r, :] = RMSNorm(x[r, :]) * weight over row-major [rows, cols] tensors on `device`, queued
// on `stream` (a cudaStream_t / hipStream_t, 0 for the legacy default stream).
//
// dtype codes: 0 fp32, 1 bf16, 2 fp16. The mean of squares and the scaling are done in fp32
// (1 / sqrt(mean + eps), correctly rounded). round_before_weight = false: weight (in fp32) *
// normalized, rounded once to x's dtype (THUDM ChatGLM2/3 and GLM-4 code); out_dtype must be
// x_dtype. true: the normalized value is rounded to x's dtype first, then multiplied by the weight
// in the promoted dtype of the two and stored in it (transformers' glm / glm4; glmrt.ops.norm
// returns torch's product as it is): out_dtype must be x_dtype when the weight has x's dtype, else
// fp32 (fp32 with anything; bf16 with fp16). A mismatched out_dtype is an argument error.
//
// Returns nullptr when the launch was queued, else the runtime's (or an argument) error message.
const char* rms_norm(const void* x, int x_dtype, const void* weight, int w_dtype, void* out, int out_dtype,
                     int64_t rows, int64_t cols, float eps, bool round_before_weight, int device, void* stream);

// out[r, :] = LayerNorm(x[r, :]) * weight + bias (bias may be null: none). Mean and biased
// variance (two passes, no cancellation) in fp32, then (x - mean) / sqrt(var + eps) * weight + bias
// in fp32, rounded once to x's dtype (torch's layer_norm on half inputs; ChatGLM-6B, GLM-130B).
// weight and bias have their own dtype codes; out always has x's dtype (torch's mixed-dtype
// layer_norm: half x with fp32 weight and bias).
const char* layer_norm(const void* x, int x_dtype, const void* weight, int w_dtype, const void* bias, int b_dtype,
                       void* out, int64_t rows, int64_t cols, float eps, int device, void* stream);

// The fused residual + RMSNorm of glmrt.fusion: h = branch + residual * alpha in x_dtype exactly
// as torch computes it on two tensors of that dtype (residual * alpha rounded to x_dtype unless
// alpha is 1, then the sum rounded), written to h_out unless h_out is null; out = RMSNorm(h) *
// weight with the conventions (and out_dtype rule) of rms_norm. residual, branch and h_out share
// x_dtype.
const char* residual_rms_norm(const void* residual, const void* branch, int x_dtype, float alpha, const void* weight,
                              int w_dtype, void* h_out, void* out, int out_dtype, int64_t rows, int64_t cols,
                              float eps, bool round_before_weight, int device, void* stream);

// The fused residual + LayerNorm of glmrt.fusion (ChatGLM-6B, GLM-130B; with their DeepNorm
// alpha the residual is the previous norm's output): h exactly as residual_rms_norm computes it,
// written to h_out unless h_out is null; out = LayerNorm(h) * weight + bias exactly as layer_norm
// computes it for a stored h (bias may be null). residual, branch, h_out and out share x_dtype.
const char* residual_layer_norm(const void* residual, const void* branch, int x_dtype, float alpha,
                                const void* weight, int w_dtype, const void* bias, int b_dtype, void* h_out,
                                void* out, int64_t rows, int64_t cols, float eps, int device, void* stream);

}  // namespace gpu
}  // namespace glmrt
