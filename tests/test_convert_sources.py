"""`tandem convert` reading its source: BF16 and F16 checkpoints (most published ones) give exactly the values
they hold, a layer's experts are stacked in their order, shards are read through their index, and the bytes
are read ahead in the order the converter takes them."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import numpy as np
import pytest
import torch
from safetensors.torch import load_file, save_file

import quant.convert as convert_module
from quant.convert import ConvertError, convert
from quant.gguf_file import GGUFModel
from quant.read_ahead import ReadAhead
from quant.safetensors_file import Checkpoint

from .conftest import build_reference


@pytest.fixture(scope="module")
def f32_model(tmp_path_factory, tokenizer_dir) -> Path:
    d = tmp_path_factory.mktemp("hf_f32")
    build_reference("v3", d, tokenizer_dir, seed=5)
    return d


def save_as(src: Path, dst: Path, dtype: torch.dtype, stored: torch.dtype | None = None, shards: int = 2) -> Path:
    """A copy of the HF directory `src` with its float tensors rounded to `dtype` and stored as `stored`
    (default: `dtype`), in `shards` files with an index, tensors dealt out round-robin."""
    shutil.copytree(src, dst, ignore=shutil.ignore_patterns("*.safetensors", "*.index.json"))
    state = load_file(src / "model.safetensors")
    parts: list[dict] = [{} for _ in range(shards)]
    for i, (name, t) in enumerate(sorted(state.items())):
        if t.is_floating_point():
            t = t.to(dtype).to(stored or dtype)
        parts[i % shards][name] = t.contiguous()
    if shards == 1:
        save_file(parts[0], dst / "model.safetensors", metadata={"format": "pt"})
        return dst
    weight_map = {}
    for i, part in enumerate(parts):
        fname = f"model-{i + 1:05d}-of-{shards:05d}.safetensors"
        save_file(part, dst / fname, metadata={"format": "pt"})
        weight_map.update({name: fname for name in part})
    (dst / "model.safetensors.index.json").write_text(json.dumps({"metadata": {}, "weight_map": weight_map}))
    return dst


def tensors_of(path: Path) -> dict[str, np.ndarray]:
    g = GGUFModel(path)
    return {name: np.array(g.raw(name)) for name in g.tensors}


@pytest.mark.parametrize("piece_values", [None, 1000], ids=["whole", "in-pieces"])
@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16], ids=["bf16", "f16"])
def test_half_checkpoints_convert_to_their_exact_values(f32_model, tmp_path, monkeypatch, dtype, piece_values):
    """In pieces: every matrix of more than 1000 values converted a few rows at a time (the last piece short),
    as the token embedding and output head of a real model are."""
    half = save_as(f32_model, tmp_path / "half", dtype)
    same_in_f32 = save_as(f32_model, tmp_path / "f32", dtype, stored=torch.float32, shards=1)
    b = tensors_of(convert(same_in_f32, tmp_path / "f32.gguf", "f32", progress=False))
    if piece_values:
        monkeypatch.setattr(convert_module, "PIECE_VALUES", piece_values)
    a = tensors_of(convert(half, tmp_path / "half.gguf", "f32", progress=False))
    assert a.keys() == b.keys() and any(".ffn_gate_exps." in n for n in a)
    for name in a:
        assert a[name].dtype == b[name].dtype and np.array_equal(a[name], b[name]), name
    # and the experts are stacked in their order: expert 3's gate of layer 2 is plane 3
    state = load_file(same_in_f32 / "model.safetensors")
    want = state["model.layers.2.mlp.experts.3.gate_proj.weight"].numpy()
    gate = "blk.2.ffn_gate_exps.weight"
    assert np.array_equal(a[gate][3], want)
    # produce(), the whole-tensor form, gives the same stack
    stack = next(t for t in convert_module.HFSource(half).tensors() if t.name == gate)
    assert np.array_equal(stack.produce(), a[gate])


def test_experts_of_different_shapes_are_refused(f32_model, tmp_path):
    d = save_as(f32_model, tmp_path / "bad", torch.bfloat16, shards=1)
    state = load_file(d / "model.safetensors")
    name = "model.layers.2.mlp.experts.2.up_proj.weight"
    state[name] = state[name][:-1].contiguous()
    save_file(state, d / "model.safetensors", metadata={"format": "pt"})
    with pytest.raises(ConvertError, match="experts.2.up_proj.*must agree"):
        convert(d, tmp_path / "bad.gguf", "q8_0", progress=False)


def test_reads_ahead_every_source_byte_in_the_jobs_order(f32_model, tmp_path, monkeypatch):
    src = save_as(f32_model, tmp_path / "src", torch.bfloat16, shards=3)
    seen: dict = {}

    class Recording(ReadAhead):
        def __init__(self, jobs, *args, **kwargs):
            seen["jobs"], seen["at"] = [list(j) for j in jobs], []
            super().__init__(jobs, *args, **kwargs)

        def at(self, job):
            seen["at"].append(job)
            super().at(job)

    monkeypatch.setattr(convert_module, "ReadAhead", Recording)
    out = convert(src, tmp_path / "m.gguf", "q8_0", progress=False)
    jobs = seen["jobs"]
    assert seen["at"] == list(range(len(jobs))) == list(range(len(GGUFModel(out).tensors)))
    ckpt = Checkpoint(src)
    every = {(ckpt.info(n).file, ckpt.info(n).begin, ckpt.info(n).end) for n in ckpt.names()}
    advised = {r for job in jobs for r in job}
    assert advised == every  # each tensor's bytes, in whichever shard holds them
    # the expert stack jobs name their experts' ranges in the experts' order
    gates = [ckpt.info(f"model.layers.2.mlp.experts.{i}.gate_proj.weight") for i in range(16)]
    assert [(i.file, i.begin, i.end) for i in gates] in jobs


def test_requantize_in_pieces_writes_the_same_file(f32_model, tmp_path, monkeypatch):
    f32 = convert(f32_model, tmp_path / "f32.gguf", "f32", progress=False)
    whole = tensors_of(convert(f32, tmp_path / "whole.gguf", "q8_0", progress=False))
    monkeypatch.setattr(convert_module, "PIECE_VALUES", 1000)
    assert any(t.pieces is not None for t in convert_module.open_source(f32).tensors())
    pieces = tensors_of(convert(f32, tmp_path / "pieces.gguf", "q8_0", progress=False))
    assert whole.keys() == pieces.keys()
    for name in whole:
        assert np.array_equal(whole[name], pieces[name]), name


def test_a_short_piece_is_an_error_not_a_short_file(f32_model, tmp_path, monkeypatch):
    monkeypatch.setattr(convert_module, "PIECE_VALUES", 1000)
    orig = convert_module.HFSource.read_rows

    def short(self, name):
        yield from list(orig(self, name))[:-1]
    monkeypatch.setattr(convert_module.HFSource, "read_rows", short)
    with pytest.raises(ConvertError, match="rows on axis 0"):
        convert(f32_model, tmp_path / "short.gguf", "q8_0", progress=False)
    assert not (tmp_path / "short.gguf").exists()


def test_a_full_disk_is_refused_before_the_work(f32_model, tmp_path, monkeypatch):
    from collections import namedtuple

    usage = namedtuple("usage", "total used free")
    monkeypatch.setattr(convert_module.shutil, "disk_usage", lambda path: usage(1 << 40, 1 << 40, 10 << 20))
    called = []
    monkeypatch.setattr(convert_module, "encode", lambda *a, **k: called.append(1))
    with pytest.raises(ConvertError, match=r"needs about .* GiB but .* has 0\.0 GiB free; free some space"):
        convert(f32_model, tmp_path / "m.gguf", "q8_0", progress=False)
    assert not called and list(tmp_path.iterdir()) == []
