"""The placement plan: which tensor of a GGUF model lives where, as data over tensor names.

- A CUDA GPU (`device="cuda"`): embeddings, attention, norms, routers, shared experts, dense layers and
  the output head on the GPU (dequantized to bf16); the routed experts on the CPU engine, straight from
  the file's blocks; `gpu_experts=N` also keeps each MoE layer's N busiest experts (from routing
  statistics, `tandem inspect --routing-stats`) on the GPU.
- No GPU or `device="cpu"`: every tensor on the CPU; the engine computes every block-quantized linear and
  expert from the file (memory-mapped), torch the rest (norms, routers, MLA's kv_b halves, dequantized); the
  token embedding's rows are read from the file as a step needs them.

`make_plan` builds it from the file, the machine and the options; `check_fits` refuses, before anything
is allocated, a plan whose memory the machine does not have, saying what would fit.
"""

from __future__ import annotations

import re
from dataclasses import dataclass, field

from .cpus import available_cores

GPU, ENGINE, CPU_TORCH = "gpu", "cpu-engine", "cpu-torch"
ENGINE_TYPES = {"F32", "F16", "BF16", "Q4_0", "Q4_1", "Q5_0", "Q5_1", "Q8_0", "Q4_K", "Q5_K", "Q6_K"}
_EXPS = re.compile(r"^blk\.(\d+)\.ffn_(gate|up|down)_exps\.weight$")
GIB = 2**30


@dataclass(frozen=True)
class Machine:
    ram_available: int
    physical_cores: int
    gpu_name: str | None = None
    vram_free: int = 0

    @classmethod
    def detect(cls) -> "Machine":
        import psutil

        cores = available_cores()
        name, vram = None, 0
        try:
            import torch

            if torch.cuda.is_available():
                name = torch.cuda.get_device_name()
                vram = torch.cuda.mem_get_info()[0]
        except Exception:  # noqa: BLE001 - a broken CUDA setup means no GPU here
            name, vram = None, 0
        return cls(psutil.virtual_memory().available, cores, name, vram)


@dataclass
class Placement:
    device: str  # "cuda" (hybrid) or "cpu"; "hybrid": the hybrid split with the GPU side on the CPU (tests)
    assign: dict[str, str]  # GGUF tensor name -> GPU | ENGINE | CPU_TORCH
    gpu_experts: dict[int, list[int]] = field(default_factory=dict)  # MoE layer -> experts kept on the GPU
    gpu_bytes: int = 0  # what the GPU side allocates (dequantized), KV cache excluded
    ram_bytes: int = 0  # what the CPU side needs resident: mapped blocks + dequantized tensors
    kv_bytes: int = 0  # KV cache for the planned context (on the attention's device)
    notes: list[str] = field(default_factory=list)

    def count(self, where: str) -> int:
        return sum(1 for w in self.assign.values() if w == where)

    def render(self) -> str:
        lines = [f"placement    {'CPU only' if self.device == 'cpu' else 'GPU + CPU engine (hybrid)'}"]
        if self.device != "cpu":
            lines.append(f"  GPU        {self.count(GPU)} tensors, {self.gpu_bytes / GIB:.2f} GiB (bf16) "
                         f"+ KV cache {self.kv_bytes / GIB:.2f} GiB: embeddings, attention, norms, routers, "
                         "shared experts, dense layers, output")
            n = sum(len(v) for v in self.gpu_experts.values())
            if n:
                lines.append(f"  GPU        + {n} routed experts: " + "; ".join(
                    f"layer {layer}: {' '.join(map(str, es))}" for layer, es in sorted(self.gpu_experts.items())))
            lines.append(f"  CPU engine {self.count(ENGINE)} tensors (routed experts), {self.ram_bytes / GIB:.2f} GiB "
                         "mapped from the file")
        else:
            lines.append(f"  CPU engine {self.count(ENGINE)} tensors computed from the file's blocks")
            lines.append(f"  CPU torch  {self.count(CPU_TORCH)} tensors (norms, routers, token embedding), dequantized "
                         "(of the embedding only the rows a step reads, unless the output head is tied to it)")
            lines.append(f"  RAM        {self.ram_bytes / GIB:.2f} GiB + KV cache {self.kv_bytes / GIB:.2f} GiB")
        lines += [f"  note       {n}" for n in self.notes]
        return "\n".join(lines)


def make_plan(gguf, device: str = "auto", gpu_experts: int = 0, routing=None, machine: Machine | None = None,
              context: int = 4096, kv_bytes_per_token: int = 0) -> Placement:
    """The plan for a GGUFModel (quant.gguf_file) on `machine` (detected when None).

    routing: local.routing.RoutingStats, which picks the gpu_experts busiest experts per layer."""
    machine = machine or Machine.detect()
    if device == "auto":
        device = "cuda" if machine.gpu_name else "cpu"
    if device.startswith("cuda") and not machine.gpu_name:
        raise RuntimeError(f"device '{device}' asked for, but no CUDA GPU is visible; use --device cpu")
    device = "cuda" if device.startswith("cuda") else device
    if device not in ("cuda", "cpu", "hybrid"):
        raise ValueError(f"device must be auto, cpu or cuda[:N], got '{device}'")
    hybrid = device != "cpu"
    if gpu_experts and not hybrid:
        raise ValueError("--gpu-experts needs a CUDA GPU (--device cuda); on the CPU every expert is on the engine")
    arch = gguf.architecture
    n_expert = int(gguf.kv.get(f"{arch}.expert_count", 0) or 0)
    if gpu_experts < 0 or (n_expert and gpu_experts > n_expert):
        raise ValueError(f"--gpu-experts {gpu_experts} must be in 0..{n_expert}")
    plan = Placement(device, {}, kv_bytes=context * kv_bytes_per_token)
    moe_layers = sorted({int(m[1]) for m in map(_EXPS.match, gguf.tensors) if m})
    if gpu_experts:
        if routing is None:
            plan.notes.append(f"no routing statistics given: experts 0..{gpu_experts - 1} of each layer go to the "
                              "GPU (tandem inspect MODEL --routing-stats FILE --routing-out R.json picks the busiest)")
            plan.gpu_experts = {layer: list(range(gpu_experts)) for layer in moe_layers}
        else:
            rows = dict(zip(routing.layers, range(len(routing.layers))))
            missing = [layer for layer in moe_layers if layer not in rows]
            if missing:
                raise ValueError(f"the routing statistics have no counts for MoE layers {missing[:8]}; "
                                 "they were gathered on another model")
            plan.gpu_experts = {layer: sorted(routing.busiest(rows[layer], gpu_experts)) for layer in moe_layers}
    for name, t in gguf.tensors.items():
        m = _EXPS.match(name)
        if hybrid:
            if m:
                plan.assign[name] = ENGINE
                n_gpu = len(plan.gpu_experts.get(int(m[1]), ()))
                plan.ram_bytes += t.nbytes * (n_expert - n_gpu) // max(n_expert, 1)
                plan.gpu_bytes += t.n_elements * n_gpu // max(n_expert, 1) * 2
            else:
                plan.assign[name] = GPU
                plan.gpu_bytes += t.n_elements * 2
        else:
            engine = t.qtype.name in ENGINE_TYPES and len(t.shape) >= 2 and not name.startswith("token_embd") \
                and not name.endswith("ffn_gate_inp.weight")
            plan.assign[name] = ENGINE if engine else CPU_TORCH
            # the token embedding's rows are read from the file's blocks (local QuantEmbedding), unless the
            # output head is tied to it (no output.weight): then the table is dequantized
            mapped = engine or (name == "token_embd.weight" and "output.weight" in gguf.tensors
                                and t.qtype.name in ENGINE_TYPES)
            plan.ram_bytes += t.nbytes if mapped else t.n_elements * 4
    return plan


def check_fits(plan: Placement, machine: Machine, what: str = "the model",
               smaller: str = "tandem convert --quant q4_k_m") -> None:
    """MemoryError, before any allocation, when the plan needs more RAM or VRAM than is free; `smaller`: how to
    get a smaller quantization of the model."""
    if plan.device == "cuda":
        need = plan.gpu_bytes + plan.kv_bytes
        if need > 0.95 * machine.vram_free:
            fix = ("lower --gpu-experts" if plan.gpu_experts else "a shorter --ctx, or --device cpu")
            raise MemoryError(f"{what} needs {need / GIB:.1f} GiB of GPU memory ({plan.gpu_bytes / GIB:.1f} weights + "
                              f"{plan.kv_bytes / GIB:.1f} KV cache) but {machine.vram_free / GIB:.1f} GiB is free "
                              f"on {machine.gpu_name}; use {fix}")
        need = plan.ram_bytes
    else:  # cpu, or hybrid with its "GPU" side on the CPU
        need = plan.ram_bytes + plan.kv_bytes + (plan.gpu_bytes if plan.device == "hybrid" else 0)
    if need > 0.95 * machine.ram_available:
        raise MemoryError(f"{what} needs {need / GIB:.1f} GiB of RAM but {machine.ram_available / GIB:.1f} GiB is "
                          f"available; use a smaller quantization ({smaller}), a shorter --ctx"
                          + (", or more --gpu-experts" if plan.device == "cuda" else ", or a GPU (--device cuda)"))
