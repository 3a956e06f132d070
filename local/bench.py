"""`tandem bench`: llama-bench-style throughput rows (pp512, tg128) for a model, optionally against
llama.cpp on the same GGUF file in the same run.

pp: one prompt of p random tokens, prefilled in chunks from an empty cache. tg: n single-token decode
steps from an empty cache. With -d (llama-bench's --n-depth) both start after d tokens already in the
context instead, prefilled untimed before each run: what attention costs deep into a conversation.
Both exclude tokenization and sampling (no logits are read back), and each runs once as a warm-up
before the r timed repetitions. With --compare llama.cpp the peer runs each
repetition right after ours (same threads, same file, same token ids), so both see the same moment of
this shared machine.
"""

from __future__ import annotations

import json
import math
import resource
import statistics
import sys
import time
from collections import defaultdict
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import torch


@dataclass
class Row:
    test: str
    tps: list[float] = field(default_factory=list)
    peer_tps: list[float] = field(default_factory=list)

    @staticmethod
    def _mean_std(v):
        if not v:
            return None, None
        return statistics.fmean(v), (statistics.stdev(v) if len(v) > 1 else 0.0)

    def to_json(self) -> dict:
        mean, std = self._mean_std(self.tps)
        out = {"test": self.test, "tps_mean": mean, "tps_std": std, "tps": self.tps}
        if self.peer_tps:
            pm, ps = self._mean_std(self.peer_tps)
            out.update(llama_cpp_tps_mean=pm, llama_cpp_tps_std=ps, llama_cpp_tps=self.peer_tps,
                       ratio=mean / pm if pm else None)
        return out


# ---------------------------------------------------------------- what a token reads

def active_bytes_per_token(g) -> int:
    """Weight bytes one decode step reads from a GGUF (a quant.gguf_file.GGUFModel): all tensors but the
    token embedding (one row) and the routed experts (top-k of E)."""
    arch = g.architecture
    n_expert = int(g.kv.get(f"{arch}.expert_count", 0) or 0)
    k = int(g.kv.get(f"{arch}.expert_used_count", 0) or 0)
    total = 0
    for name, t in g.tensors.items():
        if name.startswith("token_embd"):
            total += t.nbytes // max(t.shape[0], 1)
        elif "_exps." in name and n_expert:
            total += t.nbytes * k // n_expert
        else:
            total += t.nbytes
    return total


# ---------------------------------------------------------------- Tandem

# what the model code calls the CPU engine through (offload.torch_ops): the time inside them is the engine's
ENGINE_CALLS = ("run_linear", "run_linear_batched", "run_mla_attention", "run_mla_forward", "run_gqa_forward",
                "run_moe", "run_moe_layer", "run_decoder_stack", "submit_moe", "wait_moe")


class TandemTarget:
    name = "tandem"

    def __init__(self, runner, chunk: int):
        self.runner, self.model, self.chunk = runner, runner.model, chunk
        self.device = runner.device
        self.filling = False  # the untimed context: stage_breakdown's hooks leave it out

    def _prompt(self, cache, ids) -> None:
        for i in range(0, len(ids), self.chunk):
            self.model(torch.tensor(ids[i:i + self.chunk], device=self.device), cache, last_only=True)

    @torch.inference_mode()
    def fill(self, cache, context) -> None:
        """The untimed tokens already in the context (-d)."""
        self.filling = True
        try:
            self._prompt(cache, context)
        finally:
            self.filling = False

    def _cache(self, context, n: int):
        """A new cache with room for n more tokens after `context`, which it holds."""
        cache = self.runner.new_cache(len(context) + n + 1)
        self.fill(cache, context)
        self._sync()
        return cache

    @torch.inference_mode()
    def prefill(self, ids: list[int], context=()) -> float:
        cache = self._cache(context, len(ids))
        t0 = time.perf_counter()
        self._prompt(cache, ids)
        self._sync()
        return time.perf_counter() - t0

    @torch.inference_mode()
    def decode(self, ids: list[int], context=()) -> float:
        cache = self._cache(context, len(ids))
        if self.runner.fixed_decode:  # --cuda-graph: the runner's replayed step, captured before the clock
            step = self.runner.decoder(cache)
            step(ids[0])
            cache.length = len(context)
            t0 = time.perf_counter()
            for i in ids:
                step(i)
            self._sync()
            return time.perf_counter() - t0
        tokens = [torch.tensor([i], device=self.device) for i in ids]
        t0 = time.perf_counter()
        for tok in tokens:
            self.model(tok, cache, last_only=True)
        self._sync()
        return time.perf_counter() - t0

    def _sync(self):
        if self.device.type == "cuda":
            torch.cuda.synchronize()

    @torch.inference_mode()
    def stage_breakdown(self, ids: list[int], context=()) -> dict[str, float]:
        """Mean microseconds per decode step by stage, from module hooks over len(ids) steps (after
        `context`)."""
        spent: dict[str, float] = defaultdict(float)
        starts: dict[int, float] = {}
        handles = []

        def track(module, stage):
            def pre(m, args):
                if self.filling:
                    return
                self._sync()
                starts[id(m)] = time.perf_counter()

            def post(m, args, out):
                if self.filling:
                    return
                self._sync()
                spent[stage] += time.perf_counter() - starts.pop(id(m))
            handles.append(module.register_forward_pre_hook(pre))
            handles.append(module.register_forward_hook(post))

        for layer in self.model.model.layers:
            track(layer.self_attn, "attention")
            mlp = layer.mlp
            if hasattr(mlp, "gate"):
                track(mlp.gate, "router")
                track(mlp, "moe")
                if hasattr(mlp, "shared_experts") and mlp.engine is None:
                    track(mlp.shared_experts, "shared experts")
            else:
                track(mlp, "dense mlp")
        track(self.model.lm_head, "lm_head")
        try:
            total = self.decode(ids, context)
        finally:
            for h in handles:
                h.remove()
        # the MoE hook spans the router and (on the torch path) the shared experts: keep them apart
        spent["experts"] = spent.pop("moe", 0.0) - spent.get("router", 0.0) - spent.get("shared experts", 0.0)
        fused = any(getattr(layer.mlp, "engine", None) for layer in self.model.model.layers)
        if "shared experts" not in spent and fused:
            spent["shared experts"] = float("nan")  # fused into the experts call
        if any(getattr(layer.mlp, "engine_layer", None) is not None for layer in self.model.model.layers):
            spent["router"] = float("nan")  # so is the router: one engine call per MoE layer
        spent["other"] = total - sum(v for v in spent.values() if not math.isnan(v))
        n = len(ids)
        out = {k: v / n * 1e6 for k, v in spent.items()}
        # a second pass split the other way: time inside the CPU engine's calls, and the rest (torch ops
        # and Python: the per-step overhead that is not weight reading)
        engine_s, total = self._engine_time(ids, context)
        if engine_s:
            out["engine calls (all stages)"] = engine_s / n * 1e6
            out["torch + Python outside the engine"] = (total - engine_s) / n * 1e6
        return out

    def _engine_time(self, ids: list[int], context=()) -> tuple[float, float]:
        try:
            from offload import torch_ops
        except ImportError:
            return 0.0, 0.0
        spent = [0.0]
        originals = {name: getattr(torch_ops, name) for name in ENGINE_CALLS}

        def timed(f):
            def call(*args, **kwargs):
                if self.filling:
                    return f(*args, **kwargs)
                t0 = time.perf_counter()
                try:
                    return f(*args, **kwargs)
                finally:
                    spent[0] += time.perf_counter() - t0
            return call

        from offload import overlap  # the hybrid path's own references to submit/wait

        patched = [(torch_ops, name, f) for name, f in originals.items()]
        patched += [(overlap, name, getattr(overlap, name)) for name in ("submit_moe", "wait_moe")]
        for module, name, f in patched:
            setattr(module, name, timed(f))
        try:
            total = self.decode(ids, context)
        finally:
            for module, name, f in patched:
                setattr(module, name, f)
        return spent[0], total


# ---------------------------------------------------------------- llama.cpp

# the attention cache's dtype -> llama.cpp's cache type (ggml_type: F32, F16, BF16), for its K and V alike
LLAMA_CACHE_TYPES = {torch.float32: 0, torch.float16: 1, torch.bfloat16: 30}


class LlamaCppTarget:
    name = "llama.cpp"

    def __init__(self, path: Path, threads: int, n_ctx: int, n_batch: int, cache_type: int | None = None):
        from .llama_cpp_peer import open_llama

        types = {} if cache_type is None else {"type_k": cache_type, "type_v": cache_type}
        self.llm = open_llama(path, n_threads=threads, n_threads_batch=threads, n_ctx=n_ctx, n_batch=n_batch,
                              n_ubatch=n_batch, **types)
        import llama_cpp

        self.lib = llama_cpp
        self.ctx = self.llm._ctx.ctx
        self.n_batch = n_batch

    def _clear(self):
        self.lib.llama_memory_clear(self.lib.llama_get_memory(self.ctx), True)

    def _decode(self, ids: list[int]) -> None:
        arr = (self.lib.llama_token * len(ids))(*ids)
        rc = self.lib.llama_decode(self.ctx, self.lib.llama_batch_get_one(arr, len(ids)))
        if rc != 0:
            raise RuntimeError(f"llama_decode returned {rc}")

    def _prompt(self, ids) -> None:
        for i in range(0, len(ids), self.n_batch):
            self._decode(ids[i:i + self.n_batch])
        self.lib.llama_synchronize(self.ctx)

    def fill(self, context) -> None:
        """An empty context, then the untimed tokens already in it (-d)."""
        self._clear()
        self._prompt(context)

    def prefill(self, ids: list[int], context=()) -> float:
        self.fill(context)
        t0 = time.perf_counter()
        self._prompt(ids)
        return time.perf_counter() - t0

    def decode(self, ids: list[int], context=()) -> float:
        self.fill(context)
        t0 = time.perf_counter()
        for i in ids:
            self._decode([i])
        self.lib.llama_synchronize(self.ctx)
        return time.perf_counter() - t0


# ---------------------------------------------------------------- the run

def run_bench(model, p: int = 512, n: int = 128, r: int = 5, threads: int | None = None, device: str = "cpu",
              compare: str | None = None, chunk: int = 512, log=None, cuda_graph: bool = False, depth: int = 0,
              kv_cache_dtype: str | None = None, quant: str | None = None, progress=None) -> dict:
    """Rows pp{p} and tg{n} (+ the peer's; "pp{p} @ d{depth}" after `depth` tokens of context), measured
    read bandwidth, achieved bandwidth, RSS, and a per-stage breakdown of one decode step. `quant`,
    `progress`: the load's (local.load).
    kv_cache_dtype: the attention cache's dtype for both engines (None: each its own default, the compute
    dtype here and f16 in llama.cpp)."""
    from offload import _C
    from offload.engine import default_threads

    from . import load
    from .runner import resolve_dtype

    log = log or (lambda msg: print(msg, file=sys.stderr, flush=True))
    path = Path(model)
    threads = threads or default_threads()
    if compare not in (None, "llama.cpp"):
        raise ValueError(f"--compare {compare}: only llama.cpp is supported")
    if compare and path.suffix != ".gguf":
        raise ValueError("--compare llama.cpp needs a GGUF file (llama.cpp reads no other format)")
    if p < 1 or n < 1 or r < 1 or depth < 0:
        raise ValueError("-p, -n and -r must be at least 1, and -d at least 0")

    cache_dtype = None  # each engine's default
    if kv_cache_dtype not in (None, "auto"):
        try:  # load()'s own names and aliases (a named dtype does not depend on the device)
            cache_dtype = resolve_dtype(kv_cache_dtype, torch.device("cpu"))
        except ValueError as e:
            raise ValueError(f"--kv-cache-dtype {kv_cache_dtype}: {e}") from None

    log(f"loading {path.name} ({threads} threads)")
    runner = load(path, device=device, threads=threads, cuda_graph=cuda_graph, kv_cache_dtype=cache_dtype,
                  quant=quant, progress=progress)
    cache = str(runner.new_cache(1).dtype).removeprefix("torch.")  # what the runs below attend over
    vocab = runner.config.vocab_size
    rng = np.random.default_rng(1234)
    prompt = rng.integers(2, vocab, size=p).tolist()
    gen = rng.integers(2, vocab, size=n).tolist()
    context = rng.integers(2, vocab, size=depth).tolist()
    targets = [TandemTarget(runner, chunk)]
    if depth + max(p, n) >= runner.max_context:
        raise ValueError(f"-d {depth} + -p {p} / -n {n} exceeds the model's context ({runner.max_context})")

    probe = _C.Engine(threads)
    reads = [probe.read_bandwidth(1 << 29, 3)]  # measured again after every repetition: it swings
    log(f"measured read bandwidth: {reads[0]:.1f} GB/s")

    # Tandem alone first: its memory figures, then warm-ups
    targets[0].prefill(prompt[: min(p, 32)])
    rss_tandem = _rss()
    if compare:
        log("loading llama.cpp (llama-cpp-python) on the same file")
        targets.append(LlamaCppTarget(path, threads, n_ctx=depth + max(p, n) + 16,
                                      n_batch=min(chunk, max(p, depth, 1)),
                                      cache_type=LLAMA_CACHE_TYPES[cache_dtype] if cache_dtype else None))
    at = f" @ d{depth}" if depth else ""  # llama-bench's names
    rows = {"pp": Row(f"pp{p}{at}"), "tg": Row(f"tg{n}{at}")}
    if depth:
        log(f"each test starts after {depth} tokens of context (prefilled untimed)")
    for t in targets:
        t.prefill(prompt, context)
        t.decode(gen[: min(n, 16)], context)
    for rep in range(r):
        for t in targets:
            time.sleep(0.02)  # let the other side's spinning workers go to sleep
            secs = t.prefill(prompt, context)
            (rows["pp"].tps if t.name == "tandem" else rows["pp"].peer_tps).append(p / secs)
        for t in targets:
            time.sleep(0.02)
            secs = t.decode(gen, context)
            (rows["tg"].tps if t.name == "tandem" else rows["tg"].peer_tps).append(n / secs)
        time.sleep(0.02)
        reads.append(probe.read_bandwidth(1 << 29, 3))
        log(f"rep {rep + 1}/{r}: " + ", ".join(
            f"{row.test} {row.tps[-1]:.1f}" + (f" (llama.cpp {row.peer_tps[-1]:.1f})" if row.peer_tps else "")
            for row in rows.values()) + f" tok/s, read {reads[-1]:.1f} GB/s")
    read_gbs = statistics.median(reads)

    breakdown = targets[0].stage_breakdown(gen[: min(n, 32)], context)
    out = [rows["pp"].to_json(), rows["tg"].to_json()]
    gguf = getattr(runner.model, "checkpoint", None)  # the loaded file, already parsed (an HF directory: as one)
    active = active_bytes_per_token(gguf) if hasattr(gguf, "tensors") else None
    tg = out[1]
    tg["read_gbs"] = read_gbs
    tg["read_gbs_samples"] = reads
    if active:
        tg["active_bytes_per_token"] = active
        tg["achieved_gbs"] = active * tg["tps_mean"] / 1e9
        tg["bandwidth_pct"] = 100 * tg["achieved_gbs"] / read_gbs
        if tg.get("llama_cpp_tps_mean"):
            tg["llama_cpp_bandwidth_pct"] = 100 * active * tg["llama_cpp_tps_mean"] / 1e9 / read_gbs
    tg["decode_step_us"] = breakdown
    for row in out:
        row.update(model=str(path), threads=threads, device=str(runner.device), depth=depth, rss_bytes=rss_tandem,
                   peak_rss_bytes=_peak_rss(), kv_cache=cache)
        if compare:
            row["llama_cpp_kv_cache"] = str(cache_dtype or torch.float16).removeprefix("torch.")
    return {"rows": out}


def _rss() -> int:
    import psutil

    return psutil.Process().memory_info().rss


def _peak_rss() -> int:
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024


def render(result: dict) -> str:
    rows = result["rows"]
    peer = any("llama_cpp_tps_mean" in r for r in rows)
    cols = [("model", 28, "<"), ("threads", 7, ">"), ("test", max(6, *(len(r["test"]) for r in rows)), ">"),
            ("t/s", 16, ">")]
    if peer:
        cols += [("llama.cpp t/s", 16, ">"), ("ratio", 6, ">")]

    def line(values):
        return "| " + " | ".join(f"{v:{a}{w}}" for v, (_, w, a) in zip(values, cols)) + " |"

    lines = [line([c[0] for c in cols]),
             "|" + "|".join("-" * (w + 2) if a == "<" else "-" * (w + 1) + ":" for _, w, a in cols) + "|"]
    for r in rows:
        values = [Path(r["model"]).name[:28], r["threads"], r["test"], f"{r['tps_mean']:.2f} ± {r['tps_std']:.2f}"]
        if peer:
            values += [f"{r['llama_cpp_tps_mean']:.2f} ± {r['llama_cpp_tps_std']:.2f}", f"{r['ratio']:.2f}x"]
        lines.append(line(values))
    tg = rows[-1]
    lines.append("")
    if "bandwidth_pct" in tg:
        line = (f"decode reads {tg['active_bytes_per_token'] / 1e9:.3f} GB of weights per token: "
                f"{tg['achieved_gbs']:.1f} GB/s = {tg['bandwidth_pct']:.0f}% of the measured "
                f"{tg['read_gbs']:.1f} GB/s")
        if "llama_cpp_bandwidth_pct" in tg:
            line += f" (llama.cpp: {tg['llama_cpp_bandwidth_pct']:.0f}%)"
        lines.append(line)
    lines.append(f"(read bandwidth: the median of {len(tg['read_gbs_samples'])} measurements through the run, "
                 f"{min(tg['read_gbs_samples']):.1f}-{max(tg['read_gbs_samples']):.1f} GB/s)")
    if "kv_cache" in tg:
        peer_cache = f" (llama.cpp: {tg['llama_cpp_kv_cache']})" if "llama_cpp_kv_cache" in tg else ""
        lines.append(f"attention cache: {tg['kv_cache']}{peer_cache}")
    lines.append(f"RSS after load {tg['rss_bytes'] / 2**30:.2f} GiB, peak {tg['peak_rss_bytes'] / 2**30:.2f} GiB "
                 "(peak includes the peer when compared)")
    steps = dict(tg["decode_step_us"])
    split = {k: steps.pop(k) for k in ("engine calls (all stages)", "torch + Python outside the engine") if k in steps}
    total = sum(v for v in steps.values() if not math.isnan(v))
    parts = [f"{k} {v:.0f}" if not math.isnan(v) else f"{k}: in the experts call" for k, v in steps.items()]
    lines.append(f"one decode step, µs (its blocks one by one so that hooks time them): total {total:.0f} = "
                 + ", ".join(parts))
    if split:
        lines.append("the same step split by who runs it, µs: " + ", ".join(f"{k} {v:.0f}" for k, v in split.items()))
    return "\n".join(lines)


def main_json(result: dict) -> str:
    rows = result["rows"]
    clean = [{k: (None if isinstance(v, float) and math.isnan(v) else v) for k, v in r.items()} for r in rows]
    for r in clean:
        if "decode_step_us" in r:
            r["decode_step_us"] = {k: (None if math.isnan(v) else v) for k, v in r["decode_step_us"].items()}
    return json.dumps(clean, indent=2)
