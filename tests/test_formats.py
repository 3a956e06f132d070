"""quant.formats: GGUF block formats, bit-exact with gguf-py and with llama.cpp's reference quantizers.

- dequantize: every type against `gguf.quants.dequantize` (valid blocks and random raw bytes);
- quantize F16/BF16/Q8_0/Q4_0/Q5_0: against `gguf.quants.quantize`;
- quantize Q4_K/Q5_K/Q6_K/Q8_K: against llama.cpp itself (`ggml_quantize_chunk`, `quantize_row_q8_K_ref`
  from the `llama_cpp` package's libggml-base, through ctypes), and - so the vectorization is checked even
  without llama_cpp - against a scalar transliteration of the C reference below (float32 scalars, C order);
- awkward data (zeros, single nonzero, constant rows, ties, huge/tiny magnitudes), shapes and errors.
"""

from __future__ import annotations

import ctypes
import struct
from pathlib import Path

import gguf.quants as gq
import numpy as np
import pytest
from gguf import GGMLQuantizationType as QT

from quant import formats as F
from quant import kquants as K

BLOCK_TYPES = (QT.Q8_0, QT.Q4_0, QT.Q5_0, QT.Q4_1, QT.Q5_1, QT.Q4_K, QT.Q5_K, QT.Q6_K)
K_TYPES = (QT.Q4_K, QT.Q5_K, QT.Q6_K, QT.Q8_K)
f32 = np.float32


def bits(a: np.ndarray) -> np.ndarray:
    """Raw bytes, so that equal means bit-exact (NaN payloads and the sign of zero included)."""
    return np.ascontiguousarray(a).view(np.uint8)


def realistic(rng, rows: int, n: int) -> np.ndarray:
    """Weight-like rows: gaussian with per-row scales over 4 decades, heavy tails, outliers, uniform rows."""
    x = rng.standard_normal((rows, n)) * 10.0 ** rng.uniform(-3, 1, (rows, 1))
    x[0::4] = rng.standard_t(3, (len(x[0::4]), n)) * 0.02
    x[1::4, rng.integers(n)] *= 30.0
    x[2::4] = rng.uniform(-1, 1, (len(x[2::4]), n))
    return x.astype(f32)


def awkward(rng, n: int = 256, subnormal: bool = False) -> np.ndarray:
    """Rows (n a multiple of 256) that hit the corner cases of every quantizer. All finite.

    subnormal adds rows of 1e-40: there Q8_0/Q4_0/Q5_0's 1/d overflows and float->int casts of inf are
    undefined behaviour in C and numpy alike, so only the K-quant comparisons use them."""
    z = np.zeros(n, f32)
    rows = [z, -z]
    for v in (1.0, -1.0, 0.5, 3e38, -3e38, 1e-30, -1e-45, 65504.0, 1e5, -1e-7, 6e-8, 1e20) + ((1e-40,) * subnormal):
        r = z.copy()
        r[rng.integers(n)] = v
        rows += [r, np.full(n, v, f32)]                                    # single nonzero, constant row
    for scale in (1e-36, 1e-30, 1e-20, 1e-8, 1e-5, 1.0, 1e4, 1e8, 1e20, 1e30, 1e36):
        rows.append(rng.standard_normal(n) * scale)
    rows.append(rng.integers(-16, 17, n) * 0.5)                             # exact halves: rounding ties
    rows.append(rng.integers(-64, 65, n) * 0.25)
    rows.append(np.tile([-8, 8, 7.5, -7.5, 0.5, -0.5, 2.5, -2.5], n // 8))
    rows.append(np.tile(np.r_[127.0, -126.5, 0.5, -0.5, 1.5, 2.5, np.arange(26) - 12.5], n // 32))  # Q8_0 ties
    rows.append(np.tile(np.r_[-8.0, np.arange(-7.5, 8.0, 0.5)], n // 32))  # Q4_0: d = 1, x/d + 8.5 integral
    rows.append(np.tile(np.r_[-16.0, np.arange(-15.5, 0.0, 0.5)], n // 32))
    rows.append(np.arange(n) - n / 2)
    r = rng.standard_normal(n)
    r[:32], r[32:64], r[64:80] = 0, r[32:64] * 1e-6, r[64:80] * 1e6           # zero, tiny, huge sub-blocks
    rows.append(r)
    r = rng.standard_normal(n)
    r[::2] = 0
    rows.append(r)
    r = np.abs(rng.standard_normal(n)) + 5                                   # all positive, far from 0
    rows += [r, -r]
    r = rng.standard_normal(n) * 1e-3
    r[7] = -50
    rows.append(r)
    return np.stack(rows).astype(f32)


def random_bytes(rng, qtype: QT, nblocks: int) -> np.ndarray:
    """Random raw blocks whose float scales (d, dmin) are finite."""
    bs, ts = F.GGML_QUANT_SIZES[qtype]
    b = rng.integers(0, 256, (nblocks, ts), dtype=np.uint8)
    halves = {QT.Q8_0: [0], QT.Q4_0: [0], QT.Q5_0: [0], QT.Q4_1: [0, 2], QT.Q5_1: [0, 2], QT.Q4_K: [0, 2], QT.Q5_K: [0, 2], QT.Q6_K: [208]}
    for off in halves.get(qtype, []):
        h = rng.standard_normal(nblocks).astype(np.float16) * np.float16(rng.choice([1e-3, 1, 100]))
        b[:, off:off + 2] = h.view(np.uint8).reshape(nblocks, 2)
    if qtype == QT.Q8_K:
        b[:, 0:4] = (rng.standard_normal(nblocks).astype(f32) * 1e-2).view(np.uint8).reshape(nblocks, 4)
    return b


# ----------------------------------------------------------------------------------------------- API

def test_api_sizes_and_types():
    assert F.SUPPORTED == (QT.F32, QT.F16, QT.BF16, QT.Q8_0, QT.Q4_0, QT.Q5_0, QT.Q4_1, QT.Q5_1, QT.Q4_K, QT.Q5_K,
                           QT.Q6_K)
    assert F.ACTIVATION_TYPES == (QT.Q8_K,)
    want = {QT.F32: (1, 4), QT.F16: (1, 2), QT.BF16: (1, 2), QT.Q8_0: (32, 34), QT.Q4_0: (32, 18),
            QT.Q5_0: (32, 22), QT.Q4_1: (32, 20), QT.Q5_1: (32, 24), QT.Q4_K: (256, 144), QT.Q5_K: (256, 176), QT.Q6_K: (256, 210), QT.Q8_K: (256, 292)}
    for t, (bs, ts) in want.items():
        assert (F.block_size(t), F.type_size(t)) == (bs, ts) == tuple(F.GGML_QUANT_SIZES[t])
        assert F.row_bytes(1024, t) == 1024 // bs * ts
    assert F.block_size("q4_k") == F.block_size(12) == 256


@pytest.mark.parametrize("qtype", F.SUPPORTED + F.ACTIVATION_TYPES, ids=lambda t: t.name)
def test_shapes_and_dtypes(qtype):
    rng = np.random.default_rng(1)
    x = rng.standard_normal((2, 3, 512)).astype(f32)
    q = F.quantize(x, qtype)
    out_dtype = {QT.F32: np.float32, QT.F16: np.float16}.get(qtype, np.uint8)
    nb = 512 if q.dtype != np.uint8 else F.row_bytes(512, qtype)
    assert q.dtype == out_dtype and q.shape == (2, 3, nb)
    assert np.array_equal(bits(q.reshape(6, -1)), bits(F.quantize(x.reshape(6, 512), qtype)))
    d = F.dequantize(q, qtype)
    assert d.dtype == np.float32 and d.shape == x.shape
    assert np.array_equal(bits(d.reshape(6, -1)), bits(F.dequantize(q.reshape(6, -1), qtype)))
    # raw bytes are accepted for every type; empty inputs give empty outputs
    assert np.array_equal(bits(F.dequantize(bits(q).reshape(2, 3, -1), qtype)), bits(d))
    assert F.quantize(np.zeros((0, 512), f32), qtype).shape == (0, nb)


def test_errors_name_the_problem():
    x = np.zeros((2, 300), f32)
    with pytest.raises(ValueError, match=r"Q4_K .*blocks of 256 values.*row length is 300.*Q8_0"):
        F.quantize(x, QT.Q4_K)
    with pytest.raises(ValueError, match=r"Q8_0 .*blocks of 32 values.*row length is 300"):
        F.quantize(x, QT.Q8_0)
    with pytest.raises(ValueError, match=r"Q6_K .*blocks of 256 values.*row length is 100"):
        F.row_bytes(100, QT.Q6_K)
    with pytest.raises(ValueError, match=r"Q2_K is not supported.*Q4_K.*re-quantize"):
        F.quantize(np.zeros(256, f32), QT.Q2_K)
    with pytest.raises(ValueError, match=r"IQ4_NL is not supported"):
        F.dequantize(np.zeros(18, np.uint8), QT.IQ4_NL)
    with pytest.raises(ValueError, match=r"unknown ggml type 'Q9_Z'"):
        F.block_size("Q9_Z")
    with pytest.raises(ValueError, match=r"Q4_K stores 256 values in blocks of 144 bytes.*145 bytes"):
        F.dequantize(np.zeros((3, 145), np.uint8), QT.Q4_K)
    with pytest.raises(ValueError, match=r"dequantize\(Q8_0\) expects the raw bytes as a uint8.*float32"):
        F.dequantize(np.zeros((3, 34), f32), QT.Q8_0)
    with pytest.raises(ValueError, match=r"expected blocks of shape \[n_blocks, 256\]"):
        F.quantize_q4_k_blocks(np.zeros((2, 32), f32))


# ----------------------------------------------------------------------------------------------- vs gguf-py

@pytest.mark.parametrize("qtype", (QT.F16, QT.BF16, QT.Q8_0, QT.Q4_0, QT.Q5_0, QT.Q4_1, QT.Q5_1),
                         ids=lambda t: t.name)
def test_quantize_matches_gguf(qtype):
    rng = np.random.default_rng(2)
    x = np.concatenate([realistic(rng, 64, 512), awkward(rng, 512)])
    with np.errstate(all="ignore"):
        want = gq.quantize(x, qtype)
    got = F.quantize(x, qtype)
    assert got.dtype == want.dtype and got.shape == want.shape
    assert np.array_equal(bits(got), bits(want))


def test_f16_bf16_special_values_match_gguf():
    x = np.array([0.0, -0.0, np.inf, -np.inf, np.nan, 65504, 65520, 1e-8, 6e-8, 3e38, 1.0000001,
                  struct.unpack("<f", b"\x01\x00\xc0\x7f")[0]], f32)  # the last: a signalling-ish NaN payload
    for t in (QT.F16, QT.BF16):
        with np.errstate(all="ignore"):
            assert np.array_equal(bits(F.quantize(x, t)), bits(gq.quantize(x, t)))


@pytest.mark.parametrize("qtype", F.SUPPORTED, ids=lambda t: t.name)
def test_dequantize_matches_gguf(qtype):
    rng = np.random.default_rng(3)
    x = np.concatenate([realistic(rng, 32, 512), awkward(rng, 512)])
    valid = F.quantize(x, qtype)
    bs, ts = F.GGML_QUANT_SIZES[qtype]
    if bs == 1:   # raw values of every bit pattern, NaN and inf included
        raw = rng.integers(0, 256, (16, 512 * ts), dtype=np.uint8)
    else:
        raw = random_bytes(rng, qtype, 16 * 512 // bs).reshape(16, -1)
    for data in (valid, raw):
        with np.errstate(all="ignore"):     # inf scales (from 1e38 rows) times zero quants give NaN
            want = gq.dequantize(data, qtype)
            got = F.dequantize(data, qtype)
        assert got.dtype == np.float32 and got.shape == want.shape
        assert np.array_equal(bits(got), bits(want))


# ----------------------------------------------------------------------------------------------- awkward data

@pytest.mark.parametrize("qtype", BLOCK_TYPES + (QT.Q8_K,), ids=lambda t: t.name)
def test_zero_and_constant_blocks(qtype):
    n = 512
    zeros = F.quantize(np.zeros((2, n), f32), qtype)
    assert np.all(F.dequantize(zeros, qtype) == 0)
    if qtype in K_TYPES:   # llama.cpp writes an all-zero super-block as all-zero bytes
        assert not zeros.any()
    rng = np.random.default_rng(4)
    for c in (1.0, -3.0, 0.5, -0.75, 100.0, 4096.0):
        x = np.full((1, n), c, f32)
        d = F.dequantize(F.quantize(x, qtype), qtype)
        assert np.allclose(d, x, rtol=2e-3, atol=0), (c, d[0, :4])
    # a single nonzero value is kept almost exactly; zeros stay exactly zero, except next to it in
    # Q4_K/Q5_K/Q4_1/Q5_1, whose (sub-)block min may not sit on the grid (error up to half a step)
    x = np.zeros((1, n), f32)
    i = rng.integers(n)
    x[0, i] = -2.5
    d = F.dequantize(F.quantize(x, qtype), qtype)[0]
    assert abs(d[i] + 2.5) < 2.5e-3
    rest = np.delete(d, i)
    if qtype in (QT.Q4_K, QT.Q5_K, QT.Q4_1, QT.Q5_1):
        sub = np.arange(n) // 32 == i // 32
        step = 2.5 / {QT.Q4_K: 15, QT.Q5_K: 31, QT.Q4_1: 15, QT.Q5_1: 31}[qtype]
        assert np.all(np.abs(np.delete(d, i)[np.delete(sub, i)]) <= step / 2 * 1.01)
        rest = d[~sub]
    assert not rest.any()


@pytest.mark.parametrize("qtype", BLOCK_TYPES + (QT.Q8_K,), ids=lambda t: t.name)
def test_roundtrip_error_and_extreme_scales(qtype):
    """Relative RMSE on gaussian data is what the format's bits allow, at any magnitude F16 scales can
    represent; and huge/tiny rows never give NaN."""
    bound = {QT.Q8_0: 0.006, QT.Q4_0: 0.1, QT.Q5_0: 0.05, QT.Q4_1: 0.1, QT.Q5_1: 0.05, QT.Q4_K: 0.08, QT.Q5_K: 0.04, QT.Q6_K: 0.02,
             QT.Q8_K: 0.008}[qtype]
    rng = np.random.default_rng(5)
    g = rng.standard_normal((16, 1024)).astype(f32)
    for scale in (0.1, 1.0, 30.0):
        x = g * f32(scale)
        d = F.dequantize(F.quantize(x, qtype), qtype)
        assert np.sqrt(np.mean((d - x) ** 2) / np.mean(x ** 2)) < bound
    a = awkward(rng, 256, subnormal=qtype in K_TYPES)
    with np.errstate(all="ignore"):
        d = F.dequantize(F.quantize(a, qtype), qtype)
    # a NaN could only come from an infinite f16 scale times a zero quant (rows beyond f16's range)
    finite_rows = np.abs(a).max(axis=1) < 1e3
    assert np.isfinite(d[finite_rows]).all()


def test_kquant_chunking_does_not_change_results(monkeypatch):
    x = realistic(np.random.default_rng(6), 12, 256)
    want = {t: F.quantize(x, t) for t in K_TYPES}
    monkeypatch.setattr(K, "_CHUNK", 5)
    for t in K_TYPES:
        assert np.array_equal(F.quantize(x, t), want[t])


def test_q8_k_semantics():
    """peers.md section 4: iscale = -127/max (signed max), q = min(127, nearest_int(iscale*x)),
    d = 1/iscale stored as f32, bsums[i] = sum of quants 16i..16i+15; an all-zero block gives d = 0."""
    rng = np.random.default_rng(7)
    x = np.concatenate([realistic(rng, 8, 256), awkward(rng, 256, subnormal=True)[:4]])
    x[0, 17] = -np.abs(x[0]).max() * 2       # a negative max: iscale > 0; the signed max maps to -127
    b = F.quantize(x, QT.Q8_K)
    d = b[:, :4].copy().view(f32)[:, 0]
    qs = b[:, 4:260].view(np.int8)
    bsums = b[:, 260:].copy().view(np.int16)
    for r in range(len(x)):
        mx = x[r, np.abs(x[r]).argmax()]
        if mx == 0:
            assert d[r] == 0 and not qs[r].any() and not bsums[r].any()
            continue
        iscale = f32(-127) / mx
        want_q = np.minimum(np.rint(iscale * x[r]), 127).astype(np.int8)   # |iscale*x| <= 127: rint == nearest_int
        assert np.array_equal(qs[r], want_q)
        assert d[r] == f32(1) / iscale
        assert np.array_equal(bsums[r], want_q.reshape(16, 16).astype(np.int32).sum(1))
    assert qs[0, 17] == -127
    assert np.array_equal(F.dequantize(b, QT.Q8_K), d[:, None] * qs.astype(f32))


def test_nearest_int_is_the_c_magic_trick():
    v = np.array([0.5, 1.5, 2.5, -0.5, -1.5, 2.4999998, 4194303.0, 1e7, np.inf, np.nan, -3e38], f32)
    got = K.nearest_int(v)
    assert list(got[:7]) == [0, 2, 2, 0, -2, 2, 4194303]
    # outside |v| <= 2**22 the trick returns the low mantissa bits, as the C function does (asserts off)
    for val, g in zip(v[7:], got[7:]):
        t = struct.unpack("<i", struct.pack("<f", f32(val) + f32(12582912.0)))[0]
        assert g == (t & 0x7FFFFF) - 0x400000


# ----------------------------------------------------------------------------------------------- scalar C port

def _ni(v) -> int:
    t = struct.unpack("<i", struct.pack("<f", f32(v) + f32(12582912.0)))[0]
    return (t & 0x7FFFFF) - 0x400000


def _make_qkx2_scalar(x, w, nmax, rmin, rdelta, nstep):
    n = len(x)
    mn, mx, sum_w = x[0], x[0], w[0]
    sum_x = sum_w * x[0]
    for i in range(1, n):
        mn, mx = (x[i] if x[i] < mn else mn), (x[i] if x[i] > mx else mx)
        sum_w += w[i]
        sum_x += w[i] * x[i]
    if mn > 0:
        mn = f32(0)
    if mx == mn:
        return [0] * n, f32(0), -mn
    iscale = f32(nmax) / (mx - mn)
    scale = f32(1) / iscale
    L = [max(0, min(nmax, _ni(iscale * (x[i] - mn)))) for i in range(n)]
    best = f32(0)
    for i in range(n):
        diff = scale * f32(L[i]) + mn - x[i]
        best += w[i] * (diff * diff)
    for s in range(nstep + 1):
        iscale = (f32(rmin) + f32(rdelta) * f32(s) + f32(nmax)) / (mx - mn)
        la = [max(0, min(nmax, _ni(iscale * (x[i] - mn)))) for i in range(n)]
        sl = sl2 = sxl = f32(0)
        for i in range(n):
            wl = w[i] * f32(la[i])
            sl += wl
            sl2 += wl * f32(la[i])
            sxl += wl * x[i]
        D = sum_w * sl2 - sl * sl
        if D > 0:
            ts = (sum_w * sxl - sum_x * sl) / D
            tm = (sl2 * sum_x - sl * sxl) / D
            if tm > 0:
                tm, ts = f32(0), sxl / sl2
            cur = f32(0)
            for i in range(n):
                diff = ts * f32(la[i]) + tm - x[i]
                cur += w[i] * (diff * diff)
            if cur < best:
                L, best, scale, mn = la, cur, ts, tm
    return L, scale, -mn


def _q45k_scalar(x, nmax, rmin, rdelta, nstep) -> tuple:
    """quantize_row_q4_K_ref / q5_K_ref for one super-block -> (d f16, dmin f16, ls[8], lm[8], L[256])."""
    scales, mins, L = [], [], []
    for j in range(8):
        xs = x[32 * j:32 * j + 32]
        sx2 = f32(0)
        for v in xs:
            sx2 += v * v
        av = np.sqrt(sx2 / f32(32))
        l, s, m = _make_qkx2_scalar(xs, [av + abs(v) for v in xs], nmax, rmin, rdelta, nstep)
        scales.append(s)
        mins.append(m)
        L += l
    ms = mm = f32(0)
    for s, m in zip(scales, mins):
        ms, mm = (s if s > ms else ms), (m if m > mm else mm)
    inv_s = f32(63) / ms if ms > 0 else f32(0)
    inv_m = f32(63) / mm if mm > 0 else f32(0)
    ls = [min(63, _ni(inv_s * s) & 0xFF) for s in scales]
    lm = [min(63, _ni(inv_m * m) & 0xFF) for m in mins]
    d, dmin = np.float16(ms / f32(63)), np.float16(mm / f32(63))
    for j in range(8):
        dj = f32(d) * f32(ls[j])
        if dj == 0:
            continue
        dm = f32(dmin) * f32(lm[j])
        for i in range(32):
            L[32 * j + i] = max(0, min(nmax, _ni((x[32 * j + i] + dm) / dj)))
    return d, dmin, ls, lm, L


def _q6k_scalar(x) -> tuple:
    """quantize_row_q6_K_ref for one super-block -> (d f16, scales int8[16], L[256] in 0..63)."""
    scales, L = [], []
    for ib in range(16):
        xs = x[16 * ib:16 * ib + 16]
        amax = mx = f32(0)
        for v in xs:
            if abs(v) > amax:
                amax, mx = abs(v), v
        if amax < f32(1e-15):
            scales.append(f32(0))
            L += [0] * 16
            continue
        best_l, best_scale, best = None, None, None
        for s in [None] + [s for s in range(-9, 10) if s]:
            iscale = -f32(32) / mx if s is None else -(f32(32) + f32(0.1) * f32(s)) / mx
            sumlx = suml2 = f32(0)
            ls = []
            for v in xs:
                q = max(-32, min(31, _ni(iscale * v)))
                ls.append(q + 32)
                w = v * v
                sumlx += w * v * f32(q)
                suml2 += w * f32(q) * f32(q)
            if s is None:
                best_l, best_scale = ls, (sumlx / suml2 if suml2 else f32(0))
                best = best_scale * sumlx
            elif suml2 > 0 and sumlx * sumlx > best * suml2:
                best_l, best_scale = ls, sumlx / suml2
                best = best_scale * sumlx
        scales.append(best_scale)
        L += best_l
    max_abs = max_scale = f32(0)
    for s in scales:
        if abs(s) > max_abs:
            max_abs, max_scale = abs(s), s
    if max_abs < f32(1e-15):
        return np.float16(0), [0] * 16, [0] * 256
    iscale = f32(-128) / max_scale
    d = np.float16(f32(1) / iscale)
    sc = [((min(127, _ni(iscale * s)) + 128) & 0xFF) - 128 for s in scales]     # int -> int8_t
    for j in range(16):
        dj = f32(d) * f32(sc[j])
        if dj == 0:
            continue
        for i in range(16):
            L[16 * j + i] = max(-32, min(31, _ni(x[16 * j + i] / dj))) + 32
    return d, sc, L


def _scalar_blocks(rng) -> np.ndarray:
    a = awkward(rng, 256, subnormal=True)
    # zero, const 1.0, single -1.0, const 3e38, const 1e20, const 1e-40, 1e-20 and 1e20 gaussians,
    # ties, mixed sub-blocks, all positive, all negative
    pick = [0, 3, 4, 9, 25, 27, 30, 36, 41, 46, 48, 49]
    return np.concatenate([realistic(rng, 3, 256), a[pick]])


@pytest.mark.parametrize("qtype", (QT.Q4_K, QT.Q5_K, QT.Q6_K), ids=lambda t: t.name)
def test_kquant_matches_scalar_port_of_c_reference(qtype):
    """The vectorized search equals a line-by-line float32 port of ggml-quants.c (no llama_cpp needed)."""
    x = _scalar_blocks(np.random.default_rng(8))
    with np.errstate(all="ignore"):
        got = F.quantize(x, qtype)
    for r in range(len(x)):
        b = got[r]
        if qtype == QT.Q6_K:
            with np.errstate(all="ignore"):
                d, sc, L = _q6k_scalar(x[r])
            assert b[208:].tobytes() == np.float16(d).tobytes()
            assert list(b[192:208].view(np.int8)) == sc
            unit = b.copy()                 # d = 1, all scales 1: dequantizing gives q - 32
            unit[192:208] = 1
            unit[208:] = np.array([1.0], np.float16).view(np.uint8)
            assert list(F.dequantize(unit[None], qtype)[0].astype(int) + 32) == L
        else:
            nmax, rmin, nstep = (15, -1.0, 20) if qtype == QT.Q4_K else (31, -0.5, 15)
            with np.errstate(all="ignore"):
                d, dmin, ls, lm, L = _q45k_scalar(x[r], nmax, rmin, 0.1, nstep)
            assert b[0:2].tobytes() == d.tobytes() and b[2:4].tobytes() == dmin.tobytes()
            sc, m = K.get_scale_min(b[None, 4:16])
            assert list(sc[0]) == ls and list(m[0]) == lm
            if qtype == QT.Q4_K:
                qs = b[16:].reshape(4, 32)
                q = np.stack([qs & 15, qs >> 4], 1).reshape(256)
            else:
                qs = b[48:].reshape(4, 32)
                qh = b[16:48]
                q = np.stack([qs & 15, qs >> 4], 1).reshape(8, 32) | (((qh[None] >> np.arange(8)[:, None]) & 1) << 4)
            assert list(q.reshape(256)) == L


# ----------------------------------------------------------------------------------------------- vs llama.cpp

class _TypeTraits(ctypes.Structure):   # struct ggml_type_traits (ggml.h)
    _fields_ = [("type_name", ctypes.c_char_p), ("blck_size", ctypes.c_int64),
                ("blck_size_interleave", ctypes.c_int64), ("type_size", ctypes.c_size_t),
                ("is_quantized", ctypes.c_bool), ("to_float", ctypes.c_void_p), ("from_float_ref", ctypes.c_void_p)]


_ROW_FN = ctypes.CFUNCTYPE(None, ctypes.c_void_p, ctypes.c_void_p, ctypes.c_int64)


@pytest.fixture(scope="module")
def ggml():
    llama_cpp = pytest.importorskip("llama_cpp")
    libdir = Path(llama_cpp.__file__).parent / "lib"
    found = sorted(libdir.glob("libggml-base.*")) or sorted(libdir.glob("ggml-base.*"))
    if not found:
        pytest.fail(f"llama_cpp is installed but {libdir} has no libggml-base library")
    lib = ctypes.CDLL(str(found[0]))
    lib.ggml_quantize_chunk.restype = ctypes.c_size_t
    lib.ggml_quantize_chunk.argtypes = [ctypes.c_int, ctypes.c_void_p, ctypes.c_void_p, ctypes.c_int64,
                                        ctypes.c_int64, ctypes.c_int64, ctypes.c_void_p]
    lib.ggml_row_size.restype = ctypes.c_size_t
    lib.ggml_row_size.argtypes = [ctypes.c_int, ctypes.c_int64]
    lib.ggml_get_type_traits.restype = ctypes.POINTER(_TypeTraits)
    lib.ggml_get_type_traits.argtypes = [ctypes.c_int]
    for fn in ("quantize_row_q8_K_ref", "dequantize_row_q8_K"):
        getattr(lib, fn).restype = None
        getattr(lib, fn).argtypes = [ctypes.c_void_p, ctypes.c_void_p, ctypes.c_int64]
    lib.cpu = None    # the CPU backend's own activation quantizer, where the library can be loaded
    cpu = sorted(libdir.glob("libggml-cpu.*")) or sorted(libdir.glob("ggml-cpu.*"))
    if cpu:
        try:
            lib.cpu = ctypes.CDLL(str(cpu[0]))
            lib.cpu.ggml_get_type_traits_cpu.restype = ctypes.POINTER(ctypes.c_void_p)  # from_float first
            lib.cpu.ggml_get_type_traits_cpu.argtypes = [ctypes.c_int]
        except (OSError, AttributeError):
            lib.cpu = None
    return lib


def c_quantize(lib, x: np.ndarray, qtype: QT) -> np.ndarray:
    x = np.ascontiguousarray(x, dtype=f32)
    nrows, n = x.shape
    rb = lib.ggml_row_size(int(qtype), n)
    assert rb == F.row_bytes(n, qtype)
    out = np.zeros((nrows, rb), np.uint8)
    if qtype == QT.Q8_K:   # activation-only: no ggml_quantize_chunk path
        lib.quantize_row_q8_K_ref(x.ctypes.data, out.ctypes.data, x.size)
    else:
        assert lib.ggml_quantize_chunk(int(qtype), x.ctypes.data, out.ctypes.data, 0, nrows, n, None) == out.size
    return out


def c_dequantize(lib, b: np.ndarray, qtype: QT) -> np.ndarray:
    b = np.ascontiguousarray(b, dtype=np.uint8)
    bs, ts = F.GGML_QUANT_SIZES[qtype]
    out = np.zeros((b.shape[0], b.shape[1] // ts * bs), f32)
    if qtype == QT.Q8_K:
        lib.dequantize_row_q8_K(b.ctypes.data, out.ctypes.data, out.size)
    else:
        _ROW_FN(lib.ggml_get_type_traits(int(qtype)).contents.to_float)(b.ctypes.data, out.ctypes.data, out.size)
    return out


def random_bit_patterns(rng, rows: int, n: int) -> np.ndarray:
    """Finite float32s with every exponent, and per-block log-uniform magnitudes from 1e-45 to 1e38."""
    b = rng.integers(0, 2 ** 32, (rows, n), dtype=np.uint64).astype(np.uint32)
    b = np.where((b & 0x7F800000) == 0x7F800000, b & 0xBFFFFFFF, b)
    e = rng.uniform(-45, 38, (rows, 1)) + rng.uniform(-3, 0, (rows, n)) * rng.integers(0, 2, (rows, 1))
    m = rng.standard_normal((rows, n)) * 10.0 ** e
    with np.errstate(over="ignore"):
        return np.concatenate([b.view(f32), m.astype(f32)])


@pytest.mark.parametrize("qtype", K_TYPES, ids=lambda t: t.name)
def test_kquant_quantize_bit_exact_with_llama_cpp(ggml, qtype):
    rng = np.random.default_rng(9)
    x = np.concatenate([realistic(rng, 96, 1024), awkward(rng, 1024, subnormal=True),
                        random_bit_patterns(rng, 24, 1024)])
    with np.errstate(all="ignore"):
        got = F.quantize(x, qtype)
    want = c_quantize(ggml, x, qtype)
    bad = np.nonzero(np.any(got != want, axis=1))[0]
    assert bad.size == 0, f"{qtype.name}: rows {bad[:10]} differ from llama.cpp"


def test_q8_k_bit_exact_with_cpu_backend_from_float(ggml):
    """`ggml_get_type_traits_cpu(GGML_TYPE_Q8_K)->from_float`: what the CPU backend quantizes activations
    with before a K-quant dot product."""
    if ggml.cpu is None:
        pytest.skip("libggml-cpu not loadable next to libggml-base")
    from_float = ggml.cpu.ggml_get_type_traits_cpu(int(QT.Q8_K)).contents.value
    assert from_float, "no from_float for Q8_K"
    rng = np.random.default_rng(12)
    x = np.ascontiguousarray(np.concatenate([realistic(rng, 32, 1024), awkward(rng, 1024, subnormal=True)]))
    want = np.zeros((len(x), F.row_bytes(1024, QT.Q8_K)), np.uint8)
    _ROW_FN(from_float)(x.ctypes.data, want.ctypes.data, x.size)
    assert np.array_equal(F.quantize(x, QT.Q8_K), want)


@pytest.mark.parametrize("qtype", (QT.Q8_0, QT.Q4_0, QT.Q5_0, QT.Q4_1, QT.Q5_1), ids=lambda t: t.name)
def test_legacy_quantize_bit_exact_with_llama_cpp(ggml, qtype):
    """gguf-py (and so quant.formats) equals quantize_row_q*_0_ref except for one thing: a block of zeros
    that starts with -0.0 gets d = +0.0 instead of C's -0.0 (the decoded values are the same zeros)."""
    rng = np.random.default_rng(10)
    x = np.concatenate([realistic(rng, 64, 512), awkward(rng, 512)])
    got = F.quantize(x, qtype).reshape(-1, F.type_size(qtype))
    want = c_quantize(ggml, x, qtype).reshape(got.shape)
    blocks = x.reshape(len(got), -1)
    neg_zero_start = (np.abs(blocks).max(1) == 0) & np.signbit(blocks[:, 0])
    assert neg_zero_start.any()
    assert np.array_equal(got[~neg_zero_start], want[~neg_zero_start])
    assert np.array_equal(got[neg_zero_start, 2:], want[neg_zero_start, 2:])


@pytest.mark.parametrize("qtype", BLOCK_TYPES + (QT.Q8_K,), ids=lambda t: t.name)
def test_dequantize_bit_exact_with_llama_cpp(ggml, qtype):
    rng = np.random.default_rng(11)
    valid = F.quantize(realistic(rng, 16, 1024), qtype)
    raw = random_bytes(rng, qtype, 64).reshape(16, -1)
    for b in (valid, raw):
        assert np.array_equal(bits(F.dequantize(b, qtype)), bits(c_dequantize(ggml, b, qtype)))
