"""Tiny random models built with `transformers` (the reference) and saved as HF directories."""

from __future__ import annotations

import shutil
from pathlib import Path

import pytest
import torch

# Each entry: (transformers config class, kwargs). Shapes are tiny but exercise every branch.
MLA = dict(hidden_size=64, intermediate_size=96, moe_intermediate_size=32, num_attention_heads=4,
           kv_lora_rank=32, qk_nope_head_dim=16, qk_rope_head_dim=8, v_head_dim=16,
           max_position_embeddings=512, initializer_range=0.1)

VARIANTS = {
    # V2-Lite: no q_lora_rank, softmax greedy routing, no renormalisation, YaRN with mscale 0.707
    "v2_lite": ("DeepseekV2Config", dict(
        MLA, q_lora_rank=None, num_hidden_layers=3, first_k_dense_replace=1, n_routed_experts=8,
        num_experts_per_tok=3, n_shared_experts=2, topk_method="greedy", norm_topk_prob=False,
        routed_scaling_factor=1.0,
        rope_parameters=dict(rope_type="yarn", rope_theta=10000.0, factor=4.0, original_max_position_embeddings=128,
                             mscale=0.707, mscale_all_dim=0.707, beta_fast=32, beta_slow=1))),
    # V2 with group-limited greedy routing and a q LoRA
    "v2_group": ("DeepseekV2Config", dict(
        MLA, q_lora_rank=48, num_hidden_layers=3, first_k_dense_replace=1, n_routed_experts=8,
        num_experts_per_tok=2, n_shared_experts=1, topk_method="group_limited_greedy", n_group=4, topk_group=2,
        norm_topk_prob=False, routed_scaling_factor=16.0, rope_parameters=dict(rope_type="default", rope_theta=10000.0))),
    # V3: several dense leading layers, n_group > 1, non-zero correction bias, YaRN
    "v3": ("DeepseekV3Config", dict(
        MLA, q_lora_rank=48, num_hidden_layers=4, first_k_dense_replace=2, n_routed_experts=16,
        num_experts_per_tok=4, n_shared_experts=1, n_group=4, topk_group=2, norm_topk_prob=True,
        routed_scaling_factor=2.5,
        rope_parameters=dict(rope_type="yarn", rope_theta=10000.0, factor=8.0, original_max_position_embeddings=64,
                             mscale=1.0, mscale_all_dim=1.0, beta_fast=32, beta_slow=1))),
    "qwen3_norm": ("Qwen3MoeConfig", dict(
        hidden_size=64, intermediate_size=96, moe_intermediate_size=32, num_hidden_layers=3, num_attention_heads=4,
        num_key_value_heads=2, head_dim=24, num_experts=8, num_experts_per_tok=3, norm_topk_prob=True,
        mlp_only_layers=[1], max_position_embeddings=512, initializer_range=0.1,
        rope_parameters=dict(rope_type="default", rope_theta=1000000.0))),
    "qwen3_nonorm": ("Qwen3MoeConfig", dict(
        hidden_size=64, intermediate_size=96, moe_intermediate_size=32, num_hidden_layers=2, num_attention_heads=4,
        num_key_value_heads=4, num_experts=8, num_experts_per_tok=2, norm_topk_prob=False,
        max_position_embeddings=512, initializer_range=0.1,
        rope_parameters=dict(rope_type="default", rope_theta=1000000.0))),
}
VOCAB = 512


@pytest.fixture(scope="session")
def tokenizer_dir(tmp_path_factory) -> Path:
    """A byte-level BPE (vocab 512) with a chat template, shared by the test models."""
    from local.demo import CHAT_TEMPLATE, build_tokenizer_files

    d = tmp_path_factory.mktemp("tokenizer")
    build_tokenizer_files(d, VOCAB, CHAT_TEMPLATE)
    return d


def build_reference(name: str, directory: Path, tokenizer_dir: Path, seed: int = 0, overrides: dict | None = None,
                    **save_kwargs):
    """Build a random `transformers` model for a variant (config `overrides` applied), save it with a
    tokenizer; return the HF model."""
    import transformers

    cls_name, kwargs = VARIANTS[name]
    kwargs = {**kwargs, **(overrides or {})}
    cfg = getattr(transformers, cls_name)(vocab_size=VOCAB, bos_token_id=0, eos_token_id=1, **kwargs)
    torch.manual_seed(seed)
    model = transformers.AutoModelForCausalLM.from_config(cfg, dtype=torch.float32).eval()
    with torch.no_grad():
        for layer in model.model.layers:
            gate = getattr(layer.mlp, "gate", None)
            if gate is not None and hasattr(gate, "e_score_correction_bias"):
                gate.e_score_correction_bias.copy_(torch.randn_like(gate.e_score_correction_bias) * 0.2)
    model.generation_config.eos_token_id = None
    model.save_pretrained(directory, **save_kwargs)
    for f in tokenizer_dir.iterdir():
        shutil.copy(f, directory / f.name)
    return model


@pytest.fixture(scope="session")
def reference_models(tmp_path_factory, tokenizer_dir):
    """name -> (directory, transformers model), built once per session."""
    out = {}
    for name in VARIANTS:
        d = tmp_path_factory.mktemp(name)
        out[name] = (d, build_reference(name, d, tokenizer_dir))
    return out


@pytest.fixture(scope="session")
def tiny_v3_dir(reference_models) -> Path:
    return reference_models["v3"][0]


def copy_model(src: Path, dst: Path) -> Path:
    shutil.copytree(src, dst)
    return dst
