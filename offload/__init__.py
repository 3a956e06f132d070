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


ISAS = ("scalar", "avx2", "avx512", "avx512_vnni")


def best_isa() -> str:
    """The SIMD level the kernels run at here: 'scalar', 'avx2', 'avx512' or 'avx512_vnni'
    (the highest this CPU has, capped by the TANDEM_ISA environment variable)."""
    return _C.isa()


def supported_isas() -> list[str]:
    """Every SIMD level this CPU can run, lowest first (tests run each)."""
    return [isa for isa in ISAS if _C.isa_supported(isa)]


__all__ = ["cpu_features", "best_isa", "supported_isas", "ISAS"]
