// RMSNorm and LayerNorm over the last dimension of [rows, cols], tiled for the SW26010-Pro LDM.
//
// Rows are dealt round robin to the 64 logical workers. A row is walked in chunks of at most
// kNormChunk columns, so any width fits: per chunk a worker holds the fp32 row chunk, a stage for
// the DMA of 16-bit data, and the weight (and bias) chunk. A row that fits in one chunk is read
// once; a wider one is read once per pass (two passes for RMSNorm, three for LayerNorm: mean,
// variance about the mean, normalise), which is what keeps it within the LDM.
#pragma once

#include <cstdint>

#include "dtype.h"
#include "gemm_tiled.h"
#include "ldm.h"

namespace glmrt::sunway {

constexpr int64_t kNormChunk = 4096;

struct NormPlan {
  int64_t rows = 0, cols = 0, chunk = 0, chunks = 0;
  int64_t x_bytes = 0, stage_bytes = 0, weight_bytes = 0, bias_bytes = 0;
  int64_t ldm_bytes() const { return x_bytes + stage_bytes + weight_bytes + bias_bytes; }
  bool fits() const { return ldm_bytes() <= kLdmTileBudget; }
};

constexpr int64_t norm_tile_bytes(int64_t chunk, bool has_bias) {
  return ldm_alloc(4 * chunk) + ldm_alloc(4 * chunk) + ldm_alloc(4 * chunk) + (has_bias ? ldm_alloc(4 * chunk) : 0);
}
static_assert(norm_tile_bytes(kNormChunk, true) <= kLdmTileBudget, "a norm chunk does not fit in one LDM");

NormPlan plan_norm(int64_t rows, int64_t cols, bool has_bias);

// RMSNorm with the reference's arithmetic: mean of squares and scaling in fp32; with
// round_before_weight=false the fp32 product with the weight is rounded once (THUDM code), with
// true the normalised value is rounded to x's dtype first and the product rounded again in the
// promoted dtype of x and the weight (transformers' glm / glm4).
void rms_norm_tiled(const NormPlan& plan, const void* x, DType x_type, const void* weight, DType w_type, void* out,
                    float eps, bool round_before_weight);

// LayerNorm like torch's: mean and variance (biased) in fp32, y = (x - mean) * rstd * w + b in
// fp32, rounded once to x's dtype. weight and bias may be null.
void layer_norm_tiled(const NormPlan& plan, const void* x, DType x_type, const void* weight, DType w_type,
                      const void* bias, DType b_type, void* out, float eps);

}  // namespace glmrt::sunway
