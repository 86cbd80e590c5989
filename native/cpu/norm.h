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

// Whether the running CPU takes the AVX2 path (chosen at run time).
const char* cpu_simd_level();

}  // namespace glmrt
