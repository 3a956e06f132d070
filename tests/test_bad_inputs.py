"""Bad checkpoints and configs raise errors that name the problem - never a crash or a silent answer."""

from __future__ import annotations

import json
import shutil
import struct

import pytest
import torch
from safetensors.torch import load_file, save_file

import local
from local.config import ConfigError
from local.models import UnknownArchitecture
from quant.safetensors_file import CheckpointError


@pytest.fixture
def model_dir(tiny_v3_dir, tmp_path):
    return shutil.copytree(tiny_v3_dir, tmp_path / "m")


def edit_config(d, **changes):
    cfg = json.loads((d / "config.json").read_text())
    cfg.update(changes)
    (d / "config.json").write_text(json.dumps(cfg))


def test_missing_tensor(model_dir):
    state = load_file(model_dir / "model.safetensors")
    del state["model.layers.2.mlp.experts.3.up_proj.weight"]
    save_file(state, model_dir / "model.safetensors")
    with pytest.raises(CheckpointError, match=r"missing tensors: model\.layers\.2\.mlp\.experts\.3\.up_proj\.weight"):
        local.load(model_dir, device="cpu")


def test_unexpected_tensor(model_dir):
    state = load_file(model_dir / "model.safetensors")
    state["model.layers.0.self_attn.rotary.weight"] = torch.zeros(3)
    save_file(state, model_dir / "model.safetensors")
    with pytest.raises(CheckpointError, match=r"unexpected tensors: model\.layers\.0\.self_attn\.rotary\.weight"):
        local.load(model_dir, device="cpu")


def test_shape_mismatch(model_dir):
    edit_config(model_dir, moe_intermediate_size=48)
    with pytest.raises(CheckpointError, match=r"experts\.\d+\.\w+_proj\.weight has shape \[\d+, \d+\], but the model config implies"):
        local.load(model_dir, device="cpu")


def test_unknown_model_type(model_dir):
    edit_config(model_dir, model_type="mixtral")
    with pytest.raises(UnknownArchitecture, match="'mixtral' is not supported.*deepseek_v2, deepseek_v3, qwen3_moe"):
        local.load(model_dir, device="cpu")


def test_truncated_safetensors(model_dir):
    path = model_dir / "model.safetensors"
    data = path.read_bytes()
    path.write_bytes(data[: len(data) - 1000])
    with pytest.raises(CheckpointError, match="truncated"):
        local.load(model_dir, device="cpu")
    path.write_bytes(data[:5])
    with pytest.raises(CheckpointError, match="too short"):
        local.load(model_dir, device="cpu")


def test_corrupt_safetensors_header(model_dir):
    path = model_dir / "model.safetensors"
    data = bytearray(path.read_bytes())
    (n,) = struct.unpack("<Q", data[:8])
    data[8] = ord("x")  # the header no longer opens a JSON object
    path.write_bytes(bytes(data))
    with pytest.raises(CheckpointError, match="header is not valid JSON"):
        local.load(model_dir, device="cpu")
    path.write_bytes(struct.pack("<Q", 1 << 40) + bytes(data[8:]))
    with pytest.raises(CheckpointError, match="header claims"):
        local.load(model_dir, device="cpu")


def test_offsets_disagree_with_shape(model_dir):
    path = model_dir / "model.safetensors"
    data = path.read_bytes()
    (n,) = struct.unpack("<Q", data[:8])
    header = json.loads(data[8:8 + n])
    name = "model.norm.weight"
    header[name]["shape"] = [header[name]["shape"][0] * 2]
    raw = json.dumps(header, separators=(",", ":")).encode().ljust(n)
    assert len(raw) == n
    path.write_bytes(data[:8] + raw + data[8 + n:])
    with pytest.raises(CheckpointError, match=r"model\.norm\.weight .* header is corrupt"):
        local.load(model_dir, device="cpu")


@pytest.mark.parametrize("text, match", [
    ("{not json", "not valid JSON"),
    ('["a list"]', "expected a JSON object"),
])
def test_malformed_config_json(model_dir, text, match):
    (model_dir / "config.json").write_text(text)
    with pytest.raises(ConfigError, match=match):
        local.load(model_dir, device="cpu")


@pytest.mark.parametrize("changes, match", [
    ({"hidden_size": "wide"}, "'hidden_size' is 'wide'"),
    ({"hidden_size": None}, "'hidden_size' is None"),
    ({"num_experts_per_tok": 99}, "num_experts_per_tok=99"),
    ({"n_group": 3}, "n_group=3"),
    ({"rope_parameters": {"rope_type": "su", "rope_theta": 1e4}}, "rope type 'su' is not supported"),
    ({"hidden_act": "tanhshrink"}, "hidden_act 'tanhshrink' is not supported"),
])
def test_inconsistent_config(model_dir, changes, match):
    edit_config(model_dir, **changes)
    with pytest.raises(ValueError, match=match):
        local.load(model_dir, device="cpu")


def test_missing_config_field(model_dir):
    cfg = json.loads((model_dir / "config.json").read_text())
    del cfg["kv_lora_rank"]
    (model_dir / "config.json").write_text(json.dumps(cfg))
    with pytest.raises(ConfigError, match="has no 'kv_lora_rank'"):
        local.load(model_dir, device="cpu")


def test_pickles_are_never_loaded(tmp_path, tiny_v3_dir):
    d = tmp_path / "pickled"
    d.mkdir()
    shutil.copy(tiny_v3_dir / "config.json", d / "config.json")
    (d / "pytorch_model.bin").write_bytes(b"\x80\x04not really a pickle")
    with pytest.raises(CheckpointError, match="pickled weights are never loaded"):
        local.load(d, device="cpu")


def test_missing_shard(model_dir):
    (model_dir / "model.safetensors.index.json").write_text(json.dumps(
        {"weight_map": {"model.norm.weight": "model-00002-of-00002.safetensors"}}))
    with pytest.raises(CheckpointError, match="lists model-00002-of-00002.safetensors, which is missing"):
        local.load(model_dir, device="cpu")


def test_no_such_path_and_not_a_model(tmp_path):
    with pytest.raises(FileNotFoundError, match="no model at"):
        local.load(tmp_path / "nope", device="cpu")
    with pytest.raises(ConfigError, match="has no config.json"):
        local.load(tmp_path, device="cpu")


def test_bad_prompt_ids(tiny_v3_dir):
    runner = local.load(tiny_v3_dir, device="cpu")
    with pytest.raises(ValueError, match="outside the vocabulary"):
        runner.logits([1, 2, 10**6])
    with pytest.raises(ValueError, match="prompt is empty"):
        runner.logits([])
