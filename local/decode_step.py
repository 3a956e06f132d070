"""One decode step at a fixed shape, for `--cuda-graph`: captured once into a CUDA graph and replayed.

What changes from token to token lives in device tensors: the token id and its position. The cache is
preallocated and written with index_copy_ at that position, attention spans the whole cache with the
positions past the token masked, and the CPU experts are started and joined by host functions on the
stream (offload.overlap.StagedExperts), so the step holds no host synchronisation. On a CUDA device the
step is captured into a CUDA graph on first use; elsewhere the same step runs eagerly, which is how its
logic is tested on machines without a GPU.
"""

from __future__ import annotations

import torch

from .kv_cache import KVCache


class DecodeStep:
    """token id -> logits [1, V] for the next position of `cache`, which it advances."""

    def __init__(self, model: torch.nn.Module, cache: KVCache):
        self.model, self.cache = model, cache
        device = model.device
        self.ids = torch.zeros(1, dtype=torch.int64, device=device)
        self.position = torch.zeros(1, dtype=torch.int64, device=device)
        self.use_graph = device.type == "cuda"
        self.graph: torch.cuda.CUDAGraph | None = None
        self.logits: torch.Tensor | None = None
        self.staged = []  # the stream-ordered expert calls the graph replays (their errors are kept)

    def check(self) -> None:
        """Raise an error the replayed CPU expert calls kept (host functions cannot raise); the device must
        have finished them: reading the logits does that."""
        for call in self.staged:
            call.check()

    @torch.inference_mode()
    def __call__(self, token: int) -> torch.Tensor:
        pos = self.cache.length
        if pos >= self.cache.capacity:
            raise ValueError(f"the cache holds {self.cache.capacity} positions and is full; a fixed-shape decode "
                             "step cannot grow it (raise --ctx)")
        self.ids.fill_(token)  # a kernel with a scalar argument on a GPU: no host synchronisation
        self.position.fill_(pos)
        if self.use_graph:
            if self.graph is None:
                self._capture()
            else:
                self.check()  # the previous step's: its logits were read, so it is done
            self.graph.replay()
        else:
            self.logits = self._step()
        self.cache.length = pos + 1
        return self.logits

    def _step(self) -> torch.Tensor:
        return self.model(self.ids, self.cache, position=self.position)

    def _capture(self) -> None:
        """Warm up on a side stream (lazy allocations, the staged expert calls), then capture one step. The
        warm-up writes the cache at the current position, as the replay that follows will again."""
        side = torch.cuda.Stream()
        side.wait_stream(torch.cuda.current_stream())
        with torch.cuda.stream(side):
            for _ in range(2):
                self._step()
        torch.cuda.current_stream().wait_stream(side)
        torch.cuda.synchronize()
        self.staged = [m.staged.call for m in self.model.modules() if getattr(m, "staged", None) is not None]
        self.check()
        self.graph = torch.cuda.CUDAGraph()
        with torch.cuda.graph(self.graph):
            self.logits = self._step()
