"""Reading GGUF files (llama.cpp's container), bounds-checked at every step.

We parse the header ourselves rather than trust it: a damaged or hostile file must give a
GGUFError that says what is wrong, never a crash, a hang or a giant allocation. Tensor data is
memory-mapped, never read into RAM (a loader may have it read ahead from disk while it works: `read_ahead`).
Split models (`name-00001-of-00003.gguf`) open as one.
"""

from __future__ import annotations

import mmap
import re
import struct
import threading
from dataclasses import dataclass
from pathlib import Path

import numpy as np
from gguf import GGML_QUANT_SIZES, GGMLQuantizationType, GGUFValueType

from .read_ahead import advice_limit, release_pages

GGUF_MAGIC = b"GGUF"
DEFAULT_ALIGNMENT = 32
READ_AHEAD_IDLE_S = 30.0  # a read-ahead whose loader has not moved for this long ends
SPLIT_RE = re.compile(r"^(?P<stem>.*)-(?P<no>\d{5})-of-(?P<count>\d{5})\.gguf$")

_SCALARS = {
    GGUFValueType.UINT8: "<B", GGUFValueType.INT8: "<b", GGUFValueType.UINT16: "<H", GGUFValueType.INT16: "<h",
    GGUFValueType.UINT32: "<I", GGUFValueType.INT32: "<i", GGUFValueType.FLOAT32: "<f", GGUFValueType.BOOL: "<?",
    GGUFValueType.UINT64: "<Q", GGUFValueType.INT64: "<q", GGUFValueType.FLOAT64: "<d",
}
_NUMPY = {
    GGUFValueType.UINT8: np.uint8, GGUFValueType.INT8: np.int8, GGUFValueType.UINT16: np.uint16,
    GGUFValueType.INT16: np.int16, GGUFValueType.UINT32: np.uint32, GGUFValueType.INT32: np.int32,
    GGUFValueType.FLOAT32: np.float32, GGUFValueType.BOOL: np.bool_, GGUFValueType.UINT64: np.uint64,
    GGUFValueType.INT64: np.int64, GGUFValueType.FLOAT64: np.float64,
}
_U64 = struct.Struct("<Q")
_TYPED = {GGMLQuantizationType.F32: np.float32, GGMLQuantizationType.F16: np.float16,
          GGMLQuantizationType.F64: np.float64, GGMLQuantizationType.I8: np.int8,
          GGMLQuantizationType.I16: np.int16, GGMLQuantizationType.I32: np.int32, GGMLQuantizationType.I64: np.int64}


def maps_file(data) -> bool:
    """Whether an array is a view of a memory-mapped file (GGUFFile.raw, SafetensorsFile.get), not memory of the
    process's own."""
    while isinstance(data, np.ndarray):
        if isinstance(data, np.memmap):
            return True
        data = data.base
    return False


class GGUFError(ValueError):
    """A GGUF file that cannot be read as one."""


@dataclass(frozen=True)
class TensorDesc:
    """What a tensor is, apart from where it is stored (quant.hf_gguf's tensors are built from several)."""

    name: str
    qtype: GGMLQuantizationType
    ne: tuple[int, ...]  # ggml order: ne[0] is the contiguous dimension
    nbytes: int

    @property
    def shape(self) -> tuple[int, ...]:
        """numpy (row-major) shape: ne reversed."""
        return tuple(reversed(self.ne))

    @property
    def n_elements(self) -> int:
        return int(np.prod(self.ne, dtype=np.int64))


@dataclass(frozen=True)
class GGUFTensor(TensorDesc):
    offset: int  # absolute byte offset in its file
    file: Path


class _Cursor:
    def __init__(self, data, path: Path):
        self.data, self.pos, self.path = data, 0, path

    def need(self, n: int, what: str) -> None:
        if n < 0 or self.pos + n > len(self.data):
            raise GGUFError(f"{self.path}: the file ends inside {what} (byte {self.pos}, needs {n} more, "
                            f"file has {len(self.data)}); it is truncated or corrupt")

    def scalar(self, fmt: str, what: str):
        size = struct.calcsize(fmt)
        self.need(size, what)
        (v,) = struct.unpack_from(fmt, self.data, self.pos)
        self.pos += size
        return v

    def string(self, what: str) -> str:
        return self.strings(1, what)[0]

    def strings(self, count: int, what: str) -> list[str]:
        """`count` strings in a row (u64 length, then UTF-8 bytes), read in one loop: a vocabulary holds 150k+
        of them, its merges as many."""
        view, pos, end, unpack = memoryview(self.data), self.pos, len(self.data), _U64.unpack_from
        out = []
        for _ in range(count):
            if end - pos < 8:
                self.pos = pos
                self.need(8, what)
            (n,) = unpack(view, pos)
            pos += 8
            if n > end - pos:
                self.pos = pos
                self.need(n, what)
            try:
                out.append(str(view[pos:pos + n], "utf-8"))
            except UnicodeDecodeError as e:
                raise GGUFError(f"{self.path}: {what} is not valid UTF-8 ({e})") from e
            pos += n
        self.pos = pos
        return out

    def value(self, vtype: int, what: str, depth: int = 0):
        try:
            vtype = GGUFValueType(vtype)
        except ValueError:
            raise GGUFError(f"{self.path}: {what} has unknown value type {vtype}; the file is corrupt") from None
        if vtype == GGUFValueType.STRING:
            return self.string(what)
        if vtype == GGUFValueType.ARRAY:
            if depth > 2:
                raise GGUFError(f"{self.path}: {what} nests arrays too deep; the file is corrupt")
            etype = self.scalar("<I", what)
            count = self.scalar("<Q", what)
            if etype in _NUMPY:
                size = np.dtype(_NUMPY[etype]).itemsize * count
                self.need(size, what)
                arr = np.frombuffer(self.data, dtype=_NUMPY[etype], count=count, offset=self.pos).copy()
                self.pos += size
                return arr
            # strings or nested arrays: at least 8 bytes each, so the count is bounded by what is left
            self.need(min(count, len(self.data)) * 8 if count else 0, what)
            if count * 8 > len(self.data) - self.pos:
                raise GGUFError(f"{self.path}: {what} claims {count} elements, more than the file holds")
            if etype == GGUFValueType.STRING:
                return self.strings(count, what)
            return [self.value(etype, what, depth + 1) for _ in range(count)]
        return self.scalar(_SCALARS[vtype], what)


class GGUFFile:
    """One .gguf file: key-values and tensor descriptions parsed, data memory-mapped."""

    def __init__(self, path: str | Path):
        self.path = Path(path)
        try:
            self._map = np.memmap(self.path, dtype=np.uint8, mode="c")  # copy-on-write: writable views, file untouched
        except (ValueError, OSError) as e:  # e.g. an empty file cannot be mapped
            raise GGUFError(f"{self.path}: cannot map the file ({e}); it is empty or unreadable") from e
        size = len(self._map)
        self._position, self._touched = 0, False  # the tensor raw() gave out last: where a read-ahead is
        c = _Cursor(self._map, self.path)
        c.need(4, "the magic number")
        if bytes(self._map[:4]) != GGUF_MAGIC:
            raise GGUFError(f"{self.path} does not start with the GGUF magic (got {bytes(self._map[:4])!r}); "
                            "it is not a GGUF file")
        c.pos = 4
        self.version = c.scalar("<I", "the version")
        if self.version not in (2, 3):
            hint = " (big-endian files are not supported)" if self.version > 0xFFFF else ""
            raise GGUFError(f"{self.path}: GGUF version {self.version} is not supported (2 or 3){hint}")
        n_tensors = c.scalar("<Q", "the tensor count")
        n_kv = c.scalar("<Q", "the key-value count")
        # every key-value takes >= 12 bytes and every tensor info >= 28: counts beyond that are lies
        if n_kv * 12 > size or n_tensors * 28 > size:
            raise GGUFError(f"{self.path}: header claims {n_tensors} tensors and {n_kv} key-values, more than "
                            f"a {size}-byte file can hold; the file is truncated or corrupt")
        self.kv: dict[str, object] = {}
        self.kv_types: dict[str, tuple[GGUFValueType, GGUFValueType | None]] = {}  # (type, array element type)
        for i in range(n_kv):
            key = c.string(f"key #{i}")
            vtype = c.scalar("<I", f"the type of {key}")
            if vtype == GGUFValueType.ARRAY:
                c.need(4, f"the value of {key}")
                (etype,) = struct.unpack_from("<I", self._map, c.pos)
            self.kv[key] = c.value(vtype, f"the value of {key}")
            self.kv_types[key] = (GGUFValueType(vtype), GGUFValueType(etype) if vtype == GGUFValueType.ARRAY else None)
        align = self.kv.get("general.alignment", DEFAULT_ALIGNMENT)
        if not isinstance(align, int) or align <= 0 or align & (align - 1):
            raise GGUFError(f"{self.path}: general.alignment {align!r} is not a power of two")
        infos = []
        for i in range(n_tensors):
            name = c.string(f"the name of tensor #{i}")
            n_dims = c.scalar("<I", f"the rank of {name}")
            if not 1 <= n_dims <= 4:
                raise GGUFError(f"{self.path}: tensor {name} has {n_dims} dimensions (1..4 allowed)")
            c.need(8 * n_dims, f"the shape of {name}")
            ne = tuple(int(v) for v in struct.unpack_from(f"<{n_dims}Q", self._map, c.pos))
            c.pos += 8 * n_dims
            qtype = c.scalar("<I", f"the type of {name}")
            offset = c.scalar("<Q", f"the offset of {name}")
            infos.append((name, ne, qtype, offset))
        data_start = -(-c.pos // align) * align
        self.tensors: dict[str, GGUFTensor] = {}
        for name, ne, qtype, offset in infos:
            try:
                qt = GGMLQuantizationType(qtype)
                block, type_size = GGML_QUANT_SIZES[qt]
            except (ValueError, KeyError):
                raise GGUFError(f"{self.path}: tensor {name} has unknown ggml type id {qtype}; the file is corrupt "
                                "or was written by a newer llama.cpp") from None
            if any(d <= 0 or d > 1 << 40 for d in ne):
                raise GGUFError(f"{self.path}: tensor {name} has an impossible shape {list(ne)}")
            if ne[0] % block:
                raise GGUFError(f"{self.path}: tensor {name} is {qt.name} (blocks of {block}) but its rows "
                                f"have {ne[0]} elements")
            nbytes = int(np.prod(ne, dtype=np.int64)) // block * type_size
            if offset % align:
                raise GGUFError(f"{self.path}: tensor {name} starts at offset {offset}, not a multiple of "
                                f"the alignment {align}; the file is corrupt")
            start = data_start + offset
            if start + nbytes > size:
                raise GGUFError(f"{self.path}: tensor {name} needs bytes {start}..{start + nbytes} but the file "
                                f"has {size}; the file is truncated or its offsets are corrupt")
            if name in self.tensors:
                raise GGUFError(f"{self.path}: tensor {name} appears twice")
            self.tensors[name] = GGUFTensor(name, qt, ne, nbytes, start, self.path)

    def raw(self, t: GGUFTensor) -> np.ndarray:
        """The tensor's bytes as a (copy-on-write) view: typed [*shape] for F32/F16/ints, uint8 [*shape[:-1], row_bytes]
        for block types (BF16 too, as gguf.quants expects)."""
        self._position, self._touched = t.offset, True
        data = self._map[t.offset:t.offset + t.nbytes]
        if t.qtype in _TYPED:
            return data.view(_TYPED[t.qtype]).reshape(t.shape)
        return data.reshape(*t.shape[:-1], -1)

    def release(self, t: GGUFTensor) -> None:
        """Let go of the resident pages of a tensor whose bytes were copied elsewhere (a repacked layout), so
        the process does not hold them twice; a later raw() reads them back from the file."""
        release_pages(self._map, t.offset, t.offset + t.nbytes)


class GGUFModel:
    """A model in one GGUF file or several split parts: merged key-values and tensors."""

    def __init__(self, path: str | Path):
        path = Path(path)
        if not path.exists():
            raise FileNotFoundError(f"no GGUF file at {path}")
        self.path = path
        m = SPLIT_RE.match(path.name)
        if m:
            count = int(m["count"])
            paths = [path.with_name(f"{m['stem']}-{i:05d}-of-{count:05d}.gguf") for i in range(1, count + 1)]
            missing = [p.name for p in paths if not p.exists()]
            if missing:
                raise GGUFError(f"{path.name} is part of a {count}-file split model; missing: {', '.join(missing)}")
        else:
            paths = [path]
        self.files = [GGUFFile(p) for p in paths]
        self._taken, self._reader = 0, None  # tensors raw() gave out; the read-ahead thread
        self.kv = dict(self.files[0].kv)
        self.kv_types = dict(self.files[0].kv_types)
        self.tensors: dict[str, GGUFTensor] = {}
        self._owner: dict[str, GGUFFile] = {}
        for f in self.files:
            for name, t in f.tensors.items():
                if name in self.tensors:
                    raise GGUFError(f"tensor {name} appears in both {self._owner[name].path.name} and {f.path.name}")
                self.tensors[name], self._owner[name] = t, f
        expected = self.kv.get("split.tensors.count")
        if isinstance(expected, int) and expected != len(self.tensors):
            raise GGUFError(f"{path.name}: the split parts hold {len(self.tensors)} tensors, the header says {expected}")

    def raw(self, name: str) -> np.ndarray:
        self._taken += 1
        return self._owner[name].raw(self.tensors[name])

    def read_ahead(self, window: int, chunk: int | None = None) -> None:
        """Have the kernel read the files into the page cache in order on a background thread, at most `window`
        bytes past the tensor raw() gave out last, while the caller works on what it has: a loader then waits
        on the disk once, not at each tensor's first page. Cold loads of a 3.4 GB file here, in alternation:
        disk at 2.5 GB/s, 4.2-4.5 s without it, 3.3-3.8 s with it (3.9-4.3 s with the 32 MiB advice it first
        had, which the kernel cut to 8 MiB each: see advice_limit); the disk throttled to 500 MB/s, 8.2 -> 7.9 s
        (the disk alone 6.9 s). A split model's parts are read one after the other, each once the loader has
        come to it. Advice only: no error reaches the caller. Ends at the last byte, at stop_read_ahead(), or
        when the loader has taken no tensor for READ_AHEAD_IDLE_S."""
        if self._reader is not None or not hasattr(mmap, "MADV_WILLNEED"):
            return
        self._reader_stop = threading.Event()
        self._reader = threading.Thread(target=_read_ahead, args=(self, window, chunk, self._reader_stop),
                                        name=f"read-ahead {self.path.name}", daemon=True)
        self._reader.start()

    def stop_read_ahead(self) -> None:
        if self._reader is not None:
            self._reader_stop.set()
            self._reader.join()
            self._reader = None

    def release(self, name: str) -> None:
        self._owner[name].release(self.tensors[name])

    @property
    def architecture(self) -> str | None:
        return self.kv.get("general.architecture")

    def get(self, key: str, default=None):
        """A key-value, with `{arch}.` expanded (e.g. get('{arch}.block_count'))."""
        return self.kv.get(key.replace("{arch}", str(self.architecture)), default)


def _read_ahead(model: GGUFModel, window: int, chunk: int | None, stop: threading.Event) -> None:
    """GGUFModel.read_ahead's thread: each part in turn, advised a chunk at a time within the window (chunk
    None: the most one advice reads on the part's device, advice_limit)."""
    last, idle = model._taken, 0.0

    def wait() -> bool:  # one pause for the loader; False once it has been idle too long
        nonlocal last, idle
        idle = 0.0 if model._taken != last else idle + 0.01
        last = model._taken
        stop.wait(0.01)
        return idle <= READ_AHEAD_IDLE_S

    try:
        for i, f in enumerate(model.files):
            mm = getattr(f._map, "_mmap", None)
            if mm is None:
                return
            pos, size, step = 0, len(mm), chunk or advice_limit(f.path)
            while pos < size and not stop.is_set():
                if any(later._touched for later in model.files[i + 1:]):
                    break  # the loader has moved on to a later part
                if i > 0 and not f._touched:  # nor come to this one yet
                    if not wait():
                        return
                    continue
                pos = max(pos, f._position // mmap.PAGESIZE * mmap.PAGESIZE)
                if pos >= f._position + window:  # the loader is a window behind
                    if not wait():
                        return
                    continue
                n = min(step, size - pos, max(mmap.PAGESIZE, f._position + window - pos))
                mm.madvise(mmap.MADV_WILLNEED, pos, n)  # returns once the reads are queued
                pos += n
    except (OSError, ValueError):  # a closed map or refused advice: reading ahead is only a hint
        pass
