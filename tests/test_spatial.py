"""Spatial-analysis helpers (clusters, adjusted Rand index, neighbourhood enrichment) and the
example of docs/spatial.md, run on a small image made from real BRCA-M2C test tiles."""

from __future__ import annotations

import re
from pathlib import Path

import numpy as np
import pytest

from denuc.evaluate.spatial import adjusted_rand_index, embedding_clusters, neighbourhood_enrichment

ROOT = Path(__file__).resolve().parents[1]


def test_adjusted_rand_index_known_values() -> None:
    a = np.array([0, 0, 0, 1, 1, 1])
    assert adjusted_rand_index(a, a) == pytest.approx(1.0)
    assert adjusted_rand_index(a, 5 - a) == pytest.approx(1.0)  # names do not matter
    # worked by hand: contingency [[2, 1], [0, 3]] -> index 1 + 3 = 4; rows 3, 3 -> 6 pairs; cols 2, 4 -> 7
    b = np.array([0, 0, 1, 1, 1, 1])
    expected = (4 - 6 * 7 / 15) / ((6 + 7) / 2 - 6 * 7 / 15)
    assert adjusted_rand_index(a, b) == pytest.approx(expected)
    rng = np.random.default_rng(0)
    assert abs(adjusted_rand_index(rng.integers(0, 3, 5000), rng.integers(0, 3, 5000))) < 0.01  # chance ~ 0


def test_clusters_recover_separated_groups() -> None:
    rng = np.random.default_rng(1)
    truth = np.repeat(np.arange(3), 60)
    centres = rng.normal(size=(3, 40)) * 4
    x = centres[truth] + rng.normal(size=(180, 40))
    c = embedding_clusters(x.astype(np.float16).astype(np.float32), 3, seed=0)
    assert adjusted_rand_index(c, truth) == pytest.approx(1.0)
    np.testing.assert_array_equal(c, embedding_clusters(x.astype(np.float16).astype(np.float32), 3, seed=0))


def test_neighbourhood_enrichment_sees_segregated_and_mixed_classes() -> None:
    rng = np.random.default_rng(2)
    left = rng.uniform([0, 0], [50, 100], size=(150, 2))
    right = rng.uniform([50, 0], [100, 100], size=(150, 2))
    xy = np.concatenate([left, right])
    lab = np.repeat([0, 1], 150)
    z, counts = neighbourhood_enrichment(xy, lab, radius=8.0, n_perm=100)
    assert z[0, 0] > 5 and z[1, 1] > 5 and z[0, 1] < -5  # segregated halves
    assert (counts == counts.T).all()
    from scipy.spatial import cKDTree

    assert counts[0, 0] + counts[1, 1] + counts[0, 1] == len(cKDTree(xy).query_pairs(8.0))
    mixed, _ = neighbourhood_enrichment(xy, rng.permutation(lab), radius=8.0, n_perm=100)
    assert np.abs(mixed).max() < 4  # random labels: no enrichment


def example_code() -> str:
    text = (ROOT / "docs" / "spatial.md").read_text()
    blocks = re.findall(r"```python\n(# example:.*?)```", text, flags=re.S)
    assert len(blocks) == 1, "docs/spatial.md must hold one python block starting with '# example:'"
    return blocks[0]


@pytest.mark.real_data
@pytest.mark.slow
def test_docs_example_runs_on_real_brca_tiles(brca_dir: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch,
                                              capsys: pytest.CaptureFixture[str]) -> None:
    from PIL import Image

    from denuc.cli import main
    from denuc.data import open_dataset

    ds = open_dataset(brca_dir)
    stems = ds.stems("test")[:2]
    crops = [ds.load(s).image[:200, :200] for s in stems]  # two real tiles side by side, 0.5 µm/px
    (tmp_path / "in").mkdir()
    Image.fromarray(np.concatenate(crops, axis=1)).save(tmp_path / "in" / "tile.png")
    assert main(["predict", str(tmp_path / "in" / "tile.png"), "--out", str(tmp_path / "cells"), "--mpp", "0.5",
                 "--format", "h5ad", "--no-overlay", "--device", "cpu"]) == 0
    monkeypatch.chdir(tmp_path)
    scope: dict[str, object] = {}
    exec(compile(example_code(), "docs/spatial.md", "exec"), scope)  # noqa: S102 - the documented example
    n = len(scope["obs"])  # type: ignore[arg-type]
    assert n > 50 and len(scope["clusters"]) == n  # type: ignore[arg-type]
    assert -1 <= scope["ari"] <= 1  # type: ignore[operator]
    z = scope["z"]
    assert isinstance(z, np.ndarray) and z.shape == (3, 3) and np.isfinite(z).all()
    assert "clusters vs head classes: ARI" in capsys.readouterr().out
