// Attention of new query tokens over the KV cache (decode, and small prefills), GQA/MQA, fp32
// softmax, an explicit boolean mask (causal or GLM's bidirectional prefix), both scalings.
#pragma once
#include <cstdint>

#include "dtype.h"

namespace glmrt {

struct AttentionArgs {
  DType dtype;  // of q, k, v and out
  int64_t batch, q_len, kv_len, num_heads, num_kv_heads, head_dim;
  // q [B, T, num_heads, head_dim]; strides in elements for (batch, token, head); head_dim contiguous.
  const void* q;
  int64_t q_stride_b, q_stride_t, q_stride_h;
  // keys / values [B, num_kv_heads, S, head_dim] seen through strides (batch, kv head, key position):
  // the cache's (B, nkv, max_len, hd) layout and a fresh (B, T, nkv, hd) tensor both fit.
  const void* k;
  int64_t k_stride_b, k_stride_h, k_stride_s;
  const void* v;
  int64_t v_stride_b, v_stride_h, v_stride_s;
  // allowed [B, T, S] bytes (0/1), strides in bytes; a stride of 0 broadcasts.
  const uint8_t* allowed;
  int64_t m_stride_b, m_stride_t, m_stride_s;
  void* out;  // [B, T, num_heads * head_dim], contiguous
  // standard:     scores = (q . k) * scale in fp32, masked to fp32's lowest value,
  //               e = round(exp(scores - max)), out = round(sum_s e_s * v_s / sum_s exp(..)) (SDPA's flash kernels in the original
  //               code of ChatGLM2/3 and GLM-4).
  // layer_scaled: q' = round(q / q_divisor) (q_divisor = sqrt(head_dim) * coeff), scores =
  //               round(q' . k), masked to round(-10000), p = softmax_fp32(scores * coeff)
  //               (GLM-130B / ChatGLM-6B, coeff = layer index + 1), out = round(sum_s round(p_s) * v_s).
  // round() is to the storage dtype (identity for fp32); dot products and the weighted sum
  // accumulate in fp32.
  bool layer_scaled;
  float scale;
  float q_divisor;
  float coeff;
  // Optional per-batch key counts (the serving engine's batched decode, where rows sit at different
  // cache lengths): row b reads keys [0, min(kv_lens[b], kv_len)) only, so its result is bit for bit
  // what a batch of that row alone with kv_len = kv_lens[b] gives, whatever the other rows are. The
  // kernel then also picks its dot-product path from the head grouping alone (not from the tiling,
  // which depends on the batch size and the thread count). Null: every row reads kv_len keys.
  const int64_t* kv_lens = nullptr;
};

// Query head h reads KV head h / (num_heads / num_kv_heads).
void attention(const AttentionArgs& args);

}  // namespace glmrt
