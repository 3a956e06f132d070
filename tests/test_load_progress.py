"""A load reports its progress as it goes (the TUI's bar, `tandem run`'s line), not all at its end."""

from __future__ import annotations

import sys

import pytest

import local
import local.gguf_loader as gl
from local.demo import demo_model_path


def record(monkeypatch):
    """progress() calls and engine_bytes() calls (the engine's copies, most of a load), in one timeline."""
    events = []
    prepare = gl.engine_bytes

    def engine_bytes(g, name):
        events.append(("engine", name))
        return prepare(g, name)

    monkeypatch.setattr(gl, "engine_bytes", engine_bytes)
    return events, lambda done, total: events.append(("progress", done, total))


@pytest.mark.parametrize("source", ["gguf", "hf"])
def test_progress_runs_through_the_load(source, monkeypatch, reference_models):
    path = demo_model_path() if source == "gguf" else reference_models["v3"][0]
    events, progress = record(monkeypatch)
    runner = local.load(path, device="cpu", progress=progress)
    reports = [e[1:] for e in events if e[0] == "progress"]
    total = sum(t.nbytes for t in runner.model.checkpoint.tensors.values())
    assert reports[0] == (0, total) and reports[-1] == (total, total)
    assert all(t == total for _, t in reports)
    done = [d for d, _ in reports]
    assert done == sorted(done) and len(set(done)) > 10
    # reported while the engine copies its tensors: before the last of them, well past the start
    kinds = [e[0] for e in events]
    last_copy = len(kinds) - 1 - kinds[::-1].index("engine")
    before = [e[1] for e in events[:last_copy] if e[0] == "progress"]
    assert before and max(before) > total // 2


def test_the_terminal_line(monkeypatch, capsys):
    from local.cli import load_bar

    monkeypatch.setattr(sys.stderr, "isatty", lambda: False)
    assert load_bar() is None  # a log or a pipe gets nothing
    monkeypatch.setattr(sys.stderr, "isatty", lambda: True)
    bar = load_bar("loading m.gguf")
    for done in (0, 10, 11, 50, 100):
        bar(done, 100)
    err = capsys.readouterr().err
    assert err == "\rloading m.gguf   0%\rloading m.gguf  10%\rloading m.gguf  11%\rloading m.gguf  50%\r\033[K"
