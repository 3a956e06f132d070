"""Pieces every architecture shares: RMSNorm, the SwiGLU MLP, RoPE (default / linear / YaRN), the embedding
from GGUF blocks."""

from __future__ import annotations

import math
from dataclasses import dataclass

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn

from ..config import RopeSpec, yarn_get_mscale

ACTIVATIONS = {"silu": F.silu, "swish": F.silu, "gelu": F.gelu, "relu": F.relu}


def activation(name: str):
    try:
        return ACTIVATIONS[name]
    except KeyError:
        raise ValueError(f"hidden_act '{name}' is not supported; supported: {', '.join(ACTIVATIONS)}") from None


# What llama.cpp's CPU backend turns a matmul's activations into, by the weight's GGUF type
# (its `vec_dot_type`): the numerics we reproduce so that GGUF logits compare with llama.cpp's.
ACTIVATION_FORMAT = {"Q4_0": "q8_0", "Q5_0": "q8_0", "Q8_0": "q8_0", "Q4_1": "q8_0", "Q5_1": "q8_0",
                     "Q4_K": "q8_k", "Q5_K": "q8_k", "Q6_K": "q8_k", "F16": "f16", "BF16": "bf16"}


def quantize_activation(x: torch.Tensor, fmt: str | None) -> torch.Tensor:
    """x [..., K] rounded as llama.cpp quantizes activations before a quantized dot product, returned
    dequantized: q8_0 (blocks of 32, d = amax/127 kept as f16, round half to even), q8_k (blocks of 256,
    scale from the signed max, d in f32), or an f16/bf16 cast. Rows that do not split into blocks pass."""
    if fmt is None:
        return x
    if fmt == "f16":
        return x.half().to(x.dtype)
    if fmt == "bf16":
        return x.bfloat16().to(x.dtype)
    block = 32 if fmt == "q8_0" else 256
    if x.shape[-1] % block:
        return x
    b = x.float().reshape(*x.shape[:-1], -1, block)
    if fmt == "q8_0":
        amax = b.abs().amax(-1, keepdim=True)
        inv = torch.where(amax > 0, 127.0 / amax, torch.zeros_like(amax))
        q = torch.round(b * inv)
        d = (amax / 127.0).half().float()
    else:
        idx = b.abs().argmax(-1, keepdim=True)
        vmax = b.gather(-1, idx)
        iscale = torch.where(vmax != 0, -127.0 / vmax, torch.zeros_like(vmax))
        q = torch.round(b * iscale).clamp(max=127)
        d = torch.where(iscale != 0, 1.0 / iscale, torch.zeros_like(iscale))
    return (q * d).reshape(x.shape).to(x.dtype)


@dataclass(frozen=True)
class EngineWeight:
    """A weight left in its GGUF layout (a view of the file) for the CPU engine to compute with."""

    type_id: int  # ggml type id
    data: object  # numpy view of the file: uint8 [..., rows, row bytes], or float32/float16 [..., rows, cols]
    rows: int
    cols: int


class Linear(nn.Linear):
    """nn.Linear whose input may first be rounded like llama.cpp's activations (`act_format`, set by
    the GGUF loader from the weight's stored type; None for HF checkpoints), or whose product the CPU
    engine computes straight from the GGUF blocks (`engine_weight`; then `weight` is never loaded)."""

    act_format: str | None = None
    engine_weight: EngineWeight | None = None

    def reset_parameters(self) -> None:
        """No random init: every loader fills the weights. On the meta device, where loaders build models,
        the init took near half the build: Qwen3-30B-A3B's 18k expert projections 2.2 -> 1.3 s, DeepSeek-V3's
        4.4 -> 2.6 s."""

    def forward(self, x: torch.Tensor, pre_norm: RMSNorm | None = None) -> torch.Tensor:
        """pre_norm: the matrix takes pre_norm(x) (a model's final norm before its output head); on the engine
        the norm runs inside its call where it can (engine_pre_norm)."""
        w = self.engine_weight
        if w is not None:
            from offload.torch_ops import run_linear

            fused = engine_pre_norm(pre_norm, x)  # {} without pre_norm, None where the engine cannot take it
            if fused is None:
                x, fused = pre_norm(x), {}
            y = run_linear(x.float().contiguous(), w.data, w.type_id, w.rows, fused.get("norm"), fused.get("eps", 1e-6))
            return y.to(x.dtype) if self.bias is None else (y + self.bias).to(x.dtype)
        if pre_norm is not None:
            x = pre_norm(x)
        return super().forward(quantize_activation(x, self.act_format))


class RMSNorm(nn.Module):
    def __init__(self, dim: int, eps: float = 1e-6):
        super().__init__()
        self.weight = nn.Parameter(torch.ones(dim))
        self.eps = eps


    def forward(self, x: torch.Tensor) -> torch.Tensor:
        # statistics in fp32, scale applied in the input dtype (as the HF reference does)
        if x.dtype == torch.float32 and self.weight.dtype == torch.float32:
            return torch.rms_norm(x, (x.shape[-1],), self.weight, self.eps)  # one fused op (decode overhead)
        xf = x.float()
        xf = xf * torch.rsqrt(xf.pow(2).mean(-1, keepdim=True) + self.eps)
        return self.weight * xf.to(x.dtype)


def empty_embedding(vocab: int, dim: int) -> nn.Embedding:
    """nn.Embedding [vocab, dim] left uninitialized: every loader fills it. Its random init on the meta
    device (where loaders build models) ran torch's Python decompositions and imported them: ~1.3 s, half
    of `tandem run` on the demo model."""
    return nn.Embedding(vocab, dim, _weight=torch.empty(vocab, dim))


class QuantEmbedding(nn.Module):
    """nn.Embedding's lookup straight from a GGUF's token embedding blocks as stored (memory-mapped): only the
    rows a step asks for are dequantized, by the engine (`_C.get_rows`, as llama.cpp's get_rows; any type the
    engine reads). A float32 table would take 0.84 GB for DeepSeek-V2-Lite, 1.24 GB for Qwen3-30B-A3B and
    3.7 GB for DeepSeek-V3, and seconds to dequantize at load."""

    def __init__(self, blocks, qtype, embedding_dim: int, dtype: torch.dtype = torch.float32):
        super().__init__()
        self.blocks, self.type_id, self.out_dtype = blocks, int(qtype), dtype
        self.qtype_name = getattr(qtype, "name", str(qtype))
        self.num_embeddings, self.embedding_dim = int(blocks.shape[0]), embedding_dim
        self(torch.zeros(1, dtype=torch.int64))  # a type or a table the engine cannot read fails here, at load

    @property
    def device(self) -> torch.device:
        return torch.device("cpu")

    def forward(self, ids: torch.Tensor) -> torch.Tensor:
        from offload import _C

        if ids.device.type != "cpu":
            raise ValueError(f"token ids on {ids.device}: this embedding is read from the GGUF file on the CPU")
        index = ids.reshape(-1).numpy()
        if index.dtype != np.int64:
            index = index.astype(np.int64)
        try:
            rows = _C.get_rows(self.type_id, self.blocks, index, self.embedding_dim)  # it checks the ids
        except ValueError:
            bad = index[(index < 0) | (index >= self.num_embeddings)]
            if not bad.size:
                raise
            raise IndexError(f"token id {bad[0]} is outside the vocabulary (0..{self.num_embeddings - 1})") from None
        out = torch.from_numpy(rows.reshape(*ids.shape, self.embedding_dim))
        return out if self.out_dtype == torch.float32 else out.to(self.out_dtype)

    def extra_repr(self) -> str:
        return f"{self.num_embeddings}, {self.embedding_dim}, {self.qtype_name} blocks"


def engine_pre_norm(pre_norm: RMSNorm | None, x: torch.Tensor) -> dict | None:
    """The keyword arguments (norm, eps, residual) of an engine layer call that runs x + block(pre_norm(x))
    itself (a decoder layer's pre-norm block fused into the call; none without pre_norm), or None where the
    engine cannot apply this norm (x or its weight not float32 on the CPU): then the caller norms in torch."""
    if pre_norm is None:
        return {}
    w = pre_norm.weight
    if x.dtype == torch.float32 and w.dtype == torch.float32 and x.device.type == "cpu" and w.device.type == "cpu":
        return {"norm": w.detach(), "eps": pre_norm.eps, "residual": True}
    return None


class EngineStack:
    """Consecutive decoder layers (self_attn, mlp and their RMSNorms) whose attention block and MoE layer are
    each one CPU engine call (a GGUF on the CPU), run as one engine call for them all (torch_ops.run_decoder_stack):
    per layer x + attn(norm(x)), then h + moe(norm(h)), the numbers of the blocks' own forwards without the
    Python and torch ops around each (in a decode step they run with the caches just swept by the weights:
    ~0.2 ms a layer)."""

    def __init__(self, layers: list):
        from offload.torch_ops import decoder_stack

        self.blocks = [(layer, layer.self_attn, layer.mlp) for layer in layers]
        self.bound = [(attn.engine_layer, mlp.engine_layer) for _, attn, mlp in self.blocks]
        # the blocks' hook dicts themselves (register_forward_hook adds to them): checked each step without a
        # lookup in each module (cold in a decode step: ~8 us a layer that way)
        self.hooks = tuple(getattr(m, name) for block in self.blocks for m in block
                           for name in ("_forward_hooks", "_forward_pre_hooks"))
        self.top_k = layers[0].mlp.gate.top_k
        self.stack = decoder_stack([a for a, _ in self.bound], [m for _, m in self.bound],
                                   [layer.input_layernorm for layer in layers],
                                   [layer.post_attention_layernorm for layer in layers])

    def __len__(self) -> int:
        return len(self.blocks)

    @staticmethod
    def fits(layer: nn.Module) -> bool:
        """Whether a decoder layer can be part of a stack: both blocks bound to the engine, float32 norms."""
        return (getattr(layer.self_attn, "engine_layer", None) is not None
                and getattr(layer.mlp, "engine_layer", None) is not None
                and all(n.weight.dtype == torch.float32 and n.weight.device.type == "cpu"
                        for n in (layer.input_layernorm, layer.post_attention_layernorm)))

    def usable(self, x: torch.Tensor, start) -> bool:
        """Whether this step can run as the stack: x float32 on the CPU, an int start (not a fixed-shape step),
        no torch.compile, and every block still bound as it was and without hooks (the bench's stage breakdown
        hooks them: then the modules run)."""
        if isinstance(start, torch.Tensor) or x.dtype != torch.float32 or x.device.type != "cpu":
            return False
        if torch.compiler.is_compiling() or any(self.hooks) or _global_hooks():
            return False
        return all(attn.engine_layer is a and mlp.engine_layer is m
                   for (_, attn, mlp), (a, m) in zip(self.blocks, self.bound))

    def __call__(self, x: torch.Tensor, cos_sin, cache, start: int) -> torch.Tensor:
        from offload.torch_ops import run_decoder_stack

        caches = [attn.engine_cache(cache) for _, attn, _ in self.blocks]
        out, ids = run_decoder_stack(self.stack, x.contiguous(), *cos_sin, caches, start, self.top_k)
        if any(mlp.expert_counts is not None for _, _, mlp in self.blocks):  # routing statistics on (the chat)
            for (_, _, mlp), layer_ids in zip(self.blocks, ids):  # (off, a call and a view a layer: ~5 us each)
                mlp._count(layer_ids)
        return out


def _global_hooks() -> bool:
    """Whether a forward hook is registered for every module (torch.nn.modules.module.register_module_forward_hook)."""
    from torch.nn.modules import module

    return bool(module._global_forward_hooks or module._global_forward_pre_hooks)


def engine_stacks(layers) -> dict[int, EngineStack]:
    """The runs of consecutive layers that fit an EngineStack, by their first layer's index."""
    stacks, i = {}, 0
    while i < len(layers):
        j = i
        while j < len(layers) and EngineStack.fits(layers[j]):
            j += 1
        if j > i:
            stacks[i] = EngineStack(list(layers[i:j]))
        i = max(j, i + 1)
    return stacks


class MLP(nn.Module):
    """down(act(gate(x)) * up(x)); also one routed or shared expert."""

    def __init__(self, hidden: int, intermediate: int, act: str = "silu", bias: bool = False):
        super().__init__()
        self.gate_proj = Linear(hidden, intermediate, bias=bias)
        self.up_proj = Linear(hidden, intermediate, bias=bias)
        self.down_proj = Linear(intermediate, hidden, bias=bias)
        self.act = activation(act)

    def forward(self, x: torch.Tensor, pre_norm: RMSNorm | None = None) -> torch.Tensor:
        """pre_norm (a decoder layer's norm before this block): x is the residual stream, and the result
        x + mlp(pre_norm(x))."""
        if pre_norm is not None:
            return x + self.forward(pre_norm(x))
        return self.down_proj(self.act(self.gate_proj(x)) * self.up_proj(x))


def rope_inv_freq(spec: RopeSpec, dim: int) -> tuple[torch.Tensor, float]:
    """Inverse frequencies [dim/2] and the cos/sin magnitude factor, as HF's rope init functions compute them."""
    exponents = torch.arange(0, dim, 2, dtype=torch.int64, device="cpu").float() / dim
    pos_freqs = spec.theta ** exponents
    if spec.rope_type == "default":
        return 1.0 / pos_freqs, 1.0
    if spec.rope_type == "linear":
        return 1.0 / pos_freqs / spec.factor, 1.0
    # YaRN: keep high frequencies, interpolate low ones, linear ramp between
    factor = spec.factor
    attention_factor = spec.attention_factor
    if attention_factor is None:
        if spec.mscale and spec.mscale_all_dim:
            attention_factor = yarn_get_mscale(factor, spec.mscale) / yarn_get_mscale(factor, spec.mscale_all_dim)
        else:
            attention_factor = yarn_get_mscale(factor)

    def correction_dim(rotations: float) -> float:
        return dim * math.log(spec.original_max_position_embeddings / (rotations * 2 * math.pi)) / (2 * math.log(spec.theta))

    low, high = correction_dim(spec.beta_fast), correction_dim(spec.beta_slow)
    if spec.truncate:
        low, high = math.floor(low), math.ceil(high)
    low, high = max(low, 0), min(high, dim - 1)
    if low == high:
        high += 0.001
    ramp = ((torch.arange(dim // 2, dtype=torch.float32, device="cpu") - low) / (high - low)).clamp(0, 1)
    extrapolation = 1 - ramp
    inv_freq = (1.0 / (factor * pos_freqs)) * (1 - extrapolation) + (1.0 / pos_freqs) * extrapolation
    return inv_freq, float(attention_factor)


class Rope:
    """Rotary embedding over the last dim of q/k.

    interleaved=True rotates adjacent pairs (x0,x1),(x2,x3)… (DeepSeek, llama.cpp's NORM mode);
    False rotates the two halves (x_i, x_{i+d/2}) (Qwen, NEOX mode).
    """

    def __init__(self, spec: RopeSpec, dim: int, interleaved: bool):
        self.inv_freq, self.attention_scaling = rope_inv_freq(spec, dim)
        self.interleaved = interleaved
        self.dim = dim
        self._inv_on: dict[torch.device, torch.Tensor] = {}  # inv_freq per device: no copy per step (nor in a graph)
        self._table_on: dict[torch.device, tuple[torch.Tensor, torch.Tensor]] = {}  # cos_sin_range's, per device

    def cos_sin(self, positions: torch.Tensor, device=None) -> tuple[torch.Tensor, torch.Tensor]:
        """cos, sin [T, dim/2] in fp32 for integer positions [T]."""
        dev = torch.device(device or positions.device)
        inv = self._inv_on.get(dev)
        if inv is None:
            inv = self._inv_on[dev] = self.inv_freq.to(dev)
        freqs = positions.to(inv.device).float()[:, None] * inv[None, :]
        return freqs.cos() * self.attention_scaling, freqs.sin() * self.attention_scaling

    def cos_sin_range(self, start: int, T: int, device) -> tuple[torch.Tensor, torch.Tensor]:
        """cos_sin(arange(start, start + T)) as views of a table of every position so far, on `device` (grown to
        twice the positions asked when short): a decode step computed its one row in 4 cold torch ops,
        ~65-120 us. The same floats: cos and sin element by element of the same products."""
        dev = torch.device(device)
        table = self._table_on.get(dev)
        if table is None or table[0].shape[0] < start + T:
            table = self._table_on[dev] = self.cos_sin(torch.arange(2 * (start + T), device=dev))
        return table[0][start:start + T], table[1][start:start + T]

    def apply(self, x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> torch.Tensor:
        """x [T, ..., dim] rotated; cos/sin [T, dim/2] broadcast over the middle dims."""
        shape = (cos.shape[0],) + (1,) * (x.dim() - 2) + (cos.shape[1],)
        cos, sin = cos.view(shape), sin.view(shape)
        xf = x.float()
        if self.interleaved:  # pairs (x0, x1) as complex numbers times cos + i sin: a few ops, not a dozen
            rot = torch.view_as_complex(xf.reshape(*xf.shape[:-1], -1, 2).contiguous()) * torch.complex(cos, sin)
            out = torch.view_as_real(rot).flatten(-2)
        else:
            half = self.dim // 2
            x1, x2 = xf[..., :half], xf[..., half:]
            out = torch.cat((x1 * cos - x2 * sin, x2 * cos + x1 * sin), dim=-1)
        return out.to(x.dtype)
