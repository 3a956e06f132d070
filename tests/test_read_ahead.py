"""Reading ahead of a consumer that knows its order (quant/read_ahead.py, used by `tandem convert`): the ranges in
the jobs' order, never more than a window past the job the consumer is on, jobs the consumer has passed
skipped, each advice no larger than what the kernel reads of one (advice_limit), and never an error of its
own."""

from __future__ import annotations

import ctypes
import mmap
import os
import threading
import time
from pathlib import Path

import pytest

from quant import read_ahead
from quant.read_ahead import ReadAhead, advice_limit

MB = 1 << 20


class Recorder:
    def __init__(self):
        self.calls: list[tuple[Path, int, int]] = []
        self.lock = threading.Lock()

    def __call__(self, path, offset, length):
        with self.lock:
            self.calls.append((path, offset, length))

    def total(self) -> int:
        with self.lock:
            return sum(n for _, _, n in self.calls)


def wait_until(condition, timeout=10.0):
    t0 = time.monotonic()
    while not condition():
        assert time.monotonic() - t0 < timeout, "timed out"
        time.sleep(0.005)


A, B = Path("a.safetensors"), Path("b.safetensors")


def test_ranges_in_job_order_within_the_window():
    # job 0 reads two ranges of two files; a job's ranges need not follow the file order
    jobs = [[(A, 100 * MB, 104 * MB), (B, 0, 2 * MB)], [(A, 0, 6 * MB)], [(B, 10 * MB, 13 * MB)], [(A, 50 * MB, 51 * MB)]]
    rec = Recorder()
    with ReadAhead(jobs, window=8 * MB, chunk=MB, advise=rec) as ahead:
        wait_until(lambda: rec.total() >= 8 * MB)
        time.sleep(0.05)  # it waits there for the consumer
        assert rec.total() == 8 * MB
        ahead.at(1)  # job 0 (6 MB) done: the window now starts at job 1
        wait_until(lambda: rec.total() >= 14 * MB)
        time.sleep(0.05)
        assert rec.total() == 14 * MB
        ahead.at(2)
        wait_until(lambda: rec.total() >= 16 * MB)  # to the end
    # every range whole, in order, a chunk at a time
    merged: list[tuple[Path, int, int]] = []
    for path, offset, n in rec.calls:
        assert 0 < n <= MB
        if merged and merged[-1][0] == path and merged[-1][2] == offset:
            merged[-1] = (path, merged[-1][1], offset + n)
        else:
            merged.append((path, offset, offset + n))
    assert merged == [r for job in jobs for r in job]


def test_skips_the_jobs_the_consumer_has_passed():
    jobs = [[(A, i * 10 * MB, (i + 1) * 10 * MB)] for i in range(6)]
    rec = Recorder()
    with ReadAhead(jobs, window=4 * MB, chunk=MB, advise=rec) as ahead:
        wait_until(lambda: rec.total() >= 4 * MB)
        ahead.at(4)  # jumped: jobs 1-3 are never read
        wait_until(lambda: rec.total() >= 8 * MB)  # a window of job 4
    offsets = [offset for _, offset, _ in rec.calls]
    assert not any(10 * MB <= o < 40 * MB for o in offsets)
    assert 40 * MB in offsets and offsets == sorted(offsets)


def test_close_ends_a_waiting_reader_and_errors_stay_inside():
    rec = Recorder()
    ahead = ReadAhead([[(A, 0, 100 * MB)]], window=MB, chunk=MB, advise=rec)
    wait_until(lambda: rec.total() == MB)
    t0 = time.monotonic()
    ahead.close()  # it was waiting for the consumer
    assert time.monotonic() - t0 < 1 and rec.total() == MB
    ahead.close()  # twice is fine

    def refuse(path, offset, length):
        raise OSError("no such file")
    ReadAhead([[(A, 0, MB)]], window=MB, advise=refuse).close()  # raises nothing
    # a real missing file: the default advice opens it and fails quietly
    ReadAhead([[(Path("/nonexistent/x.safetensors"), 0, MB)]], window=MB).close()
    assert ReadAhead([[], []], window=MB)._thread is None  # nothing to read: no thread


def fake_sysfs(root: Path, dev: str, read_ahead_kb: int, max_sectors_kb: int, partition: bool) -> Path:
    disk = root / "devices" / "vda"
    (disk / "queue").mkdir(parents=True)
    (disk / "queue" / "read_ahead_kb").write_text(f"{read_ahead_kb}\n")
    (disk / "queue" / "max_sectors_kb").write_text(f"{max_sectors_kb}\n")
    target = disk / "vda1" if partition else disk
    target.mkdir(exist_ok=True)
    (root / "dev" / "block").mkdir(parents=True)
    (root / "dev" / "block" / dev).symlink_to(target)
    return root


@pytest.mark.parametrize("read_ahead_kb, max_sectors_kb, partition, want", [
    (8192, 4096, False, 8192 << 10),  # this machine's virtio disk
    (128, 1280, True, 1280 << 10),    # a common NVMe partition: the largest request is the bound
    (0, 0, False, 4096),              # read-ahead off: a page at a time still reads
])
def test_advice_limit_reads_the_device_queue(tmp_path, monkeypatch, read_ahead_kb, max_sectors_kb, partition, want):
    f = tmp_path / "model.safetensors"
    f.write_bytes(b"x")
    st = os.stat(f)
    sysfs = fake_sysfs(tmp_path / "sys", f"{os.major(st.st_dev)}:{os.minor(st.st_dev)}", read_ahead_kb,
                       max_sectors_kb, partition)
    monkeypatch.setattr(read_ahead, "SYSFS", sysfs)
    assert advice_limit(f) == want
    monkeypatch.setattr(read_ahead, "SYSFS", tmp_path / "missing")
    assert advice_limit(f) == read_ahead.FALLBACK_ADVICE


def resident(path: Path) -> int:
    """Bytes of the file in the page cache (mincore on a mapping of it)."""
    libc = ctypes.CDLL(None, use_errno=True)
    libc.mmap.restype = ctypes.c_void_p
    libc.mmap.argtypes = [ctypes.c_void_p, ctypes.c_size_t, ctypes.c_int, ctypes.c_int, ctypes.c_int, ctypes.c_long]
    libc.munmap.argtypes = [ctypes.c_void_p, ctypes.c_size_t]
    libc.mincore.argtypes = [ctypes.c_void_p, ctypes.c_size_t, ctypes.c_void_p]
    size = path.stat().st_size
    pages = -(-size // mmap.PAGESIZE)
    vec = (ctypes.c_ubyte * pages)()
    fd = os.open(path, os.O_RDONLY)
    try:
        addr = libc.mmap(None, size, mmap.PROT_READ, mmap.MAP_SHARED, fd, 0)
        assert addr not in (None, ctypes.c_void_p(-1).value), os.strerror(ctypes.get_errno())
        try:
            assert libc.mincore(addr, size, vec) == 0, os.strerror(ctypes.get_errno())
        finally:
            libc.munmap(addr, size)
    finally:
        os.close(fd)
    return sum(v & 1 for v in vec) * mmap.PAGESIZE


@pytest.mark.skipif(not hasattr(os, "posix_fadvise"), reason="needs posix_fadvise (Linux)")
def test_the_kernel_reads_what_was_advised(tmp_path):
    """On this machine's disk: a file dropped from the page cache is in it again once ReadAhead has advised
    its bytes. With advice twice advice_limit in size, the kernel read half the file (and at the 32 MiB advice
    of the first GGUF read-ahead, a quarter here). WILLNEED is advice the kernel may drop in part (its
    read-ahead gives up on a page it cannot get at once): a run once stopped short of the whole file, so
    the bound is 7/8 of it, well above the half and the quarter of advice that is too large."""
    limit = advice_limit(tmp_path)
    f = tmp_path / "weights.bin"
    size = max(4 * limit, 16 * MB)
    with open(f, "wb") as out:
        for _ in range(size // MB):
            out.write(os.urandom(MB))
        out.flush()
        os.fsync(out.fileno())
    fd = os.open(f, os.O_RDONLY)
    os.posix_fadvise(fd, 0, 0, os.POSIX_FADV_DONTNEED)
    os.close(fd)
    if resident(f) > size // 8:
        pytest.skip("this filesystem keeps the file in memory (tmpfs?): nothing to read ahead")
    with ReadAhead([[(f, 0, size)]], window=size):
        wait_until(lambda: resident(f) >= size * 7 // 8, timeout=30)
