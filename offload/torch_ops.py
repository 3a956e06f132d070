"""The engine's ops as torch custom ops (`torch.ops.tandem.*`), so a decode step that calls them stays
an ordinary graph for torch.compile / CUDA graphs. Tensors cross to C++ by pointer (DLPack): CPU,
contiguous; weights are uint8 tensors over the GGUF bytes (torch.from_numpy of the memory map)."""

from __future__ import annotations

import atexit
import weakref

import numpy as np
import torch

from . import _C
from .engine import CpuEngine

_ENGINE: list[CpuEngine] = []  # the process's engine, created on first use (one pool per process)


def engine() -> CpuEngine:
    """The process-wide CPU engine (threads = physical cores unless set_engine() was called first)."""
    if not _ENGINE:
        _ENGINE.append(CpuEngine())
    return _ENGINE[0]


def set_engine(e: CpuEngine) -> None:
    _ENGINE[:] = [e]


@atexit.register
def _shutdown() -> None:
    """Join the pool before the interpreter tears down (a pending async call included)."""
    for e in _ENGINE:
        e.wait()
    _ENGINE.clear()


def _np(t):
    """A numpy view of a CPU tensor: nanobind takes numpy arrays in ~1 us, torch tensors through
    __dlpack__ in ~7 (a decode step makes ~30 calls a layer). bfloat16 has no numpy dtype: left as is."""
    return t.numpy() if isinstance(t, torch.Tensor) and t.dtype != torch.bfloat16 else t


def _f32(t):
    """A float32 numpy array of a (parameter) tensor, for a fused layer to copy at load; None stays None."""
    return None if t is None else t.detach().float().contiguous().numpy()


def _t(a):
    """The tensor for a custom op's argument (weights may be kept as numpy views of the file)."""
    return torch.from_numpy(a) if isinstance(a, np.ndarray) else a


# ---- the engine calls, once each: the custom ops below and the eager run_* functions both use them

def _linear(x, weight, wtype: int, out_features: int, norm=None, eps: float = 1e-6) -> torch.Tensor:
    out = torch.empty(x.shape[0], out_features, dtype=torch.float32)
    e = engine()
    e._engine.linear(wtype, _np(weight), _np(x.contiguous()), out.numpy(), e.isa, _np(norm), eps)
    return out


def _linear_batched(x, weight, wtype: int, out_features: int) -> torch.Tensor:
    out = torch.empty(x.shape[0], x.shape[1], out_features, dtype=torch.float32)
    e = engine()
    e._engine.linear_batched(wtype, _np(weight), _np(x.contiguous()), out.numpy(), e.isa)
    return out


def _mla_attention(q_lat, q_pe, c_kv, k_pe, scale: float) -> torch.Tensor:
    out = torch.empty_like(q_lat)
    e = engine()
    e._engine.mla_attention(_np(q_lat.contiguous()), _np(q_pe.contiguous()), _np(c_kv), _np(k_pe), scale,
                            out.numpy(), e.isa)
    return out


# the fused layers (_C.MlaLayer, _C.GqaLayer, _C.MoeLayer) alive, by the id a custom op call names them with (the model
# holds them)
_LAYERS: weakref.WeakValueDictionary = weakref.WeakValueDictionary()


def mla_layer(hidden: int, heads: int, nope_dim: int, rope_dim: int, kv_lora_rank: int, v_dim: int, q_a, q_a_norm,
              q, kv_a, kv_a_norm, uk, uv, o, eps: float, scale: float, rope_interleaved: bool):
    """One layer's MLA weights, checked once, for `run_mla_forward` (a _C.MlaLayer, which keeps them alive).
    Weights are EngineWeights (q_a and q_a_norm None without a q LoRA); norms float32 tensors."""
    def w(e):
        return None if e is None else (e.data, e.type_id)

    layer = _C.MlaLayer(hidden, heads, nope_dim, rope_dim, kv_lora_rank, v_dim, w(q_a), _f32(q_a_norm), w(q), w(kv_a),
                        _f32(kv_a_norm), w(uk), w(uv), w(o), eps, scale, rope_interleaved)
    _LAYERS[id(layer)] = layer
    return layer


def gqa_layer(hidden: int, heads: int, kv_heads: int, head_dim: int, q, k, v, o, q_norm, k_norm, eps: float,
              scale: float, rope_interleaved: bool):
    """One layer's grouped-query attention weights, checked once, for `run_gqa_forward` (a _C.GqaLayer, which
    keeps them alive). Weights are EngineWeights; q_norm / k_norm float32 tensors [head_dim] or None."""
    layer = _C.GqaLayer(hidden, heads, kv_heads, head_dim, *((w.data, w.type_id) for w in (q, k, v, o)), _f32(q_norm),
                        _f32(k_norm), eps, scale, rope_interleaved)
    _LAYERS[id(layer)] = layer
    return layer


def moe_layer(gate, up, down, types, shared, shared_types, router_weight: torch.Tensor, bias, top_k: int, scoring: str,
              topk_method: str, n_group: int, topk_group: int, norm_topk_prob: bool, routed_scaling_factor: float):
    """One MoE layer (router + routed and shared experts, as run_moe takes them), checked once, for
    `run_moe_layer` (a _C.MoeLayer, which keeps the weights alive). router_weight float32 [E, H]."""
    spec = [(_np(shared[i]), shared_types[i], _np(shared[i + 1]), shared_types[i + 1], _np(shared[i + 2]),
             shared_types[i + 2]) for i in range(0, len(shared), 3)]
    layer = _C.MoeLayer(_np(gate), types[0], _np(up), types[1], _np(down), types[2], spec, (_f32(router_weight), 0),
                        _f32(bias), top_k, scoring, topk_method, n_group, topk_group, norm_topk_prob,
                        routed_scaling_factor)
    _LAYERS[id(layer)] = layer
    return layer


def _moe_layer(layer, x, top_k: int, norm=None, eps: float = 1e-6,
               residual: bool = False) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    out = torch.empty_like(x, dtype=torch.float32)
    ids = torch.empty(x.shape[0], top_k, dtype=torch.int64)
    weights = torch.empty(x.shape[0], top_k, dtype=torch.float32)
    e = engine()
    e._engine.moe_layer(layer, _np(x.contiguous()), out.numpy(), ids.numpy(), weights.numpy(), e.isa, _np(norm), eps,
                        residual)
    return out, weights, ids


def _attention_block(layer, x, cos, sin, cache_a, cache_b, start: int, norm=None, eps: float = 1e-6,
                     residual: bool = False) -> torch.Tensor:
    """Engine.mla_forward (layer a _C.MlaLayer, caches c_kv, k_pe) or gqa_forward (a _C.GqaLayer; k, v)."""
    out = torch.empty_like(x, dtype=torch.float32)
    e = engine()
    forward = e._engine.gqa_forward if isinstance(layer, _C.GqaLayer) else e._engine.mla_forward
    forward(layer, _np(x.contiguous()), _np(cos.contiguous()), _np(sin.contiguous()), _np(cache_a), _np(cache_b), start,
            out.numpy(), e.isa, _np(norm), eps, residual)
    return out


def _moe(x, ids, weights, gate, up, down, types, shared, shared_types, skip=None, async_=False) -> torch.Tensor:
    out = torch.empty_like(x, dtype=torch.float32)
    spec = [(_np(shared[i]), shared_types[i], _np(shared[i + 1]), shared_types[i + 1], _np(shared[i + 2]),
             shared_types[i + 2]) for i in range(0, len(shared), 3)]
    e = engine()
    e._engine.moe(_np(x.contiguous()), _np(ids.contiguous()), _np(weights.contiguous()), _np(gate), types[0],
                  _np(up), types[1], _np(down), types[2], spec, _np(skip), out.numpy(), e.isa, async_)
    return out


# ---- custom ops (what torch.compile / CUDA graphs see)

@torch.library.custom_op("tandem::linear", mutates_args=())
def linear(x: torch.Tensor, weight: torch.Tensor, wtype: int, out_features: int) -> torch.Tensor:
    """x [T, K] float32 @ weight [N, row bytes] (GGUF type `wtype`)^T -> [T, N] float32."""
    return _linear(x, weight, wtype, out_features)


@linear.register_fake
def _(x, weight, wtype, out_features):
    return x.new_empty(x.shape[0], out_features, dtype=torch.float32)


@torch.library.custom_op("tandem::moe", mutates_args=())
def moe(x: torch.Tensor, ids: torch.Tensor, weights: torch.Tensor, gate: torch.Tensor, up: torch.Tensor,
        down: torch.Tensor, types: list[int], shared: list[torch.Tensor], shared_types: list[int]) -> torch.Tensor:
    """Fused routed (+ shared) experts: x [T, H] float32, ids [T, A] int64 (-1 skips), weights [T, A] float32;
    gate/up [E, I, bytes], down [E, H, bytes] uint8 in GGUF types `types` = [gate, up, down];
    shared = [gate, up, down, ...] 2-D uint8 per shared expert with shared_types alike."""
    return _moe(x, ids, weights, gate, up, down, types, shared, shared_types)


@moe.register_fake
def _(x, ids, weights, gate, up, down, types, shared, shared_types):
    return torch.empty_like(x, dtype=torch.float32)


@torch.library.custom_op("tandem::linear_batched", mutates_args=())
def linear_batched(x: torch.Tensor, weight: torch.Tensor, wtype: int, out_features: int) -> torch.Tensor:
    """x [B, T, K] float32, weight a stack [B, N, row bytes] (GGUF type `wtype`) -> [B, T, N] float32."""
    return _linear_batched(x, weight, wtype, out_features)


@linear_batched.register_fake
def _(x, weight, wtype, out_features):
    return x.new_empty(x.shape[0], x.shape[1], out_features, dtype=torch.float32)


@torch.library.custom_op("tandem::mla_attention", mutates_args=())
def mla_attention(q_lat: torch.Tensor, q_pe: torch.Tensor, c_kv: torch.Tensor, k_pe: torch.Tensor,
                  scale: float) -> torch.Tensor:
    """MLA in latent space: q_lat [H, T, R], q_pe [H, T, Dr] float32; c_kv [S, R], k_pe [S, Dr] (f32/f16/bf16),
    the T new tokens being the last T of S (causal) -> o_lat [H, T, R] float32."""
    return _mla_attention(q_lat, q_pe, c_kv, k_pe, scale)


@mla_attention.register_fake
def _(q_lat, q_pe, c_kv, k_pe, scale):
    return torch.empty_like(q_lat)


@torch.library.custom_op("tandem::mla_forward", mutates_args=("c_kv", "k_pe"))
def mla_forward(x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor, c_kv: torch.Tensor, k_pe: torch.Tensor,
                start: int, layer: int, norm: torch.Tensor | None = None, eps: float = 1e-6,
                residual: bool = False) -> torch.Tensor:
    """One layer's absorbed MLA (offload/csrc/mla.h): x [T, D] float32 -> [T, D]; the new latents go into
    rows start..start+T of c_kv [positions, R] / k_pe [positions, Dr]; `layer` is id() of an mla_layer().
    norm [D] float32: attend from rmsnorm(x) * norm; residual: return x + the attention's output."""
    return _attention_block(_LAYERS[layer], x, cos, sin, c_kv, k_pe, start, norm, eps, residual)


@mla_forward.register_fake
def _(x, cos, sin, c_kv, k_pe, start, layer, norm=None, eps=1e-6, residual=False):
    return torch.empty_like(x, dtype=torch.float32)


@torch.library.custom_op("tandem::gqa_forward", mutates_args=("k_cache", "v_cache"))
def gqa_forward(x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor, k_cache: torch.Tensor, v_cache: torch.Tensor,
                start: int, layer: int, norm: torch.Tensor | None = None, eps: float = 1e-6,
                residual: bool = False) -> torch.Tensor:
    """One layer's grouped-query attention (offload/csrc/gqa.h): x [T, D] float32 -> [T, D]; the new keys and
    values go into rows start..start+T of k_cache / v_cache [positions, kv_heads, head_dim]; `layer` is id() of
    a gqa_layer(). norm [D] float32: attend from rmsnorm(x) * norm; residual: return x + the attention's output."""
    return _attention_block(_LAYERS[layer], x, cos, sin, k_cache, v_cache, start, norm, eps, residual)


@gqa_forward.register_fake
def _(x, cos, sin, k_cache, v_cache, start, layer, norm=None, eps=1e-6, residual=False):
    return torch.empty_like(x, dtype=torch.float32)


@torch.library.custom_op("tandem::moe_layer", mutates_args=())
def moe_layer_op(x: torch.Tensor, top_k: int, layer: int, norm: torch.Tensor | None = None, eps: float = 1e-6,
                 residual: bool = False) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """One MoE layer: route x [T, H] float32 and run its experts -> (out [T, H], weights [T, top_k] float32,
    ids [T, top_k] int64); `layer` is id() of a moe_layer(). norm [H] float32: route and run the experts on
    rmsnorm(x) * norm; residual: out = x + the experts' output."""
    return _moe_layer(_LAYERS[layer], x, top_k, norm, eps, residual)


@moe_layer_op.register_fake
def _(x, top_k, layer, norm=None, eps=1e-6, residual=False):
    T = x.shape[0]
    return (torch.empty_like(x, dtype=torch.float32), x.new_empty(T, top_k, dtype=torch.float32),
            x.new_empty(T, top_k, dtype=torch.int64))


# ---- what the model code calls: the custom op under torch.compile, the engine directly in eager mode
# (the custom-op dispatch costs ~10 us a call, a fifth of a small decode-time linear); weights may be
# numpy views of the file

def run_linear(x: torch.Tensor, weight, wtype: int, out_features: int, norm=None, eps: float = 1e-6) -> torch.Tensor:
    """x [T, K] float32 -> [T, N]; norm [K] float32: the matrix takes rmsnorm(x) * norm instead of x, normed in
    the engine's call (after the weights of a decode step have swept the caches, a torch RMSNorm took ~0.2 ms)."""
    if torch.compiler.is_compiling():
        if norm is not None:
            x = torch.rms_norm(x, (x.shape[-1],), norm, eps)
        return torch.ops.tandem.linear(x, _t(weight), wtype, out_features)
    return _linear(x, weight, wtype, out_features, norm, eps)


def run_linear_batched(x: torch.Tensor, weight, wtype: int, out_features: int) -> torch.Tensor:
    if torch.compiler.is_compiling():
        return torch.ops.tandem.linear_batched(x, _t(weight), wtype, out_features)
    return _linear_batched(x, weight, wtype, out_features)


def run_mla_attention(q_lat, q_pe, c_kv, k_pe, scale: float) -> torch.Tensor:
    if torch.compiler.is_compiling():
        return torch.ops.tandem.mla_attention(q_lat, q_pe, c_kv, k_pe, scale)
    return _mla_attention(q_lat, q_pe, c_kv, k_pe, scale)


def run_mla_forward(layer, x, cos, sin, c_kv, k_pe, start: int, norm=None, eps: float = 1e-6,
                    residual: bool = False) -> torch.Tensor:
    if torch.compiler.is_compiling():
        return torch.ops.tandem.mla_forward(x, cos, sin, c_kv, k_pe, start, id(layer), norm, eps, residual)
    return _attention_block(layer, x, cos, sin, c_kv, k_pe, start, norm, eps, residual)


def run_gqa_forward(layer, x, cos, sin, k_cache, v_cache, start: int, norm=None, eps: float = 1e-6,
                    residual: bool = False) -> torch.Tensor:
    if torch.compiler.is_compiling():
        return torch.ops.tandem.gqa_forward(x, cos, sin, k_cache, v_cache, start, id(layer), norm, eps, residual)
    return _attention_block(layer, x, cos, sin, k_cache, v_cache, start, norm, eps, residual)


def run_moe_layer(layer, x, top_k: int, norm=None, eps: float = 1e-6,
                  residual: bool = False) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    if torch.compiler.is_compiling():
        return torch.ops.tandem.moe_layer(x, top_k, id(layer), norm, eps, residual)
    return _moe_layer(layer, x, top_k, norm, eps, residual)


def decoder_stack(attn: list, moe: list, norms1: list, norms2: list):
    """Consecutive decoder layers for `run_decoder_stack` (a _C.DecoderStack, which keeps them alive): per layer
    its attention block's and MoE layer's engine handles and the RMSNorm modules before them."""
    return _C.DecoderStack(attn, moe, [_f32(n.weight) for n in norms1], [n.eps for n in norms1],
                           [_f32(n.weight) for n in norms2], [n.eps for n in norms2])


def run_decoder_stack(stack, x, cos, sin, caches: list, start: int, top_k: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Decoder layers in one engine call: x [T, D] float32 -> (the last layer's output [T, D], every layer's
    routed expert ids [layers, T, top_k] int64). caches: per layer its two cache arrays (KVCache.arrays)."""
    e = engine()
    xn = x.numpy()
    out = np.empty_like(xn)
    ids = np.empty((len(stack), xn.shape[0], top_k), np.int64)
    weights = np.empty((len(stack), xn.shape[0], top_k), np.float32)
    e._engine.decoder_stack(stack, xn, cos.numpy(), sin.numpy(), [c[0] for c in caches], [c[1] for c in caches], start,
                            out, ids, weights, e.isa)
    return torch.from_numpy(out), torch.from_numpy(ids)


def run_moe(x, ids, weights, gate, up, down, types, shared, shared_types) -> torch.Tensor:
    if torch.compiler.is_compiling():
        return torch.ops.tandem.moe(x, ids, weights, _t(gate), _t(up), _t(down), types, [_t(s) for s in shared],
                                    shared_types)
    return _moe(x, ids, weights, gate, up, down, types, shared, shared_types)


def submit_moe(x, ids, weights, gate, up, down, types, skip=None) -> torch.Tensor:
    """Start the routed experts on the engine's pool and return at once; `wait_moe()` joins. The
    returned output tensor (and the inputs) must stay alive and untouched until then."""
    return _moe(x, ids, weights, gate, up, down, types, [], [], skip=skip, async_=True)


def wait_moe() -> None:
    engine().wait()
