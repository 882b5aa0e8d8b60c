"""Joint detector training on datasets at different mpp: every dataset is resampled to the
training mpp (each from its own) and every epoch draws crops from all of them."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
from synthetic import make_points_dataset

from denuc.train import detector as det_train
from denuc.train.detector import load_items, train
from denuc.train.detector_config import TrainConfig


def test_joint_training_on_two_datasets_of_different_mpp_samples_both(tmp_path: Path,
                                                                     monkeypatch: pytest.MonkeyPatch) -> None:
    # the same tissue area: 96 px at 0.5 µm/px and 192 px at 0.25 µm/px
    coarse = make_points_dataset(tmp_path / "coarse", n_images=4, size=96, mpp=0.5, seed=1)
    fine = make_points_dataset(tmp_path / "fine", n_images=4, size=192, mpp=0.25, seed=2)
    items, vocab = load_items([str(coarse), str(fine)], "train", 0.5, False)
    assert vocab == ("nucleus",)
    by_ds = {p: [it for it in items if it.stem.startswith(p)] for p in ("0/", "1/")}
    assert len(by_ds["0/"]) == len(by_ds["1/"]) == 1
    # each dataset was resampled from its own mpp: both come out 96 px at 0.5 µm/px, points scaled alike
    for it in items:
        assert it.image.shape[:2] == (96, 96)
        assert (it.xy >= 0).all() and (it.xy < 96).all()
    src = np.loadtxt(fine / "points" / "im00.csv", delimiter=",", skiprows=1, usecols=(0, 1))
    assert np.allclose(np.sort(by_ds["1/"][0].xy[:, 0]), np.sort(src[:, 0]) / 2, atol=0.6)

    drawn: list[str] = []
    orig = det_train.CropSource.__getitem__

    def spy(self: det_train.CropSource, key: tuple[int, int, int]):  # type: ignore[no-untyped-def]
        drawn.append(self.items[key[0]].stem.split("/")[0])
        return orig(self, key)

    monkeypatch.setattr(det_train.CropSource, "__getitem__", spy)
    lines: list[str] = []
    cfg = TrainConfig.from_preset("quick", datasets=[str(coarse), str(fine)], out=str(tmp_path / "o"),
                                  backbone="tiny", epochs=1, batch_size=4, crop=64, progress=False, threads=1)
    train(cfg, log=lines.append)
    assert set(drawn) == {"0", "1"}  # crops of both datasets in the one epoch
    assert drawn.count("0") == drawn.count("1")  # equal area at the training mpp: equal share of crops
    assert any("2 train / 4 val" in x for x in lines)  # both datasets' val images are scored
