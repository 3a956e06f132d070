"""The C++ extension builds, loads, and reports what this CPU can run."""

from __future__ import annotations

from pathlib import Path

import offload


def cpuinfo_flags() -> set[str]:
    for line in Path("/proc/cpuinfo").read_text().splitlines():
        if line.startswith("flags"):
            return set(line.split(":", 1)[1].split())
    return set()


def test_cpu_features_agree_with_the_kernel():
    f = offload.cpu_features()
    flags = cpuinfo_flags()
    for ours, linux in [("avx2", "avx2"), ("fma", "fma"), ("avx512f", "avx512f"), ("avx512bw", "avx512bw"),
                        ("avx512_vnni", "avx512_vnni"), ("avx512_bf16", "avx512_bf16"), ("f16c", "f16c")]:
        if flags:
            assert f[ours] == (linux in flags), ours
    if f["avx512_vnni"]:
        assert f["avx512f"]


def test_best_isa_is_supported():
    isa = offload.best_isa()
    f = offload.cpu_features()
    assert isa in ("avx512_bf16", "avx512_vnni", "avx512", "avx2", "scalar")
    if isa.startswith("avx512"):
        assert f["avx512f"] and f["avx512bw"]
    if isa == "avx2":
        assert f["avx2"] and f["fma"]
