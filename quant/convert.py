"""`tandem convert`: an HF checkpoint (BF16/FP16/FP32/FP8) or a GGUF file -> a llama.cpp-compatible GGUF.

Streams tensor by tensor: each output tensor is produced (experts stacked, `kv_b_proj` split),
quantized and written before the next is read; a stack of experts or a large matrix (the token
embedding, the output head) goes through in pieces of rows (`PIECE_VALUES`), so peak memory stays near
one piece, not one float32 tensor (15 GB for a DeepSeek-V3 expert stack). The source's bytes are read
ahead in the jobs' order (read_ahead.py). The output is written to a temporary file beside OUT and
renamed only when complete.

A 6.2 GB BF16 checkpoint (Qwen3-30B-A3B's geometry, 4 layers) to Q4_K_M from the page cache: 27-31 s and 1.26
GB of numpy arrays at peak when BF16 was widened through temporaries and every tensor held whole; 15-17 s and
146 MB now. The output is the same file, byte for byte.
"""

from __future__ import annotations

import functools
import json
import logging
import os
import re
import shutil
import sys
import tempfile
from collections.abc import Callable, Iterator
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from pathlib import Path

import numpy as np
from gguf import GGMLQuantizationType as QT
from gguf import GGUFValueType, GGUFWriter

from .formats import dequantize, quantize, row_bytes
from .fp8 import dequantize_fp8_blocks
from .gguf_arch import EXPERT_NAMES, config_to_kv, gguf_arch, gguf_tensor_name, split_kv_b
from .gguf_file import GGUFModel
from .read_ahead import Range, ReadAhead
from .safetensors_file import Checkpoint, CheckpointError

log = logging.getLogger("tandem")

# keys the writer sets itself or that describe the old file's encoding
SKIP_KEYS = ("general.architecture", "general.alignment", "general.file_type", "general.quantization_version",
             "split.")
_LAYER = re.compile(r"^model\.layers\.(\d+)\.(.+)$")
_EXPERT = re.compile(r"^mlp\.experts\.(\d+)\.(gate_proj|up_proj|down_proj)\.weight$")


class ConvertError(ValueError):
    pass


@dataclass
class OutTensor:
    name: str  # GGUF name
    shape: tuple[int, ...]  # numpy shape (ne reversed)
    produce: Callable[[], np.ndarray]  # -> float32 data of `shape`
    sources: tuple[Range, ...] = ()  # the source bytes produce() reads (files and byte ranges), to read ahead
    # the same data in pieces along axis 0 (a layer's experts, a large matrix's rows), each valid until the
    # next: converted without holding the whole float32 tensor (DeepSeek-V3's expert stacks are 15 GB of it)
    pieces: Callable[[], Iterator[np.ndarray]] | None = None
    # the same values unconverted, as GGUF type `stored_type` (HFSource.read_stored): what the CPU engine
    # runs an HF checkpoint with (quant.hf_gguf)
    stored: Callable[[], np.ndarray] | None = None
    stored_type: QT | None = None

    @property
    def ne(self) -> tuple[int, ...]:
        return tuple(reversed(self.shape))


# ---- sources --------------------------------------------------------------------------------


PIECE_VALUES = 8 << 20  # float32 values per piece of a tensor converted in pieces (32 MiB)
STACK_BYTES_PER_THREAD = 16 << 20  # a stack copied on more threads than this many bytes each would not gain
MAX_STACK_THREADS = 8


def _cpus() -> int:
    """CPUs this process may run on (its affinity), at most MAX_STACK_THREADS."""
    try:
        n = len(os.sched_getaffinity(0))
    except (AttributeError, OSError):
        n = os.cpu_count() or 1
    return max(1, min(n, MAX_STACK_THREADS))


def _whole(pieces: Callable[[], Iterator[np.ndarray]]) -> np.ndarray:
    return np.concatenate([piece.copy() for piece in pieces()])


def _rows_per_piece(shape: tuple[int, ...]) -> int:
    return max(1, PIECE_VALUES // max(int(np.prod(shape[1:], dtype=np.int64)), 1))


def _in_pieces(shape: tuple[int, ...]) -> bool:
    """Whether a tensor is large enough to convert in pieces of rows (a matrix or a stack, never a vector)."""
    return len(shape) >= 2 and _rows_per_piece(shape) < shape[0]


# the GGUF float type each HF dtype is kept in unconverted (read_stored); FP8 is widened to BF16 (the torch
# path's default dtype for it) or F32 (HFSource's fp8_stored)
STORED_TYPES = {"BF16": QT.BF16, "F16": QT.F16, "F32": QT.F32, "F64": QT.F32, "F8_E4M3": QT.BF16}
STORED_NUMPY = {QT.BF16: np.uint16, QT.F16: np.float16, QT.F32: np.float32}  # BF16 as its bits


def _to_f32(dtype: str, data: np.ndarray, out: np.ndarray) -> np.ndarray:
    """BF16 / F16 / F32 / F64 data (BF16 as its uint16 bits) -> float32 in `out`."""
    if dtype == "BF16":
        return _bf16_to_f32(data, out)
    out[...] = data
    return out


def _bf16_to_f32(bits: np.ndarray, out: np.ndarray) -> np.ndarray:
    """BF16 bits (uint16) -> float32, written into `out` in two passes and no temporary: the conversion was
    most of a convert's time when each step allocated (7x slower on a stack of 128 experts)."""
    u = out.view(np.uint32)
    u[...] = bits
    u <<= 16
    return out


class HFSource:
    """An HF directory: config.json + safetensors, read as float32 one tensor at a time (`ckpt`
    replaces the safetensors with any object that has names() / info(name).shape|dtype / get(name))."""

    def __init__(self, directory: Path, ckpt=None, fp8_stored: QT = QT.BF16):
        self.dir = Path(directory)
        cfg_path = self.dir / "config.json"
        if not cfg_path.exists():
            raise ConvertError(f"{self.dir} has no config.json; convert takes an HF model directory or a .gguf file")
        try:
            self.config = json.loads(cfg_path.read_text())
        except json.JSONDecodeError as e:
            raise ConvertError(f"{cfg_path} is not valid JSON ({e})") from e
        self.arch = gguf_arch(self.config.get("model_type"))
        self.ckpt = ckpt if ckpt is not None else Checkpoint(self.dir)
        q = self.config.get("quantization_config") or {}
        self.fp8_block = tuple(q.get("weight_block_size") or (128, 128)) if q.get("quant_method") == "fp8" else None
        if fp8_stored not in (QT.BF16, QT.F32):
            raise ValueError(f"FP8 weights are kept as BF16 or F32, not {fp8_stored.name}")
        self.stored_types = {**STORED_TYPES, "F8_E4M3": fp8_stored}  # read_stored's type per stored dtype

    def sources(self, names: list[str]) -> tuple[Range, ...]:
        """The file bytes read() reads for `names` (FP8 scales too); none for a source that has no files."""
        ranges = []
        for name in names:
            for part in (name, name + "_scale_inv"):
                info = self.ckpt.info(part) if part in self.ckpt.index else None
                if hasattr(info, "file"):
                    ranges.append((info.file, info.begin, info.end))
        return tuple(ranges)

    def read(self, name: str, out: np.ndarray | None = None) -> np.ndarray:
        """The tensor as float32, written into `out` (float32, its shape) when given."""
        info, data = self.ckpt.info(name), self.ckpt.get(name)
        if info.dtype not in ("F8_E4M3", "BF16", "F32", "F16", "F64"):
            raise ConvertError(f"{name} is stored as {info.dtype}, which has no GGUF float encoding")
        if out is None:
            out = np.empty(info.shape, np.float32)
        if info.dtype == "F8_E4M3":
            scale_name = name + "_scale_inv"
            if self.fp8_block is None or scale_name not in self.ckpt.index:
                raise ConvertError(f"{name} is FP8 but {scale_name} (or quantization_config) is missing")
            scale = self.read(scale_name)
            dequantize_fp8_blocks(data, scale, self.fp8_block, out=out)
        else:
            _to_f32(info.dtype, data, out)
        return out

    def stored_type(self, names: list[str]) -> QT:
        """The GGUF type read_stored gives `names` (one tensor, or tensors stacked into one) in."""
        types = {self.ckpt.info(n).dtype for n in names}
        bad = sorted(types - set(self.stored_types))
        if bad:
            raise ConvertError(f"{names[0]} is stored as {bad[0]}, which has no GGUF float encoding")
        if len({self.stored_types[t] for t in types}) > 1:
            raise ConvertError(f"{names[0]} and the tensors stacked with it are stored as {sorted(types)}; "
                               "a stack must have one dtype (convert the checkpoint: tandem convert)")
        return self.stored_types[types.pop()]

    def read_stored(self, name: str, out: np.ndarray | None = None) -> np.ndarray:
        """The tensor unconverted, as its stored_types type (BF16 as uint16 bits): a view of the file when
        stored so and no `out` is given; F64 narrowed to F32; FP8 dequantized, to F32 or rounded to BF16 (to
        nearest even)."""
        info = self.ckpt.info(name)
        qtype = self.stored_type([name])
        if info.dtype == "F8_E4M3":
            data = self.read(name)
            if qtype == QT.BF16:
                data = quantize(data, QT.BF16).view(np.uint16).reshape(info.shape)
        else:
            data = self.ckpt.get(name)
        if out is None:
            return data if data.dtype == STORED_NUMPY[qtype] else data.astype(STORED_NUMPY[qtype])
        out[...] = data
        return out

    def _read_stored_stack(self, names: list[str], shape: tuple[int, ...]) -> np.ndarray:
        """Tensors of one shape (a layer's experts) stacked unconverted, as read_stored gives them; copied on
        several threads (numpy lets go of the GIL while it copies): 384 MB stacks of BF16 experts out of the
        page cache, 6.5 GB/s on one thread, 11.6 on two."""
        self._check_stack(names, shape)
        out = np.empty((len(names),) + shape, STORED_NUMPY[self.stored_type(names)])
        threads = min(_cpus(), len(names), max(1, out.nbytes // STACK_BYTES_PER_THREAD))
        if threads == 1:
            for i, name in enumerate(names):
                self.read_stored(name, out[i])
            return out

        def part(k: int) -> None:
            for i in range(k, len(names), threads):
                self.read_stored(names[i], out[i])
        with ThreadPoolExecutor(threads, thread_name_prefix="stack") as pool:
            list(pool.map(part, range(threads)))  # (list: a thread's error is raised here)
        return out

    def read_stacked(self, names: list[str], shape: tuple[int, ...]) -> Iterator[np.ndarray]:
        """Tensors of one shape (a layer's experts) stacked, in pieces of [1, *shape]: each read in turn into
        the same buffer."""
        self._check_stack(names, shape)
        buf = np.empty((1,) + shape, np.float32)
        for name in names:
            self.read(name, buf[0])
            yield buf

    def _check_stack(self, names: list[str], shape: tuple[int, ...]) -> None:
        for name in names:
            if self.ckpt.info(name).shape != shape:
                raise ConvertError(f"{name} has shape {list(self.ckpt.info(name).shape)}, but {names[0]} has "
                                   f"{list(shape)}: the tensors stacked into one must agree")

    def read_rows(self, name: str) -> Iterator[np.ndarray]:
        """A BF16 / F16 / F32 tensor in pieces of rows (axis 0), each converted into the same buffer."""
        info, data = self.ckpt.info(name), self.ckpt.get(name)
        step = _rows_per_piece(info.shape)
        buf = np.empty((min(step, info.shape[0]),) + info.shape[1:], np.float32)
        for r in range(0, info.shape[0], step):
            part = data[r:r + step]
            yield _to_f32(info.dtype, part, buf[:len(part)])

    def tensors(self, stored: bool = False) -> list[OutTensor]:
        """The GGUF tensors the checkpoint converts to; with `stored`, each able to give its values unconverted
        too (OutTensor.stored: refused for a tensor that has no such type, or a stack of mixed dtypes)."""
        cfg = self.config

        def kept(names: list[str], produce: Callable[[], np.ndarray]) -> dict:
            return {"stored": produce, "stored_type": self.stored_type(names)} if stored else {}

        n_layer = cfg["num_hidden_layers"]
        names = [n for n in self.ckpt.names() if not n.endswith(".weight_scale_inv")]
        out: list[OutTensor] = []
        experts: dict[tuple[int, str], dict[int, str]] = {}
        skipped_mtp = 0
        for name in names:
            m = _LAYER.match(name)
            if m and int(m[1]) >= n_layer:
                skipped_mtp += 1  # MTP layers: llama.cpp's converter skips them too
                continue
            if name == "lm_head.weight" and cfg.get("tie_word_embeddings"):
                continue
            e = _EXPERT.match(m[2]) if m else None
            if e:
                experts.setdefault((int(m[1]), e[2]), {})[int(e[1])] = name
                continue
            shape = self.ckpt.info(name).shape
            if m and m[2] == "self_attn.kv_b_proj.weight" and self.arch == "deepseek2":
                out += self._split_kv_b(int(m[1]), name, shape, stored)
                continue
            gname = gguf_tensor_name(name)
            if gname is None:
                raise ConvertError(f"tensor {name} has no llama.cpp GGUF name; is the checkpoint a "
                                   f"{cfg.get('model_type')} model?")
            pieces = None
            if self.ckpt.info(name).dtype in ("BF16", "F16", "F32", "F64") and _in_pieces(shape):
                pieces = functools.partial(self.read_rows, name)  # the token embedding, the output head
            out.append(OutTensor(gname, shape, lambda n=name: self.read(n), self.sources([name]), pieces,
                                 **kept([name], functools.partial(self.read_stored, name))))
        n_expert = cfg.get("n_routed_experts") or cfg.get("num_experts") or cfg.get("num_local_experts") or 0
        gguf_of = dict(EXPERT_NAMES)
        for (layer, proj), by_id in sorted(experts.items()):
            if sorted(by_id) != list(range(n_expert)):
                missing = sorted(set(range(n_expert)) - set(by_id))
                raise ConvertError(f"layer {layer} {proj}: experts {missing[:8]} are missing from the checkpoint")
            ids = [by_id[i] for i in range(n_expert)]
            shape = self.ckpt.info(ids[0]).shape
            pieces = functools.partial(self.read_stacked, ids, shape)
            out.append(OutTensor(f"blk.{layer}.{gguf_of[proj]}", (n_expert,) + shape, functools.partial(_whole, pieces),
                                 self.sources(ids), pieces,
                                 **kept(ids, functools.partial(self._read_stored_stack, ids, shape))))
        if skipped_mtp:
            log.info("skipping %d MTP tensors (llama.cpp does not run MTP layers)", skipped_mtp)
        return sorted(out, key=_tensor_order)

    def _split_kv_b(self, layer: int, name: str, shape, stored: bool) -> list[OutTensor]:
        c = self.config
        H, Dn, Dv, R = c["num_attention_heads"], c["qk_nope_head_dim"], c["v_head_dim"], c["kv_lora_rank"]
        if shape != (H * (Dn + Dv), R):
            raise ConvertError(f"{name} has shape {list(shape)}, expected [{H * (Dn + Dv)}, {R}] from config.json")

        def part(i, read):
            return lambda: split_kv_b(read(name), H, Dn, Dv)[i]

        def kept(i):
            return {"stored": part(i, self.read_stored), "stored_type": self.stored_type([name])} if stored else {}
        return [OutTensor(f"blk.{layer}.attn_k_b.weight", (H, R, Dn), part(0, self.read), self.sources([name]),
                          **kept(0)),
                OutTensor(f"blk.{layer}.attn_v_b.weight", (H, Dv, R), part(1, self.read), self.sources([name]),
                          **kept(1))]

    def key_values(self) -> dict[str, tuple[object, GGUFValueType, GGUFValueType | None]]:
        kv = {k: (v, t, None) for k, (v, t) in config_to_kv(self.config).items()}
        from .gguf_vocab import vocab_key_values

        for k, (v, t) in vocab_key_values(self.dir).items():
            kv[k] = (v, t, _array_type(v) if t == GGUFValueType.ARRAY else None)
        name = self.config.get("_name_or_path") or self.dir.name
        kv["general.name"] = (str(name), GGUFValueType.STRING, None)
        return kv

    def hparams(self) -> dict:
        c = self.config
        return {"n_layer": c["num_hidden_layers"], "n_head": c["num_attention_heads"],
                "n_head_kv": 1 if self.arch == "deepseek2" else c.get("num_key_value_heads"),
                "n_expert": c.get("n_routed_experts") or c.get("num_experts") or c.get("num_local_experts") or 0,
                "tied_embeddings": bool(c.get("tie_word_embeddings"))}


class GGUFSource:
    """An existing GGUF file (re-quantizing): tensors dequantized to float32 one at a time."""

    def __init__(self, path: Path):
        self.model = GGUFModel(path)
        self.arch = self.model.architecture
        if self.arch not in ("deepseek2", "qwen3moe"):
            raise ConvertError(f"GGUF architecture '{self.arch}' is not supported; Tandem converts deepseek2 and qwen3moe")

    def tensors(self) -> list[OutTensor]:
        return [OutTensor(t.name, t.shape, lambda t=t: dequantize(self.model.raw(t.name), t.qtype).reshape(t.shape),
                          ((t.file, t.offset, t.offset + t.nbytes),),
                          functools.partial(self.read_rows, t) if _in_pieces(t.shape) else None)
                for t in sorted(self.model.tensors.values(), key=lambda t: _tensor_order(OutTensor(t.name, (), None)))]

    def read_rows(self, t) -> Iterator[np.ndarray]:
        """A tensor dequantized in pieces of rows (axis 0)."""
        raw, step = self.model.raw(t.name), _rows_per_piece(t.shape)
        for r in range(0, t.shape[0], step):
            part = raw[r:r + step]
            yield dequantize(part, t.qtype).reshape((len(part),) + t.shape[1:])

    def key_values(self):
        return {k: (v.tolist() if isinstance(v, np.ndarray) else v, *self.model.kv_types[k])
                for k, v in self.model.kv.items() if not k.startswith(SKIP_KEYS)}

    def hparams(self) -> dict:
        get = self.model.get
        return {"n_layer": get("{arch}.block_count"), "n_head": get("{arch}.attention.head_count"),
                "n_head_kv": get("{arch}.attention.head_count_kv"), "n_expert": get("{arch}.expert_count", 0),
                "tied_embeddings": "output.weight" not in self.model.tensors}


def _array_type(values) -> GGUFValueType:
    if isinstance(values, np.ndarray):
        return {np.dtype(np.float32): GGUFValueType.FLOAT32, np.dtype(np.int32): GGUFValueType.INT32,
                np.dtype(np.uint32): GGUFValueType.UINT32}[values.dtype]
    first = values[0]
    if isinstance(first, str):
        return GGUFValueType.STRING
    if isinstance(first, bool):
        return GGUFValueType.BOOL
    if isinstance(first, int):
        return GGUFValueType.INT32
    return GGUFValueType.FLOAT32


def _tensor_order(t: OutTensor):
    """token_embd first, then layers in order, then output_norm/output (llama.cpp's converter order)."""
    m = re.match(r"^blk\.(\d+)\.", t.name)
    if m:
        return (1, int(m[1]), t.name)
    return (0 if t.name.startswith("token_embd") else 2, 0, t.name)


# ---- the conversion ---------------------------------------------------------------------------


def open_source(src: str | Path):
    src = Path(src)
    if not src.exists():
        raise FileNotFoundError(f"no model at {src}")
    if src.is_file():
        if src.suffix != ".gguf":
            raise ConvertError(f"{src} is a file but not .gguf; pass an HF model directory or a GGUF file")
        return GGUFSource(src)
    return HFSource(src)


def plan(source, recipe: str) -> list[tuple[OutTensor, QT]]:
    from .recipes import plan_types

    tensors = source.tensors()
    types = plan_types([(t.name, t.ne) for t in tensors], recipe, source.arch, source.hparams())
    return [(t, types[t.name]) for t in tensors]


# Block types a faster quantizer (the C++ engine's, passed in by the caller) may take over;
# F16/BF16/F32 are conversions numpy does at memory speed anyway.
BLOCK_TYPES = (QT.Q8_0, QT.Q4_0, QT.Q5_0, QT.Q4_1, QT.Q5_1, QT.Q4_K, QT.Q5_K, QT.Q6_K)


def encode(data: np.ndarray, qtype: QT, quantizer: Callable | None = None) -> np.ndarray:
    """float32 data -> what the GGUF writer stores (typed for F32/F16, bytes for block types)."""
    data = np.ascontiguousarray(data, dtype=np.float32)
    if qtype == QT.F32:
        return data
    if quantizer is not None and qtype in BLOCK_TYPES:
        return quantizer(data, int(qtype))
    return quantize(data, qtype)


def convert(src: str | Path, out: str | Path, recipe: str = "q8_0", force: bool = False,
            progress: bool = True, quantizer: Callable | None = None) -> Path:
    """Write `src` (HF dir or GGUF, or a source object like HFSource) as a GGUF quantized with `recipe` to
    `out`; returns the path.

    `quantizer(data, qtype_id) -> bytes` replaces the numpy block quantizers (it must give the same
    bytes; the CLI passes the C++ engine's `offload.quantize`)."""
    from .recipes import file_type

    out = Path(out)
    if out.exists() and not force:
        raise FileExistsError(f"{out} exists; pass --force to overwrite it")
    source = src if hasattr(src, "tensors") else open_source(src)  # a path, or an opened source
    jobs = plan(source, recipe)
    kv = source.key_values()
    out.parent.mkdir(parents=True, exist_ok=True)
    nbytes = {t.name: int(np.prod(t.shape[:-1], dtype=np.int64)) * row_bytes(t.shape[-1], qtype) for t, qtype in jobs}
    _check_room(out, sum(nbytes.values()))
    fd, tmp_name = tempfile.mkstemp(prefix=f".{out.name}.", suffix=".part", dir=out.parent)
    os.close(fd)
    tmp = Path(tmp_name)
    try:
        writer = GGUFWriter(tmp, source.arch)
        for key, (value, vtype, sub) in kv.items():
            writer.add_key_value(key, value, vtype, sub)
        writer.add_quantization_version(2)
        writer.add_file_type(file_type(recipe))
        for t, qtype in jobs:
            writer.add_tensor_info(t.name, t.shape, np.dtype(np.float32), nbytes[t.name], raw_dtype=qtype)
        writer.write_header_to_file(tmp)
        writer.write_kv_data_to_file()
        writer.write_ti_data_to_file()
        # the source comes off the disk, in the jobs' order, while the jobs before are quantized
        with ReadAhead([t.sources for t, _ in jobs]) as ahead:
            for i, (t, qtype) in enumerate(_progress(jobs, progress)):
                ahead.at(i)
                if t.pieces is not None:
                    writer.write_tensor_data(_Pieces(t, qtype, quantizer, nbytes[t.name]))
                    continue
                data = t.produce()
                if data.shape != t.shape:
                    raise ConvertError(f"{t.name}: produced shape {data.shape}, planned {t.shape}")
                writer.write_tensor_data(encode(data, qtype, quantizer))
                del data
        writer.close()
        umask = os.umask(0)
        os.umask(umask)
        os.chmod(tmp, 0o666 & ~umask)  # mkstemp's file is private; the output is an ordinary file
        os.replace(tmp, out)
    except BaseException:
        tmp.unlink(missing_ok=True)
        raise
    return out


def _check_room(out: Path, tensor_bytes: int) -> None:
    """Refuse before the work, not after it, when the output's disk cannot hold it (the tensors, with 1% and
    64 MiB for the header, the vocabulary and the alignment)."""
    need = int(tensor_bytes * 1.01) + (64 << 20)
    free = shutil.disk_usage(out.parent).free
    if need > free:
        raise ConvertError(f"{out.name} needs about {need / 2**30:.1f} GiB but {out.parent} has {free / 2**30:.1f} "
                           "GiB free; free some space or write the output elsewhere (-o)")


class _Pieces:
    """A tensor encoded and written a piece at a time: what GGUFWriter.write_tensor_data needs of an array
    (nbytes, tofile). Every type encodes row by row, so the pieces' bytes in turn are the whole tensor's."""

    def __init__(self, t: OutTensor, qtype: QT, quantizer: Callable | None, nbytes: int):
        self.t, self.qtype, self.quantizer, self.nbytes = t, qtype, quantizer, nbytes

    def tofile(self, f) -> None:
        for data in encoded_pieces(self.t, self.qtype, self.quantizer, self.nbytes):
            data.tofile(f)


def encoded_pieces(t: OutTensor, qtype: QT, quantizer: Callable | None, nbytes: int) -> Iterator[np.ndarray]:
    """t.pieces() encoded to `qtype` one after the other (what the whole tensor encodes to, in turn: every type
    encodes row by row); ConvertError for a piece of the wrong shape, or pieces that do not add up to the
    tensor's rows and `nbytes`."""
    written, rows = 0, 0
    for piece in t.pieces():
        if piece.shape[1:] != t.shape[1:]:
            raise ConvertError(f"{t.name}: produced a piece of shape {piece.shape}, planned {t.shape}")
        data = encode(piece, qtype, quantizer)
        yield data
        written, rows = written + data.nbytes, rows + piece.shape[0]
    if rows != t.shape[0] or written != nbytes:
        raise ConvertError(f"{t.name}: produced {rows} of {t.shape[0]} rows on axis 0 ({written} of {nbytes} bytes)")


def _progress(jobs, enabled: bool) -> Iterator:
    """A progress line on stderr: redrawn in place on a terminal, one line per 10% otherwise."""
    total = sum(int(np.prod(t.shape)) for t, _ in jobs)
    tty = sys.stderr.isatty()
    done, shown = 0, -10.0
    for i, (t, qtype) in enumerate(jobs):
        pct = 100 * done / max(total, 1)
        if enabled and (tty or pct - shown >= 10):
            line = f"[{i + 1:4d}/{len(jobs)}] {pct:5.1f}%  {t.name:<36} -> {qtype.name:<5}"
            sys.stderr.write(f"\r{line}" if tty else f"{line}\n")
            sys.stderr.flush()
            shown = pct
        yield t, qtype
        done += int(np.prod(t.shape))
    if enabled:
        start = "\r" if tty else ""
        sys.stderr.write(f"{start}[{len(jobs):4d}/{len(jobs)}] 100.0%  done{' ' * 40}\n")


__all__ = ["convert", "open_source", "plan", "ConvertError", "CheckpointError"]
