"""Speed of the command a user types, side by side with base commits: processes, not calls.

Each side is a git worktree of a commit (``runs/cli_speed/wt-<commit>``, made with ``git worktree
add --detach`` when missing) whose ``src/`` goes first on ``PYTHONPATH``, so the side runs its own
code in the shared Python environment; the side ``new`` is this checkout. Every timed run is a
fresh process of the ``denuc`` command line::

    python -c "from denuc.cli import main; ..." predict <the split's images> --mpp 0.5 --format csv --out DIR

(default options otherwise: what each commit's ``denuc predict`` does by default, so ``75fafbd``
writes CSVs only and later commits also a summary and an overlay per input). Sides run one at a
time, never together, alternating their order from repetition to repetition; a side's time is
the best (smallest wall time) of ``--reps`` runs, with the process's CPU time (user + system) of
that run. Before the timed runs each side runs once on one image, untimed, with a shared
``DENUC_CACHE`` (``runs/cli_speed/cache``), so ONNX exports are cached (warm cache) and the
images sit in the page cache.

Cases:

* ``tiles``: the ``--split`` images of BRCA-M2C (default the 30 test images);
* ``busy``: the same while another process keeps two threads busy (numpy matrix products on one
  BLAS thread each, releasing the GIL) beside both sides, started before and stopped after the
  case;
* ``slide``: ``predict`` on the pyramidal slide ``benchmarks/make_test_slide.py brca`` builds
  (``runs/test_slides/brca.svs``, 0.25 µm/px; made when missing): seconds per mm² of tissue
  (the tissue area of the side's ``<stem>.summary.json``), and whether the points and classes
  equal those of the first side that writes summaries (default ``eaf4246``).

Accuracy of the ``tiles`` case: every side's CSVs of its best run are scored with
:func:`denuc.evaluate` against the BRCA-M2C labels (denuc protocol, 3 µm): detection F1 and mean
class F1. The per-stage times (summed ``timings_ms`` of the summaries) are listed for the sides
that write summaries.

    python benchmarks/cli_speed.py [--bases 75fafbd eaf4246] [--cases tiles busy slide] [--reps 2] [--report]

Prints a table and writes ``benchmarks/results/<name>.json`` (default ``cli_speed``);
``--report`` also copies it to ``benchmarks/reported/``.
"""

from __future__ import annotations

import argparse
import json
import os
import resource
import shutil
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

from common import cpu_name, run_info, write_result

REPO = Path(__file__).resolve().parents[1]
WORK = REPO / "runs" / "cli_speed"
CLI = "import sys; from denuc.cli import main; sys.exit(main(sys.argv[1:]))"
BUSY = r"""
import threading, numpy as np
a = np.random.default_rng(0).random((384, 384))
def spin():
    while True:
        a @ a
for _ in range(2):
    threading.Thread(target=spin, daemon=True).start()
threading.Event().wait()
"""


def git(*args: str) -> str:
    return subprocess.run(["git", "-C", str(REPO), *args], check=True, capture_output=True, text=True).stdout.strip()


def side_src(rev: str) -> tuple[Path, str]:
    """``src/`` of a worktree of ``rev`` (made when missing) and the full commit id."""
    sha = git("rev-parse", f"{rev}^{{commit}}")
    wt = WORK / f"wt-{sha[:10]}"
    if not (wt / "src" / "denuc").is_dir():
        WORK.mkdir(parents=True, exist_ok=True)
        git("worktree", "add", "--detach", str(wt), sha)
    return wt / "src", sha


def run_cli(src: Path, argv: list[str], threads: int | None) -> dict[str, Any]:
    """One ``denuc`` process; wall and CPU seconds (its own and its children's)."""
    env = dict(os.environ, PYTHONPATH=str(src), DENUC_CACHE=str(WORK / "cache"))
    if threads is not None:
        env["OMP_NUM_THREADS"] = str(threads)
    r0 = resource.getrusage(resource.RUSAGE_CHILDREN)
    t0 = time.perf_counter()
    p = subprocess.run([sys.executable, "-c", CLI, *argv], env=env, capture_output=True, text=True)
    wall = time.perf_counter() - t0
    r1 = resource.getrusage(resource.RUSAGE_CHILDREN)
    if p.returncode != 0:
        sys.exit(f"{src}: denuc {' '.join(argv[:1])} failed ({p.returncode}):\n{p.stderr[-3000:]}")
    return {"wall_s": round(wall, 3), "cpu_s": round((r1.ru_utime - r0.ru_utime) + (r1.ru_stime - r0.ru_stime), 3)}


def stage_sums(out: Path) -> dict[str, float] | None:
    """Summed ``timings_ms`` (s) and ``wall_s`` of the summaries in ``out`` (None: none written)."""
    tot: dict[str, float] = {}
    files = [f for f in sorted(out.glob("*.summary.json"))]
    if not files:
        return None
    for f in files:
        s = json.loads(f.read_text())
        for k, v in s.get("timings_ms", {}).items():
            tot[k] = tot.get(k, 0.0) + v / 1e3
        tot["wall_in_inputs"] = tot.get("wall_in_inputs", 0.0) + float(s.get("wall_s") or 0.0)
    return {k: round(v, 2) for k, v in sorted(tot.items())}


def run_case(name: str, sides: dict[str, Path], argv_of: Any, reps: int, threads: int | None) -> dict[str, Any]:
    """Best of ``reps`` alternating runs per side; outputs of each side's best run are kept."""
    runs: dict[str, list[dict[str, Any]]] = {k: [] for k in sides}
    keys = list(sides)
    for rep in range(reps):
        order = keys[rep % len(keys):] + keys[:rep % len(keys)]  # each side leads in turn
        for k in order:
            out = WORK / "out" / name / f"{k}-{rep}"
            shutil.rmtree(out, ignore_errors=True)
            out.mkdir(parents=True)
            r = run_cli(sides[k], argv_of(out), threads)
            r["rep"], r["out"] = rep, str(out)
            runs[k].append(r)
            print(f"  {name:6} rep {rep} {k:>8}: {r['wall_s']:7.2f} s wall, {r['cpu_s']:7.2f} s CPU", flush=True)
    best = {k: min(v, key=lambda r: r["wall_s"]) for k, v in runs.items()}
    return {"runs": runs, "best": best}


def score_tiles(out: Path, stems: list[str], gt: dict[str, Any]) -> dict[str, Any]:
    from denuc.core.result import Nuclei
    from denuc.evaluate import evaluate

    pred = {s: Nuclei.read_csv(out / f"{s}.csv", mpp=0.5) for s in stems}
    rep = evaluate(gt, pred, protocol="denuc", radius_um=3.0)
    return {"det_f1": round(rep.detection.f1, 4), "mean_class_f1": round(rep.mean_f1, 4),
            "class_f1": {c: round(v.f1, 4) for c, v in rep.classes.items()},
            "points": int(sum(len(p) for p in pred.values()))}


def same_points(a: Path, b: Path) -> dict[str, Any]:
    """Points and classes of two CSVs: equal count and classes, largest coordinate difference."""
    import numpy as np

    from denuc.core.result import Nuclei

    p, q = Nuclei.read_csv(a), Nuclei.read_csv(b)
    if len(p) != len(q):  # which points the two share (same place within 1e-3 px, same class)
        key = {(round(float(x), 3), round(float(y), 3)): c for (x, y), c in zip(p.xy, p.classes, strict=True)}
        hits = [key.get((round(float(x), 3), round(float(y), 3)), None) for x, y in q.xy]
        shared = sum(h is not None for h in hits)
        same_cls = sum(h is not None and h == c for h, c in zip(hits, q.classes, strict=True))
        return {"same": False, "points": [len(p), len(q)], "shared": int(shared), "shared_with_same_class": int(same_cls),
                "same_class_share_of_shared": round(same_cls / max(shared, 1), 4),
                "only_first": len(p) - int(shared), "only_second": len(q) - int(shared)}
    ip, iq = np.lexsort((p.xy[:, 1], p.xy[:, 0])), np.lexsort((q.xy[:, 1], q.xy[:, 0]))
    dxy = float(np.abs(p.xy[ip] - q.xy[iq]).max()) if len(p) else 0.0
    agree = np.asarray(p.class_names)[p.class_ids[ip]] == np.asarray(q.class_names)[q.class_ids[iq]]
    same_cls = bool(agree.all())
    return {"same": bool(dxy <= 1e-3 and same_cls), "points": len(p), "max_xy_diff_px": dxy, "same_classes": same_cls,
            "same_class_share": round(float(agree.mean()) if len(p) else 1.0, 4)}


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--bases", nargs="+", default=["75fafbd", "eaf4246"],
                    help="base commits, each run side by side with this checkout (default: %(default)s)")
    ap.add_argument("--cases", nargs="+", default=["tiles", "busy", "slide"], choices=["tiles", "busy", "slide"],
                    help="what to time (default: all)")
    ap.add_argument("--busy-bases", nargs="+", default=["75fafbd"],
                    help="busy case: bases run beside the busy process (default: %(default)s)")
    ap.add_argument("--slide-bases", nargs="+", default=["eaf4246"], help="slide case: bases (default: %(default)s)")
    ap.add_argument("--split", default="test", choices=("train", "val", "test"), help="BRCA-M2C split (default: test)")
    ap.add_argument("--limit", type=int, default=0, help="first N images only (default 0 = all)")
    ap.add_argument("--reps", type=int, default=2, help="runs per side and case; the best counts (default: 2)")
    ap.add_argument("--threads", type=int, default=None,
                    help="OMP_NUM_THREADS for every side (default: unset, each command's own default)")
    ap.add_argument("--name", default="cli_speed", help="result name (default: %(default)s)")
    ap.add_argument("--report", action="store_true", help="also copy the JSON to benchmarks/reported/")
    args = ap.parse_args()

    sys.path.insert(0, str(REPO / "src"))
    from denuc.data import open_dataset
    from denuc.data.paths import brca_m2c_dir

    root = brca_m2c_dir()
    ds = open_dataset(root)
    stems = ds.stems(args.split)[: args.limit or None]
    files = [str(root / "images" / f"{s}.png") for s in stems]
    for f in files:
        if not Path(f).is_file():
            sys.exit(f"{f}: missing")
    srcs: dict[str, Path] = {}
    shas: dict[str, str] = {}
    used = {"tiles": args.bases, "busy": args.busy_bases, "slide": args.slide_bases}
    for b in dict.fromkeys([b for c in args.cases for b in used[c]]):  # only the sides the cases run
        srcs[b], shas[b] = side_src(b)
    srcs["new"], shas["new"] = REPO / "src", git("rev-parse", "HEAD")
    dirty = bool(git("status", "--porcelain", "--untracked-files=no", "src"))

    def tiles_argv(out: Path) -> list[str]:
        return ["predict", *files, "--mpp", "0.5", "--format", "csv", "--out", str(out)]

    print("warm-up (untimed): one image per side, shared ONNX cache", flush=True)
    warm = {}
    for k, src in srcs.items():
        out = WORK / "out" / "warmup" / k
        shutil.rmtree(out, ignore_errors=True)
        warm[k] = run_cli(src, ["predict", files[0], "--mpp", "0.5", "--format", "csv", "--out", str(out)],
                          args.threads)
    result: dict[str, Any] = {
        "benchmark": "cli_speed", "split": args.split, "images": len(stems), "reps": args.reps,
        "threads": args.threads or "default", "commits": shas, "new_has_uncommitted_src_changes": dirty,
        "cpu": cpu_name(), "load_avg_at_start": list(os.getloadavg()), **run_info("cli_speed.py"),
        "command_tiles": "denuc predict <images> --mpp 0.5 --format csv --out DIR", "warmup": warm, "cases": {}}
    gt = {s: ds.load(s).points for s in stems}
    if "tiles" in args.cases:
        sides = {k: srcs[k] for k in [*args.bases, "new"]}
        case = run_case("tiles", sides, tiles_argv, args.reps, args.threads)
        for k, r in case["best"].items():
            r["accuracy"] = score_tiles(Path(r["out"]), stems, gt)
            r["stages_s"] = stage_sums(Path(r["out"]))
        case["speedup_wall"] = {b: round(case["best"][b]["wall_s"] / case["best"]["new"]["wall_s"], 3) for b in args.bases}
        case["speedup_cpu"] = {b: round(case["best"][b]["cpu_s"] / case["best"]["new"]["cpu_s"], 3) for b in args.bases}
        result["cases"]["tiles"] = case
    if "busy" in args.cases:
        hog = subprocess.Popen([sys.executable, "-c", BUSY], env=dict(os.environ, OPENBLAS_NUM_THREADS="1"))
        try:
            time.sleep(2)
            sides = {k: srcs[k] for k in [*args.busy_bases, "new"]}
            case = run_case("busy", sides, tiles_argv, args.reps, args.threads)
        finally:
            hog.kill()
            hog.wait()
        for k, r in case["best"].items():
            r["accuracy"] = score_tiles(Path(r["out"]), stems, gt)
        case["speedup_wall"] = {b: round(case["best"][b]["wall_s"] / case["best"]["new"]["wall_s"], 3)
                                for b in args.busy_bases}
        result["cases"]["busy"] = case
    if "slide" in args.cases:
        slide = REPO / "runs" / "test_slides" / "brca.svs"
        if not slide.is_file():
            subprocess.run([sys.executable, str(REPO / "benchmarks" / "make_test_slide.py"), "brca", "--out",
                            str(slide)], check=True)
        sides = {k: srcs[k] for k in [*args.slide_bases, "new"]}
        case = run_case("slide", sides, lambda out: ["predict", str(slide), "--format", "csv", "--out", str(out)],
                        args.reps, args.threads)
        for k, r in case["best"].items():
            s = json.loads((Path(r["out"]) / f"{slide.stem}.summary.json").read_text())
            r["tissue_mm2"] = s.get("tissue_area_mm2")
            r["s_per_mm2"] = round(r["wall_s"] / r["tissue_mm2"], 3) if r.get("tissue_mm2") else None
            r["nuclei"] = s.get("nuclei")
            r["stages_s"] = stage_sums(Path(r["out"]))
        ref = args.slide_bases[0]
        case["same_points_as_" + ref] = same_points(Path(case["best"][ref]["out"]) / f"{slide.stem}.csv",
                                                    Path(case["best"]["new"]["out"]) / f"{slide.stem}.csv")
        case["speedup_wall"] = {b: round(case["best"][b]["wall_s"] / case["best"]["new"]["wall_s"], 3)
                                for b in args.slide_bases}
        result["cases"]["slide"] = case
    result["load_avg_at_end"] = list(os.getloadavg())

    print(f"\n{'case':6} {'side':>8} {'wall s':>8} {'CPU s':>8} {'speed-up':>9}  accuracy / s per mm²")
    for cname, case in result["cases"].items():
        for k, r in case["best"].items():
            sp = case["speedup_wall"].get(k)
            extra = ""
            if "accuracy" in r:
                extra = f"det F1 {r['accuracy']['det_f1']:.4f}, mean class F1 {r['accuracy']['mean_class_f1']:.4f}"
            if r.get("s_per_mm2") is not None:
                extra = f"{r['s_per_mm2']} s/mm² ({r['tissue_mm2']:.3f} mm² tissue)"
            print(f"{cname:6} {k:>8} {r['wall_s']:8.2f} {r['cpu_s']:8.2f} "
                  f"{'' if k == 'new' else f'{sp:.2f}x':>9}  {extra}")
        if cname == "tiles":
            stages = {k: r["stages_s"] for k, r in case["best"].items() if r.get("stages_s")}
            names = sorted({n for v in stages.values() for n in v})
            if stages:
                print("  stage seconds (summed over inputs): " + "  ".join(f"{k}" for k in stages))
                for n in names:
                    print(f"    {n:16} " + "  ".join(f"{stages[k].get(n, 0):8.2f}" for k in stages))
    if "slide" in result["cases"]:
        print("slide points:", {k: v for k, v in result["cases"]["slide"].items() if k.startswith("same_points")})
    write_result(args.name, result, args.report)
    return 0


if __name__ == "__main__":
    sys.exit(main())
