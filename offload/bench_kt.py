"""kt-kernel's CPU MoE through its low-level API, for `offload.bench` (only when `kt_kernel` imports).

kt-kernel 0.7.2 (PyPI wheel) pins torch 2.9.1 but its extension does not link torch: install it with
`pip install --no-deps kt-kernel==0.7.2`. Its high-level wrapper needs CUDA; the CPU-only sequence is
the one its own tests use (CPUInfer, MOEConfig, load_weights_task, forward_task).

Its methods raced for "its fastest": the AMX ones that pack bf16 experts themselves (AMXInt4, AMXInt4_1
with a zero point, AMXInt8, AMXBF16) and LLAMAFILE, its GGUF path (`moe.MOE`), which takes the blocks of
the same types the engine runs, as a GGUF file holds them. LLAMAFILE needs I % 256 == 0 (it refuses
V2-Lite's 1408). Measured here, on the V3-shaped layer at T=1: LLAMAFILE 20.8 ms and AMXInt4 24 ms (one
thread), AMXInt4_1 16.0 ms (two threads); AMXInt4_1 was the fastest at T=1 on V2-Lite too.

kt-kernel does not give back the memory of a layer it built (measured: ~0.5-1 GB of a V3-shaped layer
stays in the process after `del` and a collection), and probing its methods builds ten: `measure_kt`
therefore runs the whole measurement in a child process, whose memory goes with it.
"""

from __future__ import annotations

import gc
import multiprocessing
import sys
import time
from concurrent.futures import ProcessPoolExecutor
from concurrent.futures.process import BrokenProcessPool

METHODS = ("AMXInt4_MOE", "AMXInt4_1_MOE", "AMXInt8_MOE", "AMXBF16_MOE", "LLAMAFILE")


class KtMoE:
    """`copies` kt-kernel MoE layers (random bf16 experts packed by `method`, or for LLAMAFILE random GGUF
    blocks of the spec's types, one pool) ready to run `T`-token calls, each call on the next layer in turn
    (so the working set can exceed the L3 cache)."""

    def __init__(self, kt_kernel_ext, spec: dict, T: int, method: str, n_threads: int, rng, copies: int = 1,
                 variant: str = "?"):
        import numpy as np
        import torch

        H, I, E, A = spec["H"], spec["I"], spec["E"], spec["A"]
        # variant: the build kt-kernel loaded for this CPU ('amx' runs its AMX methods on tiles; on a CPU
        # without AMX they fall back to AVX-512)
        self.method, self.threads, self.A, self.variant = method, n_threads, A, variant
        self.cpu = kt_kernel_ext.CPUInfer(n_threads)
        self.moes = []
        gguf = method == "LLAMAFILE"
        self.blocks = []
        self.gpu_mask = torch.zeros(E, dtype=torch.bool)  # no expert on a GPU
        for layer in range(copies):
            if gguf:  # the blocks as a GGUF file holds them, the engine's types
                from .bench import random_weight

                gate, up, down = (torch.from_numpy(random_weight(rng, t, shape).data)
                                  for t, shape in ((spec["gate"], (E, I, H)), (spec["gate"], (E, I, H)),
                                                   (spec["down"], (E, H, I))))
                # it reads them in place, as from a GGUF file's memory map: freed, they crashed it
                self.blocks.append((gate, up, down))
            else:
                gate = (torch.randn(E, I, H) * 0.02).to(torch.bfloat16).contiguous()
                up = (torch.randn(E, I, H) * 0.02).to(torch.bfloat16).contiguous()
                down = (torch.randn(E, H, I) * 0.02).to(torch.bfloat16).contiguous()
            cfg = kt_kernel_ext.moe.MOEConfig(E, A, H, I, self.gpu_mask.data_ptr() if gguf else 0)
            cfg.layer_idx = layer
            cfg.max_len = max(T, 128)
            cfg.pool = self.cpu.backend_
            cfg.gate_proj, cfg.up_proj, cfg.down_proj = gate.data_ptr(), up.data_ptr(), down.data_ptr()
            if gguf:  # as kt-kernel's LlamafileMoEWrapper sets them
                ggml = kt_kernel_ext.kvcache.ggml_type
                cfg.gate_type = cfg.up_type = getattr(ggml, spec["gate"])
                cfg.down_type = getattr(ggml, spec["down"])
                cfg.hidden_type = ggml.BF16
                cfg.m_block, cfg.group_min_len, cfg.group_max_len = 32, 10, cfg.max_len
            moe = (kt_kernel_ext.moe.MOE if gguf else getattr(kt_kernel_ext.moe, method))(cfg)
            p2l = torch.arange(E, dtype=torch.int64)
            self.cpu.submit(moe.load_weights_task(p2l.data_ptr()))
            self.cpu.sync()
            del gate, up, down  # packed by load_weights (LLAMAFILE's kept in self.blocks)
            self.moes.append(moe)
        self.qlen = torch.tensor([T], dtype=torch.int32)
        self.x = torch.randn(T, H).to(torch.bfloat16).contiguous()
        self.out = torch.empty(T, H, dtype=torch.bfloat16)
        self.routes = []
        for _ in range(8):
            ids = np.stack([rng.choice(E, A, replace=False) for _ in range(T)]).astype(np.int64)
            self.routes.append((torch.from_numpy(ids).contiguous(), torch.rand(T, A, dtype=torch.float32)))
        self.calls = 0

    def __call__(self) -> None:
        ids, w = self.routes[self.calls % len(self.routes)]
        self.calls += 1
        moe = self.moes[self.calls % len(self.moes)]
        self.cpu.submit(moe.forward_task(self.qlen.data_ptr(), self.A, ids.data_ptr(), w.data_ptr(),
                                         self.x.data_ptr(), self.out.data_ptr(), False))
        self.cpu.sync()


def best_kt_moe(spec: dict, T: int, threads: int, rng, probe_calls: int = 5, copies: int = 1) -> KtMoE | None:
    """kt-kernel's fastest method and thread count for this shape (by a short probe on one layer), then
    `copies` layers of it; None when kt-kernel is not installed. Only the winner is kept in memory."""
    try:
        import kt_kernel
        from kt_kernel import kt_kernel_ext
    except Exception:  # not installed, or its wheel does not fit this machine
        return None
    variant = str(getattr(kt_kernel, "__cpu_variant__", "?"))
    best, best_t = None, float("inf")
    for method in METHODS:
        for n_threads in sorted({1, threads}):
            try:
                layer = KtMoE(kt_kernel_ext, spec, T, method, n_threads, rng)
                layer()
                t0 = time.perf_counter()
                for _ in range(probe_calls):
                    layer()
                t = (time.perf_counter() - t0) / probe_calls
            except Exception as e:  # a method this shape or CPU does not support
                print(f"  kt-kernel {method} ({n_threads} threads): {e}", flush=True)
                continue
            if t < best_t:
                best, best_t = (method, n_threads), t
            del layer
            gc.collect()
    if best is None:
        return None
    return KtMoE(kt_kernel_ext, spec, T, best[0], best[1], rng, copies=copies, variant=variant)


def _measure(spec: dict, T: int, threads: int, copies: int, repeats: int, seed: int):
    """In the child: (seconds per call, method, threads, variant) of kt-kernel's best, or None. The probe
    (one warm layer) picks the method; each thread count is then timed on the `copies` layers, each call
    found cold as the engine's are (`after_reads`: a read of 1.5x the L3 cache, then an untimed call of
    another copy), since its spinning workers make the faster count differ between a warm layer and cold
    ones."""
    import statistics

    import numpy as np

    from .bench import after_reads, l3_bytes, one_thread_reader

    rng = np.random.default_rng(seed)
    kt = best_kt_moe(spec, T, threads, rng, copies=copies)
    if kt is None:
        return None
    from kt_kernel import kt_kernel_ext

    read = one_thread_reader(np.ones(3 * l3_bytes() // 2, np.uint8))  # before each call, as for the engine

    def seconds(layers: KtMoE) -> float:
        return statistics.median(after_reads(layers, read, repeats, warmup=copies + 1)[0])

    method, variant = kt.method, kt.variant
    best = (seconds(kt), kt.threads)
    for n_threads in sorted({1, threads} - {kt.threads}):
        del kt
        gc.collect()
        kt = KtMoE(kt_kernel_ext, spec, T, method, n_threads, rng, copies=copies, variant=variant)
        best = min(best, (seconds(kt), n_threads))
    return best[0], method, best[1], variant


def measure_kt(spec: dict, T: int, threads: int, copies: int, repeats: int, seed: int = 0):
    """kt-kernel's best method and thread count for this shape, timed over `repeats` calls that go to
    `copies` layers in turn, all in a child process (see the module's note on memory): (seconds per
    call, method, threads, kt-kernel's build for this CPU), or None when kt-kernel is not installed."""
    try:
        import kt_kernel  # noqa: F401
    except Exception:  # not installed, or its wheel does not fit this machine
        return None
    # a pool of one process rather than multiprocessing.Pool, whose apply waits forever when its process
    # dies (kt-kernel's native code can crash it): this one raises BrokenProcessPool
    with ProcessPoolExecutor(1, mp_context=multiprocessing.get_context("spawn")) as pool:
        try:
            return pool.submit(_measure, spec, T, threads, copies, repeats, seed).result()
        except BrokenProcessPool:
            print("  kt-kernel's process died (its native code crashed, or the kernel killed it for memory): "
                  "no kt-kernel figure for this row", file=sys.stderr, flush=True)
            return None
