"""Qwen3-MoE: grouped-query attention with per-head q/k RMSNorm, softmax top-k routing, no shared experts.

Legend: T new tokens, S cached positions, H query heads, K KV heads, Dh head dim, D hidden.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import ClassVar

import torch
from torch import nn

from ..config import BaseConfig, ConfigError, RopeSpec, rope_spec
from .deepseek_v2 import Backbone, CausalLM
from .layers import Linear, MLP, RMSNorm, Rope
from .layers import engine_pre_norm, quantize_activation
from .mla import cache_precision, causal_mask
from .moe import MoE, Router


@dataclass(frozen=True)
class Qwen3MoeConfig(BaseConfig):
    ALIASES: ClassVar[dict[str, str]] = {"num_local_experts": "num_experts"}

    vocab_size: int
    hidden_size: int
    num_hidden_layers: int
    num_attention_heads: int
    num_key_value_heads: int
    num_experts: int
    num_experts_per_tok: int
    moe_intermediate_size: int
    intermediate_size: int = 0
    head_dim: int | None = None
    decoder_sparse_step: int = 1
    mlp_only_layers: list | None = None
    norm_topk_prob: bool = False
    hidden_act: str = "silu"
    max_position_embeddings: int = 32768
    rms_norm_eps: float = 1e-6
    rope_theta: float | None = None
    rope_scaling: dict | None = None
    rope_parameters: dict | None = None
    attention_bias: bool = False
    use_sliding_window: bool = False
    tie_word_embeddings: bool = False
    bos_token_id: int | None = None
    eos_token_id: int | list | None = None
    model_type: str = "qwen3_moe"

    @property
    def rope(self) -> RopeSpec:
        return rope_spec(self.rope_theta, self.rope_scaling, self.rope_parameters, self.max_position_embeddings)

    @property
    def head_size(self) -> int:
        return self.head_dim or self.hidden_size // self.num_attention_heads

    def is_moe_layer(self, i: int) -> bool:
        return (i not in (self.mlp_only_layers or ()) and self.num_experts > 0
                and (i + 1) % self.decoder_sparse_step == 0)

    def validate(self) -> None:
        super().validate()
        self.rope  # noqa: B018 - raises on an unsupported rope type
        if self.num_attention_heads % max(self.num_key_value_heads, 1):
            raise ConfigError(f"num_attention_heads={self.num_attention_heads} is not a multiple of "
                              f"num_key_value_heads={self.num_key_value_heads}")
        if self.num_experts and not 1 <= self.num_experts_per_tok <= self.num_experts:
            raise ConfigError(f"num_experts_per_tok={self.num_experts_per_tok} must be in 1..{self.num_experts}")
        if self.use_sliding_window:
            raise ConfigError("use_sliding_window=true is not supported yet; Qwen3-MoE checkpoints ship with false")


class GQAttention(nn.Module):
    # GGUF on the CPU engine, with every projection an engine weight: the whole block is one engine call
    # (offload.torch_ops.gqa_layer)
    engine_layer = None

    def __init__(self, cfg: Qwen3MoeConfig, layer_idx: int):
        super().__init__()
        self.layer_idx = layer_idx
        self.n_heads, self.n_kv, self.head_dim = cfg.num_attention_heads, cfg.num_key_value_heads, cfg.head_size
        D, Dh, bias = cfg.hidden_size, self.head_dim, cfg.attention_bias
        self.q_proj = Linear(D, self.n_heads * Dh, bias=bias)
        self.k_proj = Linear(D, self.n_kv * Dh, bias=bias)
        self.v_proj = Linear(D, self.n_kv * Dh, bias=bias)
        self.o_proj = Linear(self.n_heads * Dh, D, bias=bias)
        self.q_norm = RMSNorm(Dh, cfg.rms_norm_eps)
        self.k_norm = RMSNorm(Dh, cfg.rms_norm_eps)
        self.scale = Dh ** -0.5

    def bind_engine(self, rope: Rope) -> bool:
        """Make the whole block one CPU engine call when every projection is an engine weight without a bias
        (a GGUF on the CPU) and rope turns every head dim; returns whether it did."""
        linears = (self.q_proj, self.k_proj, self.v_proj, self.o_proj)
        if any(m.engine_weight is None or m.bias is not None for m in linears) or rope.dim != self.head_dim:
            return False
        from offload.torch_ops import gqa_layer

        self.engine_layer = gqa_layer(
            self.o_proj.engine_weight.rows, self.n_heads, self.n_kv, self.head_dim,
            *(m.engine_weight for m in linears), self.q_norm.weight, self.k_norm.weight, self.q_norm.eps, self.scale,
            rope.interleaved)
        return True

    def engine_cache(self, cache) -> tuple:
        """This layer's cache arrays, in the order the engine's gqa_forward takes them."""
        arrays = cache.arrays(self.layer_idx)
        return arrays["k"], arrays["v"]

    def forward(self, x, rope: Rope, cos_sin, cache, start, pre_norm: RMSNorm | None = None):
        """pre_norm (the decoder layer's input RMSNorm): x is the residual stream, and the result
        x + attention(pre_norm(x)), one engine call on the CPU engine."""
        if self.engine_layer is not None and x.device.type == "cpu" and not isinstance(start, torch.Tensor):
            fused = engine_pre_norm(pre_norm, x)
            if fused is not None:
                from offload.torch_ops import run_gqa_forward

                buf = cache.layer(self.layer_idx)
                out = run_gqa_forward(self.engine_layer, x.float().contiguous(), *cos_sin, buf["k"], buf["v"], start,
                                      **fused)
                return out.to(x.dtype)
        if pre_norm is not None:
            return x + self.forward(pre_norm(x), rope, cos_sin, cache, start)
        T, H, K, Dh = x.shape[0], self.n_heads, self.n_kv, self.head_dim
        q = self.q_norm(self.q_proj(x).view(T, H, Dh))
        k = self.k_norm(self.k_proj(x).view(T, K, Dh))
        v = self.v_proj(x).view(T, K, Dh)
        q, k = rope.apply(q, *cos_sin), rope.apply(k, *cos_sin)
        past = cache.update(self.layer_idx, start, k=k, v=v)
        low = cache_precision(past["k"].dtype, q.dtype)  # an f16 cache rounds what it is dotted with
        k, v = (past[n].to(q.dtype).transpose(0, 1) for n in ("k", "v"))  # [K, S, Dh]
        q = quantize_activation(q, low).transpose(0, 1).reshape(K, H // K * T, Dh)  # heads grouped by KV head
        scores = (q @ k.transpose(1, 2)) * self.scale  # [K, H/K*T, S]
        mask = causal_mask(T, k.shape[1], x.device, start)
        if mask is not None:
            scores = scores + mask.repeat(H // K, 1)
        p = quantize_activation(torch.softmax(scores, dim=-1, dtype=torch.float32).to(q.dtype), low)
        out = (p @ v).view(H, T, Dh).transpose(0, 1)  # [T, H, Dh]
        return self.o_proj(out.reshape(T, H * Dh))


class DecoderLayer(nn.Module):
    def __init__(self, cfg: Qwen3MoeConfig, i: int, make_router):
        super().__init__()
        self.self_attn = GQAttention(cfg, i)
        if cfg.is_moe_layer(i):
            self.mlp = MoE(make_router(cfg), cfg.hidden_size, cfg.moe_intermediate_size, cfg.num_experts,
                           act=cfg.hidden_act)
        else:
            self.mlp = MLP(cfg.hidden_size, cfg.intermediate_size, cfg.hidden_act)
        self.input_layernorm = RMSNorm(cfg.hidden_size, cfg.rms_norm_eps)
        self.post_attention_layernorm = RMSNorm(cfg.hidden_size, cfg.rms_norm_eps)

    def forward(self, x, rope, cos_sin, cache, start):
        h = self.self_attn(x, rope, cos_sin, cache, start, pre_norm=self.input_layernorm)  # x + attn(norm(x))
        return self.mlp(h, pre_norm=self.post_attention_layernorm)  # h + mlp(norm(h)), fused where it can be


def make_router(cfg: Qwen3MoeConfig) -> Router:
    return Router(cfg.hidden_size, cfg.num_experts, cfg.num_experts_per_tok, scoring="softmax",
                  topk_method="greedy", norm_topk_prob=cfg.norm_topk_prob, logits_in_fp32=False)


class Qwen3MoeForCausalLM(CausalLM):
    def __init__(self, cfg: Qwen3MoeConfig):
        super().__init__()
        self.config = cfg
        self.model = Backbone(cfg, DecoderLayer, make_router)
        self.lm_head = Linear(cfg.hidden_size, cfg.vocab_size, bias=False)
        self.rope = Rope(cfg.rope, cfg.head_size, interleaved=False)

    def cache_streams(self):
        c = self.config
        return {"k": (c.num_key_value_heads, c.head_size), "v": (c.num_key_value_heads, c.head_size)}


def remap(names: list[str], cfg: Qwen3MoeConfig) -> dict[str, str]:
    """Checkpoint names are module names for Qwen3-MoE."""
    return {n: n for n in names}


def build(cfg: Qwen3MoeConfig, names: list[str]) -> Qwen3MoeForCausalLM:
    return Qwen3MoeForCausalLM(cfg)


Config = Qwen3MoeConfig
