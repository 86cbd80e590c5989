"""Weight layouts of the quantized linears in an ONNX export, exactly.

glmrt holds a quantized linear as signed values q in [-7, 7] (INT4) or [-127, 127] (INT8), shape
(N, K) (N outputs, K inputs), with symmetric scales s per output row (N,) or per group of
``group_size`` input columns (N, ceil(K / group_size)); w[n, k] = q[n, k] * s[n, k // group].
glmrt's own INT4 storage is the GLM release's: int8 bytes (N, ceil(K/2)),
``byte[j] = (q[2j] << 4) | (q[2j+1] & 0xF)`` -- the EVEN index in the HIGH nibble.

``ort`` flavor: com.microsoft MatMulNBits (bits 4 or 8, block_size b a power of two >= 16)
    B       uint8 (N, k_blocks, b * bits / 8), k_blocks = ceil(K / b); codes u = q + 2^(bits-1)
            (8 for INT4, 128 for INT8: MatMulNBits' default zero point, so no zero_points input);
            INT4: ``B[n, j, i] = u[n, j*b + 2i] | (u[n, j*b + 2i + 1] << 4)`` -- the FIRST element in
            the LOW nibble, the opposite of glmrt's order; the tail of the last block is filled with
            the zero-point code (dequantizes to 0).
    scales  (N, k_blocks) in the activation dtype; a glmrt group of g columns becomes g / b blocks
            with the same scale (b is the largest of 128, 64, 32, 16 dividing g; per-row scales
            repeat over every block), so the dequantized weight is unchanged.

``standard`` flavor: DequantizeLinear (opset 23, blocked, axis 0) feeding MatMul
    x       ONNX INT4 / INT8 tensor of the TRANSPOSED weight (K, N), zero point 0 (none given);
            INT4 packs the flattened (row-major) elements two per byte, the FIRST in the 4 low
            bits, as signed two's-complement nibbles (ONNX's int4 rule); an odd count pads 4 zero bits.
    scale   (ceil(K / block), N), block = the glmrt group size (per-row scales: the MatMulNBits
            block rule above, scales repeated), axis=0, block_size=block. This DQ -> MatMul pair is
            the pattern onnxruntime fuses into MatMulNBits at session time.
"""

from __future__ import annotations

import numpy as np
import torch

from ..quant import unpack_int4

BLOCK_SIZES = (128, 64, 32, 16)  # MatMulNBits: a power of two >= 16 (never 512: wrong on ORT CPU)


def signed_values(weight: torch.Tensor, bits: int, k: int) -> np.ndarray:
    """glmrt's stored weight -> the signed values q (N, K) as int8."""
    q = unpack_int4(weight, k) if bits == 4 else weight
    return q.to(torch.int8).numpy()


def block_size_for(group_size: int, k: int) -> int | None:
    """The MatMulNBits block size for a glmrt scale group (0: one scale per row), or None when no
    power of two >= 16 divides the group."""
    if group_size == 0:
        for b in BLOCK_SIZES:
            if b <= k:
                return b
        return BLOCK_SIZES[-1]
    for b in BLOCK_SIZES:
        if group_size % b == 0:
            return b
    return None


def block_scales(scale: torch.Tensor, group_size: int, k: int, block: int) -> torch.Tensor:
    """(N,) or (N, G) glmrt scales -> (N, ceil(K / block)) per-block scales (the same numbers)."""
    k_blocks = -(-k // block)
    if group_size == 0:
        return scale.reshape(-1, 1).expand(-1, k_blocks).contiguous()
    starts = torch.arange(k_blocks) * block  # first column of each block
    return scale[:, starts // group_size].contiguous()


def pack_matmulnbits(q: np.ndarray, bits: int, block: int) -> np.ndarray:
    """Signed q (N, K) -> MatMulNBits' B, uint8 (N, k_blocks, block * bits / 8)."""
    n, k = q.shape
    k_blocks = -(-k // block)
    zero = 1 << (bits - 1)
    u = np.full((n, k_blocks * block), zero, dtype=np.uint8)
    u[:, :k] = (q.astype(np.int16) + zero).astype(np.uint8)
    if bits == 8:
        return u.reshape(n, k_blocks, block)
    packed = u[:, 0::2] | (u[:, 1::2] << 4)  # first element in the low nibble
    return packed.astype(np.uint8).reshape(n, k_blocks, block // 2)


def unpack_matmulnbits(b: np.ndarray, bits: int, k: int) -> np.ndarray:
    """MatMulNBits' B -> signed q (N, K) (the inverse of pack_matmulnbits, for tests and tools)."""
    n = b.shape[0]
    flat = b.reshape(n, -1)
    if bits == 8:
        u = flat
    else:
        u = np.stack((flat & 0xF, flat >> 4), axis=-1).reshape(n, -1)
    return (u[:, :k].astype(np.int16) - (1 << (bits - 1))).astype(np.int8)


def pack_onnx_int4(values: np.ndarray) -> np.ndarray:
    """Signed int4 values of any shape -> ONNX's INT4 raw bytes (row-major, first in the low bits)."""
    flat = values.astype(np.int16).reshape(-1) & 0xF
    if flat.size % 2:
        flat = np.concatenate((flat, np.zeros(1, np.int16)))
    return (flat[0::2] | (flat[1::2] << 4)).astype(np.uint8)


def unpack_onnx_int4(raw: np.ndarray, shape: tuple[int, ...]) -> np.ndarray:
    """ONNX INT4 raw bytes -> signed values of ``shape`` (sign-extending each nibble)."""
    raw = raw.astype(np.uint8).reshape(-1)
    nib = np.stack((raw & 0xF, raw >> 4), axis=-1).reshape(-1)[: int(np.prod(shape))].astype(np.int8)
    return np.where(nib > 7, nib - 16, nib).astype(np.int8).reshape(shape)
