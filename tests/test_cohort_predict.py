"""Cohort prediction over processes: torchrun ranks and --shard workers share the inputs through
claims in --out; every input is written exactly once, a killed worker's input is finished by a rerun."""

from __future__ import annotations

import os
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pytest
import torch
from model_fixtures import noise_images

from denuc.core.result import Nuclei

pytestmark = pytest.mark.slow
ROOT = Path(__file__).resolve().parents[1]


@pytest.fixture()
def images(tmp_path: Path) -> Path:
    return noise_images(tmp_path / "in", 6, "img")


def _env() -> dict[str, str]:
    # the thread count of this process, so that a worker's floats equal an in-process run's bit for bit
    return {**os.environ, "PYTHONPATH": str(ROOT / "src"), "OMP_NUM_THREADS": str(torch.get_num_threads())}


def _cmd(images: Path, out: Path, ckpt: Path, *extra: str) -> list[str]:
    return ["detect", str(images), "--out", str(out), "--mpp", "0.5", "--detector", str(ckpt), "--device", "cpu",
            "--no-overlay", *extra]


def _outputs(out: Path) -> dict[str, Nuclei]:
    return {p.stem: Nuclei.read_csv(p) for p in sorted(out.glob("*.csv")) if p.name != "summary.csv"}


def test_shards_cover_the_inputs_exactly(images: Path, tmp_path: Path, tiny_ckpt: Path) -> None:
    from denuc.cli import main

    out = tmp_path / "o"
    assert main(_cmd(images, out, tiny_ckpt, "--shard", "0/2", "--shard-only")) == 0
    first = set(_outputs(out))
    assert first == {"img0", "img2", "img4"}
    assert main(_cmd(images, out, tiny_ckpt, "--shard", "1/2", "--shard-only")) == 0
    assert set(_outputs(out)) == {f"img{k}" for k in range(6)}
    one = tmp_path / "one"
    assert main(_cmd(images, one, tiny_ckpt)) == 0
    for stem, n in _outputs(one).items():  # the same as one process
        np.testing.assert_array_equal(n.xy, _outputs(out)[stem].xy)
    assert (out / "summary.csv").read_text() == (one / "summary.csv").read_text()


def test_a_shard_helps_with_the_others_inputs_unless_told_not_to(images: Path, tmp_path: Path,
                                                                 tiny_ckpt: Path) -> None:
    from denuc.cli import main

    out = tmp_path / "o"
    assert main(_cmd(images, out, tiny_ckpt, "--shard", "1/3")) == 0  # the others never came: it does all
    assert set(_outputs(out)) == {f"img{k}" for k in range(6)}


def test_torchrun_ranks_share_the_inputs(images: Path, tmp_path: Path, tiny_ckpt: Path) -> None:
    # the two ranks get the variables torchrun sets (no launcher process: inference needs no process group)
    out = tmp_path / "o"
    procs = [subprocess.Popen([sys.executable, "-m", "denuc", *_cmd(images, out, tiny_ckpt)],
                              env={**_env(), "RANK": str(r), "LOCAL_RANK": str(r), "WORLD_SIZE": "2"},
                              stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True) for r in range(2)]
    for p in procs:
        _, err = p.communicate(timeout=600)
        assert p.returncode == 0, err[-2000:]
    assert set(_outputs(out)) == {f"img{k}" for k in range(6)}
    assert not list(out.glob(".*.claim")) and (out / "summary.csv").is_file()


def test_killed_worker_then_rerun_loses_and_doubles_nothing(images: Path, tmp_path: Path, tiny_ckpt: Path) -> None:
    n = 24
    for k in range(6, n):  # more inputs, so the kill lands mid-run
        shutil.copy(images / f"img{k % 6}.png", images / f"img{k}.png")
    out = tmp_path / "o"
    proc = subprocess.Popen([sys.executable, "-m", "denuc", *_cmd(images, out, tiny_ckpt)], env=_env(),
                            stdout=subprocess.DEVNULL, stderr=subprocess.PIPE,
                            preexec_fn=lambda: os.nice(5))  # lower priority than this watcher: the kill is prompt
    deadline = time.time() + 600  # generous: the worker's start-up alone is slow on a loaded machine
    while time.time() < deadline and proc.poll() is None and not _outputs_written(out):
        time.sleep(0.01)
    if proc.poll() is None:  # (a worker that ended already is reported below)
        os.kill(proc.pid, signal.SIGKILL)
    proc.wait()
    assert proc.returncode == -signal.SIGKILL, "the worker ended before the kill"  # the kill interrupted it
    before = set(_outputs(out))
    assert 0 < len(before) < n  # mid-run: some inputs written, the others not
    from denuc.cli import main

    assert main(_cmd(images, out, tiny_ckpt)) == 0  # the rerun finishes whatever the killed worker held
    got = _outputs(out)
    assert set(got) == {f"img{k}" for k in range(n)}
    for k in range(6, n):  # copies give the same points: nothing doubled or lost
        np.testing.assert_array_equal(got[f"img{k}"].xy, got[f"img{k % 6}"].xy)
    assert not list(out.glob(".*.claim")) and not list(out.glob(".*.partial"))
    assert len((out / "summary.csv").read_text().strip().splitlines()) == n + 1  # header + one row per input


def _outputs_written(out: Path) -> bool:
    return any(p.name != "summary.csv" for p in out.glob("*.csv"))
