"""The engine's whole MoE layer (offload/csrc/router.h + the fused experts): the router in C++ must pick
the experts local/models/moe.py's Router picks, with its weights, for every scoring / top-k method, and
the layer must give the experts op's output for those picks."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from local.models.moe import Router
from offload import _C
from offload.engine import CpuEngine

from .test_engine import make_weight, rms_norm_ref

H, I, E = 128, 64, 16
# (scoring, topk_method, n_group, topk_group, norm_topk_prob, routed_scaling_factor, top_k)
ROUTERS = {
    "v2_lite": ("softmax", "greedy", 1, 1, False, 1.0, 6),
    "v2_group": ("softmax", "group_limited_greedy", 4, 2, False, 16.0, 3),
    "v3": ("sigmoid", "noaux_tc", 4, 2, True, 2.5, 4),
    "qwen3": ("softmax", "greedy", 1, 1, True, 1.0, 1),
}


def torch_router(name: str, seed: int) -> Router:
    scoring, method, n_group, topk_group, norm, scale, k = ROUTERS[name]
    r = Router(H, E, k, scoring=scoring, topk_method=method, n_group=n_group, topk_group=topk_group,
               norm_topk_prob=norm, routed_scaling_factor=scale)
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        r.weight.copy_(torch.randn(E, H, generator=g) * 0.2)
        if method == "noaux_tc":
            r.e_score_correction_bias.copy_(torch.randn(E, generator=g) * 0.1)
    return r


def engine_layer(r: Router, experts, shared):
    (gate, up, down) = experts
    bias = getattr(r, "e_score_correction_bias", None)
    spec = [(s[0].data, s[0].type_id, s[1].data, s[1].type_id, s[2].data, s[2].type_id) for s in shared]
    return _C.MoeLayer(gate.data, gate.type_id, up.data, up.type_id, down.data, down.type_id, spec,
                       (r.weight.detach().numpy(), 0), None if bias is None else bias.numpy(), r.top_k, r.scoring,
                       r.topk_method, r.n_group, r.topk_group, r.norm_topk_prob, r.routed_scaling_factor)


@pytest.fixture(scope="module")
def stacks():
    rng = np.random.default_rng(11)
    experts = (make_weight(rng, "Q8_0", (E, I, H))[0], make_weight(rng, "Q8_0", (E, I, H))[0],
               make_weight(rng, "Q5_0", (E, H, I))[0])
    shared = [(make_weight(rng, "Q8_0", (I, H))[0], make_weight(rng, "Q8_0", (I, H))[0],
               make_weight(rng, "Q8_0", (H, I))[0])]
    return experts, shared


@pytest.mark.parametrize("name", ROUTERS)
@pytest.mark.parametrize("threads", [1, 2])
def test_layer_routes_like_the_reference(name, threads, stacks):
    experts, shared = stacks
    r = torch_router(name, seed=len(name))
    layer = engine_layer(r, experts, shared)
    eng = CpuEngine(threads)
    for T in (1, 3, 33):
        x = torch.randn(T, H, generator=torch.Generator().manual_seed(T))
        with torch.no_grad():
            want_w, want_ids = r(x)
        out = np.empty((T, H), np.float32)
        ids = np.empty((T, r.top_k), np.int64)
        w = np.empty((T, r.top_k), np.float32)
        eng._engine.moe_layer(layer, x.numpy(), out, ids, w)
        # the same experts, best first, and their weights (logits differ from torch's in the last bits)
        assert np.array_equal(ids, want_ids.numpy()), (name, T)
        np.testing.assert_allclose(w, want_w.numpy(), rtol=1e-5, atol=1e-7)
        ref = eng.moe(x.numpy(), ids, w, *experts, shared=shared)
        np.testing.assert_array_equal(out, ref)


def test_layer_checks_its_configuration(stacks):
    experts, shared = stacks
    r = torch_router("v3", 0)
    gate, up, down = experts
    args = [gate.data, gate.type_id, up.data, up.type_id, down.data, down.type_id, [], (r.weight.detach().numpy(), 0),
            r.e_score_correction_bias.numpy(), 4, "sigmoid", "noaux_tc", 4, 2, True, 2.5]

    def build(**changes):
        a = list(args)
        for i, v in changes.items():
            a[int(i[1:])] = v
        return _C.MoeLayer(*a)

    build()
    with pytest.raises(ValueError, match="correction bias"):
        build(a8=None)
    with pytest.raises(ValueError, match="top_k must be 1..16"):
        build(a9=17)
    with pytest.raises(ValueError, match="scoring 'relu'"):
        build(a10="relu")
    with pytest.raises(ValueError, match="topk_method 'best'"):
        build(a11="best")
    with pytest.raises(ValueError, match="n_group must divide"):
        build(a12=3)
    with pytest.raises(ValueError, match="fewer experts than top_k"):
        build(a13=1, a9=5)
    with pytest.raises(ValueError, match="router has 8 rows for 16 experts"):
        build(a7=(r.weight.detach().numpy()[:8], 0))
    with pytest.raises(ValueError, match="correction bias holds nan"):  # it would route every token to experts 0, 1
        build(a8=np.full(16, np.nan, np.float32))
    with pytest.raises(ValueError, match="routed_scaling_factor must be finite"):
        build(a15=float("inf"))
    with pytest.raises(ValueError, match="router is float64"):  # its bytes would be read as float32 garbage
        build(a7=(r.weight.detach().double().numpy(), 0))
    layer = build()
    eng = CpuEngine(2)._engine
    x = np.zeros((2, H), np.float32)
    with pytest.raises(ValueError, match="ids must have shape"):
        eng.moe_layer(layer, x, np.empty((2, H), np.float32), np.empty((2, 3), np.int64), np.empty((2, 4), np.float32))
    with pytest.raises(ValueError, match=f"x must be float32 \\[tokens, {H}\\]"):
        eng.moe_layer(layer, np.zeros((2, H + 1), np.float32), np.empty((2, H), np.float32),
                      np.empty((2, 4), np.int64), np.empty((2, 4), np.float32))


def test_layer_pre_norm_and_residual(stacks):
    """norm= / residual=: a decoder layer's `h + moe(rmsnorm(h) * w)` in the one call, the router and the
    experts both reading the normed input."""
    experts, shared = stacks
    r = torch_router("v3", 3)
    layer = engine_layer(r, experts, shared)
    eng = CpuEngine(2)._engine
    rng = np.random.default_rng(8)
    w = (1 + 0.5 * rng.standard_normal(H)).astype(np.float32)

    def call(x, **kw):
        out, ids, wt = np.empty(x.shape, np.float32), np.empty((len(x), r.top_k), np.int64), np.empty((len(x), r.top_k), np.float32)
        eng.moe_layer(layer, x, out, ids, wt, **kw)
        return out, ids, wt

    for T in (1, 5):
        x = (3 * rng.standard_normal((T, H))).astype(np.float32)
        plain = call(rms_norm_ref(x, w, 1e-5))
        block = call(x, norm=w, eps=1e-5)
        fused = call(x, norm=w, eps=1e-5, residual=True)
        for a, b in zip(plain, block):  # out, ids, weights
            np.testing.assert_array_equal(a, b)
        np.testing.assert_array_equal(fused[0], block[0] + x)
        np.testing.assert_array_equal(fused[1], block[1])
        assert not np.array_equal(block[0], call(x)[0])  # the norm is not a no-op here
    x = np.ones((2, H), np.float32)
    with pytest.raises(ValueError, match=f"norm must be float32 \\[{H}\\]"):
        call(x, norm=np.ones(H + 1, np.float32))
    with pytest.raises(ValueError, match="eps must be a finite number"):
        call(x, norm=w, eps=float("nan"))
    with pytest.raises(ValueError, match="out overlaps x"):
        eng.moe_layer(layer, x, x, np.empty((2, r.top_k), np.int64), np.empty((2, r.top_k), np.float32), residual=True)


def test_layer_is_a_custom_op(stacks):
    from offload import torch_ops

    experts, shared = stacks
    r = torch_router("v2_group", 1)
    gate, up, down = experts
    flat = [m.data for s in shared for m in s]
    layer = torch_ops.moe_layer(gate.data, up.data, down.data, [gate.type_id, up.type_id, down.type_id], flat,
                                [m.type_id for s in shared for m in s], r.weight, None, r.top_k, r.scoring,
                                r.topk_method, r.n_group, r.topk_group, r.norm_topk_prob, r.routed_scaling_factor)
    x = torch.randn(3, H)
    out, w, ids = torch.ops.tandem.moe_layer(x, r.top_k, id(layer))
    with torch.no_grad():
        want_w, want_ids = r(x)
    assert torch.equal(ids, want_ids) and torch.allclose(w, want_w, rtol=1e-5)
    eager = torch_ops.run_moe_layer(layer, x, r.top_k)
    assert all(torch.equal(a, b) for a, b in zip(eager, (out, w, ids)))
    torch.library.opcheck(torch.ops.tandem.moe_layer.default, (x, r.top_k, id(layer)),
                          test_utils=("test_schema", "test_faketensor"))
    norm = torch.rand(H) + 0.5
    args = (x, r.top_k, id(layer), norm, 1e-5, True)
    fused = torch.ops.tandem.moe_layer(*args)
    eager = torch_ops.run_moe_layer(layer, x, r.top_k, norm, 1e-5, residual=True)
    assert all(torch.equal(a, b) for a, b in zip(eager, fused)) and not torch.equal(fused[0], out)
    torch.library.opcheck(torch.ops.tandem.moe_layer.default, args, test_utils=("test_schema", "test_faketensor"))
