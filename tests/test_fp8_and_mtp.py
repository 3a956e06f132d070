"""DeepSeek FP8 checkpoints (e4m3 weights, 128x128 block scales) and MTP layers."""

from __future__ import annotations

import json
import shutil

import numpy as np
import pytest
import torch
import transformers
from safetensors.torch import load_file, save_file

import local
from quant.fp8 import E4M3FN, dequantize_fp8_blocks, quantize_fp8_blocks

from .conftest import VOCAB

FP8_PROJ = ("q_a_proj", "q_b_proj", "kv_a_proj_with_mqa", "kv_b_proj", "o_proj", "gate_proj", "up_proj", "down_proj")


def test_e4m3fn_table_matches_torch():
    want = torch.arange(256, dtype=torch.uint8).view(torch.float8_e4m3fn).float().numpy()
    assert np.array_equal(np.isnan(want), np.isnan(E4M3FN))
    assert np.array_equal(want[~np.isnan(want)], E4M3FN[~np.isnan(E4M3FN)])


@pytest.mark.parametrize("shape", [(128, 128), (200, 300), (5, 129), (1, 1)])
def test_fp8_block_roundtrip(shape):
    w = np.random.default_rng(0).standard_normal(shape).astype(np.float32) * 3
    bits, scale_inv = quantize_fp8_blocks(w)
    assert scale_inv.shape == (-(-shape[0] // 128), -(-shape[1] // 128))
    d = dequantize_fp8_blocks(bits, scale_inv)
    # e4m3 keeps 3 mantissa bits: relative error <= 2^-4 of the block max
    assert np.abs(d - w).max() <= np.abs(w).max() / 16 + 1e-7
    # bit pattern equals torch's own cast of the scaled weight
    scale = np.repeat(np.repeat(scale_inv, 128, 0)[: shape[0]], 128, 1)[:, : shape[1]]
    ref = torch.from_numpy(w / scale).to(torch.float8_e4m3fn).view(torch.uint8).numpy()
    assert np.array_equal(ref, bits)
    with pytest.raises(ValueError, match="weight_scale_inv has shape"):
        dequantize_fp8_blocks(bits, np.ones((9, 9), np.float32))


@pytest.mark.parametrize("shape, block", [((256, 384), (128, 128)), ((300, 200), (128, 128)), ((7, 5), (4, 2))])
def test_fp8_dequantize_is_each_value_times_its_block_scale(shape, block):
    """Every bit pattern (NaNs and subnormals too) times its block's scale, computed the plain way with torch's
    own float8 decoding: the same float32 bits, whole or into a caller's buffer."""
    rng = np.random.default_rng(1)
    bits = rng.integers(0, 256, shape, dtype=np.uint8)
    flat = bits.reshape(-1)
    flat[:min(256, flat.size)] = np.arange(min(256, flat.size), dtype=np.uint8)
    flat[-1] = 0xFF  # a NaN
    scale_inv = rng.random((-(-shape[0] // block[0]), -(-shape[1] // block[1])), dtype=np.float32) * 4
    values = torch.from_numpy(bits).view(torch.float8_e4m3fn).float().numpy()
    scale = np.repeat(np.repeat(scale_inv, block[0], 0)[: shape[0]], block[1], 1)[:, : shape[1]]
    want = values * scale

    def same(got):  # the same floats bit for bit, and NaN where torch has NaN (its payload keeps the sign)
        nan = np.isnan(want)
        return np.array_equal(np.isnan(got), nan) and np.array_equal(got[~nan].view(np.uint32),
                                                                   want[~nan].view(np.uint32))
    assert np.isnan(want).any() and same(dequantize_fp8_blocks(bits, scale_inv, block))
    out = np.full(shape, 7.0, np.float32)
    assert dequantize_fp8_blocks(bits, scale_inv, block, out=out) is out and same(out)
    with pytest.raises(ValueError, match="out is float64"):
        dequantize_fp8_blocks(bits, scale_inv, block, out=np.empty(shape))


@pytest.fixture(scope="module")
def fp8_pair(tmp_path_factory, tokenizer_dir):
    """The same tiny V3 twice: FP8 block-scaled, and those FP8 weights dequantized to fp32."""
    cfg = transformers.DeepseekV3Config(
        vocab_size=VOCAB, hidden_size=160, intermediate_size=320, moe_intermediate_size=96, num_hidden_layers=2,
        num_attention_heads=2, q_lora_rank=144, kv_lora_rank=136, qk_nope_head_dim=32, qk_rope_head_dim=16,
        v_head_dim=32, n_routed_experts=8, num_experts_per_tok=2, n_shared_experts=1, n_group=2, topk_group=1,
        first_k_dense_replace=1, max_position_embeddings=256, initializer_range=0.1, bos_token_id=0, eos_token_id=1,
        rope_parameters=dict(rope_type="default", rope_theta=10000.0))
    torch.manual_seed(0)
    fp32_dir, fp8_dir = tmp_path_factory.mktemp("v3_fp32"), tmp_path_factory.mktemp("v3_fp8")
    transformers.AutoModelForCausalLM.from_config(cfg, dtype=torch.float32).save_pretrained(fp32_dir)
    state = load_file(fp32_dir / "model.safetensors")
    fp8, deq = {}, {}
    for name, t in state.items():
        if name.endswith(".weight") and name.split(".")[-2] in FP8_PROJ:
            bits, scale_inv = quantize_fp8_blocks(t.numpy())
            fp8[name] = torch.from_numpy(bits).view(torch.float8_e4m3fn)
            fp8[name + "_scale_inv"] = torch.from_numpy(scale_inv)
            deq[name] = torch.from_numpy(dequantize_fp8_blocks(bits, scale_inv))
        else:
            fp8[name] = deq[name] = t
    save_file(fp8, fp8_dir / "model.safetensors", metadata={"format": "pt"})
    save_file(deq, fp32_dir / "model.safetensors", metadata={"format": "pt"})
    config = json.loads((fp32_dir / "config.json").read_text())
    config["quantization_config"] = {"quant_method": "fp8", "fmt": "e4m3", "activation_scheme": "dynamic",
                                     "weight_block_size": [128, 128]}
    (fp8_dir / "config.json").write_text(json.dumps(config))
    for d in (fp32_dir, fp8_dir):
        for f in tokenizer_dir.iterdir():
            shutil.copy(f, d / f.name)
    changed = (deq["model.layers.1.mlp.experts.0.up_proj.weight"] != state["model.layers.1.mlp.experts.0.up_proj.weight"])
    assert changed.any()  # FP8 really rounded the weights
    return fp8_dir, fp32_dir


def test_fp8_checkpoint_matches_dequantized(fp8_pair):
    fp8_dir, deq_dir = fp8_pair
    ids = torch.randint(2, VOCAB, (24,), generator=torch.Generator().manual_seed(0))
    got = local.load(fp8_dir, device="cpu", dtype="float32").logits(ids)
    want = local.load(deq_dir, device="cpu", dtype="float32").logits(ids)
    assert (got - want).abs().max().item() <= 1e-5
    ref = transformers.AutoModelForCausalLM.from_pretrained(deq_dir, dtype=torch.float32).eval()
    with torch.no_grad():
        assert (got - ref(ids[None]).logits[0]).abs().max().item() <= 1e-4


def test_fp8_checkpoint_defaults_to_bf16(fp8_pair):
    """In torch an FP8 checkpoint computes in bf16; on the engine its weights are BF16 (F32 when float32 is
    asked for: exactly the dequantized values, test_fp8_checkpoint_matches_dequantized)."""
    from gguf import GGMLQuantizationType as QT

    assert local.load(fp8_pair[0], device="cpu", engine=False).dtype == torch.bfloat16
    runner = local.load(fp8_pair[0], device="cpu")
    view = runner.model.checkpoint
    assert view.tensors["blk.1.ffn_up_exps.weight"].qtype == QT.BF16
    assert view.tensors["blk.0.attn_output.weight"].qtype == QT.BF16
    assert view.tensors["blk.0.attn_norm.weight"].qtype == QT.F32  # stored F32, kept so
    exact = local.load(fp8_pair[0], device="cpu", dtype="float32").model.checkpoint
    assert exact.tensors["blk.1.ffn_up_exps.weight"].qtype == QT.F32
    ids = torch.randint(2, VOCAB, (24,), generator=torch.Generator().manual_seed(0))
    got, want = runner.logits(ids), local.load(fp8_pair[1], device="cpu", dtype="float32").logits(ids)
    assert (got - want).abs().max().item() > 1e-5  # BF16 rounding...
    kl = torch.nn.functional.kl_div(got.log_softmax(-1), want.log_softmax(-1), log_target=True,
                                    reduction="none").sum(-1).mean().item()
    top1 = (got.argmax(-1) == want.argmax(-1)).float().mean().item()
    assert kl <= 0.05 and top1 >= 0.9, (kl, top1)  # ...within test_models' bf16 bounds, not another model


def test_fp8_without_scales_is_refused(fp8_pair, tmp_path):
    d = shutil.copytree(fp8_pair[0], tmp_path / "m")
    state = load_file(d / "model.safetensors")
    del state["model.layers.0.self_attn.o_proj.weight_scale_inv"]
    save_file(state, d / "model.safetensors")
    with pytest.raises(ValueError, match="o_proj.weight.*weight_scale_inv"):
        local.load(d, device="cpu")


def test_mtp_layers_kept_aside(tiny_v3_dir, tmp_path):
    """V3's MTP layer (model.layers.N.*) loads into model.mtp and does not change the logits."""
    d = shutil.copytree(tiny_v3_dir, tmp_path / "m")
    state = load_file(d / "model.safetensors")
    cfg = json.loads((d / "config.json").read_text())
    n = cfg["num_hidden_layers"]
    last = {k: v for k, v in state.items() if k.startswith(f"model.layers.{n - 1}.")}
    for k, v in last.items():
        state[k.replace(f"model.layers.{n - 1}.", f"model.layers.{n}.")] = v.clone()
    D = cfg["hidden_size"]
    for extra, shape in [("enorm.weight", (D,)), ("hnorm.weight", (D,)), ("eh_proj.weight", (D, 2 * D)),
                         ("shared_head.norm.weight", (D,)), ("shared_head.head.weight", (VOCAB, D)),
                         ("embed_tokens.weight", (VOCAB, D))]:
        state[f"model.layers.{n}.{extra}"] = torch.randn(shape)
    save_file(state, d / "model.safetensors")
    cfg["num_nextn_predict_layers"] = 1
    (d / "config.json").write_text(json.dumps(cfg))
    with_mtp = local.load(d, device="cpu", dtype="float32", engine=False)
    assert len(with_mtp.model.model.layers) == n and len(with_mtp.model.mtp) == 1
    assert with_mtp.model.mtp[0].eh_proj.weight.shape == (D, 2 * D)
    ids = torch.arange(2, 30)
    plain = local.load(tiny_v3_dir, device="cpu", dtype="float32", engine=False)
    assert torch.equal(with_mtp.logits(ids), plain.logits(ids))
    # on the engine the MTP layer is left out, as a GGUF's (llama.cpp does not run it either)
    with_mtp = local.load(d, device="cpu", dtype="float32")
    assert len(with_mtp.model.model.layers) == n and not hasattr(with_mtp.model, "mtp")
    assert not any(name.startswith(f"blk.{n}.") for name in with_mtp.model.checkpoint.tensors)
    assert torch.equal(with_mtp.logits(ids), local.load(tiny_v3_dir, device="cpu", dtype="float32").logits(ids))


def test_convert_fp8_checkpoint(fp8_pair, tmp_path):
    """`tandem convert` dequantizes FP8 block-scaled weights: the GGUF equals the dequantized model."""
    from quant.convert import convert

    out = convert(fp8_pair[0], tmp_path / "fp8.gguf", "f32", progress=False)
    ids = torch.randint(2, VOCAB, (24,), generator=torch.Generator().manual_seed(1))
    got = local.load(out, device="cpu").logits(ids)
    want = local.load(fp8_pair[1], device="cpu", dtype="float32").logits(ids)
    assert (got - want).abs().max().item() <= 1e-4


def test_convert_leaves_mtp_out(tiny_v3_dir, tmp_path):
    from quant.convert import convert
    from quant.gguf_file import GGUFModel

    d = shutil.copytree(tiny_v3_dir, tmp_path / "m")
    state = load_file(d / "model.safetensors")
    n = json.loads((d / "config.json").read_text())["num_hidden_layers"]
    state[f"model.layers.{n}.eh_proj.weight"] = torch.randn(64, 128)
    save_file(state, d / "model.safetensors")
    g = GGUFModel(convert(d, tmp_path / "m.gguf", "q8_0", progress=False))
    assert not any(t.startswith(f"blk.{n}.") for t in g.tensors) and g.kv["deepseek2.block_count"] == n


def test_fp8_checkpoint_quantized_as_it_loads(fp8_pair, tmp_path):
    """--quant on an FP8 checkpoint: the FP8 blocks dequantized and quantized again as convert does (the way
    to run DeepSeek-V3's official weights quantized without a BF16 copy on disk)."""
    import offload
    from quant.convert import convert

    out = convert(fp8_pair[0], tmp_path / "fp8-q8_0.gguf", "q8_0", progress=False, quantizer=offload.quantize)
    ids = torch.randint(2, VOCAB, (24,), generator=torch.Generator().manual_seed(2))
    got = local.load(fp8_pair[0], device="cpu", quant="q8_0").logits(ids)
    assert torch.equal(got, local.load(out, device="cpu").logits(ids))
