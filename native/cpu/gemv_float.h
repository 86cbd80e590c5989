// Float-weight GEMV for CPU decode: y[M, N] = x[M, K] @ W[N, K]^T (+ bias[N]) for a few rows of x.
#pragma once
#include <cstdint>
#include "dtype.h"

namespace glmrt {

// Small M only (decode; the caller sends prefill to a GEMM): every weight row is read once per call
// and dotted with all M rows of x. x, W, bias and y share one dtype (fp32, bf16 or fp16); the
// products and sums are fp32 (x and W converted exactly), bias added in fp32, y rounded once to
// the dtype with round-to-nearest-even: what torch's F.linear computes, up to the fp32 summation
// order. bias may be null. OpenMP over blocks of output rows. M must be in [0, kFloatGemvMaxM].
constexpr int64_t kFloatGemvMaxM = 8;
void linear_float(const void* x, const void* weight, const void* bias, void* out, DType dtype, int64_t M, int64_t N,
                  int64_t K);

// The instruction-set path linear_float takes: "avx512", "avx2" or "scalar".
const char* linear_float_isa();
// Forces a path no better than the CPU's (tests); false, changing nothing, when unavailable.
bool set_linear_float_isa(const char* name);

}  // namespace glmrt
