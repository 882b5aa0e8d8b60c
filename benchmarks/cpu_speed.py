"""CPU speed of the default pipeline against a base commit, side by side in one run, with accuracy.

Two worker processes run :class:`denuc.DeNuC` (``DeNuC.load(device="cpu")``, shipped models)
on the same BRCA-M2C images: one imports this checkout's ``src/`` (the new side: default
settings unless ``--runtime`` / ``--detector-window`` say otherwise), the other the base
commit's ``src/`` (extracted with ``git archive``, default ``75fafbd``). They never run at the
same time: the driver hands every image to one, waits, then to the other, alternating which
goes first, so both see the same share of a CPU that other processes also use. Each worker
uses ``--threads`` torch threads (ONNX Runtime uses as many); each times
``model(image (H, W, 3) uint8, mpp)`` (wall and process CPU seconds) on images already in
memory, after one untimed warm-up call whose time (ONNX export into an empty cache included)
is reported apart. Predictions are scored here with the denuc protocol at 3 µm (detection F1,
per-class F1 and their mean, as ``benchmarks/test_by_site.py``).

    python benchmarks/cpu_speed.py [--split test] [--base 75fafbd] [--threads 2] [--reps 1] [--report]
    python benchmarks/cpu_speed.py --split val --runtime torch --name cpu_speed_val_torch   # a variant on val

Writes ``benchmarks/results/<name>.json`` (default name ``cpu_speed`` for the test split,
``cpu_speed_val`` for val); ``--report`` also copies it to ``benchmarks/reported/``.
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

REPO = Path(__file__).resolve().parents[1]


# ------------------------------------------------------------------------ worker
def worker(args: argparse.Namespace) -> int:
    """Load the pipeline of whatever ``denuc`` is importable, then answer one JSON line per request."""
    import numpy as np
    import torch

    torch.set_num_threads(args.threads)
    from denuc.data import open_dataset
    from denuc.pipeline import DeNuC

    ds = open_dataset(args.data)
    kw: dict[str, Any] = {}
    if args.runtime is not None:
        kw["runtime"] = args.runtime
    if args.detector_window is not None:
        kw["detector_window"] = args.detector_window
    t0 = time.perf_counter()
    model = DeNuC.load(device="cpu", **kw)
    info = {"load_s": time.perf_counter() - t0, "threads": torch.get_num_threads(),
            "class_names": list(model.class_names)}
    runtimes = {}
    if hasattr(model.featurizer, "runner"):
        runtimes = {"detector": model.detector.runner.runtime, "encoder": model.featurizer.runner.runtime}
    info["runtimes"] = runtimes
    print(json.dumps(info), flush=True)
    out = Path(args.out)
    for line in sys.stdin:
        req = json.loads(line)
        smp = ds.load(req["stem"])
        c0, w0 = time.process_time(), time.perf_counter()
        nuc = model(smp.image, smp.mpp)
        wall, cpu = time.perf_counter() - w0, time.process_time() - c0
        np.savez(out / f"{req['stem']}.npz", xy=nuc.xy, class_ids=nuc.class_ids, scores=nuc.scores,
                 hw=np.array(smp.image.shape[:2]), mpp=np.array(smp.mpp))
        print(json.dumps({"stem": req["stem"], "wall_s": wall, "cpu_s": cpu, "n": len(nuc)}), flush=True)
    return 0


class Worker:
    """One worker process (see :func:`worker`) importing ``src``."""

    def __init__(self, label: str, src: Path, out: Path, args: argparse.Namespace, extra: list[str],
                 cache: Path | None) -> None:
        env = dict(os.environ, PYTHONPATH=str(src), OMP_NUM_THREADS=str(args.threads),
                   MKL_NUM_THREADS=str(args.threads))
        if cache is not None:
            env["DENUC_CACHE"] = str(cache)
        out.mkdir(parents=True, exist_ok=True)
        cmd = [sys.executable, str(Path(__file__).resolve()), "--worker", "--data", str(args.data),
               "--threads", str(args.threads), "--out", str(out), *extra]
        self.label, self.out = label, out
        self.proc = subprocess.Popen(cmd, env=env, stdin=subprocess.PIPE, stdout=subprocess.PIPE, text=True,
                                     cwd=str(REPO / "benchmarks"))
        self.info = self._read()

    def _read(self) -> dict[str, Any]:
        assert self.proc.stdout is not None
        line = self.proc.stdout.readline()
        if not line:
            raise RuntimeError(f"{self.label} worker exited (status {self.proc.wait()})")
        return json.loads(line)

    def run(self, stem: str) -> dict[str, Any]:
        assert self.proc.stdin is not None
        self.proc.stdin.write(json.dumps({"stem": stem}) + "\n")
        self.proc.stdin.flush()
        return self._read()

    def close(self) -> None:
        if self.proc.stdin is not None:
            self.proc.stdin.close()
        self.proc.wait(timeout=60)


# ------------------------------------------------------------------------ driver
def extract_base(rev: str, dest: Path) -> str:
    """``git archive`` of ``rev``'s ``src/`` into ``dest``; returns the full commit id."""
    sha = subprocess.run(["git", "-C", str(REPO), "rev-parse", rev], check=True, capture_output=True,
                         text=True).stdout.strip()
    arch = subprocess.run(["git", "-C", str(REPO), "archive", sha, "src"], check=True, capture_output=True).stdout
    subprocess.run(["tar", "-x", "-C", str(dest)], input=arch, check=True)
    return sha


def score(gt: dict[str, Any], folder: Path, class_names: list[str]) -> dict[str, Any]:
    import numpy as np

    from denuc.core.result import Nuclei
    from denuc.evaluate import evaluate

    pred = {}
    for s in gt:
        z = np.load(folder / f"{s}.npz")
        hw = tuple(int(v) for v in z["hw"])
        pred[s] = Nuclei(z["xy"], z["scores"].astype(np.float32), z["class_ids"].astype(np.int64),
                         tuple(class_names), None, float(z["mpp"]), hw, s)
    rep = evaluate(gt, pred, protocol="denuc", radius_um=3.0)
    return {"det_f1": rep.detection.f1, "det_precision": rep.detection.precision,
            "det_recall": rep.detection.recall, "class_f1": {c: v.f1 for c, v in rep.classes.items()},
            "mean_f1": rep.mean_f1, "points": int(sum(len(p) for p in pred.values()))}


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--split", default="test", choices=("train", "val", "test"))
    ap.add_argument("--base", default="75fafbd", help="base commit (default: %(default)s)")
    ap.add_argument("--threads", type=int, default=2, help="torch (and ONNX Runtime) threads per worker")
    ap.add_argument("--reps", type=int, default=1, help="passes over the images (timings summed)")
    ap.add_argument("--limit", type=int, default=0, help="first N images only (0 = all)")
    ap.add_argument("--runtime", default=None, help="new side: DeNuC.load(runtime=...) (default: its default)")
    ap.add_argument("--detector-window", type=int, default=None, help="new side: detector window (default: its default)")
    ap.add_argument("--name", default=None, help="result name (default: cpu_speed, or cpu_speed_<split>)")
    ap.add_argument("--report", action="store_true", help="also copy the JSON to benchmarks/reported/")
    ap.add_argument("--data", type=Path, default=None, help=argparse.SUPPRESS)
    ap.add_argument("--worker", action="store_true", help=argparse.SUPPRESS)
    ap.add_argument("--out", default=None, help=argparse.SUPPRESS)
    args = ap.parse_args()
    if args.worker:
        return worker(args)

    sys.path.insert(0, str(REPO / "src"))
    from common import cpu_name, run_info, write_result

    from denuc.data import open_dataset
    from denuc.data.paths import brca_m2c_dir

    args.data = args.data or brca_m2c_dir()
    ds = open_dataset(args.data)
    stems = ds.stems(args.split)[: args.limit or None]
    gt = {s: ds.load(s).points for s in stems}
    extra = []
    if args.runtime is not None:
        extra += ["--runtime", args.runtime]
    if args.detector_window is not None:
        extra += ["--detector-window", str(args.detector_window)]
    with tempfile.TemporaryDirectory(prefix="denuc-cpu-speed-") as tmp:
        t = Path(tmp)
        (t / "base").mkdir()
        base_sha = extract_base(args.base, t / "base")
        workers = {"base": Worker("base", t / "base" / "src", t / "pred_base", args, [], None),
                   "new": Worker("new", REPO / "src", t / "pred_new", args, extra, t / "cache")}
        try:
            warm = {}
            for k, w in workers.items():  # untimed warm-up; the new side exports into an empty cache here
                t0 = time.perf_counter()
                w.run(stems[0])
                warm[k] = round(time.perf_counter() - t0, 2)
            times: dict[str, dict[str, list[float]]] = {k: {"wall": [], "cpu": []} for k in workers}
            per_image = []
            for rep in range(args.reps):
                for i, s in enumerate(stems):
                    order = ["base", "new"] if (i + rep) % 2 == 0 else ["new", "base"]
                    row: dict[str, Any] = {"stem": s, "rep": rep, "first": order[0]}
                    for k in order:
                        r = workers[k].run(s)
                        times[k]["wall"].append(r["wall_s"])
                        times[k]["cpu"].append(r["cpu_s"])
                        row[k] = {"wall_s": round(r["wall_s"], 3), "cpu_s": round(r["cpu_s"], 3), "points": r["n"]}
                    per_image.append(row)
                    print(f"[{rep}] {s[:40]:40} base {row['base']['wall_s']:6.2f} s  new {row['new']['wall_s']:6.2f} s"
                          f"  ({row['base']['wall_s'] / max(row['new']['wall_s'], 1e-9):.2f}x)", flush=True)
            infos = {k: w.info for k, w in workers.items()}
        finally:
            for w in workers.values():
                w.close()
        acc = {k: score(gt, t / f"pred_{k}", infos[k]["class_names"]) for k in workers}

    import numpy as np

    sums = {k: {m: float(np.sum(v)) for m, v in d.items()} for k, d in times.items()}
    ratios = np.array([r["base"]["wall_s"] / r["new"]["wall_s"] for r in per_image])
    result = {
        "benchmark": "cpu_speed", "split": args.split, "images": len(stems), "reps": args.reps,
        "threads": args.threads, "base_commit": base_sha,
        "new_commit": subprocess.run(["git", "-C", str(REPO), "rev-parse", "HEAD"], capture_output=True,
                                     text=True).stdout.strip(),
        "new_settings": {"runtime": args.runtime or "default", "detector_window": args.detector_window or "default",
                         "runtimes_used": infos["new"].get("runtimes", {})},
        "protocol": "denuc", "radius_um": 3.0, "cpu": cpu_name(), **run_info("cpu_speed.py"),
        "speedup_wall": round(sums["base"]["wall"] / sums["new"]["wall"], 3),
        "speedup_cpu": round(sums["base"]["cpu"] / sums["new"]["cpu"], 3),
        "speedup_wall_median_per_image": round(float(np.median(ratios)), 3),
        "seconds": {k: {m: round(v, 2) for m, v in d.items()} for k, d in sums.items()},
        "warmup_s": warm, "load_s": {k: round(infos[k]["load_s"], 2) for k in infos},
        "accuracy": acc,
        "accuracy_delta": {"det_f1": round(acc["new"]["det_f1"] - acc["base"]["det_f1"], 4),
                           "mean_f1": round(acc["new"]["mean_f1"] - acc["base"]["mean_f1"], 4)},
        "per_image": per_image,
    }
    print(f"\n{len(stems)} {args.split} images x {args.reps}, {args.threads} threads: new is "
          f"{result['speedup_wall']:.2f}x faster (wall; median per image {result['speedup_wall_median_per_image']:.2f}x, "
          f"CPU time {result['speedup_cpu']:.2f}x)")
    for k in ("base", "new"):
        a = acc[k]
        print(f"  {k:4}: {sums[k]['wall']:7.1f} s wall, det F1 {a['det_f1']:.4f}, mean class F1 {a['mean_f1']:.4f}, "
              f"warm-up {warm[k]} s")
    name = args.name or ("cpu_speed" if args.split == "test" else f"cpu_speed_{args.split}")
    write_result(name, result, args.report)
    return 0


if __name__ == "__main__":
    sys.exit(main())
