"""kt-kernel's CPU MoE through its low-level API, for `offload.bench` (only when `kt_kernel` imports).

kt-kernel 0.7.2 (PyPI wheel) pins torch 2.9.1 but its extension does not link torch: install it with
`pip install --no-deps kt-kernel==0.7.2`. Its high-level wrapper needs CUDA; the CPU-only sequence is
the one its own tests use (CPUInfer, MOEConfig, load_weights_task, forward_task).
"""

from __future__ import annotations

import gc
import time


def kt_kernel_moe(spec: dict, T: int, repeats: int, threads: int) -> dict | None:
    """{'kt_kernel_us', 'kt_kernel_method', 'kt_kernel_threads'} for kt-kernel's fastest method and
    thread count on this layer shape, or None when kt-kernel is not installed."""
    try:
        import kt_kernel  # noqa: F401
        from kt_kernel import kt_kernel_ext
    except Exception:  # not installed, or its wheel does not fit this machine
        return None
    import numpy as np
    import torch

    H, I, E, A = spec["H"], spec["I"], spec["E"], spec["A"]
    gate = (torch.randn(E, I, H) * 0.02).to(torch.bfloat16).contiguous()
    up = (torch.randn(E, I, H) * 0.02).to(torch.bfloat16).contiguous()
    down = (torch.randn(E, H, I) * 0.02).to(torch.bfloat16).contiguous()
    best = None
    for method in ("AMXInt4_MOE", "AMXInt8_MOE", "AMXBF16_MOE"):
        for n_threads in sorted({1, threads}):
            try:
                cpu = kt_kernel_ext.CPUInfer(n_threads)
                cfg = kt_kernel_ext.moe.MOEConfig(E, A, H, I, 0)
                cfg.max_len = max(T, 128)
                cfg.pool = cpu.backend_
                cfg.gate_proj, cfg.up_proj, cfg.down_proj = gate.data_ptr(), up.data_ptr(), down.data_ptr()
                moe = getattr(kt_kernel_ext.moe, method)(cfg)
                p2l = torch.arange(E, dtype=torch.int64)
                cpu.submit(moe.load_weights_task(p2l.data_ptr()))
                cpu.sync()
                qlen = torch.tensor([T], dtype=torch.int32)
                x = torch.randn(T, H).to(torch.bfloat16).contiguous()
                out = torch.empty(T, H, dtype=torch.bfloat16)
                routes = []
                rng = np.random.default_rng(0)
                for _ in range(8):
                    ids = torch.from_numpy(np.stack([rng.choice(E, A, replace=False) for _ in range(T)]).astype(np.int64))
                    routes.append((ids.contiguous(), torch.rand(T, A, dtype=torch.float32).contiguous()))

                def call(i):
                    ids, w = routes[i % len(routes)]
                    cpu.submit(moe.forward_task(qlen.data_ptr(), A, ids.data_ptr(), w.data_ptr(), x.data_ptr(),
                                                out.data_ptr(), False))
                    cpu.sync()
                for i in range(3):
                    call(i)
                t0 = time.perf_counter()
                for i in range(repeats):
                    call(i)
                us = (time.perf_counter() - t0) / repeats * 1e6
            except Exception as e:  # a method this shape or CPU does not support
                print(f"  kt-kernel {method} ({n_threads} threads): {e}", flush=True)
                continue
            finally:
                # each method packs its own copy of every expert: free it before the next
                moe = cpu = None
                gc.collect()
            if best is None or us < best["kt_kernel_us"]:
                best = {"kt_kernel_us": us, "kt_kernel_method": method, "kt_kernel_threads": n_threads}
    return best
