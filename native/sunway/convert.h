// Bulk conversions between the storage dtypes and fp32, for data a "DMA" has brought into LDM.
// Same results as the scalar conversions of native/cpu/dtype.h (round to nearest even, NaN kept),
// vectorised: bf16 by bit operations, fp16 with F16C where the CPU has it.
#pragma once

#include <cstdint>

#include "dtype.h"

namespace glmrt::sunway {

// dst[i] = float(src[i]) for a 16-bit type (BF16 or F16).
void widen(const uint16_t* src, DType type, float* dst, int64_t n);

// dst[i] = src[i] rounded to a 16-bit type (BF16 or F16).
void narrow(const float* src, DType type, uint16_t* dst, int64_t n);

// x[i] = float(type(x[i])): round fp32 values to what `type` can hold (nothing to do for F32).
void round_in_place(float* x, DType type, int64_t n);

}  // namespace glmrt::sunway
