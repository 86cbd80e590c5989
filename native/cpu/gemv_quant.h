// Weight-only INT8 / INT4 linear layers (GLM-130B / ChatGLM formats) for CPU decode and prefill.
#pragma once
#include <cstdint>
#include "dtype.h"

namespace glmrt {

enum class QuantFormat : int { Int8 = 8, Int4 = 4 };

// y[M, N] = x[M, K] @ dequant(W)^T (+ bias[N]); y has x's dtype, accumulation is fp32.
//
// W is int8 [N, K] row-major (Int8), or int4 packed two per byte into [N, ceil(K/2)] with the EVEN
// index in the HIGH nibble: byte = (q[2j] << 4) | (q[2j+1] & 0xF) (Int4; odd K pads the last low
// nibble). dequant(W)[n, k] = q[n, k] * scale[n] when group_size == 0 (scale [N]), or
// q[n, k] * scale[n, k / group_size] when group_size > 0 (scale [N, ceil(K / group_size)], the last
// group may be shorter). group_size must be 0 or a positive multiple of 32.
// bias may be null.
//
// Numerics: each row of x is quantized to int8 per block of 32 along K (symmetric,
// d = max|x_block| / 127, q = round-half-even(x * (127 / max|x_block|))) and the products are
// exact integer dot products per block, summed in fp32 as sum_b d_b * scale * dot_b. The only
// approximation against the fp32 dequantized reference is that activation rounding:
// |y - y_ref| <= 0.5 * sum_k d_block(k) * |dequant(W)[n, k]| (plus fp32 summation error), the same
// scheme as llama.cpp's q8 activations. Every instruction-set path gives the same integers.
void linear_quant(QuantFormat format, const void* x, DType x_type, const void* weight, const void* scale,
                  DType scale_type, const void* bias, DType bias_type, void* out, int64_t M, int64_t N,
                  int64_t K, int64_t group_size);

// The instruction-set path the quantized kernels take: "avx512vnni", "avx2" or "scalar"
// (chosen once from the running CPU).
const char* quant_linear_isa();

// Forces a path (for tests and benchmarks). Returns false, changing nothing, when the CPU lacks it.
bool set_quant_linear_isa(const char* name);

}  // namespace glmrt
