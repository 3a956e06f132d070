"""`python -m offload.bench [--json]`: the CPU engine against the memory roofline and its peers.

Prints, in one run: the machine's read bandwidth; decode GEMV GB/s per weight type on matrices far
larger than the L3 cache (rows of 8192 values, and Q4_K / Q6_K / Q8_0 again with rows of 2048);
microseconds per MoE layer at T=1 and tokens/s at T=128 for a DeepSeek-V2-Lite layer and a
DeepSeek-V3-shaped layer (expert ids drawn at random per call; the calls go to enough copies of the
layer in turn that the working set is 1.5x the L3 cache, and each timed call finds its experts out of
the cache, after a streaming read (`roofline_read_bytes`) and an untimed call of another copy, for every
engine), with the time the routed experts' bytes take at the read bandwidth of the moment (the memory
roofline: those reads' rate); the same layers through torch bf16 and through kt-kernel's CPU MoE (its
best method and thread count) when `kt_kernel` imports. A benchmark, not a test: figures swing with the
shared machine.
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import sys
import time

import numpy as np

from . import _C, best_isa
from .engine import CpuEngine, QuantWeight, default_threads, prepare_weight

BLOCK = {"Q4_0": (32, 18, [0]), "Q5_0": (32, 22, [0]), "Q8_0": (32, 34, [0]), "Q4_1": (32, 20, [0, 2]),
         "Q5_1": (32, 24, [0, 2]), "Q4_K": (256, 144, [0, 2]), "Q5_K": (256, 176, [0, 2]), "Q6_K": (256, 210, [208])}


def random_weight(rng, typ: str, shape: tuple[int, ...]) -> QuantWeight:
    """Valid random blocks of `typ` (small finite f16 scales), shape [..., rows, cols] - built in
    milliseconds, so the benchmark can afford gigabytes of experts."""
    *lead, rows, cols = shape
    if typ in ("F32", "F16", "BF16"):
        dtype = {"F32": np.float32, "F16": np.float16, "BF16": np.uint16}[typ]
        data = (rng.standard_normal(shape, dtype=np.float32) * 0.02).astype(np.float32)
        if typ == "BF16":
            data = (data.view(np.uint32) >> 16).astype(np.uint16)
        return QuantWeight(typ, data.astype(dtype, copy=False), cols)
    bs, ts, halves = BLOCK[typ]
    data = rng.integers(0, 256, (*lead, rows, cols // bs, ts), dtype=np.uint8)
    scale = (rng.random((*lead, rows, cols // bs), dtype=np.float32) * 0.01 + 0.001).astype(np.float16)
    for off in halves:
        data[..., off:off + 2] = scale.view(np.uint8).reshape(*scale.shape, 2)
    return QuantWeight(typ, data.reshape(*lead, rows, -1), cols)


def timed(fn, repeats: int, warmup: int = 2, settle_s: float = 0.0) -> tuple[float, float]:
    """(median, stdev) seconds of fn() over repeats, warm-up excluded: `warmup` calls, and more until
    settle_s seconds went by (just after gigabytes were allocated or freed, the kernel's background
    work - zeroing, huge-page collapsing - slowed the first calls by up to 3x). The median, for every
    engine alike: on this shared machine one call in ~20 takes 1.2-1.5x the others (a V3-shaped layer at
    T=128: 73-86 ms, with calls of 90-115 ms among them)."""
    t_end = time.perf_counter() + settle_s
    for _ in range(warmup):
        fn()
    while time.perf_counter() < t_end:
        fn()
    times = []
    for _ in range(repeats):
        t0 = time.perf_counter()
        fn()
        times.append(time.perf_counter() - t0)
    return statistics.median(times), (statistics.stdev(times) if len(times) > 1 else 0.0)


def bench_gemv(engine: CpuEngine, rng, types, target_bytes: int, cols: int = 8192,
               pairs: int = 24) -> tuple[dict, dict]:
    """GB/s per type (median of `pairs` calls) on rows of `cols` values, and its fraction of a plain
    streaming read of as many bytes on the same threads: the median, over the pairs, of the read's time
    over the GEMV's, each GEMV timed right after its read. The shared machine's bandwidth swings from
    second to second, so only a read of the same moment is a fair roofline: the ratio of two medians
    (10 calls each, in alternating blocks) put a Q5_0 GEMV at 142% of the read in one run."""
    out, fraction = {}, {}
    for typ in types:
        probe = random_weight(rng, typ, (1, cols))
        rows = max(64, target_bytes // probe.data.nbytes)
        w = prepare_weight(random_weight(rng, typ, (rows // 16 * 16, cols)))  # the layout the loader gives it
        x = rng.standard_normal((1, cols), dtype=np.float32)
        y = np.empty((1, w.rows), np.float32)
        buf = np.ones(w.data.nbytes, dtype=np.uint8)
        reads, gemvs = paired(lambda: engine.read_pass(buf), lambda: engine.linear(w, x, y), pairs)
        read = buf.nbytes / statistics.median(reads) / 1e9
        out[typ] = w.data.nbytes / statistics.median(gemvs) / 1e9
        fraction[typ] = statistics.median(r / g for r, g in zip(reads, gemvs))
        print(f"  gemv {w.type:<8} K={cols:<5} {w.data.nbytes / 2**20:5.0f} MiB  {out[typ]:6.1f} GB/s  "
              f"({100 * fraction[typ]:.0f}% of a read of as many bytes just before each call, "
              f"which ran at {read:.1f} GB/s)", file=sys.stderr)
        del buf
    return out, fraction


def paired(first, second, pairs: int) -> tuple[list, list]:
    """Seconds of `pairs` calls of `first` and of `second`, each `second` right after a `first` (the same
    moment), after one untimed pair."""
    first()
    second()
    a, b = [], []
    for _ in range(pairs):
        t0 = time.perf_counter()
        first()
        t1 = time.perf_counter()
        second()
        b.append(time.perf_counter() - t1)
        a.append(t1 - t0)
    return a, b


LAYERS = {
    # DeepSeek-V2-Lite: types as llama.cpp's Q4_K_M gives them on an ordinary layer
    # (ffn_down_exps has 1408-wide rows: Q4_K falls back to Q5_0)
    "deepseek-v2-lite": dict(H=2048, I=1408, E=64, A=6, n_shared=2, gate="Q4_K", down="Q5_0",
                             shared_gate="Q4_K", shared_down="Q4_K"),
    # DeepSeek-V3 shapes, 16 of the 256 experts in RAM (only the 8 selected are read per token: 16 x 3 x
    # 7168 x 2048 weights = 0.4 GB at Q4_K a layer, and copies of it beyond the L3 cache; kt-kernel packs
    # its own copy per method from bf16, so more experts would not fit beside it in 24 GB)
    "deepseek-v3": dict(H=7168, I=2048, E=16, A=8, n_shared=1, gate="Q4_K", down="Q4_K",
                        shared_gate="Q4_K", shared_down="Q4_K", E_model=256),
    # Qwen3-30B-A3B: small experts (768 rows of gate and up, 885 KB each at Q4_K), eight a token, no shared
    # expert; all 128 in RAM (340 MB a layer at Q4_K)
    "qwen3-30b-a3b": dict(H=2048, I=768, E=128, A=8, n_shared=0, gate="Q4_K", down="Q4_K"),
}


def l3_bytes() -> int:
    """The last-level cache's size as Linux reports it (64 MiB when it does not)."""
    try:
        text = open("/sys/devices/system/cpu/cpu0/cache/index3/size").read().strip()
        return int(text[:-1]) * {"K": 1 << 10, "M": 1 << 20, "G": 1 << 30}[text[-1]]
    except (OSError, ValueError, KeyError):
        return 64 << 20


def copies_beyond_l3(layer_bytes: int) -> int:
    """How many copies of a layer the calls cycle through so their working set is 1.5x the L3 cache
    (at least 2): one layer of V2-Lite (0.33 GB) fits a 480 MiB L3, and would be read from the cache."""
    return max(2, -(-3 * l3_bytes() // (2 * layer_bytes)))


def roofline_read_bytes() -> int:
    """Bytes of the read before each timed MoE call, whose rate is the roofline of the moment: 1.5x the L3
    cache, so it evicts the experts, and at least 256 MiB, so it reads at the memory's streaming rate. A
    read of 1.5x the cache alone (48 MiB: Zen 4, 32 MiB of L3) ran at 0.95 of a 1 GiB read whenever the
    memory was fast (55 against 58 GB/s, reads of 128 and 256 MiB at 1.00; each read after one of
    another buffer, ~2300 rounds) and made every MoE row's roofline that much too low; at 33 GB/s every
    size read alike."""
    return max(3 * l3_bytes() // 2, 256 << 20)


def layer_bytes(layer) -> int:
    gate, up, down, shared = layer
    return sum(w.data.nbytes for w in (gate, up, down, *(m for s in shared for m in s)))


def make_layer(rng, spec):
    H, I, E = spec["H"], spec["I"], spec["E"]
    gate, up = random_weight(rng, spec["gate"], (E, I, H)), random_weight(rng, spec["gate"], (E, I, H))
    down = random_weight(rng, spec["down"], (E, H, I))
    si = I * spec["n_shared"]
    shared = [(random_weight(rng, spec["shared_gate"], (si, H)), random_weight(rng, spec["shared_gate"], (si, H)),
               random_weight(rng, spec["shared_down"], (H, si)))] if spec["n_shared"] else []
    # the layouts the loader gives them (row-interleaved where the engine has one)
    return (*(prepare_weight(w) for w in (gate, up, down)), [tuple(prepare_weight(w) for w in s) for s in shared])


def routed_bytes(spec, layer, T: int) -> float:
    """Bytes of routed experts one T-token call reads, on average: each of the E experts' gate, up and
    down once if any token picks it (uniform top-A routes pick a given expert with probability
    1 - (1 - A/E)^T)."""
    gate, up, down, _ = layer
    return (1 - (1 - spec["A"] / spec["E"]) ** T) * (gate.data.nbytes + up.data.nbytes + down.data.nbytes)


def random_route(rng, T: int, E: int, A: int):
    ids = np.stack([rng.choice(E, A, replace=False) for _ in range(T)]).astype(np.int64)
    w = rng.random((T, A), dtype=np.float32)
    return ids, w / w.sum(1, keepdims=True)


def moe_call(engine, rng, spec, layers, T: int, with_shared: bool = True):
    """A no-argument function running one T-token call of the next layer copy in turn (a new random
    route each time)."""
    x = rng.standard_normal((T, spec["H"]), dtype=np.float32)
    out = np.empty_like(x)
    routes = [random_route(rng, T, spec["E"], spec["A"]) for _ in range(8)]
    k = iter(range(10**9))

    def call():
        i = next(k)
        gate, up, down, shared = layers[i % len(layers)]
        ids, w = routes[i % len(routes)]
        engine.moe(x, ids, w, gate, up, down, shared=shared if with_shared else [], out=out)
    return call


def after_reads(call, read, repeats: int, warmup: int, settle_s: float = 1.0, twin=None) -> tuple[list, list, list]:
    """Seconds of `repeats` calls of `call` (each on the next layer copy), each found cold as in decode,
    the seconds of the reads that made them so, and (with `twin`) the seconds of `twin` timed the same
    way in the same rounds, each right after a call (the same moments); warm-up as `timed`. Before each
    timed call, `read()` (a streaming read of `roofline_read_bytes`) evicts every expert, then one untimed
    call (on the copy before) brings back the code and buffers but not the experts the timed call reads.
    At T=1 a call
    reads only the few experts its token picks (31 MB on V2-Lite), and merely cycling through copies of
    the layer left some of them in this machine's 480 MiB L3 cache: V2-Lite's routed experts took
    1012 us that way, 1113-1127 us this way. A read alone, right before the timed call, also evicts the
    code: 1143-1185 us (a cold 64-row GEMV 72 us instead of 21)."""
    timed(call, 1, warmup=warmup, settle_s=settle_s)
    calls, reads, twins = [], [], []
    for _ in range(repeats):
        t0 = time.perf_counter()
        read()
        reads.append(time.perf_counter() - t0)
        call()
        t1 = time.perf_counter()
        call()
        calls.append(time.perf_counter() - t1)
        if twin is not None:
            read()
            twin()
            t2 = time.perf_counter()
            twin()
            twins.append(time.perf_counter() - t2)
    return calls, reads, twins


def same_bytes_reader(engine, nbytes: int):
    """A plain read of `nbytes` for `after_reads`' twin: two buffers of that size read in turn on the
    engine's threads (the untimed read before each timed one reads the other), so it finds its bytes out
    of the cache as a MoE call finds its experts. A T=1 call's own roofline: as many bytes, read as fast
    as this machine reads, at the same moment. A burst of tens of megabytes from a cold start streams
    slower than the long read of `roofline_us` (V2-Lite's 31 MB: 34-35 GB/s against 36-37)."""
    bufs = [np.ones(nbytes, np.uint8) for _ in range(2)]
    turn = iter(range(10**9))
    return lambda: engine.read_pass(bufs[next(turn) % 2])


def one_thread_reader(buf):
    """read() for `after_reads` before a peer's calls: a streaming read of buf on a one-thread engine,
    which runs it on the calling thread and leaves no worker spinning beside the peer."""
    reader = CpuEngine(1)
    return lambda: reader.read_pass(buf)


def bench_moe_engine(engine, rng, spec, layers, T: int, repeats: int, buf, with_shared: bool = True,
                     twin_bytes: int = 0) -> tuple[float, float, float, float | None]:
    """(median, stdev) seconds of a T-token call of the layer (the routed experts alone without
    `with_shared`), each call after a read of `buf` on the engine's own threads; those reads' GB/s: the
    memory roofline of the same moment (the bandwidth swings between about 38 and 71 GB/s from minute to
    minute here; the figure measured at the start of the run is minutes old by then); and with
    `twin_bytes`, the median seconds of a cold plain read of that many bytes timed in the same rounds
    (`same_bytes_reader`), else None."""
    twin = same_bytes_reader(engine, twin_bytes) if twin_bytes else None
    calls, reads, twins = after_reads(moe_call(engine, rng, spec, layers, T, with_shared),
                                      lambda: engine.read_pass(buf), repeats, warmup=len(layers) + 1, twin=twin)
    return (statistics.median(calls), statistics.stdev(calls), buf.nbytes / statistics.median(reads) / 1e9,
            statistics.median(twins) if twins else None)


def bench_moe_torch(rng, spec, T: int, repeats: int, threads: int, read) -> float:
    """The same layer in torch bf16 (weights dequantized to bf16; only the selected experts are read),
    two copies called in turn, so the untimed call before each timed one (`after_reads`) reads the other."""
    import torch

    torch.set_num_threads(threads)
    H, I, E, A = spec["H"], spec["I"], spec["E"], spec["A"]
    si = I * spec["n_shared"]

    def bf16(*shape):
        return torch.randn(*shape, dtype=torch.bfloat16) * 0.02

    copies = [(bf16(E, I, H), bf16(E, I, H), bf16(E, H, I), bf16(si, H), bf16(si, H), bf16(H, si)) for _ in range(2)]
    x = torch.randn(T, H, dtype=torch.bfloat16)
    routes = [random_route(rng, T, E, A) for _ in range(8)]
    k = iter(range(10**9))

    @torch.inference_mode()
    def call():
        i = next(k)
        g, u, d, sg, su, sd = copies[i % 2]
        ids, w = routes[i % len(routes)]
        ids, w = torch.from_numpy(ids), torch.from_numpy(w).to(torch.bfloat16)
        out = torch.zeros_like(x)
        for e in torch.unique(ids).tolist():
            tok, slot = torch.where(ids == e)
            h = torch.nn.functional.silu(x[tok] @ g[e].T) * (x[tok] @ u[e].T)
            out.index_add_(0, tok, (h @ d[e].T) * w[tok, slot, None])
        if spec["n_shared"]:
            out += (torch.nn.functional.silu(x @ sg.T) * (x @ su.T)) @ sd.T
        return out
    return statistics.median(after_reads(call, read, repeats, warmup=2, settle_s=0.0)[0])


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__)
    p.add_argument("--json", action="store_true", help="print one JSON object")
    p.add_argument("--threads", type=int, default=None,
                   help="engine threads (default: the physical cores this process may use)")
    p.add_argument("--gemv-mib", type=int, default=512, help="bytes per GEMV matrix, MiB (default 512)")
    p.add_argument("--repeats", type=int, default=50, help="timed MoE calls at T=1 (default 50)")
    p.add_argument("--no-peers", action="store_true", help="skip torch and kt-kernel")
    p.add_argument("--layer", action="append", choices=list(LAYERS), default=None,
                   help="MoE layers to measure (repeatable; default: all)")
    p.add_argument("--no-gemv", action="store_true", help="skip the GEMV measurements")
    args = p.parse_args(argv)
    if not args.json:
        run(args)
        return 0
    # kt-kernel's native code prints to file descriptor 1: stdout carries the JSON alone
    sys.stdout.flush()
    saved = os.dup(1)
    os.dup2(2, 1)
    try:
        result = run(args)
    finally:
        sys.stdout.flush()
        os.dup2(saved, 1)
        os.close(saved)
    print(json.dumps(result, indent=2))
    return 0


def run(args) -> dict:
    """The measurements, each printed to stderr as it comes; the JSON object's contents."""
    threads = args.threads or default_threads()
    rng = np.random.default_rng(0)
    engine = CpuEngine(threads)
    result = {"threads": threads, "isa": best_isa()}
    result["read_gbs"] = _C.Engine(threads).read_bandwidth()
    print(f"read bandwidth {result['read_gbs']:.1f} GB/s ({threads} threads, {best_isa()})", file=sys.stderr)
    if not args.no_gemv:
        result["gemv"], result["gemv_fraction_of_read"] = bench_gemv(
            engine, rng, ["Q4_0", "Q4_1", "Q5_0", "Q5_1", "Q8_0", "Q4_K", "Q5_K", "Q6_K", "BF16", "F16", "F32"],
            args.gemv_mib << 20)
        # the same at DeepSeek-V2-Lite's hidden size: short rows stream slower (Q4_K ~87% of the read at 2048
        # columns against ~96-100% at 8192), and most of a V2-Lite decode reads rows of 2048 or 1408
        result["gemv_k2048"], result["gemv_k2048_fraction_of_read"] = bench_gemv(
            engine, rng, ["Q4_K", "Q6_K", "Q8_0"], args.gemv_mib << 20, cols=2048)
    result["moe"] = []
    read_buf = np.ones(roofline_read_bytes(), np.uint8)  # read before each timed MoE call
    peer_read = one_thread_reader(read_buf)
    for name, spec in LAYERS.items():
        if args.layer and name not in args.layer:
            continue
        layers = [make_layer(rng, spec)]
        copies = copies_beyond_l3(layer_bytes(layers[0]))
        layers += [make_layer(rng, spec) for _ in range(copies - 1)]
        print(f"  {name}: {copies} copies of the layer ({copies * layer_bytes(layers[0]) / 2**20:.0f} MiB, the L3 "
              f"cache {l3_bytes() / 2**20:.0f} MiB), called in turn", file=sys.stderr)
        timed(moe_call(engine, rng, spec, layers, 8), 1, settle_s=5.0)  # the fresh gigabytes settle
        for T, repeats in ((1, args.repeats), (128, max(10, args.repeats // 5))):
            secs, std, _, _ = bench_moe_engine(engine, rng, spec, layers, T, repeats, read_buf)
            # at T=1 (decode, bound by the memory) also a plain read of as many bytes, in the same rounds
            twin_bytes = int(routed_bytes(spec, layers[0], T)) if T == 1 else 0
            routed, _, read_gbs, twin_s = bench_moe_engine(engine, rng, spec, layers, T, repeats, read_buf,
                                                           with_shared=False, twin_bytes=twin_bytes)
            row = {"layer": name, "T": T, "copies": copies, "us": secs * 1e6, "us_std": std * 1e6, "tokens_per_s": T / secs,
                   "routed_us": routed * 1e6, "routed_tokens_per_s": T / routed, "read_gbs": read_gbs}
            # the memory roofline of the routed experts: their bytes at the rate of the reads between their
            # calls (what decode cannot beat; a T=128 call is bound by compute instead)
            row["routed_bytes"] = routed_bytes(spec, layers[0], T)
            row["roofline_us"] = row["routed_bytes"] / (read_gbs * 1e3)
            row["routed_roofline_fraction"] = row["roofline_us"] / row["routed_us"]
            if twin_s is not None:
                row["same_bytes_read_us"] = twin_s * 1e6
                row["same_bytes_read_fraction"] = twin_s / routed
            if not args.no_peers:
                row["torch_bf16_us"] = bench_moe_torch(rng, spec, T, max(3, repeats // 5), threads, peer_read) * 1e6
                row["torch_bf16_ratio"] = row["torch_bf16_us"] / row["us"]
                from .bench_kt import measure_kt

                # kt-kernel's op runs the routed experts only: compare like with like. Its worker
                # threads spin while its pool lives (a 1-thread pool even when idle), so the two
                # engines cannot be timed in alternation: ours runs before and after it (it runs in a
                # child process), and the mean of the two brackets kt-kernel's time against the
                # drifting bandwidth
                kt = measure_kt(spec, T, threads, copies, repeats)
                if kt is not None:
                    kt_s, method, kt_threads, variant = kt
                    row.update(kt_kernel_us=kt_s * 1e6, kt_kernel_method=method, kt_kernel_threads=kt_threads,
                               kt_kernel_variant=variant)
                    after, _, read_after, twin_after = bench_moe_engine(engine, rng, spec, layers, T, repeats, read_buf,
                                                                        with_shared=False, twin_bytes=twin_bytes)
                    row["routed_us_after"], row["read_gbs_after"] = after * 1e6, read_after
                    if twin_after is not None:
                        # kt-kernel's time in reads of its bytes, at the mean of the reads before and after it
                        row["same_bytes_read_us_after"] = twin_after * 1e6
                        row["kt_kernel_same_bytes_reads"] = kt_s / ((twin_s + twin_after) / 2)
                        # the ratio a call that took just one such read would reach: no engine's decode gets
                        # below it against this kt-kernel run (the T=1 target of 0.25x needs 4 reads or more)
                        row["kt_kernel_ratio_floor"] = 1 / row["kt_kernel_same_bytes_reads"]
                    row["kt_kernel_ratio"] = (routed + after) / 2 / kt_s
                    # its roofline at the mean of the read rates measured just before and after it
                    kt_roofline_us = row["routed_bytes"] / ((read_gbs + read_after) / 2 * 1e3)
                    row["kt_kernel_roofline_fraction"] = kt_roofline_us / row["kt_kernel_us"]
            result["moe"].append(row)
            peers = "".join(f", {k} {v:.0f}" for k, v in row.items()
                            if k.endswith("_us") and k not in ("us", "roofline_us", "same_bytes_read_us"))
            if "kt_kernel_ratio" in row:
                peers += (f", routed {row['routed_us']:.0f}/{row['routed_us_after']:.0f} (before/after) vs kt-kernel "
                          f"{row['kt_kernel_us']:.0f} us = {row['kt_kernel_ratio']:.2f}x ({row['kt_kernel_method']}, "
                          f"{row['kt_kernel_threads']} thr, its {row['kt_kernel_variant']} build)")
            print(f"  moe {name:<17} T={T:<4} {row['us']:9.0f} us  {row['tokens_per_s']:8.1f} tok/s{peers}; the routed "
                  f"experts' {row['routed_bytes'] / 1e6:.1f} MB at the {read_gbs:.1f} GB/s read between their calls "
                  f"take {row['roofline_us']:.0f} us ({100 * row['routed_roofline_fraction']:.0f}% of it reached)"
                  + (f"; a plain cold read of as many bytes takes {row['same_bytes_read_us']:.0f} us "
                     f"({100 * row['same_bytes_read_fraction']:.0f}% of the routed call)"
                     if "same_bytes_read_us" in row else "")
                  + (f", kt-kernel {row['kt_kernel_same_bytes_reads']:.1f} such reads (a call as fast as one "
                     f"would be {row['kt_kernel_ratio_floor']:.2f}x kt-kernel)"
                     if "kt_kernel_same_bytes_reads" in row else ""),
                  file=sys.stderr)
        del layers
    del read_buf, peer_read
    return result


if __name__ == "__main__":
    sys.exit(main())
