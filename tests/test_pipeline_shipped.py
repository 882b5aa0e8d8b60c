"""The shipped detector + head with no model arguments, on a crop of the bundled sample."""

from __future__ import annotations

import pytest

from denuc.data.image import read_image
from denuc.pipeline import DEFAULT_HEAD

ASSETS = DEFAULT_HEAD.parent
SAMPLE = ASSETS / "sample" / "brca-m2c-sample.png"


@pytest.mark.skipif(not (DEFAULT_HEAD.is_file() and (ASSETS / "detector.safetensors").is_file()),
                    reason="shipped head/detector not in src/denuc/assets")
def test_shipped_models_classify_the_sample() -> None:
    from denuc import DeNuC
    from denuc.classify.head import head_taps, read_meta

    model = DeNuC.load(device="cpu")
    meta = read_meta(DEFAULT_HEAD)
    assert model.encoder.name == meta.encoder == "efficientnet-lite0"
    assert model.encoder.taps == head_taps(meta) and model.encoder.dim == meta.dim  # the head's own taps
    assert model.featurizer.mpp == meta.mpp
    out = model(read_image(SAMPLE)[:200, :200], mpp=0.5)
    assert out.class_names == tuple(meta.classes) and len(out) > 10
    assert out.probs is not None and out.probs.shape == (len(out), len(meta.classes))
    assert (out.xy >= 0).all() and (out.xy < 200).all()
    assert set(out.meta["speed"]) == {"detect", "encode", "classify"}


@pytest.mark.skipif(not (ASSETS / "detector.safetensors").is_file(), reason="shipped detector not in src/denuc/assets")
def test_shipped_detector_uses_the_val_chosen_threshold_of_each_reported_tta() -> None:
    """Every pass count with a reported result (benchmarks/reported/detector_brca_*stain2*.json)
    gets the threshold that result was scored at, not the one-pass fallback."""
    import json
    from pathlib import Path

    from denuc.detect.api import Detector

    reported = Path(__file__).resolve().parents[1] / "benchmarks" / "reported"
    runs = [json.loads(p.read_text()) for p in sorted(reported.glob("detector_brca_det_lite0_stain2*.json"))]
    if not runs:
        pytest.skip("reported detector results not in the checkout")
    want = {}
    for r in runs:
        want[int(r["tta"])] = float(r["score_threshold"])
        want.update({int(k): float(v["score_threshold"]) for k, v in r.get("tta_results", {}).items()})
    assert {1, 4, 8} <= set(want)
    for n, thr in want.items():
        assert Detector.load(device="cpu", tta=n).threshold == pytest.approx(thr), n
