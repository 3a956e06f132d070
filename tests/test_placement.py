"""The placement plan, memory checks before allocation, and the hybrid (overlap) path with the "GPU"
side on the CPU: routed experts on the engine's pool while torch computes the shared experts."""

from __future__ import annotations

import pytest
import torch

import local
from local import SamplingParams
from local.routing import RoutingStats
from offload import placement
from offload.placement import CPU_TORCH, ENGINE, GPU, Machine, check_fits, make_plan
from quant.gguf_file import GGUFModel

GIB = 2**30
BIG_GPU = Machine(ram_available=64 * GIB, physical_cores=8, gpu_name="Fake RTX", vram_free=24 * GIB)


@pytest.fixture(scope="module")
def demo():
    from local.demo import demo_model_path

    path = demo_model_path()
    if path.suffix != ".gguf":
        pytest.skip("the bundled demo GGUF is missing")
    return path


def greedy(runner, prompt: str, n: int = 32) -> list[int]:
    params = SamplingParams(max_tokens=n, temperature=0.0, ignore_eos=True)
    return [e.token_id for e in runner.generate(prompt, params) if e.token_id is not None]


def test_gpu_plan_keeps_routed_experts_on_the_cpu_engine(demo):
    g = GGUFModel(demo)
    plan = make_plan(g, "cuda", machine=BIG_GPU)
    assert plan.device == "cuda"
    for name, where in plan.assign.items():
        assert where == (ENGINE if "_exps." in name else GPU), name
    assert plan.gpu_bytes == sum(t.n_elements * 2 for n, t in g.tensors.items() if "_exps." not in n)
    assert "GPU + CPU engine" in plan.render()


def test_cpu_plan_runs_linears_on_the_engine(demo):
    plan = make_plan(GGUFModel(demo), "cpu", machine=BIG_GPU)
    assert plan.assign["blk.1.ffn_gate_exps.weight"] == ENGINE
    assert plan.assign["blk.0.attn_q_a.weight"] == ENGINE
    assert plan.assign["blk.0.attn_k_b.weight"] == ENGINE  # absorbed MLA: one batched engine call
    assert plan.assign["token_embd.weight"] == CPU_TORCH
    assert plan.assign["blk.1.ffn_gate_inp.weight"] == CPU_TORCH  # the router
    assert "CPU only" in plan.render()


def test_gpu_experts_follow_the_routing_statistics(demo):
    g = GGUFModel(demo)
    counts = torch.zeros(3, 32, dtype=torch.int64)
    counts[0, [5, 9]] = 100
    counts[1, [30, 2]] = 100
    counts[2, [0, 31]] = 100
    stats = RoutingStats([1, 2, 3], counts, 50, 4)
    plan = make_plan(g, "cuda", gpu_experts=2, routing=stats, machine=BIG_GPU)
    assert plan.gpu_experts == {1: [5, 9], 2: [2, 30], 3: [0, 31]}
    with pytest.raises(ValueError, match="no counts for MoE layers"):
        make_plan(g, "cuda", gpu_experts=2, routing=RoutingStats([1], counts[:1], 50, 4), machine=BIG_GPU)
    with pytest.raises(ValueError, match="needs a CUDA GPU"):
        make_plan(g, "cpu", gpu_experts=2, machine=BIG_GPU)
    with pytest.raises(RuntimeError, match="no CUDA GPU"):
        make_plan(g, "cuda", machine=Machine(64 * GIB, 8))


def test_a_plan_that_does_not_fit_names_the_sizes_and_the_fix(demo):
    g = GGUFModel(demo)
    small_gpu = Machine(ram_available=64 * GIB, physical_cores=8, gpu_name="Tiny GPU", vram_free=2**20)
    plan = make_plan(g, "cuda", machine=small_gpu)
    with pytest.raises(MemoryError, match=r"GiB of GPU memory .* is free on Tiny GPU; use a shorter --ctx, or --device cpu"):
        check_fits(plan, small_gpu)
    tiny_ram = Machine(ram_available=2**20, physical_cores=2)
    with pytest.raises(MemoryError, match=r"needs .* GiB of RAM but .* GiB is available; use a smaller quantization"):
        check_fits(make_plan(g, "cpu", machine=tiny_ram), tiny_ram)


def test_load_refuses_before_allocating(demo, monkeypatch):
    monkeypatch.setattr(placement.Machine, "detect", classmethod(lambda cls: Machine(2**20, 2)))
    allocated = []
    monkeypatch.setattr("local.loader.load_weights", lambda *a, **k: allocated.append(1))
    with pytest.raises(MemoryError, match="demo.gguf needs"):
        local.load(demo, device="cpu")
    assert not allocated


def test_overlap_path_gives_the_plain_paths_tokens(demo):
    plain = local.load(demo, device="cpu")
    hybrid = local.load(demo, device="cpu", hybrid=True)
    moes = [layer.mlp for layer in hybrid.model.model.layers if hasattr(layer.mlp, "gate")]
    assert moes and all(m.overlap and m.engine is not None and not m.engine[4] for m in moes)  # shared in torch
    assert "CPU engine: routed experts" in hybrid.describe()["placement"]
    # the GPU side keeps its embedding table, as on a CUDA device; the CPU engine reads rows from the file
    assert type(hybrid.model.model.embed_tokens) is torch.nn.Embedding
    assert type(plain.model.model.embed_tokens) is not torch.nn.Embedding
    ids = plain.tokenizer.encode("The list of values is")
    a, b = plain.logits(ids), hybrid.logits(ids)
    # the plain path rounds activations as llama.cpp does (Q8), the hybrid one computes in float: the
    # difference is that rounding's, small against the logits' spread
    pa, pb = torch.log_softmax(a.double(), -1), torch.log_softmax(b.double(), -1)
    assert (pa.exp() * (pa - pb)).sum(-1).mean() < 2e-3
    assert torch.equal(a.argmax(-1), b.argmax(-1))
    assert greedy(plain, "The list") == greedy(hybrid, "The list")
    with_gpu_experts = local.load(demo, device="cpu", hybrid=True, gpu_experts=8)
    assert all(m.engine_skip is not None and int(m.engine_skip.sum()) == 8 for m in
               (layer.mlp for layer in with_gpu_experts.model.model.layers if hasattr(layer.mlp, "gate")))
    assert greedy(with_gpu_experts, "The list") == greedy(plain, "The list")


def test_overlap_really_overlaps(demo, monkeypatch):
    """The shared experts run between the engine's submit and its wait."""
    from offload import overlap

    order = []
    hybrid = local.load(demo, device="cpu", hybrid=True)
    moe = next(layer.mlp for layer in hybrid.model.model.layers if hasattr(layer.mlp, "gate"))
    submit, wait = overlap.submit_moe, overlap.wait_moe
    monkeypatch.setattr(overlap, "submit_moe", lambda *a: (order.append("submit"), submit(*a))[1])
    monkeypatch.setattr(overlap, "wait_moe", lambda: (order.append("wait"), wait())[1])
    moe.shared_experts.register_forward_hook(lambda *a: order.append("shared"))
    hybrid.logits(hybrid.tokenizer.encode("x = 1"))
    assert order[:3] == ["submit", "shared", "wait"]


def test_ctx_preallocates_and_bounds_the_cache(demo):
    runner = local.load(demo, device="cpu", ctx=24, chunk=5)
    assert runner.max_context == 24 and runner.prefill_chunk == 5
    events = list(runner.generate("The list of values", SamplingParams(max_tokens=100, temperature=0, ignore_eos=True)))
    assert events[-1].finish_reason == "context"
    assert events[-1].stats.prompt_tokens + events[-1].stats.generated_tokens <= 24
    # a prompt prefilled in chunks of 5 continues as the one-pass prefill does
    prompt = "The list of values is sorted in place"
    assert len(runner.tokenizer.encode(prompt)) > 5
    assert greedy(runner, prompt, 8) == greedy(local.load(demo, device="cpu"), prompt, 8)
    with pytest.raises(ValueError, match="--chunk 0"):
        local.load(demo, device="cpu", chunk=0)
