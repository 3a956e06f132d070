"""GGUF files (llama.cpp's `deepseek2` / `qwen3moe`) into the same modules as HF checkpoints.

Tensors are renamed to HF names (`quant.gguf_arch`), 3-D expert stacks are split per expert and
llama.cpp's `attn_k_b`/`attn_v_b` are joined back into `kv_b_proj`. Until the quantized CPU engine
runs block types directly, block-quantized tensors are dequantized to the compute dtype at load.
"""

from __future__ import annotations

import logging
import re
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import psutil
import torch

from quant.formats import dequantize
from quant.gguf_arch import EXPERT_NAMES, hf_tensor_name, join_kv_b, kv_to_config
from quant.gguf_file import GGUFModel
from quant.safetensors_file import CheckpointError

from .models import get_architecture

log = logging.getLogger("tandem")
_EXPERTS = {g: h for h, g in EXPERT_NAMES}
_BLK = re.compile(r"^blk\.(\d+)\.(.+)$")


@dataclass(frozen=True)
class _Info:
    shape: tuple[int, ...]


class GGUFTensors:
    """HF-named tensors of a GGUF model, dequantized on request (one expert stack cached at a time)."""

    def __init__(self, model: GGUFModel, n_layer: int):
        self.model = model
        self.sources: dict[str, tuple] = {}  # hf name -> ("plain", gguf) | ("expert", gguf, e) | ("kv_b", k, v)
        self.shapes: dict[str, tuple[int, ...]] = {}
        self._cached: tuple[str, np.ndarray] | None = None
        skipped = 0
        for name, t in model.tensors.items():
            m = _BLK.match(name)
            if m and int(m[1]) >= n_layer:
                skipped += 1  # MTP (nextn) layers are not run
                continue
            if m and m[2] in _EXPERTS:
                for e in range(t.shape[0]):
                    hf = f"model.layers.{m[1]}.mlp.experts.{e}.{_EXPERTS[m[2]]}.weight"
                    self.sources[hf], self.shapes[hf] = ("expert", name, e), t.shape[1:]
            elif m and m[2] in ("attn_k_b.weight", "attn_v_b.weight"):
                if m[2] == "attn_k_b.weight":
                    k, v = model.tensors[name], model.tensors.get(f"blk.{m[1]}.attn_v_b.weight")
                    if v is None:
                        raise CheckpointError(f"{model.path}: {name} has no blk.{m[1]}.attn_v_b.weight beside it")
                    hf = f"model.layers.{m[1]}.self_attn.kv_b_proj.weight"
                    H, R, Dn = k.shape
                    self.sources[hf] = ("kv_b", name, v.name)
                    self.shapes[hf] = (H * (Dn + v.shape[1]), R)
            else:
                hf = hf_tensor_name(name)
                if hf is None:
                    raise CheckpointError(f"{model.path}: tensor {name} is not part of a supported "
                                          f"{model.architecture} model")
                self.sources[hf], self.shapes[hf] = ("plain", name), t.shape
        if skipped:
            log.info("%s: %d MTP tensors kept out of the decoder", model.path.name, skipped)

    def names(self) -> list[str]:
        return list(self.sources)

    def info(self, name: str) -> _Info:
        return _Info(self.shapes[name])

    def get(self, name: str) -> torch.Tensor:
        kind, *args = self.sources[name]
        if kind == "plain":
            return torch.from_numpy(self._float(args[0]))
        if kind == "expert":
            if self._cached is None or self._cached[0] != args[0]:
                self._cached = (args[0], self._float(args[0]))
            return torch.from_numpy(self._cached[1][args[1]])
        return torch.from_numpy(join_kv_b(self._float(args[0]), self._float(args[1])))

    def _float(self, gguf_name: str) -> np.ndarray:
        t = self.model.tensors[gguf_name]
        return np.ascontiguousarray(dequantize(self.model.raw(gguf_name), t.qtype), dtype=np.float32).reshape(t.shape)

    def __str__(self) -> str:
        return str(self.model.path)


def check_memory(model: GGUFModel, dtype: torch.dtype, path: Path) -> None:
    """Refuse before allocating when the dequantized weights cannot fit in RAM."""
    n = sum(t.n_elements for t in model.tensors.values())
    need = n * torch.empty((), dtype=dtype).element_size()
    free = psutil.virtual_memory().available
    if need > 0.9 * free:
        raise MemoryError(f"{path.name} has {n / 1e9:.1f} B weights; dequantized to {dtype} they need "
                          f"{need / 2**30:.1f} GiB but {free / 2**30:.1f} GiB is free. Use --dtype bfloat16, "
                          "or a smaller model, until the quantized CPU engine runs GGUF blocks directly")


def read_gguf_config(path: Path):
    model = GGUFModel(path)
    tokens = model.kv.get("tokenizer.ggml.tokens")
    raw = kv_to_config(model.kv, len(tokens) if tokens is not None else 0, set(model.tensors))
    arch = get_architecture(raw["model_type"])
    return model, arch, arch.Config.from_dict(raw, source=str(path))


def load_gguf(path: str | Path, dtype: torch.dtype | None = None, device="cpu"):
    """(config, model, GGUFModel) for a GGUF file; dtype defaults to float32."""
    from .loader import load_weights

    path = Path(path)
    gmodel, arch, cfg = read_gguf_config(path)
    dtype = dtype or torch.float32
    check_memory(gmodel, dtype, path)
    tensors = GGUFTensors(gmodel, cfg.num_hidden_layers)
    mapping = arch.remap(tensors.names(), cfg)
    with torch.device("meta"):
        model = arch.build(cfg, list(mapping.values()))
    tied = cfg.tie_word_embeddings
    load_weights(model, tensors, mapping, dtype, torch.device(device), derived={"lm_head.weight"} if tied else set())
    if tied:
        model.lm_head.weight = model.model.embed_tokens.weight
    set_llama_numerics(model, tensors)
    model.checkpoint = gmodel
    return cfg, model, gmodel


def set_llama_numerics(model: torch.nn.Module, tensors: GGUFTensors) -> None:
    """Round activations as llama.cpp's CPU backend does for each weight's stored type, so logits of a
    quantized GGUF compare with llama.cpp's (see layers.quantize_activation)."""
    from .models.layers import ACTIVATION_FORMAT, Linear
    from .models.mla import MLAttention

    def fmt(gguf_name: str):
        return ACTIVATION_FORMAT.get(tensors.model.tensors[gguf_name].qtype.name)

    for name, module in model.named_modules():
        key = f"{name}.weight"
        if isinstance(module, Linear) and key in tensors.sources:
            kind, gguf_name, *_ = tensors.sources[key]
            module.act_format = fmt(gguf_name)
        if isinstance(module, MLAttention):
            src = tensors.sources.get(f"{name}.kv_b_proj.weight")
            module.absorb_always = True
            if src and src[0] == "kv_b":
                module.act_format_uk, module.act_format_uv = fmt(src[1]), fmt(src[2])
            elif src:
                module.absorb_always = False  # legacy attn_kv_b files run as plain MHA in llama.cpp
