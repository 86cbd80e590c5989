// Rows of an INT8 / INT4 weight-only quantized matrix (glmrt.quant's format, see gemv_quant.h)
// dequantized to fp32 (or bf16 / fp16), for the prefill path: a panel of output rows at a time is widened into a
// buffer that stays in cache and multiplied with the fp32 GEMM of the host BLAS (see
// backends/cpu/kernels.py). Exactly glmrt.quant.dequantize's values in fp32: q * float(scale).
#pragma once
#include <cstdint>

#include "dtype.h"
#include "gemv_quant.h"

namespace glmrt {

// out[(n - n0) * ld + k] = q[n, k] * scale[n] (group_size 0) or q[n, k] * scale[n, k / group_size],
// for n in [n0, n1), k in [0, K); ld >= K. weight, scale and group_size as linear_quant takes them.
// out_type F32 stores the fp32 product; BF16 / F16 round it to nearest even, as the reference's
// .to(dtype) does. Threads (OpenMP) split the rows.
void dequantize_rows(QuantFormat format, const void* weight, const void* scale, DType scale_type, int64_t N,
                     int64_t K, int64_t group_size, int64_t n0, int64_t n1, void* out, DType out_type, int64_t ld);

// The vector path dequantize_rows takes: "avx2" or "scalar".
const char* dequantize_rows_isa();

}  // namespace glmrt
