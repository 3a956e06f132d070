"""llama.cpp through llama-cpp-python: the numerics reference of the tests and the peer of `tandem bench
--compare llama.cpp`, and how to build it for this CPU.

A native build (-march=native) on a CPU with AMX compiles ggml's AMX buffer type. It takes Q4_K / Q8_0
weights that the deepseek2 graph also feeds to ops AMX cannot run (the batched W_UK / W_UV products), and
llama.cpp (llama-cpp-python 0.3.36) then aborts in ggml_backend_sched_split_graph or crashes in
llama_decode. So `make setup` names the instruction sets one by one, as GGML_NATIVE would pick them,
without AMX (`python local/llama_cpp_peer.py cmake-args`), and a build with AMX is refused here with
the command that rebuilds it.
"""

from __future__ import annotations

import platform
import sys
from pathlib import Path

SPEC = "llama-cpp-python==0.3.36"  # as pyproject's `test` extra pins it
REBUILD = (f'CMAKE_ARGS="$(python local/llama_cpp_peer.py cmake-args)" pip install --no-cache-dir '
           f'--force-reinstall --no-deps {SPEC}')

# ggml's CMake option -> the /proc/cpuinfo flags it needs
GGML_OPTIONS = {
    "GGML_SSE42": ("sse4_2",),
    "GGML_AVX": ("avx",),
    "GGML_AVX2": ("avx2",),
    "GGML_FMA": ("fma",),
    "GGML_F16C": ("f16c",),
    "GGML_BMI2": ("bmi2",),
    "GGML_AVX_VNNI": ("avx_vnni",),
    "GGML_AVX512": ("avx512f", "avx512cd", "avx512vl", "avx512dq", "avx512bw"),
    "GGML_AVX512_VBMI": ("avx512vbmi",),
    "GGML_AVX512_VNNI": ("avx512_vnni",),
    "GGML_AVX512_BF16": ("avx512_bf16",),
}


def cpu_flags(cpuinfo: str) -> set[str]:
    for line in cpuinfo.splitlines():
        if line.startswith("flags"):
            return set(line.split(":", 1)[1].split())
    return set()


def cmake_args(flags: set[str] | None, machine: str) -> str:
    """CMAKE_ARGS for llama-cpp-python: this x86 CPU's instruction sets without AMX (native elsewhere)."""
    if machine not in ("x86_64", "AMD64") or flags is None:
        return "-DGGML_NATIVE=ON"
    args = ["-DGGML_NATIVE=OFF", "-DGGML_AMX_TILE=OFF", "-DGGML_AMX_INT8=OFF", "-DGGML_AMX_BF16=OFF"]
    args += [f"-D{opt}={'ON' if all(f in flags for f in need) else 'OFF'}" for opt, need in GGML_OPTIONS.items()]
    return " ".join(args)


def build_problem(llama_cpp) -> str | None:
    """Why this llama-cpp-python build cannot run our models, or None."""
    info = llama_cpp.llama_print_system_info().decode(errors="replace")
    if "AMX_INT8 = 1" in info:
        return ("this llama-cpp-python build uses ggml's AMX buffer type, which crashes on deepseek2 models "
                f"(llama.cpp aborts in ggml_backend_sched_split_graph); rebuild it without AMX: {REBUILD}")
    return None


def open_llama(path, **kwargs):
    """llama_cpp.Llama on the CPU for a GGUF file (kwargs as Llama takes them); a clear error when
    llama-cpp-python is missing or built so that it would crash."""
    try:
        import llama_cpp
    except ImportError:
        raise RuntimeError(f"llama.cpp is needed here: `make setup-test` installs it (or pip install {SPEC}, "
                           'with CMAKE_ARGS="$(python local/llama_cpp_peer.py cmake-args)" to build it for this '
                           "CPU)") from None
    problem = build_problem(llama_cpp)
    if problem:
        raise RuntimeError(problem)
    kwargs.setdefault("verbose", False)
    return llama_cpp.Llama(model_path=str(path), n_gpu_layers=0, **kwargs)


def main(argv: list[str]) -> int:
    if argv == ["cmake-args"]:
        info = Path("/proc/cpuinfo")
        print(cmake_args(cpu_flags(info.read_text()) if info.exists() else None, platform.machine()))
        return 0
    if argv == ["check"]:
        import llama_cpp

        problem = build_problem(llama_cpp)
        print(problem or "llama-cpp-python: usable build", file=sys.stderr)
        return 1 if problem else 0
    print("usage: python local/llama_cpp_peer.py cmake-args|check", file=sys.stderr)
    return 2


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
