"""`quant.recipes` picks the same ggml type for every tensor as llama.cpp's `llama-quantize`.

Small random F32 GGUF files for `deepseek2` and `qwen3moe` (realistic names, ragged and 256-aligned rows,
enough layers for the use_more_bits pattern) are quantized by llama.cpp itself through
`llama_cpp.llama_model_quantize`; the types it wrote are compared with `llama_cpp_types` / `plan_types`.
The rule tests at the end need no llama_cpp and use the real V2-Lite / V3 / Qwen3-30B-A3B shapes.
"""

from __future__ import annotations

import ctypes

import numpy as np
import pytest
from gguf import GGMLQuantizationType as QT
from gguf import GGUFReader, GGUFWriter, LlamaFileType

from quant.recipes import RECIPES, file_type, llama_cpp_types, plan_types

Shape = tuple[int, ...]

# ---- tiny models: (name, ne) lists in the order a converter writes them -------------------------


def _qwen3moe(n_layer, n_embd, n_head, n_head_kv, head_dim, n_expert, n_ff_exp, n_vocab, tied):
    t: list[tuple[str, Shape]] = [("token_embd.weight", (n_embd, n_vocab))]
    for i in range(n_layer):
        b = f"blk.{i}."
        t += [(b + "attn_norm.weight", (n_embd,)),
              (b + "attn_q.weight", (n_embd, n_head * head_dim)),
              (b + "attn_k.weight", (n_embd, n_head_kv * head_dim)),
              (b + "attn_v.weight", (n_embd, n_head_kv * head_dim)),
              (b + "attn_q_norm.weight", (head_dim,)),
              (b + "attn_k_norm.weight", (head_dim,)),
              (b + "attn_output.weight", (n_head * head_dim, n_embd)),
              (b + "ffn_norm.weight", (n_embd,)),
              (b + "ffn_gate_inp.weight", (n_embd, n_expert)),
              (b + "ffn_gate_exps.weight", (n_embd, n_ff_exp, n_expert)),
              (b + "ffn_up_exps.weight", (n_embd, n_ff_exp, n_expert)),
              (b + "ffn_down_exps.weight", (n_ff_exp, n_embd, n_expert))]
    t.append(("output_norm.weight", (n_embd,)))
    if not tied:
        t.append(("output.weight", (n_embd, n_vocab)))
    kv = dict(block_count=n_layer, context_length=512, embedding_length=n_embd, feed_forward_length=0,
              expert_feed_forward_length=n_ff_exp, expert_count=n_expert, expert_used_count=2,
              **{"attention.head_count": n_head, "attention.head_count_kv": n_head_kv,
                 "attention.key_length": head_dim, "attention.value_length": head_dim,
                 "rope.freq_base": 1e6, "attention.layer_norm_rms_epsilon": 1e-6})
    return t, kv


def _deepseek2(n_layer, n_dense, n_embd, n_head, q_lora, kv_lora, nope, rope, v_head, n_ff, n_expert, n_ff_exp,
               n_shared, n_vocab, mla, exp_probs_b):
    t: list[tuple[str, Shape]] = [("token_embd.weight", (n_embd, n_vocab))]
    for i in range(n_layer):
        b = f"blk.{i}."
        t.append((b + "attn_norm.weight", (n_embd,)))
        if q_lora:
            t += [(b + "attn_q_a.weight", (n_embd, q_lora)), (b + "attn_q_a_norm.weight", (q_lora,)),
                  (b + "attn_q_b.weight", (q_lora, n_head * (nope + rope)))]
        else:
            t.append((b + "attn_q.weight", (n_embd, n_head * (nope + rope))))
        t += [(b + "attn_kv_a_mqa.weight", (n_embd, kv_lora + rope)), (b + "attn_kv_a_norm.weight", (kv_lora,))]
        if mla:  # kv_b_proj split as the current converter does: k_b transposed per head
            t += [(b + "attn_k_b.weight", (nope, kv_lora, n_head)), (b + "attn_v_b.weight", (kv_lora, v_head, n_head))]
        else:
            t.append((b + "attn_kv_b.weight", (kv_lora, n_head * (nope + v_head))))
        t += [(b + "attn_output.weight", (n_head * v_head, n_embd)), (b + "ffn_norm.weight", (n_embd,))]
        if i < n_dense:
            t += [(b + "ffn_gate.weight", (n_embd, n_ff)), (b + "ffn_up.weight", (n_embd, n_ff)),
                  (b + "ffn_down.weight", (n_ff, n_embd))]
            continue
        t.append((b + "ffn_gate_inp.weight", (n_embd, n_expert)))
        if exp_probs_b:
            t.append((b + "exp_probs_b.bias", (n_expert,)))
        t += [(b + "ffn_gate_exps.weight", (n_embd, n_ff_exp, n_expert)),
              (b + "ffn_up_exps.weight", (n_embd, n_ff_exp, n_expert)),
              (b + "ffn_down_exps.weight", (n_ff_exp, n_embd, n_expert)),
              (b + "ffn_gate_shexp.weight", (n_embd, n_ff_exp * n_shared)),
              (b + "ffn_up_shexp.weight", (n_embd, n_ff_exp * n_shared)),
              (b + "ffn_down_shexp.weight", (n_ff_exp * n_shared, n_embd))]
    t += [("output_norm.weight", (n_embd,)), ("output.weight", (n_embd, n_vocab))]
    kv = dict(block_count=n_layer, context_length=512, embedding_length=n_embd, feed_forward_length=n_ff,
              leading_dense_block_count=n_dense, expert_feed_forward_length=n_ff_exp, expert_count=n_expert,
              expert_used_count=2, expert_shared_count=n_shared, expert_weights_scale=1.0,
              **{"attention.head_count": n_head, "attention.head_count_kv": 1 if mla else n_head,
                 "attention.q_lora_rank": q_lora, "attention.kv_lora_rank": kv_lora,
                 "attention.key_length": kv_lora + rope if mla else nope + rope,
                 "attention.value_length": kv_lora if mla else v_head,
                 "rope.dimension_count": rope, "rope.freq_base": 1e4, "attention.layer_norm_rms_epsilon": 1e-6})
    if mla:
        kv.update({"attention.key_length_mla": nope + rope, "attention.value_length_mla": v_head})
    return t, kv


MODELS = {
    # every row a multiple of 256 (q5_k_m is writable), tied embeddings (token_embd is treated as output)
    "qwen3moe": ("qwen3moe", _qwen3moe(n_layer=10, n_embd=256, n_head=4, n_head_kv=2, head_dim=64, n_expert=4,
                                       n_ff_exp=256, n_vocab=64, tied=True)),
    # 8 experts (llama.cpp's Mixtral special cases), tied embeddings, n_embd 160 (ragged, a multiple of 32),
    # expert rows of 80 (not even a multiple of 32: F16)
    "qwen3moe_8x": ("qwen3moe", _qwen3moe(n_layer=9, n_embd=160, n_head=4, n_head_kv=2, head_dim=32, n_expert=8,
                                          n_ff_exp=80, n_vocab=64, tied=True)),
    # V2-Lite-like: no q LoRA, MLA split (attn_k_b rows = qk_nope), ragged dense/expert/shared rows
    # (10944 / 1408 / 2816 scaled to 160 / 96 / 192)
    "deepseek2_lite": ("deepseek2", _deepseek2(n_layer=10, n_dense=1, n_embd=256, n_head=4, q_lora=0, kv_lora=256,
                                               nope=32, rope=16, v_head=32, n_ff=160, n_expert=4, n_ff_exp=96,
                                               n_shared=2, n_vocab=64, mla=True, exp_probs_b=False)),
    # V3-like legacy file (attn_kv_b, no k_b/v_b): q LoRA, exp_probs_b, 12 layers, every row a multiple of 256
    "deepseek2_v3_kvb": ("deepseek2", _deepseek2(n_layer=12, n_dense=2, n_embd=256, n_head=2, q_lora=256,
                                                 kv_lora=256, nope=96, rope=32, v_head=128, n_ff=256, n_expert=4,
                                                 n_ff_exp=256, n_shared=1, n_vocab=64, mla=False, exp_probs_b=True)),
}

# llama.cpp puts Q5_1 (Q5_K's fallback for rows that are not a multiple of 256) in these. q4_k_m too
# gives Q5_1 with exactly 8 experts: attn_output is raised to Q5_K there, and its rows
# (n_head * head_dim = 128) do not fit Q5_K.
NEEDS_Q5_1 = {("qwen3moe_8x", "q5_k_m"), ("qwen3moe_8x", "q4_k_m"), ("deepseek2_lite", "q5_k_m")}


def _hparams(kv: dict) -> dict:
    return dict(n_layer=kv["block_count"], n_expert=kv["expert_count"], n_head=kv["attention.head_count"],
                n_head_kv=kv["attention.head_count_kv"])


def _write_f32_gguf(path, arch: str, tensors, kv: dict, seed: int) -> None:
    w = GGUFWriter(str(path), arch)
    w.add_name("tiny")
    w.add_file_type(LlamaFileType.ALL_F32)
    for key, value in kv.items():
        if isinstance(value, float):
            w.add_float32(f"{arch}.{key}", value)
        else:
            w.add_uint32(f"{arch}.{key}", value)
    n_vocab = dict(tensors)["token_embd.weight"][1]
    tokens = [bytes([ord("a") + i % 26]) * (1 + i // 26) for i in range(n_vocab)]
    w.add_tokenizer_model("gpt2")
    w.add_tokenizer_pre("gpt-2")
    w.add_token_list(tokens)
    w.add_token_types([1] * n_vocab)
    w.add_token_merges(["a a", "b b"])
    w.add_bos_token_id(0)
    w.add_eos_token_id(1)
    rng = np.random.default_rng(seed)
    for name, ne in tensors:
        w.add_tensor(name, rng.standard_normal(tuple(reversed(ne)), dtype=np.float32))
    w.write_header_to_file()
    w.write_kv_data_to_file()
    w.write_tensors_to_file()
    w.close()


@pytest.fixture(scope="module")
def llama_cpp():
    """llama_cpp with llama.cpp's logging silenced (quantize reports every tensor and every fallback)."""
    lc = pytest.importorskip("llama_cpp")
    from llama_cpp import _logger

    silent = lc.llama_log_callback(lambda level, text, user_data: None)
    lc.llama_log_set(silent, ctypes.c_void_p(0))
    yield lc
    lc.llama_log_set(_logger.llama_log_callback, ctypes.c_void_p(0))  # llama_cpp's own, as on import


@pytest.fixture(scope="module")
def f32_files(tmp_path_factory):
    d = tmp_path_factory.mktemp("recipes")
    out = {}
    for seed, (name, (arch, (tensors, kv))) in enumerate(MODELS.items()):
        path = d / f"{name}-f32.gguf"
        _write_f32_gguf(path, arch, tensors, kv, seed)
        out[name] = path
    return out


def _llama_quantize(llama_cpp, src, dst, recipe: str) -> tuple[dict[str, QT], int]:
    params = llama_cpp.llama_model_quantize_default_params()
    params.ftype = file_type(recipe)
    params.nthread = 1
    rc = llama_cpp.llama_model_quantize(str(src).encode(), str(dst).encode(), ctypes.byref(params))
    assert rc == 0, f"llama_model_quantize failed for {src.name} {recipe}"
    reader = GGUFReader(dst)
    ftype = int(reader.get_field("general.file_type").contents())
    return {t.name: QT(t.tensor_type) for t in reader.tensors}, ftype


@pytest.mark.parametrize("recipe", list(RECIPES))
@pytest.mark.parametrize("model", list(MODELS))
def test_types_match_llama_quantize(llama_cpp, f32_files, tmp_path, model, recipe):
    arch, (tensors, kv) = MODELS[model]
    got, ftype = _llama_quantize(llama_cpp, f32_files[model], tmp_path / f"{model}-{recipe}.gguf", recipe)
    assert ftype == file_type(recipe)

    ours = llama_cpp_types(tensors, recipe, arch, _hparams(kv))
    assert list(ours) == [name for name, _ in tensors]  # file order kept
    diff = {n: (ours[n].name, got[n].name) for n in got if ours[n] != got[n]}
    assert not diff, f"(ours, llama.cpp) differ for {len(diff)} tensors: {diff}"

    assert (QT.Q5_1 in got.values()) == ((model, recipe) in NEEDS_Q5_1)
    assert plan_types(tensors, recipe, arch, _hparams(kv)) == got


# ---- the rules on real shapes (no llama_cpp needed) ------------------------------------------------

def _v2_lite():
    return _deepseek2(n_layer=27, n_dense=1, n_embd=2048, n_head=16, q_lora=0, kv_lora=512, nope=128, rope=64,
                      v_head=128, n_ff=10944, n_expert=64, n_ff_exp=1408, n_shared=2, n_vocab=102400, mla=True,
                      exp_probs_b=False)


def test_v2_lite_q4_k_m():
    """peers.md section 3: Q4_K / Q6_K mix; ragged rows fall back to Q5_0 (from Q4_K) or Q8_0 (from Q6_K)."""
    tensors, kv = _v2_lite()
    types = plan_types(tensors, "q4_k_m", "deepseek2", _hparams(kv))
    assert types["output.weight"] == QT.Q6_K
    assert types["token_embd.weight"] == QT.Q4_K                # not tied: an ordinary tensor
    assert types["output_norm.weight"] == types["blk.3.ffn_gate_inp.weight"] == QT.F32
    assert types["blk.0.ffn_down.weight"] == QT.Q8_0             # more bits (Q6_K), 10944 % 256 != 0
    assert types["blk.0.attn_k_b.weight"] == QT.Q5_0             # 128 rows: Q4_K -> Q5_0
    assert types["blk.0.attn_v_b.weight"] == QT.Q4_K             # not attn_v-like
    assert types["blk.0.attn_kv_a_mqa.weight"] == types["blk.0.attn_output.weight"] == QT.Q4_K
    assert types["blk.4.ffn_down_exps.weight"] == QT.Q5_0        # 1408 rows, ordinary layer
    assert types["blk.5.ffn_down_exps.weight"] == QT.Q8_0        # 1408 rows, more-bits layer
    assert types["blk.4.ffn_gate_exps.weight"] == types["blk.5.ffn_up_exps.weight"] == QT.Q4_K
    # use_more_bits over 27 layers: the first and last eighth (0-2, 23-26), and every third layer between
    more = [i for i in range(1, 27) if types[f"blk.{i}.ffn_down_shexp.weight"] == QT.Q6_K]  # 2816 rows fit
    assert more == [1, 2, 5, 8, 11, 14, 17, 20, 23, 24, 25, 26]
    assert all(types[f"blk.{i}.ffn_down_shexp.weight"] == QT.Q4_K for i in range(1, 27) if i not in more)


def test_q5_k_m_needs_q5_1_for_deepseek_attn_k_b():
    tensors, kv = _v2_lite()
    types = plan_types(tensors, "q5_k_m", "deepseek2", _hparams(kv))
    assert types["blk.0.attn_k_b.weight"] == QT.Q5_1  # 128-wide rows: Q5_K -> Q5_1
    assert types == llama_cpp_types(tensors, "q5_k_m", "deepseek2", _hparams(kv))


def test_qwen3_30b_a3b_q5_k_m_is_writable():
    tensors, kv = _qwen3moe(n_layer=48, n_embd=2048, n_head=32, n_head_kv=4, head_dim=128, n_expert=128,
                            n_ff_exp=768, n_vocab=151936, tied=False)
    types = plan_types(tensors, "q5_k_m", "qwen3moe", _hparams(kv))
    assert types["blk.0.attn_v.weight"] == types["blk.0.ffn_down_exps.weight"] == QT.Q6_K
    assert types["blk.7.attn_v.weight"] == types["blk.7.ffn_down_exps.weight"] == QT.Q5_K
    assert types["blk.7.attn_k.weight"] == types["blk.7.attn_output.weight"] == QT.Q5_K
    assert types["blk.7.attn_q_norm.weight"] == QT.F32


@pytest.mark.parametrize("recipe,default", [("f16", QT.F16), ("bf16", QT.BF16), ("f32", QT.F32)])
def test_float_recipes_keep_small_tensors_f32(recipe, default):
    tensors, kv = _v2_lite()
    types = plan_types(tensors, recipe, "deepseek2", _hparams(kv))
    assert types["blk.0.attn_k_b.weight"] == types["output.weight"] == types["blk.3.ffn_down_exps.weight"] == default
    assert types["blk.3.ffn_gate_inp.weight"] == types["blk.0.attn_kv_a_norm.weight"] == QT.F32


def test_file_types_and_errors():
    assert {r: file_type(r) for r in RECIPES} == {
        "f32": 0, "f16": 1, "bf16": 32, "q8_0": 7, "q4_0": 2, "q5_0": 8, "q4_k_m": 15, "q5_k_m": 17, "q6_k": 18}
    tensors, kv = _v2_lite()
    with pytest.raises(ValueError, match="unknown quantization recipe 'q3_k_m'"):
        plan_types(tensors, "q3_k_m", "deepseek2", _hparams(kv))
    with pytest.raises(ValueError, match="architecture 'llama'"):
        plan_types(tensors, "q8_0", "llama", _hparams(kv))
    with pytest.raises(ValueError, match="bad layer 27"):
        plan_types(tensors + [("blk.27.ffn_down_exps.weight", (1408, 2048, 64))], "q8_0", "deepseek2", _hparams(kv))
