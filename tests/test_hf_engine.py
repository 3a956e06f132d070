"""An HF directory on the CPU engine (quant.hf_gguf): the tensors `tandem convert` would write, in their stored
precision, computed as a GGUF file's are."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from safetensors.torch import load_file, save_file

import local
from quant.convert import convert
from quant.gguf_arch import split_kv_b
from quant.gguf_file import maps_file
from quant.hf_gguf import HFAsGGUF
from quant.safetensors_file import Checkpoint, CheckpointError

from .conftest import VOCAB, build_reference

DTYPES = {"bf16": torch.bfloat16, "f16": torch.float16, "f32": torch.float32}


def prompt(seed: int = 0, n: int = 20) -> torch.Tensor:
    return torch.randint(2, VOCAB, (n,), generator=torch.Generator().manual_seed(seed))


@pytest.fixture(scope="module")
def saved(tmp_path_factory, tokenizer_dir):
    """(variant, dtype) -> an HF directory of a tiny model saved in that dtype."""
    out = {}

    def get(name: str, dtype: str):
        if (name, dtype) not in out:
            d = tmp_path_factory.mktemp(f"{name}_{dtype}")
            ref = build_reference(name, d, tokenizer_dir, seed=3)
            ref.to(DTYPES[dtype]).save_pretrained(d)
            out[name, dtype] = d
        return out[name, dtype]
    return get


@pytest.mark.parametrize("dtype", list(DTYPES))
@pytest.mark.parametrize("name", ["v2_lite", "v3", "qwen3_nonorm"])  # (qwen3_norm's dense layer has no GGUF)
def test_an_hf_directory_computes_as_its_converted_gguf(name, dtype, saved, tmp_path):
    """The same tensors, the same kernels: logits equal, bit for bit, to those of the GGUF `tandem convert`
    writes with the checkpoint's own precision (experts stacked in order, kv_b split, names mapped)."""
    d = saved(name, dtype)
    gguf = convert(d, tmp_path / "m.gguf", dtype, progress=False)
    runner = local.load(d, device="cpu")
    assert runner.uses_engine
    view = runner.model.checkpoint
    assert isinstance(view, HFAsGGUF)
    experts = [t for n, t in view.tensors.items() if n.endswith("_exps.weight")]
    assert experts and all(t.qtype.name == dtype.upper() for t in experts)
    ids = prompt()
    got, want = runner.logits(ids), local.load(gguf, device="cpu").logits(ids)
    assert want.abs().max() > 0.5
    assert torch.equal(got, want)


def test_bf16_against_transformers(saved):
    """A BF16 checkpoint on the engine against transformers on the same weights in float32: bf16 activations
    are the only rounding (llama.cpp's, for BF16 weights)."""
    import transformers

    d = saved("v3", "bf16")
    ref = transformers.AutoModelForCausalLM.from_pretrained(d, dtype=torch.float32).eval()
    ids = prompt(1, 32)
    with torch.no_grad():
        want = ref(ids[None]).logits[0]
    got = local.load(d, device="cpu").logits(ids)
    kl = torch.nn.functional.kl_div(got.log_softmax(-1), want.log_softmax(-1), log_target=True,
                                    reduction="none").sum(-1).mean().item()
    assert kl <= 0.01 and (got.argmax(-1) == want.argmax(-1)).float().mean().item() >= 0.9, kl


def test_hybrid_from_an_hf_directory(reference_models):
    """hybrid=True: the routed experts on the engine, the rest in torch ("GPU" side on the CPU)."""
    d, ref = reference_models["v2_lite"]
    runner = local.load(d, device="cpu", dtype="float32", hybrid=True)
    assert runner.model.placement.device == "hybrid"
    ids = prompt(2, 24)
    with torch.no_grad():
        want = ref(ids[None]).logits[0]
    assert (runner.logits(ids) - want).abs().max().item() <= 1e-4


@pytest.mark.parametrize("threads", [1, 3])
def test_raw_gives_views_and_stacks(threads, saved, monkeypatch):
    """raw(): a tensor stored whole is a view of the shard (no copy), BF16 as bytes [rows, 2 * cols] as GGUF's;
    a layer's experts are a new stack in expert order (copied on one thread, or on several); kv_b is split
    per head."""
    import quant.convert

    monkeypatch.setattr(quant.convert, "STACK_BYTES_PER_THREAD", 1 if threads > 1 else 1 << 40)
    monkeypatch.setattr(quant.convert, "_cpus", lambda: threads)
    d = saved("v2_lite", "bf16")
    view, ckpt = HFAsGGUF(d), Checkpoint(d)
    bits = {n: ckpt.get(n) for n in ckpt.names()}

    q = view.raw("blk.1.attn_q.weight")
    assert maps_file(q) and q.dtype == np.uint8
    assert np.array_equal(q.view(np.uint16), bits["model.layers.1.self_attn.q_proj.weight"])
    assert view.tensors["blk.1.attn_q.weight"].nbytes == q.nbytes

    read = []
    read_stored = view.source.read_stored
    monkeypatch.setattr(view.source, "read_stored", lambda name, out=None: read.append(name) or read_stored(name, out))
    up = view.raw("blk.1.ffn_up_exps.weight")
    assert sorted(read) == sorted(f"model.layers.1.mlp.experts.{e}.up_proj.weight" for e in range(8))  # each once
    assert not maps_file(up)
    n = view.get("{arch}.expert_count")
    assert up.shape[0] == n == 8
    want = np.stack([bits[f"model.layers.1.mlp.experts.{e}.up_proj.weight"] for e in range(n)])
    assert np.array_equal(up.view(np.uint16), want)

    from local.config import read_json

    c = read_json(d / "config.json")
    k_b, v_b = split_kv_b(bits["model.layers.0.self_attn.kv_b_proj.weight"], c["num_attention_heads"],
                          c["qk_nope_head_dim"], c["v_head_dim"])
    assert np.array_equal(view.raw("blk.0.attn_k_b.weight").view(np.uint16), k_b)
    assert np.array_equal(view.raw("blk.0.attn_v_b.weight").view(np.uint16), v_b)


def test_copies_let_the_shard_pages_go(saved, monkeypatch):
    """A stack (a copy) releases the shards' pages of its experts at once; a view of the shard does not."""
    d = saved("qwen3_norm", "f32")
    view = HFAsGGUF(d)
    released = []
    monkeypatch.setattr(Checkpoint, "release_range", lambda self, f, b, e: released.append((f, b, e)))
    view.raw("blk.0.attn_q.weight")
    assert released == []
    view.raw("blk.0.ffn_down_exps.weight")
    ckpt = Checkpoint(d)
    infos = [ckpt.info(f"model.layers.0.mlp.experts.{e}.down_proj.weight") for e in range(8)]
    assert released == [(i.file, i.begin, i.end) for i in infos]


def test_read_ahead_follows_the_layers(saved, monkeypatch):
    """The shards are read ahead a layer at a time (token embedding first, output head last), each tensor's
    bytes once, and the read-ahead is moved on as the loader takes later layers."""
    import quant.hf_gguf as hf_gguf

    made = []

    class Recorder:
        def __init__(self, jobs, window, chunk=None):
            self.jobs, self.at_calls, self.closed = jobs, [], False
            made.append(self)

        def at(self, job):
            self.at_calls.append(job)

        def close(self):
            self.closed = True

    monkeypatch.setattr(hf_gguf, "ReadAhead", Recorder)
    d = saved("v3", "f32")
    local.load(d, device="cpu")
    (ahead,) = made
    ckpt = Checkpoint(d)
    n_layer = 4
    assert len(ahead.jobs) == n_layer + 2 and ahead.closed
    embed = ckpt.info("model.embed_tokens.weight")
    assert ahead.jobs[0] == [(embed.file, embed.begin, embed.end)]
    head = ckpt.info("lm_head.weight")
    assert (head.file, head.begin, head.end) in ahead.jobs[-1]
    for layer in range(n_layer):
        names = [n for n in ckpt.names() if n.startswith(f"model.layers.{layer}.")]
        assert sorted(ahead.jobs[1 + layer]) == sorted((ckpt.info(n).file, ckpt.info(n).begin, ckpt.info(n).end)
                                                       for n in names)
    assert ahead.at_calls == sorted(ahead.at_calls) and ahead.at_calls[-1] == n_layer + 1

    # a load that fails stops its read-ahead too (it would otherwise wait for the loader for good)
    import local.gguf_loader as gl

    monkeypatch.setattr(gl, "set_llama_numerics", lambda *a: (_ for _ in ()).throw(RuntimeError("late failure")))
    with pytest.raises(RuntimeError, match="late failure"):
        local.load(d, device="cpu")
    assert len(made) == 2 and made[1].closed


def test_mixed_precision_stack_is_refused(saved, tmp_path):
    import shutil

    d = shutil.copytree(saved("qwen3_nonorm", "bf16"), tmp_path / "m")
    state = load_file(d / "model.safetensors")
    name = "model.layers.0.mlp.experts.5.up_proj.weight"
    state[name] = state[name].float()
    save_file(state, d / "model.safetensors", metadata={"format": "pt"})
    with pytest.raises(CheckpointError, match=r"experts\.0\.\w+_proj\.weight and the tensors stacked with it are "
                                              r"stored as \['BF16', 'F32'\]"):
        local.load(d, device="cpu")
    assert local.load(d, device="cpu", engine=False).logits(prompt()).isfinite().all()  # torch takes it,
    convert(d, tmp_path / "m.gguf", "q8_0", progress=False)  # and so does convert


def test_inspect_shows_the_engine_placement(saved, capsys):
    """`tandem inspect DIR` prints the plan the CPU load follows (as for a GGUF file)."""
    from local.cli import main

    d = saved("v2_lite", "bf16")
    assert main(["inspect", str(d), "--device", "cpu"]) == 0
    out = capsys.readouterr().out
    assert "(hf)" in out and "placement    CPU only" in out
    engine = [line for line in out.splitlines() if line.strip().startswith("CPU engine")]
    assert engine and int(engine[0].split()[2]) > 0


def test_an_hf_directory_too_large_is_refused_before_loading(saved, monkeypatch):
    """The placement plan's RAM check holds for an HF directory (its stored bytes on the engine), before a
    tensor is read."""
    from offload import placement

    monkeypatch.setattr(placement.Machine, "detect", classmethod(lambda cls: placement.Machine(2**20, 2)))
    monkeypatch.setattr(HFAsGGUF, "raw", lambda self, name: pytest.fail("a tensor was read"))
    d = saved("v3", "bf16")
    with pytest.raises(MemoryError, match=rf"{d.name} needs .* GiB of RAM .*use a smaller quantization \(--quant "
                                          r"q4_k_m, or tandem convert --quant q4_k_m\)"):
        local.load(d, device="cpu")


def test_where_an_hf_directory_runs():
    """On the CPU: the engine unless engine=False. With a GPU: split as a GGUF file is (hybrid) unless
    hybrid=False or engine=False, which put it on the GPU whole, in torch."""
    from local.runner import hf_on_engine

    cpu, gpu = torch.device("cpu"), torch.device("cuda")
    assert hf_on_engine(cpu, True, None) and hf_on_engine(cpu, True, False) and hf_on_engine(cpu, True, True)
    assert not hf_on_engine(cpu, False, None)
    assert hf_on_engine(gpu, True, None) and hf_on_engine(gpu, True, True)
    assert not hf_on_engine(gpu, True, False) and not hf_on_engine(gpu, False, None)


def test_bench_counts_an_hf_directorys_bytes_per_token(saved, tmp_path):
    """`tandem bench DIR` reports the bytes a decode step reads, as for the GGUF of the same precision."""
    from local.bench import active_bytes_per_token, run_bench
    from quant.gguf_file import GGUFModel

    d = saved("v3", "bf16")
    tg = run_bench(d, p=8, n=4, r=1, threads=2, log=lambda m: None)["rows"][1]
    gguf = GGUFModel(convert(d, tmp_path / "m.gguf", "bf16", progress=False))
    # the BF16 GGUF keeps its norms, routers and biases in F32, the directory has them in BF16
    f32 = sum(t.nbytes for t in gguf.tensors.values() if t.qtype.name == "F32")
    assert f32 and tg["active_bytes_per_token"] == active_bytes_per_token(gguf) - f32 // 2
    assert tg["bandwidth_pct"] > 0


@pytest.fixture(scope="module")
def wide(tmp_path_factory, tokenizer_dir):
    """name -> a BF16 directory whose rows are 256 wide (the K-quants' blocks) and its transformers model."""
    out = {}
    for name in ("v2_lite", "qwen3_nonorm"):
        d = tmp_path_factory.mktemp(f"wide_{name}")
        ref = build_reference(name, d, tokenizer_dir, seed=4, overrides=dict(hidden_size=256, moe_intermediate_size=256))
        ref.to(torch.bfloat16).save_pretrained(d)
        out[name] = d
    return out


@pytest.mark.parametrize("recipe", ["q8_0", "q4_k_m"])
@pytest.mark.parametrize("name", ["v2_lite", "qwen3_nonorm"])
def test_quantized_as_it_loads_equals_the_converted_file(name, recipe, wide, tmp_path):
    """load(DIR, quant=R) is `tandem convert DIR --quant R` in memory: the same types and bytes per tensor, the
    same logits bit for bit."""
    import offload
    from quant.gguf_file import GGUFModel

    d = wide[name]
    gguf = convert(d, tmp_path / "m.gguf", recipe, progress=False, quantizer=offload.quantize)
    runner = local.load(d, device="cpu", quant=recipe)
    view, file = runner.model.checkpoint, GGUFModel(gguf)
    assert {n: (t.qtype, t.nbytes) for n, t in view.tensors.items()} == \
        {n: (t.qtype, t.nbytes) for n, t in file.tensors.items()}
    assert "Q4_K" in {t.qtype.name for t in view.tensors.values()} or recipe == "q8_0"
    ids = prompt(5)
    assert torch.equal(runner.logits(ids), local.load(gguf, device="cpu").logits(ids))


def test_quant_is_refused_where_it_cannot_apply(wide):
    d = wide["v2_lite"]
    with pytest.raises(ValueError, match="--quant q9 is not one of f32, f16, bf16, q8_0"):
        local.load(d, device="cpu", quant="q9")
    with pytest.raises(ValueError, match=r"not one \(a GGUF file keeps its types: tandem convert demo.gguf -o OUT.gguf "
                                         r"--quant q8_0 requantizes it\)"):
        local.load(local.demo.demo_model_path(), device="cpu", quant="q8_0")
    with pytest.raises(ValueError, match="--quant needs the CPU engine"):
        local.load(d, device="cpu", quant="q8_0", engine=False)


def test_cli_run_quantizes_an_hf_directory(wide, capsys):
    from local.cli import main

    assert main(["run", str(wide["qwen3_nonorm"]), "-p", "Hi", "-n", "4", "--temp", "0", "--quant", "q8_0",
                 "--device", "cpu"]) == 0
    captured = capsys.readouterr()
    assert captured.out.startswith("Hi") and "decode 4 tok" in captured.err


def test_the_header_names_the_types_it_runs(wide):
    """describe() (the chat's header, the bench) gives the types the engine computes with: an HF directory's
    stored ones, or those it was quantized to as it loaded."""
    d = wide["qwen3_nonorm"]
    assert local.load(d, device="cpu").describe()["types"][0] == "BF16"
    assert local.load(d, device="cpu", quant="q8_0").describe()["types"][0] == "Q8_0"


def test_quant_on_the_hybrid_split_takes_the_experts_only(wide):
    """Split across a GPU ("GPU" side on the CPU here), --quant quantizes the routed experts, which the engine
    runs; what the GPU runs keeps the checkpoint's precision."""
    d = wide["v2_lite"]
    runner = local.load(d, device="cpu", quant="q4_k_m", hybrid=True)
    types = {n: t.qtype.name for n, t in runner.model.checkpoint.tensors.items()}
    experts = {n: t for n, t in types.items() if "_exps." in n}
    assert experts and all(t in ("Q4_K", "Q6_K", "Q5_0", "Q8_0") for t in experts.values())
    assert {t for n, t in types.items() if n not in experts} == {"BF16"}
    ids = prompt(6)
    got, plain = runner.logits(ids), local.load(d, device="cpu", hybrid=True).logits(ids)
    kl = torch.nn.functional.kl_div(got.log_softmax(-1), plain.log_softmax(-1), log_target=True,
                                    reduction="none").sum(-1).mean().item()
    assert 0 < kl < 0.05, kl  # the experts' rounding, nothing else


def test_inspect_shows_the_quantized_placement(wide, capsys):
    """`tandem inspect DIR --quant R` places the load's quantized tensors: the RAM of convert's file."""
    from local.cli import main
    from offload.placement import make_plan

    d = wide["v2_lite"]
    assert main(["inspect", str(d), "--device", "cpu", "--quant", "q4_k_m"]) == 0
    assert "placement    CPU only" in capsys.readouterr().out
    full, quantized = (make_plan(HFAsGGUF(d, recipe=r), "cpu").ram_bytes for r in (None, "q4_k_m"))
    assert 0 < quantized < full / 2
    assert main(["inspect", str(local.demo.demo_model_path()), "--quant", "q8_0"]) == 1
    assert "--quant applies to an HF directory; demo.gguf is a GGUF file" in capsys.readouterr().err


def test_perplexity_measures_what_a_recipe_costs(wide, tmp_path, capsys):
    """`tandem perplexity DIR --quant R --kld-base DIR`: the quantized load against the same directory unquantized."""
    from pydoc_data.topics import topics

    from local.cli import main

    d = wide["qwen3_nonorm"]
    text = tmp_path / "t.txt"
    text.write_text(" ".join(list(topics.values())[:2]))
    assert main(["perplexity", str(d), "-f", str(text), "-c", "64", "--quant", "q4_k_m", "--kld-base", str(d),
                 "--device", "cpu"]) == 0
    out = capsys.readouterr().out
    kld = float(out.split("mean KLD = ")[1].split()[0])
    assert 0 < kld < 0.5, out
