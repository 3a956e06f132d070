"""The engine's fused grouped-query attention block (offload/csrc/gqa.h, Qwen3-MoE): one call per layer for
the q/k/v projections, the per-head q/k norms, rope, the cache write, the attention over every KV head
and the output projection. It must give the op-by-op path's numbers (torch attention around the engine's
linears) and llama.cpp's logits on the same file; its attention core must match the formula."""

from __future__ import annotations

import numpy as np
import pytest
import torch

import local
import offload
from local.models import deepseek_v2, qwen3_moe
from local.models.layers import quantize_activation
from local.models.mla import attention_mask, cache_precision
from local.models.moe import MoE
from local.models.qwen3_moe import GQAttention
from offload import torch_ops
from offload.engine import CpuEngine
from quant.convert import convert

from .conftest import build_reference
from .test_gguf import seq
from .test_mla_engine import (MLA_DIMS, check_block_inputs, check_custom_op, check_fused_block, check_fused_model,
                              check_pre_norm_block, norms_fused_and_op_by_op, plain)

ISAS = offload.supported_isas()
# qwen3moe GGUF files are MoE in every layer; "wide" has 3 query heads per KV head and 64-dim heads
MODELS = {"qwen3": {"mlp_only_layers": [], "num_experts": 16, "initializer_range": 0.05},
          "wide": {"mlp_only_layers": [], "num_experts": 16, "initializer_range": 0.05, "head_dim": 64,
                   "num_attention_heads": 6, "num_key_value_heads": 2}}


@pytest.fixture(scope="module")
def gqa_files(tmp_path_factory, tokenizer_dir):
    """name -> Q8_0 GGUF of a small Qwen3-MoE."""
    out = {}
    for name, overrides in MODELS.items():
        d = tmp_path_factory.mktemp(f"hf_gqa_{name}")
        build_reference("qwen3_norm", d, tokenizer_dir, seed=6, overrides=overrides)
        out[name] = convert(d, tmp_path_factory.mktemp("gguf_gqa") / f"{name}-q8_0.gguf", "q8_0", progress=False)
    return out


@pytest.fixture(scope="module")
def mla_file(tmp_path_factory, tokenizer_dir):
    """A Q8_0 GGUF of a small DeepSeek-V3 whose MLA weights all run on the engine (head dims of 32)."""
    d = tmp_path_factory.mktemp("hf_gqa_mla")
    build_reference("v3", d, tokenizer_dir, seed=4, overrides={**MLA_DIMS, "q_lora_rank": 64})
    return convert(d, tmp_path_factory.mktemp("gguf_gqa_mla") / "v3-q8_0.gguf", "q8_0", progress=False)


def blocks(runner) -> list[GQAttention]:
    return [m for m in runner.model.modules() if isinstance(m, GQAttention)]


def fill_cache(runner, start: int, dtype, capacity: int = 64):
    cache = runner.model.new_cache(capacity, dtype=dtype)
    g = torch.Generator().manual_seed(start)
    for buf in cache.buffers.values():
        buf[:, :start] = torch.randn(buf[:, :start].shape, generator=g).to(dtype)
    return cache


# ---------------------------------------------------------------- the attention core

def check_gqa_attention(isa, dtype, T, S, H, G, Dh, scale):
    g = torch.Generator().manual_seed(T * 1000 + S + H)
    q = torch.randn(H, T, Dh, generator=g)
    k, v = (torch.randn(S, G, Dh, generator=g).to(dtype) for _ in range(2))
    out = np.full((H, T, Dh), np.nan, dtype=np.float32)
    CpuEngine(threads=2)._engine.gqa_attention(q.numpy(), k, v, scale, out, isa)
    low = cache_precision(dtype, torch.float32)
    rep = H // G  # query head h reads KV head h // rep, as HF's repeat_kv
    kd, vd = (t.double().transpose(0, 1).repeat_interleave(rep, 0) for t in (k, v))  # [H, S, Dh]
    scores = quantize_activation(q, low).double() @ kd.transpose(1, 2) * scale + attention_mask(T, S, "cpu").double()
    p = quantize_activation(torch.softmax(scores, -1).float(), low).double()
    want = (p @ vd).numpy()
    assert np.abs(out - want).max() <= 1e-5 * np.abs(want).max() + 1e-5 + (2e-3 if low else 0)


@pytest.mark.parametrize("isa", ISAS)
@pytest.mark.parametrize("dtype", [torch.float32, torch.float16, torch.bfloat16])
@pytest.mark.parametrize("T,S", [(1, 1), (1, 37), (3, 3), (9, 40), (33, 300)])
@pytest.mark.parametrize("H,G,Dh", [(4, 2, 24), (6, 2, 128), (8, 8, 64), (8, 1, 72), (10, 2, 112)])
def test_gqa_attention(isa, dtype, T, S, H, G, Dh):
    """Every KV head against its own query heads (grouped, one, or all: MHA and MQA); head dims that are
    and are not whole SIMD vectors; the new tokens in one tile and several; positions in several slabs. Five
    heads a KV head of 7 vectors (AVX-512; 14 at AVX2): the span kernels' tiles of 4 query rows and 4 vectors
    with 1-3 rows and 3 vectors left, and rows of a tile that see further than the others."""
    check_gqa_attention(isa, dtype, T, S, H, G, Dh, scale=Dh ** -0.5)


@pytest.mark.parametrize("isa", ISAS)
@pytest.mark.parametrize("dtype", [torch.float32, torch.float16, torch.bfloat16])
@pytest.mark.parametrize("kind", ["gqa", "mla"])
def test_attention_tile_rows_match_one_token_calls(isa, dtype, kind):
    """Each new token of a tile gives the same floats as a one-token call at its position: the span kernels
    take a KV head's rows four at a time however far each sees (the rows of a group that see further finish
    on their own, the bf16 mix's from the last whole pair of positions the group saw), summing every output
    in the order a row on its own would. 4 heads a KV head (12 for MLA: 12 and 84 rows, no tile of 1 or 2
    rows, which matmul_rows sums over more accumulators), 7 tokens ending at positions 69..75 (odd and even
    counts, in one block of the mix and across two), 7 vectors a row at AVX-512."""
    H, T, S, D = 12, 7, 75, 112
    g = torch.Generator().manual_seed(11)
    q = torch.randn(H, T, D, generator=g).numpy()
    e = CpuEngine(threads=2)._engine
    q_pe = torch.randn(H, T, 16, generator=g).numpy()
    if kind == "gqa":
        k, v = (torch.randn(S, 3, D, generator=g).to(dtype) for _ in range(2))
        call = lambda t0, t1, out: e.gqa_attention(np.ascontiguousarray(q[:, t0:t1]), k[:S - T + t1],
                                                   v[:S - T + t1], 0.09, out, isa)
    else:
        c, pe = torch.randn(S, D, generator=g).to(dtype), torch.randn(S, 16, generator=g).to(dtype)
        call = lambda t0, t1, out: e.mla_attention(np.ascontiguousarray(q[:, t0:t1]),
                                                   np.ascontiguousarray(q_pe[:, t0:t1]), c[:S - T + t1],
                                                   pe[:S - T + t1], 0.09, out, isa)
    out = np.empty((H, T, D), np.float32)
    call(0, T, out)
    for t in range(T):
        one = np.empty((H, 1, D), np.float32)
        call(t, t + 1, one)
        assert np.array_equal(one[:, 0], out[:, t]), f"token {t}"


@pytest.mark.parametrize("isa", ISAS)
def test_gqa_attention_long_context(isa):
    """Qwen3-30B-A3B's heads (32 over 4 KV heads of 128) at 1500 positions: many slabs and mix blocks a head."""
    check_gqa_attention(isa, torch.bfloat16, 2, 1500, 32, 4, 128, scale=128 ** -0.5)


def test_gqa_attention_checks_shapes():
    e = CpuEngine(threads=1)._engine
    k = np.zeros((5, 1, 32), np.float32)
    with pytest.raises(ValueError, match="at least one head"):  # crashed
        e.gqa_attention(np.zeros((0, 2, 32), np.float32), k, k, 0.1, np.zeros((0, 2, 32), np.float32))
    q = np.zeros((4, 1, 8), np.float32)
    kv = np.zeros((3, 2, 8), np.float32)
    with pytest.raises(ValueError, match="k and v must be \\[positions, kv_heads, head_dim\\]"):
        e.gqa_attention(q, np.zeros((3, 2, 9), np.float32), kv, 1.0, np.zeros_like(q))
    with pytest.raises(ValueError, match="multiple of the cache's kv_heads"):
        e.gqa_attention(np.zeros((3, 1, 8), np.float32), kv, kv, 1.0, np.zeros((3, 1, 8), np.float32))
    with pytest.raises(ValueError, match="share a dtype"):
        e.gqa_attention(q, kv, kv.astype(np.float16), 1.0, np.zeros_like(q))
    with pytest.raises(ValueError, match="fewer positions than there are new tokens"):
        e.gqa_attention(np.zeros((4, 4, 8), np.float32), kv, kv, 1.0, np.zeros((4, 4, 8), np.float32))
    with pytest.raises(ValueError, match="float32, float16 or bfloat16"):
        e.gqa_attention(q, kv.astype(np.float64), kv.astype(np.float64), 1.0, np.zeros_like(q))


# ---------------------------------------------------------------- the fused block

@pytest.mark.parametrize("name", list(MODELS))
@pytest.mark.parametrize("dtype", [torch.float32, torch.float16, torch.bfloat16])
@pytest.mark.parametrize("threads", [1, 2])
def test_fused_block_matches_the_op_by_op_path(gqa_files, name, dtype, threads):
    runner = local.load(gqa_files[name], device="cpu", threads=threads)
    assert all(a.engine_layer is not None for a in blocks(runner)), "every GQA block should be one engine call"
    # the per-head norms sum in another order: a last-bit change can move a Q8 rounding of o_proj's input by
    # a step
    check_fused_block(runner, blocks(runner)[1], dtype, ((1, 0), (1, 21), (2, 21), (9, 40), (33, 0)), f32_ulp=1e-5)


@pytest.mark.parametrize("name", list(MODELS))
def test_fused_model_agrees_with_llama_cpp(gqa_files, name):
    """test_gguf's Q8_0 bar (KL <= 1e-3, top-1 >= 99% off near-ties) with every attention block one engine
    call; and greedy decoding gives the op-by-op path's tokens."""
    check_fused_model(gqa_files[name], blocks)


def test_pre_norm_block_adds_the_block_of_the_normed_input(gqa_files):
    """norm= / residual=: a decoder layer's `x + attn(rmsnorm(x) * w)` in the one call; the cache gets the
    normed input's keys and values."""
    runner = local.load(gqa_files["wide"], device="cpu", threads=2)
    check_pre_norm_block(runner, blocks(runner)[1], torch_ops.engine()._engine.gqa_forward, fill_cache)


def test_a_block_without_per_head_norms(gqa_files):
    """q_norm / k_norm None (a GQA model without Qwen3's per-head norms): the block is the op-by-op one with
    those norms left out."""
    runner = local.load(gqa_files["wide"], device="cpu")
    model, attn = runner.model, blocks(runner)[0]
    weights = (attn.q_proj.engine_weight, attn.k_proj.engine_weight, attn.v_proj.engine_weight,
               attn.o_proj.engine_weight)
    bare = torch_ops.gqa_layer(runner.config.hidden_size, attn.n_heads, attn.n_kv, attn.head_dim, *weights, None, None,
                               1e-6, attn.scale, False)
    T, start = 3, 5
    x = torch.randn(T, runner.config.hidden_size, generator=torch.Generator().manual_seed(2))
    cos_sin = model.rope.cos_sin(torch.arange(start, start + T))
    fused_cache, plain_cache = fill_cache(runner, start, torch.float32), fill_cache(runner, start, torch.float32)
    buf = fused_cache.layer(attn.layer_idx)
    got = torch_ops.run_gqa_forward(bare, x, *cos_sin, buf["k"], buf["v"], start)
    norms = attn.q_norm, attn.k_norm
    attn.q_norm = attn.k_norm = torch.nn.Identity()
    try:
        with torch.inference_mode():
            want = plain(attn, x, model.rope, cos_sin, plain_cache, start)
    finally:
        attn.q_norm, attn.k_norm = norms
    assert ((got - want).norm() / want.norm()).item() <= 1e-3
    with torch.inference_mode():
        normed = plain(attn, x, model.rope, cos_sin, fill_cache(runner, start, torch.float32), start)
    assert ((got - normed).norm() / normed.norm()).item() > 1e-2  # the norms do matter in this model


def test_decoder_layers_are_two_engine_calls(gqa_files, monkeypatch):
    """On the engine a Qwen3-MoE decoder layer is `h = x + attn(norm(x))` and `h + moe(norm(h))`, each block
    with its norm and residual inside one engine call (every layer in one, layers.EngineStack), and the final
    norm runs inside the output head's call: no torch norm runs, and the logits are those of the layer written
    out op by op."""
    runner = local.load(gqa_files["qwen3"], device="cpu")
    layers = runner.model.model.layers
    assert all(isinstance(layer.mlp, MoE) and layer.mlp.engine_layer is not None for layer in layers)
    counts = norms_fused_and_op_by_op(runner, qwen3_moe.DecoderLayer, plain, monkeypatch)
    # op by op: the two layer norms and the q and k norms of every layer (the final norm in the head's call)
    assert counts == (0, 4 * len(layers))


def test_output_head_runs_the_final_norm(gqa_files):
    """lm_head(x, pre_norm=norm) on the engine: the final RMSNorm inside the head's engine call, as lm_head(norm(x))
    in torch (the two norms sum in other orders: a last-bit change can move a Q8 rounding), and through torch
    where the engine cannot take it (a float64 x)."""
    runner = local.load(gqa_files["qwen3"], device="cpu")
    head, norm = runner.model.lm_head, runner.model.model.norm
    assert head.engine_weight is not None
    x = 3 * torch.randn(3, runner.config.hidden_size, generator=torch.Generator().manual_seed(0))
    with torch.inference_mode():
        fused, plain = head(x, pre_norm=norm), head(norm(x))
        through_torch = head(x.double(), pre_norm=norm)
    assert ((fused - plain).norm() / plain.norm()).item() <= 1e-3
    assert torch.equal(fused.argmax(-1), plain.argmax(-1))
    assert through_torch.dtype == torch.float64 and torch.allclose(through_torch.float(), plain, rtol=1e-3, atol=1e-3)


def test_fused_block_checks_its_inputs(gqa_files):
    runner = local.load(gqa_files["wide"], device="cpu")
    attn = blocks(runner)[0]
    e = torch_ops.engine()._engine
    D = runner.config.hidden_size
    check_block_inputs(runner, attn, e.gqa_forward, rope_half=32)
    k, v = (a.numpy() for a in runner.model.new_cache(8).layer(0).values())
    cos, out, x = np.zeros((1, 32), np.float32), np.empty((1, D), np.float32), np.zeros((1, D), np.float32)
    with pytest.raises(ValueError, match="k_cache and v_cache must be C-contiguous \\[positions, 2, 64\\]"):
        e.gqa_forward(attn.engine_layer, x, cos, cos, k.reshape(8, 4, 32), v, 0, out)

    ws = {n: (getattr(attn, f"{n}_proj").engine_weight.data, getattr(attn, f"{n}_proj").engine_weight.type_id)
          for n in "qkvo"}
    args = dict(hidden=D, heads=6, kv_heads=2, head_dim=64, **ws, q_norm=np.ones(64, np.float32),
                k_norm=np.ones(64, np.float32), eps=1e-6, scale=0.125)
    offload._C.GqaLayer(**args)  # as the loader builds it
    with pytest.raises(ValueError, match="come together"):
        offload._C.GqaLayer(**{**args, "k_norm": None})
    with pytest.raises(ValueError, match="q_norm must be float32 \\[64\\]"):
        offload._C.GqaLayer(**{**args, "q_norm": np.ones(32, np.float32)})
    with pytest.raises(ValueError, match="heads \\(6\\) must be a multiple of kv_heads \\(4\\)"):
        offload._C.GqaLayer(**{**args, "kv_heads": 4})
    with pytest.raises(ValueError, match="k must be one matrix of 192 rows"):  # 3 KV heads x 64 rows asked
        offload._C.GqaLayer(**{**args, "kv_heads": 3})
    with pytest.raises(ValueError, match="head dim even"):
        offload._C.GqaLayer(**{**args, "head_dim": 63})
    with pytest.raises(ValueError, match="scale must be a finite number"):  # gave all-zero outputs
        offload._C.GqaLayer(**{**args, "scale": float("nan")})
    with pytest.raises(ValueError, match="dimensions must be at most 1048576"):  # heads x head_dim wrapped to 0
        offload._C.GqaLayer(**{**args, "heads": 2**62, "kv_heads": 1, "head_dim": 4})


def test_fused_block_is_a_custom_op(gqa_files):
    runner = local.load(gqa_files["qwen3"], device="cpu")
    check_custom_op(runner, blocks(runner)[0], torch.ops.tandem.gqa_forward, torch_ops.run_gqa_forward)


@pytest.mark.parametrize("which", ["qwen3", "mla"])
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])  # bf16 caches reach it as tensors, not numpy
def test_decoder_layers_run_as_one_engine_call(gqa_files, mla_file, which, dtype, monkeypatch):
    """The runs of decoder layers whose blocks are each one engine call go through the engine as one call
    (layers.EngineStack): the same numbers, bit for bit, as the blocks' own forwards, the cache written
    alike as it grows past its first capacity (the engine's views follow the new buffers), the routing
    counted alike; and a hooked block (the bench's stage breakdown) makes its run go through the modules."""
    runner = local.load(gqa_files["qwen3"] if which == "qwen3" else mla_file, device="cpu")
    model = runner.model
    layers = model.model.layers
    moes = [layer.mlp for layer in layers if isinstance(layer.mlp, MoE)]
    first = 0 if which == "qwen3" else 2  # the V3 model's first two layers are dense
    assert {i: len(s) for i, s in model.engine_stacks.items()} == {first: len(layers) - first}
    calls = []
    real = torch_ops.run_decoder_stack
    monkeypatch.setattr(torch_ops, "run_decoder_stack", lambda *a: calls.append(1) or real(*a))

    def run():
        for m in moes:
            m.expert_counts = torch.zeros(len(m.experts), dtype=torch.int64)
        cache = model.new_cache(4, dtype=dtype)  # grows twice below
        ids = seq(3)[:12]
        with torch.inference_mode():
            out = [model(torch.tensor(ids[:3]), cache)]
            out += [model(torch.tensor([i]), cache) for i in ids[3:]]
        assert cache.capacity >= 12
        return out, {n: b[:, :12].clone() for n, b in cache.buffers.items()}, [m.expert_counts.clone() for m in moes]

    stacked = run()
    assert len(calls) == 10  # one call a step
    stacks = model.engine_stacks
    model.engine_stacks = {}
    try:
        plain = run()
    finally:
        model.engine_stacks = stacks
    assert len(calls) == 10
    for a, b in zip(stacked[0], plain[0]):
        assert torch.equal(a, b)
    for n in stacked[1]:
        assert torch.equal(stacked[1][n], plain[1][n]), n
    for a, b in zip(stacked[2], plain[2]):
        assert torch.equal(a, b) and a.sum() > 0

    for handle in (layers[-1].self_attn.register_forward_hook(lambda *a: None),
                   torch.nn.modules.module.register_module_forward_hook(lambda *a: None)):  # a hook on every module
        try:
            run()
        finally:
            handle.remove()
        assert len(calls) == 10
    run()
    assert len(calls) == 20  # hooks gone, one call a step again


def test_decoder_stack_checks_its_inputs(gqa_files):
    runner = local.load(gqa_files["wide"], device="cpu")
    model = runner.model
    stack = model.engine_stacks[0]
    attn, moe = stack.bound[0]
    D, n = runner.config.hidden_size, len(stack)
    cache = model.new_cache(8)
    caches = [a.engine_cache(cache) for _, a, _ in stack.blocks]
    e = torch_ops.engine()._engine
    x, cos = np.zeros((1, D), np.float32), np.zeros((1, 32), np.float32)
    k = stack.top_k
    out, ids, w = np.empty((1, D), np.float32), np.empty((n, 1, k), np.int64), np.empty((n, 1, k), np.float32)
    e.decoder_stack(stack.stack, x, cos, cos, [c[0] for c in caches], [c[1] for c in caches], 0, out, ids, w)
    with pytest.raises(ValueError, match=f"one array per layer \\({n}\\)"):
        e.decoder_stack(stack.stack, x, cos, cos, [c[0] for c in caches[1:]], [c[1] for c in caches], 0, out, ids, w)
    with pytest.raises(ValueError, match="reserve the cache"):
        e.decoder_stack(stack.stack, x, cos, cos, [c[0] for c in caches], [c[1] for c in caches], 8, out, ids, w)
    with pytest.raises(ValueError, match="k_cache and v_cache must be C-contiguous"):
        e.decoder_stack(stack.stack, x, cos, cos, [c[1].reshape(8, 4, 32) for c in caches], [c[1] for c in caches], 0,
                        out, ids, w)
    with pytest.raises(ValueError, match="ids must have shape"):
        e.decoder_stack(stack.stack, x, cos, cos, [c[0] for c in caches], [c[1] for c in caches], 0, out, ids[:1], w)
    with pytest.raises(ValueError, match="out overlaps x"):
        e.decoder_stack(stack.stack, out, cos, cos, [c[0] for c in caches], [c[1] for c in caches], 0, out, ids, w)
    norm = np.ones(D, np.float32)
    offload._C.DecoderStack([attn], [moe], [norm], [1e-6], [norm], [1e-6])  # one layer
    with pytest.raises(ValueError, match="one entry per layer"):
        offload._C.DecoderStack([attn, attn], [moe], [norm], [1e-6], [norm], [1e-6])
    with pytest.raises(ValueError, match="layer 0: attn must be an MlaLayer or a GqaLayer"):
        offload._C.DecoderStack([moe], [moe], [norm], [1e-6], [norm], [1e-6])
    with pytest.raises(ValueError, match="layer 0: moe must be a MoeLayer"):
        offload._C.DecoderStack([attn], [attn], [norm], [1e-6], [norm], [1e-6])
    with pytest.raises(ValueError, match=f"norm1 must be float32 \\[{D}\\]"):
        offload._C.DecoderStack([attn], [moe], [norm[1:]], [1e-6], [norm], [1e-6])
    with pytest.raises(ValueError, match="eps must be a finite number"):
        offload._C.DecoderStack([attn], [moe], [norm], [float("nan")], [norm], [1e-6])
