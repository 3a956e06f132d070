"""K-quant super-blocks (QK_K = 256): Q4_K, Q5_K, Q6_K and the activation type Q8_K, in vectorized numpy.

The quantizers reproduce llama.cpp's reference C (`quantize_row_q4_K_ref`, `quantize_row_q5_K_ref`,
`quantize_row_q6_K_ref`, `quantize_row_q8_K_ref` in `ggml/src/ggml-quants.c`, with `make_qkx2_quants`,
`make_qx_quants` and `nearest_int`) bit for bit: every step is done in float32 in the C evaluation order,
and every sum over the elements of a (sub-)block is accumulated sequentially, element 0 first, like the
C loops (never numpy's pairwise `sum`). The iterative scale searches run over all sub-blocks at once:
arrays are laid out element-major, `(elements per sub-block, n_sub_blocks)`, so each step of a C loop
over the elements is one numpy operation on a contiguous row.

The dequantizers do the same float32 operations, in the same order, as gguf-py's `gguf.quants`.
Block layouts are in `ggml-common.h` (see /work/shared/reference/peers.md section 4).
"""

from __future__ import annotations

import numpy as np

QK_K = 256
F32 = np.float32
_MAGIC = F32(12582912.0)  # 1.5 * 2**23, llama.cpp's nearest_int trick
GROUP_MAX_EPS = F32(1e-15)

# Bytes per super-block.
Q4_K_SIZE = 2 + 2 + 12 + QK_K // 2                # d, dmin, scales[12], qs[128]          = 144
Q5_K_SIZE = 2 + 2 + 12 + QK_K // 8 + QK_K // 2    # d, dmin, scales[12], qh[32], qs[128]  = 176
Q6_K_SIZE = QK_K // 2 + QK_K // 4 + QK_K // 16 + 2  # ql[128], qh[64], scales[16], d        = 210
Q8_K_SIZE = 4 + QK_K + 2 * (QK_K // 16)           # d (f32), qs[256], bsums[16] (i16)     = 292

# Chunk of super-blocks quantized at once: bounds the temporaries (~4 MiB per float32 array) and keeps
# them in cache. Results do not depend on it (every super-block is independent).
_CHUNK = 4096


# ----------------------------------------------------------------------------------------------- helpers

def nearest_int(v: np.ndarray) -> np.ndarray:
    """llama.cpp's `nearest_int`: float32 -> int32 via the 1.5*2**23 magic number (round half to even for
    |v| < 2**22). Reproduced on the bits, so out-of-range, infinite and NaN inputs give what C gives."""
    t = np.asarray(v, dtype=F32) + _MAGIC
    return (t.view(np.int32) & 0x007FFFFF) - 0x00400000


def _seqsum(a: np.ndarray) -> np.ndarray:
    """Sum over axis 0 in order ((a0 + a1) + a2) + ..., as a C loop `s += a[i]` accumulates. (np.sum along
    a contiguous axis adds pairwise, in a different order; spelled out so the order is guaranteed.)"""
    s = a[0].copy()
    for i in range(1, a.shape[0]):
        s += a[i]
    return s


def _f16_bits(x: np.ndarray) -> np.ndarray:
    """float32 -> IEEE half bits (round to nearest even, like GGML_FP32_TO_FP16) as uint16."""
    return np.asarray(x, dtype=F32).astype(np.float16).view(np.uint16)


def _f16_to_f32(b: np.ndarray) -> np.ndarray:
    return np.ascontiguousarray(b).view(np.float16).astype(F32)


def _rows(blocks: np.ndarray, width: int) -> np.ndarray:
    if blocks.ndim != 2 or blocks.shape[1] != width:
        raise ValueError(f"expected blocks of shape [n_blocks, {width}], got {blocks.shape}")
    return blocks


def _chunked(fn, blocks: np.ndarray, out_width: int, out_dtype) -> np.ndarray:
    """Quantize in chunks of _CHUNK blocks. Floating-point overflow (to an f16 inf scale, say) is part of
    the reference behaviour being reproduced, so numpy's warnings are silenced."""
    out = np.empty((blocks.shape[0], out_width), dtype=out_dtype)
    with np.errstate(all="ignore"):
        for s in range(0, blocks.shape[0], _CHUNK):
            out[s:s + _CHUNK] = fn(blocks[s:s + _CHUNK])
    return out


# ----------------------------------------------------------------------------------------------- searches

_EXACT_LIMIT = F32(2 ** 21)  # |v| below this: nearest_int(v) == rint(v) (with margin for the bound's rounding)


def _round_clip(v: np.ndarray, lo: int, hi: int, exact: bool) -> np.ndarray:
    """MAX(lo, MIN(hi, nearest_int(v))) as float32, in place in v. With exact=False the caller has shown
    |v| < 2**21 and finite, where np.rint is the same as the magic-number trick (and cheaper)."""
    if exact:
        return np.clip(nearest_int(v), lo, hi).astype(F32)
    np.rint(v, out=v)
    return np.clip(v, F32(lo), F32(hi), out=v)


def make_qkx2_quants(x: np.ndarray, w: np.ndarray, nmax: int, rmin: float, rdelta: float, nstep: int):
    """`make_qkx2_quants(n, nmax, x, weights, L, &the_min, Laux, rmin, rdelta, nstep, use_mad=false)` on
    every column of x / w (shape [n, S], float32) at once. Returns (L int32 [n, S], scale [S], the_min [S]).

    Rather than copying L at every improvement, the search remembers, per column, the iscale and min that
    produced the best L and recomputes L once at the end with the same float operations."""
    n = x.shape[0]
    xmin = x.min(axis=0)
    mx = x.max(axis=0)
    sum_w = w[0].copy()
    sum_x = sum_w * x[0]
    for i in range(1, n):
        sum_w += w[i]
        sum_x += w[i] * x[i]
    mn = np.where(xmin > 0, F32(0), xmin)
    flat = mx == mn
    fnmax = F32(nmax)
    buf = np.empty_like(x)
    wl = np.empty_like(x)
    wlx = np.empty_like(x)
    with np.errstate(divide="ignore", invalid="ignore", over="ignore"):

        def quants(iscale, mn):
            # exact nearest_int unless every |iscale*(x - mn)| is provably < 2**21
            bound = np.abs(iscale) * np.maximum(np.abs(mx - mn), np.abs(xmin - mn))
            exact = not bool(np.all(bound[~flat] < _EXACT_LIMIT))
            np.subtract(x, mn, out=buf)
            np.multiply(buf, iscale, out=buf)
            return _round_clip(buf, 0, nmax, exact)

        best_iscale = fnmax / (mx - mn)
        best_mn = mn
        scale = F32(1) / best_iscale
        lf = quants(best_iscale, mn)
        diff = np.multiply(lf, scale, out=wl)
        diff += mn
        diff -= x
        np.multiply(diff, diff, out=diff)
        diff *= w
        best_error = _seqsum(diff)
        for step in range(nstep + 1):
            iscale = (F32(rmin) + F32(rdelta) * F32(step) + fnmax) / (mx - mn)
            lf = quants(iscale, mn)
            np.multiply(w, lf, out=wl)
            sum_l = _seqsum(wl)
            sum_xl = _seqsum(np.multiply(wl, x, out=wlx))
            sum_l2 = _seqsum(np.multiply(wl, lf, out=wl))
            D = sum_w * sum_l2 - sum_l * sum_l
            this_scale = (sum_w * sum_xl - sum_x * sum_l) / D
            this_min = (sum_l2 * sum_x - sum_l * sum_xl) / D
            clamp = this_min > 0
            this_min = np.where(clamp, F32(0), this_min)
            this_scale = np.where(clamp, sum_xl / sum_l2, this_scale)
            diff = np.multiply(lf, this_scale, out=wl)
            diff += this_min
            diff -= x
            np.multiply(diff, diff, out=diff)
            diff *= w
            cur_error = _seqsum(diff)
            better = (D > 0) & (cur_error < best_error)
            if better.any():
                best_error = np.where(better, cur_error, best_error)
                scale = np.where(better, this_scale, scale)
                best_iscale = np.where(better, iscale, best_iscale)
                best_mn = np.where(better, mn, best_mn)       # the min this L was made with
                mn = np.where(better, this_min, mn)
        L = np.where(flat, F32(0), quants(best_iscale, best_mn)).astype(np.int32)
    scale = np.where(flat, F32(0), scale)
    return L, scale, -mn


def _signed_max(rows: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """Per row of [S, n]: (max |x|, the signed x that has it), the first one on ties, like C's strict `>`."""
    ax = np.abs(rows)
    imax = ax.argmax(axis=1)
    r = np.arange(rows.shape[0])
    return ax[r, imax], rows[r, imax]


def make_qx_quants_rmse1(x: np.ndarray, nmax: int, rows: np.ndarray | None = None):
    """`make_qx_quants(n, nmax, x, L, rmse_type=1, qw=NULL)` on every column of x ([n, S] float32);
    rows, if given, is the same data as [S, n] (contiguous, for a faster argmax).
    Returns (L int32 [n, S] in 0..2*nmax-1, scale [S])."""
    amax, mx = _signed_max(x.T if rows is None else rows)
    zero = amax < GROUP_MAX_EPS
    # |iscale*x| <= nmax + 1 on the columns that count, unless x holds inf/NaN
    exact = not bool(np.all(np.isfinite(amax)))
    with np.errstate(over="ignore", invalid="ignore"):
        w = x * x                                   # rmse_type 1: weights x^2
        wx = w * x
    fnmax = F32(nmax)
    buf = np.empty_like(x)
    tmp = np.empty_like(x)

    def attempt(iscale):
        lf = _round_clip(np.multiply(x, iscale, out=buf), -nmax, nmax - 1, exact)
        return _seqsum(np.multiply(wx, lf, out=tmp)), _seqsum(np.multiply(np.multiply(w, lf, out=tmp), lf, out=tmp))

    with np.errstate(divide="ignore", invalid="ignore", over="ignore"):
        iscale = -fnmax / mx
        best_iscale = iscale
        sumlx, suml2 = attempt(iscale)
        scale = np.where(suml2 != 0, sumlx / suml2, F32(0))
        best = scale * sumlx
        for step in range(-9, 10):
            if step == 0:
                continue
            iscale = -(fnmax + F32(0.1) * F32(step)) / mx
            sumlx, suml2 = attempt(iscale)
            better = (suml2 > 0) & (sumlx * sumlx > best * suml2)
            if better.any():
                best_iscale = np.where(better, iscale, best_iscale)
                scale = np.where(better, sumlx / suml2, scale)
                best = np.where(better, scale * sumlx, best)
        L = _round_clip(np.multiply(x, best_iscale, out=buf), -nmax, nmax - 1, exact)
    L = np.where(zero, F32(-nmax), L).astype(np.int32) + nmax     # (NaN in the zero columns)
    scale = np.where(zero, F32(0), scale)
    return L, scale


# ----------------------------------------------------------------------------------------------- Q4_K / Q5_K

def _pack_scale_min(ls: np.ndarray, lm: np.ndarray) -> np.ndarray:
    """6-bit scales and mins [nb, 8] -> the 12 packed bytes of Q4_K/Q5_K (inverse of get_scale_min_k4)."""
    ls = ls.astype(np.uint8)
    lm = lm.astype(np.uint8)
    out = np.empty((ls.shape[0], 12), dtype=np.uint8)
    out[:, 0:4] = ls[:, 0:4] | ((ls[:, 4:8] >> 4) << 6)
    out[:, 4:8] = lm[:, 0:4] | ((lm[:, 4:8] >> 4) << 6)
    out[:, 8:12] = (ls[:, 4:8] & 0xF) | ((lm[:, 4:8] & 0xF) << 4)
    return out


def get_scale_min(scales: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """12 packed bytes [nb, 12] -> (sc, m) uint8 [nb, 8] (`get_scale_min_k4` for j = 0..7)."""
    s = scales.reshape(-1, 3, 4)
    d, m, md = s[:, 0], s[:, 1], s[:, 2]
    sc = np.concatenate([d & 0x3F, (md & 0x0F) | ((d >> 2) & 0x30)], axis=-1)
    mn = np.concatenate([m & 0x3F, (md >> 4) | ((m >> 2) & 0x30)], axis=-1)
    return sc, mn


def _quantize_qkx(blocks: np.ndarray, nmax: int, rmin: float, rdelta: float, nstep: int):
    """The part shared by quantize_row_q4_K_ref / q5_K_ref. Returns (d bits, dmin bits, packed scales,
    L [nb, 256] uint8 in 0..nmax)."""
    nb = blocks.shape[0]
    x = np.ascontiguousarray(blocks.reshape(nb * 8, 32).T)           # [32, nb*8], element-major
    sum_x2 = _seqsum(x * x)
    av_x = np.sqrt(sum_x2 / F32(32))
    w = av_x + np.abs(x)
    L, scales, mins = make_qkx2_quants(x, w, nmax, rmin, rdelta, nstep)
    scales = scales.reshape(nb, 8)
    mins = mins.reshape(nb, 8)
    max_scale = np.fmax(np.fmax.reduce(scales, axis=1), F32(0))  # `if (scale > max_scale)` from 0: skips NaN
    max_min = np.fmax(np.fmax.reduce(mins, axis=1), F32(0))
    with np.errstate(divide="ignore"):
        inv_scale = np.where(max_scale > 0, F32(63) / max_scale, F32(0))
        inv_min = np.where(max_min > 0, F32(63) / max_min, F32(0))
    ls = np.minimum(nearest_int(inv_scale[:, None] * scales) & 0xFF, 63)   # uint8_t, then MIN(63, .)
    lm = np.minimum(nearest_int(inv_min[:, None] * mins) & 0xFF, 63)
    d_bits = _f16_bits(max_scale / F32(63))
    dmin_bits = _f16_bits(max_min / F32(63))
    d = _f16_to_f32(d_bits)[:, None] * ls.astype(F32)               # [nb, 8]
    dm = _f16_to_f32(dmin_bits)[:, None] * lm.astype(F32)
    xb = blocks.reshape(nb, 8, 32)
    with np.errstate(divide="ignore", invalid="ignore"):
        l = np.clip(nearest_int((xb + dm[..., None]) / d[..., None]), 0, nmax)
    L = L.T.reshape(nb, 8, 32)
    L = np.where((d != 0)[..., None], l, L)                        # `if (!d) continue;` keeps the search's L
    return d_bits, dmin_bits, _pack_scale_min(ls, lm), L.astype(np.uint8).reshape(nb, QK_K)


def _quantize_q4_k(blocks: np.ndarray) -> np.ndarray:
    nb = blocks.shape[0]
    d, dmin, scales, L = _quantize_qkx(blocks, 15, -1.0, 0.1, 20)
    L = L.reshape(nb, 4, 2, 32)
    qs = L[:, :, 0] | (L[:, :, 1] << 4)
    return np.concatenate([d.view(np.uint8).reshape(nb, 2), dmin.view(np.uint8).reshape(nb, 2), scales,
                           qs.reshape(nb, 128)], axis=1)


def _quantize_q5_k(blocks: np.ndarray) -> np.ndarray:
    nb = blocks.shape[0]
    d, dmin, scales, L = _quantize_qkx(blocks, 31, -0.5, 0.1, 15)
    L = L.reshape(nb, 8, 32)                                        # sub-block k, element l
    qh = np.zeros((nb, 32), dtype=np.uint8)
    for k in range(8):
        qh |= (L[:, k] >> 4) << k
    lo = (L & 0xF).reshape(nb, 4, 2, 32)
    qs = lo[:, :, 0] | (lo[:, :, 1] << 4)
    return np.concatenate([d.view(np.uint8).reshape(nb, 2), dmin.view(np.uint8).reshape(nb, 2), scales,
                           qh, qs.reshape(nb, 128)], axis=1)


def quantize_q4_k_blocks(blocks: np.ndarray) -> np.ndarray:
    """float32 [nb, 256] -> uint8 [nb, 144], bit-exact with `quantize_row_q4_K_ref`."""
    return _chunked(_quantize_q4_k, _rows(blocks, QK_K).astype(F32, copy=False), Q4_K_SIZE, np.uint8)


def quantize_q5_k_blocks(blocks: np.ndarray) -> np.ndarray:
    """float32 [nb, 256] -> uint8 [nb, 176], bit-exact with `quantize_row_q5_K_ref`."""
    return _chunked(_quantize_q5_k, _rows(blocks, QK_K).astype(F32, copy=False), Q5_K_SIZE, np.uint8)


def _dequantize_qkx(d, dmin, scales, q: np.ndarray) -> np.ndarray:
    nb = q.shape[0]
    sc, m = get_scale_min(scales)
    dl = (_f16_to_f32(d) * sc.astype(F32)).reshape(nb, 8, 1)
    ml = (_f16_to_f32(dmin) * m.astype(F32)).reshape(nb, 8, 1)
    return (dl * q.reshape(nb, 8, 32).astype(F32) - ml).reshape(nb, QK_K)


def dequantize_q4_k_blocks(blocks: np.ndarray) -> np.ndarray:
    """uint8 [nb, 144] -> float32 [nb, 256]: x = d*sc*q - dmin*m."""
    b = _rows(blocks, Q4_K_SIZE)
    nb = b.shape[0]
    qs = b[:, 16:].reshape(nb, 4, 1, 32)
    q = np.concatenate([qs & 0xF, qs >> 4], axis=2)                 # [nb, 4 chunks, lo/hi, 32]
    return _dequantize_qkx(b[:, 0:2], b[:, 2:4], b[:, 4:16], q)


def dequantize_q5_k_blocks(blocks: np.ndarray) -> np.ndarray:
    """uint8 [nb, 176] -> float32 [nb, 256]."""
    b = _rows(blocks, Q5_K_SIZE)
    nb = b.shape[0]
    qh = b[:, 16:48].reshape(nb, 1, 32) >> np.arange(8, dtype=np.uint8).reshape(1, 8, 1)
    qs = b[:, 48:].reshape(nb, 4, 1, 32)
    lo = np.concatenate([qs & 0xF, qs >> 4], axis=2).reshape(nb, 8, 32)
    q = lo | ((qh & 1) << 4)
    return _dequantize_qkx(b[:, 0:2], b[:, 2:4], b[:, 4:16], q)


# ----------------------------------------------------------------------------------------------- Q6_K

def _quantize_q6_k(blocks: np.ndarray) -> np.ndarray:
    nb = blocks.shape[0]
    x = np.ascontiguousarray(blocks.reshape(nb * 16, 16).T)          # [16, nb*16]
    L, scales = make_qx_quants_rmse1(x, 32, rows=blocks.reshape(nb * 16, 16))
    scales = scales.reshape(nb, 16)
    L = L.T.reshape(nb, 16, 16)
    # running max with a strict `>` from 0: the first largest |scale|; NaN scales (x*x overflowed) never win
    abs_s = np.abs(scales)
    abs_s = np.where(np.isnan(abs_s), F32(-1), abs_s)
    imax = abs_s.argmax(axis=1)
    rows = np.arange(nb)
    max_abs_scale = np.maximum(abs_s[rows, imax], F32(0))
    max_scale = np.where(max_abs_scale > 0, scales[rows, imax], F32(0))
    zero = max_abs_scale < GROUP_MAX_EPS
    with np.errstate(divide="ignore", invalid="ignore", over="ignore"):
        iscale = F32(-128) / max_scale
        d_bits = _f16_bits(F32(1) / iscale)
        sc = np.minimum(nearest_int(iscale[:, None] * scales), 127).astype(np.int8)   # int8_t store
        d = _f16_to_f32(d_bits)[:, None] * sc.astype(F32)
        l = np.clip(nearest_int(blocks.reshape(nb, 16, 16) / d[..., None]), -32, 31) + 32
    L = np.where((d != 0)[..., None], l, L).astype(np.uint8)
    L = np.where(zero[:, None, None], np.uint8(0), L)
    sc = np.where(zero[:, None], np.int8(0), sc)
    d_bits = np.where(zero, np.uint16(0), d_bits)
    # pack: per 128-element half h, l in 0..31: elements l, l+32, l+64, l+96
    L = L.reshape(nb, 2, 4, 32)
    ql = np.concatenate([(L[:, :, 0] & 0xF) | ((L[:, :, 2] & 0xF) << 4),
                         (L[:, :, 1] & 0xF) | ((L[:, :, 3] & 0xF) << 4)], axis=2)       # [nb, 2, 64]
    qh = (L[:, :, 0] >> 4) | ((L[:, :, 1] >> 4) << 2) | ((L[:, :, 2] >> 4) << 4) | ((L[:, :, 3] >> 4) << 6)
    return np.concatenate([ql.reshape(nb, 128), qh.reshape(nb, 64), sc.view(np.uint8),
                           d_bits.astype(np.uint16).view(np.uint8).reshape(nb, 2)], axis=1)


def quantize_q6_k_blocks(blocks: np.ndarray) -> np.ndarray:
    """float32 [nb, 256] -> uint8 [nb, 210], bit-exact with `quantize_row_q6_K_ref`."""
    return _chunked(_quantize_q6_k, _rows(blocks, QK_K).astype(F32, copy=False), Q6_K_SIZE, np.uint8)


def dequantize_q6_k_blocks(blocks: np.ndarray) -> np.ndarray:
    """uint8 [nb, 210] -> float32 [nb, 256]: x = d*scales[g]*(q-32)."""
    b = _rows(blocks, Q6_K_SIZE)
    nb = b.shape[0]
    ql = b[:, 0:128].reshape(nb, 2, 1, 64)
    ql = np.concatenate([ql & 0xF, ql >> 4], axis=2).reshape(nb, 2, 4, 32)   # q0 q1 | q2 q3 low bits
    qh = b[:, 128:192].reshape(nb, 2, 1, 32) >> np.array([0, 2, 4, 6], dtype=np.uint8).reshape(1, 1, 4, 1)
    q = (ql | ((qh & 3) << 4)).astype(np.int8) - np.int8(32)
    dl = (_f16_to_f32(b[:, 208:210]) * b[:, 192:208].view(np.int8).astype(F32)).reshape(nb, 16, 1)
    return (dl * q.reshape(nb, 16, 16).astype(F32)).reshape(nb, QK_K)


# ----------------------------------------------------------------------------------------------- Q8_K

def _quantize_q8_k(blocks: np.ndarray) -> np.ndarray:
    nb = blocks.shape[0]
    amax, mx = _signed_max(blocks)
    zero = amax == 0
    with np.errstate(divide="ignore", invalid="ignore", over="ignore"):
        iscale = F32(-127) / mx
        q = np.minimum(nearest_int(iscale[:, None] * blocks), 127).astype(np.int8)
        d = F32(1) / iscale
    q = np.where(zero[:, None], np.int8(0), q)
    d = np.where(zero, F32(0), d).astype(F32)
    bsums = q.reshape(nb, 16, 16).astype(np.int32).sum(axis=2).astype(np.int16)
    return np.concatenate([d.view(np.uint8).reshape(nb, 4), q.view(np.uint8),
                           bsums.view(np.uint8).reshape(nb, 32)], axis=1)


def quantize_q8_k_blocks(blocks: np.ndarray) -> np.ndarray:
    """float32 [nb, 256] -> uint8 [nb, 292] (d f32, qs[256] int8, bsums[16] int16), bit-exact with
    `quantize_row_q8_K_ref`; an all-zero block gives d = 0, qs = 0, bsums = 0."""
    return _chunked(_quantize_q8_k, _rows(blocks, QK_K).astype(F32, copy=False), Q8_K_SIZE, np.uint8)


def dequantize_q8_k_blocks(blocks: np.ndarray) -> np.ndarray:
    """uint8 [nb, 292] -> float32 [nb, 256]: x = d*q (`dequantize_row_q8_K`)."""
    b = _rows(blocks, Q8_K_SIZE)
    d = np.ascontiguousarray(b[:, 0:4]).view(F32)
    return d * b[:, 4:4 + QK_K].view(np.int8).astype(F32)
