// Whole-row conversions between the storage dtypes and fp32, vectorised (F16C / AVX2 / AVX-512
// chosen at run time), with the same rounding as dtype.h's scalar conversions (nearest even).
#pragma once
#include <cstdint>

#include "dtype.h"

namespace glmrt {

void load_row_f32(const void* src, DType t, float* dst, int64_t n);   // n values of dtype t at src
void store_row_f32(const float* src, DType t, void* dst, int64_t n);  // rounded to dtype t
void round_row(float* x, DType t, int64_t n);                         // x = round_to(x, t), in place

// fp32 row reductions with sixteen partial sums (vectorised without -ffast-math; a fixed order, so
// every kernel that uses them rounds alike).
float row_sum(const float* x, int64_t n);
float row_centered_sum_of_squares(const float* x, float center, int64_t n);  // sum((x - center)^2)

}  // namespace glmrt
