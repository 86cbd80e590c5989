// Float16-weight prefill GEMM for the CPU whose every output equals the decode GEMV's bit for bit.
#pragma once
#include <cstdint>

#include "dtype.h"

namespace glmrt {

// y[M, N] = x[M, K] @ W[N, K]^T (+ bias[N]), x, W, bias and y in fp16, any M. Per (x row, output) the
// fp32 sums are those of linear_float's AVX2 path (gemv_float.cpp: 16 lane sums over k = 16 s + j,
// each a chain of fused multiply-adds in s order, the 8-wide remainder into lanes 0..7, hsum8's
// reduction tree, the k % 8 tail in k order, + bias, one rounding to fp16), so a row's result does
// not depend on M nor on whether the GEMV or this GEMM computed it. The loops are a GEMM's: W
// widened exactly to fp32 16 output rows at a time into a per-thread panel laid out by lane
// residue, x widened once, 6 x 16 outputs per register tile (12 accumulators, one per 8 outputs
// of a lane residue, kept in a small buffer between residues). OpenMP over blocks of 16 output rows.
// Throws std::runtime_error where the CPU lacks AVX2/FMA/F16C (linear_float_gemm_isa() == "none").
void linear_float_gemm(const void* x, const void* weight, const void* bias, void* out, DType dtype, int64_t M,
                       int64_t N, int64_t K);

// "avx2" where linear_float_gemm runs, "none" elsewhere.
const char* linear_float_gemm_isa();

}  // namespace glmrt
