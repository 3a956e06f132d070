"""Expert routing statistics: how often each routed expert of each MoE layer is picked over a text.

`tandem inspect MODEL --routing-stats FILE` prints them (and writes them as JSON with `--routing-out`):
the load of each layer's experts, the busiest and idlest, and any expert that was never picked.
These counts are what `--gpu-experts N` placement reads to keep the busiest experts on the GPU.
"""

from __future__ import annotations

import json
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

import torch


@dataclass(frozen=True)
class RoutingStats:
    layers: list[int]  # MoE layer indices
    counts: torch.Tensor  # [layers, experts] int64
    tokens: int
    top_k: int

    def load(self) -> torch.Tensor:
        """[layers, experts]: each expert's share of its layer's picks, times the number of experts
        (1.0 = perfectly balanced)."""
        c = self.counts.double()
        return c / c.sum(dim=1, keepdim=True).clamp(min=1) * c.shape[1]

    def starved(self) -> list[tuple[int, int]]:
        """(layer, expert) pairs never picked."""
        return [(self.layers[r], int(e)) for r, e in (self.counts == 0).nonzero().tolist()]

    def busiest(self, layer_row: int, n: int) -> list[int]:
        return torch.argsort(self.counts[layer_row], descending=True, stable=True)[:n].tolist()

    def to_json(self) -> dict:
        return {"tokens": self.tokens, "top_k": self.top_k, "layers": self.layers, "counts": self.counts.tolist()}

    @classmethod
    def from_json(cls, data: dict) -> "RoutingStats":
        return cls(list(data["layers"]), torch.tensor(data["counts"], dtype=torch.int64), int(data["tokens"]),
                   int(data["top_k"]))

    def render(self) -> str:
        load = self.load()
        lines = [f"routing over {self.tokens} tokens, top-{self.top_k} of {self.counts.shape[1]} experts "
                 f"(load 1.00 = an even share)",
                 f"{'layer':>5} {'min load':>9} {'max load':>9} {'cv':>6} {'never':>6}  busiest experts"]
        for r, layer in enumerate(self.layers):
            row = load[r]
            cv = float(row.std() / row.mean()) if row.mean() > 0 else 0.0
            never = int((self.counts[r] == 0).sum())
            lines.append(f"{layer:>5} {float(row.min()):>9.2f} {float(row.max()):>9.2f} {cv:>6.2f} {never:>6}  "
                         + " ".join(str(e) for e in self.busiest(r, 6)))
        starved = self.starved()
        lines.append(f"experts never picked: {len(starved)}" + (
            " (" + ", ".join(f"layer {layer} expert {e}" for layer, e in starved[:8])
            + (" ..." if len(starved) > 8 else "") + ")" if starved else ""))
        return "\n".join(lines)


def gather(runner, text: str, ctx: int = 512, progress: Callable[[int, int], None] | None = None) -> RoutingStats:
    """Run `text` through the model in chunks of `ctx` tokens (prefill only) and count the routing."""
    ids = runner.tokenizer.encode(text)
    if len(ids) < 2:
        raise ValueError("the routing-stats text is empty; give a file with some prompts or prose")
    if not runner.moe_layers():
        raise ValueError(f"{runner.path} has no MoE layers: there is no routing to count")
    ctx = max(min(ctx, runner.max_context - 1), 2)
    runner.record_routing(True)
    chunks = [ids[i:i + ctx] for i in range(0, len(ids), ctx)]
    for i, chunk in enumerate(chunks):
        runner.logits(chunk)
        if progress:
            progress(i + 1, len(chunks))
    layers, counts = runner.routing_counts()
    runner.record_routing(False)
    return RoutingStats(layers, counts, len(ids), runner.config.num_experts_per_tok)


def save(stats: RoutingStats, path: str | Path) -> None:
    Path(path).write_text(json.dumps(stats.to_json()) + "\n")


def read(path: str | Path) -> RoutingStats:
    try:
        return RoutingStats.from_json(json.loads(Path(path).read_text()))
    except (OSError, ValueError, KeyError, TypeError) as e:
        raise ValueError(f"{path} is not a routing-stats JSON written by `tandem inspect --routing-out` ({e})") \
            from None
