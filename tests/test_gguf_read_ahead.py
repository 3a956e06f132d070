"""Reading a GGUF file ahead of the loader: in file order, never more than a window past the tensor the loader
took last, ended by the loader (or by its going idle), and never an error of its own."""

from __future__ import annotations

import mmap
import threading
import time
from types import SimpleNamespace

import quant.gguf_file as gguf_file
from local.demo import demo_model_path
from quant.gguf_file import GGUFModel


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


def fake_model(*sizes: int) -> SimpleNamespace:
    """A GGUFModel as the read-ahead sees it: parts with a map, the loader's place in each, a tensor count."""
    files = [SimpleNamespace(_map=SimpleNamespace(_mmap=FakeMap(n)), _position=0, _touched=False) for n in sizes]
    return SimpleNamespace(files=files, _taken=0)


def start(model, window, chunk):
    stop = threading.Event()
    reader = threading.Thread(target=gguf_file._read_ahead, args=(model, window, chunk, stop), daemon=True)
    reader.start()
    return reader, stop


def advised(model, i=0) -> list:
    return model.files[i]._map._mmap.advised


def took(model, i, offset):  # what GGUFFile.raw / GGUFModel.raw record
    model.files[i]._position, model.files[i]._touched = offset, True
    model._taken += 1


PAGE = mmap.PAGESIZE


def test_reads_in_order_within_the_window():
    model = fake_model(100 * PAGE)
    reader, _ = start(model, window=10 * PAGE, chunk=4 * PAGE)
    wait_until(lambda: sum(n for _, n in advised(model)) >= 10 * PAGE)
    time.sleep(0.05)  # it waits there for the loader
    assert sum(n for _, n in advised(model)) == 10 * PAGE  # chunks, the last one cut at the window
    took(model, 0, 50 * PAGE + 123)  # the loader jumps ahead: reading resumes there, not before
    wait_until(lambda: advised(model)[-1][0] + advised(model)[-1][1] >= 60 * PAGE)
    took(model, 0, 95 * PAGE)  # near the end: it reads to the end and ends
    reader.join(timeout=10)
    assert not reader.is_alive()
    starts = [a for a, _ in advised(model)]
    assert starts == sorted(starts) and starts[0] == 0
    assert 50 * PAGE in starts and not any(10 * PAGE <= a < 50 * PAGE for a in starts)
    assert advised(model)[-1][0] + advised(model)[-1][1] == 100 * PAGE
    assert all(0 < n <= 4 * PAGE for _, n in advised(model))


def test_split_parts_one_after_the_other():
    model = fake_model(20 * PAGE, 20 * PAGE, 20 * PAGE)
    reader, stop = start(model, window=8 * PAGE, chunk=4 * PAGE)
    wait_until(lambda: sum(n for _, n in advised(model, 0)) >= 8 * PAGE)
    time.sleep(0.05)
    assert advised(model, 1) == [] and advised(model, 2) == []  # not before the loader comes to them
    took(model, 2, 0)  # the loader skips to the third part: the first is left, the second never read
    wait_until(lambda: sum(n for _, n in advised(model, 2)) >= 8 * PAGE)
    assert advised(model, 1) == [] and sum(n for _, n in advised(model, 0)) == 8 * PAGE
    stop.set()
    reader.join(timeout=10)
    assert not reader.is_alive()


def test_an_idle_loader_ends_it(monkeypatch):
    monkeypatch.setattr(gguf_file, "READ_AHEAD_IDLE_S", 0.1)
    for model in (fake_model(100 * PAGE), fake_model(PAGE, 100 * PAGE)):  # waiting at a window, or for a part
        reader, _ = start(model, window=PAGE, chunk=PAGE)
        reader.join(timeout=10)
        assert not reader.is_alive() and len(advised(model)) == 1


def test_a_closed_map_is_not_an_error():
    model = fake_model(10 * PAGE)

    def closed(*args):
        raise ValueError("mmap closed or invalid")

    model.files[0]._map._mmap.madvise = closed
    gguf_file._read_ahead(model, 10 * PAGE, PAGE, threading.Event())  # returns, raises nothing


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
    assert runner.model.checkpoint._reader is None and read_ahead_threads() == []
