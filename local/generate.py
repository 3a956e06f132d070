"""The one generation loop: tokens plus timing, consumed by the CLI, the TUI and the bench.

`generate_tokens` is the model-level loop (ids in, ids out); `TextStream` turns ids into text
events: incremental detokenization, R1-style <think>…</think> reasoning split, stop strings.
"""

from __future__ import annotations

import time
from collections.abc import Callable, Iterable, Iterator
from dataclasses import dataclass

import torch

from .kv_cache import KVCache
from .sampling import SamplingParams, sample_next

THINK_OPEN, THINK_CLOSE = "<think>", "</think>"


@dataclass(frozen=True)
class Stats:
    prompt_tokens: int = 0
    generated_tokens: int = 0
    prompt_seconds: float = 0.0  # prefill, up to the first sampled token
    decode_seconds: float = 0.0  # every later token
    ttft_seconds: float = 0.0  # from the call to the first token, tokenization included
    cached_tokens: int = 0  # prompt tokens whose cache was kept from the previous call (not run again)

    @property
    def prompt_tps(self) -> float:
        """Prompt tokens run a second (the kept ones not counted: they took no time)."""
        run = self.prompt_tokens - self.cached_tokens
        return run / self.prompt_seconds if self.prompt_seconds > 0 else 0.0

    @property
    def decode_tps(self) -> float:
        n = self.generated_tokens - 1
        return n / self.decode_seconds if n > 0 and self.decode_seconds > 0 else 0.0

    def summary(self) -> str:
        cached = f" ({self.cached_tokens} cached)" if self.cached_tokens else ""
        return (f"prompt {self.prompt_tokens} tok{cached}, {self.prompt_tps:.1f} tok/s | "
                f"decode {self.generated_tokens} tok, {self.decode_tps:.1f} tok/s | "
                f"ttft {self.ttft_seconds * 1000:.0f} ms")


@dataclass(frozen=True)
class Event:
    """kind 'token': a generated token and/or a text delta (reasoning or answer).
    kind 'done': the end, with finish_reason 'eos' | 'length' | 'stop' | 'context'."""

    kind: str
    text: str = ""
    token_id: int | None = None
    reasoning: bool = False
    finish_reason: str | None = None
    stats: Stats = Stats()


@dataclass(frozen=True)
class TokenStep:
    token_id: int
    prompt_seconds: float
    decode_seconds: float


@torch.inference_mode()
def generate_tokens(model, cache: KVCache, prompt_ids: list[int], params: SamplingParams,
                    eos_ids: Iterable[int] = (), max_context: int | None = None,
                    prefill_chunk: int = 512,
                    step: Callable[[int], torch.Tensor] | None = None) -> Iterator[TokenStep]:
    """Prefill the prompt in chunks, then decode one token at a time; yields each token with timing.
    Stops at EOS (unless params.ignore_eos), after params.max_tokens, or at max_context.
    The cache may hold the prompt's first cache.length positions already (a kept prefix): only the rest is
    prefilled (at least one token: it gives the first logits).
    step(token) -> logits [1, V] runs one decode step (default: the model's forward; --cuda-graph: a
    local.decode_step.DecodeStep)."""
    if not cache.length < len(prompt_ids):
        raise ValueError(f"the cache holds {cache.length} positions of a {len(prompt_ids)}-token prompt: at least "
                         "its last token must be left to run")
    device = model.device
    if step is None:
        def step(token: int) -> torch.Tensor:
            return model(torch.tensor([token], device=device), cache)
    eos = set() if params.ignore_eos else set(eos_ids)
    generator = None
    if params.seed is not None:
        generator = torch.Generator(device="cpu").manual_seed(params.seed)
    history = torch.tensor(prompt_ids, dtype=torch.int64)
    t0 = time.perf_counter()
    logits = None
    for i in range(cache.length, len(prompt_ids), prefill_chunk):
        chunk = torch.tensor(prompt_ids[i:i + prefill_chunk], dtype=torch.int64, device=device)
        logits = model(chunk, cache, last_only=True)
    prompt_seconds, decode_start = None, None
    for n in range(params.max_tokens):
        if max_context is not None and cache.length >= max_context:
            return
        token = sample_next(logits[-1].float().cpu(), params, history, generator)
        now = time.perf_counter()
        if prompt_seconds is None:
            prompt_seconds, decode_start = now - t0, now
        yield TokenStep(token, prompt_seconds, now - decode_start)
        if token in eos:
            return
        history = torch.cat((history, torch.tensor([token])))
        if n + 1 < params.max_tokens:
            logits = step(token)


class TextStream:
    """Turns generated text deltas into events: splits <think>…</think> reasoning from the answer
    (the tags themselves are not shown) and stops at the first stop string (not shown either).
    Text that might be the start of a tag or stop string is held back until it is decided."""

    def __init__(self, stop: tuple[str, ...] = (), in_reasoning: bool = False):
        self.stop = tuple(s for s in stop if s)
        self.reasoning = in_reasoning
        self.pending = ""
        self.stopped = False

    def push(self, text: str) -> list[tuple[str, bool]]:
        """New text -> [(delta, is_reasoning)] ready to show; sets .stopped at a stop string."""
        out: list[tuple[str, bool]] = []
        self.pending += text
        while self.pending and not self.stopped:
            hits = [(self.pending.find(s), s) for s in self.stop + (THINK_OPEN, THINK_CLOSE)]
            hits = [(i, s) for i, s in hits if i >= 0]
            if not hits:
                keep = self._held_back()
                if len(self.pending) > keep:
                    out.append((self.pending[: len(self.pending) - keep], self.reasoning))
                    self.pending = self.pending[len(self.pending) - keep:]
                break
            i, marker = min(hits, key=lambda h: (h[0], -len(h[1])))
            if i:
                out.append((self.pending[:i], self.reasoning))
            self.pending = self.pending[i + len(marker):]
            if marker in self.stop:
                self.stopped = True
            else:
                self.reasoning = marker == THINK_OPEN
        return [(t, r) for t, r in out if t]

    def flush(self) -> list[tuple[str, bool]]:
        out = [] if self.stopped or not self.pending else [(self.pending, self.reasoning)]
        self.pending = ""
        return out

    def _held_back(self) -> int:
        """Length of the longest suffix of pending that is a proper prefix of a marker."""
        best = 0
        for m in self.stop + (THINK_OPEN, THINK_CLOSE):
            for k in range(min(len(m) - 1, len(self.pending)), best, -1):
                if self.pending.endswith(m[:k]):
                    best = k
                    break
        return best


def starts_in_reasoning(prompt_text: str) -> bool:
    """R1-style templates open the reasoning block in the prompt itself ('…<｜Assistant｜><think>\\n')."""
    tail = prompt_text.rstrip()
    return tail.endswith(THINK_OPEN)
