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
from local.models.mla import MLAttention
from offload import torch_ops
from quant.convert import convert

from .conftest import build_reference
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
    model = runner.model
    assert all(a.engine_layer is not None for a in blocks(runner)), "every MLA block should be one engine call"
    attn = blocks(runner)[1]
    e = torch_ops.engine()
    default_isa = e.isa
    try:
        for isa in ISAS:
            e.isa = isa
            for T, start in ((1, 0), (1, 21), (2, 21), (7, 40), (33, 0)):
                x = torch.randn(T, model.config.hidden_size, generator=torch.Generator().manual_seed(T + start))
                cos_sin = model.rope.cos_sin(torch.arange(start, start + T))
                fused_cache, plain_cache = fill_cache(runner, start, dtype), fill_cache(runner, start, dtype)
                with torch.inference_mode():
                    got = attn(x, model.rope, cos_sin, fused_cache, start)
                    layer, attn.engine_layer = attn.engine_layer, None
                    try:
                        want = attn(x, model.rope, cos_sin, plain_cache, start)
                    finally:
                        attn.engine_layer = layer
                # the latent norm sums in another order: a last-bit change can move one Q8 rounding of
                # W_UV's input by a step, so the block agrees to ~1e-4 (T=1 agrees exactly here)
                rel = ((got - want).norm() / want.norm()).item()
                assert rel <= 1e-3, (isa, T, start, rel)
                for stream in ("c_kv", "k_pe"):
                    a = fused_cache.buffers[stream][attn.layer_idx, :start + T].float()
                    b = plain_cache.buffers[stream][attn.layer_idx, :start + T].float()
                    ulp = 1e-6 if dtype == torch.float32 else (2 ** -10 if dtype == torch.float16 else 2 ** -7)
                    assert torch.allclose(a, b, rtol=ulp, atol=ulp), (isa, stream, (a - b).abs().max())
                    assert fused_cache.buffers[stream][attn.layer_idx, start + T:].abs().max() == 0  # no stray rows
    finally:
        e.isa = default_isa


@pytest.mark.parametrize("name", ["v2_lite", "v3"])
def test_fused_model_agrees_with_llama_cpp(mla_files, name):
    """The same bar as test_gguf's Q8_0 test (KL <= 1e-3, top-1 >= 99% off near-ties), now with every MLA
    weight on the engine; and greedy decoding gives the op-by-op path's tokens."""
    path = mla_files[name]
    runner = local.load(path, device="cpu", kv_cache_dtype="float16")
    assert all(a.engine_layer is not None for a in blocks(runner))
    agree, _, ties = agreement_with_llama_cpp(runner, path, 3)
    assert agree >= 0.99 and ties <= 0.15 * 3 * N_TOKENS, (agree, ties)

    params = local.SamplingParams(max_tokens=16, temperature=0, ignore_eos=True)
    fused = [ev.token_id for ev in runner.generate(seq(7)[:8], params) if ev.token_id is not None]
    for a in blocks(runner):
        a.engine_layer = None
    plain = [ev.token_id for ev in runner.generate(seq(7)[:8], params) if ev.token_id is not None]
    assert fused == plain and len(fused) == 16


def test_fused_block_checks_its_inputs(mla_files):
    runner = local.load(mla_files["v3"], device="cpu")
    attn = blocks(runner)[0]
    e = torch_ops.engine()._engine
    D = runner.config.hidden_size
    cache = runner.model.new_cache(8).layer(0)
    c_kv, k_pe = cache["c_kv"].numpy(), cache["k_pe"].numpy()
    cos = np.zeros((1, 8), np.float32)
    out = np.empty((1, D), np.float32)
    x = np.zeros((1, D), np.float32)
    with pytest.raises(ValueError, match="reserve the cache"):
        e.mla_forward(attn.engine_layer, x, cos, cos, c_kv, k_pe, 8, out)
    with pytest.raises(ValueError, match=f"x must be float32 \\[tokens, {D}\\]"):
        e.mla_forward(attn.engine_layer, np.zeros((1, D + 1), np.float32), cos, cos, c_kv, k_pe, 0, out)
    with pytest.raises(ValueError, match="cos must have shape"):
        e.mla_forward(attn.engine_layer, x, np.zeros((1, 4), np.float32), cos, c_kv, k_pe, 0, out)
    with pytest.raises(ValueError, match="c_kv must be"):
        e.mla_forward(attn.engine_layer, x, cos, cos, k_pe, k_pe, 0, out)
    with pytest.raises(ValueError, match="share a dtype"):
        e.mla_forward(attn.engine_layer, x, cos, cos, c_kv, k_pe.astype(np.float16), 0, out)
    ro = c_kv.copy()
    ro.flags.writeable = False
    with pytest.raises(TypeError):  # the cache is written: a read-only array is refused
        e.mla_forward(attn.engine_layer, x, cos, cos, ro, k_pe, 0, out)

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


def test_fused_block_is_a_custom_op(mla_files):
    runner = local.load(mla_files["v2_lite"], device="cpu")
    attn = blocks(runner)[0]
    cache = runner.model.new_cache(8).layer(0)
    x = torch.randn(2, runner.config.hidden_size)
    cos, sin = runner.model.rope.cos_sin(torch.arange(3, 5))
    args = (x, cos, sin, cache["c_kv"], cache["k_pe"], 3, id(attn.engine_layer))
    eager = torch_ops.run_mla_forward(attn.engine_layer, x, cos, sin, cache["c_kv"].clone(), cache["k_pe"].clone(), 3)
    assert torch.equal(torch.ops.tandem.mla_forward(*args), eager)
    assert cache["c_kv"][3:5].abs().sum() > 0 and cache["c_kv"][5:].abs().sum() == 0
    torch.library.opcheck(torch.ops.tandem.mla_forward.default, args, test_utils=("test_schema", "test_faketensor"))
