// A STREAM-like memory read probe: the bandwidth that weight-streaming kernels (decode GEMV) are
// measured against. Reads a buffer once with wide vector loads on `threads` OpenMP threads (each
// thread a contiguous slice read as 8 interleaved sequential streams, like a GEMV reading several
// weight rows at once; several independent accumulators) and returns a checksum so the
// reads cannot be optimised away. The caller times it.
#pragma once

#include <cstdint>

namespace glmrt {

// Sum of the buffer's 64-bit words (wrapping). bytes must be a multiple of 64; data 64-byte aligned
// for the best speed (unaligned works). threads <= 0: OpenMP's default.
uint64_t read_stream(const void* data, int64_t bytes, int threads);

// The vector path read_stream runs: "avx512", "avx2" or "scalar".
const char* read_stream_isa();

}  // namespace glmrt
