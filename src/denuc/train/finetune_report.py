"""The report of ``denuc finetune``: ``report.json``, ``report.md`` and PNG plots.

Plots (training curves of the detector and the head, the reliability diagram of the head
before and after temperature scaling) are drawn with matplotlib when it is installed, else
with Pillow as simple line plots: the report never needs an extra package.
"""

from __future__ import annotations

import io
import json
import math
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from denuc.core.files import atomic_write_bytes, atomic_write_text

COLORS = ((31, 119, 180), (214, 39, 40), (44, 160, 44), (148, 103, 189), (255, 127, 14))


@dataclass
class Series:
    """One line: ``label``, x values, y values (NaN/None points are skipped)."""

    label: str
    x: Sequence[float]
    y: Sequence[float | None]
    marker: bool = True


@dataclass
class Panel:
    """One plot: title, axis labels, lines; ``diagonal`` draws y = x (reliability diagrams)."""

    title: str
    xlabel: str
    ylabel: str
    series: list[Series] = field(default_factory=list)
    diagonal: bool = False
    limits: tuple[float, float, float, float] | None = None  # x0, x1, y0, y1


def _points(s: Series) -> list[tuple[float, float]]:
    return [(float(a), float(b)) for a, b in zip(s.x, s.y, strict=False)
            if b is not None and math.isfinite(float(b)) and math.isfinite(float(a))]


def _limits(p: Panel) -> tuple[float, float, float, float]:
    if p.limits is not None:
        return p.limits
    pts = [q for s in p.series for q in _points(s)]
    if not pts:
        return 0.0, 1.0, 0.0, 1.0
    xs, ys = [q[0] for q in pts], [q[1] for q in pts]
    x0, x1, y0, y1 = min(xs), max(xs), min(ys), max(ys)
    if x1 == x0:
        x0, x1 = x0 - 1, x1 + 1
    pad = 0.05 * (y1 - y0) if y1 > y0 else max(abs(y0) * 0.1, 0.05)
    return x0, x1, y0 - pad, y1 + pad


def _ticks(lo: float, hi: float, n: int = 5) -> list[float]:
    step = (hi - lo) / max(n - 1, 1)
    mag = 10 ** math.floor(math.log10(step)) if step > 0 else 1.0
    step = min((m * mag for m in (1, 2, 2.5, 5, 10) if m * mag >= step), default=step)
    start = math.ceil(lo / step) * step
    out, v = [], start
    while v <= hi + 1e-9 * step:
        out.append(round(v, 10))
        v += step
    return out


def _fmt(v: float) -> str:
    return f"{v:g}" if abs(v) >= 1e-3 or v == 0 else f"{v:.1e}"


def _pillow_panel(p: Panel, size: tuple[int, int] = (520, 380)) -> Any:
    from PIL import Image, ImageDraw, ImageFont

    w, h = size
    img = Image.new("RGB", size, "white")
    d = ImageDraw.Draw(img)
    font = ImageFont.load_default()
    left, right, top, bottom = 62, 16, 30, 48
    x0, x1, y0, y1 = _limits(p)

    def px(x: float, y: float) -> tuple[float, float]:
        return (left + (x - x0) / (x1 - x0) * (w - left - right),
                h - bottom - (y - y0) / ((y1 - y0) or 1.0) * (h - top - bottom))

    d.rectangle([left, top, w - right, h - bottom], outline=(0, 0, 0))
    for t in _ticks(x0, x1):
        xx, _ = px(t, y0)
        d.line([xx, h - bottom, xx, h - bottom + 4], fill=(0, 0, 0))
        d.text((xx - 3 * len(_fmt(t)), h - bottom + 6), _fmt(t), fill=(0, 0, 0), font=font)
    for t in _ticks(y0, y1):
        _, yy = px(x0, t)
        d.line([left - 4, yy, left, yy], fill=(0, 0, 0))
        d.line([left, yy, w - right, yy], fill=(232, 232, 232))
        d.text((left - 8 - 6 * len(_fmt(t)), yy - 6), _fmt(t), fill=(0, 0, 0), font=font)
    d.text((left, 8), p.title, fill=(0, 0, 0), font=font)
    d.text(((w - 6 * len(p.xlabel)) / 2, h - 18), p.xlabel, fill=(0, 0, 0), font=font)
    d.text((4, top - 14), p.ylabel, fill=(0, 0, 0), font=font)
    if p.diagonal:
        d.line([px(max(x0, y0), max(x0, y0)), px(min(x1, y1), min(x1, y1))], fill=(150, 150, 150), width=1)
    for i, s in enumerate(p.series):
        col = COLORS[i % len(COLORS)]
        pts = [px(*q) for q in _points(s)]
        if len(pts) > 1:
            d.line(pts, fill=col, width=2)
        if s.marker:
            for a, b in pts:
                d.ellipse([a - 2.5, b - 2.5, a + 2.5, b + 2.5], fill=col)
        ly = top + 6 + 14 * i
        d.line([left + 8, ly + 6, left + 24, ly + 6], fill=col, width=2)
        d.text((left + 28, ly), s.label, fill=col, font=font)
    return img


def render_png(panels: Sequence[Panel]) -> bytes:
    """The panels side by side as PNG bytes (matplotlib when installed, else Pillow)."""
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        plt = None
    buf = io.BytesIO()
    if plt is not None:
        fig, axes = plt.subplots(1, len(panels), figsize=(5.2 * len(panels), 3.8), squeeze=False)
        for ax, p in zip(axes[0], panels, strict=True):
            for s in p.series:
                pts = _points(s)
                ax.plot([q[0] for q in pts], [q[1] for q in pts], marker="o" if s.marker else None, ms=3, label=s.label)
            if p.diagonal:
                ax.plot([0, 1], [0, 1], color="0.6", lw=1)
            if p.limits is not None:
                ax.set_xlim(p.limits[0], p.limits[1])
                ax.set_ylim(p.limits[2], p.limits[3])
            ax.set(title=p.title, xlabel=p.xlabel, ylabel=p.ylabel)
            ax.grid(alpha=0.3)
            if p.series:
                ax.legend(fontsize=8)
        fig.tight_layout()
        fig.savefig(buf, format="png", dpi=100)
        plt.close(fig)
        return buf.getvalue()
    from PIL import Image

    imgs = [_pillow_panel(p) for p in panels]
    out = Image.new("RGB", (sum(i.width for i in imgs), max(i.height for i in imgs)), "white")
    x = 0
    for i in imgs:
        out.paste(i, (x, 0))
        x += i.width
    out.save(buf, format="PNG")
    return buf.getvalue()


def _reliability_series(bins: list[dict[str, Any]], label: str) -> Series:
    used = [b for b in bins if b.get("count")]
    return Series(label, [b["confidence"] for b in used], [b["accuracy"] for b in used])


def plots(rep: dict[str, Any], det_hist: list[dict[str, Any]], head_hist: list[dict[str, Any]]
          ) -> dict[str, list[Panel]]:
    """File name -> panels of every plot the report has data for."""
    out: dict[str, list[Panel]] = {}
    if det_hist:
        ep = [r["epoch"] for r in det_hist]
        panels = [Panel("detector: training loss", "epoch", "loss", [Series("train loss", ep, [r["loss"] for r in det_hist])])]
        if any("val_f1" in r for r in det_hist):
            panels.append(Panel("detector: val detection F1", "epoch", "F1",
                                [Series("val F1 (best threshold)", ep, [r.get("val_f1") for r in det_hist])]))
        out["detector_curves.png"] = panels
    if head_hist:
        ep = [r["epoch"] for r in head_hist]
        panels = [Panel("head: training loss", "epoch", "loss", [Series("train loss", ep, [r["loss"] for r in head_hist])])]
        if any("val" in r for r in head_hist):
            panels.append(Panel("head: val mean class F1 at detected points", "epoch", "F1",
                                [Series("val", ep, [r.get("val") for r in head_hist])]))
        out["head_curves.png"] = panels
    cal = rep.get("head", {}).get("calibration", {})
    if cal.get("reliability_before"):
        series = [_reliability_series(cal["reliability_before"], f"T = 1 (ECE {cal['ece_before']:.3f})")]
        if cal.get("reliability_after"):
            series.append(_reliability_series(cal["reliability_after"],
                                              f"T = {cal['temperature']:.2f} (ECE {cal['ece_after']:.3f})"))
        out["reliability.png"] = [Panel("head reliability on val GT points", "confidence (max probability)",
                                        "accuracy", series, diagonal=True, limits=(0.0, 1.0, 0.0, 1.0))]
    return out


def _prf(d: dict[str, Any]) -> str:
    return f"{d['precision']:.3f} | {d['recall']:.3f} | {d['f1']:.3f}"


def markdown(rep: dict[str, Any], images: Sequence[str]) -> str:
    """``report.md`` text."""
    lines = ["# denuc finetune report", ""]
    lines.append(f"Datasets: {', '.join(rep.get('datasets', []))}. Classes: {', '.join(rep['classes'])}.")
    held = rep.get("held_back_val") or []
    lines.append(f"Val: {rep['val_images']} images, " + (
        f"held back from the training images of {', '.join(Path(h).name for h in held)} (no val split; by image, "
        "seeded)." if held else "the datasets' val splits."))
    lines.append(f"Training points per class: {rep['train_points']}; val points: {rep['val_points']}.")
    det = rep.get("detector", {})
    lines += ["", "## Detector (val, denuc protocol, 3 µm)", ""]
    if "fine_tuned" in det:
        lines += ["| detector | threshold | precision | recall | F1 |", "|---|---|---|---|---|"]
        for key, name in (("start", "starting detector"), ("fine_tuned", "fine-tuned")):
            v = det[key]
            lines.append(f"| {name} | {v['threshold']:g} | {_prf(v)} |")
        lines.append("")
    lines.append(f"Kept: the {'fine-tuned' if det.get('chosen') == 'fine-tuned' else 'starting'} detector, score "
                 f"threshold {det.get('threshold', float('nan')):g} (chosen on val).")
    pl = rep.get("pipeline")
    if pl:
        lines += ["", "## The finished model on val (detected points, classes scored by matching)", "",
                  "| | precision | recall | F1 |", "|---|---|---|---|", f"| detection | {_prf(pl['detection'])} |"]
        for c, v in pl["classes"].items():
            lines.append(f"| {c} | {_prf(v)} |")
        lines += ["", f"Mean class F1: {pl['mean_class_f1']:.4f} ({pl['seconds_per_image']} s per image)."]
    sh = rep.get("shipped")
    if sh:
        lines += ["", f"## Compared with the shipped model `{sh['model']}` (same val images)", ""]
        if "detection" not in sh:
            lines.append(sh.get("note", "not compared"))
        else:
            new_m = f"{pl['mean_class_f1']:.4f}" if pl else "—"
            old_m = f"{sh['mean_class_f1']:.4f}" if sh.get("mean_class_f1") is not None else "— (other classes)"
            lines += ["| model | detection F1 | mean class F1 |", "|---|---|---|",
                      f"| this model | {pl['detection']['f1']:.4f} | {new_m} |" if pl else "| this model | — | — |",
                      f"| shipped `{sh['model']}` | {sh['detection']['f1']:.4f} | {old_m} |"]
            if not sh.get("classes_compared"):
                lines += ["", f"The shipped model's classes ({', '.join(sh['classes'])}) are not this dataset's: "
                          "only detection is compared."]
    hd = rep.get("head", {})
    if hd.get("candidates"):
        lines += ["", "## Head recipe (chosen on val)", "", "| recipe | val mean class F1 at detected points |",
                  "|---|---|"]
        for name, v in hd["candidates"].items():
            lines.append(f"| {name}{' (kept)' if name == hd.get('recipe') else ''} | "
                         + ("—" if v is None else f"{v:.4f}") + " |")
    elif hd.get("recipe"):
        lines += ["", f"Head recipe: {hd['recipe']}."]
    gp = hd.get("gt_points") or {}
    if gp:
        names = gp["classes"]
        lines += ["", "## Head at the val ground-truth points", "",
                  f"Accuracy {gp['accuracy']:.3f}, macro-F1 {gp['macro_f1']:.3f}.", "",
                  "| class | precision | recall | F1 | points |", "|---|---|---|---|---|"]
        for c, v in gp["per_class"].items():
            lines.append(f"| {c} | {_prf(v)} | {v['support']} |")
        lines += ["", "Confusion matrix (rows: true class, columns: predicted):", "",
                  "| true \\ predicted | " + " | ".join(names) + " |", "|---" * (len(names) + 1) + "|"]
        for c, row in zip(names, gp["confusion"], strict=True):
            lines.append(f"| {c} | " + " | ".join(str(v) for v in row) + " |")
    cal = rep.get("head", {}).get("calibration") or {}
    if cal:
        lines += ["", "## Calibration", ""]
        if "ece_after" in cal:
            lines.append(f"Temperature {cal['temperature']:.3f} fitted on {cal['points']} val points ({cal['source']}): "
                         f"ECE {cal['ece_before']:.3f} -> {cal['ece_after']:.3f}, NLL {cal['nll_before']:.3f} -> "
                         f"{cal['nll_after']:.3f}. The predicted classes do not change; the probabilities and "
                         "scores do.")
        else:
            lines.append(cal.get("note", ""))
    if images:
        lines += ["", "## Plots", ""] + [f"![{Path(i).stem}]({i})" for i in images]
    st = rep.get("stages", {})
    secs = {k: v.get("seconds") for k, v in st.items() if isinstance(v, dict) and v.get("seconds") is not None}
    if secs:
        lines += ["", "Stage times: " + ", ".join(f"{k} {v / 60:.1f} min" for k, v in secs.items()) + "."]
    return "\n".join(lines) + "\n"


def write_report(folder: Path, rep: dict[str, Any], det_hist: list[dict[str, Any]],
                 head_hist: list[dict[str, Any]]) -> list[Path]:
    """Write ``report.json``, the PNG plots and ``report.md`` into ``folder``; their paths."""
    folder.mkdir(parents=True, exist_ok=True)
    written = []
    rep = {**rep, "curves": {"detector": det_hist, "head": head_hist}}
    names = []
    for name, panels in plots(rep, det_hist, head_hist).items():
        written.append(atomic_write_bytes(folder / name, render_png(panels), gz=False))
        names.append(name)
    rep["plots"] = names
    written.append(atomic_write_text(folder / "report.json", json.dumps(rep, indent=1, default=str) + "\n"))
    written.append(atomic_write_text(folder / "report.md", markdown(rep, names)))
    return written
