"""Model folders: a detector and a classification head that belong together, with ``model.yaml``.

``denuc finetune`` writes one; ``denuc predict --model DIR`` and ``DeNuC.load(model=DIR)`` read
it. The models shipped with the package are model folders too, one per tissue, under
``assets/models/<name>/`` (:func:`shipped_models`; ``denuc models`` lists them), so
``--model NAME`` and ``DeNuC.load(model=NAME)`` take a shipped model's name wherever they take
a folder (:func:`resolve_model`)::

    DIR/model.yaml              # written last: a folder with it is complete
    DIR/detector.safetensors    # the point detector (self-describing checkpoint)
    DIR/head.safetensors        # the classification head (self-describing checkpoint)
    DIR/report/                 # optional: report.md, report.json, plots

``model.yaml`` keys (the file names are relative to DIR)::

    format: denuc-model/1
    detector: detector.safetensors
    head: head.safetensors
    encoder: efficientnet-lite0      # the head's encoder
    weights: null                    # encoder weights source; null = the encoder's own
    classes: [lymphocyte, tumor, stromal]
    mpp: 0.25                        # µm/px the detector works at (inputs are resampled to it)
    thresholds: {detection: 0.35}    # detection score threshold chosen on val

A shipped model's ``model.yaml`` may point at files outside its folder (``../../detector.safetensors``:
the shipped models share one detector) and adds descriptive keys that :func:`load_model_dir`
keeps in ``raw`` without checking: ``description``, ``tissue``, ``data``, ``scores``,
``license`` and ``citation``; a ``NOTICE.md`` beside it names the data and the citation.
"""

from __future__ import annotations

import os
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from denuc.errors import ModelError

MODEL_YAML = "model.yaml"
#: The shipped models' folders (``<name>/model.yaml``).
SHIPPED_ROOT = Path(__file__).resolve().parent / "assets" / "models"
#: The shipped model that ``DeNuC.load()`` and ``denuc predict`` use when none is named.
DEFAULT_MODEL = "brca-m2c"
MODEL_FORMAT = "denuc-model/1"
#: Keys every model.yaml must have.
REQUIRED_KEYS = ("detector", "head", "classes", "mpp")


@dataclass
class ModelDir:
    """A loaded ``model.yaml`` (see the module docstring).

    Attributes:
        root: the folder; ``detector``, ``head``: the checkpoint files (existing).
        encoder: the head's encoder name, or None when model.yaml does not name it (the
            head's own metadata then says).
        weights: encoder weights source (None = the encoder's own).
        classes: the head's class names; ``mpp``: µm/px the detector works at.
        thresholds: named score thresholds chosen on val (e.g. ``detection``).
        raw: the whole model.yaml mapping.
    """

    root: Path
    detector: Path
    head: Path
    encoder: str | None
    weights: str | None
    classes: tuple[str, ...]
    mpp: float
    thresholds: dict[str, float] = field(default_factory=dict)
    raw: dict[str, Any] = field(default_factory=dict)


def is_model_dir(path: str | os.PathLike[str]) -> bool:
    """True when ``path`` is a folder holding ``model.yaml`` (a model folder, maybe a broken one)."""
    p = Path(path)
    return p.is_dir() and (p / MODEL_YAML).is_file()


def _file(root: Path, raw: dict[str, Any], key: str, src: Path) -> Path:
    v = raw.get(key)
    if not isinstance(v, str) or not v.strip():
        raise ModelError(f"{src}: '{key}' must name the {key} checkpoint file in the folder; got {v!r}")
    p = Path(v)
    p = p if p.is_absolute() else root / p
    if not p.is_file():
        raise ModelError(f"{src}: its {key} file {p} does not exist")
    return p


def load_model_dir(path: str | os.PathLike[str]) -> ModelDir:
    """Read and check the model folder ``path``: :class:`ModelError` (one line naming the file)
    for a missing folder, model.yaml or checkpoint, unreadable YAML, a missing key or a
    value of the wrong type."""
    import yaml

    from denuc.core.mpp import check_mpp
    from denuc.errors import ResolutionError

    root = Path(path)
    if not root.is_dir():
        raise ModelError(f"{root}: model folder does not exist")
    src = root / MODEL_YAML
    if not src.is_file():
        raise ModelError(f"{root}: not a model folder (no {MODEL_YAML}; `denuc finetune` writes one)")
    try:
        raw = yaml.safe_load(src.read_text(encoding="utf-8"))
    except (OSError, UnicodeDecodeError) as e:
        raise ModelError(f"{src}: cannot read ({e})") from None
    except yaml.YAMLError as e:
        raise ModelError(f"{src}: not valid YAML ({' '.join(str(e).split())})") from None
    if not isinstance(raw, dict):
        raise ModelError(f"{src}: must be a YAML mapping with keys {', '.join(REQUIRED_KEYS)}")
    fmt = raw.get("format", MODEL_FORMAT)
    if not isinstance(fmt, str) or not fmt.startswith("denuc-model/"):
        raise ModelError(f"{src}: unknown model folder format {fmt!r}")
    if fmt != MODEL_FORMAT:
        raise ModelError(f"{src}: model folder format {fmt!r} is not {MODEL_FORMAT!r} (made by another DeNuC version?)")
    missing = [k for k in REQUIRED_KEYS if k not in raw]
    if missing:
        raise ModelError(f"{src}: missing key(s) {missing}")
    det, head = _file(root, raw, "detector", src), _file(root, raw, "head", src)
    classes = raw["classes"]
    if not isinstance(classes, list) or not classes or not all(isinstance(c, str) and c for c in classes):
        raise ModelError(f"{src}: 'classes' must be a non-empty list of class names; got {classes!r}")
    try:
        mpp = check_mpp(raw["mpp"], f"{src}: mpp")
    except ResolutionError as e:
        raise ModelError(str(e)) from None
    enc, weights = raw.get("encoder"), raw.get("weights")
    for key, v in (("encoder", enc), ("weights", weights)):
        if v is not None and (not isinstance(v, str) or not v):
            raise ModelError(f"{src}: '{key}' must be a name or null; got {v!r}")
    thr = raw.get("thresholds") or {}
    if not isinstance(thr, dict) or not all(isinstance(v, (int, float)) and not isinstance(v, bool)
                                            for v in thr.values()):
        raise ModelError(f"{src}: 'thresholds' must map names to numbers; got {thr!r}")
    return ModelDir(root=root, detector=det, head=head, encoder=enc, weights=weights, classes=tuple(classes),
                    mpp=mpp, thresholds={str(k): float(v) for k, v in thr.items()}, raw=raw)


def shipped_models() -> dict[str, Path]:
    """``{name: folder}`` of the models shipped with the package (every ``assets/models/<name>/``
    holding a ``model.yaml``), in name order; the registry behind ``--model NAME``."""
    if not SHIPPED_ROOT.is_dir():
        return {}
    return {d.name: d for d in sorted(SHIPPED_ROOT.iterdir()) if is_model_dir(d)}


def resolve_model(model: str | os.PathLike[str]) -> ModelDir:
    """The model folder ``model`` names: a folder holding ``model.yaml`` (it wins over a shipped
    model of the same name), else a shipped model's name (:func:`shipped_models`).

    :class:`ModelError` (one line) for a name that is neither, listing the shipped names.
    """
    p = Path(model)
    if is_model_dir(p):
        return load_model_dir(p)
    known = shipped_models()
    if isinstance(model, str) and model in known:
        return load_model_dir(known[model])
    if p.exists():
        return load_model_dir(p)  # its own message: not a model folder
    raise ModelError(f"--model {model}: neither a model folder nor a shipped model; shipped: "
                     f"{', '.join(known) or '(none installed)'} (`denuc models` lists them)")


def describe_model(md: ModelDir) -> dict[str, Any]:
    """What ``denuc models`` prints of a model folder: name, classes, mpp, encoder, the shipped
    models' descriptive keys (``description``, ``tissue``, ``data``, ``scores``, ``license``,
    ``citation``) where present, and the notice file."""
    out: dict[str, Any] = {"name": md.raw.get("name") or md.root.name, "classes": list(md.classes), "mpp": md.mpp,
                           "encoder": md.encoder, "detector": md.detector.name, "head": md.head.name}
    for k in ("description", "tissue", "data", "scores", "license", "citation"):
        if k in md.raw:
            out[k] = md.raw[k]
    notice = md.root / "NOTICE.md"
    if notice.is_file():
        out["notice"] = str(notice)
    return out
