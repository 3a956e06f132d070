"""offload.quantize, the engine's C++ quantizers: bit-exact with quant.formats.quantize (and so with
llama.cpp) for every type, every SIMD variant this CPU has, 1 and 2 threads, awkward shapes and values;
clear errors at the boundary."""

from __future__ import annotations

import os
import subprocess
import sys
import threading
import time

import numpy as np
import pytest
from gguf import GGMLQuantizationType as QT

import offload
from quant import formats as F
from tests.test_formats import awkward, c_quantize, ggml, random_bit_patterns, realistic  # noqa: F401 (ggml: fixture)

f32 = np.float32
TYPES = ("Q8_0", "Q4_0", "Q5_0", "Q4_1", "Q5_1", "Q4_K", "Q5_K", "Q6_K", "Q8_K")
K_TYPES = ("Q4_K", "Q5_K", "Q6_K", "Q8_K")
# the quantizer variants: avx512_vnni runs the avx512 quantizers, avx_vnni the avx2 ones
ISAS = [isa for isa in ("scalar", "avx2", "avx512") if isa in offload.supported_isas()]


def one_sign_zeros(x: np.ndarray, qtype: str) -> np.ndarray:
    """Q4_1/Q5_1 take min and max: where those are zeros of both signs, numpy's answer depends on its SIMD
    reduction order (the engine follows llama.cpp's first occurrence, see test_q_1_signed_zeros)."""
    return np.where(x == 0, f32(0), x) if qtype in ("Q4_1", "Q5_1") else x


def mixed_rows(rng, n: int) -> np.ndarray:
    """Weight-like rows, every corner case of awkward() (cut into n-value rows), random bit patterns."""
    corner = awkward(rng, 256, subnormal=True).reshape(-1, 32)
    corner = corner[: len(corner) // (n // 32) * (n // 32)].reshape(-1, n) if n <= 256 else awkward(rng, n, True)
    return np.concatenate([realistic(rng, 16, n), corner, random_bit_patterns(rng, 4, n)])


def check(x: np.ndarray, qtype: str, **kw) -> None:
    with np.errstate(all="ignore"):
        want = F.quantize(x, qtype)
    got = offload.quantize(x, qtype, **kw)
    assert got.dtype == np.uint8 and got.shape == want.shape
    bad = np.nonzero(np.any((got != want).reshape(-1, want.shape[-1] if want.shape[-1] else 1), axis=1))[0]
    assert bad.size == 0, f"{qtype} {kw}: rows {bad[:10]} differ from quant.formats"


@pytest.mark.parametrize("threads", (1, 2))
@pytest.mark.parametrize("isa", ISAS)
@pytest.mark.parametrize("qtype", TYPES)
def test_bit_exact_with_numpy(qtype, isa, threads):
    rng = np.random.default_rng(sum(map(ord, qtype)))
    n = 1024 if qtype in K_TYPES else 96
    check(one_sign_zeros(mixed_rows(rng, n), qtype), qtype, isa=isa, threads=threads)


@pytest.mark.parametrize("isa", ISAS)
@pytest.mark.parametrize("qtype", TYPES)
def test_shapes(qtype, isa):
    rng = np.random.default_rng(3)
    bs = F.block_size(qtype)
    for shape in [(bs,), (1, bs), (1, 3 * bs), (517, bs), (5, 7 * bs), (2, 3, 2 * bs), (0, bs), (3, 0), (1, 0)]:
        x = (rng.standard_normal(shape) * 0.02).astype(f32)
        for threads in (1, 2, 7):
            check(x, qtype, isa=isa, threads=threads)


@pytest.mark.parametrize("qtype", TYPES)
def test_threads_split_blocks(qtype):
    """Enough blocks that 2, 3 and 5 threads really split the work (ragged ranges included)."""
    x = realistic(np.random.default_rng(4), 67, 4096)
    want = F.quantize(x, qtype)
    for isa in ISAS:
        for threads in (2, 3, 5):
            assert np.array_equal(offload.quantize(x, qtype, threads=threads, isa=isa), want), (isa, threads)


@pytest.mark.parametrize("qtype", TYPES)
def test_special_values(qtype):
    """Zeros (both signs), constants, huge/tiny magnitudes, a single nonzero, inf and NaN, per block."""
    bs = F.block_size(qtype)
    n = 4 * bs
    rows = [np.zeros(n), np.full(n, -0.0), np.full(n, 2.5), np.full(n, -7.0), np.full(n, 3e38), np.full(n, 1e-42)]
    rng = np.random.default_rng(5)
    for v in (1.0, -1.0, 3e38, -1e-45, 1e-40, np.inf, -np.inf, np.nan):
        r = rng.standard_normal(n) * 1e-3
        r[rng.integers(n)] = v
        z = np.zeros(n)
        z[rng.integers(n)] = v
        rows += [r, z]
    r = rng.standard_normal(n)
    r[::3] = np.nan
    rows.append(r)
    x = one_sign_zeros(np.stack(rows).astype(f32), qtype)
    for isa in ISAS:
        check(x, qtype, isa=isa, threads=2)


@pytest.mark.parametrize("qtype", ("Q4_0", "Q5_0"))
def test_zero_block_starting_with_negative_zero_follows_gguf_py(qtype):
    x = np.zeros((2, 64), f32)
    x[0, 0] = x[1, 32] = -0.0
    for isa in ISAS:
        got = offload.quantize(x, qtype, isa=isa)
        assert np.array_equal(got, F.quantize(x, qtype))
        assert got[0, :2].tolist() == [0, 0]   # d = +0.0 (llama.cpp's C writes -0.0)


@pytest.mark.parametrize("qtype", ("Q4_1", "Q5_1"))
def test_q_1_signed_zeros(qtype):
    """A block whose min (or max) is a mix of +0 and -0: the first one wins, as in llama.cpp's C."""
    x = np.full((3, 32), -0.0, f32)
    x[1, 0] = 0.0          # +0 first: min = max = +0
    x[2, 1:] = 0.0         # -0 first: min = max = -0
    for isa in ISAS:
        got = offload.quantize(x, qtype, isa=isa)
        assert got[:, 3].tolist() == [0x80, 0x00, 0x80], isa   # the sign byte of m (f16, little-endian)


@pytest.mark.parametrize("qtype", TYPES)
def test_bit_exact_with_llama_cpp(ggml, qtype):  # noqa: F811
    rng = np.random.default_rng(11)
    n = 512
    x = np.concatenate([realistic(rng, 16, n), awkward(rng, n)])
    if qtype in K_TYPES:
        x = np.concatenate([x, awkward(rng, n, subnormal=True), random_bit_patterns(rng, 4, n)])
    want = c_quantize(ggml, x, QT[qtype])
    if qtype in ("Q4_0", "Q5_0"):   # gguf-py's d = +0.0 for a zero block starting with -0.0 (C: -0.0)
        blocks = x.reshape(-1, 32)
        fix = (np.abs(blocks).max(1) == 0) & np.signbit(blocks[:, 0])
        want.reshape(len(blocks), -1)[fix, :2] = 0
    for isa in ISAS:
        got = offload.quantize(x, qtype, isa=isa)
        bad = np.nonzero(np.any(got != want, axis=1))[0]
        assert bad.size == 0, f"{qtype} {isa}: rows {bad[:10]} differ from llama.cpp"


def test_qtype_spellings_and_variants():
    x = np.random.default_rng(0).standard_normal((4, 256)).astype(f32)
    want = F.quantize(x, QT.Q4_K)
    for q in ("Q4_K", "q4_k", 12, QT.Q4_K, np.int32(12)):
        assert np.array_equal(offload.quantize(x, q), want)
    assert offload._C.quant_types()["Q6_K"] == int(QT.Q6_K)
    for qtype in TYPES:
        for isa in offload.supported_isas():
            expect = {"scalar": "scalar", "avx2": "avx2", "avx_vnni": "avx2"}.get(isa, "avx512")
            assert offload._C.quantize_variant(int(QT[qtype]), isa) == expect


def test_other_array_kinds():
    import torch

    x = np.random.default_rng(1).standard_normal((3, 512)).astype(f32)
    want = F.quantize(x, "Q8_0")
    ro = np.frombuffer(x.tobytes(), f32).reshape(3, 512)
    assert not ro.flags.writeable
    assert np.array_equal(offload.quantize(ro, "Q8_0"), want)
    assert np.array_equal(offload.quantize(torch.from_numpy(x), "Q8_0"), want)
    assert np.array_equal(offload.quantize(x[1:], "Q8_0"), want[1:])   # a view with an offset


def test_tandem_isa_env_caps_the_variant():
    code = ("import numpy as np, offload; from quant import formats as F; "
            "x = np.random.default_rng(2).standard_normal((9, 512)).astype(np.float32); "
            "print(offload._C.quantize_variant(12), "
            "all(np.array_equal(offload.quantize(x, t), F.quantize(x, t)) for t in ('Q4_K', 'Q6_K', 'Q4_0')))")
    for isa in ISAS:
        out = subprocess.run([sys.executable, "-c", code], env={**os.environ, "TANDEM_ISA": isa},
                             capture_output=True, text=True, timeout=120)
        assert out.stdout.split() == [isa, "True"], out.stderr


@pytest.mark.parametrize("bad, match", [
    (dict(data=np.zeros((2, 256))), "float32 data, got float64"),
    (dict(data=np.zeros((2, 256), np.int32)), "float32 data, got int32"),
    (dict(data=np.zeros((2, 512), f32)[:, ::2]), "C-contiguous"),
    (dict(data=np.asfortranarray(np.zeros((2, 256), f32))), "C-contiguous"),
    (dict(data=np.float32(1.0)), "0-d"),
    (dict(data=np.zeros((2, 100), f32)), "blocks of 256 values, but the row length is 100"),
    (dict(data=np.zeros((2, 48), f32), qtype="Q8_0"), "blocks of 32 values, but the row length is 48"),
    (dict(qtype="Q3_K"), "unknown quantization type 'Q3_K'"),
    (dict(qtype=0), "ggml type id 0 is not one the engine quantizes"),
    (dict(qtype=QT.F16), "ggml type id 1 is not one"),
    (dict(threads=0), "threads must be a positive int"),
    (dict(threads=-2), "threads must be a positive int"),
    (dict(threads=1.5), "threads must be a positive int"),
    (dict(isa="sse9"), "unknown ISA 'sse9'"),
])
def test_errors(bad, match):
    args = dict(data=np.zeros((2, 256), f32), qtype="Q4_K") | bad
    with pytest.raises(ValueError, match=match):
        offload.quantize(args.pop("data"), args.pop("qtype"), **args)


def test_gil_released():
    """Another Python thread keeps running while a quantize call works."""
    x = np.random.default_rng(3).standard_normal((2048, 4096)).astype(f32)
    done = threading.Event()
    ticks = 0

    def work():
        offload.quantize(x, "Q6_K", threads=1, isa="scalar")   # ~0.3 s
        done.set()

    t = threading.Thread(target=work)
    t.start()
    time.sleep(0.02)
    while not done.is_set():
        ticks += 1
        time.sleep(0.001)
    t.join()
    assert ticks > 20


@pytest.mark.parametrize("qtype", ("F32", "F16", "BF16") + TYPES[:-1])  # every type the engine reads (not Q8_K)
def test_get_rows_bit_exact_with_numpy(qtype):
    """_C.get_rows (a token embedding's lookup from the file's blocks): the rows asked for, repeated and in
    any order, bit for bit as quant.formats.dequantize gives them, on tables of random bytes (any scale,
    infinities and NaNs among them) and of quantized weights; widths of one block up to several."""
    rng = np.random.default_rng(1)
    t = QT[qtype]
    block, size = F.GGML_QUANT_SIZES[t]
    for cols in (block, 3 * block, 2048 if block == 256 else 96):
        raw = rng.integers(0, 256, (19, cols // block * size), dtype=np.uint8)
        table = raw.view({"F32": np.float32, "F16": np.float16}.get(qtype, np.uint8))
        real = F.quantize(realistic(rng, 19, cols), t)
        for tab in (table, real.view(np.uint8) if qtype == "BF16" else real):
            ids = np.array([0, 18, 5, 5, 11, 0], np.int64)
            got = offload._C.get_rows(int(t), tab, ids, cols)
            with np.errstate(all="ignore"):  # inf * 0 in the random tables
                want = F.dequantize(tab, t)[ids]
            assert got.shape == (6, cols) and got.dtype == np.float32
            assert np.array_equal(got.view(np.uint32), want.view(np.uint32))
    assert offload._C.get_rows(int(t), table, np.zeros(0, np.int64), cols).shape == (0, cols)


def test_get_rows_checks_its_inputs():
    rng = np.random.default_rng(2)
    q8 = F.quantize(realistic(rng, 4, 64), QT.Q8_0)
    get = offload._C.get_rows
    with pytest.raises(ValueError, match="id 4 is outside the table's 4 rows"):
        get(int(QT.Q8_0), q8, np.array([1, 4], np.int64), 64)
    with pytest.raises(ValueError, match="id -1 is outside"):
        get(int(QT.Q8_0), q8, np.array([-1], np.int64), 64)
    with pytest.raises(ValueError, match="ids must be a contiguous int64 array"):
        get(int(QT.Q8_0), q8, np.array([1], np.int32), 64)
    with pytest.raises(ValueError, match="rows hold 68 bytes, but Q8_0 rows of K = 96"):
        get(int(QT.Q8_0), q8, np.array([1], np.int64), 96)
    with pytest.raises(ValueError, match="do not split into blocks of 32"):
        get(int(QT.Q8_0), q8, np.array([1], np.int64), 50)
    with pytest.raises(ValueError, match="not a weight type"):
        get(int(QT.Q2_K), q8, np.array([1], np.int64), 64)
    with pytest.raises(ValueError, match="row-interleaved"):
        get(offload._C.r16_type(int(QT.Q8_0)), q8, np.array([1], np.int64), 64)


@pytest.mark.parametrize("flag", ["--repeats", "--numpy-repeats"])
def test_bench_quantize_refuses_zero_repeats(flag, capsys):
    """No runs to average is a usage error that names the flags, not a statistics traceback."""
    from offload import bench_quantize

    with pytest.raises(SystemExit) as exit_:
        bench_quantize.main([flag, "0", "--types", "Q8_0", "--rows", "16", "--cols", "256"])
    assert exit_.value.code == 2
    assert "--repeats and --numpy-repeats must be at least 1" in capsys.readouterr().err
