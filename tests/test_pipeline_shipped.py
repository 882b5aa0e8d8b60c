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
    from denuc.classify.head import read_meta

    model = DeNuC.load(device="cpu")
    meta = read_meta(DEFAULT_HEAD)
    assert model.encoder.name == meta.encoder == "efficientnet-lite0"
    out = model(read_image(SAMPLE)[:200, :200], mpp=0.5)
    assert out.class_names == tuple(meta.classes) and len(out) > 10
    assert out.probs is not None and out.probs.shape == (len(out), len(meta.classes))
    assert (out.xy >= 0).all() and (out.xy < 200).all()
    assert set(out.meta["speed"]) == {"detect", "encode", "classify"}
