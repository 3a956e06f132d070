"""DeepSeek's FP8 checkpoints: float8_e4m3fn weights with one float32 `weight_scale_inv` per 128x128 block."""

from __future__ import annotations

import numpy as np


def _e4m3fn_table() -> np.ndarray:
    """float32 value of each of the 256 e4m3fn bit patterns (bias 7, no infinities, S.1111.111 = NaN)."""
    bits = np.arange(256, dtype=np.uint32)
    sign = np.where(bits & 0x80, -1.0, 1.0)
    exp = (bits >> 3) & 0xF
    mant = (bits & 0x7).astype(np.float64)
    normal = (1.0 + mant / 8.0) * np.exp2(exp.astype(np.float64) - 7.0)
    subnormal = (mant / 8.0) * 2.0 ** -6
    value = sign * np.where(exp == 0, subnormal, normal)
    value[(bits & 0x7F) == 0x7F] = np.nan
    return value.astype(np.float32)


E4M3FN = _e4m3fn_table()


def dequantize_fp8_blocks(weight_bits: np.ndarray, scale_inv: np.ndarray,
                          block: tuple[int, int] = (128, 128), out: np.ndarray | None = None) -> np.ndarray:
    """weight_bits uint8 [N, K] (raw e4m3fn), scale_inv float32 [ceil(N/bn), ceil(K/bk)] -> float32 [N, K]
    (written into `out` when given).

    The last row/column block may be partial (N or K not a multiple of the block). One row of blocks at a
    time (the table lookup, then the scales in place), so the work stays in the cache: a 2048 x 7168 expert
    took a median 50 ms (up to 410) through whole-matrix temporaries (the scales repeated to the full size),
    28.5 ms so and 22.5 ms into a buffer (`out`, as convert passes); the same products, bit for bit.
    """
    if weight_bits.ndim != 2:
        raise ValueError(f"FP8 block dequantization expects a 2-D weight, got shape {weight_bits.shape}")
    n, k = weight_bits.shape
    bn, bk = block
    want = (-(-n // bn), -(-k // bk))
    scale_inv = np.asarray(scale_inv, dtype=np.float32)
    if scale_inv.shape != want:
        raise ValueError(f"weight_scale_inv has shape {scale_inv.shape}, but a [{n}, {k}] weight in "
                         f"{bn}x{bk} blocks needs {want}")
    if out is None:
        out = np.empty((n, k), np.float32)
    elif out.shape != (n, k) or out.dtype != np.float32:
        raise ValueError(f"out is {out.dtype} {list(out.shape)}, expected float32 {[n, k]}")
    bits = weight_bits.view(np.uint8)
    for i, r in enumerate(range(0, n, bn)):
        rows = out[r:r + bn]
        np.take(E4M3FN, bits[r:r + bn], out=rows)
        rows *= np.repeat(scale_inv[i], bk)[:k]
    return out


def quantize_fp8_blocks(weight: np.ndarray, block: tuple[int, int] = (128, 128)) -> tuple[np.ndarray, np.ndarray]:
    """float32 [N, K] -> (e4m3fn bits uint8 [N, K], scale_inv float32 blocks), as DeepSeek's FP8 cast does:
    each block scaled so its max |w| maps to 448, rounded to the nearest e4m3fn value."""
    n, k = weight.shape
    bn, bk = block
    gn, gk = -(-n // bn), -(-k // bk)
    padded = np.zeros((gn * bn, gk * bk), dtype=np.float32)
    padded[:n, :k] = weight
    blocks = padded.reshape(gn, bn, gk, bk)
    amax = np.abs(blocks).max(axis=(1, 3))
    scale_inv = np.where(amax > 0, amax / 448.0, 1.0).astype(np.float32)  # [gn, gk]
    scaled = blocks / scale_inv[:, None, :, None]
    finite = np.where(np.isnan(E4M3FN), np.inf, E4M3FN)
    order = np.argsort(finite, kind="stable")
    values = finite[order]
    flat = scaled.reshape(-1)
    pos = np.clip(np.searchsorted(values, flat), 1, len(values) - 1)
    lo, hi = values[pos - 1], values[pos]
    pick = np.where(np.abs(flat - lo) <= np.abs(hi - flat), pos - 1, pos)
    bits = order[pick].astype(np.uint8).reshape(gn * bn, gk * bk)[:n, :k]
    return np.ascontiguousarray(bits), scale_inv
