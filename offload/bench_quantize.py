"""Quantization throughput: quant.formats (numpy) against the engine's C++ quantizers (offload.quantize).

    python -m offload.bench_quantize [--rows 4096] [--cols 4096] [--types Q4_K,Q8_0] [--threads 1,2]
                                     [--isa auto] [--repeats 3] [--json]

Prints M weights/s per type, mean ± stddev over the repeats (a warm-up call excluded), and checks that
the engine's bytes equal numpy's.
"""

from __future__ import annotations

import argparse
import json
import statistics
import time

import numpy as np

import offload
from quant import formats

TYPES = ("Q8_0", "Q4_0", "Q5_0", "Q4_1", "Q5_1", "Q4_K", "Q5_K", "Q6_K", "Q8_K")


def weights(rows: int, cols: int, seed: int = 0) -> np.ndarray:
    """Weight-like float32 [rows, cols]: gaussian rows with per-row scales, a few outliers."""
    rng = np.random.default_rng(seed)
    x = rng.standard_normal((rows, cols), dtype=np.float32) * np.float32(0.02)
    x *= (10.0 ** rng.uniform(-0.5, 0.5, (rows, 1))).astype(np.float32)
    x[rng.integers(rows, size=rows // 16), rng.integers(cols, size=rows // 16)] *= 20
    return x


def timed(fn, repeats: int, warmup: bool = True) -> tuple[list[float], object]:
    out = fn() if warmup else None
    times = []
    for _ in range(repeats):
        t0 = time.perf_counter()
        out = fn()
        times.append(time.perf_counter() - t0)
    return times, out


def rate(times: list[float], n: int) -> tuple[float, float]:
    r = [n / t / 1e6 for t in times]
    return statistics.mean(r), (statistics.stdev(r) if len(r) > 1 else 0.0)


def main(argv: list[str] | None = None) -> list[dict]:
    p = argparse.ArgumentParser(prog="python -m offload.bench_quantize", description=__doc__.split("\n\n")[0])
    p.add_argument("--rows", type=int, default=4096)
    p.add_argument("--cols", type=int, default=4096)
    p.add_argument("--types", default=",".join(TYPES), help="comma-separated ggml types")
    p.add_argument("--threads", default="1,2", help="comma-separated thread counts for the engine")
    p.add_argument("--isa", default="auto", help="cap the engine's SIMD variant: scalar, avx2, avx512, auto")
    p.add_argument("--repeats", type=int, default=3)
    p.add_argument("--numpy-repeats", type=int, default=1, help="numpy runs per type (no warm-up; it is slow)")
    p.add_argument("--json", action="store_true", help="print the results as JSON instead of a table")
    a = p.parse_args(argv)
    if a.repeats < 1 or a.numpy_repeats < 1:
        p.error("--repeats and --numpy-repeats must be at least 1 (numpy's bytes are what the engine's are checked "
                "against)")
    types = [t.strip().upper() for t in a.types.split(",") if t.strip()]
    threads = [int(t) for t in a.threads.split(",")]
    x = weights(a.rows, a.cols)
    n = x.size

    results = []
    for qtype in types:
        tn, want = timed(lambda: formats.quantize(x, qtype), a.numpy_repeats, warmup=False)
        row = {"type": qtype, "variant": offload._C.quantize_variant(offload._C.quant_types()[qtype], a.isa),
               "rows": a.rows, "cols": a.cols, "numpy_mws": rate(tn, n), "engine_mws": {}, "exact": True}
        for t in threads:
            te, got = timed(lambda: offload.quantize(x, qtype, threads=t, isa=a.isa), a.repeats)
            row["engine_mws"][t] = rate(te, n)
            row["exact"] &= bool(np.array_equal(got, want))
        results.append(row)

    if a.json:
        print(json.dumps(results, indent=1))
        return results
    print(f"{a.rows} x {a.cols} float32 ({n / 1e6:.1f} M weights), best SIMD level {offload.best_isa()}, "
          f"M weights/s, mean ± std over {a.repeats} runs (numpy: {a.numpy_repeats})")
    head = f"{'type':<6} {'variant':<8} {'numpy':>14}" + "".join(f" {f'engine {t}T':>16}" for t in threads)
    print(head + f" {'x numpy':>8} {'exact':>6}")
    for r in results:
        m, s = r["numpy_mws"]
        line = f"{r['type']:<6} {r['variant']:<8} {m:>7.1f} ± {s:<4.1f}"
        for t in threads:
            em, es = r["engine_mws"][t]
            line += f" {em:>8.1f} ± {es:<5.1f}"
        best = max(em for em, _ in r["engine_mws"].values())
        print(line + f" {best / m:>8.1f} {'yes' if r['exact'] else 'NO':>6}")
    return results


if __name__ == "__main__":
    main()
