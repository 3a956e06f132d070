"""An HF checkpoint seen as a GGUF model of float tensors, so the CPU engine runs it as it runs a GGUF file.

The tensors are those `tandem convert` would write (llama.cpp's names, each layer's experts stacked into
one, `kv_b_proj` split into `attn_k_b` / `attn_v_b`: quant.convert.HFSource), kept in their stored
precision: BF16 / F16 / F32 as they are (F64 narrowed), FP8 dequantized to BF16. `raw(name)` gives a
tensor's bytes as GGUFModel.raw does: a view of the memory-mapped shard for a tensor stored whole, a new
array for a stack of experts or a split `kv_b`.

With a `recipe` (`tandem run DIR --quant q4_k_m`) the tensors are quantized as they are read, to the types
`tandem convert --quant RECIPE` gives them, with the same bytes: the conversion, in memory, at each load.

A 4-layer BF16 checkpoint with Qwen3-30B-A3B's geometry (6.2 GB), 2 threads, in alternated runs: decode
11.0-12.8 tok/s in torch, 30.0-46.9 through this view, 30.4-47.1 from the BF16 GGUF `tandem convert` writes
(the memory's speed swings between runs); prefill of 32 tokens 90-105 tok/s in torch, 201-228 here.
"""

from __future__ import annotations

from collections.abc import Callable
from pathlib import Path

import numpy as np
from gguf import GGMLQuantizationType as QT

from .convert import ConvertError, HFSource, OutTensor, encode, encoded_pieces
from .formats import row_bytes
from .gguf_file import TensorDesc, maps_file
from .read_ahead import ReadAhead
from .safetensors_file import CheckpointError

_BLOCK = "blk."
_EXPS = "_exps."  # the routed experts' stacks (blk.N.ffn_{gate,up,down}_exps.weight)


class HFAsGGUF:
    """What the GGUF loader reads of a GGUFModel (tensors, raw, release, kv, architecture, read_ahead), for
    an HF directory."""

    def __init__(self, directory: str | Path, ckpt=None, fp8_type: QT = QT.BF16, recipe: str | None = None,
                 quantizer: Callable | None = None, experts_only: bool = False):
        """`ckpt`: the directory's safetensors_file.Checkpoint, when already open; `fp8_type`: BF16 or F32, what
        FP8 block-scaled weights are dequantized to; `recipe`: quantize the tensors as `tandem convert` does
        with it (`quantizer`: convert's, the C++ engine's); `experts_only`: only the routed experts' stacks
        (the hybrid split's CPU side; what runs on the GPU keeps its precision)."""
        try:
            self.source = HFSource(Path(directory), ckpt, fp8_stored=fp8_type)
            jobs = self.source.tensors(stored=True)
            self.types = {t.name: t.stored_type for t in jobs}
            if recipe is not None:
                from .recipes import plan_types

                planned = plan_types([(t.name, t.ne) for t in jobs], recipe, self.source.arch, self.source.hparams())
                self.types = {name: qtype if not experts_only or _EXPS in name else self.types[name]
                              for name, qtype in planned.items()}
        except (ConvertError, ValueError) as e:
            raise CheckpointError(str(e)) from e
        self.quantizer = quantizer
        self.path = self.source.dir
        # what the placement plan and the bench read (the model's config comes from config.json, not from these)
        arch = self.source.arch
        self.kv = {"general.architecture": arch, f"{arch}.expert_count": self.source.hparams()["n_expert"],
                   f"{arch}.expert_used_count": int(self.source.config.get("num_experts_per_tok") or 0)}
        self._jobs: dict[str, OutTensor] = {t.name: t for t in jobs}
        self.tensors: dict[str, TensorDesc] = {}
        for t in jobs:
            qtype = self.types[t.name]
            rows = int(np.prod(t.shape[:-1], dtype=np.int64))
            self.tensors[t.name] = TensorDesc(t.name, qtype, t.ne, rows * row_bytes(t.shape[-1], qtype))
        # the read-ahead's jobs: the token embedding, then layer by layer, then the rest (the output head)
        order = sorted({_group(t.name) for t in jobs})
        self._group = {t.name: order.index(_group(t.name)) for t in jobs}
        self._ahead: ReadAhead | None = None
        self._furthest = 0

    @property
    def architecture(self) -> str:
        return self.source.arch

    def get(self, key: str, default=None):
        return self.kv.get(key.replace("{arch}", self.architecture), default)

    def raw(self, name: str) -> np.ndarray:
        """The tensor's bytes as GGUFModel.raw gives them: typed [*shape] for F32 / F16, uint8 [*shape[:-1],
        row bytes] for BF16 and the block types (a recipe's)."""
        t, job = self.tensors[name], self._jobs[name]
        if self._ahead is not None:  # a layer's tensors are taken out of order: the read-ahead follows the furthest
            self._furthest = max(self._furthest, self._group[name])
            self._ahead.at(self._furthest)
        try:
            if t.qtype != job.stored_type:
                return self._encoded(job, t.qtype)
            data = job.stored()
        except ConvertError as e:
            raise CheckpointError(str(e)) from e
        if data.shape != t.shape:
            raise CheckpointError(f"{self.path}: {name} came out as {list(data.shape)}, planned {list(t.shape)}")
        if not maps_file(data):  # a stack or a split, copied: the shards' pages are not needed again
            self.release(name)
        if t.qtype == QT.BF16:
            return data.view(np.uint8).reshape(*t.shape[:-1], -1)
        return data

    def _encoded(self, job: OutTensor, qtype: QT) -> np.ndarray:
        """The tensor quantized to `qtype` as `tandem convert` writes it (a stack or a large matrix in pieces of
        rows), laid out as GGUFModel.raw gives it."""
        if qtype in (QT.F32, QT.F16):
            out = np.empty(job.shape, np.float32 if qtype == QT.F32 else np.float16)
        else:
            out = np.empty((*job.shape[:-1], row_bytes(job.shape[-1], qtype)), np.uint8)
        if job.pieces is None:
            out[...] = encode(job.produce(), qtype, self.quantizer)
        else:
            r = 0
            for data in encoded_pieces(job, qtype, self.quantizer, out.nbytes):
                out[r:r + len(data)] = data
                r += len(data)
        self.release(job.name)
        return out

    def release(self, name: str) -> None:
        """Let go of the mapped pages of the shards' tensors behind `name`, once the engine has its own copy."""
        for file, begin, end in self._jobs[name].sources:
            self.source.ckpt.release_range(file, begin, end)

    def read_ahead(self, window: int, chunk: int | None = None) -> None:
        """The shards read into the page cache a layer at a time, at most `window` bytes past the layer the
        loader is on (the token embedding first, the output head last)."""
        if self._ahead is not None:
            return
        groups: list[list] = [[] for _ in range(max(self._group.values(), default=-1) + 1)]
        seen = set()  # attn_k_b and attn_v_b are read from one kv_b_proj: once
        for name, job in self._jobs.items():
            for r in job.sources:
                if r not in seen:
                    seen.add(r)
                    groups[self._group[name]].append(r)
        self._ahead = ReadAhead(groups, window, chunk)

    def stop_read_ahead(self) -> None:
        if self._ahead is not None:
            self._ahead.close()
            self._ahead = None

    def __str__(self) -> str:
        return str(self.path)


def _group(name: str) -> int:
    if name.startswith(_BLOCK):
        return 1 + int(name.split(".")[1])
    return 0 if name.startswith("token_embd") else 1 << 30
