// Decode attention of a few new query tokens over the KV cache, for CUDA and HIP. Host-side
// declaration only: no GPU header needed to call it.
#pragma once
#include <cstdint>

namespace glmrt {
namespace gpu {

// The largest head_dim the kernels take (the q rows of a block and the staged key tile are sized
// for it; see attention.cu).
constexpr int kAttentionMaxHeadDim = 256;

// Same fields and numerics as native/cpu/attention.h (glmrt.ops.attention's arithmetic), on
// device pointers:
//   q [B, T, num_heads, head_dim], element strides (batch, token, head), head_dim contiguous;
//   k, v [B, num_kv_heads, S, head_dim] seen through element strides (batch, kv head, key
//     position), head_dim contiguous: the cache's (B, nkv, max_len, hd) and a fresh (B, T, nkv, hd)
//     tensor both fit;
//   allowed [B, T, S] bytes (0/1, torch.bool), strides in bytes, 0 broadcasts. This mask is the
//     only source of the valid key positions: with a static cache (graph capture) S is the cache's
//     max_len and the mask, computed on the device, hides the positions not yet written;
//   out [B, T, num_heads * head_dim], contiguous.
// Query head h reads KV head h / (num_heads / num_kv_heads).
//   standard:     scores = (q . k) * scale in fp32, masked to fp32's lowest value,
//                 e = round(exp(scores - max)), out = round(sum_s e_s * v_s / sum_s exp(..)) (SDPA's flash kernels in the original
//                 code of ChatGLM2/3 and GLM-4);
//   layer_scaled: q' = round(q * (1 / q_divisor)) (torch's CUDA division by a scalar multiplies by
//                 its fp32 reciprocal; q_divisor = sqrt(head_dim) * coeff), scores = round(q' . k),
//                 masked to round(-10000), p = softmax_fp32(scores * coeff) (GLM-130B / ChatGLM-6B,
//                 coeff = layer index + 1), out = round(sum_s round(p_s) * v_s).
// round() is to the storage dtype (identity for fp32). Dot products and the weighted sum
// accumulate in fp32 (in another order than cuBLAS); the softmax is max-subtracted, in fp32 with
// expf, its max and sum combined over KV splits (flash-decoding), so only the fp32 summation order
// differs from the reference.
struct AttentionArgs {
  int dtype;  // of q, k, v and out: 0 fp32, 1 bf16, 2 fp16
  int64_t batch, q_len, kv_len, num_heads, num_kv_heads, head_dim;
  const void* q;
  int64_t q_stride_b, q_stride_t, q_stride_h;
  const void* k;
  int64_t k_stride_b, k_stride_h, k_stride_s;
  const void* v;
  int64_t v_stride_b, v_stride_h, v_stride_s;
  const void* allowed;
  int64_t m_stride_b, m_stride_t, m_stride_s;
  void* out;
  bool layer_scaled;
  float scale;
  float q_divisor;
  float coeff;
  // Keys per KV split (rounded up to whole key tiles of 32, or 16 when head_dim > 128); 0 picks it
  // from the shapes alone (so a captured graph replays the same launches whatever the mask says).
  int64_t kv_split;
};

// Bytes of device scratch `attention` needs for these shapes (scores, per-split softmax
// statistics, per-split partial outputs), or -1 when the shapes are invalid. Depends on the
// shapes and kv_split only.
int64_t attention_workspace_bytes(int64_t batch, int64_t q_len, int64_t kv_len, int64_t num_heads,
                                  int64_t num_kv_heads, int64_t head_dim, int64_t kv_split);

// The number of KV splits the launches use for these shapes (1: no reduction launch).
int64_t attention_kv_splits(int64_t batch, int64_t q_len, int64_t kv_len, int64_t num_heads, int64_t num_kv_heads,
                            int64_t head_dim, int64_t kv_split);

// Queues the attention on `stream` (2 launches, 3 when the keys are split) using `workspace`
// (at least attention_workspace_bytes, 16-byte aligned). No host synchronization. Returns
// nullptr when queued, else a message (bad arguments or the runtime's error).
const char* attention(const AttentionArgs& args, void* workspace, int64_t workspace_bytes, int device, void* stream);

}  // namespace gpu
}  // namespace glmrt
