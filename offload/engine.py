"""The CPU engine from Python: quantized linear layers and the fused MoE op on one thread pool.

Weights stay in their GGUF block layout (numpy views of the memory-mapped file, zero-copy);
activations are quantized inside the engine exactly as llama.cpp quantizes them.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np

from . import _C
from .cpus import available_cores

GGML_IDS = {"F32": 0, "F16": 1, "Q4_0": 2, "Q4_1": 3, "Q5_0": 6, "Q5_1": 7, "Q8_0": 8, "Q4_K": 12, "Q5_K": 13,
            "Q6_K": 14, "BF16": 30}
# the engine's row-interleaved layouts (offload/csrc/repack.h), built at load from the types above
R16_IDS = {f"{name}_R16": 1000 + GGML_IDS[name] for name in ("Q4_0", "Q4_1", "Q5_0", "Q5_1", "Q8_0", "Q4_K", "Q5_K", "Q6_K")}
ENGINE_IDS = {**GGML_IDS, **R16_IDS}


def default_threads() -> int:
    """Physical cores this process may use (its CPU affinity and cgroup quota; offload/cpus.py)."""
    return available_cores()


@dataclass(frozen=True)
class QuantWeight:
    """A weight matrix (or a stack of expert matrices) in a GGUF type: data is uint8
    [..., rows, row_bytes] (or float32/float16 [..., rows, cols] for F32/F16), cols values per row."""

    type: str
    data: np.ndarray
    cols: int

    @property
    def type_id(self) -> int:
        return ENGINE_IDS[self.type]

    @property
    def rows(self) -> int:
        return self.data.shape[-2]


def interleaved_layouts() -> bool:
    """Whether weights are repacked into the row-interleaved layouts at load: on every ISA the engine runs
    (best_isa, capped by TANDEM_ISA) but scalar. The VNNI kernels read them 1.5-2.8x faster than the
    file's blocks; without VNNI the AVX2 ones (dot_r16_avx2.cpp) are 1.2-1.8x the plain AVX2 kernels for
    Q4_K / Q5_K / Q6_K, 1.4-3.5x for the 32-value types (against the plain AVX-512 F/BW ones, Q5_K / Q6_K
    about even)."""
    return _C.isa() != "scalar"


def prepare(type_id: int, data: np.ndarray, cols: int, force: bool = False) -> tuple[int, np.ndarray]:
    """(type id, bytes) the engine should compute with for a matrix (or stack) in a GGUF type: a new
    row-interleaved copy for Q4_0 / Q4_1 / Q5_0 / Q5_1 / Q8_0 / Q4_K / Q5_K / Q6_K with a multiple of 16 rows, when interleaved_layouts()
    (or force), in the same huge-page memory as `resident`, repacked on `default_threads()` threads; the input
    itself otherwise."""
    r16 = _C.r16_type(type_id)
    if r16 == type_id or data.ndim < 2 or data.shape[-2] % 16 or not (force or interleaved_layouts()):
        return type_id, data
    return r16, _C.repack_r16(type_id, np.ascontiguousarray(data), cols, threads=default_threads())


# below this a weight gains nothing from huge pages (it spans less than one)
RESIDENT_MIN_BYTES = 2 << 20


def resident(data: np.ndarray) -> np.ndarray:
    """The engine's own copy of a weight it streams every token, in huge-page memory (`_C.resident_copy`):
    a file's memory map has 4 KiB pages, and decode read ~3% faster from 2 MiB ones (V2-Lite Q4_K_M, 2
    threads, at 40 GB/s). The input itself where the kernel gives no huge pages, or below 2 MiB."""
    if data.nbytes < RESIDENT_MIN_BYTES or not _C.huge_pages():
        return data
    return _C.resident_copy(np.ascontiguousarray(data))


def prepare_weight(w: QuantWeight, force: bool = False) -> QuantWeight:
    """`prepare` for a QuantWeight: the row-interleaved copy where there is one, w itself otherwise."""
    type_id, data = prepare(w.type_id, w.data, w.cols, force)
    if type_id == w.type_id:
        return w
    return QuantWeight(f"{w.type}_R16", data, w.cols)


def _check_writable(out) -> None:
    """The engine writes its results into `out` in place: a read-only array is an error."""
    if isinstance(out, np.ndarray) and not out.flags.writeable:
        raise ValueError("out is read-only; the results are written into it in place (pass a writable array, "
                         "or leave it out)")


class CpuEngine:
    """One persistent thread pool (threads = physical cores by default) and the ops that run on it."""

    def __init__(self, threads: int | None = None, isa: str = "auto"):
        self.threads = threads or default_threads()
        self.isa = isa
        self._engine = _C.Engine(self.threads)

    def linear(self, weight: QuantWeight, x: np.ndarray, out: np.ndarray | None = None) -> np.ndarray:
        """x [T, cols] float32 -> [T, rows] float32."""
        x = np.ascontiguousarray(x, dtype=np.float32)
        _check_writable(out)
        if out is None:
            out = np.empty((x.shape[0], weight.rows), dtype=np.float32)
        self._engine.linear(weight.type_id, weight.data, x, out, self.isa)
        return out

    def linear_batched(self, weight: QuantWeight, x: np.ndarray, out: np.ndarray | None = None) -> np.ndarray:
        """x [B, T, cols] float32 with weight a stack [B, rows, ...] -> [B, T, rows] float32."""
        x = np.ascontiguousarray(x, dtype=np.float32)
        _check_writable(out)
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
        ids = np.asarray(ids)
        if ids.dtype.kind not in "iu":  # astype would truncate 1.9 to expert 1
            raise ValueError(f"ids must be integer expert ids, got {ids.dtype}")
        ids = np.ascontiguousarray(ids, dtype=np.int64)
        weights = np.ascontiguousarray(weights, dtype=np.float32)
        _check_writable(out)
        if out is None:
            out = np.empty_like(x)
        spec = [(g.data, g.type_id, u.data, u.type_id, d.data, d.type_id) for g, u, d in shared]
        skip = None if skip is None else np.ascontiguousarray(skip, dtype=np.uint8)
        self._engine.moe(x, ids, weights, gate.data, gate.type_id, up.data, up.type_id, down.data, down.type_id,
                         spec, skip, out, self.isa, async_)
        return out

    def wait(self) -> None:
        self._engine.wait()

    def read_pass(self, buf: np.ndarray) -> float:
        """Seconds for one streaming read of a uint8 buffer on this engine's threads: the memory roofline's
        probe, timed on the pool that runs the ops (another pool's workers would still be spinning)."""
        return self._engine.read_pass(buf)
