"""The engine's thread pool (offload/csrc/threadpool.cpp) under stress, as a C++ program built here from the
pool's own source: tests/cpp/threadpool_stress.cpp. Its tasks are claimed with one compare-exchange on a word
that holds the call's generation, task count and next task, and a call returns once its tasks are done, not
once every worker has checked in; these tests keep that lock-free protocol honest:
- every task of 20,000 calls of 1-300 tasks runs exactly once on a thread index in range, with 1, 2, 3 and 5
  threads, on all CPUs and pinned to one (more threads than CPUs: workers preempted mid-claim);
- a call of more tasks than one claim word holds (2^21 + 3) runs as several rounds, every index once;
- submit() runs a job that calls parallel_for, and wait() rethrows the job's exception once;
- built with ThreadSanitizer where the compiler has it: no data race, and the tasks' plain (non-atomic)
  writes happen before parallel_for returns.
"""

from __future__ import annotations

import os
import shutil
import subprocess
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
SOURCES = [ROOT / "tests" / "cpp" / "threadpool_stress.cpp", ROOT / "offload" / "csrc" / "threadpool.cpp"]
CXX = os.environ.get("CXX") or shutil.which("c++") or shutil.which("g++") or shutil.which("clang++")

pytestmark = pytest.mark.skipif(CXX is None, reason="needs a C++ compiler (the engine's build has one)")


def build(out: Path, *flags: str) -> subprocess.CompletedProcess:
    return subprocess.run([CXX, "-std=c++17", "-pthread", f"-I{ROOT / 'offload' / 'csrc'}", *flags,
                           *map(str, SOURCES), "-o", str(out)], capture_output=True, text=True, timeout=300)


def run(exe: Path, *args: str, one_cpu: bool = False, env: dict | None = None) -> subprocess.CompletedProcess:
    cpu = min(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else None
    pin = (lambda: os.sched_setaffinity(0, {cpu})) if one_cpu and cpu is not None else None
    return subprocess.run([str(exe), *args], capture_output=True, text=True, timeout=600, preexec_fn=pin,
                          env=env)


def check(out: subprocess.CompletedProcess, calls: int) -> None:
    assert out.returncode == 0 and out.stdout.rstrip().endswith("ok"), out.stdout[-2000:] + out.stderr[-4000:]
    for threads in (1, 2, 3, 5):
        assert f"threads {threads}: {calls} calls, every task once" in out.stdout
        assert f"threads {threads}: wait() rethrew the job's exception once" in out.stdout


@pytest.fixture(scope="module")
def native(tmp_path_factory) -> Path:
    exe = tmp_path_factory.mktemp("pool") / "threadpool_stress"
    out = build(exe, "-O2")
    assert out.returncode == 0, out.stderr
    return exe


@pytest.mark.parametrize("one_cpu", [False, True], ids=["all-cpus", "one-cpu"])
def test_pool_runs_every_task_once(native, one_cpu):
    if one_cpu and not hasattr(os, "sched_setaffinity"):
        pytest.skip("needs Linux CPU affinity")
    out = run(native, "20000", "big", one_cpu=one_cpu)
    check(out, 20000)
    for threads in (1, 2, 3, 5):
        assert f"threads {threads}: one call of 2097155 tasks, every task once" in out.stdout


def test_pool_under_thread_sanitizer(tmp_path):
    exe = tmp_path / "threadpool_stress_tsan"
    built = build(exe, "-O1", "-g", "-fsanitize=thread")
    if built.returncode != 0:
        if "tsan" in built.stderr.lower() or "sanitize" in built.stderr.lower():
            pytest.skip(f"this compiler cannot build with -fsanitize=thread: {built.stderr.strip()[-300:]}")
        raise AssertionError(built.stderr)
    env = {**os.environ, "TSAN_OPTIONS": "halt_on_error=1 exitcode=66 report_signal_unsafe=0"}
    for one_cpu in (False, True):
        out = run(exe, "10000", one_cpu=one_cpu, env=env)
        if "FATAL: ThreadSanitizer" in out.stderr and "memory mapping" in out.stderr:
            pytest.skip("ThreadSanitizer cannot run under this kernel's address-space layout "
                        "(vm.mmap_rnd_bits too high)")
        assert "WARNING: ThreadSanitizer" not in out.stderr, out.stderr[-6000:]
        check(out, 10000)
