"""The engine's row-interleaved layouts (offload/csrc/repack.h: Q4_0_R16, Q4_1_R16, Q5_0_R16, Q5_1_R16,
Q8_0_R16, Q4_K_R16, Q5_K_R16, Q6_K_R16).

A repacked matrix holds the same bytes as the plain one, 16 rows interleaved block by block. Its
products must match the float64 reference of test_dot_kernels within the same tolerance, on every ISA
(AMX, VNNI and AVX2 kernels read the layout; scalar unpacks each group for the plain kernels), and the
engine's linear and fused MoE must give what they give on the plain layout. The layout is checked
byte by byte against an independent numpy description of it.
"""

from __future__ import annotations

import numpy as np
import pytest
from gguf import GGMLQuantizationType as QT

from offload import _C
from offload.engine import CpuEngine, QuantWeight, prepare_weight
from quant import formats as F

from .test_dot_kernels import ACT, ISAS, TOL, activations, dequantize_activation, f16, raw, weights

TYPES = (QT.Q4_0, QT.Q4_1, QT.Q5_0, QT.Q5_1, QT.Q8_0, QT.Q4_K, QT.Q5_K, QT.Q6_K)
KQUANTS = (QT.Q4_K, QT.Q5_K, QT.Q6_K)
f32 = np.float32


def numpy_r16(w: np.ndarray, t: QT) -> np.ndarray:
    """The layout of repack.h in numpy: w uint8 [rows, row_bytes] -> the same bytes interleaved."""
    rows = w.shape[0]
    ts = F.type_size(t)
    b = w.reshape(rows // 16, 16, -1, ts).transpose(0, 2, 1, 3)  # [group, block, row j, block bytes]
    d = b[..., 0:2]
    if t == QT.Q6_K:  # block: ql [128] | qh [64] | scales [16] | d
        scales = b[..., 192:208].transpose(0, 1, 3, 2)  # [g, b, s, j]
        ql = b[..., 0:128].reshape(*b.shape[:3], 32, 4).transpose(0, 1, 3, 2, 4)  # [g, b, m, j, l]
        qh = b[..., 128:192].reshape(*b.shape[:3], 16, 4).transpose(0, 1, 3, 2, 4)
        parts = [b[..., 208:210], scales, ql, qh]
    elif t in (QT.Q4_K, QT.Q5_K):  # block: d | dmin | scales [12] | (Q5_K: qh [32]) | qs [128]
        qs_off = 48 if t == QT.Q5_K else 16
        scales = b[..., 4:16].reshape(*b.shape[:3], 3, 4).transpose(0, 1, 3, 2, 4)  # [g, b, v, j, 4]
        qs = b[..., qs_off:].reshape(*b.shape[:3], 4, 8, 4).transpose(0, 1, 3, 4, 2, 5)  # [g, b, i, k, j, l]
        parts = [d, b[..., 2:4], scales, qs]
        if t == QT.Q5_K:
            qh = b[..., 16:48].astype(np.uint64)  # [g, b, j, 32]
            words = np.zeros((*b.shape[:2], 4, 8, 2), np.uint64)
            for i in range(4):
                for k in range(8):
                    for h in range(2):
                        for j in range(16):
                            for l in range(4):
                                bit = (qh[..., j, 4 * k + l] >> np.uint64(2 * i + h)) & np.uint64(1)
                                words[..., i, k, h] |= bit << np.uint64(4 * j + l)
            parts.append(words.view(np.uint8))
    elif t == QT.Q8_0:
        qs = b[..., 2:34].reshape(*b.shape[:3], 8, 4).transpose(0, 1, 3, 2, 4)  # [g, b, k, j, l]
        parts = [d, qs]
    else:  # Q4_0: d | qs [16]; Q5_0: d | qh [4] | qs; Q4_1: d | m | qs; Q5_1: d | m | qh | qs
        head = 4 if t in (QT.Q4_1, QT.Q5_1) else 2
        fifth = t in (QT.Q5_0, QT.Q5_1)
        qs_off = head + 4 * fifth
        qs = b[..., qs_off:qs_off + 16].reshape(*b.shape[:3], 4, 4).transpose(0, 1, 3, 2, 4)  # [g, b, m, j, l]
        parts = [d, b[..., 2:4], qs] if head == 4 else [d, qs]
        if fifth:
            qh = b[..., head:head + 4].copy().view(np.uint32)[..., 0].astype(np.uint64)  # [g, b, j]
            words = np.zeros((*b.shape[:2], 8), np.uint64)
            for k in range(8):
                for j in range(16):
                    for l in range(4):
                        words[..., k] |= ((qh[..., j] >> np.uint64(4 * k + l)) & np.uint64(1)) << np.uint64(4 * j + l)
            parts.append(words.view(np.uint8))
    flat = [p.reshape(*b.shape[:2], -1) for p in parts]
    return np.concatenate(flat, axis=-1).reshape(w.shape)


@pytest.mark.parametrize("wtype", TYPES, ids=lambda t: t.name)
def test_layout_is_the_documented_one(wtype):
    k = 512 if wtype in KQUANTS else 96
    w = raw(F.quantize(weights(np.random.default_rng(7), 32, k), wtype))
    r = _C.repack_r16(int(wtype), w, k)
    assert r.shape == w.shape and r.dtype == np.uint8
    assert np.array_equal(r, numpy_r16(w, wtype))
    assert _C.r16_type(int(wtype)) == 1000 + int(wtype)
    assert _C.r16_type(int(QT.Q2_K)) == int(QT.Q2_K)


@pytest.mark.parametrize("isa", ISAS)
@pytest.mark.parametrize("wtype", TYPES, ids=lambda t: t.name)
def test_matmul_matches_reference(wtype, isa):
    rng = np.random.default_rng(int(wtype))
    for k in ((256, 512, 2816) if wtype in KQUANTS else (32, 96, 512, 2816)):
        wf = weights(rng, 48, k)
        w = raw(F.quantize(wf, wtype))
        wd = F.dequantize(w, wtype).astype(np.float64)
        mag = np.abs(wd)
        if wtype in (QT.Q4_K, QT.Q4_1, QT.Q5_1):  # d*q and the min summed apart: rounding scales with both
            blocks = w.reshape(48, -1, F.type_size(wtype))
            mag = 0
            for zeroed in (slice(2, 4), slice(0, 2)):
                part = blocks.copy()
                part[..., zeroed] = 0
                mag = mag + np.abs(F.dequantize(part.reshape(w.shape), wtype).astype(np.float64))
        r = _C.repack_r16(int(wtype), w, k)
        # 8+: the AMX Q4_K kernel (17+: two token tiles an item; 51, 100: items of two shapes, of one),
        # 10+: the 32-value ones
        for n_tok in (1, 2, 3, 7, 8, 9, 10, 16, 17, 33, 51, 100):
            x = activations(rng, n_tok, k)
            ad = dequantize_activation(ACT[wtype], _C.quantize_activation(ACT[wtype], x), k)
            y_ref, scale = ad @ wd.T, np.abs(ad) @ mag.T
            if wtype in (QT.Q4_1, QT.Q5_1):  # m_w * s_a with s_a as Q8_1 stores it (test_dot_kernels.reference)
                b = _C.quantize_activation(ACT[wtype], x).reshape(n_tok, -1, 36)
                exact_s = f16(b[..., :2]) * b[..., 4:].view(np.int8).astype(np.float64).sum(-1)
                m = f16(w.reshape(48, -1, F.type_size(wtype))[..., 2:4])
                y_ref = y_ref + (f16(b[..., 2:4]) - exact_s) @ m.T
                scale = scale + np.abs(f16(b[..., 2:4])) @ np.abs(m).T
            for n in (16, 48):
                y = _C.matmul(_C.r16_type(int(wtype)), r[:n], x, isa)
                err = np.abs(y - y_ref[:, :n])
                assert (err <= TOL * scale[:, :n]).all(), (wtype.name, isa, k, n_tok, n, err.max())


@pytest.mark.parametrize("isa", ["auto"] + [i for i in ("avx2", "avx_vnni") if i in ISAS])
@pytest.mark.parametrize("wtype", TYPES, ids=lambda t: t.name)
def test_engine_ops_match_plain_layout(wtype, isa):
    """linear (all T) and the fused MoE (experts and shared expert repacked) against the plain layout, on
    the best ISA, on AVX2 and on AVX-VNNI (the 256-bit kernels of dot_r16_simd256.h, in both builds)."""
    rng = np.random.default_rng(3)
    H, I, E, A = 256, (256 if wtype in KQUANTS else 96), 6, 3
    for threads in (1, 2):
        eng = CpuEngine(threads, isa=isa)
        w = QuantWeight(wtype.name, raw(F.quantize(weights(rng, 64, H), wtype)), H)
        for T in (1, 2, 7, 33, 128):
            x = activations(rng, T, H)
            np.testing.assert_allclose(eng.linear(prepare_weight(w, force=True), x), eng.linear(w, x),
                                       rtol=1e-5, atol=1e-5 * np.abs(eng.linear(w, x)).max())
        def matrix(count, rows, cols):  # expert-like weights (test_dot_kernels' span 3 decades: SiLU overflows)
            w = (rng.standard_normal((count * rows, cols)) * 0.05).astype(f32)
            return QuantWeight(wtype.name, raw(F.quantize(w, wtype)).reshape(count, rows, -1)[0 if count == 1 else
                                                                                            slice(None)], cols)

        gate, up, down = matrix(E, I, H), matrix(E, I, H), matrix(E, H, I)
        shared = [(matrix(1, I, H), matrix(1, I, H), matrix(1, H, I))]
        packed = [prepare_weight(m, force=True) for m in (gate, up, down)]
        packed_shared = [tuple(prepare_weight(m, force=True) for m in shared[0])]
        assert all(p.type.endswith("_R16") for p in packed + list(packed_shared[0]))
        for T in (1, 3, 33):
            x = rng.standard_normal((T, H)).astype(f32)
            ids = np.stack([rng.choice(E, A, replace=False) for _ in range(T)]).astype(np.int64)
            ids[0, 0] = -1
            wts = rng.random((T, A), dtype=f32)
            ref = eng.moe(x, ids, wts, gate, up, down, shared=shared)
            got = eng.moe(x, ids, wts, *packed, shared=packed_shared)
            # the float sums differ in order only, but a last-bit change in silu(gate) * up can flip one
            # Q8_0 rounding of the down projection's input: that token then moves by one quant step of h
            # (~1/127 of its block) times a down row. Most tokens agree to float rounding.
            err = np.abs(got - ref).max(1) / np.abs(ref).max()
            assert err.max() < 2e-2 and np.sum(err >= 1e-4) <= max(1, T // 4), (T, err)


@pytest.mark.parametrize("isa", ISAS)
def test_q6k_every_scale_and_quant(isa):
    """Q6_K blocks of random bytes whose 16 x 16 sub-block scales take each of the 256 int8 values once per
    super-block, quants 0..63 alike: the AMX kernel splits every scale into three base-7 digits and
    multiplies byte pairs in 16-bit words (dot_r16_amx.cpp), so each scale and quant must come out exact,
    at one token tile and at several (9 / 16 / 17 / 40 tokens), on every ISA."""
    rng = np.random.default_rng(6)
    k, rows = 512, 32
    nb = k // 256
    w = rng.integers(0, 256, (rows, nb, 210), dtype=np.uint8)
    for g in range(rows // 16):
        for b in range(nb):
            perm = rng.permutation(256).astype(np.int16) - 128  # every int8 scale once in 16 rows x 16
            w[16 * g:16 * g + 16, b, 192:208] = perm.reshape(16, 16).astype(np.int8).view(np.uint8)
    w[..., 208:210] = (rng.random((rows, nb)) * 1e-3 + 1e-4).astype(np.float16).view(np.uint8).reshape(rows, nb, 2)
    w = w.reshape(rows, -1)
    wd = F.dequantize(w, QT.Q6_K).astype(np.float64)
    r = _C.repack_r16(int(QT.Q6_K), w, k)
    for n_tok in (1, 8, 9, 16, 17, 40):
        x = activations(rng, n_tok, k)
        ad = dequantize_activation("Q8_K", _C.quantize_activation("Q8_K", x), k)
        y_ref, scale = ad @ wd.T, np.abs(ad) @ np.abs(wd).T
        y = _C.matmul(_C.r16_type(int(QT.Q6_K)), r, x, isa)
        err = np.abs(y - y_ref)
        assert (err <= TOL * scale).all(), (isa, n_tok, err.max())


def test_prepare_weight_leaves_what_it_cannot_repack():
    rng = np.random.default_rng(5)
    f16w = QuantWeight("F16", weights(rng, 32, 256).astype(np.float16), 256)
    assert prepare_weight(f16w, force=True) is f16w
    ragged = QuantWeight("Q8_0", raw(F.quantize(weights(rng, 24, 64), QT.Q8_0)), 64)  # 24 rows
    assert prepare_weight(ragged, force=True) is ragged


def test_weights_are_repacked_on_every_isa_but_scalar():
    """In a child process: TANDEM_ISA is read once."""
    import subprocess
    import sys

    code = "from offload.engine import interleaved_layouts as il; print(int(il()))"
    for isa in ISAS:
        out = subprocess.run([sys.executable, "-c", code], env={**__import__("os").environ, "TANDEM_ISA": isa},
                             capture_output=True, text=True, check=True).stdout.split()[-1]
        assert out == ("0" if isa == "scalar" else "1"), (isa, out)


def test_errors():
    rng = np.random.default_rng(0)
    w = raw(F.quantize(weights(rng, 24, 64), QT.Q8_0))
    with pytest.raises(ValueError, match="multiple of 16"):
        _C.repack_r16(int(QT.Q8_0), w, 64)
    with pytest.raises(ValueError, match="no row-interleaved layout"):
        _C.repack_r16(int(QT.F16), weights(rng, 16, 256).astype(np.float16).view(np.uint8), 256)
    with pytest.raises(ValueError, match="bytes"):
        _C.repack_r16(int(QT.Q8_0), w[:16], 96)
    with pytest.raises(ValueError, match="C-contiguous"):
        _C.repack_r16(int(QT.Q8_0), np.concatenate([w, w], 1)[:16, ::2], 64)
    with pytest.raises(ValueError, match="multiple of 16 rows"):  # a repacked type id on a ragged matrix
        _C.matmul(_C.r16_type(int(QT.Q8_0)), w, rng.standard_normal((1, 64)).astype(f32))


def test_resident_copy_is_the_same_array_in_weight_memory():
    from offload.engine import RESIDENT_MIN_BYTES, resident

    rng = np.random.default_rng(7)
    big = raw(F.quantize(weights(rng, 2048, 1024), QT.Q8_0))  # 2.2 MB: on huge pages where THP allows
    copy = _C.resident_copy(big)
    assert copy.dtype == big.dtype and copy.shape == big.shape and np.array_equal(copy, big)
    assert copy.ctypes.data % (2 << 20) == 0  # whole huge pages from the start
    halves = rng.standard_normal((3, 5)).astype(np.float16)
    assert np.array_equal(_C.resident_copy(halves), halves) and _C.resident_copy(halves).dtype == np.float16
    w, r = QuantWeight("Q8_0", big, 1024), QuantWeight("Q8_0", copy, 1024)
    x = rng.standard_normal((3, 1024)).astype(f32)
    eng = CpuEngine(threads=2)
    assert np.array_equal(eng.linear(w, x), eng.linear(r, x))
    small = big[:16]
    assert small.nbytes < RESIDENT_MIN_BYTES and resident(small) is small
    assert resident(big) is big or not np.shares_memory(resident(big), big)
    with pytest.raises(ValueError, match="C-contiguous"):
        _C.resident_copy(big[:, ::2])


@pytest.mark.parametrize("wtype", [QT.Q4_K, QT.Q8_0])
def test_repack_on_threads_gives_the_same_bytes(wtype):
    """The loader repacks on every core: each thread takes a contiguous run of 16-row groups, so the bytes
    are those of one thread's repack (matrices of 17-19 MiB: four threads' worth)."""
    rng = np.random.default_rng(3)
    rows, k = 16 * 251, 8192 if wtype == QT.Q4_K else 4096
    w = rng.integers(0, 256, (rows, F.GGML_QUANT_SIZES[wtype][1] * k // F.GGML_QUANT_SIZES[wtype][0]), dtype=np.uint8)
    one = _C.repack_r16(int(wtype), w, k)
    for threads in (2, 3, 64):
        assert np.array_equal(_C.repack_r16(int(wtype), w, k, threads=threads), one)
    assert np.array_equal(_C.repack_r16(int(wtype), w[:32], k, threads=8), one[:32])  # fewer groups than threads


def test_empty_arrays_are_empty_results():
    """Arrays with no element: numpy gives them any strides, which read as 'not C-contiguous'; an empty stack then
    divided by zero in the repack (SIGFPE)."""
    assert _C.resident_copy(np.zeros((0, 5))).shape == (0, 5)
    assert _C.repack_r16(8, np.zeros((0, 16, 68), np.uint8), 64).shape == (0, 16, 68)
    assert _C.matmul(8, np.zeros((0, 68), np.uint8), np.ones((2, 64), np.float32)).shape == (2, 0)
    with pytest.raises(ValueError, match="outside the table's 0 rows"):
        _C.get_rows(8, np.zeros((0, 68), np.uint8), np.zeros(1, np.int64), 64)
