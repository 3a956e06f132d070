"""From an HF model directory to a ready nn.Module: config, strict tensor matching, FP8, dtype."""

from __future__ import annotations

import logging
from pathlib import Path

import numpy as np
import torch
from torch import nn

from quant.fp8 import dequantize_fp8_blocks
from quant.safetensors_file import Checkpoint, CheckpointError

from .config import ConfigError, read_json
from .models import get_architecture

log = logging.getLogger("tandem")

# kept in float32 whatever the compute dtype (as the reference does)
FP32_TENSORS = ("e_score_correction_bias",)
TORCH_DTYPES = {"F64": torch.float64, "F32": torch.float32, "F16": torch.float16, "BF16": torch.bfloat16,
                "I64": torch.int64, "I32": torch.int32, "I16": torch.int16, "I8": torch.int8, "U8": torch.uint8,
                "BOOL": torch.bool}


class HFTensors:
    """A safetensors checkpoint as torch tensors: zero-copy where the stored dtype allows, FP8 dequantized."""

    def __init__(self, ckpt: Checkpoint, fp8_block: tuple[int, int] | None):
        self.ckpt, self.fp8_block = ckpt, fp8_block
        self.names, self.info = ckpt.names, ckpt.info

    def get(self, name: str) -> torch.Tensor:
        info, data = self.ckpt.info(name), self.ckpt.get(name)
        if info.dtype == "F8_E4M3":
            scale_name = name + "_scale_inv"
            if self.fp8_block is None or scale_name not in self.ckpt.index:
                raise CheckpointError(f"{name} is float8_e4m3fn but has no {scale_name} block scales "
                                      "(or config.json lacks quantization_config); cannot dequantize it")
            scale = self.get(scale_name).float().numpy()
            return torch.from_numpy(dequantize_fp8_blocks(data, scale, self.fp8_block))
        if info.dtype not in TORCH_DTYPES:
            raise CheckpointError(f"{name} is stored as {info.dtype}, which Tandem cannot compute with")
        return torch.from_numpy(data).view(TORCH_DTYPES[info.dtype])

    def __str__(self) -> str:
        return str(self.ckpt)


def read_config(model_dir: Path):
    """The architecture module and its Config for an HF directory."""
    path = Path(model_dir) / "config.json"
    if not path.exists():
        raise ConfigError(f"{model_dir} has no config.json; pass an HF model directory (or a .gguf file)")
    raw = read_json(path)
    if not isinstance(raw, dict):
        raise ConfigError(f"{path}: expected a JSON object")
    arch = get_architecture(raw.get("model_type"))
    return arch, arch.Config.from_dict(raw, source=str(path)), raw


def checkpoint_dtype(ckpt: Checkpoint) -> torch.dtype:
    """The dtype most of the weights are stored in (FP8 checkpoints compute in bf16)."""
    counts: dict[str, int] = {}
    for name in ckpt.names():
        info = ckpt.info(name)
        counts[info.dtype] = counts.get(info.dtype, 0) + int(np.prod(info.shape))
    main = max(counts, key=counts.get)
    return {"F32": torch.float32, "F16": torch.float16, "F64": torch.float32}.get(main, torch.bfloat16)


def fp8_block_size(raw_config: dict) -> tuple[int, int] | None:
    q = raw_config.get("quantization_config") or {}
    if q.get("quant_method") != "fp8":
        return None
    block = q.get("weight_block_size") or [128, 128]
    if len(block) != 2:
        raise ConfigError(f"quantization_config.weight_block_size {block} is not [rows, cols]")
    return int(block[0]), int(block[1])


def load_weights(model: nn.Module, ckpt, mapping: dict[str, str], dtype: torch.dtype,
                 device: torch.device, derived: set[str] = frozenset(), engine: set[str] = frozenset(),
                 progress=None) -> None:
    """Check every tensor of `ckpt` (HFTensors / GGUFTensors) against the module (names and shapes, both
    ways), then assign them.

    `derived` names module tensors that are not in the checkpoint but filled in afterwards (tied lm_head);
    `engine` names those the CPU engine computes from the file's blocks (checked, never loaded).
    `progress(done, total)` is called after each tensor.
    """
    provided = check_tensors(model, ckpt, mapping, derived)
    state = {}
    for done, (module_name, ckpt_name) in enumerate(provided.items(), 1):
        if progress is not None:
            progress(done, len(provided))
        if module_name in engine:
            continue
        t = ckpt.get(ckpt_name)
        want = torch.float32 if module_name.rsplit(".", 1)[-1] in FP32_TENSORS else dtype
        if t.dtype != want:
            t = t.to(want)
        state[module_name] = t.to(device)
    model.load_state_dict(state, strict=not (derived or engine), assign=True)
    model.requires_grad_(False)


def check_tensors(model: nn.Module, ckpt, mapping: dict[str, str], derived: set[str] = frozenset()) -> dict[str, str]:
    """CheckpointError unless the checkpoint's tensors (`mapping`: checkpoint name -> module name) are the
    module's, names and shapes, both ways (FP8 block scales beside their weights); module name -> checkpoint
    name of each."""
    expected = {k: tuple(v.shape) for k, v in model.state_dict().items() if k not in derived}
    scales = {n for n in mapping if n.endswith(".weight_scale_inv")}
    provided = {mapping[n]: n for n in mapping if n not in scales}
    missing = sorted(set(expected) - set(provided))
    unexpected = sorted(set(provided) - set(expected))
    if missing or unexpected:
        parts = []
        if missing:
            parts.append(f"missing tensors: {', '.join(missing[:8])}" + (" ..." if len(missing) > 8 else ""))
        if unexpected:
            parts.append(f"unexpected tensors: {', '.join(provided[u] for u in unexpected[:8])}"
                         + (" ..." if len(unexpected) > 8 else ""))
        raise CheckpointError(f"{ckpt} does not match its model config ({'; '.join(parts)}); "
                              "the checkpoint is incomplete or its config belongs to another model")
    for module_name, ckpt_name in provided.items():
        shape = ckpt.info(ckpt_name).shape
        if shape != expected[module_name]:
            raise CheckpointError(f"tensor {ckpt_name} has shape {list(shape)}, but the model config implies "
                                  f"{list(expected[module_name])}; the weights and the config disagree")
    for sname in scales:
        if sname.removesuffix("_scale_inv") not in mapping:
            raise CheckpointError(f"{sname} has no weight beside it in {ckpt}")
    return provided


def load_hf(model_dir: str | Path, dtype: torch.dtype | None = None, device: str | torch.device = "cpu",
            progress=None):
    """(config, model) for an HF directory; weights stay memory-mapped where the dtype allows."""
    model_dir = Path(model_dir)
    arch, cfg, raw = read_config(model_dir)
    ckpt = Checkpoint(model_dir)
    mapping = arch.remap(ckpt.names(), cfg)
    with torch.device("meta"):
        model = arch.build(cfg, list(mapping.values()))
    tied = cfg.tie_word_embeddings and "lm_head.weight" not in mapping.values()
    load_weights(model, HFTensors(ckpt, fp8_block_size(raw)), mapping, dtype or checkpoint_dtype(ckpt),
                 torch.device(device), derived={"lm_head.weight"} if tied else set(), progress=progress)
    if tied:
        model.lm_head.weight = model.model.embed_tokens.weight
    if getattr(cfg, "num_nextn_predict_layers", 0) and not hasattr(model, "mtp"):
        log.info("config.json announces %d MTP layer(s) but the checkpoint has no MTP weights; "
                 "running without them", cfg.num_nextn_predict_layers)
    model.checkpoint = ckpt  # keeps the memory maps alive as long as the model
    return cfg, model
