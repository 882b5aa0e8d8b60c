"""The ONNX cache: one export per file whatever runs at once (a lock), a line on stderr saying
so, and pruning to the most recently used files."""

from __future__ import annotations

import os
import threading
import time
from pathlib import Path

import pytest
import torch

import denuc.runtime.onnx as ro


class _Tiny(torch.nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.conv = torch.nn.Conv2d(3, 2, 3, padding=1)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.conv(x)


def test_threads_starting_together_export_once_and_say_so(tmp_path: Path, monkeypatch: pytest.MonkeyPatch,
                                                          capsys: pytest.CaptureFixture[str]) -> None:
    pytest.importorskip("onnx")
    monkeypatch.setenv("DENUC_CACHE", str(tmp_path))
    calls: list[int] = []

    def slow_export(module: torch.nn.Module, method: str, shape: tuple[int, ...], path: Path) -> None:
        calls.append(threading.get_ident())
        time.sleep(0.3)  # long enough for the other threads to arrive while it runs
        Path(path).write_bytes(b"onnx")

    monkeypatch.setattr(ro, "export_onnx", slow_export)
    module = _Tiny()
    got: list[Path] = []
    barrier = threading.Barrier(3)

    def worker() -> None:
        runner = ro.OnnxRunner(module, name="tiny")  # one runner per thread, as separate processes have
        barrier.wait()
        got.append(runner.file_for((3, 16, 16)))

    threads = [threading.Thread(target=worker) for _ in range(3)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert len(calls) == 1 and len(got) == 3 and len(set(got)) == 1 and got[0].read_bytes() == b"onnx"
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and err[0].startswith("denuc: exporting the tiny for 3x16x16 inputs to ONNX Runtime")


def test_unwritable_cache_is_a_model_error(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    pytest.importorskip("onnx")
    blocker = tmp_path / "file"
    blocker.write_text("")
    monkeypatch.setenv("DENUC_CACHE", str(blocker))
    with pytest.raises(ro.ModelError, match="not writable"):
        ro.OnnxRunner(_Tiny(), name="tiny").file_for((3, 8, 8))


def test_prune_keeps_the_most_recently_used_files(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("DENUC_ONNX_CACHE_FILES", "3")
    monkeypatch.setenv("DENUC_ONNX_CACHE_MB", "1")
    files = []
    for k in range(6):
        p = tmp_path / f"m{k}.onnx"
        p.write_bytes(b"x" * 1000)
        os.utime(p, (1000 + k, 1000 + k))  # m5 newest
        files.append(p)
    (tmp_path / "gone.onnx.lock").write_text("")  # a lock without its file, nobody holds it
    gone = ro.prune_cache(tmp_path, keep=files[0])  # the file just exported stays, oldest or not
    assert sorted(p.name for p in tmp_path.glob("*.onnx")) == ["m0.onnx", "m4.onnx", "m5.onnx"]
    assert len(gone) == 3 and not (tmp_path / "gone.onnx.lock").exists()
    monkeypatch.setenv("DENUC_ONNX_CACHE_MB", str(2500 / 1024**2))  # the byte limit alone: 2 files fit
    ro.prune_cache(tmp_path, keep=files[0])
    assert sorted(p.name for p in tmp_path.glob("*.onnx")) == ["m0.onnx", "m5.onnx"]
