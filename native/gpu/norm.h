// RMSNorm, LayerNorm and residual add + RMSNorm for CUDA and HIP. Host-side declaration only: no GPU header needed to call it.
#pragma once
#include <cstdint>

namespace glmrt {
namespace gpu {

// out[r, :] = RMSNorm(x[r, :]) * weight over row-major [rows, cols] tensors on `device`, queued
// on `stream` (a cudaStream_t / hipStream_t, 0 for the legacy default stream).
//
// dtype codes: 0 fp32, 1 bf16, 2 fp16; out has x's dtype. The mean of squares and the scaling
// are done in fp32 (1 / sqrt(mean + eps), correctly rounded). round_before_weight = false:
// weight (in fp32) * normalized, rounded once (THUDM ChatGLM2/3 and GLM-4 code); true: the
// normalized value is rounded to x's dtype first, multiplied by the weight in the promoted dtype
// of the two (rounded again), then stored in x's dtype (transformers' glm / glm4).
//
// Returns nullptr when the launch was queued, else the runtime's error message.
const char* rms_norm(const void* x, int x_dtype, const void* weight, int w_dtype, void* out, int64_t rows,
                     int64_t cols, float eps, bool round_before_weight, int device, void* stream);

// out[r, :] = LayerNorm(x[r, :]) * weight + bias (bias may be null: none). Mean and biased
// variance (two passes, no cancellation) in fp32, then (x - mean) / sqrt(var + eps) * weight + bias
// in fp32, rounded once to x's dtype (torch's layer_norm on half inputs; ChatGLM-6B, GLM-130B).
// weight and bias have their own dtype codes.
const char* layer_norm(const void* x, int x_dtype, const void* weight, int w_dtype, const void* bias, int b_dtype,
                       void* out, int64_t rows, int64_t cols, float eps, int device, void* stream);

// The fused residual + RMSNorm of glmrt.fusion: h = branch + residual * alpha in x_dtype exactly
// as torch computes it on two tensors of that dtype (residual * alpha rounded to x_dtype unless
// alpha is 1, then the sum rounded), written to h_out unless h_out is null; out = RMSNorm(h) *
// weight with the conventions of rms_norm. residual, branch, h_out and out share x_dtype.
const char* residual_rms_norm(const void* residual, const void* branch, int x_dtype, float alpha, const void* weight,
                              int w_dtype, void* h_out, void* out, int64_t rows, int64_t cols, float eps,
                              bool round_before_weight, int device, void* stream);

}  // namespace gpu
}  // namespace glmrt
