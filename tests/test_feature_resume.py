"""An interrupted feature extraction (Ctrl-C during ``finetune``/``train-head`` head features)
keeps the images it finished; a rerun encodes only the rest and gives what one run gives."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest

from denuc.core.result import Nuclei
from denuc.encode import build_encoder
from denuc.encode.tiny import register_tiny
from denuc.query import PointFeaturizer
from denuc.train.features import cached_features
from synthetic import make_blob_dataset

register_tiny()


def _detect(image: np.ndarray, mpp: float) -> Nuclei:
    grey = image.mean(2)
    g = np.argwhere(grey < grey.mean())[::97, ::-1].astype(np.float64) + 0.5  # some darker pixels, (x, y)
    return Nuclei(g, np.linspace(0.5, 1.0, len(g)).astype(np.float32), mpp=mpp)


def test_interrupted_extraction_resumes(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    ds = make_blob_dataset(tmp_path / "blobs", n_images=5)
    stems = ds.stems()
    enc = build_encoder("tiny-uni", weights="random")

    def run(cache: Path) -> dict[str, object]:
        fz = PointFeaturizer(enc, window=64, stride=48)
        return cached_features(fz, ds, stems, detect=_detect, detector_id="d", cache_dir=cache, log=lambda m: None)

    ref = run(tmp_path / "one")  # uninterrupted

    loaded: list[str] = []
    real_load = type(ds).load

    def load(self: object, stem: str) -> object:
        if len(loaded) == 3 and stop:
            raise KeyboardInterrupt  # Ctrl-C while the 4th image is read
        loaded.append(stem)
        return real_load(self, stem)  # type: ignore[arg-type]

    monkeypatch.setattr(type(ds), "load", load)
    stop = True
    with pytest.raises(KeyboardInterrupt):
        run(tmp_path / "two")
    assert loaded == stems[:3]
    assert not list((tmp_path / "two" / "features").glob("*.npz"))  # nothing whole cached yet
    loaded.clear()
    stop = False
    got = run(tmp_path / "two")
    assert loaded == stems[3:]  # only the images the interrupted run had not finished
    for kind in ("gt", "det"):
        a, b = ref[kind], got[kind]  # type: ignore[index]
        assert len(a) > 0 and b.stems == a.stems and b.mpps == a.mpps
        for field in ("feats", "labels", "image", "xy", "scores"):
            np.testing.assert_array_equal(getattr(b, field), getattr(a, field))
            assert getattr(b, field).dtype == getattr(a, field).dtype
    assert not (tmp_path / "two" / "features" / "parts").exists() or not any(
        (tmp_path / "two" / "features" / "parts").iterdir())  # kept parts are removed once cached
    loaded.clear()
    run(tmp_path / "two")
    assert loaded == []  # the whole result is cached now
