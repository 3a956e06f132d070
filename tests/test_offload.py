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
    assert isa in offload.ISAS and isa in offload.supported_isas() and "scalar" in offload.supported_isas()
    if isa.startswith("avx512"):
        assert f["avx512f"] and f["avx512bw"]
    if isa == "avx2":
        assert f["avx2"] and f["fma"]
    assert ("avx512_vnni" in offload.supported_isas()) == (f["avx512_vnni"] and f["avx512bw"] and f["avx512vl"])


def test_tandem_isa_caps_the_level():
    import subprocess
    import sys

    code = "import offload; print(offload.best_isa())"
    supported = offload.supported_isas()
    for isa in offload.ISAS:  # a level this CPU lacks (avx_vnni on an AVX-512 F/BW one) caps at the one below
        want = [s for s in offload.ISAS[:offload.ISAS.index(isa) + 1] if s in supported][-1]
        out = subprocess.run([sys.executable, "-c", code], env={**__import__("os").environ, "TANDEM_ISA": isa},
                             capture_output=True, text=True, timeout=120)
        assert out.stdout.strip() == want, (isa, out.stderr)
