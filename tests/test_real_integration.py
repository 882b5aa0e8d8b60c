"""Integration on real BRCA-M2C val images: the shipped models must stay sane end to end.

Floors, not reported numbers, on crops of two val images: the shipped detector scores val F1 0.884
over all 10 whole val images
(benchmarks/reported/detector_brca_det_lite0_stain2.json); a broken resampling, window
merge or class mapping drops these far below the floors.
"""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest

from denuc.data import open_dataset
from denuc.evaluate import evaluate

pytestmark = pytest.mark.real_data


#: each val image is cut to its top-left CROP x CROP px (a third of its area): enough nuclei for
#: the floors, a third of the time
CROP = 576


@pytest.fixture(scope="module")
def val_samples(brca_dir: Path) -> list:
    from dataclasses import replace

    ds = open_dataset(brca_dir)
    out = []
    for stem in ds.stems("val")[:2]:
        s = ds.load(stem)
        keep = s.points.inside(CROP, CROP)
        out.append(replace(s, image=np.ascontiguousarray(s.image[:CROP, :CROP]), points=s.points.select(keep)))
    return out


def test_shipped_pipeline_on_real_val_images(val_samples: list) -> None:
    from denuc import DeNuC

    model = DeNuC.load(device="cpu")
    preds, gts = {}, {}
    for s in val_samples:
        out = model(s.image, mpp=s.mpp)
        assert out.xy.shape[1] == 2 and out.mpp == s.mpp
        assert (out.inside(*s.image.shape[:2])).all()
        preds[s.stem], gts[s.stem] = out, s.points
    rep = evaluate(gts, preds, protocol="denuc", radius_um=3.0)
    assert rep.detection.f1 > 0.75
    assert rep.mean_f1 > 0.45
    assert set(rep.classes) == {"lymphocyte", "tumor", "stromal"}


def test_detector_is_resolution_aware(val_samples: list) -> None:
    """The same tissue given at 0.5 µm/px and as a 2x upsampled 0.25 µm/px image gives the
    same nuclei, in each input's own pixels."""
    from denuc import Detector
    from denuc.data.resample import resample

    det = Detector.load(device="cpu")
    s = val_samples[0]
    a = det.detect(s.image, mpp=0.5)
    b = det.detect(resample(s.image, 2.0), mpp=0.25).rescale(0.5)
    rep = evaluate({"x": a}, {"x": b}, protocol="hungarian", radius_px=2.0, classes=None)
    assert rep.detection.f1 > 0.9
