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
from model_fixtures import tiny_detector_checkpoint
from PIL import Image

from denuc.core.result import Nuclei

pytestmark = pytest.mark.slow
ROOT = Path(__file__).resolve().parents[1]


@pytest.fixture(scope="module")
def tiny_ckpt(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return tiny_detector_checkpoint(tmp_path_factory.mktemp("ckpt") / "tiny.safetensors", score_threshold=0.3)


@pytest.fixture()
def images(tmp_path: Path) -> Path:
    d = tmp_path / "in"
    d.mkdir()
    for k in range(6):
        arr = np.random.default_rng(k).integers(0, 256, (96, 128, 3), dtype=np.uint8)
        Image.fromarray(arr).save(d / f"img{k}.png")
    return d


def _env() -> dict[str, str]:
    return {**os.environ, "PYTHONPATH": str(ROOT / "src"), "OMP_NUM_THREADS": "1"}


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
    out = tmp_path / "o"
    r = subprocess.run([sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc-per-node", "2",
                        "-m", "denuc", *_cmd(images, out, tiny_ckpt)], env=_env(), capture_output=True, text=True,
                       timeout=600)
    assert r.returncode == 0, r.stderr[-2000:]
    assert set(_outputs(out)) == {f"img{k}" for k in range(6)}
    assert not list(out.glob(".*.claim")) and (out / "summary.csv").is_file()


def test_killed_worker_then_rerun_loses_and_doubles_nothing(images: Path, tmp_path: Path, tiny_ckpt: Path) -> None:
    for k in range(6, 24):  # more inputs, so the kill lands mid-run
        shutil.copy(images / f"img{k % 6}.png", images / f"img{k}.png")
    out = tmp_path / "o"
    procs = [subprocess.Popen([sys.executable, "-m", "denuc", *_cmd(images, out, tiny_ckpt, "--shard", f"{i}/2")],
                              env=_env(), stdout=subprocess.DEVNULL, stderr=subprocess.PIPE) for i in range(2)]
    deadline = time.time() + 120
    while time.time() < deadline and len(list(out.glob("*.csv"))) < 4:
        time.sleep(0.02)
    os.kill(procs[0].pid, signal.SIGKILL)
    procs[0].wait()
    procs[1].wait(timeout=600)
    assert procs[1].returncode == 0, procs[1].stderr.read().decode()[-2000:] if procs[1].stderr else ""
    from denuc.cli import main

    assert main(_cmd(images, out, tiny_ckpt)) == 0  # the rerun finishes whatever the killed worker held
    got = _outputs(out)
    assert set(got) == {f"img{k}" for k in range(24)}
    for k in range(6, 24):  # copies give the same points: nothing doubled or lost
        np.testing.assert_array_equal(got[f"img{k}"].xy, got[f"img{k % 6}"].xy)
    assert not list(out.glob(".*.claim")) and not list(out.glob(".*.partial"))
