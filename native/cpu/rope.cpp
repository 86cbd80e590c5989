#include "rope.h"

#include <stdexcept>
#include <string>
#include <vector>

namespace glmrt {

namespace {

// Rotate `pairs` pairs of x (fp32 copies of storage values): pair i is (x[i * a_step],
// x[i * a_step + b_off]), written to the same places of y. Every intermediate is rounded to the
// storage dtype t, as torch's elementwise ops do.
inline void rotate(const float* x, float* y, int64_t pairs, int64_t a_step, int64_t b_off, const float* c,
                   const float* s, DType t) {
  for (int64_t i = 0; i < pairs; ++i) {
    const float a = x[i * a_step], b = x[i * a_step + b_off];
    const float ac = round_to(a * c[i], t), bs = round_to(b * s[i], t);
    const float bc = round_to(b * c[i], t), as = round_to(a * s[i], t);
    y[i * a_step] = round_to(ac - bs, t);
    y[i * a_step + b_off] = round_to(bc + as, t);
  }
}

}  // namespace

void rope_split(const void* qkv, DType dtype, int64_t rows, int64_t row_stride, int64_t num_heads,
                int64_t num_kv_heads, int64_t head_dim, RopeKind kind, int64_t rotary_dim, const void* cos,
                const void* sin, const void* cos2, const void* sin2, void* q_out, void* k_out) {
  if (head_dim <= 0 || num_heads <= 0 || num_kv_heads <= 0)
    throw std::invalid_argument("rope: head_dim, num_heads and num_kv_heads must be positive");
  if (kind == RopeKind::TwoD) {
    if (head_dim % 4 != 0 || rotary_dim != head_dim)
      throw std::invalid_argument("rope: 2-D RoPE rotates whole heads in two halves: need rotary_dim == head_dim, "
                                  "a multiple of 4 (got rotary_dim " + std::to_string(rotary_dim) +
                                  ", head_dim " + std::to_string(head_dim) + ")");
    if (!cos2 || !sin2) throw std::invalid_argument("rope: 2-D RoPE needs the block-position tables");
  } else if (rotary_dim <= 0 || rotary_dim % 2 != 0 || rotary_dim > head_dim) {
    throw std::invalid_argument("rope: rotary_dim must be even and in (0, head_dim], got " +
                                std::to_string(rotary_dim) + " for head_dim " + std::to_string(head_dim));
  }
  const int64_t pairs = kind == RopeKind::TwoD ? head_dim / 4 : rotary_dim / 2;
  const int64_t rot_heads = num_heads + num_kv_heads;  // q and k are rotated, v is not
  const int64_t work = rows * rot_heads * head_dim;

#pragma omp parallel if (work > (1 << 16))
  {
    std::vector<float> x(head_dim), y(head_dim), c(pairs), s(pairs), c2(pairs), s2(pairs);
#pragma omp for schedule(static)
    for (int64_t r = 0; r < rows; ++r) {
      for (int64_t i = 0; i < pairs; ++i) {
        c[i] = load_as_f32(cos, r * pairs + i, dtype);
        s[i] = load_as_f32(sin, r * pairs + i, dtype);
        if (kind == RopeKind::TwoD) {
          c2[i] = load_as_f32(cos2, r * pairs + i, dtype);
          s2[i] = load_as_f32(sin2, r * pairs + i, dtype);
        }
      }
      for (int64_t h = 0; h < rot_heads; ++h) {
        const int64_t src = r * row_stride + h * head_dim;
        for (int64_t d = 0; d < head_dim; ++d) x[d] = load_as_f32(qkv, src + d, dtype);
        for (int64_t d = 0; d < head_dim; ++d) y[d] = x[d];  // dims past rotary_dim pass through
        switch (kind) {
          case RopeKind::Interleaved: rotate(x.data(), y.data(), pairs, 2, 1, c.data(), s.data(), dtype); break;
          case RopeKind::Half: rotate(x.data(), y.data(), pairs, 1, pairs, c.data(), s.data(), dtype); break;
          case RopeKind::TwoD: {
            const int64_t half = head_dim / 2;
            rotate(x.data(), y.data(), pairs, 1, pairs, c.data(), s.data(), dtype);
            rotate(x.data() + half, y.data() + half, pairs, 1, pairs, c2.data(), s2.data(), dtype);
            break;
          }
        }
        void* dst = h < num_heads ? q_out : k_out;
        const int64_t off = h < num_heads ? (r * num_heads + h) * head_dim
                                          : (r * num_kv_heads + (h - num_heads)) * head_dim;
        for (int64_t d = 0; d < head_dim; ++d) store_from_f32(dst, off + d, y[d], dtype);
      }
    }
  }
}

}  // namespace glmrt
