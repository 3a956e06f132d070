"""Reading files into the page cache ahead of a consumer that knows its order: `tandem convert` reads an HF
checkpoint's tensors job by job, in the output's order, which is not the order of the bytes in the shards (a
layer's experts sit among other layers' tensors, sorted by name). A thread advises the kernel to read the
byte ranges of the next jobs (`POSIX_FADV_WILLNEED`, a chunk at a time) while the consumer quantizes the
current one, at most `window` bytes ahead of it, so the consumer waits on the disk once rather than at every
page it touches first.

Cold converts to Q4_K_M of a 6.2 GB BF16 checkpoint (Qwen3-30B-A3B's geometry, 4 layers; 15-17 s warm), with
and without it in alternation: the disk throttled to 500 MB/s (a SATA SSD), 22.2 -> 17.0-18.2 s; at this disk's
2.5 GB/s no difference (18-23 s either way). (GGUF loading has its own, sequential one:
`GGUFModel.read_ahead`; both advise in advice_limit pieces.)
"""

from __future__ import annotations

import mmap
import os
import threading
from collections.abc import Callable, Sequence
from pathlib import Path

MAX_WINDOW = 1 << 30
MIN_WINDOW = 64 << 20
SYSFS = Path("/sys")
FALLBACK_ADVICE = 128 << 10  # bytes per advice where the device's limit cannot be read (Linux's default read-ahead)

Range = tuple[Path, int, int]  # a file and the [begin, end) of its bytes a job reads


def advice_limit(path: str | os.PathLike) -> int:
    """The most bytes one WILLNEED advice (posix_fadvise, madvise, readahead) reads of a file: Linux caps each
    call at the larger of its device's read-ahead (`read_ahead_kb`) and largest request (`max_sectors_kb`) and
    silently drops the rest of the range. Advising 1 GiB in 32 MiB calls here (read_ahead_kb 8192) read 256
    MiB; with the common 128 KiB read-ahead on an NVMe disk's 1280 KiB requests it would read 4%.
    FALLBACK_ADVICE where sysfs does not say (a filesystem without one block device)."""
    try:
        st = os.stat(path)
        dev = SYSFS / "dev" / "block" / f"{os.major(st.st_dev)}:{os.minor(st.st_dev)}"
        queue = dev / "queue"
        if not queue.exists():  # a partition: its disk's queue
            queue = dev.resolve().parent / "queue"
        kb = max(int((queue / "read_ahead_kb").read_text()), int((queue / "max_sectors_kb").read_text()))
    except (OSError, ValueError):
        return FALLBACK_ADVICE
    return max(kb << 10, 4096)


def release_pages(mapped, begin: int, end: int) -> None:
    """Let go of the resident pages of bytes [begin, end) of a memory-mapped file (np.memmap; whole pages
    inside the range, MADV_DONTNEED), once they were copied elsewhere: the process does not hold them twice,
    and a later read takes them back from the page cache or the file."""
    page = mmap.PAGESIZE
    start, stop = -(-begin // page) * page, end // page * page
    if stop > start and hasattr(mapped, "_mmap") and hasattr(mmap, "MADV_DONTNEED"):
        mapped._mmap.madvise(mmap.MADV_DONTNEED, start, stop - start)


def default_window(available: int | None = None) -> int:
    """How far to read ahead: a quarter of the `available` memory (None: what the kernel reports available),
    within [64 MiB, 1 GiB]."""
    if available is None:
        available = 0
        try:
            with open("/proc/meminfo") as f:
                for line in f:
                    if line.startswith("MemAvailable:"):
                        available = int(line.split()[1]) * 1024
                        break
        except (OSError, ValueError, IndexError):
            pass
    return int(min(max(available // 4, MIN_WINDOW), MAX_WINDOW))


class ReadAhead:
    """Reads the byte ranges of `jobs` (one list of ranges per job, in the order the consumer takes the jobs)
    into the page cache on a background thread, at most `window` bytes past the start of the job the consumer
    is on (`at(i)`). Advice only: nothing it does raises in the consumer, and it does nothing where the OS has
    no posix_fadvise. Ends at the last range or at close(); a context manager closes it."""

    def __init__(self, jobs: Sequence[Sequence[Range]], window: int | None = None, chunk: int | None = None,
                 advise: Callable[[Path, int, int], None] | None = None):
        self.jobs = [list(ranges) for ranges in jobs]
        self.window = default_window() if window is None else int(window)
        self.chunk = chunk  # bytes per advice; None: each file's advice_limit
        self._advise = advise  # (path, offset, length); None: posix_fadvise WILLNEED
        self._starts, total = [], 0  # bytes of the jobs before each job
        for ranges in self.jobs:
            self._starts.append(total)
            total += sum(max(end - begin, 0) for _, begin, end in ranges)
        self._at = 0
        self._stop = threading.Event()
        self._moved = threading.Condition()
        self._thread = None
        if total and (advise is not None or hasattr(os, "posix_fadvise")):
            self._thread = threading.Thread(target=self._run, name="read-ahead", daemon=True)
            self._thread.start()

    def at(self, job: int) -> None:
        """The consumer has started job `job`."""
        with self._moved:
            self._at = job
            self._moved.notify_all()

    def close(self) -> None:
        self._stop.set()
        with self._moved:
            self._moved.notify_all()
        if self._thread is not None:
            self._thread.join()
            self._thread = None

    def __enter__(self) -> ReadAhead:
        return self

    def __exit__(self, *exc) -> None:
        self.close()

    def _room(self, job: int, done: int) -> int:
        """Bytes job `job` may have advised now, `done` being the bytes of all jobs advised so far: waits while
        the consumer is a window behind; 0 once the consumer is past the job, or at close()."""
        with self._moved:
            while not self._stop.is_set() and self._at <= job:
                room = self.window - (done - self._starts[self._at])
                if room > 0:
                    return room
                self._moved.wait(0.1)
            return 0

    def _run(self) -> None:
        fds: dict[Path, int] = {}
        chunks: dict[Path, int] = {}

        def fadvise(path: Path, offset: int, length: int) -> None:
            if path not in fds:
                fds[path] = os.open(path, os.O_RDONLY)
            os.posix_fadvise(fds[path], offset, length, os.POSIX_FADV_WILLNEED)  # queues the reads

        advise = self._advise or fadvise
        try:
            for j, ranges in enumerate(self.jobs):
                if self._stop.is_set():
                    return
                done = self._starts[j]
                for path, pos, end in ranges:
                    if path not in chunks:
                        chunks[path] = self.chunk or advice_limit(path)
                    while pos < end:
                        room = self._room(j, done)
                        if not room:
                            break
                        n = min(chunks[path], end - pos, room)
                        advise(path, pos, n)
                        pos += n
                        done += n
                    if pos < end:  # the consumer is past this job (or closed it): on to the next
                        break
        except (OSError, ValueError):  # a file gone or refused advice: reading ahead is only a hint
            pass
        finally:
            for fd in fds.values():
                os.close(fd)
