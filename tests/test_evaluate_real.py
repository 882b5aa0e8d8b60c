"""Real check: the published MCSpatNet predictions on the BRCA-M2C test split.

The expected values are the ones stated in
``brca-m2c/reference_predictions_mcspatnet/README.md`` (measured there with an independent
matcher); the tolerance (±0.002) is the one the evaluation issue asks for.
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path

import pytest

from denuc.evaluate import evaluate
from denuc.evaluate.predictions import convert_yxc_predictions

pytestmark = pytest.mark.real_data

TOL = 0.002
CLASSES = ("lymphocyte", "tumor", "stromal")
# (protocol, radius px) -> (detection F1, lymphocyte, tumor, stromal, mean class F1); None = not stated
README = {
    ("mcspatnet", 6.0): (0.854, 0.651, 0.795, 0.549, 0.665),
    ("mcspatnet", 3.0): (0.676, 0.595, 0.613, 0.439, None),
    ("hungarian", 6.0): (0.856, 0.651, 0.796, 0.549, 0.665),
    ("hungarian", 3.0): (0.700, 0.605, 0.639, 0.453, 0.566),
}


@pytest.fixture(scope="module")
def pred_dir(brca_dir: Path, tmp_path_factory: pytest.TempPathFactory) -> Path:
    out = tmp_path_factory.mktemp("mcspatnet_preds")
    written = convert_yxc_predictions(brca_dir / "reference_predictions_mcspatnet" / "points", out)
    assert len(written) == 30
    return out


@pytest.mark.parametrize("protocol,radius", list(README))
def test_reference_numbers(brca_dir: Path, pred_dir: Path, protocol: str, radius: float) -> None:
    rep = evaluate(brca_dir, pred_dir, protocol=protocol, radius_px=radius, split="test")
    assert (rep.detection.n_pred, rep.detection.n_gt, rep.n_images) == (9298, 8858, 30)
    got = (rep.detection.f1, *(rep.classes[c].f1 for c in CLASSES), rep.mean_f1)
    for name, g, want in zip(("det", *CLASSES, "mean"), got, README[(protocol, radius)]):
        if want is not None:
            assert g == pytest.approx(want, abs=TOL), f"{protocol} r={radius} {name}: {g:.4f} vs {want}"


def test_cli_reads_the_raw_files_directly(brca_dir: Path, tmp_path: Path) -> None:
    from denuc.evaluate import cli

    parser = argparse.ArgumentParser()
    cli.configure(parser)
    out = tmp_path / "r6.json"
    args = parser.parse_args([str(brca_dir), "--split", "test",
                              "--pred", str(brca_dir / "reference_predictions_mcspatnet" / "points"),
                              "--pred-format", "brca-m2c", "--protocol", "mcspatnet", "--radius-px", "6",
                              "--json", str(out)])
    assert cli.main(args) == 0
    d = json.loads(out.read_text())
    assert d["detection"]["f1"] == pytest.approx(0.854, abs=TOL)
    assert d["mean_f1"] == pytest.approx(0.665, abs=TOL)
