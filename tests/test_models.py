"""Our runner against `transformers` on the same weights: logits, greedy tokens, bf16, cache."""

from __future__ import annotations

import numpy as np
import pytest
import torch

import local
from local import SamplingParams
from local.models import mla

from .conftest import VARIANTS, VOCAB

PROMPT_LEN, NEW_TOKENS = 32, 32
# The bf16 path against the fp32 reference (documented in the README): bf16 rounding flips some
# near-tied expert choices, so max |diff| is not bounded; the distributions stay close.
BF16_MAX_KL = 0.05  # mean KL(fp32 || bf16) per position, nats
BF16_MIN_TOP1 = 0.9  # top-1 agreement


def prompt_ids(seed: int = 1) -> torch.Tensor:
    g = torch.Generator().manual_seed(seed)
    return torch.randint(2, VOCAB, (PROMPT_LEN,), generator=g)


@pytest.fixture(scope="module")
def loaded(reference_models):
    """name -> the runner on the CPU engine (an HF directory's tensors run there as a float GGUF's)."""
    return {name: local.load(d, device="cpu", dtype="float32") for name, (d, _) in reference_models.items()}


@pytest.fixture(scope="module")
def loaded_torch(reference_models):
    """name -> the runner in torch (engine=False: the path of an HF directory on a GPU)."""
    return {name: local.load(d, device="cpu", dtype="float32", engine=False)
            for name, (d, _) in reference_models.items()}


@pytest.mark.parametrize("engine", [True, False], ids=["engine", "torch"])
@pytest.mark.parametrize("name", list(VARIANTS))
def test_logits_match_transformers(name, engine, reference_models, request):
    _, ref = reference_models[name]
    runner = request.getfixturevalue("loaded" if engine else "loaded_torch")[name]
    assert runner.uses_engine == engine
    ids = prompt_ids()
    with torch.no_grad():
        want = ref(ids[None]).logits[0]
    got = runner.logits(ids)
    assert got.dtype == torch.float32 and got.shape == (PROMPT_LEN, VOCAB)
    assert want.abs().max() > 0.5  # not a degenerate model
    assert (got - want).abs().max().item() <= 1e-4


@pytest.mark.parametrize("engine", [True, False], ids=["engine", "torch"])
@pytest.mark.parametrize("name", list(VARIANTS))
def test_greedy_decode_matches_transformers(name, engine, reference_models, request):
    _, ref = reference_models[name]
    runner = request.getfixturevalue("loaded" if engine else "loaded_torch")[name]
    ids = prompt_ids(seed=2)
    with torch.no_grad():
        want = ref.generate(ids[None], max_new_tokens=NEW_TOKENS, do_sample=False)[0, PROMPT_LEN:].tolist()
    events = list(runner.generate(ids.tolist(), SamplingParams(max_tokens=NEW_TOKENS, temperature=0,
                                                                ignore_eos=True)))
    got = [e.token_id for e in events if e.token_id is not None]
    assert len(set(want)) > 3  # the reference does not just repeat one token
    assert got == want
    done = events[-1]
    assert done.kind == "done" and done.finish_reason == "length"
    assert done.stats.generated_tokens == NEW_TOKENS and done.stats.prompt_tokens == PROMPT_LEN


def kl_and_top1(got: torch.Tensor, want: torch.Tensor) -> tuple[float, float]:
    kl = torch.nn.functional.kl_div(got.log_softmax(-1), want.log_softmax(-1), log_target=True,
                                    reduction="none").sum(-1).mean().item()
    return kl, (got.argmax(-1) == want.argmax(-1)).float().mean().item()


@pytest.mark.parametrize("name", list(VARIANTS))
def test_bf16_within_tolerance(name, reference_models):
    d, ref = reference_models[name]
    runner = local.load(d, device="cpu", dtype="bfloat16", engine=False)
    assert runner.dtype == torch.bfloat16
    assert runner.model.model.layers[-1].self_attn.o_proj.weight.dtype == torch.bfloat16
    ids = prompt_ids()
    with torch.no_grad():
        want = ref(ids[None]).logits[0]
    got = runner.logits(ids)
    assert (got - want).abs().max().item() > 1e-4  # really computed in bf16
    kl, top1 = kl_and_top1(got, want)
    assert kl <= BF16_MAX_KL and top1 >= BF16_MIN_TOP1, (kl, top1)


def test_absorbed_decode_equals_decompressed(loaded, monkeypatch):
    """MLA in latent space (decode) and decompressed (prefill) are the same function."""
    runner = loaded["v3"]
    ids = prompt_ids(seed=3)
    full = runner.logits(ids)
    monkeypatch.setattr(mla, "ABSORB_MAX_TOKENS", 1 << 30)
    absorbed = runner.logits(ids)
    assert (full - absorbed).abs().max().item() <= 1e-4
    monkeypatch.setattr(mla, "ABSORB_MAX_TOKENS", 0)
    cache = runner.model.new_cache()
    with torch.inference_mode():
        step = torch.cat([runner.model(ids[i:i + 1], cache) for i in range(len(ids))])
    assert (full - step).abs().max().item() <= 1e-4


def test_latent_cache_size(loaded):
    """MLA caches kv_lora_rank + qk_rope_head_dim values per token per layer, GQA 2 * K * Dh."""
    v3 = loaded["v3"]
    c = v3.config
    assert v3.kv_bytes_per_token == (c.kv_lora_rank + c.qk_rope_head_dim) * c.num_hidden_layers * 4
    q = loaded["qwen3_norm"]
    qc = q.config
    assert q.kv_bytes_per_token == 2 * qc.num_key_value_heads * 24 * qc.num_hidden_layers * 4


def test_sharded_checkpoint(tmp_path, tokenizer_dir):
    """Several safetensors shards behind model.safetensors.index.json load like one file."""
    from .conftest import build_reference

    ref = build_reference("v2_group", tmp_path, tokenizer_dir, seed=5, max_shard_size="60KB")
    assert (tmp_path / "model.safetensors.index.json").exists()
    assert len(list(tmp_path.glob("*.safetensors"))) > 2
    ids = prompt_ids()
    with torch.no_grad():
        want = ref(ids[None]).logits[0]
    got = local.load(tmp_path, device="cpu", dtype="float32").logits(ids)
    assert (got - want).abs().max().item() <= 1e-4


def test_weights_are_memory_mapped(loaded_torch):
    """fp32 checkpoint, fp32 compute, in torch: parameters are views of the file, not copies."""
    runner = loaded_torch["v3"]
    w = runner.model.model.layers[0].self_attn.kv_b_proj.weight
    ckpt = runner.model.checkpoint
    mapped = next(iter(ckpt.files.values()))._map
    base = mapped.ctypes.data
    assert base <= w.data_ptr() < base + mapped.nbytes


@pytest.mark.parametrize("name", ["v3", "qwen3_norm"])
def test_chunked_prefill_equals_one_shot(name, loaded):
    """Prefill in chunks (decompressed MLA over a cache with history) = all at once."""
    runner = loaded[name]
    ids = prompt_ids(seed=4)
    whole = runner.logits(ids)
    cache = runner.model.new_cache(capacity=4)  # also grows the cache on the way
    with torch.inference_mode():
        parts = [runner.model(ids[i:i + 10], cache) for i in range(0, len(ids), 10)]
    assert cache.length == len(ids) and cache.capacity >= len(ids)
    assert (torch.cat(parts) - whole).abs().max().item() <= 1e-4


@pytest.mark.parametrize("rope_type", ["default", "yarn"])
@pytest.mark.parametrize("dim", [8, 24, 64, 128])
def test_rope_table_gives_the_floats_of_each_step(rope_type, dim):
    """A forward's cos / sin come from a table of every position so far (cos_sin_range): the same floats as
    computing the step's rows alone, at any start and length, across the table's growth."""
    from local.config import RopeSpec
    from local.models.layers import Rope

    spec = RopeSpec() if rope_type == "default" else RopeSpec(rope_type="yarn", factor=40.0, mscale=1.0,
                                                               mscale_all_dim=1.0,
                                                               original_max_position_embeddings=4096)
    rope = Rope(spec, dim, interleaved=dim % 16 == 0)
    for start, T in [(0, 1), (0, 7), (5, 1), (100, 3), (1000, 1), (4095, 1), (3000, 513), (7, 2)]:
        got = rope.cos_sin_range(start, T, "cpu")
        want = rope.cos_sin(torch.arange(start, start + T))
        assert got[0].shape == (T, dim // 2) and torch.equal(got[0], want[0]) and torch.equal(got[1], want[1])


def test_legacy_rope_scaling_config(reference_models, tmp_path):
    """DeepSeek's own config.json style: `rope_scaling` with "type", `rope_theta` at the top level."""
    import json
    import shutil

    src, ref = reference_models["v3"]
    d = shutil.copytree(src, tmp_path / "m")
    cfg = json.loads((d / "config.json").read_text())
    rope = cfg.pop("rope_parameters")
    cfg["rope_theta"] = rope.pop("rope_theta")
    rope["type"] = rope.pop("rope_type")
    cfg["rope_scaling"] = rope
    cfg.update(topk_method="noaux_tc", scoring_func="sigmoid", moe_layer_freq=1, ep_size=1, torch_dtype="float32")
    (d / "config.json").write_text(json.dumps(cfg))
    ids = prompt_ids()
    with torch.no_grad():
        want = ref(ids[None]).logits[0]
    assert (local.load(d, device="cpu", dtype="float32").logits(ids) - want).abs().max().item() <= 1e-4


@pytest.mark.parametrize("name", ["v3", "qwen3_norm"])
def test_f16_kv_cache(name, reference_models):
    """An f16 cache halves its bytes and stays close to the fp32 result."""
    d, _ = reference_models[name]
    full = local.load(d, device="cpu", dtype="float32")
    half = local.load(d, device="cpu", dtype="float32", kv_cache_dtype="float16")
    assert half.kv_bytes_per_token * 2 == full.kv_bytes_per_token
    ids = prompt_ids()
    a, b = full.logits(ids), half.logits(ids)
    assert 0 < (a - b).abs().max().item() <= 2e-2
    kl = torch.nn.functional.kl_div(b.log_softmax(-1), a.log_softmax(-1), log_target=True,
                                    reduction="none").sum(-1).mean().item()
    assert kl <= 1e-4


@pytest.mark.parametrize("qtype", ["F32", "F16", "BF16", "Q8_0", "Q4_0", "Q5_1", "Q4_K", "Q6_K"])
def test_quant_embedding_reads_the_rows_it_is_asked(qtype):
    """QuantEmbedding: the rows of the dequantized table for any shape of ids, as the model's dtype; ids
    outside the vocabulary (negative ones too, which numpy would wrap) are an error naming the id."""
    from local.models.layers import QuantEmbedding
    from quant.formats import dequantize, quantize
    from gguf import GGMLQuantizationType as QT

    rng = np.random.default_rng(0)
    table = quantize(rng.standard_normal((37, 256), dtype=np.float32), QT[qtype])
    if qtype == "BF16":
        table = table.view(np.uint8)  # as GGUFModel.raw gives BF16: the raw bytes
    full = torch.from_numpy(dequantize(table, QT[qtype]))
    emb = QuantEmbedding(table, QT[qtype], 256)
    for ids in (torch.tensor([5]), torch.tensor([0, 36, 5, 5]), torch.tensor([[1, 2, 3], [4, 5, 6]]),
                torch.zeros(0, dtype=torch.int64)):
        out = emb(ids)
        assert out.shape == (*ids.shape, 256) and out.dtype == torch.float32
        assert torch.equal(out, full[ids])
    assert emb(torch.tensor([3])).sum() != 0
    assert QuantEmbedding(table, QT[qtype], 256, torch.bfloat16)(torch.tensor([3])).dtype == torch.bfloat16
    for bad in (37, -1):
        with pytest.raises(IndexError, match=f"token id {bad} is outside the vocabulary"):
            emb(torch.tensor([1, bad]))
    with pytest.raises(ValueError, match="token ids on meta: this embedding is read from the GGUF file on the CPU"):
        emb(torch.zeros(1, dtype=torch.int64, device="meta"))


@pytest.mark.parametrize("geometry", ["deepseek-v2-lite", "deepseek-v3", "qwen3-30b-a3b"])
def test_models_build_without_random_init(geometry, monkeypatch):
    """Loaders build on the meta device and fill every tensor: the token embedding's normal_ init there ran
    torch's Python decompositions (importing them took ~1.3 s, half of `tandem run` on the demo model), and
    the linear layers' init took half the time of building a model with thousands of experts."""
    from local.models import get_architecture
    from local.synthetic import model_config

    def refuse(*args, **kwargs):
        raise AssertionError("the model's construction drew random weights")

    monkeypatch.setattr(torch.Tensor, "normal_", refuse)
    monkeypatch.setattr(torch.Tensor, "uniform_", refuse)
    cfg = model_config(geometry, 1, 16)
    arch = get_architecture(cfg["model_type"])
    with torch.device("meta"):
        model = arch.build(arch.Config.from_dict(cfg), [])
    assert model.model.embed_tokens.weight.shape == (cfg["vocab_size"], cfg["hidden_size"])


def test_an_hf_directory_runs_on_the_engine(tiny_v3_dir):
    """On the CPU an HF directory runs on the engine (torch was 2.4x slower on a 4-layer Qwen3-30B-A3B in BF16);
    engine=False keeps it in torch."""
    import local

    on_engine = local.load(tiny_v3_dir, device="cpu")
    assert on_engine.uses_engine and on_engine.describe()["placement"] == "CPU engine: every linear and expert"
    assert on_engine.describe()["format"] == "hf"
    in_torch = local.load(tiny_v3_dir, device="cpu", engine=False)
    assert not in_torch.uses_engine and in_torch.describe()["placement"] == "torch on cpu"
