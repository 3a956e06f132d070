"""The C++ extension builds, loads, and reports what this CPU can run."""

from __future__ import annotations

from pathlib import Path

import offload


def cpuinfo(field: str) -> str:
    """The first CPU's `field` in /proc/cpuinfo ('' where absent)."""
    for line in Path("/proc/cpuinfo").read_text().splitlines():
        if line.split(":", 1)[0].strip() == field:
            return line.split(":", 1)[1].strip()
    return ""


def cpuinfo_flags() -> set[str]:
    return set(cpuinfo("flags").split())


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


def test_stream_prefetch_follows_the_vendor_and_tandem_prefetch():
    """The weight-streaming kernels prefetch into L2 on AMD, L1 elsewhere; TANDEM_PREFETCH overrides that,
    changes no result (Q4_K, Q6_K and Q5_0 at 1 and 3 tokens: the kernels that prefetch), and a value it does
    not know fails the import with the accepted ones named."""
    import os
    import subprocess
    import sys

    vendor = cpuinfo("vendor_id")
    if vendor:
        assert offload.stream_prefetch() == ("l2" if vendor in ("AuthenticAMD", "HygonGenuine") else "l1")
    code = """if True:
        import numpy as np, offload
        from offload.bench import random_weight
        from offload.engine import CpuEngine, prepare_weight
        rng = np.random.default_rng(0)
        eng = CpuEngine(2)
        out = [offload.stream_prefetch()]
        for typ in ("Q4_K", "Q6_K", "Q5_0"):
            w = prepare_weight(random_weight(rng, typ, (64, 512)))
            for T in (1, 3):
                out.append(eng.linear(w, rng.standard_normal((T, 512), dtype=np.float32)).tobytes().hex())
        print(*out)
    """
    runs = {}
    for level in ("l1", "l2", "auto"):
        r = subprocess.run([sys.executable, "-c", code], env={**os.environ, "TANDEM_PREFETCH": level},
                           capture_output=True, text=True, timeout=120)
        assert r.returncode == 0, r.stderr
        runs[level] = r.stdout.split()
    assert runs["l1"][0] == "l1" and runs["l2"][0] == "l2" and runs["auto"][0] == offload.stream_prefetch()
    assert runs["l1"][1:] == runs["l2"][1:] == runs["auto"][1:]
    r = subprocess.run([sys.executable, "-c", "import offload"], env={**os.environ, "TANDEM_PREFETCH": "L3"},
                       capture_output=True, text=True, timeout=120)
    assert r.returncode != 0 and "TANDEM_PREFETCH='L3'" in r.stderr and "use l1, l2 or auto" in r.stderr
