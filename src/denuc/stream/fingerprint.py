"""The fingerprint of one input's results: everything that changes them, recorded with them.

Each finished output set records it in ``<stem>.summary.json`` (key ``fingerprint``) and a
partly done input in its resume journal (``.<stem>.partial/plan.json``). A rerun computes the
fingerprint it would record and compares:

* the same: a finished input is skipped, a partly done one resumes;
* different: the input is refused with :class:`SettingsChanged`, whose message names each
  change (``mpp 0.25 -> 0.5, tta 4 -> 1``), unless ``overwrite`` is set (then it is redone).

What is in it (flat, JSON): the models (detector, encoder and head weight hashes, detector
threshold, TTA, window, what runs them, and a hash of every other model setting), the input's
level-0 mpp and where it came from, the tissue rule or mask file (name and sha256), the ROI
file (name and sha256), the thumbnail size tissue is found on, and DeNuC's version. What is not
in it: output formats, the overlay, tile size, chunk size and worker counts (the results do not
depend on them).
"""

from __future__ import annotations

import hashlib
import json
import os
from collections.abc import Mapping
from pathlib import Path
from typing import Any

from denuc.errors import InputError

#: Summary key holding the fingerprint.
FINGERPRINT_KEY = "fingerprint"


class SettingsChanged(InputError):
    """An input's existing (finished or partial) outputs were made with other settings."""

    def __init__(self, message: str, changes: list[str]) -> None:
        super().__init__(message)
        self.changes = changes


def file_sha256(path: str | os.PathLike[str]) -> str:
    """sha256 (hex) of a file's bytes, read in 1 MiB blocks."""
    h = hashlib.sha256()
    with open(path, "rb") as f:
        for block in iter(lambda: f.read(1 << 20), b""):
            h.update(block)
    return h.hexdigest()


#: Model description keys the fingerprint names itself (the rest are hashed together).
_NAMED_MODEL_KEYS = ("encoder", "encoder_weights_sha256", "head_sha256", "encoder_runtime", "classes")
_NAMED_DETECTOR_KEYS = ("sha256", "threshold", "tta", "window", "runtime")


def _models_rest(models: Mapping[str, Any]) -> str:
    """sha256 (16 hex) of the model description without the keys the fingerprint names itself
    and without file names (a copied checkpoint with the same bytes is the same model)."""
    def strip(v: Any) -> Any:
        if isinstance(v, Mapping):
            return {str(k): strip(x) for k, x in v.items() if k not in ("checkpoint", "path")}
        if isinstance(v, (list, tuple)):
            return [strip(x) for x in v]
        return v

    rest = {k: v for k, v in models.items() if k not in _NAMED_MODEL_KEYS}
    det = models.get("detector")
    if isinstance(det, Mapping):
        rest["detector"] = {k: v for k, v in det.items() if k not in _NAMED_DETECTOR_KEYS}
    text = json.dumps(strip(rest), sort_keys=True, default=str)
    return hashlib.sha256(text.encode()).hexdigest()[:16]


def run_fingerprint(models: Mapping[str, Any] | None, *, mpp: float, mpp_source: str, tissue: str,
                    tissue_mask: str | os.PathLike[str] | None, roi: str | os.PathLike[str] | None,
                    thumbnail_px: int) -> dict[str, Any]:
    """The fingerprint of one input's results (see the module docstring).

    Args:
        models: the model description (:meth:`denuc.pipeline.DeNuC.models`, or
            ``{"detector": Detector.describe()}`` for detection only).
        mpp: the input's level-0 µm per pixel; ``mpp_source``: where it came from.
        tissue: the tissue rule (``auto``/``none``), ignored when ``tissue_mask`` is given.
        tissue_mask, roi: the input's mask image and ROI GeoJSON files, or None.
    """
    from denuc import __version__

    models = dict(models or {})
    det = dict(models.get("detector") or {})
    fp: dict[str, Any] = {
        "mpp": float(mpp), "mpp_source": str(mpp_source),
        "detector_sha256": det.get("sha256"), "threshold": det.get("threshold"), "tta": det.get("tta"),
        "detector_window": det.get("window"), "runtime": det.get("runtime"),
        "encoder": models.get("encoder"), "encoder_weights_sha256": models.get("encoder_weights_sha256"),
        "head_sha256": models.get("head_sha256"), "encoder_runtime": models.get("encoder_runtime"),
        "classes": list(models["classes"]) if models.get("classes") is not None else None,
        "models_other": _models_rest(models),
        "tissue": "mask" if tissue_mask is not None else str(tissue),
        "tissue_mask": None if tissue_mask is None else Path(tissue_mask).name,
        "tissue_mask_sha256": None if tissue_mask is None else file_sha256(tissue_mask),
        "roi": None if roi is None else Path(roi).name,
        "roi_sha256": None if roi is None else file_sha256(roi),
        "thumbnail_px": int(thumbnail_px),
        "denuc": __version__,
    }
    return json.loads(json.dumps(fp, default=str))  # plain JSON, as it reads back from a file


def _show(v: Any) -> str:
    if v is None:
        return "none"
    if isinstance(v, str) and len(v) >= 32 and all(c in "0123456789abcdef" for c in v):
        return v[:12]
    if isinstance(v, float):
        return f"{v:g}"
    return str(v)


def fingerprint_changes(old: Mapping[str, Any] | None, new: Mapping[str, Any]) -> list[str]:
    """``["mpp 0.25 -> 0.5", "tta 4 -> 1", ...]``: each setting that differs (in ``new``'s key
    order; hashes shortened to 12 hex digits). ``old`` None (outputs of a DeNuC that recorded
    none) gives one entry saying so."""
    if old is None:
        return ["no fingerprint recorded (outputs of an older DeNuC)"]
    out = []
    for k in list(new) + [k for k in old if k not in new]:
        a, b = old.get(k), new.get(k)
        if a != b:
            out.append(f"{k} {_show(a)} -> {_show(b)}")
    return out


def check_same(old: Mapping[str, Any] | None, new: Mapping[str, Any], what: str) -> None:
    """Raise :class:`SettingsChanged` when ``old`` (recorded with ``what``) differs from ``new``."""
    changes = fingerprint_changes(old, new)
    if changes:
        raise SettingsChanged(f"{what} were made with other settings ({', '.join(changes)}); "
                              "use --overwrite (Python: RunOptions(overwrite=True)) to redo it, or another --out",
                              changes)


def recorded_fingerprint(summary_path: str | os.PathLike[str]) -> dict[str, Any] | None:
    """The fingerprint in a ``<stem>.summary.json``, or None when it has none or cannot be read."""
    try:
        d = json.loads(Path(summary_path).read_text(encoding="utf-8"))
    except (OSError, UnicodeDecodeError, ValueError):
        return None
    fp = d.get(FINGERPRINT_KEY) if isinstance(d, dict) else None
    return fp if isinstance(fp, dict) else None


def output_state(finals: list[Path], fingerprint: Mapping[str, Any], overwrite: bool) -> str:
    """What a run should do with an input whose final outputs are ``finals`` (the summary among
    them, the commit marker: written last, only when every other output is in place):

    * ``"todo"``: ``overwrite``, or no summary (never finished, or a run failed midway);
    * ``"done"``: summary and every other output present, same fingerprint;
    * ``"partial-done"``: finished with the same fingerprint but an output asked for now is
      missing (another ``--format``): it is run again.

    Raises:
        SettingsChanged: a summary with another fingerprint (and not ``overwrite``).
    """
    summary = next((p for p in finals if p.name.endswith(".summary.json")), None)
    if overwrite or summary is None or not summary.is_file():
        return "todo"
    check_same(recorded_fingerprint(summary), fingerprint, f"the outputs of {summary.name[:-13]} in {summary.parent}")
    return "done" if all(p.is_file() or p.is_dir() for p in finals) else "partial-done"  # a .zarr is a folder
