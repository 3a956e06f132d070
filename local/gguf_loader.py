"""GGUF files (llama.cpp's `deepseek2` / `qwen3moe`) into the same modules as HF checkpoints; HF directories
too, seen as a GGUF of their float tensors (quant.hf_gguf), so the CPU engine runs them.

Tensors are renamed to HF names (`quant.gguf_arch`), 3-D expert stacks are split per expert and
llama.cpp's `attn_k_b`/`attn_v_b` are joined back into `kv_b_proj`. Where each tensor runs is the
placement plan's decision (offload.placement): the CPU engine computes from the file's blocks; what
runs in torch is dequantized to the compute dtype at load.
"""

from __future__ import annotations

import logging
import re
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch

from gguf import GGML_QUANT_SIZES
from gguf import GGMLQuantizationType as QT

from quant.formats import dequantize
from quant.gguf_arch import EXPERT_NAMES, hf_tensor_name, join_kv_b, kv_to_config
from quant.gguf_file import GGUFModel, maps_file
from quant.read_ahead import default_window
from quant.safetensors_file import CheckpointError

from .config import kv_cache_values_per_token
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


def read_gguf_config(path: Path):
    model = GGUFModel(path)
    tokens = model.kv.get("tokenizer.ggml.tokens")
    raw = kv_to_config(model.kv, len(tokens) if tokens is not None else 0, set(model.tensors))
    arch = get_architecture(raw["model_type"])
    return model, arch, arch.Config.from_dict(raw, source=str(path))


def load_gguf(path: str | Path, dtype: torch.dtype | None = None, device="cpu", engine: bool = True,
              threads: int | None = None, progress=None, hybrid: bool | None = None, gpu_experts: int = 0,
              routing=None, context: int = 4096):
    """(config, model, GGUFModel) for a GGUF file; dtype defaults to float32. See load_blocks."""
    gmodel, arch, cfg = read_gguf_config(Path(path))
    return load_blocks(gmodel, arch, cfg, dtype, device, engine, threads, progress, hybrid, gpu_experts, routing,
                       context)


def load_hf_blocks(model_dir: str | Path, dtype: torch.dtype | None = None, device="cpu", engine: bool = True,
                   threads: int | None = None, progress=None, hybrid: bool | None = None, gpu_experts: int = 0,
                   routing=None, context: int = 4096, quant: str | None = None):
    """(config, model, HFAsGGUF) for an HF directory, run as load_gguf runs a GGUF file: its tensors as GGUF
    float tensors in their stored precision (quant.hf_gguf; FP8 as BF16), or quantized as they are read with
    the `tandem convert` recipe `quant` (hybrid: the routed experts only); the config from config.json."""
    from quant.hf_gguf import HFAsGGUF
    from quant.safetensors_file import Checkpoint

    from .loader import check_tensors, read_config

    arch, cfg, raw = read_config(Path(model_dir))
    ckpt = Checkpoint(model_dir)
    mapping = arch.remap(ckpt.names(), cfg)
    with torch.device("meta"):  # the torch path's checks and errors, before the view regroups the tensors
        model = arch.build(cfg, list(mapping.values()))
    tied = cfg.tie_word_embeddings and "lm_head.weight" not in mapping.values()
    check_tensors(model, ckpt, mapping, derived={"lm_head.weight"} if tied else set())
    # FP8 is widened to BF16, the torch path's default dtype for it; exactly, to F32, when float32 is asked for
    quantizer = None
    if quant is not None:
        import offload

        quantizer = getattr(offload, "quantize", None)  # the C++ engine's, bit-exact with quant's numpy ones
    # split across a GPU, only the routed experts (on the engine) are quantized: the GPU side keeps its precision
    view = HFAsGGUF(model_dir, ckpt, fp8_type=QT.F32 if dtype == torch.float32 else QT.BF16, recipe=quant,
                    quantizer=quantizer, experts_only=is_hybrid(torch.device(device), hybrid))
    if getattr(cfg, "num_nextn_predict_layers", 0):
        log.info("config.json announces %d MTP layer(s); they are not run", cfg.num_nextn_predict_layers)
    return load_blocks(view, arch, cfg, dtype, device, engine, threads, progress, hybrid, gpu_experts, routing,
                       context)


def is_hybrid(device: torch.device, hybrid: bool | None) -> bool:
    """Whether a load splits the model (routed experts on the engine, the rest on `device`): the default on a
    CUDA device."""
    return device.type == "cuda" if hybrid is None else hybrid


def load_blocks(gmodel, arch, cfg, dtype: torch.dtype | None = None, device="cpu", engine: bool = True,
                threads: int | None = None, progress=None, hybrid: bool | None = None, gpu_experts: int = 0,
                routing=None, context: int = 4096):
    """(config, model, gmodel) for a GGUFModel (or an HF checkpoint seen as one, quant.hf_gguf) with its
    architecture module and config; dtype defaults to float32; `progress(done, total)` is called as the
    tensors are read (bytes of them).

    The placement plan (offload.placement) decides where each tensor lives and is checked against the
    machine's free memory before anything is allocated.

    CPU (`engine`, device cpu): every linear layer and each layer's experts are computed by the CPU engine
    (a pool of `threads`) straight from the file's blocks (memory-mapped, never dequantized); the rest
    runs in torch on one thread, so the two pools never fight over the cores (both spin-wait: two
    threads each on 2 cores made decode ~6x slower).

    Hybrid (default on a CUDA device; `hybrid=True` runs the same path with the "GPU" side on the CPU,
    for tests): everything but the routed experts is dequantized onto `device`; each MoE layer submits
    its routed experts to the CPU engine and computes its shared experts (and `gpu_experts` busiest
    routed ones) on the device meanwhile."""
    from offload.placement import Machine, check_fits, make_plan

    dev = torch.device(device)
    hybrid = is_hybrid(dev, hybrid)
    dtype = dtype or torch.float32
    machine = Machine.detect()
    kv_bytes = kv_cache_values_per_token(cfg) * torch.empty((), dtype=dtype).element_size()
    if not hybrid:
        where = "cpu"
    else:  # "hybrid": the hybrid split with its GPU side on the CPU (tests)
        where = "cuda" if dev.type == "cuda" else "hybrid"
    placement = make_plan(gmodel, where, gpu_experts, routing, machine,
                          context=min(context, cfg.max_position_embeddings), kv_bytes_per_token=kv_bytes)
    # an HF directory is quantized by loading it with --quant (or by converting it)
    check_fits(placement, machine, gmodel.path.name, smaller="--quant q4_k_m, or tandem convert --quant q4_k_m"
               if gmodel.path.is_dir() else "tandem convert --quant q4_k_m")
    # the file comes off the disk in order while tensors are repacked
    gmodel.read_ahead(default_window(machine.ram_available))
    try:
        counted = _Progress(gmodel, progress) if progress is not None else gmodel
        model = _build(counted, arch, cfg, placement, dtype, dev, engine, threads, hybrid)
        model.checkpoint = gmodel
        if progress is not None:
            counted.finish()
    finally:
        gmodel.stop_read_ahead()
    return cfg, model, gmodel


class _Progress:
    """A GGUFModel (or quant.hf_gguf view) whose raw() reports a load's progress: progress(done, total) in
    bytes of the file's tensors, each counted the first time it is read. The repacking and copying of what
    the engine computes are most of a load (9.3 of 10.4 s on the 8-layer Qwen3 synthetic), and a count of
    the tensors assigned to torch, reported after them, left a progress bar empty until the end."""

    def __init__(self, gmodel, progress):
        self._model, self._progress = gmodel, progress
        self._total = sum(t.nbytes for t in gmodel.tensors.values())
        self._done, self._seen = 0, set()
        progress(0, self._total)

    def __getattr__(self, name):
        return getattr(self._model, name)

    def raw(self, name: str):
        if name not in self._seen:
            self._seen.add(name)
            self._done += self._model.tensors[name].nbytes
            self._progress(self._done, self._total)
        return self._model.raw(name)

    def finish(self) -> None:
        self._progress(self._total, self._total)


def _build(gmodel, arch, cfg, placement, dtype: torch.dtype, dev: torch.device, engine: bool, threads: int | None,
           hybrid: bool) -> torch.nn.Module:
    """load_blocks' model, its placement decided and the file being read ahead."""
    from offload.placement import ENGINE_TYPES

    from .loader import load_weights

    tensors = GGUFTensors(gmodel, cfg.num_hidden_layers)
    mapping = arch.remap(tensors.names(), cfg)
    with torch.device("meta"):
        model = arch.build(cfg, list(mapping.values()))
    if hybrid:
        plan = routed_expert_plan(model, tensors, placement.gpu_experts)
    else:
        plan = engine_plan(model, tensors) if engine and dev.type == "cpu" else {}
    fused = {m: spec for m, spec in plan.items() if isinstance(spec, tuple)}
    by_engine = {f"{m}.weight" for m, spec in plan.items() if not isinstance(spec, (tuple, MLAEngine))}
    by_engine |= {f"{m}.kv_b_proj.weight" for m, spec in plan.items() if isinstance(spec, MLAEngine)}
    for m in fused:
        on_gpu = set(placement.gpu_experts.get(int(m.split(".")[2]), ())) if hybrid else set()
        by_engine |= {n for n in mapping.values()
                      if n.startswith(f"{m}.experts.") and int(n.split(".")[5]) not in on_gpu}
    tied = cfg.tie_word_embeddings
    # on the CPU engine the token embedding's rows are read from the file's blocks as a step needs them
    # (an output head tied to it needs the table in float; so does a type the engine does not read). The
    # hybrid path keeps its GPU side's table, as the placement plan counts it, on a CUDA device or not.
    embed = bool(plan) and not hybrid and not tied and \
        tensors.sources.get("model.embed_tokens.weight") == ("plain", "token_embd.weight") and \
        mapping.get("model.embed_tokens.weight") == "model.embed_tokens.weight" and \
        gmodel.tensors["token_embd.weight"].qtype.name in ENGINE_TYPES
    if embed:
        by_engine.add("model.embed_tokens.weight")
    load_weights(model, tensors, mapping, dtype, dev, derived={"lm_head.weight"} if tied else set(),
                 engine=by_engine)
    if tied:
        model.lm_head.weight = model.model.embed_tokens.weight
    if embed:
        from .models.layers import QuantEmbedding

        t = gmodel.tensors["token_embd.weight"]
        model.model.embed_tokens = QuantEmbedding(gmodel.raw("token_embd.weight").reshape(t.shape[0], -1), t.qtype,
                                                  cfg.hidden_size, dtype)
    if not hybrid or dtype == torch.float32:
        # float32 reproduces llama.cpp's rounding (hybrid included: its torch side then gives the plain
        # path's numbers); a bf16 GPU side does not try
        set_llama_numerics(model, tensors)
    if plan:
        from offload import torch_ops
        from offload.engine import CpuEngine

        torch_ops.set_engine(CpuEngine(threads))
        if dev.type == "cpu":
            torch.set_num_threads(1)
    for name, spec in plan.items():
        target = model.get_submodule(name)
        if isinstance(spec, tuple):
            target.engine = spec
            if hybrid:
                target.set_overlap(placement.gpu_experts.get(int(name.split(".")[2]), []))
        elif isinstance(spec, MLAEngine):
            target.engine_uk, target.engine_uv = spec.uk, spec.uv
        else:
            target.engine_weight = spec
    for name, spec in plan.items():  # with all its weights on the engine, an MLA block or MoE layer is one call
        if isinstance(spec, MLAEngine):
            model.get_submodule(name).bind_engine(model.rope)
        elif isinstance(spec, tuple):
            model.get_submodule(name).bind_engine()
    if plan:  # ...and so is a GQA block whose projections all are (its own weights are only those)
        from .models.qwen3_moe import GQAttention

        for module in model.modules():
            if isinstance(module, GQAttention):
                module.bind_engine(model.rope)
        from .models.layers import engine_stacks

        model.engine_stacks = engine_stacks(model.model.layers)  # ...and runs of such layers, one call
    model.placement = placement
    return model


def routed_expert_plan(model: torch.nn.Module, tensors: GGUFTensors, gpu_experts: dict) -> dict:
    """The hybrid plan: each MoE layer's routed expert stacks on the CPU engine (shared experts stay in torch)."""
    try:
        from offload import torch_ops  # noqa: F401
        from offload.engine import GGML_IDS
    except ImportError as e:
        raise RuntimeError("the hybrid path needs the CPU engine (offload._C); reinstall Tandem: make setup") from e
    from .models.moe import MoE

    g = tensors.model
    plan = {}
    for name, module in model.named_modules():
        if isinstance(module, MoE):
            stacks = [tensors.sources.get(f"{name}.experts.0.{p}_proj.weight") for p in ("gate", "up", "down")]
            bad = [s for s in stacks if s is None or s[0] != "expert" or g.tensors[s[1]].qtype.name not in GGML_IDS]
            if bad:
                stored = [g.tensors[s[1]].qtype.name for s in bad if s]
                raise NotImplementedError(f"{name}: routed experts stored as {stored} "
                                          "cannot run on the CPU engine; convert with a supported --quant")
            plan[name] = _moe_spec(g, stacks, [], [])
    return plan


@dataclass(frozen=True)
class MLAEngine:
    """MLA's absorbed W_UK [H, R, Dn] / W_UV [H, Dv, R] (llama.cpp's attn_k_b / attn_v_b) on the engine."""

    uk: object  # EngineWeight
    uv: object


def engine_plan(model: torch.nn.Module, tensors: GGUFTensors) -> dict:
    """module name -> EngineWeight (linear layers), the fused-MoE tuple (MoE layers) or MLAEngine (MLA's
    absorbed products), for every weight the CPU engine can compute from the file's blocks; {} when
    the engine is not built."""
    try:
        from offload import torch_ops  # noqa: F401 - registers torch.ops.tandem.*
        from offload.engine import GGML_IDS
    except ImportError:
        return {}
    from .models.layers import EngineWeight, Linear
    from .models.mla import MLAttention
    from .models.moe import MoE

    g = tensors.model

    def engine_weight(hf_name: str):
        src = tensors.sources.get(hf_name)
        if src is None or src[0] != "plain" or g.tensors[src[1]].qtype.name not in GGML_IDS:
            return None
        t = g.tensors[src[1]]
        return EngineWeight(*engine_bytes(g, src[1]), t.shape[0], t.shape[-1])

    def batched(gguf_name: str, cols: int):
        t = g.tensors[gguf_name]
        if t.qtype.name not in GGML_IDS or cols % GGML_QUANT_SIZES[t.qtype][0] or len(t.shape) != 3:
            return None
        return EngineWeight(*engine_bytes(g, gguf_name), t.shape[1], t.shape[2])

    plan: dict = {}
    for name, module in model.named_modules():
        if isinstance(module, MLAttention):
            src = tensors.sources.get(f"{name}.kv_b_proj.weight")
            if src and src[0] == "kv_b":
                uk, uv = batched(src[1], module.qk_nope_head_dim), batched(src[2], module.kv_lora_rank)
                if uk is not None and uv is not None:
                    plan[name] = MLAEngine(uk, uv)
        if isinstance(module, MoE):
            stacks = [tensors.sources.get(f"{name}.experts.0.{p}_proj.weight") for p in ("gate", "up", "down")]
            if any(s is None or s[0] != "expert" or g.tensors[s[1]].qtype.name not in GGML_IDS for s in stacks):
                continue
            shared, shared_types = [], []
            if hasattr(module, "shared_experts"):
                for p in ("gate", "up", "down"):
                    w = engine_weight(f"{name}.shared_experts.{p}_proj.weight")
                    if w is None:
                        break
                    shared.append(w.data)
                    shared_types.append(w.type_id)
                else:
                    plan[name] = _moe_spec(g, stacks, shared, shared_types)
                continue
            plan[name] = _moe_spec(g, stacks, [], [])
        elif isinstance(module, Linear) and not name.endswith("kv_b_proj") and ".experts." not in name:
            w = engine_weight(f"{name}.weight")
            if w is not None and module.bias is None:
                plan[name] = w
    return plan


def _moe_spec(g: GGUFModel, stacks, shared, shared_types) -> tuple:
    types, raw = zip(*(engine_bytes(g, s[1]) for s in stacks))
    return (raw[0], raw[1], raw[2], list(types), shared, shared_types)


def engine_bytes(g: GGUFModel, gguf_name: str) -> tuple[int, np.ndarray]:
    """(engine type id, bytes) the CPU engine computes a tensor with: its faster row-interleaved copy
    (offload.engine.prepare), else a copy in huge-page memory (offload.engine.resident), else a numpy view of
    the file (the engine takes it without DLPack). After a copy the file's pages are let go, so the process
    does not hold the weights twice. An array of the process's own (an HF checkpoint's experts, stacked)
    is kept as it is: numpy gives large arrays huge pages already, and a second copy of 6 GB of BF16 experts
    took 6 of a 9 s load here."""
    from offload.engine import GGML_IDS, prepare, resident

    t = g.tensors[gguf_name]
    raw = g.raw(gguf_name)
    type_id, data = prepare(GGML_IDS[t.qtype.name], raw, t.shape[-1])
    if data is raw and maps_file(raw):
        data = resident(raw)
    if data is not raw:
        g.release(gguf_name)
    return type_id, data


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
