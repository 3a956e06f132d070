"""offload: where each tensor lives and who computes it; the CPU engine (C++ extension)."""

from __future__ import annotations

try:
    from . import _C
except ImportError as e:  # pragma: no cover - only on a broken install
    raise ImportError(
        "Tandem's C++ extension offload._C is not built. Reinstall the package "
        "(`make setup`, or `pip install --no-build-isolation -e .`) so CMake builds it."
    ) from e


def cpu_features() -> dict[str, bool]:
    """Instruction-set extensions this CPU (and OS) can execute, e.g. {'avx2': True, 'avx512_vnni': True}."""
    return dict(_C.cpu_features())


def best_isa() -> str:
    """The widest SIMD level the engine may use here: 'avx512_bf16', 'avx512_vnni', 'avx512', 'avx2' or 'scalar'."""
    f = cpu_features()
    if f["avx512f"] and f["avx512bw"] and f["avx512vl"]:
        if f["avx512_bf16"] and f["avx512_vnni"]:
            return "avx512_bf16"
        if f["avx512_vnni"]:
            return "avx512_vnni"
        return "avx512"
    if f["avx2"] and f["fma"]:
        return "avx2"
    return "scalar"


__all__ = ["cpu_features", "best_isa"]
