"""DeepSeek-V2 / V2-Lite: MLA attention, softmax routing (greedy or group-limited), shared experts."""

from __future__ import annotations

from dataclasses import dataclass
from typing import ClassVar

import torch
from torch import nn

from ..config import BaseConfig, ConfigError, RopeSpec, mla_softmax_scale, rope_spec
from ..kv_cache import KVCache
from .layers import Linear, MLP, QuantEmbedding, RMSNorm, Rope, empty_embedding
from .mla import MLAttention
from .moe import SCORING_FUNCS, TOPK_METHODS, MoE, Router


@dataclass(frozen=True)
class DeepseekV2Config(BaseConfig):
    ALIASES: ClassVar[dict[str, str]] = {"num_local_experts": "n_routed_experts", "num_experts": "n_routed_experts"}

    vocab_size: int
    hidden_size: int
    intermediate_size: int
    num_hidden_layers: int
    num_attention_heads: int
    kv_lora_rank: int
    qk_rope_head_dim: int
    qk_nope_head_dim: int
    v_head_dim: int
    moe_intermediate_size: int
    n_routed_experts: int | None = None
    num_experts_per_tok: int | None = None
    n_shared_experts: int | None = None
    q_lora_rank: int | None = None
    first_k_dense_replace: int = 0
    moe_layer_freq: int = 1
    scoring_func: str = "softmax"
    topk_method: str = "greedy"
    n_group: int | None = None
    topk_group: int | None = None
    norm_topk_prob: bool = False
    routed_scaling_factor: float = 1.0
    hidden_act: str = "silu"
    max_position_embeddings: int = 2048
    rms_norm_eps: float = 1e-6
    rope_theta: float | None = None
    rope_scaling: dict | None = None
    rope_parameters: dict | None = None
    rope_interleave: bool = True
    attention_bias: bool = False
    mlp_bias: bool = False
    tie_word_embeddings: bool = False
    num_nextn_predict_layers: int = 0
    bos_token_id: int | None = None
    eos_token_id: int | list | None = None
    model_type: str = "deepseek_v2"

    # ---- derived values, in one place
    @property
    def rope(self) -> RopeSpec:
        return rope_spec(self.rope_theta, self.rope_scaling, self.rope_parameters, self.max_position_embeddings)

    @property
    def softmax_scale(self) -> float:
        return mla_softmax_scale(self.rope, self.qk_nope_head_dim + self.qk_rope_head_dim)

    def is_moe_layer(self, i: int) -> bool:
        return (bool(self.n_routed_experts) and i >= self.first_k_dense_replace
                and i % max(self.moe_layer_freq, 1) == 0)

    def validate(self) -> None:
        super().validate()
        self.rope  # noqa: B018 - raises on an unsupported rope type
        if self.scoring_func not in SCORING_FUNCS:
            raise ConfigError(f"scoring_func '{self.scoring_func}' is not supported; supported: {SCORING_FUNCS}")
        if self.topk_method not in TOPK_METHODS:
            raise ConfigError(f"topk_method '{self.topk_method}' is not supported; supported: {TOPK_METHODS}")
        if self.n_routed_experts:
            if not self.num_experts_per_tok or self.num_experts_per_tok > self.n_routed_experts:
                raise ConfigError(
                    f"num_experts_per_tok={self.num_experts_per_tok} must be in 1..n_routed_experts={self.n_routed_experts}")
            if self.topk_method != "greedy":
                g, tg = self.n_group or 1, self.topk_group or 1
                if self.n_routed_experts % g or not 1 <= tg <= g:
                    raise ConfigError(f"n_group={g}, topk_group={tg} do not divide {self.n_routed_experts} experts")
                if tg * (self.n_routed_experts // g) < self.num_experts_per_tok:
                    raise ConfigError("topk_group groups hold fewer experts than num_experts_per_tok")
        if self.qk_rope_head_dim % 2:
            raise ConfigError(f"qk_rope_head_dim={self.qk_rope_head_dim} must be even")


class DecoderLayer(nn.Module):
    def __init__(self, cfg: DeepseekV2Config, i: int, make_router):
        super().__init__()
        self.self_attn = MLAttention(cfg, i)
        if cfg.is_moe_layer(i):
            shared = cfg.moe_intermediate_size * (cfg.n_shared_experts or 0)
            self.mlp = MoE(make_router(cfg), cfg.hidden_size, cfg.moe_intermediate_size, cfg.n_routed_experts,
                           shared, cfg.hidden_act, cfg.mlp_bias)
        else:
            self.mlp = MLP(cfg.hidden_size, cfg.intermediate_size, cfg.hidden_act, cfg.mlp_bias)
        self.input_layernorm = RMSNorm(cfg.hidden_size, cfg.rms_norm_eps)
        self.post_attention_layernorm = RMSNorm(cfg.hidden_size, cfg.rms_norm_eps)

    def forward(self, x, rope, cos_sin, cache, start):
        # h = x + attn(norm(x)), then h + mlp(norm(h)): each block one engine call where the engine runs it
        h = self.self_attn(x, rope, cos_sin, cache, start, pre_norm=self.input_layernorm)
        return self.mlp(h, pre_norm=self.post_attention_layernorm)


def make_router(cfg: DeepseekV2Config) -> Router:
    return Router(cfg.hidden_size, cfg.n_routed_experts, cfg.num_experts_per_tok,
                  scoring=cfg.scoring_func, topk_method=cfg.topk_method, n_group=cfg.n_group,
                  topk_group=cfg.topk_group, norm_topk_prob=cfg.norm_topk_prob,
                  routed_scaling_factor=cfg.routed_scaling_factor)


class Backbone(nn.Module):
    """model.* in the checkpoint: embeddings, decoder layers, final norm."""

    def __init__(self, cfg, layer_cls, make_router):
        super().__init__()
        self.embed_tokens = empty_embedding(cfg.vocab_size, cfg.hidden_size)
        self.layers = nn.ModuleList(layer_cls(cfg, i, make_router) for i in range(cfg.num_hidden_layers))
        self.norm = RMSNorm(cfg.hidden_size, cfg.rms_norm_eps)


class CausalLM(nn.Module):
    """Shared top of every architecture here: embed -> layers -> norm -> lm_head, over one sequence."""

    config: BaseConfig
    rope: Rope
    # runs of decoder layers that are one engine call together (layers.engine_stacks), by first index; set by
    # the GGUF loader on the CPU engine
    engine_stacks: dict = {}

    @property
    def device(self) -> torch.device:
        """Where the hidden states live (the token embedding's output)."""
        e = self.model.embed_tokens
        return e.device if isinstance(e, QuantEmbedding) else e.weight.device

    @property
    def dtype(self) -> torch.dtype:
        """The hidden states' dtype (the token embedding's output)."""
        e = self.model.embed_tokens
        return e.out_dtype if isinstance(e, QuantEmbedding) else e.weight.dtype

    def new_cache(self, capacity: int = 256, dtype=None, device=None) -> KVCache:
        return KVCache(self.config.num_hidden_layers, self.cache_streams(), dtype or self.dtype,
                       device or self.device, capacity)

    def forward(self, ids: torch.Tensor, cache: KVCache, last_only: bool = False,
                position: torch.Tensor | None = None) -> torch.Tensor:
        """ids [T] int64 continuing the cached sequence -> logits [T, V] (or [1, V] with last_only).

        position: a fixed-shape step (local.decode_step, what a CUDA graph replays): the first new position
        as a tensor [1] on the device; the cache must hold it already, and its length is the caller's to
        advance. Attention then spans the whole cache, positions past the new tokens masked."""
        T = ids.shape[0]
        if position is None:
            start = cache.length
            cache.reserve(start + T)
            cos_sin = self.rope.cos_sin_range(start, T, ids.device)
        else:
            start = position
            cos_sin = self.rope.cos_sin(position + torch.arange(T, device=ids.device))
        x = self.model.embed_tokens(ids)  # [T, D]
        layers, i = self.model.layers, 0
        while i < len(layers):
            stack = self.engine_stacks.get(i)
            if stack is not None and stack.usable(x, start):  # these layers in one engine call
                x = stack(x, cos_sin, cache, start)
                i += len(stack)
                continue
            x = layers[i](x, self.rope, cos_sin, cache, start)
            i += 1
        if position is None:
            cache.length = start + T
        return self.lm_head(x[-1:] if last_only else x, pre_norm=self.model.norm)


class DeepseekV2ForCausalLM(CausalLM):
    def __init__(self, cfg: DeepseekV2Config):
        super().__init__()
        self.config = cfg
        self.model = Backbone(cfg, DecoderLayer, self.router_factory())
        self.lm_head = Linear(cfg.hidden_size, cfg.vocab_size, bias=False)
        self.rope = Rope(cfg.rope, cfg.qk_rope_head_dim, interleaved=cfg.rope_interleave)

    def router_factory(self):
        return make_router

    def cache_streams(self):
        return MLAttention.cache_streams(self.config)


def remap(names: list[str], cfg: DeepseekV2Config) -> dict[str, str]:
    """Checkpoint tensor name -> module name; the checkpoint quirks of this family live here.

    MTP layers (`model.layers.{N+i}.*`, V3) become `mtp.{i}.*` and are never decoder layers.
    """
    n = cfg.num_hidden_layers
    out = {}
    for name in names:
        parts = name.split(".")
        if name.startswith("model.layers.") and parts[2].isdigit() and int(parts[2]) >= n:
            out[name] = ".".join(["mtp", str(int(parts[2]) - n)] + parts[3:])
        else:
            out[name] = name
    return out


Config = DeepseekV2Config
Model = DeepseekV2ForCausalLM


def build(cfg: DeepseekV2Config, names: list[str]) -> DeepseekV2ForCausalLM:
    return DeepseekV2ForCausalLM(cfg)
