"""Damaged GGUF files give a GGUFError that names the problem - never a crash, a hang or a wrong model."""

from __future__ import annotations

import random
import struct

import numpy as np
import pytest
from gguf import GGMLQuantizationType, GGUFWriter

import local
from quant.gguf_file import GGUFError, GGUFModel


@pytest.fixture
def small_gguf(tmp_path):
    path = tmp_path / "small.gguf"
    w = GGUFWriter(path, "deepseek2")
    w.add_block_count(1)
    w.add_token_list(["a", "b", "c", "<s>"])
    w.add_string("general.name", "tiny")
    w.add_tensor("token_embd.weight", np.arange(4 * 64, dtype=np.float32).reshape(4, 64))
    w.add_tensor("blk.0.attn_norm.weight", np.ones(64, dtype=np.float32))
    w.write_header_to_file()
    w.write_kv_data_to_file()
    w.write_tensors_to_file()
    w.close()
    return path


def header_end(path) -> int:
    g = GGUFModel(path)
    return min(t.offset for t in g.tensors.values())


def test_reads_back(small_gguf):
    g = GGUFModel(small_gguf)
    assert g.kv["tokenizer.ggml.tokens"] == ["a", "b", "c", "<s>"]
    assert np.array_equal(g.raw("token_embd.weight")[1], np.arange(64, 128, dtype=np.float32))


def test_truncated(small_gguf):
    data = small_gguf.read_bytes()
    small_gguf.write_bytes(data[:-100])
    with pytest.raises(GGUFError, match="truncated"):
        GGUFModel(small_gguf)
    small_gguf.write_bytes(data[:30])
    with pytest.raises(GGUFError, match="truncated or corrupt"):
        GGUFModel(small_gguf)
    small_gguf.write_bytes(b"")
    with pytest.raises(GGUFError):
        GGUFModel(small_gguf)


def test_damaged_string_array(small_gguf):
    """The vocabulary's strings (read in one loop, as there are 150k+ of them): a bad element names itself."""
    data = small_gguf.read_bytes()
    at = data.index(struct.pack("<Q", 1) + b"a" + struct.pack("<Q", 1) + b"b")  # tokens "a", "b", ...
    bad = bytearray(data)
    bad[at + 17] = 0xFF  # "b" -> b"\xff"
    small_gguf.write_bytes(bytes(bad))
    with pytest.raises(GGUFError, match="tokenizer.ggml.tokens is not valid UTF-8"):
        GGUFModel(small_gguf)
    bad = bytearray(data)
    bad[at + 18:at + 26] = struct.pack("<Q", 1 << 40)  # "c" claims a terabyte
    small_gguf.write_bytes(bytes(bad))
    with pytest.raises(GGUFError, match="ends inside the value of tokenizer.ggml.tokens"):
        GGUFModel(small_gguf)
    small_gguf.write_bytes(data[:at + 34])  # cut inside the last string, "<s>"
    with pytest.raises(GGUFError, match="ends inside the value of tokenizer.ggml.tokens"):
        GGUFModel(small_gguf)


def test_not_gguf(small_gguf):
    small_gguf.write_bytes(b"PK\x03\x04" + b"\0" * 100)
    with pytest.raises(GGUFError, match="not a GGUF file"):
        GGUFModel(small_gguf)


def test_corrupt_counts(small_gguf):
    data = bytearray(small_gguf.read_bytes())
    data[8:16] = struct.pack("<Q", 1 << 50)  # tensor count
    small_gguf.write_bytes(bytes(data))
    with pytest.raises(GGUFError, match="more than a .*-byte file can hold"):
        GGUFModel(small_gguf)


def patch_tensor_field(path, name: bytes, field: str, value: int):
    """Rewrite a tensor info's type or offset in place."""
    data = bytearray(path.read_bytes())
    i = data.index(struct.pack("<Q", len(name)) + name) + 8 + len(name)
    n_dims = struct.unpack_from("<I", data, i)[0]
    pos = i + 4 + 8 * n_dims
    if field == "type":
        data[pos:pos + 4] = struct.pack("<I", value)
    else:
        data[pos + 4:pos + 12] = struct.pack("<Q", value)
    path.write_bytes(bytes(data))


def test_offset_past_end(small_gguf):
    patch_tensor_field(small_gguf, b"blk.0.attn_norm.weight", "offset", 1 << 30)
    with pytest.raises(GGUFError, match="attn_norm.weight needs bytes .* file has"):
        GGUFModel(small_gguf)


def test_unknown_quant_type(small_gguf):
    patch_tensor_field(small_gguf, b"blk.0.attn_norm.weight", "type", 77)
    with pytest.raises(GGUFError, match="unknown ggml type id 77"):
        GGUFModel(small_gguf)


def test_unsupported_quant_type_names_the_fix(tmp_path):
    """A known GGML type that Tandem cannot compute (Q3_K) is refused at load with the re-quantize hint."""
    from quant.formats import dequantize

    with pytest.raises(ValueError, match="Q3_K"):
        dequantize(np.zeros((1, 110), np.uint8), GGMLQuantizationType.Q3_K)


def test_unknown_architecture(tmp_path):
    path = tmp_path / "llama.gguf"
    w = GGUFWriter(path, "llama")
    w.add_block_count(1)
    w.add_tensor("token_embd.weight", np.zeros((4, 32), dtype=np.float32))
    w.write_header_to_file()
    w.write_kv_data_to_file()
    w.write_tensors_to_file()
    w.close()
    with pytest.raises(ValueError, match="architecture 'llama' is not supported"):
        local.load(path, device="cpu")


def test_missing_split_part(small_gguf, tmp_path):
    part = tmp_path / "m-00001-of-00002.gguf"
    part.write_bytes(small_gguf.read_bytes())
    with pytest.raises(GGUFError, match="missing: m-00002-of-00002.gguf"):
        GGUFModel(part)


def test_fuzz_mutated_headers(small_gguf):
    """Random byte flips and truncations in the header: GGUFModel either reads it or raises GGUFError."""
    data = small_gguf.read_bytes()
    end = header_end(small_gguf)
    rng = random.Random(1234)
    outcomes = {"ok": 0, "error": 0}
    for i in range(400):
        buf = bytearray(data)
        if i % 5 == 0:
            buf = buf[: rng.randrange(len(buf))]
        else:
            for _ in range(rng.randint(1, 4)):
                pos = rng.randrange(4, end)
                buf[pos] = rng.choice([0, 0xFF, rng.randrange(256), buf[pos] ^ (1 << rng.randrange(8))])
        small_gguf.write_bytes(bytes(buf))
        try:
            g = GGUFModel(small_gguf)
            for name in g.tensors:
                np.asarray(g.raw(name)).sum()  # every tensor the header describes is readable
            outcomes["ok"] += 1
        except GGUFError:
            outcomes["error"] += 1
    assert outcomes["error"] > 100 and outcomes["ok"] > 10, outcomes
