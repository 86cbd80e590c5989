// Weight-only INT8 / INT4 linears on CUDA and HIP: the GEMV (W8A16 / W4A16) for decode, and for
// prefill a dequantization of the weight into a buffer that the caller then multiplies with a
// plain cuBLAS / hipBLAS GEMM (torch.nn.functional.linear). Prefill is dequantize + GEMM, not a
// fused quantized GEMM. Host-side declarations only: no GPU header needed to call them.
#pragma once
#include <cstdint>

namespace glmrt {
namespace gpu {

// Rows of activations one launch covers; larger M is split into launches of this many rows
// (each re-reads the weight), so callers should use it only for decode-sized M.
constexpr int kGemvRowsPerLaunch = 4;

// out[M, N] = x[M, K] @ dequant(W)^T (+ bias[N]) on `device`, queued on `stream`.
//
// x, out: row-major, contiguous, dtype code x_dtype (0 fp32, 1 bf16, 2 fp16); out has x's dtype.
// W (glmrt.quant's format): bits == 8: int8 [N, K]; bits == 4: int4 packed two per byte into
// [N, ceil(K/2)], the EVEN k in the HIGH nibble, values sign-extended (odd K pads the last low
// nibble). dequant(W)[n, k] = q[n, k] * scale[n] (group_size 0, scale [N]) or
// q[n, k] * scale[n, k / group_size] (group_size a positive multiple of 32, scale
// [N, ceil(K / group_size)]; K need not be a multiple of it). scale and bias (may be null) have
// their own dtype codes. Accumulation is fp32: group-wise, each group's partial dot product is
// multiplied by its scale; per-channel, the scale multiplies the finished sum. The result is
// rounded once to x's dtype, after the bias is added.
//
// Returns nullptr when the launches were queued, else a message (bad arguments or the runtime's
// error).
const char* linear_quant(int bits, const void* x, int x_dtype, const void* weight, const void* scale,
                         int scale_dtype, const void* bias, int bias_dtype, void* out, int64_t M, int64_t N,
                         int64_t K, int64_t group_size, int device, void* stream);

// out[N, K] = dequant(W) in out_dtype (0 fp32, 1 bf16, 2 fp16) on `device`, queued on `stream`: the
// weight of linear_quant above (same layout, packing, sign extension and scale indexing), with
// group_size 0 (scale [N]) or any positive group size (scale [N, ceil(K / group_size)]). Each
// element is the fp32 product float(q) * float(scale), rounded once (to nearest even) to out_dtype:
// bit for bit what glmrt.quant.dequantize (and so glmrt.ops.linear) computes. One launch, no
// host sync. out: row-major [N, K], contiguous, allocated by the caller.
//
// Returns nullptr when the launch was queued, else a message (bad arguments or the runtime's error).
const char* dequantize_weight(int bits, const void* weight, const void* scale, int scale_dtype, void* out,
                              int out_dtype, int64_t N, int64_t K, int64_t group_size, int device, void* stream);

// The device's warp / wavefront size and runtime versions, for native_info() and the tests.
const char* device_warp_size(int device, int* warp_size);
int runtime_version();
int driver_version();

}  // namespace gpu
}  // namespace glmrt
