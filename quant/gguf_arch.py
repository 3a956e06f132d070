"""How an HF checkpoint maps onto llama.cpp's GGUF (`deepseek2`, `qwen3moe`): key-values and tensor names.

Both directions live here, so the converter and the GGUF loader cannot drift apart. HF configs are
plain dicts (`config.json`); tensors are named as in the checkpoint, one expert per tensor, with
`kv_b_proj` whole - stacking experts and splitting `kv_b_proj` into llama.cpp's `attn_k_b`/`attn_v_b`
are done by `to_gguf_tensors` / `from_gguf_tensors` below.
"""

from __future__ import annotations

import re

import numpy as np
from gguf import ExpertGatingFuncType, GGUFValueType

ARCH_OF_MODEL_TYPE = {"deepseek_v2": "deepseek2", "deepseek_v3": "deepseek2", "qwen3_moe": "qwen3moe"}
U32, F32, BOOL, STR = GGUFValueType.UINT32, GGUFValueType.FLOAT32, GGUFValueType.BOOL, GGUFValueType.STRING


class ArchitectureError(ValueError):
    pass


def gguf_arch(model_type: str | None) -> str:
    try:
        return ARCH_OF_MODEL_TYPE[model_type]
    except KeyError:
        raise ArchitectureError(f"model_type '{model_type}' has no GGUF mapping; supported: "
                                f"{', '.join(ARCH_OF_MODEL_TYPE)}") from None


def _rope(cfg: dict) -> dict:
    params = dict(cfg.get("rope_scaling") or {})
    params.update(cfg.get("rope_parameters") or {})
    params.setdefault("rope_theta", cfg.get("rope_theta", 10000.0))
    params["rope_type"] = params.get("rope_type", params.get("type", "default")) or "default"
    return params


# ---- key-values -----------------------------------------------------------------------------


def config_to_kv(cfg: dict) -> dict[str, tuple[object, GGUFValueType]]:
    """GGUF key-values (without `general.*`/tokenizer ones) for an HF config dict."""
    arch = gguf_arch(cfg.get("model_type"))
    rope = _rope(cfg)
    kv: dict[str, tuple[object, GGUFValueType]] = {}

    def put(key, value, vtype=U32):
        if value is not None:
            kv[f"{arch}.{key}"] = (value, vtype)

    put("block_count", cfg["num_hidden_layers"])
    put("context_length", cfg.get("max_position_embeddings", 4096))
    put("embedding_length", cfg["hidden_size"])
    put("feed_forward_length", cfg.get("intermediate_size") or 0)
    put("attention.head_count", cfg["num_attention_heads"])
    put("attention.layer_norm_rms_epsilon", float(cfg.get("rms_norm_eps", 1e-6)), F32)
    put("rope.freq_base", float(rope["rope_theta"]), F32)
    put("vocab_size", cfg["vocab_size"])
    put("expert_used_count", cfg.get("num_experts_per_tok"))
    if rope["rope_type"] == "yarn":
        put("rope.scaling.type", "yarn", STR)
        put("rope.scaling.factor", float(rope["factor"]), F32)
        put("rope.scaling.original_context_length", rope.get("original_max_position_embeddings"))
        if rope.get("beta_fast") is not None:
            put("rope.scaling.yarn_beta_fast", float(rope["beta_fast"]), F32)
        if rope.get("beta_slow") is not None:
            put("rope.scaling.yarn_beta_slow", float(rope["beta_slow"]), F32)
    elif rope["rope_type"] == "linear":
        put("rope.scaling.type", "linear", STR)
        put("rope.scaling.factor", float(rope["factor"]), F32)
    elif rope["rope_type"] != "default":
        raise ArchitectureError(f"rope type '{rope['rope_type']}' cannot be written to GGUF")
    if arch == "deepseek2":
        R, Dr, Dn, Dv = cfg["kv_lora_rank"], cfg["qk_rope_head_dim"], cfg["qk_nope_head_dim"], cfg["v_head_dim"]
        put("attention.head_count_kv", 1)  # MLA runs as MQA over the latent
        put("rope.dimension_count", Dr)
        put("leading_dense_block_count", cfg.get("first_k_dense_replace", 0))
        # llama.cpp requires q_lora_rank unless the layer count says "Lite"; 0 = no q LoRA
        put("attention.q_lora_rank", cfg.get("q_lora_rank") or 0)
        put("attention.kv_lora_rank", R)
        put("attention.key_length", R + Dr)
        put("attention.value_length", R)
        put("attention.key_length_mla", Dn + Dr)
        put("attention.value_length_mla", Dv)
        put("expert_feed_forward_length", cfg["moe_intermediate_size"])
        put("expert_count", cfg.get("n_routed_experts"))
        put("expert_shared_count", cfg.get("n_shared_experts") or 0)
        put("expert_weights_scale", float(cfg.get("routed_scaling_factor", 1.0)), F32)
        put("expert_weights_norm", bool(cfg.get("norm_topk_prob", False)), BOOL)
        sigmoid = cfg.get("scoring_func", "sigmoid" if cfg["model_type"] == "deepseek_v3" else "softmax") == "sigmoid"
        put("expert_gating_func", int(ExpertGatingFuncType.SIGMOID if sigmoid else ExpertGatingFuncType.SOFTMAX))
        method = cfg.get("topk_method", "noaux_tc" if cfg["model_type"] == "deepseek_v3" else "greedy")
        if method != "greedy" and (cfg.get("n_group") or 1) > 1:
            if method == "group_limited_greedy":
                raise ArchitectureError("topk_method group_limited_greedy (DeepSeek-V2 236B) has no GGUF encoding "
                                        "that llama.cpp computes the same way")
            put("expert_group_count", cfg["n_group"])
            put("expert_group_used_count", cfg["topk_group"])
        if rope["rope_type"] == "yarn" and rope.get("mscale_all_dim"):
            # llama.cpp assumes mscale == mscale_all_dim; it stores 0.1 * mscale_all_dim
            put("rope.scaling.yarn_log_multiplier", 0.1 * float(rope["mscale_all_dim"]), F32)
    else:
        head_dim = cfg.get("head_dim") or cfg["hidden_size"] // cfg["num_attention_heads"]
        put("attention.head_count_kv", cfg["num_key_value_heads"])
        put("attention.key_length", head_dim)
        put("attention.value_length", head_dim)
        put("rope.dimension_count", head_dim)
        put("expert_feed_forward_length", cfg["moe_intermediate_size"])
        put("expert_count", cfg.get("num_experts", cfg.get("num_local_experts")))
        put("expert_weights_norm", bool(cfg.get("norm_topk_prob", False)), BOOL)
        if cfg.get("decoder_sparse_step", 1) != 1 or cfg.get("mlp_only_layers"):
            raise ArchitectureError("qwen3moe GGUF files have MoE in every layer; this checkpoint has dense "
                                    "layers (mlp_only_layers / decoder_sparse_step), which llama.cpp cannot express")
    return kv


def kv_to_config(kv: dict, n_vocab: int, tensor_names: set[str]) -> dict:
    """An HF-style config dict from GGUF key-values (what `Config.from_dict` reads)."""
    arch = kv.get("general.architecture")
    if arch not in ("deepseek2", "qwen3moe"):
        raise ArchitectureError(f"GGUF architecture '{arch}' is not supported; Tandem runs deepseek2 and qwen3moe")

    def get(key, default=None):
        v = kv.get(f"{arch}.{key}", default)
        return v.item() if isinstance(v, np.generic) else v

    def need(key):
        v = get(key)
        if v is None:
            raise ArchitectureError(f"GGUF key {arch}.{key} is missing; the file is incomplete")
        return v

    cfg = dict(
        vocab_size=get("vocab_size", n_vocab), hidden_size=need("embedding_length"),
        intermediate_size=get("feed_forward_length", 0), num_hidden_layers=need("block_count"),
        num_attention_heads=need("attention.head_count"), max_position_embeddings=get("context_length", 4096),
        rms_norm_eps=float(get("attention.layer_norm_rms_epsilon", 1e-6)), tie_word_embeddings="output.weight"
        not in tensor_names, bos_token_id=kv.get("tokenizer.ggml.bos_token_id"),
        eos_token_id=kv.get("tokenizer.ggml.eos_token_id"),
    )
    if isinstance(cfg["intermediate_size"], (list, np.ndarray)):
        raise ArchitectureError(f"{arch}.feed_forward_length varies per layer; Tandem supports one value")
    rope = {"rope_type": "default", "rope_theta": float(get("rope.freq_base", 10000.0))}
    scaling = get("rope.scaling.type")
    if scaling in ("yarn", "linear"):
        rope.update(rope_type=scaling, factor=float(need("rope.scaling.factor")))
        if scaling == "yarn":
            rope["original_max_position_embeddings"] = need("rope.scaling.original_context_length")
            rope["beta_fast"] = float(get("rope.scaling.yarn_beta_fast", 32.0))
            rope["beta_slow"] = float(get("rope.scaling.yarn_beta_slow", 1.0))
            log_mul = get("rope.scaling.yarn_log_multiplier")
            if log_mul:
                rope["mscale"] = rope["mscale_all_dim"] = float(log_mul) / 0.1
    elif scaling not in (None, "none"):
        raise ArchitectureError(f"{arch}.rope.scaling.type '{scaling}' is not supported (yarn, linear)")
    cfg["rope_parameters"] = rope
    if arch == "deepseek2":
        sigmoid = get("expert_gating_func", int(ExpertGatingFuncType.SOFTMAX)) == int(ExpertGatingFuncType.SIGMOID)
        n_group = get("expert_group_count", 1) or 1
        has_bias = any(n.endswith("exp_probs_b.bias") for n in tensor_names)
        k_mla = get("attention.key_length_mla") or need("attention.key_length")
        v_mla = get("attention.value_length_mla") or need("attention.value_length")
        Dr = need("rope.dimension_count")
        cfg.update(
            model_type="deepseek_v3" if sigmoid else "deepseek_v2",
            q_lora_rank=get("attention.q_lora_rank") or None, kv_lora_rank=need("attention.kv_lora_rank"),
            qk_rope_head_dim=Dr, qk_nope_head_dim=k_mla - Dr, v_head_dim=v_mla,
            first_k_dense_replace=get("leading_dense_block_count", 0),
            moe_intermediate_size=need("expert_feed_forward_length"), n_routed_experts=need("expert_count"),
            num_experts_per_tok=need("expert_used_count"), n_shared_experts=get("expert_shared_count", 0),
            routed_scaling_factor=float(get("expert_weights_scale", 1.0)) or 1.0,
            norm_topk_prob=bool(get("expert_weights_norm", False)),
            scoring_func="sigmoid" if sigmoid else "softmax",
            topk_method="noaux_tc" if sigmoid else "greedy",
            n_group=n_group, topk_group=get("expert_group_used_count", 1) or 1,
        )
        has_moe = (get("leading_dense_block_count", 0) or 0) < cfg["num_hidden_layers"]
        if sigmoid and has_moe and not has_bias:
            raise ArchitectureError("sigmoid gating without exp_probs_b.bias tensors is not supported")
        if n_group > 1 and not sigmoid:
            raise ArchitectureError("expert groups with softmax gating are not supported")
    elif arch == "qwen3moe":
        cfg.update(
            model_type="qwen3_moe", num_key_value_heads=need("attention.head_count_kv"),
            head_dim=get("attention.key_length"), num_experts=need("expert_count"),
            num_experts_per_tok=need("expert_used_count"), moe_intermediate_size=need("expert_feed_forward_length"),
            # llama.cpp always renormalises Qwen3-MoE's top-k weights
            norm_topk_prob=bool(get("expert_weights_norm", True)),
        )
    else:
        raise ArchitectureError(f"GGUF architecture '{arch}' is not supported; Tandem runs deepseek2 and qwen3moe")
    return cfg


# ---- tensor names ---------------------------------------------------------------------------

# (HF name after `model.layers.{i}.`, GGUF name after `blk.{i}.`); experts use {e}
LAYER_NAMES = [
    ("input_layernorm.weight", "attn_norm.weight"),
    ("post_attention_layernorm.weight", "ffn_norm.weight"),
    ("self_attn.q_proj.weight", "attn_q.weight"),
    ("self_attn.q_a_proj.weight", "attn_q_a.weight"),
    ("self_attn.q_a_layernorm.weight", "attn_q_a_norm.weight"),
    ("self_attn.q_b_proj.weight", "attn_q_b.weight"),
    ("self_attn.kv_a_proj_with_mqa.weight", "attn_kv_a_mqa.weight"),
    ("self_attn.kv_a_layernorm.weight", "attn_kv_a_norm.weight"),
    ("self_attn.kv_b_proj.weight", "attn_kv_b.weight"),
    ("self_attn.k_proj.weight", "attn_k.weight"),
    ("self_attn.v_proj.weight", "attn_v.weight"),
    ("self_attn.q_norm.weight", "attn_q_norm.weight"),
    ("self_attn.k_norm.weight", "attn_k_norm.weight"),
    ("self_attn.o_proj.weight", "attn_output.weight"),
    ("mlp.gate_proj.weight", "ffn_gate.weight"),
    ("mlp.up_proj.weight", "ffn_up.weight"),
    ("mlp.down_proj.weight", "ffn_down.weight"),
    ("mlp.gate.weight", "ffn_gate_inp.weight"),
    ("mlp.gate.e_score_correction_bias", "exp_probs_b.bias"),
    ("mlp.shared_experts.gate_proj.weight", "ffn_gate_shexp.weight"),
    ("mlp.shared_experts.up_proj.weight", "ffn_up_shexp.weight"),
    ("mlp.shared_experts.down_proj.weight", "ffn_down_shexp.weight"),
]
GLOBAL_NAMES = [("model.embed_tokens.weight", "token_embd.weight"), ("model.norm.weight", "output_norm.weight"),
                ("lm_head.weight", "output.weight")]
EXPERT_NAMES = [("gate_proj", "ffn_gate_exps.weight"), ("up_proj", "ffn_up_exps.weight"),
                ("down_proj", "ffn_down_exps.weight")]
_HF_LAYER = re.compile(r"^model\.layers\.(\d+)\.(.+)$")
_GGUF_LAYER = re.compile(r"^blk\.(\d+)\.(.+)$")
_HF2GGUF = dict(LAYER_NAMES)
_GGUF2HF = {g: h for h, g in LAYER_NAMES}


def gguf_tensor_name(hf_name: str) -> str | None:
    """The GGUF name of a (non-expert) HF tensor; None if it has no GGUF counterpart."""
    for h, g in GLOBAL_NAMES:
        if hf_name == h:
            return g
    m = _HF_LAYER.match(hf_name)
    if m and m[2] in _HF2GGUF:
        return f"blk.{m[1]}.{_HF2GGUF[m[2]]}"
    return None


def hf_tensor_name(gguf_name: str) -> str | None:
    for h, g in GLOBAL_NAMES:
        if gguf_name == g:
            return h
    m = _GGUF_LAYER.match(gguf_name)
    if m and m[2] in _GGUF2HF:
        return f"model.layers.{m[1]}.{_GGUF2HF[m[2]]}"
    return None


def split_kv_b(kv_b: np.ndarray, n_head: int, qk_nope: int, v_head: int) -> tuple[np.ndarray, np.ndarray]:
    """kv_b_proj [H*(Dn+Dv), R] -> attn_k_b [H, R, Dn] (transposed per head) and attn_v_b [H, Dv, R]."""
    w = kv_b.reshape(n_head, qk_nope + v_head, -1)
    return np.ascontiguousarray(w[:, :qk_nope].transpose(0, 2, 1)), np.ascontiguousarray(w[:, qk_nope:])


def join_kv_b(k_b: np.ndarray, v_b: np.ndarray) -> np.ndarray:
    """Inverse of split_kv_b: [H, R, Dn] + [H, Dv, R] -> [H*(Dn+Dv), R]."""
    w = np.concatenate([k_b.transpose(0, 2, 1), v_b], axis=1)
    return w.reshape(-1, w.shape[-1])
