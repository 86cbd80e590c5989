// Rotary position embedding for CUDA and HIP. Host-side declaration only: no GPU header needed to call it.
#pragma once
#include <cstdint>

namespace glmrt {
namespace gpu {

// The RoPE kinds of glmrt.ops.rope (node attr `kind`), as the CPU kernel numbers them:
//   kRopeInterleaved ("interleaved"): GPT-J pairs (x[2i], x[2i+1]) on the first rotary_dim dims
//       (ChatGLM2/3, GLM-4, GLM-4-0414, transformers' glm / glm4: 64 of 128 dims);
//   kRopeHalf ("half"): NeoX pairs (x[i], x[i + rotary_dim/2]) on the first rotary_dim dims (GLM-130B
//       1-D, ChatGLM-6B with position_encoding_2d off);
//   kRope2D ("2d"): ChatGLM-6B / GLM-130B 2-D: NeoX pairs over dims [0, head_dim/2) by the position
//       tables and over [head_dim/2, head_dim) by the block-position tables (rotary_dim == head_dim).
enum RopeKind : int { kRopeInterleaved = 0, kRopeHalf = 1, kRope2D = 2 };

// The rotary of q and k fused with the split of the fused qkv projection. qkv: row-major
// [rows, (num_heads + 2 * num_kv_heads) * head_dim] (rows = B * T). cos / sin: [rows, entries] in
// the activations' dtype, entries = rotary_dim / 2 (head_dim / 4 for 2-D), built by the caller as
// glmrt.ops.rope_tables builds them (fp16 angles for ChatGLM-6B), so the tables match too; cos2 /
// sin2: the block-position tables of 2-D RoPE (unused, may be null, for the other kinds). For every
// query head and key head, each rotated pair (a, b) with table entry i becomes
//   out[a] = x[a] * cos[i] - x[b] * sin[i]
//   out[b] = x[b] * cos[i] + x[a] * sin[i]
// with each product and each sum rounded to the dtype (torch's four ops on tensors of that dtype:
// q and k equal glmrt.ops.rope bit for bit); the remaining head_dim - rotary_dim dims are copied.
// q_out: [rows, num_heads, head_dim], k_out: [rows, num_kv_heads, head_dim] (v is not touched).
// head_dim and rotary_dim must be even, rotary_dim <= head_dim; 2-D needs rotary_dim == head_dim,
// a multiple of 4.
//
// Returns nullptr when the launch was queued, else the runtime's (or an argument) error message.
const char* rope(const void* qkv, int dtype, int kind, const void* cos, const void* sin, const void* cos2,
                 const void* sin2, void* q_out, void* k_out, int64_t rows, int64_t num_heads, int64_t num_kv_heads,
                 int64_t head_dim, int64_t rotary_dim, int device, void* stream);

}  // namespace gpu
}  // namespace glmrt
