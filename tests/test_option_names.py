"""One meaning per option name across commands: the dataset is the first positional argument of
``train-detector``, ``train-head``, ``finetune`` and ``evaluate``; the training resolution is
``--work-mpp`` (``--mpp`` is an input's own resolution in ``predict``). The former spellings
(``--data``, ``--gt``, ``--mpp`` in training) still work, with one deprecation line."""

from __future__ import annotations

import argparse
from pathlib import Path

import pytest

from denuc.cli import build_parser
from denuc.core.cliargs import dataset_of
from denuc.errors import InputError
from denuc.train.detector_cli import resolve_config


def _parse(argv: list[str]) -> argparse.Namespace:
    return build_parser().parse_args(argv)


def test_dataset_is_the_first_positional_argument_everywhere(capsys: pytest.CaptureFixture[str]) -> None:
    assert _parse(["train-detector", "D", "--out", "o"]).dataset_args == ["D"]
    assert _parse(["finetune", "D", "--out", "o"]).datasets == ["D"]
    assert dataset_of(_parse(["train-head", "D", "--out", "h.safetensors"]), "train-head") == "D"
    assert dataset_of(_parse(["evaluate", "D", "--pred", "P"]), "evaluate") == "D"
    assert capsys.readouterr().err == ""  # the current spelling warns about nothing


@pytest.mark.parametrize(("argv", "old"), [(["train-head", "--data", "D", "--out", "h"], "--data"),
                                           (["evaluate", "--gt", "D", "--pred", "P"], "--gt")])
def test_former_dataset_flags_still_work_with_one_warning(argv: list[str], old: str,
                                                          capsys: pytest.CaptureFixture[str]) -> None:
    assert dataset_of(_parse(argv), argv[0]) == "D"
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and f"{old} is deprecated" in err[0] and "DATASET" in err[0]


def test_dataset_missing_or_given_twice_is_refused() -> None:
    with pytest.raises(InputError, match=r"denuc evaluate DATASET"):
        dataset_of(_parse(["evaluate", "--pred", "P"]), "evaluate")
    with pytest.raises(InputError, match="two datasets"):
        dataset_of(_parse(["train-head", "A", "--data", "B", "--out", "h"]), "train-head")
    with pytest.raises(InputError, match="one dataset folder; got 2"):
        dataset_of(_parse(["evaluate", "A", "B", "--pred", "P"]), "evaluate")


def test_training_resolution_is_work_mpp(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    assert resolve_config(_parse(["train-detector", "D", "--work-mpp", "0.5"])).mpp == 0.5
    assert _parse(["train-head", "D", "--out", "h", "--work-mpp", "0.5"]).mpp == 0.5
    assert capsys.readouterr().err == ""
    assert resolve_config(_parse(["train-detector", "D", "--mpp", "0.4"])).mpp == 0.4
    assert _parse(["train-head", "D", "--out", "h", "--mpp", "0.4"]).mpp == 0.4
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 2 and all("--mpp is deprecated here; use --work-mpp" in e for e in err)
    help_text = build_parser()._subparsers._group_actions[0].choices["train-detector"].format_help()  # type: ignore[union-attr]
    assert "--work-mpp WORK_MPP" not in help_text and "--work-mpp MPP" in help_text and "  --mpp" not in help_text
    # YAML: the option's name (mpp) or the flag's (work_mpp), not both
    (tmp_path / "a.yaml").write_text("work_mpp: 0.3\n")
    assert resolve_config(_parse(["train-detector", "--config", str(tmp_path / "a.yaml")])).mpp == 0.3
    (tmp_path / "b.yaml").write_text("work_mpp: 0.3\nmpp: 0.5\n")
    with pytest.raises(InputError, match="not both"):
        resolve_config(_parse(["train-detector", "--config", str(tmp_path / "b.yaml")]))
