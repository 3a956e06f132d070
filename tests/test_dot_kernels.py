"""The quantized dot kernels (offload._C.matmul, offload._C.quantize_activation).

matmul, every weight type x every ISA variant this CPU runs, against a float64 numpy reference: the
weights are quantized and dequantized with quant.formats, our quantized activation rows are dequantized
in numpy, and Y_ref = A @ W.T in float64. The tolerance, elementwise,

    |Y - Y_ref| <= 1e-5 * (|A| @ |W|.T)

holds because every variant computes the integer block sums exactly; what differs is only float32
rounding: the order of the float additions (per block or super-block, vector lanes, horizontal sums),
the rounding of the scale products, and F32/F16/BF16 accumulating in float32 (the scalar reference in
float64). Observed errors are ~1e-7 of that scale. Q4_1/Q5_1 add m_w * s_a per block, where
s_a = f16(d_a * sum q_a) is stored rounded, as llama.cpp does; the reference adds the same term.

Also against llama.cpp itself (the `llama_cpp` package's libggml-cpu, through ctypes, where installed):
our activation quantizers are bit-exact with its x86 `from_float` (Q8_0/Q8_1 round half to even there,
unlike the `_ref` quantizers and gguf-py, which round half away from zero), and our dot products agree
with its `vec_dot` on the same bytes within the tolerance above.

The timing test prints single-thread GB/s of weight bytes (T=1, 4096 x 4096); run with -s to see it.
"""

from __future__ import annotations

import ctypes
import functools
import os
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pytest
from gguf import GGMLQuantizationType as QT

import offload
from offload import _C
from quant import formats as F

f32 = np.float32
WEIGHT_TYPES = (QT.F32, QT.F16, QT.BF16, QT.Q4_0, QT.Q4_1, QT.Q5_0, QT.Q5_1, QT.Q8_0, QT.Q4_K, QT.Q5_K, QT.Q6_K)
ACT = {QT.F32: "F32", QT.F16: "F16", QT.BF16: "BF16", QT.Q4_0: "Q8_0", QT.Q5_0: "Q8_0", QT.Q8_0: "Q8_0",
       QT.Q4_1: "Q8_1", QT.Q5_1: "Q8_1", QT.Q4_K: "Q8_K", QT.Q5_K: "Q8_K", QT.Q6_K: "Q8_K"}
ISAS = offload.supported_isas()
TOKENS = (1, 2, 3, 7, 8, 9, 33)
ROWS = (1, 7, 33)
TOL = 1e-5


def ks(t: QT) -> tuple[int, ...]:
    """Row lengths: 256-multiples for every type, 32k for the 32-value blocks, ragged for the float types
    (the SIMD tails)."""
    if t in (QT.F32, QT.F16, QT.BF16):
        return (37, 96, 256, 512, 1003, 2816)
    if F.block_size(t) == 32:
        return (96, 256, 512, 2816)
    return (256, 512, 2816)


def weights(rng, n: int, k: int) -> np.ndarray:
    """Weight-like rows: per-row scales over 3 decades, a heavy-tailed row, an outlier column."""
    w = rng.standard_normal((n, k)) * 10.0 ** rng.uniform(-2, 1, (n, 1))
    w[0::5] = rng.standard_t(3, (len(w[0::5]), k)) * 0.05
    w[1::5, rng.integers(k)] *= 20.0
    return w.astype(f32)


def activations(rng, t: int, k: int) -> np.ndarray:
    """Hidden-state-like rows, with an all-zero row and a row of one huge outlier when t > 2."""
    x = rng.standard_normal((t, k)) * 10.0 ** rng.uniform(-1, 1, (t, 1))
    if t > 2:
        x[1] = 0.0
        x[2, rng.integers(k)] = 1e3
    return x.astype(f32)


def raw(w: np.ndarray) -> np.ndarray:
    """quant.formats output as the raw uint8 rows matmul takes."""
    return np.ascontiguousarray(w).view(np.uint8)


def f16(b: np.ndarray) -> np.ndarray:
    return np.ascontiguousarray(b).view(np.float16)[..., 0].astype(np.float64)


def dequantize_activation(fmt: str, a: np.ndarray, k: int) -> np.ndarray:
    """uint8 [T, row_bytes] activation rows -> float64 [T, k]."""
    t = a.shape[0]
    if fmt == "Q8_1":  # x = d q, like Q8_0 (s is the extra sum, checked separately)
        b = a.reshape(t, -1, 36)
        return (b[..., 4:].view(np.int8).astype(np.float64) * f16(b[..., :2])[..., None]).reshape(t, k)
    if fmt == "F32":
        return a.view(f32).astype(np.float64)
    if fmt == "F16":
        return a.view(np.float16).astype(np.float64)
    return F.dequantize(a, QT[fmt]).astype(np.float64)


MIN_TYPES = (QT.Q4_1, QT.Q5_1, QT.Q4_K, QT.Q5_K)


@functools.lru_cache(maxsize=None)
def weight_case(t: QT, k: int):
    """(raw weight bytes [33, row_bytes], dequantized float64 [33, k], magnitudes for the tolerance [33, k]).

    The magnitude is |w|, except for the types with a min: x = d*q + m (Q4_1/Q5_1) or d*sc*q - dmin*m
    (Q4_K/Q5_K), whose two parts the kernels (like llama.cpp's) sum separately, so rounding scales with
    |d*q| + |m| even where the two cancel. The parts come from dequantizing with the other scale zeroed."""
    w = raw(F.quantize(weights(np.random.default_rng(1000 + k), max(ROWS), k), t))
    wd = F.dequantize(w, t).astype(np.float64)
    mag = np.abs(wd)
    if t in MIN_TYPES:
        blocks = w.reshape(w.shape[0], -1, F.type_size(t))
        parts = []
        for zeroed in (slice(2, 4), slice(0, 2)):   # the min's scale, then d
            b = blocks.copy()
            b[..., zeroed] = 0
            parts.append(np.abs(F.dequantize(b.reshape(w.shape), t).astype(np.float64)))
        mag = parts[0] + parts[1]
    return w, wd, mag


@functools.lru_cache(maxsize=None)
def reference(t: QT, k: int, n_tok: int):
    """(x, Y_ref [T, 33], scale [T, 33]) for one weight case and token count."""
    x = activations(np.random.default_rng(n_tok * 7919 + k), n_tok, k)
    w, wd, mag = weight_case(t, k)
    a = _C.quantize_activation(ACT[t], x)
    ad = dequantize_activation(ACT[t], a, k)
    y = ad @ wd.T
    scale = np.abs(ad) @ mag.T
    if t in (QT.Q4_1, QT.Q5_1):  # the kernel's m_w * s_a, with s_a = f16(d_a sum q_a) as stored
        b = a.reshape(n_tok, -1, 36)
        exact_s = f16(b[..., :2]) * b[..., 4:].view(np.int8).astype(np.float64).sum(-1)
        m = f16(w.reshape(w.shape[0], -1, F.type_size(t))[..., 2:4])
        y += (f16(b[..., 2:4]) - exact_s) @ m.T
        scale += np.abs(f16(b[..., 2:4])) @ np.abs(m).T
    return x, y, scale


# ----------------------------------------------------------------------------------------------- matmul

@pytest.mark.parametrize("isa", ISAS)
@pytest.mark.parametrize("wtype", WEIGHT_TYPES, ids=lambda t: t.name)
def test_matmul_matches_reference(wtype, isa):
    worst = 0.0
    for k in ks(wtype):
        w = weight_case(wtype, k)[0]
        for n_tok in TOKENS:
            x, y_ref, scale = reference(wtype, k, n_tok)
            for n in ROWS:
                y = _C.matmul(int(wtype), w[:n], x, isa)
                assert y.shape == (n_tok, n) and y.dtype == f32
                err = np.abs(y - y_ref[:, :n])
                bad = err > TOL * scale[:, :n]
                assert not bad.any(), (f"{wtype.name} {isa} K={k} T={n_tok} N={n}: "
                                       f"{np.argwhere(bad)[:5].tolist()} err {err[bad][:5]} scale {scale[:, :n][bad][:5]}")
                with np.errstate(invalid="ignore", divide="ignore"):
                    worst = max(worst, float(np.nanmax(np.where(scale[:, :n] > 0, err / scale[:, :n], 0))))
    assert worst < TOL


@pytest.mark.parametrize("wtype", WEIGHT_TYPES, ids=lambda t: t.name)
def test_natural_dtypes_and_empty_shapes(wtype):
    k = 256
    w = weight_case(wtype, k)[0]
    x = reference(wtype, k, 3)[0]
    y = _C.matmul(int(wtype), w, x)
    if wtype in (QT.F32, QT.F16, QT.BF16):   # float32 / float16 / uint16 bf16 bits [N, K], not only raw bytes
        natural = w.view({QT.F32: f32, QT.F16: np.float16, QT.BF16: np.uint16}[wtype])
        assert np.array_equal(_C.matmul(int(wtype), natural, x), y)
    assert _C.matmul(int(wtype), w, x[:0]).shape == (0, w.shape[0])
    assert _C.matmul(int(wtype), w[:0], x).shape == (3, 0)


def test_tandem_isa_caps_auto():
    """TANDEM_ISA=scalar makes isa='auto' the scalar kernels: bit-identical to isa='scalar'."""
    code = ("import numpy as np; from offload import _C; from quant import formats as F;"
            "rng = np.random.default_rng(0); w = F.quantize(rng.standard_normal((5, 512)).astype('f4'), 12);"
            "x = rng.standard_normal((3, 512)).astype('f4');"
            "print(int(np.array_equal(_C.matmul(12, w, x), _C.matmul(12, w, x, 'scalar'))), _C.isa())")
    env = dict(os.environ, TANDEM_ISA="scalar")
    out = subprocess.run([sys.executable, "-c", code], env=env, capture_output=True, text=True,
                         cwd=Path(__file__).resolve().parents[1], check=True).stdout.split()
    assert out == ["1", "scalar"]


# ----------------------------------------------------------------------------------------------- activations

def awkward_rows(rng, k: int = 256) -> np.ndarray:
    """Zeros, ties for Q8_0's x*127/amax, one nonzero, huge/tiny magnitudes, f16 overflow and subnormals."""
    z = np.zeros(k, f32)
    rows = [z, -z, np.tile(np.r_[127.0, -126.5, 0.5, -0.5, 1.5, 2.5, np.arange(26) - 12.5], k // 32)]
    for v in (1.0, -3.0, 1e-30, 6e-8, 65504.0, 65520.0, 1e5, -1e20):
        r = z.copy()
        r[rng.integers(k)] = v
        rows += [r, np.full(k, v, f32)]
    for s in (1e-38, 1e-8, 1e-5, 1.0, 1e4, 1e30):
        rows.append(rng.standard_normal(k) * s)
    rows.append(rng.integers(-254, 255, k) * 0.5)             # halves: ties everywhere
    rows.append(np.where(rng.random(k) < 0.5, 2.0 ** -24, 2.0 ** -25) * rng.integers(1, 4, k))  # f16 subnormal ties
    return np.stack(rows).astype(f32)


def q8_0_half_even(x: np.ndarray, with_sum: bool = False) -> np.ndarray:
    """llama.cpp's x86 quantize_row_q8_0 / q8_1 in numpy: d = amax/127, q = rint(x * 127/amax); where
    127/amax overflows (amax < 2^-120), x * inf or 0 * inf converts to INT_MIN, packed to -128 (and
    summed, wrapping, into Q8_1's s)."""
    b = x.reshape(-1, 32)
    amax = np.abs(b).max(axis=1, keepdims=True)
    d = amax / f32(127)
    with np.errstate(divide="ignore", over="ignore", invalid="ignore"):
        v = b * np.where(amax == 0, f32(0), f32(127) / amax).astype(f32)
        q = np.where(np.abs(v) < 2 ** 22, np.rint(v), -2 ** 31).astype(np.int64)
        parts = [d.astype(np.float16).view(np.uint8)]
        if with_sum:
            total = (q.astype(np.int64).sum(axis=1, keepdims=True) + 2 ** 31) % 2 ** 32 - 2 ** 31  # int32 wrap
            s = d * total.astype(f32)
            parts.append(s.astype(np.float16).view(np.uint8))
    parts.append(q.clip(-128, 127).astype(np.int8).view(np.uint8))
    return np.concatenate(parts, axis=1).reshape(x.shape[0], -1)


@pytest.fixture(scope="module")
def act_rows():
    rng = np.random.default_rng(5)
    return np.concatenate([awkward_rows(rng), activations(rng, 9, 256), weights(rng, 9, 256)])


@pytest.mark.parametrize("isa", ISAS)
def test_q8_0_is_llama_cpp_x86_rounding(act_rows, isa):
    ours = _C.quantize_activation("q8_0", act_rows, isa)
    assert np.array_equal(ours, q8_0_half_even(act_rows))
    # quant.formats (gguf-py, quantize_row_q8_0_ref) rounds half away from zero: the same bytes but at
    # ties whose away-from-zero neighbour is odd (blocks where 127/amax is finite: beyond that both
    # convert inf, which only x86's conversion defines)
    with np.errstate(over="ignore", invalid="ignore"):
        away = F.quantize(act_rows, QT.Q8_0).reshape(-1, 34)
    b = act_rows.reshape(-1, 32)
    amax = np.abs(b).max(axis=1, keepdims=True)
    with np.errstate(divide="ignore", over="ignore"):
        inv = np.where(amax == 0, f32(0), f32(127) / amax).astype(f32)
    ok = np.isfinite(inv[:, 0])
    v = (b * inv)[ok]
    tie = np.abs(v) % 1 == 0.5
    away_odd = np.floor(np.abs(v) + 0.5) % 2 == 1
    q_ours = ours.reshape(-1, 34)[ok, 2:].view(np.int8)
    q_away = away[ok, 2:].view(np.int8)
    assert tie.any() and np.array_equal(q_ours != q_away, tie & away_odd)
    assert np.array_equal(ours.reshape(-1, 34)[:, :2], away[:, :2])  # the same d everywhere


@pytest.mark.parametrize("isa", ISAS)
def test_q8_1(act_rows, isa):
    assert np.array_equal(_C.quantize_activation("Q8_1", act_rows, isa), q8_0_half_even(act_rows, with_sum=True))


@pytest.mark.parametrize("isa", ISAS)
def test_q8_k_is_bit_exact_with_quant_formats(act_rows, isa):
    assert np.array_equal(_C.quantize_activation("q8_K", act_rows, isa), F.quantize(act_rows, QT.Q8_K))


@pytest.mark.parametrize("fmt", ["q8_0", "q8_1", "q8_K"])
def test_activation_quantizers_agree_on_non_finite_and_tiny_values(fmt):
    """The vector quantizers give the scalar reference's bytes where the numbers are awkward: NaN (ignored
    by the maximum), infinities, zero blocks, denormals, ties of opposite sign for Q8_K's signed max."""
    rng = np.random.default_rng(11)
    x = rng.standard_normal((12, 512)).astype(f32)
    x[0, 5], x[1, 7], x[2, 100] = np.nan, np.inf, -np.inf
    x[3, :32], x[4] = 0, 0
    x[5, ::7], x[6, :256] = 1e-42, 1e-44
    x[7, 3], x[7, 9] = 5.0, -5.0  # Q8_K keeps the sign of the first
    x[8, 3], x[8, 9] = -5.0, 5.0
    ref = _C.quantize_activation(fmt, x, "scalar")
    for isa in ISAS:
        assert np.array_equal(_C.quantize_activation(fmt, x, isa), ref), isa


def test_f16_bf16_f32(act_rows):
    with np.errstate(over="ignore"):
        assert np.array_equal(_C.quantize_activation("f16", act_rows).view(np.float16).view(np.uint16),
                              act_rows.astype(np.float16).view(np.uint16))
    assert np.array_equal(_C.quantize_activation("bf16", act_rows), F.quantize(act_rows, QT.BF16))
    assert np.array_equal(_C.quantize_activation("f32", act_rows).view(f32), act_rows)
    nan = np.array([[np.nan, -np.inf, np.inf, 3e38, -1e-45]], f32)
    assert np.array_equal(_C.quantize_activation("bf16", nan), F.quantize(nan, QT.BF16))
    h = _C.quantize_activation("f16", nan).view(np.float16)[0]
    assert np.isnan(h[0]) and list(h[1:]) == [-np.inf, np.inf, np.inf, 0.0]


def test_bf16_matches_torch(act_rows):
    torch = pytest.importorskip("torch")
    expect = torch.from_numpy(act_rows).to(torch.bfloat16).view(torch.int16).numpy().view(np.uint8)
    assert np.array_equal(_C.quantize_activation("bf16", act_rows), expect)


# ----------------------------------------------------------------------------------------------- llama.cpp

class _CpuTraits(ctypes.Structure):  # struct ggml_type_traits_cpu (ggml-cpu.h)
    _fields_ = [("from_float", ctypes.c_void_p), ("vec_dot", ctypes.c_void_p), ("vec_dot_type", ctypes.c_int),
                ("nrows", ctypes.c_int64)]


_FROM_FLOAT = ctypes.CFUNCTYPE(None, ctypes.c_void_p, ctypes.c_void_p, ctypes.c_int64)
_VEC_DOT = ctypes.CFUNCTYPE(None, ctypes.c_int, ctypes.c_void_p, ctypes.c_size_t, ctypes.c_void_p, ctypes.c_size_t,
                            ctypes.c_void_p, ctypes.c_size_t, ctypes.c_int)


@pytest.fixture(scope="module")
def ggml_cpu():
    llama_cpp = pytest.importorskip("llama_cpp")
    libdir = Path(llama_cpp.__file__).parent / "lib"
    found = sorted(libdir.glob("libggml-cpu.*")) or sorted(libdir.glob("ggml-cpu.*"))
    if not found:
        pytest.skip(f"{libdir} has no ggml-cpu library")
    lib = ctypes.CDLL(str(found[0]))
    lib.ggml_get_type_traits_cpu.restype = ctypes.POINTER(_CpuTraits)
    lib.ggml_get_type_traits_cpu.argtypes = [ctypes.c_int]
    lib.ggml_cpu_init()
    return lib


def ggml_from_float(lib, qtype: QT, x: np.ndarray) -> np.ndarray:
    """llama.cpp's CPU activation quantizer (`type_traits_cpu[qtype].from_float`), row by row."""
    # (gguf-py lists Q8_1 with the old 40-byte block; ggml's is 36 bytes)
    bs, ts = {QT.Q8_0: (32, 34), QT.Q8_1: (32, 36), QT.Q8_K: (256, 292), QT.F16: (1, 2)}[qtype]
    fn = _FROM_FLOAT(lib.ggml_get_type_traits_cpu(int(qtype)).contents.from_float)
    out = np.zeros((x.shape[0], x.shape[1] // bs * ts), np.uint8)
    for r in range(x.shape[0]):
        fn(np.ascontiguousarray(x[r]).ctypes.data, out[r].ctypes.data, x.shape[1])
    return out


@pytest.mark.parametrize("fmt", ["Q8_0", "Q8_1", "Q8_K", "F16"])
def test_activation_quantizers_match_llama_cpp(ggml_cpu, act_rows, fmt):
    theirs = ggml_from_float(ggml_cpu, QT[fmt], act_rows)
    ours = _C.quantize_activation(fmt, act_rows)
    if fmt == "Q8_K":  # ggml leaves an all-zero block's bsums unwritten; ours are 0
        ours, theirs = ours.reshape(-1, 292), theirs.reshape(-1, 292)
        zero = ours[:, :4].view(f32)[:, 0] == 0
        ours[zero, 260:] = theirs[zero, 260:] = 0
    assert np.array_equal(ours, theirs)


@pytest.mark.parametrize("wtype", WEIGHT_TYPES, ids=lambda t: t.name)
def test_dot_agrees_with_llama_cpp_vec_dot(ggml_cpu, wtype):
    k, n_tok = 512, 5
    w = weight_case(wtype, k)[0]
    x, _, scale = reference(wtype, k, n_tok)
    traits = ggml_cpu.ggml_get_type_traits_cpu(int(wtype)).contents
    assert ACT[wtype] == QT(traits.vec_dot_type).name
    a = _C.quantize_activation(ACT[wtype], x)
    vec_dot = _VEC_DOT(traits.vec_dot)
    theirs = np.zeros((n_tok, w.shape[0]), f32)
    s = ctypes.c_float()
    for t in range(n_tok):
        for r in range(w.shape[0]):
            vec_dot(k, ctypes.addressof(s), 0, w[r].ctypes.data, 0, a[t].ctypes.data, 0, 1)
            theirs[t, r] = s.value
    for isa in ISAS:
        assert np.all(np.abs(_C.matmul(int(wtype), w, x, isa) - theirs) <= TOL * scale), isa


# ----------------------------------------------------------------------------------------------- errors

def test_errors():
    rng = np.random.default_rng(0)
    x = rng.standard_normal((2, 256)).astype(f32)
    w = raw(F.quantize(rng.standard_normal((3, 256)).astype(f32), QT.Q4_K))
    with pytest.raises(ValueError, match="float32"):
        _C.matmul(12, w, x.astype(np.float64))
    with pytest.raises(ValueError, match="C-contiguous"):
        _C.matmul(12, w, np.asfortranarray(x))
    with pytest.raises(ValueError, match="C-contiguous"):
        _C.matmul(12, np.concatenate([w, w], axis=1)[:, ::2], x)
    with pytest.raises(ValueError, match="multiple of 256"):
        _C.matmul(12, w, x[:, :96].copy())
    with pytest.raises(ValueError, match="bytes"):
        _C.matmul(12, w[:, :-1].copy(), x)
    with pytest.raises(ValueError, match="uint8 raw blocks"):
        _C.matmul(12, w.view(np.int8), x)
    with pytest.raises(ValueError, match="uint8 raw blocks"):
        _C.matmul(0, x.astype(np.float64), x)
    for bad in (4, 5, 9, 15, 99, -1):  # removed types, activation-only types, unknown ids
        with pytest.raises(ValueError, match="not a weight type"):
            _C.matmul(bad, w, x)
    with pytest.raises(ValueError, match="2-D"):
        _C.matmul(12, w, x[0])
    with pytest.raises(ValueError, match="ISA"):
        _C.matmul(12, w, x, "avx9000")
    for isa in set(offload.ISAS) - set(ISAS):
        with pytest.raises(ValueError, match="cannot run"):
            _C.matmul(12, w, x, isa)
    with pytest.raises(ValueError, match="activation format"):
        _C.quantize_activation("q4_k", x)
    with pytest.raises(ValueError, match="multiple of 32"):
        _C.quantize_activation("q8_0", x[:, :40].copy())
    with pytest.raises(ValueError, match="float32"):
        _C.quantize_activation("f16", x.astype(np.float16))
    assert _C.activation_type(14) == "Q8_K" and _C.activation_type(3) == "Q8_1"


# ----------------------------------------------------------------------------------------------- timing

def random_blocks(rng, t: QT, n: int, k: int) -> np.ndarray:
    """Random quant bytes with finite f16 scales: a timing matrix without the numpy quantizer's cost."""
    bs, ts = F.GGML_QUANT_SIZES[t]
    b = rng.integers(0, 256, (n, k // bs, ts), dtype=np.uint8)
    scale = np.full((n, k // bs, 1), 0.01, np.float16).view(np.uint8)
    if t == QT.Q6_K:
        b[..., 208:210] = scale
    else:
        b[..., 0:2] = scale
        if t in (QT.Q4_1, QT.Q5_1, QT.Q4_K, QT.Q5_K):
            b[..., 2:4] = scale
    return b.reshape(n, -1)


@pytest.mark.parametrize("isa", ISAS)
@pytest.mark.parametrize("n", [1, 7, 8, 9, 1408, 1411])
def test_swiglu(isa, n):
    """silu(g) * u (the MoE op's gate x up) within 4 ulp of float64 for every ISA (libm's expf, the
    division and the product round too: the scalar path is 2.4 ulp off), over exp's whole range and
    the vector loop's tails; NaN propagates."""
    rng = np.random.default_rng(n)
    g = (rng.standard_normal((3, n)) * 4).astype(f32)
    g[0, : min(n, 6)] = np.array([-87.5, -30.0, 0.0, -0.0, 30.0, 88.5], f32)[: min(n, 6)]
    g[2] *= 6  # arguments out to about +-80
    u = rng.standard_normal((3, n)).astype(f32)
    got = _C.swiglu(g, u, isa)
    g64, u64 = g.astype(np.float64), u.astype(np.float64)
    with np.errstate(over="ignore"):
        want = g64 / (1 + np.exp(-g64)) * u64
    ulp = np.spacing(np.abs(want).astype(f32)).astype(np.float64)
    assert np.all(np.abs(got - want) <= 4 * ulp + 1e-38), np.max(np.abs(got - want) / ulp)
    g[1, n // 2] = np.nan
    u[1, n - 1] = np.nan
    bad = _C.swiglu(g, u, isa)
    assert np.isnan(bad[1, n // 2]) and np.isnan(bad[1, n - 1])
    assert np.isfinite(np.delete(bad[1], [n // 2, n - 1])).all()
    with pytest.raises(ValueError, match="one shape"):
        _C.swiglu(g, np.ascontiguousarray(u[:, :-1] if n > 1 else u[:2]), isa)


def test_single_thread_bandwidth_report():
    """GB/s of weight bytes, T = 1, a 4096 x 4096 matrix, one thread (best of 3; printed, not asserted;
    a 9-18 MB matrix is served from the last-level cache on most machines)."""
    rng = np.random.default_rng(0)
    x = rng.standard_normal((1, 4096)).astype(f32)
    lines = []
    for t in (QT.Q4_K, QT.Q8_0):
        w = random_blocks(rng, t, 4096, 4096)
        cells = []
        for isa in ISAS:
            _C.matmul(int(t), w, x, isa)
            best = min(_timed(lambda: _C.matmul(int(t), w, x, isa)) for _ in range(3))
            cells.append(f"{isa} {w.nbytes / best / 1e9:5.1f}")
        lines.append(f"{t.name:5s} GB/s: " + ", ".join(cells))
    print("\n" + "\n".join(lines))


def _timed(fn) -> float:
    t0 = time.perf_counter()
    fn()
    return time.perf_counter() - t0
