"""Data-parallel training (torchrun / gloo on the CPU): two processes train what one process trains.

Tolerance: the parameters of a two-process run and of a one-process run with the same global
batch (hence the same samples in every step, in the same order) agree within ``TOL = 1e-5``
(absolute). They are not bit-identical because float32 sums are split differently: each rank
sums its share of the batch, BatchNorm statistics are combined over the ranks, gradients are
added over the ranks. On these runs the largest difference is about 2e-6 (detector, 6 AdamW
steps) and 1e-7 (fine-tuned encoder). Features extracted in parallel and the head fitted on
them are bit-identical.
"""

from __future__ import annotations

import json
import os
import socket
import subprocess
import sys
from pathlib import Path
from typing import Any

import numpy as np
import pytest
import torch

from denuc.errors import InputError
from denuc.train.detector import TrainConfig, train
from denuc.train.distributed import DistContext, batch_share, launched_world, per_rank_batch
from synthetic import write_blob_dataset

TOL = 1e-5
SRC = Path(__file__).resolve().parents[1] / "src"


def free_ports(n: int) -> list[int]:
    """``n`` different ports free on 127.0.0.1 now (all bound at once, then released)."""
    socks = [socket.socket() for _ in range(n)]
    try:
        for s in socks:
            s.bind(("127.0.0.1", 0))
        return [int(s.getsockname()[1]) for s in socks]
    finally:
        for s in socks:
            s.close()


def max_diff(a: dict[str, torch.Tensor], b: dict[str, torch.Tensor]) -> float:
    assert sorted(a) == sorted(b)
    return max(float((a[k].double() - b[k].double()).abs().max()) for k in a if a[k].numel())


def test_batch_shares_and_world(monkeypatch: pytest.MonkeyPatch) -> None:
    assert per_rank_batch(16, 4) == 4 and per_rank_batch(5, 1) == 5
    with pytest.raises(InputError, match="multiple of 4"):
        per_rank_batch(6, 4)
    batch = list(range(5))
    shares = [batch_share(batch, DistContext(rank=r, world=3), 2) for r in range(3)]
    assert shares == [[0, 1], [2, 3], [4]]
    assert batch_share(batch[:1], DistContext(rank=2, world=3), 2) == []  # a short last batch
    assert batch_share(batch, DistContext(), 5) == batch
    for k in ("RANK", "WORLD_SIZE", "LOCAL_RANK"):
        monkeypatch.delenv(k, raising=False)
    assert launched_world() == (0, 1, 0)
    monkeypatch.setenv("WORLD_SIZE", "4")
    monkeypatch.setenv("RANK", "3")
    monkeypatch.setenv("LOCAL_RANK", "1")
    assert launched_world() == (3, 4, 1)
    monkeypatch.setenv("RANK", "4")
    with pytest.raises(InputError, match="RANK"):
        launched_world()


def _cfg(ds: Path, out: Path, **kw: Any) -> TrainConfig:
    base: dict[str, Any] = {"datasets": [str(ds)], "out": str(out), "backbone": "tiny", "epochs": 2, "batch_size": 4,
                            "crop": 64, "progress": False, "threads": 1, "workers": 0, "device": "cpu",
                            "crops_per_epoch": 1.0, "init": "", "mpp": 0.5}
    base.update(kw)
    return TrainConfig(**base)


def head_run(ds: Any, out: Path, cache: Path, mode: str) -> int:
    """Train a head with a tiny random ViT; returns the encoder's forward calls."""
    from denuc.encode import build_encoder
    from denuc.encode.tiny import register_tiny
    from denuc.train.head import HeadTrainConfig
    from denuc.train.head_run import train_head

    register_tiny()
    enc = build_encoder("tiny-uni", weights="random")
    calls = [0]
    enc.register_forward_hook(lambda *a: calls.__setitem__(0, calls[0] + 1))
    train_head(ds, enc, out, mode=mode, cache_dir=cache, config=HeadTrainConfig(epochs=1, lr=1e-4), window=64,
               finetune={"epochs": 1, "lr": 1e-3, "head_lr": 1e-2, "batch_windows": 3}, log=lambda m: None)
    return calls[0]


@pytest.mark.slow
def test_torchrun_trains_detector_and_head_like_one_process(tmp_path: Path) -> None:
    """One ``torchrun`` launch of two processes (tests/distributed_worker.py) runs the detector
    training command line, then the head training of both modes; the one-process references
    run here meanwhile."""
    from synthetic import make_blob_dataset

    # detector: 3 train images of 96 px, crop 64: 9 crops an epoch in batches of 4, 4 and 1, so
    # the last step leaves rank 1 with an empty share
    ds = write_blob_dataset(tmp_path / "ds")
    head_ds = make_blob_dataset(tmp_path / "blobs", n_images=6)  # 4 train + 1 val images
    agent_port, head_port = free_ports(2)
    cmd = [sys.executable, "-m", "torch.distributed.run", "--nproc-per-node", "2", "--master-addr", "127.0.0.1",
           "--master-port", str(agent_port), str(Path(__file__).with_name("distributed_worker.py")), str(tmp_path),
           str(head_port), "--", str(ds), "--out", str(tmp_path / "two"),
           "--backbone", "tiny", "--epochs", "2", "--batch-size", "4", "--crop", "64", "--no-progress", "--init", "", "--work-mpp", "0.5",
           "--threads", "1", "--workers", "0", "--device", "cpu", "--crops-per-epoch", "1.0", "--stop-after", "1"]
    env = {**os.environ, "PYTHONPATH": os.pathsep.join([str(SRC), str(Path(__file__).parent)])}
    proc = subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, env=env)
    try:
        train(_cfg(ds, tmp_path / "one", stop_after=1), log=lambda s: None)
        one_epoch1 = torch.load(tmp_path / "one" / "state.pt", weights_only=True)
        train(_cfg(ds, tmp_path / "one", resume=True), log=lambda s: None)
        one_final = torch.load(tmp_path / "one" / "state.pt", weights_only=True)
        threads = torch.get_num_threads()
        torch.set_num_threads(1)
        try:
            one_calls = {m: head_run(head_ds, tmp_path / f"one-{m}.safetensors", tmp_path / "cache1", m)
                         for m in ("linear", "full")}
        finally:
            torch.set_num_threads(threads)
        out, err = proc.communicate(timeout=600)
    finally:
        if proc.poll() is None:  # a failure here: torchrun passes SIGTERM on to its workers
            proc.terminate()
            proc.wait(60)
    assert proc.returncode == 0, err[-3000:]
    _check_detector(tmp_path, out, one_epoch1, one_final)
    _check_head(tmp_path, one_calls)


def _check_detector(tmp_path: Path, stdout: str, one_epoch1: dict[str, Any], one_final: dict[str, Any]) -> None:
    """The two-process detector run equals the one-process one after epoch 1, and resumed in
    one process it ends where the one-process run ended."""
    ds = tmp_path / "ds"
    assert stdout.count("epoch 1/2 loss") == 1  # rank 0 alone logs
    assert "data-parallel: 2 processes (gloo), 2 of the 4 crops" in stdout
    # one writer: one set of run files, nothing half-written
    assert sorted(p.name for p in (tmp_path / "two").iterdir()) == ["best.safetensors", "last.safetensors",
                                                                    "log.jsonl", "state.pt"]
    two_epoch1 = torch.load(tmp_path / "two" / "state.pt", weights_only=True)
    assert two_epoch1["step"] == one_epoch1["step"] == 3
    assert max_diff(two_epoch1["model"], one_epoch1["model"]) < TOL
    rec1 = json.loads((tmp_path / "one" / "log.jsonl").read_text().splitlines()[0])
    rec2 = json.loads((tmp_path / "two" / "log.jsonl").read_text().splitlines()[0])
    assert rec2["loss"] == pytest.approx(rec1["loss"], abs=1e-6)  # the global batch losses, summed over ranks
    assert not any(k.startswith("module.") for k in two_epoch1["model"])  # un-wrapped state dict

    # the two-process run resumes in one process and ends where the one-process run ended
    train(_cfg(ds, tmp_path / "two", resume=True), log=lambda s: None)
    two_final = torch.load(tmp_path / "two" / "state.pt", weights_only=True)
    assert two_final["step"] == one_final["step"] == 6
    assert max_diff(two_final["model"], one_final["model"]) < TOL


def _check_head(tmp_path: Path, one_calls: dict[str, int]) -> None:
    """The two processes shared the head's feature cache and trained the heads of one process."""
    from safetensors.torch import load_file

    # the feature cache: each process encoded its share of the 5 images once, the files are
    # the one-process files bit for bit
    calls = [json.loads((tmp_path / f"calls{r}.json").read_text()) for r in range(2)]
    assert one_calls["linear"] == 5 and sorted(c["linear"] for c in calls) == [2, 3]
    one_files = sorted(p.name for p in (tmp_path / "cache1" / "features").glob("*.npz"))
    assert one_files and one_files == sorted(p.name for p in (tmp_path / "cache2" / "features").glob("*.npz"))
    for name in one_files:
        with np.load(tmp_path / "cache1/features" / name) as a, np.load(tmp_path / "cache2/features" / name) as b:
            assert all(np.array_equal(a[k], b[k]) for k in a.files), name

    lin1, lin2 = load_file(tmp_path / "one-linear.safetensors"), load_file(tmp_path / "two-linear.safetensors")
    assert sorted(lin1) == sorted(lin2) and all(torch.equal(lin1[k], lin2[k]) for k in lin1)
    full1, full2 = load_file(tmp_path / "one-full.safetensors"), load_file(tmp_path / "two-full.safetensors")
    assert len(full1) > len(lin1)  # the fine-tuned encoder tensors are compared too
    assert max_diff(full1, full2) < TOL
