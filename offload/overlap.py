"""The GPU side of the CPU/GPU overlap (KTransformers-style): one MoE layer's routed experts go to the
CPU engine's pool, the device computes its own part meanwhile, then the two are joined and added.

Decode (one token) goes through `StagedExperts`: fixed staging buffers (pinned on a GPU) and two host
functions enqueued on the device's stream - start the routed experts, then wait for them - so the step
has no host synchronisation and can be captured into a CUDA graph (`--cuda-graph`). A longer batch
(prefill) stages its inputs per call and synchronises once before the engine reads them. Both run the
same with the "device" being the CPU, where the stream is the program order itself: that is how the
logic is tested on machines without a GPU.
"""

from __future__ import annotations

from collections.abc import Callable

import torch

from . import _C
from .torch_ops import _np, engine, submit_moe, wait_moe

# one set of decode staging buffers per (hidden, top-k, device): the MoE layers of a step run one after
# another on one stream, so they share it
_STAGING: dict[tuple, dict[str, torch.Tensor]] = {}


def _staging(H: int, A: int, device: torch.device) -> dict[str, torch.Tensor]:
    key = (H, A, str(device))
    if key not in _STAGING:
        pin = device.type == "cuda"
        _STAGING[key] = {"x": torch.zeros(1, H, pin_memory=pin), "out": torch.zeros(1, H, pin_memory=pin),
                         "ids": torch.full((1, A), -1, dtype=torch.int64, pin_memory=pin),
                         "weights": torch.zeros(1, A, pin_memory=pin)}
    return _STAGING[key]


class StagedExperts:
    """One MoE layer's routed experts for decode steps: the engine call is checked once over the fixed
    staging buffers (an _C.StagedMoe) and started / joined in stream order."""

    def __init__(self, spec: tuple, skip: torch.Tensor | None, hidden: int, top_k: int, device: torch.device):
        gate, up, down, types = spec
        self.buf = _staging(hidden, top_k, device)
        b = self.buf
        self.call = _C.StagedMoe(engine()._engine, _np(b["x"]), _np(b["ids"]), _np(b["weights"]), _np(b["out"]),
                                 _np(gate), types[0], _np(up), types[1], _np(down), types[2], _np(skip), engine().isa)

    def __call__(self, x: torch.Tensor, weights: torch.Tensor, ids: torch.Tensor,
                 local: Callable[[], torch.Tensor]) -> torch.Tensor:
        """x [1, H] on the device, weights / ids [1, A] -> local() + the routed experts, on x's device."""
        b, cuda = self.buf, x.device.type == "cuda"
        if cuda and not torch.cuda.is_current_stream_capturing():
            self.call.check()  # an earlier step's error (host functions cannot raise), once the stream got there
        b["x"].copy_(x, non_blocking=cuda)
        b["ids"].copy_(ids, non_blocking=cuda)
        b["weights"].copy_(weights, non_blocking=cuda)
        if cuda:  # host functions in stream order: no host synchronisation, capturable in a CUDA graph
            stream = torch.cuda.current_stream(x.device).cuda_stream
            self.call.launch(stream)
            try:
                y = local()
            finally:
                self.call.launch_wait(stream)
            # errors the host functions keep are raised later: above, or by DecodeStep.check for a graph
        else:  # the "device" is the CPU: program order is the stream's
            self.call.submit()
            try:
                y = local()
            finally:
                self.call.wait()
            self.call.check()
        routed = torch.empty(b["out"].shape, dtype=torch.float32, device=x.device).copy_(b["out"], non_blocking=cuda)
        return y + routed.to(x.dtype)


def overlapped_moe(x: torch.Tensor, weights: torch.Tensor, ids: torch.Tensor, spec: tuple,
                   skip: torch.Tensor | None, local: Callable[[], torch.Tensor]) -> torch.Tensor:
    """x [T, H] on the device, ids/weights [T, A]; spec = (gate, up, down, types) of the routed expert
    stacks; skip [E] uint8 masks the experts `local` computes -> local() + routed experts, on x's device.

    The batch path: inputs cross through pinned buffers and the stream is synchronised once before the
    engine reads them (decode steps use StagedExperts instead)."""
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
