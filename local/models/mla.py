"""Multi-head Latent Attention (DeepSeek-V2/V3) over a latent KV cache.

Legend: T new tokens, S cached positions (incl. the new ones), H heads, D hidden,
R kv_lora_rank, Dn qk_nope_head_dim, Dr qk_rope_head_dim, Dv v_head_dim.
The cache keeps only c_kv [S, R] (normed latent) and k_pe [S, Dr] (rotated) per layer.
Prefill decompresses the latent through kv_b_proj (plain MHA with head dim Dn+Dr / Dv);
decode absorbs W_UK into the query and W_UV into the output, attending in latent space.
"""

from __future__ import annotations

import torch
from torch import nn

from ..kv_cache import KVCache
from .layers import Linear, RMSNorm, Rope, engine_pre_norm, quantize_activation

# Up to this many new tokens, attend in latent space (absorbed); above it, decompress.
ABSORB_MAX_TOKENS = 1


def cache_precision(cache_dtype: torch.dtype, compute_dtype: torch.dtype) -> str | None:
    """The rounding ('f16'/'bf16') a lower-precision cache imposes on what is dotted with it, else None."""
    if cache_dtype == compute_dtype:
        return None
    return {torch.float16: "f16", torch.bfloat16: "bf16"}.get(cache_dtype)


def attention_mask(T: int, S: int, device, start: torch.Tensor | None = None) -> torch.Tensor:
    """Additive causal mask [T, S] for T new tokens that end at position S-1, or, with `start` (a tensor
    [1]: a fixed-shape step over the whole cache), that sit at positions start..start+T-1."""
    if start is not None:
        allowed = (torch.arange(S, device=device)[None, :]
                   <= start + torch.arange(T, device=device)[:, None])
    else:
        allowed = torch.ones(T, S, dtype=torch.bool, device=device).tril(diagonal=S - T)
    return torch.zeros(T, S, device=device).masked_fill(~allowed, float("-inf"))


def causal_mask(T: int, S: int, device, start: int | torch.Tensor) -> torch.Tensor | None:
    """The mask attention over the cache's views [S] needs, or None: several new tokens (start an int), or
    a fixed-shape step (start a tensor [1]: the views span the whole cache)."""
    if isinstance(start, torch.Tensor):
        return attention_mask(T, S, device, start)
    return attention_mask(T, S, device) if T > 1 else None


class MLAttention(nn.Module):
    # llama.cpp's numerics for GGUF weights (set by the GGUF loader): attend in latent space at every
    # length and round the inputs of W_UK / W_UV like its activations
    absorb_always = False
    act_format_uk: str | None = None
    act_format_uv: str | None = None
    # GGUF on the CPU engine: W_UK [H, R, Dn] and W_UV [H, Dv, R] left in their blocks (EngineWeight);
    # the absorbed products then run as one batched engine call each, and kv_b_proj is never loaded
    engine_uk = None
    engine_uv = None
    # ...and with every projection there too, the whole block is one engine call (offload.torch_ops.mla_layer)
    engine_layer = None

    def __init__(self, cfg, layer_idx: int):
        super().__init__()
        self.layer_idx = layer_idx
        self.n_heads = H = cfg.num_attention_heads
        self.kv_lora_rank = cfg.kv_lora_rank
        self.qk_nope_head_dim = cfg.qk_nope_head_dim
        self.qk_rope_head_dim = cfg.qk_rope_head_dim
        self.v_head_dim = cfg.v_head_dim
        self.qk_head_dim = cfg.qk_nope_head_dim + cfg.qk_rope_head_dim
        self.softmax_scale = cfg.softmax_scale
        D, bias = cfg.hidden_size, cfg.attention_bias
        # the latent norms use eps 1e-6 whatever rms_norm_eps says, as DeepSeek's reference does
        if cfg.q_lora_rank is None:
            self.q_proj = Linear(D, H * self.qk_head_dim, bias=False)
        else:
            self.q_a_proj = Linear(D, cfg.q_lora_rank, bias=bias)
            self.q_a_layernorm = RMSNorm(cfg.q_lora_rank, 1e-6)
            self.q_b_proj = Linear(cfg.q_lora_rank, H * self.qk_head_dim, bias=False)
        self.kv_a_proj_with_mqa = Linear(D, cfg.kv_lora_rank + cfg.qk_rope_head_dim, bias=bias)
        self.kv_a_layernorm = RMSNorm(cfg.kv_lora_rank, 1e-6)
        self.kv_b_proj = Linear(cfg.kv_lora_rank, H * (cfg.qk_nope_head_dim + cfg.v_head_dim), bias=False)
        self.o_proj = Linear(H * cfg.v_head_dim, D, bias=bias)

    @staticmethod
    def cache_streams(cfg) -> dict[str, tuple[int, ...]]:
        return {"c_kv": (cfg.kv_lora_rank,), "k_pe": (cfg.qk_rope_head_dim,)}

    def bind_engine(self, rope: Rope) -> bool:
        """Make the whole block one CPU engine call when every weight it reads is an engine weight (a GGUF
        on the CPU); returns whether it did."""
        from .layers import Linear

        q = [self.q_proj] if hasattr(self, "q_proj") else [self.q_a_proj, self.q_b_proj]
        linears = q + [self.kv_a_proj_with_mqa, self.o_proj]
        if self.engine_uk is None or any(not isinstance(m, Linear) or m.engine_weight is None or m.bias is not None
                                         for m in linears):
            return False
        from offload.torch_ops import mla_layer

        lora = not hasattr(self, "q_proj")
        self.engine_layer = mla_layer(
            self.o_proj.engine_weight.rows, self.n_heads, self.qk_nope_head_dim, self.qk_rope_head_dim,
            self.kv_lora_rank, self.v_head_dim, self.q_a_proj.engine_weight if lora else None,
            self.q_a_layernorm.weight if lora else None, q[-1].engine_weight, self.kv_a_proj_with_mqa.engine_weight,
            self.kv_a_layernorm.weight, self.engine_uk, self.engine_uv, self.o_proj.engine_weight,
            self.kv_a_layernorm.eps, self.softmax_scale, rope.interleaved)
        return True

    def engine_cache(self, cache: KVCache) -> tuple:
        """This layer's cache arrays, in the order the engine's mla_forward takes them."""
        arrays = cache.arrays(self.layer_idx)
        return arrays["c_kv"], arrays["k_pe"]

    def forward(self, x: torch.Tensor, rope: Rope, cos_sin, cache: KVCache, start: int,
                pre_norm: RMSNorm | None = None) -> torch.Tensor:
        """pre_norm (the decoder layer's input RMSNorm): x is the residual stream, and the result
        x + attention(pre_norm(x)), one engine call on the CPU engine."""
        if self.engine_layer is not None and x.device.type == "cpu" and not isinstance(start, torch.Tensor):
            fused = engine_pre_norm(pre_norm, x)
            if fused is not None:
                return self._engine_forward(x, cos_sin, cache, start, **fused)
        if pre_norm is not None:
            return x + self.forward(pre_norm(x), rope, cos_sin, cache, start)
        T = x.shape[0]
        if isinstance(start, torch.Tensor) and self.engine_uk is not None:
            raise RuntimeError("a fixed-shape decode step (--cuda-graph) attends in torch, over the whole cache; this "
                               "model's attention runs on the CPU engine (load it on a GPU, or hybrid)")
        H, Dn, Dr, R = self.n_heads, self.qk_nope_head_dim, self.qk_rope_head_dim, self.kv_lora_rank
        if hasattr(self, "q_proj"):
            q = self.q_proj(x)
        else:
            q = self.q_b_proj(self.q_a_layernorm(self.q_a_proj(x)))
        q = q.view(T, H, Dn + Dr)  # [T, H, Dn+Dr]
        q_nope, q_pe = q[..., :Dn], q[..., Dn:]
        kv = self.kv_a_proj_with_mqa(x)  # [T, R+Dr]
        c_kv, k_pe = self.kv_a_layernorm(kv[:, :R]), kv[:, R:]
        cos, sin = cos_sin
        q_pe, k_pe = rope.apply(q_pe, cos, sin), rope.apply(k_pe, cos, sin)
        past = cache.update(self.layer_idx, start, c_kv=c_kv, k_pe=k_pe)
        c_kv, k_pe = past["c_kv"], past["k_pe"]  # [S, R], [S, Dr], in the cache's dtype
        S = c_kv.shape[0]
        mask = causal_mask(T, S, x.device, start) if self.engine_uk is None else None
        if T <= ABSORB_MAX_TOKENS or self.absorb_always:
            out = self._absorbed(q_nope, q_pe, c_kv, k_pe, mask)
        else:
            out = self._decompressed(q_nope, q_pe, c_kv, k_pe, mask)
        return self.o_proj(out.reshape(T, H * self.v_head_dim))

    def _engine_forward(self, x, cos_sin, cache: KVCache, start: int, norm=None, eps: float = 1e-6,
                        residual: bool = False) -> torch.Tensor:
        """The whole block (projections, latent norm, rope, cache write, absorbed attention) in one engine call;
        norm, eps, residual as engine_pre_norm gives them (the block on the normed x, plus x)."""
        from offload.torch_ops import run_mla_forward

        buf = cache.layer(self.layer_idx)
        cos, sin = cos_sin
        out = run_mla_forward(self.engine_layer, x.float().contiguous(), cos, sin, buf["c_kv"], buf["k_pe"], start,
                              norm, eps, residual)
        return out.to(x.dtype)

    def _softmax(self, scores: torch.Tensor, mask, dtype) -> torch.Tensor:
        scores = scores * self.softmax_scale
        if mask is not None:
            scores = scores + mask
        return torch.softmax(scores, dim=-1, dtype=torch.float32).to(dtype)

    def _decompressed(self, q_nope, q_pe, c_kv, k_pe, mask):
        """Prefill: expand the latent to per-head K/V. Returns [T, H, Dv]."""
        H, Dn, Dv = self.n_heads, self.qk_nope_head_dim, self.v_head_dim
        c_kv, k_pe = c_kv.to(q_nope.dtype), k_pe.to(q_nope.dtype)
        kv = self.kv_b_proj(c_kv).view(-1, H, Dn + Dv)  # [S, H, Dn+Dv]
        k_nope, v = kv[..., :Dn], kv[..., Dn:]
        q = torch.cat((q_nope, q_pe), dim=-1).transpose(0, 1)  # [H, T, Dn+Dr]
        k = torch.cat((k_nope, k_pe[:, None, :].expand(-1, H, -1)), dim=-1).transpose(0, 1)  # [H, S, Dn+Dr]
        p = self._softmax(q @ k.transpose(1, 2), mask, q.dtype)  # [H, T, S]
        return (p @ v.transpose(0, 1)).transpose(0, 1)  # [T, H, Dv]

    def _absorbed(self, q_nope, q_pe, c_kv, k_pe, mask):
        """Decode: score and mix in latent space. Returns [T, H, Dv]."""
        if self.engine_uk is not None and c_kv.device.type == "cpu":
            return self._absorbed_engine(q_nope, q_pe, c_kv, k_pe)
        H, Dn, Dv, R = self.n_heads, self.qk_nope_head_dim, self.v_head_dim, self.kv_lora_rank
        w = self.kv_b_proj.weight.view(H, Dn + Dv, R)
        w_uk, w_uv = w[:, :Dn], w[:, Dn:]  # [H, Dn, R], [H, Dv, R]
        q_lat = torch.einsum("thd,hdr->htr", quantize_activation(q_nope, self.act_format_uk), w_uk)  # [H, T, R]
        q_pe = q_pe.transpose(0, 1)  # [H, T, Dr]
        # a cache kept in lower precision (f16, as llama.cpp's default) is dotted with queries and
        # weights rounded to that precision, as llama.cpp does
        low = cache_precision(c_kv.dtype, q_lat.dtype)
        q_lat, q_pe = quantize_activation(q_lat, low), quantize_activation(q_pe, low)
        c_kv, k_pe = c_kv.to(q_lat.dtype), k_pe.to(q_lat.dtype)
        scores = q_lat @ c_kv.T + q_pe @ k_pe.T  # [H, T, S]
        p = quantize_activation(self._softmax(scores, mask, q_lat.dtype), low)
        o_lat = p @ c_kv  # [H, T, R]
        return torch.einsum("htr,hvr->thv", quantize_activation(o_lat, self.act_format_uv), w_uv)  # [T, H, Dv]

    def _absorbed_engine(self, q_nope, q_pe, c_kv, k_pe):
        """The same on the CPU engine, from the GGUF blocks of W_UK / W_UV: three calls, all heads at once
        (the causal mask is implied: the new tokens are the last of the cache)."""
        from offload.torch_ops import run_linear_batched, run_mla_attention

        uk, uv = self.engine_uk, self.engine_uv
        q_lat = run_linear_batched(q_nope.float().transpose(0, 1).contiguous(), uk.data, uk.type_id,
                                   self.kv_lora_rank)  # [H, T, R]
        o_lat = run_mla_attention(q_lat, q_pe.float().transpose(0, 1).contiguous(), c_kv, k_pe, self.softmax_scale)
        out = run_linear_batched(o_lat, uv.data, uv.type_id, self.v_head_dim)  # [H, T, Dv]
        return out.transpose(0, 1).to(q_nope.dtype)
