"""Sampling: small pure functions over a logits vector [V], composed by `sample_next`."""

from __future__ import annotations

import math
from dataclasses import dataclass, field

import torch

# top_p_filter: the most likely tokens it looks at first; then (a flat distribution) its buckets, this many, over
# the logits down to TOP_P_SPAN below the largest (e^-30: 1e-13 of the top token's probability; the rest share
# the last bucket)
TOP_P_HEAD = 256
TOP_P_BUCKETS, TOP_P_SPAN = 256, 30.0
# categorical's blocks: tokens per block of the running sum
CATEGORICAL_BLOCK = 1024


@dataclass(frozen=True)
class SamplingParams:
    """How to pick tokens. temperature 0 means greedy; top_k 0, top_p 1, min_p 0 and
    repetition_penalty 1 switch those filters off."""

    max_tokens: int = 256
    temperature: float = 0.7
    top_k: int = 0
    top_p: float = 1.0
    min_p: float = 0.0
    repetition_penalty: float = 1.0
    seed: int | None = None
    stop: tuple[str, ...] = field(default_factory=tuple)
    ignore_eos: bool = False

    def __post_init__(self):
        if isinstance(self.stop, str):
            object.__setattr__(self, "stop", (self.stop,))
        else:
            object.__setattr__(self, "stop", tuple(self.stop))
        checks = [
            (self.max_tokens >= 0, "max_tokens must be >= 0"),
            (self.temperature >= 0, "temperature must be >= 0 (0 = greedy)"),
            (self.top_k >= 0, "top_k must be >= 0 (0 = off)"),
            (0 < self.top_p <= 1, "top_p must be in (0, 1]"),
            (0 <= self.min_p < 1, "min_p must be in [0, 1)"),
            (self.repetition_penalty > 0, "repetition_penalty must be > 0 (1 = off)"),
        ]
        for ok, msg in checks:
            if not ok:
                raise ValueError(f"SamplingParams: {msg}")

    @property
    def greedy(self) -> bool:
        return self.temperature == 0


def apply_repetition_penalty(logits: torch.Tensor, previous: torch.Tensor, penalty: float) -> torch.Tensor:
    """CTRL-style: divide positive logits of already-seen tokens by `penalty`, multiply negative ones."""
    if penalty == 1.0 or previous.numel() == 0:
        return logits
    seen = torch.unique(previous)
    picked = logits[seen]
    out = logits.clone()
    out[seen] = torch.where(picked > 0, picked / penalty, picked * penalty)
    return out


def top_k_filter(logits: torch.Tensor, k: int) -> torch.Tensor:
    if k <= 0 or k >= logits.shape[-1]:
        return logits
    kth = torch.topk(logits, k).values[-1]
    return logits.masked_fill(logits < kth, float("-inf"))


def top_p_filter(logits: torch.Tensor, p: float) -> torch.Tensor:
    """Keep the smallest set of most likely tokens whose probability mass reaches p.

    Without sorting the vocabulary: a full sort of 152k logits took 11-13 ms a token, a third of a decode step
    on a 30B model. First the TOP_P_HEAD most likely tokens (torch.topk): when their mass reaches p (a trained
    model's next token, mostly) they hold the answer, as everything after them is dropped (0.4 ms over 152k);
    else the tokens go into buckets by logit (as llama.cpp's bucket sort), see _top_p_by_buckets (1.5 ms).
    Masses are summed in float64: float32 could not tell a flat tail's tokens apart near p (its ulp at 0.999
    is 6e-8)."""
    if p >= 1.0:
        return logits
    probs = logits.softmax(-1)
    top, order = torch.topk(probs, min(TOP_P_HEAD, probs.shape[-1]))
    top = top.double()
    cum = top.cumsum(0)
    if not (cum[-1] >= p or top.shape[0] == probs.shape[-1]):
        return _top_p_by_buckets(logits, probs, p)
    drop = cum - top >= p  # mass before this token already reaches p
    drop[0] = False  # the most likely token stays
    keep = order[~drop]
    return torch.full_like(logits, float("-inf")).index_copy_(0, keep, logits[keep])


def _top_p_by_buckets(logits: torch.Tensor, probs: torch.Tensor, p: float) -> torch.Tensor:
    """top_p_filter for a flat distribution: the tokens in TOP_P_BUCKETS buckets by logit (the highest first),
    the buckets' masses summed from the top; every bucket before the one where the sum reaches p is kept whole,
    every one after it dropped, and only the tokens of that one bucket are sorted to find where in it the mass
    reaches p."""
    top = logits.max()
    if not torch.isfinite(top):  # NaN logits: nothing to choose among, left to the sampler
        return logits
    least = float(logits.min())
    if least == float("-inf"):  # (a masked copy of 152k logits took 0.4 ms: only where some are out already)
        least = float(logits[logits > least].min())
    lo = max(least, float(top) - TOP_P_SPAN)
    width = (float(top) - lo) / TOP_P_BUCKETS or 1.0
    # bucket 0 the highest logits; those more than TOP_P_SPAN below the top (and -inf) share the last (int32:
    # int64 indices were another 1.2 MB of fresh pages, up to 0.8 ms)
    bucket = ((top - logits) / width).floor_().clamp_(0, TOP_P_BUCKETS - 1).int()
    mass = torch.zeros(TOP_P_BUCKETS, dtype=torch.float64).index_add_(0, bucket, probs.double())
    cum = mass.cumsum(0)
    k = min(int(torch.searchsorted(cum, torch.tensor(p, dtype=torch.float64))), TOP_P_BUCKETS - 1)
    out = logits.masked_fill(bucket > k, float("-inf"))
    inside = (bucket == k).nonzero().squeeze(1)
    if not inside.numel():  # the last bucket, empty: the mass never reached p (rounding), all the rest stays
        return out
    q, order = torch.sort(probs[inside].double(), descending=True)
    drop = (cum[k - 1] if k else 0.0) + q.cumsum(0) - q >= p
    drop[0] = False  # the most likely token, or one with less than p before it (k is the first bucket to reach p)
    out[inside[order[drop]]] = float("-inf")
    return out


def min_p_filter(logits: torch.Tensor, min_p: float) -> torch.Tensor:
    """Drop tokens whose probability is below min_p times the top token's."""
    if min_p <= 0:
        return logits
    # p < min_p * p_max  <=>  logit < logit_max + log(min_p): no softmax over the vocabulary (0.2 ms of 152k)
    return logits.masked_fill(logits < logits.max() + math.log(min_p), float("-inf"))


def sample_next(logits: torch.Tensor, params: SamplingParams, previous: torch.Tensor,
                generator: torch.Generator | None = None) -> int:
    """One token id from logits [V] (float32), given the ids seen so far."""
    logits = apply_repetition_penalty(logits.float(), previous, params.repetition_penalty)
    if params.greedy:
        return int(torch.argmax(logits))
    logits = logits / params.temperature
    logits = top_k_filter(logits, params.top_k)
    logits = top_p_filter(logits, params.top_p)
    logits = min_p_filter(logits, params.min_p)
    return categorical(logits.softmax(-1), generator)


def categorical(probs: torch.Tensor, generator: torch.Generator | None = None) -> int:
    """One index drawn with the probabilities probs [V] (>= 0, any positive sum): the inverse of their running
    sum (float64) at one uniform draw, found a block of CATEGORICAL_BLOCK tokens at a time (the blocks' sums,
    then the running sum inside one block). torch.multinomial drew an exponential variate per token, ~3 ms over
    a 152k vocabulary, and one running sum over all of it took ~1 ms; this takes ~0.1 ms. Zero-probability
    tokens are never drawn."""
    n, B = probs.shape[0], CATEGORICAL_BLOCK
    whole = n // B * B  # the whole blocks, then the rest (no float64 copy of all V: ~0.3 ms of fresh pages)
    sums = probs[:whole].reshape(-1, B).sum(1, dtype=torch.float64)
    if whole < n:
        sums = torch.cat((sums, probs[whole:].sum(0, dtype=torch.float64, keepdim=True)))
    cdf = sums.cumsum(0)
    if not cdf[-1] > 0:
        raise ValueError("no token has a positive probability to sample from")
    u = torch.rand((), dtype=torch.float64, generator=generator) * cdf[-1]
    b = int(_first_past(cdf, u))
    u = u - cdf[b - 1] if b else u
    inside = probs[b * B:(b + 1) * B].double().cumsum(0)
    return b * B + int(_first_past(inside, u))


def _first_past(cdf: torch.Tensor, u: torch.Tensor) -> torch.Tensor:
    """The first index whose running sum passes u (zero-width entries are never it), or, where rounding left u
    at or past the end, the last entry with a positive width."""
    return torch.minimum(torch.searchsorted(cdf, u, right=True), torch.searchsorted(cdf, cdf[-1]))
