// Decode attention over the KV cache (GQA / MQA, fp32 softmax, an explicit mask, both GLM
// scalings). One source for CUDA and HIP; see attention.h for the arithmetic.
//
// Layout of the work (flash-decoding with the reference's roundings):
//   * A block owns one KV head of one sequence, a tile of that head's query rows (row r = token
//     r / group, query head kv_head * group + r % group: all heads of a few tokens, so the causal
//     mask hides whole key tiles from a tile of rows) and one split of the keys, walked in tiles of
//     kt keys (32, or 16 when head_dim > 128) staged in shared memory as fp32.
//   * Launch 1 (scores): the block stages its q rows (fp32; layer-scaled: multiplied by the
//     reciprocal of the divisor and rounded, as torch does), then per key tile reads the mask,
//     stages the keys only if some (row, key) of the tile is allowed, computes each allowed score
//     with the reference's roundings into a workspace row, and keeps the split's running max and
//     sum of exp (online softmax) per row. Masked keys are never read: their score is the fill.
//   * Launch 2 (weighted sum): the block combines the max / sum of every split of its rows, forms
//     p = exp(x - max) / sum for its keys (layer-scaled: p rounded to the model dtype; standard:
//     exp(x - max) rounded before the division) (the fill again where masked, so a query that sees
//     no key averages all of them, as the reference does), stages the value rows that some p of the
//     tile needs (a tile whose p are all zero, e.g. the unwritten part of a static cache, is skipped)
//     and accumulates p * v in fp32. With one split it writes the rounded output; with several it
//     writes a partial row per split (and whether the split contributed).
//   * Launch 3 (only with several splits): out = round(sum over the splits of the partial rows),
//     in split order.
// Shared memory is bounded whatever the KV length: q rows (rows * head_dim <= 4096 floats), one key
// or value tile, one tile of scores. Nothing depends on the warp width except block_any (a ballot
// per warp / wavefront, 64-bit lane masks on HIP), so 32- and 64-lane targets run the same code.
// The split count depends on the shapes alone, never on the mask, so a captured graph stays valid
// as the mask changes between replays.
#include "portability.h"

#include <cfloat>
#include <climits>
#include <cmath>

#include "attention.h"

namespace glmrt {
namespace gpu {
namespace {

constexpr int kThreads = 128;                                 // 4 warps (CUDA) or 2 wavefronts (HIP)
constexpr int kMaxTileElems = 4096;                           // q rows * head_dim of one block
constexpr int kPairsPerThread = kMaxTileElems / kThreads;     // fp32 accumulators per thread
constexpr int kMaxRowsPerTile = 64;
constexpr int kMaxWarps = kThreads / 32;                      // block_any scratch (32-lane warps)
constexpr int kTargetBlocks = 256;                            // automatic split: enough blocks to fill a GPU
constexpr int kMinTilesPerSplit = 4;                          // ... without tiny splits

struct Plan {
  int kt = 0;          // keys per tile
  int row_tile = 0;    // query rows per block
  int64_t group = 0, rows_per_kv = 0, row_tiles = 0, tiles = 0, tiles_per_split = 0, splits = 0, rows = 0;
  int64_t x_off = 0, stats_off = 0, part_off = 0, flags_off = 0, bytes = 0;
};

int64_t align16(int64_t n) { return (n + 15) / 16 * 16; }

// Returns false for shapes the kernels do not take.
bool make_plan(int64_t B, int64_t T, int64_t S, int64_t nh, int64_t nkv, int64_t hd, int64_t kv_split, Plan* p) {
  if (B < 0 || T < 0 || S <= 0 || nh <= 0 || nkv <= 0 || hd <= 0 || hd > kAttentionMaxHeadDim || nh % nkv != 0 ||
      kv_split < 0)
    return false;
  p->kt = hd <= 128 ? 32 : 16;
  p->group = nh / nkv;
  p->rows_per_kv = p->group * T;
  int64_t rt = kMaxTileElems / hd;
  rt = rt < kMaxRowsPerTile ? rt : kMaxRowsPerTile;
  rt = p->rows_per_kv < rt ? p->rows_per_kv : rt;
  p->row_tile = static_cast<int>(rt > 0 ? rt : 1);
  p->row_tiles = (p->rows_per_kv + p->row_tile - 1) / p->row_tile;
  p->tiles = (S + p->kt - 1) / p->kt;
  if (kv_split > 0) {
    p->tiles_per_split = (kv_split + p->kt - 1) / p->kt;
  } else {
    const int64_t base = B * nkv * (p->row_tiles > 0 ? p->row_tiles : 1);
    int64_t want = (kTargetBlocks + base - 1) / (base > 0 ? base : 1);
    const int64_t most = (p->tiles + kMinTilesPerSplit - 1) / kMinTilesPerSplit;
    want = want < most ? want : most;
    want = want > 0 ? want : 1;
    p->tiles_per_split = (p->tiles + want - 1) / want;
  }
  p->splits = (p->tiles + p->tiles_per_split - 1) / p->tiles_per_split;
  p->rows = B * nh * T;
  // Workspace: scores x [rows, S]; stats (max, sum) [rows, splits, 2]; with several splits the
  // partial outputs [rows, splits, head_dim] and their flags [rows, splits].
  p->x_off = 0;
  p->stats_off = align16(p->x_off + p->rows * S * 4);
  p->part_off = align16(p->stats_off + p->rows * p->splits * 2 * 4);
  const int64_t part = p->splits > 1 ? p->rows * p->splits * hd * 4 : 0;
  p->flags_off = align16(p->part_off + part);
  p->bytes = align16(p->flags_off + (p->splits > 1 ? p->rows * p->splits * 4 : 0));
  return true;
}

struct Params {
  const void* q;
  const void* k;
  const void* v;
  const uint8_t* allowed;
  void* out;
  float* x;
  float* stats;
  float* part;
  int* flags;
  int64_t T, S, nh, nkv, hd, group, rows_per_kv, row_tiles, tiles, tiles_per_split, splits;
  int64_t q_sb, q_st, q_sh, k_sb, k_sh, k_ss, v_sb, v_sh, v_ss, m_sb, m_st, m_ss;
  int kt, row_tile;
  bool layer_scaled;
  float scale, q_divisor, coeff;
};

struct Work {
  int64_t b, kvh, r0, split, tile0, tile1;
  int nr;
};

__device__ __forceinline__ Work block_work(const Params& p) {
  Work w;
  int64_t id = blockIdx.x;
  w.split = id % p.splits;
  id /= p.splits;
  const int64_t rt = id % p.row_tiles;
  id /= p.row_tiles;
  w.kvh = id % p.nkv;
  w.b = id / p.nkv;
  w.r0 = rt * p.row_tile;
  const int64_t left = p.rows_per_kv - w.r0;
  w.nr = static_cast<int>(left < p.row_tile ? left : p.row_tile);
  w.tile0 = w.split * p.tiles_per_split;
  const int64_t end = w.tile0 + p.tiles_per_split;
  w.tile1 = end < p.tiles ? end : p.tiles;
  return w;
}

// Row r of kv head kvh: its token, its query head and its global row (b, head, token).
__device__ __forceinline__ int64_t row_token(const Params& p, const Work& w, int r) { return (w.r0 + r) / p.group; }
__device__ __forceinline__ int64_t row_head(const Params& p, const Work& w, int r) {
  return w.kvh * p.group + (w.r0 + r) % p.group;
}
__device__ __forceinline__ int64_t global_row(const Params& p, const Work& w, int r) {
  return (w.b * p.nh + row_head(p, w, r)) * p.T + row_token(p, w, r);
}

// What a masked key's softmax input is: the fill of the scores (in the dtype), times coeff in fp32
// when layer-scaled.
template <typename T>
__device__ __forceinline__ float masked_input(const Params& p) {
  return p.layer_scaled ? gpu_mul_rn(T::round(-10000.0f), p.coeff) : -FLT_MAX;  // torch.finfo(torch.float32).min
}

// True on every thread when pred is true on some thread of the block. All threads must call it.
__device__ __forceinline__ bool block_any(int pred, int* scratch) {
  const gpu_lane_mask_t lanes = gpu_ballot(pred);
  if (lane_id() == 0) scratch[warp_id()] = lanes != 0 ? 1 : 0;
  __syncthreads();
  int any = 0;
  for (int i = 0; i < kThreads / GLMRT_WARP_SIZE; ++i) any |= scratch[i];
  __syncthreads();  // scratch may be reused
  return any != 0;
}

// ------------------------------------------------------------------------------ launch 1: scores
// Dynamic shared memory: q rows [row_tile][hd], keys [kt][hd + 1], inputs [row_tile][kt] (floats),
// block_any scratch [kMaxWarps] (ints), allowed [row_tile][kt] (bytes).
template <typename T>
__global__ void __launch_bounds__(kThreads) attention_scores_kernel(const Params p) {
  using S_t = typename T::storage;
  GLMRT_DYNAMIC_SHARED(float, smem);
  const int hd = static_cast<int>(p.hd), kt = p.kt, ldk = hd + 1;
  float* qs = smem;
  float* ks = qs + p.row_tile * hd;
  float* xs = ks + kt * ldk;
  int* scratch = reinterpret_cast<int*>(xs + p.row_tile * kt);
  uint8_t* ok = reinterpret_cast<uint8_t*>(scratch + kMaxWarps);

  const Work w = block_work(p);
  const int tid = static_cast<int>(threadIdx.x);
  const auto* q = static_cast<const S_t*>(p.q);
  const auto* k = static_cast<const S_t*>(p.k) + w.b * p.k_sb + w.kvh * p.k_sh;
  const uint8_t* mask = p.allowed + w.b * p.m_sb;
  const float fill = masked_input<T>(p);
  const float inv = 1.0f / p.q_divisor;

  for (int i = tid; i < w.nr * hd; i += kThreads) {
    const int r = i / hd, d = i - r * hd;
    float val = T::load(q, w.b * p.q_sb + row_token(p, w, r) * p.q_st + row_head(p, w, r) * p.q_sh + d);
    if (p.layer_scaled) val = T::round(gpu_mul_rn(val, inv));
    qs[i] = val;
  }

  float m_run = -INFINITY, l_run = 0.f;  // thread r < nr: row r's running max and sum of exp
  for (int64_t tile = w.tile0; tile < w.tile1; ++tile) {
    const int64_t s0 = tile * kt;
    const int nk = static_cast<int>(p.S - s0 < kt ? p.S - s0 : kt);
    __syncthreads();  // q staged / the previous tile consumed
    int mine = 0;
    for (int i = tid; i < w.nr * kt; i += kThreads) {
      const int r = i / kt, j = i - r * kt;
      const int allowed = j < nk && mask[row_token(p, w, r) * p.m_st + (s0 + j) * p.m_ss] != 0;
      ok[i] = static_cast<uint8_t>(allowed);
      mine |= allowed;
    }
    if (block_any(mine, scratch)) {  // uniform
      for (int i = tid; i < nk * hd; i += kThreads) {
        const int j = i / hd, d = i - j * hd;
        ks[j * ldk + d] = T::load(k, (s0 + j) * p.k_ss + d);
      }
      __syncthreads();
    }
    for (int i = tid; i < w.nr * kt; i += kThreads) {
      const int r = i / kt, j = i - r * kt;
      float xv = fill;
      if (ok[i]) {
        const float* qr = qs + r * hd;
        const float* kr = ks + j * ldk;
        float dot = 0.f;
        for (int d = 0; d < hd; ++d) dot = fmaf(qr[d], kr[d], dot);
        // layer-scaled: q . k rounded to the model dtype, times coeff; standard (SDPA in the
        // original code): fp32 throughout, only the output rounded
        xv = p.layer_scaled ? gpu_mul_rn(T::round(dot), p.coeff) : gpu_mul_rn(dot, p.scale);
        p.x[global_row(p, w, r) * p.S + s0 + j] = xv;
      }
      xs[i] = xv;
    }
    __syncthreads();
    if (tid < w.nr) {
      const float* row = xs + tid * kt;
      float tmax = -INFINITY;
      for (int j = 0; j < nk; ++j) tmax = fmaxf(tmax, row[j]);
      const float m_new = fmaxf(m_run, tmax);  // finite: the fill is
      float sum = 0.f;
      for (int j = 0; j < nk; ++j) sum += expf(row[j] - m_new);
      l_run = l_run * expf(m_run - m_new) + sum;
      m_run = m_new;
    }
  }
  if (tid < w.nr) {
    float* st = p.stats + (global_row(p, w, tid) * p.splits + w.split) * 2;
    st[0] = m_run;
    st[1] = l_run;
  }
}

// ----------------------------------------------------------------------- launch 2: weighted sum
// Dynamic shared memory: p [row_tile][kt], values [kt][hd], max [row_tile], sum [row_tile]
// (floats), block_any scratch [kMaxWarps], key flags [kt], row flags [row_tile] (ints).
template <typename T>
__global__ void __launch_bounds__(kThreads) attention_pv_kernel(const Params p) {
  using S_t = typename T::storage;
  GLMRT_DYNAMIC_SHARED(float, smem);
  const int hd = static_cast<int>(p.hd), kt = p.kt;
  float* ps = smem;
  float* vs = ps + p.row_tile * kt;
  float* mrow = vs + kt * hd;
  float* lrow = mrow + p.row_tile;
  int* scratch = reinterpret_cast<int*>(lrow + p.row_tile);
  int* key_nz = scratch + kMaxWarps;
  int* row_nz = key_nz + kt;

  const Work w = block_work(p);
  const int tid = static_cast<int>(threadIdx.x);
  const auto* v = static_cast<const S_t*>(p.v) + w.b * p.v_sb + w.kvh * p.v_sh;
  const uint8_t* mask = p.allowed + w.b * p.m_sb;
  const float fill = masked_input<T>(p);

  // The softmax max and sum of each row over all splits (in split order).
  if (tid < w.nr) {
    const float* st = p.stats + global_row(p, w, tid) * p.splits * 2;
    float m = -INFINITY;
    for (int64_t c = 0; c < p.splits; ++c) m = fmaxf(m, st[2 * c]);
    float l = 0.f;
    for (int64_t c = 0; c < p.splits; ++c) l += st[2 * c + 1] * expf(st[2 * c] - m);
    mrow[tid] = m;
    lrow[tid] = l;
  }
  int contributes = 0;  // thread r < nr: some p of row r in this split is not zero

  float acc[kPairsPerThread];
#pragma unroll
  for (int u = 0; u < kPairsPerThread; ++u) acc[u] = 0.f;

  for (int64_t tile = w.tile0; tile < w.tile1; ++tile) {
    const int64_t s0 = tile * kt;
    const int nk = static_cast<int>(p.S - s0 < kt ? p.S - s0 : kt);
    __syncthreads();  // max / sum ready, or the previous tile consumed
    for (int i = tid; i < w.nr * kt; i += kThreads) {
      const int r = i / kt, j = i - r * kt;
      float pv = 0.f;
      if (j < nk) {
        const int64_t s = s0 + j;
        const bool seen = mask[row_token(p, w, r) * p.m_st + s * p.m_ss] != 0;
        const float xv = seen ? p.x[global_row(p, w, r) * p.S + s] : fill;
        // layer-scaled: the probability rounded; standard (SDPA's flash kernels): exp(x - max)
        // rounded, divided by the fp32 sum
        pv = p.layer_scaled ? T::round(expf(xv - mrow[r]) / lrow[r]) : T::round(expf(xv - mrow[r])) / lrow[r];
      }
      ps[i] = pv;
    }
    __syncthreads();
    int mine = 0;
    if (tid < kt) {
      for (int r = 0; r < w.nr; ++r) mine |= ps[r * kt + tid] != 0.f;
      key_nz[tid] = mine;
    }
    if (tid < w.nr)
      for (int j = 0; j < nk; ++j) contributes |= ps[tid * kt + j] != 0.f;
    if (!block_any(mine, scratch)) continue;  // uniform: no key of this tile is needed
    for (int i = tid; i < kt * hd; i += kThreads) {
      const int j = i / hd, d = i - j * hd;
      vs[i] = j < nk && key_nz[j] ? T::load(v, (s0 + j) * p.v_ss + d) : 0.f;
    }
    __syncthreads();
#pragma unroll
    for (int u = 0; u < kPairsPerThread; ++u) {
      const int i = tid + u * kThreads;
      if (i < w.nr * hd) {
        const int r = i / hd, d = i - r * hd;
        const float* pr = ps + r * kt;
        float a = acc[u];
        for (int j = 0; j < nk; ++j) a = fmaf(pr[j], vs[j * hd + d], a);
        acc[u] = a;
      }
    }
  }

  if (p.splits == 1) {
    auto* out = static_cast<S_t*>(p.out);
#pragma unroll
    for (int u = 0; u < kPairsPerThread; ++u) {
      const int i = tid + u * kThreads;
      if (i < w.nr * hd) {
        const int r = i / hd, d = i - r * hd;
        const int64_t o = ((w.b * p.T + row_token(p, w, r)) * p.nh + row_head(p, w, r)) * p.hd + d;
        T::store(out, o, acc[u]);
      }
    }
    return;
  }
  if (tid < w.nr) {
    row_nz[tid] = contributes;
    p.flags[global_row(p, w, tid) * p.splits + w.split] = contributes;
  }
  __syncthreads();
#pragma unroll
  for (int u = 0; u < kPairsPerThread; ++u) {
    const int i = tid + u * kThreads;
    if (i < w.nr * hd) {
      const int r = i / hd, d = i - r * hd;
      if (row_nz[r]) p.part[(global_row(p, w, r) * p.splits + w.split) * p.hd + d] = acc[u];
    }
  }
}

// ------------------------------------------------------------------ launch 3: sum of the splits
// One block per global row (b, head, token).
template <typename T>
__global__ void __launch_bounds__(kThreads) attention_reduce_kernel(const Params p) {
  const int64_t g = blockIdx.x;
  const int64_t t = g % p.T, h = (g / p.T) % p.nh, b = g / (p.T * p.nh);
  auto* out = static_cast<typename T::storage*>(p.out);
  const int* flags = p.flags + g * p.splits;
  for (int64_t d = threadIdx.x; d < p.hd; d += kThreads) {
    float sum = 0.f;
    for (int64_t c = 0; c < p.splits; ++c)
      if (flags[c]) sum += p.part[(g * p.splits + c) * p.hd + d];
    T::store(out, ((b * p.T + t) * p.nh + h) * p.hd + d, sum);
  }
}

size_t scores_smem(const Plan& pl, int64_t hd) {
  return static_cast<size_t>(pl.row_tile * hd + pl.kt * (hd + 1) + pl.row_tile * pl.kt) * 4 + kMaxWarps * 4 +
         static_cast<size_t>(pl.row_tile * pl.kt);
}
size_t pv_smem(const Plan& pl, int64_t hd) {
  return static_cast<size_t>(pl.row_tile * pl.kt + pl.kt * hd + 2 * pl.row_tile) * 4 +
         static_cast<size_t>(kMaxWarps + pl.kt + pl.row_tile) * 4;
}

template <typename T>
void launch_all(const Plan& pl, const Params& p, int64_t batch, int64_t nkv, gpuStream_t stream) {
  const unsigned blocks = static_cast<unsigned>(batch * nkv * pl.row_tiles * pl.splits);
  GLMRT_LAUNCH(blocks, kThreads, scores_smem(pl, p.hd), stream, attention_scores_kernel<T>)(p);
  GLMRT_LAUNCH(blocks, kThreads, pv_smem(pl, p.hd), stream, attention_pv_kernel<T>)(p);
  if (pl.splits > 1)
    GLMRT_LAUNCH(static_cast<unsigned>(pl.rows), kThreads, 0, stream, attention_reduce_kernel<T>)(p);
}

}  // namespace

int64_t attention_workspace_bytes(int64_t batch, int64_t q_len, int64_t kv_len, int64_t num_heads,
                                  int64_t num_kv_heads, int64_t head_dim, int64_t kv_split) {
  Plan pl;
  if (!make_plan(batch, q_len, kv_len, num_heads, num_kv_heads, head_dim, kv_split, &pl)) return -1;
  return pl.bytes;
}

int64_t attention_kv_splits(int64_t batch, int64_t q_len, int64_t kv_len, int64_t num_heads, int64_t num_kv_heads,
                            int64_t head_dim, int64_t kv_split) {
  Plan pl;
  if (!make_plan(batch, q_len, kv_len, num_heads, num_kv_heads, head_dim, kv_split, &pl)) return -1;
  return pl.splits;
}

const char* attention(const AttentionArgs& a, void* workspace, int64_t workspace_bytes, int device, void* stream) {
  if (a.dtype < 0 || a.dtype > 2) return "dtype code must be 0 (fp32), 1 (bf16) or 2 (fp16)";
  if (a.batch < 0 || a.q_len < 0 || a.kv_len <= 0 || a.num_heads <= 0 || a.num_kv_heads <= 0 || a.head_dim <= 0)
    return "batch and q_len must be >= 0; kv_len, heads and head_dim positive";
  if (a.num_heads % a.num_kv_heads != 0) return "num_heads must be a multiple of num_kv_heads";
  if (a.head_dim > kAttentionMaxHeadDim) return "head_dim must be <= 256";
  if (a.kv_split < 0) return "kv_split must be >= 0 (0 = automatic)";
  if (!(a.q_divisor != 0.f) || !std::isfinite(a.q_divisor) || !std::isfinite(a.scale) || !std::isfinite(a.coeff))
    return "scale, q_divisor and coeff must be finite (q_divisor not 0)";
  Plan pl;
  if (!make_plan(a.batch, a.q_len, a.kv_len, a.num_heads, a.num_kv_heads, a.head_dim, a.kv_split, &pl))
    return "invalid shapes";
  if (pl.rows == 0) return nullptr;
  if (a.q == nullptr || a.k == nullptr || a.v == nullptr || a.allowed == nullptr || a.out == nullptr ||
      workspace == nullptr)
    return "q, k, v, allowed, out and workspace must be device pointers";
  if (workspace_bytes < pl.bytes) return "workspace is smaller than attention_workspace_bytes";
  if (reinterpret_cast<uintptr_t>(workspace) % 16 != 0) return "workspace must be 16-byte aligned";
  const int64_t blocks = a.batch * a.num_kv_heads * pl.row_tiles * pl.splits;
  if (blocks > INT_MAX || pl.rows > INT_MAX) return "too many blocks for one launch (batch * heads * splits)";

  Params p;
  p.q = a.q;
  p.k = a.k;
  p.v = a.v;
  p.allowed = static_cast<const uint8_t*>(a.allowed);
  p.out = a.out;
  auto* ws = static_cast<char*>(workspace);
  p.x = reinterpret_cast<float*>(ws + pl.x_off);
  p.stats = reinterpret_cast<float*>(ws + pl.stats_off);
  p.part = reinterpret_cast<float*>(ws + pl.part_off);
  p.flags = reinterpret_cast<int*>(ws + pl.flags_off);
  p.T = a.q_len;
  p.S = a.kv_len;
  p.nh = a.num_heads;
  p.nkv = a.num_kv_heads;
  p.hd = a.head_dim;
  p.group = pl.group;
  p.rows_per_kv = pl.rows_per_kv;
  p.row_tiles = pl.row_tiles;
  p.tiles = pl.tiles;
  p.tiles_per_split = pl.tiles_per_split;
  p.splits = pl.splits;
  p.q_sb = a.q_stride_b;
  p.q_st = a.q_stride_t;
  p.q_sh = a.q_stride_h;
  p.k_sb = a.k_stride_b;
  p.k_sh = a.k_stride_h;
  p.k_ss = a.k_stride_s;
  p.v_sb = a.v_stride_b;
  p.v_sh = a.v_stride_h;
  p.v_ss = a.v_stride_s;
  p.m_sb = a.m_stride_b;
  p.m_st = a.m_stride_t;
  p.m_ss = a.m_stride_s;
  p.kt = pl.kt;
  p.row_tile = pl.row_tile;
  p.layer_scaled = a.layer_scaled;
  p.scale = a.scale;
  p.q_divisor = a.q_divisor;
  p.coeff = a.coeff;
  auto s = static_cast<gpuStream_t>(stream);
  return launch_for_dtype(device, a.dtype, [&](auto tag) {
    launch_all<decltype(tag)>(pl, p, a.batch, a.num_kv_heads, s);
  });
}

}  // namespace gpu
}  // namespace glmrt
