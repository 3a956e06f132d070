"""`tandem inspect`: what a model file holds, without loading its weights."""

from __future__ import annotations

from collections import Counter
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np

from quant.gguf_arch import EXPERT_NAMES
from quant.safetensors_file import Checkpoint

from .config import kv_cache_values_per_token
from .loader import read_config

EXPERT_GGUF = tuple(g for _, g in EXPERT_NAMES)
KV_DTYPE_BYTES = 2  # f16/bf16 cache


@dataclass
class ModelSummary:
    path: Path
    format: str  # "gguf" | "hf"
    config: object
    tensors: list[tuple[str, str, tuple[int, ...], int]] = field(default_factory=list)  # name, type, shape, bytes
    metadata: dict = field(default_factory=dict)
    gguf: object = None  # the parsed GGUFModel (format "gguf"), for what else reads the file

    @property
    def total_params(self) -> int:
        return sum(int(np.prod(s)) for _, _, s, _ in self.tensors)

    @property
    def active_params(self) -> int:
        """Parameters one token touches: everything but the routed experts it was not sent to."""
        c = self.config
        n_expert = getattr(c, "n_routed_experts", None) or getattr(c, "num_experts", 0) or 0
        if not n_expert:
            return self.total_params
        routed = sum(int(np.prod(s)) for n, _, s, _ in self.tensors if _is_routed_expert(n))
        return self.total_params - routed + routed * c.num_experts_per_tok // n_expert

    @property
    def kv_bytes_per_token(self) -> int:
        return kv_cache_values_per_token(self.config) * KV_DTYPE_BYTES

    def type_table(self) -> list[tuple[str, int, int, int]]:
        """(type, tensors, parameters, bytes) per storage type, largest first."""
        count, params, size = Counter(), Counter(), Counter()
        for _, t, s, b in self.tensors:
            count[t] += 1
            params[t] += int(np.prod(s))
            size[t] += b
        return sorted(((t, count[t], params[t], size[t]) for t in count), key=lambda r: -r[3])


def _is_routed_expert(name: str) -> bool:
    return ".mlp.experts." in name or name.endswith(EXPERT_GGUF)


def summarize(path: str | Path) -> ModelSummary:
    path = Path(path)
    if not path.exists():
        raise FileNotFoundError(f"no model at {path}")
    if path.is_file() and path.suffix == ".gguf":
        from .gguf_loader import read_gguf_config

        model, _, cfg = read_gguf_config(path)
        tensors = [(t.name, t.qtype.name, t.shape, t.nbytes) for t in model.tensors.values()]
        meta = {k: v for k, v in model.kv.items() if not k.startswith("tokenizer.ggml.")}
        return ModelSummary(path, "gguf", cfg, tensors, meta, gguf=model)
    _, cfg, raw = read_config(path)
    ckpt = Checkpoint(path)
    tensors = [(n, ckpt.info(n).dtype, ckpt.info(n).shape, ckpt.info(n).end - ckpt.info(n).begin)
               for n in ckpt.names()]
    return ModelSummary(path, "hf", cfg, tensors, {k: raw[k] for k in ("model_type", "architectures") if k in raw})


def _human(n: float, unit: str = "") -> str:
    for scale, suffix in ((1e12, "T"), (1e9, "G"), (1e6, "M"), (1e3, "K")):
        if n >= scale:
            return f"{n / scale:.2f} {suffix}{unit}"
    return f"{n:.0f} {unit}".rstrip()


def render(s: ModelSummary, show_tensors: bool = False) -> str:
    c = s.config
    n_expert = getattr(c, "n_routed_experts", None) or getattr(c, "num_experts", 0)
    lines = [
        f"model        {s.path}  ({s.format})",
        f"architecture {c.model_type}: {c.num_hidden_layers} layers, hidden {c.hidden_size}, "
        f"{c.num_attention_heads} heads, vocab {c.vocab_size}",
    ]
    if n_expert:
        shared = getattr(c, "n_shared_experts", 0) or 0
        lines.append(f"experts      {n_expert} routed, {c.num_experts_per_tok} active per token, {shared} shared")
    if hasattr(c, "kv_lora_rank"):
        lines.append(f"attention    MLA: kv_lora_rank {c.kv_lora_rank}, rope dim {c.qk_rope_head_dim}, "
                     f"q_lora_rank {c.q_lora_rank}")
    lines += [
        f"parameters   {_human(s.total_params)} total, {_human(s.active_params)} active per token",
        f"size         {_human(sum(b for *_, b in s.tensors), 'B')} of weights",
        f"KV cache     {s.kv_bytes_per_token} bytes per token (f16), "
        f"{s.kv_bytes_per_token * 4096 / 2**20:.1f} MiB at 4096 tokens",
        "",
        f"{'type':<8} {'tensors':>8} {'params':>12} {'bytes':>12}",
    ]
    lines += [f"{t:<8} {n:>8} {_human(p):>12} {_human(b, 'B'):>12}" for t, n, p, b in s.type_table()]
    if show_tensors:
        lines.append("")
        lines += [f"{n:<48} {t:<8} {str(list(sh)):<24} {_human(b, 'B')}" for n, t, sh, b in s.tensors]
    return "\n".join(lines)
