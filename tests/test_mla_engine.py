"""The engine's fused MLA block (offload/csrc/mla.h): one call per layer for the projections, the latent
norm, rope, the cache write and the absorbed attention. It must give the op-by-op engine path's numbers
(which test_engine checks op by op) and llama.cpp's logits on the same file.

The conftest models' head dims (16) do not split into Q8_0 blocks, so their W_UK stays in torch; these
models use head dims of 32 so that every MLA weight runs on the engine."""

from __future__ import annotations

import numpy as np
import pytest
import torch

import local
import offload
from local.models import deepseek_v2
from local.models.layers import RMSNorm
from local.models.mla import MLAttention
from local.models.moe import MoE
from offload import torch_ops
from quant.convert import convert

from .conftest import build_reference
from .test_engine import rms_norm_ref
from .test_gguf import N_TOKENS, agreement_with_llama_cpp, seq

ISAS = offload.supported_isas()
MLA_DIMS = {"kv_lora_rank": 64, "qk_nope_head_dim": 32, "qk_rope_head_dim": 16, "v_head_dim": 32,
            "initializer_range": 0.05}


@pytest.fixture(scope="module")
def mla_files(tmp_path_factory, tokenizer_dir):
    """name -> Q8_0 GGUF of a V2-Lite style (no q LoRA) and a V3 style (q LoRA) model."""
    out = {}
    for name, extra in (("v2_lite", {}), ("v3", {"q_lora_rank": 64})):
        d = tmp_path_factory.mktemp(f"hf_mla_{name}")
        build_reference(name, d, tokenizer_dir, seed=4, overrides={**MLA_DIMS, **extra})
        out[name] = convert(d, tmp_path_factory.mktemp("gguf_mla") / f"{name}-q8_0.gguf", "q8_0", progress=False)
    return out


def blocks(runner) -> list[MLAttention]:
    return [m for m in runner.model.modules() if isinstance(m, MLAttention)]


def fill_cache(runner, start: int, dtype):
    cache = runner.model.new_cache(64, dtype=dtype)
    g = torch.Generator().manual_seed(start)
    for buf in cache.buffers.values():
        buf[:, :start] = torch.randn(buf[:, :start].shape, generator=g).to(dtype)
    return cache


@pytest.mark.parametrize("name", ["v2_lite", "v3"])
@pytest.mark.parametrize("dtype", [torch.float32, torch.float16, torch.bfloat16])
@pytest.mark.parametrize("threads", [1, 2])
def test_fused_block_matches_the_op_by_op_path(mla_files, name, dtype, threads):
    runner = local.load(mla_files[name], device="cpu", threads=threads)
    assert all(a.engine_layer is not None for a in blocks(runner)), "every MLA block should be one engine call"
    # the latent norm sums in another order: a last-bit change can move one Q8 rounding of W_UV's input by a
    # step, so the block agrees to ~1e-4 (T=1 agrees exactly here)
    check_fused_block(runner, blocks(runner)[1], dtype, ((1, 0), (1, 21), (2, 21), (7, 40), (33, 0)), f32_ulp=1e-6)


def plain(attn, *args):
    """An attention block op by op (its engine_layer left out for the call)."""
    layer, attn.engine_layer = attn.engine_layer, None
    try:
        return attn(*args)
    finally:
        attn.engine_layer = layer


def check_fused_block(runner, attn, dtype, cases, f32_ulp: float):
    """An attention block as one engine call against its op-by-op path, every ISA, for the (tokens, start)
    cases: outputs within 1e-3 relative, each cache stream within a unit of its dtype (f32_ulp for float32)
    and nothing written past the new positions."""
    model = runner.model
    e = torch_ops.engine()
    default_isa = e.isa
    try:
        for isa in ISAS:
            e.isa = isa
            for T, start in cases:
                x = torch.randn(T, model.config.hidden_size, generator=torch.Generator().manual_seed(T + start))
                cos_sin = model.rope.cos_sin(torch.arange(start, start + T))
                fused_cache, plain_cache = fill_cache(runner, start, dtype), fill_cache(runner, start, dtype)
                with torch.inference_mode():
                    got = attn(x, model.rope, cos_sin, fused_cache, start)
                    want = plain(attn, x, model.rope, cos_sin, plain_cache, start)
                rel = ((got - want).norm() / want.norm()).item()
                assert rel <= 1e-3, (isa, T, start, rel)
                for stream in fused_cache.buffers:
                    a = fused_cache.buffers[stream][attn.layer_idx, :start + T].float()
                    b = plain_cache.buffers[stream][attn.layer_idx, :start + T].float()
                    ulp = f32_ulp if dtype == torch.float32 else (2 ** -10 if dtype == torch.float16 else 2 ** -7)
                    assert torch.allclose(a, b, rtol=ulp, atol=ulp), (isa, stream, (a - b).abs().max())
                    assert fused_cache.buffers[stream][attn.layer_idx, start + T:].abs().max() == 0  # no stray rows
    finally:
        e.isa = default_isa


@pytest.mark.parametrize("name", ["v2_lite", "v3"])
def test_fused_model_agrees_with_llama_cpp(mla_files, name):
    """The same bar as test_gguf's Q8_0 test (KL <= 1e-3, top-1 >= 99% off near-ties), now with every MLA
    weight on the engine; and greedy decoding gives the op-by-op path's tokens."""
    check_fused_model(mla_files[name], blocks)


def check_fused_model(path, blocks):
    """The file's model, every attention block (`blocks(runner)`) one engine call, against llama.cpp on the
    same file; then greedy decoding with and without those calls."""
    runner = local.load(path, device="cpu", kv_cache_dtype="float16")
    assert all(a.engine_layer is not None for a in blocks(runner))
    agree, _, ties = agreement_with_llama_cpp(runner, path, 3)
    assert agree >= 0.99 and ties <= 0.15 * 3 * N_TOKENS, (agree, ties)

    params = local.SamplingParams(max_tokens=16, temperature=0, ignore_eos=True)
    fused = [ev.token_id for ev in runner.generate(seq(7)[:8], params) if ev.token_id is not None]
    for a in blocks(runner):
        a.engine_layer = None
    unfused = [ev.token_id for ev in runner.generate(seq(7)[:8], params) if ev.token_id is not None]
    assert fused == unfused and len(fused) == 16


@pytest.mark.parametrize("name", ["v2_lite", "v3"])
def test_pre_norm_block_adds_the_block_of_the_normed_input(mla_files, name):
    """norm= / residual=: a decoder layer's `x + attn(rmsnorm(x) * w)` in the one call; the cache gets the
    normed input's latents."""
    runner = local.load(mla_files[name], device="cpu", threads=2)
    check_pre_norm_block(runner, blocks(runner)[1], torch_ops.engine()._engine.mla_forward, fill_cache)


def check_pre_norm_block(runner, attn, forward, fill_cache):
    """An attention block's engine call (forward: Engine.mla_forward / gqa_forward) with norm= and residual=
    against the same call on the input normed here, and that plus x; the caches written alike."""
    model = runner.model
    D = runner.config.hidden_size
    rng = np.random.default_rng(5)
    w = (1 + 0.5 * rng.standard_normal(D)).astype(np.float32)
    for T, start in ((1, 9), (3, 0)):
        x = (3 * rng.standard_normal((T, D))).astype(np.float32)
        cos, sin = (t.numpy() for t in model.rope.cos_sin(torch.arange(start, start + T)))
        outs, caches = {}, {}
        for how in ("plain", "block", "fused"):
            cache = [b.numpy() for b in fill_cache(runner, start, torch.float32).layer(attn.layer_idx).values()]
            out = np.empty((T, D), np.float32)
            if how == "plain":
                forward(attn.engine_layer, rms_norm_ref(x, w, 1e-5), cos, sin, *cache, start, out)
            else:
                forward(attn.engine_layer, x, cos, sin, *cache, start, out, norm=w, eps=1e-5, residual=how == "fused")
            outs[how], caches[how] = out, [c.copy() for c in cache]
        np.testing.assert_array_equal(outs["block"], outs["plain"])
        for a, b in zip(caches["block"], caches["plain"]):
            np.testing.assert_array_equal(a, b)
        np.testing.assert_array_equal(outs["fused"], outs["block"] + x)


def norms_fused_and_op_by_op(runner, layer_class, attend, monkeypatch) -> tuple[int, int]:
    """How many torch RMSNorms run in the model's forward over 6 tokens as loaded, then with every layer
    written out op by op (`h = x + attend(self.self_attn, norm(x), ...)`, `h + mlp(norm(h))`, layer_class's
    forward replaced, no stack); the two forwards' logits agree (torch's norm and the engine's sum in other
    orders: a last-bit change can move a Q8 rounding)."""
    model = runner.model
    norms = []
    norm_forward = RMSNorm.forward
    monkeypatch.setattr(RMSNorm, "forward", lambda self, x: norms.append(self) or norm_forward(self, x))
    ids = torch.tensor(seq(7)[:6])
    with torch.inference_mode():
        fused = model(ids, model.new_cache(16))
        fused_norms, norms[:] = len(norms), []

        def op_by_op(self, x, rope, cos_sin, cache, start):
            h = x + attend(self.self_attn, self.input_layernorm(x), rope, cos_sin, cache, start)
            return h + self.mlp(self.post_attention_layernorm(h))

        monkeypatch.setattr(layer_class, "forward", op_by_op)
        monkeypatch.setattr(model, "engine_stacks", {})  # every layer through its own forward
        unfused = model(ids, model.new_cache(16))
    rel = ((fused - unfused).norm() / unfused.norm()).item()
    assert rel <= 1e-3, rel
    assert torch.equal(fused.argmax(-1), unfused.argmax(-1))
    return fused_norms, len(norms)


def test_decoder_layers_are_two_engine_calls(mla_files, monkeypatch):
    """On the engine a decoder layer is `h = x + attn(norm(x))` and `h + moe(norm(h))`, each block with its
    norm and residual inside one engine call (and the MoE layers all in one, layers.EngineStack), the final norm
    inside the output head's: no torch norm runs but the dense layers', and the logits are those of the layer
    written out op by op."""
    runner = local.load(mla_files["v3"], device="cpu")
    layers = runner.model.model.layers
    assert any(isinstance(layer.mlp, MoE) and layer.mlp.engine_layer is not None for layer in layers)
    counts = norms_fused_and_op_by_op(runner, deepseek_v2.DecoderLayer, lambda attn, *a: attn(*a), monkeypatch)
    dense = sum(not isinstance(layer.mlp, MoE) for layer in layers)
    assert counts == (dense, 2 * len(layers))  # the final norm runs inside the output head's call


def test_fused_block_checks_its_inputs(mla_files):
    runner = local.load(mla_files["v3"], device="cpu")
    attn = blocks(runner)[0]
    e = torch_ops.engine()._engine
    D = runner.config.hidden_size
    check_block_inputs(runner, attn, e.mla_forward, rope_half=8)
    c_kv, k_pe = (a.numpy() for a in runner.model.new_cache(8).layer(0).values())
    cos, out, x = np.zeros((1, 8), np.float32), np.empty((1, D), np.float32), np.zeros((1, D), np.float32)
    with pytest.raises(ValueError, match="c_kv must be"):
        e.mla_forward(attn.engine_layer, x, cos, cos, k_pe, k_pe, 0, out)

    w = attn.kv_a_proj_with_mqa.engine_weight
    args = dict(hidden=D, heads=attn.n_heads, nope_dim=32, rope_dim=16, kv_lora_rank=64, v_dim=32,
                q_a=(attn.q_a_proj.engine_weight.data, attn.q_a_proj.engine_weight.type_id),
                q_a_norm=np.ones(64, np.float32), q=(attn.q_b_proj.engine_weight.data, attn.q_b_proj.engine_weight.type_id),
                kv_a=(w.data, w.type_id), kv_a_norm=np.ones(64, np.float32),
                uk=(attn.engine_uk.data, attn.engine_uk.type_id), uv=(attn.engine_uv.data, attn.engine_uv.type_id),
                o=(attn.o_proj.engine_weight.data, attn.o_proj.engine_weight.type_id), eps=1e-6, scale=0.1)
    offload._C.MlaLayer(**args)  # as the loader builds it
    with pytest.raises(ValueError, match="come together"):
        offload._C.MlaLayer(**{**args, "q_a_norm": None})
    with pytest.raises(ValueError, match="kv_a_norm must be float32 \\[64\\]"):
        offload._C.MlaLayer(**{**args, "kv_a_norm": np.ones(32, np.float32)})
    with pytest.raises(ValueError, match="uk must be the per-head stack"):
        offload._C.MlaLayer(**{**args, "uk": (attn.engine_uk.data[:2], attn.engine_uk.type_id)})
    with pytest.raises(ValueError, match="q must be one matrix of 256 rows"):  # heads x (32 + 32) rows asked
        offload._C.MlaLayer(**{**args, "rope_dim": 32})
    with pytest.raises(ValueError, match="kv_a must be one matrix of 112 rows"):  # 96 + 16 rows asked
        offload._C.MlaLayer(**{**args, "kv_lora_rank": 96, "kv_a_norm": np.ones(96, np.float32)})
    for eps in (-1.0, float("nan")):  # both gave all-zero outputs
        with pytest.raises(ValueError, match="eps must be a finite number >= 0"):
            offload._C.MlaLayer(**{**args, "eps": eps})
    with pytest.raises(ValueError, match="scale must be a finite number"):
        offload._C.MlaLayer(**{**args, "scale": float("nan")})
    with pytest.raises(ValueError, match="q_a must hold at least one matrix of at least one row"):  # crashed
        offload._C.MlaLayer(**{**args, "q_a": (args["q_a"][0][:0], args["q_a"][1]), "q_a_norm": np.ones(0, np.float32)})


def check_block_inputs(runner, attn, forward, rope_half: int):
    """What Engine.mla_forward / gqa_forward (forward) check alike at the boundary: room in the cache, x's and
    cos's shapes, caches of one dtype, the norm's shape and eps, out apart from x, a writable cache."""
    D = runner.config.hidden_size
    a, b = (t.numpy() for t in runner.model.new_cache(8).layer(0).values())
    cos = np.zeros((1, rope_half), np.float32)
    out = np.empty((1, D), np.float32)
    x = np.zeros((1, D), np.float32)
    layer = attn.engine_layer
    with pytest.raises(ValueError, match="reserve the cache"):
        forward(layer, x, cos, cos, a, b, 8, out)
    for start in (2**63 - 1, 2**63 - 2):  # start + T wrapped around, and the range check passed
        with pytest.raises(ValueError, match="reserve the cache"):
            forward(layer, x, cos, cos, a, b, start, out)
    with pytest.raises(ValueError, match=f"x must be float32 \\[tokens, {D}\\]"):
        forward(layer, np.zeros((1, D + 1), np.float32), cos, cos, a, b, 0, out)
    with pytest.raises(ValueError, match="cos must have shape"):
        forward(layer, x, np.zeros((1, rope_half // 2), np.float32), cos, a, b, 0, out)
    with pytest.raises(ValueError, match="share a dtype"):
        forward(layer, x, cos, cos, a, b.astype(np.float16), 0, out)
    with pytest.raises(ValueError, match=f"norm must be float32 \\[{D}\\]"):
        forward(layer, x, cos, cos, a, b, 0, out, norm=np.ones(D - 1, np.float32))
    with pytest.raises(ValueError, match="eps must be a finite number >= 0"):
        forward(layer, x, cos, cos, a, b, 0, out, norm=np.ones(D, np.float32), eps=-1.0)
    with pytest.raises(ValueError, match="out overlaps x"):
        forward(layer, out, cos, cos, a, b, 0, out, residual=True)
    ro = a.copy()
    ro.flags.writeable = False
    with pytest.raises(TypeError):  # the cache is written: a read-only array is refused
        forward(layer, x, cos, cos, ro, b, 0, out)


def test_fused_block_is_a_custom_op(mla_files):
    runner = local.load(mla_files["v2_lite"], device="cpu")
    check_custom_op(runner, blocks(runner)[0], torch.ops.tandem.mla_forward, torch_ops.run_mla_forward)


def check_custom_op(runner, attn, op, run):
    """An attention block's torch.ops.tandem op (mla_forward / gqa_forward) gives the eager call's numbers
    (run: torch_ops.run_mla_forward / run_gqa_forward), writes only the new rows of its caches, takes
    norm= / residual=, and passes torch's op checks."""
    a, b = runner.model.new_cache(8).layer(0).values()
    x = torch.randn(2, runner.config.hidden_size)
    cos, sin = runner.model.rope.cos_sin(torch.arange(3, 5))
    args = (x, cos, sin, a, b, 3, id(attn.engine_layer))
    eager = run(attn.engine_layer, x, cos, sin, a.clone(), b.clone(), 3)
    assert torch.equal(op(*args), eager)
    assert a[3:5].abs().sum() > 0 and a[5:].abs().sum() == 0
    torch.library.opcheck(op.default, args, test_utils=("test_schema", "test_faketensor"))
    norm = torch.rand(runner.config.hidden_size) + 0.5
    args = args + (norm, 1e-5, True)
    fused = op(*args)
    eager = run(attn.engine_layer, x, cos, sin, a.clone(), b.clone(), 3, norm, 1e-5, residual=True)
    assert torch.equal(fused, eager) and not torch.allclose(fused, x + op(*args[:7]))
    torch.library.opcheck(op.default, args, test_utils=("test_schema", "test_faketensor"))
