"""`denuc predict` with no model arguments: the shipped detector + head on the bundled sample."""

from __future__ import annotations

import argparse
from pathlib import Path

import pytest

from denuc.core.result import Nuclei
from denuc.pipeline import DEFAULT_HEAD

ASSETS = DEFAULT_HEAD.parent
SAMPLE = ASSETS / "sample"


@pytest.mark.skipif(not (DEFAULT_HEAD.is_file() and (ASSETS / "detector.safetensors").is_file()),
                    reason="shipped head/detector not in src/denuc/assets")
def test_predict_with_shipped_models(tmp_path: Path) -> None:
    from denuc import pipeline_cli
    from denuc.classify.head import read_meta

    p = argparse.ArgumentParser()
    pipeline_cli.configure(p)
    assert pipeline_cli.main(p.parse_args([str(SAMPLE), "--mpp", "0.5", "--out", str(tmp_path)])) == 0
    meta = read_meta(DEFAULT_HEAD)
    csv = tmp_path / "brca-m2c-sample.csv"
    assert csv.read_text().splitlines()[0] == "x,y,class,score," + ",".join(f"prob_{c}" for c in meta.classes)
    n = Nuclei.read_csv(csv, class_names=meta.classes)
    assert len(n) > 50 and len(set(n.class_ids.tolist())) >= 2
