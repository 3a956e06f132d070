"""Reading a GGUF file ahead of the loader: in file order, never more than a window past the tensor the loader
took last, ended by the loader (or by its going idle), and never an error of its own."""

from __future__ import annotations

import mmap
import threading
import time

import pytest

import quant.gguf_file as gguf_file
from local.demo import demo_model_path
from quant.gguf_file import GGUFFile, GGUFModel


class FakeMap:
    """Stands in for the file's mmap: records the advised ranges."""

    def __init__(self, size: int):
        self.size, self.advised = size, []

    def __len__(self) -> int:
        return self.size

    def madvise(self, advice, start, length):
        assert advice == mmap.MADV_WILLNEED
        self.advised.append((start, length))


def wait_until(condition, timeout=10.0):
    t0 = time.monotonic()
    while not condition():
        assert time.monotonic() - t0 < timeout, "timed out"
        time.sleep(0.005)


@pytest.mark.skipif(not hasattr(mmap, "MADV_WILLNEED"), reason="needs madvise")
def test_reads_in_order_within_the_window():
    f = GGUFFile(demo_model_path())
    fake, chunk, window = FakeMap(100 * mmap.PAGESIZE), 4 * mmap.PAGESIZE, 10 * mmap.PAGESIZE
    f._reader_stop = threading.Event()
    reader = threading.Thread(target=f._read_ahead, args=(fake, window, chunk), daemon=True)
    f._position = 0
    reader.start()
    wait_until(lambda: sum(n for _, n in fake.advised) >= window)
    time.sleep(0.05)  # it waits there for the loader
    assert sum(n for _, n in fake.advised) == window  # chunks, the last one cut at the window
    f._position = 50 * mmap.PAGESIZE + 123  # the loader jumps ahead: reading resumes there, not before
    wait_until(lambda: fake.advised[-1][0] + fake.advised[-1][1] >= 60 * mmap.PAGESIZE)
    f._position = 95 * mmap.PAGESIZE  # near the end: it reads to the end and ends
    reader.join(timeout=10)
    assert not reader.is_alive()
    starts = [s for s, _ in fake.advised]
    assert starts == sorted(starts) and starts[0] == 0
    assert 50 * mmap.PAGESIZE in starts and not any(10 * mmap.PAGESIZE <= s < 50 * mmap.PAGESIZE for s in starts)
    assert fake.advised[-1][0] + fake.advised[-1][1] == fake.size
    assert all(0 < n <= chunk for _, n in fake.advised)


def test_an_idle_loader_ends_it(monkeypatch):
    monkeypatch.setattr(gguf_file, "READ_AHEAD_IDLE_S", 0.1)
    f = GGUFFile(demo_model_path())
    f._reader_stop = threading.Event()
    fake = FakeMap(100 * mmap.PAGESIZE)
    reader = threading.Thread(target=f._read_ahead, args=(fake, mmap.PAGESIZE, mmap.PAGESIZE), daemon=True)
    reader.start()
    reader.join(timeout=10)
    assert not reader.is_alive() and len(fake.advised) == 1


def test_a_closed_map_is_not_an_error():
    class Closed(FakeMap):
        def madvise(self, *args):
            raise ValueError("mmap closed or invalid")

    f = GGUFFile(demo_model_path())
    f._reader_stop = threading.Event()
    f._read_ahead(Closed(10 * mmap.PAGESIZE), 10 * mmap.PAGESIZE, mmap.PAGESIZE)  # returns, raises nothing


def read_ahead_threads() -> list[threading.Thread]:
    return [t for t in threading.enumerate() if t.name.startswith("read-ahead")]


def test_real_file_and_stop():
    g = GGUFModel(demo_model_path())
    g.read_ahead(1 << 20)
    assert len(read_ahead_threads()) == 1
    g.read_ahead(1 << 20)  # a second call starts nothing new
    assert len(read_ahead_threads()) == 1
    for name in g.tensors:  # the loader walks the tensors; its bytes are the file's
        assert g.raw(name).nbytes == g.tensors[name].nbytes
    g.stop_read_ahead()
    assert read_ahead_threads() == []


def test_the_loader_reads_ahead_and_stops(monkeypatch):
    import local

    windows = []
    start = GGUFModel.read_ahead
    monkeypatch.setattr(GGUFModel, "read_ahead", lambda self, window: (windows.append(window), start(self, window)))
    runner = local.load(None, device="cpu")  # the bundled demo GGUF
    assert len(windows) == 1 and 64 << 20 <= windows[0] <= 1 << 30
    assert runner.model.checkpoint.files[0]._reader is None and read_ahead_threads() == []
