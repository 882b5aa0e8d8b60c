"""``denuc models``: the models shipped with the package (one per tissue), for ``--model NAME``.

Each is a model folder (:mod:`denuc.modeldir`) under ``assets/models/<name>/``; this lists its
classes, training data, scores and licence/citation notes. No torch import (fast).
"""

from __future__ import annotations

import argparse
import json

HELP = "list the shipped models (classes, training data, scores, licence) usable as --model NAME"


def configure(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--json", action="store_true", help="print one JSON object {name: details} (default: text)")


def describe_all() -> dict[str, dict[str, object]]:
    """``{name: describe_model(...)}`` of every shipped model (:func:`denuc.modeldir.shipped_models`)."""
    from denuc.errors import ModelError
    from denuc.modeldir import DEFAULT_MODEL, describe_model, load_model_dir, shipped_models

    out: dict[str, dict[str, object]] = {}
    for name, folder in shipped_models().items():
        try:
            d = describe_model(load_model_dir(folder))
        except ModelError as e:  # a broken installation: said, and the others still listed
            d = {"name": name, "error": str(e), "classes": []}
        d["default"] = name == DEFAULT_MODEL
        out[name] = d
    return out


def main(args: argparse.Namespace) -> int:
    models = describe_all()
    if args.json:
        print(json.dumps(models, indent=2))
        return 0
    if not models:
        print("no shipped models installed")
        return 0
    for name, d in models.items():
        print(f"{name}{'  (default)' if d['default'] else ''}: {d.get('description', '')}")
        if "error" in d:
            print(f"  unusable: {d['error']}")
            continue
        print(f"  classes:  {', '.join(d['classes'])}")  # type: ignore[arg-type]
        print(f"  encoder:  {d['encoder']}; detector works at {d['mpp']} µm/px")
        for key in ("data", "license", "citation"):
            if key in d:
                print(f"  {key + ':':9s} {d[key]}")
        scores = d.get("scores") or {}
        if scores:
            print("  scores:   " + ", ".join(f"{k} {v}" for k, v in scores.items()))  # type: ignore[union-attr]
        if "notice" in d:
            print(f"  notice:   {d['notice']}")
    return 0
