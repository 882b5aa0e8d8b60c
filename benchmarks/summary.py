"""Print the README's BRCA-M2C results table from the JSON files in benchmarks/reported/.

Every number in the README's results section comes from this command; each JSON file
names the command that produced it. Nothing here is measured: it only collects.

    python benchmarks/summary.py [--reported benchmarks/reported]
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path
from typing import Any

HERE = Path(__file__).resolve().parent
CLASSES = ("lymphocyte", "tumor", "stromal")


def _load(folder: Path, name: str) -> dict[str, Any] | None:
    p = folder / f"{name}.json"
    return json.loads(p.read_text()) if p.is_file() else None


def _fmt(v: float | None) -> str:
    return "—" if v is None else f"{v:.3f}"


def _row(name: str, det: float | None, per: dict[str, float | None], mean: float | None, source: str,
         gt_points: float | None = None) -> str:
    cells = [name, _fmt(det), *(_fmt(per.get(c)) for c in CLASSES), _fmt(mean), _fmt(gt_points), source]
    return "| " + " | ".join(cells) + " |"


def _shipped_detector_run() -> str | None:
    """Name of the benchmark JSON that describes the shipped detector (from its metadata)."""
    try:
        from denuc.detect.api import default_detector_path
        from denuc.detect.checkpoint import read_meta

        meta = read_meta(default_detector_path())
    except Exception:  # noqa: BLE001 - a summary must not fail on a missing optional piece
        return None
    return (meta.get("benchmark") or {}).get("name")


def rows(folder: Path) -> list[str]:
    out: list[str] = []
    ref = _load(folder, "reference_mcspatnet")
    if ref:
        for r in ref["results"]:
            if r.get("radius_px") == 6 and r.get("protocol") in ("mcspatnet", "hungarian"):
                per = {c: r["classes"][c]["f1"] for c in CLASSES}
                out.append(_row(f"MCSpatNet published predictions ({r['protocol']} rule)", r["detection"]["f1"],
                                per, r["mean_f1"], "reference_mcspatnet.json"))
    det_name = _shipped_detector_run()
    det = _load(folder, det_name) if det_name else None
    if det:
        out.append(_row(f"DeNuC shipped detector ({det['backbone']}, {det['train_mpp']} µm/px)",
                        det["f1"]["test"]["f1"], {}, None, f"{det_name}.json"))
        more = [(n, r, f"{det_name}.json") for n, r in (det.get("tta_results") or {}).items()]
        extra = _load(folder, f"{det_name}_tta8")  # the same detector, 8 passes, evaluated later
        if extra:
            more.append((str(extra["tta"]), {"f1": extra["f1"]}, f"{det_name}_tta8.json"))
        for n, r, src in sorted(more, key=lambda t: int(t[0])):
            out.append(_row(f"DeNuC shipped detector, test-time augmentation x{n} (`--tta {n}`)",
                            r["f1"]["test"]["f1"], {}, None, src))
    for name in ("classifier_brca", "classifier_brca_tta4", "classifier_brca_feature_tta4"):
        out.extend(_classifier_rows(folder, name))
    return out


def _classifier_rows(folder: Path, name: str) -> list[str]:
    out: list[str] = []
    clf = _load(folder, name)
    tta = (clf or {}).get("detector_tta", 1)
    if clf:
        for r in clf["results"]:
            if tta != 1 and r.get("mode") == "e2e-joint":
                continue  # listed once, from classifier_brca.json
            t = r.get("test") or (r.get("reported") or {}).get("test")
            if not t:
                continue
            if "detection" in t:  # evaluate() report shape
                det_f1 = t["detection"]["f1"]
            else:
                det_f1 = t.get("det_f1")
            per = {c: t["classes"][c]["f1"] for c in CLASSES if c in t.get("classes", {})}
            label = {
                "linear": "DeNuC, efficientnet-lite0 frozen + linear head (shipped)",
                "mlp": "DeNuC, efficientnet-lite0 frozen + MLP head",
                "full": "DeNuC, efficientnet-lite0 full fine-tune",
                "lora": "DeNuC, LoRA",
                "e2e-joint": "End-to-end joint (one efficientnet-lite0 for both)",
            }.get(r["mode"], r["mode"])
            if tta != 1:
                label = label.replace(" (shipped)", "") + f", detector `--tta {tta}`"
            if r.get("feature_tta", 1) != 1:
                label = label.replace(" (shipped)", "") + f", features averaged over {r['feature_tta']} rotations"
            out.append(_row(label, det_f1, per, t["mean_f1"], f"{name}.json", t.get("gt_points_macro_f1")))
    return out


def gpu_tables(folder: Path) -> list[str]:
    """The GPU results (``*_h100.json``): detector ablation, then throughput."""
    out: list[str] = []
    abl = _load(folder, "detector_ablation_h100")
    if abl:
        rec = abl["train"]["recipe"]
        out += ["", f"Detector ablation on one {abl['train']['device']['gpu']} (detector_ablation_h100.json): "
                f"{rec['mpp']} µm/px, {len(abl['rows'])} runs at once, each stopped after "
                f"{rec['deadline_s']:.0f} s; BRCA-M2C, denuc protocol, 3 µm", "",
                "| backbone | matcher | params | epochs done | val F1 | test F1 | test precision | test recall |",
                "|---|---|---|---|---|---|---|---|"]
        for r in abl["rows"]:
            if "error" in r:
                continue
            v, t = r.get("val") or {}, r.get("test") or {}
            out.append(f"| {r['backbone']} | {r['matcher']} | {r['params'] / 1e6:.2f} M | "
                       f"{r['epochs_done']}/{r['epochs']} | {_fmt(v.get('f1'))} | {_fmt(t.get('f1'))} | "
                       f"{_fmt(t.get('precision'))} | {_fmt(t.get('recall'))} |")
    speed = [(n, _load(folder, n)) for n in ("detector_speed_h100", "pipeline_speed_h100")]
    if any(d for _, d in speed):
        out += ["", "Throughput on one NVIDIA H100, BRCA-M2C test images at 0.5 µm/px (Mpx/s of input)", "",
                "| what | tta | detector window / batch | Mpx/s | images/s | nuclei/s | JSON |",
                "|---|---|---|---|---|---|---|"]
        for n, d in speed:
            for r in (d or {}).get("rows", []):
                what = r.get("stage", "detect (detector_speed)")
                nps = r.get("nuclei_per_s") or round(r["nuclei"] / r["seconds"], 1)
                wb = f"{r['window']} / {r['batch']}" if "window" in r else "256 / device default"
                out.append(f"| {what} | {r['tta']} | {wb} | {r['mpx_per_s']:.2f} | {r['images_per_s']:.1f} | "
                           f"{nps:.0f} | {n}.json |")
    eq = _load(folder, "encode_query_speed_h100")
    if eq:
        out += ["", f"Encoder + point query vs bare encoder forward, {eq['device']} (encode_query_speed_h100.json; "
                f"{eq['results'][0]['windows_per_image']} windows of 256 px and "
                f"{eq['results'][0]['points_per_window']} points each per image)", "",
                "| encoder | precision | bare windows/s | query windows/s | query / bare | bare ms | set_image ms "
                "| sampling ms |", "|---|---|---|---|---|---|---|---|"]
        for r in eq["results"]:
            out.append(f"| {r['encoder']} | {r['precision']} | {r['bare_windows_per_s']:.0f} | "
                       f"{r['query_windows_per_s']:.0f} | {r['query_over_bare']:.2f} | {r['bare_ms_per_image']:.1f} | "
                       f"{r['set_image_ms']:.1f} | {r['sample_ms']:.1f} |")
    tr = _load(folder, "detector_train_speed_h100")
    if tr:
        out += ["", f"Detector training throughput, {tr['device']} with {tr['cpu_count']} CPU cores "
                f"(detector_train_speed_h100.json; {tr['backbone']}, batch {tr['batch']}, {tr['crop']} px crops at "
                f"{tr['mpp']} µm/px, stain jitter p {tr['stain_p']})", "",
                "| what | loader workers | crops/s |", "|---|---|---|"]
        for r in tr["rows"]:
            w = "" if r["workers"] is None else r["workers"]
            out.append(f"| {r['what']} | {w} | {r['crops_per_s']:.0f} |")
    return out


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--reported", type=Path, default=HERE / "reported")
    args = ap.parse_args()
    print("BRCA-M2C test split (30 images), F1 at 3 µm = 6 px at 0.5 µm/px; denuc protocol unless named")
    print("(macro F1 at GT points = the classifier alone, on the ground-truth points)")
    print("| method | det F1 | lymphocyte | tumor | stromal | mean class F1 | macro F1 at GT points | JSON |")
    print("|---|---|---|---|---|---|---|---|")
    for line in rows(args.reported):
        print(line)
    for line in gpu_tables(args.reported):
        print(line)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
