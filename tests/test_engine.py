"""The engine's linear and fused MoE ops against a numpy reference built on quant/ (dequantized
weights, activations rounded the way llama.cpp rounds them), for every weight type and ISA here."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from gguf import GGML_QUANT_SIZES, GGMLQuantizationType as QT

import offload
from local.models.layers import ACTIVATION_FORMAT, quantize_activation
from offload.engine import CpuEngine, QuantWeight, prepare_weight
from quant.formats import dequantize, quantize

TYPES = ["Q4_0", "Q5_0", "Q8_0", "Q4_1", "Q5_1", "Q4_K", "Q5_K", "Q6_K", "F16", "BF16", "F32"]
ISAS = offload.supported_isas()


def make_weight(rng, typ: str, shape) -> tuple[QuantWeight, np.ndarray]:
    """(engine weight, its dequantized float64 values) for random data of `shape` [..., rows, cols]."""
    w = (rng.standard_normal(shape) * 0.1).astype(np.float32)
    if typ == "F32":
        return QuantWeight(typ, w, shape[-1]), w.astype(np.float64)
    if typ == "F16":
        h = w.astype(np.float16)
        return QuantWeight(typ, h, shape[-1]), h.astype(np.float64)
    data = quantize(w, QT[typ])
    return QuantWeight(typ, data, shape[-1]), dequantize(data, QT[typ]).astype(np.float64)


def expert_weights(rng, E: int, H: int, I: int) -> list[tuple[QuantWeight, np.ndarray]]:
    """make_weight's gate and up [E, I, H] in Q4_K and down [E, H, I] in Q6_K (llama.cpp's Q4_K_M experts)."""
    shapes = (("Q4_K", (E, I, H)), ("Q4_K", (E, I, H)), ("Q6_K", (E, H, I)))
    return [make_weight(rng, typ, shape) for typ, shape in shapes]


def rms_norm_ref(x: np.ndarray, w: np.ndarray, eps: float) -> np.ndarray:
    """The engine's RMSNorm (engine.h rms_norm_rows): the mean square in float64, the rest in float32."""
    ms = np.float32((x.astype(np.float64) ** 2).mean(-1, keepdims=True))
    return x * (np.float32(1) / np.sqrt(ms + np.float32(eps))) * w


def act(x: np.ndarray, typ: str) -> np.ndarray:
    """Activations as the engine feeds them to a `typ` weight (llama.cpp's rounding)."""
    return quantize_activation(torch.from_numpy(np.ascontiguousarray(x, dtype=np.float32)),
                               ACTIVATION_FORMAT.get(typ)).double().numpy()


def cols_for(typ: str) -> int:
    return 512 if typ.endswith("_K") else 96


@pytest.mark.parametrize("isa", ISAS)
@pytest.mark.parametrize("typ", TYPES)
@pytest.mark.parametrize("T", [1, 2, 3, 7, 33, 128])
def test_linear(typ, isa, T):
    rng = np.random.default_rng(0)
    K, N = cols_for(typ), 37
    w, wf = make_weight(rng, typ, (N, K))
    assert_linear_matches(w, wf, rng.standard_normal((T, K)).astype(np.float32), typ, isa)


def assert_linear_matches(w, wf, x, typ: str, isa: str) -> None:
    got = CpuEngine(threads=2, isa=isa).linear(w, x)
    want = act(x, typ) @ wf.T
    scale = np.abs(act(x, typ)) @ np.abs(wf).T
    # only float summation order differs - except Q4_1/Q5_1, whose Q8_1 activations carry their block
    # sums as f16 (the m_w * s_a term, as in llama.cpp): up to 2^-11 relative on that term
    tol = 1e-3 if typ in ("Q4_1", "Q5_1") else 1e-5
    assert np.all(np.abs(got - want) <= tol * scale + 1e-6), np.abs(got - want).max()


@pytest.mark.parametrize("isa", ISAS)
@pytest.mark.parametrize("typ", TYPES)
def test_linear_long_rows(typ, isa):
    """Decode over rows of ~20 KiB, which the engine walks in slices (partial dots added, each slice
    prefetching ahead), the last slice partial; 19 rows, so no row-interleaved layout either."""
    rng = np.random.default_rng(2)
    block, size = GGML_QUANT_SIZES[QT[typ]]
    K = (20480 // size + 1) * block
    w, wf = make_weight(rng, typ, (19, K))
    for T in (1, 2):
        assert_linear_matches(w, wf, rng.standard_normal((T, K)).astype(np.float32), typ, isa)


@pytest.mark.parametrize("isa", ISAS)
@pytest.mark.parametrize("typ", ["F16", "BF16", "F32"])
def test_linear_float_decode_pairs(typ, isa):
    """Decode of the float types reads rows two at a time, from the two halves of a task (two streams):
    every pairing (2-6 rows, an odd count's last row alone) with ragged row lengths (vector tails of
    1..31 values, rows shorter than one vector)."""
    rng = np.random.default_rng(3)
    for K in (1, 15, 33, 47, 100):
        for N in (2, 3, 6):
            w, wf = make_weight(rng, typ, (N, K))
            for T in (1, 2):
                assert_linear_matches(w, wf, rng.standard_normal((T, K)).astype(np.float32), typ, isa)


@pytest.mark.parametrize("isa", ISAS)
def test_linear_bf16_prefill(isa):
    """BF16 from 8 tokens on (AMX-BF16 tiles where the CPU has them): whole 16-row groups in pairs or alone,
    the rows past the last whole group, rows whose length is no multiple of 32 (odd too), token counts
    around the 16-token tiles and past a 256-token block."""
    rng = np.random.default_rng(4)
    for K, N in ((31, 16), (33, 17), (47, 48), (100, 70), (512, 37)):
        w, wf = make_weight(rng, "BF16", (N, K))
        for T in (8, 15, 16, 17, 40, 300):
            assert_linear_matches(w, wf, rng.standard_normal((T, K)).astype(np.float32), "BF16", isa)


@pytest.mark.parametrize("typ", ["Q8_0", "Q5_0", "Q4_K", "Q6_K", "F16", "F32"])
@pytest.mark.parametrize("T", [1, 3, 33])
def test_linear_batched(typ, T):
    """A stack of per-head matrices (MLA's W_UK / W_UV): each batch entry is its own linear."""
    rng = np.random.default_rng(1)
    B, K, N = 5, cols_for(typ), 19
    w, wf = make_weight(rng, typ, (B, N, K))
    x = rng.standard_normal((B, T, K)).astype(np.float32)
    for threads in (1, 2):
        got = CpuEngine(threads=threads).linear_batched(w, x)
        want = np.einsum("btk,bnk->btn", act(x, typ), wf)
        scale = np.einsum("btk,bnk->btn", np.abs(act(x, typ)), np.abs(wf))
        assert got.shape == (B, T, N)
        assert np.all(np.abs(got - want) <= 1e-5 * scale + 1e-6), np.abs(got - want).max()
    with pytest.raises(ValueError, match="batch of 4"):
        CpuEngine(threads=1).linear_batched(w, x[:4])


def moe_reference(x, ids, weights, gate, up, down, shared, gtyp, dtyp):  # noqa: PLR0913
    """float64 reference: per token, per slot, down(silu(gate x) * up x) with llama.cpp's rounding."""
    T, H = x.shape
    out = np.zeros((T, H))
    xq = act(x, gtyp)
    for t in range(T):
        for e in sorted(set(int(i) for i in ids[t] if i >= 0)):
            w = sum(float(weights[t, a]) for a in range(ids.shape[1]) if ids[t, a] == e)
            g, u = gate[e] @ xq[t], up[e] @ xq[t]
            h = (g / (1 + np.exp(-g))) * u
            out[t] += w * (down[e] @ act(h[None], dtyp)[0])
        for sg, su, sd in shared:
            g, u = sg @ xq[t], su @ xq[t]
            out[t] += sd @ act(((g / (1 + np.exp(-g))) * u)[None], dtyp)[0]
    return out


@pytest.mark.parametrize("isa", ISAS)
@pytest.mark.parametrize("gtyp,dtyp", [("Q4_K", "Q6_K"), ("Q4_K", "Q5_0"), ("Q8_0", "Q8_0"), ("Q5_K", "Q4_0"),
                                       ("BF16", "F16")])
@pytest.mark.parametrize("T,A", [(1, 6), (2, 8), (3, 1), (7, 3), (33, 4), (128, 8)])
def test_moe(gtyp, dtyp, isa, T, A):
    rng = np.random.default_rng(1)
    E, H, I = 8, 256, 96 if not dtyp.endswith("_K") else 256
    g, gf = make_weight(rng, gtyp, (E, I, H))
    u, uf = make_weight(rng, gtyp, (E, I, H))
    d, df = make_weight(rng, dtyp, (E, H, I))
    sg, sgf = make_weight(rng, gtyp, (I, H))
    su, suf = make_weight(rng, gtyp, (I, H))
    sd, sdf = make_weight(rng, dtyp, (H, I))
    x = rng.standard_normal((T, H)).astype(np.float32)
    ids = rng.integers(-1, E, (T, A))
    ids[0, 0] = ids[0, -1] = 3  # a duplicate id: both slots count
    weights = rng.random((T, A)).astype(np.float32)
    want = moe_reference(x, ids, weights, gf, uf, df, [(sgf, suf, sdf)], gtyp, dtyp)
    for threads in (1, 2):
        got = CpuEngine(threads=threads, isa=isa).moe(x, ids, weights, g, u, d, shared=[(sg, su, sd)])
        err = np.abs(got - want).max() / np.abs(want).max()
        assert err <= 2e-3, (threads, err)


@pytest.mark.parametrize("isa", ISAS)
@pytest.mark.parametrize("gtyp,dtyp", [("Q4_K", "Q6_K"), ("Q4_K", "Q5_0"), ("Q8_0", "Q8_0"), ("Q5_K", "Q4_0")])
@pytest.mark.parametrize("T,A", [(3, 2), (33, 4), (128, 6)])
def test_moe_row_interleaved(gtyp, dtyp, isa, T, A):
    """Experts in the row-interleaved layouts the loader gives them (test_moe's are in the file's blocks):
    the token-tile kernels, and on AMX the tile kernels from 8 tokens an expert, on 1 and 2 threads."""
    rng = np.random.default_rng(5)
    E, H, I = 8, 256, 256
    g, gf = make_weight(rng, gtyp, (E, I, H))
    u, uf = make_weight(rng, gtyp, (E, I, H))
    d, df = make_weight(rng, dtyp, (E, H, I))
    g, u, d = (prepare_weight(w, force=True) for w in (g, u, d))
    assert all(w.type.endswith("_R16") for w in (g, u, d))
    x = rng.standard_normal((T, H)).astype(np.float32)
    ids = np.stack([rng.choice(E, A, replace=False) for _ in range(T)])
    weights = rng.random((T, A)).astype(np.float32)
    want = moe_reference(x, ids, weights, gf, uf, df, [], gtyp, dtyp)
    for threads in (1, 2):
        got = CpuEngine(threads=threads, isa=isa).moe(x, ids, weights, g, u, d)
        err = np.abs(got - want).max() / np.abs(want).max()
        assert err <= 2e-3, (threads, err)


@pytest.mark.parametrize("T", [1, 33])
def test_moe_does_not_depend_on_the_thread_count(T):
    """Every output row is summed by one task, experts in job order, and each activation block is
    quantized whole by one task, however the rows are split: 1, 2 and 3 threads give the same bits
    (H = 512 splits into down slabs of 192, 192 and 128 rows on 3 threads)."""
    rng = np.random.default_rng(4)
    E, H, I, A = 8, 512, 768, 3
    (g, _), (u, _), (d, _) = expert_weights(rng, E, H, I)
    x = rng.standard_normal((T, H)).astype(np.float32)
    ids = rng.integers(-1, E, (T, A))
    weights = rng.random((T, A)).astype(np.float32)
    got = [CpuEngine(threads=n).moe(x, ids, weights, g, u, d) for n in (1, 2, 3)]
    assert np.abs(got[0]).max() > 0
    assert np.array_equal(got[0], got[1]) and np.array_equal(got[0], got[2])


def test_moe_calls_of_changing_shapes():
    """The op keeps its buffers from call to call (growing only): calls of other sizes and types in
    between leave a call's result bit for bit the same, and right."""
    rng = np.random.default_rng(3)
    E, H, I = 8, 256, 256
    layers = []
    for gtyp, dtyp in (("Q4_K", "Q6_K"), ("Q8_0", "Q5_0")):
        ws = [make_weight(rng, t, shape) for t, shape in ((gtyp, (E, I, H)), (gtyp, (E, I, H)), (dtyp, (E, H, I)))]
        layers.append((gtyp, dtyp, ws))
    calls = []
    for T, A, layer in ((3, 2, 0), (128, 8, 1), (1, 6, 0), (40, 4, 1)):
        x = rng.standard_normal((T, H)).astype(np.float32)
        ids = rng.integers(0, E, (T, A))
        calls.append((x, ids, rng.random((T, A)).astype(np.float32), layers[layer]))
    engine = CpuEngine(threads=2)

    def run(i):
        x, ids, w, (_, _, ws) = calls[i]
        return engine.moe(x, ids, w, *(q for q, _ in ws))

    first = [run(i) for i in range(len(calls))]
    for i in reversed(range(len(calls))):
        np.testing.assert_array_equal(run(i), first[i])
        x, ids, w, (gtyp, dtyp, ws) = calls[i]
        want = moe_reference(x, ids, w, *(f for _, f in ws), [], gtyp, dtyp)
        assert np.abs(first[i] - want).max() <= 2e-3 * np.abs(want).max()


def test_moe_skip_mask_and_async():
    rng = np.random.default_rng(2)
    E, H, I, T, A = 8, 256, 256, 5, 4
    (g, gf), (u, uf), (d, df) = expert_weights(rng, E, H, I)
    x = rng.standard_normal((T, H)).astype(np.float32)
    ids = rng.integers(0, E, (T, A))
    weights = rng.random((T, A)).astype(np.float32)
    skip = np.zeros(E, np.uint8)
    skip[ids[0, 0]] = 1
    engine = CpuEngine(threads=2)
    out = np.empty_like(x)
    engine.moe(x, ids, weights, g, u, d, skip=skip, out=out, async_=True)
    engine.wait()
    masked = np.where(ids == ids[0, 0], -1, ids)
    want = moe_reference(x, masked, weights, gf, uf, df, [], "Q4_K", "Q6_K")
    assert np.abs(out - want).max() <= 2e-3 * np.abs(want).max()


@pytest.mark.parametrize("T", [1, 5, 33])
def test_moe_takes_the_picked_experts_alone(T):
    """Engine.moe builds a table of only the experts its ids pick (ascending ids) and renumbers the ids to it;
    a StagedMoe holds every expert and takes the ids as they come. The two give the same bits, with an id
    twice in a row, -1s, ids in descending order, the highest id and a skip mask."""
    rng = np.random.default_rng(7)
    E, H, I, A = 12, 256, 256, 4
    (g, _), (u, _), (d, _) = expert_weights(rng, E, H, I)
    x = rng.standard_normal((T, H)).astype(np.float32)
    ids = rng.integers(-1, E, (T, A))
    ids[0] = [E - 1, 3, 3, -1]
    ids[-1, -1] = 5
    skip = np.zeros(E, np.uint8)
    skip[5] = 1
    weights = rng.random((T, A)).astype(np.float32)
    engine = CpuEngine(threads=2)
    got = engine.moe(x, ids, weights, g, u, d, skip=skip)
    want = np.zeros_like(x)
    call = offload._C.StagedMoe(engine._engine, x, ids, weights, want, g.data, g.type_id, u.data, u.type_id, d.data,
                                d.type_id, skip=skip)
    call.submit()
    call.wait()
    call.check()
    assert np.abs(want).max() > 0
    np.testing.assert_array_equal(got, want)


@pytest.mark.parametrize("call, match", [
    (lambda e, w, x: e.linear(w, x[:, :100]), "do not hold|split into"),
    (lambda e, w, x: e.linear(QuantWeight("Q4_K", np.ascontiguousarray(w.data[:, :-1]), 512), x), "bytes do not hold"),
    (lambda e, w, x: e.linear(QuantWeight("Q4_K", w.data[:, :-1], 512), x), "not C-contiguous"),
])
def test_linear_bad_shapes(call, match):
    rng = np.random.default_rng(3)
    w, _ = make_weight(rng, "Q4_K", (8, 512))
    x = rng.standard_normal((2, 512)).astype(np.float32)
    with pytest.raises(ValueError, match=match):
        call(CpuEngine(threads=1), w, x)


def test_linear_with_a_pre_norm():
    """Engine.linear's norm=: the matrix takes rmsnorm(x) * norm (a model's final norm before its output head),
    the same floats as x normed first by the engine's RMSNorm; the norm's shape and eps are checked."""
    rng = np.random.default_rng(9)
    w, _ = make_weight(rng, "Q4_K", (16, 256))
    x = (3 * rng.standard_normal((3, 256))).astype(np.float32)
    norm = (1 + 0.5 * rng.standard_normal(256)).astype(np.float32)
    e = CpuEngine(threads=2)
    want = e.linear(w, rms_norm_ref(x, norm, 1e-5))
    out = np.full((3, 16), np.nan, np.float32)
    e._engine.linear(w.type_id, w.data, x, out, "auto", norm, 1e-5)
    np.testing.assert_array_equal(out, want)
    with pytest.raises(ValueError, match="norm must be float32 \\[256\\]"):
        e._engine.linear(w.type_id, w.data, x, out, "auto", norm[:-1], 1e-5)
    with pytest.raises(ValueError, match="eps must be a finite number >= 0"):
        e._engine.linear(w.type_id, w.data, x, out, "auto", norm, -1.0)


def test_moe_bad_ids():
    """Ids past either end, a skip mask of another length and expert stacks that disagree are refused before
    the call picks its experts."""
    rng = np.random.default_rng(4)
    g, _ = make_weight(rng, "Q8_0", (4, 64, 64))
    d, _ = make_weight(rng, "Q8_0", (4, 64, 64))
    three, _ = make_weight(rng, "Q8_0", (3, 64, 64))
    x = rng.standard_normal((2, 64)).astype(np.float32)
    ids, w = np.array([[0, 1], [1, 2]]), np.ones((2, 2), np.float32)
    e = CpuEngine(threads=1)
    with pytest.raises(ValueError, match="ids holds 9"):
        e.moe(x, np.array([[0, 9], [1, 2]]), w, g, g, d)
    with pytest.raises(ValueError, match=r"ids holds -2, outside -1 \(skip\) .. 3"):
        e.moe(x, np.array([[0, -2], [1, 2]]), w, g, g, d)
    with pytest.raises(ValueError, match=r"skip must be uint8 \[experts\]"):
        e.moe(x, ids, w, g, g, d, skip=np.zeros(3, np.uint8))
    with pytest.raises(ValueError, match="like gate"):
        e.moe(x, ids, w, g, three, d)


BAD_OUTS = {  # outputs the engine cannot write its results into in place, and what it says
    "float64": (lambda shape: np.zeros(shape, np.float64), "is float64"),
    "column slice": (lambda shape: np.zeros((*shape[:-1], shape[-1] + 3), np.float32)[..., :shape[-1]],
                     "not C-contiguous"),
    "Fortran order": (lambda shape: np.zeros(shape, np.float32, order="F"), "not C-contiguous"),
    "read-only": (lambda shape: np.broadcast_to(np.zeros(shape[-1], np.float32), shape), "read-only|incompatible"),
}


@pytest.mark.parametrize("bad", BAD_OUTS)
def test_outputs_not_writable_in_place_are_refused(bad):
    """An `out` the results cannot land in as they are is an error, at the Python API and at the C++ boundary
    alike. (nanobind would otherwise hand a converted temporary copy to the engine, and `out` would keep
    its old contents without a word.)"""
    make, match = BAD_OUTS[bad]
    rng = np.random.default_rng(6)
    w, _ = make_weight(rng, "Q4_K", (16, 256))
    g, _ = make_weight(rng, "Q8_0", (4, 64, 64))
    x = rng.standard_normal((3, 256)).astype(np.float32)
    xm = rng.standard_normal((3, 64)).astype(np.float32)
    ids, weights = np.array([[0, 1], [2, 3], [1, -1]]), np.ones((3, 2), np.float32)
    e = CpuEngine(threads=1)
    err = (ValueError, TypeError) if bad == "read-only" else ValueError  # nanobind refuses it before our check
    with pytest.raises(ValueError, match=match):
        e.linear(w, x, out=make((3, 16)))
    with pytest.raises(err, match=match):
        e._engine.linear(w.type_id, w.data, x, make((3, 16)))
    with pytest.raises(ValueError, match=match):
        e.moe(xm, ids, weights, g, g, g, out=make((3, 64)))
    with pytest.raises(err, match=match):
        e._engine.moe(xm, ids, weights, g.data, g.type_id, g.data, g.type_id, g.data, g.type_id, [], None,
                      make((3, 64)))
    with pytest.raises(ValueError, match=match):
        e.linear_batched(g, rng.standard_normal((4, 3, 64)).astype(np.float32), out=make((4, 3, 64)))
    with pytest.raises(err, match=match):
        e._engine.mla_attention(np.zeros((2, 1, 8), np.float32), np.zeros((2, 1, 4), np.float32),
                                np.zeros((3, 8), np.float32), np.zeros((3, 4), np.float32), 1.0, make((2, 1, 8)))
    out = np.full((3, 16), np.nan, np.float32)  # a good one is written
    assert e.linear(w, x, out=out) is out and np.isfinite(out).all()


def test_torch_custom_ops():
    """torch.ops.tandem.linear / moe agree with the engine and pass torch's op checks."""
    from offload import torch_ops  # noqa: F401 - registers the ops

    rng = np.random.default_rng(5)
    E, H, I, T, A = 4, 256, 256, 3, 2
    g, _ = make_weight(rng, "Q4_K", (E, I, H))
    d, _ = make_weight(rng, "Q6_K", (E, H, I))
    x = rng.standard_normal((T, H)).astype(np.float32)
    ids = rng.integers(0, E, (T, A))
    w = rng.random((T, A)).astype(np.float32)
    want = CpuEngine(threads=2).moe(x, ids, w, g, g, d)
    tt = torch.from_numpy
    types = [12, 12, 14]
    got = torch.ops.tandem.moe(tt(x), tt(ids), tt(w), tt(g.data), tt(g.data), tt(d.data), types, [], [])
    assert np.array_equal(got.numpy(), want)
    torch.library.opcheck(torch.ops.tandem.moe.default,
                          (tt(x), tt(ids), tt(w), tt(g.data), tt(g.data), tt(d.data), types, [], []),
                          test_utils=("test_schema", "test_faketensor"))
    lw, _ = make_weight(rng, "Q8_0", (8, 256))
    y = torch.ops.tandem.linear(tt(x), tt(lw.data), 8, 8)
    assert np.array_equal(y.numpy(), CpuEngine(threads=2).linear(lw, x))


@pytest.mark.parametrize("isa", ISAS)
@pytest.mark.parametrize("dtype", [torch.float32, torch.float16, torch.bfloat16])
@pytest.mark.parametrize("T,S", [(1, 1), (1, 37), (3, 3), (7, 40), (33, 300)])
def test_mla_attention(isa, dtype, T, S):
    """The engine's latent-space attention against the torch formula (causal, the new tokens last),
    with the cache's rounding of q and p as llama.cpp applies it."""
    check_mla_attention(isa, dtype, T, S, H=5, R=72, scale=0.13)  # R not a multiple of 16: SIMD tails run too


@pytest.mark.parametrize("isa", ISAS)
@pytest.mark.parametrize("dtype", [torch.float32, torch.float16, torch.bfloat16])
@pytest.mark.parametrize("T,S,R,scale", [(1, 700, 200, 0.13), (9, 530, 200, 0.13), (17, 90, 40, 0.13),
                                         (2, 300, 72, 40.0)])
def test_mla_attention_all_heads_at_once(isa, dtype, T, S, R, scale):
    """The shapes of the all-heads path: positions in several slabs and blocks of the mix (48 positions, 64 bf16),
    several column slices of it with a tail past the whole vectors (R 200 = 128 + 64 + 8 at AVX-512), new
    tokens in more than one tile of 8, and (scale 40) scores spread so far that most probabilities
    underflow the vectorized exp."""
    check_mla_attention(isa, dtype, T, S, H=16, R=R, scale=scale)


@pytest.mark.parametrize("isa", ISAS)
@pytest.mark.parametrize("dtype", [torch.float32, torch.float16, torch.bfloat16])
def test_mla_attention_rounds_p_to_the_cache_type(isa, dtype):
    """With one-hot cache rows the output is p itself: the probabilities rounded to the cache's precision,
    value by value (a vectorized exp may move a value next to a rounding boundary by one step, rarely;
    without the rounding nearly every value would differ)."""
    H, T, S, R, Dr = 16, 1, 45, 64, 16
    g = torch.Generator().manual_seed(7)
    q_lat, q_pe = torch.randn(H, T, R, generator=g), torch.randn(H, T, Dr, generator=g)
    c_kv, k_pe = torch.eye(S, R).to(dtype), torch.randn(S, Dr, generator=g).to(dtype)
    out = np.empty((H, T, R), dtype=np.float32)
    CpuEngine(threads=2)._engine.mla_attention(q_lat.numpy(), q_pe.numpy(), c_kv, k_pe, 0.5, out, isa)
    from local.models.mla import cache_precision
    low = cache_precision(dtype, torch.float32)
    q, p_ = quantize_activation(q_lat, low), quantize_activation(q_pe, low)
    scores = (q.double() @ c_kv.double().T + p_.double() @ k_pe.double().T) * 0.5
    want = quantize_activation(torch.softmax(scores, -1).float(), low).numpy()[:, :, :S]
    got = out[:, :, :S]
    ulp = {torch.float32: 1e-6, torch.float16: 2.0**-10, torch.bfloat16: 2.0**-7}[dtype]  # f32: exp's error
    off = np.abs(got - want) > 1e-6 * np.abs(want)
    assert off.mean() <= 0.02, f"{off.mean():.1%} of the probabilities differ"
    assert np.all(np.abs(got - want) <= ulp * np.abs(want) + 1e-30)


def check_mla_attention(isa, dtype, T, S, H, R, scale, Dr=16):
    from local.models.mla import attention_mask, cache_precision

    g = torch.Generator().manual_seed(T * 1000 + S)
    q_lat, q_pe = torch.randn(H, T, R, generator=g), torch.randn(H, T, Dr, generator=g)
    c_kv, k_pe = torch.randn(S, R, generator=g).to(dtype), torch.randn(S, Dr, generator=g).to(dtype)
    out = np.empty((H, T, R), dtype=np.float32)
    CpuEngine(threads=2)._engine.mla_attention(q_lat.numpy(), q_pe.numpy(), c_kv, k_pe, scale, out, isa)
    low = cache_precision(dtype, torch.float32)
    q, p_ = quantize_activation(q_lat, low), quantize_activation(q_pe, low)
    scores = (q.double() @ c_kv.double().T + p_.double() @ k_pe.double().T) * scale
    scores = scores + attention_mask(T, S, "cpu").double()
    p = quantize_activation(torch.softmax(scores, -1).float(), low).double()
    want = (p @ c_kv.double()).numpy()
    assert np.abs(out - want).max() <= 1e-5 * np.abs(want).max() + 1e-5 + (2e-3 if low else 0)


def test_mla_attention_checks_shapes():
    e = CpuEngine(threads=1)._engine
    q = np.zeros((2, 1, 8), np.float32)
    with pytest.raises(ValueError, match="at least one head"):
        e.mla_attention(q[:0], np.zeros((0, 1, 4), np.float32), np.zeros((3, 8), np.float32),
                        np.zeros((3, 4), np.float32), 1.0, q[:0])
    with pytest.raises(ValueError, match="c_kv must be"):
        e.mla_attention(q, np.zeros((2, 1, 4), np.float32), np.zeros((3, 9), np.float32), np.zeros((3, 4), np.float32),
                        1.0, np.zeros_like(q))
    with pytest.raises(ValueError, match="float32, float16 or bfloat16"):
        e.mla_attention(q, np.zeros((2, 1, 4), np.float32), np.zeros((3, 8), np.float64), np.zeros((3, 4), np.float64),
                        1.0, np.zeros_like(q))


# ---------------------------------------------------------------- inputs that crashed, hung or answered wrong

Q8_0 = 8


def q8_0(*shape) -> np.ndarray:
    """Q8_0 bytes of random values [..., rows, cols]."""
    return offload._C.quantize(np.random.default_rng(0).random(shape, dtype=np.float32), Q8_0, 1)


def test_empty_stacks_and_rows_are_refused():
    """No experts, a batch of no matrices, rows of no values: these read past an empty array or divided by
    zero (SIGSEGV, SIGFPE) before the boundary refused them."""
    e = CpuEngine(threads=1)._engine
    x, ids, w = np.ones((1, 64), np.float32), np.full((1, 1), -1, np.int64), np.ones((1, 1), np.float32)
    none, none_down = np.zeros((0, 32, 68), np.uint8), np.zeros((0, 64, 34), np.uint8)
    with pytest.raises(ValueError, match="gate must hold at least one matrix"):
        e.moe(x, ids, w, none, Q8_0, none, Q8_0, none_down, Q8_0, [], None, np.zeros_like(x))
    with pytest.raises(ValueError, match="weight must hold at least one matrix"):
        e.linear_batched(Q8_0, np.zeros((0, 16, 68), np.uint8), np.zeros((0, 2, 64), np.float32),
                         np.zeros((0, 2, 16), np.float32))
    flat = np.zeros((1, 0), np.float32)  # hidden size 0
    with pytest.raises(ValueError, match="at least one value"):
        e.moe(flat, np.zeros((1, 1), np.int64), w, np.zeros((1, 32, 0), np.uint8), Q8_0, np.zeros((1, 32, 0), np.uint8),
              Q8_0, np.zeros((1, 0, 34), np.uint8), Q8_0, [], None, np.zeros_like(flat))


def test_moe_refuses_out_over_x_and_float_ids():
    """out = x gave a wrong answer without a word (the op reads x while it writes out); float ids were
    truncated to experts (0.9 -> expert 0), at the binding and in CpuEngine.moe."""
    e = CpuEngine(threads=1)
    g, d = QuantWeight("Q8_0", q8_0(2, 32, 64), 64), QuantWeight("Q8_0", q8_0(2, 64, 32), 32)
    x = np.random.default_rng(1).random((2, 64), dtype=np.float32)
    ids, w = np.zeros((2, 1), np.int64), np.ones((2, 1), np.float32)
    with pytest.raises(ValueError, match="out overlaps x"):
        e.moe(x, ids, w, g, g, d, out=x)
    with pytest.raises(ValueError, match="ids must be integer expert ids, got float64"):
        e.moe(x, np.full((2, 1), 0.9), w, g, g, d)
    with pytest.raises(ValueError, match="ids is float64; expert ids must be int64"):
        e._engine.moe(x, np.full((2, 1), 0.9), w, g.data, Q8_0, g.data, Q8_0, d.data, Q8_0, [], None, np.zeros_like(x))


def test_weight_bytes_of_another_dtype_are_refused():
    """float64 data called F32 has the byte count of twice the values and was read as float32 garbage."""
    e = CpuEngine(threads=1)._engine
    with pytest.raises(ValueError, match="weight is float64; a F32 weight comes as uint8 bytes or float32"):
        e.linear(0, np.zeros((4, 32), np.float64), np.ones((1, 64), np.float32), np.zeros((1, 4), np.float32))


@pytest.mark.parametrize("isa", ISAS)
@pytest.mark.parametrize("typ", TYPES)
def test_a_nan_in_the_activations_gives_nan(typ, isa):
    """A NaN in a token's activations makes every output of that token NaN, as in float math, and leaves the
    other tokens alone: the Q8 activation blocks took their scale from the largest magnitude, which passed over
    the NaN, and one NaN came out as a finite number (the scalar and SIMD quantizers each their own)."""
    rng = np.random.default_rng(7)
    K = cols_for(typ)
    w, _ = make_weight(rng, typ, (32, K))
    x = rng.standard_normal((3, K)).astype(np.float32)
    x[1, 5] = np.nan
    y = CpuEngine(threads=2, isa=isa).linear(w, x)
    assert np.isnan(y[1]).all() and np.isfinite(y[[0, 2]]).all()


def test_a_nan_in_the_activations_gives_nan_through_the_moe():
    rng = np.random.default_rng(8)
    g, _ = make_weight(rng, "Q4_K", (4, 256, 256))
    d, _ = make_weight(rng, "Q6_K", (4, 256, 256))
    x = rng.standard_normal((3, 256)).astype(np.float32)
    x[2, 100] = np.nan
    out = CpuEngine(threads=2).moe(x, np.array([[0, 1], [2, 3], [1, 2]]), np.full((3, 2), 0.5, np.float32), g, g, d)
    assert np.isnan(out[2]).all() and np.isfinite(out[:2]).all()


def test_async_moe_keeps_its_shared_experts_alive():
    """An asynchronous call holds every array it reads until wait(): the shared experts, given as temporaries,
    were freed while it ran (a use after free)."""
    import gc

    e = CpuEngine(threads=2)
    g, d = QuantWeight("Q8_0", q8_0(2, 64, 1024), 1024), QuantWeight("Q8_0", q8_0(2, 1024, 64), 64)
    x = np.random.default_rng(2).random((1, 1024), dtype=np.float32)
    ids, w = np.zeros((1, 1), np.int64), np.ones((1, 1), np.float32)

    def shared():  # a new copy each time (q8_0 draws from seed 0: the same values)
        shapes = ((2048, 1024), (2048, 1024), (1024, 2048))
        return [tuple(QuantWeight("Q8_0", q8_0(*shape), shape[1]) for shape in shapes)]

    want = e.moe(x, ids, w, g, g, d, shared=shared())
    out = np.zeros_like(x)
    e.moe(x, ids, w, g, g, d, shared=shared(), out=out, async_=True)
    gc.collect()
    e.wait()
    assert np.array_equal(out, want)


def test_read_bandwidth_takes_a_sane_size():
    e = CpuEngine(threads=1)._engine
    for size in (0, 2**64 - 1):  # a misleading MemoryError, and a size overflow and a crash
        with pytest.raises(ValueError, match="read_bandwidth reads 1 MiB .. 1 TiB"):
            e.read_bandwidth(size, 1)


def test_staged_moe_buffers_are_the_arrays_themselves():
    """A float64 or strided x was handed over as a converted copy, which the later writes to the array never
    reached: the calls read zeros without a word."""
    e = CpuEngine(threads=1)._engine
    experts = (q8_0(2, 32, 64), Q8_0, q8_0(2, 32, 64), Q8_0, q8_0(2, 64, 32), Q8_0)
    x, ids, w, out = (np.zeros((2, 64), np.float32), np.full((2, 1), -1, np.int64), np.ones((2, 1), np.float32),
                      np.zeros((2, 64), np.float32))
    offload._C.StagedMoe(e, x, ids, w, out, *experts)
    with pytest.raises(ValueError, match="x is float64; a staging buffer"):
        offload._C.StagedMoe(e, x.astype(np.float64), ids, w, out, *experts)
    with pytest.raises(ValueError, match="weights is float32 and not C-contiguous"):
        offload._C.StagedMoe(e, x, ids, np.ones((2, 2), np.float32)[:, :1], out, *experts)
    with pytest.raises(ValueError, match="ids is int32; expert ids must be int64"):
        offload._C.StagedMoe(e, x, ids.astype(np.int32), w, out, *experts)
    with pytest.raises(ValueError, match="engine must be an offload._C.Engine"):
        offload._C.StagedMoe(object(), x, ids, w, out, *experts)


def test_a_pool_that_cannot_start_its_threads_says_so():
    """Thread creation failing part way (here: an address-space limit) left the started workers waiting on a
    pool being destroyed, and Engine() hung for good."""
    import resource
    import subprocess
    import sys

    def limit():
        resource.setrlimit(resource.RLIMIT_AS, (3 << 30, 3 << 30))

    code = "from offload import _C; _C.Engine(2000)"
    r = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120, preexec_fn=limit)
    assert r.returncode == 1 and "use fewer threads" in r.stderr, r.stderr[-500:]
