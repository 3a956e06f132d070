"""The per-sequence attention cache, preallocated and grown geometrically.

MLA stores only the latent: `kv_lora_rank + qk_rope_head_dim` values per token per layer;
GQA stores K and V per KV head. Both are the same structure with different per-token shapes.
"""

from __future__ import annotations

import torch


class KVCache:
    """Tensors [L, S, *per_token_shape] per named stream (e.g. 'c_kv', 'k_pe' or 'k', 'v')."""

    def __init__(self, n_layers: int, streams: dict[str, tuple[int, ...]], dtype: torch.dtype,
                 device: torch.device | str = "cpu", capacity: int = 256):
        self.n_layers = n_layers
        self.streams = dict(streams)
        self.dtype = dtype
        self.device = torch.device(device)
        self.length = 0  # positions filled
        self.capacity = 0
        self.buffers: dict[str, torch.Tensor] = {}
        self._arrays: dict[int, dict] = {}
        self.reserve(capacity)

    @property
    def bytes_per_token(self) -> int:
        """Bytes one more token of context costs, all layers together."""
        per_layer = sum(_numel(s) for s in self.streams.values())
        return per_layer * self.n_layers * torch.empty((), dtype=self.dtype).element_size()

    def reserve(self, capacity: int) -> None:
        """Make room for `capacity` positions, keeping what is stored (grows at least 2x)."""
        if capacity <= self.capacity:
            return
        capacity = max(capacity, 2 * self.capacity)
        new = {
            name: torch.zeros((self.n_layers, capacity) + shape, dtype=self.dtype, device=self.device)
            for name, shape in self.streams.items()
        }
        for name, old in self.buffers.items():
            new[name][:, : self.length] = old[:, : self.length]
        self.buffers, self.capacity = new, capacity
        self._arrays = {}

    def update(self, layer: int, start: int | torch.Tensor, **values: torch.Tensor) -> dict[str, torch.Tensor]:
        """Write values [T, *shape] at positions start..start+T of `layer`; return views [start+T, *shape].
        With start a tensor [1] on the device (a fixed-shape step), the write is an index_copy_ and the
        views span the whole capacity (causal_mask(..., start) hides what lies past the new tokens)."""
        out = {}
        for name, v in values.items():
            buf = self.buffers[name][layer]
            if isinstance(start, torch.Tensor):
                buf.index_copy_(0, start + torch.arange(v.shape[0], device=buf.device), v.to(self.dtype))
                out[name] = buf
                continue
            end = start + v.shape[0]
            buf[start:end] = v.to(self.dtype)
            out[name] = buf[:end]
        return out

    def layer(self, layer: int) -> dict[str, torch.Tensor]:
        """The whole preallocated buffers [capacity, *shape] of `layer`, for an op that writes its new
        positions in place (the engine's fused MLA)."""
        return {name: buf[layer] for name, buf in self.buffers.items()}

    def arrays(self, layer: int) -> dict:
        """layer(layer) as the CPU engine takes it without a conversion per call: numpy views (bfloat16, which
        numpy lacks, as the tensors), kept until the buffers grow."""
        views = self._arrays.get(layer)
        if views is None:
            views = self._arrays[layer] = {name: buf[layer].numpy() if buf.dtype != torch.bfloat16 else buf[layer]
                                           for name, buf in self.buffers.items()}
        return views

    def reset(self) -> None:
        self.length = 0


def _numel(shape: tuple[int, ...]) -> int:
    n = 1
    for s in shape:
        n *= s
    return n
