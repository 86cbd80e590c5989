// Linear layers tiled for the SW26010-Pro LDM: out[M, N] = x[M, K] @ W^T (+ bias[N]).
//
// W is one of
//   Float: [N, K] in fp32 / bf16 / fp16 (the activation dtype);
//   Int8:  [N, K] int8 values q;
//   Int4:  [N, ceil(K/2)] bytes, two values per byte with the EVEN index in the HIGH nibble:
//          byte = (q[2j] << 4) | (q[2j+1] & 0xF); odd K leaves the last low nibble 0
// and for Int8/Int4 dequant(W)[n, k] = q[n, k] * scale[n] (group_size 0, scale [N]) or
// q[n, k] * scale[n, k / group_size] (scale [N, ceil(K / group_size)]), rounded to the activation
// dtype, exactly as glmrt.quant.dequantize builds the reference weight. Products are summed in
// fp32; the bias is added in fp32 and the sum rounded once to x's dtype.
//
// Tiling. The output is cut into tiles of tile_m x tile_n; a tile walks K in slices of tile_k.
// Per slice a worker holds in its LDM
//   A     tile_m x tile_k   fp32   activations of the tile's rows
//   B     tile_n x tile_k   fp32   weights of the tile's columns, converted / dequantized
//   C     tile_m x tile_n   fp32   accumulators (live across the K slices)
//   stage kStageRows rows of tile_k elements in their storage type: what a DMA brings in before
//         it is converted (weights arrive a few rows at a time, never a whole raw tile)
//   scale tile_n x (tile_k / group_size) scales (tile_n for per-row scales)
//   bias  tile_n
// Tiles are dealt round robin to the 64 logical workers.
#pragma once

#include <cstdint>

#include "dtype.h"
#include "ldm.h"

namespace glmrt::sunway {

enum class WeightFormat : int { Float = 0, Int8 = 8, Int4 = 4 };

// Largest tiles; a plan may choose a narrower tile_n so that small problems still reach all 64
// workers. tile_k is a multiple of every supported quantization group (32, 64, 128, 256), so a
// K slice never cuts a group.
constexpr int64_t kTileM = 32;
constexpr int64_t kTileNMax = 128;
constexpr int64_t kTileNMin = 8;
constexpr int64_t kTileK = 256;
constexpr int64_t kStageRows = 8;
constexpr int64_t kMinGroup = 32;
constexpr int64_t kLanes = 16;  // the inner dot products run 16 fp32 lanes; K slices are padded to it

// Bytes of one LocalStore allocation (each is rounded to 64 bytes).
constexpr int64_t ldm_alloc(int64_t bytes) { return round_up(bytes, 64); }

struct LinearPlan {
  WeightFormat format = WeightFormat::Float;
  int64_t M = 0, N = 0, K = 0, group_size = 0;
  int64_t tile_m = 0, tile_n = 0, tile_k = 0;
  int64_t m_blocks = 0, n_blocks = 0, k_blocks = 0;
  int64_t scales_per_row = 0;  // scales one weight row needs per K slice
  // LDM bytes of each buffer of one tile (rounded as LocalStore rounds them).
  int64_t a_bytes = 0, b_bytes = 0, c_bytes = 0, stage_bytes = 0, scale_bytes = 0, bias_bytes = 0;

  int64_t tiles() const { return m_blocks * n_blocks; }
  int64_t ldm_bytes() const { return a_bytes + b_bytes + c_bytes + stage_bytes + scale_bytes + bias_bytes; }
  bool fits() const { return ldm_bytes() <= kLdmTileBudget; }
};

// Working set of one tile, as plan_linear counts it; used below to prove the largest tiles fit.
constexpr int64_t linear_tile_bytes(int64_t tile_m, int64_t tile_n, int64_t tile_k, int64_t scales_per_row,
                                    int64_t stage_elem_bytes) {
  return ldm_alloc(4 * tile_m * round_up(tile_k, kLanes)) +       // A
         ldm_alloc(4 * round_up(tile_n, 4) * round_up(tile_k, kLanes)) +  // B
         ldm_alloc(4 * tile_m * round_up(tile_n, 4)) +            // C
         ldm_alloc(stage_elem_bytes * kStageRows * tile_k) +     // stage
         ldm_alloc(4 * tile_n * scales_per_row) +                // scales
         ldm_alloc(4 * tile_n);                                  // bias
}

// The worst case over every format and dtype: the largest tiles, fp32 staging, the smallest group.
static_assert(linear_tile_bytes(kTileM, kTileNMax, kTileK, kTileK / kMinGroup, 4) <= kLdmTileBudget,
              "the largest linear tile does not fit in one compute core's LDM");

// Raises std::invalid_argument for a group size the tiling cannot take (see supported_group_size).
LinearPlan plan_linear(WeightFormat format, int64_t M, int64_t N, int64_t K, int64_t group_size);
bool supported_group_size(int64_t group_size);

// Runs the plan. x [M, K] and out [M, N] have x_type; w_type is the weight dtype for Float (the
// same as x_type) and ignored for the quantized formats; scale and bias may be null when unused.
void linear_tiled(const LinearPlan& plan, const void* x, DType x_type, const void* w, DType w_type,
                  const void* scale, DType scale_type, const void* bias, DType bias_type, void* out);

// Instruction set the inner loops were dispatched to on this CPU ("avx512f", "avx2", "scalar").
const char* simd_level();

}  // namespace glmrt::sunway
