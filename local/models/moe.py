"""Routed experts: the router (scores, group-limited top-k, bias correction) and the expert mix.

Legend: T tokens, E routed experts, A active experts per token (top-k), D hidden, I expert width.
"""

from __future__ import annotations

import torch
from torch import nn

from .layers import MLP, RMSNorm, engine_pre_norm

SCORING_FUNCS = ("softmax", "sigmoid")
TOPK_METHODS = ("greedy", "group_limited_greedy", "noaux_tc")


class Router(nn.Module):
    """Picks A of E experts per token and their mixing weights.

    scoring: softmax (V2, Qwen3) or sigmoid (V3). topk_method: greedy; group_limited_greedy
    (V2: keep the topk_group groups with the best single expert); noaux_tc (V3: rank groups by
    the sum of their top-2 *biased* scores; the bias picks experts, the weights stay unbiased).
    """

    def __init__(self, hidden: int, n_experts: int, top_k: int, *, scoring: str = "softmax",
                 topk_method: str = "greedy", n_group: int = 1, topk_group: int = 1,
                 norm_topk_prob: bool = False, routed_scaling_factor: float = 1.0,
                 logits_in_fp32: bool = True):
        super().__init__()
        self.weight = nn.Parameter(torch.empty(n_experts, hidden))
        if topk_method == "noaux_tc":
            self.register_buffer("e_score_correction_bias", torch.zeros(n_experts))
        self.n_experts, self.top_k = n_experts, top_k
        self.scoring, self.topk_method = scoring, topk_method
        self.n_group, self.topk_group = n_group or 1, topk_group or 1
        self.norm_topk_prob, self.routed_scaling_factor = norm_topk_prob, routed_scaling_factor
        self.logits_in_fp32 = logits_in_fp32

    def forward(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """x [T, D] -> (weights [T, A] float32, ids [T, A] int64)."""
        if self.logits_in_fp32:
            logits = x.float() @ self.weight.float().T  # [T, E]
        else:
            logits = (x @ self.weight.T).float()
        scores = logits.sigmoid() if self.scoring == "sigmoid" else logits.softmax(dim=-1)
        if self.topk_method == "greedy":
            weights, ids = torch.topk(scores, self.top_k, dim=-1)
        else:
            T, G = scores.shape[0], self.n_group
            if self.topk_method == "noaux_tc":
                choice = scores + self.e_score_correction_bias.float()
                group_scores = choice.view(T, G, -1).topk(2, dim=-1)[0].sum(dim=-1)  # [T, G]
            else:
                choice = scores
                group_scores = choice.view(T, G, -1).max(dim=-1).values
            group_idx = torch.topk(group_scores, self.topk_group, dim=-1)[1]
            group_mask = torch.zeros_like(group_scores).scatter_(1, group_idx, 1.0)
            keep = group_mask[:, :, None].expand(T, G, self.n_experts // G).reshape(T, -1).bool()
            fill = float("-inf") if self.topk_method == "noaux_tc" else 0.0
            ids = torch.topk(choice.masked_fill(~keep, fill), self.top_k, dim=-1)[1]
            weights = scores.gather(1, ids)
        if self.norm_topk_prob and self.top_k > 1:
            weights = weights / (weights.sum(dim=-1, keepdim=True) + 1e-20)
        return weights * self.routed_scaling_factor, ids


class MoE(nn.Module):
    """out = sum_a w[t,a] * expert_{id[t,a]}(x[t]) + shared_experts(x)."""

    def __init__(self, router: Router, hidden: int, intermediate: int, n_experts: int,
                 shared_intermediate: int = 0, act: str = "silu", bias: bool = False):
        super().__init__()
        self.gate = router
        self.experts = nn.ModuleList(MLP(hidden, intermediate, act, bias) for _ in range(n_experts))
        if shared_intermediate:
            self.shared_experts = MLP(hidden, shared_intermediate, act, bias)
        self.expert_counts: torch.Tensor | None = None  # [E] int64 when routing stats are recorded
        # GGUF on the CPU: (gate, up, down stacks, their ggml types, shared [gate, up, down, ...], types)
        # for one fused engine call per layer; the per-expert modules are then never loaded
        self.engine: tuple | None = None
        # ...and with the router there too, the whole layer is one engine call (offload.torch_ops.moe_layer)
        self.engine_layer = None
        # hybrid: the routed experts run on the CPU engine while the shared ones (and the routed experts
        # listed in gpu_experts) run here in torch; engine_skip masks the latter out of the engine call
        self.overlap = False
        self.gpu_experts: list[int] = []
        self.engine_skip: torch.Tensor | None = None
        self.staged = None  # offload.overlap.StagedExperts: the decode-step engine call, made on first use

    def set_overlap(self, gpu_experts: list[int]) -> None:
        self.overlap = True
        self.gpu_experts = sorted(gpu_experts)
        if self.gpu_experts:
            skip = torch.zeros(len(self.experts), dtype=torch.uint8)
            skip[self.gpu_experts] = 1
            self.engine_skip = skip

    def bind_engine(self) -> bool:
        """Make the layer (router included) one CPU engine call when its experts are on the engine and the
        router's logits are float32; returns whether it did."""
        g = self.gate
        if self.engine is None or self.overlap or g.weight.dtype != torch.float32:
            return False
        from offload.torch_ops import moe_layer

        self.engine_layer = moe_layer(*self.engine, g.weight, getattr(g, "e_score_correction_bias", None), g.top_k,
                                      g.scoring, g.topk_method, g.n_group, g.topk_group, g.norm_topk_prob,
                                      g.routed_scaling_factor)
        return True

    def forward(self, x: torch.Tensor, pre_norm: RMSNorm | None = None) -> torch.Tensor:
        """x [T, D] -> the experts' mix. pre_norm (the decoder layer's RMSNorm before this block): x is the
        residual stream, and the result x + mix(pre_norm(x)): one engine call where the layer is one."""
        if self.engine_layer is not None and x.device.type == "cpu":
            from offload.torch_ops import run_moe_layer

            fused = engine_pre_norm(pre_norm, x)
            if fused is not None:
                out, _, ids = run_moe_layer(self.engine_layer, x.float().contiguous(), self.gate.top_k, **fused)
                self._count(ids)
                return out.to(x.dtype)
        if pre_norm is not None:
            return x + self.forward(pre_norm(x))
        weights, ids = self.gate(x)  # [T, A], [T, A]
        self._count(ids)
        if self.engine is not None and self.overlap:
            return self._overlapped(x, weights, ids)
        if self.engine is not None:  # routed + shared experts in one CPU engine call
            from offload.torch_ops import run_moe

            gate, up, down, types, shared, shared_types = self.engine
            out = run_moe(x.float().contiguous(), ids.contiguous(), weights.float().contiguous(),
                          gate, up, down, types, shared, shared_types)
            return out.to(x.dtype)
        return self._torch_experts(x, weights, ids, torch.unique(ids).tolist())

    def _count(self, ids: torch.Tensor) -> None:
        """Routing statistics, without a host sync (bincount would read the ids' maximum back)."""
        if self.expert_counts is not None:
            flat = ids.flatten().to(self.expert_counts.device)
            self.expert_counts.index_add_(0, flat, torch.ones_like(flat))

    def _torch_experts(self, x, weights, ids, experts) -> torch.Tensor:
        out = torch.zeros_like(x)
        for e in experts:  # ascending, as the reference sums them
            tok, slot = torch.where(ids == e)
            y = self.experts[e](x[tok]) * weights[tok, slot, None]
            out.index_add_(0, tok, y.to(out.dtype))
        if hasattr(self, "shared_experts"):
            out = out + self.shared_experts(x)
        return out

    def _overlapped(self, x, weights, ids) -> torch.Tensor:
        """Routed experts on the CPU engine while the shared (+ device-resident routed) experts run here."""
        from offload.overlap import StagedExperts, overlapped_moe

        if x.shape[0] == 1:  # a decode step: stream-ordered, no host sync (CUDA-graph capturable)
            if self.staged is None:
                self.staged = StagedExperts(self.engine[:4], self.engine_skip, x.shape[1], ids.shape[1], x.device)
            return self.staged(x, weights, ids, lambda: self._device_side(x, weights, ids, sync_free=True))
        return overlapped_moe(x, weights, ids, self.engine[:4], self.engine_skip,
                              lambda: self._device_side(x, weights, ids))

    def _device_side(self, x, weights, ids, sync_free: bool = False) -> torch.Tensor:
        """Shared experts + the routed experts kept on the device. sync_free: each device expert runs on every
        token with its routing weight (0 where not picked) instead of reading the picked ids back."""
        if self.gpu_experts and not sync_free:
            return self._torch_experts(x, weights, ids, [e for e in torch.unique(ids).tolist() if e in self.gpu_experts])
        out = torch.zeros_like(x)
        for e in self.gpu_experts:  # ascending, as the reference sums them
            w = (weights * (ids == e)).sum(-1, keepdim=True)  # [T, 1]
            out += self.experts[e](x) * w.to(x.dtype)
        if hasattr(self, "shared_experts"):
            out = out + self.shared_experts(x)
        return out
