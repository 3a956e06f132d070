"""offload: where each tensor lives and who computes it; the CPU engine (C++ extension)."""

from __future__ import annotations

import numpy as np

try:
    from . import _C
except ImportError as e:
    if str(e).startswith("TANDEM_"):  # it loaded, and refused an environment variable's value: say which
        raise
    raise ImportError(  # pragma: no cover - only on a broken install
        "Tandem's C++ extension offload._C is not built. Reinstall the package "
        "(`make setup`, or `pip install --no-build-isolation -e .`) so CMake builds it."
    ) from e


def cpu_features() -> dict[str, bool]:
    """Instruction-set extensions this CPU (and OS) can execute, e.g. {'avx2': True, 'avx512_vnni': True}."""
    return dict(_C.cpu_features())


ISAS = ("scalar", "avx2", "avx_vnni", "avx512", "avx512_vnni", "avx512_amx")


def best_isa() -> str:
    """The SIMD level the kernels run at here: 'scalar', 'avx2', 'avx_vnni' (AVX2 + AVX-VNNI), 'avx512',
    'avx512_vnni' or 'avx512_amx' (the highest this CPU has, capped by the TANDEM_ISA environment variable).
    The levels are in this order, but an AVX-512 CPU may lack avx_vnni."""
    return _C.isa()


def supported_isas() -> list[str]:
    """Every SIMD level this CPU can run, lowest first (tests run each)."""
    return [isa for isa in ISAS if _C.isa_supported(isa)]


def stream_prefetch() -> str:
    """Which cache the decode kernels prefetch the streamed weights into: 'l2' on AMD CPUs (on Zen 4 decode
    ran 1.1-1.4x faster than with 'l1'), 'l1' elsewhere. The TANDEM_PREFETCH environment variable (l1 | l2 |
    auto), read when the extension loads, overrides it."""
    return _C.stream_prefetch()


def quantize(data, qtype, threads: int | None = None, *, isa: str = "auto"):
    """float32 C-contiguous [..., n] -> uint8 [..., row_bytes]: the engine's quantizer, the same shape and
    bytes as `quant.formats.quantize` (llama.cpp's block layouts). qtype: a name ("Q4_K", "q8_0"), a ggml
    type id or a gguf.GGMLQuantizationType, one of Q4_0 Q4_1 Q5_0 Q5_1 Q8_0 Q4_K Q5_K Q6_K (Q8_K for
    activations). threads: threads to split the blocks over (None: every hardware thread). isa: cap the
    SIMD variant ("scalar", "avx2", "avx512"; "auto" = best_isa()). The GIL is released meanwhile."""
    if isinstance(qtype, str):
        ids = _C.quant_types()
        if qtype.upper() not in ids:
            raise ValueError(f"unknown quantization type {qtype!r}: the engine quantizes to {', '.join(sorted(ids))}")
        qtype = ids[qtype.upper()]
    if threads is not None and (isinstance(threads, bool) or int(threads) != threads or threads < 1):
        raise ValueError(f"threads must be a positive int or None (every hardware thread), got {threads!r}")
    if not hasattr(data, "__dlpack__"):   # lists, numpy scalars: numpy's dtype rules, then the checks below
        data = np.asarray(data)
    return _C.quantize(data, int(qtype), 0 if threads is None else int(threads), isa)


__all__ = ["cpu_features", "best_isa", "supported_isas", "stream_prefetch", "quantize", "ISAS"]
