"""The `denuc` entry point: subcommands, version, and clean errors."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest

from denuc import __version__
from denuc.cli import COMMANDS, main

EXPECTED = {"evaluate", "convert", "train-detector", "detect", "train-head", "finetune", "predict", "summarize"}


def test_help_lists_every_subcommand(capsys: pytest.CaptureFixture[str]) -> None:
    assert EXPECTED <= set(COMMANDS)
    with pytest.raises(SystemExit) as e:
        main(["--help"])
    assert e.value.code == 0
    out = capsys.readouterr().out
    for name in EXPECTED:
        assert name in out


def test_version(capsys: pytest.CaptureFixture[str]) -> None:
    with pytest.raises(SystemExit):
        main(["--version"])
    assert __version__ in capsys.readouterr().out


def test_no_command_prints_help_and_fails(capsys: pytest.CaptureFixture[str]) -> None:
    assert main([]) == 2
    assert "COMMAND" in capsys.readouterr().out


def test_user_errors_are_one_line_messages_not_tracebacks(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    img = tmp_path / "a.png"
    img.write_bytes(b"not a png")
    out = str(tmp_path / "out")
    from PIL import Image

    Image.new("RGB", (32, 32), (200, 150, 200)).save(tmp_path / "b.png")
    assert main(["detect", str(tmp_path / "b.png"), "--out", out]) == 1  # no --mpp, none in the file
    err = capsys.readouterr().err
    assert "Traceback" not in err and "--mpp" in err and "b.png" in err
    assert main(["predict", str(img), "--out", out, "--mpp", "40"]) == 2  # a magnification, not µm/px
    err = capsys.readouterr().err
    assert "Traceback" not in err and "magnification" in err
    assert main(["detect", str(img), "--out", out, "--mpp", "0.5"]) == 1  # the bad file is named
    err = capsys.readouterr().err
    assert "Traceback" not in err and "a.png" in err and "not a readable image" in err


def test_console_script_runs() -> None:
    exe = Path(sys.executable).with_name("denuc")
    if not exe.exists():
        pytest.skip("denuc console script not installed in this environment")
    r = subprocess.run([str(exe), "--help"], capture_output=True, text=True, timeout=60)
    assert r.returncode == 0 and "predict" in r.stdout


def test_help_does_not_import_torch() -> None:
    """Building the parser (every ``--help``, every command's start) imports no subcommand's heavy
    dependencies: a fresh interpreter, as ``denuc --help`` starts."""
    code = "import sys; from denuc.cli import build_parser; build_parser(); print('torch' in sys.modules)"
    env = {**os.environ, "PYTHONPATH": str(Path(__file__).resolve().parents[1] / "src")}
    r = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, env=env, timeout=120)
    assert r.returncode == 0, r.stderr[-2000:]
    assert r.stdout.strip() == "False"


def test_a_command_builds_only_its_own_parser() -> None:
    """``denuc predict ...`` imports the predict command's module, not the others' (``evaluate``
    pulls in scipy's matching code), while ``denuc --help`` still lists every command."""
    code = ("import sys; from denuc.cli import build_parser, COMMANDS; p = build_parser(only='predict'); "
            "print(sorted(k for k in COMMANDS.values() if k in sys.modules)); "
            "build_parser(); print(sorted(k for k in COMMANDS.values() if k in sys.modules) == sorted(COMMANDS.values()))")
    env = {**os.environ, "PYTHONPATH": str(Path(__file__).resolve().parents[1] / "src")}
    r = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, env=env, timeout=120)
    assert r.returncode == 0, r.stderr[-2000:]
    assert r.stdout.split("\n")[:2] == ["['denuc.pipeline_cli']", "True"]
