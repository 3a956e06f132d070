"""GGUF end to end: `tandem convert` output loads in llama.cpp and in Tandem, and both agree."""

from __future__ import annotations

import ctypes
import shutil
import subprocess
import sys

import numpy as np
import pytest
import torch

import local
from local.llama_cpp_peer import open_llama
from quant.convert import convert
from quant.gguf_file import GGUFModel

from .conftest import VOCAB, build_reference

llama_cpp = pytest.importorskip("llama_cpp")

N_TOKENS = 64


def llama_logits(path, ids: list[int], threads: int = 2) -> torch.Tensor:
    """llama.cpp's (CPU) logits [len(ids), vocab] for one sequence, through llama-cpp-python."""
    llm = open_llama(path, n_ctx=256, n_batch=256, n_threads=threads, n_threads_batch=threads, logits_all=True)
    llm.eval(ids)
    out = torch.from_numpy(np.array(llm.scores[:len(ids)], dtype=np.float32))
    llm.close()
    return out


def kl_top1(ours: torch.Tensor, ref: torch.Tensor) -> tuple[float, float]:
    p = torch.log_softmax(ref.double(), -1)
    q = torch.log_softmax(ours.double(), -1)
    kl = (p.exp() * (p - q)).sum(-1).mean().item()
    return kl, (ours.argmax(-1) == ref.argmax(-1)).double().mean().item()


def seq(seed: int = 0) -> list[int]:
    g = torch.Generator().manual_seed(seed)
    return [0] + torch.randint(2, VOCAB, (N_TOKENS - 1,), generator=g).tolist()


# Weights drawn with std 0.05 (HF's default is 0.02; the transformers tests use 0.1, whose MoE routing
# is so chaotic that any rounding difference between two correct engines flips experts).
GGUF_INIT = {"initializer_range": 0.05}


@pytest.fixture(scope="module")
def hf_models(tmp_path_factory, tokenizer_dir):
    """name -> HF directory of the V3 and V2-Lite style models used for the GGUF tests."""
    out = {}
    for name, overrides in (("v3", {}), ("v2_lite", {}),
                            # qwen3moe GGUF files are MoE in every layer, with renormalised top-k weights
                            ("qwen3_norm", {"mlp_only_layers": [], "num_experts": 16})):
        d = tmp_path_factory.mktemp(f"hf_{name}")
        build_reference(name, d, tokenizer_dir, seed=3, overrides={**GGUF_INIT, **overrides})
        out[name] = d
    return out


@pytest.fixture(scope="module")
def converted(hf_models, tmp_path_factory):
    """name -> {recipe: gguf path} for the V3 and V2-Lite style models."""
    out = {}
    for name, src in hf_models.items():
        d = tmp_path_factory.mktemp(f"gguf_{name}")
        out[name] = {r: convert(src, d / f"{name}-{r}.gguf", r, progress=False) for r in ("f32", "q8_0")}
    return out


# A top-2 margin below this (logits) is a near-tie that float summation order decides.
NEAR_TIE = 0.01


def agreement_with_llama_cpp(runner, path, sequences: int) -> tuple[float, int, int]:
    """Our logits against llama.cpp's on the same file for `sequences` 64-token sequences, each held to
    mean KL <= 1e-3: (top-1 agreement over the positions that are not near-ties, those positions, the
    near-ties)."""
    agree, ties = [], 0
    for s in range(sequences):
        ids = seq(s)
        ours, ref = runner.logits(ids), llama_logits(path, ids)
        kl, _ = kl_top1(ours, ref)
        assert kl <= 1e-3, (s, kl)
        top2 = ref.topk(2, dim=-1).values
        clear = (top2[:, 0] - top2[:, 1]) >= NEAR_TIE
        ties += int((~clear).sum())
        agree += (ours.argmax(-1) == ref.argmax(-1))[clear].tolist()
    return float(np.mean(agree)), len(agree), ties


@pytest.mark.parametrize("name", ["v3", "v2_lite", "qwen3_norm"])
def test_llama_cpp_agrees_on_q8_0(name, converted):
    """Six 64-token sequences: mean KL <= 1e-3 on each, top-1 agreement >= 99% over all positions that
    are not near-ties. These random-weight models have a median top-2 margin of only ~0.07 logits, and
    any rounding difference (a Q8 activation landing on the other side of a rounding boundary) flips
    margins of ~0.001-0.006, so those positions say nothing about the engine; they must stay rare."""
    path = converted[name]["q8_0"]
    runner = local.load(path, device="cpu", kv_cache_dtype="float16")  # llama.cpp's default cache type
    agree, n, ties = agreement_with_llama_cpp(runner, path, 6)
    assert agree >= 0.99, (agree, n)
    assert ties <= 0.15 * 6 * N_TOKENS


@pytest.mark.parametrize("name", ["v3", "v2_lite", "qwen3_norm"])
def test_gguf_f32_equals_hf(name, converted, hf_models):
    """Same weights through the GGUF path and the HF path."""
    ids = seq(1)
    from_gguf = local.load(converted[name]["f32"], device="cpu").logits(ids)
    from_hf = local.load(hf_models[name], device="cpu", dtype="float32").logits(ids)
    assert (from_gguf - from_hf).abs().max().item() <= 1e-4


def test_converted_file_layout(converted):
    g = GGUFModel(converted["v3"]["q8_0"])
    assert g.architecture == "deepseek2"
    assert g.kv["deepseek2.attention.head_count_kv"] == 1
    assert g.kv["deepseek2.expert_gating_func"] == 2 and g.kv["deepseek2.expert_group_count"] == 4
    t = g.tensors
    assert t["blk.2.ffn_up_exps.weight"].ne == (64, 32, 16) and t["blk.2.ffn_up_exps.weight"].qtype.name == "Q8_0"
    assert t["blk.0.attn_k_b.weight"].ne == (16, 32, 4) and t["blk.0.attn_v_b.weight"].ne == (32, 16, 4)
    assert t["blk.2.exp_probs_b.bias"].qtype.name == "F32" and t["blk.2.ffn_gate_inp.weight"].qtype.name == "F32"
    assert "blk.0.attn_kv_b.weight" not in t and "tokenizer.chat_template" in g.kv


def test_q4_k_m_kl_no_worse_than_llama_cpp(converted, tmp_path):
    """Our q4_k_m against llama.cpp's own quantization of the same f32 file, both judged by KL to f32."""
    f32 = converted["v3"]["f32"]
    ours_path = convert(f32, tmp_path / "ours-q4_k_m.gguf", "q4_k_m", progress=False)
    theirs_path = tmp_path / "llama-q4_k_m.gguf"
    params = llama_cpp.llama_model_quantize_default_params()
    params.ftype = llama_cpp.LLAMA_FTYPE_MOSTLY_Q4_K_M
    params.nthread = 1
    assert llama_cpp.llama_model_quantize(str(f32).encode(), str(theirs_path).encode(), ctypes.byref(params)) == 0
    ids = seq(2)
    base = local.load(f32, device="cpu").logits(ids)
    kl_ours, _ = kl_top1(local.load(ours_path, device="cpu").logits(ids), base)
    kl_theirs, _ = kl_top1(local.load(theirs_path, device="cpu").logits(ids), base)
    assert kl_ours > 0
    assert kl_ours <= 1.05 * kl_theirs, (kl_ours, kl_theirs)
    ours_types = {n: t.qtype for n, t in GGUFModel(ours_path).tensors.items()}
    theirs_types = {n: t.qtype for n, t in GGUFModel(theirs_path).tensors.items()}
    assert ours_types == theirs_types


def test_requantize_from_gguf(converted, tmp_path):
    out = convert(converted["v3"]["f32"], tmp_path / "re.gguf", "q8_0", progress=False)
    a = GGUFModel(out)
    b = GGUFModel(converted["v3"]["q8_0"])
    assert set(a.tensors) == set(b.tensors)
    for name in a.tensors:
        assert np.array_equal(np.asarray(a.raw(name)), np.asarray(b.raw(name))), name


def test_convert_refuses_overwrite_and_leaves_no_partial_file(hf_models, tmp_path):
    out = tmp_path / "m.gguf"
    out.write_bytes(b"keep me")
    with pytest.raises(FileExistsError, match="--force"):
        convert(hf_models["v3"], out, "q8_0", progress=False)
    assert out.read_bytes() == b"keep me"
    broken = shutil.copytree(hf_models["v3"], tmp_path / "broken")
    data = (broken / "model.safetensors").read_bytes()
    (broken / "model.safetensors").write_bytes(data[: len(data) // 2])
    with pytest.raises(ValueError, match="truncated"):
        convert(broken, tmp_path / "x.gguf", "q8_0", progress=False)
    assert list(tmp_path.glob("*.part")) == [] and not (tmp_path / "x.gguf").exists()


def test_cli_convert_inspect_perplexity(hf_models, tmp_path):
    src = hf_models["v3"]
    out = tmp_path / "cli.gguf"
    run = [sys.executable, "-m", "local.cli"]
    r = subprocess.run(run + ["convert", str(src), "-o", str(out), "--quant", "q8_0"], capture_output=True,
                       text=True, timeout=600)
    assert r.returncode == 0, r.stderr
    assert out.exists() and "100.0%" in r.stderr
    r = subprocess.run(run + ["convert", str(src), "-o", str(out)], capture_output=True, text=True, timeout=600)
    assert r.returncode == 1 and "--force" in r.stderr
    r = subprocess.run(run + ["inspect", str(out)], capture_output=True, text=True, timeout=600)
    assert r.returncode == 0, r.stderr
    assert "deepseek_v3" in r.stdout and "Q8_0" in r.stdout and "active per token" in r.stdout
    assert "KV cache     320 bytes per token" in r.stdout  # (kv_lora_rank 32 + rope 8) * 4 layers * 2 bytes
    text = tmp_path / "t.txt"
    from pydoc_data.topics import topics

    text.write_text(" ".join(list(topics.values())[:3]))
    r = subprocess.run(run + ["perplexity", str(out), "-f", str(text), "-c", "64", "--kld-base", str(src)],
                       capture_output=True, text=True, timeout=600)
    assert r.returncode == 0, r.stderr
    assert "PPL = " in r.stdout and "mean KLD = " in r.stdout and "same top token" in r.stdout


def rewrite_gguf(src, dst, edit_tensors=None, split_max_tensors: int = 0, keys=None):
    """Copy a GGUF through gguf.GGUFWriter, optionally replacing tensors, overriding key-values
    (`keys`: name -> new value, None drops it) or splitting it into parts."""
    from gguf import GGUFWriter

    g = GGUFModel(src)
    w = GGUFWriter(dst, g.architecture, split_max_tensors=split_max_tensors)
    for k, v in g.kv.items():
        if k.startswith(("general.architecture", "general.alignment", "split.")):
            continue
        v = (keys or {}).get(k, v)
        if isinstance(v, np.ndarray):
            v = v.tolist()
        if v is not None:
            w.add_key_value(k, v, *g.kv_types[k])
    tensors = {n: (np.asarray(g.raw(n)), t.qtype) for n, t in g.tensors.items()}
    if edit_tensors:
        tensors = edit_tensors(tensors)
    for name, (data, qtype) in tensors.items():
        w.add_tensor(name, data, raw_dtype=qtype)
    w.write_header_to_file()
    w.write_kv_data_to_file()
    w.write_tensors_to_file()
    w.close()


def test_split_gguf_loads_as_one(converted, tmp_path):
    rewrite_gguf(converted["v3"]["f32"], tmp_path / "m.gguf", split_max_tensors=20)
    parts = sorted(tmp_path.glob("m-*-of-*.gguf"))
    assert len(parts) > 2
    ids = seq(3)
    whole = local.load(converted["v3"]["f32"], device="cpu").logits(ids)
    assert torch.equal(local.load(parts[0], device="cpu").logits(ids), whole)


def test_legacy_attn_kv_b_layout(converted, tmp_path):
    """Older deepseek2 files carry one attn_kv_b per layer and no *_mla key lengths."""
    from quant.gguf_arch import join_kv_b

    def to_legacy(tensors):
        out = {}
        for name, (data, qtype) in tensors.items():
            if name.endswith("attn_v_b.weight"):
                continue
            if name.endswith("attn_k_b.weight"):
                v = tensors[name.replace("attn_k_b", "attn_v_b")][0]
                out[name.replace("attn_k_b", "attn_kv_b")] = (join_kv_b(data, v), qtype)
            else:
                out[name] = (data, qtype)
        return out

    legacy = tmp_path / "legacy.gguf"
    # legacy files state the MHA head sizes (Dn+Dr = 24, Dv = 16) and no *_mla lengths
    rewrite_gguf(converted["v3"]["f32"], legacy, edit_tensors=to_legacy,
                 keys={"deepseek2.attention.key_length_mla": None, "deepseek2.attention.value_length_mla": None,
                       "deepseek2.attention.key_length": 24, "deepseek2.attention.value_length": 16})
    assert "blk.0.attn_kv_b.weight" in GGUFModel(legacy).tensors
    ids = seq(4)
    want = local.load(converted["v3"]["f32"], device="cpu").logits(ids)
    got = local.load(legacy, device="cpu").logits(ids)
    assert (got - want).abs().max().item() <= 1e-5


def test_engine_quantizer_writes_the_same_file(converted, tmp_path):
    """`tandem convert` quantizes with the C++ engine; its file equals the numpy reference's byte for byte."""
    import offload

    a = convert(converted["v3"]["f32"], tmp_path / "numpy.gguf", "q4_k_m", progress=False)
    b = convert(converted["v3"]["f32"], tmp_path / "engine.gguf", "q4_k_m", progress=False, quantizer=offload.quantize)
    assert a.read_bytes() == b.read_bytes()


@pytest.mark.parametrize("name", ["v3", "qwen3_norm"])
def test_engine_runs_gguf_from_the_blocks(name, converted):
    """On the CPU the engine computes every quantized linear and each MoE layer from the file's blocks:
    expert weights are never dequantized, and the logits equal the dequantizing torch path's."""
    from local.models.moe import MoE

    path = converted[name]["q8_0"]
    fast, slow = local.load(path, device="cpu"), local.load(path, device="cpu", engine=False)
    moes = [m for m in fast.model.modules() if isinstance(m, MoE)]
    assert moes and all(m.engine is not None and m.engine_layer is not None for m in moes)  # router too
    assert all(p.is_meta for m in moes for p in m.experts.parameters())
    assert fast.model.lm_head.engine_weight is not None
    ids = seq(5)
    a, b = fast.logits(ids), slow.logits(ids)
    kl, top1 = kl_top1(a, b)
    assert kl <= 1e-4 and (a - b).abs().max().item() <= 0.05, (kl, (a - b).abs().max().item())
    events = list(fast.generate(ids[:8], local.SamplingParams(max_tokens=8, temperature=0, ignore_eos=True)))
    assert events[-1].stats.generated_tokens == 8


def test_cpu_engine_reads_the_embedding_from_the_file(converted):
    """On the CPU engine the token embedding stays in the file's blocks (no float table: V3's would take 3.7
    GB); the logits equal those of the dequantized table's path, and the plan counts its mapped bytes."""
    from local.models.layers import QuantEmbedding
    from offload.placement import make_plan

    path = converted["qwen3_norm"]["q8_0"]
    fast, slow = local.load(path, device="cpu"), local.load(path, device="cpu", engine=False)
    assert isinstance(fast.model.model.embed_tokens, QuantEmbedding)
    assert isinstance(slow.model.model.embed_tokens, torch.nn.Embedding)
    assert fast.model.dtype == torch.float32 and fast.model.device.type == "cpu"
    assert fast.model.new_cache(8).dtype == torch.float32
    ids = seq(2)
    ours = fast.model.model.embed_tokens(torch.tensor(ids))
    assert torch.equal(ours, slow.model.model.embed_tokens(torch.tensor(ids)))
    g = GGUFModel(path)
    t = g.tensors["token_embd.weight"]
    plan, dense = make_plan(g, "cpu"), t.n_elements * 4
    assert "output.weight" in g.tensors and plan.ram_bytes == sum(
        u.nbytes if plan.assign[n] == "cpu-engine" or n == "token_embd.weight" else u.n_elements * 4
        for n, u in g.tensors.items())
    assert dense > t.nbytes


def test_tied_output_keeps_the_embedding_table(tokenizer_dir, tmp_path):
    """A model whose output head is its token embedding (no output.weight in the file) keeps the table in
    float on the CPU engine too, shared with the head, and the plan counts it dequantized."""
    from offload.placement import make_plan

    build_reference("qwen3_norm", tmp_path, tokenizer_dir, seed=4,
                    overrides={**GGUF_INIT, "mlp_only_layers": [], "num_experts": 16, "tie_word_embeddings": True})
    path = convert(tmp_path, tmp_path / "tied.gguf", "q8_0", progress=False)
    g = GGUFModel(path)
    assert "output.weight" not in g.tensors
    fast, slow = local.load(path, device="cpu"), local.load(path, device="cpu", engine=False)
    emb = fast.model.model.embed_tokens
    assert isinstance(emb, torch.nn.Embedding) and fast.model.lm_head.weight is emb.weight
    ids = seq(4)
    kl, _ = kl_top1(fast.logits(ids), slow.logits(ids))
    assert kl <= 1e-4
    plan = make_plan(g, "cpu")
    assert plan.ram_bytes == sum(u.nbytes if plan.assign[n] == "cpu-engine" else u.n_elements * 4
                                 for n, u in g.tensors.items())


@pytest.fixture(scope="module")
def wide_v2_lite(tmp_path_factory, tokenizer_dir):
    """The V2-Lite variant with 256-wide rows (hidden size, expert widths), so the K-quant mixes keep
    their Q4_K / Q5_K / Q6_K tensors instead of falling back to 32-value blocks."""
    d = tmp_path_factory.mktemp("wide_v2_lite")
    build_reference("v2_lite", d, tokenizer_dir, seed=5, overrides={**GGUF_INIT, "hidden_size": 256,
                                                                     "intermediate_size": 512,
                                                                     "moe_intermediate_size": 256})
    return convert(d, d / "f32.gguf", "f32", progress=False)


@pytest.mark.parametrize("recipe", ["q4_k_m", "q5_k_m"])
def test_llama_cpp_agrees_on_k_quant_files(recipe, wide_v2_lite, tmp_path):
    """One K-quant mix file through both: the engine's row-interleaved kernels (Q4_K / Q5_K / Q6_K, and
    the Q5_0 / Q5_1 / Q8_0 the mixes give ragged rows) against llama.cpp's. Mean KL as for q8_0; top-1
    agreement >= 98% over the positions that are not near-ties (measured 98.9-99.5% on every ISA, the
    plain kernels' included, where q8_0 on this model gives 99.5-99.7%: more rounding steps, more flips
    of small margins). A wrong weight bit shows in the KL, which stays below 3e-4 here."""
    path = convert(wide_v2_lite, tmp_path / f"{recipe}.gguf", recipe, progress=False)
    types = {t.qtype.name for t in GGUFModel(path).tensors.values()}
    assert {"Q4_K" if recipe == "q4_k_m" else "Q5_K", "Q6_K"} <= types, types
    runner = local.load(path, device="cpu", kv_cache_dtype="float16")
    agree, n, _ = agreement_with_llama_cpp(runner, path, 6)
    assert agree >= 0.98, (agree, n)
