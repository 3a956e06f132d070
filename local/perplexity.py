"""Perplexity and KL divergence over a text, scored the way llama.cpp's `llama-perplexity` scores it:
the text is cut into chunks of `ctx` tokens (the first one BOS when the model adds BOS), and in each
chunk only the second half is scored, so every scored token has at least ctx/2 tokens of context."""

from __future__ import annotations

import math
from collections.abc import Callable
from dataclasses import dataclass

import torch


@dataclass(frozen=True)
class PerplexityResult:
    tokens_scored: int
    chunks: int
    ppl: float
    ppl_stderr: float
    # against a base model (--kld-base), else None
    kld_mean: float | None = None
    kld_stderr: float | None = None
    kld_max: float | None = None
    top1_agreement: float | None = None
    base_ppl: float | None = None

    def summary(self) -> str:
        out = [f"PPL = {self.ppl:.4f} +/- {self.ppl_stderr:.4f} over {self.tokens_scored} tokens "
               f"({self.chunks} chunks)"]
        if self.kld_mean is not None:
            out += [f"base PPL = {self.base_ppl:.4f}, ln(PPL/base) = {math.log(self.ppl / self.base_ppl):.6f}",
                    f"mean KLD = {self.kld_mean:.6f} +/- {self.kld_stderr:.6f}, max KLD = {self.kld_max:.6f}",
                    f"same top token: {100 * self.top1_agreement:.3f} %"]
        return "\n".join(out)


def chunk_ids(ids: list[int], ctx: int, bos_id: int | None) -> list[list[int]]:
    """Consecutive chunks of ctx tokens; the first token of each becomes BOS when the model uses one."""
    if ctx < 4:
        raise ValueError(f"--ctx {ctx} is too small; use at least 4")
    n = len(ids) // ctx
    if n == 0:
        raise ValueError(f"the text has {len(ids)} tokens, fewer than one chunk of --ctx {ctx}; "
                         "give a longer text or a smaller --ctx")
    chunks = [list(ids[i * ctx:(i + 1) * ctx]) for i in range(n)]
    if bos_id is not None:
        for c in chunks:
            c[0] = bos_id
    return chunks


def scored_logprobs(logits: torch.Tensor, chunk: list[int]) -> tuple[torch.Tensor, torch.Tensor]:
    """log-softmax rows [n, V] that predict the second half of the chunk, and the targets [n]."""
    first = len(chunk) // 2
    logp = torch.log_softmax(logits[first:len(chunk) - 1].double(), dim=-1)
    return logp, torch.tensor(chunk[first + 1:], dtype=torch.int64)


def _mean_stderr(x: torch.Tensor) -> tuple[float, float]:
    n = x.numel()
    mean = x.mean().item()
    return mean, (x.std(unbiased=True).item() / math.sqrt(n)) if n > 1 else 0.0


def perplexity(runner, text: str, ctx: int = 512, base=None,
               progress: Callable[[int, int], None] | None = None) -> PerplexityResult:
    """PPL of `runner` on `text`; with `base` (another Runner, same vocabulary) also KL(base || runner)."""
    if base is not None and base.config.vocab_size != runner.config.vocab_size:
        raise ValueError(f"the base model's vocabulary ({base.config.vocab_size}) differs from the model's "
                         f"({runner.config.vocab_size}); KL divergence needs the same tokenizer")
    add_bos = runner.tokenizer.encode("a")[:1] == [runner.tokenizer.bos_token_id]
    ids = runner.tokenizer.encode(text, add_special_tokens=False)
    chunks = chunk_ids(ids, ctx, runner.tokenizer.bos_token_id if add_bos else None)
    nll, kld, same, base_nll = [], [], [], []
    for i, chunk in enumerate(chunks):
        logp, target = scored_logprobs(runner.logits(chunk), chunk)
        nll.append(-logp.gather(1, target[:, None])[:, 0])
        if base is not None:
            base_logp, _ = scored_logprobs(base.logits(chunk), chunk)
            kld.append((base_logp.exp() * (base_logp - logp)).sum(-1))
            same.append((base_logp.argmax(-1) == logp.argmax(-1)).double())
            base_nll.append(-base_logp.gather(1, target[:, None])[:, 0])
        if progress:
            progress(i + 1, len(chunks))
    nll_all = torch.cat(nll)
    mean, err = _mean_stderr(nll_all)
    ppl = math.exp(mean)
    result = dict(tokens_scored=nll_all.numel(), chunks=len(chunks), ppl=ppl, ppl_stderr=ppl * err)
    if base is not None:
        k = torch.cat(kld)
        k_mean, k_err = _mean_stderr(k)
        result.update(kld_mean=k_mean, kld_stderr=k_err, kld_max=k.max().item(),
                      top1_agreement=torch.cat(same).mean().item(), base_ppl=math.exp(torch.cat(base_nll).mean().item()))
    return PerplexityResult(**result)
