"""The GPU side of the CPU/GPU overlap (KTransformers-style): one MoE layer's routed experts go to the
CPU engine's pool, the device computes its own part meanwhile, then the two are joined and added.

`overlapped_moe` stages the layer's inputs on the host (pinned when they come from a GPU), submits
the routed experts (asynchronous), runs `local()` - the shared experts and any routed experts kept on
the device - and waits. It runs the same with the "device" being the CPU, which is how the logic is
tested on machines without a GPU.
"""

from __future__ import annotations

from collections.abc import Callable

import torch

from .torch_ops import submit_moe, wait_moe


def overlapped_moe(x: torch.Tensor, weights: torch.Tensor, ids: torch.Tensor, spec: tuple,
                   skip: torch.Tensor | None, local: Callable[[], torch.Tensor]) -> torch.Tensor:
    """x [T, H] on the device, ids/weights [T, A]; spec = (gate, up, down, types) of the routed expert
    stacks; skip [E] uint8 masks the experts `local` computes -> local() + routed experts, on x's device.

    On a GPU the inputs cross through pinned buffers and the stream is synchronized once before the
    engine reads them (a CUDA-graph-capturable version needs the engine started from the stream)."""
    gate, up, down, types = spec
    pin = x.device.type == "cuda"
    xh, idh, wh = _host(x.float(), pin), _host(ids, pin), _host(weights.float(), pin)
    if pin:
        torch.cuda.current_stream(x.device).synchronize()  # the engine reads the staged inputs
    routed = submit_moe(xh, idh, wh, gate, up, down, types, skip)
    try:
        y = local()
    finally:
        wait_moe()
    return y + routed.to(x.device, x.dtype, non_blocking=pin)


def _host(t: torch.Tensor, pin: bool) -> torch.Tensor:
    """t on the CPU, contiguous (through a pinned staging copy when it comes from a GPU)."""
    if t.device.type == "cpu":
        return t.contiguous()
    staged = torch.empty(t.shape, dtype=t.dtype, pin_memory=pin)
    return staged.copy_(t, non_blocking=pin)
