"""The fixed-shape decode step behind --cuda-graph (local.decode_step) and the stream-ordered CPU experts
(offload.overlap.StagedExperts), run here with the "GPU" side on the CPU: the same code, minus the graph
capture and the host functions being enqueued on a CUDA stream instead of called in program order."""

from __future__ import annotations

import numpy as np
import pytest
import torch

import local
from local import SamplingParams
from local.demo import demo_model_path
from offload import _C


@pytest.fixture(scope="module")
def demo():
    return demo_model_path()


def greedy_with_logits(runner, prompt: str, n: int = 24) -> tuple[list[int], list[torch.Tensor]]:
    """Greedy tokens and each decode step's logits (what the sampler saw)."""
    seen = []
    decoder = runner.decoder

    def recording(cache):
        step = decoder(cache)

        def run(token):
            out = step(token)
            seen.append(out[-1].float().clone())
            return out
        return run

    runner.decoder = recording
    params = SamplingParams(max_tokens=n, temperature=0.0, ignore_eos=True)
    tokens = [e.token_id for e in runner.generate(prompt, params) if e.token_id is not None]
    return tokens, seen


@pytest.mark.parametrize("gpu_experts", [0, 8])
def test_fixed_step_gives_the_plain_steps_tokens_and_logits(demo, gpu_experts):
    """Hybrid placement ("GPU" side on the CPU): index_copy_ cache writes at a device-side position, masked
    attention over the whole cache, staged CPU experts and sync-free device experts give what the
    plain decode step gives."""
    plain = local.load(demo, device="cpu", hybrid=True, gpu_experts=gpu_experts)
    fixed = local.load(demo, device="cpu", hybrid=True, gpu_experts=gpu_experts)
    fixed.fixed_decode = True
    prompt = "The list of values is"
    a_tokens, a_logits = greedy_with_logits(plain, prompt)
    b_tokens, b_logits = greedy_with_logits(fixed, prompt)
    assert a_tokens == b_tokens
    assert len(a_logits) == len(b_logits) == len(a_tokens) - 1
    for a, b in zip(a_logits, b_logits):
        torch.testing.assert_close(b, a, rtol=1e-4, atol=1e-4)
    moes = [layer.mlp for layer in fixed.model.model.layers if hasattr(layer.mlp, "gate")]
    assert all(m.staged is not None for m in moes)  # the decode steps went through the staged calls


def test_fixed_step_over_a_larger_cache_than_the_sequence(demo):
    """Positions past the token are masked: a cache preallocated far beyond the sequence changes nothing
    (torch path, GQA-free MLA and the dense MLP included)."""
    plain = local.load(demo, device="cpu", engine=False)
    fixed = local.load(demo, device="cpu", engine=False, ctx=200)
    fixed.fixed_decode = True
    a, _ = greedy_with_logits(plain, "Return the number", 12)
    b, _ = greedy_with_logits(fixed, "Return the number", 12)
    assert a == b


def test_fixed_step_on_gqa(tmp_path, tokenizer_dir):
    """Qwen3-MoE's attention takes the same fixed-shape step."""
    from .conftest import build_reference

    build_reference("qwen3_norm", tmp_path, tokenizer_dir, seed=3)
    plain = local.load(tmp_path, device="cpu")
    fixed = local.load(tmp_path, device="cpu", ctx=64)
    fixed.fixed_decode = True
    a, la = greedy_with_logits(plain, "hello world", 10)
    b, lb = greedy_with_logits(fixed, "hello world", 10)
    assert a == b
    for x, y in zip(la, lb):
        torch.testing.assert_close(y, x, rtol=1e-4, atol=1e-4)


def test_staged_experts_overlap_the_device_side(demo):
    """In a decode step the shared experts run between the staged call's start and its join."""
    runner = local.load(demo, device="cpu", hybrid=True)
    runner.fixed_decode = True
    moe = next(layer.mlp for layer in runner.model.model.layers if hasattr(layer.mlp, "gate"))
    order = []
    list(runner.generate("x = 1", SamplingParams(max_tokens=2, temperature=0.0, ignore_eos=True)))
    call = moe.staged.call

    class Recording:
        def submit(self):
            order.append("submit")
            call.submit()

        def wait(self):
            order.append("wait")
            call.wait()

        def check(self):
            call.check()

    moe.staged.call = Recording()
    moe.shared_experts.register_forward_hook(lambda *a: order.append("shared"))
    list(runner.generate("x = 1", SamplingParams(max_tokens=3, temperature=0.0, ignore_eos=True)))
    assert order[-3:] == ["submit", "shared", "wait"]


def test_staged_moe_checks_ids_written_after_it_was_built():
    """The staging buffers are filled later (by the stream): ids out of range are caught when the call
    starts, the routed output is zeroed and check() raises; a valid call then runs."""
    from offload.torch_ops import engine
    from quant.formats import quantize

    rng = np.random.default_rng(0)
    E, H, I, A = 4, 64, 32, 2
    gate = np.stack([quantize(rng.standard_normal((I, H)).astype(np.float32), "Q8_0") for _ in range(E)])
    up = np.stack([quantize(rng.standard_normal((I, H)).astype(np.float32), "Q8_0") for _ in range(E)])
    down = np.stack([quantize(rng.standard_normal((H, I)).astype(np.float32), "Q8_0") for _ in range(E)])
    x = np.zeros((1, H), np.float32)
    ids = np.full((1, A), -1, np.int64)
    w = np.zeros((1, A), np.float32)
    out = np.full((1, H), 7.0, np.float32)
    q8 = 8  # ggml type id of Q8_0
    call = _C.StagedMoe(engine()._engine, x, ids, w, out, gate, q8, up, q8, down, q8)
    x[:] = rng.standard_normal((1, H))
    ids[:] = [[1, E]]  # E is out of range
    w[:] = 0.5
    call.submit()
    call.wait()
    assert not out.any()
    with pytest.raises(RuntimeError, match=f"ids holds {E}"):
        call.check()
    call.check()  # the error is reported once
    ids[:] = [[1, 3]]
    call.submit()
    call.wait()
    call.check()
    want = np.zeros((1, H), np.float32)
    engine()._engine.moe(x, ids, w, gate, q8, up, q8, down, q8, [], None, want)
    np.testing.assert_array_equal(out, want)


@pytest.mark.skipif(_C.cuda_driver_available(), reason="this machine has a CUDA driver")
def test_stream_launch_without_a_cuda_driver_is_a_clear_error():
    from offload.torch_ops import engine
    from quant.formats import quantize

    w = quantize(np.ones((32, 32), np.float32), "Q8_0")[None]
    call = _C.StagedMoe(engine()._engine, np.zeros((1, 32), np.float32), np.full((1, 1), -1, np.int64),
                        np.zeros((1, 1), np.float32), np.zeros((1, 32), np.float32), w, 8, w, 8, w, 8)
    with pytest.raises(RuntimeError, match="libcuda"):
        call.launch(0)


def test_cuda_graph_needs_a_cuda_device(demo):
    with pytest.raises(ValueError, match="--cuda-graph needs a CUDA device"):
        local.load(demo, device="cpu", cuda_graph=True)


def test_fixed_step_refuses_attention_on_the_cpu_engine(demo):
    runner = local.load(demo, device="cpu")  # MLA on the CPU engine
    runner.fixed_decode = True
    with pytest.raises(RuntimeError, match="fixed-shape decode step"):
        list(runner.generate("x", SamplingParams(max_tokens=3, temperature=0.0, ignore_eos=True)))


def test_fixed_step_refuses_a_full_cache(demo):
    """A fixed-shape step cannot grow the cache (a captured graph holds its buffers): a clear error, not a write
    past the end."""
    from local.decode_step import DecodeStep

    runner = local.load(demo, device="cpu", hybrid=True)
    cache = runner.new_cache(2)
    step = DecodeStep(runner.model, cache)
    step(5)
    step(6)
    with pytest.raises(ValueError, match="cache holds 2 positions and is full"):
        step(7)
