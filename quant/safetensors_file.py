"""Safetensors checkpoints, memory-mapped: a tensor is a view of the file's pages, never a second copy.

We parse the (tiny) JSON header ourselves so that every bad file gets an error naming the
file and the tensor: truncated data, a damaged header, offsets that disagree with shapes.
Tensors come out as numpy views; dtypes numpy lacks (BF16, FP8) come out as their raw bits
(uint16 / uint8) with `TensorInfo.dtype` saying what they are.
"""

from __future__ import annotations

import json
import os
import struct
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from .read_ahead import release_pages

# safetensors dtype -> numpy dtype that holds its bits
DTYPES = {
    "F64": np.float64, "F32": np.float32, "F16": np.float16, "BF16": np.uint16,
    "F8_E4M3": np.uint8, "F8_E5M2": np.uint8,
    "I64": np.int64, "I32": np.int32, "I16": np.int16, "I8": np.int8,
    "U8": np.uint8, "BOOL": np.bool_,
}
MAX_HEADER = 100 * 1024 * 1024


def read_json(path: Path):
    try:
        return json.loads(Path(path).read_text(encoding="utf-8"))
    except json.JSONDecodeError as e:
        raise CheckpointError(f"{path} is not valid JSON ({e}); the file is damaged or truncated") from e


class CheckpointError(ValueError):
    """A checkpoint file or directory that cannot be read as it claims to be."""


@dataclass(frozen=True)
class TensorInfo:
    file: Path
    dtype: str
    shape: tuple[int, ...]
    begin: int  # absolute byte offset in the file
    end: int


class SafetensorsFile:
    """One .safetensors file: header parsed and validated, data memory-mapped on demand."""

    def __init__(self, path: Path):
        self.path = Path(path)
        size = self.path.stat().st_size
        with open(self.path, "rb") as f:
            head = f.read(8)
            if len(head) < 8:
                raise CheckpointError(f"{self.path} is {size} bytes, too short for a safetensors header; "
                                      "the file is truncated - download or convert it again")
            (n,) = struct.unpack("<Q", head)
            if n > MAX_HEADER or 8 + n > size:
                raise CheckpointError(f"{self.path}: header claims {n} bytes but the file has {size}; "
                                      "the file is truncated or not a safetensors file")
            raw = f.read(n)
        try:
            header = json.loads(raw.decode("utf-8"))
        except (UnicodeDecodeError, json.JSONDecodeError) as e:
            raise CheckpointError(f"{self.path}: the safetensors header is not valid JSON ({e}); "
                                  "the file is damaged") from e
        if not isinstance(header, dict):
            raise CheckpointError(f"{self.path}: the safetensors header is not a JSON object")
        self.metadata = header.pop("__metadata__", None) or {}
        data_start = 8 + n
        self.tensors: dict[str, TensorInfo] = {}
        for name, t in header.items():
            try:
                dtype, shape, (b, e) = t["dtype"], tuple(int(s) for s in t["shape"]), t["data_offsets"]
            except (KeyError, TypeError, ValueError) as err:
                raise CheckpointError(f"{self.path}: tensor {name} has a malformed header entry {t!r}") from err
            if dtype not in DTYPES:
                raise CheckpointError(f"{self.path}: tensor {name} has dtype {dtype}, which Tandem cannot read; "
                                      f"readable: {', '.join(DTYPES)}")
            nbytes = int(np.prod(shape, dtype=np.int64)) * np.dtype(DTYPES[dtype]).itemsize
            if not (0 <= b <= e) or e - b != nbytes:
                raise CheckpointError(f"{self.path}: tensor {name} {dtype}{list(shape)} needs {nbytes} bytes "
                                      f"but its offsets [{b}, {e}] span {e - b}; the header is corrupt")
            if data_start + e > size:
                raise CheckpointError(f"{self.path}: tensor {name} ends at byte {data_start + e} but the file has "
                                      f"only {size} bytes; the file is truncated - download or convert it again")
            self.tensors[name] = TensorInfo(self.path, dtype, shape, data_start + b, data_start + e)
        self._map: np.memmap | None = None

    def get(self, name: str) -> np.ndarray:
        """The tensor as a view of the mapped file (copy-on-write: pages stay shared until written)."""
        info = self.tensors[name]
        if self._map is None:
            self._map = np.memmap(self.path, dtype=np.uint8, mode="c")
        dtype = np.dtype(DTYPES[info.dtype])
        data = self._map[info.begin:info.end]
        if info.begin % dtype.itemsize:  # unaligned: copy rather than hand out a misaligned view
            data = data.copy()
        return data.view(dtype).reshape(info.shape)

    def release_range(self, begin: int, end: int) -> None:
        """Let go of the resident pages of bytes [begin, end) once copied elsewhere (the CPU engine's copy), so
        the process does not hold them twice; a later get() reads them back from the file."""
        if self._map is not None:
            release_pages(self._map, begin, end)


class Checkpoint:
    """An HF model directory's weights: one safetensors file, or shards listed in an index."""

    def __init__(self, directory: str | os.PathLike):
        self.dir = Path(directory)
        index = self.dir / "model.safetensors.index.json"
        if index.exists():
            weight_map = read_json(index).get("weight_map")
            if not isinstance(weight_map, dict):
                raise CheckpointError(f"{index} has no 'weight_map'; the index is damaged")
            files = sorted(set(weight_map.values()))
        else:
            files = sorted(p.name for p in self.dir.glob("*.safetensors"))
            weight_map = None
        if not files:
            pickles = [p.name for p in self.dir.glob("*.bin")] + [p.name for p in self.dir.glob("*.pt")]
            hint = (f" (found {', '.join(pickles)}: pickled weights are never loaded; convert them to "
                    "safetensors first)") if pickles else ""
            raise CheckpointError(f"no *.safetensors weights in {self.dir}{hint}")
        self.files: dict[str, SafetensorsFile] = {}
        for name in files:
            path = self.dir / name
            if not path.exists():
                raise CheckpointError(f"{index.name} lists {name}, which is missing from {self.dir}")
            self.files[name] = SafetensorsFile(path)
        self.index: dict[str, SafetensorsFile] = {}
        for f in self.files.values():
            for t in f.tensors:
                if t in self.index:
                    raise CheckpointError(f"tensor {t} appears in both {self.index[t].path.name} and {f.path.name}")
                self.index[t] = f
        if weight_map is not None:
            for t, fname in weight_map.items():
                if t not in self.index:
                    raise CheckpointError(f"{index.name} places {t} in {fname}, but that file does not hold it")

    def names(self) -> list[str]:
        return list(self.index)

    def info(self, name: str) -> TensorInfo:
        return self.index[name].tensors[name]

    def get(self, name: str) -> np.ndarray:
        return self.index[name].get(name)

    def release_range(self, file: Path, begin: int, end: int) -> None:
        """SafetensorsFile.release_range for the shard at `file`."""
        self.files[Path(file).name].release_range(begin, end)

    def __str__(self) -> str:
        return str(self.dir)
