// Rotary position embedding for CUDA and HIP. Host-side declaration only: no GPU header needed to call it.
#pragma once
#include <cstdint>

namespace glmrt {
namespace gpu {

// The interleaved (GPT-J pairing) partial rotary of ChatGLM2/3 and GLM-4, fused with the split of
// the fused qkv projection. qkv: row-major [rows, (num_heads + 2 * num_kv_heads) * head_dim] (rows =
// B * T); cos / sin: [rows, rotary_dim / 2], in the activations' dtype. For every query head and
// key head, pair i < rotary_dim / 2 of the head's first rotary_dim dims becomes
//   out[2i]     = x[2i] * cos[i] - x[2i+1] * sin[i]
//   out[2i + 1] = x[2i+1] * cos[i] + x[2i] * sin[i]
// with each product and each sum rounded to the dtype (torch's four ops on tensors of that dtype);
// the remaining head_dim - rotary_dim dims are copied. q_out: [rows, num_heads, head_dim], k_out:
// [rows, num_kv_heads, head_dim] (v is not touched). head_dim and rotary_dim must be even,
// rotary_dim <= head_dim.
//
// Returns nullptr when the launch was queued, else the runtime's error message.
const char* rope_interleaved(const void* qkv, int dtype, const void* cos, const void* sin, void* q_out, void* k_out,
                             int64_t rows, int64_t num_heads, int64_t num_kv_heads, int64_t head_dim,
                             int64_t rotary_dim, int device, void* stream);

}  // namespace gpu
}  // namespace glmrt
