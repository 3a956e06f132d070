"""GGUF block formats in vectorized numpy: quantize float32 rows to ggml's byte layouts and back.

    quantize(data, qtype)    float32 [..., n]        -> uint8 [..., row_bytes(n, qtype)]
    dequantize(data, qtype)  uint8 [..., row_bytes]  -> float32 [..., n]

F32 and F16 give (and accept) their own numpy dtypes, as `gguf.quants` does; BF16 gives uint8 bytes, also
as `gguf.quants` does. One function pair per block type (`quantize_q4_0_blocks` / `dequantize_q4_0_blocks`,
...) works on `[n_blocks, block_size]` float32 / `[n_blocks, type_size]` uint8 arrays.

Exactness (tests/test_formats.py):
- every dequantizer is bit-exact with `gguf.quants.dequantize` (same float32 operations, same order);
- the F16, BF16, Q8_0, Q4_0, Q5_0, Q4_1 and Q5_1 quantizers are bit-exact with `gguf.quants.quantize`, which is itself
  bit-exact with llama.cpp's `quantize_row_*_ref`;
- the Q4_K, Q5_K, Q6_K and Q8_K quantizers (in `quant.kquants`) are bit-exact with llama.cpp's
  `quantize_row_q{4,5,6,8}_K_ref`.
Byte layouts: `ggml-common.h`; /work/shared/reference/peers.md section 4.
"""

from __future__ import annotations

import numpy as np
from gguf import GGML_QUANT_SIZES
from gguf import GGMLQuantizationType as QT

from .kquants import (
    dequantize_q4_k_blocks,
    dequantize_q5_k_blocks,
    dequantize_q6_k_blocks,
    dequantize_q8_k_blocks,
    quantize_q4_k_blocks,
    quantize_q5_k_blocks,
    quantize_q6_k_blocks,
    quantize_q8_k_blocks,
)

F32 = np.float32

SUPPORTED = (QT.F32, QT.F16, QT.BF16, QT.Q8_0, QT.Q4_0, QT.Q5_0, QT.Q4_1, QT.Q5_1, QT.Q4_K, QT.Q5_K, QT.Q6_K)
"""Types a weight tensor may be stored in."""
ACTIVATION_TYPES = (QT.Q8_K,)
"""Types used only for activations (the K-quant dot product's other operand); never stored in files."""

__all__ = [
    "ACTIVATION_TYPES", "SUPPORTED", "block_size", "dequantize", "quantize", "row_bytes", "type_size",
    "quantize_bf16_blocks", "dequantize_bf16_blocks",
    "quantize_q8_0_blocks", "dequantize_q8_0_blocks",
    "quantize_q4_0_blocks", "dequantize_q4_0_blocks",
    "quantize_q5_0_blocks", "dequantize_q5_0_blocks",
    "quantize_q4_k_blocks", "dequantize_q4_k_blocks",
    "quantize_q5_k_blocks", "dequantize_q5_k_blocks",
    "quantize_q6_k_blocks", "dequantize_q6_k_blocks",
    "quantize_q8_k_blocks", "dequantize_q8_k_blocks",
]


# ----------------------------------------------------------------------------------------------- types

def _names(types) -> str:
    return ", ".join(t.name for t in types)


def _qtype(qtype) -> QT:
    """A GGMLQuantizationType, its integer id or its name -> the type, if this module handles it."""
    try:
        if isinstance(qtype, QT):
            t = qtype
        elif isinstance(qtype, str):
            t = QT[qtype.upper()]
        else:
            t = QT(int(qtype))
    except (KeyError, ValueError, TypeError):
        raise ValueError(f"unknown ggml type {qtype!r}: pass a gguf.GGMLQuantizationType, its id or its name "
                         f"(supported: {_names(SUPPORTED)}; {_names(ACTIVATION_TYPES)} for activations)") from None
    if t not in SUPPORTED and t not in ACTIVATION_TYPES:
        raise ValueError(f"ggml type {t.name} is not supported by quant.formats (supported: {_names(SUPPORTED)}; "
                         f"{_names(ACTIVATION_TYPES)} for activations): re-quantize the tensor to one of these, "
                         f"or dequantize it with gguf.quants.dequantize first")
    return t


def block_size(qtype) -> int:
    """Values per block (1 for F32/F16/BF16, 32 for Q8_0/Q4_0/Q5_0, 256 for the K-quants)."""
    return GGML_QUANT_SIZES[_qtype(qtype)][0]


def type_size(qtype) -> int:
    """Bytes per block."""
    return GGML_QUANT_SIZES[_qtype(qtype)][1]


def _check_row(n: int, t: QT) -> None:
    bs = GGML_QUANT_SIZES[t][0]
    if n % bs:
        alt = ("Q8_0, Q5_0 or Q4_0 (32-value blocks), as llama-quantize falls back to for such rows"
               if bs == 256 else "F16, BF16 or F32")
        raise ValueError(f"{t.name} quantizes rows in blocks of {bs} values, but the row length is {n}: "
                         f"pad the row to a multiple of {bs} or use {alt}")


def row_bytes(n: int, qtype) -> int:
    """Bytes of one row of n values; n must be a multiple of the block size."""
    t = _qtype(qtype)
    _check_row(int(n), t)
    bs, ts = GGML_QUANT_SIZES[t]
    return int(n) // bs * ts


# ----------------------------------------------------------------------------------------------- BF16

def quantize_bf16_blocks(blocks: np.ndarray) -> np.ndarray:
    """float32 [...] -> uint8 bytes of bfloat16 (round to nearest even, NaNs forced quiet), as
    `ggml_compute_fp32_to_bf16` and gguf-py."""
    n = np.ascontiguousarray(blocks, dtype=F32).view(np.uint32)
    n = np.where((n & 0x7FFFFFFF) > 0x7F800000, (n & np.uint32(0xFFFF0000)) | np.uint32(64 << 16), n)
    n = (n + (0x7FFF + ((n >> 16) & 1))) >> 16     # no uint32 overflow: NaNs were made 0x?FFF0000 at most
    return n.astype(np.uint16).view(np.uint8)


def dequantize_bf16_blocks(blocks: np.ndarray) -> np.ndarray:
    """uint8 bytes of bfloat16 [..., 2k] -> float32 [..., k] (exact)."""
    return (np.ascontiguousarray(blocks).view(np.int16).astype(np.int32) << 16).view(F32)


# ----------------------------------------------------------------------------------------------- 32-value blocks

def _f16_bytes(d: np.ndarray) -> np.ndarray:
    """float32 [nb, 1] -> the 2 little-endian bytes of its IEEE half (round to nearest even) [nb, 2]."""
    with np.errstate(over="ignore"):
        return d.astype(np.float16).view(np.uint8)


def _f16(b: np.ndarray) -> np.ndarray:
    return np.ascontiguousarray(b).view(np.float16).astype(F32)


def _round_half_away(v: np.ndarray) -> np.ndarray:
    """roundf() on float32, computed exactly as gguf-py's np_roundf."""
    a = np.abs(v)
    floored = np.floor(a)
    b = floored + np.floor(2 * (a - floored))
    return np.sign(v) * b


def _check_blocks(blocks: np.ndarray, width: int, dtype) -> np.ndarray:
    blocks = np.asarray(blocks)
    if blocks.ndim != 2 or blocks.shape[1] != width:
        raise ValueError(f"expected blocks of shape [n_blocks, {width}], got {blocks.shape}")
    return blocks.astype(dtype, copy=False)


def quantize_q8_0_blocks(blocks: np.ndarray) -> np.ndarray:
    """float32 [nb, 32] -> uint8 [nb, 34]: d = amax/127 (f16), q = roundf(x/d) (`quantize_row_q8_0_ref`)."""
    x = _check_blocks(blocks, 32, F32)
    d = np.abs(x).max(axis=1, keepdims=True) / F32(127)
    with np.errstate(divide="ignore", invalid="ignore", over="ignore"):
        inv = np.where(d == 0, F32(0), F32(1) / d)
        qs = _round_half_away(x * inv).astype(np.int8)
    return np.concatenate([_f16_bytes(d), qs.view(np.uint8)], axis=1)


def dequantize_q8_0_blocks(blocks: np.ndarray) -> np.ndarray:
    """uint8 [nb, 34] -> float32 [nb, 32]: x = d*q."""
    b = _check_blocks(blocks, 34, np.uint8)
    return b[:, 2:].view(np.int8).astype(F32) * _f16(b[:, :2])


def _signed_max(x: np.ndarray) -> np.ndarray:
    """The signed value of largest |x| in each row (first one on ties), shape [nb, 1]."""
    return np.take_along_axis(x, np.abs(x).argmax(axis=1)[:, None], axis=1)


def quantize_q4_0_blocks(blocks: np.ndarray) -> np.ndarray:
    """float32 [nb, 32] -> uint8 [nb, 18]: d = max/-8, q = min(15, trunc(x/d + 8.5)) (`quantize_row_q4_0_ref`)."""
    x = _check_blocks(blocks, 32, F32)
    d = _signed_max(x) / F32(-8)
    with np.errstate(divide="ignore", invalid="ignore", over="ignore"):
        inv = np.where(d == 0, F32(0), F32(1) / d)
        q = np.trunc(x * inv + F32(8.5)).astype(np.uint8).clip(0, 15)
    qs = q[:, :16] | (q[:, 16:] << np.uint8(4))
    return np.concatenate([_f16_bytes(d), qs], axis=1)


def dequantize_q4_0_blocks(blocks: np.ndarray) -> np.ndarray:
    """uint8 [nb, 18] -> float32 [nb, 32]: element j = qs[j]&15, element j+16 = qs[j]>>4; x = d*(q-8)."""
    b = _check_blocks(blocks, 18, np.uint8)
    qs = b[:, 2:]
    q = np.concatenate([qs & 0xF, qs >> 4], axis=1).astype(np.int8) - np.int8(8)
    return _f16(b[:, :2]) * q.astype(F32)


def quantize_q5_0_blocks(blocks: np.ndarray) -> np.ndarray:
    """float32 [nb, 32] -> uint8 [nb, 22]: d = max/-16, q = min(31, trunc(x/d + 16.5)) (`quantize_row_q5_0_ref`)."""
    x = _check_blocks(blocks, 32, F32)
    d = _signed_max(x) / F32(-16)
    with np.errstate(divide="ignore", invalid="ignore", over="ignore"):
        inv = np.where(d == 0, F32(0), F32(1) / d)
        q = np.trunc(x * inv + F32(16.5)).astype(np.uint8).clip(0, 31)
    qs = (q[:, :16] & 0xF) | (q[:, 16:] << np.uint8(4))
    qh = np.packbits(q >> 4, axis=1, bitorder="little")            # bit j of the u32 = fifth bit of element j
    return np.concatenate([_f16_bytes(d), qh, qs], axis=1)


def dequantize_q5_0_blocks(blocks: np.ndarray) -> np.ndarray:
    """uint8 [nb, 22] -> float32 [nb, 32]: q = low nibble | (bit j of qh) << 4; x = d*(q-16)."""
    b = _check_blocks(blocks, 22, np.uint8)
    qh = np.unpackbits(b[:, 2:6], axis=1, bitorder="little")
    qs = b[:, 6:]
    q = (np.concatenate([qs & 0xF, qs >> 4], axis=1) | (qh << 4)).astype(np.int8) - np.int8(16)
    return _f16(b[:, :2]) * q.astype(F32)


def _min_max_scale(x: np.ndarray, levels: int) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """d = (max - min)/levels, m = min; q = min(levels, trunc((x - m)/d + 0.5)) (`quantize_row_q{4,5}_1_ref`)."""
    lo, hi = x.min(axis=1, keepdims=True), x.max(axis=1, keepdims=True)
    d = (hi - lo) / F32(levels)
    with np.errstate(divide="ignore", invalid="ignore", over="ignore"):
        inv = np.where(d == 0, F32(0), F32(1) / d)
        q = np.trunc((x - lo) * inv + F32(0.5)).astype(np.uint8).clip(0, levels)
    return d, lo, q


def quantize_q4_1_blocks(blocks: np.ndarray) -> np.ndarray:
    """float32 [nb, 32] -> uint8 [nb, 20]: d f16, m f16, qs[16]; x = d*q + m, q in 0..15."""
    d, m, q = _min_max_scale(_check_blocks(blocks, 32, F32), 15)
    return np.concatenate([_f16_bytes(d), _f16_bytes(m), q[:, :16] | (q[:, 16:] << np.uint8(4))], axis=1)


def dequantize_q4_1_blocks(blocks: np.ndarray) -> np.ndarray:
    b = _check_blocks(blocks, 20, np.uint8)
    qs = b[:, 4:]
    q = np.concatenate([qs & 0xF, qs >> 4], axis=1).astype(F32)
    return _f16(b[:, :2]) * q + _f16(b[:, 2:4])


def quantize_q5_1_blocks(blocks: np.ndarray) -> np.ndarray:
    """float32 [nb, 32] -> uint8 [nb, 24]: d f16, m f16, qh[4], qs[16]; x = d*q + m, q in 0..31."""
    d, m, q = _min_max_scale(_check_blocks(blocks, 32, F32), 31)
    qs = (q[:, :16] & 0xF) | (q[:, 16:] << np.uint8(4))
    qh = np.packbits(q >> 4, axis=1, bitorder="little")
    return np.concatenate([_f16_bytes(d), _f16_bytes(m), qh, qs], axis=1)


def dequantize_q5_1_blocks(blocks: np.ndarray) -> np.ndarray:
    b = _check_blocks(blocks, 24, np.uint8)
    qh = np.unpackbits(b[:, 4:8], axis=1, bitorder="little")
    qs = b[:, 8:]
    q = (np.concatenate([qs & 0xF, qs >> 4], axis=1) | (qh << 4)).astype(F32)
    return _f16(b[:, :2]) * q + _f16(b[:, 2:4])


# ----------------------------------------------------------------------------------------------- dispatch

_CHUNK_VALUES = 1 << 18
"""quantize/dequantize work through this many values at a time, so that the temporaries stay in cache
(results do not depend on it: blocks are independent)."""


def _by_chunks(fn, blocks: np.ndarray, out_width: int, out_dtype, per_block: int) -> np.ndarray:
    step = max(1, _CHUNK_VALUES // per_block)
    if blocks.shape[0] <= step:
        return fn(blocks)
    out = np.empty((blocks.shape[0], out_width), dtype=out_dtype)
    for s in range(0, blocks.shape[0], step):
        out[s:s + step] = fn(blocks[s:s + step])
    return out


_QUANTIZE = {
    QT.Q8_0: quantize_q8_0_blocks, QT.Q4_0: quantize_q4_0_blocks, QT.Q5_0: quantize_q5_0_blocks,
    QT.Q4_1: quantize_q4_1_blocks, QT.Q5_1: quantize_q5_1_blocks, QT.Q4_K: quantize_q4_k_blocks, QT.Q5_K: quantize_q5_k_blocks, QT.Q6_K: quantize_q6_k_blocks,
    QT.Q8_K: quantize_q8_k_blocks,
}
_DEQUANTIZE = {
    QT.Q8_0: dequantize_q8_0_blocks, QT.Q4_0: dequantize_q4_0_blocks, QT.Q5_0: dequantize_q5_0_blocks,
    QT.Q4_1: dequantize_q4_1_blocks, QT.Q5_1: dequantize_q5_1_blocks, QT.Q4_K: dequantize_q4_k_blocks, QT.Q5_K: dequantize_q5_k_blocks, QT.Q6_K: dequantize_q6_k_blocks,
    QT.Q8_K: dequantize_q8_k_blocks,
}


def quantize(data: np.ndarray, qtype) -> np.ndarray:
    """float32 [..., n] -> uint8 [..., row_bytes(n)] (F32 -> float32, F16 -> float16, as gguf.quants).
    n must be a multiple of the type's block size. Other float dtypes are converted to float32 first
    (F16 converts directly, as gguf.quants does)."""
    t = _qtype(qtype)
    data = np.asarray(data)
    if data.ndim == 0:
        raise ValueError(f"cannot quantize a 0-d array to {t.name}: pass rows, shape [..., n]")
    n = data.shape[-1]
    _check_row(n, t)
    if t == QT.F32:
        return data.astype(F32, copy=False)
    if t == QT.F16:
        with np.errstate(over="ignore"):
            return data.astype(np.float16, copy=False)
    x = data.astype(F32, copy=False)
    if t == QT.BF16:
        return quantize_bf16_blocks(x).reshape(*data.shape[:-1], 2 * n)
    bs, ts = GGML_QUANT_SIZES[t]
    out = _by_chunks(_QUANTIZE[t], x.reshape(-1, bs), ts, np.uint8, bs)
    return out.reshape(*data.shape[:-1], n // bs * ts)


def dequantize(data: np.ndarray, qtype) -> np.ndarray:
    """uint8 [..., row_bytes] -> float32 [..., n]. F32/F16 also accept float32/float16 arrays, and BF16
    uint16/int16 arrays of the raw bits."""
    t = _qtype(qtype)
    data = np.asarray(data)
    if t == QT.F32 and data.dtype == F32:
        return data
    if t == QT.F16 and data.dtype == np.float16:
        return data.astype(F32)
    if t == QT.BF16 and data.dtype in (np.uint16, np.int16):
        return (data.astype(np.int16, copy=False).astype(np.int32) << 16).view(F32)
    if data.dtype not in (np.uint8, np.int8):
        raise ValueError(f"dequantize({t.name}) expects the raw bytes as a uint8 array [..., row_bytes], got "
                         f"dtype {data.dtype}: pass data.view(np.uint8)")
    if data.ndim == 0:
        raise ValueError(f"cannot dequantize a 0-d array as {t.name}: pass rows of bytes, shape [..., row_bytes]")
    data = np.ascontiguousarray(data).view(np.uint8)
    bs, ts = GGML_QUANT_SIZES[t]
    nbytes = data.shape[-1]
    if nbytes % ts:
        raise ValueError(f"{t.name} stores {bs} values in blocks of {ts} bytes, but a row has {nbytes} bytes: "
                         f"pass whole rows of blocks (shape [..., n // {bs} * {ts}])")
    if t == QT.F32:
        return data.view(F32)
    if t == QT.F16:
        return data.view(np.float16).astype(F32)
    if t == QT.BF16:
        return dequantize_bf16_blocks(data)
    out = _by_chunks(_DEQUANTIZE[t], data.reshape(-1, ts), bs, F32, bs)
    return out.reshape(*data.shape[:-1], nbytes // ts * bs)
