// Rotary position embeddings of every GLM generation, fused with the split of the qkv projection.
#pragma once
#include <cstdint>

#include "dtype.h"

namespace glmrt {

// interleaved: GPT-J pairs (x[2i], x[2i+1]) on the first rotary_dim dims (ChatGLM2/3, GLM-4,
//              GLM-4-0414 and transformers' glm/glm4: 64 of 128 dims).
// half:        NeoX pairs (x[i], x[i + rotary_dim/2]) on the first rotary_dim dims (GLM-130B 1-D).
// two_d:       ChatGLM-6B / GLM-130B 2-D: NeoX pairs over the first head_dim/2 dims with the
//              position tables, and over the second head_dim/2 dims with the block-position tables.
enum class RopeKind : int { Interleaved = 0, Half = 1, TwoD = 2 };

// qkv: rows tokens (B*T), row r at element r * row_stride, laid out [q heads | k heads | v heads]
// of head_dim each. Writes q_out [rows, num_heads, head_dim] and k_out [rows, num_kv_heads,
// head_dim] (contiguous, qkv's dtype); v is not touched (the caller views it in place).
//
// cos/sin: [rows, pairs] tables in qkv's dtype (pairs = rotary_dim/2; head_dim/4 for two_d), built
// by the caller exactly as the reference builds them (fp16 angles for ChatGLM-6B), so that the
// tables, not just the formula, match. cos2/sin2: the block-position tables (two_d only).
//
// Each rotated pair is (a*c - b*s, b*c + a*s) with every product and sum rounded to the storage
// dtype, as torch computes it elementwise in that dtype: bit-identical for bf16/fp16. Dims past
// the rotated ones are copied.
void rope_split(const void* qkv, DType dtype, int64_t rows, int64_t row_stride, int64_t num_heads,
                int64_t num_kv_heads, int64_t head_dim, RopeKind kind, int64_t rotary_dim, const void* cos,
                const void* sin, const void* cos2, const void* sin2, void* q_out, void* k_out);

}  // namespace glmrt
