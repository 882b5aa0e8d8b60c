"""Several inputs at once in one process (``--jobs``): the same outputs as one at a time, every
input run exactly once, a failure stays its input's, claims held by each thread.

Tiny random detector, tiny encoder and a random head, PyTorch runtime, small images."""

from __future__ import annotations

import json
import threading
from pathlib import Path
from typing import Any

import numpy as np
import pytest
import torch
from model_fixtures import tiny_detector_checkpoint
from PIL import Image
from synthetic import planted_nuclei_image

from denuc.classify.head import HeadMeta, PointHead, save_head
from denuc.encode import build_encoder
from denuc.encode.tiny import register_tiny
from denuc.errors import InputError

register_tiny()
CLASSES = ("a", "b")


@pytest.fixture(scope="module")
def setup(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Any]:
    root = tmp_path_factory.mktemp("jobs")
    det = tiny_detector_checkpoint(root / "det.safetensors", score_threshold=0.44)
    enc = build_encoder("tiny-uni", weights="random")
    torch.manual_seed(0)
    head = PointHead(enc.dim, len(CLASSES))
    torch.nn.init.normal_(head.net[1].weight, std=3.0)
    meta = HeadMeta(classes=list(CLASSES), colors=[[255, 0, 0], [0, 0, 255]], encoder=enc.name,
                    weights_hash=enc.weights_hash, weights_source=enc.weights_ref, dim=enc.dim, mpp=0.5,
                    window=64, stride=48, align="center", input_size=enc.input_size)
    save_head(root / "head.safetensors", head, meta)
    images = root / "in"
    images.mkdir()
    for k, (h, w) in enumerate([(96, 128), (160, 112), (128, 128), (112, 176), (144, 96)]):
        Image.fromarray(planted_nuclei_image(h, w, 12, seed=k)[0]).save(images / f"im{k}.png")
    return {"det": det, "head": root / "head.safetensors", "images": images}


def _predict(s: dict[str, Any], out: Path, *extra: str) -> int:
    from denuc.cli import main

    return main(["predict", str(s["images"]), "--out", str(out), "--mpp", "0.5", "--detector", str(s["det"]),
                 "--encoder", "tiny-uni", "--weights", "random", "--head", str(s["head"]), "--runtime", "torch",
                 "--device", "cpu", "--no-overlay", "--no-progress", "--tissue", "none", "--format", "csv", *extra])


def _threads_running_inputs(monkeypatch: pytest.MonkeyPatch) -> tuple[list[str], list[int]]:
    """Records the thread of each input run, and the most inputs running at one time."""
    import denuc.stream.job as job

    names: list[str] = []
    most = [0]
    now = [0]
    lock = threading.Lock()
    orig = job.run_source
    both = threading.Barrier(2, timeout=10)

    def spy(*a: Any, **k: Any) -> Any:
        with lock:
            names.append(threading.current_thread().name)
            now[0] += 1
            most[0] = max(most[0], now[0])
        if len(names) <= 2:  # the first two inputs wait for each other: they do run at once
            try:
                both.wait()
            except threading.BrokenBarrierError:
                pass
        try:
            return orig(*a, **k)
        finally:
            with lock:
                now[0] -= 1

    monkeypatch.setattr(job, "run_source", spy)
    return names, most


def test_two_jobs_write_what_one_job_writes(setup: dict[str, Any], tmp_path: Path,
                                            monkeypatch: pytest.MonkeyPatch) -> None:
    one, two = tmp_path / "one", tmp_path / "two"
    assert _predict(setup, one, "--jobs", "1") == 0
    names, most = _threads_running_inputs(monkeypatch)
    assert _predict(setup, two, "--jobs", "2") == 0
    assert len(names) == 5 and len(set(names)) == 2 and most[0] == 2  # every input once, two at a time
    stems = sorted(p.stem for p in setup["images"].glob("*.png"))
    n_points = 0
    for stem in stems:
        a, b = (one / f"{stem}.csv").read_bytes(), (two / f"{stem}.csv").read_bytes()
        assert a == b, stem  # same points, classes and probabilities, byte for byte
        n_points += a.count(b"\n") - 1
        sa, sb = (json.loads((d / f"{stem}.summary.json").read_text()) for d in (one, two))
        assert sa["nuclei"] == sb["nuclei"] and sa["counts"] == sb["counts"]
    assert n_points > 20  # the models found nuclei to compare
    table = (two / "summary.csv").read_text().splitlines()
    assert len(table) == 1 + len(stems)
    assert not list(two.glob(".*claim*"))  # every claim released


def test_a_failing_input_stays_its_own_with_two_jobs(setup: dict[str, Any], tmp_path: Path,
                                                     capsys: pytest.CaptureFixture[str]) -> None:
    images = tmp_path / "in"
    images.mkdir()
    for p in setup["images"].glob("*.png"):
        (images / p.name).write_bytes(p.read_bytes())
    (images / "broken.png").write_bytes(b"\x89PNG\r\n\x1a\n" + b"\0" * 40)  # a PNG that stops after its header
    out = tmp_path / "o"
    s = dict(setup, images=images)
    assert _predict(s, out, "--jobs", "2") == 1
    err = capsys.readouterr().err
    assert "broken.png" in err and "1 of 6 input(s) failed" in err
    assert len([p for p in out.glob("*.summary.json")]) == 5
    assert not list(out.glob("broken.*"))


def test_resolve_jobs() -> None:
    from denuc.cohort.runner import resolve_jobs

    class Stream:
        def __init__(self, device: str) -> None:
            self.detector = type("D", (), {"device": torch.device(device)})()

    cpu = Stream("cpu")
    n = torch.get_num_threads()
    try:
        torch.set_num_threads(2)
        assert resolve_jobs("auto", 5, cpu) == 2
        assert resolve_jobs(None, 1, cpu) == 1  # one input left: it gets every thread
        assert resolve_jobs("auto", 5, Stream("meta")) == 1  # not the CPU: one input at a time
        torch.set_num_threads(1)
        assert resolve_jobs("auto", 5, cpu) == 1  # one thread: nothing to share
    finally:
        torch.set_num_threads(n)
    assert resolve_jobs(3, 2, cpu) == 2 and resolve_jobs("3", 9, cpu) == 3
    for bad in ("0", "-1", "two", 1.5, "2.0"):
        with pytest.raises(InputError, match="--jobs"):
            resolve_jobs(bad, 3, cpu)


def test_a_bad_jobs_value_fails_before_any_work(setup: dict[str, Any], tmp_path: Path,
                                                capsys: pytest.CaptureFixture[str]) -> None:
    assert _predict(setup, tmp_path / "o", "--jobs", "0") == 2
    assert "--jobs must be 'auto' or a whole number >= 1" in capsys.readouterr().err
    assert not (tmp_path / "o").exists() or not any((tmp_path / "o").iterdir())


def test_claim_queue_hands_each_thread_its_own_held_claim(tmp_path: Path) -> None:
    from denuc.cohort.claims import ClaimQueue, claim_path

    inputs = [tmp_path / f"x{k}.png" for k in range(3)]
    out = tmp_path / "o"
    out.mkdir()
    q = ClaimQueue(inputs, out, lambda p: False, 0, 1)
    got: list[Any] = []
    threads = [threading.Thread(target=lambda: got.append(q.next())) for _ in range(2)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert {g[0].name for g in got} == {"x0.png", "x1.png"}  # two threads, two inputs
    for g in got:  # both claims held at once, until released
        assert claim_path(out, g[0].stem).exists()
    last = q.next()
    assert last is not None and last[0].name == "x2.png" and q.next() is None
    for g in [*got, last]:
        g[1].release()
        assert not claim_path(out, g[0].stem).exists()


def test_claim_queue_skips_inputs_done_or_held(tmp_path: Path) -> None:
    from denuc.cohort.claims import ClaimQueue, try_claim

    inputs = [tmp_path / f"x{k}.png" for k in range(3)]
    out = tmp_path / "o"
    out.mkdir()
    held = try_claim(out, "x1")
    assert held is not None
    q = ClaimQueue(inputs, out, lambda p: p.name == "x0.png", 0, 1)
    item = q.next()
    assert item is not None and item[0].name == "x2.png" and q.next() is None
    item[1].release()
    held.release()


def test_onnx_threads_per_calling_thread() -> None:
    from denuc.runtime import onnx

    seen: dict[str, int] = {}

    def other() -> None:
        onnx.set_thread_threads(3)
        seen["other"] = onnx.threads()

    onnx.set_thread_threads(None)
    base = onnx.threads()
    t = threading.Thread(target=other)
    t.start()
    t.join()
    assert seen["other"] == 3 and onnx.threads() == base  # set in one thread only
    onnx.set_thread_threads(2)
    try:
        assert onnx.threads() == 2
        box = [1]
        onnx.set_thread_threads(lambda: box[0])  # read at each call
        assert onnx.threads() == 1
        box[0] = 3
        assert onnx.threads() == 3
    finally:
        onnx.set_thread_threads(None)
    assert onnx.threads() == base


def test_fork_shares_the_networks_not_the_state() -> None:
    from denuc.detect.api import Detector
    from denuc.stream.runner import Classifier, TileStream

    enc = build_encoder("tiny-uni", weights="random")
    from denuc.query.predictor import PointFeaturizer

    fp = PointFeaturizer(enc, mpp=0.5, window=64, stride=48, runtime="torch")
    cls = Classifier(fp, lambda f: np.zeros((len(f), 2), np.float32), CLASSES)
    det = object.__new__(Detector)
    det.device = torch.device("cpu")
    stream = TileStream(det, cls, tile_px=512, workers=1)
    f = stream.fork()
    assert f is not stream and f.detector is det and f.tile_px == 512 and f.workers == 1
    assert f.classifier is not None and f.classifier.featurizer is not fp
    assert f.classifier.featurizer.runner is fp.runner and f.classifier.featurizer.encoder is enc
    fp.set_image(np.zeros((80, 80, 3), np.uint8), 0.5)
    assert f.classifier.featurizer._img is None  # its own current image
