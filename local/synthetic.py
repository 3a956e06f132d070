"""Random-weight GGUF files with a real model's geometry and quant recipe, for benchmarks anyone can
reproduce without downloading a model: `tandem bench --synthetic deepseek-v2-lite --layers 8`.

The file is written by the same converter as `tandem convert` (same tensor names, key-values, and
per-tensor types of llama-quantize's recipe), from weights drawn per tensor with a fixed seed, and
cached under `~/.cache/tandem/synthetic/`. The tokenizer is the demo's byte-level BPE padded with
filler tokens to the model's vocabulary size, so llama.cpp loads the file too.
"""

from __future__ import annotations

import json
import logging
import shutil
import tempfile
import zlib
from dataclasses import dataclass
from pathlib import Path

import numpy as np

log = logging.getLogger("tandem")

GEOMETRIES = {
    "deepseek-v2-lite": dict(
        model_type="deepseek_v2", vocab_size=102400, hidden_size=2048, intermediate_size=10944,
        moe_intermediate_size=1408, num_hidden_layers=27, num_attention_heads=16, num_key_value_heads=16,
        kv_lora_rank=512, q_lora_rank=None, qk_nope_head_dim=128, qk_rope_head_dim=64, v_head_dim=128,
        n_routed_experts=64, num_experts_per_tok=6, n_shared_experts=2, first_k_dense_replace=1,
        topk_method="greedy", scoring_func="softmax", norm_topk_prob=False, routed_scaling_factor=1.0,
        n_group=1, topk_group=1, max_position_embeddings=163840, rms_norm_eps=1e-6, tie_word_embeddings=False,
        bos_token_id=0, eos_token_id=1,
        rope_scaling=dict(type="yarn", factor=40, original_max_position_embeddings=4096, beta_fast=32,
                          beta_slow=1, mscale=0.707, mscale_all_dim=0.707), rope_theta=10000.0),
    "deepseek-v3": dict(
        model_type="deepseek_v3", vocab_size=129280, hidden_size=7168, intermediate_size=18432,
        moe_intermediate_size=2048, num_hidden_layers=61, num_attention_heads=128, num_key_value_heads=128,
        kv_lora_rank=512, q_lora_rank=1536, qk_nope_head_dim=128, qk_rope_head_dim=64, v_head_dim=128,
        n_routed_experts=256, num_experts_per_tok=8, n_shared_experts=1, first_k_dense_replace=3,
        topk_method="noaux_tc", scoring_func="sigmoid", norm_topk_prob=True, routed_scaling_factor=2.5,
        n_group=8, topk_group=4, max_position_embeddings=163840, rms_norm_eps=1e-6, tie_word_embeddings=False,
        bos_token_id=0, eos_token_id=1,
        rope_scaling=dict(type="yarn", factor=40, original_max_position_embeddings=4096, beta_fast=32,
                          beta_slow=1, mscale=1.0, mscale_all_dim=1.0), rope_theta=10000.0),
    "qwen3-30b-a3b": dict(
        model_type="qwen3_moe", vocab_size=151936, hidden_size=2048, intermediate_size=6144,
        moe_intermediate_size=768, num_hidden_layers=48, num_attention_heads=32, num_key_value_heads=4,
        head_dim=128, num_experts=128, num_experts_per_tok=8, norm_topk_prob=True, decoder_sparse_step=1,
        mlp_only_layers=[], max_position_embeddings=40960, rms_norm_eps=1e-6, rope_theta=1000000.0,
        attention_bias=False, use_sliding_window=False, tie_word_embeddings=False, bos_token_id=0, eos_token_id=1),
}
ARCHITECTURES = {"deepseek_v2": "DeepseekV2ForCausalLM", "deepseek_v3": "DeepseekV3ForCausalLM",
                 "qwen3_moe": "Qwen3MoeForCausalLM"}
VERSION = 2  # 2: per-tensor seeds from crc32 (1 drew the same weights for anagram names)
STD = 0.02


@dataclass(frozen=True)
class _Info:
    shape: tuple[int, ...]
    dtype: str = "F32"


class _RandomCheckpoint:
    """Looks like quant's safetensors Checkpoint to the converter; tensors are drawn on request."""

    def __init__(self, shapes: dict[str, tuple[int, ...]], seed: int):
        self.shapes, self.seed = shapes, seed
        self.index = {n: None for n in shapes}

    def names(self) -> list[str]:
        return list(self.shapes)

    def info(self, name: str) -> _Info:
        return _Info(self.shapes[name])

    def get(self, name: str) -> np.ndarray:
        shape = self.shapes[name]
        rng = np.random.default_rng([self.seed, zlib.crc32(name.encode())])  # its own stream per tensor
        if name.endswith("norm.weight"):
            return np.ones(shape, np.float32)
        if name.endswith("e_score_correction_bias"):
            return rng.standard_normal(shape, dtype=np.float32) * np.float32(0.01)
        return rng.standard_normal(shape, dtype=np.float32) * np.float32(STD)


def model_config(name: str, layers: int | None = None, experts: int | None = None) -> dict:
    if name not in GEOMETRIES:
        raise ValueError(f"--synthetic {name} is not one of {', '.join(GEOMETRIES)}")
    cfg = dict(GEOMETRIES[name])
    if layers is not None:
        if layers < 1:
            raise ValueError("--layers must be at least 1")
        cfg["num_hidden_layers"] = layers
    if experts is not None:
        k, groups = cfg["num_experts_per_tok"], max(cfg.get("n_group", 1), 1)
        if experts < k or experts % groups:
            raise ValueError(f"--experts {experts} must be >= top-k ({k}) and a multiple of n_group ({groups})")
        cfg[_experts_key(cfg)] = experts
    cfg["architectures"] = [ARCHITECTURES[cfg["model_type"]]]
    return cfg


def _experts_key(cfg: dict) -> str:
    return "n_routed_experts" if "n_routed_experts" in cfg else "num_experts"


def synthetic_path(name: str, layers: int | None, quant: str, experts: int | None = None) -> Path:
    from .demo import cache_dir

    cfg = model_config(name, layers, experts)
    tag = f"{name}-L{cfg['num_hidden_layers']}-E{cfg[_experts_key(cfg)]}-{quant}-v{VERSION}.gguf"
    return cache_dir() / "synthetic" / tag


def build_synthetic(name: str, layers: int | None = None, quant: str = "q4_k_m", experts: int | None = None,
                    seed: int = 0, progress: bool = True) -> Path:
    """The cached synthetic GGUF for (name, layers, quant, experts), built on first use."""
    from quant.convert import HFSource, convert
    from quant.recipes import RECIPES

    from .models import get_architecture

    if quant not in RECIPES:
        raise ValueError(f"--quant {quant} is not one of {', '.join(RECIPES)}")
    out = synthetic_path(name, layers, quant, experts)
    if out.exists():
        return out
    cfg = model_config(name, layers, experts)
    arch = get_architecture(cfg["model_type"])
    import torch

    with torch.device("meta"):
        model = arch.build(arch.Config.from_dict(cfg), [])
    shapes = {n: tuple(t.shape) for n, t in model.state_dict().items()}
    params = sum(int(np.prod(s)) for s in shapes.values())
    _check_room(out.parent, params, quant)
    log.info("building %s: %s, %d layers, %d experts, %.2f B parameters (cached for next time)",
             out.name, name, cfg["num_hidden_layers"], cfg[_experts_key(cfg)], params / 1e9)
    out.parent.mkdir(parents=True, exist_ok=True)
    with tempfile.TemporaryDirectory(dir=out.parent) as tmp:
        hf = Path(tmp)
        # the file's general.name: the cached file's own name (else the temporary directory's random one)
        (hf / "config.json").write_text(json.dumps({**cfg, "_name_or_path": out.stem}))
        _write_padded_tokenizer(hf, cfg["vocab_size"])
        source = HFSource(hf, ckpt=_RandomCheckpoint(shapes, seed))
        import offload

        convert(source, out, quant, force=True, progress=progress, quantizer=getattr(offload, "quantize", None))
    return out


def _check_room(directory: Path, params: int, quant: str) -> None:
    bits = {"q8_0": 8.5, "bf16": 16, "f16": 16, "f32": 32}.get(quant, 5.0)
    need = int(params * bits / 8 * 1.05)
    directory.mkdir(parents=True, exist_ok=True)
    free = shutil.disk_usage(directory).free
    if need > free:
        raise MemoryError(f"the synthetic model needs about {need / 2**30:.1f} GiB of disk in {directory} but "
                          f"{free / 2**30:.1f} GiB is free; use fewer --layers or --experts, or set TANDEM_CACHE")


def _write_padded_tokenizer(directory: Path, vocab_size: int) -> None:
    from tokenizers import AddedToken

    from .demo import CHAT_TEMPLATE, save_tokenizer, train_tokenizer

    tok = train_tokenizer(4096)
    n = tok.get_vocab_size(with_added_tokens=True)
    if n > vocab_size:
        raise ValueError(f"vocab_size {vocab_size} is smaller than the demo tokenizer ({n})")
    tok.add_tokens([AddedToken(f"<|filler_{i}|>", special=False, normalized=False) for i in range(vocab_size - n)])
    save_tokenizer(tok, directory, CHAT_TEMPLATE)
