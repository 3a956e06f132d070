"""The public entry point: `load(path)` gives a Runner with logits / generate / chat."""

from __future__ import annotations

import functools
import gc
import os
import time
from collections import Counter
from collections.abc import Callable, Iterator, Sequence
from pathlib import Path

import torch

from .config import read_json
from .generate import Event, Stats, TextStream, generate_tokens, starts_in_reasoning
from .kv_cache import KVCache
from .loader import load_hf
from .sampling import SamplingParams
from .tokenizer import StreamDecoder, Tokenizer

DTYPES = {"float32": torch.float32, "fp32": torch.float32, "bfloat16": torch.bfloat16,
          "bf16": torch.bfloat16, "float16": torch.float16, "fp16": torch.float16}


def gpu_memory_allocated() -> int | None:
    """Bytes torch holds on the current CUDA device, or None without a GPU."""
    try:
        return torch.cuda.memory_allocated() if torch.cuda.is_available() else None
    except Exception:  # noqa: BLE001 - a broken CUDA setup means no GPU figure
        return None


def resolve_device(device: str) -> torch.device:
    if device == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    if device.startswith("cuda") and not torch.cuda.is_available():
        raise RuntimeError(f"device '{device}' asked for, but this torch build sees no CUDA GPU; use --device cpu")
    if device != "cpu" and not device.startswith("cuda"):
        raise ValueError(f"device must be 'auto', 'cpu' or 'cuda[:N]', got '{device}'")
    return torch.device(device)


def resolve_dtype(dtype: str | torch.dtype | None, device: torch.device) -> torch.dtype | None:
    """None = the checkpoint's own dtype on the CPU (FP8 -> bf16), bf16 on a GPU."""
    if isinstance(dtype, torch.dtype):
        return dtype
    if dtype in (None, "auto"):
        return torch.bfloat16 if device.type == "cuda" else None
    try:
        return DTYPES[dtype]
    except KeyError:
        raise ValueError(f"dtype '{dtype}' is not one of auto, {', '.join(DTYPES)}") from None


def eos_token_ids(path: Path, config, tokenizer: Tokenizer, extra=()) -> set[int]:
    """EOS ids from generation_config.json, the config, the tokenizer (and GGUF's EOT/EOM), together."""
    ids: set[int] = set()
    gen = path / "generation_config.json"
    for value in ((read_json(gen).get("eos_token_id") if path.is_dir() and gen.exists() else None),
                  getattr(config, "eos_token_id", None), tokenizer.eos_token_id, *extra):
        if isinstance(value, int):
            ids.add(value)
        elif isinstance(value, (list, tuple)):
            ids.update(int(v) for v in value)
    return ids


class Runner:
    """A loaded model with its tokenizer; one conversation's cache at a time: each generate / chat call keeps its
    cache, and the next one runs only what follows the longest prefix the two share (a chat's next turn: the
    new message, not the whole conversation again)."""

    def __init__(self, path: Path, config, model, tokenizer: Tokenizer, device: torch.device, threads: int,
                 eos_ids: set[int], kv_cache_dtype: torch.dtype | None = None):
        self.path, self.config, self.model, self.tokenizer = path, config, model, tokenizer
        self.device, self.threads = device, threads
        self.eos_ids = eos_ids
        self.kv_cache_dtype = kv_cache_dtype  # None = the compute dtype
        self.max_context = config.max_position_embeddings
        self.ctx: int | None = None  # --ctx: the cache is preallocated for this many positions
        self.prefill_chunk = 512  # --chunk: prompt tokens per forward pass
        # --cuda-graph: decode through a fixed-shape step (local.decode_step), captured into a CUDA graph on a
        # GPU; on the CPU it runs eagerly (how its logic is tested)
        self.fixed_decode = False
        # the last call's cache and the token ids of the positions it holds (None while a call runs)
        self._kept: tuple[KVCache, list[int]] | None = None

    # ---- what the model is (for `tandem chat`'s header and the bench)
    def describe(self) -> dict:
        """Architecture, parameters (total / active per token), storage types, placement, threads, and
        `threads_warning` when there are more threads than CPUs this process may run on."""
        from offload.cpus import threads_warning

        from .inspect_model import summarize

        if not hasattr(self, "_summary"):
            self._summary = summarize(self.path)
        s, engine = self._summary, self.uses_engine
        loaded = getattr(self.model, "checkpoint", None)
        if hasattr(loaded, "tensors"):  # the types it runs: a GGUF's, an HF directory's as it loaded (--quant)
            size = Counter()
            for t in loaded.tensors.values():
                size[t.qtype.name] += t.nbytes
            stored = [t for t, _ in size.most_common()]
        else:
            stored = [t for t, *_ in s.type_table()]
        types = [t for t in stored if t != "F32"] or stored  # F32 norms say nothing, unless all is F32
        plan = getattr(self.model, "placement", None)
        if plan is not None and plan.device != "cpu":
            n = sum(len(v) for v in plan.gpu_experts.values())
            placement = (f"{self.device.type.upper()}: attention, dense, shared"
                         + (f" + {n} routed experts" if n else "") + "; CPU engine: routed experts")
        elif engine:
            placement = "CPU engine: every linear and expert"
        else:
            placement = f"torch on {self.device.type}"
        info = {"architecture": getattr(self.config, "model_type", "?"), "format": s.format,
                "total_params": s.total_params, "active_params": s.active_params, "types": types,
                "placement": placement, "device": str(self.device), "threads": self.threads,
                "context": self.max_context, "path": str(self.path)}
        if warning := threads_warning(self.threads):
            info["threads_warning"] = warning
        return info

    @property
    def uses_engine(self) -> bool:
        return any(getattr(m, "engine", None) is not None or getattr(m, "engine_weight", None) is not None
                   for m in self.model.modules())

    # ---- expert routing statistics
    def moe_layers(self) -> list[tuple[int, torch.nn.Module]]:
        return [(i, layer.mlp) for i, layer in enumerate(self.model.model.layers) if hasattr(layer.mlp, "gate")]

    def record_routing(self, on: bool = True) -> None:
        """Start (zeroed) or stop counting how often each routed expert of each MoE layer is picked."""
        for _, moe in self.moe_layers():
            moe.expert_counts = torch.zeros(len(moe.experts), dtype=torch.int64, device=self.device) if on else None

    def routing_counts(self) -> tuple[list[int], torch.Tensor] | None:
        """(MoE layer indices, counts [layers, experts] int64) since `record_routing`, or None when off."""
        layers = [(i, m.expert_counts) for i, m in self.moe_layers() if m.expert_counts is not None]
        if not layers:
            return None
        return [i for i, _ in layers], torch.stack([c.cpu() for _, c in layers])

    @property
    def dtype(self) -> torch.dtype:
        return self.model.dtype

    @property
    def kv_bytes_per_token(self) -> int:
        """Cache memory one token of context costs (MLA: only the latent and the rope key)."""
        return self.new_cache(1).bytes_per_token

    def new_cache(self, capacity: int):
        return self.model.new_cache(capacity=capacity, dtype=self.kv_cache_dtype)

    def decoder(self, cache) -> Callable[[int], torch.Tensor]:
        """One decode step on `cache`: token id -> logits [1, V], advancing the cache (a DecodeStep, CUDA-graph
        replayed on a GPU, with fixed_decode; the model's forward otherwise)."""
        if self.fixed_decode:
            from .decode_step import DecodeStep

            return DecodeStep(self.model, cache)
        return lambda token: self.model(torch.tensor([token], device=self.device), cache)

    @torch.inference_mode()
    def logits(self, ids: Sequence[int] | torch.Tensor) -> torch.Tensor:
        """float32 [len(ids), vocab] for a fresh sequence: no cache reuse, no sampling."""
        ids = torch.as_tensor(list(ids) if not isinstance(ids, torch.Tensor) else ids, dtype=torch.int64)
        self._check_ids(ids.tolist())
        cache = self.new_cache(len(ids))
        return self.model(ids.to(self.device), cache).float().cpu()

    def generate(self, prompt: str | Sequence[int], params: SamplingParams | None = None) -> Iterator[Event]:
        """Stream events for a prompt (text, encoded with the tokenizer's BOS handling, or ids)."""
        t0 = time.perf_counter()
        if isinstance(prompt, str):
            ids, in_reasoning = self.tokenizer.encode(prompt), starts_in_reasoning(prompt)
        else:
            ids, in_reasoning = list(prompt), False
        return self._stream(ids, params or SamplingParams(), in_reasoning, t0)

    def chat(self, messages: list[dict], params: SamplingParams | None = None, **template_kwargs) -> Iterator[Event]:
        """Stream the assistant's reply to `messages` ([{'role': ..., 'content': ...}]) via the chat template."""
        t0 = time.perf_counter()
        text = self.tokenizer.apply_chat_template(messages, add_generation_prompt=True, **template_kwargs)
        ids = self.tokenizer.encode(text, add_special_tokens=False)
        return self._stream(ids, params or SamplingParams(), starts_in_reasoning(text), t0)

    def fit_chat(self, messages: list[dict], reserve: int, dropped: int = 0,
                 **template_kwargs) -> tuple[list[dict], int]:
        """`messages` without as many of their oldest messages after the leading system ones as it takes for
        the templated prompt and `reserve` tokens of reply (at most half the context) to fit the context, and
        that count: `dropped` (the last call's count, so that the prompt's start, and the kept cache with it,
        stays put) while that fits; else more, until the prompt takes at most half the context (llama.cpp's
        context shift also drops half), so the turns after it reuse the cache again. The last message always
        stays, and what is kept starts with a user message."""
        head = 0
        while head < len(messages) and messages[head].get("role") == "system":
            head += 1
        body, ctx = messages[head:], self.max_context

        def kept(k: int) -> list[dict]:
            return messages[:head] + body[k:]

        def prompt_tokens(k: int) -> int:
            return len(self.tokenizer.apply_chat_template(kept(k), tokenize=True, **template_kwargs))

        k = min(max(dropped, 0), max(len(body) - 1, 0))
        if prompt_tokens(k) + min(reserve, ctx // 2) <= ctx:
            return kept(k), k
        while k < len(body) - 1:
            k += 1
            while k < len(body) - 1 and body[k].get("role") != "user":
                k += 1
            if prompt_tokens(k) <= ctx // 2:
                break
        return kept(k), k

    def _check_ids(self, ids: list[int]) -> None:
        if not ids:
            raise ValueError("the prompt is empty: nothing to run")
        bad = [i for i in ids if not 0 <= i < self.config.vocab_size]
        if bad:
            raise ValueError(f"token id {bad[0]} is outside the vocabulary (0..{self.config.vocab_size - 1})")
        if len(ids) >= self.max_context:
            raise ValueError(f"the prompt has {len(ids)} tokens but the model's context is {self.max_context}")

    def reset(self) -> None:
        """Let go of the kept cache: the next call starts from an empty one."""
        self._kept = None

    def kept_cache(self, ids: Sequence[int], capacity: int) -> KVCache:
        """A cache for a sequence that starts with `ids`, room for `capacity` positions: the last call's, its
        length cut to the longest prefix it shares with ids (one token at least left to run), when they share
        one; else a new one (the old one let go first)."""
        kept, self._kept = self._kept, None
        if kept is not None:
            cache, held = kept
            n = 0
            for a, b in zip(held, ids[:len(ids) - 1]):
                if a != b:
                    break
                n += 1
            if n:
                cache.length = n
                cache.reserve(capacity)
                return cache
            del cache, kept
        return self.new_cache(capacity)

    def _stream(self, ids: list[int], params: SamplingParams, in_reasoning: bool, t0: float) -> Iterator[Event]:
        self._check_ids(ids)
        cache = self.kept_cache(ids, self.ctx or min(len(ids) + params.max_tokens + 1, self.max_context))
        tokens = list(ids)
        try:
            yield from self._run(cache, ids, tokens, params, in_reasoning, t0)
        finally:  # what the cache holds now, for the next call (also when the caller stopped early)
            self._kept = (cache, tokens[:cache.length])

    def _run(self, cache, ids: list[int], tokens: list[int], params: SamplingParams, in_reasoning: bool,
             t0: float) -> Iterator[Event]:
        cached = cache.length
        decoder = StreamDecoder(self.tokenizer, skip_special_tokens=True)  # as llama.cpp prints them
        text = TextStream(params.stop, in_reasoning)
        n, stats, finish = 0, Stats(prompt_tokens=len(ids), cached_tokens=cached), "length"
        for step in generate_tokens(self.model, cache, ids, params, self.eos_ids, self.max_context,
                                    prefill_chunk=self.prefill_chunk, step=self.decoder(cache)):
            n += 1
            tokens.append(step.token_id)
            ttft = stats.ttft_seconds or (time.perf_counter() - t0)
            stats = Stats(len(ids), n, step.prompt_seconds, step.decode_seconds, ttft, cached)
            if step.token_id in self.eos_ids and not params.ignore_eos:
                finish = "eos"
                break
            pieces = text.push(decoder.push(step.token_id))
            if not pieces:
                yield Event("token", token_id=step.token_id, reasoning=text.reasoning, stats=stats)
            for k, (delta, reasoning) in enumerate(pieces):
                yield Event("token", delta, step.token_id if k == 0 else None, reasoning, stats=stats)
            if text.stopped:
                finish = "stop"
                break
        else:
            if cache.length >= self.max_context and n < params.max_tokens:
                finish = "context"
        if not text.stopped:
            for delta, reasoning in text.push(decoder.flush()) + text.flush():
                yield Event("token", delta, None, reasoning, stats=stats)
        yield Event("done", finish_reason=finish, stats=stats)


def _without_gc(fn):
    """Python's cyclic garbage collector paused while `fn` runs (then as it was). A load builds a few hundred
    thousand long-lived objects (the vocabulary's token lists, the modules), and the collections they
    triggered scanned them again and again: 0.6-0.8 s of a 3.7-3.9 s load of the 8-layer Qwen3 synthetic (3.0-
    3.1 s without), 0.23 -> 0.17 s for the demo model. What a load leaves as garbage is collected later."""
    @functools.wraps(fn)
    def wrapper(*args, **kwargs):
        was = gc.isenabled()
        gc.disable()
        try:
            return fn(*args, **kwargs)
        finally:
            if was:
                gc.enable()
    return wrapper


@_without_gc
def load(path: str | os.PathLike | None = None, device: str = "auto", threads: int | None = None,
         dtype: str | torch.dtype | None = "auto", kv_cache_dtype: str | torch.dtype | None = None,
         engine: bool = True, progress=None, hybrid: bool | None = None, gpu_experts: int = 0,
         routing=None, ctx: int | None = None, chunk: int = 512, cuda_graph: bool = False,
         quant: str | None = None) -> Runner:
    """Load a model: a GGUF file (`deepseek2`, `qwen3moe`; split files by their first part) or an HF
    directory (safetensors; BF16/FP16/FP32/FP8). None = the bundled demo model.

    dtype: compute dtype ('auto' = the checkpoint's, float32 for GGUF). kv_cache_dtype: the attention
    cache's dtype (None = the compute dtype; 'float16' halves it, and is llama.cpp's default).
    engine: on the CPU, compute the linear layers and experts with the C++ engine: a GGUF's straight from
    the quantized blocks, an HF directory's in their stored precision (FP8 as BF16) (False: dequantize them
    and run everything in torch).
    progress(done, total): called as the tensors load.
    hybrid: routed experts on the CPU engine, the rest in torch on `device`, overlapped; the default on a
    CUDA device (hybrid=False there: the whole model on the device).
    gpu_experts / routing (local.routing.RoutingStats): keep each MoE layer's N busiest routed experts on
    the device too.
    ctx: context length; the latent KV cache is preallocated for it (default: the model's maximum,
    allocated as a conversation needs it). chunk: prompt tokens per prefill pass.
    cuda_graph: decode steps replay a CUDA graph (a CUDA device; attention then spans the whole cache of
    each conversation, so keep ctx to what it needs).
    quant: an HF directory's weights quantized as they load, with a `tandem convert` recipe (q4_k_m, q8_0,
    ...): the file that convert would write, in memory (the same logits), rebuilt at every load."""
    if ctx is not None and ctx < 2:
        raise ValueError(f"--ctx {ctx} is too small")
    if chunk < 1:
        raise ValueError(f"--chunk {chunk} must be at least 1")
    if path is None:
        from .demo import demo_model_path
        path = demo_model_path()
    path = Path(path)
    if not path.exists():
        raise FileNotFoundError(f"no model at {path}")
    from offload.engine import default_threads

    if threads is not None and threads < 0:
        raise ValueError(f"threads must be at least 1 (0 or none: the {default_threads()} physical cores this "
                         f"process may use), got {threads}")
    threads = threads or default_threads()
    torch.set_num_threads(threads)
    dev = resolve_device(device)
    if cuda_graph and dev.type != "cuda":
        raise ValueError(f"--cuda-graph needs a CUDA device, and this run is on {dev}; leave it out on the CPU")
    cache_dtype = None if kv_cache_dtype in (None, "auto") else resolve_dtype(kv_cache_dtype, dev)
    if quant is not None:
        from quant.recipes import RECIPES

        if quant not in RECIPES:
            raise ValueError(f"--quant {quant} is not one of {', '.join(RECIPES)}")
        if not path.is_dir():
            raise ValueError(f"--quant quantizes an HF directory as it loads; {path.name} is not one (a GGUF file "
                             f"keeps its types: tandem convert {path.name} -o OUT.gguf --quant {quant} requantizes it)")
        if not hf_on_engine(dev, engine, hybrid):
            raise ValueError("--quant needs the CPU engine, which computes the quantized weights; this load puts "
                             "the model in torch (engine=False or hybrid=False)")
    if path.is_file() and path.suffix == ".gguf":
        from .gguf_loader import load_gguf
        from .gguf_tokenizer import tokenizer_from_gguf

        config, model, gguf = load_gguf(path, resolve_dtype(dtype, dev), dev, engine=engine, threads=threads,
                                       progress=progress, hybrid=hybrid, gpu_experts=gpu_experts,
                                       routing=routing, context=ctx or 4096)
        tokenizer = tokenizer_from_gguf(gguf.kv, str(path))
        extra = [gguf.kv.get(f"tokenizer.ggml.{k}_token_id") for k in ("eos", "eot", "eom")]
        return _configure(Runner(path, config, model, tokenizer, dev, threads,
                                 eos_token_ids(path, config, tokenizer, extra), cache_dtype), ctx, chunk, cuda_graph)
    if not path.is_dir():
        raise ValueError(f"{path} is neither a .gguf file nor a model directory "
                         "(config.json + *.safetensors + tokenizer files)")
    if hf_on_engine(dev, engine, hybrid):
        # the engine runs the checkpoint's tensors as a BF16 / F16 / F32 GGUF's (quant.hf_gguf): 2.5-3.7x
        # torch's decode speed on the CPU
        from .gguf_loader import load_hf_blocks

        config, model, _ = load_hf_blocks(path, resolve_dtype(dtype, dev), dev, threads=threads, progress=progress,
                                          hybrid=hybrid, gpu_experts=gpu_experts, routing=routing,
                                          context=ctx or 4096, quant=quant)
    else:
        config, model = load_hf(path, resolve_dtype(dtype, dev), dev, progress=progress)
    tokenizer = Tokenizer.from_pretrained(path)
    return _configure(Runner(path, config, model, tokenizer, dev, threads, eos_token_ids(path, config, tokenizer),
                             cache_dtype), ctx, chunk, cuda_graph)


def hf_on_engine(device: torch.device, engine: bool, hybrid: bool | None) -> bool:
    """Whether an HF directory loads onto the CPU engine (as a GGUF of its float tensors): on the CPU unless
    engine=False; on a GPU as a GGUF file does, hybrid (its routed experts on the engine) unless hybrid=False
    (then whole on the GPU, in torch)."""
    if not engine:
        return False
    return device.type == "cpu" or hybrid is not False


def _configure(runner: Runner, ctx: int | None, chunk: int, cuda_graph: bool) -> Runner:
    if ctx is not None:
        runner.ctx = runner.max_context = min(ctx, runner.config.max_position_embeddings)
    runner.prefill_chunk = chunk
    runner.fixed_decode = cuda_graph
    return runner
