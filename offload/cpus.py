"""The CPU cores this process may run on: the default thread count of the engine, torch and the benchmarks.

A machine's core count is not what a process may use: `taskset`, a container's `--cpuset-cpus` or a batch
scheduler narrow the CPU affinity, and a container's `--cpus` sets a cgroup CPU quota. The engine's workers
spin at every barrier, so a pool larger than the cores it gets waits on preempted threads at each op (measured:
2 threads pinned to one CPU decoded 14x slower than 1 thread)."""

from __future__ import annotations

import math
import os
from pathlib import Path


def _read(path: Path) -> str | None:
    try:
        return path.read_text().strip()
    except (OSError, ValueError):
        return None


def affinity_cpus() -> list[int]:
    """Logical CPUs this process may run on."""
    try:
        return sorted(os.sched_getaffinity(0))
    except (AttributeError, OSError):  # not Linux
        return list(range(os.cpu_count() or 1))


def physical_cores_of(cpus: list[int], sysfs: Path = Path("/sys/devices/system/cpu")) -> int:
    """Distinct physical cores among these logical CPUs (SMT siblings count once)."""
    cores = set()
    for cpu in cpus:
        topology = sysfs / f"cpu{cpu}" / "topology"
        core = _read(topology / "core_id")
        if core is None:  # no topology in sysfs: scale by the machine's physical / logical ratio
            try:
                import psutil

                logical, physical = psutil.cpu_count(), psutil.cpu_count(logical=False)
            except ImportError:  # pragma: no cover
                logical = physical = None
            if logical and physical:
                return max(1, len(cpus) * physical // logical)
            return max(1, len(cpus))
        cores.add((_read(topology / "physical_package_id"), _read(topology / "die_id"), core))
    return max(1, len(cores))


def cgroup_cpu_limit(proc_cgroup: Path = Path("/proc/self/cgroup"),
                     root: Path = Path("/sys/fs/cgroup")) -> float | None:
    """The CPU quota of this process's cgroup (and of its ancestors) in CPUs, e.g. 1.5; None when unlimited."""
    text = _read(proc_cgroup)
    if not text:
        return None
    limits = []
    for line in text.splitlines():
        parts = line.split(":", 2)
        if len(parts) != 3:
            continue
        hierarchy, controllers, path = parts
        if hierarchy == "0" and controllers == "":  # cgroup v2: cpu.max is "QUOTA PERIOD" or "max PERIOD"
            mount = root if (root / "cgroup.controllers").exists() else root / "unified"  # unified: hybrid v1 + v2
            d = mount / path.lstrip("/")
            while True:  # the cgroup's own limit and its ancestors', up to the mount root
                fields = (_read(d / "cpu.max") or "").split()
                if len(fields) == 2 and fields[0] != "max":
                    limits.append(_ratio(fields[0], fields[1]))
                if d == mount or mount not in d.parents:
                    break
                d = d.parent
        elif "cpu" in controllers.split(","):  # cgroup v1: cpu.cfs_quota_us (-1 = none) / cpu.cfs_period_us
            for mount in (root / controllers, root / "cpu,cpuacct", root / "cpu"):
                for d in (mount / path.lstrip("/"), mount):
                    limits.append(_ratio(_read(d / "cpu.cfs_quota_us"), _read(d / "cpu.cfs_period_us")))
    limits = [x for x in limits if x is not None]
    return min(limits) if limits else None


def _ratio(quota: str | None, period: str | None) -> float | None:
    try:
        q, p = int(quota), int(period)
    except (TypeError, ValueError):
        return None
    return q / p if q > 0 and p > 0 else None


def _capped(cpus: int, limit: float | None) -> int:
    """`cpus`, at most a cgroup quota of `limit` CPUs rounded down (a throttled cgroup stops spinning workers
    mid-barrier), at least 1."""
    return cpus if limit is None else min(cpus, max(1, math.floor(limit)))


def available_cores() -> int:
    """Physical cores this process may use: those in its CPU affinity, at most its cgroup quota."""
    return _capped(physical_cores_of(affinity_cpus()), cgroup_cpu_limit())


def threads_warning(threads: int) -> str | None:
    """A warning when `threads` is more than the CPUs this process may run on, else None."""
    cpus, limit = affinity_cpus(), cgroup_cpu_limit()
    if threads <= _capped(len(cpus), limit):
        return None
    where = f"{len(cpus)} CPUs" + (f" with a cgroup quota of {limit:g}" if limit is not None and limit < len(cpus)
                                   else "")
    return (f"{threads} threads on {where} available to this process: the threads wait on each other at every "
            f"op and run far slower; use -t {_capped(physical_cores_of(cpus), limit)} or leave -t out")
