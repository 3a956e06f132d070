"""The CPU engine from Python: quantized linear layers and the fused MoE op on one thread pool.

Weights stay in their GGUF block layout (numpy views of the memory-mapped file, zero-copy);
activations are quantized inside the engine exactly as llama.cpp quantizes them.
"""

from __future__ import annotations

import os
from dataclasses import dataclass

import numpy as np

from . import _C

GGML_IDS = {"F32": 0, "F16": 1, "Q4_0": 2, "Q4_1": 3, "Q5_0": 6, "Q5_1": 7, "Q8_0": 8, "Q4_K": 12, "Q5_K": 13,
            "Q6_K": 14, "BF16": 30}


def default_threads() -> int:
    try:
        import psutil

        return psutil.cpu_count(logical=False) or os.cpu_count() or 1
    except ImportError:  # pragma: no cover
        return os.cpu_count() or 1


@dataclass(frozen=True)
class QuantWeight:
    """A weight matrix (or a stack of expert matrices) in a GGUF type: data is uint8
    [..., rows, row_bytes] (or float32/float16 [..., rows, cols] for F32/F16), cols values per row."""

    type: str
    data: np.ndarray
    cols: int

    @property
    def type_id(self) -> int:
        return GGML_IDS[self.type]

    @property
    def rows(self) -> int:
        return self.data.shape[-2]


class CpuEngine:
    """One persistent thread pool (threads = physical cores by default) and the ops that run on it."""

    def __init__(self, threads: int | None = None, isa: str = "auto"):
        self.threads = threads or default_threads()
        self.isa = isa
        self._engine = _C.Engine(self.threads)

    def linear(self, weight: QuantWeight, x: np.ndarray, out: np.ndarray | None = None) -> np.ndarray:
        """x [T, cols] float32 -> [T, rows] float32."""
        x = np.ascontiguousarray(x, dtype=np.float32)
        if out is None:
            out = np.empty((x.shape[0], weight.rows), dtype=np.float32)
        self._engine.linear(weight.type_id, weight.data, x, out, self.isa)
        return out

    def linear_batched(self, weight: QuantWeight, x: np.ndarray, out: np.ndarray | None = None) -> np.ndarray:
        """x [B, T, cols] float32 with weight a stack [B, rows, ...] -> [B, T, rows] float32."""
        x = np.ascontiguousarray(x, dtype=np.float32)
        if out is None:
            out = np.empty((x.shape[0], x.shape[1], weight.rows), dtype=np.float32)
        self._engine.linear_batched(weight.type_id, weight.data, x, out, self.isa)
        return out

    def moe(self, x, ids, weights, gate: QuantWeight, up: QuantWeight, down: QuantWeight,
            shared: list[tuple[QuantWeight, QuantWeight, QuantWeight]] = (), skip=None, out=None,
            async_: bool = False):
        """Fused routed experts (+ shared experts with weight 1): x [T, H], ids [T, A] (-1 = skip),
        weights [T, A] -> out [T, H]. With async_ the call returns at once; `wait()` joins it."""
        x = np.ascontiguousarray(x, dtype=np.float32)
        ids = np.ascontiguousarray(ids, dtype=np.int64)
        weights = np.ascontiguousarray(weights, dtype=np.float32)
        if out is None:
            out = np.empty_like(x)
        spec = [(g.data, g.type_id, u.data, u.type_id, d.data, d.type_id) for g, u, d in shared]
        skip = None if skip is None else np.ascontiguousarray(skip, dtype=np.uint8)
        self._engine.moe(x, ids, weights, gate.data, gate.type_id, up.data, up.type_id, down.data, down.type_id,
                         spec, skip, out, self.isa, async_)
        return out

    def wait(self) -> None:
        self._engine.wait()
