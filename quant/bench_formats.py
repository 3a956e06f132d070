"""Throughput of quant.formats on a matrix: `python -m quant.bench_formats [--rows 4096] [--cols 4096]`.

Prints million weights per second for quantize and dequantize of each type (single thread, numpy).
"""

from __future__ import annotations

import argparse
import time

import numpy as np

from .formats import ACTIVATION_TYPES, SUPPORTED, dequantize, quantize


def _best_of(fn, repeat: int) -> float:
    best = float("inf")
    for _ in range(repeat):
        t0 = time.perf_counter()
        fn()
        best = min(best, time.perf_counter() - t0)
    return best


def main(argv: list[str] | None = None) -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--rows", type=int, default=4096)
    ap.add_argument("--cols", type=int, default=4096)
    ap.add_argument("--repeat", type=int, default=1, help="runs per measurement (best is reported)")
    ap.add_argument("--types", default="", help="comma-separated type names (default: all)")
    args = ap.parse_args(argv)

    types = SUPPORTED + ACTIVATION_TYPES
    if args.types:
        wanted = {t.strip().upper() for t in args.types.split(",")}
        types = tuple(t for t in types if t.name in wanted)
    w = (np.random.default_rng(0).standard_normal((args.rows, args.cols)) * 0.02).astype(np.float32)
    n = w.size
    print(f"{args.rows}x{args.cols} float32 ({n / 1e6:.1f} M weights), numpy {np.__version__}")
    print(f"{'type':6} {'quantize M/s':>13} {'dequantize M/s':>15} {'rel. RMSE':>10}")
    for t in types:
        if t.name == "F32":
            continue          # a no-op
        q = quantize(w, t)
        tq = _best_of(lambda: quantize(w, t), args.repeat)
        td = _best_of(lambda: dequantize(q, t), args.repeat)
        d = dequantize(q, t)
        rmse = float(np.sqrt(np.mean((d - w) ** 2)) / np.sqrt(np.mean(w ** 2)))
        print(f"{t.name:6} {n / tq / 1e6:13.1f} {n / td / 1e6:15.1f} {rmse:10.2e}", flush=True)


if __name__ == "__main__":
    main()
